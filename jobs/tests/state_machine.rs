//! Drives random sequences of transitions through the real conditional update in Postgres
//! and checks that the table is never violated, stale generations never win, and every
//! accepted transition bumps the generation by one.

use hangar_jobs::store::StoreError;
use hangar_jobs::store::capsules::{self, NewCapsule};
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{CapsuleId, CapsuleStatus};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Step {
    to: CapsuleStatus,
    stale: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (0..CapsuleStatus::ALL.len(), proptest::bool::weighted(0.2)).prop_map(|(i, stale)| Step {
        to: CapsuleStatus::ALL[i],
        stale,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn conditional_transitions_follow_the_table(steps in proptest::collection::vec(step(), 1..40)) {
        RUNTIME.block_on(async move {
            let env = shared_env().await;
            let mut conn = env.pool.acquire().await.unwrap();
            let template = tenancy::template_for_team(&mut conn, PLATFORM_TEAM, "base").await.unwrap().unwrap();
            let capsule = capsules::insert(&mut conn, NewCapsule {
                id: CapsuleId::new(),
                team_id: PLATFORM_TEAM,
                template_id: template.id,
                vcpus: 1,
                memory_mb: 128,
                timeout_sec: 60,
                metadata: serde_json::json!({}),
            }).await.unwrap();
            let (mut status, mut generation) = (capsule.status, capsule.generation);
            for Step { to, stale } in steps {
                let asked_generation = if stale { generation - 1 } else { generation };
                let result = capsules::transition(&mut conn, capsule.id, status, asked_generation, to, None).await;
                match result {
                    Err(StoreError::TransitionNotAllowed { .. }) => assert!(!status.can_become(to)),
                    Err(e) => panic!("database error: {e}"),
                    Ok(None) => assert!(stale, "a current transition {status} -> {to} was refused"),
                    Ok(Some(moved)) => {
                        assert!(status.can_become(to), "{status} -> {to} is not in the table");
                        assert!(!stale, "a stale generation won");
                        assert_eq!(moved.generation, generation + 1);
                        assert_eq!(moved.status, to);
                        assert_eq!(moved.status_deadline.is_some(), to.is_transient());
                        status = to;
                        generation = moved.generation;
                    }
                }
                let stored = capsules::get(&mut conn, None, capsule.id).await.unwrap().unwrap();
                assert_eq!((stored.status, stored.generation), (status, generation));
            }
        });
    }
}

/// One runtime for every case: the pool's connections belong to the runtime that made them.
static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
});

/// One migrated database for every case (each case makes its own capsule).
async fn shared_env() -> &'static TestEnv {
    static ENV: tokio::sync::OnceCell<TestEnv> = tokio::sync::OnceCell::const_new();
    ENV.get_or_init(TestEnv::new).await
}
