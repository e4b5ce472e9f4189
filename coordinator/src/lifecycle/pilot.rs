//! The life of a pilot (one node of one slot), as the coordinator sees it
//! from the pilot's events and its silence.
//!
//! A pilot row is created by its first event, in `Started`. Holding a node
//! means `Reserved` or `Preempting`; `Released`, `Failed` (its reservation
//! failed; it gave everything back and exited) and `Lost` (silent too long;
//! its node is named for kill-all) are the ends, and a lost pilot that
//! speaks again stays lost.

/// Where a pilot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PilotState {
    Started,
    Reserved,
    Preempting,
    Released,
    Failed,
    Lost,
}

/// What can happen to a pilot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    Reserved,
    ReserveFailed,
    /// The batch system's warning signal reached it.
    Preempting,
    Released,
    /// Silent past `pilot_silence_s`.
    Lost,
}

impl PilotState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Released | Self::Failed | Self::Lost)
    }

    /// True while the pilot holds its node's memory for the slot.
    pub fn holds(self) -> bool {
        matches!(self, Self::Reserved | Self::Preempting)
    }

    /// The name stored in the database (`pilots.state`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Reserved => "reserved",
            Self::Preempting => "preempting",
            Self::Released => "released",
            Self::Failed => "failed",
            Self::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "started" => Self::Started,
            "reserved" => Self::Reserved,
            "preempting" => Self::Preempting,
            "released" => Self::Released,
            "failed" => Self::Failed,
            "lost" => Self::Lost,
            _ => return None,
        })
    }
}

/// The pilot's next state, or `None` when the input does not change it.
pub fn next(state: PilotState, input: Input) -> Option<PilotState> {
    use PilotState as S;
    let to = match (state, input) {
        (S::Started, Input::Reserved) => S::Reserved,
        (S::Started, Input::ReserveFailed) => S::Failed,
        (S::Reserved, Input::Preempting) => S::Preempting,
        (S::Started | S::Reserved | S::Preempting, Input::Released) => S::Released,
        (S::Started | S::Reserved | S::Preempting, Input::Lost) => S::Lost,
        _ => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PilotState as S;

    const ALL: [PilotState; 6] = [
        S::Started,
        S::Reserved,
        S::Preempting,
        S::Released,
        S::Failed,
        S::Lost,
    ];
    const INPUTS: [Input; 5] = [
        Input::Reserved,
        Input::ReserveFailed,
        Input::Preempting,
        Input::Released,
        Input::Lost,
    ];

    #[test]
    fn a_pilot_reserves_is_preempted_and_releases() {
        let s = next(S::Started, Input::Reserved).unwrap();
        assert!(s.holds());
        let s = next(s, Input::Preempting).unwrap();
        assert!(
            s.holds(),
            "a preempted pilot holds its node until it releases"
        );
        assert_eq!(next(s, Input::Released), Some(S::Released));
        assert_eq!(next(S::Started, Input::ReserveFailed), Some(S::Failed));
    }

    #[test]
    fn terminal_pilots_never_move_and_a_lost_one_that_speaks_stays_lost() {
        for t in ALL.iter().copied().filter(|s| s.is_terminal()) {
            for i in INPUTS {
                assert_eq!(next(t, i), None, "{t:?} {i:?}");
            }
        }
        assert_eq!(next(S::Lost, Input::Released), None);
    }

    #[test]
    fn impossible_inputs_are_refused() {
        assert_eq!(next(S::Reserved, Input::Reserved), None);
        assert_eq!(next(S::Reserved, Input::ReserveFailed), None);
        assert_eq!(next(S::Started, Input::Preempting), None);
    }

    #[test]
    fn every_state_round_trips_through_its_stored_name() {
        for s in ALL {
            assert_eq!(PilotState::parse(s.as_str()), Some(s));
        }
        assert_eq!(PilotState::parse("x"), None);
    }
}
