//! What the real batch-system adapters share: running their configured
//! commands (path, timeout, extra environment), writing job scripts, retrying
//! a cancel, and reading the PBS family's (`torque`, `pbspro`) `qsub`/`qstat`
//! output. Not for `local`, which runs no external commands.

use crate::command::{self, CommandOutput};
use crate::{JobId, LrmError, SlotJob};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs an adapter's commands with its timeout and environment.
#[derive(Clone, Debug)]
pub(crate) struct Runner {
    pub timeout: Duration,
    pub env: Vec<(String, String)>,
}

impl Runner {
    pub fn new(timeout_s: u64, env: &BTreeMap<String, String>) -> Self {
        Runner {
            timeout: Duration::from_secs(timeout_s.max(1)),
            env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// Runs `program args`; a non-zero exit is returned, not an error.
    pub async fn run(&self, program: &Path, args: &[String]) -> Result<CommandOutput, LrmError> {
        Ok(
            command::run_with_env(&program.to_path_buf(), args, None, self.timeout, &self.env)
                .await?,
        )
    }
}

/// Cancels with retry: `attempt` runs the cancel command once and says
/// whether the job is gone (`Ok(true)`: cancelled or already ended) or the
/// command failed in a way worth retrying (`Ok(false)`, or a command error).
/// After `attempts` failures the last error is returned: the caller (the
/// coordinator) keeps the job and retries later; a failed cancel is never
/// forgotten here.
pub(crate) async fn cancel_with_retry<F, Fut>(
    lrm: &'static str,
    id: &JobId,
    attempts: u32,
    mut attempt: F,
) -> Result<(), LrmError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<CommandOutput, LrmError>>,
    F: Send,
{
    let attempts = attempts.max(1);
    let mut last = None;
    for n in 1..=attempts {
        match attempt().await {
            Ok(out) if out.success() => return Ok(()),
            Ok(out) => {
                tracing::warn!(lrm, job = %id, attempt = n, stderr = %out.stderr.trim(), "cancel failed");
                last = Some(LrmError::Command(command::CommandError::Failed(out)));
            }
            Err(e) => {
                tracing::warn!(lrm, job = %id, attempt = n, error = %e, "cancel failed");
                last = Some(e);
            }
        }
        if n < attempts {
            tokio::time::sleep(Duration::from_millis(500 * u64::from(n))).await;
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Writes `text` to `<workdir>/<file>` (mode 0755) and returns its path.
pub(crate) fn write_script(job: &SlotJob, file: &str, text: &str) -> Result<PathBuf, LrmError> {
    use std::os::unix::fs::PermissionsExt;
    let path = job.workdir.join(file);
    let io = |source| LrmError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&job.workdir).map_err(io)?;
    std::fs::write(&path, text).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    Ok(path)
}

/// Directive lines (`#SBATCH`, `#PBS`, `#$`) are parsed by the LRM, not by a
/// shell: refuse words that they would split or misread.
pub(crate) fn check_directive_word(
    lrm: &'static str,
    what: &str,
    word: &str,
) -> Result<(), LrmError> {
    if word.is_empty()
        || word
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\#".contains(c))
    {
        return Err(LrmError::Config {
            lrm,
            message: format!("{what} {word:?} cannot go into a job script directive (empty, or has spaces, quotes, '#' or '\\')"),
        });
    }
    Ok(())
}

/// `HH:MM:SS` (hours may exceed 24), rounded up to the second.
pub(crate) fn hhmmss(d: Duration) -> String {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The first line of a script: which adapter wrote it, for whom.
pub(crate) fn script_header(lrm: &str, job: &SlotJob) -> String {
    format!(
        "#!/bin/sh\n# Pilot job {} written by the workspace pilot {lrm} adapter: {} node(s) x {} core(s) x {} MB, walltime {}.\n",
        job.name,
        job.nodes,
        job.cores_per_node,
        job.memory_mb_per_node,
        hhmmss(job.walltime)
    )
}

// ---------------------------------------------------------------------------
// PBS family (Torque, PBS Pro)

/// Reads the job id `qsub` printed: the last line that looks like `123`,
/// `123.server` or `123[].server` (site wrappers may print banners before or
/// after it). The raw output is kept in the error.
pub(crate) fn parse_pbs_job_id(command: &str, stdout: &str) -> Result<JobId, LrmError> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            let seq = l.split('.').next().unwrap_or("");
            let seq = seq.strip_suffix("[]").unwrap_or(seq);
            !seq.is_empty()
                && seq.bytes().all(|b| b.is_ascii_digit())
                && !l.contains(char::is_whitespace)
                && !l.ends_with('.')
        })
        .map(|l| JobId(l.to_string()))
        .ok_or_else(|| LrmError::UnparsableJobId {
            command: command.to_string(),
            output: stdout.to_string(),
        })
}

/// The sequence number of a PBS job id (`123` of `123.server.example.org`),
/// the part every form of the id (short or long server name, truncated by
/// `qstat`) has in common.
pub(crate) fn pbs_seq(id: &str) -> &str {
    id.trim()
        .split('.')
        .next()
        .unwrap_or("")
        .trim_end_matches('*')
}

/// One job of `qstat -f`: its id as qstat printed it and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PbsJob {
    pub id: String,
    pub attrs: HashMap<String, String>,
}

impl PbsJob {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

/// Parses `qstat -f` (Torque and PBS Pro share the format):
///
/// ```text
/// Job Id: 123.server
///     Job_Name = wsp-sl-1
///     job_state = R
///     comment = a long value that qstat wraps onto
/// <TAB>the next line (continuation lines start with a tab)
/// ```
///
/// Lines that are neither (`qstat` messages mixed into stdout) are ignored.
pub(crate) fn parse_qstat_f(text: &str) -> Vec<PbsJob> {
    let mut jobs: Vec<PbsJob> = Vec::new();
    let mut last_key: Option<String> = None;
    for line in text.lines() {
        if let Some(id) = line.strip_prefix("Job Id:") {
            jobs.push(PbsJob {
                id: id.trim().to_string(),
                attrs: HashMap::new(),
            });
            last_key = None;
            continue;
        }
        let Some(job) = jobs.last_mut() else { continue };
        if line.starts_with('\t') {
            if let Some(v) = last_key.as_ref().and_then(|k| job.attrs.get_mut(k)) {
                v.push_str(line.trim_start_matches('\t').trim_end());
            }
        } else if line.starts_with(' ') {
            if let Some((k, v)) = line.trim().split_once(" = ") {
                job.attrs.insert(k.trim().to_string(), v.trim().to_string());
                last_key = Some(k.trim().to_string());
            } else if let Some(k) = line.trim().strip_suffix(" =") {
                job.attrs.insert(k.trim().to_string(), String::new());
                last_key = Some(k.trim().to_string());
            }
        } else {
            last_key = None;
        }
    }
    jobs
}

/// What `qstat`'s standard error says about the ids it did not list.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct QstatComplaints {
    /// Sequence numbers of jobs the server does not know (`Unknown Job Id`)
    /// or no longer shows (PBS Pro: `Job has finished, use -x ...`).
    pub gone: Vec<String>,
    /// Every other line: a problem with the query itself (server down, ...).
    pub other: Vec<String>,
}

/// Reads `qstat` / `qdel` complaints, one per line:
/// `qstat: Unknown Job Id 123.server` (PBS Pro, Torque < 4),
/// `qstat: Unknown Job Id Error 123.server` (Torque 4+),
/// `qstat: 123.server Job has finished, use -x or -H to obtain historical job information` (PBS Pro),
/// `qdel: Job has finished 123.server` (PBS Pro).
pub(crate) fn parse_qstat_stderr(stderr: &str) -> QstatComplaints {
    let mut c = QstatComplaints::default();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        let gone = lower.contains("unknown job id")
            || lower.contains("job has finished")
            || lower.contains("illegally formed job identifier");
        let id = line
            .split(|ch: char| ch.is_whitespace())
            .map(|w| w.trim_matches(|ch: char| ch == ',' || ch == ':'))
            .find(|w| {
                !pbs_seq(w).is_empty()
                    && pbs_seq(w)
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b == b'[' || b == b']')
            });
        match (gone, id) {
            (true, Some(id)) => c.gone.push(pbs_seq(id).to_string()),
            _ => c.other.push(line.to_string()),
        }
    }
    c
}

