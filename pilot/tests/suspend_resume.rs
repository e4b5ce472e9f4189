//! Suspend and resume with `workspace-pilot run` on simulated nodes: the real
//! binary, two nodes (each its sim directory, state dir and fake
//! coordinator) sharing one checkpoint store, as two batch nodes sharing a
//! filesystem. The real-QEMU flow is in `kvm_suspend.rs`, the xen stand-in's
//! in `xen.rs`.

use pilot::checkpoint::{CkError, ListedState, Store};
use pilot::hypervisor::sim::{Sim, SimNode};
use pilot::hypervisor::Hypervisor;
use protocol::pilot::{
    CheckpointId, CommandKind, EventKind, OnPreempt, PilotEvent, ReleaseReason, RestoreFrom,
    ResumeFailure, SuspendFailure, SuspendTrigger, VmLaunch,
};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::Coord;

const PILOT: &str = env!("CARGO_BIN_EXE_workspace-pilot");

/// `workspace-kill-all` from this test's target directory (another package:
/// build it first, `cargo build --workspace --bins`).
fn kill_all_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("workspace-kill-all");
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// One simulated batch node with its own fake coordinator (one slot).
struct Node {
    name: String,
    sim_dir: PathBuf,
    state_dir: PathBuf,
    key_file: PathBuf,
    node_config: PathBuf,
    slot: SlotId,
    coord: Arc<Coord>,
    url: String,
}

