//! Postgres access: small, named query functions over `&mut PgConnection`, so the caller
//! (a handler or a job) owns the transaction. Queries are checked at compile time against
//! the migrations (`.sqlx/` holds the offline data).
//!
//! Every capsule status write goes through [`capsules::transition`], a conditional update
//! on status and generation.

pub mod capsules;
pub mod completions;
pub mod dashboard;
pub mod hosts;
pub mod operations;
pub mod records;
pub mod tenancy;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::{CapsuleId, HostId, KeyId, OperationId, TeamId, TemplateId};
use crate::state::{CapsuleStatus, OperationKind, OperationStatus};

pub use sqlx::PgConnection;
pub type PgPool = sqlx::PgPool;

/// Errors of the store, named after it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A transition the state machine does not allow was attempted.
    #[error("capsule cannot go from {from} to {to}")]
    TransitionNotAllowed {
        from: CapsuleStatus,
        to: CapsuleStatus,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Applies the migrations in `migrations/` (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../migrations").run(pool).await
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Capsule {
    pub id: CapsuleId,
    pub team_id: TeamId,
    pub template_id: TemplateId,
    pub host_id: Option<HostId>,
    pub status: CapsuleStatus,
    pub status_reason: Option<String>,
    pub generation: i64,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub timeout_sec: i32,
    pub expires_at: DateTime<Utc>,
    pub status_deadline: Option<DateTime<Utc>>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: OperationId,
    pub team_id: TeamId,
    pub capsule_id: Option<CapsuleId>,
    pub kind: OperationKind,
    pub status: OperationStatus,
    pub generation: i64,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub error_code: Option<String>,
    pub step: Option<String>,
    pub params: serde_json::Value,
    pub result: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The creating request's W3C `traceparent`: every attempt continues its trace.
    #[serde(skip)]
    pub trace_parent: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Host {
    pub id: HostId,
    pub name: String,
    pub address: String,
    pub driver: String,
    pub status: String,
    pub cordoned: bool,
    pub vcpus_total: i32,
    pub memory_mb_total: i32,
    pub vcpus_reserved: i32,
    pub memory_mb_reserved: i32,
    pub vcpus_used: i32,
    pub memory_mb_used: i32,
    pub last_heartbeat_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The bearer token workers present to this host's agent.
    #[serde(skip)]
    pub agent_token: String,
    /// When an operator asked to drain it (it is cordoned until uncordoned).
    pub drain_requested_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Template {
    pub id: TemplateId,
    pub team_id: TeamId,
    pub name: String,
    pub status: String,
    pub image: Option<String>,
    pub snapshot_host_id: Option<HostId>,
    pub source_capsule_id: Option<CapsuleId>,
    pub vcpus: i32,
    pub memory_mb: i32,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    pub is_platform: bool,
    pub created_at: DateTime<Utc>,
}

/// The caller behind an API key.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: KeyId,
    pub team_id: TeamId,
    pub is_admin: bool,
    pub is_platform: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub id: i64,
    pub team_id: TeamId,
    pub capsule_id: Option<CapsuleId>,
    pub operation_id: Option<OperationId>,
    pub kind: String,
    pub from_status: Option<String>,
    pub to_status: Option<String>,
    pub message: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A round trip to Postgres (`select 1`), for readiness checks.
pub async fn ping(conn: &mut PgConnection) -> StoreResult<()> {
    sqlx::query_scalar!(r#"select 1 as "one!""#)
        .fetch_one(conn)
        .await?;
    Ok(())
}
