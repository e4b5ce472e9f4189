//! Advance reservations of the local batch system, in its own model: a
//! reservation holds whole nodes from its start to its end. It is granted
//! only on nodes that no other reservation holds in that window and that no
//! running job may still hold at its start (a job's end is bounded by its
//! start + walltime + grace). From then on, a job outside it is started on
//! those nodes only if its walltime + grace ends before the reservation
//! starts (backfill), and a job submitted into it waits for its start and
//! runs only on its nodes. Refused requests get the earliest start at which
//! the same nodes would be granted: the first of the running jobs' and the
//! reservations' ends at which enough nodes are free.

use super::{save, schedule, Job, Shared, State, LRM};
use crate::reserve::{Reservation, ReservationRequest, Reservations, ReserveError};
use crate::{JobId, LrmError, SlotJob};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// One reservation: whole nodes (indices into `State::nodes`) in `[start, end)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct LocalResv {
    pub id: String,
    pub name: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Node names (names, not indices, in the state file).
    pub nodes: Vec<String>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Latest time a running job may still hold its nodes.
fn job_end(job: &Job, grace: Duration) -> u64 {
    job.started_ms
        .unwrap_or_else(protocol::now_ms)
        .saturating_add(ms(job.run_walltime))
        .saturating_add(ms(grace))
}

/// Nodes free of reservations and running jobs (but `preemptible` ones)
/// for all of `[start, end)`.
fn free_nodes(
    st: &State,
    grace: Duration,
    start: u64,
    end: u64,
    preemptible: &[JobId],
) -> Vec<usize> {
    (0..st.nodes.len())
        .filter(|&i| {
            let name = &st.nodes[i].name;
            let reserved = st
                .reservations
                .iter()
                .any(|r| r.nodes.contains(name) && r.start_ms < end && r.end_ms > start);
            let busy = st.jobs.iter().any(|(id, j)| {
                !j.state.is_finished()
                    && j.alloc.contains(&i)
                    && job_end(j, grace) > start
                    && !preemptible.contains(id)
            });
            !reserved && !busy
        })
        .collect()
}

/// Nodes a job outside every reservation must not take now: those of a
/// reservation that begins before the job (walltime + grace) would end.
pub(super) fn fenced(st: &State, grace: Duration, walltime: Duration, now: u64) -> Vec<bool> {
    let end = now.saturating_add(ms(walltime)).saturating_add(ms(grace));
    st.nodes
        .iter()
        .map(|n| {
            st.reservations
                .iter()
                .any(|r| r.nodes.contains(&n.name) && r.start_ms < end && r.end_ms > now)
        })
        .collect()
}

/// Nodes a job submitted into reservation `id` may take now: the
/// reservation's, once it has begun; none before.
pub(super) fn inside(st: &State, id: &str, now: u64) -> Option<Vec<bool>> {
    let r = st.reservations.iter().find(|r| r.id == id)?;
    if now < r.start_ms {
        return None;
    }
    Some(
        st.nodes
            .iter()
            .map(|n| !r.nodes.contains(&n.name))
            .collect(),
    )
}

/// Wakes the scheduler at the reservation's start, and drops the
/// reservation at its end (its jobs end by their own walltime, which fits).
pub(super) fn arm(shared: &Arc<Shared>, r: &LocalResv) {
    let shared = shared.clone();
    let (id, start, end) = (r.id.clone(), r.start_ms, r.end_ms);
    tokio::spawn(async move {
        let wait = |until: u64| Duration::from_millis(until.saturating_sub(protocol::now_ms()));
        tokio::time::sleep(wait(start)).await;
        {
            let mut guard = shared.lock();
            let st = &mut *guard;
            if st.detached || !st.reservations.iter().any(|r| r.id == id) {
                return;
            }
            info!(reservation = %id, "reservation begins");
            schedule(&shared, st);
            save(&shared, st);
        }
        tokio::time::sleep(wait(end)).await;
        let mut guard = shared.lock();
        let st = &mut *guard;
        if st.detached {
            return;
        }
        st.reservations.retain(|r| r.id != id);
        info!(reservation = %id, "reservation ended");
        schedule(&shared, st);
        save(&shared, st);
    });
}

fn view(r: &LocalResv) -> Reservation {
    Reservation {
        id: r.id.clone(),
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        nodes: r.nodes.clone(),
    }
}

