//! The controller's gRPC port: TLS terminated here (rustls, TLS 1.3), then
//! tonic over the decrypted streams.
//!
//! Client certificates are optional at the TLS layer, because joining
//! hosts have none yet; each RPC then decides who may call it:
//! - Operator: the admin identity (`ns/hostmesh-system/sa/admin`).
//! - Identity.GetTrustBundle and Identity.Join: anyone (Join needs a token).
//! - Identity.Renew and Hosts.Session: a host certificate, whose SPIFFE ID
//!   names the host's group and whose common name is its host ID.
//!
//! The server certificate and trust bundle are swapped in place when the CA
//! rotates; connections already open carry on.

pub mod hosts;
pub mod identity;
pub mod operator;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hostmesh_api::pki::CertInfo;
use hostmesh_api::spiffe::SpiffeId;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::server::Connected;

/// Who is on the other end of a connection, read once at handshake.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    pub identity: Option<PeerIdentity>,
}

#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub spiffe_id: SpiffeId,
    /// The host ID for host certificates.
    pub common_name: String,
    pub not_after_unix: i64,
}

pub struct TlsConn {
    io: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    fn new(io: TlsStream<TcpStream>, remote: SocketAddr) -> TlsConn {
        let (_, conn) = io.get_ref();
        let identity = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| CertInfo::parse(leaf).ok())
            .and_then(|info| {
                Some(PeerIdentity {
                    spiffe_id: info.spiffe_id?,
                    common_name: info.common_name.unwrap_or_default(),
                    not_after_unix: info.not_after_unix,
                })
            });
        TlsConn {
            io,
            info: PeerInfo { remote, identity },
        }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The TLS config new connections get; replaced on CA changes.
#[derive(Clone)]
pub struct SwappableServerConfig(Arc<RwLock<Arc<ServerConfig>>>);

impl SwappableServerConfig {
    pub fn new(config: ServerConfig) -> SwappableServerConfig {
        SwappableServerConfig(Arc::new(RwLock::new(Arc::new(config))))
    }

    pub fn replace(&self, config: ServerConfig) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Arc::new(config);
        }
    }

    fn current(&self) -> Arc<ServerConfig> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP, does TLS handshakes in their own tasks (a slow client never
/// stalls the accept loop), and yields finished connections.
pub fn tls_incoming(
    listener: TcpListener,
    config: SwappableServerConfig,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => break,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn::new(tls, remote))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

pub fn peer_of<T>(req: &tonic::Request<T>) -> Result<PeerInfo, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::internal("connection has no peer information"))
}

/// The caller must present the admin credential.
pub fn require_admin<T>(req: &tonic::Request<T>, trust_domain: &str) -> Result<PeerInfo, Status> {
    let peer = peer_of(req)?;
    match &peer.identity {
        Some(id) if id.spiffe_id == SpiffeId::admin(trust_domain) => Ok(peer),
        Some(id) => Err(Status::permission_denied(format!(
            "{} may not use the operator API; use the admin credential (admin.conf)",
            id.spiffe_id
        ))),
        None => Err(Status::unauthenticated(
            "the operator API needs the admin credential: pass --credentials FILE, set HOSTMESH_CREDENTIALS, \
             or copy admin.conf from the controller's data directory to /etc/hostmesh/admin.conf",
        )),
    }
}

/// A host, as its certificate says.
#[derive(Clone, Debug)]
pub struct HostPeer {
    pub host_id: String,
    pub spiffe_id: SpiffeId,
    pub remote: SocketAddr,
    pub cert_not_after_unix: i64,
}

pub fn require_host<T>(req: &tonic::Request<T>, trust_domain: &str) -> Result<HostPeer, Status> {
    let peer = peer_of(req)?;
    let Some(id) = peer.identity else {
        return Err(Status::unauthenticated(
            "a host certificate is needed; run `meshd join` first",
        ));
    };
    if id.spiffe_id.trust_domain() != trust_domain
        || id.spiffe_id.is_system()
        || id.common_name.is_empty()
    {
        return Err(Status::permission_denied(format!(
            "{} is not a host identity of this mesh",
            id.spiffe_id
        )));
    }
    Ok(HostPeer {
        host_id: id.common_name,
        spiffe_id: id.spiffe_id,
        remote: peer.remote,
        cert_not_after_unix: id.not_after_unix,
    })
}
