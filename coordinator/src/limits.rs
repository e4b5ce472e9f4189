//! Limits per user (`[[users]]` keys `max_vms`, `max_memory_mb`,
//! `max_lease_s`, `max_workspaces`): what one user may hold at once, over
//! all their live workspaces (pending to destroying), and the longest lease.
//! Checked when a workspace is created (in the transaction that stores it,
//! so two requests at once cannot both pass) and when a lease is renewed.
//! Reloaded with the users on SIGHUP. A user without a key has no limit.

use serde::{Deserialize, Serialize};

/// One user's limits; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Limits {
    pub max_vms: Option<u32>,
    pub max_memory_mb: Option<u64>,
    pub max_lease_s: Option<u64>,
    pub max_workspaces: Option<u32>,
}

/// What a user holds now, over their live workspaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub workspaces: u32,
    pub vms: u32,
    pub memory_mb: u64,
}

/// A request over one of the caller's limits: which limit, its value, and
/// what the request would have made of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("over your limit {limit} = {value}: {detail}")]
pub struct OverLimit {
    /// The `[[users]]` key (`max_vms`, ...).
    pub limit: &'static str,
    pub value: u64,
    pub detail: String,
}

impl Limits {
    /// Checks a new workspace of `vms` VMs, `memory_mb` in all, leased for
    /// `lease_s`, on top of what the user holds.
    pub fn check_new(
        &self,
        held: Usage,
        vms: u32,
        memory_mb: u64,
        lease_s: u64,
    ) -> Result<(), OverLimit> {
        if let Some(max) = self.max_workspaces {
            if held.workspaces + 1 > max {
                return Err(OverLimit {
                    limit: "max_workspaces",
                    value: max.into(),
                    detail: format!("you hold {} live workspace(s) already", held.workspaces),
                });
            }
        }
        if let Some(max) = self.max_vms {
            if u64::from(held.vms) + u64::from(vms) > u64::from(max) {
                return Err(OverLimit {
                    limit: "max_vms",
                    value: max.into(),
                    detail: format!("{vms} VM(s) asked, {} held", held.vms),
                });
            }
        }
        if let Some(max) = self.max_memory_mb {
            if held.memory_mb.saturating_add(memory_mb) > max {
                return Err(OverLimit {
                    limit: "max_memory_mb",
                    value: max,
                    detail: format!("{memory_mb} MB asked, {} MB held", held.memory_mb),
                });
            }
        }
        self.check_lease(lease_s)
    }

    /// Checks a lease's whole length (asked at create, or after a renewal).
    pub fn check_lease(&self, lease_s: u64) -> Result<(), OverLimit> {
        if let Some(max) = self.max_lease_s {
            if lease_s > max {
                return Err(OverLimit {
                    limit: "max_lease_s",
                    value: max,
                    detail: format!("a lease of {lease_s} s asked"),
                });
            }
        }
        Ok(())
    }

    /// The config check: a limit of 0 would refuse everything (leave the key out instead).
    pub fn validate(&self, user: &str) -> Result<(), String> {
        let zero = [
            ("max_vms", self.max_vms.map(u64::from)),
            ("max_memory_mb", self.max_memory_mb),
            ("max_lease_s", self.max_lease_s),
            ("max_workspaces", self.max_workspaces.map(u64::from)),
        ]
        .into_iter()
        .find(|(_, v)| *v == Some(0));
        match zero {
            Some((key, _)) => Err(format!(
                "{key} (user {user:?}) = 0 would refuse every request; remove the user, or the key for no limit"
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_refuses_with_its_name_and_value() {
        let l = Limits {
            max_vms: Some(4),
            max_memory_mb: Some(4096),
            max_lease_s: Some(3600),
            max_workspaces: Some(2),
        };
        let held = Usage {
            workspaces: 1,
            vms: 2,
            memory_mb: 1024,
        };
        assert_eq!(l.check_new(held, 2, 2048, 3600), Ok(()));
        assert_eq!(l.check_new(held, 3, 512, 60).unwrap_err().limit, "max_vms");
        let e = l.check_new(held, 1, 4000, 60).unwrap_err();
        assert_eq!((e.limit, e.value), ("max_memory_mb", 4096));
        assert!(e.to_string().contains("max_memory_mb = 4096"), "{e}");
        assert_eq!(
            l.check_new(held, 1, 1, 3601).unwrap_err().limit,
            "max_lease_s"
        );
        let two = Usage {
            workspaces: 2,
            ..held
        };
        assert_eq!(
            l.check_new(two, 1, 1, 1).unwrap_err().limit,
            "max_workspaces"
        );
        assert_eq!(
            Limits::default().check_new(two, 999, u64::MAX, u64::MAX),
            Ok(())
        );
        assert!(Limits {
            max_vms: Some(0),
            ..l
        }
        .validate("a")
        .is_err());
    }
}
