//! Urgent leases sharing nodes (issue 17, docs/POOL.md "Urgent leases"):
//! what each pilot's node can lend (`node_rooms`, from its `reserved`
//! event and later reservation changes) and one row per urgency-2 VM placed
//! on a best-effort lease's node (`urgent_shares`), with its state
//! ([`ShareState`], whose one `next` is in `engine::urgent`).
//!
//! The urgent VM's own row (`vms`) names the urgent workspace and the host
//! slot: the slot stays the best-effort lease's, the VM knows its workspace.

use super::{Result, StoreError};
use protocol::{SlotId, VmId, WorkspaceId};
use rusqlite::{params, Connection, OptionalExtension};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS node_rooms (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, cpu_control INTEGER NOT NULL,
  cpu_how TEXT NOT NULL, dom0_mb INTEGER NOT NULL, reserved_mb INTEGER NOT NULL,
  PRIMARY KEY (slot_id, node)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS urgent_shares (
  vm_id TEXT PRIMARY KEY, urgent_ws TEXT NOT NULL, host_ws TEXT NOT NULL,
  slot_id TEXT NOT NULL, node TEXT NOT NULL, base_mb INTEGER NOT NULL,
  extra_mb INTEGER NOT NULL, state TEXT NOT NULL,
  -- JSON list of the host's VMs sent a cap; pending: caps not yet confirmed.
  capped TEXT NOT NULL DEFAULT '[]', pending INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS urgent_shares_ws ON urgent_shares(urgent_ws);
CREATE INDEX IF NOT EXISTS urgent_shares_node ON urgent_shares(slot_id, node);
-- A cap being lifted from a host's VM (`set_cpu {}`), until the pilot says
-- it is lifted: sent_ms while a lift is unanswered, else next_ms for the
-- next try; stuck_since_ms from the first failure of the current streak.
CREATE TABLE IF NOT EXISTS cpu_lifts (
  vm_id TEXT PRIMARY KEY, slot_id TEXT NOT NULL, node TEXT NOT NULL,
  host_ws TEXT NOT NULL, sent_ms INTEGER, next_ms INTEGER,
  failures INTEGER NOT NULL DEFAULT 0, stuck_since_ms INTEGER, reason TEXT);
"#;

/// What a pilot's node can lend an urgent VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoomRow {
    pub slot_id: SlotId,
    pub node: String,
    /// CPU shares can be applied there.
    pub cpu_control: bool,
    /// How (the mechanism), or why not.
    pub cpu_how: String,
    /// dom0's memory after the pilot's last reservation, MB.
    pub dom0_mb: u64,
    /// What the slot holds for VMs now, MB.
    pub reserved_mb: u64,
}

/// Where an urgency-2 VM on a best-effort lease's node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareState {
    /// `reserve` (more memory) sent to the host's pilot.
    Reserving,
    /// Caps sent to the host's VMs on that node; `pending` not yet confirmed.
    Capping,
    /// Memory and caps in place; waiting for the lease's other VMs.
    Ready,
    /// `start_vm` sent: the urgent VM is (becoming) live there.
    Started,
    /// The urgent lease ended: `destroy_vm` sent, waiting for the VM to go.
    Ending,
    /// Given up before its VM started (memory or cap refused): caps lifted,
    /// memory given back; the lease goes through the batch system (tick).
    Fallback,
    /// Over: caps lifted and memory given back.
    Done,
    /// The host's pilot gave its node back with the urgent VM on it.
    Lost,
}

