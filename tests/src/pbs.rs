//! A real OpenPBS or Torque on this host for the end-to-end tests
//! (scripts/pbs-up.sh), started once per test binary and stopped at its exit
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
nodes = 1
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
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.unfinished_jobs().iter().any(|j| j == job) {
            assert!(
                std::time::Instant::now() < deadline,
                "job {job} still in the batch system 30 s after the lease ended"
            );
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

/// One VM, one pilot on the one node.
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

/// The node's name as its pilot sees it (the host name).
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl PbsServer {
    /// A coordinator for this server, run as the service user.
    pub fn cluster(&self) -> Cluster {
        Cluster::start(Options {
            memory_mb: 1000,
            kill_grace_s: 5,
            run_as: Some(self.user.clone()),
            lrm: Some(OtherLrm {
                toml: self.toml(5),
                nodes: vec![node_name()],
            }),
            ..Options::default()
        })
    }
}

fn id_of(r: &Reply) -> String {
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

/// A lease whose pilot runs on the server's node through pbsdsh; destroy
/// restores the node and leaves no job.
pub fn lease_runs_on_the_node_and_destroy_leaves_nothing(s: &PbsServer) {
    let c = s.cluster();
    let id = id_of(&c.create(ONE));
    let v = c.wait_for(&id, "running", Duration::from_secs(90), |v| {
        v["state"] == "running"
    });
    assert_eq!(v["vms"][0]["node"], node_name().as_str(), "{v:#}");
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
    assert!(c.pilot_pids(None).is_empty());
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
