//! Host-to-host tunnels: mutual TLS 1.3, both ends checking the other's
//! SPIFFE identity against the trust bundle, carrying one stream per
//! application connection.
//!
//! - [`hbone`]: HTTP/2 CONNECT over TLS on TCP port 15008 (the HBONE shape
//!   Istio's ambient mode uses): a pool of a few connections per peer
//!   host, each multiplexing many streams, so an application connection
//!   costs no TLS handshake.
//! - [`dedicated`]: the default over TCP: one TLS connection per
//!   application connection at a time, kept open and reused for the next,
//!   so it too costs no TLS handshake once warm, with less work per byte
//!   than HTTP/2; negotiated by ALPN, HTTP/2 where the peer lacks it.
//! - [`server`]: accepts tunnels and hands each CONNECT to the inbound
//!   proxy with the caller's verified identity.
//! - [`quic`]: the same over QUIC on UDP 15008, one connection per peer.
//! - [`splice`]: moves bytes between a TCP socket and a tunnel stream, with
//!   half-close.
//! - [`Tunnels`]: picks the transport per connection (the mesh's or this
//!   host's choice, and whether the peer offers QUIC) and falls back to TCP
//!   when QUIC gets no answer (UDP blocked on the path).
//!
//! The client checks that the peer is exactly the identity the endpoint is
//! expected to have (a host cannot answer for another group's service); the
//! server accepts any identity of the trust domain and leaves the decision
//! to the inbound proxy. Certificates rotate without touching established
//! tunnels: configs are rebuilt and used by new handshakes.

pub mod dedicated;
pub mod hbone;
pub mod quic;
pub mod readahead;
pub mod server;
pub mod splice;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::{self, Expect, SpiffeClientVerifier, SpiffeServerVerifier};
use rustls::{ClientConfig, ServerConfig};

use crate::identity::Identity;

/// ALPN of the tunnel: HTTP/2.
pub const ALPN_HBONE: &[u8] = b"h2";

/// Where a tunnel goes and who must answer there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: SocketAddr,
    pub identity: Arc<SpiffeId>,
}

/// Whose fault a failure was and whether another try may help; becomes a
/// metric label (pingora's error source and retry flag).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to peer {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to peer {addr}: no answer within {ms}ms")]
    ConnectTimeout { addr: SocketAddr, ms: u128 },
    #[error("TLS with peer {addr} (expecting {identity}): {detail}")]
    Handshake {
        addr: SocketAddr,
        identity: String,
        detail: String,
    },
    #[error("tunnel to peer {addr}: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error("peer {addr} refused the connection to {authority}: HTTP {status}")]
    Refused {
        addr: SocketAddr,
        authority: String,
        status: u16,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

impl TunnelError {
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelError::Connect { .. } => "connect",
            TunnelError::ConnectTimeout { .. } => "connect_timeout",
            TunnelError::Handshake { .. } => "handshake",
            TunnelError::Protocol { .. } => "protocol",
            TunnelError::Refused { status, .. } if *status == 403 => "denied",
            TunnelError::Refused { .. } => "refused",
            TunnelError::Config(_) => "internal",
        }
    }

    /// Another endpoint may succeed where this one failed.
    pub fn retryable(&self) -> bool {
        match self {
            TunnelError::Refused { status, .. } => *status != 403,
            TunnelError::Config(_) => false,
            _ => true,
        }
    }

    /// The endpoint itself looks broken (for outlier detection): failing
    /// to connect, handshake or get an answer; not a policy refusal.
    pub fn endpoint_failure(&self) -> bool {
        !matches!(
            self,
            TunnelError::Refused { status: 403, .. } | TunnelError::Config(_)
        )
    }
}

/// Client configs by peer identity and whether they offer dedicated
/// connections.
type ClientConfigs = HashMap<(SpiffeId, bool), Arc<ClientConfig>>;

