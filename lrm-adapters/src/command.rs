//! Running an external command with a timeout, keeping its raw output.
//!
//! Every LRM command goes through [`run`]: it never waits forever, kills the
//! command (its whole process group) when the time is up, and returns the
//! exact command line, exit status, stdout and stderr for error messages.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What a finished command printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// A command that could not run, timed out, or exited non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not start {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} did not finish within {timeout:?} and was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("{} exited {}: {:?} (stdout: {:?})", .0.command, .0.status.map_or("by signal".to_string(), |s| s.to_string()), .0.stderr.trim(), .0.stdout.trim())]
    Failed(CommandOutput),
}

/// Runs `program args` with `timeout`; `stdin` is written to its standard input.
/// Returns the output whatever the exit status (callers decide what a non-zero
/// exit means); use [`CommandOutput::success`] or [`check`].
pub async fn run(
    program: &PathBuf,
    args: &[String],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<CommandOutput, CommandError> {
    run_with_env(program, args, stdin, timeout, &[]).await
}

/// [`run`] with extra environment variables (`SLURM_CONF`, `SGE_ROOT`, ...)
/// set for the command on top of ours.
pub async fn run_with_env(
    program: &PathBuf,
    args: &[String],
    stdin: Option<&str>,
    timeout: Duration,
    env: &[(String, String)],
) -> Result<CommandOutput, CommandError> {
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        command: command.clone(),
        source,
    })?;
    let pid = child.id();
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that does not read its input is not an error here.
        let _ = pipe.write_all(input.as_bytes()).await;
        drop(pipe);
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(CommandOutput {
            command,
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(CommandError::Spawn { command, source }),
        Err(_) => {
            if let Some(pid) = pid {
                // The child leads its own process group: kill all of it.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(CommandError::Timeout { command, timeout })
        }
    }
}

/// Turns a non-zero exit into [`CommandError::Failed`].
pub fn check(out: CommandOutput) -> Result<CommandOutput, CommandError> {
    if out.success() {
        Ok(out)
    } else {
        Err(CommandError::Failed(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_and_status_are_kept() {
        let out = run(
            &"sh".into(),
            &["-c".into(), "echo out; echo err >&2; exit 3".into()],
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(out.status, Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let e = check(out).unwrap_err().to_string();
        assert!(e.contains("exited 3") && e.contains("err"), "{e}");
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_timeout() {
        let t = std::time::Instant::now();
        let e = run(
            &"sleep".into(),
            &["30".into()],
            None,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, CommandError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn stdin_is_passed() {
        let out = run(&"cat".into(), &[], Some("hello"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(out.stdout, "hello");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error_naming_it() {
        let e = run(
            &"/nonexistent/qsub".into(),
            &[],
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/qsub"));
    }
}
