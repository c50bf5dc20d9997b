//! The tunnel client: pooled HTTP/2 connections over TLS to peer hosts,
//! one CONNECT stream per application connection.
//!
//! Per peer (address and expected identity) the pool keeps up to
//! `max_connections` connections and opens a stream on the least busy one;
//! a new connection is dialled only when every existing one carries
//! `streams_per_connection` streams. Dials to one peer are serialised, so a
//! burst of new application connections causes one TLS handshake, not a
//! thundering herd. A connection that fails (reset, GOAWAY, a CONNECT that
//! goes unanswered) is dropped from the pool and the stream is tried once
//! more on a fresh connection. [`Pool::sweep`] (every 30 s in meshd) closes
//! connections that carried no stream for `idle_timeout` and forgets peers
//! left with none, so hosts that come and go leave nothing behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;

use super::{PeerKey, TlsConfigs, TunnelError};

#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_connections: usize,
    pub streams_per_connection: usize,
    pub mark: Option<u32>,
    /// HTTP/2 windows: large, so one stream can fill a fast link.
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// A connection that carried no stream for this long is closed.
    pub idle_timeout: Duration,
    /// TCP congestion control of tunnel sockets (None: the system's).
    pub congestion: Option<String>,
    /// Dedicated connections ([`super::dedicated`]) kept open per peer
    /// between streams.
    pub max_idle_per_peer: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            connect_timeout: Duration::from_secs(1),
            max_connections: 4,
            streams_per_connection: 100,
            mark: None,
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 64 * 1024,
            idle_timeout: Duration::from_secs(300),
            congestion: None,
            max_idle_per_peer: 128,
        }
    }
}

/// Milliseconds on a process-wide monotonic clock.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub struct Conn {
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    dead: Arc<AtomicBool>,
    /// When the last stream ended ([`now_ms`]); meaningful while idle.
    idle_since_ms: AtomicU64,
}

#[derive(Default)]
struct Peer {
    dial: tokio::sync::Mutex<()>,
    conns: Mutex<Vec<Arc<Conn>>>,
}

/// An open tunnel stream. Counts against its connection until dropped.
pub struct TunnelStream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
    /// Keeps the stream counted against its connection.
    pub guard: ActiveGuard,
}

pub struct ActiveGuard(Arc<Conn>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since_ms.store(now_ms(), Ordering::Release);
        }
    }
}

pub struct Pool {
    tls: Arc<TlsConfigs>,
    settings: PoolSettings,
    peers: Mutex<HashMap<PeerKey, Arc<Peer>>>,
    handshakes: AtomicUsize,
}

impl Pool {
    pub fn new(tls: Arc<TlsConfigs>, settings: PoolSettings) -> Pool {
        Pool {
            tls,
            settings,
            peers: Mutex::new(HashMap::new()),
            handshakes: AtomicUsize::new(0),
        }
    }

