//! Guaranteed leases: a reservation (VMs at a start time) or an immediate
//! lease (now) is accepted only when the batch system itself guarantees the
//! nodes, through its own advance reservation ([`lrm_adapters::reserve`]).
//! Otherwise it is refused with the batch system's reason and the earliest
//! start it could offer; it is never queued and never silently turned into a
//! best-effort lease.
//!
//! The batch system's reservation begins `[reservations] lead_s` before the
//! lease's start (the pilots boot, the images are staged: seed 002's
//! transfer overhead, scheduled before the start), and lasts the pilot
//! jobs' walltime plus the grace. The pilot jobs are submitted into it at
//! once; the batch system starts them when it begins. Its row in SQLite
//! (`lease_reservations`) survives restarts; the housekeeping tick deletes
//! the batch system's reservation once the workspace no longer wants its
//! slots (destroyed before its start, expired, failed), retrying until the
//! batch system agrees.
//!
//! Best-effort leases on the nodes a reservation needs are suspended for it
//! where the batch system can grant a reservation over their jobs (local,
//! Slurm); elsewhere the refusal says why they were not.

use super::rules::must_ws;
use super::{Engine, EngineError};
use crate::policy::SlotPlan;
use crate::store::{self, ReservationRow, ResvState, WorkspaceRow};
use lrm_adapters::reserve::{ReservationRequest, ReserveError};
use lrm_adapters::JobId;
use protocol::spec::{LeaseKind, PreemptChoice, SpecError, Start, WorkspaceSpec};
use protocol::time::format_ms;
use protocol::view::Phase;
use protocol::view::WorkspaceState;
use protocol::WorkspaceId;
use std::time::Duration;
use tracing::{info, warn};

/// A best-effort lease a reservation may take the nodes of.
type Victim = (WorkspaceId, Vec<JobId>, Vec<String>);

/// Why a guaranteed lease was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: LeaseKind,
    pub reason: String,
    /// The earliest start (ms) the batch system could guarantee, if it said.
    pub earliest_ms: Option<u64>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            LeaseKind::Immediate => "immediate lease",
            _ => "reservation",
        };
        write!(f, "{what} refused: {}", self.reason)?;
        match self.earliest_ms {
            Some(ms) => write!(
                f,
                "; the earliest start it can guarantee is {} (start = \"{}\")",
                format_ms(ms),
                Start::At(ms)
            ),
            None => write!(f, "; no earliest start could be found"),
        }
    }
}

/// The pilot jobs' extra run time before the lease's start (the lead).
pub(super) fn lead(row: Option<&ReservationRow>) -> Duration {
    Duration::from_millis(row.map_or(0, |r| r.start_ms.saturating_sub(r.begins_ms)))
}

/// When a lease that is running from `now` ends: a reservation at its start
/// plus its duration (early or late VMs do not move it), others `now` plus it.
pub(super) fn lease_end(spec: &WorkspaceSpec, now: u64) -> u64 {
    let d = spec.duration.0.as_millis() as u64;
    match spec.start {
        Some(Start::At(start)) => start.saturating_add(d),
        _ => now.saturating_add(d),
    }
}

