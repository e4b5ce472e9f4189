//! Group commit for pilot events.
//!
//! HTTP handlers check an event (signature, JSON, slot, node name, clock) in
//! parallel, outside any lock, then queue it here. One writer thread takes
//! everything queued (at most [`MAX_BATCH`] events), applies the batch in one
//! SQLite transaction with one savepoint per event (a refused or duplicate
//! event rolls back only itself and gets its own error), commits, and only
//! then answers each handler. So a pilot event is still stored before it is
//! acknowledged, and events are applied in the order they were queued (a
//! pilot sends its events one after another, so its order is kept).
//!
//! A handler waits at most [`ACK_TIMEOUT`] and then answers 503. The event
//! may still be committed after that: the pilot resends it and gets
//! 409-duplicate, which it takes as the acknowledgement (the pilot protocol).

use crate::engine::{Engine, EngineError};
use protocol::pilot::{EventAck, PilotEvent};
use protocol::SlotId;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::error;

/// Most events applied in one transaction.
pub const MAX_BATCH: usize = 256;
/// Most events waiting for the writer; beyond that handlers answer 503.
pub const QUEUE_BOUND: usize = 16_384;
/// Longest a handler waits for its event's commit before answering 503.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an event was not acknowledged (all answered 503: the pilot resends).
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("event writer is gone (coordinator shutting down or failed)")]
    Gone,
    #[error("event writer is busy: {QUEUE_BOUND} events queued")]
    Busy,
    #[error("event not committed within {} s; resend it", ACK_TIMEOUT.as_secs())]
    Timeout,
    #[error("starting the event writer thread: {0}")]
    Start(std::io::Error),
}

/// One checked event waiting for the writer.
pub struct Pending {
    pub slot_id: SlotId,
    pub event: PilotEvent,
    /// The signed body as received (stored with the event).
    pub body: String,
    /// When the coordinator received it (the `recorded_ms` of what it records).
    pub received_ms: u64,
}

pub type Outcome = Result<EventAck, EngineError>;

/// Where the writer sends an event's outcome.
enum Reply {
    Async(oneshot::Sender<Outcome>),
    Blocking(SyncSender<Outcome>),
}

impl Reply {
    /// Sends the outcome; a handler that stopped waiting is not an error.
    fn send(self, outcome: Outcome) {
        let _ = match self {
            Reply::Async(tx) => tx.send(outcome).map_err(|_| ()),
            Reply::Blocking(tx) => tx.send(outcome).map_err(|_| ()),
        };
    }
}

struct Job {
    pending: Pending,
    reply: Reply,
}

/// The queue into the writer thread; the thread ends when this is dropped.
pub struct Writer {
    queue: SyncSender<Job>,
}

/// The writer thread's end of the queue, until [`WriterThread::start`].
pub struct WriterThread {
    rx: Receiver<Job>,
}

impl WriterThread {
    /// Starts the writer thread. It holds the engine weakly, so the engine
    /// (which owns the [`Writer`]) can still be dropped.
    pub fn start(self, engine: Weak<Engine>) -> Result<(), WriterError> {
        let rx = self.rx;
        std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || run(rx, engine))
            .map(drop)
            .map_err(WriterError::Start)
    }
}

impl Writer {
    /// The queue and the thread that will serve it.
    pub fn new() -> (Self, WriterThread) {
        let (queue, rx) = mpsc::sync_channel(QUEUE_BOUND);
        (Self { queue }, WriterThread { rx })
    }

    fn enqueue(&self, pending: Pending, reply: Reply) -> Result<(), WriterError> {
        self.queue
            .try_send(Job { pending, reply })
            .map_err(|e| match e {
                TrySendError::Full(_) => WriterError::Busy,
                TrySendError::Disconnected(_) => WriterError::Gone,
            })
    }

    /// Queues the event and waits (asynchronously) until it is committed or refused.
    pub async fn submit(&self, pending: Pending) -> Outcome {
        let (tx, rx) = oneshot::channel();
        self.enqueue(pending, Reply::Async(tx))?;
        match tokio::time::timeout(ACK_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(WriterError::Gone.into()),
            Err(_) => Err(WriterError::Timeout.into()),
        }
    }

    /// As [`Writer::submit`], blocking the calling thread.
    pub fn submit_blocking(&self, pending: Pending) -> Outcome {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(pending, Reply::Blocking(tx))?;
        match rx.recv_timeout(ACK_TIMEOUT) {
            Ok(outcome) => outcome,
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WriterError::Gone.into()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(WriterError::Timeout.into()),
        }
    }
}

/// The writer thread: one batch per turn until the queue or the engine is gone.
fn run(rx: Receiver<Job>, engine: Weak<Engine>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(engine) = engine.upgrade() else {
            return; // replies dropped: their handlers answer 503
        };
        let (pending, replies): (Vec<Pending>, Vec<Reply>) =
            batch.drain(..).map(|j| (j.pending, j.reply)).unzip();
        // A panic in the rules loses this batch (rolled back, handlers answer
        // 503, pilots resend), not the writer.
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.store_events(&pending)
        }));
        match applied {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    reply.send(outcome);
                }
            }
            Err(_) => error!(
                events = pending.len(),
                "event writer panicked; batch not stored"
            ),
        }
    }
}
