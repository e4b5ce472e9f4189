//! The PBS family adapter, one implementation with two flavours:
//! **Torque** (`lrm = "torque"`) and **PBS Pro / OpenPBS** (`lrm = "pbspro"`).
//!
//! Both: `qsub` a script whose `#PBS` lines ask for N nodes and that runs
//! `pbsdsh`, which starts one pilot per node through that node's MOM, so
//! `qdel`'s and the walltime's SIGTERM reach every pilot (SIGKILL follows
//! after the queue's `kill_delay`); one `qstat` for many jobs; `qdel` with
//! retry (none when the job is already ending); the grace checked against
//! the queue's `kill_delay`.
//!
//! What differs, and only here:
//!
//! | | Torque | PBS Pro |
//! |---|---|---|
//! | resources | `-l nodes=N:ppn=P`, `-l mem=<job total>mb` | `-l select=N:ncpus=P:mem=<M>mb`, `-l place=scatter` |
//! | launch | script is its own shell (`-S`), `pbsdsh -u` (one per unique node) in its own session, waited for | `exec pbsdsh --` (one per chunk) |
//! | status | `qstat -x id...` (XML) | `qstat -x -f id...` (text) |
//! | finished | `C` (while `keep_completed`) | `F` (job history) |
//! | walltime kill | `exit_status` -11 | `Exit_status` -29 |
//! | default `kill_delay` | 2 s | 10 s |
//! | qdel of a multi-node job | every pilot SIGKILLed at once: warned of (`TORQUE_MULTI_NODE`) | SIGTERM to every pilot |
//! | advance reservations | none (guaranteed leases refused) | `pbs_rsub` ([`reserve`]) |
//!
//! Seen on the real servers (OpenPBS 23.06, Torque 6.1, scripts/pbs-up.sh):
//! ids `N.server`; `qdel` gives the job SIGTERM within ~20 ms and exit
//! status 271 (256 + 15); unknown ids give rc 153 and a complaint per id on
//! stderr. Root cannot submit on Torque and root's jobs escape PBS's kill:
//! the coordinator runs as the service user that owns the pilot jobs.

pub mod reserve;

use crate::batch_common::{self, cancel_with_retry, check_directive_word, Runner};
use crate::command::{self, CommandOutput};
use crate::{
    shell_join, shell_quote, BatchPriority, JobId, JobReport, JobState, JobStatus, Lrm, LrmError,
    SlotJob, Standing, Submitted, Warning,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// What Torque does to a multi-node job at qdel (docs/LRM.md, "Torque: no
/// grace for multi-node jobs"): its mom's `mom_req_signal_job()` first has
/// every sister mom kill the job's tasks (`terminate_sisters()`, IM_KILL_JOB:
/// SIGTERM, then SIGKILL at once), then goes on to SIGKILL its own.
const TORQUE_MULTI_NODE: &str = "Torque SIGKILLs every pilot of a multi-node pilot job at qdel, whatever kill_delay says: \
     a multi-node lease an admin qdels gets no grace and leaves its nodes to workspace-kill-all (docs/LRM.md)";

/// When OpenPBS SIGKILLs pbsdsh's tasks after qdel (see `site_kill_delay`).
const PBSPRO_TASK_KILL: Duration = Duration::from_secs(10);

/// Which PBS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Torque,
    PbsPro,
}

impl Flavour {
    /// The adapter's name (`lrm = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Torque => "torque",
            Flavour::PbsPro => "pbspro",
        }
    }

    /// The server's `kill_delay` when neither queue nor server sets one.
    pub fn default_kill_delay(self) -> Duration {
        match self {
            // Torque's DEFAULT_KILL_DELAY (src/include/server.h)
            Flavour::Torque => Duration::from_secs(2),
            // PBS Pro reference guide, queue attribute kill_delay
            Flavour::PbsPro => Duration::from_secs(10),
        }
    }

    /// The exit status of a job killed for its walltime: Torque's
    /// `JOB_EXEC_OVERLIMIT_WT`, PBS Pro's `JOB_EXEC_KILL_WALLTIME`.
    fn walltime_exit(self) -> i64 {
        match self {
            Flavour::Torque => -11,
            Flavour::PbsPro => -29,
        }
    }
}

/// `[torque]` or `[pbspro]` in the coordinator's config (the same keys).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PbsConfig {
    /// Command paths (a site may point them at wrappers). Default: found on PATH.
    pub qsub: Option<PathBuf>,
    pub qstat: Option<PathBuf>,
    pub qdel: Option<PathBuf>,
    /// `pbsdsh` as the job script calls it on the first node.
    pub pbsdsh: Option<PathBuf>,
    /// `#PBS -q` and `#PBS -A` when set. The grace check reads this queue
    /// (the server's `default_queue` when unset).
    pub queue: Option<String>,
    pub account: Option<String>,
    /// PBS Pro only: `#PBS -l place=` (default `scatter`: each chunk, one
    /// pilot, on its own host; `scatter:excl` also keeps other jobs off them).
    pub place: Option<String>,
    /// More `#PBS` lines, verbatim after `#PBS `.
    pub extra_directives: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL: the queue's `kill_delay`, the
    /// pilot's grace. Default: the flavour's default (Torque 2, PBS Pro 10).
    pub kill_delay_s: Option<u64>,
    /// Timeout of every command, seconds (default 30).
    pub command_timeout_s: Option<u64>,
    /// How many times `qdel` is tried before cancel() reports failure (default 3).
    pub cancel_attempts: Option<u32>,
    /// Extra environment for every command (`PBS_CONF_FILE`, `PBS_DEFAULT`).
    pub env: BTreeMap<String, String>,
}

