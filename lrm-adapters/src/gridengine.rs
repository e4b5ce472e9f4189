//! The Grid Engine adapter (Son of Grid Engine, Univa/Altair GE): `qsub
//! -terse -notify -pe <pe> N` a script that starts one pilot per host of
//! `$PE_HOSTFILE` with `qrsh -inherit` (each a task of the job, so Grid
//! Engine signals every pilot), one `qstat -u '*' -xml` for many jobs, `qdel`
//! with retry. With `-notify`, `qdel` and `h_rt` send SIGUSR2, then SIGKILL
//! after the queue's `notify` time (plain `qdel` without it: SIGKILL at once).

use crate::batch_common::{self, Runner};
use crate::priority;
use crate::{
    shell_join, shell_quote, BatchPriority, JobId, JobReport, JobState, JobStatus, Lrm, LrmError,
    SlotJob, Standing, Submitted, Warning,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// How many slots of the parallel environment a job asks for.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeSlots {
    /// N slots: the PE's `allocation_rule` must be `1` on a real cluster (one
    /// slot, one pilot per host; `$round_robin` on a single test host).
    Nodes,
    /// N x cores slots: the PE's `allocation_rule` must equal the cores per node.
    Cores,
}

/// `[gridengine]` in the coordinator's config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GridEngineConfig {
    /// Command paths (a site may point them at wrappers).
    pub qsub: PathBuf,
    pub qstat: PathBuf,
    pub qdel: PathBuf,
    pub qconf: PathBuf,
    /// `qrsh` as the job script calls it on the master host.
    pub qrsh: PathBuf,
    /// The parallel environment (`control_slaves TRUE`, see docs/LRM.md).
    pub parallel_environment: String,
    pub pe_slots: PeSlots,
    /// `#$ -q` and `#$ -P` when set.
    pub queue: Option<String>,
    pub project: Option<String>,
    /// If set, `-l <resource>=<MB per slot>M` (e.g. `h_vmem`, `mem_free`).
    pub memory_resource: Option<String>,
    /// More `#$` lines, verbatim after `#$ `.
    pub extra_directives: Vec<String>,
    /// Seconds between SIGUSR2 and SIGKILL: the queue's `notify`
    /// (`qconf -sq <queue>`); the pilot's grace. [`GridEngine::check_grace`].
    pub notify_s: u64,
    /// Timeout of every command, seconds.
    pub command_timeout_s: u64,
    /// How many times `qdel` is tried before cancel() reports failure.
    pub cancel_attempts: u32,
    /// Extra environment for every command (`SGE_ROOT`, `SGE_CELL`).
    pub env: BTreeMap<String, String>,
}

impl Default for GridEngineConfig {
    fn default() -> Self {
        GridEngineConfig {
            qsub: "qsub".into(),
            qstat: "qstat".into(),
            qdel: "qdel".into(),
            qconf: "qconf".into(),
            qrsh: "qrsh".into(),
            parallel_environment: "wsp".into(),
            pe_slots: PeSlots::Nodes,
            queue: None,
            project: None,
            memory_resource: None,
            extra_directives: Vec::new(),
            notify_s: 5,
            command_timeout_s: 30,
            cancel_attempts: 3,
            env: BTreeMap::new(),
        }
    }
}

pub struct GridEngine {
    config: GridEngineConfig,
    runner: Runner,
}

const LRM: &str = "gridengine";

mod reserve;

impl GridEngine {
    /// One `qstat -u '*' -xml` (every user's jobs), read by `parse`.
    async fn qstat_xml<T>(&self, parse: fn(&str) -> Result<T, String>) -> Result<T, LrmError> {
        let args = ["-u".to_string(), "*".to_string(), "-xml".to_string()];
        let out = crate::command::check(self.runner.run(&self.config.qstat, &args).await?)?;
        parse(&out.stdout).map_err(|reason| LrmError::UnparsableStatus {
            command: out.command.clone(),
            reason,
            output: out.stdout.clone(),
        })
    }

