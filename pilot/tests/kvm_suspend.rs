//! Suspend on preemption and resume on another node, with real QEMU (TCG
//! where the host has no usable KVM): `workspace-pilot run --hypervisor kvm`
//! on two "nodes" (each its run dir, state dir and fake coordinator) sharing
//! one checkpoint store.
//!
//! The guest (scripts/kvm-payload.sh, `wsp.count=1 wsp.disk=1`) prints
//! `WSP-COUNT <boot id> <n>` twice a second and writes its boot id to a file
//! on its vfat disk. After SIGTERM on node a and a resume on node b, the
//! same boot id goes on counting from where it stopped and the file is on
//! the disk. The tests change the host's hugepage pool: they hold the kvm
//! tests' host-wide lock, and fail loudly without QEMU or the payload.

use nix::sys::signal::Signal;
use pilot::checkpoint::Store;
use protocol::pilot::{
    CheckpointId, CommandKind, EventKind, OnPreempt, PilotEvent, RestoreFrom, ResumeFailure,
    VmLaunch,
};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::Coord;

const PILOT: &str = env!("CARGO_BIN_EXE_workspace-pilot");
const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";
const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("number")
}

/// The payload directory (built by scripts/kvm-payload.sh); panics with why.
fn payload() -> PathBuf {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.is_ok(),
        "qemu-system-x86_64 is missing: run scripts/install-deps.sh"
    );
    let out = Command::new(repo().join("scripts/kvm-payload.sh"))
        .output()
        .expect("run scripts/kvm-payload.sh");
    assert!(
        out.status.success(),
        "scripts/kvm-payload.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn logs() -> Stdio {
    if std::env::var_os("WSP_TEST_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run a command");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The shared parts: the host lock, the image (kernel, initrd and a vfat
/// disk labelled WSPDATA), the store. Dropping it kills any QEMU of the test.
struct Site {
    tmp: tempfile::TempDir,
    store: PathBuf,
    images: PathBuf,
    original_pages: u64,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Site {
    fn new() -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TEST_LOCK)
            .expect("open the kvm test lock");
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("take the kvm test lock");
        let p = payload();
        let tmp = tempfile::Builder::new()
            .prefix("wsp-kvmck-")
            .tempdir()
            .unwrap();
        let images = tmp.path().join("images");
        let guest = images.join("guest");
        std::fs::create_dir_all(&guest).unwrap();
        for f in ["vmlinux", "initrd.gz"] {
            std::os::unix::fs::symlink(p.join(f), guest.join(f)).unwrap();
        }
        let disk = guest.join("disk.img");
        run(Command::new("mkfs.vfat")
            .args(["-C", "-n", "WSPDATA"])
            .arg(&disk)
            .arg("8192"));
        Self {
            store: tmp.path().join("store"),
            images,
            tmp,
            original_pages: nr_hugepages(),
            _lock: lock,
        }
    }

    /// Node `name`'s config: its own run dir, the shared image dir and store.
    fn node_config(&self, name: &str) -> PathBuf {
        let path = self.tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[kvm]\nrun_dir = \"{run}\"\nimage_dir = \"{images}\"\n\
                 append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.count=1 wsp.disk=1\"\n\
                 compressor = \"none\"\n\
                 [checkpoints]\ndir = \"{store}\"\nsave_mb_per_s = 50\n",
                run = self.run_dir(name).display(),
                images = self.images.display(),
                store = self.store.display(),
            ),
        )
        .unwrap();
        path
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name).join("kvm")
    }

    /// QEMU processes whose command line mentions this test's directory.
    fn qemus(&self) -> Vec<u32> {
        let needle = self.tmp.path().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.contains("qemu-system") && c.contains(&needle)
                    })
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for pid in self.qemus() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// One node: its fake coordinator (one slot) and pilot arguments.
struct Node {
    name: String,
    config: PathBuf,
    state_dir: PathBuf,
    key_file: PathBuf,
    slot: SlotId,
    coord: Arc<Coord>,
    url: String,
    run_dir: PathBuf,
}

