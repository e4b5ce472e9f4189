//! The batch system, modelled in virtual time behind the same [`Lrm`] trait
//! the real adapters implement: a queue over N identical nodes, scheduled
//! first-come first-served or with EASY backfill, jobs killed at their
//! walltime, and the warning signal (walltime, cancel, preemption) followed
//! by SIGKILL after a grace period.
//!
//! The engine calls it as it calls Slurm; the simulator's loop drives what
//! a batch system does on its own (starting jobs, ending them) and takes
//! the [`Effect`]s of the engine's calls (a pass is due, a job must be
//! signalled). Times are the clock's milliseconds.

use crate::clock::{Clock, ManualClock};
use async_trait::async_trait;
use lrm_adapters::reserve::{Reservation, ReservationRequest, Reservations, ReserveError};
use lrm_adapters::{Capacity, JobId, JobState, JobStatus, Lrm, LrmError, SlotJob, Warning};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How queued jobs are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Strictly in order: the head of the queue waits for its nodes, and so
    /// does everything behind it (the embedded `local` batch system).
    Fifo,
    /// EASY backfill: the head gets a reservation at the earliest time its
    /// nodes free up (by the running jobs' estimates); a later job may start
    /// now if it ends by then, or uses only nodes the head will not need.
    Easy,
}

/// Why a job was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Walltime,
    Cancelled,
    Preempted,
}

impl Cause {
    fn end_state(self) -> JobState {
        match self {
            Cause::Walltime => JobState::Timeout,
            Cause::Cancelled => JobState::Cancelled,
            Cause::Preempted => JobState::Preempted,
        }
    }
}

/// Something the loop must do after an engine call reached the batch system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The queue changed: a scheduling pass is due now.
    Pass,
    /// Send this running job's processes the warning signal now.
    Signal(u64, Cause),
    /// A reservation was granted: a pass is due at its start and at its end.
    Reserved { begins_ms: u64, end_ms: u64 },
}

/// The free nodes at a moment, by why they are free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Idle {
    /// In a reservation that has begun, not running its jobs.
    pub reserved: u32,
    /// Outside begun reservations while a job outside reservations waits
    /// (it does not fit, or would run into a reservation).
    pub waiting: u32,
    /// Outside begun reservations with nothing waiting.
    pub nothing: u32,
}

/// One advance reservation: whole nodes in `[start_ms, end_ms)`.
#[derive(Clone, Debug)]
pub struct SimResv {
    pub id: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub nodes: Vec<u32>,
}

/// One job as the model holds it.
#[derive(Clone, Debug)]
pub struct Job {
    pub number: u64,
    pub name: String,
    pub nodes: u32,
    /// What the coordinator asked for: the job is killed past it.
    pub walltime_ms: u64,
    /// What the scheduler plans with (EASY's runtime estimate).
    pub estimate_ms: u64,
    pub submit_ms: u64,
    pub start_ms: Option<u64>,
    pub end_ms: Option<u64>,
    pub state: JobState,
    /// Nodes it holds while it runs (1-based node numbers).
    pub held: Vec<u32>,
    /// Set when the warning signal was sent.
    pub signalled: Option<Cause>,
    /// Its processes still running (one per node).
    pub alive: u32,
    /// What the simulator tagged it with when it was submitted (its request).
    pub tag: Option<usize>,
    /// A process died without being told to (node failure).
    pub crashed: bool,
    /// The reservation it was submitted into, if any.
    pub reservation: Option<String>,
    /// Its node-time, when the coordinator queued it by size.
    pub size: Option<u64>,
    /// A pool slot's job (`--pool` on the pilot's command line): the
    /// memory its pilot holds while idle, MB.
    pub pool_memory_mb: Option<u64>,
    /// The pilot's `--duration-s`, ms.
    pub duration_ms: Option<u64>,
}

#[derive(Default)]
struct State {
    next: u64,
    jobs: HashMap<u64, Job>,
    queue: VecDeque<u64>,
    running: Vec<u64>,
    free: BTreeSet<u32>,
    /// The estimate for the jobs submitted next (the trace's requested time).
    estimate_next: Option<u64>,
    /// The tag of the jobs submitted next.
    tag_next: Option<usize>,
    /// The jobs submitted next go to the head of the queue.
    first_next: bool,
    effects: Vec<Effect>,
    /// The earliest status change the coordinator has not asked about yet.
    unseen_change: Option<u64>,
    resvs: Vec<SimResv>,
    next_resv: u64,
    total: u32,
    /// Reservations granted so far (for the report).
    granted: u64,
}

