//! Parts 1 and 2: the published evaluation's breakdown, per cluster size.
//!
//! A real coordinator runs in this process (`coordinator::server::start`,
//! the same code as `workspace-coordinator serve`) with the `local` batch
//! system (or Slurm), and real `workspace-pilot` processes on simulated
//! nodes with zero simulated latency. A client leases N one-VM-per-node VMs,
//! waits until all run, destroys them and waits until every slot is given
//! back. The phases come from the workspace's timeline (pilot timestamps and
//! the coordinator's recording times) and from the batch system's own
//! moments (the local adapter's log, see `marks`, or Slurm's controller log).

use crate::marks::{self, What};
use crate::stats::Summary;
use anyhow::{anyhow, bail, Context, Result};
use coordinator::client::Client;
use coordinator::config::Config;
use protocol::view::{Phase, TimelineEntry, WorkspaceState, WorkspaceView};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token";

/// Which batch system runs the pilots.
#[derive(Clone, Debug)]
pub enum Lrm {
    Local,
    /// `SLURM_CONF` of the cluster scripts/slurm-up.sh started, and its log directory.
    Slurm {
        conf: String,
        log: PathBuf,
    },
}

/// Every phase of one lease, in milliseconds. `None` where it could not be measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases(pub BTreeMap<&'static str, f64>);

/// The rows of the breakdown, in order: (key, label, published figure for comparison).
pub const ROWS: &[(&str, &str, Option<&str>)] = &[
    (
        "slot.submit",
        "slot: request -> job queued (ours: store, key, script)",
        None,
    ),
    (
        "slot.lrm_start",
        "slot: batch system start (queued -> last job process up)",
        Some("~6000 ms (about half of 12 s)"),
    ),
    (
        "slot.pilot_reserve",
        "slot: pilot start -> memory reserved (last node)",
        None,
    ),
    (
        "slot.balloon",
        "  of which balloon (hypervisor, sim = 0)",
        Some("743.6 ms"),
    ),
    ("slot.notify", "slot: notification ping (worst node)", None),
    (
        "slot.total",
        "slot provisioning: request -> all reserved",
        None,
    ),
    ("vm.invoke", "vm: command delivery, invoke (worst VM)", None),
    ("vm.create", "vm: create (hypervisor, sim = 0)", None),
    ("vm.total", "vm provisioning: all reserved -> running", None),
    (
        "down.destroy",
        "destroy: request -> VMs destroyed (worst node)",
        None,
    ),
    (
        "down.restore",
        "destroy: restore memory (hypervisor, sim = 0)",
        Some("1317.2 ms"),
    ),
    (
        "down.lrm_end",
        "destroy: batch system ends the job (released -> job gone)",
        None,
    ),
    (
        "e2e.up",
        "client: request -> all VMs running",
        Some("N=16: 12 s, N=1: 8 s"),
    ),
    (
        "e2e.down",
        "client: destroy -> all memory restored",
        Some("kill-all 2336 ms"),
    ),
    (
        "e2e.settled",
        "client: destroy -> settled (every job gone)",
        None,
    ),
    (
        "overhead",
        "OURS end to end (up + down - batch system - hypervisor)",
        None,
    ),
    (
        "cpu.coordinator",
        "CPU time: coordinator + local batch system, per lease",
        None,
    ),
    (
        "cpu.lrm_start",
        "  of which the local batch system starting the processes",
        None,
    ),
    (
        "cpu.ours",
        "CPU time: ours (the above without the process starts), per lease",
        None,
    ),
    (
        "cpu.pilot",
        "CPU time: one pilot (and its job shell), per node",
        None,
    ),
    (
        "overhead.cluster",
        "OURS on N real nodes, estimate: OURS(1) + our CPU(N) - our CPU(1)",
        None,
    ),
];

