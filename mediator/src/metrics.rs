//! Every metric of the mediator (STYLE 14: named `mediator_<noun>_<unit>`), served as
//! Prometheus text on `/metrics` (DESIGN §13).
//!
//! Invariants: counters only rise; `mediator_state_lost` is 1 exactly while the decision core
//! says its state is lost (rule 5), as of the last event or tick; a node's heard age is absent
//! until the mediator has heard from it since it started.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::decide::NodeView;

/// Labels of a per-node metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The controller's node id.
    pub node: u32,
}

/// Labels of the grant counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrantLabels {
    /// `automatic` or `manual`.
    pub kind: &'static str,
}

/// The mediator's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Heartbeats received, per sender (applied or not).
    pub heartbeats: Family<NodeLabels, Counter>,
    /// Grants issued.
    pub grants: Family<GrantLabels, Counter>,
    /// Events refused (decision refusals and stale heartbeats).
    pub refusals: Counter,
    /// Requests refused as malformed (INVALID_ARGUMENT).
    pub invalid_requests: Counter,
    /// Alerts raised.
    pub alerts: Counter,
    /// Failed writes of the state file (each latches the store, S10).
    pub persist_failures: Counter,
    /// 1 while the state is lost and not yet rebuilt (rule 5).
    pub state_lost: Gauge,
    /// Seconds since each controller was last heard.
    pub heard_age: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mediator_heartbeats",
            "Heartbeats received from each controller, applied or not",
            self.heartbeats.clone(),
        );
        registry.register(
            "mediator_grants",
            "Switchover grants issued (automatic or manual)",
            self.grants.clone(),
        );
        registry.register(
            "mediator_refusals",
            "Events refused: switchover refusals, unknown senders and stale heartbeats",
            self.refusals.clone(),
        );
        registry.register(
            "mediator_invalid_requests",
            "Requests refused as malformed (INVALID_ARGUMENT)",
            self.invalid_requests.clone(),
        );
        registry.register("mediator_alerts", "Alerts raised for an operator", self.alerts.clone());
        registry.register(
            "mediator_persist_failures",
            "Failed writes of the state file; the first one stops the mediator answering",
            self.persist_failures.clone(),
        );
        registry.register(
            "mediator_state_lost",
            "1 while the state is lost and not yet rebuilt from every controller's report (rule 5)",
            self.state_lost.clone(),
        );
        registry.register_with_unit(
            "mediator_node_heard_age",
            "Time since each controller was last heard",
            Unit::Seconds,
            self.heard_age.clone(),
        );
    }

    /// Sets the gauges from the decision core's view.
    pub fn observe(&self, lost: bool, views: &[NodeView]) {
        self.state_lost.set(i64::from(lost));
        for view in views {
            let labels = NodeLabels { node: view.node.0 };
            match view.heard_ago {
                Some(age) => {
                    self.heard_age.get_or_create(&labels).set(age.as_secs_f64());
                }
                None => {
                    self.heard_age.remove(&labels);
                }
            }
        }
    }
}
