//! Suspend and resume (issue 16, the coordinator's side): a workspace's VMs
//! leave their nodes as checkpoints and come back in new slots, all of them
//! or none (ensembles stay whole).
//!
//! `running -> suspending` when a pilot reports `preempting` with VMs it is
//! saving (and the lease chose suspend), when the client asks, or when
//! another rule calls [`suspend_in`] (reservations, urgency); every other VM
//! of the workspace gets `suspend_vm`. `suspending -> suspended` once every
//! VM is saved; the slots are given back and the lease's clock stops.
//! `suspended -> resuming` when new slots are asked for (at once after a
//! preemption, else on `workspace resume`); the VMs are restored in them
//! (`start_vm` with `restore`) and `resuming -> running` when all run.
//! A save that fails on preemption ends the workspace `preempted`, naming
//! the VM and why; a resume that cannot be had with the checkpoints intact
//! (a slot refused, a node short of memory) goes back to `suspended`; a
//! checkpoint that fails verification fails the workspace.
//!
//! Not here: the node's side (docs/CHECKPOINTS.md), the generic rules.

use super::rules::{end_slots, fail_workspace, maybe_settle, must_ws, transition, visible_ws};
use super::views::build_view;
use super::{Caller, Engine, EngineError};
use crate::lifecycle::vm as vm_life;
use crate::lifecycle::Input;
use crate::store::{self, SlotRow, Suspension, VmRow, WorkspaceRow};
use protocol::pilot::{
    CheckpointId, CommandKind, OnPreempt, RestoreFrom, ResumeFailure, SuspendFailure,
    SuspendTrigger,
};
use protocol::spec::PreemptChoice;
use protocol::view::{Phase, VmState, WorkspaceState, WorkspaceView};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use rusqlite::Connection;
use std::collections::HashMap;
use tracing::{info, warn};

/// Why a workspace is being suspended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The batch system warned a pilot (SIGTERM, SIGUSR2): resumed by itself.
    Preempted { reason: String },
    /// The client asked (`workspace suspend`): resumed when asked.
    Requested { by: String },
    /// Another rule of the coordinator (a reservation, an urgent lease).
    Policy { reason: String, auto_resume: bool },
}

impl Cause {
    fn name(&self) -> &'static str {
        match self {
            Cause::Preempted { .. } => "preempted",
            Cause::Requested { .. } => "requested",
            Cause::Policy { .. } => "policy",
        }
    }
    fn auto_resume(&self) -> bool {
        match self {
            Cause::Preempted { .. } => true,
            Cause::Requested { .. } => false,
            Cause::Policy { auto_resume, .. } => *auto_resume,
        }
    }
    fn detail(&self) -> String {
        match self {
            Cause::Preempted { reason } => reason.clone(),
            Cause::Requested { by } => format!("asked by {by}"),
            Cause::Policy { reason, .. } => reason.clone(),
        }
    }
}

/// Whether the lease's VMs are to be suspended on preemption: the spec's
/// `on_preempt`, else suspend when every node the VMs run on has a store.
fn wants_suspend(c: &Connection, ws: &WorkspaceRow, vms: &[VmRow]) -> Result<bool, EngineError> {
    Ok(match ws.spec.on_preempt {
        Some(PreemptChoice::Suspend) => true,
        Some(PreemptChoice::End) => false,
        None => all_have_store(c, vms)?,
    })
}

fn all_have_store(c: &Connection, vms: &[VmRow]) -> Result<bool, EngineError> {
    for v in vms {
        let Some(node) = &v.node else {
            return Ok(false);
        };
        if store::node_save_rate(c, &v.slot_id, node)?.is_none() {
            return Ok(false);
        }
    }
    Ok(!vms.is_empty())
}

/// The checkpoint a VM's next save goes to: a new generation each time.
fn next_checkpoint(
    c: &Connection,
    ws: &WorkspaceId,
    vm: &VmId,
) -> Result<CheckpointId, EngineError> {
    let generation = store::latest_checkpoint(c, vm)?.map_or(1, |k| k.generation + 1);
    Ok(CheckpointId {
        workspace_id: ws.clone(),
        vm_id: vm.clone(),
        generation,
    })
}