/// The Torque or PBS Pro adapter.
pub struct Pbs {
    flavour: Flavour,
    config: PbsConfig,
    runner: Runner,
    qsub: PathBuf,
    qstat: PathBuf,
    qdel: PathBuf,
    pbsdsh: PathBuf,
    kill_delay: Duration,
    cancel_attempts: u32,
}

impl Pbs {
    pub fn new(flavour: Flavour, config: PbsConfig) -> Result<Self, LrmError> {
        let lrm = flavour.name();
        for (what, v) in [("queue", &config.queue), ("account", &config.account)] {
            if let Some(v) = v {
                check_directive_word(lrm, what, v)?;
            }
        }
        match (flavour, &config.place) {
            (Flavour::PbsPro, Some(p)) => check_directive_word(lrm, "place", p)?,
            (Flavour::Torque, Some(_)) => {
                return Err(LrmError::Config {
                    lrm,
                    message: "place is a PBS Pro setting (select/place); Torque places one pilot per node itself (nodes=N)".into(),
                })
            }
            _ => {}
        }
        if let Some(d) = config
            .extra_directives
            .iter()
            .find(|d| d.trim().is_empty() || d.contains('\n'))
        {
            return Err(LrmError::Config {
                lrm,
                message: format!("extra_directives entry {d:?} is empty or has a newline"),
            });
        }
        let path = |p: &Option<PathBuf>, default: &str| p.clone().unwrap_or_else(|| default.into());
        Ok(Pbs {
            flavour,
            runner: Runner::new(config.command_timeout_s.unwrap_or(30), &config.env),
            qsub: path(&config.qsub, "qsub"),
            qstat: path(&config.qstat, "qstat"),
            qdel: path(&config.qdel, "qdel"),
            pbsdsh: path(&config.pbsdsh, "pbsdsh"),
            kill_delay: config
                .kill_delay_s
                .map(Duration::from_secs)
                .unwrap_or(flavour.default_kill_delay()),
            cancel_attempts: config.cancel_attempts.unwrap_or(3),
            config,
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// `qsub [extra] <script>` (the command line's options win over the
    /// script's `#PBS` lines: `-q R123` puts a job into a reservation).
    async fn submit_with(&self, job: &SlotJob, extra: &[String]) -> Result<JobId, LrmError> {
        let lrm = self.flavour.name();
        check_directive_word(lrm, "job name", &job.name)?;
        check_directive_word(lrm, "workdir", &job.workdir.display().to_string())?;
        let path = batch_common::write_script(job, &script_file(job), &self.render_script(job))?;
        let args: Vec<String> = extra
            .iter()
            .cloned()
            .chain([path.display().to_string()])
            .collect();
        let out = self.runner.run(&self.qsub, &args).await?;
        let out = command::check(out)?;
        let id = parse_job_id(&out.command, &out.stdout)?;
        tracing::info!(lrm, job = %id, name = %job.name, nodes = job.nodes, "submitted");
        if self.flavour == Flavour::Torque && job.nodes > 1 {
            tracing::warn!(lrm, job = %id, nodes = job.nodes, "{TORQUE_MULTI_NODE}");
        }
        Ok(id)
    }

    /// The `kill_delay` the server applies to our jobs: the queue's (ours,
    /// or the server's `default_queue`), else the server's, else the
    /// flavour's default; on PBS Pro at most 10 s (its pbsdsh tasks are
    /// SIGKILLed then). Read with `qstat -B -f` and `qstat -Q -f <queue>`,
    /// which any user may run.
    pub async fn site_kill_delay(&self) -> Result<Duration, LrmError> {
        let server = self.qstat_records(&["-B", "-f"]).await?;
        let server = server.first();
        let queue = match (
            &self.config.queue,
            server.and_then(|s| s.get("default_queue")),
        ) {
            (Some(q), _) => q.clone(),
            (None, Some(q)) => q.to_string(),
            (None, None) => {
                return Err(LrmError::Config {
                    lrm: self.flavour.name(),
                    message: "no queue configured and the server has no default_queue".into(),
                })
            }
        };
        let queues = self.qstat_records(&["-Q", "-f", &queue]).await?;
        let delay = queues
            .iter()
            .find(|q| q.id == queue)
            .and_then(|q| q.get("kill_delay"))
            .or_else(|| server.and_then(|s| s.get("kill_delay")))
            .and_then(batch_common::hms_seconds)
            .map(Duration::from_secs)
            .unwrap_or(self.flavour.default_kill_delay());
        Ok(match self.flavour {
            // OpenPBS 23.06 SIGKILLs the tasks pbsdsh started (the pilots)
            // 10 s after qdel whatever the queue's kill_delay (seen with 5
            // and 20): a longer kill_delay does not give the pilot longer.
            Flavour::PbsPro => delay.min(PBSPRO_TASK_KILL),
            Flavour::Torque => delay,
        })
    }

    /// `qstat <args>` in its text form (`Server: x` / `Queue: x` records).
    async fn qstat_records(&self, args: &[&str]) -> Result<Vec<PbsRecord>, LrmError> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = command::check(self.runner.run(&self.qstat, &args).await?)?;
        Ok(parse_records(&out.stdout))
    }

    /// One `qstat` of `ids`, or of every job when `ids` is empty: Torque's
    /// XML; PBS Pro's `-f` text, because its `-F json` lists only the first
    /// of several ids (seen on OpenPBS 23.06: `qstat -x -f -F json 8.s 9.s`
    /// exits 0 with job 8 alone).
    async fn qstat_jobs(&self, ids: &[JobId]) -> Result<(Vec<PbsRecord>, CommandOutput), LrmError> {
        let mut args: Vec<String> = match self.flavour {
            Flavour::Torque => vec!["-x".into()],
            // -x: finished jobs too (job history); harmless without it.
            Flavour::PbsPro => vec!["-x".into(), "-f".into()],
        };
        args.extend(ids.iter().map(|i| i.0.clone()));
        let out = self.runner.run(&self.qstat, &args).await?;
        let parsed = match self.flavour {
            Flavour::Torque => parse_torque_xml(&out.stdout),
            Flavour::PbsPro => Ok(parse_records(&out.stdout)),
        };
        let jobs = parsed.map_err(|reason| LrmError::UnparsableStatus {
            command: out.command.clone(),
            reason,
            output: format!("{}{}", out.stdout, out.stderr),
        })?;
        Ok((jobs, out))
    }

    /// The state of one job as qstat described it.
    pub(crate) fn map_job(&self, job: &PbsRecord) -> JobState {
        let state = job.get("job_state").unwrap_or("");
        match (self.flavour, state) {
            (_, "Q" | "W" | "T") => JobState::Queued,
            (_, "H") => JobState::Held,
            (_, "R") | (Flavour::PbsPro, "B") => JobState::Running,
            (_, "E") => JobState::Completing,
            (_, "S") | (Flavour::PbsPro, "U") => JobState::Suspended,
            (Flavour::Torque, "C") | (Flavour::PbsPro, "F" | "X") => {
                finished_state(job, self.flavour.walltime_exit())
            }
            (Flavour::PbsPro, "M") => JobState::Unknown("M (moved to another server)".into()),
            (_, other) => JobState::Unknown(other.to_string()),
        }
    }
}

#[async_trait]
impl Lrm for Pbs {
    fn kind(&self) -> &'static str {
        self.flavour.name()
    }

    /// PBS Pro's `pbs_rsub` (see [`reserve`]); Torque has none that its
    /// scheduler honours (pbs_sched and Maui/Moab differ), so none here.
    fn reservations(&self) -> Option<&dyn crate::reserve::Reservations> {
        match self.flavour {
            Flavour::PbsPro => Some(self),
            Flavour::Torque => None,
        }
    }

    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGTERM",
            grace: self.kill_delay,
        }
    }

    fn render_script(&self, job: &SlotJob) -> String {
        let c = &self.config;
        let pbsdsh = shell_quote(&self.pbsdsh.display().to_string());
        let (resources, launch) = match self.flavour {
            Flavour::Torque => (
                vec![
                    format!("-l nodes={}:ppn={}", job.nodes, job.cores_per_node),
                    // Torque's mem is for the whole job.
                    format!("-l mem={}mb", job.memory_mb_per_node * u64::from(job.nodes)),
                ],
                torque_launch(&pbsdsh, &node_command(job, true)),
            ),
            Flavour::PbsPro => (
                vec![
                    format!(
                        "-l select={}:ncpus={}:mem={}mb",
                        job.nodes, job.cores_per_node, job.memory_mb_per_node
                    ),
                    format!("-l place={}", c.place.as_deref().unwrap_or("scatter")),
                ],
                format!(
                    "# One pilot per chunk (one chunk per host), each started by its host's MOM: qdel's and the walltime's SIGTERM reach them all.\n\
                     exec {pbsdsh} -- {}\n",
                    node_command(job, false)
                ),
            ),
        };
        let wd = job.workdir.display();
        let mut s = batch_common::script_header(self.flavour.name(), job);
        let mut d = |line: String| s.push_str(&format!("#PBS {line}\n"));
        d(format!("-N {}", job.name));
        if self.flavour == Flavour::Torque {
            // This script is its own shell: see torque_launch().
            d(format!("-S {wd}/{}", script_file(job)));
        }
        for r in resources {
            d(r);
        }
        d(format!(
            "-l walltime={}",
            batch_common::hhmmss(job.walltime)
        ));
        d("-j oe".into());
        d(format!("-o {wd}/{}.out", job.name));
        if let Some(q) = &c.queue {
            d(format!("-q {q}"));
        }
        if let Some(a) = &c.account {
            d(format!("-A {a}"));
        }
        for e in &c.extra_directives {
            d(e.trim().to_string());
        }
        s.push_str(&format!("cd {} || exit 1\n", shell_quote(&wd.to_string())));
        s.push_str(&launch);
        s
    }

    /// Writes the script to `<workdir>/<name>.pbs`, `qsub`s it, reads the id.
    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.submit_with(job, &[]).await
    }

    /// `qsub -p` (the job's `Priority`, -1024..1023, which any user may
    /// set): `own`, our best-effort jobs at -1023 and urgent ones at 0;
    /// `operator`, urgent ones at 1023. The scheduler orders by it only
    /// where it sorts by job priority (PBS Pro: `job_sort_key:
    /// "job_priority HIGH"` in sched_config, not in OpenPBS's default).
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: Standing,
        mode: BatchPriority,
    ) -> Result<Submitted, LrmError> {
        let p = crate::priority::qsub_p(standing, mode, 1023);
        crate::priority::submit_with_p(
            "qsub",
            p,
            |x| async move { self.submit_with(job, &x).await },
        )
        .await
    }

    fn check_batch_priority(&self, _mode: BatchPriority) -> Result<(), String> {
        Ok(())
    }

    /// One `qstat` for all ids. Listed jobs by their state; ids qstat says
    /// it does not know (or no longer shows) are `NotFound`; an id that is
    /// neither makes the query an error when qstat complained of something
    /// else (a server that did not answer says nothing about the job).
    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        Ok(crate::without_reasons(self.status_with_reasons(ids).await?))
    }

    /// A waiting job's reason is its `comment` (the scheduler's own words,
    /// `Not Running: Insufficient amount of resource: ncpus ...`), else its
    /// state letter.
    async fn status_with_reasons(
        &self,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, JobReport>, LrmError> {
        let (ask, bogus): (Vec<JobId>, Vec<JobId>) = ids.iter().cloned().partition(plausible_id);
        let mut answer: HashMap<JobId, JobReport> = bogus
            .into_iter()
            .map(|id| (id, JobReport::bare(JobStatus::NotFound)))
            .collect();
        if ask.is_empty() {
            return Ok(answer);
        }
        let (jobs, out) = self.qstat_jobs(&ask).await?;
        let listed: HashMap<&str, &PbsRecord> = jobs.iter().map(|j| (seq(&j.id), j)).collect();
        let complaints = parse_complaints(&out.stderr);
        for id in ask {
            let s = seq(&id.0);
            let status = if let Some(job) = listed.get(s) {
                let state = self.map_job(job);
                JobReport {
                    reason: waiting_reason(job, &state),
                    status: JobStatus::Known(state),
                }
            } else if complaints.gone.iter().any(|g| g == s) || complaints.other.is_empty() {
                JobReport::bare(JobStatus::NotFound)
            } else {
                return Err(LrmError::UnparsableStatus {
                    command: out.command.clone(),
                    reason: format!(
                        "job {id} is not in the output and qstat failed: {}",
                        complaints.other.join("; ")
                    ),
                    output: format!("{}{}", out.stdout, out.stderr),
                });
            };
            answer.insert(id, status);
        }
        Ok(answer)
    }

    /// `qdel id` with retry, unless the job is already ending; a job the
    /// server no longer has counts as done.
    async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        if !plausible_id(id) {
            return Err(LrmError::UnknownJob {
                lrm: self.flavour.name(),
                job: id.clone(),
            });
        }
        // A job already ending (its pilots have their SIGTERM) is left
        // alone: a second qdel of a job being deleted SIGKILLs its tasks at
        // once on OpenPBS (seen: the pilot killed mid-cleanup when the
        // coordinator cancelled a job an admin had just qdel'd). If the
        // query fails, qdel decides.
        if let Ok(answer) = self.status(std::slice::from_ref(id)).await {
            match answer.get(id) {
                Some(JobStatus::Known(s)) if s.is_finished() || *s == JobState::Completing => {
                    tracing::info!(lrm = self.flavour.name(), job = %id, state = ?s, "cancel: job already ending, no qdel");
                    return Ok(());
                }
                Some(JobStatus::NotFound) => return Ok(()),
                _ => {}
            }
        }
        let args = vec![id.0.clone()];
        cancel_with_retry(self.flavour.name(), id, self.cancel_attempts, || async {
            let mut out = self.runner.run(&self.qdel, &args).await?;
            if !out.success() && qdel_says_gone(&out) {
                out.status = Some(0);
            }
            Ok(out)
        })
        .await
    }

    async fn check_grace(&self) -> Result<Option<Duration>, LrmError> {
        let site = self.site_kill_delay().await?;
        let ours = self.kill_delay;
        if ours > site {
            return Err(LrmError::Config {
                lrm: self.flavour.name(),
                message: format!(
                    "kill_delay_s = {} but the queue's kill_delay is {} s: the pilot would be killed before its grace ends",
                    ours.as_secs(),
                    site.as_secs()
                ),
            });
        }
        if self.flavour == Flavour::Torque {
            tracing::warn!(lrm = self.flavour.name(), "{TORQUE_MULTI_NODE}");
        }
        if ours < site {
            tracing::warn!(
                lrm = self.flavour.name(),
                kill_delay_s = ours.as_secs(),
                site_kill_delay_s = site.as_secs(),
                "grace shorter than the queue's kill_delay"
            );
        }
        Ok(Some(site))
    }

    /// Every job the server still runs or queues, with its name.
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        let (jobs, out) = self.qstat_jobs(&[]).await?;
        if !out.success() {
            return Err(command::CommandError::Failed(out).into());
        }
        Ok(Some(
            jobs.into_iter()
                .filter(|j| !self.map_job(j).is_finished())
                .filter_map(|j| {
                    let name = j.get("Job_Name")?.to_string();
                    Some((JobId(j.id), name))
                })
                .collect(),
        ))
    }
}

