//! Batch systems behind one small trait: submit a pilot job, ask the state of
//! many jobs at once, cancel one.
//!
//! One module per batch system (`local`, `slurm`, `gridengine`, and `pbs`
//! for both Torque and PBS Pro); the shared parts (running a command with a timeout and keeping
//! its raw output for errors) live in [`command`]. This crate knows nothing of
//! workspaces or VMs: it runs a pilot command on N nodes for a walltime.

mod batch_common;
pub mod command;
pub mod gridengine;
pub mod local;
pub mod memory;
pub mod pbs;
pub mod priority;
pub mod reserve;
pub mod slurm;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use command::{CommandError, CommandOutput};
pub use priority::{BatchPriority, Standing, Submitted};

/// A batch job id as the LRM prints it (`1234`, `1234.server`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One pilot job: run `pilot_argv` once on each of `nodes` nodes.
///
/// The pilot expands `%n` in its own arguments to its node name, so the same
/// argv serves every node. Adapters quote every argument; nothing here is
/// ever passed through a shell unquoted.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotJob {
    /// Job name, `wsp-<slot id>`: how orphans are recognised in the LRM.
    pub name: String,
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
    /// Walltime asked of the LRM (slot duration + margin).
    pub walltime: Duration,
    /// Program and arguments of the pilot.
    pub pilot_argv: Vec<String>,
    /// Where the adapter writes the job script and the job's output files.
    pub workdir: PathBuf,
}

/// State of a job as the LRM reports it, mapped to one enum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Held,
    Running,
    Suspended,
    /// Ending: processes being killed, epilogue running.
    Completing,
    Completed,
    Failed(String),
    Cancelled,
    Timeout,
    NodeFail,
    Preempted,
    /// An LRM error state (Grid Engine `Eqw`): the job will not run without help.
    Error(String),
    /// A state this adapter does not know; the raw text is kept.
    Unknown(String),
}

impl JobState {
    /// True when the job will never run again.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Completed
                | JobState::Failed(_)
                | JobState::Cancelled
                | JobState::Timeout
                | JobState::NodeFail
                | JobState::Preempted
        )
    }
}

/// The answer for one job of a batched status query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Known(JobState),
    /// The LRM no longer lists the job (finished and purged, or never existed).
    NotFound,
}

/// A job's status with the batch system's own word on why it is not
/// running (Slurm's REASON, PBS's `comment`, Grid Engine's state), as its
/// own queue listing shows it. [`Lrm::status_with_reasons`] answers these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub status: JobStatus,
    /// Why the job waits (`Resources`, `Priority`, `Not Running: ...`);
    /// `None` when it runs or the batch system gives no reason.
    pub reason: Option<String>,
}

impl JobReport {
    /// A status with no reason.
    pub fn bare(status: JobStatus) -> Self {
        Self {
            status,
            reason: None,
        }
    }
}

/// Drops the reasons: what [`Lrm::status`] answers for an adapter that
/// implements [`Lrm::status_with_reasons`].
pub fn without_reasons(reports: HashMap<JobId, JobReport>) -> HashMap<JobId, JobStatus> {
    reports.into_iter().map(|(id, r)| (id, r.status)).collect()
}

/// The signal an LRM sends before it kills a job, and how long it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `"SIGTERM"` or `"SIGUSR2"`.
    pub signal: &'static str,
    /// Time between the warning signal and SIGKILL.
    pub grace: Duration,
}

/// The size of the nodes an LRM hands out (for checking that a request fits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
}

