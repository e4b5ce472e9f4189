//! Who and where this pilot is: node name, batch job id, `%n` path patterns.
//!
//! Shared by the pilot and kill-all so both resolve paths the same way.
//! Not for reading the node's resources (that is the hypervisor driver's job).

use std::path::PathBuf;

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
    fn node_flag_wins_over_the_environment() {
        assert_eq!(node_name(Some("given")), "given");
        assert!(!node_name(None).is_empty());
    }
}
