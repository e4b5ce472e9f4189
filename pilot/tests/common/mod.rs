//! The fake coordinator the pilot's end-to-end tests talk to (the pilot must
//! not depend on the real one): it checks each request's slot and signature,
//! records events (one at or below its pilot's highest stored seq is
//! answered 409-duplicate, as the real one does, which relies on pilots
//! sending in order), and serves the commands a test scripts, by long-poll.
//! It can hang (`dead`), stop listening (`go_down`: connections refused) and
//! listen again on the same address (`come_back`).

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use protocol::auth::{SlotKey, SIGNATURE_HEADER, SLOT_HEADER};
use protocol::pilot::{
    Command, CommandKind, EventAck, PilotEvent, PollRequest, PollResponse, EVENTS_PATH, POLL_PATH,
};
use protocol::SlotId;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Coord {
    pub key: SlotKey,
    pub slot: SlotId,
    pub events: Mutex<Vec<PilotEvent>>,
    pub commands: Mutex<Vec<Command>>,
    /// Requests refused for a wrong slot or signature.
    pub bad_signatures: AtomicUsize,
    /// When set, every request hangs (a coordinator that is gone).
    pub dead: AtomicBool,
    /// Events to answer 503 before storing any (a coordinator in trouble).
    pub fail_events: AtomicUsize,
    /// Events that arrived with a seq past their pilot's next: an earlier
    /// one was skipped, which the real coordinator would then take for a
    /// replay and drop.
    pub out_of_order: AtomicUsize,
    /// Highest command id a poll has been answered with.
    pub served: AtomicU64,
    /// Further slots it knows, with their keys (pilots of other slots).
    more_slots: Mutex<Vec<(SlotId, SlotKey)>>,
    addr: SocketAddr,
    /// Set between `go_down` and `come_back`: a request that still reaches
    /// the stopped server on a connection it had is never answered.
    gone: AtomicBool,
    /// Ends the server that listens now.
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Coord {
    /// A fake coordinator for a new slot, serving on loopback; its key is
    /// written to `key_file` as a pilot reads it. Returns it and its URL.
    pub async fn start(key_file: &Path) -> (Arc<Coord>, String) {
        let slot = SlotId::generate();
        let key = SlotKey::derive(b"test master", &slot).unwrap();
        std::fs::write(key_file, format!("{}\n", key.to_hex())).unwrap();
        let listener = listen("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let coord = Arc::new(Coord {
            key,
            slot,
            events: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            bad_signatures: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            fail_events: AtomicUsize::new(0),
            out_of_order: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            more_slots: Mutex::new(Vec::new()),
            addr,
            gone: AtomicBool::new(false),
            stop: Mutex::new(None),
        });
        coord.serve(listener);
        (coord, format!("http://{addr}"))
    }

    fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route(EVENTS_PATH, post(events_handler))
            .route(POLL_PATH, post(poll_handler))
            .with_state(Arc::clone(self));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        *self.stop.lock().unwrap() = Some(tx);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
    }

    /// Stops listening: from now on connections are refused (as when the
    /// coordinator's process is gone). Returns once they are.
    pub async fn go_down(&self) {
        self.gone.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.lock().unwrap().take() {
            let _ = stop.send(());
        }
        let start = Instant::now();
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(start.elapsed() < Duration::from_secs(5), "still listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Listens again on the same address.
    pub fn come_back(self: &Arc<Self>) {
        self.gone.store(false, Ordering::SeqCst);
        self.serve(listen(self.addr));
    }

    /// A further slot this coordinator knows; its key is written to `key_file`.
    pub fn add_slot(&self, key_file: &Path) -> SlotId {
        let slot = SlotId::generate();
        let key = SlotKey::derive(b"test master", &slot).unwrap();
        std::fs::write(key_file, format!("{}\n", key.to_hex())).unwrap();
        self.more_slots.lock().unwrap().push((slot.clone(), key));
        slot
    }

    fn signed(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let slot = headers.get(SLOT_HEADER).and_then(|v| v.to_str().ok());
        let key = if slot == Some(self.slot.as_str()) {
            Some(self.key.clone())
        } else {
            let more = self.more_slots.lock().unwrap();
            more.iter()
                .find(|(s, _)| Some(s.as_str()) == slot)
                .map(|(_, k)| k.clone())
        };
        let sig = headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ok = key.is_some_and(|k| k.verify(body, sig).unwrap_or(false));
        if !ok {
            self.bad_signatures.fetch_add(1, Ordering::SeqCst);
        }
        ok
    }

    /// A request's body if it is signed for our slot and parses; else the
    /// answer that refuses it. Hangs first if the coordinator is "dead".
    async fn accept<T: DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<T, (StatusCode, String)> {
        self.hang_if_dead().await;
        if !self.signed(headers, body) {
            return Err((
                StatusCode::UNAUTHORIZED,
                "{\"error\":\"bad signature\"}".into(),
            ));
        }
        serde_json::from_slice(body).map_err(|e| {
            let error = serde_json::json!({ "error": e.to_string() });
            (StatusCode::BAD_REQUEST, error.to_string())
        })
    }

    async fn hang_if_dead(&self) {
        if self.dead.load(Ordering::SeqCst) || self.gone.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }

    pub fn events(&self) -> Vec<PilotEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.events().iter().map(|e| e.kind.name()).collect()
    }

    /// The events of one pilot instance, in the order they were stored.
    pub fn events_of(&self, pilot: &protocol::PilotId) -> Vec<PilotEvent> {
        self.events()
            .into_iter()
            .filter(|e| &e.pilot_id == pilot)
            .collect()
    }

    /// Queues a command for the pilot (ids 1, 2, 3…).
    pub fn command(&self, kind: CommandKind) {
        let mut c = self.commands.lock().unwrap();
        let id = c.len() as u64 + 1;
        c.push(Command { id, kind });
    }

    /// The `n`th event (1, 2, …) of kind `name`; fails the test after `timeout`.
    pub async fn wait_for_nth(&self, name: &str, n: usize, timeout: Duration) -> PilotEvent {
        let start = Instant::now();
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .filter(|e| e.kind.name() == name)
                .nth(n.saturating_sub(1))
            {
                return e;
            }
            assert!(
                start.elapsed() < timeout,
                "no {name} event number {n} within {timeout:?}; got {:?}",
                self.kinds()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The first event of kind `name`; fails the test after `timeout`.
    pub async fn wait_for(&self, name: &str, timeout: Duration) -> PilotEvent {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(|e| e.kind.name() == name) {
                return e;
            }
            assert!(
                start.elapsed() < timeout,
                "no {name} event within {timeout:?}; got {:?}",
                self.kinds()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn events_handler(
    State(c): State<Arc<Coord>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let event: PilotEvent = match c.accept(&headers, &body).await {
        Ok(event) => event,
        Err(refused) => return refused,
    };
    let failing = c
        .fail_events
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if failing.is_ok() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"error\":\"try again\"}".into(),
        );
    }
    let mut events = c.events.lock().unwrap();
    let seq = event.seq;
    let highest = events
        .iter()
        .filter(|e| e.pilot_id == event.pilot_id)
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);
    let duplicate = seq <= highest;
    if seq > highest + 1 {
        c.out_of_order.fetch_add(1, Ordering::SeqCst);
    }
    if !duplicate {
        events.push(event);
    }
    let ack = serde_json::to_string(&EventAck { seq, duplicate }).unwrap();
    let status = if duplicate {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    (status, ack)
}

async fn poll_handler(
    State(c): State<Arc<Coord>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let req: PollRequest = match c.accept(&headers, &body).await {
        Ok(req) => req,
        Err(refused) => return refused,
    };
    let until = Instant::now() + Duration::from_millis(req.wait_ms);
    loop {
        let commands: Vec<Command> = c
            .commands
            .lock()
            .unwrap()
            .iter()
            .filter(|cmd| cmd.id > req.after)
            .cloned()
            .collect();
        if !commands.is_empty() || Instant::now() >= until {
            if let Some(last) = commands.iter().map(|c| c.id).max() {
                c.served.fetch_max(last, Ordering::SeqCst);
            }
            return (
                StatusCode::OK,
                serde_json::to_string(&PollResponse { commands }).unwrap(),
            );
        }
        c.hang_if_dead().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A listener on `addr` that may take over an address just left.
fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(128).unwrap()
}
