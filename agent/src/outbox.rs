//! Durable delivery of driver events to the control plane: every event is written to
//! `<state_dir>/outbox.json` before the first attempt and removed only once acknowledged.

use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, watch};

use crate::control_plane::{ControlPlaneClient, HostEvent, MAX_RETRY_DELAY, Session, retry_delays};
use crate::driver::DriverEvent;
use crate::state;

/// Events per POST, so a long backlog does not become one huge request.
const BATCH: usize = 100;

pub(crate) struct Outbox {
    path: PathBuf,
    events: Vec<HostEvent>,
}

impl Outbox {
    pub(crate) fn load(state_dir: &Path) -> std::io::Result<Self> {
        let path = state_dir.join("outbox.json");
        let events = state::read_json(&path)?.unwrap_or_default();
        Ok(Self { path, events })
    }

    fn push(&mut self, event: DriverEvent) {
        self.events.push(HostEvent {
            event_id: uuid::Uuid::new_v4(),
            sandbox_id: event.sandbox_id,
            kind: event.kind,
            message: event.message,
            at_ms: event.at_ms,
        });
    }

    /// Moves everything waiting in `events` into the outbox; true if anything was added.
    pub(crate) fn take_from(&mut self, events: &mut mpsc::UnboundedReceiver<DriverEvent>) -> bool {
        let before = self.events.len();
        while let Ok(event) = events.try_recv() {
            self.push(event);
        }
        self.events.len() > before
    }

    pub(crate) fn save(&self) {
        // On failure the events stay in memory and go out anyway unless the agent dies first.
        if let Err(e) = state::write_json(&self.path, &self.events) {
            tracing::error!(error = %e, "saving outbox.json failed");
        }
    }

    /// Keeps `events` flowing into the outbox (saved as they arrive), so nothing is held only
    /// in memory while the control plane is down. Returns when the channel closes.
    pub(crate) async fn collect(&mut self, events: &mut mpsc::UnboundedReceiver<DriverEvent>) {
        while let Some(event) = events.recv().await {
            self.push(event);
            self.take_from(events);
            self.save();
        }
    }

    /// Delivers the outbox forever, retrying with backoff; runs until dropped. Before dropping,
    /// callers should `take_from` + `save` to keep what arrived meanwhile.
    pub(crate) async fn deliver(
        &mut self,
        client: &ControlPlaneClient,
        events: &mut mpsc::UnboundedReceiver<DriverEvent>,
        sessions: &mut watch::Receiver<Option<Session>>,
    ) {
        let mut delays = retry_delays();
        loop {
            if self.take_from(events) {
                self.save();
            }
            if self.events.is_empty() {
                match events.recv().await {
                    Some(event) => self.push(event),
                    None => std::future::pending().await,
                }
                continue;
            }
            // Sessions are only ever replaced, never cleared, so this waits only for the first.
            let session = sessions.wait_for(Option::is_some).await.map(|s| s.clone());
            let Ok(Some(session)) = session else {
                // The session task is gone: shutdown is under way.
                return std::future::pending().await;
            };
            let n = self.events.len().min(BATCH);
            match client.post_events(&session, &self.events[..n]).await {
                Ok(()) => {
                    tracing::debug!(delivered = n, "events delivered");
                    self.events.drain(..n);
                    self.save();
                    delays = retry_delays();
                }
                Err(e) => {
                    let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                    tracing::warn!(error = %e, pending = self.events.len(), retry_in = ?delay, "event delivery failed");
                    let _ = tokio::time::timeout(delay, self.collect(events)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::EventKind;

    #[test]
    fn events_survive_a_restart_with_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut outbox = Outbox::load(dir.path()).unwrap();
        for id in ["cap_a", "cap_b"] {
            tx.send(DriverEvent {
                sandbox_id: id.into(),
                kind: EventKind::Crashed,
                message: "boom".into(),
                at_ms: 1,
            })
            .unwrap();
        }
        assert!(outbox.take_from(&mut rx));
        outbox.save();
        let reloaded = Outbox::load(dir.path()).unwrap();
        assert_eq!(reloaded.events, outbox.events);
        assert_ne!(reloaded.events[0].event_id, reloaded.events[1].event_id);
    }
}