/// What a launch of `vm` on (slot, node) says to do on preemption: save to
/// its next checkpoint when the lease chose suspend (explicitly, or by
/// default when the node has a store).
pub(super) fn launch_on_preempt(
    c: &Connection,
    ws: &WorkspaceRow,
    vm: &VmId,
    slot: &SlotId,
    node: &str,
) -> Result<OnPreempt, EngineError> {
    let has_store = store::node_save_rate(c, slot, node)?.is_some();
    let suspend = match ws.spec.on_preempt {
        Some(PreemptChoice::End) => false,
        Some(PreemptChoice::Suspend) => true,
        None => has_store,
    };
    Ok(if suspend {
        OnPreempt::Suspend {
            to: next_checkpoint(c, &ws.id, vm)?,
        }
    } else {
        OnPreempt::End
    })
}

/// What a resume launch restores from: the VM's newest complete checkpoint.
pub(super) fn restore_from(c: &Connection, vm: &VmId) -> Result<Option<RestoreFrom>, EngineError> {
    Ok(store::kept_checkpoint(c, vm)?.and_then(|k| {
        let sha256 = k.sha256.clone()?;
        Some(RestoreFrom {
            checkpoint: k.id(),
            sha256,
            warm: false,
        })
    }))
}

#[allow(clippy::too_many_arguments)]
fn timeline(
    c: &Connection,
    ws: &WorkspaceId,
    now: u64,
    phase: Phase,
    slot: Option<&SlotId>,
    node: Option<&str>,
    vm: Option<&VmId>,
    detail: &str,
) -> Result<(), EngineError> {
    store::push_timeline(c, ws, now, now, phase, slot, node, vm, detail)?;
    Ok(())
}

/// Suspends a running workspace, inside the caller's transaction: the lease
/// clock stops, every running VM is saved (`already_saving` are those a
/// preempted pilot saves by itself; the others get `suspend_vm`). Refused
/// (`Conflict`) unless the workspace runs and every node holding one of its
/// VMs has a checkpoint store. Other rules (reservations, urgency) call this.
pub fn suspend_in(
    c: &Connection,
    ws: &mut WorkspaceRow,
    cause: Cause,
    already_saving: &[VmId],
    now: u64,
) -> Result<(), EngineError> {
    if ws.state != WorkspaceState::Running {
        return Err(EngineError::Conflict(format!(
            "workspace {} is {}: only a running workspace can be suspended",
            ws.id, ws.state
        )));
    }
    let vms: Vec<VmRow> = store::vms_of(c, &ws.id)?
        .into_iter()
        .filter(|v| v.state == VmState::Running)
        .collect();
    for v in &vms {
        let node = v.node.as_deref().unwrap_or("?");
        if store::node_save_rate(c, &v.slot_id, node)?.is_none() {
            return Err(EngineError::Conflict(format!(
                "workspace {} cannot be suspended: node {node} (VM {}) has no checkpoint store ([checkpoints] dir in its node config)",
                ws.id, v.id
            )));
        }
    }
    let left = ws.expires_ms.map_or(0, |e| e.saturating_sub(now));
    let before = store::get_suspension(c, &ws.id)?.map_or(0, |s| s.suspended_ms);
    transition(c, ws, Input::SuspendStarted, None, now)?;
    store::set_suspension(
        c,
        &ws.id,
        &Suspension {
            lease_left_ms: left,
            auto_resume: cause.auto_resume(),
            cause: cause.name().into(),
            since_ms: now,
            suspended_ms: before,
        },
    )?;
    store::clear_workspace_expiry(c, &ws.id)?;
    let memory: u64 = vms.iter().map(|v| v.memory_mb).sum();
    timeline(
        c,
        &ws.id,
        now,
        Phase::Suspending,
        None,
        None,
        None,
        &format!(
            "{}: saving {} VM(s), {memory} MB; {} s of the lease left",
            cause.detail(),
            vms.len(),
            left / 1000
        ),
    )?;
    info!(workspace_id = %ws.id, cause = cause.name(), vms = vms.len(), "suspending");
    for v in &vms {
        let node = v.node.clone().unwrap_or_default();
        let to = next_checkpoint(c, &ws.id, &v.id)?;
        store::insert_checkpoint(c, &to, &node, now)?;
        store::set_checkpoint(c, &to, "saving", None, None, now)?;
        store::advance_vm_from(c, &v.id, v.state, vm_life::Input::SaveStarted)?;
        if already_saving.contains(&v.id) {
            continue;
        }
        let holds = store::pilots_of(c, &v.slot_id)?
            .iter()
            .any(|p| p.node == node && p.state == crate::lifecycle::pilot::PilotState::Reserved);
        if holds {
            let cmd = CommandKind::SuspendVm {
                vm_id: v.id.clone(),
                to,
            };
            store::push_command(c, &v.slot_id, &node, &cmd, now)?;
        }
    }
    Ok(())
}

