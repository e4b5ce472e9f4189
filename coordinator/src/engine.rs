//! The coordinator's core: turns client requests, pilot events and timer
//! ticks into state changes (through [`crate::lifecycle::next`]), commands for
//! pilots, and batch job submissions and cancels.
//!
//! Every change is one SQLite transaction, committed before anyone is
//! answered; pilot events share theirs (group commit, one savepoint per
//! event, see [`crate::writer`]). LRM calls happen outside the database lock; a cancel that fails
//! stays flagged in the database and is retried by the tick until it works.

use crate::config::Config;
use crate::lifecycle::{self, Input};
use crate::network::{self, NetError, Pools};
use crate::policy::{self, FitError, NodeRoom, VmNeed};
use crate::store::{self, SlotRow, Store, StoreError, VmRow, WorkspaceRow};
use crate::writer::{Outcome, Pending, Writer, WriterError};
use lrm_adapters::{Capacity, JobId, JobState, JobStatus, Lrm, LrmError, SlotJob};
use protocol::auth::SlotKey;
use protocol::pilot::{
    CommandKind, EventAck, EventKind, PilotEvent, PollRequest, ReleaseReason, VmLaunch,
};
use protocol::spec::{SpecError, WorkspaceSpec};
use protocol::view::{
    EventsPage, Phase, PilotView, SlotState, SlotView, VmState, VmView, WorkspaceState,
    WorkspaceView,
};
use protocol::{now_ms, SlotId, VmId, VmName, WorkspaceId};
use rusqlite::Connection;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

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
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
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