impl ShareState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserving => "reserving",
            Self::Capping => "capping",
            Self::Ready => "ready",
            Self::Started => "started",
            Self::Ending => "ending",
            Self::Fallback => "fallback",
            Self::Done => "done",
            Self::Lost => "lost",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserving" => Self::Reserving,
            "capping" => Self::Capping,
            "ready" => Self::Ready,
            "started" => Self::Started,
            "ending" => Self::Ending,
            "fallback" => Self::Fallback,
            "done" => Self::Done,
            "lost" => Self::Lost,
            _ => return None,
        })
    }
    /// Still holds (or is taking, or giving back) the host's node.
    pub fn is_active(self) -> bool {
        !matches!(self, Self::Fallback | Self::Done | Self::Lost)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareRow {
    pub vm_id: VmId,
    pub urgent_ws: WorkspaceId,
    pub host_ws: WorkspaceId,
    pub slot_id: SlotId,
    pub node: String,
    /// The slot's reservation before the urgent VM (given back after it).
    pub base_mb: u64,
    pub extra_mb: u64,
    pub state: ShareState,
    pub capped: Vec<VmId>,
    pub pending: u32,
    pub created_ms: u64,
}

fn bad(what: &str, v: &str) -> StoreError {
    StoreError::Corrupt {
        what: "urgent_shares",
        detail: format!("{what} {v:?}"),
    }
}

const COLS: &str =
    "vm_id, urgent_ws, host_ws, slot_id, node, base_mb, extra_mb, state, capped, pending, created_ms";

type Raw = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    String,
    String,
    i64,
    i64,
);

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<Raw> {
    Raw::try_from(r)
}

fn build(t: Raw) -> Result<ShareRow> {
    Ok(ShareRow {
        vm_id: t.0.parse().map_err(|_| bad("vm id", &t.0))?,
        urgent_ws: t.1.parse().map_err(|_| bad("workspace id", &t.1))?,
        host_ws: t.2.parse().map_err(|_| bad("workspace id", &t.2))?,
        slot_id: t.3.parse().map_err(|_| bad("slot id", &t.3))?,
        node: t.4,
        base_mb: t.5 as u64,
        extra_mb: t.6 as u64,
        state: ShareState::parse(&t.7).ok_or_else(|| bad("state", &t.7))?,
        capped: serde_json::from_str::<Vec<String>>(&t.8)
            .ok()
            .and_then(|v| v.iter().map(|w| w.parse().ok()).collect())
            .ok_or_else(|| bad("capped", &t.8))?,
        pending: t.9 as u32,
        created_ms: t.10 as u64,
    })
}

fn ids_json(ids: &[VmId]) -> String {
    serde_json::to_string(&ids.iter().map(|v| v.as_str()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

/// Records (or updates) what a node can lend; `cpu` is `None` when only
/// the memory changed.
pub fn set_node_room(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    cpu: Option<(bool, &str)>,
    dom0_mb: u64,
    reserved_mb: u64,
) -> Result<()> {
    match cpu {
        Some((available, how)) => {
            c.prepare_cached(
                "INSERT INTO node_rooms (slot_id, node, cpu_control, cpu_how, dom0_mb, reserved_mb)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (slot_id, node) DO UPDATE SET cpu_control = excluded.cpu_control,
                   cpu_how = excluded.cpu_how, dom0_mb = excluded.dom0_mb,
                   reserved_mb = excluded.reserved_mb",
            )?
            .execute(params![
                slot.as_str(),
                node,
                available,
                how,
                dom0_mb as i64,
                reserved_mb as i64
            ])?;
        }
        None => {
            c.prepare_cached(
                "UPDATE node_rooms SET dom0_mb = ?3, reserved_mb = ?4 WHERE slot_id = ?1 AND node = ?2",
            )?
            .execute(params![slot.as_str(), node, dom0_mb as i64, reserved_mb as i64])?;
        }
    }
    Ok(())
}

/// The pilot of (slot, node) is gone: its node lends nothing any more.
pub fn delete_node_room(c: &Connection, slot: &SlotId, node: &str) -> Result<()> {
    c.prepare_cached("DELETE FROM node_rooms WHERE slot_id = ?1 AND node = ?2")?
        .execute(params![slot.as_str(), node])?;
    Ok(())
}

/// Every node whose pilot reported what it can lend.
pub fn node_rooms(c: &Connection) -> Result<Vec<NodeRoomRow>> {
    let mut st = c.prepare_cached(
        "SELECT slot_id, node, cpu_control, cpu_how, dom0_mb, reserved_mb FROM node_rooms
         ORDER BY slot_id, node",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, bool>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
        ))
    })?;
    rows.map(|r| {
        let r = r?;
        Ok(NodeRoomRow {
            slot_id: r.0.parse().map_err(|_| bad("slot id", &r.0))?,
            node: r.1,
            cpu_control: r.2,
            cpu_how: r.3,
            dom0_mb: r.4 as u64,
            reserved_mb: r.5 as u64,
        })
    })
    .collect()
}

