//! Every error the HTTP API gives, through the real router and engine:
//! the documented `{"error": "..."}` body with a message that names the
//! problem (the spec field, the body limit, the route, the method).

use axum::body::Body;
use axum::http::{Method, Request};
use coordinator::config::{Config, User};
use coordinator::engine::Engine;
use lrm_adapters::memory::MemoryLrm;
use lrm_adapters::Capacity;
use protocol::auth::token_hash;
use protocol::pilot::EVENTS_PATH;
use std::sync::Arc;
use tower::ServiceExt;

const TOKEN: &str = "api-errors-token";
/// A user whose `[[users]]` entry allows urgency 2.
const BOB: &str = "api-errors-bob";
const SPEC: &str = r#"name = "f"
duration = "1h"
[[group]]
name = "w"
count = 2
memory_mb = 512
cpus = 1
image = "x"
"#;

struct Api {
    _dir: tempfile::TempDir,
    app: axum::Router,
}

impl Api {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: dir.path().join("data"),
            users: vec![
                User {
                    name: "alice".into(),
                    token_sha256: token_hash(TOKEN),
                    admin: false,
                    ..Default::default()
                },
                User {
                    name: "bob".into(),
                    token_sha256: token_hash(BOB),
                    admin: false,
                    max_urgency: 2,
                    ..Default::default()
                },
            ],
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
        Self {
            _dir: dir,
            app: coordinator::api::router(engine),
        }
    }

    /// Status and body (as JSON) of one request.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let resp = self
            .app
            .clone()
            .oneshot(b.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{uri} answered {status} with a body that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        if status >= 400 {
            assert_eq!(content_type.as_deref(), Some("application/json"), "{uri}");
        }
        (status, json)
    }

    /// The `error` of a request that must fail with `status`.
    async fn error(
        &self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        body: Vec<u8>,
        status: u16,
    ) -> String {
        let (got, json) = self.call(method, uri, auth, body).await;
        assert_eq!(got, status, "{uri}: {json}");
        let obj = json.as_object().unwrap();
        assert_eq!(obj.len(), 1, "only the error field: {json}");
        obj["error"].as_str().unwrap().to_string()
    }
}

fn bearer() -> Option<&'static str> {
    Some("Bearer api-errors-token")
}

