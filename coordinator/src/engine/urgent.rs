//! Urgent leases (issue 17, docs/POOL.md "Urgent leases"): what urgency 1
//! and 2 take from best-effort leases when no idle capacity serves them.
//!
//! - **Urgency 2 shares a node under CPU caps.** Its VMs go onto nodes of
//!   running best-effort leases whose pilots have CPU control and memory to
//!   spare: the host's pilot is told to `reserve` more memory, the host's
//!   VMs there are capped (`set_cpu`), then the urgent VM starts with a high
//!   weight. When the urgent lease ends its VM is destroyed, the caps lifted
//!   and the memory given back. A refused reservation or cap before the
//!   urgent VM started: everything is undone and the lease goes through the
//!   batch system. Only hosts whose lease outlives the urgent one are
//!   chosen; one that still ends first (destroyed, preempted) takes the
//!   urgent VM with its node: the urgent lease fails, saying so.
//! - **Urgency 1 (and 2 with no node to share) may suspend best-effort
//!   leases** when the batch system has no free node for it: the smallest
//!   lease that frees enough nodes, else the largest ones until enough;
//!   they resume by themselves, behind the urgent lease's pilot jobs.
//!
//! The data model: an urgent VM's row names its own workspace and the
//! host's slot (the slot stays the host's: its pilot runs the VM, named
//! `wsp-<host slot>-<vm>`); an `urgent_shares` row per VM holds the state
//! ([`next`]). The urgent lease holds no slot of its own while it shares.
//! Events about its VM arrive on the host's slot and are applied to the
//! urgent workspace (`ingest`).

use super::rules::{fail_workspace, maybe_settle, must_ws, transition, workspace_context, Setting};
use super::{Engine, EngineError};
use crate::lifecycle::pilot::PilotState;
use crate::lifecycle::vm as vm_life;
use crate::lifecycle::{self, Input};
use crate::network;
use crate::store::{self, ShareRow, ShareState, WorkspaceRow};
use protocol::pilot::{CommandKind, CpuShare, OnPreempt, VmLaunch};
use protocol::spec::{LeaseKind, PreemptChoice};
use protocol::view::{Phase, VmState, WorkspaceState};
use protocol::{SlotId, VmId, VmName, WorkspaceId};
use rusqlite::Connection;
use std::collections::HashSet;
use tracing::{info, warn};

/// What happens to a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ShareInput {
    /// The host's pilot holds the extra memory.
    Reserved,
    /// Caps sent to the host's VMs on the node (`none`: there were none).
    CapsSent { none: bool },
    /// The last cap was confirmed.
    CapsConfirmed,
    /// The node refused the memory or a cap before the urgent VM started.
    Refused,
    /// `start_vm` sent.
    StartSent,
    /// The urgent lease ended while its VM may be live there.
    UrgentEnds { vm_live: bool },
    /// The urgent VM is gone (destroyed, failed).
    VmGone,
    /// The host's pilot gave the node back.
    HostGone,
    /// The lease's own pilot jobs were submitted (after a fallback).
    FellBack,
}

/// The share's next state, or `None` when the input does not apply.
pub(super) fn next(state: ShareState, input: ShareInput) -> Option<ShareState> {
    use ShareInput::*;
    use ShareState as S;
    Some(match (state, input) {
        (S::Reserving, Reserved) => S::Capping,
        (S::Capping, CapsSent { none: true }) => S::Ready,
        (S::Capping, CapsSent { none: false }) => S::Capping,
        (S::Capping, CapsConfirmed) => S::Ready,
        (S::Reserving | S::Capping | S::Ready, Refused) => S::Fallback,
        (S::Ready, StartSent) => S::Started,
        (S::Started | S::Ending, UrgentEnds { vm_live: true }) => S::Ending,
        (S::Reserving | S::Capping | S::Ready | S::Started | S::Ending, UrgentEnds { .. }) => {
            S::Done
        }
        (S::Started | S::Ending, VmGone) => S::Done,
        (s, HostGone) if s.is_active() => S::Lost,
        (S::Fallback, FellBack) => S::Done,
        _ => return None,
    })
}

/// Moves a share through [`next`], writing it; false when nothing changed.
fn advance(c: &Connection, s: &mut ShareRow, input: ShareInput) -> Result<bool, EngineError> {
    let Some(to) = next(s.state, input) else {
        return Ok(false);
    };
    s.state = to;
    store::update_share(c, s)?;
    Ok(true)
}

fn line(
    c: &Connection,
    ws: &WorkspaceId,
    now: u64,
    share: Option<&ShareRow>,
    vm: Option<&VmId>,
    detail: &str,
) -> Result<(), EngineError> {
    store::push_timeline(
        c,
        ws,
        now,
        now,
        Phase::Yielded,
        share.map(|s| &s.slot_id),
        share.map(|s| s.node.as_str()),
        vm,
        detail,
    )?;
    Ok(())
}

/// A node that may take an urgent VM.
struct Host {
    slot: SlotId,
    node: String,
    host: WorkspaceId,
    base_mb: u64,
    spare_mb: u64,
}

