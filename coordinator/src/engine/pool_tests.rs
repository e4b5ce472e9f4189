//! The slot pool's rules (`engine::pool`) in virtual time: growth through
//! the batch system, adoption by a lease (never twice, also across a
//! restart), bind then start, unbind at the lease's end, the idle timeout,
//! `max_share`, the walltime a slot has left, a refused bind, and pool
//! pilots that go while idle.

use super::*;
use crate::config::User;
use crate::engine::pool::{PoolSlotState, PoolView};
use protocol::pilot::{ReservationChange, ReservationCommand};

/// A day: pool pilots hold their nodes this long.
const WALLTIME_S: u64 = 24 * 3600;

fn pool_config(cfg: &mut Config) {
    cfg.pool.min_idle_nodes = 1;
    cfg.pool.max_nodes = Some(3);
    cfg.pool.walltime_s = WALLTIME_S;
    cfg.pool.idle_timeout_s = 600;
    cfg.users = vec![User {
        name: "tester".into(),
        token_sha256: protocol::auth::token_hash("t"),
        admin: true,
        max_urgency: 2,
        ..User::default()
    }];
}

fn pool_view(rig: &Rig) -> PoolView {
    rig.engine.pool_view(&admin()).expect("pool view")
}

fn count(v: &PoolView, state: PoolSlotState) -> usize {
    v.slots.iter().filter(|s| s.state == state).count()
}

fn jobs(rig: &Rig) -> usize {
    rig.lrm.jobs.lock().expect("lock").len()
}

fn change(reserved_mb: u64, deadline_ms: u64) -> ReservationChange {
    ReservationChange {
        reserved_mb,
        dom0_before_mb: 4096,
        dom0_after_mb: 4096 - reserved_mb,
        balloon_ms: 2,
        deadline_ms,
    }
}

/// The pool pilot of `slot` starts on `node` and reserves, idle, until `deadline_ms`.
fn idle_pilot(rig: &Rig, slot: &SlotId, node: &str, deadline_ms: u64) {
    rig.send(slot, node, started()).expect("started");
    let reserved = EventKind::Reserved {
        dom0_before_mb: 4096,
        dom0_after_mb: 4096,
        reserved_mb: 0,
        balloon_ms: 0,
        cached_images: Vec::new(),
        checkpoints: None,
        deadline_ms: Some(deadline_ms),
        idle: true,
        cpu_control: None,
    };
    rig.send(slot, node, reserved).expect("reserved");
}

/// Runs the tick and brings every growing pool slot up as an idle pilot on
/// its own node (`p1`, `p2`, ... in order); returns the idle slots and nodes.
async fn grow(rig: &Rig) -> Vec<(SlotId, String)> {
    rig.engine.housekeeping(false).await;
    let deadline = rig.clock.now_ms() + WALLTIME_S * 1000 - 5_000;
    let v = pool_view(rig);
    let taken: Vec<String> = v.slots.iter().filter_map(|s| s.node.clone()).collect();
    let mut n = taken.len();
    for s in v.slots.iter().filter(|s| s.state == PoolSlotState::Growing) {
        n += 1;
        idle_pilot(rig, &s.slot_id, &format!("p{n}"), deadline);
    }
    pool_view(rig)
        .slots
        .into_iter()
        .filter(|s| s.state == PoolSlotState::Idle)
        .map(|s| (s.slot_id, s.node.expect("a node")))
        .collect()
}

async fn urgent_lease(rig: &Rig, urgency: u8, vms: u32, duration_s: u64) -> WorkspaceView {
    let spec = format!(
        "name = \"u\"\nduration = {duration_s}\nurgency = {urgency}\n[[group]]\nname = \"g\"\ncount = {vms}\nmemory_mb = 512\nimage = \"i\"\n"
    );
    let spec = WorkspaceSpec::parse(&spec).expect("spec");
    rig.engine.create(&admin(), spec).await.expect("created")
}

/// The pilot of a bound pool slot answers its `bind` and starts what it is told.
fn bind_and_start(rig: &Rig, ws: &WorkspaceView, slot: &SlotId, node: &str) -> Vec<CommandKind> {
    let cmds = rig.commands(slot, node);
    assert!(
        cmds.iter().any(|c| matches!(c, CommandKind::Bind { workspace_id, memory_mb: 512 } if *workspace_id == ws.id)),
        "{cmds:?}"
    );
    let deadline = rig.clock.now_ms() + 3_600_000;
    let bound = EventKind::Bound {
        workspace_id: ws.id.clone(),
        reservation: change(512, deadline),
    };
    rig.send(slot, node, bound).expect("bound");
    let mut seen = cmds;
    for c in rig.commands(slot, node) {
        if let CommandKind::StartVm(l) = &c {
            let kind = EventKind::VmStarted {
                vm_id: l.vm_id.clone(),
                name: l.name.clone(),
                create_ms: 5,
                stage_ms: None,
                cache_hit: None,
                warm: None,
            };
            rig.send(slot, node, kind).expect("vm started");
        }
        seen.push(c);
    }
    seen
}