#[tokio::test]
async fn spec_errors_answer_400_naming_the_field_and_position() {
    let api = Api::new();
    let cases = [
        (
            SPEC.replace("count = 2", "count = 4294967296"),
            "group[0].count: 4294967296 is out of range (1 to 4096) (line 5, column 9)",
        ),
        (
            SPEC.replace("count = 2", "count = 1e12"),
            "group[0].count: 1000000000000 is out of range (1 to 4096) (line 5, column 9)",
        ),
        (
            SPEC.replace("memory_mb = 512", "memory_mb = -1"),
            "group[0].memory_mb: -1 is out of range (16 to 4194304) (line 6, column 13)",
        ),
        (
            SPEC.replace("cpus = 1", "cpus = \"two\""),
            "group[0].cpus: expected a whole number from 1 to 1024, got the string \"two\" (write it without quotes) (line 7, column 8)",
        ),
        (
            SPEC.replace("duration = \"1h\"", "duration = -5"),
            "duration: -5s is out of range (1s to 31622400s) (line 2, column 12)",
        ),
        (
            SPEC.replace("name = \"f\"", "name = \"f"),
            "spec is not valid TOML: line 1, column 10: invalid basic string",
        ),
        (
            r#"{"name":"f","duration":3600,"group":[{"name":"w","count":"3","memory_mb":512,"image":"x"}]}"#
                .to_string(),
            "group[0].count: expected a whole number from 1 to 4096, got the string \"3\" (write it without quotes) (line 1, column 60)",
        ),
    ];
    for (spec, want) in cases {
        let e = api
            .error(
                Method::POST,
                "/api/v1/workspaces",
                bearer(),
                spec.into_bytes(),
                400,
            )
            .await;
        assert_eq!(e, want);
    }
    // Nothing was stored by any of them.
    let (status, list) = api
        .call(Method::GET, "/api/v1/workspaces", bearer(), vec![])
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["workspaces"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn too_large_bodies_answer_413_with_the_limit() {
    let api = Api::new();
    let e = api
        .error(
            Method::POST,
            "/api/v1/workspaces",
            bearer(),
            vec![b'a'; 300 * 1024],
            413,
        )
        .await;
    assert_eq!(
        e,
        "request body too large: /api/v1/workspaces accepts at most 262144 bytes (256 KiB)"
    );
    let e = api
        .error(Method::POST, EVENTS_PATH, None, vec![b'{'; 65 * 1024], 413)
        .await;
    assert_eq!(
        e,
        "request body too large: /pilot/v1/events accepts at most 65536 bytes (64 KiB)"
    );
}

#[tokio::test]
async fn bad_query_strings_unknown_routes_and_wrong_methods_answer_json() {
    let api = Api::new();
    let e = api
        .error(
            Method::GET,
            "/api/v1/workspaces/ws-00000000/events?after=soon",
            bearer(),
            vec![],
            400,
        )
        .await;
    assert!(e.contains("query string") && e.contains("after"), "{e}");
    let e = api
        .error(Method::GET, "/api/v2/nothing", bearer(), vec![], 404)
        .await;
    assert_eq!(e, "no such route: GET /api/v2/nothing");
    let e = api
        .error(Method::PUT, "/api/v1/workspaces", bearer(), vec![], 405)
        .await;
    assert!(
        e.starts_with("method PUT is not allowed on /api/v1/workspaces (allowed: ")
            && e.contains("GET")
            && e.contains("POST"),
        "{e}"
    );
    let e = api.error(Method::GET, EVENTS_PATH, None, vec![], 405).await;
    assert!(e.contains("allowed: POST"), "{e}");
    let e = api
        .error(Method::GET, "/api/v1/workspaces", None, vec![], 401)
        .await;
    assert!(e.contains("Bearer"), "{e}");
    let e = api
        .error(
            Method::GET,
            "/api/v1/workspaces/ws-zzzz",
            bearer(),
            vec![],
            404,
        )
        .await;
    assert!(e.contains("ws-zzzz"), "{e}");
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let api = Api::new();
    for auth in [
        "Bearer api-errors-token",
        "bearer api-errors-token",
        "BEARER  api-errors-token ",
    ] {
        let (status, body) = api
            .call(Method::GET, "/api/v1/workspaces", Some(auth), vec![])
            .await;
        assert_eq!(status, 200, "{auth:?}: {body}");
    }
    for auth in ["Basic api-errors-token", "Bearerapi-errors-token", "Bearer"] {
        let e = api
            .error(Method::GET, "/api/v1/workspaces", Some(auth), vec![], 401)
            .await;
        assert!(e.contains("Bearer <token>"), "{auth:?}: {e}");
    }
}

#[tokio::test]
async fn an_urgency_above_the_users_allowance_answers_403_with_both_figures() {
    let api = Api::new();
    let urgent = |u: u8| format!("urgency = {u}\n{SPEC}").into_bytes();
    let e = api
        .error(Method::POST, "/api/v1/workspaces", bearer(), urgent(1), 403)
        .await;
    assert_eq!(
        e,
        "urgency 1 refused: user \"alice\" may ask for urgency up to 0 (max_urgency in the user's [[users]] entry of the coordinator's config; ask its admin)"
    );
    let e = api
        .error(Method::POST, "/api/v1/workspaces", bearer(), urgent(3), 400)
        .await;
    assert!(e.starts_with("urgency: 3 is out of range"), "{e}");
    let (status, list) = api
        .call(Method::GET, "/api/v1/workspaces", bearer(), vec![])
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        list["workspaces"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );

    // Within the allowance: accepted, and the timeline says what it got.
    let bob = format!("Bearer {BOB}");
    let (status, view) = api
        .call(Method::POST, "/api/v1/workspaces", Some(&bob), urgent(2))
        .await;
    assert!((200..300).contains(&status), "{status}: {view}");
    let id = view["id"].as_str().unwrap();
    let (status, page) = api
        .call(
            Method::GET,
            &format!("/api/v1/workspaces/{id}/events"),
            Some(&bob),
            vec![],
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let text = page.to_string();
    // No pool, no node to share (nothing runs): the batch system.
    assert!(
        text.contains("requested by bob; urgency 2, through the batch system")
            && text.contains("urgency 2: no node to share for VM"),
        "{text}"
    );
}
