//! Dedicated tunnel connections: one mutual-TLS connection carries one
//! application connection at a time and, when that ends cleanly, the next
//! one. TCP is the stream's own flow control, so no frame waits on another
//! stream's, and each end moves bytes between its two sockets in the
//! connection's own task: no HTTP/2 stream machinery and no hand-off to a
//! connection task.
//!
//! Why: with the HTTP/2 tunnel ([`super::hbone`]) meshd spent 12-14 µs of
//! user CPU per request per side on one keep-alive connection, against 6
//! without HTTP/2 (docs/BENCHMARKS.md, "Dedicated tunnel connections");
//! half of meshd's user time went to h2's framing, its stream state and the
//! wake-up of the connection task. Pooling is kept: a connection whose
//! stream ended cleanly goes back to a per-peer idle list and carries the
//! next application connection without a TLS handshake, so after warm-up
//! the number of tunnel connections to a peer follows the number of
//! concurrent application connections to it (as HAProxy's or Linkerd's
//! per-connection mTLS), bounded by [`PoolSettings::max_idle_per_peer`]
//! idle ones.
//!
//! Negotiated by ALPN `hostmesh-conn/1`; a peer that answers `h2` (an older
//! meshd, another HBONE server) gets the HTTP/2 tunnel, remembered for
//! [`H2_ONLY_FOR`].
//!
//! Wire, after TLS: frames of a 4-byte header (kind, then a 24-bit
//! big-endian length) and the payload.
//!
//! | kind | from | payload |
//! |---|---|---|
//! | 1 OPEN | caller | authority length (1 byte), authority (`ip:port`), the service the caller meant (at most 256 bytes) |
//! | 2 STATUS | server | u16: 200 when connected to the app; else the refusal, and the connection closes |
//! | 3 DATA | both | 1 to 65,536 bytes of the stream |
//! | 4 FIN | both | none: the sender's half of the stream is done |
//! | 5 DONE | server | none: after both FINs, everything the caller sent has reached the app; the connection takes the next OPEN |
//!
//! A stream ends cleanly when both sides sent FIN; the server, once it has
//! written all the caller sent to its app, sends DONE, and the caller
//! reuses the connection only after reading it (without DONE an OPEN could
//! queue behind the end of the last stream at a server whose app reads
//! slowly). Any error ends the connection instead, which
//! the other side sees as the stream aborted. The caller may send DATA
//! right behind OPEN (the app's first bytes); the server delivers them only
//! after it connected and answered 200, and drops them with the connection
//! when it refuses.
//!
//! An app's last bytes and its close, when the reactor has seen both by the
//! time meshd reads (a server that answers and closes), go out as DATA and
//! FIN in one TLS record: one write and one segment per stream fewer.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::hbone::PoolSettings;
use super::readahead::Gauge;
use super::splice::{Counters, RawIo, ReadSize, Side, SpliceEnd, both_ways, noting_wait};
use super::{PeerKey, TlsConfigs, TunnelError};
use crate::sockmap::{Guard, ReadGuard, WriteGuard};

/// ALPN of a dedicated tunnel connection.
pub const ALPN: &[u8] = b"hostmesh-conn/1";

/// How long a peer that answered `h2` to this ALPN gets the HTTP/2 tunnel
/// before it is asked again (it may have been upgraded).
pub const H2_ONLY_FOR: Duration = Duration::from_secs(300);

const HEADER: usize = 4;
/// The largest DATA payload either side accepts.
pub const MAX_DATA: usize = 64 * 1024;
const MAX_AUTHORITY: usize = 255;
const MAX_SERVICE: usize = 256;

const OPEN: u8 = 1;
const STATUS: u8 = 2;
const DATA: u8 = 3;
const FIN: u8 = 4;
const DONE: u8 = 5;
/// How long after its stream ended a caller keeps a connection whose DONE
/// has not come; then it closes it instead of reusing it.
const DONE_WAIT: Duration = Duration::from_secs(5);

/// The read buffer a connection starts with, and the most it grows to:
/// what one read ahead under TLS can bring (several frames, to the app in
/// one write).
const READ_START: usize = 16 * 1024;
const READ_MAX: usize = super::readahead::MAX;

fn header(kind: u8, len: usize) -> [u8; HEADER] {
    debug_assert!(len < 1 << 24);
    [kind, (len >> 16) as u8, (len >> 8) as u8, len as u8]
}

/// A frame header that breaks the protocol, said in words.
fn check_header(kind: u8, len: usize) -> Result<(), String> {
    let ok = match kind {
        OPEN => (2..=1 + MAX_AUTHORITY + MAX_SERVICE).contains(&len),
        STATUS => len == 2,
        DATA => (1..=MAX_DATA).contains(&len),
        FIN | DONE => len == 0,
        _ => return Err(format!("unknown frame kind {kind}")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("frame of kind {kind} with a bad length {len}"))
    }
}

