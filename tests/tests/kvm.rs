//! The core scenarios once more with `hypervisor = "kvm"`: real coordinator,
//! local batch system, real pilots starting real QEMU VMs (TCG where the host
//! has no usable KVM) on hugepages, real kill-all. After each: the host's
//! hugepage pool is back at its original count and no QEMU of the test is left.
//!
//! The tests change the host-wide hugepage pool, so they hold a host-wide
//! lock (shared with pilot/tests/kvm.rs) and fail loudly without QEMU.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";
const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

const SPEC: &str = r#"
name = "kvm-e2e"
duration = "2h"
[[group]]
name = "worker"
count = 1
memory_mb = 128
cpus = 1
image = "kernel:"
[[group]]
name = "head"
count = 1
memory_mb = 128
cpus = 1
image = "kernel:"
"#;

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("number")
}

/// A kvm cluster: the host-wide test lock, the node config with the payload,
/// the coordinator. Dropping it stops everything and kills any QEMU the
/// test left (so a failing test leaves nothing running).
struct KvmCluster {
    c: Cluster,
    tmp: tempfile::TempDir,
    original: u64,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl KvmCluster {
    fn start(opts: Options) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TEST_LOCK)
            .expect("open the kvm test lock");
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("take the kvm test lock");
        need_tools(&["qemu-system-x86_64", "qemu-img"]);
        let out = Command::new(repo().join("scripts/kvm-payload.sh"))
            .output()
            .expect("run scripts/kvm-payload.sh");
        assert!(
            out.status.success(),
            "scripts/kvm-payload.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let payload = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let tmp = tempfile::Builder::new()
            .prefix("wsp-kvm-e2e-")
            .tempdir()
            .expect("temp dir");
        let node_cfg = tmp.path().join("node.toml");
        std::fs::write(
            &node_cfg,
            format!(
                "[kvm]\nrun_dir = \"{t}/%n/kvm\"\nimage_dir = \"{t}/images\"\nkernel = \"{p}/vmlinux\"\ninitrd = \"{p}/initrd.gz\"\n",
                t = tmp.path().display(),
                p = payload.display()
            ),
        )
        .expect("write node config");
        let original = nr_hugepages();
        let c = Cluster::start(Options {
            hypervisor: "kvm".into(),
            node_config: Some(node_cfg.display().to_string()),
            nodes: 2,
            ..opts
        });
        KvmCluster {
            c,
            tmp,
            original,
            _lock: lock,
        }
    }

    fn run_dir(&self, node: &str) -> PathBuf {
        self.tmp.path().join(node).join("kvm")
    }

    /// PIDs of QEMU processes whose arguments point into this test's dir.
    fn qemus(&self) -> Vec<i32> {
        qemus_under(self.tmp.path())
    }

