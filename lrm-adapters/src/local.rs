//! The embedded batch system: runs pilot jobs as local processes on N virtual
//! nodes with a real LRM's semantics (FIFO queue, cores and memory per node,
//! walltime -> SIGTERM -> grace -> SIGKILL, cancel, batched status). It is
//! what `demo` and most tests run on, so they exercise the production code.
//! It lives in the caller's tokio runtime: `submit` spawns one task per
//! started job; `shutdown` ends every process.
//!
//! With `state_file` set, the job table (next id, jobs, their node
//! allocation, per-node pid and process start time) is written atomically on
//! every change, and `new` loads it: jobs whose processes still run are
//! adopted (supervised by polling `/proc`, since they are no longer our
//! children), jobs whose processes are gone are finished, queued jobs stay
//! queued. Dropping a durable adapter leaves its jobs running (a crashed
//! coordinator never runs `drop` either); without a state file, drop kills them.

use crate::{
    shell_join, BatchPriority, Capacity, JobId, JobReport, JobState, JobStatus, Lrm, LrmError,
    SlotJob, Standing, Submitted, Warning,
};
use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tracing::{debug, error, info, warn};

const LRM: &str = "local";

mod reserve;

/// `[local]` in the coordinator's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct LocalConfig {
    /// Number of virtual nodes.
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
    /// Nodes are named `<node_prefix>1` .. `<node_prefix>N`.
    pub node_prefix: String,
    /// Seconds between SIGTERM and SIGKILL (walltime, cancel, shutdown).
    pub kill_grace_s: u64,
    /// The shell that runs job scripts (`<shell> <script>`).
    pub shell: String,
    /// A queue limit, like a Slurm partition's MaxTime: a job runs at most
    /// this long whatever walltime it asked for (then SIGTERM, grace, SIGKILL).
    pub max_walltime_s: Option<u64>,
    /// Where the job table is kept across restarts (JSON, replaced
    /// atomically on every change). `None`: in memory only, and the jobs die
    /// with the adapter. The coordinator sets `<data_dir>/local-lrm.json`.
    pub state_file: Option<PathBuf>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            nodes: 4,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
            node_prefix: "node".into(),
            kill_grace_s: 5,
            shell: "/bin/sh".into(),
            max_walltime_s: None,
            state_file: None,
        }
    }
}

/// The local batch system. See the module doc.
pub struct LocalLrm {
    shared: Arc<Shared>,
}

struct Shared {
    config: LocalConfig,
    grace: Duration,
    state: Mutex<State>,
}

struct Node {
    name: String,
    free_cores: u32,
    free_memory_mb: u64,
}

/// Why a running job is being ended by us (not by its own exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ending {
    Cancel,
    Timeout,
}

/// One process of a job: the leader of its own process group.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Proc {
    node: String,
    pid: u32,
    /// Start time of the process (`/proc/<pid>/stat` field 22, clock ticks
    /// since boot): a pid reused by another process is never taken for ours.
    start_time: Option<u64>,
}

struct Job {
    spec: SlotJob,
    script: PathBuf,
    /// Queued, Running, Completing (being killed) or a final state.
    state: JobState,
    ending: Option<Ending>,
    /// Indices into `State::nodes` while the job holds them.
    alloc: Vec<usize>,
    procs: Vec<Proc>,
    /// A node whose process could not be started: the job fails with this.
    start_error: Option<String>,
    /// Wall clock (ms since the epoch) when the job started running.
    started_ms: Option<u64>,
    /// The walltime the job runs under (asked, capped by `max_walltime_s`).
    run_walltime: Duration,
    /// Wall clock (ms) when we sent SIGTERM to end it.
    ending_ms: Option<u64>,
    /// The reservation it runs in (see `local/reserve.rs`).
    reservation: Option<String>,
    /// Its node-time when it was queued by size ([`Lrm::submit_sized`]).
    size: Option<u64>,
}

#[derive(Default)]
struct State {
    last_id: u64,
    nodes: Vec<Node>,
    jobs: HashMap<JobId, Job>,
    queue: VecDeque<JobId>,
    shut_down: bool,
    /// A durable adapter was dropped: its tasks leave the jobs and the state
    /// file alone (a new adapter on the same state file owns them now).
    detached: bool,
    /// Adopted jobs' supervisors started and the queue scheduled (needs a
    /// tokio runtime, so it happens at `new` inside one, else at first use).
    resumed: bool,
    /// Jobs loaded as running whose supervisor is not started yet.
    adopted: Vec<JobId>,
    last_resv: u64,
    reservations: Vec<reserve::LocalResv>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop us from killing processes.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LocalLrm {
    /// Checks the config, sets up the nodes and, with a `state_file`, loads
    /// the job table and adopts the jobs still running. May be called inside
    /// or outside a tokio runtime (outside, adopted jobs are supervised from
    /// the first call); `submit` must run inside one.
    pub fn new(config: LocalConfig) -> Result<Self, LrmError> {
        let bad = |message: String| Err(LrmError::Config { lrm: LRM, message });
        if config.nodes == 0 {
            return bad("nodes must be at least 1".into());
        }
        if config.cores_per_node == 0 {
            return bad("cores_per_node must be at least 1".into());
        }
        if config.memory_mb_per_node == 0 {
            return bad("memory_mb_per_node must be at least 1".into());
        }
        if config.node_prefix.is_empty() || config.node_prefix.contains(['/', '\0']) {
            return bad(format!(
                "node_prefix {:?} must be a non-empty plain name",
                config.node_prefix
            ));
        }
        if config.shell.is_empty()
            || (config.shell.contains('/') && !Path::new(&config.shell).is_file())
        {
            return bad(format!("shell {:?} does not exist", config.shell));
        }
        let nodes = (1..=config.nodes)
            .map(|i| Node {
                name: format!("{}{i}", config.node_prefix),
                free_cores: config.cores_per_node,
                free_memory_mb: config.memory_mb_per_node,
            })
            .collect();
        let grace = Duration::from_secs(config.kill_grace_s);
        let mut state = State {
            nodes,
            ..State::default()
        };
        if let Some(path) = &config.state_file {
            if let Some(saved) = load_saved(path)? {
                restore(&mut state, saved);
            }
        }
        let shared = Arc::new(Shared {
            config,
            grace,
            state: Mutex::new(state),
        });
        save(&shared, &shared.lock());
        if tokio::runtime::Handle::try_current().is_ok() {
            resume(&shared);
        }
        Ok(LocalLrm { shared })
    }

    /// Node names, `node1` .. `nodeN`.
    pub fn nodes(&self) -> Vec<String> {
        self.shared
            .lock()
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// (node, pid) of each process of a running (or ending) job; each pid
    /// leads its own process group. Empty for queued, finished or unknown jobs.
    pub fn job_pids(&self, id: &JobId) -> Vec<(String, u32)> {
        let st = self.shared.lock();
        st.jobs
            .get(id)
            .map(|j| j.procs.iter().map(|p| (p.node.clone(), p.pid)).collect())
            .unwrap_or_default()
    }

    fn check_fits(&self, job: &SlotJob) -> Result<(), LrmError> {
        let c = &self.shared.config;
        let refuse = |asked: String, has: String| {
            Err(LrmError::DoesNotFit {
                lrm: LRM,
                asked,
                has,
            })
        };
        if job.nodes == 0 || job.nodes > c.nodes {
            return refuse(format!("{} nodes", job.nodes), format!("{} nodes", c.nodes));
        }
        if job.cores_per_node > c.cores_per_node {
            return refuse(
                format!("{} cores per node", job.cores_per_node),
                format!("{} cores per node", c.cores_per_node),
            );
        }
        if job.memory_mb_per_node > c.memory_mb_per_node {
            return refuse(
                format!("{} MB per node", job.memory_mb_per_node),
                format!("{} MB per node", c.memory_mb_per_node),
            );
        }
        Ok(())
    }

    /// Queues a job, inside reservation `reservation` when given.
    async fn submit_with(
        &self,
        job: &SlotJob,
        reservation: Option<String>,
        size: Option<u64>,
    ) -> Result<JobId, LrmError> {
        resume(&self.shared);
        self.check_fits(job)?;
        if self.shared.lock().shut_down {
            return Err(LrmError::Config {
                lrm: LRM,
                message: "the local batch system has been shut down".into(),
            });
        }
        let script = self.write_script(job)?;
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        st.last_id += 1;
        let id = JobId(st.last_id.to_string());
        info!(job_id = %id, name = %job.name, nodes = job.nodes, script = %script.display(), "job queued");
        st.jobs.insert(
            id.clone(),
            Job {
                spec: job.clone(),
                script,
                state: JobState::Queued,
                ending: None,
                alloc: Vec::new(),
                procs: Vec::new(),
                start_error: None,
                started_ms: None,
                run_walltime: job.walltime,
                ending_ms: None,
                reservation,
                size,
            },
        );
        match size {
            // Behind every queued job as large or larger, ahead of the rest.
            Some(mine) => {
                let at = st
                    .queue
                    .iter()
                    .position(|q| {
                        st.jobs
                            .get(q)
                            .is_none_or(|j| j.size.is_none_or(|s| s < mine))
                    })
                    .unwrap_or(st.queue.len());
                st.queue.insert(at, id.clone());
            }
            None => st.queue.push_back(id.clone()),
        }
        schedule(&self.shared, st);
        save(&self.shared, st);
        Ok(id)
    }

    /// Writes `<workdir>/<name>.sh` with mode 0700.
    fn write_script(&self, job: &SlotJob) -> Result<PathBuf, LrmError> {
        let invalid = |path: PathBuf, what: String| LrmError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
        };
        let name = &job.name;
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.chars().any(char::is_control)
        {
            return Err(invalid(
                job.workdir.clone(),
                format!("job name {name:?} is not a plain file name"),
            ));
        }
        let path = job.workdir.join(format!("{name}.sh"));
        if job.pilot_argv.is_empty() {
            return Err(invalid(
                path,
                "the pilot command (pilot_argv) is empty".into(),
            ));
        }
        let io = |source| LrmError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&job.workdir).map_err(io)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&path)
            .map_err(io)?;
        file.write_all(self.render_script(job).as_bytes())
            .map_err(io)?;
        // `mode` only applies when the file is created; a resubmission reuses it.
        file.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(io)?;
        Ok(path)
    }
}

