//! HTTP routes: the client API (bearer tokens, JSON) and the pilot API
//! (HMAC-signed bodies). Handlers only translate between HTTP and the
//! [`Engine`]; every rule lives there. Errors are `{"error": "..."}` with a
//! 4xx status that says whose fault it is: the handlers' own, and (through
//! [`json_errors`] and the fallback) axum's rejections, 404, 405 and 413 too.

use crate::engine::{Caller, Engine, EngineError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::auth::{token_hash, SIGNATURE_HEADER, SLOT_HEADER};
use protocol::pilot::{ErrorBody, EVENTS_PATH, POLL_PATH};
use protocol::spec::WorkspaceSpec;
use protocol::WorkspaceId;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Largest accepted client request body (a spec).
pub const MAX_CLIENT_BODY: usize = 256 * 1024;
/// Largest accepted pilot request body (an event).
pub const MAX_PILOT_BODY: usize = 64 * 1024;

pub type AppState = Arc<Engine>;

pub fn router(engine: Arc<Engine>) -> Router {
    let client = Router::new()
        .route("/api/v1/workspaces", post(create).get(list))
        .route("/api/v1/workspaces/{id}", get(status).delete(destroy))
        .route("/api/v1/workspaces/{id}/events", get(events))
        .route("/api/v1/workspaces/{id}/suspend", post(suspend))
        .route("/api/v1/workspaces/{id}/resume", post(resume))
        .route("/api/v1/workspaces/{id}/renew", post(renew))
        .route("/api/v1/admin/nodes", get(admin_nodes))
        .route("/api/v1/admin/pool", get(admin_pool))
        .route("/api/v1/admin/nodes/{node}/cleaned", post(node_cleaned))
        .layer(DefaultBodyLimit::max(MAX_CLIENT_BODY));
    let pilot = Router::new()
        .route(EVENTS_PATH, post(pilot_event))
        .route(POLL_PATH, post(pilot_poll))
        .layer(DefaultBodyLimit::max(MAX_PILOT_BODY));
    let routes = Router::new()
        .merge(client)
        .merge(pilot)
        .route("/healthz", get(crate::health::healthz))
        .route("/metrics", get(metrics))
        .route("/status", get(crate::status_page::page))
        .fallback(unknown_route)
        // Inside the routes, where the matched route is known (the outer
        // router below has none: every request would be "unmatched").
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            crate::server::observe_http,
        ))
        .with_state(engine);
    // Outside the routes, so it sees their final answers (axum adds a 405's
    // `Allow` header after any layer on the routes has run).
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(json_errors))
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such route: {method} {}", uri.path()),
    )
}

/// Gives every error answer the documented body `{"error": "..."}`: axum
/// answers some requests before any handler runs (body too large, a query
/// string or path that does not parse, a method a route does not have) with
/// plain text or nothing. Answers that already are JSON pass unchanged.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // axum's rejection texts are one short line; a body that is not text
    // or too long is replaced by the status' reason.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error");
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            let limit = if path.starts_with("/pilot/") {
                MAX_PILOT_BODY
            } else {
                MAX_CLIENT_BODY
            };
            format!(
                "request body too large: {path} accepts at most {limit} bytes ({} KiB)",
                limit / 1024
            )
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            format!("method {method} is not allowed on {path} (allowed: {allowed})")
        }
        _ if text.is_empty() => reason.to_lowercase(),
        _ => text,
    };
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// An error as the client sees it.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::BadSpec(_) | EngineError::BadRequest(_) => StatusCode::BAD_REQUEST,
            EngineError::DoesNotFit(_)
            | EngineError::Network(_)
            | EngineError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            EngineError::NotFound(_) => StatusCode::NOT_FOUND,
            EngineError::Forbidden(_) | EngineError::OverLimit(_) => StatusCode::FORBIDDEN,
            EngineError::Duplicate { .. } | EngineError::Conflict(_) | EngineError::Refused(_) => {
                StatusCode::CONFLICT
            }
            EngineError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            EngineError::Submit { .. } => StatusCode::BAD_GATEWAY,
            EngineError::Store(_) | EngineError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            // The pilot resends; if the event was stored meanwhile it gets 409.
            EngineError::Writer(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        ApiError(status, e.to_string())
    }
}

/// The caller, or 401. A refusal is logged (why, never the token; the
/// request's span names the peer and route) and counted.
fn caller(engine: &Engine, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let found = bearer_caller(engine, headers);
    if let Err(ApiError(_, why)) = &found {
        engine.metrics.failed_logins.inc();
        tracing::warn!(reason = %why, "failed login");
    }
    found
}

