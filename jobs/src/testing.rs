//! Test support (feature `testing`): a fresh database and a private Redis namespace per
//! test, on the servers the test command started (`HANGAR_TEST_DATABASE_URL`,
//! `HANGAR_TEST_REDIS_URL`), so tests run in parallel without seeing each other.

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::queue::JobQueue;
use crate::store::{self, PgPool};

pub struct TestEnv {
    pub pool: PgPool,
    pub queue: JobQueue,
    pub database_url: String,
    pub redis_url: String,
}

fn server_url() -> String {
    std::env::var("HANGAR_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://hangar@127.0.0.1:5433/hangar".into())
}

pub fn redis_url() -> String {
    std::env::var("HANGAR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6380".into())
}

impl TestEnv {
    /// A migrated database of its own and a Redis key prefix of its own.
    pub async fn new() -> TestEnv {
        let suffix = crate::keys::random_hex(6);
        let server: PgConnectOptions = server_url().parse().expect("HANGAR_TEST_DATABASE_URL");
        let mut admin = sqlx::PgConnection::connect_with(&server.clone().database("postgres"))
            .await
            .expect("connect to the test Postgres (is ops/test.sh running it?)");
        let name = format!("test_{suffix}");
        // The name is ours (hex digits only), so building the statement is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let options = server.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options)
            .await
            .expect("connect to test database");
        store::migrate(&pool).await.expect("migrate");
        let redis_url = redis_url();
        let queue = JobQueue::connect(&redis_url, &format!("test-{suffix}"))
            .await
            .expect("connect to the test Redis");
        queue.ensure_groups().await.expect("create consumer groups");
        let database_url = {
            let base = server_url();
            match base.rsplit_once('/') {
                Some((head, _)) => format!("{head}/{name}"),
                None => base,
            }
        };
        TestEnv {
            pool,
            queue,
            database_url,
            redis_url,
        }
    }
}
