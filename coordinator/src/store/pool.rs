//! The slot pool's rows (issue 17, `engine::pool`): one per pool slot, beside
//! its `slots` row. The slot row says where the slot is in its own life
//! (submitted, reserved, releasing ...) and whose it is (the hidden holder
//! workspace while free, a lease while bound); this row says where it is in
//! the pool's: `free` -> `binding` -> `bound` -> `unbinding` -> `free`, with
//! when it last changed, its node and its pilot's own end (`deadline_ms`).
//! A slot row that moves between workspaces does so only through
//! [`adopt`] and [`give_back`], each guarded by the owner it expects.

use super::{corrupt, parse_id, Result, SlotRow};
use protocol::{SlotId, WorkspaceId};
use rusqlite::{params, Connection, OptionalExtension};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS pool_slots (
  slot_id TEXT PRIMARY KEY, phase TEXT NOT NULL, node TEXT, since_ms INTEGER NOT NULL,
  deadline_ms INTEGER, bound_to TEXT, leases INTEGER NOT NULL DEFAULT 0,
  idle_mb INTEGER NOT NULL DEFAULT 0);
-- The clean snapshot of each warm image ([pool] warm_images): 'preparing'
-- (prepare_warm sent to slot_id on node), 'ready' (sha256 is what a warm
-- start presents), 'failed' (reason; tried again later), 'stale' (a warm
-- start could not use it: prepared again).
CREATE TABLE IF NOT EXISTS pool_warm (
  image TEXT PRIMARY KEY, state TEXT NOT NULL, vm_id TEXT NOT NULL, generation INTEGER NOT NULL,
  sha256 TEXT, memory_mb INTEGER NOT NULL, slot_id TEXT NOT NULL, node TEXT NOT NULL,
  updated_ms INTEGER NOT NULL, reason TEXT);
-- New slots of leases whose pool slot refused its bind, for the tick to submit.
CREATE TABLE IF NOT EXISTS pool_fallbacks (slot_id TEXT PRIMARY KEY);
"#;

/// Where a pool slot is in the pool's life (its slot row says the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolPhase {
    /// The holder's: growing, idle or draining, as its slot's state says.
    Free,
    /// Adopted by a lease; `bind` sent, not yet answered.
    Binding,
    /// Serving its lease.
    Bound,
    /// The lease is over here; `unbind` sent, not yet answered.
    Unbinding,
}

impl PoolPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Binding => "binding",
            Self::Bound => "bound",
            Self::Unbinding => "unbinding",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "free" => Self::Free,
            "binding" => Self::Binding,
            "bound" => Self::Bound,
            "unbinding" => Self::Unbinding,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSlotRow {
    pub slot_id: SlotId,
    pub phase: PoolPhase,
    /// The node its pilot holds, once it reported.
    pub node: Option<String>,
    /// When the phase last changed (idle since, for a free reserved slot).
    pub since_ms: u64,
    /// When its pilot gives the node back on its own (from `reserved`).
    pub deadline_ms: Option<u64>,
    /// The lease it serves (binding, bound, unbinding).
    pub bound_to: Option<WorkspaceId>,
    /// Leases it has served.
    pub leases: u64,
    /// What it holds while idle (MB): the `unbind` asks for it back.
    pub idle_mb: u64,
}

const COLS: &str =
    "p.slot_id, p.phase, p.node, p.since_ms, p.deadline_ms, p.bound_to, p.leases, p.idle_mb";

type Raw = (
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<String>,
    i64,
    i64,
);

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<Raw> {
    Raw::try_from(r)
}

fn build(t: Raw) -> Result<PoolSlotRow> {
    Ok(PoolSlotRow {
        slot_id: parse_id("slot id", t.0)?,
        phase: PoolPhase::parse(&t.1).ok_or_else(|| corrupt("pool phase", &t.1))?,
        node: t.2,
        since_ms: t.3 as u64,
        deadline_ms: t.4.map(|d| d as u64),
        bound_to: t.5.map(|w| parse_id("workspace id", w)).transpose()?,
        leases: t.6 as u64,
        idle_mb: t.7 as u64,
    })
}

