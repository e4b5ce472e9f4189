//! Reconciliation: what the engine does on its own, on timers. Leases whose
//! time is over, pilots gone silent, batch jobs to cancel (retried until the
//! batch system takes the cancel), the slow batch-system status backstop,
//! orphan jobs, and recovery of what a dead coordinator left half-done.
//!
//! Not here: the rules these steps apply (`rules`).

use super::rules::{
    end_slots, fail_workspace, job_ended, maybe_settle, must_ws, reports_overdue,
    slot_maybe_released, transition, ADMINS_TOLD,
};
use super::{Engine, EngineError};
use crate::lifecycle::pilot as pilot_life;
use crate::lifecycle::slot::{self as slot_life, Job, JobInput};
use crate::lifecycle::vm as vm_life;
use crate::lifecycle::Input;
use crate::store::{self, Store};
use lrm_adapters::{JobId, JobState, JobStatus};
use protocol::view::Phase;
use protocol::SlotId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Time between two tries of a cancel the batch system refused.
pub const CANCEL_RETRY_MS: u64 = 1_000;

impl Engine {
    /// Runs the housekeeping loop until `stop` fires: every `tick_ms` (or
    /// sooner, when something asks), and the batch system's status every
    /// `lrm_poll_s` of the engine's clock.
    pub async fn run_ticks(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tick = Duration::from_millis(self.cfg.tick_ms.max(10));
        let lrm_every_ms = (self.cfg.lrm_poll_s * 1000.0) as u64;
        let mut last_lrm = self.clock.now_ms();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.kick.notified() => {}
                _ = stop.changed() => return,
            }
            let now = self.clock.now_ms();
            let lrm_due = now.saturating_sub(last_lrm) >= lrm_every_ms;
            if lrm_due {
                last_lrm = now;
            }
            self.housekeeping(lrm_due).await;
        }
    }

    /// One round of housekeeping, as a tick of the server runs it: leases
    /// whose time is over, silent pilots, owed cancels and, when `lrm_due`,
    /// the batch system's status and its orphan jobs. Failures are logged;
    /// what they left undone is done by a later round.
    pub async fn housekeeping(&self, lrm_due: bool) {
        if let Err(e) = self.expire_leases() {
            warn!(error = %e, "lease expiry check failed");
        }
        if let Err(e) = self.suspend_for_reservations() {
            warn!(error = %e, "suspending best-effort leases for reservations failed; will retry");
        }
        if let Err(e) = self.find_lost_pilots() {
            warn!(error = %e, "pilot silence check failed");
        }
        self.retry_cancels().await;
        if let Err(e) = self.resume_due().await {
            warn!(error = %e, "resuming suspended workspaces failed; will retry");
        }
        if let Err(e) = self.urgent_fallbacks().await {
            warn!(error = %e, "submitting urgent leases that gave up sharing failed; will retry");
        }
        if let Err(e) = self.retry_cap_lifts() {
            warn!(error = %e, "retrying CPU caps that could not be lifted failed; will retry");
        }
        if let Err(e) = self.delete_ended_checkpoints().await {
            warn!(error = %e, "deleting checkpoints of ended leases failed; will retry");
        }
        if let Err(e) = self.pool_tick().await {
            warn!(error = %e, "the slot pool's tick failed; will retry");
        }
        if let Err(e) = self.observe_durations() {
            warn!(error = %e, "observing lease durations failed");
        }
        if lrm_due {
            if let Err(e) = self.poll_lrm().await {
                warn!(error = %e, "batch system status query failed; will retry");
            }
            if let Err(e) = self.cancel_orphans().await {
                warn!(error = %e, "orphan job scan failed; will retry");
            }
            if let Err(e) = self.release_reservations().await {
                warn!(error = %e, "releasing batch system reservations failed; will retry");
            }
        }
        if let Err(e) = self.give_up_on_reports() {
            warn!(error = %e, "overdue report check failed");
        }
    }

    /// Slots whose job ended before their pilots reported, and whose wait
    /// for the reports (`report_wait_s`, counted from when we learned the job
    /// ended, or from this process's start) is over, end `unreported`: their
    /// silent nodes are named for kill-all.
    pub fn give_up_on_reports(&self) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let wait_s = self.cfg.report_wait_s;
        let changed = self.with_store(|s| {
            s.tx(|tx| {
                let mut changed = false;
                for slot in store::slots_awaiting_report(tx)? {
                    let ended = store::job_ended_ms(tx, &slot.workspace_id, &slot.id)?;
                    let since = ended.unwrap_or(now).max(self.started_ms);
                    changed |= reports_overdue(tx, &slot, since, now, wait_s)?;
                }
                Ok::<_, EngineError>(changed)
            })
        })?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// When the next slot awaiting its pilots' reports gives up on them, if any waits.
    pub fn next_report_deadline_ms(&self) -> Result<Option<u64>, EngineError> {
        let wait_ms = self.cfg.report_wait_s * 1000;
        self.with_store(|s| {
            let c = s.conn();
            let mut next: Option<u64> = None;
            for slot in store::slots_awaiting_report(c)? {
                let ended = store::job_ended_ms(c, &slot.workspace_id, &slot.id)?;
                let since = ended.unwrap_or(self.started_ms).max(self.started_ms);
                let due = since + wait_ms;
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            Ok(next)
        })
    }

    /// When the next lease runs out (its workspace then expires), if any runs.
    pub fn next_lease_end_ms(&self) -> Result<Option<u64>, EngineError> {
        self.with_store(|s| Ok(store::next_expiry(s.conn())?))
    }

    /// When an owed cancel is next due (now for one never tried; a second
    /// after the last try otherwise), if any is owed.
    pub fn next_cancel_ms(&self) -> Result<Option<u64>, EngineError> {
        let owed = self.with_store(|s| Ok(store::owed_cancels(s.conn())?))?;
        let attempts = self
            .cancel_attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now_ms();
        Ok(owed
            .iter()
            .map(|id| attempts.get(id).map_or(now, |t| t + CANCEL_RETRY_MS))
            .min())
    }

    /// Ends the leases whose time is over.
    pub fn expire_leases(&self) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let changed = self.with_store(|s| {
            s.tx(|tx| {
                let mut changed = false;
                for mut ws in store::expired_workspaces(tx, now)? {
                    transition(
                        tx,
                        &mut ws,
                        Input::LeaseExpired,
                        Some("lease duration is over"),
                        now,
                    )?;
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::LeaseExpired,
                        None,
                        None,
                        None,
                        "lease duration is over",
                    )?;
                    end_slots(tx, &ws, now)?;
                    info!(workspace_id = %ws.id, "lease expired");
                    changed = true;
                }
                Ok::<_, EngineError>(changed)
            })
        })?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// Pilots silent past `pilot_silence_s` (counted from this process's start
    /// at the earliest, so a restart does not condemn every pilot) are lost:
    /// their workspace fails, their job is cancelled, the node is named for kill-all.
    pub fn find_lost_pilots(&self) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let silence = self.cfg.pilot_silence_s * 1000;
        if now.saturating_sub(self.started_ms) < silence {
            return Ok(());
        }
        let changed = self.with_store(|s| {
            s.tx(|tx| {
                let lost = store::silent_pilots(tx, now.saturating_sub(silence))?;
                for p in &lost {
                    let Some(slot) = store::get_slot(tx, &p.slot_id)? else { continue };
                    let mut ws = must_ws(tx, &slot.workspace_id)?;
                    let quiet_s = now.saturating_sub(p.last_seen_ms) / 1000;
                    warn!(workspace_id = %ws.id, slot_id = %slot.id, node = %p.node, quiet_s, "pilot lost");
                    store::advance_pilot(tx, &slot.id, &p.node, pilot_life::Input::Lost)?;
                    // Its VMs may still run: unknown, not destroyed, until
                    // kill-all or a late report from the pilot says so.
                    let vms = store::live_vms_on(tx, &slot.id, &p.node)?;
                    for (vm, state) in &vms {
                        store::advance_vm_from(tx, vm, *state, vm_life::Input::PilotLost)?;
                    }
                    // An urgent lease's VM on that node (engine::urgent).
                    let how = super::urgent::HostEnd::Lost { quiet_s: now.saturating_sub(p.last_seen_ms) / 1000 };
                    super::urgent::host_ended(tx, &slot.id, &p.node, how, now)?;
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::PilotLost,
                        Some(&slot.id),
                        Some(&p.node),
                        None,
                        &format!(
                            "no word from the pilot for {quiet_s} s; its job is cancelled; {} VM(s) there unknown; {ADMINS_TOLD}",
                            vms.len()
                        ),
                    )?;
                    store::advance_job(tx, &slot.id, &JobInput::CancelNeeded)?;
                    let reason = format!(
                        "pilot on node {} went silent (nothing for {quiet_s} s); its VMs there may still run until the node is cleaned, which the cluster's admins are told",
                        p.node
                    );
                    // A slot the lease already left (it moved onto pool
                    // slots) holds none of its VMs: the lease goes on.
                    let left = !store::slot_has_vms(tx, &slot.id)?;
                    if !left {
                        fail_workspace(tx, &mut ws, &reason, now)?;
                    }
                    slot_maybe_released(tx, &ws, &slot.id, now)?;
                    maybe_settle(tx, &mut ws, now)?;
                }
                Ok::<_, EngineError>(!lost.is_empty())
            })
        })?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// Cancels batch jobs owed a cancel; a failed cancel stays owed and is
    /// retried a second later, until the batch system takes it.
    pub async fn retry_cancels(&self) {
        let slots = match self.with_store(|s| Ok(store::slots_to_cancel(s.conn())?)) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "reading slots to cancel");
                return;
            }
        };
        for slot in slots {
            let Some(job) = slot.job.id().map(str::to_string) else {
                continue; // a job owed a cancel always has an id
            };
            {
                let mut attempts = self
                    .cancel_attempts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let now = self.clock.now_ms();
                if attempts
                    .get(&slot.id)
                    .is_some_and(|t| now < t + CANCEL_RETRY_MS)
                {
                    continue;
                }
                attempts.insert(slot.id.clone(), now);
            }
            match self.lrm.cancel(&JobId(job.clone())).await {
                Ok(()) => {
                    info!(slot_id = %slot.id, job_id = %job, "batch job cancelled");
                    let now = self.clock.now_ms();
                    let r = self.with_store(|s| {
                        s.tx(|tx| {
                            store::advance_job(tx, &slot.id, &JobInput::CancelAccepted)?;
                            let pilots = store::pilots_of(tx, &slot.id)?;
                            if pilots.iter().all(|p| p.state.is_terminal()) {
                                let input = slot_life::Input::CancelledBeforePilots;
                                if store::advance_slot(tx, &slot.id, input)?.is_some() {
                                    store::push_timeline(
                                        tx,
                                        &slot.workspace_id,
                                        now,
                                        now,
                                        Phase::SlotReleased,
                                        Some(&slot.id),
                                        None,
                                        None,
                                        &format!(
                                            "job {job} cancelled before its pilots held anything"
                                        ),
                                    )?;
                                }
                            }
                            let mut ws = must_ws(tx, &slot.workspace_id)?;
                            maybe_settle(tx, &mut ws, now)?;
                            Ok::<_, EngineError>(())
                        })
                    });
                    if let Err(e) = r {
                        warn!(slot_id = %slot.id, error = %e, "recording cancel");
                    }
                    self.cancel_attempts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&slot.id);
                    self.bump();
                }
                Err(e) => {
                    warn!(slot_id = %slot.id, job_id = %job, error = %e, "cancel failed; will retry")
                }
            }
        }
    }

    /// Cancels batch jobs named as ours that no slot owns: submitted by an
    /// earlier run that died before recording them, or left from a slot the
    /// database no longer tracks. Derived from the batch system on every
    /// scan, so a failed cancel is retried until the job is gone.
    pub async fn cancel_orphans(&self) -> Result<Vec<JobId>, EngineError> {
        let jobs = match self.lrm.list_jobs().await {
            Ok(Some(jobs)) => jobs,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => {
                warn!(error = %e, "listing batch jobs for orphans failed; will retry");
                return Ok(Vec::new());
            }
        };
        let prefix = self.job_prefix();
        let mut orphans = Vec::new();
        for (job, name) in jobs {
            let Some(slot_id) = name
                .strip_prefix(&prefix)
                .and_then(|s| SlotId::parse(s).ok())
            else {
                continue;
            };
            let slot = self.with_store(|s| Ok(store::get_slot(s.conn(), &slot_id)?))?;
            let orphan = match &slot {
                None => true,
                // Submission in flight: the id is about to be recorded.
                Some(s) if s.job == Job::Unsubmitted => false,
                Some(s) => s.job.id() != Some(job.0.as_str()),
            };
            if !orphan {
                continue;
            }
            warn!(job_id = %job, name = %name, slot_id = %slot_id, "orphan batch job: cancelling");
            match self.lrm.cancel(&job).await {
                Ok(()) => {
                    self.metrics.orphan_jobs_cancelled.inc();
                    if let Some(s) = &slot {
                        let now = self.clock.now_ms();
                        let detail = format!(
                            "orphan batch job {job} ({name}) cancelled: the slot does not own it"
                        );
                        self.with_store(|st| {
                            Ok(store::push_timeline(
                                st.conn(),
                                &s.workspace_id,
                                now,
                                now,
                                Phase::JobEnded,
                                Some(&s.id),
                                None,
                                None,
                                &detail,
                            )?)
                        })?;
                        self.bump();
                    }
                    orphans.push(job);
                }
                Err(e) => {
                    warn!(job_id = %job, error = %e, "cancelling orphan job failed; will retry")
                }
            }
        }
        Ok(orphans)
    }

    /// The slow backstop: one batched status query for every job we may still have.
    pub async fn poll_lrm(&self) -> Result<(), EngineError> {
        let slots = self.with_store(|s| Ok(store::slots_with_live_jobs(s.conn())?))?;
        if slots.is_empty() {
            return Ok(());
        }
        let ids: Vec<JobId> = slots
            .iter()
            .filter_map(|s| s.job.id().map(|j| JobId(j.to_string())))
            .collect();
        let reports = match self.lrm.status_with_reasons(&ids).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "batch status query failed");
                return Ok(());
            }
        };
        if self.note_queue_reasons(&slots, &reports) {
            self.bump();
        }
        let states = lrm_adapters::without_reasons(reports);
        let now = self.clock.now_ms();
        let mut changed = false;
        for slot in slots {
            let Some(job) = slot.job.id().map(str::to_string) else {
                continue;
            };
            let ended = match states.get(&JobId(job.clone())) {
                Some(JobStatus::Known(st)) if st.is_finished() => Some(how_it_ended(st)),
                Some(JobStatus::NotFound) => Some("no longer listed".to_string()),
                _ => None,
            };
            let Some(how) = ended else { continue };
            let preempted = matches!(
                states.get(&JobId(job.clone())),
                Some(JobStatus::Known(JobState::Preempted))
            );
            let wait_s = self.cfg.report_wait_s;
            self.with_store(|s| {
                s.tx(|tx| job_ended(tx, &slot.id, &job, &how, preempted, now, wait_s))
            })?;
            changed = true;
        }
        if changed {
            self.bump();
        }
        Ok(())
    }
}

