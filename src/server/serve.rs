//! The accept loop: HTTP/1.1 (with WebSocket upgrades) over plain TCP or TLS, on hyper-util.
//!
//! Ours rather than `axum::serve` for three things that one does not offer: TLS, a timer (so a
//! client that trickles its request headers is cut after `header_read_timeout_secs` instead of
//! holding a socket and its read buffer for ever), and the listen backlog. Each connection runs
//! on its own task: the TLS handshake (bounded by the same timeout) never stalls the accept loop.

use super::limits::{IpConnections, IpSlot};
use super::metrics::{Gauge, GaugeGuard, Metrics, Rejection};
use super::read_ahead::ReadAhead;
use super::tls::Tls;
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;

/// How connections are served.
pub struct ServeOptions {
    pub tls: Option<Arc<Tls>>,
    /// Longest a client may take to send a request's headers (and a TLS handshake).
    pub header_read_timeout: Duration,
    pub admission: Admission,
}

/// Who may hold a connection at all: decided at accept, before a byte is read, so a flood of
/// idle or trickling sockets is turned away for the price of an accept and a close.
pub struct Admission {
    /// HTTP and WebSocket connections together (0: no cap).
    pub max_connections: usize,
    pub per_ip: Arc<IpConnections>,
    /// Exempt from `per_ip`: every client behind them shares their address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub metrics: Arc<Metrics>,
}

impl Admission {
    /// A place for a connection from `ip`, held while it serves HTTP; None: close it.
    fn admit(&self, ip: IpAddr) -> Option<(Option<IpSlot>, GaugeGuard)> {
        let open = self.metrics.gauge_value(Gauge::HttpConnections)
            + self.metrics.gauge_value(Gauge::PeersConnected);
        if self.max_connections > 0 && open >= self.max_connections as i64 {
            self.metrics.reject(Rejection::ConnectionCap);
            return None;
        }
        let slot = if self.trusted_proxies.iter().any(|net| net.contains(&ip)) {
            None
        } else {
            match self.per_ip.try_acquire(ip) {
                Some(slot) => Some(slot),
                None => {
                    self.metrics.reject(Rejection::ConnectionIpCap);
                    return None;
                }
            }
        };
        Some((slot, self.metrics.track(Gauge::HttpConnections)))
    }
}

/// A listening socket with `backlog` pending connections at most (the kernel caps it at
/// `net.core.somaxconn`).
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    let builder = Arc::new(builder.http1_only());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(held) = options.admission.admit(remote.ip()) else {
            continue; // dropping the stream closes it
        };
        // Signaling is small messages that must go out at once: without TCP_NODELAY, Nagle's
        // algorithm meets the client's delayed ACK and every handshake step waits ~40 ms
        // (measured by the load benchmark: handshake p50 42.5 ms → 0.43 ms).
        let _ = tcp.set_nodelay(true);
        // Small reads (a WebSocket's few-byte read buffer) are served from one syscall's worth.
        let activity = Arc::new(AtomicU64::new(clock_ms()));
        let io = Watched {
            io: ReadAhead::new(tcp),
            activity: activity.clone(),
        };
        let service = app
            .clone()
            .map_request(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(Body::new);
                // The per-IP connection cap reads the peer address from here.
                req.extensions_mut().insert(ConnectInfo(remote));
                req
            });
        let service = TowerToHyperService::new(service);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let (tls, timeout) = (options.tls.clone(), options.header_read_timeout);
        let metrics = options.admission.metrics.clone();
        tokio::spawn(async move {
            // The connection's places (per IP, in the node's count) are held until it ends.
            let _held = held;
            let idle = (activity, timeout);
            let Some(tls) = tls else {
                return serve_one(&builder, io, service, watcher, &metrics, idle).await;
            };
            match tokio::time::timeout(timeout, tls.acceptor.accept(io)).await {
                Ok(Ok(io)) => serve_one(&builder, io, service, watcher, &metrics, idle).await,
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                Err(_) => {
                    metrics.reject(Rejection::HeaderTimeout);
                    tracing::debug!(%remote, "TLS handshake timed out");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn serve_one<I, S>(
    builder: &Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    metrics: &Metrics,
    (activity, idle): (Arc<AtomicU64>, Duration),
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let conn = watcher.watch(conn.into_owned());
    let mut conn = std::pin::pin!(conn);
    // hyper times out headers once they have started; a connection that sends nothing (before
    // its first request, or between keep-alive requests) is ours to end. Once upgraded to a
    // WebSocket the connection future is done and the socket's own idle timeout takes over.
    let idle_ms = idle.as_millis() as u64;
    let result = loop {
        let quiet = clock_ms().saturating_sub(activity.load(Relaxed));
        let wait = Duration::from_millis(idle_ms.saturating_sub(quiet).max(1));
        tokio::select! {
            result = &mut conn => break result,
            () = tokio::time::sleep(wait) => {
                if clock_ms().saturating_sub(activity.load(Relaxed)) >= idle_ms {
                    metrics.reject(Rejection::IdleConnection);
                    return; // dropping the connection closes it
                }
            }
        }
    };
    if let Err(e) = result {
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            metrics.reject(Rejection::HeaderTimeout);
        }
        tracing::trace!(error = %e, "connection ended with an error");
    }
}

/// Milliseconds on a monotonic clock shared by every connection.
fn clock_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// A stream that notes when bytes last moved either way (for the idle timeout).
struct Watched<T> {
    io: T,
    activity: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn moved(&self) {
        self.activity.store(clock_ms(), Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.moved();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Accept errors are per connection (a reset before accept) or resource exhaustion (out of file
/// descriptors): for the latter, pause instead of spinning until a socket closes.
async fn accept_failed(e: io::Error) {
    let per_connection = matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    );
    if !per_connection {
        tracing::warn!(error = %e, "accept failed; pausing");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
