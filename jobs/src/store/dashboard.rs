//! What the operator dashboard reads beyond the API's listings: login sessions, the queue
//! figures per job kind, and an operation's events.

use super::{Event, PgConnection, Principal, StoreResult};
use crate::ids::{CapsuleId, KeyId, OperationId, TeamId};
use crate::state::{OperationKind, OperationStatus};

/// Stores a session for `key`; `token_hash` is the hash of the cookie's token.
pub async fn create_session(
    conn: &mut PgConnection,
    token_hash: &[u8],
    key: KeyId,
    csrf_token: &str,
    lifetime_secs: f64,
) -> StoreResult<()> {
    sqlx::query!(
        "insert into dashboard_sessions (token_hash, key_id, csrf_token, expires_at)
         values ($1, $2, $3, now() + make_interval(secs => $4))",
        token_hash,
        key.0,
        csrf_token,
        lifetime_secs,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A live session: its admin's principal and CSRF token. Expired sessions, and sessions
/// whose key was revoked or is no longer an admin key, are not found.
pub async fn session(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> StoreResult<Option<(Principal, String)>> {
    let row = sqlx::query!(
        r#"select k.id as "key_id: KeyId", k.team_id as "team_id: TeamId", k.is_admin,
                  t.is_platform, s.csrf_token
           from dashboard_sessions s
           join api_keys k on k.id = s.key_id
           join teams t on t.id = k.team_id
           where s.token_hash = $1 and s.expires_at > now() and k.revoked_at is null
             and k.is_admin and t.is_platform"#,
        token_hash,
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| {
        let principal = Principal {
            key_id: r.key_id,
            team_id: r.team_id,
            is_admin: r.is_admin,
            is_platform: r.is_platform,
        };
        (principal, r.csrf_token)
    }))
}

/// Ends a session (logout), and forgets every expired one.
pub async fn end_session(conn: &mut PgConnection, token_hash: &[u8]) -> StoreResult<()> {
    sqlx::query!(
        "delete from dashboard_sessions where token_hash = $1 or expires_at < now()",
        token_hash,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The jobs of one kind as a queue sees them.
#[derive(Debug, Clone, Default)]
pub struct QueueFigures {
    pub kind: Option<OperationKind>,
    /// On the queue, waiting for a worker.
    pub queued: i64,
    /// Running their first attempt.
    pub in_flight: i64,
    /// Running a second or later attempt.
    pub retrying: i64,
    /// Not runnable yet: backing off until their next attempt, or committed but not yet
    /// pushed to Redis (the reconciler pushes those).
    pub scheduled: i64,
    /// Failed for good (retry them from the dashboard).
    pub dead: i64,
    /// Finished in the window: succeeded, failed.
    pub succeeded_recently: i64,
    pub failed_recently: i64,
}

/// Per job kind: the jobs in each stage now, and what finished in the last `window_secs`.
pub async fn queue_figures(
    conn: &mut PgConnection,
    window_secs: f64,
) -> StoreResult<Vec<QueueFigures>> {
    let stages = sqlx::query!(
        r#"select kind as "kind: OperationKind", status as "status: OperationStatus",
                  attempts > 1 as "retry!", count(*) as "count!"
           from operations where status in ('queued', 'running', 'retrying', 'failed')
           group by 1, 2, 3"#
    )
    .fetch_all(&mut *conn)
    .await?;
    // Few rows, found through the reconciler's `operations_unpushed_idx` (migration 0003).
    let unpushed = sqlx::query!(
        r#"select kind as "kind: OperationKind", count(*) as "count!"
           from operations where pushed_at is null and status = 'queued'
           group by 1"#
    )
    .fetch_all(&mut *conn)
    .await?;
    let recent = sqlx::query!(
        r#"select kind as "kind: OperationKind",
                  count(*) filter (where status = 'succeeded') as "succeeded!",
                  count(*) filter (where status = 'failed') as "failed!"
           from operations where finished_at > now() - make_interval(secs => $1)
           group by 1"#,
        window_secs,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut figures: Vec<QueueFigures> = OperationKind::ALL
        .iter()
        .map(|k| QueueFigures {
            kind: Some(*k),
            ..QueueFigures::default()
        })
        .collect();
    for row in stages {
        let Some(f) = figures.iter_mut().find(|f| f.kind == Some(row.kind)) else {
            continue;
        };
        match (row.status, row.retry) {
            (OperationStatus::Queued, _) => f.queued += row.count,
            (OperationStatus::Running, false) => f.in_flight += row.count,
            (OperationStatus::Running, true) => f.retrying += row.count,
            (OperationStatus::Retrying, _) => f.scheduled += row.count,
            (OperationStatus::Failed, _) => f.dead += row.count,
            _ => {}
        }
    }
    for row in unpushed {
        if let Some(f) = figures.iter_mut().find(|f| f.kind == Some(row.kind)) {
            f.queued -= row.count;
            f.scheduled += row.count;
        }
    }
    for row in recent {
        if let Some(f) = figures.iter_mut().find(|f| f.kind == Some(row.kind)) {
            f.succeeded_recently = row.succeeded;
            f.failed_recently = row.failed;
        }
    }
    Ok(figures)
}

/// The events an operation caused, oldest first (its timeline).
pub async fn operation_events(
    conn: &mut PgConnection,
    operation: OperationId,
    limit: i64,
) -> StoreResult<Vec<Event>> {
    let events = sqlx::query_as!(
        Event,
        r#"select id, team_id as "team_id: TeamId", capsule_id as "capsule_id?: CapsuleId",
                  operation_id as "operation_id?: OperationId", kind, from_status, to_status,
                  message, created_at
           from events where operation_id = $1 order by id limit $2"#,
        operation.0,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(events)
}
