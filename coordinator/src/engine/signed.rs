//! The pilot API as it arrives over HTTP: HMAC signatures, JSON, the clock
//! check, then the typed entry (`ingest`); and the signed long-poll for
//! commands, woken only by the pilot's own commands.
//!
//! Not here: what an event means (`ingest`, `rules`).

use super::Incoming;
use super::{Engine, EngineError, MAX_WAIT};
use crate::store::{self, StoreError};
use protocol::auth::SlotKey;
use protocol::pilot::{CommandKind, EventAck, PilotEvent, PollRequest};
use protocol::SlotId;
use rusqlite::Connection;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::warn;

impl Engine {
    fn verify(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<SlotId, EngineError> {
        let slot = slot_header
            .ok_or_else(|| EngineError::Forbidden("missing x-wsp-slot header".into()))
            .and_then(|h| SlotId::parse(h).map_err(|e| EngineError::Forbidden(e.to_string())))?;
        let sig = signature
            .ok_or_else(|| EngineError::Forbidden("missing x-wsp-signature header".into()))?;
        let key = SlotKey::derive(&self.master, &slot)
            .map_err(|e| EngineError::Forbidden(e.to_string()))?;
        match key.verify(body, sig) {
            Ok(true) => Ok(slot),
            _ => {
                self.metrics.refused("bad_signature");
                warn!(slot_id = %slot, "refused pilot request: bad signature");
                Err(EngineError::Forbidden(format!(
                    "signature does not match the key of slot {slot}"
                )))
            }
        }
    }

    /// Refuses a pilot's timestamp ahead of our clock by more than
    /// `max_clock_skew_s` and, unless `late_ok`, as far behind it. Events are
    /// `late_ok`: a pilot resends them from its durable outbox after an
    /// outage of any length, and their signature, sequence number and slot
    /// already say they are honest; [`made_after_slot`] bounds them from
    /// below.
    fn check_clock(&self, ts_ms: u64, late_ok: bool) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let skew_ms = self.cfg.max_clock_skew_s * 1000;
        let (ahead, behind) = (ts_ms.saturating_sub(now), now.saturating_sub(ts_ms));
        if ahead > skew_ms || (!late_ok && behind > skew_ms) {
            self.metrics.refused("stale");
            let (by, side) = if ahead > 0 {
                (ahead, "ahead of")
            } else {
                (behind, "behind")
            };
            return Err(EngineError::Forbidden(format!(
                "timestamp {ts_ms} is {by} ms {side} the coordinator's clock (more than max_clock_skew_s = {})",
                self.cfg.max_clock_skew_s
            )));
        }
        Ok(())
    }

