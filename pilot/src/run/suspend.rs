//! Suspend and resume on the node: the pilot's side of checkpoints.
//!
//! Executes `suspend_vm`, resumes (a `start_vm` whose launch names a
//! checkpoint) and `delete_checkpoint`; on the batch system's warning it
//! suspends the VMs whose launch asks for it, if the estimated save fits
//! what is left of the grace period, and otherwise leaves them to be
//! destroyed, saying why. The estimate is guest memory over the node's
//! measured save rate (`<state-dir>/checkpoint-rates.json`). Not the store's
//! format (`checkpoint.rs`) nor how a hypervisor saves (the drivers).

use super::{destroy_guest, hv_call, CallError, End, Pilot};
use crate::checkpoint::{CkError, Committed, ManifestInfo, Store, WriterInfo};
use crate::hypervisor::{HvError, Hypervisor};
use crate::state::{VmRecord, VmRecordState};
use protocol::pilot::{
    CheckpointCapability, CheckpointId, EventKind, OnPreempt, ResumeFailure, SuspendFailure,
    SuspendTrigger, VmLaunch,
};
use protocol::VmId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

const RATES_FILE: &str = "checkpoint-rates.json";
/// Saves remembered per hypervisor; the estimate uses their median.
const RATE_SAMPLES: usize = 5;
/// An estimate is this much longer than memory over rate before it is
/// compared with the time left: rates vary with the guest's memory contents.
pub(super) const ESTIMATE_MARGIN: f64 = 1.25;
/// Extra time a bounded hypervisor call gets over the bound the driver
/// honours itself, before the pilot stops waiting for it.
const DRIVER_SLACK: Duration = Duration::from_secs(2);

/// When saves on preemption must be done: before the pilot's own exit
/// deadline, leaving the final notification its share and cleanup (destroy
/// what is left, restore memory) 15 % of the grace period, between 0.3 and 5 s.
pub(super) fn save_deadline(
    now: Instant,
    exit_by: Instant,
    notify_share: Duration,
    grace: Duration,
) -> Instant {
    let reserve = grace
        .mul_f64(0.15)
        .clamp(Duration::from_millis(300), Duration::from_secs(5));
    (exit_by - notify_share)
        .checked_sub(reserve)
        .unwrap_or(now)
        .max(now)
}

/// Recent save rates (MB of guest memory per second) per hypervisor.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Rates {
    #[serde(default)]
    mb_per_s: BTreeMap<String, Vec<f64>>,
}

fn read_rates(state_dir: &Path) -> Rates {
    std::fs::read(state_dir.join(RATES_FILE))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default()
}

fn record_rate(state_dir: &Path, hypervisor: &str, mb_per_s: f64) {
    if !mb_per_s.is_finite() || mb_per_s <= 0.0 {
        return;
    }
    let mut r = read_rates(state_dir);
    let v = r.mb_per_s.entry(hypervisor.to_string()).or_default();
    v.push(mb_per_s);
    let excess = v.len().saturating_sub(RATE_SAMPLES);
    v.drain(..excess);
    match serde_json::to_vec_pretty(&r) {
        Ok(text) => {
            if let Err(e) = crate::files::write_atomic(&state_dir.join(RATES_FILE), &text, 0o600) {
                tracing::warn!(error = %e, "cannot record the save rate");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode the save rates"),
    }
}

/// The save rate to expect: the median of the node's recent saves with this
/// hypervisor, else `assumed`. The bool says whether it was measured.
pub fn save_rate(state_dir: &Path, hypervisor: &str, assumed: f64) -> (f64, bool) {
    let r = read_rates(state_dir);
    match r.mb_per_s.get(hypervisor).filter(|v| !v.is_empty()) {
        Some(v) => {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], true)
        }
        None => (assumed.max(0.001), false),
    }
}

