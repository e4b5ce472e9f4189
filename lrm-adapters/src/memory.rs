//! A batch system that only exists in memory: every job "runs" at once and
//! nothing ever happens to it by itself; cancel marks it cancelled.
//!
//! For tests and benchmarks that drive the coordinator without processes
//! (the `local` adapter is the one that really runs pilots). Not selectable
//! with `lrm = ...`: it would lease nothing.

use crate::{Capacity, JobId, JobState, JobStatus, Lrm, LrmError, SlotJob, Warning};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub struct MemoryLrm {
    capacity: Capacity,
    jobs: Mutex<HashMap<JobId, (String, JobState)>>,
}

impl MemoryLrm {
    pub fn new(capacity: Capacity) -> Self {
        Self {
            capacity,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, (String, JobState)>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Lrm for MemoryLrm {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: Duration::from_secs(5),
        }
    }
    fn capacity(&self) -> Option<Capacity> {
        Some(self.capacity)
    }
    fn render_script(&self, _job: &SlotJob) -> String {
        String::new()
    }
    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        let mut jobs = self.jobs();
        let id = JobId((jobs.len() + 1).to_string());
        jobs.insert(id.clone(), (job.name.clone(), JobState::Running));
        Ok(id)
    }
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        let jobs = self.jobs();
        Ok(ids
            .iter()
            .map(|i| {
                (
                    i.clone(),
                    jobs.get(i)
                        .map_or(JobStatus::NotFound, |(_, s)| JobStatus::Known(s.clone())),
                )
            })
            .collect())
    }
    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        match self.jobs().get_mut(id) {
            Some(job) => {
                job.1 = JobState::Cancelled;
                Ok(())
            }
            None => Err(LrmError::UnknownJob {
                lrm: "memory",
                job: id.clone(),
            }),
        }
    }
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        Ok(Some(
            self.jobs()
                .iter()
                .filter(|(_, (_, s))| !s.is_finished())
                .map(|(id, (name, _))| (id.clone(), name.clone()))
                .collect(),
        ))
    }
}
