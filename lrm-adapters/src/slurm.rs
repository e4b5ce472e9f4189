//! STUB: the slurm adapter (being written).

use crate::{JobId, JobStatus, Lrm, LrmError, SlotJob, Warning};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SlurmConfig {}

pub struct Slurm;

impl Slurm {
    pub fn new(_c: SlurmConfig) -> Result<Self, LrmError> {
        Err(LrmError::Config { lrm: "slurm", message: "not implemented yet".into() })
    }
}

#[async_trait]
impl Lrm for Slurm {
    fn kind(&self) -> &'static str {
        "slurm"
    }
    fn warning(&self) -> Warning {
        Warning { signal: "SIGTERM", grace: Duration::from_secs(5) }
    }
    fn render_script(&self, _job: &SlotJob) -> String {
        String::new()
    }
    async fn submit(&self, _job: &SlotJob) -> Result<JobId, LrmError> {
        Err(LrmError::Config { lrm: "slurm", message: "not implemented yet".into() })
    }
    async fn status(&self, _ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        Err(LrmError::Config { lrm: "slurm", message: "not implemented yet".into() })
    }
    async fn cancel(&self, _id: &JobId) -> Result<(), LrmError> {
        Err(LrmError::Config { lrm: "slurm", message: "not implemented yet".into() })
    }
}