/// Starts the queued jobs of reservations that have begun, then the others
/// in order while the head of the queue fits (strict FIFO), off the nodes
/// of reservations they would overlap.
fn schedule(shared: &Arc<Shared>, st: &mut State) {
    if st.shut_down {
        return;
    }
    st.queue.retain(|id| st.jobs.contains_key(id));
    let now = protocol::now_ms();
    let reserved: Vec<(JobId, String)> = st
        .queue
        .iter()
        .filter_map(|id| Some((id.clone(), st.jobs.get(id)?.reservation.clone()?)))
        .collect();
    for (id, resv) in reserved {
        let Some(excluded) = reserve::inside(st, &resv, now) else {
            continue;
        };
        let Some(alloc) = st
            .jobs
            .get(&id)
            .and_then(|job| allocate(&st.nodes, &job.spec, &excluded))
        else {
            continue;
        };
        st.queue.retain(|q| q != &id);
        start(shared, st, id, alloc);
    }
    while let Some(id) = st
        .queue
        .iter()
        .find(|id| st.jobs.get(*id).is_some_and(|j| j.reservation.is_none()))
        .cloned()
    {
        let Some(job) = st.jobs.get(&id) else { break };
        let excluded = reserve::fenced(st, shared.grace, job.spec.walltime, now);
        let Some(alloc) = allocate(&st.nodes, &job.spec, &excluded) else {
            break;
        };
        st.queue.retain(|q| q != &id);
        start(shared, st, id, alloc);
    }
}

/// The first `spec.nodes` nodes not `excluded` with enough free cores and memory.
fn allocate(nodes: &[Node], spec: &SlotJob, excluded: &[bool]) -> Option<Vec<usize>> {
    let picked: Vec<usize> = nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            !excluded.get(*i).copied().unwrap_or(false)
                && n.free_cores >= spec.cores_per_node
                && n.free_memory_mb >= spec.memory_mb_per_node
        })
        .map(|(i, _)| i)
        .take(spec.nodes as usize)
        .collect();
    (picked.len() == spec.nodes as usize).then_some(picked)
}

/// Takes the nodes, starts one process per node and its supervising task.
fn start(shared: &Arc<Shared>, st: &mut State, id: JobId, alloc: Vec<usize>) {
    let State { nodes, jobs, .. } = st;
    let Some(job) = jobs.get_mut(&id) else { return };
    for &i in &alloc {
        nodes[i].free_cores -= job.spec.cores_per_node;
        nodes[i].free_memory_mb -= job.spec.memory_mb_per_node;
    }
    job.alloc = alloc;
    job.state = JobState::Running;
    job.started_ms = Some(protocol::now_ms());
    job.run_walltime = match shared.config.max_walltime_s {
        Some(max) => job.spec.walltime.min(Duration::from_secs(max)),
        None => job.spec.walltime,
    };
    let mut children = Vec::new();
    for &i in &job.alloc {
        let node = nodes[i].name.clone();
        match spawn_on_node(&shared.config, job, &id, &node) {
            Ok(child) => match child.id() {
                Some(pid) => {
                    info!(job_id = %id, node = %node, pid, "job process started");
                    job.procs.push(Proc {
                        node: node.clone(),
                        pid,
                        start_time: proc_stat(pid).map(|s| s.start_time),
                    });
                    children.push((node, child));
                }
                // Already reaped: nothing to signal, only to wait for.
                None => children.push((node, child)),
            },
            Err(e) => {
                error!(job_id = %id, node = %node, error = %e, "could not start job process");
                job.start_error = Some(format!("could not start the job on {node}: {e}"));
                break;
            }
        }
    }
    if job.start_error.is_some() {
        for p in &job.procs {
            signal_group(&id, p, Signal::SIGKILL);
        }
    }
    let walltime = job.run_walltime;
    tokio::spawn(supervise(shared.clone(), id, children, walltime));
}

/// Where the job's script on `node` writes the pilot's exit status (`WSP_EXIT_FILE`).
fn exit_path(spec: &SlotJob, node: &str) -> PathBuf {
    spec.workdir.join(format!("{}.{node}.exit", spec.name))
}

/// What the job's script recorded for `node`, if anything:
/// a status over 128 is a death by signal (as shells say it).
fn recorded_exit(spec: &SlotJob, node: &str) -> Option<ExitStatus> {
    let text = std::fs::read_to_string(exit_path(spec, node)).ok()?;
    let code: i32 = text.trim().parse().ok()?;
    Some(match code {
        0..=128 => ExitStatus::from_raw(code << 8),
        129..=255 => ExitStatus::from_raw(code - 128),
        _ => return None,
    })
}

/// How the processes of a job that nobody was the parent of ended, by what
/// their scripts recorded (unknown counts as a success, as it always did).
fn adopted_results(job: &Job) -> Vec<(String, std::io::Result<ExitStatus>)> {
    job.procs
        .iter()
        .map(|p| {
            let status = recorded_exit(&job.spec, &p.node).unwrap_or_else(|| {
                warn!(node = %p.node, job = %job.spec.name, "exit status of a job process nobody watched is unknown");
                ExitStatus::from_raw(0)
            });
            (p.node.clone(), Ok(status))
        })
        .collect()
}

/// `<shell> <script>` on `node`, in its own process group, output appended
/// to `<workdir>/<name>.<node>.log`; the script records its exit status in
/// `WSP_EXIT_FILE` ([`exit_path`]).
fn spawn_on_node(config: &LocalConfig, job: &Job, id: &JobId, node: &str) -> Result<Child, String> {
    let log_path = job
        .spec
        .workdir
        .join(format!("{}.{node}.log", job.spec.name));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let exit_file = exit_path(&job.spec, node);
    match std::fs::remove_file(&exit_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", exit_file.display())),
    }
    Command::new(&config.shell)
        .arg(&job.script)
        .env("WSP_EXIT_FILE", &exit_file)
        .env("WSP_NODE", node)
        .env("WSP_JOB_ID", &id.0)
        .env("WSP_JOB_NAME", &job.spec.name)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{} {}: {e}", config.shell, job.script.display()))
}

/// Waits for every process of a job, ending them at the walltime.
async fn supervise(
    shared: Arc<Shared>,
    id: JobId,
    children: Vec<(String, Child)>,
    walltime: Duration,
) {
    // One waiter per process, so each is reaped as soon as it exits.
    let waiters: Vec<_> = children
        .into_iter()
        .map(|(node, mut child)| (node, tokio::spawn(async move { child.wait().await })))
        .collect();
    let all = async move {
        let mut results = Vec::new();
        for (node, waiter) in waiters {
            let result = waiter
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            results.push((node, result));
        }
        results
    };
    tokio::pin!(all);
    let results = tokio::select! {
        results = &mut all => results,
        () = tokio::time::sleep(walltime) => {
            info!(job_id = %id, ?walltime, "walltime reached");
            terminate(&shared, &mut shared.lock(), &id, Ending::Timeout);
            all.await
        }
    };
    finish(&shared, &id, results);
}

