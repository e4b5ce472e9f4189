//! The workspace spec a client writes (TOML or JSON), and its validation.
//!
//! ```toml
//! name = "osg-site"
//! duration = "2h"            # lease length; also accepts a number of seconds
//! [[group]]
//! name = "worker"
//! count = 3
//! memory_mb = 1024
//! cpus = 1
//! image = "worker.qcow2"
//! ```
//!
//! Every error names the field that is wrong (`group[1].memory_mb: ...`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// The example spec of the README (an ensemble: 3 workers of 1 GiB and a
/// head of 2 GiB), used by the demo and the tests.
pub const EXAMPLE: &str = r#"
name = "osg-site"
duration = "2h"
[[group]]
name = "worker"
count = 3
memory_mb = 1024
cpus = 1
image = "worker.qcow2"
[[group]]
name = "head"
count = 1
memory_mb = 2048
cpus = 2
image = "head.qcow2"
"#;

/// Limits on what one spec may ask for.
pub const MAX_GROUPS: usize = 64;
pub const MAX_VMS: u32 = 4096;
pub const MIN_MEMORY_MB: u64 = 16;
pub const MAX_MEMORY_MB: u64 = 4 * 1024 * 1024;
pub const MAX_CPUS: u32 = 1024;
pub const MIN_DURATION: Duration = Duration::from_secs(1);
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A lease length: `"2h"`, `"90m"`, `"1h 30m"` or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseDuration(pub Duration);

impl Serialize for LeaseDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.as_secs())
    }
}

impl<'de> Deserialize<'de> for LeaseDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(LeaseDuration(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t)
                .map(LeaseDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"2h"`, `"1h 30m"`, `"45s"` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{t:?} is not a duration like \"2h\", \"90m\" or 3600 ({e})"))
}

/// A group of identical VMs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    pub count: u32,
    pub memory_mb: u64,
    #[serde(default = "one")]
    pub cpus: u32,
    pub image: String,
    /// Expected SHA-256 (64 hex digits) of the image; the pilot refuses a
    /// download that does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// VMs of this group get a second NIC with an address from the public pool.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_ip: bool,
}

fn one() -> u32 {
    1
}

/// A whole workspace: one or more groups that come up together (an ensemble).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    pub name: String,
    pub duration: LeaseDuration,
    #[serde(rename = "group")]
    pub groups: Vec<GroupSpec>,
    /// SSH public key put into every VM's context (cloud-init `ssh_authorized_keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
}

/// Longest SSH public key accepted in a spec.
pub const MAX_SSH_KEY: usize = 16 * 1024;

/// True for 64 hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A spec that could not be read or is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("spec is not valid {format}: {message}")]
    Syntax {
        format: &'static str,
        message: String,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

fn check_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} must be 1-63 characters of letters, digits, '-', '_' or '.', starting with a letter or digit"),
        ))
    }
}

