//! What the real batch-system adapters share: running their configured
//! commands (path, timeout, extra environment), writing job scripts, retrying
//! a cancel. Not for `local`, which runs no external commands.

use crate::command::{self, CommandOutput};
use crate::{JobId, LrmError, SlotJob};
use std::collections::BTreeMap;
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

/// Seconds of a batch-system duration (`HH:MM:SS`, `MM:SS` or seconds).
pub(crate) fn hms_seconds(text: &str) -> Option<u64> {
    text.trim().split(':').try_fold(0u64, |acc, part| {
        Some(acc * 60 + part.trim().parse::<u64>().ok()?)
    })
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
}
