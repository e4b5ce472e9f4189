//! Identifiers and the VM name tag.
//!
//! Ids are short, random, prefixed strings (`ws-1a2b3c4d`, `sl-…`, `vm-…`,
//! `pi-…`) so that they are readable in logs and safe in file names and
//! batch job names. A VM's hypervisor name is `wsp-<slot>-<vm>`: from the name
//! alone kill-all can tell which slot owns a guest.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Error for a string that is not a well-formed id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} id {value:?}: expected {prefix}- followed by 8 to 32 lowercase hex digits")]
pub struct IdError {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
        .collect()
}

fn valid(prefix: &str, s: &str) -> bool {
    match s.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) {
        Some(hex) => {
            (8..=32).contains(&hex.len())
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        None => false,
    }
}

macro_rules! id_type {
    ($name:ident, $prefix:literal, $kind:literal, $len:literal) => {
        #[doc = concat!("A ", $kind, " id: `", $prefix, "-` and hex digits.")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh random id.
            pub fn generate() -> Self {
                Self(format!("{}-{}", $prefix, random_hex($len)))
            }
            /// Parses and validates an id.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                if valid($prefix, s) {
                    Ok(Self(s.to_string()))
                } else {
                    Err(IdError {
                        kind: $kind,
                        prefix: $prefix,
                        value: s.to_string(),
                    })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

id_type!(WorkspaceId, "ws", "workspace", 8);
id_type!(SlotId, "sl", "slot", 8);
id_type!(VmId, "vm", "vm", 8);
id_type!(PilotId, "pi", "pilot instance", 16);

/// The hypervisor name of a VM: `wsp-<slot id>-<vm id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VmName {
    pub slot: SlotId,
    pub vm: VmId,
}

/// Every guest the pilot creates has a name that starts with this tag.
pub const VM_NAME_PREFIX: &str = "wsp-";

impl VmName {
    pub fn new(slot: SlotId, vm: VmId) -> Self {
        Self { slot, vm }
    }
    /// Recovers slot and VM ids from a guest name; `None` if the guest is
    /// not one of ours.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(VM_NAME_PREFIX)?;
        let idx = rest.find("-vm-")?;
        let slot = SlotId::parse(&rest[..idx]).ok()?;
        let vm = VmId::parse(&rest[idx + 1..]).ok()?;
        Some(Self { slot, vm })
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}-{}", VM_NAME_PREFIX, self.slot, self.vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let s = SlotId::generate();
        assert_eq!(SlotId::parse(s.as_str()), Ok(s.clone()));
        assert!(PilotId::generate().as_str().len() == 3 + 16);
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_kind_named() {
        let e = WorkspaceId::parse("ws-XYZ").unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
        assert!(SlotId::parse("ws-12345678").is_err());
        assert!(VmId::parse("vm-1234567").is_err());
        assert!(VmId::parse("vm-12345678/../x").is_err());
    }

    #[test]
    fn vm_name_round_trips_and_rejects_foreign_guests() {
        let n = VmName::new(SlotId::generate(), VmId::generate());
        assert_eq!(VmName::parse(&n.to_string()), Some(n.clone()));
        assert_eq!(VmName::parse("Domain-0"), None);
        assert_eq!(VmName::parse("wsp-sl-zz-vm-12345678"), None);
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let ok: Result<SlotId, _> = serde_json::from_str("\"sl-0123abcd\"");
        assert!(ok.is_ok());
        let bad: Result<SlotId, _> = serde_json::from_str("\"sl-../../etc\"");
        assert!(bad.is_err());
    }
}
