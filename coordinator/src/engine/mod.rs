//! The coordinator's core: turns client requests, pilot events and timer
//! ticks into state changes (through the tables in [`crate::lifecycle`]),
//! commands for pilots, and batch job submissions and cancels.
//!
//! One module per seam: `client` (the client API), `signed` (the pilot API
//! over HTTP), `ingest` (pilot events, one handler per kind), `reconcile`
//! (timers: expiry, silence, cancels, the batch-system backstop), `rules`
//! (what each change implies) and `views` (what is read). This file holds
//! the [`Engine`] itself: its parts, its errors, and opening it.
//!
//! Every change is one SQLite transaction, committed before anyone is
//! answered; pilot events share theirs (group commit, one savepoint per
//! event, see [`crate::writer`]). LRM calls happen outside the database lock; a cancel that fails
//! stays flagged in the database and is retried by the tick until it works.

mod admin;
mod client;
mod ingest;
mod order;
pub mod pool;
mod reconcile;
mod renew;
mod reserve;
#[cfg(test)]
mod rule_tests;
mod rules;
mod signed;
pub mod suspend;
mod urgent;
mod views;

pub use reserve::Refusal;
pub use signed::PollAnswer;

use crate::clock::{Clock, WallClock};
use crate::config::Config;
use crate::network::{NetError, Pools};
use crate::policy::{ExactFit, FitError, Policy};
use crate::store::{self, Store, StoreError};
use crate::writer::{Writer, WriterError};
pub use ingest::{Incoming, Outcome};
use lrm_adapters::{Capacity, Lrm, LrmError};
use protocol::spec::SpecError;
use protocol::{SlotId, WorkspaceId};
use reconcile::fail_unsubmitted;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Longest a long-poll (pilot commands, client events) is held open.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    BadSpec(#[from] SpecError),
    #[error("workspace does not fit this cluster: {0}")]
    DoesNotFit(#[from] FitError),
    /// No addresses for the workspace (pool exhausted, no public pool).
    #[error("{0}")]
    Network(#[from] NetError),
    /// A reservation or immediate lease the batch system cannot guarantee.
    #[error("{0}")]
    Refused(reserve::Refusal),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    /// A request that cannot be done as asked (answered 422), saying why.
    #[error("{0}")]
    Unprocessable(String),
    /// The request does not fit the thing's state (answered 409).
    #[error("{0}")]
    Conflict(String),
    /// Over one of the caller's limits (`[[users]]`): refused, nothing stored.
    #[error("{0}")]
    OverLimit(#[from] crate::limits::OverLimit),
    /// A create's idempotency key came back with another spec.
    #[error("{0}")]
    KeyReused(String),
    #[error("replayed event: pilot {pilot} seq {seq} was already received")]
    Duplicate { pilot: String, seq: u64 },
    #[error("batch system refused the pilot job for workspace {workspace}: {source}")]
    Submit {
        workspace: WorkspaceId,
        source: LrmError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The event writer could not take or confirm the event (answered 503).
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Who is calling the client API.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: String,
    pub admin: bool,
}

impl Caller {
    fn owner_filter(&self) -> Option<&str> {
        if self.admin {
            None
        } else {
            Some(&self.user)
        }
    }
}

/// How an engine is put together besides its config: the server takes the
/// defaults (wall clock, exact fit, the database file); the simulator and the
/// rule tests bring a virtual clock, and the simulator a database in memory.
pub struct Parts {
    /// Where the rules and timers take the time from.
    pub clock: Arc<dyn Clock>,
    /// Sizing and placement.
    pub policy: Arc<dyn Policy>,
    /// Keep the database in memory instead of `data_dir/coordinator.db`.
    pub in_memory: bool,
    /// Where the engine records its metrics (the server's batch-system
    /// meter shares these handles, so it is made before the engine).
    pub metrics: crate::metrics::Metrics,
}

impl Default for Parts {
    fn default() -> Self {
        Self {
            clock: Arc::new(WallClock),
            policy: Arc::new(ExactFit),
            in_memory: false,
            metrics: crate::metrics::Metrics::new(),
        }
    }
}

pub struct Engine {
    store: Mutex<Store>,
    clock: Arc<dyn Clock>,
    policy: Arc<dyn Policy>,
    /// Pilot events go through here: one thread stores them in group commits.
    writer: Writer<Incoming, Outcome>,
    lrm: Arc<dyn Lrm>,
    cfg: Config,
    master: Vec<u8>,
    capacity: Capacity,
    grace: Duration,
    public_url: String,
    pilot_program: PathBuf,
    changed: watch::Sender<u64>,
    /// Pilots' command long-polls, by (slot, node). Only the pilot a command
    /// is for is woken: with one shared signal, queueing N launches woke N
    /// polls N times over, each taking the store lock.
    pollers: Mutex<HashMap<(SlotId, String), Arc<Notify>>>,
    /// `store::commands_pushed()` when commands were last looked for.
    commands_seen: AtomicU64,
    /// Row id of the newest command whose pilot was woken.
    commands_woken: AtomicI64,
    kick: Notify,
    /// When each owed cancel was last tried (clock ms): retried after a second.
    cancel_attempts: Mutex<HashMap<SlotId, u64>>,
    /// Address pools of `[network]` (parsed once; the config was validated).
    pools: Pools,
    /// When this coordinator process started (pilot silence counts from here at the earliest).
    started_ms: u64,
    /// Who may call the client API; replaced on SIGHUP (`config.users` is the start value).
    users: crate::config::Users,
    /// Why each waiting slot's batch job waits, from the last status poll.
    queue_reasons: Mutex<HashMap<SlotId, String>>,
    /// Timeline rowid up to which lease durations were observed (metrics).
    durations_seen: AtomicI64,
    /// The slot pool's memory between ticks (its state is in the database).
    pool: pool::PoolRuntime,
    pub metrics: crate::metrics::Metrics,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Io { what, source }
}

/// Reads the master secret from `<data_dir>/master.key`, creating it (mode 0600) if missing.
fn load_master(data_dir: &Path) -> Result<Vec<u8>, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("master.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim()).map_err(|e| EngineError::Io {
            what: format!("master key {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = protocol::auth::generate_master_secret();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(format!("creating {}", path.display())))?;
            std::io::Write::write_all(&mut f, format!("{}\n", hex::encode(&key)).as_bytes())
                .map_err(io(format!("writing {}", path.display())))?;
            Ok(key)
        }
        Err(e) => Err(EngineError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

fn mkdir_private(path: &Path) -> Result<(), EngineError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(format!("creating {}", path.display())))
}

impl Engine {
    /// Opens the database and keys under `cfg.data_dir`; `public_url` is what pilots use.
    pub fn new(
        cfg: Config,
        lrm: Arc<dyn Lrm>,
        public_url: String,
    ) -> Result<Arc<Self>, EngineError> {
        Self::with_parts(cfg, lrm, public_url, Parts::default())
    }

    /// [`Engine::new`] recording into `metrics`.
    pub fn with_metrics(
        cfg: Config,
        lrm: Arc<dyn Lrm>,
        public_url: String,
        metrics: crate::metrics::Metrics,
    ) -> Result<Arc<Self>, EngineError> {
        Self::with_parts(
            cfg,
            lrm,
            public_url,
            Parts {
                metrics,
                ..Parts::default()
            },
        )
    }

    /// As [`Engine::new`], with the clock, policy and database given.
    pub fn with_parts(
        cfg: Config,
        lrm: Arc<dyn Lrm>,
        public_url: String,
        parts: Parts,
    ) -> Result<Arc<Self>, EngineError> {
        mkdir_private(&cfg.data_dir)?;
        mkdir_private(&cfg.data_dir.join("keys"))?;
        mkdir_private(&cfg.data_dir.join("jobs"))?;
        let store = if parts.in_memory {
            Store::open_in_memory()?
        } else {
            Store::open(&cfg.data_dir.join("coordinator.db"))?
        };
        let clock = parts.clock;
        if cfg.reservations.best_effort_order == crate::config::BestEffortOrder::LargestFirst
            && !lrm.queues_by_size()
        {
            return Err(EngineError::BadRequest(format!(
                "reservations.best_effort_order = \"largest_first\": the {} batch system adapter cannot order its queue by size (the local one can); leave it \"arrival\"",
                lrm.kind()
            )));
        }
        lrm.check_batch_priority(cfg.urgency.batch_priority)
            .map_err(|m| {
                EngineError::BadRequest(format!(
                    "urgency.batch_priority = \"{}\": {m}; leave it \"off\"",
                    cfg.urgency.batch_priority.as_str()
                ))
            })?;
        let master = load_master(&cfg.data_dir)?;
        let capacity = lrm.capacity().or(cfg.cluster).ok_or_else(|| {
            EngineError::BadRequest("no cluster capacity known: set [cluster] in the config".into())
        })?;
        let grace = cfg
            .pilot
            .grace_s
            .map(Duration::from_secs)
            .unwrap_or(lrm.warning().grace);
        let pilot_program = cfg.pilot_program();
        let (changed, _) = watch::channel(0);
        let mut store = store;
        let commands_woken = store::last_command_rowid(store.conn())?;
        let durations_seen = store::last_timeline_rowid(store.conn())?;
        fail_unsubmitted(&mut store, clock.now_ms())?;
        // Addresses of VMs that are gone are free; those of live VMs never are.
        let freed =
            store.tx(|tx| store::free_addresses_of_gone_vms(tx).map_err(EngineError::from))?;
        if freed > 0 {
            info!(freed, "freed addresses of VMs that are gone");
        }
        let pools = Pools::from_config(&cfg.network)?;
        let (writer, writer_thread) = Writer::new();
        let users = crate::config::Users::new(cfg.users.clone());
        let engine = Arc::new(Self {
            store: Mutex::new(store),
            started_ms: clock.now_ms(),
            clock,
            policy: parts.policy,
            writer,
            lrm,
            capacity,
            grace,
            public_url,
            pilot_program,
            master,
            cfg,
            changed,
            pollers: Mutex::new(HashMap::new()),
            commands_seen: AtomicU64::new(0),
            commands_woken: AtomicI64::new(commands_woken),
            kick: Notify::new(),
            cancel_attempts: Mutex::new(HashMap::new()),
            pools,
            users,
            queue_reasons: Mutex::new(HashMap::new()),
            durations_seen: AtomicI64::new(durations_seen),
            pool: pool::PoolRuntime::default(),
            metrics: parts.metrics,
        });
        let weak = Arc::downgrade(&engine);
        writer_thread.start(move |batch| weak.upgrade().map(|e| e.apply_events(batch)))?;
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn lrm(&self) -> &Arc<dyn Lrm> {
        &self.lrm
    }

    /// The users admitted now (reloaded on SIGHUP).
    pub fn users(&self) -> &crate::config::Users {
        &self.users
    }

    /// For `/healthz`: one query through the store's lock, so a stuck or
    /// broken database shows.
    pub fn check_database(&self) -> Result<(), EngineError> {
        self.with_store(|s| {
            s.conn()
                .query_row(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM workspaces LIMIT 1)",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(StoreError::from)?;
            Ok(())
        })
    }

    /// The clock the rules run on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub(super) fn with_store<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A count of the changes committed so far: equal counts, same state.
    pub fn version(&self) -> u64 {
        *self.changed.borrow()
    }

    /// Tells watchers (event streams, pilots' polls) that something changed.
    pub(super) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        let pushed = store::commands_pushed();
        if self.commands_seen.swap(pushed, Ordering::SeqCst) != pushed {
            self.wake_commanded();
        }
    }

    /// Wakes the long-polls of the pilots that have commands stored since
    /// the last call. A failed read wakes every poll (each then reads its own
    /// commands) rather than leave one asleep.
    fn wake_commanded(&self) {
        let found = self.with_store(|s| {
            let after = self.commands_woken.load(Ordering::SeqCst);
            let (keys, last) = store::commanded_since(s.conn(), after)?;
            self.commands_woken.store(last, Ordering::SeqCst);
            Ok(keys)
        });
        let pollers = self.pollers.lock().unwrap_or_else(|p| p.into_inner());
        match found {
            Ok(keys) => {
                for key in keys {
                    if let Some(n) = pollers.get(&key) {
                        n.notify_waiters();
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the new commands; waking every poll");
                pollers.values().for_each(|n| n.notify_waiters());
            }
        }
    }

    /// `wsp-<coordinator id>-`: every pilot job this coordinator submits is
    /// named with it (then the slot id). The id is derived from the master
    /// secret, so it is stable across restarts and differs between two
    /// coordinators sharing one batch system: neither ever cancels the other's jobs.
    pub fn job_prefix(&self) -> String {
        let digest =
            protocol::auth::token_hash(&format!("wsp-coordinator\n{}", hex::encode(&self.master)));
        format!("wsp-{}-", &digest[..8])
    }

    /// Stops the LRM adapter's own work (the local adapter ends its jobs).
    pub async fn shutdown(&self) {
        self.lrm.shutdown().await;
    }
}
