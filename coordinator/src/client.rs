//! A small typed client for the coordinator's HTTP API, used by the
//! `workspace` CLI and the demo. Every request has a timeout.

use protocol::pilot::ErrorBody;
use protocol::view::{EventsPage, WorkspaceList, WorkspaceView};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator at {url} unreachable: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("coordinator answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the coordinator: {0}")]
    Decode(String),
}

impl ClientError {
    /// HTTP status of a refusal, if that is what this is.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
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
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| ClientError::Decode(format!("CA file: {e}")))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca);
        }
        let http = builder.build().map_err(|source| ClientError::Unreachable {
            url: base.to_string(),
            source,
        })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
        })
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Creates a workspace from a spec (TOML or JSON text).
    pub async fn create(&self, spec_text: &str) -> Result<WorkspaceView, ClientError> {
        let ct = if spec_text.trim_start().starts_with('{') {
            "application/json"
        } else {
            "application/toml"
        };
        self.send(
            self.http
                .post(format!("{}/api/v1/workspaces", self.base))
                .header(reqwest::header::CONTENT_TYPE, ct)
                .body(spec_text.to_string()),
        )
        .await
    }

    pub async fn get(&self, id: &str) -> Result<WorkspaceView, ClientError> {
        self.send(
            self.http
                .get(format!("{}/api/v1/workspaces/{id}", self.base)),
        )
        .await
    }

    pub async fn list(&self) -> Result<WorkspaceList, ClientError> {
        self.send(self.http.get(format!("{}/api/v1/workspaces", self.base)))
            .await
    }

    pub async fn destroy(&self, id: &str) -> Result<WorkspaceView, ClientError> {
        self.send(
            self.http
                .delete(format!("{}/api/v1/workspaces/{id}", self.base)),
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
                .get(format!("{}/api/v1/workspaces/{id}/events", self.base))
                .query(&[("after", after), ("wait_ms", wait.as_millis() as u64)]),
        )
        .await
    }
}