/// A pilot reports `preempting`. Returns `None` when this module took care
/// of it, else the words to add to the preemption's reason (why the VMs were
/// not suspended), and the generic rule ends the workspace `preempted`.
pub(super) fn on_preempting(
    c: &Connection,
    ws: &mut WorkspaceRow,
    reason: &str,
    suspending: &[VmId],
    not_suspending: Option<&str>,
    now: u64,
) -> Result<Option<String>, EngineError> {
    let vms = store::vms_of(c, &ws.id)?;
    match ws.state {
        WorkspaceState::Running => {
            if let Some(why) = not_suspending {
                return Ok(Some(format!("; not suspended: {why}")));
            }
            if suspending.is_empty() || !wants_suspend(c, ws, &vms)? {
                return Ok(Some(String::new()));
            }
            let cause = Cause::Preempted {
                reason: reason.to_string(),
            };
            match suspend_in(c, ws, cause, suspending, now) {
                Ok(()) => Ok(None),
                Err(EngineError::Conflict(why)) => Ok(Some(format!("; not suspended: {why}"))),
                Err(e) => Err(e),
            }
        }
        // One more member preempted: its VMs are being saved already.
        WorkspaceState::Suspending => match not_suspending {
            Some(why) => Ok(Some(format!("; not suspended: {why}"))),
            None => Ok(None),
        },
        // Preempted before the ensemble ran again: the checkpoints are
        // intact, so it goes back to suspended and resumes elsewhere.
        WorkspaceState::Resuming => {
            abort_resume(c, ws, &format!("{reason} while resuming"), true, now)?;
            Ok(None)
        }
        _ => Ok(Some(String::new())),
    }
}

/// A VM was saved and left its node.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_vm_suspended(
    c: &Connection,
    ws: &mut WorkspaceRow,
    vm: &VmRow,
    node: &str,
    checkpoint: &CheckpointId,
    sha256: &str,
    bytes: u64,
    save_ms: u64,
    total_ms: u64,
    trigger: SuspendTrigger,
    now: u64,
) -> Result<(), EngineError> {
    if vm.state != VmState::Suspending || ws.state != WorkspaceState::Suspending {
        // Saved by a pilot whose lease had moved on (e.g. a resume called
        // off): kept aside, removed with the workspace's other checkpoints.
        store::set_checkpoint(c, checkpoint, "stray", Some(sha256), Some(bytes), now)?;
        warn!(workspace_id = %ws.id, vm_id = %vm.id, %checkpoint, "a save nobody waited for; kept aside");
        return Ok(());
    }
    store::set_checkpoint(c, checkpoint, "kept", Some(sha256), Some(bytes), now)?;
    store::advance_vm_from(c, &vm.id, vm.state, vm_life::Input::Saved)?;
    store::end_placement(c, &vm.id, now)?;
    let how = match trigger {
        SuspendTrigger::Commanded => "told to",
        SuspendTrigger::Preempted => "on the batch system's warning",
    };
    timeline(
        c,
        &ws.id,
        now,
        Phase::VmSuspended,
        Some(&vm.slot_id),
        Some(node),
        Some(&vm.id),
        &format!(
            "saved to {checkpoint} ({how}): {} in {save_ms} ms ({total_ms} ms in all, {} MB of memory)",
            bytes_text(bytes),
            vm.memory_mb
        ),
    )?;
    maybe_all_saved(c, ws, now)
}

