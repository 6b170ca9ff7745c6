-- Hangar's schema. Postgres is the truth: every lifecycle request is an operation row
-- (the intent and the job handle) committed before its job is pushed to Redis.
-- Append-only: change the schema with a new migration, never by editing this one.

create table teams (
    id          uuid primary key,
    name        text not null,
    is_platform boolean not null default false,
    created_at  timestamptz not null default now(),
    constraint teams_name_unique unique (name),
    constraint teams_name_length check (char_length(name) between 1 and 64)
);

-- Only a SHA-256 of each key is stored; `prefix` is shown to people to tell keys apart.
create table api_keys (
    id         uuid primary key,
    team_id    uuid not null references teams (id),
    name       text not null,
    prefix     text not null,
    key_hash   bytea not null,
    is_admin   boolean not null default false,
    created_at timestamptz not null default now(),
    revoked_at timestamptz,
    constraint api_keys_hash_unique unique (key_hash)
);

create table hosts (
    id                 uuid primary key,
    name               text not null,
    address            text not null,
    driver             text not null,
    -- Hash of the token the agent presents to the control plane.
    token_hash         bytea not null,
    -- The token workers present to the agent (the agent chose it and checks it).
    agent_token        text not null,
    status             text not null default 'healthy',
    cordoned           boolean not null default false,
    vcpus_total        integer not null,
    memory_mb_total    integer not null,
    -- Placement reserves capacity here atomically, so concurrent creates never overbook.
    vcpus_reserved     integer not null default 0,
    memory_mb_reserved integer not null default 0,
    created_at         timestamptz not null default now(),
    constraint hosts_name_unique unique (name),
    constraint hosts_status_check check (status in ('healthy', 'unreachable')),
    constraint hosts_reservation_check check (
        vcpus_reserved >= 0 and memory_mb_reserved >= 0
        and vcpus_reserved <= vcpus_total and memory_mb_reserved <= memory_mb_total
    )
);

-- Heartbeats live apart from `hosts`, so they never queue behind placement's row locks.
create table host_heartbeats (
    host_id           uuid primary key references hosts (id),
    last_heartbeat_at timestamptz not null default now(),
    vcpus_used        integer not null default 0,
    memory_mb_used    integer not null default 0
);

-- A template is a base image (`image`) or a snapshot held by one host (`snapshot_host_id`).
create table templates (
    id               uuid primary key,
    team_id          uuid not null references teams (id),
    name             text not null,
    status           text not null default 'ready',
    image            text,
    snapshot_host_id uuid references hosts (id),
    source_capsule_id uuid,
    vcpus            integer not null,
    memory_mb        integer not null,
    created_at       timestamptz not null default now(),
    constraint templates_status_check check (status in ('pending', 'ready', 'retired')),
    constraint templates_source_check check (image is not null or snapshot_host_id is not null)
);
-- One ready template per name and team; a replacement is `pending` until its snapshot exists.
create unique index templates_ready_name_unique on templates (team_id, name) where status = 'ready';

create table capsules (
    id              uuid primary key,
    team_id         uuid not null references teams (id),
    template_id     uuid not null references templates (id),
    host_id         uuid references hosts (id),
    status          text not null,
    status_reason   text,
    generation      bigint not null default 1,
    vcpus           integer not null,
    memory_mb       integer not null,
    timeout_sec     integer not null,
    -- When the capsule is auto-paused unless kept alive.
    expires_at      timestamptz not null,
    -- When a transient status must have settled; the reconciler settles it after that.
    status_deadline timestamptz,
    metadata        jsonb not null default '{}',
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    constraint capsules_status_check check (status in (
        'starting', 'running', 'pausing', 'paused', 'resuming', 'snapshotting',
        'stopping', 'stopped', 'error', 'unknown'
    )),
    constraint capsules_vcpus_check check (vcpus between 1 and 64),
    constraint capsules_memory_check check (memory_mb between 128 and 262144)
);
create index capsules_team_idx on capsules (team_id, id desc);
create index capsules_host_idx on capsules (host_id) where status <> 'stopped';
create index capsules_deadline_idx on capsules (status_deadline) where status_deadline is not null;

create table operations (
    id              uuid primary key,
    team_id         uuid not null references teams (id),
    capsule_id      uuid references capsules (id),
    kind            text not null,
    status          text not null default 'queued',
    -- The capsule generation this operation was made for (a stale job does nothing).
    generation      bigint not null,
    attempts        integer not null default 0,
    max_attempts    integer not null,
    last_error      text,
    error_code      text,
    -- The last step a multi-step job completed; a retry resumes after it.
    step            text,
    params          jsonb not null default '{}',
    result          jsonb,
    -- Set once the job is on Redis, with the Redis epoch it was pushed in (see `queue.rs`);
    -- the reconciler re-pushes rows never pushed, or pushed into an epoch Redis lost.
    pushed_at       timestamptz,
    pushed_epoch    text,
    lease_owner     text,
    lease_expires_at timestamptz,
    created_at      timestamptz not null default now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz not null default now(),
    constraint operations_kind_check check (kind in (
        'create', 'pause', 'resume', 'snapshot', 'destroy', 'host_event'
    )),
    constraint operations_status_check check (status in (
        'queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled'
    ))
);
-- One lifecycle operation in flight per capsule; a destroy may wait behind it.
create unique index operations_one_in_flight on operations (capsule_id)
    where status in ('queued', 'running', 'retrying') and kind in ('create', 'pause', 'resume', 'snapshot');
create unique index operations_one_destroy on operations (capsule_id)
    where status in ('queued', 'running', 'retrying') and kind = 'destroy';
create index operations_team_idx on operations (team_id, id desc);
create index operations_capsule_idx on operations (capsule_id, id desc);
create index operations_unfinished_idx on operations (created_at)
    where status in ('queued', 'running', 'retrying');

-- Idempotency-Key replay: the first successful response is stored with a hash of the request.
create table idempotency_keys (
    team_id      uuid not null references teams (id),
    key          text not null,
    request_hash bytea not null,
    status_code  integer not null,
    response     jsonb not null,
    created_at   timestamptz not null default now(),
    primary key (team_id, key)
);

-- Append-only capsule history; its id is the resume cursor of the event stream.
create table events (
    id           bigserial primary key,
    team_id      uuid not null references teams (id),
    capsule_id   uuid references capsules (id),
    operation_id uuid references operations (id),
    kind         text not null,
    from_status  text,
    to_status    text,
    message      text,
    created_at   timestamptz not null default now()
);
create index events_capsule_idx on events (capsule_id, id);

-- Host reports already applied, so a redelivered report is applied once.
create table host_events (
    host_id     uuid not null references hosts (id),
    event_id    uuid not null,
    received_at timestamptz not null default now(),
    primary key (host_id, event_id)
);

create table audit_log (
    id          bigserial primary key,
    actor_key_id uuid,
    team_id     uuid,
    action      text not null,
    resource    text not null,
    outcome     text not null,
    detail      jsonb not null default '{}',
    created_at  timestamptz not null default now()
);

-- The platform team (operators) and the base template exist from the start.
insert into teams (id, name, is_platform)
values ('00000000-0000-7000-8000-000000000001', 'platform', true);

insert into templates (id, team_id, name, image, vcpus, memory_mb)
values ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001', 'base', 'base', 1, 128);
