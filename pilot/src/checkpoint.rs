//! The checkpoint store: suspended VMs in a directory every node can read
//! (at a site a shared filesystem), one directory per checkpoint,
//! `<dir>/<workspace>/<vm>/g<generation>/`, owner-only (0700 / 0600).
//!
//! A checkpoint holds the files its driver wrote (memory state, disk
//! overlay) and `manifest.json`, which names each file with its size and
//! SHA-256 and is written last: files are hashed as they are written, go to a
//! `.part` name, are fsynced and renamed; the manifest is fsynced and renamed
//! after them. A directory without a manifest was never completed and is
//! never restored; files are verified again as they are read. Not the
//! drivers' part (what a VM's state consists of) nor the pilot's (when to
//! suspend, whether a save fits the grace period).

use crate::files::{lock_exclusive, FileLock, LockError};
use nix::fcntl::{Flock, FlockArg};
use protocol::pilot::CheckpointId;
use protocol::{SlotId, VmId, WorkspaceId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The manifest's file name; its presence is what makes a checkpoint complete.
pub const MANIFEST: &str = "manifest.json";
/// Version of the manifest format this pilot writes and reads.
pub const FORMAT: u32 = 1;
const WRITING: &str = ".writing";
const WRITER: &str = "writer.json";
const PART: &str = ".part";

/// `[checkpoints]` section of the node config (see docs/CHECKPOINTS.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointsConfig {
    /// The store. Unset: this node cannot suspend or resume VMs. Every node
    /// that may resume a VM must see the same directory.
    pub dir: Option<PathBuf>,
    /// Guest memory saved per second (MB/s) the pilot assumes until it has
    /// measured saves on this node; it decides whether a save fits the grace.
    pub save_mb_per_s: f64,
    /// Bound on a commanded suspend (on preemption the grace period bounds it).
    pub save_timeout_s: u64,
    /// Bound on a resume.
    pub restore_timeout_s: u64,
}

impl Default for CheckpointsConfig {
    fn default() -> Self {
        Self {
            dir: None,
            save_mb_per_s: 100.0,
            save_timeout_s: 600,
            restore_timeout_s: 600,
        }
    }
}

/// Errors of the store; messages name the checkpoint and the figures.
#[derive(Debug, thiserror::Error)]
pub enum CkError {
    #[error("no checkpoint store configured (set [checkpoints] dir in the node config)")]
    NoStore,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {id} does not exist in {store}")]
    NotFound { id: String, store: PathBuf },
    #[error("checkpoint {id} is incomplete: {why}")]
    Incomplete { id: String, why: String },
    #[error("checkpoint {id} already exists and is complete; delete it or use a new generation")]
    Exists { id: String },
    #[error("checkpoint {id} is being written by {writer}")]
    Busy { id: String, writer: String },
    #[error("checksum mismatch in checkpoint {id}: {file} has sha256 {got}, expected {expected}")]
    ChecksumMismatch {
        id: String,
        file: String,
        expected: String,
        got: String,
    },
    #[error("checkpoint {id}: {file} is {got} bytes, the manifest says {expected}")]
    SizeMismatch {
        id: String,
        file: String,
        expected: u64,
        got: u64,
    },
    #[error("checkpoint {id}: manifest {path} is not valid: {message}")]
    BadManifest {
        id: String,
        path: PathBuf,
        message: String,
    },
    #[error("{0:?} is not a valid checkpoint file name")]
    BadName(String),
}