/// When every VM is saved: `suspended`, every slot given back.
fn maybe_all_saved(c: &Connection, ws: &mut WorkspaceRow, now: u64) -> Result<(), EngineError> {
    let vms = store::vms_of(c, &ws.id)?;
    if vms.iter().any(|v| v.state != VmState::Suspended) {
        return Ok(());
    }
    let since = store::get_suspension(c, &ws.id)?.map_or(now, |s| s.since_ms);
    let bytes: u64 = vms
        .iter()
        .filter_map(|v| store::kept_checkpoint(c, &v.id).ok().flatten())
        .filter_map(|k| k.bytes)
        .sum();
    transition(c, ws, Input::AllSaved, None, now)?;
    timeline(
        c,
        &ws.id,
        now,
        Phase::Suspended,
        None,
        None,
        None,
        &format!(
            "all {} VM(s) saved, {} in {} ms; the slots are given back",
            vms.len(),
            bytes_text(bytes),
            now.saturating_sub(since)
        ),
    )?;
    info!(workspace_id = %ws.id, "suspended");
    end_slots(c, ws, now)?;
    maybe_settle(c, ws, now)
}

/// A VM could not be saved.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_vm_suspend_failed(
    c: &Connection,
    ws: &mut WorkspaceRow,
    vm: &VmRow,
    node: &str,
    checkpoint: &CheckpointId,
    cause: SuspendFailure,
    reason: &str,
    vm_running: bool,
    crossed: bool,
    now: u64,
) -> Result<(), EngineError> {
    if vm.state != VmState::Suspending {
        return Ok(()); // late or repeated (e.g. saved already on the warning)
    }
    if cause == SuspendFailure::NoSuchVm && !vm_running && crossed {
        // A `suspend_vm` that crossed the pilot's own save on the warning:
        // that save reports for itself (and a release without it ends the
        // workspace, see `after_release`).
        return Ok(());
    }
    store::set_checkpoint(c, checkpoint, "failed", None, None, now)?;
    timeline(
        c,
        &ws.id,
        now,
        Phase::SuspendFailed,
        Some(&vm.slot_id),
        Some(node),
        Some(&vm.id),
        &format!("{cause:?}: {reason}").to_lowercase(),
    )?;
    let why = format!("VM {} on node {node} was not saved: {reason}", vm.id);
    if vm_running {
        // A commanded save failed and the VM runs on; the members already
        // saved left their nodes, so the ensemble cannot go on as one.
        store::advance_vm_from(c, &vm.id, vm.state, vm_life::Input::SaveFailedRunning)?;
        return fail_workspace(c, ws, &format!("suspend failed: {why}"), now);
    }
    store::advance_vm_from(
        c,
        &vm.id,
        vm.state,
        vm_life::Input::Gone { preempted: true },
    )?;
    let reason = match store::get_suspension(c, &ws.id)? {
        Some(s) if s.cause == "preempted" => format!("preempted; {why}"),
        _ => format!("suspend failed; {why}"),
    };
    if transition(c, ws, Input::Preempted, Some(&reason), now)? {
        end_slots(c, ws, now)?;
    }
    Ok(())
}

/// After a pilot released its node: a VM still being saved there was never
/// reported saved, so the workspace cannot be suspended whole.
pub(super) fn after_release(
    c: &Connection,
    ws: &mut WorkspaceRow,
    node: &str,
    lost: &[VmId],
    now: u64,
) -> Result<(), EngineError> {
    if ws.state != WorkspaceState::Suspending || lost.is_empty() {
        return Ok(());
    }
    let reason = format!(
        "preempted; VM {} on node {node} was not saved: its pilot released the node without reporting the save",
        lost[0]
    );
    if transition(c, ws, Input::Preempted, Some(&reason), now)? {
        end_slots(c, ws, now)?;
    }
    Ok(())
}