/// Adds the `overhead.cluster` row to every size, when N = 1 was measured.
///
/// On this host N pilot processes share 2 cores, so per-node work that N
/// real nodes do in parallel is serialized and counted in "OURS". On N real
/// nodes each pilot has its node to itself, as at N = 1; what grows with N
/// is the coordinator's work. The estimate is OURS at N = 1 (median) plus
/// the coordinator's extra CPU time per lease at N (each sample) over N = 1
/// (`cpu.ours`: the process's CPU without the local batch system starting
/// the pilot processes, which a real batch system does on its own hosts),
/// as if all of it were on the critical path and none ran in parallel on
/// its cores: pessimistic about the coordinator, and assumes a pilot on its
/// own node behaves as at N = 1.
pub fn add_cluster_estimate(sizes: &mut [SizeResult]) {
    let Some(one) = sizes.iter().find(|s| s.nodes == 1) else {
        return;
    };
    let (Some(base), Some(cpu1)) = (one.phases.get("overhead"), one.phases.get("cpu.ours")) else {
        return;
    };
    let (base, cpu1) = (base.median, cpu1.median);
    for s in sizes.iter_mut() {
        let Some(cpu) = s.phases.get("cpu.ours") else {
            continue;
        };
        let est: Vec<f64> = cpu
            .samples
            .iter()
            .map(|c| base + (c - cpu1).max(0.0))
            .collect();
        if let Some(sum) = Summary::of(&est) {
            s.phases.insert("overhead.cluster".into(), sum);
        }
    }
}

/// CPU time (user + system) of this process and of its reaped children, ms.
fn cpu_ms() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let ms = |who| {
        getrusage(who)
            .map(|u| {
                let t = |tv: nix::sys::time::TimeVal| {
                    tv.tv_sec() as f64 * 1000.0 + tv.tv_usec() as f64 / 1000.0
                };
                t(u.user_time()) + t(u.system_time())
            })
            .unwrap_or(f64::NAN)
    };
    (ms(UsageWho::RUSAGE_SELF), ms(UsageWho::RUSAGE_CHILDREN))
}

/// One cluster size's results.
#[derive(Clone, Debug, Serialize)]
pub struct SizeResult {
    pub lrm: String,
    pub nodes: u32,
    pub repeats: usize,
    pub phases: BTreeMap<String, Summary>,
    /// How long starting the coordinator and preparing the simulated nodes took (not in the phases).
    pub setup_ms: f64,
}

fn config_text(root: &Path, node_root: &Path, nodes: u32, pilot: &Path, lrm: &Lrm) -> String {
    let lrm_part = match lrm {
        Lrm::Local => "lrm = \"local\"\n".to_string(),
        Lrm::Slurm { conf, .. } => format!(
            "lrm = \"slurm\"\n[cluster]\nnodes = 2\ncores_per_node = 2\nmemory_mb_per_node = 1024\n\
             [slurm]\nkill_wait_s = 5\nenv = {{ SLURM_CONF = \"{conf}\" }}\n"
        ),
    };
    // Top-level keys first, then sections.
    let (top, section) = match lrm_part.split_once('[') {
        Some((t, s)) => (t.to_string(), format!("[{s}")),
        None => (lrm_part, String::new()),
    };
    format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{root}/coordinator"
tick_ms = 50
lrm_poll_s = 0.2
{top}
{section}
[local]
nodes = {nodes}
cores_per_node = 2
memory_mb_per_node = 1024
kill_grace_s = 5

[pilot]
program = "{pilot}"
hypervisor = "sim"
state_dir = "{node_root}/%n/state"
sim_dir = "{node_root}/%n/sim"
poll_wait_ms = 20000
margin_s = 1

[[users]]
name = "bench"
token_sha256 = "{hash}"
"#,
        root = root.display(),
        node_root = node_root.display(),
        pilot = pilot.display(),
        hash = protocol::auth::token_hash(TOKEN),
    )
}

fn spec(nodes: u32) -> String {
    format!("name = \"bench\"\nduration = \"1h\"\n[[group]]\nname = \"vm\"\ncount = {nodes}\nmemory_mb = 256\ncpus = 1\nimage = \"bench.img\"\n")
}

/// Where the simulated nodes keep their state (`state_dir`, `sim_dir`): on
/// tmpfs, as `/run` (the pilot's default state directory) is on a Debian
/// node. Here `/` is ext4 without a journal, where creating the inode of
/// each atomic rewrite costs about 0.2 ms of CPU, and all N simulated nodes
/// would share one disk that N real nodes do not. Falls back to the system
/// temporary directory when `/dev/shm` is missing.
pub const NODE_STATE_TMPFS: &str = "/dev/shm";

