//! The same requests, sent to a real coordinator at their (scaled) times
//! through its client API (`workspace-coordinator replay`): how the
//! simulator's figures are checked against the real thing.
//!
//! Times come from the coordinator's own records, as in the simulator:
//! a lease starts at its timeline's `running` entry and waited from its
//! `created_ms`. The replay ends when every lease it made has settled.

use super::report::Lease;
use super::Request;
use crate::client::{Client, ClientError};
use protocol::view::Phase;
use serde::Serialize;
use std::time::Duration;

#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// False when the time limit passed before every lease settled.
    pub complete: bool,
    pub incomplete_because: Option<String>,
    /// When the first request was sent (ms since the epoch).
    pub t0_ms: u64,
    pub requests: Vec<Lease>,
}

/// Sends each request at `t0 + submit_ms`, then waits (at most `limit`
/// in all) until every lease it made has settled.
pub async fn replay(
    client: &Client,
    requests: &[Request],
    limit: Duration,
    mut progress: impl FnMut(&str),
) -> Result<ReplayReport, ClientError> {
    let t0 = protocol::now_ms();
    let deadline = tokio::time::Instant::now() + limit;
    let mut made = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let at = tokio::time::Instant::now()
            + Duration::from_millis((t0 + r.submit_ms).saturating_sub(protocol::now_ms()));
        tokio::time::sleep_until(at).await;
        let lease = Lease {
            job: r.id,
            injected: r.injected,
            urgency: r.urgency,
            nodes: r.nodes,
            submit_s: r.submit_ms as f64 / 1000.0,
            run_s: r.run_ms as f64 / 1000.0,
            start_s: None,
            wait_s: None,
            state: "rejected".into(),
        };
        match client.create(&r.spec_toml()).await {
            Ok(view) => made.push((lease, Some(view.id.to_string()))),
            Err(e @ ClientError::Refused { .. }) => {
                progress(&format!("request {i} (job {}) refused: {e}", r.id));
                made.push((lease, None));
            }
            Err(e) => return Err(e),
        }
    }
    progress("every request sent; waiting for the leases to settle");
    let mut incomplete = None;
    let mut out = Vec::with_capacity(made.len());
    for (mut lease, id) in made {
        let Some(id) = id else {
            out.push(lease);
            continue;
        };
        loop {
            let view = client.get(&id).await?;
            lease.state = view.state.to_string();
            if view.settled {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                incomplete = Some(format!(
                    "the time limit of {} s passed before every lease settled",
                    limit.as_secs()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let page = client.events(&id, 0, Duration::ZERO).await?;
        let created = page.events.first().map(|e| e.recorded_ms);
        let running = page
            .events
            .iter()
            .find(|e| e.phase == Phase::Running)
            .map(|e| e.recorded_ms);
        if let (Some(c), Some(run)) = (created, running) {
            lease.start_s = Some(run.saturating_sub(t0) as f64 / 1000.0);
            lease.wait_s = Some(run.saturating_sub(c) as f64 / 1000.0);
        }
        out.push(lease);
    }
    Ok(ReplayReport {
        complete: incomplete.is_none(),
        incomplete_because: incomplete,
        t0_ms: t0,
        requests: out,
    })
}
