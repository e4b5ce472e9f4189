//! Signed HTTP to the coordinator: sending events and the command long-poll.
//!
//! Events are numbered 1, 2, 3…, serialized and signed once into a
//! [`Letter`] kept in the [`Outbox`] (durable: see outbox.rs), and sent in
//! order with retries and backoff until a caller-given deadline; every
//! request has a timeout. Bodies are HMAC-signed with the slot key. Not for
//! deciding what to do with commands (that is the run loop).

use crate::outbox::{Letter, Outbox};
use protocol::auth::{SlotKey, SIGNATURE_HEADER, SLOT_HEADER};
use protocol::pilot::{
    EventAck, EventKind, PilotEvent, PollRequest, PollResponse, EVENTS_PATH, POLL_PATH,
};
use protocol::{PilotId, SlotId};
use std::time::Duration;
use tokio::time::Instant;

/// Longest pause between two tries of an event.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Errors talking to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("cannot encode {what}: {message}")]
    Encode { what: String, message: String },
    #[error("coordinator {url} not reached in time ({attempts} attempts; last: {last})")]
    Unreachable {
        url: String,
        attempts: u32,
        last: String,
    },
    /// Nothing listens at the coordinator's address: it is not running.
    #[error("coordinator {url} is down: {last}")]
    Down { url: String, last: String },
    #[error("coordinator refused {what} with HTTP {status}: {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
    #[error("coordinator answered {what} with an unreadable body: {message}")]
    BadAnswer { what: String, message: String },
}

/// The pilot's side of the pilot protocol.
pub struct Notifier {
    client: reqwest::Client,
    base: String,
    events_url: String,
    poll_url: String,
    key: SlotKey,
    slot: SlotId,
    pilot: PilotId,
    node: String,
    next_seq: u64,
    outbox: Outbox,
    request_timeout: Duration,
    ca_pem: Option<String>,
}

enum Answer {
    Status(u16, Vec<u8>),
    /// No answer; `down` when the connection was refused.
    Failed {
        error: String,
        down: bool,
    },
}

/// What one try of a letter came to.
pub(crate) enum Sent {
    /// Stored now, or (`duplicate`) by an earlier try.
    Acked { duplicate: bool },
    /// A 4xx other than a duplicate: it will never be taken.
    Refused { status: u16, body: String },
    /// Not delivered. `down`: the connection was refused (nobody listens);
    /// `retry`: the coordinator answered 5xx (up but busy).
    Failed {
        error: String,
        down: bool,
        retry: bool,
    },
}

/// An HTTP client for `coordinator` (trusting exactly `ca_pem` for https,
/// when given) whose connects time out after `timeout`.
pub(crate) fn http_client(
    coordinator: &str,
    timeout: Duration,
    ca_pem: Option<&[u8]>,
) -> Result<reqwest::Client, NotifyError> {
    let mut builder = reqwest::Client::builder()
        // An answer is the coordinator's or nobody's: never follow elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30));
    if !coordinator.starts_with("https://") {
        // Plain HTTP: no need to load the built-in CA store.
        builder = builder.tls_built_in_root_certs(false);
    }
    if let Some(pem) = ca_pem {
        // Trust exactly the site's CA for an https coordinator.
        let ca = reqwest::Certificate::from_pem(pem)
            .map_err(|e| NotifyError::Client(format!("CA file is not a PEM certificate: {e}")))?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca);
    }
    builder
        .build()
        .map_err(|e| NotifyError::Client(e.to_string()))
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    slot: &str,
    signature: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Answer {
    let sent = client
        .post(url)
        .timeout(timeout)
        .header(SLOT_HEADER, slot)
        .header(SIGNATURE_HEADER, signature)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.bytes().await {
                Ok(b) => Answer::Status(status, b.to_vec()),
                Err(e) => Answer::Failed {
                    error: format!("HTTP {status}, body not read: {e}"),
                    down: false,
                },
            }
        }
        Err(e) => Answer::Failed {
            error: describe(&e),
            down: connection_refused(&e),
        },
    }
}

