//! Where a pilot job asks to wait in the batch queue: urgent leases' pilot
//! jobs ahead of best-effort ones (`[urgency] batch_priority`, docs/POOL.md
//! "Urgent leases: the batch queue"). The types the coordinator hands to
//! [`crate::Lrm::submit_at`] and what it gets back; each adapter turns them
//! into its batch system's own means (Slurm `scontrol top` / `--priority`,
//! Grid Engine and PBS `-p`, the local queue's order).

use crate::{JobId, LrmError};
use serde::{Deserialize, Serialize};

/// What the coordinator may ask of the batch system for urgent pilot jobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchPriority {
    /// Every pilot job is submitted alike: urgent ones wait behind ours
    /// queued earlier (today's behaviour).
    #[default]
    Off,
    /// Urgent pilot jobs go ahead of our own queued best-effort ones, by
    /// means a plain submitting user has; other users' jobs keep their place
    /// relative to our urgent ones.
    Own,
    /// Urgent pilot jobs go ahead of every queued job, ours and other
    /// users'; needs the batch system's operator rights where it has them.
    Operator,
}

impl BatchPriority {
    /// The word in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchPriority::Off => "off",
            BatchPriority::Own => "own",
            BatchPriority::Operator => "operator",
        }
    }
}

/// Which kind of pilot job is submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// A best-effort pilot job (a lease of urgency 0, a resume, a pool
    /// slot); `size`: its node-time when the queue is ordered by size
    /// (`best_effort_order = "largest_first"`).
    BestEffort { size: Option<u64> },
    /// An urgent lease's pilot job (urgency 1 or 2).
    Urgent { urgency: u8 },
}

/// A submitted pilot job and what was asked of the batch system for its
/// place in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub id: JobId,
    /// What was asked, in the batch system's terms (`sbatch --priority=TOP`,
    /// `scontrol top 123`, `qsub -p 1024`); `None` when nothing was.
    pub asked: Option<String>,
    /// The ask was refused (no rights, a site wrapper that drops it): the
    /// job is queued all the same, without it. The batch system's words.
    pub refused: Option<String>,
}

impl Submitted {
    /// A plain submission: nothing asked.
    pub fn plain(id: JobId) -> Self {
        Submitted {
            id,
            asked: None,
            refused: None,
        }
    }
}

