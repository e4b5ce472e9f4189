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

pub use crate::lease::{LeaseKind, Start};
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
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = LeaseDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a duration like \"2h\", \"90m\" or a number of seconds from 1 to {}",
                    MAX_DURATION.as_secs()
                )
            }
            fn visit_str<E: serde::de::Error>(self, t: &str) -> Result<LeaseDuration, E> {
                parse_duration(t).map(LeaseDuration).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<LeaseDuration, E> {
                Ok(LeaseDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LeaseDuration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(duration_out_of_range(v))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<LeaseDuration, E> {
                match whole(v) {
                    Some(w) if w < 0 => Err(E::custom(duration_out_of_range(v))),
                    Some(w) => self.visit_u64(u64::try_from(w).unwrap_or(u64::MAX)),
                    None => Err(E::custom(format!("{v} is not a whole number of seconds"))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn duration_out_of_range(secs: impl std::fmt::Display) -> String {
    format!(
        "{secs}s is out of range ({}s to {}s)",
        MIN_DURATION.as_secs(),
        MAX_DURATION.as_secs()
    )
}

/// `v` as an integer when it is a finite float with no fractional part.
fn whole(v: f64) -> Option<i128> {
    // Beyond 2^100 the exact value does not matter: it is out of every range.
    (v.is_finite() && v.fract() == 0.0).then(|| v.clamp(-1e30, 1e30) as i128)
}

/// Reads a whole number in `min..=max` from any number a spec may hold
/// (TOML and JSON integers of any size and sign, floats like `1e3`), with a
/// message that says what is wrong with the value rather than with its Rust type.
fn whole_in_range<'de, D: Deserializer<'de>>(d: D, min: u64, max: u64) -> Result<u64, D::Error> {
    struct Visitor {
        min: u64,
        max: u64,
    }
    impl Visitor {
        fn check<E: serde::de::Error>(
            &self,
            v: i128,
            shown: &dyn std::fmt::Display,
        ) -> Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
                _ => Err(E::custom(out_of_range(shown, self.min, self.max))),
            }
        }
    }
    impl serde::de::Visitor<'_> for Visitor {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a whole number from {} to {}", self.min, self.max)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            self.check(i128::from(v), &v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            self.check(i128::from(v), &v)
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<u64, E> {
            self.check(i128::try_from(v).unwrap_or(i128::MAX), &v)
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<u64, E> {
            self.check(v, &v)
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u64, E> {
            match whole(v) {
                Some(w) => self.check(w, &v),
                None => Err(E::custom(format!("{v} is not a whole number"))),
            }
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            Err(E::custom(format!(
                "expected a whole number from {} to {}, got the string {v:?} (write it without quotes)",
                self.min, self.max
            )))
        }
    }
    d.deserialize_any(Visitor { min, max })
}

fn out_of_range(v: &dyn std::fmt::Display, min: u64, max: u64) -> String {
    format!("{v} is out of range ({min} to {max})")
}

fn de_count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    whole_in_range(d, 1, u64::from(MAX_VMS)).map(|v| v as u32)
}

fn de_cpus<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    whole_in_range(d, 1, u64::from(MAX_CPUS)).map(|v| v as u32)
}

fn de_memory_mb<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    whole_in_range(d, MIN_MEMORY_MB, MAX_MEMORY_MB)
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
    #[serde(deserialize_with = "de_count")]
    pub count: u32,
    #[serde(deserialize_with = "de_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "one", deserialize_with = "de_cpus")]
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
    /// The longest the lease may be renewed to (`workspace renew`): the
    /// pilot jobs ask the batch system for this walltime instead of
    /// `duration`. At least `duration`; none means no room to renew beyond
    /// the pilots' startup slack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<LeaseDuration>,
    #[serde(rename = "group")]
    pub groups: Vec<GroupSpec>,
    /// SSH public key put into every VM's context (cloud-init `ssh_authorized_keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
    /// `best_effort` (default), `reservation` (needs `start`), `immediate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<LeaseKind>,
    /// A reservation's start (see [`crate::lease`]); absolute once accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Start>,
    /// What happens when the batch system takes a node of the lease back:
    /// `"suspend"` (every VM saved, resumed in new slots) or `"end"` (the
    /// workspace is `preempted`). Unset: suspend where every node of the
    /// lease has a checkpoint store, else end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_preempt: Option<PreemptChoice>,
    /// How urgent the lease is (issue 17, docs/POOL.md): 0 best effort
    /// (the default), 1 served from idle pool capacity before anything
    /// else, 2 as 1 and may share a node with running VMs under CPU caps.
    /// Who may ask for 1 or 2 is `max_urgency` in the user's `[[users]]`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub urgency: u8,
}

/// Highest urgency a spec may ask for (the launch's, too).
pub use crate::pilot::MAX_URGENCY;

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The spec's `on_preempt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptChoice {
    /// Suspend every VM of the workspace and resume them in new slots.
    Suspend,
    /// End the workspace (`preempted`).
    End,
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

/// An error at key `path` (`.` for the document itself) and 1-based
/// (line, column): a field error when a key is known, else a syntax error.
fn located(
    format: &'static str,
    path: &str,
    message: &str,
    at: Option<(usize, usize)>,
) -> SpecError {
    match (path, at) {
        (".", Some((line, column))) => SpecError::Syntax {
            format,
            message: format!("line {line}, column {column}: {message}"),
        },
        (".", None) => SpecError::Syntax {
            format,
            message: message.to_string(),
        },
        (field, Some((line, column))) => {
            invalid(field, format!("{message} (line {line}, column {column})"))
        }
        (field, None) => invalid(field, message),
    }
}

/// serde_json's message without the position it appends, and the position.
fn json_message(e: &serde_json::Error) -> (String, Option<(usize, usize)>) {
    let text = e.to_string();
    if e.line() == 0 {
        return (text, None);
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
    (message, Some((e.line(), e.column())))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
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
    /// A value of the wrong type or size is named by its key path and
    /// position (`group[0].count: 4294967296 is out of range (1 to 4096)
    /// (line 7, column 9)`), a syntax error by its position.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let spec = if text.trim_start().starts_with('{') {
            Self::from_json(text)?
        } else {
            Self::from_toml(text)?
        };
        spec.validate()?;
        Ok(spec)
    }

    fn from_toml(text: &str) -> Result<Self, SpecError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = inner.span().map(|s| line_column(text, s.start));
            located("TOML", &path, inner.message().trim_end(), at)
        })
    }

    fn from_json(text: &str) -> Result<Self, SpecError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let spec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let (message, at) = json_message(&inner);
            located("JSON", &path, &message, at)
        })?;
        de.end().map_err(|e| {
            let (message, at) = json_message(&e);
            located("JSON", ".", &message, at)
        })?;
        Ok(spec)
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name)?;
        if self.urgency > MAX_URGENCY {
            return Err(invalid(
                "urgency",
                format!(
                    "{} is out of range: 0 (best effort), 1 (idle pool capacity first) or 2 (as 1, and may share a node under CPU caps)",
                    self.urgency
                ),
            ));
        }
        let d = self.duration.0;
        if d < MIN_DURATION || d > MAX_DURATION {
            return Err(invalid("duration", duration_out_of_range(d.as_secs())));
        }
        if let Some(LeaseDuration(m)) = self.max_duration {
            if m < d || m > MAX_DURATION {
                return Err(invalid(
                    "max_duration",
                    format!(
                        "{} s is not from duration ({} s) to {} s",
                        m.as_secs(),
                        d.as_secs(),
                        MAX_DURATION.as_secs()
                    ),
                ));
            }
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
                    out_of_range(&g.count, 1, u64::from(MAX_VMS)),
                ));
            }
            if g.memory_mb < MIN_MEMORY_MB || g.memory_mb > MAX_MEMORY_MB {
                return Err(invalid(
                    f("memory_mb"),
                    out_of_range(&g.memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB),
                ));
            }
            if g.cpus == 0 || g.cpus > MAX_CPUS {
                return Err(invalid(
                    f("cpus"),
                    out_of_range(&g.cpus, 1, u64::from(MAX_CPUS)),
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
        match (self.lease_kind(), self.start) {
            (LeaseKind::Reservation, None) => Err(invalid(
                "start",
                "a reservation needs a start, e.g. start = \"2026-12-01T10:00:00Z\" or \"+2h\"",
            )),
            (kind @ (LeaseKind::BestEffort | LeaseKind::Immediate), Some(_)) => Err(invalid(
                "start",
                format!("only a reservation has a start; this lease is kind = {:?} (drop start, or set kind = \"reservation\")", kind.as_str()),
            )),
            _ => Ok(()),
        }
    }

    /// The lease's kind: as written, else `reservation` when a start is
    /// given, else `best_effort`.
    pub fn lease_kind(&self) -> LeaseKind {
        self.kind.unwrap_or(if self.start.is_some() {
            LeaseKind::Reservation
        } else {
            LeaseKind::BestEffort
        })
    }

    /// The walltime the lease's pilot jobs ask for: `max_duration`, else `duration`.
    pub fn walltime(&self) -> Duration {
        self.max_duration
            .map_or(self.duration.0, |m| m.0.max(self.duration.0))
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
        let bad = ENSEMBLE.replace("name = \"head\"", "name = \"worker\"");
        assert!(WorkspaceSpec::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("another group"));
    }

    fn err(text: &str) -> String {
        WorkspaceSpec::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn numbers_of_the_wrong_size_sign_or_type_name_their_field_and_line() {
        // (replace, with, the whole error)
        let cases = [
            (
                "count = 3",
                "count = 1e12",
                "group[0].count: 1000000000000 is out of range (1 to 4096) (line 6, column 9)",
            ),
            (
                "count = 3",
                "count = 4294967296",
                "group[0].count: 4294967296 is out of range (1 to 4096) (line 6, column 9)",
            ),
            (
                "count = 3",
                "count = 2.5",
                "group[0].count: 2.5 is not a whole number (line 6, column 9)",
            ),
            (
                "memory_mb = 1024",
                "memory_mb = -1",
                "group[0].memory_mb: -1 is out of range (16 to 4194304) (line 7, column 13)",
            ),
            (
                "cpus = 2",
                "cpus = \"two\"",
                "group[1].cpus: expected a whole number from 1 to 1024, got the string \"two\" (write it without quotes) (line 14, column 8)",
            ),
            (
                "duration = \"2h\"",
                "duration = -5",
                "duration: -5s is out of range (1s to 31622400s) (line 3, column 12)",
            ),
        ];
        for (from, to, want) in cases {
            assert_eq!(err(&ENSEMBLE.replace(from, to)), want, "{to}");
        }
    }

    #[test]
    fn the_readme_example_error_is_what_a_user_sees() {
        let readme = ENSEMBLE.trim_start().replace("cpus = 2", "cpus = 0");
        assert_eq!(
            err(&readme),
            "group[1].cpus: 0 is out of range (1 to 1024) (line 13, column 8)"
        );
    }

    #[test]
    fn json_errors_name_the_field_and_position() {
        let json = serde_json::to_string(&WorkspaceSpec::parse(ENSEMBLE).unwrap()).unwrap();
        let bad = json.replacen("\"count\":3", "\"count\":\"3\"", 1);
        let e = err(&bad);
        assert!(
            e.starts_with(
                "group[0].count: expected a whole number from 1 to 4096, got the string \"3\""
            ),
            "{e}"
        );
        assert!(e.contains("(line 1, column "), "{e}");
        let bad = json.replacen("\"duration\":7200", "\"duration\":-5", 1);
        assert!(
            err(&bad).starts_with("duration: -5s is out of range"),
            "{}",
            err(&bad)
        );
        let e = err(&format!("{json} trailing"));
        assert!(
            e.starts_with("spec is not valid JSON: line 1, column "),
            "{e}"
        );
        let e = err("{\"name\": \"x\",\n \"duration\": }");
        assert_eq!(e, "duration: expected value (line 2, column 14)");
    }

    #[test]
    fn toml_syntax_errors_give_line_and_column() {
        let bad = ENSEMBLE.replace("duration = \"2h\"", "duration = \"2h");
        assert_eq!(
            err(&bad),
            "spec is not valid TOML: line 3, column 15: invalid basic string"
        );
        let e = err("name = \"x\"\nduration = 5\ngroup = [ = ]\n");
        assert!(
            e.starts_with("spec is not valid TOML: line 3, column 11: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_and_missing_keys_are_named_with_their_group() {
        let e = err(&ENSEMBLE.replace("cpus = 1", "cpu = 1"));
        assert!(e.starts_with("group[0]"), "{e}");
        assert!(e.contains("unknown field `cpu`"), "{e}");
        let e = err(&ENSEMBLE.replace("image = \"head.qcow2\"", ""));
        assert!(e.starts_with("group[1]"), "{e}");
        assert!(e.contains("missing field `image`"), "{e}");
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
    fn urgency_is_zero_unless_asked_and_at_most_two() {
        let s = WorkspaceSpec::parse(ENSEMBLE).unwrap();
        assert_eq!(s.urgency, 0);
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("urgency"), "0 is not written: {json}");
        let s = WorkspaceSpec::parse(&format!("urgency = 2\n{ENSEMBLE}")).unwrap();
        assert_eq!(s.urgency, 2);
        let e = WorkspaceSpec::parse(&format!("urgency = 3\n{ENSEMBLE}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("urgency:") && e.contains("3 is out of range"),
            "{e}"
        );
        let e = WorkspaceSpec::parse(&format!("urgency = -1\n{ENSEMBLE}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("urgency"), "{e}");
    }

    #[test]
    fn duration_accepts_seconds() {
        let s = ENSEMBLE.replace("\"2h\"", "90");
        assert_eq!(WorkspaceSpec::parse(&s).unwrap().duration.0.as_secs(), 90);
    }

    #[test]
    fn lease_kind_and_start_are_read_and_checked_with_the_field_named() {
        assert_eq!(
            WorkspaceSpec::parse(ENSEMBLE).unwrap().lease_kind(),
            LeaseKind::BestEffort
        );
        let at = format!("start = \"2026-12-01T11:00:00+01:00\"\n{ENSEMBLE}");
        let s = WorkspaceSpec::parse(&at).unwrap();
        assert_eq!(s.lease_kind(), LeaseKind::Reservation);
        let bare = format!("start = 2026-12-01T10:00:00Z\n{ENSEMBLE}");
        assert_eq!(WorkspaceSpec::parse(&bare).unwrap().start, s.start);
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("\"start\":\"2026-12-01T10:00:00Z\""),
            "{json}"
        );
        assert_eq!(WorkspaceSpec::parse(&json).unwrap(), s);
        let imm = format!("kind = \"immediate\"\n{ENSEMBLE}");
        assert_eq!(
            WorkspaceSpec::parse(&imm).unwrap().lease_kind(),
            LeaseKind::Immediate
        );
        let e = err(&format!("kind = \"reservation\"\n{ENSEMBLE}"));
        assert!(e.starts_with("start: a reservation needs a start"), "{e}");
        let e = err(&format!(
            "kind = \"immediate\"\nstart = \"+1h\"\n{ENSEMBLE}"
        ));
        assert!(
            e.starts_with("start: only a reservation has a start"),
            "{e}"
        );
        let e = err(&format!("kind = \"soon\"\n{ENSEMBLE}"));
        assert!(e.starts_with("kind: unknown variant `soon`"), "{e}");
        let e = err(&format!("start = \"next tuesday\"\n{ENSEMBLE}"));
        assert!(
            e.starts_with("start: \"next tuesday\" is not a time"),
            "{e}"
        );
        let e = err(&format!("start = 2026-12-01T10:00:00\n{ENSEMBLE}"));
        assert!(e.starts_with("start: "), "{e}");
    }
}