    /// A signed pilot event: verified, stored, applied, then acknowledged.
    /// Blocks the calling thread until the event's group commit (see
    /// [`crate::writer`]); async callers use [`Engine::pilot_event_async`].
    pub fn pilot_event(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<EventAck, EngineError> {
        let pending = self.check_event(slot_header, signature, body)?;
        self.writer.submit_blocking(pending)?
    }

    /// As [`Engine::pilot_event`], waiting asynchronously for the commit.
    pub async fn pilot_event_async(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<EventAck, EngineError> {
        let pending = self.check_event(slot_header, signature, body)?;
        self.writer.submit(pending).await?
    }

    /// Everything about an event that needs no database: signature, JSON,
    /// slot, node name, clock. Runs in the handler, in parallel.
    fn check_event(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<Incoming, EngineError> {
        let slot_id = self.verify(slot_header, signature, body)?;
        let event: PilotEvent = serde_json::from_slice(body)
            .map_err(|e| EngineError::BadRequest(format!("malformed pilot event: {e}")))?;
        if event.slot_id != slot_id {
            self.metrics.refused("wrong_slot");
            return Err(EngineError::Forbidden(format!(
                "event names slot {} but is signed for slot {slot_id}",
                event.slot_id
            )));
        }
        if event.node.is_empty()
            || event.node.len() > 253
            || event.node.chars().any(|c| c.is_control())
        {
            return Err(EngineError::BadRequest(
                "node name must be 1-253 printable characters".into(),
            ));
        }
        self.check_clock(event.ts_ms, true)?;
        Ok(Incoming {
            slot_id,
            event,
            body: String::from_utf8_lossy(body).into_owned(),
            received_ms: self.clock.now_ms(),
        })
    }

    /// A signed long-poll for commands.
    pub async fn pilot_poll(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<PollAnswer, EngineError> {
        let slot_id = self.verify(slot_header, signature, body)?;
        let req: PollRequest = serde_json::from_slice(body)
            .map_err(|e| EngineError::BadRequest(format!("malformed poll: {e}")))?;
        if req.slot_id != slot_id {
            return Err(EngineError::Forbidden(format!(
                "poll names slot {} but is signed for slot {slot_id}",
                req.slot_id
            )));
        }
        self.check_clock(req.ts_ms, false)?;
        // Never longer than we told pilots to wait: silence detection relies on it.
        let wait =
            Duration::from_millis(req.wait_ms.min(self.cfg.pilot.poll_wait_ms)).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        // Slots are never deleted: one check before the long-poll is enough.
        self.with_store(|s| match store::get_slot(s.conn(), &slot_id)? {
            Some(_) => Ok(()),
            None => Err(EngineError::Forbidden(format!("unknown slot {slot_id}"))),
        })?;
        let key = (slot_id.clone(), req.node.clone());
        let notify = self
            .pollers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        // Removes the entry when this poll ends, also when its connection
        // drops mid-wait (the future is dropped, code after the await never runs).
        let registered = Registered {
            pollers: &self.pollers,
            key,
            notify,
        };
        self.poll_until(&registered.notify, &slot_id, &req, deadline)
            .await
    }

    async fn poll_until(
        &self,
        notify: &Notify,
        slot_id: &SlotId,
        req: &PollRequest,
        deadline: tokio::time::Instant,
    ) -> Result<PollAnswer, EngineError> {
        loop {
            // Registered before the read: a command stored after it wakes us.
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let answer = self.with_store(|s| {
                store::seen_pilot(s.conn(), slot_id, &req.node, self.clock.now_ms())?;
                let rows = store::commands_after(s.conn(), slot_id, &req.node, req.after)?;
                if rows.is_empty() {
                    return Ok(None);
                }
                Ok(Some(poll_answer(s.conn(), rows)?))
            })?;
            if let Some(answer) = answer {
                return Ok(answer);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(PollAnswer(r#"{"commands":[]}"#.to_string()));
            }
            let _ = tokio::time::timeout_at(deadline, woken).await;
        }
    }
}

/// A waiting poll's place in [`Engine`]'s `pollers`; dropping it removes the
/// entry unless another poll of the same (slot, node) still waits on it.
pub(super) struct Registered<'a> {
    pollers: &'a Mutex<HashMap<(SlotId, String), Arc<Notify>>>,
    key: (SlotId, String),
    notify: Arc<Notify>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        // The map's and this guard's: no other poll waits on it.
        if Arc::strong_count(&self.notify) <= 2 {
            pollers.remove(&self.key);
        }
    }
}

/// A pilot's poll answer: a [`protocol::pilot::PollResponse`] as JSON text.
#[derive(Debug)]
pub struct PollAnswer(pub String);

/// The stored form of a launch's empty peer list, as `serde_json` writes it.
/// Outside a JSON string this byte sequence can only be a `peers` key with
/// an empty array (quotes inside strings are escaped).
const NO_PEERS: &str = r#""peers":[]"#;

/// Builds the [`protocol::pilot::PollResponse`] JSON for stored commands. A launch is stored
/// without its workspace's peers (`store::set_workspace_peers`); they are
/// spliced in here as stored JSON, so the coordinator neither stores nor
/// re-encodes N peers N times. Commands stored before that change carry
/// their peers and pass through unchanged. What the pilot receives is the
/// same as if the launch had been stored whole.
pub(super) fn poll_answer(
    c: &Connection,
    rows: Vec<(u64, String)>,
) -> Result<PollAnswer, StoreError> {
    let mut out = String::from(r#"{"commands":["#);
    for (i, (id, body)) in rows.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"id":{id},"kind":"#));
        let kind: CommandKind = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
            what: "command",
            detail: e.to_string(),
        })?;
        let ctx = match &kind {
            CommandKind::StartVm(l) => l.context.as_ref().filter(|c| c.peers.is_empty()),
            _ => None,
        };
        match (ctx, body.find(NO_PEERS)) {
            (Some(ctx), Some(at)) => {
                let peers = store::workspace_peers(c, &ctx.workspace_id)?.ok_or_else(|| {
                    StoreError::Corrupt {
                        what: "peers",
                        detail: format!("none stored for workspace {}", ctx.workspace_id),
                    }
                })?;
                out.push_str(&body[..at]);
                out.push_str(r#""peers":"#);
                out.push_str(&peers);
                out.push_str(&body[at + NO_PEERS.len()..]);
            }
            _ => out.push_str(&body),
        }
        out.push('}');
    }
    out.push_str("]}");
    Ok(PollAnswer(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::Caller;
    use crate::store::Store;
    use lrm_adapters::Capacity;
    use protocol::pilot::{Context, Peer, PollResponse, VmLaunch};
    use protocol::spec::WorkspaceSpec;
    use protocol::{VmId, WorkspaceId};
    use std::time::Instant;

    fn launch(ws: &str, vm: &VmId, peers: Vec<Peer>) -> CommandKind {
        let mut l = VmLaunch::basic(
            vm.clone(),
            "wsp-x".into(),
            256,
            1,
            // Looks like the marker, but inside a string: must stay as is.
            "a \"peers\":[] image".into(),
        );
        l.context = Some(Context {
            workspace_id: ws.into(),
            workspace_name: "n".into(),
            group: "g".into(),
            peers,
            ssh_key: None,
        });
        CommandKind::StartVm(l)
    }

    fn json(k: &CommandKind) -> String {
        serde_json::to_string(k).expect("json")
    }

    #[test]
    fn a_launch_stored_without_peers_is_delivered_with_its_workspace_peers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("t.db")).expect("open");
        let c = store.conn();
        let ws = WorkspaceId::generate();
        let vm = VmId::generate();
        let peers: Vec<Peer> = (0..3)
            .map(|i| Peer {
                name: format!("g-{i}"),
                group: "g".into(),
                ips: vec![std::net::Ipv4Addr::new(10, 0, 0, i)],
            })
            .collect();
        store::set_workspace_peers(c, &ws, &peers).expect("peers stored");
        let whole = launch(ws.as_str(), &vm, peers);
        let rows = vec![
            (1, json(&launch(ws.as_str(), &vm, Vec::new()))),
            (2, json(&CommandKind::Release)),
            // Stored whole (before peers were stored apart): passes unchanged.
            (3, json(&whole)),
        ];
        let answer = poll_answer(c, rows).expect("answer");
        let resp: PollResponse = serde_json::from_str(&answer.0).expect("a PollResponse");
        let got: Vec<(u64, CommandKind)> =
            resp.commands.into_iter().map(|c| (c.id, c.kind)).collect();
        assert_eq!(
            got,
            [(1, whole.clone()), (2, CommandKind::Release), (3, whole)]
        );
    }

    #[test]
    fn a_launch_whose_peers_are_missing_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("t.db")).expect("open");
        let ws = WorkspaceId::generate();
        let rows = vec![(1, json(&launch(ws.as_str(), &VmId::generate(), Vec::new())))];
        let err = poll_answer(store.conn(), rows).expect_err("no peers stored");
        assert!(err.to_string().contains(ws.as_str()), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poll_leaves_no_registration_behind_when_it_ends_or_its_connection_drops() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let lrm = Arc::new(lrm_adapters::memory::MemoryLrm::new(Capacity {
            nodes: 8,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        }));
        let engine = Engine::new(cfg, lrm, "http://127.0.0.1:1".into()).expect("engine");
        let caller = Caller {
            user: "u".into(),
            admin: true,
        };
        let spec = WorkspaceSpec::parse(protocol::spec::EXAMPLE).expect("spec");
        let ws = engine.create(&caller, spec).await.expect("created");
        let slot = ws.slots[0].id.clone();
        let master = std::fs::read_to_string(dir.path().join("data/master.key")).expect("key");
        let master = hex::decode(master.trim()).expect("hex");
        let key = SlotKey::derive(&master, &slot).expect("slot key");
        let poll = |wait_ms: u64| {
            let body = serde_json::to_vec(&PollRequest {
                slot_id: slot.clone(),
                pilot_id: protocol::PilotId::generate(),
                node: "node1".into(),
                after: 0,
                wait_ms,
                ts_ms: protocol::now_ms(),
            })
            .expect("json");
            let sig = key.sign(&body);
            let (engine, slot) = (engine.clone(), slot.clone());
            tokio::spawn(async move {
                engine
                    .pilot_poll(Some(slot.as_str()), Some(&sig), &body)
                    .await
            })
        };
        let registered = || engine.pollers.lock().expect("lock").len();

        // Ends by itself (nothing to deliver): the entry goes with it.
        let answer = poll(50).await.expect("joined").expect("answered");
        assert_eq!(answer.0, r#"{"commands":[]}"#);
        assert_eq!(registered(), 0);

        // Dropped mid-wait, as when the pilot's connection closes.
        let waiting = poll(10_000);
        let start = Instant::now();
        while registered() == 0 && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(registered(), 1, "the poll registered itself");
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(registered(), 0, "a dropped poll is unregistered");
    }
}