/// Urgency 2: places every VM of `ws` beside running best-effort VMs, in
/// the caller's transaction, or says why it cannot (nothing then changed).
fn share_in(
    c: &Connection,
    ws: &WorkspaceRow,
    min_dom0_mb: u64,
    now: u64,
) -> Result<Result<(), String>, EngineError> {
    let ends = now.saturating_add(ws.spec.duration.0.as_millis() as u64);
    let taken: HashSet<(SlotId, String)> = store::node_rooms(c)?
        .iter()
        .filter_map(|r| {
            let busy = store::shares_on(c, &r.slot_id, &r.node)
                .map(|s| s.iter().any(|s| s.state.is_active()));
            match busy {
                Ok(true) => Some(Ok((r.slot_id.clone(), r.node.clone()))),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            }
        })
        .collect::<Result<_, _>>()?;
    let mut hosts = Vec::new();
    let (mut no_cpu, mut busy, mut short_lived) = (Vec::new(), 0usize, 0usize);
    for r in store::node_rooms(c)? {
        let Some(slot) = store::get_slot(c, &r.slot_id)? else {
            continue;
        };
        if slot.workspace_id == ws.id || slot.state.is_terminal() {
            continue;
        }
        // Pool slots serve one lease at a time (the pilot refuses others').
        if store::get_pool_slot(c, &slot.id)?.is_some() {
            continue;
        }
        let holder = must_ws(c, &slot.workspace_id)?;
        if holder.state != WorkspaceState::Running
            || holder.spec.lease_kind() != LeaseKind::BestEffort
            || holder.spec.urgency > 0
        {
            continue;
        }
        let up = store::pilots_of(c, &slot.id)?
            .iter()
            .any(|p| p.node == r.node && p.state == PilotState::Reserved);
        if !up {
            continue;
        }
        if taken.contains(&(r.slot_id.clone(), r.node.clone())) {
            busy += 1;
            continue;
        }
        // Its VM would go with the host's node when the host's lease ends.
        if holder.expires_ms.is_none_or(|e| e < ends) {
            short_lived += 1;
            continue;
        }
        if !r.cpu_control {
            no_cpu.push(format!("{} ({})", r.node, r.cpu_how));
            continue;
        }
        hosts.push(Host {
            slot: slot.id.clone(),
            node: r.node.clone(),
            host: holder.id.clone(),
            base_mb: r.reserved_mb,
            spare_mb: r.dom0_mb.saturating_sub(min_dom0_mb),
        });
    }
    // The most memory to spare first.
    hosts.sort_by(|a, b| b.spare_mb.cmp(&a.spare_mb).then(a.node.cmp(&b.node)));
    let vms = store::vms_of(c, &ws.id)?;
    let mut plan = Vec::new();
    let mut used = vec![false; hosts.len()];
    for vm in &vms {
        let pick = hosts
            .iter()
            .enumerate()
            .find(|(i, h)| !used[*i] && h.spare_mb >= vm.memory_mb);
        match pick {
            Some((i, _)) => {
                used[i] = true;
                plan.push((vm, i));
            }
            None => {
                let mut why = format!(
                    "no node to share for VM {} ({} MB): {} node(s) of running best-effort leases with CPU control and {} MB to spare above dom0's minimum of {min_dom0_mb} MB",
                    vm.id,
                    vm.memory_mb,
                    hosts.iter().filter(|h| h.spare_mb >= vm.memory_mb).count(),
                    vm.memory_mb
                );
                if !no_cpu.is_empty() {
                    why.push_str(&format!("; without CPU control: {}", no_cpu.join(", ")));
                }
                if busy > 0 {
                    why.push_str(&format!("; {busy} node(s) already shared"));
                }
                if short_lived > 0 {
                    why.push_str(&format!(
                        "; {short_lived} node(s) of leases that end before this one would"
                    ));
                }
                return Ok(Err(why));
            }
        }
    }
    for (vm, i) in plan {
        let h = &hosts[i];
        let name = VmName::new(h.slot.clone(), vm.id.clone()).to_string();
        store::move_vm_to_slot(c, &vm.id, &h.slot, &name)?;
        let share = ShareRow {
            vm_id: vm.id.clone(),
            urgent_ws: ws.id.clone(),
            host_ws: h.host.clone(),
            slot_id: h.slot.clone(),
            node: h.node.clone(),
            base_mb: h.base_mb,
            extra_mb: vm.memory_mb,
            state: ShareState::Reserving,
            capped: Vec::new(),
            pending: 0,
            created_ms: now,
        };
        store::insert_share(c, &share)?;
        let reserve = CommandKind::Reserve {
            memory_mb: h.base_mb + vm.memory_mb,
        };
        store::push_command(c, &h.slot, &h.node, &reserve, now)?;
        line(
            c,
            &ws.id,
            now,
            Some(&share),
            Some(&vm.id),
            &format!(
                "urgency 2: VM {} goes beside best-effort lease {} on node {}; asking its pilot for {} MB more",
                vm.id, h.host, h.node, vm.memory_mb
            ),
        )?;
        line(
            c,
            &h.host,
            now,
            Some(&share),
            None,
            &format!(
                "node {}: urgent lease {} (urgency 2) shares this node under CPU caps; {} MB more reserved for it",
                h.node, ws.id, vm.memory_mb
            ),
        )?;
    }
    for slot in store::slots_of(c, &ws.id)? {
        store::delete_unsubmitted_slot(c, &slot.id)?;
    }
    Ok(Ok(()))
}

