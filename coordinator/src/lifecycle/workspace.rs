//! The life of a workspace (a lease) as one transition function.
//!
//! `next(state, input)` is the only place that decides a workspace's next
//! state; the engine performs side effects (commands to pilots, batch job
//! cancels) around it. Reading the `match` shows every transition.

use protocol::view::WorkspaceState as S;

/// What can happen to a workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Every slot of the ensemble is reserved: VMs can start.
    AllSlotsReserved,
    /// Every VM reported running.
    AllVmsRunning,
    /// The client asked for destroy.
    DestroyRequested,
    /// The lease ran out (coordinator timer or a pilot's own deadline).
    LeaseExpired,
    /// The batch system preempted a pilot job.
    Preempted,
    /// A slot could not be reserved, a VM failed, a job ended early.
    Failed,
    /// Every slot is released or failed: nothing is left anywhere.
    AllSlotsEnded,
    /// Its VMs are being saved (preemption, or the client asked).
    SuspendStarted,
    /// Every VM is a checkpoint.
    AllSaved,
    /// New slots are asked for, to restore the VMs into.
    ResumeStarted,
    /// The resume was given up with the checkpoints intact (a slot refused,
    /// a node without the room): suspended again, to be resumed later.
    ResumeAborted,
}

/// The next state, or `None` when the input does not change the state.
pub fn next(state: S, input: Input) -> Option<S> {
    use Input::*;
    let to = match (state, input) {
        (S::Pending, AllSlotsReserved) => S::Starting,
        (S::Starting | S::Resuming, AllVmsRunning) => S::Running,
        (S::Running, SuspendStarted) => S::Suspending,
        (S::Suspending, AllSaved) => S::Suspended,
        (S::Suspended, ResumeStarted) => S::Resuming,
        (S::Resuming, ResumeAborted) => S::Suspended,
        (
            S::Pending | S::Starting | S::Running | S::Suspending | S::Suspended | S::Resuming,
            DestroyRequested,
        ) => S::Destroying,
        // A suspended lease's clock is stopped: it expires only while it runs.
        (S::Pending | S::Starting | S::Running, LeaseExpired) => S::Expired,
        // A save that failed on preemption: the VMs are gone, as before.
        (
            S::Pending | S::Starting | S::Running | S::Suspending | S::Resuming | S::Destroying,
            Preempted,
        ) => S::Preempted,
        (
            S::Pending | S::Starting | S::Running | S::Suspending | S::Suspended | S::Resuming,
            Failed,
        ) => S::Failed,
        // A destroy that was under way ends as destroyed even if a node failed.
        (S::Destroying, AllSlotsEnded) => S::Destroyed,
        // Slots ending under a live workspace means it cannot go on. A
        // suspended one holds no slot by design; a suspending one gives its
        // slots back as its VMs are saved (the rules settle it first).
        (S::Pending | S::Starting | S::Running | S::Resuming, AllSlotsEnded) => S::Failed,
        _ => return None,
    };
    Some(to)
}

/// True while the workspace still wants its slots (VMs may start or run).
/// Not while it is suspending: its slots are being given back.
pub fn wants_slots(state: S) -> bool {
    matches!(state, S::Pending | S::Starting | S::Running | S::Resuming)
}

/// True while the workspace is (becoming) a set of checkpoints or coming
/// back from them.
pub fn in_suspension(state: S) -> bool {
    matches!(state, S::Suspending | S::Suspended | S::Resuming)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Input::*;

    #[test]
    fn happy_path_runs_then_destroys() {
        let s = next(S::Pending, AllSlotsReserved).unwrap();
        let s = next(s, AllVmsRunning).unwrap();
        assert_eq!(s, S::Running);
        let s = next(s, DestroyRequested).unwrap();
        assert_eq!(next(s, AllSlotsEnded), Some(S::Destroyed));
    }

    #[test]
    fn terminal_states_never_move() {
        for t in [S::Destroyed, S::Preempted, S::Expired, S::Failed] {
            for i in [
                AllSlotsReserved,
                AllVmsRunning,
                DestroyRequested,
                LeaseExpired,
                Preempted,
                Failed,
                AllSlotsEnded,
                SuspendStarted,
                AllSaved,
                ResumeStarted,
                ResumeAborted,
            ] {
                assert_eq!(next(t, i), None, "{t:?} {i:?}");
            }
        }
    }

    #[test]
    fn preemption_wins_over_a_destroy_in_progress() {
        assert_eq!(next(S::Destroying, Preempted), Some(S::Preempted));
        assert_eq!(next(S::Destroying, Failed), None);
    }

    #[test]
    fn a_workspace_is_suspended_resumed_and_runs_again() {
        let s = next(S::Running, SuspendStarted).unwrap();
        assert_eq!(s, S::Suspending);
        assert!(
            !wants_slots(s),
            "a suspending workspace gives its slots back"
        );
        let s = next(s, AllSaved).unwrap();
        assert_eq!(s, S::Suspended);
        assert_eq!(next(s, AllSlotsEnded), None, "it holds no slot by design");
        assert_eq!(next(s, LeaseExpired), None, "its lease clock is stopped");
        assert_eq!(next(s, Preempted), None, "nothing of it can be preempted");
        let s = next(s, ResumeStarted).unwrap();
        assert_eq!(s, S::Resuming);
        assert!(wants_slots(s));
        assert_eq!(next(s, ResumeAborted), Some(S::Suspended));
        assert_eq!(next(s, AllVmsRunning), Some(S::Running));
    }

    #[test]
    fn a_failed_save_on_preemption_ends_the_workspace_and_any_suspension_can_be_destroyed() {
        assert_eq!(next(S::Suspending, Preempted), Some(S::Preempted));
        for s in [S::Suspending, S::Suspended, S::Resuming] {
            assert_eq!(next(s, DestroyRequested), Some(S::Destroying), "{s:?}");
            assert_eq!(next(s, Failed), Some(S::Failed), "{s:?}");
            assert!(in_suspension(s));
        }
        assert_eq!(
            next(S::Starting, SuspendStarted),
            None,
            "only a running lease"
        );
        assert_eq!(next(S::Suspended, AllSaved), None);
    }

    #[test]
    fn slots_ending_under_a_live_workspace_is_a_failure() {
        assert_eq!(next(S::Running, AllSlotsEnded), Some(S::Failed));
    }
}