/// The TLS configs of this host's tunnels, rebuilt when the certificate or
/// trust bundle changes.
pub struct TlsConfigs {
    identity: Arc<Identity>,
    server: ArcSwap<ServerConfig>,
    /// The same, offering HTTP/2 alone.
    server_h2: ArcSwap<ServerConfig>,
    /// Per peer identity, and whether dedicated connections are offered.
    clients: Mutex<(u64, ClientConfigs)>,
    generation: std::sync::atomic::AtomicU64,
}

impl TlsConfigs {
    pub fn new(identity: Arc<Identity>) -> Result<Arc<TlsConfigs>, TunnelError> {
        let server = build_server(&identity, true)?;
        let server_h2 = build_server(&identity, false)?;
        let generation = *identity.changes().borrow();
        Ok(Arc::new(TlsConfigs {
            identity,
            server: ArcSwap::from_pointee(server),
            server_h2: ArcSwap::from_pointee(server_h2),
            clients: Mutex::new((generation, HashMap::new())),
            generation: std::sync::atomic::AtomicU64::new(generation),
        }))
    }

    /// Follows certificate and bundle changes until the identity is gone.
    pub async fn follow(self: Arc<Self>) {
        let mut changes = self.identity.changes();
        while changes.changed().await.is_ok() {
            let generation = *changes.borrow();
            match build_server(&self.identity, true)
                .and_then(|c| Ok((c, build_server(&self.identity, false)?)))
            {
                Ok((cfg, h2)) => {
                    self.server.store(Arc::new(cfg));
                    self.server_h2.store(Arc::new(h2));
                    self.generation
                        .store(generation, std::sync::atomic::Ordering::Release);
                    tracing::info!(generation, "tunnel TLS configs rebuilt");
                }
                Err(e) => {
                    tracing::error!(error = %e, "rebuilding the tunnel TLS config failed; keeping the old one")
                }
            }
        }
    }

    /// The server config, offering dedicated connections or not.
    pub fn server_offering(&self, dedicated: bool) -> Arc<ServerConfig> {
        if dedicated {
            self.server.load_full()
        } else {
            self.server_h2.load_full()
        }
    }

    /// The client config that accepts exactly `peer`. Configs are kept per
    /// identity so TLS session resumption works across connections.
    pub fn client_for(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>, TunnelError> {
        self.client(peer, false)
    }

    /// The same, offering dedicated connections first, then HTTP/2.
    pub fn client_dedicated(&self, peer: &SpiffeId) -> Result<Arc<ClientConfig>, TunnelError> {
        self.client(peer, true)
    }

    fn client(&self, peer: &SpiffeId, dedicated: bool) -> Result<Arc<ClientConfig>, TunnelError> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        let mut guard = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if guard.0 != generation {
            *guard = (generation, HashMap::new());
        }
        let key = (peer.clone(), dedicated);
        if let Some(cfg) = guard.1.get(&key) {
            return Ok(cfg.clone());
        }
        let verifier = Arc::new(SpiffeServerVerifier::new(
            self.identity.bundle(),
            Expect::Exactly(peer.clone()),
        ));
        let cfg = Arc::new(
            tls::client_config(verifier, Some(self.identity.cert()), offered(dedicated))
                .map_err(|e| TunnelError::Config(e.to_string()))?,
        );
        guard.1.insert(key, cfg.clone());
        Ok(cfg)
    }
}

/// The ALPN protocols a tunnel end offers, in order of preference (a
/// rustls server picks the first of its own the client also offers).
fn offered(dedicated: bool) -> &'static [&'static [u8]] {
    if dedicated {
        &[dedicated::ALPN, ALPN_HBONE]
    } else {
        &[ALPN_HBONE]
    }
}

fn build_server(identity: &Identity, dedicated: bool) -> Result<ServerConfig, TunnelError> {
    let verifier = Arc::new(SpiffeClientVerifier::new(
        identity.bundle(),
        Expect::TrustDomain,
        true,
    ));
    tls::server_config(identity.cert(), verifier, offered(dedicated))
        .map_err(|e| TunnelError::Config(e.to_string()))
}

