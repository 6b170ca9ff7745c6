//! Append-only records: capsule events, the audit log, and stored idempotent responses.

use super::{Event, PgConnection, StoreResult};
use crate::ids::{CapsuleId, KeyId, OperationId, TeamId};
use crate::state::CapsuleStatus;

pub struct NewEvent<'a> {
    pub team_id: TeamId,
    pub capsule_id: Option<CapsuleId>,
    pub operation_id: Option<OperationId>,
    pub kind: &'a str,
    pub from: Option<CapsuleStatus>,
    pub to: Option<CapsuleStatus>,
    pub message: Option<&'a str>,
}

pub async fn insert_event(conn: &mut PgConnection, e: NewEvent<'_>) -> StoreResult<Event> {
    let event = sqlx::query_as!(
        Event,
        r#"insert into events (team_id, capsule_id, operation_id, kind, from_status, to_status, message)
           values ($1, $2, $3, $4, $5, $6, $7)
           returning id, team_id as "team_id: TeamId", capsule_id as "capsule_id?: CapsuleId",
                     operation_id as "operation_id?: OperationId", kind, from_status, to_status,
                     message, created_at"#,
        e.team_id.0,
        e.capsule_id.map(|c| c.0),
        e.operation_id.map(|o| o.0),
        e.kind,
        e.from.map(|s| s.as_str()),
        e.to.map(|s| s.as_str()),
        e.message,
    )
    .fetch_one(conn)
    .await?;
    Ok(event)
}

/// A capsule's events, oldest first.
pub async fn capsule_events(
    conn: &mut PgConnection,
    capsule: CapsuleId,
    limit: i64,
) -> StoreResult<Vec<Event>> {
    let events = sqlx::query_as!(
        Event,
        r#"select id, team_id as "team_id: TeamId", capsule_id as "capsule_id?: CapsuleId",
                  operation_id as "operation_id?: OperationId", kind, from_status, to_status,
                  message, created_at
           from events where capsule_id = $1 order by id limit $2"#,
        capsule.0,
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(events)
}

/// Where an event stands in the stream's order: its transaction id, then its id (see
/// migration 0004: later commits always sort after what a reader has taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventPosition {
    pub xid: i64,
    pub id: i64,
}

/// Events after `after` that are safe to hand out (their transaction is older than every
/// transaction still running), in stream order; of one team and one capsule when given.
pub async fn events_after(
    conn: &mut PgConnection,
    after: EventPosition,
    team: Option<TeamId>,
    capsule: Option<CapsuleId>,
    limit: i64,
) -> StoreResult<Vec<(EventPosition, Event)>> {
    let rows = sqlx::query!(
        r#"select xid::text::int8 as "xid!", id, team_id as "team_id: TeamId",
                  capsule_id as "capsule_id?: CapsuleId",
                  operation_id as "operation_id?: OperationId", kind, from_status, to_status,
                  message, created_at
           from events
           where (xid, id) > ($1::int8::text::xid8, $2)
             and xid < pg_snapshot_xmin(pg_current_snapshot())
             and ($3::uuid is null or team_id = $3)
             and ($4::uuid is null or capsule_id = $4)
           order by xid, id
           limit $5"#,
        after.xid,
        after.id,
        team.map(|t| t.0),
        capsule.map(|c| c.0),
        limit,
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let position = EventPosition {
                xid: r.xid,
                id: r.id,
            };
            let event = Event {
                id: r.id,
                team_id: r.team_id,
                capsule_id: r.capsule_id,
                operation_id: r.operation_id,
                kind: r.kind,
                from_status: r.from_status,
                to_status: r.to_status,
                message: r.message,
                created_at: r.created_at,
            };
            (position, event)
        })
        .collect())
}

/// The position of the newest event that is safe to hand out: a stream that starts "now"
/// starts after it.
pub async fn events_head(conn: &mut PgConnection) -> StoreResult<EventPosition> {
    let row = sqlx::query!(
        r#"select xid::text::int8 as "xid!", id from events
           where xid < pg_snapshot_xmin(pg_current_snapshot())
           order by xid desc, id desc limit 1"#
    )
    .fetch_optional(conn)
    .await?;
    Ok(
        row.map_or(EventPosition { xid: 0, id: 0 }, |r| EventPosition {
            xid: r.xid,
            id: r.id,
        }),
    )
}

pub struct AuditEntry<'a> {
    pub actor_key_id: Option<KeyId>,
    pub team_id: Option<TeamId>,
    pub action: &'a str,
    pub resource: &'a str,
    pub outcome: &'a str,
    pub detail: serde_json::Value,
}

pub async fn audit(conn: &mut PgConnection, a: AuditEntry<'_>) -> StoreResult<()> {
    sqlx::query!(
        "insert into audit_log (actor_key_id, team_id, action, resource, outcome, detail)
         values ($1, $2, $3, $4, $5, $6)",
        a.actor_key_id.map(|k| k.0),
        a.team_id.map(|t| t.0),
        a.action,
        a.resource,
        a.outcome,
        a.detail,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A response stored under an idempotency key.
pub struct StoredResponse {
    pub request_hash: Vec<u8>,
    pub status_code: i32,
    pub response: serde_json::Value,
}

/// The response stored under `key`, locking out a concurrent first use of the same key
/// until the caller's transaction ends.
pub async fn idempotent_response(
    conn: &mut PgConnection,
    team: TeamId,
    key: &str,
) -> StoreResult<Option<StoredResponse>> {
    // Serialises requests with the same key: the second waits for the first to commit.
    sqlx::query!(
        "select pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))",
        team.0.to_string(),
        key,
    )
    .execute(&mut *conn)
    .await?;
    let stored = sqlx::query_as!(
        StoredResponse,
        "select request_hash, status_code, response from idempotency_keys
         where team_id = $1 and key = $2",
        team.0,
        key,
    )
    .fetch_optional(conn)
    .await?;
    Ok(stored)
}

pub async fn store_idempotent_response(
    conn: &mut PgConnection,
    team: TeamId,
    key: &str,
    request_hash: &[u8],
    status_code: i32,
    response: &serde_json::Value,
) -> StoreResult<()> {
    sqlx::query!(
        "insert into idempotency_keys (team_id, key, request_hash, status_code, response)
         values ($1, $2, $3, $4, $5)",
        team.0,
        key,
        request_hash,
        status_code,
        response,
    )
    .execute(conn)
    .await?;
    Ok(())
}