/// The job script's file name in the slot's work directory.
fn script_file(job: &SlotJob) -> String {
    format!("{}.pbs", job.name)
}

/// Torque's launch: the pilots get the whole `kill_delay` after `qdel` (or
/// the walltime's SIGTERM), as on PBS Pro and Slurm. Three things of Torque
/// 6.1's mom (`src/resmom`) stand in the way, each handled here:
///
/// - By default the job's first process is the owner's *login shell*, which
///   reads the script's path from a pipe and runs it as a child
///   (`source_login_shells_or_not()`, `SHELL_INVOKE` in `start_exec.c`). At
///   qdel's SIGTERM (`kill_job()` -> `kill_task()`, to every process of the
///   job's session) that shell dies, the mom takes the job as ended
///   (`scan_for_terminated()`) and SIGKILLs every task of it, the pilots
///   too, within milliseconds (`mother_superior_cleanup()` ->
///   `kill_job(SIGKILL)`; `kill_task()`'s SIGKILL is a SIGTERM followed by
///   SIGKILL after 20 reads of `/proc`, no wait). So the script is its own
///   shell (`#PBS -S <this script>`, which the mom execs directly): it
///   traps SIGTERM and stays.
/// - pbsdsh exits at SIGTERM (its `bailout()`), which would end the script.
///   It runs in a session of its own, which the mom's signals do not reach
///   (`kill_task()` signals by session), and ends when every pilot has
///   ended (their obits); the pilots, tasks of the job, get the SIGTERM.
/// - Once alone, pbsdsh never exits (`mom_reconnect()` retries forever): if
///   the script is SIGKILLed first (`kill_delay` over), the loop beside
///   pbsdsh, which checks every second that the script still runs, kills it.
///
/// A script that got SIGTERM ends by SIGTERM, so the job reads as killed
/// (exit status 271), not completed.
fn torque_launch(pbsdsh: &str, node_command: &str) -> String {
    format!(
        "# One pilot per node (-u), each started by its node's MOM as a task of the job: qdel's and the walltime's SIGTERM reach them all.\n\
         # This shell (the job's own, #PBS -S) outlives that SIGTERM so that the pilots have until the SIGKILL after kill_delay:\n\
         # Torque SIGKILLs every task once the job's shell has ended. pbsdsh, which would exit at SIGTERM, runs in a session of\n\
         # its own, where the MOM's signals do not reach it, and ends when every pilot has; the loop beside it kills it if this\n\
         # shell is SIGKILLed first.\n\
         # POSIXLY_CORRECT: pbsdsh's getopt stops at the program instead of reading the pilot's options.\n\
         term=0\n\
         trap 'term=1; echo \"wsp: SIGTERM: the pilots have until the SIGKILL after kill_delay\" >&2' TERM\n\
         POSIXLY_CORRECT=1 setsid /bin/sh -c 'job=$1; shift; \"$@\" & p=$!; while kill -0 \"$p\" 2>/dev/null; do kill -0 \"$job\" 2>/dev/null || kill -KILL \"$p\"; sleep 1; done; wait \"$p\"' \\\n\
         \x20   wsp-pbsdsh \"$$\" {pbsdsh} -u {node_command} &\n\
         pid=$!\n\
         status=0\n\
         # wait returns early when a trapped signal arrives: wait again until pbsdsh is gone.\n\
         while kill -0 \"$pid\" 2>/dev/null; do wait \"$pid\"; status=$?; done\n\
         if [ $term = 1 ]; then trap - TERM; kill -TERM $$; fi\n\
         exit $status\n"
    )
}

