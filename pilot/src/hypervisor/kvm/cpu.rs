//! CPU shares of kvm guests: one cgroup per VM, at
//! `<hierarchy>/<[kvm] cgroup_parent>/<node>/<vm name>`, holding its QEMU.
//!
//! cgroup v2 (`cpu.weight`, `cpu.max`) where the unified hierarchy has the
//! cpu controller, else cgroup v1's cpu controller (`cpu.shares`,
//! `cpu.cfs_quota_us` over `cpu.cfs_period_us`); found in
//! `/proc/self/mountinfo` when the driver opens, and when neither can be
//! used the reason says what was found. Writes go directly, or through
//! `[kvm] privileged_prefix` (`mkdir -p`, `tee`, `rmdir`). Not the share's
//! meaning (protocol `CpuShare`) nor the pilot's commands.

use super::run_bounded;
use crate::hypervisor::HvError;
use protocol::pilot::{CpuControl, CpuShare, DEFAULT_CPU_WEIGHT};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The CFS period caps are expressed over (100 ms, both versions' default).
const PERIOD_US: u64 = 100_000;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which cgroup interface a node uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A hierarchy that can carry CPU shares: its version and mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    pub mount: PathBuf,
}

/// Finds the hierarchy to use in `mountinfo` (the text of
/// `/proc/self/mountinfo`): cgroup v2 when its root lists the cpu
/// controller (`controllers_of` reads `cgroup.controllers`), else a v1
/// mount with the cpu controller. `Err` says what was found instead.
pub fn find_hierarchy(
    mountinfo: &str,
    controllers_of: &dyn Fn(&Path) -> Option<String>,
) -> Result<Hierarchy, String> {
    let mut v2 = None;
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount) = left.split_whitespace().nth(4) else {
            continue;
        };
        let mut r = right.split_whitespace();
        let (fstype, _source, options) = (r.next(), r.next(), r.next().unwrap_or(""));
        match fstype {
            Some("cgroup2") if v2.is_none() => v2 = Some(PathBuf::from(mount)),
            Some("cgroup") if v1.is_none() && options.split(',').any(|o| o == "cpu") => {
                v1 = Some(PathBuf::from(mount))
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    if let Some(m) = &v2 {
        let ctl = controllers_of(&m.join("cgroup.controllers")).unwrap_or_default();
        if ctl.split_whitespace().any(|c| c == "cpu") {
            return Ok(Hierarchy {
                version: Version::V2,
                mount: m.clone(),
            });
        }
        found.push(format!(
            "cgroup2 at {} without the cpu controller (controllers: {})",
            m.display(),
            if ctl.trim().is_empty() {
                "none"
            } else {
                ctl.trim()
            }
        ));
    }
    if let Some(m) = v1 {
        return Ok(Hierarchy {
            version: Version::V1,
            mount: m,
        });
    }
    found.push("no cgroup v1 hierarchy with the cpu controller".into());
    Err(found.join("; "))
}

/// The node's VM cgroups, or why there are none.
#[derive(Clone, Debug)]
pub struct CpuCgroups {
    /// The hierarchy and the node's directory in it.
    found: Result<(Hierarchy, PathBuf), String>,
    privileged: Vec<String>,
}

impl CpuCgroups {
    /// `mode`: `auto` or `off` (`[kvm] cgroup`); `parent`: the node's
    /// directories go under it (relative to the hierarchy's root).
    pub fn detect(mode: &str, parent: &str, node: &str, privileged: &[String]) -> Self {
        let found = match mode {
            "off" => Err("[kvm] cgroup = \"off\"".to_string()),
            "auto" => {
                let info = std::fs::read_to_string("/proc/self/mountinfo")
                    .map_err(|e| format!("/proc/self/mountinfo: {e}"));
                info.and_then(|i| find_hierarchy(&i, &|p| std::fs::read_to_string(p).ok()))
                    .and_then(|h| {
                        let rel = parent.trim_matches('/');
                        if rel.is_empty() || rel.split('/').any(|c| c == ".." || c == ".") {
                            return Err(format!(
                                "[kvm] cgroup_parent {parent:?}: expected a relative path such as \"workspace-pilot\""
                            ));
                        }
                        let dir = h.mount.join(rel).join(node);
                        writable(&dir, privileged).map(|()| (h, dir))
                    })
            }
            other => Err(format!("[kvm] cgroup {other:?}: expected auto or off")),
        };
        Self {
            found,
            privileged: privileged.to_vec(),
        }
    }

    /// What `reserved` says.
    pub fn control(&self) -> CpuControl {
        match &self.found {
            Ok((h, dir)) => CpuControl {
                available: true,
                mechanism: format!(
                    "cgroup {} {}",
                    match h.version {
                        Version::V1 => "v1",
                        Version::V2 => "v2",
                    },
                    dir.display()
                ),
                reason: None,
            },
            Err(why) => CpuControl {
                available: false,
                mechanism: "cgroup".into(),
                reason: Some(why.clone()),
            },
        }
    }

    pub fn available(&self) -> bool {
        self.found.is_ok()
    }

    fn unavailable(&self) -> HvError {
        HvError::NoCpuControl(
            self.control()
                .reason
                .unwrap_or_else(|| "no cgroup".to_string()),
        )
    }

    /// The cgroup VM `name` would have (`None` when shares are unavailable).
    pub fn vm_dir(&self, name: &str) -> Option<PathBuf> {
        self.found.as_ref().ok().map(|(_, d)| d.join(name))
    }

    fn version(&self) -> Result<Version, HvError> {
        self.found
            .as_ref()
            .map(|(h, _)| h.version)
            .map_err(|_| self.unavailable())
    }

    /// Creates VM `dir` (and the levels above it) and, on v2, enables the
    /// cpu controller for the levels that hold it.
    pub fn create(&self, dir: &Path) -> Result<(), HvError> {
        let (h, node_dir) = self.found.as_ref().map_err(|_| self.unavailable())?;
        if !dir.starts_with(node_dir) {
            return Err(HvError::Config(format!(
                "cgroup {} is not under {}",
                dir.display(),
                node_dir.display()
            )));
        }
        self.mkdir(dir)?;
        if h.version == Version::V2 {
            // Every level from the hierarchy's root down to the node's
            // directory distributes the cpu controller to its children.
            let mut levels = vec![h.mount.clone()];
            let rel = node_dir.strip_prefix(&h.mount).unwrap_or(node_dir);
            let mut p = h.mount.clone();
            for c in rel.components() {
                p.push(c);
                levels.push(p.clone());
            }
            for l in levels {
                let sub = l.join("cgroup.subtree_control");
                let on = std::fs::read_to_string(&sub)
                    .map(|t| t.split_whitespace().any(|c| c == "cpu"))
                    .unwrap_or(false);
                if !on {
                    self.write(&sub, "+cpu")?;
                }
            }
        }
        Ok(())
    }

    /// Writes `cpu` into VM cgroup `dir` (the default share lifts a cap).
    pub fn apply(&self, dir: &Path, cpu: &CpuShare) -> Result<(), HvError> {
        let w = u64::from(cpu.weight_or_default());
        match self.version()? {
            Version::V2 => {
                self.write(&dir.join("cpu.weight"), &w.to_string())?;
                let max = match cpu.cap_pct {
                    Some(c) => format!("{} {PERIOD_US}", quota_us(c)),
                    None => format!("max {PERIOD_US}"),
                };
                self.write(&dir.join("cpu.max"), &max)
            }
            Version::V1 => {
                let shares = (w * 1024 / u64::from(DEFAULT_CPU_WEIGHT)).max(2);
                self.write(&dir.join("cpu.shares"), &shares.to_string())?;
                self.write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let quota = cpu
                    .cap_pct
                    .map_or_else(|| "-1".to_string(), |c| quota_us(c).to_string());
                self.write(&dir.join("cpu.cfs_quota_us"), &quota)
            }
        }
    }

    /// Moves process `pid` (all its threads) into VM cgroup `dir`.
    pub fn attach(&self, dir: &Path, pid: u32) -> Result<(), HvError> {
        self.write(&dir.join("cgroup.procs"), &pid.to_string())
    }

    /// What VM cgroup `dir` holds now, as a share (for tests and checks).
    pub fn read(&self, dir: &Path) -> Result<CpuShare, HvError> {
        let get = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p)
                .map(|t| t.trim().to_string())
                .map_err(|e| HvError::Io { path: p, source: e })
        };
        let (weight, quota, period) = match self.version()? {
            Version::V2 => {
                let w: u64 = get("cpu.weight")?.parse().unwrap_or(100);
                let max = get("cpu.max")?;
                let mut m = max.split_whitespace();
                let q = m.next().unwrap_or("max").parse::<u64>().ok();
                let per = m.next().and_then(|p| p.parse().ok()).unwrap_or(PERIOD_US);
                (w, q, per)
            }
            Version::V1 => {
                let s: u64 = get("cpu.shares")?.parse().unwrap_or(1024);
                let q = get("cpu.cfs_quota_us")?
                    .parse::<i64>()
                    .ok()
                    .filter(|q| *q > 0);
                let per = get("cpu.cfs_period_us")?.parse().unwrap_or(PERIOD_US);
                (
                    s * u64::from(DEFAULT_CPU_WEIGHT) / 1024,
                    q.map(|q| q as u64),
                    per,
                )
            }
        };
        Ok(CpuShare {
            weight: Some(weight as u32).filter(|w| *w != DEFAULT_CPU_WEIGHT),
            cap_pct: quota.map(|q| (q * 100 / period.max(1)) as u32),
        })
    }

    /// Removes VM cgroup `dir` once its processes are gone (bounded), and
    /// the node's directory when it is empty.
    pub fn remove(&self, dir: &Path) -> Result<(), HvError> {
        if !dir.exists() {
            return Ok(());
        }
        let start = Instant::now();
        loop {
            match self.rmdir(dir) {
                Ok(()) => break,
                // A process that just exited may still be counted.
                Err(e) if start.elapsed() < Duration::from_secs(2) => {
                    tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup busy; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(parent) = dir.parent() {
            // Others' VMs may still be in it: fine.
            let _ = self.rmdir(parent);
        }
        Ok(())
    }

    fn mkdir(&self, dir: &Path) -> Result<(), HvError> {
        if self.privileged.is_empty() {
            return std::fs::create_dir_all(dir).map_err(|e| HvError::Io {
                path: dir.to_path_buf(),
                source: e,
            });
        }
        self.privileged_run(&["mkdir", "-p"], dir, None)
    }

    fn rmdir(&self, dir: &Path) -> Result<(), HvError> {
        if self.privileged.is_empty() {
            return match std::fs::remove_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HvError::Io {
                    path: dir.to_path_buf(),
                    source: e,
                }),
                _ => Ok(()),
            };
        }
        self.privileged_run(&["rmdir"], dir, None)
    }

    fn write(&self, file: &Path, value: &str) -> Result<(), HvError> {
        if self.privileged.is_empty() {
            return std::fs::write(file, value).map_err(|e| HvError::Io {
                path: file.to_path_buf(),
                source: e,
            });
        }
        self.privileged_run(&["tee"], file, Some(value))
    }

    fn privileged_run(
        &self,
        args: &[&str],
        path: &Path,
        stdin: Option<&str>,
    ) -> Result<(), HvError> {
        let (prog, pre) = self
            .privileged
            .split_first()
            .ok_or_else(|| HvError::Config("empty privileged prefix".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(pre).args(args).arg(path);
        let shown = format!(
            "{} {} {}",
            self.privileged.join(" "),
            args.join(" "),
            path.display()
        );
        run_bounded(
            cmd,
            stdin.map(|s| s.as_bytes().to_vec()),
            WRITE_TIMEOUT,
            &shown,
        )
        .map(|_| ())
    }
}

/// A cap in percent of one CPU as a CFS quota per [`PERIOD_US`] (at least
/// the 1 ms both versions accept).
fn quota_us(cap_pct: u32) -> u64 {
    (u64::from(cap_pct) * PERIOD_US / 100).max(1000)
}

/// Whether this process can make `dir`: with a privileged prefix it is
/// assumed (sudo decides); else the deepest existing level must be writable.
fn writable(dir: &Path, privileged: &[String]) -> Result<(), String> {
    if !privileged.is_empty() {
        return Ok(());
    }
    let mut p = dir;
    while !p.exists() {
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).map_err(|e| {
        format!(
            "{} is not writable by uid {} ({e}): run the pilot as root, delegate the \
             directory to its user, or set [kvm] privileged_prefix = [\"sudo\", \"-n\"]",
            p.display(),
            nix::unistd::getuid()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
33 30 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn v2_with_the_cpu_controller_wins_else_v1_cpu_else_the_reason() {
        let with_cpu = |_: &Path| Some("cpuset cpu io memory pids".to_string());
        let hugetlb_only = |_: &Path| Some("hugetlb".to_string());
        assert_eq!(
            find_hierarchy(UNIFIED, &with_cpu),
            Ok(Hierarchy {
                version: Version::V2,
                mount: "/sys/fs/cgroup".into()
            })
        );
        // This host's layout: cpu is a v1 controller, the unified tree has none.
        assert_eq!(
            find_hierarchy(HYBRID, &hugetlb_only),
            Ok(Hierarchy {
                version: Version::V1,
                mount: "/sys/fs/cgroup/cpu".into()
            })
        );
        let e = find_hierarchy(UNIFIED, &hugetlb_only).unwrap_err();
        assert!(
            e.contains(
                "cgroup2 at /sys/fs/cgroup without the cpu controller (controllers: hugetlb)"
            ) && e.contains("no cgroup v1 hierarchy with the cpu controller"),
            "{e}"
        );
        // cpuacct alone is not cpu.
        let e = find_hierarchy(
            "34 30 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n",
            &hugetlb_only,
        )
        .unwrap_err();
        assert!(e.contains("no cgroup v1"), "{e}");
    }

    #[test]
    fn off_and_bad_parents_are_reported_as_unavailable() {
        let c = CpuCgroups::detect("off", "workspace-pilot", "n1", &[]);
        assert!(!c.available());
        assert_eq!(
            c.control().reason.as_deref(),
            Some("[kvm] cgroup = \"off\"")
        );
        assert!(c.vm_dir("x").is_none());
        let c = CpuCgroups::detect("auto", "../etc", "n1", &[]);
        assert!(!c.available());
        let c = CpuCgroups::detect("sometimes", "workspace-pilot", "n1", &[]);
        assert!(c.control().reason.unwrap().contains("expected auto or off"));
    }

    #[test]
    fn caps_become_quotas_of_a_100_ms_period() {
        assert_eq!(quota_us(10), 10_000);
        assert_eq!(quota_us(250), 250_000);
        assert_eq!(quota_us(1), 1000);
    }
}
