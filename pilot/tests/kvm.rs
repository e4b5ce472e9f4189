//! The kvm driver against real QEMU: a tiny Debian kernel + busybox initramfs
//! (built and cached by scripts/kvm-payload.sh) boots, prints its marker, is
//! paused, suspended to a file and resumed, and destroyed; hugepages go back.
//!
//! These tests change the host's hugepage pool, so they hold a host-wide test
//! lock for their whole run and compare the pool under it. They fail loudly
//! when QEMU or the payload cannot be had.

use pilot::files::{lock_exclusive, FileLock};
use pilot::hypervisor::kvm::{host_claims_kvm, Accel, Kvm, KvmConfig};
use pilot::hypervisor::{HvError, HvOptions, Hypervisor, NodeConfig};
use protocol::pilot::VmLaunch;
use protocol::{SlotId, VmId, VmName};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Host-wide lock shared with the end-to-end kvm tests.
const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";
const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// QEMU present (installed by scripts/install-deps.sh if not) and the
/// payload built; returns the payload directory. Panics with the reason.
fn payload() -> PathBuf {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
        || Command::new("qemu-img").arg("--version").output().is_err()
    {
        let st = Command::new(repo().join("scripts/install-deps.sh"))
            .status()
            .expect("run scripts/install-deps.sh");
        assert!(
            st.success(),
            "scripts/install-deps.sh failed: cannot install QEMU"
        );
    }
    let out = Command::new(repo().join("scripts/kvm-payload.sh"))
        .output()
        .expect("run scripts/kvm-payload.sh");
    assert!(
        out.status.success(),
        "scripts/kvm-payload.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initrd.gz").is_file(),
        "payload incomplete in {}",
        dir.display()
    );
    dir
}

fn test_lock() -> FileLock {
    lock_exclusive(Path::new(TEST_LOCK), Duration::from_secs(600))
        .unwrap_or_else(|_| panic!("{TEST_LOCK} held by another kvm test for 10 minutes"))
}

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("number")
}

/// A driver on a temporary node, with every VM destroyed and every page
/// given back when dropped (even when the test fails).
struct Node {
    kvm: Kvm,
    _dir: tempfile::TempDir,
    _lock: FileLock,
}

impl Node {
    fn open(extra: &str) -> (Self, u64) {
        let lock = test_lock();
        let p = payload();
        let dir = tempfile::Builder::new()
            .prefix("wsp-kvm-")
            .tempdir()
            .expect("temp dir");
        let toml = format!(
            "[kvm]\nrun_dir = \"{run}/%n/kvm\"\nimage_dir = \"{run}/images\"\nkernel = \"{k}\"\ninitrd = \"{i}\"\n{extra}",
            run = dir.path().display(),
            k = p.join("vmlinux").display(),
            i = p.join("initrd.gz").display(),
        );
        let node: NodeConfig = toml::from_str(&toml).expect("node config");
        std::fs::create_dir_all(dir.path().join("images")).expect("image dir");
        let opts = HvOptions {
            sim_dir: None,
            node: node.clone(),
            node_name: "n1".into(),
        };
        let original = nr_hugepages();
        let kvm = Kvm::open(&node.kvm, &opts).expect("open the kvm driver");
        (
            Node {
                kvm,
                _dir: dir,
                _lock: lock,
            },
            original,
        )
    }

    fn image_dir(&self) -> PathBuf {
        self._dir.path().join("images")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(ds) = self.kvm.domains() {
            for d in ds {
                let _ = self.kvm.destroy(&d.name);
            }
        }
        if let Ok(m) = self.kvm.dom0_memory() {
            let _ = self.kvm.set_dom0_target(m.max_mb);
        }
    }
}

