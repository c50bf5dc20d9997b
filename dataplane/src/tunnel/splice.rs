//! Moving bytes between an application's TCP socket and a tunnel stream,
//! both directions at once, with half-close: when one side finishes
//! sending, the other side's write half is closed and the opposite
//! direction carries on until it finishes too.
//!
//! Data read from the socket goes to HTTP/2 as `Bytes` without another
//! copy, and data from HTTP/2 is written straight to the socket; flow
//! control windows are released only after the bytes have been written,
//! so a slow reader slows the sender instead of growing buffers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sockmap::{Guard, ReadGuard, WriteGuard};

/// How much to read from the app's socket next: one TLS record's worth of
/// plaintext at first (what a request or an answer needs), doubling each
/// time a read fills it (a transfer in bulk), up to
/// [`ReadSize::MAX_RECORDS`] records. Each size is whole records once
/// HTTP/2's 9-byte frame header is added, so no frame ends in a record of
/// a few bytes.
///
/// Bulk goes out in 48 KiB frames: three records, 49,218 bytes on the
/// wire, which the kernel sends as one packet train (its largest is 64 KiB
/// of segments). 16 KiB frames measured 0.42 of direct against 0.45-0.50
/// for 64 KiB ones; but a 64 KiB frame is four records, 65,624 bytes, two
/// trains per `writev`, and with BBR's pacing the second waits for a timer
/// (perf: 18% of the sending core's samples in `tcp_sendmsg` →
/// `tcp_write_xmit` arming it, against 3% with 48 KiB frames). Measured
/// side by side (docs/BENCHMARKS.md), 48 KiB frames carried 9.7 Gbit/s
/// against 7.9 on BBR and 16.8 against 11.0 on Reno; 32 KiB ones 10.0 and
/// 15.1. A connection that only exchanges small messages keeps a 16 KiB
/// buffer.
pub(crate) struct ReadSize {
    records: usize,
}

impl ReadSize {
    const MAX_RECORDS: usize = 3;

    pub(crate) fn new() -> ReadSize {
        ReadSize { records: 1 }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.records * 16 * 1024 - 9
    }

    /// After a read of `got` bytes that asked for `asked`: one that filled
    /// its room means more is waiting.
    pub(crate) fn grow_after(&mut self, got: usize, asked: usize) {
        if got >= asked && self.records < Self::MAX_RECORDS {
            self.records = (self.records * 2).min(Self::MAX_RECORDS);
        }
    }
}

/// One read of at most `size.bytes()` into `buf`. Small reads share one
/// allocation (what is read goes to HTTP/2 as a slice of it) until less
/// than a quarter of a read's room is left; then a new one is taken.
async fn read_sized<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    size: &mut ReadSize,
    guard: &mut Option<ReadGuard>,
) -> std::io::Result<usize> {
    use bytes::BufMut;
    let want = size.bytes();
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
    let asked = want.min(buf.capacity() - buf.len());
    let n = read.read_buf(&mut (&mut *buf).limit(asked)).await?;
    size.grow_after(n, asked);
    if let Some(g) = guard {
        g.after_read(n, asked);
    }
    Ok(n)
}

/// Bytes moved so far, readable while the splice runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// From the local socket into the tunnel.
    pub sent: AtomicU64,
    /// From the tunnel to the local socket.
    pub received: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions finished normally.
    Done,
    /// The local socket failed.
    LocalError,
    /// The tunnel stream failed or was reset.
    PeerError,
}

impl SpliceEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            SpliceEnd::Done => "ok",
            SpliceEnd::LocalError => "local_error",
            SpliceEnd::PeerError => "peer_error",
        }
    }
}

pub(crate) enum Side {
    Local(std::io::Error),
    Peer(String),
}

impl Side {
    /// How the splice ended, and why, for its caller.
    pub(crate) fn end(self) -> (SpliceEnd, Option<String>) {
        match self {
            Side::Local(e) => (SpliceEnd::LocalError, Some(e.to_string())),
            Side::Peer(e) => (SpliceEnd::PeerError, Some(e)),
        }
    }
}

