//! The batch-system reservations that hold guaranteed leases (reservation
//! and immediate kinds): one row per such workspace, `held` until the batch
//! system's reservation is deleted, then `released` (terminal). Rows
//! survive a coordinator restart; the housekeeping tick releases the
//! reservations of workspaces that no longer want their slots.

use super::{Result, StoreError};
use protocol::WorkspaceId;
use rusqlite::{params, Connection, OptionalExtension};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS lease_reservations (
  workspace_id TEXT PRIMARY KEY, lrm TEXT NOT NULL, lrm_id TEXT NOT NULL,
  start_ms INTEGER NOT NULL, begins_ms INTEGER NOT NULL, end_ms INTEGER NOT NULL,
  state TEXT NOT NULL, released_ms INTEGER,
  -- JSON list of the best-effort workspaces to suspend before it begins.
  victims TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS lease_reservations_state ON lease_reservations(state);
"#;

/// A reservation's state: `held` -> `released`; released never moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResvState {
    Held,
    Released,
}

impl ResvState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Released => "released",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "held" => Some(Self::Held),
            "released" => Some(Self::Released),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationRow {
    pub workspace_id: WorkspaceId,
    /// The batch system that holds it (`local`, `slurm`, ...).
    pub lrm: String,
    /// Its id there.
    pub lrm_id: String,
    /// When the lease starts (its VMs are due).
    pub start_ms: u64,
    /// When the batch system's reservation begins (start less the staging lead).
    pub begins_ms: u64,
    pub end_ms: u64,
    pub state: ResvState,
    /// Best-effort workspaces on its nodes, to suspend before it begins
    /// (emptied once they were asked to).
    pub victims: Vec<WorkspaceId>,
}

const COLS: &str = "workspace_id, lrm, lrm_id, start_ms, begins_ms, end_ms, state, victims";

type Raw = (String, String, String, i64, i64, i64, String, String);

fn from_row(r: &rusqlite::Row) -> rusqlite::Result<Raw> {
    Raw::try_from(r)
}

fn build(t: Raw) -> Result<ReservationRow> {
    let bad = |what: &str, v: &str| StoreError::Corrupt {
        what: "lease_reservations",
        detail: format!("{what} {v:?}"),
    };
    Ok(ReservationRow {
        workspace_id: t.0.parse().map_err(|_| bad("workspace id", &t.0))?,
        lrm: t.1,
        lrm_id: t.2,
        start_ms: t.3 as u64,
        begins_ms: t.4 as u64,
        end_ms: t.5 as u64,
        state: ResvState::parse(&t.6).ok_or_else(|| bad("state", &t.6))?,
        victims: serde_json::from_str::<Vec<String>>(&t.7)
            .ok()
            .and_then(|v| v.iter().map(|w| w.parse().ok()).collect())
            .ok_or_else(|| bad("victims", &t.7))?,
    })
}

pub fn insert_reservation(c: &Connection, r: &ReservationRow) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO lease_reservations ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?
    .execute(params![
        r.workspace_id.as_str(),
        r.lrm,
        r.lrm_id,
        r.start_ms as i64,
        r.begins_ms as i64,
        r.end_ms as i64,
        r.state.as_str(),
        victims_json(&r.victims)
    ])?;
    Ok(())
}

pub fn reservation_of(c: &Connection, ws: &WorkspaceId) -> Result<Option<ReservationRow>> {
    c.prepare_cached(&format!(
        "SELECT {COLS} FROM lease_reservations WHERE workspace_id = ?1"
    ))?
    .query_row([ws.as_str()], from_row)
    .optional()?
    .map(build)
    .transpose()
}

