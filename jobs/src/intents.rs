//! Accepting a request: the first half of the enqueue path. Each function runs inside the
//! caller's transaction and writes the capsule's conditional transition, the operation row
//! (the intent and job handle) and an event. After commit the caller pushes the job
//! (`enqueue::push_committed`).

use serde_json::json;

use crate::ids::{CapsuleId, OperationId, TeamId};
use crate::state::{CapsuleStatus, OperationKind};
use crate::store::capsules::{self, NewCapsule};
use crate::store::operations::{self, NewOperation};
use crate::store::records::{self, NewEvent};
use crate::store::{Capsule, Operation, PgConnection, StoreError, Template};
use hangar_proto::trace_context;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("capsule is {status}; {kind} is not possible from there")]
    InvalidState {
        status: CapsuleStatus,
        kind: OperationKind,
    },
    #[error("operation {operation} is already in progress on this capsule")]
    InProgress { operation: OperationId },
    /// An operator action that the operation's or the capsule's state does not allow.
    #[error("{0}")]
    Refused(String),
}

impl From<sqlx::Error> for IntentError {
    fn from(e: sqlx::Error) -> Self {
        IntentError::Store(StoreError::Database(e))
    }
}

/// An accepted request: the job handle and the capsule as it now is.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub operation: Operation,
    pub capsule: Capsule,
    /// False when an identical request was already in flight and its handle is returned.
    pub is_new: bool,
}

pub struct CreateCapsule {
    pub team_id: TeamId,
    pub template: Template,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub timeout_sec: i32,
    pub metadata: serde_json::Value,
    pub max_attempts: i32,
}

/// A new capsule in `starting` and its create operation.
pub async fn create_capsule(
    conn: &mut PgConnection,
    req: CreateCapsule,
) -> Result<Accepted, IntentError> {
    let capsule = capsules::insert(
        conn,
        NewCapsule {
            id: CapsuleId::new(),
            team_id: req.team_id,
            template_id: req.template.id,
            vcpus: req.vcpus,
            memory_mb: req.memory_mb,
            timeout_sec: req.timeout_sec,
            metadata: req.metadata,
        },
    )
    .await?;
    let operation = insert_operation(
        conn,
        &capsule,
        OperationKind::Create,
        req.max_attempts,
        json!({ "template": req.template.name }),
    )
    .await?;
    event(conn, &capsule, &operation, None, "capsule create requested").await?;
    Ok(Accepted {
        operation,
        capsule,
        is_new: true,
    })
}

/// Pause, resume, snapshot or destroy of an existing capsule.
pub async fn capsule_operation(
    conn: &mut PgConnection,
    capsule: Capsule,
    kind: OperationKind,
    params: serde_json::Value,
    max_attempts: i32,
) -> Result<Accepted, IntentError> {
    let status = capsule.status;
    if !kind.accepted_from().contains(&status) {
        return Err(IntentError::InvalidState { status, kind });
    }
    let in_flight = operations::in_flight(conn, capsule.id).await?;
    if kind == OperationKind::Destroy {
        return destroy(conn, capsule, in_flight.is_some(), max_attempts).await;
    }
    if let Some(op) = in_flight {
        return Err(IntentError::InProgress { operation: op.id });
    }
    let to = kind
        .start_status()
        .expect("lifecycle kinds move the capsule");
    let moved = capsules::transition(conn, capsule.id, status, capsule.generation, to, None)
        .await?
        .ok_or(IntentError::InvalidState { status, kind })?;
    let operation = insert_operation(conn, &moved, kind, max_attempts, params).await?;
    event(
        conn,
        &moved,
        &operation,
        Some(status),
        &format!("{kind} requested"),
    )
    .await?;
    Ok(Accepted {
        operation,
        capsule: moved,
        is_new: true,
    })
}

/// Destroy is accepted in any non-terminal status. With an operation in flight it waits
/// (the capsule moves to `stopping` when the destroy job runs); otherwise the capsule moves
/// to `stopping` now. A second destroy returns the first one's handle.
async fn destroy(
    conn: &mut PgConnection,
    capsule: Capsule,
    waits: bool,
    max_attempts: i32,
) -> Result<Accepted, IntentError> {
    if let Some(existing) = operations::destroy_in_flight(conn, capsule.id).await? {
        let operation =
            operations::get(conn, None, existing)
                .await?
                .ok_or(IntentError::InProgress {
                    operation: existing,
                })?;
        return Ok(Accepted {
            operation,
            capsule,
            is_new: false,
        });
    }
    let from = capsule.status;
    let capsule = if !waits && from.can_become(CapsuleStatus::Stopping) {
        capsules::transition(
            conn,
            capsule.id,
            from,
            capsule.generation,
            CapsuleStatus::Stopping,
            None,
        )
        .await?
        .ok_or(IntentError::InvalidState {
            status: from,
            kind: OperationKind::Destroy,
        })?
    } else {
        capsule
    };
    let operation = insert_operation(
        conn,
        &capsule,
        OperationKind::Destroy,
        max_attempts,
        json!({}),
    )
    .await?;
    event(conn, &capsule, &operation, Some(from), "destroy requested").await?;
    Ok(Accepted {
        operation,
        capsule,
        is_new: true,
    })
}

