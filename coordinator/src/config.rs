//! The coordinator's configuration file (TOML), with defaults for every key.
//!
//! `lrm` and `pilot.hypervisor` are plain config keys: adding a batch system or
//! a hypervisor adds a value, not a code path here. Unknown keys are refused
//! so that a typo in a site's config is an error, not a silent default.

use lrm_adapters::{Capacity, LrmKind, LrmSettings};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// A client allowed in by bearer token.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Hex SHA-256 of the token (`workspace-coordinator token` prints one).
    pub token_sha256: String,
    #[serde(default)]
    pub admin: bool,
    /// Most VMs this user may hold at once, over all their live workspaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vms: Option<u32>,
    /// Most VM memory (MB) this user may hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Longest lease (seconds), renewals included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lease_s: Option<u64>,
    /// Most live workspaces at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workspaces: Option<u32>,
    /// Highest lease urgency (0-2, docs/POOL.md) this user may ask for; a
    /// spec above it is refused with both figures. 0 unless set, admins too.
    #[serde(default)]
    pub max_urgency: u8,
}

impl User {
    /// This user's limits (`crate::limits`).
    pub fn limits(&self) -> crate::limits::Limits {
        crate::limits::Limits {
            max_vms: self.max_vms,
            max_memory_mb: self.max_memory_mb,
            max_lease_s: self.max_lease_s,
            max_workspaces: self.max_workspaces,
        }
    }
}

/// `listen` must be `host:port` (a name or an address; `[::1]:8750` for IPv6).
fn check_listen(listen: &str) -> Result<(), ConfigError> {
    let port = listen
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, p)| p.parse::<u16>().ok());
    if port.is_none() {
        return Err(ConfigError::Invalid(format!(
            "listen = {listen:?}: must be host:port, e.g. \"0.0.0.0:8750\""
        )));
    }
    Ok(())
}

/// `public_url` is what pilots are given: an absolute http(s) URL with a
/// host, https when the coordinator serves TLS.
fn check_public_url(u: &str, tls: bool) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        Err(ConfigError::Invalid(format!(
            "public_url = {u:?}: {why} (pilots reach the coordinator there), e.g. \"http://head.example.org:8750\""
        )))
    };
    let url = match url::Url::parse(u) {
        Ok(url) => url,
        Err(e) => return bad(&format!("not a URL ({e})")),
    };
    match url.scheme() {
        "http" if tls => return bad("must be https:// since [tls] serves HTTPS"),
        "https" if !tls => return bad("is https:// but there is no [tls] section"),
        "http" | "https" => {}
        _ => return bad("must be an http:// or https:// URL"),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return bad("has no host");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return bad("must not have a query or fragment");
    }
    Ok(())
}

/// The users admitted now. Replaced as a whole when the coordinator reloads
/// its config (SIGHUP), so a request sees either the old list or the new one.
pub struct Users(RwLock<Arc<Vec<User>>>);

impl Users {
    pub fn new(users: Vec<User>) -> Self {
        Self(RwLock::new(Arc::new(users)))
    }

    /// The user whose token hashes to `token_sha256` (hex, any case).
    pub fn by_token_hash(&self, token_sha256: &str) -> Option<User> {
        self.current()
            .iter()
            .find(|u| u.token_sha256.eq_ignore_ascii_case(token_sha256))
            .cloned()
    }

    pub fn current(&self) -> Arc<Vec<User>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, users: Vec<User>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
    }
}

/// The hypervisor the pilots drive (`[pilot] hypervisor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    /// A node simulated in a directory (demo, tests, evaluation).
    Sim,
    /// QEMU/KVM, memory reserved as hugepages (docs/KVM.md).
    Kvm,
    /// Xen, dom0 ballooned (docs/XEN.md).
    Xen,
}

impl Hypervisor {
    /// The name the pilot's `--hypervisor` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::Kvm => "kvm",
            Self::Xen => "xen",
        }
    }
}

impl std::fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Hypervisor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(Self::Sim),
            "kvm" => Ok(Self::Kvm),
            "xen" => Ok(Self::Xen),
            other => Err(format!(
                "unknown hypervisor {other:?}: expected sim, kvm or xen"
            )),
        }
    }
}

