//! Operation rows: the intent of one lifecycle request and its job handle.
//!
//! A worker claims an operation with a conditional update and a lease; only the lease holder
//! may record progress or finish it, and a lease that expires lets another worker take over.

use super::{Operation, PgConnection, StoreResult};
use crate::ids::{CapsuleId, OperationId, TeamId};
use crate::state::{OperationKind, OperationStatus};

/// The channel `finish` notifies with the operation id, for `?wait=` long polls.
pub const FINISHED_CHANNEL: &str = "hangar_operation_finished";

pub struct NewOperation {
    pub id: OperationId,
    pub team_id: TeamId,
    pub capsule_id: Option<CapsuleId>,
    pub kind: OperationKind,
    pub generation: i64,
    pub max_attempts: i32,
    pub params: serde_json::Value,
    /// The creating request's W3C `traceparent`, if it was traced.
    pub trace_parent: Option<String>,
}

/// Inserts a `queued` operation.
pub async fn insert(conn: &mut PgConnection, new: NewOperation) -> StoreResult<Operation> {
    let op = sqlx::query_as!(
        Operation,
        r#"insert into operations (id, team_id, capsule_id, kind, generation, max_attempts, params,
                                   trace_parent)
           values ($1, $2, $3, $4, $5, $6, $7, $8)
           returning id as "id: OperationId", team_id as "team_id: TeamId",
                     capsule_id as "capsule_id?: CapsuleId", kind as "kind: OperationKind",
                     status as "status: OperationStatus", generation, attempts, max_attempts,
                     last_error, error_code, step, params, result, created_at, started_at,
                     finished_at, updated_at, trace_parent"#,
        new.id.0,
        new.team_id.0,
        new.capsule_id.map(|c| c.0),
        new.kind.as_str(),
        new.generation,
        new.max_attempts,
        new.params,
        new.trace_parent,
    )
    .fetch_one(conn)
    .await?;
    Ok(op)
}

/// An operation by id; with `team`, only if that team owns it.
pub async fn get(
    conn: &mut PgConnection,
    team: Option<TeamId>,
    id: OperationId,
) -> StoreResult<Option<Operation>> {
    let op = sqlx::query_as!(
        Operation,
        r#"select id as "id: OperationId", team_id as "team_id: TeamId",
                  capsule_id as "capsule_id?: CapsuleId", kind as "kind: OperationKind",
                  status as "status: OperationStatus", generation, attempts, max_attempts,
                  last_error, error_code, step, params, result, created_at, started_at,
                  finished_at, updated_at, trace_parent
           from operations where id = $1 and ($2::uuid is null or team_id = $2)"#,
        id.0,
        team.map(|t| t.0),
    )
    .fetch_optional(conn)
    .await?;
    Ok(op)
}

#[derive(Debug, Default, Clone)]
pub struct OperationFilter {
    pub team: Option<TeamId>,
    pub capsule: Option<CapsuleId>,
    pub status: Option<OperationStatus>,
    pub kind: Option<OperationKind>,
    pub before: Option<OperationId>,
    pub limit: i64,
}