/// Answers a batched `qstat -f id...` for every id asked: listed jobs through
/// `state_of`, ids qstat says it does not know (or that have finished and
/// are no longer shown) as `NotFound`. An id that is neither is `NotFound`
/// when qstat complained of nothing else, and makes the whole query an error
/// otherwise (a server that did not answer says nothing about the job).
pub(crate) fn answer_qstat(
    ids: &[JobId],
    out: &CommandOutput,
    state_of: impl Fn(&PbsJob) -> crate::JobState,
) -> Result<HashMap<JobId, crate::JobStatus>, LrmError> {
    let listed: HashMap<String, PbsJob> = parse_qstat_f(&out.stdout)
        .into_iter()
        .map(|j| (pbs_seq(&j.id).to_string(), j))
        .collect();
    let complaints = parse_qstat_stderr(&out.stderr);
    let mut answer = HashMap::new();
    for id in ids {
        let seq = pbs_seq(&id.0);
        let status = if let Some(job) = listed.get(seq) {
            crate::JobStatus::Known(state_of(job))
        } else if complaints.gone.iter().any(|g| g == seq) || complaints.other.is_empty() {
            crate::JobStatus::NotFound
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
        answer.insert(id.clone(), status);
    }
    Ok(answer)
}

/// `qdel` said the job is gone already (unknown, finished, completed).
pub(crate) fn qdel_says_gone(out: &CommandOutput) -> bool {
    let text = format!("{}\n{}", out.stdout, out.stderr).to_ascii_lowercase();
    [
        "unknown job id",
        "job has finished",
        "invalid state for job - complete",
        "job already in exit state",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// The commands of a PBS-family adapter and how it runs them.
pub(crate) struct PbsCommands {
    pub lrm: &'static str,
    pub qsub: PathBuf,
    pub qstat: PathBuf,
    pub qdel: PathBuf,
    /// Options of the batched status query before the ids (`-f`, `-x -f`).
    pub qstat_args: &'static [&'static str],
    pub cancel_attempts: u32,
    pub runner: Runner,
}

impl PbsCommands {
    /// Writes the script to `<workdir>/<name>.pbs`, `qsub`s it, reads the id.
    pub async fn submit(&self, job: &SlotJob, script: &str) -> Result<JobId, LrmError> {
        check_directive_word(self.lrm, "job name", &job.name)?;
        check_directive_word(self.lrm, "workdir", &job.workdir.display().to_string())?;
        let path = write_script(job, &format!("{}.pbs", job.name), script)?;
        let out = self
            .runner
            .run(&self.qsub, &[path.display().to_string()])
            .await?;
        let out = command::check(out)?;
        let id = parse_pbs_job_id(&out.command, &out.stdout)?;
        tracing::info!(lrm = self.lrm, job = %id, name = %job.name, nodes = job.nodes, "submitted");
        Ok(id)
    }

    /// One `qstat <qstat_args> id...` for all ids.
    pub async fn status(
        &self,
        ids: &[JobId],
        state_of: impl Fn(&PbsJob) -> crate::JobState,
    ) -> Result<HashMap<JobId, crate::JobStatus>, LrmError> {
        let (ask, bogus): (Vec<JobId>, Vec<JobId>) =
            ids.iter().cloned().partition(plausible_pbs_id);
        let mut answer: HashMap<JobId, crate::JobStatus> = bogus
            .into_iter()
            .map(|id| (id, crate::JobStatus::NotFound))
            .collect();
        if ask.is_empty() {
            return Ok(answer);
        }
        let mut args: Vec<String> = self.qstat_args.iter().map(|a| a.to_string()).collect();
        args.extend(ask.iter().map(|i| i.0.clone()));
        let out = self.runner.run(&self.qstat, &args).await?;
        answer.extend(answer_qstat(&ask, &out, state_of)?);
        Ok(answer)
    }

    /// One `qstat -f` of every job: (id, Job_Name) of those not finished.
    pub async fn list_jobs(&self) -> Result<Vec<(JobId, String)>, LrmError> {
        let out = self.runner.run(&self.qstat, &["-f".to_string()]).await?;
        let out = command::check(out)?;
        Ok(parse_qstat_f(&out.stdout)
            .into_iter()
            .filter(|j| !matches!(j.get("job_state"), Some("C" | "F")))
            .filter_map(|j| {
                j.get("Job_Name")
                    .map(|n| (JobId(j.id.clone()), n.to_string()))
            })
            .collect())
    }

    /// `qdel id` with retry; a job the server no longer has counts as done.
    pub async fn cancel(&self, id: &JobId) -> Result<(), LrmError> {
        if !plausible_pbs_id(id) {
            return Err(LrmError::UnknownJob {
                lrm: self.lrm,
                job: id.clone(),
            });
        }
        let args = vec![id.0.clone()];
        cancel_with_retry(self.lrm, id, self.cancel_attempts, || async {
            let mut out = self.runner.run(&self.qdel, &args).await?;
            if !out.success() && qdel_says_gone(&out) {
                out.status = Some(0);
            }
            Ok(out)
        })
        .await
    }
}

/// Seconds of a PBS duration (`HH:MM:SS`, `MM:SS` or seconds).
pub(crate) fn pbs_seconds(text: &str) -> Option<u64> {
    text.trim().split(':').try_fold(0u64, |acc, part| {
        Some(acc * 60 + part.trim().parse::<u64>().ok()?)
    })
}

/// A finished PBS job's end from its exit status (Torque `exit_status`, PBS
/// Pro `Exit_status`): 0 completed; the LRM's own walltime code (Torque -11,
/// PBS Pro -29); 256+signal when the job was killed by a signal (qdel, or
/// the walltime on older servers: then the used walltime reached the limit);
/// no status at all: deleted before it ran.
pub(crate) fn pbs_finished_state(job: &PbsJob, walltime_code: i64) -> crate::JobState {
    use crate::JobState;
    let exit = job
        .get("exit_status")
        .or_else(|| job.get("Exit_status"))
        .map(str::trim);
    let used = job.get("resources_used.walltime").and_then(pbs_seconds);
    let limit = job.get("Resource_List.walltime").and_then(pbs_seconds);
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

/// Only words that are plausible PBS job ids go on a `qstat`/`qdel` command
/// line (anything else would be an option or break the whole batch).
pub(crate) fn plausible_pbs_id(id: &JobId) -> bool {
    let seq = pbs_seq(&id.0);
    let seq = seq.strip_suffix("[]").unwrap_or(seq);
    !seq.is_empty()
        && seq.bytes().all(|b| b.is_ascii_digit())
        && id
            .0
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b))
}

/// A PBS-family job script (Torque, PBS Pro): the header, `#PBS` directives
/// (name, the flavour's `resources`, walltime, output, queue, account, the
/// site's extras), `cd` to the work directory, then the flavour's `launch`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pbs_script(
    lrm: &'static str,
    job: &SlotJob,
    resources: &[String],
    queue: Option<&str>,
    account: Option<&str>,
    extra: &[String],
    launch: &str,
) -> String {
    let wd = job.workdir.display();
    let mut s = script_header(lrm, job);
    let mut d = |line: String| s.push_str(&format!("#PBS {line}\n"));
    d(format!("-N {}", job.name));
    for r in resources {
        d(r.clone());
    }
    d(format!("-l walltime={}", hhmmss(job.walltime)));
    d("-j oe".into());
    d(format!("-o {wd}/{}.out", job.name));
    if let Some(q) = queue {
        d(format!("-q {q}"));
    }
    if let Some(a) = account {
        d(format!("-A {a}"));
    }
    for e in extra {
        d(e.trim().to_string());
    }
    s.push_str(&format!(
        "cd {} || exit 1\n",
        crate::shell_quote(&wd.to_string())
    ));
    s.push_str(launch);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hhmmss_rounds_up_and_lets_hours_pass_a_day() {
        assert_eq!(hhmmss(Duration::from_secs(0)), "00:00:00");
        assert_eq!(hhmmss(Duration::from_millis(60_001)), "00:01:01");
        assert_eq!(hhmmss(Duration::from_secs(30 * 3600 + 62)), "30:01:02");
    }

    #[test]
    fn directive_words_with_spaces_or_quotes_are_refused() {
        assert!(check_directive_word("slurm", "partition", "debug").is_ok());
        assert!(check_directive_word("slurm", "partition", "a b").is_err());
        assert!(check_directive_word("slurm", "partition", "a\"b").is_err());
        assert!(check_directive_word("slurm", "partition", "").is_err());
    }

    #[test]
    fn pbs_job_id_is_the_last_id_line_whatever_wrappers_print() {
        let id = |s| parse_pbs_job_id("qsub", s).unwrap().0;
        assert_eq!(id("123.server\n"), "123.server");
        assert_eq!(
            id("Welcome to the cluster. Jobs are charged.\n4567.pbs01.example.org\n"),
            "4567.pbs01.example.org"
        );
        assert_eq!(id("12[].server\n"), "12[].server");
        assert_eq!(id("  99\n"), "99");
        assert!(
            parse_pbs_job_id("qsub", "qsub: Job rejected by all possible destinations\n").is_err()
        );
        assert!(parse_pbs_job_id("qsub", "").is_err());
        let e = parse_pbs_job_id("qsub -q x", "nonsense")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nonsense") && e.contains("qsub -q x"), "{e}");
    }

    #[test]
    fn pbs_seq_matches_short_long_and_truncated_ids() {
        assert_eq!(pbs_seq("123.server.example.org"), "123");
        assert_eq!(pbs_seq("123.serv*"), "123");
        assert_eq!(pbs_seq("123"), "123");
        assert_eq!(pbs_seq("5[].s"), "5[]");
    }

    #[test]
    fn qstat_stderr_complaints_are_sorted_into_gone_and_other() {
        let c = parse_qstat_stderr(
            "qstat: Unknown Job Id 12.pbs\nqstat: Unknown Job Id Error 13.torque.example.org\n\
             qstat: 14.pbs Job has finished, use -x or -H to obtain historical job information\n\
             Connection refused\nqstat: cannot connect to server pbs (errno=111)\n",
        );
        assert_eq!(c.gone, ["12", "13", "14"]);
        assert_eq!(c.other.len(), 2);
        let c = parse_qstat_stderr("qstat: illegally formed job identifier: 231512525\n");
        assert_eq!(c.gone, ["231512525"]);
    }
}
