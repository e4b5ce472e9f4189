//! The simulation loop: one queue of timed events, the real engine on a
//! [`ManualClock`], the batch system model, and a model of each pilot
//! (`nodes`: what a pilot and its node do, and when).
//!
//! Each event moves the clock to its time and does what that moment does:
//! a request arrives (the engine's `create`, as the HTTP API calls it), the
//! batch system starts jobs, a pilot starts, reserves, boots a VM, cleans
//! up, is signalled or dies. What the engine decides in return (commands
//! for pilots, cancels for the batch system) is read back at once through
//! its typed entries. The engine's own timers run when they are due (the
//! next lease end, an owed cancel, the batch-system poll after a job ended,
//! a dead pilot's silence), never on a fixed cadence over a year of trace.

use super::batch::{BatchModel, Cause, Effect, Idle};

mod nodes;
use super::config::SimConfig;
use super::{Request, SimError};
use crate::clock::{Clock, ManualClock};
use crate::engine::{Caller, Engine, EngineError, Incoming};
use protocol::pilot::{EventKind, PilotEvent, ReleaseReason};
use protocol::spec::WorkspaceSpec;
use protocol::{PilotId, SlotId, VmId, WorkspaceId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Something that happens at a moment of virtual time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive(usize),
    Pass,
    PilotUp {
        job: u64,
        node: u32,
    },
    Reserved(usize),
    VmUp {
        pilot: usize,
        vm: usize,
    },
    /// A VM's save is complete (`commanded`: by `suspend_vm`, else on the warning).
    Saved {
        pilot: usize,
        vm: usize,
        commanded: bool,
    },
    Cleaned(usize),
    Deadline(usize),
    Walltime(u64),
    Preempt(u64),
    WaitOver(usize),
    Kill(u64),
    Die(usize),
    Timers,
    /// Best-effort leases a reservation takes the nodes of are due to be suspended.
    ResvStep,
    /// A pool slot's idle timeout may have passed: the pool's tick runs.
    PoolTick,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Reserving,
    Holding,
    Preempting,
    Cleaning,
    Gone,
}

struct VmModel {
    id: VmId,
    name: String,
    up_ms: Option<u64>,
    memory_mb: u64,
    /// Where its save goes on the batch system's warning (`on_preempt`).
    suspend_to: Option<protocol::pilot::CheckpointId>,
    /// The checkpoint it is restored from (a resume), if it is.
    restore: Option<protocol::pilot::CheckpointId>,
    /// Saved and gone from the node.
    saved: bool,
    /// Destroyed alone (`destroy_vm`: an urgent lease that ended) and gone.
    destroyed: bool,
}

struct PilotModel {
    slot: SlotId,
    node: String,
    job: u64,
    id: PilotId,
    seq: u64,
    cursor: u64,
    phase: Phase,
    started_ms: u64,
    vms: Vec<VmModel>,
    reason: ReleaseReason,
    /// Lease duration the pilot was given (for its own deadline).
    duration_ms: u64,
    /// A pool slot's pilot (`--pool`): what it holds and serves.
    pool: Option<PoolSlot>,
}

/// A pool slot's pilot, beyond any pilot's state.
struct PoolSlot {
    /// What it holds for VMs now, MB.
    reserved_mb: u64,
    /// The workspace it serves (`bind`), if any.
    bound_to: Option<WorkspaceId>,
    /// Since when it has held its node with no lease on it.
    idle_since: Option<u64>,
}

/// What the model saw of one lease's batch job.
#[derive(Clone, Debug, Default)]
pub struct JobRecord {
    pub request: Option<usize>,
    pub nodes: u32,
    pub start_ms: Option<u64>,
    pub end_ms: Option<u64>,
    /// VM-running node-milliseconds.
    pub vm_ms: u64,
}

