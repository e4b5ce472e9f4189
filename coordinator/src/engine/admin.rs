//! The admin's view of the cluster (`GET /api/v1/admin/nodes`, `workspace
//! admin nodes`, the status page) and the one thing an admin tells us:
//! that a node was cleaned with kill-all (`POST .../nodes/{node}/cleaned`).
//!
//! A node needs kill-all when one of its pilots was lost and no late
//! report said it released, when a pilot released without undoing
//! everything (`released_unclean`), or when a slot's job ended under a
//! pilot that never said it released. The mark goes when the pilot reports
//! its release after all (kill-all delivers what it left in its outbox) or
//! when an admin says the node was cleaned; the pilots' VMs that were
//! `unknown` are then destroyed. Read-only otherwise; the queries scan the
//! pilots of live slots, which is fine for a view asked by people.

use super::{Caller, Engine, EngineError};
use crate::lifecycle::vm as vm_life;
use crate::store::{self, StoreError};
use protocol::admin::{
    AdminPilotView, AdminSlotView, CleanedAnswer, CleanupView, ClusterView, NodeSize, NodeView,
};
use protocol::view::{Phase, SlotState, VmState, WorkspaceState};
use protocol::{SlotId, VmId};
use rusqlite::{params, Connection};
use std::collections::BTreeMap;
use tracing::info;

/// Pilots whose node needs kill-all: (slot, node, why).
const NEEDS_KILL_ALL: &str = "
    SELECT p.slot_id, p.node,
      CASE WHEN p.state = 'lost' THEN 'pilot lost'
           WHEN p.last_event = 'released_unclean' THEN 'released, not clean'
           ELSE 'batch job ended under its pilot' END
    FROM pilots p JOIN slots s ON s.id = p.slot_id
    WHERE p.last_event <> 'cleaned' AND (
      (p.state = 'lost' AND p.last_event <> 'released')
      OR p.last_event = 'released_unclean'
      OR ((s.state = 'released' OR s.state = 'failed' OR s.state = 'unreported')
          AND (p.state = 'started' OR p.state = 'reserved' OR p.state = 'preempting')))
    ORDER BY p.node, p.slot_id";

/// Slots whose job may run or whose pilots may hold nodes.
const LIVE_SLOTS: &str = "
    SELECT id FROM slots
    WHERE state = 'submitted' OR state = 'reserving' OR state = 'reserved' OR state = 'releasing'
      OR job_state = 'live' OR job_state = 'cancel_owed' OR job_state = 'cancelled'
    ORDER BY created_ms, id";

fn strings(c: &Connection, sql: &str) -> Result<Vec<Vec<String>>, EngineError> {
    let mut st = c.prepare_cached(sql).map_err(StoreError::from)?;
    let n = st.column_count();
    let rows = st
        .query_map([], |r| (0..n).map(|i| r.get::<_, String>(i)).collect())
        .map_err(StoreError::from)?;
    Ok(rows
        .collect::<Result<Vec<Vec<String>>, _>>()
        .map_err(StoreError::from)?)
}

fn slot_id(s: &str) -> Result<SlotId, EngineError> {
    SlotId::parse(s).map_err(|e| {
        StoreError::Corrupt {
            what: "slot id",
            detail: e.to_string(),
        }
        .into()
    })
}

fn unknown_vms(c: &Connection, slot: &SlotId, node: &str) -> Result<Vec<VmId>, EngineError> {
    Ok(store::live_vms_on(c, slot, node)?
        .into_iter()
        .filter(|(_, s)| *s == VmState::Unknown)
        .map(|(v, _)| v)
        .collect())
}

impl Engine {
    pub(super) fn admin_only(caller: &Caller) -> Result<(), EngineError> {
        if caller.admin {
            Ok(())
        } else {
            Err(EngineError::Forbidden(format!(
                "user {} is not an admin (admin = true in [[users]])",
                caller.user
            )))
        }
    }

    /// The command an admin runs on `node` for `slot`.
    fn kill_all_command(&self, node: &str, slot: &SlotId) -> String {
        let state_dir = self.cfg.pilot.state_dir.replace("%n", node);
        format!(
            "workspace-kill-all --node {} --state-dir {} --slot {slot}",
            lrm_adapters::shell_quote(node),
            lrm_adapters::shell_quote(&state_dir)
        )
    }

