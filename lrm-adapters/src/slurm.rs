//! The Slurm adapter: `sbatch --parsable` a script that `exec`s
//! `srun --ntasks-per-node=1 <pilot>` (one pilot per node; scancel's SIGTERM
//! reaches srun, which forwards it to every task), one `squeue` for the state
//! of many jobs, `scancel` with retry. Slurm warns with SIGTERM and kills
//! after `KillWait` (`scontrol show config`).

use crate::batch_common::{self, Runner};
use crate::priority;
use crate::{
    shell_join, BatchPriority, JobId, JobReport, JobState, JobStatus, Lrm, LrmError, SlotJob,
    Standing, Submitted, Warning,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// `[slurm]` in the coordinator's config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SlurmConfig {
    /// Command paths (a site may point them at wrappers).
    pub sbatch: PathBuf,
    pub squeue: PathBuf,
    pub scancel: PathBuf,
    pub scontrol: PathBuf,
    /// `#SBATCH --partition=`, `--account=`, `--qos=` when set.
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// More `#SBATCH` lines, verbatim after `#SBATCH ` (e.g. `--constraint=vmx`).
    pub extra_directives: Vec<String>,
    /// More `srun` options (before the pilot command).
    pub srun_args: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL: the site's `KillWait`. The pilot's
    /// grace period; [`Slurm::check_grace`] compares it with the cluster's.
    pub kill_wait_s: u64,
    /// If set, `--signal=TERM@<s>`: Slurm sends SIGTERM this long before the
    /// walltime ends (earlier warning than KillWait alone gives).
    pub warn_before_walltime_s: Option<u32>,
    /// Timeout of every command, seconds.
    pub command_timeout_s: u64,
    /// How many times `scancel` is tried before cancel() reports failure.
    pub cancel_attempts: u32,
    /// Extra environment for every command (e.g. `SLURM_CONF`).
    pub env: BTreeMap<String, String>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            sbatch: "sbatch".into(),
            squeue: "squeue".into(),
            scancel: "scancel".into(),
            scontrol: "scontrol".into(),
            partition: None,
            account: None,
            qos: None,
            extra_directives: Vec::new(),
            srun_args: Vec::new(),
            kill_wait_s: 5,
            warn_before_walltime_s: None,
            command_timeout_s: 30,
            cancel_attempts: 3,
            env: BTreeMap::new(),
        }
    }
}

pub struct Slurm {
    config: SlurmConfig,
    runner: Runner,
}

const LRM: &str = "slurm";

mod reserve;
/// `squeue --format`: id, extended state, reason.
const SQUEUE_FORMAT: &str = "--format=%i|%T|%r";

impl Slurm {
    pub fn new(config: SlurmConfig) -> Result<Self, LrmError> {
        for (what, v) in [
            ("partition", &config.partition),
            ("account", &config.account),
            ("qos", &config.qos),
        ] {
            if let Some(v) = v {
                batch_common::check_directive_word(LRM, what, v)?;
            }
        }
        for d in &config.extra_directives {
            if d.trim().is_empty() || d.contains('\n') {
                return Err(LrmError::Config {
                    lrm: LRM,
                    message: format!("extra_directives entry {d:?} is empty or has a newline"),
                });
            }
        }
        let runner = Runner::new(config.command_timeout_s, &config.env);
        Ok(Slurm { config, runner })
    }

    /// `sbatch --parsable [extra] <script>`.
    async fn submit_with(&self, job: &SlotJob, extra: &[String]) -> Result<JobId, LrmError> {
        batch_common::check_directive_word(LRM, "job name", &job.name)?;
        batch_common::check_directive_word(LRM, "workdir", &job.workdir.display().to_string())?;
        let script = batch_common::write_script(
            job,
            &format!("{}.sbatch", job.name),
            &self.render_script(job),
        )?;
        let out = self
            .runner
            .run(
                &self.config.sbatch,
                &["--parsable".to_string()]
                    .into_iter()
                    .chain(extra.iter().cloned())
                    .chain([script.display().to_string()])
                    .collect::<Vec<_>>(),
            )
            .await?;
        let out = crate::command::check(out)?;
        let id = parse_sbatch_id(&out.command, &out.stdout)?;
        tracing::info!(lrm = LRM, job = %id, name = %job.name, nodes = job.nodes, "submitted");
        Ok(id)
    }

