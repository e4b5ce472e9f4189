//! Urgent requests in the simulator (issue 17): the same trace with the
//! same injected requests, at urgency 0, 1 and 2 and at each pool size
//! asked (`[pool] min_idle_nodes`), side by side, so an admin sees what each
//! level and each pool costs the best-effort leases and gains the urgent
//! ones. The engine's own rules decide (`engine::urgent`, `engine::pool`);
//! the simulated pilots answer `reserve`, `set_cpu`, `destroy_vm`, `bind`
//! and `unbind` as the sim node does, and pool jobs go through the batch model.
//!
//! Not modelled: the CPU a capped best-effort VM loses (the model has no
//! CPU, so a capped lease's run time does not grow), and warm snapshots
//! (`pool.warm_images` is refused).

use super::config::SimConfig;
use super::report::Report;
use super::run::Limits;
use super::trace::Trace;
use super::{simulate, SimError};
use std::fmt::Write;

/// One level's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UrgentRow {
    pub urgency: u8,
    /// The pool's size: idle slots kept (`[pool] min_idle_nodes`); 0: no pool.
    pub pool_nodes: u32,
    pub urgent_wait_p50_s: f64,
    pub urgent_wait_p95_s: f64,
    pub best_effort_slowdown_mean: f64,
    pub best_effort_slowdown_p95: f64,
    pub vm_saves: u64,
    /// Node-hours the pool held idle.
    pub pool_idle_node_hours: f64,
}

impl UrgentRow {
    fn of(urgency: u8, pool_nodes: u32, r: &Report) -> UrgentRow {
        let u = r.injected_wait_s.clone().unwrap_or_default();
        let b = r.trace_slowdown.clone().unwrap_or_default();
        UrgentRow {
            urgency,
            pool_nodes,
            urgent_wait_p50_s: u.p50,
            urgent_wait_p95_s: u.p95,
            best_effort_slowdown_mean: b.mean,
            best_effort_slowdown_p95: b.p95,
            vm_saves: r.vm_saves,
            pool_idle_node_hours: r.pool_idle_node_hours,
        }
    }
}

/// Runs `base` (which must inject requests) once per pool size and urgency
/// level, the injected requests at that level; checkpoint stores on the
/// nodes, so urgency 1 finds leases to suspend. A pool size N sets `[pool]
/// min_idle_nodes = N` (and `max_nodes` to at least N; the rest of `base`'s
/// `[pool]` stays); 0 is no pool. No sizes: `base`'s own pool.
pub fn by_urgency(
    trace: &Trace,
    base: &SimConfig,
    pool_sizes: &[u32],
    limits: &Limits,
) -> Result<Vec<UrgentRow>, SimError> {
    if base.inject.is_empty() {
        return Err(
            super::config::ConfigError("no [[inject]] requests: nothing is urgent".into()).into(),
        );
    }
    let sizes = if pool_sizes.is_empty() {
        vec![base.pool.min_idle_nodes]
    } else {
        pool_sizes.to_vec()
    };
    let mut rows = Vec::new();
    for size in sizes {
        for urgency in 0..=protocol::spec::MAX_URGENCY {
            let mut cfg = base.clone();
            cfg.policy.suspend_resume = true;
            for inj in &mut cfg.inject {
                inj.urgency = urgency;
            }
            cfg.pool.min_idle_nodes = size;
            cfg.pool.max_nodes = match (size, base.pool.max_nodes) {
                (0, _) => None,
                (n, m) => Some(m.unwrap_or(n).max(n)),
            };
            let r = simulate(trace, &cfg, limits, |_, _| {})?;
            if !r.complete {
                return Err(SimError::Setup(format!(
                    "pool size {size}, urgency {urgency}: the run is incomplete: {}",
                    r.incomplete_because.unwrap_or_default()
                )));
            }
            rows.push(UrgentRow::of(urgency, size, &r));
        }
    }
    Ok(rows)
}