/// Decodes an OPEN frame's payload into the authority and the service.
pub fn parse_open(p: &[u8]) -> Result<(String, String), String> {
    let (&alen, rest) = p.split_first().ok_or("empty OPEN frame")?;
    let alen = alen as usize;
    if alen == 0 || alen > rest.len() {
        return Err(format!(
            "OPEN frame's authority length {alen} does not fit its {} bytes",
            rest.len()
        ));
    }
    let authority =
        std::str::from_utf8(&rest[..alen]).map_err(|_| "OPEN frame's authority is not UTF-8")?;
    if authority.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("OPEN frame's authority has spaces or control characters".to_string());
    }
    let service = String::from_utf8_lossy(&rest[alen..]).into_owned();
    Ok((authority.to_string(), service))
}

fn encode_open(authority: &str, service: &str) -> Result<Vec<u8>, String> {
    if authority.is_empty() || authority.len() > MAX_AUTHORITY {
        return Err(format!(
            "bad CONNECT target {authority:?}: 1 to {MAX_AUTHORITY} bytes"
        ));
    }
    // Cut on a character boundary, as the server would.
    let mut cut = service.len().min(MAX_SERVICE);
    while !service.is_char_boundary(cut) {
        cut -= 1;
    }
    let service = &service[..cut];
    let len = 1 + authority.len() + service.len();
    let mut f = Vec::with_capacity(HEADER + len);
    f.extend_from_slice(&header(OPEN, len));
    f.push(authority.len() as u8);
    f.extend_from_slice(authority.as_bytes());
    f.extend_from_slice(service.as_bytes());
    Ok(f)
}

/// A control frame read between streams: its kind and payload, None at
/// a clean EOF, or what was wrong.
type ControlFrame = Result<Option<(u8, Vec<u8>)>, String>;

/// What a connection has read and not yet used.
struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// What is read ahead under TLS (see [`super::readahead`]).
    below: Gauge,
}

impl FrameReader {
    /// Holds no buffer until bytes come (an idle connection waits
    /// without one; see [`FrameReader::fill`]).
    fn new(below: Gauge) -> FrameReader {
        FrameReader {
            buf: Box::default(),
            start: 0,
            end: 0,
            below,
        }
    }

    /// Lets the buffer go when nothing is in it (between streams).
    fn release(&mut self) {
        if self.buffered() == 0 {
            self.buf = Box::default();
            self.start = 0;
            self.end = 0;
        }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Makes room at the end: moves what is left to the front, and grows
    /// the buffer (up to [`READ_MAX`]) when the last read filled it.
    fn make_room(&mut self) {
        if self.buf.is_empty() {
            self.buf = vec![0; READ_START].into_boxed_slice();
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() || (self.start > 0 && self.buf.len() - self.end < HEADER) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() && self.buf.len() < READ_MAX {
            let mut bigger = vec![0; (self.buf.len() * 2).min(READ_MAX)].into_boxed_slice();
            bigger[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = bigger;
        }
    }

    /// One read from `io`; 0 at EOF. Without a buffer (an idle
    /// connection) the wait is on a small one on the stack, and the buffer
    /// is taken once bytes have come: thousands of idle connections hold
    /// no 16 KiB each.
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            let mut first = [0u8; 512];
            let n = io.read(&mut first).await?;
            if n > 0 {
                self.make_room();
                self.buf[..n].copy_from_slice(&first[..n]);
                self.end = n;
            }
            return Ok(n);
        }
        self.make_room();
        let mut n = io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        // More records read ahead under TLS (tokio-rustls stopped because
        // this buffer was full): take them too, growing it, without a
        // system call, so that they go to the app in one write.
        while n > 0 && self.below.buffered() > 0 {
            self.make_room();
            if self.end == self.buf.len() {
                break;
            }
            let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
            let got = std::future::poll_fn(|cx| match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r)),
            })
            .await;
            match got {
                Some(Ok(())) if !rb.filled().is_empty() => {
                    let m = rb.filled().len();
                    self.end += m;
                    n += m;
                }
                // The end or an error (the next fill sees it again, after
                // what was read here has been used), or a record not yet
                // whole.
                _ => break,
            }
        }
        Ok(n)
    }

    /// Reads one whole control frame: its kind and payload. None at a
    /// clean EOF between frames.
    async fn control<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> ControlFrame {
        while self.buffered() < HEADER {
            let n = self.fill(io).await.map_err(|e| e.to_string())?;
            if n == 0 {
                if self.buffered() == 0 {
                    return Ok(None);
                }
                return Err("the connection closed inside a frame".to_string());
            }
        }
        let h = &self.buf[self.start..self.start + HEADER];
        let (kind, len) = (h[0], u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize);
        check_header(kind, len)?;
        if kind == DATA || kind == FIN {
            return Err(format!("frame of kind {kind} outside a stream"));
        }
        while self.buffered() < HEADER + len {
            if self.fill(io).await.map_err(|e| e.to_string())? == 0 {
                return Err("the connection closed inside a frame".to_string());
            }
        }
        let p = self.buf[self.start + HEADER..self.start + HEADER + len].to_vec();
        self.start += HEADER + len;
        Ok(Some((kind, p)))
    }
}

