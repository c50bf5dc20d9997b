//! A read buffer under a tunnel connection's TLS.
//!
//! rustls reads at most what one TLS record (16 KiB) still needs per
//! `read` of its socket (4 KiB when it holds nothing), so a bulk stream
//! cost one `recvfrom` per record on the receiving side, and one `writev`
//! to the app per record after it (docs/BENCHMARKS.md, "Reading ahead of
//! TLS"). Once a read fills all the room rustls gave it (more is likely
//! waiting), [`ReadAhead`] reads whatever the socket holds, up to [`MAX`],
//! in one call and hands it to rustls from memory; [`Gauge`] tells the
//! reader above TLS that more is there without another system call, so it
//! can take several records before it writes to the app. A read that
//! brings less than a record goes back to reading straight into rustls's
//! room.
//!
//! The buffer is held only while it holds bytes: once drained, or when
//! the socket has nothing, it goes back to a small per-thread spare list
//! (uninitialised memory, so neither taking one nor the pages a short read
//! leaves untouched cost anything). An idle connection holds none.

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most read ahead at once.
pub const MAX: usize = 256 * 1024;
/// A read of less than this, in read-ahead mode, ends it: less than one
/// whole TLS record was waiting.
const SHORT: usize = 16 * 1024;
/// Drained buffers kept per thread for the next stream that is behind.
const SPARES: usize = 2;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

fn take_spare() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(MAX))
}

fn put_spare(mut b: BytesMut) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            b.clear();
            // Back to the whole allocation (a drained BytesMut has
            // advanced past it).
            b.reserve(MAX);
            s.push(b);
        }
    });
}

/// How many bytes [`ReadAhead`] holds that rustls has not taken: read by
/// the connection's reader above TLS.
#[derive(Clone, Default)]
pub struct Gauge(Arc<AtomicUsize>);

impl Gauge {
    pub fn buffered(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct ReadAhead<T> {
    io: T,
    /// What was read ahead and not yet taken; never empty.
    buf: Option<BytesMut>,
    /// Reading into a buffer rather than straight into the caller's room.
    ahead: bool,
    gauge: Gauge,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> ReadAhead<T> {
        ReadAhead {
            io,
            buf: None,
            ahead: false,
            gauge: Gauge::default(),
        }
    }

    pub fn gauge(&self) -> Gauge {
        self.gauge.clone()
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let mut b = match me.buf.take() {
            Some(b) => b,
            None if !me.ahead => {
                // Straight into the caller's room; a read that fills it
                // means more is waiting: read ahead from the next one.
                let room = dst.remaining();
                let before = dst.filled().len();
                ready!(Pin::new(&mut me.io).poll_read(cx, dst))?;
                me.ahead = room > 0 && dst.filled().len() - before == room;
                return Poll::Ready(Ok(()));
            }
            None => {
                let mut b = take_spare();
                match tokio_util::io::poll_read_buf(Pin::new(&mut me.io), cx, &mut b) {
                    Poll::Ready(Ok(n)) => {
                        if n < SHORT {
                            me.ahead = false;
                        }
                        if n == 0 {
                            put_spare(b);
                            return Poll::Ready(Ok(()));
                        }
                        b
                    }
                    other => {
                        put_spare(b);
                        return other.map_ok(|_| ());
                    }
                }
            }
        };
        let n = dst.remaining().min(b.len());
        dst.put_slice(&b[..n]);
        b.advance(n);
        if b.is_empty() {
            put_spare(b);
        } else {
            me.buf = Some(b);
        }
        let held = me.buf.as_ref().map_or(0, |b| b.len());
        me.gauge.0.store(held, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_with_room(r: &mut ReadAhead<tokio::io::DuplexStream>, room: usize) -> Vec<u8> {
        let mut buf = vec![0u8; room];
        let n = r.read(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn a_read_with_room_to_spare_goes_straight_through_and_holds_nothing() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(near);
        far.write_all(&[1u8; 1000]).await.unwrap();
        assert_eq!(read_with_room(&mut r, 4096).await.len(), 1000);
        assert!(!r.ahead);
        assert!(r.buf.is_none(), "no buffer held");
        assert_eq!(r.gauge().buffered(), 0);
    }

    #[tokio::test]
    async fn a_stream_that_is_behind_is_read_ahead_and_the_gauge_says_how_much() {
        let (mut far, near) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(near);
        let gauge = r.gauge();
        far.write_all(&vec![2u8; 200_000]).await.unwrap();
        // Filled its room: read ahead from the next read on.
        assert_eq!(read_with_room(&mut r, 16 * 1024).await.len(), 16 * 1024);
        assert!(r.ahead);
        assert!(r.buf.is_none());
        // One read took all that was waiting.
        assert_eq!(read_with_room(&mut r, 16 * 1024).await.len(), 16 * 1024);
        assert_eq!(gauge.buffered(), 200_000 - 2 * 16 * 1024);
        let mut got = 32 * 1024;
        while got < 200_000 {
            got += read_with_room(&mut r, 16 * 1024).await.len();
        }
        assert_eq!(got, 200_000);
        assert_eq!(gauge.buffered(), 0);
        assert!(r.buf.is_none(), "a drained buffer is not held");
        // Nothing waiting: the read waits, holding no buffer.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut room = [0u8; 100];
        let mut rb = ReadBuf::new(&mut room);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut rb).is_pending());
        assert!(r.buf.is_none());
        // A short read ends read-ahead.
        far.write_all(&[3u8; 100]).await.unwrap();
        assert_eq!(read_with_room(&mut r, 16 * 1024).await, vec![3u8; 100]);
        assert!(!r.ahead);
        assert!(r.buf.is_none());
        // The drained buffers wait for the next stream, a few per thread.
        assert!(SPARE.with(|s| s.borrow().len()) <= SPARES);
        assert!(SPARE.with(|s| {
            s.borrow()
                .iter()
                .all(|b| b.is_empty() && b.capacity() >= MAX)
        }));
    }

    #[tokio::test]
    async fn bytes_come_out_as_they_went_in_whatever_the_sizes() {
        let (mut far, near) = tokio::io::duplex(300 * 1024);
        let mut r = ReadAhead::new(near);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let mut at = 0;
            let mut k = 0usize;
            while at < sent.len() {
                let step = [1, 700, 16_384, 100_000, 5][k % 5].min(sent.len() - at);
                far.write_all(&sent[at..at + step]).await.unwrap();
                at += step;
                k += 1;
            }
        });
        let mut out = Vec::new();
        let mut k = 0usize;
        while out.len() < data.len() {
            let room = [4096, 18_437, 1, 65_536, 333][k % 5];
            out.extend_from_slice(&read_with_room(&mut r, room).await);
            k += 1;
        }
        writer.await.unwrap();
        assert!(out == data, "the bytes differ");
        assert_eq!(read_with_room(&mut r, 10).await.len(), 0, "EOF");
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(near);
        r.write_all(b"to the peer").await.unwrap();
        r.flush().await.unwrap();
        let mut buf = [0u8; 11];
        far.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"to the peer");
    }
}
