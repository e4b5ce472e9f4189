//! Human-readable timelines and phase summaries (demo, `workspace watch`).

use protocol::view::{Phase, TimelineEntry};

/// Milliseconds with three significant digits: `0.412 ms`, `12.3 ms`, `1530 ms`.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.0} ms", ms)
    }
}

/// One line per entry, times relative to `t0_ms`.
pub fn format_entry(e: &TimelineEntry, t0_ms: u64) -> String {
    let rel = e.ts_ms as f64 - t0_ms as f64;
    let where_ = e.node.clone().unwrap_or_default();
    format!(
        "{:>10}  {:<17} {:<8} {}",
        format!("+{}", fmt_ms(rel.max(0.0))),
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