/// One try of a letter.
pub(crate) async fn send_letter(
    client: &reqwest::Client,
    letter: &Letter,
    timeout: Duration,
) -> Sent {
    let url = format!("{}{EVENTS_PATH}", letter.coordinator.trim_end_matches('/'));
    let body = letter.body.clone().into_bytes();
    match post(
        client,
        &url,
        letter.slot_id.as_str(),
        &letter.signature,
        body,
        timeout,
    )
    .await
    {
        Answer::Status(200, b) if serde_json::from_slice::<EventAck>(&b).is_ok() => {
            Sent::Acked { duplicate: false }
        }
        Answer::Status(409, b)
            if serde_json::from_slice::<EventAck>(&b)
                .map(|a| a.duplicate)
                .unwrap_or(false) =>
        {
            Sent::Acked { duplicate: true }
        }
        Answer::Status(status, b) if (400..500).contains(&status) => Sent::Refused {
            status,
            body: String::from_utf8_lossy(&b).into_owned(),
        },
        Answer::Status(status, b) => Sent::Failed {
            error: format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
            down: false,
            retry: true,
        },
        Answer::Failed { error, down } => Sent::Failed {
            error,
            down,
            retry: false,
        },
    }
}

impl Notifier {
    /// `coordinator` is the base URL; `request_timeout` bounds each event
    /// POST. Events are kept in memory only until [`Notifier::with_outbox`].
    pub fn new(
        coordinator: &str,
        key: SlotKey,
        slot: SlotId,
        pilot: PilotId,
        node: String,
        request_timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, NotifyError> {
        let client = http_client(coordinator, request_timeout, ca_pem)?;
        let base = coordinator.trim_end_matches('/');
        Ok(Self {
            client,
            base: base.to_string(),
            events_url: format!("{base}{EVENTS_PATH}"),
            poll_url: format!("{base}{POLL_PATH}"),
            key,
            slot,
            pilot,
            node,
            next_seq: 1,
            outbox: Outbox::in_memory(),
            request_timeout,
            ca_pem: ca_pem.map(|p| String::from_utf8_lossy(p).into_owned()),
        })
    }

    /// Keeps every event from now on in `outbox` (before it is sent).
    pub fn with_outbox(mut self, mut outbox: Outbox) -> Self {
        while let Some(letter) = self.outbox.front().cloned() {
            self.outbox.pop_front();
            if let Err(e) = outbox.put(letter) {
                tracing::error!(error = %e, "event not stored on disk; kept in memory only");
            }
        }
        self.outbox = outbox;
        self
    }

    pub fn pilot_id(&self) -> &PilotId {
        &self.pilot
    }

    /// Events not yet acknowledged (or refused).
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// Numbers, stamps, signs and queues an event (on disk first when the
    /// outbox is durable); returns its sequence number.
    pub fn push(&mut self, kind: EventKind) -> Result<u64, NotifyError> {
        let seq = self.next_seq;
        let name = kind.name();
        let event = PilotEvent {
            slot_id: self.slot.clone(),
            pilot_id: self.pilot.clone(),
            node: self.node.clone(),
            seq,
            ts_ms: protocol::now_ms(),
            kind,
        };
        let encode = |message: String| NotifyError::Encode {
            what: format!("event {name}"),
            message,
        };
        let body = serde_json::to_vec(&event).map_err(|e| encode(e.to_string()))?;
        let body = String::from_utf8(body).map_err(|e| encode(e.to_string()))?;
        let letter = Letter {
            coordinator: self.base.clone(),
            ca_pem: self.ca_pem.clone(),
            slot_id: self.slot.clone(),
            pilot_id: self.pilot.clone(),
            seq,
            kind: name.to_string(),
            ts_ms: event.ts_ms,
            signature: self.key.sign(body.as_bytes()),
            body,
        };
        self.next_seq += 1;
        if let Err(e) = self.outbox.put(letter) {
            tracing::error!(seq, event = name, error = %e, "event not stored on disk; kept in memory only");
        }
        Ok(seq)
    }

    /// Sends queued events in order, one at a time (the coordinator's
    /// duplicate check relies on it: see `protocol::pilot`), until the
    /// outbox is empty or `deadline` passes. Acked (200, or 409 duplicate)
    /// and refused (other 4xx, logged) events leave the outbox; 5xx and
    /// network errors are retried with backoff (up to [`MAX_BACKOFF`]).
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), NotifyError> {
        self.flush_inner(deadline, false).await
    }