/// The batch system model. See the module doc.
pub struct BatchModel {
    clock: Arc<ManualClock>,
    scheduler: Scheduler,
    capacity: Capacity,
    grace: Duration,
    st: Mutex<State>,
    preempt_for_reservations: bool,
}

impl BatchModel {
    /// Lets jobs outside reservations run on their nodes until a grace
    /// before they begin, preempted then ([`BatchModel::to_preempt`]).
    pub fn preempt_for_reservations(mut self, on: bool) -> Self {
        self.preempt_for_reservations = on;
        self
    }

    /// Running jobs outside reservations on the nodes of a reservation
    /// that begins within the grace: the batch system preempts them now.
    pub fn to_preempt(&self) -> Vec<u64> {
        if !self.preempt_for_reservations {
            return Vec::new();
        }
        let now = self.clock.now_ms();
        let grace = self.grace.as_millis() as u64;
        let st = self.st();
        st.running
            .iter()
            .copied()
            .filter(|n| {
                let j = &st.jobs[n];
                j.reservation.is_none()
                    && j.signalled.is_none()
                    && st.resvs.iter().any(|r| {
                        r.start_ms <= now + grace
                            && r.end_ms > now
                            && j.held.iter().any(|h| r.nodes.contains(h))
                    })
            })
            .collect()
    }