#[tokio::test]
async fn the_pool_grows_to_min_idle_through_the_batch_system_and_stays_hidden() {
    let rig = Rig::with(|c| {
        pool_config(c);
        c.pool.min_idle_nodes = 2;
    });
    assert_eq!(jobs(&rig), 0);
    rig.engine.pool_tick().await.expect("pool tick");
    assert_eq!(jobs(&rig), 2, "two pool jobs submitted");
    let v = pool_view(&rig);
    assert_eq!(count(&v, PoolSlotState::Growing), 2, "{v:?}");
    // Submitted once, not again on the next tick.
    rig.engine.housekeeping(false).await;
    assert_eq!(jobs(&rig), 2);
    let idle = grow(&rig).await;
    assert_eq!(idle.len(), 2);
    let c = rig.engine.pool_counts().expect("counts");
    assert_eq!((c.idle, c.bound, c.growing, c.draining), (2, 0, 0, 0));
    // Pool pilots are started with --pool and the idle memory.
    let holder = rig
        .engine
        .with_store(|s| Ok(crate::store::get_slot(s.conn(), &idle[0].0)?))
        .expect("slot")
        .expect("a slot row");
    let argv = rig
        .engine
        .pilot_argv(&holder, std::path::Path::new("/k"), Duration::from_secs(60));
    assert!(argv.contains(&"--pool".to_string()), "{argv:?}");
    // The holder is nobody's workspace: not listed, not counted.
    assert!(rig.engine.list(&admin()).expect("list").is_empty());
    assert_eq!(
        rig.engine.unsettled().expect("unsettled"),
        1,
        "the pool holds slots"
    );
}

#[tokio::test]
async fn an_urgent_lease_adopts_an_idle_slot_binds_starts_and_unbinds_at_its_end() {
    let rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    assert_eq!(idle.len(), 1);
    let (slot, node) = idle[0].clone();
    let before = jobs(&rig);

    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    assert_eq!(
        jobs(&rig),
        before,
        "no batch job for a lease the pool serves"
    );
    assert_eq!(ws.slots.len(), 1);
    assert_eq!(ws.slots[0].id, slot, "the pool slot is the lease's now");
    assert_eq!(ws.state, WorkspaceState::Pending);
    let cmds = bind_and_start(&rig, &ws, &slot, &node);
    let start = cmds
        .iter()
        .find_map(|c| match c {
            CommandKind::StartVm(l) => Some(l.clone()),
            _ => None,
        })
        .expect("start_vm after bound");
    assert!(
        start.name.starts_with(&format!("wsp-{slot}-")),
        "{}",
        start.name
    );
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Running, "{v:?}");
    let d = details(&rig, &ws).await;
    assert!(
        d.iter()
            .any(|(_, t)| t.contains(&format!("from idle pool slot {slot} on node {node}"))),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|(_, t)| t.contains("urgency 1, from idle pool slots")),
        "{d:?}"
    );
    let v = pool_view(&rig);
    assert_eq!(count(&v, PoolSlotState::Bound), 1);
    assert_eq!(v.slots[0].bound_to.as_ref(), Some(&ws.id));
    // The pool grows back to one idle slot.
    rig.engine.housekeeping(false).await;
    assert_eq!(jobs(&rig), before + 1);

    // The lease's end unbinds: the slot's batch job goes on.
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    let cmds = rig.commands(&slot, &node);
    assert!(
        cmds.iter().any(|c| matches!(c, CommandKind::Unbind { workspace_id, memory_mb: 0 } if *workspace_id == ws.id)),
        "{cmds:?}"
    );
    assert!(!cmds.contains(&CommandKind::Release), "{cmds:?}");
    assert!(
        !rig.view(&ws.id).settled,
        "not settled before the slot is unbound"
    );
    let vm = v.slots[0].clone();
    assert_eq!(vm.phase, "bound");
    rig.send(
        &slot,
        &node,
        EventKind::Unbound {
            workspace_id: ws.id.clone(),
            vms_destroyed: vec![start.vm_id.clone()],
            reservation: change(0, rig.clock.now_ms() + 3_000_000),
        },
    )
    .expect("unbound");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Destroyed, "{v:?}");
    assert!(
        v.vms.iter().all(|vm| vm.state == VmState::Destroyed),
        "{v:?}"
    );
    assert!(v.settled, "{v:?}");
    let p = pool_view(&rig);
    let back = p
        .slots
        .iter()
        .find(|s| s.slot_id == slot)
        .expect("still in the pool");
    assert_eq!(back.state, PoolSlotState::Idle);
    assert_eq!(back.leases, 1);
    assert!(
        rig.lrm.state("1").is_some_and(|s| s == JobState::Queued),
        "the pool job was not cancelled"
    );
}

#[tokio::test]
async fn urgency_0_leaves_min_idle_slots_for_urgent_leases() {
    let rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    assert_eq!(idle.len(), 1);
    let before = jobs(&rig);
    let ws = rig.lease(1, 3600).await;
    assert_eq!(jobs(&rig), before + 1, "through the batch system");
    assert_ne!(ws.slots[0].id, idle[0].0);
    let d = details(&rig, &ws).await;
    assert!(
        d.iter()
            .any(|(_, t)| t.contains("through the batch system")
                && t.contains("kept for urgent leases")),
        "{d:?}"
    );
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}

