//! Urgent leases in virtual time (`engine::urgent`): urgency 2 sharing a
//! best-effort lease's node under CPU caps (and giving it back), its
//! fallbacks to the batch system, the host ending first, and urgency 1
//! suspending a best-effort lease on a full cluster.

use super::*;
use crate::config::User;
use protocol::pilot::{
    CheckpointCapability, CpuControl, CpuShare, ReservationChange, ReservationCommand, VmLaunch,
};
use protocol::VmId;

/// A rig whose caller ("tester") may ask for urgency 2.
fn urgent_rig() -> Rig {
    Rig::with(|cfg| {
        cfg.users = vec![User {
            name: "tester".into(),
            token_sha256: "0".repeat(64),
            admin: true,
            max_vms: None,
            max_memory_mb: None,
            max_lease_s: None,
            max_workspaces: None,
            max_urgency: 2,
        }];
    })
}

/// A node's `reserved`: CPU control or not, a checkpoint store or not.
fn reserved_on(cpu: bool, store: bool) -> EventKind {
    EventKind::Reserved {
        dom0_before_mb: 4096,
        dom0_after_mb: 3584,
        reserved_mb: 512,
        balloon_ms: 1,
        cached_images: Vec::new(),
        checkpoints: store.then_some(CheckpointCapability {
            save_mb_per_s: 200.0,
            measured: true,
        }),
        deadline_ms: None,
        idle: false,
        cpu_control: Some(CpuControl {
            available: cpu,
            mechanism: "sim".into(),
            reason: (!cpu).then(|| "cgroup v2 has no cpu controller here".into()),
        }),
    }
}

fn changed(reserved_mb: u64) -> EventKind {
    EventKind::ReservationChanged {
        workspace_id: None,
        reservation: ReservationChange {
            reserved_mb,
            dom0_before_mb: 3584,
            dom0_after_mb: 4096 - reserved_mb,
            balloon_ms: 1,
            deadline_ms: T0 + 86_400_000,
        },
    }
}

impl Rig {
    async fn urgent(&self, urgency: u8, nodes: u32) -> WorkspaceView {
        let spec = format!(
            "name = \"u\"\nduration = 600\nurgency = {urgency}\n[[group]]\nname = \"g\"\ncount = {nodes}\nmemory_mb = 512\nimage = \"i\"\n"
        );
        let spec = WorkspaceSpec::parse(&spec).expect("spec");
        self.engine.create(&admin(), spec).await.expect("created")
    }

    /// A best-effort lease of `nodes` VMs, running on nodes node1.. with
    /// (or without) CPU control and a checkpoint store.
    async fn running_host(&self, nodes: u32, cpu: bool, store: bool) -> WorkspaceView {
        let ws = self.lease(nodes, 3600).await;
        let s = &ws.slots[0];
        for n in 1..=nodes {
            let node = format!("node{n}");
            self.send(&s.id, &node, started()).expect("started");
            self.send(&s.id, &node, reserved_on(cpu, store))
                .expect("reserved");
        }
        for n in 1..=nodes {
            let node = format!("node{n}");
            for c in self.commands(&s.id, &node) {
                if let CommandKind::StartVm(l) = c {
                    self.vm_started(&s.id, &node, &l);
                }
            }
        }
        assert_eq!(self.view(&ws.id).state, WorkspaceState::Running);
        self.view(&ws.id)
    }

    fn vm_started(&self, slot: &SlotId, node: &str, l: &VmLaunch) {
        let kind = EventKind::VmStarted {
            vm_id: l.vm_id.clone(),
            name: l.name.clone(),
            create_ms: 5,
            stage_ms: None,
            cache_hit: None,
            warm: None,
        };
        self.send(slot, node, kind).expect("vm started");
    }

    async fn timeline(&self, id: &WorkspaceId) -> Vec<(Phase, String)> {
        let page = self.engine.events(&admin(), id, 0, Duration::ZERO).await;
        page.expect("events")
            .events
            .into_iter()
            .map(|e| (e.phase, e.detail))
            .collect()
    }

    async fn says(&self, id: &WorkspaceId, text: &str) -> bool {
        self.timeline(id)
            .await
            .iter()
            .any(|(_, d)| d.contains(text))
    }
}

