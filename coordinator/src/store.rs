//! Durable state: one embedded SQLite database, every query in this module.
//!
//! The engine opens a transaction, calls these functions, and commits before
//! it answers anyone (a pilot event is stored before it is acknowledged).
//! WAL mode with `synchronous = NORMAL`: a committed transaction survives a
//! crash of the coordinator process (not necessarily a power loss).

use crate::lifecycle::pilot::{self, PilotState};
use crate::lifecycle::slot::{self, Job, JobInput};
use crate::lifecycle::{vm, workspace};
use protocol::pilot::{CommandKind, Nic, PilotEvent};
use protocol::spec::WorkspaceSpec;
use protocol::view::{Phase, SlotState, TimelineEntry, VmState, WorkspaceState};
use protocol::{SlotId, VmId, WorkspaceId};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

mod pool;
mod reservations;
pub use pool::*;
pub use reservations::*;
mod urgent;
pub use urgent::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database holds a value we cannot read ({what}): {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// The database was written by a newer coordinator: reading it with
    /// this one could misread or damage it.
    #[error("the database is at schema version {found}, written by a newer coordinator; this one knows versions up to {known}: run the newer coordinator, or restore the copy taken before the upgrade")]
    NewerSchema { found: i64, known: i64 },
    /// A group commit failed as a whole; nothing of it was stored.
    #[error("database: group commit failed, nothing stored: {0}")]
    Batch(String),
}

type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS workspaces (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, owner TEXT NOT NULL, spec TEXT NOT NULL,
  state TEXT NOT NULL, reason TEXT, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  expires_ms INTEGER);
-- The leases to expire, and the next to (every tick reads it).
CREATE INDEX IF NOT EXISTS workspaces_expiry ON workspaces(state, expires_ms);
-- state: the slot's table (lifecycle::slot::next); job_state and job_id: its
-- batch job's (lifecycle::slot::next_job), an id once the submit is answered.
CREATE TABLE IF NOT EXISTS slots (
  id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, grp TEXT NOT NULL, job_id TEXT,
  nodes INTEGER NOT NULL, cores INTEGER NOT NULL, memory_mb INTEGER NOT NULL,
  state TEXT NOT NULL, job_state TEXT NOT NULL DEFAULT 'unsubmitted',
  created_ms INTEGER NOT NULL);
-- In the order slots_of reads them (no sort each time).
CREATE INDEX IF NOT EXISTS slots_ws ON slots(workspace_id, created_ms, id);
-- Jobs whose status is asked, and cancels owed, are found by their state.
CREATE INDEX IF NOT EXISTS slots_job_state ON slots(job_state);
-- The few slots awaiting their pilots' late reports (read every tick).
CREATE INDEX IF NOT EXISTS slots_awaiting ON slots(state) WHERE state = 'awaiting_report';
-- state: the pilot's table (lifecycle::pilot::next); last_event is what the
-- view shows (the kind of its last event, or 'lost').
CREATE TABLE IF NOT EXISTS pilots (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, pilot_id TEXT NOT NULL, last_event TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'started',
  last_seen_ms INTEGER NOT NULL, PRIMARY KEY (slot_id, node));