/// Which transport a host opens tunnels with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Quic,
    /// QUIC where the peer offers it, else TCP.
    Auto,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "tcp" => Some(Transport::Tcp),
            "quic" => Some(Transport::Quic),
            "auto" => Some(Transport::Auto),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Auto => "auto",
        }
    }
}

/// Per-peer transports: networks of peer tunnel addresses, each with the
/// transport this host opens tunnels to them with. Two sets of them apply:
/// this host's own (`proxy.peer_transport` in meshd.toml), where the most
/// specific network holding a peer's address decides, whatever the order
/// they are written in; and the mesh's (the controller's
/// `[[mesh.peer_transport]]` rules that name this host), where the first
/// rule holding the peer's address decides. Each network carries a rank
/// (0 for all of this host's, the rule's position for the mesh's): the
/// lowest rank holding the address wins, then the longest prefix.
///
/// Looked up once per new connection: one hash probe per distinct prefix
/// length in the table, however many networks it holds (the controller
/// allows 64 rules of 256 networks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerTransports {
    /// Every network, lowest rank first, then longest prefix (for `meshd
    /// status`); none twice.
    list: Vec<(ipnet::IpNet, Transport, u32)>,
    /// By prefix length, longest first.
    by_len: Vec<SameLength>,
}

/// The networks of one prefix length and family, each with its rank and
/// transport.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SameLength {
    len: u8,
    v4: bool,
    nets: HashMap<ipnet::IpNet, (u32, Transport)>,
}

impl PeerTransports {
    /// From `network or address = transport` pairs; the error names the
    /// entry that is wrong and how.
    pub fn new<'a>(
        entries: impl IntoIterator<Item = (&'a str, Transport)>,
    ) -> Result<PeerTransports, String> {
        let mut nets: Vec<(ipnet::IpNet, Transport, &str)> = Vec::new();
        for (key, transport) in entries {
            let net = hostmesh_api::network::parse_network(key)?;
            if let Some((_, _, other)) = nets.iter().find(|(n, _, _)| *n == net) {
                return Err(format!("{other:?} and {key:?} are the same network"));
            }
            nets.push((net, transport, key));
        }
        Ok(PeerTransports::ranked(
            nets.into_iter().map(|(n, t, _)| (n, t, 0)).collect(),
        ))
    }

    /// From networks already read and checked, each with its rank; of a
    /// network listed twice the lower rank is kept (the first, at equal
    /// ranks).
    pub fn ranked(nets: Vec<(ipnet::IpNet, Transport, u32)>) -> PeerTransports {
        // Of a network listed twice, the lower rank (the first at equal
        // ranks): a stable sort by rank, then the first of each network.
        let mut list = nets;
        list.sort_by_key(|&(net, _, rank)| (rank, std::cmp::Reverse(net.prefix_len())));
        let mut seen = std::collections::HashSet::with_capacity(list.len());
        list.retain(|&(net, _, _)| seen.insert(net));
        let mut by_len: Vec<SameLength> = Vec::new();
        for &(net, transport, rank) in &list {
            let (len, v4) = (net.prefix_len(), matches!(net, ipnet::IpNet::V4(_)));
            let i = match by_len.iter().position(|t| (t.len, t.v4) == (len, v4)) {
                Some(i) => i,
                None => {
                    by_len.push(SameLength {
                        len,
                        v4,
                        nets: HashMap::new(),
                    });
                    by_len.len() - 1
                }
            };
            by_len[i].nets.insert(net, (rank, transport));
        }
        by_len.sort_by_key(|t| std::cmp::Reverse(t.len));
        PeerTransports { list, by_len }
    }