/// The per-node command: `/bin/sh -c 'exec <pilot>'` (pbsdsh starts programs
/// without a shell or PATH search; the pilot's own options must not reach
/// pbsdsh's option parser).
fn node_command(job: &SlotJob, unset_posixly_correct: bool) -> String {
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

// ---------------------------------------------------------------------------
// Reading qsub, qstat and qdel

/// One job, queue or server as qstat describes it: its id and attributes,
/// nested ones flattened (`Resource_List.walltime`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PbsRecord {
    pub id: String,
    pub attrs: HashMap<String, String>,
}

impl PbsRecord {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(|v| v.trim())
    }
}

/// Why a job waits: its `comment`, else its state letter (`Q`, `H`).
pub(crate) fn waiting_reason(job: &PbsRecord, state: &JobState) -> Option<String> {
    if !matches!(state, JobState::Queued | JobState::Held) {
        return None;
    }
    let letter = job.get("job_state").unwrap_or("?");
    Some(match job.get("comment").filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None => format!("job_state {letter}"),
    })
}

/// Reads the job id `qsub` printed: the last line that looks like `123`,
/// `123.server` or `123[].server` (site wrappers may print banners before or
/// after it). The raw output is kept in the error.
pub(crate) fn parse_job_id(command: &str, stdout: &str) -> Result<JobId, LrmError> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            let s = l.split('.').next().unwrap_or("");
            let s = s.strip_suffix("[]").unwrap_or(s);
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && !l.contains(char::is_whitespace)
                && !l.ends_with('.')
        })
        .map(|l| JobId(l.to_string()))
        .ok_or_else(|| LrmError::UnparsableJobId {
            command: command.to_string(),
            output: stdout.to_string(),
        })
}