/// Retries the failed create `failed` of `capsule`: the capsule goes `error → starting` and a
/// new create with the same parameters is queued. Allowed only while the capsule is still
/// in `error` exactly as that failure left it (one generation after the operation's) and no
/// other operation is in flight: then nothing has touched it since, and the create job
/// resumes from its placement (the agent's create is idempotent by capsule id).
pub async fn retry_create(
    conn: &mut PgConnection,
    capsule: Capsule,
    failed: &Operation,
    max_attempts: i32,
) -> Result<Accepted, IntentError> {
    debug_assert_eq!(failed.kind, OperationKind::Create);
    if capsule.status != CapsuleStatus::Error || capsule.generation != failed.generation + 1 {
        return Err(IntentError::Refused(format!(
            "capsule is {} and has changed since this create failed; only a create whose \
             failure left the capsule in error can be retried",
            capsule.status
        )));
    }
    if let Some(op) = operations::in_flight(conn, capsule.id).await? {
        return Err(IntentError::InProgress { operation: op.id });
    }
    if let Some(destroy) = operations::destroy_in_flight(conn, capsule.id).await? {
        return Err(IntentError::InProgress { operation: destroy });
    }
    let moved = capsules::transition(
        conn,
        capsule.id,
        CapsuleStatus::Error,
        capsule.generation,
        CapsuleStatus::Starting,
        None,
    )
    .await?
    .ok_or_else(|| IntentError::Refused("the capsule changed meanwhile; try again".into()))?;
    let operation = insert_operation(
        conn,
        &moved,
        OperationKind::Create,
        max_attempts,
        failed.params.clone(),
    )
    .await?;
    let message = format!("create retried by an operator (after {})", failed.id);
    event(conn, &moved, &operation, Some(capsule.status), &message).await?;
    Ok(Accepted {
        operation,
        capsule: moved,
        is_new: true,
    })
}

/// A queued operation cancelled by an operator, and its capsule as it now is.
#[derive(Debug, Clone)]
pub struct Cancelled {
    pub operation: Operation,
    pub capsule: Option<Capsule>,
}

/// Cancels `op` if no worker has claimed it yet, and moves its capsule back from the
/// transient status the operation put it in (see `OperationKind::cancelled_status`) if the
/// capsule is still there at the operation's generation; otherwise the capsule is left as
/// it is (something else moved it, and that move stands).
pub async fn cancel_queued(
    conn: &mut PgConnection,
    op: &Operation,
) -> Result<Cancelled, IntentError> {
    let prior = op.params["prior_status"]
        .as_str()
        .and_then(|s| s.parse::<CapsuleStatus>().ok());
    let Some(back) = op.kind.cancelled_status(prior) else {
        return Err(IntentError::Refused(format!(
            "{} operations cannot be cancelled",
            op.kind
        )));
    };
    let operation = operations::cancel_queued(
        conn,
        op.id,
        "cancelled_by_operator",
        "cancelled by an operator before it started",
    )
    .await?
    .ok_or_else(|| {
        IntentError::Refused(
            "operation is no longer queued; a job a worker has started cannot be cancelled".into(),
        )
    })?;
    let Some(capsule_id) = op.capsule_id else {
        return Ok(Cancelled {
            operation,
            capsule: None,
        });
    };
    let Some(capsule) = capsules::get(conn, None, capsule_id).await? else {
        return Ok(Cancelled {
            operation,
            capsule: None,
        });
    };
    let at_start =
        Some(capsule.status) == op.kind.start_status() && capsule.generation == op.generation;
    if !at_start {
        return Ok(Cancelled {
            operation,
            capsule: Some(capsule),
        });
    }
    let reason = (back == CapsuleStatus::Error).then_some("create cancelled by an operator");
    let from = capsule.status;
    let Some(moved) =
        capsules::transition(conn, capsule.id, from, capsule.generation, back, reason).await?
    else {
        // Moved by someone else between the read and the update: that move stands.
        let capsule = capsules::get(conn, None, capsule_id).await?;
        return Ok(Cancelled { operation, capsule });
    };
    records::insert_event(
        conn,
        NewEvent {
            team_id: moved.team_id,
            capsule_id: Some(moved.id),
            operation_id: Some(op.id),
            kind: "status_changed",
            from: Some(from),
            to: Some(back),
            message: Some(&format!("{} cancelled by an operator", op.kind)),
        },
    )
    .await?;
    Ok(Cancelled {
        operation,
        capsule: Some(moved),
    })
}

/// A host's report about a capsule (crashed, exited, auto-paused), applied by a job.
pub async fn host_report(
    conn: &mut PgConnection,
    capsule: &Capsule,
    params: serde_json::Value,
) -> Result<Operation, IntentError> {
    Ok(insert_operation(conn, capsule, OperationKind::HostEvent, 1, params).await?)
}

async fn insert_operation(
    conn: &mut PgConnection,
    capsule: &Capsule,
    kind: OperationKind,
    max_attempts: i32,
    params: serde_json::Value,
) -> Result<Operation, StoreError> {
    operations::insert(
        conn,
        NewOperation {
            id: OperationId::new(),
            team_id: capsule.team_id,
            capsule_id: Some(capsule.id),
            kind,
            generation: capsule.generation,
            max_attempts,
            params,
            trace_parent: trace_context::current(),
        },
    )
    .await
}

async fn event(
    conn: &mut PgConnection,
    capsule: &Capsule,
    op: &Operation,
    from: Option<CapsuleStatus>,
    message: &str,
) -> Result<(), StoreError> {
    records::insert_event(
        conn,
        NewEvent {
            team_id: capsule.team_id,
            capsule_id: Some(capsule.id),
            operation_id: Some(op.id),
            kind: "operation_accepted",
            from,
            to: Some(capsule.status),
            message: Some(message),
        },
    )
    .await?;
    Ok(())
}