/// SIGTERM to every process group of a running job, SIGKILL after the grace.
/// Does nothing if the job is not running or is already being ended.
fn terminate(shared: &Arc<Shared>, st: &mut State, id: &JobId, ending: Ending) {
    if st.detached {
        return;
    }
    let Some(job) = st.jobs.get_mut(id) else {
        return;
    };
    if job.state != JobState::Running || job.ending.is_some() {
        return;
    }
    info!(job_id = %id, ?ending, grace = ?shared.grace, "ending job: SIGTERM");
    job.ending = Some(ending);
    job.ending_ms = Some(protocol::now_ms());
    job.state = JobState::Completing;
    for p in &job.procs {
        signal_group(id, p, Signal::SIGTERM);
    }
    save(shared, st);
    let shared = shared.clone();
    let id = id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(shared.grace).await;
        let st = shared.lock();
        if st.detached {
            return;
        }
        if let Some(job) = st.jobs.get(&id).filter(|j| !j.state.is_finished()) {
            for p in &job.procs {
                if signal_group(&id, p, Signal::SIGKILL) {
                    warn!(job_id = %id, node = %p.node, pid = p.pid, "still alive after the grace: SIGKILL");
                }
            }
        }
    });
}

/// Sends `signal` to the process group led by `p`. True if the group existed.
fn signal_group(id: &JobId, p: &Proc, signal: Signal) -> bool {
    let Ok(pgid) = i32::try_from(p.pid) else {
        return false;
    };
    if pgid <= 1 {
        return false; // never signal our own group or every process
    }
    // The pid now names another process: our group is gone (a group id is
    // never reused while any member lives), do not signal a stranger's.
    if let (Some(want), Some(now)) = (p.start_time, proc_stat(p.pid)) {
        if now.start_time != want {
            debug!(job_id = %id, node = %p.node, pid = p.pid, "pid reused by another process; not signalled");
            return false;
        }
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(e) => {
            warn!(job_id = %id, node = %p.node, pid = p.pid, %signal, error = %e, "could not signal the job's processes");
            false
        }
    }
}

/// All processes have exited: free the nodes, set the final state, schedule.
fn finish(shared: &Arc<Shared>, id: &JobId, results: Vec<(String, std::io::Result<ExitStatus>)>) {
    let mut guard = shared.lock();
    let st = &mut *guard;
    if st.detached {
        return;
    }
    let Some(job) = st.jobs.get_mut(id) else {
        return;
    };
    // Like an LRM's epilogue: nothing the job started outlives it.
    for p in &job.procs {
        if signal_group(id, p, Signal::SIGKILL) {
            debug!(job_id = %id, node = %p.node, "killed processes left behind by the job");
        }
    }
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(node, r)| failure(node, r))
        .collect();
    let state = match (&job.start_error, job.ending) {
        (Some(e), _) => JobState::Failed(e.clone()),
        (None, Some(Ending::Cancel)) => JobState::Cancelled,
        (None, Some(Ending::Timeout)) => JobState::Timeout,
        (None, None) if failures.is_empty() => JobState::Completed,
        (None, None) => JobState::Failed(failures.join("; ")),
    };
    for &i in &job.alloc {
        st.nodes[i].free_cores += job.spec.cores_per_node;
        st.nodes[i].free_memory_mb += job.spec.memory_mb_per_node;
    }
    job.alloc.clear();
    job.procs.clear();
    info!(job_id = %id, ?state, "job finished");
    job.state = state;
    schedule(shared, st);
    save(shared, st);
}

/// How a node's process failed, or None if it exited 0.
fn failure(node: &str, result: &std::io::Result<ExitStatus>) -> Option<String> {
    match result {
        Ok(status) if status.success() => None,
        Ok(status) => Some(match (status.code(), status.signal()) {
            (Some(code), _) => format!("{node}: exit code {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(s) => format!("{node}: killed by signal {s}"),
                Err(_) => format!("{node}: killed by signal {sig}"),
            },
            (None, None) => format!("{node}: {status}"),
        }),
        Err(e) => Some(format!("{node}: waiting for the process failed: {e}")),
    }
}

// ---- durability: the job table in `state_file` --------------------------------

/// Finished jobs kept in the state file (newest first), like an LRM's MinJobAge.
const KEEP_FINISHED: usize = 1000;
/// How often adopted jobs (not our children: no `wait`) are looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// The state file's content.
#[derive(Serialize, Deserialize)]
struct Saved {
    last_id: u64,
    queue: Vec<JobId>,
    jobs: Vec<SavedJob>,
    #[serde(default)]
    last_resv: u64,
    #[serde(default)]
    reservations: Vec<reserve::LocalResv>,
}

#[derive(Serialize, Deserialize)]
struct SavedJob {
    id: JobId,
    name: String,
    nodes: u32,
    cores_per_node: u32,
    memory_mb_per_node: u64,
    walltime_ms: u64,
    pilot_argv: Vec<String>,
    workdir: PathBuf,
    script: PathBuf,
    state: JobState,
    ending: Option<Ending>,
    ending_ms: Option<u64>,
    /// Node names the job holds (names, not indices: a config change must
    /// not shift them onto other nodes).
    alloc: Vec<String>,
    procs: Vec<Proc>,
    started_ms: Option<u64>,
    run_walltime_ms: u64,
    start_error: Option<String>,
    #[serde(default)]
    reservation: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Writes the job table to the state file (temp file, fsync, rename), if
/// there is one. A failure is logged: the jobs run on, a restart would not
/// know the latest change.
fn save(shared: &Shared, st: &State) {
    let Some(path) = &shared.config.state_file else {
        return;
    };
    if st.detached {
        return;
    }
    let mut finished: Vec<(&JobId, &Job)> = st
        .jobs
        .iter()
        .filter(|(_, j)| j.state.is_finished())
        .collect();
    finished.sort_by_key(|(id, _)| std::cmp::Reverse(id.0.parse::<u64>().unwrap_or(0)));
    let dropped: std::collections::HashSet<&JobId> = finished
        .iter()
        .skip(KEEP_FINISHED)
        .map(|(id, _)| *id)
        .collect();
    let jobs = st
        .jobs
        .iter()
        .filter(|(id, _)| !dropped.contains(id))
        .map(|(id, j)| SavedJob {
            id: id.clone(),
            name: j.spec.name.clone(),
            nodes: j.spec.nodes,
            cores_per_node: j.spec.cores_per_node,
            memory_mb_per_node: j.spec.memory_mb_per_node,
            walltime_ms: ms(j.spec.walltime),
            pilot_argv: j.spec.pilot_argv.clone(),
            workdir: j.spec.workdir.clone(),
            script: j.script.clone(),
            state: j.state.clone(),
            ending: j.ending,
            ending_ms: j.ending_ms,
            alloc: j.alloc.iter().map(|&i| st.nodes[i].name.clone()).collect(),
            procs: j.procs.clone(),
            started_ms: j.started_ms,
            run_walltime_ms: ms(j.run_walltime),
            start_error: j.start_error.clone(),
            reservation: j.reservation.clone(),
            size: j.size,
        })
        .collect();
    let saved = Saved {
        last_id: st.last_id,
        queue: st.queue.iter().cloned().collect(),
        jobs,
        last_resv: st.last_resv,
        reservations: st.reservations.clone(),
    };
    if let Err(e) = write_atomically(path, &saved) {
        error!(path = %path.display(), error = %e, "could not write the local batch system's state file");
    }
}

fn write_atomically(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Private like the coordinator's data_dir, which it may create first.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the state file; `None` when there is none yet.
fn load_saved(path: &Path) -> Result<Option<Saved>, LrmError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LrmError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| LrmError::Config {
            lrm: LRM,
            message: format!(
                "state file {} is unreadable ({e}); move it away to start with an empty job table \
             (job ids then restart at 1 and running jobs are not adopted)",
                path.display()
            ),
        })
}