pub fn insert_share(c: &Connection, s: &ShareRow) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO urgent_shares ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        s.vm_id.as_str(),
        s.urgent_ws.as_str(),
        s.host_ws.as_str(),
        s.slot_id.as_str(),
        s.node,
        s.base_mb as i64,
        s.extra_mb as i64,
        s.state.as_str(),
        ids_json(&s.capped),
        s.pending as i64,
        s.created_ms as i64
    ])?;
    Ok(())
}

/// Writes a share's state, caps sent and caps pending.
pub fn update_share(c: &Connection, s: &ShareRow) -> Result<()> {
    c.prepare_cached(
        "UPDATE urgent_shares SET state = ?2, capped = ?3, pending = ?4 WHERE vm_id = ?1",
    )?
    .execute(params![
        s.vm_id.as_str(),
        s.state.as_str(),
        ids_json(&s.capped),
        s.pending as i64
    ])?;
    Ok(())
}

fn shares_where(c: &Connection, cond: &str, args: &[&str]) -> Result<Vec<ShareRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM urgent_shares WHERE {cond} ORDER BY created_ms, vm_id"
    ))?;
    let rows = st.query_map(rusqlite::params_from_iter(args), from_row)?;
    rows.map(|r| build(r?)).collect()
}

/// The shares of an urgent workspace (every state).
pub fn shares_of(c: &Connection, ws: &WorkspaceId) -> Result<Vec<ShareRow>> {
    shares_where(c, "urgent_ws = ?1", &[ws.as_str()])
}

/// The shares on one node of one slot (every state).
pub fn shares_on(c: &Connection, slot: &SlotId, node: &str) -> Result<Vec<ShareRow>> {
    shares_where(c, "slot_id = ?1 AND node = ?2", &[slot.as_str(), node])
}

/// Urgent workspaces with a share that fell back (for the tick).
pub fn fallbacks_due(c: &Connection) -> Result<Vec<WorkspaceId>> {
    let mut st = c.prepare_cached(
        "SELECT DISTINCT urgent_ws FROM urgent_shares WHERE state = 'fallback' ORDER BY urgent_ws",
    )?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| {
        let r = r?;
        r.parse().map_err(|_| bad("workspace id", &r))
    })
    .collect()
}

/// True when the VM is an urgent one on another lease's node.
pub fn share_of_vm(c: &Connection, vm: &VmId) -> Result<Option<ShareRow>> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {COLS} FROM urgent_shares WHERE vm_id = ?1"
        ))?
        .query_row([vm.as_str()], from_row)
        .optional()?;
    row.map(build).transpose()
}

/// Removes a slot stored by a create and never submitted (an urgent lease
/// whose VMs went to shared nodes instead); false if it was submitted.
pub fn delete_unsubmitted_slot(c: &Connection, slot: &SlotId) -> Result<bool> {
    let n = c
        .prepare_cached("DELETE FROM slots WHERE id = ?1 AND job_state = 'unsubmitted'")?
        .execute([slot.as_str()])?;
    Ok(n > 0)
}

/// A cap being lifted from a host's VM (`engine::urgent`, "lifting caps").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiftRow {
    pub vm_id: VmId,
    pub slot_id: SlotId,
    pub node: String,
    pub host_ws: WorkspaceId,
    /// A `set_cpu {}` is out, unanswered, since then.
    pub sent_ms: Option<u64>,
    /// When to send the next one (after a failure).
    pub next_ms: Option<u64>,
    /// Failed tries in the current streak.
    pub failures: u32,
    /// The streak's first failure: the cap is stuck since then.
    pub stuck_since_ms: Option<u64>,
    /// The last failure's reason.
    pub reason: Option<String>,
}

