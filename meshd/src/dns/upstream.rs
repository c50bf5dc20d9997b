//! Forwarding questions to the host's resolvers over marked sockets.
//!
//! Each attempt uses a fresh socket: the kernel picks a random source port,
//! the query carries a random ID, and a UDP reply counts only if it comes
//! from the upstream (the socket is connected), carries that ID and echoes
//! the question; anything else is ignored until the timeout. This is
//! simpler than hickory-resolver's client (which would also re-cache,
//! re-order upstreams and answer `localhost` itself) and relays the
//! upstream's response exactly.
//!
//! When a firewall mark is configured every socket gets it (`SO_MARK`)
//! before it sends anything, so nftables does not redirect meshd's own
//! queries back to meshd. Failure to set it fails the attempt: sending
//! unmarked would loop.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, UdpSocket},
};

use super::DnsMetrics;

/// The EDNS payload size we advertise upstream (DNS Flag Day 2020).
pub(crate) const UPSTREAM_PAYLOAD: u16 = 1232;

/// Why an upstream gave no usable answer. Every variant is the upstream's
/// fault (or the path to it); trying the next upstream may help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("no upstream resolvers configured")]
    NoUpstreams,
    #[error("{server} over {transport}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        transport: &'static str,
        timeout: Duration,
    },
    #[error("{server} over {transport}: {source}")]
    Io {
        server: SocketAddr,
        transport: &'static str,
        source: io::Error,
    },
    #[error("{server} over {transport}: malformed response: {reason}")]
    Malformed {
        server: SocketAddr,
        transport: &'static str,
        reason: String,
    },
    #[error("{server} answered {rcode}")]
    Rcode {
        server: SocketAddr,
        rcode: ResponseCode,
    },
}

impl UpstreamError {
    /// The `reason` label of `upstream_failures_total`.
    fn reason(&self) -> &'static str {
        match self {
            UpstreamError::NoUpstreams => "no_upstreams",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Io { .. } => "io",
            UpstreamError::Malformed { .. } => "malformed",
            UpstreamError::Rcode { .. } => "rcode",
        }
    }
}

/// The upstream resolvers, tried in order.
#[derive(Debug)]
pub(crate) struct Upstreams {
    servers: Vec<SocketAddr>,
    mark: Option<u32>,
    /// Per attempt and transport.
    timeout: Duration,
    metrics: DnsMetrics,
}

impl Upstreams {
    pub(crate) fn new(
        servers: Vec<SocketAddr>,
        mark: Option<u32>,
        timeout: Duration,
        metrics: DnsMetrics,
    ) -> Self {
        Upstreams {
            servers,
            mark,
            timeout,
            metrics,
        }
    }

    /// Resolves `question` through the first upstream that answers with
    /// anything but SERVFAIL, REFUSED, NOTIMP or FORMERR.
    pub(crate) async fn resolve(
        &self,
        question: &Query,
        checking_disabled: bool,
        dnssec_ok: bool,
    ) -> Result<Message, UpstreamError> {
        let mut last = UpstreamError::NoUpstreams;
        if self.servers.is_empty() {
            self.metrics.upstream_failure(last.reason());
        }
        for &server in &self.servers {
            match self
                .resolve_with(server, question, checking_disabled, dnssec_ok)
                .await
            {
                Ok(response) => return Ok(response),
                Err(error) => {
                    tracing::debug!(%error, question = %question, "upstream attempt failed");
                    self.metrics.upstream_failure(error.reason());
                    last = error;
                }
            }
        }
        Err(last)
    }

    async fn resolve_with(
        &self,
        server: SocketAddr,
        question: &Query,
        checking_disabled: bool,
        dnssec_ok: bool,
    ) -> Result<Message, UpstreamError> {
        let mut query = Message::query();
        query.add_query(question.clone());
        query.metadata.recursion_desired = true;
        query.metadata.checking_disabled = checking_disabled;
        let mut edns = Edns::new();
        edns.set_max_payload(UPSTREAM_PAYLOAD)
            .set_dnssec_ok(dnssec_ok);
        query.set_edns(edns);

        let mut response = self.exchange(server, &query).await?;
        if response.metadata.response_code == ResponseCode::FormErr {
            // An old server that does not speak EDNS: once more without it.
            query.edns = None;
            response = self.exchange(server, &query).await?;
        }
        match response.metadata.response_code {
            rcode @ (ResponseCode::ServFail
            | ResponseCode::Refused
            | ResponseCode::NotImp
            | ResponseCode::FormErr) => Err(UpstreamError::Rcode { server, rcode }),
            _ => Ok(response),
        }
    }

    /// One question to one server: UDP, then TCP if the answer was truncated.
    async fn exchange(
        &self,
        server: SocketAddr,
        query: &Message,
    ) -> Result<Message, UpstreamError> {
        let wire = query.to_vec().map_err(|e| UpstreamError::Malformed {
            server,
            transport: "udp",
            reason: format!("encoding the query: {e}"),
        })?;
        let started = Instant::now();
        let response = self
            .with_timeout(server, "udp", self.udp_exchange(server, &wire, query))
            .await?;
        if !response.metadata.truncation {
            self.metrics
                .upstream_latency("udp", started.elapsed().as_secs_f64());
            return Ok(response);
        }
        let started = Instant::now();
        let response = self
            .with_timeout(server, "tcp", self.tcp_exchange(server, &wire, query))
            .await?;
        self.metrics
            .upstream_latency("tcp", started.elapsed().as_secs_f64());
        Ok(response)
    }

