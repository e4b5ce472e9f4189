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
                .prepare(
                    "SELECT state, COUNT(*) FROM workspaces WHERE owner <> '@pool' GROUP BY state",
                )
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

impl Engine {
    /// Sets the slot and node gauges (at each /metrics scrape).
    pub fn update_gauges(&self) -> Result<(), EngineError> {
        let slots = self.with_store(|s| {
            let mut st = s
                .conn()
                .prepare_cached("SELECT state, COUNT(*) FROM slots GROUP BY state")
                .map_err(StoreError::from)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(StoreError::from)?;
            Ok(rows
                .collect::<Result<Vec<_>, _>>()
                .map_err(StoreError::from)?)
        })?;
        self.metrics.set_slots(&slots);
        let pool = self.pool_counts()?;
        self.metrics.set_pool_slots(
            &super::pool::PoolSlotState::ALL.map(|s| (s.as_str(), i64::from(pool.get(s)))),
        );
        let stuck = self.with_store(|s| Ok(store::stuck_lift_count(s.conn())?))?;
        self.metrics.cpu_caps_stuck.set(stuck);
        let admin = super::Caller {
            user: "metrics".into(),
            admin: true,
        };
        let view = self.cluster_view(&admin)?;
        let count = |state: &str| view.nodes.iter().filter(|n| n.state == state).count() as i64;
        self.metrics.set_nodes(
            count("in_use"),
            count("needs_kill_all"),
            i64::from(view.capacity.nodes),
        );
        Ok(())
    }

    /// Observes the lease durations finished since the last call, from the
    /// timeline rows stored since (a rowid cursor, so each is seen once):
    /// request to running at each `running` entry, teardown at each `ended`
    /// entry of a destroyed or expired workspace (from its destroy request
    /// or lease end). Called by the housekeeping tick.
    pub fn observe_durations(&self) -> Result<(), EngineError> {
        use std::sync::atomic::Ordering;
        let after = self.durations_seen.load(Ordering::SeqCst);
        let (found, last) = self.with_store(|s| {
            let c = s.conn();
            let mut st = c
                .prepare_cached(
                    "SELECT t.rowid, t.phase, t.recorded_ms, w.created_ms,
                       (SELECT MIN(e.recorded_ms) FROM timeline e WHERE e.workspace_id = t.workspace_id
                          AND (e.phase = 'destroy_requested' OR e.phase = 'lease_expired')), w.state
                     FROM timeline t JOIN workspaces w ON w.id = t.workspace_id
                     WHERE t.rowid > ?1 AND (t.phase = 'running' OR t.phase = 'ended')",
                )
                .map_err(StoreError::from)?;
            let rows = st
                .query_map([after], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .map_err(StoreError::from)?;
            let found = rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from)?;
            let last = store::last_timeline_rowid(c)?;
            Ok((found, last))
        })?;
        for (_, phase, at, created, end_asked, state) in &found {
            let secs = |from: i64| (at - from).max(0) as f64 / 1000.0;
            match phase.as_str() {
                "running" => self.metrics.request_to_running.observe(secs(*created)),
                _ if state == "destroyed" || state == "expired" => {
                    if let Some(from) = end_asked {
                        self.metrics.teardown.observe(secs(*from));
                    }
                }
                _ => {}
            }
        }
        // Read under the same lock as the rows: nothing came in between.
        self.durations_seen.store(last.max(after), Ordering::SeqCst);
        Ok(())
    }

    /// Keeps why each queued job waits, as the batch system said it in
    /// this poll (only in memory: the next poll says it again). True when
    /// something changed, so watchers see the new reason.
    pub(super) fn note_queue_reasons(
        &self,
        slots: &[SlotRow],
        reports: &HashMap<lrm_adapters::JobId, lrm_adapters::JobReport>,
    ) -> bool {
        let now: HashMap<SlotId, String> = slots
            .iter()
            .filter_map(|s| {
                let job = s.job.id()?;
                let why = reports
                    .get(&lrm_adapters::JobId(job.to_string()))?
                    .reason
                    .clone()?;
                Some((s.id.clone(), why))
            })
            .collect();
        let mut kept = self.queue_reasons.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *kept != now;
        *kept = now;
        changed
    }

    /// Adds the batch system's reasons to a view: each waiting slot's, and
    /// the workspace's own reason while it is pending without one
    /// (`batch job 12 waits: Resources`), as squeue's REASON column says.
    pub(super) fn with_queue_reasons(&self, mut v: WorkspaceView) -> WorkspaceView {
        let kept = self.queue_reasons.lock().unwrap_or_else(|p| p.into_inner());
        let mut waits = Vec::new();
        for s in &mut v.slots {
            if s.state != protocol::view::SlotState::Submitted {
                continue;
            }
            if let Some(why) = kept.get(&s.id) {
                s.queue_reason = Some(why.clone());
                waits.push(format!(
                    "batch job {} waits: {why}",
                    s.job_id.as_deref().unwrap_or("?")
                ));
            }
        }
        if v.state == WorkspaceState::Pending && v.reason.is_none() && !waits.is_empty() {
            v.reason = Some(waits.join("; "));
        }
        v
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
            .filter(|k| k.state == "kept" || k.state == "saving")
            .map(|k| k.id().to_string());
        let placements = store::placements_of(c, &v.id)?;
        let cap_lift_pending = store::get_lift(c, &v.id)?.and_then(|l| {
            Some(protocol::view::CapLiftPending {
                since_ms: l.stuck_since_ms?,
                failures: l.failures,
                reason: l.reason.unwrap_or_default(),
                next_ms: l.next_ms,
            })
        });
        vms.push(VmView {
            cap_lift_pending,
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
            queue_reason: None,
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