/// A new pool slot (its slot row is the holder's, just stored).
pub fn insert_pool_slot(c: &Connection, slot: &SlotId, idle_mb: u64, now: u64) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO pool_slots (slot_id, phase, since_ms, idle_mb) VALUES (?1, 'free', ?2, ?3)",
    )?
    .execute(params![slot.as_str(), now as i64, idle_mb as i64])?;
    Ok(())
}

pub fn get_pool_slot(c: &Connection, slot: &SlotId) -> Result<Option<PoolSlotRow>> {
    let t = c
        .prepare_cached(&format!(
            "SELECT {COLS} FROM pool_slots p WHERE slot_id = ?1"
        ))?
        .query_row([slot.as_str()], from_row)
        .optional()?;
    t.map(build).transpose()
}

/// The pilot reserved: its node and own end; idle from now.
pub fn set_pool_reserved(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    deadline_ms: Option<u64>,
    now: u64,
) -> Result<()> {
    c.prepare_cached(
        "UPDATE pool_slots SET node = ?2, deadline_ms = COALESCE(?3, deadline_ms), since_ms = ?4
         WHERE slot_id = ?1",
    )?
    .execute(params![
        slot.as_str(),
        node,
        deadline_ms.map(|d| d as i64),
        now as i64
    ])?;
    Ok(())
}

/// A newer `deadline_ms` (a `bound` or `unbound` says it again).
pub fn set_pool_deadline(c: &Connection, slot: &SlotId, deadline_ms: u64) -> Result<()> {
    c.prepare_cached("UPDATE pool_slots SET deadline_ms = ?2 WHERE slot_id = ?1")?
        .execute(params![slot.as_str(), deadline_ms as i64])?;
    Ok(())
}

/// Moves the pool slot from phase `from` to `to`; false when it was not in `from`.
pub fn set_pool_phase(
    c: &Connection,
    slot: &SlotId,
    from: PoolPhase,
    to: PoolPhase,
    now: u64,
) -> Result<bool> {
    let n = c
        .prepare_cached(
            "UPDATE pool_slots SET phase = ?3, since_ms = ?4 WHERE slot_id = ?1 AND phase = ?2",
        )?
        .execute(params![
            slot.as_str(),
            from.as_str(),
            to.as_str(),
            now as i64
        ])?;
    Ok(n == 1)
}

