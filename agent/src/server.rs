//! The `HostAgent` gRPC service over any [`Driver`], and the bearer-token check in front of it.

use std::sync::Arc;
use std::time::Duration;

use hangar_proto::host_agent_server::{HostAgent, HostAgentServer};
use hangar_proto::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DestroySandboxResponse, ExecResponse, GetHostInfoRequest, HostInfo, ListSandboxesRequest,
    ListSandboxesResponse, Sandbox, SandboxRef, SandboxState, Snapshot,
};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::driver::{
    CreateSpec, Driver, DriverError, ExecRequest, SnapshotInfo, VmInfo, VmSource, VmState, check_id,
};
use crate::secret::Secret;

/// The service, wrapped in the interceptor that checks the agent token.
pub fn service<D: Driver>(
    driver: Arc<D>,
    host_name: String,
    agent_token: &Secret,
) -> InterceptedService<HostAgentServer<HostAgentService<D>>, BearerAuth> {
    let svc = HostAgentService { driver, host_name };
    HostAgentServer::with_interceptor(svc, BearerAuth::new(agent_token))
}

/// Rejects every call whose `authorization` metadata is not `Bearer <agent token>`.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Arc<[u8]>,
}

impl BearerAuth {
    pub fn new(token: &Secret) -> Self {
        Self {
            expected: format!("Bearer {}", token.expose()).into_bytes().into(),
        }
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth([redacted])")
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or(&[]);
        // Constant time, so response timing does not leak how much of a guess was right.
        if bool::from(given.ct_eq(&self.expected)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or invalid agent token"))
        }
    }
}

pub struct HostAgentService<D> {
    driver: Arc<D>,
    host_name: String,
}

impl From<DriverError> for Status {
    fn from(err: DriverError) -> Self {
        match err {
            DriverError::NotFound { .. } => Status::not_found(err.to_string()),
            DriverError::WrongState { .. } => Status::failed_precondition(err.to_string()),
            DriverError::Unavailable(_) => Status::unavailable(err.to_string()),
            DriverError::Timeout => Status::deadline_exceeded(err.to_string()),
            DriverError::CapacityExhausted(_) => Status::resource_exhausted(err.to_string()),
            DriverError::Invalid(_) => Status::invalid_argument(err.to_string()),
            DriverError::Internal(detail) => {
                // The detail (paths, OS errors) goes to the log, not to the caller.
                tracing::error!(error = %detail, "driver internal error");
                Status::internal("internal driver error")
            }
        }
    }
}

impl TryFrom<CreateSandboxRequest> for CreateSpec {
    type Error = DriverError;

    fn try_from(req: CreateSandboxRequest) -> Result<Self, Self::Error> {
        check_id("sandbox", &req.sandbox_id)?;
        let source = match (req.image.is_empty(), req.snapshot_id.is_empty()) {
            (_, false) => {
                check_id("snapshot", &req.snapshot_id)?;
                VmSource::Snapshot(req.snapshot_id)
            }
            (false, true) => VmSource::Image(req.image),
            (true, true) => {
                return Err(DriverError::Invalid(
                    "one of image or snapshot_id is required".into(),
                ));
            }
        };
        Ok(Self {
            sandbox_id: req.sandbox_id,
            vcpus: req.vcpus,
            memory_mb: req.memory_mb,
            source,
        })
    }
}

const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_EXEC_OUTPUT: u64 = 1 << 20;
/// Two streams of this much, base64 in one guest frame, stay under the 16 MiB frame limit.
const MAX_EXEC_OUTPUT: u64 = 4 << 20;

impl TryFrom<hangar_proto::ExecRequest> for ExecRequest {
    type Error = DriverError;

    fn try_from(req: hangar_proto::ExecRequest) -> Result<Self, Self::Error> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(DriverError::Invalid("argv must name a program".into()));
        }
        let timeout = match req.timeout_ms {
            0 => DEFAULT_EXEC_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        if timeout > MAX_EXEC_TIMEOUT {
            return Err(DriverError::Invalid(
                "timeout_ms is at most one hour".into(),
            ));
        }
        let max_output_bytes = match req.max_output_bytes {
            0 => DEFAULT_EXEC_OUTPUT,
            n => n.min(MAX_EXEC_OUTPUT),
        };
        Ok(Self {
            argv: req.argv,
            env: req.env.into_iter().map(|v| (v.name, v.value)).collect(),
            cwd: Some(req.cwd).filter(|c| !c.is_empty()),
            stdin: req.stdin,
            timeout,
            max_output_bytes,
        })
    }
}

fn sandbox(vm: VmInfo) -> Sandbox {
    let state = match vm.state {
        VmState::Running => SandboxState::Running,
        VmState::Paused => SandboxState::Paused,
        VmState::Crashed => SandboxState::Crashed,
    };
    Sandbox {
        sandbox_id: vm.sandbox_id,
        state: state.into(),
        vcpus: vm.vcpus,
        memory_mb: vm.memory_mb,
        created_at_ms: vm.created_at_ms,
    }
}

fn snapshot(snap: SnapshotInfo) -> Snapshot {
    Snapshot {
        snapshot_id: snap.snapshot_id,
        sandbox_id: snap.sandbox_id,
        size_bytes: snap.size_bytes,
        created_at_ms: snap.created_at_ms,
    }
}

