//! Several server nodes sharing one Redis (`broker = "redis://…"`): every test starts its own
//! `redis-server` on a free port (Debian package `redis-server`, see `scripts/setup.sh`), real
//! servers on port 0, and talks to them with real WebSocket clients.
//!
//! Run with `cargo test --features ssr --test multinode`.

use beamdrop::protocol::{ClientMsg, ErrorCode, PeerId, ServerMsg, ShareId};
use beamdrop::server::config::Config;
use beamdrop::server::{start, RunningServer};
use futures::{SinkExt, StreamExt};
use leptos::prelude::LeptosOptions;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// How long any single expected event may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);
/// How long a client must stay silent to count as "received nothing".
const QUIET: Duration = Duration::from_millis(300);
/// The Redis backend's presence TTL (`RedisOptions::default().presence_ttl`).
const PRESENCE_TTL: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------------

/// A private `redis-server` without persistence on a free port, killed on drop.
struct TestRedis {
    port: u16,
    child: Option<Child>,
}

impl TestRedis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self { port, child: None };
        redis.spawn();
        redis
    }

    fn uri(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/setup.sh: need_redis)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + STEP;
        while std::time::Instant::now() < deadline {
            if redis_answers(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a new, empty one on the same port.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    async fn exists(&self, key: &str) -> bool {
        let client = redis::Client::open(self.uri()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_answers(port: u16) -> bool {
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    tcp.write_all(b"PING\r\n").is_ok() && tcp.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

// ---------------------------------------------------------------------------------------------
// Server helpers
// ---------------------------------------------------------------------------------------------

fn config(redis: &TestRedis) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        broker: redis.uri(),
        ..Default::default()
    }
}

async fn node(redis: &TestRedis) -> RunningServer {
    let options = LeptosOptions::builder().output_name("beamdrop").build();
    start(config(redis), options).await.expect("server starts")
}

async fn stop(server: RunningServer) {
    timeout(STEP, server.shutdown())
        .await
        .expect("shutdown finishes in time")
        .expect("shutdown returns Ok");
}

/// A node on its own tokio runtime, so that it can die the way a crashed process does: every
/// task dropped at once, every socket closed, and no cleanup code running.
struct DoomedNode {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl DoomedNode {
    async fn start(redis: &TestRedis) -> Self {
        let config = config(redis);
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let options = LeptosOptions::builder().output_name("beamdrop").build();
            let server = runtime
                .block_on(start(config, options))
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
// Client helpers (as in tests/broker.rs)
// ---------------------------------------------------------------------------------------------

async fn open(addr: SocketAddr) -> Result<Ws, tungstenite::Error> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        let (ws, _response) =
            tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp).await?;
        Ok(ws)
    };
    timeout(STEP, attempt).await.expect("handshake in time")
}

/// The next server message within `wait`, skipping ping/pong frames. `Ok(None)` on timeout,
/// `Err` when the connection ends or the server sends anything but a JSON `ServerMsg`.
async fn try_recv_within(ws: &mut Ws, wait: Duration) -> Result<Option<ServerMsg>, String> {
    let deadline = Instant::now() + wait;
    loop {
        let Ok(frame) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return Ok(None);
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map(Some)
                    .map_err(|e| format!("not a ServerMsg: {t:?}: {e}"));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return Err(format!("expected a text frame, got {other:?}")),
        }
    }
}

async fn try_recv(ws: &mut Ws) -> Result<ServerMsg, String> {
    try_recv_within(ws, STEP)
        .await?
        .ok_or_else(|| format!("no server message within {STEP:?}"))
}

async fn recv(ws: &mut Ws) -> ServerMsg {
    try_recv(ws).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn connect(addr: SocketAddr) -> (Ws, PeerId) {
    try_connect(addr).await.unwrap_or_else(|e| panic!("{e}"))
}

async fn try_connect(addr: SocketAddr) -> Result<(Ws, PeerId), String> {
    let mut ws = open(addr).await.map_err(|e| e.to_string())?;
    match try_recv(&mut ws).await? {
        ServerMsg::Welcome { you, .. } => Ok((ws, you)),
        other => Err(format!("first message must be Welcome, got {other:?}")),
    }
}

async fn send(ws: &mut Ws, msg: &ClientMsg) {
    timeout(
        STEP,
        ws.send(Message::text(serde_json::to_string(msg).unwrap())),
    )
    .await
    .expect("send in time")
    .expect("send succeeds");
}

async fn signal(ws: &mut Ws, to: PeerId, payload: &str) {
    send(
        ws,
        &ClientMsg::Signal {
            to,
            payload: payload.into(),
        },
    )
    .await;
}

async fn assert_silent(ws: &mut Ws, who: &str) {
    if let Some(msg) = try_recv_within(ws, QUIET).await.unwrap() {
        panic!("{who} should have received nothing, got {msg:?}");
    }
}

async fn expect_error(ws: &mut Ws, code: ErrorCode) {
    match recv(ws).await {
        ServerMsg::Error { code: got, .. } if got == code => {}
        other => panic!("expected Error {{ code: {code:?} }}, got {other:?}"),
    }
}

async fn try_create_share(ws: &mut Ws) -> Result<ShareId, String> {
    send(ws, &ClientMsg::CreateShare).await;
    match try_recv(ws).await? {
        ServerMsg::ShareCreated { share } => Ok(share),
        other => Err(format!("expected ShareCreated, got {other:?}")),
    }
}

async fn create_share(ws: &mut Ws) -> ShareId {
    try_create_share(ws).await.unwrap_or_else(|e| panic!("{e}"))
}

/// `receiver` joins `sender`'s share; checks both sides of the introduction.
async fn try_introduce(
    sender: &mut Ws,
    sender_id: PeerId,
    share: &ShareId,
    receiver: &mut Ws,
    receiver_id: PeerId,
) -> Result<(), String> {
    send(
        receiver,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    match try_recv(receiver).await? {
        ServerMsg::Joined { share: s, sender } if &s == share && sender == sender_id => {}
        other => return Err(format!("expected Joined by {sender_id}, got {other:?}")),
    }
    let expected = ServerMsg::PeerJoined {
        share: share.clone(),
        peer: receiver_id,
    };
    match try_recv(sender).await? {
        got if got == expected => Ok(()),
        other => Err(format!("expected {expected:?}, got {other:?}")),
    }
}

async fn introduce(
    sender: &mut Ws,
    sender_id: PeerId,
    share: &ShareId,
    receiver: &mut Ws,
    receiver_id: PeerId,
) {
    try_introduce(sender, sender_id, share, receiver, receiver_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `from` signals `to`, which must receive it with `from` filled in by the server.
async fn try_relay(
    from: &mut Ws,
    from_id: PeerId,
    to: &mut Ws,
    to_id: PeerId,
) -> Result<(), String> {
    let payload = format!("{from_id}->{to_id}");
    signal(from, to_id, &payload).await;
    let expected = ServerMsg::Signal {
        from: from_id,
        payload,
    };
    match try_recv(to).await? {
        got if got == expected => Ok(()),
        other => Err(format!("expected {expected:?}, got {other:?}")),
    }
}

/// Both directions of a pair relay.
async fn assert_relays(a: &mut Ws, a_id: PeerId, b: &mut Ws, b_id: PeerId) {
    try_relay(b, b_id, a, a_id).await.unwrap();
    try_relay(a, a_id, b, b_id).await.unwrap();
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return started.elapsed();
        }
        sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {within:?}: {what}");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

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
