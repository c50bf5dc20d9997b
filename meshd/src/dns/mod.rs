//! meshd's DNS server: answers mesh names, forwards everything else.
//!
//! meshd listens on `127.0.0.1:15053` and `[::1]:15053` (UDP and TCP);
//! the capture module's nftables rules redirect local processes' port-53
//! queries here. Names under the mesh domain (`<service>.<namespace>.mesh`)
//! are answered from the [`NameTable`] the config stream maintains; every
//! other name is forwarded to the host's own resolvers (read from
//! `/etc/resolv.conf` by [`read_resolv_conf`]) and the answers cached.
//!
//! Answering rules (see [`names`] for the pure lookup):
//!
//! * `<svc>.<ns>.<domain>`: A / AAAA with the service's VIPs, authoritative.
//!   A type the service has no record for is NOERROR/NODATA with the zone's
//!   SOA; an unknown name under the domain is NXDOMAIN with the SOA (so
//!   clients cache the negative answer for `mesh_ttl`).
//! * `<svc>` (one label, the host's own namespace) and `<svc>.<ns>` (two
//!   labels, `<ns>` a known mesh namespace) answer the same way, but only
//!   when such a service exists; otherwise they are forwarded like any other
//!   name, so a mesh namespace never shadows a real domain's other names.
//! * Before the first mesh config has loaded, names under the domain get
//!   SERVFAIL, never NXDOMAIN: a client must not cache the absence of a
//!   name that is about to exist. Forwarding works from the first instant.
//!
//! Forwarding (see `upstream`): the client's question is re-sent with a
//! fresh random ID from a fresh socket (kernel-chosen source port) to each
//! upstream in order, UDP first with a short timeout, over TCP when the UDP
//! answer is truncated. Upstream sockets carry the configured firewall mark
//! (`SO_MARK`) so the capture rules do not send meshd's own queries back to
//! itself. The upstream's response code and records are relayed as they
//! are; SERVFAIL, REFUSED and NOTIMP move on to the next upstream, and when
//! none answers the client gets SERVFAIL. Answers are cached (see `cache`)
//! for their TTL, negative answers for the SOA's negative TTL (RFC 2308),
//! both at most five minutes.
//!
//! Why our own socket loops rather than `hickory_server::Server`: the
//! hickory server spawns an unbounded task per UDP packet, logs every
//! request at `info`, and answers undecodable packets outside the request
//! handler (so they could not be counted). The loops here are small, bound
//! the work in flight, and keep the decision logic in a bytes-in,
//! bytes-out core (`handler::Responder`) that tests drive directly.
//! hickory-proto does all the wire encoding and decoding.
//!
//! Everything received from the network is untrusted: undecodable queries
//! get FORMERR (or nothing, if they are too short to carry an ID or are
//! responses), and nothing on the input path unwraps or panics.

mod cache;
mod handler;
mod metrics;
mod names;
mod resolv;
mod server;
mod upstream;

#[cfg(test)]
mod tests;

use std::{io, net::SocketAddr, path::PathBuf};

pub use metrics::DnsMetrics;
pub use names::NameTable;
pub use resolv::read_resolv_conf;
pub use server::{DnsConfig, DnsServer};

/// Errors starting the DNS server or reading its configuration.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The resolver list could not be read.
    #[error("reading upstream resolvers from {path}: {source}")]
    ReadResolvConf {
        /// The file that was being read.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// A listen address could not be bound.
    #[error("binding DNS {transport} {addr}: {source}")]
    Bind {
        /// "UDP" or "TCP".
        transport: &'static str,
        /// The address that was being bound.
        addr: SocketAddr,
        /// Why binding failed.
        source: io::Error,
    },
    /// The firewall mark for upstream sockets could not be set.
    #[error(
        "setting firewall mark {mark:#x} on a DNS upstream socket: {source} \
         (SO_MARK needs CAP_NET_ADMIN)"
    )]
    Mark {
        /// The configured mark.
        mark: u32,
        /// Why setting it failed.
        source: io::Error,
    },
    /// Nothing to listen on.
    #[error("starting DNS: no listen address could be bound (configured: {configured:?})")]
    NoListenAddress {
        /// The configured listen addresses.
        configured: Vec<SocketAddr>,
    },
}
