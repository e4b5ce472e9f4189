//! Who and where this pilot is: node name, batch job id, `%n` path patterns,
//! and the record of which hypervisor the node's pilots open.
//!
//! Shared by the pilot and kill-all so both resolve paths (and drivers) the
//! same way. Not for reading the node's resources (that is the hypervisor
//! driver's job).

use crate::files::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `<state-dir>/hypervisor.json`: how the node's pilots open the hypervisor.
/// `workspace-pilot run` writes it once the driver opened, before touching
/// anything; kill-all reads it so an admin need not say (nor guess) which
/// driver and node config the node uses. The latest pilot's record wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypervisorRecord {
    /// `sim`, `kvm` or `xen` (the `--hypervisor` the pilot was given).
    pub kind: String,
    /// The node config the pilot read (absolute, `%n` expanded).
    #[serde(default)]
    pub node_config: Option<PathBuf>,
    /// The simulated node's directory (`sim` only).
    #[serde(default)]
    pub sim_dir: Option<PathBuf>,
    pub updated_ms: u64,
}

impl HypervisorRecord {
    pub const FILE: &'static str = "hypervisor.json";

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(Self::FILE)
    }

    /// Writes the record (creating the state dir), atomically, mode 0600
    /// like every file of the state dir.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(state_dir)?;
        let path = Self::path(state_dir);
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&path, &text, 0o600)?;
        Ok(path)
    }

    /// The record in `state_dir`, `None` if no pilot wrote one; an
    /// unreadable one is an error naming the file.
    pub fn read(state_dir: &Path) -> Result<Option<Self>, String> {
        let path = Self::path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|e| format!("{} is not valid: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

/// The driver kind in a hypervisor name as the pilot reports it
/// (`kvm (tcg)` is `kvm`).
pub fn hypervisor_kind(name: &str) -> &str {
    name.split_whitespace().next().unwrap_or(name)
}

/// The node name: the flag if given, else `WSP_NODE`, else `SLURMD_NODENAME`,
/// else the hostname (else `localhost`).
pub fn node_name(flag: Option<&str>) -> String {
    if let Some(n) = flag.filter(|n| !n.is_empty()) {
        return n.to_string();
    }
    for var in ["WSP_NODE", "SLURMD_NODENAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.trim().is_empty() {
                return v.trim().to_string();
            }
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The batch job id as the environment tells it (first of `WSP_JOB_ID`,
/// `SLURM_JOB_ID`, `PBS_JOBID`, `JOB_ID` that is set and not empty).
pub fn job_id_from_env() -> Option<String> {
    ["WSP_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "JOB_ID"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

/// Replaces every `%n` in `pattern` with the node name (`%%` is a literal `%`).
pub fn expand_node(pattern: &str, node: &str) -> PathBuf {
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push_str(node),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_n_is_replaced_by_the_node_name_everywhere() {
        assert_eq!(
            expand_node("/var/lib/wsp/%n/state-%n", "c01"),
            PathBuf::from("/var/lib/wsp/c01/state-c01")
        );
        assert_eq!(
            expand_node("/tmp/plain", "c01"),
            PathBuf::from("/tmp/plain")
        );
        assert_eq!(
            expand_node("/tmp/100%%/%x%", "c01"),
            PathBuf::from("/tmp/100%/%x%")
        );
    }

    #[test]
    fn the_hypervisor_record_round_trips_and_kinds_drop_the_accelerator() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HypervisorRecord::read(dir.path()), Ok(None));
        let r = HypervisorRecord {
            kind: "kvm".into(),
            node_config: Some("/etc/workspace-pilot/node.toml".into()),
            sim_dir: None,
            updated_ms: 1,
        };
        r.write(&dir.path().join("state")).unwrap();
        assert_eq!(
            HypervisorRecord::read(&dir.path().join("state")),
            Ok(Some(r))
        );
        std::fs::write(dir.path().join("state/hypervisor.json"), "{").unwrap();
        let e = HypervisorRecord::read(&dir.path().join("state")).unwrap_err();
        assert!(e.contains("hypervisor.json is not valid"), "{e}");
        assert_eq!(hypervisor_kind("kvm (tcg)"), "kvm");
        assert_eq!(hypervisor_kind("sim"), "sim");
    }

    #[test]
    fn node_flag_wins_over_the_environment() {
        assert_eq!(node_name(Some("given")), "given");
        assert!(!node_name(None).is_empty());
    }
}