/// One event of a host's pilot, for the handlers below.
pub(super) struct OnNode<'a> {
    pub c: &'a Connection,
    pub slot: &'a SlotId,
    pub node: &'a str,
    /// The slot's (the host's) workspace.
    pub host_ws: &'a WorkspaceId,
    pub now: u64,
}

/// The host's pilot holds the extra memory: cap the host's VMs on that node.
pub(super) fn on_reservation_changed(
    at: &OnNode,
    dom0_mb: u64,
    reserved_mb: u64,
    setting: &Setting,
) -> Result<(), EngineError> {
    let (c, slot, node, now) = (at.c, at.slot, at.node, at.now);
    let cap_pct = setting.urgency.cap_pct;
    store::set_node_room(c, slot, node, None, dom0_mb, reserved_mb)?;
    for mut s in store::shares_on(c, slot, node)? {
        // Only the answer that holds this share's memory (a give-back of
        // an earlier share on the node may come first).
        if reserved_mb < s.base_mb + s.extra_mb || !advance(c, &mut s, ShareInput::Reserved)? {
            continue;
        }
        let host_vms: Vec<VmId> = store::live_vms_on(c, slot, node)?
            .into_iter()
            .filter(|(v, st)| *st == VmState::Running && *v != s.vm_id)
            .map(|(v, _)| v)
            .collect();
        let cap = CpuShare {
            weight: None,
            cap_pct: Some(cap_pct),
        };
        for v in &host_vms {
            // Capped again: an earlier lift still being retried would undo it.
            store::delete_lift(c, v)?;
            let cmd = CommandKind::SetCpu {
                vm_id: v.clone(),
                cpu: cap,
            };
            store::push_command(c, slot, node, &cmd, now)?;
        }
        s.capped = host_vms.clone();
        s.pending = host_vms.len() as u32;
        advance(
            c,
            &mut s,
            ShareInput::CapsSent {
                none: host_vms.is_empty(),
            },
        )?;
        line(
            c,
            &s.urgent_ws,
            now,
            Some(&s),
            Some(&s.vm_id),
            &format!(
                "node {node} holds {reserved_mb} MB for VMs now (dom0 {dom0_mb} MB); capping {} VM(s) of {} to {cap_pct} %",
                host_vms.len(),
                s.host_ws
            ),
        )?;
        if s.state == ShareState::Ready {
            maybe_start(c, &s.urgent_ws, now, setting)?;
        }
    }
    Ok(())
}

/// A VM's share was applied: a cap for an urgent lease, or its lifting.
pub(super) fn on_cpu_set(
    at: &OnNode,
    vm: &VmId,
    cpu: &CpuShare,
    mechanism: &str,
    setting: &Setting,
) -> Result<(), EngineError> {
    let (c, slot, node, host_ws, now) = (at.c, at.slot, at.node, at.host_ws, at.now);
    if cpu.is_default() {
        let Some(l) = store::get_lift(c, vm)? else {
            // A second answer to a lift that was sent again.
            return Ok(());
        };
        store::delete_lift(c, vm)?;
        let detail = match l.stuck_since_ms {
            Some(since) => {
                info!(workspace_id = %host_ws, vm_id = %vm, node, failures = l.failures, "CPU cap lifted after failed tries");
                format!(
                    "VM {vm} on {node}: CPU cap lifted ({mechanism}), after {} failed tr{} over {} s",
                    l.failures,
                    if l.failures == 1 { "y" } else { "ies" },
                    now.saturating_sub(since) / 1000
                )
            }
            None => format!("VM {vm} on {node}: CPU cap lifted ({mechanism})"),
        };
        return line(c, host_ws, now, None, Some(vm), &detail);
    }
    let shares = store::shares_on(c, slot, node)?;
    let Some(mut s) = shares
        .into_iter()
        .find(|s| s.state == ShareState::Capping && s.capped.contains(vm))
    else {
        return Ok(());
    };
    let pct = cpu.cap_pct.map_or("uncapped".into(), |p| format!("{p} %"));
    line(
        c,
        host_ws,
        now,
        Some(&s),
        Some(vm),
        &format!(
            "VM {vm} capped to {pct} for urgent lease {} (urgency 2) ({mechanism})",
            s.urgent_ws
        ),
    )?;
    s.pending = s.pending.saturating_sub(1);
    store::update_share(c, &s)?;
    if s.pending == 0 {
        advance(c, &mut s, ShareInput::CapsConfirmed)?;
        line(
            c,
            &s.urgent_ws,
            now,
            Some(&s),
            Some(&s.vm_id),
            &format!(
                "{} VM(s) of {} on {node} capped for this lease",
                s.capped.len(),
                s.host_ws
            ),
        )?;
        maybe_start(c, &s.urgent_ws, now, setting)?;
    }
    Ok(())
}

