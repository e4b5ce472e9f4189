//! Tests of the `xen` driver and of `workspace-pilot run --hypervisor xen`
//! against the xenstored stand-in (real wire protocol on a unix socket) and
//! the fake `xl` on PATH. No Xen needed; the binaries must be built first.
//!
//! Not a libtest harness: xenstore-rs takes its socket only from
//! XENSTORED_PATH, and setting a variable is sound only while the process is
//! single-threaded, so `main` sets it (and PATH) first, then runs the tests
//! one after another. Arguments filter tests by substring, as libtest does.

mod common;
#[path = "../../xen-standin/src/harness.rs"]
mod harness;

use common::Coord;
use harness::{target_bin, Standin};
use pilot::checkpoint::{ManifestInfo, Store, WriterInfo};
use pilot::hypervisor::xen::Xen;
use pilot::hypervisor::{set_dom0_target_and_wait, HvError, HvOptions, Hypervisor, NodeConfig};
use protocol::pilot::{
    CheckpointId, CommandKind, EventKind, OnPreempt, ReleaseReason, RestoreFrom, VmLaunch,
};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The directory of the in-process driver's stand-in (fixed: its socket is
/// XENSTORED_PATH for the whole process).
fn driver_dir(root: &Path) -> PathBuf {
    root.join("driver")
}

fn fresh_standin(root: &Path, args: &[&str]) -> Standin {
    let dir = driver_dir(root);
    let _ = std::fs::remove_dir_all(&dir);
    Standin::start(&dir, args)
}

fn driver(s: &Standin, extra: &str) -> Xen {
    let cfg: NodeConfig = toml::from_str(&s.node_config(extra)).unwrap();
    Xen::open(
        &cfg.xen,
        &HvOptions {
            node_name: "n1".into(),
            ..HvOptions::default()
        },
    )
    .unwrap()
}

