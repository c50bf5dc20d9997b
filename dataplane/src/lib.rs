//! hostmesh-dataplane: what meshd runs per connection and per request.
//!
//! `proxy/` carries captured connections (outbound: pick an endpoint;
//! inbound: check and deliver); `tunnel/` is the mTLS transport between
//! hosts (over TCP, a TLS connection per app connection or HTTP/2
//! CONNECT streams; or QUIC); `sockmap/` the optional
//! kernel socket redirection; `sched` the scheduler slice the data
//! workers ask for; `mesh/` the config in use; `identity/` the
//! host certificate the tunnels present, and its renewal; `workers` and
//! `drain` the runtimes and shutdown they run on.
//!
//! It is a crate of its own so that it can be built for speed while the
//! rest of meshd (hostmesh-meshd: start-up, the config stream, DNS, the
//! admin port, `meshd join`, the command line) is built for size: meshd's
//! resident memory is mostly its code pages (docs/BENCHMARKS.md).

pub mod drain;
pub mod identity;
pub mod mesh;
pub mod proxy;
pub mod sched;
pub mod sockmap;
pub mod tunnel;
pub mod workers;

/// Histogram bounds `start, 2·start, 4·start, …` (`count` of them).
///
/// prometheus-client's `exponential_buckets` computes each bound with
/// `f64::powf`, the only libm function meshd would call: linking libm for
/// it costs ~0.5 MiB of resident memory per process (glibc resolves libm's
/// IFUNCs at load, touching most of its code). Doubling is exact in
/// binary floating point, so the bounds are the same.
pub fn doubling_buckets(start: f64, count: u16) -> impl Iterator<Item = f64> {
    std::iter::successors(Some(start), |b| Some(b * 2.0)).take(usize::from(count))
}

#[cfg(test)]
mod tests {
    use super::doubling_buckets;

    #[test]
    fn doubling_buckets_double_from_start() {
        let b: Vec<f64> = doubling_buckets(0.0005, 20).collect();
        assert_eq!(b.len(), 20);
        assert_eq!(b[0], 0.0005);
        assert_eq!(b[1], 0.001);
        assert_eq!(b[19], 0.0005 * 524_288.0);
        assert_eq!(doubling_buckets(1.0, 0).count(), 0);
    }
}