CREATE TABLE IF NOT EXISTS vms (
  id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, slot_id TEXT NOT NULL, grp TEXT NOT NULL,
  idx INTEGER NOT NULL, name TEXT NOT NULL, node TEXT, state TEXT NOT NULL,
  memory_mb INTEGER NOT NULL, cpus INTEGER NOT NULL, image TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS vms_ws ON vms(workspace_id, grp, idx);
CREATE INDEX IF NOT EXISTS vms_slot_node ON vms(slot_id, node);
CREATE TABLE IF NOT EXISTS commands (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, id INTEGER NOT NULL, body TEXT NOT NULL,
  created_ms INTEGER NOT NULL, PRIMARY KEY (slot_id, node, id));
-- Every stored pilot event, as received: an append-only log for admins and
-- audits. No index: replays are caught by pilot_seqs (one small row per
-- pilot instance, updated in place), where a (pilot_id, seq) key put every
-- event on a random page of an index that grew with every event (a third
-- of the pages the event writer wrote under load).
CREATE TABLE IF NOT EXISTS pilot_events (
  pilot_id TEXT NOT NULL, seq INTEGER NOT NULL, slot_id TEXT NOT NULL, node TEXT NOT NULL,
  ts_ms INTEGER NOT NULL, recorded_ms INTEGER NOT NULL, body TEXT NOT NULL);
-- Per pilot instance, the highest sequence number stored. A pilot sends its
-- events in order, one at a time, so any seq at or below it was stored.
CREATE TABLE IF NOT EXISTS pilot_seqs (
  pilot_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timeline (
  workspace_id TEXT NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
  recorded_ms INTEGER NOT NULL, phase TEXT NOT NULL, slot_id TEXT, node TEXT, vm_id TEXT,
  detail TEXT NOT NULL, PRIMARY KEY (workspace_id, seq));
CREATE TABLE IF NOT EXISTS addresses (
  workspace_id TEXT NOT NULL, vm_id TEXT NOT NULL, nic INTEGER NOT NULL, pool TEXT NOT NULL,
  ip TEXT NOT NULL, mac TEXT NOT NULL, prefix_len INTEGER NOT NULL, gateway TEXT,
  PRIMARY KEY (vm_id, nic), UNIQUE (pool, ip));
CREATE INDEX IF NOT EXISTS addresses_ws ON addresses(workspace_id);
CREATE TABLE IF NOT EXISTS workspace_peers (
  workspace_id TEXT PRIMARY KEY, peers TEXT NOT NULL);
-- A create's idempotency key (per user), the workspace it made and a hash
-- of its spec; kept a day (engine::client::IDEMPOTENCY_TTL_MS).
CREATE TABLE IF NOT EXISTS idempotency_keys (
  owner TEXT NOT NULL, key TEXT NOT NULL, workspace_id TEXT NOT NULL,
  spec_sha256 TEXT NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (owner, key));
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys(created_ms);
CREATE TABLE IF NOT EXISTS node_images (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, image TEXT NOT NULL,
  PRIMARY KEY (slot_id, node, image));

-- Suspend and resume (issue 16). A VM's placements: every slot and node it
-- was sent to, in order (a workspace's VMs move to new slots when resumed).
CREATE TABLE IF NOT EXISTS vm_placements (
  vm_id TEXT NOT NULL, seq INTEGER NOT NULL, slot_id TEXT NOT NULL, node TEXT NOT NULL,
  since_ms INTEGER NOT NULL, until_ms INTEGER, restored_from TEXT,
  PRIMARY KEY (vm_id, seq)) WITHOUT ROWID;
-- A slot's batch jobs, in order of submission.
CREATE TABLE IF NOT EXISTS slot_jobs (
  slot_id TEXT NOT NULL, seq INTEGER NOT NULL, job_id TEXT NOT NULL, submitted_ms INTEGER NOT NULL,
  PRIMARY KEY (slot_id, seq)) WITHOUT ROWID;
-- Nodes (of a slot) whose pilot reported a checkpoint store.
CREATE TABLE IF NOT EXISTS node_checkpoints (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, save_mb_per_s REAL NOT NULL, measured INTEGER NOT NULL,
  PRIMARY KEY (slot_id, node)) WITHOUT ROWID;
-- Every checkpoint of a VM (one generation per suspend): state 'saving'
-- (asked for), 'kept' (complete: sha256 is what a resume presents),
-- 'failed' (never complete), 'deleted'.
CREATE TABLE IF NOT EXISTS checkpoints (
  workspace_id TEXT NOT NULL, vm_id TEXT NOT NULL, generation INTEGER NOT NULL,
  state TEXT NOT NULL, sha256 TEXT, bytes INTEGER, node TEXT, created_ms INTEGER NOT NULL,
  PRIMARY KEY (vm_id, generation));
CREATE INDEX IF NOT EXISTS checkpoints_ws ON checkpoints(workspace_id);
-- A workspace in suspension: the lease time it had left when its clock
-- stopped, whether it resumes by itself (preemption) or waits for the
-- client, and why it was suspended.
CREATE TABLE IF NOT EXISTS suspensions (
  workspace_id TEXT PRIMARY KEY, lease_left_ms INTEGER NOT NULL, auto_resume INTEGER NOT NULL,
  cause TEXT NOT NULL, since_ms INTEGER NOT NULL, suspended_ms INTEGER NOT NULL DEFAULT 0);

-- Counters for the per-event rules ("are all VMs running?", "have all pilots
-- of the slot released?"), kept by triggers so that each event reads one or
-- a few rows instead of counting the workspace's N VMs or the slot's N
-- pilots (O(N) per event, O(N^2) per lease: 15 % of the coordinator's CPU at
-- N = 1024 before). Triggers, not Rust code, so that no write path can
-- forget them; they fire only when a counted column changes, and the row
-- they touch is per workspace or slot (a page the batch writes anyway).
CREATE TABLE IF NOT EXISTS vm_counts (
  workspace_id TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (workspace_id, state)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS vm_counts_insert AFTER INSERT ON vms BEGIN
  INSERT INTO vm_counts (workspace_id, state, n) VALUES (new.workspace_id, new.state, 1)
    ON CONFLICT (workspace_id, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS vm_counts_update AFTER UPDATE OF state, workspace_id ON vms
  WHEN old.state IS NOT new.state OR old.workspace_id IS NOT new.workspace_id BEGIN
  UPDATE vm_counts SET n = n - 1 WHERE workspace_id = old.workspace_id AND state = old.state;
  INSERT INTO vm_counts (workspace_id, state, n) VALUES (new.workspace_id, new.state, 1)
    ON CONFLICT (workspace_id, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS vm_counts_delete AFTER DELETE ON vms BEGIN
  UPDATE vm_counts SET n = n - 1 WHERE workspace_id = old.workspace_id AND state = old.state;
END;
-- holding: pilots that hold their node (reserved, preempting); released:
-- pilots that are gone (released, failed, lost). Spelled as ORs: SQLite
-- builds a temporary table for an IN list of three or more each time it runs.
CREATE TABLE IF NOT EXISTS pilot_counts (
  slot_id TEXT PRIMARY KEY, pilots INTEGER NOT NULL, holding INTEGER NOT NULL,
  released INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS pilot_counts_insert AFTER INSERT ON pilots BEGIN
  INSERT INTO pilot_counts (slot_id, pilots, holding, released)
    VALUES (new.slot_id, 1, (new.state = 'reserved' OR new.state = 'preempting'),
      (new.state = 'released' OR new.state = 'failed' OR new.state = 'lost'))
    ON CONFLICT (slot_id) DO UPDATE SET pilots = pilots + 1,
      holding = holding + excluded.holding, released = released + excluded.released;
END;
CREATE TRIGGER IF NOT EXISTS pilot_counts_update AFTER UPDATE OF state, slot_id ON pilots
  WHEN old.state IS NOT new.state OR old.slot_id IS NOT new.slot_id BEGIN
  UPDATE pilot_counts SET pilots = pilots - 1,
      holding = holding - (old.state = 'reserved' OR old.state = 'preempting'),
      released = released - ((old.state = 'released' OR old.state = 'failed' OR old.state = 'lost'))
    WHERE slot_id = old.slot_id;
  INSERT INTO pilot_counts (slot_id, pilots, holding, released)
    VALUES (new.slot_id, 1, (new.state = 'reserved' OR new.state = 'preempting'),
      (new.state = 'released' OR new.state = 'failed' OR new.state = 'lost'))
    ON CONFLICT (slot_id) DO UPDATE SET pilots = pilots + 1,
      holding = holding + excluded.holding, released = released + excluded.released;
END;
CREATE TRIGGER IF NOT EXISTS pilot_counts_delete AFTER DELETE ON pilots BEGIN
  UPDATE pilot_counts SET pilots = pilots - 1,
      holding = holding - (old.state = 'reserved' OR old.state = 'preempting'),
      released = released - ((old.state = 'released' OR old.state = 'failed' OR old.state = 'lost'))
    WHERE slot_id = old.slot_id;
END;
"#;

/// The schema version this build writes (`PRAGMA user_version`). Opening an
/// older database upgrades it in one transaction (see [`migrate`]); a newer
/// one is refused rather than misread.
const SCHEMA_VERSION: i64 = 5;

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::setup(Connection::open(path)?)
    }

    /// A database in memory (the simulator's): the same schema and queries,
    /// gone when dropped. It lives in SQLite's `memdb` file system, behind
    /// an ordinary pager and page cache: a plain `:memory:` database keeps
    /// every page in the page cache, which SQLite walks on every commit, so
    /// each commit cost more the bigger the database grew.
    pub fn open_in_memory() -> Result<Self> {
        use rusqlite::OpenFlags;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // No leading '/': a database this connection alone sees (a shared
        // one takes a lock on every page it reads).
        let name = format!(
            "file:wsp-{}-{}?vfs=memdb",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Self::setup(Connection::open_with_flags(name, flags)?)
    }

    fn setup(mut conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Checkpoint the WAL every ~40 MB rather than every ~4 MB: fewer
        // fsyncs and page copies, and fewer writer stalls (event p99 halved
        // in the load benchmark). Durability is unchanged (WAL, NORMAL).
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        migrate(&mut conn)?;
        // Every query below is prepared once per connection and reused.
        conn.set_prepared_statement_cache_capacity(128);
        Ok(Self { conn })
    }

    /// Runs `f` in one transaction; commits only if it returns Ok.
    pub fn tx<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Transaction) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let tx = self.conn.transaction().map_err(StoreError::from)?;
        let out = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    /// Group commit: runs `f` on each item in its own savepoint of one
    /// transaction, then commits. An item whose `f` fails is rolled back
    /// alone (its error is its result); the others stay. Err means the
    /// transaction itself failed and nothing was stored.
    pub fn tx_each<I, T, E>(
        &mut self,
        items: &[I],
        mut f: impl FnMut(&Connection, &I) -> std::result::Result<T, E>,
    ) -> Result<Vec<std::result::Result<T, E>>> {
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            // Prepared once, unlike `Transaction::savepoint`'s statements.
            tx.prepare_cached("SAVEPOINT item")?.execute([])?;
            let result = f(&tx, item);
            if result.is_err() {
                tx.prepare_cached("ROLLBACK TO item")?.execute([])?;
            }
            tx.prepare_cached("RELEASE item")?.execute([])?;
            out.push(result);
        }
        tx.commit()?;
        Ok(out)
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// Version 2 -> 3: a slot's batch job and a pilot each get one state column
/// (`slots.job_state`, `pilots.state`) in place of flags. From the flags:
/// - job: no id -> `never` if the slot ended, else `unsubmitted` (a submit
///   the coordinator died in: recovery fails it at start); `job_ended` ->
///   `ended`; `cancel_pending` -> `cancel_owed`; an ended slot with neither
///   -> `cancelled` (its cancel was taken); else `live`. A live slot whose
///   cancel was already taken reads `live` and may be cancelled once more,
///   which batch systems accept.
/// - pilot: `last_event = 'lost'` -> `lost`; released -> `failed` if it never
///   reserved and its last word was `reserve_failed`, else `released`;
///   reserved -> `preempting` after a `preempting` event, else `reserved`;
///   else `started`.
const MIGRATE_TO_3: &str = "
DROP TRIGGER IF EXISTS pilot_counts_insert;
DROP TRIGGER IF EXISTS pilot_counts_update;
DROP TRIGGER IF EXISTS pilot_counts_delete;
DROP INDEX IF EXISTS pilots_flags;
DROP INDEX IF EXISTS slots_ws;
DROP INDEX IF EXISTS vms_ws;
ALTER TABLE slots ADD COLUMN job_state TEXT NOT NULL DEFAULT 'unsubmitted';
UPDATE slots SET job_state = CASE
  WHEN job_id IS NULL THEN CASE WHEN state IN ('released', 'failed') THEN 'never' ELSE 'unsubmitted' END
  WHEN job_ended = 1 THEN 'ended'
  WHEN cancel_pending = 1 THEN 'cancel_owed'
  WHEN state IN ('released', 'failed') THEN 'cancelled'
  ELSE 'live' END;
ALTER TABLE slots DROP COLUMN cancel_pending;
ALTER TABLE slots DROP COLUMN job_ended;
ALTER TABLE pilots ADD COLUMN state TEXT NOT NULL DEFAULT 'started';
UPDATE pilots SET state = CASE
  WHEN last_event = 'lost' THEN 'lost'
  WHEN released = 1 THEN CASE WHEN reserved = 0 AND last_event = 'reserve_failed' THEN 'failed' ELSE 'released' END
  WHEN reserved = 1 THEN CASE WHEN last_event = 'preempting' THEN 'preempting' ELSE 'reserved' END
  ELSE 'started' END;
ALTER TABLE pilots DROP COLUMN reserved;
ALTER TABLE pilots DROP COLUMN released;
";

/// Version 3 -> 4 (after the schema created the new tables): a VM placed on
/// a node gets that placement (since its slot was created; ended if the VM
/// is), a slot with a batch job id gets that job as its first.
const MIGRATE_TO_4: &str = "
INSERT OR IGNORE INTO vm_placements (vm_id, seq, slot_id, node, since_ms, until_ms, restored_from)
  SELECT v.id, 1, v.slot_id, v.node, s.created_ms,
    CASE WHEN v.state IN ('destroyed', 'preempted', 'failed') THEN w.updated_ms END, NULL
  FROM vms v JOIN slots s ON s.id = v.slot_id JOIN workspaces w ON w.id = v.workspace_id
  WHERE v.node IS NOT NULL;
INSERT OR IGNORE INTO slot_jobs (slot_id, seq, job_id, submitted_ms)
  SELECT id, 1, job_id, created_ms FROM slots WHERE job_id IS NOT NULL;
";

/// Creates the schema, or brings an older database up to [`SCHEMA_VERSION`],
/// in one transaction: a failure leaves the database as it was.
fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction()?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found: version,
            known: SCHEMA_VERSION,
        });
    }
    let fresh: bool = tx.query_row(
        "SELECT COUNT(*) = 0 FROM sqlite_master WHERE type = 'table' AND name = 'workspaces'",
        [],
        |r| r.get(0),
    )?;
    if !fresh && version < 3 {
        // 2 -> 3 (and older): slots and pilots get their state tables. Done
        // before the schema below, whose pilot counters read `state`; the
        // old counters' triggers and index read the columns that go.
        tx.execute_batch(MIGRATE_TO_3)?;
    }
    tx.execute_batch(SCHEMA)?;
    // 4 -> 5: guaranteed leases' batch-system reservations (a new table).
    tx.execute_batch(reservations::SCHEMA)?;
    tx.execute_batch(urgent::SCHEMA)?;
    // The slot pool's rows (a new table; a database without it gets it).
    tx.execute_batch(pool::SCHEMA)?;
    if !fresh && version < 3 {
        // The counter tables of a version-0 database start empty, and the
        // pilots' counters now count states: fill both from the rows.
        tx.execute_batch(
            "DELETE FROM vm_counts;
             INSERT INTO vm_counts (workspace_id, state, n)
               SELECT workspace_id, state, COUNT(*) FROM vms GROUP BY workspace_id, state;
             DELETE FROM pilot_counts;
             INSERT INTO pilot_counts (slot_id, pilots, holding, released)
               SELECT slot_id, COUNT(*), SUM(state IN ('reserved', 'preempting')),
                 SUM(state IN ('released', 'failed', 'lost'))
               FROM pilots GROUP BY slot_id;",
        )?;
    }
    if !fresh && version < 4 {
        // 3 -> 4: the new tables (above) start empty; what an older
        // coordinator knew of placements and batch jobs is filled in: each
        // placed VM's one placement, each slot's one job.
        tx.execute_batch(MIGRATE_TO_4)?;
    }
    if !fresh && version < 2 {
        // 1 -> 2: replays are caught by pilot_seqs, filled from the log; the
        // log loses its (pilot_id, seq) key (SQLite rebuilds to drop one).
        tx.execute_batch(
            "DELETE FROM pilot_seqs;
             INSERT INTO pilot_seqs (pilot_id, last_seq)
               SELECT pilot_id, MAX(seq) FROM pilot_events GROUP BY pilot_id;
             CREATE TABLE pilot_events_v2 (
               pilot_id TEXT NOT NULL, seq INTEGER NOT NULL, slot_id TEXT NOT NULL, node TEXT NOT NULL,
               ts_ms INTEGER NOT NULL, recorded_ms INTEGER NOT NULL, body TEXT NOT NULL);
             INSERT INTO pilot_events_v2 (pilot_id, seq, slot_id, node, ts_ms, recorded_ms, body)
               SELECT pilot_id, seq, slot_id, node, ts_ms, recorded_ms, body FROM pilot_events
               ORDER BY recorded_ms, pilot_id, seq;
             DROP TABLE pilot_events;
             ALTER TABLE pilot_events_v2 RENAME TO pilot_events;",
        )?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

fn corrupt(what: &'static str, detail: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

fn parse_id<T: std::str::FromStr>(what: &'static str, s: String) -> Result<T> {
    s.parse::<T>().map_err(|_| corrupt(what, s))
}

// ---- workspaces -------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct WorkspaceRow {
    pub id: WorkspaceId,
    pub name: String,
    pub owner: String,
    pub spec: WorkspaceSpec,
    pub state: WorkspaceState,
    pub reason: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub expires_ms: Option<u64>,
}

const WS_COLS: &str = "id, name, owner, spec, state, reason, created_ms, updated_ms, expires_ms";

/// A workspaces row as SQLite returns it, before parsing.
type WsRaw = (
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<i64>,
);

/// Each `*_from_row` reads its row's columns, in the order selected, into
/// its `*Raw` tuple (rusqlite's `TryFrom<&Row>` for tuples).
fn ws_from_row(r: &rusqlite::Row) -> rusqlite::Result<WsRaw> {
    WsRaw::try_from(r)
}

fn ws_build(t: WsRaw) -> Result<WorkspaceRow> {
    Ok(WorkspaceRow {
        id: parse_id("workspace id", t.0)?,
        name: t.1,
        owner: t.2,
        spec: serde_json::from_str(&t.3).map_err(|e| corrupt("workspace spec", e))?,
        state: WorkspaceState::parse(&t.4).ok_or_else(|| corrupt("workspace state", &t.4))?,
        reason: t.5,
        created_ms: t.6 as u64,
        updated_ms: t.7 as u64,
        expires_ms: t.8.map(|v| v as u64),
    })
}

pub fn insert_workspace(c: &Connection, w: &WorkspaceRow) -> Result<()> {
    let spec = serde_json::to_string(&w.spec).map_err(|e| corrupt("workspace spec", e))?;
    c.prepare_cached(&format!(
        "INSERT INTO workspaces ({WS_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    ))?
    .execute(params![
        w.id.as_str(),
        w.name,
        w.owner,
        spec,
        w.state.as_str(),
        w.reason,
        w.created_ms as i64,
        w.updated_ms as i64,
        w.expires_ms.map(|v| v as i64)
    ])?;
    Ok(())
}

pub fn get_workspace(c: &Connection, id: &WorkspaceId) -> Result<Option<WorkspaceRow>> {
    let t = c
        .prepare_cached(&format!("SELECT {WS_COLS} FROM workspaces WHERE id = ?1"))?
        .query_row([id.as_str()], ws_from_row)
        .optional()?;
    t.map(ws_build).transpose()
}

/// Workspaces of `owner` (all owners when `None`), newest first.
pub fn list_workspaces(c: &Connection, owner: Option<&str>) -> Result<Vec<WorkspaceRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {WS_COLS} FROM workspaces WHERE (?1 IS NULL OR owner = ?1) AND owner <> '@pool'
         ORDER BY created_ms DESC, id"
    ))?;
    let rows = st.query_map([owner], ws_from_row)?;
    rows.map(|r| ws_build(r?)).collect()
}

/// Workspaces not yet settled (state not terminal, or slots still active).
pub fn active_workspaces(c: &Connection) -> Result<Vec<WorkspaceRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {WS_COLS} FROM workspaces w
         WHERE state = 'pending' OR state = 'starting' OR state = 'running' OR state = 'destroying'
           OR EXISTS (SELECT 1 FROM slots s WHERE s.workspace_id = w.id
             AND s.state <> 'released' AND s.state <> 'failed' AND s.state <> 'unreported')
           OR EXISTS (SELECT 1 FROM slots s WHERE s.workspace_id = w.id AND s.job_state = 'cancel_owed')"
    ))?;
    let rows = st.query_map([], ws_from_row)?;
    rows.map(|r| ws_build(r?)).collect()
}

/// The earliest end of a running lease (from the `workspaces_expiry` index).
pub fn next_expiry(c: &Connection) -> Result<Option<u64>> {
    let t: Option<i64> = c
        .prepare_cached("SELECT MIN(expires_ms) FROM workspaces WHERE state = 'running'")?
        .query_row([], |r| r.get(0))?;
    Ok(t.map(|t| t as u64))
}

/// Running workspaces whose lease ended at or before `now_ms`.
pub fn expired_workspaces(c: &Connection, now_ms: u64) -> Result<Vec<WorkspaceRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {WS_COLS} FROM workspaces WHERE state = 'running' AND expires_ms <= ?1"
    ))?;
    let rows = st.query_map([now_ms as i64], ws_from_row)?;
    rows.map(|r| ws_build(r?)).collect()
}

