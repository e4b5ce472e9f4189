//! Pool slots, CPU shares and warm VMs with `workspace-pilot run` on
//! simulated nodes: the real binary, its fake coordinator sending the
//! commands a pool coordinator would (docs/POOL.md), the sim node's state
//! read back to see what really happened. The real-QEMU flows are in
//! `kvm_pool.rs`, the xen stand-in's in `xen.rs`.

use pilot::checkpoint::Store;
use pilot::hypervisor::sim::{Sim, SimDomain, SimNode};
use pilot::hypervisor::Hypervisor;
use protocol::pilot::{
    CheckpointId, CommandKind, Context, CpuShare, EventKind, ReleaseReason, ReservationCommand,
    RestoreFrom, ResumeFailure, VmLaunch, WarmOutcome,
};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::Coord;

const PILOT: &str = env!("CARGO_BIN_EXE_workspace-pilot");
const WAIT: Duration = Duration::from_secs(10);

/// One simulated batch node and its fake coordinator (one slot).
struct Node {
    sim_dir: PathBuf,
    state_dir: PathBuf,
    key_file: PathBuf,
    node_config: PathBuf,
    slot: SlotId,
    coord: Arc<Coord>,
    url: String,
}

impl Node {
    async fn new(root: &Path, sim: SimNode, node_config: &str) -> Self {
        let sim_dir = root.join("sim");
        Sim::init(&sim_dir, &sim, false).unwrap();
        let key_file = root.join("slot.key");
        let (coord, url) = Coord::start(&key_file).await;
        let path = root.join("node.toml");
        std::fs::write(&path, node_config).unwrap();
        Self {
            sim_dir,
            state_dir: root.join("state"),
            key_file,
            node_config: path,
            slot: coord.slot.clone(),
            coord,
            url,
        }
    }

    fn sim(&self) -> Sim {
        Sim::open(&self.sim_dir).unwrap()
    }

    fn dom0_mb(&self) -> u64 {
        self.sim().dom0_memory().unwrap().current_mb
    }

    fn domains(&self) -> Vec<SimDomain> {
        self.sim().node().unwrap().domains
    }

    fn domain(&self, name: &str) -> SimDomain {
        self.domains()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no domain {name}: {:?}", self.domains()))
    }

    /// `workspace-pilot run` with `extra` arguments (`--pool`, ...).
    fn pilot(&self, memory_mb: u64, extra: &[&str]) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(PILOT);
        cmd.args([
            "run",
            "--slot",
            self.slot.as_str(),
            "--coordinator",
            &self.url,
        ])
        .arg("--key-file")
        .arg(&self.key_file)
        .args(["--memory-mb", &memory_mb.to_string(), "--duration-s", "120"])
        .args(["--grace-s", "5", "--margin-s", "1"])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .args(["--node", "n1", "--hypervisor", "sim"])
        .arg("--sim-dir")
        .arg(&self.sim_dir)
        .arg("--node-config")
        .arg(&self.node_config)
        .args(["--notify-timeout-ms", "300", "--poll-wait-ms", "300"])
        .args(["--startup-budget-s", "5"])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(logs())
        .kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    fn launch(&self, vm_id: &VmId, memory_mb: u64, ws: Option<&WorkspaceId>) -> VmLaunch {
        let mut l = VmLaunch::basic(
            vm_id.clone(),
            VmName::new(self.slot.clone(), vm_id.clone()).to_string(),
            memory_mb,
            1,
            "debian.qcow2".into(),
        );
        l.context = ws.map(|w| Context {
            workspace_id: w.to_string(),
            workspace_name: "w".into(),
            group: "worker".into(),
            peers: Vec::new(),
            ssh_key: None,
        });
        l
    }

    /// The `n`th event of kind `name`.
    async fn nth(&self, name: &str, n: usize) -> EventKind {
        self.coord.wait_for_nth(name, n, WAIT).await.kind
    }
}

fn logs() -> Stdio {
    if std::env::var_os("WSP_TEST_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

async fn exit_code(child: &mut tokio::process::Child, timeout: Duration) -> i32 {
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap_or_else(|_| panic!("pilot still running after {timeout:?}"))
        .unwrap();
    status.code().unwrap_or(-1)
}

fn still_running(child: &mut tokio::process::Child) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "the pilot (its batch job) must still run"
    );
}

