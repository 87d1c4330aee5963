//! Helpers shared by the integration tests (`tests/broker.rs`, `tests/hostile.rs`,
//! `tests/multinode.rs`): servers on an ephemeral port, WebSocket clients that speak the
//! protocol with timeouts, raw-TCP WebSocket clients, and (from the broker's `test_support`,
//! shared with its unit tests) a private `redis-server` and `eventually`.
//!
//! Each test file is its own crate and uses only part of this module.
#![allow(dead_code)]

use beamdrop::protocol::{ClaimToken, ClientMsg, ErrorCode, PeerId, ServerMsg, ShareId};
use beamdrop::server::config::Config;
use beamdrop::server::{start, RunningServer};
use futures::{SinkExt, StreamExt};
use leptos::prelude::LeptosOptions;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// How long any single expected event may take before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(5);
/// How long a client must stay silent to count as "received nothing".
pub const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Server helpers
// ---------------------------------------------------------------------------------------------

/// The default configuration, listening on a free port.
pub fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

pub fn leptos_options() -> LeptosOptions {
    LeptosOptions::builder().output_name("beamdrop").build()
}

pub async fn server_with(config: Config) -> RunningServer {
    start(config, leptos_options())
        .await
        .expect("server starts")
}

pub async fn server() -> RunningServer {
    server_with(config()).await
}

pub async fn stop(server: RunningServer) {
    timeout(STEP, server.shutdown())
        .await
        .expect("shutdown finishes in time")
        .expect("shutdown returns Ok");
}

// ---------------------------------------------------------------------------------------------
// Client helpers. The `try_` forms return what went wrong instead of panicking, for tests that
// retry; the plain forms panic.
// ---------------------------------------------------------------------------------------------

/// TCP connect + WebSocket handshake on `/ws`, without reading anything; optionally as a browser
/// page from `origin` would.
pub async fn open_from(addr: SocketAddr, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).unwrap());
    }
    let attempt = async {
        let tcp = TcpStream::connect(addr).await?;
        let (ws, _response) = tokio_tungstenite::client_async(request, tcp).await?;
        Ok(ws)
    };
    timeout(STEP, attempt).await.expect("handshake in time")
}

/// TCP connect + WebSocket handshake on `/ws`, without reading anything.
pub async fn open(addr: SocketAddr) -> Result<Ws, tungstenite::Error> {
    open_from(addr, None).await
}

/// Reads the Welcome off a fresh socket.
pub async fn try_welcome(mut ws: Ws) -> Result<(Ws, PeerId), String> {
    match try_recv(&mut ws).await? {
        ServerMsg::Welcome { you, .. } => Ok((ws, you)),
        other => Err(format!("first message must be Welcome, got {other:?}")),
    }
}

pub async fn welcome(ws: Ws) -> (Ws, PeerId) {
    try_welcome(ws).await.unwrap_or_else(|e| panic!("{e}"))
}

/// A connected client and the identity the server's Welcome gave it.
pub async fn try_connect(addr: SocketAddr) -> Result<(Ws, PeerId), String> {
    let ws = open(addr)
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    try_welcome(ws).await
}

pub async fn connect(addr: SocketAddr) -> (Ws, PeerId) {
    try_connect(addr).await.unwrap_or_else(|e| panic!("{e}"))
}

pub async fn send_text(ws: &mut Ws, text: String) {
    timeout(STEP, ws.send(Message::text(text)))
        .await
        .expect("send in time")
        .expect("send succeeds");
}

pub async fn send(ws: &mut Ws, msg: &ClientMsg) {
    send_text(ws, serde_json::to_string(msg).unwrap()).await;
}

pub async fn signal(ws: &mut Ws, to: PeerId, payload: &str) {
    send(
        ws,
        &ClientMsg::Signal {
            to,
            payload: payload.into(),
        },
    )
    .await;
}

/// The next server message within `wait`, skipping ping/pong frames. `Ok(None)` on timeout,
/// `Err` when the connection ends or the server sends anything but a JSON `ServerMsg`.
pub async fn try_recv_within(ws: &mut Ws, wait: Duration) -> Result<Option<ServerMsg>, String> {
    let deadline = Instant::now() + wait;
    loop {
        let Ok(frame) = tokio::time::timeout_at(deadline, ws.next()).await else {
            return Ok(None);
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map(Some)
                    .map_err(|e| format!("server sent text that is not a ServerMsg: {t:?}: {e}"));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return Err(format!("expected a text frame, got {other:?}")),
        }
    }
}

