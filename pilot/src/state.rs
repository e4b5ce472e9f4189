//! The pilot's life as a state machine, and the node state file that records it.
//!
//! [`transition`] is the one place every state change is decided; the run
//! loop does the side effects around it. The state file
//! (`<state-dir>/slot-<slot id>.json`) is written before each action it
//! records, so kill-all can undo what a killed pilot left. Not for I/O with
//! the hypervisor or the coordinator.

use crate::files::{lock_exclusive, write_atomic, FileLock, LockError};
use protocol::{PilotId, SlotId, VmId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the pilot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PilotState {
    /// Up, telling the coordinator; nothing touched yet.
    Starting,
    /// Ballooning dom0 down.
    Reserving,
    /// Memory reserved; following the coordinator's commands (a pool slot:
    /// bound to a lease).
    Reserved,
    /// A pool slot with no lease: its idle reservation held (possibly 0 MB),
    /// waiting for `bind`.
    Idle,
    /// Changing the reservation or the binding (bind, unbind, reserve).
    Rebinding,
    /// The batch system warned us; waiting for the coordinator's commands.
    Preempted,
    /// Destroying the slot's VMs and restoring memory.
    Releasing,
    /// Everything undone (terminal).
    Released,
    /// Reservation failed or cleanup was incomplete (terminal).
    Failed,
}

/// What happened, as far as the state machine cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// The coordinator heard `started`; go take the memory.
    Reserve,
    ReserveSucceeded,
    /// A pool slot reserved its idle memory.
    ReservedIdle,
    /// The balloon refused (memory already put back).
    ReserveFailed,
    /// SIGTERM, SIGINT or SIGUSR2.
    Signal,
    /// A bind, unbind or reserve command starts.
    Rebind,
    /// It ended (done or not); `bound`: the slot serves a lease now.
    Rebound {
        bound: bool,
    },
    /// Start cleaning up (release command, deadline, end of the preemption
    /// wait, an error, or a signal before anything was reserved).
    Release,
    /// Cleanup ended; `clean` is false if anything was left behind.
    CleanupFinished {
        clean: bool,
    },
}

/// A transition the table does not allow (a bug in the caller).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid pilot transition: {input:?} in state {state:?}")]
pub struct InvalidTransition {
    pub state: PilotState,
    pub input: Input,
}

/// The whole transition table.
pub fn transition(state: PilotState, input: Input) -> Result<PilotState, InvalidTransition> {
    use Input as I;
    use PilotState as S;
    let next = match (state, input) {
        (S::Starting, I::Reserve) => S::Reserving,
        (S::Reserving, I::ReserveSucceeded) => S::Reserved,
        (S::Reserving, I::ReservedIdle) => S::Idle,
        (S::Reserving, I::ReserveFailed) => S::Failed,
        (S::Reserved | S::Idle, I::Rebind) => S::Rebinding,
        (S::Rebinding, I::Rebound { bound: true }) => S::Reserved,
        (S::Rebinding, I::Rebound { bound: false }) => S::Idle,
        (S::Reserved | S::Idle, I::Signal) => S::Preempted,
        (
            S::Starting | S::Reserving | S::Reserved | S::Idle | S::Rebinding | S::Preempted,
            I::Release,
        ) => S::Releasing,
        (S::Releasing, I::CleanupFinished { clean: true }) => S::Released,
        (S::Releasing, I::CleanupFinished { clean: false }) => S::Failed,
        (state, input) => return Err(InvalidTransition { state, input }),
    };
    Ok(next)
}

/// Life of one VM as the state file records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRecordState {
    Creating,
    Running,
    Destroying,
    Destroyed,
    Failed,
    /// Being saved to `checkpoint` (still on the node).
    Suspending,
    /// Saved to `checkpoint` and gone from the node.
    Suspended,
    /// Being restored from `checkpoint`.
    Resuming,
}

impl VmRecordState {
    /// Whether a VM in this state may be on the node (and hold memory).
    pub fn on_node(self) -> bool {
        !matches!(
            self,
            VmRecordState::Destroyed | VmRecordState::Failed | VmRecordState::Suspended
        )
    }
}