    pub fn new(
        clock: Arc<ManualClock>,
        scheduler: Scheduler,
        capacity: Capacity,
        grace: Duration,
    ) -> Self {
        let st = State {
            next: 1,
            next_resv: 1,
            total: capacity.nodes,
            free: (1..=capacity.nodes).collect(),
            ..State::default()
        };
        Self {
            clock,
            scheduler,
            capacity,
            grace,
            st: Mutex::new(st),
            preempt_for_reservations: false,
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The estimate for jobs submitted from now on (`None`: their
    /// walltime), and the tag they carry (the request they are for).
    pub fn expect(&self, estimate_ms: Option<u64>, tag: Option<usize>) {
        let mut st = self.st();
        st.estimate_next = estimate_ms;
        st.tag_next = tag;
        st.first_next = false;
    }

    /// The jobs submitted from now on (until the next `expect`) go to the
    /// head of the queue: a job priority the coordinator sets.
    pub fn expect_first(&self) {
        self.st().first_next = true;
    }

    /// True while a job that is not a pool slot's has not ended (a lease
    /// queued or running through the batch system).
    pub fn lease_jobs_live(&self) -> bool {
        self.st()
            .jobs
            .values()
            .any(|j| j.end_ms.is_none() && j.pool_memory_mb.is_none())
    }

    /// What the engine's calls asked for since the last look.
    pub fn take_effects(&self) -> Vec<Effect> {
        std::mem::take(&mut self.st().effects)
    }

    /// The earliest status change not yet asked about (a finished job), so
    /// the coordinator's status poll is due at its first tick after it.
    pub fn unseen_change(&self) -> Option<u64> {
        self.st().unseen_change
    }

    pub fn job(&self, number: u64) -> Option<Job> {
        self.st().jobs.get(&number).cloned()
    }

    /// Jobs queued now.
    pub fn queued(&self) -> usize {
        self.st().queue.len()
    }

    /// Starts what the scheduler allows now; returns the started jobs.
    pub fn pass(&self) -> Vec<Job> {
        let now = self.clock.now_ms();
        let grace = self.grace.as_millis() as u64;
        let mut st = self.st();
        st.resvs.retain(|r| r.end_ms > now);
        let mut started = Vec::new();
        // Jobs inside a reservation that has begun, on its nodes.
        let inside: Vec<u64> = st
            .queue
            .iter()
            .copied()
            .filter(|n| st.jobs[n].reservation.is_some())
            .collect();
        for n in inside {
            let Some(r) = st
                .resvs
                .iter()
                .find(|r| Some(&r.id) == st.jobs[&n].reservation.as_ref())
            else {
                continue;
            };
            if now < r.start_ms {
                continue;
            }
            let nodes: Vec<u32> = r
                .nodes
                .iter()
                .copied()
                .filter(|x| st.free.contains(x))
                .collect();
            let need = st.jobs[&n].nodes as usize;
            if nodes.len() >= need {
                st.queue.retain(|q| *q != n);
                started.push(start(&mut st, n, now, nodes[..need].to_vec()));
            }
        }
        let preempt = self.preempt_for_reservations.then_some(grace);
        // The others: the head, as long as it fits (both schedulers).
        while let Some(head) = st
            .queue
            .iter()
            .copied()
            .find(|n| st.jobs[n].reservation.is_none())
        {
            let need = st.jobs[&head].nodes as usize;
            let open = open_nodes(&st, st.jobs[&head].walltime_ms + grace, now, preempt);
            if need > open.len() {
                break;
            }
            st.queue.retain(|q| *q != head);
            started.push(start(&mut st, head, now, open[..need].to_vec()));
        }
        if self.scheduler == Scheduler::Easy && !st.queue.is_empty() {
            started.extend(backfill(&mut st, now, grace, preempt));
        }
        started
    }

    /// Where the free nodes are now (the experiment's loss accounting).
    pub fn idle(&self) -> Idle {
        let now = self.clock.now_ms();
        let st = self.st();
        let waiting = st.queue.iter().any(|n| st.jobs[n].reservation.is_none());
        let mut idle = Idle::default();
        for n in &st.free {
            let reserved = st
                .resvs
                .iter()
                .any(|r| r.start_ms <= now && r.end_ms > now && r.nodes.contains(n));
            if reserved {
                idle.reserved += 1;
            } else if waiting {
                idle.waiting += 1;
            } else {
                idle.nothing += 1;
            }
        }
        idle
    }

    /// Queues a job: by arrival, or by `size` (node-ms) when given.
    fn enqueue(&self, job: &SlotJob, size: Option<u64>) -> Result<JobId, LrmError> {
        if job.nodes > self.capacity.nodes {
            return Err(LrmError::DoesNotFit {
                lrm: "simulated",
                asked: format!("{} nodes", job.nodes),
                has: format!("{} nodes", self.capacity.nodes),
            });
        }
        let now = self.clock.now_ms();
        let mut st = self.st();
        let number = st.next;
        st.next += 1;
        let walltime_ms = job.walltime.as_millis() as u64;
        let estimate_ms = st.estimate_next.unwrap_or(walltime_ms);
        let tag = st.tag_next;
        let arg = |name: &str| {
            let at = job.pilot_argv.iter().position(|a| a == name)?;
            job.pilot_argv.get(at + 1)?.parse::<u64>().ok()
        };
        let pool = job.pilot_argv.iter().any(|a| a == "--pool");
        let pool_memory_mb = if pool { arg("--memory-mb") } else { None };
        let duration_ms = arg("--duration-s").map(|s| s * 1000);
        st.jobs.insert(
            number,
            Job {
                number,
                name: job.name.clone(),
                nodes: job.nodes,
                walltime_ms,
                estimate_ms,
                submit_ms: now,
                start_ms: None,
                end_ms: None,
                state: JobState::Queued,
                held: Vec::new(),
                signalled: None,
                alive: 0,
                crashed: false,
                tag,
                reservation: None,
                size,
                pool_memory_mb,
                duration_ms,
            },
        );
        if st.first_next {
            st.queue.push_front(number);
        } else if let Some(mine) = size {
            // Behind every job as large or larger, ahead of the rest
            // (as the local batch system queues by size).
            let at = st
                .queue
                .iter()
                .position(|q| st.jobs[q].size.is_none_or(|s| s < mine))
                .unwrap_or(st.queue.len());
            st.queue.insert(at, number);
        } else {
            st.queue.push_back(number);
        }
        st.effects.push(Effect::Pass);
        Ok(JobId(number.to_string()))
    }

    /// Reservations granted so far.
    pub fn reservations_granted(&self) -> u64 {
        self.st().granted
    }

    /// One process of the job ended (its pilot exited, or died). The last
    /// one ends the job; its nodes go back to the pool.
    pub fn process_ended(&self, number: u64, crashed: bool) {
        let now = self.clock.now_ms();
        let mut st = self.st();
        let Some(job) = st.jobs.get_mut(&number) else {
            return;
        };
        if job.end_ms.is_some() || job.alive == 0 {
            return;
        }
        job.alive -= 1;
        job.crashed |= crashed;
        if job.alive == 0 {
            let state = match (job.signalled, job.crashed) {
                (Some(c), _) => c.end_state(),
                (None, true) => JobState::NodeFail,
                (None, false) => JobState::Completed,
            };
            finish(&mut st, number, state, now);
        }
    }

    /// Marks the job signalled; `false` if it is not running or was already.
    pub fn signal(&self, number: u64, cause: Cause) -> bool {
        let mut st = self.st();
        match st.jobs.get_mut(&number) {
            Some(j) if j.state == JobState::Running && j.signalled.is_none() => {
                j.signalled = Some(cause);
                true
            }
            _ => false,
        }
    }

    /// The grace period is over: what still runs is killed and the job ends.
    pub fn kill(&self, number: u64) {
        let now = self.clock.now_ms();
        let mut st = self.st();
        let state = match st.jobs.get(&number) {
            Some(j) if j.end_ms.is_none() && j.state == JobState::Running => {
                j.signalled.unwrap_or(Cause::Walltime).end_state()
            }
            _ => return,
        };
        finish(&mut st, number, state, now);
    }
}

/// Free nodes a job outside every reservation may take now, for `hold_ms`:
/// those of no reservation that begins before it would end.
/// With `preempt`, a job may run on a reservation's nodes until a grace
/// before it begins (it is preempted then).
fn open_nodes(st: &State, hold_ms: u64, now: u64, preempt: Option<u64>) -> Vec<u32> {
    let end = match preempt {
        Some(grace) => now.saturating_add(grace),
        None => now.saturating_add(hold_ms),
    };
    st.free
        .iter()
        .copied()
        .filter(|n| {
            !st.resvs
                .iter()
                .any(|r| r.nodes.contains(n) && r.start_ms <= end && r.end_ms > now)
        })
        .collect()
}

/// Nodes free of reservations and of running jobs (but `preemptible`
/// ones) for all of `[start, end)`.
fn resv_free(st: &State, grace: u64, start: u64, end: u64, preemptible: &[u64]) -> Vec<u32> {
    let mut busy: BTreeSet<u32> = BTreeSet::new();
    for n in &st.running {
        let j = &st.jobs[n];
        let until = j.start_ms.unwrap_or(start) + j.walltime_ms + grace;
        if until > start && !preemptible.contains(n) {
            busy.extend(j.held.iter().copied());
        }
    }
    for r in &st.resvs {
        if r.start_ms < end && r.end_ms > start {
            busy.extend(r.nodes.iter().copied());
        }
    }
    (1..=st.total).filter(|n| !busy.contains(n)).collect()
}

fn start(st: &mut State, number: u64, now: u64, held: Vec<u32>) -> Job {
    for n in &held {
        st.free.remove(n);
    }
    st.running.push(number);
    let job = st.jobs.get_mut(&number).expect("a queued job is known");
    job.state = JobState::Running;
    job.start_ms = Some(now);
    job.alive = job.nodes;
    job.held = held;
    job.clone()
}

fn finish(st: &mut State, number: u64, state: JobState, now: u64) {
    let Some(job) = st.jobs.get_mut(&number) else {
        return;
    };
    job.state = state;
    job.end_ms = Some(now);
    job.alive = 0;
    let held = std::mem::take(&mut job.held);
    st.free.extend(held);
    st.running.retain(|n| *n != number);
    st.queue.retain(|n| *n != number);
    st.unseen_change = Some(st.unseen_change.map_or(now, |t| t.min(now)));
    st.effects.push(Effect::Pass);
}

/// EASY: the head waits for a reservation; later jobs start now when they
/// fit and do not delay it.
fn backfill(st: &mut State, now: u64, grace: u64, preempt: Option<u64>) -> Vec<Job> {
    let Some(head) = st
        .queue
        .iter()
        .copied()
        .find(|n| st.jobs[n].reservation.is_none())
    else {
        return Vec::new();
    };
    let need = st.jobs[&head].nodes as usize;
    // When the head can start, by the running jobs' estimates (a job past
    // its estimate is taken to end at once).
    let mut ends: Vec<(u64, usize)> = st
        .running
        .iter()
        .map(|n| {
            let j = &st.jobs[n];
            let end = (j.start_ms.unwrap_or(now) + j.estimate_ms).max(now);
            (end, j.held.len())
        })
        .collect();
    ends.sort_unstable();
    let mut free = st.free.len();
    let mut shadow = u64::MAX;
    let mut extra = 0usize;
    for (end, n) in ends {
        free += n;
        if free >= need {
            shadow = end;
            extra = free - need;
            break;
        }
    }
    let mut started = Vec::new();
    let mut i = 0;
    while i < st.queue.len() && !st.free.is_empty() {
        let n = st.queue[i];
        if n == head || st.jobs[&n].reservation.is_some() {
            i += 1;
            continue;
        }
        let (nodes, estimate) = (st.jobs[&n].nodes as usize, st.jobs[&n].estimate_ms);
        let open = open_nodes(st, st.jobs[&n].walltime_ms + grace, now, preempt);
        let fits = nodes <= open.len();
        let ends_in_time = now.saturating_add(estimate) <= shadow;
        if fits && (ends_in_time || nodes <= extra) {
            if !ends_in_time {
                extra -= nodes;
            }
            st.queue.remove(i);
            started.push(start(st, n, now, open[..nodes].to_vec()));
        } else {
            i += 1;
        }
    }
    started
}

#[async_trait]
impl Lrm for BatchModel {
    fn kind(&self) -> &'static str {
        "simulated"
    }
    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: self.grace,
        }
    }
    fn capacity(&self) -> Option<Capacity> {
        Some(self.capacity)
    }
    fn render_script(&self, _job: &SlotJob) -> String {
        String::new()
    }
    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.enqueue(job, None)
    }
    async fn submit_sized(&self, job: &SlotJob, size: u64) -> Result<JobId, LrmError> {
        self.enqueue(job, Some(size))
    }
    fn queues_by_size(&self) -> bool {
        true
    }
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        let mut st = self.st();
        st.unseen_change = None;
        Ok(ids
            .iter()
            .map(|id| {
                let job = id.0.parse::<u64>().ok().and_then(|n| st.jobs.get(&n));
                let status = job.map_or(JobStatus::NotFound, |j| JobStatus::Known(j.state.clone()));
                (id.clone(), status)
            })
            .collect())
    }
    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        let now = self.clock.now_ms();
        let mut st = self.st();
        let Some(number) = id.0.parse::<u64>().ok().filter(|n| st.jobs.contains_key(n)) else {
            return Err(LrmError::UnknownJob {
                lrm: "simulated",
                job: id.clone(),
            });
        };
        match st.jobs[&number].state {
            JobState::Queued => finish(&mut st, number, JobState::Cancelled, now),
            JobState::Running if st.jobs[&number].signalled.is_none() => {
                st.effects.push(Effect::Signal(number, Cause::Cancelled));
            }
            _ => {}
        }
        Ok(())
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        Some(self)
    }
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        let st = self.st();
        Ok(Some(
            st.jobs
                .values()
                .filter(|j| !j.state.is_finished())
                .map(|j| (JobId(j.number.to_string()), j.name.clone()))
                .collect(),
        ))
    }
}