    /// Why job `id` did not get `--priority=TOP` (its priority as squeue
    /// shows it), or `None` when it did or squeue cannot say.
    async fn priority_not_top(&self, id: &JobId) -> Option<String> {
        let args = vec![
            "--noheader".to_string(),
            "--format=%Q".into(),
            format!("--jobs={id}"),
        ];
        let out = match self.runner.run(&self.config.squeue, &args).await {
            Ok(out) if out.success() => out,
            other => {
                tracing::warn!(lrm = LRM, job = %id, outcome = ?other, "could not read the job's priority");
                return None;
            }
        };
        let got: u64 = out.stdout.trim().parse().ok()?;
        (got < PRIORITY_TOP).then(|| {
            format!(
                "Slurm ignored --priority=TOP: job {id} has priority {got}, not {PRIORITY_TOP} (only Slurm operators and administrators may set a priority)"
            )
        })
    }

    /// The cluster's `KillWait` (`scontrol show config`).
    pub async fn site_kill_wait(&self) -> Result<Duration, LrmError> {
        let out = self
            .runner
            .run(&self.config.scontrol, &["show".into(), "config".into()])
            .await?;
        let out = crate::command::check(out)?;
        parse_kill_wait(&out.stdout).ok_or_else(|| LrmError::UnparsableStatus {
            command: out.command.clone(),
            reason: "no KillWait line".into(),
            output: out.stdout.clone(),
        })
    }

    /// Checks the configured grace against the cluster's `KillWait`: an error
    /// if the pilot would be given longer than Slurm allows (it would be
    /// killed mid-shutdown), a logged warning if it is given less. Returns the
    /// cluster's value.
    pub async fn check_grace(&self) -> Result<Duration, LrmError> {
        let site = self.site_kill_wait().await?;
        let ours = Duration::from_secs(self.config.kill_wait_s);
        if ours > site {
            return Err(LrmError::Config {
                lrm: LRM,
                message: format!(
                    "kill_wait_s = {} but the cluster's KillWait is {} s: the pilot would be killed before its grace ends",
                    self.config.kill_wait_s,
                    site.as_secs()
                ),
            });
        }
        if ours < site {
            tracing::warn!(
                lrm = LRM,
                kill_wait_s = self.config.kill_wait_s,
                site_kill_wait_s = site.as_secs(),
                "grace shorter than the cluster's KillWait"
            );
        }
        Ok(site)
    }

