//! The QUIC transport (quinn, on the same rustls certificates and SPIFFE
//! verifiers as the TCP tunnel) on UDP 15008.
//!
//! One QUIC connection per peer host carries every application connection
//! as its own bidirectional stream, with no head-of-line blocking between
//! them. Each stream starts with a CONNECT header and its answer, then
//! carries raw bytes; closing a direction is the stream's FIN:
//!
//! ```text
//! client -> server   0x01 | u16 length | "<ip:port>\n<service>"   (UTF-8)
//! server -> client   u16 status (200, 403, 404, 503, ...)
//! ```
//!
//! The same semantics as HTTP/2 CONNECT over TCP, without HTTP/3 framing:
//! both ends are meshd, so the header is all the protocol needs. When a
//! peer's QUIC does not answer (UDP blocked on the path: no handshake, or a
//! stream's CONNECT unanswered on a connection QUIC still thinks open) the
//! peer is marked and TCP is used for it for a while
//! ([`QuicPool::is_broken`]), starting with the stream that found out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::{self, Expect, SpiffeClientVerifier, SpiffeServerVerifier};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use super::{PeerKey, TunnelError};
use crate::identity::Identity;

/// ALPN of the QUIC tunnel.
pub const ALPN_QUIC: &[u8] = b"hostmesh-tunnel/1";

const HEADER_VERSION: u8 = 1;
const MAX_HEADER: usize = 1024;

/// How long a peer whose QUIC failed is reached over TCP instead.
const BROKEN_FOR: Duration = Duration::from_secs(300);

pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024))
        .receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024))
        .send_window(32 * 1024 * 1024)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(10)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TunnelError> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        identity.bundle(),
        Expect::TrustDomain,
        true,
    ));
    let rustls = tls::server_config(identity.cert(), verifier, &[ALPN_QUIC])
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let crypto =
        QuicServerConfig::try_from(rustls).map_err(|e| TunnelError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// The QUIC tunnel server's endpoint on `socket`. Must be called inside a
/// Tokio runtime (quinn registers the socket and drives it there).
pub fn server_endpoint(
    identity: &Identity,
    socket: std::net::UdpSocket,
) -> Result<quinn::Endpoint, TunnelError> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config(identity)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| TunnelError::Config(format!("starting the QUIC endpoint: {e}")))
}

fn client_config(identity: &Identity, peer: &SpiffeId) -> Result<quinn::ClientConfig, TunnelError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        identity.bundle(),
        Expect::Exactly(peer.clone()),
    ));
    let rustls = tls::client_config(verifier, Some(identity.cert()), &[ALPN_QUIC])
        .map_err(|e| TunnelError::Config(e.to_string()))?;
    let crypto =
        QuicClientConfig::try_from(rustls).map_err(|e| TunnelError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

/// A UDP socket for QUIC, dual-stack where possible, with meshd's mark.
pub fn udp_socket(port: u16, mark: Option<u32>) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from(([0u8; 4], port)).into())?;
            s
        }
    };
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    // Larger buffers: one socket carries every tunnel to every peer, and a
    // datagram that finds the receive buffer full is lost (QUIC then backs
    // off as if the path had dropped it).
    set_buffers(&socket, UDP_BUFFER);
    Ok(socket.into())
}

/// What meshd asks for each way on a QUIC socket.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Asks for `bytes` each way on `socket`; Linux grants up to
/// `net.core.rmem_max` / `wmem_max`. Says so when the receive side got
/// less, since the sysctl is the operator's to raise.
fn set_buffers(socket: &socket2::Socket, bytes: usize) {
    let _ = socket.set_recv_buffer_size(bytes);
    let _ = socket.set_send_buffer_size(bytes);
    // Linux reports twice what it granted (the rest is its bookkeeping).
    if let Ok(got) = socket.recv_buffer_size()
        && got / 2 < bytes
    {
        tracing::info!(
            bytes = got / 2,
            wanted = bytes,
            "the QUIC socket's receive buffer is smaller than meshd asks for (net.core.rmem_max caps it); if UdpRcvbufErrors (nstat) grows under load, raise net.core.rmem_max"
        );
    }
}

/// Peers' addresses as the dual-stack socket sees them.
fn v6_mapped(addr: SocketAddr, socket_is_v6: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if socket_is_v6 => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        other => other,
    }
}

/// The header a client sends on a new stream.
pub fn encode_request(authority: &str, service: &str) -> Vec<u8> {
    let body = format!("{authority}\n{service}");
    let len = u16::try_from(body.len().min(MAX_HEADER)).unwrap_or(0);
    let mut out = Vec::with_capacity(3 + body.len());
    out.push(HEADER_VERSION);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body.as_bytes()[..usize::from(len)]);
    out
}

/// Parses a request header body: (authority, service).
pub fn decode_request(body: &[u8]) -> Result<(String, String), String> {
    let text = std::str::from_utf8(body).map_err(|_| "header is not UTF-8".to_string())?;
    let (authority, service) = text.split_once('\n').unwrap_or((text, ""));
    if authority.is_empty() {
        return Err("header has no target".to_string());
    }
    Ok((authority.to_string(), service.chars().take(256).collect()))
}

