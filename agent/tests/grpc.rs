//! The `HostAgent` service over real gRPC, against the sim driver.

mod common;

use common::{TestAgent, config};
use hangar_proto::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, GetHostInfoRequest,
    ListSandboxesRequest, SandboxRef, SandboxState,
};
use tonic::Code;

/// No control plane listens here; registration just keeps retrying in the background.
const NO_CONTROL_PLANE: &str = "http://127.0.0.1:9";

fn create(id: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: id.into(),
        vcpus: 1,
        memory_mb: 256,
        image: "base".into(),
        snapshot_id: String::new(),
        generation: 1,
    }
}

fn sandbox(id: &str) -> SandboxRef {
    SandboxRef {
        sandbox_id: id.into(),
    }
}

#[tokio::test]
async fn calls_without_the_agent_token_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &[])).await;
    let mut client = agent.client().await;

    let err = client
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut wrong = tonic::Request::new(create("cap_a"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-token".parse().unwrap());
    assert_eq!(
        client.create_sandbox(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let listed = client
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap();
    assert!(
        listed.into_inner().sandboxes.is_empty(),
        "the rejected create must not have run"
    );
    agent.stop().await;
}

#[tokio::test]
async fn create_and_destroy_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &[])).await;
    let mut client = agent.client().await;

    let first = client
        .create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(first.state(), SandboxState::Running);
    let listed = client
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap();
    assert_eq!(listed.into_inner().sandboxes.len(), 1);

    let gone = client
        .destroy_sandbox(agent.authed(sandbox("cap_a")))
        .await
        .unwrap();
    assert!(gone.into_inner().existed);
    let again = client
        .destroy_sandbox(agent.authed(sandbox("cap_a")))
        .await
        .unwrap();
    assert!(!again.into_inner().existed);
    let never = client
        .destroy_sandbox(agent.authed(sandbox("cap_never")))
        .await
        .unwrap();
    assert!(!never.into_inner().existed);
    agent.stop().await;
}

#[tokio::test]
async fn pause_resume_snapshot_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &[])).await;
    let mut c = agent.client().await;

    c.create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap();
    for _ in 0..2 {
        let paused = c
            .pause_sandbox(agent.authed(sandbox("cap_a")))
            .await
            .unwrap();
        assert_eq!(paused.into_inner().state(), SandboxState::Paused);
    }
    let resumed = c
        .resume_sandbox(agent.authed(sandbox("cap_a")))
        .await
        .unwrap();
    assert_eq!(resumed.into_inner().state(), SandboxState::Running);

    let snap_req = || CreateSnapshotRequest {
        sandbox_id: "cap_a".into(),
        snapshot_id: "tpl_a".into(),
        resume_after: false,
    };
    let snap = c
        .create_snapshot(agent.authed(snap_req()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (snap.snapshot_id.as_str(), snap.sandbox_id.as_str()),
        ("tpl_a", "cap_a")
    );
    let again = c
        .create_snapshot(agent.authed(snap_req()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap, again);

    let listed = c
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.snapshot_ids, ["tpl_a"]);
    assert_eq!(listed.sandboxes[0].state(), SandboxState::Paused);

    let restore = CreateSandboxRequest {
        snapshot_id: "tpl_a".into(),
        ..create("cap_b")
    };
    let restored = c
        .create_sandbox(agent.authed(restore))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.state(), SandboxState::Running);
    let missing = CreateSandboxRequest {
        snapshot_id: "tpl_missing".into(),
        ..create("cap_c")
    };
    let err = c.create_sandbox(agent.authed(missing)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let del = |id: &str| {
        agent.authed(DeleteSnapshotRequest {
            snapshot_id: id.into(),
        })
    };
    assert!(
        c.delete_snapshot(del("tpl_a"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !c.delete_snapshot(del("tpl_a"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );

    let info = c
        .get_host_info(agent.authed(GetHostInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.driver, "sim");
    assert_eq!(info.host_name, format!("host-{}", agent.addr.port()));
    assert_eq!(
        (info.sandboxes, info.vcpus_used, info.memory_mb_used),
        (2, 2, 512)
    );
    assert_eq!((info.vcpus_total, info.memory_mb_total), (64, 262_144));
    agent.stop().await;
}

#[tokio::test]
async fn errors_carry_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &["--vcpus", "2"])).await;
    let mut c = agent.client().await;

    let err = c
        .pause_sandbox(agent.authed(sandbox("cap_missing")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .create_sandbox(agent.authed(create("../etc")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let big = CreateSandboxRequest {
        vcpus: 3,
        ..create("cap_big")
    };
    let err = c.create_sandbox(agent.authed(big)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    agent.stop().await;
}

#[tokio::test]
async fn error_rate_one_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(
        dir.path(),
        NO_CONTROL_PLANE,
        &["--sim-error-rate", "1.0"],
    ))
    .await;
    let mut c = agent.client().await;
    for _ in 0..5 {
        let err = c
            .create_sandbox(agent.authed(create("cap_a")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        let err = c
            .list_sandboxes(agent.authed(ListSandboxesRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
    agent.stop().await;
}

#[tokio::test]
async fn a_restarted_agent_keeps_its_sandboxes_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &[])).await;
    let mut c = agent.client().await;
    c.create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap();
    c.pause_sandbox(agent.authed(sandbox("cap_a")))
        .await
        .unwrap();
    let token = agent.token.clone();
    agent.stop().await;

    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &[])).await;
    assert_eq!(agent.token, token);
    let mut c = agent.client().await;
    let listed = c
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 1);
    assert_eq!(listed.sandboxes[0].state(), SandboxState::Paused);
    agent.stop().await;
}