fn refused(e: &EventKind) -> (ReservationCommand, String, u64, Option<WorkspaceId>) {
    match e {
        EventKind::ReservationRefused {
            command,
            reason,
            reserved_mb,
            bound_to,
            ..
        } => (*command, reason.clone(), *reserved_mb, bound_to.clone()),
        other => panic!("not reservation_refused: {other:?}"),
    }
}

fn failed_reason(e: &EventKind) -> String {
    match e {
        EventKind::VmFailed { reason, .. } => reason.clone(),
        other => panic!("not vm_failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_slot_starts_idle_is_bound_resized_unbound_and_rebound_without_ending_its_job() {
    let tmp = tempfile::tempdir().unwrap();
    let n = Node::new(tmp.path(), SimNode::new(4096, 2, None), "").await;
    let t0 = protocol::now_ms();
    let mut child = n.pilot(0, &["--pool"]);
    match n.nth("reserved", 1).await {
        EventKind::Reserved {
            reserved_mb,
            idle,
            deadline_ms,
            dom0_after_mb,
            cpu_control,
            ..
        } => {
            assert_eq!((reserved_mb, idle, dom0_after_mb), (0, true, 4096));
            // Its walltime: --duration-s 120 less --margin-s 1.
            let d = deadline_ms.expect("a pool slot says when it ends");
            assert!(
                (t0 + 118_000..=protocol::now_ms() + 119_000).contains(&d),
                "deadline {d}, started {t0}"
            );
            assert!(cpu_control.expect("reported").available);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(n.dom0_mb(), 4096, "an idle slot of 0 MB takes nothing");

    // Idle: no VM starts until the slot is bound.
    let a = WorkspaceId::generate();
    let b = WorkspaceId::generate();
    let vm1 = VmId::generate();
    n.coord
        .command(CommandKind::StartVm(n.launch(&vm1, 1024, Some(&a))));
    let r = failed_reason(&n.nth("vm_failed", 1).await);
    assert!(r.contains("idle"), "{r}");

    // Bound to A with its memory, verified on the node.
    n.coord.command(CommandKind::Bind {
        workspace_id: a.clone(),
        memory_mb: 1536,
    });
    match n.nth("bound", 1).await {
        EventKind::Bound {
            workspace_id,
            reservation,
        } => {
            assert_eq!(workspace_id, a);
            assert_eq!(
                (
                    reservation.reserved_mb,
                    reservation.dom0_before_mb,
                    reservation.dom0_after_mb
                ),
                (1536, 4096, 2560)
            );
            assert!(reservation.deadline_ms > protocol::now_ms());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(n.dom0_mb(), 2560);
    n.coord
        .command(CommandKind::StartVm(n.launch(&vm1, 1024, Some(&a))));
    n.nth("vm_started", 1).await;
    // Another lease's VM, or binding B over A, is refused and changes nothing.
    let vm2 = VmId::generate();
    n.coord
        .command(CommandKind::StartVm(n.launch(&vm2, 256, Some(&b))));
    let r = failed_reason(&n.nth("vm_failed", 2).await);
    assert!(r.contains(&format!("is for workspace {b}")), "{r}");
    n.coord.command(CommandKind::Bind {
        workspace_id: b.clone(),
        memory_mb: 256,
    });
    let (cmd, why, held, bound_to) = refused(&n.nth("reservation_refused", 1).await);
    assert_eq!(cmd, ReservationCommand::Bind);
    assert!(why.contains("unbind it first"), "{why}");
    assert_eq!((held, bound_to.as_ref()), (1536, Some(&a)));
    // The VM's 1024 MB cannot be given back from under it.
    n.coord.command(CommandKind::Reserve { memory_mb: 512 });
    let (_, why, held, _) = refused(&n.nth("reservation_refused", 2).await);
    assert!(why.contains("use 1024 MB"), "{why}");
    assert_eq!(held, 1536);
    // More for A (a resume, say): the same bind grows it.
    n.coord.command(CommandKind::Bind {
        workspace_id: a.clone(),
        memory_mb: 2048,
    });
    n.nth("bound", 2).await;
    assert_eq!(n.dom0_mb(), 2048);

    // Unbound: A's VM destroyed and reported, back to 256 MB idle.
    n.coord.command(CommandKind::Unbind {
        workspace_id: a.clone(),
        memory_mb: 256,
    });
    match n.nth("unbound", 1).await {
        EventKind::Unbound {
            workspace_id,
            vms_destroyed,
            reservation,
        } => {
            assert_eq!(workspace_id, a);
            assert_eq!(vms_destroyed, vec![vm1.clone()]);
            assert_eq!(reservation.reserved_mb, 256);
            assert_eq!(reservation.dom0_after_mb, 3840);
        }
        other => panic!("{other:?}"),
    }
    let kinds = n.coord.kinds();
    let destroyed = kinds.iter().position(|k| *k == "vm_destroyed").unwrap();
    let unbound = kinds.iter().position(|k| *k == "unbound").unwrap();
    assert!(destroyed < unbound, "{kinds:?}");
    assert!(n.domains().is_empty());
    assert_eq!(n.dom0_mb(), 3840);
    still_running(&mut child);

    // The next lease on the same batch job.
    n.coord.command(CommandKind::Bind {
        workspace_id: b.clone(),
        memory_mb: 512,
    });
    n.nth("bound", 3).await;
    n.coord
        .command(CommandKind::StartVm(n.launch(&vm2, 256, Some(&b))));
    n.nth("vm_started", 2).await;
    assert_eq!(n.domains()[0].name, n.launch(&vm2, 256, None).name);
    assert_eq!(n.dom0_mb(), 3584);
    still_running(&mut child);

    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    assert!(n.domains().is_empty());
    assert_eq!(n.dom0_mb(), 4096, "every binding's memory is back");
    assert!(pilot::state::list_state_files(&n.state_dir)
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binding_dom0_cannot_give_is_refused_with_the_figures_and_the_slot_stays_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sim = SimNode::new(4096, 2, None);
    sim.balloon_floor_mb = Some(3000);
    let n = Node::new(tmp.path(), sim, "").await;
    let mut child = n.pilot(512, &["--pool", "--balloon-timeout-ms", "300"]);
    n.nth("reserved", 1).await;
    assert_eq!(n.dom0_mb(), 3584);
    let ws = WorkspaceId::generate();
    // Beyond dom0's minimum: refused before the balloon moves.
    n.coord.command(CommandKind::Bind {
        workspace_id: ws.clone(),
        memory_mb: 4000,
    });
    let (cmd, why, held, bound_to) = refused(&n.nth("reservation_refused", 1).await);
    assert_eq!(cmd, ReservationCommand::Bind);
    assert!(
        why.contains("dom0 has 3584 MB; taking 3488 MB more (this slot holds 512 MB, 4000 MB asked) would leave it below the minimum of 100 MB"),
        "{why}"
    );
    assert_eq!((held, bound_to), (512, None));
    // A balloon that sticks: tried, not reached, put back.
    n.coord.command(CommandKind::Bind {
        workspace_id: ws.clone(),
        memory_mb: 1536,
    });
    let (_, why, held, _) = refused(&n.nth("reservation_refused", 2).await);
    assert!(
        why.contains("did not reach 2560 MB") && why.ends_with("memory put back"),
        "{why}"
    );
    assert_eq!(held, 512);
    assert_eq!(n.dom0_mb(), 3584, "the idle reservation, no more");
    // Still idle: a start is refused, a bind that fits works.
    n.coord
        .command(CommandKind::StartVm(n.launch(&VmId::generate(), 256, None)));
    assert!(failed_reason(&n.nth("vm_failed", 1).await).contains("idle"));
    n.coord.command(CommandKind::Bind {
        workspace_id: ws.clone(),
        memory_mb: 1000,
    });
    n.nth("bound", 1).await;
    assert_eq!(n.dom0_mb(), 3096);
    // A slot that is not a pool slot cannot be bound.
    still_running(&mut child);
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    assert_eq!(n.dom0_mb(), 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signal_while_idle_gives_the_idle_reservation_back() {
    let tmp = tempfile::tempdir().unwrap();
    let n = Node::new(tmp.path(), SimNode::new(4096, 2, None), "").await;
    let mut child = n.pilot(768, &["--pool"]);
    n.nth("reserved", 1).await;
    assert_eq!(n.dom0_mb(), 3328);
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    match n.nth("released", 1).await {
        EventKind::Released {
            reason,
            clean,
            dom0_restored_mb,
            ..
        } => assert_eq!(
            (reason, clean, dom0_restored_mb),
            (ReleaseReason::Preempted, true, 4096)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(n.dom0_mb(), 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_pilot_refuses_bind_but_changes_its_reservation() {
    let tmp = tempfile::tempdir().unwrap();
    let n = Node::new(tmp.path(), SimNode::new(4096, 2, None), "").await;
    let mut child = n.pilot(1024, &[]);
    match n.nth("reserved", 1).await {
        EventKind::Reserved { idle, .. } => assert!(!idle),
        other => panic!("{other:?}"),
    }
    n.coord.command(CommandKind::Bind {
        workspace_id: WorkspaceId::generate(),
        memory_mb: 1024,
    });
    let (_, why, _, _) = refused(&n.nth("reservation_refused", 1).await);
    assert!(why.contains("not a pool slot"), "{why}");
    n.coord.command(CommandKind::Reserve { memory_mb: 2048 });
    match n.nth("reservation_changed", 1).await {
        EventKind::ReservationChanged {
            reservation,
            workspace_id,
        } => {
            assert_eq!((reservation.reserved_mb, workspace_id), (2048, None));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(n.dom0_mb(), 2048);
    // Still serving: a VM starts.
    n.coord.command(CommandKind::StartVm(n.launch(
        &VmId::generate(),
        1536,
        None,
    )));
    n.nth("vm_started", 1).await;
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    assert_eq!(n.dom0_mb(), 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_shares_are_recorded_on_the_sim_node_changed_and_lifted() {
    let tmp = tempfile::tempdir().unwrap();
    let n = Node::new(tmp.path(), SimNode::new(4096, 2, None), "").await;
    let mut child = n.pilot(2048, &[]);
    n.nth("reserved", 1).await;
    let (running, urgent) = (VmId::generate(), VmId::generate());
    n.coord
        .command(CommandKind::StartVm(n.launch(&running, 512, None)));
    n.nth("vm_started", 1).await;
    let running_name = n.launch(&running, 512, None).name;
    assert_eq!(n.domain(&running_name).cpu, None);

    // An urgent VM arrives: the running one is capped, the urgent one
    // starts with its weight.
    let cap = CpuShare {
        weight: None,
        cap_pct: Some(10),
    };
    n.coord.command(CommandKind::SetCpu {
        vm_id: running.clone(),
        cpu: cap,
    });
    match n.nth("vm_cpu_set", 1).await {
        EventKind::VmCpuSet {
            vm_id,
            cpu,
            mechanism,
        } => assert_eq!(
            (vm_id, cpu, mechanism.as_str()),
            (running.clone(), cap, "sim")
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(n.domain(&running_name).cpu, Some(cap));
    let mut l = n.launch(&urgent, 512, None);
    l.urgency = 2;
    l.cpu = Some(CpuShare {
        weight: Some(900),
        cap_pct: None,
    });
    n.coord.command(CommandKind::StartVm(l.clone()));
    n.nth("vm_started", 2).await;
    let d = n.domain(&l.name);
    assert_eq!((d.cpu, d.urgency), (l.cpu, 2));

    // Out of range, or a VM not here: refused with the reason.
    n.coord.command(CommandKind::SetCpu {
        vm_id: running.clone(),
        cpu: CpuShare {
            weight: Some(0),
            cap_pct: None,
        },
    });
    match n.nth("vm_cpu_set_failed", 1).await {
        EventKind::VmCpuSetFailed { reason, .. } => {
            assert!(reason.contains("cpu.weight 0 is out of range"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    n.coord.command(CommandKind::SetCpu {
        vm_id: VmId::generate(),
        cpu: cap,
    });
    match n.nth("vm_cpu_set_failed", 2).await {
        EventKind::VmCpuSetFailed { reason, .. } => {
            assert!(reason.contains("runs on this slot"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let mut bad = n.launch(&VmId::generate(), 128, None);
    bad.urgency = 3;
    n.coord.command(CommandKind::StartVm(bad));
    assert!(failed_reason(&n.nth("vm_failed", 1).await).contains("urgency 3 is out of range"));

    // The urgent lease ends: the cap is lifted.
    n.coord.command(CommandKind::SetCpu {
        vm_id: running.clone(),
        cpu: CpuShare::default(),
    });
    n.nth("vm_cpu_set", 2).await;
    assert_eq!(n.domain(&running_name).cpu, None);
    assert_eq!(
        n.domain(&l.name).cpu,
        l.cpu,
        "the other VM's share is its own"
    );
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
}

fn snapshot_id(vm: &VmId, generation: u32) -> CheckpointId {
    CheckpointId {
        workspace_id: WorkspaceId::parse("ws-00000a4e").unwrap(),
        vm_id: vm.clone(),
        generation,
    }
}

fn store_config(store: &Path) -> String {
    format!("[checkpoints]\ndir = \"{}\"\n", store.display())
}

/// Prepares the `nth` warm snapshot (generation `nth`) of a 256 MB
/// template on `n`; returns its id and manifest digest.
async fn prepare(n: &Node, nth: usize) -> (CheckpointId, String) {
    let t = VmId::generate();
    let to = snapshot_id(&t, nth as u32);
    n.coord.command(CommandKind::PrepareWarm {
        launch: n.launch(&t, 256, None),
        to: to.clone(),
        ready_timeout_s: 10,
    });
    match n.nth("warm_prepared", nth).await {
        EventKind::WarmPrepared {
            checkpoint,
            sha256,
            memory_mb,
            boot_ms,
            ..
        } => {
            assert_eq!((checkpoint.clone(), memory_mb), (to.clone(), 256));
            assert!(boot_ms >= 200, "waited for the guest to boot: {boot_ms} ms");
            (checkpoint, sha256)
        }
        other => panic!("{other:?}"),
    }
}

fn warm_launch(n: &Node, vm: &VmId, ws: &WorkspaceId, to: &CheckpointId, sha: &str) -> VmLaunch {
    let mut l = n.launch(vm, 256, Some(ws));
    l.restore = Some(RestoreFrom {
        checkpoint: to.clone(),
        sha256: sha.to_string(),
        warm: true,
    });
    l
}

fn warm_outcome(e: &EventKind) -> WarmOutcome {
    match e {
        EventKind::VmStarted { warm: Some(w), .. } => w.clone(),
        other => panic!("not a warm vm_started: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_vms_start_from_a_clean_snapshot_and_never_see_the_previous_users_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let mut sim = SimNode::new(4096, 2, None);
    sim.latency.boot_ms = 300;
    sim.latency.create_ms = 20;
    let n = Node::new(tmp.path(), sim, &store_config(&store_dir)).await;
    let mut child = n.pilot(256, &["--pool"]);
    n.nth("reserved", 1).await;

    // The idle slot's 256 MB hold the template while it boots.
    let (to, sha) = prepare(&n, 1).await;
    assert!(n.domains().is_empty(), "the template is gone");
    let store = Store::at(&store_dir).unwrap();
    store
        .open_verified(&to, Some(&sha))
        .unwrap()
        .verify_all()
        .unwrap();

    // User A's VM from the snapshot; A writes a file on its disk.
    let (wa, wb) = (WorkspaceId::generate(), WorkspaceId::generate());
    n.coord.command(CommandKind::Bind {
        workspace_id: wa.clone(),
        memory_mb: 256,
    });
    n.nth("bound", 1).await;
    let va = VmId::generate();
    let la = warm_launch(&n, &va, &wa, &to, &sha);
    n.coord.command(CommandKind::StartVm(la.clone()));
    match warm_outcome(&n.nth("vm_started", 1).await) {
        WarmOutcome::Restored { checkpoint, .. } => assert_eq!(checkpoint, to),
        other => panic!("{other:?}"),
    }
    let a_boot = n.domain(&la.name).boot_id.clone();
    n.sim().write_guest_file(&la.name, "a-secret").unwrap();
    assert_eq!(n.domain(&la.name).files, vec!["a-secret".to_string()]);
    // A guest's files do travel with its own checkpoints (suspend, resume):
    // what keeps them from B is the clean snapshot.
    let a_ck = CheckpointId {
        workspace_id: wa.clone(),
        vm_id: va.clone(),
        generation: 1,
    };
    n.coord.command(CommandKind::SuspendVm {
        vm_id: va.clone(),
        to: a_ck.clone(),
    });
    let a_sha = match n.nth("vm_suspended", 1).await {
        EventKind::VmSuspended { sha256, .. } => sha256,
        other => panic!("{other:?}"),
    };
    let mut resume = n.launch(&va, 256, Some(&wa));
    resume.restore = Some(RestoreFrom {
        checkpoint: a_ck,
        sha256: a_sha,
        warm: false,
    });
    n.coord.command(CommandKind::StartVm(resume));
    n.nth("vm_resumed", 1).await;
    assert_eq!(n.domain(&la.name).files, vec!["a-secret".to_string()]);

    // A's lease ends on this slot; B's VM comes from the same snapshot.
    n.coord.command(CommandKind::Unbind {
        workspace_id: wa,
        memory_mb: 0,
    });
    n.nth("unbound", 1).await;
    n.coord.command(CommandKind::Bind {
        workspace_id: wb.clone(),
        memory_mb: 256,
    });
    n.nth("bound", 2).await;
    let vb = VmId::generate();
    let lb = warm_launch(&n, &vb, &wb, &to, &sha);
    n.coord.command(CommandKind::StartVm(lb.clone()));
    assert!(matches!(
        warm_outcome(&n.nth("vm_started", 2).await),
        WarmOutcome::Restored { .. }
    ));
    let d = n.domain(&lb.name);
    assert!(d.files.is_empty(), "B sees A's files: {:?}", d.files);
    assert_eq!(d.boot_id, a_boot, "both come from the one clean boot");
    // The snapshot is as it was made.
    store
        .open_verified(&to, Some(&sha))
        .unwrap()
        .verify_all()
        .unwrap();
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_warm_snapshot_is_refused_by_checksum_and_the_vm_is_cold_booted() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let mut sim = SimNode::new(4096, 2, None);
    sim.latency.boot_ms = 200;
    let n = Node::new(tmp.path(), sim, &store_config(&store_dir)).await;
    let mut child = n.pilot(1024, &[]);
    n.nth("reserved", 1).await;
    let (to, sha) = prepare(&n, 1).await;
    let template_boot = {
        // A warm start before the damage, for its boot id.
        let v = VmId::generate();
        let ws = WorkspaceId::generate();
        let l = warm_launch(&n, &v, &ws, &to, &sha);
        n.coord.command(CommandKind::StartVm(l.clone()));
        n.nth("vm_started", 1).await;
        let b = n.domain(&l.name).boot_id;
        n.coord.command(CommandKind::DestroyVm { vm_id: v });
        n.nth("vm_destroyed", 1).await;
        b
    };
    // A digest other than warm_prepared's is refused (the manifest was
    // replaced, or the coordinator mixed snapshots up).
    let v2 = VmId::generate();
    let l2 = warm_launch(&n, &v2, &WorkspaceId::generate(), &to, &"0".repeat(64));
    n.coord.command(CommandKind::StartVm(l2));
    match warm_outcome(&n.nth("vm_started", 2).await) {
        WarmOutcome::ColdBooted { cause, .. } => assert_eq!(cause, ResumeFailure::ChecksumMismatch),
        other => panic!("{other:?}"),
    }
    // One flipped byte in the snapshot's state.
    let file = Store::at(&store_dir).unwrap().path(&to).join("sim-state");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let v = VmId::generate();
    let l = warm_launch(&n, &v, &WorkspaceId::generate(), &to, &sha);
    n.coord.command(CommandKind::StartVm(l.clone()));
    match warm_outcome(&n.nth("vm_started", 3).await) {
        WarmOutcome::ColdBooted {
            checkpoint,
            cause,
            reason,
        } => {
            assert_eq!(checkpoint, to);
            assert_eq!(cause, ResumeFailure::ChecksumMismatch);
            assert!(reason.contains("sim-state"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let d = n.domain(&l.name);
    assert_ne!(d.boot_id, template_boot, "booted, not restored");
    assert_eq!(d.state, "running");
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
    assert!(n.domains().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn prepare_warm_is_refused_without_memory_or_store_or_for_a_template_with_an_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let n = Node::new(tmp.path(), SimNode::new(4096, 2, None), "").await;
    let mut child = n.pilot(128, &["--pool"]);
    n.nth("reserved", 1).await;
    let reason = |e: EventKind| match e {
        EventKind::WarmPrepareFailed { reason, .. } => reason,
        other => panic!("{other:?}"),
    };
    let t = VmId::generate();
    let prep = |l: VmLaunch| CommandKind::PrepareWarm {
        to: snapshot_id(&l.vm_id, 1),
        launch: l,
        ready_timeout_s: 5,
    };
    n.coord.command(prep(n.launch(&t, 256, None)));
    let r = reason(n.nth("warm_prepare_failed", 1).await);
    assert!(
        r.contains("not enough memory: the template needs 256 MB; this slot reserved 128 MB"),
        "{r}"
    );
    n.coord
        .command(prep(n.launch(&t, 128, Some(&WorkspaceId::generate()))));
    let r = reason(n.nth("warm_prepare_failed", 2).await);
    assert!(r.contains("no identity"), "{r}");
    n.coord.command(prep(n.launch(&t, 128, None)));
    let r = reason(n.nth("warm_prepare_failed", 3).await);
    assert!(r.contains("[checkpoints] dir"), "no store: {r}");
    assert!(n.domains().is_empty());
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
}

/// The sim half of the warm-vs-cold bench (scripts/bench-warm.sh --sim;
/// BENCHMARKS.md): every sim latency 0 except a template boot of 300 ms,
/// so what is timed is the pilot's own work from the start command to
/// `vm_started` (`create_ms`): for a warm start, opening and verifying the
/// snapshot (manifest digest, every file's SHA-256) and the sim's restore;
/// for a cold start, the plain launch. `WSP_BENCH_REPEATS` (20) of each.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: scripts/bench-warm.sh --sim"]
async fn bench_sim_warm_start_against_cold_start() {
    let repeats: usize = std::env::var("WSP_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(1);
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let mut sim = SimNode::new(4096, 2, None);
    sim.latency.boot_ms = 300;
    let n = Node::new(tmp.path(), sim, &store_config(&store_dir)).await;
    let mut child = n.pilot(256, &["--pool"]);
    n.nth("reserved", 1).await;
    let (to, sha) = prepare(&n, 1).await;
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    let mut k = 0;
    for _ in 0..repeats {
        for w in [true, false] {
            k += 1;
            let ws = WorkspaceId::generate();
            n.coord.command(CommandKind::Bind {
                workspace_id: ws.clone(),
                memory_mb: 256,
            });
            n.nth("bound", k).await;
            let vm = VmId::generate();
            let l = if w {
                warm_launch(&n, &vm, &ws, &to, &sha)
            } else {
                n.launch(&vm, 256, Some(&ws))
            };
            n.coord.command(CommandKind::StartVm(l));
            match n.nth("vm_started", k).await {
                EventKind::VmStarted {
                    create_ms,
                    warm: outcome,
                    ..
                } => {
                    assert_eq!(matches!(outcome, Some(WarmOutcome::Restored { .. })), w);
                    if w {
                        warm.push(create_ms);
                    } else {
                        cold.push(create_ms);
                    }
                }
                other => panic!("{other:?}"),
            }
            n.coord.command(CommandKind::Unbind {
                workspace_id: ws,
                memory_mb: 0,
            });
            n.nth("unbound", k).await;
        }
    }
    warm.sort_unstable();
    cold.sort_unstable();
    let bytes: u64 = walk_bytes(&store_dir);
    println!(
        "sim, medians of {repeats}: start command to vm_started: warm {} ms (snapshot {bytes} bytes), cold {} ms",
        warm[warm.len() / 2],
        cold[cold.len() / 2]
    );
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
}

fn walk_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    };
    rd.flatten().map(|e| walk_bytes(&e.path())).sum()
}

/// Whether some reader (a restore) holds the snapshot's manifest now.
fn being_read(store: &Store, id: &CheckpointId) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.path(id).join("manifest.json"))
        .unwrap();
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_warm_snapshot_deletes_the_older_ones_but_not_one_another_node_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = Store::at(&store_dir).unwrap();
    let mut sim = SimNode::new(4096, 2, None);
    sim.latency.boot_ms = 200;
    // Node b restores slowly: 256 MB at 16 s per GB, 4 s.
    let mut slow = sim.clone();
    slow.latency.restore_ms_per_gb = 16_000;
    std::fs::create_dir_all(tmp.path().join("a")).unwrap();
    std::fs::create_dir_all(tmp.path().join("b")).unwrap();
    let a = Node::new(&tmp.path().join("a"), sim, &store_config(&store_dir)).await;
    let b = Node::new(&tmp.path().join("b"), slow, &store_config(&store_dir)).await;
    let mut pa = a.pilot(1024, &[]);
    let mut pb = b.pilot(1024, &[]);
    a.nth("reserved", 1).await;
    b.nth("reserved", 1).await;

    let (s1, sha1) = prepare(&a, 1).await;
    // Node b (sharing the store) starts a warm VM from s1 ...
    let l = warm_launch(&b, &VmId::generate(), &WorkspaceId::generate(), &s1, &sha1);
    b.coord.command(CommandKind::StartVm(l.clone()));
    let t0 = std::time::Instant::now();
    while !being_read(&store, &s1) {
        assert!(t0.elapsed() < WAIT, "node b never opened {s1}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... while node a makes s2: s1 is superseded but kept, being read.
    let (s2, _) = prepare(&a, 2).await;
    assert!(
        store.path(&s1).join("manifest.json").exists(),
        "s1 deleted under a restore"
    );
    match warm_outcome(&b.nth("vm_started", 1).await) {
        WarmOutcome::Restored { checkpoint, .. } => assert_eq!(checkpoint, s1),
        other => panic!("the restore of s1 did not survive: {other:?}"),
    }
    assert_eq!(b.domain(&l.name).state, "running");

    // The next snapshot deletes both older ones: one snapshot in the store.
    let (s3, sha3) = prepare(&a, 3).await;
    let left: Vec<CheckpointId> = store.list().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(left, vec![s3.clone()], "s1 {s1} and s2 {s2} gone");
    store
        .open_verified(&s3, Some(&sha3))
        .unwrap()
        .verify_all()
        .unwrap();
    for (n, p) in [(&a, &mut pa), (&b, &mut pb)] {
        n.coord.command(CommandKind::Release);
        assert_eq!(exit_code(p, WAIT).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_starting_pilot_removes_what_a_pilot_killed_mid_save_on_its_node_left() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = Store::at(&store_dir).unwrap();
    // Two unfinished snapshots whose writers died: one on this node (n1),
    // one on another node sharing the store.
    let half = |node: &str| {
        let id = snapshot_id(&VmId::generate(), 1);
        let who = pilot::checkpoint::WriterInfo {
            node: node.into(),
            slot: "sl-00000001".into(),
            pid: 1,
            started_ms: 1,
        };
        let w = store.begin(&id, who).unwrap();
        let mut f = w.create("sim-state").unwrap();
        std::io::Write::write_all(&mut f, &[1u8; 4096]).unwrap();
        drop(f.finish().unwrap());
        // The process dies: no Drop, and the kernel drops its lock.
        std::mem::forget(w);
        std::fs::remove_file(store.path(&id).join(".writing")).unwrap();
        id
    };
    let ours = half("n1");
    let theirs = half("n9");
    let n = Node::new(
        tmp.path(),
        SimNode::new(4096, 2, None),
        &store_config(&store_dir),
    )
    .await;
    let mut child = n.pilot(512, &[]);
    n.nth("reserved", 1).await;
    let t0 = std::time::Instant::now();
    while store.path(&ours).exists() {
        assert!(t0.elapsed() < WAIT, "{ours} left by the new pilot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        store.path(&theirs).exists(),
        "another node's is its own to clean"
    );
    n.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, WAIT).await, 0);
}
