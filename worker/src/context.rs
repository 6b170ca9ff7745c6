//! What every job and the reconciler share within one worker process.

use std::sync::Arc;

use hangar_jobs::agents::AgentPool;
use hangar_jobs::queue::JobQueue;
use hangar_jobs::store::PgPool;

use crate::WorkerConfig;
use crate::metrics::WorkerMetrics;

#[derive(Clone)]
pub struct JobContext {
    pub pool: PgPool,
    pub queue: JobQueue,
    pub agents: AgentPool,
    /// This process's unique worker name: the lease owner of the operations it runs.
    pub worker: String,
    pub config: Arc<WorkerConfig>,
    pub metrics: WorkerMetrics,
}
