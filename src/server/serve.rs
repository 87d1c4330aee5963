//! The accept loop: HTTP/1.1 (with WebSocket upgrades) over plain TCP or TLS, on hyper-util.
//!
//! Ours rather than `axum::serve` for three things that one does not offer: TLS, a timer (so a
//! client that trickles its request headers is cut after `header_read_timeout_secs` instead of
//! holding a socket and its read buffer for ever), and the listen backlog. Each connection runs
//! on its own task: the TLS handshake (bounded by the same timeout) never stalls the accept loop.

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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;

/// How connections are served.
pub struct ServeOptions {
    pub tls: Option<Arc<Tls>>,
    /// Longest a client may take to send a request's headers (and a TLS handshake).
    pub header_read_timeout: Duration,
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
        // Signaling is small messages that must go out at once: without TCP_NODELAY, Nagle's
        // algorithm meets the client's delayed ACK and every handshake step waits ~40 ms
        // (measured by the load benchmark: handshake p50 42.5 ms → 0.43 ms).
        let _ = tcp.set_nodelay(true);
        // Small reads (a WebSocket's few-byte read buffer) are served from one syscall's worth.
        let io = ReadAhead::new(tcp);
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
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_one(&builder, io, service, watcher).await;
            };
            match tokio::time::timeout(timeout, tls.acceptor.accept(io)).await {
                Ok(Ok(io)) => serve_one(&builder, io, service, watcher).await,
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
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
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::trace!(error = %e, "connection ended with an error");
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