    pub fn new(config: GridEngineConfig) -> Result<Self, LrmError> {
        batch_common::check_directive_word(
            LRM,
            "parallel_environment",
            &config.parallel_environment,
        )?;
        for (what, v) in [
            ("queue", &config.queue),
            ("project", &config.project),
            ("memory_resource", &config.memory_resource),
        ] {
            if let Some(v) = v {
                batch_common::check_directive_word(LRM, what, v)?;
            }
        }
        if let Some(d) = config
            .extra_directives
            .iter()
            .find(|d| d.trim().is_empty() || d.contains('\n'))
        {
            return Err(LrmError::Config {
                lrm: LRM,
                message: format!("extra_directives entry {d:?} is empty or has a newline"),
            });
        }
        let runner = Runner::new(config.command_timeout_s, &config.env);
        Ok(GridEngine { config, runner })
    }

    /// `qsub -terse -notify [extra] <script>`.
    async fn submit_with(&self, job: &SlotJob, extra: &[String]) -> Result<JobId, LrmError> {
        batch_common::check_directive_word(LRM, "job name", &job.name)?;
        batch_common::check_directive_word(LRM, "workdir", &job.workdir.display().to_string())?;
        let script = batch_common::write_script(
            job,
            &format!("{}.sge", job.name),
            &self.render_script(job),
        )?;
        // -terse and -notify on the command line too: a site's sge_request cannot drop them.
        let mut args = vec!["-terse".to_string(), "-notify".to_string()];
        args.extend(extra.iter().cloned());
        args.push(script.display().to_string());
        let out = crate::command::check(self.runner.run(&self.config.qsub, &args).await?)?;
        let id = parse_qsub_id(&out.command, &out.stdout)?;
        tracing::info!(lrm = LRM, job = %id, name = %job.name, nodes = job.nodes, "submitted");
        Ok(id)
    }

    /// Why `-p` does not order the queue here: the scheduler's
    /// `weight_priority` (`qconf -ssconf`, any user may read it) is 0, as in
    /// Debian's packaged configuration (Grid Engine's install templates set
    /// 1.0). `None` when it counts, or when it cannot be read.
    async fn priority_ignored(&self) -> Option<String> {
        let out = match self
            .runner
            .run(&self.config.qconf, &["-ssconf".into()])
            .await
        {
            Ok(out) if out.success() => out,
            other => {
                tracing::warn!(lrm = LRM, outcome = ?other, "could not read the scheduler configuration");
                return None;
            }
        };
        match parse_weight_priority(&out.stdout) {
            Some(w) if w <= 0.0 => Some(format!(
                "Grid Engine's scheduler gives the job priority no weight here (weight_priority {w} in `qconf -ssconf`): -p does not reorder the queue until an admin raises it (`qconf -msconf`)"
            )),
            _ => None,
        }
    }

    /// The queue's `notify` time (`qconf -sq <queue>`, `all.q` if none is set).
    pub async fn site_notify(&self) -> Result<Duration, LrmError> {
        let q = self.config.queue.clone().unwrap_or_else(|| "all.q".into());
        let out = crate::command::check(
            self.runner
                .run(&self.config.qconf, &["-sq".into(), q])
                .await?,
        )?;
        parse_notify(&out.stdout).ok_or_else(|| LrmError::UnparsableStatus {
            command: out.command.clone(),
            reason: "no notify line".into(),
            output: out.stdout.clone(),
        })
    }

    /// Like [`crate::slurm::Slurm::check_grace`], against the queue's `notify`.
    pub async fn check_grace(&self) -> Result<Duration, LrmError> {
        let site = self.site_notify().await?;
        if self.config.notify_s > site.as_secs() {
            return Err(LrmError::Config {
                lrm: LRM,
                message: format!(
                    "notify_s = {} but the queue's notify is {} s: the pilot would be killed before its grace ends",
                    self.config.notify_s,
                    site.as_secs()
                ),
            });
        }
        if self.config.notify_s < site.as_secs() {
            tracing::warn!(
                lrm = LRM,
                notify_s = self.config.notify_s,
                site_notify_s = site.as_secs(),
                "grace shorter than the queue's notify"
            );
        }
        Ok(site)
    }
}

