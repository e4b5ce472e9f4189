//! Suspend and resume in virtual time: each transition and each failure of
//! `engine::suspend`, driven through the typed entry as pilots would.

use super::*;
use protocol::pilot::{
    CheckpointCapability, CheckpointId, OnPreempt, ResumeFailure, SuspendFailure, SuspendTrigger,
    VmLaunch,
};
use protocol::VmId;

fn reserved_with_store() -> EventKind {
    EventKind::Reserved {
        dom0_before_mb: 4096,
        dom0_after_mb: 3584,
        reserved_mb: 512,
        balloon_ms: 1,
        cached_images: Vec::new(),
        checkpoints: Some(CheckpointCapability {
            save_mb_per_s: 200.0,
            measured: true,
        }),
        deadline_ms: None,
        idle: false,
        cpu_control: None,
    }
}

/// Where a VM runs and how it was launched.
#[derive(Clone, Debug)]
struct Placed {
    slot: SlotId,
    node: String,
    launch: VmLaunch,
}

impl Rig {
    /// An ensemble of two groups (two slots), one VM each, or one group.
    async fn ensemble(&self, groups: u32, extra: &str) -> WorkspaceView {
        let mut spec = format!("name = \"e\"\nduration = 3600\n{extra}\n");
        for g in 0..groups {
            spec.push_str(&format!(
                "[[group]]\nname = \"g{g}\"\ncount = 1\nmemory_mb = 512\nimage = \"i\"\n"
            ));
        }
        let spec = WorkspaceSpec::parse(&spec).expect("spec");
        self.engine.create(&admin(), spec).await.expect("created")
    }

    /// The workspace's current slots come up (nodes with a store when
    /// `store`); every start or restore runs; the launches, by VM.
    fn come_up(&self, id: &WorkspaceId, store: bool) -> HashMap<VmId, Placed> {
        let ws = self.view(id);
        let live: Vec<_> = ws
            .slots
            .iter()
            .filter(|s| !matches!(s.state, SlotState::Released | SlotState::Failed))
            .cloned()
            .collect();
        for s in &live {
            let node = "node1";
            self.send(&s.id, node, started()).expect("started");
            let r = if store {
                reserved_with_store()
            } else {
                reserved()
            };
            self.send(&s.id, node, r).expect("reserved");
        }
        let mut placed = HashMap::new();
        for s in &live {
            for c in self.commands(&s.id, "node1") {
                if let CommandKind::StartVm(l) = c {
                    let kind = match &l.restore {
                        None => EventKind::VmStarted {
                            vm_id: l.vm_id.clone(),
                            name: l.name.clone(),
                            create_ms: 5,
                            stage_ms: None,
                            cache_hit: None,
                            warm: None,
                        },
                        Some(r) => EventKind::VmResumed {
                            vm_id: l.vm_id.clone(),
                            name: l.name.clone(),
                            checkpoint: r.checkpoint.clone(),
                            bytes: 300 << 20,
                            restore_ms: 900,
                            total_ms: 1000,
                            stage_ms: None,
                        },
                    };
                    placed.insert(
                        l.vm_id.clone(),
                        Placed {
                            slot: s.id.clone(),
                            node: "node1".into(),
                            launch: l,
                        },
                    );
                    self.send(&s.id, "node1", kind).expect("vm up");
                }
            }
        }
        placed
    }

    fn saved(&self, p: &Placed, to: &CheckpointId, trigger: SuspendTrigger) {
        let kind = EventKind::VmSuspended {
            vm_id: p.launch.vm_id.clone(),
            checkpoint: to.clone(),
            sha256: format!("{:064x}", to.generation),
            bytes: 200 << 20,
            memory_mb: 512,
            save_ms: 1500,
            total_ms: 1700,
            trigger,
        };
        self.send(&p.slot, &p.node, kind).expect("vm_suspended");
    }

    fn preempting(&self, p: &Placed, suspending: Vec<VmId>, not: Option<&str>) {
        let kind = EventKind::Preempting {
            signal: "SIGTERM".into(),
            coordinator_wait_ms: 2_000,
            cleanup_deadline_ms: self.clock.now_ms() + 4_000,
            suspending,
            not_suspending: not.map(str::to_string),
        };
        self.send(&p.slot, &p.node, kind).expect("preempting");
    }