/// The host's VM on node1 is capped, the urgent VM runs beside it: the
/// commands and answers up to there. Returns (host VM, urgent launch).
async fn share_node1(rig: &Rig, host: &WorkspaceView, urgent: &WorkspaceView) -> (VmId, VmLaunch) {
    let slot = &host.slots[0].id;
    assert!(
        urgent.slots.is_empty(),
        "an urgent lease on a shared node holds no slot of its own"
    );
    assert_eq!(
        rig.lrm.jobs.lock().expect("lock").len(),
        1,
        "no pilot job for it"
    );
    let cmds = rig.commands(slot, "node1");
    assert_eq!(
        cmds,
        vec![CommandKind::Reserve { memory_mb: 1024 }],
        "512 MB more on top of the host's 512"
    );
    rig.send(slot, "node1", changed(1024)).expect("changed");
    let host_vm = host.vms[0].id.clone();
    let cmds = rig.commands(slot, "node1");
    assert_eq!(
        cmds,
        vec![CommandKind::SetCpu {
            vm_id: host_vm.clone(),
            cpu: CpuShare {
                weight: None,
                cap_pct: Some(10)
            }
        }]
    );
    let set = EventKind::VmCpuSet {
        vm_id: host_vm.clone(),
        cpu: CpuShare {
            weight: None,
            cap_pct: Some(10),
        },
        mechanism: "sim".into(),
    };
    rig.send(slot, "node1", set).expect("cpu set");
    let mut cmds = rig.commands(slot, "node1");
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    let Some(CommandKind::StartVm(launch)) = cmds.pop() else {
        panic!("a start_vm");
    };
    assert_eq!(launch.urgency, 2);
    assert_eq!(launch.cpu.and_then(|c| c.weight), Some(900));
    assert!(
        launch.name.starts_with(&format!("wsp-{slot}-")),
        "{}",
        launch.name
    );
    rig.vm_started(slot, "node1", &launch);
    (host_vm, launch)
}

#[tokio::test]
async fn urgency_2_shares_a_node_under_caps_and_lifts_them_when_it_ends() {
    let rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let (host_vm, launch) = share_node1(&rig, &host, &urgent).await;
    assert_eq!(rig.view(&urgent.id).state, WorkspaceState::Running);
    assert_eq!(rig.view(&host.id).state, WorkspaceState::Running);
    let yielded = format!("capped to 10 % for urgent lease {} (urgency 2)", urgent.id);
    assert!(
        rig.says(&host.id, &yielded).await,
        "{:?}",
        rig.timeline(&host.id).await
    );
    assert!(
        rig.says(&urgent.id, &format!("beside best-effort lease {}", host.id))
            .await
    );

    // The urgent lease ends: its VM goes, then the caps and the memory.
    rig.engine.destroy(&admin(), &urgent.id).expect("destroy");
    let slot = &host.slots[0].id;
    assert_eq!(
        rig.commands(slot, "node1"),
        vec![CommandKind::DestroyVm {
            vm_id: launch.vm_id.clone()
        }],
        "the host's pilot is not released"
    );
    assert_eq!(rig.view(&urgent.id).state, WorkspaceState::Destroying);
    let gone = EventKind::VmDestroyed {
        vm_id: launch.vm_id.clone(),
        destroy_ms: 3,
    };
    rig.send(slot, "node1", gone).expect("destroyed");
    assert_eq!(
        rig.commands(slot, "node1"),
        vec![
            CommandKind::SetCpu {
                vm_id: host_vm.clone(),
                cpu: CpuShare::default()
            },
            CommandKind::Reserve { memory_mb: 512 }
        ]
    );
    let lifted = EventKind::VmCpuSet {
        vm_id: host_vm,
        cpu: CpuShare::default(),
        mechanism: "sim".into(),
    };
    rig.send(slot, "node1", lifted).expect("lifted");
    let u = rig.view(&urgent.id);
    assert_eq!(u.state, WorkspaceState::Destroyed);
    assert!(u.settled, "{u:?}");
    assert!(rig.says(&host.id, "CPU cap lifted").await);
    assert!(
        rig.says(&host.id, "caps lifted on 1 VM(s), 512 MB given back")
            .await
    );
    assert_eq!(rig.view(&host.id).state, WorkspaceState::Running);
}