/// A slot whose pilots never reported after its job ended (a pilot
/// SIGKILLed, its node lost): a VM it was saving was never reported saved,
/// so the workspace cannot be suspended whole. Its save is lost; the VM is
/// `unknown` (its guest may be left stopped on the node, for kill-all), and
/// the workspace ends as a save that failed does: `preempted` when the
/// batch system had warned it, else `failed`. Returns whether it ended.
pub(super) fn after_unreported(
    c: &Connection,
    ws: &mut WorkspaceRow,
    slot: &SlotId,
    nodes: &[String],
    job: &str,
    now: u64,
) -> Result<bool, EngineError> {
    if ws.state != WorkspaceState::Suspending {
        return Ok(false);
    }
    let mut lost = Vec::new();
    for node in nodes {
        for (vm, state) in store::live_vms_on(c, slot, node)? {
            if state == VmState::Suspending {
                store::advance_vm_from(c, &vm, state, vm_life::Input::PilotLost)?;
                if let Some(k) = store::latest_checkpoint(c, &vm)? {
                    store::set_checkpoint(c, &k.id(), "failed", None, None, now)?;
                }
                lost.push((vm, node.clone()));
            }
        }
    }
    let Some((vm, node)) = lost.first() else {
        return Ok(false);
    };
    let why = format!(
        "VM {vm} on node {node} was not saved: batch job {job} ended and its pilot never reported the save"
    );
    let (input, reason) = match store::get_suspension(c, &ws.id)? {
        Some(s) if s.cause == "preempted" => (Input::Preempted, format!("preempted; {why}")),
        _ => (Input::Failed, format!("suspend failed: {why}")),
    };
    timeline(
        c,
        &ws.id,
        now,
        Phase::SuspendFailed,
        Some(slot),
        Some(node),
        Some(vm),
        &why,
    )?;
    warn!(workspace_id = %ws.id, vm_id = %vm, node, job, "a save was lost with its pilot");
    if transition(c, ws, input, Some(&reason), now)? {
        end_slots(c, ws, now)?;
    }
    Ok(true)
}

/// A VM runs again from its checkpoint.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_vm_resumed(
    c: &Connection,
    ws: &mut WorkspaceRow,
    vm: &VmRow,
    node: &str,
    checkpoint: &CheckpointId,
    bytes: u64,
    restore_ms: u64,
    total_ms: u64,
    now: u64,
) -> Result<(), EngineError> {
    if vm.state != VmState::Resuming {
        return Ok(());
    }
    store::advance_vm_from(c, &vm.id, vm.state, vm_life::Input::Restored)?;
    timeline(
        c,
        &ws.id,
        now,
        Phase::VmResumed,
        Some(&vm.slot_id),
        Some(node),
        Some(&vm.id),
        &format!(
            "restored from {checkpoint}: {} in {restore_ms} ms ({total_ms} ms in all)",
            bytes_text(bytes)
        ),
    )?;
    let vms = store::vms_of(c, &ws.id)?;
    if ws.state != WorkspaceState::Resuming || vms.iter().any(|v| v.state != VmState::Running) {
        return Ok(());
    }
    let s = store::get_suspension(c, &ws.id)?;
    let left = s
        .as_ref()
        .map_or(ws.spec.duration.0.as_millis() as u64, |s| s.lease_left_ms);
    transition(c, ws, Input::AllVmsRunning, None, now)?;
    let expires = now + left;
    store::set_workspace_expiry(c, &ws.id, expires)?;
    ws.expires_ms = Some(expires);
    if let Some(mut s) = s {
        s.suspended_ms += now.saturating_sub(s.since_ms);
        s.auto_resume = false;
        store::set_suspension(c, &ws.id, &s)?;
    }
    timeline(
        c,
        &ws.id,
        now,
        Phase::Running,
        None,
        None,
        None,
        &format!(
            "all {} VMs running again; lease ends {} (suspended time not charged)",
            vms.len(),
            protocol::time::format_ms(expires)
        ),
    )?;
    info!(workspace_id = %ws.id, "resumed");
    // The checkpoints resumed from are no longer needed: the VMs ran on.
    for v in &vms {
        for k in store::checkpoints_of(c, &ws.id, "kept")? {
            if k.vm_id != v.id {
                continue;
            }
            if let Some(node) = &v.node {
                let cmd = CommandKind::DeleteCheckpoint { checkpoint: k.id() };
                store::push_command(c, &v.slot_id, node, &cmd, now)?;
                store::set_checkpoint(c, &k.id(), "deleting", None, None, now)?;
            }
        }
    }
    Ok(())
}