impl CkError {
    /// Whether the checkpoint's bytes are not what was recorded (corruption
    /// or tampering), as opposed to missing, unfinished or unreadable.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            CkError::ChecksumMismatch { .. }
                | CkError::SizeMismatch { .. }
                | CkError::BadManifest { .. }
        )
    }

    /// The store error inside an I/O error from a [`VerifyingReader`], or
    /// the I/O error itself for `path`.
    pub fn from_io(e: std::io::Error, path: &Path) -> Self {
        if e.get_ref().is_some_and(|i| i.is::<CkError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(ck) = inner.downcast::<CkError>() {
                    return *ck;
                }
            }
            return CkError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other("verification failed"),
            };
        }
        CkError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn io(path: &Path, source: std::io::Error) -> CkError {
    CkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a checkpoint, as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`: what the checkpoint is and what it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub checkpoint: CheckpointId,
    /// The VM's name when it was saved (`wsp-<slot>-<vm>`).
    pub vm_name: String,
    /// The driver as it names itself (`kvm (tcg)`, `xen`, `sim`): a resume
    /// needs the same.
    pub hypervisor: String,
    pub memory_mb: u64,
    pub cpus: u32,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    pub node: String,
    pub slot: SlotId,
    pub created_ms: u64,
    /// Time the hypervisor took to save.
    pub save_ms: u64,
    pub files: Vec<FileEntry>,
    /// Driver-specific facts a restore needs (compressor, accelerator, disk).
    #[serde(default)]
    pub driver: serde_json::Value,
    /// A warm image's clean snapshot (`prepare_warm`): a newer one of the
    /// same image supersedes it ([`Store::prune_warm`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
}

/// What the pilot knows of a VM when it commits its checkpoint.
#[derive(Clone, Debug)]
pub struct ManifestInfo {
    pub vm_name: String,
    pub hypervisor: String,
    pub memory_mb: u64,
    pub cpus: u32,
    pub image: String,
    pub image_sha256: Option<String>,
    pub node: String,
    pub slot: SlotId,
    pub save_ms: u64,
    pub driver: serde_json::Value,
    /// A warm image's clean snapshot.
    pub warm: bool,
}

/// Who is writing a checkpoint (`writer.json`, removed at commit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterInfo {
    pub node: String,
    pub slot: String,
    pub pid: u32,
    pub started_ms: u64,
}

impl std::fmt::Display for WriterInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} of slot {} on node {}",
            self.pid, self.slot, self.node
        )
    }
}

/// What [`Store::prune_warm`] did.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Superseded snapshots deleted, with the bytes freed.
    pub deleted: Vec<(CheckpointId, u64)>,
    /// Superseded snapshots kept because a restore reads them now.
    pub in_use: Vec<CheckpointId>,
    /// Unfinished snapshots whose writer is gone, deleted.
    pub abandoned: Vec<(CheckpointId, u64)>,
    /// Could not be deleted (left for the next prune), with why.
    pub failed: Vec<(CheckpointId, String)>,
}

/// A checkpoint as [`Store::list`] finds it.
#[derive(Clone, Debug)]
pub struct Listed {
    pub id: CheckpointId,
    pub dir: PathBuf,
    pub state: ListedState,
}

#[derive(Clone, Debug)]
pub enum ListedState {
    /// Has a manifest (not verified: see [`Store::open_verified`]).
    Complete {
        bytes: u64,
        manifest_sha256: String,
        node: String,
        created_ms: u64,
    },
    /// No manifest: never completed. `writing` tells whether a writer holds it now.
    Incomplete {
        writer: Option<WriterInfo>,
        writing: bool,
    },
}

fn check_name(name: &str) -> Result<(), CkError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name != MANIFEST
        && name != WRITER
        && !name.ends_with(PART)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(CkError::BadName(name.to_string()))
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn sync_dir(dir: &Path) -> Result<(), CkError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, e))
}

fn mkdir_private(dir: &Path) -> Result<(), CkError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))
}

/// Sum of the sizes of the regular files in `dir` (not recursive).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Whether some process holds the writer lock of the checkpoint in `dir`.
fn lock_held(dir: &Path) -> bool {
    let p = dir.join(WRITING);
    if !p.exists() {
        return false;
    }
    matches!(
        lock_exclusive(&p, Duration::ZERO),
        Err(LockError::Timeout(_))
    )
}

/// A checkpoint store rooted at a directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store of a node config (`NoStore` when `dir` is unset). The root
    /// is created (0700) if missing.
    pub fn open(cfg: &CheckpointsConfig) -> Result<Self, CkError> {
        let root = cfg.dir.clone().ok_or(CkError::NoStore)?;
        Self::at(&root)
    }

    /// The store rooted at `root` (created 0700 if missing).
    pub fn at(root: &Path) -> Result<Self, CkError> {
        mkdir_private(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of checkpoint `id`.
    pub fn path(&self, id: &CheckpointId) -> PathBuf {
        self.root
            .join(id.workspace_id.as_str())
            .join(id.vm_id.as_str())
            .join(format!("g{}", id.generation))
    }

    /// Starts writing checkpoint `id`. A complete checkpoint of that id is
    /// never replaced; an unfinished one nobody writes any more (a writer
    /// killed mid-save) is removed first. The writer holds a lock until it
    /// commits or is dropped; dropped uncommitted, it removes what it wrote.
    pub fn begin(&self, id: &CheckpointId, who: WriterInfo) -> Result<CheckpointWriter, CkError> {
        let dir = self.path(id);
        if dir.join(MANIFEST).exists() {
            return Err(CkError::Exists { id: id.to_string() });
        }
        if dir.exists() {
            if lock_held(&dir) {
                let writer = read_writer(&dir)
                    .map(|w| w.to_string())
                    .unwrap_or_else(|| "another process".into());
                return Err(CkError::Busy {
                    id: id.to_string(),
                    writer,
                });
            }
            tracing::warn!(checkpoint = %id, "removing an unfinished checkpoint nobody writes any more");
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        mkdir_private(&dir)?;
        let lock = match lock_exclusive(&dir.join(WRITING), Duration::ZERO) {
            Ok(l) => l,
            Err(LockError::Io(e)) => return Err(io(&dir.join(WRITING), e)),
            Err(LockError::Timeout(_)) => {
                return Err(CkError::Busy {
                    id: id.to_string(),
                    writer: "another process".into(),
                })
            }
        };
        let w = CheckpointWriter {
            id: id.clone(),
            root: self.root.clone(),
            dir: dir.clone(),
            _lock: lock,
            files: Vec::new(),
            committed: false,
        };
        let text =
            serde_json::to_vec_pretty(&who).map_err(|e| io(&dir, std::io::Error::other(e)))?;
        write_private(&dir.join(WRITER), &text, false)?;
        Ok(w)
    }

    /// Opens checkpoint `id` for a restore: its manifest must exist, match
    /// `expected_sha256` (when given) and name files of the recorded sizes.
    /// The files' contents are verified as they are read.
    pub fn open_verified(
        &self,
        id: &CheckpointId,
        expected_sha256: Option<&str>,
    ) -> Result<CheckpointReader, CkError> {
        let dir = self.path(id);
        if !dir.is_dir() {
            return Err(CkError::NotFound {
                id: id.to_string(),
                store: self.root.clone(),
            });
        }
        let mpath = dir.join(MANIFEST);
        // A shared lock on the manifest while this reader lives: a
        // superseded warm snapshot is not deleted under a restore.
        let opened = File::open(&mpath).and_then(|f| {
            Flock::lock(f, FlockArg::LockSharedNonblock).map_err(|(_, e)| std::io::Error::from(e))
        });
        let text = match opened {
            Ok(mut f) => {
                let mut t = Vec::new();
                f.read_to_end(&mut t).map_err(|e| io(&mpath, e))?;
                (t, Arc::new(f))
            }
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EWOULDBLOCK as i32) => {
                return Err(CkError::Incomplete {
                    id: id.to_string(),
                    why: "it is being deleted (a newer snapshot of its image superseded it)".into(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = match (lock_held(&dir), read_writer(&dir)) {
                    (true, Some(w)) => format!("no manifest: {w} is still writing it"),
                    (_, Some(w)) => format!("no manifest: the save by {w} never finished"),
                    _ => "no manifest: the save never finished".to_string(),
                };
                return Err(CkError::Incomplete {
                    id: id.to_string(),
                    why,
                });
            }
            Err(e) => return Err(io(&mpath, e)),
        };
        let (text, in_use) = text;
        let digest = hex(Sha256::digest(&text));
        if let Some(expected) = expected_sha256 {
            if !expected.eq_ignore_ascii_case(&digest) {
                return Err(CkError::ChecksumMismatch {
                    id: id.to_string(),
                    file: MANIFEST.into(),
                    expected: expected.to_string(),
                    got: digest,
                });
            }
        }
        let bad = |message: String| CkError::BadManifest {
            id: id.to_string(),
            path: mpath.clone(),
            message,
        };
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format {} (this pilot reads {FORMAT})",
                manifest.format
            )));
        }
        if &manifest.checkpoint != id {
            return Err(bad(format!("it names checkpoint {}", manifest.checkpoint)));
        }
        for f in &manifest.files {
            check_name(&f.name).map_err(|e| bad(e.to_string()))?;
            let p = dir.join(&f.name);
            match std::fs::metadata(&p) {
                Ok(m) if m.len() == f.bytes => {}
                Ok(m) => {
                    return Err(CkError::SizeMismatch {
                        id: id.to_string(),
                        file: f.name.clone(),
                        expected: f.bytes,
                        got: m.len(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CkError::Incomplete {
                        id: id.to_string(),
                        why: format!("{} is missing", f.name),
                    })
                }
                Err(e) => return Err(io(&p, e)),
            }
        }
        Ok(CheckpointReader {
            id: id.clone(),
            dir,
            manifest,
            sha256: digest,
            _in_use: in_use,
        })
    }

    /// Removes checkpoint `id` (complete or not); returns the bytes freed
    /// (0 if it did not exist). Refused while a writer holds it.
    pub fn delete(&self, id: &CheckpointId) -> Result<u64, CkError> {
        let dir = self.path(id);
        if !dir.exists() {
            return Ok(0);
        }
        if lock_held(&dir) {
            let writer = read_writer(&dir)
                .map(|w| w.to_string())
                .unwrap_or_else(|| "another process".into());
            return Err(CkError::Busy {
                id: id.to_string(),
                writer,
            });
        }
        let bytes = dir_bytes(&dir);
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        prune_parents(&self.root, &dir);
        Ok(bytes)
    }

    /// After warm snapshot `current` of `image` was committed: deletes the
    /// complete warm snapshots of the same image in the same workspace
    /// directory of a lower generation and made before it (superseded: the
    /// coordinator keeps one per image), and the unfinished ones there whose writer is gone (a pilot
    /// killed mid-save; nobody takes a template's id over). A snapshot a
    /// restore is reading (a shared lock on its manifest, held by every
    /// [`CheckpointReader`], on any node of a shared store) is kept for the
    /// next prune; a restore that comes after the deletion finds nothing
    /// and the VM is booted cold, as for any missing snapshot.
    pub fn prune_warm(&self, current: &CheckpointId, image: &str) -> Result<Pruned, CkError> {
        let made_ms = self
            .read_manifest(current)
            .map(|m| m.created_ms)
            .ok_or_else(|| CkError::Incomplete {
                id: current.to_string(),
                why: "no readable manifest: nothing is superseded by it".into(),
            })?;
        let mut out = Pruned::default();
        for l in self.list()? {
            if l.id.workspace_id != current.workspace_id || l.id == *current {
                continue;
            }
            match l.state {
                ListedState::Complete { .. } => {
                    let Some(m) = self.read_manifest(&l.id) else {
                        continue;
                    };
                    // Older by both counts: a lower generation (the
                    // coordinator's), made earlier (the manifests'). A
                    // newer generation made first (its elder's pilot was
                    // slow to answer) is not this one's to delete.
                    let older = l.id.generation < current.generation && m.created_ms < made_ms;
                    if !m.warm || m.image != image || !older {
                        continue;
                    }
                    match self.delete_unread(&l.id) {
                        Ok(Some(bytes)) => out.deleted.push((l.id, bytes)),
                        Ok(None) => out.in_use.push(l.id),
                        Err(e) => out.failed.push((l.id, e.to_string())),
                    }
                }
                ListedState::Incomplete { writer, writing } => {
                    if writing || writer.is_none() {
                        continue;
                    }
                    match self.delete(&l.id) {
                        Ok(bytes) => out.abandoned.push((l.id, bytes)),
                        Err(e) => out.failed.push((l.id, e.to_string())),
                    }
                }
            }
        }
        Ok(out)
    }

    /// Unfinished checkpoints that `node` was writing and whose writer is
    /// gone (a pilot killed mid-save there): removed, as a pilot starting
    /// on that node does. Returns what was removed, with the bytes.
    pub fn remove_abandoned(&self, node: &str) -> Result<Vec<(CheckpointId, u64)>, CkError> {
        let mut out = Vec::new();
        for l in self.list()? {
            let ListedState::Incomplete { writer, writing } = &l.state else {
                continue;
            };
            if *writing || writer.as_ref().is_none_or(|w| w.node != node) {
                continue;
            }
            match self.delete(&l.id) {
                Ok(bytes) => {
                    tracing::info!(checkpoint = %l.id, bytes, "removed an unfinished checkpoint whose writer on this node is gone");
                    out.push((l.id, bytes));
                }
                Err(e) => {
                    tracing::warn!(checkpoint = %l.id, error = %e, "unfinished checkpoint not removed")
                }
            }
        }
        Ok(out)
    }

    fn read_manifest(&self, id: &CheckpointId) -> Option<Manifest> {
        let text = std::fs::read(self.path(id).join(MANIFEST)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Deletes complete checkpoint `id` unless a reader holds it: `None`
    /// then. The exclusive lock on its manifest is held while it goes
    /// (opened for writing: NFS emulates `flock` with POSIX locks).
    fn delete_unread(&self, id: &CheckpointId) -> Result<Option<u64>, CkError> {
        let dir = self.path(id);
        let mpath = dir.join(MANIFEST);
        let file = match OpenOptions::new().read(true).write(true).open(&mpath) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(0)),
            Err(e) => return Err(io(&mpath, e)),
        };
        let _held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(io(&mpath, std::io::Error::from(e))),
        };
        let bytes = dir_bytes(&dir);
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        prune_parents(&self.root, &dir);
        Ok(Some(bytes))
    }

    /// Every checkpoint in the store, sorted by id.
    pub fn list(&self) -> Result<Vec<Listed>, CkError> {
        let mut out = Vec::new();
        for ws in read_dir_names(&self.root)? {
            let Ok(workspace_id) = WorkspaceId::parse(&ws) else {
                continue;
            };
            let ws_dir = self.root.join(&ws);
            for vm in read_dir_names(&ws_dir)? {
                let Ok(vm_id) = VmId::parse(&vm) else {
                    continue;
                };
                let vm_dir = ws_dir.join(&vm);
                for g in read_dir_names(&vm_dir)? {
                    let Some(generation) = g.strip_prefix('g').and_then(|n| n.parse().ok()) else {
                        continue;
                    };
                    let dir = vm_dir.join(&g);
                    let id = CheckpointId {
                        workspace_id: workspace_id.clone(),
                        vm_id: vm_id.clone(),
                        generation,
                    };
                    let state = match std::fs::read(dir.join(MANIFEST)) {
                        Ok(text) => {
                            let m: Option<Manifest> = serde_json::from_slice(&text).ok();
                            ListedState::Complete {
                                bytes: dir_bytes(&dir),
                                manifest_sha256: hex(Sha256::digest(&text)),
                                node: m.as_ref().map(|m| m.node.clone()).unwrap_or_default(),
                                created_ms: m.map(|m| m.created_ms).unwrap_or(0),
                            }
                        }
                        Err(_) => ListedState::Incomplete {
                            writer: read_writer(&dir),
                            writing: lock_held(&dir),
                        },
                    };
                    out.push(Listed { id, dir, state });
                }
            }
        }
        out.sort_by_key(|l| l.id.to_string());
        Ok(out)
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, CkError> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(dir, e)),
    }
}

fn read_writer(dir: &Path) -> Option<WriterInfo> {
    std::fs::read(dir.join(WRITER))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
}

/// Removes the `<vm>` and `<workspace>` directories above `dir` once empty.
fn prune_parents(root: &Path, dir: &Path) {
    let mut at = dir.parent();
    while let Some(p) = at {
        if p == root || !p.starts_with(root) {
            break;
        }
        if std::fs::remove_dir(p).is_err() {
            break;
        }
        at = p.parent();
    }
}

/// Writes `bytes` to `path` (0600) through a temporary name, fsynced when
/// `durable`, then renamed.
fn write_private(path: &Path, bytes: &[u8], durable: bool) -> Result<(), CkError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let r = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(|e| io(path, e))
}

/// A checkpoint being written. Dropped without [`CheckpointWriter::commit`],
/// it removes its directory: an unfinished save leaves nothing behind.
pub struct CheckpointWriter {
    id: CheckpointId,
    root: PathBuf,
    dir: PathBuf,
    _lock: FileLock,
    files: Vec<FileEntry>,
    committed: bool,
}

/// What [`CheckpointWriter::commit`] made.
#[derive(Clone, Debug)]
pub struct Committed {
    /// SHA-256 of `manifest.json`: what a resume must present.
    pub sha256: String,
    /// Bytes of the files (manifest excluded).
    pub bytes: u64,
    pub manifest: Manifest,
}

impl CheckpointWriter {
    pub fn id(&self) -> &CheckpointId {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of the files finished so far.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// A new file `name`, written under a `.part` name and hashed as it is
    /// written; [`PartFile::finish`] it, then [`CheckpointWriter::add`] it.
    pub fn create(&self, name: &str) -> Result<PartFile, CkError> {
        check_name(name)?;
        self.ensure_new(name)?;
        let part = self.part_path(name)?;
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&part)
            .map_err(|e| io(&part, e))?;
        Ok(PartFile {
            name: name.to_string(),
            final_path: self.dir.join(name),
            part,
            file: Some(file),
            hasher: Some(BackgroundHash::new()),
            bytes: 0,
            synced_at: 0,
            syncing: None,
        })
    }

    fn ensure_new(&self, name: &str) -> Result<(), CkError> {
        if self.files.iter().any(|f| f.name == name) {
            return Err(CkError::BadName(format!("{name} (written twice)")));
        }
        Ok(())
    }

    /// Where a program that writes a file itself (`xl save`) puts `name`
    /// before [`CheckpointWriter::adopt`].
    pub fn part_path(&self, name: &str) -> Result<PathBuf, CkError> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}{PART}")))
    }

    /// Records a finished file.
    pub fn add(&mut self, entry: FileEntry) {
        self.files.push(entry);
    }

    /// Takes `name` as another program wrote it at its
    /// [`part_path`](CheckpointWriter::part_path): makes it owner-only,
    /// hashes it, fsyncs and renames it.
    pub fn adopt(&mut self, name: &str) -> Result<FileEntry, CkError> {
        self.ensure_new(name)?;
        let part = self.part_path(name)?;
        // A file made by root (sudo xl) may refuse the chmod; the 0700
        // directory still keeps it private.
        let _ = std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o600));
        let mut f = File::open(&part).map_err(|e| io(&part, e))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| io(&part, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            bytes += n as u64;
        }
        // fsync through a handle that may write (some systems refuse read-only).
        match OpenOptions::new().write(true).open(&part) {
            Ok(w) => w.sync_all().map_err(|e| io(&part, e))?,
            Err(_) => f.sync_all().map_err(|e| io(&part, e))?,
        }
        let final_path = self.dir.join(name);
        std::fs::rename(&part, &final_path).map_err(|e| io(&final_path, e))?;
        let entry = FileEntry {
            name: name.to_string(),
            bytes,
            sha256: hex(h.finalize()),
        };
        self.files.push(entry.clone());
        Ok(entry)
    }

    /// Makes the checkpoint complete: fsyncs the directory (the files'
    /// renames), then writes the manifest through a temporary name, fsynced,
    /// renamed and fsynced again. Only now can it be restored.
    pub fn commit(mut self, info: ManifestInfo) -> Result<Committed, CkError> {
        let manifest = Manifest {
            format: FORMAT,
            checkpoint: self.id.clone(),
            vm_name: info.vm_name,
            hypervisor: info.hypervisor,
            memory_mb: info.memory_mb,
            cpus: info.cpus,
            image: info.image,
            image_sha256: info.image_sha256,
            node: info.node,
            slot: info.slot,
            created_ms: protocol::now_ms(),
            save_ms: info.save_ms,
            files: self.files.clone(),
            driver: info.driver,
            warm: info.warm,
        };
        let text = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| io(&self.dir, std::io::Error::other(e)))?;
        sync_dir(&self.dir)?;
        write_private(&self.dir.join(MANIFEST), &text, true)?;
        sync_dir(&self.dir)?;
        self.committed = true;
        let _ = std::fs::remove_file(self.dir.join(WRITER));
        let _ = std::fs::remove_file(self.dir.join(WRITING));
        Ok(Committed {
            sha256: hex(Sha256::digest(&text)),
            bytes: self.bytes(),
            manifest,
        })
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => prune_parents(&self.root, &self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(checkpoint = %self.id, dir = %self.dir.display(), error = %e, "cannot remove an unfinished checkpoint (it has no manifest, so it is never restored)")
            }
        }
    }
}

/// SHA-256 on its own thread, fed in order through a bounded channel, so
/// hashing overlaps the copying (it costs as much as the copy: ~1.5 GB/s).
struct BackgroundHash {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    handle: Option<std::thread::JoinHandle<Sha256>>,
}

impl BackgroundHash {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        let handle = std::thread::spawn(move || {
            let mut h = Sha256::new();
            for chunk in rx {
                h.update(&chunk);
            }
            h
        });
        Self {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    fn update(&mut self, data: &[u8]) -> std::io::Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| std::io::Error::other("hash already finished"))?;
        tx.send(data.to_vec())
            .map_err(|_| std::io::Error::other("the hashing thread ended"))
    }

    fn finalize(mut self) -> std::io::Result<String> {
        drop(self.tx.take());
        let h = self
            .handle
            .take()
            .ok_or_else(|| std::io::Error::other("hash already finished"))?
            .join()
            .map_err(|_| std::io::Error::other("the hashing thread panicked"))?;
        Ok(hex(h.finalize()))
    }
}

impl Drop for BackgroundHash {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Bytes written between early writebacks (a background `fdatasync`), so
/// the final fsync does not wait for the whole file to reach the disk.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// A checkpoint file being written: hashed as it goes, under a `.part` name.
pub struct PartFile {
    name: String,
    part: PathBuf,
    final_path: PathBuf,
    file: Option<File>,
    hasher: Option<BackgroundHash>,
    bytes: u64,
    /// Bytes written when the last early writeback started, and that writeback.
    synced_at: u64,
    syncing: Option<std::thread::JoinHandle<()>>,
}

impl Write for PartFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("part file already finished"))?;
        let n = f.write(buf)?;
        self.hasher
            .as_mut()
            .ok_or_else(|| std::io::Error::other("part file already finished"))?
            .update(&buf[..n])?;
        self.bytes += n as u64;
        if self.bytes - self.synced_at >= WRITEBACK_EVERY
            && self.syncing.as_ref().is_none_or(|h| h.is_finished())
        {
            if let Some(h) = self.syncing.take() {
                let _ = h.join();
            }
            if let Ok(dup) = f.try_clone() {
                self.synced_at = self.bytes;
                self.syncing = Some(std::thread::spawn(move || {
                    let _ = dup.sync_data();
                }));
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl PartFile {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Fsyncs the file and gives it its final name.
    pub fn finish(mut self) -> Result<FileEntry, CkError> {
        let finished = || {
            io(
                &self.part,
                std::io::Error::other("part file already finished"),
            )
        };
        let f = self.file.take().ok_or_else(finished)?;
        let hasher = self.hasher.take().ok_or_else(finished)?;
        if let Some(h) = self.syncing.take() {
            let _ = h.join();
        }
        f.sync_all().map_err(|e| io(&self.part, e))?;
        drop(f);
        let sha256 = hasher.finalize().map_err(|e| io(&self.part, e))?;
        std::fs::rename(&self.part, &self.final_path).map_err(|e| io(&self.final_path, e))?;
        Ok(FileEntry {
            name: std::mem::take(&mut self.name),
            bytes: self.bytes,
            sha256,
        })
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

/// A complete checkpoint whose manifest was checked; its files are verified
/// as they are read.
#[derive(Clone, Debug)]
pub struct CheckpointReader {
    id: CheckpointId,
    dir: PathBuf,
    manifest: Manifest,
    sha256: String,
    /// The shared lock on the manifest (see [`Store::prune_warm`]).
    _in_use: Arc<Flock<File>>,
}

impl CheckpointReader {
    pub fn id(&self) -> &CheckpointId {
        &self.id
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the manifest.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Bytes of the files.
    pub fn bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.bytes).sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.manifest.files.iter().any(|f| f.name == name)
    }

    fn entry(&self, name: &str) -> Result<&FileEntry, CkError> {
        self.manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| CkError::Incomplete {
                id: self.id.to_string(),
                why: format!("the manifest names no {name}"),
            })
    }

    /// Reads file `name`; the reader fails (with a [`CkError`] inside the
    /// I/O error, see [`CkError::from_io`]) as soon as the file is longer
    /// than recorded, and at its end if size or digest differ.
    pub fn open(&self, name: &str) -> Result<VerifyingReader, CkError> {
        let e = self.entry(name)?.clone();
        let path = self.dir.join(&e.name);
        let file = File::open(&path).map_err(|err| io(&path, err))?;
        Ok(VerifyingReader {
            id: self.id.to_string(),
            entry: e,
            file,
            hasher: Some(BackgroundHash::new()),
            bytes: 0,
            done: false,
        })
    }

    /// Hashes file `name` whole and returns its path once it matches (for
    /// programs that read the file themselves, such as `xl restore`).
    pub fn verified_path(&self, name: &str) -> Result<PathBuf, CkError> {
        let mut r = self.open(name)?;
        let path = self.dir.join(name);
        std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| CkError::from_io(e, &path))?;
        Ok(path)
    }

    /// Copies file `name` to `dest` (mode 0600), verifying it on the way;
    /// on any failure `dest` is removed. Returns the bytes copied.
    pub fn copy_to(&self, name: &str, dest: &Path) -> Result<u64, CkError> {
        let mut r = self.open(name)?;
        let res = (|| {
            let mut out = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(dest)
                .map_err(|e| io(dest, e))?;
            let n = std::io::copy(&mut r, &mut out)
                .map_err(|e| CkError::from_io(e, &self.dir.join(name)))?;
            out.flush().map_err(|e| io(dest, e))?;
            Ok(n)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        res
    }

    /// Hashes every file (an admin's `checkpoint verify`).
    pub fn verify_all(&self) -> Result<(), CkError> {
        for f in &self.manifest.files {
            self.verified_path(&f.name)?;
        }
        Ok(())
    }
}

/// A checkpoint file read and hashed as it goes; see [`CheckpointReader::open`].
pub struct VerifyingReader {
    id: String,
    entry: FileEntry,
    file: File,
    hasher: Option<BackgroundHash>,
    bytes: u64,
    done: bool,
}

impl VerifyingReader {
    fn fail(&self, e: CkError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    pub fn expected_bytes(&self) -> u64 {
        self.entry.bytes
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.file.read(buf)?;
        self.bytes += n as u64;
        if self.bytes > self.entry.bytes {
            return Err(self.fail(CkError::SizeMismatch {
                id: self.id.clone(),
                file: self.entry.name.clone(),
                expected: self.entry.bytes,
                got: self.bytes,
            }));
        }
        if n > 0 {
            self.hasher
                .as_mut()
                .ok_or_else(|| std::io::Error::other("verification already finished"))?
                .update(&buf[..n])?;
        }
        if n == 0 {
            self.done = true;
            if self.bytes != self.entry.bytes {
                return Err(self.fail(CkError::SizeMismatch {
                    id: self.id.clone(),
                    file: self.entry.name.clone(),
                    expected: self.entry.bytes,
                    got: self.bytes,
                }));
            }
            let got = self
                .hasher
                .take()
                .ok_or_else(|| std::io::Error::other("verification already finished"))?
                .finalize()?;
            if got != self.entry.sha256 {
                return Err(self.fail(CkError::ChecksumMismatch {
                    id: self.id.clone(),
                    file: self.entry.name.clone(),
                    expected: self.entry.sha256.clone(),
                    got,
                }));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn id(generation: u32) -> CheckpointId {
        CheckpointId {
            workspace_id: WorkspaceId::parse("ws-0000abcd").unwrap(),
            vm_id: VmId::parse("vm-0000beef").unwrap(),
            generation,
        }
    }

    fn who() -> WriterInfo {
        WriterInfo {
            node: "n1".into(),
            slot: "sl-00000001".into(),
            pid: std::process::id(),
            started_ms: 1,
        }
    }

    fn info() -> ManifestInfo {
        ManifestInfo {
            warm: false,
            vm_name: "wsp-sl-00000001-vm-0000beef".into(),
            hypervisor: "sim".into(),
            memory_mb: 64,
            cpus: 1,
            image: "img".into(),
            image_sha256: None,
            node: "n1".into(),
            slot: SlotId::parse("sl-00000001").unwrap(),
            save_ms: 5,
            driver: serde_json::json!({}),
        }
    }

    fn write(store: &Store, id: &CheckpointId, data: &[u8]) -> Committed {
        let mut w = store.begin(id, who()).unwrap();
        let mut f = w.create("memory").unwrap();
        f.write_all(data).unwrap();
        let e = f.finish().unwrap();
        w.add(e);
        w.commit(info()).unwrap()
    }

    fn warm_id(vm: &str, generation: u32) -> CheckpointId {
        CheckpointId {
            workspace_id: WorkspaceId::parse("ws-00000000").unwrap(),
            vm_id: VmId::parse(vm).unwrap(),
            generation,
        }
    }

    /// A committed snapshot of `image` (warm or not), made at `created_ms`.
    fn snapshot(store: &Store, id: &CheckpointId, image: &str, warm: bool, created_ms: u64) {
        let mut w = store.begin(id, who()).unwrap();
        let mut f = w.create("memory").unwrap();
        f.write_all(&[7u8; 1000]).unwrap();
        let e = f.finish().unwrap();
        w.add(e);
        let mut i = info();
        i.image = image.into();
        i.warm = warm;
        w.commit(i).unwrap();
        // Made then (commit stamps now).
        let mp = store.path(id).join(MANIFEST);
        let mut m: Manifest = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        m.created_ms = created_ms;
        std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    }

    /// What a pilot killed mid-save leaves: a file, writer.json, no
    /// manifest, and (the process gone) no lock.
    fn abandoned(store: &Store, id: &CheckpointId, node: &str) {
        let mut who = who();
        who.node = node.into();
        let w = store.begin(id, who).unwrap();
        let mut f = w.create("memory").unwrap();
        f.write_all(b"half").unwrap();
        drop(f.finish().unwrap());
        std::mem::forget(w);
        std::fs::remove_file(store.path(id).join(WRITING)).unwrap();
    }

    #[test]
    fn a_new_warm_snapshot_deletes_the_older_ones_of_its_image_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path()).unwrap();
        let g1 = warm_id("vm-00000001", 1);
        let g2 = warm_id("vm-00000002", 2);
        let g3 = warm_id("vm-00000003", 3);
        let other_image = warm_id("vm-00000004", 1);
        let half = warm_id("vm-00000005", 4);
        let writing = warm_id("vm-00000006", 5);
        // Generation 4 was made first: g3's slow pilot does not delete it.
        let newer = warm_id("vm-00000007", 4);
        snapshot(&store, &newer, "debian-12", true, 2_500);
        snapshot(&store, &g1, "debian-12", true, 1_000);
        snapshot(&store, &g2, "debian-12", true, 2_000);
        snapshot(&store, &g3, "debian-12", true, 3_000);
        snapshot(&store, &other_image, "alpine", true, 500);
        // A user's suspended VM of the same image elsewhere is never touched.
        snapshot(&store, &id(1), "debian-12", false, 100);
        abandoned(&store, &half, "n7");
        let _live = store.begin(&writing, who()).unwrap();
        let p = store.prune_warm(&g3, "debian-12").unwrap();
        let mut deleted: Vec<String> = p.deleted.iter().map(|(i, _)| i.to_string()).collect();
        deleted.sort();
        assert_eq!(deleted, vec![g1.to_string(), g2.to_string()]);
        assert!(p.deleted.iter().all(|(_, b)| *b >= 1000), "{p:?}");
        assert_eq!(p.abandoned.len(), 1, "{p:?}");
        assert_eq!(p.abandoned[0].0, half);
        assert!(p.in_use.is_empty() && p.failed.is_empty(), "{p:?}");
        let left: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(|l| l.id.to_string())
            .collect();
        assert_eq!(
            left,
            {
                let mut v = vec![
                    g3.to_string(),
                    newer.to_string(),
                    other_image.to_string(),
                    id(1).to_string(),
                    writing.to_string(),
                ];
                v.sort();
                v
            },
            "the new one, a newer generation, another image's, a user's and one being written stay"
        );
        assert!(
            !store.path(&g1).parent().unwrap().exists(),
            "parents pruned"
        );
    }

    #[test]
    fn a_snapshot_a_restore_reads_is_kept_until_the_next_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path()).unwrap();
        let g1 = warm_id("vm-00000001", 1);
        let g2 = warm_id("vm-00000002", 2);
        let g3 = warm_id("vm-00000003", 3);
        snapshot(&store, &g1, "debian-12", true, 1_000);
        snapshot(&store, &g2, "debian-12", true, 2_000);
        // A restore of g1 is in flight (on this node or another one
        // sharing the store): its reader holds the manifest.
        let reading = store.open_verified(&g1, None).unwrap();
        let p = store.prune_warm(&g2, "debian-12").unwrap();
        assert!(p.deleted.is_empty(), "{p:?}");
        assert_eq!(p.in_use, vec![g1.clone()]);
        let mut s = Vec::new();
        reading.open("memory").unwrap().read_to_end(&mut s).unwrap();
        assert_eq!(s.len(), 1000, "the restore reads it whole");
        // Its clone (handed to the driver) holds it too.
        let clone = reading.clone();
        drop(reading);
        assert_eq!(
            store.prune_warm(&g2, "debian-12").unwrap().in_use,
            vec![g1.clone()]
        );
        drop(clone);
        snapshot(&store, &g3, "debian-12", true, 3_000);
        let p = store.prune_warm(&g3, "debian-12").unwrap();
        assert_eq!(p.deleted.len(), 2, "{p:?}");
        // A restore that comes after finds nothing (the VM boots cold).
        let e = store.open_verified(&g1, None).unwrap_err();
        assert!(matches!(e, CkError::NotFound { .. }), "{e}");
    }

    #[test]
    fn a_starting_pilot_removes_only_its_nodes_abandoned_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path()).unwrap();
        abandoned(&store, &warm_id("vm-00000001", 1), "n1");
        abandoned(&store, &id(2), "n1");
        abandoned(&store, &warm_id("vm-00000002", 1), "n2");
        let _live = store.begin(&warm_id("vm-00000003", 1), who()).unwrap();
        snapshot(&store, &id(1), "debian-12", false, 100);
        let gone = store.remove_abandoned("n1").unwrap();
        assert_eq!(gone.len(), 2, "{gone:?}");
        let left: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(|l| l.id.to_string())
            .collect();
        assert_eq!(
            left.len(),
            3,
            "n2's, the live writer's and the complete one: {left:?}"
        );
        assert!(!left.contains(&id(2).to_string()));
    }

    #[test]
    fn a_committed_checkpoint_reads_back_verified_and_is_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(&tmp.path().join("store")).unwrap();
        let c = write(&store, &id(1), b"hello state");
        assert_eq!(c.bytes, 11);
        let r = store.open_verified(&id(1), Some(&c.sha256)).unwrap();
        let mut s = String::new();
        r.open("memory").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello state");
        let dir = store.path(&id(1));
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        for f in ["memory", MANIFEST] {
            assert_eq!(
                std::fs::metadata(dir.join(f)).unwrap().mode() & 0o777,
                0o600,
                "{f}"
            );
        }
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "only the file and the manifest: {names:?}");
        assert!(matches!(
            store.begin(&id(1), who()),
            Err(CkError::Exists { .. })
        ));
    }

    #[test]
    fn a_flipped_byte_or_another_manifest_digest_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path()).unwrap();
        let c = write(&store, &id(1), b"0123456789");
        let e = store
            .open_verified(&id(1), Some(&"0".repeat(64)))
            .unwrap_err();
        assert!(
            matches!(&e, CkError::ChecksumMismatch { file, .. } if file == MANIFEST),
            "{e}"
        );
        let p = store.path(&id(1)).join("memory");
        std::fs::write(&p, b"0123456780").unwrap();
        let r = store.open_verified(&id(1), Some(&c.sha256)).unwrap();
        let e = r.verify_all().unwrap_err();
        assert!(matches!(e, CkError::ChecksumMismatch { .. }), "{e}");
        assert!(e.is_corrupt());
        let dest = tmp.path().join("copy");
        assert!(r.copy_to("memory", &dest).unwrap_err().is_corrupt());
        assert!(!dest.exists(), "a failed copy leaves nothing");
        std::fs::write(&p, b"0123").unwrap();
        let e = store.open_verified(&id(1), Some(&c.sha256)).unwrap_err();
        assert!(matches!(e, CkError::SizeMismatch { got: 4, .. }), "{e}");
    }

    #[test]
    fn an_uncommitted_writer_leaves_nothing_and_a_dead_writers_partial_is_incomplete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path()).unwrap();
        {
            let w = store.begin(&id(1), who()).unwrap();
            let mut f = w.create("memory").unwrap();
            f.write_all(b"half").unwrap();
        }
        assert!(!store.path(&id(1)).exists());
        assert!(store.list().unwrap().is_empty(), "parents pruned");

        // What a SIGKILLed writer leaves: files, writer.json, no manifest.
        let w = store.begin(&id(2), who()).unwrap();
        let mut f = w.create("memory").unwrap();
        f.write_all(b"half").unwrap();
        let e = f.finish().unwrap();
        assert_eq!(e.bytes, 4);
        let e = store.open_verified(&id(2), None).unwrap_err();
        assert!(
            matches!(&e, CkError::Incomplete { why, .. } if why.contains("still writing")),
            "{e}"
        );
        assert!(matches!(store.delete(&id(2)), Err(CkError::Busy { .. })));
        // The process "dies": no Drop runs. Its lock stays held by the
        // forgotten fd here, so take the lock file away instead, as the
        // kernel drops the lock of a dead process.
        std::mem::forget(w);
        let dir = store.path(&id(2));
        let listed = store.list().unwrap();
        assert!(matches!(
            listed[0].state,
            ListedState::Incomplete { writing: true, .. }
        ));
        std::fs::remove_file(dir.join(WRITING)).unwrap();
        let e = store.open_verified(&id(2), None).unwrap_err();
        assert!(
            matches!(&e, CkError::Incomplete { why, .. } if why.contains("never finished")),
            "{e}"
        );
        // A new writer takes over the abandoned directory.
        let c = write(&store, &id(2), b"whole");
        store.open_verified(&id(2), Some(&c.sha256)).unwrap();
        let manifest_len = std::fs::metadata(store.path(&id(2)).join(MANIFEST))
            .unwrap()
            .len();
        assert_eq!(store.delete(&id(2)).unwrap(), 5 + manifest_len);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.delete(&id(2)).unwrap(), 0);
    }

    #[test]
    fn adopted_files_are_hashed_and_bad_names_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::at(tmp.path()).unwrap();
        let mut w = store.begin(&id(1), who()).unwrap();
        std::fs::write(w.part_path("xl.save").unwrap(), b"xl wrote this").unwrap();
        let e = w.adopt("xl.save").unwrap();
        assert_eq!(e.bytes, 13);
        for bad in ["../x", ".hidden", MANIFEST, "a.part", ""] {
            assert!(w.create(bad).is_err(), "{bad}");
        }
        let c = w.commit(info()).unwrap();
        let r = store.open_verified(&id(1), Some(&c.sha256)).unwrap();
        r.verify_all().unwrap();
    }
}