#[tokio::test]
async fn a_node_without_cpu_control_is_not_shared_and_the_lease_is_submitted() {
    let rig = urgent_rig();
    let host = rig.running_host(1, false, false).await;
    let urgent = rig.urgent(2, 1).await;
    assert_eq!(urgent.slots.len(), 1);
    assert!(urgent.slots[0].job_id.is_some(), "through the batch system");
    assert!(rig.commands(&host.slots[0].id, "node1").is_empty());
    assert!(
        rig.says(
            &urgent.id,
            "without CPU control: node1 (cgroup v2 has no cpu controller here)"
        )
        .await,
        "{:?}",
        rig.timeline(&urgent.id).await
    );
}

#[tokio::test]
async fn a_refused_cap_undoes_the_share_and_sends_the_lease_through_the_batch_system() {
    let rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let slot = &host.slots[0].id;
    rig.commands(slot, "node1");
    rig.send(slot, "node1", changed(1024)).expect("changed");
    rig.commands(slot, "node1");
    let failed = EventKind::VmCpuSetFailed {
        vm_id: host.vms[0].id.clone(),
        cpu: CpuShare {
            weight: None,
            cap_pct: Some(10),
        },
        reason: "cpu.max: permission denied".into(),
    };
    rig.send(slot, "node1", failed).expect("cpu set failed");
    assert_eq!(
        rig.commands(slot, "node1"),
        vec![
            CommandKind::SetCpu {
                vm_id: host.vms[0].id.clone(),
                cpu: CpuShare::default()
            },
            CommandKind::Reserve { memory_mb: 512 }
        ],
        "whatever was capped is lifted, the memory given back"
    );
    rig.engine.housekeeping(false).await;
    let u = rig.view(&urgent.id);
    assert_eq!(u.slots.len(), 1, "{u:?}");
    assert!(u.slots[0].job_id.is_some(), "its own pilot job");
    assert!(
        u.vms[0].name.contains(u.slots[0].id.as_str()),
        "named for its own slot"
    );
    assert!(
        rig.says(&urgent.id, "could not cap VM").await
            && rig
                .says(&urgent.id, "going through the batch system instead")
                .await,
        "{:?}",
        rig.timeline(&urgent.id).await
    );
}

#[tokio::test]
async fn a_refused_reservation_sends_the_lease_through_the_batch_system() {
    let rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let slot = &host.slots[0].id;
    rig.commands(slot, "node1");
    let refused = EventKind::ReservationRefused {
        command: ReservationCommand::Reserve,
        workspace_id: None,
        reason: "dom0 has 3584 MB; taking 512 MB more would leave it below the minimum".into(),
        reserved_mb: 512,
        bound_to: None,
        vms_left: Vec::new(),
    };
    rig.send(slot, "node1", refused).expect("refused");
    rig.engine.housekeeping(false).await;
    let u = rig.view(&urgent.id);
    assert!(u.slots.iter().any(|s| s.job_id.is_some()), "{u:?}");
    assert!(rig.says(&urgent.id, "could not lend 512 MB").await);
}

#[tokio::test]
async fn the_host_ending_first_fails_the_urgent_lease_saying_why() {
    let rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    share_node1(&rig, &host, &urgent).await;
    rig.engine
        .destroy(&admin(), &host.id)
        .expect("destroy host");
    let slot = &host.slots[0].id;
    assert!(rig.commands(slot, "node1").contains(&CommandKind::Release));
    rig.send(slot, "node1", released(ReleaseReason::Commanded))
        .expect("released");
    let u = rig.view(&urgent.id);
    assert_eq!(u.state, WorkspaceState::Failed);
    let reason = u.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "best-effort lease {} ended first on node node1",
            host.id
        )),
        "{reason}"
    );
    assert!(u.settled, "nothing of it is left anywhere");
    assert!(rig.says(&host.id, "with urgent lease").await);
}

