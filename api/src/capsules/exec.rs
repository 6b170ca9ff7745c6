//! `POST /v1/capsules/{id}/exec`: runs a command in a running capsule and answers with its
//! result. Synchronous (200, not a job): the API calls the capsule's host agent (`Exec`),
//! which asks the guest agent; the guest kills the command at its timeout.
//!
//! With an `Idempotency-Key`, a finished exec's answer is stored and replayed; the command
//! runs outside any transaction (it may take minutes), so two identical requests that race
//! with the same new key may both run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use hangar_jobs::CapsuleId;
use hangar_jobs::CapsuleStatus;
use hangar_jobs::store::{Principal, capsules, hosts};
use hangar_proto::{EnvVar, ExecRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::Code;
use utoipa::ToSchema;

use crate::AppState;
use crate::audit;
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Caller, IdempotencyKey, JsonBody, PathId};
use crate::idempotency::{Idempotency, Reply};

/// The longest command a request may run.
pub(crate) const MAX_TIMEOUT_SECS: u64 = 300;
const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Output kept per stream (the agent's own ceiling is 4 MiB).
const MAX_OUTPUT_BYTES: u64 = 4 << 20;
const DEFAULT_OUTPUT_BYTES: u64 = 1 << 20;
const MAX_ARGS: usize = 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecBody {
    /// The program (looked up on the guest's PATH) and its arguments.
    #[schema(example = json!(["uname", "-sr"]))]
    argv: Vec<String>,
    /// Names match `[A-Za-z_][A-Za-z0-9_]*`.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// An absolute path.
    cwd: Option<String>,
    /// Text fed to the command's standard input.
    #[serde(default)]
    stdin: String,
    /// 1..=300 (default 30); the command is killed then.
    #[schema(minimum = 1, maximum = 300)]
    timeout_sec: Option<u64>,
    /// Output kept per stream, 1..=4194304 (default 1 MiB).
    #[schema(minimum = 1, maximum = 4194304)]
    max_output_bytes: Option<u64>,
}

/// How the command ended, and its output (lossy UTF-8).
#[derive(Serialize, ToSchema)]
pub(crate) struct ExecResult {
    exit_code: i32,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
    timed_out: bool,
    duration_ms: u64,
}

/// An exec request, validated.
struct Command {
    argv: Vec<String>,
    env: Vec<EnvVar>,
    cwd: String,
    stdin: Vec<u8>,
    timeout: Duration,
    max_output_bytes: u64,
}

impl TryFrom<ExecBody> for Command {
    type Error = ApiError;

    fn try_from(body: ExecBody) -> Result<Self, ApiError> {
        let invalid = |m: &str| Err(ApiError::InvalidRequest(m.to_owned()));
        if body.argv.is_empty() || body.argv[0].is_empty() {
            return invalid("argv must name a program: [\"program\", \"arg\", ...]");
        }
        if body.argv.len() > MAX_ARGS {
            return invalid("argv has more than 1024 entries");
        }
        if body.argv.iter().any(|a| a.contains('\0')) {
            return invalid("argv entries must not contain NUL characters");
        }
        for (name, value) in &body.env {
            let ok = name.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
            if name.is_empty() || !ok || value.contains('\0') {
                return invalid(
                    "env names must match [A-Za-z_][A-Za-z0-9_]* and values hold no NUL",
                );
            }
        }
        if let Some(cwd) = &body.cwd
            && (!cwd.starts_with('/') || cwd.contains('\0'))
        {
            return invalid("cwd must be an absolute path");
        }
        let timeout = body.timeout_sec.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout) {
            return invalid("timeout_sec must be between 1 and 300");
        }
        let max_output = body.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES);
        if !(1..=MAX_OUTPUT_BYTES).contains(&max_output) {
            return invalid("max_output_bytes must be between 1 and 4194304");
        }
        Ok(Self {
            argv: body.argv,
            env: body
                .env
                .into_iter()
                .map(|(name, value)| EnvVar { name, value })
                .collect(),
            cwd: body.cwd.unwrap_or_default(),
            stdin: body.stdin.into_bytes(),
            timeout: Duration::from_secs(timeout),
            max_output_bytes: max_output,
        })
    }
}