impl Node {
    /// `checkpoints` is the node config's `[checkpoints]` body.
    async fn new(root: &Path, name: &str, sim: SimNode, checkpoints: &str) -> Self {
        let dir = root.join(name);
        let sim_dir = dir.join("sim");
        Sim::init(&sim_dir, &sim, false).unwrap();
        let key_file = dir.join("slot.key");
        let (coord, url) = Coord::start(&key_file).await;
        let node_config = dir.join("node.toml");
        std::fs::write(&node_config, format!("[checkpoints]\n{checkpoints}\n")).unwrap();
        Self {
            name: name.to_string(),
            sim_dir,
            state_dir: dir.join("state"),
            key_file,
            node_config,
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

    fn domains(&self) -> Vec<pilot::hypervisor::sim::SimDomain> {
        self.sim().node().unwrap().domains
    }

    fn pilot(&self, memory_mb: u64, grace_s: u64) -> tokio::process::Child {
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
        .args(["--grace-s", &grace_s.to_string(), "--margin-s", "1"])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .args(["--node", &self.name, "--hypervisor", "sim"])
        .arg("--sim-dir")
        .arg(&self.sim_dir)
        .arg("--node-config")
        .arg(&self.node_config)
        .args(["--notify-timeout-ms", "300", "--poll-wait-ms", "300"])
        .args(["--startup-budget-s", "5"])
        .stdin(Stdio::null())
        .stderr(logs())
        .kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    fn launch(&self, vm_id: &VmId, memory_mb: u64) -> VmLaunch {
        VmLaunch::basic(
            vm_id.clone(),
            VmName::new(self.slot.clone(), vm_id.clone()).to_string(),
            memory_mb,
            1,
            "debian.qcow2".into(),
        )
    }

    /// Starts a pilot and waits until it has reserved.
    async fn reserved(&self, memory_mb: u64, grace_s: u64) -> tokio::process::Child {
        let child = self.pilot(memory_mb, grace_s);
        self.coord
            .wait_for("reserved", Duration::from_secs(10))
            .await;
        child
    }

    /// Starts `launch` and waits for `event` (vm_started, vm_resumed, ...).
    async fn start(&self, launch: VmLaunch, event: &str) -> PilotEvent {
        self.coord.command(CommandKind::StartVm(launch));
        self.coord.wait_for(event, Duration::from_secs(15)).await
    }
}

/// `workspace-pilot checkpoint <args>`: exit code and stdout.
fn checkpoint_cli(args: &[&str], store: &Path) -> (i32, String) {
    let o = std::process::Command::new(PILOT)
        .arg("checkpoint")
        .args(&args[..1])
        .arg("--store")
        .arg(store)
        .args(&args[1..])
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
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

fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, sig).unwrap();
}

fn checkpoint(vm_id: &VmId, generation: u32) -> CheckpointId {
    CheckpointId {
        workspace_id: WorkspaceId::parse("ws-00c0ffee").unwrap(),
        vm_id: vm_id.clone(),
        generation,
    }
}

fn store_cfg(store: &Path, rate: &str) -> String {
    format!("dir = \"{}\"\nsave_mb_per_s = {rate}", store.display())
}

/// The digest and bytes of a `vm_suspended` event.
fn suspended(e: &PilotEvent) -> (String, u64, SuspendTrigger) {
    match &e.kind {
        EventKind::VmSuspended {
            sha256,
            bytes,
            trigger,
            ..
        } => (sha256.clone(), *bytes, *trigger),
        other => panic!("not vm_suspended: {other:?}"),
    }
}

fn resume_failed(e: &PilotEvent) -> (ResumeFailure, String) {
    match &e.kind {
        EventKind::VmResumeFailed { cause, reason, .. } => (*cause, reason.clone()),
        other => panic!("not vm_resume_failed: {other:?}"),
    }
}

/// Node a: a VM that asks to be suspended, suspended by the batch system's
/// warning `sig`. Returns node a, the VM, its checkpoint, the manifest
/// digest and its boot id.
async fn suspended_on(
    root: &Path,
    store: &Path,
    sig: nix::sys::signal::Signal,
) -> (Node, VmId, CheckpointId, String, String) {
    let a = Node::new(
        root,
        "a",
        SimNode::new(4096, 2, None),
        &store_cfg(store, "500"),
    )
    .await;
    let mut child = a.reserved(1024, 5).await;
    let vm_id = VmId::generate();
    let to = checkpoint(&vm_id, 1);
    let mut launch = a.launch(&vm_id, 512);
    launch.on_preempt = OnPreempt::Suspend { to: to.clone() };
    a.start(launch, "vm_started").await;
    let boot_id = a.domains()[0].boot_id.clone();
    assert_eq!(boot_id.len(), 16, "a boot id: {boot_id:?}");
    signal(&child, sig);
    assert_eq!(exit_code(&mut child, Duration::from_secs(6)).await, 0);
    let (sha, _, trigger) = suspended(&a.coord.wait_for("vm_suspended", Duration::ZERO).await);
    assert_eq!(trigger, SuspendTrigger::Preempted);
    (a, vm_id, to, sha, boot_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn sim_vm_suspended_on_sigterm_resumes_on_another_node_with_its_boot_id() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let (a, vm_id, to, sha, boot_id) =
        suspended_on(tmp.path(), &store_dir, nix::sys::signal::Signal::SIGTERM).await;

    // Node a: the VM left as a checkpoint, not destroyed; memory is back.
    assert_eq!(
        a.coord.kinds(),
        vec![
            "started",
            "reserved",
            "vm_started",
            "preempting",
            "vm_suspended",
            "released"
        ]
    );
    let events = a.coord.events();
    match &events[1].kind {
        EventKind::Reserved { checkpoints, .. } => {
            let c = checkpoints.as_ref().expect("a store is configured");
            assert_eq!((c.save_mb_per_s, c.measured), (500.0, false));
        }
        other => panic!("{other:?}"),
    }
    match &events[3].kind {
        EventKind::Preempting {
            suspending,
            not_suspending,
            ..
        } => {
            assert_eq!(suspending, &vec![vm_id.clone()]);
            assert_eq!(not_suspending, &None);
        }
        other => panic!("{other:?}"),
    }
    match &events[4].kind {
        EventKind::VmSuspended {
            checkpoint,
            bytes,
            memory_mb,
            ..
        } => {
            assert_eq!(checkpoint, &to);
            assert_eq!(*memory_mb, 512);
            assert!(*bytes > 512 * 1024, "1 KiB per MB plus the record: {bytes}");
        }
        other => panic!("{other:?}"),
    }
    match &events[5].kind {
        EventKind::Released {
            reason,
            vms_destroyed,
            vms_suspended,
            clean,
            ..
        } => {
            assert_eq!(*reason, ReleaseReason::Preempted);
            assert!(vms_destroyed.is_empty(), "{vms_destroyed:?}");
            assert_eq!(vms_suspended, &vec![vm_id.clone()]);
            assert!(clean);
        }
        other => panic!("{other:?}"),
    }
    assert!(a.domains().is_empty());
    assert_eq!(a.dom0_mb(), 4096);
    assert!(pilot::state::list_state_files(&a.state_dir)
        .unwrap()
        .is_empty());
    let store = Store::at(&store_dir).unwrap();
    store
        .open_verified(&to, Some(&sha))
        .unwrap()
        .verify_all()
        .unwrap();

    // Node b, another slot: the same guest comes back under its new name.
    let b = Node::new(
        tmp.path(),
        "b",
        SimNode::new(4096, 2, None),
        &store_cfg(&store_dir, "500"),
    )
    .await;
    let mut child = b.reserved(1024, 5).await;
    let mut launch = b.launch(&vm_id, 512);
    launch.restore = Some(RestoreFrom {
        checkpoint: to.clone(),
        sha256: sha.clone(),
        warm: false,
    });
    let e = b.start(launch.clone(), "vm_resumed").await;
    match &e.kind {
        EventKind::VmResumed { name, bytes, .. } => {
            assert_eq!(name, &launch.name);
            assert!(*bytes > 512 * 1024);
        }
        other => panic!("{other:?}"),
    }
    let ds = b.domains();
    assert_eq!(ds.len(), 1);
    assert_eq!(
        (ds[0].name.as_str(), ds[0].state.as_str()),
        (launch.name.as_str(), "running")
    );
    assert_eq!(ds[0].boot_id, boot_id, "the same guest, not a reboot");

    // Deleted when the coordinator says so; the store is left empty.
    b.coord.command(CommandKind::DeleteCheckpoint {
        checkpoint: to.clone(),
    });
    match b
        .coord
        .wait_for("checkpoint_deleted", Duration::from_secs(5))
        .await
        .kind
    {
        EventKind::CheckpointDeleted { bytes, .. } => assert!(bytes > 512 * 1024),
        other => panic!("{other:?}"),
    }
    assert!(store.list().unwrap().is_empty());
    b.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    assert!(b.domains().is_empty());
    assert_eq!(b.dom0_mb(), 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn commanded_suspend_takes_the_vm_off_and_a_failed_one_leaves_it_running() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let a = Node::new(
        tmp.path(),
        "a",
        SimNode::new(4096, 2, None),
        &store_cfg(&store_dir, "100"),
    )
    .await;
    let mut child = a.reserved(1024, 5).await;
    let vm_id = VmId::generate();
    a.start(a.launch(&vm_id, 256), "vm_started").await;
    let boot_id = a.domains()[0].boot_id.clone();
    let to = checkpoint(&vm_id, 1);
    a.coord.command(CommandKind::SuspendVm {
        vm_id: vm_id.clone(),
        to: to.clone(),
    });
    let (sha, _, trigger) = suspended(
        &a.coord
            .wait_for("vm_suspended", Duration::from_secs(10))
            .await,
    );
    assert_eq!(trigger, SuspendTrigger::Commanded);
    assert!(a.domains().is_empty(), "the VM left the node");

    // Back on the same node, same slot: resumed, same guest.
    let mut launch = a.launch(&vm_id, 256);
    launch.restore = Some(RestoreFrom {
        checkpoint: to.clone(),
        sha256: sha,
        warm: false,
    });
    a.start(launch, "vm_resumed").await;
    assert_eq!(a.domains()[0].boot_id, boot_id);

    // Suspending again to the same checkpoint would overwrite a complete
    // one: refused, and the VM goes on running.
    a.coord.command(CommandKind::SuspendVm {
        vm_id: vm_id.clone(),
        to: to.clone(),
    });
    match a
        .coord
        .wait_for("vm_suspend_failed", Duration::from_secs(10))
        .await
        .kind
    {
        EventKind::VmSuspendFailed {
            cause,
            reason,
            vm_running,
            ..
        } => {
            assert_eq!(cause, SuspendFailure::Failed);
            assert!(reason.contains("already exists"), "{reason}");
            assert!(vm_running);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.domains()[0].state, "running");
    // An unknown VM is a clear refusal too.
    let other = VmId::generate();
    a.coord.command(CommandKind::SuspendVm {
        vm_id: other.clone(),
        to: checkpoint(&other, 1),
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fails: Vec<_> = a
        .coord
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::VmSuspendFailed { cause, reason, .. } => Some((cause, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(fails.len(), 2, "{fails:?}");
    assert_eq!(fails[1].0, SuspendFailure::NoSuchVm);
    assert!(fails[1].1.contains("no VM"), "{}", fails[1].1);
    a.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    assert!(a.domains().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_save_that_would_not_fit_the_grace_destroys_the_vm_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let a = Node::new(
        tmp.path(),
        "a",
        SimNode::new(4096, 2, None),
        &store_cfg(&store_dir, "50"),
    )
    .await;
    let mut child = a.reserved(2048, 3).await;
    let vm_id = VmId::generate();
    let mut launch = a.launch(&vm_id, 1024);
    launch.on_preempt = OnPreempt::Suspend {
        to: checkpoint(&vm_id, 1),
    };
    a.start(launch, "vm_started").await;
    let t = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut child, Duration::from_secs(4)).await, 0);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "exited within the grace"
    );
    let kinds = a.coord.kinds();
    assert!(!kinds.contains(&"vm_suspended"), "{kinds:?}");
    match a.coord.wait_for("preempting", Duration::ZERO).await.kind {
        EventKind::Preempting {
            suspending,
            not_suspending,
            ..
        } => {
            assert!(suspending.is_empty());
            let why = not_suspending.expect("the reason");
            // 1024 MB at 50 MB/s, times 1.25 = 25.6 s.
            assert!(
                why.starts_with("save did not fit the grace: needs ~25.6 s")
                    && why.contains("1024 MB at 50 MB/s")
                    && why.contains("left"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    match a
        .coord
        .wait_for("vm_suspend_failed", Duration::ZERO)
        .await
        .kind
    {
        EventKind::VmSuspendFailed {
            cause,
            reason,
            vm_running,
            ..
        } => {
            assert_eq!(cause, SuspendFailure::WouldNotFit);
            assert!(reason.starts_with("save did not fit the grace"), "{reason}");
            assert!(!vm_running);
        }
        other => panic!("{other:?}"),
    }
    match a.coord.wait_for("released", Duration::ZERO).await.kind {
        EventKind::Released {
            vms_destroyed,
            vms_suspended,
            clean,
            ..
        } => {
            assert_eq!(vms_destroyed, vec![vm_id]);
            assert!(vms_suspended.is_empty() && clean);
        }
        other => panic!("{other:?}"),
    }
    assert!(a.domains().is_empty());
    assert_eq!(a.dom0_mb(), 4096);
    assert!(Store::at(&store_dir).unwrap().list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_save_that_does_not_finish_in_the_grace_is_abandoned_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    // The pilot expects 100 GB/s; the node takes 20 s per GB.
    let mut sim = SimNode::new(4096, 2, None);
    sim.latency.save_ms_per_gb = 20_000;
    let a = Node::new(tmp.path(), "a", sim, &store_cfg(&store_dir, "100000")).await;
    let mut child = a.reserved(1024, 4).await;
    let vm_id = VmId::generate();
    let mut launch = a.launch(&vm_id, 512);
    launch.on_preempt = OnPreempt::Suspend {
        to: checkpoint(&vm_id, 1),
    };
    a.start(launch, "vm_started").await;
    let t = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut child, Duration::from_secs(5)).await, 0);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "exited within the grace: {:?}",
        t.elapsed()
    );
    match a
        .coord
        .wait_for("vm_suspend_failed", Duration::ZERO)
        .await
        .kind
    {
        EventKind::VmSuspendFailed {
            cause,
            reason,
            vm_running,
            ..
        } => {
            assert_eq!(cause, SuspendFailure::TimedOut);
            assert!(
                reason.starts_with("save did not finish within the grace period"),
                "{reason}"
            );
            assert!(!vm_running);
        }
        other => panic!("{other:?}"),
    }
    match a.coord.wait_for("released", Duration::ZERO).await.kind {
        EventKind::Released {
            vms_destroyed,
            clean,
            ..
        } => {
            assert_eq!(vms_destroyed, vec![vm_id]);
            assert!(clean);
        }
        other => panic!("{other:?}"),
    }
    assert!(a.domains().is_empty());
    assert_eq!(a.dom0_mb(), 4096);
    assert!(
        Store::at(&store_dir).unwrap().list().unwrap().is_empty(),
        "the unfinished checkpoint was removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_checkpoint_or_a_wrong_digest_is_refused_and_nothing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    // Grid Engine warns with SIGUSR2: the same suspend.
    let (_a, vm_id, to, sha, _) =
        suspended_on(tmp.path(), &store_dir, nix::sys::signal::Signal::SIGUSR2).await;
    let b = Node::new(
        tmp.path(),
        "b",
        SimNode::new(4096, 2, None),
        &store_cfg(&store_dir, "500"),
    )
    .await;
    let mut child = b.reserved(1024, 5).await;
    let resume = |sha: &str| {
        let mut l = b.launch(&vm_id, 512);
        l.restore = Some(RestoreFrom {
            checkpoint: to.clone(),
            sha256: sha.to_string(),
            warm: false,
        });
        l
    };
    // A digest other than the one reported: the manifest is not that one.
    let (cause, reason) =
        resume_failed(&b.start(resume(&"ab".repeat(32)), "vm_resume_failed").await);
    assert_eq!(cause, ResumeFailure::ChecksumMismatch);
    assert!(reason.contains("manifest.json"), "{reason}");

    // One flipped byte in the state file.
    let file = Store::at(&store_dir).unwrap().path(&to).join("sim-state");
    let mut bytes = std::fs::read(&file).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    b.coord.command(CommandKind::StartVm(resume(&sha)));
    let start = Instant::now();
    let second = loop {
        let fails: Vec<_> = b
            .coord
            .events()
            .into_iter()
            .filter(|e| e.kind.name() == "vm_resume_failed")
            .collect();
        if fails.len() == 2 {
            break fails[1].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            b.coord.kinds()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (cause, reason) = resume_failed(&second);
    assert_eq!(cause, ResumeFailure::ChecksumMismatch);
    assert!(
        reason.contains("checksum mismatch") && reason.contains("sim-state"),
        "{reason}"
    );
    assert!(b.domains().is_empty(), "nothing runs");
    assert!(
        file.exists(),
        "the checkpoint is kept for the coordinator to decide"
    );

    // The admin sees it too, and removes it.
    let id = to.to_string();
    let (code, out) = checkpoint_cli(&["list"], &store_dir);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{id}  complete")), "{out}");
    let (code, out) = checkpoint_cli(&["verify", &id], &store_dir);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED: checksum mismatch") && out.contains("sim-state"),
        "{out}"
    );
    let (code, out) = checkpoint_cli(&["delete", &id], &store_dir);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted"), "{out}");
    assert!(Store::at(&store_dir).unwrap().list().unwrap().is_empty());
    b.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    assert_eq!(b.dom0_mb(), 4096);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_on_a_slot_without_the_memory_is_refused_with_the_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let (_a, vm_id, to, sha, _) =
        suspended_on(tmp.path(), &store_dir, nix::sys::signal::Signal::SIGTERM).await;
    let b = Node::new(
        tmp.path(),
        "b",
        SimNode::new(4096, 2, None),
        &store_cfg(&store_dir, "500"),
    )
    .await;
    let mut child = b.reserved(768, 5).await;
    let other = VmId::generate();
    b.start(b.launch(&other, 384), "vm_started").await;
    let mut l = b.launch(&vm_id, 512);
    l.restore = Some(RestoreFrom {
        checkpoint: to.clone(),
        sha256: sha,
        warm: false,
    });
    let (cause, reason) = resume_failed(&b.start(l, "vm_resume_failed").await);
    assert_eq!(cause, ResumeFailure::NoMemory);
    assert_eq!(
        reason,
        "not enough memory: the VM needs 512 MB; this slot reserved 768 MB, 384 MB in use by 1 VM(s), 384 MB free"
    );
    assert_eq!(b.domains().len(), 1, "only the other VM");
    b.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pilot_killed_mid_save_leaves_no_usable_checkpoint_and_kill_all_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let mut sim = SimNode::new(4096, 2, None);
    sim.latency.save_ms_per_gb = 30_000;
    let a = Node::new(tmp.path(), "a", sim, &store_cfg(&store_dir, "1000")).await;
    let mut child = a.reserved(2048, 60).await;
    let vm_id = VmId::generate();
    let to = checkpoint(&vm_id, 1);
    let mut launch = a.launch(&vm_id, 1024);
    launch.on_preempt = OnPreempt::Suspend { to: to.clone() };
    a.start(launch, "vm_started").await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let store = Store::at(&store_dir).unwrap();
    let start = Instant::now();
    while !store.path(&to).join("writer.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the save never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, nix::sys::signal::Signal::SIGKILL);
    let _ = exit_code(&mut child, Duration::from_secs(5)).await;

    // Nothing a resume would take: no manifest.
    let e = store.open_verified(&to, None).unwrap_err();
    assert!(
        matches!(&e, CkError::Incomplete { why, .. } if why.contains("never finished")),
        "{e}"
    );
    let listed = store.list().unwrap();
    assert!(matches!(
        listed[0].state,
        ListedState::Incomplete { writing: false, .. }
    ));
    assert_eq!(a.domains().len(), 1, "the guest is left, stopped");
    let (_, out) = checkpoint_cli(&["list"], &store_dir);
    assert!(
        out.contains("UNFINISHED") && out.contains("abandoned; never restored"),
        "{out}"
    );
    let (code, out) = checkpoint_cli(&["verify", &to.to_string()], &store_dir);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("incomplete"), "{out}");
    assert!(a.dom0_mb() < 4096, "memory still taken");

    // The admin restores the node, the unfinished checkpoint included.
    let out = std::process::Command::new(kill_all_bin())
        .args(["--hypervisor", "sim", "--node", "a"])
        .arg("--sim-dir")
        .arg(&a.sim_dir)
        .arg("--state-dir")
        .arg(&a.state_dir)
        .arg("--node-config")
        .arg(&a.node_config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("remove-checkpoint") && text.contains(&to.to_string()),
        "{text}"
    );
    assert!(a.domains().is_empty());
    assert_eq!(a.dom0_mb(), 4096);
    assert!(
        store.list().unwrap().is_empty(),
        "{:?}",
        store.list().unwrap()
    );
}
