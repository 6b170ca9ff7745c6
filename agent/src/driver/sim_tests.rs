use tokio::sync::mpsc;

use super::*;

fn config(dir: &std::path::Path) -> SimConfig {
    SimConfig {
        state_dir: dir.to_owned(),
        vcpus: 4,
        memory_mb: 4096,
        latency_ms: 0,
        jitter_ms: 0,
        error_rate: 0.0,
        hang_rate: 0.0,
        crash_rate_per_min: 0.0,
    }
}

fn open(config: SimConfig) -> (SimDriver, mpsc::UnboundedReceiver<DriverEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (SimDriver::open(config, tx).unwrap(), rx)
}

fn spec(id: &str, vcpus: u32, memory_mb: u32) -> CreateSpec {
    CreateSpec {
        sandbox_id: id.to_owned(),
        vcpus,
        memory_mb,
        source: VmSource::Image("base".to_owned()),
    }
}

#[tokio::test]
async fn operations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(config(dir.path()));

    let first = sim.create(spec("cap_a", 1, 512)).await.unwrap();
    let second = sim.create(spec("cap_a", 2, 1024)).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(sim.list().await.unwrap().sandboxes.len(), 1);

    assert_eq!(sim.pause("cap_a").await.unwrap().state, VmState::Paused);
    assert_eq!(sim.pause("cap_a").await.unwrap().state, VmState::Paused);
    assert_eq!(sim.resume("cap_a").await.unwrap().state, VmState::Running);
    assert_eq!(sim.resume("cap_a").await.unwrap().state, VmState::Running);

    let snap = sim.snapshot("cap_a", "tpl_1", false).await.unwrap();
    assert_eq!(snap.size_bytes, 512 * 1024 * 1024);
    assert!(sim.destroy("cap_a").await.unwrap());
    assert!(!sim.destroy("cap_a").await.unwrap());
    // A retried snapshot-then-destroy still finds its snapshot.
    assert_eq!(sim.snapshot("cap_a", "tpl_1", false).await.unwrap(), snap);
    assert!(matches!(
        sim.snapshot("cap_other", "tpl_1", false).await,
        Err(DriverError::Invalid(_))
    ));

    assert!(sim.delete_snapshot("tpl_1").await.unwrap());
    assert!(!sim.delete_snapshot("tpl_1").await.unwrap());
}

#[tokio::test]
async fn snapshot_leaves_paused_unless_resumed_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(config(dir.path()));
    sim.create(spec("cap_a", 1, 256)).await.unwrap();
    sim.snapshot("cap_a", "tpl_p", false).await.unwrap();
    assert_eq!(
        sim.list().await.unwrap().sandboxes[0].state,
        VmState::Paused
    );
    sim.snapshot("cap_a", "tpl_r", true).await.unwrap();
    assert_eq!(
        sim.list().await.unwrap().sandboxes[0].state,
        VmState::Running
    );

    let mut restore = spec("cap_b", 1, 256);
    restore.source = VmSource::Snapshot("tpl_p".to_owned());
    assert_eq!(
        sim.create(restore.clone()).await.unwrap().state,
        VmState::Running
    );
    restore.sandbox_id = "cap_c".to_owned();
    restore.source = VmSource::Snapshot("tpl_missing".to_owned());
    assert!(matches!(
        sim.create(restore).await,
        Err(DriverError::NotFound {
            kind: "snapshot",
            ..
        })
    ));
}

#[tokio::test]
async fn wrong_state_and_missing_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, mut events) = open(config(dir.path()));
    assert!(matches!(
        sim.pause("cap_x").await,
        Err(DriverError::NotFound { .. })
    ));
    assert!(matches!(
        sim.snapshot("cap_x", "tpl", false).await,
        Err(DriverError::NotFound { .. })
    ));

    sim.create(spec("cap_a", 1, 256)).await.unwrap();
    sim.inner.crash_some(1.0);
    let event = events.recv().await.unwrap();
    assert_eq!(
        (event.sandbox_id.as_str(), event.kind),
        ("cap_a", EventKind::Crashed)
    );
    let usage = sim.usage().await.unwrap();
    assert_eq!(
        (usage.vcpus_used, usage.memory_mb_used, usage.sandboxes),
        (0, 0, 1),
        "a crashed VM holds no capacity but is still listed"
    );

    fn wrong<T>(r: Result<T, DriverError>) -> bool {
        matches!(
            r,
            Err(DriverError::WrongState {
                current: VmState::Crashed,
                ..
            })
        )
    }
    assert!(wrong(sim.pause("cap_a").await));
    assert!(wrong(sim.resume("cap_a").await));
    assert!(wrong(sim.snapshot("cap_a", "tpl", false).await));
    assert!(sim.destroy("cap_a").await.unwrap());
}

