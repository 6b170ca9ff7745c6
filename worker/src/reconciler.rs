//! The reconciler: an apalis-cron job that repairs whatever drifted. It ticks in every worker
//! process, but a per-tick key in Redis lets exactly one process run each tick cluster-wide.
//!
//! Level-triggered: each tick looks at the whole state again, so a missed tick or a crash
//! mid-tick loses nothing. Every repair is a conditional update; "already gone" is success.
//! A tick's queries are index scans whose cost does not grow with the fleet, except the
//! inventory sweep (every host's VMs against its capsules), which runs at its own, longer
//! interval (`inventory_interval_ms`).

use anyhow::Context as _;
use apalis::prelude::Data;
use apalis_cron::Tick;
use hangar_jobs::intents;
use hangar_jobs::store::records::{self, NewEvent};
use hangar_jobs::store::{Capsule, Host, StoreError, capsules, hosts, operations};
use hangar_jobs::{CapsuleId, CapsuleStatus, OperationKind, enqueue};
use hangar_proto::{ListSandboxesRequest, SandboxRef, SandboxState};
use serde_json::json;
use std::collections::HashSet;
use std::str::FromStr;
use tracing::{info, warn};

use crate::WorkerConfig;
use crate::context::JobContext;

/// The reconciler's schedule, parsed from the configuration.
pub fn schedule(config: &WorkerConfig) -> anyhow::Result<cron::Schedule> {
    cron::Schedule::from_str(&config.reconcile_schedule).with_context(|| {
        format!(
            "HANGAR_RECONCILE_SCHEDULE {:?} is not a cron schedule with seconds \
             (6 fields, e.g. \"*/2 * * * * *\" for every 2 s)",
            config.reconcile_schedule
        )
    })
}

/// The apalis-cron handler: every worker process gets every tick; the first to claim the
/// tick's key in Redis runs it, the others do nothing.
pub async fn run_tick(tick: Tick, ctx: Data<JobContext>) {
    match claim_tick(&ctx, tick.get_timestamp()).await {
        Ok(true) => {
            let inventory = take_turn(&ctx, "inventory", ctx.config.inventory_interval())
                .await
                .unwrap_or(false);
            let start = std::time::Instant::now();
            match tick_with(&ctx, inventory).await {
                Ok(repairs) => ctx.metrics.ticked(start.elapsed(), &repairs),
                Err(error) => warn!(%error, "reconciler tick failed; the next one retries"),
            }
        }
        Ok(false) => {}
        Err(error) => warn!(%error, "reconciler tick could not be claimed; the next one retries"),
    }
}

/// One process wins each tick: ticks of every process share their timestamps (seconds on
/// the schedule), so the tick's key is the same everywhere.
async fn claim_tick(ctx: &JobContext, timestamp: u64) -> redis::RedisResult<bool> {
    let mut conn = ctx.queue.connection();
    let won: Option<String> = redis::cmd("SET")
        .arg(format!(
            "{}:reconciler:tick:{timestamp}",
            ctx.queue.prefix()
        ))
        .arg(&ctx.worker)
        .arg("NX")
        .arg("EX")
        .arg(TICK_KEY_TTL_SECS)
        .query_async(&mut conn)
        .await?;
    Ok(won.is_some())
}

/// How long a tick's key outlives its tick: longer than any clock skew between workers.
const TICK_KEY_TTL_SECS: u64 = 300;

/// One process wins each turn of `what`: the lease lives slightly less than one interval.
async fn take_turn(
    ctx: &JobContext,
    what: &str,
    interval: std::time::Duration,
) -> redis::RedisResult<bool> {
    let ttl = interval.mul_f64(0.9).as_millis().max(1) as u64;
    let mut conn = ctx.queue.connection();
    let won: Option<String> = redis::cmd("SET")
        .arg(format!("{}:reconciler:{what}", ctx.queue.prefix()))
        .arg(&ctx.worker)
        .arg("NX")
        .arg("PX")
        .arg(ttl)
        .query_async(&mut conn)
        .await?;
    Ok(won.is_some())
}

