//! The one way hostmesh clients (meshctl, meshd) reach the controller:
//! gRPC over TLS 1.3 with our own connector, checking that the server holds
//! the controller's SPIFFE identity under the given roots, and optionally
//! presenting a client certificate. Connections open lazily and reopen
//! after failures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::spiffe::SpiffeId;
use crate::tls::{self, Expect, SpiffeServerVerifier, SwappableCert, TrustBundle};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("controller URL {url:?}: {message}")]
    BadUrl { url: String, message: String },
    #[error("{0}")]
    Tls(String),
}

/// Marks sockets so meshd's own traffic is never captured (None: no mark).
pub type SocketMark = Option<u32>;

/// host:port of an https URL.
pub fn parse_url(url: &str) -> Result<(String, u16), ConnectError> {
    let bad = |message: &str| ConnectError::BadUrl {
        url: url.to_string(),
        message: message.to_string(),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    let uri: Uri = format!("https://{authority}")
        .parse()
        .map_err(|_| bad("is not a URL"))?;
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(15012);
    Ok((host, port))
}

/// A lazily connecting channel to `url`, with `client_cert` (if any) and
/// the server checked as the controller of `bundle`'s trust domain.
pub fn channel(
    url: &str,
    bundle: TrustBundle,
    client_cert: Option<Arc<SwappableCert>>,
    mark: SocketMark,
) -> Result<Channel, ConnectError> {
    let controller = SpiffeId::controller(&bundle.trust_domain);
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle,
        Expect::Exactly(controller.clone()),
    ));
    channel_with_verifier(url, verifier, client_cert, mark, &controller)
}

/// Like [`channel`], with any server verifier (`meshd join` fetches the
/// bundle through one that only records what the server presents).
pub fn channel_with_verifier(
    url: &str,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    client_cert: Option<Arc<SwappableCert>>,
    mark: SocketMark,
    controller: &SpiffeId,
) -> Result<Channel, ConnectError> {
    let (host, port) = parse_url(url)?;
    let config = tls::client_config(verifier, client_cert, &[tls::ALPN_H2])
        .map_err(|e| ConnectError::Tls(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = tls::server_name_for(controller);
    // TLS is done by the connector below; tonic refuses an https:// URI
    // when its own TLS is not built in, and the scheme is only a header.
    let endpoint = Endpoint::from_shared(format!("http://{}", authority(&host, port)))
        .map_err(|e| ConnectError::BadUrl {
            url: url.to_string(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let host = host.clone();
        async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect();
            let mut last = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} has no address"),
            );
            for addr in addrs {
                match connect_marked(addr, mark).await {
                    Ok(tcp) => {
                        tcp.set_nodelay(true)?;
                        let tls = connector.connect(server_name.clone(), tcp).await?;
                        return Ok::<_, std::io::Error>(TokioIo::new(tls));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }));
    Ok(channel)
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A TCP connection from a socket carrying `mark` (SO_MARK needs
/// CAP_NET_ADMIN).
pub async fn connect_marked(
    addr: SocketAddr,
    mark: SocketMark,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_port_and_ipv6() {
        assert_eq!(
            parse_url("https://ctl:15012").unwrap(),
            ("ctl".to_string(), 15012)
        );
        assert_eq!(
            parse_url("https://10.0.0.1").unwrap(),
            ("10.0.0.1".to_string(), 15012)
        );
        assert_eq!(
            parse_url("https://[::1]:9000/").unwrap(),
            ("::1".to_string(), 9000)
        );
        assert!(
            parse_url("http://ctl:15012")
                .unwrap_err()
                .to_string()
                .contains("must start with https://")
        );
        assert!(parse_url("https://").is_err());
    }
}