    /// As [`Notifier::flush`], but a refused connection (nothing listens:
    /// the coordinator is not running) ends it at once with
    /// [`NotifyError::Down`]: for when waiting for the coordinator is only
    /// worth it if it is there.
    pub async fn flush_unless_down(&mut self, deadline: Instant) -> Result<(), NotifyError> {
        self.flush_inner(deadline, true).await
    }

    async fn flush_inner(
        &mut self,
        deadline: Instant,
        stop_if_down: bool,
    ) -> Result<(), NotifyError> {
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(25);
        let mut last = String::from("no attempt made before the deadline");
        while let Some(letter) = self.outbox.front() {
            let now = Instant::now();
            if now >= deadline {
                return Err(NotifyError::Unreachable {
                    url: self.events_url.clone(),
                    attempts,
                    last,
                });
            }
            attempts += 1;
            let (seq, name) = (letter.seq, letter.kind.clone());
            let timeout = self.request_timeout.min(deadline - now);
            match send_letter(&self.client, letter, timeout).await {
                Sent::Acked { duplicate } => {
                    tracing::debug!(seq, event = %name, duplicate, "event acknowledged");
                    self.outbox.pop_front();
                    backoff = Duration::from_millis(25);
                    continue;
                }
                Sent::Refused { status, body } => {
                    tracing::error!(
                        seq,
                        event = %name,
                        status,
                        body = %body,
                        "coordinator refused event; dropping it"
                    );
                    self.outbox.pop_front();
                    continue;
                }
                Sent::Failed { error, down, .. } => {
                    if down && stop_if_down {
                        return Err(NotifyError::Down {
                            url: self.events_url.clone(),
                            last: error,
                        });
                    }
                    last = error;
                }
            }
            if attempts.is_power_of_two() {
                tracing::warn!(seq, event = %name, attempt = attempts, error = %last, "event not delivered; retrying");
            }
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Ok(())
    }

    /// One long-poll for commands after `after`; the coordinator may hold
    /// it for `wait`, the request times out a little later.
    pub async fn poll(&self, after: u64, wait: Duration) -> Result<PollResponse, NotifyError> {
        let req = PollRequest {
            slot_id: self.slot.clone(),
            pilot_id: self.pilot.clone(),
            node: self.node.clone(),
            after,
            wait_ms: wait.as_millis() as u64,
            ts_ms: protocol::now_ms(),
        };
        let body = serde_json::to_vec(&req).map_err(|e| NotifyError::Encode {
            what: "poll".to_string(),
            message: e.to_string(),
        })?;
        let signature = self.key.sign(&body);
        match post(
            &self.client,
            &self.poll_url,
            self.slot.as_str(),
            &signature,
            body,
            wait + self.request_timeout,
        )
        .await
        {
            Answer::Status(200, b) => {
                serde_json::from_slice(&b).map_err(|e| NotifyError::BadAnswer {
                    what: "poll".to_string(),
                    message: e.to_string(),
                })
            }
            Answer::Status(status, b) if (400..500).contains(&status) => {
                Err(NotifyError::Refused {
                    what: "poll".to_string(),
                    status,
                    body: String::from_utf8_lossy(&b).into_owned(),
                })
            }
            Answer::Status(status, b) => Err(NotifyError::Unreachable {
                url: self.poll_url.clone(),
                attempts: 1,
                last: format!("HTTP {status}: {}", String::from_utf8_lossy(&b)),
            }),
            Answer::Failed { error, down: true } => Err(NotifyError::Down {
                url: self.poll_url.clone(),
                last: error,
            }),
            Answer::Failed { error, .. } => Err(NotifyError::Unreachable {
                url: self.poll_url.clone(),
                attempts: 1,
                last: error,
            }),
        }
    }
}

/// Whether the connection was refused (an RST to our SYN: nothing listens).
fn connection_refused(e: &reqwest::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        src = cause.source();
    }
    false
}

/// reqwest's errors with their causes, on one line.
fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    if e.is_timeout() {
        s.push_str(" (timed out)");
    }
    s
}