/// Moves a workspace through its table (`lifecycle::workspace::next`): the
/// only write of a workspace's state. `reason`, when given, replaces the
/// stored one. Returns the new state, or `None` when the input changed
/// nothing (or the workspace is unknown).
pub fn advance_workspace(
    c: &Connection,
    id: &WorkspaceId,
    input: workspace::Input,
    reason: Option<&str>,
    now: u64,
) -> Result<Option<WorkspaceState>> {
    let state: Option<String> = c
        .prepare_cached("SELECT state FROM workspaces WHERE id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?;
    let Some(state) = state else { return Ok(None) };
    let state = WorkspaceState::parse(&state).ok_or_else(|| corrupt("workspace state", &state))?;
    let Some(to) = workspace::next(state, input) else {
        return Ok(None);
    };
    c.prepare_cached(
        "UPDATE workspaces SET state = ?2, reason = COALESCE(?3, reason), updated_ms = ?4 WHERE id = ?1",
    )?
    .execute(params![id.as_str(), to.as_str(), reason, now as i64])?;
    Ok(Some(to))
}

/// Replaces the reason of a workspace whose state stays as it is.
pub fn set_workspace_reason(
    c: &Connection,
    id: &WorkspaceId,
    reason: &str,
    now: u64,
) -> Result<()> {
    c.prepare_cached("UPDATE workspaces SET reason = ?2, updated_ms = ?3 WHERE id = ?1")?
        .execute(params![id.as_str(), reason, now as i64])?;
    Ok(())
}

/// The lease's clock is stopped (suspended): no end until it runs again.
pub fn clear_workspace_expiry(c: &Connection, id: &WorkspaceId) -> Result<()> {
    c.prepare_cached("UPDATE workspaces SET expires_ms = NULL WHERE id = ?1")?
        .execute([id.as_str()])?;
    Ok(())
}

pub fn set_workspace_expiry(c: &Connection, id: &WorkspaceId, expires_ms: u64) -> Result<()> {
    c.prepare_cached("UPDATE workspaces SET expires_ms = ?2 WHERE id = ?1")?
        .execute(params![id.as_str(), expires_ms as i64])?;
    Ok(())
}

// ---- slots -----------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct SlotRow {
    pub id: SlotId,
    pub workspace_id: WorkspaceId,
    pub group: String,
    pub nodes: u32,
    pub cores: u32,
    pub memory_mb: u64,
    pub state: SlotState,
    /// Its batch job (with the job id once there is one).
    pub job: Job,
    pub created_ms: u64,
}

const SLOT_COLS: &str =
    "id, workspace_id, grp, job_id, nodes, cores, memory_mb, state, job_state, created_ms";

/// A slots row as SQLite returns it, before parsing.
type SlotRaw = (
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    i64,
    String,
    String,
    i64,
);

fn slot_from_row(r: &rusqlite::Row) -> rusqlite::Result<SlotRaw> {
    SlotRaw::try_from(r)
}

fn slot_build(t: SlotRaw) -> Result<SlotRow> {
    Ok(SlotRow {
        id: parse_id("slot id", t.0)?,
        workspace_id: parse_id("workspace id", t.1)?,
        group: t.2,
        job: Job::from_parts(&t.8, t.3.clone())
            .ok_or_else(|| corrupt("slot job", format!("{} with job id {:?}", t.8, t.3)))?,
        nodes: t.4 as u32,
        cores: t.5 as u32,
        memory_mb: t.6 as u64,
        state: SlotState::parse(&t.7).ok_or_else(|| corrupt("slot state", &t.7))?,
        created_ms: t.9 as u64,
    })
}

pub fn insert_slot(c: &Connection, s: &SlotRow) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO slots ({SLOT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))?
    .execute(params![
        s.id.as_str(),
        s.workspace_id.as_str(),
        s.group,
        s.job.id(),
        s.nodes,
        s.cores,
        s.memory_mb as i64,
        s.state.as_str(),
        s.job.as_str(),
        s.created_ms as i64
    ])?;
    Ok(())
}

pub fn get_slot(c: &Connection, id: &SlotId) -> Result<Option<SlotRow>> {
    let t = c
        .prepare_cached(&format!("SELECT {SLOT_COLS} FROM slots WHERE id = ?1"))?
        .query_row([id.as_str()], slot_from_row)
        .optional()?;
    t.map(slot_build).transpose()
}

pub fn slots_of(c: &Connection, ws: &WorkspaceId) -> Result<Vec<SlotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {SLOT_COLS} FROM slots WHERE workspace_id = ?1 ORDER BY created_ms, id"
    ))?;
    let rows = st.query_map([ws.as_str()], slot_from_row)?;
    rows.map(|r| slot_build(r?)).collect()
}

/// Slots whose batch job may still exist (for the LRM status backstop).
pub fn slots_with_live_jobs(c: &Connection) -> Result<Vec<SlotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {SLOT_COLS} FROM slots
         WHERE job_state = 'live' OR job_state = 'cancel_owed' OR job_state = 'cancelled'
         ORDER BY created_ms"
    ))?;
    let rows = st.query_map([], slot_from_row)?;
    rows.map(|r| slot_build(r?)).collect()
}

/// Slots whose job ended before every pilot reported (from the `slots_awaiting` index).
pub fn slots_awaiting_report(c: &Connection) -> Result<Vec<SlotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {SLOT_COLS} FROM slots WHERE state = 'awaiting_report' ORDER BY created_ms"
    ))?;
    let rows = st.query_map([], slot_from_row)?;
    rows.map(|r| slot_build(r?)).collect()
}

/// When the coordinator recorded that the slot's batch job ended (its
/// `job_ended` timeline entry), if it did.
pub fn job_ended_ms(c: &Connection, ws: &WorkspaceId, slot: &SlotId) -> Result<Option<u64>> {
    let ms: Option<i64> = c
        .prepare_cached(
            "SELECT MAX(recorded_ms) FROM timeline
             WHERE workspace_id = ?1 AND slot_id = ?2 AND phase = 'job_ended'",
        )?
        .query_row(params![ws.as_str(), slot.as_str()], |r| r.get(0))?;
    Ok(ms.map(|m| m as u64))
}

/// Ids of the slots whose job is owed a cancel (from the `slots_job_state` index).
pub fn owed_cancels(c: &Connection) -> Result<Vec<SlotId>> {
    let mut st = c.prepare_cached("SELECT id FROM slots WHERE job_state = 'cancel_owed'")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| parse_id("slot id", r?)).collect()
}

pub fn slots_to_cancel(c: &Connection) -> Result<Vec<SlotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {SLOT_COLS} FROM slots WHERE job_state = 'cancel_owed' ORDER BY created_ms"
    ))?;
    let rows = st.query_map([], slot_from_row)?;
    rows.map(|r| slot_build(r?)).collect()
}

/// Moves the slot through its table (`lifecycle::slot::next`): the only
/// write of a slot's state. Returns the new state, or `None` when the input
/// changed nothing (or the slot is unknown).
pub fn advance_slot(c: &Connection, id: &SlotId, input: slot::Input) -> Result<Option<SlotState>> {
    let now: Option<String> = c
        .prepare_cached("SELECT state FROM slots WHERE id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?;
    let Some(now) = now else { return Ok(None) };
    let now = SlotState::parse(&now).ok_or_else(|| corrupt("slot state", &now))?;
    let Some(to) = slot::next(now, input) else {
        return Ok(None);
    };
    c.prepare_cached("UPDATE slots SET state = ?2 WHERE id = ?1")?
        .execute(params![id.as_str(), to.as_str()])?;
    Ok(Some(to))
}

/// [`advance_slot`] for a caller that read the slot's state in this
/// transaction: one statement, which writes only if the state is still
/// `from` (else the state is read again).
pub fn advance_slot_from(
    c: &Connection,
    id: &SlotId,
    from: SlotState,
    input: slot::Input,
) -> Result<Option<SlotState>> {
    let Some(to) = slot::next(from, input) else {
        return Ok(None);
    };
    let changed = c
        .prepare_cached("UPDATE slots SET state = ?3 WHERE id = ?1 AND state = ?2")?
        .execute(params![id.as_str(), from.as_str(), to.as_str()])?;
    if changed == 1 {
        return Ok(Some(to));
    }
    advance_slot(c, id, input)
}

/// Moves the slot's batch job through its table (`lifecycle::slot::next_job`):
/// the only write of a job's state or id. Returns the new job, or `None`
/// when the input changed nothing (or the slot is unknown).
pub fn advance_job(c: &Connection, id: &SlotId, input: &JobInput) -> Result<Option<Job>> {
    let row: Option<(String, Option<String>)> = c
        .prepare_cached("SELECT job_state, job_id FROM slots WHERE id = ?1")?
        .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((state, job_id)) = row else {
        return Ok(None);
    };
    let job = Job::from_parts(&state, job_id.clone())
        .ok_or_else(|| corrupt("slot job", format!("{state} with job id {job_id:?}")))?;
    let Some(to) = slot::next_job(&job, input) else {
        return Ok(None);
    };
    c.prepare_cached("UPDATE slots SET job_state = ?2, job_id = ?3 WHERE id = ?1")?
        .execute(params![id.as_str(), to.as_str(), to.id()])?;
    if let JobInput::Submitted(job_id) = input {
        c.prepare_cached(
            "INSERT INTO slot_jobs (slot_id, seq, job_id, submitted_ms)
             VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM slot_jobs WHERE slot_id = ?1), ?2,
               (SELECT created_ms FROM slots WHERE id = ?1))",
        )?
        .execute(params![id.as_str(), job_id])?;
    }
    Ok(Some(to))
}

// ---- pilots ----------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct PilotRow {
    pub slot_id: SlotId,
    pub node: String,
    pub pilot_id: String,
    pub last_event: String,
    pub state: PilotState,
    pub last_seen_ms: u64,
}

