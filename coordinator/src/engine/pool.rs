//! The slot pool (issue 17, `[pool]`, docs/POOL.md): pilot slots held idle
//! through the batch system so that a lease starts on a node already held
//! instead of waiting in the batch queue. Not the address pools of
//! `crate::network` (`Pools`, `AddressPlan`).
//!
//! Pool slots are slots (one node each) of a hidden **holder** workspace
//! (owner `@pool`, never listed, never expiring, refusing every transition
//! so that no rule that ends a workspace ends it: a pilot of the holder
//! that goes ends only its own slot). A create whose VMs all fit idle pool
//! slots **adopts** them ([`place`]): their slot rows move to the lease in
//! the create's transaction, guarded by the holder as owner, and each gets
//! `bind`; once every one is `bound` the VMs start as on any slot. The
//! lease's end sends `unbind` ([`ends_by_unbind`]); `unbound` gives the slot
//! back to the holder, idle. The housekeeping tick moves leases waiting in
//! the batch queue onto idle slots by the same rules ([`Engine::move_queued`];
//! their batch jobs are cancelled), grows the pool through the batch system
//! and gives back slots idle too long ([`Engine::pool_tick`]).

use super::rules::{maybe_settle, must_ws, start_vms, Setting};
use super::{Engine, EngineError};
use crate::config::PoolConfig;
use crate::lifecycle::slot::{self as slot_life};
use crate::lifecycle::vm as vm_life;
use crate::policy::SlotPlan;
use crate::store::{self, PoolPhase, PoolSlotRow, SlotRow, WorkspaceRow};
use protocol::pilot::{CommandKind, ReservationChange};
use protocol::spec::WorkspaceSpec;
use protocol::view::{Phase, SlotState, WorkspaceState};
use protocol::{SlotId, VmId, WorkspaceId};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tracing::{info, warn};

/// Owner of the holder workspace (user names cannot start with `@`).
pub const POOL_OWNER: &str = "@pool";

/// Group name of a free pool slot.
const POOL_GROUP: &str = "pool";

/// A warm snapshot that failed is tried again after this.
const WARM_RETRY_MS: u64 = 60_000;

/// A `prepare_warm` unanswered this long counts as failed.
const WARM_ANSWER_MS: u64 = 300_000;

/// After a pool job's submit failed, the next try waits this long (the
/// tick runs every `tick_ms`; a refusing batch system is not asked 4 times a second).
const SUBMIT_BACKOFF_MS: u64 = 10_000;

/// The holder workspace's id: fixed, so a restarted coordinator finds it.
pub fn holder_id() -> WorkspaceId {
    WorkspaceId::parse("ws-00000000").unwrap_or_else(|_| unreachable!("a valid id"))
}

/// True for the pool's holder workspace.
pub(super) fn is_holder(ws: &WorkspaceRow) -> bool {
    ws.owner == POOL_OWNER
}

/// What the engine keeps of the pool between ticks (not state: that is in SQLite).
#[derive(Default)]
pub(super) struct PoolRuntime {
    /// Clock ms before which no pool job is submitted (after a failed submit).
    backoff_until: AtomicU64,
    /// The coordinator is ending every lease (`--end-leases-on-exit`): the
    /// pool does not grow, and gives back every slot it holds.
    closing: AtomicBool,
}

/// Where a pool slot is, as the admin view and `/metrics` say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolSlotState {
    /// Its pilot job is queued or starting.
    Growing,
    /// Reserved, waiting for a lease.
    Idle,
    /// Adopted by a lease (binding, bound or unbinding).
    Bound,
    /// Being given back (released, or its job cancelled).
    Draining,
}

impl PoolSlotState {
    pub const ALL: [PoolSlotState; 4] = [Self::Idle, Self::Bound, Self::Growing, Self::Draining];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Growing => "growing",
            Self::Idle => "idle",
            Self::Bound => "bound",
            Self::Draining => "draining",
        }
    }

    fn of(p: &PoolSlotRow, s: &SlotRow) -> Self {
        match (p.phase, s.state) {
            (PoolPhase::Binding | PoolPhase::Bound | PoolPhase::Unbinding, _) => Self::Bound,
            (PoolPhase::Free, SlotState::Submitted | SlotState::Reserving) => Self::Growing,
            (PoolPhase::Free, SlotState::Reserved) => Self::Idle,
            (PoolPhase::Free, _) => Self::Draining,
        }
    }
}

/// One pool slot in the admin view (`workspace admin pool`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSlotView {
    pub slot_id: SlotId,
    pub node: Option<String>,
    pub state: PoolSlotState,
    /// `free`, `binding`, `bound`, `unbinding`.
    pub phase: String,
    /// Its batch job.
    pub job_id: Option<String>,
    /// When it entered its phase (idle since, for an idle slot), epoch ms.
    pub since_ms: u64,
    /// When its pilot gives the node back on its own, epoch ms.
    pub deadline_ms: Option<u64>,
    /// The lease it serves.
    pub bound_to: Option<WorkspaceId>,
    /// Leases it has served.
    pub leases: u64,
}

/// The pool as the admin sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    /// False when `[pool]` is off (the list then holds what is left of an earlier pool).
    pub enabled: bool,
    pub min_idle_nodes: u32,
    pub max_nodes: u32,
    pub max_share: f64,
    pub idle_timeout_s: u64,
    pub idle_memory_mb: u64,
    pub walltime_s: u64,
    /// The coordinator's clock when the view was made (for remaining walltime), epoch ms.
    pub now_ms: u64,
    pub slots: Vec<PoolSlotView>,
    /// The clean snapshot of each warm image (`warm_images`).
    #[serde(default)]
    pub warm: Vec<WarmView>,
}

/// A warm image's snapshot in the admin view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmView {
    pub image: String,
    /// `preparing`, `ready`, `failed` or `stale` (a warm start could not use it).
    pub state: String,
    /// `<holder>/<template vm>/g<generation>` in the checkpoint store.
    pub checkpoint: String,
    pub sha256: Option<String>,
    pub memory_mb: u64,
    /// Where it was made.
    pub node: String,
    pub updated_ms: u64,
    pub reason: Option<String>,
}

