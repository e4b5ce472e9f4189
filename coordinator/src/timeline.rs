//! Human-readable timelines and phase summaries (demo, `workspace watch`),
//! and how durations are written for people.

use protocol::view::{Phase, TimelineEntry};

/// A measured duration in milliseconds, three significant digits: `0.412 ms`,
/// `12.3 ms`, `153 ms`, `1.53 s`, `90.3 s`, `1 min 30 s`, `1 h 30 min`.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else if ms < 999.5 {
        format!("{ms:.0} ms")
    } else {
        fmt_long(ms)
    }
}

/// A duration between two whole-millisecond stamps: `8 ms`, `412 ms`,
/// `1.53 s`, `1 h 30 min`. No decimals below a second: the stamps have none.
pub fn fmt_stamp_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        fmt_long(ms as f64)
    }
}

/// A second or more.
fn fmt_long(ms: f64) -> String {
    let s = ms / 1000.0;
    if s < 9.995 {
        format!("{s:.2} s")
    } else if s < 59.95 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let whole = s.round() as u64;
        match (whole / 60, whole % 60) {
            (m, 0) => format!("{m} min"),
            (m, sec) => format!("{m} min {sec} s"),
        }
    } else {
        let whole_min = (s / 60.0).round() as u64;
        match (whole_min / 60, whole_min % 60) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        }
    }
}

/// Sorts entries by when they happened (the recording order, `seq`, breaks
/// ties). Pilots' events are stored as they arrive, so a node that reported
/// late is stored after a later step on another node.
pub fn in_time_order(entries: &mut [TimelineEntry]) {
    entries.sort_by_key(|e| (e.ts_ms, e.seq));
}

/// One line per entry, times relative to `t0_ms`.
pub fn format_entry(e: &TimelineEntry, t0_ms: u64) -> String {
    let rel = e.ts_ms.saturating_sub(t0_ms);
    let where_ = e.node.clone().unwrap_or_default();
    format!(
        "{:>12}  {:<17} {:<8} {}",
        format!("+{}", fmt_stamp_ms(rel)),
        e.phase.as_str(),
        where_,
        e.detail
    )
}

fn first(es: &[TimelineEntry], p: Phase) -> Option<&TimelineEntry> {
    es.iter().find(|e| e.phase == p)
}

fn last_ts(es: &[TimelineEntry], p: Phase) -> Option<u64> {
    es.iter().filter(|e| e.phase == p).map(|e| e.ts_ms).max()
}

fn first_ts(es: &[TimelineEntry], p: Phase) -> Option<u64> {
    es.iter().filter(|e| e.phase == p).map(|e| e.ts_ms).min()
}

/// Durations of the published breakdown's phases, as (label, ms) rows.
pub fn phase_summary(es: &[TimelineEntry]) -> Vec<(String, Option<f64>)> {
    let d = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b >= a => Some((b - a) as f64),
        _ => None,
    };
    let req = first(es, Phase::Requested).map(|e| e.ts_ms);
    let submitted = first_ts(es, Phase::SlotSubmitted);
    let first_pilot = first_ts(es, Phase::PilotStarted);
    let reserved = last_ts(es, Phase::MemoryReserved);
    let notify = es
        .iter()
        .filter(|e| e.phase == Phase::MemoryReserved)
        .map(|e| e.recorded_ms.saturating_sub(e.ts_ms) as f64)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let running = first(es, Phase::Running).map(|e| e.ts_ms);
    let end_start = es
        .iter()
        .find(|e| {
            matches!(
                e.phase,
                Phase::DestroyRequested | Phase::Preempting | Phase::LeaseExpired
            )
        })
        .map(|e| e.ts_ms);
    let restored = last_ts(es, Phase::MemoryRestored);
    let ended = first(es, Phase::Ended).map(|e| e.ts_ms);
    vec![
        (
            "slot provisioning (request -> all memory reserved)".into(),
            d(req, reserved),
        ),
        (
            "  submit to the batch system (first job)".into(),
            d(req, submitted),
        ),
        (
            // A fast batch system starts pilots before its submit command
            // has even returned, so this is measured from the request.
            "  batch system start (request -> first pilot up)".into(),
            d(req, first_pilot),
        ),
        (
            "  pilots (first up -> all reserved)".into(),
            d(first_pilot, reserved),
        ),
        (
            "  notification (reserved -> stored, worst node)".into(),
            notify,
        ),
        (
            "VM provisioning (all reserved -> all VMs running)".into(),
            d(reserved, running),
        ),
        (
            "request -> running, as the client sees it".into(),
            d(req, running),
        ),
        (
            "teardown (destroy/preempt -> all memory restored)".into(),
            d(end_start, restored),
        ),
        (
            "  until settled (every job gone)".into(),
            d(end_start, ended),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_the_precision_their_source_has() {
        assert_eq!(fmt_stamp_ms(8), "8 ms");
        assert_eq!(fmt_stamp_ms(412), "412 ms");
        assert_eq!(fmt_stamp_ms(1234), "1.23 s");
        assert_eq!(fmt_stamp_ms(12_345), "12.3 s");
        assert_eq!(fmt_stamp_ms(90_259), "1 min 30 s");
        assert_eq!(fmt_stamp_ms(120_000), "2 min");
        assert_eq!(fmt_stamp_ms(5_400_000), "1 h 30 min");
        assert_eq!(fmt_stamp_ms(7_200_000), "2 h");
        assert_eq!(fmt_ms(0.4123), "0.412 ms");
        assert_eq!(fmt_ms(8.0), "8.00 ms");
        assert_eq!(fmt_ms(153.2), "153 ms");
        assert_eq!(fmt_ms(1530.0), "1.53 s");
        assert_eq!(fmt_ms(59_990.0), "1 min");
    }

    fn entry(seq: u64, ts_ms: u64, phase: Phase) -> TimelineEntry {
        TimelineEntry {
            seq,
            ts_ms,
            recorded_ms: ts_ms,
            phase,
            slot_id: None,
            node: None,
            vm_id: None,
            detail: String::new(),
        }
    }

    #[test]
    fn entries_are_put_in_time_order_and_printed_relative_to_the_first() {
        // node2 reported its reservation (ts 30) after node1's VM started (ts 40).
        let mut es = vec![
            entry(1, 10, Phase::Requested),
            entry(2, 40, Phase::VmStarted),
            entry(3, 30, Phase::MemoryReserved),
            entry(4, 30, Phase::PilotStarted),
        ];
        in_time_order(&mut es);
        let seqs: Vec<u64> = es.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3, 4, 2]);
        assert!(format_entry(&es[3], 10).trim_start().starts_with("+30 ms "));
    }
}