async fn socket_to_h2<R: AsyncRead + Unpin>(
    mut read: R,
    tx: &mut h2::SendStream<Bytes>,
    counters: &Counters,
    mut guard: Option<ReadGuard>,
) -> Result<(), Side> {
    let mut buf = BytesMut::new();
    let mut size = ReadSize::new();
    loop {
        let n = read_sized(&mut read, &mut buf, &mut size, &mut guard)
            .await
            .map_err(Side::Local)?;
        if n == 0 {
            return tx
                .send_data(Bytes::new(), true)
                .map_err(|e| Side::Peer(e.to_string()));
        }
        let mut data = buf.split().freeze();
        counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            while tx.capacity() == 0 {
                if let Some(g) = &mut guard {
                    g.tunnel_full();
                }
                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Side::Peer(e.to_string())),
                    None => return Err(Side::Peer("stream closed".to_string())),
                }
            }
            let n = tx.capacity().min(data.len());
            tx.send_data(data.split_to(n), false)
                .map_err(|e| Side::Peer(e.to_string()))?;
        }
    }
}

async fn h2_to_socket<W: AsyncWrite + Unpin>(
    mut rx: h2::RecvStream,
    mut write: W,
    counters: &Counters,
    mut guard: Option<WriteGuard>,
) -> Result<(), Side> {
    let mut chunks: [Bytes; CHUNKS] = Default::default();
    loop {
        let (n, end) = std::future::poll_fn(|cx| poll_h2_chunks(&mut rx, cx, &mut chunks)).await;
        if n > 0 {
            let len = deliver(&mut write, &mut chunks[..n], counters, &mut guard).await?;
            let _ = rx.flow_control().release_capacity(len);
        }
        match end {
            None => {}
            Some(Ok(())) => return write.shutdown().await.map_err(Side::Local),
            Some(Err(e)) => return Err(Side::Peer(e.to_string())),
        }
    }
}

/// Bytes taken from h2 for one `writev`: a bound on the flow-control
/// credit held back while they are written (one 48 KiB bulk frame and a
/// few more).
const H2_BATCH: usize = 192 * 1024;

/// Waits for the stream's next DATA frame, then takes the ones already
/// received behind it (up to [`CHUNKS`] frames or [`H2_BATCH`] bytes)
/// without waiting, so that a response the server wrote in two parts (its
/// head, then its body: two frames, read from the tunnel at once) goes to
/// the app in one `writev`, not a `send` each. Returns how many chunks it
/// took and, when the stream ended or failed behind them, how.
fn poll_h2_chunks(
    rx: &mut h2::RecvStream,
    cx: &mut std::task::Context<'_>,
    chunks: &mut [Bytes; CHUNKS],
) -> std::task::Poll<(usize, Option<Result<(), h2::Error>>)> {
    use std::task::Poll;
    let mut n = 0;
    let mut len = 0;
    while n < chunks.len() && len < H2_BATCH {
        match rx.poll_data(cx) {
            Poll::Ready(Some(Ok(b))) => {
                len += b.len();
                chunks[n] = b;
                n += 1;
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready((n, Some(Err(e)))),
            Poll::Ready(None) => return Poll::Ready((n, Some(Ok(())))),
            Poll::Pending if n == 0 => return Poll::Pending,
            Poll::Pending => break,
        }
    }
    Poll::Ready((n, None))
}

/// The two directions of a tunnel stream, on either transport.
/// Awaits `fut`, calling `on_wait` once if it is not ready at once.
pub(crate) async fn noting_wait<F: std::future::Future>(
    fut: F,
    on_wait: impl FnOnce(),
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut on_wait = Some(on_wait);
    std::future::poll_fn(|cx| {
        let polled = fut.as_mut().poll(cx);
        if polled.is_pending()
            && let Some(f) = on_wait.take()
        {
            f();
        }
        polled
    })
    .await
}

/// A TLS stream of either side, boxed (dedicated tunnel connections).
pub trait RawIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RawIo for T {}

pub enum Halves {
    H2(h2::SendStream<Bytes>, h2::RecvStream),
    Quic(quinn::SendStream, quinn::RecvStream),
    Dedicated(super::dedicated::Halves),
}

/// Splices `socket` with the tunnel stream until both directions end or
/// one fails (then the other is torn down: the stream is reset, the socket
/// closed).
pub async fn splice(
    socket: tokio::net::TcpStream,
    halves: Halves,
    counters: Arc<Counters>,
    guard: Option<Guard>,
) -> (SpliceEnd, Option<String>) {
    match halves {
        Halves::H2(tx, rx) => splice_h2(socket, tx, rx, counters, guard).await,
        Halves::Quic(tx, rx) => splice_quic(socket, tx, rx, counters, guard).await,
        Halves::Dedicated(h) => super::dedicated::splice(socket, h, counters, guard).await,
    }
}

async fn socket_to_quic<R: AsyncRead + Unpin>(
    mut read: R,
    tx: &mut quinn::SendStream,
    counters: &Counters,
    mut guard: Option<ReadGuard>,
) -> Result<(), Side> {
    let mut buf = BytesMut::new();
    let mut size = ReadSize::new();
    loop {
        let n = read_sized(&mut read, &mut buf, &mut size, &mut guard)
            .await
            .map_err(Side::Local)?;
        if n == 0 {
            return tx.finish().map_err(|e| Side::Peer(e.to_string()));
        }
        counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        // write_chunk hands the bytes to quinn without another copy.
        let write = tx.write_chunk(buf.split().freeze());
        noting_wait(write, || {
            if let Some(g) = &mut guard {
                g.tunnel_full();
            }
        })
        .await
        .map_err(|e| Side::Peer(e.to_string()))?;
    }
}

/// Chunks taken from the tunnel stream at a time, to go to the socket
/// together in one `writev` rather than a `send` each: over QUIC each is
/// one STREAM frame (at most a packet's payload, ~1.4 KB), over HTTP/2 one
/// DATA frame.
const CHUNKS: usize = 32;

async fn quic_to_socket<W: AsyncWrite + Unpin>(
    mut rx: quinn::RecvStream,
    mut write: W,
    counters: &Counters,
    mut guard: Option<WriteGuard>,
) -> Result<(), Side> {
    let mut chunks: [Bytes; CHUNKS] = Default::default();
    loop {
        match rx.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                deliver(&mut write, &mut chunks[..n], counters, &mut guard).await?;
            }
            Ok(None) => return write.shutdown().await.map_err(Side::Local),
            Err(e) => return Err(Side::Peer(e.to_string())),
        }
    }
}