/// Counts of live pool slots by [`PoolSlotState`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub idle: u32,
    pub bound: u32,
    pub growing: u32,
    pub draining: u32,
}

impl PoolCounts {
    fn of(live: &[(PoolSlotRow, SlotRow)]) -> Self {
        let mut n = Self::default();
        for (p, s) in live {
            match PoolSlotState::of(p, s) {
                PoolSlotState::Idle => n.idle += 1,
                PoolSlotState::Bound => n.bound += 1,
                PoolSlotState::Growing => n.growing += 1,
                PoolSlotState::Draining => n.draining += 1,
            }
        }
        n
    }

    pub fn get(&self, s: PoolSlotState) -> u32 {
        match s {
            PoolSlotState::Idle => self.idle,
            PoolSlotState::Bound => self.bound,
            PoolSlotState::Growing => self.growing,
            PoolSlotState::Draining => self.draining,
        }
    }

    fn total(&self) -> u32 {
        self.idle + self.bound + self.growing + self.draining
    }
}

/// The holder workspace, stored if missing.
fn ensure_holder(c: &Connection, cfg: &PoolConfig, now: u64) -> Result<WorkspaceId, EngineError> {
    let id = holder_id();
    match store::get_workspace(c, &id)? {
        Some(ws) if is_holder(&ws) => return Ok(id),
        Some(ws) => {
            return Err(EngineError::Conflict(format!(
                "workspace {id} (owner {}) holds the id of the slot pool's holder; the pool cannot start",
                ws.owner
            )))
        }
        None => {}
    }
    let spec = WorkspaceSpec::parse(&format!(
        "name = \"slot-pool\"\nduration = {}\n[[group]]\nname = \"{POOL_GROUP}\"\ncount = 1\nmemory_mb = {}\nimage = \"-\"\n",
        cfg.walltime_s.max(60),
        protocol::spec::MIN_MEMORY_MB
    ))?;
    let ws = WorkspaceRow {
        id: id.clone(),
        name: "slot-pool".into(),
        owner: POOL_OWNER.into(),
        spec,
        state: WorkspaceState::Running,
        reason: None,
        created_ms: now,
        updated_ms: now,
        expires_ms: None,
    };
    store::insert_workspace(c, &ws)?;
    store::push_timeline(
        c,
        &id,
        now,
        now,
        Phase::Requested,
        None,
        None,
        None,
        "the slot pool's holder: its slots are the pool's idle pilots",
    )?;
    Ok(id)
}

/// Which pool slots a create may adopt, per plan (in plan order, one slot
/// per node), or `None` when its VMs do not all fit idle slots: then it goes
/// through the batch system as without a pool.
///
/// A slot fits when it is idle (the holder's, reserved), its pilot's end
/// (`deadline_ms`) comes after the lease could end (`max_duration` or
/// `duration`, plus `slack_ms`, the startup slack a submitted pilot gets
/// too), and its node has the cores and memory the plan asks per node.
/// Urgency 0 takes only the idle slots beyond `min_idle_nodes` (those are
/// kept for urgent leases); 1 and 2 take any.
#[allow(clippy::too_many_arguments)]
pub(super) fn place(
    c: &Connection,
    cfg: &PoolConfig,
    node_memory_mb: u64,
    spec: &WorkspaceSpec,
    plans: &[SlotPlan],
    slack_ms: u64,
    now: u64,
) -> Result<Option<Vec<Vec<PoolSlotRow>>>, EngineError> {
    if !cfg.enabled() || spec.start.is_some() {
        return Ok(None);
    }
    let holder = holder_id();
    let live = store::live_pool_slots(c)?;
    // A slot making a warm snapshot would answer the bind only after it.
    let busy = store::warm_preparing_slots(c)?;
    let idle: Vec<&(PoolSlotRow, SlotRow)> = live
        .iter()
        .filter(|(p, s)| {
            PoolSlotState::of(p, s) == PoolSlotState::Idle
                && s.workspace_id == holder
                && !busy.contains(&s.id)
        })
        .collect();
    let usable = if spec.urgency == 0 {
        idle.len().saturating_sub(cfg.min_idle_nodes as usize)
    } else {
        idle.len()
    };
    let needed: usize = plans.iter().map(|p| p.nodes as usize).sum();
    if needed == 0 || needed > usable {
        return Ok(None);
    }
    let lease_end = now
        .saturating_add(spec.walltime().as_millis() as u64)
        .saturating_add(slack_ms);
    // The slots whose own end is soonest first: the later ones stay for
    // longer leases.
    let mut fitting: Vec<&PoolSlotRow> = idle
        .iter()
        .filter(|(p, _)| p.deadline_ms.is_some_and(|d| d >= lease_end) && p.node.is_some())
        .map(|(p, _)| p)
        .collect();
    fitting.sort_by_key(|p| p.deadline_ms);
    let mut cores_of = std::collections::HashMap::new();
    for (p, s) in &live {
        cores_of.insert(p.slot_id.clone(), s.cores);
    }
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(plans.len());
    let mut budget = usable;
    for plan in plans {
        if plan.memory_mb_per_node > node_memory_mb {
            return Ok(None);
        }
        let mut mine = Vec::new();
        for p in &fitting {
            if mine.len() == plan.nodes as usize || budget == 0 {
                break;
            }
            let cores = cores_of.get(&p.slot_id).copied().unwrap_or(0);
            if taken.contains(&p.slot_id) || cores < plan.cores_per_node {
                continue;
            }
            taken.insert(p.slot_id.clone());
            budget -= 1;
            mine.push((*p).clone());
        }
        if mine.len() < plan.nodes as usize {
            return Ok(None);
        }
        out.push(mine);
    }
    Ok(Some(out))
}

