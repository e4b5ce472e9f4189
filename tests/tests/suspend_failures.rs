//! Suspend and resume when something goes wrong, end to end (issue 16): a
//! real coordinator, the local batch system, real pilots on simulated nodes
//! sharing a checkpoint store. Each case ends in a state the client reads
//! with its reason, and nothing is left on any node: no guest, no memory
//! held, no pilot, no checkpoint of a lease that ended.

use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wsp_e2e::*;

const ONE: &str = r#"
name = "one"
duration = 3600
[[group]]
name = "head"
count = 1
memory_mb = 1024
image = "debian-12"
"#;

const PAIR: &str = r#"
name = "pair"
duration = 3600
[[group]]
name = "head"
count = 1
memory_mb = 512
image = "debian-12"
[[group]]
name = "worker"
count = 1
memory_mb = 512
image = "debian-12"
"#;

/// A cluster whose nodes share a checkpoint store, which the coordinator
/// mounts too; the nodes' simulated hypervisors get `latency`
/// (`--save-ms-per-gb 8000`, ...) before any pilot runs.
struct Site {
    c: Cluster,
    store: tempfile::TempDir,
    node_cfg: PathBuf,
}

impl Site {
    fn start(latency: &[&str]) -> Site {
        let store = tempfile::Builder::new()
            .prefix("wsp-store-")
            .tempdir()
            .expect("store");
        let node_cfg = store.path().join("node.toml");
        let ckdir = store.path().join("checkpoints");
        std::fs::create_dir_all(&ckdir).expect("checkpoint dir");
        std::fs::write(
            &node_cfg,
            format!(
                "[checkpoints]\ndir = \"{}\"\nsave_mb_per_s = 500\n",
                ckdir.display()
            ),
        )
        .expect("node config");
        let c = Cluster::start(
            Options {
                nodes: 2,
                kill_grace_s: 8,
                report_wait_s: 3,
                node_config: Some(node_cfg.display().to_string()),
                ..Options::default()
            }
            .with_top(&format!("checkpoint_dir = \"{}\"\n", ckdir.display())),
        );
        let s = Site { c, store, node_cfg };
        s.sim_init(latency);
        s
    }

