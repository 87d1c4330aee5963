//! How the server serves, over real sockets: HTTPS with a certificate made at start (pages and
//! the WebSocket over TLS, the fingerprint it reports is the one it serves), a client trickling
//! its headers cut off while others are served, the listen backlog.
//!
//! Run with `cargo test --features ssr --test serving`.

mod common;

use beamdrop::protocol::ServerMsg;
use beamdrop::server::config::{Config, Limits, TlsConfig};
use beamdrop::server::metrics::{Gauge, Rejection};
use beamdrop::server::RunningServer;
use common::*;
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

/// Accepts any certificate (as a person does after comparing fingerprints) and keeps the one
/// the server presented, so the test can compare it with what the server printed.
#[derive(Debug, Default)]
struct Pinning {
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Pinning {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = ring::default_provider().signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, &algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = ring::default_provider().signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, &algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn tls_connect(
    addr: SocketAddr,
    verifier: Arc<Pinning>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    timeout(
        STEP,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake succeeds")
}

/// One request, `Connection: close`, over any stream: the response's status line and body.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // A TLS peer may end without close_notify after Connection: close; what arrived counts.
    let _ = timeout(STEP, stream.read_to_end(&mut raw))
        .await
        .expect("response in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.to_string())
}

#[tokio::test]
async fn https_with_a_self_signed_certificate_serves_pages_and_the_websocket() {
    let server = server_with(Config {
        tls: Some(TlsConfig {
            self_signed: true,
            ..TlsConfig::default()
        }),
        ..config()
    })
    .await;
    let printed = server.tls_fingerprint.clone().expect("serving HTTPS");

    let verifier = Arc::new(Pinning::default());
    let mut tls = tls_connect(server.addr, verifier.clone()).await;
    let (status, body) = get(&mut tls, "/healthz").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "ok");
    let served = verifier
        .seen
        .lock()
        .unwrap()
        .clone()
        .expect("a certificate");
    assert_eq!(beamdrop::server::tls::fingerprint(&served), printed);

    // The signaling socket over the same TLS (wss://).
    let tls = tls_connect(server.addr, verifier.clone()).await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    let (mut ws, _) = timeout(STEP, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("handshake in time")
        .expect("wss handshake");
    let frame = timeout(STEP, ws.next()).await.expect("welcome in time");
    let Some(Ok(Message::Text(text))) = frame else {
        panic!("expected a text frame, got {frame:?}");
    };
    assert!(matches!(
        serde_json::from_str::<ServerMsg>(text.as_str()).unwrap(),
        ServerMsg::Welcome { .. }
    ));

    // Plain HTTP on the HTTPS port gets no page: the TLS handshake fails and the socket closes.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    let (status, _) = get(&mut plain, "/healthz").await;
    assert!(!status.contains("200"), "plain HTTP answered: {status}");
    stop(server).await;
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_and_others_are_served() {
    let server = server_with(Config {
        limits: Limits {
            header_read_timeout_secs: 1,
            // All from 127.0.0.1: the per-address cap would turn most away before this test
            // could see the timeout at work (that cap has a test of its own).
            max_http_connections_per_ip: 0,
            ..Limits::default()
        },
        ..config()
    })
    .await;
    let addr = server.addr;
    let rss_before = rss_kib();
    // A thousand slowloris clients: one header byte every 200 ms, never the blank line.
    let started = Instant::now();
    let slow: Vec<_> = (0..1000)
        .map(|_| {
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
                    .await
                    .unwrap();
                for _ in 0..50 {
                    sleep(Duration::from_millis(200)).await;
                    if tcp.write_all(b"X").await.is_err() {
                        return Instant::now();
                    }
                    // The server closing shows as a read of 0 (or a reset).
                    let mut byte = [0u8; 512];
                    match timeout(Duration::from_millis(1), tcp.read(&mut byte)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Instant::now(),
                        Ok(Ok(_)) => return Instant::now(), // a 408-style answer, then close
                        Err(_) => {}
                    }
                }
                panic!("still connected after 10 s of trickled headers");
            })
        })
        .collect();
    // Meanwhile a normal client is served at once.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (status, body) = get(&mut tcp, "/healthz").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"));
    // Memory while they hold their connections: sampled until the 1 s timeout starts cutting
    // them off. The server's side of each (and, in this process, the client's) costs kilobytes,
    // not a header buffer's worth.
    let deadline = Instant::now() + STEP;
    let (mut most_held, mut peak_kib) = (0, 0);
    while server.metrics.rejections(Rejection::HeaderTimeout) == 0 {
        most_held = most_held.max(server.metrics.gauge_value(Gauge::HttpConnections));
        peak_kib = peak_kib.max(rss_kib());
        assert!(
            Instant::now() < deadline,
            "no client cut off within {STEP:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let growth_kib = peak_kib.saturating_sub(rss_before);
    println!(
        "1,000 trickling clients: process RSS +{:.1} MiB at most, {most_held} held at once",
        growth_kib as f64 / 1024.0,
    );
    assert!(growth_kib < 64 * 1024, "RSS grew {growth_kib} KiB");
    for client in slow {
        let cut = client.await.expect("slow client task");
        let after = cut - started;
        // The timeout is 1 s; trickled bytes do not extend it. A loaded machine may be late.
        assert!(after < Duration::from_secs(8), "cut after {after:?}");
    }
    let (_ws, _me) = connect(addr).await;
    let metrics = metrics_text(addr).await;
    assert!(
        metrics.contains("beamdrop_rejections_total{reason=\"header_timeout\"} 1000"),
        "{metrics}"
    );
    stop(server).await;
}

/// This process's resident memory (the server runs in it), from `/proc/self/status`.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn metrics_text(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    get(&mut tcp, "/metrics").await.1
}

/// Whether the server closed `tcp` (a read gives 0 or an error) within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed() {
    let server = server_with(Config {
        limits: Limits {
            header_read_timeout_secs: 1,
            ..Limits::default()
        },
        ..config()
    })
    .await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    // And after a request, an idle keep-alive connection is closed the same way.
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = timeout(STEP, kept.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut kept, Duration::from_secs(5)).await);
    stop(server).await;
}

#[tokio::test]
async fn connections_over_the_accept_caps_are_closed_before_a_byte_is_read() {
    // Per address.
    let server = server_with(Config {
        limits: Limits {
            max_http_connections_per_ip: 3,
            ..Limits::default()
        },
        ..config()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Accepted in order: the fourth comes once the loop has taken the three.
    http_connections(&server, 3).await;
    let mut fourth = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_within(&mut fourth, STEP).await,
        "the fourth was kept"
    );
    // The first ones are served.
    let (status, _) = get(&mut held[0], "/healthz").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    drop(held);
    let metrics = eventually_metrics(server.addr).await;
    assert!(
        metrics.contains("beamdrop_rejections_total{reason=\"connection_ip_cap\"} 1"),
        "{metrics}"
    );
    stop(server).await;

    // Per node: WebSockets count too.
    let server = server_with(Config {
        limits: Limits {
            max_connections: 2,
            ..Limits::default()
        },
        ..config()
    })
    .await;
    let (_ws, _) = connect(server.addr).await;
    let _http = TcpStream::connect(server.addr).await.unwrap();
    http_connections(&server, 1).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut third, STEP).await, "the third was kept");
    stop(server).await;
}

