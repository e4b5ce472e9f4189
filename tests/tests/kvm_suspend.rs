//! Suspend and resume end to end with real QEMU VMs (TCG where the host has
//! no usable KVM), through the coordinator, on the local batch system and
//! on a real Slurm: a guest counts and prints `WSP-COUNT <boot id> <n>` on
//! its serial console and keeps a file on its disk; the batch system
//! preempts its pilot job; the coordinator saves it, asks for a new slot and
//! restores it there. The same boot id goes on counting from where it
//! stopped, the file is there, and after the lease nothing is left: no
//! QEMU, no hugepage, no checkpoint.
//!
//! They change the host's hugepage pool: they hold the kvm tests' host-wide
//! lock, and fail loudly without QEMU, the payload or Slurm.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const TEST_LOCK: &str = "/run/lock/wsp-kvm-tests.lock";
const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

const SPEC: &str = r#"
name = "counter"
duration = "2h"
on_preempt = "suspend"
[[group]]
name = "guest"
count = 1
memory_mb = 128
cpus = 1
image = "guest"
"#;

fn nr_hugepages() -> u64 {
    std::fs::read_to_string(NR)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("number")
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

/// The host lock, the guest image (kernel, initrd, a vfat disk), the node
/// config (its checkpoint store shared by every node) and the coordinator.
struct Site {
    c: Cluster,
    tmp: tempfile::TempDir,
    original: u64,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Site {
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
        need_tools(&["qemu-system-x86_64", "qemu-img", "mkfs.vfat"]);
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
            .prefix("wsp-kvmsus-")
            .tempdir()
            .expect("temp dir");
        let guest = tmp.path().join("images").join("guest");
        std::fs::create_dir_all(&guest).expect("image dir");
        for f in ["vmlinux", "initrd.gz"] {
            std::os::unix::fs::symlink(payload.join(f), guest.join(f)).expect("link");
        }
        run(Command::new("mkfs.vfat")
            .args(["-C", "-n", "WSPDATA"])
            .arg(guest.join("disk.img"))
            .arg("8192"));
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&store).expect("store");
        let node_cfg = tmp.path().join("node.toml");
        std::fs::write(
            &node_cfg,
            format!(
                "[kvm]\nrun_dir = \"{t}/%n/kvm\"\nimage_dir = \"{t}/images\"\n\
                 append = \"console=ttyS0 quiet panic=-1 wsp.hostname=%v wsp.count=1 wsp.disk=1\"\n\
                 [checkpoints]\ndir = \"{s}\"\nsave_mb_per_s = 200\n",
                t = tmp.path().display(),
                s = store.display(),
            ),
        )
        .expect("node config");
        let original = nr_hugepages();
        let c = Cluster::start(
            Options {
                hypervisor: "kvm".into(),
                node_config: Some(node_cfg.display().to_string()),
                ..opts
            }
            .with_top(&format!("checkpoint_dir = \"{}\"\n", store.display())),
        );
        Site {
            c,
            tmp,
            original,
            _lock: lock,
        }
    }

    fn serial(&self, node: &str, vm: &str) -> PathBuf {
        self.tmp
            .path()
            .join(node)
            .join("kvm")
            .join(format!("{vm}.serial"))
    }

    fn store(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    fn assert_host_restored(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !qemus_under(self.tmp.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(qemus_under(self.tmp.path()), Vec::<i32>::new(), "QEMU left");
        assert_eq!(nr_hugepages(), self.original, "hugepages not given back");
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.c.stop();
        for pid in qemus_under(self.tmp.path()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        for n in self.c.nodes.clone() {
            let _ = Command::new(bin("workspace-kill-all"))
                .args(["--hypervisor", "kvm", "--node", &n, "--node-config"])
                .arg(self.tmp.path().join("node.toml"))
                .arg("--state-dir")
                .arg(self.c.state_dir(&n))
                .args(["--purge-checkpoints"])
                .output();
        }
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

fn wait_serial(path: &Path, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
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
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn the_vm(v: &Value) -> (String, String, String) {
    let vm = &v["vms"][0];
    (
        vm["name"].as_str().expect("name").to_string(),
        vm["node"].as_str().expect("node").to_string(),
        vm["slot_id"].as_str().expect("slot").to_string(),
    )
}

/// The whole flow, with `preempt` taking the pilot job away as the batch
/// system does.
fn guest_survives_preemption(s: &Site, preempt: impl Fn(&Value)) {
    let r = s.c.create(SPEC);
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let v = s.c.wait_for(&id, "running", Duration::from_secs(120), |v| {
        v["state"] == "running"
    });
    let (name, node, slot) = the_vm(&v);
    let text = wait_serial(
        &s.serial(&node, &name),
        "WSP-DISK after 6 counts",
        Duration::from_secs(120),
        |t| t.contains("WSP-DISK ") && counts(t).len() >= 6,
    );
    let boot = counts(&text)[0].0.clone();

    let t = Instant::now();
    preempt(&v);
    let v =
        s.c.wait_for(&id, "running again", Duration::from_secs(180), |v| {
            (v["state"] == "running" && v["vms"][0]["slot_id"] != slot.as_str())
                || v["settled"] == true
        });
    assert_eq!(
        v["state"],
        "running",
        "{v:#}\ntimeline: {:#?}",
        s.c.timeline(&id)
            .iter()
            .map(|e| format!("{} {} {}", e["phase"], e["node"], e["detail"]))
            .collect::<Vec<_>>()
    );
    let resumed_in = t.elapsed();
    let before = counts(&std::fs::read_to_string(s.serial(&node, &name)).unwrap_or(text));
    let last = before.last().map_or(0, |c| c.1);
    let (name2, node2, _) = the_vm(&v);
    assert_ne!(name2, name, "the VM is named for its new slot");
    let text = wait_serial(
        &s.serial(&node2, &name2),
        "WSP-DISK after 6 counts",
        Duration::from_secs(120),
        |t| t.contains("WSP-DISK ") && counts(t).len() >= 6,
    );
    let c = counts(&text);
    assert!(c.iter().all(|(b, _)| *b == boot), "same boot id:\n{text}");
    assert!(
        c[0].1 >= last && c[0].1 <= last + 3,
        "counting goes on from {last}:\n{text}"
    );
    assert!(
        !text.contains("WSP-VM-READY"),
        "no boot after the resume:\n{text}"
    );
    assert!(
        text.contains(&format!("WSP-DISK {boot}")),
        "the file written before is on the disk:\n{text}"
    );
    let phases: Vec<String> =
        s.c.timeline(&id)
            .iter()
            .map(|e| e["phase"].as_str().unwrap_or_default().to_string())
            .collect();
    for p in ["vm_suspended", "suspended", "resuming", "vm_resumed"] {
        assert!(phases.iter().any(|x| x == p), "{p} missing: {phases:?}");
    }
    eprintln!("preempted on {node}, running again on {node2} after {resumed_in:?}");

    s.c.destroy_as(TOKEN, &id);
    let v = s.c.wait_settled(&id);
    assert_eq!(v["state"], "destroyed");
    s.assert_host_restored();
    let ws_dir = s.store().join(&id);
    let t = Instant::now();
    while ws_dir.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!ws_dir.exists(), "checkpoints removed with the lease");
}

#[test]
fn kvm_guest_preempted_on_the_local_batch_system_resumes_in_a_new_slot_counting_on() {
    let s = Site::start(Options {
        nodes: 2,
        kill_grace_s: 10,
        ..Options::default()
    });
    guest_survives_preemption(&s, |v| {
        let (_, node, slot) = the_vm(v);
        // The local batch system's cancel: SIGTERM to the job, SIGKILL after the grace.
        let pid = s.c.pilot_pid_on(&slot, &node);
        signal(pid, Signal::SIGTERM);
    });
}

fn slurm_conf() -> String {
    let out = Command::new(repo().join("scripts/slurm-up.sh"))
        .output()
        .expect("run scripts/slurm-up.sh");
    assert!(
        out.status.success(),
        "Slurm did not start (scripts/install-lrm.sh slurm):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .expect("slurm-up prints SLURM_CONF")
        .to_string()
}

#[test]
fn kvm_guest_scancelled_on_slurm_resumes_in_a_new_slot_counting_on() {
    let conf = slurm_conf();
    let toml = format!(
        "lrm = \"slurm\"\n[cluster]\nnodes = 2\ncores_per_node = 2\nmemory_mb_per_node = 1000\n\
         [slurm]\nkill_wait_s = 5\nenv = {{ SLURM_CONF = \"{conf}\" }}\n"
    );
    let s = Site::start(Options {
        memory_mb: 1000,
        lrm: Some(OtherLrm {
            toml,
            nodes: vec!["n1".into(), "n2".into()],
        }),
        ..Options::default()
    });
    let drained = Drained(conf.clone(), std::cell::RefCell::new(None));
    guest_survives_preemption(&s, |v| {
        // An admin takes the node out for maintenance and cancels its job:
        // the guest must come back on the other node.
        let node = v["vms"][0]["node"].as_str().expect("node").to_string();
        let job = v["vms"][0]["job_id"].as_str().expect("job id").to_string();
        run(Command::new("scontrol")
            .args([
                "update",
                &format!("nodename={node}"),
                "state=drain",
                "reason=wsp-test",
            ])
            .env("SLURM_CONF", &conf));
        *drained.1.borrow_mut() = Some(node);
        run(Command::new("scancel").arg(&job).env("SLURM_CONF", &conf));
    });
    let v = s.c.list_as(TOKEN).body;
    let vm = &v["workspaces"][0]["vms"][0];
    let first = vm["placements"][0]["node"].as_str().expect("first node");
    let second = vm["placements"][1]["node"].as_str().expect("second node");
    assert_ne!(first, second, "resumed on another node: {vm:#}");
}

/// A node drained by the test, given back to Slurm however the test ends.
struct Drained(String, std::cell::RefCell<Option<String>>);

impl Drop for Drained {
    fn drop(&mut self) {
        if let Some(node) = self.1.borrow().as_ref() {
            let _ = Command::new("scontrol")
                .args(["update", &format!("nodename={node}"), "state=resume"])
                .env("SLURM_CONF", &self.0)
                .output();
        }
    }
}
