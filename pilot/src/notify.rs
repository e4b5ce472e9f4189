//! Signed HTTP to the coordinator: the event outbox and the command long-poll.
//!
//! Events are numbered 1, 2, 3…, serialized once, and sent in order from an
//! outbox with retries inside a caller-given deadline; every request has a
//! timeout. Bodies are HMAC-signed with the slot key. Not for deciding what
//! to do with commands (that is the run loop).

use protocol::auth::{SlotKey, SIGNATURE_HEADER, SLOT_HEADER};
use protocol::pilot::{
    EventAck, EventKind, PilotEvent, PollRequest, PollResponse, EVENTS_PATH, POLL_PATH,
};
use protocol::{PilotId, SlotId};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

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
    events_url: String,
    poll_url: String,
    key: SlotKey,
    slot: SlotId,
    pilot: PilotId,
    node: String,
    next_seq: u64,
    outbox: VecDeque<(u64, &'static str, Vec<u8>)>,
    request_timeout: Duration,
}

enum Answer {
    Status(u16, Vec<u8>),
    Failed(String),
}

impl Notifier {
    /// `coordinator` is the base URL; `request_timeout` bounds each event POST.
    pub fn new(
        coordinator: &str,
        key: SlotKey,
        slot: SlotId,
        pilot: PilotId,
        node: String,
        request_timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, NotifyError> {
        let mut builder = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(30));
        if !coordinator.starts_with("https://") {
            // Plain HTTP: no need to load the built-in CA store.
            builder = builder.tls_built_in_root_certs(false);
        }
        if let Some(pem) = ca_pem {
            // Trust exactly the site's CA for an https coordinator.
            let ca = reqwest::Certificate::from_pem(pem).map_err(|e| {
                NotifyError::Client(format!("CA file is not a PEM certificate: {e}"))
            })?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca);
        }
        let client = builder
            .build()
            .map_err(|e| NotifyError::Client(e.to_string()))?;
        let base = coordinator.trim_end_matches('/');
        Ok(Self {
            client,
            events_url: format!("{base}{EVENTS_PATH}"),
            poll_url: format!("{base}{POLL_PATH}"),
            key,
            slot,
            pilot,
            node,
            next_seq: 1,
            outbox: VecDeque::new(),
            request_timeout,
        })
    }

    pub fn pilot_id(&self) -> &PilotId {
        &self.pilot
    }

    /// Events not yet acknowledged (or refused).
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// Numbers, stamps and queues an event; returns its sequence number.
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
        let body = serde_json::to_vec(&event).map_err(|e| NotifyError::Encode {
            what: format!("event {name}"),
            message: e.to_string(),
        })?;
        self.next_seq += 1;
        self.outbox.push_back((seq, name, body));
        Ok(seq)
    }

    async fn post(&self, url: &str, body: Vec<u8>, timeout: Duration) -> Answer {
        let signature = self.key.sign(&body);
        let sent = self
            .client
            .post(url)
            .timeout(timeout)
            .header(SLOT_HEADER, self.slot.as_str())
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
                    Err(e) => Answer::Failed(format!("HTTP {status}, body not read: {e}")),
                }
            }
            Err(e) => Answer::Failed(describe(&e)),
        }
    }

    /// Sends queued events in order, one at a time (the coordinator's
    /// duplicate check relies on it: see `protocol::pilot`), until the
    /// outbox is empty or `deadline` passes. Acked (200, or 409 duplicate)
    /// and refused (other 4xx, logged) events leave the outbox; 5xx and
    /// network errors are retried.
    pub async fn flush(&mut self, deadline: Instant) -> Result<(), NotifyError> {
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(25);
        let mut last = String::from("no attempt made before the deadline");
        while let Some((seq, name, body)) = self.outbox.front().cloned() {
            let now = Instant::now();
            if now >= deadline {
                return Err(NotifyError::Unreachable {
                    url: self.events_url.clone(),
                    attempts,
                    last,
                });
            }
            attempts += 1;
            let timeout = self.request_timeout.min(deadline - now);
            match self.post(&self.events_url, body, timeout).await {
                Answer::Status(200, b) if serde_json::from_slice::<EventAck>(&b).is_ok() => {
                    tracing::debug!(seq, event = name, "event acknowledged");
                    self.outbox.pop_front();
                    backoff = Duration::from_millis(25);
                    continue;
                }
                Answer::Status(409, b)
                    if serde_json::from_slice::<EventAck>(&b)
                        .map(|a| a.duplicate)
                        .unwrap_or(false) =>
                {
                    tracing::debug!(seq, event = name, "event was already stored (duplicate)");
                    self.outbox.pop_front();
                    continue;
                }
                Answer::Status(status, b) if (400..500).contains(&status) => {
                    tracing::error!(
                        seq,
                        event = name,
                        status,
                        body = %String::from_utf8_lossy(&b),
                        "coordinator refused event; dropping it"
                    );
                    self.outbox.pop_front();
                    continue;
                }
                Answer::Status(status, b) => {
                    last = format!("HTTP {status}: {}", String::from_utf8_lossy(&b));
                }
                Answer::Failed(e) => last = e,
            }
            tracing::warn!(seq, event = name, attempt = attempts, error = %last, "event not delivered; retrying");
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
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
        match self
            .post(&self.poll_url, body, wait + self.request_timeout)
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
            Answer::Failed(last) => Err(NotifyError::Unreachable {
                url: self.poll_url.clone(),
                attempts: 1,
                last,
            }),
        }
    }
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
