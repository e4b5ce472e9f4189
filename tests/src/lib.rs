//! Harness for the end-to-end tests: starts the real `workspace-coordinator`
//! (with a config file, as a site would), talks to it over HTTP, and reads the
//! simulated nodes through the real `workspace-pilot sim show`.
//!
//! The binaries must be built first (`cargo build --workspace --bins`;
//! `scripts/test.sh` does it). Everything a test starts is stopped when its
//! [`Cluster`] is dropped, pilots included.

pub mod pbs;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "e2e-alice-token";
pub const OTHER_TOKEN: &str = "e2e-bob-token";
/// A user with the admin role.
pub const ADMIN_TOKEN: &str = "e2e-ops-token";

/// The repository's root (for `scripts/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Makes sure the external programs a test runs are there: if one is
/// missing, runs `scripts/install-deps.sh` once, then fails naming each
/// program still missing and its package (`qemu-img not found: install
/// qemu-utils`), never with a bare "No such file or directory" later.
pub fn need_tools(programs: &[&str]) {
    let missing = || -> Vec<pilot::tools::Missing> {
        programs
            .iter()
            .filter_map(|p| pilot::tools::find(p).err())
            .collect()
    };
    if missing().is_empty() {
        return;
    }
    let st = Command::new(repo().join("scripts/install-deps.sh")).status();
    let left = missing();
    assert!(
        left.is_empty(),
        "{} (scripts/install-deps.sh {})",
        pilot::tools::describe(&left),
        match st {
            Ok(s) if s.success() => "ran but did not install it".to_string(),
            Ok(s) => format!("failed: {s}"),
            Err(e) => format!("could not run: {e}"),
        }
    );
}

/// Runs an external program to completion; a program that cannot start
/// fails the test with its name and package.
pub fn run_tool(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| match pilot::tools::spawn_error(args[0], &e) {
            Some(m) => panic!("{m} (to run {args:?})"),
            None => panic!("cannot run {args:?}: {e}"),
        })
}

/// Path of a workspace binary in the same target directory as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Knobs of a test cluster.
pub struct Options {
    pub nodes: u32,
    pub memory_mb: u64,
    pub kill_grace_s: u64,
    pub max_walltime_s: Option<u64>,
    pub coordinator_wait_fraction: f64,
    /// Extra TOML appended to the config (after the last section).
    pub extra: String,
    /// Extra top-level TOML keys (before any section).
    pub top: String,
    /// Extra keys inside `[pilot]`.
    pub pilot_extra: String,
    /// Extra arguments to `workspace-coordinator serve`.
    pub serve_args: Vec<String>,
    /// Another batch system instead of the local one: its config (the
    /// `lrm = ...` line and its section), and its node names. The harness
    /// creates a simulated node for each name.
    pub lrm: Option<OtherLrm>,
    /// `[pilot] hypervisor` (default `sim`).
    pub hypervisor: String,
    /// `[pilot] node_config`: the node config file the pilots get (`%n` allowed).
    pub node_config: Option<String>,
    /// Run the coordinator (and so the batch jobs it submits, and their
    /// pilots) as this user instead of root, as a site runs it for Torque and
    /// PBS: the cluster's folder and copies of the binaries are given to it.
    pub run_as: Option<String>,
    /// `report_wait_s`: how long a slot whose job ended waits for its
    /// pilots' late reports (short here, so that a SIGKILLed pilot's lease
    /// ends quickly; the default is 60 s).
    pub report_wait_s: u64,
    /// The address the coordinator listens on (default 127.0.0.1): pilots
    /// on nodes with a network of their own (the PBS tests' execution hosts)
    /// reach it there.
    pub listen_ip: String,
}

/// A real batch system for [`Options::lrm`].
pub struct OtherLrm {
    pub toml: String,
    pub nodes: Vec<String>,
}