pub struct Engine {
    store: Mutex<Store>,
    /// Pilot events go through here: one thread stores them in group commits.
    writer: Writer,
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
    cancel_attempts: Mutex<HashMap<SlotId, Instant>>,
    /// Address pools of `[network]` (parsed once; the config was validated).
    pools: Pools,
    /// When this coordinator process started (pilot silence counts from here at the earliest).
    started_ms: u64,
    /// Who may call the client API; replaced on SIGHUP (`config.users` is the start value).
    users: crate::config::Users,
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
        Self::with_metrics(cfg, lrm, public_url, crate::metrics::Metrics::new())
    }

    /// [`Engine::new`] recording into `metrics` (the server's batch-system
    /// meter shares its handles, so it is made before the engine).
    pub fn with_metrics(
        cfg: Config,
        lrm: Arc<dyn Lrm>,
        public_url: String,
        metrics: crate::metrics::Metrics,
    ) -> Result<Arc<Self>, EngineError> {
        mkdir_private(&cfg.data_dir)?;
        mkdir_private(&cfg.data_dir.join("keys"))?;
        mkdir_private(&cfg.data_dir.join("jobs"))?;
        let store = Store::open(&cfg.data_dir.join("coordinator.db"))?;
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
        fail_unsubmitted(&mut store, now_ms())?;
        // Addresses of VMs that are gone are free; those of live VMs never are.
        let freed =
            store.tx(|tx| store::free_addresses_of_gone_vms(tx).map_err(EngineError::from))?;
        if freed > 0 {
            info!(freed, "freed addresses of VMs that are gone");
        }
        let pools = Pools::from_config(&cfg.network)?;
        let (writer, writer_thread) = Writer::new();
        let cfg_users = cfg.users.clone();
        let engine = Arc::new(Self {
            store: Mutex::new(store),
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
            started_ms: now_ms(),
            users: crate::config::Users::new(cfg_users),
            metrics,
        });
        writer_thread.start(Arc::downgrade(&engine))?;
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

    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    fn bump(&self) {
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

    // ---- client API ---------------------------------------------------------

    /// Creates a workspace: sizes its slots, stores it, submits its pilot jobs.
    pub async fn create(
        &self,
        caller: &Caller,
        spec: WorkspaceSpec,
    ) -> Result<WorkspaceView, EngineError> {
        spec.validate()?;
        let plans = policy::plan_slots(&spec, &self.capacity, self.cfg.pilot.min_dom0_mb)?;
        if self.pools.public.is_none() {
            if let Some(g) = spec.groups.iter().find(|g| g.public_ip) {
                return Err(NetError::NoPublicPool {
                    group: g.name.clone(),
                }
                .into());
            }
        }
        let now = now_ms();
        let ws = WorkspaceRow {
            id: WorkspaceId::generate(),
            name: spec.name.clone(),
            owner: caller.user.clone(),
            spec: spec.clone(),
            state: WorkspaceState::Pending,
            reason: None,
            created_ms: now,
            updated_ms: now,
            expires_ms: None,
        };
        let mut slots = Vec::new();
        self.with_store(|s| {
            s.tx(|tx| {
                store::insert_workspace(tx, &ws)?;
                let mut addrs = AddressPlan::new(tx, &self.pools, &spec)?;
                for plan in &plans {
                    let slot = SlotRow {
                        id: SlotId::generate(),
                        workspace_id: ws.id.clone(),
                        group: plan.group.clone(),
                        job_id: None,
                        nodes: plan.nodes,
                        cores: plan.cores_per_node,
                        memory_mb: plan.memory_mb_per_node,
                        state: SlotState::Submitted,
                        cancel_pending: false,
                        job_ended: false,
                        created_ms: now,
                    };
                    store::insert_slot(tx, &slot)?;
                    let group = spec.groups.iter().find(|g| g.name == plan.group);
                    for idx in 0..plan.nodes {
                        let vm = VmId::generate();
                        addrs.assign(tx, &ws.id, &vm, group.is_some_and(|g| g.public_ip))?;
                        store::insert_vm(
                            tx,
                            &VmRow {
                                name: VmName::new(slot.id.clone(), vm.clone()).to_string(),
                                id: vm,
                                workspace_id: ws.id.clone(),
                                slot_id: slot.id.clone(),
                                group: plan.group.clone(),
                                idx,
                                node: None,
                                state: VmState::Pending,
                                memory_mb: plan.memory_mb_per_node,
                                cpus: plan.cores_per_node,
                                image: group.map(|g| g.image.clone()).unwrap_or_default(),
                            },
                        )?;
                    }
                    slots.push(slot);
                }
                store::push_timeline(
                    tx,
                    &ws.id,
                    now,
                    now,
                    Phase::Requested,
                    None,
                    None,
                    None,
                    &format!(
                        "{} VMs in {} slot(s) requested by {}",
                        spec.vm_count(),
                        plans.len(),
                        caller.user
                    ),
                )?;
                Ok::<_, EngineError>(())
            })
        })?;
        self.metrics.workspaces_created.inc();
        info!(workspace_id = %ws.id, owner = %caller.user, vms = spec.vm_count(), slots = slots.len(), "workspace requested");
        for slot in &slots {
            if let Err(source) = self.submit_slot(slot).await {
                warn!(workspace_id = %ws.id, slot_id = %slot.id, error = %source, "pilot job submission failed");
                let reason = format!(
                    "submitting the pilot job for group {:?} failed: {source}",
                    slot.group
                );
                self.with_store(|s| {
                    s.tx(|tx| {
                        store::set_slot_state(tx, &slot.id, SlotState::Failed)?;
                        let mut w = must_ws(tx, &ws.id)?;
                        fail_workspace(tx, &mut w, &reason, now_ms())?;
                        maybe_settle(tx, &mut w, now_ms())?;
                        Ok::<_, EngineError>(())
                    })
                })?;
                self.bump();
                self.kick.notify_one();
                return Err(EngineError::Submit {
                    workspace: ws.id.clone(),
                    source,
                });
            }
        }
        self.bump();
        self.get(caller, &ws.id)
    }

    /// Writes the slot's key file and job directory, submits the pilot job, records its id.
    async fn submit_slot(&self, slot: &SlotRow) -> Result<(), LrmError> {
        use std::os::unix::fs::OpenOptionsExt;
        let key = SlotKey::derive(&self.master, &slot.id).map_err(|e| LrmError::Config {
            lrm: "coordinator",
            message: e.to_string(),
        })?;
        let key_path = self
            .cfg
            .data_dir
            .join("keys")
            .join(format!("{}.key", slot.id));
        let write_key = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key_path)?;
            std::io::Write::write_all(&mut f, format!("{}\n", key.to_hex()).as_bytes())
        };
        write_key().map_err(|source| LrmError::Io {
            path: key_path.clone(),
            source,
        })?;
        let workdir = self.cfg.data_dir.join("jobs").join(slot.id.as_str());
        let spec = self
            .with_store(|s| Ok(must_ws(s.conn(), &slot.workspace_id)?.spec))
            .map_err(|e| LrmError::Config {
                lrm: "coordinator",
                message: e.to_string(),
            })?;
        let pilot_duration = spec.duration.0 + Duration::from_secs(self.cfg.pilot.startup_slack_s);
        let job = SlotJob {
            name: format!("{}{}", self.job_prefix(), slot.id),
            nodes: slot.nodes,
            cores_per_node: slot.cores,
            memory_mb_per_node: slot.memory_mb,
            walltime: pilot_duration + Duration::from_secs(self.cfg.pilot.walltime_margin_s),
            pilot_argv: self.pilot_argv(slot, &key_path, pilot_duration),
            workdir,
        };
        let started = Instant::now();
        let job_id = self.lrm.submit(&job).await?;
        let took = started.elapsed();
        info!(slot_id = %slot.id, job_id = %job_id, took_ms = took.as_millis() as u64, "pilot job submitted");
        let now = now_ms();
        self.with_store(|s| {
            s.tx(|tx| {
                store::set_slot_job(tx, &slot.id, &job_id.0)?;
                store::push_timeline(
                    tx,
                    &slot.workspace_id,
                    now,
                    now,
                    Phase::SlotSubmitted,
                    Some(&slot.id),
                    None,
                    None,
                    &format!(
                        "{} job {} for group {:?}: {} node(s) x {} core(s) x {} MB (submit took {} ms)",
                        self.lrm.kind(),
                        job_id,
                        slot.group,
                        slot.nodes,
                        slot.cores,
                        slot.memory_mb,
                        took.as_millis()
                    ),
                )?;
                Ok::<_, EngineError>(())
            })
        })
        .map_err(|e| LrmError::Config { lrm: "coordinator", message: e.to_string() })?;
        Ok(())
    }

    /// The pilot's argv as it goes into the job script (`%n` is expanded by the pilot).
    pub fn pilot_argv(&self, slot: &SlotRow, key_path: &Path, duration: Duration) -> Vec<String> {
        let p = &self.cfg.pilot;
        let mut argv = vec![
            self.pilot_program.display().to_string(),
            "run".into(),
            "--slot".into(),
            slot.id.to_string(),
            "--coordinator".into(),
            self.public_url.clone(),
            "--key-file".into(),
            key_path.display().to_string(),
            "--memory-mb".into(),
            slot.memory_mb.to_string(),
            "--duration-s".into(),
            duration.as_secs().to_string(),
            "--grace-s".into(),
            self.grace.as_secs().max(1).to_string(),
            "--state-dir".into(),
            p.state_dir.clone(),
            "--hypervisor".into(),
            p.hypervisor.to_string(),
            "--coordinator-wait-fraction".into(),
            p.coordinator_wait_fraction.to_string(),
            "--min-dom0-mb".into(),
            p.min_dom0_mb.to_string(),
            "--margin-s".into(),
            p.margin_s.to_string(),
            "--poll-wait-ms".into(),
            p.poll_wait_ms.to_string(),
        ];
        if p.hypervisor == crate::config::Hypervisor::Sim {
            argv.push("--sim-dir".into());
            argv.push(p.sim_dir.clone());
        }
        if let Some(ca) = &p.ca_file {
            argv.push("--ca-file".into());
            argv.push(ca.clone());
        }
        if let Some(nc) = &p.node_config {
            argv.push("--node-config".into());
            argv.push(nc.clone());
        }
        argv.extend(p.extra_args.iter().cloned());
        argv
    }

    pub fn get(&self, caller: &Caller, id: &WorkspaceId) -> Result<WorkspaceView, EngineError> {
        self.with_store(|s| {
            let ws = visible_ws(s.conn(), caller, id)?;
            build_view(s.conn(), ws)
        })
    }

    pub fn list(&self, caller: &Caller) -> Result<Vec<WorkspaceView>, EngineError> {
        self.with_store(|s| {
            store::list_workspaces(s.conn(), caller.owner_filter())?
                .into_iter()
                .map(|w| build_view(s.conn(), w))
                .collect()
        })
    }

    /// Starts the end of a workspace: release every slot. Idempotent.
    pub fn destroy(&self, caller: &Caller, id: &WorkspaceId) -> Result<WorkspaceView, EngineError> {
        let now = now_ms();
        let view = self.with_store(|s| {
            s.tx(|tx| {
                let mut ws = visible_ws(tx, caller, id)?;
                if transition(tx, &mut ws, Input::DestroyRequested, None, now)? {
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::DestroyRequested,
                        None,
                        None,
                        None,
                        &format!("by {}", caller.user),
                    )?;
                    end_slots(tx, &ws, now)?;
                    maybe_settle(tx, &mut ws, now)?;
                }
                build_view(tx, ws)
            })
        })?;
        info!(workspace_id = %id, user = %caller.user, "destroy requested");
        self.bump();
        self.kick.notify_one();
        Ok(view)
    }

    /// Timeline entries after `after`, waiting up to `wait` for new ones.
    pub async fn events(
        &self,
        caller: &Caller,
        id: &WorkspaceId,
        after: u64,
        wait: Duration,
    ) -> Result<EventsPage, EngineError> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            // Only the state and its slots: not the whole view (every VM and
            // pilot) on each wake-up of a watcher.
            let page = self.with_store(|s| {
                let ws = visible_ws(s.conn(), caller, id)?;
                let events = store::timeline_after(s.conn(), id, after)?;
                let slots = store::slots_of(s.conn(), id)?;
                Ok(EventsPage {
                    events,
                    state: ws.state,
                    settled: is_settled(ws.state, &slots),
                })
            })?;
            if !page.events.is_empty() || page.settled || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    // ---- pilot API ----------------------------------------------------------

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
    /// already say they are honest; [`Engine::made_after_slot`] bounds them
    /// from below.
    fn check_clock(&self, ts_ms: u64, late_ok: bool) -> Result<(), EngineError> {
        let now = now_ms();
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

    /// A pilot event cannot be older than its slot: the lower bound of a late
    /// event's timestamp is the slot's creation, less `max_clock_skew_s`.
    fn made_after_slot(&self, slot: &SlotRow, ts_ms: u64) -> Result<(), EngineError> {
        let skew_s = self.cfg.max_clock_skew_s;
        if ts_ms < slot.created_ms.saturating_sub(skew_s * 1000) {
            self.metrics.refused("stale");
            return Err(EngineError::Forbidden(format!(
                "timestamp {ts_ms} is before slot {} was created ({} ms; max_clock_skew_s = {skew_s})",
                slot.id, slot.created_ms
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
        self.writer.submit_blocking(pending)
    }

    /// As [`Engine::pilot_event`], waiting asynchronously for the commit.
    pub async fn pilot_event_async(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<EventAck, EngineError> {
        let pending = self.check_event(slot_header, signature, body)?;
        self.writer.submit(pending).await
    }

    /// Everything about an event that needs no database: signature, JSON,
    /// slot, node name, clock. Runs in the handler, in parallel.
    fn check_event(
        &self,
        slot_header: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<Pending, EngineError> {
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
        Ok(Pending {
            slot_id,
            event,
            body: String::from_utf8_lossy(body).into_owned(),
            received_ms: now_ms(),
        })
    }

    /// The writer thread's turn: stores and applies a batch of checked events
    /// in one transaction (one savepoint each), commits, then tells watchers.
    /// One outcome per event, in order; an Ok event is committed.
    pub(crate) fn store_events(&self, batch: &[Pending]) -> Vec<Outcome> {
        let stored = {
            let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
            guard.tx_each(batch, |tx, p| {
                let (slot_id, event) = (&p.slot_id, &p.event);
                let slot = store::get_slot(tx, slot_id)?
                    .ok_or_else(|| EngineError::Forbidden(format!("unknown slot {slot_id}")))?;
                self.made_after_slot(&slot, event.ts_ms)?;
                if !store::insert_pilot_event(tx, event, &p.body, p.received_ms)? {
                    return Err(EngineError::Duplicate {
                        pilot: event.pilot_id.to_string(),
                        seq: event.seq,
                    });
                }
                apply_event(tx, &slot, event, p.received_ms, &self.cfg.images)?;
                Ok(EventAck {
                    seq: event.seq,
                    duplicate: false,
                })
            })
        };
        let outcomes = match stored {
            Ok(outcomes) => outcomes,
            Err(e) => {
                warn!(events = batch.len(), error = %e, "group commit failed; nothing stored");
                let msg = e.to_string();
                return batch
                    .iter()
                    .map(|_| Err(StoreError::Batch(msg.clone()).into()))
                    .collect();
            }
        };
        let mut any = false;
        for (p, outcome) in batch.iter().zip(&outcomes) {
            if outcome.is_ok() {
                any = true;
                let e = &p.event;
                self.metrics.event(e.kind.name());
                debug!(slot_id = %e.slot_id, node = %e.node, seq = e.seq, kind = e.kind.name(), "pilot event stored");
            }
        }
        if any {
            self.bump();
            self.kick.notify_one();
        }
        outcomes
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
                store::seen_pilot(s.conn(), slot_id, &req.node, now_ms())?;
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

    // ---- housekeeping -------------------------------------------------------

    /// Runs the housekeeping loop until `stop` fires.
    pub async fn run_ticks(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tick = Duration::from_millis(self.cfg.tick_ms.max(10));
        let lrm_every = Duration::from_secs_f64(self.cfg.lrm_poll_s);
        let mut last_lrm = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.kick.notified() => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.expire_leases() {
                warn!(error = %e, "lease expiry check failed");
            }
            if let Err(e) = self.find_lost_pilots() {
                warn!(error = %e, "pilot silence check failed");
            }
            self.retry_cancels().await;
            if last_lrm.elapsed() >= lrm_every {
                last_lrm = Instant::now();
                if let Err(e) = self.poll_lrm().await {
                    warn!(error = %e, "batch system status query failed; will retry");
                }
                if let Err(e) = self.cancel_orphans().await {
                    warn!(error = %e, "orphan job scan failed; will retry");
                }
            }
        }
    }

    fn expire_leases(&self) -> Result<(), EngineError> {
        let now = now_ms();
        let changed = self.with_store(|s| {
            s.tx(|tx| {
                let mut changed = false;
                for mut ws in store::expired_workspaces(tx, now)? {
                    transition(
                        tx,
                        &mut ws,
                        Input::LeaseExpired,
                        Some("lease duration is over"),
                        now,
                    )?;
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::LeaseExpired,
                        None,
                        None,
                        None,
                        "lease duration is over",
                    )?;
                    end_slots(tx, &ws, now)?;
                    info!(workspace_id = %ws.id, "lease expired");
                    changed = true;
                }
                Ok::<_, EngineError>(changed)
            })
        })?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// Pilots silent past `pilot_silence_s` (counted from this process's start
    /// at the earliest, so a restart does not condemn every pilot) are lost:
    /// their workspace fails, their job is cancelled, the node is named for kill-all.
    fn find_lost_pilots(&self) -> Result<(), EngineError> {
        let now = now_ms();
        let silence = self.cfg.pilot_silence_s * 1000;
        if now.saturating_sub(self.started_ms) < silence {
            return Ok(());
        }
        let changed = self.with_store(|s| {
            s.tx(|tx| {
                let lost = store::silent_pilots(tx, now.saturating_sub(silence))?;
                for p in &lost {
                    let Some(slot) = store::get_slot(tx, &p.slot_id)? else { continue };
                    let mut ws = must_ws(tx, &slot.workspace_id)?;
                    let quiet_s = now.saturating_sub(p.last_seen_ms) / 1000;
                    warn!(workspace_id = %ws.id, slot_id = %slot.id, node = %p.node, quiet_s, "pilot lost");
                    store::mark_pilot_lost(tx, &slot.id, &p.node)?;
                    store::push_timeline(
                        tx,
                        &ws.id,
                        now,
                        now,
                        Phase::PilotLost,
                        Some(&slot.id),
                        Some(&p.node),
                        None,
                        &format!("no word from the pilot for {quiet_s} s; its job is cancelled; run workspace-kill-all on {}", p.node),
                    )?;
                    if slot.job_id.is_some() && !slot.job_ended {
                        store::set_slot_cancel_pending(tx, &slot.id, true)?;
                    }
                    let reason = format!("pilot on node {} went silent (nothing for {quiet_s} s)", p.node);
                    fail_workspace(tx, &mut ws, &reason, now)?;
                    slot_maybe_released(tx, &ws, &slot.id, now)?;
                    maybe_settle(tx, &mut ws, now)?;
                }
                Ok::<_, EngineError>(!lost.is_empty())
            })
        })?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// Cancels batch jobs flagged for cancel; failures stay flagged and are retried.
    async fn retry_cancels(&self) {
        let slots = match self.with_store(|s| Ok(store::slots_to_cancel(s.conn())?)) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "reading slots to cancel");
                return;
            }
        };
        for slot in slots {
            let Some(job) = slot.job_id.clone() else {
                let _ = self
                    .with_store(|s| Ok(store::set_slot_cancel_pending(s.conn(), &slot.id, false)?));
                continue;
            };
            {
                let mut attempts = self
                    .cancel_attempts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if attempts
                    .get(&slot.id)
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
                {
                    continue;
                }
                attempts.insert(slot.id.clone(), Instant::now());
            }
            match self.lrm.cancel(&JobId(job.clone())).await {
                Ok(()) => {
                    info!(slot_id = %slot.id, job_id = %job, "batch job cancelled");
                    let now = now_ms();
                    let r = self.with_store(|s| {
                        s.tx(|tx| {
                            store::set_slot_cancel_pending(tx, &slot.id, false)?;
                            let pilots = store::pilots_of(tx, &slot.id)?;
                            let fresh = store::get_slot(tx, &slot.id)?;
                            if let Some(fresh) = fresh {
                                if !fresh.state.is_terminal() && pilots.iter().all(|p| p.released) {
                                    store::set_slot_state(tx, &slot.id, SlotState::Released)?;
                                    store::push_timeline(
                                        tx,
                                        &slot.workspace_id,
                                        now,
                                        now,
                                        Phase::SlotReleased,
                                        Some(&slot.id),
                                        None,
                                        None,
                                        &format!(
                                            "job {job} cancelled before its pilots held anything"
                                        ),
                                    )?;
                                }
                            }
                            let mut ws = must_ws(tx, &slot.workspace_id)?;
                            maybe_settle(tx, &mut ws, now)?;
                            Ok::<_, EngineError>(())
                        })
                    });
                    if let Err(e) = r {
                        warn!(slot_id = %slot.id, error = %e, "recording cancel");
                    }
                    self.cancel_attempts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&slot.id);
                    self.bump();
                }
                Err(e) => {
                    warn!(slot_id = %slot.id, job_id = %job, error = %e, "cancel failed; will retry")
                }
            }
        }
    }

    /// The slow backstop: one batched status query for every job we may still have.
    /// `wsp-<coordinator id>-`: every pilot job this coordinator submits is
    /// named with it (then the slot id). The id is derived from the master
    /// secret, so it is stable across restarts and differs between two
    /// coordinators sharing one batch system: neither ever cancels the other's jobs.
    pub fn job_prefix(&self) -> String {
        let digest =
            protocol::auth::token_hash(&format!("wsp-coordinator\n{}", hex::encode(&self.master)));
        format!("wsp-{}-", &digest[..8])
    }

    /// Cancels batch jobs named as ours that no slot owns: submitted by an
    /// earlier run that died before recording them, or left from a slot the
    /// database no longer tracks. Derived from the batch system on every
    /// scan, so a failed cancel is retried until the job is gone.
    pub async fn cancel_orphans(&self) -> Result<Vec<JobId>, EngineError> {
        let jobs = match self.lrm.list_jobs().await {
            Ok(Some(jobs)) => jobs,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => {
                warn!(error = %e, "listing batch jobs for orphans failed; will retry");
                return Ok(Vec::new());
            }
        };
        let prefix = self.job_prefix();
        let mut orphans = Vec::new();
        for (job, name) in jobs {
            let Some(slot_id) = name
                .strip_prefix(&prefix)
                .and_then(|s| SlotId::parse(s).ok())
            else {
                continue;
            };
            let slot = self.with_store(|s| Ok(store::get_slot(s.conn(), &slot_id)?))?;
            let orphan = match &slot {
                None => true,
                // Submission in flight: the id is about to be recorded.
                Some(s) if s.job_id.is_none() => s.state.is_terminal(),
                Some(s) => s.job_id.as_deref() != Some(job.0.as_str()),
            };
            if !orphan {
                continue;
            }
            warn!(job_id = %job, name = %name, slot_id = %slot_id, "orphan batch job: cancelling");
            match self.lrm.cancel(&job).await {
                Ok(()) => {
                    self.metrics.orphan_jobs_cancelled.inc();
                    if let Some(s) = &slot {
                        let now = now_ms();
                        let detail = format!(
                            "orphan batch job {job} ({name}) cancelled: the slot does not own it"
                        );
                        self.with_store(|st| {
                            Ok(store::push_timeline(
                                st.conn(),
                                &s.workspace_id,
                                now,
                                now,
                                Phase::JobEnded,
                                Some(&s.id),
                                None,
                                None,
                                &detail,
                            )?)
                        })?;
                        self.bump();
                    }
                    orphans.push(job);
                }
                Err(e) => {
                    warn!(job_id = %job, error = %e, "cancelling orphan job failed; will retry")
                }
            }
        }
        Ok(orphans)
    }

    pub async fn poll_lrm(&self) -> Result<(), EngineError> {
        let slots = self.with_store(|s| Ok(store::slots_with_live_jobs(s.conn())?))?;
        if slots.is_empty() {
            return Ok(());
        }
        let ids: Vec<JobId> = slots
            .iter()
            .filter_map(|s| s.job_id.clone().map(JobId))
            .collect();
        let states = match self.lrm.status(&ids).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "batch status query failed");
                return Ok(());
            }
        };
        let now = now_ms();
        let mut changed = false;
        for slot in slots {
            let Some(job) = slot.job_id.clone() else {
                continue;
            };
            let ended = match states.get(&JobId(job.clone())) {
                Some(JobStatus::Known(st)) if st.is_finished() => {
                    Some(format!("{st:?}").to_lowercase())
                }
                Some(JobStatus::NotFound) => Some("no longer listed".to_string()),
                _ => None,
            };
            let Some(how) = ended else { continue };
            let preempted = matches!(
                states.get(&JobId(job.clone())),
                Some(JobStatus::Known(JobState::Preempted))
            );
            self.with_store(|s| s.tx(|tx| job_ended(tx, &slot.id, &job, &how, preempted, now)))?;
            changed = true;
        }
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// Ends every live workspace, as an admin would one by one (used by
    /// `serve --end-leases-on-exit`). Returns the workspaces it ended.
    pub fn end_all(&self) -> Result<Vec<WorkspaceId>, EngineError> {
        let admin = Caller {
            user: "coordinator shutdown".into(),
            admin: true,
        };
        let live: Vec<WorkspaceId> = self.with_store(|s| {
            Ok(store::active_workspaces(s.conn())?
                .into_iter()
                .filter(|w| lifecycle::wants_slots(w.state))
                .map(|w| w.id)
                .collect())
        })?;
        for id in &live {
            self.destroy(&admin, id)?;
        }
        Ok(live)
    }

    /// Workspaces not yet settled (something may still be held somewhere).
    pub fn unsettled(&self) -> Result<usize, EngineError> {
        self.with_store(|s| Ok(store::active_workspaces(s.conn())?.len()))
    }

    /// Stops the LRM adapter's own work (the local adapter ends its jobs).
    pub async fn shutdown(&self) {
        self.lrm.shutdown().await;
    }

    /// Row counts of every table (for tests proving a refused request changed nothing).
    pub fn row_counts(&self) -> Result<Vec<(String, i64)>, EngineError> {
        self.with_store(|s| Ok(store::row_counts(s.conn())?))
    }

    /// Counts of workspaces per state, for /metrics.
    pub fn state_counts(&self) -> Result<Vec<(String, i64)>, EngineError> {
        self.with_store(|s| {
            let mut st = s
                .conn()
                .prepare("SELECT state, COUNT(*) FROM workspaces GROUP BY state")
                .map_err(StoreError::from)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(StoreError::from)?;
            let mut out = Vec::new();
            for r in rows {
                out.push(r.map_err(StoreError::from)?);
            }
            Ok(out)
        })
    }
}

/// Recovery at start: a slot with no batch job id was being submitted when the
/// previous coordinator died (create stores before it submits). Whether the
/// LRM got the job is unknown, so it is not submitted again: its workspace
/// fails (the client may ask again) and settles.
fn fail_unsubmitted(store: &mut Store, now: u64) -> Result<(), EngineError> {
    store.tx(|tx| {
        for mut ws in store::active_workspaces(tx)? {
            let unsubmitted = store::slots_of(tx, &ws.id)?
                .iter()
                .any(|s| s.job_id.is_none() && !s.state.is_terminal());
            if unsubmitted {
                warn!(workspace_id = %ws.id, "coordinator stopped while submitting this workspace's pilot jobs");
                fail_workspace(tx, &mut ws, "the coordinator stopped while submitting the pilot jobs", now)?;
                end_slots(tx, &ws, now)?;
                maybe_settle(tx, &mut ws, now)?;
            }
        }
        Ok(())
    })
}

// ---- the rules, inside one transaction ---------------------------------------

fn must_ws(c: &Connection, id: &WorkspaceId) -> Result<WorkspaceRow, EngineError> {
    store::get_workspace(c, id)?.ok_or_else(|| EngineError::NotFound(format!("no workspace {id}")))
}

/// The workspace if the caller may see it; others' workspaces are "not found".
fn visible_ws(
    c: &Connection,
    caller: &Caller,
    id: &WorkspaceId,
) -> Result<WorkspaceRow, EngineError> {
    match store::get_workspace(c, id)? {
        Some(ws) if caller.admin || ws.owner == caller.user => Ok(ws),
        _ => Err(EngineError::NotFound(format!("no workspace {id}"))),
    }
}

/// Applies `lifecycle::next`; records the state and returns whether it changed.
fn transition(
    c: &Connection,
    ws: &mut WorkspaceRow,
    input: Input,
    reason: Option<&str>,
    now: u64,
) -> Result<bool, EngineError> {
    match lifecycle::next(ws.state, input) {
        Some(to) => {
            info!(workspace_id = %ws.id, from = %ws.state, to = %to, ?input, "workspace state");
            store::set_workspace_state(c, &ws.id, to, reason, now)?;
            ws.state = to;
            if reason.is_some() {
                ws.reason = reason.map(str::to_string);
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

fn fail_workspace(
    c: &Connection,
    ws: &mut WorkspaceRow,
    reason: &str,
    now: u64,
) -> Result<(), EngineError> {
    if transition(c, ws, Input::Failed, Some(reason), now)? {
        warn!(workspace_id = %ws.id, reason, "workspace failed");
        end_slots(c, ws, now)?;
    }
    Ok(())
}

/// Asks every slot of the workspace to end: `release` to each pilot that has
/// not released, and a batch cancel for jobs with nodes no pilot holds yet.
fn end_slots(c: &Connection, ws: &WorkspaceRow, now: u64) -> Result<(), EngineError> {
    for slot in store::slots_of(c, &ws.id)? {
        if slot.state.is_terminal() {
            continue;
        }
        let pilots = store::pilots_of(c, &slot.id)?;
        for p in pilots.iter().filter(|p| !p.released) {
            if !store::has_release(c, &slot.id, &p.node)? {
                store::push_command(c, &slot.id, &p.node, &CommandKind::Release, now)?;
            }
        }
        if (pilots.len() as u32) < slot.nodes && slot.job_id.is_some() && !slot.job_ended {
            // Some nodes have no pilot yet (job queued or starting): cancel the job.
            store::set_slot_cancel_pending(c, &slot.id, true)?;
        }
        if slot.job_id.is_none() {
            // Never submitted: nothing anywhere.
            store::set_slot_state(c, &slot.id, SlotState::Failed)?;
        } else if pilots.is_empty() || pilots.iter().any(|p| !p.released) {
            store::set_slot_state(c, &slot.id, SlotState::Releasing)?;
        }
    }
    Ok(())
}

/// When every slot has ended, the workspace settles (destroying -> destroyed, ...).
fn maybe_settle(c: &Connection, ws: &mut WorkspaceRow, now: u64) -> Result<(), EngineError> {
    let slots = store::slots_of(c, &ws.id)?;
    if !slots.iter().all(|s| s.state.is_terminal()) {
        return Ok(());
    }
    if transition(c, ws, Input::AllSlotsEnded, None, now)? && ws.state == WorkspaceState::Failed {
        store::set_workspace_state(
            c,
            &ws.id,
            ws.state,
            Some("every slot ended while the workspace was live"),
            now,
        )?;
    }
    // Any VM not yet accounted for is gone with its slot.
    for vm in store::vms_of(c, &ws.id)? {
        if !vm.state.is_terminal() {
            let to = if ws.state == WorkspaceState::Preempted {
                VmState::Preempted
            } else {
                VmState::Destroyed
            };
            store::set_vm_state(c, &vm.id, to)?;
        }
    }
    let already = store::has_phase(c, &ws.id, Phase::Ended)?;
    if !already && ws.state.is_terminal() {
        store::push_timeline(
            c,
            &ws.id,
            now,
            now,
            Phase::Ended,
            None,
            None,
            None,
            &format!("{}: every slot given back", ws.state),
        )?;
    }
    Ok(())
}

/// All VMs mapped onto the reserved nodes; `start_vm` commands queued.
fn start_vms(
    c: &Connection,
    ws: &mut WorkspaceRow,
    now: u64,
    images: &network::ImagesConfig,
) -> Result<(), EngineError> {
    let slots = store::slots_of(c, &ws.id)?;
    let mut rooms = Vec::new();
    for s in &slots {
        for p in store::pilots_of(c, &s.id)?
            .into_iter()
            .filter(|p| p.reserved && !p.released)
        {
            rooms.push(NodeRoom {
                slot: s.id.clone(),
                node: p.node,
                memory_mb: s.memory_mb,
                cpus: s.cores,
            });
        }
    }
    let vms: Vec<VmRow> = store::vms_of(c, &ws.id)?
        .into_iter()
        .filter(|v| v.state == VmState::Pending)
        .collect();
    let needs: Vec<VmNeed> = vms
        .iter()
        .map(|v| VmNeed {
            vm: v.id.clone(),
            slot: v.slot_id.clone(),
            memory_mb: v.memory_mb,
            cpus: v.cpus,
        })
        .collect();
    // Prefer nodes whose image cache already holds the VM's image.
    let mut cached: HashSet<(String, String)> = HashSet::new();
    for s in &slots {
        cached.extend(store::node_images(c, &s.id)?);
    }
    let sources: HashMap<&VmId, Option<protocol::pilot::ImageSource>> = vms
        .iter()
        .map(|v| {
            let g = ws.spec.groups.iter().find(|g| g.name == v.group);
            (&v.id, g.and_then(|g| network::image_source(images, g)))
        })
        .collect();
    let holds = |vm: &VmId, node: &str| {
        sources
            .get(vm)
            .and_then(|s| s.as_ref())
            .and_then(|s| s.sha256.as_ref())
            .is_some_and(|h| cached.contains(&(node.to_string(), h.clone())))
    };
    let (mut nics, peers) = workspace_context(c, ws)?;
    // Stored once; each launch is stored without them and gets them when
    // delivered (`poll_answer`).
    store::set_workspace_peers(c, &ws.id, &peers)?;
    let mapping = match policy::map_vms_preferring(&needs, &rooms, &holds) {
        Ok(m) => m,
        Err(e) => return fail_workspace(c, ws, &e.to_string(), now),
    };
    transition(c, ws, Input::AllSlotsReserved, None, now)?;
    let by_id: HashMap<&VmId, &VmRow> = vms.iter().map(|v| (&v.id, v)).collect();
    for (vm_id, node) in mapping {
        let Some(vm) = by_id.get(&vm_id) else {
            continue;
        };
        store::set_vm_node(c, &vm.id, &node)?;
        store::set_vm_state(c, &vm.id, VmState::Starting)?;
        let launch = VmLaunch {
            vm_id: vm.id.clone(),
            name: vm.name.clone(),
            memory_mb: vm.memory_mb,
            cpus: vm.cpus,
            image: vm.image.clone(),
            image_source: sources.get(&vm.id).cloned().flatten(),
            nics: nics.remove(&vm.id).unwrap_or_default(),
            hostname: Some(network::hostname(&vm.group, vm.idx)),
            context: Some(protocol::pilot::Context {
                workspace_id: ws.id.to_string(),
                workspace_name: ws.name.clone(),
                group: vm.group.clone(),
                peers: Vec::new(),
                ssh_key: ws.spec.ssh_key.clone(),
            }),
            on_preempt: Default::default(),
            restore: None,
            urgency: 0,
            cpu: None,
        };
        store::push_command(c, &vm.slot_id, &node, &CommandKind::StartVm(launch), now)?;
        store::push_timeline(
            c,
            &ws.id,
            now,
            now,
            Phase::VmStartSent,
            Some(&vm.slot_id),
            Some(&node),
            Some(&vm.id),
            &format!("{} ({}) -> {node}", vm.name, vm.group),
        )?;
    }
    Ok(())
}

/// The lowest free addresses of each pool, taken once per create; all or nothing.
struct AddressPlan<'p> {
    pools: &'p Pools,
    free: HashMap<&'static str, std::vec::IntoIter<std::net::Ipv4Addr>>,
}

impl<'p> AddressPlan<'p> {
    fn new(c: &Connection, pools: &'p Pools, spec: &WorkspaceSpec) -> Result<Self, EngineError> {
        let mut free = HashMap::new();
        let public: u32 = spec
            .groups
            .iter()
            .filter(|g| g.public_ip)
            .map(|g| g.count)
            .sum();
        for (name, need) in [("private", spec.vm_count()), ("public", public)] {
            if let (Some(pool), true) = (pools.get(name), need > 0) {
                let used = store::used_ips(c, name)?;
                free.insert(name, pool.allocate(&used, need as usize)?.into_iter());
            }
        }
        Ok(Self { pools, free })
    }

    /// Gives `vm` its NICs: private, then public if asked.
    fn assign(
        &mut self,
        c: &Connection,
        ws: &WorkspaceId,
        vm: &VmId,
        public: bool,
    ) -> Result<(), EngineError> {
        let mut idx = 0;
        for (name, wanted) in [("private", true), ("public", public)] {
            let (Some(pool), true) = (self.pools.get(name), wanted) else {
                continue;
            };
            let Some(ip) = self.free.get_mut(name).and_then(|it| it.next()) else {
                return Err(NetError::Exhausted {
                    pool: name.to_string(),
                    needed: 1,
                    free: 0,
                    range: String::new(),
                }
                .into());
            };
            let nic = protocol::pilot::Nic {
                mac: network::derive_mac(ws, vm, idx),
                ip,
                prefix_len: pool.prefix_len,
                gateway: pool.gateway,
                pool: name.to_string(),
            };
            store::insert_address(c, ws, vm, idx, &nic)?;
            idx += 1;
        }
        Ok(())
    }
}

/// Each VM's NICs, by VM.
type NicsByVm = HashMap<VmId, Vec<protocol::pilot::Nic>>;

/// A waiting poll's place in [`Engine`]'s `pollers`; dropping it removes the
/// entry unless another poll of the same (slot, node) still waits on it.
struct Registered<'a> {
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
fn poll_answer(c: &Connection, rows: Vec<(u64, String)>) -> Result<PollAnswer, StoreError> {
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

/// Contexts of a workspace's VMs: each VM's NICs and the peer list.
fn workspace_context(
    c: &Connection,
    ws: &WorkspaceRow,
) -> Result<(NicsByVm, Vec<protocol::pilot::Peer>), EngineError> {
    let mut nics: NicsByVm = HashMap::new();
    for (vm, nic) in store::addresses_of(c, &ws.id)? {
        nics.entry(vm).or_default().push(nic);
    }
    let peers = store::vms_of(c, &ws.id)?
        .iter()
        .map(|v| protocol::pilot::Peer {
            name: network::hostname(&v.group, v.idx),
            group: v.group.clone(),
            ips: nics
                .get(&v.id)
                .map(|n| n.iter().map(|n| n.ip).collect())
                .unwrap_or_default(),
        })
        .collect();
    Ok((nics, peers))
}

fn apply_event(
    c: &Connection,
    slot: &SlotRow,
    e: &PilotEvent,
    now: u64,
    images: &network::ImagesConfig,
) -> Result<(), EngineError> {
    let mut ws = must_ws(c, &slot.workspace_id)?;
    let node = e.node.as_str();
    store::touch_pilot(c, &slot.id, node, e.pilot_id.as_str(), e.kind.name(), now)?;
    let tl = |phase: Phase, vm: Option<&VmId>, detail: &str| {
        store::push_timeline(
            c,
            &ws.id,
            e.ts_ms,
            now,
            phase,
            Some(&slot.id),
            Some(node),
            vm,
            detail,
        )
    };
    match &e.kind {
        EventKind::Started {
            pid,
            hypervisor,
            job_id,
        } => {
            tl(
                Phase::PilotStarted,
                None,
                &format!(
                    "pid {pid}, hypervisor {hypervisor}, job {}",
                    job_id.as_deref().unwrap_or("?")
                ),
            )?;
            if slot.state == SlotState::Submitted {
                store::set_slot_state(c, &slot.id, SlotState::Reserving)?;
            }
            if !lifecycle::wants_slots(ws.state) && !store::has_release(c, &slot.id, node)? {
                store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
            }
        }
        EventKind::Reserved {
            dom0_before_mb,
            dom0_after_mb,
            reserved_mb,
            balloon_ms,
            cached_images,
            ..
        } => {
            store::set_pilot_flags(c, &slot.id, node, Some(true), None)?;
            store::set_node_images(c, &slot.id, node, cached_images)?;
            tl(
                Phase::MemoryReserved,
                None,
                &format!(
                    "dom0 {dom0_before_mb} -> {dom0_after_mb} MB ({reserved_mb} MB for VMs) in {balloon_ms} ms; coordinator notified after {} ms",
                    now.saturating_sub(e.ts_ms)
                ),
            )?;
            if !lifecycle::wants_slots(ws.state) {
                if !store::has_release(c, &slot.id, node)? {
                    store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
                }
                return Ok(());
            }
            let reserved = store::count_reserved_pilots(c, &slot.id)?;
            if reserved >= u64::from(slot.nodes)
                && matches!(slot.state, SlotState::Submitted | SlotState::Reserving)
            {
                store::set_slot_state(c, &slot.id, SlotState::Reserved)?;
            }
            let all = store::slots_of(c, &ws.id)?
                .iter()
                .all(|s| s.state == SlotState::Reserved);
            if all && ws.state == WorkspaceState::Pending {
                start_vms(c, &mut ws, now, images)?;
            }
        }
        EventKind::ReserveFailed { reason } => {
            store::set_pilot_flags(c, &slot.id, node, Some(false), Some(true))?;
            tl(Phase::ReserveFailed, None, reason)?;
            fail_workspace(
                c,
                &mut ws,
                &format!(
                    "node {node} could not reserve {} MB: {reason}",
                    slot.memory_mb
                ),
                now,
            )?;
            slot_maybe_released(c, &ws, &slot.id, now)?;
            maybe_settle(c, &mut ws, now)?;
        }
        EventKind::VmStarted {
            vm_id,
            name,
            create_ms,
            stage_ms,
            cache_hit,
            ..
        } => {
            let Some(vm) = own_vm(c, slot, vm_id)? else {
                return Ok(());
            };
            if let Some(ms) = stage_ms {
                let how = match cache_hit {
                    Some(true) => "already in the node cache",
                    Some(false) => "fetched into the node cache",
                    None => "staged",
                };
                tl(
                    Phase::ImageStaged,
                    Some(vm_id),
                    &format!("image {} {how} in {ms} ms", vm.image),
                )?;
            }
            if vm.state == VmState::Starting {
                store::set_vm_state(c, vm_id, VmState::Running)?;
            }
            tl(
                Phase::VmStarted,
                Some(vm_id),
                &format!("{name} created in {create_ms} ms"),
            )?;
            let (vm_count, running) = store::count_vms(c, &ws.id, VmState::Running)?;
            if vm_count == running && transition(c, &mut ws, Input::AllVmsRunning, None, now)? {
                let expires = now + ws.spec.duration.0.as_millis() as u64;
                store::set_workspace_expiry(c, &ws.id, expires)?;
                store::push_timeline(
                    c,
                    &ws.id,
                    now,
                    now,
                    Phase::Running,
                    None,
                    None,
                    None,
                    &format!(
                        "all {} VMs running; lease ends {}",
                        vm_count,
                        protocol::time::format_ms(expires)
                    ),
                )?;
            }
        }
        EventKind::VmFailed { vm_id, reason } => {
            let Some(_) = own_vm(c, slot, vm_id)? else {
                return Ok(());
            };
            store::set_vm_state(c, vm_id, VmState::Failed)?;
            tl(Phase::VmFailed, Some(vm_id), reason)?;
            fail_workspace(
                c,
                &mut ws,
                &format!("VM {vm_id} on node {node} failed to start: {reason}"),
                now,
            )?;
        }
        EventKind::VmDestroyed { vm_id, destroy_ms } => {
            let Some(_) = own_vm(c, slot, vm_id)? else {
                return Ok(());
            };
            let to = if ws.state == WorkspaceState::Preempted {
                VmState::Preempted
            } else {
                VmState::Destroyed
            };
            store::set_vm_state(c, vm_id, to)?;
            tl(
                Phase::VmDestroyed,
                Some(vm_id),
                &format!("destroyed in {destroy_ms} ms"),
            )?;
        }
        EventKind::Preempting {
            signal,
            coordinator_wait_ms,
            ..
        } => {
            let job = slot.job_id.as_deref().unwrap_or("?");
            tl(Phase::Preempting, None, &format!("{signal} from the batch system (job {job}); pilot waits {coordinator_wait_ms} ms for us"))?;
            let reason =
                format!("batch system preempted pilot job {job} on node {node} ({signal})");
            if transition(c, &mut ws, Input::Preempted, Some(&reason), now)? {
                end_slots(c, &ws, now)?;
            } else if !store::has_release(c, &slot.id, node)? {
                store::push_command(c, &slot.id, node, &CommandKind::Release, now)?;
            }
        }
        EventKind::Released {
            reason,
            vms_destroyed,
            dom0_restored_mb,
            restore_ms,
            clean,
            problems,
            ..
        } => {
            store::set_pilot_flags(c, &slot.id, node, None, Some(true))?;
            let mut detail = format!(
                "dom0 back to {dom0_restored_mb} MB in {restore_ms} ms; {} VM(s) destroyed ({})",
                vms_destroyed.len(),
                format!("{reason:?}").to_lowercase()
            );
            if !clean {
                detail.push_str(&format!(
                    "; NOT CLEAN: {}; run workspace-kill-all on {node}",
                    problems.join("; ")
                ));
                warn!(workspace_id = %ws.id, slot_id = %slot.id, node, "pilot released with problems: {problems:?}");
            }
            tl(Phase::MemoryRestored, None, &detail)?;
            let vm_final =
                if ws.state == WorkspaceState::Preempted || *reason == ReleaseReason::Preempted {
                    VmState::Preempted
                } else {
                    VmState::Destroyed
                };
            for vm in store::live_vms_on(c, &slot.id, node)? {
                store::set_vm_state(c, &vm, vm_final)?;
            }
            if lifecycle::wants_slots(ws.state) {
                // The pilot left on its own: the lease cannot go on.
                let (input, why) = match reason {
                    ReleaseReason::Deadline => (
                        Input::LeaseExpired,
                        format!("pilot on {node} reached the end of its slot"),
                    ),
                    ReleaseReason::Preempted => {
                        (Input::Preempted, format!("pilot on {node} was preempted"))
                    }
                    _ => (
                        Input::Failed,
                        format!("pilot on {node} released its slot ({reason:?})"),
                    ),
                };
                if transition(c, &mut ws, input, Some(&why), now)? {
                    end_slots(c, &ws, now)?;
                }
            }
            slot_maybe_released(c, &ws, &slot.id, now)?;
            maybe_settle(c, &mut ws, now)?;
        }
        // Suspend/resume (docs/CHECKPOINTS.md) is not driven by the
        // coordinator yet: it never sends the commands these answer.
        EventKind::VmSuspended { .. }
        | EventKind::VmSuspendFailed { .. }
        | EventKind::VmResumed { .. }
        | EventKind::VmResumeFailed { .. }
        | EventKind::CheckpointDeleted { .. }
        | EventKind::CheckpointDeleteFailed { .. } => {
            warn!(workspace_id = %ws.id, slot_id = %slot.id, node, event = e.kind.name(), "checkpoint event not yet supported by the coordinator; recorded only");
        }
        // Pool slots, CPU shares and warm VMs (docs/POOL.md): the
        // coordinator never sends the commands these answer yet.
        EventKind::Bound { .. }
        | EventKind::Unbound { .. }
        | EventKind::ReservationChanged { .. }
        | EventKind::ReservationRefused { .. }
        | EventKind::VmCpuSet { .. }
        | EventKind::VmCpuSetFailed { .. }
        | EventKind::WarmPrepared { .. }
        | EventKind::WarmPrepareFailed { .. } => {
            warn!(workspace_id = %ws.id, slot_id = %slot.id, node, event = e.kind.name(), "pool event not yet supported by the coordinator; recorded only");
        }
    }
    Ok(())
}

/// The VM if it belongs to this slot (events about other slots' VMs change nothing).
fn own_vm(c: &Connection, slot: &SlotRow, vm_id: &VmId) -> Result<Option<VmRow>, EngineError> {
    match store::get_vm(c, vm_id)? {
        Some(vm) if vm.slot_id == slot.id => Ok(Some(vm)),
        _ => {
            warn!(slot_id = %slot.id, vm_id = %vm_id, "event names a VM that is not in this slot; ignored");
            Ok(None)
        }
    }
}

/// When every pilot of the slot has released, the slot is released; the batch
/// job is cancelled too, in case it lingers (a no-op if it has ended).
fn slot_maybe_released(
    c: &Connection,
    ws: &WorkspaceRow,
    slot_id: &SlotId,
    now: u64,
) -> Result<(), EngineError> {
    let Some(slot) = store::get_slot(c, slot_id)? else {
        return Ok(());
    };
    if slot.state.is_terminal() {
        return Ok(());
    }
    let (_, released) = store::count_released_pilots(c, slot_id)?;
    if released >= u64::from(slot.nodes) {
        let pilots = store::pilots_of(c, slot_id)?;
        let lost: Vec<&str> = pilots
            .iter()
            .filter(|p| p.last_event == "lost")
            .map(|p| p.node.as_str())
            .collect();
        let (state, detail) = if lost.is_empty() {
            (
                SlotState::Released,
                format!("all {} pilot(s) released", pilots.len()),
            )
        } else {
            (
                SlotState::Failed,
                format!(
                    "ended with lost pilot(s) on {}: run workspace-kill-all there",
                    lost.join(", ")
                ),
            )
        };
        store::set_slot_state(c, slot_id, state)?;
        if !slot.job_ended {
            store::set_slot_cancel_pending(c, slot_id, true)?;
        }
        store::push_timeline(
            c,
            &ws.id,
            now,
            now,
            Phase::SlotReleased,
            Some(slot_id),
            None,
            None,
            &detail,
        )?;
    }
    Ok(())
}

/// The LRM says the job is over (or gone).
fn job_ended(
    c: &Connection,
    slot_id: &SlotId,
    job: &str,
    how: &str,
    preempted: bool,
    now: u64,
) -> Result<(), EngineError> {
    let Some(slot) = store::get_slot(c, slot_id)? else {
        return Ok(());
    };
    store::set_slot_job_ended(c, slot_id)?;
    store::set_slot_cancel_pending(c, slot_id, false)?;
    let mut ws = must_ws(c, &slot.workspace_id)?;
    store::push_timeline(
        c,
        &ws.id,
        now,
        now,
        Phase::JobEnded,
        Some(slot_id),
        None,
        None,
        &format!("batch job {job}: {how}"),
    )?;
    if !slot.state.is_terminal() {
        let pilots = store::pilots_of(c, slot_id)?;
        let stuck: Vec<&str> = pilots
            .iter()
            .filter(|p| !p.released)
            .map(|p| p.node.as_str())
            .collect();
        if stuck.is_empty() {
            store::set_slot_state(c, slot_id, SlotState::Released)?;
        } else {
            store::set_slot_state(c, slot_id, SlotState::Failed)?;
            warn!(slot_id = %slot_id, job, ?stuck, "batch job ended before its pilots reported release");
            store::push_timeline(
                c,
                &ws.id,
                now,
                now,
                Phase::SlotReleased,
                Some(slot_id),
                None,
                None,
                &format!(
                    "job ended before pilots on {} reported release: run workspace-kill-all there",
                    stuck.join(", ")
                ),
            )?;
        }
        if lifecycle::wants_slots(ws.state) {
            let reason = format!(
                "batch job {job} ended ({how}) while the workspace was {}",
                ws.state
            );
            let input = if preempted {
                Input::Preempted
            } else {
                Input::Failed
            };
            if transition(c, &mut ws, input, Some(&reason), now)? {
                end_slots(c, &ws, now)?;
            }
        }
    }
    maybe_settle(c, &mut ws, now)?;
    Ok(())
}

/// Settled: the state is final and every slot is given back with no cancel
/// left to do — nothing of the workspace remains on a node or in the LRM.
fn is_settled(state: WorkspaceState, slots: &[SlotRow]) -> bool {
    state.is_terminal()
        && slots
            .iter()
            .all(|s| s.state.is_terminal() && !s.cancel_pending)
}

fn build_view(c: &Connection, ws: WorkspaceRow) -> Result<WorkspaceView, EngineError> {
    let slots = store::slots_of(c, &ws.id)?;
    let jobs: HashMap<SlotId, Option<String>> = slots
        .iter()
        .map(|s| (s.id.clone(), s.job_id.clone()))
        .collect();
    let mut nics: HashMap<VmId, Vec<protocol::pilot::Nic>> = HashMap::new();
    for (vm, nic) in store::addresses_of(c, &ws.id)? {
        nics.entry(vm).or_default().push(nic);
    }
    let vms = store::vms_of(c, &ws.id)?
        .into_iter()
        .map(|v| VmView {
            hostname: Some(network::hostname(&v.group, v.idx)),
            nics: nics.remove(&v.id).unwrap_or_default(),
            job_id: jobs.get(&v.slot_id).cloned().flatten(),
            id: v.id,
            name: v.name,
            group: v.group,
            node: v.node,
            slot_id: v.slot_id,
            state: v.state,
            memory_mb: v.memory_mb,
            cpus: v.cpus,
        })
        .collect();
    let settled = is_settled(ws.state, &slots);
    let mut slot_views = Vec::new();
    for s in slots {
        let pilots = store::pilots_of(c, &s.id)?
            .into_iter()
            .map(|p| PilotView {
                node: p.node,
                pilot_id: p.pilot_id,
                last_event: p.last_event,
            })
            .collect();
        slot_views.push(SlotView {
            id: s.id,
            group: s.group,
            job_id: s.job_id,
            nodes: s.nodes,
            cores_per_node: s.cores,
            memory_mb_per_node: s.memory_mb,
            state: s.state,
            pilots,
        });
    }
    Ok(WorkspaceView {
        id: ws.id,
        name: ws.name,
        owner: ws.owner,
        state: ws.state,
        reason: ws.reason,
        created_ms: ws.created_ms,
        updated_ms: ws.updated_ms,
        expires_ms: ws.expires_ms,
        settled,
        vms,
        slots: slot_views,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::pilot::{Context, Peer, PollResponse};

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
                ts_ms: now_ms(),
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