/// A cap (or its lifting) was refused by the node.
pub(super) fn on_cpu_set_failed(
    at: &OnNode,
    vm: &VmId,
    cpu: &CpuShare,
    reason: &str,
) -> Result<(), EngineError> {
    let (c, slot, node, host_ws, now) = (at.c, at.slot, at.node, at.host_ws, at.now);
    if cpu.is_default() {
        if store::get_lift(c, vm)?.is_none() {
            store::lift_sent(c, vm, slot, node, host_ws, now)?;
        }
        return lift_failed(c, vm, reason, now);
    }
    let shares = store::shares_on(c, slot, node)?;
    let Some(s) = shares
        .into_iter()
        .find(|s| s.state.is_active() && s.capped.contains(vm))
    else {
        return Ok(());
    };
    fall_back(
        c,
        &s.urgent_ws,
        &format!("node {node} could not cap VM {vm} of {host_ws}: {reason}"),
        now,
    )
}

/// The host's pilot refused a `reserve`: the urgent lease falls back (when
/// it was taking memory) or the giving back is recorded as failed.
pub(super) fn on_reservation_refused(at: &OnNode, reason: &str) -> Result<(), EngineError> {
    let (c, slot, node, host_ws, now) = (at.c, at.slot, at.node, at.host_ws, at.now);
    let shares = store::shares_on(c, slot, node)?;
    match shares.iter().find(|s| s.state == ShareState::Reserving) {
        Some(s) => fall_back(
            c,
            &s.urgent_ws,
            &format!(
                "node {node} (lease {host_ws}) could not lend {} MB: {reason}",
                s.extra_mb
            ),
            now,
        ),
        None => line(
            c,
            host_ws,
            now,
            None,
            None,
            &format!(
                "node {node}: memory lent to an urgent lease could not be given back: {reason}"
            ),
        ),
    }
}

/// Sends the lifting of a share's caps and the memory back to its node.
fn lift(c: &Connection, s: &ShareRow, why: &str, now: u64) -> Result<(), EngineError> {
    let live: HashSet<VmId> = store::live_vms_on(c, &s.slot_id, &s.node)?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    let mut lifted = 0;
    for v in s.capped.iter().filter(|v| live.contains(*v)) {
        let cmd = CommandKind::SetCpu {
            vm_id: v.clone(),
            cpu: CpuShare::default(),
        };
        store::push_command(c, &s.slot_id, &s.node, &cmd, now)?;
        store::lift_sent(c, v, &s.slot_id, &s.node, &s.host_ws, now)?;
        lifted += 1;
    }
    let pilot_up = store::pilots_of(c, &s.slot_id)?
        .iter()
        .any(|p| p.node == s.node && !p.state.is_terminal());
    if pilot_up {
        let back = CommandKind::Reserve {
            memory_mb: s.base_mb,
        };
        store::push_command(c, &s.slot_id, &s.node, &back, now)?;
    }
    line(
        c,
        &s.host_ws,
        now,
        Some(s),
        None,
        &format!(
            "node {}: {why}: caps lifted on {lifted} VM(s), {} MB given back",
            s.node, s.extra_mb
        ),
    )
}

/// A lift (`set_cpu {}`) unanswered this long counts as failed.
pub(super) const LIFT_ANSWER_MS: u64 = 30_000;

/// The wait after the `failures`-th failed lift in a row before the next:
/// 5 s, 10 s, 30 s, then every minute while the VM runs.
pub(super) fn lift_backoff_ms(failures: u32) -> u64 {
    match failures {
        0 | 1 => 5_000,
        2 => 10_000,
        3 => 30_000,
        _ => 60_000,
    }
}

/// A lift of `vm`'s cap failed (refused, or unanswered): the next try is
/// scheduled; the first failure of a streak goes on the host's timeline.
fn lift_failed(c: &Connection, vm: &VmId, reason: &str, now: u64) -> Result<(), EngineError> {
    let Some(mut l) = store::get_lift(c, vm)? else {
        return Ok(());
    };
    l.failures += 1;
    l.sent_ms = None;
    l.next_ms = Some(now + lift_backoff_ms(l.failures));
    l.reason = Some(reason.to_string());
    let first = l.stuck_since_ms.is_none();
    if first {
        l.stuck_since_ms = Some(now);
    }
    store::update_lift(c, &l)?;
    if !first {
        info!(workspace_id = %l.host_ws, vm_id = %vm, node = l.node, failures = l.failures, reason, "CPU cap still not lifted; will retry");
        return Ok(());
    }
    warn!(workspace_id = %l.host_ws, vm_id = %vm, node = l.node, reason, "CPU cap not lifted; will retry");
    line(
        c,
        &l.host_ws,
        now,
        None,
        Some(vm),
        &format!(
            "VM {vm} on {}: the CPU cap could NOT be lifted: {reason}; trying again in 5 s, 10 s, 30 s, then every minute while the VM runs",
            l.node
        ),
    )
}

