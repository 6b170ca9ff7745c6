//! The agent's side of the control plane's host API: registration, heartbeats and event
//! delivery over HTTP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::driver::{Driver, EventKind, Usage};
use crate::secret::Secret;
use crate::state;

/// Retries of registration and event delivery back off up to this.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("control plane unreachable: {0}")]
    Unreachable(#[from] reqwest::Error),
    /// 401 or 404: the control plane no longer knows this host (or its token); re-register.
    #[error("control plane rejected the host: {0}")]
    Rejected(StatusCode),
    #[error("control plane answered {0}")]
    Status(StatusCode),
    #[error("not registered yet")]
    NotRegistered,
}

/// What the agent keeps across restarts: its own token (generated once) and what the last
/// registration returned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub agent_token: Secret,
    #[serde(default)]
    pub host_id: Option<String>,
    #[serde(default)]
    pub host_token: Option<Secret>,
}

impl Identity {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("identity.json")
    }

    /// Loads `<state_dir>/identity.json`, creating it (mode 0600) with a fresh agent token.
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<Self> {
        let path = Self::path(state_dir);
        if let Some(identity) = state::read_json(&path)? {
            return Ok(identity);
        }
        let identity = Self {
            agent_token: Secret::generate(),
            host_id: None,
            host_token: None,
        };
        state::write_json(&path, &identity)?;
        Ok(identity)
    }
}

/// A registered host: what heartbeats and events authenticate with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub host_id: String,
    pub host_token: Secret,
}

#[derive(Clone, Debug, Serialize)]
pub struct Registration {
    pub join_token: Secret,
    pub name: String,
    pub address: String,
    pub driver: String,
    pub agent_token: Secret,
    pub vcpus: u32,
    pub memory_mb: u32,
}

#[derive(Deserialize)]
struct Registered {
    host_id: String,
    host_token: Secret,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEvent {
    /// Fixed when the event is first seen, so the control plane can drop redeliveries.
    pub event_id: uuid::Uuid,
    pub sandbox_id: String,
    pub kind: EventKind,
    pub message: String,
    pub at_ms: i64,
}

#[derive(Clone, Debug)]
pub struct ControlPlaneClient {
    http: reqwest::Client,
    base: String,
}

impl ControlPlaneClient {
    pub fn new(base_url: &str) -> Result<Self, ControlPlaneError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
        })
    }

    pub async fn register(
        &self,
        registration: &Registration,
    ) -> Result<Session, ControlPlaneError> {
        let url = format!("{}/v1/hosts/register", self.base);
        let response = self.http.post(url).json(registration).send().await?;
        let registered: Registered = check(response)?.json().await?;
        Ok(Session {
            host_id: registered.host_id,
            host_token: registered.host_token,
        })
    }

    pub async fn heartbeat(
        &self,
        session: &Session,
        usage: &Usage,
    ) -> Result<(), ControlPlaneError> {
        let url = format!("{}/v1/hosts/{}/heartbeat", self.base, session.host_id);
        let response = self
            .http
            .post(url)
            .bearer_auth(session.host_token.expose())
            .json(usage)
            .send()
            .await?;
        check(response).map(drop)
    }

    pub async fn post_events(
        &self,
        session: &Session,
        events: &[HostEvent],
    ) -> Result<(), ControlPlaneError> {
        let url = format!("{}/v1/hosts/{}/events", self.base, session.host_id);
        let response = self
            .http
            .post(url)
            .bearer_auth(session.host_token.expose())
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await?;
        check(response).map(drop)
    }
}

fn check(response: reqwest::Response) -> Result<reqwest::Response, ControlPlaneError> {
    match response.status() {
        s if s.is_success() => Ok(response),
        s @ (StatusCode::UNAUTHORIZED | StatusCode::NOT_FOUND) => {
            Err(ControlPlaneError::Rejected(s))
        }
        s => Err(ControlPlaneError::Status(s)),
    }
}

/// The delays between retries: exponential with jitter, endless, never above the cap (backon's
/// jitter is added after its own cap).
pub(crate) fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_RETRY_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
        .map(|d| d.min(MAX_RETRY_DELAY))
}

/// Registers (retrying until it works), then heartbeats every `interval`; registers again when
/// the control plane stops recognising the host. Publishes the current session on `sessions`.
/// Runs until dropped.
pub(crate) async fn maintain_session<D: Driver>(
    client: &ControlPlaneClient,
    registration: &Registration,
    identity: &mut Identity,
    state_dir: &Path,
    driver: &D,
    interval: Duration,
    sessions: &watch::Sender<Option<Session>>,
) {
    loop {
        let session = register_until_ok(client, registration).await;
        tracing::info!(host_id = %session.host_id, "registered with the control plane");
        identity.host_id = Some(session.host_id.clone());
        identity.host_token = Some(session.host_token.clone());
        if let Err(e) = state::write_json(&Identity::path(state_dir), identity) {
            tracing::warn!(error = %e, "saving identity.json failed");
        }
        sessions.send_replace(Some(session.clone()));

        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let usage = match driver.usage().await {
                Ok(usage) => usage,
                Err(e) => {
                    tracing::warn!(error = %e, "reading host usage failed; skipping heartbeat");
                    continue;
                }
            };
            match client.heartbeat(&session, &usage).await {
                Ok(()) => {}
                Err(e @ ControlPlaneError::Rejected(_)) => {
                    tracing::warn!(error = %e, "heartbeat rejected; registering again");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}

async fn register_until_ok(client: &ControlPlaneClient, registration: &Registration) -> Session {
    let mut delays = retry_delays();
    loop {
        match client.register(registration).await {
            Ok(session) => return session,
            Err(e) => {
                let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                // A rejected join token will not fix itself; say so louder than an outage.
                if matches!(e, ControlPlaneError::Unreachable(_)) {
                    tracing::warn!(error = %e, retry_in = ?delay, "registration failed");
                } else {
                    tracing::error!(error = %e, retry_in = ?delay, "registration refused");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path()).unwrap();
        let again = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(first.agent_token, again.agent_token);
        assert!(!format!("{first:?}").contains(first.agent_token.expose()));
    }

    #[test]
    fn registration_debug_hides_tokens_but_json_carries_them() {
        let reg = Registration {
            join_token: Secret::new("join-secret"),
            name: "h".into(),
            address: "http://x".into(),
            driver: "sim".into(),
            agent_token: Secret::new("agent-secret"),
            vcpus: 1,
            memory_mb: 2,
        };
        let debug = format!("{reg:?}");
        assert!(!debug.contains("join-secret") && !debug.contains("agent-secret"));
        let json = serde_json::to_value(&reg).unwrap();
        assert_eq!(json["join_token"], "join-secret");
        assert_eq!(json["agent_token"], "agent-secret");
    }

    #[test]
    fn retry_delays_are_capped_and_endless() {
        let delays: Vec<_> = retry_delays().take(50).collect();
        assert_eq!(delays.len(), 50);
        assert!(delays.iter().all(|d| *d <= MAX_RETRY_DELAY));
    }
}