/// What a run leaves for the report.
pub struct Outcome {
    pub engine: Arc<Engine>,
    /// Workspace of each request that was accepted (`None`: refused, with why).
    pub workspaces: Vec<Result<WorkspaceId, String>>,
    pub jobs: HashMap<u64, JobRecord>,
    /// (start, end) of every VM that ran, in virtual ms.
    pub vm_intervals: Vec<(u64, u64)>,
    /// (start, end, nodes) of every batch job that ran.
    pub job_intervals: Vec<(u64, u64, u32)>,
    pub events: u64,
    pub pilot_events: u64,
    /// VMs saved (suspended) and restored (resumed).
    pub saves: u64,
    pub restores: u64,
    pub wall: Duration,
    /// Why the run stopped before the end of the trace, if it did.
    pub cut_short: Option<String>,
    pub end_ms: u64,
    /// The free nodes by why they were free, from each moment it changed.
    pub idle: Vec<(u64, Idle)>,
    /// Node-ms pool slots held their nodes with no lease on them.
    pub pool_idle_ms: u64,
}

/// When to give up: a wall-clock budget, and a flag an interrupt sets.
pub struct Limits {
    pub max_wall: Option<Duration>,
    pub stop: Arc<AtomicBool>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    requests: &'a [Request],
    clock: Arc<ManualClock>,
    batch: Arc<BatchModel>,
    engine: Arc<Engine>,
    rt: tokio::runtime::Runtime,
    caller: Caller,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    pilots: Vec<PilotModel>,
    pilot_of: HashMap<(SlotId, String), usize>,
    job_pilots: HashMap<u64, Vec<usize>>,
    workspaces: Vec<Result<WorkspaceId, String>>,
    jobs: HashMap<u64, JobRecord>,
    commands_seen: i64,
    timer_at: Option<u64>,
    pass_at: Option<u64>,
    /// Pilots dead and not yet found out: (death ms, pilot).
    dead: VecDeque<(u64, usize)>,
    /// Per node, the images in its cache, oldest first.
    caches: HashMap<u32, VecDeque<String>>,
    rng: StdRng,
    t0: u64,
    vm_intervals: Vec<(u64, u64)>,
    job_intervals: Vec<(u64, u64, u32)>,
    events: u64,
    pilot_events: u64,
    saves: u64,
    restores: u64,
    /// Pilot events of the current instant, not yet applied.
    pending: Vec<Incoming>,
    /// The engine's job name prefix (`wsp-<id>-`), read once.
    job_prefix: String,
    /// `store::commands_pushed()` when commands were last looked for.
    commands_pushed: u64,
    /// The engine's version when its due times were last read, and those
    /// times (lease end, owed cancel): unchanged until it changes.
    due_version: Option<u64>,
    due: [Option<u64>; 3],
    idle: Vec<(u64, Idle)>,
    /// Requests that have arrived.
    arrived: usize,
    /// Node-ms pool slots held idle, until the pool closed.
    pool_idle_ms: u64,
    /// The trace is over and the pool is giving its slots back.
    pool_closed: bool,
}