/// One VM of the slot on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub vm_id: VmId,
    /// Hypervisor name, `wsp-<slot>-<vm>`.
    pub name: String,
    pub memory_mb: u64,
    pub state: VmRecordState,
    /// Its NICs (MAC, address) as the coordinator assigned them; the taps,
    /// DHCP entries and guard rules of kvm are in the driver's run dir.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<protocol::pilot::Nic>,
    /// The checkpoint it is being saved to, was saved to or is restored from;
    /// kill-all removes it when unfinished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<protocol::pilot::CheckpointId>,
}

/// The node state file of one pilot: `<state-dir>/slot-<slot id>.json`, mode 0600.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStateFile {
    pub slot_id: SlotId,
    pub pilot_id: PilotId,
    pub pid: u32,
    pub node: String,
    pub hypervisor: String,
    pub state: PilotState,
    /// dom0's current memory before this pilot reserved (0 until it did).
    pub original_dom0_mb: u64,
    /// Memory this pilot took from dom0's target and has not given back.
    pub taken_mb: u64,
    /// The dom0 target this pilot last set (0 until it did).
    pub target_dom0_mb: u64,
    /// What the slot holds for VMs now (it changes with pool bindings).
    #[serde(default)]
    pub reserved_mb: u64,
    /// The lease a pool slot serves (none: idle, or not a pool slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<protocol::WorkspaceId>,
    pub vms: Vec<VmRecord>,
    pub updated_ms: u64,
}

/// Errors reading or writing state files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("node lock {path} stayed held by another process for {waited_ms} ms")]
    LockTimeout { path: PathBuf, waited_ms: u64 },
}

/// Path of the state file of `slot` in `dir`.
pub fn state_file_path(dir: &Path, slot: &SlotId) -> PathBuf {
    dir.join(format!("slot-{slot}.json"))
}