#[tokio::test]
async fn a_slot_is_never_adopted_twice_also_across_a_restart() {
    let mut rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    let (slot, node) = idle[0].clone();
    let first = urgent_lease(&rig, 2, 1, 3600).await;
    assert_eq!(first.slots[0].id, slot);
    let before = jobs(&rig);
    let second = urgent_lease(&rig, 2, 1, 3600).await;
    assert_ne!(
        second.slots[0].id, slot,
        "the bound slot is not taken again"
    );
    assert_eq!(
        jobs(&rig),
        before + 1,
        "the second goes through the batch system"
    );

    rig.restart();
    let v = pool_view(&rig);
    let bound = v.slots.iter().find(|s| s.slot_id == slot).expect("kept");
    assert_eq!(bound.state, PoolSlotState::Bound);
    assert_eq!(bound.bound_to.as_ref(), Some(&first.id));
    let before = jobs(&rig);
    let third = urgent_lease(&rig, 2, 1, 3600).await;
    assert_ne!(third.slots[0].id, slot);
    assert_eq!(jobs(&rig), before + 1);
    // The first lease goes on after the restart: bound, started, running.
    bind_and_start(&rig, &first, &slot, &node);
    assert_eq!(rig.view(&first.id).state, WorkspaceState::Running);
}

#[tokio::test]
async fn idle_slots_survive_a_restart_and_are_adopted_after_it() {
    let mut rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    rig.restart();
    let v = pool_view(&rig);
    assert_eq!(count(&v, PoolSlotState::Idle), 1, "{v:?}");
    rig.engine.housekeeping(false).await;
    assert_eq!(
        jobs(&rig),
        1,
        "no second pool job: the idle slot is still there"
    );
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    assert_eq!(ws.slots[0].id, idle[0].0);
}

#[tokio::test]
async fn a_lease_longer_than_the_slots_remaining_walltime_goes_through_the_batch_system() {
    let rig = Rig::with(pool_config);
    grow(&rig).await;
    let before = jobs(&rig);
    // The slot holds its node for a day less 5 s; a day's lease does not fit.
    let ws = urgent_lease(&rig, 1, 1, WALLTIME_S).await;
    assert_eq!(jobs(&rig), before + 1);
    let d = details(&rig, &ws).await;
    assert!(
        d.iter().any(|(_, t)| t.contains("remaining walltime")),
        "{d:?}"
    );
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}

