//! A real OpenPBS or Torque on this host for the end-to-end tests
//! (scripts/pbs-up.sh): the server on this host and two execution hosts,
//! each a mom in a network and UTS namespace of its own, so pilots run on
//! two nodes through pbsdsh and reach the coordinator over the bridge as on
//! a real cluster. Started once per test binary and stopped at its exit
//! when this binary started it. Skipped (with the reason) only when the
//! flavour is neither built nor has a source tarball to build from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `"openpbs"` or `"torque"`, as the scripts name them.
pub type Flavour = &'static str;

pub struct PbsServer {
    pub flavour: Flavour,
    pub prefix: PathBuf,
    /// The service user that owns the pilot jobs (the coordinator runs as it).
    pub user: String,
    /// Extra environment of every PBS command (`PBS_CONF_FILE`).
    pub env: BTreeMap<String, String>,
    /// The execution hosts (`pbsn1`, `pbsn2`): their host names, as their
    /// pilots see them.
    pub nodes: Vec<String>,
    /// This host's address on the nodes' bridge: the coordinator listens
    /// there.
    pub server_ip: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

static STARTED: OnceLock<Flavour> = OnceLock::new();

extern "C" fn stop_at_exit() {
    if let Some(f) = STARTED.get() {
        let _ = Command::new(repo().join("scripts/pbs-down.sh"))
            .arg(f)
            .output();
    }
}

/// The server, started if needed; `None` after printing why it is skipped.
pub fn pbs_server(flavour: Flavour) -> Option<&'static PbsServer> {
    static SERVER: OnceLock<Result<Option<PbsServer>, String>> = OnceLock::new();
    match SERVER.get_or_init(|| start(flavour)) {
        Ok(s) => s.as_ref(),
        Err(e) => panic!("real {flavour} is needed for this test and did not come up: {e}"),
    }
}

