//! End-to-end tests of `workspace-pilot run`: the real binary, a simulated
//! node in a temp directory, and a fake coordinator that checks signatures,
//! records events and serves scripted commands.

use pilot::hypervisor::sim::{Sim, SimNode};
use pilot::hypervisor::Hypervisor;
use protocol::pilot::{CommandKind, EventKind, PilotEvent, ReleaseReason, VmLaunch};
use protocol::{SlotId, VmId, VmName};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::Coord;

const PILOT: &str = env!("CARGO_BIN_EXE_workspace-pilot");

struct Harness {
    _tmp: tempfile::TempDir,
    sim_dir: PathBuf,
    state_dir: PathBuf,
    key_file: PathBuf,
    slot: SlotId,
    coord: Arc<Coord>,
    url: String,
}

impl Harness {
    async fn new(node: SimNode) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let sim_dir = tmp.path().join("sim");
        Sim::init(&sim_dir, &node, false).unwrap();
        let key_file = tmp.path().join("slot.key");
        let (coord, url) = Coord::start(&key_file).await;
        let slot = coord.slot.clone();
        Self {
            state_dir: tmp.path().join("state"),
            _tmp: tmp,
            sim_dir,
            key_file,
            slot,
            coord,
            url,
        }
    }

    fn sim(&self) -> Sim {
        Sim::open(&self.sim_dir).unwrap()
    }

    fn dom0(&self) -> (u64, u64) {
        let m = self.sim().dom0_memory().unwrap();
        (m.current_mb, m.target_mb)
    }

    fn domain_names(&self) -> Vec<String> {
        self.sim()
            .domains()
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect()
    }

    fn pilot(
        &self,
        memory_mb: u64,
        duration_s: u64,
        grace_s: u64,
        extra: &[&str],
    ) -> tokio::process::Child {
        self.pilot_of(
            &self.slot,
            &self.key_file,
            memory_mb,
            duration_s,
            grace_s,
            extra,
        )
    }

    /// A pilot of `slot` (whose key is in `key_file`) on this node.
    fn pilot_of(
        &self,
        slot: &SlotId,
        key_file: &Path,
        memory_mb: u64,
        duration_s: u64,
        grace_s: u64,
        extra: &[&str],
    ) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(PILOT);
        cmd.args(["run", "--slot", slot.as_str(), "--coordinator", &self.url])
            .arg("--key-file")
            .arg(key_file)
            .args(["--memory-mb", &memory_mb.to_string()])
            .args([
                "--duration-s",
                &duration_s.to_string(),
                "--grace-s",
                &grace_s.to_string(),
            ])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--node", "n1", "--hypervisor", "sim"])
            .arg("--sim-dir")
            .arg(&self.sim_dir)
            .args(extra);
        let defaults = [
            ("--margin-s", "1"),
            ("--notify-timeout-ms", "300"),
            ("--poll-wait-ms", "500"),
            ("--balloon-timeout-ms", "1000"),
            ("--startup-budget-s", "5"),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.stdin(Stdio::null()).stderr(logs()).kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    fn launch(&self, memory_mb: u64) -> VmLaunch {
        let vm_id = VmId::generate();
        VmLaunch {
            name: VmName::new(self.slot.clone(), vm_id.clone()).to_string(),
            vm_id,
            memory_mb,
            cpus: 1,
            image: "debian.qcow2".into(),
            image_source: None,
            nics: Vec::new(),
            hostname: None,
            context: None,
            on_preempt: Default::default(),
            restore: None,
            urgency: 0,
            cpu: None,
        }
    }

    fn state_files(&self) -> Vec<PathBuf> {
        pilot::state::list_state_files(&self.state_dir).unwrap()
    }

    /// Names of the files in the node's outbox (letters and lock files).
    fn outbox(&self) -> Vec<String> {
        let dir = pilot::outbox::outbox_dir(&self.state_dir);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn letters(&self) -> usize {
        self.outbox()
            .iter()
            .filter(|n| n.ends_with(".json"))
            .count()
    }

    /// The kinds of the letters in the outbox, in sequence order.
    fn letter_kinds(&self) -> Vec<String> {
        let dir = pilot::outbox::outbox_dir(&self.state_dir);
        self.outbox()
            .iter()
            .filter(|n| n.ends_with(".json"))
            .map(|n| {
                let l: pilot::outbox::Letter =
                    serde_json::from_slice(&std::fs::read(dir.join(n)).unwrap()).unwrap();
                l.kind
            })
            .collect()
    }

    /// Asserts the outbox ends with the report of a preemption (an event
    /// before it may be there too: stored, but its ack lost to the outage).
    fn assert_preemption_kept(&self) {
        let kinds = self.letter_kinds();
        assert!(
            kinds.ends_with(&["preempting".to_string(), "released".to_string()])
                && kinds.len() <= 3,
            "{kinds:?}"
        );
    }
}

/// The pilots' logs: shown with `WSP_TEST_LOGS=1`, else discarded.
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

fn released(e: &PilotEvent) -> (ReleaseReason, Vec<VmId>, bool) {
    match &e.kind {
        EventKind::Released {
            reason,
            vms_destroyed,
            clean,
            ..
        } => (*reason, vms_destroyed.clone(), *clean),
        other => panic!("not released: {other:?}"),
    }
}

fn node(memory_mb: u64) -> SimNode {
    SimNode::new(memory_mb, 2, None)
}

/// Starts a pilot, waits for it to reserve and run one VM.
async fn reserved_with_vm(
    h: &Harness,
    grace_s: u64,
    extra: &[&str],
) -> (tokio::process::Child, VmLaunch) {
    let child = h.pilot(1024, 60, grace_s, extra);
    h.coord.wait_for("reserved", Duration::from_secs(10)).await;
    let vm = h.launch(512);
    h.coord.command(CommandKind::StartVm(vm.clone()));
    h.coord
        .wait_for("vm_started", Duration::from_secs(10))
        .await;
    assert_eq!(h.domain_names(), vec![vm.name.clone()]);
    (child, vm)
}

#[tokio::test(flavor = "multi_thread")]
async fn release_command_destroys_the_vm_restores_memory_and_exits_0() {
    let h = Harness::new(node(4096)).await;
    let (mut child, vm) = reserved_with_vm(&h, 3, &[]).await;
    assert_eq!(h.dom0(), (3072, 3072));
    assert_eq!(
        h.state_files().len(),
        1,
        "state file exists while the slot is held"
    );
    h.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);

    assert!(h.domain_names().is_empty());
    assert_eq!(h.dom0(), (4096, 4096));
    assert!(
        h.state_files().is_empty(),
        "a clean release removes the state file"
    );
    assert_eq!(
        h.coord.kinds(),
        vec!["started", "reserved", "vm_started", "released"]
    );
    let events = h.coord.events();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(events
        .iter()
        .all(|e| e.pilot_id == events[0].pilot_id && e.node == "n1"));
    assert_eq!(h.coord.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(h.coord.out_of_order.load(Ordering::SeqCst), 0);
    match &events[1].kind {
        EventKind::Reserved {
            dom0_before_mb,
            dom0_after_mb,
            reserved_mb,
            ..
        } => {
            assert_eq!(
                (*dom0_before_mb, *dom0_after_mb, *reserved_mb),
                (4096, 3072, 1024)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        released(&events[3]),
        (ReleaseReason::Commanded, vec![vm.vm_id], true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_the_coordinator_cannot_take_are_resent_in_order_before_the_next() {
    // The coordinator stores by each pilot's highest seq: a pilot that went
    // on to its next event before the refused one got through would lose it.
    let h = Harness::new(node(4096)).await;
    h.coord.fail_events.store(3, Ordering::SeqCst);
    let (mut child, _vm) = reserved_with_vm(&h, 5, &[]).await;
    h.coord.fail_events.store(2, Ordering::SeqCst);
    h.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    assert_eq!(
        h.coord.fail_events.load(Ordering::SeqCst),
        0,
        "503s answered"
    );
    assert_eq!(
        h.coord.kinds(),
        vec!["started", "reserved", "vm_started", "released"]
    );
    let seqs: Vec<u64> = h.coord.events().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(h.coord.out_of_order.load(Ordering::SeqCst), 0);
    assert_eq!(h.dom0(), (4096, 4096));
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_command_destroys_only_that_vm() {
    let h = Harness::new(node(4096)).await;
    let (mut child, vm) = reserved_with_vm(&h, 3, &[]).await;
    h.coord.command(CommandKind::DestroyVm {
        vm_id: vm.vm_id.clone(),
    });
    h.coord
        .wait_for("vm_destroyed", Duration::from_secs(5))
        .await;
    assert!(h.domain_names().is_empty());
    assert_eq!(
        h.dom0(),
        (3072, 3072),
        "memory stays reserved until release"
    );
    h.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    assert_eq!(h.dom0(), (4096, 4096));
}

#[tokio::test(flavor = "multi_thread")]
async fn preempted_pilot_restores_memory_before_grace_ends_when_the_coordinator_is_silent() {
    let h = Harness::new(node(4096)).await;
    let grace = Duration::from_secs(3);
    let (mut child, vm) = reserved_with_vm(&h, grace.as_secs(), &[]).await;
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut child, grace * 2).await, 0);
    assert!(
        t0.elapsed() < grace,
        "exited after {:?}, grace is {grace:?}",
        t0.elapsed()
    );

    assert!(h.domain_names().is_empty());
    assert_eq!(h.dom0(), (4096, 4096));
    assert_eq!(
        h.coord.kinds(),
        vec![
            "started",
            "reserved",
            "vm_started",
            "preempting",
            "released"
        ]
    );
    let events = h.coord.events();
    match &events[3].kind {
        EventKind::Preempting {
            signal,
            coordinator_wait_ms,
            ..
        } => {
            assert_eq!(signal, "SIGTERM");
            assert_eq!(*coordinator_wait_ms, 1500);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        released(&events[4]),
        (ReleaseReason::Preempted, vec![vm.vm_id], true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn preempted_pilot_obeys_release_sent_during_the_coordinator_wait() {
    let h = Harness::new(node(4096)).await;
    let grace = Duration::from_secs(4);
    let (mut child, _vm) = reserved_with_vm(&h, grace.as_secs(), &[]).await;
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGUSR2);
    h.coord.wait_for("preempting", Duration::from_secs(2)).await;
    h.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, grace * 2).await, 0);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "released at once, not after the wait: {:?}",
        t0.elapsed()
    );
    assert_eq!(h.dom0(), (4096, 4096));
    let events = h.coord.events();
    assert_eq!(released(events.last().unwrap()).0, ReleaseReason::Preempted);
}

#[tokio::test(flavor = "multi_thread")]
async fn preempted_pilot_cleans_up_within_grace_when_the_coordinator_is_gone() {
    let h = Harness::new(node(4096)).await;
    let grace = Duration::from_secs(3);
    let (mut child, _vm) = reserved_with_vm(&h, grace.as_secs(), &[]).await;
    h.coord.dead.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut child, grace * 2).await, 0);
    assert!(
        t0.elapsed() < grace,
        "exited after {:?}, grace is {grace:?}",
        t0.elapsed()
    );
    assert!(h.domain_names().is_empty());
    assert_eq!(h.dom0(), (4096, 4096));
    assert!(h.state_files().is_empty());
}

/// A node whose balloon takes 1 s to move and whose VMs take 0.6 s to start
/// and to destroy: a 5 s grace leaves no room for a cleanup that starts late.
fn slow_node() -> SimNode {
    let mut n = node(4096);
    n.latency.balloon_ms = 1000;
    n.latency.create_ms = 600;
    n.latency.destroy_ms = 600;
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn preempted_with_the_coordinator_down_cleans_up_at_once_and_the_next_pilot_reports_it() {
    let h = Harness::new(slow_node()).await;
    let grace = Duration::from_secs(5);
    let (mut child, vm) = reserved_with_vm(&h, grace.as_secs(), &[]).await;
    let first = h.coord.events()[0].pilot_id.clone();
    h.coord.go_down().await;
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    // A refused connection ends the wait for the coordinator at once: the
    // 1.6 s cleanup fits, memory is back within 2 s, the exit is clean.
    let restored = loop {
        if h.dom0() == (4096, 4096) {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < grace, "memory not restored within the grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        restored < Duration::from_millis(2500),
        "restored after {restored:?}"
    );
    assert_eq!(exit_code(&mut child, grace * 2).await, 0);
    assert!(t0.elapsed() < grace, "exited after {:?}", t0.elapsed());
    assert!(h.domain_names().is_empty());
    assert!(h.state_files().is_empty());
    // What the coordinator did not hear is on the node.
    h.assert_preemption_kept();
    let before_back = protocol::now_ms();

    // The coordinator is back; the next pilot on the node (another slot)
    // delivers the first pilot's letters beside its own work.
    h.coord.come_back();
    let key2 = h.sim_dir.parent().unwrap().join("slot2.key");
    let slot2 = h.coord.add_slot(&key2);
    let mut second = h.pilot_of(&slot2, &key2, 1024, 60, 3, &[]);
    let start = Instant::now();
    while h.coord.events_of(&first).len() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the first pilot's letters were not delivered: {:?}",
            h.coord.kinds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = h.coord.events_of(&first);
    let kinds: Vec<_> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        kinds,
        vec![
            "started",
            "reserved",
            "vm_started",
            "preempting",
            "released"
        ]
    );
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(
        events[3..].iter().all(|e| e.ts_ms < before_back),
        "delivered with the times they were made"
    );
    assert_eq!(
        released(&events[4]),
        (ReleaseReason::Preempted, vec![vm.vm_id], true)
    );
    h.coord.wait_for("reserved", Duration::from_secs(10)).await;
    h.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut second, Duration::from_secs(10)).await, 0);
    assert_eq!(h.letters(), 0, "{:?}", h.outbox());
    assert!(h.outbox().is_empty(), "lock files go too: {:?}", h.outbox());
    assert_eq!(h.coord.out_of_order.load(Ordering::SeqCst), 0);
    assert_eq!(h.coord.bad_signatures.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn preempted_with_the_coordinator_hanging_waits_only_what_the_cleanup_leaves() {
    let h = Harness::new(slow_node()).await;
    let grace = Duration::from_secs(5);
    let (mut child, _vm) = reserved_with_vm(&h, grace.as_secs(), &[]).await;
    h.coord.dead.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    // Half the grace (2.5 s) for a coordinator that never answers would
    // leave 1.25 s for 0.6 s of destroy and 1 s of restore.
    assert_eq!(exit_code(&mut child, grace * 2).await, 0);
    assert!(t0.elapsed() < grace, "exited after {:?}", t0.elapsed());
    assert!(h.domain_names().is_empty());
    assert_eq!(h.dom0(), (4096, 4096));
    assert!(h.state_files().is_empty());
    h.assert_preemption_kept();
}

#[tokio::test(flavor = "multi_thread")]
async fn release_during_a_30_s_coordinator_outage_is_reported_when_it_is_back() {
    let mut n = node(4096);
    n.latency.destroy_ms = 500;
    let h = Harness::new(n).await;
    let (mut child, vm) = reserved_with_vm(&h, 3, &[]).await;
    h.coord.command(CommandKind::Release);
    let start = Instant::now();
    while h.coord.served.load(Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "release not fetched"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Gone while the pilot destroys its VM, for 30 s.
    h.coord.go_down().await;
    let outage = Instant::now();
    let mut cleaned = false;
    while outage.elapsed() < Duration::from_secs(30) {
        if !cleaned && h.dom0() == (4096, 4096) && h.domain_names().is_empty() {
            cleaned = true;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the pilot gave up after {:?} of outage",
            outage.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(cleaned, "the node was cleaned up during the outage");
    assert_eq!(h.coord.kinds(), vec!["started", "reserved", "vm_started"]);
    assert_eq!(h.letters(), 1, "released waits on disk: {:?}", h.outbox());
    let back_ms = protocol::now_ms();
    h.coord.come_back();
    assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
    assert_eq!(
        h.coord.kinds(),
        vec!["started", "reserved", "vm_started", "released"]
    );
    let events = h.coord.events();
    assert_eq!(events[3].seq, 4);
    assert!(events[3].ts_ms < back_ms);
    assert_eq!(
        released(&events[3]),
        (ReleaseReason::Commanded, vec![vm.vm_id], true)
    );
    assert!(h.outbox().is_empty(), "{:?}", h.outbox());
    assert_eq!(h.coord.out_of_order.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn second_sigterm_during_slow_cleanup_does_not_interrupt_it() {
    let mut n = node(4096);
    n.latency.destroy_ms = 1200;
    let h = Harness::new(n).await;
    let grace = Duration::from_secs(4);
    let (mut child, _vm) =
        reserved_with_vm(&h, grace.as_secs(), &["--coordinator-wait-fraction", "0"]).await;
    let t0 = Instant::now();
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(400)).await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    signal(&child, nix::sys::signal::Signal::SIGINT);
    assert_eq!(exit_code(&mut child, grace * 2).await, 0);
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "cleanup waited for the slow destroy"
    );
    assert!(t0.elapsed() < grace);
    assert!(h.domain_names().is_empty());
    assert_eq!(h.dom0(), (4096, 4096));
    let events = h.coord.events();
    assert_eq!(
        h.coord
            .kinds()
            .iter()
            .filter(|k| **k == "preempting")
            .count(),
        1
    );
    assert!(released(events.last().unwrap()).2, "cleanup was clean");
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_deadline_releases_on_its_own() {
    let h = Harness::new(node(4096)).await;
    let mut child = h.pilot(1024, 3, 2, &[]);
    h.coord.wait_for("reserved", Duration::from_secs(5)).await;
    let t0 = Instant::now();
    assert_eq!(exit_code(&mut child, Duration::from_secs(6)).await, 0);
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(h.dom0(), (4096, 4096));
    let events = h.coord.events();
    assert_eq!(released(events.last().unwrap()).0, ReleaseReason::Deadline);
}

#[tokio::test(flavor = "multi_thread")]
async fn reservation_below_min_dom0_is_refused_with_exit_3_and_memory_unchanged() {
    let h = Harness::new(node(1024)).await;
    let mut child = h.pilot(1000, 60, 2, &["--min-dom0-mb", "100"]);
    assert_eq!(exit_code(&mut child, Duration::from_secs(5)).await, 3);
    assert_eq!(h.dom0(), (1024, 1024));
    assert_eq!(h.coord.kinds(), vec!["started", "reserve_failed"]);
    assert!(h.state_files().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn balloon_that_never_reaches_its_target_fails_with_exit_3_and_memory_unchanged() {
    let mut n = node(4096);
    n.balloon_floor_mb = Some(3500);
    n.latency.balloon_ms = 100;
    let h = Harness::new(n).await;
    let mut child = h.pilot(1024, 60, 2, &["--balloon-timeout-ms", "500"]);
    assert_eq!(exit_code(&mut child, Duration::from_secs(5)).await, 3);
    assert_eq!(h.dom0(), (4096, 4096));
    assert_eq!(h.coord.kinds(), vec!["started", "reserve_failed"]);
    match &h.coord.events()[1].kind {
        EventKind::ReserveFailed { reason } => {
            assert!(reason.contains("did not reach 3072 MB"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(h.state_files().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_guests_and_other_slots_guests_are_never_destroyed() {
    let h = Harness::new(SimNode::new(4096, 2, Some(3584))).await;
    let other = VmName::new(SlotId::generate(), VmId::generate()).to_string();
    h.sim().add_foreign_domain("alien", 256, 1).unwrap();
    h.sim().add_foreign_domain(&other, 256, 1).unwrap();
    let mut child = h.pilot(1024, 60, 3, &[]);
    h.coord.wait_for("reserved", Duration::from_secs(5)).await;
    let vm = h.launch(512);
    h.coord.command(CommandKind::StartVm(vm.clone()));
    h.coord.wait_for("vm_started", Duration::from_secs(5)).await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut child, Duration::from_secs(6)).await, 0);
    let mut left = h.domain_names();
    left.sort();
    let mut expected = vec!["alien".to_string(), other];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(h.dom0(), (3584, 3584));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_vm_with_another_slots_name_is_refused() {
    let h = Harness::new(node(4096)).await;
    let mut child = h.pilot(1024, 60, 2, &[]);
    h.coord.wait_for("reserved", Duration::from_secs(5)).await;
    let mut vm = h.launch(512);
    vm.name = VmName::new(SlotId::generate(), vm.vm_id.clone()).to_string();
    h.coord.command(CommandKind::StartVm(vm));
    h.coord.wait_for("vm_failed", Duration::from_secs(5)).await;
    assert!(h.domain_names().is_empty());
    h.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut child, Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_unreachable_at_start_exits_5_without_touching_memory() {
    let h = Harness::new(node(4096)).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut cmd = tokio::process::Command::new(PILOT);
    cmd.args(["run", "--slot", h.slot.as_str(), "--coordinator", &url])
        .arg("--key-file")
        .arg(&h.key_file)
        .args([
            "--memory-mb",
            "1024",
            "--duration-s",
            "60",
            "--grace-s",
            "2",
            "--node",
            "n1",
        ])
        .arg("--state-dir")
        .arg(&h.state_dir)
        .arg("--sim-dir")
        .arg(&h.sim_dir)
        .args(["--startup-budget-s", "1", "--notify-timeout-ms", "200"])
        .stderr(logs())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    assert_eq!(exit_code(&mut child, Duration::from_secs(5)).await, 5);
    assert_eq!(h.dom0(), (4096, 4096));
    assert!(h.state_files().is_empty());
}

fn run_to_end(args: &[&str], extra: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(PILOT);
    cmd.args(args);
    for (flag, path) in extra {
        cmd.arg(flag).arg(path);
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_key_file_exits_2_with_one_line_and_touches_nothing() {
    let h = Harness::new(node(4096)).await;
    std::fs::write(&h.key_file, "not hex\n").unwrap();
    let out = run_to_end(
        &[
            "run",
            "--slot",
            h.slot.as_str(),
            "--coordinator",
            &h.url,
            "--memory-mb",
            "1024",
        ],
        &[
            ("--key-file", &h.key_file),
            ("--state-dir", &h.state_dir),
            ("--sim-dir", &h.sim_dir),
        ],
    );
    // --duration-s and --grace-s are missing: clap's usage error, also 2.
    assert_eq!(out.status.code(), Some(2));
    let out = run_to_end(
        &[
            "run",
            "--slot",
            h.slot.as_str(),
            "--coordinator",
            &h.url,
            "--memory-mb",
            "1024",
            "--duration-s",
            "60",
            "--grace-s",
            "2",
        ],
        &[
            ("--key-file", &h.key_file),
            ("--state-dir", &h.state_dir),
            ("--sim-dir", &h.sim_dir),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("slot.key"), "{stderr}");
    assert_eq!(h.dom0(), (4096, 4096));
    assert!(!h.state_dir.exists());
    assert!(h.coord.events().is_empty());
}

#[test]
fn sim_cli_init_show_and_add_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node-%n");
    let dir_s = dir.to_str().unwrap();
    let ok = |args: &[&str]| {
        let out = std::process::Command::new(PILOT)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(&[
        "sim",
        "init",
        "--dir",
        dir_s,
        "--memory-mb",
        "4096",
        "--cpus",
        "2",
        "--dom0-mb",
        "3072",
        "--destroy-ms",
        "5",
    ]);
    let again = std::process::Command::new(PILOT)
        .args([
            "sim",
            "init",
            "--dir",
            dir_s,
            "--memory-mb",
            "4096",
            "--cpus",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "init refuses to overwrite");
    ok(&[
        "sim",
        "add-domain",
        "--dir",
        dir_s,
        "--name",
        "alien",
        "--memory-mb",
        "512",
    ]);
    let shown: serde_json::Value =
        serde_json::from_slice(&ok(&["sim", "show", "--dir", dir_s]).stdout).unwrap();
    assert_eq!(shown["memory_mb"], 4096);
    assert_eq!(shown["dom0"]["current_mb"], 3072);
    assert_eq!(shown["latency"]["destroy_ms"], 5);
    assert_eq!(shown["domains"][0]["name"], "alien");
}
