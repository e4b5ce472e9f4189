//! Pilots in process: the typed entry for their events ([`Incoming`],
//! applied in group commits by [`Engine::apply_events`]), one handler per
//! event kind, and their commands as they would receive them
//! ([`Engine::pilot_commands`]).
//!
//! Every event is checked before it gets here (over HTTP by `signed`; the
//! simulator and the rule tests build them themselves), stored in the event
//! log, then applied in its own savepoint. Not here: signatures, the rules
//! shared with the other entries (`rules`).

use super::rules::{
    current_slots_reserved, end_slots, fail_workspace, maybe_settle, must_ws, needs_slot,
    slot_maybe_released, start_vms, transition, Setting, ADMINS_TOLD,
};
use super::{suspend, Engine, EngineError};
use crate::lifecycle::pilot as pilot_life;
use crate::lifecycle::slot as slot_life;
use crate::lifecycle::vm as vm_life;
use crate::lifecycle::{self, Input};
use crate::store::{self, SlotRow, StoreError, VmRow, WorkspaceRow};
use protocol::pilot::{Command, CommandKind, EventAck, EventKind, Peer, PilotEvent, ReleaseReason};
use protocol::view::{Phase, SlotState, VmState, WorkspaceState};
use protocol::{SlotId, VmId};
use rusqlite::Connection;
use std::collections::HashMap;
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

impl Incoming {
    /// An event made in process (the simulator, tests), received at
    /// `received_ms`; the event log keeps its JSON as the body.
    pub fn new(event: PilotEvent, received_ms: u64) -> Result<Self, EngineError> {
        let body = serde_json::to_string(&event)
            .map_err(|e| EngineError::BadRequest(format!("event does not encode: {e}")))?;
        Ok(Self {
            slot_id: event.slot_id.clone(),
            event,
            body,
            received_ms,
        })
    }
}

/// A pilot event cannot be older than its slot: the lower bound of a late
/// event's timestamp is the slot's creation, less `max_clock_skew_s`.
fn made_after_slot(slot: &SlotRow, ts_ms: u64, skew_s: u64) -> Result<(), EngineError> {
    if ts_ms < slot.created_ms.saturating_sub(skew_s * 1000) {
        return Err(EngineError::Forbidden(format!(
            "timestamp {ts_ms} is before slot {} was created ({} ms; max_clock_skew_s = {skew_s})",
            slot.id, slot.created_ms
        )));
    }
    Ok(())
}

