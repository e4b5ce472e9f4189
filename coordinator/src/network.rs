//! Workspace control on the coordinator's side: the address pools of
//! `[network]`, MAC derivation, and where a VM's image comes from (`[images]`).
//!
//! Pure functions and config types, no I/O: the engine stores what they
//! decide (the `addresses` table) and puts it into each `VmLaunch`. Not here:
//! anything done on a node (bridges, DHCP, the image cache live in the pilot).

use protocol::pilot::ImageSource;
use protocol::spec::GroupSpec;
use protocol::{VmId, WorkspaceId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// One address pool (`[network.private]`, `[network.public]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The subnet, e.g. `10.77.0.0/24`.
    pub cidr: String,
    /// The router VMs are told about (never handed out).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Part of the subnet to hand out, `"10.77.0.10-10.77.0.250"`; default:
    /// every host address except the gateway.
    #[serde(default)]
    pub range: Option<String>,
}

/// `[network]`: without it VMs get no NICs (the driver's default network, if any).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Every VM gets one address from here.
    pub private: Option<PoolConfig>,
    /// VMs of groups with `public_ip = true` get a second one from here.
    pub public: Option<PoolConfig>,
}

/// `[images]`: where image names of specs resolve.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// A directory (absolute path, as the nodes see it) or an `http(s)://` base
    /// URL. Names that are not URLs, absolute paths or `kernel:` boots are
    /// looked up here. Unset: names are left to the node's driver.
    pub repository: Option<String>,
}

/// A parsed pool: what may be handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub network: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub first: u32,
    pub last: u32,
}

/// A pool or address the config or the request gets wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error("[network.{pool}] {message}")]
    Config { pool: String, message: String },
    #[error("address pool {pool:?} is exhausted: {needed} more address(es) needed, {free} free ({range})")]
    Exhausted {
        pool: String,
        needed: usize,
        free: usize,
        range: String,
    },
    #[error(
        "group {group:?} asks public_ip = true, but the coordinator has no [network.public] pool"
    )]
    NoPublicPool { group: String },
}

impl Pool {
    /// Parses and checks a pool of the config.
    pub fn parse(name: &str, c: &PoolConfig) -> Result<Self, NetError> {
        let bad = |message: String| NetError::Config {
            pool: name.to_string(),
            message,
        };
        let net: ipnet::Ipv4Net = c
            .cidr
            .parse()
            .map_err(|_| bad(format!("cidr {:?}: expected a.b.c.d/len", c.cidr)))?;
        let prefix_len = net.prefix_len();
        if !(8..=30).contains(&prefix_len) {
            return Err(bad(format!(
                "cidr {:?}: prefix length must be 8..=30",
                c.cidr
            )));
        }
        let (net, bcast) = (u32::from(net.network()), u32::from(net.broadcast()));
        let inside = |ip: u32| ip > net && ip < bcast;
        if let Some(g) = c.gateway {
            if !inside(u32::from(g)) {
                return Err(bad(format!(
                    "gateway {g} is not a host address of {}",
                    c.cidr
                )));
            }
        }
        let (first, last) = match &c.range {
            None => (net + 1, bcast - 1),
            Some(r) => {
                let (a, b) = r
                    .split_once('-')
                    .ok_or_else(|| bad(format!("range {r:?}: expected first-last")))?;
                let a: Ipv4Addr = a
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("range {r:?}: bad first address")))?;
                let b: Ipv4Addr = b
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("range {r:?}: bad last address")))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if !inside(a) || !inside(b) || a > b {
                    return Err(bad(format!(
                        "range {r:?} must be first <= last, both host addresses of {}",
                        c.cidr
                    )));
                }
                (a, b)
            }
        };
        Ok(Pool {
            name: name.to_string(),
            network: Ipv4Addr::from(net),
            prefix_len,
            gateway: c.gateway,
            first,
            last,
        })
    }

    fn range_text(&self) -> String {
        format!(
            "{}-{}",
            Ipv4Addr::from(self.first),
            Ipv4Addr::from(self.last)
        )
    }

    /// The lowest `n` addresses of the range not in `used` (and not the
    /// gateway); all or nothing.
    pub fn allocate(&self, used: &HashSet<Ipv4Addr>, n: usize) -> Result<Vec<Ipv4Addr>, NetError> {
        let mut out = Vec::with_capacity(n);
        let mut ip = self.first;
        while out.len() < n && ip <= self.last {
            let a = Ipv4Addr::from(ip);
            if Some(a) != self.gateway && !used.contains(&a) {
                out.push(a);
            }
            ip += 1;
        }
        if out.len() < n {
            return Err(NetError::Exhausted {
                pool: self.name.clone(),
                needed: n,
                free: out.len(),
                range: self.range_text(),
            });
        }
        Ok(out)
    }
}

/// The parsed pools of `[network]`.
#[derive(Clone, Debug, Default)]
pub struct Pools {
    pub private: Option<Pool>,
    pub public: Option<Pool>,
}

impl Pools {
    pub fn from_config(c: &NetworkConfig) -> Result<Self, NetError> {
        let private = c
            .private
            .as_ref()
            .map(|p| Pool::parse("private", p))
            .transpose()?;
        let public = c
            .public
            .as_ref()
            .map(|p| Pool::parse("public", p))
            .transpose()?;
        if public.is_some() && private.is_none() {
            return Err(NetError::Config {
                pool: "public".into(),
                message: "needs a [network.private] pool too (every VM has a private address)"
                    .into(),
            });
        }
        if let (Some(a), Some(b)) = (&private, &public) {
            if a.first <= b.last && b.first <= a.last {
                return Err(NetError::Config {
                    pool: "public".into(),
                    message: "overlaps [network.private]".into(),
                });
            }
        }
        Ok(Pools { private, public })
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        match name {
            "private" => self.private.as_ref(),
            "public" => self.public.as_ref(),
            _ => None,
        }
    }
}