/// One round of lifting caps that could not be lifted (the housekeeping
/// tick): a lift unanswered for [`LIFT_ANSWER_MS`] counts as failed; one
/// whose wait is over is sent again; one whose VM is gone, or whose host
/// lease ended, is dropped. True when a command was sent.
fn retry_lifts(c: &Connection, now: u64) -> Result<bool, EngineError> {
    let mut sent = false;
    for mut l in store::lifts(c)? {
        let state = store::live_vms_on(c, &l.slot_id, &l.node)?
            .into_iter()
            .find(|(v, _)| *v == l.vm_id)
            .map(|(_, st)| st);
        let host_ended = store::get_workspace(c, &l.host_ws)?.is_none_or(|w| w.state.is_terminal());
        if state.is_none() || host_ended {
            store::delete_lift(c, &l.vm_id)?;
            if l.stuck_since_ms.is_some() {
                let why = if state.is_none() {
                    "the VM is gone"
                } else {
                    "its lease ended"
                };
                line(
                    c,
                    &l.host_ws,
                    now,
                    None,
                    Some(&l.vm_id),
                    &format!(
                        "VM {} on {}: no longer lifting its CPU cap: {why}",
                        l.vm_id, l.node
                    ),
                )?;
            }
            continue;
        }
        if let Some(at) = l.sent_ms {
            if now.saturating_sub(at) >= LIFT_ANSWER_MS {
                let why = format!(
                    "no answer to set_cpu from the pilot within {} s",
                    LIFT_ANSWER_MS / 1000
                );
                lift_failed(c, &l.vm_id, &why, now)?;
            }
            continue;
        }
        let due = l.next_ms.is_none_or(|n| now >= n);
        if !due || state != Some(VmState::Running) {
            continue;
        }
        let cmd = CommandKind::SetCpu {
            vm_id: l.vm_id.clone(),
            cpu: CpuShare::default(),
        };
        store::push_command(c, &l.slot_id, &l.node, &cmd, now)?;
        l.sent_ms = Some(now);
        l.next_ms = None;
        store::update_lift(c, &l)?;
        sent = true;
    }
    Ok(sent)
}

/// Every share of the urgent lease is undone; the tick then sends its VMs
/// through the batch system.
fn fall_back(c: &Connection, ws: &WorkspaceId, why: &str, now: u64) -> Result<(), EngineError> {
    info!(workspace_id = %ws, reason = why, "urgent lease falls back to the batch system");
    for mut s in store::shares_of(c, ws)? {
        if advance(c, &mut s, ShareInput::Refused)? {
            lift(
                c,
                &s,
                &format!("urgent lease {ws} gave up sharing ({why})"),
                now,
            )?;
        }
    }
    line(
        c,
        ws,
        now,
        None,
        None,
        &format!("urgency 2: {why}; going through the batch system instead"),
    )
}

/// When every share of the lease has its memory and caps, its VMs start.
fn maybe_start(
    c: &Connection,
    id: &WorkspaceId,
    now: u64,
    setting: &Setting,
) -> Result<(), EngineError> {
    let shares = store::shares_of(c, id)?;
    let live: Vec<&ShareRow> = shares.iter().filter(|s| s.state.is_active()).collect();
    if live.is_empty() || live.iter().any(|s| s.state != ShareState::Ready) {
        return Ok(());
    }
    let mut ws = must_ws(c, id)?;
    if ws.state != WorkspaceState::Pending {
        return Ok(());
    }
    let (mut nics, peers) = workspace_context(c, &ws)?;
    store::set_workspace_peers(c, &ws.id, &peers)?;
    transition(c, &mut ws, Input::AllSlotsReserved, None, now)?;
    let weight = setting.urgency.weight;
    for s in live {
        let Some(vm) = store::get_vm(c, &s.vm_id)? else {
            continue;
        };
        let group = ws.spec.groups.iter().find(|g| g.name == vm.group);
        store::advance_vm(c, &vm.id, vm_life::Input::Mapped)?;
        store::place_vm(c, &vm.id, &s.slot_id, &vm.name, &s.node, now, None)?;
        let launch = VmLaunch {
            vm_id: vm.id.clone(),
            name: vm.name.clone(),
            memory_mb: vm.memory_mb,
            cpus: vm.cpus,
            image: vm.image.clone(),
            image_source: group.and_then(|g| network::image_source(setting.images, g)),
            nics: nics.remove(&vm.id).unwrap_or_default(),
            hostname: Some(network::hostname(&vm.group, vm.idx)),
            context: Some(protocol::pilot::Context {
                workspace_id: ws.id.to_string(),
                workspace_name: ws.name.clone(),
                group: vm.group.clone(),
                peers: Vec::new(),
                ssh_key: ws.spec.ssh_key.clone(),
            }),
            // The node is another lease's: its preemption ends this VM.
            on_preempt: OnPreempt::End,
            restore: None,
            urgency: ws.spec.urgency,
            cpu: Some(CpuShare {
                weight: Some(weight),
                cap_pct: None,
            }),
        };
        store::push_command(c, &s.slot_id, &s.node, &CommandKind::StartVm(launch), now)?;
        let mut s = s.clone();
        advance(c, &mut s, ShareInput::StartSent)?;
        store::push_timeline(
            c,
            &ws.id,
            now,
            now,
            Phase::VmStartSent,
            Some(&s.slot_id),
            Some(&s.node),
            Some(&vm.id),
            &format!(
                "{} ({}) -> {} beside {} at CPU weight {weight}",
                vm.name, vm.group, s.node, s.host_ws
            ),
        )?;
    }
    Ok(())
}