const LIFT_COLS: &str =
    "vm_id, slot_id, node, host_ws, sent_ms, next_ms, failures, stuck_since_ms, reason";

type LiftRaw = (
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
    i64,
    Option<i64>,
    Option<String>,
);

fn lift_from_row(r: &rusqlite::Row) -> rusqlite::Result<LiftRaw> {
    LiftRaw::try_from(r)
}

fn lift_build(t: LiftRaw) -> Result<LiftRow> {
    let bad = |what: &str, v: &str| StoreError::Corrupt {
        what: "cpu_lifts",
        detail: format!("{what} {v:?}"),
    };
    Ok(LiftRow {
        vm_id: t.0.parse().map_err(|_| bad("vm id", &t.0))?,
        slot_id: t.1.parse().map_err(|_| bad("slot id", &t.1))?,
        node: t.2,
        host_ws: t.3.parse().map_err(|_| bad("workspace id", &t.3))?,
        sent_ms: t.4.map(|v| v as u64),
        next_ms: t.5.map(|v| v as u64),
        failures: t.6 as u32,
        stuck_since_ms: t.7.map(|v| v as u64),
        reason: t.8,
    })
}

/// A lift was sent to `vm` (kept with its streak when one is under way).
pub fn lift_sent(
    c: &Connection,
    vm: &VmId,
    slot: &SlotId,
    node: &str,
    host_ws: &WorkspaceId,
    now: u64,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO cpu_lifts (vm_id, slot_id, node, host_ws, sent_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (vm_id) DO UPDATE SET slot_id = excluded.slot_id, node = excluded.node,
           host_ws = excluded.host_ws, sent_ms = excluded.sent_ms, next_ms = NULL",
    )?
    .execute(params![
        vm.as_str(),
        slot.as_str(),
        node,
        host_ws.as_str(),
        now as i64
    ])?;
    Ok(())
}

/// Writes a lift's try, streak and reason.
pub fn update_lift(c: &Connection, l: &LiftRow) -> Result<()> {
    c.prepare_cached(
        "UPDATE cpu_lifts SET sent_ms = ?2, next_ms = ?3, failures = ?4, stuck_since_ms = ?5,
           reason = ?6 WHERE vm_id = ?1",
    )?
    .execute(params![
        l.vm_id.as_str(),
        l.sent_ms.map(|v| v as i64),
        l.next_ms.map(|v| v as i64),
        l.failures as i64,
        l.stuck_since_ms.map(|v| v as i64),
        l.reason
    ])?;
    Ok(())
}

/// The lift of `vm`'s cap under way, if any.
pub fn get_lift(c: &Connection, vm: &VmId) -> Result<Option<LiftRow>> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {LIFT_COLS} FROM cpu_lifts WHERE vm_id = ?1"
        ))?
        .query_row([vm.as_str()], lift_from_row)
        .optional()?;
    row.map(lift_build).transpose()
}

/// Every lift under way, oldest VM id first.
pub fn lifts(c: &Connection) -> Result<Vec<LiftRow>> {
    let mut st = c.prepare_cached(&format!("SELECT {LIFT_COLS} FROM cpu_lifts ORDER BY vm_id"))?;
    let rows = st.query_map([], lift_from_row)?;
    rows.map(|r| lift_build(r?)).collect()
}

/// The lift of `vm` is over (lifted, the VM gone, capped again).
pub fn delete_lift(c: &Connection, vm: &VmId) -> Result<()> {
    c.prepare_cached("DELETE FROM cpu_lifts WHERE vm_id = ?1")?
        .execute([vm.as_str()])?;
    Ok(())
}

/// Caps that could not be lifted (a failure streak under way).
pub fn stuck_lift_count(c: &Connection) -> Result<i64> {
    Ok(
        c.prepare_cached("SELECT COUNT(*) FROM cpu_lifts WHERE stuck_since_ms IS NOT NULL")?
            .query_row([], |r| r.get(0))?,
    )
}
