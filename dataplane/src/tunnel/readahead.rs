//! A read buffer under a tunnel connection's TLS.
//!
//! rustls reads at most one TLS record (about 16 KiB) per `read` of its
//! socket, so a bulk stream cost one `recvfrom` per record on the
//! receiving side, and one `writev` to the app per record after it
//! (docs/BENCHMARKS.md, "Reading ahead of TLS"). Under a stream that is
//! behind (a read filled all the room rustls gave it), [`ReadAhead`] reads
//! whatever the socket holds, up to [`MAX`], in one call and hands it to
//! rustls from memory; [`Gauge`] tells the reader above TLS that more is
//! there without another system call, so it can take several records
//! before it writes to the app.
//!
//! Request-and-answer traffic never switches it on: a read that leaves
//! room in rustls's buffer goes straight into it, and the buffer is let go
//! once a read comes back short, so an idle or chatty connection holds
//! none.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The buffer a stream that fell behind starts with.
pub const START: usize = 64 * 1024;
/// The most read ahead at once (the buffer doubles up to it after reads
/// that filled it).
pub const MAX: usize = 256 * 1024;
/// A read of less than this, in read-ahead mode, ends it: less than one
/// whole TLS record was waiting.
const SHORT: usize = 16 * 1024;

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
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Reading into `buf` rather than straight into the caller's room.
    ahead: bool,
    gauge: Gauge,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> ReadAhead<T> {
        ReadAhead {
            io,
            buf: Box::default(),
            start: 0,
            end: 0,
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

    fn set_gauge(&self) {
        self.gauge.0.store(self.end - self.start, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.start == me.end {
            if !me.ahead {
                // Straight into the caller's room; a read that fills it
                // means more is waiting: read ahead from the next one.
                let room = dst.remaining();
                let before = dst.filled().len();
                ready!(Pin::new(&mut me.io).poll_read(cx, dst))?;
                let n = dst.filled().len() - before;
                me.ahead = room > 0 && n == room;
                return Poll::Ready(Ok(()));
            }
            if me.buf.is_empty() {
                me.buf = vec![0; START].into_boxed_slice();
            }
            let mut rb = ReadBuf::new(&mut me.buf);
            ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            me.start = 0;
            me.end = n;
            if n < SHORT {
                // Caught up: back to reading straight through, and the
                // buffer goes once what it holds is taken.
                me.ahead = false;
            } else if n == me.buf.len() && n < MAX {
                // Filled: a bigger buffer for the next read (this one's
                // bytes are copied over once).
                let mut bigger = vec![0; (n * 2).min(MAX)].into_boxed_slice();
                bigger[..n].copy_from_slice(&me.buf[..n]);
                me.buf = bigger;
            }
        }
        let n = dst.remaining().min(me.end - me.start);
        dst.put_slice(&me.buf[me.start..me.start + n]);
        me.start += n;
        if me.start == me.end && !me.ahead {
            me.buf = Box::default();
            me.start = 0;
            me.end = 0;
        }
        me.set_gauge();
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
        assert!(r.buf.is_empty(), "no buffer held");
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
        assert_eq!(read_with_room(&mut r, 16 * 1024).await.len(), 16 * 1024);
        // One read into the buffer took what it had room for.
        assert_eq!(gauge.buffered(), START - 16 * 1024);
        let mut got = 32 * 1024;
        while got < 200_000 {
            got += read_with_room(&mut r, 16 * 1024).await.len();
        }
        assert_eq!(got, 200_000);
        assert!(r.buf.len() > START, "a read that filled it grew the buffer");
        assert_eq!(gauge.buffered(), 0);
        // A short read ends read-ahead and lets the buffer go.
        far.write_all(&[3u8; 100]).await.unwrap();
        assert_eq!(read_with_room(&mut r, 16 * 1024).await, vec![3u8; 100]);
        assert!(!r.ahead);
        assert!(r.buf.is_empty());
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
