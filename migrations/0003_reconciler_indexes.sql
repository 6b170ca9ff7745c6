-- The reconciler looks for lost jobs every tick. One index per way a job gets lost, so
-- that a healthy backlog of 100,000 queued operations costs it three short index scans
-- instead of a walk over every unfinished operation.

-- Committed, never pushed.
create index operations_unpushed_idx on operations (created_at)
    where pushed_at is null and status in ('queued', 'running', 'retrying');

-- Pushed into another Redis epoch (Redis lost its data since).
create index operations_pushed_epoch_idx on operations (pushed_epoch)
    where pushed_at is not null and status in ('queued', 'running', 'retrying');

-- Held under a lease that may have expired (the worker died).
create index operations_lease_idx on operations (lease_expires_at)
    where status in ('running', 'retrying');

-- Running capsules past their timeout (auto-pause).
create index capsules_expiry_idx on capsules (expires_at) where status = 'running';
