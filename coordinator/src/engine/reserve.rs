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
//! Not here: best-effort leases (the rest of the engine), suspending
//! best-effort leases for a reservation (issue 16's engine side, to come).

use super::{Engine, EngineError};
use crate::policy::SlotPlan;
use crate::store::{self, ReservationRow, ResvState, WorkspaceRow};
use lrm_adapters::reserve::{ReservationRequest, ReserveError};
use protocol::spec::{LeaseKind, SpecError, Start, WorkspaceSpec};
use protocol::time::format_ms;
use protocol::view::Phase;
use protocol::WorkspaceId;
use std::time::Duration;
use tracing::{info, warn};

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
        };
        let granted = match resv.create(&req).await {
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
        }))
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
