//! Hosts: registration, heartbeats, health, and capacity reservations for placement.

use super::{Host, PgConnection, StoreResult};
use crate::ids::HostId;

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
                 memory_mb_total = greatest(excluded.memory_mb_total, hosts.memory_mb_reserved),
                 last_heartbeat_at = now()
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
    .fetch_one(conn)
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
pub async fn heartbeat(conn: &mut PgConnection, id: HostId, usage: Usage) -> StoreResult<bool> {
    let was_unreachable = sqlx::query_scalar!(
        r#"update hosts h set last_heartbeat_at = now(), status = 'healthy',
                  vcpus_used = $2, memory_mb_used = $3
           from hosts old where h.id = $1 and old.id = h.id
           returning old.status = 'unreachable' as "was_unreachable!""#,
        id.0,
        usage.vcpus_used,
        usage.memory_mb_used,
    )
    .fetch_optional(conn)
    .await?;
    Ok(was_unreachable.unwrap_or(false))
}

pub async fn get(conn: &mut PgConnection, id: HostId) -> StoreResult<Option<Host>> {
    let host = sqlx::query_as!(
        Host,
        r#"select id as "id: HostId", name, address, driver, status, cordoned, vcpus_total,
                  memory_mb_total, vcpus_reserved, memory_mb_reserved, vcpus_used,
                  memory_mb_used, last_heartbeat_at, created_at, agent_token
           from hosts where id = $1"#,
        id.0,
    )
    .fetch_optional(conn)
    .await?;
    Ok(host)
}

pub async fn list(conn: &mut PgConnection) -> StoreResult<Vec<Host>> {
    let hosts = sqlx::query_as!(
        Host,
        r#"select id as "id: HostId", name, address, driver, status, cordoned, vcpus_total,
                  memory_mb_total, vcpus_reserved, memory_mb_reserved, vcpus_used,
                  memory_mb_used, last_heartbeat_at, created_at, agent_token
           from hosts order by name"#,
    )
    .fetch_all(conn)
    .await?;
    Ok(hosts)
}

pub async fn set_cordoned(
    conn: &mut PgConnection,
    id: HostId,
    cordoned: bool,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update hosts set cordoned = $2 where id = $1",
        id.0,
        cordoned
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
           where status = 'healthy' and last_heartbeat_at < now() - make_interval(secs => $1)
           returning id as "id: HostId""#,
        silent_secs,
    )
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// Reserves room for a capsule on the healthy, uncordoned host with the most free vCPUs
/// (or on `only` when the template's snapshot lives there). The check and the increment
/// are one statement on a locked row, so concurrent creates never overbook a host.
pub async fn reserve(
    conn: &mut PgConnection,
    vcpus: i32,
    memory_mb: i32,
    only: Option<HostId>,
) -> StoreResult<Option<HostId>> {
    let id = sqlx::query_scalar!(
        r#"update hosts set vcpus_reserved = vcpus_reserved + $1,
                            memory_mb_reserved = memory_mb_reserved + $2
           where id = (
               select id from hosts
               where status = 'healthy' and not cordoned
                 and vcpus_total - vcpus_reserved >= $1
                 and memory_mb_total - memory_mb_reserved >= $2
                 and ($3::uuid is null or id = $3)
               order by vcpus_total - vcpus_reserved desc, id
               limit 1
               for update)
             and vcpus_total - vcpus_reserved >= $1
             and memory_mb_total - memory_mb_reserved >= $2
           returning id as "id: HostId""#,
        vcpus,
        memory_mb,
        only.map(|h| h.0),
    )
    .fetch_optional(conn)
    .await?;
    Ok(id)
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
