//! Measurements on real VMs (128 MiB, 1 vCPU, TCG): run with
//! `cargo test -p hangar-agent --test qemu -- --ignored --nocapture measure`.

use super::*;

const RUNS: usize = 10;

/// Prints `p50 / min / max` of `samples` in milliseconds.
fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "{what:<40} n={:<3} p50 {:>8.1} ms  min {:>8.1} ms  max {:>8.1} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
    );
}

async fn timed<T, F: std::future::Future<Output = T>>(f: F) -> (T, Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}

#[tokio::test]
#[ignore = "takes about a minute of VM time; run with --ignored"]
async fn measure() {
    let Some(env) = vm_env() else { return };
    let _serial = VM_LOCK.lock().await;

    // Cold boots, on a driver of their own.
    let cold_dir = tempfile::tempdir().unwrap();
    let _kill_cold = KillGuard(cold_dir.path().to_owned());
    let (driver, _events) = open_driver(&env, cold_dir.path()).await;
    let mut cold = Vec::new();
    for _ in 0..RUNS {
        cold.push(driver.time_cold_boot(1, 128).await.unwrap());
    }
    drop(driver);

    let dir = tempfile::tempdir().unwrap();
    let _kill = KillGuard(dir.path().to_owned());
    let args = qemu_args(&env);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &args)).await;
    let mut c = agent.client().await;
    let (_, template) = timed(c.create_sandbox(agent.authed(create_from_image("cap_0")))).await;
    c.destroy_sandbox(agent.authed(sandbox("cap_0")))
        .await
        .unwrap();

    let (mut creates, mut first_exec, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let id = format!("cap_{}", i + 1);
        let (created, took) = timed(c.create_sandbox(agent.authed(create_from_image(&id)))).await;
        created.unwrap();
        creates.push(took);
        let (out, took) = timed(exec(&agent, &mut c, &id, &["true"])).await;
        assert_eq!(out.1, 0);
        first_exec.push(took);
        let pid = qemu_pids(dir.path())[0];
        rss.push(files::rss_kib(pid).unwrap());
        c.destroy_sandbox(agent.authed(sandbox(&id))).await.unwrap();
    }

    c.create_sandbox(agent.authed(create_from_image("cap_m")))
        .await
        .unwrap();
    let (mut execs, mut pauses, mut resumes, mut snapshots) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 * RUNS {
        let (out, took) = timed(exec(&agent, &mut c, "cap_m", &["true"])).await;
        assert_eq!(out.1, 0);
        execs.push(took);
    }
    let pid = qemu_pids(dir.path())[0];
    let rss_after_use = files::rss_kib(pid).unwrap();
    for _ in 0..RUNS {
        let (paused, took) = timed(c.pause_sandbox(agent.authed(sandbox("cap_m")))).await;
        paused.unwrap();
        pauses.push(took);
        let (resumed, took) = timed(c.resume_sandbox(agent.authed(sandbox("cap_m")))).await;
        resumed.unwrap();
        resumes.push(took);
    }
    for i in 0..RUNS {
        let snap = CreateSnapshotRequest {
            sandbox_id: "cap_m".into(),
            snapshot_id: format!("snap_{i}"),
            resume_after: true,
        };
        let (done, took) = timed(c.create_snapshot(agent.authed(snap))).await;
        let size = done.unwrap().into_inner().size_bytes;
        snapshots.push(took);
        if i == 0 {
            eprintln!("snapshot size on disk: {:.1} MiB", size as f64 / 1048576.0);
        }
        let delete = DeleteSnapshotRequest {
            snapshot_id: format!("snap_{i}"),
        };
        c.delete_snapshot(agent.authed(delete)).await.unwrap();
    }
    c.destroy_sandbox(agent.authed(sandbox("cap_m")))
        .await
        .unwrap();
    agent.stop().await;

    eprintln!("--- qemu driver, TCG, 128 MiB, 1 vCPU ---");
    eprintln!("first create (cold boot + template snapshot + restore): {template:?}");
    report("cold boot -> guest ready", &mut cold);
    report("create from template -> guest ready (gRPC)", &mut creates);
    report("first exec after create (gRPC)", &mut first_exec);
    report("exec `true` round trip (gRPC)", &mut execs);
    report("pause (gRPC)", &mut pauses);
    report("resume (gRPC)", &mut resumes);
    report("snapshot, resume_after (gRPC)", &mut snapshots);
    rss.sort();
    eprintln!(
        "host RSS per VM right after restore: p50 {} MiB, min {} MiB, max {} MiB; after {} execs: {} MiB",
        rss[rss.len() / 2] / 1024,
        rss[0] / 1024,
        rss[rss.len() - 1] / 1024,
        5 * RUNS,
        rss_after_use / 1024
    );
}