/// Writes chunks from the tunnel to the app's socket ([`write_all_chunks`]),
/// lets the guard see them and counts them; returns how many bytes.
async fn deliver<W: AsyncWrite + Unpin>(
    write: &mut W,
    chunks: &mut [Bytes],
    counters: &Counters,
    guard: &mut Option<WriteGuard>,
) -> Result<usize, Side> {
    let len: usize = chunks.iter().map(Bytes::len).sum();
    write_all_chunks(write, chunks).await.map_err(Side::Local)?;
    if let Some(g) = guard {
        g.after_write(len).await;
    }
    counters.received.fetch_add(len as u64, Ordering::Relaxed);
    Ok(len)
}

/// Writes every chunk, as few `writev` calls as the socket allows; the
/// chunks are consumed (left empty).
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    write: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    use bytes::Buf;
    let mut first = 0;
    while first < chunks.len() {
        let mut n = {
            let mut slices = [std::io::IoSlice::new(&[]); CHUNKS];
            let mut k = 0;
            for c in chunks[first..].iter().filter(|c| !c.is_empty()) {
                if k == slices.len() {
                    break;
                }
                slices[k] = std::io::IoSlice::new(c);
                k += 1;
            }
            if k == 0 {
                return Ok(());
            }
            write.write_vectored(&slices[..k]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < chunks.len() {
            let take = n.min(chunks[first].len());
            chunks[first].advance(take);
            n -= take;
            if chunks[first].is_empty() {
                first += 1;
            }
        }
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

/// Runs both directions of a splice until both end or one fails, and
/// says which failed; `retire` (the sockmap's, [`Guard::split`]) is polled
/// alongside and never ends.
pub(crate) async fn both_ways(
    up: impl std::future::Future<Output = Result<(), Side>>,
    down: impl std::future::Future<Output = Result<(), Side>>,
    retire: impl std::future::Future<Output = ()>,
) -> Option<Side> {
    tokio::pin!(up, down, retire);
    let mut up_done = false;
    let mut down_done = false;
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                if let Err(e) = r { return Some(e); }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                if let Err(e) = r { return Some(e); }
            }
            () = &mut retire => {}
        }
    }
    None
}

async fn splice_quic(
    socket: tokio::net::TcpStream,
    mut tx: quinn::SendStream,
    rx: quinn::RecvStream,
    counters: Arc<Counters>,
    guard: Option<Guard>,
) -> (SpliceEnd, Option<String>) {
    let (read, write) = socket.into_split();
    let failure: Option<Side> = {
        let (reading, writing, retire) = Guard::split(guard);
        let up = socket_to_quic(read, &mut tx, &counters, reading);
        let down = quic_to_socket(rx, write, &counters, writing);
        both_ways(up, down, retire).await
    };
    match failure {
        None => {
            // Let quinn deliver what is buffered before the stream goes.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tx.stopped()).await;
            (SpliceEnd::Done, None)
        }
        Some(side) => {
            let _ = tx.reset(quinn::VarInt::from_u32(1));
            side.end()
        }
    }
}