/// A TLS connection to or from a peer host, between frames.
pub struct TunnelConn {
    io: Box<dyn RawIo>,
    reader: FrameReader,
    /// The thread (data worker) whose reactor the socket is registered
    /// with: a caller reuses an idle connection only on that worker, so its
    /// wake-ups never cross threads.
    home: std::thread::ThreadId,
}

impl TunnelConn {
    /// `below`: the gauge of the [`super::readahead::ReadAhead`] under
    /// `io`'s TLS.
    pub fn new(io: Box<dyn RawIo>, below: Gauge) -> TunnelConn {
        TunnelConn {
            io,
            reader: FrameReader::new(below),
            home: std::thread::current().id(),
        }
    }

    /// Reads what has arrived without waiting (into the buffer, kept for
    /// the stream): true when the peer has closed the connection (EOF or
    /// an error).
    fn closed_now(&mut self) -> bool {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            self.reader.make_room();
            if self.reader.end == self.reader.buf.len() {
                return false;
            }
            let mut rb = ReadBuf::new(&mut self.reader.buf[self.reader.end..]);
            match Pin::new(&mut self.io).poll_read(&mut cx, &mut rb) {
                Poll::Pending => return false,
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return true;
                    }
                    self.reader.end += n;
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// The server's answer to an OPEN.
    pub async fn write_status(&mut self, code: u16) -> std::io::Result<()> {
        let mut f = [0u8; HEADER + 2];
        f[..HEADER].copy_from_slice(&header(STATUS, 2));
        f[HEADER..].copy_from_slice(&code.to_be_bytes());
        self.send(&f).await
    }

    /// The next OPEN on a server's connection: the authority and service.
    /// None when the caller closed the connection between streams.
    pub async fn read_open(&mut self) -> Result<Option<(String, String)>, String> {
        match self.reader.control(&mut self.io).await? {
            None => Ok(None),
            Some((OPEN, p)) => parse_open(&p).map(Some),
            Some((kind, _)) => Err(format!("expected OPEN, got a frame of kind {kind}")),
        }
    }

    /// Whether the caller has given up on the stream it opened (closed the
    /// connection), seen without waiting; the bytes it sent stay buffered.
    pub fn caller_gave_up(&mut self) -> bool {
        self.closed_now()
    }
}

/// Hands a connection back when its stream ended cleanly: to the idle list
/// on the client, to the loop waiting for the next OPEN on the server.
pub type GiveBack = Box<dyn FnOnce(TunnelConn) + Send>;

/// A stream ready for splicing.
pub struct Halves {
    pub conn: TunnelConn,
    pub give_back: Option<GiveBack>,
}

/// An open dedicated stream, before splicing.
pub struct DedicatedStream {
    conn: TunnelConn,
    pool: Arc<DedicatedPool>,
    key: PeerKey,
    guard: ActiveGuard,
}

impl DedicatedStream {
    pub fn into_halves(self) -> (Halves, Box<dyn std::any::Any + Send>) {
        let DedicatedStream {
            conn,
            pool,
            key,
            guard,
        } = self;
        let give_back: GiveBack = Box::new(move |c| pool.put_idle(key, c));
        (
            Halves {
                conn,
                give_back: Some(give_back),
            },
            Box::new(guard),
        )
    }
}

/// Counts a stream as active on its peer until dropped.
pub struct ActiveGuard {
    pool: Arc<DedicatedPool>,
    key: PeerKey,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut peers = self.pool.lock();
        if let Some(p) = peers.get_mut(&self.key) {
            p.active = p.active.saturating_sub(1);
        }
    }
}

#[derive(Default)]
struct PeerConns {
    /// Most recently used last.
    idle: Vec<Idle>,
    active: usize,
}

struct Idle {
    conn: TunnelConn,
    /// When its last stream ended.
    since: Instant,
}

/// Why a dedicated stream could not be opened.
pub enum OpenError {
    /// The peer answered `h2`: use the HTTP/2 tunnel.
    NotOffered,
    Failed(TunnelError),
}

impl From<TunnelError> for OpenError {
    fn from(e: TunnelError) -> Self {
        OpenError::Failed(e)
    }
}