#[tokio::test]
async fn a_slot_idle_past_the_timeout_is_given_back_while_more_than_min_are_idle() {
    // Pilots long-poll all along; here they stay quiet for an idle hour.
    let rig = Rig::with(|c| {
        pool_config(c);
        c.pilot_silence_s = 100_000;
    });
    let idle = grow(&rig).await;
    let (slot, node) = idle[0].clone();
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    bind_and_start(&rig, &ws, &slot, &node);
    let second = grow(&rig).await;
    assert_eq!(second.len(), 1);
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    rig.commands(&slot, &node);
    rig.send(
        &slot,
        &node,
        EventKind::Unbound {
            workspace_id: ws.id.clone(),
            vms_destroyed: Vec::new(),
            reservation: change(0, rig.clock.now_ms() + 3_000_000),
        },
    )
    .expect("unbound");
    let v = pool_view(&rig);
    assert_eq!(count(&v, PoolSlotState::Idle), 2, "{v:?}");

    // Before the timeout nothing happens.
    rig.clock.advance(599_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 2);
    rig.clock.advance(2_000);
    rig.engine.housekeeping(false).await;
    let v = pool_view(&rig);
    assert_eq!(count(&v, PoolSlotState::Idle), 1, "{v:?}");
    assert_eq!(count(&v, PoolSlotState::Draining), 1, "{v:?}");
    // The longest idle one goes: the one grown first, idle since the start.
    let (gone, gone_node) = if v
        .slots
        .iter()
        .any(|s| s.slot_id == slot && s.state == PoolSlotState::Draining)
    {
        (slot.clone(), node.clone())
    } else {
        second[0].clone()
    };
    assert!(rig
        .commands(&gone, &gone_node)
        .contains(&CommandKind::Release));
    // Still above min idle? No: one is idle, min is one; nothing more goes.
    rig.clock.advance(3_600_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
    rig.send(&gone, &gone_node, released(ReleaseReason::Commanded))
        .expect("released");
    let v = pool_view(&rig);
    assert_eq!(v.slots.len(), 1, "{v:?}");
    let jobs_now = jobs(&rig);
    rig.engine.housekeeping(false).await;
    assert_eq!(jobs(&rig), jobs_now, "min idle is met: no growth");
}

#[tokio::test]
async fn the_pool_stays_within_max_share_of_the_cluster() {
    // 8 nodes, a quarter of them: 2, though max_nodes says 5.
    let rig = Rig::with(|c| {
        pool_config(c);
        c.pool.min_idle_nodes = 2;
        c.pool.max_nodes = Some(5);
        c.pool.max_share = 0.25;
    });
    let idle = grow(&rig).await;
    assert_eq!(idle.len(), 2);
    let (slot, node) = idle[0].clone();
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    bind_and_start(&rig, &ws, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(jobs(&rig), 2, "one idle, one bound: the share is full");
    let c = rig.engine.pool_counts().expect("counts");
    assert_eq!((c.idle, c.bound, c.growing), (1, 1, 0));
}

#[tokio::test]
async fn a_pool_pilot_preempted_while_idle_leaves_the_pool_and_the_pool_grows_again() {
    let rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    let (slot, node) = idle[0].clone();
    rig.send(&slot, &node, preempting(rig.clock.now_ms()))
        .expect("preempting");
    rig.send(&slot, &node, released(ReleaseReason::Preempted))
        .expect("released");
    let v = pool_view(&rig);
    assert!(v.slots.is_empty(), "{v:?}");
    // The holder went on: it takes new slots.
    rig.engine.housekeeping(false).await;
    assert_eq!(jobs(&rig), 2, "a new pool job replaces the preempted one");
    let idle = grow(&rig).await;
    assert_eq!(idle.len(), 1);
    // A pool job that ends by its walltime while idle: the same.
    let (slot, node) = idle[0].clone();
    rig.send(&slot, &node, released(ReleaseReason::Deadline))
        .expect("released");
    rig.engine.housekeeping(false).await;
    assert_eq!(jobs(&rig), 3);
    assert!(rig.engine.list(&admin()).expect("list").is_empty());
}

#[tokio::test]
async fn a_refused_bind_sends_the_lease_through_the_batch_system_and_keeps_the_slot_idle() {
    let rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    let (slot, node) = idle[0].clone();
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    rig.commands(&slot, &node);
    let before = jobs(&rig);
    let refused = EventKind::ReservationRefused {
        command: ReservationCommand::Bind,
        workspace_id: Some(ws.id.clone()),
        reason: "dom0 has 3584 MB; taking 512 MB more would leave it below the minimum".into(),
        reserved_mb: 0,
        bound_to: None,
        vms_left: Vec::new(),
    };
    rig.send(&slot, &node, refused).expect("refused");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Pending);
    assert_eq!(v.slots.len(), 1);
    assert_ne!(v.slots[0].id, slot, "a new slot for the batch system");
    rig.engine.housekeeping(false).await;
    // Its job, and a pool job? No: the refused slot is idle again.
    assert_eq!(
        jobs(&rig),
        before + 1,
        "{:?}",
        rig.lrm.jobs.lock().expect("lock")
    );
    let v = rig.view(&ws.id);
    assert!(v.slots[0].job_id.is_some(), "{v:?}");
    let d = details(&rig, &ws).await;
    assert!(
        d.iter()
            .any(|(_, t)| t.contains("goes through the batch system instead")),
        "{d:?}"
    );
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
    // The lease comes up through its own slot.
    rig.bring_up(&v);
    let vm = &rig.view(&ws.id).vms[0];
    assert!(
        vm.name.starts_with(&format!("wsp-{}-", v.slots[0].id)),
        "{vm:?}"
    );
}

#[tokio::test]
async fn a_silent_idle_pool_pilot_is_lost_alone_its_job_cancelled_and_replaced() {
    let rig = Rig::with(pool_config);
    let idle = grow(&rig).await;
    let (slot, _) = idle[0].clone();
    let job = pool_view(&rig).slots[0].job_id.clone().expect("a job");
    rig.clock.advance(91_000);
    rig.engine.housekeeping(false).await;
    assert!(
        pool_view(&rig).slots.iter().all(|s| s.slot_id != slot),
        "the lost slot left the pool"
    );
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    assert_eq!(jobs(&rig), 2, "a new pool job replaces it");
    assert!(rig.engine.list(&admin()).expect("list").is_empty());
    let holder = rig
        .engine
        .with_store(|s| {
            Ok(crate::store::get_workspace(
                s.conn(),
                &super::super::pool::holder_id(),
            )?)
        })
        .expect("holder")
        .expect("a holder row");
    assert_eq!(
        holder.state,
        WorkspaceState::Running,
        "the holder never fails"
    );
}

fn warm_config(cfg: &mut Config) {
    pool_config(cfg);
    cfg.pool.idle_memory_mb = 512;
    cfg.pool.warm_images = vec!["i".into()];
}

/// An idle pool pilot whose node has a checkpoint store.
fn idle_pilot_with_store(rig: &Rig, slot: &SlotId, node: &str, deadline_ms: u64) {
    rig.send(slot, node, started()).expect("started");
    let reserved = EventKind::Reserved {
        dom0_before_mb: 4096,
        dom0_after_mb: 3584,
        reserved_mb: 512,
        balloon_ms: 0,
        cached_images: Vec::new(),
        checkpoints: Some(protocol::pilot::CheckpointCapability {
            save_mb_per_s: 500.0,
            measured: false,
        }),
        deadline_ms: Some(deadline_ms),
        idle: true,
        cpu_control: None,
    };
    rig.send(slot, node, reserved).expect("reserved");
}

#[tokio::test]
async fn a_warm_image_is_prepared_on_an_idle_slot_and_a_lease_of_it_starts_warm() {
    let rig = Rig::with(warm_config);
    rig.engine.housekeeping(false).await;
    let slot = pool_view(&rig).slots[0].slot_id.clone();
    let deadline = rig.clock.now_ms() + WALLTIME_S * 1000 - 5_000;
    idle_pilot_with_store(&rig, &slot, "p1", deadline);
    rig.engine.housekeeping(false).await;
    let cmds = rig.commands(&slot, "p1");
    let (launch, to) = cmds
        .iter()
        .find_map(|c| match c {
            CommandKind::PrepareWarm { launch, to, .. } => Some((launch.clone(), to.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("prepare_warm sent: {cmds:?}"));
    assert_eq!(launch.image, "i");
    assert_eq!(launch.memory_mb, 512);
    assert!(launch.nics.is_empty() && launch.context.is_none() && launch.hostname.is_none());
    assert!(launch.name.starts_with(&format!("wsp-{slot}-")));
    // While it prepares, the slot is not offered to a lease.
    let rows = rig
        .engine
        .with_store(|s| Ok(crate::store::warm_rows(s.conn())?))
        .expect("rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].state, "preparing", "{rows:?}");
    let before = jobs(&rig);
    let busy = urgent_lease(&rig, 1, 1, 3600).await;
    assert_ne!(busy.slots[0].id, slot);
    assert_eq!(jobs(&rig), before + 1);
    rig.engine.destroy(&admin(), &busy.id).expect("destroy");
    // No second prepare while the first is under way.
    rig.engine.housekeeping(false).await;
    assert!(!rig
        .commands(&slot, "p1")
        .iter()
        .any(|c| matches!(c, CommandKind::PrepareWarm { .. })));

    rig.send(
        &slot,
        "p1",
        EventKind::WarmPrepared {
            checkpoint: to.clone(),
            sha256: "ab".repeat(32),
            bytes: 1 << 20,
            memory_mb: 512,
            boot_ms: 900,
            save_ms: 50,
            total_ms: 960,
        },
    )
    .expect("warm prepared");
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    assert_eq!(ws.slots[0].id, slot, "the slot is free again");
    let cmds = bind_and_start(&rig, &ws, &slot, "p1");
    let start = cmds
        .iter()
        .find_map(|c| match c {
            CommandKind::StartVm(l) => Some(l.clone()),
            _ => None,
        })
        .expect("start_vm");
    let restore = start.restore.expect("a warm start");
    assert!(restore.warm);
    assert_eq!(restore.checkpoint, to);
    assert_eq!(restore.sha256, "ab".repeat(32));
    assert!(
        !start.nics.is_empty() || start.context.is_some(),
        "the lease's own identity"
    );
    let d = details(&rig, &ws).await;
    assert!(
        d.iter()
            .any(|(_, t)| t.contains("warm from the clean snapshot")),
        "{d:?}"
    );
}

#[tokio::test]
async fn a_warm_start_that_cold_boots_says_so_and_the_snapshot_is_made_again() {
    let rig = Rig::with(warm_config);
    rig.engine.housekeeping(false).await;
    let slot = pool_view(&rig).slots[0].slot_id.clone();
    let deadline = rig.clock.now_ms() + WALLTIME_S * 1000 - 5_000;
    idle_pilot_with_store(&rig, &slot, "p1", deadline);
    rig.engine.housekeeping(false).await;
    let to = rig
        .commands(&slot, "p1")
        .into_iter()
        .find_map(|c| match c {
            CommandKind::PrepareWarm { to, .. } => Some(to),
            _ => None,
        })
        .expect("prepare_warm");
    rig.send(
        &slot,
        "p1",
        EventKind::WarmPrepared {
            checkpoint: to.clone(),
            sha256: "cd".repeat(32),
            bytes: 1 << 20,
            memory_mb: 512,
            boot_ms: 900,
            save_ms: 50,
            total_ms: 960,
        },
    )
    .expect("warm prepared");
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    rig.commands(&slot, "p1");
    rig.send(
        &slot,
        "p1",
        EventKind::Bound {
            workspace_id: ws.id.clone(),
            reservation: change(512, deadline),
        },
    )
    .expect("bound");
    let start = rig
        .commands(&slot, "p1")
        .into_iter()
        .find_map(|c| match c {
            CommandKind::StartVm(l) => Some(l),
            _ => None,
        })
        .expect("start_vm");
    rig.send(
        &slot,
        "p1",
        EventKind::VmStarted {
            vm_id: start.vm_id.clone(),
            name: start.name.clone(),
            create_ms: 800,
            stage_ms: None,
            cache_hit: None,
            warm: Some(protocol::pilot::WarmOutcome::ColdBooted {
                checkpoint: to.clone(),
                cause: protocol::pilot::ResumeFailure::ChecksumMismatch,
                reason: "memory has sha256 00.., the manifest says ff..".into(),
            }),
        },
    )
    .expect("vm started");
    assert_eq!(rig.view(&ws.id).state, WorkspaceState::Running);
    let d = details(&rig, &ws).await;
    assert!(
        d.iter()
            .any(|(_, t)| t.contains("cold booted") && t.contains("ChecksumMismatch")),
        "{d:?}"
    );
    // The lease ends, the slot is idle again: a new snapshot is made there.
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    rig.commands(&slot, "p1");
    rig.send(
        &slot,
        "p1",
        EventKind::Unbound {
            workspace_id: ws.id.clone(),
            vms_destroyed: vec![start.vm_id],
            reservation: change(512, deadline),
        },
    )
    .expect("unbound");
    rig.engine.housekeeping(false).await;
    let again = rig
        .commands(&slot, "p1")
        .into_iter()
        .find_map(|c| match c {
            CommandKind::PrepareWarm { to, .. } => Some(to),
            _ => None,
        })
        .expect("prepared again");
    assert_eq!(again.generation, to.generation + 1);
}

#[tokio::test]
async fn a_lease_suspended_on_a_pool_slot_keeps_its_checkpoint_and_the_slot_goes_back_idle() {
    let rig = Rig::with(pool_config);
    rig.engine.housekeeping(false).await;
    let slot = pool_view(&rig).slots[0].slot_id.clone();
    let deadline = rig.clock.now_ms() + WALLTIME_S * 1000 - 5_000;
    idle_pilot_with_store(&rig, &slot, "p1", deadline);
    let ws = urgent_lease(&rig, 1, 1, 3600).await;
    assert_eq!(ws.slots[0].id, slot);
    bind_and_start(&rig, &ws, &slot, "p1");
    rig.engine.suspend(&admin(), &ws.id).expect("suspend");
    let (vm, to) = rig
        .commands(&slot, "p1")
        .into_iter()
        .find_map(|c| match c {
            CommandKind::SuspendVm { vm_id, to } => Some((vm_id, to)),
            _ => None,
        })
        .expect("suspend_vm");
    rig.send(
        &slot,
        "p1",
        EventKind::VmSuspended {
            vm_id: vm.clone(),
            checkpoint: to.clone(),
            sha256: "ef".repeat(32),
            bytes: 1 << 20,
            memory_mb: 512,
            save_ms: 10,
            total_ms: 12,
            trigger: protocol::pilot::SuspendTrigger::Commanded,
        },
    )
    .expect("suspended");
    let cmds = rig.commands(&slot, "p1");
    assert!(
        cmds.iter().any(|c| matches!(c, CommandKind::Unbind { .. })),
        "{cmds:?}"
    );
    rig.send(
        &slot,
        "p1",
        EventKind::Unbound {
            workspace_id: ws.id.clone(),
            vms_destroyed: vec![vm.clone()],
            reservation: change(512, deadline),
        },
    )
    .expect("unbound");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Suspended, "{v:?}");
    assert_eq!(
        v.vms[0].state,
        VmState::Suspended,
        "a checkpoint, not gone: {v:?}"
    );
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}

// ---- leases queued in the batch system move onto idle pool slots --------

/// A pool of one slot at most (kept for urgent leases: `min_idle_nodes = 1`).
fn one_slot_pool(cfg: &mut Config) {
    pool_config(cfg);
    cfg.pool.max_nodes = Some(1);
}

/// The single pool slot, grown, idle, then bound to a running urgent lease
/// A: every lease made now waits in the batch queue.
async fn pool_full(rig: &Rig) -> (SlotId, String, WorkspaceView) {
    let idle = grow(rig).await;
    assert_eq!(idle.len(), 1);
    let (slot, node) = idle[0].clone();
    let a = urgent_lease(rig, 1, 1, 3600).await;
    assert_eq!(a.slots[0].id, slot);
    bind_and_start(rig, &a, &slot, &node);
    (slot, node, a)
}

/// Lease `ws` ends and its pool slot is unbound: the slot is idle again.
fn end_on_pool(rig: &Rig, ws: &WorkspaceId, slot: &SlotId, node: &str) {
    rig.engine.destroy(&admin(), ws).expect("destroy");
    rig.commands(slot, node);
    rig.send(
        slot,
        node,
        EventKind::Unbound {
            workspace_id: ws.clone(),
            vms_destroyed: Vec::new(),
            // The pool pilot holds its node for most of a day yet.
            reservation: change(0, rig.clock.now_ms() + 20 * 3_600_000),
        },
    )
    .expect("unbound");
    assert!(rig.view(ws).settled);
}

/// The lease's slot now (the one its VMs are in).
fn slot_of(rig: &Rig, ws: &WorkspaceId) -> SlotId {
    rig.view(ws).vms[0].slot_id.clone()
}

#[tokio::test]
async fn a_queued_lease_moves_onto_a_pool_slot_that_becomes_idle_and_its_batch_job_is_cancelled() {
    let rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    let b = urgent_lease(&rig, 1, 1, 3600).await;
    assert_ne!(b.slots[0].id, slot, "the pool is busy: the batch queue");
    let job = rig.job_of(&b);
    let queued_slot = b.slots[0].id.clone();
    // While the slot serves A, B waits.
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.state(&job), Some(JobState::Queued));
    assert_eq!(slot_of(&rig, &b.id), queued_slot);

    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &b.id), slot, "B's VM is on the pool slot");
    assert_eq!(
        rig.lrm.state(&job),
        Some(JobState::Cancelled),
        "its batch job is cancelled"
    );
    let v = pool_view(&rig);
    assert_eq!(v.slots.len(), 1, "{v:?}");
    assert_eq!(v.slots[0].bound_to.as_ref(), Some(&b.id));
    // Bound, then started as a lease placed at create: named for the pool slot.
    let cmds = bind_and_start(&rig, &b, &slot, &node);
    let start = cmds
        .iter()
        .find_map(|c| match c {
            CommandKind::StartVm(l) => Some(l.clone()),
            _ => None,
        })
        .expect("start_vm after bound");
    assert!(
        start.name.starts_with(&format!("wsp-{slot}-")),
        "{}",
        start.name
    );
    let v = rig.view(&b.id);
    assert_eq!(v.state, WorkspaceState::Running, "{v:?}");
    assert_eq!(v.vms[0].node.as_deref(), Some(node.as_str()));
    let old = v.slots.iter().find(|s| s.id == queued_slot).expect("kept");
    assert_eq!(old.state, SlotState::Released, "{v:?}");
    let d = details(&rig, &b).await;
    let moved = format!(
        "moved from the batch queue to idle pool slot {slot} on node {node} (batch job {job} cancelled)"
    );
    assert!(d.iter().any(|(_, t)| t.contains(&moved)), "{d:?}");
    assert!(
        d.iter().any(|(_, t)| t.contains(&format!(
            "job {job} cancelled before its pilots held anything"
        ))),
        "{d:?}"
    );
    // Its end gives the slot back to the pool, as for any lease on it.
    end_on_pool(&rig, &b.id, &slot, &node);
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}

#[tokio::test]
async fn queued_leases_move_by_urgency_then_oldest_first_and_urgency_0_never_into_min_idle() {
    let rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    let plain = rig.lease(1, 3600).await;
    let one_old = urgent_lease(&rig, 1, 1, 3600).await;
    rig.clock.advance(1_000);
    let one_young = urgent_lease(&rig, 1, 1, 3600).await;
    let two = urgent_lease(&rig, 2, 1, 3600).await;
    for ws in [&plain, &one_old, &one_young, &two] {
        assert_ne!(slot_of(&rig, &ws.id), slot);
    }
    // Urgency 2 first, though it came last.
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &two.id), slot);
    bind_and_start(&rig, &two, &slot, &node);
    // Then urgency 1, the older first.
    end_on_pool(&rig, &two.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &one_old.id), slot);
    assert_ne!(slot_of(&rig, &one_young.id), slot);
    bind_and_start(&rig, &one_old, &slot, &node);
    end_on_pool(&rig, &one_old.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &one_young.id), slot);
    bind_and_start(&rig, &one_young, &slot, &node);
    end_on_pool(&rig, &one_young.id, &slot, &node);
    // Urgency 0, alone in the queue now: the only idle slot is the one
    // min_idle_nodes keeps for urgent leases. It stays queued.
    rig.engine.housekeeping(false).await;
    assert_ne!(slot_of(&rig, &plain.id), slot);
    assert_eq!(rig.lrm.state(&rig.job_of(&plain)), Some(JobState::Queued));
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}

