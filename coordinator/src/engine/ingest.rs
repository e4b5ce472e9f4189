//! Pilot events into the rules: the typed entry ([`Incoming`], applied in
//! group commits by [`Engine::apply_events`]) and one handler per event kind.
//!
//! Every event is checked before it gets here (over HTTP by `signed`; the
//! simulator builds them itself), stored in the event log, then applied in
//! its own savepoint. Not here: signatures, the rules shared with the other
//! entries (`rules`).

use super::rules::{
    end_slots, fail_workspace, maybe_settle, must_ws, slot_maybe_released, start_vms, transition,
};
use super::{Engine, EngineError};
use crate::lifecycle::{self, Input};
use crate::network::{self};
use crate::store::{self, SlotRow, StoreError, VmRow};
use protocol::pilot::{CommandKind, EventAck, EventKind, PilotEvent, ReleaseReason};
use protocol::view::{Phase, SlotState, VmState, WorkspaceState};
use protocol::{SlotId, VmId};
use rusqlite::Connection;
use tracing::{debug, warn};

/// One pilot event for the rules: already checked by whoever received it
/// (over HTTP: signature, JSON, slot, node name, clock; see `signed`).
pub struct Incoming {
    pub slot_id: SlotId,
    pub event: PilotEvent,
    /// The event as received (stored in the event log).
    pub body: String,
    /// When the coordinator received it (the `recorded_ms` of what it records).
    pub received_ms: u64,
}

/// What becomes of one event: acknowledged, or refused with the reason.
pub type Outcome = Result<EventAck, EngineError>;

impl Engine {
    /// The writer thread's turn: stores and applies a batch of checked events
    /// in one transaction (one savepoint each), commits, then tells watchers.
    /// One outcome per event, in order; an Ok event is committed.
    pub fn apply_events(&self, batch: &[Incoming]) -> Vec<Outcome> {
        let stored = {
            let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
            guard.tx_each(batch, |tx, p| {
                let (slot_id, event) = (&p.slot_id, &p.event);
                let slot = store::get_slot(tx, slot_id)?
                    .ok_or_else(|| EngineError::Forbidden(format!("unknown slot {slot_id}")))?;
                if !store::insert_pilot_event(tx, event, &p.body, p.received_ms)? {
                    return Err(EngineError::Duplicate {
                        pilot: event.pilot_id.to_string(),
                        seq: event.seq,
                    });
                }
                apply_event(tx, &slot, event, p.received_ms, &self.cfg.images)?;
                Ok(EventAck {
                    seq: event.seq,
                    duplicate: false,
                })
            })
        };
        let outcomes = match stored {
            Ok(outcomes) => outcomes,
            Err(e) => {
                warn!(events = batch.len(), error = %e, "group commit failed; nothing stored");
                let msg = e.to_string();
                return batch
                    .iter()
                    .map(|_| Err(StoreError::Batch(msg.clone()).into()))
                    .collect();
            }
        };
        let mut any = false;
        for (p, outcome) in batch.iter().zip(&outcomes) {
            if outcome.is_ok() {
                any = true;
                let e = &p.event;
                self.metrics.event(e.kind.name());
                debug!(slot_id = %e.slot_id, node = %e.node, seq = e.seq, kind = e.kind.name(), "pilot event stored");
            }
        }
        if any {
            self.bump();
            self.kick.notify_one();
        }
        outcomes
    }
}

