//! The tunnel server on TCP 15008: TLS (a client certificate of the trust
//! domain is required), then HTTP/2; each CONNECT stream is handed to the
//! inbound proxy with the caller's verified identity. TLS handshakes run in
//! their own tasks so a slow or hostile client never stalls accepting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use hostmesh_api::spiffe::SpiffeId;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;

use super::TlsConfigs;
use crate::drain::Drain;
use crate::workers::Workers;

/// One CONNECT request from a peer host.
pub struct InboundRequest {
    pub peer_identity: SpiffeId,
    pub peer_addr: SocketAddr,
    /// The CONNECT target, `ip:port` of this host's app.
    pub authority: String,
    /// What the caller says it was connecting to (informational).
    pub service: String,
    pub stream: InboundStream,
}

/// The stream a request came on, before it is answered.
pub enum InboundStream {
    H2 {
        recv: h2::RecvStream,
        respond: h2::server::SendResponse<Bytes>,
    },
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Dedicated(Box<super::dedicated::Halves>),
}

impl InboundStream {
    pub fn transport(&self) -> &'static str {
        match self {
            InboundStream::H2 { .. } => "tcp",
            InboundStream::Quic { .. } => "quic",
            InboundStream::Dedicated(_) => "tcp",
        }
    }

    /// Answers with an error status and ends the stream.
    pub async fn refuse(self, code: u16) {
        match self {
            InboundStream::H2 { mut respond, .. } => {
                let _ = respond.send_response(status(code), true);
            }
            InboundStream::Quic { mut send, .. } => {
                let _ = super::quic::write_status(&mut send, code).await;
                let _ = send.finish();
            }
            InboundStream::Dedicated(mut h) => {
                // The connection closes with it (the caller drops its
                // early bytes).
                let _ = h.conn.write_status(code).await;
            }
        }
    }

    /// Answers 200 and returns the stream for splicing.
    pub async fn accept(self) -> Result<super::splice::Halves, String> {
        match self {
            InboundStream::H2 { recv, mut respond } => {
                // A caller that stopped waiting for the answer has reset the
                // stream and may be sending its first bytes (already
                // buffered here) to another endpoint: they must not reach
                // this app as well.
                let reset =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(respond.poll_reset(cx))).await;
                if let std::task::Poll::Ready(r) = reset {
                    return Err(match r {
                        Ok(reason) => format!("the caller reset the stream ({reason:?})"),
                        Err(e) => format!("the stream is gone: {e}"),
                    });
                }
                let send = respond
                    .send_response(status(200), false)
                    .map_err(|e| e.to_string())?;
                Ok(super::splice::Halves::H2(send, recv))
            }
            InboundStream::Quic { mut send, recv } => {
                super::quic::write_status(&mut send, 200).await?;
                Ok(super::splice::Halves::Quic(send, recv))
            }
            InboundStream::Dedicated(mut h) => {
                // As for HTTP/2: a caller that gave up (closed the
                // connection) may be sending its first bytes elsewhere.
                if h.conn.caller_gave_up() {
                    return Err("the caller closed the connection".to_string());
                }
                h.conn.write_status(200).await.map_err(|e| e.to_string())?;
                Ok(super::splice::Halves::Dedicated(*h))
            }
        }
    }
}