/// The urgent lease ends (from `end_slots`): its VMs on other leases' nodes
/// are destroyed; shares whose VM never started are undone at once.
pub(super) fn end_shares(c: &Connection, ws: &WorkspaceRow, now: u64) -> Result<(), EngineError> {
    let shares = store::shares_of(c, &ws.id)?;
    if shares.is_empty() {
        return Ok(());
    }
    for mut s in shares {
        if !s.state.is_active() {
            continue;
        }
        let vm_live = store::get_vm(c, &s.vm_id)?
            .is_some_and(|v| !v.state.is_terminal() && !matches!(v.state, VmState::Pending));
        if !advance(c, &mut s, ShareInput::UrgentEnds { vm_live })? {
            continue;
        }
        if s.state == ShareState::Ending {
            let cmd = CommandKind::DestroyVm {
                vm_id: s.vm_id.clone(),
            };
            store::push_command(c, &s.slot_id, &s.node, &cmd, now)?;
        } else {
            lift(c, &s, &format!("urgent lease {} ended", ws.id), now)?;
        }
    }
    // Nothing else of it will report (it holds no slot): it settles here
    // once no VM of it is left on another lease's node.
    let mut ws = ws.clone();
    maybe_settle(c, &mut ws, now)
}

/// The urgent VM is gone from its host's node (destroyed, failed): the
/// caps are lifted, the memory given back, and its lease may settle.
pub(super) fn vm_gone(c: &Connection, vm: &VmId, now: u64) -> Result<(), EngineError> {
    let Some(mut s) = store::share_of_vm(c, vm)? else {
        return Ok(());
    };
    if !advance(c, &mut s, ShareInput::VmGone)? {
        return Ok(());
    }
    lift(c, &s, &format!("urgent lease {} ended", s.urgent_ws), now)?;
    let mut ws = must_ws(c, &s.urgent_ws)?;
    maybe_settle(c, &mut ws, now)
}

/// How the host's pilot left the node an urgent VM shared.
pub(super) enum HostEnd<'a> {
    /// It gave the node back (`released`): the VM went with it.
    Released(&'a str),
    /// It went silent: the VM may still run there (unknown, kill-all).
    Lost { quiet_s: u64 },
}

/// The host's pilot left its node (from `on_released` and the silence
/// check): an urgent VM on it went with it, or is unknown; its lease
/// fails, saying why.
pub(super) fn host_ended(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    how: HostEnd,
    now: u64,
) -> Result<(), EngineError> {
    store::delete_node_room(c, slot, node)?;
    for mut s in store::shares_on(c, slot, node)? {
        if !advance(c, &mut s, ShareInput::HostGone)? {
            continue;
        }
        let mut ws = must_ws(c, &s.urgent_ws)?;
        let (host_line, reason) = match how {
            HostEnd::Released(why) => {
                store::advance_vm(c, &s.vm_id, vm_life::Input::Gone { preempted: false })?;
                (
                    format!(
                        "node {node} given back ({why}) with urgent lease {}'s VM {} on it",
                        s.urgent_ws, s.vm_id
                    ),
                    format!(
                        "best-effort lease {} ended first on node {node}, which this lease's VM {} shared ({why}); the VM went with the node",
                        s.host_ws, s.vm_id
                    ),
                )
            }
            HostEnd::Lost { quiet_s } => (
                format!(
                    "urgent lease {}'s VM {} on {node} is unknown too",
                    s.urgent_ws, s.vm_id
                ),
                format!(
                    "the pilot on node {node} (of best-effort lease {}, whose node this lease's VM {} shared) went silent (nothing for {quiet_s} s); the VM may still run until the node is cleaned, which the cluster's admins are told",
                    s.host_ws, s.vm_id
                ),
            ),
        };
        line(c, &s.host_ws, now, Some(&s), Some(&s.vm_id), &host_line)?;
        if lifecycle::wants_slots(ws.state) {
            fail_workspace(c, &mut ws, &reason, now)?;
        }
        maybe_settle(c, &mut ws, now)?;
    }
    Ok(())
}

/// For `maybe_settle`: the lease still has a VM on another lease's node.
pub(super) fn holds_shares(c: &Connection, ws: &WorkspaceId) -> Result<bool, EngineError> {
    Ok(store::shares_of(c, ws)?
        .iter()
        .any(|s| matches!(s.state, ShareState::Started | ShareState::Ending)))
}

/// The workspace a VM event is about: the VM's own when it is an urgent VM
/// on another lease's node.
pub(super) fn ws_of_vm_event(
    c: &Connection,
    slot_ws: &WorkspaceId,
    vm: &VmId,
) -> Result<Option<WorkspaceId>, EngineError> {
    Ok(store::share_of_vm(c, vm)?
        .map(|s| s.urgent_ws)
        .filter(|w| w != slot_ws))
}

/// A running lease that urgency 1 may suspend: (id, nodes it holds).
type Candidate = (WorkspaceId, u32);

