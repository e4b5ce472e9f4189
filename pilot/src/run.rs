//! The pilot's life on its node: start, reserve, follow commands, clean up, exit.
//!
//! Side effects (balloon, VMs, notifications, state file) happen here around
//! [`crate::state::transition`]. Every exit path goes through [`Pilot::cleanup`]
//! once memory may have been taken, and every wait is bounded. Suspend and
//! resume live in `run/suspend.rs`; pool slots (bind, unbind, reserve) in
//! `run/pool.rs`; warm snapshots and CPU shares in `run/warm.rs` and
//! `run/cpu.rs`. Not for parsing the command line (main.rs) nor for talking
//! HTTP (notify.rs).

mod cpu;
mod pool;
mod suspend;
mod warm;

use crate::exit;
use crate::grace::{self, EXIT_SHARE_OF_GRACE};
use crate::hypervisor::{set_dom0_target_and_wait, HvError, Hypervisor};
use crate::notify::{Notifier, NotifyError};
use crate::outbox::{self, Outbox};
use crate::state::{
    remove_state_file, state_file_path, transition, Input, NodeLock, NodeStateFile, PilotState,
    StateError, VmRecord, VmRecordState,
};
use protocol::auth::SlotKey;
use protocol::pilot::{
    CommandKind, EventKind, PollResponse, ReleaseReason, SuspendTrigger, VmLaunch, WarmOutcome,
};
use protocol::{PilotId, SlotId, VmId, VmName};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

/// Consecutive refused polls (4xx) after which the pilot gives up.
const MAX_POLL_REFUSALS: u32 = 3;

/// Everything `workspace-pilot run` was told.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub slot: SlotId,
    pub coordinator: String,
    pub key: SlotKey,
    /// Memory to reserve at start (a pool slot's idle reservation, possibly 0).
    pub memory_mb: u64,
    /// A pool slot: starts idle and waits for `bind` (docs/POOL.md).
    pub pool: bool,
    pub duration: Duration,
    pub grace: Duration,
    pub state_dir: PathBuf,
    pub node: String,
    pub job_id: Option<String>,
    pub coordinator_wait_fraction: f64,
    pub min_dom0_mb: u64,
    pub margin: Duration,
    pub notify_timeout: Duration,
    pub balloon_timeout: Duration,
    pub poll_wait: Duration,
    pub startup_budget: Duration,
    /// PEM of the CA that signed an https coordinator's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// The node's image cache (opened on the first VM with an image source).
    pub images: crate::images::ImagesConfig,
    /// After the slot is given back, how long to keep trying to report it
    /// (never past the job's end); what is left stays in the outbox.
    pub report_linger: Duration,
    /// The checkpoint store, for suspend and resume (`[checkpoints]`).
    pub checkpoints: crate::checkpoint::CheckpointsConfig,
}

/// Failure of one bounded hypervisor call.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Hv(#[from] HvError),
    #[error("{what} did not finish within {after_ms} ms")]
    Timeout { what: String, after_ms: u64 },
    #[error("{what} crashed: {message}")]
    Crashed { what: String, message: String },
}

/// Runs a blocking hypervisor call on a blocking thread, bounded by `deadline`.
async fn hv_call<T: Send + 'static>(
    hv: &Arc<dyn Hypervisor>,
    deadline: Instant,
    what: &str,
    f: impl FnOnce(&dyn Hypervisor) -> Result<T, HvError> + Send + 'static,
) -> Result<T, CallError> {
    let hv = Arc::clone(hv);
    let start = Instant::now();
    match tokio::time::timeout_at(
        deadline,
        tokio::task::spawn_blocking(move || f(hv.as_ref())),
    )
    .await
    {
        Ok(Ok(r)) => r.map_err(CallError::Hv),
        Ok(Err(e)) => Err(CallError::Crashed {
            what: what.to_string(),
            message: e.to_string(),
        }),
        Err(_) => Err(CallError::Timeout {
            what: what.to_string(),
            after_ms: start.elapsed().as_millis() as u64,
        }),
    }
}

/// Destroys the guest `name` within `deadline`; a guest already gone counts
/// as destroyed.
async fn destroy_guest(
    hv: &Arc<dyn Hypervisor>,
    deadline: Instant,
    what: &str,
    name: &str,
) -> Result<(), CallError> {
    let n = name.to_string();
    match hv_call(hv, deadline, what, move |hv| hv.destroy(&n)).await {
        Err(CallError::Hv(HvError::NoSuchDomain { .. })) => Ok(()),
        r => r,
    }
}

