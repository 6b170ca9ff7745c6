//! Hosts: registration, heartbeats, health, and capacity reservations for placement.

use super::{Host, PgConnection, StoreResult};
use crate::ids::{CapsuleId, HostId};

pub struct Registration<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub driver: &'a str,
    pub token_hash: &'a [u8],
    pub agent_token: &'a str,
    pub vcpus: i32,
    pub memory_mb: i32,
}

/// Registers a host, or re-registers it by name (new address and tokens, same id).
pub async fn register(conn: &mut PgConnection, r: Registration<'_>) -> StoreResult<HostId> {
    let id = sqlx::query_scalar!(
        r#"insert into hosts (id, name, address, driver, token_hash, agent_token,
                              vcpus_total, memory_mb_total)
           values ($1, $2, $3, $4, $5, $6, $7, $8)
           on conflict (name) do update
             set address = excluded.address, driver = excluded.driver,
                 token_hash = excluded.token_hash, agent_token = excluded.agent_token,
                 vcpus_total = greatest(excluded.vcpus_total, hosts.vcpus_reserved),
                 memory_mb_total = greatest(excluded.memory_mb_total, hosts.memory_mb_reserved)
           returning id as "id: HostId""#,
        HostId::new().0,
        r.name,
        r.address,
        r.driver,
        r.token_hash,
        r.agent_token,
        r.vcpus,
        r.memory_mb,
    )
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query!(
        "insert into host_heartbeats (host_id) values ($1)
         on conflict (host_id) do update set last_heartbeat_at = now()",
        id.0,
    )
    .execute(conn)
    .await?;
    Ok(id)
}

/// The token hash of a host, to authenticate its calls.
pub async fn token_hash(conn: &mut PgConnection, id: HostId) -> StoreResult<Option<Vec<u8>>> {
    let hash = sqlx::query_scalar!("select token_hash from hosts where id = $1", id.0)
        .fetch_optional(conn)
        .await?;
    Ok(hash)
}

pub struct Usage {
    pub vcpus_used: i32,
    pub memory_mb_used: i32,
}

/// Records a heartbeat. Returns whether the host had been `unreachable` (it came back).
/// Touches the `hosts` row only in that rare case, so heartbeats never wait on placement.
pub async fn heartbeat(conn: &mut PgConnection, id: HostId, usage: Usage) -> StoreResult<bool> {
    sqlx::query!(
        "update host_heartbeats set last_heartbeat_at = now(), vcpus_used = $2, memory_mb_used = $3
         where host_id = $1",
        id.0,
        usage.vcpus_used,
        usage.memory_mb_used,
    )
    .execute(&mut *conn)
    .await?;
    let back = sqlx::query!(
        "update hosts set status = 'healthy' where id = $1 and status = 'unreachable'",
        id.0,
    )
    .execute(conn)
    .await?;
    Ok(back.rows_affected() == 1)
}

pub async fn get(conn: &mut PgConnection, id: HostId) -> StoreResult<Option<Host>> {
    let host = sqlx::query_as!(
        Host,
        r#"select h.id as "id: HostId", h.name, h.address, h.driver, h.status, h.cordoned,
                  h.vcpus_total, h.memory_mb_total, h.vcpus_reserved, h.memory_mb_reserved,
                  hb.vcpus_used, hb.memory_mb_used, hb.last_heartbeat_at, h.created_at,
                  h.agent_token, h.drain_requested_at
           from hosts h join host_heartbeats hb on hb.host_id = h.id where h.id = $1"#,
        id.0,
    )
    .fetch_optional(conn)
    .await?;
    Ok(host)
}

pub async fn list(conn: &mut PgConnection) -> StoreResult<Vec<Host>> {
    let hosts = sqlx::query_as!(
        Host,
        r#"select h.id as "id: HostId", h.name, h.address, h.driver, h.status, h.cordoned,
                  h.vcpus_total, h.memory_mb_total, h.vcpus_reserved, h.memory_mb_reserved,
                  hb.vcpus_used, hb.memory_mb_used, hb.last_heartbeat_at, h.created_at,
                  h.agent_token, h.drain_requested_at
           from hosts h join host_heartbeats hb on hb.host_id = h.id order by h.name"#,
    )
    .fetch_all(conn)
    .await?;
    Ok(hosts)
}

