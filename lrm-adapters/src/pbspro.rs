//! The PBS Pro (OpenPBS) adapter: `qsub` a script with
//! `#PBS -l select=N:ncpus=P:mem=Mmb` and `place=scatter` (one chunk per
//! host) that `exec`s `pbsdsh` (one pilot per chunk, started by each host's
//! MOM, so `qdel`'s and the walltime's SIGTERM reach every pilot), one
//! `qstat -x -f id...` for many jobs (finished ones too, where the server
//! keeps job history), `qdel` with retry. PBS sends SIGTERM, then SIGKILL
//! after the job's `kill_delay` (default 10 s).

use crate::batch_common::{self, PbsCommands, PbsJob, Runner};
use crate::torque::{check_site_words, node_command};
use crate::{shell_quote, JobId, JobState, JobStatus, Lrm, LrmError, SlotJob, Warning};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// `[pbspro]` in the coordinator's config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PbsProConfig {
    /// Command paths (a site may point them at wrappers).
    pub qsub: PathBuf,
    pub qstat: PathBuf,
    pub qdel: PathBuf,
    /// `pbsdsh` as the job script calls it on the first node.
    pub pbsdsh: PathBuf,
    /// `#PBS -q` and `#PBS -A` when set.
    pub queue: Option<String>,
    pub account: Option<String>,
    /// `#PBS -l place=`: `scatter` puts each chunk (pilot) on its own host;
    /// `scatter:excl` also keeps other jobs off those hosts.
    pub place: String,
    /// More `#PBS` lines, verbatim after `#PBS `.
    pub extra_directives: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL: the queue's `kill_delay`
    /// (`qmgr -c 'list queue <q> kill_delay'`, default 10); the pilot's grace.
    pub kill_delay_s: u64,
    /// Query with `-x` (finished jobs from the server's job history).
    pub qstat_history: bool,
    /// Timeout of every command, seconds.
    pub command_timeout_s: u64,
    /// How many times `qdel` is tried before cancel() reports failure.
    pub cancel_attempts: u32,
    /// Extra environment for every command (e.g. `PBS_CONF_FILE`).
    pub env: BTreeMap<String, String>,
}

impl Default for PbsProConfig {
    fn default() -> Self {
        PbsProConfig {
            qsub: "qsub".into(),
            qstat: "qstat".into(),
            qdel: "qdel".into(),
            pbsdsh: "pbsdsh".into(),
            queue: None,
            account: None,
            place: "scatter".into(),
            extra_directives: Vec::new(),
            kill_delay_s: 10,
            qstat_history: true,
            command_timeout_s: 30,
            cancel_attempts: 3,
            env: BTreeMap::new(),
        }
    }
}

pub struct PbsPro {
    config: PbsProConfig,
    commands: PbsCommands,
}

const LRM: &str = "pbspro";
/// PBS Pro's `JOB_EXEC_KILL_WALLTIME`: killed for exceeding its walltime.
const WALLTIME_EXIT: i64 = -29;

impl PbsPro {
    pub fn new(config: PbsProConfig) -> Result<Self, LrmError> {
        check_site_words(
            LRM,
            &config.queue,
            &config.account,
            &config.extra_directives,
        )?;
        batch_common::check_directive_word(LRM, "place", &config.place)?;
        let commands = PbsCommands {
            lrm: LRM,
            qsub: config.qsub.clone(),
            qstat: config.qstat.clone(),
            qdel: config.qdel.clone(),
            qstat_args: if config.qstat_history {
                &["-x", "-f"]
            } else {
                &["-f"]
            },
            cancel_attempts: config.cancel_attempts,
            runner: Runner::new(config.command_timeout_s, &config.env),
        };
        Ok(PbsPro { config, commands })
    }
}