/// Why the command loop ended.
enum End {
    Release(ReleaseReason),
    Preempt(&'static str),
    Fatal(String),
}

struct Reservation {
    before_mb: u64,
    after_mb: u64,
    balloon_ms: u64,
}

enum ReserveError {
    /// Nothing was changed.
    Refused(String),
    /// The balloon was moved and did not get there; `restored` tells whether
    /// memory is back.
    Balloon { reason: String, restored: bool },
}

struct Pilot {
    cfg: RunConfig,
    hv: Arc<dyn Hypervisor>,
    notifier: Notifier,
    record: NodeStateFile,
    signals: mpsc::UnboundedReceiver<&'static str>,
    cleaning: Arc<AtomicBool>,
    started: Instant,
    /// Id of the last command executed.
    after: u64,
    /// The node's image cache, once a VM needed it.
    image_cache: Option<Arc<crate::images::ImageCache>>,
    /// Reserve and VM start times, to plan a cleanup.
    measured: grace::Measured,
    /// The launch of each VM on the node (its preemption choice, its image).
    launches: HashMap<VmId, VmLaunch>,
    /// Set on preemption: when saves must be done to leave time for
    /// cleanup, and when the pilot stops waiting for a save at the latest.
    save_deadline: Option<(Instant, Instant)>,
    /// When the pilot gives the slot back on its own (epoch ms).
    deadline_ms: u64,
}

/// Runs one pilot to its end and returns the process exit code.
pub async fn run(cfg: RunConfig, hv: Arc<dyn Hypervisor>) -> i32 {
    let span = tracing::info_span!("pilot", slot_id = %cfg.slot, node = %cfg.node);
    run_in_span(cfg, hv).instrument(span).await
}

async fn run_in_span(cfg: RunConfig, hv: Arc<dyn Hypervisor>) -> i32 {
    let started = Instant::now();
    let cleaning = Arc::new(AtomicBool::new(false));
    let signals = match install_signal_handlers(Arc::clone(&cleaning)) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return exit::INTERNAL;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&cfg.state_dir) {
        tracing::error!(error = %e, dir = %cfg.state_dir.display(), "cannot create the state directory");
        return exit::USAGE;
    }
    let path = state_file_path(&cfg.state_dir, &cfg.slot);
    if path.exists() {
        tracing::error!(
            path = %path.display(),
            "a state file for this slot already exists on this node; run workspace-kill-all --slot {} first",
            cfg.slot
        );
        return exit::USAGE;
    }
    let pilot_id = PilotId::generate();
    let notifier = match Notifier::new(
        &cfg.coordinator,
        cfg.key.clone(),
        cfg.slot.clone(),
        pilot_id.clone(),
        cfg.node.clone(),
        cfg.notify_timeout,
        cfg.ca_pem.as_deref(),
    ) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up notifications");
            return exit::USAGE;
        }
    };
    let outbox_dir = outbox::outbox_dir(&cfg.state_dir);
    let notifier = match Outbox::open(&outbox_dir, &pilot_id) {
        Ok(o) => notifier.with_outbox(o),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the outbox");
            return exit::USAGE;
        }
    };
    // What pilots before us left undelivered on this node goes out beside our work.
    tokio::spawn(
        outbox::keep_delivering(
            outbox_dir,
            outbox::DeliverOptions {
                slot: None,
                skip: Some(pilot_id.clone()),
                request_timeout: cfg.notify_timeout,
                dry_run: false,
            },
        )
        .in_current_span(),
    );
    let record = NodeStateFile {
        slot_id: cfg.slot.clone(),
        pilot_id,
        pid: std::process::id(),
        node: cfg.node.clone(),
        hypervisor: hv.name().to_string(),
        state: PilotState::Starting,
        original_dom0_mb: 0,
        taken_mb: 0,
        target_dom0_mb: 0,
        reserved_mb: 0,
        workspace_id: None,
        vms: Vec::new(),
        updated_ms: 0,
    };
    let deadline_ms = protocol::now_ms()
        + cfg
            .duration
            .saturating_sub(cfg.margin)
            .saturating_sub(started.elapsed())
            .as_millis() as u64;
    let mut pilot = Pilot {
        cfg,
        hv,
        notifier,
        record,
        signals,
        cleaning,
        started,
        after: 0,
        image_cache: None,
        measured: grace::Measured::default(),
        launches: HashMap::new(),
        save_deadline: None,
        deadline_ms,
    };
    pilot.live().await
}

