//! A small typed client for the coordinator's HTTP API, used by the
//! `workspace` CLI and the demo, and the client's own config file
//! (`~/.config/workspace/config.toml`). Every request has a timeout; ids are
//! checked before they go into a URL, and percent-encoded when they do.
//!
//! Not here: printing (the `workspace` binary) or any rule of the API.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use protocol::pilot::ErrorBody;
use protocol::view::{EventsPage, WorkspaceList, WorkspaceView};
use protocol::WorkspaceId;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest wait for one answer (a long-poll asks for less).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    BadId(#[from] protocol::ids::IdError),
    /// `cause` is the root cause in words (the transport's chain repeats itself).
    #[error("cannot reach the coordinator at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("coordinator answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(String),
    #[error("CA file: {0}")]
    Ca(String),
}

impl ClientError {
    /// HTTP status of a refusal, if that is what this is.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What the user can do about it, when there is something.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::Unreachable { cause, .. } if cause.contains("certificate") => Some(
                "the coordinator's certificate is not trusted here: give its CA with --ca-file, WORKSPACE_CA_FILE, or ca_file in ~/.config/workspace/config.toml",
            ),
            ClientError::BadUrl { .. } | ClientError::Unreachable { .. } => Some(
                "set the coordinator's address with WORKSPACE_URL, --url, or url in ~/.config/workspace/config.toml (e.g. http://head.example.org:8750)",
            ),
            ClientError::Refused { status: 401, .. } => Some(
                "check your token: WORKSPACE_TOKEN, --token, or token in ~/.config/workspace/config.toml (your site's admin makes one with `workspace-coordinator token`)",
            ),
            ClientError::Refused { status, .. } if *status >= 500 => {
                Some("the coordinator failed to answer; try again, and tell its admin if it persists")
            }
            ClientError::BadId(_) => {
                Some("workspace ids look like ws-1a2b3c4d; `workspace list` shows yours")
            }
            _ => None,
        }
    }

    /// True for errors of the user's input (exit 2), not of the coordinator.
    pub fn is_usage(&self) -> bool {
        matches!(self, ClientError::BadUrl { .. } | ClientError::BadId(_))
    }
}

/// The root cause of a transport error, in words: reqwest's own message
/// ("error sending request for url (...)") says nothing the caller does not
/// know, its innermost source says what happened.
fn transport_cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("no answer within {} s", REQUEST_TIMEOUT.as_secs());
    }
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    root.to_string()
}

