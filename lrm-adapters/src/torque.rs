//! The Torque adapter: `qsub` a script with `#PBS -l nodes=N:ppn=P` that
//! `exec`s `pbsdsh -u` (one pilot per unique node, started by each node's
//! MOM, so `qdel`'s and the walltime's SIGTERM reach every pilot), one
//! `qstat -f id...` for many jobs, `qdel` with retry. Torque sends SIGTERM,
//! then SIGKILL after the queue's or server's `kill_delay`.

use crate::batch_common::{self, PbsCommands, PbsJob, Runner};
use crate::{shell_join, shell_quote, JobId, JobState, JobStatus, Lrm, LrmError, SlotJob, Warning};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// `[torque]` in the coordinator's config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TorqueConfig {
    /// Command paths (a site may point them at wrappers).
    pub qsub: PathBuf,
    pub qstat: PathBuf,
    pub qdel: PathBuf,
    /// `pbsdsh` as the job script calls it on the first node.
    pub pbsdsh: PathBuf,
    /// `#PBS -q` and `#PBS -A` when set.
    pub queue: Option<String>,
    pub account: Option<String>,
    /// More `#PBS` lines, verbatim after `#PBS ` (e.g. `-l feature=vmx`).
    pub extra_directives: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL: the queue's (or server's)
    /// `kill_delay` (`qmgr -c 'list queue <q> kill_delay'`); the pilot's grace.
    pub kill_delay_s: u64,
    /// Timeout of every command, seconds.
    pub command_timeout_s: u64,
    /// How many times `qdel` is tried before cancel() reports failure.
    pub cancel_attempts: u32,
    /// Extra environment for every command (e.g. `PBS_DEFAULT`).
    pub env: BTreeMap<String, String>,
}

impl Default for TorqueConfig {
    fn default() -> Self {
        TorqueConfig {
            qsub: "qsub".into(),
            qstat: "qstat".into(),
            qdel: "qdel".into(),
            pbsdsh: "pbsdsh".into(),
            queue: None,
            account: None,
            extra_directives: Vec::new(),
            kill_delay_s: 2,
            command_timeout_s: 30,
            cancel_attempts: 3,
            env: BTreeMap::new(),
        }
    }
}

pub struct Torque {
    config: TorqueConfig,
    commands: PbsCommands,
}

const LRM: &str = "torque";
/// Torque's `JOB_EXEC_OVERLIMIT_WT`: killed for exceeding its walltime.
const WALLTIME_EXIT: i64 = -11;

impl Torque {
    pub fn new(config: TorqueConfig) -> Result<Self, LrmError> {
        check_site_words(
            LRM,
            &config.queue,
            &config.account,
            &config.extra_directives,
        )?;
        let commands = PbsCommands {
            lrm: LRM,
            qsub: config.qsub.clone(),
            qstat: config.qstat.clone(),
            qdel: config.qdel.clone(),
            qstat_args: &["-f"],
            cancel_attempts: config.cancel_attempts,
            runner: Runner::new(config.command_timeout_s, &config.env),
        };
        Ok(Torque { config, commands })
    }
}

/// Checks queue, account and extra directives of a PBS-family config.
pub(crate) fn check_site_words(
    lrm: &'static str,
    queue: &Option<String>,
    account: &Option<String>,
    extra: &[String],
) -> Result<(), LrmError> {
    for (what, v) in [("queue", queue), ("account", account)] {
        if let Some(v) = v {
            batch_common::check_directive_word(lrm, what, v)?;
        }
    }
    if let Some(d) = extra
        .iter()
        .find(|d| d.trim().is_empty() || d.contains('\n'))
    {
        return Err(LrmError::Config {
            lrm,
            message: format!("extra_directives entry {d:?} is empty or has a newline"),
        });
    }
    Ok(())
}

/// The per-node command: `/bin/sh -c 'exec <pilot>'` (pbsdsh starts programs
/// without a shell or PATH search; the pilot's own options must not reach
/// pbsdsh's option parser).
pub(crate) fn node_command(job: &SlotJob, unset_posixly_correct: bool) -> String {
    let inner = format!(
        "{}exec {}",
        if unset_posixly_correct {
            "unset POSIXLY_CORRECT; "
        } else {
            ""
        },
        shell_join(&job.pilot_argv)
    );
    format!("/bin/sh -c {}", shell_quote(&inner))
}