/// How the batch system says a job ended, for people: `completed`,
/// `failed: node2: exit code 4`, `timeout` ...
fn how_it_ended(st: &JobState) -> String {
    match st {
        JobState::Failed(why) => format!("failed: {why}"),
        JobState::Error(why) => format!("error: {why}"),
        JobState::Unknown(raw) => format!("in state {raw}"),
        JobState::NodeFail => "node failure".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Recovery at start: a slot with no batch job id was being submitted when the
/// previous coordinator died (create stores before it submits). Whether the
/// LRM got the job is unknown, so it is not submitted again: its workspace
/// fails (the client may ask again) and settles.
pub(super) fn fail_unsubmitted(store: &mut Store, now: u64) -> Result<(), EngineError> {
    store.tx(|tx| {
        for mut ws in store::active_workspaces(tx)? {
            let unsubmitted = store::slots_of(tx, &ws.id)?
                .iter()
                .any(|s| s.job == Job::Unsubmitted && !s.state.is_terminal());
            if unsubmitted && ws.state == protocol::view::WorkspaceState::Resuming {
                warn!(workspace_id = %ws.id, "coordinator stopped while submitting this workspace's new slots");
                super::suspend::recover_resume(tx, &mut ws, now)?;
            } else if unsubmitted {
                warn!(workspace_id = %ws.id, "coordinator stopped while submitting this workspace's pilot jobs");
                fail_workspace(tx, &mut ws, "the coordinator stopped while submitting the pilot jobs", now)?;
                end_slots(tx, &ws, now)?;
                maybe_settle(tx, &mut ws, now)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::how_it_ended;
    use lrm_adapters::JobState;

    #[test]
    fn a_job_end_is_said_in_words_with_what_the_batch_system_knows() {
        let failed = JobState::Failed("node2: exit code 4".into());
        assert_eq!(how_it_ended(&failed), "failed: node2: exit code 4");
        assert_eq!(how_it_ended(&JobState::Completed), "completed");
        assert_eq!(how_it_ended(&JobState::Timeout), "timeout");
        assert_eq!(how_it_ended(&JobState::NodeFail), "node failure");
        assert_eq!(how_it_ended(&JobState::Unknown("BF".into())), "in state BF");
    }
}