impl Options {
    /// Adds top-level config keys.
    pub fn with_top(mut self, toml: &str) -> Self {
        self.top.push_str(toml);
        self
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 4,
            memory_mb: 4096,
            kill_grace_s: 4,
            max_walltime_s: None,
            coordinator_wait_fraction: 0.5,
            extra: String::new(),
            top: String::new(),
            pilot_extra: String::new(),
            serve_args: Vec::new(),
            lrm: None,
            hypervisor: "sim".into(),
            node_config: None,
            run_as: None,
            report_wait_s: 5,
            listen_ip: "127.0.0.1".into(),
        }
    }
}

/// A coordinator with the local batch system and simulated nodes, in a temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub nodes: Vec<String>,
    coordinator: Option<Child>,
    http: reqwest::blocking::Client,
    serve_args: Vec<String>,
    run_as: Option<nix::unistd::User>,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Cluster {
    pub fn start(opts: Options) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wsp-e2e-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        let run_as = opts.run_as.as_deref().map(|name| {
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("run_as: no user {name} (scripts/pbs-up.sh creates it)"))
        });
        // Pilots started by the batch system as run_as need binaries they can reach.
        let pilot_program = match &run_as {
            Some(_) => {
                let b = root.join("bin");
                std::fs::create_dir_all(&b).expect("bin dir");
                for name in ["workspace-pilot", "workspace-coordinator"] {
                    std::fs::copy(bin(name), b.join(name)).expect("copy binary");
                }
                b.join("workspace-pilot")
            }
            None => bin("workspace-pilot"),
        };
        let cfg = format!(
            r#"
listen = "{listen_ip}:{port}"
data_dir = "{root}/coordinator"
{lrm_line}
tick_ms = 50
lrm_poll_s = 0.5
report_wait_s = {report_wait}
{top}
{lrm_section}
[local]
nodes = {nodes}
cores_per_node = 2
memory_mb_per_node = {mem}
kill_grace_s = {grace}
{maxwall}

[pilot]
program = "{pilot}"
hypervisor = "{hv}"
{node_config}
state_dir = "{root}/nodes/%n/state"
sim_dir = "{root}/nodes/%n/sim"
coordinator_wait_fraction = {frac}
poll_wait_ms = 2000
margin_s = 1
{pilot_extra}

[[users]]
name = "alice"
token_sha256 = "{alice}"

[[users]]
name = "bob"
token_sha256 = "{bob}"

[[users]]
name = "ops"
token_sha256 = "{ops}"
admin = true
{extra}
"#,
            root = root.display(),
            listen_ip = opts.listen_ip,
            port = free_port(),
            nodes = opts.nodes,
            mem = opts.memory_mb,
            grace = opts.kill_grace_s,
            maxwall = opts
                .max_walltime_s
                .map(|s| format!("max_walltime_s = {s}"))
                .unwrap_or_default(),
            pilot = pilot_program.display(),
            frac = opts.coordinator_wait_fraction,
            alice = protocol::auth::token_hash(TOKEN),
            bob = protocol::auth::token_hash(OTHER_TOKEN),
            ops = protocol::auth::token_hash(ADMIN_TOKEN),
            extra = opts.extra,
            top = opts.top,
            report_wait = opts.report_wait_s,
            pilot_extra = opts.pilot_extra,
            hv = opts.hypervisor,
            node_config = opts
                .node_config
                .as_deref()
                .map(|p| format!("node_config = \"{p}\""))
                .unwrap_or_default(),
            lrm_line = if opts.lrm.is_some() {
                ""
            } else {
                "lrm = \"local\""
            },
            lrm_section = opts.lrm.as_ref().map(|l| l.toml.as_str()).unwrap_or(""),
        );
        if let Some(other) = &opts.lrm {
            for n in &other.nodes {
                let out = Command::new(bin("workspace-pilot"))
                    .args(["sim", "init", "--dir"])
                    .arg(root.join("nodes").join(n).join("sim"))
                    .args(["--memory-mb", &opts.memory_mb.to_string(), "--cpus", "2"])
                    .output()
                    .expect("workspace-pilot sim init");
                assert!(
                    out.status.success(),
                    "sim init {n}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::fs::create_dir_all(root.join("nodes").join(n).join("state"))
                    .expect("state dir");
            }
        }
        let cfg_path = root.join("coordinator.toml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        if let Some(u) = &run_as {
            chown_tree(root, u);
        }
        let (child, url) = spawn_coordinator(root, &opts.serve_args, run_as.as_ref());
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(40))
            .build()
            .expect("http client");
        let nodes = match &opts.lrm {
            Some(o) => o.nodes.clone(),
            None => (1..=opts.nodes).map(|i| format!("node{i}")).collect(),
        };
        Cluster {
            dir,
            url,
            nodes,
            coordinator: Some(child),
            http,
            serve_args: opts.serve_args.clone(),
            run_as,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("coordinator.log")).unwrap_or_default()
    }

    fn reply(resp: reqwest::Result<reqwest::blocking::Response>) -> Reply {
        let resp = resp.expect("coordinator answers");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    pub fn create_as(&self, token: &str, spec: &str) -> Reply {
        Self::reply(
            self.http
                .post(format!("{}/api/v1/workspaces", self.url))
                .bearer_auth(token)
                .body(spec.to_string())
                .send(),
        )
    }

    pub fn create(&self, spec: &str) -> Reply {
        self.create_as(TOKEN, spec)
    }

    pub fn get_as(&self, token: &str, id: &str) -> Reply {
        Self::reply(
            self.http
                .get(format!("{}/api/v1/workspaces/{id}", self.url))
                .bearer_auth(token)
                .send(),
        )
    }

    pub fn get(&self, id: &str) -> Value {
        let r = self.get_as(TOKEN, id);
        assert_eq!(r.status, 200, "get {id}: {}", r.body);
        r.body
    }

    pub fn destroy_as(&self, token: &str, id: &str) -> Reply {
        Self::reply(
            self.http
                .delete(format!("{}/api/v1/workspaces/{id}", self.url))
                .bearer_auth(token)
                .send(),
        )
    }

    pub fn list_as(&self, token: &str) -> Reply {
        Self::reply(
            self.http
                .get(format!("{}/api/v1/workspaces", self.url))
                .bearer_auth(token)
                .send(),
        )
    }

    pub fn timeline(&self, id: &str) -> Vec<Value> {
        self.timeline_as(TOKEN, id)
    }

    /// The timeline as the holder of `token` sees it (an admin sees all).
    pub fn timeline_as(&self, token: &str, id: &str) -> Vec<Value> {
        let r = Self::reply(
            self.http
                .get(format!(
                    "{}/api/v1/workspaces/{id}/events?after=0",
                    self.url
                ))
                .bearer_auth(token)
                .send(),
        );
        r.body["events"].as_array().cloned().unwrap_or_default()
    }

    /// POSTs raw bytes to the pilot API with the given headers.
    pub fn pilot_post(
        &self,
        path: &str,
        slot: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .body(body.to_vec())
            .header("content-type", "application/json");
        if let Some(s) = slot {
            req = req.header(protocol::auth::SLOT_HEADER, s);
        }
        if let Some(s) = signature {
            req = req.header(protocol::auth::SIGNATURE_HEADER, s);
        }
        Self::reply(req.send())
    }

    /// Waits (bounded) until `pred(view)`; panics with the view and log otherwise.
    pub fn wait_for(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.get(id);
            if pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("workspace {id} not {what} within {limit:?}: {v:#}\n--- coordinator log ---\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_running(&self, id: &str) -> Value {
        self.wait_for(id, "running", Duration::from_secs(30), |v| {
            v["state"] == "running"
        })
    }

    pub fn wait_settled(&self, id: &str) -> Value {
        self.wait_for(id, "settled", Duration::from_secs(40), |v| {
            v["settled"] == true
        })
    }

    pub fn sim_dir(&self, node: &str) -> PathBuf {
        self.root().join("nodes").join(node).join("sim")
    }

    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.root().join("nodes").join(node).join("state")
    }

    /// The simulated node as `workspace-pilot sim show` prints it.
    pub fn node(&self, node: &str) -> Value {
        let out = Command::new(bin("workspace-pilot"))
            .args(["sim", "show", "--dir"])
            .arg(self.sim_dir(node))
            .output()
            .expect("run workspace-pilot sim show");
        assert!(
            out.status.success(),
            "sim show {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("sim show prints JSON")
    }

    /// Asserts every node has its whole memory back in dom0 and no guest.
    pub fn assert_nodes_restored(&self) {
        for n in &self.nodes {
            let v = self.node(n);
            assert_eq!(
                v["dom0"]["current_mb"], v["dom0"]["max_mb"],
                "{n}: dom0 memory not restored: {v:#}"
            );
            assert_eq!(
                v["domains"].as_array().map(|a| a.len()),
                Some(0),
                "{n}: guests left: {v:#}"
            );
        }
    }

    /// Waits (10 s at most) until every pilot of this cluster has exited.
    /// A lease settles when the coordinator hears `released`; the pilot
    /// exits just after (its outbox acknowledged), so on a loaded machine
    /// it may still be there for a moment.
    pub fn assert_pilots_exited(&self) {
        let t = std::time::Instant::now();
        while !self.pilot_pids(None).is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "pilots still running 10 s after their leases settled: {:?}",
                self.pilot_pids(None)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// PIDs of pilots started by this cluster (found by their argv).
    pub fn pilot_pids(&self, slot: Option<&str>) -> Vec<i32> {
        let root = self.root().display().to_string();
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_pilot = args.first().is_some_and(|a| a.ends_with("workspace-pilot"))
                && args.get(1).is_some_and(|a| a == "run");
            let ours = args.iter().any(|a| a.starts_with(&root));
            let slot_ok = slot.is_none_or(|s| args.iter().any(|a| a == s));
            if is_pilot && ours && slot_ok && !is_zombie(pid) {
                out.push(pid);
            }
        }
        out
    }

    /// PID of the pilot of `slot` on `node` (from the pilot's node state file).
    pub fn pilot_pid_on(&self, slot: &str, node: &str) -> i32 {
        let path = self.state_dir(node).join(format!("slot-{slot}.json"));
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .expect("state file is JSON");
        v["pid"].as_i64().expect("pid in state file") as i32
    }

    pub fn coordinator_pid(&self) -> i32 {
        self.coordinator
            .as_ref()
            .map(|c| c.id() as i32)
            .unwrap_or(0)
    }

    /// Row counts of the coordinator's database.
    pub fn db_counts(&self) -> Vec<(String, i64)> {
        let c = rusqlite::Connection::open(self.root().join("coordinator/coordinator.db"))
            .expect("open db");
        [
            "workspaces",
            "slots",
            "pilots",
            "vms",
            "commands",
            "pilot_events",
            "timeline",
            "addresses",
        ]
        .iter()
        .map(|t| {
            (
                t.to_string(),
                c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))
                    .unwrap_or(-1),
            )
        })
        .collect()
    }

    /// A stored pilot event body (for replay tests).
    pub fn stored_event(&self, kind: &str) -> (String, String) {
        let c = rusqlite::Connection::open(self.root().join("coordinator/coordinator.db"))
            .expect("open db");
        c.query_row(
            "SELECT slot_id, body FROM pilot_events WHERE body LIKE ?1 ORDER BY recorded_ms LIMIT 1",
            [format!("%\"type\":\"{kind}\"%")],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("a stored event of that type")
    }

    /// The key file the coordinator wrote for a slot.
    pub fn slot_key(&self, slot: &str) -> protocol::auth::SlotKey {
        let p = self.root().join(format!("coordinator/keys/{slot}.key"));
        protocol::auth::SlotKey::from_hex(
            &p.display().to_string(),
            &std::fs::read_to_string(&p).expect("key file"),
        )
        .expect("key")
    }

    /// SIGTERM to the coordinator; waits (bounded) for it to exit; its exit code.
    pub fn terminate_coordinator(&mut self, limit: Duration) -> Option<i32> {
        let mut c = self.coordinator.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Stops the coordinator (SIGTERM, then SIGKILL) and any pilot left.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.pilot_pids(None) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Gives `root` and everything in it to `user`.
fn chown_tree(root: &Path, user: &nix::unistd::User) {
    let (uid, gid) = (Some(user.uid.as_raw()), Some(user.gid.as_raw()));
    std::os::unix::fs::chown(root, uid, gid).expect("chown");
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                chown_tree(&p, user);
            } else {
                std::os::unix::fs::chown(&p, uid, gid).expect("chown");
            }
        }
    }
}

