-- A resumable, gap-free order for the event stream (`GET /v1/events`).
--
-- Event ids come from a sequence, so they are assigned in insert order, not commit order: a
-- reader that remembered "the last id I saw" could skip an event whose transaction began
-- earlier and committed later. Each event records its transaction id instead, and readers
-- take only events of transactions older than every transaction still running
-- (`pg_snapshot_xmin`), in (xid, id) order: whatever commits later has a larger xid than
-- anything already read, so a cursor of (xid, id) never skips an event.
alter table events add column xid xid8 not null default pg_current_xact_id();
create index events_position_idx on events (xid, id);