    fn state(&self, id: &WorkspaceId) -> WorkspaceState {
        self.view(id).state
    }
}

fn checkpoint_of(p: &Placed) -> CheckpointId {
    match &p.launch.on_preempt {
        OnPreempt::Suspend { to } => to.clone(),
        OnPreempt::End => panic!(
            "launch of {} does not suspend on preemption",
            p.launch.vm_id
        ),
    }
}

/// Preempts the ensemble's first VM's pilot, saves every VM (the other by
/// command) and releases every pilot: the workspace is suspended.
fn preempt_and_save_all(rig: &Rig, id: &WorkspaceId, placed: &HashMap<VmId, Placed>) {
    let mut all: Vec<&Placed> = placed.values().collect();
    all.sort_by_key(|p| p.launch.vm_id.to_string());
    let first = all[0];
    rig.preempting(first, vec![first.launch.vm_id.clone()], None);
    assert_eq!(rig.state(id), WorkspaceState::Suspending);
    rig.saved(first, &checkpoint_of(first), SuspendTrigger::Preempted);
    for p in &all[1..] {
        let cmds = rig.commands(&p.slot, &p.node);
        let to = cmds
            .iter()
            .find_map(|c| match c {
                CommandKind::SuspendVm { vm_id, to } if *vm_id == p.launch.vm_id => {
                    Some(to.clone())
                }
                _ => None,
            })
            .expect("the other members are told to suspend");
        assert_eq!(
            to,
            checkpoint_of(p),
            "the launch's and the command's checkpoint agree"
        );
        rig.saved(p, &to, SuspendTrigger::Commanded);
    }
    assert_eq!(rig.state(id), WorkspaceState::Suspended);
    for p in &all {
        let reason = if p.slot == first.slot {
            ReleaseReason::Preempted
        } else {
            assert!(rig
                .commands(&p.slot, &p.node)
                .contains(&CommandKind::Release));
            ReleaseReason::Commanded
        };
        rig.send(&p.slot, &p.node, released(reason))
            .expect("released");
    }
}

#[tokio::test]
async fn a_preempted_ensemble_is_saved_whole_and_resumed_in_new_slots_without_charging_the_suspended_time(
) {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
    let ends = rig.view(&ws.id).expires_ms.expect("lease end");
    for p in placed.values() {
        assert_eq!(checkpoint_of(p).generation, 1, "first save is generation 1");
    }
    rig.clock.advance(60_000);
    preempt_and_save_all(&rig, &ws.id, &placed);
    let v = rig.view(&ws.id);
    assert!(v.expires_ms.is_none(), "the lease clock is stopped");
    assert!(!v.settled);
    assert!(v.slots.iter().all(|s| s.state == SlotState::Released));
    assert!(v.vms.iter().all(|vm| vm.state == VmState::Suspended));

    // Suspended for 100 s; the next housekeeping round asks for new slots.
    rig.clock.advance(100_000);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Resuming);
    assert_eq!(v.slots.len(), 4, "two new slots beside the two old ones");
    let resumed = rig.come_up(&ws.id, true);
    for (vm, p) in &resumed {
        let r = p.launch.restore.as_ref().expect("a restore launch");
        assert_eq!(r.checkpoint, checkpoint_of(&placed[vm]));
        assert_eq!(r.sha256, format!("{:064x}", 1));
        assert_ne!(p.slot, placed[vm].slot, "a new slot");
        assert_eq!(
            checkpoint_of(p).generation,
            2,
            "the next save is a new generation"
        );
        assert!(p.launch.name.contains(p.slot.as_str()));
    }
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Running);
    assert_eq!(
        v.expires_ms,
        Some(ends + 100_000),
        "suspended time is not charged to the lease"
    );
    for vm in &v.vms {
        assert_eq!(vm.placements.len(), 2, "{vm:?}");
        assert!(vm.placements[0].until_ms.is_some());
        assert_eq!(
            vm.placements[1].restored_from.as_deref(),
            Some(checkpoint_of(&placed[&vm.id]).to_string().as_str())
        );
    }
    // The checkpoints resumed from are deleted by the pilots now holding the VMs.
    for p in resumed.values() {
        let cmds = rig.commands(&p.slot, &p.node);
        assert!(
            cmds.iter()
                .any(|c| matches!(c, CommandKind::DeleteCheckpoint { .. })),
            "{cmds:?}"
        );
    }
    let phases = rig.phases(&ws).await;
    for ph in [
        Phase::Suspending,
        Phase::VmSuspended,
        Phase::Suspended,
        Phase::Resuming,
        Phase::VmResumed,
    ] {
        assert!(phases.contains(&ph), "{ph:?} in {phases:?}");
    }
    // It ends when it has run for its duration: not before.
    rig.clock.advance(3_600_000 - 60_000 - 1);
    rig.engine.expire_leases().expect("expire");
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
    rig.clock.advance(1);
    rig.engine.expire_leases().expect("expire");
    assert_eq!(rig.state(&ws.id), WorkspaceState::Expired);
}