#[tokio::test]
async fn urgency_1_suspends_the_smallest_best_effort_lease_that_frees_enough() {
    let rig = urgent_rig();
    // 8 nodes: a lease of 6 (with stores) and one of 2 (with stores).
    let big = rig.running_host(6, true, true).await;
    let small = {
        let ws = rig.lease(2, 3600).await;
        let s = &ws.slots[0];
        for n in 7..=8 {
            let node = format!("node{n}");
            rig.send(&s.id, &node, started()).expect("started");
            rig.send(&s.id, &node, reserved_on(true, true))
                .expect("reserved");
        }
        for n in 7..=8 {
            let node = format!("node{n}");
            for c in rig.commands(&s.id, &node) {
                if let CommandKind::StartVm(l) = c {
                    rig.vm_started(&s.id, &node, &l);
                }
            }
        }
        rig.view(&ws.id)
    };
    assert_eq!(small.state, WorkspaceState::Running);
    let urgent = rig.urgent(1, 1).await;
    assert_eq!(rig.view(&small.id).state, WorkspaceState::Suspending);
    assert_eq!(rig.view(&big.id).state, WorkspaceState::Running);
    let u = rig.view(&urgent.id);
    assert!(
        u.slots[0].job_id.is_some(),
        "its pilot job is queued for the freed node"
    );
    assert!(
        rig.says(
            &urgent.id,
            &format!("suspending best-effort lease(s) {}", small.id)
        )
        .await
    );
    assert!(
        rig.says(
            &small.id,
            &format!("suspended for urgent lease {}", urgent.id)
        )
        .await
    );
}

#[tokio::test]
async fn urgency_1_suspends_nothing_while_the_cluster_has_free_nodes_or_nothing_can_be_saved() {
    let rig = urgent_rig();
    let host = rig.running_host(4, true, false).await;
    let urgent = rig.urgent(1, 2).await;
    assert_eq!(
        rig.view(&host.id).state,
        WorkspaceState::Running,
        "4 nodes free"
    );
    assert!(rig.view(&urgent.id).slots[0].job_id.is_some());
    // Full now (4 + 2 + 2), and the only other lease has no checkpoint store.
    let no_store = rig.running_host(2, true, false).await;
    let third = rig.urgent(1, 1).await;
    assert_eq!(rig.view(&no_store.id).state, WorkspaceState::Running);
    assert!(
        rig.says(&third.id, "0 free node(s) of 8").await,
        "{:?}",
        rig.timeline(&third.id).await
    );
}

#[tokio::test]
async fn a_restart_while_sharing_loses_nothing_and_the_end_still_lifts_the_caps() {
    let mut rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let (host_vm, launch) = share_node1(&rig, &host, &urgent).await;
    rig.restart();
    assert_eq!(rig.view(&urgent.id).state, WorkspaceState::Running);
    assert_eq!(rig.view(&host.id).state, WorkspaceState::Running);
    let slot = &host.slots[0].id;
    // Ten minutes pass, the host's pilot polling as live pilots do.
    for _ in 0..10 {
        rig.clock.advance(60_000);
        assert!(rig.commands(slot, "node1").is_empty());
        rig.engine.housekeeping(false).await;
    }
    rig.clock.advance(1_000);
    rig.engine.housekeeping(false).await;
    assert_eq!(
        rig.commands(slot, "node1"),
        vec![CommandKind::DestroyVm {
            vm_id: launch.vm_id.clone()
        }],
        "expired: its VM is destroyed, the host's pilot kept"
    );
    let gone = EventKind::VmDestroyed {
        vm_id: launch.vm_id,
        destroy_ms: 3,
    };
    rig.send(slot, "node1", gone).expect("destroyed");
    assert!(rig.commands(slot, "node1").contains(&CommandKind::SetCpu {
        vm_id: host_vm,
        cpu: CpuShare::default()
    }));
    let u = rig.view(&urgent.id);
    assert_eq!(u.state, WorkspaceState::Expired);
    assert!(u.settled, "{u:?}");
}

#[tokio::test]
async fn an_urgent_vm_that_fails_to_start_fails_its_lease_and_gives_the_node_back() {
    let rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let slot = &host.slots[0].id;
    rig.commands(slot, "node1");
    rig.send(slot, "node1", changed(1024)).expect("changed");
    rig.commands(slot, "node1");
    let set = EventKind::VmCpuSet {
        vm_id: host.vms[0].id.clone(),
        cpu: CpuShare {
            weight: None,
            cap_pct: Some(10),
        },
        mechanism: "sim".into(),
    };
    rig.send(slot, "node1", set).expect("cpu set");
    let Some(CommandKind::StartVm(launch)) = rig.commands(slot, "node1").pop() else {
        panic!("a start_vm");
    };
    let failed = EventKind::VmFailed {
        vm_id: launch.vm_id,
        reason: "image not found".into(),
    };
    rig.send(slot, "node1", failed).expect("vm failed");
    let u = rig.view(&urgent.id);
    assert_eq!(u.state, WorkspaceState::Failed);
    assert!(u.settled, "{u:?}");
    assert!(u.reason.unwrap_or_default().contains("image not found"));
    assert_eq!(
        rig.commands(slot, "node1"),
        vec![
            CommandKind::SetCpu {
                vm_id: host.vms[0].id.clone(),
                cpu: CpuShare::default()
            },
            CommandKind::Reserve { memory_mb: 512 }
        ]
    );
    assert_eq!(rig.view(&host.id).state, WorkspaceState::Running);
}