#[async_trait]
impl Reservations for super::LocalLrm {
    fn grants_over_preemptible(&self) -> bool {
        true
    }

    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError> {
        super::resume(&self.shared);
        self.check_fits(&SlotJob {
            name: req.name.clone(),
            nodes: req.nodes,
            cores_per_node: req.cores_per_node,
            memory_mb_per_node: req.memory_mb_per_node,
            walltime: req.duration,
            pilot_argv: Vec::new(),
            workdir: Default::default(),
        })?;
        let grace = self.shared.grace;
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let now = protocol::now_ms();
        let start = req.start_ms.max(now);
        let len = ms(req.duration);
        let want = req.nodes as usize;
        let free = free_nodes(
            st,
            grace,
            start,
            start.saturating_add(len),
            &req.preemptible,
        );
        if free.len() < want {
            // Candidate starts: whenever a job or a reservation lets go of nodes.
            let mut candidates: Vec<u64> = st
                .jobs
                .values()
                .filter(|j| !j.state.is_finished() && !j.alloc.is_empty())
                .map(|j| job_end(j, grace))
                .chain(st.reservations.iter().map(|r| r.end_ms))
                .filter(|&t| t > start)
                .collect();
            candidates.sort_unstable();
            let earliest = candidates.into_iter().find(|&t| {
                free_nodes(st, grace, t, t.saturating_add(len), &req.preemptible).len() >= want
            });
            return Err(ReserveError::Unavailable {
                reason: format!(
                    "the local batch system has {} of the {want} node(s) free from {} for {}s",
                    free.len(),
                    protocol::time::format_ms(start),
                    req.duration.as_secs()
                ),
                earliest_ms: earliest,
            });
        }
        st.last_resv += 1;
        let r = LocalResv {
            id: format!("R{}", st.last_resv),
            name: req.name.clone(),
            start_ms: start,
            end_ms: start.saturating_add(len),
            nodes: free[..want]
                .iter()
                .map(|&i| st.nodes[i].name.clone())
                .collect(),
        };
        info!(reservation = %r.id, name = %r.name, start_ms = r.start_ms, end_ms = r.end_ms, nodes = ?r.nodes, "reservation granted");
        st.reservations.push(r.clone());
        arm(&self.shared, &r);
        schedule(&self.shared, st);
        save(&self.shared, st);
        Ok(view(&r))
    }

    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError> {
        let st = self.shared.lock();
        Ok(st.reservations.iter().find(|r| r.id == id).map(view))
    }

    async fn delete(&self, id: &str) -> Result<(), LrmError> {
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        if !st.reservations.iter().any(|r| r.id == id) {
            return Ok(());
        }
        st.reservations.retain(|r| r.id != id);
        // Its queued jobs can never run (Slurm holds them; we cancel them).
        let queued: Vec<JobId> = st
            .queue
            .iter()
            .filter(|q| {
                st.jobs
                    .get(q)
                    .is_some_and(|j| j.reservation.as_deref() == Some(id))
            })
            .cloned()
            .collect();
        for q in &queued {
            if let Some(j) = st.jobs.get_mut(q) {
                j.state = crate::JobState::Cancelled;
            }
        }
        st.queue.retain(|q| !queued.contains(q));
        info!(reservation = %id, cancelled_jobs = queued.len(), "reservation deleted");
        schedule(&self.shared, st);
        save(&self.shared, st);
        Ok(())
    }

    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError> {
        {
            let st = self.shared.lock();
            let Some(r) = st.reservations.iter().find(|r| r.id == id) else {
                return Err(LrmError::Config {
                    lrm: LRM,
                    message: format!("reservation {id} does not exist"),
                });
            };
            if job.nodes as usize > r.nodes.len() {
                return Err(LrmError::DoesNotFit {
                    lrm: LRM,
                    asked: format!("{} nodes", job.nodes),
                    has: format!("{} nodes in reservation {id}", r.nodes.len()),
                });
            }
        }
        self.submit_with(job, Some(id.to_string()), None).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, job, state, touch, wait_for_file, wait_state, LONG};
    use super::super::LocalLrm;
    use crate::reserve::{ReservationRequest, Reservations, ReserveError};
    use crate::{JobState, JobStatus, Lrm};
    use std::time::Duration;

    fn req(name: &str, start_ms: u64, secs: u64, nodes: u32) -> ReservationRequest {
        ReservationRequest {
            name: name.into(),
            start_ms,
            duration: Duration::from_secs(secs),
            nodes,
            cores_per_node: 1,
            memory_mb_per_node: 100,
            preemptible: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_job_in_a_reservation_waits_for_its_start_and_runs_on_its_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(3, 2, 1)).unwrap();
        let start = protocol::now_ms() + 700;
        let r = lrm.create(&req("wsp-a", start, 60, 2)).await.unwrap();
        assert_eq!(r.nodes, vec!["node1", "node2"]);
        assert_eq!(r.start_ms, start);
        let stop = dir.path().join("stop");
        let id = lrm
            .submit_into(&job(dir.path(), "in", 2, &wait_for_file(&stop)), &r.id)
            .await
            .unwrap();
        assert_eq!(state(&lrm, &id).await, JobStatus::Known(JobState::Queued));
        wait_state(&lrm, &id, |s| *s == JobState::Running, LONG).await;
        let began = protocol::now_ms();
        assert!(began >= start, "started {} ms early", start - began);
        assert!(began < start + 500, "started {} ms late", began - start);
        let mut nodes: Vec<String> = lrm.job_pids(&id).into_iter().map(|(n, _)| n).collect();
        nodes.sort();
        assert_eq!(nodes, vec!["node1", "node2"]);
        touch(&stop);
        wait_state(&lrm, &id, |s| *s == JobState::Completed, LONG).await;
        lrm.shutdown().await;
    }