/// Reads the job id of `qsub -terse` (`12`, or `12.1-4:1` for arrays), or of
/// plain qsub (`Your job 12 ("name") has been submitted`), from the last line
/// that has one.
pub(crate) fn parse_qsub_id(command: &str, stdout: &str) -> Result<JobId, LrmError> {
    stdout
        .lines()
        .rev()
        .find_map(|l| {
            let l = l.trim();
            let word = l
                .strip_prefix("Your job ")
                .or_else(|| l.strip_prefix("Your job-array "))
                .unwrap_or(l);
            let word = word.split_whitespace().next()?;
            let id = word.split('.').next()?;
            let whole_line = word.len() == l.len() || l.starts_with("Your job");
            (whole_line && !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
                .then(|| JobId(id.to_string()))
        })
        .ok_or_else(|| LrmError::UnparsableJobId {
            command: command.to_string(),
            output: stdout.to_string(),
        })
}

/// Maps a Grid Engine state (letters combined: `qw`, `hqw`, `r`, `Rr`, `t`,
/// `s`, `S`, `T`, `dr`, `Eqw`, ...) to [`JobState`].
pub(crate) fn map_state(state: &str) -> JobState {
    let has = |c: char| state.contains(c);
    if state.is_empty() {
        JobState::Unknown(String::new())
    } else if has('E') {
        JobState::Error(format!(
            "{state}: error state, the job will not run until `qmod -cj` clears it"
        ))
    } else if has('d') {
        JobState::Completing
    } else if has('s') || has('S') || has('T') {
        JobState::Suspended
    } else if has('r') || has('t') {
        // t: being transferred to/started on its hosts; its processes may
        // already run (seen: pilots up while qstat still says t), as DRMAA maps it.
        JobState::Running
    } else if has('h') {
        JobState::Held
    } else if has('q') || has('w') {
        JobState::Queued
    } else {
        JobState::Unknown(state.to_string())
    }
}

/// The `<job_list>` elements of `qstat -xml` (running ones under
/// `<queue_info>`, pending ones under the inner `<job_info>`), each as a
/// map of its child elements' names to their (entity-decoded) text.
fn job_lists(xml: &str) -> Result<Vec<HashMap<String, String>>, String> {
    let doc = roxmltree::Document::parse(xml.trim()).map_err(|e| format!("not XML: {e}"))?;
    if doc.root_element().tag_name().name() != "job_info" {
        return Err(format!(
            "root element <{}>, not <job_info>",
            doc.root_element().tag_name().name()
        ));
    }
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("job_list"))
        .map(|job| {
            job.children()
                .filter(|c| c.is_element())
                .map(|c| {
                    let text = c.text().unwrap_or("").trim().to_string();
                    (c.tag_name().name().to_string(), text)
                })
                .collect()
        })
        .collect())
}

/// Reads `qstat -xml`: job number -> state of every `<job_list>` element.
#[cfg(test)]
pub(crate) fn parse_qstat_xml(xml: &str) -> Result<HashMap<String, JobState>, String> {
    Ok(parse_qstat_xml_states(xml)?
        .into_iter()
        .map(|(id, raw)| (id, map_state(&raw)))
        .collect())
}

/// Reads `qstat -xml`: job number -> raw state code (`qw`, `r`, `hqw`).
pub(crate) fn parse_qstat_xml_states(xml: &str) -> Result<HashMap<String, String>, String> {
    let mut jobs = HashMap::new();
    for job in job_lists(xml)? {
        let id = job
            .get("JB_job_number")
            .ok_or("a <job_list> without <JB_job_number>")?;
        let state = job.get("state").cloned().unwrap_or_default();
        jobs.insert(id.clone(), state);
    }
    Ok(jobs)
}

