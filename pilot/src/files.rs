//! The two file habits the pilot relies on: bounded exclusive locks and atomic writes.
//!
//! Used by the sim node (several pilots on one node), the node state files and
//! the outbox (durable writes). Not a general file utility module.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a lock could not be had.
#[derive(Debug)]
pub enum LockError {
    Io(std::io::Error),
    /// Another process held it for the whole `waited`.
    Timeout(Duration),
}

/// A held exclusive lock; released when dropped (or when the process dies).
pub struct FileLock(Flock<File>);

impl FileLock {
    /// Whether `path` still names the locked file. A lock file that others
    /// may remove must be checked after locking: a lock taken on a file
    /// unlinked meanwhile excludes nobody.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.0.metadata(), std::fs::metadata(path)) {
            (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
            _ => false,
        }
    }
}

/// Takes an exclusive `flock` on `path` (created if missing), retrying for
/// at most `timeout`.
pub fn lock_exclusive(path: &Path, timeout: Duration) -> Result<FileLock, LockError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(LockError::Io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(FileLock(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) | Err((_, nix::errno::Errno::EINTR)) => {}
            Err((_, e)) => return Err(LockError::Io(std::io::Error::from(e))),
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(LockError::Timeout(waited));
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so readers see the old or the new content, never a mix.
///
/// No fsync: every caller records *volatile* node state (the pilot's slot
/// record, balloon and hugepage ledgers, QEMU pids, the sim node) that must
/// survive the death of the process that wrote it, which the page cache
/// already guarantees once `rename` returns, but not a crash of the kernel,
/// which resets that state anyway (domains, dom0's balloon, hugepages and
/// taps do not survive a reboot). An fsync here cost ~0.3-0.7 ms per
/// transition on every node (docs/DECISIONS.md). Data that must survive a
/// reboot goes through [`write_durable`].
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_via_rename(path, bytes, mode, false)
}

/// [`write_atomic`] plus an fsync of the file and of its directory before
/// returning: for what must survive a power loss (the image cache, the
/// pilot's outbox when its state directory is on a disk).
pub fn write_durable(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_via_rename(path, bytes, mode, true)
}

fn write_via_rename(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