/// The client side: idle connections per peer, dialled on demand.
pub struct DedicatedPool {
    tls: Arc<TlsConfigs>,
    settings: PoolSettings,
    peers: Mutex<HashMap<PeerKey, PeerConns>>,
    /// Peers that answered `h2`, and since when.
    h2_only: Mutex<HashMap<SocketAddr, Instant>>,
    handshakes: AtomicUsize,
}

impl DedicatedPool {
    pub fn new(tls: Arc<TlsConfigs>, settings: PoolSettings) -> DedicatedPool {
        DedicatedPool {
            tls,
            settings,
            peers: Mutex::new(HashMap::new()),
            h2_only: Mutex::new(HashMap::new()),
            handshakes: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerKey, PeerConns>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// TLS handshakes done so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Whether `addr` answered `h2` lately (then the HTTP/2 tunnel is used).
    pub fn h2_only(&self, addr: SocketAddr) -> bool {
        let mut m = self.h2_only.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&addr) {
            Some(since) if since.elapsed() < H2_ONLY_FOR => true,
            Some(_) => {
                m.remove(&addr);
                false
            }
            None => false,
        }
    }

    /// Per peer: connections (idle and carrying a stream) and streams.
    pub fn connections(&self) -> Vec<(PeerKey, usize, usize)> {
        self.lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.idle.len() + p.active, p.active))
            .collect()
    }

    /// Closes idle connections unused for `idle_timeout` and forgets peers
    /// with none left; returns how many connections it closed.
    pub fn sweep(&self) -> usize {
        let timeout = self.settings.idle_timeout;
        let mut closed = 0;
        self.lock().retain(|_, p| {
            let before = p.idle.len();
            p.idle.retain(|i| i.since.elapsed() < timeout);
            closed += before - p.idle.len();
            !p.idle.is_empty() || p.active > 0
        });
        closed
    }

    /// After a clean end of a stream the connection joins the idle list
    /// at once, waiting for the server's DONE; [`DedicatedPool::take`]
    /// reads that when it considers the connection (no task, no wake-up
    /// per stream: DONE waits in the socket until then).
    fn put_idle(&self, key: PeerKey, mut conn: TunnelConn) {
        conn.reader.release();
        let mut peers = self.lock();
        let p = peers.entry(key).or_default();
        if p.idle.len() < self.settings.max_idle_per_peer {
            p.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// The most recently used idle connection to `key` of this worker that
    /// is ready (its DONE has come, nothing else has), counted active. One
    /// still waiting for DONE is passed over (and closed once [`DONE_WAIT`]
    /// has gone by); one the peer closed, or that got anything but DONE, is
    /// closed.
    fn take(&self, key: &PeerKey) -> Option<TunnelConn> {
        use futures::FutureExt;
        let here = std::thread::current().id();
        let mut peers = self.lock();
        let p = peers.entry(key.clone()).or_default();
        let mut i = p.idle.len();
        while i > 0 {
            i -= 1;
            let idle = &mut p.idle[i];
            if idle.conn.home != here {
                continue;
            }
            let c = &mut idle.conn;
            // DONE read now (no wait: it has come, or this one is passed
            // over). A peer that closed the connection after it is found
            // out by the OPEN, and `open` tries a new connection then.
            let usable = match c.reader.control(&mut c.io).now_or_never() {
                Some(Ok(Some((DONE, _)))) => Some(c.reader.buffered() == 0),
                Some(_) => Some(false),
                None if idle.since.elapsed() > DONE_WAIT => Some(false),
                None => None,
            };
            match usable {
                Some(true) => {
                    let mut c = p.idle.remove(i).conn;
                    c.reader.release();
                    p.active += 1;
                    return Some(c);
                }
                Some(false) => {
                    p.idle.remove(i);
                }
                None => {}
            }
        }
        None
    }

    /// Closes every idle connection to `key`: one turned out dead on use,
    /// so the peer has likely restarted or gone, and the others with it.
    fn forget_idle(&self, key: &PeerKey) {
        if let Some(p) = self.lock().get_mut(key) {
            p.idle.clear();
        }
    }

    async fn dial(&self, key: &PeerKey) -> Result<TunnelConn, OpenError> {
        let addr = key.addr;
        let config = self.tls.client_dedicated(&key.identity)?;
        let tls = super::dial_tls(key, &self.settings, config).await?;
        keepalive(tls.get_ref().0.get_ref());
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            self.h2_only
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr, Instant::now());
            tracing::info!(peer = %addr, "peer does not offer dedicated tunnel connections; using HTTP/2 for it");
            return Err(OpenError::NotOffered);
        }
        let gauge = tls.get_ref().0.gauge();
        Ok(TunnelConn::new(Box::new(tls), gauge))
    }

    /// Opens a stream to `authority` at `key`: on an idle connection if
    /// one is open, else on a new one. `early` (the app's first bytes) goes
    /// right behind the OPEN, in the same TLS record. If a reused
    /// connection turns out closed before answering, the peer never saw the
    /// stream: every idle connection to it is dropped and one new
    /// connection tried. A stream that gets no answer in time ends its
    /// connection and fails; the peer then delivers `early` only if it had
    /// already connected to its app and answered (the window in
    /// docs/ARCHITECTURE.md, "The data path", step 4).
    pub async fn open(
        self: &Arc<Self>,
        key: &PeerKey,
        authority: &str,
        service: &str,
        early: &[Bytes],
    ) -> Result<DedicatedStream, OpenError> {
        let addr = key.addr;
        let mut request = encode_open(authority, service)
            .map_err(|e| OpenError::Failed(TunnelError::Config(e)))?;
        for chunk in early {
            for part in chunk.chunks(MAX_DATA) {
                request.extend_from_slice(&header(DATA, part.len()));
                request.extend_from_slice(part);
            }
        }
        // An idle connection may have been closed by the peer since; then a
        // fresh one gets one try.
        for attempt in 0..2 {
            let idle = if attempt == 0 { self.take(key) } else { None };
            let (mut conn, reused) = match idle {
                Some(c) => (c, true),
                None => {
                    let c = self.dial(key).await?;
                    self.lock().entry(key.clone()).or_default().active += 1;
                    (c, false)
                }
            };
            let guard = ActiveGuard {
                pool: self.clone(),
                key: key.clone(),
            };
            let answer = async {
                conn.send(&request).await.map_err(|e| e.to_string())?;
                conn.reader.control(&mut conn.io).await
            };
            let wait = self.settings.connect_timeout * 2;
            match tokio::time::timeout(wait, answer).await {
                Ok(Ok(Some((STATUS, p)))) => {
                    let status = u16::from_be_bytes([p[0], p[1]]);
                    if status != 200 {
                        return Err(TunnelError::Refused {
                            addr,
                            authority: authority.to_string(),
                            status,
                        }
                        .into());
                    }
                    return Ok(DedicatedStream {
                        conn,
                        pool: self.clone(),
                        key: key.clone(),
                        guard,
                    });
                }
                Ok(Ok(Some((kind, _)))) => {
                    return Err(TunnelError::Protocol {
                        addr,
                        detail: format!("expected STATUS, got a frame of kind {kind}"),
                    }
                    .into());
                }
                // Closed before answering: on a reused connection the peer
                // closed it while idle (and never saw this stream).
                Ok(Ok(None)) | Ok(Err(_)) if reused => {
                    self.forget_idle(key);
                    continue;
                }
                Ok(Ok(None)) => {
                    return Err(TunnelError::Protocol {
                        addr,
                        detail: "the peer closed the connection without answering".to_string(),
                    }
                    .into());
                }
                Ok(Err(detail)) => return Err(TunnelError::Protocol { addr, detail }.into()),
                Err(_) => {
                    if reused {
                        self.forget_idle(key);
                    }
                    return Err(TunnelError::Protocol {
                        addr,
                        detail: format!("no answer to CONNECT within {}ms", wait.as_millis()),
                    }
                    .into());
                }
            }
        }
        Err(TunnelError::Protocol {
            addr,
            detail: "the idle connection to the peer was closed, and so was a new one".to_string(),
        }
        .into())
    }
}