/// Why a job in state `raw` waits, in words, or `None` when it does not wait.
pub(crate) fn waiting_reason(raw: &str, state: &JobState) -> Option<String> {
    let words = match state {
        JobState::Held => "on hold",
        JobState::Queued => "waiting for free slots",
        _ => return None,
    };
    Some(format!("{raw}: {words}"))
}

/// Reads `qstat -xml`: (job number, job name) of every `<job_list>` element.
pub(crate) fn parse_qstat_xml_names(xml: &str) -> Result<Vec<(JobId, String)>, String> {
    Ok(job_lists(xml)?
        .into_iter()
        .filter_map(|mut j| Some((JobId(j.remove("JB_job_number")?), j.remove("JB_name")?)))
        .collect())
}

/// `weight_priority                   0.000000` of `qconf -ssconf`.
pub(crate) fn parse_weight_priority(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("weight_priority"))
            .then(|| w.next()?.parse().ok())
            .flatten()
    })
}

/// `notify                00:00:05` of `qconf -sq`.
pub(crate) fn parse_notify(text: &str) -> Option<Duration> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("notify"))?;
    batch_common::hms_seconds(line.split_whitespace().nth(1)?).map(Duration::from_secs)
}

fn plausible_id(id: &JobId) -> bool {
    !id.0.is_empty() && id.0.bytes().all(|b| b.is_ascii_digit())
}

#[async_trait]
impl Lrm for GridEngine {
    async fn list_jobs(&self) -> Result<Option<Vec<(JobId, String)>>, LrmError> {
        self.qstat_xml(parse_qstat_xml_names).await.map(Some)
    }

    async fn check_grace(&self) -> Result<Option<Duration>, LrmError> {
        GridEngine::check_grace(self).await.map(Some)
    }