/// Every pool slot whose slot has not ended, with its slot row, oldest first.
pub fn live_pool_slots(c: &Connection) -> Result<Vec<(PoolSlotRow, SlotRow)>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS}, s.id FROM pool_slots p JOIN slots s ON s.id = p.slot_id
         WHERE s.state <> 'released' AND s.state <> 'failed' AND s.state <> 'unreported'
         ORDER BY s.created_ms, s.id"
    ))?;
    let rows: Vec<(Raw, String)> = st
        .query_map([], |r| Ok((from_row(r)?, r.get::<_, String>(8)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (raw, id) in rows {
        let slot_id: SlotId = parse_id("slot id", id)?;
        let slot = super::get_slot(c, &slot_id)?
            .ok_or_else(|| corrupt("pool slot", format!("no slot row for {slot_id}")))?;
        out.push((build(raw)?, slot));
    }
    Ok(out)
}

/// A lease takes a free, reserved pool slot: its slot row moves from the
/// holder to `ws` (group and memory of the lease), the pool row to
/// `binding`. Guarded by the holder as owner and the phase, so a slot is
/// never taken twice; false when someone else took it first.
pub fn adopt(
    c: &Connection,
    slot: &SlotId,
    holder: &WorkspaceId,
    ws: &WorkspaceId,
    group: &str,
    memory_mb: u64,
    now: u64,
) -> Result<bool> {
    let moved = c
        .prepare_cached(
            "UPDATE slots SET workspace_id = ?3, grp = ?4, memory_mb = ?5
             WHERE id = ?1 AND workspace_id = ?2 AND state = 'reserved'",
        )?
        .execute(params![
            slot.as_str(),
            holder.as_str(),
            ws.as_str(),
            group,
            memory_mb as i64
        ])?;
    if moved != 1 {
        return Ok(false);
    }
    let n = c
        .prepare_cached(
            "UPDATE pool_slots SET phase = 'binding', bound_to = ?2, since_ms = ?3, leases = leases + 1
             WHERE slot_id = ?1 AND phase = 'free'",
        )?
        .execute(params![slot.as_str(), ws.as_str(), now as i64])?;
    if n != 1 {
        return Err(corrupt(
            "pool slot",
            format!("slot {slot} was the holder's but its pool row is not free"),
        ));
    }
    Ok(true)
}

/// The slot returns from lease `ws` to the holder, free and idle from now,
/// holding `idle_mb`; false when it was not `ws`'s.
pub fn give_back(
    c: &Connection,
    slot: &SlotId,
    ws: &WorkspaceId,
    holder: &WorkspaceId,
    idle_mb: u64,
    now: u64,
) -> Result<bool> {
    let moved = c
        .prepare_cached(
            "UPDATE slots SET workspace_id = ?3, grp = 'pool', memory_mb = ?4
             WHERE id = ?1 AND workspace_id = ?2",
        )?
        .execute(params![
            slot.as_str(),
            ws.as_str(),
            holder.as_str(),
            idle_mb as i64
        ])?;
    if moved != 1 {
        return Ok(false);
    }
    c.prepare_cached(
        "UPDATE pool_slots SET phase = 'free', bound_to = NULL, since_ms = ?2 WHERE slot_id = ?1",
    )?
    .execute(params![slot.as_str(), now as i64])?;
    Ok(true)
}

/// Pending workspaces (not the pool's holder) of urgency `min_urgency` or
/// more, oldest first: the leases that may be waiting in the batch queue
/// for the pool's tick to move them. Filtered here, not after parsing every
/// spec: the tick asks on every round.
pub fn pending_leases(c: &Connection, min_urgency: u8) -> Result<Vec<super::WorkspaceRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {} FROM workspaces
         WHERE state = 'pending' AND owner <> '@pool'
           AND COALESCE(json_extract(spec, '$.urgency'), 0) >= ?1
         ORDER BY created_ms, id",
        super::WS_COLS
    ))?;
    let rows = st.query_map([i64::from(min_urgency)], super::ws_from_row)?;
    rows.map(|r| super::ws_build(r?)).collect()
}

/// A lease's new slot, to be submitted by the pool's tick (its pool slot
/// refused the bind; events cannot submit, the tick can).
pub fn push_pool_fallback(c: &Connection, slot: &SlotId) -> Result<()> {
    c.prepare_cached("INSERT OR IGNORE INTO pool_fallbacks (slot_id) VALUES (?1)")?
        .execute([slot.as_str()])?;
    Ok(())
}

/// The slots waiting in [`push_pool_fallback`], taken off the list: a
/// coordinator that dies before it submits them leaves them unsubmitted,
/// which its successor fails at start like any create it died in.
pub fn take_pool_fallbacks(c: &Connection) -> Result<Vec<SlotRow>> {
    let ids: Vec<String> = c
        .prepare_cached("SELECT slot_id FROM pool_fallbacks ORDER BY slot_id")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    c.prepare_cached("DELETE FROM pool_fallbacks")?
        .execute([])?;
    let mut out = Vec::new();
    for id in ids {
        let id: SlotId = parse_id("slot id", id)?;
        if let Some(s) = super::get_slot(c, &id)? {
            out.push(s);
        }
    }
    Ok(out)
}