fn launch(slot: &SlotId, memory_mb: u64) -> VmLaunch {
    let vm_id = VmId::generate();
    VmLaunch {
        name: VmName::new(slot.clone(), vm_id.clone()).to_string(),
        vm_id,
        memory_mb,
        cpus: 2,
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

// ---------------------------------------------------------------- driver

fn dom0_memory_comes_from_xenstore_target_static_max_and_current(root: &Path) {
    let s = fresh_standin(
        root,
        &[
            "--total-mb",
            "8192",
            "--dom0-mb",
            "6144",
            "--max-mb",
            "7168",
        ],
    );
    let m = driver(&s, "").dom0_memory().unwrap();
    assert_eq!((m.current_mb, m.target_mb, m.max_mb), (6144, 6144, 7168));
}

fn balloon_reaches_its_target_after_the_delay_and_the_wait_reports_it(root: &Path) {
    let s = fresh_standin(root, &["--balloon-delay-ms", "200"]);
    let xen = driver(&s, "");
    let took = set_dom0_target_and_wait(&xen, 3072, Duration::from_secs(2)).unwrap();
    assert!(took >= Duration::from_millis(190), "{took:?}");
    assert_eq!(
        s.read("/local/domain/0/memory/target"),
        (3072 * 1024).to_string()
    );
    assert_eq!(s.dom0(), (3072, 3072));
}

fn balloon_stuck_at_its_floor_times_out_naming_the_figures(root: &Path) {
    let s = fresh_standin(root, &["--balloon-floor-mb", "3500"]);
    let xen = driver(&s, "");
    let t0 = Instant::now();
    let e = set_dom0_target_and_wait(&xen, 2048, Duration::from_millis(300)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(
            e,
            HvError::BalloonTimeout {
                target_mb: 2048,
                current_mb: 3500,
                ..
            }
        ),
        "{e}"
    );
    set_dom0_target_and_wait(&xen, 4096, Duration::from_millis(300)).unwrap();
}

fn xl_mem_set_fallback_moves_the_balloon(root: &Path) {
    let s = fresh_standin(root, &[]);
    let xen = driver(&s, "use_xl_mem_set = true");
    set_dom0_target_and_wait(&xen, 3000, Duration::from_secs(1)).unwrap();
    assert_eq!(s.dom0(), (3000, 3000));
    assert!(
        s.xl_calls().contains(&"mem-set 0 3000m".to_string()),
        "{:?}",
        s.xl_calls()
    );
}

fn target_above_static_max_is_refused_before_anything_is_written(root: &Path) {
    let s = fresh_standin(root, &["--dom0-mb", "2048", "--max-mb", "3072"]);
    let e = driver(&s, "").set_dom0_target(4000).unwrap_err();
    assert!(matches!(e, HvError::AboveMax { max_mb: 3072, .. }), "{e}");
    assert_eq!(s.dom0(), (2048, 2048));
}

fn guest_is_created_from_a_generated_config_paused_saved_restored_and_destroyed(root: &Path) {
    let s = fresh_standin(root, &["--dom0-mb", "3072"]);
    let xen = driver(
        &s,
        "sched_weight = 512\nsched_cap = 50\nextra = \"console=hvc0\"",
    );
    let slot = SlotId::generate();
    let vm = launch(&slot, 512);
    xen.create(&vm).unwrap();
    let cfg = std::fs::read_to_string(s.run_dir.join(format!("{}.cfg", vm.name))).unwrap();
    assert!(
        cfg.contains("memory = 512") && cfg.contains("vcpus = 2"),
        "{cfg}"
    );
    assert!(
        cfg.contains("bridge=xenbr0") && cfg.contains("extra = \"console=hvc0\""),
        "{cfg}"
    );
    let d = xen.domains().unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].name.as_str(), d[0].memory_mb, d[0].cpus),
        (vm.name.as_str(), 512, 2)
    );
    let sched = s.xl_ok(&["sched-credit", "-d", &vm.name]);
    assert!(sched.contains("512") && sched.contains("50"), "{sched}");
    assert!(matches!(xen.create(&vm), Err(HvError::DomainExists { .. })));

    xen.pause(&vm.name).unwrap();
    assert!(s.xl_ok(&["list", &vm.name]).contains("--p---"));
    xen.unpause(&vm.name).unwrap();

    // Saved into a checkpoint (left paused until destroyed), restored under
    // another slot's name: the same guest, its count frozen while saved.
    let store = Store::at(&s.dir.join("store")).unwrap();
    let id = CheckpointId {
        workspace_id: WorkspaceId::generate(),
        vm_id: vm.vm_id.clone(),
        generation: 1,
    };
    let mut w = store
        .begin(
            &id,
            WriterInfo {
                node: "n1".into(),
                slot: slot.to_string(),
                pid: std::process::id(),
                started_ms: 0,
            },
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let driver_info = xen.save(&vm.name, &mut w, deadline).unwrap();
    assert!(s.xl_ok(&["list", &vm.name]).contains("--p---"), "paused");
    let (boot, count) = standin_guest(&s, &vm.name);
    let c = w
        .commit(ManifestInfo {
            warm: false,
            vm_name: vm.name.clone(),
            hypervisor: "xen".into(),
            memory_mb: 512,
            cpus: 2,
            image: vm.image.clone(),
            image_sha256: None,
            node: "n1".into(),
            slot: slot.clone(),
            save_ms: 1,
            driver: driver_info,
        })
        .unwrap();
    assert!(c.bytes > 512 * 1024, "{}", c.bytes);
    xen.destroy(&vm.name).unwrap();
    assert!(xen.domains().unwrap().is_empty());
    let mut moved = launch(&SlotId::generate(), 512);
    moved.vm_id = vm.vm_id.clone();
    let from = store.open_verified(&id, Some(&c.sha256)).unwrap();
    xen.restore(&moved, &from, deadline).unwrap();
    assert_eq!(s.guests(), vec![moved.name.clone()]);
    assert!(
        s.xl_calls().iter().any(|c| c.starts_with("restore -p ")),
        "{:?}",
        s.xl_calls()
    );
    let (boot2, count2) = standin_guest(&s, &moved.name);
    assert_eq!(boot2, boot, "the same guest");
    assert!(
        count2 >= count && count2 < count + 20,
        "{count} then {count2}"
    );
    xen.set_sched_credit(&moved.name, None, None, true).unwrap();
    assert!(s
        .xl_ok(&["sched-credit", "-d", &moved.name])
        .contains("1024"));

    xen.destroy(&moved.name).unwrap();
    assert!(s.guests().is_empty());
    assert!(!s.run_dir.join(format!("{}.cfg", moved.name)).exists());
    assert!(matches!(
        xen.destroy(&moved.name),
        Err(HvError::NoSuchDomain { .. })
    ));
}