const PILOT_COLS: &str = "p.slot_id, p.node, p.pilot_id, p.last_event, p.state, p.last_seen_ms";

/// A pilots row as SQLite returns it, before parsing.
type PilotRaw = (String, String, String, String, String, i64);

fn pilot_from_row(r: &rusqlite::Row) -> rusqlite::Result<PilotRaw> {
    PilotRaw::try_from(r)
}

fn pilot_build(t: PilotRaw) -> Result<PilotRow> {
    Ok(PilotRow {
        slot_id: parse_id("slot id", t.0)?,
        node: t.1,
        pilot_id: t.2,
        last_event: t.3,
        state: PilotState::parse(&t.4).ok_or_else(|| corrupt("pilot state", &t.4))?,
        last_seen_ms: t.5 as u64,
    })
}

pub fn pilots_of(c: &Connection, slot: &SlotId) -> Result<Vec<PilotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {PILOT_COLS} FROM pilots p WHERE slot_id = ?1 ORDER BY node"
    ))?;
    let rows = st.query_map([slot.as_str()], pilot_from_row)?;
    rows.map(|r| pilot_build(r?)).collect()
}

/// Records that a pilot said something; creates the pilot row on first sight.
pub fn touch_pilot(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    pilot_id: &str,
    event: &str,
    now: u64,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO pilots (slot_id, node, pilot_id, last_event, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (slot_id, node) DO UPDATE SET pilot_id = ?3, last_event = ?4, last_seen_ms = ?5",
    )?
    .execute(params![slot.as_str(), node, pilot_id, event, now as i64])?;
    Ok(())
}

/// The newest timeline row's rowid (0 for none): a cursor for what is new.
pub fn last_timeline_rowid(c: &Connection) -> Result<i64> {
    Ok(
        c.prepare_cached("SELECT COALESCE(MAX(rowid), 0) FROM timeline")?
            .query_row([], |r| r.get(0))?,
    )
}

/// What `owner` holds over their live workspaces (pending to destroying):
/// workspaces, VMs and the VMs' memory, for the limits per user.
pub fn usage_of(c: &Connection, owner: &str) -> Result<crate::limits::Usage> {
    let (workspaces, vms, memory_mb): (i64, i64, i64) = c
        .prepare_cached(
            "SELECT COUNT(DISTINCT w.id), COUNT(v.id), COALESCE(SUM(v.memory_mb), 0)
             FROM workspaces w LEFT JOIN vms v ON v.workspace_id = w.id
             WHERE w.owner = ?1 AND (w.state = 'pending' OR w.state = 'starting'
               OR w.state = 'running' OR w.state = 'destroying')",
        )?
        .query_row(params![owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(crate::limits::Usage {
        workspaces: workspaces as u32,
        vms: vms as u32,
        memory_mb: memory_mb as u64,
    })
}

/// The pilot released its node but could not undo everything: its node
/// needs kill-all (the admin view lists it by this mark).
pub fn mark_pilot_unclean(c: &Connection, slot: &SlotId, node: &str) -> Result<()> {
    c.prepare_cached(
        "UPDATE pilots SET last_event = 'released_unclean' WHERE slot_id = ?1 AND node = ?2",
    )?
    .execute(params![slot.as_str(), node])?;
    Ok(())
}

/// A poll from a pilot we know: it is alive.
pub fn seen_pilot(c: &Connection, slot: &SlotId, node: &str, now: u64) -> Result<()> {
    c.prepare_cached(
        // At most one write per pilot every 5 s: polls wake often, and
        // silence is measured in tens of seconds.
        "UPDATE pilots SET last_seen_ms = ?3 WHERE slot_id = ?1 AND node = ?2 AND last_seen_ms < ?3 - 5000",
    )?
    .execute(params![slot.as_str(), node, now as i64])?;
    Ok(())
}

/// Pilots that hold (or may hold) a node but have said nothing since `before_ms`.
pub fn silent_pilots(c: &Connection, before_ms: u64) -> Result<Vec<PilotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {PILOT_COLS}
         FROM pilots p JOIN slots s ON s.id = p.slot_id
         WHERE p.state <> 'released' AND p.state <> 'failed' AND p.state <> 'lost'
           AND p.last_seen_ms < ?1 AND s.state <> 'released' AND s.state <> 'failed'
           AND s.state <> 'awaiting_report' AND s.state <> 'unreported'"
    ))?;
    let rows = st.query_map([before_ms as i64], pilot_from_row)?;
    rows.map(|r| pilot_build(r?)).collect()
}

/// Moves the pilot of (slot, node) through its table (`lifecycle::pilot::next`):
/// the only write of a pilot's state. A lost pilot's last event reads `lost`
/// (the view shows it). Returns the new state, or `None` when the input
/// changed nothing (or the pilot is unknown).
pub fn advance_pilot(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    input: pilot::Input,
) -> Result<Option<PilotState>> {
    let now: Option<String> = c
        .prepare_cached("SELECT state FROM pilots WHERE slot_id = ?1 AND node = ?2")?
        .query_row(params![slot.as_str(), node], |r| r.get(0))
        .optional()?;
    let Some(now) = now else { return Ok(None) };
    let now = PilotState::parse(&now).ok_or_else(|| corrupt("pilot state", &now))?;
    advance_pilot_from(c, slot, node, now, input)
}

/// [`advance_pilot`] for a caller that read the pilot's state in this
/// transaction: one statement, which writes only if the state is still
/// `now` (else the state is read again).
pub fn advance_pilot_from(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    now: PilotState,
    input: pilot::Input,
) -> Result<Option<PilotState>> {
    let Some(to) = pilot::next(now, input) else {
        return Ok(None);
    };
    let changed = c
        .prepare_cached(
            "UPDATE pilots SET state = ?4,
               last_event = CASE WHEN ?4 = 'lost' THEN 'lost' ELSE last_event END
             WHERE slot_id = ?1 AND node = ?2 AND state = ?3",
        )?
        .execute(params![slot.as_str(), node, now.as_str(), to.as_str()])?;
    if changed != 1 {
        return advance_pilot(c, slot, node, input);
    }
    Ok(Some(to))
}

// ---- VMs -------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct VmRow {
    pub id: VmId,
    pub workspace_id: WorkspaceId,
    pub slot_id: SlotId,
    pub group: String,
    pub idx: u32,
    pub name: String,
    pub node: Option<String>,
    pub state: VmState,
    pub memory_mb: u64,
    pub cpus: u32,
    pub image: String,
}

const VM_COLS: &str =
    "id, workspace_id, slot_id, grp, idx, name, node, state, memory_mb, cpus, image";

/// A vms row as SQLite returns it, before parsing.
type VmRaw = (
    String,
    String,
    String,
    String,
    i64,
    String,
    Option<String>,
    String,
    i64,
    i64,
    String,
);

fn vm_from_row(r: &rusqlite::Row) -> rusqlite::Result<VmRaw> {
    VmRaw::try_from(r)
}

fn vm_build(t: VmRaw) -> Result<VmRow> {
    Ok(VmRow {
        id: parse_id("vm id", t.0)?,
        workspace_id: parse_id("workspace id", t.1)?,
        slot_id: parse_id("slot id", t.2)?,
        group: t.3,
        idx: t.4 as u32,
        name: t.5,
        node: t.6,
        state: VmState::parse(&t.7).ok_or_else(|| corrupt("vm state", &t.7))?,
        memory_mb: t.8 as u64,
        cpus: t.9 as u32,
        image: t.10,
    })
}

pub fn insert_vm(c: &Connection, v: &VmRow) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO vms ({VM_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        v.id.as_str(),
        v.workspace_id.as_str(),
        v.slot_id.as_str(),
        v.group,
        v.idx,
        v.name,
        v.node,
        v.state.as_str(),
        v.memory_mb as i64,
        v.cpus,
        v.image
    ])?;
    Ok(())
}

pub fn vms_of(c: &Connection, ws: &WorkspaceId) -> Result<Vec<VmRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {VM_COLS} FROM vms WHERE workspace_id = ?1 ORDER BY grp, idx"
    ))?;
    let rows = st.query_map([ws.as_str()], vm_from_row)?;
    rows.map(|r| vm_build(r?)).collect()
}

pub fn get_vm(c: &Connection, id: &VmId) -> Result<Option<VmRow>> {
    let t = c
        .prepare_cached(&format!("SELECT {VM_COLS} FROM vms WHERE id = ?1"))?
        .query_row([id.as_str()], vm_from_row)
        .optional()?;
    t.map(vm_build).transpose()
}