fn node_state_dir() -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix("wsp-bench-nodes-");
    let dir = if Path::new(NODE_STATE_TMPFS).is_dir() {
        b.tempdir_in(NODE_STATE_TMPFS)
    } else {
        b.tempdir()
    };
    dir.context("temporary directory for the simulated nodes")
}

/// Runs `repeats` leases of `nodes` one-VM nodes on one coordinator.
pub async fn run_size(
    pilot: &Path,
    lrm: &Lrm,
    nodes: u32,
    repeats: usize,
    limit: Duration,
) -> Result<SizeResult> {
    let setup = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("wsp-bench-")
        .tempdir()
        .context("temporary directory")?;
    let root = dir.path();
    let node_dir = node_state_dir()?;
    let node_root = node_dir.path();
    if let Lrm::Slurm { .. } = lrm {
        for n in ["n1", "n2"] {
            let out = std::process::Command::new(pilot)
                .args(["sim", "init", "--dir"])
                .arg(node_root.join(n).join("sim"))
                .args(["--memory-mb", "1024", "--cpus", "2"])
                .output()
                .context("workspace-pilot sim init")?;
            if !out.status.success() {
                bail!("sim init {n}: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::fs::create_dir_all(node_root.join(n).join("state"))?;
        }
    }
    let cfg = Config::parse(&config_text(root, node_root, nodes, pilot, lrm))
        .map_err(|e| anyhow!("bench config: {e}"))?;
    let running = coordinator::server::start(cfg, None)
        .await
        .context("starting the coordinator")?;
    let setup_ms = setup.elapsed().as_secs_f64() * 1000.0;
    let client = Client::new(&running.url, TOKEN)?;
    let mut all: Vec<Phases> = Vec::new();
    let mut failure = None;
    for r in 0..repeats {
        match one_lease(&client, &running, lrm, nodes, limit).await {
            Ok(p) => all.push(p),
            Err(e) => {
                failure = Some(e.context(format!("N = {nodes}, repeat {}", r + 1)));
                break;
            }
        }
        marks::clear();
    }
    running.stop().await;
    drop(dir);
    drop(node_dir);
    if let Some(e) = failure {
        return Err(e);
    }
    let mut phases = BTreeMap::new();
    for (key, _, _) in ROWS {
        let v: Vec<f64> = all.iter().filter_map(|p| p.0.get(key).copied()).collect();
        if let Some(s) = Summary::of(&v) {
            phases.insert(key.to_string(), s);
        }
    }
    let lrm_name = match lrm {
        Lrm::Local => "local",
        Lrm::Slurm { .. } => "slurm",
    };
    Ok(SizeResult {
        lrm: lrm_name.into(),
        nodes,
        repeats: all.len(),
        phases,
        setup_ms,
    })
}

/// Follows the timeline (long-poll) until `done` holds for the entries so far.
async fn follow(
    client: &Client,
    id: &str,
    after: &mut u64,
    entries: &mut Vec<TimelineEntry>,
    deadline: Instant,
    what: &str,
    done: impl Fn(&[TimelineEntry], bool) -> bool,
) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "workspace {id} not {what} in time; last entries: {:?}",
                entries
                    .iter()
                    .rev()
                    .take(3)
                    .map(|e| e.phase.as_str())
                    .collect::<Vec<_>>()
            );
        }
        let page = client
            .events(id, *after, left.min(Duration::from_secs(5)))
            .await?;
        if let Some(last) = page.events.last() {
            *after = last.seq;
        }
        entries.extend(page.events);
        let bad = |p: Phase| {
            matches!(
                p,
                Phase::ReserveFailed | Phase::VmFailed | Phase::PilotLost | Phase::Preempting
            )
        };
        if page.state == WorkspaceState::Failed || entries.iter().any(|e| bad(e.phase)) {
            let e = entries.iter().find(|e| bad(e.phase));
            bail!(
                "workspace {id} failed while waiting for {what} (state {}): {e:?}",
                page.state
            );
        }
        if done(entries, page.settled) {
            return Ok(());
        }
    }
}