/// Adopts `slot` for lease `ws` (group and memory per node of `plan`) and
/// queues its `bind`. Fails the create when another create took it first
/// (the transaction is rolled back; the client may ask again).
/// `moved_from`: the batch job the lease waited in, when it moves from the
/// batch queue ([`Engine::move_queued`]); `None` at create.
pub(super) fn adopt(
    c: &Connection,
    slot: &PoolSlotRow,
    ws: &WorkspaceId,
    plan: &SlotPlan,
    moved_from: Option<&str>,
    now: u64,
) -> Result<(), EngineError> {
    let node = slot.node.clone().unwrap_or_default();
    if !store::adopt(
        c,
        &slot.slot_id,
        &holder_id(),
        ws,
        &plan.group,
        plan.memory_mb_per_node,
        now,
    )? {
        return Err(EngineError::Conflict(format!(
            "pool slot {} was taken by another lease while this one was placed; ask again",
            slot.slot_id
        )));
    }
    let bind = CommandKind::Bind {
        workspace_id: ws.clone(),
        memory_mb: plan.memory_mb_per_node,
    };
    store::push_command(c, &slot.slot_id, &node, &bind, now)?;
    let left = slot
        .deadline_ms
        .map(|d| format!("; it holds the node until {}", protocol::time::format_ms(d)))
        .unwrap_or_default();
    store::push_timeline(
        c,
        ws,
        now,
        now,
        Phase::SlotSubmitted,
        Some(&slot.slot_id),
        Some(&node),
        None,
        &match moved_from {
            None => format!(
                "group {:?}: from idle pool slot {} on node {node}, no batch queue; bind {} MB sent{left}",
                plan.group, slot.slot_id, plan.memory_mb_per_node
            ),
            Some(job) => format!(
                "group {:?}: moved from the batch queue to idle pool slot {} on node {node} (batch job {job} cancelled); bind {} MB sent{left}",
                plan.group, slot.slot_id, plan.memory_mb_per_node
            ),
        },
    )?;
    store::push_timeline(
        c,
        &holder_id(),
        now,
        now,
        Phase::SlotSubmitted,
        Some(&slot.slot_id),
        Some(&node),
        None,
        &format!("taken by lease {ws}"),
    )?;
    info!(workspace_id = %ws, slot_id = %slot.slot_id, node, "pool slot adopted");
    Ok(())
}

/// The pool's half of `end_slots`: a pool slot serving a lease is not
/// released but unbound (its batch job goes on, for the pool). True when
/// the slot was handled here (an `unbind` is or was sent); false for any
/// other slot, and for a pool slot whose pilot is gone (it ends as any slot).
pub(super) fn ends_by_unbind(
    c: &Connection,
    ws: &WorkspaceRow,
    slot: &SlotRow,
    now: u64,
) -> Result<bool, EngineError> {
    if is_holder(ws) {
        return Ok(false);
    }
    let Some(p) = store::get_pool_slot(c, &slot.id)? else {
        return Ok(false);
    };
    let pilots = store::pilots_of(c, &slot.id)?;
    let reserved = crate::lifecycle::pilot::PilotState::Reserved;
    let Some(pilot) = pilots.iter().find(|p| p.state == reserved) else {
        return Ok(false);
    };
    match p.phase {
        PoolPhase::Unbinding => Ok(true),
        PoolPhase::Binding | PoolPhase::Bound => {
            store::set_pool_phase(c, &slot.id, p.phase, PoolPhase::Unbinding, now)?;
            let unbind = CommandKind::Unbind {
                workspace_id: ws.id.clone(),
                memory_mb: p.idle_mb,
            };
            store::push_command(c, &slot.id, &pilot.node, &unbind, now)?;
            store::push_timeline(
                c,
                &ws.id,
                now,
                now,
                Phase::SlotReleased,
                Some(&slot.id),
                Some(&pilot.node),
                None,
                "unbind sent: the VMs here go, the pool slot stays (its batch job goes on)",
            )?;
            Ok(true)
        }
        PoolPhase::Free => Ok(false),
    }
}

