//! The operator dashboard in a real browser: a cluster of real processes, and Debian's
//! headless Chromium driven by Playwright (`tests/browser/dashboard.mjs`) through login,
//! live updates, cordon/uncordon, a failed create and its retry. Required in CI
//! (`HANGAR_REQUIRE_BROWSER=1`, set by ops/test.sh, which also runs `npm ci`); elsewhere it
//! is skipped, saying why, when Chromium or the npm packages are missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use common::{ADMIN_KEY, Cluster};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser")
}

/// Why the browser test cannot run here, if it cannot.
fn missing() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} not found (apt-get install chromium)"));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("tests/browser/node_modules missing (npm ci --prefix tests/browser)".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_capsule_start_and_retries_a_failed_create_in_the_browser() {
    if let Some(why) = missing() {
        assert!(
            std::env::var("HANGAR_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "HANGAR_REQUIRE_BROWSER=1 but {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let attempts = [("HANGAR_MAX_ATTEMPTS", "1")];
    let mut cluster = Cluster::start_with(&attempts).await;
    cluster.spawn_worker("worker", &attempts);
    cluster.spawn_agent("host-1", &[]).await;

    let script = browser_dir().join("dashboard.mjs");
    let mut node = Command::new("node");
    node.arg(&script)
        .env("HANGAR_URL", &cluster.api_url)
        .env("HANGAR_ADMIN_KEY", ADMIN_KEY)
        .kill_on_drop(true);
    // Every step waits with its own deadline; this one bounds a browser that hangs outright
    // (node is killed, and Chromium exits when its pipe to node closes).
    let output = tokio::time::timeout(Duration::from_secs(300), node.output())
        .await
        .expect("the browser scenario ended within 5 minutes")
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser scenario failed:\n{stdout}\n{stderr}\napi log:\n{}",
        cluster.log("api")
    );

    // Neither the admin key nor the session's token is in any process's log.
    let outcome: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the outcome line");
    let session = outcome["session"].as_str().expect("the session token");
    assert!(session.len() >= 32, "{outcome}");
    for process in ["api", "worker", "host-1"] {
        let log = cluster.log(process);
        assert!(
            !log.contains(ADMIN_KEY),
            "the admin key is in the {process} log"
        );
        assert!(
            !log.contains(session),
            "the session token is in the {process} log"
        );
    }

    // Every dashboard action is in the audit log, by the admin key behind the session.
    let mut conn = cluster.env.pool.acquire().await.unwrap();
    let actions: Vec<String> = sqlx::query_scalar(
        "select action from audit_log where actor_key_id is not null order by id",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    for expected in [
        "dashboard.login",
        "host.cordon",
        "host.uncordon",
        "operation.retry",
    ] {
        assert!(
            actions.iter().any(|a| a == expected),
            "no {expected} audit row in {actions:?}"
        );
    }
    // The refused forgery and the refused login left nothing behind.
    let sessions: i64 = sqlx::query_scalar("select count(*) from dashboard_sessions")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sessions, 0, "logging out ended the only session");
}