/// HTTPS for both APIs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8 or RSA or SEC1).
    pub key: PathBuf,
}

/// How the coordinator starts pilots (the argv it puts in the job script).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PilotConfig {
    /// Path of `workspace-pilot` on the nodes. Default: next to the coordinator binary.
    pub program: Option<PathBuf>,
    /// Hypervisor the pilots drive: `sim` (here), `xen`, `kvm`.
    pub hypervisor: Hypervisor,
    /// Node state directory; `%n` is the node name. Under `/run` by default:
    /// the slot records describe state a reboot resets (domains, the dom0
    /// balloon, hugepages), so they must not outlive it (docs/DECISIONS.md).
    pub state_dir: String,
    /// Simulated node directory for `hypervisor = "sim"`; `%n` is the node name.
    pub sim_dir: String,
    /// Node config file on the nodes (`[xen]`, `[kvm]` driver settings); `%n` is the node name.
    pub node_config: Option<String>,
    /// dom0 never goes below this.
    pub min_dom0_mb: u64,
    /// Fraction of the grace period the pilot waits for the coordinator after a warning signal.
    pub coordinator_wait_fraction: f64,
    /// The pilot ends its slot this long before its duration is up.
    pub margin_s: u64,
    /// Time given to the ensemble to come up, added to the lease for the pilot's duration.
    pub startup_slack_s: u64,
    /// Walltime asked of the LRM = pilot duration + this.
    pub walltime_margin_s: u64,
    /// Grace period between warning signal and SIGKILL. Default: what the LRM adapter says.
    pub grace_s: Option<u64>,
    /// Long-poll length for pilots' command polls.
    pub poll_wait_ms: u64,
    /// Extra arguments appended to every pilot's argv.
    pub extra_args: Vec<String>,
    /// CA certificate (PEM) pilots use to verify an https coordinator (path on the nodes).
    pub ca_file: Option<String>,
}

impl Default for PilotConfig {
    fn default() -> Self {
        Self {
            program: None,
            hypervisor: Hypervisor::Sim,
            state_dir: "/run/workspace-pilot/%n/state".into(),
            sim_dir: "/run/workspace-pilot/%n/sim".into(),
            node_config: None,
            min_dom0_mb: 100,
            coordinator_wait_fraction: 0.5,
            margin_s: 5,
            startup_slack_s: 120,
            walltime_margin_s: 60,
            grace_s: None,
            poll_wait_ms: 20_000,
            extra_args: Vec::new(),
            ca_file: None,
        }
    }
}

/// Guaranteed leases (`[reservations]`): advance reservations and immediate
/// leases, held in the batch system's own reservations (docs/RESERVATIONS.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReservationsConfig {
    /// How far ahead a reservation may start, seconds (default 30 days).
    pub horizon_s: u64,
    /// The batch system's reservation begins this long before the lease's
    /// start, so pilots boot and images are staged before it (seconds).
    pub lead_s: u64,
    /// A reservation may take the nodes of running best-effort leases that
    /// can be suspended (every node has a checkpoint store, `on_preempt` is
    /// not `end`): they are suspended this long before the batch system's
    /// reservation begins, and resume in new slots when capacity allows.
    pub suspend_best_effort: bool,
    /// Seconds before the reservation begins that its victims are suspended
    /// (time for their VMs to be saved and their pilot jobs to end).
    pub suspend_before_s: u64,
    /// The order best-effort pilot jobs wait in the batch queue.
    pub best_effort_order: BestEffortOrder,
}

/// `[reservations] best_effort_order`: how the coordinator's best-effort
/// pilot jobs queue (issue 18; docs/SIMULATION.md measures both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BestEffortOrder {
    /// As they were asked for (the batch system's own order).
    #[default]
    Arrival,
    /// By node-time (nodes x the lease's duration, or what is left of a
    /// suspended one), the largest first: the queue drains without a few
    /// large leases started last running alone at its end. Small leases
    /// wait longer while large ones are queued. Needs a batch system whose
    /// queue order the coordinator sets (`local`).
    LargestFirst,
}

