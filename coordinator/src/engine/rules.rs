//! The lease rules, each inside the caller's transaction: state transitions
//! (through the tables in `crate::lifecycle`), ending slots, settling a
//! workspace, starting its VMs once every slot is reserved, and what a slot
//! or a batch job ending means for its workspace.
//!
//! Pure functions of the database and their arguments (time included): no
//! I/O besides SQLite, no clock of their own.

use super::{Caller, EngineError};
use crate::lifecycle::pilot::PilotState;
use crate::lifecycle::slot::{self as slot_life, JobInput};
use crate::lifecycle::vm as vm_life;
use crate::lifecycle::{self, Input};
use crate::network::{self};
use crate::policy::{NodeRoom, Policy, VmNeed};
use crate::store::{self, SlotRow, VmRow, WorkspaceRow};
use protocol::pilot::{CommandKind, VmLaunch};
use protocol::view::{Phase, SlotState, VmState, WorkspaceState};
use protocol::{SlotId, VmId, WorkspaceId};
use rusqlite::Connection;
use std::collections::{HashMap, HashSet};
use tracing::{info, warn};

/// What the rules take from the engine's setup besides the database and
/// the time: the image repository and the scheduling policy.
pub(super) struct Setting<'a> {
    pub images: &'a network::ImagesConfig,
    pub policy: &'a dyn Policy,
    /// What urgent leases may take (`[urgency]`).
    pub urgency: &'a crate::config::UrgencyConfig,
}

pub(super) fn must_ws(c: &Connection, id: &WorkspaceId) -> Result<WorkspaceRow, EngineError> {
    store::get_workspace(c, id)?.ok_or_else(|| EngineError::NotFound(format!("no workspace {id}")))
}

/// The workspace if the caller may see it; others' workspaces are "not found".
pub(super) fn visible_ws(
    c: &Connection,
    caller: &Caller,
    id: &WorkspaceId,
) -> Result<WorkspaceRow, EngineError> {
    match store::get_workspace(c, id)? {
        Some(ws) if caller.admin || ws.owner == caller.user => Ok(ws),
        _ => Err(EngineError::NotFound(format!("no workspace {id}"))),
    }
}

/// Moves the workspace through its table (`lifecycle::workspace::next`),
/// recording the state and reason; returns whether it changed.
pub(super) fn transition(
    c: &Connection,
    ws: &mut WorkspaceRow,
    input: Input,
    reason: Option<&str>,
    now: u64,
) -> Result<bool, EngineError> {
    if super::pool::is_holder(ws) {
        // The slot pool's holder never moves: a pilot of the pool that
        // goes (released, preempted, lost, its job ended, its reserve
        // failed) ends only its own slot, which the callers do anyway.
        return Ok(false);
    }
    let Some(to) = store::advance_workspace(c, &ws.id, input, reason, now)? else {
        return Ok(false);
    };
    info!(workspace_id = %ws.id, from = %ws.state, to = %to, ?input, "workspace state");
    ws.state = to;
    if reason.is_some() {
        ws.reason = reason.map(str::to_string);
    }
    Ok(true)
}

pub(super) fn fail_workspace(
    c: &Connection,
    ws: &mut WorkspaceRow,
    reason: &str,
    now: u64,
) -> Result<(), EngineError> {
    if transition(c, ws, Input::Failed, Some(reason), now)? {
        warn!(workspace_id = %ws.id, reason, "workspace failed");
        end_slots(c, ws, now)?;
    }
    Ok(())
}

/// A slot whose pilot job was never submitted (or whose submit failed):
/// its job abandoned and the slot ended, with nothing at the batch system.
pub(super) fn abandon_unsubmitted(
    c: &Connection,
    slot: &protocol::SlotId,
) -> Result<(), EngineError> {
    store::advance_job(c, slot, &JobInput::Abandoned)?;
    store::advance_slot(c, slot, slot_life::Input::NotSubmitted)?;
    Ok(())
}

/// A lease's pilot job the batch system refused: the slot abandoned and the
/// lease failed with `reason`, settled if nothing else is left.
pub(super) fn fail_on_refused_submit(
    c: &Connection,
    slot: &protocol::SlotId,
    ws: &WorkspaceId,
    reason: &str,
    now: u64,
) -> Result<(), EngineError> {
    abandon_unsubmitted(c, slot)?;
    let mut w = must_ws(c, ws)?;
    fail_workspace(c, &mut w, reason, now)?;
    maybe_settle(c, &mut w, now)
}