async fn one_lease(
    client: &Client,
    running: &coordinator::server::Running,
    lrm: &Lrm,
    nodes: u32,
    limit: Duration,
) -> Result<Phases> {
    let deadline = Instant::now() + limit;
    let cpu0 = cpu_ms();
    let t0 = Instant::now();
    let view: WorkspaceView = client.create(&spec(nodes)).await?;
    let id = view.id.to_string();
    let mut after = 0;
    let mut entries = Vec::new();
    follow(
        client,
        &id,
        &mut after,
        &mut entries,
        deadline,
        "running",
        |es, _| es.iter().any(|e| e.phase == Phase::Running),
    )
    .await?;
    let up = t0.elapsed().as_secs_f64() * 1000.0;
    let view = client.get(&id).await?;
    let job = view
        .slots
        .first()
        .and_then(|s| s.job_id.clone())
        .ok_or_else(|| anyhow!("workspace {id} has no batch job"))?;

    let t1 = Instant::now();
    client.destroy(&id).await?;
    let n = nodes as usize;
    follow(
        client,
        &id,
        &mut after,
        &mut entries,
        deadline,
        "restored",
        |es, _| {
            es.iter()
                .filter(|e| e.phase == Phase::MemoryRestored)
                .count()
                >= n
        },
    )
    .await?;
    let down = t1.elapsed().as_secs_f64() * 1000.0;
    follow(
        client,
        &id,
        &mut after,
        &mut entries,
        deadline,
        "settled",
        |_, settled| settled,
    )
    .await?;
    let settled = t1.elapsed().as_secs_f64() * 1000.0;

    // The batch job must be gone before the next lease, or it would queue behind it.
    let job_finished_ms = wait_job_gone(running, lrm, &job, deadline).await?;
    let cpu1 = cpu_ms();
    let mut p = phases(&entries, nodes)?;
    // This process is the coordinator (with the local batch system and the
    // bench's client, which only follows the timeline); the local batch
    // system reaps each pilot, so its CPU lands in RUSAGE_CHILDREN. Slurm's
    // pilots are not our children: no per-pilot figure there.
    if (cpu1.0 - cpu0.0).is_finite() {
        p.0.insert("cpu.coordinator", cpu1.0 - cpu0.0);
    }
    if let Lrm::Local = lrm {
        if (cpu1.1 - cpu0.1).is_finite() {
            p.0.insert("cpu.pilot", (cpu1.1 - cpu0.1) / f64::from(nodes.max(1)));
        }
    }
    p.0.insert("e2e.up", up);
    p.0.insert("e2e.down", down);
    p.0.insert("e2e.settled", settled);
    match lrm {
        Lrm::Local => local_lrm_phases(&mut p, &entries, &job, job_finished_ms),
        Lrm::Slurm { log, .. } => slurm_lrm_phases(&mut p, &entries, log, &job, job_finished_ms),
    }
    // Ours: the coordinator's process without the local batch system's
    // process starts (which a real batch system does elsewhere).
    if let Some(all) = p.0.get("cpu.coordinator").copied() {
        let lrm = p.0.get("cpu.lrm_start").copied().unwrap_or(0.0);
        p.0.insert("cpu.ours", (all - lrm).max(0.0));
    }
    let hv = p.0.get("slot.balloon").copied().unwrap_or(0.0)
        + p.0.get("vm.create").copied().unwrap_or(0.0);
    let lrm_start = p.0.get("slot.lrm_start").copied().unwrap_or(0.0);
    let restore = p.0.get("down.restore").copied().unwrap_or(0.0);
    p.0.insert(
        "overhead",
        (up - lrm_start - hv).max(0.0) + (down - restore).max(0.0),
    );
    Ok(p)
}

