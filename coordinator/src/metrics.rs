//! Prometheus metrics (`GET /metrics`), through the `prometheus-client` crate.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

pub struct Metrics {
    registry: Registry,
    pub workspaces_created: Counter,
    pub pilot_events: Family<TypeLabel, Counter>,
    pub refused: Family<TypeLabel, Counter>,
    pub workspaces: Family<StateLabel, Gauge>,
    pub orphan_jobs_cancelled: Counter,
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
        registry.register("workspaces", "Workspaces by state", workspaces.clone());
        let orphan_jobs_cancelled = Counter::default();
        registry.register(
            "orphan_jobs_cancelled",
            "Batch jobs named as ours that no slot owned, cancelled",
            orphan_jobs_cancelled.clone(),
        );
        Self {
            registry,
            workspaces_created,
            pilot_events,
            refused,
            workspaces,
            orphan_jobs_cancelled,
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

    /// Text exposition format; `states` refreshes the per-state gauge first.
    pub fn render(&self, states: &[(String, i64)]) -> String {
        for (state, n) in states {
            self.workspaces
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding failed\n");
        }
        out
    }
}
