-- The operator dashboard (/dashboard): login sessions, and indexes that keep its views
-- quick with a large history (100,000 operations and more).

-- A session is created by logging in with an admin key. Only a hash of the cookie's token
-- is stored; the CSRF token is compared with every action form. Revoking the key ends
-- its sessions (the lookup joins the key).
create table dashboard_sessions (
    token_hash bytea primary key,
    key_id     uuid not null references api_keys (id) on delete cascade,
    csrf_token text not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null
);
create index dashboard_sessions_expiry_idx on dashboard_sessions (expires_at);

-- Queue counts per kind and status (and first attempt vs retry) from the index alone.
create index operations_status_kind_idx on operations (status, kind, attempts);
-- Throughput and failure rate over the last minutes.
create index operations_finished_idx on operations (finished_at) where finished_at is not null;
-- The capsule list filtered by status, newest first.
create index capsules_status_idx on capsules (status, id desc);
-- An operation's timeline.
create index events_operation_idx on events (operation_id, id) where operation_id is not null;