    async fn with_timeout(
        &self,
        server: SocketAddr,
        transport: &'static str,
        exchange: impl Future<Output = Result<Message, UpstreamError>>,
    ) -> Result<Message, UpstreamError> {
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(UpstreamError::Timeout {
                server,
                transport,
                timeout: self.timeout,
            }))
    }

    async fn udp_exchange(
        &self,
        server: SocketAddr,
        wire: &[u8],
        query: &Message,
    ) -> Result<Message, UpstreamError> {
        let io_error = |source| UpstreamError::Io {
            server,
            transport: "udp",
            source,
        };
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await.map_err(io_error)?;
        if let Some(mark) = self.mark {
            SockRef::from(&socket).set_mark(mark).map_err(io_error)?;
        }
        socket.connect(server).await.map_err(io_error)?;
        socket.send(wire).await.map_err(io_error)?;
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let n = socket.recv(&mut buf).await.map_err(io_error)?;
            match Message::from_vec(&buf[..n]) {
                Ok(response) if is_response_to(&response, query) => return Ok(response),
                // A stray or forged datagram: keep waiting for the real one.
                Ok(_) => {
                    tracing::debug!(%server, "ignoring a UDP response not matching the query")
                }
                Err(error) => {
                    tracing::debug!(%server, %error, "ignoring an undecodable UDP response")
                }
            }
        }
    }

    async fn tcp_exchange(
        &self,
        server: SocketAddr,
        wire: &[u8],
        query: &Message,
    ) -> Result<Message, UpstreamError> {
        let io_error = |source| UpstreamError::Io {
            server,
            transport: "tcp",
            source,
        };
        let socket = match server {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(io_error)?;
        if let Some(mark) = self.mark {
            SockRef::from(&socket).set_mark(mark).map_err(io_error)?;
        }
        let mut stream = socket.connect(server).await.map_err(io_error)?;
        stream.set_nodelay(true).map_err(io_error)?;

        let length = u16::try_from(wire.len()).map_err(|_| UpstreamError::Malformed {
            server,
            transport: "tcp",
            reason: "query longer than 65535 bytes".to_owned(),
        })?;
        let mut framed = Vec::with_capacity(wire.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(wire);
        stream.write_all(&framed).await.map_err(io_error)?;

        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await.map_err(io_error)?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut body).await.map_err(io_error)?;
        let malformed = |reason: String| UpstreamError::Malformed {
            server,
            transport: "tcp",
            reason,
        };
        let response = Message::from_vec(&body).map_err(|e| malformed(e.to_string()))?;
        if !is_response_to(&response, query) {
            return Err(malformed("response does not match the query".to_owned()));
        }
        Ok(response)
    }
}

/// Whether `response` answers `query`: same ID, a response, and the same
/// single question (names compared case-insensitively).
pub(crate) fn is_response_to(response: &Message, query: &Message) -> bool {
    response.metadata.message_type == MessageType::Response
        && response.metadata.id == query.metadata.id
        && response.metadata.op_code == OpCode::Query
        && response.queries.len() == 1
        && query.queries.len() == 1
        && response.queries[0].name() == query.queries[0].name()
        && response.queries[0].query_type() == query.queries[0].query_type()
        && response.queries[0].query_class() == query.queries[0].query_class()
}

/// Checks once, at start, that the mark can be set, so a missing
/// capability is a start-up error and not a SERVFAIL on every query.
pub(crate) fn check_mark(mark: u32) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    SockRef::from(&socket).set_mark(mark)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str) -> Message {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m
    }

    #[test]
    fn response_must_match_id_type_and_question() {
        let q = query("Example.com.");
        let mut r = q.clone();
        r.metadata.message_type = MessageType::Response;
        assert!(is_response_to(&r, &q));

        let mut lower = r.clone();
        lower.queries[0].set_name(Name::from_ascii("example.COM.").unwrap());
        assert!(is_response_to(&lower, &q));

        let mut other_id = r.clone();
        other_id.metadata.id = q.metadata.id.wrapping_add(1);
        assert!(!is_response_to(&other_id, &q));

        let mut not_response = r.clone();
        not_response.metadata.message_type = MessageType::Query;
        assert!(!is_response_to(&not_response, &q));

        let mut other_name = r.clone();
        other_name.queries[0].set_name(Name::from_ascii("example.org.").unwrap());
        assert!(!is_response_to(&other_name, &q));

        let mut other_type = r.clone();
        other_type.queries[0].set_query_type(RecordType::AAAA);
        assert!(!is_response_to(&other_type, &q));

        let mut no_question = r;
        no_question.queries.clear();
        assert!(!is_response_to(&no_question, &q));
    }
}