fn start(flavour: Flavour) -> Result<Option<PbsServer>, String> {
    let out = Command::new(repo().join("scripts/pbs-up.sh"))
        .arg(flavour)
        .output()
        .map_err(|e| format!("cannot run scripts/pbs-up.sh: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(2) {
        let src = Command::new(repo().join("scripts/pbs-build.sh"))
            .args(["source", flavour])
            .output()
            .map_err(|e| format!("cannot run scripts/pbs-build.sh: {e}"))?;
        if src.status.success() {
            return Err(format!(
                "{flavour} is not built but its source is at {}: run scripts/pbs-build.sh {flavour} (scripts/test.sh does). {text}",
                String::from_utf8_lossy(&src.stdout).trim()
            ));
        }
        eprintln!("SKIPPED: {flavour} is not built and no source tarball was found: {text}");
        return Ok(None);
    }
    if !out.status.success() {
        return Err(format!(
            "scripts/pbs-up.sh {flavour} failed ({}): {text}",
            out.status
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("export ").map(str::to_string))
        .ok_or(format!("no export line: {text}"))?;
    let vars: BTreeMap<String, String> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if vars.get("WSP_PBS_STARTED").map(String::as_str) == Some("1") {
        let _ = STARTED.set(flavour);
        // SAFETY: registers a plain extern "C" function, once.
        unsafe { nix::libc::atexit(stop_at_exit) };
    }
    Ok(Some(PbsServer {
        flavour,
        prefix: PathBuf::from(&vars["WSP_PBS_PREFIX"]),
        user: vars["WSP_PBS_USER"].clone(),
        nodes: vars["WSP_PBS_NODES"]
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect(),
        server_ip: vars["WSP_PBS_SERVER_IP"].clone(),
        env: vars
            .iter()
            .filter(|(k, _)| k.starts_with("PBS_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }))
}

impl PbsServer {
    /// `lrm = "..."` and its section, for [`crate::OtherLrm`].
    pub fn toml(&self, kill_delay_s: u64) -> String {
        let nodes = self.nodes.len();
        let (lrm, section) = match self.flavour {
            "torque" => ("torque", "torque"),
            _ => ("pbspro", "pbspro"),
        };
        let b = self.prefix.join("bin");
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        format!(
            r#"lrm = "{lrm}"
[cluster]
nodes = {nodes}
cores_per_node = 2
memory_mb_per_node = 1000
[{section}]
qsub = "{b}/qsub"
qstat = "{b}/qstat"
qdel = "{b}/qdel"
pbsdsh = "{b}/pbsdsh"
kill_delay_s = {kill_delay_s}
env = {{ {env} }}
"#,
            b = b.display(),
            env = env.join(", ")
        )
    }

    /// Runs a PBS command as root (an admin's qdel or qstat).
    pub fn admin(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new(self.prefix.join("bin").join(cmd))
            .args(args)
            .envs(&self.env)
            .output()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    /// Waits (30 s at most) until the server has finished `job`.
    pub fn wait_job_gone(&self, job: &str) {
        self.wait_jobs(
            30,
            |left| !left.iter().any(|j| j == job),
            |_| format!("job {job} still in the batch system 30 s after the lease ended"),
        );
    }

    /// Waits (60 s at most) until the server has no unfinished job: a job
    /// whose lease has settled may still be exiting on the server, and until
    /// it is gone the scheduler counts its walltime against the hosts (a
    /// reservation asked for then is DENIED).
    pub fn wait_idle(&self) {
        self.wait_jobs(
            60,
            |left| left.is_empty(),
            |left| format!("jobs still in the batch system after 60 s: {left:?}"),
        );
    }

    /// Polls [`Self::unfinished_jobs`] until `done` holds, failing with
    /// `why` after `limit_s`.
    fn wait_jobs(
        &self,
        limit_s: u64,
        done: impl Fn(&[String]) -> bool,
        why: impl Fn(&[String]) -> String,
    ) {
        let deadline = std::time::Instant::now() + Duration::from_secs(limit_s);
        loop {
            let left = self.unfinished_jobs();
            if done(&left) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{}", why(&left));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ids of the jobs the server has not finished: plain `qstat` (id, name,
    /// user, time, state, queue), without Torque's `C` and PBS's `F`.
    pub fn unfinished_jobs(&self) -> Vec<String> {
        let out = self.admin("qstat", &[]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() >= 6 && w[0].contains('.') && !matches!(w[4], "C" | "F"))
                    .then(|| w[0].to_string())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The scenarios, run by tests/tests/openpbs.rs and tests/tests/torque.rs.

use crate::{wait_gone, Cluster, Options, OtherLrm, Reply, TOKEN};
use std::time::Duration;

/// One VM, one pilot on one of the execution hosts.
pub const ONE: &str = r#"
name = "one"
duration = "1h"
[[group]]
name = "head"
count = 1
memory_mb = 512
cpus = 1
image = "head.qcow2"
"#;

/// Two VMs of 512 MB: one on each 1000 MB node, so a pilot on each.
pub const TWO: &str = r#"
name = "two"
duration = "1h"
[[group]]
name = "worker"
count = 2
memory_mb = 512
cpus = 1
image = "worker.qcow2"
"#;

impl PbsServer {
    /// A coordinator for this server, run as the service user.
    pub fn cluster(&self) -> Cluster {
        self.cluster_with("")
    }

    /// The same, with more lines at the end of its config (`[reservations]`).
    pub fn cluster_with(&self, extra: &str) -> Cluster {
        Cluster::start(Options {
            extra: extra.to_string(),
            memory_mb: 1000,
            kill_grace_s: 5,
            run_as: Some(self.user.clone()),
            listen_ip: self.server_ip.clone(),
            lrm: Some(OtherLrm {
                toml: self.toml(5),
                nodes: self.nodes.clone(),
            }),
            ..Options::default()
        })
    }
}

fn id_of(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

/// A lease whose pilot runs on an execution host through pbsdsh; destroy
/// restores the node and leaves no job.
pub fn lease_runs_on_the_node_and_destroy_leaves_nothing(s: &PbsServer) {
    let c = s.cluster();
    let id = id_of(&c.create(ONE));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    let node = v["vms"][0]["node"].as_str().unwrap_or("");
    assert!(
        s.nodes.iter().any(|n| n == node),
        "the VM runs on an execution host ({:?}): {v:#}",
        s.nodes
    );
    let job = v["slots"][0]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    assert!(
        s.unfinished_jobs().contains(&job),
        "the pilot job {job} runs in the batch system: {:?}",
        s.unfinished_jobs()
    );
    assert_eq!(c.pilot_pids(None).len(), 1);
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "destroyed", "{v:#}");
    c.assert_nodes_restored();
    s.wait_job_gone(&job);
    c.assert_pilots_exited();
}

/// An admin's qdel reaches the pilot as SIGTERM; it hands everything back
/// within kill_delay (5 s) and the lease reads as preempted.
pub fn qdel_is_handled_as_preemption_within_kill_delay(s: &PbsServer) {
    let c = s.cluster();
    let id = id_of(&c.create(ONE));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    let job = v["slots"][0]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let pids = c.pilot_pids(None);
    assert_eq!(pids.len(), 1);
    let out = s.admin("qdel", &[&job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = wait_gone(pids[0], Duration::from_secs(10)).expect("pilot exits");
    assert!(
        t < Duration::from_secs(5),
        "pilot took {t:?}, past kill_delay"
    );
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    eprintln!(
        "--- job output ---\n{}\n--- coordinator log ---\n{}",
        job_output(&c),
        c.log()
    );
    assert_eq!(v["state"], "preempted", "{v:#}");
    assert!(
        v["reason"].as_str().unwrap_or("").contains("SIGTERM"),
        "{v:#}"
    );
    c.assert_nodes_restored();
    s.wait_job_gone(&job);
}

/// The lease ends before the walltime: the pilot leaves, the job ends.
pub fn lease_end_releases_the_node_and_ends_the_job(s: &PbsServer) {
    let c = s.cluster();
    let id = id_of(&c.create(&ONE.replace("\"1h\"", "5")));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    let job = v["slots"][0]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "expired", "{v:#}");
    c.assert_nodes_restored();
    s.wait_job_gone(&job);
}

/// The VMs' nodes, sorted.
fn vm_nodes(v: &serde_json::Value) -> Vec<String> {
    let mut nodes: Vec<String> = v["vms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|vm| vm["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

/// A two-node lease is one batch job whose pbsdsh starts a pilot on each
/// execution host: a VM on each; destroy restores both nodes and ends the
/// job.
pub fn two_node_lease_runs_a_pilot_on_each_host_and_destroy_leaves_nothing(s: &PbsServer) {
    assert_eq!(
        s.nodes.len(),
        2,
        "scripts/pbs-up.sh starts two execution hosts"
    );
    let c = s.cluster();
    let id = id_of(&c.create(TWO));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    assert_eq!(
        vm_nodes(&v),
        s.nodes,
        "one VM on each execution host: {v:#}"
    );
    let slots = v["slots"].as_array().cloned().unwrap_or_default();
    assert_eq!(slots.len(), 1, "one pilot job for both nodes: {v:#}");
    let job = slots[0]["job_id"].as_str().expect("job id").to_string();
    assert!(
        s.unfinished_jobs().contains(&job),
        "the pilot job {job} runs in the batch system: {:?}",
        s.unfinished_jobs()
    );
    assert_eq!(c.pilot_pids(None).len(), 2, "a pilot on each node");
    assert_eq!(c.destroy_as(TOKEN, &id).status, 200);
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(v["state"], "destroyed", "{v:#}");
    c.assert_nodes_restored();
    s.wait_job_gone(&job);
    c.assert_pilots_exited();
}

/// An admin's qdel of a two-node lease's job reaches both pilots, on their
/// own hosts, as SIGTERM: each hands its node back within kill_delay and the
/// lease reads as preempted.
pub fn qdel_of_a_two_node_lease_preempts_it_and_restores_both_hosts(s: &PbsServer) {
    assert_eq!(
        s.nodes.len(),
        2,
        "scripts/pbs-up.sh starts two execution hosts"
    );
    let c = s.cluster();
    let id = id_of(&c.create(TWO));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    assert_eq!(vm_nodes(&v), s.nodes, "{v:#}");
    let job = v["slots"][0]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let pids = c.pilot_pids(None);
    assert_eq!(pids.len(), 2, "a pilot on each node");
    let out = s.admin("qdel", &[&job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pid in pids {
        let t = wait_gone(pid, Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "pilot {pid} still runs 10 s after qdel\n--- job output ---\n{}\n--- coordinator log ---\n{}",
                job_output(&c),
                c.log()
            )
        });
        assert!(
            t < Duration::from_secs(5),
            "pilot {pid} took {t:?}, past kill_delay"
        );
    }
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert_eq!(
        v["state"],
        "preempted",
        "{v:#}\n--- job output ---\n{}\n--- coordinator log ---\n{}",
        job_output(&c),
        c.log()
    );
    assert!(
        v["reason"].as_str().unwrap_or("").contains("SIGTERM"),
        "{v:#}"
    );
    c.assert_nodes_restored();
    s.wait_job_gone(&job);
}

/// Torque 6.1 SIGKILLs every task of a multi-node job at qdel whatever
/// kill_delay says (docs/LRM.md, "Torque: no grace for multi-node jobs"):
/// an admin's qdel of a two-node lease ends both pilots at once, the lease
/// settles, the job is gone, and `workspace-kill-all` on each host restores
/// what the pilots could not (as the coordinator's warning tells admins).
pub fn qdel_of_a_two_node_lease_on_torque_leaves_the_hosts_to_kill_all(s: &PbsServer) {
    assert_eq!(s.flavour, "torque");
    let c = s.cluster();
    let id = id_of(&c.create(TWO));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    assert_eq!(vm_nodes(&v), s.nodes, "{v:#}");
    let job = v["slots"][0]["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let pids = c.pilot_pids(None);
    assert_eq!(pids.len(), 2, "a pilot on each node");
    let out = s.admin("qdel", &[&job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pid in pids {
        let t = wait_gone(pid, Duration::from_secs(10)).expect("pilot ends");
        assert!(t < Duration::from_secs(2), "pilot {pid} took {t:?}");
    }
    let v = c.wait_for(&id, "settled", Duration::from_secs(60), |v| {
        v["settled"] == true
    });
    assert!(
        matches!(v["state"].as_str(), Some("preempted" | "failed")),
        "{v:#}"
    );
    s.wait_job_gone(&job);
    for n in &s.nodes {
        let out = Command::new(crate::bin("workspace-kill-all"))
            // The lease has settled: the pilots' undelivered reports are
            // moot (and kill-all, as root, does not deliver from an outbox
            // the service user owns).
            .args([
                "--hypervisor",
                "sim",
                "--no-deliver",
                "--node",
                n,
                "--sim-dir",
            ])
            .arg(c.root().join("nodes/%n/sim"))
            .arg("--state-dir")
            .arg(c.root().join("nodes/%n/state"))
            .output()
            .expect("run workspace-kill-all");
        assert!(
            out.status.success(),
            "kill-all on {n}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.assert_nodes_restored();
    let log = c.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gets no grace"))
        .collect();
    assert!(
        warned.len() >= 2 && warned.iter().any(|l| l.contains(&job)),
        "the coordinator warned of it, at start and at the submit of {job}: {log}"
    );
}

/// `serve` refuses a grace longer than the queue's kill_delay, naming it.
pub fn coordinator_refuses_a_grace_longer_than_kill_delay(s: &PbsServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{d}/data\"\n{lrm}[[users]]\nname = \"a\"\ntoken_sha256 = \"{h}\"\n",
            d = dir.path().display(),
            lrm = s.toml(30),
            h = protocol::auth::token_hash("t")
        ),
    )
    .expect("config");
    let out = Command::new(crate::bin("workspace-coordinator"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("run the coordinator");
    assert!(!out.status.success(), "serve must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kill_delay is 5 s"),
        "the message names the queue's setting: {err}"
    );
}

/// What the pilot jobs printed (`<data_dir>/jobs/<slot>/*.out`), for failures.
pub fn job_output(c: &Cluster) -> String {
    let mut out = String::new();
    let jobs = c.root().join("coordinator/jobs");
    for slot in std::fs::read_dir(jobs).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(slot.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "out") {
                out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
            }
        }
    }
    out
}
