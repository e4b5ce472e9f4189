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
//!
//! The writer knows nothing of events or rules: it is given the function
//! that applies a batch (the engine's `apply_events`), so it depends on no
//! other module of the coordinator.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
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

/// Where the writer sends an item's outcome.
enum Reply<O> {
    Async(oneshot::Sender<O>),
    Blocking(SyncSender<O>),
}

impl<O> Reply<O> {
    /// Sends the outcome; a handler that stopped waiting is not an error.
    fn send(self, outcome: O) {
        let _ = match self {
            Reply::Async(tx) => tx.send(outcome).map_err(|_| ()),
            Reply::Blocking(tx) => tx.send(outcome).map_err(|_| ()),
        };
    }
}

struct Job<T, O> {
    item: T,
    reply: Reply<O>,
}

/// The queue into the writer thread; the thread ends when this is dropped.
pub struct Writer<T, O> {
    queue: SyncSender<Job<T, O>>,
}

/// The writer thread's end of the queue, until [`WriterThread::start`].
pub struct WriterThread<T, O> {
    rx: Receiver<Job<T, O>>,
}

impl<T: Send + 'static, O: Send + 'static> WriterThread<T, O> {
    /// Starts the writer thread. `apply` stores a batch and returns one
    /// outcome per item, in order; it returns `None` when there is nothing
    /// left to apply to (the engine is gone), which ends the thread.
    pub fn start(
        self,
        apply: impl FnMut(&[T]) -> Option<Vec<O>> + Send + 'static,
    ) -> Result<(), WriterError> {
        let rx = self.rx;
        std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || run(rx, apply))
            .map(drop)
            .map_err(WriterError::Start)
    }
}

impl<T, O> Writer<T, O> {
    /// The queue and the thread that will serve it.
    pub fn new() -> (Self, WriterThread<T, O>) {
        let (queue, rx) = mpsc::sync_channel(QUEUE_BOUND);
        (Self { queue }, WriterThread { rx })
    }

    fn enqueue(&self, item: T, reply: Reply<O>) -> Result<(), WriterError> {
        self.queue
            .try_send(Job { item, reply })
            .map_err(|e| match e {
                TrySendError::Full(_) => WriterError::Busy,
                TrySendError::Disconnected(_) => WriterError::Gone,
            })
    }

    /// Queues the item and waits (asynchronously) until it is committed or refused.
    pub async fn submit(&self, item: T) -> Result<O, WriterError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(item, Reply::Async(tx))?;
        match tokio::time::timeout(ACK_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(WriterError::Gone),
            Err(_) => Err(WriterError::Timeout),
        }
    }

    /// As [`Writer::submit`], blocking the calling thread.
    pub fn submit_blocking(&self, item: T) -> Result<O, WriterError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(item, Reply::Blocking(tx))?;
        match rx.recv_timeout(ACK_TIMEOUT) {
            Ok(outcome) => Ok(outcome),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(WriterError::Gone),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(WriterError::Timeout),
        }
    }
}

/// The writer thread: one batch per turn until the queue or the engine is gone.
fn run<T, O>(rx: Receiver<Job<T, O>>, mut apply: impl FnMut(&[T]) -> Option<Vec<O>>) {
    let mut batch: Vec<Job<T, O>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<T>, Vec<Reply<O>>) =
            batch.drain(..).map(|j| (j.item, j.reply)).unzip();
        // A panic in the rules loses this batch (rolled back, handlers answer
        // 503, pilots resend), not the writer.
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(&items)));
        match applied {
            Ok(Some(outcomes)) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    reply.send(outcome);
                }
            }
            // Replies dropped: their handlers answer 503.
            Ok(None) => return,
            Err(_) => error!(
                events = items.len(),
                "event writer panicked; batch not stored"
            ),
        }
    }
}