    /// The transport for a peer at `addr`, if an entry covers it.
    pub fn for_peer(&self, addr: IpAddr) -> Option<Transport> {
        let addr = addr.to_canonical();
        let v4 = addr.is_ipv4();
        let mut best: Option<(u32, Transport)> = None;
        for t in &self.by_len {
            if t.v4 != v4 {
                continue;
            }
            let Ok(net) = ipnet::IpNet::new(addr, t.len) else {
                continue;
            };
            if let Some(&(rank, transport)) = t.nets.get(&net.trunc())
                && best.is_none_or(|(b, _)| rank < b)
            {
                best = Some((rank, transport));
                if rank == 0 {
                    break;
                }
            }
        }
        best.map(|(_, t)| t)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Each network with its transport, in the order they decide: lowest
    /// rank first, then most specific (for `meshd status`).
    pub fn entries(&self) -> impl Iterator<Item = (ipnet::IpNet, Transport)> + '_ {
        self.list.iter().map(|&(n, t, _)| (n, t))
    }
}

/// Everything that decides the transport to a peer, most local first:
/// this host's per-peer entries, this host's setting, the mesh's per-pair
/// rules that name this host, the mesh's setting; TCP when none does. A
/// host's own meshd.toml thus always has the last word (a host where UDP
/// is blocked sets `proxy.transport = "tcp"` whatever the mesh says).
pub struct TransportChoice<'a> {
    pub host_peers: &'a PeerTransports,
    pub host: Option<Transport>,
    pub mesh_peers: &'a PeerTransports,
    pub mesh: Option<Transport>,
}

/// The mesh's per-peer transports when it has none (or no `self` yet).
static NO_RULES: PeerTransports = PeerTransports {
    list: Vec::new(),
    by_len: Vec::new(),
};

impl<'a> TransportChoice<'a> {
    /// This host's settings (`host_peers`, `host`) over the mesh's, from
    /// `me` (the controller's description of this host, if it came).
    pub fn new(
        host_peers: &'a PeerTransports,
        host: Option<Transport>,
        me: Option<&'a crate::mesh::SelfInfo>,
    ) -> TransportChoice<'a> {
        TransportChoice {
            host_peers,
            host,
            mesh_peers: me.map_or(&NO_RULES, |m| &*m.peer_transport),
            mesh: me.and_then(|m| m.transport),
        }
    }

    pub fn for_peer(&self, addr: IpAddr) -> Transport {
        self.host_peers
            .for_peer(addr)
            .or(self.host)
            .or_else(|| self.mesh_peers.for_peer(addr))
            .or(self.mesh)
            .unwrap_or(Transport::Tcp)
    }

    /// What applies to a peer no per-peer entry or rule covers.
    pub fn default(&self) -> Transport {
        self.host.or(self.mesh).unwrap_or(Transport::Tcp)
    }

    /// Whether the mesh's per-pair rules can decide anything here (not
    /// when this host sets its own transport).
    pub fn mesh_peers_apply(&self) -> bool {
        self.host.is_none() && !self.mesh_peers.is_empty()
    }
}

/// An open tunnel stream on either transport.
pub enum Stream {
    H2(hbone::TunnelStream),
    Quic(quic::QuicStream),
    Dedicated(dedicated::DedicatedStream),
}

impl Stream {
    pub fn transport(&self) -> &'static str {
        match self {
            Stream::H2(_) => "tcp",
            Stream::Quic(_) => "quic",
            Stream::Dedicated(_) => "tcp",
        }
    }

    pub fn into_halves(self) -> (splice::Halves, Option<Box<dyn std::any::Any + Send>>) {
        match self {
            Stream::H2(s) => {
                let hbone::TunnelStream { send, recv, guard } = s;
                (splice::Halves::H2(send, recv), Some(Box::new(guard)))
            }
            Stream::Quic(s) => {
                let quic::QuicStream { send, recv, guard } = s;
                (splice::Halves::Quic(send, recv), Some(Box::new(guard)))
            }
            Stream::Dedicated(s) => {
                let (halves, guard) = s.into_halves();
                (splice::Halves::Dedicated(halves), Some(guard))
            }
        }
    }
}

