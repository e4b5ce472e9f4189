//! The life of a VM of a workspace.
//!
//! `pending` until it is mapped onto a reserved node, `starting` once the
//! pilot is told to start it, `running` when the pilot says so; it ends
//! `destroyed`, `preempted` (its lease was preempted) or `failed`. A
//! running VM may be saved (`suspending` -> `suspended`: a checkpoint, on no
//! node) and restored elsewhere (`resuming` -> `running`). A VM whose
//! pilot went silent is `unknown`: it may still run on its node until kill-all
//! cleans the node or a late report from the pilot says it is gone.
//! (`destroying`, in the view's states, is not reached yet: VMs are destroyed
//! with their slot, not one by one.)

use protocol::view::VmState;

/// What can happen to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Placed on a node; the pilot is told to start it.
    Mapped,
    /// The pilot reported it running.
    Started,
    /// The pilot reported it failed (to start, or to be destroyed).
    Failed,
    /// It is gone with its slot (or destroyed); `preempted` when its lease was preempted.
    Gone { preempted: bool },
    /// Its pilot saves it (told to, or on the batch system's warning).
    SaveStarted,
    /// Its checkpoint is complete and it is gone from its node.
    Saved,
    /// A commanded save failed and the VM runs on.
    SaveFailedRunning,
    /// A pilot is told to restore it from its checkpoint.
    RestoreSent,
    /// The pilot reported it running from its checkpoint.
    Restored,
    /// The restore failed or was called off; its checkpoint is intact.
    RestoreAborted,
    /// Its pilot went silent: nobody knows whether it still runs.
    PilotLost,
}

/// The VM's next state, or `None` when the input does not change it.
pub fn next(state: VmState, input: Input) -> Option<VmState> {
    use VmState as S;
    if state.is_terminal() {
        return None;
    }
    let to = match (state, input) {
        (S::Pending, Input::Mapped) => S::Starting,
        (S::Starting, Input::Started) => S::Running,
        (S::Running, Input::SaveStarted) => S::Suspending,
        (S::Running | S::Suspending, Input::Saved) => S::Suspended,
        (S::Suspending, Input::SaveFailedRunning) => S::Running,
        (S::Suspended, Input::RestoreSent) => S::Resuming,
        (S::Resuming, Input::Restored) => S::Running,
        // Called off: its checkpoint is still its state (a member that resumed
        // already is destroyed with its new slot).
        (S::Resuming | S::Running, Input::RestoreAborted) => S::Suspended,
        (_, Input::Failed) => S::Failed,
        (_, Input::Gone { preempted: false }) => S::Destroyed,
        (_, Input::Gone { preempted: true }) => S::Preempted,
        // A VM being saved when its pilot was lost: its guest may be left
        // stopped on the node, and the save never completed.
        (S::Starting | S::Running | S::Suspending | S::Destroying, Input::PilotLost) => S::Unknown,
        _ => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState as S;

    const INPUTS: [Input; 12] = [
        Input::PilotLost,
        Input::Mapped,
        Input::Started,
        Input::Failed,
        Input::Gone { preempted: false },
        Input::Gone { preempted: true },
        Input::SaveStarted,
        Input::Saved,
        Input::SaveFailedRunning,
        Input::RestoreSent,
        Input::Restored,
        Input::RestoreAborted,
    ];

    #[test]
    fn a_vm_is_saved_and_restored_elsewhere() {
        let s = next(S::Running, Input::SaveStarted).unwrap();
        assert_eq!(next(s, Input::SaveFailedRunning), Some(S::Running));
        let s = next(s, Input::Saved).unwrap();
        assert_eq!(s, S::Suspended);
        assert_eq!(next(s, Input::Started), None);
        let s = next(s, Input::RestoreSent).unwrap();
        assert_eq!(next(s, Input::RestoreAborted), Some(S::Suspended));
        assert_eq!(next(s, Input::Restored), Some(S::Running));
        // A suspended VM whose lease ends is gone with it.
        assert_eq!(
            next(S::Suspended, Input::Gone { preempted: false }),
            Some(S::Destroyed)
        );
        assert_eq!(next(S::Pending, Input::SaveStarted), None);
        // Its pilot lost mid-save: nobody knows what is left on the node.
        assert_eq!(next(S::Suspending, Input::PilotLost), Some(S::Unknown));
    }

    #[test]
    fn a_vm_is_mapped_started_and_destroyed() {
        let s = next(S::Pending, Input::Mapped).unwrap();
        let s = next(s, Input::Started).unwrap();
        assert_eq!(s, S::Running);
        assert_eq!(next(s, Input::Gone { preempted: true }), Some(S::Preempted));
        assert_eq!(
            next(S::Pending, Input::Gone { preempted: false }),
            Some(S::Destroyed)
        );
    }

    #[test]
    fn a_vm_not_told_to_start_cannot_be_running() {
        assert_eq!(next(S::Pending, Input::Started), None);
        assert_eq!(next(S::Running, Input::Mapped), None);
    }

    #[test]
    fn a_vm_of_a_lost_pilot_is_unknown_until_a_late_report_says_it_is_gone() {
        let s = next(S::Running, Input::PilotLost).unwrap();
        assert_eq!(s, S::Unknown);
        assert!(!s.is_terminal(), "a late report still moves it");
        assert_eq!(next(s, Input::Started), None);
        assert_eq!(next(s, Input::PilotLost), None);
        assert_eq!(
            next(s, Input::Gone { preempted: false }),
            Some(S::Destroyed)
        );
        assert_eq!(next(S::Pending, Input::PilotLost), None, "on no node");
    }

    #[test]
    fn terminal_vms_never_move() {
        for t in [S::Destroyed, S::Preempted, S::Failed] {
            for i in INPUTS {
                assert_eq!(next(t, i), None, "{t:?} {i:?}");
            }
        }
    }
}
