//! Hostile clients and observability, over real sockets: deep JSON, floods, too many sockets from
//! one address, foreign origins; `/metrics` counting every refusal, `/healthz` readiness.
//!
//! Run with `cargo test --features ssr --test hostile`.

mod common;

use beamdrop::protocol::{close_code, ClaimToken, ClientMsg, ErrorCode, ServerMsg, ShareId};
use beamdrop::server::config::{Config, Limits};
use common::*;
use futures::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

// ---------------------------------------------------------------------------------------------
// Helpers (the shared ones are in tests/common/mod.rs)
// ---------------------------------------------------------------------------------------------

/// The HTTP status a refused handshake got.
fn refused_status(result: Result<Ws, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the handshake succeeded"),
    }
}

async fn ping_pong(ws: &mut Ws) {
    send(ws, &ClientMsg::Ping).await;
    assert_eq!(recv(ws).await, ServerMsg::Pong);
}

/// What a client saw from the moment it stopped sending until the connection ended.
#[derive(Debug, Default)]
struct Tail {
    pongs: usize,
    rate_limited: usize,
    /// The close frame's code; `None` if the stream ended without one.
    close: Option<u16>,
}

async fn read_to_end(ws: &mut Ws) -> Tail {
    let deadline = Instant::now() + STEP;
    let mut tail = Tail::default();
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("connection still open after {STEP:?}: {tail:?}"));
        match frame {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()).unwrap() {
                ServerMsg::Pong => tail.pongs += 1,
                ServerMsg::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => tail.rate_limited += 1,
                other => panic!("unexpected {other:?}"),
            },
            Some(Ok(Message::Close(frame))) => {
                tail.close = frame.map(|f| u16::from(f.code));
                return tail;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return tail,
        }
    }
}

/// A plain HTTP/1.1 GET: (status, content type, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_get_with(addr, path, "").await
}

/// A GET with extra header lines (each ending in `\r\n`).
async fn http_get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = timeout(STEP, attempt).await.expect("HTTP response in time");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "this helper reads only fixed-length bodies: {head}"
    );
    (status, content_type, body.to_owned())
}

