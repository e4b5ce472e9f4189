//! Pool slots on the node: the reservation changes and the binding.
//!
//! A pilot started with `--pool` reserves its idle memory (possibly none)
//! and waits, `idle`; `bind` gives it a lease and the lease's memory,
//! `unbind` takes the lease's VMs off and brings the memory back to the
//! idle figure, `reserve` changes the reservation alone (any pilot). Every
//! change is the start's reservation again: under the node lock, read
//! dom0, move its target by the difference, verify the balloon got there,
//! put it back when it did not; refused with the figures when dom0 cannot
//! give it. The batch job never ends for any of it. Not the cleanup (run.rs)
//! nor the coordinator's pool policy.

use super::{hv_call, End, Pilot, Reservation, ReserveError};
use crate::hypervisor::set_dom0_target_and_wait;
use crate::state::{Input, NodeLock, PilotState, VmRecordState};
use protocol::pilot::{EventKind, ReservationChange, ReservationCommand};
use protocol::{VmId, WorkspaceId};
use std::time::Duration;
use tokio::time::Instant;

impl Pilot {
    /// Moves the slot's reservation from what it holds to `want_mb`: takes
    /// the difference from dom0 or gives it back, verified. On failure the
    /// reservation is what it was.
    pub(super) async fn resize(&mut self, want_mb: u64) -> Result<Reservation, ReserveError> {
        let have = self.record.reserved_mb;
        let (used, n) = self.memory_in_use();
        if want_mb < used {
            return Err(ReserveError::Refused(format!(
                "the slot's {n} VM(s) use {used} MB; it cannot hold less ({want_mb} MB asked)"
            )));
        }
        let timeout = self.cfg.balloon_timeout;
        let dir = self.cfg.state_dir.clone();
        let lock = tokio::task::spawn_blocking(move || NodeLock::acquire(&dir, timeout))
            .await
            .map_err(|e| ReserveError::Refused(format!("node lock: {e}")))?
            .map_err(|e| ReserveError::Refused(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let m = hv_call(&self.hv, deadline, "reading dom0 memory", |hv| {
            hv.dom0_memory()
        })
        .await
        .map_err(|e| ReserveError::Refused(e.to_string()))?;
        if self.record.original_dom0_mb == 0 {
            self.record.original_dom0_mb = m.current_mb;
        }
        if want_mb == have {
            return Ok(Reservation {
                before_mb: m.current_mb,
                after_mb: m.current_mb,
                balloon_ms: 0,
            });
        }
        if want_mb < have {
            drop(lock);
            let (after, ms) = self
                .give_back(
                    have - want_mb,
                    Instant::now() + timeout + Duration::from_secs(1),
                )
                .await
                .map_err(|reason| ReserveError::Balloon {
                    reason,
                    restored: false,
                })?;
            self.record.reserved_mb = want_mb;
            self.persist()
                .map_err(|e| ReserveError::Refused(e.to_string()))?;
            return Ok(Reservation {
                before_mb: m.current_mb,
                after_mb: after,
                balloon_ms: ms,
            });
        }
        let more = want_mb - have;
        let target = match m.current_mb.checked_sub(more) {
            Some(t) if t >= self.cfg.min_dom0_mb => t,
            _ if have == 0 => {
                return Err(ReserveError::Refused(format!(
                    "dom0 has {} MB; taking {more} MB would leave it below the minimum of {} MB",
                    m.current_mb, self.cfg.min_dom0_mb
                )))
            }
            _ => {
                return Err(ReserveError::Refused(format!(
                    "dom0 has {} MB; taking {more} MB more (this slot holds {have} MB, {want_mb} MB asked) \
                     would leave it below the minimum of {} MB",
                    m.current_mb, self.cfg.min_dom0_mb
                )))
            }
        };
        let took = m.target_mb.saturating_sub(target);
        self.record.taken_mb += took;
        self.record.target_dom0_mb = target;
        self.persist()
            .map_err(|e| ReserveError::Refused(e.to_string()))?;
        tracing::info!(
            dom0_mb = m.current_mb,
            target_mb = target,
            reserved_mb = want_mb,
            "ballooning dom0 down"
        );
        let r = hv_call(
            &self.hv,
            deadline + Duration::from_secs(1),
            "dom0 balloon",
            move |hv| set_dom0_target_and_wait(hv, target, timeout),
        )
        .await;
        drop(lock);
        match r {
            Ok(t) => {
                self.record.reserved_mb = want_mb;
                self.persist()
                    .map_err(|e| ReserveError::Refused(e.to_string()))?;
                Ok(Reservation {
                    before_mb: m.current_mb,
                    after_mb: target,
                    balloon_ms: t.as_millis() as u64,
                })
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(error = %reason, "balloon did not reach its target; giving memory back");
                let restored = self
                    .give_back(took, Instant::now() + timeout + Duration::from_secs(1))
                    .await
                    .is_ok();
                Err(ReserveError::Balloon { reason, restored })
            }
        }
    }

    fn change(&self, r: &Reservation) -> ReservationChange {
        ReservationChange {
            reserved_mb: self.record.reserved_mb,
            dom0_before_mb: r.before_mb,
            dom0_after_mb: r.after_mb,
            balloon_ms: r.balloon_ms,
            deadline_ms: self.deadline_ms,
        }
    }

    fn refuse(
        &mut self,
        command: ReservationCommand,
        workspace_id: Option<WorkspaceId>,
        reason: String,
        vms_left: Vec<VmId>,
    ) {
        tracing::warn!(command = ?command, reason = %reason, "reservation refused");
        self.push(EventKind::ReservationRefused {
            command,
            workspace_id,
            reason,
            reserved_mb: self.record.reserved_mb,
            bound_to: self.record.workspace_id.clone(),
            vms_left,
        });
    }

    /// `bind`: an idle pool slot takes lease `ws` and holds `memory_mb` for
    /// it; a slot already bound to `ws` only changes its reservation.
    pub(super) async fn bind(&mut self, ws: WorkspaceId, memory_mb: u64) -> Result<(), End> {
        let cmd = ReservationCommand::Bind;
        let why_not = if !self.cfg.pool {
            Some("this pilot is not a pool slot (started without --pool): it serves the lease it was started for".to_string())
        } else {
            match (self.record.state, &self.record.workspace_id) {
                (PilotState::Idle, None) => None,
                (PilotState::Reserved, Some(w)) if *w == ws => None,
                (PilotState::Reserved, Some(w)) => {
                    Some(format!("the slot serves {w}; unbind it first"))
                }
                (s, _) => Some(format!("slot is {s:?}; not binding").to_lowercase()),
            }
        };
        if let Some(reason) = why_not {
            self.refuse(cmd, Some(ws), reason, Vec::new());
            return Ok(());
        }
        self.advance(Input::Rebind).map_err(End::Fatal)?;
        match self.resize(memory_mb).await {
            Ok(r) => {
                self.record.workspace_id = Some(ws.clone());
                self.advance(Input::Rebound { bound: true })
                    .map_err(End::Fatal)?;
                tracing::info!(workspace_id = %ws, reserved_mb = self.record.reserved_mb, "slot bound");
                let reservation = self.change(&r);
                self.push(EventKind::Bound {
                    workspace_id: ws,
                    reservation,
                });
            }
            Err(e) => {
                let bound = self.record.workspace_id.is_some();
                self.advance(Input::Rebound { bound }).map_err(End::Fatal)?;
                self.refuse(cmd, Some(ws), e.reason(), Vec::new());
            }
        }
        Ok(())
    }

    /// `unbind`: the lease `ws` is over on this slot. Its VMs are destroyed
    /// (each reported), the slot holds `memory_mb` idle and waits.
    pub(super) async fn unbind(
        &mut self,
        ws: WorkspaceId,
        memory_mb: u64,
        deadline: Instant,
    ) -> Result<(), End> {
        let cmd = ReservationCommand::Unbind;
        let why_not = match (self.record.state, &self.record.workspace_id) {
            _ if !self.cfg.pool => Some(
                "this pilot is not a pool slot (started without --pool); release it instead"
                    .to_string(),
            ),
            (PilotState::Reserved, Some(w)) if *w == ws => None,
            (PilotState::Reserved, Some(w)) => Some(format!("the slot serves {w}, not {ws}")),
            (PilotState::Idle, _) => Some("the slot is idle already".to_string()),
            (s, _) => Some(format!("slot is {s:?}; not unbinding").to_lowercase()),
        };
        if let Some(reason) = why_not {
            self.refuse(cmd, Some(ws), reason, Vec::new());
            return Ok(());
        }
        self.advance(Input::Rebind).map_err(End::Fatal)?;
        let on: Vec<VmId> = self
            .record
            .vms
            .iter()
            .filter(|v| v.state.on_node())
            .map(|v| v.vm_id.clone())
            .collect();
        let mut destroyed = Vec::new();
        for vm_id in on {
            self.destroy_vm(vm_id.clone(), deadline).await?;
            if self
                .record
                .vms
                .iter()
                .any(|v| v.vm_id == vm_id && v.state == VmRecordState::Destroyed)
            {
                destroyed.push(vm_id);
            }
        }
        let left: Vec<VmId> = self
            .record
            .vms
            .iter()
            .filter(|v| v.state.on_node())
            .map(|v| v.vm_id.clone())
            .collect();
        if !left.is_empty() {
            self.advance(Input::Rebound { bound: true })
                .map_err(End::Fatal)?;
            let reason = format!(
                "{} VM(s) of {ws} could not be destroyed (see their vm_failed); the slot still serves it",
                left.len()
            );
            self.refuse(cmd, Some(ws), reason, left);
            return Ok(());
        }
        // The lease is gone from the slot: forget its VMs.
        self.record.workspace_id = None;
        self.record.vms.clear();
        self.launches.clear();
        self.persist().map_err(|e| End::Fatal(e.to_string()))?;
        let r = self.resize(memory_mb).await;
        self.advance(Input::Rebound { bound: false })
            .map_err(End::Fatal)?;
        tracing::info!(workspace_id = %ws, vms = destroyed.len(), reserved_mb = self.record.reserved_mb, "slot unbound");
        match r {
            Ok(r) => {
                let reservation = self.change(&r);
                self.push(EventKind::Unbound {
                    workspace_id: ws,
                    vms_destroyed: destroyed,
                    reservation,
                });
            }
            Err(e) => {
                // Unbound all the same, holding what it held.
                let dom0 = hv_call(
                    &self.hv,
                    Instant::now() + self.cfg.balloon_timeout,
                    "reading dom0 memory",
                    |hv| hv.dom0_memory(),
                )
                .await
                .map(|m| m.current_mb)
                .unwrap_or(self.record.target_dom0_mb);
                let held = Reservation {
                    before_mb: dom0,
                    after_mb: dom0,
                    balloon_ms: 0,
                };
                let reservation = self.change(&held);
                self.push(EventKind::Unbound {
                    workspace_id: ws.clone(),
                    vms_destroyed: destroyed,
                    reservation,
                });
                self.refuse(cmd, Some(ws), e.reason(), Vec::new());
            }
        }
        Ok(())
    }

    /// `reserve`: hold `memory_mb`, whatever the binding.
    pub(super) async fn reserve(&mut self, memory_mb: u64) -> Result<(), End> {
        let cmd = ReservationCommand::Reserve;
        let bound = match self.record.state {
            PilotState::Reserved => true,
            PilotState::Idle => false,
            s => {
                let reason = format!("slot is {s:?}; not changing the reservation").to_lowercase();
                self.refuse(cmd, None, reason, Vec::new());
                return Ok(());
            }
        };
        self.advance(Input::Rebind).map_err(End::Fatal)?;
        let r = self.resize(memory_mb).await;
        self.advance(Input::Rebound { bound }).map_err(End::Fatal)?;
        match r {
            Ok(r) => {
                tracing::info!(reserved_mb = self.record.reserved_mb, "reservation changed");
                let reservation = self.change(&r);
                self.push(EventKind::ReservationChanged {
                    workspace_id: self.record.workspace_id.clone(),
                    reservation,
                });
            }
            Err(e) => self.refuse(cmd, None, e.reason(), Vec::new()),
        }
        Ok(())
    }
}

impl ReserveError {
    /// The reason, saying when memory could not be put back.
    pub(super) fn reason(&self) -> String {
        match self {
            ReserveError::Refused(r) => r.clone(),
            ReserveError::Balloon {
                reason,
                restored: true,
            } => format!("{reason}; memory put back"),
            ReserveError::Balloon {
                reason,
                restored: false,
            } => format!("{reason}; memory NOT put back: run workspace-kill-all on this node"),
        }
    }
}
