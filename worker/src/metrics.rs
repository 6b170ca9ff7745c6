//! The worker's Prometheus metrics, registered into the process's registry. Labels are job
//! kinds, outcomes and repair kinds: bounded sets, never ids.

use std::time::Duration;

use chrono::Utc;
use hangar_jobs::OperationKind;
use hangar_jobs::store::Operation;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::reconciler::Repairs;

/// How an operation ended.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// Superseded: the capsule moved on and nothing was done.
    Cancelled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    kind: &'static str,
    outcome: &'static str,
}

/// The worker's metrics; cheap to clone (every family is shared). The default is registered
/// nowhere: what tests and embedders get unless they pass a registry.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    finished: Family<FinishedLabels, Counter>,
    retries: Family<KindLabel, Counter>,
    wait: Family<KindLabel, Histogram>,
    run: Family<KindLabel, Histogram>,
    tick: Histogram,
    repairs: Family<KindLabel, Counter>,
}

/// 10 ms to ~1.7 h: queue waits stay short, but a backlog after an outage does not.
fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 12))
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self {
            finished: Family::default(),
            retries: Family::default(),
            wait: Family::new_with_constructor(job_buckets),
            run: Family::new_with_constructor(job_buckets),
            tick: Histogram::new(exponential_buckets(0.001, 2.5, 12)),
            repairs: Family::default(),
        }
    }
}

impl WorkerMetrics {
    /// The worker's metrics, registered into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // Every counter series exists from the start, at 0: `rate()` and dashboards need no
        // first event, and the label sets are small and fixed.
        for kind in OperationKind::ALL.iter().map(|k| k.as_str()) {
            for outcome in [Outcome::Succeeded, Outcome::Failed, Outcome::Cancelled] {
                let outcome = outcome.as_str();
                let _ = m.finished.get_or_create(&FinishedLabels { kind, outcome });
            }
            let _ = m.retries.get_or_create(&KindLabel { kind });
        }
        for (kind, _) in Repairs::default().by_kind() {
            let _ = m.repairs.get_or_create(&KindLabel { kind });
        }
        registry.register(
            "hangar_operations",
            "Operations finished by this worker, by kind and outcome (succeeded, failed, cancelled)",
            m.finished.clone(),
        );
        registry.register(
            "hangar_operation_retries",
            "Transient failures retried after a backoff, by kind",
            m.retries.clone(),
        );
        registry.register(
            "hangar_job_wait_seconds",
            "Time from an operation's creation to its first claim by a worker, by kind",
            m.wait.clone(),
        );
        registry.register(
            "hangar_job_run_seconds",
            "Time from an operation's first claim to its end, by kind",
            m.run.clone(),
        );
        registry.register(
            "hangar_reconciler_tick_duration_seconds",
            "Duration of the reconciler ticks this worker ran",
            m.tick.clone(),
        );
        registry.register(
            "hangar_reconciler_repairs",
            "Drift repaired by the reconciler, by kind of repair",
            m.repairs.clone(),
        );
        m
    }

    /// An operation was claimed; its first claim ends its wait in the queue. (A destroy
    /// handed back to wait for its capsule's in-flight operation is claimed as a first
    /// attempt again and counted twice, with the same wait: rare and harmless.)
    pub(crate) fn claimed(&self, op: &Operation) {
        if op.attempts == 1
            && let Some(started) = op.started_at
        {
            let wait = (started - op.created_at).as_seconds_f64().max(0.0);
            self.wait.get_or_create(&kind(op.kind)).observe(wait);
        }
    }

    pub(crate) fn finished(&self, op: &Operation, outcome: Outcome) {
        let labels = FinishedLabels {
            kind: op.kind.as_str(),
            outcome: outcome.as_str(),
        };
        self.finished.get_or_create(&labels).inc();
        if let Some(started) = op.started_at {
            let run = (Utc::now() - started).as_seconds_f64().max(0.0);
            self.run.get_or_create(&kind(op.kind)).observe(run);
        }
    }

    pub(crate) fn retried(&self, op: &Operation) {
        self.retries.get_or_create(&kind(op.kind)).inc();
    }

    pub(crate) fn ticked(&self, took: Duration, repairs: &Repairs) {
        self.tick.observe(took.as_secs_f64());
        for (what, count) in repairs.by_kind() {
            if count > 0 {
                self.repairs
                    .get_or_create(&KindLabel { kind: what })
                    .inc_by(count as u64);
            }
        }
    }
}

fn kind(kind: OperationKind) -> KindLabel {
    KindLabel {
        kind: kind.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn repairs_are_counted_by_kind() {
        let mut registry = Registry::default();
        let m = WorkerMetrics::register(&mut registry);
        let repairs = Repairs {
            pushed: 2,
            orphans_destroyed: 1,
            ..Repairs::default()
        };
        m.ticked(Duration::from_millis(5), &repairs);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"hangar_reconciler_repairs_total{kind="pushed"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"hangar_reconciler_repairs_total{kind="orphans_destroyed"} 1"#));
        // Untouched series are there from the start, at 0.
        assert!(text.contains(r#"hangar_reconciler_repairs_total{kind="auto_paused"} 0"#));
        assert!(text.contains(r#"hangar_operations_total{kind="create",outcome="failed"} 0"#));
        assert!(text.contains("hangar_reconciler_tick_duration_seconds_count 1"));
    }
}
