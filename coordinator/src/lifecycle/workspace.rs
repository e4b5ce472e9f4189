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
}

/// The next state, or `None` when the input does not change the state.
pub fn next(state: S, input: Input) -> Option<S> {
    use Input::*;
    let to = match (state, input) {
        (S::Pending, AllSlotsReserved) => S::Starting,
        (S::Starting, AllVmsRunning) => S::Running,
        (S::Pending | S::Starting | S::Running, DestroyRequested) => S::Destroying,
        (S::Pending | S::Starting | S::Running, LeaseExpired) => S::Expired,
        (S::Pending | S::Starting | S::Running | S::Destroying, Preempted) => S::Preempted,
        (S::Pending | S::Starting | S::Running, Failed) => S::Failed,
        // A destroy that was under way ends as destroyed even if a node failed.
        (S::Destroying, AllSlotsEnded) => S::Destroyed,
        // Slots ending under a live workspace means it cannot go on.
        (S::Pending | S::Starting | S::Running, AllSlotsEnded) => S::Failed,
        _ => return None,
    };
    Some(to)
}

/// True while the workspace still wants its slots (VMs may start or run).
pub fn wants_slots(state: S) -> bool {
    matches!(state, S::Pending | S::Starting | S::Running)
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
    fn slots_ending_under_a_live_workspace_is_a_failure() {
        assert_eq!(next(S::Running, AllSlotsEnded), Some(S::Failed));
    }
}