pub type Handler = Arc<dyn Fn(InboundRequest) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub handshake_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_streams: u32,
    /// TCP congestion control of tunnel sockets (None: the system's).
    pub congestion: Option<String>,
    /// A dedicated connection waiting this long for its next stream is
    /// closed (longer than the client's idle timeout, so the client, which
    /// knows whether it still wants it, usually closes it first).
    pub dedicated_idle: Duration,
    /// Offer dedicated connections (`proxy.tcp_tunnels = "dedicated"`).
    pub offer_dedicated: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            handshake_timeout: Duration::from_secs(10),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 64 * 1024,
            max_streams: 1000,
            congestion: None,
            dedicated_idle: Duration::from_secs(600),
            offer_dedicated: true,
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    workers: Workers,
    tls: Arc<TlsConfigs>,
    settings: ServerSettings,
    handler: Handler,
    mut drain: Drain,
    handshake_failures: Counter,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return,
        };
        let _ = tcp.set_nodelay(true);
        super::set_congestion(&tcp, settings.congestion.as_deref());
        // The dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let tls = tls.clone();
        let settings = settings.clone();
        let handler = handler.clone();
        let drain = drain.clone();
        let failures = handshake_failures.clone();
        workers.dispatch(tcp, move |tcp| async move {
            let acceptor =
                tokio_rustls::TlsAcceptor::from(tls.server_offering(settings.offer_dedicated));
            let mut stream = match tokio::time::timeout(
                settings.handshake_timeout,
                acceptor.accept(super::readahead::ReadAhead::new(tcp)),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    failures.inc();
                    tracing::info!(peer = %remote, error = %e, "tunnel TLS handshake refused");
                    return;
                }
                Err(_) => {
                    failures.inc();
                    tracing::info!(peer = %remote, "tunnel TLS handshake timed out");
                    return;
                }
            };
            stream
                .get_mut()
                .1
                .set_buffer_limit(Some(super::TLS_SEND_BUFFER));
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(hostmesh_api::tls::spiffe_id_of);
            let Some(identity) = identity else {
                // The verifier requires one; this is a belt-and-braces check.
                failures.inc();
                return;
            };
            if stream.get_ref().1.alpn_protocol() == Some(super::dedicated::ALPN) {
                super::dedicated::keepalive(stream.get_ref().0.get_ref());
                let gauge = stream.get_ref().0.gauge();
                let conn = super::dedicated::TunnelConn::new(Box::new(stream), gauge);
                let idle = settings.dedicated_idle;
                super::dedicated::serve(conn, remote, identity, handler, drain, idle).await;
                return;
            }
            serve_connection(stream, remote, identity, settings, handler, drain).await;
        });
    }
}

async fn serve_connection<T>(
    io: T,
    remote: SocketAddr,
    identity: SpiffeId,
    settings: ServerSettings,
    handler: Handler,
    mut drain: Drain,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_streams)
        .max_send_buffer_size(1024 * 1024);
    let mut conn = match builder.handshake::<_, Bytes>(io).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(peer = %remote, error = %e, "tunnel HTTP/2 handshake failed");
            return;
        }
    };
    let mut draining = false;
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            _ = drain.signaled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { return };
        let (request, mut respond) = match next {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(peer = %remote, error = %e, "tunnel connection error");
                return;
            }
        };
        if request.method() != http::Method::CONNECT {
            let _ = respond.send_response(status(405), true);
            continue;
        }
        let Some(authority) = request.uri().authority().map(|a| a.to_string()) else {
            let _ = respond.send_response(status(400), true);
            continue;
        };
        let service = request
            .headers()
            .get("x-hostmesh-service")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect())
            .unwrap_or_default();
        let req = InboundRequest {
            peer_identity: identity.clone(),
            peer_addr: remote,
            authority,
            service,
            stream: InboundStream::H2 {
                recv: request.into_body(),
                respond,
            },
        };
        // Never handled inline: accept() drives the whole connection.
        tokio::spawn((handler)(req));
    }
}

pub fn status(code: u16) -> http::Response<()> {
    let mut r = http::Response::new(());
    *r.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// The QUIC tunnel server: accepts connections on `endpoint`, reads each
/// stream's CONNECT header, and hands it to `handler` like the TCP server.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    handler: Handler,
    mut drain: Drain,
    handshake_failures: Counter,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
            _ = drain.signaled() => {
                // Refuse new connections; open ones finish their streams.
                endpoint.set_server_config(None);
                return;
            }
        };
        let handler = handler.clone();
        let failures = handshake_failures.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
            let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    failures.inc();
                    tracing::info!(peer = %remote, error = %e, "QUIC tunnel handshake refused");
                    return;
                }
                Err(_) => {
                    failures.inc();
                    return;
                }
            };
            let identity = conn
                .peer_identity()
                .and_then(|any| {
                    any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|certs| certs.first().and_then(hostmesh_api::tls::spiffe_id_of));
            let Some(identity) = identity else {
                failures.inc();
                conn.close(quinn::VarInt::from_u32(2), b"no identity");
                return;
            };
            loop {
                let (send, mut recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                if drain.is_draining() {
                    return;
                }
                let handler = handler.clone();
                let identity = identity.clone();
                tokio::spawn(async move {
                    let header = tokio::time::timeout(
                        Duration::from_secs(10),
                        super::quic::read_request(&mut recv),
                    )
                    .await;
                    let (authority, service) = match header {
                        Ok(Ok(h)) => h,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %remote, error = %e, "bad QUIC tunnel header");
                            return;
                        }
                        Err(_) => return,
                    };
                    let req = InboundRequest {
                        peer_identity: identity,
                        peer_addr: remote,
                        authority,
                        service,
                        stream: InboundStream::Quic { send, recv },
                    };
                    (handler)(req).await;
                });
            }
        });
    }
}