impl Default for ReservationsConfig {
    fn default() -> Self {
        Self {
            horizon_s: 30 * 24 * 3600,
            lead_s: 60,
            suspend_best_effort: true,
            suspend_before_s: 30,
            best_effort_order: BestEffortOrder::Arrival,
        }
    }
}

/// Urgent leases (`[urgency]`, docs/POOL.md "Urgent leases"): what an
/// urgency-1 or -2 lease may take from best-effort leases when no idle
/// capacity serves it at once.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UrgencyConfig {
    /// Urgency 2 may run its VMs beside a running best-effort lease's VMs
    /// (on nodes with CPU control and memory to spare), capping them.
    pub share: bool,
    /// The urgent VM's CPU weight there (1-10000; the others keep 100).
    pub weight: u32,
    /// The cap put on the best-effort VMs of that node, percent of one CPU.
    pub cap_pct: u32,
    /// Urgency 1 and 2 may suspend best-effort leases (checkpoint store on
    /// every node, `on_preempt` not `end`) when the batch system has no
    /// free node for them.
    pub suspend_best_effort: bool,
    /// What the coordinator asks of the batch system for urgent leases'
    /// pilot jobs (docs/POOL.md "Urgent leases: the batch queue"): `off`
    /// (the default: every pilot job alike), `own` (ahead of our own
    /// best-effort ones, by means a plain user has), `operator` (ahead of
    /// every queued job; needs operator rights on Slurm and Grid Engine).
    /// A batch system that cannot do the mode is refused at start.
    pub batch_priority: lrm_adapters::BatchPriority,
}

impl Default for UrgencyConfig {
    fn default() -> Self {
        Self {
            share: true,
            weight: 900,
            cap_pct: 10,
            suspend_best_effort: true,
            batch_priority: lrm_adapters::BatchPriority::Off,
        }
    }
}

/// The slot pool (`[pool]`, issue 17, docs/POOL.md): pilot slots held idle
/// through the batch system so that leases start without waiting in its
/// queue. `min_idle_nodes = 0` (the default) means no pool at all.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Idle pool slots (one node each) the coordinator keeps ready; 0: no pool.
    pub min_idle_nodes: u32,
    /// Most pool slots at once, idle, bound and growing together. Default:
    /// `min_idle_nodes`.
    pub max_nodes: Option<u32>,
    /// Seconds a slot may stay idle before it is given back, while more
    /// than `min_idle_nodes` are idle.
    pub idle_timeout_s: u64,
    /// Most of the cluster's nodes the pool may hold, as a fraction (0 < f <= 1).
    pub max_share: f64,
    /// Memory (MB) an idle pool pilot holds for VMs (`--memory-mb`); each
    /// binding then asks for what its lease needs.
    pub idle_memory_mb: u64,
    /// How long each pool pilot holds its node, seconds (its `--duration-s`;
    /// the batch job's walltime adds `pilot.walltime_margin_s`). A lease
    /// that would end after a slot's own end goes elsewhere.
    pub walltime_s: u64,
    /// Images of which the pool keeps a clean snapshot (warm VMs, made on
    /// an idle slot whose node has a checkpoint store, at `idle_memory_mb`):
    /// a lease VM of such an image and that memory, placed on a pool slot,
    /// starts from the snapshot instead of booting.
    pub warm_images: Vec<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_idle_nodes: 0,
            max_nodes: None,
            idle_timeout_s: 600,
            max_share: 1.0,
            idle_memory_mb: 0,
            walltime_s: 4 * 3600,
            warm_images: Vec::new(),
        }
    }
}

impl PoolConfig {
    /// True when a pool is configured.
    pub fn enabled(&self) -> bool {
        self.min_idle_nodes > 0
    }

    /// The most pool slots at once.
    pub fn max_nodes(&self) -> u32 {
        self.max_nodes.unwrap_or(self.min_idle_nodes)
    }