#[tokio::test]
async fn capacity_is_enforced_and_freed() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(config(dir.path()));
    sim.create(spec("cap_a", 3, 1024)).await.unwrap();
    assert!(matches!(
        sim.create(spec("cap_b", 2, 1024)).await,
        Err(DriverError::CapacityExhausted(_))
    ));
    assert!(matches!(
        sim.create(spec("cap_b", 1, 4000)).await,
        Err(DriverError::CapacityExhausted(_))
    ));
    sim.create(spec("cap_b", 1, 3072)).await.unwrap();
    let usage = sim.usage().await.unwrap();
    assert_eq!(
        (usage.vcpus_used, usage.memory_mb_used, usage.sandboxes),
        (4, 4096, 2)
    );
    sim.destroy("cap_a").await.unwrap();
    sim.create(spec("cap_c", 2, 512)).await.unwrap();
    drop(sim);
    // What the VMs hold is rebuilt from the records after a restart.
    let (sim, _events) = open(config(dir.path()));
    let usage = sim.usage().await.unwrap();
    assert_eq!(
        (usage.vcpus_used, usage.memory_mb_used, usage.sandboxes),
        (3, 3584, 2)
    );
    assert!(matches!(
        sim.create(spec("cap_d", 0, 512)).await,
        Err(DriverError::Invalid(_))
    ));
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(config(dir.path()));
    sim.create(spec("cap_a", 1, 256)).await.unwrap();
    sim.create(spec("cap_b", 1, 256)).await.unwrap();
    sim.pause("cap_b").await.unwrap();
    sim.snapshot("cap_a", "tpl_1", true).await.unwrap();
    let before = sim.list().await.unwrap();
    drop(sim);

    let (sim, _events) = open(config(dir.path()));
    assert_eq!(sim.list().await.unwrap(), before);
    assert_eq!(before.snapshot_ids, ["tpl_1"]);
}

#[tokio::test]
async fn corrupt_state_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sim.json"), b"{not json").unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    assert!(matches!(
        SimDriver::open(config(dir.path()), tx),
        Err(DriverError::Internal(_))
    ));
}

#[tokio::test]
async fn error_rate_one_fails_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(SimConfig {
        error_rate: 1.0,
        ..config(dir.path())
    });
    for _ in 0..10 {
        assert!(matches!(
            sim.create(spec("cap_a", 1, 256)).await,
            Err(DriverError::Unavailable(_))
        ));
        assert!(matches!(sim.list().await, Err(DriverError::Unavailable(_))));
    }
    // Heartbeats keep working.
    assert!(sim.usage().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn hang_rate_one_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(SimConfig {
        hang_rate: 1.0,
        ..config(dir.path())
    });
    let call = tokio::time::timeout(Duration::from_secs(60), sim.list()).await;
    assert!(call.is_err());
}

#[tokio::test]
async fn invalid_rates_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let bad = SimConfig {
        error_rate: 1.5,
        ..config(dir.path())
    };
    assert!(matches!(
        SimDriver::open(bad, tx),
        Err(DriverError::Invalid(_))
    ));
}

#[tokio::test]
async fn exec_echoes_in_running_sandboxes_only() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, _events) = open(config(dir.path()));
    let echo = |words: &[&str], max: u64| ExecRequest {
        argv: words.iter().map(|w| w.to_string()).collect(),
        timeout: std::time::Duration::from_secs(1),
        max_output_bytes: max,
        ..ExecRequest::default()
    };
    assert!(matches!(
        sim.exec("cap_a", echo(&["echo", "hi"], 64)).await,
        Err(DriverError::NotFound { .. })
    ));
    sim.create(spec("cap_a", 1, 256)).await.unwrap();
    let out = sim
        .exec("cap_a", echo(&["echo", "hi", "there"], 64))
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.exit_code),
        (&b"hi there\n"[..], 0)
    );
    let out = sim
        .exec("cap_a", echo(&["echo", "hello"], 3))
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stdout_truncated),
        (&b"hel"[..], true)
    );
    let out = sim.exec("cap_a", echo(&["ls"], 64)).await.unwrap();
    assert_eq!(out.exit_code, 127);
    sim.pause("cap_a").await.unwrap();
    assert!(matches!(
        sim.exec("cap_a", echo(&["echo"], 64)).await,
        Err(DriverError::WrongState { .. })
    ));
}
