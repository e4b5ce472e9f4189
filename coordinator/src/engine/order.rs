//! The order best-effort pilot jobs wait in the batch queue (issue 18):
//! `[reservations] best_effort_order`. By arrival (the default) they are
//! plain submissions; `largest_first` queues each by its node-time, the
//! nodes it asks for times the lease it carries (what is left of it for a
//! resumed lease), so the batch work drains without a few large leases
//! started last running alone at its end (docs/SIMULATION.md, "Where the
//! points are lost"). The engine refuses to start with `largest_first` on
//! a batch system that cannot order its queue (`Lrm::queues_by_size`).

use super::Engine;
use crate::config::BestEffortOrder;
use lrm_adapters::{JobId, LrmError, SlotJob};
use std::time::Duration;

/// A pilot job's node-time (node-ms) for `lease` on `job.nodes` nodes.
pub(super) fn node_time(job: &SlotJob, lease: Duration) -> u64 {
    u64::from(job.nodes).saturating_mul(lease.as_millis().min(u128::from(u64::MAX)) as u64)
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