/// The sequence number of a job id (`123` of `123.server.example.org`), the
/// part every form of the id (short or long server name, truncated by
/// `qstat`) has in common.
pub(crate) fn seq(id: &str) -> &str {
    id.trim()
        .split('.')
        .next()
        .unwrap_or("")
        .trim_end_matches('*')
}

/// Only words that are plausible job ids go on a `qstat`/`qdel` command
/// line (anything else would be an option or break the whole batch).
fn plausible_id(id: &JobId) -> bool {
    let s = seq(&id.0);
    let s = s.strip_suffix("[]").unwrap_or(s);
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && id
            .0
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b))
}

/// Torque's `qstat -x`: `<Data><Job><Job_Id>1.s</Job_Id><job_state>R</job_state>
/// <Resource_List><walltime>00:10:00</walltime></Resource_List>...</Job></Data>`,
/// one whole document (`<?xml ...?>` and `<Data>`) per id asked for (seen on
/// Torque 6.1: `qstat -x 1.s 2.s` prints two). No output at all is no job.
pub(crate) fn parse_torque_xml(text: &str) -> Result<Vec<PbsRecord>, String> {
    let mut jobs = Vec::new();
    let docs = text
        .split("<?xml")
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| format!("<?xml{d}"));
    for doc in docs {
        let doc = roxmltree::Document::parse(&doc).map_err(|e| format!("not XML: {e}"))?;
        let data = doc.root_element();
        if data.tag_name().name() != "Data" {
            return Err(format!(
                "root element <{}>, not <Data>",
                data.tag_name().name()
            ));
        }
        for job in data.children().filter(|n| n.has_tag_name("Job")) {
            let mut rec = PbsRecord::default();
            flatten_xml(job, "", &mut rec.attrs);
            rec.id = rec
                .attrs
                .remove("Job_Id")
                .ok_or("a <Job> without <Job_Id>")?;
            jobs.push(rec);
        }
    }
    Ok(jobs)
}

