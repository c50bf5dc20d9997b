//! Outbound: connections captured by nftables arrive on 15001; their
//! original destination (SO_ORIGINAL_DST) names a service VIP and port, or
//! the real address and port of a mesh endpoint. An endpoint is chosen
//! ([`super::lb`]) and a tunnel stream opened to its host; if that fails
//! before any byte moved, up to two other endpoints are tried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hostmesh_api::spiffe::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use super::lb::Balancer;
use super::{AccessEntry, ConnLabels, DirectionLabels, ProxyMetrics};
use crate::drain::Drain;
use crate::mesh::MeshHandle;
use crate::tunnel::splice::{Counters, splice};
use crate::tunnel::{PeerKey, PeerTransports, Transport, TransportChoice, TunnelError, Tunnels};
use crate::workers::Workers;

const ATTEMPTS: usize = 3;

pub struct Outbound {
    pub mesh: Arc<MeshHandle>,
    pub tunnels: Arc<Tunnels>,
    /// This host's transport choice (meshd.toml), over the mesh's.
    pub transport: Option<Transport>,
    /// Per peer network (meshd.toml), over `transport`.
    pub peer_transport: Arc<PeerTransports>,
    pub balancer: Arc<Balancer>,
    pub metrics: ProxyMetrics,
    pub me: SpiffeId,
    pub access_log: bool,
    /// Socket redirection, when on: guards the app's connection.
    pub sockmap: Option<Arc<crate::sockmap::Accel>>,
}

/// Early bytes read at most: a request line and headers, typically.
const EARLY_MAX: usize = 16 * 1024;