#[tokio::test]
async fn a_host_pilot_going_silent_fails_the_urgent_lease_with_its_vm_unknown() {
    let rig = urgent_rig();
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let (_, launch) = share_node1(&rig, &host, &urgent).await;
    rig.clock.advance(120_000);
    rig.engine.housekeeping(false).await;
    let u = rig.view(&urgent.id);
    assert_eq!(u.state, WorkspaceState::Failed);
    assert!(
        u.reason.clone().unwrap_or_default().contains("went silent"),
        "{u:?}"
    );
    let vm = u.vms.iter().find(|v| v.id == launch.vm_id).expect("vm");
    assert_eq!(
        vm.state,
        VmState::Unknown,
        "it may still run: not called destroyed"
    );
    assert!(u.settled, "nothing more will report: {u:?}");
}

/// The urgent lease on node1 ends; its VM goes; the host's pilot is sent
/// the lift (and the memory back). Returns the host's VM.
async fn ended_share(rig: &Rig) -> (WorkspaceView, VmId) {
    let host = rig.running_host(1, true, false).await;
    let urgent = rig.urgent(2, 1).await;
    let (host_vm, launch) = share_node1(rig, &host, &urgent).await;
    rig.engine.destroy(&admin(), &urgent.id).expect("destroy");
    let slot = &host.slots[0].id;
    rig.commands(slot, "node1");
    let gone = EventKind::VmDestroyed {
        vm_id: launch.vm_id.clone(),
        destroy_ms: 3,
    };
    rig.send(slot, "node1", gone).expect("destroyed");
    assert_eq!(rig.lifts(slot), 1, "the lift is sent");
    (host, host_vm)
}

fn lift_refused(vm: &VmId) -> EventKind {
    EventKind::VmCpuSetFailed {
        vm_id: vm.clone(),
        cpu: CpuShare::default(),
        reason: "cpu.max: device or resource busy".into(),
    }
}

fn lifted(vm: &VmId) -> EventKind {
    EventKind::VmCpuSet {
        vm_id: vm.clone(),
        cpu: CpuShare::default(),
        mechanism: "sim".into(),
    }
}

impl Rig {
    /// How many lifts (`set_cpu {}`) node1's pilot of `slot` got since last asked.
    fn lifts(&self, slot: &SlotId) -> usize {
        self.commands(slot, "node1")
            .iter()
            .filter(|c| matches!(c, CommandKind::SetCpu { cpu, .. } if cpu.is_default()))
            .count()
    }

    /// `seconds` of housekeeping ticks, one a second; lifts sent meanwhile.
    async fn tick_for(&self, slot: &SlotId, seconds: u64) -> usize {
        let mut n = 0;
        for _ in 0..seconds {
            self.clock.advance(1_000);
            self.engine.housekeeping(false).await;
            n += self.lifts(slot);
        }
        n
    }

    fn stuck_metric(&self) -> i64 {
        self.engine.update_gauges().expect("gauges");
        self.engine.metrics.cpu_caps_stuck.get()
    }
}