#[tokio::test]
async fn a_save_that_does_not_fit_the_grace_ends_the_workspace_preempted_saying_why() {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    let p = placed.values().next().expect("a VM");
    let why =
        "save did not fit the grace: needs ~25.6 s for 1 VM(s) of 512 MB at 20 MB/s, 1.7 s left";
    rig.preempting(p, Vec::new(), Some(why));
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Preempted);
    let reason = v.reason.expect("reason");
    assert!(
        reason.contains("not suspended: save did not fit the grace"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_save_that_times_out_on_preemption_names_the_vm_and_ends_the_workspace() {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    let mut all: Vec<&Placed> = placed.values().collect();
    all.sort_by_key(|p| p.launch.vm_id.to_string());
    rig.preempting(all[0], vec![all[0].launch.vm_id.clone()], None);
    let kind = EventKind::VmSuspendFailed {
        vm_id: all[0].launch.vm_id.clone(),
        checkpoint: checkpoint_of(all[0]),
        cause: SuspendFailure::TimedOut,
        reason: "save did not finish within the grace period".into(),
        vm_running: false,
    };
    rig.send(&all[0].slot, &all[0].node, kind).expect("failed");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Preempted);
    let reason = v.reason.expect("reason");
    assert!(
        reason.contains(all[0].launch.vm_id.as_str()) && reason.contains("did not finish"),
        "{reason}"
    );
    // Every slot is told to go; nothing is left once the pilots release.
    for p in &all {
        let _ = rig.commands(&p.slot, &p.node);
        rig.send(&p.slot, &p.node, released(ReleaseReason::Preempted))
            .expect("released");
    }
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert!(v.settled, "{v:?}");
}

#[tokio::test]
async fn a_lease_that_chose_end_is_preempted_as_before_and_a_node_without_a_store_ends_it_by_default(
) {
    let rig = Rig::new();
    let ws = rig.ensemble(1, "on_preempt = \"end\"").await;
    let placed = rig.come_up(&ws.id, true);
    let p = placed.values().next().expect("a VM");
    assert_eq!(p.launch.on_preempt, OnPreempt::End);
    rig.preempting(p, Vec::new(), None);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Preempted);

    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, false);
    let p = placed.values().next().expect("a VM");
    assert_eq!(
        p.launch.on_preempt,
        OnPreempt::End,
        "no store: end by default"
    );
    let e = rig.engine.suspend(&admin(), &ws.id).expect_err("no store");
    assert!(matches!(e, EngineError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("has no checkpoint store"), "{e}");
}

#[tokio::test]
async fn a_client_suspends_and_resumes_and_a_suspended_lease_waits_for_it() {
    let rig = Rig::new();
    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, true);
    let p = placed.values().next().expect("a VM").clone();
    rig.engine.suspend(&admin(), &ws.id).expect("suspend");
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspending);
    let to = rig
        .commands(&p.slot, &p.node)
        .into_iter()
        .find_map(|c| match c {
            CommandKind::SuspendVm { to, .. } => Some(to),
            _ => None,
        })
        .expect("suspend_vm");
    rig.saved(&p, &to, SuspendTrigger::Commanded);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspended);
    assert!(rig
        .commands(&p.slot, &p.node)
        .contains(&CommandKind::Release));
    rig.send(&p.slot, &p.node, released(ReleaseReason::Commanded))
        .expect("released");
    // A suspended workspace holds no slot and is not failed for it, nor
    // resumed until asked; the silence check and the batch poll pass it by.
    rig.clock.advance(600_000);
    rig.engine.housekeeping(true).await;
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspended);
    let e = rig.engine.suspend(&admin(), &ws.id).expect_err("twice");
    assert!(e.to_string().contains("only a running workspace"), "{e}");

    let v = rig.engine.resume(&admin(), &ws.id).await.expect("resume");
    assert_eq!(v.state, WorkspaceState::Resuming);
    rig.come_up(&ws.id, true);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
    let e = rig
        .engine
        .resume(&admin(), &ws.id)
        .await
        .expect_err("running");
    assert!(matches!(e, EngineError::Conflict(_)), "{e}");
}