    #[tokio::test]
    async fn other_jobs_backfill_before_a_reservation_but_never_overlap_it() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(2, 2, 1)).unwrap();
        // Both nodes reserved 30 s from now for a minute.
        let start = protocol::now_ms() + 30_000;
        lrm.create(&req("wsp-b", start, 60, 2)).await.unwrap();
        let stop = dir.path().join("stop");
        // A 60 s walltime would run into it: it waits.
        let long = lrm
            .submit(&job(dir.path(), "long", 1, &wait_for_file(&stop)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(state(&lrm, &long).await, JobStatus::Known(JobState::Queued));
        lrm.cancel(&long).await.unwrap();
        // A 10 s one ends before it: it runs now.
        let mut short = job(dir.path(), "short", 1, &wait_for_file(&stop));
        short.walltime = Duration::from_secs(10);
        let short = lrm.submit(&short).await.unwrap();
        wait_state(&lrm, &short, |s| *s == JobState::Running, LONG).await;
        touch(&stop);
        wait_state(&lrm, &short, |s| *s == JobState::Completed, LONG).await;
        lrm.shutdown().await;
    }

    #[tokio::test]
    async fn a_reservation_that_cannot_be_granted_is_refused_with_the_earliest_start() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(2, 2, 1)).unwrap();
        let stop = dir.path().join("stop");
        let busy = lrm
            .submit(&job(dir.path(), "busy", 1, &wait_for_file(&stop)))
            .await
            .unwrap();
        wait_state(&lrm, &busy, |s| *s == JobState::Running, LONG).await;
        let now = protocol::now_ms();
        // One node is free now, two are not until the job's walltime (60 s) + grace (1 s).
        lrm.create(&req("wsp-one", now, 30, 1)).await.unwrap();
        let e = lrm.create(&req("wsp-two", now, 30, 2)).await.unwrap_err();
        let ReserveError::Unavailable {
            reason,
            earliest_ms,
        } = e
        else {
            panic!("{e}")
        };
        assert!(reason.contains("0 of the 2 node(s) free"), "{reason}");
        let earliest = earliest_ms.expect("an earliest start");
        assert!(
            (now + 59_000..now + 62_000).contains(&earliest),
            "earliest {} ms from now",
            earliest - now
        );
        // Offered start accepted when asked for.
        lrm.create(&req("wsp-two", earliest, 30, 2)).await.unwrap();
        // A request larger than the cluster is not "later": it never fits.
        assert!(matches!(
            lrm.create(&req("wsp-big", now, 30, 3)).await,
            Err(ReserveError::Lrm(crate::LrmError::DoesNotFit { .. }))
        ));
        touch(&stop);
        lrm.shutdown().await;
    }

    #[tokio::test]
    async fn deleting_a_reservation_frees_its_nodes_and_cancels_its_queued_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let lrm = LocalLrm::new(config(1, 2, 1)).unwrap();
        let start = protocol::now_ms() + 60_000;
        let r = lrm.create(&req("wsp-c", start, 60, 1)).await.unwrap();
        let queued = lrm
            .submit_into(&job(dir.path(), "in", 1, "true"), &r.id)
            .await
            .unwrap();
        let stop = dir.path().join("stop");
        let other = lrm
            .submit(&job(dir.path(), "other", 1, &wait_for_file(&stop)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            state(&lrm, &other).await,
            JobStatus::Known(JobState::Queued)
        );
        lrm.delete(&r.id).await.unwrap();
        assert_eq!(lrm.query(&r.id).await.unwrap(), None);
        lrm.delete(&r.id).await.unwrap(); // gone already: fine
        assert_eq!(
            state(&lrm, &queued).await,
            JobStatus::Known(JobState::Cancelled)
        );
        wait_state(&lrm, &other, |s| *s == JobState::Running, LONG).await;
        touch(&stop);
        lrm.shutdown().await;
    }

    #[tokio::test]
    async fn a_durable_local_lrm_keeps_its_reservations_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(2, 2, 1);
        c.state_file = Some(dir.path().join("state.json"));
        let start = protocol::now_ms() + 60_000;
        let id = {
            let lrm = LocalLrm::new(c.clone()).unwrap();
            lrm.create(&req("wsp-d", start, 60, 2)).await.unwrap().id
        };
        let lrm = LocalLrm::new(c).unwrap();
        let r = lrm.query(&id).await.unwrap().expect("kept");
        assert_eq!((r.start_ms, r.nodes.len()), (start, 2));
        assert!(matches!(
            lrm.create(&req("wsp-e", start, 60, 1)).await,
            Err(ReserveError::Unavailable { .. })
        ));
        lrm.shutdown().await;
    }
}