fn launch(memory_mb: u64, image: &str) -> VmLaunch {
    let vm_id = VmId::generate();
    VmLaunch {
        name: VmName::new(SlotId::generate(), vm_id.clone()).to_string(),
        vm_id,
        memory_mb,
        cpus: 1,
        image: image.to_string(),
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

/// Waits (bounded) for a serial line containing `pat`; returns the time.
fn wait_serial(kvm: &Kvm, name: &str, pat: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(kvm.serial_path(name)).unwrap_or_default();
        if text.contains(pat) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "no {pat:?} on {name}'s console within {limit:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn max_tick(kvm: &Kvm, name: &str) -> u64 {
    std::fs::read_to_string(kvm.serial_path(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("WSP-TICK ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn pid_of(kvm: &Kvm, name: &str) -> Option<u32> {
    std::fs::read_to_string(kvm.run_dir().join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn kvm_vm_boots_to_its_marker_pauses_resumes_suspends_to_file_and_comes_back() {
    let (node, original) =
        Node::open("append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.tick=1\"\n");
    let kvm = &node.kvm;
    let (accel, why) = kvm.accelerator();
    if !host_claims_kvm().0 {
        assert_eq!(
            accel,
            Accel::Tcg,
            "no usable KVM here ({why}) so the driver must pick TCG"
        );
    }
    assert!(kvm.name().starts_with("kvm ("), "name {}", kvm.name());

    // Reserve 128 MB as hugepages, the way the pilot does.
    let m = kvm.dom0_memory().expect("dom0 memory");
    kvm.set_dom0_target(m.current_mb - 128)
        .expect("reserve 128 MB");
    assert_eq!(nr_hugepages(), original + 64, "64 pages of 2 MB reserved");
    assert_eq!(kvm.dom0_memory().unwrap().current_mb, m.current_mb - 128);

    let vm = launch(128, "kernel:");
    let t0 = Instant::now();
    kvm.create(&vm).expect("create the VM");
    let boot = wait_serial(
        kvm,
        &vm.name,
        &format!("WSP-VM-READY {}", vm.name),
        Duration::from_secs(60),
    );
    eprintln!(
        "boot to marker: {} ms (create returned after {} ms)",
        (t0.elapsed()).as_millis(),
        (t0.elapsed() - boot).as_millis()
    );
    let ds = kvm.domains().expect("domains");
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert_eq!(
        (ds[0].name.as_str(), ds[0].state.as_str(), ds[0].memory_mb),
        (vm.name.as_str(), "running", 128)
    );
    let cmdline = std::fs::read(format!(
        "/proc/{}/cmdline",
        pid_of(kvm, &vm.name).expect("pid file")
    ))
    .expect("cmdline");
    assert!(String::from_utf8_lossy(&cmdline).contains(&format!("-accel\0{}", accel.as_str())));

    // Pause: the guest's clock-driven ticks stop; resume: they go on.
    wait_serial(kvm, &vm.name, "WSP-TICK 2", Duration::from_secs(20));
    kvm.pause(&vm.name).expect("pause");
    assert_eq!(kvm.status(&vm.name).unwrap(), "paused");
    let before = max_tick(kvm, &vm.name);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        max_tick(kvm, &vm.name) <= before + 1,
        "ticks went on while paused"
    );
    kvm.resume(&vm.name).expect("resume");
    assert_eq!(kvm.status(&vm.name).unwrap(), "running");
    wait_serial(
        kvm,
        &vm.name,
        &format!("WSP-TICK {}", before + 2),
        Duration::from_secs(20),
    );

    // Save into a checkpoint: the guest stops (still there) until the
    // checkpoint is committed and the guest destroyed; then it comes back
    // under another name (another slot), where it goes on ticking.
    let store = pilot::checkpoint::Store::at(&node._dir.path().join("store")).unwrap();
    let id = protocol::pilot::CheckpointId {
        workspace_id: protocol::WorkspaceId::generate(),
        vm_id: vm.vm_id.clone(),
        generation: 1,
    };
    let mut w = store
        .begin(
            &id,
            pilot::checkpoint::WriterInfo {
                node: "n1".into(),
                slot: "sl-00000000".into(),
                pid: std::process::id(),
                started_ms: 0,
            },
        )
        .unwrap();
    let t = Instant::now();
    let driver = kvm
        .save(&vm.name, &mut w, Instant::now() + Duration::from_secs(60))
        .expect("save");
    let save_ms = t.elapsed().as_millis() as u64;
    assert_eq!(
        kvm.status(&vm.name).unwrap(),
        "postmigrate",
        "stopped, not gone"
    );
    let last = max_tick(kvm, &vm.name);
    let c = w
        .commit(pilot::checkpoint::ManifestInfo {
            warm: false,
            vm_name: vm.name.clone(),
            hypervisor: kvm.name().to_string(),
            memory_mb: 128,
            cpus: 1,
            image: vm.image.clone(),
            image_sha256: None,
            node: "n1".into(),
            slot: SlotId::generate(),
            save_ms,
            driver,
        })
        .unwrap();
    eprintln!("save: {save_ms} ms, {} bytes", c.bytes);
    kvm.destroy(&vm.name).expect("destroy the saved guest");
    let mut moved = launch(128, "kernel:");
    moved.vm_id = vm.vm_id.clone();
    let from = store.open_verified(&id, Some(&c.sha256)).unwrap();
    let t = Instant::now();
    kvm.restore(&moved, &from, Instant::now() + Duration::from_secs(60))
        .expect("restore");
    eprintln!("restore: {} ms", t.elapsed().as_millis());
    assert_eq!(kvm.status(&moved.name).unwrap(), "running");
    wait_serial(
        kvm,
        &moved.name,
        &format!("WSP-TICK {}", last + 2),
        Duration::from_secs(20),
    );
    let serial = std::fs::read_to_string(kvm.serial_path(&moved.name)).unwrap();
    assert!(
        !serial.contains("WSP-VM-READY") && !serial.lines().any(|l| l.trim() == "WSP-TICK 1"),
        "a resumed guest does not boot again:\n{serial}"
    );
    let vm = moved;

    // Destroy: process and files gone; give the pages back.
    let pid = pid_of(kvm, &vm.name).expect("pid");
    kvm.destroy(&vm.name).expect("destroy");
    assert!(kvm.domains().unwrap().is_empty());
    assert!(!pilot::hypervisor::kvm::is_our_qemu(pid, &vm.name));
    let left: Vec<_> = std::fs::read_dir(kvm.run_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("wsp-"))
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
    kvm.set_dom0_target(m.current_mb).expect("restore");
    assert_eq!(
        nr_hugepages(),
        original,
        "hugepages back at their original count"
    );
}

#[test]
fn kvm_disk_image_vm_runs_on_a_copy_on_write_overlay_and_the_base_stays_untouched() {
    let (node, original) = Node::open("");
    let kvm = &node.kvm;
    let base = node.image_dir().join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let before = std::fs::read(&base).unwrap();
    let m = kvm.dom0_memory().unwrap();
    kvm.set_dom0_target(m.current_mb - 64).expect("reserve");
    let vm = launch(64, "base.qcow2");
    kvm.create(&vm).expect("create a disk VM");
    let overlay = kvm.run_dir().join(format!("{}.qcow2", vm.name));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&overlay)
        .output()
        .expect("qemu-img info");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["backing-filename"].as_str(), Some(base.to_str().unwrap()));
    assert_eq!(v["backing-filename-format"], "qcow2");
    assert_eq!(kvm.domains().unwrap()[0].state, "running");
    kvm.destroy(&vm.name).expect("destroy");
    assert!(!overlay.exists(), "overlay removed");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "base image untouched"
    );
    kvm.set_dom0_target(m.current_mb).unwrap();
    assert_eq!(nr_hugepages(), original);
}

#[test]
fn kvm_reservation_beyond_what_the_host_can_give_fails_at_once_and_changes_nothing() {
    let (node, original) = Node::open("");
    let kvm = &node.kvm;
    let m = kvm.dom0_memory().unwrap();
    let t = Instant::now();
    let e = kvm
        .set_dom0_target(100)
        .expect_err("taking all but 100 MB must fail");
    assert!(matches!(e, HvError::HugepagesShort { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "failed fast");
    assert_eq!(nr_hugepages(), original, "pool unchanged");
    assert_eq!(kvm.dom0_memory().unwrap(), m, "nothing held");
    // A VM that asks for more hugepages than the pool has is refused by QEMU.
    let vm = launch(64, "kernel:");
    let e = kvm.create(&vm).expect_err("no pages reserved");
    assert!(e.to_string().contains("exited at start"), "{e}");
    assert!(kvm.domains().unwrap().is_empty());
}

#[test]
fn kvm_vms_outlive_their_driver_and_a_later_process_finds_and_destroys_them() {
    let (node, original) = Node::open("hugepages = false\n");
    let vm = launch(64, "kernel:");
    node.kvm.create(&vm).expect("create");
    let pid = pid_of(&node.kvm, &vm.name).expect("pid");
    // A second driver on the same node (kill-all after the pilot died).
    let cfg: KvmConfig = toml::from_str(&format!(
        "run_dir = \"{}\"\nhugepages = false\n",
        node.kvm.run_dir().display()
    ))
    .unwrap();
    let other = Kvm::open(
        &cfg,
        &HvOptions {
            node_name: "n1".into(),
            ..Default::default()
        },
    )
    .expect("open");
    let ds = other.domains().expect("domains");
    assert_eq!(
        ds.iter()
            .map(|d| (d.name.as_str(), d.state.as_str()))
            .collect::<Vec<_>>(),
        vec![(vm.name.as_str(), "running")]
    );
    other
        .destroy(&vm.name)
        .expect("destroy from the other process");
    assert!(!pilot::hypervisor::kvm::is_our_qemu(pid, &vm.name));
    assert!(node.kvm.domains().unwrap().is_empty());
    assert!(!node.kvm.run_dir().join(format!("{}.qmp", vm.name)).exists());
    assert_eq!(
        nr_hugepages(),
        original,
        "accounting only: the pool never moved"
    );
}