    async fn squeue(&self, ids: Option<&[JobId]>) -> Result<crate::CommandOutput, LrmError> {
        let mut args = vec![
            "--noheader".to_string(),
            "--states=all".into(),
            SQUEUE_FORMAT.into(),
        ];
        match ids {
            Some(ids) => args.push(format!(
                "--jobs={}",
                ids.iter()
                    .map(|i| i.0.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            None => args.push("--me".into()),
        }
        self.runner.run(&self.config.squeue, &args).await
    }
}

/// The priority `--priority=TOP` gives (Slurm's `NO_VAL - 1`, seen on 22.05).
const PRIORITY_TOP: u64 = 0xffff_fffd;

/// What the Slurm adapter asks for a pilot job's place in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    Nothing,
    /// `scontrol top <id>` after the submission (`own`).
    ScontrolTop,
    /// `sbatch --priority=TOP` (`operator`).
    SbatchPriorityTop,
}

fn ask(standing: Standing, mode: BatchPriority) -> Ask {
    match (standing, mode) {
        (Standing::Urgent { .. }, BatchPriority::Own) => Ask::ScontrolTop,
        (Standing::Urgent { .. }, BatchPriority::Operator) => Ask::SbatchPriorityTop,
        _ => Ask::Nothing,
    }
}

/// Slurm's time limit is in minutes: the walltime rounded up (at least 1).
fn minutes(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .div_ceil(60)
        .max(1)
}

/// Reads the job id of `sbatch --parsable`: `123` or `123;cluster`, on the
/// last line that has one (site wrappers may print more).
pub(crate) fn parse_sbatch_id(command: &str, stdout: &str) -> Result<JobId, LrmError> {
    stdout
        .lines()
        .rev()
        .map(|l| l.trim().split(';').next().unwrap_or("").trim())
        .find(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .map(|id| JobId(id.to_string()))
        .ok_or_else(|| LrmError::UnparsableJobId {
            command: command.to_string(),
            output: stdout.to_string(),
        })
}

/// A job id squeue accepts (`123`, `123_4` array task, `123+1` het job).
fn plausible_id(id: &JobId) -> bool {
    let mut parts = id.0.splitn(2, ['_', '+']);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    parts.next().is_some_and(digits) && parts.next().is_none_or(digits)
}

/// Maps a Slurm job state (`%T`) and pending reason (`%r`) to [`JobState`].
pub(crate) fn map_state(state: &str, reason: &str) -> JobState {
    let held_reason = matches!(
        reason,
        "JobHeldUser"
            | "JobHeldAdmin"
            | "launch_failed_requeued_held"
            | "job_requeued_in_held_state"
    ) || reason.contains("requeued held");
    // A state may carry a suffix in some versions (`CANCELLED+`, `CANCELLED by 0`).
    let base = state.split([' ', '+']).next().unwrap_or("");
    match base {
        "PENDING" if held_reason => JobState::Held,
        "PENDING" | "REQUEUED" | "REQUEUE_FED" => JobState::Queued,
        "REQUEUE_HOLD" | "RESV_DEL_HOLD" => JobState::Held,
        "CONFIGURING" | "RUNNING" | "RESIZING" | "SIGNALING" => JobState::Running,
        "SUSPENDED" | "STOPPED" => JobState::Suspended,
        "COMPLETING" | "STAGE_OUT" => JobState::Completing,
        "COMPLETED" => JobState::Completed,
        "CANCELLED" | "REVOKED" => JobState::Cancelled,
        "TIMEOUT" | "DEADLINE" => JobState::Timeout,
        "NODE_FAIL" | "BOOT_FAIL" => JobState::NodeFail,
        "PREEMPTED" => JobState::Preempted,
        "FAILED" => JobState::Failed(if reason.is_empty() || reason == "None" {
            "FAILED".into()
        } else {
            format!("FAILED: {reason}")
        }),
        "OUT_OF_MEMORY" => JobState::Failed("OUT_OF_MEMORY".into()),
        "SPECIAL_EXIT" => JobState::Error(
            "SPECIAL_EXIT: held after a special exit; needs requeue or cancel".into(),
        ),
        _ => JobState::Unknown(state.to_string()),
    }
}

/// Parses `squeue --noheader --format=%i|%j` lines into (id, name).
fn parse_id_name_lines(text: &str) -> Vec<(JobId, String)> {
    text.lines()
        .filter_map(|l| {
            let (id, name) = l.trim().split_once('|')?;
            (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
                .then(|| (JobId(id.to_string()), name.trim().to_string()))
        })
        .collect()
}

/// Parses `squeue --noheader --format=%i|%T|%r` lines into id -> state.
/// Lines that are not three fields (site banners, warnings) are skipped.
#[cfg(test)]
pub(crate) fn parse_squeue(stdout: &str) -> HashMap<String, JobState> {
    parse_squeue_reasons(stdout)
        .into_iter()
        .map(|(id, (st, _))| (id, st))
        .collect()
}

/// [`parse_squeue`] with each job's pending reason (`%r`), as squeue prints
/// it in its REASON column; `None` for a running job (`None`) or no reason.
pub(crate) fn parse_squeue_reasons(stdout: &str) -> HashMap<String, (JobState, Option<String>)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (id, state, reason) = (f.next()?.trim(), f.next()?.trim(), f.next()?.trim());
            let st = map_state(state, reason);
            let waits = matches!(st, JobState::Queued | JobState::Held);
            let why = (waits && !reason.is_empty() && reason != "None").then(|| reason.to_string());
            (!id.is_empty() && !state.is_empty()).then(|| (id.to_string(), (st, why)))
        })
        .collect()
}

/// `KillWait                = 30 sec` of `scontrol show config`.
pub(crate) fn parse_kill_wait(stdout: &str) -> Option<Duration> {
    stdout.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "KillWait").then(|| {
            v.split_whitespace()
                .next()?
                .parse()
                .ok()
                .map(Duration::from_secs)
        })?
    })
}

/// squeue's "no such job" answers (exit 1): any id it cannot resolve.
fn squeue_invalid_id(out: &crate::CommandOutput) -> bool {
    !out.success() && out.stderr.contains("Invalid job id")
}