/// Keep-alive probes on tunnel sockets: an idle connection to a host that
/// vanished errors within about 30 s instead of taking a stream with it.
pub fn keepalive(tcp: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Serves OPENs on a server's connection one after another until the
/// caller closes it, a stream fails, it stays idle for `idle`, or meshd
/// drains.
pub async fn serve(
    mut conn: TunnelConn,
    remote: SocketAddr,
    identity: hostmesh_api::spiffe::SpiffeId,
    handler: super::server::Handler,
    mut drain: crate::drain::Drain,
    idle: Duration,
) {
    loop {
        let open = tokio::select! {
            r = tokio::time::timeout(idle, conn.read_open()) => match r {
                Ok(r) => r,
                Err(_) => return,
            },
            _ = drain.signaled() => return,
        };
        let (authority, service) = match open {
            Ok(Some(v)) => v,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(peer = %remote, error = %e, "dedicated tunnel connection: protocol error");
                return;
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let give_back: GiveBack = Box::new(move |c| {
            let _ = tx.send(c);
        });
        let req = super::server::InboundRequest {
            peer_identity: identity.clone(),
            peer_addr: remote,
            authority,
            service,
            stream: super::server::InboundStream::Dedicated(Box::new(Halves {
                conn,
                give_back: Some(give_back),
            })),
        };
        (handler)(req).await;
        match rx.await {
            Ok(c) => {
                conn = c;
                if conn.send(&header(DONE, 0)).await.is_err() {
                    return;
                }
                conn.reader.release();
            }
            Err(_) => return,
        }
    }
}

/// Splices `socket` with a dedicated stream until both directions end (the
/// connection is then given back) or one fails (the connection is closed,
/// which the peer sees as the stream aborted).
pub async fn splice(
    socket: tokio::net::TcpStream,
    halves: Halves,
    counters: Arc<Counters>,
    guard: Option<Guard>,
) -> (SpliceEnd, Option<String>) {
    let Halves {
        mut conn,
        give_back,
    } = halves;
    let (read, write) = socket.into_split();
    let failure = {
        let (reading, writing, retire) = Guard::split(guard);
        let TunnelConn { io, reader, .. } = &mut conn;
        let (tunnel_read, tunnel_write) = tokio::io::split(io);
        let up = socket_to_conn(read, tunnel_write, &counters, reading);
        let down = conn_to_socket(reader, tunnel_read, write, &counters, writing);
        both_ways(up, down, retire).await
    };
    match failure {
        None => {
            if let Some(give_back) = give_back {
                give_back(conn);
            }
            (SpliceEnd::Done, None)
        }
        Some(side) => side.end(),
    }
}

async fn socket_to_conn<W: AsyncWrite + Unpin>(
    mut read: tokio::net::tcp::OwnedReadHalf,
    mut tunnel: W,
    counters: &Counters,
    mut guard: Option<ReadGuard>,
) -> Result<(), Side> {
    let peer = |e: std::io::Error| Side::Peer(e.to_string());
    let mut size = ReadSize::new();
    // Room for a FIN header behind the data.
    let mut buf = vec![0u8; HEADER + size.bytes() + HEADER];
    loop {
        let want = size.bytes();
        if buf.len() < HEADER + want + HEADER {
            buf.resize(HEADER + want + HEADER, 0);
        }
        let mut n = read
            .read(&mut buf[HEADER..HEADER + want])
            .await
            .map_err(Side::Local)?;
        size.grow_after(n, want);
        if let Some(g) = &mut guard {
            g.after_read(n, want);
        }
        if n == 0 {
            tunnel.write_all(&header(FIN, 0)).await.map_err(peer)?;
            return tunnel.flush().await.map_err(peer);
        }
        // A read that did not fill its room emptied the socket; if the app
        // has also closed its side (its last bytes and its FIN came in one
        // wake-up, as from a server that answers and closes), the read
        // that finds the end does not wait, and the FIN goes in the same
        // TLS record as the data: one write and one segment, not two.
        let mut fin = false;
        if n < want && closed_or_readable(&read).await {
            let room = want - n;
            let m = read
                .read(&mut buf[HEADER + n..HEADER + want])
                .await
                .map_err(Side::Local)?;
            if let Some(g) = &mut guard {
                g.after_read(m, room);
            }
            fin = m == 0;
            n += m;
        }
        counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        buf[..HEADER].copy_from_slice(&header(DATA, n));
        let mut end = HEADER + n;
        if fin {
            buf[end..end + HEADER].copy_from_slice(&header(FIN, 0));
            end += HEADER;
        }
        let frame = &buf[..end];
        let write = async {
            tunnel.write_all(frame).await?;
            tunnel.flush().await
        };
        noting_wait(write, || {
            if let Some(g) = &mut guard {
                g.tunnel_full();
            }
        })
        .await
        .map_err(peer)?;
        if fin {
            return Ok(());
        }
    }
}

/// Whether a read of `read` would return at once (the peer has closed its
/// side, or more bytes came), as the reactor last saw it: no system call.
/// Right after a read that left room, the reactor has cleared "readable"
/// but keeps "read closed", which is final.
async fn closed_or_readable(read: &tokio::net::tcp::OwnedReadHalf) -> bool {
    let stream: &tokio::net::TcpStream = read.as_ref();
    std::future::poll_fn(|cx| Poll::Ready(stream.poll_read_ready(cx).is_ready())).await
}

/// Payload pieces taken from the read buffer for one `writev`.
const PIECES: usize = 16;

async fn conn_to_socket<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut FrameReader,
    mut tunnel: R,
    mut write: W,
    counters: &Counters,
    mut guard: Option<WriteGuard>,
) -> Result<(), Side> {
    // Bytes of the current DATA frame not yet taken from the buffer.
    let mut left = 0usize;
    loop {
        // Every DATA payload already buffered (across frames: an answer
        // sent as head and body arrives as two), to the app in one writev.
        let mut pieces = [(0usize, 0usize); PIECES];
        let mut k = 0;
        let mut pos = reader.start;
        let mut fin = false;
        while k < PIECES {
            if left > 0 {
                let take = left.min(reader.end - pos);
                if take == 0 {
                    break;
                }
                pieces[k] = (pos, pos + take);
                k += 1;
                pos += take;
                left -= take;
                continue;
            }
            if reader.end - pos < HEADER {
                break;
            }
            let h = &reader.buf[pos..pos + HEADER];
            let (kind, len) = (h[0], u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize);
            check_header(kind, len).map_err(Side::Peer)?;
            pos += HEADER;
            match kind {
                DATA => left = len,
                FIN => {
                    fin = true;
                    break;
                }
                _ => return Err(Side::Peer(format!("frame of kind {kind} inside a stream"))),
            }
        }
        if k > 0 {
            let len = write_pieces(&mut write, &reader.buf, &pieces[..k])
                .await
                .map_err(Side::Local)?;
            if let Some(g) = &mut guard {
                g.after_write(len).await;
            }
            counters.received.fetch_add(len as u64, Ordering::Relaxed);
        }
        reader.start = pos;
        if fin {
            return write.shutdown().await.map_err(Side::Local);
        }
        if k == 0 {
            let n = reader
                .fill(&mut tunnel)
                .await
                .map_err(|e| Side::Peer(e.to_string()))?;
            if n == 0 {
                return Err(Side::Peer(
                    "the tunnel connection closed inside the stream".to_string(),
                ));
            }
        }
    }
}

/// Writes the buffer's `pieces` with as few `writev` calls as the socket
/// allows; returns how many bytes.
async fn write_pieces<W: AsyncWrite + Unpin>(
    write: &mut W,
    buf: &[u8],
    pieces: &[(usize, usize)],
) -> std::io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); PIECES];
    for (s, &(a, b)) in slices.iter_mut().zip(pieces) {
        *s = IoSlice::new(&buf[a..b]);
    }
    let total = pieces.iter().map(|(a, b)| b - a).sum();
    let mut rest = &mut slices[..pieces.len()];
    while !rest.is_empty() {
        let n = write.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_frames_round_trip_and_bad_ones_are_named() {
        let f = encode_open("10.0.0.1:8080", "web.shop").unwrap();
        assert_eq!(&f[..HEADER], &header(OPEN, f.len() - HEADER));
        assert_eq!(
            parse_open(&f[HEADER..]).unwrap(),
            ("10.0.0.1:8080".to_string(), "web.shop".to_string())
        );
        let long = "é".repeat(200);
        let f = encode_open("10.0.0.1:1", &long).unwrap();
        let (_, svc) = parse_open(&f[HEADER..]).unwrap();
        assert_eq!(svc.len(), MAX_SERVICE, "cut on a character boundary");
        assert!(
            encode_open("", "x")
                .unwrap_err()
                .contains("bad CONNECT target")
        );
        assert!(encode_open(&"1".repeat(256), "").is_err());

        assert!(parse_open(&[]).unwrap_err().contains("empty"));
        assert!(parse_open(&[9, b'a']).unwrap_err().contains("does not fit"));
        assert!(parse_open(&[0]).unwrap_err().contains("authority length 0"));
        assert!(parse_open(&[2, 0xff, 0xfe]).unwrap_err().contains("UTF-8"));
        assert!(
            parse_open(&[3, b'a', b' ', b'b'])
                .unwrap_err()
                .contains("spaces")
        );
    }

    #[test]
    fn frame_headers_are_checked() {
        assert!(check_header(DATA, 1).is_ok());
        assert!(check_header(DATA, MAX_DATA).is_ok());
        assert!(check_header(DATA, 0).unwrap_err().contains("bad length 0"));
        assert!(check_header(DATA, MAX_DATA + 1).is_err());
        assert!(check_header(FIN, 1).is_err());
        assert!(check_header(STATUS, 3).is_err());
        assert!(check_header(OPEN, 1).is_err());
        assert!(
            check_header(9, 0)
                .unwrap_err()
                .contains("unknown frame kind 9")
        );
    }

    /// A reader that hands out `data` a few bytes per read.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(self.data.len() - self.at)
                .min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn stream_bytes(payloads: &[&[u8]], fin: bool) -> Vec<u8> {
        let mut v = Vec::new();
        for p in payloads {
            v.extend_from_slice(&header(DATA, p.len()));
            v.extend_from_slice(p);
        }
        if fin {
            v.extend_from_slice(&header(FIN, 0));
        }
        v
    }

    async fn deliver(bytes: Vec<u8>, step: usize) -> (Result<(), String>, Vec<u8>) {
        let mut reader = FrameReader::new(Gauge::default());
        let tunnel = Trickle {
            data: bytes,
            at: 0,
            step,
        };
        let mut out = Vec::new();
        let r = conn_to_socket(&mut reader, tunnel, &mut out, &Counters::default(), None)
            .await
            .map_err(|s| match s {
                Side::Peer(e) => e,
                Side::Local(e) => e.to_string(),
            });
        (r, out)
    }

    #[tokio::test]
    async fn frames_split_anywhere_deliver_the_same_bytes() {
        let big = vec![7u8; 40_000];
        let bytes = stream_bytes(&[b"head ", b"and body", &big, b"!"], true);
        let mut want = b"head and body".to_vec();
        want.extend_from_slice(&big);
        want.push(b'!');
        for step in [1, 3, 4, 5, 1000, 100_000] {
            let (r, out) = deliver(bytes.clone(), step).await;
            assert_eq!(r, Ok(()), "step {step}");
            assert_eq!(out, want, "step {step}");
        }
    }

    #[tokio::test]
    async fn a_stream_cut_short_or_malformed_is_an_error_that_says_so() {
        let (r, out) = deliver(stream_bytes(&[b"abc"], false), 2).await;
        assert!(r.unwrap_err().contains("closed inside the stream"));
        assert_eq!(out, b"abc");
        let mut bad = stream_bytes(&[b"abc"], false);
        bad.extend_from_slice(&header(OPEN, 5));
        let (r, _) = deliver(bad, 100).await;
        assert!(r.unwrap_err().contains("kind 1 inside a stream"));
        let (r, _) = deliver(vec![DATA, 0, 0, 0], 100).await;
        assert!(r.unwrap_err().contains("bad length 0"));
    }
}