#[tokio::test]
async fn a_new_slot_the_batch_system_refuses_leaves_the_workspace_suspended_with_its_checkpoints() {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    preempt_and_save_all(&rig, &ws.id, &placed);
    rig.lrm.failing_submits.store(1, Ordering::SeqCst);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Suspended);
    let reason = v.reason.clone().expect("reason");
    assert!(
        reason.contains("refused the new slot") && reason.contains("QOSMax"),
        "{reason}"
    );
    assert!(v.vms.iter().all(|vm| vm.state == VmState::Suspended));
    assert!(v.vms.iter().all(|vm| vm.checkpoint.is_some()));
    // Nothing half-done: the new slots are over, none owes a cancel or runs.
    assert!(v
        .slots
        .iter()
        .all(|s| matches!(s.state, SlotState::Released | SlotState::Failed)));
    // It waits for the client now; a resume tries again and works.
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspended);
    rig.engine.resume(&admin(), &ws.id).await.expect("resume");
    rig.come_up(&ws.id, true);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
}

#[tokio::test]
async fn a_corrupted_checkpoint_fails_the_workspace_with_the_checksum_reason() {
    let rig = Rig::new();
    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, true);
    preempt_and_save_all(&rig, &ws.id, &placed);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    let slot = v
        .slots
        .iter()
        .find(|s| s.state == SlotState::Submitted)
        .expect("new slot")
        .id
        .clone();
    rig.send(&slot, "node1", started()).expect("started");
    rig.send(&slot, "node1", reserved_with_store())
        .expect("reserved");
    let launch = rig
        .commands(&slot, "node1")
        .into_iter()
        .find_map(|c| match c {
            CommandKind::StartVm(l) => Some(l),
            _ => None,
        })
        .expect("restore");
    let r = launch.restore.expect("restore");
    let kind = EventKind::VmResumeFailed {
        vm_id: launch.vm_id.clone(),
        checkpoint: r.checkpoint.clone(),
        cause: ResumeFailure::ChecksumMismatch,
        reason: "checksum mismatch in checkpoint: memory.zst has sha256 00, expected 11".into(),
    };
    rig.send(&slot, "node1", kind).expect("resume failed");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Failed);
    assert!(v.reason.expect("reason").contains("checksum mismatch"));
    assert!(rig.commands(&slot, "node1").contains(&CommandKind::Release));
    rig.send(&slot, "node1", released(ReleaseReason::Commanded))
        .expect("released");
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    assert!(v.settled, "{v:?}");
    let phases = rig.phases(&ws).await;
    assert!(phases.contains(&Phase::CheckpointDeleted), "{phases:?}");
}

