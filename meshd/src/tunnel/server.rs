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

/// One CONNECT request from a peer host.
pub struct InboundRequest {
    pub peer_identity: SpiffeId,
    pub peer_addr: SocketAddr,
    /// The CONNECT target, `ip:port` of this host's app.
    pub authority: String,
    /// What the caller says it was connecting to (informational).
    pub service: String,
    pub recv: h2::RecvStream,
    pub respond: h2::server::SendResponse<Bytes>,
}

pub type Handler = Arc<dyn Fn(InboundRequest) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub handshake_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_streams: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            handshake_timeout: Duration::from_secs(10),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 64 * 1024,
            max_streams: 1000,
        }
    }
}

pub async fn serve(
    listener: TcpListener,
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
        // The dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let tls = tls.clone();
        let settings = settings.clone();
        let handler = handler.clone();
        let drain = drain.clone();
        let failures = handshake_failures.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server());
            let stream = match tokio::time::timeout(
                settings.handshake_timeout,
                acceptor.accept(tcp),
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
            recv: request.into_body(),
            respond,
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
