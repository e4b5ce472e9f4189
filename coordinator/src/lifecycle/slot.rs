//! The life of a slot (one pilot job, one pilot per node) and of its batch job.
//!
//! Two tables, because they move independently: the slot's [`SlotState`]
//! follows its pilots (reserving, reserved, releasing ...), its [`Job`]
//! follows the batch system (submitted, cancel owed, cancelled, ended). A
//! slot is settled when its state is terminal and no cancel is owed.
//! Each job variant carries the batch job id it is about, so a job "owed a
//! cancel" without an id cannot be built.

use protocol::view::SlotState;

/// What can happen to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A pilot of the slot reported that it started.
    PilotStarted,
    /// The pilot of every node reserved its memory.
    AllReserved,
    /// The workspace let the slot go while a pilot holds (or may yet hold) a node.
    ReleaseAsked,
    /// The slot's job was never submitted (or its submit failed): nothing anywhere.
    NotSubmitted,
    /// Every pilot is gone; `lost` when one went silent (its node wants kill-all).
    PilotsGone { lost: bool },
    /// The batch system ended the job; `stuck` when pilots had not reported release.
    JobEnded { stuck: bool },
    /// The job was cancelled before any pilot held anything.
    CancelledBeforePilots,
}

/// The slot's next state, or `None` when the input does not change it.
pub fn next(state: SlotState, input: Input) -> Option<SlotState> {
    use Input::*;
    use SlotState as S;
    if state.is_terminal() {
        return None;
    }
    let to = match (state, input) {
        (S::Submitted, PilotStarted) => S::Reserving,
        (S::Submitted | S::Reserving, AllReserved) => S::Reserved,
        (S::Submitted | S::Reserving | S::Reserved, ReleaseAsked) => S::Releasing,
        (_, NotSubmitted) => S::Failed,
        (_, PilotsGone { lost: false }) => S::Released,
        (_, PilotsGone { lost: true }) => S::Failed,
        (_, JobEnded { stuck: false }) => S::Released,
        (_, JobEnded { stuck: true }) => S::Failed,
        (_, CancelledBeforePilots) => S::Released,
        _ => return None,
    };
    Some(to)
}

/// The slot's batch job, as far as the coordinator knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// Stored, submit not (yet) answered. The job may exist: never touched
    /// as an orphan, never submitted twice.
    Unsubmitted,
    /// The batch system has it; nothing is owed.
    Live(String),
    /// It must be cancelled; retried until the batch system takes the cancel.
    CancelOwed(String),
    /// The batch system took the cancel; the job ends by itself.
    Cancelled(String),
    /// The batch system says it is over, or no longer lists it.
    Ended(String),
    /// Never submitted and never will be: a job named for this slot is an orphan.
    Never,
}

/// What can happen to a slot's batch job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobInput {
    /// The batch system accepted the job under this id.
    Submitted(String),
    /// The submit failed, or its answer is lost (the coordinator died in it).
    Abandoned,
    /// The job must go (its slot ended, or nodes no pilot holds yet).
    CancelNeeded,
    /// The batch system took the cancel.
    CancelAccepted,
    /// The batch system says the job is over.
    Ended,
}

impl Job {
    /// The batch job id, once there is one.
    pub fn id(&self) -> Option<&str> {
        match self {
            Job::Live(id) | Job::CancelOwed(id) | Job::Cancelled(id) | Job::Ended(id) => Some(id),
            Job::Unsubmitted | Job::Never => None,
        }
    }

    /// True when the batch system may still run it (its status is worth asking).
    pub fn may_run(&self) -> bool {
        matches!(self, Job::Live(_) | Job::CancelOwed(_) | Job::Cancelled(_))
    }

    /// True when a cancel is owed to the batch system.
    pub fn owes_cancel(&self) -> bool {
        matches!(self, Job::CancelOwed(_))
    }

    /// The name stored in the database (`slots.job_state`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Job::Unsubmitted => "unsubmitted",
            Job::Live(_) => "live",
            Job::CancelOwed(_) => "cancel_owed",
            Job::Cancelled(_) => "cancelled",
            Job::Ended(_) => "ended",
            Job::Never => "never",
        }
    }

    /// Rebuilds a job from its stored name and id; `None` when they do not
    /// make a job (an unknown name, or an id where there can be none, or none
    /// where there must be one).
    pub fn from_parts(state: &str, id: Option<String>) -> Option<Job> {
        Some(match (state, id) {
            ("unsubmitted", None) => Job::Unsubmitted,
            ("never", None) => Job::Never,
            ("live", Some(id)) => Job::Live(id),
            ("cancel_owed", Some(id)) => Job::CancelOwed(id),
            ("cancelled", Some(id)) => Job::Cancelled(id),
            ("ended", Some(id)) => Job::Ended(id),
            _ => return None,
        })
    }
}