/// Waits until the server holds `n` HTTP connections (accepted, not upgraded).
async fn http_connections(server: &RunningServer, n: i64) {
    eventually(STEP, "the connections accepted", || async {
        server.metrics.gauge_value(Gauge::HttpConnections) == n
    })
    .await;
}

/// `/metrics` once the server has let go of closed connections (a slot frees when its task ends).
async fn eventually_metrics(addr: SocketAddr) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let (status, body) = get(&mut tcp, "/metrics").await;
        if status.contains("200") {
            return body;
        }
        assert!(Instant::now() < deadline, "no /metrics: {status}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// The accept queue length the kernel reports for a listening port (`ss`'s Send-Q).
fn listen_queue(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no listener on {port}: {text}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("unreadable ss line: {line}"))
}

#[tokio::test]
async fn the_listen_backlog_is_the_configured_one() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    // The default (1024, not the 128 of a plain bind) and a configured one.
    for (backlog, config) in [
        (Limits::default().listen_backlog, config()),
        (
            777,
            Config {
                limits: Limits {
                    listen_backlog: 777,
                    ..Limits::default()
                },
                ..config()
            },
        ),
    ] {
        let server = server_with(config).await;
        assert_eq!(listen_queue(server.addr.port()), backlog.min(somaxconn));
        stop(server).await;
    }
}
