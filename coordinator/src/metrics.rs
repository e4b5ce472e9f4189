//! Prometheus metrics (`GET /metrics`), through the `prometheus-client` crate.
//!
//! What is here: the registry and every metric the coordinator exports, with
//! the helpers that record them. Not here: where they are recorded (the HTTP
//! middleware in [`crate::server`], the batch-system meter in
//! [`crate::lrm_meter`], the rules in [`crate::engine`]).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use protocol::view::WorkspaceState;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// One HTTP request: the route as declared (`/api/v1/workspaces/{id}`, never
/// the raw path, so ids do not explode the label set), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

/// One call to the batch system: which adapter, which call, how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LrmLabels {
    pub lrm: String,
    pub call: String,
    /// `ok` or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Buckets for batch-system calls: 1 ms to about 65 s (`sbatch` on a busy
/// controller takes seconds; the local batch system well under a millisecond).
fn lrm_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

/// Buckets for HTTP requests: 0.5 ms to about 33 s (long-polls last up to 30 s).
fn http_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 17,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub workspaces_created: Counter,
    pub pilot_events: Family<TypeLabel, Counter>,
    pub refused: Family<TypeLabel, Counter>,
    pub workspaces: Family<StateLabel, Gauge>,
    pub orphan_jobs_cancelled: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<HttpLabels, Histogram>,
    pub lrm_calls: Family<LrmLabels, Histogram>,
    /// The latest batch-system call and its outcome (for `/healthz`).
    pub lrm_last: crate::lrm_meter::LastCallCell,
    pub failed_logins: Counter,
    /// From the request to every VM running (queue wait included).
    pub request_to_running: Histogram,
    /// From destroy asked (or the lease's end) to every slot given back.
    pub teardown: Histogram,
    pub slots: Family<StateLabel, Gauge>,
    pub nodes: Family<StateLabel, Gauge>,
    /// The slot pool's slots by state (`engine::pool`).
    pub pool_slots: Family<StateLabel, Gauge>,
    /// Host VMs whose CPU cap (for an urgent lease) could not be lifted yet.
    pub cpu_caps_stuck: Gauge,
}