/// Maps a Torque `qstat -f` job to [`JobState`].
pub(crate) fn map_job(job: &PbsJob) -> JobState {
    match job.get("job_state").unwrap_or("") {
        "Q" | "W" | "T" => JobState::Queued,
        "H" => JobState::Held,
        "R" => JobState::Running,
        "E" => JobState::Completing,
        "S" => JobState::Suspended,
        "C" => batch_common::pbs_finished_state(job, WALLTIME_EXIT),
        other => JobState::Unknown(other.to_string()),
    }
}

#[async_trait]
impl Lrm for Torque {
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
            format!("-l nodes={}:ppn={}", job.nodes, job.cores_per_node),
            // Torque's mem is for the whole job.
            format!("-l mem={}mb", job.memory_mb_per_node * u64::from(job.nodes)),
        ];
        let launch = format!(
            "# One pilot per node (-u), each started by its node's MOM: qdel's and the walltime's SIGTERM reach them all.\n\
             # POSIXLY_CORRECT: pbsdsh's getopt stops at the program instead of reading the pilot's options.\n\
             POSIXLY_CORRECT=1 exec {} -u {}\n",
            shell_quote(&c.pbsdsh.display().to_string()),
            node_command(job, true)
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

    const QSTAT_F: &str = include_str!("../tests/fixtures/torque/qstat-f-mixed.txt");
    const QSTAT_UNKNOWN: &str = include_str!("../tests/fixtures/torque/qstat-unknown.stderr");

    #[test]
    fn every_torque_state_in_the_recorded_qstat_f_maps() {
        let jobs = parse_qstat_f(QSTAT_F);
        let by_seq = |seq: &str| {
            jobs.iter()
                .find(|j| batch_common::pbs_seq(&j.id) == seq)
                .map(map_job)
        };
        assert_eq!(by_seq("101"), Some(JobState::Queued));
        assert_eq!(by_seq("102"), Some(JobState::Held));
        assert_eq!(by_seq("103"), Some(JobState::Running));
        assert_eq!(by_seq("104"), Some(JobState::Completing));
        assert_eq!(by_seq("105"), Some(JobState::Suspended));
        assert_eq!(by_seq("106"), Some(JobState::Completed));
        assert_eq!(by_seq("107"), Some(JobState::Timeout), "exit_status -11");
        assert_eq!(by_seq("108"), Some(JobState::Cancelled), "qdel: 271");
        assert_eq!(
            by_seq("109"),
            Some(JobState::Timeout),
            "265 with walltime used = limit"
        );
        assert_eq!(
            by_seq("110"),
            Some(JobState::Failed("exit status 1".into()))
        );
        assert_eq!(by_seq("111"), Some(JobState::Queued), "W");
        assert_eq!(
            by_seq("112"),
            Some(JobState::Cancelled),
            "deleted while queued: no exit_status"
        );
        assert_eq!(jobs.len(), 12);
    }

    #[test]
    fn wrapped_torque_values_are_joined() {
        let jobs = parse_qstat_f(QSTAT_F);
        let j = jobs
            .iter()
            .find(|j| batch_common::pbs_seq(&j.id) == "103")
            .unwrap();
        assert_eq!(j.get("Job_Name"), Some("wsp-sl-0123abcd"));
        assert!(
            j.get("Variable_List")
                .unwrap()
                .ends_with("PBS_O_QUEUE=batch"),
            "{:?}",
            j.get("Variable_List")
        );
    }

    #[test]
    fn torque_unknown_job_messages_name_the_gone_jobs() {
        let c = parse_qstat_stderr(QSTAT_UNKNOWN);
        assert_eq!(c.gone, ["4242", "4243"]);
        assert!(c.other.is_empty());
    }

    #[test]
    fn node_command_keeps_the_pilot_argv_intact() {
        let job = SlotJob {
            name: "n".into(),
            nodes: 1,
            cores_per_node: 1,
            memory_mb_per_node: 1,
            walltime: Duration::from_secs(1),
            pilot_argv: vec![
                "printf".into(),
                "[%s]".into(),
                "--node=%n".into(),
                "it's a $HOME".into(),
            ],
            workdir: "/tmp".into(),
        };
        let cmd = node_command(&job, true);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "[--node=%n][it's a $HOME]",
            "{cmd}"
        );
    }
}
