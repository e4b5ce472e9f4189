//! Advance reservations in the batch system: the capability a guaranteed
//! lease (a reservation at a start time, or an immediate lease) rests on.
//!
//! An adapter that has them returns itself from [`crate::Lrm::reservations`].
//! Four calls: create (start, duration, nodes) or be refused with the reason
//! and the earliest start the batch system could give; query; delete (a
//! deleted or vanished reservation is not an error); submit a pilot job into
//! one. This module knows nothing of leases; the coordinator's
//! `engine::reserve` decides what to reserve and when.

use crate::{JobId, LrmError, SlotJob};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What to reserve: `nodes` whole nodes of at least this size from
/// `start_ms` (ms since the epoch, UTC) for `duration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservationRequest {
    /// `wsp-<workspace id>`: how the coordinator's reservations are recognised.
    pub name: String,
    pub start_ms: u64,
    pub duration: Duration,
    pub nodes: u32,
    pub cores_per_node: u32,
    pub memory_mb_per_node: u64,
    /// Jobs the caller will end before the start (it suspends their
    /// leases): the reservation may take their nodes. Adapters that cannot
    /// tell the batch system so ignore it, and refuse as if they held on.
    pub preemptible: Vec<JobId>,
}

/// A reservation as the batch system holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The batch system's name or id for it (Slurm's name, Grid Engine's AR id, ...).
    pub id: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Node names, when the batch system has chosen them.
    pub nodes: Vec<String>,
}

/// Why a reservation was not made.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The batch system cannot guarantee these nodes at this time.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        /// The earliest start (ms) at which the same request would be
        /// granted, when the adapter could find one.
        earliest_ms: Option<u64>,
    },
    #[error(transparent)]
    Lrm(#[from] LrmError),
}

/// A batch system's advance reservations.
#[async_trait]
pub trait Reservations: Send + Sync {
    /// Whether [`ReservationRequest::preemptible`] is honoured (the
    /// reservation may be granted over those jobs).
    fn grants_over_preemptible(&self) -> bool {
        false
    }
    /// When [`Reservations::grants_over_preemptible`] is false: why not, for
    /// a refusal that suspendable best-effort leases could have avoided.
    fn why_not_over_preemptible(&self) -> String {
        "this batch system cannot be told that running jobs will end before a reservation, so it reserves only nodes no job holds then".into()
    }
    /// Makes the reservation, or says why not and the earliest start it could offer.
    async fn create(&self, req: &ReservationRequest) -> Result<Reservation, ReserveError>;
    /// The reservation as the batch system has it now; `None` once it is gone.
    async fn query(&self, id: &str) -> Result<Option<Reservation>, LrmError>;
    /// Deletes it; its queued jobs are the caller's to cancel. Deleting a
    /// reservation that is already gone is not an error.
    async fn delete(&self, id: &str) -> Result<(), LrmError>;
    /// Submits a pilot job that runs only inside reservation `id`, from its start.
    async fn submit_into(&self, job: &SlotJob, id: &str) -> Result<JobId, LrmError>;
}

