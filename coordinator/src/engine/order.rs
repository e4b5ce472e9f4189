//! The order our pilot jobs wait in the batch queue.
//!
//! - Best-effort ones among themselves (issue 18): `[reservations]
//!   best_effort_order`. By arrival (the default) they are plain
//!   submissions; `largest_first` queues each by its node-time, the nodes it
//!   asks for times the lease it carries (what is left of it for a resumed
//!   lease), so the batch work drains without a few large leases started
//!   last running alone at its end (docs/SIMULATION.md, "Where the points
//!   are lost"). The engine refuses to start with `largest_first` on a batch
//!   system that cannot order its queue (`Lrm::queues_by_size`).
//! - Urgent ones ahead of them (issue 17): `[urgency] batch_priority`
//!   (`Lrm::submit_at`, docs/POOL.md "Urgent leases: the batch queue");
//!   what was asked, and a refusal, go on the lease's timeline.
//!
//! The same order decides which queued lease moves first onto a pool slot
//! that became idle ([`queue_rank`], `engine::pool`), after urgency.

use super::Engine;
use crate::config::BestEffortOrder;
use lrm_adapters::{BatchPriority, LrmError, SlotJob, Standing, Submitted};
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

/// Where a pilot job of a lease of `urgency` stands in the queue.
pub(super) fn standing(
    order: BestEffortOrder,
    job: &SlotJob,
    lease: Duration,
    urgency: u8,
) -> Standing {
    if urgency > 0 {
        return Standing::Urgent { urgency };
    }
    Standing::BestEffort {
        size: match order {
            BestEffortOrder::Arrival => None,
            BestEffortOrder::LargestFirst => Some(node_time(job, lease)),
        },
    }
}

/// The words for the timeline of what was asked for a pilot job's place,
/// or `None` when nothing was.
pub(super) fn asked_note(lrm: &str, s: &Submitted, standing: Standing) -> Option<String> {
    let asked = s.asked.as_deref()?;
    Some(match standing {
        Standing::Urgent { urgency } => format!(
            "urgency {urgency}: asked the {lrm} batch system to run pilot job {} first: {asked}",
            s.id
        ),
        Standing::BestEffort { .. } => format!(
            "best-effort pilot job {} queued behind our urgent ones: {asked}",
            s.id
        ),
    })
}

impl Engine {
    /// Submits a pilot job not held by a reservation: a best-effort one in
    /// the configured order, an urgent one (urgency 1 or 2) as
    /// `[urgency] batch_priority` says.
    pub(super) async fn submit_queued(
        &self,
        job: &SlotJob,
        lease: Duration,
        urgency: u8,
    ) -> Result<(Submitted, Standing), LrmError> {
        let standing = standing(self.cfg.reservations.best_effort_order, job, lease, urgency);
        let mode: BatchPriority = self.cfg.urgency.batch_priority;
        Ok((self.lrm.submit_at(job, standing, mode).await?, standing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lrm_adapters::JobId;

    fn job(nodes: u32) -> SlotJob {
        SlotJob {
            name: "wsp-x".into(),
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 512,
            walltime: Duration::from_secs(60),
            pilot_argv: vec![],
            workdir: "/tmp".into(),
        }
    }

    #[test]
    fn urgent_leases_stand_apart_and_best_effort_ones_carry_their_size_only_by_size() {
        let l = Duration::from_secs(10);
        assert_eq!(
            standing(BestEffortOrder::Arrival, &job(2), l, 1),
            Standing::Urgent { urgency: 1 }
        );
        assert_eq!(
            standing(BestEffortOrder::LargestFirst, &job(2), l, 2),
            Standing::Urgent { urgency: 2 }
        );
        assert_eq!(
            standing(BestEffortOrder::Arrival, &job(2), l, 0),
            Standing::BestEffort { size: None }
        );
        assert_eq!(
            standing(BestEffortOrder::LargestFirst, &job(2), l, 0),
            Standing::BestEffort { size: Some(20_000) }
        );
    }

    #[test]
    fn the_timeline_says_what_was_asked_and_nothing_when_nothing_was() {
        let s = Submitted {
            id: JobId("123".into()),
            asked: Some("sbatch --priority=TOP".into()),
            refused: None,
        };
        let note = asked_note("slurm", &s, Standing::Urgent { urgency: 1 }).unwrap();
        assert_eq!(
            note,
            "urgency 1: asked the slurm batch system to run pilot job 123 first: sbatch --priority=TOP"
        );
        let plain = Submitted::plain(JobId("9".into()));
        assert_eq!(
            asked_note("slurm", &plain, Standing::Urgent { urgency: 1 }),
            None
        );
    }
}
