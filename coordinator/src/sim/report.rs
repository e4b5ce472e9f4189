//! The figures of a run, from the engine's own records (when each lease
//! was asked for, ran and ended) and the models' (when VMs ran, when jobs
//! held nodes): utilization, waits, bounded slowdown, what ended how, our
//! overhead per lease, the simulator's own speed; as text, JSON and an SVG
//! plot of utilization over time.
//!
//! A run that was cut short, or left a lease unsettled, is marked
//! incomplete, and its text says so before any figure.

use super::batch::Idle;
use super::config::SimConfig;
use super::run::Outcome;
use super::trace::Trace;
use super::{ClusterSize, Request};
use crate::engine::EngineError;
use protocol::view::WorkspaceState;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Bounded slowdown's threshold: runs shorter than this count as this long.
pub const SLOWDOWN_TAU_S: f64 = 10.0;
/// Points of the utilization series.
const BINS: usize = 400;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Stat {
        if v.is_empty() {
            return Stat::default();
        }
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Stat {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: pct(50.0),
            p95: pct(95.0),
            max: v[v.len() - 1],
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub requested: usize,
    pub rejected: usize,
    /// Why, with how many (the most frequent first).
    pub rejected_why: Vec<(String, usize)>,
    /// Reached `running`.
    pub ran: usize,
    pub expired: usize,
    pub destroyed: usize,
    pub preempted: usize,
    pub failed: usize,
    /// Not settled when the run stopped.
    pub unsettled: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Speed {
    pub wall_s: f64,
    pub virtual_events: u64,
    pub events_per_s: f64,
    pub pilot_events: u64,
    pub pilot_events_per_s: f64,
    pub wall_ms_per_lease: f64,
}

/// One request's fate (times in seconds from the start of the trace).
#[derive(Clone, Debug, Serialize)]
pub struct Lease {
    pub job: u64,
    pub injected: bool,
    pub urgency: u8,
    pub nodes: u32,
    pub submit_s: f64,
    pub run_s: f64,
    pub start_s: Option<f64>,
    pub wait_s: Option<f64>,
    pub state: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TraceInfo {
    pub jobs_read: usize,
    pub jobs_skipped: usize,
    pub replayed: usize,
    pub injected: usize,
    pub reservations: usize,
    pub time_scale: f64,
}

/// A lower bound on the span (ms from `first`, the trace's first request)
/// of any schedule of `requests` (those accepted) on `nodes` nodes: no lease runs before it is asked (an AR
/// before its start), so each one ends no sooner than that plus its
/// duration, and the VM node-time asked for at or after any moment `t`
/// cannot all be done before `t` plus that work spread over every node
/// (overheads, images and fragmentation left out: they only add).
pub fn span_floor(requests: &[Request], first: u64, nodes: f64) -> f64 {
    let mut released: Vec<(u64, f64)> = requests
        .iter()
        .map(|r| {
            let at = r.start_ms.unwrap_or(r.submit_ms).max(first) - first;
            (at, f64::from(r.nodes) * r.lease_ms as f64)
        })
        .collect();
    released.sort_by_key(|r| r.0);
    let mut floor = requests
        .iter()
        .map(|r| (r.start_ms.unwrap_or(r.submit_ms) + r.lease_ms).saturating_sub(first) as f64)
        .fold(0.0, f64::max);
    let mut after: f64 = released.iter().map(|r| r.1).sum();
    for (at, work) in released {
        floor = floor.max(at as f64 + after / nodes.max(1.0));
        after -= work;
    }
    floor
}

/// Free node-time over the span, as shares of the cluster's: where the
/// utilization a policy could still win is lost (issue 18).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct IdleShares {
    /// On the nodes of a batch-system reservation that has begun, not used
    /// by its jobs (the lead before its VMs, its end after the lease).
    pub reserved: f64,
    /// While a best-effort job waited: it did not fit, or would have run
    /// into a reservation (the fence before an AR).
    pub waiting: f64,
    /// With nothing waiting.
    pub nothing: f64,
}

impl IdleShares {
    /// Integrates the free-node record over `[start, end)`.
    fn of(record: &[(u64, Idle)], start: u64, end: u64, nodes: f64) -> Self {
        let mut ms = [0.0_f64; 3];
        for (k, (t, i)) in record.iter().enumerate() {
            let next = record.get(k + 1).map_or(end, |n| n.0);
            let (a, b) = ((*t).max(start), next.min(end));
            if b <= a {
                continue;
            }
            let d = (b - a) as f64;
            ms[0] += d * f64::from(i.reserved);
            ms[1] += d * f64::from(i.waiting);
            ms[2] += d * f64::from(i.nothing);
        }
        let whole = nodes * end.saturating_sub(start).max(1) as f64;
        Self {
            reserved: ms[0] / whole,
            waiting: ms[1] / whole,
            nothing: ms[2] / whole,
        }
    }
}

/// Utilization over time, in bins of `bin_s` from the first request.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    pub bin_s: f64,
    pub vms_running: Vec<f64>,
    pub nodes_held: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// False when cut short or when a lease never settled: the figures then
    /// cover only what happened, not the trace.
    pub complete: bool,
    pub incomplete_because: Option<String>,
    pub trace: TraceInfo,
    pub cluster: ClusterSize,
    pub model: SimConfig,
    pub leases: Counts,
    /// Node-seconds of running VMs over node-seconds of the cluster, from
    /// the first request to the end of the last job.
    pub utilization: f64,
    /// The same for nodes held by pilot jobs (VMs running or not).
    pub held_utilization: f64,
    /// The rest of the cluster's node-time, free, by why (the same scale).
    pub idle: IdleShares,
    pub span_s: f64,
    /// The shortest span any scheduler could reach with these requests
    /// (s), see [`span_floor`]. `utilization x span_s / span_floor_s` is
    /// then a ceiling no policy passes on this trace.
    pub span_floor_s: f64,
    /// From the first request to the end of the last best-effort (batch)
    /// lease's last job, when any ran (s): seed 002's "time to complete
    /// all batch requests".
    pub batch_done_s: Option<f64>,
    /// Reservations refused (they are in `leases.rejected` too).
    pub reservations_refused: usize,
    /// VMs saved (suspended) and restored (resumed from a checkpoint).
    pub vm_saves: u64,
    pub vm_restores: u64,
    /// From request to every VM running, over the leases that ran (s).
    pub wait_s: Stat,
    pub bounded_slowdown: Stat,
    /// The injected requests (urgent ones, issue 17, or not): from request
    /// to every VM running (s); `None` when none were injected.
    pub injected_wait_s: Option<Stat>,
    /// The trace's leases' bounded slowdown, when requests were injected.
    pub trace_slowdown: Option<Stat>,
    /// Node-hours pool slots (`[pool]`) held their nodes with no lease on
    /// them, until the last lease ended: the pool's idle cost.
    pub pool_idle_node_hours: f64,
    /// Per lease, per node: time its pilot job held the node without its VMs running (s).
    pub overhead_s_per_lease: f64,
    /// Of which before the VMs ran: job start to lease running (s).
    pub startup_s_per_lease: f64,
    pub speed: Speed,
    pub series: Series,
    pub requests: Vec<Lease>,
}

impl Report {
    pub fn new(
        cfg: &SimConfig,
        size: &ClusterSize,
        trace: &Trace,
        requests: &[Request],
        out: Outcome,
        t0: u64,
    ) -> Result<Report, EngineError> {
        let times: HashMap<_, _> = out
            .engine
            .lease_times()?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        let mut counts = Counts {
            requested: requests.len(),
            ..Counts::default()
        };
        let mut why: HashMap<String, usize> = HashMap::new();
        let mut waits = Vec::new();
        let mut slowdowns = Vec::new();
        let (mut urgent_waits, mut other_slowdowns) = (Vec::new(), Vec::new());
        let any_urgent = requests.iter().any(|r| r.injected);
        let mut leases = Vec::with_capacity(requests.len());
        for (r, ws) in requests.iter().zip(&out.workspaces) {
            let s = |ms: u64| ms as f64 / 1000.0;
            let mut lease = Lease {
                job: r.id,
                injected: r.injected,
                urgency: r.urgency,
                nodes: r.nodes,
                submit_s: s(r.submit_ms),
                run_s: s(r.run_ms),
                start_s: None,
                wait_s: None,
                state: "not requested".into(),
            };
            match ws {
                Err(e) if e == "not reached" => {}
                Err(e) => {
                    counts.rejected += 1;
                    *why.entry(first_words(e)).or_default() += 1;
                    lease.state = "rejected".into();
                }
                Ok(id) => {
                    let Some(t) = times.get(id) else { continue };
                    lease.state = t.state.to_string();
                    if !t.settled {
                        counts.unsettled += 1;
                    }
                    match t.state {
                        WorkspaceState::Expired => counts.expired += 1,
                        WorkspaceState::Destroyed => counts.destroyed += 1,
                        WorkspaceState::Preempted => counts.preempted += 1,
                        WorkspaceState::Failed => counts.failed += 1,
                        _ => {}
                    }
                    if let Some(run) = t.running_ms {
                        counts.ran += 1;
                        let wait = s(run.saturating_sub(t.created_ms));
                        lease.start_s = Some(s(run - t0));
                        lease.wait_s = Some(wait);
                        waits.push(wait);
                        let run_s = s(r.lease_ms);
                        let slowdown = ((wait + run_s) / run_s.max(SLOWDOWN_TAU_S)).max(1.0);
                        slowdowns.push(slowdown);
                        if r.injected {
                            urgent_waits.push(wait);
                        } else {
                            other_slowdowns.push(slowdown);
                        }
                    }
                }
            }
            leases.push(lease);
        }
        let mut rejected_why: Vec<(String, usize)> = why.into_iter().collect();
        rejected_why.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        counts.rejected_why = rejected_why;

        // Utilization, from the first request to the last job's end.
        let start = t0 + requests.first().map_or(0, |r| r.submit_ms);
        let end = out
            .job_intervals
            .iter()
            .map(|j| j.1)
            .max()
            .unwrap_or(out.end_ms)
            .max(start + 1);
        let span = (end - start) as f64;
        // Over the leases that were accepted: a refused one asks nothing.
        let accepted: Vec<Request> = requests
            .iter()
            .zip(&out.workspaces)
            .filter(|(_, w)| w.is_ok())
            .map(|(r, _)| r.clone())
            .collect();
        let first_ms = requests.first().map_or(0, |r| r.submit_ms);
        let span_floor_ms = span_floor(&accepted, first_ms, f64::from(size.nodes));
        let batch_done_s = out
            .jobs
            .values()
            .filter(|j| j.request.is_some_and(|r| !requests[r].reservation))
            .filter_map(|j| j.end_ms)
            .max()
            .map(|e| e.saturating_sub(start) as f64 / 1000.0);
        let reservations_refused = requests
            .iter()
            .zip(&out.workspaces)
            .filter(|(r, w)| r.reservation && matches!(w, Err(e) if e != "not reached"))
            .count();
        let nodes = f64::from(size.nodes);
        let vm_node_ms: f64 = out.vm_intervals.iter().map(|(a, b)| (b - a) as f64).sum();
        let held_ms: f64 = out
            .job_intervals
            .iter()
            .map(|(a, b, n)| (b - a) as f64 * f64::from(*n))
            .sum();
        // Overhead per lease: what its job held beyond its VMs, per node.
        let mut overhead = Vec::new();
        let mut startup = Vec::new();
        let ids: HashMap<usize, &protocol::WorkspaceId> = out
            .workspaces
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().ok().map(|id| (i, id)))
            .collect();
        for job in out.jobs.values() {
            let (Some(a), Some(b), Some(r)) = (job.start_ms, job.end_ms, job.request) else {
                continue;
            };
            let n = u64::from(job.nodes.max(1));
            overhead.push(((b - a) * n).saturating_sub(job.vm_ms) as f64 / n as f64 / 1000.0);
            let running = ids
                .get(&r)
                .and_then(|id| times.get(*id))
                .and_then(|t| t.running_ms);
            if let Some(run) = running {
                startup.push(run.saturating_sub(a) as f64 / 1000.0);
            }
        }
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let wall = out.wall.as_secs_f64().max(1e-9);
        let incomplete_because = match (&out.cut_short, counts.unsettled) {
            (Some(why), _) => Some(why.clone()),
            (None, 0) => None,
            (None, n) => Some(format!(
                "{n} lease(s) never settled: the engine left them waiting with nothing due"
            )),
        };
        Ok(Report {
            complete: incomplete_because.is_none(),
            incomplete_because,
            trace: TraceInfo {
                jobs_read: trace.jobs.len(),
                jobs_skipped: trace.skipped,
                replayed: requests.iter().filter(|r| !r.injected).count(),
                injected: requests.iter().filter(|r| r.injected).count(),
                reservations: requests.iter().filter(|r| r.reservation).count(),
                time_scale: cfg.trace.time_scale,
            },
            cluster: size.clone(),
            model: cfg.clone(),
            utilization: vm_node_ms / (nodes * span),
            held_utilization: held_ms / (nodes * span),
            idle: IdleShares::of(&out.idle, start, end, nodes),
            span_floor_s: span_floor_ms / 1000.0,
            span_s: span / 1000.0,
            batch_done_s,
            reservations_refused,
            vm_saves: out.saves,
            vm_restores: out.restores,
            wait_s: Stat::of(waits),
            bounded_slowdown: Stat::of(slowdowns),
            injected_wait_s: any_urgent.then(|| Stat::of(urgent_waits)),
            trace_slowdown: any_urgent.then(|| Stat::of(other_slowdowns)),
            pool_idle_node_hours: out.pool_idle_ms as f64 / 3_600_000.0,
            overhead_s_per_lease: mean(&overhead),
            startup_s_per_lease: mean(&startup),
            speed: Speed {
                wall_s: wall,
                virtual_events: out.events,
                events_per_s: out.events as f64 / wall,
                pilot_events: out.pilot_events,
                pilot_events_per_s: out.pilot_events as f64 / wall,
                wall_ms_per_lease: wall * 1000.0 / requests.len().max(1) as f64,
            },
            series: series(&out.vm_intervals, &out.job_intervals, start, end, nodes),
            leases: counts,
            requests: leases,
        })
    }

    /// The human summary. An incomplete run says so first.
    pub fn text(&self, trace_name: &str) -> String {
        let mut o = String::new();
        if let Some(why) = &self.incomplete_because {
            let _ = writeln!(
                o,
                "INCOMPLETE: {why}.\nThe figures below cover only what happened before; they are not the trace's."
            );
        }
        let t = &self.trace;
        let _ = writeln!(
            o,
            "trace {trace_name}: {} jobs replayed{}{}{}",
            t.replayed,
            if t.jobs_skipped > 0 {
                format!(" ({} skipped: unknown size or run time)", t.jobs_skipped)
            } else {
                String::new()
            },
            if t.injected > 0 {
                format!(", {} injected", t.injected)
            } else {
                String::new()
            },
            if t.time_scale != 1.0 {
                format!(", times / {}", t.time_scale)
            } else {
                String::new()
            },
        );
        let c = &self.cluster;
        let _ = writeln!(
            o,
            "cluster: {} nodes x {} cores x {} MB ({}); {:?} scheduler; policy {}",
            c.nodes,
            c.cores_per_node,
            c.memory_mb_per_node,
            c.from,
            self.model.batch.scheduler,
            self.model.policy.name
        );
        let l = &self.leases;
        let _ = writeln!(
            o,
            "leases: {} requested, {} rejected, {} ran; ended: {} expired, {} destroyed, {} preempted, {} failed{}",
            l.requested,
            l.rejected,
            l.ran,
            l.expired,
            l.destroyed,
            l.preempted,
            l.failed,
            if l.unsettled > 0 {
                format!("; {} not settled", l.unsettled)
            } else {
                String::new()
            }
        );
        for (why, n) in l.rejected_why.iter().take(3) {
            let _ = writeln!(o, "  rejected x{n}: {why}");
        }
        let _ = writeln!(
            o,
            "utilization: {:.1} % (VMs running), {:.1} % (nodes held by pilot jobs), over {}",
            self.utilization * 100.0,
            self.held_utilization * 100.0,
            human_s(self.span_s)
        );
        let _ = writeln!(
            o,
            "free nodes: {:.1} % in begun reservations, {:.1} % while work waited, {:.1} % with nothing waiting",
            self.idle.reserved * 100.0,
            self.idle.waiting * 100.0,
            self.idle.nothing * 100.0
        );
        let w = &self.wait_s;
        let _ = writeln!(
            o,
            "wait: mean {}, p50 {}, p95 {}; bounded slowdown ({} s): mean {:.2}, p50 {:.2}, p95 {:.2}",
            human_s(w.mean),
            human_s(w.p50),
            human_s(w.p95),
            SLOWDOWN_TAU_S,
            self.bounded_slowdown.mean,
            self.bounded_slowdown.p50,
            self.bounded_slowdown.p95
        );
        if let (Some(u), Some(b)) = (&self.injected_wait_s, &self.trace_slowdown) {
            let _ = writeln!(
                o,
                "injected requests: wait p50 {}, p95 {}, max {}; the trace's leases' bounded slowdown: mean {:.2}, p95 {:.2}; pool idle cost: {:.1} node-hours ({} idle slots kept)",
                human_s(u.p50),
                human_s(u.p95),
                human_s(u.max),
                b.mean,
                b.p95,
                self.pool_idle_node_hours,
                self.model.pool.min_idle_nodes
            );
        }
        let _ = writeln!(
            o,
            "our overhead per lease: {} per node held without its VMs running ({} of it from job start to running)",
            human_s(self.overhead_s_per_lease),
            human_s(self.startup_s_per_lease)
        );
        let s = &self.speed;
        let _ = writeln!(
            o,
            "simulator: {} virtual events in {:.1} s ({:.0} events/s; {} pilot events, {:.0}/s; {:.2} ms per lease)",
            s.virtual_events, s.wall_s, s.events_per_s, s.pilot_events, s.pilot_events_per_s, s.wall_ms_per_lease
        );
        o
    }

    /// Utilization over time as an SVG line plot.
    pub fn svg(&self, title: &str) -> String {
        svg(&self.series, title, self.complete)
    }
}