#[cfg(test)]
mod fin_tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A tunnel writer that keeps each write call apart (rustls makes one
    /// TLS record of each).
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// A real TLS connection over loopback TCP, each end's socket under a
    /// [`super::super::readahead::ReadAhead`] as meshd has it.
    async fn tls_pair() -> (Box<dyn RawIo>, TunnelConn) {
        use super::super::readahead::ReadAhead;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert: CertificateDer<'static> = key.cert.der().clone();
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], pkcs8)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (c, s) = pair().await;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (c, s) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, ReadAhead::new(c)),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(ReadAhead::new(s)),
        );
        let (c, s) = (c.unwrap(), s.unwrap());
        let gauge = c.get_ref().0.gauge();
        (Box::new(s), TunnelConn::new(Box::new(c), gauge))
    }

    #[tokio::test]
    async fn records_waiting_under_tls_are_taken_in_one_fill_and_reach_the_app_intact() {
        let (mut sender, mut conn) = tls_pair().await;
        let body: Vec<u8> = (0..240_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = Vec::new();
        for piece in body.chunks(40_000) {
            wire.extend_from_slice(&header(DATA, piece.len()));
            wire.extend_from_slice(piece);
        }
        wire.extend_from_slice(&header(FIN, 0));
        sender.write_all(&wire).await.unwrap();
        sender.flush().await.unwrap();
        // Let all of it reach the receiving socket.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let TunnelConn { io, reader, .. } = &mut conn;
        // The first fill reads into a 512-byte buffer on the stack (an idle
        // connection holds none) and shows the stream is behind; the next
        // reads ahead and takes every record it brought.
        let first = reader.fill(io).await.unwrap();
        assert!(first <= 16 * 1024 + 64, "{first}");
        let second = reader.fill(io).await.unwrap();
        assert!(
            second > 4 * 16 * 1024,
            "one fill took {second} bytes: records read ahead were left for later fills"
        );
        let mut out = Vec::new();
        conn_to_socket(reader, io, &mut out, &Counters::default(), None)
            .await
            .map_err(|_| "splice failed")
            .unwrap();
        assert!(out == body, "the app got other bytes");
    }

    #[tokio::test]
    async fn an_answer_and_the_close_behind_it_go_out_in_one_write() {
        let (mut app, meshd) = pair().await;
        app.write_all(b"the answer").await.unwrap();
        drop(app);
        // Let the reactor see both the bytes and the FIN.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (read, _write) = meshd.into_split();
        let mut out = Writes::default();
        socket_to_conn(read, &mut out, &Counters::default(), None)
            .await
            .map_err(|_| "splice failed")
            .unwrap();
        let mut want = header(DATA, 10).to_vec();
        want.extend_from_slice(b"the answer");
        want.extend_from_slice(&header(FIN, 0));
        assert_eq!(out.0, vec![want]);
    }

    #[tokio::test]
    async fn bytes_with_the_app_still_open_are_sent_without_waiting_for_more() {
        let (mut app, meshd) = pair().await;
        let (read, _write) = meshd.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        struct Sent(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);
        impl AsyncWrite for Sent {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                let _ = self.0.send(buf.to_vec());
                Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let splice = tokio::spawn(async move {
            socket_to_conn(read, Sent(tx), &Counters::default(), None)
                .await
                .is_ok()
        });
        app.write_all(b"one").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the bytes went out while the app kept its side open")
            .unwrap();
        assert_eq!(&first[HEADER..], b"one");
        drop(app);
        let last = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(last, header(FIN, 0));
        assert!(splice.await.unwrap());
    }
}