impl Engine {
    /// For a guaranteed lease: checks its start (resolving `+2h`, and
    /// writing the absolute start into `spec`), asks the batch system for a
    /// reservation of every node the plans need, and returns its row (to
    /// be stored with the workspace). `None` for best effort. Nothing is
    /// held when this fails.
    pub(super) async fn admit(
        &self,
        id: &WorkspaceId,
        spec: &mut WorkspaceSpec,
        plans: &[SlotPlan],
    ) -> Result<Option<ReservationRow>, EngineError> {
        let kind = spec.lease_kind();
        if kind == LeaseKind::BestEffort {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let rc = &self.cfg.reservations;
        let start = match (kind, spec.start) {
            (LeaseKind::Reservation, Some(s)) => s
                .resolve(now, Duration::from_secs(rc.horizon_s))
                .map_err(|e| SpecError::Invalid {
                    field: "start".into(),
                    message: e.to_string(),
                })?,
            _ => now,
        };
        let Some(resv) = self.lrm.reservations() else {
            return Err(EngineError::Refused(Refusal {
                kind,
                reason: format!(
                    "the {} batch system adapter cannot make advance reservations, so nothing can be guaranteed (best-effort leases work)",
                    self.lrm.kind()
                ),
                earliest_ms: None,
            }));
        };
        let lead_ms = if kind == LeaseKind::Reservation {
            rc.lead_s * 1000
        } else {
            0
        };
        let begins = start.saturating_sub(lead_ms).max(now);
        let p = &self.cfg.pilot;
        let walltime = Duration::from_millis(start - begins)
            + spec.duration.0
            + Duration::from_secs(p.startup_slack_s + p.walltime_margin_s);
        let length = walltime + self.grace + Duration::from_secs(60);
        let req = ReservationRequest {
            name: format!("{}{id}", self.job_prefix()),
            start_ms: begins,
            duration: length,
            nodes: plans.iter().map(|p| p.nodes).sum(),
            cores_per_node: plans.iter().map(|p| p.cores_per_node).max().unwrap_or(1),
            memory_mb_per_node: plans
                .iter()
                .map(|p| p.memory_mb_per_node)
                .max()
                .unwrap_or(0),
            preemptible: Vec::new(),
        };
        let mut created = resv.create(&req).await;
        let mut victims = Vec::new();
        if let Err(ReserveError::Unavailable { reason, .. }) = &mut created {
            if kind == LeaseKind::Reservation
                && rc.suspend_best_effort
                && !resv.grants_over_preemptible()
            {
                // Say why suspendable leases did not help.
                let n = self.suspendable_at(begins)?.len();
                if n > 0 {
                    reason.push_str(&format!(
                        "; {n} running best-effort lease(s) could be suspended for it, but {}",
                        resv.why_not_over_preemptible()
                    ));
                }
            }
        }
        if matches!(created, Err(ReserveError::Unavailable { .. }))
            && kind == LeaseKind::Reservation
            && rc.suspend_best_effort
            && resv.grants_over_preemptible()
        {
            // The nodes may be had by suspending best-effort leases on them.
            let candidates = self.suspendable_at(begins)?;
            if !candidates.is_empty() {
                let mut again = req.clone();
                again.preemptible = candidates.iter().flat_map(|c| c.1.clone()).collect();
                if let Ok(r) = resv.create(&again).await {
                    victims = candidates
                        .into_iter()
                        .filter(|(_, _, nodes)| {
                            r.nodes.is_empty() || nodes.iter().any(|n| r.nodes.contains(n))
                        })
                        .map(|(id, _, _)| id)
                        .collect();
                    created = Ok(r);
                }
            }
        }
        let granted = match created {
            Ok(r) => r,
            Err(ReserveError::Unavailable {
                reason,
                earliest_ms,
            }) => {
                info!(workspace_id = %id, %kind, reason = %reason, "guaranteed lease refused");
                return Err(EngineError::Refused(Refusal {
                    kind,
                    reason: format!("{}: {reason}", self.lrm.kind()),
                    earliest_ms: earliest_ms.map(|e| e.saturating_add(start - begins)),
                }));
            }
            Err(ReserveError::Lrm(e)) => {
                return Err(EngineError::Refused(Refusal {
                    kind,
                    reason: format!("{}: {e}", self.lrm.kind()),
                    earliest_ms: None,
                }))
            }
        };
        if kind == LeaseKind::Reservation {
            spec.start = Some(Start::At(start));
        }
        info!(workspace_id = %id, %kind, reservation = %granted.id, begins_ms = granted.start_ms, start_ms = start, "batch system reservation granted");
        Ok(Some(ReservationRow {
            workspace_id: id.clone(),
            lrm: self.lrm.kind().to_string(),
            lrm_id: granted.id,
            start_ms: start.max(granted.start_ms),
            begins_ms: granted.start_ms,
            end_ms: granted.end_ms,
            state: ResvState::Held,
            victims,
        }))
    }

    /// Running best-effort leases that can be suspended and would still
    /// run at `at`: (workspace, its batch jobs, its nodes).
    fn suspendable_at(&self, at: u64) -> Result<Vec<Victim>, EngineError> {
        self.with_store(|s| {
            let c = s.conn();
            let mut out = Vec::new();
            for ws in store::list_workspaces(c, None)? {
                if ws.state != WorkspaceState::Running
                    || ws.spec.lease_kind() != LeaseKind::BestEffort
                    || ws.spec.on_preempt == Some(PreemptChoice::End)
                    || ws.expires_ms.is_some_and(|e| e <= at)
                {
                    continue;
                }
                let mut nodes = Vec::new();
                let mut savable = true;
                for v in store::vms_of(c, &ws.id)? {
                    let Some(node) = v.node else { continue };
                    savable &= store::node_save_rate(c, &v.slot_id, &node)?.is_some();
                    nodes.push(node);
                }
                if !savable {
                    continue;
                }
                let jobs = store::slots_of(c, &ws.id)?
                    .iter()
                    .filter_map(|s| s.job.id().map(|j| JobId(j.to_string())))
                    .collect();
                out.push((ws.id, jobs, nodes));
            }
            Ok(out)
        })
    }

    /// Suspends the best-effort leases a reservation takes the nodes of,
    /// `suspend_before_s` before it begins; they resume in new slots as
    /// soon as the batch system gives them (after the reservation, or on
    /// other nodes). A step of housekeeping.
    pub fn suspend_for_reservations(&self) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let by = now + self.cfg.reservations.suspend_before_s * 1000;
        let due = self.with_store(|s| Ok(store::victims_due(s.conn(), by)?))?;
        for row in due {
            let wants = self.with_store(|s| {
                Ok(crate::lifecycle::workspace::wants_slots(
                    must_ws(s.conn(), &row.workspace_id)?.state,
                ))
            })?;
            for v in row.victims.iter().filter(|_| wants) {
                let reason = format!(
                    "reservation {} ({} {}) begins at {}",
                    row.workspace_id,
                    row.lrm,
                    row.lrm_id,
                    format_ms(row.begins_ms)
                );
                let done = self.suspend_workspace(v, &reason, true);
                let detail = match &done {
                    Ok(()) => format!("best-effort workspace {v} suspended for this reservation"),
                    Err(e) => format!("best-effort workspace {v} not suspended: {e}"),
                };
                match &done {
                    Ok(()) => {
                        info!(workspace_id = %row.workspace_id, victim = %v, "best-effort lease suspended for a reservation")
                    }
                    Err(e) => {
                        warn!(workspace_id = %row.workspace_id, victim = %v, error = %e, "could not suspend a best-effort lease for a reservation")
                    }
                }
                self.with_store(|s| {
                    s.tx(|tx| {
                        store::push_timeline(
                            tx,
                            &row.workspace_id,
                            now,
                            now,
                            Phase::ReservationGranted,
                            None,
                            None,
                            None,
                            &detail,
                        )?;
                        Ok::<_, EngineError>(())
                    })
                })?;
            }
            self.with_store(|s| Ok(store::clear_victims(s.conn(), &row.workspace_id)?))?;
            self.bump();
        }
        Ok(())
    }