/// The clean snapshot of a warm image, as far as the pool knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmRow {
    pub image: String,
    /// `preparing`, `ready`, `failed`, `stale`.
    pub state: String,
    /// The template's id (the snapshot is checkpoint holder/vm_id/generation).
    pub vm_id: protocol::VmId,
    pub generation: u32,
    pub sha256: Option<String>,
    pub memory_mb: u64,
    /// Where it was (or is being) made.
    pub slot_id: SlotId,
    pub node: String,
    pub updated_ms: u64,
    pub reason: Option<String>,
}

const WARM_COLS: &str =
    "image, state, vm_id, generation, sha256, memory_mb, slot_id, node, updated_ms, reason";

type WarmRaw = (
    String,
    String,
    String,
    i64,
    Option<String>,
    i64,
    String,
    String,
    i64,
    Option<String>,
);

fn warm_from_row(r: &rusqlite::Row) -> rusqlite::Result<WarmRaw> {
    WarmRaw::try_from(r)
}

fn warm_build(t: WarmRaw) -> Result<WarmRow> {
    Ok(WarmRow {
        image: t.0,
        state: t.1,
        vm_id: parse_id("vm id", t.2)?,
        generation: t.3 as u32,
        sha256: t.4,
        memory_mb: t.5 as u64,
        slot_id: parse_id("slot id", t.6)?,
        node: t.7,
        updated_ms: t.8 as u64,
        reason: t.9,
    })
}

pub fn get_warm(c: &Connection, image: &str) -> Result<Option<WarmRow>> {
    let t = c
        .prepare_cached(&format!(
            "SELECT {WARM_COLS} FROM pool_warm WHERE image = ?1"
        ))?
        .query_row([image], warm_from_row)
        .optional()?;
    t.map(warm_build).transpose()
}

/// Every warm image's row.
pub fn warm_rows(c: &Connection) -> Result<Vec<WarmRow>> {
    let mut st = c.prepare_cached(&format!("SELECT {WARM_COLS} FROM pool_warm ORDER BY image"))?;
    let rows: Vec<WarmRaw> = st
        .query_map([], warm_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter().map(warm_build).collect()
}

/// `prepare_warm` of `row.image` was sent (a new generation of its snapshot).
pub fn set_warm_preparing(c: &Connection, row: &WarmRow) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO pool_warm ({WARM_COLS}) VALUES (?1, 'preparing', ?2, ?3, NULL, ?4, ?5, ?6, ?7, NULL)
         ON CONFLICT (image) DO UPDATE SET state = 'preparing', vm_id = ?2, generation = ?3,
           sha256 = NULL, memory_mb = ?4, slot_id = ?5, node = ?6, updated_ms = ?7, reason = NULL"
    ))?
    .execute(params![
        row.image,
        row.vm_id.as_str(),
        row.generation,
        row.memory_mb as i64,
        row.slot_id.as_str(),
        row.node,
        row.updated_ms as i64
    ])?;
    Ok(())
}

/// The answer to a `prepare_warm` of template `vm_id` generation `generation`:
/// `ready` with its digest, or `failed` with the reason (or `stale`). The
/// image, when the row was waiting for it.
pub fn set_warm_outcome(
    c: &Connection,
    vm_id: &protocol::VmId,
    generation: u32,
    state: &str,
    sha256: Option<&str>,
    reason: Option<&str>,
    now: u64,
) -> Result<Option<String>> {
    Ok(c.prepare_cached(
        "UPDATE pool_warm SET state = ?3, sha256 = ?4, reason = ?5, updated_ms = ?6
         WHERE vm_id = ?1 AND generation = ?2 RETURNING image",
    )?
    .query_row(
        params![
            vm_id.as_str(),
            generation,
            state,
            sha256,
            reason,
            now as i64
        ],
        |r| r.get(0),
    )
    .optional()?)
}

/// The slots preparing a snapshot now (not offered to leases meanwhile).
pub fn warm_preparing_slots(c: &Connection) -> Result<Vec<SlotId>> {
    let ids: Vec<String> = c
        .prepare_cached("SELECT slot_id FROM pool_warm WHERE state = 'preparing'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    ids.into_iter().map(|i| parse_id("slot id", i)).collect()
}