/// The earliest start at or after `after_ms` at which `granted(t)` holds,
/// for a batch system that cannot tell it: `granted` tries a reservation at
/// `t` (and deletes it at once). Tries 1, 2, 4, ... 2048 minutes later,
/// then narrows the last gap down to 15 s: at most 22 tries. `None` when
/// nothing within about 34 hours is granted.
pub(crate) async fn earliest_by_probing<F, Fut>(
    after_ms: u64,
    mut granted: F,
) -> Result<Option<u64>, LrmError>
where
    F: FnMut(u64) -> Fut + Send,
    Fut: std::future::Future<Output = Result<bool, LrmError>> + Send,
{
    let mut lo = after_ms;
    let mut hi = None;
    for minutes in (0..12).map(|k| 1u64 << k) {
        let t = after_ms + minutes * 60_000;
        if granted(t).await? {
            hi = Some(t);
            break;
        }
        lo = t;
    }
    let Some(mut hi) = hi else { return Ok(None) };
    while hi - lo > 15_000 {
        let mid = lo + (hi - lo) / 2;
        if granted(mid).await? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Some(hi))
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC for `ms` (whole seconds, rounded up so a
/// reservation never begins before it was asked to). Batch-system clients
/// read such times in their `TZ`, so the adapters run them with `TZ=UTC`.
pub fn utc_stamp(ms: u64) -> String {
    let secs = ms.div_ceil(1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads `YYYY-MM-DDTHH:MM:SS` (UTC) back into ms.
pub fn parse_utc_stamp(text: &str) -> Option<u64> {
    let (date, time) = text.trim().split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next().unwrap_or(Some(0))?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(y, m, day);
    u64::try_from(days * 86_400 + h * 3600 + min * 60 + s)
        .ok()
        .map(|s| s * 1000)
}

/// `[[CC]YY]MMDDhhmm[.SS]` (the POSIX `touch -t` form that `qrsub -a` and
/// `pbs_rsub -R` read) in UTC for `ms`, rounded up to the second.
pub fn touch_stamp(ms: u64) -> String {
    let s = utc_stamp(ms); // YYYY-MM-DDTHH:MM:SS
    format!(
        "{}{}{}{}{}.{}",
        &s[0..4],
        &s[5..7],
        &s[8..10],
        &s[11..13],
        &s[14..16],
        &s[17..19]
    )
}

/// Reads a C `ctime()` time (`Sun Nov 29 12:52:27 2026`, as PBS prints
/// them; UTC when its commands run with `TZ=UTC`) into ms.
pub fn parse_ctime(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let w: Vec<&str> = text.split_whitespace().collect();
    let [_, month, day, time, year] = w.as_slice() else {
        return None;
    };
    let m = MONTHS.iter().position(|n| n == month)? + 1;
    let day: u32 = day.parse().ok()?;
    parse_utc_stamp(&format!("{year}-{m:02}-{day:02}T{time}"))
}

// Howard Hinnant's civil-calendar conversions (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_round_trip_and_round_up_to_the_second() {
        // 2026-12-01T10:00:00Z
        let t = 1_796_119_200_000;
        assert_eq!(utc_stamp(t), "2026-12-01T10:00:00");
        assert_eq!(utc_stamp(t + 1), "2026-12-01T10:00:01");
        assert_eq!(parse_utc_stamp("2026-12-01T10:00:00"), Some(t));
        assert_eq!(utc_stamp(951_782_400_000), "2000-02-29T00:00:00");
        for ms in [0, 86_399_000, 4_102_444_800_000, 1_795_946_075_000] {
            assert_eq!(parse_utc_stamp(&utc_stamp(ms)), Some(ms));
        }
        assert_eq!(parse_utc_stamp("Unknown"), None);
        assert_eq!(parse_utc_stamp("2026-13-01T10:00:00"), None);
        assert_eq!(touch_stamp(t + 1), "202612011000.01");
        assert_eq!(parse_ctime("Tue Dec  1 10:00:00 2026"), Some(t));
        assert_eq!(
            parse_ctime("Sun Nov 29 12:52:27 2026"),
            parse_utc_stamp("2026-11-29T12:52:27")
        );
        assert_eq!(parse_ctime("Sun Foo 29 12:52:27 2026"), None);
        assert_eq!(parse_ctime("Unknown"), None);
    }

    #[tokio::test]
    async fn probing_finds_the_earliest_start_within_15_s_in_few_tries() {
        let free_from = 1_000_000 + 37 * 60_000 + 7_000;
        let mut tries = 0;
        let found = earliest_by_probing(1_000_000, |t| {
            tries += 1;
            async move { Ok(t >= free_from) }
        })
        .await
        .unwrap()
        .unwrap();
        assert!((free_from..free_from + 15_000).contains(&found), "{found}");
        assert!(tries <= 22, "{tries} tries");
        let never = earliest_by_probing(0, |_| async { Ok(false) })
            .await
            .unwrap();
        assert_eq!(never, None);
    }
}
