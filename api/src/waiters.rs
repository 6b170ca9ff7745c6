//! Wake-ups for `GET /v1/operations/{id}?wait=`: one `LISTEN` task per [`AppState`]
//! (`store::operations::finish` notifies on commit) fans out to the parked requests, one
//! [`Notify`] per operation id that someone waits for.
//!
//! A waiter subscribes before it reads the row, so a finish that commits in between is
//! never missed. Notifications sent while the listener reconnects are lost; it wakes every
//! waiter when that happens, and each waiter re-reads its row every few seconds anyway.
//!
//! [`AppState`]: crate::AppState

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hangar_jobs::OperationId;
use hangar_jobs::store::PgPool;
use hangar_jobs::store::operations::FINISHED_CHANNEL;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The parked requests, by operation id.
pub(crate) struct Waiters {
    entries: Mutex<HashMap<OperationId, Entry>>,
    /// Set once at shutdown: parked requests answer at once.
    closing: watch::Sender<bool>,
}

struct Entry {
    notify: Arc<Notify>,
    count: usize,
}

impl Default for Waiters {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            closing: watch::Sender::new(false),
        }
    }
}

impl Waiters {
    /// Registers interest in `id` until the subscription is dropped.
    pub(crate) fn subscribe(self: &Arc<Self>, id: OperationId) -> Subscription {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(id).or_insert_with(|| Entry {
            notify: Arc::new(Notify::new()),
            count: 0,
        });
        entry.count += 1;
        Subscription {
            waiters: self.clone(),
            id,
            notify: entry.notify.clone(),
        }
    }

    fn wake(&self, id: OperationId) {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get(&id) {
            entry.notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in entries.values() {
            entry.notify.notify_waiters();
        }
    }

    /// Shutdown: every parked request answers now, and new ones do not park.
    pub(crate) fn close(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// How many requests are parked.
    pub(crate) fn parked(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.values().map(|e| e.count).sum()
    }
}

/// Interest in one operation; wakes when it finishes (or the listener reconnected).
pub(crate) struct Subscription {
    waiters: Arc<Waiters>,
    id: OperationId,
    notify: Arc<Notify>,
}

impl Subscription {
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut entries = self
            .waiters
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(&self.id) {
            entry.count -= 1;
            if entry.count == 0 {
                entries.remove(&self.id);
            }
        }
    }
}

/// The LISTEN task; aborted when dropped (with the last clone of the state).
pub(crate) struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects, LISTENs, and spawns the fan-out loop.
pub(crate) async fn listen(
    pool: &PgPool,
    waiters: Arc<Waiters>,
) -> Result<ListenerTask, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(FINISHED_CHANNEL).await?;
    let task = tokio::spawn(async move {
        loop {
            match listener.try_recv().await {
                // The payload lists the ids of the operations that finished, comma-separated.
                Ok(Some(notification)) => {
                    for id in notification.payload().split(',') {
                        match id.parse() {
                            Ok(id) => waiters.wake(id),
                            Err(_) => debug!(payload = id, "ignored notification"),
                        }
                    }
                }
                Ok(None) => {
                    warn!("operation listener reconnected; waking every waiter");
                    waiters.wake_all();
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(error) => {
                    warn!(%error, "operation listener failed; retrying");
                    waiters.wake_all();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(ListenerTask(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_a_subscriber_that_has_not_polled_yet() {
        let waiters = Arc::new(Waiters::default());
        let id = OperationId::new();
        let sub = waiters.subscribe(id);
        let notified = sub.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        waiters.wake(id);
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .expect("woken");
    }

    #[test]
    fn subscriptions_are_counted_and_removed() {
        let waiters = Arc::new(Waiters::default());
        let id = OperationId::new();
        let a = waiters.subscribe(id);
        let b = waiters.subscribe(id);
        assert_eq!(waiters.parked(), 2);
        drop(a);
        assert_eq!(waiters.parked(), 1);
        drop(b);
        assert_eq!(waiters.parked(), 0);
        assert!(waiters.entries.lock().unwrap().is_empty());
    }
}