/// Moves a VM through its table (`lifecycle::vm::next`): the only write of a
/// VM's state. A terminal state frees its addresses in the same transaction.
/// Returns the new state, or `None` when the input changed nothing (or the
/// VM is unknown).
pub fn advance_vm(c: &Connection, id: &VmId, input: vm::Input) -> Result<Option<VmState>> {
    let now: Option<String> = c
        .prepare_cached("SELECT state FROM vms WHERE id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?;
    let Some(now) = now else { return Ok(None) };
    let now = VmState::parse(&now).ok_or_else(|| corrupt("vm state", &now))?;
    let Some(to) = vm::next(now, input) else {
        return Ok(None);
    };
    c.prepare_cached("UPDATE vms SET state = ?2 WHERE id = ?1")?
        .execute(params![id.as_str(), to.as_str()])?;
    if to.is_terminal() {
        free_addresses_of_vm(c, id)?;
    }
    Ok(Some(to))
}

/// [`advance_vm`] for a caller that read the VM's state in this
/// transaction: one statement, which writes only if the state is still
/// `from` (else the state is read again).
pub fn advance_vm_from(
    c: &Connection,
    id: &VmId,
    from: VmState,
    input: vm::Input,
) -> Result<Option<VmState>> {
    let Some(to) = vm::next(from, input) else {
        return Ok(None);
    };
    let changed = c
        .prepare_cached("UPDATE vms SET state = ?3 WHERE id = ?1 AND state = ?2")?
        .execute(params![id.as_str(), from.as_str(), to.as_str()])?;
    if changed != 1 {
        return advance_vm(c, id, input);
    }
    if to.is_terminal() {
        free_addresses_of_vm(c, id)?;
    }
    Ok(Some(to))
}

pub fn set_vm_node(c: &Connection, id: &VmId, node: &str) -> Result<()> {
    c.prepare_cached("UPDATE vms SET node = ?2 WHERE id = ?1")?
        .execute(params![id.as_str(), node])?;
    Ok(())
}

/// Sends a VM to (slot, node) as `name`: its row follows it, its previous
/// placement ends at `now` and a new one is recorded (with the checkpoint
/// it is restored from, for a resume).
pub fn place_vm(
    c: &Connection,
    id: &VmId,
    slot: &SlotId,
    name: &str,
    node: &str,
    now: u64,
    restored_from: Option<&str>,
) -> Result<()> {
    c.prepare_cached("UPDATE vms SET slot_id = ?2, name = ?3, node = ?4 WHERE id = ?1")?
        .execute(params![id.as_str(), slot.as_str(), name, node])?;
    end_placement(c, id, now)?;
    c.prepare_cached(
        "INSERT INTO vm_placements (vm_id, seq, slot_id, node, since_ms, restored_from)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM vm_placements WHERE vm_id = ?1), ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id.as_str(), slot.as_str(), node, now as i64, restored_from])?;
    Ok(())
}

/// A suspended VM belongs to a new slot (a resume), under its new name; it
/// is on no node until it is placed.
pub fn move_vm_to_slot(c: &Connection, id: &VmId, slot: &SlotId, name: &str) -> Result<()> {
    c.prepare_cached("UPDATE vms SET slot_id = ?2, name = ?3, node = NULL WHERE id = ?1")?
        .execute(params![id.as_str(), slot.as_str(), name])?;
    Ok(())
}

/// The VM left its node at `now` (saved, or gone).
pub fn end_placement(c: &Connection, id: &VmId, now: u64) -> Result<()> {
    c.prepare_cached(
        "UPDATE vm_placements SET until_ms = ?2 WHERE vm_id = ?1 AND until_ms IS NULL",
    )?
    .execute(params![id.as_str(), now as i64])?;
    Ok(())
}

/// A VM's placements, oldest first.
pub fn placements_of(c: &Connection, id: &VmId) -> Result<Vec<protocol::view::Placement>> {
    let mut st = c.prepare_cached(
        "SELECT slot_id, node, since_ms, until_ms, restored_from FROM vm_placements
         WHERE vm_id = ?1 ORDER BY seq",
    )?;
    let rows = st.query_map([id.as_str()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    rows.map(|r| {
        let (slot, node, since, until, from) = r?;
        Ok(protocol::view::Placement {
            slot_id: parse_id("slot id", slot)?,
            node,
            since_ms: since as u64,
            until_ms: until.map(|u| u as u64),
            restored_from: from,
        })
    })
    .collect()
}

/// True when a VM of the workspace is in this slot (a resumed workspace's
/// VMs left their old slots).
pub fn slot_has_vms(c: &Connection, slot: &SlotId) -> Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM vms WHERE slot_id = ?1 LIMIT 1")?
            .query_row([slot.as_str()], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// True when (slot, node) was told to suspend `vm` (a `suspend_vm` command).
pub fn commanded_suspend(c: &Connection, slot: &SlotId, node: &str, vm: &VmId) -> Result<bool> {
    let pattern = format!("%\"type\":\"suspend_vm\",\"vm_id\":\"{vm}\"%");
    Ok(c.prepare_cached(
        "SELECT 1 FROM commands WHERE slot_id = ?1 AND node = ?2 AND body LIKE ?3 LIMIT 1",
    )?
    .query_row(params![slot.as_str(), node, pattern], |_| Ok(()))
    .optional()?
    .is_some())
}

/// A slot's batch job ids, in order of submission.
pub fn jobs_of_slot(c: &Connection, slot: &SlotId) -> Result<Vec<String>> {
    let mut st =
        c.prepare_cached("SELECT job_id FROM slot_jobs WHERE slot_id = ?1 ORDER BY seq")?;
    let rows = st.query_map([slot.as_str()], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- addresses (workspace control) -----------------------------------------

/// Records one NIC's address; fails on a (pool, ip) already assigned.
pub fn insert_address(
    c: &Connection,
    ws: &WorkspaceId,
    vm: &VmId,
    idx: usize,
    nic: &Nic,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO addresses (workspace_id, vm_id, nic, pool, ip, mac, prefix_len, gateway)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        ws.as_str(),
        vm.as_str(),
        idx as i64,
        nic.pool,
        nic.ip.to_string(),
        nic.mac,
        nic.prefix_len,
        nic.gateway.map(|g| g.to_string())
    ])?;
    Ok(())
}

/// Addresses of `pool` assigned now (to any VM not yet gone).
pub fn used_ips(c: &Connection, pool: &str) -> Result<HashSet<Ipv4Addr>> {
    let mut st = c.prepare_cached("SELECT ip FROM addresses WHERE pool = ?1")?;
    let rows = st.query_map([pool], |r| r.get::<_, String>(0))?;
    rows.map(|r| {
        let t = r?;
        t.parse().map_err(|_| corrupt("address", t))
    })
    .collect()
}

/// Every NIC of the workspace's VMs: (vm, nic index, nic), by VM then index.
pub fn addresses_of(c: &Connection, ws: &WorkspaceId) -> Result<Vec<(VmId, Nic)>> {
    let mut st = c.prepare_cached(
        "SELECT vm_id, pool, ip, mac, prefix_len, gateway FROM addresses
         WHERE workspace_id = ?1 ORDER BY vm_id, nic",
    )?;
    let rows = st.query_map([ws.as_str()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    rows.map(|r| {
        let t = r?;
        let vm = parse_id("vm id", t.0)?;
        let ip = t.2.parse().map_err(|_| corrupt("address", &t.2))?;
        let gateway = match t.5 {
            Some(g) => Some(g.parse().map_err(|_| corrupt("gateway", &g))?),
            None => None,
        };
        Ok((
            vm,
            Nic {
                mac: t.3,
                ip,
                prefix_len: t.4 as u8,
                gateway,
                pool: t.1,
            },
        ))
    })
    .collect()
}

pub fn free_addresses_of_vm(c: &Connection, vm: &VmId) -> Result<()> {
    c.prepare_cached("DELETE FROM addresses WHERE vm_id = ?1")?
        .execute([vm.as_str()])?;
    Ok(())
}

/// Frees every address whose VM is gone (or unknown); returns how many.
/// Addresses of VMs not in a terminal state are never touched.
pub fn free_addresses_of_gone_vms(c: &Connection) -> Result<usize> {
    let n = c
        .prepare_cached(
            "DELETE FROM addresses WHERE vm_id NOT IN
             (SELECT id FROM vms WHERE state NOT IN ('destroyed', 'preempted', 'failed'))",
        )?
        .execute([])?;
    Ok(n)
}

/// Replaces what a node's pilot says its image cache holds.
pub fn set_node_images(c: &Connection, slot: &SlotId, node: &str, images: &[String]) -> Result<()> {
    c.prepare_cached("DELETE FROM node_images WHERE slot_id = ?1 AND node = ?2")?
        .execute(params![slot.as_str(), node])?;
    let mut st = c.prepare_cached(
        "INSERT OR IGNORE INTO node_images (slot_id, node, image) VALUES (?1, ?2, ?3)",
    )?;
    for i in images {
        st.execute(params![slot.as_str(), node, i])?;
    }
    Ok(())
}

/// (node, image) pairs the pilots of `slot` reported.
pub fn node_images(c: &Connection, slot: &SlotId) -> Result<HashSet<(String, String)>> {
    let mut st = c.prepare_cached("SELECT node, image FROM node_images WHERE slot_id = ?1")?;
    let rows = st.query_map([slot.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---- commands --------------------------------------------------------------

/// Commands queued by this process so far (a change tells the engine to
/// wake pilots' long-polls; a rolled-back one only wakes them for nothing).
static COMMANDS_PUSHED: AtomicU64 = AtomicU64::new(0);

pub fn commands_pushed() -> u64 {
    COMMANDS_PUSHED.load(Ordering::SeqCst)
}

/// Queues a command for the pilot of (slot, node); returns its id.
pub fn push_command(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    kind: &CommandKind,
    now: u64,
) -> Result<()> {
    let body = serde_json::to_string(kind).map_err(|e| corrupt("command", e))?;
    // VALUES with a subquery: an INSERT ... SELECT from the table it inserts
    // into, or a RETURNING clause, makes SQLite build a temporary table.
    c.prepare_cached(
        "INSERT INTO commands (slot_id, node, id, body, created_ms) VALUES (?1, ?2,
           (SELECT COALESCE(MAX(id), 0) + 1 FROM commands WHERE slot_id = ?1 AND node = ?2), ?3, ?4)",
    )?
    .execute(params![slot.as_str(), node, body, now as i64])?;
    COMMANDS_PUSHED.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// The newest command's row id (0 when there is none).
pub fn last_command_rowid(c: &Connection) -> Result<i64> {
    Ok(
        c.prepare_cached("SELECT COALESCE(MAX(rowid), 0) FROM commands")?
            .query_row([], |r| r.get(0))?,
    )
}

/// (slot, node) of every command stored after row id `after`, and the
/// newest row id. Commands are never deleted, so row ids only grow.
pub fn commanded_since(c: &Connection, after: i64) -> Result<(Vec<(SlotId, String)>, i64)> {
    let mut st = c.prepare_cached(
        "SELECT rowid, slot_id, node FROM commands WHERE rowid > ?1 ORDER BY rowid",
    )?;
    let rows = st.query_map([after], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut last = after;
    let mut keys = Vec::new();
    for row in rows {
        let (rowid, slot, node) = row?;
        last = last.max(rowid);
        keys.push((parse_id("slot id", slot)?, node));
    }
    Ok((keys, last))
}

/// True when a `release` is already queued for (slot, node).
pub fn has_release(c: &Connection, slot: &SlotId, node: &str) -> Result<bool> {
    let n: i64 = c.prepare_cached("SELECT COUNT(*) FROM commands WHERE slot_id = ?1 AND node = ?2 AND body LIKE '%\"type\":\"release\"%'")?.query_row(params![slot.as_str(), node], |r| r.get(0))?;
    Ok(n > 0)
}

/// Commands for (slot, node) after `after`, in id order, as stored: (id, JSON body).
pub fn commands_after(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    after: u64,
) -> Result<Vec<(u64, String)>> {
    let mut st = c.prepare_cached(
        "SELECT id, body FROM commands WHERE slot_id = ?1 AND node = ?2 AND id > ?3 ORDER BY id",
    )?;
    let rows = st.query_map(params![slot.as_str(), node, after as i64], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Stores a workspace's peer list once for all its launches (see
/// `engine::signed::poll_answer`): N launches that each carried all N peers made a
/// lease O(N^2) in stored, parsed and re-encoded bytes.
pub fn set_workspace_peers(
    c: &Connection,
    ws: &WorkspaceId,
    peers: &[protocol::pilot::Peer],
) -> Result<()> {
    let json = serde_json::to_string(peers).map_err(|e| corrupt("peers", e))?;
    c.prepare_cached(
        "INSERT OR REPLACE INTO workspace_peers (workspace_id, peers) VALUES (?1, ?2)",
    )?
    .execute(params![ws.as_str(), json])?;
    Ok(())
}

/// A workspace's peer list (JSON array), if stored.
pub fn workspace_peers(c: &Connection, ws: &str) -> Result<Option<String>> {
    Ok(
        c.prepare_cached("SELECT peers FROM workspace_peers WHERE workspace_id = ?1")?
            .query_row([ws], |r| r.get(0))
            .optional()?,
    )
}

// ---- pilot events ----------------------------------------------------------

/// Stores a pilot event; `false` if it was already stored: its sequence
/// number is at or below the highest stored for its pilot instance (pilots
/// send in order, one event at a time, so that is a resend or a replay).
pub fn insert_pilot_event(c: &Connection, e: &PilotEvent, body: &str, now: u64) -> Result<bool> {
    let advanced = c
        .prepare_cached(
            "INSERT INTO pilot_seqs (pilot_id, last_seq) VALUES (?1, ?2)
             ON CONFLICT (pilot_id) DO UPDATE SET last_seq = excluded.last_seq
             WHERE excluded.last_seq > last_seq",
        )?
        .execute(params![e.pilot_id.as_str(), e.seq as i64])?;
    if advanced == 0 {
        return Ok(false);
    }
    c.prepare_cached(
        "INSERT INTO pilot_events (pilot_id, seq, slot_id, node, ts_ms, recorded_ms, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        e.pilot_id.as_str(),
        e.seq as i64,
        e.slot_id.as_str(),
        e.node,
        e.ts_ms as i64,
        now as i64,
        body
    ])?;
    Ok(true)
}

// ---- idempotent creates ----------------------------------------------------

/// The workspace a create with this key made for this user, and its spec's hash.
pub fn idempotent_create(
    c: &Connection,
    owner: &str,
    key: &str,
) -> Result<Option<(WorkspaceId, String)>> {
    let row: Option<(String, String)> = c
        .prepare_cached(
            "SELECT workspace_id, spec_sha256 FROM idempotency_keys WHERE owner = ?1 AND key = ?2",
        )?
        .query_row(params![owner, key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(id, fp)| Ok((parse_id("workspace id", id)?, fp)))
        .transpose()
}

pub fn insert_idempotency_key(
    c: &Connection,
    owner: &str,
    key: &str,
    ws: &WorkspaceId,
    spec_sha256: &str,
    now: u64,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO idempotency_keys (owner, key, workspace_id, spec_sha256, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![owner, key, ws.as_str(), spec_sha256, now as i64])?;
    Ok(())
}

/// Forgets the keys stored before `before_ms`.
pub fn forget_idempotency_keys(c: &Connection, before_ms: u64) -> Result<()> {
    c.prepare_cached("DELETE FROM idempotency_keys WHERE created_ms < ?1")?
        .execute([before_ms as i64])?;
    Ok(())
}

// ---- timeline --------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub fn push_timeline(
    c: &Connection,
    ws: &WorkspaceId,
    ts_ms: u64,
    now: u64,
    phase: Phase,
    slot: Option<&SlotId>,
    node: Option<&str>,
    vm: Option<&VmId>,
    detail: &str,
) -> Result<()> {
    // One statement (see `push_command` for why not INSERT ... SELECT).
    c.prepare_cached(
        "INSERT INTO timeline (workspace_id, seq, ts_ms, recorded_ms, phase, slot_id, node, vm_id, detail)
         VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM timeline WHERE workspace_id = ?1),
           ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        ws.as_str(),
        ts_ms as i64,
        now as i64,
        phase.as_str(),
        slot.map(|s| s.as_str()),
        node,
        vm.map(|v| v.as_str()),
        detail
    ])?;
    Ok(())
}

pub fn timeline_after(c: &Connection, ws: &WorkspaceId, after: u64) -> Result<Vec<TimelineEntry>> {
    let mut st = c.prepare_cached(
        "SELECT seq, ts_ms, recorded_ms, phase, slot_id, node, vm_id, detail FROM timeline
         WHERE workspace_id = ?1 AND seq > ?2 ORDER BY seq",
    )?;
    let rows = st.query_map(params![ws.as_str(), after as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<String>>(6)?,
            r.get::<_, String>(7)?,
        ))
    })?;
    rows.map(|r| {
        let t = r?;
        let phase: Phase = serde_json::from_value(serde_json::Value::String(t.3.clone()))
            .map_err(|_| corrupt("timeline phase", &t.3))?;
        Ok(TimelineEntry {
            seq: t.0 as u64,
            ts_ms: t.1 as u64,
            recorded_ms: t.2 as u64,
            phase,
            slot_id: t.4.map(|s| parse_id("slot id", s)).transpose()?,
            node: t.5,
            vm_id: t.6.map(|s| parse_id("vm id", s)).transpose()?,
            detail: t.7,
        })
    })
    .collect()
}

/// When a workspace was asked for, first ran and ended (`recorded_ms` of
/// its `running` and `ended` timeline entries), and whether it settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTimes {
    pub id: WorkspaceId,
    pub state: WorkspaceState,
    pub created_ms: u64,
    pub running_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub settled: bool,
}

pub fn lease_times(c: &Connection) -> Result<Vec<LeaseTimes>> {
    let mut st = c.prepare_cached(
        "SELECT w.id, w.state, w.created_ms,
           (SELECT MIN(recorded_ms) FROM timeline t WHERE t.workspace_id = w.id AND t.phase = 'running'),
           (SELECT MAX(recorded_ms) FROM timeline t WHERE t.workspace_id = w.id AND t.phase = 'ended'),
           w.state IN ('destroyed', 'preempted', 'expired', 'failed')
             AND NOT EXISTS (SELECT 1 FROM slots s WHERE s.workspace_id = w.id
               AND (s.state NOT IN ('released', 'failed', 'unreported') OR s.job_state = 'cancel_owed'))
         FROM workspaces w ORDER BY w.created_ms, w.id",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, bool>(5)?,
        ))
    })?;
    rows.map(|r| {
        let t = r?;
        Ok(LeaseTimes {
            id: parse_id("workspace id", t.0)?,
            state: WorkspaceState::parse(&t.1).ok_or_else(|| corrupt("workspace state", &t.1))?,
            created_ms: t.2 as u64,
            running_ms: t.3.map(|v| v as u64),
            ended_ms: t.4.map(|v| v as u64),
            settled: t.5,
        })
    })
    .collect()
}

/// Number of rows in each table (tests use it to prove a refused request changed nothing).
pub fn row_counts(c: &Connection) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for t in [
        "workspaces",
        "slots",
        "pilots",
        "vms",
        "commands",
        "pilot_events",
        "timeline",
        "addresses",
        "vm_placements",
        "slot_jobs",
        "checkpoints",
        "suspensions",
    ] {
        let n: i64 = c
            .prepare_cached(&format!("SELECT COUNT(*) FROM {t}"))?
            .query_row([], |r| r.get(0))?;
        out.push((t.to_string(), n));
    }
    Ok(out)
}

// ---- counts for the per-event rules (constant work per event) -------------

/// VMs of the workspace, and how many of them are in `state` (from the
/// trigger-kept counters: a few rows, whatever the workspace's size).
pub fn count_vms(c: &Connection, ws: &WorkspaceId, state: VmState) -> Result<(u64, u64)> {
    let (all, in_state): (i64, i64) = c
        .prepare_cached(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(CASE WHEN state = ?2 THEN n ELSE 0 END), 0)
             FROM vm_counts WHERE workspace_id = ?1",
        )?
        .query_row(params![ws.as_str(), state.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok((all as u64, in_state as u64))
}

/// The slot's row of trigger-kept pilot counters: (pilots, holding, released).
fn pilot_counts(c: &Connection, slot: &SlotId) -> Result<(u64, u64, u64)> {
    let row: Option<(i64, i64, i64)> = c
        .prepare_cached("SELECT pilots, holding, released FROM pilot_counts WHERE slot_id = ?1")?
        .query_row([slot.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (p, h, r) = row.unwrap_or((0, 0, 0));
    Ok((p as u64, h as u64, r as u64))
}

/// Pilots of the slot that hold their node (reserved, not released).
pub fn count_reserved_pilots(c: &Connection, slot: &SlotId) -> Result<u64> {
    Ok(pilot_counts(c, slot)?.1)
}

/// Pilots of the slot, and how many have released (or were lost).
pub fn count_released_pilots(c: &Connection, slot: &SlotId) -> Result<(u64, u64)> {
    let (pilots, _, released) = pilot_counts(c, slot)?;
    Ok((pilots, released))
}

/// Ids of the VMs on one node of one slot that have not ended.
pub fn live_vms_on(c: &Connection, slot: &SlotId, node: &str) -> Result<Vec<(VmId, VmState)>> {
    let mut st = c.prepare_cached(
        "SELECT id, state FROM vms WHERE slot_id = ?1 AND node = ?2
         AND state <> 'destroyed' AND state <> 'preempted' AND state <> 'failed'",
    )?;
    let rows = st.query_map(params![slot.as_str(), node], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.map(|r| {
        let (id, state) = r?;
        let state = VmState::parse(&state).ok_or_else(|| corrupt("vm state", &state))?;
        Ok((parse_id("vm id", id)?, state))
    })
    .collect()
}

/// True when the workspace's timeline already has an entry of this phase.
pub fn has_phase(c: &Connection, ws: &WorkspaceId, phase: Phase) -> Result<bool> {
    let n: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM timeline WHERE workspace_id = ?1 AND phase = ?2")?
        .query_row(params![ws.as_str(), phase.as_str()], |r| r.get(0))?;
    Ok(n > 0)
}

// ---- suspend and resume (issue 16) ----------------------------------------

/// A workspace in suspension (see the `suspensions` table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspension {
    /// Lease time left when the clock stopped.
    pub lease_left_ms: u64,
    /// Resume by itself (preemption) rather than wait for the client.
    pub auto_resume: bool,
    /// Why: `preempted` or `requested`.
    pub cause: String,
    /// When the current suspension began.
    pub since_ms: u64,
    /// Time spent suspended in earlier suspensions (not charged to the lease).
    pub suspended_ms: u64,
}

pub fn get_suspension(c: &Connection, ws: &WorkspaceId) -> Result<Option<Suspension>> {
    Ok(c.prepare_cached(
        "SELECT lease_left_ms, auto_resume, cause, since_ms, suspended_ms FROM suspensions WHERE workspace_id = ?1",
    )?
    .query_row([ws.as_str()], |r| {
        Ok(Suspension {
            lease_left_ms: r.get::<_, i64>(0)? as u64,
            auto_resume: r.get(1)?,
            cause: r.get(2)?,
            since_ms: r.get::<_, i64>(3)? as u64,
            suspended_ms: r.get::<_, i64>(4)? as u64,
        })
    })
    .optional()?)
}

/// Records (or replaces) the workspace's suspension.
pub fn set_suspension(c: &Connection, ws: &WorkspaceId, s: &Suspension) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO suspensions (workspace_id, lease_left_ms, auto_resume, cause, since_ms, suspended_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (workspace_id) DO UPDATE SET lease_left_ms = ?2, auto_resume = ?3, cause = ?4,
           since_ms = ?5, suspended_ms = ?6",
    )?
    .execute(params![
        ws.as_str(),
        s.lease_left_ms as i64,
        s.auto_resume,
        s.cause,
        s.since_ms as i64,
        s.suspended_ms as i64
    ])?;
    Ok(())
}

/// Suspended workspaces waiting to resume by themselves.
pub fn workspaces_to_resume(c: &Connection) -> Result<Vec<WorkspaceId>> {
    let mut st = c.prepare_cached(
        "SELECT w.id FROM workspaces w JOIN suspensions s ON s.workspace_id = w.id
         WHERE w.state = 'suspended' AND s.auto_resume = 1 ORDER BY s.since_ms",
    )?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| parse_id("workspace id", r?)).collect()
}

/// Records that the node of (slot, node) has a checkpoint store.
pub fn set_node_checkpoints(
    c: &Connection,
    slot: &SlotId,
    node: &str,
    cap: &protocol::pilot::CheckpointCapability,
) -> Result<()> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO node_checkpoints (slot_id, node, save_mb_per_s, measured) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![slot.as_str(), node, cap.save_mb_per_s, cap.measured])?;
    Ok(())
}

/// The save rate the node of (slot, node) reported, if it has a store.
pub fn node_save_rate(c: &Connection, slot: &SlotId, node: &str) -> Result<Option<f64>> {
    Ok(c.prepare_cached(
        "SELECT save_mb_per_s FROM node_checkpoints WHERE slot_id = ?1 AND node = ?2",
    )?
    .query_row(params![slot.as_str(), node], |r| r.get(0))
    .optional()?)
}

/// One checkpoint of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRow {
    pub workspace_id: WorkspaceId,
    pub vm_id: VmId,
    pub generation: u32,
    /// `saving`, `kept`, `failed` or `deleted`.
    pub state: String,
    pub sha256: Option<String>,
    pub bytes: Option<u64>,
    pub node: Option<String>,
}

impl CheckpointRow {
    pub fn id(&self) -> protocol::pilot::CheckpointId {
        protocol::pilot::CheckpointId {
            workspace_id: self.workspace_id.clone(),
            vm_id: self.vm_id.clone(),
            generation: self.generation,
        }
    }
}

/// A checkpoints row as SQLite returns it, before parsing.
type CkRaw = (
    String,
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn checkpoint_from_row(r: &rusqlite::Row) -> rusqlite::Result<CkRaw> {
    CkRaw::try_from(r)
}

fn checkpoint_build(t: CkRaw) -> Result<CheckpointRow> {
    Ok(CheckpointRow {
        workspace_id: parse_id("workspace id", t.0)?,
        vm_id: parse_id("vm id", t.1)?,
        generation: t.2 as u32,
        state: t.3,
        sha256: t.4,
        bytes: t.5.map(|b| b as u64),
        node: t.6,
    })
}

const CK_COLS: &str = "workspace_id, vm_id, generation, state, sha256, bytes, node";

/// The VM's newest checkpoint (any state).
pub fn latest_checkpoint(c: &Connection, vm: &VmId) -> Result<Option<CheckpointRow>> {
    let t = c
        .prepare_cached(&format!(
            "SELECT {CK_COLS} FROM checkpoints WHERE vm_id = ?1 ORDER BY generation DESC LIMIT 1"
        ))?
        .query_row([vm.as_str()], checkpoint_from_row)
        .optional()?;
    t.map(checkpoint_build).transpose()
}

/// The VM's newest complete checkpoint (the one to resume from).
pub fn kept_checkpoint(c: &Connection, vm: &VmId) -> Result<Option<CheckpointRow>> {
    let t = c
        .prepare_cached(&format!(
            "SELECT {CK_COLS} FROM checkpoints WHERE vm_id = ?1 AND state = 'kept'
             ORDER BY generation DESC LIMIT 1"
        ))?
        .query_row([vm.as_str()], checkpoint_from_row)
        .optional()?;
    t.map(checkpoint_build).transpose()
}

/// Checkpoints of a workspace in `state`.
pub fn checkpoints_of(c: &Connection, ws: &WorkspaceId, state: &str) -> Result<Vec<CheckpointRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {CK_COLS} FROM checkpoints WHERE workspace_id = ?1 AND state = ?2 ORDER BY vm_id, generation"
    ))?;
    let rows = st.query_map(params![ws.as_str(), state], checkpoint_from_row)?;
    rows.map(|r| checkpoint_build(r?)).collect()
}