/// Victims for an urgent lease short of `short` nodes: the smallest lease
/// that frees enough on its own, else the largest ones until enough (so
/// the fewest leases are disturbed). Empty when they cannot free enough.
pub(super) fn choose_victims(mut candidates: Vec<Candidate>, short: u32) -> Vec<WorkspaceId> {
    candidates.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    if let Some(one) = candidates.iter().find(|c| c.1 >= short) {
        return vec![one.0.clone()];
    }
    let mut out = Vec::new();
    let mut freed = 0;
    for c in candidates.iter().rev() {
        if freed >= short {
            break;
        }
        freed += c.1;
        out.push(c.0.clone());
    }
    if freed >= short {
        out
    } else {
        Vec::new()
    }
}

impl Engine {
    /// The create hook for urgent leases, before any pilot job is
    /// submitted: true when every VM was placed on a shared node (nothing
    /// to submit); else the lease goes through the batch system, after
    /// best-effort leases were suspended for it when the cluster is full.
    pub(super) fn place_urgent(&self, id: &WorkspaceId) -> Result<bool, EngineError> {
        let now = self.clock.now_ms();
        let spec = self.with_store(|s| Ok(must_ws(s.conn(), id)?.spec))?;
        if spec.urgency == 0 || spec.lease_kind() != LeaseKind::BestEffort {
            return Ok(false);
        }
        if spec.urgency >= 2 && self.cfg.urgency.share {
            let min_dom0 = self.cfg.pilot.min_dom0_mb;
            let shared = self.with_store(|s| {
                s.tx(|tx| {
                    let ws = must_ws(tx, id)?;
                    let placed = share_in(tx, &ws, min_dom0, now)?;
                    if let Err(why) = &placed {
                        line(tx, id, now, None, None, &format!("urgency 2: {why}"))?;
                    }
                    Ok::<_, EngineError>(placed.is_ok())
                })
            })?;
            if shared {
                info!(workspace_id = %id, "urgent lease placed on shared nodes");
                self.bump();
                return Ok(true);
            }
        }
        if self.cfg.urgency.suspend_best_effort {
            self.suspend_for_urgent(id, spec.urgency)?;
        }
        Ok(false)
    }