    /// The whole cluster as the coordinator knows it (admins only).
    pub fn cluster_view(&self, caller: &Caller) -> Result<ClusterView, EngineError> {
        Self::admin_only(caller)?;
        let mut workspaces: BTreeMap<String, u64> = WorkspaceState::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        for (state, n) in self.state_counts()? {
            workspaces.insert(state, n.max(0) as u64);
        }
        let reasons = self
            .queue_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.with_store(|s| {
            let c = s.conn();
            let mut nodes: BTreeMap<String, NodeView> = BTreeMap::new();
            let node = |nodes: &mut BTreeMap<String, NodeView>, name: &str| {
                nodes
                    .entry(name.to_string())
                    .or_insert_with(|| NodeView {
                        name: name.to_string(),
                        state: "in_use".into(),
                        slots: Vec::new(),
                        vms: 0,
                        vm_memory_mb: 0,
                    })
                    .name
                    .clone()
            };
            let mut slots = Vec::new();
            for row in strings(c, LIVE_SLOTS)? {
                let Some(slot) = store::get_slot(c, &slot_id(&row[0])?)? else {
                    continue;
                };
                let owner = store::get_workspace(c, &slot.workspace_id)?
                    .map(|w| w.owner)
                    .unwrap_or_default();
                let pilots = store::pilots_of(c, &slot.id)?;
                for p in pilots.iter().filter(|p| p.state.holds()) {
                    let name = node(&mut nodes, &p.node);
                    if let Some(n) = nodes.get_mut(&name) {
                        n.slots.push(slot.id.clone());
                    }
                }
                for v in store::vms_of(c, &slot.workspace_id)? {
                    let Some(at) = v.node.as_deref() else {
                        continue;
                    };
                    if v.slot_id != slot.id || v.state.is_terminal() {
                        continue;
                    }
                    let name = node(&mut nodes, at);
                    if let Some(n) = nodes.get_mut(&name) {
                        n.vms += 1;
                        n.vm_memory_mb += v.memory_mb;
                    }
                }
                slots.push(AdminSlotView {
                    queue_reason: (slot.state == SlotState::Submitted)
                        .then(|| reasons.get(&slot.id).cloned())
                        .flatten(),
                    id: slot.id.clone(),
                    workspace_id: slot.workspace_id.clone(),
                    owner,
                    group: slot.group.clone(),
                    state: slot.state,
                    job_id: slot.job.id().map(str::to_string),
                    job_state: slot.job.as_str().to_string(),
                    nodes: slot.nodes,
                    cores_per_node: slot.cores,
                    memory_mb_per_node: slot.memory_mb,
                    pilots: pilots
                        .into_iter()
                        .map(|p| AdminPilotView {
                            node: p.node,
                            state: p.state.as_str().to_string(),
                            last_event: p.last_event,
                            last_seen_ms: p.last_seen_ms,
                        })
                        .collect(),
                });
            }
            let mut needs_kill_all = Vec::new();
            for row in strings(c, NEEDS_KILL_ALL)? {
                let (sid, name, why) = (slot_id(&row[0])?, &row[1], &row[2]);
                let Some(slot) = store::get_slot(c, &sid)? else {
                    continue;
                };
                let last_seen_ms = store::pilots_of(c, &sid)?
                    .into_iter()
                    .find(|p| &p.node == name)
                    .map_or(0, |p| p.last_seen_ms);
                let unknown = unknown_vms(c, &sid, name)?;
                let key = node(&mut nodes, name);
                if let Some(n) = nodes.get_mut(&key) {
                    n.state = "needs_kill_all".into();
                    if !n.slots.contains(&sid) {
                        n.slots.push(sid.clone());
                    }
                    if slot.state.is_terminal() {
                        n.vms += unknown.len() as u32;
                    }
                }
                needs_kill_all.push(CleanupView {
                    node: name.clone(),
                    command: self.kill_all_command(name, &sid),
                    workspace_id: slot.workspace_id,
                    slot_id: sid,
                    why: why.clone(),
                    unknown_vms: unknown,
                    last_seen_ms,
                });
            }
            Ok(ClusterView {
                batch_system: self.lrm.kind().to_string(),
                capacity: NodeSize {
                    nodes: self.capacity.nodes,
                    cores_per_node: self.capacity.cores_per_node,
                    memory_mb_per_node: self.capacity.memory_mb_per_node,
                },
                generated_ms: self.clock.now_ms(),
                workspaces,
                nodes: nodes.into_values().collect(),
                slots,
                needs_kill_all,
            })
        })
    }

    /// An admin says `node` was cleaned (kill-all ran there): its pilots
    /// are no longer listed as needing it, and their unknown VMs are
    /// destroyed, each on its workspace's timeline.
    pub fn node_cleaned(&self, caller: &Caller, node: &str) -> Result<CleanedAnswer, EngineError> {
        Self::admin_only(caller)?;
        let now = self.clock.now_ms();
        let answer = self.with_store(|s| {
            s.tx(|tx| {
                let mut pilots = 0;
                let mut vms = Vec::new();
                for row in strings(tx, NEEDS_KILL_ALL)? {
                    if row[1] != node {
                        continue;
                    }
                    let sid = slot_id(&row[0])?;
                    let unknown = unknown_vms(tx, &sid, node)?;
                    for vm in &unknown {
                        store::advance_vm(tx, vm, vm_life::Input::Gone { preempted: false })?;
                    }
                    tx.execute(
                        "UPDATE pilots SET last_event = 'cleaned' WHERE slot_id = ?1 AND node = ?2",
                        params![sid.as_str(), node],
                    )
                    .map_err(StoreError::from)?;
                    if let Some(slot) = store::get_slot(tx, &sid)? {
                        store::push_timeline(
                            tx,
                            &slot.workspace_id,
                            now,
                            now,
                            Phase::VmDestroyed,
                            Some(&sid),
                            Some(node),
                            None,
                            &format!(
                                "node cleaned by {} (kill-all); {} VM(s) left there counted destroyed",
                                caller.user,
                                unknown.len()
                            ),
                        )?;
                    }
                    pilots += 1;
                    vms.extend(unknown);
                }
                if pilots == 0 {
                    return Err(EngineError::NotFound(format!(
                        "node {node:?} is not listed as needing kill-all"
                    )));
                }
                Ok(CleanedAnswer {
                    node: node.to_string(),
                    pilots,
                    vms,
                })
            })
        })?;
        info!(node, user = %caller.user, pilots = answer.pilots, vms = answer.vms.len(), "node marked cleaned");
        self.bump();
        Ok(answer)
    }
}