fn lease_histogram() -> Histogram {
    // 0.1 s to about 3.6 h: a lease may wait hours in the batch queue.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.1, 2.0, 18,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsp");
        let workspaces_created = Counter::default();
        let pilot_events = Family::<TypeLabel, Counter>::default();
        let refused = Family::<TypeLabel, Counter>::default();
        let workspaces = Family::<StateLabel, Gauge>::default();
        registry.register(
            "workspaces_created",
            "Workspaces requested by clients",
            workspaces_created.clone(),
        );
        registry.register(
            "pilot_events",
            "Pilot events stored and acknowledged, by type",
            pilot_events.clone(),
        );
        registry.register(
            "pilot_requests_refused",
            "Pilot requests refused, by cause",
            refused.clone(),
        );
        registry.register(
            "workspaces",
            "Workspaces by state (every state, zero included)",
            workspaces.clone(),
        );
        let orphan_jobs_cancelled = Counter::default();
        registry.register(
            "orphan_jobs_cancelled",
            "Batch jobs named as ours that no slot owned, cancelled",
            orphan_jobs_cancelled.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            http_requests.clone(),
        );
        let http_duration =
            Family::<HttpLabels, Histogram>::new_with_constructor(http_histogram as fn() -> _);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (long-polls included), by method, route and status",
            http_duration.clone(),
        );
        let lrm_calls =
            Family::<LrmLabels, Histogram>::new_with_constructor(lrm_histogram as fn() -> _);
        registry.register(
            "lrm_call_duration_seconds",
            "Duration of calls to the batch system (submit, status, cancel, list_jobs, check_grace), by outcome",
            lrm_calls.clone(),
        );
        let failed_logins = Counter::default();
        registry.register(
            "failed_logins",
            "Client requests refused for a missing, malformed or unknown token",
            failed_logins.clone(),
        );
        registry.register(
            "build",
            "The coordinator's version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            }),
        );
        let request_to_running = lease_histogram();
        registry.register(
            "request_to_running_seconds",
            "From a workspace's request to all its VMs running (batch queue wait included)",
            request_to_running.clone(),
        );
        let teardown = lease_histogram();
        registry.register(
            "teardown_seconds",
            "From destroy asked or the lease's end to every slot given back (destroyed and expired workspaces)",
            teardown.clone(),
        );
        let slots = Family::<StateLabel, Gauge>::default();
        registry.register(
            "slots",
            "Slots (pilot jobs) by state (every state, zero included)",
            slots.clone(),
        );
        let nodes = Family::<StateLabel, Gauge>::default();
        registry.register(
            "nodes",
            "Nodes by state: in_use (a pilot holds it), needs_kill_all, other (the rest of the batch system's nodes)",
            nodes.clone(),
        );
        let pool_slots = Family::<StateLabel, Gauge>::default();
        registry.register(
            "pool_slots",
            "The slot pool's slots by state: idle, bound (to a lease), growing (pilot job queued or starting), draining (being given back)",
            pool_slots.clone(),
        );
        let cpu_caps_stuck = Gauge::default();
        registry.register(
            "cpu_caps_stuck",
            "VMs whose CPU cap, put on them for an urgent lease, their node refused (or did not answer) to lift; retried while they run",
            cpu_caps_stuck.clone(),
        );
        Self {
            cpu_caps_stuck,
            request_to_running,
            teardown,
            slots,
            nodes,
            pool_slots,
            registry,
            workspaces_created,
            pilot_events,
            refused,
            workspaces,
            orphan_jobs_cancelled,
            http_requests,
            http_duration,
            lrm_calls,
            lrm_last: Default::default(),
            failed_logins,
        }
    }

    pub fn event(&self, kind: &str) {
        self.pilot_events
            .get_or_create(&TypeLabel {
                r#type: kind.to_string(),
            })
            .inc();
    }

    pub fn refused(&self, cause: &str) {
        self.refused
            .get_or_create(&TypeLabel {
                r#type: cause.to_string(),
            })
            .inc();
    }

    /// Records one answered HTTP request.
    pub fn http(&self, method: &str, route: &str, status: u16, took: Duration) {
        let labels = HttpLabels {
            method: method.to_string(),
            route: route.to_string(),
            status,
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Text exposition format. `states` are the current counts per workspace
    /// state; every known state is rendered, those absent as 0, so a gauge
    /// goes back down when the last workspace leaves a state.
    /// Sets the slot gauges from counts per state (absent states are 0).
    pub fn set_slots(&self, counts: &[(String, i64)]) {
        for state in [
            "submitted",
            "reserving",
            "reserved",
            "releasing",
            "released",
            "failed",
        ] {
            let n = counts
                .iter()
                .filter(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .sum();
            self.slots
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(n);
        }
    }

    /// Sets the pool gauges from counts per pool slot state.
    pub fn set_pool_slots(&self, counts: &[(&str, i64)]) {
        for (state, n) in counts {
            self.pool_slots
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(*n);
        }
    }

    /// Sets the node gauges: held by pilots, needing kill-all, the rest of `total`.
    pub fn set_nodes(&self, in_use: i64, needs_kill_all: i64, total: i64) {
        let other = (total - in_use - needs_kill_all).max(0);
        for (state, n) in [
            ("in_use", in_use),
            ("needs_kill_all", needs_kill_all),
            ("other", other),
        ] {
            self.nodes
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(n);
        }
    }

    pub fn render(&self, states: &[(String, i64)]) -> String {
        let count = |name: &str| {
            states
                .iter()
                .filter(|(s, _)| s == name)
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        for state in WorkspaceState::ALL {
            self.workspaces
                .get_or_create(&StateLabel {
                    state: state.as_str().to_string(),
                })
                .set(count(state.as_str()));
        }
        // A state this build does not know (a newer database) is shown too.
        for (state, n) in states {
            if WorkspaceState::parse(state).is_none() {
                self.workspaces
                    .get_or_create(&StateLabel {
                        state: state.clone(),
                    })
                    .set(*n);
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(text: &str, state: &str) -> Option<i64> {
        let prefix = format!("wsp_workspaces{{state=\"{state}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn workspace_gauges_go_back_to_zero_when_a_state_empties() {
        let m = Metrics::new();
        let t = m.render(&[("running".into(), 2), ("pending".into(), 1)]);
        assert_eq!(gauge(&t, "running"), Some(2), "{t}");
        assert_eq!(gauge(&t, "pending"), Some(1), "{t}");
        // Every workspace destroyed: the database has only `destroyed` rows.
        let t = m.render(&[("destroyed".into(), 3)]);
        assert_eq!(gauge(&t, "running"), Some(0), "{t}");
        assert_eq!(gauge(&t, "pending"), Some(0), "{t}");
        assert_eq!(gauge(&t, "destroyed"), Some(3), "{t}");
        // Every state is there from the first scrape, so alerts can use them.
        let t = Metrics::new().render(&[]);
        for s in WorkspaceState::ALL {
            assert_eq!(gauge(&t, s.as_str()), Some(0), "{t}");
        }
    }

    #[test]
    fn build_info_and_http_metrics_are_exported() {
        let m = Metrics::new();
        m.http(
            "GET",
            "/api/v1/workspaces/{id}",
            404,
            Duration::from_millis(3),
        );
        let t = m.render(&[]);
        assert!(
            t.contains(&format!(
                "wsp_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{t}"
        );
        assert!(
            t.contains(
                "wsp_http_requests_total{method=\"GET\",route=\"/api/v1/workspaces/{id}\",status=\"404\"} 1"
            ),
            "{t}"
        );
        assert!(
            t.contains("wsp_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/workspaces/{id}\",status=\"404\"} 1"),
            "{t}"
        );
    }
}