/// Cordons or uncordons a host; uncordoning also ends a drain.
pub async fn set_cordoned(
    conn: &mut PgConnection,
    id: HostId,
    cordoned: bool,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update hosts
         set cordoned = $2, drain_requested_at = case when $2 then drain_requested_at end
         where id = $1",
        id.0,
        cordoned
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Cordons a host and marks it draining (the first request's time is kept).
pub async fn drain(conn: &mut PgConnection, id: HostId) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update hosts
         set cordoned = true, drain_requested_at = coalesce(drain_requested_at, now())
         where id = $1",
        id.0,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks healthy hosts silent for longer than `silent_secs` unreachable; returns them.
pub async fn mark_silent_unreachable(
    conn: &mut PgConnection,
    silent_secs: f64,
) -> StoreResult<Vec<HostId>> {
    let ids = sqlx::query_scalar!(
        r#"update hosts set status = 'unreachable'
           from host_heartbeats hb
           where hb.host_id = hosts.id and hosts.status = 'healthy'
             and hb.last_heartbeat_at < now() - make_interval(secs => $1)
           returning hosts.id as "id: HostId""#,
        silent_secs,
    )
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// Places a capsule: reserves room on the healthy, uncordoned host with the most free
/// vCPUs (or on `only`, when the template's snapshot lives there) and records the host on
/// the capsule, once (the `place_capsule` function of the migrations: concurrent creates
/// never overbook a host). Returns the host, or `None` when no host has room or the capsule
/// was already placed (the caller re-reads it).
pub async fn place(
    conn: &mut PgConnection,
    capsule: CapsuleId,
    vcpus: i32,
    memory_mb: i32,
    only: Option<HostId>,
) -> StoreResult<Option<HostId>> {
    let placed = place_many(
        conn,
        &[Placement {
            capsule,
            vcpus,
            memory_mb,
            only,
        }],
    )
    .await?;
    Ok(placed.into_iter().next().and_then(|(_, host)| host))
}

/// What one capsule asks of placement.
pub struct Placement {
    pub capsule: CapsuleId,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub only: Option<HostId>,
}

/// Places several capsules in one statement, in the order given (callers sort by capsule id,
/// so that two batches lock rows in the same order). Each result is what [`place`] returns.
pub async fn place_many(
    conn: &mut PgConnection,
    wanted: &[Placement],
) -> StoreResult<Vec<(CapsuleId, Option<HostId>)>> {
    let capsules: Vec<uuid::Uuid> = wanted.iter().map(|p| p.capsule.0).collect();
    let vcpus: Vec<i32> = wanted.iter().map(|p| p.vcpus).collect();
    let memory: Vec<i32> = wanted.iter().map(|p| p.memory_mb).collect();
    let only: Vec<Option<uuid::Uuid>> = wanted.iter().map(|p| p.only.map(|h| h.0)).collect();
    let rows = sqlx::query!(
        r#"select w.capsule as "capsule!: CapsuleId",
                  place_capsule(w.capsule, w.vcpus, w.memory_mb, w.only_host) as "host?: HostId"
           from unnest($1::uuid[], $2::int4[], $3::int4[], $4::uuid[])
                with ordinality as w(capsule, vcpus, memory_mb, only_host, n)
           order by w.n"#,
        &capsules,
        &vcpus,
        &memory,
        &only as &[Option<uuid::Uuid>],
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.capsule, r.host)).collect())
}

/// Gives back a capsule's reservation (its VM is gone).
pub async fn release(
    conn: &mut PgConnection,
    id: HostId,
    vcpus: i32,
    memory_mb: i32,
) -> StoreResult<()> {
    sqlx::query!(
        "update hosts set vcpus_reserved = greatest(vcpus_reserved - $2, 0),
                          memory_mb_reserved = greatest(memory_mb_reserved - $3, 0)
         where id = $1",
        id.0,
        vcpus,
        memory_mb,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a host report; false when it was already applied (a redelivery).
pub async fn record_host_event(
    conn: &mut PgConnection,
    host: HostId,
    event_id: uuid::Uuid,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "insert into host_events (host_id, event_id) values ($1, $2) on conflict do nothing",
        host.0,
        event_id,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The host whose token hashes to `hash`, if any.
pub async fn by_token_hash(conn: &mut PgConnection, hash: &[u8]) -> StoreResult<Option<HostId>> {
    let id = sqlx::query_scalar!(
        r#"select id as "id: HostId" from hosts where token_hash = $1"#,
        hash
    )
    .fetch_optional(conn)
    .await?;
    Ok(id)
}
