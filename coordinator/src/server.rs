//! Starting, reloading and stopping a coordinator: engine, housekeeping
//! loop, HTTP server (with its request metrics and log span). Used by
//! `workspace-coordinator serve` and by `demo`.

use crate::config::{Config, ConfigError};
use crate::engine::{Engine, EngineError};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use lrm_adapters::{LrmError, LrmKind};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The cause (e.g. "Address already in use") is the source, printed once by the chain.
    #[error("listening on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("batch system adapter")]
    Lrm(#[from] LrmError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("preparing simulated node {node}: {message}")]
    SimNode { node: String, message: String },
}

/// A running coordinator.
pub struct Running {
    pub engine: Arc<Engine>,
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:8750`.
    pub url: String,
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    tls_handle: Option<axum_server::Handle<std::net::SocketAddr>>,
    ticks: JoinHandle<()>,
}

impl ServerError {
    /// True when the config is at fault (`serve` then exits 2): the batch
    /// system adapter refused its settings, or the TLS files.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ServerError::Lrm(LrmError::Config { .. }) | ServerError::Tls(_)
        )
    }
}

impl Running {
    /// Stops serving and ends the batch system adapter's own work: the
    /// local batch system ends its jobs (the demo, tests, and `serve
    /// --end-leases-on-exit` after every lease ended); real ones keep theirs.
    pub async fn stop(self) {
        self.stop_serving().await;
        self.engine.shutdown().await;
        info!("coordinator stopped");
    }

    /// Stops serving and leaves every pilot job running, on the local batch
    /// system too (its job table is on disk): the next coordinator on the
    /// same `data_dir` adopts the jobs, and the pilots, which keep retrying,
    /// report to it. What `serve` does on SIGTERM.
    pub async fn stop_leaving_leases(self) {
        self.stop_serving().await;
        info!("coordinator stopped; running leases stay with their pilots");
    }

    async fn stop_serving(&self) {
        let _ = self.stop.send(true);
        if let Some(h) = &self.tls_handle {
            h.graceful_shutdown(Some(Duration::from_secs(2)));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.http.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.http.is_finished() {
            // Long-polls and slow clients: cut them rather than wait.
            self.http.abort();
        }
        while !self.ticks.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Resolves when a stop was requested.
    pub fn stop_handle(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Connections the kernel may queue before we accept them. Every pilot of a
/// big slot connects within milliseconds; with tokio's default (1024) the
/// queue overflowed at a few hundred nodes and dropped SYNs cost each pilot
/// a TCP retransmission (1 s, then 3 s). The kernel caps it at somaxconn.
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds `addr` with a deep accept queue.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "address resolves to nothing",
        )
    }))
}

/// Binds `cfg.listen` (or uses `listener`), starts the engine and serves.
pub async fn start(
    cfg: Config,
    listener: Option<tokio::net::TcpListener>,
) -> Result<Running, ServerError> {
    let listener = match listener {
        Some(l) => l,
        None => bind(&cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen.clone(),
                source,
            })?,
    };
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let public_url = cfg.public_url.clone().unwrap_or_else(|| url.clone());
    if cfg.lrm == LrmKind::Local && cfg.pilot.hypervisor == crate::config::Hypervisor::Sim {
        prepare_sim_nodes(&cfg).await?;
    }
    let metrics = crate::metrics::Metrics::new();
    let lrm = crate::lrm_meter::MeteredLrm::wrap(
        lrm_adapters::build(cfg.lrm, &cfg.lrm_settings())?,
        &metrics,
    );
    // The grace pilots get must not exceed what the batch system allows.
    match lrm.check_grace().await {
        Ok(Some(site)) => {
            if let Some(g) = cfg.pilot.grace_s.filter(|g| *g > site.as_secs()) {
                return Err(ServerError::Lrm(LrmError::Config {
                    lrm: lrm.kind(),
                    message: format!(
                        "pilot.grace_s = {g} but the batch system kills {} s after its warning signal",
                        site.as_secs()
                    ),
                }));
            }
            info!(
                lrm = lrm.kind(),
                site_grace_s = site.as_secs(),
                "grace period checked against the batch system"
            );
        }
        Ok(None) => {}
        Err(e @ LrmError::Config { .. }) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(lrm = lrm.kind(), error = %e, "could not check the grace period against the batch system")
        }
    }
    let engine = Engine::with_metrics(cfg, lrm, public_url.clone(), metrics)?;
    let (stop, stop_rx) = watch::channel(false);
    let app =
        crate::api::router(engine.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let (http, tls_handle) = match &engine.config().tls {
        None => {
            let mut http_stop = stop_rx.clone();
            let http = tokio::spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            });
            (http, None)
        }
        Some(tls) => {
            // ring is the crypto provider (no C toolchain needed); ignore "already installed".
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rustls_cfg =
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
                    .await
                    .map_err(|e| {
                        ServerError::Tls(format!(
                            "cert {} / key {}: {e}",
                            tls.cert.display(),
                            tls.key.display()
                        ))
                    })?;
            let std_listener = listener.into_std().map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
            let handle = axum_server::Handle::new();
            let server = axum_server::from_tcp_rustls(std_listener, rustls_cfg)
                .map_err(|source| ServerError::Bind {
                    addr: addr.to_string(),
                    source,
                })?
                .handle(handle.clone());
            let http = tokio::spawn(async move {
                if let Err(e) = server.serve(app).await {
                    tracing::error!(error = %e, "HTTPS server failed");
                }
            });
            (http, Some(handle))
        }
    };
    let ticks = tokio::spawn(engine.clone().run_ticks(stop_rx));
    // Scripts and tests that listen on port 0 read the real address here.
    let url_file = engine.config().data_dir.join("coordinator.url");
    if let Err(e) = std::fs::write(&url_file, format!("{url}\n")) {
        tracing::warn!(path = %url_file.display(), error = %e, "could not write the URL file");
    }
    info!(%url, %public_url, lrm = engine.lrm().kind(), "coordinator listening");
    Ok(Running {
        engine,
        url,
        stop,
        http,
        ticks,
        tls_handle,
    })
}