/// SIGTERM, SIGINT and SIGUSR2 all mean "preempted". The handlers stay
/// installed for the life of the process, so a later signal never kills it.
fn install_signal_handlers(
    cleaning: Arc<AtomicBool>,
) -> std::io::Result<mpsc::UnboundedReceiver<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, name) in [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::user_defined2(), "SIGUSR2"),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        let cleaning = Arc::clone(&cleaning);
        tokio::spawn(
            async move {
                while stream.recv().await.is_some() {
                    if cleaning.load(Ordering::SeqCst) {
                        tracing::warn!(
                            signal = name,
                            "signal during cleanup: ignored, cleanup continues"
                        );
                    } else {
                        tracing::warn!(signal = name, "signal received");
                    }
                    let _ = tx.send(name);
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
    Ok(rx)
}

/// Sends pending events, then long-polls once (after an optional pause).
async fn exchange(
    notifier: &mut Notifier,
    after: u64,
    wait: Duration,
    pause: Duration,
    flush_budget: Duration,
) -> Result<PollResponse, NotifyError> {
    // A zero sleep is not free: tokio's timer rounds it up to its next 1 ms
    // tick, and this runs between every command and the next poll.
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    if notifier.pending() > 0 {
        notifier
            .flush_unless_down(Instant::now() + flush_budget)
            .await?;
    }
    notifier.poll(after, wait).await
}

fn exit_code(reason: ReleaseReason, clean: bool) -> i32 {
    match (clean, reason) {
        (false, _) => exit::CLEANUP_INCOMPLETE,
        (true, ReleaseReason::Failed) => exit::INTERNAL,
        (true, _) => exit::RELEASED,
    }
}

impl Pilot {
    fn state_path(&self) -> PathBuf {
        state_file_path(&self.cfg.state_dir, &self.cfg.slot)
    }

    fn persist(&mut self) -> Result<(), StateError> {
        self.record.write(&self.cfg.state_dir).map(|_| ())
    }

    /// Applies a transition and records it before anything acts on it.
    fn advance(&mut self, input: Input) -> Result<(), String> {
        let next = transition(self.record.state, input).map_err(|e| e.to_string())?;
        tracing::info!(from = ?self.record.state, to = ?next, "state");
        self.record.state = next;
        self.persist().map_err(|e| e.to_string())
    }

    fn push(&mut self, kind: EventKind) {
        if let Err(e) = self.notifier.push(kind) {
            tracing::error!(error = %e, "event dropped");
        }
    }

    /// Latest moment the slot may still be in use: walltime plus the part of
    /// the grace period the pilot allows itself.
    fn hard_end(&self) -> Instant {
        self.started + self.cfg.duration + self.cfg.grace.mul_f64(EXIT_SHARE_OF_GRACE)
    }

    async fn live(&mut self) -> i32 {
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "cannot write the state file");
            return exit::USAGE;
        }
        self.push(EventKind::Started {
            pid: std::process::id(),
            hypervisor: self.hv.name().to_string(),
            job_id: self.cfg.job_id.clone(),
        });
        let startup_end = self.started + self.cfg.startup_budget;
        tokio::select! {
            biased;
            sig = self.signals.recv() => return self.preempt(sig.unwrap_or("SIGTERM")).await,
            r = self.notifier.flush(startup_end) => if let Err(e) = r {
                tracing::error!(error = %e, "coordinator unreachable at start; nothing was reserved");
                let _ = remove_state_file(&self.state_path());
                // Kept in the outbox with `started`: whoever delivers them
                // later tells the coordinator this node was left untouched.
                self.push(EventKind::ReserveFailed {
                    reason: format!(
                        "the pilot could not reach the coordinator within {} s of starting; nothing was reserved",
                        self.cfg.startup_budget.as_secs()
                    ),
                });
                return exit::COORDINATOR_UNREACHABLE;
            },
        }
        if let Ok(sig) = self.signals.try_recv() {
            return self.preempt(sig).await;
        }
        if let Err(e) = self.advance(Input::Reserve) {
            return self.fail(e).await;
        }
        match self.resize(self.cfg.memory_mb).await {
            Ok(r) => {
                let done = if self.cfg.pool {
                    Input::ReservedIdle
                } else {
                    Input::ReserveSucceeded
                };
                if let Err(e) = self.advance(done) {
                    return self.fail(e).await;
                }
                tracing::info!(
                    dom0_before_mb = r.before_mb,
                    dom0_after_mb = r.after_mb,
                    balloon_ms = r.balloon_ms,
                    idle = self.cfg.pool,
                    "memory reserved"
                );
                self.measured.reserve = Duration::from_millis(r.balloon_ms);
                let cached_images = self.cached_images();
                let checkpoints = self.checkpoint_capability();
                self.remove_abandoned_checkpoints();
                let cpu_control = Some(self.hv.cpu_control());
                self.push(EventKind::Reserved {
                    dom0_before_mb: r.before_mb,
                    dom0_after_mb: r.after_mb,
                    reserved_mb: self.record.reserved_mb,
                    balloon_ms: r.balloon_ms,
                    cached_images,
                    checkpoints,
                    deadline_ms: Some(self.deadline_ms),
                    idle: self.cfg.pool,
                    cpu_control,
                });
            }
            Err(e) => return self.reserve_failed(e).await,
        }
        let startup_end = startup_end.max(Instant::now() + self.cfg.notify_timeout);
        tokio::select! {
            biased;
            sig = self.signals.recv() => return self.preempt(sig.unwrap_or("SIGTERM")).await,
            r = self.notifier.flush(startup_end) => if let Err(e) = r {
                tracing::error!(error = %e, "coordinator unreachable after reserving; giving memory back");
                let end = Instant::now() + self.cfg.balloon_timeout + self.cfg.notify_timeout;
                let (clean, _) = self.cleanup(ReleaseReason::Failed, end, end).await;
                return if clean { exit::COORDINATOR_UNREACHABLE } else { exit::CLEANUP_INCOMPLETE };
            },
        }
        match self.follow().await {
            End::Preempt(sig) => self.preempt(sig).await,
            End::Release(reason) => {
                let end = match reason {
                    ReleaseReason::Deadline => self.hard_end(),
                    _ => {
                        (Instant::now() + self.cfg.grace.max(self.cfg.margin)).min(self.hard_end())
                    }
                };
                self.release(reason, end).await
            }
            End::Fatal(e) => self.fail(e).await,
        }
    }

    async fn fail(&mut self, error: String) -> i32 {
        tracing::error!(error = %error, "pilot failed; cleaning up");
        let end = (Instant::now() + self.cfg.grace.max(self.cfg.margin)).min(self.hard_end());
        self.release(ReleaseReason::Failed, end).await
    }

    async fn release(&mut self, reason: ReleaseReason, end: Instant) -> i32 {
        let notify_share = self
            .cfg
            .notify_timeout
            .min(end.saturating_duration_since(Instant::now()) / 4);
        let (clean, _) = self.cleanup(reason, end - notify_share, end).await;
        exit_code(reason, clean)
    }

    async fn reserve_failed(&mut self, e: ReserveError) -> i32 {
        let (reason, restored) = match e {
            ReserveError::Refused(r) => (r, true),
            ReserveError::Balloon { reason, restored } => (reason, restored),
        };
        tracing::error!(reason = %reason, "reservation failed");
        if let Err(e) = self.advance(Input::ReserveFailed) {
            tracing::error!(error = %e, "cannot record the failed reservation");
        }
        if restored {
            let _ = remove_state_file(&self.state_path());
        }
        self.push(EventKind::ReserveFailed { reason });
        let end = Instant::now() + self.cfg.notify_timeout.max(Duration::from_millis(500));
        if let Err(e) = self.notifier.flush(end).await {
            tracing::error!(error = %e, "coordinator did not hear reserve_failed");
        }
        if restored {
            exit::RESERVE_FAILED
        } else {
            exit::CLEANUP_INCOMPLETE
        }
    }

    /// Gives back what this pilot took: target = min(max, target now + taken).
    /// Returns dom0's memory afterwards and how long the balloon took.
    async fn restore_memory(&mut self, deadline: Instant) -> Result<(u64, u64), String> {
        let taken = self.record.taken_mb;
        let r = self.give_back(taken, deadline).await;
        if r.is_ok() {
            self.record.reserved_mb = 0;
            if let Err(e) = self.persist() {
                tracing::warn!(error = %e, "cannot record the restored memory");
            }
        }
        r
    }

    /// Gives `mb` of what this pilot took back to dom0 (target = min(max,
    /// target now + mb)), under the node lock, and waits for the balloon.
    /// Returns dom0's memory afterwards and how long the balloon took.
    async fn give_back(&mut self, mb: u64, deadline: Instant) -> Result<(u64, u64), String> {
        let mb = mb.min(self.record.taken_mb);
        if mb == 0 {
            let m = hv_call(&self.hv, deadline, "reading dom0 memory", |hv| {
                hv.dom0_memory()
            })
            .await;
            return Ok((m.map(|m| m.current_mb).unwrap_or(0), 0));
        }
        let dir = self.cfg.state_dir.clone();
        let lock_wait = deadline.saturating_duration_since(Instant::now());
        let lock = tokio::task::spawn_blocking(move || NodeLock::acquire(&dir, lock_wait))
            .await
            .map_err(|e| format!("node lock: {e}"))?
            .map_err(|e| e.to_string())?;
        let m = hv_call(&self.hv, deadline, "reading dom0 memory", |hv| {
            hv.dom0_memory()
        })
        .await
        .map_err(|e| e.to_string())?;
        let target = m.max_mb.min(m.target_mb + mb);
        self.record.target_dom0_mb = target;
        if let Err(e) = self.persist() {
            tracing::warn!(error = %e, "cannot record the restore target");
        }
        tracing::info!(
            dom0_mb = m.current_mb,
            target_mb = target,
            "restoring dom0 memory"
        );
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(self.cfg.balloon_timeout);
        let took = hv_call(&self.hv, deadline, "dom0 balloon", move |hv| {
            set_dom0_target_and_wait(hv, target, wait)
        })
        .await
        .map_err(|e| e.to_string())?;
        drop(lock);
        self.record.taken_mb -= mb;
        if let Err(e) = self.persist() {
            tracing::warn!(error = %e, "cannot record the restored memory");
        }
        Ok((target, took.as_millis() as u64))
    }

    /// Follows the coordinator until release, deadline, a signal or a fatal error.
    async fn follow(&mut self) -> End {
        let deadline = self.started + self.cfg.duration.saturating_sub(self.cfg.margin);
        let mut pause = Duration::ZERO;
        let mut failures = 0u32;
        let mut refusals = 0u32;
        loop {
            let answer = tokio::select! {
                biased;
                sig = self.signals.recv() => return End::Preempt(sig.unwrap_or("SIGTERM")),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!("slot deadline reached");
                    return End::Release(ReleaseReason::Deadline);
                }
                r = exchange(&mut self.notifier, self.after, self.cfg.poll_wait, pause, self.cfg.notify_timeout * 2) => r,
            };
            match answer {
                Ok(resp) => {
                    failures = 0;
                    refusals = 0;
                    pause = Duration::ZERO;
                    if let Some(end) = self.execute_all(resp, deadline).await {
                        return end;
                    }
                }
                Err(NotifyError::Refused { status, body, .. }) => {
                    refusals += 1;
                    tracing::error!(status, body = %body, refusals, "coordinator refused the poll");
                    if refusals >= MAX_POLL_REFUSALS {
                        return End::Fatal(format!(
                            "coordinator refused {refusals} polls in a row: HTTP {status}: {body}"
                        ));
                    }
                    pause = Duration::from_secs(1);
                }
                Err(e) => {
                    failures += 1;
                    if failures % 10 == 1 {
                        tracing::warn!(error = %e, failures, "coordinator not reachable; still retrying until the deadline");
                    }
                    pause =
                        (Duration::from_millis(100) * failures.min(10)).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Executes new commands in id order; returns how the loop should end, if it should.
    async fn execute_all(&mut self, resp: PollResponse, deadline: Instant) -> Option<End> {
        let mut commands = resp.commands;
        commands.sort_by_key(|c| c.id);
        for cmd in commands {
            if cmd.id <= self.after {
                continue;
            }
            tracing::info!(command_id = cmd.id, command = ?cmd.kind, "command");
            let end = match cmd.kind {
                CommandKind::StartVm(launch) => self.start_vm(launch, deadline).await.err(),
                CommandKind::DestroyVm { vm_id } => self.destroy_vm(vm_id, deadline).await.err(),
                CommandKind::Release => Some(End::Release(ReleaseReason::Commanded)),
                CommandKind::SuspendVm { vm_id, to } => self
                    .suspend_vm(vm_id, to, SuspendTrigger::Commanded, deadline)
                    .await
                    .err(),
                CommandKind::DeleteCheckpoint { checkpoint } => {
                    self.delete_checkpoint(checkpoint).await.err()
                }
                CommandKind::Bind {
                    workspace_id,
                    memory_mb,
                } => self.bind(workspace_id, memory_mb).await.err(),
                CommandKind::Unbind {
                    workspace_id,
                    memory_mb,
                } => self.unbind(workspace_id, memory_mb, deadline).await.err(),
                CommandKind::Reserve { memory_mb } => self.reserve(memory_mb).await.err(),
                CommandKind::SetCpu { vm_id, cpu } => {
                    self.set_cpu(vm_id, cpu, deadline).await.err()
                }
                CommandKind::PrepareWarm {
                    launch,
                    to,
                    ready_timeout_s,
                } => self
                    .prepare_warm(launch, to, ready_timeout_s, deadline)
                    .await
                    .err(),
            };
            self.after = cmd.id;
            if end.is_some() {
                return end;
            }
        }
        None
    }

    /// Why a launch cannot start here (name not tagged for this slot, the
    /// slot not in a state to start VMs, idle or serving another lease, a
    /// share or urgency out of range, or a share this node cannot apply),
    /// if it cannot.
    fn launch_refusal(&self, launch: &VmLaunch) -> Option<String> {
        let vm_id = &launch.vm_id;
        let tagged =
            VmName::parse(&launch.name).is_some_and(|n| n.slot == self.cfg.slot && &n.vm == vm_id);
        if !tagged {
            return Some(format!(
                "name {:?} is not wsp-{}-{}",
                launch.name, self.cfg.slot, vm_id
            ));
        }
        if self.record.state == PilotState::Idle {
            return Some("slot is idle (a pool slot): bind it to a workspace first".into());
        }
        if self.record.state != PilotState::Reserved {
            return Some(
                format!("slot is {:?}; not starting VMs", self.record.state).to_lowercase(),
            );
        }
        if let Some(w) = &self.record.workspace_id {
            let named = launch
                .context
                .as_ref()
                .map(|c| c.workspace_id.clone())
                .into_iter()
                .chain(match &launch.on_preempt {
                    protocol::pilot::OnPreempt::Suspend { to } => Some(to.workspace_id.to_string()),
                    protocol::pilot::OnPreempt::End => None,
                })
                .chain(
                    launch
                        .restore
                        .as_ref()
                        .filter(|r| !r.warm)
                        .map(|r| r.checkpoint.workspace_id.to_string()),
                )
                .find(|n| n != w.as_str());
            if let Some(other) = named {
                return Some(format!(
                    "the launch is for workspace {other}; this slot serves {w}"
                ));
            }
        }
        if launch.urgency > protocol::pilot::MAX_URGENCY {
            return Some(format!(
                "urgency {} is out of range (0 to {})",
                launch.urgency,
                protocol::pilot::MAX_URGENCY
            ));
        }
        if let Some(cpu) = launch.cpu.as_ref().filter(|c| !c.is_default()) {
            if let Err(e) = cpu.validate() {
                return Some(e);
            }
            let ctl = self.hv.cpu_control();
            if !ctl.available {
                return Some(format!(
                    "CPU shares cannot be applied on this node: {}",
                    ctl.reason.unwrap_or_default()
                ));
            }
        }
        None
    }

    async fn start_vm(&mut self, launch: VmLaunch, deadline: Instant) -> Result<(), End> {
        match &launch.restore {
            Some(r) if r.warm => return self.warm_start(launch, deadline).await,
            Some(_) => return self.resume_vm(launch, deadline).await,
            None => {}
        }
        let vm_id = launch.vm_id.clone();
        if let Some(reason) = self.launch_refusal(&launch) {
            tracing::warn!(vm_id = %vm_id, reason = %reason, "VM not started");
            self.push(EventKind::VmFailed { vm_id, reason });
            return Ok(());
        }
        self.boot_vm(launch, deadline, None).await
    }

    /// Boots `launch` from its image (staged first). `warm` says why a warm
    /// start became this boot; a failure then names both.
    async fn boot_vm(
        &mut self,
        launch: VmLaunch,
        deadline: Instant,
        warm: Option<WarmOutcome>,
    ) -> Result<(), End> {
        let vm_id = launch.vm_id.clone();
        let why_cold = match &warm {
            Some(WarmOutcome::ColdBooted { reason, .. }) => {
                format!(" (cold boot after the warm snapshot was refused: {reason})")
            }
            _ => String::new(),
        };
        self.set_vm(VmRecord {
            vm_id: vm_id.clone(),
            name: launch.name.clone(),
            memory_mb: launch.memory_mb,
            state: VmRecordState::Creating,
            nics: launch.nics.clone(),
            checkpoint: None,
        });
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let t0 = Instant::now();
        let bound = deadline.max(t0 + Duration::from_secs(1));
        // Stage the image first; the hold keeps it from eviction until the
        // hypervisor has opened it.
        let (l, staged) = match self.stage_image(&launch, bound, t0).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(vm_id = %vm_id, error = %e, "image not staged");
                self.set_vm_state(&vm_id, VmRecordState::Failed);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                self.push(EventKind::VmFailed {
                    vm_id,
                    reason: format!("{e}{why_cold}"),
                });
                return Ok(());
            }
        };
        let t_create = Instant::now();
        let r = hv_call(&self.hv, bound, "creating a VM", move |hv| hv.create(&l)).await;
        if r.is_ok() {
            self.measured.vm_start = self.measured.vm_start.max(t_create.elapsed());
        }
        let state = if r.is_ok() {
            VmRecordState::Running
        } else {
            VmRecordState::Failed
        };
        self.set_vm_state(&vm_id, state);
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        match r {
            Ok(()) => {
                let create_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(vm_id = %vm_id, name = %launch.name, create_ms, "VM started");
                self.launches.insert(vm_id.clone(), launch.clone());
                self.push(EventKind::VmStarted {
                    vm_id,
                    name: launch.name,
                    create_ms,
                    stage_ms: staged.as_ref().map(|s| s.took.as_millis() as u64),
                    cache_hit: staged.as_ref().map(|s| s.hit),
                    warm,
                });
            }
            Err(e) => {
                tracing::error!(vm_id = %vm_id, error = %e, "VM failed to start");
                self.push(EventKind::VmFailed {
                    vm_id,
                    reason: format!("{e}{why_cold}"),
                });
            }
        }
        Ok(())
    }

    async fn destroy_vm(&mut self, vm_id: VmId, deadline: Instant) -> Result<(), End> {
        let name = self
            .record
            .vms
            .iter()
            .find(|v| v.vm_id == vm_id)
            .map(|v| v.name.clone())
            .unwrap_or_else(|| VmName::new(self.cfg.slot.clone(), vm_id.clone()).to_string());
        self.set_vm_state(&vm_id, VmRecordState::Destroying);
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let t0 = Instant::now();
        let bound = deadline.max(t0 + Duration::from_secs(1));
        match destroy_guest(&self.hv, bound, "destroying a VM", &name).await {
            Ok(()) => {
                self.set_vm_state(&vm_id, VmRecordState::Destroyed);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                let destroy_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(vm_id = %vm_id, name = %name, destroy_ms, "VM destroyed");
                self.push(EventKind::VmDestroyed { vm_id, destroy_ms });
            }
            Err(e) => {
                tracing::error!(vm_id = %vm_id, error = %e, "VM not destroyed");
                self.push(EventKind::VmFailed {
                    vm_id,
                    reason: format!("destroy failed: {e}"),
                });
            }
        }
        Ok(())
    }

    /// Stages the launch's image into the node cache (if it has a source):
    /// returns the launch with the staged path as its image, and the staging.
    async fn stage_image(
        &mut self,
        launch: &VmLaunch,
        bound: Instant,
        t0: Instant,
    ) -> Result<(VmLaunch, Option<crate::images::Staged>), crate::images::ImageError> {
        let mut l = launch.clone();
        let Some(src) = &launch.image_source else {
            return Ok((l, None));
        };
        let cache = self.image_cache()?;
        let s = tokio::time::timeout_at(bound, cache.stage(src))
            .await
            .unwrap_or_else(|_| {
                Err(crate::images::ImageError::Timeout {
                    url: src.url.clone(),
                    what: "staging before the command's deadline",
                    after_ms: t0.elapsed().as_millis() as u64,
                })
            })?;
        l.image = s.path.display().to_string();
        Ok((l, Some(s)))
    }

    /// The node's image cache, opened on first use.
    fn image_cache(&mut self) -> Result<Arc<crate::images::ImageCache>, crate::images::ImageError> {
        if let Some(c) = &self.image_cache {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(crate::images::ImageCache::open(
            &self.cfg.images,
            &self.cfg.node,
        )?);
        self.image_cache = Some(Arc::clone(&c));
        Ok(c)
    }

    /// Digests in the node's image cache (empty when it does not exist yet).
    fn cached_images(&self) -> Vec<String> {
        let dir =
            crate::node::expand_node(&self.cfg.images.cache_dir, &self.cfg.node).join("sha256");
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| protocol::spec::is_sha256_hex(n))
            .collect();
        out.sort();
        out
    }

    fn set_vm(&mut self, vm: VmRecord) {
        match self.record.vms.iter_mut().find(|v| v.vm_id == vm.vm_id) {
            Some(v) => *v = vm,
            None => self.record.vms.push(vm),
        }
    }

    fn set_vm_state(&mut self, vm_id: &VmId, state: VmRecordState) {
        if let Some(v) = self.record.vms.iter_mut().find(|v| &v.vm_id == vm_id) {
            v.state = state;
        }
    }

    /// The batch system's warning: say so at once, give the coordinator its
    /// share of the grace period (what the cleanup's planned need leaves of
    /// it, and nothing once it is known to be down), then clean up and be
    /// gone before it ends.
    async fn preempt(&mut self, signal: &'static str) -> i32 {
        let now = Instant::now();
        let grace = self.cfg.grace;
        let notify_share = self.cfg.notify_timeout.min(grace / 10);
        let plan = grace::preemption(
            now,
            grace,
            self.cfg.coordinator_wait_fraction,
            notify_share,
            self.measured,
        );
        let (exit_by, hv_end, mut wait_end) = (plan.exit_by, plan.hv_end, plan.wait_end);
        tracing::warn!(
            signal,
            grace_ms = grace.as_millis() as u64,
            coordinator_wait_ms = (wait_end - now).as_millis() as u64,
            cleanup_planned_ms =
                (self.measured.destroy_need() + self.measured.restore_need()).as_millis() as u64,
            "preempted"
        );
        if self.record.state != PilotState::Reserved {
            let (clean, _) = self
                .cleanup(ReleaseReason::Preempted, hv_end, exit_by)
                .await;
            return exit_code(ReleaseReason::Preempted, clean);
        }
        if let Err(e) = self.advance(Input::Signal) {
            tracing::error!(error = %e, "cannot record preemption");
        }
        // VMs whose launch asks for it are suspended if the save fits.
        let save_deadline = suspend::save_deadline(now, exit_by, notify_share, grace);
        self.save_deadline = Some((save_deadline, exit_by - notify_share));
        let plan = self.preempt_plan(save_deadline.saturating_duration_since(now + notify_share));
        self.push(EventKind::Preempting {
            signal: signal.to_string(),
            coordinator_wait_ms: wait_end.saturating_duration_since(now).as_millis() as u64,
            cleanup_deadline_ms: protocol::now_ms()
                + exit_by
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64,
            suspending: plan.suspend.iter().map(|(v, _)| v.clone()).collect(),
            not_suspending: plan.not_suspending.clone(),
        });
        match self.notifier.flush_unless_down(now + notify_share).await {
            Ok(()) => {}
            Err(e @ NotifyError::Down { .. }) => {
                tracing::warn!(error = %e, "coordinator is down: cleaning up without waiting for it");
                wait_end = Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "coordinator did not hear preempting in time"),
        }
        self.suspend_on_preempt(plan, save_deadline).await;
        let mut pause = Duration::ZERO;
        loop {
            let left = wait_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::info!("coordinator wait over; cleaning up ourselves");
                break;
            }
            let answer = tokio::select! {
                biased;
                _ = self.signals.recv() => continue,
                _ = tokio::time::sleep_until(wait_end) => continue,
                r = exchange(&mut self.notifier, self.after, left.min(self.cfg.poll_wait), pause, notify_share) => r,
            };
            match answer {
                Ok(resp) => {
                    pause = Duration::ZERO;
                    if let Some(end) = self.execute_all(resp, wait_end).await {
                        if let End::Release(_) = end {
                            tracing::info!("coordinator released the slot during preemption");
                        }
                        break;
                    }
                }
                Err(e @ NotifyError::Down { .. }) => {
                    tracing::warn!(error = %e, "coordinator is down: cleaning up without waiting for it");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "poll during preemption failed");
                    pause = Duration::from_millis(100);
                }
            }
        }
        let (clean, _) = self
            .cleanup(ReleaseReason::Preempted, hv_end, exit_by)
            .await;
        exit_code(ReleaseReason::Preempted, clean)
    }

    /// Destroys every VM of this slot, restores memory, reports `released`.
    /// hypervisor work must end by `hv_end` (destroys earlier, so that
    /// restore gets its planned need: see [`grace::cleanup`]), the
    /// notification by `notify_end` (and then, unless preempted, the
    /// report may linger: [`Pilot::report`]).
    /// Returns whether everything was undone and the VMs destroyed.
    async fn cleanup(
        &mut self,
        reason: ReleaseReason,
        hv_end: Instant,
        notify_end: Instant,
    ) -> (bool, Vec<VmId>) {
        self.cleaning.store(true, Ordering::SeqCst);
        tracing::info!(reason = ?reason, "cleaning up");
        if self.record.state != PilotState::Releasing {
            if let Err(e) = self.advance(Input::Release) {
                tracing::error!(error = %e, "cannot record release");
            }
        }
        let mut problems = Vec::new();
        let mut destroyed = Vec::new();
        let destroy_end = grace::cleanup(Instant::now(), hv_end, self.measured).destroy_end;

        // Which guests are ours: those the state file names, and those the
        // hypervisor lists with this slot's tag. Never anything else.
        let listing = hv_call(&self.hv, destroy_end, "listing domains", |hv| hv.domains()).await;
        let mut targets: Vec<(VmId, String)> = self
            .record
            .vms
            .iter()
            .filter(|v| !matches!(v.state, VmRecordState::Destroyed | VmRecordState::Suspended))
            .map(|v| (v.vm_id.clone(), v.name.clone()))
            .collect();
        match &listing {
            Ok(domains) => {
                for d in domains {
                    if let Some(n) = VmName::parse(&d.name).filter(|n| n.slot == self.cfg.slot) {
                        if !targets.iter().any(|(_, name)| name == &d.name) {
                            targets.push((n.vm, d.name.clone()));
                        }
                    }
                }
                targets.retain(|(vm_id, name)| {
                    let present = domains.iter().any(|d| &d.name == name);
                    if !present {
                        if let Some(v) = self.record.vms.iter_mut().find(|v| &v.vm_id == vm_id) {
                            v.state = VmRecordState::Destroyed;
                        }
                    }
                    present
                });
            }
            Err(e) => problems.push(format!("listing domains: {e}")),
        }
        for (vm_id, _) in &targets {
            self.set_vm_state(vm_id, VmRecordState::Destroying);
        }
        if let Err(e) = self.persist() {
            tracing::warn!(error = %e, "cannot record the VMs being destroyed");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (vm_id, name) in targets {
            let hv = Arc::clone(&self.hv);
            tasks.spawn(async move {
                let n = name.clone();
                let r = hv_call(&hv, destroy_end, "destroying a VM", move |hv| {
                    hv.destroy(&n)
                })
                .await;
                (vm_id, name, r)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((vm_id, name, Ok(()))) => {
                    tracing::info!(vm_id = %vm_id, name = %name, "VM destroyed");
                    self.set_vm_state(&vm_id, VmRecordState::Destroyed);
                    destroyed.push(vm_id);
                }
                Ok((vm_id, _, Err(CallError::Hv(HvError::NoSuchDomain { .. })))) => {
                    self.set_vm_state(&vm_id, VmRecordState::Destroyed);
                }
                Ok((vm_id, name, Err(e))) => {
                    tracing::error!(vm_id = %vm_id, name = %name, error = %e, "VM not destroyed");
                    problems.push(format!("destroy {name}: {e}"));
                }
                Err(e) => problems.push(format!("destroy task: {e}")),
            }
        }
        if let Err(e) = self.persist() {
            tracing::warn!(error = %e, "cannot record the destroyed VMs");
        }

        let (restored_mb, restore_ms) = match self.restore_memory(hv_end).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "dom0 memory not restored");
                problems.push(format!("restore dom0 memory: {e}"));
                (0, 0)
            }
        };
        let clean = problems.is_empty();
        if let Err(e) = self.advance(Input::CleanupFinished { clean }) {
            tracing::error!(error = %e, "cannot record the end of cleanup");
        }
        if clean {
            if let Err(e) = remove_state_file(&self.state_path()) {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            tracing::info!(
                vms_destroyed = destroyed.len(),
                dom0_mb = restored_mb,
                restore_ms,
                "slot released"
            );
        } else {
            tracing::error!(problems = ?problems, "cleanup incomplete: run workspace-kill-all on this node");
        }
        let vms_suspended = self
            .record
            .vms
            .iter()
            .filter(|v| v.state == VmRecordState::Suspended)
            .map(|v| v.vm_id.clone())
            .collect();
        self.push(EventKind::Released {
            reason,
            vms_destroyed: destroyed.clone(),
            dom0_restored_mb: restored_mb,
            restore_ms,
            clean,
            problems,
            vms_suspended,
        });
        self.report(reason, notify_end).await;
        (clean, destroyed)
    }

    /// Sends what is queued by `notify_end`; then, if something is left and
    /// the slot was not preempted (whose grace period is over), keeps trying
    /// for `report_linger`, never past the job's end, until a new signal.
    /// What is still undelivered stays in the outbox.
    async fn report(&mut self, reason: ReleaseReason, notify_end: Instant) {
        if let Err(e) = self.notifier.flush(notify_end).await {
            tracing::warn!(error = %e, pending = self.notifier.pending(), "coordinator did not hear everything yet");
        }
        let linger_end = (Instant::now() + self.cfg.report_linger).min(self.hard_end());
        if self.notifier.pending() == 0
            || reason == ReleaseReason::Preempted
            || linger_end <= Instant::now()
        {
            return;
        }
        // Signals that came during the cleanup were answered by it.
        while self.signals.try_recv().is_ok() {}
        tracing::warn!(
            pending = self.notifier.pending(),
            for_s = linger_end
                .saturating_duration_since(Instant::now())
                .as_secs(),
            "the slot is given back; still trying to report it"
        );
        tokio::select! {
            biased;
            sig = self.signals.recv() => {
                tracing::warn!(signal = sig.unwrap_or("?"), "signal: leaving the report to the outbox");
                // The signal may have cut a send the coordinator took (its
                // cancel follows a report it stored): one more short try
                // settles it (acked, or "already there"), so no stale
                // letter stays for the next pilot. Bounded by half the grace.
                let bound = self.cfg.notify_timeout.min(self.cfg.grace / 2);
                if let Err(e) = self.notifier.flush_unless_down(Instant::now() + bound).await {
                    tracing::warn!(error = %e, pending = self.notifier.pending(), "left in the outbox");
                }
            }
            r = self.notifier.flush(linger_end) => match r {
                Ok(()) => tracing::info!("every event delivered"),
                Err(e) => tracing::error!(error = %e, "coordinator did not hear everything; the rest stays in the outbox"),
            },
        }
    }
}
