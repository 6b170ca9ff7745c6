//! gRPC clients to host agents, one cached channel per host, and the classification of
//! agent errors into transient (retry with backoff) and permanent (fail the operation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::HostId;
use crate::store::Host;
use hangar_proto::host_agent_client::HostAgentClient;
use hangar_proto::trace_context::Traced;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub type AgentClient = HostAgentClient<InterceptedService<Traced<Channel>, BearerToken>>;

/// Adds `authorization: Bearer <agent token>` to every call.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// What went wrong calling an agent, classified for the retry policy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// Worth retrying: the agent is unreachable, slow, or busy.
    #[error("host agent unavailable: {0}")]
    Transient(String),
    /// Retrying cannot help (invalid request, wrong state, sandbox missing…).
    #[error("host agent refused: {0}")]
    Permanent(String),
}

impl From<Status> for AgentError {
    fn from(status: Status) -> Self {
        let message = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Cancelled => AgentError::Transient(message),
            _ => AgentError::Permanent(message),
        }
    }
}

/// A cached client and the address and token it was built for.
struct CachedClient {
    address: String,
    token: String,
    client: AgentClient,
}

/// Channels to agents, reused across jobs; rebuilt when a host's address or token changes.
#[derive(Clone)]
pub struct AgentPool {
    clients: Arc<Mutex<HashMap<HostId, CachedClient>>>,
    call_timeout: Duration,
}

impl AgentPool {
    pub fn new(call_timeout: Duration) -> Self {
        Self {
            clients: Arc::default(),
            call_timeout,
        }
    }

    /// A client for `host` (connects lazily; the first call reports an unreachable agent).
    pub fn client(&self, host: &Host) -> Result<AgentClient, AgentError> {
        let mut clients = self.clients.lock().expect("agent pool lock poisoned");
        if let Some(cached) = clients.get(&host.id)
            && cached.address == host.address
            && cached.token == host.agent_token
        {
            return Ok(cached.client.clone());
        }
        let endpoint = Endpoint::from_shared(host.address.clone())
            .map_err(|e| AgentError::Permanent(format!("bad agent address: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(self.call_timeout)
            .tcp_nodelay(true);
        let token = MetadataValue::try_from(format!("Bearer {}", host.agent_token))
            .map_err(|_| AgentError::Permanent("agent token is not valid ASCII".into()))?;
        let channel = Traced(endpoint.connect_lazy());
        let client = HostAgentClient::with_interceptor(channel, BearerToken(token));
        let cached = CachedClient {
            address: host.address.clone(),
            token: host.agent_token.clone(),
            client: client.clone(),
        };
        clients.insert(host.id, cached);
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_and_timeouts_are_transient_and_the_rest_permanent() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(matches!(
                AgentError::from(Status::new(code, "x")),
                AgentError::Transient(_)
            ));
        }
        for code in [
            Code::NotFound,
            Code::FailedPrecondition,
            Code::InvalidArgument,
            Code::Unauthenticated,
        ] {
            assert!(matches!(
                AgentError::from(Status::new(code, "x")),
                AgentError::Permanent(_)
            ));
        }
    }
}