/// A VM could not be restored. A checkpoint that is damaged or missing
/// fails the workspace; anything else (memory, the node) leaves the
/// checkpoints as they were and the workspace suspended again.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_vm_resume_failed(
    c: &Connection,
    ws: &mut WorkspaceRow,
    vm: &VmRow,
    node: &str,
    checkpoint: &CheckpointId,
    cause: ResumeFailure,
    reason: &str,
    now: u64,
) -> Result<(), EngineError> {
    if vm.state != VmState::Resuming {
        return Ok(());
    }
    timeline(
        c,
        &ws.id,
        now,
        Phase::ResumeFailed,
        Some(&vm.slot_id),
        Some(node),
        Some(&vm.id),
        &format!("{cause:?}: {reason}").to_lowercase(),
    )?;
    let why = format!(
        "VM {} could not be resumed on node {node} from {checkpoint}: {reason}",
        vm.id
    );
    match cause {
        ResumeFailure::ChecksumMismatch
        | ResumeFailure::Incomplete
        | ResumeFailure::NotFound
        | ResumeFailure::Incompatible => {
            store::advance_vm_from(c, &vm.id, vm.state, vm_life::Input::Failed)?;
            fail_workspace(c, ws, &why, now)
        }
        _ => abort_resume(c, ws, &why, false, now),
    }
}

/// A resume given up with the checkpoints intact: the new slots are given
/// back (what was restored in them is destroyed: the checkpoints are still
/// the VMs' state) and the workspace is suspended again; `auto_resume`
/// asks for new slots again, else it waits for `workspace resume`.
pub(super) fn abort_resume(
    c: &Connection,
    ws: &mut WorkspaceRow,
    why: &str,
    auto_resume: bool,
    now: u64,
) -> Result<(), EngineError> {
    if !transition(c, ws, Input::ResumeAborted, Some(why), now)? {
        return Ok(());
    }
    warn!(workspace_id = %ws.id, why, "resume called off; suspended again");
    for v in store::vms_of(c, &ws.id)? {
        if matches!(v.state, VmState::Resuming | VmState::Running) {
            store::advance_vm_from(c, &v.id, v.state, vm_life::Input::RestoreAborted)?;
            store::end_placement(c, &v.id, now)?;
        }
    }
    if let Some(mut s) = store::get_suspension(c, &ws.id)? {
        s.auto_resume = auto_resume;
        store::set_suspension(c, &ws.id, &s)?;
    }
    let next = if auto_resume {
        "new slots are asked for again"
    } else {
        "`workspace resume` tries again"
    };
    timeline(
        c,
        &ws.id,
        now,
        Phase::ResumeFailed,
        None,
        None,
        None,
        &format!("{why}; suspended again, checkpoints kept; {next}"),
    )?;
    end_slots(c, ws, now)?;
    maybe_settle(c, ws, now)
}

/// `checkpoint_deleted`: the store no longer holds it.
pub(super) fn on_checkpoint_deleted(
    c: &Connection,
    ws: &WorkspaceId,
    node: &str,
    checkpoint: &CheckpointId,
    bytes: u64,
    now: u64,
) -> Result<(), EngineError> {
    store::set_checkpoint(c, checkpoint, "deleted", None, None, now)?;
    timeline(
        c,
        ws,
        now,
        Phase::CheckpointDeleted,
        None,
        Some(node),
        Some(&checkpoint.vm_id),
        &format!("{checkpoint}: {} freed", bytes_text(bytes)),
    )
}

/// Moves the workspace's VMs to new slots, one per group, as `create` sizes
/// them; the slots are stored unsubmitted (a coordinator dying before the
/// submit is answered leaves them for recovery, which calls the resume off).
fn plan_new_slots(
    c: &Connection,
    ws: &WorkspaceRow,
    plans: &[crate::policy::SlotPlan],
    now: u64,
) -> Result<Vec<SlotRow>, EngineError> {
    let mut slots = Vec::new();
    let mut by_group: HashMap<String, SlotId> = HashMap::new();
    for plan in plans {
        let slot = super::client::insert_new_slot(c, &ws.id, plan, now)?;
        by_group.insert(plan.group.clone(), slot.id.clone());
        slots.push(slot);
    }
    for v in store::vms_of(c, &ws.id)? {
        if let Some(slot) = by_group.get(&v.group) {
            let name = VmName::new(slot.clone(), v.id.clone()).to_string();
            store::move_vm_to_slot(c, &v.id, slot, &name)?;
        }
    }
    Ok(slots)
}