/// The first clause of an error, so that alike reasons count together.
fn first_words(e: &str) -> String {
    let cut = e.find(" (").unwrap_or(e.len()).min(120);
    e[..cut].to_string()
}

/// Seconds as people read them: `42 s`, `12.5 min`, `3.2 h`, `4.1 d`.
pub fn human_s(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 3.0 * 86400.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

/// Average share of the nodes busy in each bin, for VMs and for jobs.
fn series(
    vms: &[(u64, u64)],
    jobs: &[(u64, u64, u32)],
    start: u64,
    end: u64,
    nodes: f64,
) -> Series {
    let bin = ((end - start) as f64 / BINS as f64).max(1.0);
    let fill = |iv: &mut dyn Iterator<Item = (u64, u64, f64)>| {
        let mut acc = vec![0.0f64; BINS];
        for (a, b, w) in iv {
            let (a, b) = ((a.max(start) - start) as f64, (b.max(start) - start) as f64);
            let (mut i, last) = ((a / bin) as usize, ((b / bin) as usize).min(BINS - 1));
            while i <= last && i < BINS {
                let lo = (i as f64 * bin).max(a);
                let hi = ((i + 1) as f64 * bin).min(b);
                if hi > lo {
                    acc[i] += (hi - lo) * w;
                }
                i += 1;
            }
        }
        acc.iter().map(|v| v / (bin * nodes)).collect::<Vec<f64>>()
    };
    Series {
        bin_s: bin / 1000.0,
        vms_running: fill(&mut vms.iter().map(|(a, b)| (*a, *b, 1.0))),
        nodes_held: fill(&mut jobs.iter().map(|(a, b, n)| (*a, *b, f64::from(*n)))),
    }
}

fn svg(s: &Series, title: &str, complete: bool) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 360.0, 60.0, 20.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let n = s.vms_running.len().max(1) as f64;
    let span_s = s.bin_s * n;
    let (unit, per) = if span_s > 3.0 * 86400.0 {
        ("days", 86400.0)
    } else if span_s > 7200.0 {
        ("hours", 3600.0)
    } else {
        ("seconds", 1.0)
    };
    let line = |v: &[f64]| {
        v.iter()
            .enumerate()
            .map(|(i, y)| {
                let x = left + pw * (i as f64 + 0.5) / n;
                let y = top + ph * (1.0 - y.clamp(0.0, 1.0));
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let heading = if complete {
        escape(title)
    } else {
        format!("{} (INCOMPLETE RUN)", escape(title))
    };
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="22" font-size="14">{heading}</text>"#
    );
    for k in 0..=4 {
        let y = top + ph * (1.0 - f64::from(k) / 4.0);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}%</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            k * 25
        );
    }
    for k in 0..=5 {
        let x = left + pw * f64::from(k) / 5.0;
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{:.1}</text>"#,
            top + ph + 18.0,
            span_s * f64::from(k) / 5.0 / per
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{unit} from the first request</text>"#,
        left + pw / 2.0,
        h - 10.0
    );
    let _ = writeln!(
        o,
        r##"<polyline fill="none" stroke="#999" stroke-width="1" points="{}"/>"##,
        line(&s.nodes_held)
    );
    let _ = writeln!(
        o,
        r##"<polyline fill="none" stroke="#1f5fbf" stroke-width="1.5" points="{}"/>"##,
        line(&s.vms_running)
    );
    let _ = writeln!(
        o,
        r##"<text x="{:.1}" y="22" fill="#1f5fbf" text-anchor="end">VMs running</text><text x="{:.1}" y="36" fill="#999" text-anchor="end">nodes held by pilot jobs</text>"##,
        w - right,
        w - right
    );
    o.push_str("</svg>\n");
    o
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
