//! Controller metrics (Prometheus, on the metrics port at /metrics). Names
//! are stable; see docs/OPERATIONS.md.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    /// Host sessions open on this replica.
    pub sessions: Gauge,
    /// Config updates sent, by kind (full, increment).
    pub pushes: Family<ResultLabels, Counter>,
    /// Acknowledged and rejected updates.
    pub acks: Family<ResultLabels, Counter>,
    /// Time from a state change to the update being handed to the stream.
    pub push_latency: Histogram,
    pub joins: Family<ResultLabels, Counter>,
    pub renewals: Family<ResultLabels, Counter>,
    pub applies: Family<ResultLabels, Counter>,
    pub state_revision: Gauge,
    /// Sessions whose pushes waited for the startup hold.
    pub startup_holds: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            sessions: Gauge::default(),
            pushes: Family::default(),
            acks: Family::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            joins: Family::default(),
            renewals: Family::default(),
            applies: Family::default(),
            state_revision: Gauge::default(),
            startup_holds: Counter::default(),
        };
        registry.register(
            "host_sessions",
            "Host config sessions open on this replica",
            m.sessions.clone(),
        );
        registry.register(
            "config_pushes",
            "Config updates sent to hosts",
            m.pushes.clone(),
        );
        registry.register(
            "config_acks",
            "Config updates hosts acknowledged (ack) or rejected (nack)",
            m.acks.clone(),
        );
        registry.register_with_unit(
            "config_push_latency",
            "From seeing a store change to sending the update",
            prometheus_client::registry::Unit::Seconds,
            m.push_latency.clone(),
        );
        registry.register("joins", "Join attempts by result", m.joins.clone());
        registry.register(
            "renewals",
            "Certificate renewals by result",
            m.renewals.clone(),
        );
        registry.register("applies", "Apply calls by result", m.applies.clone());
        registry.register(
            "state_revision",
            "Store revision this replica has seen",
            m.state_revision.clone(),
        );
        registry.register(
            "startup_holds",
            "Host sessions whose updates waited for the startup hold (hosts.startup_hold)",
            m.startup_holds.clone(),
        );
        m
    }

    pub fn count(family: &Family<ResultLabels, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabels { result }).inc();
    }
}