/// The stand-in guest's boot id and count (`xl list -l`, `standin`).
fn standin_guest(s: &Standin, name: &str) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_str(&s.xl_ok(&["list", "-l", name])).unwrap();
    let g = &v[0]["standin"];
    (
        g["boot_id"].as_str().unwrap().to_string(),
        g["count"].as_u64().unwrap(),
    )
}

fn create_without_free_memory_fails_with_xls_own_words(root: &Path) {
    let s = fresh_standin(root, &[]);
    let e = driver(&s, "")
        .create(&launch(&SlotId::generate(), 512))
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("xl create") && text.contains("failed to free memory"),
        "{text}"
    );
    assert!(s.guests().is_empty());
}

fn listing_through_xl_json_matches_listing_through_xenstore(root: &Path) {
    let s = fresh_standin(root, &["--dom0-mb", "2048"]);
    s.add_guest("alien", 256);
    let a = driver(&s, "").domains().unwrap();
    let b = driver(&s, "list_domains = \"xl\"").domains().unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].name.as_str(), a[0].memory_mb, a[0].cpus),
        ("alien", 256, 1)
    );
    assert_eq!(
        (b[0].name.as_str(), b[0].memory_mb, b[0].cpus),
        ("alien", 256, 1)
    );
}

fn command_prefix_is_an_argv_put_before_xl(root: &Path) {
    let s = fresh_standin(root, &["--dom0-mb", "2048"]);
    // `env WSP_PREFIX_SEEN=1 xl ...`: the prefix runs xl with arguments intact.
    let xen = driver(&s, "command_prefix = [\"env\", \"WSP_PREFIX_SEEN=1\"]");
    let vm = launch(&SlotId::generate(), 256);
    xen.create(&vm).unwrap();
    xen.destroy(&vm.name).unwrap();
    let calls = s.xl_calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("create ") && c.ends_with(".cfg")),
        "{calls:?}"
    );
    assert!(calls.contains(&format!("destroy {}", vm.name)), "{calls:?}");
}

fn dead_xenstored_is_a_bounded_error_and_a_restarted_one_is_reconnected(root: &Path) {
    let mut s = fresh_standin(root, &[]);
    let xen = driver(&s, "");
    xen.dom0_memory().unwrap();
    s.kill();
    let t0 = Instant::now();
    let e = xen.dom0_memory().unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(matches!(e, HvError::Xenstore { .. }), "{e}");
    assert!(e.to_string().contains("XENSTORED_PATH"), "{e}");
    s.restart();
    assert_eq!(xen.dom0_memory().unwrap().current_mb, 4096);
}

// ---------------------------------------------------------------- pilot end to end

/// A pilot's world: its own stand-in node, node config, key and fake coordinator.
struct PilotHarness {
    node: Standin,
    node_config: PathBuf,
    state_dir: PathBuf,
    key_file: PathBuf,
    slot: SlotId,
    coord: Arc<Coord>,
    url: String,
}

impl PilotHarness {
    async fn new(root: &Path, name: &str, standin_args: &[&str]) -> Self {
        let dir = root.join(name);
        let node = Standin::start(&dir, standin_args);
        let node_config = node.write_node_config("");
        let key_file = dir.join("slot.key");
        let (coord, url) = Coord::start(&key_file).await;
        let slot = coord.slot.clone();
        Self {
            state_dir: dir.join("state"),
            node,
            node_config,
            key_file,
            slot,
            coord,
            url,
        }
    }

