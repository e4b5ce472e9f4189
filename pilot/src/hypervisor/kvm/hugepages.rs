//! The host's hugepage pool as the kvm driver's "dom0 balloon".
//!
//! The pool is host-global: every change holds a host-wide flock and is
//! relative (this node's pages added to or taken from the count read under the
//! lock), and the kernel's answer is read back. What this node holds is kept
//! in a per-node ledger file, so kill-all can give it back after a crash.

use crate::files::{lock_exclusive, write_atomic, FileLock, LockError};
use crate::hypervisor::HvError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What this node holds, in `<run_dir>/hugepages.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Memory the node's pilots asked for (the "dom0" accounting).
    pub held_mb: u64,
    /// Pages actually added to the kernel pool for it (0 when accounting only).
    pub held_pages: u64,
    pub page_kb: u64,
}

/// Host pool + node ledger.
#[derive(Clone, Debug)]
pub struct HugePages {
    /// Real pages (false: accounting only).
    pub enabled: bool,
    pub page_kb: u64,
    /// `/sys/kernel/mm/hugepages` (a test may point elsewhere).
    pub sysfs: PathBuf,
    pub lock_path: PathBuf,
    pub ledger_path: PathBuf,
    /// Prefix for privileged writes (`["sudo", "-n"]`); empty = write directly.
    pub privileged: Vec<String>,
    /// Memory (MB) the host must keep available after a reservation.
    pub host_reserve_mb: u64,
}

fn io(path: &Path, source: std::io::Error) -> HvError {
    HvError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A `/proc/meminfo` field in kB.
pub fn meminfo_kb(field: &str) -> Result<u64, HvError> {
    let path = Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| HvError::Config(format!("/proc/meminfo has no {field}")))
}

impl HugePages {
    pub fn count_path(&self) -> PathBuf {
        self.sysfs
            .join(format!("hugepages-{}kB", self.page_kb))
            .join("nr_hugepages")
    }

    /// The kernel's persistent pool of this page size.
    pub fn count(&self) -> Result<u64, HvError> {
        let p = self.count_path();
        let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        text.trim()
            .parse()
            .map_err(|_| HvError::Config(format!("{}: not a number: {text:?}", p.display())))
    }

    /// Every hugepage pool on the host (all sizes), in MB.
    pub fn host_total_mb(&self) -> Result<u64, HvError> {
        let entries = match std::fs::read_dir(&self.sysfs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&self.sysfs, e)),
        };
        let mut kb = 0u64;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(size) = name
                .strip_prefix("hugepages-")
                .and_then(|s| s.strip_suffix("kB"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let n: u64 = std::fs::read_to_string(e.path().join("nr_hugepages"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            kb += n * size;
        }
        Ok(kb / 1024)
    }

    fn write_count(&self, n: u64) -> Result<(), HvError> {
        let p = self.count_path();
        if self.privileged.is_empty() {
            return std::fs::write(&p, format!("{n}\n")).map_err(|e| io(&p, e));
        }
        let (prog, pre) = self
            .privileged
            .split_first()
            .ok_or_else(|| HvError::Config("empty privileged prefix".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(pre).arg("tee").arg(&p);
        let shown = format!("{} tee {}", self.privileged.join(" "), p.display());
        super::run_bounded(
            cmd,
            Some(format!("{n}\n").into_bytes()),
            WRITE_TIMEOUT,
            &shown,
        )
        .map(|_| ())
    }

    fn lock(&self) -> Result<FileLock, HvError> {
        if let Some(dir) = self.lock_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        lock_exclusive(&self.lock_path, LOCK_TIMEOUT).map_err(|e| match e {
            LockError::Io(source) => io(&self.lock_path, source),
            LockError::Timeout(w) => HvError::Busy {
                path: self.lock_path.clone(),
                waited_ms: w.as_millis() as u64,
            },
        })
    }

    pub fn ledger(&self) -> Result<Ledger, HvError> {
        match std::fs::read_to_string(&self.ledger_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| HvError::Corrupt {
                path: self.ledger_path.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger {
                page_kb: self.page_kb,
                ..Ledger::default()
            }),
            Err(e) => Err(io(&self.ledger_path, e)),
        }
    }

    fn write_ledger(&self, l: &Ledger) -> Result<(), HvError> {
        let text = serde_json::to_vec_pretty(l).map_err(|e| HvError::Corrupt {
            path: self.ledger_path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&self.ledger_path, &text, 0o644).map_err(|e| io(&self.ledger_path, e))
    }

    fn pages_for(&self, mb: u64) -> u64 {
        if !self.enabled || mb == 0 {
            return 0;
        }
        (mb * 1024).div_ceil(self.page_kb)
    }

    /// Makes this node hold `want_mb`: adds or gives back the difference in
    /// pages under the host lock, relative to the count read under it, and
    /// verifies the kernel's answer. On a short answer the count is put back
    /// and nothing changes. Returns the pool count before and after.
    pub fn set_held_mb(&self, want_mb: u64, node: &str) -> Result<(u64, u64), HvError> {
        let _lock = self.lock()?;
        let mut ledger = self.ledger()?;
        if ledger.page_kb != 0 && ledger.page_kb != self.page_kb && ledger.held_pages > 0 {
            return Err(HvError::Config(format!(
                "{} holds {} pages of {} kB but the node config says {} kB: release them first \
                 (workspace-kill-all with the old page size)",
                self.ledger_path.display(),
                ledger.held_pages,
                ledger.page_kb,
                self.page_kb
            )));
        }
        let want_pages = self.pages_for(want_mb);
        let mut before = 0;
        let mut after = 0;
        if want_pages != ledger.held_pages {
            before = self.count()?;
            let adding = want_pages > ledger.held_pages;
            let new = if adding {
                let more = want_pages - ledger.held_pages;
                let avail_mb = meminfo_kb("MemAvailable")? / 1024;
                let need_mb = more * self.page_kb / 1024;
                if need_mb + self.host_reserve_mb > avail_mb {
                    tracing::warn!(
                        node,
                        need_mb,
                        available_mb = avail_mb,
                        host_reserve_mb = self.host_reserve_mb,
                        "hugepages refused before asking the kernel: the host would be left short"
                    );
                    return Err(HvError::HugepagesShort {
                        asked: more,
                        got: 0,
                        page_kb: self.page_kb,
                        restored_to: before,
                    });
                }
                before + more
            } else {
                before.saturating_sub(ledger.held_pages - want_pages)
            };
            tracing::info!(
                node,
                nr_hugepages_before = before,
                nr_hugepages_target = new,
                page_kb = self.page_kb,
                "changing the hugepage pool"
            );
            self.write_count(new)?;
            after = self.count()?;
            if adding && after < new {
                let got = after.saturating_sub(before);
                self.write_count(before)?;
                let restored_to = self.count()?;
                tracing::error!(
                    node,
                    asked = new - before,
                    got,
                    restored_to,
                    "the kernel gave fewer hugepages than asked; count put back"
                );
                return Err(HvError::HugepagesShort {
                    asked: new - before,
                    got,
                    page_kb: self.page_kb,
                    restored_to,
                });
            }
        }
        ledger.held_mb = want_mb;
        ledger.held_pages = want_pages;
        ledger.page_kb = self.page_kb;
        self.write_ledger(&ledger)?;
        Ok((before, after))
    }
}
