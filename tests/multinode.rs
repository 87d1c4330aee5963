//! Several server nodes sharing one Redis (`broker = "redis+unix://…"`): every test starts its
//! own `redis-server` on a socket of its own (`TestRedis`, Debian package `redis-server`, see
//! `scripts/setup.sh`), real servers on port 0, and talks to them with real WebSocket clients.
//!
//! Run with `cargo test --features ssr --test multinode`.

mod common;

use beamdrop::protocol::{close_code, ClaimToken, ClientMsg, ErrorCode, ServerMsg};
use beamdrop::server::{start, RunningServer};
use common::*;
use futures::StreamExt;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The Redis backend's presence TTL (`RedisOptions::default().presence_ttl`).
const PRESENCE_TTL: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Server helpers (the shared ones, and `TestRedis`, are in tests/common/mod.rs)
// ---------------------------------------------------------------------------------------------

async fn node(redis: &TestRedis) -> RunningServer {
    server_with(redis_config(redis)).await
}

/// A node on its own tokio runtime, so that it can die the way a crashed process does: every
/// task dropped at once, every socket closed, and no cleanup code running.
struct DoomedNode {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl DoomedNode {
    async fn start(redis: &TestRedis) -> Self {
        let config = redis_config(redis);
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let server = runtime
                .block_on(start(config, leptos_options()))
                .expect("server starts");
            let addr = server.addr;
            runtime.spawn(async move {
                let _running = server;
                std::future::pending::<()>().await;
            });
            Self {
                addr,
                runtime: Some(runtime),
            }
        })
        .await
        .unwrap()
    }

    async fn kill(mut self) {
        let runtime = self.runtime.take().unwrap();
        tokio::task::spawn_blocking(move || runtime.shutdown_background())
            .await
            .unwrap();
    }
}

