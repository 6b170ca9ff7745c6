//! Per-operation stage timestamps: when an operation was written, pushed, claimed and
//! finished, and waiting for it to end.

use std::time::{Duration, Instant};

use anyhow::ensure;
use chrono::{DateTime, Utc};
use hangar_jobs::OperationId;

use crate::cluster::Cluster;

impl Cluster {
    /// The stage timestamps of an operation.
    pub async fn stages(&self, id: OperationId) -> anyhow::Result<Stages> {
        let row: StageRow = sqlx::query_as(
            "select created_at, pushed_at, started_at, finished_at, attempts
             from operations where id = $1",
        )
        .bind(id.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(Stages {
            created_at: row.0,
            pushed_at: row.1,
            started_at: row.2,
            finished_at: row.3,
            attempts: row.4,
        })
    }

    /// Long-polls `GET /v1/operations/{id}?wait=` until the operation is terminal.
    pub async fn wait_operation(&self, id: OperationId, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let body = self.get(&format!("/v1/operations/{id}?wait=10")).await?;
            let status = body["status"].as_str().unwrap_or_default().to_owned();
            if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "operation {id} still {status}");
        }
    }
}

type StageRow = (
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i32,
);

/// When an operation was written, pushed, claimed and finished (Postgres `now()` of each
/// statement's transaction; same machine clock as the bench's `Utc::now()`).
#[derive(Debug, Clone)]
pub struct Stages {
    pub created_at: DateTime<Utc>,
    pub pushed_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub attempts: i32,
}

/// `b - a` in milliseconds.
pub fn ms(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}
