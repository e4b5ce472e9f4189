//! The read-only status page (`GET /status`): one HTML file with a little
//! JavaScript that reads `GET /api/v1/admin/nodes` with an admin token and
//! shows nodes, slots, queue reasons and nodes that need kill-all. No build
//! toolchain: the file is compiled into the binary as it is.
//!
//! The page itself holds no data, so it is served without a token; the
//! token is given in the address fragment (`/status#token=...`, which the
//! browser never sends) or typed into the page, and kept for the tab only.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("status.html");

/// Only this page's own inline script and style, and requests to its own origin.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
}