#[tokio::test]
async fn an_ordinary_queued_lease_takes_an_idle_slot_beyond_min_idle() {
    let rig = Rig::with(|c| {
        pool_config(c);
        c.pool.max_nodes = Some(2);
    });
    let (slot, node, a) = pool_full(&rig).await;
    // The pool grows back to one idle slot: the minimum, not for urgency 0.
    let idle = grow(&rig).await;
    assert_eq!(idle.len(), 1);
    let plain = rig.lease(1, 3600).await;
    let job = rig.job_of(&plain);
    assert_ne!(slot_of(&rig, &plain.id), slot);
    assert_ne!(slot_of(&rig, &plain.id), idle[0].0);
    rig.engine.housekeeping(false).await;
    assert_eq!(
        rig.lrm.state(&job),
        Some(JobState::Queued),
        "one idle: kept"
    );
    // A's end makes two idle: one beyond the minimum.
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    let now_on = slot_of(&rig, &plain.id);
    assert!(now_on == slot || now_on == idle[0].0, "on a pool slot");
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    let v = pool_view(&rig);
    assert_eq!(
        count(&v, PoolSlotState::Idle),
        1,
        "the minimum stays idle: {v:?}"
    );
    assert_eq!(count(&v, PoolSlotState::Bound), 1, "{v:?}");
}

