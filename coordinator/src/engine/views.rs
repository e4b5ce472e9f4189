//! What clients and metrics read: a workspace's view (VMs, slots, pilots),
//! whether it is settled, row and state counts. Read-only.

use super::{Engine, EngineError};
use crate::network::{self};
use crate::store::{self, SlotRow, StoreError, WorkspaceRow};
use protocol::view::{PilotView, SlotView, VmView, WorkspaceState, WorkspaceView};
use protocol::{SlotId, VmId};
use rusqlite::Connection;
use std::collections::HashMap;

impl Engine {
    /// When each workspace was asked for, ran and ended, from its own
    /// records (the simulator's figures and `replay`'s are both read so).
    pub fn lease_times(&self) -> Result<Vec<store::LeaseTimes>, EngineError> {
        self.with_store(|s| Ok(store::lease_times(s.conn())?))
    }

    /// Row counts of every table (for tests proving a refused request changed nothing).
    pub fn row_counts(&self) -> Result<Vec<(String, i64)>, EngineError> {
        self.with_store(|s| Ok(store::row_counts(s.conn())?))
    }

    /// Counts of workspaces per state, for /metrics.
    pub fn state_counts(&self) -> Result<Vec<(String, i64)>, EngineError> {
        self.with_store(|s| {
            let mut st = s
                .conn()
                .prepare("SELECT state, COUNT(*) FROM workspaces GROUP BY state")
                .map_err(StoreError::from)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(StoreError::from)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(StoreError::from)?);
            }
            Ok(out)
        })
    }
}

/// Settled: the state is final and every slot is given back with no cancel
/// left to do — nothing of the workspace remains on a node or in the LRM.
pub(super) fn is_settled(state: WorkspaceState, slots: &[SlotRow]) -> bool {
    state.is_terminal()
        && slots
            .iter()
            .all(|s| s.state.is_terminal() && !s.job.owes_cancel())
}

pub(super) fn build_view(c: &Connection, ws: WorkspaceRow) -> Result<WorkspaceView, EngineError> {
    let slots = store::slots_of(c, &ws.id)?;
    let jobs: HashMap<SlotId, Option<String>> = slots
        .iter()
        .map(|s| (s.id.clone(), s.job.id().map(str::to_string)))
        .collect();
    let mut nics: HashMap<VmId, Vec<protocol::pilot::Nic>> = HashMap::new();
    for (vm, nic) in store::addresses_of(c, &ws.id)? {
        nics.entry(vm).or_default().push(nic);
    }
    // Guaranteed leases: their start, and each VM's lateness against it.
    let held = store::reservation_of(c, &ws.id)?;
    let started = match &held {
        Some(_) => store::vm_started_at(c, &ws.id)?,
        None => HashMap::new(),
    };
    let mut vms = Vec::new();
    for v in store::vms_of(c, &ws.id)? {
        let checkpoint = store::latest_checkpoint(c, &v.id)?
            .filter(|k| k.state != "failed")
            .map(|k| k.id().to_string());
        let placements = store::placements_of(c, &v.id)?;
        vms.push(VmView {
            start_offset_ms: held.as_ref().and_then(|r| {
                let at = *started.get(&v.id)?;
                Some(at as i64 - r.start_ms as i64)
            }),
            checkpoint,
            placements,
            hostname: Some(network::hostname(&v.group, v.idx)),
            nics: nics.remove(&v.id).unwrap_or_default(),
            job_id: jobs.get(&v.slot_id).cloned().flatten(),
            id: v.id,
            name: v.name,
            group: v.group,
            node: v.node,
            slot_id: v.slot_id,
            state: v.state,
            memory_mb: v.memory_mb,
            cpus: v.cpus,
        });
    }
    let settled = is_settled(ws.state, &slots);
    let mut slot_views = Vec::new();
    for s in slots {
        let pilots = store::pilots_of(c, &s.id)?
            .into_iter()
            .map(|p| PilotView {
                node: p.node,
                pilot_id: p.pilot_id,
                last_event: p.last_event,
            })
            .collect();
        slot_views.push(SlotView {
            id: s.id,
            group: s.group,
            job_id: s.job.id().map(str::to_string),
            nodes: s.nodes,
            cores_per_node: s.cores,
            memory_mb_per_node: s.memory_mb,
            state: s.state,
            pilots,
        });
    }
    Ok(WorkspaceView {
        id: ws.id,
        name: ws.name,
        owner: ws.owner,
        state: ws.state,
        reason: ws.reason,
        created_ms: ws.created_ms,
        updated_ms: ws.updated_ms,
        expires_ms: ws.expires_ms,
        kind: ws.spec.lease_kind(),
        start_ms: held.as_ref().map(|r| r.start_ms),
        reservation: held
            .as_ref()
            .map(|r| format!("{} {} ({})", r.lrm, r.lrm_id, r.state.as_str())),
        settled,
        vms,
        slots: slot_views,
    })
}
