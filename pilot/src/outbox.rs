//! The pilot's durable outbox: each event is on the node's disk before it is
//! sent, and leaves only once the coordinator has it (or refused it).
//!
//! `<state-dir>/outbox/` (0700) holds one [`Letter`] per event,
//! `<pilot id>.<seq>.json` (0600, fsynced and renamed into place): the
//! coordinator's URL, the exact signed body and its signature. So whoever
//! finds letters a pilot left (the next pilot on the node, or
//! `workspace-kill-all`) delivers them, in order, without the slot key, and
//! the coordinator receives the events as the pilot made them (its pilot id,
//! sequence numbers and timestamps). `<pilot id>.lock` is held by the pilot
//! that writes the letters for its whole life and by anyone delivering them,
//! so one pilot's letters are only ever sent by one process at a time.
//! Not for deciding what to send (the run loop) nor when to retry (notify.rs).

use crate::files::{lock_exclusive, write_durable, FileLock, LockError};
use crate::notify::{self, Sent};
use protocol::{PilotId, SlotId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The outbox directory of a pilot state directory.
pub fn outbox_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("outbox")
}

/// One event as it was signed, with where it goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter {
    /// The coordinator's base URL, as the pilot was told it.
    pub coordinator: String,
    /// PEM of the CA that signed an https coordinator's certificate, if the
    /// pilot was given one (public data: kill-all then needs no flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    pub slot_id: SlotId,
    pub pilot_id: PilotId,
    pub seq: u64,
    /// The event's type (`released`, ...), for logs and reports.
    pub kind: String,
    /// When the pilot made the event (ms since the epoch, its clock).
    pub ts_ms: u64,
    /// Hex HMAC of `body` with the slot key.
    pub signature: String,
    /// The event's JSON, byte for byte as signed.
    pub body: String,
}

impl Letter {
    fn file_name(&self) -> String {
        letter_file_name(&self.pilot_id, self.seq)
    }
}

fn letter_file_name(pilot: &PilotId, seq: u64) -> String {
    format!("{pilot}.{seq:020}.json")
}

fn lock_file_name(pilot: &PilotId) -> String {
    format!("{pilot}.lock")
}

/// Errors of the outbox on disk.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox lock {path} is held by another process")]
    Busy { path: PathBuf },
    #[error("cannot encode the letter for event {seq}: {message}")]
    Encode { seq: u64, message: String },
    #[error("outbox {path} is owned by uid {uid} with mode {mode:o}: others could have written its letters; not delivering them (it must be 0700 and owned by this user, root, or, for root, the owner of its state directory)")]
    Unsafe { path: PathBuf, uid: u32, mode: u32 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) owner-only.
fn create_dir(dir: &Path) -> Result<(), OutboxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    // An existing directory keeps its mode through create(): make sure.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Takes `<dir>/<pilot>.lock`, waiting at most `wait`; checks that the
/// file locked is still the one named (a deliverer removes lock files of
/// pilots whose letters are all delivered).
fn lock_pilot(dir: &Path, pilot: &PilotId, wait: Duration) -> Result<FileLock, OutboxError> {
    let path = dir.join(lock_file_name(pilot));
    for _ in 0..10 {
        let lock = lock_exclusive(&path, wait).map_err(|e| match e {
            LockError::Io(source) => OutboxError::Io {
                path: path.clone(),
                source,
            },
            LockError::Timeout(_) => OutboxError::Busy { path: path.clone() },
        })?;
        if lock.is_at(&path) {
            return Ok(lock);
        }
    }
    Err(OutboxError::Busy { path })
}

/// One pilot's queue of letters: on disk when durable, always in memory.
pub struct Outbox {
    disk: Option<Disk>,
    queue: VecDeque<Letter>,
}

struct Disk {
    dir: PathBuf,
    pilot: PilotId,
    _lock: FileLock,
}

impl Outbox {
    /// An outbox that forgets its letters with the process (a probe, a test).
    pub fn in_memory() -> Self {
        Self {
            disk: None,
            queue: VecDeque::new(),
        }
    }

    /// The durable outbox of pilot instance `pilot` in `dir` (created 0700);
    /// holds its lock until dropped.
    pub fn open(dir: &Path, pilot: &PilotId) -> Result<Self, OutboxError> {
        create_dir(dir)?;
        let lock = lock_pilot(dir, pilot, Duration::from_secs(1))?;
        Ok(Self {
            disk: Some(Disk {
                dir: dir.to_path_buf(),
                pilot: pilot.clone(),
                _lock: lock,
            }),
            queue: VecDeque::new(),
        })
    }