fn secs(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

/// Runs the requests through the engine; `progress` is called now and then
/// with (virtual ms, requests arrived).
pub fn run(
    cfg: &SimConfig,
    requests: &[Request],
    engine: Arc<Engine>,
    batch: Arc<BatchModel>,
    clock: Arc<ManualClock>,
    limits: &Limits,
    mut progress: impl FnMut(u64, usize),
) -> Result<Outcome, SimError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SimError::Setup(format!("starting a runtime: {e}")))?;
    let t0 = clock.now_ms();
    let mut sim = Sim {
        cfg,
        requests,
        clock,
        batch,
        engine,
        rt,
        caller: Caller {
            user: "trace".into(),
            admin: true,
        },
        heap: BinaryHeap::new(),
        seq: 0,
        pilots: Vec::new(),
        pilot_of: HashMap::new(),
        job_pilots: HashMap::new(),
        workspaces: vec![Err("not reached".into()); requests.len()],
        jobs: HashMap::new(),
        commands_seen: 0,
        timer_at: None,
        pass_at: None,
        dead: VecDeque::new(),
        caches: HashMap::new(),
        rng: StdRng::seed_from_u64(cfg.failures.seed),
        t0,
        vm_intervals: Vec::new(),
        job_intervals: Vec::new(),
        events: 0,
        pilot_events: 0,
        saves: 0,
        restores: 0,
        pending: Vec::new(),
        job_prefix: String::new(),
        commands_pushed: 0,
        due_version: None,
        due: [None, None, None],
        idle: Vec::new(),
        arrived: 0,
        pool_idle_ms: 0,
        pool_closed: false,
    };
    sim.job_prefix = sim.engine.job_prefix();
    for (i, r) in requests.iter().enumerate() {
        sim.at(t0 + r.submit_ms, Ev::Arrive(i));
    }
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut cut_short = None;
    let mut next_check = 4096;
    while let Some(Reverse((t, _, _))) = sim.heap.peek().copied() {
        sim.clock.set(t);
        if let Err(e) = sim.instant(t) {
            cut_short = Some(format!("the engine failed: {e}"));
            break;
        }
        let idle = sim.batch.idle();
        if sim.idle.last().is_none_or(|(_, i)| *i != idle) {
            sim.idle.push((t, idle));
        }
        if sim.events >= next_check {
            next_check = sim.events + 4096;
            if limits.stop.load(Ordering::SeqCst) {
                cut_short = Some("interrupted".into());
                break;
            }
            if limits.max_wall.is_some_and(|m| started.elapsed() > m) {
                cut_short = Some(format!(
                    "the wall-clock limit of {} s was reached",
                    limits.max_wall.map_or(0, |m| m.as_secs())
                ));
                break;
            }
            if last_progress.elapsed() > Duration::from_secs(2) {
                last_progress = Instant::now();
                let arrived = sim.workspaces.iter().filter(|w| w.is_ok()).count();
                progress(t - sim.t0, arrived);
            }
        }
    }
    let end_ms = sim.clock.now_ms();
    Ok(Outcome {
        engine: sim.engine,
        workspaces: sim.workspaces,
        jobs: sim.jobs,
        vm_intervals: sim.vm_intervals,
        job_intervals: sim.job_intervals,
        events: sim.events,
        pilot_events: sim.pilot_events,
        saves: sim.saves,
        restores: sim.restores,
        wall: started.elapsed(),
        cut_short,
        end_ms,
        idle: sim.idle,
        pool_idle_ms: sim.pool_idle_ms,
    })
}