#[tokio::test]
async fn a_queued_lease_that_does_not_fit_the_idle_slots_stays_in_the_batch_queue() {
    let rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    // Two VMs for one idle slot; a lease longer than the slot's walltime.
    let two_vms = urgent_lease(&rig, 2, 2, 3600).await;
    let long = urgent_lease(&rig, 2, 1, WALLTIME_S).await;
    // One that fits, behind them (younger, and of a lower urgency).
    let fits = urgent_lease(&rig, 1, 1, 3600).await;
    let jobs_before: Vec<String> = [&two_vms, &long].iter().map(|w| rig.job_of(w)).collect();
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    for (ws, job) in [&two_vms, &long].iter().zip(&jobs_before) {
        assert_ne!(slot_of(&rig, &ws.id), slot);
        assert_eq!(rig.lrm.state(job), Some(JobState::Queued));
        let d = details(&rig, ws).await;
        assert!(!d.iter().any(|(_, t)| t.contains("moved from")), "{d:?}");
    }
    // The leases ahead that do not fit do not hold it up.
    assert_eq!(slot_of(&rig, &fits.id), slot);
}

#[tokio::test]
async fn a_lease_some_of_whose_pilots_reported_is_not_moved() {
    let rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    let b = urgent_lease(&rig, 1, 1, 3600).await;
    let job = rig.job_of(&b);
    rig.send(&b.slots[0].id, "node1", started())
        .expect("started");
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &b.id), b.slots[0].id, "stays: its pilot runs");
    assert_eq!(rig.lrm.state(&job), Some(JobState::Queued));
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}