/// Encrypted bytes rustls may hold for a tunnel socket before it stops
/// taking plaintext (its default is 64 KiB).
///
/// It must hold a whole HTTP/2 DATA frame (up to 64 KiB from a peer; meshd
/// sends 48 KiB ones, see `splice::ReadSize`) with its header and the
/// records' overhead, and more behind it: with the default and 64 KiB
/// frames, rustls took all but the last ~100 bytes of each frame, and the
/// rest went out as a record of its own in a second `writev`, with
/// TCP_NODELAY as a segment of its own (strace: two `writev` per 64 KiB,
/// one of 31 bytes).
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Connects to `key` and completes a TLS handshake with `config`, each
/// within the pool's connect timeout; the socket gets TCP_NODELAY and the
/// configured congestion control, the session [`TLS_SEND_BUFFER`].
pub(crate) async fn dial_tls(
    key: &PeerKey,
    settings: &hbone::PoolSettings,
    config: Arc<ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<readahead::ReadAhead<tokio::net::TcpStream>>, TunnelError>
{
    let addr = key.addr;
    let timeout = settings.connect_timeout;
    let tcp = match tokio::time::timeout(
        timeout,
        hostmesh_api::connect::connect_marked(addr, settings.mark),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(TunnelError::Connect { addr, source }),
        Err(_) => {
            return Err(TunnelError::ConnectTimeout {
                addr,
                ms: timeout.as_millis(),
            });
        }
    };
    let _ = tcp.set_nodelay(true);
    set_congestion(&tcp, settings.congestion.as_deref());
    let server_name = hostmesh_api::tls::server_name_for(&key.identity);
    let handshake = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, readahead::ReadAhead::new(tcp));
    let mut tls = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(TunnelError::Handshake {
                addr,
                identity: key.identity.to_string(),
                detail: e.to_string(),
            });
        }
        Err(_) => {
            return Err(TunnelError::Handshake {
                addr,
                identity: key.identity.to_string(),
                detail: format!("no handshake within {}ms", timeout.as_millis()),
            });
        }
    };
    tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
    Ok(tls)
}

/// Sets a tunnel socket's TCP congestion control (`proxy.tunnel_congestion`
/// in meshd.toml); on failure the system's default stays, with a warning.
pub fn set_congestion(socket: &tokio::net::TcpStream, name: Option<&str>) {
    if let Some(name) = name
        && let Err(e) = socket2::SockRef::from(socket).set_tcp_congestion(name.as_bytes())
    {
        tracing::warn!(congestion = name, error = %e, "could not set a tunnel socket's congestion control; the system default stays");
    }
}

/// The tunnel clients.
pub struct Tunnels {
    pub h2: Arc<hbone::Pool>,
    /// Dedicated connections over TCP, where the peer offers them (None:
    /// HTTP/2 only, `proxy.tcp_tunnels = "multiplexed"`).
    pub dedicated: Option<Arc<dedicated::DedicatedPool>>,
    pub quic: Option<Arc<quic::QuicPool>>,
}

