//! Capsule rows. Status changes only through [`transition`].

use chrono::{DateTime, Utc};

use super::{Capsule, PgConnection, StoreError, StoreResult};
use crate::ids::{CapsuleId, HostId, TeamId, TemplateId};
use crate::state::CapsuleStatus;

pub struct NewCapsule {
    pub id: CapsuleId,
    pub team_id: TeamId,
    pub template_id: TemplateId,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub timeout_sec: i32,
    pub metadata: serde_json::Value,
}

/// Inserts a capsule in `starting`, generation 1.
pub async fn insert(conn: &mut PgConnection, new: NewCapsule) -> StoreResult<Capsule> {
    let deadline = deadline_secs(CapsuleStatus::Starting);
    let capsule = sqlx::query_as!(
        Capsule,
        r#"insert into capsules (id, team_id, template_id, status, vcpus, memory_mb, timeout_sec,
                                 expires_at, status_deadline, metadata)
           values ($1, $2, $3, 'starting', $4, $5, $6::int4,
                   now() + make_interval(secs => $6::int4), now() + make_interval(secs => $7), $8)
           returning id as "id: CapsuleId", team_id as "team_id: TeamId",
                     template_id as "template_id: TemplateId", host_id as "host_id?: HostId",
                     status as "status: CapsuleStatus", status_reason, generation, vcpus,
                     memory_mb, timeout_sec, expires_at, status_deadline, metadata,
                     created_at, updated_at"#,
        new.id.0,
        new.team_id.0,
        new.template_id.0,
        new.vcpus,
        new.memory_mb,
        new.timeout_sec,
        deadline,
        new.metadata,
    )
    .fetch_one(conn)
    .await?;
    Ok(capsule)
}

/// A capsule by id; with `team`, only if that team owns it.
pub async fn get(
    conn: &mut PgConnection,
    team: Option<TeamId>,
    id: CapsuleId,
) -> StoreResult<Option<Capsule>> {
    Ok(get_many(conn, team, &[id.0]).await?.pop())
}

/// The capsules of these ids that exist (and that `team` owns, when given), in no
/// particular order.
pub async fn get_many(
    conn: &mut PgConnection,
    team: Option<TeamId>,
    ids: &[uuid::Uuid],
) -> StoreResult<Vec<Capsule>> {
    let capsules = sqlx::query_as!(
        Capsule,
        r#"select id as "id: CapsuleId", team_id as "team_id: TeamId",
                  template_id as "template_id: TemplateId", host_id as "host_id?: HostId",
                  status as "status: CapsuleStatus", status_reason, generation, vcpus,
                  memory_mb, timeout_sec, expires_at, status_deadline, metadata,
                  created_at, updated_at
           from capsules where id = any($1) and ($2::uuid is null or team_id = $2)"#,
        ids,
        team.map(|t| t.0),
    )
    .fetch_all(conn)
    .await?;
    Ok(capsules)
}

/// Filters of a capsule listing; `before` is the cursor (the last id of the previous page).
#[derive(Debug, Default, Clone)]
pub struct CapsuleFilter {
    pub team: Option<TeamId>,
    pub status: Option<CapsuleStatus>,
    pub host: Option<HostId>,
    pub before: Option<CapsuleId>,
    pub limit: i64,
}