/// Asks every slot of the workspace to end: `release` to each pilot that has
/// not released, and a batch cancel for jobs with nodes no pilot holds yet;
/// a pool slot serving the lease is unbound instead (`pool::ends_by_unbind`).
pub(super) fn end_slots(c: &Connection, ws: &WorkspaceRow, now: u64) -> Result<(), EngineError> {
    // An urgent lease's VMs on other leases' nodes (engine::urgent).
    super::urgent::end_shares(c, ws, now)?;
    for slot in store::slots_of(c, &ws.id)? {
        if slot.state.is_terminal() || super::pool::ends_by_unbind(c, ws, &slot, now)? {
            continue;
        }
        end_slot(c, &slot, now)?;
    }
    Ok(())
}

/// Asks one slot to end: `release` to each of its pilots that has not
/// released, a batch cancel when some node has no pilot yet (the job is
/// queued or starting), the slot `releasing`. Also for the batch slots a
/// queued lease leaves when it moves onto idle pool slots (`engine::pool`).
pub(super) fn end_slot(c: &Connection, slot: &SlotRow, now: u64) -> Result<(), EngineError> {
    let pilots = store::pilots_of(c, &slot.id)?;
    for p in pilots.iter().filter(|p| !p.state.is_terminal()) {
        if !store::has_release(c, &slot.id, &p.node)? {
            store::push_command(c, &slot.id, &p.node, &CommandKind::Release, now)?;
        }
    }
    if slot.job.id().is_none() {
        // Never submitted (or its submit never answered): nothing anywhere.
        return abandon_unsubmitted(c, &slot.id);
    }
    if (pilots.len() as u32) < slot.nodes {
        // Some nodes have no pilot yet (job queued or starting): cancel the job.
        store::advance_job(c, &slot.id, &JobInput::CancelNeeded)?;
    }
    if pilots.is_empty() || pilots.iter().any(|p| !p.state.is_terminal()) {
        store::advance_slot(c, &slot.id, slot_life::Input::ReleaseAsked)?;
    }
    Ok(())
}

/// True when every slot that holds a VM of the lease is reserved (a slot
/// the lease left, when it was suspended or moved from the batch queue onto
/// pool slots, does not count).
pub(super) fn current_slots_reserved(
    c: &Connection,
    ws: &WorkspaceId,
) -> Result<bool, EngineError> {
    let current: HashSet<SlotId> = store::vms_of(c, ws)?
        .into_iter()
        .map(|v| v.slot_id)
        .collect();
    Ok(store::slots_of(c, ws)?
        .iter()
        .filter(|s| current.contains(&s.id))
        .all(|s| s.state == SlotState::Reserved))
}

/// True while the workspace needs this slot: it wants slots and its VMs are
/// in this one (not an old slot its VMs left when they were suspended).
pub(super) fn needs_slot(
    c: &Connection,
    ws: &WorkspaceRow,
    slot: &SlotId,
) -> Result<bool, EngineError> {
    Ok(lifecycle::wants_slots(ws.state) && store::slot_has_vms(c, slot)?)
}

/// What the scientist reads when a node is left for an admin to clean:
/// kill-all is an admin's tool, so the user is told who knows, and the
/// admins find the node, with the command, in `workspace admin nodes`.
pub(super) const ADMINS_TOLD: &str =
    "the node is listed for the cluster's admins to clean (kill-all)";

/// When every slot has ended, the workspace settles (destroying -> destroyed, ...).
pub(super) fn maybe_settle(
    c: &Connection,
    ws: &mut WorkspaceRow,
    now: u64,
) -> Result<(), EngineError> {
    let slots = store::slots_of(c, &ws.id)?;
    if !slots.iter().all(|s| s.state.is_terminal()) {
        return Ok(());
    }
    if super::urgent::holds_shares(c, &ws.id)? {
        // A VM of it still runs on another lease's node.
        return Ok(());
    }
    if transition(c, ws, Input::AllSlotsEnded, None, now)? && ws.state == WorkspaceState::Failed {
        let reason = "every slot ended while the workspace was live";
        store::set_workspace_reason(c, &ws.id, reason, now)?;
        ws.reason = Some(reason.to_string());
    }
    if lifecycle::in_suspension(ws.state) {
        // Its VMs are checkpoints (or becoming them, or coming back): not gone.
        return Ok(());
    }
    // Any VM not yet accounted for is gone with its slot.
    let gone = vm_life::Input::Gone {
        preempted: ws.state == WorkspaceState::Preempted,
    };
    for vm in store::vms_of(c, &ws.id)? {
        // A VM on a lost pilot's node stays unknown: it may still run there.
        if !vm.state.is_terminal() && vm.state != VmState::Unknown {
            store::advance_vm(c, &vm.id, gone)?;
        }
    }
    let already = store::has_phase(c, &ws.id, Phase::Ended)?;
    if !already && ws.state.is_terminal() {
        // Only what is known: nodes whose pilots never reported are named.
        let mut silent = Vec::new();
        for s in slots.iter().filter(|s| s.state == SlotState::Unreported) {
            silent.extend(unreported_nodes(c, &s.id)?);
        }
        let detail = if silent.is_empty() {
            format!("{}: every slot given back", ws.state)
        } else {
            format!(
                "{}: every slot ended; no report from the pilots on {} ({ADMINS_TOLD})",
                ws.state,
                silent.join(", ")
            )
        };
        store::push_timeline(c, &ws.id, now, now, Phase::Ended, None, None, None, &detail)?;
    }
    Ok(())
}