impl Node {
    async fn new(site: &Site, name: &str) -> Self {
        let dir = site.tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("slot.key");
        let (coord, url) = Coord::start(&key_file).await;
        Self {
            name: name.into(),
            config: site.node_config(name),
            state_dir: dir.join("state"),
            key_file,
            slot: coord.slot.clone(),
            coord,
            url,
            run_dir: site.run_dir(name),
        }
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
        .args(["--memory-mb", &memory_mb.to_string(), "--duration-s", "600"])
        .args(["--grace-s", &grace_s.to_string(), "--margin-s", "1"])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .args(["--node", &self.name, "--hypervisor", "kvm"])
        .arg("--node-config")
        .arg(&self.config)
        .args(["--notify-timeout-ms", "500", "--poll-wait-ms", "500"])
        .stdin(Stdio::null())
        .stderr(logs())
        .kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    fn launch(&self, vm_id: &VmId) -> VmLaunch {
        VmLaunch::basic(
            vm_id.clone(),
            VmName::new(self.slot.clone(), vm_id.clone()).to_string(),
            128,
            1,
            "guest".into(),
        )
    }

    fn serial(&self, vm: &str) -> PathBuf {
        self.run_dir.join(format!("{vm}.serial"))
    }
}

/// `(boot id, count)` of every complete WSP-COUNT line in `text`.
fn counts(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("WSP-COUNT ")?.split_whitespace();
            let boot = w.next()?.to_string();
            let n = w.next()?.parse().ok()?;
            Some((boot, n))
        })
        .collect()
}