impl Sim<'_> {
    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    fn after(&mut self, ms: u64, ev: Ev) {
        let t = self.now() + ms;
        self.at(t, ev);
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen::<f64>() < p
    }

    /// Everything that happens at `t`: each event in turn, then the pilots'
    /// events of this instant in one group commit (as the writer thread
    /// commits what arrived together), then what the engine asked for.
    fn instant(&mut self, t: u64) -> Result<(), EngineError> {
        while let Some(Reverse((at, _, ev))) = self.heap.peek().copied() {
            if at != t {
                break;
            }
            self.heap.pop();
            self.events += 1;
            self.handle(ev)?;
        }
        self.flush()?;
        if self.cfg.pool.enabled() {
            self.pool_step()?;
        }
        if self.cfg.policy.suspend_resume {
            self.resume_suspended()?;
        }
        self.after_engine()?;
        // Answers the pilots gave at once (an urgent lease's `reserve` and
        // `set_cpu`, a checkpoint deleted) are applied in this instant
        // too, and what they lead to delivered: at most a few rounds.
        for _ in 0..8 {
            if self.pending.is_empty() {
                break;
            }
            self.flush()?;
            if self.requests.iter().any(|r| r.urgency >= 2) {
                self.rt.block_on(self.engine.urgent_fallbacks())?;
            }
            self.after_engine()?;
        }
        self.schedule_timers()
    }

    /// The pool's turn of the server's housekeeping tick (`[pool]` only),
    /// at each instant: pool jobs submitted, idle slots given back. Once
    /// every request has arrived and every lease is over, the pool closes
    /// (as at the coordinator's shutdown), so the run ends; its idle cost
    /// counts until then.
    fn pool_step(&mut self) -> Result<(), EngineError> {
        if !self.pool_closed
            && self.arrived == self.requests.len()
            && !self.batch.lease_jobs_live()
            && self.engine.pool_counts()?.bound == 0
        {
            self.pool_closed = true;
            self.engine.close_pool();
            for p in 0..self.pilots.len() {
                self.pool_idle_stop(p);
            }
        }
        // Pool jobs carry no request.
        self.batch.expect(None, None);
        self.rt.block_on(self.engine.pool_tick())
    }

    /// Suspended leases get new slots at once, as the server's housekeeping
    /// does; each job is tagged with its request, so its pilots know the lease.
    fn resume_suspended(&mut self) -> Result<(), EngineError> {
        let due = self.engine.resumable()?;
        for id in due {
            let tag = self
                .workspaces
                .iter()
                .position(|w| w.as_ref().is_ok_and(|w| *w == id));
            self.batch.expect(None, tag);
            if self.cfg.policy.resume_first {
                self.batch.expect_first();
            }
            if let Err(e) = self.rt.block_on(self.engine.resume_now(&id)) {
                if matches!(e, EngineError::Store(_) | EngineError::Writer(_)) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, ev: Ev) -> Result<(), EngineError> {
        match ev {
            Ev::Arrive(i) => self.arrive(i)?,
            Ev::Pass => self.pass(),
            Ev::PilotUp { job, node } => self.pilot_up(job, node)?,
            Ev::Reserved(p) => self.reserved(p)?,
            Ev::VmUp { pilot, vm } => self.vm_up(pilot, vm)?,
            Ev::Saved {
                pilot,
                vm,
                commanded,
            } => self.saved(pilot, vm, commanded)?,
            Ev::Cleaned(p) => self.cleaned(p)?,
            Ev::Deadline(p) => {
                if self.pilots[p].phase == Phase::Holding {
                    self.cleanup(p, ReleaseReason::Deadline);
                }
            }
            Ev::Walltime(job) => self.signal(job, Cause::Walltime)?,
            Ev::Preempt(job) => self.signal(job, Cause::Preempted)?,
            Ev::WaitOver(p) => {
                if self.pilots[p].phase == Phase::Preempting {
                    self.cleanup(p, ReleaseReason::Preempted);
                }
            }
            Ev::Kill(job) => self.kill(job),
            Ev::Die(p) => self.die(p)?,
            Ev::Timers => self.timers()?,
            // The tick itself runs at every instant (`pool_step`).
            Ev::PoolTick => {}
            Ev::ResvStep => {
                self.flush()?;
                self.engine.suspend_for_reservations()?;
                for job in self.batch.to_preempt() {
                    self.signal(job, Cause::Preempted)?;
                }
            }
        }
        Ok(())
    }

    /// A request arrives: the engine's `create`, as the client API calls it.
    fn arrive(&mut self, i: usize) -> Result<(), EngineError> {
        self.flush()?;
        self.arrived += 1;
        let r = &self.requests[i];
        let spec = WorkspaceSpec {
            name: format!("job-{}", r.id),
            duration: protocol::spec::LeaseDuration(Duration::from_millis(r.lease_ms)),
            groups: vec![protocol::spec::GroupSpec {
                name: "job".into(),
                count: r.nodes,
                memory_mb: r.memory_mb,
                cpus: 1,
                image: r.image.clone(),
                image_sha256: None,
                public_ip: false,
            }],
            ssh_key: None,
            kind: None,
            start: r.start_ms.map(|s| protocol::spec::Start::At(self.t0 + s)),
            on_preempt: None,
            max_duration: None,
            urgency: r.urgency,
        };
        self.batch.expect(Some(r.estimate_ms), Some(i));
        let created = self
            .rt
            .block_on(self.engine.create_workspace(&self.caller, spec));
        match created {
            Ok(id) => self.workspaces[i] = Ok(id),
            Err(e @ (EngineError::Store(_) | EngineError::Io { .. } | EngineError::Writer(_))) => {
                return Err(e)
            }
            Err(e) => self.workspaces[i] = Err(e.to_string()),
        }
        Ok(())
    }

    /// The batch system starts what it can; each started job's processes
    /// come up on its nodes after the start latency.
    fn pass(&mut self) {
        self.pass_at = None;
        for job in self.batch.pass() {
            let request = job.tag;
            self.jobs.insert(
                job.number,
                JobRecord {
                    request,
                    nodes: job.nodes,
                    start_ms: job.start_ms,
                    ..JobRecord::default()
                },
            );
            let latency = secs(self.cfg.batch.start_latency_s);
            for node in &job.held {
                self.after(
                    latency,
                    Ev::PilotUp {
                        job: job.number,
                        node: *node,
                    },
                );
            }
            self.after(job.walltime_ms, Ev::Walltime(job.number));
            if self.chance(self.cfg.failures.preempt) {
                let within = job.estimate_ms.min(job.walltime_ms).max(1);
                let at = self.rng.gen_range(0..within);
                self.after(at, Ev::Preempt(job.number));
            }
        }
    }

    fn slot_of(&self, job_name: &str) -> Option<SlotId> {
        job_name
            .strip_prefix(&self.job_prefix)
            .and_then(|s| SlotId::parse(s).ok())
    }

    /// One pilot event, stamped now, for the typed entry (applied with the
    /// others of this instant by [`Sim::flush`]).
    fn send(&mut self, p: usize, kind: EventKind) -> Result<(), EngineError> {
        let now = self.now();
        let pilot = &mut self.pilots[p];
        pilot.seq += 1;
        let event = PilotEvent {
            slot_id: pilot.slot.clone(),
            pilot_id: pilot.id.clone(),
            node: pilot.node.clone(),
            seq: pilot.seq,
            ts_ms: now,
            kind,
        };
        self.pilot_events += 1;
        self.pending.push(Incoming::new(event, now)?);
        Ok(())
    }

    /// The pilots' events so far, through the typed entry in one group commit.
    fn flush(&mut self) -> Result<(), EngineError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        for outcome in self.engine.apply_events(&batch) {
            // The engine refusing an event is a rule at work (a late event,
            // say), not a failure of the run; its own errors are.
            if let Err(e @ (EngineError::Store(_) | EngineError::Writer(_))) = outcome {
                return Err(e);
            }
        }
        Ok(())
    }

    /// What the engine's last calls asked of the batch system and the pilots.
    fn after_engine(&mut self) -> Result<(), EngineError> {
        for effect in self.batch.take_effects() {
            match effect {
                Effect::Pass => {
                    if self.pass_at != Some(self.now()) {
                        self.pass_at = Some(self.now());
                        self.after(0, Ev::Pass);
                    }
                }
                Effect::Signal(job, cause) => self.signal(job, cause)?,
                Effect::Reserved { begins_ms, end_ms } => {
                    // Its victims are suspended ahead of it (the server's
                    // housekeeping); its jobs start at its start; its nodes
                    // come back at its end.
                    let before = self.engine.config().reservations.suspend_before_s * 1000;
                    let now = self.now();
                    let grace = secs(self.cfg.batch.grace_s);
                    self.at(begins_ms.saturating_sub(before).max(now), Ev::ResvStep);
                    self.at(begins_ms.saturating_sub(grace).max(now), Ev::ResvStep);
                    self.at(begins_ms, Ev::ResvStep);
                    self.at(begins_ms, Ev::Pass);
                    self.at(end_ms, Ev::Pass);
                }
            }
        }
        let pushed = crate::store::commands_pushed();
        if pushed == self.commands_pushed {
            return Ok(());
        }
        self.commands_pushed = pushed;
        let (keys, last) = self.engine.commanded_since(self.commands_seen)?;
        self.commands_seen = last;
        let mut polled: Vec<usize> = keys
            .iter()
            .filter_map(|k| self.pilot_of.get(k).copied())
            .filter(|p| self.pilots[*p].phase != Phase::Gone)
            .collect();
        polled.sort_unstable();
        polled.dedup();
        self.deliver(&polled)
    }

    /// The engine's timers that are due now.
    fn timers(&mut self) -> Result<(), EngineError> {
        let now = self.now();
        if self.timer_at != Some(now) {
            return Ok(()); // superseded by an earlier one
        }
        self.flush()?;
        self.timer_at = None;
        // A refused cancel changes when the next is due, and no version.
        self.due_version = None;
        if self.engine.next_lease_end_ms()?.is_some_and(|t| t <= now) {
            self.engine.expire_leases()?;
        }
        if self.engine.next_cancel_ms()?.is_some_and(|t| t <= now) {
            self.rt.block_on(self.engine.retry_cancels());
        }
        if self
            .engine
            .next_report_deadline_ms()?
            .is_some_and(|t| t <= now)
        {
            self.engine.give_up_on_reports()?;
        }
        if self.lrm_poll_due().is_some_and(|t| t <= now) {
            self.rt.block_on(self.engine.poll_lrm())?;
            self.rt.block_on(self.engine.cancel_orphans())?;
            self.rt.block_on(self.engine.release_reservations())?;
        }
        if self.silence_due().is_some_and(|t| t <= now) {
            // Live pilots poll every few seconds: they are heard from.
            let live: Vec<usize> = (0..self.pilots.len())
                .filter(|p| self.pilots[*p].phase != Phase::Gone)
                .collect();
            self.deliver(&live)?;
            self.engine.find_lost_pilots()?;
            let silence = self.cfg.coordinator.pilot_silence_s * 1000;
            while self.dead.front().is_some_and(|(t, _)| t + silence <= now) {
                self.dead.pop_front();
            }
        }
        Ok(())
    }

    /// The first tick of the batch-system poll after a status changed.
    fn lrm_poll_due(&self) -> Option<u64> {
        let period = secs(self.cfg.coordinator.lrm_poll_s).max(1);
        self.batch.unseen_change().map(|t| {
            let since = t.saturating_sub(self.t0);
            self.t0 + since.div_ceil(period) * period
        })
    }

    fn silence_due(&self) -> Option<u64> {
        let silence = self.cfg.coordinator.pilot_silence_s * 1000;
        // Just past the limit, as a tick after it would find it.
        self.dead.front().map(|(t, _)| t + silence + 1)
    }

    /// Makes sure a `Timers` event waits for the earliest due timer.
    fn schedule_timers(&mut self) -> Result<(), EngineError> {
        let now = self.now();
        let version = self.engine.version();
        if self.due_version != Some(version) {
            self.due = [
                self.engine.next_lease_end_ms()?,
                self.engine.next_cancel_ms()?,
                self.engine.next_report_deadline_ms()?,
            ];
            self.due_version = Some(version);
        }
        let due = [
            self.due[0],
            self.due[1],
            self.due[2],
            self.lrm_poll_due(),
            self.silence_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(due) = due.map(|d| d.max(now)) else {
            return Ok(());
        };
        if self.timer_at.is_none_or(|t| due < t || t < now) {
            self.timer_at = Some(due);
            self.at(due, Ev::Timers);
        }
        Ok(())
    }
}