    /// Letters not yet delivered.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The letter to send next.
    pub fn front(&self) -> Option<&Letter> {
        self.queue.front()
    }

    /// Queues a letter after writing it durably. A letter that cannot be
    /// written is queued all the same (it is sent while this process lives)
    /// and the error returned for the log.
    pub fn put(&mut self, letter: Letter) -> Result<(), OutboxError> {
        let written = match &self.disk {
            None => Ok(()),
            Some(d) => {
                let path = d.dir.join(letter.file_name());
                serde_json::to_vec(&letter)
                    .map_err(|e| OutboxError::Encode {
                        seq: letter.seq,
                        message: e.to_string(),
                    })
                    .and_then(|bytes| write_durable(&path, &bytes, 0o600).map_err(io_err(&path)))
            }
        };
        self.queue.push_back(letter);
        written
    }

    /// The front letter was delivered (or refused for good): forget it.
    pub fn pop_front(&mut self) {
        if let Some(letter) = self.queue.pop_front() {
            if let Some(d) = &self.disk {
                // No fsync: a letter that comes back after a power loss is
                // resent and answered as a duplicate.
                let path = d.dir.join(letter.file_name());
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a delivered letter");
                    }
                }
            }
        }
    }
}

impl Drop for Outbox {
    /// Nothing left to deliver: the lock file goes too. Letters left stay,
    /// for the next pilot or kill-all.
    fn drop(&mut self) {
        if let Some(d) = &self.disk {
            if self.queue.is_empty() {
                let _ = std::fs::remove_file(d.dir.join(lock_file_name(&d.pilot)));
            } else {
                tracing::warn!(
                    letters = self.queue.len(),
                    dir = %d.dir.display(),
                    "undelivered events kept in the outbox for the next pilot on this node or workspace-kill-all"
                );
            }
        }
    }
}

/// What became of one letter a departed pilot left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The coordinator stored it now.
    Delivered,
    /// The coordinator had it already (an earlier try got through).
    AlreadyDelivered,
    /// The coordinator will never take it (its answer); the letter is removed.
    Refused { status: u16, error: String },
    /// Not delivered this time (coordinator unreachable, time up); kept.
    Kept { error: String },
    /// `--dry-run`: would be sent.
    Planned,
    /// Its pilot is still running and sends its own letters.
    PilotAlive,
    /// The file is not a letter; moved aside as `<name>.unreadable`.
    Unreadable { error: String },
}

/// A letter and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub slot_id: Option<SlotId>,
    pub pilot_id: PilotId,
    pub seq: u64,
    pub kind: String,
    pub ts_ms: u64,
    pub coordinator: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Delivery {
    /// True when the letter is gone from the outbox.
    pub fn settled(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Delivered
                | Outcome::AlreadyDelivered
                | Outcome::Refused { .. }
                | Outcome::Unreadable { .. }
        )
    }
}

/// Which letters to deliver and how.
#[derive(Clone, Debug)]
pub struct DeliverOptions {
    /// Only letters of this slot.
    pub slot: Option<SlotId>,
    /// Never this pilot instance (the caller's own).
    pub skip: Option<PilotId>,
    /// Timeout of each request.
    pub request_timeout: Duration,
    /// Report what would be sent; send and remove nothing.
    pub dry_run: bool,
}