pub(super) fn apply_event(
    c: &Connection,
    slot: &SlotRow,
    e: &PilotEvent,
    now: u64,
    images: &network::ImagesConfig,
) -> Result<(), EngineError> {
    let mut ws = must_ws(c, &slot.workspace_id)?;
    let node = e.node.as_str();
    store::touch_pilot(c, &slot.id, node, e.pilot_id.as_str(), e.kind.name(), now)?;
    let tl = |phase: Phase, vm: Option<&VmId>, detail: &str| {
        store::push_timeline(
            c,
            &ws.id,
            e.ts_ms,
            now,
            phase,
            Some(&slot.id),
            Some(node),
            vm,
            detail,
        )
    };
    match &e.kind {
        EventKind::Started {
            pid,
            hypervisor,
            job_id,
        } => {
            tl(
                Phase::PilotStarted,
                None,
                &format!(
                    "pid {pid}, hypervisor {hypervisor}, job {}",
                    job_id.as_deref().unwrap_or("?")
                ),
            )?;
            if slot.state == SlotState::Submitted {
                store::set_slot_state(c, &slot.id, SlotState::Reserving)?;
            }
            if !lifecycle::wants_slots(ws.state) && !store::has_release(c, &slot.id, node)? {
                store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
            }
        }
        EventKind::Reserved {
            dom0_before_mb,
            dom0_after_mb,
            reserved_mb,
            balloon_ms,
            cached_images,
        } => {
            store::set_pilot_flags(c, &slot.id, node, Some(true), None)?;
            store::set_node_images(c, &slot.id, node, cached_images)?;
            tl(
                Phase::MemoryReserved,
                None,
                &format!(
                    "dom0 {dom0_before_mb} -> {dom0_after_mb} MB ({reserved_mb} MB for VMs) in {balloon_ms} ms; coordinator notified after {} ms",
                    now.saturating_sub(e.ts_ms)
                ),
            )?;
            if !lifecycle::wants_slots(ws.state) {
                if !store::has_release(c, &slot.id, node)? {
                    store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
                }
                return Ok(());
            }
            let reserved = store::count_reserved_pilots(c, &slot.id)?;
            if reserved >= u64::from(slot.nodes)
                && matches!(slot.state, SlotState::Submitted | SlotState::Reserving)
            {
                store::set_slot_state(c, &slot.id, SlotState::Reserved)?;
            }
            let all = store::slots_of(c, &ws.id)?
                .iter()
                .all(|s| s.state == SlotState::Reserved);
            if all && ws.state == WorkspaceState::Pending {
                start_vms(c, &mut ws, now, images)?;
            }
        }
        EventKind::ReserveFailed { reason } => {
            store::set_pilot_flags(c, &slot.id, node, Some(false), Some(true))?;
            tl(Phase::ReserveFailed, None, reason)?;
            fail_workspace(
                c,
                &mut ws,
                &format!(
                    "node {node} could not reserve {} MB: {reason}",
                    slot.memory_mb
                ),
                now,
            )?;
            slot_maybe_released(c, &ws, &slot.id, now)?;
            maybe_settle(c, &mut ws, now)?;
        }
        EventKind::VmStarted {
            vm_id,
            name,
            create_ms,
            stage_ms,
            cache_hit,
        } => {
            let Some(vm) = own_vm(c, slot, vm_id)? else {
                return Ok(());
            };
            if let Some(ms) = stage_ms {
                let how = match cache_hit {
                    Some(true) => "already in the node cache",
                    Some(false) => "fetched into the node cache",
                    None => "staged",
                };
                tl(
                    Phase::ImageStaged,
                    Some(vm_id),
                    &format!("image {} {how} in {ms} ms", vm.image),
                )?;
            }
            if vm.state == VmState::Starting {
                store::set_vm_state(c, vm_id, VmState::Running)?;
            }
            tl(
                Phase::VmStarted,
                Some(vm_id),
                &format!("{name} created in {create_ms} ms"),
            )?;
            let (vm_count, running) = store::count_vms(c, &ws.id, VmState::Running)?;
            if vm_count == running && transition(c, &mut ws, Input::AllVmsRunning, None, now)? {
                let expires = now + ws.spec.duration.0.as_millis() as u64;
                store::set_workspace_expiry(c, &ws.id, expires)?;
                store::push_timeline(
                    c,
                    &ws.id,
                    now,
                    now,
                    Phase::Running,
                    None,
                    None,
                    None,
                    &format!(
                        "all {} VMs running; lease ends {}",
                        vm_count,
                        protocol::time::format_ms(expires)
                    ),
                )?;
            }
        }
        EventKind::VmFailed { vm_id, reason } => {
            let Some(_) = own_vm(c, slot, vm_id)? else {
                return Ok(());
            };
            store::set_vm_state(c, vm_id, VmState::Failed)?;
            tl(Phase::VmFailed, Some(vm_id), reason)?;
            fail_workspace(
                c,
                &mut ws,
                &format!("VM {vm_id} on node {node} failed to start: {reason}"),
                now,
            )?;
        }
        EventKind::VmDestroyed { vm_id, destroy_ms } => {
            let Some(_) = own_vm(c, slot, vm_id)? else {
                return Ok(());
            };
            let to = if ws.state == WorkspaceState::Preempted {
                VmState::Preempted
            } else {
                VmState::Destroyed
            };
            store::set_vm_state(c, vm_id, to)?;
            tl(
                Phase::VmDestroyed,
                Some(vm_id),
                &format!("destroyed in {destroy_ms} ms"),
            )?;
        }
        EventKind::Preempting {
            signal,
            coordinator_wait_ms,
            ..
        } => {
            let job = slot.job_id.as_deref().unwrap_or("?");
            tl(Phase::Preempting, None, &format!("{signal} from the batch system (job {job}); pilot waits {coordinator_wait_ms} ms for us"))?;
            let reason =
                format!("batch system preempted pilot job {job} on node {node} ({signal})");
            if transition(c, &mut ws, Input::Preempted, Some(&reason), now)? {
                end_slots(c, &ws, now)?;
            } else if !store::has_release(c, &slot.id, node)? {
                store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
            }
        }
        EventKind::Released {
            reason,
            vms_destroyed,
            dom0_restored_mb,
            restore_ms,
            clean,
            problems,
        } => {
            store::set_pilot_flags(c, &slot.id, node, None, Some(true))?;
            let mut detail = format!(
                "dom0 back to {dom0_restored_mb} MB in {restore_ms} ms; {} VM(s) destroyed ({})",
                vms_destroyed.len(),
                format!("{reason:?}").to_lowercase()
            );
            if !clean {
                detail.push_str(&format!(
                    "; NOT CLEAN: {}; run workspace-kill-all on {node}",
                    problems.join("; ")
                ));
                warn!(workspace_id = %ws.id, slot_id = %slot.id, node, "pilot released with problems: {problems:?}");
            }
            tl(Phase::MemoryRestored, None, &detail)?;
            let vm_final =
                if ws.state == WorkspaceState::Preempted || *reason == ReleaseReason::Preempted {
                    VmState::Preempted
                } else {
                    VmState::Destroyed
                };
            for vm in store::live_vms_on(c, &slot.id, node)? {
                store::set_vm_state(c, &vm, vm_final)?;
            }
            if lifecycle::wants_slots(ws.state) {
                // The pilot left on its own: the lease cannot go on.
                let (input, why) = match reason {
                    ReleaseReason::Deadline => (
                        Input::LeaseExpired,
                        format!("pilot on {node} reached the end of its slot"),
                    ),
                    ReleaseReason::Preempted => {
                        (Input::Preempted, format!("pilot on {node} was preempted"))
                    }
                    _ => (
                        Input::Failed,
                        format!("pilot on {node} released its slot ({reason:?})"),
                    ),
                };
                if transition(c, &mut ws, input, Some(&why), now)? {
                    end_slots(c, &ws, now)?;
                }
            }
            slot_maybe_released(c, &ws, &slot.id, now)?;
            maybe_settle(c, &mut ws, now)?;
        }
    }
    Ok(())
}

/// The VM if it belongs to this slot (events about other slots' VMs change nothing).
pub(super) fn own_vm(
    c: &Connection,
    slot: &SlotRow,
    vm_id: &VmId,
) -> Result<Option<VmRow>, EngineError> {
    match store::get_vm(c, vm_id)? {
        Some(vm) if vm.slot_id == slot.id => Ok(Some(vm)),
        _ => {
            warn!(slot_id = %slot.id, vm_id = %vm_id, "event names a VM that is not in this slot; ignored");
            Ok(None)
        }
    }
}