/// Held reservations whose workspace is over or going (destroying,
/// expired, preempted, failed, destroyed). A suspended one keeps its
/// reservation: it resumes into it.
pub fn reservations_to_release(c: &Connection) -> Result<Vec<ReservationRow>> {
    let mut st = c.prepare_cached(
        "SELECT r.workspace_id, r.lrm, r.lrm_id, r.start_ms, r.begins_ms, r.end_ms, r.state, r.victims
         FROM lease_reservations r JOIN workspaces w ON w.id = r.workspace_id
         WHERE r.state = 'held'
           AND NOT (w.state = 'pending' OR w.state = 'starting' OR w.state = 'running'
             OR w.state = 'suspending' OR w.state = 'suspended' OR w.state = 'resuming')",
    )?;
    let rows = st
        .query_map([], from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(build).collect()
}

fn victims_json(v: &[WorkspaceId]) -> String {
    serde_json::to_string(&v.iter().map(|w| w.as_str()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

/// Held reservations with best-effort workspaces still to suspend, whose
/// batch-system reservation begins by `by_ms`.
pub fn victims_due(c: &Connection, by_ms: u64) -> Result<Vec<ReservationRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM lease_reservations
         WHERE state = 'held' AND victims != '[]' AND begins_ms <= ?1"
    ))?;
    let rows = st
        .query_map([by_ms as i64], from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(build).collect()
}

/// The victims were asked to suspend: none left to ask.
pub fn clear_victims(c: &Connection, ws: &WorkspaceId) -> Result<()> {
    c.prepare_cached("UPDATE lease_reservations SET victims = '[]' WHERE workspace_id = ?1")?
        .execute([ws.as_str()])?;
    Ok(())
}

/// `held` -> `released`; false if it was released already.
pub fn release_reservation(c: &Connection, ws: &WorkspaceId, now: u64) -> Result<bool> {
    let n = c
        .prepare_cached(
            "UPDATE lease_reservations SET state = 'released', released_ms = ?2
             WHERE workspace_id = ?1 AND state = 'held'",
        )?
        .execute(params![ws.as_str(), now as i64])?;
    Ok(n == 1)
}

/// When each VM of `ws` was first reported running (the pilot's clock).
pub fn vm_started_at(
    c: &Connection,
    ws: &WorkspaceId,
) -> Result<std::collections::HashMap<protocol::VmId, u64>> {
    let mut st = c.prepare_cached(
        "SELECT vm_id, MIN(ts_ms) FROM timeline
         WHERE workspace_id = ?1 AND phase = 'vm_started' AND vm_id IS NOT NULL GROUP BY vm_id",
    )?;
    let rows = st
        .query_map([ws.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(vm, ts)| Some((vm.parse().ok()?, ts as u64)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::{insert_workspace, Store, WorkspaceRow, SCHEMA_VERSION};
    use super::*;
    use protocol::spec::WorkspaceSpec;
    use protocol::view::WorkspaceState;

    fn workspace(c: &Connection, state: WorkspaceState) -> WorkspaceId {
        let id = WorkspaceId::generate();
        insert_workspace(
            c,
            &WorkspaceRow {
                id: id.clone(),
                name: "r".into(),
                owner: "alice".into(),
                spec: WorkspaceSpec::parse(protocol::spec::EXAMPLE).expect("spec"),
                state,
                reason: None,
                created_ms: 1,
                updated_ms: 1,
                expires_ms: None,
            },
        )
        .expect("insert workspace");
        id
    }

    fn row(ws: &WorkspaceId) -> ReservationRow {
        ReservationRow {
            workspace_id: ws.clone(),
            lrm: "local".into(),
            lrm_id: "R1".into(),
            start_ms: 70_000,
            begins_ms: 10_000,
            end_ms: 900_000,
            state: ResvState::Held,
            victims: vec![ws.clone()],
        }
    }

    #[test]
    fn a_version_4_database_gains_the_reservations_table_and_keeps_its_rows_across_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.db");
        let ws = {
            let store = Store::open(&path).expect("open");
            let c = store.conn();
            c.execute_batch("DROP TABLE lease_reservations; PRAGMA user_version = 4;")
                .expect("downgrade");
            workspace(c, WorkspaceState::Pending)
        };
        let store = Store::open(&path).expect("reopen upgrades");
        let c = store.conn();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
        insert_reservation(c, &row(&ws)).expect("insert");
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            reservation_of(store.conn(), &ws).expect("read"),
            Some(row(&ws))
        );
    }

    #[test]
    fn only_held_reservations_of_workspaces_that_let_go_are_released_and_only_once() {
        let store = Store::open_in_memory().expect("open");
        let c = store.conn();
        let live = workspace(c, WorkspaceState::Pending);
        let saved = workspace(c, WorkspaceState::Suspended);
        insert_reservation(c, &row(&saved)).expect("insert");
        let gone = workspace(c, WorkspaceState::Destroying);
        insert_reservation(c, &row(&live)).expect("insert");
        insert_reservation(c, &row(&gone)).expect("insert");
        let due = reservations_to_release(c).expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].workspace_id, gone);
        assert!(release_reservation(c, &gone, 5).expect("release"));
        assert!(!release_reservation(c, &gone, 6).expect("again"));
        assert!(reservations_to_release(c).expect("due").is_empty());
        assert_eq!(
            reservation_of(c, &gone).expect("read").map(|r| r.state),
            Some(ResvState::Released)
        );
    }
}
