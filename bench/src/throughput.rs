//! `throughput`: `POST /v1/capsules` with N concurrent clients beside the raw floor — the
//! same intent rows in one transaction (`intents::create_capsule`) and one Redis push
//! (`enqueue::push_committed`), in-process on a sqlx pool as large as the API's (32), with
//! the same concurrency and duration. No workers run, so only the enqueue path is measured.
//! Runs alternate (floor, http, …) and the median of each is reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cluster::{Cluster, Common};
use crate::create::post_create;
use crate::stats;

#[derive(Args, Debug, Clone)]
pub struct ThroughputArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Rounds of (floor, http).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of each path run first, not counted.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Floor,
    Http,
}

struct RunResult {
    rate: f64,
    errors: usize,
    first_error: Option<String>,
    latencies_ms: Vec<f64>,
    /// CPU seconds per process group during the run, and the machine's busy CPU seconds.
    cpu: Vec<(String, f64)>,
    machine_busy: f64,
    machine_fraction: f64,
}

async fn one_request(cluster: &Cluster, path: Path) -> anyhow::Result<()> {
    match path {
        Path::Http => post_create(cluster).await.map(|_| ()),
        Path::Floor => {
            let id = cluster.write_intent().await?;
            cluster.push(id).await
        }
    }
}

async fn run_once(
    cluster: &Arc<Cluster>,
    path: Path,
    clients: usize,
    secs: f64,
) -> anyhow::Result<RunResult> {
    let before = cluster.cpu().await;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match one_request(&cluster, path).await {
                    Ok(()) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut latencies_ms = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (l, e, f) = task.await?;
        latencies_ms.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    // Requests in flight at the deadline finish after it: divide by the real span.
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu, machine_busy, machine_fraction) = cluster.cpu().await.since(&before);
    Ok(RunResult {
        rate: latencies_ms.len() as f64 / elapsed,
        errors,
        first_error,
        latencies_ms,
        cpu,
        machine_busy,
        machine_fraction,
    })
}

pub async fn run(common: &Common, args: &ThroughputArgs) -> anyhow::Result<()> {
    let cluster = Arc::new(Cluster::start(common, "throughput", 32).await?);
    for path in [Path::Floor, Path::Http] {
        run_once(&cluster, path, args.concurrency, args.warmup_secs).await?;
    }
    let mut floor = Vec::new();
    let mut http = Vec::new();
    let mut floor_lat = Vec::new();
    let mut http_lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut cpu: [CpuTotals; 2] = Default::default();
    println!();
    println!(
        "### throughput: create enqueue path, {} concurrent clients, {} s per run, no workers",
        args.concurrency, args.secs
    );
    println!();
    println!(
        "| round | floor req/s (tx + push, in-process) | HTTP req/s (`POST /v1/capsules`) | HTTP / floor |"
    );
    println!("|---:|---:|---:|---:|");
    for round in 1..=args.rounds {
        let mut f = run_once(&cluster, Path::Floor, args.concurrency, args.secs).await?;
        let mut h = run_once(&cluster, Path::Http, args.concurrency, args.secs).await?;
        println!(
            "| {round} | {:.0} | {:.0} | {:.0} % |",
            f.rate,
            h.rate,
            100.0 * h.rate / f.rate
        );
        errors += f.errors + h.errors;
        first_error = first_error
            .or(f.first_error.take())
            .or(h.first_error.take());
        cpu[0].add(&f);
        cpu[1].add(&h);
        floor.push(f.rate);
        http.push(h.rate);
        floor_lat.extend(f.latencies_ms);
        http_lat.extend(h.latencies_ms);
    }
    let (mf, mh) = (stats::median(&floor), stats::median(&http));
    let ratio = 100.0 * mh / mf;
    println!(
        "| **median** | **{mf:.0}** (min {:.0}, max {:.0}) | **{mh:.0}** (min {:.0}, max {:.0}) | **{ratio:.0} %** (target ≥ 70 %: {}) |",
        min(&floor),
        max(&floor),
        min(&http),
        max(&http),
        if ratio >= 70.0 { "met" } else { "MISSED" }
    );
    stats::latency_header("per-request latency during the throughput runs (all rounds)");
    stats::latency_row("floor: tx + push", &floor_lat, "");
    stats::latency_row("HTTP: POST → 202", &http_lat, "");
    println!();
    println!("CPU per request (ms), all rounds:");
    println!();
    cpu[0].print("floor");
    cpu[1].print("HTTP");
    println!();
    let n = floor_lat.len() + http_lat.len();
    println!(
        "requests: {n}, errors: {errors}; logs: {}",
        cluster.dir.display()
    );
    if let Some(e) = first_error {
        println!("first error: {e}");
    }
    Ok(())
}

/// CPU seconds per process group and requests, summed over a path's runs.
#[derive(Default)]
struct CpuTotals {
    groups: std::collections::BTreeMap<String, f64>,
    machine_busy: f64,
    machine_fraction: Vec<f64>,
    requests: usize,
}

impl CpuTotals {
    fn add(&mut self, run: &RunResult) {
        for (name, secs) in &run.cpu {
            *self.groups.entry(name.clone()).or_default() += secs;
        }
        self.machine_busy += run.machine_busy;
        self.machine_fraction.push(run.machine_fraction);
        self.requests += run.latencies_ms.len();
    }

    fn print(&self, path: &str) {
        let per = |secs: f64| 1000.0 * secs / self.requests.max(1) as f64;
        let ours: f64 = self.groups.values().sum();
        let parts: Vec<String> = self
            .groups
            .iter()
            .map(|(n, s)| format!("{n} {:.3}", per(*s)))
            .collect();
        println!(
            "- {path}: {}; all of ours {:.3}; whole machine {:.3} (machine busy {:.0} %, median of runs)",
            parts.join(", "),
            per(ours),
            per(self.machine_busy),
            100.0 * stats::median(&self.machine_fraction)
        );
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
