//! The coordinator's configuration file (TOML), with defaults for every key.
//!
//! `lrm` and `pilot.hypervisor` are plain config keys: adding a batch system or
//! a hypervisor adds a value, not a code path here. Unknown keys are refused
//! so that a typo in a site's config is an error, not a silent default.

use lrm_adapters::{Capacity, LrmKind, LrmSettings};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Hex SHA-256 of the token (`workspace-coordinator token` prints one).
    pub token_sha256: String,
    #[serde(default)]
    pub admin: bool,
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
    pub hypervisor: String,
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
            hypervisor: "sim".into(),
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
    /// Pilot events whose timestamp is further than this from our clock are refused.
    pub max_clock_skew_s: u64,
    /// A pilot neither polling nor sending events for this long is declared
    /// lost: its workspace fails and its batch job is cancelled. Must exceed
    /// the longest poll (30 s).
    pub pilot_silence_s: u64,
    pub pilot: PilotConfig,
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
            pilot: PilotConfig::default(),
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = self.pilot.coordinator_wait_fraction;
        if !(0.0..=0.9).contains(&f) {
            return Err(ConfigError::Invalid(format!(
                "pilot.coordinator_wait_fraction = {f}: must be between 0 and 0.9 (the pilot needs time to clean up itself)"
            )));
        }
        let poll_s = self.pilot.poll_wait_ms.min(30_000).div_ceil(1000);
        if self.pilot_silence_s < poll_s + 5 {
            return Err(ConfigError::Invalid(format!(
                "pilot_silence_s = {} must exceed the pilots' long-poll ({} s, pilot.poll_wait_ms) by at least 5 s",
                self.pilot_silence_s, poll_s
            )));
        }
        crate::network::Pools::from_config(&self.network)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(r) = &self.images.repository {
            let ok = r.starts_with("http://") || r.starts_with("https://") || r.starts_with('/');
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "images.repository = {r:?}: must be an absolute directory or an http(s):// URL"
                )));
            }
        }
        if self.lrm_poll_s <= 0.0 {
            return Err(ConfigError::Invalid("lrm_poll_s must be positive".into()));
        }
        for u in &self.users {
            if u.token_sha256.len() != 64 || hex::decode(&u.token_sha256).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "users.{}: token_sha256 must be 64 hex digits (see `workspace-coordinator token`)",
                    u.name
                )));
            }
        }
        if self.lrm != LrmKind::Local && self.cluster.is_none() {
            return Err(ConfigError::Invalid(format!(
                "lrm = {:?} needs a [cluster] section (nodes, cores_per_node, memory_mb_per_node) to check requests fit",
                self.lrm
            )));
        }
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
        assert_eq!(c.pilot.hypervisor, "sim");
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
    fn real_lrm_needs_cluster_sizes() {
        let e = Config::parse("lrm = \"slurm\"").unwrap_err().to_string();
        assert!(e.contains("[cluster]"), "{e}");
        let ok = "lrm = \"slurm\"\n[cluster]\nnodes = 2\ncores_per_node = 2\nmemory_mb_per_node = 1000\n";
        assert!(Config::parse(ok).is_ok());
    }
}
