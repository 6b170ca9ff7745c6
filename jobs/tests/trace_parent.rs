//! The request's `traceparent` travels with the operation row: whatever claims the
//! operation (the first attempt, a retry, a worker taking over after a re-push) reads it back.

use hangar_jobs::store::operations::{self, NewOperation};
use hangar_jobs::store::tenancy::PLATFORM_TEAM;
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{OperationId, OperationKind};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn insert(env: &TestEnv, trace_parent: Option<&str>) -> OperationId {
    let mut conn = env.pool.acquire().await.unwrap();
    let new = NewOperation {
        id: OperationId::new(),
        team_id: PLATFORM_TEAM,
        capsule_id: None,
        kind: OperationKind::HostEvent,
        generation: 0,
        max_attempts: 3,
        params: serde_json::json!({}),
        trace_parent: trace_parent.map(str::to_owned),
    };
    operations::insert(&mut conn, new).await.unwrap().id
}

#[tokio::test]
async fn every_claim_reads_back_the_stored_traceparent() {
    let env = TestEnv::new().await;
    let traced = insert(&env, Some(TRACEPARENT)).await;
    let untraced = insert(&env, None).await;
    let mut conn = env.pool.acquire().await.unwrap();

    let first = operations::claim(&mut conn, traced, "worker-a", 60.0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.trace_parent.as_deref(), Some(TRACEPARENT));
    // A second attempt by the lease holder: the same trace.
    let retry = operations::claim(&mut conn, traced, "worker-a", 60.0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retry.attempts, 2);
    assert_eq!(retry.trace_parent.as_deref(), Some(TRACEPARENT));
    // Another worker after the lease ran out (as after a re-push): still the same trace.
    sqlx::query("update operations set lease_expires_at = now() - interval '1 second'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let ids = [traced.0, untraced.0];
    let mut taken = operations::claim_many(&mut conn, &ids, "worker-b", 60.0)
        .await
        .unwrap();
    taken.sort_by_key(|op| op.id != traced);
    assert_eq!(taken.len(), 2);
    assert_eq!((taken[0].id, taken[0].attempts), (traced, 3));
    assert_eq!(taken[0].trace_parent.as_deref(), Some(TRACEPARENT));
    assert_eq!(taken[1].id, untraced);
    assert_eq!(taken[1].trace_parent, None, "untraced stays untraced");
}