async fn splice_h2(
    socket: tokio::net::TcpStream,
    mut tx: h2::SendStream<Bytes>,
    rx: h2::RecvStream,
    counters: Arc<Counters>,
    guard: Option<Guard>,
) -> (SpliceEnd, Option<String>) {
    let (read, write) = socket.into_split();
    let failure: Option<Side> = {
        let (reading, writing, retire) = Guard::split(guard);
        let up = socket_to_h2(read, &mut tx, &counters, reading);
        let down = h2_to_socket(rx, write, &counters, writing);
        both_ways(up, down, retire).await
    };
    match failure {
        None => (SpliceEnd::Done, None),
        Some(side) => {
            tx.send_reset(h2::Reason::CANCEL);
            side.end()
        }
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    #[test]
    fn reads_grow_while_they_fill_and_frames_stay_whole_records() {
        let mut size = ReadSize::new();
        assert_eq!(size.bytes() + 9, 16 * 1024);
        // A short read (a request) keeps it small.
        size.grow_after(500, size.bytes());
        assert_eq!(size.bytes() + 9, 16 * 1024);
        // A read that filled what was left of the buffer counts as full.
        size.grow_after(3000, 3000);
        assert_eq!(size.bytes() + 9, 32 * 1024);
        let mut seen = Vec::new();
        for _ in 0..7 {
            size.grow_after(size.bytes(), size.bytes());
            seen.push((size.bytes() + 9) / (16 * 1024));
        }
        assert_eq!(seen, [3, 3, 3, 3, 3, 3, 3]);
        assert_eq!((size.bytes() + 9) % (16 * 1024), 0);
    }

    #[tokio::test]
    async fn chunks_arrive_whole_and_in_order_through_partial_writes() {
        // A pipe of 7 bytes: every write is partial, and duplex writes only
        // the first slice of a vectored write.
        let (mut a, mut b) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            b.read_to_end(&mut all).await.map(|_| all)
        });
        let mut chunks: Vec<Bytes> = vec![
            Bytes::from_static(b"hello "),
            Bytes::new(),
            Bytes::from(vec![b'x'; 1000]),
            Bytes::from_static(b" and "),
            Bytes::from_static(b"goodbye"),
        ];
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        write_all_chunks(&mut a, &mut chunks).await.expect("write");
        assert!(chunks.iter().all(Bytes::is_empty));
        drop(a);
        assert_eq!(reader.await.expect("reader").expect("read"), want);
    }

    /// Records each write the app's socket would see.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
            let n = all.len();
            self.0.push(all);
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_already_received_go_to_the_socket_in_one_write() {
        // A response its server wrote in two parts, head then body: two
        // DATA frames, both received before meshd reads the stream.
        let (c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.expect("server handshake");
            let (_req, mut respond) = conn.accept().await.expect("a request").expect("h2");
            let mut tx = respond
                .send_response(http::Response::new(()), false)
                .expect("response");
            tx.send_data(Bytes::from(vec![b'h'; 240]), false)
                .expect("head");
            tx.send_data(Bytes::from(vec![b'b'; 1024]), true)
                .expect("body");
            // Keep the connection going until the client is done.
            while conn.accept().await.is_some() {}
        });
        let (mut client, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(conn);
        let (response, _tx) = client
            .send_request(http::Request::new(()), false)
            .expect("request");
        let mut rx = response.await.expect("response").into_body();
        let want = 240 + 1024;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while rx.flow_control().used_capacity() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "both frames did not arrive"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let counters = Counters::default();
        let mut writes = Writes::default();
        assert!(h2_to_socket(rx, &mut writes, &counters, None).await.is_ok());
        assert_eq!(writes.0.len(), 1, "one write for both frames");
        let mut expected = vec![b'h'; 240];
        expected.extend(vec![b'b'; 1024]);
        assert_eq!(writes.0[0], expected);
        assert_eq!(counters.received.load(Ordering::Relaxed), want as u64);
        drop(client);
        server.abort();
    }

    #[tokio::test]
    async fn a_closed_socket_is_an_error() {
        let (mut a, b) = tokio::io::duplex(4);
        drop(b);
        let mut chunks = vec![Bytes::from_static(b"lost bytes")];
        assert!(write_all_chunks(&mut a, &mut chunks).await.is_err());
    }
}