/// Refuses an outbox others could have written to: a letter names the URL
/// that kill-all (root) then posts to.
fn check_owner(dir: &Path) -> Result<(), OutboxError> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(OutboxError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let me = nix::unistd::geteuid().as_raw();
    if !(m.uid() == me || m.uid() == 0 || root_trusts_state_dir_owner(dir, m.uid(), me))
        || m.mode() & 0o022 != 0
    {
        return Err(OutboxError::Unsafe {
            path: dir.to_path_buf(),
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Root (kill-all run by an admin) also delivers an outbox owned by the
/// user the site runs its pilots as: the owner of the state directory that
/// holds it, when that directory is writable by its owner alone. Nobody else
/// could have written those letters.
fn root_trusts_state_dir_owner(outbox: &Path, owner: u32, me: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    me == 0
        && outbox
            .parent()
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|p| p.uid() == owner && p.mode() & 0o022 == 0)
}

/// Letters on disk, by pilot instance, in sequence order.
fn scan(dir: &Path) -> Result<BTreeMap<PilotId, Vec<(u64, PathBuf)>>, OutboxError> {
    check_owner(dir)?;
    let mut by_pilot: BTreeMap<PilotId, Vec<(u64, PathBuf)>> = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(by_pilot),
        Err(source) => {
            return Err(OutboxError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let Some((pilot, seq)) = stem.rsplit_once('.') else {
            continue;
        };
        if let (Ok(pilot), Ok(seq)) = (PilotId::parse(pilot), seq.parse::<u64>()) {
            by_pilot.entry(pilot).or_default().push((seq, entry.path()));
        }
    }
    for letters in by_pilot.values_mut() {
        letters.sort();
    }
    Ok(by_pilot)
}

/// Pilot instances whose lock file remains although no letter does (a pilot
/// killed with everything delivered); their lock files are litter.
fn stale_locks(dir: &Path, with_letters: &BTreeMap<PilotId, Vec<(u64, PathBuf)>>) -> Vec<PilotId> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            PilotId::parse(name.strip_suffix(".lock")?).ok()
        })
        .filter(|p| !with_letters.contains_key(p))
        .collect()
}

/// Delivers the letters that departed pilots left in `dir`, each pilot's in
/// sequence order, until `deadline`. A pilot still running (its lock held)
/// is skipped; a letter the coordinator took, had, or refused is removed;
/// after a network failure the rest of that coordinator's letters are kept
/// for a later try. Returns one [`Delivery`] per letter looked at.
pub async fn deliver_left_behind(
    dir: &Path,
    opts: &DeliverOptions,
    deadline: Instant,
) -> Result<Vec<Delivery>, OutboxError> {
    let letters = scan(dir)?;
    if !opts.dry_run {
        for pilot in stale_locks(dir, &letters) {
            if let Ok(lock) = lock_pilot(dir, &pilot, Duration::ZERO) {
                let _ = std::fs::remove_file(dir.join(lock_file_name(&pilot)));
                drop(lock);
            }
        }
    }
    let mut clients: HashMap<(String, Option<String>), reqwest::Client> = HashMap::new();
    // Coordinators that failed this pass, with why: the rest of their letters wait.
    let mut down: HashMap<String, String> = HashMap::new();
    let mut report = Vec::new();
    for (pilot, files) in letters {
        if opts.skip.as_ref() == Some(&pilot) {
            continue;
        }
        let lock = match lock_pilot(dir, &pilot, Duration::ZERO) {
            Ok(l) => l,
            Err(OutboxError::Busy { .. }) => {
                report.extend(
                    files
                        .iter()
                        .map(|(seq, _)| unread(&pilot, *seq, Outcome::PilotAlive)),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        if !opts.dry_run {
            remove_partial_writes(dir, &pilot);
        }
        let mut left = 0usize;
        for (seq, path) in files {
            let letter = match read_letter(&path) {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let error = e.to_string();
                    if !opts.dry_run {
                        let aside = path.with_extension("json.unreadable");
                        if let Err(e) = std::fs::rename(&path, &aside) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot move an unreadable letter aside");
                        }
                    }
                    report.push(unread(&pilot, seq, Outcome::Unreadable { error }));
                    continue;
                }
            };
            if opts.slot.as_ref().is_some_and(|s| s != &letter.slot_id) {
                left += 1;
                continue;
            }
            let outcome = if opts.dry_run {
                Outcome::Planned
            } else if let Some(error) = down.get(&letter.coordinator) {
                Outcome::Kept {
                    error: error.clone(),
                }
            } else if Instant::now() >= deadline {
                Outcome::Kept {
                    error: "no time left to deliver it".to_string(),
                }
            } else {
                let key = (letter.coordinator.clone(), letter.ca_pem.clone());
                let client = match clients.get(&key) {
                    Some(c) => Ok(c.clone()),
                    None => notify::http_client(
                        &letter.coordinator,
                        opts.request_timeout,
                        letter.ca_pem.as_deref().map(str::as_bytes),
                    )
                    .inspect(|c| {
                        clients.insert(key, c.clone());
                    }),
                };
                match client {
                    Err(e) => Outcome::Kept {
                        error: e.to_string(),
                    },
                    Ok(client) => {
                        send_until(&client, &letter, opts.request_timeout, deadline).await
                    }
                }
            };
            match &outcome {
                Outcome::Delivered | Outcome::AlreadyDelivered => {
                    tracing::info!(slot_id = %letter.slot_id, pilot_id = %pilot, seq, event = %letter.kind, "delivered an event a departed pilot left");
                }
                Outcome::Refused { status, error } => {
                    tracing::error!(slot_id = %letter.slot_id, pilot_id = %pilot, seq, event = %letter.kind, status, error = %error, "coordinator refused an event a departed pilot left; dropping it");
                }
                Outcome::Kept { error } => {
                    down.entry(letter.coordinator.clone())
                        .or_insert_with(|| error.clone());
                }
                _ => {}
            }
            let d = Delivery {
                slot_id: Some(letter.slot_id.clone()),
                pilot_id: pilot.clone(),
                seq,
                kind: letter.kind.clone(),
                ts_ms: letter.ts_ms,
                coordinator: letter.coordinator.clone(),
                outcome,
            };
            if d.settled() && !opts.dry_run {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a delivered letter");
                }
            } else {
                left += 1;
            }
            report.push(d);
        }
        if left == 0 && !opts.dry_run {
            let _ = std::fs::remove_file(dir.join(lock_file_name(&pilot)));
        }
        drop(lock);
    }
    Ok(report)
}

/// Removes the temporary files of letters `pilot` was writing when it died
/// (`.<letter>.tmp.<pid>`, see [`write_durable`]); its lock must be held.
fn remove_partial_writes(dir: &Path, pilot: &PilotId) {
    let prefix = format!(".{pilot}.");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.contains(".json.tmp.") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn unread(pilot: &PilotId, seq: u64, outcome: Outcome) -> Delivery {
    Delivery {
        slot_id: None,
        pilot_id: pilot.clone(),
        seq,
        kind: String::new(),
        ts_ms: 0,
        coordinator: String::new(),
        outcome,
    }
}

fn read_letter(path: &Path) -> std::io::Result<Letter> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// Sends one letter; a coordinator answering 5xx is tried again (it is up,
/// but busy) until `deadline`; any other failure keeps the letter.
async fn send_until(
    client: &reqwest::Client,
    letter: &Letter,
    timeout: Duration,
    deadline: Instant,
) -> Outcome {
    let mut pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match notify::send_letter(client, letter, timeout.min(left)).await {
            Sent::Acked { duplicate: false } => return Outcome::Delivered,
            Sent::Acked { duplicate: true } => return Outcome::AlreadyDelivered,
            Sent::Refused { status, body } => {
                return Outcome::Refused {
                    status,
                    error: body,
                }
            }
            Sent::Failed {
                retry: true, error, ..
            } if Instant::now() + pause < deadline => {
                tracing::debug!(seq = letter.seq, error = %error, "coordinator busy; trying again");
            }
            Sent::Failed { error, .. } => return Outcome::Kept { error },
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// [`deliver_left_behind`] from synchronous code (kill-all), on a runtime of its own.
pub fn deliver_left_behind_blocking(
    dir: &Path,
    opts: &DeliverOptions,
    budget: Duration,
) -> Result<Vec<Delivery>, OutboxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err(dir))?;
    rt.block_on(async { deliver_left_behind(dir, opts, Instant::now() + budget).await })
}

/// The next pilot's background job: delivers what departed pilots left,
/// trying again with backoff while some letters are kept, for as long as
/// this pilot lives.
pub async fn keep_delivering(dir: PathBuf, opts: DeliverOptions) {
    let mut pause = Duration::from_secs(1);
    loop {
        // One pass has as long as a pass needs; each request is bounded.
        let far = Instant::now() + Duration::from_secs(3600);
        let kept = match deliver_left_behind(&dir, &opts, far).await {
            Ok(report) => report
                .iter()
                .filter(|d| matches!(d.outcome, Outcome::Kept { .. }))
                .count(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox of departed pilots");
                return;
            }
        };
        if kept == 0 {
            return;
        }
        tracing::info!(
            kept,
            retry_in_s = pause.as_secs(),
            "events departed pilots left are not delivered yet"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(pilot: &PilotId, seq: u64) -> Letter {
        Letter {
            coordinator: "http://127.0.0.1:9".into(),
            ca_pem: None,
            slot_id: SlotId::parse("sl-0000abcd").unwrap(),
            pilot_id: pilot.clone(),
            seq,
            kind: "released".into(),
            ts_ms: 5,
            signature: "00".into(),
            body: format!("{{\"seq\":{seq}}}"),
        }
    }

    #[test]
    fn letters_are_owner_only_files_named_in_sequence_order_and_removed_when_delivered() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/outbox");
        let pilot = PilotId::generate();
        let mut out = Outbox::open(&dir, &pilot).unwrap();
        for seq in [1, 2, 10] {
            out.put(letter(&pilot, seq)).unwrap();
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let found = scan(&dir).unwrap();
        let seqs: Vec<u64> = found[&pilot].iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2, 10]);
        for (_, path) in &found[&pilot] {
            assert_eq!(mode(path), 0o600);
        }
        assert_eq!(
            read_letter(&found[&pilot][2].1).unwrap(),
            letter(&pilot, 10)
        );
        out.pop_front();
        assert_eq!(out.front().map(|l| l.seq), Some(2));
        assert_eq!(scan(&dir).unwrap()[&pilot].len(), 2);
        // A second holder of the same pilot's outbox is refused while it lives.
        assert!(matches!(
            Outbox::open(&dir, &pilot),
            Err(OutboxError::Busy { .. })
        ));
        drop(out);
        assert!(dir.join(lock_file_name(&pilot)).exists(), "letters left");
        let mut again = Outbox::open(&dir, &pilot).unwrap();
        again.queue.clear();
        drop(again);
        assert!(!dir.join(lock_file_name(&pilot)).exists(), "nothing left");
    }

    #[tokio::test]
    async fn a_running_pilots_letters_are_not_delivered_by_others() {
        let tmp = tempfile::tempdir().unwrap();
        let pilot = PilotId::generate();
        let mut out = Outbox::open(tmp.path(), &pilot).unwrap();
        out.put(letter(&pilot, 1)).unwrap();
        let opts = DeliverOptions {
            slot: None,
            skip: None,
            request_timeout: Duration::from_millis(200),
            dry_run: false,
        };
        let report =
            deliver_left_behind(tmp.path(), &opts, Instant::now() + Duration::from_secs(1))
                .await
                .unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].outcome, Outcome::PilotAlive);
        assert_eq!(scan(tmp.path()).unwrap()[&pilot].len(), 1);
        // Once it is gone, the letter is tried (nobody listens on port 9): kept.
        drop(out);
        let report =
            deliver_left_behind(tmp.path(), &opts, Instant::now() + Duration::from_secs(1))
                .await
                .unwrap();
        assert!(
            matches!(&report[0].outcome, Outcome::Kept { error } if error.contains("refused")),
            "{report:?}"
        );
        assert_eq!(scan(tmp.path()).unwrap()[&pilot].len(), 1);
    }

    #[tokio::test]
    async fn an_outbox_others_may_write_is_not_delivered() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let opts = DeliverOptions {
            slot: None,
            skip: None,
            request_timeout: Duration::from_millis(200),
            dry_run: true,
        };
        let r = deliver_left_behind(tmp.path(), &opts, Instant::now()).await;
        assert!(
            matches!(r, Err(OutboxError::Unsafe { mode: 0o777, .. })),
            "{r:?}"
        );
    }

    /// kill-all runs as root; the site's pilots may run as a service user.
    /// Root delivers that user's outbox when the state directory is theirs
    /// too, and not an outbox some other user owns in root's directory.
    #[test]
    fn root_delivers_the_outbox_of_the_state_dirs_owner_and_no_one_elses() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give files away");
            return;
        }
        let nobody = nix::unistd::Uid::from_raw(65534);
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let outbox = outbox_dir(&state);
        std::fs::create_dir_all(&outbox).unwrap();
        for d in [&state, &outbox] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(d, Some(nobody), None).unwrap();
        }
        assert!(scan(&outbox).is_ok(), "{:?}", scan(&outbox));
        // The same outbox in a state directory root owns: someone else's.
        nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        assert!(
            matches!(scan(&outbox), Err(OutboxError::Unsafe { uid: 65534, .. })),
            "{:?}",
            scan(&outbox)
        );
        // A state directory others may write is no one's to vouch for.
        nix::unistd::chown(&state, Some(nobody), None).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(scan(&outbox), Err(OutboxError::Unsafe { .. })));
    }

    #[tokio::test]
    async fn an_unreadable_letter_is_moved_aside_and_the_rest_go_on() {
        let tmp = tempfile::tempdir().unwrap();
        let pilot = PilotId::generate();
        std::fs::write(tmp.path().join(letter_file_name(&pilot, 1)), b"{trunc").unwrap();
        // And the temporary file of a letter it was writing when it died.
        let partial = tmp
            .path()
            .join(format!(".{}.tmp.4242", letter_file_name(&pilot, 2)));
        std::fs::write(&partial, b"{").unwrap();
        let opts = DeliverOptions {
            slot: None,
            skip: None,
            request_timeout: Duration::from_millis(200),
            dry_run: false,
        };
        let report =
            deliver_left_behind(tmp.path(), &opts, Instant::now() + Duration::from_secs(1))
                .await
                .unwrap();
        assert!(matches!(report[0].outcome, Outcome::Unreadable { .. }));
        assert!(scan(tmp.path()).unwrap().is_empty());
        assert!(!partial.exists(), "a partial write is removed");
        assert!(tmp
            .path()
            .join(format!("{}.unreadable", letter_file_name(&pilot, 1)))
            .exists());
    }
}
