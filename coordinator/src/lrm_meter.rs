//! A batch system that times its calls: wraps any [`Lrm`] and records each
//! call's duration and outcome in `wsp_lrm_call_duration_seconds`, and the
//! latest query's outcome for `/healthz`.
//!
//! Not here: anything a batch system does (the wrapped adapter does it all,
//! unchanged) or what the engine decides with the answers.

use crate::metrics::{LrmLabels, Metrics};
use async_trait::async_trait;
use lrm_adapters::{Capacity, JobId, JobStatus, Lrm, LrmError, SlotJob, Warning};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The latest query of the batch system (status, list_jobs) and how it ended.
#[derive(Clone, Debug)]
pub struct LastCall {
    pub call: &'static str,
    pub at: Instant,
    /// `Err` holds the error's text.
    pub outcome: Result<(), String>,
}

/// Shared between the meter and whoever reads it (`/healthz`).
pub type LastCallCell = Arc<Mutex<Option<LastCall>>>;

pub struct MeteredLrm {
    inner: Arc<dyn Lrm>,
    calls: Family<LrmLabels, Histogram>,
    last: LastCallCell,
}

impl MeteredLrm {
    /// Wraps `inner`, recording into `metrics` (which the engine then owns:
    /// the histogram family and the last-call cell are shared handles).
    pub fn wrap(inner: Arc<dyn Lrm>, metrics: &Metrics) -> Arc<dyn Lrm> {
        Arc::new(Self {
            inner,
            calls: metrics.lrm_calls.clone(),
            last: metrics.lrm_last.clone(),
        })
    }

    async fn timed<T>(
        &self,
        call: &'static str,
        f: impl Future<Output = Result<T, LrmError>>,
    ) -> Result<T, LrmError> {
        let t = Instant::now();
        let r = f.await;
        let took = t.elapsed();
        self.calls
            .get_or_create(&LrmLabels {
                lrm: self.inner.kind().to_string(),
                call: call.to_string(),
                outcome: if r.is_ok() { "ok" } else { "error" }.to_string(),
            })
            .observe(took.as_secs_f64());
        // Only queries tell whether the batch system answers: a cancel of a
        // job it forgot, or a submit it refuses, says nothing of its health,
        // and `check_grace` may ask nothing at all (the default answers None).
        if matches!(call, "status" | "list_jobs") {
            let outcome = r.as_ref().map(|_| ()).map_err(|e| e.to_string());
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastCall {
                call,
                at: Instant::now(),
                outcome,
            });
        }
        r
    }
}

#[async_trait]
impl Lrm for MeteredLrm {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn warning(&self) -> Warning {
        self.inner.warning()
    }
    /// Not metered: a reservation call is rare (one per guaranteed lease).
    fn reservations(&self) -> Option<&dyn lrm_adapters::reserve::Reservations> {
        self.inner.reservations()
    }
    fn capacity(&self) -> Option<Capacity> {
        self.inner.capacity()
    }
    fn render_script(&self, job: &SlotJob) -> String {
        self.inner.render_script(job)
    }
    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.timed("submit", self.inner.submit(job)).await
    }
    async fn submit_sized(&self, job: &SlotJob, size: u64) -> Result<JobId, LrmError> {
        self.timed("submit", self.inner.submit_sized(job, size))
            .await
    }
    fn queues_by_size(&self) -> bool {
        self.inner.queues_by_size()
    }
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: lrm_adapters::Standing,
        mode: lrm_adapters::BatchPriority,
    ) -> Result<lrm_adapters::Submitted, LrmError> {
        self.timed("submit", self.inner.submit_at(job, standing, mode))
            .await
    }
    fn check_batch_priority(&self, mode: lrm_adapters::BatchPriority) -> Result<(), String> {
        self.inner.check_batch_priority(mode)
    }
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        self.timed("status", self.inner.status(ids)).await
    }
    async fn status_with_reasons(
        &self,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, lrm_adapters::JobReport>, LrmError> {
        // The same one query as `status`: counted as one.
        self.timed("status", self.inner.status_with_reasons(ids))
            .await
    }
    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        self.timed("cancel", self.inner.cancel(id)).await
    }
    async fn check_grace(&self) -> Result<Option<Duration>, LrmError> {
        self.timed("check_grace", self.inner.check_grace()).await
    }
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        self.timed("list_jobs", self.inner.list_jobs()).await
    }
    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lrm_adapters::memory::MemoryLrm;

    #[tokio::test]
    async fn every_call_is_timed_with_its_outcome_and_remembered() {
        let m = Metrics::new();
        let lrm = MeteredLrm::wrap(
            Arc::new(MemoryLrm::new(Capacity {
                nodes: 1,
                cores_per_node: 1,
                memory_mb_per_node: 1024,
            })),
            &m,
        );
        assert!(lrm.list_jobs().await.is_ok());
        // Cancelling a job the memory batch system never had is an error.
        assert!(lrm.cancel(&JobId("42".into())).await.is_err());
        let t = m.render(&[]);
        assert!(
            t.contains("wsp_lrm_call_duration_seconds_count{lrm=\"memory\",call=\"list_jobs\",outcome=\"ok\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("wsp_lrm_call_duration_seconds_count{lrm=\"memory\",call=\"cancel\",outcome=\"error\"} 1"),
            "{t}"
        );
        // The last query is remembered; the failed cancel is not a query.
        let last = m.lrm_last.lock().unwrap().clone().unwrap();
        assert_eq!(last.call, "list_jobs");
        assert!(last.outcome.is_ok());
    }
}