fn flatten_xml(node: roxmltree::Node, prefix: &str, out: &mut HashMap<String, String>) {
    for child in node.children().filter(|n| n.is_element()) {
        let key = format!("{prefix}{}", child.tag_name().name());
        if child.children().any(|n| n.is_element()) {
            flatten_xml(child, &format!("{key}."), out);
        } else {
            out.insert(key, child.text().unwrap_or("").trim().to_string());
        }
    }
}

/// Reads the text form of `qstat -f` (PBS Pro jobs) and of `qstat -B -f` /
/// `qstat -Q -f` (both flavours):
///
/// ```text
/// Job Id: 12.pbshost
///     job_state = R
///     Resource_List.walltime = 00:10:00
/// Queue: workq
///     queue_type = Execution
///     kill_delay = 5
///     comment = a long value that qstat wraps onto
/// <TAB>the next line
/// ```
pub(crate) fn parse_records(text: &str) -> Vec<PbsRecord> {
    let mut recs: Vec<PbsRecord> = Vec::new();
    let mut last_key: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with([' ', '\t']) {
            last_key = None;
            if let Some((_, id)) = line.split_once(": ") {
                recs.push(PbsRecord {
                    id: id.trim().to_string(),
                    attrs: HashMap::new(),
                });
            }
            continue;
        }
        let Some(rec) = recs.last_mut() else { continue };
        // qstat wraps long values at a fixed width, also right after a
        // space: keep trailing spaces until the value is complete.
        if line.starts_with('\t') {
            if let Some(v) = last_key.as_ref().and_then(|k| rec.attrs.get_mut(k)) {
                v.push_str(line.trim_start_matches('\t').trim_end_matches('\r'));
            }
        } else if let Some((k, v)) = line.trim_start().split_once(" = ") {
            rec.attrs
                .insert(k.trim().to_string(), v.trim_end_matches('\r').to_string());
            last_key = Some(k.trim().to_string());
        }
    }
    recs
}

/// What `qstat`'s standard error says about the ids it did not list.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Complaints {
    /// Sequence numbers of jobs the server does not know (`Unknown Job Id`)
    /// or no longer shows (`Job has finished, use -x ...`).
    pub gone: Vec<String>,
    /// Every other line: a problem with the query itself (server down, ...).
    pub other: Vec<String>,
}

/// Reads `qstat` complaints, one per line:
/// `qstat: Unknown Job Id 123.server` (PBS Pro),
/// `qstat: Unknown Job Id Error 123.server` (Torque),
/// `qstat: 123.server Job has finished, use -x or -H to obtain historical job information` (PBS Pro).
pub(crate) fn parse_complaints(stderr: &str) -> Complaints {
    let mut c = Complaints::default();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        let gone = lower.contains("unknown job id")
            || lower.contains("job has finished")
            || lower.contains("illegally formed job identifier");
        let id = line
            .split(char::is_whitespace)
            .map(|w| w.trim_matches(|ch: char| ch == ',' || ch == ':'))
            .find(|w| {
                !seq(w).is_empty()
                    && seq(w)
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'[' || b == b']')
            });
        match (gone, id) {
            (true, Some(id)) => c.gone.push(seq(id).to_string()),
            _ => c.other.push(line.to_string()),
        }
    }
    c
}

