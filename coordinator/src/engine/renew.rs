//! Lease renewal: a running lease ends later, within what its pilot jobs
//! were given and what its owner may hold.
//!
//! The lease's end is the coordinator's timer (`expire_leases`); a pilot's
//! own deadline is the batch walltime's backstop (start + walltime +
//! startup slack - margin), so a renewal within it needs no word to the
//! pilots. The walltime is asked at submit from the spec's `max_duration`
//! (else `duration`): a batch job's walltime cannot be raised by its owner
//! on most sites, so the room to renew is asked for up front.

use super::rules::visible_ws;
use super::{Caller, Engine, EngineError};
use crate::store;
use protocol::view::{Phase, WorkspaceState, WorkspaceView};
use protocol::WorkspaceId;
use rusqlite::{params, Connection, OptionalExtension};
use tracing::info;

/// Why a renewal cannot be had (answered 422): the bound it hit.
fn refused(msg: String) -> EngineError {
    EngineError::Unprocessable(msg)
}

/// When the first of the workspace's pilots started (its clock), and when
/// the lease started running (ours): the two bounds' origins.
fn origins(c: &Connection, ws: &WorkspaceId) -> Result<(Option<u64>, Option<u64>), EngineError> {
    let q = |sql: &str| -> Result<Option<u64>, EngineError> {
        let v: Option<i64> = c
            .prepare_cached(sql)
            .map_err(store::StoreError::from)?
            .query_row(params![ws.as_str()], |r| r.get(0))
            .optional()
            .map_err(store::StoreError::from)?
            .flatten();
        Ok(v.map(|v| v as u64))
    };
    Ok((
        q("SELECT MIN(ts_ms) FROM timeline WHERE workspace_id = ?1 AND phase = 'pilot_started'")?,
        q("SELECT MIN(recorded_ms) FROM timeline WHERE workspace_id = ?1 AND phase = 'running'")?,
    ))
}

impl Engine {
    /// Renews a running lease by `by_s` seconds. Refused, with the bound it
    /// hit and the most that would fit, when the new end passes the pilot
    /// jobs' walltime (422) or the owner's `max_lease_s` (403).
    pub fn renew(
        &self,
        caller: &Caller,
        id: &WorkspaceId,
        by_s: u64,
    ) -> Result<WorkspaceView, EngineError> {
        if by_s == 0 || by_s > protocol::spec::MAX_DURATION.as_secs() {
            return Err(EngineError::BadRequest(format!(
                "by_s = {by_s}: must be from 1 to {}",
                protocol::spec::MAX_DURATION.as_secs()
            )));
        }
        let now = self.clock.now_ms();
        self.with_store(|s| {
            s.tx(|tx| {
                let ws = visible_ws(tx, caller, id)?;
                let limits = self.limits_of(&ws.owner);
                let (Some(expires), WorkspaceState::Running) = (ws.expires_ms, ws.state) else {
                    return Err(EngineError::Conflict(format!(
                        "workspace {id} is {}: only a running lease can be renewed",
                        ws.state
                    )));
                };
                let (first_pilot, running) = origins(tx, &ws.id)?;
                let want = expires + by_s * 1000;
                // The earliest pilot's deadline, as the pilot computes it.
                let p = &self.cfg.pilot;
                let room_s = ws.spec.walltime().as_secs() + p.startup_slack_s;
                let pilot_end = first_pilot
                    .unwrap_or(now)
                    .saturating_add(room_s.saturating_sub(p.margin_s) * 1000);
                if want > pilot_end {
                    let most = pilot_end.saturating_sub(expires) / 1000;
                    return Err(refused(format!(
                        "renewing by {by_s} s would pass the pilot jobs' walltime (the slots end {}): at most {most} s more; ask for max_duration in the spec to leave room to renew",
                        protocol::time::format_ms(pilot_end)
                    )));
                }
                let lease_s = want.saturating_sub(running.unwrap_or(now)) / 1000;
                limits.check_lease(lease_s)?;
                store::set_workspace_expiry(tx, &ws.id, want)?;
                store::push_timeline(
                    tx,
                    &ws.id,
                    now,
                    now,
                    Phase::Renewed,
                    None,
                    None,
                    None,
                    &format!(
                        "by {by_s} s by {}; lease ends {}",
                        caller.user,
                        protocol::time::format_ms(want)
                    ),
                )?;
                info!(workspace_id = %ws.id, by_s, expires_ms = want, user = %caller.user, "lease renewed");
                Ok(())
            })
        })?;
        self.bump();
        self.kick.notify_one();
        self.get(caller, id)
    }
}