fn bearer_caller(engine: &Engine, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_string());
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?
        .to_str()
        .map_err(|_| unauthorized("Authorization header is not text"))?;
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let token = value
        .trim()
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| unauthorized("Authorization must be \"Bearer <token>\""))?;
    let hash = token_hash(token);
    engine
        .users()
        .by_token_hash(&hash)
        .map(|u| Caller {
            user: u.name,
            admin: u.admin,
        })
        .ok_or_else(|| unauthorized("unknown token"))
}

fn parse_ws_id(id: &str) -> Result<WorkspaceId, ApiError> {
    WorkspaceId::parse(id).map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))
}

/// The header a client sends with a create it may retry (its value names the
/// request; see `Engine::create_idempotent`).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set (to `true`) on the answer to a retried create.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

async fn create(
    State(engine): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "spec is not UTF-8 text".into()))?;
    let spec = WorkspaceSpec::parse(text).map_err(EngineError::from)?;
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key header is not visible ASCII".into(),
            )
        })?),
    };
    let created = match key {
        None => engine.create(&who, spec).await.map(|v| (v, false)),
        Some(key) => engine.create_idempotent(&who, spec, key).await,
    };
    match created {
        Ok((view, false)) => Ok((StatusCode::CREATED, Json(view)).into_response()),
        // A retry gets what the first request made: 200 and the header saying so.
        Ok((view, true)) => {
            Ok((StatusCode::OK, [(IDEMPOTENT_REPLAYED, "true")], Json(view)).into_response())
        }
        // A refused guaranteed lease: the earliest start also as a field, for scripts.
        Err(EngineError::Refused(r)) => Ok((
            StatusCode::CONFLICT,
            Json(serde_json::json!({
                "error": r.to_string(),
                "earliest_start": r.earliest_ms.map(|ms| protocol::spec::Start::At(ms).to_string()),
            })),
        )
            .into_response()),
        Err(e) => Err(e.into()),
    }
}

async fn list(State(engine): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    let workspaces = engine.list(&who)?;
    Ok(Json(protocol::view::WorkspaceList { workspaces }).into_response())
}

async fn status(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.get(&who, &parse_ws_id(&id)?)?).into_response())
}

async fn destroy(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.destroy(&who, &parse_ws_id(&id)?)?).into_response())
}

async fn suspend(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.suspend(&who, &parse_ws_id(&id)?)?).into_response())
}

async fn resume(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.resume(&who, &parse_ws_id(&id)?).await?).into_response())
}

async fn renew(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    let id = parse_ws_id(&id)?;
    let req: protocol::view::RenewRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("renew body must be {{\"by_s\": <seconds>}}: {e}"),
        )
    })?;
    Ok(Json(engine.renew(&who, &id, req.by_s)?).into_response())
}

async fn admin_nodes(
    State(engine): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.cluster_view(&who)?).into_response())
}

async fn admin_pool(
    State(engine): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.pool_view(&who)?).into_response())
}

async fn node_cleaned(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    Ok(Json(engine.node_cleaned(&who, &node)?).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait_ms: u64,
}

async fn events(
    State(engine): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let who = caller(&engine, &headers)?;
    let page = engine
        .events(
            &who,
            &parse_ws_id(&id)?,
            q.after,
            Duration::from_millis(q.wait_ms),
        )
        .await?;
    Ok(Json(page).into_response())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn pilot_event(State(engine): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let outcome = engine
        .pilot_event_async(
            header(&headers, SLOT_HEADER),
            header(&headers, SIGNATURE_HEADER),
            &body,
        )
        .await;
    match outcome {
        Ok(ack) => Json(ack).into_response(),
        Err(EngineError::Duplicate { pilot, seq }) => {
            // The body is both an EventAck (a pilot resending after a lost ack
            // takes it as acknowledged) and an error message for anyone else.
            let error = EngineError::Duplicate { pilot, seq }.to_string();
            let body = serde_json::json!({ "seq": seq, "duplicate": true, "error": error });
            (StatusCode::CONFLICT, Json(body)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "pilot event refused");
            ApiError::from(e).into_response()
        }
    }
}

async fn pilot_poll(
    State(engine): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let answer = engine
        .pilot_poll(
            header(&headers, SLOT_HEADER),
            header(&headers, SIGNATURE_HEADER),
            &body,
        )
        .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer.0,
    )
        .into_response())
}

async fn metrics(State(engine): State<AppState>) -> Response {
    let states = engine.state_counts().unwrap_or_default();
    if let Err(e) = engine.update_gauges() {
        tracing::warn!(error = %e, "reading slot and node counts for /metrics");
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        engine.metrics.render(&states),
    )
        .into_response()
}