/// The next server message within `wait`, skipping ping/pong frames; `None` on timeout.
/// Panics if the connection closes or the server sends anything but JSON text.
pub async fn recv_within(ws: &mut Ws, wait: Duration) -> Option<ServerMsg> {
    try_recv_within(ws, wait)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn try_recv(ws: &mut Ws) -> Result<ServerMsg, String> {
    try_recv_within(ws, STEP)
        .await?
        .ok_or_else(|| format!("no server message within {STEP:?}"))
}

/// The next server message, skipping ping/pong frames; panics on anything else or after [`STEP`].
pub async fn recv(ws: &mut Ws) -> ServerMsg {
    try_recv(ws).await.unwrap_or_else(|e| panic!("{e}"))
}

pub async fn assert_silent(ws: &mut Ws, who: &str) {
    if let Some(msg) = recv_within(ws, QUIET).await {
        panic!("{who} should have received nothing, got {msg:?}");
    }
}

pub async fn expect_error(ws: &mut Ws, code: ErrorCode) {
    match recv(ws).await {
        ServerMsg::Error { code: got, .. } if got == code => {}
        other => panic!("expected Error {{ code: {code:?} }}, got {other:?}"),
    }
}

/// Creates a share; its id and the token that reclaims it.
pub async fn try_create_claimed_share(ws: &mut Ws) -> Result<(ShareId, ClaimToken), String> {
    send(ws, &ClientMsg::CreateShare).await;
    match try_recv(ws).await? {
        ServerMsg::ShareCreated { share, token } => Ok((share, token)),
        other => Err(format!("expected ShareCreated, got {other:?}")),
    }
}

pub async fn create_claimed_share(ws: &mut Ws) -> (ShareId, ClaimToken) {
    try_create_claimed_share(ws)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn try_create_share(ws: &mut Ws) -> Result<ShareId, String> {
    Ok(try_create_claimed_share(ws).await?.0)
}

pub async fn create_share(ws: &mut Ws) -> ShareId {
    try_create_share(ws).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `ReclaimShare`; the server's answer.
pub async fn reclaim(ws: &mut Ws, share: &ShareId, token: &ClaimToken) -> ServerMsg {
    send(
        ws,
        &ClientMsg::ReclaimShare {
            share: share.clone(),
            token: token.clone(),
        },
    )
    .await;
    recv(ws).await
}

/// Joins `share` as a receiver; returns the sender the server introduced.
pub async fn try_join(ws: &mut Ws, share: &ShareId) -> Result<PeerId, String> {
    send(
        ws,
        &ClientMsg::Join {
            share: share.clone(),
        },
    )
    .await;
    match try_recv(ws).await? {
        ServerMsg::Joined { share: s, sender } if &s == share => Ok(sender),
        other => Err(format!(
            "expected Joined {{ share: {share} }}, got {other:?}"
        )),
    }
}

pub async fn join(ws: &mut Ws, share: &ShareId) -> PeerId {
    try_join(ws, share).await.unwrap_or_else(|e| panic!("{e}"))
}

/// `receiver` joins `sender`'s share; checks both sides of the introduction.
pub async fn try_introduce(
    sender: &mut Ws,
    sender_id: PeerId,
    share: &ShareId,
    receiver: &mut Ws,
    receiver_id: PeerId,
) -> Result<(), String> {
    let introduced = try_join(receiver, share).await?;
    if introduced != sender_id {
        return Err(format!(
            "expected Joined by {sender_id}, got Joined by {introduced}"
        ));
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

pub async fn introduce(
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
pub async fn try_relay(
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
pub async fn assert_relays(a: &mut Ws, a_id: PeerId, b: &mut Ws, b_id: PeerId) {
    try_relay(b, b_id, a, a_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    try_relay(a, a_id, b, b_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket over TCP, for what no WebSocket library would do
// ---------------------------------------------------------------------------------------------

/// A WebSocket client on raw TCP. Returns right after the 101 response, having read nothing past
/// it.
pub async fn open_raw(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = timeout(STEP, tcp.read(&mut byte)).await.unwrap().unwrap();
        assert!(n > 0, "server closed during the handshake");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "handshake failed: {}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// Splits complete WebSocket frames (opcode, payload) off the front of `buf`.
pub fn take_frames(buf: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    loop {
        if buf.len() < 2 {
            return frames;
        }
        let opcode = buf[0] & 0x0f;
        let masked = buf[1] & 0x80 != 0;
        let (len, mut at) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return frames,
            n => (n as usize, 2),
        };
        let mask = if masked {
            if buf.len() < at + 4 {
                return frames;
            }
            at += 4;
            Some([buf[at - 4], buf[at - 3], buf[at - 2], buf[at - 1]])
        } else {
            None
        };
        if buf.len() < at + len {
            return frames;
        }
        let mut payload: Vec<u8> = buf.drain(..at + len).skip(at).collect();
        if let Some(mask) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        frames.push((opcode, payload));
    }
}

// ---------------------------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------------------------

#[path = "../../src/server/broker/redis/test_support.rs"]
mod test_support;
// Each test crate uses a part of it.
#[allow(unused_imports)]
pub use test_support::{eventually, TestRedis};

/// [`config`] with `redis` as the broker.
pub fn redis_config(redis: &TestRedis) -> Config {
    Config {
        broker: redis.uri(),
        ..config()
    }
}