impl Engine {
    /// The writer thread's turn: stores and applies a batch of checked events
    /// in one transaction (one savepoint each), commits, then tells watchers.
    /// One outcome per event, in order; an Ok event is committed.
    ///
    /// This is the typed entry for pilot events: the HTTP handlers reach it
    /// through the writer thread, the simulator and the rule tests call it
    /// directly.
    pub fn apply_events(&self, batch: &[Incoming]) -> Vec<Outcome> {
        let setting = Setting {
            images: &self.cfg.images,
            policy: self.policy.as_ref(),
            urgency: &self.cfg.urgency,
        };
        let stored = {
            let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
            guard.tx_each(batch, |tx, p| {
                let (slot_id, event) = (&p.slot_id, &p.event);
                let slot = store::get_slot(tx, slot_id)?
                    .ok_or_else(|| EngineError::Forbidden(format!("unknown slot {slot_id}")))?;
                if let Err(e) = made_after_slot(&slot, event.ts_ms, self.cfg.max_clock_skew_s) {
                    self.metrics.refused("stale");
                    return Err(e);
                }
                if !store::insert_pilot_event(tx, event, &p.body, p.received_ms)? {
                    return Err(EngineError::Duplicate {
                        pilot: event.pilot_id.to_string(),
                        seq: event.seq,
                    });
                }
                apply_event(tx, &slot, event, p.received_ms, &setting)?;
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

/// A stored value that does not read back.
fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

impl Engine {
    /// The commands for the pilot of (slot, node) after command `after`, as
    /// the pilot receives them over HTTP (`signed::poll_answer`; a test
    /// holds the two to it); the pilot counts as heard from. The in-process
    /// twin of the signed long-poll, without the wait.
    pub fn pilot_commands(
        &self,
        slot: &SlotId,
        node: &str,
        after: u64,
    ) -> Result<Vec<Command>, EngineError> {
        let polls = [(slot.clone(), node.to_string(), after)];
        Ok(self.pilot_commands_of(&polls)?.pop().unwrap_or_default())
    }

    /// [`Engine::pilot_commands`] for many pilots at once: one answer per
    /// (slot, node, after), in order. A workspace's peer list is read once
    /// for all the launches of the batch.
    pub fn pilot_commands_of(
        &self,
        polls: &[(SlotId, String, u64)],
    ) -> Result<Vec<Vec<Command>>, EngineError> {
        self.with_store(|s| {
            let c = s.conn();
            let now = self.clock.now_ms();
            let mut peers: HashMap<String, Vec<Peer>> = HashMap::new();
            let mut answers = Vec::with_capacity(polls.len());
            for (slot, node, after) in polls {
                store::seen_pilot(c, slot, node, now)?;
                let mut out = Vec::new();
                for (id, body) in store::commands_after(c, slot, node, *after)? {
                    let mut kind: CommandKind =
                        serde_json::from_str(&body).map_err(|e| corrupt("command", e))?;
                    // As `poll_answer` does on the wire: a launch stored
                    // without its workspace's peers gets them.
                    if let CommandKind::StartVm(l) = &mut kind {
                        if let Some(ctx) = l.context.as_mut().filter(|c| c.peers.is_empty()) {
                            if !peers.contains_key(&ctx.workspace_id) {
                                let ws = &ctx.workspace_id;
                                let stored = store::workspace_peers(c, ws)?.ok_or_else(|| {
                                    corrupt("peers", format!("none stored for workspace {ws}"))
                                })?;
                                let list = serde_json::from_str(&stored)
                                    .map_err(|e| corrupt("peers", e))?;
                                peers.insert(ws.clone(), list);
                            }
                            ctx.peers = peers[&ctx.workspace_id].clone();
                        }
                    }
                    out.push(Command { id, kind });
                }
                answers.push(out);
            }
            Ok(answers)
        })
    }

    /// The (slot, node) of every pilot with a command stored after row
    /// `after`, and the newest row: who has news since the last look.
    pub fn commanded_since(&self, after: i64) -> Result<(Vec<(SlotId, String)>, i64), EngineError> {
        self.with_store(|s| Ok(store::commanded_since(s.conn(), after)?))
    }
}

/// Applies one stored event: the pilot is seen, then its kind's handler runs.
pub(super) fn apply_event(
    c: &Connection,
    slot: &SlotRow,
    e: &PilotEvent,
    now: u64,
    setting: &Setting,
) -> Result<(), EngineError> {
    // An urgent VM on this (another lease's) slot reports to its own lease.
    let vm_event = match &e.kind {
        EventKind::VmStarted { vm_id, .. }
        | EventKind::VmFailed { vm_id, .. }
        | EventKind::VmDestroyed { vm_id, .. } => Some(vm_id),
        _ => None,
    };
    let urgent = match vm_event {
        Some(vm) => super::urgent::ws_of_vm_event(c, &slot.workspace_id, vm)?,
        None => None,
    };
    let ws = must_ws(c, urgent.as_ref().unwrap_or(&slot.workspace_id))?;
    store::touch_pilot(
        c,
        &slot.id,
        &e.node,
        e.pilot_id.as_str(),
        e.kind.name(),
        now,
    )?;
    let mut ev = Ev {
        c,
        slot,
        e,
        node: &e.node,
        now,
        ws,
    };
    match &e.kind {
        EventKind::Started {
            pid,
            hypervisor,
            job_id,
        } => on_started(&ev, *pid, hypervisor, job_id.as_deref()),
        EventKind::Reserved {
            dom0_before_mb,
            dom0_after_mb,
            reserved_mb,
            balloon_ms,
            cached_images,
            checkpoints,
            cpu_control,
            deadline_ms,
            ..
        } => {
            super::pool::on_reserved(c, slot, &e.node, *deadline_ms, now)?;
            let detail = format!(
                "dom0 {dom0_before_mb} -> {dom0_after_mb} MB ({reserved_mb} MB for VMs) in {balloon_ms} ms; coordinator notified after {} ms",
                now.saturating_sub(e.ts_ms)
            );
            if let Some(cap) = checkpoints {
                store::set_node_checkpoints(c, &slot.id, &e.node, cap)?;
            }
            // What the node could lend an urgent lease (engine::urgent).
            let cpu = cpu_control.as_ref().map(|k| {
                let how = k.reason.as_deref().unwrap_or(&k.mechanism);
                (k.available, how)
            });
            let cpu = cpu.unwrap_or((false, "the pilot reported no CPU control"));
            store::set_node_room(
                c,
                &slot.id,
                &e.node,
                Some(cpu),
                *dom0_after_mb,
                *reserved_mb,
            )?;
            on_reserved(&mut ev, &detail, cached_images, setting)
        }
        EventKind::ReserveFailed { reason } => on_reserve_failed(&mut ev, reason),
        EventKind::VmStarted {
            vm_id,
            name,
            create_ms,
            stage_ms,
            cache_hit,
            warm,
        } => {
            if let (Some(w), Some(vm)) = (warm, store::get_vm(c, vm_id)?) {
                if vm.slot_id == slot.id {
                    super::pool::on_warm_started(c, &ev.ws, &vm, &e.node, e.ts_ms, w, now)?;
                }
            }
            on_vm_started(&mut ev, vm_id, name, *create_ms, *stage_ms, *cache_hit)
        }
        EventKind::VmFailed { vm_id, reason } => on_vm_failed(&mut ev, vm_id, reason),
        EventKind::VmDestroyed { vm_id, destroy_ms } => on_vm_destroyed(&ev, vm_id, *destroy_ms),
        EventKind::Preempting {
            signal,
            coordinator_wait_ms,
            suspending,
            not_suspending,
            ..
        } => on_preempting(
            &mut ev,
            signal,
            *coordinator_wait_ms,
            suspending,
            not_suspending.as_deref(),
        ),
        EventKind::Released {
            reason,
            vms_destroyed,
            dom0_restored_mb,
            restore_ms,
            clean,
            problems,
            ..
        } => {
            let mut detail = format!(
                "dom0 back to {dom0_restored_mb} MB in {restore_ms} ms; {} VM(s) destroyed ({})",
                vms_destroyed.len(),
                format!("{reason:?}").to_lowercase()
            );
            if !clean {
                detail.push_str(&format!(
                    "; NOT CLEAN: {}; {ADMINS_TOLD}",
                    problems.join("; ")
                ));
                store::mark_pilot_unclean(c, &slot.id, &e.node)?;
                warn!(workspace_id = %ev.ws.id, slot_id = %slot.id, node = %e.node, "pilot released with problems: {problems:?}");
            }
            on_released(&mut ev, *reason, &detail, *clean, vms_destroyed)
        }
        // Suspend and resume: the rules are in `suspend`.
        EventKind::VmSuspended {
            vm_id,
            checkpoint,
            sha256,
            bytes,
            save_ms,
            total_ms,
            trigger,
            ..
        } => match ev.ws_vm(vm_id)? {
            Some(vm) => suspend::on_vm_suspended(
                c, &mut ev.ws, &vm, &e.node, checkpoint, sha256, *bytes, *save_ms, *total_ms,
                *trigger, now,
            ),
            None => Ok(()),
        },
        EventKind::VmSuspendFailed {
            vm_id,
            checkpoint,
            cause,
            reason,
            vm_running,
        } => match ev.ws_vm(vm_id)? {
            Some(vm) => {
                // A `suspend_vm` answered by a pilot that saves the VM on
                // its own warning: the answer crossed that save.
                let preempting = store::pilots_of(c, &slot.id)?
                    .iter()
                    .any(|p| p.node == e.node && p.state == pilot_life::PilotState::Preempting)
                    && store::commanded_suspend(c, &slot.id, &e.node, vm_id)?;
                suspend::on_vm_suspend_failed(
                    c,
                    &mut ev.ws,
                    &vm,
                    &e.node,
                    checkpoint,
                    *cause,
                    reason,
                    *vm_running,
                    preempting,
                    now,
                )
            }
            None => Ok(()),
        },
        EventKind::VmResumed {
            vm_id,
            checkpoint,
            bytes,
            restore_ms,
            total_ms,
            ..
        } => match ev.own_vm(vm_id)? {
            Some(vm) => suspend::on_vm_resumed(
                c,
                &mut ev.ws,
                &vm,
                &e.node,
                checkpoint,
                *bytes,
                *restore_ms,
                *total_ms,
                now,
            ),
            None => Ok(()),
        },
        EventKind::VmResumeFailed {
            vm_id,
            checkpoint,
            cause,
            reason,
        } => match ev.own_vm(vm_id)? {
            Some(vm) => suspend::on_vm_resume_failed(
                c, &mut ev.ws, &vm, &e.node, checkpoint, *cause, reason, now,
            ),
            None => Ok(()),
        },
        EventKind::CheckpointDeleted { checkpoint, bytes } => {
            suspend::on_checkpoint_deleted(c, &ev.ws.id, &e.node, checkpoint, *bytes, now)
        }
        EventKind::CheckpointDeleteFailed { checkpoint, reason } => {
            warn!(workspace_id = %ev.ws.id, node = %e.node, %checkpoint, reason, "checkpoint not deleted; the lease's end removes it");
            store::set_checkpoint(c, checkpoint, "kept", None, None, now)?;
            Ok(())
        }
        // Urgent leases sharing this node (engine::urgent).
        EventKind::ReservationChanged { reservation, .. } => super::urgent::on_reservation_changed(
            &ev.on_node(),
            reservation.dom0_after_mb,
            reservation.reserved_mb,
            setting,
        ),
        EventKind::ReservationRefused {
            command: protocol::pilot::ReservationCommand::Reserve,
            reason,
            ..
        } => super::urgent::on_reservation_refused(&ev.on_node(), reason),
        EventKind::VmCpuSet {
            vm_id,
            cpu,
            mechanism,
        } => super::urgent::on_cpu_set(&ev.on_node(), vm_id, cpu, mechanism, setting),
        EventKind::VmCpuSetFailed { vm_id, cpu, reason } => {
            super::urgent::on_cpu_set_failed(&ev.on_node(), vm_id, cpu, reason)
        }
        // Pool slots (engine::pool).
        EventKind::Bound {
            workspace_id,
            reservation,
        } => super::pool::on_bound(
            c,
            slot,
            &mut ev.ws,
            &e.node,
            e.ts_ms,
            workspace_id,
            reservation,
            now,
            setting,
        ),
        EventKind::Unbound {
            vms_destroyed,
            reservation,
            ..
        } => super::pool::on_unbound(
            c,
            slot,
            &mut ev.ws,
            &e.node,
            e.ts_ms,
            vms_destroyed,
            reservation,
            now,
        ),
        EventKind::ReservationRefused {
            command,
            reason,
            reserved_mb,
            ..
        } => super::pool::on_refused(
            c,
            slot,
            &mut ev.ws,
            &e.node,
            e.ts_ms,
            *command,
            reason,
            *reserved_mb,
            now,
        ),
        EventKind::WarmPrepared {
            checkpoint,
            sha256,
            bytes,
            boot_ms,
            save_ms,
            total_ms,
            ..
        } => super::pool::on_warm_answer(
            c,
            slot,
            &e.node,
            e.ts_ms,
            checkpoint,
            Some(sha256),
            &format!("{bytes} bytes; boot {boot_ms} ms, save {save_ms} ms, {total_ms} ms in all"),
            now,
        ),
        EventKind::WarmPrepareFailed { checkpoint, reason } => {
            super::pool::on_warm_answer(c, slot, &e.node, e.ts_ms, checkpoint, None, reason, now)
        }
    }
}

/// What every handler works on: one event of one pilot, inside its savepoint.
struct Ev<'a> {
    c: &'a Connection,
    slot: &'a SlotRow,
    e: &'a PilotEvent,
    node: &'a str,
    /// When the coordinator received the event.
    now: u64,
    ws: WorkspaceRow,
}

impl Ev<'_> {
    /// This event as the urgent-lease rules take it.
    fn on_node(&self) -> super::urgent::OnNode<'_> {
        super::urgent::OnNode {
            c: self.c,
            slot: &self.slot.id,
            node: self.node,
            host_ws: &self.ws.id,
            now: self.now,
        }
    }

    /// A timeline entry about this event (at the pilot's time, recorded now).
    fn timeline(&self, phase: Phase, vm: Option<&VmId>, detail: &str) -> Result<(), EngineError> {
        store::push_timeline(
            self.c,
            &self.ws.id,
            self.e.ts_ms,
            self.now,
            phase,
            Some(&self.slot.id),
            Some(self.node),
            vm,
            detail,
        )?;
        Ok(())
    }

    /// Moves this event's pilot through its table.
    fn pilot(&self, input: pilot_life::Input) -> Result<(), EngineError> {
        store::advance_pilot(self.c, &self.slot.id, self.node, input)?;
        Ok(())
    }

    /// Tells this pilot to release, unless it was told already.
    fn release(&self) -> Result<(), EngineError> {
        if !store::has_release(self.c, &self.slot.id, self.node)? {
            store::push_command(
                self.c,
                &self.slot.id,
                self.node,
                &CommandKind::Release,
                self.now,
            )?;
        }
        Ok(())
    }

    /// The VM if it belongs to this workspace and was last on this node: a
    /// save is reported by the pilot that held the VM, whose slot the VM
    /// may have left since (a resume moves it).
    fn ws_vm(&self, vm_id: &VmId) -> Result<Option<VmRow>, EngineError> {
        match store::get_vm(self.c, vm_id)? {
            Some(vm) if vm.workspace_id == self.ws.id => Ok(Some(vm)),
            _ => {
                warn!(slot_id = %self.slot.id, vm_id = %vm_id, "event names a VM of another workspace; ignored");
                Ok(None)
            }
        }
    }

    /// The VM if it belongs to this slot (events about other slots' VMs change nothing).
    fn own_vm(&self, vm_id: &VmId) -> Result<Option<VmRow>, EngineError> {
        match store::get_vm(self.c, vm_id)? {
            Some(vm) if vm.slot_id == self.slot.id => Ok(Some(vm)),
            _ => {
                warn!(slot_id = %self.slot.id, vm_id = %vm_id, "event names a VM that is not in this slot; ignored");
                Ok(None)
            }
        }
    }
}

/// The pilot is up: the slot is reserving; a pilot of a lease that is over
/// is told to release at once.
fn on_started(
    ev: &Ev,
    pid: u32,
    hypervisor: &str,
    job_id: Option<&str>,
) -> Result<(), EngineError> {
    ev.timeline(
        Phase::PilotStarted,
        None,
        &format!(
            "pid {pid}, hypervisor {hypervisor}, job {}",
            job_id.unwrap_or("?")
        ),
    )?;
    let started = slot_life::Input::PilotStarted;
    store::advance_slot_from(ev.c, &ev.slot.id, ev.slot.state, started)?;
    if !lifecycle::wants_slots(ev.ws.state) || left_behind(ev)? {
        ev.release()?;
    }
    Ok(())
}

/// True for a pilot of a slot its lease left while the lease goes on (no
/// VM of the lease is in it): a queued lease that moved onto idle pool
/// slots (`engine::pool`) left its batch slot with its job cancelled; a
/// pilot of that job that starts anyway (the cancel landed too late) is
/// told to release, and nothing it does changes the lease.
fn left_behind(ev: &Ev) -> Result<bool, EngineError> {
    Ok(lifecycle::wants_slots(ev.ws.state)
        && !super::pool::is_holder(&ev.ws)
        && !store::slot_has_vms(ev.c, &ev.slot.id)?)
}

/// The node's memory is the slot's: when every node of every slot holds
/// its memory, the workspace's VMs are mapped and started.
fn on_reserved(
    ev: &mut Ev,
    detail: &str,
    cached_images: &[String],
    setting: &Setting,
) -> Result<(), EngineError> {
    let (c, slot) = (ev.c, ev.slot);
    ev.pilot(pilot_life::Input::Reserved)?;
    store::set_node_images(c, &slot.id, ev.node, cached_images)?;
    ev.timeline(Phase::MemoryReserved, None, detail)?;
    if !lifecycle::wants_slots(ev.ws.state) {
        return ev.release();
    }
    if left_behind(ev)? {
        ev.timeline(
            Phase::SlotReleased,
            None,
            "this slot's batch job started before its cancel landed (the lease moved onto a pool slot): release sent",
        )?;
        return ev.release();
    }
    if store::count_reserved_pilots(c, &slot.id)? >= u64::from(slot.nodes) {
        let all = slot_life::Input::AllReserved;
        store::advance_slot_from(c, &slot.id, slot.state, all)?;
    }
    // Only the slots the VMs are in now count (those a resumed or moved
    // lease left are over).
    if current_slots_reserved(c, &ev.ws.id)?
        && matches!(
            ev.ws.state,
            WorkspaceState::Pending | WorkspaceState::Resuming
        )
        && super::pool::none_binding(c, &ev.ws.id)?
    {
        start_vms(c, &mut ev.ws, ev.now, setting)?;
    }
    Ok(())
}

/// The node could not give the slot its memory: the workspace fails, or,
/// while it resumes, the resume is called off with its checkpoints intact.
fn on_reserve_failed(ev: &mut Ev, reason: &str) -> Result<(), EngineError> {
    let (c, now) = (ev.c, ev.now);
    ev.pilot(pilot_life::Input::ReserveFailed)?;
    ev.timeline(Phase::ReserveFailed, None, reason)?;
    if left_behind(ev)? {
        // A slot the lease left: its node failing is no failure of the lease.
        slot_maybe_released(c, &ev.ws, &ev.slot.id, now)?;
        return maybe_settle(c, &mut ev.ws, now);
    }
    let why = format!(
        "node {} could not reserve {} MB: {reason}",
        ev.node, ev.slot.memory_mb
    );
    if ev.ws.state == WorkspaceState::Resuming {
        suspend::abort_resume(c, &mut ev.ws, &why, false, now)?;
    } else {
        fail_workspace(c, &mut ev.ws, &why, now)?;
    }
    slot_maybe_released(c, &ev.ws, &ev.slot.id, now)?;
    maybe_settle(c, &mut ev.ws, now)
}

/// A VM runs: when all do, the workspace is running and its lease starts.
fn on_vm_started(
    ev: &mut Ev,
    vm_id: &VmId,
    name: &str,
    create_ms: u64,
    stage_ms: Option<u64>,
    cache_hit: Option<bool>,
) -> Result<(), EngineError> {
    let Some(vm) = ev.own_vm(vm_id)? else {
        return Ok(());
    };
    let (c, now) = (ev.c, ev.now);
    if let Some(ms) = stage_ms {
        let how = match cache_hit {
            Some(true) => "already in the node cache",
            Some(false) => "fetched into the node cache",
            None => "staged",
        };
        ev.timeline(
            Phase::ImageStaged,
            Some(vm_id),
            &format!("image {} {how} in {ms} ms", vm.image),
        )?;
    }
    store::advance_vm_from(c, vm_id, vm.state, vm_life::Input::Started)?;
    ev.timeline(
        Phase::VmStarted,
        Some(vm_id),
        &format!("{name} created in {create_ms} ms"),
    )?;
    let (vm_count, running) = store::count_vms(c, &ev.ws.id, VmState::Running)?;
    if vm_count == running && transition(c, &mut ev.ws, Input::AllVmsRunning, None, now)? {
        let expires = super::reserve::lease_end(&ev.ws.spec, now);
        store::set_workspace_expiry(c, &ev.ws.id, expires)?;
        store::push_timeline(
            c,
            &ev.ws.id,
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
    Ok(())
}

/// A VM failed (to start, or to be destroyed): the workspace fails.
fn on_vm_failed(ev: &mut Ev, vm_id: &VmId, reason: &str) -> Result<(), EngineError> {
    if ev.own_vm(vm_id)?.is_none() {
        return Ok(());
    }
    store::advance_vm(ev.c, vm_id, vm_life::Input::Failed)?;
    ev.timeline(Phase::VmFailed, Some(vm_id), reason)?;
    let why = format!("VM {vm_id} on node {} failed to start: {reason}", ev.node);
    fail_workspace(ev.c, &mut ev.ws, &why, ev.now)?;
    super::urgent::vm_gone(ev.c, vm_id, ev.now)
}

/// A VM is gone (destroyed by itself, not with its slot).
fn on_vm_destroyed(ev: &Ev, vm_id: &VmId, destroy_ms: u64) -> Result<(), EngineError> {
    if ev.own_vm(vm_id)?.is_none() {
        return Ok(());
    }
    let gone = vm_life::Input::Gone {
        preempted: ev.ws.state == WorkspaceState::Preempted,
    };
    store::advance_vm(ev.c, vm_id, gone)?;
    ev.timeline(
        Phase::VmDestroyed,
        Some(vm_id),
        &format!("destroyed in {destroy_ms} ms"),
    )?;
    super::urgent::vm_gone(ev.c, vm_id, ev.now)
}

/// The batch system warned the pilot: the whole workspace is preempted
/// (ensembles are all or nothing) and every slot told to release.
fn on_preempting(
    ev: &mut Ev,
    signal: &str,
    coordinator_wait_ms: u64,
    suspending: &[VmId],
    not_suspending: Option<&str>,
) -> Result<(), EngineError> {
    let (c, now, node) = (ev.c, ev.now, ev.node);
    ev.pilot(pilot_life::Input::Preempting)?;
    let job = ev.slot.job.id().unwrap_or("?");
    if we_cancelled(ev.slot) {
        // Our own cancel reaching the pilot, not the batch system's choice.
        ev.timeline(
            Phase::Preempting,
            None,
            &format!("{signal} from our cancel of job {job}; pilot waits {coordinator_wait_ms} ms for us"),
        )?;
        return ev.release();
    }
    let saving = if suspending.is_empty() {
        String::new()
    } else {
        format!("; it saves {} VM(s)", suspending.len())
    };
    ev.timeline(
        Phase::Preempting,
        None,
        &format!("{signal} from the batch system (job {job}); pilot waits {coordinator_wait_ms} ms for us{saving}"),
    )?;
    let mut reason = format!("batch system preempted pilot job {job} on node {node} ({signal})");
    // A lease that suspends on preemption is the suspend rules' business.
    match suspend::on_preempting(c, &mut ev.ws, &reason, suspending, not_suspending, now)? {
        None => return Ok(()),
        Some(more) => reason.push_str(&more),
    }
    if transition(c, &mut ev.ws, Input::Preempted, Some(&reason), now)? {
        end_slots(c, &ev.ws, now)?;
    } else {
        ev.release()?;
    }
    Ok(())
}

/// True when the slot's batch job is being (or was) cancelled by us: a
/// signal its pilots get then is our cancel, not a preemption.
fn we_cancelled(slot: &SlotRow) -> bool {
    matches!(
        slot.job,
        slot_life::Job::CancelOwed(_) | slot_life::Job::Cancelled(_)
    )
}

/// The pilot gave its node back. If the lease still wanted it, the lease
/// cannot go on (the pilot reached its deadline, was preempted, or failed).
fn on_released(
    ev: &mut Ev,
    reason: ReleaseReason,
    detail: &str,
    clean: bool,
    vms_destroyed: &[VmId],
) -> Result<(), EngineError> {
    let (c, now, node) = (ev.c, ev.now, ev.node);
    let moved = store::advance_pilot(c, &ev.slot.id, node, pilot_life::Input::Released)?;
    let gone = vm_life::Input::Gone {
        preempted: ev.ws.state == WorkspaceState::Preempted
            || (reason == ReleaseReason::Preempted && !we_cancelled(ev.slot)),
    };
    let mut unsaved = Vec::new();
    for (vm, state) in store::live_vms_on(c, &ev.slot.id, node)? {
        if suspend::keeps(state) {
            continue; // left as a checkpoint
        }
        if state == VmState::Suspending {
            unsaved.push(vm.clone());
        }
        store::advance_vm_from(c, &vm, state, gone)?;
        if vms_destroyed.contains(&vm) {
            // Destroyed with its slot: on the timeline at the pilot's time.
            ev.timeline(Phase::VmDestroyed, Some(&vm), "destroyed with its slot")?;
        }
    }
    ev.timeline(Phase::MemoryRestored, None, detail)?;
    if moved.is_some() && ev.slot.state == SlotState::Unreported {
        // Too late to change the slot (it ended unreported, for good), not to
        // correct what we told the admin about this node.
        let verdict = if clean {
            format!("its node was left clean: no workspace-kill-all needed on {node}")
        } else {
            format!("its node was NOT left clean: {ADMINS_TOLD}")
        };
        store::push_timeline(
            c,
            &ev.ws.id,
            now,
            now,
            Phase::SlotReleased,
            Some(&ev.slot.id),
            Some(node),
            None,
            &format!(
                "late report from the pilot on {node} (made {}): {verdict}",
                protocol::time::format_ms(ev.e.ts_ms)
            ),
        )?;
    }
    let why = format!(
        "its pilot released it: {}",
        format!("{reason:?}").to_lowercase()
    );
    let how = super::urgent::HostEnd::Released(&why);
    super::urgent::host_ended(c, &ev.slot.id, node, how, now)?;
    suspend::after_release(c, &mut ev.ws, node, &unsaved, now)?;
    if needs_slot(c, &ev.ws, &ev.slot.id)? {
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
        if transition(c, &mut ev.ws, input, Some(&why), now)? {
            end_slots(c, &ev.ws, now)?;
        }
    }
    slot_maybe_released(c, &ev.ws, &ev.slot.id, now)?;
    maybe_settle(c, &mut ev.ws, now)
}