    /// TLS handshakes done so far (tests and metrics check pooling).
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Open connections per peer, for /config and metrics.
    pub fn connections(&self) -> Vec<(PeerKey, usize, usize)> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .iter()
            .map(|(k, p)| {
                let conns = p.conns.lock().unwrap_or_else(|p| p.into_inner());
                let live: Vec<_> = conns
                    .iter()
                    .filter(|c| !c.dead.load(Ordering::Acquire))
                    .collect();
                let streams = live.iter().map(|c| c.active.load(Ordering::Relaxed)).sum();
                (k.clone(), live.len(), streams)
            })
            .collect()
    }

    /// Closes connections that are dead or carried no stream for
    /// `idle_timeout`, and forgets peers left without any (unless a dial to
    /// them is under way). Returns how many connections it closed.
    pub fn sweep(&self) -> usize {
        let now = now_ms();
        let idle_ms = self.settings.idle_timeout.as_millis() as u64;
        let mut closed = 0;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|_, peer| {
            let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.saturating_sub(c.idle_since_ms.load(Ordering::Acquire)) >= idle_ms;
                if idle || c.dead.load(Ordering::Acquire) {
                    // Dropping the last handle lets h2 close the connection
                    // (GOAWAY); the keepalive task sees `dead` and stops.
                    c.dead.store(true, Ordering::Release);
                    closed += 1;
                    false
                } else {
                    true
                }
            });
            !conns.is_empty() || peer.dial.try_lock().is_err()
        });
        closed
    }

    fn peer(&self, key: &PeerKey) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.entry(key.clone()).or_default().clone()
    }

    /// A connection with room, if there is one.
    fn pick(&self, peer: &Peer, allow_full: bool) -> Option<Arc<Conn>> {
        let mut conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.dead.load(Ordering::Acquire));
        let best = conns
            .iter()
            .min_by_key(|c| c.active.load(Ordering::Relaxed))?;
        let busy = best.active.load(Ordering::Relaxed) >= self.settings.streams_per_connection;
        let room_for_more = conns.len() < self.settings.max_connections;
        if busy && (room_for_more || !allow_full) {
            return None;
        }
        Some(best.clone())
    }

    async fn conn(&self, key: &PeerKey, peer: &Peer) -> Result<Arc<Conn>, TunnelError> {
        if let Some(c) = self.pick(peer, false) {
            return Ok(c);
        }
        let _dialing = peer.dial.lock().await;
        // Someone else may have dialled while we waited.
        if let Some(c) = self.pick(peer, false) {
            return Ok(c);
        }
        let full = {
            let conns = peer.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns
                .iter()
                .filter(|c| !c.dead.load(Ordering::Acquire))
                .count()
                >= self.settings.max_connections
        };
        if full && let Some(c) = self.pick(peer, true) {
            return Ok(c);
        }
        let conn = self.dial(key).await?;
        peer.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, key: &PeerKey) -> Result<Arc<Conn>, TunnelError> {
        let addr = key.addr;
        let config = self.tls.client_for(&key.identity)?;
        let tls = super::dial_tls(key, &self.settings, config).await?;
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(self.settings.stream_window)
            .initial_connection_window_size(self.settings.connection_window)
            .max_frame_size(self.settings.max_frame_size)
            .max_send_buffer_size(1024 * 1024)
            .enable_push(false);
        let (send, mut connection) =
            builder
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| TunnelError::Protocol {
                    addr,
                    detail: e.to_string(),
                })?;
        let dead = Arc::new(AtomicBool::new(false));
        let ping = connection.ping_pong();
        let dead_on_exit = dead.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%addr, error = %e, "tunnel connection ended");
            }
            dead_on_exit.store(true, Ordering::Release);
        });
        if let Some(ping) = ping {
            tokio::spawn(keepalive(ping, dead.clone(), addr));
        }
        tracing::debug!(%addr, identity = %key.identity, "tunnel connection established");
        Ok(Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            dead,
            idle_since_ms: AtomicU64::new(now_ms()),
        }))
    }

    /// Opens a CONNECT stream to `authority` through the tunnel to `key`.
    ///
    /// `early` (the app's first bytes, if it sent any before the stream was
    /// opened) goes out right behind the request, usually in the same TLS
    /// record, rather than after the answer: a new connection costs one
    /// tunnel round trip less. The peer holds those bytes until it has
    /// connected to the app and answered 200, and drops them with the
    /// stream if it refuses. If no answer comes in time this stream is
    /// reset (the peer then will not deliver them; see
    /// `InboundStream::accept`) and the caller may send them elsewhere.
    pub async fn open(
        &self,
        key: &PeerKey,
        authority: &str,
        service: &str,
        early: &[Bytes],
    ) -> Result<TunnelStream, TunnelError> {
        let peer = self.peer(key);
        let mut last = None;
        for _attempt in 0..2 {
            let conn = self.conn(key, &peer).await?;
            conn.active.fetch_add(1, Ordering::AcqRel);
            let guard = ActiveGuard(conn.clone());
            match self.stream(&conn, key, authority, service, early).await {
                Ok((send, recv)) => {
                    return Ok(TunnelStream { send, recv, guard });
                }
                Err(StreamFailure::Connection(e)) => {
                    // The connection is broken; forget it and try a new one.
                    conn.dead.store(true, Ordering::Release);
                    last = Some(e);
                }
                Err(StreamFailure::Unanswered(e)) => {
                    // The peer went quiet: the connection is suspect, and so
                    // is the peer; let the caller try another endpoint.
                    conn.dead.store(true, Ordering::Release);
                    return Err(e);
                }
                Err(StreamFailure::Stream(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| TunnelError::Protocol {
            addr: key.addr,
            detail: "no usable connection".to_string(),
        }))
    }

    async fn stream(
        &self,
        conn: &Conn,
        key: &PeerKey,
        authority: &str,
        service: &str,
        early: &[Bytes],
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), StreamFailure> {
        let addr = key.addr;
        let proto =
            |detail: String| StreamFailure::Connection(TunnelError::Protocol { addr, detail });
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .header("x-hostmesh-service", service)
            .body(())
            .map_err(|e| {
                StreamFailure::Stream(TunnelError::Config(format!(
                    "bad CONNECT target {authority:?}: {e}"
                )))
            })?;
        let timeout = self.settings.connect_timeout;
        let mut send = match tokio::time::timeout(timeout, conn.send.clone().ready()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(proto(e.to_string())),
            Err(_) => {
                return Err(StreamFailure::Unanswered(TunnelError::Protocol {
                    addr,
                    detail: "no stream capacity in time".to_string(),
                }));
            }
        };
        let (response, mut stream) = send
            .send_request(request, false)
            .map_err(|e| proto(e.to_string()))?;
        // At most one read's worth: within the stream's initial window, so
        // it is sent at once, not held back for capacity.
        for chunk in early {
            stream
                .send_data(chunk.clone(), false)
                .map_err(|e| proto(e.to_string()))?;
        }
        // The peer connects to the app before answering; give that the
        // connect timeout too.
        let response = match tokio::time::timeout(timeout * 2, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_reset() && !e.is_go_away() => {
                return Err(StreamFailure::Stream(TunnelError::Protocol {
                    addr,
                    detail: format!("stream reset: {e}"),
                }));
            }
            Ok(Err(e)) => return Err(proto(e.to_string())),
            Err(_) => {
                return Err(StreamFailure::Unanswered(TunnelError::Protocol {
                    addr,
                    detail: format!(
                        "no answer to CONNECT within {}ms",
                        (timeout * 2).as_millis()
                    ),
                }));
            }
        };
        let status = response.status().as_u16();
        if status != 200 {
            return Err(StreamFailure::Stream(TunnelError::Refused {
                addr,
                authority: authority.to_string(),
                status,
            }));
        }
        Ok((stream, response.into_body()))
    }
}

enum StreamFailure {
    /// The connection is unusable; another may work.
    Connection(TunnelError),
    /// The peer did not answer in time.
    Unanswered(TunnelError),
    /// This stream failed; the connection is fine.
    Stream(TunnelError),
}

/// Pings an idle connection so a vanished peer is noticed without waiting
/// for TCP to give up.
async fn keepalive(mut ping: h2::PingPong, dead: Arc<AtomicBool>, addr: std::net::SocketAddr) {
    let every = Duration::from_secs(15);
    loop {
        tokio::time::sleep(every).await;
        if dead.load(Ordering::Acquire) {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(5), ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => {
                tracing::debug!(%addr, "tunnel keepalive failed; dropping the connection");
                dead.store(true, Ordering::Release);
                return;
            }
        }
    }
}