impl WorkspaceSpec {
    /// Parses TOML (or JSON when the text starts with `{`) and validates it.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let spec: WorkspaceSpec = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| SpecError::Syntax {
                format: "JSON",
                message: e.to_string(),
            })?
        } else {
            toml::from_str(text).map_err(|e| SpecError::Syntax {
                format: "TOML",
                message: e.message().to_string(),
            })?
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name)?;
        let d = self.duration.0;
        if d < MIN_DURATION || d > MAX_DURATION {
            return Err(invalid(
                "duration",
                format!(
                    "{}s is out of range (1s to {}s)",
                    d.as_secs(),
                    MAX_DURATION.as_secs()
                ),
            ));
        }
        if self.groups.is_empty() {
            return Err(invalid("group", "at least one [[group]] is required"));
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(invalid("group", format!("at most {MAX_GROUPS} groups")));
        }
        let mut total: u64 = 0;
        for (i, g) in self.groups.iter().enumerate() {
            let f = |name: &str| format!("group[{i}].{name}");
            check_name(&f("name"), &g.name)?;
            if self.groups[..i].iter().any(|o| o.name == g.name) {
                return Err(invalid(
                    f("name"),
                    format!("{:?} is used by another group", g.name),
                ));
            }
            if g.count == 0 || g.count > MAX_VMS {
                return Err(invalid(
                    f("count"),
                    format!("{} is out of range (1 to {MAX_VMS})", g.count),
                ));
            }
            if g.memory_mb < MIN_MEMORY_MB || g.memory_mb > MAX_MEMORY_MB {
                return Err(invalid(
                    f("memory_mb"),
                    format!(
                        "{} is out of range ({MIN_MEMORY_MB} to {MAX_MEMORY_MB})",
                        g.memory_mb
                    ),
                ));
            }
            if g.cpus == 0 || g.cpus > MAX_CPUS {
                return Err(invalid(
                    f("cpus"),
                    format!("{} is out of range (1 to {MAX_CPUS})", g.cpus),
                ));
            }
            if g.image.trim().is_empty() || g.image.len() > 1024 || g.image.contains('\0') {
                return Err(invalid(
                    f("image"),
                    "must be a non-empty image name or URL (at most 1024 characters)",
                ));
            }
            if let Some(h) = &g.image_sha256 {
                if !is_sha256_hex(h) {
                    return Err(invalid(
                        f("image_sha256"),
                        format!("{h:?} must be 64 hex digits (a SHA-256)"),
                    ));
                }
            }
            total += u64::from(g.count);
        }
        if let Some(k) = &self.ssh_key {
            let t = k.trim();
            let kind = t.split_whitespace().next().unwrap_or("");
            if t.is_empty()
                || t.len() > MAX_SSH_KEY
                || t.contains(['\n', '\r', '\0'])
                || !(kind.starts_with("ssh-")
                    || kind.starts_with("ecdsa-")
                    || kind.starts_with("sk-"))
            {
                return Err(invalid(
                    "ssh_key",
                    "must be one OpenSSH public key line (\"ssh-ed25519 AAAA... comment\")",
                ));
            }
        }
        if total > u64::from(MAX_VMS) {
            return Err(invalid(
                "group",
                format!("{total} VMs in all; at most {MAX_VMS}"),
            ));
        }
        Ok(())
    }

    /// Number of VMs in all groups.
    pub fn vm_count(&self) -> u32 {
        self.groups.iter().map(|g| g.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENSEMBLE: &str = EXAMPLE;

    #[test]
    fn ensemble_toml_parses() {
        let s = WorkspaceSpec::parse(ENSEMBLE).unwrap();
        assert_eq!(s.duration.0, Duration::from_secs(7200));
        assert_eq!(s.vm_count(), 4);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(WorkspaceSpec::parse(&json).unwrap(), s);
    }

    #[test]
    fn errors_name_the_field() {
        let bad = ENSEMBLE.replace("memory_mb = 2048", "memory_mb = 1");
        let e = WorkspaceSpec::parse(&bad).unwrap_err();
        assert!(e.to_string().starts_with("group[1].memory_mb:"), "{e}");
        let bad = ENSEMBLE.replace("count = 3", "count = 0");
        assert!(WorkspaceSpec::parse(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("group[0].count"));
        let bad = ENSEMBLE.replace("\"2h\"", "\"soon\"");
        assert!(WorkspaceSpec::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("soon"));
        let bad = ENSEMBLE.replace("cpus = 1", "cpu = 1");
        assert!(matches!(
            WorkspaceSpec::parse(&bad),
            Err(SpecError::Syntax { .. })
        ));
        let bad = ENSEMBLE.replace("name = \"head\"", "name = \"worker\"");
        assert!(WorkspaceSpec::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("another group"));
    }

    #[test]
    fn network_and_context_fields_are_optional_and_validated() {
        let s = WorkspaceSpec::parse(ENSEMBLE).unwrap();
        assert!(!s.groups[0].public_ip && s.ssh_key.is_none());
        let with = format!(
            "ssh_key = \"ssh-ed25519 AAAAC3Nza me@x\"\n{}",
            ENSEMBLE.replace(
                "image = \"head.qcow2\"",
                "image = \"head.qcow2\"\npublic_ip = true\nimage_sha256 = \"{}\"",
            )
        )
        .replace("{}", &"ab".repeat(32));
        let s = WorkspaceSpec::parse(&with).unwrap();
        assert!(s.groups[1].public_ip);
        assert_eq!(s.ssh_key.as_deref(), Some("ssh-ed25519 AAAAC3Nza me@x"));
        let bad = with.replace(&"ab".repeat(32), "xyz");
        let e = WorkspaceSpec::parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("group[1].image_sha256:"), "{e}");
        let bad = with.replace("ssh-ed25519 AAAAC3Nza me@x", "hello");
        let e = WorkspaceSpec::parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("ssh_key:"), "{e}");
    }

    #[test]
    fn duration_accepts_seconds() {
        let s = ENSEMBLE.replace("\"2h\"", "90");
        assert_eq!(WorkspaceSpec::parse(&s).unwrap().duration.0.as_secs(), 90);
    }
}