#[tokio::test]
async fn a_cancelled_job_that_starts_anyway_is_released_and_the_lease_goes_on() {
    let rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    let b = urgent_lease(&rig, 1, 1, 3600).await;
    let (old, job) = (b.slots[0].id.clone(), rig.job_of(&b));
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &b.id), slot);
    // The batch system had started the job before the cancel landed.
    rig.send(&old, "node3", started()).expect("started");
    let cmds = rig.commands(&old, "node3");
    assert!(cmds.contains(&CommandKind::Release), "{cmds:?}");
    rig.send(&old, "node3", reserved()).expect("reserved");
    assert!(
        !rig.commands(&old, "node3")
            .iter()
            .any(|c| matches!(c, CommandKind::StartVm(_))),
        "nothing starts there"
    );
    // The lease comes up on the pool slot all the same.
    bind_and_start(&rig, &b, &slot, &node);
    assert_eq!(rig.view(&b.id).state, WorkspaceState::Running);
    // Our cancel's signal reaches the pilot, which releases its node.
    rig.send(&old, "node3", preempting(rig.clock.now_ms()))
        .expect("preempting");
    rig.send(&old, "node3", released(ReleaseReason::Commanded))
        .expect("released");
    let v = rig.view(&b.id);
    assert_eq!(v.state, WorkspaceState::Running, "{v:?}");
    let s = v.slots.iter().find(|s| s.id == old).expect("kept");
    assert_eq!(s.state, SlotState::Released, "{v:?}");
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    let d = details(&rig, &b).await;
    assert!(
        d.iter()
            .any(|(_, t)| t.contains("started before its cancel landed")),
        "{d:?}"
    );
    // Its end leaves nothing: the pool slot idle, the old slot released.
    end_on_pool(&rig, &b.id, &slot, &node);
    let v = rig.view(&b.id);
    assert_eq!(v.state, WorkspaceState::Destroyed, "{v:?}");
    assert!(v
        .slots
        .iter()
        .all(|s| s.state == SlotState::Released || s.id == slot));
}