    /// The pool is back where it was and no QEMU of this test is left.
    fn assert_host_restored(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.qemus().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.qemus(), Vec::<i32>::new(), "QEMU processes left");
        assert_eq!(
            nr_hugepages(),
            self.original,
            "hugepages not back at their original count"
        );
        for n in &self.c.nodes {
            let ledger = self.run_dir(n).join("hugepages.json");
            if let Ok(t) = std::fs::read_to_string(&ledger) {
                let v: Value = serde_json::from_str(&t).expect("ledger is JSON");
                assert_eq!(v["held_pages"], 0, "{n} still holds pages: {v}");
            }
        }
    }

    fn serial(&self, node: &str, vm: &str) -> String {
        std::fs::read_to_string(self.run_dir(node).join(format!("{vm}.serial"))).unwrap_or_default()
    }

    fn wait_marker(&self, node: &str, vm: &str) {
        let t = Instant::now();
        while !self
            .serial(node, vm)
            .contains(&format!("WSP-VM-READY {vm}"))
        {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{vm} on {node} did not boot; console:\n{}",
                self.serial(node, vm)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KvmCluster {
    fn drop(&mut self) {
        self.c.stop();
        for pid in self.qemus() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        for n in self.c.nodes.clone() {
            let _ = Command::new(bin("workspace-kill-all"))
                .args(["--hypervisor", "kvm", "--node", &n, "--node-config"])
                .arg(self.tmp.path().join("node.toml"))
                .arg("--state-dir")
                .arg(self.c.state_dir(&n))
                .output();
        }
    }
}

fn ws_id(r: &Reply) -> String {
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

fn vm_of(view: &Value, group: &str) -> (String, String, String) {
    let vm = view["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["group"] == group)
        .expect("vm of group");
    let slot = view["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["group"] == group)
        .expect("slot of group");
    (
        vm["name"].as_str().unwrap().to_string(),
        vm["node"].as_str().unwrap().to_string(),
        slot["id"].as_str().unwrap().to_string(),
    )
}

#[test]
fn kvm_ensemble_boots_real_vms_and_destroy_gives_every_hugepage_back() {
    let k = KvmCluster::start(Options::default());
    let id = ws_id(&k.c.create(SPEC));
    let v = k.c.wait_running(&id);
    assert_eq!(
        nr_hugepages(),
        k.original + 128,
        "2 VMs x 128 MB reserved as 2 MB pages"
    );
    let t = Instant::now();
    for g in ["worker", "head"] {
        let (name, node, _) = vm_of(&v, g);
        k.wait_marker(&node, &name);
    }
    eprintln!(
        "both VMs at their marker {} ms after running",
        t.elapsed().as_millis()
    );
    assert_eq!(k.qemus().len(), 2);
    let started: Vec<String> =
        k.c.timeline(&id)
            .iter()
            .filter(|e| e["phase"] == "pilot_started")
            .map(|e| e.to_string())
            .collect();
    assert!(
        started.iter().all(|e| e.contains("hypervisor kvm (")),
        "the pilot reports kvm and its accelerator: {started:?}"
    );
    let r = k.c.destroy_as(TOKEN, &id);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = k.c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed", "{v:#}");
    k.assert_host_restored();
    k.c.assert_pilots_exited();
}

#[test]
fn kvm_sigterm_to_a_pilot_kills_its_qemu_and_restores_hugepages_before_grace_ends() {
    let grace = 4;
    let k = KvmCluster::start(Options {
        kill_grace_s: grace,
        ..Options::default()
    });
    let id = ws_id(&k.c.create(SPEC));
    let v = k.c.wait_running(&id);
    let (name, node, slot) = vm_of(&v, "head");
    let pid = k.c.pilot_pid_on(&slot, &node);
    signal(pid, Signal::SIGTERM);
    let gone = wait_gone(pid, Duration::from_secs(grace + 2)).expect("pilot exits");
    assert!(
        gone < Duration::from_secs(grace),
        "pilot took {gone:?} (grace {grace} s)"
    );
    assert!(
        !k.run_dir(&node).join(format!("{name}.qmp")).exists(),
        "socket removed"
    );
    let v = k.c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    k.assert_host_restored();
}

#[test]
fn kvm_walltime_expiry_leaves_no_qemu_and_the_pool_at_its_original_count() {
    let k = KvmCluster::start(Options {
        max_walltime_s: Some(4),
        kill_grace_s: 3,
        ..Options::default()
    });
    let id = ws_id(&k.c.create(SPEC));
    k.c.wait_running(&id);
    let v = k.c.wait_settled(&id);
    assert_eq!(v["state"], "preempted", "{v:#}");
    k.assert_host_restored();
    k.c.assert_pilots_exited();
}

#[test]
fn kvm_kill_all_after_sigkill_kills_the_left_qemu_removes_its_files_and_restores_hugepages() {
    let k = KvmCluster::start(Options::default());
    let id = ws_id(&k.c.create(SPEC));
    let v = k.c.wait_running(&id);
    let (name, node, slot) = vm_of(&v, "head");
    let pid = k.c.pilot_pid_on(&slot, &node);
    signal(pid, Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(5)).expect("pilot killed");
    assert!(
        k.run_dir(&node).join(format!("{name}.qmp")).exists(),
        "the killed pilot left its VM"
    );
    let kill_all = |extra: &[&str]| {
        let out = Command::new(bin("workspace-kill-all"))
            .args(["--hypervisor", "kvm", "--node", &node, "--node-config"])
            .arg(k.tmp.path().join("node.toml"))
            .arg("--state-dir")
            .arg(k.c.state_dir(&node))
            .args(extra)
            .output()
            .expect("run kill-all");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let before = nr_hugepages();
    let (code, out, err) = kill_all(&["--dry-run"]);
    assert_eq!(code, Some(0), "dry run: {out} {err}");
    assert!(out.contains(&name), "the plan names the VM: {out}");
    assert_eq!(nr_hugepages(), before, "--dry-run changed the pool");
    let (code, out, err) = kill_all(&["--json"]);
    assert_eq!(code, Some(0), "kill-all: {out} {err}");
    let left: Vec<String> = std::fs::read_dir(k.run_dir(&node))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wsp-"))
        .collect();
    assert!(
        left.is_empty(),
        "sockets, pid files, records left: {left:?}"
    );
    let v = k.c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    k.assert_host_restored();
}

#[test]
fn kvm_reservation_beyond_the_host_is_a_clean_reserve_failure_with_nothing_reserved() {
    let total_mb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .expect("MemTotal")
        / 1024;
    let k = KvmCluster::start(Options {
        memory_mb: total_mb + 1024,
        ..Options::default()
    });
    let spec = format!("name = \"too-big\"\nduration = \"1h\"\n[[group]]\nname = \"big\"\ncount = 1\nmemory_mb = {}\ncpus = 1\nimage = \"kernel:\"\n", total_mb - 300);
    let id = ws_id(&k.c.create(&spec));
    let v = k.c.wait_settled(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("hugepages"),
        "the reason names the hugepages: {v:#}"
    );
    k.assert_host_restored();
    k.c.assert_pilots_exited();
}