    /// Deletes a reservation whose workspace could not be stored.
    pub(super) async fn drop_unstored(&self, row: &ReservationRow) {
        if let Some(resv) = self.lrm.reservations() {
            if let Err(e) = resv.delete(&row.lrm_id).await {
                warn!(reservation = %row.lrm_id, error = %e, "could not delete the reservation of a lease that was not stored; an admin must");
            }
        }
    }

    /// Deletes the batch system's reservations of workspaces that no longer
    /// want their slots. A failure is retried by the next round.
    pub async fn release_reservations(&self) -> Result<(), EngineError> {
        let due = self.with_store(|s| Ok(store::reservations_to_release(s.conn())?))?;
        let Some(resv) = self.lrm.reservations() else {
            return Ok(());
        };
        for row in due {
            if let Err(e) = resv.delete(&row.lrm_id).await {
                warn!(workspace_id = %row.workspace_id, reservation = %row.lrm_id, error = %e, "deleting the batch system's reservation failed; will retry");
                continue;
            }
            let now = self.clock.now_ms();
            self.with_store(|s| {
                s.tx(|tx| {
                    if store::release_reservation(tx, &row.workspace_id, now)? {
                        store::push_timeline(
                            tx,
                            &row.workspace_id,
                            now,
                            now,
                            Phase::ReservationReleased,
                            None,
                            None,
                            None,
                            &format!("{} reservation {} deleted", row.lrm, row.lrm_id),
                        )?;
                    }
                    Ok::<_, EngineError>(())
                })
            })?;
            info!(workspace_id = %row.workspace_id, reservation = %row.lrm_id, "batch system reservation released");
            self.bump();
        }
        Ok(())
    }
}

/// The timeline line of a granted reservation.
pub(super) fn granted_detail(ws: &WorkspaceRow, row: &ReservationRow, nodes: u32) -> String {
    format!(
        "{} {} lease: {} reservation {} holds {nodes} node(s) from {} (start {}, staging lead {} s) to {}",
        ws.spec.lease_kind(),
        ws.name,
        row.lrm,
        row.lrm_id,
        format_ms(row.begins_ms),
        format_ms(row.start_ms),
        row.start_ms.saturating_sub(row.begins_ms) / 1000,
        format_ms(row.end_ms)
    )
}