    fn kind(&self) -> &'static str {
        LRM
    }

    fn warning(&self) -> Warning {
        Warning {
            signal: "SIGUSR2",
            grace: Duration::from_secs(self.config.notify_s),
        }
    }

    fn render_script(&self, job: &SlotJob) -> String {
        let c = &self.config;
        let wd = job.workdir.display();
        let slots = match c.pe_slots {
            PeSlots::Nodes => job.nodes,
            PeSlots::Cores => job.nodes * job.cores_per_node,
        };
        let mut s = batch_common::script_header(LRM, job);
        let mut d = |line: String| s.push_str(&format!("#$ {line}\n"));
        d(format!("-N {}", job.name));
        d(format!("-pe {} {slots}", c.parallel_environment));
        d(format!("-l h_rt={}", batch_common::hhmmss(job.walltime)));
        if let Some(r) = &c.memory_resource {
            let per_slot = job.memory_mb_per_node * u64::from(job.nodes) / u64::from(slots.max(1));
            d(format!("-l {r}={per_slot}M"));
        }
        d("-notify".into());
        d("-S /bin/sh".into());
        d(format!("-wd {wd}"));
        d(format!("-o {wd}/{}.out", job.name));
        d("-j y".into());
        if let Some(q) = &c.queue {
            d(format!("-q {q}"));
        }
        if let Some(p) = &c.project {
            d(format!("-P {p}"));
        }
        for e in &c.extra_directives {
            d(e.trim().to_string());
        }
        // qrsh -inherit joins its arguments into one command line for the
        // remote shell: the pilot's argv goes quoted, as one string.
        s.push_str(&format!(
            "PILOT={}\n",
            shell_quote(&shell_join(&job.pilot_argv))
        ));
        s.push_str(&format!(
            "QRSH={}\n",
            shell_quote(&c.qrsh.display().to_string())
        ));
        s.push_str(
            "# One pilot per host of the parallel environment, each a task of this job: Grid Engine\n\
             # sends its SIGUSR2 (-notify) and SIGKILL to every task itself. This shell only has to\n\
             # survive the warning (the default action would end the job at once) and wait.\n\
             trap 'echo \"wsp: SIGUSR2 (grace until SIGKILL)\" >&2' USR2\n\
             trap 'echo \"wsp: SIGTERM\" >&2' TERM\n\
             pids=\n\
             while read -r host slots rest; do\n\
             \x20   \"$QRSH\" -inherit -nostdin \"$host\" \"WSP_NODE=$host exec $PILOT\" &\n\
             \x20   pids=\"$pids $!\"\n\
             done < \"$PE_HOSTFILE\"\n\
             status=0\n\
             for p in $pids; do\n\
             \x20   # wait returns early when a trapped signal arrives: wait again until $p is gone.\n\
             \x20   while kill -0 \"$p\" 2>/dev/null; do wait \"$p\" || status=$?; done\n\
             done\n\
             exit $status\n",
        );
        s
    }

    fn reservations(&self) -> Option<&dyn crate::reserve::Reservations> {
        Some(self)
    }

    async fn submit(&self, job: &SlotJob) -> Result<JobId, LrmError> {
        self.submit_with(job, &[]).await
    }

    /// `qsub -p`: `own`, our best-effort jobs at -1023 and urgent ones at 0
    /// (a plain user may only lower); `operator`, urgent ones at 1024
    /// (operators and managers only; refused: submitted without). Either
    /// counts only where the scheduler's `weight_priority` is above 0: a
    /// submission where it is 0 says so in [`Submitted::refused`].
    async fn submit_at(
        &self,
        job: &SlotJob,
        standing: Standing,
        mode: BatchPriority,
    ) -> Result<Submitted, LrmError> {
        let p = priority::qsub_p(standing, mode, 1024);
        let mut s =
            priority::submit_with_p(
                "qsub",
                p,
                |x| async move { self.submit_with(job, &x).await },
            )
            .await?;
        if p.is_some() && s.refused.is_none() {
            s.refused = self.priority_ignored().await;
        }
        Ok(s)
    }

    fn check_batch_priority(&self, _mode: BatchPriority) -> Result<(), String> {
        Ok(())
    }

    async fn status(&self, ids: &[JobId]) -> Result<HashMap<JobId, JobStatus>, LrmError> {
        Ok(crate::without_reasons(self.status_with_reasons(ids).await?))
    }

    /// A waiting job's reason is its qstat state, in words (`qw: waiting
    /// for free slots`): the scheduler's own messages (`qstat -j`) are off
    /// by default (`schedd_job_info false`) and cost a query per job.
    async fn status_with_reasons(
        &self,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, JobReport>, LrmError> {
        let mut answer: HashMap<JobId, JobReport> = HashMap::new();
        if ids.iter().all(|i| !plausible_id(i)) {
            answer.extend(
                ids.iter()
                    .map(|i| (i.clone(), JobReport::bare(JobStatus::NotFound))),
            );
            return Ok(answer);
        }
        let jobs = self.qstat_xml(parse_qstat_xml_states).await?;
        // Finished jobs leave qstat at once (no qacct here): NotFound.
        for id in ids {
            let report = jobs
                .get(&id.0)
                .map_or(JobReport::bare(JobStatus::NotFound), |raw| {
                    let state = map_state(raw);
                    JobReport {
                        reason: waiting_reason(raw, &state),
                        status: JobStatus::Known(state),
                    }
                });
            answer.insert(id.clone(), report);
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
            let mut out = self.runner.run(&self.config.qdel, &args).await?;
            if !out.success() && format!("{}{}", out.stdout, out.stderr).contains("does not exist")
            {
                out.status = Some(0);
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
    fn weight_priority_is_read_from_the_scheduler_configuration() {
        let text = "schedule_interval                 0:0:1\nweight_urgency                    0.500000\nweight_priority                   0.000000\nmax_reservation                   0\n";
        assert_eq!(parse_weight_priority(text), Some(0.0));
        assert_eq!(parse_weight_priority("weight_priority 1.0\n"), Some(1.0));
        assert_eq!(parse_weight_priority("weight_urgency 0.1\n"), None);
    }

    const QSTAT_XML: &str = include_str!("../tests/fixtures/gridengine/qstat-xml-mixed.xml");

    #[test]
    fn qstat_xml_names_list_every_job_with_its_name() {
        let jobs = parse_qstat_xml_names(QSTAT_XML).unwrap();
        assert!(!jobs.is_empty());
        assert!(
            jobs.iter()
                .all(|(id, name)| !id.0.is_empty() && !name.is_empty()),
            "{jobs:?}"
        );
        assert!(parse_qstat_xml_names("garbage").is_err());
    }

    #[test]
    fn qstat_xml_entities_are_decoded() {
        let xml = "<?xml version='1.0'?>\n<job_info>\n <queue_info>\n  <job_list state=\"running\">\n   \
                   <JB_job_number>12</JB_job_number>\n   <JB_name>a&amp;b&lt;c&gt;</JB_name>\n   \
                   <state>r</state>\n  </job_list>\n </queue_info>\n <job_info>\n </job_info>\n</job_info>\n";
        assert_eq!(
            parse_qstat_xml_names(xml).unwrap(),
            [(JobId("12".into()), "a&b<c>".to_string())]
        );
        assert_eq!(parse_qstat_xml(xml).unwrap()["12"], JobState::Running);
        assert_eq!(
            waiting_reason("qw", &map_state("qw")).as_deref(),
            Some("qw: waiting for free slots")
        );
        assert_eq!(
            waiting_reason("hqw", &map_state("hqw")).as_deref(),
            Some("hqw: on hold")
        );
        assert_eq!(waiting_reason("r", &map_state("r")), None);
        assert!(parse_qstat_xml("<?xml version='1.0'?><job_info><job_list>").is_err());
    }

    #[test]
    fn qsub_terse_and_plain_ids_are_read() {
        let id = |s| parse_qsub_id("qsub", s).unwrap().0;
        assert_eq!(id("12\n"), "12");
        assert_eq!(id("12.1-4:1\n"), "12");
        assert_eq!(
            id("Your job 345 (\"wsp-sl-1\") has been submitted\n"),
            "345"
        );
        assert_eq!(id("site banner: be nice\n77\n"), "77");
        assert!(parse_qsub_id("qsub", "Unable to run job: Job was rejected because job requests unknown queue \"x\".\nExiting.\n").is_err());
    }

    #[test]
    fn every_grid_engine_state_maps() {
        use JobState::*;
        for (s, want) in [
            ("qw", Queued),
            ("hqw", Held),
            ("hRwq", Held),
            ("r", Running),
            ("Rr", Running),
            ("t", Running),
            ("Rt", Running),
            ("s", Suspended),
            ("ts", Suspended),
            ("S", Suspended),
            ("T", Suspended),
            ("dr", Completing),
            ("dt", Completing),
            ("dRr", Completing),
        ] {
            assert_eq!(map_state(s), want, "{s}");
        }
        assert!(matches!(map_state("Eqw"), Error(_)));
        assert!(matches!(map_state("Ehqw"), Error(_)));
        assert_eq!(map_state("z"), Unknown("z".into()));
    }

    #[test]
    fn recorded_qstat_xml_is_read() {
        let jobs = parse_qstat_xml(QSTAT_XML).unwrap();
        assert_eq!(jobs["5"], JobState::Running);
        assert_eq!(jobs["6"], JobState::Queued);
        assert_eq!(jobs["7"], JobState::Held);
        assert!(matches!(jobs["8"], JobState::Error(_)));
        assert_eq!(jobs["9"], JobState::Completing);
        assert_eq!(jobs.len(), 5);
        assert!(
            parse_qstat_xml("error: commlib error: got select error (Connection refused)").is_err()
        );
        assert!(
            parse_qstat_xml("<?xml version='1.0'?>\n<job_info>\n</job_info>\n")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn queue_notify_is_read() {
        assert_eq!(
            parse_notify("qname all.q\nnotify                00:00:05\nowner_list NONE\n"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(parse_notify("qname all.q\n"), None);
    }
}