/// What the app has sent already, read without waiting, to go out with
/// the CONNECT request (see [`crate::tunnel::hbone::Pool::open`]). None
/// when nothing is there yet (a protocol where the server speaks first,
/// or a client still sending): the splice then reads as usual. An end of
/// stream is left for the splice to read again.
fn early_data(socket: &TcpStream) -> std::io::Result<Option<Bytes>> {
    let sock = socket2::SockRef::from(socket);
    let mut reader: &socket2::Socket = &sock;
    let mut buf = [0u8; EARLY_MAX];
    match std::io::Read::read(&mut reader, &mut buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Where a redirected connection was going; `local` is the socket's own
/// address (which family to ask for).
fn original_dst(socket: &TcpStream, local: SocketAddr) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(socket);
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn serve(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    workers: Workers,
    mut drain: Drain,
) {
    loop {
        let (socket, src) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let guard = drain.track();
        let outbound = outbound.clone();
        workers.dispatch(socket, move |socket| async move {
            outbound.handle(socket, src).await;
            drop(guard);
        });
    }
}

impl Outbound {
    async fn handle(&self, socket: TcpStream, src: SocketAddr) {
        let _ = socket.set_nodelay(true);
        let started = Instant::now();
        let (local, dst) = match socket
            .local_addr()
            .and_then(|local| Ok((local, original_dst(&socket, local)?)))
        {
            Ok(v) => v,
            Err(e) => {
                self.metrics.fail("outbound", "", "", "no_original_dst");
                tracing::warn!(%src, error = %e, "outbound connection without an original destination (not redirected?)");
                return;
            }
        };
        if dst == local {
            // Someone connected to the listener itself: refusing avoids a loop.
            self.metrics.fail("outbound", "", "", "direct_to_listener");
            return;
        }
        let state = self.mesh.load();
        let Some(destination) = state.lookup(dst) else {
            self.metrics.fail("outbound", "", "", "no_service");
            tracing::info!(%src, %dst, "no mesh service at this destination; closing");
            AccessEntry {
                direction: "outbound",
                src: Some(src),
                dst: &dst.to_string(),
                duration: started.elapsed(),
                result: "no_service",
                ..AccessEntry::default()
            }
            .log(self.access_log);
            return;
        };
        let service = destination.service.clone();
        let port = destination.port;
        let svc_name = service.fqdn();
        let Some(port_state) = service.port(port) else {
            return;
        };
        let target = port_state.target;
        let choice = TransportChoice::new(&self.peer_transport, self.transport, state.me.as_ref());
        let early = match early_data(&socket) {
            Ok(e) => e,
            Err(e) => {
                // Reset by the app before anything was opened for it.
                tracing::debug!(%src, %dst, error = %e, "outbound connection failed before a tunnel was opened");
                return;
            }
        };
        let early: &[Bytes] = early.as_slice();
        let mut tried: Vec<String> = Vec::new();
        let mut last_error: Option<TunnelError> = None;
        let mut opened = None;
        for _ in 0..ATTEMPTS {
            let picked = match &destination.endpoint {
                // Addressed to one host: that host or nothing.
                Some(ep) if tried.is_empty() => {
                    Some((ep.clone(), self.balancer.stats(&ep.host_id, target)))
                }
                Some(_) => None,
                None => {
                    self.balancer
                        .pick(&service.endpoints, target, &tried, now_ms(), rand::random)
                }
            };
            let Some((endpoint, stats)) = picked else {
                break;
            };
            tried.push(endpoint.host_id.to_string());
            let outstanding = Balancer::begin(&stats);
            let key = PeerKey {
                addr: endpoint.tunnel_addr(),
                identity: endpoint.identity().clone(),
            };
            let mode = choice.for_peer(key.addr.ip());
            let authority = SocketAddr::new(endpoint.address, target).to_string();
            match self
                .tunnels
                .open(
                    &key,
                    endpoint.quic,
                    mode,
                    &authority,
                    &format!("{svc_name}:{port}"),
                    early,
                )
                .await
            {
                Ok(stream) => {
                    self.balancer.record_success(&stats, now_ms());
                    opened = Some((stream, endpoint, outstanding));
                    break;
                }
                Err(e) => {
                    self.metrics
                        .fail("outbound", &svc_name, &key.identity.to_string(), e.kind());
                    if e.endpoint_failure() && self.balancer.record_failure(&stats, now_ms()) {
                        tracing::warn!(endpoint = %endpoint.host_id, service = %svc_name, error = %e, "endpoint ejected");
                    }
                    tracing::info!(%src, service = %svc_name, endpoint = %endpoint.host_id, error = %e, "tunnel to endpoint failed");
                    let retry = e.retryable();
                    last_error = Some(e);
                    if !retry {
                        break;
                    }
                }
            }
        }
        let Some((stream, endpoint, _outstanding)) = opened else {
            let reason = if tried.is_empty() {
                "no_endpoint"
            } else {
                "all_endpoints_failed"
            };
            if tried.is_empty() {
                self.metrics.fail("outbound", &svc_name, "", "no_endpoint");
            }
            let err = last_error.map(|e| e.to_string());
            AccessEntry {
                direction: "outbound",
                src: Some(src),
                dst: &dst.to_string(),
                service: &svc_name,
                src_identity: &self.me.to_string(),
                duration: started.elapsed(),
                result: reason,
                error: err.as_deref(),
                ..AccessEntry::default()
            }
            .log(self.access_log);
            return;
        };
        let labels = ConnLabels {
            direction: "outbound",
            service: svc_name.clone(),
            peer: endpoint.identity().to_string(),
        };
        self.metrics.opened.get_or_create(&labels).inc();
        let active = self.metrics.active.get_or_create_owned(&DirectionLabels {
            direction: "outbound",
        });
        active.inc();
        let counters = Arc::new(Counters::default());
        let early_len: usize = early.iter().map(Bytes::len).sum();
        counters.sent.fetch_add(early_len as u64, Ordering::Relaxed);
        let transport = stream.transport();
        let (halves, guard) = stream.into_halves();
        let redirect = self
            .sockmap
            .as_ref()
            .and_then(|a| a.guard_client(&socket, dst));
        let (end, error) = splice(socket, halves, counters.clone(), redirect).await;
        drop(guard);
        active.dec();
        let (sent, received) = self.metrics.count_close(&labels, &counters, started);
        AccessEntry {
            direction: "outbound",
            src: Some(src),
            dst: &dst.to_string(),
            service: &svc_name,
            endpoint: &format!("{}:{target}", endpoint.address),
            src_identity: &self.me.to_string(),
            dst_identity: &endpoint.identity().to_string(),
            transport,
            sent,
            received,
            duration: started.elapsed(),
            result: end.as_str(),
            error: error.as_deref(),
        }
        .log(self.access_log);
    }
}