#[tokio::test]
async fn a_node_short_of_memory_calls_the_resume_off_and_the_workspace_is_suspended_again() {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    preempt_and_save_all(&rig, &ws.id, &placed);
    rig.engine.housekeeping(false).await;
    let v = rig.view(&ws.id);
    let new: Vec<SlotId> = v
        .slots
        .iter()
        .filter(|s| s.state == SlotState::Submitted)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(new.len(), 2);
    for s in &new {
        rig.send(s, "node1", started()).expect("started");
        rig.send(s, "node1", reserved_with_store())
            .expect("reserved");
    }
    // The first restore works, the second finds too little memory.
    let mut launches = Vec::new();
    for s in &new {
        for c in rig.commands(s, "node1") {
            if let CommandKind::StartVm(l) = c {
                launches.push((s.clone(), l));
            }
        }
    }
    let (s0, l0) = &launches[0];
    let r0 = l0.restore.clone().expect("restore");
    rig.send(
        s0,
        "node1",
        EventKind::VmResumed {
            vm_id: l0.vm_id.clone(),
            name: l0.name.clone(),
            checkpoint: r0.checkpoint,
            bytes: 1,
            restore_ms: 1,
            total_ms: 1,
            stage_ms: None,
        },
    )
    .expect("resumed");
    let (s1, l1) = &launches[1];
    rig.send(
        s1,
        "node1",
        EventKind::VmResumeFailed {
            vm_id: l1.vm_id.clone(),
            checkpoint: l1.restore.clone().expect("restore").checkpoint,
            cause: ResumeFailure::NoMemory,
            reason: "not enough memory: the VM needs 512 MB; this slot reserved 256 MB".into(),
        },
    )
    .expect("resume failed");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Suspended);
    assert!(v
        .reason
        .clone()
        .expect("reason")
        .contains("not enough memory"));
    assert!(
        v.vms.iter().all(|vm| vm.state == VmState::Suspended),
        "{v:?}"
    );
    for s in &new {
        assert!(rig.commands(s, "node1").contains(&CommandKind::Release));
        rig.send(s, "node1", released(ReleaseReason::Commanded))
            .expect("released");
    }
    let v = rig.view(&ws.id);
    assert!(
        v.vms.iter().all(|vm| vm.state == VmState::Suspended),
        "{v:?}"
    );
    assert!(v.slots.iter().all(|s| s.state == SlotState::Released));
}

#[tokio::test]
async fn a_coordinator_restarted_while_suspending_finishes_the_suspend_and_resumes() {
    let mut rig = Rig::new();
    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, true);
    let p = placed.values().next().expect("a VM").clone();
    rig.preempting(&p, vec![p.launch.vm_id.clone()], None);
    rig.restart();
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspending);
    // The pilot's outbox delivers the save to the new coordinator.
    rig.saved(&p, &checkpoint_of(&p), SuspendTrigger::Preempted);
    rig.send(&p.slot, &p.node, released(ReleaseReason::Preempted))
        .expect("released");
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspended);
    rig.restart();
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.state(&ws.id), WorkspaceState::Resuming);
    rig.come_up(&ws.id, true);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
}

#[tokio::test]
async fn a_coordinator_killed_while_submitting_the_new_slots_calls_the_resume_off_and_asks_again() {
    let mut rig = Rig::new();
    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, true);
    preempt_and_save_all(&rig, &ws.id, &placed);
    // As a coordinator killed between storing the new slot and its submit
    // leaves it: stored, never submitted.
    let db = rig.dir.path().join("data").join("coordinator.db");
    {
        let c = rusqlite::Connection::open(&db).expect("db");
        c.execute(
            "UPDATE workspaces SET state = 'resuming' WHERE id = ?1",
            [ws.id.as_str()],
        )
        .expect("resuming");
        let slot = SlotId::generate();
        c.execute(
            "INSERT INTO slots (id, workspace_id, grp, job_id, nodes, cores, memory_mb, state, job_state, created_ms)
             VALUES (?1, ?2, 'g0', NULL, 1, 1, 512, 'submitted', 'unsubmitted', 1)",
            [slot.as_str(), ws.id.as_str()],
        )
        .expect("slot");
        c.execute("UPDATE vms SET slot_id = ?1, node = NULL", [slot.as_str()])
            .expect("vms");
    }
    rig.restart();
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Suspended, "{:?}", v.reason);
    assert!(v
        .reason
        .clone()
        .unwrap_or_default()
        .contains("stopped while submitting"));
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.state(&ws.id), WorkspaceState::Resuming);
    rig.come_up(&ws.id, true);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
}

#[tokio::test]
async fn a_pilot_that_releases_without_reporting_its_save_ends_the_workspace_preempted() {
    let rig = Rig::new();
    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, true);
    let p = placed.values().next().expect("a VM").clone();
    rig.preempting(&p, vec![p.launch.vm_id.clone()], None);
    rig.send(&p.slot, &p.node, released(ReleaseReason::Preempted))
        .expect("released");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Preempted);
    assert!(v
        .reason
        .expect("reason")
        .contains("without reporting the save"));
    rig.engine.housekeeping(false).await;
    assert!(rig.view(&ws.id).settled);
}