fn view(r: &SimResv) -> Reservation {
    Reservation {
        id: r.id.clone(),
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        nodes: r.nodes.iter().map(|n| format!("node{n}")).collect(),
    }
}

#[async_trait]
impl Reservations for BatchModel {
    fn grants_over_preemptible(&self) -> bool {
        true
    }

    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        if req.nodes > self.capacity.nodes {
            return Err(LrmError::DoesNotFit {
                lrm: "simulated",
                asked: format!("{} nodes", req.nodes),
                has: format!("{} nodes", self.capacity.nodes),
            }
            .into());
        }
        let now = self.clock.now_ms();
        let grace = self.grace.as_millis() as u64;
        let mut st = self.st();
        st.resvs.retain(|r| r.end_ms > now);
        let start = req.start_ms.max(now);
        let len = req.duration.as_millis() as u64;
        let want = req.nodes as usize;
        let mut pre: Vec<u64> = req
            .preemptible
            .iter()
            .filter_map(|j| j.0.parse().ok())
            .collect();
        if self.preempt_for_reservations {
            // It preempts whatever runs outside reservations on its nodes.
            pre.extend(
                st.running
                    .iter()
                    .filter(|n| st.jobs[n].reservation.is_none())
                    .copied(),
            );
        }
        let free = resv_free(&st, grace, start, start + len, &pre);
        if free.len() < want {
            let mut candidates: Vec<u64> = st
                .running
                .iter()
                .map(|n| {
                    let j = &st.jobs[n];
                    j.start_ms.unwrap_or(now) + j.walltime_ms + grace
                })
                .chain(st.resvs.iter().map(|r| r.end_ms))
                .filter(|&t| t > start)
                .collect();
            candidates.sort_unstable();
            let earliest = candidates
                .into_iter()
                .find(|&t| resv_free(&st, grace, t, t + len, &pre).len() >= want);
            return Err(ReserveError::Unavailable {
                reason: format!(
                    "the simulated batch system has {} of the {want} node(s) free for the window",
                    free.len()
                ),
                earliest_ms: earliest,
            });
        }
        let r = SimResv {
            id: format!("R{}", st.next_resv),
            start_ms: start,
            end_ms: start + len,
            nodes: free[..want].to_vec(),
        };
        st.next_resv += 1;
        st.granted += 1;
        st.effects.push(Effect::Reserved {
            begins_ms: r.start_ms,
            end_ms: r.end_ms,
        });
        st.effects.push(Effect::Pass);
        st.resvs.push(r.clone());
        Ok(view(&r))
    }

    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError> {
        let now = self.clock.now_ms();
        let st = self.st();
        Ok(st
            .resvs
            .iter()
            .find(|r| r.id == id && r.end_ms > now)
            .map(view))
    }

    async fn delete(&self, id: &str) -> Result<(), LrmError> {
        let now = self.clock.now_ms();
        let mut st = self.st();
        if !st.resvs.iter().any(|r| r.id == id) {
            return Ok(());
        }
        st.resvs.retain(|r| r.id != id);
        let queued: Vec<u64> = st
            .queue
            .iter()
            .copied()
            .filter(|q| st.jobs[q].reservation.as_deref() == Some(id))
            .collect();
        for q in queued {
            finish(&mut st, q, JobState::Cancelled, now);
        }
        st.effects.push(Effect::Pass);
        Ok(())
    }

    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError> {
        let nodes = {
            let st = self.st();
            match st.resvs.iter().find(|r| r.id == id) {
                Some(r) => r.nodes.len(),
                None => {
                    return Err(LrmError::Config {
                        lrm: "simulated",
                        message: format!("reservation {id} does not exist"),
                    })
                }
            }
        };
        if job.nodes as usize > nodes {
            return Err(LrmError::DoesNotFit {
                lrm: "simulated",
                asked: format!("{} nodes", job.nodes),
                has: format!("{nodes} nodes in reservation {id}"),
            });
        }
        let number = self.submit(job).await?;
        let mut st = self.st();
        if let Some(j) = number
            .0
            .parse::<u64>()
            .ok()
            .and_then(|n| st.jobs.get_mut(&n))
        {
            j.reservation = Some(id.to_string());
        }
        Ok(number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn model(nodes: u32, s: Scheduler) -> (Arc<ManualClock>, BatchModel) {
        let clock = Arc::new(ManualClock::new(0));
        let cap = Capacity {
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 1024,
        };
        let m = BatchModel::new(clock.clone(), s, cap, Duration::from_secs(5));
        (clock, m)
    }

    fn job(nodes: u32, walltime_s: u64) -> SlotJob {
        SlotJob {
            name: format!("j{nodes}"),
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 512,
            walltime: Duration::from_secs(walltime_s),
            pilot_argv: Vec::new(),
            workdir: PathBuf::new(),
        }
    }

    async fn submit(m: &BatchModel, nodes: u32, estimate_s: u64) -> u64 {
        m.expect(Some(estimate_s * 1000), None);
        let id = m.submit(&job(nodes, estimate_s)).await.expect("submit");
        id.0.parse().expect("number")
    }

    fn started(m: &BatchModel) -> Vec<u64> {
        m.pass().into_iter().map(|j| j.number).collect()
    }

    #[tokio::test]
    async fn fifo_keeps_order_and_easy_backfills_what_does_not_delay_the_head() {
        for (s, want) in [(Scheduler::Fifo, vec![]), (Scheduler::Easy, vec![4])] {
            let (_clock, m) = model(4, s);
            let a = submit(&m, 3, 100).await; // runs until 100 s
            assert_eq!(started(&m), [a]);
            let _head = submit(&m, 4, 50).await; // waits for a: reserved at 100 s
            let _long = submit(&m, 1, 200).await; // would delay the head
            let short = submit(&m, 1, 90).await; // ends before 100 s: backfilled
            assert_eq!(short, 4);
            assert_eq!(started(&m), want, "{s:?}");
        }
    }

    #[tokio::test]
    async fn a_job_ends_with_its_last_process_and_frees_its_nodes() {
        let (clock, m) = model(2, Scheduler::Fifo);
        let a = submit(&m, 2, 100).await;
        let b = submit(&m, 1, 100).await;
        assert_eq!(started(&m), [a]);
        m.take_effects();
        clock.advance(10_000);
        m.process_ended(a, false);
        assert!(m.job(a).expect("a").end_ms.is_none(), "one process left");
        m.process_ended(a, false);
        let ja = m.job(a).expect("a");
        assert_eq!((ja.state, ja.end_ms), (JobState::Completed, Some(10_000)));
        assert_eq!(m.unseen_change(), Some(10_000));
        assert_eq!(m.take_effects(), [Effect::Pass]);
        assert_eq!(started(&m), [b]);
        let st = m.status(&[JobId(a.to_string())]).await.expect("status");
        assert_eq!(
            st[&JobId(a.to_string())],
            JobStatus::Known(JobState::Completed)
        );
        assert_eq!(m.unseen_change(), None, "asked about");
    }

    #[tokio::test]
    async fn cancel_ends_a_queued_job_and_signals_a_running_one() {
        let (_clock, m) = model(1, Scheduler::Fifo);
        let a = submit(&m, 1, 100).await;
        let b = submit(&m, 1, 100).await;
        started(&m);
        m.take_effects();
        m.cancel(&JobId(b.to_string())).await.expect("cancel");
        assert_eq!(m.job(b).expect("b").state, JobState::Cancelled);
        m.cancel(&JobId(a.to_string())).await.expect("cancel");
        assert_eq!(
            m.take_effects(),
            [Effect::Pass, Effect::Signal(a, Cause::Cancelled)]
        );
        assert!(m.signal(a, Cause::Cancelled));
        m.kill(a);
        assert_eq!(m.job(a).expect("a").state, JobState::Cancelled);
        assert!(m.cancel(&JobId("99".into())).await.is_err());
    }

    #[tokio::test]
    async fn a_reservation_fences_its_nodes_and_starts_its_jobs_at_its_start() {
        let (clock, m) = model(4, Scheduler::Easy);
        let running = submit(&m, 2, 1000).await; // holds 2 nodes until 1005 s
        assert_eq!(started(&m), [running]);
        let req = |start_s: u64, nodes: u32, pre: Vec<JobId>| ReservationRequest {
            name: "r".into(),
            start_ms: start_s * 1000,
            duration: Duration::from_secs(600),
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 512,
            preemptible: pre,
        };
        // 4 nodes at 500 s: the running job may still hold 2; the earliest is its end.
        match m.create(&req(500, 4, vec![])).await {
            Err(ReserveError::Unavailable { earliest_ms, .. }) => {
                assert_eq!(earliest_ms, Some(1_005_000))
            }
            other => panic!("{other:?}"),
        }
        // Over the running job, when the caller will suspend it.
        let pre = vec![JobId(running.to_string())];
        let r = m.create(&req(500, 4, pre)).await.expect("granted over it");
        assert_eq!(r.nodes.len(), 4);
        m.delete(&r.id).await.expect("delete");
        let r = m
            .create(&req(500, 2, vec![]))
            .await
            .expect("the 2 free nodes");
        m.take_effects();
        // A job outside it that would run into it waits; a short one backfills.
        let long = submit(&m, 1, 600).await;
        let short = submit(&m, 1, 100).await;
        assert_eq!(started(&m), [short], "{long} waits");
        // A job inside it waits for its start, then runs on its nodes.
        let inside = m.submit_into(&job(2, 300), &r.id).await.expect("into");
        let inside: u64 = inside.0.parse().expect("number");
        assert!(!started(&m).contains(&inside));
        clock.set(200_000);
        m.process_ended(short, false);
        assert!(!started(&m).contains(&inside), "not before its start");
        clock.set(500_000);
        let at_start = m.pass();
        let j = at_start
            .iter()
            .find(|j| j.number == inside)
            .expect("started at its start");
        let want: Vec<u32> = r.nodes.iter().map(|n| n[4..].parse().expect("n")).collect();
        assert_eq!(j.held, want);
        assert!(m.submit_into(&job(1, 10), "R99").await.is_err());
    }

    #[tokio::test]
    async fn preempting_for_reservations_backfills_their_nodes_until_a_grace_before() {
        let (clock, m) = model(2, Scheduler::Easy);
        let m = m.preempt_for_reservations(true);
        let req = ReservationRequest {
            name: "r".into(),
            start_ms: 600_000,
            duration: Duration::from_secs(600),
            nodes: 2,
            cores_per_node: 1,
            memory_mb_per_node: 512,
            preemptible: Vec::new(),
        };
        let r = m.create(&req).await.expect("granted");
        // A long job runs on its nodes now (fenced without the option).
        let long = submit(&m, 1, 3600).await;
        assert_eq!(started(&m), [long]);
        assert!(m.to_preempt().is_empty(), "not yet");
        // A reservation asked now is granted over it too.
        let mut later = req.clone();
        later.start_ms = 2_000_000;
        later.nodes = 1;
        assert!(m.create(&later).await.is_ok());
        // A grace (5 s) before the first begins: preempted; nothing new starts there.
        clock.set(595_000);
        assert_eq!(m.to_preempt(), [long]);
        let other = submit(&m, 1, 10).await;
        assert!(!started(&m).contains(&other));
        assert!(m.signal(long, Cause::Preempted));
        assert!(m.to_preempt().is_empty(), "signalled once");
        let _ = r;
    }

    #[tokio::test]
    async fn jobs_queued_by_size_go_largest_first_and_keep_arrival_among_equals() {
        for (sized, want) in [(false, [2, 3, 4, 5]), (true, [4, 2, 5, 3])] {
            let (clock, m) = model(4, Scheduler::Fifo);
            let a = submit(&m, 4, 100).await; // holds the cluster until 100 s
            assert_eq!(started(&m), [a]);
            for (nodes, s) in [(1, 300), (2, 50), (4, 100), (3, 100)] {
                m.expect(Some(s * 1000), None);
                let j = job(nodes, s);
                let size = u64::from(nodes) * s * 1000;
                if sized {
                    m.submit_sized(&j, size).await.expect("submit");
                } else {
                    m.submit(&j).await.expect("submit");
                }
            }
            // 2: 300 node-s, 3: 100, 4: 400, 5: 300 (after 2: the same size)
            assert_eq!(Vec::from(m.st().queue.clone()), want, "sized {sized}");
            // No node is free while the first job holds them all.
            assert_eq!(
                m.idle(),
                Idle {
                    reserved: 0,
                    waiting: 0,
                    nothing: 0
                }
            );
            clock.set(100_000);
            for _ in 0..4 {
                m.process_ended(a, false);
            }
            assert_eq!(started(&m)[0], want[0], "the head starts first");
        }
    }

    #[tokio::test]
    async fn idle_nodes_are_counted_by_why_they_are_free() {
        let (clock, m) = model(4, Scheduler::Fifo);
        assert_eq!(m.idle().nothing, 4);
        let a = submit(&m, 2, 100).await;
        let _big = submit(&m, 3, 100).await; // does not fit beside a
        assert_eq!(started(&m), [a]);
        assert_eq!(
            m.idle(),
            Idle {
                reserved: 0,
                waiting: 2,
                nothing: 0
            }
        );
        let req = ReservationRequest {
            name: "r".into(),
            start_ms: 50_000,
            duration: Duration::from_secs(600),
            nodes: 1,
            cores_per_node: 1,
            memory_mb_per_node: 512,
            preemptible: Vec::new(),
        };
        m.create(&req).await.expect("a free node");
        clock.set(50_000);
        assert_eq!(
            m.idle(),
            Idle {
                reserved: 1,
                waiting: 1,
                nothing: 0
            }
        );
    }

    #[tokio::test]
    async fn a_job_expected_first_goes_to_the_head_of_the_queue() {
        let (_clock, m) = model(1, Scheduler::Fifo);
        let a = submit(&m, 1, 100).await;
        let b = submit(&m, 1, 100).await;
        m.expect(None, None);
        m.expect_first();
        let resumed: u64 = m
            .submit(&job(1, 100))
            .await
            .expect("submit")
            .0
            .parse()
            .expect("n");
        assert_eq!(started(&m), [resumed], "ahead of {a} and {b}");
        let c = submit(&m, 1, 100).await;
        assert_eq!(m.st().queue.back(), Some(&c), "expect() resets it");
    }
}
