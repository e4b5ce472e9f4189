//! How a pilot spends its time when it must end: the grace period after the
//! batch system's warning signal, and any cleanup deadline.
//!
//! Pure arithmetic on instants, from what the pilot measured on this node
//! (how long its balloon took to reserve, how long its VMs took to start):
//! memory restore gets what it needs first, VM destroys next, and the
//! coordinator only what is left. Not for doing any of it (run.rs).

use std::time::Duration;
use tokio::time::Instant;

/// Share of the grace period by which the pilot has exited after a signal.
pub const EXIT_SHARE_OF_GRACE: f64 = 0.85;
/// A restore (growing dom0) is planned at this many times the measured
/// reserve: balloons give memory back slower than they take it (the Flying
/// Low paper: 743.6 ms to reserve, 1317.2 ms to restore).
const RESTORE_PER_RESERVE: u32 = 2;
/// Fixed allowance per step for what is not measured: listing domains,
/// taking the node lock, writing the state file.
const STEP_SLACK: Duration = Duration::from_millis(100);

/// Times the pilot measured on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measured {
    /// The balloon's move when reserving.
    pub reserve: Duration,
    /// The longest hypervisor create of this slot's VMs (a destroy is
    /// planned at as long as a create).
    pub vm_start: Duration,
}

impl Measured {
    /// What restoring memory is planned to take.
    pub fn restore_need(&self) -> Duration {
        self.reserve * RESTORE_PER_RESERVE + STEP_SLACK
    }

    /// What destroying the VMs (in parallel) is planned to take.
    pub fn destroy_need(&self) -> Duration {
        self.vm_start + STEP_SLACK
    }
}

/// Deadlines of a cleanup that must end its hypervisor work by `hv_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cleanup {
    /// VM destroys end here, leaving restore its need.
    pub destroy_end: Instant,
    /// Restoring memory ends here.
    pub hv_end: Instant,
}

/// Splits `now..hv_end` between destroying VMs and restoring memory: restore
/// gets its planned need from what is left once destroys have theirs, or at
/// least half when time is short (a VM that is not destroyed keeps its
/// memory from dom0 anyway, so restore needs the destroys done).
pub fn cleanup(now: Instant, hv_end: Instant, m: Measured) -> Cleanup {
    let budget = hv_end.saturating_duration_since(now);
    let for_destroy = m.destroy_need().min(budget / 2);
    let for_restore = m.restore_need().min(budget - for_destroy);
    Cleanup {
        destroy_end: hv_end - for_restore,
        hv_end,
    }
}

/// The plan after a warning signal at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preemption {
    /// Until here the coordinator may act (its commands are followed).
    pub wait_end: Instant,
    /// The cleanup's hypervisor work ends here (see [`cleanup`]).
    pub hv_end: Instant,
    /// Reporting ends and the pilot exits here, before the grace period does.
    pub exit_by: Instant,
}

/// Plans a grace period of `grace` from `now`: the exit at
/// [`EXIT_SHARE_OF_GRACE`], `notify_share` before it for the last report,
/// the cleanup's planned need before that, and the coordinator's wait (at
/// most `wait_fraction` of the grace) in what is left, possibly nothing.
pub fn preemption(
    now: Instant,
    grace: Duration,
    wait_fraction: f64,
    notify_share: Duration,
    m: Measured,
) -> Preemption {
    let exit_by = now + grace.mul_f64(EXIT_SHARE_OF_GRACE);
    let hv_end = exit_by.checked_sub(notify_share).unwrap_or(now).max(now);
    let need = m.restore_need() + m.destroy_need();
    let latest_wait = hv_end.checked_sub(need).unwrap_or(now).max(now);
    let wait_end = (now + grace.mul_f64(wait_fraction)).min(latest_wait);
    Preemption {
        wait_end,
        hv_end,
        exit_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_slow_balloon_shortens_the_coordinators_wait_so_restore_still_fits() {
        // The case: 5 s grace, half of it for the coordinator, a
        // balloon that took 1 s to reserve. Waiting 2.5 s left 0.94 s.
        let now = Instant::now();
        let m = Measured {
            reserve: ms(1000),
            vm_start: ms(300),
        };
        let p = preemption(now, ms(5000), 0.5, ms(500), m);
        assert_eq!(p.exit_by - now, ms(4250));
        assert_eq!(p.hv_end - now, ms(3750));
        // restore 2.1 s + destroy 0.4 s before 3.75 s: wait until 1.25 s.
        assert_eq!(p.wait_end - now, ms(1250));
        let c = cleanup(p.wait_end, p.hv_end, m);
        assert_eq!(c.hv_end - c.destroy_end, ms(2100));
        assert_eq!(c.destroy_end - p.wait_end, ms(400));
    }

    #[test]
    fn a_fast_node_keeps_the_configured_wait() {
        let now = Instant::now();
        let m = Measured {
            reserve: ms(20),
            vm_start: ms(50),
        };
        let p = preemption(now, ms(10_000), 0.5, ms(1000), m);
        assert_eq!(p.wait_end - now, ms(5000));
        let c = cleanup(p.wait_end, p.hv_end, m);
        assert_eq!(c.hv_end - c.destroy_end, ms(140));
    }

    #[test]
    fn a_grace_too_short_for_the_plan_skips_the_wait_and_splits_what_is_left() {
        let now = Instant::now();
        let m = Measured {
            reserve: ms(3000),
            vm_start: ms(3000),
        };
        let p = preemption(now, ms(2000), 0.5, ms(200), m);
        assert_eq!(p.wait_end, now);
        assert_eq!(p.hv_end - now, ms(1500));
        let c = cleanup(now, p.hv_end, m);
        assert_eq!(c.destroy_end - now, ms(750), "half for each");
        // Nothing measured (a signal before reserving): no waiting cut.
        let p = preemption(now, ms(2000), 0.5, ms(200), Measured::default());
        assert_eq!(p.wait_end - now, ms(1000));
    }
}