    fn pilot(&self, memory_mb: u64, grace_s: u64, extra: &[&str]) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(target_bin("workspace-pilot"));
        cmd.args([
            "run",
            "--slot",
            self.slot.as_str(),
            "--coordinator",
            &self.url,
        ])
        .arg("--key-file")
        .arg(&self.key_file)
        .args(["--memory-mb", &memory_mb.to_string(), "--duration-s", "60"])
        .args(["--grace-s", &grace_s.to_string(), "--margin-s", "1"])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .args(["--node", "n1", "--hypervisor", "xen"])
        .arg("--node-config")
        .arg(&self.node_config)
        .args([
            "--notify-timeout-ms",
            "300",
            "--poll-wait-ms",
            "300",
            "--startup-budget-s",
            "5",
        ])
        .args(extra)
        // XENSTORED_PATH must come from the node config, not from this test.
        .env_remove("XENSTORED_PATH")
        .env("PATH", self.node.path_env())
        .stdin(Stdio::null())
        .stderr(logs())
        .kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    fn launch(&self, memory_mb: u64) -> VmLaunch {
        launch(&self.slot, memory_mb)
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

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pilot_on_xen_reserves_starts_a_vm_and_gives_memory_back_on_release(root: &Path) {
    rt().block_on(async {
        let h = PilotHarness::new(root, "release", &[]).await;
        let mut child = h.pilot(1024, 3, &[]);
        let reserved = h.coord.wait_for("reserved", Duration::from_secs(10)).await;
        match reserved.kind {
            EventKind::Reserved {
                dom0_before_mb,
                dom0_after_mb,
                ..
            } => {
                assert_eq!((dom0_before_mb, dom0_after_mb), (4096, 3072))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.node.dom0(), (3072, 3072));
        let vm = h.launch(512);
        h.coord.command(CommandKind::StartVm(vm.clone()));
        h.coord
            .wait_for("vm_started", Duration::from_secs(10))
            .await;
        assert_eq!(h.node.guests(), vec![vm.name.clone()]);
        h.coord.command(CommandKind::Release);
        assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
        assert!(h.node.guests().is_empty());
        assert_eq!(h.node.dom0(), (4096, 4096));
        assert_eq!(
            h.coord.kinds(),
            vec!["started", "reserved", "vm_started", "released"]
        );
    });
}

fn sigterm_on_xen_destroys_only_this_slots_guests_and_restores_memory(root: &Path) {
    rt().block_on(async {
        let h = PilotHarness::new(root, "sigterm", &["--dom0-mb", "3584"]).await;
        let other = VmName::new(SlotId::generate(), VmId::generate()).to_string();
        h.node.add_guest("alien", 256);
        h.node.add_guest(&other, 256);
        let mut child = h.pilot(1024, 3, &[]);
        h.coord.wait_for("reserved", Duration::from_secs(10)).await;
        let vms = [h.launch(256), h.launch(256)];
        for vm in &vms {
            h.coord.command(CommandKind::StartVm(vm.clone()));
        }
        let start = Instant::now();
        while h.node.guests().len() < 4 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{:?}",
                h.node.guests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert_eq!(exit_code(&mut child, Duration::from_secs(6)).await, 0);
        let mut expected = vec!["alien".to_string(), other];
        expected.sort();
        assert_eq!(h.node.guests(), expected);
        assert_eq!(h.node.dom0(), (3584, 3584));
        let released = h.coord.wait_for("released", Duration::from_secs(1)).await;
        match released.kind {
            EventKind::Released {
                reason,
                vms_destroyed,
                clean,
                ..
            } => {
                assert_eq!(reason, ReleaseReason::Preempted);
                assert_eq!(vms_destroyed.len(), 2);
                assert!(clean);
            }
            other => panic!("{other:?}"),
        }
    });
}

fn sigterm_on_xen_suspends_the_guest_and_another_node_resumes_the_same_one(root: &Path) {
    rt().block_on(async {
        let store = root.join("xen-store");
        let a = PilotHarness::new(root, "suspend-a", &[]).await;
        let b = PilotHarness::new(root, "suspend-b", &[]).await;
        for h in [&a, &b] {
            let cfg = format!(
                "{}[checkpoints]\ndir = \"{}\"\nsave_mb_per_s = 1000\n",
                h.node.node_config(""),
                store.display()
            );
            std::fs::write(&h.node_config, cfg).unwrap();
        }
        let mut child = a.pilot(1024, 5, &[]);
        a.coord.wait_for("reserved", Duration::from_secs(10)).await;
        let vm_id = VmId::generate();
        let to = CheckpointId {
            workspace_id: WorkspaceId::generate(),
            vm_id: vm_id.clone(),
            generation: 1,
        };
        let mut l = VmLaunch::basic(
            vm_id.clone(),
            VmName::new(a.slot.clone(), vm_id.clone()).to_string(),
            512,
            2,
            "debian.qcow2".into(),
        );
        l.on_preempt = OnPreempt::Suspend { to: to.clone() };
        a.coord.command(CommandKind::StartVm(l.clone()));
        a.coord
            .wait_for("vm_started", Duration::from_secs(10))
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (boot, _) = standin_guest(&a.node, &l.name);
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert_eq!(exit_code(&mut child, Duration::from_secs(6)).await, 0);
        let sha = match a.coord.wait_for("vm_suspended", Duration::ZERO).await.kind {
            EventKind::VmSuspended { sha256, bytes, .. } => {
                assert!(bytes > 512 * 1024, "{bytes}");
                sha256
            }
            other => panic!("{other:?}"),
        };
        match a.coord.wait_for("released", Duration::ZERO).await.kind {
            EventKind::Released {
                vms_suspended,
                vms_destroyed,
                clean,
                ..
            } => {
                assert_eq!(vms_suspended, vec![vm_id.clone()]);
                assert!(vms_destroyed.is_empty() && clean);
            }
            other => panic!("{other:?}"),
        }
        assert!(a.node.guests().is_empty());
        assert_eq!(a.node.dom0(), (4096, 4096));
        // The count the guest had when it was saved (the save file's record).
        let saved = std::fs::read(Store::at(&store).unwrap().path(&to).join("xl.save")).unwrap();
        let line = saved.split(|b| *b == b'\n').next().unwrap();
        let record: serde_json::Value = serde_json::from_slice(line).unwrap();
        let saved_count = record["count"].as_u64().unwrap();
        assert!(saved_count >= 2, "it counted before the save: {record}");

        let mut child = b.pilot(1024, 5, &[]);
        b.coord.wait_for("reserved", Duration::from_secs(10)).await;
        let mut r = VmLaunch::basic(
            vm_id.clone(),
            VmName::new(b.slot.clone(), vm_id.clone()).to_string(),
            512,
            2,
            "debian.qcow2".into(),
        );
        r.restore = Some(RestoreFrom {
            checkpoint: to.clone(),
            sha256: sha,
            warm: false,
        });
        b.coord.command(CommandKind::StartVm(r.clone()));
        b.coord
            .wait_for("vm_resumed", Duration::from_secs(10))
            .await;
        assert_eq!(b.node.guests(), vec![r.name.clone()]);
        let (boot2, count2) = standin_guest(&b.node, &r.name);
        assert_eq!(boot2, boot, "the same guest on node b");
        assert!(
            count2 >= saved_count && count2 < saved_count + 30,
            "counts on from {saved_count}: {count2}"
        );
        b.coord.command(CommandKind::Release);
        assert_eq!(exit_code(&mut child, Duration::from_secs(10)).await, 0);
        assert!(b.node.guests().is_empty());
        assert_eq!(b.node.dom0(), (4096, 4096));
    });
}

fn balloon_that_never_reaches_its_target_on_xen_exits_3_with_memory_restored(root: &Path) {
    rt().block_on(async {
        let h = PilotHarness::new(
            root,
            "stuck",
            &["--balloon-floor-mb", "3500", "--balloon-delay-ms", "50"],
        )
        .await;
        let mut child = h.pilot(1024, 2, &["--balloon-timeout-ms", "400"]);
        assert_eq!(exit_code(&mut child, Duration::from_secs(8)).await, 3);
        assert_eq!(h.node.dom0(), (4096, 4096));
        assert_eq!(h.coord.kinds(), vec!["started", "reserve_failed"]);
        let failed = h.coord.events.lock().unwrap()[1].kind.clone();
        match failed {
            EventKind::ReserveFailed { reason } => {
                assert!(reason.contains("did not reach 3072 MB"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    });
}

fn pilot_refuses_a_node_whose_xenstored_is_down_with_exit_2(root: &Path) {
    rt().block_on(async {
        let mut h = PilotHarness::new(root, "down", &[]).await;
        h.node.kill();
        let mut child = h.pilot(1024, 2, &[]);
        assert_eq!(exit_code(&mut child, Duration::from_secs(8)).await, 2);
        assert!(h.coord.kinds().is_empty());
    });
}

// ---------------------------------------------------------------- check

fn check_passes_on_a_fit_node_and_names_the_fix_when_xenstored_is_down(root: &Path) {
    let dir = root.join("check");
    let mut node = Standin::start(&dir, &[]);
    let cfg = node.write_node_config("");
    let run = |node: &Standin| {
        std::process::Command::new(target_bin("workspace-pilot"))
            .args(["check", "--hypervisor", "xen", "--node", "n1"])
            .arg("--node-config")
            .arg(&cfg)
            .env_remove("XENSTORED_PATH")
            .env("PATH", node.path_env())
            .output()
            .unwrap()
    };
    let o = run(&node);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for name in [
        "xenstore reachable",
        "dom0 memory figures sane",
        "xl found",
        "privileged xl",
    ] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
    node.kill();
    let o = run(&node);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("xenstored_path"),
        "{out}"
    );
}

type Test = (&'static str, fn(&Path));

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let root = tempfile::Builder::new()
        .prefix("wsp-xen-")
        .tempdir()
        .unwrap();
    let probe = Standin::start(&driver_dir(root.path()), &[]);
    // Sound: no thread has started yet (the stand-ins are child processes).
    std::env::set_var("XENSTORED_PATH", &probe.socket);
    std::env::set_var("PATH", probe.path_env());
    std::env::set_var("WSP_FAKE_XL_LOG", &probe.xl_log);
    drop(probe);
    let tests: &[Test] = &[
        (
            "dom0_memory_comes_from_xenstore_target_static_max_and_current",
            dom0_memory_comes_from_xenstore_target_static_max_and_current,
        ),
        (
            "balloon_reaches_its_target_after_the_delay_and_the_wait_reports_it",
            balloon_reaches_its_target_after_the_delay_and_the_wait_reports_it,
        ),
        (
            "balloon_stuck_at_its_floor_times_out_naming_the_figures",
            balloon_stuck_at_its_floor_times_out_naming_the_figures,
        ),
        (
            "xl_mem_set_fallback_moves_the_balloon",
            xl_mem_set_fallback_moves_the_balloon,
        ),
        (
            "target_above_static_max_is_refused_before_anything_is_written",
            target_above_static_max_is_refused_before_anything_is_written,
        ),
        (
            "guest_is_created_from_a_generated_config_paused_saved_restored_and_destroyed",
            guest_is_created_from_a_generated_config_paused_saved_restored_and_destroyed,
        ),
        (
            "create_without_free_memory_fails_with_xls_own_words",
            create_without_free_memory_fails_with_xls_own_words,
        ),
        (
            "listing_through_xl_json_matches_listing_through_xenstore",
            listing_through_xl_json_matches_listing_through_xenstore,
        ),
        (
            "command_prefix_is_an_argv_put_before_xl",
            command_prefix_is_an_argv_put_before_xl,
        ),
        (
            "dead_xenstored_is_a_bounded_error_and_a_restarted_one_is_reconnected",
            dead_xenstored_is_a_bounded_error_and_a_restarted_one_is_reconnected,
        ),
        (
            "pilot_on_xen_reserves_starts_a_vm_and_gives_memory_back_on_release",
            pilot_on_xen_reserves_starts_a_vm_and_gives_memory_back_on_release,
        ),
        (
            "sigterm_on_xen_destroys_only_this_slots_guests_and_restores_memory",
            sigterm_on_xen_destroys_only_this_slots_guests_and_restores_memory,
        ),
        (
            "sigterm_on_xen_suspends_the_guest_and_another_node_resumes_the_same_one",
            sigterm_on_xen_suspends_the_guest_and_another_node_resumes_the_same_one,
        ),
        (
            "balloon_that_never_reaches_its_target_on_xen_exits_3_with_memory_restored",
            balloon_that_never_reaches_its_target_on_xen_exits_3_with_memory_restored,
        ),
        (
            "pilot_refuses_a_node_whose_xenstored_is_down_with_exit_2",
            pilot_refuses_a_node_whose_xenstored_is_down_with_exit_2,
        ),
        (
            "check_passes_on_a_fit_node_and_names_the_fix_when_xenstored_is_down",
            check_passes_on_a_fit_node_and_names_the_fix_when_xenstored_is_down,
        ),
    ];
    let mut failed = Vec::new();
    let mut ran = 0;
    let t0 = Instant::now();
    for (name, f) in tests {
        let full = format!("xen::{name}");
        if !filters.is_empty() && !filters.iter().any(|p| full.contains(p.as_str())) {
            continue;
        }
        ran += 1;
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| f(root.path()));
        let ms = t.elapsed().as_millis();
        match r {
            Ok(()) => println!("test {full} ... ok ({ms} ms)"),
            Err(_) => {
                println!("test {full} ... FAILED ({ms} ms)");
                failed.push(full);
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; in {:.2}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len(),
        t0.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        for f in &failed {
            println!("    {f}");
        }
        std::process::exit(1);
    }
}