/// All VMs mapped onto the reserved nodes; `start_vm` commands queued.
pub(super) fn start_vms(
    c: &Connection,
    ws: &mut WorkspaceRow,
    now: u64,
    setting: &Setting,
) -> Result<(), EngineError> {
    let slots = store::slots_of(c, &ws.id)?;
    let mut rooms = Vec::new();
    for s in &slots {
        for p in store::pilots_of(c, &s.id)?
            .into_iter()
            .filter(|p| p.state.holds())
        {
            rooms.push(NodeRoom {
                slot: s.id.clone(),
                node: p.node,
                memory_mb: s.memory_mb,
                cpus: s.cores,
            });
        }
    }
    // VMs to start, and (resuming) suspended VMs to restore in their new slots.
    let vms: Vec<VmRow> = store::vms_of(c, &ws.id)?
        .into_iter()
        .filter(|v| matches!(v.state, VmState::Pending | VmState::Suspended))
        .collect();
    let needs: Vec<VmNeed> = vms
        .iter()
        .map(|v| VmNeed {
            vm: v.id.clone(),
            slot: v.slot_id.clone(),
            memory_mb: v.memory_mb,
            cpus: v.cpus,
        })
        .collect();
    // Prefer nodes whose image cache already holds the VM's image.
    let mut cached: HashSet<(String, String)> = HashSet::new();
    for s in &slots {
        cached.extend(store::node_images(c, &s.id)?);
    }
    let sources: HashMap<&VmId, Option<protocol::pilot::ImageSource>> = vms
        .iter()
        .map(|v| {
            let g = ws.spec.groups.iter().find(|g| g.name == v.group);
            (
                &v.id,
                g.and_then(|g| network::image_source(setting.images, g)),
            )
        })
        .collect();
    let holds = |vm: &VmId, node: &str| {
        sources
            .get(vm)
            .and_then(|s| s.as_ref())
            .and_then(|s| s.sha256.as_ref())
            .is_some_and(|h| cached.contains(&(node.to_string(), h.clone())))
    };
    let (mut nics, peers) = workspace_context(c, ws)?;
    // Stored once; each launch is stored without them and gets them when
    // delivered (`poll_answer`).
    store::set_workspace_peers(c, &ws.id, &peers)?;
    let mapping = match setting.policy.place(&needs, &rooms, &holds) {
        Ok(p) => p.starts,
        Err(e) => return fail_workspace(c, ws, &e.to_string(), now),
    };
    transition(c, ws, Input::AllSlotsReserved, None, now)?;
    let by_id: HashMap<&VmId, &VmRow> = vms.iter().map(|v| (&v.id, v)).collect();
    for (vm_id, node) in mapping {
        let Some(vm) = by_id.get(&vm_id) else {
            continue;
        };
        let restore = if vm.state == VmState::Suspended {
            let Some(from) = super::suspend::restore_from(c, &vm.id)? else {
                let why = format!("VM {} has no complete checkpoint to resume from", vm.id);
                return fail_workspace(c, ws, &why, now);
            };
            store::advance_vm(c, &vm.id, vm_life::Input::RestoreSent)?;
            Some(from)
        } else {
            store::advance_vm(c, &vm.id, vm_life::Input::Mapped)?;
            // On a pool slot, an image with a clean snapshot starts warm.
            super::pool::warm_restore(c, vm)?
        };
        let from = restore.as_ref().map(|r| r.checkpoint.to_string());
        let warm = restore.as_ref().is_some_and(|r| r.warm);
        store::place_vm(
            c,
            &vm.id,
            &vm.slot_id,
            &vm.name,
            &node,
            now,
            from.as_deref(),
        )?;
        let on_preempt = super::suspend::launch_on_preempt(c, ws, &vm.id, &vm.slot_id, &node)?;
        let launch = VmLaunch {
            vm_id: vm.id.clone(),
            name: vm.name.clone(),
            memory_mb: vm.memory_mb,
            cpus: vm.cpus,
            image: vm.image.clone(),
            image_source: sources.get(&vm.id).cloned().flatten(),
            nics: nics.remove(&vm.id).unwrap_or_default(),
            hostname: Some(network::hostname(&vm.group, vm.idx)),
            context: Some(protocol::pilot::Context {
                workspace_id: ws.id.to_string(),
                workspace_name: ws.name.clone(),
                group: vm.group.clone(),
                peers: Vec::new(),
                ssh_key: ws.spec.ssh_key.clone(),
            }),
            on_preempt,
            restore,
            urgency: 0,
            cpu: None,
        };
        store::push_command(c, &vm.slot_id, &node, &CommandKind::StartVm(launch), now)?;
        store::push_timeline(
            c,
            &ws.id,
            now,
            now,
            Phase::VmStartSent,
            Some(&vm.slot_id),
            Some(&node),
            Some(&vm.id),
            &match &from {
                Some(ck) if warm => format!(
                    "{} ({}) -> {node}, warm from the clean snapshot {ck}",
                    vm.name, vm.group
                ),
                Some(ck) => format!("{} ({}) -> {node}, restored from {ck}", vm.name, vm.group),
                None => format!("{} ({}) -> {node}", vm.name, vm.group),
            },
        )?;
    }
    Ok(())
}