#[tonic::async_trait]
impl<D: Driver> HostAgent for HostAgentService<D> {
    #[instrument(skip_all, fields(sandbox_id = %request.get_ref().sandbox_id, generation = request.get_ref().generation))]
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<Sandbox>, Status> {
        let spec = CreateSpec::try_from(request.into_inner())?;
        let vm = self.driver.create(spec).await?;
        Ok(Response::new(sandbox(vm)))
    }

    #[instrument(skip_all, fields(sandbox_id = %request.get_ref().sandbox_id))]
    async fn pause_sandbox(
        &self,
        request: Request<SandboxRef>,
    ) -> Result<Response<Sandbox>, Status> {
        let id = request.into_inner().sandbox_id;
        check_id("sandbox", &id)?;
        Ok(Response::new(sandbox(self.driver.pause(&id).await?)))
    }

    #[instrument(skip_all, fields(sandbox_id = %request.get_ref().sandbox_id))]
    async fn resume_sandbox(
        &self,
        request: Request<SandboxRef>,
    ) -> Result<Response<Sandbox>, Status> {
        let id = request.into_inner().sandbox_id;
        check_id("sandbox", &id)?;
        Ok(Response::new(sandbox(self.driver.resume(&id).await?)))
    }

    #[instrument(skip_all, fields(sandbox_id = %request.get_ref().sandbox_id))]
    async fn destroy_sandbox(
        &self,
        request: Request<SandboxRef>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        check_id("sandbox", &id)?;
        let existed = self.driver.destroy(&id).await?;
        Ok(Response::new(DestroySandboxResponse { existed }))
    }

    #[instrument(skip_all, fields(sandbox_id = %request.get_ref().sandbox_id, snapshot_id = %request.get_ref().snapshot_id))]
    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        let req = request.into_inner();
        check_id("sandbox", &req.sandbox_id)?;
        check_id("snapshot", &req.snapshot_id)?;
        let snap = self
            .driver
            .snapshot(&req.sandbox_id, &req.snapshot_id, req.resume_after)
            .await?;
        Ok(Response::new(snapshot(snap)))
    }

    #[instrument(skip_all, fields(snapshot_id = %request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        check_id("snapshot", &id)?;
        let existed = self.driver.delete_snapshot(&id).await?;
        Ok(Response::new(DeleteSnapshotResponse { existed }))
    }

    #[instrument(skip_all)]
    async fn list_sandboxes(
        &self,
        _request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let inventory = self.driver.list().await?;
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: inventory.sandboxes.into_iter().map(sandbox).collect(),
            snapshot_ids: inventory.snapshot_ids,
        }))
    }

    #[instrument(skip_all)]
    async fn get_host_info(
        &self,
        _request: Request<GetHostInfoRequest>,
    ) -> Result<Response<HostInfo>, Status> {
        let usage = self.driver.usage().await?;
        Ok(Response::new(HostInfo {
            host_name: self.host_name.clone(),
            driver: self.driver.name().to_owned(),
            vcpus_total: usage.vcpus_total,
            memory_mb_total: usage.memory_mb_total,
            vcpus_used: usage.vcpus_used,
            memory_mb_used: usage.memory_mb_used,
            sandboxes: usage.sandboxes,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    #[instrument(skip_all, fields(sandbox_id = %request.get_ref().sandbox_id))]
    async fn exec(
        &self,
        request: Request<hangar_proto::ExecRequest>,
    ) -> Result<Response<ExecResponse>, Status> {
        let req = request.into_inner();
        check_id("sandbox", &req.sandbox_id)?;
        let id = req.sandbox_id.clone();
        let out = self.driver.exec(&id, ExecRequest::try_from(req)?).await?;
        Ok(Response::new(ExecResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            timed_out: out.timed_out,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        auth.call(req).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn bearer_auth_checks_the_token() {
        let mut auth = BearerAuth::new(&Secret::new("s3cret"));
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cretx"),
            Some("s3cret"),
        ] {
            assert_eq!(call(&mut auth, bad), Err(tonic::Code::Unauthenticated));
        }
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn create_requests_parse() {
        let req = |image: &str, snap: &str| CreateSandboxRequest {
            sandbox_id: "cap_1".into(),
            vcpus: 1,
            memory_mb: 128,
            image: image.into(),
            snapshot_id: snap.into(),
            generation: 1,
        };
        assert_eq!(
            CreateSpec::try_from(req("base", "")).unwrap().source,
            VmSource::Image("base".into())
        );
        assert_eq!(
            CreateSpec::try_from(req("base", "tpl_1")).unwrap().source,
            VmSource::Snapshot("tpl_1".into())
        );
        assert!(CreateSpec::try_from(req("", "")).is_err());
        assert!(CreateSpec::try_from(req("", "../x")).is_err());
    }

    #[test]
    fn errors_map_to_codes() {
        let code = |e: DriverError| Status::from(e).code();
        assert_eq!(
            code(DriverError::sandbox_not_found("x")),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(DriverError::WrongState {
                current: VmState::Crashed,
                wanted: VmState::Running
            }),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(DriverError::Unavailable("x".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(code(DriverError::Timeout), tonic::Code::DeadlineExceeded);
        assert_eq!(
            code(DriverError::CapacityExhausted("x".into())),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            code(DriverError::Invalid("x".into())),
            tonic::Code::InvalidArgument
        );
        let internal = Status::from(DriverError::Internal("/secret/path".into()));
        assert_eq!(internal.code(), tonic::Code::Internal);
        assert!(!internal.message().contains("/secret/path"));
    }
}