impl NodeStateFile {
    /// Writes the file atomically (mode 0600), stamping `updated_ms`.
    pub fn write(&mut self, dir: &Path) -> Result<PathBuf, StateError> {
        self.updated_ms = protocol::now_ms();
        let path = state_file_path(dir, &self.slot_id);
        let text = serde_json::to_vec_pretty(self).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &text, 0o600).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<Self, StateError> {
        let text = std::fs::read_to_string(path).map_err(|source| StateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// Removes a state file; a file already gone is fine.
pub fn remove_state_file(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Every `slot-*.json` in `dir`, sorted (an absent directory has none).
pub fn list_state_files(dir: &Path) -> Result<Vec<PathBuf>, StateError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("slot-") && name.ends_with(".json") {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The node-wide lock (`<state-dir>/node.lock`) held while dom0's target is
/// read, changed and verified, so pilots on one node do not interleave.
pub struct NodeLock(#[allow(dead_code)] FileLock);

impl NodeLock {
    pub fn acquire(dir: &Path, timeout: Duration) -> Result<Self, StateError> {
        let path = dir.join("node.lock");
        lock_exclusive(&path, timeout)
            .map(NodeLock)
            .map_err(|e| match e {
                LockError::Io(source) => StateError::Io { path, source },
                LockError::Timeout(w) => StateError::LockTimeout {
                    path,
                    waited_ms: w.as_millis() as u64,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Input as I;
    use PilotState as S;

    const ALL_STATES: [PilotState; 9] = [
        S::Starting,
        S::Reserving,
        S::Reserved,
        S::Idle,
        S::Rebinding,
        S::Preempted,
        S::Releasing,
        S::Released,
        S::Failed,
    ];
    const ALL_INPUTS: [Input; 11] = [
        I::Reserve,
        I::ReserveSucceeded,
        I::ReservedIdle,
        I::ReserveFailed,
        I::Signal,
        I::Rebind,
        I::Rebound { bound: true },
        I::Rebound { bound: false },
        I::Release,
        I::CleanupFinished { clean: true },
        I::CleanupFinished { clean: false },
    ];

    #[test]
    fn happy_path_goes_from_starting_to_released() {
        let mut s = S::Starting;
        for input in [
            I::Reserve,
            I::ReserveSucceeded,
            I::Release,
            I::CleanupFinished { clean: true },
        ] {
            s = transition(s, input).unwrap();
        }
        assert_eq!(s, S::Released);
    }

    #[test]
    fn signal_while_reserved_waits_in_preempted_then_releases() {
        let s = transition(S::Reserved, I::Signal).unwrap();
        assert_eq!(s, S::Preempted);
        assert_eq!(transition(s, I::Release), Ok(S::Releasing));
        assert_eq!(transition(s, I::Signal).unwrap_err().state, S::Preempted);
    }

    #[test]
    fn failed_reservation_and_unclean_cleanup_end_in_failed() {
        assert_eq!(transition(S::Reserving, I::ReserveFailed), Ok(S::Failed));
        assert_eq!(
            transition(S::Releasing, I::CleanupFinished { clean: false }),
            Ok(S::Failed)
        );
    }

    #[test]
    fn terminal_states_accept_nothing_and_releasing_accepts_only_its_end() {
        for input in ALL_INPUTS {
            assert!(transition(S::Released, input).is_err());
            assert!(transition(S::Failed, input).is_err());
        }
        for input in ALL_INPUTS {
            if !matches!(input, I::CleanupFinished { .. }) {
                assert!(transition(S::Releasing, input).is_err(), "{input:?}");
            }
        }
        let allowed: usize = ALL_STATES
            .iter()
            .flat_map(|s| ALL_INPUTS.iter().map(move |i| (*s, *i)))
            .filter(|(s, i)| transition(*s, *i).is_ok())
            .count();
        assert_eq!(allowed, 18, "the table has exactly eighteen transitions");
    }

    #[test]
    fn a_pool_slot_idles_binds_unbinds_and_is_released_or_preempted_from_idle() {
        let mut s = S::Starting;
        for (input, want) in [
            (I::Reserve, S::Reserving),
            (I::ReservedIdle, S::Idle),
            (I::Rebind, S::Rebinding),
            (I::Rebound { bound: true }, S::Reserved),
            (I::Rebind, S::Rebinding),
            (I::Rebound { bound: false }, S::Idle),
        ] {
            s = transition(s, input).unwrap();
            assert_eq!(s, want, "{input:?}");
        }
        assert_eq!(transition(S::Idle, I::Signal), Ok(S::Preempted));
        assert_eq!(transition(S::Idle, I::Release), Ok(S::Releasing));
        assert_eq!(transition(S::Rebinding, I::Release), Ok(S::Releasing));
        // Rebinding is one command at a time; starting or reserving is not a binding.
        assert!(transition(S::Rebinding, I::Rebind).is_err());
        assert!(transition(S::Rebinding, I::Signal).is_err());
        assert!(transition(S::Starting, I::Rebind).is_err());
        assert!(transition(S::Preempted, I::Rebind).is_err());
    }

    #[test]
    fn state_file_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut f = NodeStateFile {
            slot_id: SlotId::generate(),
            pilot_id: PilotId::generate(),
            pid: 42,
            node: "n1".into(),
            hypervisor: "sim".into(),
            state: S::Reserved,
            original_dom0_mb: 4096,
            taken_mb: 1024,
            target_dom0_mb: 3072,
            reserved_mb: 1024,
            workspace_id: None,
            vms: vec![],
            updated_ms: 0,
        };
        let path = f.write(dir.path()).unwrap();
        assert_eq!(path, state_file_path(dir.path(), &f.slot_id));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(NodeStateFile::read(&path).unwrap(), f);
        assert_eq!(list_state_files(dir.path()).unwrap(), vec![path.clone()]);
        remove_state_file(&path).unwrap();
        remove_state_file(&path).unwrap();
        assert!(list_state_files(dir.path()).unwrap().is_empty());
    }
}