impl Tunnels {
    /// Opens a stream to `authority` through the tunnel to `key`, over QUIC
    /// when `mode` asks for it and the peer offers it (falling back to TCP
    /// when QUIC gets no answer, for this stream too unless its first bytes
    /// may have reached the peer; see [`quic::QuicPool::open`]), else over
    /// TCP: on a dedicated connection unless the peer only speaks HTTP/2.
    ///
    /// `early` is what the app has already sent: it follows the request at
    /// once instead of a round trip later, when the answer comes (see
    /// [`hbone::Pool::open`]). Every attempt sends it again.
    pub async fn open(
        &self,
        key: &PeerKey,
        peer_offers_quic: bool,
        mode: Transport,
        authority: &str,
        service: &str,
        early: &[Bytes],
    ) -> Result<Stream, TunnelError> {
        if let Some(q) = &self.quic {
            let want_quic = mode != Transport::Tcp && peer_offers_quic;
            if want_quic && !q.is_broken(key.addr) {
                match q.open(key, authority, service, early).await {
                    Ok(s) => return Ok(Stream::Quic(s)),
                    Err(e) if !q.is_broken(key.addr) => return Err(e.error),
                    // The peer's QUIC went unanswered. This stream goes
                    // over TCP unless the app's bytes may have reached the
                    // peer's app already (sent on a path that lost only
                    // the answers): those are never sent twice.
                    Err(e) if e.sent && !early.is_empty() => {
                        tracing::warn!(peer = %key.addr, error = %e, "QUIC to peer failed; using TCP for its next streams");
                        return Err(e.error);
                    }
                    Err(e) => {
                        tracing::warn!(peer = %key.addr, error = %e, "QUIC to peer failed; using TCP for it");
                    }
                }
            }
        }
        if let Some(d) = &self.dedicated
            && !d.h2_only(key.addr)
        {
            match d.open(key, authority, service, early).await {
                Ok(s) => return Ok(Stream::Dedicated(s)),
                Err(dedicated::OpenError::Failed(e)) => return Err(e),
                Err(dedicated::OpenError::NotOffered) => {}
            }
        }
        self.h2
            .open(key, authority, service, early)
            .await
            .map(Stream::H2)
    }
}

#[cfg(test)]
mod peer_transport_tests {
    use super::{PeerTransports, Transport, TransportChoice};
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_host_decides_over_the_mesh_and_a_peer_entry_over_a_setting() {
        use Transport::{Auto, Quic, Tcp};
        let host_peers = PeerTransports::new([("10.20.0.7", Tcp)]).unwrap();
        let mesh_peers =
            PeerTransports::new([("10.20.0.0/16", Quic), ("10.30.0.0/16", Auto)]).unwrap();
        let none = PeerTransports::default();
        let choice = |hp: &PeerTransports, host, mp: &PeerTransports, mesh| {
            let c = TransportChoice {
                host_peers: hp,
                host,
                mesh_peers: mp,
                mesh,
            };
            (
                c.for_peer(ip("10.20.0.7")),
                c.for_peer(ip("10.20.0.8")),
                c.for_peer(ip("10.30.0.1")),
                c.for_peer(ip("10.40.0.1")),
                c.default(),
                c.mesh_peers_apply(),
            )
        };
        // Nothing set: TCP.
        assert_eq!(
            choice(&none, None, &none, None),
            (Tcp, Tcp, Tcp, Tcp, Tcp, false)
        );
        // The mesh's rules over the mesh's setting.
        assert_eq!(
            choice(&none, None, &mesh_peers, Some(Tcp)),
            (Quic, Quic, Auto, Tcp, Tcp, true)
        );
        // The host's per-peer entry over the mesh's rules.
        assert_eq!(
            choice(&host_peers, None, &mesh_peers, None),
            (Tcp, Quic, Auto, Tcp, Tcp, true)
        );
        // The host's setting over everything the mesh says.
        assert_eq!(
            choice(&none, Some(Tcp), &mesh_peers, Some(Quic)),
            (Tcp, Tcp, Tcp, Tcp, Tcp, false)
        );
        // And its per-peer entries over its own setting.
        assert_eq!(
            choice(&host_peers, Some(Quic), &mesh_peers, None),
            (Tcp, Quic, Quic, Quic, Quic, false)
        );
    }