/// Each VM's NICs, by VM.
pub(super) type NicsByVm = HashMap<VmId, Vec<protocol::pilot::Nic>>;

/// Contexts of a workspace's VMs: each VM's NICs and the peer list.
pub(super) fn workspace_context(
    c: &Connection,
    ws: &WorkspaceRow,
) -> Result<(NicsByVm, Vec<protocol::pilot::Peer>), EngineError> {
    let mut nics: NicsByVm = HashMap::new();
    for (vm, nic) in store::addresses_of(c, &ws.id)? {
        nics.entry(vm).or_default().push(nic);
    }
    let peers = store::vms_of(c, &ws.id)?
        .iter()
        .map(|v| protocol::pilot::Peer {
            name: network::hostname(&v.group, v.idx),
            group: v.group.clone(),
            ips: nics
                .get(&v.id)
                .map(|n| n.iter().map(|n| n.ip).collect())
                .unwrap_or_default(),
        })
        .collect();
    Ok((nics, peers))
}

/// When every pilot of the slot is gone, the slot is released (failed if a
/// pilot was lost); the batch job is cancelled too, in case it lingers.
pub(super) fn slot_maybe_released(
    c: &Connection,
    ws: &WorkspaceRow,
    slot_id: &SlotId,
    now: u64,
) -> Result<(), EngineError> {
    let Some(slot) = store::get_slot(c, slot_id)? else {
        return Ok(());
    };
    if slot.state.is_terminal() {
        return Ok(());
    }
    let (_, released) = store::count_released_pilots(c, slot_id)?;
    if released >= u64::from(slot.nodes) {
        let pilots = store::pilots_of(c, slot_id)?;
        let lost: Vec<&str> = pilots
            .iter()
            .filter(|p| p.state == PilotState::Lost)
            .map(|p| p.node.as_str())
            .collect();
        let detail = if lost.is_empty() {
            format!("all {} pilot(s) released", pilots.len())
        } else {
            format!(
                "ended with lost pilot(s) on {}: {}",
                lost.join(", "),
                ADMINS_TOLD
            )
        };
        let gone = slot_life::Input::PilotsGone {
            lost: !lost.is_empty(),
        };
        store::advance_slot(c, slot_id, gone)?;
        store::advance_job(c, slot_id, &JobInput::CancelNeeded)?;
        store::push_timeline(
            c,
            &ws.id,
            now,
            now,
            Phase::SlotReleased,
            Some(slot_id),
            None,
            None,
            &detail,
        )?;
    }
    Ok(())
}