/// What `/proc/<pid>/stat` says of a process.
struct ProcStat {
    zombie: bool,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after the last ')' start at field 3 (state); starttime is field 22.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        zombie: fields.first()? == &"Z",
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// The process still runs (not a zombie: orphans may wait long for their
/// reaper) and is the one we started (same start time).
fn proc_running(p: &Proc) -> bool {
    match (proc_stat(p.pid), p.start_time) {
        (Some(s), Some(want)) => !s.zombie && s.start_time == want,
        // Without a recorded start time the pid proves nothing.
        _ => false,
    }
}

/// Puts the loaded job table into `st`: running jobs with a live process are
/// adopted (their nodes taken again), those with none left are finished,
/// queued jobs are queued again in their order.
fn restore(st: &mut State, saved: Saved) {
    st.last_id = saved.last_id;
    st.last_resv = saved.last_resv;
    st.reservations = saved.reservations;
    for sj in saved.jobs {
        let id = sj.id.clone();
        let mut job = Job {
            spec: SlotJob {
                name: sj.name,
                nodes: sj.nodes,
                cores_per_node: sj.cores_per_node,
                memory_mb_per_node: sj.memory_mb_per_node,
                walltime: Duration::from_millis(sj.walltime_ms),
                pilot_argv: sj.pilot_argv,
                workdir: sj.workdir,
            },
            script: sj.script,
            state: sj.state,
            ending: sj.ending,
            alloc: Vec::new(),
            procs: sj.procs,
            start_error: sj.start_error,
            started_ms: sj.started_ms,
            run_walltime: Duration::from_millis(sj.run_walltime_ms),
            ending_ms: sj.ending_ms,
            reservation: sj.reservation,
            size: sj.size,
        };
        if matches!(job.state, JobState::Running | JobState::Completing) {
            if job.procs.iter().any(proc_running) {
                for name in &sj.alloc {
                    match st.nodes.iter().position(|n| &n.name == name) {
                        Some(i) => {
                            let n = &mut st.nodes[i];
                            n.free_cores = n.free_cores.saturating_sub(job.spec.cores_per_node);
                            n.free_memory_mb =
                                n.free_memory_mb.saturating_sub(job.spec.memory_mb_per_node);
                            job.alloc.push(i);
                        }
                        None => {
                            warn!(job_id = %id, node = %name, "adopted job runs on a node the config no longer has")
                        }
                    }
                }
                info!(job_id = %id, name = %job.spec.name, procs = job.procs.len(), "running job adopted");
                st.adopted.push(id.clone());
            } else {
                // Not our child: its exit status is what its script
                // recorded. Unless we were ending it, a failure on any node
                // fails it.
                let failures: Vec<String> = adopted_results(&job)
                    .iter()
                    .filter_map(|(node, r)| failure(node, r))
                    .collect();
                let state = match (&job.start_error, job.ending) {
                    (Some(e), _) => JobState::Failed(e.clone()),
                    (None, Some(Ending::Cancel)) => JobState::Cancelled,
                    (None, Some(Ending::Timeout)) => JobState::Timeout,
                    (None, None) if failures.is_empty() => JobState::Completed,
                    (None, None) => JobState::Failed(failures.join("; ")),
                };
                info!(job_id = %id, ?state, "job ended while nobody watched");
                job.state = state;
                job.procs.clear();
            }
        }
        st.jobs.insert(id, job);
    }
    for id in saved.queue {
        if st
            .jobs
            .get(&id)
            .is_some_and(|j| j.state == JobState::Queued)
        {
            st.queue.push_back(id);
        }
    }
    // A queued job the queue list missed still runs, after the others.
    let mut stray: Vec<JobId> = st
        .jobs
        .iter()
        .filter(|(id, j)| j.state == JobState::Queued && !st.queue.contains(id))
        .map(|(id, _)| id.clone())
        .collect();
    stray.sort_by_key(|id| id.0.parse::<u64>().unwrap_or(u64::MAX));
    st.queue.extend(stray);
}

/// Starts supervising adopted jobs and schedules the loaded queue, once.
/// Needs a tokio runtime.
fn resume(shared: &Arc<Shared>) {
    let mut guard = shared.lock();
    let st = &mut *guard;
    if st.resumed || st.detached {
        return;
    }
    st.resumed = true;
    for id in std::mem::take(&mut st.adopted) {
        tokio::spawn(supervise_adopted(shared.clone(), id));
    }
    for r in &st.reservations {
        reserve::arm(shared, r);
    }
    schedule(shared, st);
    save(shared, st);
}

/// Watches a job whose processes are not our children: ends it at its
/// walltime (counted from its recorded start), SIGKILLs it when the grace
/// after our SIGTERM is over, and finishes it when no process is left.
async fn supervise_adopted(shared: Arc<Shared>, id: JobId) {
    let grace_ms = ms(shared.grace);
    loop {
        tokio::time::sleep(ADOPTED_POLL).await;
        let mut guard = shared.lock();
        let st = &mut *guard;
        if st.detached {
            return;
        }
        let Some(job) = st.jobs.get(&id) else { return };
        if job.state.is_finished() {
            return;
        }
        if !job.procs.iter().any(proc_running) {
            let results = adopted_results(job);
            drop(guard);
            finish(&shared, &id, results);
            return;
        }
        let now = protocol::now_ms();
        let deadline = job
            .started_ms
            .map(|s| s.saturating_add(ms(job.run_walltime)));
        if job.state == JobState::Running && deadline.is_some_and(|d| now >= d) {
            info!(job_id = %id, walltime = ?job.run_walltime, "walltime reached (adopted job)");
            terminate(&shared, st, &id, Ending::Timeout);
        } else if job
            .ending_ms
            .is_some_and(|e| now >= e.saturating_add(grace_ms))
        {
            for p in job.procs.iter().filter(|p| proc_running(p)) {
                warn!(job_id = %id, node = %p.node, pid = p.pid, "still alive after the grace: SIGKILL");
                signal_group(&id, p, Signal::SIGKILL);
            }
        }
    }
}

#[async_trait]
impl Lrm for LocalLrm {
    fn kind(&self) -> &'static str {
        LRM
    }

    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        let st = self.shared.lock();
        Ok(Some(
            st.jobs
                .iter()
                .filter(|(_, j)| !j.state.is_finished())
                .map(|(id, j)| (id.clone(), j.spec.name.clone()))
                .collect(),
        ))
    }

    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: self.shared.grace,
        }
    }

    fn capacity(&self) -> Option<Capacity> {
        let c = &self.shared.config;
        Some(Capacity {
            nodes: c.nodes,
            cores_per_node: c.cores_per_node,
            memory_mb_per_node: c.memory_mb_per_node,
        })
    }

    fn render_script(&self, job: &SlotJob) -> String {
        format!(
            "#!{shell}\n\
             # wsp pilot job {name:?} (local adapter): {nodes} node(s), {cores} core(s) and {mem} MB per node, walltime {wall}s.\n\
             # Run once per node with WSP_NODE, WSP_JOB_ID, WSP_JOB_NAME and WSP_EXIT_FILE set.\n\
             # The pilot gets the batch signals (one process group); this shell only traps them to\n\
             # wait for it, then records its exit status (a coordinator restarted after the job\n\
             # ended reads it: as a batch system's accounting) and ends as it did.\n\
             trap : HUP INT TERM USR1 USR2\n\
             {argv}\n\
             s=$?\n\
             echo \"$s\" > \"$WSP_EXIT_FILE\"\n\
             if [ \"$s\" -gt 128 ]; then trap - HUP INT TERM USR1 USR2; kill -s \"$(kill -l \"$s\")\" $$; fi\n\
             exit \"$s\"\n",
            shell = self.shared.config.shell,
            name = job.name,
            nodes = job.nodes,
            cores = job.cores_per_node,
            mem = job.memory_mb_per_node,
            wall = job.walltime.as_secs(),
            argv = shell_join(&job.pilot_argv),
        )
    }

    fn reservations(&self) -> Option<&dyn crate::reserve::Reservations> {
        Some(self)
    }

    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.submit_with(job, None, None).await
    }

    async fn submit_sized(&self, job: &SlotJob, size: u64) -> Result<JobId, LrmError> {
        self.submit_with(job, None, Some(size)).await
    }

    fn queues_by_size(&self) -> bool {
        true
    }

    /// The whole queue is ours: an urgent job (`own` or `operator` alike)
    /// goes ahead of every queued best-effort job (behind urgent ones
    /// queued before it), queued as the largest size there is.
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: Standing,
        mode: BatchPriority,
    ) -> Result<Submitted, LrmError> {
        match (standing, mode) {
            (Standing::Urgent { .. }, BatchPriority::Own | BatchPriority::Operator) => {
                Ok(Submitted {
                    id: self.submit_with(job, None, Some(u64::MAX)).await?,
                    asked: Some("ahead of every queued best-effort pilot job".into()),
                    refused: None,
                })
            }
            (_, _) => Ok(Submitted::plain(match standing {
                Standing::BestEffort { size: Some(s) } => {
                    self.submit_with(job, None, Some(s.min(u64::MAX - 1)))
                        .await?
                }
                _ => self.submit_with(job, None, None).await?,
            })),
        }
    }

    fn check_batch_priority(&self, _mode: BatchPriority) -> Result<(), String> {
        Ok(())
    }

    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        Ok(crate::without_reasons(self.status_with_reasons(ids).await?))
    }

    /// A queued job waits, as Slurm words it, for `Resources` (first in
    /// the queue: the nodes it needs are busy) or `Priority` (behind it).
    async fn status_with_reasons(
        &self,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, JobReport>, LrmError> {
        resume(&self.shared);
        let st = self.shared.lock();
        Ok(ids
            .iter()
            .map(|id| {
                let report = st
                    .jobs
                    .get(id)
                    .map_or(JobReport::bare(JobStatus::NotFound), |j| JobReport {
                        status: JobStatus::Known(j.state.clone()),
                        reason: (j.state == JobState::Queued).then(|| {
                            let first = st.queue.front().is_none_or(|q| q == id);
                            if first { "Resources" } else { "Priority" }.to_string()
                        }),
                    });
                (id.clone(), report)
            })
            .collect())
    }

    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        resume(&self.shared);
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let Some(job) = st.jobs.get_mut(id) else {
            return Err(LrmError::UnknownJob {
                lrm: LRM,
                job: id.clone(),
            });
        };
        match job.state {
            JobState::Queued => {
                info!(job_id = %id, "queued job cancelled");
                job.state = JobState::Cancelled;
                st.queue.retain(|q| q != id);
                schedule(&self.shared, st);
                save(&self.shared, st);
            }
            JobState::Running => terminate(&self.shared, st, id, Ending::Cancel),
            // Being ended already, or finished: nothing to do.
            _ => {}
        }
        Ok(())
    }

    async fn shutdown(&self) {
        resume(&self.shared);
        {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            st.shut_down = true;
            for id in std::mem::take(&mut st.queue) {
                if let Some(job) = st.jobs.get_mut(&id) {
                    job.state = JobState::Cancelled;
                }
            }
            let running: Vec<JobId> = st
                .jobs
                .iter()
                .filter(|(_, j)| j.state == JobState::Running)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &running {
                terminate(&self.shared, st, id, Ending::Cancel);
            }
            save(&self.shared, st);
        }
        let deadline = Instant::now() + self.shared.grace + Duration::from_secs(2);
        loop {
            {
                let st = self.shared.lock();
                let mut alive = st
                    .jobs
                    .iter()
                    .filter(|(_, j)| !j.state.is_finished())
                    .peekable();
                if alive.peek().is_none() {
                    info!("local batch system shut down: no job process left");
                    return;
                }
                if Instant::now() >= deadline {
                    for (id, job) in alive {
                        for p in &job.procs {
                            warn!(job_id = %id, node = %p.node, pid = p.pid, "still alive at shutdown: SIGKILL");
                            signal_group(id, p, Signal::SIGKILL);
                        }
                    }
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LocalLrm {
    /// Without a state file, the last resort when `shutdown` was not called:
    /// SIGKILL whatever still runs. With one, the jobs are left running, as a
    /// crashed coordinator leaves them: the next adapter on the state file
    /// adopts them.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.shut_down = true;
        if self.shared.config.state_file.is_some() {
            st.detached = true;
            let left = st.jobs.values().filter(|j| !j.state.is_finished()).count();
            if left > 0 {
                info!(
                    jobs = left,
                    "local batch system dropped: its jobs keep running in the state file"
                );
            }
            return;
        }
        for (id, job) in st.jobs.iter().filter(|(_, j)| !j.state.is_finished()) {
            for p in &job.procs {
                if signal_group(id, p, Signal::SIGKILL) {
                    warn!(job_id = %id, node = %p.node, pid = p.pid, "adapter dropped without shutdown: SIGKILL");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell_quote;
    use std::collections::HashSet;

    pub(super) fn config(nodes: u32, cores_per_node: u32, kill_grace_s: u64) -> LocalConfig {
        LocalConfig {
            nodes,
            cores_per_node,
            kill_grace_s,
            ..LocalConfig::default()
        }
    }

    pub(super) fn job(dir: &Path, name: &str, nodes: u32, script: &str) -> SlotJob {
        SlotJob {
            name: name.into(),
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 100,
            walltime: Duration::from_secs(60),
            pilot_argv: vec!["sh".into(), "-c".into(), script.into()],
            workdir: dir.join("jobs"),
        }
    }

    fn q(path: &Path) -> String {
        shell_quote(&path.display().to_string())
    }

    /// A script that waits for `stop` to exist (after writing `started` if given).
    pub(super) fn wait_for_file(stop: &Path) -> String {
        format!("while [ ! -e {} ]; do sleep 0.02; done", q(stop))
    }

    pub(super) async fn state(lrm: &LocalLrm, id: &JobId) -> JobStatus {
        lrm.status(std::slice::from_ref(id))
            .await
            .unwrap()
            .remove(id)
            .unwrap()
    }

    pub(super) async fn wait_state(
        lrm: &LocalLrm,
        id: &JobId,
        want: impl Fn(&JobState) -> bool,
        timeout: Duration,
    ) -> JobState {
        let t = Instant::now();
        loop {
            let s = state(lrm, id).await;
            if let JobStatus::Known(s) = &s {
                if want(s) {
                    return s.clone();
                }
            }
            assert!(
                t.elapsed() < timeout,
                "job {id} still {s:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_file(path: &Path, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(path) {
                if !s.is_empty() {
                    return s;
                }
            }
            assert!(
                t.elapsed() < timeout,
                "{} not written after {timeout:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Alive and not a zombie (an orphan's reaper may be slow in a container).
    fn is_alive(pid: u32) -> bool {
        if nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_err() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    pub(super) fn touch(path: &Path) {
        std::fs::write(path, "").unwrap();
    }

    pub(super) const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn local_config_defaults_fill_missing_keys() {
        let c: LocalConfig = serde_json::from_str(r#"{"nodes": 8}"#).unwrap();
        assert_eq!(
            c,
            LocalConfig {
                nodes: 8,
                ..LocalConfig::default()
            }
        );
        let d = LocalConfig::default();
        assert_eq!(
            (d.nodes, d.cores_per_node, d.memory_mb_per_node),
            (4, 2, 4096)
        );
        assert_eq!(
            (d.node_prefix.as_str(), d.kill_grace_s, d.shell.as_str()),
            ("node", 5, "/bin/sh")
        );
        let lrm = LocalLrm::new(d).unwrap();
        assert_eq!(lrm.nodes(), ["node1", "node2", "node3", "node4"]);
        assert_eq!(
            lrm.capacity(),
            Some(Capacity {
                nodes: 4,
                cores_per_node: 2,
                memory_mb_per_node: 4096
            })
        );
        assert_eq!(
            lrm.warning(),
            Warning {
                signal: "SIGTERM",
                grace: Duration::from_secs(5)
            }
        );
        assert!(LocalLrm::new(LocalConfig {
            nodes: 0,
            ..LocalConfig::default()
        })
        .is_err());
        assert!(LocalLrm::new(LocalConfig {
            shell: "/nonexistent/sh".into(),
            ..LocalConfig::default()
        })
        .is_err());
    }

    #[tokio::test]
    async fn two_node_job_runs_one_process_per_node_then_completes() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let (out, stop) = (dir.path().join("out"), dir.path().join("stop"));
        let script = format!(
            "echo \"$WSP_NODE $WSP_JOB_ID $WSP_JOB_NAME\" >> {}; echo hello-from-$WSP_NODE; {}",
            q(&out),
            wait_for_file(&stop)
        );
        let spec = job(dir.path(), "wsp-sl-1", 2, &script);
        let id = lrm.submit(&spec).await.unwrap();
        assert_eq!(id, JobId("1".into()));
        wait_state(&lrm, &id, |s| *s == JobState::Running, LONG).await;
        let pids = lrm.job_pids(&id);
        assert_eq!(pids.len(), 2, "{pids:?}");
        let t = Instant::now();
        while std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            < 2
        {
            assert!(t.elapsed() < LONG, "both nodes did not write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        touch(&stop);
        assert_eq!(
            wait_state(&lrm, &id, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        let lines: HashSet<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(
            lines,
            HashSet::from([
                "node1 1 wsp-sl-1".to_string(),
                "node2 1 wsp-sl-1".to_string()
            ])
        );
        let pid_nodes: HashSet<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(pid_nodes, HashSet::from(["node1", "node2"]));
        for node in ["node1", "node2"] {
            let log =
                std::fs::read_to_string(spec.workdir.join(format!("wsp-sl-1.{node}.log"))).unwrap();
            assert_eq!(log, format!("hello-from-{node}\n"));
        }
        let mode = std::fs::metadata(spec.workdir.join("wsp-sl-1.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(lrm.job_pids(&id).is_empty());
        for (_, pid) in pids {
            assert!(!is_alive(pid));
        }
    }

    #[tokio::test]
    async fn urgent_jobs_go_ahead_of_every_queued_best_effort_job_unless_off() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(1, 1, 1)).unwrap();
        let p = |n: &str| dir.path().join(n);
        let a = lrm
            .submit(&job(dir.path(), "a", 1, &wait_for_file(&p("stop-a"))))
            .await
            .unwrap();
        wait_state(&lrm, &a, |s| *s == JobState::Running, LONG).await;
        let be = Standing::BestEffort { size: None };
        let urgent = Standing::Urgent { urgency: 1 };
        let sub = |n: &'static str, st: Standing, m: BatchPriority| {
            let j = job(dir.path(), n, 1, "true");
            let lrm = &lrm;
            async move { lrm.submit_at(&j, st, m).await.unwrap() }
        };
        let b1 = sub("b1", be, BatchPriority::Own).await;
        let b2 = sub(
            "b2",
            Standing::BestEffort { size: Some(5) },
            BatchPriority::Own,
        )
        .await;
        let u_off = sub("u0", urgent, BatchPriority::Off).await;
        assert_eq!(u_off.asked, None, "off asks nothing");
        let u1 = sub("u1", urgent, BatchPriority::Own).await;
        let u2 = sub("u2", urgent, BatchPriority::Operator).await;
        assert!(u1.asked.as_deref().is_some_and(|a| a.contains("ahead")));
        assert_eq!(u1.refused, None);
        assert_eq!(b1.asked, None);
        assert_eq!(
            Vec::from(lrm.shared.lock().queue.clone()),
            vec![u1.id, u2.id, b2.id, b1.id, u_off.id],
            "urgent ones first, in their order; then sized, then plain ones"
        );
        lrm.cancel(&a).await.unwrap();
    }

    #[tokio::test]
    async fn local_jobs_queued_by_size_go_largest_first_and_keep_that_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(1, 1, 1);
        cfg.state_file = Some(dir.path().join("state.json"));
        let lrm = LocalLrm::new(cfg.clone()).unwrap();
        assert!(lrm.queues_by_size());
        let p = |n: &str| dir.path().join(n);
        let a = lrm
            .submit(&job(dir.path(), "a", 1, &wait_for_file(&p("stop-a"))))
            .await
            .unwrap();
        wait_state(&lrm, &a, |s| *s == JobState::Running, LONG).await;
        let sh = |n: &str| format!("touch {}", q(&p(&format!("started-{n}"))));
        let small = lrm
            .submit_sized(&job(dir.path(), "small", 1, &sh("small")), 10)
            .await
            .unwrap();
        let plain = lrm
            .submit(&job(dir.path(), "plain", 1, &sh("plain")))
            .await
            .unwrap();
        let big = lrm
            .submit_sized(&job(dir.path(), "big", 1, &sh("big")), 100)
            .await
            .unwrap();
        let big2 = lrm
            .submit_sized(&job(dir.path(), "big2", 1, &sh("big2")), 100)
            .await
            .unwrap();
        let want = vec![big.clone(), big2.clone(), small.clone(), plain.clone()];
        assert_eq!(Vec::from(lrm.shared.lock().queue.clone()), want);
        drop(lrm);
        let lrm = LocalLrm::new(cfg).unwrap();
        assert_eq!(
            Vec::from(lrm.shared.lock().queue.clone()),
            want,
            "restored in order"
        );
        let mid = lrm
            .submit_sized(&job(dir.path(), "mid", 1, &sh("mid")), 50)
            .await
            .unwrap();
        let order = vec![big, big2, mid, small, plain];
        assert_eq!(
            Vec::from(lrm.shared.lock().queue.clone()),
            order,
            "sizes restored too"
        );
        std::fs::write(p("stop-a"), "").unwrap();
        for id in &order {
            wait_state(&lrm, id, JobState::is_finished, LONG).await;
        }
        let started = |n: &str| {
            std::fs::metadata(p(&format!("started-{n}")))
                .unwrap()
                .modified()
                .unwrap()
        };
        assert!(started("big") <= started("big2") && started("big2") <= started("mid"));
        assert!(started("mid") <= started("small") && started("small") <= started("plain"));
    }

    #[tokio::test]
    async fn local_jobs_queue_fifo_while_nodes_are_busy_and_start_when_nodes_free() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(2, 1, 1)).unwrap();
        let p = |n: &str| dir.path().join(n);
        let a = lrm
            .submit(&job(dir.path(), "a", 1, &wait_for_file(&p("stop-a"))))
            .await
            .unwrap();
        let b_script = format!(
            "touch {}; {}",
            q(&p("started-b")),
            wait_for_file(&p("stop-b"))
        );
        let b = lrm
            .submit(&job(dir.path(), "b", 2, &b_script))
            .await
            .unwrap();
        let c = lrm
            .submit(&job(
                dir.path(),
                "c",
                1,
                &format!("touch {}", q(&p("started-c"))),
            ))
            .await
            .unwrap();
        assert_eq!((a.0.as_str(), b.0.as_str(), c.0.as_str()), ("1", "2", "3"));
        wait_state(&lrm, &a, |s| *s == JobState::Running, LONG).await;
        // node2 is free, but c waits behind b (FIFO, no overtaking).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Queued));
        assert_eq!(state(&lrm, &c).await, JobStatus::Known(JobState::Queued));
        assert!(!p("started-c").exists());
        // Why each waits, in Slurm's words: b for nodes, c behind b.
        let why = lrm
            .status_with_reasons(&[a.clone(), b.clone(), c.clone()])
            .await
            .unwrap();
        assert_eq!(why[&a].reason, None);
        assert_eq!(why[&b].reason.as_deref(), Some("Resources"));
        assert_eq!(why[&c].reason.as_deref(), Some("Priority"));
        touch(&p("stop-a"));
        assert_eq!(
            wait_state(&lrm, &a, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        wait_state(&lrm, &b, |s| *s == JobState::Running, LONG).await;
        assert_eq!(lrm.job_pids(&b).len(), 2);
        assert_eq!(state(&lrm, &c).await, JobStatus::Known(JobState::Queued));
        touch(&p("stop-b"));
        assert_eq!(
            wait_state(&lrm, &b, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        assert_eq!(
            wait_state(&lrm, &c, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        assert!(p("started-b").exists() && p("started-c").exists());
    }

    #[tokio::test]
    async fn local_job_too_big_for_the_cluster_is_refused_with_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let base = job(dir.path(), "big", 1, "true");
        let cases = [
            (
                SlotJob {
                    nodes: 5,
                    ..base.clone()
                },
                "5 nodes",
                "4 nodes",
            ),
            (
                SlotJob {
                    cores_per_node: 3,
                    ..base.clone()
                },
                "3 cores per node",
                "2 cores per node",
            ),
            (
                SlotJob {
                    memory_mb_per_node: 5000,
                    ..base.clone()
                },
                "5000 MB per node",
                "4096 MB per node",
            ),
        ];
        for (spec, asked, has) in cases {
            let e = lrm.submit(&spec).await.unwrap_err();
            assert!(matches!(e, LrmError::DoesNotFit { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(asked) && msg.contains(has), "{msg}");
        }
        // Nothing was registered: the next accepted job is still "1".
        assert_eq!(lrm.submit(&base).await.unwrap(), JobId("1".into()));
    }

    #[tokio::test]
    async fn local_walltime_sends_term_first_then_kill_after_grace_and_ends_in_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let p = |n: &str| dir.path().join(n);
        // Exits on TERM after leaving a marker.
        let polite = format!(
            "trap 'echo term > {}; exit 0' TERM; while :; do sleep 0.05; done",
            q(&p("polite"))
        );
        // Leaves a marker on TERM but keeps running: needs SIGKILL.
        let stubborn = format!(
            "trap 'echo term >> {}' TERM; while :; do sleep 0.05; done",
            q(&p("stubborn"))
        );
        let walltime = Duration::from_millis(800);
        let t = Instant::now();
        let a = lrm
            .submit(&SlotJob {
                walltime,
                ..job(dir.path(), "polite", 1, &polite)
            })
            .await
            .unwrap();
        let b = lrm
            .submit(&SlotJob {
                walltime,
                ..job(dir.path(), "stubborn", 1, &stubborn)
            })
            .await
            .unwrap();
        wait_state(&lrm, &b, |s| *s == JobState::Running, LONG).await;
        let pid = lrm.job_pids(&b)[0].1;
        assert_eq!(
            wait_state(&lrm, &a, JobState::is_finished, LONG).await,
            JobState::Timeout
        );
        let polite_done = t.elapsed();
        assert!(
            polite_done >= walltime && polite_done < walltime + Duration::from_millis(950),
            "{polite_done:?}"
        );
        assert_eq!(std::fs::read_to_string(p("polite")).unwrap(), "term\n");
        assert_eq!(
            state(&lrm, &b).await,
            JobStatus::Known(JobState::Completing)
        );
        assert_eq!(
            wait_state(&lrm, &b, JobState::is_finished, LONG).await,
            JobState::Timeout
        );
        assert!(
            t.elapsed() >= walltime + Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
        assert!(std::fs::read_to_string(p("stubborn"))
            .unwrap()
            .starts_with("term\n"));
        assert!(!is_alive(pid));
    }

    #[tokio::test]
    async fn local_cancel_of_running_job_sends_term_then_kill_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let (marker, ready) = (dir.path().join("marker"), dir.path().join("ready"));
        let script = format!(
            "trap 'echo term >> {}' TERM; echo $WSP_NODE >> {}; while :; do sleep 0.05; done",
            q(&marker),
            q(&ready)
        );
        let id = lrm
            .submit(&job(dir.path(), "stubborn", 2, &script))
            .await
            .unwrap();
        wait_state(&lrm, &id, |s| *s == JobState::Running, LONG).await;
        // Cancel only once both shells have set their trap.
        let t = Instant::now();
        while std::fs::read_to_string(&ready)
            .unwrap_or_default()
            .lines()
            .count()
            < 2
        {
            assert!(t.elapsed() < LONG, "the job's shells did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pids = lrm.job_pids(&id);
        let t = Instant::now();
        lrm.cancel(&id).await.unwrap();
        assert_eq!(
            state(&lrm, &id).await,
            JobStatus::Known(JobState::Completing)
        );
        lrm.cancel(&id).await.unwrap(); // again while ending: still fine
        let marks = wait_file(&marker, LONG).await;
        assert!(marks.starts_with("term\n"), "{marks:?}");
        assert_eq!(
            wait_state(&lrm, &id, JobState::is_finished, LONG).await,
            JobState::Cancelled
        );
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "killed before the grace: {:?}",
            t.elapsed()
        );
        for (_, pid) in pids {
            assert!(!is_alive(pid));
        }
    }

    #[tokio::test]
    async fn local_cancel_of_queued_job_means_it_never_starts() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(1, 1, 1)).unwrap();
        let p = |n: &str| dir.path().join(n);
        let a = lrm
            .submit(&job(dir.path(), "a", 1, &wait_for_file(&p("stop"))))
            .await
            .unwrap();
        let b = lrm
            .submit(&job(
                dir.path(),
                "b",
                1,
                &format!("touch {}", q(&p("started-b"))),
            ))
            .await
            .unwrap();
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Queued));
        lrm.cancel(&b).await.unwrap();
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Cancelled));
        touch(&p("stop"));
        assert_eq!(
            wait_state(&lrm, &a, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!p("started-b").exists());
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Cancelled));
    }

    #[tokio::test]
    async fn local_cancel_of_finished_job_is_ok_and_of_unknown_id_is_unknown_job() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let id = lrm
            .submit(&job(dir.path(), "quick", 1, "true"))
            .await
            .unwrap();
        assert_eq!(
            wait_state(&lrm, &id, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        lrm.cancel(&id).await.unwrap();
        assert_eq!(
            state(&lrm, &id).await,
            JobStatus::Known(JobState::Completed)
        );
        let e = lrm.cancel(&JobId("999".into())).await.unwrap_err();
        assert!(
            matches!(&e, LrmError::UnknownJob { job, .. } if job.0 == "999"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn local_failing_node_makes_the_job_failed_naming_node_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let script = r#"[ "$WSP_NODE" = node2 ] && exit 3; exit 0"#;
        let id = lrm
            .submit(&job(dir.path(), "fails", 2, script))
            .await
            .unwrap();
        let s = wait_state(&lrm, &id, JobState::is_finished, LONG).await;
        assert_eq!(s, JobState::Failed("node2: exit code 3".into()));
        let id = lrm
            .submit(&job(dir.path(), "killed", 1, "kill -KILL $$"))
            .await
            .unwrap();
        let s = wait_state(&lrm, &id, JobState::is_finished, LONG).await;
        assert_eq!(
            s,
            JobState::Failed("node1: killed by signal SIGKILL".into())
        );
    }

    #[tokio::test]
    async fn local_status_of_many_ids_mixes_known_and_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(1, 1, 1)).unwrap();
        let stop = dir.path().join("stop");
        let done = lrm
            .submit(&job(dir.path(), "done", 1, "true"))
            .await
            .unwrap();
        wait_state(&lrm, &done, JobState::is_finished, LONG).await;
        let running = lrm
            .submit(&job(dir.path(), "running", 1, &wait_for_file(&stop)))
            .await
            .unwrap();
        let queued = lrm
            .submit(&job(dir.path(), "queued", 1, "true"))
            .await
            .unwrap();
        wait_state(&lrm, &running, |s| *s == JobState::Running, LONG).await;
        let ids: Vec<JobId> = [&done.0, &running.0, &queued.0, "4", "x"]
            .iter()
            .map(|s| JobId(s.to_string()))
            .collect();
        let got = lrm.status(&ids).await.unwrap();
        assert_eq!(got.len(), 5);
        assert_eq!(got[&done], JobStatus::Known(JobState::Completed));
        assert_eq!(got[&running], JobStatus::Known(JobState::Running));
        assert_eq!(got[&queued], JobStatus::Known(JobState::Queued));
        assert_eq!(got[&ids[3]], JobStatus::NotFound);
        assert_eq!(got[&ids[4]], JobStatus::NotFound);
        touch(&stop);
        wait_state(&lrm, &queued, JobState::is_finished, LONG).await;
    }

    #[tokio::test]
    async fn local_shutdown_leaves_no_process_alive() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(2, 1, 1)).unwrap();
        let bg = dir.path().join("bg");
        // A background child in the job's process group, and a leader that
        // ignores SIGTERM (its children inherit that).
        let polite = format!("sleep 30 & echo $! >> {}; wait", q(&bg));
        let stubborn = format!("trap '' TERM; sleep 30 & echo $! >> {}; wait", q(&bg));
        let a = lrm
            .submit(&job(dir.path(), "polite", 1, &polite))
            .await
            .unwrap();
        let b = lrm
            .submit(&job(dir.path(), "stubborn", 1, &stubborn))
            .await
            .unwrap();
        let c = lrm
            .submit(&job(dir.path(), "queued", 1, "true"))
            .await
            .unwrap();
        for id in [&a, &b] {
            wait_state(&lrm, id, |s| *s == JobState::Running, LONG).await;
        }
        let t = Instant::now();
        while std::fs::read_to_string(&bg)
            .unwrap_or_default()
            .lines()
            .count()
            < 2
        {
            assert!(t.elapsed() < LONG, "background pids not written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut pids: Vec<u32> = [&a, &b]
            .iter()
            .flat_map(|id| lrm.job_pids(id))
            .map(|(_, pid)| pid)
            .collect();
        pids.extend(
            std::fs::read_to_string(&bg)
                .unwrap()
                .lines()
                .map(|l| l.trim().parse::<u32>().unwrap()),
        );
        assert_eq!(pids.len(), 4);
        assert!(pids.iter().all(|&pid| is_alive(pid)));
        let t = Instant::now();
        lrm.shutdown().await;
        assert!(
            t.elapsed() < Duration::from_secs(3) + Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Orphans are reaped by init a moment after they die.
        let t = Instant::now();
        while pids.iter().any(|&pid| is_alive(pid)) {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "still alive: {pids:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for id in [&a, &b, &c] {
            assert_eq!(
                state(&lrm, id).await,
                JobStatus::Known(JobState::Cancelled),
                "job {id}"
            );
        }
        assert!(lrm
            .submit(&job(dir.path(), "late", 1, "true"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn local_rendered_script_quotes_hostile_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(4, 2, 1)).unwrap();
        let (out, pwned) = (dir.path().join("out"), dir.path().join("pwned"));
        let hostile = format!(
            "$(touch {}); `touch {}` 'x\" \n",
            pwned.display(),
            pwned.display()
        );
        let spec = SlotJob {
            name: "wsp-hostile".into(),
            pilot_argv: vec![
                "sh".into(),
                "-c".into(),
                format!("printf '%s' \"$1\" > {}", q(&out)),
                "sh".into(),
                hostile.clone(),
            ],
            ..job(dir.path(), "x", 1, "")
        };
        let script = lrm.render_script(&spec);
        assert!(
            script.starts_with("#!/bin/sh\n# wsp pilot job \"wsp-hostile\""),
            "{script}"
        );
        assert!(!script.contains("set -e"), "{script}");
        assert!(
            script.contains(&format!("\n{}\n", shell_join(&spec.pilot_argv))),
            "{script}"
        );
        let id = lrm.submit(&spec).await.unwrap();
        assert_eq!(
            wait_state(&lrm, &id, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), hostile);
        assert!(!pwned.exists());
        // A job name is a file name: no path separators, no newlines.
        for name in ["../escape", "a\nb", ""] {
            let e = lrm
                .submit(&SlotJob {
                    name: name.into(),
                    ..spec.clone()
                })
                .await
                .unwrap_err();
            assert!(matches!(e, LrmError::Io { .. }), "{e}");
        }
    }

    fn durable(dir: &Path, nodes: u32, kill_grace_s: u64) -> LocalConfig {
        LocalConfig {
            nodes,
            cores_per_node: 1,
            kill_grace_s,
            state_file: Some(dir.join("lrm/local-lrm.json")),
            ..LocalConfig::default()
        }
    }

    #[tokio::test]
    async fn a_job_that_fails_while_no_coordinator_watches_is_not_reported_completed() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let lrm = LocalLrm::new(durable(dir.path(), 2, 1)).unwrap();
        // As a pilot that could not clean up exits (4), and one killed by a signal.
        let exits_4 = format!("{}; exit 4", wait_for_file(&p("stop-a")));
        let a = lrm
            .submit(&job(dir.path(), "a", 1, &exits_4))
            .await
            .unwrap();
        let killed = format!("{}; kill -USR1 $$", wait_for_file(&p("stop-b")));
        let b = lrm.submit(&job(dir.path(), "b", 1, &killed)).await.unwrap();
        for id in [&a, &b] {
            wait_state(&lrm, id, |s| *s == JobState::Running, LONG).await;
        }
        let pids_a = lrm.job_pids(&a);
        // The coordinator dies; job a ends while nobody watches.
        drop(lrm);
        touch(&p("stop-a"));
        let t = Instant::now();
        while pids_a.iter().any(|(_, pid)| is_alive(*pid)) {
            assert!(t.elapsed() < LONG, "job a did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lrm = LocalLrm::new(durable(dir.path(), 2, 1)).unwrap();
        assert_eq!(
            state(&lrm, &a).await,
            JobStatus::Known(JobState::Failed("node1: exit code 4".into()))
        );
        // Job b was adopted running, then dies by a signal.
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Running));
        touch(&p("stop-b"));
        let ended = wait_state(&lrm, &b, JobState::is_finished, LONG).await;
        assert_eq!(
            ended,
            JobState::Failed("node2: killed by signal SIGUSR1".into())
        );
    }

    #[tokio::test]
    async fn durable_local_lrm_adopts_running_jobs_after_a_crash_and_keeps_its_ids_and_allocation()
    {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let lrm = LocalLrm::new(durable(dir.path(), 2, 1)).unwrap();
        let a = lrm
            .submit(&job(dir.path(), "a", 1, &wait_for_file(&p("stop-a"))))
            .await
            .unwrap();
        let b = lrm
            .submit(&job(dir.path(), "b", 1, &wait_for_file(&p("stop-b"))))
            .await
            .unwrap();
        let c = lrm
            .submit(&job(dir.path(), "c", 1, &wait_for_file(&p("stop-c"))))
            .await
            .unwrap();
        for id in [&a, &b] {
            wait_state(&lrm, id, |s| *s == JobState::Running, LONG).await;
        }
        assert_eq!(state(&lrm, &c).await, JobStatus::Known(JobState::Queued));
        let (pids_a, pids_b) = (lrm.job_pids(&a), lrm.job_pids(&b));
        // The coordinator is SIGKILLed: no shutdown. Dropping a durable
        // adapter leaves its jobs running, as a crash does.
        drop(lrm);
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (_, pid) in pids_a.iter().chain(&pids_b) {
            assert!(is_alive(*pid), "pid {pid} was killed by the drop");
        }
        let lrm = LocalLrm::new(durable(dir.path(), 2, 1)).unwrap();
        assert_eq!(state(&lrm, &a).await, JobStatus::Known(JobState::Running));
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Running));
        assert_eq!(state(&lrm, &c).await, JobStatus::Known(JobState::Queued));
        assert_eq!(lrm.job_pids(&a), pids_a);
        // Numbering goes on where it stopped.
        let d = lrm
            .submit(&job(dir.path(), "d", 1, &wait_for_file(&p("stop-d"))))
            .await
            .unwrap();
        assert_eq!(d, JobId("4".into()));
        // Both nodes are still held by the adopted jobs: c and d wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(state(&lrm, &c).await, JobStatus::Known(JobState::Queued));
        // An adopted job that exits is seen (exit status unknowable: completed)
        // and its node goes to the next job in the queue.
        touch(&p("stop-a"));
        assert_eq!(
            wait_state(&lrm, &a, JobState::is_finished, LONG).await,
            JobState::Completed
        );
        wait_state(&lrm, &c, |s| *s == JobState::Running, LONG).await;
        assert_eq!(state(&lrm, &d).await, JobStatus::Known(JobState::Queued));
        // Cancel of an adopted job: SIGTERM to its process group.
        let t = Instant::now();
        lrm.cancel(&b).await.unwrap();
        assert_eq!(
            wait_state(&lrm, &b, JobState::is_finished, LONG).await,
            JobState::Cancelled
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        for (_, pid) in &pids_b {
            assert!(!is_alive(*pid));
        }
        wait_state(&lrm, &d, |s| *s == JobState::Running, LONG).await;
        touch(&p("stop-c"));
        touch(&p("stop-d"));
        for id in [&c, &d] {
            assert_eq!(
                wait_state(&lrm, id, JobState::is_finished, LONG).await,
                JobState::Completed
            );
        }
        lrm.shutdown().await;
    }

    #[tokio::test]
    async fn durable_local_lrm_finishes_jobs_whose_processes_died_while_it_was_down() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(durable(dir.path(), 2, 5)).unwrap();
        let forever = "while :; do sleep 0.05; done";
        let stubborn = "trap '' TERM; while :; do sleep 0.05; done";
        let a = lrm.submit(&job(dir.path(), "a", 1, forever)).await.unwrap();
        let b = lrm
            .submit(&job(dir.path(), "b", 1, stubborn))
            .await
            .unwrap();
        for id in [&a, &b] {
            wait_state(&lrm, id, |s| *s == JobState::Running, LONG).await;
        }
        // b is being cancelled (SIGTERM ignored, SIGKILL not yet due) at the crash.
        tokio::time::sleep(Duration::from_millis(200)).await;
        lrm.cancel(&b).await.unwrap();
        let pids: Vec<u32> = [&a, &b]
            .iter()
            .flat_map(|id| lrm.job_pids(id))
            .map(|(_, pid)| pid)
            .collect();
        drop(lrm);
        for &pid in &pids {
            killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        }
        let t = Instant::now();
        while pids.iter().any(|&pid| is_alive(pid)) {
            assert!(t.elapsed() < LONG);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lrm = LocalLrm::new(durable(dir.path(), 2, 5)).unwrap();
        assert_eq!(state(&lrm, &a).await, JobStatus::Known(JobState::Completed));
        assert_eq!(state(&lrm, &b).await, JobStatus::Known(JobState::Cancelled));
        // Their nodes are free again.
        let c = lrm.submit(&job(dir.path(), "c", 2, "true")).await.unwrap();
        assert_eq!(c, JobId("3".into()));
        assert_eq!(
            wait_state(&lrm, &c, JobState::is_finished, LONG).await,
            JobState::Completed
        );
    }

    #[tokio::test]
    async fn durable_local_lrm_ends_an_adopted_job_at_its_walltime_counted_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(durable(dir.path(), 1, 1)).unwrap();
        let walltime = Duration::from_millis(1500);
        let t = Instant::now();
        let a = lrm
            .submit(&SlotJob {
                walltime,
                ..job(dir.path(), "a", 1, "while :; do sleep 0.05; done")
            })
            .await
            .unwrap();
        wait_state(&lrm, &a, |s| *s == JobState::Running, LONG).await;
        let pid = lrm.job_pids(&a)[0].1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(lrm);
        let lrm = LocalLrm::new(durable(dir.path(), 1, 1)).unwrap();
        assert_eq!(
            wait_state(&lrm, &a, JobState::is_finished, LONG).await,
            JobState::Timeout
        );
        let took = t.elapsed();
        assert!(
            took >= walltime && took < walltime + Duration::from_millis(900),
            "{took:?}"
        );
        assert!(!is_alive(pid));
    }

    #[tokio::test]
    async fn durable_local_lrm_never_adopts_or_signals_a_reused_pid() {
        let dir = tempfile::tempdir().unwrap();
        let config = durable(dir.path(), 1, 1);
        // A process that is not the job's, holding the pid the table names.
        use std::os::unix::process::CommandExt;
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = stranger.id();
        let real = proc_stat(pid).unwrap().start_time;
        let saved = Saved {
            last_id: 7,
            queue: Vec::new(),
            jobs: vec![SavedJob {
                id: JobId("7".into()),
                name: "old".into(),
                nodes: 1,
                cores_per_node: 1,
                memory_mb_per_node: 100,
                walltime_ms: 60_000,
                pilot_argv: vec!["true".into()],
                workdir: dir.path().join("jobs"),
                script: dir.path().join("jobs/old.sh"),
                state: JobState::Running,
                ending: None,
                ending_ms: None,
                alloc: vec!["node1".into()],
                procs: vec![Proc {
                    node: "node1".into(),
                    pid,
                    start_time: Some(real + 1),
                }],
                started_ms: Some(protocol::now_ms()),
                run_walltime_ms: 60_000,
                start_error: None,
                reservation: None,
                size: None,
            }],
            last_resv: 0,
            reservations: Vec::new(),
        };
        write_atomically(config.state_file.as_deref().unwrap(), &saved).unwrap();
        let lrm = LocalLrm::new(config.clone()).unwrap();
        let old = JobId("7".into());
        assert_eq!(
            state(&lrm, &old).await,
            JobStatus::Known(JobState::Completed)
        );
        lrm.cancel(&old).await.unwrap();
        lrm.shutdown().await;
        assert!(is_alive(pid), "a stranger's process was signalled");
        // The node was not counted as held, and numbering continues.
        drop(lrm);
        let lrm = LocalLrm::new(config).unwrap();
        let id = lrm
            .submit(&job(dir.path(), "new", 1, "true"))
            .await
            .unwrap();
        assert_eq!(id, JobId("8".into()));
        stranger.kill().unwrap();
        stranger.wait().unwrap();
    }

    #[tokio::test]
    async fn durable_local_lrm_refuses_an_unreadable_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = durable(dir.path(), 1, 1);
        let path = config.state_file.clone().unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{ not json").unwrap();
        let e = LocalLrm::new(config).err().expect("refused");
        assert!(
            matches!(&e, LrmError::Config { message, .. } if message.contains("local-lrm.json")),
            "{e}"
        );
    }
}
