//! Ending many successful operations in one statement: the batched path of the workers,
//! which settles a whole delivery batch of creates with one round trip instead of one
//! transaction per operation.

use super::{Event, PgConnection, StoreError, StoreResult};
use crate::ids::{CapsuleId, OperationId, TeamId};
use crate::state::CapsuleStatus;

/// One operation that succeeded, and the capsule transition it makes.
pub struct Completion {
    pub operation: OperationId,
    pub capsule: CapsuleId,
    /// The capsule's status and generation when the job read it.
    pub from: CapsuleStatus,
    pub generation: i64,
    pub to: CapsuleStatus,
    pub result: serde_json::Value,
    /// The event's message.
    pub message: String,
}

/// Applies every completion whose operation `worker` still holds and whose capsule is still
/// in `from` at `generation`, each exactly as a single job would in its own transaction:
/// the capsule moves to `to` (a new generation and deadline), the operation succeeds with
/// its result, and a `status_changed` event is recorded. Returns the events, one per applied
/// completion; a completion that did not apply changed nothing (the caller settles it
/// alone). Transitions to `stopped` also release a host's reservation: they take the single
/// path (`capsules::transition`), and are refused here.
pub async fn complete_many(
    conn: &mut PgConnection,
    worker: &str,
    completions: &[Completion],
) -> StoreResult<Vec<Event>> {
    for c in completions {
        if !c.from.can_become(c.to) || c.to == CapsuleStatus::Stopped {
            return Err(StoreError::TransitionNotAllowed {
                from: c.from,
                to: c.to,
            });
        }
    }
    let operations: Vec<uuid::Uuid> = completions.iter().map(|c| c.operation.0).collect();
    let capsules: Vec<uuid::Uuid> = completions.iter().map(|c| c.capsule.0).collect();
    let from: Vec<&str> = completions.iter().map(|c| c.from.as_str()).collect();
    let generations: Vec<i64> = completions.iter().map(|c| c.generation).collect();
    let to: Vec<&str> = completions.iter().map(|c| c.to.as_str()).collect();
    let deadlines: Vec<Option<f64>> = completions
        .iter()
        .map(|c| c.to.deadline().map(|d| d.as_secs_f64()))
        .collect();
    let results: Vec<serde_json::Value> = completions.iter().map(|c| c.result.clone()).collect();
    let messages: Vec<&str> = completions.iter().map(|c| c.message.as_str()).collect();
    let events = sqlx::query_as!(
        Event,
        r#"with input as (
               select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::int8[], $5::text[],
                                    $6::float8[], $7::jsonb[], $8::text[])
                   as i(op, capsule, from_status, generation, to_status, deadline, result, message)),
           held as (
               -- The lease check, on locked rows: a lease lost meanwhile applies nothing.
               select o.id from operations o join input i on i.op = o.id
               where o.lease_owner = $9 and o.status in ('running', 'retrying')
               for update of o),
           moved as (
               update capsules c
               set status = i.to_status, generation = c.generation + 1, status_reason = null,
                   status_deadline = now() + make_interval(secs => i.deadline),
                   updated_at = now()
               from input i join held h on h.id = i.op
               where c.id = i.capsule and c.status = i.from_status and c.generation = i.generation
               returning c.id, c.team_id, i.op, i.from_status, i.to_status, i.result, i.message),
           finished as (
               update operations o
               set status = 'succeeded', result = m.result, finished_at = now(),
                   updated_at = now(), lease_owner = null, lease_expires_at = null
               from moved m where o.id = m.op
               returning o.id)
           insert into events (team_id, capsule_id, operation_id, kind, from_status, to_status,
                               message)
           select m.team_id, m.id, m.op, 'status_changed', m.from_status, m.to_status, m.message
           from moved m join finished f on f.id = m.op
           returning id, team_id as "team_id: TeamId", capsule_id as "capsule_id?: CapsuleId",
                     operation_id as "operation_id?: OperationId", kind, from_status, to_status,
                     message, created_at"#,
        &operations,
        &capsules,
        &from as &[&str],
        &generations,
        &to as &[&str],
        &deadlines as &[Option<f64>],
        &results,
        &messages as &[&str],
        worker,
    )
    .fetch_all(conn)
    .await?;
    Ok(events)
}