/// Every HTTP request: counted by route and status, timed, and run inside a
/// span naming the peer, method and route, so that every log line of the
/// request (a failed login, an error) says who asked for what.
pub(crate) async fn observe_http(
    State(engine): State<Arc<Engine>>,
    req: Request,
    next: Next,
) -> Response {
    let t = Instant::now();
    // The declared route, never the raw path: ids and junk paths would
    // each make a new label.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let span = tracing::info_span!("http", %peer, method, route = %route);
    let resp = next.run(req).instrument(span).await;
    engine
        .metrics
        .http(method, &route, resp.status().as_u16(), t.elapsed());
    resp
}

/// Re-reads the config file (SIGHUP): the users and their tokens change at
/// once; any other change is named in the answer and waits for a restart.
/// A config that does not validate changes nothing.
pub fn reload(engine: &Engine, path: &Path) -> Result<Reloaded, ConfigError> {
    let new = Config::load(path)?;
    if new.users.is_empty() {
        return Err(ConfigError::Invalid(
            "no [[users]]: nobody could use the API; the old users stay".into(),
        ));
    }
    let old = engine.config();
    let section = |c: &Config| -> toml::Table {
        let mut t = toml::Table::try_from(c).unwrap_or_default();
        t.remove("users");
        t
    };
    let (was, now) = (section(old), section(&new));
    let mut needs_restart: Vec<String> = now
        .iter()
        .filter(|(k, v)| was.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(was.keys().filter(|k| !now.contains_key(*k)).cloned())
        .collect();
    needs_restart.sort();
    needs_restart.dedup();
    let before = engine.users().current();
    let names =
        |us: &[crate::config::User]| -> Vec<String> { us.iter().map(|u| u.name.clone()).collect() };
    let added: Vec<String> = names(&new.users)
        .into_iter()
        .filter(|n| !before.iter().any(|u| &u.name == n))
        .collect();
    let removed: Vec<String> = names(&before)
        .into_iter()
        .filter(|n| !new.users.iter().any(|u| &u.name == n))
        .collect();
    let users = new.users.len();
    engine.users().replace(new.users);
    Ok(Reloaded {
        users,
        added,
        removed,
        needs_restart,
    })
}

/// What a reload changed.
#[derive(Debug)]
pub struct Reloaded {
    pub users: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Top-level keys or sections that differ but only take effect on restart.
    pub needs_restart: Vec<String>,
}

/// For `lrm = "local"` with `hypervisor = "sim"`: creates each virtual node's
/// simulated hypervisor (sized like the local batch system's nodes) if missing.
async fn prepare_sim_nodes(cfg: &Config) -> Result<(), ServerError> {
    let program = cfg.pilot_program();
    for i in 1..=cfg.local.nodes {
        let node = format!("{}{}", cfg.local.node_prefix, i);
        let dir = cfg.pilot.sim_dir.replace("%n", &node);
        let state = cfg.pilot.state_dir.replace("%n", &node);
        let err = |message: String| ServerError::SimNode {
            node: node.clone(),
            message,
        };
        std::fs::create_dir_all(&state).map_err(|e| err(format!("creating {state}: {e}")))?;
        if std::path::Path::new(&dir).join("node.json").exists() {
            continue;
        }
        let args: Vec<String> = vec![
            "sim".into(),
            "init".into(),
            "--dir".into(),
            dir.clone(),
            "--memory-mb".into(),
            cfg.local.memory_mb_per_node.to_string(),
            "--cpus".into(),
            cfg.local.cores_per_node.to_string(),
        ];
        let out = lrm_adapters::command::run(&program, &args, None, Duration::from_secs(10))
            .await
            .map_err(|e| err(e.to_string()))?;
        lrm_adapters::command::check(out).map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}