    /// Suspends best-effort leases when the batch system has too few free
    /// nodes for the urgent lease's pilot jobs (free: the cluster's nodes
    /// less those our live slots hold or wait for; jobs of others on the
    /// batch system are not seen, so it may suspend none when it should).
    fn suspend_for_urgent(&self, id: &WorkspaceId, urgency: u8) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let total = self.capacity.nodes;
        let (need, candidates, busy) = self.with_store(|s| {
            let c = s.conn();
            let need: u32 = store::slots_of(c, id)?.iter().map(|s| s.nodes).sum();
            let mut busy = 0u32;
            let mut candidates = Vec::new();
            for ws in store::list_workspaces(c, None)? {
                if ws.id == *id || super::pool::is_holder(&ws) {
                    continue;
                }
                let live: u32 = store::slots_of(c, &ws.id)?
                    .iter()
                    .filter(|s| !s.state.is_terminal())
                    .map(|s| s.nodes)
                    .sum();
                busy += live;
                if ws.state != WorkspaceState::Running
                    || ws.spec.lease_kind() != LeaseKind::BestEffort
                    || ws.spec.urgency > 0
                    || ws.spec.on_preempt == Some(PreemptChoice::End)
                    || live == 0
                {
                    continue;
                }
                let mut savable = true;
                for v in store::vms_of(c, &ws.id)? {
                    let Some(node) = v.node else { continue };
                    savable &= store::node_save_rate(c, &v.slot_id, &node)?.is_some();
                    // A lease hosting an urgent VM keeps its nodes.
                    savable &= !store::shares_on(c, &v.slot_id, &node)?
                        .iter()
                        .any(|s| s.state.is_active());
                }
                if savable {
                    candidates.push((ws.id, live));
                }
            }
            Ok((need, candidates, busy))
        })?;
        let free = total.saturating_sub(busy);
        if free >= need {
            return Ok(());
        }
        let short = need - free;
        let victims = choose_victims(candidates, short);
        let detail = if victims.is_empty() {
            format!(
                "urgency {urgency}: the batch system has {free} free node(s) of {total} and this lease needs {need}; no best-effort lease that can be suspended frees the {short} missing, so it waits in the batch queue"
            )
        } else {
            format!(
                "urgency {urgency}: the batch system has {free} free node(s) of {total} and this lease needs {need}; suspending best-effort lease(s) {} so their nodes go to this lease's pilot jobs",
                victims.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            )
        };
        self.with_store(|s| s.tx(|tx| line(tx, id, now, None, None, &detail)))?;
        for v in &victims {
            let reason = format!("urgent lease {id} (urgency {urgency}) needs its node(s)");
            match self.suspend_workspace(v, &reason, true) {
                Ok(()) => {
                    info!(workspace_id = %id, victim = %v, "best-effort lease suspended for an urgent lease");
                    self.with_store(|s| {
                        s.tx(|tx| {
                            line(
                                tx,
                                v,
                                now,
                                None,
                                None,
                                &format!("suspended for urgent lease {id} (urgency {urgency}); resumes when the batch system has nodes again"),
                            )
                        })
                    })?;
                }
                Err(e) => {
                    warn!(workspace_id = %id, victim = %v, error = %e, "could not suspend a best-effort lease for an urgent lease");
                    self.with_store(|s| {
                        s.tx(|tx| {
                            line(
                                tx,
                                id,
                                now,
                                None,
                                None,
                                &format!("best-effort lease {v} not suspended: {e}"),
                            )
                        })
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Caps that could not be lifted are tried again (a step of
    /// housekeeping; the schedule in [`lift_backoff_ms`]).
    pub fn retry_cap_lifts(&self) -> Result<(), EngineError> {
        // Most ticks have none: no write transaction for them.
        if self.with_store(|s| Ok(store::lifts(s.conn())?.is_empty()))? {
            return Ok(());
        }
        let now = self.clock.now_ms();
        if self.with_store(|s| s.tx(|tx| retry_lifts(tx, now)))? {
            self.bump();
        }
        Ok(())
    }

    /// Urgent leases whose sharing was given up get their own slots from
    /// the batch system: a step of housekeeping.
    pub async fn urgent_fallbacks(&self) -> Result<(), EngineError> {
        let due = self.with_store(|s| Ok(store::fallbacks_due(s.conn())?))?;
        for id in due {
            let now = self.clock.now_ms();
            let spec = self.with_store(|s| Ok(must_ws(s.conn(), &id)?.spec))?;
            let plans = self.slot_plans(&spec)?;
            let slots = self.with_store(|s| {
                s.tx(|tx| {
                    let shares = store::shares_of(tx, &id)?;
                    if shares.iter().any(|s| s.state.is_active()) {
                        return Ok(Vec::new()); // still undoing
                    }
                    for mut sh in shares {
                        advance(tx, &mut sh, ShareInput::FellBack)?;
                    }
                    let mut ws = must_ws(tx, &id)?;
                    if ws.state != WorkspaceState::Pending {
                        maybe_settle(tx, &mut ws, now)?;
                        return Ok(Vec::new());
                    }
                    let mut slots = Vec::new();
                    for plan in &plans {
                        let slot = super::client::insert_new_slot(tx, &id, plan, now)?;
                        for v in store::vms_of(tx, &id)?
                            .iter()
                            .filter(|v| v.group == plan.group)
                        {
                            let name = VmName::new(slot.id.clone(), v.id.clone()).to_string();
                            store::move_vm_to_slot(tx, &v.id, &slot.id, &name)?;
                        }
                        slots.push(slot);
                    }
                    line(
                        tx,
                        &id,
                        now,
                        None,
                        None,
                        &format!("{} pilot job(s) submitted to the batch system", slots.len()),
                    )?;
                    Ok::<_, EngineError>(slots)
                })
            })?;
            self.bump();
            for slot in &slots {
                if let Err(source) = self.submit_slot(slot).await {
                    warn!(workspace_id = %id, slot_id = %slot.id, error = %source, "pilot job submission failed");
                    let reason = format!(
                        "submitting the pilot job for group {:?} failed: {source}",
                        slot.group
                    );
                    let now = self.clock.now_ms();
                    self.with_store(|s| {
                        s.tx(|tx| {
                            super::rules::fail_on_refused_submit(tx, &slot.id, &id, &reason, now)
                        })
                    })?;
                    self.bump();
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(n: &str) -> WorkspaceId {
        WorkspaceId::parse(n).expect("id")
    }

    #[test]
    fn the_smallest_lease_that_frees_enough_is_the_victim() {
        let c = vec![
            (ws("ws-0000000a"), 4),
            (ws("ws-0000000b"), 1),
            (ws("ws-0000000c"), 2),
        ];
        assert_eq!(choose_victims(c.clone(), 2), vec![ws("ws-0000000c")]);
        assert_eq!(choose_victims(c.clone(), 1), vec![ws("ws-0000000b")]);
        // None frees 5 alone: the largest first, until enough.
        assert_eq!(
            choose_victims(c.clone(), 5),
            vec![ws("ws-0000000a"), ws("ws-0000000c")]
        );
        assert!(choose_victims(c, 8).is_empty(), "all of them free 7");
    }

    #[test]
    fn a_share_never_leaves_its_end() {
        use ShareInput::*;
        for end in [ShareState::Done, ShareState::Lost] {
            for i in [
                Reserved,
                CapsSent { none: true },
                CapsConfirmed,
                Refused,
                StartSent,
                UrgentEnds { vm_live: true },
                VmGone,
                HostGone,
                FellBack,
            ] {
                assert_eq!(next(end, i), None, "{end:?} {i:?}");
            }
        }
        // A started VM is destroyed before its caps are lifted.
        assert_eq!(
            next(ShareState::Started, UrgentEnds { vm_live: true }),
            Some(ShareState::Ending)
        );
        assert_eq!(next(ShareState::Ending, VmGone), Some(ShareState::Done));
        // Refused once started: not a fallback (the VM runs).
        assert_eq!(next(ShareState::Started, Refused), None);
    }
}
