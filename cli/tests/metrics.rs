//! `/metrics` of every role in a real cluster: the series a create leaves behind, the real
//! Prometheus scraping all three, and the Grafana dashboard asking only for what they export.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::Cluster;
use serde_json::Value;

/// A cluster with one worker and one agent that has run one create to the end.
async fn cluster_after_a_create() -> Cluster {
    let mut cluster = Cluster::start().await;
    cluster.spawn_worker("worker", &[]);
    cluster.spawn_agent("agent", &[]).await;
    let (op, _) = cluster.create_capsule("base").await;
    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    cluster
}

async fn scrape(cluster: &Cluster, base: &str) -> String {
    let resp = cluster
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert!(
        resp.status().is_success(),
        "{base}/metrics: {}",
        resp.status()
    );
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text"));
    resp.text().await.unwrap()
}

/// The api's, the worker's and the agent's scrapes.
async fn scrapes(cluster: &Cluster) -> [String; 3] {
    let worker = format!("http://{}", cluster.metrics_addrs["worker"]);
    let agent = format!("http://{}", cluster.metrics_addrs["agent"]);
    [
        scrape(cluster, &cluster.api_url).await,
        scrape(cluster, &worker).await,
        scrape(cluster, &agent).await,
    ]
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}

/// Polls until every role's scrape satisfies `check` (gauges follow heartbeats and ticks).
async fn scrapes_until(cluster: &Cluster, what: &str, check: impl Fn(&[String; 3]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let texts = scrapes(cluster).await;
        if check(&texts) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}:\n{}",
            texts.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn every_role_exports_what_a_create_did() {
    let cluster = cluster_after_a_create().await;
    scrapes_until(
        &cluster,
        "the gauges and the reconciler caught up",
        |[api, worker, agent]| {
            sample(api, r#"hangar_capsules{status="running"}"#) == Some(1.0)
                && sample(agent, "hangar_agent_sandboxes") == Some(1.0)
                && sample(worker, "hangar_reconciler_tick_duration_seconds_count")
                    .is_some_and(|n| n > 0.0)
        },
    )
    .await;
    let [api, worker, agent] = scrapes(&cluster).await;

    // api: requests by route template, sampled cluster state.
    let created = r#"hangar_http_request_duration_seconds_count{method="POST",route="/v1/capsules",status="202"}"#;
    assert_eq!(sample(&api, created), Some(1.0), "{api}");
    assert!(api.contains(r#"route="/v1/operations/{id}""#), "{api}");
    assert!(
        !api.contains("op_") && !api.contains("cap_"),
        "no ids in labels:\n{api}"
    );
    assert_eq!(
        sample(&api, r#"hangar_queue_depth{kind="create"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&api, r#"hangar_capsules{status="starting"}"#),
        Some(0.0)
    );
    let reserved = sample(&api, r#"hangar_host_vcpus_reserved{host="agent"}"#);
    assert!(reserved.is_some_and(|v| v >= 1.0), "{api}");

    // worker: the outcome, its wait and run times; untouched counters are there at 0.
    let succeeded = r#"hangar_operations_total{kind="create",outcome="succeeded"}"#;
    assert_eq!(sample(&worker, succeeded), Some(1.0), "{worker}");
    let count = |name: &str| sample(&worker, &format!(r#"{name}_count{{kind="create"}}"#));
    assert_eq!(count("hangar_job_wait_seconds"), Some(1.0));
    assert_eq!(count("hangar_job_run_seconds"), Some(1.0));
    assert_eq!(
        sample(&worker, r#"hangar_operation_retries_total{kind="create"}"#),
        Some(0.0)
    );
    assert!(worker.contains(r#"hangar_reconciler_repairs_total{kind="pushed"}"#));

    // agent: the driver call and the host's usage.
    let call = r#"hangar_agent_driver_call_duration_seconds_count{call="create",outcome="ok"}"#;
    assert_eq!(sample(&agent, call), Some(1.0), "{agent}");
    assert!(sample(&agent, "hangar_agent_vcpus_used").is_some_and(|v| v >= 1.0));
    assert!(sample(&agent, "hangar_agent_vcpus_total").is_some_and(|v| v > 0.0));
}

/// The metric names a PromQL expression selects: identifiers outside label matchers, range
/// selectors and grouping lists that are not function calls or keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregations may put a grouping between their name and their `(`.
    const KEYWORDS: [&str; 17] = [
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    let mut names = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        let close = match c {
            '{' => Some('}'),
            '[' => Some(']'),
            '(' if skip_group => Some(')'),
            _ => None,
        };
        if let Some(close) = close {
            skip_group = false;
            i += chars[i..].iter().position(|&x| x == close).expect("closed") + 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                skip_group = true;
            } else if next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else if c.is_ascii_digit() {
            // Numbers (0.99, 1e3) are not names.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn promql_names_are_extracted() {
    let expr = r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{status=~"5.."}[5m]))) / on (x) b"#;
    assert_eq!(metric_names(expr), ["a_bucket", "b"]);
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_exported_metrics() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/grafana/hangar.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 10, "the dashboard has its panels");

    let cluster = cluster_after_a_create().await;
    // Every histogram and gauge has been observed once the reconciler ticked.
    scrapes_until(&cluster, "the reconciler ticked", |[_, worker, _]| {
        worker.contains("hangar_reconciler_tick_duration_seconds_count")
    })
    .await;
    let exported = scrapes(&cluster).await.join("\n");
    for expr in &all {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            let found = exported.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|r| r.starts_with(['{', ' ']))
            });
            assert!(found, "{name} (in `{expr}`) is not exported");
        }
    }
}

/// A Prometheus server; killed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("prometheus log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Debian's `prometheus`, or None to skip (a failure when HANGAR_REQUIRE_PROMETHEUS is set).
fn prometheus_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("HANGAR_REQUIRE_PROMETHEUS").is_none(),
            "HANGAR_REQUIRE_PROMETHEUS is set but `prometheus` is not installed (ops/install-deps.sh)"
        );
        eprintln!("skipped: `prometheus` is not installed");
    }
    found
}

fn start_prometheus(binary: &Path, targets: &[(&str, &str)]) -> Prometheus {
    let dir =
        std::env::temp_dir().join(format!("hangar-prom-{}", hangar_jobs::keys::random_hex(4)));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for (job, addr) in targets {
        config +=
            &format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n");
    }
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(binary)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn prometheus");
    Prometheus {
        child,
        dir,
        url: format!("http://{listen}"),
    }
}

/// The value of an instant query's single result, if there is one.
async fn query(http: &reqwest::Client, prometheus: &Prometheus, promql: &str) -> Option<f64> {
    let resp = http
        .get(format!("{}/api/v1/query", prometheus.url))
        .query(&[("query", promql)])
        .send()
        .await
        .ok()?;
    let body: Value = resp.json().await.ok()?;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn prometheus_scrapes_every_role() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let cluster = cluster_after_a_create().await;
    let api = cluster.api_url.trim_start_matches("http://").to_owned();
    let targets = [
        ("api", api.as_str()),
        ("worker", cluster.metrics_addrs["worker"].as_str()),
        ("agent", cluster.metrics_addrs["agent"].as_str()),
    ];
    let prometheus = start_prometheus(&binary, &targets);
    let http = reqwest::Client::new();
    let checks = [
        ("count(up == 1)", 3.0),
        (
            r#"sum(hangar_operations_total{kind="create",outcome="succeeded"})"#,
            1.0,
        ),
        (r#"sum(hangar_capsules{status="running"})"#, 1.0),
        ("sum(hangar_agent_sandboxes)", 1.0),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (promql, want) in checks {
        loop {
            let got = query(&http, &prometheus, promql).await;
            if got == Some(want) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{promql} = {got:?}, expected {want}; see {}",
                prometheus.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