/// The LRM says the job is over (or gone). When every pilot had reported
/// release, the slot is released; otherwise it awaits their late reports
/// (`report_wait_s`, see [`reports_overdue`]), and so does its workspace:
/// the reports say how the nodes ended and why (a preemption, a deadline),
/// which the batch system cannot.
pub(super) fn job_ended(
    c: &Connection,
    slot_id: &SlotId,
    job: &str,
    how: &str,
    preempted: bool,
    now: u64,
    report_wait_s: u64,
) -> Result<(), EngineError> {
    let Some(slot) = store::get_slot(c, slot_id)? else {
        return Ok(());
    };
    store::advance_job(c, slot_id, &JobInput::Ended)?;
    let mut ws = must_ws(c, &slot.workspace_id)?;
    let stuck = if slot.state.is_terminal() {
        Vec::new()
    } else {
        unreported_nodes(c, slot_id)?
    };
    let detail = if stuck.is_empty() {
        format!("batch job {job}: {how}")
    } else {
        format!(
            "batch job {job}: {how}; waiting up to {report_wait_s} s for the pilots on {} to report how their nodes ended",
            stuck.join(", ")
        )
    };
    store::push_timeline(
        c,
        &ws.id,
        now,
        now,
        Phase::JobEnded,
        Some(slot_id),
        None,
        None,
        &detail,
    )?;
    if !slot.state.is_terminal() {
        let ended = slot_life::Input::JobEnded {
            stuck: !stuck.is_empty(),
        };
        store::advance_slot(c, slot_id, ended)?;
        if !stuck.is_empty() {
            info!(slot_id = %slot_id, job, ?stuck, "batch job ended before its pilots reported release; awaiting their reports");
            if !ws.state.is_terminal() {
                // Said while it waits; the end (from the reports, or their
                // absence) says its own.
                let why = format!(
                    "batch job {job} ended ({how}); waiting up to {report_wait_s} s for the pilots on {} to report how their nodes ended",
                    stuck.join(", ")
                );
                store::set_workspace_reason(c, &ws.id, &why, now)?;
            }
            return Ok(());
        }
        if needs_slot(c, &ws, slot_id)? {
            let reason = format!(
                "batch job {job} ended ({how}) while the workspace was {}",
                ws.state
            );
            let input = if preempted {
                Input::Preempted
            } else {
                Input::Failed
            };
            if transition(c, &mut ws, input, Some(&reason), now)? {
                end_slots(c, &ws, now)?;
            }
        }
    }
    maybe_settle(c, &mut ws, now)?;
    Ok(())
}

/// The nodes of the slot whose pilots have not said how their node ended.
pub(super) fn unreported_nodes(
    c: &Connection,
    slot_id: &SlotId,
) -> Result<Vec<String>, EngineError> {
    Ok(store::pilots_of(c, slot_id)?
        .into_iter()
        .filter(|p| !p.state.is_terminal())
        .map(|p| p.node)
        .collect())
}

/// A slot whose job ended `report_wait_s` ago (or before this coordinator
/// started, then counted from its start) and whose pilots still have not all
/// reported: it ends `unreported`, its silent nodes named for kill-all, and
/// a workspace that still wanted it fails. Returns whether it did.
pub(super) fn reports_overdue(
    c: &Connection,
    slot: &SlotRow,
    since_ms: u64,
    now: u64,
    report_wait_s: u64,
) -> Result<bool, EngineError> {
    if now < since_ms.saturating_add(report_wait_s * 1000) {
        return Ok(false);
    }
    let stuck = unreported_nodes(c, &slot.id)?;
    if store::advance_slot(c, &slot.id, slot_life::Input::ReportsOverdue)?.is_none() {
        return Ok(false);
    }
    let mut ws = must_ws(c, &slot.workspace_id)?;
    let job = slot.job.id().unwrap_or("?");
    warn!(workspace_id = %ws.id, slot_id = %slot.id, job, ?stuck, "pilots never reported after their job ended");
    let nodes = stuck.join(", ");
    store::push_timeline(
        c,
        &ws.id,
        now,
        now,
        Phase::SlotReleased,
        Some(&slot.id),
        None,
        None,
        &format!(
            "batch job {job} ended and the pilots on {nodes} did not report how their nodes ended within {report_wait_s} s: {ADMINS_TOLD}"
        ),
    )?;
    if super::suspend::after_unreported(c, &mut ws, &slot.id, &stuck, job, now)? {
        // A save lost with its pilot: said by the suspend rules.
    } else if lifecycle::wants_slots(ws.state) {
        let reason = format!(
            "batch job {job} ended while the workspace was {}; no report from the pilots on {nodes}",
            ws.state
        );
        fail_workspace(c, &mut ws, &reason, now)?;
    }
    maybe_settle(c, &mut ws, now)?;
    Ok(true)
}