impl Drop for DoomedNode {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Other helpers
// ---------------------------------------------------------------------------------------------

/// Reads until the server closes the socket; the close code.
async fn close_code_of(ws: &mut Ws) -> Option<u16> {
    loop {
        match timeout(STEP, ws.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

/// A wrong claim token: any valid token but the share's.
fn wrong_token() -> ClaimToken {
    "0123456789abcdef0123456789abcdef".parse().unwrap()
}

/// Whether a receiver on a fresh connection to `addr` is refused `share` as unknown.
async fn join_refused(addr: SocketAddr, share: &beamdrop::protocol::ShareId) -> bool {
    let (mut ws, _) = connect(addr).await;
    send(
        &mut ws,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    matches!(
        recv(&mut ws).await,
        ServerMsg::Error {
            code: ErrorCode::NoSuchShare,
            ..
        }
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The rolling-restart case: a node asked to stop (SIGTERM) closes its sockets with 4003, and the
/// sender's page reconnects elsewhere and keeps its share id, so the link it handed out works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_reclaims_its_share_on_another_node_after_its_node_stops() {
    let redis = TestRedis::start();
    let (n1, n2, n3) = (node(&redis).await, node(&redis).await, node(&redis).await);
    let (n2_addr, n3_addr) = (n2.addr, n3.addr);
    let (mut a, a_id) = connect(n1.addr).await;
    let (share, token) = create_claimed_share(&mut a).await;
    let (mut b, b_id) = connect(n2_addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;

    stop(n1).await;
    assert_eq!(close_code_of(&mut a).await, Some(close_code::RECONNECT));
    // A shutdown is not a departure: the receiver (whose direct connection goes on) is not told
    // its sender left. The share, though, is not reachable until its sender is back.
    assert_silent(&mut b, "the receiver of a sender whose node stopped").await;
    eventually(STEP, "the stopped node's share is unreachable", || {
        join_refused(n3_addr, &share)
    })
    .await;

    // Back on node 2 under a new peer id. A wrong token changes nothing...
    let (mut a2, a2_id) = connect(n2_addr).await;
    assert!(matches!(
        reclaim(&mut a2, &share, &wrong_token()).await,
        ServerMsg::Error {
            code: ErrorCode::ReclaimRefused,
            ..
        }
    ));
    assert!(join_refused(n3_addr, &share).await);
    // ...the right one brings the same share id back.
    assert_eq!(
        reclaim(&mut a2, &share, &token).await,
        ServerMsg::ShareReclaimed {
            share: share.clone()
        }
    );
    assert!(redis.exists(&format!("share:{share}")).await);

    // A new receiver on node 3 opens the same link and is introduced to the sender's new id.
    let (mut c, c_id) = connect(n3_addr).await;
    introduce(&mut a2, a2_id, &share, &mut c, c_id).await;
    assert_relays(&mut a2, a2_id, &mut c, c_id).await;
    // So is the receiver that was waiting (its socket survived: it joins again).
    introduce(&mut a2, a2_id, &share, &mut b, b_id).await;
    // A stranger with the share id but not the token cannot take it from the live sender.
    let (mut t, _) = connect(n3_addr).await;
    assert!(matches!(
        reclaim(&mut t, &share, &wrong_token()).await,
        ServerMsg::Error {
            code: ErrorCode::ReclaimRefused,
            ..
        }
    ));
    let (mut d, d_id) = connect(n3_addr).await;
    introduce(&mut a2, a2_id, &share, &mut d, d_id).await;

    // And when the sender leaves for good, the share goes with it.
    drop(a2);
    for ws in [&mut b, &mut c, &mut d] {
        assert_eq!(recv(ws).await, ServerMsg::PeerLeft { peer: a2_id });
    }
    eventually(STEP, "the share is withdrawn", || {
        join_refused(n3_addr, &share)
    })
    .await;
    stop(n2).await;
    stop(n3).await;
}

/// A sender whose node crashed (nothing cleaned up) and who comes back only after the share's
/// key expired still gets its share id back: the claim outlives it by the reclaim window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_reclaims_its_share_after_its_node_crashed_and_the_share_expired() {
    let redis = TestRedis::start();
    let n1 = node(&redis).await;
    let n2 = DoomedNode::start(&redis).await;
    let (mut a, _) = connect(n2.addr).await;
    let (share, token) = create_claimed_share(&mut a).await;
    n2.kill().await;
    drop(a);
    eventually(
        PRESENCE_TTL + Duration::from_secs(2),
        "the crashed node's share expires",
        || async { !redis.exists(&format!("share:{share}")).await },
    )
    .await;
    assert!(join_refused(n1.addr, &share).await);

    let (mut a2, a2_id) = connect(n1.addr).await;
    assert!(matches!(
        reclaim(&mut a2, &share, &wrong_token()).await,
        ServerMsg::Error {
            code: ErrorCode::ReclaimRefused,
            ..
        }
    ));
    assert!(join_refused(n1.addr, &share).await);
    assert_eq!(
        reclaim(&mut a2, &share, &token).await,
        ServerMsg::ShareReclaimed {
            share: share.clone()
        }
    );
    let (mut c, c_id) = connect(n1.addr).await;
    introduce(&mut a2, a2_id, &share, &mut c, c_id).await;
    assert_relays(&mut a2, a2_id, &mut c, c_id).await;
    stop(n1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_on_other_nodes_reach_the_sender_and_see_it_leave() {
    let redis = TestRedis::start();
    let (n1, n2, n3) = (node(&redis).await, node(&redis).await, node(&redis).await);

    // A sender on node 1, receivers on nodes 2 and 3.
    let (mut a, a_id) = connect(n1.addr).await;
    let share = create_share(&mut a).await;
    let (mut b, b_id) = connect(n2.addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    let (mut c, c_id) = connect(n3.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;
    assert_relays(&mut a, a_id, &mut c, c_id).await;
    assert!(redis.exists(&format!("peer_state:{a_id}")).await);
    assert!(redis.exists(&format!("share:{share}")).await);

    // Receivers of one share were not introduced to each other.
    signal(&mut b, c_id, "psst").await;
    expect_error(&mut b, ErrorCode::UnknownPeer).await;
    assert_silent(&mut c, "C").await;

    // A receiver leaves: the sender on another node hears of it, and can no longer reach it.
    timeout(STEP, b.close(None)).await.unwrap().unwrap();
    assert_eq!(recv(&mut a).await, ServerMsg::PeerLeft { peer: b_id });
    signal(&mut a, b_id, "still there?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;
    assert_relays(&mut a, a_id, &mut c, c_id).await;

    // The sender leaves abruptly: its receiver hears of it, and the share is gone for new
    // joiners on every node.
    drop(a);
    assert_eq!(recv(&mut c).await, ServerMsg::PeerLeft { peer: a_id });
    signal(&mut c, a_id, "hello?").await;
    expect_error(&mut c, ErrorCode::UnknownPeer).await;
    let (mut d, _) = connect(n2.addr).await;
    send(
        &mut d,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    expect_error(&mut d, ErrorCode::NoSuchShare).await;
    assert!(!redis.exists(&format!("peer_state:{a_id}")).await);
    assert!(!redis.exists(&format!("share:{share}")).await);

    for n in [n1, n2, n3] {
        stop(n).await;
    }
}

/// A sender on node 1 and a receiver on node 2 go through a whole handshake on fresh
/// connections.
async fn try_handshake(n1: SocketAddr, n2: SocketAddr) -> Result<(), String> {
    let (mut a, a_id) = try_connect(n1).await?;
    let share = try_create_share(&mut a).await?;
    let (mut b, b_id) = try_connect(n2).await?;
    try_introduce(&mut a, a_id, &share, &mut b, b_id).await?;
    try_relay(&mut b, b_id, &mut a, a_id).await?;
    try_relay(&mut a, a_id, &mut b, b_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signaling_works_again_within_5s_after_redis_restarts() {
    let mut redis = TestRedis::start();
    let (n1, n2) = (node(&redis).await, node(&redis).await);
    try_handshake(n1.addr, n2.addr).await.unwrap();
    // A pair introduced before the restart.
    let (mut a, a_id) = connect(n1.addr).await;
    let share = create_share(&mut a).await;
    let (mut b, b_id) = connect(n2.addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;

    redis.kill();
    sleep(Duration::from_millis(500)).await;
    redis.restart(); // a new, empty Redis: no keys, no subscriptions
    let restarted = Instant::now();

    let mut last_error = String::new();
    loop {
        match try_handshake(n1.addr, n2.addr).await {
            Ok(()) => break,
            Err(e) => last_error = e,
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "no handshake within 5 s of the restart; last error: {last_error}"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let took = restarted.elapsed();
    eprintln!("a new handshake worked {took:?} after the restart (last error: {last_error:?})");

    // The pair from before the restart is whole again too: both re-subscribed, both present,
    // and the share re-asserted.
    let left = Duration::from_secs(5).saturating_sub(restarted.elapsed());
    eventually(
        left.max(Duration::from_millis(500)),
        "old pair relays again",
        || async {
            redis.exists(&format!("peer_state:{a_id}")).await
                && redis.exists(&format!("peer_state:{b_id}")).await
                && redis.exists(&format!("share:{share}")).await
        },
    )
    .await;
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    let (mut c, c_id) = connect(n2.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    stop(n1).await;
    stop(n2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_s_peers_become_unknown_and_expire() {
    let redis = TestRedis::start();
    let n1 = node(&redis).await;
    let n2 = DoomedNode::start(&redis).await;

    // A sender on node 1 with a receiver on node 2; another sender on node 2.
    let (mut a, a_id) = connect(n1.addr).await;
    let share = create_share(&mut a).await;
    let (mut b, b_id) = connect(n2.addr).await;
    introduce(&mut a, a_id, &share, &mut b, b_id).await;
    assert_relays(&mut a, a_id, &mut b, b_id).await;
    let (mut c, c_id) = connect(n2.addr).await;
    let c_share = create_share(&mut c).await;

    n2.kill().await;
    let killed = Instant::now();
    // Nothing was cleaned up: the keys are still there...
    assert!(redis.exists(&format!("peer_state:{b_id}")).await);
    assert!(redis.exists(&format!("share:{c_share}")).await);
    // ...but nobody listens on the dead node's topics any more.
    signal(&mut a, b_id, "still there?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;
    let (mut d, _) = connect(n1.addr).await;
    send(
        &mut d,
        &ClientMsg::Join {
            share: c_share.clone(),
        },
    )
    .await;
    expect_error(&mut d, ErrorCode::NoSuchShare).await;

    // Presence and shares expire with their TTL.
    let keys = [
        format!("peer_state:{b_id}"),
        format!("peer_state:{c_id}"),
        format!("share:{c_share}"),
    ];
    eventually(
        PRESENCE_TTL + Duration::from_secs(2),
        "the dead node's keys expire",
        || async {
            let mut any = false;
            for key in &keys {
                any |= redis.exists(key).await;
            }
            !any
        },
    )
    .await;
    assert!(
        killed.elapsed() >= PRESENCE_TTL - Duration::from_secs(4),
        "the keys expired, not deleted: {:?}",
        killed.elapsed()
    );
    signal(&mut a, b_id, "still there?").await;
    expect_error(&mut a, ErrorCode::UnknownPeer).await;
    // Node 1 and its sender are unaffected.
    assert!(redis.exists(&format!("peer_state:{a_id}")).await);
    let (mut e, e_id) = connect(n1.addr).await;
    introduce(&mut a, a_id, &share, &mut e, e_id).await;
    assert_relays(&mut a, a_id, &mut e, e_id).await;
    drop((b, c));
    stop(n1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_introduction_was_dropped_on_a_full_inbox_is_repaired_by_joining_again() {
    // Sender A on node 1 stops reading while C floods it, so A's inbox is full when receiver B
    // on node 2 joins: node 1 drops B's `peer_joined` and tells B `peer_busy`. Once A reads
    // again, B joining again must reach A (A hears `peer_joined`, and A's answer reaches B);
    // a join that only answered `joined` (the pair counted as introduced already) would leave
    // B waiting for ever.
    const KIB: usize = 1024;
    let redis = TestRedis::start();
    let mut config = redis_config(&redis);
    config.limits.inbox_capacity = 4;
    config.limits.rate_limit_per_sec = 0;
    config.limits.slow_reader_grace_secs = 60;
    let (n1, n2) = (server_with(config.clone()).await, server_with(config).await);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * KIB as u32).unwrap();
    let tcp = socket.connect(n1.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", n1.addr), tcp)
        .await
        .unwrap();
    let (mut a, a_id) = welcome(ws).await;
    let share = create_share(&mut a).await;
    let (mut c, c_id) = connect(n1.addr).await;
    introduce(&mut a, a_id, &share, &mut c, c_id).await;

    // A reads nothing now; C floods it until A's inbox is full.
    let big = "f".repeat(60 * KIB);
    let mut full = false;
    for _ in 0..400 {
        signal(&mut c, a_id, &big).await;
        if let Some(ServerMsg::Error {
            code: ErrorCode::PeerBusy,
            ..
        }) = recv_within(&mut c, Duration::from_millis(5)).await
        {
            full = true;
            break;
        }
    }
    assert!(full, "A's inbox never filled");

    // B joins from node 2 while A's inbox is full: told busy, A never hears of it.
    let (mut b, b_id) = connect(n2.addr).await;
    send(
        &mut b,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    let mut busy = false;
    while let Some(msg) = recv_within(&mut b, Duration::from_secs(3)).await {
        match msg {
            ServerMsg::Joined { sender, .. } => assert_eq!(sender, a_id),
            ServerMsg::Error {
                code: ErrorCode::PeerBusy,
                ..
            } => busy = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        busy,
        "B's introduction was not dropped: the test proves nothing"
    );

    // A catches up on everything queued for it (C's flood; no `peer_joined` among it).
    while let Some(msg) = recv_within(&mut a, Duration::from_secs(2)).await {
        if let ServerMsg::PeerJoined { peer, .. } = msg {
            assert_ne!(peer, b_id, "the dropped introduction arrived after all");
        }
    }

    // B joins again: this time A hears of it, and A's answer reaches B.
    assert_eq!(join(&mut b, &share).await, a_id);
    match recv(&mut a).await {
        ServerMsg::PeerJoined { peer, .. } => assert_eq!(peer, b_id),
        other => panic!("expected B's peer_joined, got {other:?}"),
    }
    signal(&mut a, b_id, "offer").await;
    assert_eq!(
        recv(&mut b).await,
        ServerMsg::Signal {
            from: a_id,
            payload: "offer".into()
        }
    );
    drop(c);
    stop(n1).await;
    stop(n2).await;
}