/// Counts what one tick repaired, by kind.
#[derive(Debug, Default)]
pub struct Repairs {
    pub pushed: usize,
    pub hosts_unreachable: usize,
    pub capsules_unknown: usize,
    pub capsules_missing: usize,
    pub capsules_restored: usize,
    pub orphans_destroyed: usize,
    pub deadlines_settled: usize,
    pub auto_paused: usize,
}

impl Repairs {
    /// Each count with its name (the `kind` label of the repairs metric).
    pub fn by_kind(&self) -> [(&'static str, usize); 8] {
        [
            ("pushed", self.pushed),
            ("hosts_unreachable", self.hosts_unreachable),
            ("capsules_unknown", self.capsules_unknown),
            ("capsules_missing", self.capsules_missing),
            ("capsules_restored", self.capsules_restored),
            ("orphans_destroyed", self.orphans_destroyed),
            ("deadlines_settled", self.deadlines_settled),
            ("auto_paused", self.auto_paused),
        ]
    }
}

/// One reconciliation pass over everything, the inventory sweep included.
pub async fn tick(ctx: &JobContext) -> Result<Repairs, StoreError> {
    tick_with(ctx, true).await
}

/// One pass; the inventory sweep (every host's VMs against its capsules) only with
/// `inventory`, since its cost grows with the fleet.
async fn tick_with(ctx: &JobContext, inventory: bool) -> Result<Repairs, StoreError> {
    let mut repairs = Repairs::default();
    push_lost_jobs(ctx, &mut repairs).await?;
    mark_silent_hosts(ctx, &mut repairs).await?;
    if inventory {
        let hosts = {
            let mut conn = ctx.pool.acquire().await?;
            hosts::list(&mut conn).await?
        };
        for host in hosts.iter().filter(|h| h.status == "healthy") {
            if let Err(error) = reconcile_host(ctx, host, &mut repairs).await {
                warn!(%error, host = %host.name, "host reconciliation failed");
            }
        }
    }
    settle_deadlines(ctx, &mut repairs).await?;
    auto_pause(ctx, &mut repairs).await?;
    if repairs.by_kind().iter().any(|(_, n)| *n > 0) {
        info!(?repairs, "reconciler repaired drift");
    }
    Ok(repairs)
}

/// The outbox: operations whose push was lost, whose worker died, or whose job Redis lost
/// (a new epoch) go back on Redis. A healthy backlog is never pushed twice.
async fn push_lost_jobs(ctx: &JobContext, repairs: &mut Repairs) -> Result<(), StoreError> {
    let epoch = match ctx.queue.epoch().await {
        Ok(epoch) => epoch,
        Err(error) => {
            warn!(%error, "Redis unavailable; lost jobs are pushed once it is back");
            return Ok(());
        }
    };
    let mut conn = ctx.pool.acquire().await?;
    let lost = operations::needing_push(&mut conn, 1.0, &epoch, 5_000).await?;
    drop(conn);
    if !lost.is_empty() && enqueue::push_committed(&ctx.pool, &ctx.queue, &lost).await {
        repairs.pushed += lost.len();
    }
    Ok(())
}

/// Hosts silent too long become unreachable, and the capsules of every unreachable host
/// `unknown` (level-triggered: a tick that died half-way, or a move that lost a race, is
/// repaired by the next one).
async fn mark_silent_hosts(ctx: &JobContext, repairs: &mut Repairs) -> Result<(), StoreError> {
    let mut conn = ctx.pool.acquire().await?;
    for host in hosts::mark_silent_unreachable(&mut conn, ctx.config.host_silent_secs).await? {
        warn!(%host, "host stopped heartbeating; marked unreachable");
        repairs.hosts_unreachable += 1;
    }
    let unreachable: Vec<_> = hosts::list(&mut conn)
        .await?
        .into_iter()
        .filter(|h| h.status == "unreachable")
        .collect();
    for host in unreachable {
        for capsule in capsules::on_host(&mut conn, host.id).await? {
            if capsule.status.can_become(CapsuleStatus::Unknown)
                && move_capsule(ctx, &capsule, CapsuleStatus::Unknown, "host unreachable").await?
            {
                repairs.capsules_unknown += 1;
            }
        }
    }
    Ok(())
}

/// Compares what a host runs with what the database believes. The database is read first:
/// a capsule that is settled (running/paused) then had its VM before the host was listed.
async fn reconcile_host(
    ctx: &JobContext,
    host: &Host,
    repairs: &mut Repairs,
) -> Result<(), String> {
    let believed = {
        let mut conn = ctx.pool.acquire().await.map_err(|e| e.to_string())?;
        capsules::on_host(&mut conn, host.id)
            .await
            .map_err(|e| e.to_string())?
    };
    let mut agent = ctx.agents.client(host).map_err(|e| e.to_string())?;
    let listing = agent
        .list_sandboxes(ListSandboxesRequest {})
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let on_host: std::collections::HashMap<String, (SandboxState, i64)> = listing
        .sandboxes
        .iter()
        .map(|s| (s.sandbox_id.clone(), (s.state(), s.created_at_ms)))
        .collect();
    let grace = ctx.config.missing_grace();
    for capsule in &believed {
        let seen = on_host
            .get(&capsule.id.to_string())
            .map(|(state, _)| *state);
        let settled_for = chrono::Utc::now() - capsule.updated_at;
        let repair = match (capsule.status, seen) {
            (CapsuleStatus::Unknown, Some(SandboxState::Running)) => {
                Some((CapsuleStatus::Running, "host is back; VM running"))
            }
            (CapsuleStatus::Unknown, Some(SandboxState::Paused)) => {
                Some((CapsuleStatus::Paused, "host is back; VM paused"))
            }
            (CapsuleStatus::Unknown, _) => {
                Some((CapsuleStatus::Error, "host is back but the VM is gone"))
            }
            (CapsuleStatus::Running | CapsuleStatus::Paused, Some(SandboxState::Crashed)) => {
                Some((CapsuleStatus::Error, "the VM crashed on its host"))
            }
            (CapsuleStatus::Running | CapsuleStatus::Paused, None)
                if settled_for.to_std().unwrap_or_default() > grace =>
            {
                Some((CapsuleStatus::Error, "the VM is missing on its host"))
            }
            _ => None,
        };
        if let Some((to, reason)) = repair
            && !has_operation_in_flight(ctx, capsule.id)
                .await
                .map_err(|e| e.to_string())?
            && move_capsule(ctx, capsule, to, reason)
                .await
                .map_err(|e| e.to_string())?
        {
            if capsule.status == CapsuleStatus::Unknown && to != CapsuleStatus::Error {
                repairs.capsules_restored += 1;
            } else {
                repairs.capsules_missing += 1;
            }
        }
    }
    // VMs no live capsule owns, past the grace period, are destroyed. Ownership is read
    // after the listing, so a VM whose create is under way is owned (its row exists).
    let candidates: Vec<uuid::Uuid> = on_host
        .iter()
        .filter(|(_, (_, created))| now_ms - created > ctx.config.orphan_grace().as_millis() as i64)
        .filter_map(|(id, _)| id.parse::<CapsuleId>().ok().map(|c| c.0))
        .collect();
    let owned: HashSet<CapsuleId> = {
        let mut conn = ctx.pool.acquire().await.map_err(|e| e.to_string())?;
        capsules::live_ids(&mut conn, &candidates)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect()
    };
    for (sandbox_id, (_, created)) in &on_host {
        let owned_by_live = sandbox_id
            .parse::<CapsuleId>()
            .is_ok_and(|c| owned.contains(&c));
        let old_enough = now_ms - created > ctx.config.orphan_grace().as_millis() as i64;
        if owned_by_live || !old_enough {
            continue;
        }
        warn!(host = %host.name, %sandbox_id, "destroying a VM no capsule owns");
        agent
            .destroy_sandbox(SandboxRef {
                sandbox_id: sandbox_id.clone(),
            })
            .await
            .map_err(|e| e.message().to_owned())?;
        repairs.orphans_destroyed += 1;
    }
    Ok(())
}

/// Transient statuses past their deadline with nothing in flight move to `error`.
async fn settle_deadlines(ctx: &JobContext, repairs: &mut Repairs) -> Result<(), StoreError> {
    let mut conn = ctx.pool.acquire().await?;
    for capsule in capsules::past_deadline(&mut conn, 1_000).await? {
        let destroy = operations::destroy_in_flight(&mut conn, capsule.id).await?;
        if has_operation_in_flight(ctx, capsule.id).await?
            || (capsule.status == CapsuleStatus::Stopping && destroy.is_some())
        {
            continue;
        }
        let reason = format!("stuck in {} past its deadline", capsule.status);
        if move_capsule(ctx, &capsule, CapsuleStatus::Error, &reason).await? {
            repairs.deadlines_settled += 1;
            if let Some(destroy) = destroy {
                enqueue::push_committed(
                    &ctx.pool,
                    &ctx.queue,
                    &[(OperationKind::Destroy, destroy)],
                )
                .await;
            }
        }
    }
    Ok(())
}

/// Running capsules past their timeout are paused (an operation like any other).
async fn auto_pause(ctx: &JobContext, repairs: &mut Repairs) -> Result<(), StoreError> {
    let mut conn = ctx.pool.acquire().await?;
    for capsule in capsules::expired(&mut conn, 1_000).await? {
        let mut tx = ctx.pool.begin().await?;
        let params = json!({ "reason": "timeout" });
        match intents::capsule_operation(
            &mut tx,
            capsule,
            OperationKind::Pause,
            params,
            ctx.config.max_attempts,
        )
        .await
        {
            Ok(accepted) => {
                tx.commit().await?;
                enqueue::push_committed(
                    &ctx.pool,
                    &ctx.queue,
                    &[(OperationKind::Pause, accepted.operation.id)],
                )
                .await;
                repairs.auto_paused += 1;
            }
            // Someone acted on it meanwhile: nothing to do this tick.
            Err(intents::IntentError::Store(e)) => return Err(e),
            Err(_) => {}
        }
    }
    Ok(())
}

async fn has_operation_in_flight(ctx: &JobContext, capsule: CapsuleId) -> Result<bool, StoreError> {
    let mut conn = ctx.pool.acquire().await?;
    Ok(operations::in_flight(&mut conn, capsule).await?.is_some())
}

/// A conditional repair of one capsule, with its event. False if the capsule moved first.
async fn move_capsule(
    ctx: &JobContext,
    capsule: &Capsule,
    to: CapsuleStatus,
    reason: &str,
) -> Result<bool, StoreError> {
    let mut tx = ctx.pool.begin().await?;
    let Some(moved) = capsules::transition(
        &mut tx,
        capsule.id,
        capsule.status,
        capsule.generation,
        to,
        Some(reason),
    )
    .await?
    else {
        return Ok(false);
    };
    let event = records::insert_event(
        &mut tx,
        NewEvent {
            team_id: moved.team_id,
            capsule_id: Some(moved.id),
            operation_id: None,
            kind: "reconciled",
            from: Some(capsule.status),
            to: Some(to),
            message: Some(reason),
        },
    )
    .await?;
    tx.commit().await?;
    info!(capsule_id = %capsule.id, from = %capsule.status, %to, %reason, "reconciler moved a capsule");
    enqueue::publish_event(&ctx.queue, &event).await;
    Ok(true)
}