    #[test]
    fn the_most_specific_network_decides_whatever_the_order() {
        let entries = [
            ("10.0.0.0/8", Transport::Tcp),
            ("10.20.0.7", Transport::Tcp),
            ("10.20.0.0/16", Transport::Quic),
            ("fd00::/8", Transport::Auto),
        ];
        for order in [entries.to_vec(), entries.iter().rev().copied().collect()] {
            let t = PeerTransports::new(order).unwrap();
            assert_eq!(t.for_peer(ip("10.20.3.4")), Some(Transport::Quic));
            assert_eq!(t.for_peer(ip("10.20.0.7")), Some(Transport::Tcp));
            assert_eq!(t.for_peer(ip("10.9.9.9")), Some(Transport::Tcp));
            assert_eq!(t.for_peer(ip("192.168.1.1")), None);
            assert_eq!(t.for_peer(ip("fd00::1")), Some(Transport::Auto));
            // A peer seen through a dual-stack socket.
            assert_eq!(t.for_peer(ip("::ffff:10.20.3.4")), Some(Transport::Quic));
        }
        let mapped = PeerTransports::new([("::ffff:10.30.0.0/112", Transport::Quic)]).unwrap();
        // Listed for `meshd status` most specific first.
        let t = PeerTransports::new(entries).unwrap();
        assert_eq!(
            t.entries()
                .map(|(n, t)| format!("{n} {}", t.name()))
                .collect::<Vec<_>>(),
            [
                "10.20.0.7/32 tcp",
                "10.20.0.0/16 quic",
                "10.0.0.0/8 tcp",
                "fd00::/8 auto"
            ]
        );
        assert_eq!(mapped.for_peer(ip("10.30.1.2")), Some(Transport::Quic));
        assert!(PeerTransports::new([]).unwrap().is_empty());
    }

    #[test]
    fn a_lower_rank_wins_over_a_longer_prefix_and_the_first_of_a_network_twice() {
        use Transport::{Auto, Quic, Tcp};
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let t = PeerTransports::ranked(vec![
            (net("10.20.0.5/32"), Tcp, 0),
            (net("10.30.0.0/16"), Quic, 0),
            (net("10.30.7.0/24"), Auto, 1),
            (net("10.20.0.0/16"), Quic, 1),
            (net("10.30.0.0/16"), Tcp, 2),
            (net("0.0.0.0/0"), Auto, 3),
        ]);
        assert_eq!(
            t.for_peer(ip("10.30.7.1")),
            Some(Quic),
            "rank 0 over a /24 of rank 1"
        );
        assert_eq!(t.for_peer(ip("10.20.0.5")), Some(Tcp));
        assert_eq!(t.for_peer(ip("10.20.0.6")), Some(Quic));
        assert_eq!(t.for_peer(ip("192.0.2.1")), Some(Auto));
        assert_eq!(t.for_peer(ip("::ffff:10.30.1.1")), Some(Quic));
        assert_eq!(t.for_peer(ip("fd00::1")), None);
        assert_eq!(
            t.entries()
                .map(|(n, t)| format!("{n} {}", t.name()))
                .collect::<Vec<_>>(),
            [
                "10.20.0.5/32 tcp",
                "10.30.0.0/16 quic",
                "10.30.7.0/24 auto",
                "10.20.0.0/16 quic",
                "0.0.0.0/0 auto"
            ]
        );
        // Many networks of a few lengths: each looked up by its own.
        let many: Vec<_> = (0..4096u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8));
                (
                    ipnet::IpNet::V4(ipnet::Ipv4Net::new(a, 24).unwrap()),
                    Quic,
                    i / 256,
                )
            })
            .collect();
        let t = PeerTransports::ranked(many);
        assert_eq!(t.for_peer(ip("10.15.255.9")), Some(Quic));
        assert_eq!(t.for_peer(ip("10.16.0.9")), None);
    }

    #[test]
    fn bad_entries_are_named_with_what_is_wrong() {
        let err = |key: &'static str| PeerTransports::new([(key, Transport::Quic)]).unwrap_err();
        let e = err("db-1");
        assert!(
            e.contains("\"db-1\" is neither an address nor a network"),
            "{e}"
        );
        let e = err("10.0.0.0/33");
        assert!(e.contains("\"10.0.0.0/33\""), "{e}");
        let e = err("10.20.0.7/16");
        assert!(
            e.contains("past its prefix") && e.contains("10.20.0.0/16"),
            "{e}"
        );
        let e = PeerTransports::new([
            ("10.0.0.1", Transport::Quic),
            ("10.0.0.1/32", Transport::Tcp),
        ])
        .unwrap_err();
        assert!(e.contains("are the same network"), "{e}");
    }
}