/// Submits with `extra` arguments (a priority); when the batch system
/// refuses that submission (a non-zero exit: no rights for the priority),
/// submits again without them and says why in `refused`. A timeout or an
/// unreadable id is not retried: the first job may exist.
pub(crate) async fn submit_or_plain<F, Fut>(
    asked: String,
    extra: Vec<String>,
    submit: F,
) -> Result<Submitted, LrmError>
where
    F: Fn(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<JobId, LrmError>>,
{
    match submit(extra).await {
        Ok(id) => Ok(Submitted {
            id,
            asked: Some(asked),
            refused: None,
        }),
        Err(LrmError::Command(crate::CommandError::Failed(out))) => {
            let why = format!(
                "{} exited {}: {}",
                out.command,
                out.status.map_or("on a signal".into(), |s| s.to_string()),
                first_words(&format!("{}{}", out.stderr, out.stdout))
            );
            tracing::warn!(asked = %asked, error = %why, "priority refused; submitting without it");
            let id = submit(Vec::new()).await?;
            Ok(Submitted {
                id,
                asked: Some(asked),
                refused: Some(why),
            })
        }
        Err(e) => Err(e),
    }
}

/// Where Grid Engine's and PBS's `qsub -p` (a job priority, higher first,
/// 0 by default) puts a pilot job: `own`, our best-effort jobs at
/// [`OWN_BEST_EFFORT`] (-1023; a plain user may lower its jobs, not raise them) and
/// urgent ones at 0; `operator`, urgent ones at `top` (1024 on Grid Engine,
/// 1023 on PBS: above every job a user may submit), best-effort ones as
/// they are. `None`: no `-p`.
pub(crate) fn qsub_p(standing: Standing, mode: BatchPriority, top: i32) -> Option<i32> {
    match (standing, mode) {
        (_, BatchPriority::Off) => None,
        (Standing::BestEffort { .. }, BatchPriority::Own) => Some(OWN_BEST_EFFORT),
        (Standing::Urgent { .. }, BatchPriority::Own) => Some(0),
        (Standing::BestEffort { .. }, BatchPriority::Operator) => None,
        (Standing::Urgent { .. }, BatchPriority::Operator) => Some(top),
    }
}

/// Our best-effort pilot jobs' `-p` with `batch_priority = "own"`: the
/// lowest both Grid Engine (-1023) and PBS (-1024) take, so that Grid
/// Engine's other terms (its urgency, weighted 0.1 against the priority's
/// 1.0 in its install templates) do not lift a large best-effort job above
/// an urgent one. Other users' jobs at the default 0 go ahead of these too.
pub const OWN_BEST_EFFORT: i32 = -1023;

/// `qsub -p N` through `submit` (which takes the extra arguments); a refused
/// `-p` (Grid Engine refuses a positive one from a plain user) is submitted
/// again without it ([`submit_or_plain`]).
pub(crate) async fn submit_with_p<F, Fut>(
    qsub: &str,
    p: Option<i32>,
    submit: F,
) -> Result<Submitted, LrmError>
where
    F: Fn(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<JobId, LrmError>>,
{
    match p {
        None => Ok(Submitted::plain(submit(Vec::new()).await?)),
        Some(p) => {
            let extra = vec!["-p".to_string(), p.to_string()];
            submit_or_plain(format!("{qsub} -p {p}"), extra, submit).await
        }
    }
}

/// A command's output trimmed to one readable line for a timeline.
pub(crate) fn first_words(text: &str) -> String {
    let t = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.chars().count() > 300 {
        format!("{}…", t.chars().take(300).collect::<String>())
    } else if t.is_empty() {
        "(no output)".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{CommandError, CommandOutput};
    use std::sync::Mutex;

    fn failed(stderr: &str) -> LrmError {
        LrmError::Command(CommandError::Failed(CommandOutput {
            command: "qsub -p 1024 x".into(),
            status: Some(1),
            stdout: String::new(),
            stderr: stderr.into(),
        }))
    }

    #[tokio::test]
    async fn a_refused_priority_submits_again_without_it_and_says_why() {
        let calls = Mutex::new(Vec::new());
        let s = submit_or_plain(
            "qsub -p 1024".into(),
            vec!["-p".into(), "1024".into()],
            |x| {
                calls.lock().unwrap().push(x.clone());
                async move {
                    if x.is_empty() {
                        Ok(JobId("7".into()))
                    } else {
                        Err(failed(
                            "qsub: error: not allowed to set priority higher than 0\n",
                        ))
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(s.id, JobId("7".into()));
        assert_eq!(s.asked.as_deref(), Some("qsub -p 1024"));
        let why = s.refused.expect("refusal kept");
        assert!(why.contains("not allowed to set priority"), "{why}");
        assert_eq!(calls.lock().unwrap().len(), 2);
    }

    #[test]
    fn qsub_p_lowers_our_best_effort_jobs_for_own_and_raises_urgent_ones_for_operator() {
        let be = Standing::BestEffort { size: None };
        let u = Standing::Urgent { urgency: 2 };
        assert_eq!(qsub_p(be, BatchPriority::Off, 1024), None);
        assert_eq!(qsub_p(u, BatchPriority::Off, 1024), None);
        assert_eq!(qsub_p(be, BatchPriority::Own, 1024), Some(-1023));
        assert_eq!(qsub_p(u, BatchPriority::Own, 1024), Some(0));
        assert_eq!(qsub_p(be, BatchPriority::Operator, 1023), None);
        assert_eq!(qsub_p(u, BatchPriority::Operator, 1023), Some(1023));
    }

    #[tokio::test]
    async fn an_unreadable_id_is_not_submitted_twice() {
        let calls = Mutex::new(0);
        let e = submit_or_plain("x".into(), vec!["-p".into()], |_| {
            *calls.lock().unwrap() += 1;
            async {
                Err(LrmError::UnparsableJobId {
                    command: "qsub".into(),
                    output: "?".into(),
                })
            }
        })
        .await
        .unwrap_err();
        assert!(matches!(e, LrmError::UnparsableJobId { .. }));
        assert_eq!(*calls.lock().unwrap(), 1);
    }
}