/// Waits (bounded) until `pred` holds for the serial console's text.
async fn wait_serial(
    path: &Path,
    what: &str,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            t.elapsed() < limit,
            "no {what} on {} within {limit:?}; console:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows a serial file until stopped (the file goes when the VM is
/// destroyed): the highest count seen per boot id.
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn follow(path: PathBuf) -> (Arc<AtomicBool>, Seen) {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, v) = (Arc::clone(&stop), Arc::clone(&seen));
    std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            if let Ok(t) = std::fs::read_to_string(&path) {
                let c = counts(&t);
                if !c.is_empty() {
                    *v.lock().unwrap() = c;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (stop, seen)
}

async fn exit_code(child: &mut tokio::process::Child, timeout: Duration) -> i32 {
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap_or_else(|_| panic!("pilot still running after {timeout:?}"))
        .unwrap();
    status.code().unwrap_or(-1)
}

/// Waits for `reserved`; a `reserve_failed` fails the test with its reason.
async fn reserved(node: &Node) {
    let t = Instant::now();
    loop {
        for e in node.coord.events() {
            match e.kind {
                EventKind::Reserved { .. } => return,
                EventKind::ReserveFailed { reason } => {
                    panic!("node {} did not reserve: {reason}", node.name)
                }
                _ => {}
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node {}: {:?}",
            node.name,
            node.coord.kinds()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kinds_of(events: &[PilotEvent], name: &str) -> Vec<PilotEvent> {
    events
        .iter()
        .filter(|e| e.kind.name() == name)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kvm_guest_suspended_on_sigterm_keeps_counting_on_another_node_with_its_disk() {
    let site = Site::new();
    let a = Node::new(&site, "a").await;
    let vm_id = VmId::generate();
    let to = CheckpointId {
        workspace_id: WorkspaceId::generate(),
        vm_id: vm_id.clone(),
        generation: 1,
    };

    // Node a: the guest boots, writes its file, counts.
    let mut pilot_a = a.pilot(256, 30);
    reserved(&a).await;
    let mut launch = a.launch(&vm_id);
    launch.on_preempt = OnPreempt::Suspend { to: to.clone() };
    a.coord.command(CommandKind::StartVm(launch.clone()));
    a.coord
        .wait_for("vm_started", Duration::from_secs(60))
        .await;
    let serial_a = a.serial(&launch.name);
    let text = wait_serial(
        &serial_a,
        "WSP-DISK after 6 counts",
        Duration::from_secs(120),
        |t| t.contains("WSP-DISK ") && counts(t).len() >= 6,
    )
    .await;
    let boot = counts(&text)[0].0.clone();
    assert!(
        text.contains(&format!("WSP-FILE-WRITTEN {boot}")),
        "the guest wrote its file:\n{text}"
    );
    let (stop, seen) = follow(serial_a.clone());

    // SIGTERM: suspended within the grace, memory back, no QEMU left.
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pilot_a.id().unwrap() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(exit_code(&mut pilot_a, Duration::from_secs(30)).await, 0);
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let last_a = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(b, _)| b == &boot)
        .map(|(_, n)| *n)
        .max()
        .expect("counts on node a");
    let events = a.coord.events();
    let suspended = kinds_of(&events, "vm_suspended");
    assert_eq!(suspended.len(), 1, "{:?}", a.coord.kinds());
    let (sha, bytes, save_ms, total_ms) = match &suspended[0].kind {
        EventKind::VmSuspended {
            sha256,
            bytes,
            save_ms,
            total_ms,
            checkpoint,
            ..
        } => {
            assert_eq!(checkpoint, &to);
            (sha256.clone(), *bytes, *save_ms, *total_ms)
        }
        other => panic!("{other:?}"),
    };
    eprintln!(
        "node a: SIGTERM to exit {} ms; save {save_ms} ms, suspend {total_ms} ms, {bytes} bytes; last count {last_a}",
        took.as_millis()
    );
    match &kinds_of(&events, "released")[0].kind {
        EventKind::Released {
            vms_suspended,
            vms_destroyed,
            clean,
            ..
        } => {
            assert_eq!(vms_suspended, &vec![vm_id.clone()]);
            assert!(vms_destroyed.is_empty() && *clean);
        }
        other => panic!("{other:?}"),
    }
    assert!(site.qemus().is_empty(), "no QEMU left on node a");
    assert_eq!(nr_hugepages(), site.original_pages, "node a's pages back");

    // The disk write is in the checkpoint (read from the host, not the guest).
    let store = Store::at(&site.store).unwrap();
    let dir = store.path(&to);
    let raw = site.tmp.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(dir.join("disk.qcow2"))
        .arg(&raw));
    let file = run(Command::new("mtype").arg("-i").arg(&raw).arg("::wsp-file"));
    assert_eq!(
        file.trim(),
        boot,
        "the guest's file is in the checkpoint's overlay"
    );

    // Node b: a corrupted memory state is refused, nothing runs...
    let b = Node::new(&site, "b").await;
    let mut pilot_b = b.pilot(256, 30);
    reserved(&b).await;
    let mut resume = b.launch(&vm_id);
    resume.restore = Some(RestoreFrom {
        checkpoint: to.clone(),
        sha256: sha.clone(),
        warm: false,
    });
    // Uncompressed (the node config says so): a flipped byte in a page of
    // guest memory loads without complaint, only the checksum catches it.
    let mem = dir.join("memory");
    let mut data = std::fs::read(&mem).unwrap();
    let i = data.len() / 3;
    data[i] ^= 0x40;
    std::fs::write(&mem, &data).unwrap();
    b.coord.command(CommandKind::StartVm(resume.clone()));
    match b
        .coord
        .wait_for("vm_resume_failed", Duration::from_secs(60))
        .await
        .kind
    {
        EventKind::VmResumeFailed { cause, reason, .. } => {
            assert_eq!(cause, ResumeFailure::ChecksumMismatch, "{reason}");
            assert!(reason.contains("memory has sha256"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(site.qemus().is_empty(), "no QEMU runs a corrupted state");
    let left: Vec<_> = std::fs::read_dir(&b.run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wsp-"))
        .collect();
    assert!(left.is_empty(), "files left on node b: {left:?}");

    // ...and once repaired, the same guest goes on where it stopped.
    data[i] ^= 0x40;
    std::fs::write(&mem, &data).unwrap();
    b.coord.command(CommandKind::StartVm(resume.clone()));
    let e = b
        .coord
        .wait_for("vm_resumed", Duration::from_secs(60))
        .await;
    if let EventKind::VmResumed {
        restore_ms,
        total_ms,
        bytes,
        ..
    } = e.kind
    {
        eprintln!("node b: restore {restore_ms} ms, resume {total_ms} ms, {bytes} bytes read");
    }
    let serial_b = b.serial(&resume.name);
    let text = wait_serial(
        &serial_b,
        "WSP-DISK after 6 counts",
        Duration::from_secs(60),
        |t| t.contains("WSP-DISK ") && counts(t).len() >= 6,
    )
    .await;
    let c = counts(&text);
    assert!(
        c.iter().all(|(b, _)| b == &boot),
        "same boot id on node b:\n{text}"
    );
    let first_b = c[0].1;
    assert!(
        first_b > last_a && first_b <= last_a + 3,
        "node b's first count {first_b} follows node a's last {last_a}:\n{text}"
    );
    assert!(
        c.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "counting goes on one by one:\n{text}"
    );
    assert!(!text.contains("WSP-VM-READY"), "no boot on node b:\n{text}");
    assert!(
        text.contains(&format!("WSP-DISK {boot}")),
        "the file is on the disk after the resume:\n{text}"
    );

    // Release: nothing left; the checkpoint goes when told.
    b.coord.command(CommandKind::DeleteCheckpoint {
        checkpoint: to.clone(),
    });
    b.coord
        .wait_for("checkpoint_deleted", Duration::from_secs(10))
        .await;
    b.coord.command(CommandKind::Release);
    assert_eq!(exit_code(&mut pilot_b, Duration::from_secs(30)).await, 0);
    assert!(site.qemus().is_empty());
    assert_eq!(nr_hugepages(), site.original_pages);
    assert!(store.list().unwrap().is_empty());
}
