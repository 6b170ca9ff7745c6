//! `dashboard`: how long the operator dashboard's pages take to render over HTTP with a large
//! history — 10,000 capsules and 100,000 operations seeded in SQL (no workers run) — each
//! page fetched `--samples` times in turn with a logged-in session.

use std::time::Instant;

use anyhow::{Context, ensure};
use clap::Args;

use crate::cluster::{Cluster, Common};
use crate::stats;

#[derive(Args, Debug)]
pub struct DashboardArgs {
    /// Capsules to seed.
    #[arg(long, default_value_t = 10_000)]
    capsules: i64,
    /// Operations per capsule (100,000 in all by default).
    #[arg(long, default_value_t = 10)]
    operations_per_capsule: i64,
    /// Fetches of each page.
    #[arg(long, default_value_t = 30)]
    samples: usize,
}

pub async fn run(common: &Common, args: &DashboardArgs) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(common, "dashboard", 4).await?;
    cluster.spawn_agent("host-1").await?;
    eprintln!(
        "seeding {} capsules, {} operations each",
        args.capsules, args.operations_per_capsule
    );
    seed(&cluster, args).await?;
    let cookie = login(&cluster).await?;
    let (capsule, operation): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(
        "select capsule_id, id from operations where status = 'failed' order by id desc limit 1",
    )
    .fetch_one(&cluster.pool)
    .await?;
    let pages = [
        ("capsules (counts + newest 50)", "/dashboard".to_owned()),
        (
            "capsules, status = running",
            "/dashboard?status=running".to_owned(),
        ),
        (
            "operations (counts + newest 50)",
            "/dashboard/operations".to_owned(),
        ),
        (
            "operations, failed creates",
            "/dashboard/operations?status=failed&kind=create".to_owned(),
        ),
        (
            "one capsule",
            format!("/dashboard/capsules/cap_{}", capsule.simple()),
        ),
        (
            "one operation",
            format!("/dashboard/operations/op_{}", operation.simple()),
        ),
        ("queues", "/dashboard/queues".to_owned()),
        ("hosts", "/dashboard/hosts".to_owned()),
        // Baselines: the JSON API's own listings of the same rows, with the admin key.
        (
            "baseline: GET /v1/admin/capsules (JSON)",
            "/v1/admin/capsules".to_owned(),
        ),
        (
            "baseline: GET /v1/operations (JSON)",
            "/v1/operations".to_owned(),
        ),
    ];
    let mut samples = vec![Vec::with_capacity(args.samples); pages.len()];
    for _ in 0..args.samples {
        for (i, (_, path)) in pages.iter().enumerate() {
            let start = Instant::now();
            let response = cluster
                .http
                .get(format!("{}{path}", cluster.api_url))
                .header("cookie", &cookie)
                .bearer_auth(&cluster.admin_key)
                .send()
                .await?;
            ensure!(
                response.status().is_success(),
                "GET {path}: {}",
                response.status()
            );
            response.bytes().await?;
            samples[i].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    stats::latency_header(&format!(
        "dashboard pages: {} capsules, {} operations, page fetched with its session (HTML complete)",
        args.capsules,
        args.capsules * args.operations_per_capsule
    ));
    for ((name, _), samples) in pages.iter().zip(&samples) {
        stats::latency_row(name, samples, "");
    }
    Ok(())
}

/// Capsules in a spread of statuses, each with `operations_per_capsule` operations, mostly
/// finished, some failed and queued.
async fn seed(cluster: &Cluster, args: &DashboardArgs) -> anyhow::Result<()> {
    let mut tx = cluster.pool.begin().await?;
    sqlx::query(
        "insert into capsules (id, team_id, template_id, status, vcpus, memory_mb, timeout_sec,
                               expires_at, created_at)
         select gen_random_uuid(), t.team_id, t.id,
                (array['running','running','running','paused','stopped','error','starting',
                       'pausing'])[1 + n % 8],
                1, 128, 300, now() + interval '1 hour', now() - n * interval '1 second'
         from generate_series(1, $1) n,
              (select id, team_id from templates order by created_at limit 1) t",
    )
    .bind(args.capsules)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into operations (id, team_id, capsule_id, kind, status, generation, attempts,
                                 max_attempts, last_error, created_at, started_at, finished_at)
         select gen_random_uuid(), c.team_id, c.id,
                (array['create','pause','resume','snapshot','destroy'])[1 + k % 5],
                s.status, 1, 1, 5,
                case when s.status = 'failed' then 'host agent refused: Internal: injected' end,
                c.created_at + k * interval '1 second',
                c.created_at + k * interval '1 second',
                case when s.status in ('succeeded', 'failed')
                     then c.created_at + k * interval '1 second' + interval '5 ms' end
         from capsules c, generate_series(1, $1) k,
              lateral (select (array['succeeded','succeeded','succeeded','succeeded','succeeded',
                                     'succeeded','succeeded','succeeded','failed','queued'])
                              [1 + ((k + hashtext(c.id::text)) % 10 + 10) % 10] as status) s",
    )
    .bind(args.operations_per_capsule)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::query("analyze").execute(&cluster.pool).await?;
    Ok(())
}

/// Logs in with the cluster's admin key; returns the `Cookie` header of the session.
async fn login(cluster: &Cluster) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let response = client
        .post(format!("{}/dashboard/login", cluster.api_url))
        .form(&[("key", cluster.admin_key.as_str())])
        .send()
        .await?;
    let set = response
        .headers()
        .get("set-cookie")
        .context("no session cookie")?
        .to_str()?;
    Ok(set.split(';').next().unwrap_or_default().to_owned())
}