/// Newest first.
pub async fn list(conn: &mut PgConnection, f: &OperationFilter) -> StoreResult<Vec<Operation>> {
    let ops = sqlx::query_as!(
        Operation,
        r#"select id as "id: OperationId", team_id as "team_id: TeamId",
                  capsule_id as "capsule_id?: CapsuleId", kind as "kind: OperationKind",
                  status as "status: OperationStatus", generation, attempts, max_attempts,
                  last_error, error_code, step, params, result, created_at, started_at,
                  finished_at, updated_at, trace_parent
           from operations
           where ($1::uuid is null or team_id = $1)
             and ($2::uuid is null or capsule_id = $2)
             and ($3::text is null or status = $3)
             and ($4::text is null or kind = $4)
             and ($5::uuid is null or id < $5)
           order by id desc limit $6"#,
        f.team.map(|t| t.0),
        f.capsule.map(|c| c.0),
        f.status.map(|s| s.as_str()),
        f.kind.map(|k| k.as_str()),
        f.before.map(|o| o.0),
        f.limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(ops)
}

/// The unfinished create/pause/resume/snapshot of a capsule, if any.
pub async fn in_flight(
    conn: &mut PgConnection,
    capsule: CapsuleId,
) -> StoreResult<Option<Operation>> {
    let op = sqlx::query_as!(
        Operation,
        r#"select id as "id: OperationId", team_id as "team_id: TeamId",
                  capsule_id as "capsule_id?: CapsuleId", kind as "kind: OperationKind",
                  status as "status: OperationStatus", generation, attempts, max_attempts,
                  last_error, error_code, step, params, result, created_at, started_at,
                  finished_at, updated_at, trace_parent
           from operations
           where capsule_id = $1 and status in ('queued', 'running', 'retrying')
             and kind in ('create', 'pause', 'resume', 'snapshot')"#,
        capsule.0,
    )
    .fetch_optional(conn)
    .await?;
    Ok(op)
}

/// The unfinished destroy of a capsule, if any.
pub async fn destroy_in_flight(
    conn: &mut PgConnection,
    capsule: CapsuleId,
) -> StoreResult<Option<OperationId>> {
    Ok(destroys_in_flight(conn, &[capsule.0]).await?.pop())
}

/// The unfinished destroys of these capsules (at most one each).
pub async fn destroys_in_flight(
    conn: &mut PgConnection,
    capsules: &[uuid::Uuid],
) -> StoreResult<Vec<OperationId>> {
    let ids = sqlx::query_scalar!(
        r#"select id as "id: OperationId" from operations
           where capsule_id = any($1) and kind = 'destroy'
             and status in ('queued', 'running', 'retrying')"#,
        capsules,
    )
    .fetch_all(conn)
    .await?;
    Ok(ids)
}

/// Records that these operations' jobs are on Redis, pushed in `epoch`.
pub async fn mark_pushed(
    conn: &mut PgConnection,
    ids: &[uuid::Uuid],
    epoch: Option<&str>,
) -> StoreResult<()> {
    sqlx::query!(
        "update operations set pushed_at = now(), pushed_epoch = $2 where id = any($1)",
        ids,
        epoch,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Claims an operation for `worker` for `lease_secs`, counting one attempt. Succeeds for a
/// queued operation, for one this worker already holds, or for one whose lease expired.
pub async fn claim(
    conn: &mut PgConnection,
    id: OperationId,
    worker: &str,
    lease_secs: f64,
) -> StoreResult<Option<Operation>> {
    Ok(claim_many(conn, &[id.0], worker, lease_secs).await?.pop())
}

/// Claims every operation of `ids` that [`claim`] would, in one statement; the others
/// (terminal, or held under a live lease elsewhere) are simply not returned.
pub async fn claim_many(
    conn: &mut PgConnection,
    ids: &[uuid::Uuid],
    worker: &str,
    lease_secs: f64,
) -> StoreResult<Vec<Operation>> {
    let ops = sqlx::query_as!(
        Operation,
        r#"update operations
           set status = 'running', attempts = attempts + 1, lease_owner = $2,
               lease_expires_at = now() + make_interval(secs => $3),
               started_at = coalesce(started_at, now()), updated_at = now()
           where id = any($1)
             and (status = 'queued'
                  or (status in ('running', 'retrying')
                      and (lease_owner = $2 or lease_expires_at < now())))
           returning id as "id: OperationId", team_id as "team_id: TeamId",
                     capsule_id as "capsule_id?: CapsuleId", kind as "kind: OperationKind",
                     status as "status: OperationStatus", generation, attempts, max_attempts,
                     last_error, error_code, step, params, result, created_at, started_at,
                     finished_at, updated_at, trace_parent"#,
        ids,
        worker,
        lease_secs,
    )
    .fetch_all(conn)
    .await?;
    Ok(ops)
}

/// Records the step a multi-step job completed (a retry resumes after it).
pub async fn record_step(
    conn: &mut PgConnection,
    id: OperationId,
    worker: &str,
    step: &str,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update operations set step = $3, updated_at = now()
         where id = $1 and lease_owner = $2 and status = 'running'",
        id.0,
        worker,
        step,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A transient failure: the holder keeps its lease through the backoff and retries.
pub async fn mark_retrying(
    conn: &mut PgConnection,
    id: OperationId,
    worker: &str,
    error: &str,
    hold_secs: f64,
) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update operations
         set status = 'retrying', last_error = $3,
             lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
         where id = $1 and lease_owner = $2 and status = 'running'",
        id.0,
        worker,
        error,
        hold_secs,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Hands an operation back to the queue without counting the attempt (e.g. a destroy
/// waiting for the capsule's in-flight operation).
pub async fn requeue(conn: &mut PgConnection, id: OperationId, worker: &str) -> StoreResult<bool> {
    let done = sqlx::query!(
        "update operations
         set status = 'queued', attempts = attempts - 1, lease_owner = null,
             lease_expires_at = null, pushed_at = null, updated_at = now()
         where id = $1 and lease_owner = $2 and status in ('running', 'retrying')",
        id.0,
        worker,
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How an operation ended.
pub struct Outcome<'a> {
    pub status: OperationStatus,
    pub error_code: Option<&'a str>,
    pub error: Option<&'a str>,
    pub result: Option<serde_json::Value>,
}

/// Ends an operation that is not yet terminal (held by `worker` when given) and notifies
/// long-pollers on commit. Returns false when it was already terminal or held by another.
pub async fn finish(
    conn: &mut PgConnection,
    id: OperationId,
    worker: Option<&str>,
    outcome: Outcome<'_>,
) -> StoreResult<bool> {
    debug_assert!(outcome.status.is_terminal());
    let done = sqlx::query!(
        "update operations
         set status = $3, error_code = $4, last_error = coalesce($5, last_error), result = $6,
             finished_at = now(), updated_at = now(), lease_owner = null, lease_expires_at = null
         where id = $1 and status in ('queued', 'running', 'retrying')
           and ($2::text is null or lease_owner = $2)",
        id.0,
        worker,
        outcome.status.as_str(),
        outcome.error_code,
        outcome.error,
        outcome.result,
    )
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    notify_finished(conn, &[id]).await?;
    Ok(true)
}

/// Cancels an operation no worker has claimed yet (`queued`), notifying long-pollers on
/// commit. `None` when it is no longer queued: a worker's claim and this update exclude each
/// other on the row, so a job is either never started or never cancelled.
pub async fn cancel_queued(
    conn: &mut PgConnection,
    id: OperationId,
    error_code: &str,
    error: &str,
) -> StoreResult<Option<Operation>> {
    let op = sqlx::query_as!(
        Operation,
        r#"update operations
           set status = 'cancelled', error_code = $2, last_error = $3, finished_at = now(),
               updated_at = now()
           where id = $1 and status = 'queued'
           returning id as "id: OperationId", team_id as "team_id: TeamId",
                     capsule_id as "capsule_id?: CapsuleId", kind as "kind: OperationKind",
                     status as "status: OperationStatus", generation, attempts, max_attempts,
                     last_error, error_code, step, params, result, created_at, started_at,
                     finished_at, updated_at, trace_parent"#,
        id.0,
        error_code,
        error,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if op.is_some() {
        notify_finished(conn, &[id]).await?;
    }
    Ok(op)
}

/// Tells long-pollers (on commit) that these operations finished: the payload is their ids
/// separated by commas, in as few notifications as fit Postgres's 8,000-byte payload limit.
pub async fn notify_finished(conn: &mut PgConnection, ids: &[OperationId]) -> StoreResult<()> {
    // An id is 35 characters and a comma: 200 of them fit with room to spare.
    for chunk in ids.chunks(200) {
        let payload = chunk
            .iter()
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query!("select pg_notify($1, $2)", FINISHED_CHANNEL, payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Unfinished operations whose job may not be on Redis: never pushed (the push after
/// commit failed, or the process died first) for longer than `unpushed_after_secs`; pushed
/// in another Redis epoch than `epoch` (Redis lost its data since); or held under a lease
/// that expired (the worker died) and not pushed again since.
pub async fn needing_push(
    conn: &mut PgConnection,
    unpushed_after_secs: f64,
    epoch: &str,
    limit: i64,
) -> StoreResult<Vec<(OperationKind, OperationId)>> {
    // One branch per index of migration 0003.
    let rows = sqlx::query!(
        r#"select id as "id!: OperationId", kind as "kind!: OperationKind" from (
               select id, kind, created_at from operations
               where pushed_at is null and status in ('queued', 'running', 'retrying')
                 and created_at < now() - make_interval(secs => $1)
               union
               select id, kind, created_at from operations
               where pushed_at is not null and status in ('queued', 'running', 'retrying')
                 and (pushed_epoch < $2 or pushed_epoch > $2 or pushed_epoch is null)
               union
               select id, kind, created_at from operations
               where status in ('running', 'retrying') and lease_expires_at < now()
                 and pushed_at < lease_expires_at
           ) lost
           order by created_at limit $3"#,
        unpushed_after_secs,
        epoch,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kind, r.id)).collect())
}

/// Operations per status, for metrics and the dashboard.
pub async fn count_by_status(
    conn: &mut PgConnection,
) -> StoreResult<Vec<(OperationKind, OperationStatus, i64)>> {
    let rows = sqlx::query!(
        r#"select kind as "kind: OperationKind", status as "status: OperationStatus",
                  count(*) as "count!"
           from operations group by kind, status"#
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.kind, r.status, r.count))
        .collect())
}