/// Workspaces that ended with checkpoints not yet deleted.
pub fn ended_with_checkpoints(c: &Connection) -> Result<Vec<WorkspaceId>> {
    let mut st = c.prepare_cached(
        "SELECT DISTINCT k.workspace_id FROM checkpoints k JOIN workspaces w ON w.id = k.workspace_id
         WHERE (k.state = 'kept' OR k.state = 'saving')
           AND (w.state = 'destroyed' OR w.state = 'preempted' OR w.state = 'expired' OR w.state = 'failed')",
    )?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| parse_id("workspace id", r?)).collect()
}

/// Records a checkpoint being written (a save asked for); a save asked for
/// again of the same generation keeps its row.
pub fn insert_checkpoint(
    c: &Connection,
    ck: &protocol::pilot::CheckpointId,
    node: &str,
    now: u64,
) -> Result<()> {
    c.prepare_cached(
        "INSERT OR IGNORE INTO checkpoints (workspace_id, vm_id, generation, state, node, created_ms)
         VALUES (?1, ?2, ?3, 'saving', ?4, ?5)",
    )?
    .execute(params![
        ck.workspace_id.as_str(),
        ck.vm_id.as_str(),
        ck.generation,
        node,
        now as i64
    ])?;
    Ok(())
}

/// Sets a checkpoint's state (and, when complete, its digest and size).
pub fn set_checkpoint(
    c: &Connection,
    ck: &protocol::pilot::CheckpointId,
    state: &str,
    sha256: Option<&str>,
    bytes: Option<u64>,
    now: u64,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO checkpoints (workspace_id, vm_id, generation, state, sha256, bytes, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (vm_id, generation) DO UPDATE SET state = ?4,
           sha256 = COALESCE(?5, sha256), bytes = COALESCE(?6, bytes)",
    )?
    .execute(params![
        ck.workspace_id.as_str(),
        ck.vm_id.as_str(),
        ck.generation,
        state,
        sha256,
        bytes.map(|b| b as i64),
        now as i64
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(ws: &WorkspaceId, slot: &SlotId, idx: u32) -> VmRow {
        VmRow {
            id: VmId::generate(),
            workspace_id: ws.clone(),
            slot_id: slot.clone(),
            group: "g".into(),
            idx,
            name: format!("g-{idx}"),
            node: None,
            state: VmState::Pending,
            memory_mb: 256,
            cpus: 1,
            image: "i".into(),
        }
    }

    /// The counters as the per-event rules read them, and as counted from
    /// the rows themselves; a test fails if the triggers ever disagree.
    fn counts_both_ways(c: &Connection, ws: &WorkspaceId, slot: &SlotId) -> [(u64, u64, u64); 2] {
        let (vms, running) = count_vms(c, ws, VmState::Running).expect("count_vms");
        let (pilots, released) = count_released_pilots(c, slot).expect("released");
        let holding = count_reserved_pilots(c, slot).expect("reserved");
        let kept = (vms * 1000 + running, pilots * 1000 + released, holding);
        let counted = c
            .query_row(
                "SELECT (SELECT COUNT(*) * 1000 + COALESCE(SUM(state = 'running'), 0) FROM vms WHERE workspace_id = ?1),
                        (SELECT COUNT(*) * 1000 + COALESCE(SUM(state IN ('released', 'failed', 'lost')), 0) FROM pilots WHERE slot_id = ?2),
                        (SELECT COUNT(*) FROM pilots WHERE slot_id = ?2 AND state IN ('reserved', 'preempting'))",
                params![ws.as_str(), slot.as_str()],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
            )
            .expect("brute-force counts");
        [kept, counted]
    }

    #[test]
    fn trigger_kept_counters_follow_every_write_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("t.db")).expect("open");
        let c = store.conn();
        let (ws, other_ws) = (WorkspaceId::generate(), WorkspaceId::generate());
        let (slot, other_slot) = (SlotId::generate(), SlotId::generate());
        let vms: Vec<VmRow> = (0..5).map(|i| vm(&ws, &slot, i)).collect();
        for v in &vms {
            insert_vm(c, v).expect("insert vm");
        }
        insert_vm(c, &vm(&other_ws, &other_slot, 0)).expect("other workspace's vm");
        for n in 0..4 {
            touch_pilot(c, &slot, &format!("n{n}"), "p", "started", 1).expect("touch");
        }
        touch_pilot(c, &other_slot, "n0", "p", "started", 1).expect("other slot");
        let check = |want: (u64, u64, u64)| {
            let [kept, counted] = counts_both_ways(c, &ws, &slot);
            assert_eq!(kept, counted, "counters disagree with the rows");
            assert_eq!(kept, want);
        };
        check((5000, 4000, 0));
        for v in &vms[..3] {
            advance_vm(c, &v.id, vm::Input::Mapped).expect("starting");
            advance_vm(c, &v.id, vm::Input::Started).expect("running");
        }
        // An input that changes nothing writes nothing.
        assert_eq!(
            advance_vm(c, &vms[0].id, vm::Input::Started).expect("again"),
            None
        );
        check((5003, 4000, 0));
        for n in 0..3 {
            advance_pilot(c, &slot, &format!("n{n}"), pilot::Input::Reserved).expect("reserved");
        }
        advance_pilot(c, &slot, "n0", pilot::Input::Reserved).expect("reserved again");
        advance_pilot(c, &slot, "n1", pilot::Input::Preempting).expect("preempting");
        // Touching a pilot (every event) leaves its state and the counts alone.
        touch_pilot(c, &slot, "n1", "p", "vm_started", 2).expect("touch");
        check((5003, 4000, 3));
        advance_pilot(c, &slot, "n0", pilot::Input::Released).expect("released");
        advance_pilot(c, &slot, "n3", pilot::Input::Lost).expect("lost");
        advance_vm(c, &vms[1].id, vm::Input::Gone { preempted: false }).expect("destroyed");
        check((5002, 4002, 2));
        c.execute("DELETE FROM vms WHERE id = ?1", [vms[2].id.as_str()])
            .expect("delete a vm");
        c.execute(
            "DELETE FROM pilots WHERE slot_id = ?1 AND node = 'n1'",
            [slot.as_str()],
        )
        .expect("delete a pilot");
        check((4001, 3002, 1));
        // A slot or workspace nobody has written about counts zero.
        assert_eq!(
            count_released_pilots(c, &SlotId::generate()).expect("count"),
            (0, 0)
        );
        assert_eq!(
            count_vms(c, &WorkspaceId::generate(), VmState::Running).expect("count"),
            (0, 0)
        );
    }

    /// A database as a version-2 coordinator left it: the given slots
    /// (state, job id, cancel_pending, job_ended) and pilots (slot index,
    /// reserved, released, last event), all of one workspace.
    #[allow(clippy::type_complexity)]
    fn version_2_database(
        path: &Path,
        slots: &[(&str, Option<&str>, bool, bool)],
        pilots: &[(usize, bool, bool, &str)],
    ) -> (WorkspaceId, Vec<SlotId>) {
        let c = Connection::open(path).expect("open");
        c.execute_batch(include_str!("testdata/schema-v2.sql"))
            .expect("version 2 schema");
        let ws = WorkspaceId::generate();
        let ids: Vec<SlotId> = slots.iter().map(|_| SlotId::generate()).collect();
        for (id, (state, job, cancel, ended)) in ids.iter().zip(slots) {
            c.execute(
                "INSERT INTO slots (id, workspace_id, grp, job_id, nodes, cores, memory_mb, state, cancel_pending, job_ended, created_ms)
                 VALUES (?1, ?2, 'g', ?3, 2, 1, 256, ?4, ?5, ?6, 1)",
                params![id.as_str(), ws.as_str(), job, state, cancel, ended],
            )
            .expect("slot");
        }
        for (n, (slot, reserved, released, last)) in pilots.iter().enumerate() {
            c.execute(
                "INSERT INTO pilots (slot_id, node, pilot_id, last_event, reserved, released, last_seen_ms)
                 VALUES (?1, ?2, 'p', ?3, ?4, ?5, 1)",
                params![ids[*slot].as_str(), format!("n{n}"), last, reserved, released],
            )
            .expect("pilot");
        }
        (ws, ids)
    }

    #[test]
    fn a_version_2_database_gets_state_tables_for_its_slot_jobs_and_pilots() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let (ws, ids) = version_2_database(
            &path,
            &[
                ("submitted", None, false, false),     // a submit in flight
                ("failed", None, false, false),        // never submitted
                ("reserved", Some("1"), false, false), // live
                ("releasing", Some("2"), true, false), // cancel owed
                ("released", Some("3"), false, false), // cancel taken
                ("released", Some("4"), false, true),  // ended
            ],
            &[
                (2, false, false, "started"),
                (2, true, false, "vm_started"),
                (2, true, false, "preempting"),
                (3, true, true, "released"),
                (3, false, true, "reserve_failed"),
                (3, true, true, "lost"),
            ],
        );
        let store = Store::open(&path).expect("an older database is upgraded");
        let c = store.conn();
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let jobs: Vec<Job> = ids
            .iter()
            .map(|id| get_slot(c, id).expect("slot").expect("stored").job)
            .collect();
        assert_eq!(
            jobs,
            [
                Job::Unsubmitted,
                Job::Never,
                Job::Live("1".into()),
                Job::CancelOwed("2".into()),
                Job::Cancelled("3".into()),
                Job::Ended("4".into()),
            ]
        );
        let states = |slot: &SlotId| -> Vec<PilotState> {
            pilots_of(c, slot)
                .expect("pilots")
                .into_iter()
                .map(|p| p.state)
                .collect()
        };
        use PilotState as P;
        assert_eq!(states(&ids[2]), [P::Started, P::Reserved, P::Preempting]);
        assert_eq!(states(&ids[3]), [P::Released, P::Failed, P::Lost]);
        // The counters count states now, and agree with the rows.
        for slot in &ids {
            let [kept, counted] = counts_both_ways(c, &ws, slot);
            assert_eq!(kept, counted);
        }
        assert_eq!(count_reserved_pilots(c, &ids[2]).expect("holding"), 2);
        assert_eq!(count_released_pilots(c, &ids[3]).expect("gone"), (3, 3));
        // What is owed is still owed: the cancel is retried, the workspace unsettled.
        let owed: Vec<SlotId> = slots_to_cancel(c)
            .expect("to cancel")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(owed, [ids[3].clone()]);
        assert_eq!(
            slots_with_live_jobs(c).expect("live").len(),
            3,
            "live, cancel owed, cancelled"
        );
        // And the tables move on from there.
        assert_eq!(
            advance_job(c, &ids[3], &JobInput::CancelAccepted).expect("advance"),
            Some(Job::Cancelled("2".into()))
        );
        assert_eq!(
            advance_pilot(c, &ids[2], "n0", pilot::Input::Reserved).expect("advance"),
            Some(P::Reserved)
        );
    }

    #[test]
    fn a_version_0_database_gets_its_counters_filled_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let (ws, slots) = version_2_database(
            &path,
            &[("reserving", Some("1"), false, false)],
            &[
                (0, true, true, "released"),
                (0, true, false, "reserved"),
                (0, false, false, "started"),
            ],
        );
        let slot = slots[0].clone();
        {
            let c = Connection::open(&path).expect("open");
            for i in 0..3 {
                let mut v = vm(&ws, &slot, i);
                if i < 2 {
                    v.state = VmState::Running;
                }
                c.execute(
                    "INSERT INTO vms (id, workspace_id, slot_id, grp, idx, name, node, state, memory_mb, cpus, image)
                     VALUES (?1, ?2, ?3, 'g', ?4, 'n', NULL, ?5, 256, 1, 'i')",
                    params![v.id.as_str(), ws.as_str(), slot.as_str(), i, v.state.as_str()],
                )
                .expect("vm");
            }
            // Back to what a version-0 coordinator left: no counters, an
            // index on the flags, and the event log keyed by (pilot, seq).
            c.execute_batch(
                "DROP TABLE vm_counts; DROP TABLE pilot_counts;
                 DROP TRIGGER vm_counts_insert; DROP TRIGGER vm_counts_update; DROP TRIGGER vm_counts_delete;
                 DROP TRIGGER pilot_counts_insert; DROP TRIGGER pilot_counts_update; DROP TRIGGER pilot_counts_delete;
                 CREATE INDEX pilots_flags ON pilots(slot_id, reserved, released);
                 DROP TABLE pilot_seqs; DROP TABLE pilot_events;
                 CREATE TABLE pilot_events (
                   pilot_id TEXT NOT NULL, seq INTEGER NOT NULL, slot_id TEXT NOT NULL, node TEXT NOT NULL,
                   ts_ms INTEGER NOT NULL, recorded_ms INTEGER NOT NULL, body TEXT NOT NULL,
                   PRIMARY KEY (pilot_id, seq));
                 INSERT INTO pilot_events VALUES ('pi-aaaaaaaa', 1, 's', 'n0', 1, 1, '{}'), ('pi-aaaaaaaa', 2, 's', 'n0', 2, 2, '{}'),
                   ('pi-bbbbbbbb', 1, 's', 'n1', 3, 3, '{}');
                 PRAGMA user_version = 0;",
            )
            .expect("downgrade");
        }
        let store = Store::open(&path).expect("reopen upgrades");
        let c = store.conn();
        let [kept, counted] = counts_both_ways(c, &ws, &slot);
        assert_eq!(kept, counted);
        assert_eq!(kept, (3002, 3001, 1));
        let index: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'pilots_flags'",
                [],
                |r| r.get(0),
            )
            .expect("query");
        assert_eq!(index, 0, "the old counts index is dropped");
        // The event log is kept, and what it holds is known as stored.
        let logged: i64 = c
            .query_row("SELECT COUNT(*) FROM pilot_events", [], |r| r.get(0))
            .expect("count");
        assert_eq!(logged, 3);
        let resend = |pilot: &str, seq: u64| {
            let mut e = event(pilot, seq);
            e.slot_id = slot.clone();
            insert_pilot_event(c, &e, "{}", 9).expect("insert")
        };
        assert!(
            !resend("pi-aaaaaaaa", 2),
            "an event stored before the upgrade is a replay"
        );
        assert!(!resend("pi-bbbbbbbb", 1));
        assert!(resend("pi-aaaaaaaa", 3));
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("pretend a newer coordinator wrote it");
        drop(store);
        let err = Store::open(&path).err().expect("a newer schema is refused");
        assert!(
            matches!(err, StoreError::NewerSchema { found, known } if found == SCHEMA_VERSION + 1 && known == SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("newer coordinator"), "{err}");
    }

    fn event(pilot: &str, seq: u64) -> PilotEvent {
        PilotEvent {
            slot_id: SlotId::generate(),
            pilot_id: pilot.parse().expect("pilot id"),
            node: "n1".into(),
            seq,
            ts_ms: 1,
            kind: protocol::pilot::EventKind::Started {
                pid: 1,
                hypervisor: "sim".into(),
                job_id: None,
            },
        }
    }

    #[test]
    fn an_advance_from_a_state_read_earlier_falls_back_when_it_is_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("t.db")).expect("open");
        let c = store.conn();
        let (ws, slot) = (WorkspaceId::generate(), SlotId::generate());
        insert_slot(
            c,
            &SlotRow {
                id: slot.clone(),
                workspace_id: ws.clone(),
                group: "g".into(),
                nodes: 1,
                cores: 1,
                memory_mb: 256,
                state: SlotState::Submitted,
                job: Job::Unsubmitted,
                created_ms: 1,
            },
        )
        .expect("slot");
        let v = vm(&ws, &slot, 0);
        insert_vm(c, &v).expect("vm");
        // Fresh: one statement does it.
        let started = slot::Input::PilotStarted;
        assert_eq!(
            advance_slot_from(c, &slot, SlotState::Submitted, started).expect("advance"),
            Some(SlotState::Reserving)
        );
        // Stale (the slot moved since it was read): read again, never
        // written from the old state.
        advance_slot(c, &slot, slot::Input::ReleaseAsked).expect("releasing");
        let all = slot::Input::AllReserved;
        assert_eq!(
            advance_slot_from(c, &slot, SlotState::Reserving, all).expect("advance"),
            None,
            "releasing does not become reserved"
        );
        assert_eq!(
            get_slot(c, &slot).expect("read").map(|s| s.state),
            Some(SlotState::Releasing)
        );
        advance_vm(c, &v.id, vm::Input::Mapped).expect("starting");
        let gone = vm::Input::Gone { preempted: false };
        assert_eq!(
            advance_vm_from(c, &v.id, VmState::Pending, gone).expect("advance"),
            Some(VmState::Destroyed),
            "a stale pending still ends"
        );
        assert_eq!(
            advance_vm_from(c, &v.id, VmState::Starting, vm::Input::Started).expect("advance"),
            None,
            "a destroyed VM never runs"
        );
    }

    #[test]
    fn an_event_at_or_below_its_pilots_highest_stored_seq_is_not_stored_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("t.db")).expect("open");
        let c = store.conn();
        let put = |pilot: &str, seq: u64| {
            insert_pilot_event(c, &event(pilot, seq), "{}", 1).expect("insert")
        };
        assert!(put("pi-aaaaaaaa", 1));
        assert!(put("pi-aaaaaaaa", 2));
        assert!(
            !put("pi-aaaaaaaa", 2),
            "a resend after a lost acknowledgement"
        );
        assert!(!put("pi-aaaaaaaa", 1), "a replay of an older event");
        assert!(
            put("pi-bbbbbbbb", 1),
            "another pilot instance counts on its own"
        );
        assert!(put("pi-aaaaaaaa", 3));
        // A gap cannot happen with a pilot that sends in order; were one to
        // appear, the later event is stored and the earlier one is then old.
        assert!(put("pi-aaaaaaaa", 5));
        assert!(!put("pi-aaaaaaaa", 4));
        let logged: Vec<(String, i64)> = c
            .prepare("SELECT pilot_id, seq FROM pilot_events ORDER BY rowid")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<std::result::Result<_, _>>()
            .expect("rows");
        let want: Vec<(String, i64)> = [
            ("pi-aaaaaaaa", 1),
            ("pi-aaaaaaaa", 2),
            ("pi-bbbbbbbb", 1),
            ("pi-aaaaaaaa", 3),
            ("pi-aaaaaaaa", 5),
        ]
        .iter()
        .map(|(p, s)| (p.to_string(), *s))
        .collect();
        assert_eq!(logged, want, "each event logged once, in arrival order");
    }

    #[test]
    fn tx_each_rolls_back_only_the_item_that_failed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(&dir.path().join("t.db")).expect("open");
        let add = |c: &Connection, n: &i64| -> Result<()> {
            c.execute(
                "INSERT INTO node_images (slot_id, node, image) VALUES ('s', ?1, 'i')",
                [n.to_string()],
            )?;
            if *n == 2 {
                return Err(corrupt("test", "item 2 fails after writing"));
            }
            Ok(())
        };
        let out = store.tx_each(&[1, 2, 3, 1], add).expect("batch commits");
        let ok: Vec<bool> = out.iter().map(|r| r.is_ok()).collect();
        // 2 fails by itself; the second 1 hits the primary key.
        assert_eq!(ok, [true, false, true, false]);
        let nodes: Vec<String> = store
            .conn()
            .prepare("SELECT node FROM node_images ORDER BY node")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<std::result::Result<_, _>>()
            .expect("rows");
        assert_eq!(nodes, ["1", "3"]);
    }

    #[test]
    fn a_version_3_database_gets_placements_and_slot_jobs_from_what_it_knew() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let (ws, slot) = (WorkspaceId::generate(), SlotId::generate());
        {
            // A version-3 database: today's schema less the tables 4 added.
            let store = Store::open(&path).expect("fresh");
            let c = store.conn();
            c.execute_batch(
                "DROP TABLE vm_placements; DROP TABLE slot_jobs; DROP TABLE node_checkpoints;
                 DROP TABLE checkpoints; DROP TABLE suspensions; PRAGMA user_version = 3;",
            )
            .expect("version 3");
            c.execute(
                "INSERT INTO workspaces (id, name, owner, spec, state, created_ms, updated_ms)
                 VALUES (?1, 'w', 'u', '{}', 'running', 5, 9)",
                [ws.as_str()],
            )
            .expect("workspace");
            c.execute(
                "INSERT INTO slots (id, workspace_id, grp, job_id, nodes, cores, memory_mb, state, job_state, created_ms)
                 VALUES (?1, ?2, 'g', '77', 2, 1, 256, 'reserved', 'live', 7)",
                [slot.as_str(), ws.as_str()],
            )
            .expect("slot");
            let mut placed = vm(&ws, &slot, 0);
            placed.node = Some("n1".into());
            placed.state = VmState::Running;
            insert_vm(c, &placed).expect("vm");
            insert_vm(c, &vm(&ws, &slot, 1)).expect("unplaced vm");
        }
        let store = Store::open(&path).expect("upgraded");
        let c = store.conn();
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(
            jobs_of_slot(c, &slot).expect("jobs"),
            vec!["77".to_string()]
        );
        let vms = vms_of(c, &ws).expect("vms");
        let placed = vms.iter().find(|v| v.node.is_some()).expect("placed");
        let p = placements_of(c, &placed.id).expect("placements");
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].slot_id.clone(), p[0].node.as_str(), p[0].since_ms),
            (slot.clone(), "n1", 7)
        );
        assert!(p[0].until_ms.is_none(), "it still runs there");
        let unplaced = vms.iter().find(|v| v.node.is_none()).expect("unplaced");
        assert!(placements_of(c, &unplaced.id).expect("none").is_empty());
        // A second submit of the slot is its second job, in order.
        advance_job(c, &slot, &JobInput::CancelNeeded).expect("cancel");
        assert!(get_suspension(c, &ws).expect("none yet").is_none());
    }
}