/// Newest first.
pub async fn list(conn: &mut PgConnection, filter: &CapsuleFilter) -> StoreResult<Vec<Capsule>> {
    let capsules = sqlx::query_as!(
        Capsule,
        r#"select id as "id: CapsuleId", team_id as "team_id: TeamId",
                  template_id as "template_id: TemplateId", host_id as "host_id?: HostId",
                  status as "status: CapsuleStatus", status_reason, generation, vcpus,
                  memory_mb, timeout_sec, expires_at, status_deadline, metadata,
                  created_at, updated_at
           from capsules
           where ($1::uuid is null or team_id = $1)
             and ($2::text is null or status = $2)
             and ($3::uuid is null or host_id = $3)
             and ($4::uuid is null or id < $4)
           order by id desc
           limit $5"#,
        filter.team.map(|t| t.0),
        filter.status.map(|s| s.as_str()),
        filter.host.map(|h| h.0),
        filter.before.map(|c| c.0),
        filter.limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(capsules)
}

/// Moves a capsule `from → to` if, and only if, it is still in `from` at `generation`.
/// Returns the updated capsule, or `None` when someone else moved it first. A transition
/// the table forbids is an error and writes nothing.
pub async fn transition(
    conn: &mut PgConnection,
    id: CapsuleId,
    from: CapsuleStatus,
    generation: i64,
    to: CapsuleStatus,
    reason: Option<&str>,
) -> StoreResult<Option<Capsule>> {
    if !from.can_become(to) {
        return Err(StoreError::TransitionNotAllowed { from, to });
    }
    let capsule = sqlx::query_as!(
        Capsule,
        r#"update capsules
           set status = $4, generation = generation + 1, status_reason = $5,
               status_deadline = now() + make_interval(secs => $6), updated_at = now()
           where id = $1 and status = $2 and generation = $3
           returning id as "id: CapsuleId", team_id as "team_id: TeamId",
                     template_id as "template_id: TemplateId", host_id as "host_id?: HostId",
                     status as "status: CapsuleStatus", status_reason, generation, vcpus,
                     memory_mb, timeout_sec, expires_at, status_deadline, metadata,
                     created_at, updated_at"#,
        id.0,
        from.as_str(),
        generation,
        to.as_str(),
        reason,
        deadline_secs(to),
    )
    .fetch_optional(conn)
    .await?;
    Ok(capsule)
}

/// Records the host a create placed the capsule on (only once).
pub async fn assign_host(
    conn: &mut PgConnection,
    id: CapsuleId,
    host: HostId,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update capsules set host_id = $2, updated_at = now() where id = $1 and host_id is null",
        id.0,
        host.0,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Pushes the auto-pause time out by `timeout_sec` from now.
pub async fn keepalive(
    conn: &mut PgConnection,
    team: TeamId,
    id: CapsuleId,
    timeout_sec: i32,
) -> StoreResult<Option<DateTime<Utc>>> {
    let row = sqlx::query_scalar!(
        r#"update capsules set expires_at = now() + make_interval(secs => $3), timeout_sec = $4,
                  updated_at = now()
           where id = $1 and team_id = $2 and status <> 'stopped'
           returning expires_at"#,
        id.0,
        team.0,
        f64::from(timeout_sec),
        timeout_sec,
    )
    .fetch_optional(conn)
    .await?;
    Ok(row)
}

/// Capsules whose transient status outlived its deadline.
pub async fn past_deadline(conn: &mut PgConnection, limit: i64) -> StoreResult<Vec<Capsule>> {
    let capsules = sqlx::query_as!(
        Capsule,
        r#"select id as "id: CapsuleId", team_id as "team_id: TeamId",
                  template_id as "template_id: TemplateId", host_id as "host_id?: HostId",
                  status as "status: CapsuleStatus", status_reason, generation, vcpus,
                  memory_mb, timeout_sec, expires_at, status_deadline, metadata,
                  created_at, updated_at
           from capsules where status_deadline < now() order by status_deadline limit $1"#,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(capsules)
}

/// Running capsules past their timeout, with no operation in flight (to auto-pause).
pub async fn expired(conn: &mut PgConnection, limit: i64) -> StoreResult<Vec<Capsule>> {
    let capsules = sqlx::query_as!(
        Capsule,
        r#"select c.id as "id: CapsuleId", c.team_id as "team_id: TeamId",
                  c.template_id as "template_id: TemplateId", c.host_id as "host_id?: HostId",
                  c.status as "status: CapsuleStatus", c.status_reason, c.generation, c.vcpus,
                  c.memory_mb, c.timeout_sec, c.expires_at, c.status_deadline, c.metadata,
                  c.created_at, c.updated_at
           from capsules c
           where c.status = 'running' and c.expires_at < now()
             and not exists (select 1 from operations o where o.capsule_id = c.id
                             and o.status in ('queued', 'running', 'retrying'))
           order by c.expires_at limit $1"#,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(capsules)
}

/// Capsules placed on a host that are not stopped.
pub async fn on_host(conn: &mut PgConnection, host: HostId) -> StoreResult<Vec<Capsule>> {
    let capsules = sqlx::query_as!(
        Capsule,
        r#"select id as "id: CapsuleId", team_id as "team_id: TeamId",
                  template_id as "template_id: TemplateId", host_id as "host_id?: HostId",
                  status as "status: CapsuleStatus", status_reason, generation, vcpus,
                  memory_mb, timeout_sec, expires_at, status_deadline, metadata,
                  created_at, updated_at
           from capsules where host_id = $1 and status <> 'stopped'"#,
        host.0,
    )
    .fetch_all(conn)
    .await?;
    Ok(capsules)
}

/// Of the given ids, those that exist and are not stopped (VMs with them are owned).
pub async fn live_ids(conn: &mut PgConnection, ids: &[uuid::Uuid]) -> StoreResult<Vec<CapsuleId>> {
    let rows = sqlx::query_scalar!(
        r#"select id as "id: CapsuleId" from capsules where id = any($1) and status <> 'stopped'"#,
        ids,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows)
}

/// How many capsules are in each status.
pub async fn count_by_status(conn: &mut PgConnection) -> StoreResult<Vec<(CapsuleStatus, i64)>> {
    let rows = sqlx::query!(
        r#"select status as "status: CapsuleStatus", count(*) as "count!" from capsules group by status"#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.status, r.count)).collect())
}

/// The deadline of a status in seconds (`None` for settled statuses).
fn deadline_secs(status: CapsuleStatus) -> Option<f64> {
    status.deadline().map(|d| d.as_secs_f64())
}
