//! The order best-effort pilot jobs wait in the batch queue (issue 18):
//! `[reservations] best_effort_order`. By arrival (the default) they are
//! plain submissions; `largest_first` queues each by its node-time, the
//! nodes it asks for times the lease it carries (what is left of it for a
//! resumed lease), so the batch work drains without a few large leases
//! started last running alone at its end (docs/SIMULATION.md, "Where the
//! points are lost"). The engine refuses to start with `largest_first` on
//! a batch system that cannot order its queue (`Lrm::queues_by_size`).
//!
//! The same order decides which queued lease moves first onto a pool slot
//! that became idle ([`queue_rank`], `engine::pool`), after urgency.

use super::Engine;
use crate::config::BestEffortOrder;
use lrm_adapters::{JobId, LrmError, SlotJob};
use std::time::Duration;

/// A pilot job's node-time (node-ms) for `lease` on `job.nodes` nodes.
pub(super) fn node_time(job: &SlotJob, lease: Duration) -> u64 {
    u64::from(job.nodes).saturating_mul(lease.as_millis().min(u128::from(u64::MAX)) as u64)
}

/// Where a queued best-effort lease stands in the queue for idle pool
/// slots: urgency 2, then 1, then 0; within one urgency as
/// `best_effort_order` orders the batch queue (by arrival, oldest first; or
/// largest node-time first, `nodes` times `lease`). Smaller ranks go first.
pub(super) fn queue_rank(
    order: BestEffortOrder,
    urgency: u8,
    created_ms: u64,
    nodes: u32,
    lease: Duration,
) -> (std::cmp::Reverse<u8>, std::cmp::Reverse<u64>, u64) {
    let size = match order {
        BestEffortOrder::Arrival => 0,
        BestEffortOrder::LargestFirst => {
            u64::from(nodes).saturating_mul(lease.as_millis().min(u128::from(u64::MAX)) as u64)
        }
    };
    (
        std::cmp::Reverse(urgency),
        std::cmp::Reverse(size),
        created_ms,
    )
}

impl Engine {
    /// Submits a best-effort lease's pilot job in the configured order.
    pub(super) async fn submit_best_effort(
        &self,
        job: &SlotJob,
        lease: Duration,
    ) -> Result<JobId, LrmError> {
        match self.cfg.reservations.best_effort_order {
            BestEffortOrder::Arrival => self.lrm.submit(job).await,
            BestEffortOrder::LargestFirst => {
                self.lrm.submit_sized(job, node_time(job, lease)).await
            }
        }
    }
}
