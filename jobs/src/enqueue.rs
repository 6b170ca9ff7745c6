//! The enqueue path's second half: after the intent (operation row) is committed, push its
//! job to Redis and record the push. A failure here loses nothing: the row stays queued
//! with no `pushed_at`, and the reconciler pushes it on its next tick.

use tracing::{Instrument, info_span, warn};

use crate::ids::OperationId;
use crate::queue::JobQueue;
use crate::state::OperationKind;
use crate::store::{self, Event, PgPool};

/// Pushes committed operations' jobs; returns whether they all reached Redis.
pub async fn push_committed(
    pool: &PgPool,
    queue: &JobQueue,
    jobs: &[(OperationKind, OperationId)],
) -> bool {
    if jobs.is_empty() {
        return true;
    }
    let span = match jobs {
        [(kind, id)] => info_span!("enqueue", %kind, operation_id = %id),
        _ => info_span!("enqueue", count = jobs.len()),
    };
    push_and_record(pool, queue, jobs).instrument(span).await
}

async fn push_and_record(
    pool: &PgPool,
    queue: &JobQueue,
    jobs: &[(OperationKind, OperationId)],
) -> bool {
    let epoch = match queue.push_many(jobs).await {
        Ok(epoch) => epoch,
        Err(error) => {
            warn!(%error, count = jobs.len(), "job push failed; the reconciler will push it");
            return false;
        }
    };
    let ids: Vec<_> = jobs.iter().map(|(_, id)| id.0).collect();
    match pool.acquire().await {
        Ok(mut conn) => {
            if let Err(error) =
                store::operations::mark_pushed(&mut conn, &ids, epoch.as_deref()).await
            {
                // Harmless: the reconciler may push a duplicate, which finds it claimed.
                warn!(%error, "could not record the push");
            }
        }
        Err(error) => warn!(%error, "could not record the push"),
    }
    true
}

/// Publishes a committed event on the live Redis stream (best effort: the events table
/// is the durable record, and readers resume from it).
pub async fn publish_event(queue: &JobQueue, event: &Event) {
    publish_events(queue, std::slice::from_ref(event)).await;
}

/// Publishes committed events in one round trip, in order (best effort, as above).
pub async fn publish_events(queue: &JobQueue, events: &[Event]) {
    if events.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for event in events {
        let Ok(payload) = serde_json::to_string(event) else {
            continue;
        };
        pipe.cmd("XADD")
            .arg(queue.events_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(100_000)
            .arg("*")
            .arg("event")
            .arg(payload)
            .ignore();
    }
    let mut conn = queue.connection();
    let result: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
    if let Err(error) = result {
        warn!(%error, "event publish failed");
    }
}