/// Runs a command in a running capsule and answers with its result (synchronous, not a job).
#[utoipa::path(
    post,
    path = "/v1/capsules/{id}/exec",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path), IdempotencyKey),
    request_body = ExecBody,
    responses(
        (status = 200, body = ExecResult),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
        (status = 409, description = "The capsule is not running", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
        (status = 503, description = "The capsule's host did not answer", body = ErrorEnvelope),
    )
)]
pub(crate) async fn exec(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
    key: IdempotencyKey,
    body: JsonBody<ExecBody>,
) -> Result<Reply, ApiError> {
    let command = Command::try_from(body.value)?;
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut conn = state.pool.acquire().await?;
    if let Some(reply) = idem.replay(&mut conn).await? {
        return Ok(reply);
    }
    let capsule = capsules::get(&mut conn, Some(actor.team_id), id)
        .await?
        .ok_or(ApiError::NotFound("capsule"))?;
    if capsule.status != CapsuleStatus::Running {
        return Err(ApiError::InvalidState(format!(
            "capsule is {}; exec needs it running",
            capsule.status
        )));
    }
    let host = match capsule.host_id {
        Some(host) => hosts::get(&mut conn, host).await?,
        None => None,
    }
    .ok_or_else(|| ApiError::InvalidState("capsule has no host".into()))?;
    drop(conn);

    let reply = run(&state, &host, id, command).await?;
    let mut tx = state.pool.begin().await?;
    audit_exec(&mut tx, &actor, id, &reply).await?;
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    Ok(reply)
}

/// Calls the host agent and shapes its answer.
#[tracing::instrument(skip_all, fields(capsule_id = %id, host = %host.name))]
async fn run(
    state: &AppState,
    host: &hangar_jobs::store::Host,
    id: CapsuleId,
    command: Command,
) -> Result<Reply, ApiError> {
    let mut client = state
        .agents
        .client(host)
        .map_err(|e| ApiError::HostUnavailable(e.to_string()))?;
    let timeout = command.timeout;
    let mut request = tonic::Request::new(ExecRequest {
        sandbox_id: id.to_string(),
        argv: command.argv,
        env: command.env,
        cwd: command.cwd,
        stdin: command.stdin,
        timeout_ms: timeout.as_millis() as u64,
        max_output_bytes: command.max_output_bytes,
    });
    // The guest enforces the timeout; this only bounds a lost answer.
    request.set_timeout(timeout + Duration::from_secs(15));
    let started = Instant::now();
    let output = client
        .exec(request)
        .await
        .map_err(|status| match status.code() {
            Code::FailedPrecondition | Code::NotFound => ApiError::InvalidState(format!(
                "the capsule's VM cannot run commands: {}",
                status.message()
            )),
            Code::InvalidArgument => ApiError::InvalidRequest(status.message().to_owned()),
            _ => ApiError::HostUnavailable(status.message().to_owned()),
        })?
        .into_inner();
    Ok(Reply::ok(json!(ExecResult {
        exit_code: output.exit_code,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        stdout_truncated: output.stdout_truncated,
        stderr_truncated: output.stderr_truncated,
        timed_out: output.timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })))
}

/// The program and how it ended; never its arguments, which may hold secrets.
async fn audit_exec(
    conn: &mut hangar_jobs::store::PgConnection,
    actor: &Principal,
    id: CapsuleId,
    reply: &Reply,
) -> Result<(), ApiError> {
    audit::accepted(
        conn,
        Some(actor),
        Some(actor.team_id),
        "capsule.exec",
        id,
        json!({
            "exit_code": reply.body["exit_code"],
            "timed_out": reply.body["timed_out"],
        }),
    )
    .await
}