/// Waits (bounded) until the batch system no longer runs the job; returns when it was seen gone (epoch ms).
async fn wait_job_gone(
    running: &coordinator::server::Running,
    lrm: &Lrm,
    job: &str,
    deadline: Instant,
) -> Result<f64> {
    let id = lrm_adapters::JobId(job.to_string());
    loop {
        if let Lrm::Local = lrm {
            if let Some(m) = marks::of_job(job).iter().find(|m| m.what == What::Finished) {
                return Ok(m.at_ms);
            }
        }
        let st = running.engine.lrm().status(std::slice::from_ref(&id)).await;
        let gone = match st.ok().and_then(|m| m.get(&id).cloned()) {
            Some(lrm_adapters::JobStatus::Known(s)) => s.is_finished(),
            Some(lrm_adapters::JobStatus::NotFound) => true,
            None => false,
        };
        if gone {
            return Ok(marks::now_ms());
        }
        if Instant::now() >= deadline {
            bail!("batch job {job} still there at the deadline");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A number after `prefix` in a timeline detail ("created in 3 ms", "dom0 back to 1024 MB in 0 ms").
fn number_after(detail: &str, prefix: &str) -> Option<f64> {
    let rest = &detail[detail.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn ts(e: &TimelineEntry) -> f64 {
    e.ts_ms as f64
}

fn rec(e: &TimelineEntry) -> f64 {
    e.recorded_ms as f64
}

fn of(es: &[TimelineEntry], p: Phase) -> impl Iterator<Item = &TimelineEntry> {
    es.iter().filter(move |e| e.phase == p)
}

fn max(it: impl Iterator<Item = f64>) -> Option<f64> {
    it.fold(None, |m, v| Some(m.map_or(v, |m: f64| m.max(v))))
}

/// The phases the coordinator's timeline shows (batch system phases are added by the caller).
fn phases(es: &[TimelineEntry], nodes: u32) -> Result<Phases> {
    let mut p = Phases::default();
    let one = |ph: Phase| {
        of(es, ph)
            .next()
            .ok_or_else(|| anyhow!("timeline has no {} entry", ph.as_str()))
    };
    let requested = ts(one(Phase::Requested)?);
    let last_reserved =
        max(of(es, Phase::MemoryReserved).map(ts)).ok_or_else(|| anyhow!("no memory_reserved"))?;
    let last_reserved_rec = max(of(es, Phase::MemoryReserved).map(rec)).unwrap_or(last_reserved);
    if of(es, Phase::MemoryReserved).count() != nodes as usize {
        bail!(
            "{} of {nodes} nodes reserved",
            of(es, Phase::MemoryReserved).count()
        );
    }
    // Per node: started -> reserved.
    let balloon =
        max(of(es, Phase::MemoryReserved).filter_map(|e| number_after(&e.detail, ") in ")));
    p.0.insert("slot.balloon", balloon.unwrap_or(f64::NAN));
    p.0.insert(
        "slot.notify",
        max(of(es, Phase::MemoryReserved).map(|e| rec(e) - ts(e))).unwrap_or(f64::NAN),
    );
    p.0.insert("slot.total", last_reserved - requested);
    // VM provisioning.
    let sent: BTreeMap<String, f64> = of(es, Phase::VmStartSent)
        .filter_map(|e| e.vm_id.as_ref().map(|v| (v.to_string(), ts(e))))
        .collect();
    let mut invoke = Vec::new();
    let mut create = Vec::new();
    for e in of(es, Phase::VmStarted) {
        let c = number_after(&e.detail, "created in ").unwrap_or(0.0);
        create.push(c);
        if let Some(s) = e.vm_id.as_ref().and_then(|v| sent.get(&v.to_string())) {
            invoke.push(ts(e) - c - s);
        }
    }
    p.0.insert("vm.invoke", max(invoke.into_iter()).unwrap_or(f64::NAN));
    p.0.insert("vm.create", max(create.into_iter()).unwrap_or(f64::NAN));
    let running = ts(one(Phase::Running)?);
    p.0.insert("vm.total", running - last_reserved_rec);
    // Destruction: the pilot destroys its VMs, then restores memory, then says released.
    let destroy_req = ts(one(Phase::DestroyRequested)?);
    let restored: Vec<&TimelineEntry> = of(es, Phase::MemoryRestored).collect();
    let restore_ms = |e: &TimelineEntry| number_after(&e.detail, " MB in ").unwrap_or(0.0);
    p.0.insert(
        "down.destroy",
        max(restored.iter().map(|e| ts(e) - restore_ms(e) - destroy_req)).unwrap_or(f64::NAN),
    );
    p.0.insert(
        "down.restore",
        max(restored.iter().map(|e| restore_ms(e))).unwrap_or(f64::NAN),
    );
    Ok(p)
}

/// Local batch system: its own moments come from its log (see `marks`).
fn local_lrm_phases(p: &mut Phases, es: &[TimelineEntry], job: &str, finished_ms: f64) {
    let ms = marks::of_job(job);
    let queued = ms.iter().find(|m| m.what == What::Queued).map(|m| m.at_ms);
    let last_proc = max(ms
        .iter()
        .filter(|m| m.what == What::ProcessStarted)
        .map(|m| m.at_ms));
    let requested = of(es, Phase::Requested).next().map(ts);
    let last_reserved = max(of(es, Phase::MemoryReserved).map(ts));
    if let (Some(r), Some(q)) = (requested, queued) {
        p.0.insert("slot.submit", (q - r).max(0.0));
    }
    if let (Some(q), Some(l)) = (queued, last_proc) {
        p.0.insert("slot.lrm_start", l - q);
    }
    if let Some(cpu) = marks::start_cpu_ms(job) {
        p.0.insert("cpu.lrm_start", cpu);
    }
    if let (Some(l), Some(r)) = (last_proc, last_reserved) {
        p.0.insert("slot.pilot_reserve", (r - l).max(0.0));
    }
    if let Some(last_restored) = max(of(es, Phase::MemoryRestored).map(rec)) {
        p.0.insert("down.lrm_end", (finished_ms - last_restored).max(0.0));
    }
}

/// Slurm: "sched: Allocate JobId=<job>" in slurmctld's log is when Slurm placed the job.
fn slurm_lrm_phases(
    p: &mut Phases,
    es: &[TimelineEntry],
    log_dir: &Path,
    job: &str,
    finished_ms: f64,
) {
    let submitted = of(es, Phase::SlotSubmitted).next().map(ts);
    let requested = of(es, Phase::Requested).next().map(ts);
    let first_started = of(es, Phase::PilotStarted)
        .map(ts)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
    let last_reserved = max(of(es, Phase::MemoryReserved).map(ts));
    let alloc = slurm_allocate_ms(&log_dir.join("slurmctld.log"), job);
    if let (Some(r), Some(s)) = (requested, submitted) {
        p.0.insert("slot.submit", s - r);
    }
    // Slurm's share: submitted -> allocated (its scheduler cycle) and allocated -> first pilot up (srun launch).
    if let (Some(r), Some(a), Some(f)) = (requested, alloc, first_started) {
        p.0.insert("slot.lrm_start", (f - r).max(0.0));
        p.0.insert("slot.lrm_allocate", (a - r).max(0.0));
        p.0.insert("slot.allocate_to_pilot", (f - a).max(0.0));
    } else if let (Some(s), Some(f)) = (submitted, first_started) {
        p.0.insert("slot.lrm_start", (f - s).max(0.0));
    }
    if let (Some(f), Some(r)) = (first_started, last_reserved) {
        p.0.insert("slot.pilot_reserve", (r - f).max(0.0));
    }
    if let Some(last_restored) = max(of(es, Phase::MemoryRestored).map(rec)) {
        p.0.insert("down.lrm_end", (finished_ms - last_restored).max(0.0));
    }
}

/// Epoch ms of `[2026-11-21T19:42:55.743] sched: Allocate JobId=<job> ...` (local time, as slurmctld writes it).
fn slurm_allocate_ms(log: &Path, job: &str) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let needle = format!("Allocate JobId={job} ");
    let line = text.lines().rev().find(|l| l.contains(&needle))?;
    let stamp = line.strip_prefix('[')?.split(']').next()?;
    let out = std::process::Command::new("date")
        .args(["-d", &stamp.replace('T', " "), "+%s.%N"])
        .output()
        .ok()?;
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(secs * 1000.0)
}

/// Slurm's extra rows.
pub const SLURM_ROWS: &[(&str, &str)] = &[
    (
        "slot.lrm_allocate",
        "  slurm: request -> \"Allocate\" in slurmctld.log (scheduler)",
    ),
    (
        "slot.allocate_to_pilot",
        "  slurm: Allocate -> first pilot up (srun launch)",
    ),
];

/// Starts the 2-node Slurm through scripts/slurm-up.sh; returns its SLURM_CONF and log dir.
pub fn slurm_up(repo: &Path) -> Result<Lrm> {
    let script = repo.join("scripts/slurm-up.sh");
    let out = std::process::Command::new(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let conf = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .ok_or_else(|| anyhow!("slurm-up.sh printed no SLURM_CONF"))?
        .to_string();
    let dir = Path::new(&conf)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/tmp/wsp-slurm"));
    Ok(Lrm::Slurm {
        conf,
        log: dir.join("log"),
    })
}

/// Stops it again (scripts/slurm-down.sh).
pub fn slurm_down(repo: &Path) {
    let _ = std::process::Command::new(repo.join("scripts/slurm-down.sh")).output();
}