/// The header that makes a create repeatable (`Idempotency-Key`).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A fresh idempotency key: 128 random bits, in hex.
pub fn new_idempotency_key() -> String {
    format!("wsk-{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// Characters kept as they are in a path segment; everything else is
/// percent-encoded, `/` and `.` included.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// A workspace id checked, as it goes into a URL path.
fn id_segment(id: &str) -> Result<String, ClientError> {
    let id = WorkspaceId::parse(id)?;
    Ok(utf8_percent_encode(id.as_str(), SEGMENT).to_string())
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Result<Self, ClientError> {
        Self::with_ca(base, token, None)
    }

    /// A client that trusts only `ca_pem` (PEM) for an https coordinator.
    pub fn with_ca(base: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: base.to_string(),
            reason: reason.to_string(),
        };
        let url = url::Url::parse(base).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("must start with http:// or https://"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientError::Ca(transport_cause(&e)))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Ca(transport_cause(&e)))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        })
    }

    /// The coordinator's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            cause: transport_cause(&e),
        };
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn workspace_url(&self, id: &str, tail: &str) -> Result<String, ClientError> {
        Ok(format!(
            "{}/api/v1/workspaces/{}{tail}",
            self.base,
            id_segment(id)?
        ))
    }

    /// Creates a workspace from a spec (TOML or JSON text).
    pub async fn create(&self, spec_text: &str) -> Result<WorkspaceView, ClientError> {
        self.send(self.create_request(spec_text)).await
    }

    /// Creates a workspace under an idempotency key (see [`new_idempotency_key`]):
    /// sending it again with the same key and spec answers with the
    /// workspace the first one made, so a create whose answer was lost can
    /// be repeated safely.
    pub async fn create_keyed(
        &self,
        spec_text: &str,
        key: &str,
    ) -> Result<WorkspaceView, ClientError> {
        self.send(self.create_request(spec_text).header(IDEMPOTENCY_KEY, key))
            .await
    }

    /// [`Client::create_keyed`], repeated with the same key while the
    /// coordinator cannot be reached (down, restarting, or the answer lost
    /// on the way), with backoff from 0.5 s to 5 s, until `retry_for` has
    /// passed. `on_retry` hears each failure before the next try. A refusal
    /// is final: it is the coordinator's answer.
    pub async fn create_retrying(
        &self,
        spec_text: &str,
        key: &str,
        retry_for: Duration,
        mut on_retry: impl FnMut(&ClientError, Duration),
    ) -> Result<WorkspaceView, ClientError> {
        let end = tokio::time::Instant::now() + retry_for;
        let mut pause = Duration::from_millis(500);
        loop {
            match self.create_keyed(spec_text, key).await {
                Err(e @ ClientError::Unreachable { .. }) => {
                    let left = end.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    on_retry(&e, left);
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    fn create_request(&self, spec_text: &str) -> reqwest::RequestBuilder {
        let ct = if spec_text.trim_start().starts_with('{') {
            "application/json"
        } else {
            "application/toml"
        };
        self.http
            .post(format!("{}/api/v1/workspaces", self.base))
            .header(reqwest::header::CONTENT_TYPE, ct)
            .body(spec_text.to_string())
    }

    pub async fn get(&self, id: &str) -> Result<WorkspaceView, ClientError> {
        self.send(self.http.get(self.workspace_url(id, "")?)).await
    }

    pub async fn list(&self) -> Result<WorkspaceList, ClientError> {
        self.send(self.http.get(format!("{}/api/v1/workspaces", self.base)))
            .await
    }

    pub async fn destroy(&self, id: &str) -> Result<WorkspaceView, ClientError> {
        self.send(self.http.delete(self.workspace_url(id, "")?))
            .await
    }

    /// `POST .../suspend`: save every VM; the workspace waits suspended.
    pub async fn suspend(&self, id: &str) -> Result<WorkspaceView, ClientError> {
        self.send(self.http.post(self.workspace_url(id, "/suspend")?))
            .await
    }

    /// `POST .../resume`: new slots, every VM restored from its checkpoint.
    pub async fn resume(&self, id: &str) -> Result<WorkspaceView, ClientError> {
        self.send(self.http.post(self.workspace_url(id, "/resume")?))
            .await
    }

    /// Renews a running lease by `by` (whole seconds).
    pub async fn renew(&self, id: &str, by: Duration) -> Result<WorkspaceView, ClientError> {
        let body = protocol::view::RenewRequest { by_s: by.as_secs() };
        self.send(
            self.http
                .post(self.workspace_url(id, "/renew")?)
                .json(&body),
        )
        .await
    }

    /// The admin's view of the cluster (admin token only).
    pub async fn cluster(&self) -> Result<protocol::admin::ClusterView, ClientError> {
        self.send(self.http.get(format!("{}/api/v1/admin/nodes", self.base)))
            .await
    }

    /// The slot pool: each slot, its node, state, idle time, walltime left
    /// and lease (admin token only).
    pub async fn pool(&self) -> Result<crate::engine::pool::PoolView, ClientError> {
        self.send(self.http.get(format!("{}/api/v1/admin/pool", self.base)))
            .await
    }

    /// Tells the coordinator that kill-all cleaned `node` (admin token only).
    pub async fn node_cleaned(
        &self,
        node: &str,
    ) -> Result<protocol::admin::CleanedAnswer, ClientError> {
        let node = utf8_percent_encode(node, SEGMENT);
        self.send(
            self.http
                .post(format!("{}/api/v1/admin/nodes/{node}/cleaned", self.base)),
        )
        .await
    }

    /// Timeline entries after `after`, waiting up to `wait` for new ones.
    pub async fn events(
        &self,
        id: &str,
        after: u64,
        wait: Duration,
    ) -> Result<EventsPage, ClientError> {
        self.send(
            self.http
                .get(self.workspace_url(id, "/events")?)
                .query(&[("after", after), ("wait_ms", wait.as_millis() as u64)]),
        )
        .await
    }
}

/// The client's config file: what `WORKSPACE_URL`, `WORKSPACE_TOKEN` and
/// `WORKSPACE_CA_FILE` would say. Flags win over the environment, the
/// environment over the file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub url: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl ClientConfig {
    /// `$XDG_CONFIG_HOME/workspace/config.toml`, else
    /// `~/.config/workspace/config.toml`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("workspace").join("config.toml"))
    }

    /// Reads `path`; a missing file is `Ok(None)` unless `required`.
    pub fn load(path: &Path, required: bool) -> Result<Option<Self>, ClientConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
            Err(source) => {
                return Err(ClientConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| ClientConfigError::Parse {
                path: path.into(),
                message: e.to_string(),
            })
    }

    /// True when a file holding a token can be read by others than its owner.
    pub fn readable_by_others(path: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ids_are_checked_before_they_reach_a_url() {
        let c = Client::new("http://127.0.0.1:9", "t").unwrap();
        for bad in [
            "../../etc/passwd",
            "ws-1a2b3c4d/../x",
            "ws-1A2B3C4D",
            "",
            "ws-%2e%2e",
        ] {
            let e = c.get(bad).await.unwrap_err();
            assert!(matches!(e, ClientError::BadId(_)), "{bad}: {e}");
            assert!(e.is_usage());
            assert!(e.to_string().contains("invalid workspace id"), "{e}");
        }
        assert_eq!(id_segment("ws-1a2b3c4d").unwrap(), "ws-1a2b3c4d");
    }

    #[test]
    fn a_url_that_is_not_one_is_named_with_the_fix() {
        for bad in ["not-a-url", "head:8750/x", "ftp://head", "http://"] {
            let e = Client::new(bad, "t").err().expect(bad);
            assert!(matches!(e, ClientError::BadUrl { .. }), "{bad}: {e}");
            assert!(e.hint().unwrap().contains("WORKSPACE_URL"));
        }
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_said_once_with_its_root_cause() {
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("http://127.0.0.1:{port}"), "t").unwrap();
        let e = c.list().await.unwrap_err();
        let text = crate::report::one_line(&e);
        assert!(
            text.starts_with("cannot reach the coordinator at http://127.0.0.1:"),
            "{text}"
        );
        assert!(text.to_lowercase().contains("connection refused"), "{text}");
        assert!(!text.contains("error sending request"), "{text}");
        assert!(e.hint().unwrap().contains("WORKSPACE_URL"));
    }

    #[test]
    fn the_config_file_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        assert_eq!(ClientConfig::load(&p, false).unwrap(), None);
        assert!(ClientConfig::load(&p, true).is_err());
        std::fs::write(&p, "url = \"http://h:1\"\ntoken = \"t\"\n").unwrap();
        let c = ClientConfig::load(&p, false).unwrap().unwrap();
        assert_eq!(c.url.as_deref(), Some("http://h:1"));
        std::fs::write(&p, "ulr = \"http://h:1\"\n").unwrap();
        let e = ClientConfig::load(&p, false).unwrap_err().to_string();
        assert!(e.contains("ulr"), "{e}");
    }
}