#[tokio::test]
async fn a_refused_lift_is_retried_with_backoff_and_succeeds_later() {
    let rig = urgent_rig();
    let (host, vm) = ended_share(&rig).await;
    let slot = &host.slots[0].id;
    rig.send(slot, "node1", lift_refused(&vm)).expect("refused");
    let pending = rig.view(&host.id).vms[0].cap_lift_pending.clone();
    let pending = pending.expect("the host's VM shows its cap stuck");
    assert_eq!(pending.failures, 1);
    assert!(pending.reason.contains("device or resource busy"));
    assert_eq!(rig.stuck_metric(), 1);
    // 5 s, then 10 s, then 30 s after each refusal; never more than one out.
    assert_eq!(rig.tick_for(slot, 4).await, 0, "not before 5 s");
    assert_eq!(rig.tick_for(slot, 1).await, 1, "at 5 s");
    assert_eq!(rig.tick_for(slot, 5).await, 0, "one out, unanswered");
    rig.send(slot, "node1", lift_refused(&vm)).expect("refused");
    assert_eq!(rig.tick_for(slot, 9).await, 0);
    assert_eq!(rig.tick_for(slot, 1).await, 1, "10 s after the second");
    rig.send(slot, "node1", lift_refused(&vm)).expect("refused");
    assert_eq!(rig.tick_for(slot, 29).await, 0);
    assert_eq!(rig.tick_for(slot, 1).await, 1, "30 s after the third");
    let refusals = rig
        .timeline(&host.id)
        .await
        .iter()
        .filter(|(_, d)| d.contains("could NOT be lifted"))
        .count();
    assert_eq!(refusals, 1, "once per failure streak, not per retry");
    rig.send(slot, "node1", lifted(&vm)).expect("lifted");
    assert!(
        rig.says(&host.id, "CPU cap lifted (sim), after 3 failed tries")
            .await,
        "{:?}",
        rig.timeline(&host.id).await
    );
    assert!(rig.view(&host.id).vms[0].cap_lift_pending.is_none());
    assert_eq!(rig.stuck_metric(), 0);
    assert_eq!(rig.tick_for(slot, 120).await, 0, "lifted: no more tries");
}

#[tokio::test]
async fn an_unanswered_lift_counts_as_failed_and_retries_are_bounded() {
    let rig = urgent_rig();
    let (host, _) = ended_share(&rig).await;
    let slot = &host.slots[0].id;
    // The pilot never answers: every 30 s a lift counts as failed, then
    // the wait grows to a minute. Ten minutes: 30 s + 5 s, + 30 + 10, + 30
    // + 30, then one every 90 s: 3 + 5 = 8 tries, no storm.
    let sent = rig.tick_for(slot, 600).await;
    assert_eq!(sent, 8, "lifts in 10 minutes");
    let p = rig.view(&host.id).vms[0].cap_lift_pending.clone();
    let p = p.expect("stuck");
    assert!(p.reason.contains("no answer to set_cpu"), "{p:?}");
    assert_eq!(p.since_ms, T0 + 30_000, "since the first lift timed out");
    let refusals = rig
        .timeline(&host.id)
        .await
        .iter()
        .filter(|(_, d)| d.contains("could NOT be lifted"))
        .count();
    assert_eq!(refusals, 1);
}

#[tokio::test]
async fn a_coordinator_restart_keeps_retrying_a_refused_lift() {
    let mut rig = urgent_rig();
    let (host, vm) = ended_share(&rig).await;
    let slot = host.slots[0].id.clone();
    rig.send(&slot, "node1", lift_refused(&vm))
        .expect("refused");
    rig.restart();
    assert!(rig.view(&host.id).vms[0].cap_lift_pending.is_some());
    assert_eq!(rig.stuck_metric(), 1);
    assert_eq!(rig.tick_for(&slot, 5).await, 1, "retried after the restart");
    rig.send(&slot, "node1", lifted(&vm)).expect("lifted");
    assert_eq!(rig.stuck_metric(), 0);
    assert_eq!(rig.tick_for(&slot, 120).await, 0);
}

#[tokio::test]
async fn the_host_vm_destroyed_meanwhile_stops_the_retries() {
    let rig = urgent_rig();
    let (host, vm) = ended_share(&rig).await;
    let slot = &host.slots[0].id;
    rig.send(slot, "node1", lift_refused(&vm)).expect("refused");
    rig.engine
        .destroy(&admin(), &host.id)
        .expect("destroy host");
    rig.commands(slot, "node1");
    let gone = EventKind::VmDestroyed {
        vm_id: vm.clone(),
        destroy_ms: 3,
    };
    rig.send(slot, "node1", gone).expect("destroyed");
    assert_eq!(rig.tick_for(slot, 300).await, 0, "no lift for a gone VM");
    assert_eq!(rig.stuck_metric(), 0);
    assert!(
        rig.says(&host.id, "no longer lifting its CPU cap").await,
        "{:?}",
        rig.timeline(&host.id).await
    );
}