/// True when no pool slot of `ws` still waits for its `bind` to be
/// answered (its VMs start only on bound slots).
pub(super) fn none_binding(c: &Connection, ws: &WorkspaceId) -> Result<bool, EngineError> {
    for s in store::slots_of(c, ws)? {
        if let Some(p) = store::get_pool_slot(c, &s.id)? {
            if p.phase == PoolPhase::Binding {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The batch slots of a lease still waiting for the batch system, which
/// may move onto idle pool slots ([`Engine::move_queued`]); `None` for any
/// other lease. It waits when it is a best-effort lease, pending, with all
/// its VMs pending in slots whose batch jobs were submitted and have not
/// started a pilot yet (no pilot of the lease has reported: a lease some
/// of whose pilots already hold nodes stays where it is). Never moved: an
/// advance reservation (the batch system's reservation guarantees it), a
/// lease resuming after a suspend (its new slots are the resume's), an
/// urgent lease sharing nodes or giving that up, a lease already on a pool
/// slot, and one a pool slot refused (`reserve_failed` on its timeline:
/// moving it again would only meet the same refusal).
fn waits_in_queue(c: &Connection, ws: &WorkspaceRow) -> Result<Option<Vec<SlotRow>>, EngineError> {
    if is_holder(ws) || ws.state != WorkspaceState::Pending || ws.spec.start.is_some() {
        return Ok(None);
    }
    if store::reservation_of(c, &ws.id)?.is_some()
        || store::has_phase(c, &ws.id, Phase::ReserveFailed)?
        || store::shares_of(c, &ws.id)?
            .iter()
            .any(|s| s.state.is_active() || s.state == store::ShareState::Fallback)
    {
        return Ok(None);
    }
    let vms = store::vms_of(c, &ws.id)?;
    if vms.is_empty()
        || vms
            .iter()
            .any(|v| v.state != protocol::view::VmState::Pending)
    {
        return Ok(None);
    }
    let current: std::collections::HashSet<&SlotId> = vms.iter().map(|v| &v.slot_id).collect();
    let mut slots = Vec::new();
    for s in store::slots_of(c, &ws.id)? {
        if !current.contains(&s.id) {
            continue;
        }
        let waiting = s.state == SlotState::Submitted
            && matches!(s.job, crate::lifecycle::slot::Job::Live(_))
            && store::pilots_of(c, &s.id)?.is_empty()
            && store::get_pool_slot(c, &s.id)?.is_none();
        if !waiting {
            return Ok(None);
        }
        slots.push(s);
    }
    Ok(Some(slots))
}

/// A pool pilot reserved its idle memory: the slot is idle from now.
pub(super) fn on_reserved(
    c: &Connection,
    slot: &SlotRow,
    node: &str,
    deadline_ms: Option<u64>,
    now: u64,
) -> Result<(), EngineError> {
    if store::get_pool_slot(c, &slot.id)?.is_some() {
        store::set_pool_reserved(c, &slot.id, node, deadline_ms, now)?;
    }
    Ok(())
}

/// `bound`: the slot holds the lease's memory. When no slot of the lease
/// waits any more, its VMs are mapped and started as on any reserved slot.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_bound(
    c: &Connection,
    slot: &SlotRow,
    ws: &mut WorkspaceRow,
    node: &str,
    ts_ms: u64,
    bound_to: &WorkspaceId,
    r: &ReservationChange,
    now: u64,
    setting: &Setting,
) -> Result<(), EngineError> {
    if *bound_to != ws.id
        || !store::set_pool_phase(c, &slot.id, PoolPhase::Binding, PoolPhase::Bound, now)?
    {
        warn!(slot_id = %slot.id, node, %bound_to, "bound for a lease this slot is not binding; ignored");
        return Ok(());
    }
    store::set_pool_deadline(c, &slot.id, r.deadline_ms)?;
    store::push_timeline(
        c,
        &ws.id,
        ts_ms,
        now,
        Phase::MemoryReserved,
        Some(&slot.id),
        Some(node),
        None,
        &format!(
            "pool slot bound: dom0 {} -> {} MB ({} MB for VMs) in {} ms",
            r.dom0_before_mb, r.dom0_after_mb, r.reserved_mb, r.balloon_ms
        ),
    )?;
    let all = super::rules::current_slots_reserved(c, &ws.id)?;
    if all && ws.state == WorkspaceState::Pending && none_binding(c, &ws.id)? {
        start_vms(c, ws, now, setting)?;
    }
    Ok(())
}

/// `unbound`: the lease's VMs on the slot are gone; the slot returns to the
/// holder, idle. The lease settles once nothing else is left.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_unbound(
    c: &Connection,
    slot: &SlotRow,
    ws: &mut WorkspaceRow,
    node: &str,
    ts_ms: u64,
    vms_destroyed: &[VmId],
    r: &ReservationChange,
    now: u64,
) -> Result<(), EngineError> {
    let holder = holder_id();
    if is_holder(ws) || !store::give_back(c, &slot.id, &ws.id, &holder, r.reserved_mb, now)? {
        warn!(slot_id = %slot.id, node, "unbound for a slot no lease holds; ignored");
        return Ok(());
    }
    store::set_pool_deadline(c, &slot.id, r.deadline_ms)?;
    let gone = vm_life::Input::Gone {
        preempted: ws.state == WorkspaceState::Preempted,
    };
    for (vm, state) in store::live_vms_on(c, &slot.id, node)? {
        if super::suspend::keeps(state) {
            continue; // saved: a checkpoint now, not gone
        }
        store::advance_vm_from(c, &vm, state, gone)?;
        store::end_placement(c, &vm, now)?;
        if vms_destroyed.contains(&vm) {
            store::push_timeline(
                c,
                &ws.id,
                ts_ms,
                now,
                Phase::VmDestroyed,
                Some(&slot.id),
                Some(node),
                Some(&vm),
                "destroyed with the unbind",
            )?;
        }
    }
    store::push_timeline(
        c,
        &ws.id,
        ts_ms,
        now,
        Phase::SlotReleased,
        Some(&slot.id),
        Some(node),
        None,
        &format!(
            "pool slot unbound: {} VM(s) destroyed, back to the pool holding {} MB (dom0 {} MB)",
            vms_destroyed.len(),
            r.reserved_mb,
            r.dom0_after_mb
        ),
    )?;
    store::push_timeline(
        c,
        &holder,
        ts_ms,
        now,
        Phase::SlotReleased,
        Some(&slot.id),
        Some(node),
        None,
        &format!("idle again after lease {}", ws.id),
    )?;
    info!(workspace_id = %ws.id, slot_id = %slot.id, node, "pool slot back in the pool");
    maybe_settle(c, ws, now)
}

/// `reservation_refused` of a `bind`: the slot stays the pool's, idle, and
/// the lease's VMs meant for it go through the batch system: a new slot,
/// submitted by the next tick ([`Engine::pool_tick`]). Of an `unbind`: the
/// node could not take the slot back to idle; the slot is released.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_refused(
    c: &Connection,
    slot: &SlotRow,
    ws: &mut WorkspaceRow,
    node: &str,
    ts_ms: u64,
    command: protocol::pilot::ReservationCommand,
    reason: &str,
    reserved_mb: u64,
    now: u64,
) -> Result<(), EngineError> {
    use protocol::pilot::ReservationCommand as Cmd;
    let Some(p) = store::get_pool_slot(c, &slot.id)? else {
        return Ok(());
    };
    let holder = holder_id();
    match command {
        // Refused while binding, or after the lease ended meanwhile (its
        // unbind then finds an idle slot and is refused too: ignored below).
        Cmd::Bind
            if matches!(p.phase, PoolPhase::Binding | PoolPhase::Unbinding) && !is_holder(ws) =>
        {
            let vms: Vec<_> = store::vms_of(c, &ws.id)?
                .into_iter()
                .filter(|v| v.slot_id == slot.id)
                .collect();
            store::give_back(c, &slot.id, &ws.id, &holder, reserved_mb, now)?;
            store::push_timeline(
                c,
                &holder,
                ts_ms,
                now,
                Phase::ReserveFailed,
                Some(&slot.id),
                Some(node),
                None,
                &format!("bind for lease {} refused ({reason}); idle again", ws.id),
            )?;
            if !crate::lifecycle::wants_slots(ws.state) || vms.is_empty() {
                return maybe_settle(c, ws, now);
            }
            let plan = SlotPlan {
                group: slot.group.clone(),
                nodes: vms.len() as u32,
                cores_per_node: vms.iter().map(|v| v.cpus).max().unwrap_or(1),
                memory_mb_per_node: slot.memory_mb,
            };
            let new = super::client::insert_new_slot(c, &ws.id, &plan, now)?;
            for vm in &vms {
                let name = protocol::VmName::new(new.id.clone(), vm.id.clone()).to_string();
                store::move_vm_to_slot(c, &vm.id, &new.id, &name)?;
            }
            store::push_pool_fallback(c, &new.id)?;
            store::push_timeline(
                c,
                &ws.id,
                ts_ms,
                now,
                Phase::ReserveFailed,
                Some(&slot.id),
                Some(node),
                None,
                &format!(
                    "pool slot refused the bind ({reason}); group {:?} goes through the batch system instead (slot {})",
                    slot.group, new.id
                ),
            )?;
            Ok(())
        }
        Cmd::Unbind if p.phase == PoolPhase::Unbinding => {
            // The slot cannot go back to idle: it ends with this lease.
            store::push_timeline(
                c,
                &ws.id,
                ts_ms,
                now,
                Phase::SlotReleased,
                Some(&slot.id),
                Some(node),
                None,
                &format!("pool slot could not unbind ({reason}); it is released instead"),
            )?;
            if !store::has_release(c, &slot.id, node)? {
                store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
            }
            store::advance_slot(c, &slot.id, slot_life::Input::ReleaseAsked)?;
            Ok(())
        }
        _ => {
            warn!(slot_id = %slot.id, node, ?command, reason, "reservation refused; nothing to do");
            Ok(())
        }
    }
}

/// `warm_prepared` / `warm_prepare_failed`: the image's snapshot is ready
/// (its digest kept for warm starts) or failed (tried again later).
#[allow(clippy::too_many_arguments)]
pub(super) fn on_warm_answer(
    c: &Connection,
    slot: &SlotRow,
    node: &str,
    ts_ms: u64,
    checkpoint: &protocol::pilot::CheckpointId,
    sha256: Option<&str>,
    detail: &str,
    now: u64,
) -> Result<(), EngineError> {
    let (state, reason) = match sha256 {
        Some(_) => ("ready", None),
        None => ("failed", Some(detail)),
    };
    let image = store::set_warm_outcome(
        c,
        &checkpoint.vm_id,
        checkpoint.generation,
        state,
        sha256,
        reason,
        now,
    )?;
    let Some(image) = image else {
        warn!(slot_id = %slot.id, node, %checkpoint, "warm snapshot answer for no snapshot asked; ignored");
        return Ok(());
    };
    store::push_timeline(
        c,
        &holder_id(),
        ts_ms,
        now,
        if sha256.is_some() {
            Phase::VmSuspended
        } else {
            Phase::SuspendFailed
        },
        Some(&slot.id),
        Some(node),
        None,
        &format!("warm snapshot of image {image:?} ({checkpoint}) {state}: {detail}"),
    )?;
    info!(image, slot_id = %slot.id, node, state, "warm snapshot answered");
    Ok(())
}

/// The warm start for `vm` when it runs on a pool slot and its image has a
/// ready snapshot of its memory size: restore from it (`warm: true`).
pub(super) fn warm_restore(
    c: &Connection,
    vm: &store::VmRow,
) -> Result<Option<protocol::pilot::RestoreFrom>, EngineError> {
    if store::get_pool_slot(c, &vm.slot_id)?.is_none() {
        return Ok(None);
    }
    let Some(w) = store::get_warm(c, &vm.image)? else {
        return Ok(None);
    };
    let (Some(sha256), true, true) = (w.sha256, w.state == "ready", w.memory_mb == vm.memory_mb)
    else {
        return Ok(None);
    };
    Ok(Some(protocol::pilot::RestoreFrom {
        checkpoint: protocol::pilot::CheckpointId {
            workspace_id: holder_id(),
            vm_id: w.vm_id,
            generation: w.generation,
        },
        sha256,
        warm: true,
    }))
}

/// How a warm start came up, on the lease's timeline; a snapshot that
/// could not be used is made again.
pub(super) fn on_warm_started(
    c: &Connection,
    ws: &WorkspaceRow,
    vm: &store::VmRow,
    node: &str,
    ts_ms: u64,
    outcome: &protocol::pilot::WarmOutcome,
    now: u64,
) -> Result<(), EngineError> {
    use protocol::pilot::WarmOutcome;
    let detail = match outcome {
        WarmOutcome::Restored {
            checkpoint,
            bytes,
            restore_ms,
        } => format!(
            "warm: restored from the clean snapshot of image {:?} ({checkpoint}, {bytes} bytes) in {restore_ms} ms, on a fresh overlay",
            vm.image
        ),
        WarmOutcome::ColdBooted {
            checkpoint,
            cause,
            reason,
        } => {
            if let Some(w) = store::get_warm(c, &vm.image)? {
                if w.vm_id == checkpoint.vm_id && w.generation == checkpoint.generation {
                    store::set_warm_outcome(c, &w.vm_id, w.generation, "stale", None, Some(reason), now)?;
                }
            }
            format!(
                "cold booted: the warm snapshot of image {:?} ({checkpoint}) could not be used ({cause:?}: {reason}); a new one is prepared",
                vm.image
            )
        }
    };
    store::push_timeline(
        c,
        &ws.id,
        ts_ms,
        now,
        Phase::VmStarted,
        Some(&vm.slot_id),
        Some(node),
        Some(&vm.id),
        &detail,
    )?;
    Ok(())
}

impl Engine {
    /// The pool's turn of the housekeeping tick: the holder exists; leases
    /// waiting in the batch queue move onto idle slots that fit them
    /// ([`Engine::move_queued`]) and their batch jobs are cancelled; idle
    /// slots past `idle_timeout_s` are given back while more than
    /// `min_idle_nodes` are idle; pool jobs are submitted while idle and
    /// growing slots are fewer than `min_idle_nodes`, within `max_nodes`
    /// and `max_share` of the cluster; leases whose bind was refused get
    /// their batch jobs.
    pub async fn pool_tick(&self) -> Result<(), EngineError> {
        let cfg = &self.cfg.pool;
        if !cfg.enabled() {
            // No pool, nothing to do: not even a query on each tick.
            return Ok(());
        }
        self.submit_fallbacks().await;
        let now = self.clock.now_ms();
        let closing = self.pool.closing.load(Ordering::SeqCst);
        let (new_slots, moved) = self.with_store(|s| {
            s.tx(|tx| {
                let holder_id = ensure_holder(tx, cfg, now)?;
                let holder = must_ws(tx, &holder_id)?;
                if closing {
                    super::rules::end_slots(tx, &holder, now)?;
                    return Ok((Vec::new(), 0));
                }
                // Idle slots serve the batch queue before any is given back.
                let moved = self.move_queued(tx, now)?;
                let live = store::live_pool_slots(tx)?;
                let mut counts = PoolCounts::of(&live);
                // Shrink: the longest idle first.
                let mut idle: Vec<&(PoolSlotRow, SlotRow)> = live
                    .iter()
                    .filter(|(p, s)| PoolSlotState::of(p, s) == PoolSlotState::Idle)
                    .collect();
                idle.sort_by_key(|(p, _)| p.since_ms);
                for (p, s) in idle {
                    if counts.idle <= cfg.min_idle_nodes {
                        break;
                    }
                    let idle_ms = now.saturating_sub(p.since_ms);
                    if idle_ms < cfg.idle_timeout_s * 1000 {
                        continue;
                    }
                    let node = p.node.clone().unwrap_or_default();
                    store::push_command(tx, &s.id, &node, &CommandKind::Release, now)?;
                    store::advance_slot(tx, &s.id, slot_life::Input::ReleaseAsked)?;
                    store::push_timeline(
                        tx,
                        &holder_id,
                        now,
                        now,
                        Phase::SlotReleased,
                        Some(&s.id),
                        Some(&node),
                        None,
                        &format!(
                            "idle for {} s (pool.idle_timeout_s = {}) with {} idle: given back",
                            idle_ms / 1000,
                            cfg.idle_timeout_s,
                            counts.idle
                        ),
                    )?;
                    info!(slot_id = %s.id, node, idle_s = idle_ms / 1000, "idle pool slot given back");
                    counts.idle -= 1;
                    counts.draining += 1;
                }
                self.prepare_warm(tx, now)?;
                // Grow.
                if now < self.pool.backoff_until.load(Ordering::SeqCst) {
                    return Ok((Vec::new(), moved));
                }
                let share = (f64::from(self.capacity.nodes) * cfg.max_share).floor() as u32;
                let cap = cfg.max_nodes().min(share).min(self.capacity.nodes);
                let want = cfg
                    .min_idle_nodes
                    .saturating_sub(counts.idle + counts.growing);
                let n = want.min(cap.saturating_sub(counts.total()));
                let plan = SlotPlan {
                    group: POOL_GROUP.into(),
                    nodes: 1,
                    cores_per_node: self.capacity.cores_per_node,
                    memory_mb_per_node: cfg.idle_memory_mb,
                };
                let mut out = Vec::new();
                for _ in 0..n {
                    let slot = super::client::insert_new_slot(tx, &holder_id, &plan, now)?;
                    store::insert_pool_slot(tx, &slot.id, cfg.idle_memory_mb, now)?;
                    out.push(slot);
                }
                Ok::<_, EngineError>((out, moved))
            })
        })?;
        if moved > 0 {
            // The moved leases' batch jobs, through the cancel path (a
            // refused cancel stays owed and is tried again every second).
            self.bump();
            self.retry_cancels().await;
        }
        for slot in &new_slots {
            if let Err(source) = self.submit_slot(slot).await {
                warn!(slot_id = %slot.id, error = %source, "pool job submission failed; retried in {} s", SUBMIT_BACKOFF_MS / 1000);
                let now = self.clock.now_ms();
                self.pool
                    .backoff_until
                    .store(now + SUBMIT_BACKOFF_MS, Ordering::SeqCst);
                self.with_store(|s| {
                    s.tx(|tx| {
                        super::rules::abandon_unsubmitted(tx, &slot.id)?;
                        store::push_timeline(
                            tx,
                            &holder_id(),
                            now,
                            now,
                            Phase::SlotSubmitted,
                            Some(&slot.id),
                            None,
                            None,
                            &format!("submitting a pool job failed: {source}"),
                        )?;
                        Ok::<_, EngineError>(())
                    })
                })?;
            } else {
                info!(slot_id = %slot.id, "pool job submitted");
            }
        }
        if !new_slots.is_empty() {
            self.bump();
        }
        Ok(())
    }

    /// Leases waiting in the batch queue move onto idle pool slots: the
    /// pool's turn of the tick, in its transaction, before the pool shrinks
    /// or grows. In the queue's order ([`super::order::queue_rank`]:
    /// urgency 2, 1, then 0; then as `best_effort_order` orders the batch
    /// queue), each lease that [`waits_in_queue`] and whose VMs ALL fit
    /// idle slots under the rules of a create ([`place`]: deadline, cores
    /// and memory, urgency 0 only beyond `min_idle_nodes`, none making a
    /// warm snapshot) adopts them as a create does ([`adopt`]: guarded by
    /// the holder, so no slot twice, also across a restart), its VMs move
    /// onto them, and its batch slots end ([`super::rules::end_slot`]):
    /// their jobs are owed a cancel, which the caller sends through the
    /// cancel path (retried until the batch system takes it). A lease that
    /// does not fit stays queued; one behind it that fits may go.
    /// Returns how many leases moved.
    fn move_queued(&self, c: &Connection, now: u64) -> Result<usize, EngineError> {
        let cfg = &self.cfg.pool;
        // Cheap first (this runs on every tick): no idle slot, nothing to
        // do; none beyond the minimum, only urgent leases may move.
        let holder = holder_id();
        let busy = store::warm_preparing_slots(c)?;
        let idle = store::live_pool_slots(c)?
            .iter()
            .filter(|(p, s)| {
                PoolSlotState::of(p, s) == PoolSlotState::Idle
                    && s.workspace_id == holder
                    && !busy.contains(&s.id)
            })
            .count();
        if idle == 0 {
            return Ok(0);
        }
        let ordinary = idle > cfg.min_idle_nodes as usize;
        let mut queued = Vec::new();
        for ws in store::pending_leases(c, if ordinary { 0 } else { 1 })? {
            if let Some(slots) = waits_in_queue(c, &ws)? {
                let nodes = slots.iter().map(|s| s.nodes).sum();
                let rank = super::order::queue_rank(
                    self.cfg.reservations.best_effort_order,
                    ws.spec.urgency,
                    ws.created_ms,
                    nodes,
                    ws.spec.walltime(),
                );
                queued.push((rank, ws, slots));
            }
        }
        if queued.is_empty() {
            return Ok(0);
        }
        queued.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.id.as_str().cmp(b.1.id.as_str()))
        });
        let node_mb = self
            .capacity
            .memory_mb_per_node
            .saturating_sub(self.cfg.pilot.min_dom0_mb);
        let slack_ms = self.cfg.pilot.startup_slack_s * 1000;
        let mut moved = 0;
        for (_, ws, old) in queued {
            let plans = match self.slot_plans(&ws.spec) {
                Ok(p) => p,
                Err(e) => {
                    warn!(workspace_id = %ws.id, error = %e, "queued lease not planned again; it stays in the batch queue");
                    continue;
                }
            };
            let Some(placed) = place(c, cfg, node_mb, &ws.spec, &plans, slack_ms, now)? else {
                continue;
            };
            // Each VM of a group onto one of the group's slots, as at create.
            let vms = store::vms_of(c, &ws.id)?;
            let mut moves = Vec::new();
            for (plan, pool_slots) in plans.iter().zip(&placed) {
                let mut mine: Vec<&store::VmRow> =
                    vms.iter().filter(|v| v.group == plan.group).collect();
                mine.sort_by_key(|v| v.idx);
                if mine.len() != pool_slots.len() {
                    moves.clear();
                    break;
                }
                moves.extend(mine.into_iter().zip(pool_slots).map(|(v, p)| (plan, v, p)));
            }
            if moves.len() != vms.len() {
                warn!(workspace_id = %ws.id, "queued lease's VMs do not match its plan; it stays in the batch queue");
                continue;
            }
            for (plan, vm, ps) in moves {
                let job = old
                    .iter()
                    .find(|s| s.id == vm.slot_id)
                    .and_then(|s| s.job.id())
                    .unwrap_or("?");
                adopt(c, ps, &ws.id, plan, Some(job), now)?;
                let name = protocol::VmName::new(ps.slot_id.clone(), vm.id.clone()).to_string();
                store::move_vm_to_slot(c, &vm.id, &ps.slot_id, &name)?;
            }
            for slot in &old {
                super::rules::end_slot(c, slot, now)?;
            }
            let jobs: Vec<&str> = old.iter().filter_map(|s| s.job.id()).collect();
            info!(workspace_id = %ws.id, urgency = ws.spec.urgency, jobs = ?jobs, "queued lease moved onto idle pool slots");
            moved += 1;
        }
        Ok(moved)
    }

    /// Warm images (`[pool] warm_images`) without a usable snapshot get one
    /// made on an idle pool slot whose node has a checkpoint store (one at a
    /// time per image; a failed one is tried again after a minute); a
    /// preparation whose slot left the pool, or unanswered for five minutes,
    /// counts as failed.
    fn prepare_warm(&self, c: &Connection, now: u64) -> Result<(), EngineError> {
        let cfg = &self.cfg.pool;
        if cfg.warm_images.is_empty() {
            return Ok(());
        }
        let live = store::live_pool_slots(c)?;
        for row in store::warm_rows(c)? {
            if row.state != "preparing" {
                continue;
            }
            let here = live.iter().any(|(p, s)| {
                s.id == row.slot_id && p.phase == PoolPhase::Free && s.state == SlotState::Reserved
            });
            let late = now.saturating_sub(row.updated_ms) > WARM_ANSWER_MS;
            if !here || late {
                let why = if here {
                    "no answer from the pilot in 5 minutes"
                } else {
                    "the slot left the pool before it answered"
                };
                store::set_warm_outcome(
                    c,
                    &row.vm_id,
                    row.generation,
                    "failed",
                    None,
                    Some(why),
                    now,
                )?;
                warn!(image = row.image, slot_id = %row.slot_id, why, "warm snapshot not made");
            }
        }
        let holder = holder_id();
        let mut busy = store::warm_preparing_slots(c)?;
        for image in &cfg.warm_images {
            let row = store::get_warm(c, image)?;
            let due = match &row {
                None => true,
                Some(r) => {
                    r.state == "stale"
                        || (r.state == "failed"
                            && now.saturating_sub(r.updated_ms) >= WARM_RETRY_MS)
                }
            };
            if !due {
                continue;
            }
            let mut chosen = None;
            for (p, s) in &live {
                let Some(node) = &p.node else { continue };
                if PoolSlotState::of(p, s) == PoolSlotState::Idle
                    && s.workspace_id == holder
                    && !busy.contains(&s.id)
                    && store::node_save_rate(c, &s.id, node)?.is_some()
                {
                    chosen = Some((s.id.clone(), node.clone()));
                    break;
                }
            }
            let Some((slot, node)) = chosen else { continue };
            let vm_id = VmId::generate();
            let generation = row.as_ref().map_or(1, |r| r.generation + 1);
            let group: Option<protocol::spec::GroupSpec> =
                serde_json::from_value(serde_json::json!({
                    "name": "warm", "count": 1, "memory_mb": cfg.idle_memory_mb, "image": image,
                }))
                .ok();
            let launch = protocol::pilot::VmLaunch {
                vm_id: vm_id.clone(),
                name: protocol::VmName::new(slot.clone(), vm_id.clone()).to_string(),
                memory_mb: cfg.idle_memory_mb,
                cpus: 1,
                image: image.clone(),
                image_source: group
                    .and_then(|g| crate::network::image_source(&self.cfg.images, &g)),
                nics: Vec::new(),
                hostname: None,
                context: None,
                on_preempt: Default::default(),
                restore: None,
                urgency: 0,
                cpu: None,
            };
            let to = protocol::pilot::CheckpointId {
                workspace_id: holder.clone(),
                vm_id: vm_id.clone(),
                generation,
            };
            store::push_command(
                c,
                &slot,
                &node,
                &CommandKind::PrepareWarm {
                    launch,
                    to: to.clone(),
                    ready_timeout_s: 120,
                },
                now,
            )?;
            store::set_warm_preparing(
                c,
                &store::WarmRow {
                    image: image.clone(),
                    state: "preparing".into(),
                    vm_id,
                    generation,
                    sha256: None,
                    memory_mb: cfg.idle_memory_mb,
                    slot_id: slot.clone(),
                    node: node.clone(),
                    updated_ms: now,
                    reason: None,
                },
            )?;
            store::push_timeline(
                c,
                &holder,
                now,
                now,
                Phase::VmStartSent,
                Some(&slot),
                Some(&node),
                None,
                &format!("preparing the warm snapshot of image {image:?} ({to})"),
            )?;
            info!(image, slot_id = %slot, node, "warm snapshot asked for");
            busy.push(slot);
        }
        Ok(())
    }

    /// Submits the batch jobs of leases whose pool slot refused its bind.
    async fn submit_fallbacks(&self) {
        let taken =
            self.with_store(|s| s.tx(|tx| Ok::<_, EngineError>(store::take_pool_fallbacks(tx)?)));
        let slots = match taken {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "reading the pool's fallbacks failed; will retry");
                return;
            }
        };
        for slot in slots {
            if let Err(source) = self.submit_slot(&slot).await {
                warn!(slot_id = %slot.id, error = %source, "fallback pilot job submission failed");
                let now = self.clock.now_ms();
                let reason = format!(
                    "submitting the pilot job for group {:?} (its pool slot refused) failed: {source}",
                    slot.group
                );
                let r = self.with_store(|s| {
                    s.tx(|tx| {
                        super::rules::fail_on_refused_submit(
                            tx,
                            &slot.id,
                            &slot.workspace_id,
                            &reason,
                            now,
                        )
                    })
                });
                if let Err(e) = r {
                    warn!(slot_id = %slot.id, error = %e, "recording a failed fallback submit");
                }
            }
        }
    }

    /// The pool as the admin sees it (`GET /api/v1/admin/pool`, `workspace
    /// admin pool`; admin token only).
    pub fn pool_view(&self, caller: &super::Caller) -> Result<PoolView, EngineError> {
        Self::admin_only(caller)?;
        let cfg = &self.cfg.pool;
        let (live, warm) = self.with_store(|s| {
            Ok((
                store::live_pool_slots(s.conn())?,
                store::warm_rows(s.conn())?,
            ))
        })?;
        Ok(PoolView {
            warm: warm
                .into_iter()
                .map(|w| WarmView {
                    checkpoint: protocol::pilot::CheckpointId {
                        workspace_id: holder_id(),
                        vm_id: w.vm_id,
                        generation: w.generation,
                    }
                    .to_string(),
                    image: w.image,
                    state: w.state,
                    sha256: w.sha256,
                    memory_mb: w.memory_mb,
                    node: w.node,
                    updated_ms: w.updated_ms,
                    reason: w.reason,
                })
                .collect(),
            enabled: cfg.enabled(),
            min_idle_nodes: cfg.min_idle_nodes,
            max_nodes: cfg.max_nodes(),
            max_share: cfg.max_share,
            idle_timeout_s: cfg.idle_timeout_s,
            idle_memory_mb: cfg.idle_memory_mb,
            walltime_s: cfg.walltime_s,
            now_ms: self.clock.now_ms(),
            slots: live
                .iter()
                .map(|(p, s)| PoolSlotView {
                    slot_id: p.slot_id.clone(),
                    node: p.node.clone(),
                    state: PoolSlotState::of(p, s),
                    phase: p.phase.as_str().into(),
                    job_id: s.job.id().map(str::to_string),
                    since_ms: p.since_ms,
                    deadline_ms: p.deadline_ms,
                    bound_to: p.bound_to.clone(),
                    leases: p.leases,
                })
                .collect(),
        })
    }

    /// Live pool slots by state (for `/metrics`).
    pub fn pool_counts(&self) -> Result<PoolCounts, EngineError> {
        let live = self.with_store(|s| Ok(store::live_pool_slots(s.conn())?))?;
        Ok(PoolCounts::of(&live))
    }

    /// The pool stops growing and gives back every slot it holds (the
    /// coordinator is ending every lease before it stops).
    pub fn close_pool(&self) {
        self.pool.closing.store(true, Ordering::SeqCst);
    }

    /// True while some pool slot is not over yet.
    pub(super) fn pool_holds_slots(&self) -> Result<bool, EngineError> {
        Ok(self.pool_counts()?.total() > 0)
    }
}