/// A locally administered unicast MAC derived from the workspace and VM ids
/// (and the NIC index): `02:` then 5 bytes of SHA-256. Stable, so a
/// recovered coordinator computes the same one.
pub fn derive_mac(ws: &WorkspaceId, vm: &VmId, nic: usize) -> String {
    let mut h = Sha256::new();
    h.update(ws.as_str().as_bytes());
    h.update([0]);
    h.update(vm.as_str().as_bytes());
    h.update([0, nic as u8]);
    let d = h.finalize();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        d[0], d[1], d[2], d[3], d[4]
    )
}

/// Host name of the `idx`-th VM of `group` (`worker-0`, `head-0`).
pub fn hostname(group: &str, idx: u32) -> String {
    let g: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("{}-{idx}", g.trim_matches('-'))
}

/// Where the pilot fetches a group's image: URLs as given, names in the
/// repository. `None` for `kernel:` boots, absolute paths and, without a
/// repository, plain names (the driver resolves those, as before).
pub fn image_source(images: &ImagesConfig, g: &GroupSpec) -> Option<ImageSource> {
    let image = g.image.trim();
    if image.starts_with("kernel:") {
        return None;
    }
    let is_url = ["http://", "https://", "file://"]
        .iter()
        .any(|p| image.starts_with(p));
    let url = if is_url {
        image.to_string()
    } else if image.starts_with('/') {
        // An absolute path on the nodes: the driver's business, as before.
        return None;
    } else {
        let repo = images.repository.as_deref()?.trim_end_matches('/');
        format!("{repo}/{}", image.trim_start_matches('/'))
    };
    Some(ImageSource {
        url,
        sha256: g.image_sha256.as_ref().map(|s| s.to_ascii_lowercase()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, gw: Option<&str>, range: Option<&str>) -> Result<Pool, NetError> {
        Pool::parse(
            "private",
            &PoolConfig {
                cidr: cidr.into(),
                gateway: gw.map(|g| g.parse().unwrap()),
                range: range.map(String::from),
            },
        )
    }

    #[test]
    fn pools_hand_out_the_lowest_free_addresses_and_skip_the_gateway() {
        let p = pool("10.77.0.0/24", Some("10.77.0.1"), None).unwrap();
        let got = p.allocate(&HashSet::new(), 2).unwrap();
        assert_eq!(
            got,
            vec![
                "10.77.0.2".parse::<Ipv4Addr>().unwrap(),
                "10.77.0.3".parse().unwrap()
            ]
        );
        let used: HashSet<Ipv4Addr> = got.into_iter().collect();
        assert_eq!(p.allocate(&used, 1).unwrap()[0].to_string(), "10.77.0.4");
    }

    #[test]
    fn an_exhausted_pool_names_itself_and_gives_nothing() {
        let p = pool("10.77.0.0/24", None, Some("10.77.0.10-10.77.0.11")).unwrap();
        let e = p.allocate(&HashSet::new(), 3).unwrap_err();
        assert!(e.to_string().contains("\"private\" is exhausted"), "{e}");
        assert!(matches!(e, NetError::Exhausted { free: 2, .. }));
    }

    #[test]
    fn bad_pools_are_refused_with_the_key() {
        assert!(pool("10.77.0.0", None, None).is_err());
        assert!(pool("10.77.0.0/24", Some("10.78.0.1"), None).is_err());
        let e = pool("10.77.0.0/24", None, Some("10.77.0.9-10.77.0.2")).unwrap_err();
        assert!(e.to_string().starts_with("[network.private] range"), "{e}");
    }

    #[test]
    fn macs_are_locally_administered_unicast_and_stable() {
        let (w, v) = (WorkspaceId::generate(), VmId::generate());
        let m = derive_mac(&w, &v, 0);
        assert_eq!(m, derive_mac(&w, &v, 0));
        assert_ne!(m, derive_mac(&w, &v, 1));
        assert!(m.starts_with("02:") && m.len() == 17, "{m}");
    }

    #[test]
    fn image_names_resolve_in_the_repository_and_urls_pass_through() {
        let g = |image: &str| GroupSpec {
            name: "g".into(),
            count: 1,
            memory_mb: 64,
            cpus: 1,
            image: image.into(),
            image_sha256: Some("AB".repeat(32)),
            public_ip: false,
        };
        let none = ImagesConfig::default();
        let repo = ImagesConfig {
            repository: Some("http://repo:8000/img/".into()),
        };
        assert_eq!(image_source(&none, &g("worker.qcow2")), None);
        assert_eq!(image_source(&repo, &g("kernel:")), None);
        let s = image_source(&repo, &g("worker.qcow2")).unwrap();
        assert_eq!(s.url, "http://repo:8000/img/worker.qcow2");
        assert_eq!(s.sha256.unwrap(), "ab".repeat(32));
        assert_eq!(
            image_source(&none, &g("https://x/y.raw")).unwrap().url,
            "https://x/y.raw"
        );
        assert_eq!(image_source(&repo, &g("/srv/a.raw")), None);
        let dir = ImagesConfig {
            repository: Some("/srv/images".into()),
        };
        assert_eq!(
            image_source(&dir, &g("a.raw")).unwrap().url,
            "/srv/images/a.raw"
        );
    }
}
