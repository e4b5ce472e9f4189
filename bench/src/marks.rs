//! The batch system's own moments, seen from outside: a tracing layer that
//! records when the in-process `local` adapter queued a job, started each of
//! its processes, sent SIGTERM and saw the job finish. The coordinator's
//! timeline has no entry for these (they belong to the batch system), and the
//! adapter logs each one with its job id, so the bench listens to its logs
//! instead of changing the adapter.

use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// What the local batch system did to a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Queued,
    ProcessStarted,
    Sigterm,
    Finished,
}

#[derive(Clone, Debug)]
pub struct Mark {
    pub job_id: String,
    pub what: What,
    /// Wall clock, milliseconds since the epoch (fractional).
    pub at_ms: f64,
    /// The logging thread and its CPU time then (ms): the adapter queues a
    /// job and starts its processes in one call on one thread, so the CPU
    /// between its "queued" and last "started" is what starting cost.
    pub thread: std::thread::ThreadId,
    pub thread_cpu_ms: f64,
}

static MARKS: Mutex<Vec<Mark>> = Mutex::new(Vec::new());

/// Marks of `job_id` recorded so far.
pub fn of_job(job_id: &str) -> Vec<Mark> {
    MARKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|m| m.job_id == job_id)
        .cloned()
        .collect()
}

/// Forgets every mark (between repeats, to keep memory flat).
pub fn clear() {
    MARKS.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn thread_cpu_ms() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as f64 * 1000.0 + t.tv_nsec() as f64 / 1e6)
        .unwrap_or(f64::NAN)
}

/// CPU time the local batch system spent on `job` from queueing it to
/// starting its last process, when all of that ran on one thread.
pub fn start_cpu_ms(job_id: &str) -> Option<f64> {
    let ms = of_job(job_id);
    let queued = ms.iter().find(|m| m.what == What::Queued)?;
    let last = ms.iter().rfind(|m| m.what == What::ProcessStarted)?;
    let same_thread = ms
        .iter()
        .filter(|m| matches!(m.what, What::Queued | What::ProcessStarted))
        .all(|m| m.thread == queued.thread);
    let d = last.thread_cpu_ms - queued.thread_cpu_ms;
    (same_thread && d.is_finite()).then_some(d.max(0.0))
}

pub fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The layer to install beside the usual formatter.
pub struct LrmMarks;

#[derive(Default)]
struct Fields {
    message: String,
    job_id: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "job_id" => self.job_id = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "job_id" => self.job_id = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: Subscriber> Layer<S> for LrmMarks {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !event.metadata().target().ends_with("::local") {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let what = match f.message.as_str() {
            "job queued" => What::Queued,
            "job process started" => What::ProcessStarted,
            "ending job: SIGTERM" => What::Sigterm,
            "job finished" => What::Finished,
            _ => return,
        };
        if let Some(job_id) = f.job_id {
            MARKS.lock().unwrap_or_else(|p| p.into_inner()).push(Mark {
                job_id,
                what,
                at_ms: now_ms(),
                thread: std::thread::current().id(),
                thread_cpu_ms: thread_cpu_ms(),
            });
        }
    }
}