/// Starts `workspace-coordinator serve` on `<root>/coordinator.toml` (as
/// `run_as`, from the copy in `<root>/bin`, when given), its log appended
/// to `<root>/coordinator.log`; returns it and its URL.
fn spawn_coordinator(
    root: &Path,
    serve_args: &[String],
    run_as: Option<&nix::unistd::User>,
) -> (Child, String) {
    let url_file = root.join("coordinator/coordinator.url");
    let _ = std::fs::remove_file(&url_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("coordinator.log"))
        .expect("log file");
    let mut cmd = match run_as {
        Some(u) => {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new(root.join("bin/workspace-coordinator"));
            c.uid(u.uid.as_raw())
                .gid(u.gid.as_raw())
                .env("HOME", &u.dir)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name);
            c
        }
        None => Command::new(bin("workspace-coordinator")),
    };
    let child = cmd
        .args(["serve", "--config"])
        .arg(root.join("coordinator.toml"))
        .args(serve_args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start workspace-coordinator");
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = loop {
        if let Ok(u) = std::fs::read_to_string(&url_file) {
            if u.ends_with('\n') {
                break u.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "coordinator did not start; log:\n{}",
            std::fs::read_to_string(root.join("coordinator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, url)
}

/// A port free at the time of asking, for `listen`: pilots keep the URL
/// they were given, so a restarted coordinator must come back on it.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

impl Cluster {
    /// SIGKILLs the coordinator, as a crash would (no shutdown: the local
    /// batch system's pilots keep running, orphaned).
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the coordinator again on the same config, data_dir and address.
    pub fn restart_coordinator(&mut self) {
        assert!(
            self.coordinator.is_none(),
            "restart_coordinator: the coordinator still runs"
        );
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(self.root().join("coordinator.log"))
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, b"\n===== coordinator restarted =====\n")
            });
        let (child, url) =
            spawn_coordinator(self.dir.path(), &self.serve_args, self.run_as.as_ref());
        assert_eq!(
            url, self.url,
            "the restarted coordinator listens where the pilots look"
        );
        self.coordinator = Some(child);
    }

    /// The local batch system's job table (`data_dir/local-lrm.json`).
    pub fn local_jobs(&self) -> Value {
        let p = self.root().join("coordinator/local-lrm.json");
        serde_json::from_str(
            &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .expect("job table is JSON")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// PIDs of the live QEMU processes whose arguments point under `root` (a
/// test's temporary directory): the VMs that test started.
pub fn qemus_under(root: &Path) -> Vec<i32> {
    let root = root.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmd);
        if text.starts_with("qemu-system") && text.contains(&root) && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

/// True while `pid` runs (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok() && !is_zombie(pid)
}

pub fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("signal {sig} to {pid}: {e}"));
}

/// Waits (bounded) for `pid` to be gone; returns how long it took.
pub fn wait_gone(pid: i32, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !alive(pid) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The demo's ensemble: 3 workers of 1 GiB and a head of 2 GiB.
pub const ENSEMBLE: &str = protocol::spec::EXAMPLE;