/// Errors of every adapter. Messages name the command and keep its output.
#[derive(Debug, thiserror::Error)]
pub enum LrmError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{command} printed no job id we could read: {output:?}")]
    UnparsableJobId { command: String, output: String },
    #[error("{command}: could not read status output: {reason}; output: {output:?}")]
    UnparsableStatus {
        command: String,
        reason: String,
        output: String,
    },
    #[error("job {job} is unknown to the {lrm} adapter")]
    UnknownJob { lrm: &'static str, job: JobId },
    #[error("job asks for {asked}, but the {lrm} cluster has {has}")]
    DoesNotFit {
        lrm: &'static str,
        asked: String,
        has: String,
    },
    #[error("{lrm} configuration: {message}")]
    Config { lrm: &'static str, message: String },
    #[error("writing job script {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A batch system. Three calls, like HyperQueue's autoalloc.
#[async_trait]
pub trait Lrm: Send + Sync {
    /// `"local"`, `"slurm"`, ...
    fn kind(&self) -> &'static str;
    /// What the LRM sends before SIGKILL; the pilot's grace period follows it.
    fn warning(&self) -> Warning;
    /// Node sizes, when the adapter knows them (the coordinator's config
    /// `[cluster]` is used otherwise).
    fn capacity(&self) -> Option<Capacity> {
        None
    }
    /// The job script this adapter would submit for `job` (for tests and `--dry-run`).
    fn render_script(&self, job: &SlotJob) -> String;
    /// Submits the job; returns its id.
    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError>;
    /// Submits the job queued by `size` (its node-time, node-ms): behind
    /// every queued job of the same size or larger, ahead of smaller ones
    /// and of jobs submitted without one (the coordinator's
    /// `[reservations] best_effort_order = "largest_first"`). Batch systems
    /// whose queue order the coordinator cannot set submit it as
    /// [`Lrm::submit`] does (the default); `queues_by_size` says which.
    async fn submit_sized(&self, job: &SlotJob, size: u64) -> Result<JobId, LrmError> {
        let _ = size;
        self.submit(job).await
    }
    /// Whether [`Lrm::submit_sized`] orders the queue.
    fn queues_by_size(&self) -> bool {
        false
    }
    /// Submits `job` asking for its place in the queue as `mode` says for
    /// its `standing` ([`priority`], docs/POOL.md "Urgent leases: the batch
    /// queue"): with [`BatchPriority::Off`] or a best-effort job that the
    /// batch system's means leave alone, a plain ([`Lrm::submit`] or
    /// [`Lrm::submit_sized`]) submission. A refused ask is not an error: the
    /// job is queued without it and [`Submitted::refused`] says why.
    /// Adapters that can order their queue override this and
    /// [`Lrm::check_batch_priority`].
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: Standing,
        mode: BatchPriority,
    ) -> Result<Submitted, LrmError> {
        let _ = mode;
        Ok(Submitted::plain(match standing {
            Standing::BestEffort { size: Some(size) } => self.submit_sized(job, size).await?,
            _ => self.submit(job).await?,
        }))
    }
    /// Whether this adapter can do `mode` ([`Lrm::submit_at`]): checked when
    /// the coordinator starts, so that a mode it cannot do is refused there,
    /// with the reason, not found out at an urgent lease. Rights are not
    /// known until a submission: a refusal then is [`Submitted::refused`].
    fn check_batch_priority(&self, mode: BatchPriority) -> Result<(), String> {
        match mode {
            BatchPriority::Off => Ok(()),
            m => Err(format!(
                "the {} batch system adapter cannot order its queue for urgent leases (batch_priority = \"{}\")",
                self.kind(),
                m.as_str()
            )),
        }
    }
    /// State of many jobs in one LRM query. Every id asked for is in the answer.
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError>;
    /// [`Lrm::status`] with the reason each waiting job waits, in the same
    /// single query. Adapters that can read a reason override this (and
    /// answer `status` from it); the default has no reasons.
    async fn status_with_reasons(
        &self,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, JobReport>, LrmError> {
        Ok(self
            .status(ids)
            .await?
            .into_iter()
            .map(|(id, s)| (id, JobReport::bare(s)))
            .collect())
    }
    /// Cancels a job (the LRM's warning signal, then SIGKILL after its grace).
    /// Cancelling a job that already ended is not an error.
    async fn cancel(&self, id: &JobId) -> Result<(), LrmError>;
    /// Compares the configured grace with what the batch system really allows
    /// (Slurm KillWait, Grid Engine notify, PBS kill_delay): `Err(LrmError::Config)` if ours is
    /// longer (pilots would be killed mid-cleanup), `Ok(Some(site value))`
    /// when checked, `Ok(None)` when this LRM cannot be asked.
    async fn check_grace(&self) -> Result<Option<Duration>, LrmError> {
        Ok(None)
    }
    /// Every job of ours the batch system still has (queued, running,
    /// ending), with its name, in one query: how orphans are found. `None`
    /// when this LRM cannot list jobs.
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        Ok(None)
    }
    /// Advance reservations, when this batch system has them and the
    /// adapter drives them (see [`reserve`]).
    fn reservations(&self) -> Option<&dyn reserve::Reservations> {
        None
    }
    /// Called once when the coordinator stops. Adapters whose jobs cannot
    /// outlive the coordinator (`local`) end them here; real LRMs keep theirs.
    async fn shutdown(&self) {}
}

/// Every adapter's settings, as sections of the coordinator's config file
/// (`[local]`, `[slurm]`, ...). Only the section of the chosen `lrm` is used.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct LrmSettings {
    pub local: local::LocalConfig,
    pub slurm: slurm::SlurmConfig,
    pub gridengine: gridengine::GridEngineConfig,
    pub torque: pbs::PbsConfig,
    pub pbspro: pbs::PbsConfig,
}

/// The batch systems we can drive (`lrm = "..."` in the coordinator's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LrmKind {
    Local,
    Slurm,
    Gridengine,
    Torque,
    Pbspro,
}

/// Builds the adapter chosen by the config.
pub fn build(kind: LrmKind, settings: &LrmSettings) -> Result<Arc<dyn Lrm>, LrmError> {
    Ok(match kind {
        LrmKind::Local => Arc::new(local::LocalLrm::new(settings.local.clone())?),
        LrmKind::Slurm => Arc::new(slurm::Slurm::new(settings.slurm.clone())?),
        LrmKind::Gridengine => Arc::new(gridengine::GridEngine::new(settings.gridengine.clone())?),
        LrmKind::Torque => Arc::new(pbs::Pbs::new(
            pbs::Flavour::Torque,
            settings.torque.clone(),
        )?),
        LrmKind::Pbspro => Arc::new(pbs::Pbs::new(
            pbs::Flavour::PbsPro,
            settings.pbspro.clone(),
        )?),
    })
}

/// Quotes one word for a POSIX shell (`'...'` with `'\''` for quotes).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,%@+".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Quotes a whole argv for a POSIX shell.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("--slot=sl-1"), "--slot=sl-1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }
}
