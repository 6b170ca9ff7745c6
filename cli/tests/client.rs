//! The `hangar` client commands, run as the built binary against a real cluster (api,
//! worker and sim agent processes): output, `--wait`, and the documented exit codes.

mod common;

use common::{ADMIN_KEY, Cluster};
use serde_json::Value;

/// What one `hangar` run printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `hangar <args>` against the cluster with the admin key from the environment.
async fn hangar(cluster: &Cluster, args: &[&str]) -> Run {
    hangar_at(&cluster.api_url, args).await
}

async fn hangar_at(url: &str, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(args)
        .env("HANGAR_URL", url)
        .env("HANGAR_API_KEY", ADMIN_KEY)
        .output()
        .await
        .expect("run hangar");
    Run {
        code: output.status.code().expect("exited"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capsules_life_through_the_cli() {
    let mut cluster = Cluster::start().await;
    cluster.spawn_worker("worker-a", &[]);
    cluster.spawn_agent("host-1", &[]).await;

    let created = hangar(&cluster, &["capsule", "create", "--wait", "-o", "json"])
        .await
        .ok();
    let done = created.json();
    assert_eq!(done["operation"]["status"], "succeeded");
    assert_eq!(done["capsule"]["status"], "running");
    // Progress went to stderr, one line per status change.
    assert!(created.stderr.contains("create"), "{}", created.stderr);
    let cap = done["capsule"]["id"].as_str().unwrap().to_owned();

    let listed = hangar(&cluster, &["capsule", "list", "-o", "json"])
        .await
        .ok();
    assert_eq!(listed.json()["capsules"][0]["id"], cap.as_str());
    let got = hangar(&cluster, &["capsule", "get", &cap, "-o", "json"])
        .await
        .ok();
    assert_eq!(got.json()["status"], "running");
    let table = hangar(&cluster, &["capsule", "get", &cap]).await.ok();
    assert!(table.stdout.starts_with("ID "), "{}", table.stdout);
    assert!(table.stdout.contains(&cap) && table.stdout.contains("running"));

    hangar(&cluster, &["capsule", "pause", &cap, "--wait"])
        .await
        .ok();
    assert_eq!(cluster.capsule(&cap).await["status"], "paused");
    hangar(&cluster, &["capsule", "resume", &cap, "--wait"])
        .await
        .ok();
    assert_eq!(cluster.capsule(&cap).await["status"], "running");

    let ops = hangar(&cluster, &["op", "list", "--capsule", &cap, "-o", "json"])
        .await
        .ok()
        .json();
    let kinds: Vec<&str> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["resume", "pause", "create"]);

    let exec = hangar(
        &cluster,
        &["capsule", "exec", &cap, "--", "echo", "hi", "there"],
    )
    .await
    .ok();
    assert_eq!(exec.stdout, "hi there\n");

    let hosts = hangar(&cluster, &["host", "list"]).await.ok();
    assert!(hosts.stdout.contains("host-1") && hosts.stdout.contains("schedulable"));

    hangar(&cluster, &["capsule", "destroy", &cap, "--wait"])
        .await
        .ok();
    assert_eq!(cluster.capsule(&cap).await["status"], "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_with_their_documented_codes() {
    let cluster = Cluster::start().await;
    let zeros = "0".repeat(32);
    let unknown = hangar(&cluster, &["capsule", "get", &format!("cap_{zeros}")]).await;
    assert_eq!(unknown.code, 3, "{}", unknown.stderr);
    assert_eq!(unknown.stderr.lines().count(), 1, "{}", unknown.stderr);
    assert!(
        unknown.stderr.starts_with("error: not_found: "),
        "{}",
        unknown.stderr
    );
    // A malformed id is a 4xx too (the API's code), not a usage error.
    let malformed = hangar(&cluster, &["op", "get", "nope"]).await;
    assert_eq!(malformed.code, 3);
    assert!(malformed.stderr.starts_with("error: invalid_id: "));

    let not_found = hangar(&cluster, &["op", "get", &format!("op_{zeros}")]).await;
    assert_eq!(not_found.code, 3);
    assert!(
        not_found.stderr.starts_with("error: not_found: "),
        "{}",
        not_found.stderr
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = hangar_at(&format!("http://127.0.0.1:{port}"), &["host", "list"]).await;
    assert_eq!(unreachable.code, 4);
    assert!(unreachable.stderr.starts_with("error: unreachable: "));

    let usage = hangar(&cluster, &["capsule", "pause"]).await;
    assert_eq!(usage.code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_is_retried_once_the_host_works() {
    let attempts = [("HANGAR_MAX_ATTEMPTS", "1")];
    let mut cluster = Cluster::start_with(&attempts).await;
    cluster.spawn_worker("worker-a", &attempts);
    cluster
        .spawn_agent("host-1", &[("HANGAR_SIM_ERROR_RATE", "1")])
        .await;

    let failed = hangar(&cluster, &["capsule", "create", "--wait", "-o", "json"]).await;
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert!(failed.stderr.lines().last().unwrap().starts_with("error: "));
    let done = failed.json();
    assert_eq!(done["operation"]["status"], "failed");
    assert_eq!(done["capsule"]["status"], "error");
    let (op, cap) = (
        done["operation"]["id"].as_str().unwrap().to_owned(),
        done["capsule"]["id"].as_str().unwrap().to_owned(),
    );
    // `op wait` on a failed operation: exit 1 too.
    assert_eq!(hangar(&cluster, &["op", "wait", &op]).await.code, 1);

    cluster.kill("host-1");
    cluster.spawn_agent("host-1", &[]).await;
    let retried = hangar(&cluster, &["op", "retry", &op, "--wait", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(retried["operation"]["status"], "succeeded");
    assert_ne!(retried["operation"]["id"], op.as_str());
    assert_eq!(retried["capsule"]["status"], "running");
    assert_eq!(cluster.capsule(&cap).await["status"], "running");

    // The same failure cannot be retried twice: a 409, exit 3.
    let again = hangar(&cluster, &["op", "retry", &op]).await;
    assert_eq!(again.code, 3);
    assert!(again.stderr.starts_with("error: invalid_state: "));

    // Draining the host reports the capsule still on it.
    let host = cluster.admin_get("/v1/admin/hosts").await["hosts"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let drained = hangar(&cluster, &["host", "drain", &host, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(drained["host"]["cordoned"], true);
    assert_eq!(drained["capsules"][0]["id"], cap.as_str());
    let listed = hangar(&cluster, &["host", "list"]).await.ok();
    assert!(listed.stdout.contains("draining"), "{}", listed.stdout);
    hangar(&cluster, &["host", "uncordon", &host]).await.ok();
}