    /// The checks of [`Config::validate`] for `[pool]`, on a cluster of `nodes`.
    fn validate(&self, nodes: &Capacity, min_dom0_mb: u64) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.enabled() {
            if self.max_nodes.is_some_and(|m| m > 0) || !self.warm_images.is_empty() {
                return bad("pool.max_nodes and pool.warm_images need pool.min_idle_nodes of at least 1 (0 means no pool)".into());
            }
            return Ok(());
        }
        let max = self.max_nodes();
        if max < self.min_idle_nodes {
            return bad(format!(
                "pool.max_nodes = {max}: must be at least pool.min_idle_nodes = {}",
                self.min_idle_nodes
            ));
        }
        if !self.max_share.is_finite() || self.max_share <= 0.0 || self.max_share > 1.0 {
            return bad(format!(
                "pool.max_share = {}: must be a fraction of the cluster's nodes above 0 and at most 1",
                self.max_share
            ));
        }
        let share = (f64::from(nodes.nodes) * self.max_share).floor() as u32;
        if self.min_idle_nodes > share {
            return bad(format!(
                "pool.min_idle_nodes = {}: more than pool.max_share = {} of the cluster's {} nodes allows ({share})",
                self.min_idle_nodes, self.max_share, nodes.nodes
            ));
        }
        if self.walltime_s < 60 {
            return bad(format!(
                "pool.walltime_s = {}: must be at least 60 s (a pool slot must outlive the leases it takes)",
                self.walltime_s
            ));
        }
        if self.idle_timeout_s == 0 {
            return bad("pool.idle_timeout_s = 0: an idle slot would be given back at once; use min_idle_nodes = 0 for no pool".into());
        }
        let room = nodes.memory_mb_per_node.saturating_sub(min_dom0_mb);
        if self.idle_memory_mb > room {
            return bad(format!(
                "pool.idle_memory_mb = {}: more than a node can give VMs ({} MB less pilot.min_dom0_mb = {room} MB)",
                self.idle_memory_mb, nodes.memory_mb_per_node
            ));
        }
        if let Some(i) = self.warm_images.iter().position(|i| i.trim().is_empty()) {
            return bad(format!(
                "pool.warm_images[{i}]: an image name must not be empty"
            ));
        }
        Ok(())
    }
}

