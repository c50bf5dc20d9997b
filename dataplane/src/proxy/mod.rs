//! The proxy: outbound (captured local connections, carried to an endpoint
//! through a tunnel) and inbound (tunnel streams from other hosts,
//! authorised and delivered to the local app), with their metrics and
//! access log.

pub mod inbound;
pub mod lb;
pub mod outbound;
pub mod policy;

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub service: String,
    /// The other end's SPIFFE ID.
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub service: String,
    /// The other end's SPIFFE ID: the identity an outbound endpoint was
    /// expected to have, or an inbound caller's verified one; empty when
    /// the failure came before there was one.
    pub peer: String,
    /// What failed: connect, connect_timeout, handshake, denied, refused,
    /// no_endpoint, no_service, app_connect, ...
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub active: Family<DirectionLabels, Gauge>,
    pub bytes_sent: Family<ConnLabels, Counter>,
    pub bytes_received: Family<ConnLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<ConnLabels, Histogram>,
    pub handshake_failures: Counter,
}

impl ProxyMetrics {
    /// Counts a proxied connection that ended: its bytes each way (from
    /// the splice's counters) and how long it lasted; returns the bytes
    /// (sent, received) for the access log.
    pub fn count_close(
        &self,
        labels: &ConnLabels,
        counters: &crate::tunnel::splice::Counters,
        started: std::time::Instant,
    ) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        let sent = counters.sent.load(Ordering::Relaxed);
        let received = counters.received.load(Ordering::Relaxed);
        self.closed.get_or_create(labels).inc();
        self.bytes_sent.get_or_create(labels).inc_by(sent);
        self.bytes_received.get_or_create(labels).inc_by(received);
        self.duration
            .get_or_create(labels)
            .observe(started.elapsed().as_secs_f64());
        (sent, received)
    }

    pub fn new(registry: &mut Registry) -> ProxyMetrics {
        let m = ProxyMetrics {
            opened: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(crate::doubling_buckets(0.0005, 20))
            }),
            handshake_failures: Counter::default(),
        };
        registry.register(
            "connections_opened",
            "Proxied connections opened",
            m.opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Proxied connections closed",
            m.closed.clone(),
        );
        registry.register(
            "connections_active",
            "Proxied connections open now",
            m.active.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes sent towards the peer (outbound: to the server; inbound: to the client)",
            Unit::Bytes,
            m.bytes_sent.clone(),
        );
        registry.register_with_unit(
            "received",
            "Bytes received from the peer",
            Unit::Bytes,
            m.bytes_received.clone(),
        );
        registry.register(
            "connection_failures",
            "Connections that could not be proxied, by reason",
            m.failures.clone(),
        );
        registry.register_with_unit(
            "connection_duration",
            "How long proxied connections lasted",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "tunnel_handshake_failures",
            "Inbound tunnel TLS handshakes refused (bad or missing client certificate)",
            m.handshake_failures.clone(),
        );
        m
    }

    pub fn fail(&self, direction: &'static str, service: &str, peer: &str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                direction,
                service: service.to_string(),
                peer: peer.to_string(),
                reason,
            })
            .inc();
    }
}

/// One line per proxied connection (JSON with the json log format).
#[derive(Debug, Default)]
pub struct AccessEntry<'a> {
    pub direction: &'a str,
    pub src: Option<SocketAddr>,
    pub dst: &'a str,
    pub service: &'a str,
    pub endpoint: &'a str,
    pub src_identity: &'a str,
    pub dst_identity: &'a str,
    /// tcp or quic
    pub transport: &'a str,
    pub sent: u64,
    pub received: u64,
    pub duration: Duration,
    pub result: &'a str,
    pub error: Option<&'a str>,
}

impl AccessEntry<'_> {
    pub fn log(&self, enabled: bool) {
        if !enabled {
            return;
        }
        tracing::info!(
            target: "hostmesh::access",
            direction = self.direction,
            src = %self.src.map(|s| s.to_string()).unwrap_or_default(),
            dst = self.dst,
            service = self.service,
            endpoint = self.endpoint,
            src_identity = self.src_identity,
            dst_identity = self.dst_identity,
            transport = self.transport,
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = self.duration.as_millis() as u64,
            result = self.result,
            error = self.error.unwrap_or(""),
            "connection"
        );
    }
}