/// One sample from `/metrics`, by its full name with labels, e.g.
/// `beamdrop_rejections_total{reason="bad_message"}`.
async fn metric(addr: SocketAddr, sample: &str) -> i64 {
    let (status, _, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in\n{body}"))
}

/// The sum of `beamdrop_rejections_total` over all reasons.
async fn all_rejections(addr: SocketAddr) -> i64 {
    let (_, _, body) = http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("beamdrop_rejections_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<i64>().unwrap())
        .sum()
}

/// Reads raw frames until the server's close frame; its code (`None` if the stream just ends).
async fn raw_close_code(tcp: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(STEP, read_all)
        .await
        .expect("the server ends the connection");
    take_frames(&mut buf)
        .into_iter()
        .find(|(opcode, payload)| *opcode == 8 && payload.len() >= 2)
        .map(|(_, payload)| u16::from_be_bytes([payload[0], payload[1]]))
}

fn rejections(reason: &str) -> String {
    format!("beamdrop_rejections_total{{reason=\"{reason}\"}}")
}

/// Polls `/metrics` until `sample` reaches `want` (gauges settle after a socket task ends).
async fn metric_reaches(addr: SocketAddr, sample: &str, want: i64) {
    let deadline = Instant::now() + STEP;
    loop {
        let got = metric(addr, sample).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} is {got}, expected {want}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused_before_parsing_and_the_connection_survives() {
    let server = server_with(config()).await;
    let (mut ws, _) = connect(server.addr).await;
    let depth = Limits::default().max_json_depth;
    let nested = |n: usize| {
        format!(
            r#"{{"type":"ping","x":{}{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
    };

    // Within the limit: unknown fields are ignored, so this is still a Ping.
    send_text(&mut ws, nested(depth - 1)).await;
    assert_eq!(recv(&mut ws).await, ServerMsg::Pong);

    // One level deeper; a 60 KiB bracket bomb (far past serde_json's own recursion limit); an
    // unterminated one; objects instead of arrays.
    let bombs = [
        nested(depth),
        "[".repeat(30 * 1024) + &"]".repeat(30 * 1024),
        "[".repeat(60 * 1024),
        r#"{"a":"#.repeat(depth + 1),
    ];
    for bomb in &bombs {
        send_text(&mut ws, bomb.clone()).await;
        expect_error(&mut ws, ErrorCode::BadMessage).await;
    }
    // Brackets inside strings are payload, not nesting.
    let payload = "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[{{{{{{{{{{{{{{{{{{\\\"";
    send_text(&mut ws, format!(r#"{{"type":"ping","x":"{payload}"}}"#)).await;
    assert_eq!(recv(&mut ws).await, ServerMsg::Pong);

    ping_pong(&mut ws).await;
    assert_eq!(metric(server.addr, &rejections("too_deep")).await, 4);
    assert_eq!(metric(server.addr, &rejections("bad_message")).await, 0);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_rate_limited_then_closed_and_a_paced_client_recovers() {
    let server = server_with(Config {
        limits: Limits {
            rate_limit_burst: 5,
            rate_limit_per_sec: 2,
            rate_limit_close_after: 10,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let addr = server.addr;

    // Lock-step: a burst of 5 is answered, the next messages get `rate_limited`.
    let (mut paced, _) = connect(addr).await;
    let started = Instant::now();
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..8 {
        send(&mut paced, &ClientMsg::Ping).await;
        match recv(&mut paced).await {
            ServerMsg::Pong => pongs += 1,
            ServerMsg::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // At 2/s, a token may have come back if the loop was slow.
    let refilled = (started.elapsed().as_secs_f64() * 2.0) as usize;
    assert!(
        (5..=5 + refilled).contains(&pongs) && limited == 8 - pongs,
        "{pongs} pongs, {limited} rate limited"
    );
    // Slowing down is enough: the bucket refills and the connection was never in danger.
    sleep(Duration::from_millis(600)).await;
    ping_pong(&mut paced).await;

    // A flood: everything at once, nothing read until the end. The burst is answered, 9 messages
    // get `rate_limited`, the 10th refusal closes the socket with a code that says why.
    let (mut flood, _) = connect(addr).await;
    for _ in 0..60 {
        send(&mut flood, &ClientMsg::Ping).await;
    }
    let tail = read_to_end(&mut flood).await;
    assert_eq!(tail.close, Some(close_code::RATE_LIMITED), "{tail:?}");
    assert_eq!(tail.rate_limited, 9, "{tail:?}");
    assert!((5..=6).contains(&tail.pongs), "{tail:?}");

    // The flood cost only the flooder its connection.
    sleep(Duration::from_millis(600)).await;
    ping_pong(&mut paced).await;
    let limited_total = metric(addr, &rejections("rate_limited")).await;
    assert_eq!(limited_total, limited as i64 + 10);
    assert_eq!(
        metric(addr, "beamdrop_disconnects_total{cause=\"rate_limited\"}").await,
        1
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_cap_are_refused_with_429() {
    let server = server_with(Config {
        limits: Limits {
            max_connections_per_ip: 3,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(addr).await.0);
    }
    assert_eq!(refused_status(open_from(addr, None).await), 429);
    assert_eq!(refused_status(open_from(addr, None).await), 429);

    // The first ones are unaffected.
    for ws in &mut clients {
        ping_pong(ws).await;
    }

    // A slot comes back when a socket's task ends.
    let mut gone = clients.pop().unwrap();
    timeout(STEP, gone.close(None)).await.unwrap().unwrap();
    let deadline = Instant::now() + STEP;
    let (mut again, _) = loop {
        match open_from(addr, None).await {
            Ok(ws) => break welcome(ws).await,
            Err(tungstenite::Error::Http(r)) if r.status() == 429 => {
                assert!(
                    Instant::now() < deadline,
                    "the closed socket's slot never came back"
                );
                sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("unexpected handshake error {e}"),
        }
    };
    ping_pong(&mut again).await;
    assert_eq!(refused_status(open_from(addr, None).await), 429);

    let refused = metric(addr, &rejections("ip_cap")).await;
    assert!(refused >= 3, "ip_cap rejections: {refused}");
    metric_reaches(addr, "beamdrop_peers_connected", 3).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_get_403_and_the_pages_own_origin_is_accepted() {
    let server = server_with(Config {
        allowed_origins: vec!["https://drop.example.org".into()],
        ..config()
    })
    .await;
    let addr = server.addr;

    let foreign = [
        "https://evil.example".to_string(),
        format!("http://127.0.0.1:{}", addr.port().wrapping_add(1).max(1)),
        format!("http://localhost:{}", addr.port()),
        "null".to_string(),
    ];
    for origin in &foreign {
        assert_eq!(
            refused_status(open_from(addr, Some(origin)).await),
            403,
            "Origin: {origin}"
        );
    }

    // The page's own origin (what the browser sends for pages this server served), a listed
    // origin, and no Origin at all (not a browser).
    for origin in [
        Some(format!("http://{addr}")),
        Some("https://drop.example.org".into()),
        None,
    ] {
        let ws = open_from(addr, origin.as_deref())
            .await
            .unwrap_or_else(|e| panic!("Origin {origin:?} refused: {e}"));
        let (mut ws, _) = welcome(ws).await;
        ping_pong(&mut ws).await;
    }
    assert_eq!(
        metric(addr, &rejections("origin")).await,
        foreign.len() as i64
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic_and_every_rejection() {
    let server = server_with(config()).await;
    let addr = server.addr;

    let (status, content_type, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(
        body.contains("# TYPE beamdrop_rejections counter"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE beamdrop_peers_connected gauge"),
        "{body}"
    );

    let (mut a, a_id) = connect(addr).await;
    let (mut b, b_id) = connect(addr).await;
    metric_reaches(addr, "beamdrop_peers_connected", 2).await;

    // A bad message, a signal to a stranger, a join of a share that does not exist.
    send_text(&mut b, "{not json".into()).await;
    expect_error(&mut b, ErrorCode::BadMessage).await;
    send(
        &mut b,
        &ClientMsg::Signal {
            to: a_id,
            payload: "hi".into(),
        },
    )
    .await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;
    let missing: ShareId = "0123456789abcdef0123456789abcdef".parse().unwrap();
    send(&mut b, &ClientMsg::Join { share: missing }).await;
    expect_error(&mut b, ErrorCode::NoSuchShare).await;
    assert!(metric(addr, &rejections("bad_message")).await >= 1);
    assert_eq!(metric(addr, &rejections("unknown_peer")).await, 1);
    assert_eq!(metric(addr, &rejections("no_such_share")).await, 1);
    assert_eq!(
        metric(addr, "beamdrop_joins_total{outcome=\"no_such_share\"}").await,
        1
    );

    // A share, a join and a relayed signal.
    send(&mut a, &ClientMsg::CreateShare).await;
    let ServerMsg::ShareCreated { share, token } = recv(&mut a).await else {
        panic!("expected ShareCreated");
    };
    assert_eq!(metric(addr, "beamdrop_shares").await, 1);
    send(
        &mut b,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    assert!(matches!(recv(&mut b).await, ServerMsg::Joined { .. }));
    assert!(matches!(recv(&mut a).await, ServerMsg::PeerJoined { .. }));
    send(
        &mut b,
        &ClientMsg::Signal {
            to: a_id,
            payload: "offer".into(),
        },
    )
    .await;
    assert_eq!(
        recv(&mut a).await,
        ServerMsg::Signal {
            from: b_id,
            payload: "offer".into()
        }
    );
    assert_eq!(
        metric(addr, "beamdrop_joins_total{outcome=\"ok\"}").await,
        1
    );
    assert_eq!(metric(addr, "beamdrop_messages_relayed_total").await, 1);
    assert_eq!(metric(addr, "beamdrop_connections_total").await, 2);

    // A binary frame closes B; the sender leaving takes its share with it.
    timeout(STEP, b.send(Message::binary(b"\x00\x01".to_vec())))
        .await
        .unwrap()
        .unwrap();
    let tail = read_to_end(&mut b).await;
    assert_eq!(tail.close, Some(close_code::BAD_FRAME));
    assert_eq!(metric(addr, &rejections("binary_frame")).await, 1);
    timeout(STEP, a.close(None)).await.unwrap().unwrap();
    metric_reaches(addr, "beamdrop_peers_connected", 0).await;
    metric_reaches(addr, "beamdrop_shares", 0).await;
    assert_eq!(
        metric(addr, "beamdrop_disconnects_total{cause=\"bad_frame\"}").await,
        1
    );
    assert_eq!(metric(addr, "beamdrop_backend_errors_total").await, 0);

    // The sender back on a new socket: a reclaim with a wrong token is a refusal (with its own
    // reason); one with the right token is counted and makes the share live again.
    let (mut a2, _) = connect(addr).await;
    let wrong: ClaimToken = "0123456789abcdef0123456789abcdef".parse().unwrap();
    assert!(matches!(
        reclaim(&mut a2, &share, &wrong).await,
        ServerMsg::Error {
            code: ErrorCode::ReclaimRefused,
            ..
        }
    ));
    assert_eq!(metric(addr, &rejections("reclaim_refused")).await, 1);
    assert_eq!(metric(addr, "beamdrop_shares_reclaimed_total").await, 0);
    assert_eq!(
        reclaim(&mut a2, &share, &token).await,
        ServerMsg::ShareReclaimed { share }
    );
    assert_eq!(metric(addr, "beamdrop_shares_reclaimed_total").await, 1);
    assert_eq!(metric(addr, "beamdrop_shares_created_total").await, 1);
    assert_eq!(metric(addr, "beamdrop_shares").await, 1);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_frames_are_counted_by_kind_and_vanishing_clients_are_not_refusals() {
    let server = server_with(config()).await;
    let addr = server.addr;
    let client_left = "beamdrop_disconnects_total{cause=\"client\"}";

    // Clients that vanish without a close frame, by FIN and by reset, are not refusals.
    let (ws, _) = connect(addr).await;
    drop(ws);
    let (ws, _) = connect(addr).await;
    ws.get_ref().set_zero_linger().unwrap();
    drop(ws);
    metric_reaches(addr, client_left, 2).await;
    assert_eq!(all_rejections(addr).await, 0);

    // Over max_frame_bytes.
    let (mut big, _) = connect(addr).await;
    let huge = format!(r#"{{"type":"ping","x":"{}"}}"#, "x".repeat(100 * 1024));
    let _ = timeout(STEP, big.send(Message::text(huge))).await;
    let _ = read_to_end(&mut big).await;
    metric_reaches(addr, &rejections("oversize_frame"), 1).await;

    // Protocol violations: an unmasked client frame; a text frame that is not UTF-8.
    let mut raw = open_raw(addr).await;
    raw.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(raw_close_code(&mut raw).await, Some(close_code::BAD_FRAME));
    let mut raw = open_raw(addr).await;
    let mask = [1u8, 2, 3, 4];
    let payload = [0xffu8, 0xfe, 0xfd];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    raw.write_all(&frame).await.unwrap();
    assert_eq!(raw_close_code(&mut raw).await, Some(close_code::BAD_FRAME));
    metric_reaches(addr, &rejections("bad_frame"), 2).await;

    assert_eq!(all_rejections(addr).await, 3);
    assert_eq!(metric(addr, client_left).await, 2);
    metric_reaches(addr, "beamdrop_peers_connected", 0).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_ok_while_the_broker_is() {
    let server = server_with(config()).await;
    let (status, _, body) = http_get(server.addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    stop(server).await;
}

/// A WebSocket handshake as relayed by a reverse proxy that says who its client was.
async fn open_forwarded(addr: SocketAddr, forwarded_for: &str) -> Result<Ws, tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Forwarded-For", forwarded_for.parse().unwrap());
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        Ok(tokio_tungstenite::client_async(request, tcp).await?.0)
    };
    timeout(STEP, attempt).await.expect("handshake in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_per_ip_cap_counts_the_real_clients() {
    let limits = Limits {
        max_connections_per_ip: 1,
        ..Default::default()
    };
    let behind_proxy = server_with(Config {
        limits: limits.clone(),
        trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
        ..config()
    })
    .await;
    let addr = behind_proxy.addr;
    // Two clients through the same proxy address: each has its own slot.
    let (_a, _) = welcome(open_forwarded(addr, "198.51.100.1").await.unwrap()).await;
    let (_b, _) = welcome(open_forwarded(addr, "198.51.100.2").await.unwrap()).await;
    // A second socket of the same client is over its cap, whatever it puts on the left.
    assert_eq!(
        refused_status(open_forwarded(addr, "198.51.100.1").await),
        429
    );
    assert_eq!(
        refused_status(open_forwarded(addr, "203.0.113.5, 198.51.100.1").await),
        429
    );
    stop(behind_proxy).await;

    // Without the proxy trusted, the header is the client's own word and ignored.
    let direct = server_with(Config { limits, ..config() }).await;
    let addr = direct.addr;
    let (_a, _) = welcome(open_forwarded(addr, "198.51.100.1").await.unwrap()).await;
    assert_eq!(
        refused_status(open_forwarded(addr, "198.51.100.2").await),
        429
    );
    stop(direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_for_the_operator_only() {
    let server = server().await;
    let addr = server.addr;
    // From this machine, straight: served.
    assert_eq!(http_get(addr, "/metrics").await.0, 200);
    // Relayed by a proxy (so from anyone): refused, and counted.
    let proxied = "X-Forwarded-For: 203.0.113.7\r\n";
    assert_eq!(http_get_with(addr, "/metrics", proxied).await.0, 403);
    assert_eq!(
        metric(
            addr,
            "beamdrop_rejections_total{reason=\"metrics_refused\"}"
        )
        .await,
        1
    );
    stop(server).await;

    // With a token: whoever brings it.
    let server = server_with(Config {
        metrics_token: "operator-token".into(),
        ..config()
    })
    .await;
    let addr = server.addr;
    let with = |token: &str| format!("{proxied}Authorization: Bearer {token}\r\n");
    assert_eq!(
        http_get_with(addr, "/metrics", &with("operator-token"))
            .await
            .0,
        200
    );
    assert_eq!(
        http_get_with(addr, "/metrics", &with("operator-tokem"))
            .await
            .0,
        403
    );
    assert_eq!(http_get_with(addr, "/metrics", proxied).await.0, 403);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_pins_no_more_than_its_inbox_bytes_and_is_let_go() {
    // A stops reading (a tiny receive window, nothing read after its introduction) but keeps
    // talking, so no idle timeout saves the server; B floods it with 60 KiB signals. A's inbox
    // must hold at most `inbox_bytes`, B must be told A is busy, and A must be let go once a
    // frame waits longer than the grace plus its size at the floor rate.
    const KIB: usize = 1024;
    let server = server_with(Config {
        limits: Limits {
            inbox_bytes: 256 * KIB,
            min_read_bytes_per_sec: 16 * KIB,
            slow_reader_grace_secs: 1,
            idle_timeout_secs: 60,
            ping_interval_secs: 30,
            // The flood must reach A's inbox, not B's rate limit.
            rate_limit_per_sec: 0,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let addr = server.addr;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * KIB as u32).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
        .await
        .unwrap();
    let (mut a, a_id) = welcome(ws).await;
    let share = create_share(&mut a).await;
    let (mut b, b_id) = connect(addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;

    // From here A only writes: a ping every 300 ms, until the server lets it go.
    let (mut a_tx, a_rx) = a.split();
    let talker = tokio::spawn(async move {
        let ping = serde_json::to_string(&ClientMsg::Ping).unwrap();
        while timeout(
            Duration::from_secs(2),
            a_tx.send(Message::text(ping.clone())),
        )
        .await
        .is_ok_and(|sent| sent.is_ok())
        {
            sleep(Duration::from_millis(300)).await;
        }
    });
    // The most A's inbox (the only one with traffic) held, sampled every 50 ms.
    let sampler = tokio::spawn(async move {
        let mut most = 0;
        loop {
            most = most.max(metric(addr, "beamdrop_inbox_bytes").await);
            if metric(addr, "beamdrop_disconnects_total{cause=\"slow_reader\"}").await > 0 {
                return most;
            }
            sleep(Duration::from_millis(50)).await;
        }
    });

    let started = Instant::now();
    let big = "s".repeat(60 * KIB);
    let mut busy = 0;
    let mut let_go = false;
    // The flood comes in rounds until A is let go (at most 40 × 50 signals): what the kernel
    // buffers towards A (a loopback send buffer grows to a few MiB) fills first, and only then
    // can a frame stall. A round ends when B hears nothing for 2 s.
    'rounds: for _ in 0..40 {
        for _ in 0..50 {
            signal(&mut b, a_id, &big).await;
        }
        loop {
            match recv_within(&mut b, Duration::from_secs(2)).await {
                Some(ServerMsg::Error {
                    code: ErrorCode::PeerBusy,
                    ..
                }) => busy += 1,
                Some(ServerMsg::Error {
                    code: ErrorCode::UnknownPeer,
                    ..
                }) => {}
                Some(ServerMsg::PeerLeft { peer }) if peer == a_id => {
                    let_go = true;
                    break 'rounds;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => break,
            }
        }
    }
    assert!(
        let_go,
        "A still registered {:?} after the flood ({busy} busy replies)",
        started.elapsed()
    );
    let let_go_after = started.elapsed();
    let most = timeout(Duration::from_secs(10), sampler)
        .await
        .expect("slow_reader counted")
        .unwrap();
    println!(
        "slow reader let go after {let_go_after:?}; its inbox held at most {most} B; {busy} \
         signals refused as busy"
    );
    assert!(
        busy > 0,
        "the flood never filled A's inbox: the test proves nothing"
    );
    assert!(most > 0, "the inbox was never seen holding anything");
    assert!(most <= 256 * KIB as i64, "the inbox held {most} B");
    // The rounds of flooding until a frame can stall take a few seconds each; the point is that
    // A is not waited on for the idle timeout (60 s) per frame.
    assert!(let_go_after < Duration::from_secs(30), "{let_go_after:?}");
    assert_eq!(metric(addr, "beamdrop_inbox_bytes").await, 0);
    drop(a_rx);
    talker.abort();
    stop(server).await;
}

/// The whole raw response to `GET path` (head and body, chunked or not), as text.
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = timeout(STEP, attempt).await.expect("HTTP response in time");
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_creations_and_lookups_are_paced_per_address_and_records_are_counted() {
    let server = server_with(Config {
        limits: Limits {
            share_creations_per_ip_per_min: 2,
            share_lookups_per_ip_per_min: 3,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let addr = server.addr;

    // Two new shares a minute from this address, whatever the connection: a client cannot
    // churn share records by reconnecting.
    let (mut a, _) = connect(addr).await;
    let share = create_share(&mut a).await;
    drop(a);
    let (mut b, _) = connect(addr).await;
    create_share(&mut b).await;
    send(&mut b, &ClientMsg::CreateShare).await;
    match recv(&mut b).await {
        ServerMsg::Error {
            code: ErrorCode::TooManyShares,
            message,
        } => assert!(message.contains("try again in a minute"), "{message}"),
        other => panic!("expected too_many_shares, got {other:?}"),
    }
    assert_eq!(metric(addr, rejections("share_rate").as_str()).await, 1);
    // The withdrawn share is still kept (reclaimable), beside the live one.
    metric_reaches(addr, "beamdrop_share_records", 2).await;

    // Looking a share up (the receive page renders it) three times a minute; the fourth is
    // told to wait, and nothing else about the share is said.
    let page = format!("/s/{share}");
    for _ in 0..3 {
        let text = raw_get(addr, &page).await;
        assert!(!text.contains("too many look-ups"), "{text}");
    }
    let text = raw_get(addr, &page).await;
    assert!(text.contains("too many look-ups"), "{text}");
    assert_eq!(metric(addr, rejections("lookup_rate").as_str()).await, 1);
    // The kernel's listen-queue overflows are served beside them (host-wide counters).
    assert!(metric(addr, "beamdrop_listen_overflows_total").await >= 0);
    stop(server).await;
}
