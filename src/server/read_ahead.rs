//! Accepted sockets that read whatever the kernel holds in one syscall, however little the reader
//! asks for, and keep no buffer while idle.
//!
//! Why: a WebSocket's read buffer starts at a few bytes so that an idle peer costs little memory
//! (see `READ_BUFFER_BYTES` in `ws.rs`), and tungstenite never reads more than that size beyond
//! what it already holds. Straight from the socket, a 200-byte signal took 3–4 `recvfrom` calls
//! and a 6 kB SDP offer about a hundred. Here one `recvfrom` takes up to [`SCRATCH_BYTES`] into a
//! per-thread scratch buffer; what the reader had no room for waits in a per-connection spill that
//! is freed as soon as it has been handed over. An idle connection holds an empty spill (no
//! allocation); a reader that brings a large buffer of its own (hyper's HTTP reads) is served
//! straight from the socket.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes one `recvfrom` may take for a small reader. A signal frame is at most 64 KiB (the frame
/// limit); most are a few hundred bytes.
const SCRATCH_BYTES: usize = 16 * 1024;

/// A reader offering at least this much room reads straight from the socket.
const DIRECT_READ_BYTES: usize = 4 * 1024;

thread_local! {
    /// Where a syscall lands before the reader's share is copied out. One per worker thread; it
    /// is never borrowed across an await (a socket read is a non-blocking call).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// A TCP stream whose small reads are served from one larger read (see the module docs).
pub struct ReadAhead {
    tcp: TcpStream,
    /// Read from the socket, not yet handed to the reader: `spill[taken..]`. Empty (and not
    /// allocated) whenever the reader has caught up.
    spill: Box<[u8]>,
    taken: usize,
}

impl ReadAhead {
    pub fn new(tcp: TcpStream) -> Self {
        ReadAhead {
            tcp,
            spill: Box::default(),
            taken: 0,
        }
    }

    /// Hands over spilled bytes, if any; frees the spill once it is empty.
    fn drain_spill(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let rest = &self.spill[self.taken..];
        if rest.is_empty() {
            return false;
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.taken += n;
        if self.taken == self.spill.len() {
            self.spill = Box::default();
            self.taken = 0;
        }
        true
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 || this.drain_spill(buf) {
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= DIRECT_READ_BYTES {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let mut landed = ReadBuf::new(scratch);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut landed))?;
            let got = landed.filled();
            let n = got.len().min(buf.remaining());
            buf.put_slice(&got[..n]);
            if n < got.len() {
                this.spill = got[n..].into();
                this.taken = 0;
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (server side wrapped in ReadAhead, client side).
    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (ReadAhead::new(server), client)
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_and_the_spill_is_freed() {
        let (mut server, mut client) = pair().await;
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        loop {
            let n = server.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, sent);
        assert!(
            server.spill.is_empty(),
            "spill kept after it was handed over"
        );
    }

    #[tokio::test]
    async fn one_syscall_takes_what_the_kernel_holds_for_a_small_reader() {
        let (mut server, mut client) = pair().await;
        client.write_all(&[7u8; 1000]).await.expect("write");
        // Let all of it arrive, then ask for 10 bytes: the other 990 came out of the socket in
        // the same call and wait in the spill.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut first = [0u8; 10];
        assert_eq!(server.read(&mut first).await.expect("read"), 10);
        assert_eq!(server.spill.len() - server.taken, 990);
        let mut rest = [0u8; 990];
        server.read_exact(&mut rest).await.expect("read the rest");
        assert_eq!(rest, [7u8; 990]);
        assert!(
            server.spill.is_empty(),
            "spill kept after it was handed over"
        );
    }

    #[tokio::test]
    async fn large_readers_and_writes_pass_through() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"hello over tcp").await.expect("write");
        let mut big = vec![0u8; 8192];
        let n = server.read(&mut big).await.expect("read");
        assert_eq!(&big[..n], b"hello over tcp");
        server.write_all(b"and back").await.expect("write back");
        let mut back = [0u8; 8];
        client.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"and back");
    }
}
