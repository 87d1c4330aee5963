//! Integration tests for the signaling broker at `/ws`: every test starts a real server on an
//! ephemeral port, talks to it with real WebSocket clients and shuts it down at the end.
//!
//! Run with `cargo test --features ssr --test broker`.

mod common;

use beamdrop::protocol::{
    close_code, ClaimToken, ClientMsg, ErrorCode, IceServer, PeerId, ServerMsg, ShareId,
};
use beamdrop::server::config::{Config, Limits};
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers (the shared ones are in tests/common/mod.rs)
// ---------------------------------------------------------------------------------------------

/// How a connection ended, as seen by the client.
#[derive(Debug, PartialEq)]
enum End {
    /// A close frame, with its code.
    Close(Option<u16>),
    /// The stream ended without a close frame.
    Eof,
    /// A transport error (e.g. a reset) ended the stream.
    Error(String),
}

/// Reads (skipping text and ping/pong) until the connection ends; panics after [`STEP`].
async fn ending(ws: &mut Ws) -> End {
    let deadline = Instant::now() + STEP;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("connection still open after {STEP:?}"));
        match frame {
            Some(Ok(Message::Close(frame))) => return End::Close(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return End::Error(e.to_string()),
            None => return End::Eof,
        }
    }
}

/// A sender with a share and one receiver, introduced to each other.
async fn pair(addr: SocketAddr) -> (Ws, PeerId, ShareId, Ws, PeerId) {
    let (mut a, a_id) = connect(addr).await;
    let share = create_share(&mut a).await;
    let (mut b, b_id) = connect(addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;
    (a, a_id, share, b, b_id)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_gives_distinct_ids_and_configured_ice_servers() {
    let ice_servers = vec![
        IceServer {
            urls: vec!["stun:stun.example.org:3478".into()],
            ..Default::default()
        },
        IceServer {
            urls: vec![
                "turn:turn.example.org:3478?transport=udp".into(),
                "turns:turn.example.org:5349".into(),
            ],
            username: Some("alice".into()),
            credential: Some("s3cret".into()),
        },
    ];
    let server = server_with(Config {
        ice_servers: ice_servers.clone(),
        ..config()
    })
    .await;

    let mut ids = HashSet::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = open(server.addr).await.unwrap();
        match recv(&mut ws).await {
            ServerMsg::Welcome {
                you,
                ice_servers: got,
            } => {
                assert_eq!(got, ice_servers);
                assert!(ids.insert(you), "peer id {you} handed out twice");
            }
            other => panic!("first message must be Welcome, got {other:?}"),
        }
        clients.push(ws);
    }
    assert_eq!(ids.len(), 4);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_join_and_signal_relay_both_ways() {
    let server = server().await;
    let (mut a, a_id) = connect(server.addr).await;
    let (mut b, b_id) = connect(server.addr).await;
    assert_ne!(a_id, b_id);

    let share = create_share(&mut a).await;
    send(
        &mut b,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    assert_eq!(
        recv(&mut b).await,
        ServerMsg::Joined {
            share: share.clone(),
            sender: a_id
        }
    );
    assert_eq!(
        recv(&mut a).await,
        ServerMsg::PeerJoined {
            share: share.clone(),
            peer: b_id
        }
    );

    // Opaque payloads arrive byte for byte, whatever they contain.
    let offer = "{\"type\":\"offer\",\"sdp\":\"v=0\\r\\no=- 1 2 IN IP4 127.0.0.1\\r\\n\"} \"quotes\" \\ ünïcødé ✓\n";
    signal(&mut b, a_id, offer).await;
    assert_eq!(
        recv(&mut a).await,
        ServerMsg::Signal {
            from: b_id,
            payload: offer.into()
        }
    );

    let answer = "answer: ∂ \u{0}\t{}";
    signal(&mut a, b_id, answer).await;
    assert_eq!(
        recv(&mut b).await,
        ServerMsg::Signal {
            from: a_id,
            payload: answer.into()
        }
    );

    // A burst arrives complete and in order.
    for i in 0..20 {
        signal(&mut b, a_id, &format!("candidate {i}")).await;
    }
    for i in 0..20 {
        assert_eq!(
            recv(&mut a).await,
            ServerMsg::Signal {
                from: b_id,
                payload: format!("candidate {i}")
            }
        );
    }
    // Nobody receives their own signals back.
    assert_silent(&mut b, "B").await;
    assert_silent(&mut a, "A").await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_sender_cannot_be_spoofed() {
    let server = server().await;
    let (mut a, a_id, share, mut b, b_id) = pair(server.addr).await;
    let (mut c, c_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    // A made-up id, and the id of another peer A knows.
    for fake in [PeerId(Uuid::new_v4()), c_id, a_id] {
        let raw = json!({"type": "signal", "to": a_id, "from": fake, "payload": "x"});
        send_text(&mut b, raw.to_string()).await;
        assert_eq!(
            recv(&mut a).await,
            ServerMsg::Signal {
                from: b_id,
                payload: "x".into()
            },
            "claimed from = {fake}"
        );
    }
    assert_silent(&mut c, "C").await;
    assert_silent(&mut b, "B").await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_only_introduced_peers() {
    let server = server().await;
    let (mut a, a_id, _share, mut b, b_id) = pair(server.addr).await;
    let (mut c, c_id) = connect(server.addr).await;

    // Nobody has this id.
    signal(&mut b, PeerId(Uuid::new_v4()), "hello?").await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;

    // C is registered but was never introduced to anyone: not reachable, and cannot reach.
    signal(&mut b, c_id, "psst").await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;
    signal(&mut a, c_id, "psst").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;
    signal(&mut c, a_id, "let me in").await;
    expect_error(&mut c, ErrorCode::UnknownPeer).await;
    signal(&mut c, b_id, "let me in").await;
    expect_error(&mut c, ErrorCode::UnknownPeer).await;
    assert_silent(&mut c, "C").await;
    assert_silent(&mut a, "A").await;
    assert_silent(&mut b, "B").await;

    // The refusals did not disturb the introduced pair.
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_close_unregisters_the_receiver() {
    let server = server().await;
    let (mut a, a_id, _share, mut b, b_id) = pair(server.addr).await;

    timeout(STEP, b.close(None)).await.unwrap().unwrap();
    // The server completes the closing handshake (RFC 6455 5.5.1): B gets a close frame back.
    let end = ending(&mut b).await;
    assert!(
        matches!(end, End::Close(_)),
        "B's close was not echoed: {end:?}"
    );
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: b_id });
    signal(&mut a, b_id, "still there?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;
    let _ = a_id;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_close_withdraws_the_share_and_tells_receivers() {
    let server = server().await;
    let (mut a, a_id, share, mut b, b_id) = pair(server.addr).await;
    let (mut c, c_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    timeout(STEP, a.close(None)).await.unwrap().unwrap();
    assert_eq!(recv(&mut b).await, ServerMsg::PeerLeft { peer: a_id });
    assert_eq!(recv(&mut c).await, ServerMsg::PeerLeft { peer: a_id });

    // The share went with its sender: neither a newcomer nor an old receiver can join it.
    let (mut e, _e_id) = connect(server.addr).await;
    send(
        &mut e,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    expect_error(&mut e, ErrorCode::NoSuchShare).await;
    send(
        &mut b,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    expect_error(&mut b, ErrorCode::NoSuchShare).await;

    // And the sender is unreachable.
    signal(&mut b, a_id, "hello?").await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;

    // The receivers were never introduced to each other.
    signal(&mut b, c_id, "hi").await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;
    assert_silent(&mut c, "C").await;
    let _ = b_id;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_unregister_the_peer() {
    let server = server().await;
    let (mut a, a_id, share, b, b_id) = pair(server.addr).await;
    let (mut c, c_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    // B: the TCP stream is dropped without a close frame.
    drop(b);
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: b_id });
    signal(&mut a, b_id, "still there?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;

    // C: the TCP connection is reset (SO_LINGER 0 turns close into RST).
    c.get_ref().set_zero_linger().unwrap();
    drop(c);
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: c_id });
    signal(&mut a, c_id, "still there?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;

    // The sender's own abrupt drop withdraws its share and tells its receivers.
    let (mut d, d_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut d, d_id).await;
    a.get_ref().set_zero_linger().unwrap();
    drop(a);
    assert_eq!(recv(&mut d).await, ServerMsg::PeerLeft { peer: a_id });
    signal(&mut d, a_id, "hello?").await;
    expect_error(&mut d, ErrorCode::UnknownPeer).await;
    let (mut e, _) = connect(server.addr).await;
    send(&mut e, &ClientMsg::Join { share }).await;
    expect_error(&mut e, ErrorCode::NoSuchShare).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_leaving_never_unregisters_the_sender() {
    let server = server().await;
    let (mut a, a_id, share, mut b, b_id) = pair(server.addr).await;
    let (mut c, c_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    // One receiver leaves cleanly, the other abruptly.
    timeout(STEP, b.close(None)).await.unwrap().unwrap();
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: b_id });
    drop(c);
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: c_id });

    // The sender and its share are untouched.
    let (mut d, d_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut d, d_id).await;
    assert_relays(&mut a, a_id, &mut d, d_id).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_rejected_and_the_connection_survives() {
    let server = server().await;
    let (mut a, a_id, _share, mut b, b_id) = pair(server.addr).await;

    let bad = [
        "{not json".to_string(),
        "".to_string(),
        "[]".to_string(),
        r#"{"type":"shutdown"}"#.to_string(),
        r#"{"to":"00000000-0000-0000-0000-000000000001","payload":"x"}"#.to_string(),
        r#"{"type":"join","share":"../etc/passwd"}"#.to_string(),
        r#"{"type":"join"}"#.to_string(),
        json!({"type": "signal", "to": "not-a-uuid", "payload": "x"}).to_string(),
        json!({"type": "signal", "to": a_id, "payload": 42}).to_string(),
    ];
    for text in bad {
        send_text(&mut b, text.clone()).await;
        match recv(&mut b).await {
            ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            } => {}
            other => panic!("{text:?} must be a BadMessage, got {other:?}"),
        }
    }
    assert_silent(&mut a, "A").await;

    // Still usable: keep-alive and relaying.
    send(&mut b, &ClientMsg::Ping).await;
    assert_eq!(recv(&mut b).await, ServerMsg::Pong);
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_frame_closes_with_bad_frame() {
    let server = server().await;
    let (mut a, a_id, _share, mut b, b_id) = pair(server.addr).await;

    timeout(
        STEP,
        b.send(Message::binary(b"{\"type\":\"ping\"}".to_vec())),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        ending(&mut b).await,
        End::Close(Some(close_code::BAD_FRAME))
    );
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: b_id });
    signal(&mut a, b_id, "gone?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;
    let _ = a_id;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_closes_only_that_connection() {
    let server = server_with(Config {
        limits: Limits {
            max_frame_bytes: 64 * 1024,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let (mut a, a_id, share, mut b, b_id) = pair(server.addr).await;
    let (mut c, c_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    // Just under the limit is fine, and relayed intact.
    let big = "s".repeat(60 * 1024);
    signal(&mut c, a_id, &big).await;
    assert_eq!(
        recv(&mut a).await,
        ServerMsg::Signal {
            from: c_id,
            payload: big
        }
    );

    // Over the limit: C's connection ends, and nothing of it is relayed.
    let huge = json!({"type": "signal", "to": a_id, "payload": "x".repeat(100 * 1024)}).to_string();
    // The server may reset the connection while the frame is still being written.
    let _ = timeout(STEP, c.send(Message::text(huge)))
        .await
        .expect("send finishes in time");
    let end = ending(&mut c).await;
    assert!(
        matches!(
            end,
            End::Close(Some(close_code::BAD_FRAME)) | End::Eof | End::Error(_)
        ),
        "unexpected end {end:?}"
    );
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: c_id });

    // The rest of the server is healthy.
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    let (mut d, d_id) = connect(server.addr).await;
    introduce(&mut a, a_id, &share, &mut d, d_id).await;
    assert_relays(&mut a, a_id, &mut d, d_id).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_despite_queued_traffic() {
    // A never reads while B floods it: the server's writes to A stall once the TCP buffers are
    // full. A stalled write must not keep A's task (and so A's registration and share) alive.
    let server = server_with(Config {
        limits: Limits {
            ping_interval_secs: 1,
            idle_timeout_secs: 2,
            inbox_capacity: 8,
            // The flood must reach A's inbox, not B's rate limit.
            rate_limit_per_sec: 0,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let (a, a_id, share, mut b, _b_id) = pair(server.addr).await;
    let started = Instant::now();
    let big = "s".repeat(60 * 1024);
    for _ in 0..200 {
        signal(&mut b, a_id, &big).await;
    }
    let mut busy = 0;
    loop {
        match recv_within(&mut b, Duration::from_secs(6)).await {
            Some(ServerMsg::Error {
                code: ErrorCode::PeerBusy,
                ..
            }) => busy += 1,
            // Signals sent after A was dropped.
            Some(ServerMsg::Error {
                code: ErrorCode::UnknownPeer,
                ..
            }) => {}
            Some(ServerMsg::PeerLeft { peer }) if peer == a_id => break,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!(
                "A still registered {:?} after the flood ({busy} busy replies)",
                started.elapsed()
            ),
        }
    }
    assert!(
        busy > 0,
        "the flood never filled A's inbox: the test proves nothing"
    );
    signal(&mut b, a_id, "hello?").await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;
    let (mut e, _) = connect(server.addr).await;
    send(&mut e, &ClientMsg::Join { share }).await;
    expect_error(&mut e, ErrorCode::NoSuchShare).await;
    drop(a);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_live_ones_kept() {
    // The server pings every second and closes after 2 s without any frame from the client.
    // (An idle timeout equal to the ping interval would race a healthy client's pong.)
    let server = server_with(Config {
        limits: Limits {
            ping_interval_secs: 1,
            idle_timeout_secs: 2,
            ..Default::default()
        },
        ..config()
    })
    .await;
    let addr = server.addr;

    // The idle client: reads everything, answers nothing.
    let idle = tokio::spawn(async move {
        // Raw TCP: it never writes after the handshake, so reading from it never produces the
        // automatic pong replies a WebSocket library would send.
        let mut tcp = open_raw(addr).await;
        let mut buf = Vec::new();
        let opened = Instant::now();
        let mut frames = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            frames.extend(take_frames(&mut buf));
            let n = match timeout(Duration::from_secs(8), tcp.read(&mut chunk)).await {
                Err(_) => panic!("idle client still open after 8 s; frames: {frames:?}"),
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
            };
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        (frames, opened.elapsed())
    });

    // The live client: its library answers every ping while it reads.
    let (mut live, _) = connect(addr).await;
    let watch_until = Instant::now() + Duration::from_millis(4500);
    let mut pings = 0;
    while let Ok(frame) = tokio::time::timeout_at(watch_until, live.next()).await {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("live client got {other:?}"),
        }
    }
    assert!(pings >= 3, "expected a ping a second, got {pings}");
    send(&mut live, &ClientMsg::Ping).await;
    assert_eq!(recv(&mut live).await, ServerMsg::Pong);

    let (frames, closed_after) = timeout(STEP, idle).await.unwrap().unwrap();
    let opcodes: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
    assert_eq!(opcodes.first(), Some(&0x1), "Welcome first: {opcodes:?}");
    assert!(opcodes.contains(&0x9), "the server pinged: {opcodes:?}");
    let (op, payload) = frames.last().unwrap();
    assert_eq!(*op, 0x8, "last frame is a close frame: {opcodes:?}");
    assert_eq!(
        u16::from_be_bytes([payload[0], payload[1]]),
        close_code::IDLE_TIMEOUT
    );
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after <= Duration::from_secs(4),
        "idle connection closed after {closed_after:?}"
    );
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_asks_every_client_to_reconnect() {
    let server = server().await;
    let addr = server.addr;
    let (mut a, _a_id, _share, mut b, _b_id) = pair(addr).await;
    let (mut c, _c_id) = connect(addr).await;

    stop(server).await;
    for (who, ws) in [("A", &mut a), ("B", &mut b), ("C", &mut c)] {
        assert_eq!(
            ending(ws).await,
            End::Close(Some(close_code::RECONNECT)),
            "{who}"
        );
    }
    assert!(open(addr).await.is_err(), "the server still accepts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_again_introduces_again() {
    let server = server().await;
    let (mut a, a_id, share, mut b, b_id) = pair(server.addr).await;
    // A second join answers `joined` again and tells the sender again (the first `peer_joined`
    // may have been lost on the way); the pair still relays.
    assert_eq!(join(&mut b, &share).await, a_id);
    match recv(&mut a).await {
        ServerMsg::PeerJoined { peer, .. } => assert_eq!(peer, b_id),
        other => panic!("expected peer_joined, got {other:?}"),
    }
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_joins_as_the_sender_leaves_still_hears_it_left() {
    // The sender's socket ends while a `peer_joined` may still sit unread in its inbox: the
    // receiver must get `peer_left` either way, never wait forever.
    for _ in 0..20 {
        let server = server().await;
        let (mut a, _a_id) = connect(server.addr).await;
        let share = create_share(&mut a).await;
        let (mut b, _b_id) = connect(server.addr).await;
        send(
            &mut b,
            &ClientMsg::Join {
                share: share.clone(),
            },
        )
        .await;
        drop(a);
        match recv(&mut b).await {
            ServerMsg::Joined { sender, .. } => {
                assert_eq!(recv(&mut b).await, ServerMsg::PeerLeft { peer: sender });
            }
            ServerMsg::Error { code, .. } => assert_eq!(code, ErrorCode::NoSuchShare),
            other => panic!("unexpected {other:?}"),
        }
        stop(server).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_reconnects_reclaims_its_share_with_its_token_only() {
    let mut config = config();
    config.limits.max_shares_per_peer = 1;
    let server = server_with(config).await;
    let addr = server.addr;
    let (mut a, a_id) = connect(addr).await;
    let (share, token) = create_claimed_share(&mut a).await;
    let (mut b, b_id) = connect(addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;

    // Someone with the share id (every receiver has it) but not the token, or with the token
    // for another id: refused, and the sender keeps its share.
    let wrong: ClaimToken = "0123456789abcdef0123456789abcdef".parse().unwrap();
    let other: ShareId = "fedcba9876543210fedcba9876543210".parse().unwrap();
    let (mut t, _) = connect(addr).await;
    for (s, k) in [(&share, &wrong), (&other, &token)] {
        assert!(matches!(
            reclaim(&mut t, s, k).await,
            ServerMsg::Error {
                code: ErrorCode::ReclaimRefused,
                ..
            }
        ));
    }
    let (mut c, c_id) = connect(addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    // The sender's socket drops: the share goes with it, and its receivers hear it left.
    drop(a);
    assert_eq!(recv(&mut b).await, ServerMsg::PeerLeft { peer: a_id });
    assert_eq!(recv(&mut c).await, ServerMsg::PeerLeft { peer: a_id });
    let (mut d, d_id) = connect(addr).await;
    send(
        &mut d,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    expect_error(&mut d, ErrorCode::NoSuchShare).await;

    // It comes back as a new peer and takes the same share id back with its token.
    let (mut a2, a2_id) = connect(addr).await;
    assert_ne!(a2_id, a_id);
    let reclaimed = ServerMsg::ShareReclaimed {
        share: share.clone(),
    };
    assert_eq!(reclaim(&mut a2, &share, &token).await, reclaimed);
    // Asking again on the same connection changes nothing and takes no second slot...
    assert_eq!(reclaim(&mut a2, &share, &token).await, reclaimed);
    // ...and the limit holds: one share per peer here.
    send(&mut a2, &ClientMsg::CreateShare).await;
    expect_error(&mut a2, ErrorCode::TooManyShares).await;

    // New receivers, and earlier ones joining again, reach the sender under its new id.
    introduce(&mut a2, a2_id, &share, &mut d, d_id).await;
    assert_relays(&mut a2, a2_id, &mut d, d_id).await;
    introduce(&mut a2, a2_id, &share, &mut b, b_id).await;
    // The wrong token still gets nowhere, and leaves the owner alone.
    assert!(matches!(
        reclaim(&mut t, &share, &wrong).await,
        ServerMsg::Error {
            code: ErrorCode::ReclaimRefused,
            ..
        }
    ));
    introduce(&mut a2, a2_id, &share, &mut c, c_id).await;
    stop(server).await;
}