fn bytes_text(bytes: u64) -> String {
    if bytes >= 10 * 1024 * 1024 {
        format!("{} MB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

impl Engine {
    /// `workspace suspend ID`: saves every VM of a running workspace; it
    /// stays suspended (holding no slot, its lease clock stopped) until
    /// `workspace resume`.
    pub fn suspend(&self, caller: &Caller, id: &WorkspaceId) -> Result<WorkspaceView, EngineError> {
        let now = self.clock.now_ms();
        let view = self.with_store(|s| {
            s.tx(|tx| {
                let mut ws = visible_ws(tx, caller, id)?;
                let cause = Cause::Requested {
                    by: caller.user.clone(),
                };
                suspend_in(tx, &mut ws, cause, &[], now)?;
                build_view(tx, ws)
            })
        })?;
        info!(workspace_id = %id, user = %caller.user, "suspend requested");
        self.bump();
        self.kick.notify_one();
        Ok(view)
    }

    /// For other rules and policies: suspends a running workspace (see
    /// [`suspend_in`]); `auto_resume` asks for new slots as soon as it is
    /// saved, else it waits for a resume.
    pub fn suspend_workspace(
        &self,
        id: &WorkspaceId,
        reason: &str,
        auto_resume: bool,
    ) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        self.with_store(|s| {
            s.tx(|tx| {
                let mut ws = must_ws(tx, id)?;
                let cause = Cause::Policy {
                    reason: reason.to_string(),
                    auto_resume,
                };
                suspend_in(tx, &mut ws, cause, &[], now)
            })
        })?;
        self.bump();
        self.kick.notify_one();
        Ok(())
    }

    /// `workspace resume ID`: asks the batch system for new slots and
    /// restores the VMs in them.
    pub async fn resume(
        &self,
        caller: &Caller,
        id: &WorkspaceId,
    ) -> Result<WorkspaceView, EngineError> {
        let ws = self.with_store(|s| visible_ws(s.conn(), caller, id))?;
        match ws.state {
            WorkspaceState::Suspended => {}
            WorkspaceState::Resuming => return self.get(caller, id),
            other => {
                return Err(EngineError::Conflict(format!(
                    "workspace {id} is {other}: only a suspended workspace can be resumed"
                )))
            }
        }
        info!(workspace_id = %id, user = %caller.user, "resume requested");
        self.resume_workspace(id, &format!("asked by {}", caller.user))
            .await?;
        self.get(caller, id)
    }

    /// Suspended workspaces that resume by themselves (after a preemption)
    /// get their new slots: a step of housekeeping.
    pub async fn resume_due(&self) -> Result<(), EngineError> {
        let due = self.with_store(|s| Ok(store::workspaces_to_resume(s.conn())?))?;
        for id in due {
            if let Err(e) = self.resume_workspace(&id, "after preemption").await {
                warn!(workspace_id = %id, error = %e, "resume failed");
            }
        }
        Ok(())
    }

    /// Suspended workspaces that resume by themselves, oldest suspension
    /// first (the simulator resumes them one by one with [`Engine::resume_now`]).
    pub fn resumable(&self) -> Result<Vec<WorkspaceId>, EngineError> {
        self.with_store(|s| Ok(store::workspaces_to_resume(s.conn())?))
    }

    /// Resumes one suspended workspace now (new slots asked for).
    pub async fn resume_now(&self, id: &WorkspaceId) -> Result<(), EngineError> {
        self.resume_workspace(id, "after preemption").await
    }

    /// Suspended -> resuming: new slots sized as at create, stored, then
    /// submitted. A refused submit calls the resume off (checkpoints kept).
    async fn resume_workspace(&self, id: &WorkspaceId, why: &str) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let spec = self.with_store(|s| Ok(must_ws(s.conn(), id)?.spec))?;
        let plans = self.slot_plans(&spec)?;
        let slots = self.with_store(|s| {
            s.tx(|tx| {
                let mut ws = must_ws(tx, id)?;
                if !transition(tx, &mut ws, Input::ResumeStarted, None, now)? {
                    return Ok(Vec::new());
                }
                let slots = plan_new_slots(tx, &ws, &plans, now)?;
                timeline(
                    tx,
                    id,
                    now,
                    Phase::Resuming,
                    None,
                    None,
                    None,
                    &format!("{why}: {} new slot(s) asked for", slots.len()),
                )?;
                Ok::<_, EngineError>(slots)
            })
        })?;
        self.bump();
        for slot in &slots {
            if let Err(source) = self.submit_slot(slot).await {
                warn!(workspace_id = %id, slot_id = %slot.id, error = %source, "new slot refused");
                let why = format!(
                    "the batch system refused the new slot for group {:?}: {source}",
                    slot.group
                );
                self.with_store(|s| {
                    s.tx(|tx| {
                        super::rules::abandon_unsubmitted(tx, &slot.id)?;
                        let mut ws = must_ws(tx, id)?;
                        abort_resume(tx, &mut ws, &why, false, self.clock.now_ms())
                    })
                })?;
                self.bump();
                self.kick.notify_one();
                return Err(EngineError::Submit {
                    workspace: id.clone(),
                    source,
                });
            }
        }
        self.bump();
        Ok(())
    }

    /// Checkpoints of workspaces that ended are removed from the store,
    /// when the coordinator mounts it (`checkpoint_dir`); else they are
    /// named once on the timeline for an admin. A step of housekeeping.
    pub async fn delete_ended_checkpoints(&self) -> Result<(), EngineError> {
        let ended = self.with_store(|s| Ok(store::ended_with_checkpoints(s.conn())?))?;
        for id in ended {
            let removed = match &self.cfg.checkpoint_dir {
                Some(dir) => {
                    let path = dir.join(id.as_str());
                    let r = tokio::time::timeout(
                        std::time::Duration::from_secs(60),
                        tokio::task::spawn_blocking(move || remove_tree(&path)),
                    )
                    .await;
                    match r {
                        Ok(Ok(Ok(bytes))) => Some(Ok(bytes)),
                        Ok(Ok(Err(e))) => Some(Err(e.to_string())),
                        Ok(Err(e)) => Some(Err(e.to_string())),
                        Err(_) => Some(Err("timed out after 60 s".into())),
                    }
                }
                None => None,
            };
            let now = self.clock.now_ms();
            self.with_store(|s| {
                s.tx(|tx| {
                    let mut left = store::checkpoints_of(tx, &id, "kept")?;
                    left.extend(store::checkpoints_of(tx, &id, "saving")?);
                    let (state, detail) = match &removed {
                        Some(Ok(bytes)) => (
                            "deleted",
                            format!(
                                "the lease ended: {} checkpoint(s) removed from the store, {} freed",
                                left.len(),
                                bytes_text(*bytes)
                            ),
                        ),
                        Some(Err(e)) => {
                            warn!(workspace_id = %id, error = %e, "removing checkpoints failed; will retry");
                            return Ok(());
                        }
                        None => (
                            "left",
                            format!(
                                "the lease ended; {} checkpoint(s) left in the store (the coordinator has no checkpoint_dir): remove with workspace-pilot checkpoint delete {}",
                                left.len(),
                                left.iter().map(|k| k.id().to_string()).collect::<Vec<_>>().join(" ")
                            ),
                        ),
                    };
                    for k in &left {
                        store::set_checkpoint(tx, &k.id(), state, None, None, now)?;
                    }
                    timeline(tx, &id, now, Phase::CheckpointDeleted, None, None, None, &detail)
                })
            })?;
            self.bump();
        }
        Ok(())
    }
}

/// Removes a directory tree; the bytes its files held (0 if it was not there).
fn remove_tree(path: &std::path::Path) -> std::io::Result<u64> {
    fn size(p: &std::path::Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if meta.is_dir() {
            std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| size(&e.path())).sum())
                .unwrap_or(0)
        } else {
            meta.len()
        }
    }
    let bytes = size(path);
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Restart recovery: a resume whose new slots were stored but whose submit
/// was never answered is called off (checkpoints kept) and tried again.
pub(super) fn recover_resume(
    c: &Connection,
    ws: &mut WorkspaceRow,
    now: u64,
) -> Result<(), EngineError> {
    abort_resume(
        c,
        ws,
        "the coordinator stopped while submitting the new slots",
        true,
        now,
    )
}

/// The VMs of this pilot's slot on `node` that a release leaves behind as
/// checkpoints (not to be marked gone), for `on_released`.
pub(super) fn keeps(state: VmState) -> bool {
    matches!(state, VmState::Suspended)
}