/// `qdel` said the job is gone already (unknown, finished, completed).
fn qdel_says_gone(out: &CommandOutput) -> bool {
    let text = format!("{}\n{}", out.stdout, out.stderr).to_ascii_lowercase();
    [
        "unknown job id",
        "nonexistent job id",
        "job has finished",
        "invalid state for job - complete",
        "job already in exit state",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// A finished job's end from its exit status (Torque `exit_status`, PBS Pro
/// `Exit_status`): 0 completed; the flavour's walltime code; 256+signal when
/// killed by a signal (qdel; or the walltime on servers that report the
/// signal: then the used walltime reached the limit); no status at all:
/// deleted before it ran.
fn finished_state(job: &PbsRecord, walltime_code: i64) -> JobState {
    let exit = job
        .get("exit_status")
        .or_else(|| job.get("Exit_status"))
        .map(str::trim);
    let used = job
        .get("resources_used.walltime")
        .and_then(batch_common::hms_seconds);
    let limit = job
        .get("Resource_List.walltime")
        .and_then(batch_common::hms_seconds);
    let at_limit = matches!((used, limit), (Some(u), Some(l)) if l > 0 && u >= l);
    match exit.map(|e| e.parse::<i64>()) {
        None => JobState::Cancelled,
        Some(Ok(0)) => JobState::Completed,
        Some(Ok(c)) if c == walltime_code => JobState::Timeout,
        Some(Ok(c)) if c > 256 && at_limit => JobState::Timeout,
        Some(Ok(c)) if c > 256 => JobState::Cancelled,
        Some(Ok(c)) => JobState::Failed(format!("exit status {c}")),
        Some(Err(_)) => JobState::Unknown(format!("exit status {:?}", exit.unwrap_or(""))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PBSPRO_XF: &str = include_str!("../tests/fixtures/pbspro/qstat-xf-mixed.txt");
    const PBSPRO_XF_ERR: &str = include_str!("../tests/fixtures/pbspro/qstat-xf-mixed.stderr");
    const PBSPRO_GONE: &str = include_str!("../tests/fixtures/pbspro/qstat-f-gone.stderr");
    const PBSPRO_BF: &str = include_str!("../tests/fixtures/pbspro/qstat-Bf.txt");
    const PBSPRO_QF: &str = include_str!("../tests/fixtures/pbspro/qstat-Qf.txt");

    /// A `qsub` that logs its arguments, one line per call, and answers as
    /// OpenPBS does (`N.server`), or refuses when asked (a site's wrapper).
    fn fake_qsub(dir: &std::path::Path, refuse_p: bool) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let log = dir.join("qsub.log");
        let refuse = if refuse_p {
            "case \" $* \" in *' -p '*) echo 'qsub: priority not allowed at this site' >&2; exit 1;; esac\n"
        } else {
            ""
        };
        let path = dir.join("qsub");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$*\" >> '{}'\n{refuse}n=$(wc -l < '{}')\necho \"$n.pbsserver\"\n",
                log.display(),
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn qsub_gets_the_priority_each_mode_asks_on_both_flavours() {
        for flavour in [Flavour::Torque, Flavour::PbsPro] {
            let dir = tempfile::tempdir().unwrap();
            let pbs = Pbs::new(
                flavour,
                PbsConfig {
                    qsub: Some(fake_qsub(dir.path(), false)),
                    ..PbsConfig::default()
                },
            )
            .unwrap();
            assert!(pbs.check_batch_priority(BatchPriority::Own).is_ok());
            let job = SlotJob {
                name: "wsp-t-sl-1".into(),
                nodes: 1,
                cores_per_node: 1,
                memory_mb_per_node: 100,
                walltime: Duration::from_secs(60),
                pilot_argv: vec!["true".into()],
                workdir: dir.path().join("jobs"),
            };
            let be = Standing::BestEffort { size: None };
            let urgent = Standing::Urgent { urgency: 1 };
            let cases = [
                (be, BatchPriority::Off, None),
                (urgent, BatchPriority::Off, None),
                (be, BatchPriority::Own, Some("qsub -p -1023")),
                (urgent, BatchPriority::Own, Some("qsub -p 0")),
                (be, BatchPriority::Operator, None),
                (urgent, BatchPriority::Operator, Some("qsub -p 1023")),
            ];
            for (n, (standing, mode, asked)) in cases.iter().enumerate() {
                let s = pbs.submit_at(&job, *standing, *mode).await.unwrap();
                assert_eq!(s.id, JobId(format!("{}.pbsserver", n + 1)));
                assert_eq!(
                    s.asked.as_deref(),
                    *asked,
                    "{flavour:?} {standing:?} {mode:?}"
                );
                assert_eq!(s.refused, None);
            }
            let log = std::fs::read_to_string(dir.path().join("qsub.log")).unwrap();
            let args: Vec<&str> = log.lines().collect();
            let script = dir.path().join("jobs/wsp-t-sl-1.pbs").display().to_string();
            let want = [
                script.clone(),
                script.clone(),
                format!("-p -1023 {script}"),
                format!("-p 0 {script}"),
                script.clone(),
                format!("-p 1023 {script}"),
            ];
            assert_eq!(args, want, "{flavour:?}");
        }
    }

    #[tokio::test]
    async fn a_qsub_that_refuses_the_priority_queues_the_job_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let pbs = Pbs::new(
            Flavour::PbsPro,
            PbsConfig {
                qsub: Some(fake_qsub(dir.path(), true)),
                ..PbsConfig::default()
            },
        )
        .unwrap();
        let job = SlotJob {
            name: "wsp-t-sl-2".into(),
            nodes: 1,
            cores_per_node: 1,
            memory_mb_per_node: 100,
            walltime: Duration::from_secs(60),
            pilot_argv: vec!["true".into()],
            workdir: dir.path().join("jobs"),
        };
        let s = pbs
            .submit_at(
                &job,
                Standing::Urgent { urgency: 2 },
                BatchPriority::Operator,
            )
            .await
            .unwrap();
        assert_eq!(
            s.id,
            JobId("2.pbsserver".into()),
            "submitted again, without -p"
        );
        assert_eq!(s.asked.as_deref(), Some("qsub -p 1023"));
        let why = s.refused.expect("the refusal is kept");
        assert!(why.contains("priority not allowed at this site"), "{why}");
    }

    fn states(flavour: Flavour, jobs: &[PbsRecord]) -> BTreeMap<String, JobState> {
        let pbs = Pbs::new(flavour, PbsConfig::default()).unwrap();
        jobs.iter()
            .map(|j| (j.get("Job_Name").unwrap_or("").to_string(), pbs.map_job(j)))
            .collect()
    }

    const TORQUE_X: &str = include_str!("../tests/fixtures/torque/qstat-x-mixed.xml");
    const TORQUE_X_ERR: &str = include_str!("../tests/fixtures/torque/qstat-x-mixed.stderr");
    const TORQUE_X_ALL: &str = include_str!("../tests/fixtures/torque/qstat-x-all.xml");
    const TORQUE_BF: &str = include_str!("../tests/fixtures/torque/qstat-Bf.txt");
    const TORQUE_QF: &str = include_str!("../tests/fixtures/torque/qstat-Qf.txt");

    #[test]
    fn recorded_torque_qstat_x_one_document_per_id_maps_every_job() {
        let jobs = parse_torque_xml(TORQUE_X).unwrap();
        assert_eq!(jobs.len(), 6, "six <?xml?> documents");
        assert_eq!(
            parse_torque_xml(TORQUE_X_ALL).unwrap(),
            jobs,
            "the same jobs as one document"
        );
        let s = states(Flavour::Torque, &jobs);
        assert_eq!(s["wsp-fx-run"], JobState::Running);
        assert_eq!(s["wsp-fx-held"], JobState::Held);
        assert_eq!(s["wsp-sl-cancel"], JobState::Cancelled, "qdel: 271");
        assert_eq!(s["wsp-sl-wall"], JobState::Timeout, "exit_status -11");
        assert_eq!(s["wsp-sl-live"], JobState::Failed("exit status 1".into()));
        let wall = jobs
            .iter()
            .find(|j| j.get("Job_Name") == Some("wsp-sl-wall"))
            .unwrap();
        assert_eq!(wall.get("Resource_List.walltime"), Some("00:00:03"));
        assert_eq!(parse_complaints(TORQUE_X_ERR).gone, ["987654"]);
        assert!(parse_torque_xml("").unwrap().is_empty());
        assert!(parse_torque_xml("qstat: cannot connect").is_err());
        assert!(parse_torque_xml("<?xml version=\"1.0\"?><Data><Job>").is_err());
    }

    #[test]
    fn recorded_torque_server_and_queue_give_the_kill_delay() {
        let server = parse_records(TORQUE_BF);
        assert_eq!(server[0].get("default_queue"), Some("batch"));
        let queue = parse_records(TORQUE_QF);
        assert_eq!(queue[0].id, "batch");
        assert_eq!(queue[0].get("kill_delay"), Some("5"));
        assert!(
            queue[0].get("state_count").unwrap().ends_with("Complete:4"),
            "wrapped value joined"
        );
    }

    #[test]
    fn recorded_openpbs_qstat_xf_maps_every_job() {
        let jobs = parse_records(PBSPRO_XF);
        assert_eq!(jobs.len(), 6);
        let s = states(Flavour::PbsPro, &jobs);
        assert_eq!(s["wsp-fx-run"], JobState::Running);
        assert_eq!(s["wsp-fx-held"], JobState::Held);
        assert_eq!(s["wsp-fx-big"], JobState::Queued);
        assert_eq!(s["wsp-sl-done"], JobState::Completed, "Exit_status 0");
        assert_eq!(s["wsp-sl-cancel"], JobState::Cancelled, "qdel: 271");
        assert_eq!(s["wsp-sl-wall"], JobState::Timeout, "Exit_status -29");
        assert_eq!(seq(&jobs[0].id), "17");
    }

    #[test]
    fn wrapped_values_are_joined_with_their_spaces() {
        let jobs = parse_records(PBSPRO_XF);
        let big = jobs
            .iter()
            .find(|j| j.get("Job_Name") == Some("wsp-fx-big"))
            .unwrap();
        assert_eq!(
            big.get("comment"),
            Some("Can Never Run: Insufficient amount of resource: ncpus (R: 8 A: 2 T: 2)")
        );
        let pbs = Pbs::new(Flavour::PbsPro, PbsConfig::default()).unwrap();
        let state = pbs.map_job(big);
        assert_eq!(
            waiting_reason(big, &state).as_deref(),
            big.get("comment"),
            "a waiting job's reason is its comment"
        );
        assert!(big
            .get("Variable_List")
            .unwrap()
            .ends_with("PBS_O_HOST=pbshost"));
    }

    #[test]
    fn recorded_openpbs_complaints_name_the_gone_jobs() {
        let c = parse_complaints(PBSPRO_XF_ERR);
        assert_eq!(c.gone, ["987654"]);
        assert!(c.other.is_empty(), "{:?}", c.other);
        let c = parse_complaints(PBSPRO_GONE);
        assert_eq!(c.gone, ["12", "987654"], "finished without -x, and unknown");
        assert!(c.other.is_empty(), "{:?}", c.other);
    }

    #[test]
    fn recorded_openpbs_server_and_queue_give_the_kill_delay() {
        let server = parse_records(PBSPRO_BF);
        assert_eq!(server.len(), 1);
        assert_eq!(server[0].id, "pbshost");
        assert_eq!(server[0].get("default_queue"), Some("workq"));
        let queue = parse_records(PBSPRO_QF);
        assert_eq!(queue[0].id, "workq");
        assert_eq!(queue[0].get("kill_delay"), Some("5"));
    }

    #[test]
    fn pbs_job_id_is_the_last_id_line_whatever_wrappers_print() {
        let id = |s| parse_job_id("qsub", s).unwrap().0;
        assert_eq!(id("123.server\n"), "123.server");
        assert_eq!(
            id("Welcome to the cluster. Jobs are charged.\n4567.pbs01.example.org\n"),
            "4567.pbs01.example.org"
        );
        assert_eq!(id("12[].server\n"), "12[].server");
        assert_eq!(id("  99\n"), "99");
        assert!(parse_job_id("qsub", "qsub: Job rejected by all possible destinations\n").is_err());
        assert!(parse_job_id("qsub", "").is_err());
        let e = parse_job_id("qsub -q x", "nonsense")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nonsense") && e.contains("qsub -q x"), "{e}");
    }

    #[test]
    fn seq_matches_short_long_and_truncated_ids() {
        assert_eq!(seq("123.server.example.org"), "123");
        assert_eq!(seq("123.serv*"), "123");
        assert_eq!(seq("123"), "123");
        assert_eq!(seq("5[].s"), "5[]");
    }

    #[test]
    fn qstat_stderr_complaints_are_sorted_into_gone_and_other() {
        let c = parse_complaints(
            "qstat: Unknown Job Id 12.pbs\nqstat: Unknown Job Id Error 13.torque.example.org\n\
             qstat: 14.pbs Job has finished, use -x or -H to obtain historical job information\n\
             Connection refused\nqstat: cannot connect to server pbs (errno=111)\n",
        );
        assert_eq!(c.gone, ["12", "13", "14"]);
        assert_eq!(c.other.len(), 2);
        let c = parse_complaints("qstat: illegally formed job identifier: 231512525\n");
        assert_eq!(c.gone, ["231512525"]);
    }
}