/// Reads a request header from a new stream.
pub async fn read_request(recv: &mut quinn::RecvStream) -> Result<(String, String), String> {
    let mut head = [0u8; 3];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    if head[0] != HEADER_VERSION {
        return Err(format!("unknown header version {}", head[0]));
    }
    let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
    if len > MAX_HEADER {
        return Err(format!("header of {len} bytes is too long"));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    decode_request(&body)
}

pub async fn write_status(send: &mut quinn::SendStream, status: u16) -> Result<(), String> {
    send.write_all(&status.to_be_bytes())
        .await
        .map_err(|e| e.to_string())
}

/// An open QUIC tunnel stream.
pub struct QuicStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// Keeps the stream counted against its connection.
    pub guard: Active,
}

pub struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct PeerConn {
    conn: quinn::Connection,
    active: Arc<AtomicUsize>,
}

/// Client side: one QUIC connection per peer, shared by all its streams.
pub struct QuicPool {
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    socket_is_v6: bool,
    connect_timeout: Duration,
    conns: Mutex<HashMap<PeerKey, PeerConn>>,
    dialing: Mutex<HashMap<PeerKey, Arc<tokio::sync::Mutex<()>>>>,
    broken: Mutex<HashMap<SocketAddr, Instant>>,
    handshakes: AtomicUsize,
    dials: AtomicUsize,
    marked: AtomicUsize,
}

impl QuicPool {
    /// Must be called inside a Tokio runtime (quinn registers its socket).
    pub fn new(
        identity: Arc<Identity>,
        mark: Option<u32>,
        connect_timeout: Duration,
    ) -> std::io::Result<QuicPool> {
        let socket = udp_socket(0, mark)?;
        let socket_is_v6 = socket.local_addr()?.is_ipv6();
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(QuicPool {
            identity,
            endpoint,
            socket_is_v6,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            broken: Mutex::new(HashMap::new()),
            handshakes: AtomicUsize::new(0),
            dials: AtomicUsize::new(0),
            marked: AtomicUsize::new(0),
        })
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Connections tried, answered or not.
    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }

    /// How many times a peer's QUIC went unanswered and the peer was
    /// marked to be reached over TCP.
    pub fn marked(&self) -> usize {
        self.marked.load(Ordering::Relaxed)
    }