/// Time to save `memory_mb` at `mb_per_s`, with [`ESTIMATE_MARGIN`].
pub fn estimate(memory_mb: u64, mb_per_s: f64) -> Duration {
    Duration::from_secs_f64(memory_mb as f64 / mb_per_s.max(0.001) * ESTIMATE_MARGIN)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// What to do with the VMs on preemption.
pub(super) struct PreemptPlan {
    /// VMs to suspend, in order, and where to.
    pub suspend: Vec<(VmId, CheckpointId)>,
    /// Why VMs that asked for suspend will be destroyed instead.
    pub not_suspending: Option<String>,
    /// Those VMs, and why in one word.
    pub refused: Vec<(VmId, CheckpointId)>,
    pub cause: SuspendFailure,
}

fn suspend_cause(e: &CallError) -> SuspendFailure {
    match e {
        CallError::Timeout { .. }
        | CallError::Hv(HvError::Timeout { .. })
        | CallError::Hv(HvError::KvmTimeout { .. })
        | CallError::Hv(HvError::XlTimeout { .. }) => SuspendFailure::TimedOut,
        CallError::Hv(HvError::NoSuchDomain { .. }) => SuspendFailure::NoSuchVm,
        CallError::Hv(HvError::Checkpoint(CkError::NoStore)) => SuspendFailure::NoStore,
        _ => SuspendFailure::Failed,
    }
}

pub(super) fn resume_cause(e: &CallError) -> ResumeFailure {
    match e {
        CallError::Hv(HvError::Checkpoint(ck)) => ck_resume_cause(ck),
        CallError::Hv(HvError::NoMemory { .. } | HvError::HugepagesShort { .. }) => {
            ResumeFailure::NoMemory
        }
        CallError::Hv(HvError::Incompatible(_)) => ResumeFailure::Incompatible,
        _ => ResumeFailure::Failed,
    }
}

pub(super) fn ck_resume_cause(e: &CkError) -> ResumeFailure {
    match e {
        CkError::NoStore => ResumeFailure::NoStore,
        CkError::NotFound { .. } => ResumeFailure::NotFound,
        CkError::Incomplete { .. } | CkError::Busy { .. } => ResumeFailure::Incomplete,
        e if e.is_corrupt() => ResumeFailure::ChecksumMismatch,
        _ => ResumeFailure::Failed,
    }
}

/// Saves guest `name` into checkpoint `id` and commits it, in one blocking
/// call: the writer never crosses an await, and a call the pilot stops
/// waiting for still removes its unfinished checkpoint when it ends (the
/// writer's Drop). The guest is left stopped (the caller destroys it), or
/// running again when the commit fails. Returns the checkpoint and the
/// driver's save time in ms.
pub(super) fn save_committed(
    hv: &dyn Hypervisor,
    store: &Store,
    id: &CheckpointId,
    who: WriterInfo,
    name: &str,
    info: ManifestInfo,
    deadline: std::time::Instant,
) -> Result<(Committed, u64), HvError> {
    let s0 = std::time::Instant::now();
    let mut w = store.begin(id, who)?;
    let driver = hv.save(name, &mut w, deadline)?;
    let save_ms = s0.elapsed().as_millis() as u64;
    match w.commit(ManifestInfo {
        save_ms,
        driver,
        ..info
    }) {
        Ok(c) => Ok((c, save_ms)),
        Err(e) => {
            // The checkpoint is not usable: the guest runs on.
            if let Err(r) = hv.resume_after_save(name) {
                tracing::error!(vm = %name, error = %r, "guest not resumed after a failed commit");
            }
            Err(e.into())
        }
    }
}

impl Pilot {
    pub(super) fn store(&self) -> Result<Store, CkError> {
        Store::open(&self.cfg.checkpoints)
    }

    /// Unfinished checkpoints this node was writing when its pilot was
    /// killed (no manifest, writer gone) are removed in the background:
    /// never restorable, and a warm template's id is never taken over.
    pub(super) fn remove_abandoned_checkpoints(&self) {
        let Ok(store) = self.store() else { return };
        let node = self.cfg.node.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.remove_abandoned(&node) {
                tracing::warn!(error = %e, "unfinished checkpoints of this node not looked for");
            }
        });
    }

    /// The hypervisor's name as checkpoints record it.
    pub(super) fn hv_kind(&self) -> String {
        self.hv.name().to_string()
    }

    /// What `reserved` says about suspending on this node.
    pub(super) fn checkpoint_capability(&self) -> Option<CheckpointCapability> {
        self.cfg.checkpoints.dir.as_ref()?;
        let (rate, measured) = save_rate(
            &self.cfg.state_dir,
            &self.hv_kind(),
            self.cfg.checkpoints.save_mb_per_s,
        );
        Some(CheckpointCapability {
            save_mb_per_s: rate,
            measured,
        })
    }

    /// Memory of the slot's VMs that are, or may be, on the node.
    pub(super) fn memory_in_use(&self) -> (u64, usize) {
        let on: Vec<&VmRecord> = self
            .record
            .vms
            .iter()
            .filter(|v| v.state.on_node())
            .collect();
        (on.iter().map(|v| v.memory_mb).sum(), on.len())
    }

    /// Decides, at the warning, which VMs to suspend: every running VM whose
    /// launch asks for it, if all of them fit in `left` one after another;
    /// else none (an ensemble is suspended whole or ended), with the reason.
    pub(super) fn preempt_plan(&self, left: Duration) -> PreemptPlan {
        let mut want: Vec<(VmId, CheckpointId, u64)> = Vec::new();
        for v in &self.record.vms {
            if v.state != VmRecordState::Running {
                continue;
            }
            if let Some(OnPreempt::Suspend { to }) =
                self.launches.get(&v.vm_id).map(|l| &l.on_preempt)
            {
                want.push((v.vm_id.clone(), to.clone(), v.memory_mb));
            }
        }
        if want.is_empty() {
            return PreemptPlan {
                suspend: Vec::new(),
                not_suspending: None,
                refused: Vec::new(),
                cause: SuspendFailure::WouldNotFit,
            };
        }
        let refuse = |why: String, cause: SuspendFailure| {
            tracing::warn!(reason = %why, vms = want.len(), "not suspending on preemption; the VMs will be destroyed");
            PreemptPlan {
                suspend: Vec::new(),
                not_suspending: Some(why),
                refused: want
                    .iter()
                    .map(|(v, c, _)| (v.clone(), c.clone()))
                    .collect(),
                cause,
            }
        };
        if self.cfg.checkpoints.dir.is_none() {
            return refuse(CkError::NoStore.to_string(), SuspendFailure::NoStore);
        }
        let mb: u64 = want.iter().map(|w| w.2).sum();
        let (rate, measured) = save_rate(
            &self.cfg.state_dir,
            &self.hv_kind(),
            self.cfg.checkpoints.save_mb_per_s,
        );
        let needs = estimate(mb, rate);
        if needs > left {
            return refuse(
                format!(
                "save did not fit the grace: needs ~{} for {} VM(s) of {mb} MB at {rate:.0} MB/s ({}), {} left",
                secs(needs),
                want.len(),
                if measured { "measured on this node" } else { "assumed: [checkpoints] save_mb_per_s" },
                secs(left)
            ),
                SuspendFailure::WouldNotFit,
            );
        }
        tracing::info!(
            vms = want.len(),
            memory_mb = mb,
            needs_ms = needs.as_millis() as u64,
            left_ms = left.as_millis() as u64,
            "suspending on preemption"
        );
        PreemptPlan {
            suspend: want.into_iter().map(|(v, c, _)| (v, c)).collect(),
            not_suspending: None,
            refused: Vec::new(),
            cause: SuspendFailure::WouldNotFit,
        }
    }

    /// Suspends the planned VMs one after another, each bounded by
    /// `deadline`; a VM not saved in time stays to be destroyed by cleanup.
    pub(super) async fn suspend_on_preempt(&mut self, plan: PreemptPlan, deadline: Instant) {
        // Each VM that asked for suspend gets its answer.
        if let Some(reason) = &plan.not_suspending {
            for (vm_id, to) in plan.refused {
                self.push(EventKind::VmSuspendFailed {
                    vm_id,
                    checkpoint: to,
                    cause: plan.cause,
                    reason: reason.clone(),
                    vm_running: false,
                });
            }
        }
        for (vm_id, to) in plan.suspend {
            if Instant::now() >= deadline {
                let reason = format!(
                    "save did not fit the grace: the grace period's save budget ran out before {vm_id} (saved one after another)"
                );
                tracing::warn!(vm_id = %vm_id, "{reason}");
                self.push(EventKind::VmSuspendFailed {
                    vm_id,
                    checkpoint: to,
                    cause: SuspendFailure::TimedOut,
                    reason,
                    vm_running: false,
                });
                continue;
            }
            if let Err(End::Fatal(e)) = self
                .suspend_vm(vm_id, to, SuspendTrigger::Preempted, deadline)
                .await
            {
                tracing::error!(error = %e, "state file not written during suspend");
            }
        }
    }

    /// Saves VM `vm_id` to checkpoint `to` and takes it off the node:
    /// store writer, driver save (guest left stopped), commit (manifest
    /// last), destroy. Reports `vm_suspended` or `vm_suspend_failed`. Only
    /// a state file that cannot be written is an `Err`.
    pub(super) async fn suspend_vm(
        &mut self,
        vm_id: VmId,
        to: CheckpointId,
        trigger: SuspendTrigger,
        deadline: Instant,
    ) -> Result<(), End> {
        let t0 = Instant::now();
        // The driver honours `bound`; the pilot waits for it a little
        // longer, but never, on preemption, past its own exit deadline.
        let (bound, call_bound) = match (trigger, self.save_deadline) {
            (_, Some((d, hard))) => (d, (d + DRIVER_SLACK).min(hard).max(d)),
            (SuspendTrigger::Commanded, None) => {
                let d = deadline
                    .min(t0 + Duration::from_secs(self.cfg.checkpoints.save_timeout_s.max(1)));
                (d, d + DRIVER_SLACK)
            }
            (SuspendTrigger::Preempted, None) => (deadline, deadline + DRIVER_SLACK),
        };
        let preempted = trigger == SuspendTrigger::Preempted || self.save_deadline.is_some();
        let fail = |p: &mut Pilot, cause: SuspendFailure, reason: String, vm_running: bool| {
            tracing::error!(vm_id = %vm_id, checkpoint = %to, cause = ?cause, reason = %reason, "VM not suspended");
            p.push(EventKind::VmSuspendFailed {
                vm_id: vm_id.clone(),
                checkpoint: to.clone(),
                cause,
                reason,
                vm_running,
            });
        };
        let Some(rec) = self
            .record
            .vms
            .iter()
            .find(|v| v.vm_id == vm_id && v.state == VmRecordState::Running)
            .cloned()
        else {
            let state = self
                .record
                .vms
                .iter()
                .find(|v| v.vm_id == vm_id)
                .map(|v| format!("{:?}", v.state).to_lowercase());
            let reason = match state {
                Some(s) => format!("VM {vm_id} is {s} on this node, not running"),
                None => format!("no VM {vm_id} on this node"),
            };
            fail(self, SuspendFailure::NoSuchVm, reason, false);
            return Ok(());
        };
        if to.vm_id != vm_id {
            let reason = format!("checkpoint {to} belongs to another VM than {vm_id}");
            fail(self, SuspendFailure::Failed, reason, !preempted);
            return Ok(());
        }
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => {
                fail(self, SuspendFailure::NoStore, e.to_string(), !preempted);
                return Ok(());
            }
        };
        let launch = self.launches.get(&vm_id).cloned();
        self.set_vm_state(&vm_id, VmRecordState::Suspending);
        if let Some(v) = self.record.vms.iter_mut().find(|v| v.vm_id == vm_id) {
            v.checkpoint = Some(to.clone());
        }
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        tracing::info!(vm_id = %vm_id, checkpoint = %to, trigger = ?trigger, bound_ms = bound.saturating_duration_since(t0).as_millis() as u64, "suspending");

        let who = WriterInfo {
            node: self.cfg.node.clone(),
            slot: self.cfg.slot.to_string(),
            pid: std::process::id(),
            started_ms: protocol::now_ms(),
        };
        let name = rec.name.clone();
        let info = ManifestInfo {
            warm: false,
            vm_name: name.clone(),
            hypervisor: self.hv_kind(),
            memory_mb: rec.memory_mb,
            cpus: launch.as_ref().map(|l| l.cpus).unwrap_or(1),
            image: launch.as_ref().map(|l| l.image.clone()).unwrap_or_default(),
            image_sha256: launch
                .as_ref()
                .and_then(|l| l.image_source.as_ref())
                .and_then(|s| s.sha256.clone()),
            node: self.cfg.node.clone(),
            slot: self.cfg.slot.clone(),
            save_ms: 0,
            driver: serde_json::Value::Null,
        };
        let driver_bound = bound.into_std();
        let (n, id) = (name.clone(), to.clone());
        let r = hv_call(&self.hv, call_bound, "saving a VM", move |hv| {
            save_committed(hv, &store, &id, who, &n, info, driver_bound)
        })
        .await;
        let (committed, save_ms) = match r {
            Ok(c) => c,
            Err(e) => {
                let cause = suspend_cause(&e);
                let mut reason = e.to_string();
                if preempted && cause == SuspendFailure::TimedOut {
                    reason = format!("save did not finish within the grace period: {reason}");
                }
                let running = if preempted {
                    // Cleanup destroys it with the slot's other VMs.
                    self.set_vm_state(&vm_id, VmRecordState::Running);
                    false
                } else {
                    let n = name.clone();
                    let _ = hv_call(
                        &self.hv,
                        Instant::now() + Duration::from_secs(10),
                        "resuming a VM",
                        move |hv| hv.resume_after_save(&n),
                    )
                    .await;
                    let n = name.clone();
                    let listed = hv_call(
                        &self.hv,
                        Instant::now() + Duration::from_secs(10),
                        "listing domains",
                        |hv| hv.domains(),
                    )
                    .await
                    .map(|ds| ds.iter().any(|d| d.name == n))
                    .unwrap_or(true);
                    self.set_vm_state(
                        &vm_id,
                        if listed {
                            VmRecordState::Running
                        } else {
                            VmRecordState::Failed
                        },
                    );
                    listed
                };
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                fail(self, cause, reason, running);
                return Ok(());
            }
        };
        // The checkpoint is complete: the guest leaves the node.
        let destroyed = destroy_guest(
            &self.hv,
            Instant::now() + Duration::from_secs(30),
            "destroying a saved VM",
            &name,
        )
        .await;
        match destroyed {
            Ok(()) => {
                self.set_vm_state(&vm_id, VmRecordState::Suspended);
            }
            Err(e) => {
                // Still on the node, stopped: cleanup destroys it.
                tracing::error!(vm_id = %vm_id, error = %e, "saved VM not destroyed; it stays stopped until cleanup");
                self.set_vm_state(&vm_id, VmRecordState::Destroying);
            }
        }
        self.launches.remove(&vm_id);
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let total = t0.elapsed();
        record_rate(
            &self.cfg.state_dir,
            &self.hv_kind(),
            rec.memory_mb as f64 / (save_ms.max(1) as f64 / 1000.0),
        );
        tracing::info!(
            vm_id = %vm_id,
            checkpoint = %to,
            bytes = committed.bytes,
            save_ms,
            total_ms = total.as_millis() as u64,
            sha256 = %committed.sha256,
            "VM suspended"
        );
        self.push(EventKind::VmSuspended {
            vm_id,
            checkpoint: to,
            sha256: committed.sha256,
            bytes: committed.bytes,
            memory_mb: rec.memory_mb,
            save_ms,
            total_ms: total.as_millis() as u64,
            trigger,
        });
        Ok(())
    }

    /// Why a checkpoint cannot start `launch` here (another hypervisor, VM
    /// shape or image), if it cannot.
    pub(super) fn manifest_mismatch(
        &self,
        m: &crate::checkpoint::Manifest,
        launch: &VmLaunch,
    ) -> Option<String> {
        let image_sha = launch.image_source.as_ref().and_then(|s| s.sha256.clone());
        if m.hypervisor != self.hv_kind() {
            Some(format!(
                "saved by {} on node {}, this node runs {}",
                m.hypervisor,
                m.node,
                self.hv_kind()
            ))
        } else if m.memory_mb != launch.memory_mb || m.cpus != launch.cpus {
            Some(format!(
                "saved with {} MB and {} CPU(s), launched with {} MB and {} CPU(s)",
                m.memory_mb, m.cpus, launch.memory_mb, launch.cpus
            ))
        } else if let (Some(a), Some(b)) = (&m.image_sha256, &image_sha) {
            (a != b).then(|| format!("saved on image sha256 {a}, launched on {b}"))
        } else {
            None
        }
    }

    /// Starts a VM from its checkpoint: checks memory, the manifest (digest,
    /// hypervisor, shape), stages the image, then lets the driver restore
    /// it (files verified as they are read). Reports `vm_resumed` or
    /// `vm_resume_failed`; on failure nothing of it runs and the checkpoint
    /// is kept.
    pub(super) async fn resume_vm(
        &mut self,
        launch: VmLaunch,
        deadline: Instant,
    ) -> Result<(), End> {
        let t0 = Instant::now();
        let vm_id = launch.vm_id.clone();
        let Some(from) = launch.restore.clone() else {
            return Ok(());
        };
        let fail = |p: &mut Pilot, cause: ResumeFailure, reason: String| {
            tracing::error!(vm_id = %vm_id, checkpoint = %from.checkpoint, cause = ?cause, reason = %reason, "VM not resumed");
            p.push(EventKind::VmResumeFailed {
                vm_id: vm_id.clone(),
                checkpoint: from.checkpoint.clone(),
                cause,
                reason,
            });
        };
        if let Some(reason) = self.launch_refusal(&launch) {
            fail(self, ResumeFailure::Failed, reason);
            return Ok(());
        }
        // A checkpoint may start another VM than the one saved (a warm VM
        // from a clean checkpoint, issue 17): the shape checks below apply.
        let (used, n) = self.memory_in_use();
        let free = self.record.reserved_mb.saturating_sub(used);
        if launch.memory_mb > free {
            let reason = format!(
                "not enough memory: the VM needs {} MB; this slot reserved {} MB, {used} MB in use by {n} VM(s), {free} MB free",
                launch.memory_mb, self.record.reserved_mb
            );
            fail(self, ResumeFailure::NoMemory, reason);
            return Ok(());
        }
        let store = match self.store() {
            Ok(s) => s,
            Err(e) => {
                fail(self, ResumeFailure::NoStore, e.to_string());
                return Ok(());
            }
        };
        let (id, sha) = (from.checkpoint.clone(), from.sha256.clone());
        let opened =
            tokio::task::spawn_blocking(move || store.open_verified(&id, Some(&sha))).await;
        let reader = match opened {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                fail(self, ck_resume_cause(&e), e.to_string());
                return Ok(());
            }
            Err(e) => {
                fail(
                    self,
                    ResumeFailure::Failed,
                    format!("opening the checkpoint: {e}"),
                );
                return Ok(());
            }
        };
        if let Some(why) = self.manifest_mismatch(reader.manifest(), &launch) {
            fail(self, ResumeFailure::Incompatible, why);
            return Ok(());
        }
        self.set_vm(VmRecord {
            vm_id: vm_id.clone(),
            name: launch.name.clone(),
            memory_mb: launch.memory_mb,
            state: VmRecordState::Resuming,
            nics: launch.nics.clone(),
            checkpoint: Some(from.checkpoint.clone()),
        });
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let bound = deadline
            .max(t0 + Duration::from_secs(1))
            .min(t0 + Duration::from_secs(self.cfg.checkpoints.restore_timeout_s.max(1)));
        let (l, staged) = match self.stage_image(&launch, bound, t0).await {
            Ok(s) => s,
            Err(e) => {
                self.set_vm_state(&vm_id, VmRecordState::Failed);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                fail(
                    self,
                    ResumeFailure::Failed,
                    format!("image not staged: {e}"),
                );
                return Ok(());
            }
        };
        let bytes = reader.bytes();
        let stage_ms = staged.as_ref().map(|s| s.took.as_millis() as u64);
        let driver_bound = bound.into_std();
        let r0 = Instant::now();
        let r = hv_call(
            &self.hv,
            bound + DRIVER_SLACK,
            "restoring a VM",
            move |hv| hv.restore(&l, &reader, driver_bound),
        )
        .await;
        drop(staged);
        let restore_ms = r0.elapsed().as_millis() as u64;
        match r {
            Ok(()) => {
                self.set_vm_state(&vm_id, VmRecordState::Running);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                self.launches.insert(vm_id.clone(), launch.clone());
                let total_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(vm_id = %vm_id, name = %launch.name, checkpoint = %from.checkpoint, bytes, restore_ms, total_ms, "VM resumed");
                self.push(EventKind::VmResumed {
                    vm_id,
                    name: launch.name,
                    checkpoint: from.checkpoint,
                    bytes,
                    restore_ms,
                    total_ms,
                    stage_ms,
                });
            }
            Err(e) => {
                // The driver removed what it started; make sure of it.
                let _ = destroy_guest(
                    &self.hv,
                    Instant::now() + Duration::from_secs(30),
                    "destroying a VM that did not resume",
                    &launch.name,
                )
                .await;
                self.set_vm_state(&vm_id, VmRecordState::Failed);
                self.persist().map_err(|e| End::Fatal(e.to_string()))?;
                fail(self, resume_cause(&e), e.to_string());
            }
        }
        Ok(())
    }

    /// Removes a checkpoint from the store when the coordinator says so.
    pub(super) async fn delete_checkpoint(&mut self, checkpoint: CheckpointId) -> Result<(), End> {
        let store = self.store();
        let id = checkpoint.clone();
        let r = tokio::task::spawn_blocking(move || store.and_then(|s| s.delete(&id))).await;
        match r {
            Ok(Ok(bytes)) => {
                tracing::info!(checkpoint = %checkpoint, bytes, "checkpoint deleted");
                self.push(EventKind::CheckpointDeleted { checkpoint, bytes });
            }
            Ok(Err(e)) => {
                tracing::error!(checkpoint = %checkpoint, error = %e, "checkpoint not deleted");
                self.push(EventKind::CheckpointDeleteFailed {
                    checkpoint,
                    reason: e.to_string(),
                });
            }
            Err(e) => self.push(EventKind::CheckpointDeleteFailed {
                checkpoint,
                reason: format!("delete task: {e}"),
            }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_median_of_recent_saves_else_the_assumption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(save_rate(dir.path(), "sim", 100.0), (100.0, false));
        for r in [50.0, 400.0, 200.0, 10.0, 300.0, 250.0] {
            record_rate(dir.path(), "sim", r);
        }
        // The oldest (50) fell out: 400, 200, 10, 300, 250 -> 250.
        assert_eq!(save_rate(dir.path(), "sim", 100.0), (250.0, true));
        assert_eq!(save_rate(dir.path(), "xen", 100.0), (100.0, false));
    }

    #[test]
    fn the_estimate_has_its_margin_and_the_save_deadline_leaves_cleanup_time() {
        assert_eq!(estimate(1000, 100.0), Duration::from_millis(12_500));
        let now = Instant::now();
        let grace = Duration::from_secs(10);
        let exit_by = now + grace.mul_f64(0.85);
        let d = save_deadline(now, exit_by, Duration::from_millis(500), grace);
        // 8.5 s - 0.5 s notification - 1.5 s cleanup.
        assert_eq!(d - now, Duration::from_millis(6500));
        let tiny = save_deadline(now, now + Duration::from_millis(100), Duration::ZERO, grace);
        assert_eq!(tiny, now, "never before now");
    }
}
