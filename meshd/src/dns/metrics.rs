//! DNS metrics.
//!
//! Register them under a `dns` prefix:
//! `DnsMetrics::new(registry.sub_registry_with_prefix("dns"))`. The names
//! below are then `<meshd prefix>_dns_…`; they are stable:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `queries_total` | counter | `result`: `mesh_answer`, `mesh_nodata`, `mesh_nxdomain`, `forwarded`, `cache_hit`, `servfail`, `formerr`, `refused`, `notimp`, `dropped` |
//! | `upstream_latency_seconds` | histogram | `transport`: `udp`, `tcp` (successful exchanges only) |
//! | `upstream_failures_total` | counter | `reason`: `timeout`, `io`, `malformed`, `rcode`, `no_upstreams` |
//! | `cache_entries` | gauge | — |

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// How a query was answered; the `result` label of `queries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueryResult {
    /// A mesh name answered with records.
    MeshAnswer,
    /// A mesh name that has no record of the asked type.
    MeshNoData,
    /// A name under the mesh domain that does not exist.
    MeshNxDomain,
    /// Answered by an upstream resolver (whatever its response code).
    Forwarded,
    /// Answered from the cache.
    CacheHit,
    /// SERVFAIL: upstreams failed, none configured, or mesh config not loaded.
    ServFail,
    /// The query could not be decoded or had not exactly one question.
    FormErr,
    /// A question we do not serve (zone transfer, other class in the mesh domain).
    Refused,
    /// An opcode other than QUERY.
    NotImp,
    /// Not answered: too many queries in flight, or a response sent to us.
    Dropped,
}

impl QueryResult {
    pub(crate) fn label(self) -> &'static str {
        match self {
            QueryResult::MeshAnswer => "mesh_answer",
            QueryResult::MeshNoData => "mesh_nodata",
            QueryResult::MeshNxDomain => "mesh_nxdomain",
            QueryResult::Forwarded => "forwarded",
            QueryResult::CacheHit => "cache_hit",
            QueryResult::ServFail => "servfail",
            QueryResult::FormErr => "formerr",
            QueryResult::Refused => "refused",
            QueryResult::NotImp => "notimp",
            QueryResult::Dropped => "dropped",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TransportLabels {
    pub(crate) transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: &'static str,
}

/// Counters: queries by result (mesh_answer, mesh_nxdomain, forwarded,
/// cache_hit, servfail, formerr, …), upstream latency histogram, upstream
/// failures, cache size. Cheap to clone; clones share the same values.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    queries: Family<ResultLabels, Counter>,
    upstream_latency: Family<TransportLabels, Histogram>,
    upstream_failures: Family<ReasonLabels, Counter>,
    cache_entries: Gauge,
}

impl DnsMetrics {
    /// Registers the DNS metrics in `registry` (pass the `dns` sub-registry).
    pub fn new(registry: &mut Registry) -> DnsMetrics {
        let metrics = DnsMetrics {
            queries: Family::default(),
            // 0.25 ms .. ~4 s.
            upstream_latency: Family::new_with_constructor(|| {
                Histogram::new(crate::admin::doubling_buckets(0.00025, 15))
            }),
            upstream_failures: Family::default(),
            cache_entries: Gauge::default(),
        };
        registry.register(
            "queries",
            "DNS queries by how they were answered",
            metrics.queries.clone(),
        );
        registry.register_with_unit(
            "upstream_latency",
            "Round trip of successful exchanges with upstream resolvers",
            Unit::Seconds,
            metrics.upstream_latency.clone(),
        );
        registry.register(
            "upstream_failures",
            "Failed exchanges with upstream resolvers, by reason",
            metrics.upstream_failures.clone(),
        );
        registry.register(
            "cache_entries",
            "Answers held in the DNS cache",
            metrics.cache_entries.clone(),
        );
        metrics
    }

    pub(crate) fn query(&self, result: QueryResult) {
        self.queries
            .get_or_create(&ResultLabels {
                result: result.label(),
            })
            .inc();
    }

    pub(crate) fn upstream_latency(&self, transport: &'static str, seconds: f64) {
        self.upstream_latency
            .get_or_create(&TransportLabels { transport })
            .observe(seconds);
    }

    pub(crate) fn upstream_failure(&self, reason: &'static str) {
        self.upstream_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn set_cache_entries(&self, entries: usize) {
        self.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// The count for one `result` label (tests).
    #[cfg(test)]
    pub(crate) fn query_count(&self, result: QueryResult) -> u64 {
        self.queries
            .get(&ResultLabels {
                result: result.label(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}
