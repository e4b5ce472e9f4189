//! 100,000 malformed and hostile requests against the client and pilot APIs,
//! through the real router and engine (batch system faked in memory):
//! never a panic, never a 5xx, always a JSON `{"error": ...}` body, and the
//! database unchanged by every refusal.

use axum::body::Body;
use axum::http::{Method, Request};
use coordinator::config::{Config, User};
use coordinator::engine::{Caller, Engine};
use lrm_adapters::memory::MemoryLrm;
use lrm_adapters::Capacity;
use protocol::auth::{token_hash, SlotKey, SIGNATURE_HEADER, SLOT_HEADER};
use protocol::pilot::{EventKind, PilotEvent, EVENTS_PATH, POLL_PATH};
use protocol::spec::WorkspaceSpec;
use protocol::{now_ms, PilotId, SlotId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use tower::ServiceExt;

const TOKEN: &str = "fuzz-token";
const SPEC: &str = r#"name = "f"
duration = "1h"
[[group]]
name = "w"
count = 2
memory_mb = 512
cpus = 1
image = "x"
"#;

fn random_text(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..max);
    (0..n).map(|_| rng.gen()).collect()
}

/// A spec broken in one of many ways (every one must be refused).
fn broken_spec(rng: &mut StdRng) -> String {
    let bad_values = [
        "-1",
        "0",
        "1e99",
        "\"ten\"",
        "[]",
        "{}",
        "true",
        "18446744073709551616",
        "\"\"",
        "nan",
    ];
    let v = bad_values[rng.gen_range(0..bad_values.len())];
    match rng.gen_range(0..10) {
        0 => SPEC.replace("count = 2", &format!("count = {v}")),
        1 => SPEC.replace("memory_mb = 512", &format!("memory_mb = {v}")),
        2 => SPEC.replace("cpus = 1", &format!("cpus = {v}")),
        3 => SPEC.replace("duration = \"1h\"", &format!("duration = {v}")),
        4 => {
            let names = [
                "\"../../etc\"",
                "\"a b\"",
                "\"-x\"",
                "7",
                "\"\"",
                "\"\\u0000\"",
            ];
            SPEC.replace(
                "name = \"f\"",
                &format!("name = {}", names[rng.gen_range(0..names.len())]),
            )
        }
        5 => SPEC.replace("image = \"x\"", "image = \"\""),
        6 => SPEC.replace("count = 2", "count = 9"),
        7 => SPEC.replace("memory_mb = 512", "memory_mb = 4090"),
        8 => format!("{SPEC}\nunexpected = 1\n"),
        _ => {
            let mut b = SPEC.as_bytes().to_vec();
            let i = rng.gen_range(0..b.len());
            b.truncate(i);
            String::from_utf8_lossy(&b).into_owned() + "[[["
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_hostile_requests_never_panic_never_5xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().join("data"),
        users: vec![User {
            name: "alice".into(),
            token_sha256: token_hash(TOKEN),
            admin: false,
            max_urgency: 0,
        }],
        ..Config::default()
    };
    let engine = Engine::new(
        cfg,
        Arc::new(MemoryLrm::new(Capacity {
            nodes: 8,
            cores_per_node: 2,
            memory_mb_per_node: 4096,
        })),
        "http://127.0.0.1:1".into(),
    )
    .unwrap();
    // One real workspace, so slots, keys and a stored event exist to attack.
    let caller = Caller {
        user: "alice".into(),
        admin: false,
    };
    let ws = engine
        .create(&caller, WorkspaceSpec::parse(SPEC).unwrap())
        .await
        .unwrap();
    let slot = ws.slots[0].id.clone();
    let master = std::fs::read_to_string(dir.path().join("data/master.key")).unwrap();
    let master = hex_decode(master.trim());
    let key = SlotKey::derive(&master, &slot).unwrap();
    let legit = PilotEvent {
        slot_id: slot.clone(),
        pilot_id: PilotId::generate(),
        node: "node1".into(),
        seq: 1,
        ts_ms: now_ms(),
        kind: EventKind::Started {
            pid: 1,
            hypervisor: "sim".into(),
            job_id: None,
        },
    };
    let legit_body = serde_json::to_vec(&legit).unwrap();
    engine
        .pilot_event(
            Some(slot.as_str()),
            Some(&key.sign(&legit_body)),
            &legit_body,
        )
        .unwrap();
    let baseline = engine.row_counts().unwrap();

    let app = coordinator::api::router(engine.clone());
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let other_slot = SlotId::generate();
    let other_key = SlotKey::derive(&master, &other_slot).unwrap();
    let mut by_status: HashMap<u16, u32> = HashMap::new();
    const N: u32 = 100_000;
    for i in 0..N {
        let kind = rng.gen_range(0..12);
        let req = match kind {
            // Client API: broken specs, random bytes, huge bodies, bad auth, bad ids.
            0 => client(
                Method::POST,
                "/api/v1/workspaces",
                Some(TOKEN),
                broken_spec(&mut rng).into_bytes(),
            ),
            1 => client(
                Method::POST,
                "/api/v1/workspaces",
                Some(TOKEN),
                random_text(&mut rng, 300),
            ),
            2 => client(
                Method::POST,
                "/api/v1/workspaces",
                Some(TOKEN),
                vec![b'a'; 300 * 1024],
            ),
            3 => client(
                Method::POST,
                "/api/v1/workspaces",
                None,
                SPEC.as_bytes().to_vec(),
            ),
            4 => client(
                Method::DELETE,
                &format!("/api/v1/workspaces/{}", ws.id),
                Some("wrong"),
                vec![],
            ),
            5 => {
                let id = ["ws-zzzzzzzz", "ws-00000000", "..%2F..%2Fetc", "ws-", "%00"]
                    [rng.gen_range(0..5)];
                let m = if rng.gen() {
                    Method::GET
                } else {
                    Method::DELETE
                };
                client(m, &format!("/api/v1/workspaces/{id}"), Some(TOKEN), vec![])
            }
            // Pilot API: forged, replayed, unknown slot, stale, garbage, out of range.
            6 => pilot(
                EVENTS_PATH,
                Some(slot.as_str()),
                Some(&"ab".repeat(32)),
                mutate_event(&legit, &mut rng),
            ),
            7 => pilot(
                EVENTS_PATH,
                Some(slot.as_str()),
                Some(&key.sign(&legit_body)),
                legit_body.clone(),
            ),
            8 => {
                // Correctly signed for a slot the coordinator never made.
                let mut e = legit.clone();
                e.slot_id = other_slot.clone();
                let body = serde_json::to_vec(&e).unwrap();
                pilot(
                    EVENTS_PATH,
                    Some(other_slot.as_str()),
                    Some(&other_key.sign(&body)),
                    body,
                )
            }
            9 => {
                let mut e = legit.clone();
                e.seq = rng.gen_range(2..u64::MAX);
                e.ts_ms = if rng.gen() { 0 } else { u64::MAX };
                let body = serde_json::to_vec(&e).unwrap();
                pilot(
                    EVENTS_PATH,
                    Some(slot.as_str()),
                    Some(&key.sign(&body)),
                    body,
                )
            }
            10 => {
                let body = random_text(&mut rng, 200);
                let sig = key.sign(&body);
                pilot(
                    if rng.gen() { EVENTS_PATH } else { POLL_PATH },
                    Some(slot.as_str()),
                    Some(&sig),
                    body,
                )
            }
            _ => {
                let body =
                    br#"{"seq":-1,"slot_id":7,"kind":{"type":"reserved","dom0_before_mb":1e400}}"#
                        .to_vec();
                let hdr = ["", "sl-", "sl-00000000", "not a slot"][rng.gen_range(0..4)];
                pilot(EVENTS_PATH, Some(hdr), Some(&key.sign(&body)), body)
            }
        };
        let resp = app.clone().oneshot(req).await.expect("router never fails");
        let status = resp.status().as_u16();
        *by_status.entry(status).or_default() += 1;
        assert!(
            (400..500).contains(&status),
            "request #{i} (kind {kind}) answered {status}: every one of these must be refused"
        );
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string));
        assert!(
            error.is_some_and(|e| !e.is_empty()),
            "request #{i} (kind {kind}) answered {status} without a JSON error: {:?}",
            String::from_utf8_lossy(&body)
        );
        if i % 10_000 == 0 {
            assert_eq!(
                engine.row_counts().unwrap(),
                baseline,
                "database changed by refused request #{i}"
            );
        }
    }
    assert_eq!(
        engine.row_counts().unwrap(),
        baseline,
        "database changed by refused requests"
    );
    assert_eq!(by_status.values().sum::<u32>(), N);
    eprintln!("answers: {by_status:?}");
}

fn client(method: Method, uri: &str, token: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Body::from(body)).unwrap()
}

fn pilot(path: &str, slot: Option<&str>, sig: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(s) = slot {
        b = b.header(SLOT_HEADER, s);
    }
    if let Some(s) = sig {
        b = b.header(SIGNATURE_HEADER, s);
    }
    b.body(Body::from(body)).unwrap()
}

fn mutate_event(e: &PilotEvent, rng: &mut StdRng) -> Vec<u8> {
    let mut v = serde_json::to_value(e).unwrap();
    match rng.gen_range(0..4) {
        0 => v["seq"] = serde_json::json!(rng.gen::<u32>()),
        1 => {
            v["kind"] = serde_json::json!({"type": "preempting", "signal": "SIGTERM", "coordinator_wait_ms": 0, "cleanup_deadline_ms": 0})
        }
        2 => v["node"] = serde_json::json!("x".repeat(rng.gen_range(0..400))),
        _ => {
            v["kind"] = serde_json::json!({"type": "released", "reason": "commanded", "vms_destroyed": [], "dom0_restored_mb": 1, "restore_ms": 1, "clean": true})
        }
    }
    serde_json::to_vec(&v).unwrap()
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