/// The rows as a table (seconds, slowdowns as ratios).
pub fn table(rows: &[UrgentRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| pool nodes | urgency | urgent wait p50 | urgent wait p95 | best-effort bounded slowdown mean | p95 | VM saves | pool idle node-h |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            o,
            "| {} | {} | {:.1} s | {:.1} s | {:.3} | {:.2} | {} | {:.1} |",
            r.pool_nodes,
            r.urgency,
            r.urgent_wait_p50_s,
            r.urgent_wait_p95_s,
            r.best_effort_slowdown_mean,
            r.best_effort_slowdown_p95,
            r.vm_saves,
            r.pool_idle_node_hours
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::trace::{self, Format};
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn kth() -> Trace {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/sim/testdata")
            .join("kth-sp2-first-200.swf");
        trace::read(&path, Format::guess(&path)).expect("trace")
    }

    /// 60 jobs of the KTH excerpt on a full cluster, VMs of 1 GB on 4 GB
    /// nodes (room to share), urgent requests of one node every 2 h.
    fn busy() -> SimConfig {
        let mut cfg = SimConfig::parse(
            "[batch]\nscheduler = \"fifo\"\n[trace]\njobs = 60\nvm_memory_mb = 1024\n[[inject]]\nat_s = 1800\ncount = 6\nevery_s = 7200\nnodes = 1\nrun_s = 600\n",
        )
        .expect("config");
        cfg.cluster.nodes = Some(8);
        cfg
    }

    #[test]
    fn urgent_requests_wait_less_at_each_level_and_suspend_only_at_1() {
        let limits = Limits {
            max_wall: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let rows = by_urgency(&kth(), &busy(), &[], &limits).expect("runs");
        eprintln!("{}", table(&rows));
        let (u0, u1, u2) = (&rows[0], &rows[1], &rows[2]);
        assert!(
            u0.urgent_wait_p95_s > 60.0,
            "the cluster must be busy for this test to mean anything: {u0:?}"
        );
        assert!(u1.urgent_wait_p95_s < u0.urgent_wait_p95_s, "{rows:?}");
        assert!(u1.vm_saves > u0.vm_saves, "urgency 1 suspends: {rows:?}");
        // Urgency 2 shares a node at once: the wait is the reservation,
        // the caps and the boot (seconds), and nobody is suspended for it.
        assert!(u2.urgent_wait_p95_s < 60.0, "{rows:?}");
        assert!(u2.urgent_wait_p95_s < u1.urgent_wait_p95_s, "{rows:?}");
        assert_eq!(u2.vm_saves, u0.vm_saves, "{rows:?}");
    }

    /// The pool is modelled: pool jobs through the batch model, idle slots
    /// bound to urgent leases and unbound after them. With 2 idle slots the
    /// urgent requests (urgency 1) start at once at the median, where
    /// without a pool they wait for suspensions and the queue; the slots
    /// cost node-hours only when there is a pool, and urgency 0 (which
    /// may not take the kept slots) gains nothing from them.
    #[test]
    fn a_pool_serves_urgent_requests_at_once_and_costs_idle_node_hours() {
        let limits = Limits {
            max_wall: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let rows = by_urgency(&kth(), &busy(), &[0, 2], &limits).expect("runs");
        eprintln!("{}", table(&rows));
        let row = |pool: u32, urgency: u8| {
            rows.iter()
                .find(|r| r.pool_nodes == pool && r.urgency == urgency)
                .expect("a row")
        };
        let (none, pool) = (row(0, 1), row(2, 1));
        assert!(
            none.urgent_wait_p50_s > 60.0,
            "the cluster must be busy for this test to mean anything: {rows:?}"
        );
        assert!(
            pool.urgent_wait_p50_s < 60.0,
            "a pool of 2 serves urgency 1 from an idle slot: {rows:?}"
        );
        assert!(pool.urgent_wait_p50_s < none.urgent_wait_p50_s, "{rows:?}");
        for r in &rows {
            if r.pool_nodes == 0 {
                assert_eq!(r.pool_idle_node_hours, 0.0, "{r:?}");
            } else {
                assert!(r.pool_idle_node_hours > 0.0, "{r:?}");
            }
        }
        // Urgency 0 leaves the kept slots alone: it waits as without a pool.
        assert!(row(2, 0).urgent_wait_p50_s > 60.0, "{rows:?}");
        // One slot that outlives the run serves all 6 urgent requests at
        // once, one after another: each lease's end unbinds it, idle again.
        let mut day = busy();
        day.pool.walltime_s = 86_400;
        let rows = by_urgency(&kth(), &day, &[1], &limits).expect("runs");
        eprintln!("{}", table(&rows));
        assert!(rows[1].urgent_wait_p95_s < 60.0, "{rows:?}");
        assert_eq!(rows[1].vm_saves, 0, "nobody suspended: {rows:?}");
    }

    #[test]
    fn pool_settings_are_checked_as_the_server_checks_them() {
        let cfg = SimConfig::parse("[pool]\nwarm_images = [\"a\"]\n");
        let e = cfg.expect_err("warm images are not modelled");
        assert!(e.to_string().contains("pool.warm_images"), "{e}");
        let limits = Limits {
            max_wall: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let mut cfg = busy();
        cfg.pool.min_idle_nodes = 2;
        cfg.pool.max_share = 0.1;
        let e = simulate(&kth(), &cfg, &limits, |_, _| {}).expect_err("share");
        assert!(e.to_string().contains("pool.min_idle_nodes = 2"), "{e}");
        let mut cfg = busy();
        cfg.pool.max_nodes = Some(2);
        let e = simulate(&kth(), &cfg, &limits, |_, _| {}).expect_err("no pool");
        assert!(e.to_string().contains("pool.max_nodes"), "{e}");
    }
}