#[async_trait]
impl Lrm for Slurm {
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        let args: Vec<String> = [
            "--noheader",
            "--me",
            "--states=PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED,RESIZING,SIGNALING,STAGE_OUT",
            "--format=%i|%j",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let out = crate::command::check(self.runner.run(&self.config.squeue, &args).await?)?;
        Ok(Some(parse_id_name_lines(&out.stdout)))
    }

    async fn check_grace(&self) -> Result<Option<Duration>, LrmError> {
        Slurm::check_grace(self).await.map(Some)
    }

    fn kind(&self) -> &'static str {
        LRM
    }

    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: Duration::from_secs(self.config.kill_wait_s),
        }
    }

    fn render_script(&self, job: &SlotJob) -> String {
        let c = &self.config;
        let wd = job.workdir.display();
        let mut s = batch_common::script_header(LRM, job);
        let mut d = |line: String| {
            s.push_str("#SBATCH ");
            s.push_str(&line);
            s.push('\n');
        };
        d(format!("--job-name={}", job.name));
        d(format!("--nodes={}", job.nodes));
        d("--ntasks-per-node=1".into());
        d(format!("--cpus-per-task={}", job.cores_per_node));
        d(format!("--mem={}M", job.memory_mb_per_node));
        d(format!("--time={}", minutes(job.walltime)));
        d(format!("--chdir={wd}"));
        d(format!("--output={wd}/{}-%j.out", job.name));
        if let Some(p) = &c.partition {
            d(format!("--partition={p}"));
        }
        if let Some(a) = &c.account {
            d(format!("--account={a}"));
        }
        if let Some(q) = &c.qos {
            d(format!("--qos={q}"));
        }
        if let Some(w) = c.warn_before_walltime_s {
            d(format!("--signal=TERM@{w}"));
        }
        for e in &c.extra_directives {
            d(e.trim().to_string());
        }
        s.push_str("# One pilot per node. exec: scancel's and the walltime's SIGTERM reach srun, which forwards it to every pilot.\n");
        let mut srun = vec![
            "srun".to_string(),
            format!("--nodes={}", job.nodes),
            format!("--ntasks={}", job.nodes),
            "--ntasks-per-node=1".into(),
            format!("--cpus-per-task={}", job.cores_per_node),
        ];
        srun.extend(c.srun_args.iter().cloned());
        srun.extend(job.pilot_argv.iter().cloned());
        s.push_str(&format!("exec {}\n", shell_join(&srun)));
        s
    }

    fn reservations(&self) -> Option<&dyn crate::reserve::Reservations> {
        Some(self)
    }

    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.submit_with(job, &[]).await
    }

    /// Urgent jobs: `own`, `scontrol top <id>` after `sbatch` (ahead of our
    /// own pending jobs: Slurm raises the nice of our others; a plain user
    /// needs `SchedulerParameters=enable_user_top`); `operator`, `sbatch
    /// --priority=TOP` (operators and admins only; refused: submitted
    /// without). Best-effort jobs are left as they are.
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: Standing,
        mode: BatchPriority,
    ) -> Result<Submitted, LrmError> {
        match ask(standing, mode) {
            Ask::Nothing => Ok(Submitted::plain(self.submit_with(job, &[]).await?)),
            Ask::SbatchPriorityTop => {
                let extra = vec!["--priority=TOP".to_string()];
                let mut s = priority::submit_or_plain(
                    "sbatch --priority=TOP".into(),
                    extra,
                    |x| async move { self.submit_with(job, &x).await },
                )
                .await?;
                // Slurm 22.05 ignores --priority from a non-operator
                // without a word (exit 0, the usual priority): look.
                if s.refused.is_none() {
                    s.refused = self.priority_not_top(&s.id).await;
                }
                Ok(s)
            }
            Ask::ScontrolTop => {
                let id = self.submit_with(job, &[]).await?;
                let args = vec!["top".to_string(), id.0.clone()];
                let asked = format!("scontrol top {id}");
                let refused = match self.runner.run(&self.config.scontrol, &args).await {
                    Ok(out) if out.success() => None,
                    Ok(out) => Some(format!(
                        "scontrol top {id} exited {}: {}",
                        out.status.map_or("on a signal".into(), |s| s.to_string()),
                        priority::first_words(&format!("{}{}", out.stderr, out.stdout))
                    )),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = &refused {
                    tracing::warn!(lrm = LRM, job = %id, error = %why, "could not move the urgent job to the top of ours");
                }
                Ok(Submitted {
                    id,
                    asked: Some(asked),
                    refused,
                })
            }
        }
    }

    fn check_batch_priority(&self, _mode: BatchPriority) -> Result<(), String> {
        Ok(())
    }

    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        Ok(crate::without_reasons(self.status_with_reasons(ids).await?))
    }

    async fn status_with_reasons(
        &self,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, JobReport>, LrmError> {
        let mut answer: HashMap<JobId, JobReport> = HashMap::new();
        let (ask, bogus): (Vec<JobId>, Vec<JobId>) = ids.iter().cloned().partition(plausible_id);
        // An id squeue could not even parse would fail the whole query.
        answer.extend(
            bogus
                .into_iter()
                .map(|id| (id, JobReport::bare(JobStatus::NotFound))),
        );
        if ask.is_empty() {
            return Ok(answer);
        }
        let mut out = self.squeue(Some(&ask)).await?;
        if squeue_invalid_id(&out) {
            // Some versions fail the whole query when any id is purged (22.05
            // only when all are): ask for all our jobs instead and pick ours.
            out = self.squeue(None).await?;
        }
        let out = crate::command::check(out)?;
        let states = parse_squeue_reasons(&out.stdout);
        for id in ask {
            let report = states.get(&id.0).cloned().map_or(
                JobReport::bare(JobStatus::NotFound),
                |(state, reason)| JobReport {
                    status: JobStatus::Known(state),
                    reason,
                },
            );
            answer.insert(id, report);
        }
        Ok(answer)
    }

    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        if !plausible_id(id) {
            return Err(LrmError::UnknownJob {
                lrm: LRM,
                job: id.clone(),
            });
        }
        let args = vec![id.0.clone()];
        batch_common::cancel_with_retry(LRM, id, self.config.cancel_attempts, || async {
            let mut out = self.runner.run(&self.config.scancel, &args).await?;
            let text = format!("{}{}", out.stdout, out.stderr);
            if text.contains("Invalid job id") || text.contains("already completing or completed") {
                out.status = Some(0); // gone already: done
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbatch_parsable_id_with_cluster_and_wrapper_lines() {
        let id = |s| parse_sbatch_id("sbatch", s).unwrap().0;
        assert_eq!(id("1234\n"), "1234");
        assert_eq!(id("1234;cluster2\n"), "1234");
        assert_eq!(id("NOTE: your account has 10 h left\n5678\n"), "5678");
        assert_eq!(id("5678\nsbatch wrapper: logged to /var/log/x\n"), "5678");
        let e = parse_sbatch_id(
            "sbatch --parsable x",
            "sbatch: error: Batch job submission failed",
        )
        .unwrap_err();
        assert!(e.to_string().contains("Batch job submission failed"), "{e}");
        assert!(parse_sbatch_id("sbatch", "").is_err());
    }

    #[test]
    fn every_documented_slurm_state_maps_to_one_variant() {
        use JobState::*;
        let cases: &[(&str, &str, JobState)] = &[
            ("PENDING", "Resources", Queued),
            ("PENDING", "Priority", Queued),
            ("PENDING", "JobHeldUser", Held),
            ("PENDING", "JobHeldAdmin", Held),
            ("PENDING", "launch failed requeued held", Held),
            ("REQUEUED", "None", Queued),
            ("REQUEUE_FED", "None", Queued),
            ("REQUEUE_HOLD", "None", Held),
            ("RESV_DEL_HOLD", "None", Held),
            ("CONFIGURING", "None", Running),
            ("RUNNING", "None", Running),
            ("RESIZING", "None", Running),
            ("SIGNALING", "None", Running),
            ("SUSPENDED", "None", Suspended),
            ("STOPPED", "None", Suspended),
            ("COMPLETING", "None", Completing),
            ("STAGE_OUT", "None", Completing),
            ("COMPLETED", "None", Completed),
            ("CANCELLED", "None", Cancelled),
            ("REVOKED", "None", Cancelled),
            ("TIMEOUT", "TimeLimit", Timeout),
            ("DEADLINE", "None", Timeout),
            ("NODE_FAIL", "NodeDown", NodeFail),
            ("BOOT_FAIL", "None", NodeFail),
            ("PREEMPTED", "None", Preempted),
            (
                "FAILED",
                "NonZeroExitCode",
                Failed("FAILED: NonZeroExitCode".into()),
            ),
            ("FAILED", "None", Failed("FAILED".into())),
            (
                "OUT_OF_MEMORY",
                "OutOfMemory",
                Failed("OUT_OF_MEMORY".into()),
            ),
        ];
        for (state, reason, want) in cases {
            assert_eq!(&map_state(state, reason), want, "{state} {reason}");
        }
        assert!(matches!(map_state("SPECIAL_EXIT", "None"), Error(_)));
        assert_eq!(map_state("CANCELLED+", "None"), Cancelled);
        assert_eq!(
            map_state("WEIRD_NEW_STATE", "None"),
            Unknown("WEIRD_NEW_STATE".into())
        );
    }

    #[test]
    fn squeue_id_name_lines_are_read_and_noise_is_skipped() {
        let got =
            parse_id_name_lines("12|wsp-abcd1234-sl-00000001\nslurm_load_jobs error\n13|other\n");
        assert_eq!(
            got,
            vec![
                (JobId("12".into()), "wsp-abcd1234-sl-00000001".into()),
                (JobId("13".into()), "other".into())
            ]
        );
    }

    #[test]
    fn squeue_lines_are_read_and_noise_is_skipped() {
        let s = parse_squeue("1|RUNNING|None\n2|PENDING|JobHeldAdmin\nsqueue: warning: something\n3|CANCELLED|None\n\n");
        let r = parse_squeue_reasons("1|RUNNING|None\n4|PENDING|Resources\n5|PENDING|Priority\n");
        assert_eq!(r["1"].1, None, "a running job waits for nothing");
        assert_eq!(r["4"], (JobState::Queued, Some("Resources".into())));
        assert_eq!(r["5"].1.as_deref(), Some("Priority"));
        assert_eq!(s.len(), 3);
        assert_eq!(s["1"], JobState::Running);
        assert_eq!(s["2"], JobState::Held);
        assert_eq!(s["3"], JobState::Cancelled);
    }

    #[test]
    fn kill_wait_is_read_from_scontrol_show_config() {
        let text = "Configuration data as of 2024-01-01T00:00:00\nJobRequeue              = 1\nKillWait                = 30 sec\nKillOnBadExit           = 0\n";
        assert_eq!(parse_kill_wait(text), Some(Duration::from_secs(30)));
        assert_eq!(parse_kill_wait("nothing"), None);
    }

    #[test]
    fn only_urgent_jobs_are_moved_and_each_mode_by_its_own_means() {
        let be = Standing::BestEffort { size: None };
        let urgent = Standing::Urgent { urgency: 1 };
        assert_eq!(ask(urgent, BatchPriority::Off), Ask::Nothing);
        assert_eq!(ask(urgent, BatchPriority::Own), Ask::ScontrolTop);
        assert_eq!(ask(urgent, BatchPriority::Operator), Ask::SbatchPriorityTop);
        for m in [
            BatchPriority::Off,
            BatchPriority::Own,
            BatchPriority::Operator,
        ] {
            assert_eq!(
                ask(be, m),
                Ask::Nothing,
                "{m:?}: best-effort jobs keep their place"
            );
        }
    }

    #[test]
    fn walltime_rounds_up_to_whole_minutes() {
        assert_eq!(minutes(Duration::from_secs(1)), 1);
        assert_eq!(minutes(Duration::from_secs(60)), 1);
        assert_eq!(minutes(Duration::from_secs(61)), 2);
        assert_eq!(minutes(Duration::from_secs(3600)), 60);
    }

    #[test]
    fn ids_squeue_cannot_parse_are_not_sent() {
        assert!(plausible_id(&JobId("123".into())));
        assert!(plausible_id(&JobId("123_4".into())));
        assert!(plausible_id(&JobId("123+1".into())));
        assert!(!plausible_id(&JobId("abc".into())));
        assert!(!plausible_id(&JobId("--all".into())));
        assert!(!plausible_id(&JobId("".into())));
    }
}
