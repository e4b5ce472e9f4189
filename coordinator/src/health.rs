//! `GET /healthz`: is the database usable and does the batch system answer?
//!
//! 200 `{"status": "ok", "database": "ok", "batch_system": "ok"}` when both
//! are; 503 with `"status": "failing"`, the failing part's error in its
//! field and an `"error"` line naming it otherwise. The batch system is not
//! asked on every call: the answer of the coordinator's own last query
//! (every `lrm_poll_s`) is used while it is younger than [`FRESH`]; only
//! then does `/healthz` ask it once (one query at a time, whoever asks).
//! Not here: liveness of pilots or leases (that is `/metrics`).

use crate::engine::Engine;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// A batch-system answer younger than this is taken as the current state.
pub const FRESH: Duration = Duration::from_secs(15);
/// Longest wait for each check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// One probe of the batch system at a time, however many ask.
static PROBE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn healthz(State(engine): State<Arc<Engine>>) -> Response {
    let db = {
        let engine = engine.clone();
        let check = tokio::task::spawn_blocking(move || engine.check_database());
        match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(format!("check failed: {e}")),
            Err(_) => Err(format!(
                "no answer within {} s (database locked?)",
                CHECK_TIMEOUT.as_secs()
            )),
        }
    };
    let lrm = batch_system(&engine).await;
    let (status, body) = report(engine.lrm().kind(), db, lrm);
    if status != StatusCode::OK {
        tracing::warn!(answer = %body, "health check failing");
    }
    (status, Json(body)).into_response()
}

/// The last batch-system query's outcome if fresh, else a new query.
async fn batch_system(engine: &Engine) -> Result<(), String> {
    let fresh = || {
        engine
            .metrics
            .lrm_last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|l| l.at.elapsed() < FRESH)
            .map(|l| l.outcome.clone())
    };
    if let Some(outcome) = fresh() {
        return outcome;
    }
    let _one = PROBE.lock().await;
    if let Some(outcome) = fresh() {
        return outcome;
    }
    match tokio::time::timeout(CHECK_TIMEOUT, engine.lrm().list_jobs()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    }
}

/// The answer for the two checks' outcomes.
pub fn report(
    lrm: &str,
    database: Result<(), String>,
    batch_system: Result<(), String>,
) -> (StatusCode, serde_json::Value) {
    let word = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    let mut failing = Vec::new();
    if let Err(e) = &database {
        failing.push(format!("database: {e}"));
    }
    if let Err(e) = &batch_system {
        failing.push(format!("batch system ({lrm}): {e}"));
    }
    let mut body = json!({
        "status": if failing.is_empty() { "ok" } else { "failing" },
        "database": word(&database),
        "batch_system": word(&batch_system),
        "lrm": lrm,
    });
    if failing.is_empty() {
        (StatusCode::OK, body)
    } else {
        body["error"] = json!(failing.join("; "));
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_says_which_check_failed() {
        let (st, b) = report("slurm", Ok(()), Ok(()));
        assert_eq!(st, StatusCode::OK);
        assert_eq!(b["status"], "ok");
        let (st, b) = report("slurm", Err("disk I/O error".into()), Ok(()));
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(b["database"], "disk I/O error");
        assert_eq!(b["batch_system"], "ok");
        assert_eq!(b["error"], "database: disk I/O error");
        let (_, b) = report("slurm", Ok(()), Err("squeue exited 1".into()));
        assert_eq!(b["error"], "batch system (slurm): squeue exited 1");
    }
}