/// The job's next state, or `None` when the input does not change it.
pub fn next_job(job: &Job, input: &JobInput) -> Option<Job> {
    use JobInput::*;
    let to = match (job, input) {
        (Job::Unsubmitted, Submitted(id)) => Job::Live(id.clone()),
        (Job::Unsubmitted, Abandoned) => Job::Never,
        // A submit answered after its slot was given up: the job exists, and
        // nothing wants it.
        (Job::Never, Submitted(id)) => Job::CancelOwed(id.clone()),
        (Job::Live(id), CancelNeeded) => Job::CancelOwed(id.clone()),
        (Job::CancelOwed(id), CancelAccepted) => Job::Cancelled(id.clone()),
        (Job::Live(id) | Job::CancelOwed(id) | Job::Cancelled(id), Ended) => Job::Ended(id.clone()),
        _ => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Input::*;
    use SlotState as S;

    const INPUTS: [Input; 9] = [
        PilotStarted,
        AllReserved,
        ReleaseAsked,
        NotSubmitted,
        PilotsGone { lost: false },
        PilotsGone { lost: true },
        JobEnded { stuck: false },
        JobEnded { stuck: true },
        CancelledBeforePilots,
    ];

    #[test]
    fn a_slot_reserves_then_releases() {
        let s = next(S::Submitted, PilotStarted).unwrap();
        assert_eq!(s, S::Reserving);
        let s = next(s, AllReserved).unwrap();
        assert_eq!(s, S::Reserved);
        let s = next(s, ReleaseAsked).unwrap();
        assert_eq!(s, S::Releasing);
        assert_eq!(next(s, PilotsGone { lost: false }), Some(S::Released));
        // A lost pilot or a job that ended under its pilots leaves a node to clean.
        assert_eq!(
            next(S::Releasing, PilotsGone { lost: true }),
            Some(S::Failed)
        );
        assert_eq!(next(S::Reserved, JobEnded { stuck: true }), Some(S::Failed));
    }

    #[test]
    fn late_inputs_do_not_move_a_slot_backwards() {
        assert_eq!(next(S::Reserved, PilotStarted), None);
        assert_eq!(next(S::Releasing, AllReserved), None);
        assert_eq!(next(S::Releasing, ReleaseAsked), None);
    }

    #[test]
    fn terminal_slots_never_move() {
        for t in [S::Released, S::Failed] {
            for i in INPUTS {
                assert_eq!(next(t, i), None, "{t:?} {i:?}");
            }
        }
    }

    #[test]
    fn a_job_owed_a_cancel_keeps_it_owed_until_the_batch_system_takes_it() {
        let id = || "42".to_string();
        let j = next_job(&Job::Unsubmitted, &JobInput::Submitted(id())).unwrap();
        assert_eq!(j, Job::Live(id()));
        let j = next_job(&j, &JobInput::CancelNeeded).unwrap();
        assert!(j.owes_cancel());
        assert_eq!(next_job(&j, &JobInput::CancelNeeded), None, "owed once");
        let j = next_job(&j, &JobInput::CancelAccepted).unwrap();
        assert_eq!(j, Job::Cancelled(id()));
        assert!(j.may_run() && !j.owes_cancel());
        // Cancelled already: a second reason to cancel changes nothing.
        assert_eq!(next_job(&j, &JobInput::CancelNeeded), None);
        let j = next_job(&j, &JobInput::Ended).unwrap();
        assert_eq!(j, Job::Ended(id()));
    }

    #[test]
    fn a_submit_answered_after_its_slot_was_given_up_is_owed_a_cancel() {
        let j = next_job(&Job::Unsubmitted, &JobInput::Abandoned).unwrap();
        assert_eq!(j, Job::Never);
        assert_eq!(
            next_job(&j, &JobInput::Submitted("7".into())),
            Some(Job::CancelOwed("7".into()))
        );
    }

    #[test]
    fn an_ended_job_never_moves_and_every_job_round_trips_through_its_stored_form() {
        let inputs = [
            JobInput::Submitted("9".into()),
            JobInput::Abandoned,
            JobInput::CancelNeeded,
            JobInput::CancelAccepted,
            JobInput::Ended,
        ];
        for i in &inputs {
            assert_eq!(next_job(&Job::Ended("1".into()), i), None, "{i:?}");
        }
        for j in [
            Job::Unsubmitted,
            Job::Live("1".into()),
            Job::CancelOwed("1".into()),
            Job::Cancelled("1".into()),
            Job::Ended("1".into()),
            Job::Never,
        ] {
            let back = Job::from_parts(j.as_str(), j.id().map(str::to_string));
            assert_eq!(back, Some(j));
        }
        assert_eq!(Job::from_parts("live", None), None);
        assert_eq!(Job::from_parts("never", Some("1".into())), None);
    }
}