/// Maps a PBS Pro `qstat -x -f` job to [`JobState`] (states: PBS Reference
/// Guide, "Job States").
pub(crate) fn map_job(job: &PbsJob) -> JobState {
    match job.get("job_state").unwrap_or("") {
        "Q" | "W" | "T" => JobState::Queued,
        "H" => JobState::Held,
        "R" | "B" => JobState::Running,
        "E" => JobState::Completing,
        "S" | "U" => JobState::Suspended,
        "F" | "X" => batch_common::pbs_finished_state(job, WALLTIME_EXIT),
        "M" => JobState::Unknown("M (moved to another server)".into()),
        other => JobState::Unknown(other.to_string()),
    }
}

#[async_trait]
impl Lrm for PbsPro {
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        self.commands.list_jobs().await.map(Some)
    }

    fn kind(&self) -> &'static str {
        LRM
    }

    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: Duration::from_secs(self.config.kill_delay_s),
        }
    }

    fn render_script(&self, job: &SlotJob) -> String {
        let c = &self.config;
        let resources = [
            format!(
                "-l select={}:ncpus={}:mem={}mb",
                job.nodes, job.cores_per_node, job.memory_mb_per_node
            ),
            format!("-l place={}", c.place),
        ];
        let launch = format!(
            "# One pilot per chunk (one chunk per host), each started by its host's MOM: qdel's and the walltime's SIGTERM reach them all.\n\
             exec {} -- {}\n",
            shell_quote(&c.pbsdsh.display().to_string()),
            node_command(job, false)
        );
        batch_common::pbs_script(
            LRM,
            job,
            &resources,
            c.queue.as_deref(),
            c.account.as_deref(),
            &c.extra_directives,
            &launch,
        )
    }

    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.commands.submit(job, &self.render_script(job)).await
    }

    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        self.commands.status(ids, map_job).await
    }

    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        self.commands.cancel(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_common::{parse_qstat_f, parse_qstat_stderr};

    const QSTAT_XF: &str = include_str!("../tests/fixtures/pbspro/qstat-xf-mixed.txt");
    const QSTAT_ERR: &str = include_str!("../tests/fixtures/pbspro/qstat-gone.stderr");

    #[test]
    fn every_pbspro_state_in_the_recorded_qstat_xf_maps() {
        let jobs = parse_qstat_f(QSTAT_XF);
        let by_seq = |seq: &str| {
            jobs.iter()
                .find(|j| batch_common::pbs_seq(&j.id) == seq)
                .map(map_job)
        };
        assert_eq!(by_seq("2001"), Some(JobState::Queued));
        assert_eq!(by_seq("2002"), Some(JobState::Held));
        assert_eq!(by_seq("2003"), Some(JobState::Running));
        assert_eq!(by_seq("2004"), Some(JobState::Completing));
        assert_eq!(by_seq("2005"), Some(JobState::Suspended));
        assert_eq!(by_seq("2006"), Some(JobState::Completed));
        assert_eq!(by_seq("2007"), Some(JobState::Timeout), "Exit_status -29");
        assert_eq!(by_seq("2008"), Some(JobState::Cancelled), "qdel: 271");
        assert_eq!(
            by_seq("2009"),
            Some(JobState::Failed("exit status -27".into())),
            "over mem"
        );
        assert_eq!(by_seq("2010"), Some(JobState::Suspended), "U");
        assert_eq!(by_seq("2011"), Some(JobState::Queued), "W");
        assert_eq!(
            by_seq("2012"),
            Some(JobState::Cancelled),
            "deleted while queued"
        );
        assert_eq!(jobs.len(), 12);
    }

    #[test]
    fn wrapped_pbspro_values_are_joined() {
        let jobs = parse_qstat_f(QSTAT_XF);
        let j = jobs
            .iter()
            .find(|j| batch_common::pbs_seq(&j.id) == "2003")
            .unwrap();
        assert_eq!(j.get("exec_host"), Some("cn001/0*4+cn002/0*4"));
        assert!(
            j.get("comment").unwrap().contains("Job run at"),
            "{:?}",
            j.get("comment")
        );
    }

    #[test]
    fn pbspro_finished_and_unknown_messages_name_the_gone_jobs() {
        let c = parse_qstat_stderr(QSTAT_ERR);
        assert_eq!(c.gone, ["3001", "3002"]);
        assert!(c.other.is_empty(), "{:?}", c.other);
    }
}