    /// The peers reached over TCP now because their QUIC went unanswered.
    pub fn broken_peers(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        let mut peers: Vec<SocketAddr> = broken
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(addr, _)| *addr)
            .collect();
        peers.sort();
        peers
    }

    /// Whether QUIC to this peer failed recently (use TCP).
    pub fn is_broken(&self, addr: SocketAddr) -> bool {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        match broken.get(&addr) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                broken.remove(&addr);
                false
            }
            None => false,
        }
    }

    fn mark_broken(&self, addr: SocketAddr) {
        self.marked.fetch_add(1, Ordering::Relaxed);
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, Instant::now() + BROKEN_FOR);
    }

    pub fn connections(&self) -> Vec<(PeerKey, usize)> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .filter(|(_, c)| c.conn.close_reason().is_none())
            .map(|(k, c)| (k.clone(), c.active.load(Ordering::Relaxed)))
            .collect()
    }

    fn live(&self, key: &PeerKey) -> Option<(quinn::Connection, Arc<AtomicUsize>)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get(key) {
            Some(c) if c.conn.close_reason().is_none() => Some((c.conn.clone(), c.active.clone())),
            Some(_) => {
                conns.remove(key);
                None
            }
            None => None,
        }
    }

    async fn connection(
        &self,
        key: &PeerKey,
    ) -> Result<(quinn::Connection, Arc<AtomicUsize>), TunnelError> {
        if let Some(c) = self.live(key) {
            return Ok(c);
        }
        let gate = {
            let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
            dialing.entry(key.clone()).or_default().clone()
        };
        let _dial = gate.lock().await;
        if let Some(c) = self.live(key) {
            return Ok(c);
        }
        let addr = key.addr;
        let config = client_config(&self.identity, &key.identity)?;
        let server_name = tls::server_name_for(&key.identity);
        let name = match &server_name {
            rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
            _ => "hostmesh.invalid".to_string(),
        };
        self.dials.fetch_add(1, Ordering::Relaxed);
        let connecting = self
            .endpoint
            .connect_with(config, v6_mapped(addr, self.socket_is_v6), &name)
            .map_err(|e| TunnelError::Protocol {
                addr,
                detail: format!("QUIC: {e}"),
            })?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let err = match &e {
                    quinn::ConnectionError::TransportError(_)
                    | quinn::ConnectionError::ConnectionClosed(_) => TunnelError::Handshake {
                        addr,
                        identity: key.identity.to_string(),
                        detail: format!("QUIC: {e}"),
                    },
                    _ => TunnelError::Protocol {
                        addr,
                        detail: format!("QUIC: {e}"),
                    },
                };
                if !matches!(err, TunnelError::Handshake { .. }) {
                    self.mark_broken(addr);
                }
                return Err(err);
            }
            Err(_) => {
                // Nothing came back: UDP is likely blocked on the path.
                self.mark_broken(addr);
                return Err(TunnelError::ConnectTimeout {
                    addr,
                    ms: self.connect_timeout.as_millis(),
                });
            }
        };
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let active = Arc::new(AtomicUsize::new(0));
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key.clone(),
            PeerConn {
                conn: conn.clone(),
                active: active.clone(),
            },
        );
        tracing::debug!(%addr, identity = %key.identity, "QUIC tunnel established");
        Ok((conn, active))
    }

    /// Opens a stream to `authority` through the QUIC tunnel to `key`.
    ///
    /// A stream whose CONNECT goes unanswered on a connection QUIC still
    /// thinks open fails. If nothing at all came back from the peer
    /// meanwhile, the path has stopped carrying UDP (a firewall that
    /// starts dropping it, in either direction): the peer is marked
    /// ([`QuicPool::is_broken`]) and the connection closed, so the next
    /// streams go over TCP at once, not after every stream in flight has
    /// failed and the idle timeout (30 s) has closed it. If the peer's
    /// packets still came, the peer is slow, not unreachable: only this
    /// stream is given up, and the connection and its other streams stay.
    pub async fn open(
        &self,
        key: &PeerKey,
        authority: &str,
        service: &str,
        early: &[Bytes],
    ) -> Result<QuicStream, OpenError> {
        let addr = key.addr;
        let (conn, active) = self.connection(key).await.map_err(OpenError::unsent)?;
        let proto = |detail: String| TunnelError::Protocol { addr, detail };
        let timeout = self.connect_timeout;
        // Opening a stream sends nothing yet.
        let (mut send, mut recv) = match tokio::time::timeout(timeout, conn.open_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(OpenError::unsent(proto(format!("QUIC stream: {e}")))),
            Err(_) => {
                return Err(OpenError::unsent(proto(
                    "no QUIC stream capacity in time".to_string(),
                )));
            }
        };
        active.fetch_add(1, Ordering::AcqRel);
        let guard = Active(active);
        let heard_before = conn.stats().udp_rx.datagrams;
        // From here on the request, and the app's first bytes right behind
        // it (see `hbone::Pool::open`), may reach the peer.
        let sent = |detail: String| OpenError {
            error: proto(detail),
            sent: true,
        };
        send.write_all(&encode_request(authority, service))
            .await
            .map_err(|e| sent(format!("QUIC stream: {e}")))?;
        for chunk in early {
            send.write_chunk(chunk.clone())
                .await
                .map_err(|e| sent(format!("QUIC stream: {e}")))?;
        }
        let mut status = [0u8; 2];
        match tokio::time::timeout(timeout * 2, recv.read_exact(&mut status)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(sent(format!("QUIC stream: {e}"))),
            Err(_) => {
                let unanswered = format!(
                    "no answer to CONNECT within {}ms",
                    (timeout * 2).as_millis()
                );
                if conn.stats().udp_rx.datagrams > heard_before {
                    // Slow, not unreachable.
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                    return Err(sent(unanswered));
                }
                self.mark_broken(addr);
                conn.close(quinn::VarInt::from_u32(1), b"unanswered");
                return Err(sent(format!(
                    "{unanswered}, and nothing else came from the peer"
                )));
            }
        }
        let status = u16::from_be_bytes(status);
        if status != 200 {
            return Err(OpenError {
                error: TunnelError::Refused {
                    addr,
                    authority: authority.to_string(),
                    status,
                },
                sent: true,
            });
        }
        Ok(QuicStream { send, recv, guard })
    }
}

/// A stream [`QuicPool::open`] could not open, and whether its request
/// (with the app's first bytes) may have reached the peer: if so, the
/// caller must not send those bytes to the same app again.
#[derive(Debug)]
pub struct OpenError {
    pub error: TunnelError,
    pub sent: bool,
}

impl OpenError {
    fn unsent(error: TunnelError) -> OpenError {
        OpenError { error, sent: false }
    }
}

impl From<OpenError> for TunnelError {
    fn from(e: OpenError) -> TunnelError {
        e.error
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let h = encode_request("10.0.0.2:8080", "web.shop:80");
        assert_eq!(h[0], HEADER_VERSION);
        let len = usize::from(u16::from_be_bytes([h[1], h[2]]));
        assert_eq!(
            decode_request(&h[3..3 + len]).unwrap(),
            ("10.0.0.2:8080".into(), "web.shop:80".into())
        );
        assert!(decode_request(b"").is_err());
        assert!(decode_request(&[0xff, 0xfe]).is_err());
        assert_eq!(
            decode_request(b"1.2.3.4:5").unwrap(),
            ("1.2.3.4:5".into(), String::new())
        );
    }
}
