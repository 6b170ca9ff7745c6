//! The agent's Prometheus metrics: every driver call's duration by call and outcome, and the
//! host's capacity and usage. [`Metered`] wraps any driver, so neither the gRPC service nor
//! the drivers know about metrics; usage is recorded whenever the driver reports it (every
//! heartbeat and every `GetHostInfo`).

use std::future::Future;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::driver::{
    CreateSpec, Driver, DriverError, ExecOutput, ExecRequest, Inventory, SnapshotInfo, Usage,
    VmInfo,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    /// `ok`, or the kind of [`DriverError`]: never its message.
    outcome: &'static str,
}

/// The agent's metrics; cheap to clone. The default is registered nowhere.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    calls: Family<CallLabels, Histogram>,
    vcpus_total: Gauge,
    vcpus_used: Gauge,
    memory_mb_total: Gauge,
    memory_mb_used: Gauge,
    sandboxes: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            // 1 ms to ~4 min: sim calls take microseconds, a QEMU snapshot under TCG minutes.
            calls: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 3.0, 12))
            }),
            vcpus_total: Gauge::default(),
            vcpus_used: Gauge::default(),
            memory_mb_total: Gauge::default(),
            memory_mb_used: Gauge::default(),
            sandboxes: Gauge::default(),
        }
    }
}

impl AgentMetrics {
    /// The agent's metrics, registered into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "hangar_agent_driver_call_duration_seconds",
            "Duration of VMM driver calls, by call and outcome",
            m.calls.clone(),
        );
        let gauges = [
            (
                "hangar_agent_vcpus_total",
                "vCPUs this host offers",
                &m.vcpus_total,
            ),
            (
                "hangar_agent_vcpus_used",
                "vCPUs its VMs hold",
                &m.vcpus_used,
            ),
            (
                "hangar_agent_memory_mb_total",
                "Memory in MiB this host offers",
                &m.memory_mb_total,
            ),
            (
                "hangar_agent_memory_mb_used",
                "Memory in MiB its VMs hold",
                &m.memory_mb_used,
            ),
            ("hangar_agent_sandboxes", "VMs on this host", &m.sandboxes),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        m
    }

    fn usage(&self, u: &Usage) {
        self.vcpus_total.set(u.vcpus_total.into());
        self.vcpus_used.set(u.vcpus_used.into());
        self.memory_mb_total.set(u.memory_mb_total.into());
        self.memory_mb_used.set(u.memory_mb_used.into());
        self.sandboxes.set(u.sandboxes.into());
    }
}

fn outcome<T>(result: &Result<T, DriverError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(DriverError::NotFound { .. }) => "not_found",
        Err(DriverError::WrongState { .. }) => "wrong_state",
        Err(DriverError::Unavailable(_)) => "unavailable",
        Err(DriverError::Timeout) => "timeout",
        Err(DriverError::CapacityExhausted(_)) => "capacity_exhausted",
        Err(DriverError::Invalid(_)) => "invalid",
        Err(DriverError::Internal(_)) => "internal",
    }
}

/// A driver whose every call is timed.
pub struct Metered<D> {
    inner: D,
    metrics: AgentMetrics,
}

impl<D: Driver> Metered<D> {
    pub fn new(inner: D, metrics: AgentMetrics) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        call: &'static str,
        f: impl Future<Output = Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        let start = Instant::now();
        let result = f.await;
        let labels = CallLabels {
            call,
            outcome: outcome(&result),
        };
        self.metrics
            .calls
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        result
    }
}

impl<D: Driver> Driver for Metered<D> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn description(&self) -> String {
        self.inner.description()
    }

    async fn create(&self, spec: CreateSpec) -> Result<VmInfo, DriverError> {
        self.timed("create", self.inner.create(spec)).await
    }

    async fn pause(&self, sandbox_id: &str) -> Result<VmInfo, DriverError> {
        self.timed("pause", self.inner.pause(sandbox_id)).await
    }

    async fn resume(&self, sandbox_id: &str) -> Result<VmInfo, DriverError> {
        self.timed("resume", self.inner.resume(sandbox_id)).await
    }

    async fn snapshot(
        &self,
        sandbox_id: &str,
        snapshot_id: &str,
        resume_after: bool,
    ) -> Result<SnapshotInfo, DriverError> {
        let call = self.inner.snapshot(sandbox_id, snapshot_id, resume_after);
        self.timed("snapshot", call).await
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, DriverError> {
        let call = self.inner.delete_snapshot(snapshot_id);
        self.timed("delete_snapshot", call).await
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<bool, DriverError> {
        self.timed("destroy", self.inner.destroy(sandbox_id)).await
    }

    async fn list(&self) -> Result<Inventory, DriverError> {
        self.timed("list", self.inner.list()).await
    }

    async fn usage(&self) -> Result<Usage, DriverError> {
        let usage = self.timed("usage", self.inner.usage()).await;
        if let Ok(u) = &usage {
            self.metrics.usage(u);
        }
        usage
    }

    async fn exec(
        &self,
        sandbox_id: &str,
        request: ExecRequest,
    ) -> Result<ExecOutput, DriverError> {
        self.timed("exec", self.inner.exec(sandbox_id, request))
            .await
    }
}