/// The whole server config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// URL pilots use to reach the coordinator. Default: `http(s)://<listen>`.
    pub public_url: Option<String>,
    /// Serve HTTPS with this certificate and key (pilots then need `pilot.ca_file`).
    pub tls: Option<TlsConfig>,
    /// Database, keys, job scripts.
    pub data_dir: PathBuf,
    /// Batch system: `local`, `slurm`, `gridengine`, `torque`, `pbspro`.
    pub lrm: LrmKind,
    /// Node sizes when the LRM adapter cannot tell (real LRMs).
    pub cluster: Option<Capacity>,
    /// How often the LRM is asked for job states (a slow backstop; pilot events come first).
    pub lrm_poll_s: f64,
    /// Housekeeping tick: lease timers, cancel retries.
    pub tick_ms: u64,
    /// Pilot events stamped further ahead of our clock than this, and polls
    /// further off either way, are refused (a late event is not: see
    /// `Engine::check_clock`).
    pub max_clock_skew_s: u64,
    /// A pilot neither polling nor sending events for this long is declared
    /// lost: its workspace fails and its batch job is cancelled. Must exceed
    /// the longest poll (30 s).
    pub pilot_silence_s: u64,
    /// The checkpoint store as this host mounts it (the nodes' `[checkpoints]
    /// dir`), if it does: checkpoints of leases that ended are removed from
    /// here. Unset: they are named on the timeline for an admin.
    pub checkpoint_dir: Option<PathBuf>,
    /// When the batch system says a job ended before its pilots reported how
    /// their nodes ended, the slot waits this long for their late reports
    /// (a pilot resends every 2 s at most once the coordinator is back; the
    /// next pilot on the node and kill-all deliver what a dead one left)
    /// before it names the nodes for kill-all. Counted from the moment the
    /// coordinator learned the job ended, or from its own start.
    pub report_wait_s: u64,
    pub pilot: PilotConfig,
    pub reservations: ReservationsConfig,
    pub urgency: UrgencyConfig,
    /// The slot pool (no pool unless `min_idle_nodes` is set).
    pub pool: PoolConfig,
    /// Address pools (`[network.private]`, `[network.public]`).
    pub network: crate::network::NetworkConfig,
    /// Image repository (`[images] repository`).
    pub images: crate::network::ImagesConfig,
    pub users: Vec<User>,
    pub local: lrm_adapters::local::LocalConfig,
    pub slurm: lrm_adapters::slurm::SlurmConfig,
    pub gridengine: lrm_adapters::gridengine::GridEngineConfig,
    pub torque: lrm_adapters::pbs::PbsConfig,
    pub pbspro: lrm_adapters::pbs::PbsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8750".into(),
            public_url: None,
            tls: None,
            data_dir: "/var/lib/workspace-coordinator".into(),
            lrm: LrmKind::Local,
            cluster: None,
            lrm_poll_s: 10.0,
            tick_ms: 250,
            max_clock_skew_s: 300,
            pilot_silence_s: 90,
            checkpoint_dir: None,
            report_wait_s: 60,
            pilot: PilotConfig::default(),
            reservations: ReservationsConfig::default(),
            urgency: UrgencyConfig::default(),
            pool: PoolConfig::default(),
            network: Default::default(),
            images: Default::default(),
            users: Vec::new(),
            local: Default::default(),
            slurm: Default::default(),
            gridengine: Default::default(),
            torque: Default::default(),
            pbspro: Default::default(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value a lease depends on, so that a mistake stops the
    /// coordinator at start (exit 2, the key named) instead of failing
    /// every lease later in a job log.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let f = self.pilot.coordinator_wait_fraction;
        if !(0.0..=0.9).contains(&f) {
            return bad(format!(
                "pilot.coordinator_wait_fraction = {f}: must be between 0 and 0.9 (the pilot needs time to clean up itself)"
            ));
        }
        let share = protocol::pilot::CpuShare {
            weight: Some(self.urgency.weight),
            cap_pct: Some(self.urgency.cap_pct),
        };
        if let Err(m) = share.validate() {
            return bad(format!(
                "urgency: {m} (weight = {}, cap_pct = {})",
                self.urgency.weight, self.urgency.cap_pct
            ));
        }
        if self.pilot.poll_wait_ms == 0 || self.pilot.poll_wait_ms > 30_000 {
            return bad(format!(
                "pilot.poll_wait_ms = {}: must be between 1 and 30000",
                self.pilot.poll_wait_ms
            ));
        }
        let poll_s = self.pilot.poll_wait_ms.div_ceil(1000);
        if self.pilot_silence_s < poll_s + 5 {
            return bad(format!(
                "pilot_silence_s = {} must exceed the pilots' long-poll ({} s, pilot.poll_wait_ms) by at least 5 s",
                self.pilot_silence_s, poll_s
            ));
        }
        if self.report_wait_s < 3 {
            return bad(format!(
                "report_wait_s = {}: must be at least 3 s (a pilot resends every 2 s at most)",
                self.report_wait_s
            ));
        }
        check_listen(&self.listen)?;
        if let Some(u) = &self.public_url {
            check_public_url(u, self.tls.is_some())?;
        }
        if self.reservations.horizon_s == 0 || self.reservations.horizon_s > 366 * 24 * 3600 {
            return Err(ConfigError::Invalid(format!(
                "reservations.horizon_s = {}: must be from 1 to {} (a year)",
                self.reservations.horizon_s,
                366 * 24 * 3600
            )));
        }
        if self.tick_ms == 0 || self.tick_ms > 60_000 {
            return bad(format!(
                "tick_ms = {}: must be between 1 and 60000 (lease timers and cancel retries run on it)",
                self.tick_ms
            ));
        }
        if !self.lrm_poll_s.is_finite() || self.lrm_poll_s <= 0.0 {
            return bad(format!(
                "lrm_poll_s = {}: must be a positive number of seconds",
                self.lrm_poll_s
            ));
        }
        if self.max_clock_skew_s == 0 {
            return bad("max_clock_skew_s = 0: every pilot event would be refused".into());
        }
        if self.pilot.min_dom0_mb == 0 {
            return bad("pilot.min_dom0_mb = 0: dom0 needs memory of its own".into());
        }
        if self.pilot.grace_s == Some(0) {
            return bad("pilot.grace_s = 0: pilots need time to clean up; leave it out to use the batch system's".into());
        }
        if self.pilot.margin_s >= self.pilot.startup_slack_s.max(1) {
            return bad(format!(
                "pilot.margin_s = {} must be below pilot.startup_slack_s = {} (the pilot would end its slot before the lease)",
                self.pilot.margin_s, self.pilot.startup_slack_s
            ));
        }
        for (key, dir) in [
            ("pilot.state_dir", &self.pilot.state_dir),
            ("pilot.sim_dir", &self.pilot.sim_dir),
        ] {
            if !dir.starts_with('/') {
                return bad(format!(
                    "{key} = {dir:?}: must be an absolute path (pilots run in the batch system's working directory)"
                ));
            }
        }
        if let Some(p) = &self.pilot.program {
            if self.lrm == LrmKind::Local && !p.is_file() {
                return bad(format!(
                    "pilot.program = {:?}: no such file (the local batch system runs it on this host)",
                    p.display()
                ));
            }
        }
        crate::network::Pools::from_config(&self.network)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(r) = &self.images.repository {
            let ok = r.starts_with("http://") || r.starts_with("https://") || r.starts_with('/');
            if !ok {
                return bad(format!(
                    "images.repository = {r:?}: must be an absolute directory or an http(s):// URL"
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty()
                || u.name.starts_with('@')
                || u.name.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return bad(format!(
                    "users[{i}].name = {:?}: must be a non-empty name without spaces, not starting with '@' (reserved for the coordinator's own, such as the slot pool's @pool)",
                    u.name
                ));
            }
            if !names.insert(u.name.as_str()) {
                return bad(format!(
                    "users[{i}].name = {:?}: a user of that name is already listed (names own workspaces; they must be unique)",
                    u.name
                ));
            }
            if u.token_sha256.len() != 64 || hex::decode(&u.token_sha256).is_err() {
                return bad(format!(
                    "users[{i}].token_sha256 (user {:?}): must be 64 hex digits (see `workspace-coordinator token`)",
                    u.name
                ));
            }
            u.limits()
                .validate(&u.name)
                .map_err(|m| ConfigError::Invalid(format!("users[{i}].{m}")))?;
            if u.max_urgency > protocol::spec::MAX_URGENCY {
                return bad(format!(
                    "users[{i}].max_urgency (user {:?}) = {}: must be 0, 1 or 2",
                    u.name, u.max_urgency
                ));
            }
            if !hashes.insert(u.token_sha256.to_ascii_lowercase()) {
                return bad(format!(
                    "users[{i}].token_sha256 (user {:?}): another user has the same token",
                    u.name
                ));
            }
        }
        // Where nodes come from: the local batch system's own, else [cluster].
        let (section, nodes) = match (self.lrm, &self.cluster) {
            (LrmKind::Local, _) => (
                "local",
                Capacity {
                    nodes: self.local.nodes,
                    cores_per_node: self.local.cores_per_node,
                    memory_mb_per_node: self.local.memory_mb_per_node,
                },
            ),
            (_, Some(c)) => ("cluster", *c),
            (lrm, None) => {
                return bad(format!(
                    "lrm = {lrm:?} needs a [cluster] section (nodes, cores_per_node, memory_mb_per_node) to check requests fit"
                ))
            }
        };
        if nodes.nodes == 0 {
            return bad(format!(
                "{section}.nodes = 0: there must be at least one node"
            ));
        }
        if nodes.cores_per_node == 0 {
            return bad(format!("{section}.cores_per_node = 0: must be at least 1"));
        }
        let least = self.pilot.min_dom0_mb + protocol::spec::MIN_MEMORY_MB;
        if nodes.memory_mb_per_node < least {
            return bad(format!(
                "{section}.memory_mb_per_node = {}: must be at least pilot.min_dom0_mb ({}) + the smallest VM ({} MB) = {least}, or no VM ever fits",
                nodes.memory_mb_per_node,
                self.pilot.min_dom0_mb,
                protocol::spec::MIN_MEMORY_MB
            ));
        }
        self.pool.validate(&nodes, self.pilot.min_dom0_mb)?;
        Ok(())
    }

    /// The adapters' settings; the local batch system keeps its job table in
    /// `<data_dir>/local-lrm.json` unless `[local] state_file` says otherwise,
    /// so a restarted coordinator adopts the jobs still running.
    pub fn lrm_settings(&self) -> LrmSettings {
        let mut local = self.local.clone();
        if local.state_file.is_none() {
            local.state_file = Some(self.data_dir.join("local-lrm.json"));
        }
        LrmSettings {
            local,
            slurm: self.slurm.clone(),
            gridengine: self.gridengine.clone(),
            torque: self.torque.clone(),
            pbspro: self.pbspro.clone(),
        }
    }

    /// Pilot program: configured path, else `workspace-pilot` next to this binary, else from PATH.
    pub fn pilot_program(&self) -> PathBuf {
        if let Some(p) = &self.pilot.program {
            return p.clone();
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                let p = dir.join("workspace-pilot");
                if p.exists() {
                    return p;
                }
            }
        }
        PathBuf::from("workspace-pilot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_local_sim_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.lrm, LrmKind::Local);
        assert_eq!(c.pilot.hypervisor, Hypervisor::Sim);
    }

    #[test]
    fn typos_are_refused() {
        let e = Config::parse("lmr = \"local\"").unwrap_err().to_string();
        assert!(e.contains("lmr"), "{e}");
    }

    #[test]
    fn the_example_config_in_docs_parses() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/coordinator.example.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let hash = protocol::auth::token_hash("t");
        let text = text.replace(
            "replace with the output of: workspace-coordinator token --user alice",
            &hash,
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.local.nodes, 4);
    }

    #[test]
    fn network_pools_and_image_repository_are_checked() {
        let ok = "[network.private]\ncidr = \"10.77.0.0/24\"\ngateway = \"10.77.0.1\"\n[network.public]\ncidr = \"192.0.2.0/28\"\n[images]\nrepository = \"http://repo/img\"\n";
        let c = Config::parse(ok).unwrap();
        assert!(c.network.public.is_some());
        let e = Config::parse("[network.private]\ncidr = \"10.77.0.0/33\"\n").unwrap_err();
        assert!(e.to_string().contains("network.private"), "{e}");
        let e = Config::parse("[images]\nrepository = \"ftp://x\"\n").unwrap_err();
        assert!(e.to_string().contains("images.repository"), "{e}");
    }

    #[test]
    fn the_pool_is_off_by_default_and_its_bad_values_are_refused_naming_the_key() {
        let c = Config::parse("").unwrap();
        assert!(!c.pool.enabled());
        assert_eq!(c.pool, PoolConfig::default());
        // The local batch system has 4 nodes by default.
        let c = Config::parse("[pool]\nmin_idle_nodes = 1\nmax_nodes = 2\n").unwrap();
        assert!(c.pool.enabled());
        assert_eq!(c.pool.max_nodes(), 2);
        assert_eq!(
            Config::parse("[pool]\nmin_idle_nodes = 2\n")
                .unwrap()
                .pool
                .max_nodes(),
            2
        );
        for (toml, key) in [
            (
                "[pool]\nmin_idle_nodes = 2\nmax_nodes = 1\n",
                "pool.max_nodes",
            ),
            (
                "[pool]\nmin_idle_nodes = 1\nmax_share = 0\n",
                "pool.max_share",
            ),
            (
                "[pool]\nmin_idle_nodes = 1\nmax_share = 1.5\n",
                "pool.max_share",
            ),
            (
                "[pool]\nmin_idle_nodes = 3\nmax_share = 0.5\n",
                "pool.min_idle_nodes",
            ),
            (
                "[pool]\nmin_idle_nodes = 1\nwalltime_s = 10\n",
                "pool.walltime_s",
            ),
            (
                "[pool]\nmin_idle_nodes = 1\nidle_timeout_s = 0\n",
                "pool.idle_timeout_s",
            ),
            (
                "[pool]\nmin_idle_nodes = 1\nidle_memory_mb = 100000\n",
                "pool.idle_memory_mb",
            ),
            ("[pool]\nmax_nodes = 2\n", "pool.min_idle_nodes"),
            (
                "[pool]\nmin_idle_nodes = 1\nidle_timeout = 5\n",
                "idle_timeout",
            ),
            (
                "[[users]]\nname = \"@pool\"\ntoken_sha256 = \"00\"\n",
                "users[0].name",
            ),
        ] {
            let e = refused(toml);
            assert!(e.contains(key), "{toml:?}: {e}");
        }
    }

    #[test]
    fn real_lrm_needs_cluster_sizes() {
        let e = Config::parse("lrm = \"slurm\"").unwrap_err().to_string();
        assert!(e.contains("[cluster]"), "{e}");
        let ok = "lrm = \"slurm\"\n[cluster]\nnodes = 2\ncores_per_node = 2\nmemory_mb_per_node = 1000\n";
        assert!(Config::parse(ok).is_ok());
    }

    fn refused(toml: &str) -> String {
        match Config::parse(toml) {
            Ok(_) => panic!("accepted: {toml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn batch_priority_is_off_by_default_and_an_unknown_word_is_refused_naming_the_choices() {
        let c = Config::parse("").expect("defaults");
        assert_eq!(c.urgency.batch_priority, lrm_adapters::BatchPriority::Off);
        let c = Config::parse("[urgency]\nbatch_priority = \"operator\"\n").expect("operator");
        assert_eq!(
            c.urgency.batch_priority,
            lrm_adapters::BatchPriority::Operator
        );
        let e = refused("[urgency]\nbatch_priority = \"top\"\n");
        assert!(
            e.contains("batch_priority")
                && e.contains("off")
                && e.contains("own")
                && e.contains("operator"),
            "{e}"
        );
    }

    #[test]
    fn values_that_would_fail_every_lease_are_refused_at_start_naming_the_key() {
        let user = |name: &str, token: &str| {
            format!(
                "[[users]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n",
                protocol::auth::token_hash(token)
            )
        };
        for (toml, key) in [
            ("[pilot]\nhypervisor = \"kvmm\"\n", "kvmm"),
            ("public_url = \"not a url\"\n", "public_url"),
            ("public_url = \"ftp://head:8750\"\n", "public_url"),
            ("public_url = \"https://head:8750\"\n", "public_url"),
            ("listen = \"8750\"\n", "listen"),
            ("tick_ms = 0\n", "tick_ms"),
            ("report_wait_s = 1\n", "report_wait_s"),
            ("lrm_poll_s = nan\n", "lrm_poll_s"),
            ("max_clock_skew_s = 0\n", "max_clock_skew_s"),
            ("[local]\nmemory_mb_per_node = 100\n", "local.memory_mb_per_node"),
            ("[local]\nnodes = 0\n", "local.nodes"),
            (
                "lrm = \"slurm\"\n[cluster]\nnodes = 2\ncores_per_node = 2\nmemory_mb_per_node = 64\n",
                "cluster.memory_mb_per_node",
            ),
            ("[pilot]\nstate_dir = \"state/%n\"\n", "pilot.state_dir"),
            ("[pilot]\ngrace_s = 0\n", "pilot.grace_s"),
            ("[pilot]\npoll_wait_ms = 0\n", "pilot.poll_wait_ms"),
            (
                "[pilot]\nprogram = \"/nonexistent/workspace-pilot\"\n",
                "pilot.program",
            ),
        ] {
            let e = refused(toml);
            assert!(e.contains(key), "{toml:?}: {e}");
        }
        let e = refused(&format!("{}{}", user("alice", "a"), user("alice", "b")));
        assert!(e.contains("users[1].name") && e.contains("alice"), "{e}");
        let e = refused(&format!("{}{}", user("alice", "a"), user("bob", "a")));
        assert!(e.contains("users[1].token_sha256"), "{e}");
        let e = refused(&format!("{}max_urgency = 3\n", user("alice", "a")));
        assert!(
            e.contains("users[0].max_urgency") && e.contains("must be 0, 1 or 2"),
            "{e}"
        );
        // The TOML error names the key and the values allowed.
        let e = refused("[pilot]\nhypervisor = \"kvmm\"\n");
        assert!(
            e.contains("sim") && e.contains("kvm") && e.contains("xen"),
            "{e}"
        );
        // What is fine stays fine.
        let ok = format!(
            "public_url = \"http://head.example.org:8750/\"\n[local]\nmemory_mb_per_node = 116\n{}{}",
            user("alice", "a"),
            user("bob", "b")
        );
        Config::parse(&ok).unwrap();
    }
}