#[tokio::test]
async fn a_refused_cancel_is_retried_until_the_batch_system_takes_it() {
    let rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    let b = urgent_lease(&rig, 1, 1, 3600).await;
    let job = rig.job_of(&b);
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.lrm.failing_cancels.store(2, Ordering::SeqCst);
    let tried = rig.lrm.cancels_tried.load(Ordering::SeqCst);
    rig.engine.housekeeping(false).await;
    assert_eq!(slot_of(&rig, &b.id), slot, "moved all the same");
    assert_eq!(rig.lrm.cancels_tried.load(Ordering::SeqCst), tried + 1);
    assert_eq!(rig.lrm.state(&job), Some(JobState::Queued), "refused");
    bind_and_start(&rig, &b, &slot, &node);
    for _ in 0..2 {
        rig.clock.advance(1_000);
        rig.engine.housekeeping(false).await;
    }
    assert_eq!(rig.lrm.cancels_tried.load(Ordering::SeqCst), tried + 3);
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    assert_eq!(rig.view(&b.id).state, WorkspaceState::Running);
}

#[tokio::test]
async fn a_restart_between_the_move_and_the_cancel_holds_nothing_twice_and_still_cancels() {
    let mut rig = Rig::with(one_slot_pool);
    let (slot, node, a) = pool_full(&rig).await;
    let b = urgent_lease(&rig, 1, 1, 3600).await;
    let job = rig.job_of(&b);
    end_on_pool(&rig, &a.id, &slot, &node);
    // The move is committed; the cancel does not get through before the stop.
    rig.lrm.failing_cancels.store(1, Ordering::SeqCst);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.state(&job), Some(JobState::Queued));
    let jobs_before = jobs(&rig);
    rig.restart();
    let v = pool_view(&rig);
    assert_eq!(v.slots.len(), 1, "{v:?}");
    assert_eq!(v.slots[0].bound_to.as_ref(), Some(&b.id), "{v:?}");
    // The restarted coordinator cancels the old job and offers the slot to
    // nobody else.
    rig.clock.advance(1_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.lrm.state(&job), Some(JobState::Cancelled));
    let c = urgent_lease(&rig, 2, 1, 3600).await;
    assert_ne!(c.slots[0].id, slot);
    assert_eq!(jobs(&rig), jobs_before + 1, "C through the batch system");
    bind_and_start(&rig, &b, &slot, &node);
    assert_eq!(rig.view(&b.id).state, WorkspaceState::Running);
    assert_eq!(slot_of(&rig, &b.id), slot);
}

#[tokio::test]
async fn an_advance_reservation_is_never_moved_onto_the_pool() {
    let rig = Rig::with(one_slot_pool);
    rig.lrm.reserves.store(true, Ordering::SeqCst);
    let (slot, node, a) = pool_full(&rig).await;
    let spec = WorkspaceSpec::parse(
        "name = \"r\"\nduration = 600\nurgency = 1\nstart = \"+10m\"\n[[group]]\nname = \"g\"\ncount = 1\nmemory_mb = 512\nimage = \"i\"\n",
    )
    .expect("spec");
    let r = rig.engine.create(&admin(), spec).await.expect("reserved");
    let job = rig.job_of(&r);
    end_on_pool(&rig, &a.id, &slot, &node);
    rig.engine.housekeeping(false).await;
    assert_ne!(slot_of(&rig, &r.id), slot, "the reservation holds it");
    assert_eq!(rig.lrm.state(&job), Some(JobState::Queued));
    assert_eq!(count(&pool_view(&rig), PoolSlotState::Idle), 1);
}