    /// `workspace-pilot sim init --force` on every node (none may hold a guest).
    fn sim_init(&self, extra: &[&str]) {
        for n in &self.c.nodes {
            let out = Command::new(bin("workspace-pilot"))
                .args(["sim", "init", "--force", "--dir"])
                .arg(self.c.sim_dir(n))
                .args(["--memory-mb", "4096", "--cpus", "2"])
                .args(extra)
                .output()
                .expect("workspace-pilot sim init");
            assert!(
                out.status.success(),
                "sim init {n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn checkpoints(&self) -> PathBuf {
        self.store.path().join("checkpoints")
    }

    fn create(&self, spec: &str) -> String {
        let r = self.c.create(spec);
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().expect("id").to_string()
    }

    fn workspace(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("workspace"))
            .args(args)
            .env("WORKSPACE_URL", &self.c.url)
            .env("WORKSPACE_TOKEN", TOKEN)
            .output()
            .expect("run workspace");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Suspends by the CLI and waits until every old slot is given back.
    fn suspend(&self, id: &str) -> Value {
        let (code, out, err) = self.workspace(&["suspend", id, "--wait", "--timeout", "60"]);
        assert_eq!(code, 0, "{out}\n{err}\n{}", self.c.log());
        self.c.wait_for(
            id,
            "suspended without slots",
            Duration::from_secs(30),
            |v| v["state"] == "suspended" && slots_over(v),
        )
    }

    /// The end every case must reach once the lease ended: settled, no
    /// pilot, every node whole, no batch job, the lease's checkpoints gone.
    fn assert_nothing_left(&self, id: &str) {
        let v = self.c.wait_settled(id);
        assert!(slots_over(&v), "{v:#}");
        let t = Instant::now();
        while !self.c.pilot_pids(None).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "pilots left: {:?}",
                self.c.pilot_pids(None)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.c.assert_nodes_restored();
        let t = Instant::now();
        loop {
            let jobs = self.c.local_jobs();
            let live = jobs["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .filter(|j| {
                    matches!(
                        j["state"]["state"].as_str().unwrap_or_default(),
                        "queued" | "running" | "completing" | "held"
                    )
                })
                .count();
            if live == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "batch jobs left: {jobs:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dir = self.checkpoints().join(id);
        let t = Instant::now();
        while dir.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "checkpoints of an ended lease are left: {:?}\n{}",
                list(&dir),
                self.c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn slots_over(v: &Value) -> bool {
    v["slots"].as_array().is_some_and(|s| {
        s.iter().all(|s| {
            ["released", "failed", "unreported"]
                .iter()
                .any(|e| s["state"] == *e)
        })
    })
}

/// Every file under `dir`, relative to it.
fn list(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn phases(c: &Cluster, id: &str) -> Vec<String> {
    c.timeline(id)
        .iter()
        .map(|e| e["phase"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn the_vm(v: &Value, group: &str) -> Value {
    v["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|vm| vm["group"] == group)
        .expect("vm of group")
        .clone()
}

fn reason(v: &Value) -> String {
    v["reason"].as_str().unwrap_or_default().to_string()
}

/// (a) A pilot SIGKILLed while it saves its VM on `workspace suspend`: the
/// save never reports, so the workspace cannot be suspended whole; it fails
/// naming the VM, the other member is destroyed, and an admin's kill-all
/// restores the killed node (its stopped guest, its unfinished checkpoint).
#[test]
fn a_pilot_sigkilled_mid_save_fails_the_workspace_naming_the_vm_and_kill_all_restores_its_node() {
    // 512 MB saved in 8 s: time to kill the pilot in the middle.
    let s = Site::start(&["--save-ms-per-gb", "16000"]);
    let c = &s.c;
    let id = s.create(PAIR);
    let v = c.wait_running(&id);
    let head = the_vm(&v, "head");
    let (slot, node) = (
        head["slot_id"].as_str().expect("slot").to_string(),
        head["node"].as_str().expect("node").to_string(),
    );
    let name = head["name"].as_str().expect("name").to_string();
    let pid = c.pilot_pid_on(&slot, &node);
    let (code, out, err) = s.workspace(&["suspend", &id]);
    assert_eq!(code, 0, "{out}\n{err}");
    // The guest is paused while it is saved: kill its pilot then.
    let t = Instant::now();
    loop {
        let n = c.node(&node);
        let saving = n["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .any(|d| d["name"] == name && d["state"] == "paused");
        if saving {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no save began: {n:#}\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(pid, Signal::SIGKILL);
    wait_gone(pid, Duration::from_secs(5)).expect("pilot killed");

    let v = c.wait_for(&id, "ended", Duration::from_secs(60), |v| {
        v["state"] == "failed" || v["state"] == "preempted"
    });
    assert_eq!(v["state"], "failed", "{v:#}");
    let why = reason(&v);
    assert!(
        why.contains(head["id"].as_str().expect("id")) && why.contains("not saved"),
        "the reason names the VM whose save was lost: {why}"
    );
    // What the killed pilot left: its guest, stopped, and a checkpoint
    // without a manifest, which nothing resumes from.
    let n = c.node(&node);
    assert!(
        n["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .any(|d| d["name"] == name.as_str()),
        "the paused guest is left for kill-all: {n:#}"
    );
    assert_eq!(
        the_vm(&v, "head")["state"],
        "unknown",
        "nobody knows what is left of it: {v:#}"
    );
    let vm_dir = s
        .checkpoints()
        .join(&id)
        .join(head["id"].as_str().expect("id"));
    let files = list(&vm_dir);
    assert!(
        !files.iter().any(|f| f.ends_with("manifest.json")),
        "an unfinished save has no manifest: {files:?}"
    );

    // Once the lease has settled (the other member's pilot gone), the
    // admin restores the node, as `workspace admin nodes` says.
    c.wait_settled(&id);
    let t = Instant::now();
    while !c.pilot_pids(None).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "pilots left");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(bin("workspace-kill-all"))
        .args(["--hypervisor", "sim", "--sim-dir"])
        .arg(c.sim_dir(&node))
        .arg("--state-dir")
        .arg(c.state_dir(&node))
        .arg("--node-config")
        .arg(&s.node_cfg)
        .output()
        .expect("run kill-all");
    assert!(
        out.status.success(),
        "kill-all: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.assert_nothing_left(&id);
    let v = c.get(&id);
    assert_eq!(v["state"], "failed", "{v:#}");
}

/// (b) A checkpoint corrupted in the store between suspend and resume: the
/// pilot refuses it by its checksum and the workspace fails with that reason.
#[test]
fn a_checkpoint_corrupted_between_suspend_and_resume_fails_the_workspace_by_its_checksum() {
    let s = Site::start(&[]);
    let c = &s.c;
    let id = s.create(ONE);
    c.wait_running(&id);
    s.suspend(&id);
    let files = list(&s.checkpoints().join(&id));
    let state = files
        .iter()
        .find(|f| f.ends_with("sim-state"))
        .unwrap_or_else(|| panic!("no sim-state in {files:?}"));
    let path = s.checkpoints().join(&id).join(state);
    let mut bytes = std::fs::read(&path).expect("read checkpoint");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, &bytes).expect("corrupt checkpoint");

    let (code, out, err) = s.workspace(&["resume", &id, "--wait", "--timeout", "60"]);
    assert_ne!(
        code, 0,
        "a corrupted checkpoint is not resumed: {out}\n{err}"
    );
    let v = c.wait_for(&id, "failed", Duration::from_secs(60), |v| {
        v["state"] != "resuming"
    });
    assert_eq!(v["state"], "failed", "{v:#}");
    let why = reason(&v);
    assert!(why.contains("checksum mismatch"), "{why}");
    assert!(why.contains("sim-state"), "names the damaged file: {why}");
    assert!(
        phases(c, &id).iter().any(|p| p == "resume_failed"),
        "{:?}",
        phases(c, &id)
    );
    s.assert_nothing_left(&id);
}

/// (c) The batch system refuses the new slot of a resume (here the local
/// batch system cannot write the job's script): the resume is called off,
/// the workspace is suspended again with the reason and its checkpoints,
/// and a later `workspace resume` brings the same guest back.
#[test]
fn a_new_slot_the_batch_system_refuses_leaves_the_workspace_suspended_and_a_later_resume_works() {
    let s = Site::start(&[]);
    let c = &s.c;
    let id = s.create(ONE);
    let v = c.wait_running(&id);
    let boot = boot_id(c, &v);
    s.suspend(&id);
    let jobs = c.root().join("coordinator/jobs");
    let aside = c.root().join("coordinator/jobs.aside");
    std::fs::rename(&jobs, &aside).expect("move the job folder aside");
    std::fs::write(&jobs, b"not a folder").expect("block the job folder");

    let (code, out, err) = s.workspace(&["resume", &id, "--wait", "--timeout", "60"]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("refused"), "the client is told why: {err}");
    let v = c.get(&id);
    assert_eq!(v["state"], "suspended", "{v:#}");
    let why = reason(&v);
    assert!(
        why.contains("refused the new slot") && why.contains("jobs"),
        "{why}"
    );
    assert!(slots_over(&v), "no new slot is left half-made: {v:#}");
    assert!(c.pilot_pids(None).is_empty(), "no pilot runs");
    c.assert_nodes_restored();
    let kept = list(&s.checkpoints().join(&id));
    assert!(
        kept.iter().any(|f| f.ends_with("manifest.json")),
        "the checkpoint is kept: {kept:?}"
    );

    std::fs::remove_file(&jobs).expect("unblock");
    std::fs::rename(&aside, &jobs).expect("job folder back");
    let (code, out, err) = s.workspace(&["resume", &id, "--wait", "--timeout", "60"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let v = c.get(&id);
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(boot, boot_id(c, &v), "the same guest runs on");
    c.destroy_as(TOKEN, &id);
    s.assert_nothing_left(&id);
    assert_eq!(c.get(&id)["state"], "destroyed");
}

/// (d) Every node has too little memory for the resume (something else
/// holds it: dom0's balloon will not shrink): the resume is called off, the
/// workspace is suspended again with the reason and its checkpoints, and
/// resumes once memory is there.
#[test]
fn a_destination_short_of_memory_leaves_the_workspace_suspended_and_a_later_resume_works() {
    let s = Site::start(&[]);
    let c = &s.c;
    let id = s.create(ONE);
    let v = c.wait_running(&id);
    let boot = boot_id(c, &v);
    s.suspend(&id);
    // dom0 keeps at least 3500 of 4096 MB: a 1024 MB guest cannot have it.
    s.sim_init(&["--balloon-floor-mb", "3500"]);

    let (code, out, err) = s.workspace(&["resume", &id, "--wait", "--timeout", "60"]);
    assert_ne!(code, 0, "{out}\n{err}");
    let v = c.wait_for(&id, "suspended again", Duration::from_secs(60), |v| {
        v["state"] != "resuming" && slots_over(v)
    });
    assert_eq!(v["state"], "suspended", "{v:#}\n{}", c.log());
    let why = reason(&v);
    assert!(why.contains("could not reserve 1024 MB"), "{why}");
    c.assert_nodes_restored();
    assert!(c.pilot_pids(None).is_empty(), "no pilot runs");
    let kept = list(&s.checkpoints().join(&id));
    assert!(
        kept.iter().any(|f| f.ends_with("manifest.json")),
        "the checkpoint is kept: {kept:?}"
    );

    s.sim_init(&[]);
    let (code, out, err) = s.workspace(&["resume", &id, "--wait", "--timeout", "60"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let v = c.get(&id);
    assert_eq!(v["state"], "running", "{v:#}");
    assert_eq!(boot, boot_id(c, &v), "the same guest runs on");
    c.destroy_as(TOKEN, &id);
    s.assert_nothing_left(&id);
}

/// The boot id of the workspace's one guest, read from its node.
fn boot_id(c: &Cluster, v: &Value) -> String {
    let vm = &v["vms"][0];
    let node = vm["node"].as_str().expect("node");
    c.node(node)["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .find(|d| d["name"] == vm["name"])
        .and_then(|d| d["boot_id"].as_str())
        .unwrap_or_else(|| panic!("{} not on {node}", vm["name"]))
        .to_string()
}