#[tokio::test]
async fn a_suspended_workspace_destroyed_settles_and_its_checkpoints_are_removed_from_the_store() {
    let rig = Rig::new();
    let ws = rig.ensemble(1, "").await;
    let placed = rig.come_up(&ws.id, true);
    let p = placed.values().next().expect("a VM").clone();
    rig.engine.suspend(&admin(), &ws.id).expect("suspend");
    let to = checkpoint_of(&p);
    let dir = rig.dir.path().join("store").join(to.to_string());
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("memory.zst"), vec![0u8; 4096]).expect("file");
    rig.saved(&p, &to, SuspendTrigger::Commanded);
    rig.send(&p.slot, &p.node, released(ReleaseReason::Commanded))
        .expect("released");
    rig.engine.destroy(&admin(), &ws.id).expect("destroy");
    let v = rig.view(&ws.id);
    assert_eq!(v.state, WorkspaceState::Destroyed);
    rig.engine.housekeeping(false).await;
    assert!(rig.view(&ws.id).settled);
    assert!(
        !rig.dir.path().join("store").join(ws.id.as_str()).exists(),
        "checkpoints deleted when the lease ends"
    );
    assert!(rig
        .view(&ws.id)
        .vms
        .iter()
        .all(|v| v.state == VmState::Destroyed));
}

#[tokio::test]
async fn old_slots_that_end_after_the_resume_began_do_not_fail_the_workspace() {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    let mut all: Vec<&Placed> = placed.values().collect();
    all.sort_by_key(|p| p.launch.vm_id.to_string());
    rig.preempting(all[0], vec![all[0].launch.vm_id.clone()], None);
    rig.saved(all[0], &checkpoint_of(all[0]), SuspendTrigger::Preempted);
    rig.saved(all[1], &checkpoint_of(all[1]), SuspendTrigger::Commanded);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspended);
    // The old batch job, taken before housekeeping asks for the new ones:
    // afterwards the slot's view names its newest job.
    let old = rig.view(&ws.id).slots[0].job_id.clone().expect("job");
    // New slots are asked for before the old pilots have released.
    rig.engine.housekeeping(false).await;
    assert_eq!(rig.state(&ws.id), WorkspaceState::Resuming);
    rig.send(&all[0].slot, "node1", released(ReleaseReason::Preempted))
        .expect("released");
    rig.send(&all[1].slot, "node1", released(ReleaseReason::Commanded))
        .expect("released");
    rig.lrm.set(&old, JobState::Completed);
    rig.engine.poll_lrm().await.expect("poll");
    assert_eq!(
        rig.state(&ws.id),
        WorkspaceState::Resuming,
        "{:?}",
        rig.view(&ws.id).reason
    );
    rig.come_up(&ws.id, true);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Running);
}

#[tokio::test]
async fn a_suspend_command_that_crosses_the_pilots_own_save_on_the_warning_changes_nothing() {
    let rig = Rig::new();
    let ws = rig.ensemble(2, "").await;
    let placed = rig.come_up(&ws.id, true);
    let mut all: Vec<&Placed> = placed.values().collect();
    all.sort_by_key(|p| p.launch.vm_id.to_string());
    // Both members' pilots are warned; the first report sends the second
    // a `suspend_vm`, which reaches it while it saves on its own.
    rig.preempting(all[0], vec![all[0].launch.vm_id.clone()], None);
    rig.preempting(all[1], vec![all[1].launch.vm_id.clone()], None);
    let crossed = EventKind::VmSuspendFailed {
        vm_id: all[1].launch.vm_id.clone(),
        checkpoint: checkpoint_of(all[1]),
        cause: SuspendFailure::NoSuchVm,
        reason: "not on this node".into(),
        vm_running: false,
    };
    rig.send(&all[1].slot, &all[1].node, crossed)
        .expect("crossed");
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspending);
    rig.saved(all[0], &checkpoint_of(all[0]), SuspendTrigger::Preempted);
    rig.saved(all[1], &checkpoint_of(all[1]), SuspendTrigger::Preempted);
    assert_eq!(rig.state(&ws.id), WorkspaceState::Suspended);
}
