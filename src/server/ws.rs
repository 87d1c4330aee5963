//! `/ws`: one task per WebSocket, with one exit path. The task owns the peer's registration
//! (`peer_state:<id>`), its share leases and the set of peers it was introduced to; all of it is
//! released by `Drop`, however the task ends.
//!
//! Hostile clients are refused before the upgrade (foreign `Origin` → 403, too many sockets from
//! one IP → 429) and paced after it (frame size, JSON depth, a token bucket per connection). Every
//! refusal is counted in [`Metrics`]; logs carry peer ids and reasons, never payloads.

use super::broker::{BrokerError, DynBroker, Registration, ShareLease};
use super::config::{Config, Limits};
use super::limits::{origin_allowed, request_client_ip, IpSlot, PerIpRate, TokenBucket};
use super::metrics::{Disconnect, Gauge, GaugeGuard, JoinOutcome, Metrics, Rejection};
use super::turn::credentials::Issuer;
use super::AppState;
use crate::protocol::{
    close_code, decode_client_msg, ClaimToken, ClientMsg, DecodeError, ErrorCode, IceServer,
    PeerId, ServerMsg, ShareId,
};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{FutureExt, SinkExt};
use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};
use tracing::Instrument;

pub async fn handler(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let ip = connect_info.map(|Extension(ConnectInfo(addr))| {
        request_client_ip(addr.ip(), &headers, &state.config.trusted_proxies)
    });

    // Browsers always send Origin on WebSocket handshakes; a page elsewhere must not be able to
    // drive this broker with its visitors' connections.
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or(""));
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    if !origin_allowed(origin, host, &state.config.allowed_origins) {
        state.metrics.reject(Rejection::Origin);
        tracing::info!(?ip, origin = ?origin, host = ?host, "websocket refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }

    let slot = match ip {
        Some(ip) => match state.ip_connections.try_acquire(ip) {
            Some(slot) => Some(slot),
            None => {
                state.metrics.reject(Rejection::IpCap);
                tracing::warn!(
                    %ip,
                    cap = state.config.limits.max_connections_per_ip,
                    "websocket refused: too many connections from this address"
                );
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address",
                )
                    .into_response();
            }
        },
        None => None,
    };

    let max = state.config.limits.max_frame_bytes;
    // Only what the socket task needs is moved into it: the future lives as long as the
    // connection, and every byte of it counts per idle peer.
    let conn = Conn {
        broker: state.broker,
        config: state.config,
        metrics: state.metrics,
        turn: state.turn,
        ip_slot: slot,
        share_creations: state.share_creations.zip(ip),
    };
    // A small read buffer instead of tungstenite's zero-filled 128 KiB: signaling frames are
    // small, and the buffer grows for a large one (load benchmark: bytes per idle peer).
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let peer = PeerId::new_random();
            let span = tracing::info_span!("peer", %peer, ip = ?ip);
            run(socket, conn, peer).instrument(span)
        })
}

/// Initial size of a socket's read buffer; tungstenite grows it to fit a larger frame. A signaling
/// server mostly holds idle sockets (a peer sends a few dozen messages in its whole life), so this
/// is sized for them: a 1 KiB start cost ~1 kB more per idle peer (load benchmark). tungstenite
/// also never reads more than this beyond what it holds, which straight from the socket meant 3–4
/// `recvfrom` per ~200-byte signal; the accepted sockets are [`super::read_ahead::ReadAhead`]
/// streams, so those small reads are served from one syscall.
const READ_BUFFER_BYTES: usize = 64;

/// What a socket task keeps of [`AppState`].
struct Conn {
    broker: DynBroker,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Mints this peer's TURN credentials for its `welcome`.
    turn: Option<Arc<Issuer>>,
    /// Held for the socket's whole life: the slot goes back when the task ends.
    ip_slot: Option<IpSlot>,
    /// The client address's allowance of new shares.
    share_creations: Option<(Arc<PerIpRate>, IpAddr)>,
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

const RECONNECT_REASON: &str = "server restarting, reconnect";

fn reconnect() -> Message {
    close(close_code::RECONNECT, RECONNECT_REASON)
}

fn json_frame(msg: &ServerMsg) -> Message {
    // Serializing our own enum cannot fail (no maps with non-string keys, no foreign types).
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// Why a frame was not sent.
#[derive(Debug, PartialEq, Eq)]
enum Unsent {
    /// The socket failed or closed.
    Closed,
    /// The client did not take it within [`Limits::send_limit`]: it reads slower than the floor
    /// rate (or not at all).
    TooSlow,
}

/// Sends one frame, giving up after [`Limits::send_limit`] for its size. A client that stops
/// reading fills the TCP buffers; waiting on it would wedge its task (no idle timeout, no
/// shutdown, the peer and its shares registered) and keep its inbox full, so a reader slower
/// than the floor rate is let go.
///
/// Nearly every send completes at once; only one that has to wait gets a timer (boxed, with the
/// pending send). This future sits in every socket task's state, so it stays small: not an `async
/// fn` (which would hold its arguments twice), no timer inline.
#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`: see above
fn send_within<'a>(
    tx: &'a mut WebSocket,
    msg: Message,
    limits: &'a Limits,
) -> impl Future<Output = Result<(), Unsent>> + 'a {
    async move {
        let limit = limits.send_limit(match &msg {
            Message::Text(text) => text.len(),
            _ => 0,
        });
        // The sink's `send`, not axum's inherent `WebSocket::send`, whose future holds the
        // message twice.
        let mut send = SinkExt::send(tx, msg);
        match (&mut send).now_or_never() {
            Some(sent) => sent.map_err(|_| Unsent::Closed),
            None => match Box::pin(timeout(limit, send)).await {
                Ok(sent) => sent.map_err(|_| Unsent::Closed),
                Err(_) => Err(Unsent::TooSlow),
            },
        }
    }
}

/// Why the loop ended, and what (if anything) to tell the client.
enum Exit {
    /// The socket ended or failed.
    ClientGone,
    /// The client sent a close frame.
    ClientClosed,
    /// The client did not read what it was sent fast enough.
    TooSlow,
    Close(u16, &'static str, Disconnect),
}

impl Exit {
    fn cause(&self) -> Disconnect {
        match self {
            Exit::ClientGone | Exit::ClientClosed => Disconnect::Client,
            Exit::TooSlow => Disconnect::SlowReader,
            Exit::Close(_, _, cause) => *cause,
        }
    }
}

/// What a read error from the socket means.
#[derive(Debug, PartialEq, Eq)]
enum ReadFailure {
    /// The transport failed or the client vanished without a close frame: nobody to refuse.
    Gone,
    /// A message over `max_frame_bytes`.
    Oversize,
    /// A protocol violation: unmasked frame, bad UTF-8 in a text frame, bad opcode...
    Malformed,
}

/// Classifies a read error. axum hides tungstenite's error type, so: an `io::Error` anywhere in
/// the source chain is the transport; otherwise tungstenite's messages tell (pinned by the tests
/// in `tests/hostile.rs`), and anything unrecognised counts as malformed.
fn classify_read_error(e: &axum::Error) -> ReadFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<std::io::Error>() {
            return ReadFailure::Gone;
        }
        source = err.source();
    }
    let text = e.to_string();
    if text.contains("without closing handshake") || text.contains("closed connection") {
        ReadFailure::Gone
    } else if text.starts_with("Space limit exceeded") {
        ReadFailure::Oversize
    } else {
        ReadFailure::Malformed
    }
}

/// What woke a socket task.
enum Event {
    Frame(Option<Result<Message, axum::Error>>),
    Inbox(Option<ServerMsg>),
    Tick,
}

/// What the task does next.
enum Step {
    /// Hand a client message to the session.
    Handle(Utf8Bytes),
    Send(Message),
    /// Re-arm the ping timer and ping the client.
    Ping,
    Wait,
    End(Exit),
}

/// Decides what an event asks for, without waiting on anything.
fn on_event(
    event: Event,
    session: &mut Session,
    pacing: &mut Pacing,
    metrics: &Metrics,
    limits: &Limits,
) -> Step {
    match event {
        Event::Frame(frame) => {
            pacing.last_heard = Instant::now();
            match on_frame(frame, pacing, metrics, limits) {
                Ok(Some(text)) => Step::Handle(text),
                Ok(None) => Step::Wait,
                Err(step) => step,
            }
        }
        // Only the broker ends an inbox while its peer is registered: the node is stopping.
        Event::Inbox(None) => Step::End(Exit::Close(
            close_code::RECONNECT,
            RECONNECT_REASON,
            Disconnect::Shutdown,
        )),
        Event::Inbox(Some(msg)) => {
            session.observe(&msg);
            Step::Send(json_frame(&msg))
        }
        Event::Tick if pacing.last_heard.elapsed() > limits.idle_timeout() => {
            metrics.reject(Rejection::IdleTimeout);
            Step::End(Exit::Close(
                close_code::IDLE_TIMEOUT,
                "idle timeout",
                Disconnect::IdleTimeout,
            ))
        }
        Event::Tick => Step::Ping,
    }
}

/// The per-connection limits and counters the loop consults on every client frame.
struct Pacing {
    bucket: TokenBucket,
    /// Consecutive refusals by the token bucket.
    rate_limited: u32,
    last_heard: Instant,
}

/// The ICE servers of the config, then this peer's own TURN credentials.
fn ice_servers_for(peer: PeerId, config: &Config, turn: Option<&Issuer>) -> Vec<IceServer> {
    let mut servers = config.ice_servers.clone();
    if let Some(issuer) = turn {
        servers.push(issuer.ice_server(peer, std::time::SystemTime::now()));
    }
    servers
}

/// The socket task. Not an `async fn`: its arguments are captured by the returned future as
/// they are, where an `async fn` would keep a second copy of each (rust-lang/rust#62958).
fn run(mut socket: WebSocket, conn: Conn, peer: PeerId) -> impl Future<Output = ()> {
    let Conn {
        broker,
        config,
        metrics,
        turn,
        ip_slot,
        share_creations,
    } = conn;
    async move {
        let _ip_slot = &ip_slot;
        let limits = &config.limits;
        metrics.connection();
        let registration = match broker.register(peer).await {
            Ok(r) => r,
            Err(BrokerError::Closed) => {
                metrics.disconnect(Disconnect::Shutdown);
                let _ = send_within(&mut socket, reconnect(), limits).await;
                return;
            }
            Err(e) => {
                metrics.broker_error(&e);
                metrics.reject(Rejection::RegistrationFailed);
                metrics.disconnect(Disconnect::RegistrationFailed);
                tracing::warn!(error = %e, "registration failed");
                let _ = send_within(
                    &mut socket,
                    close(close_code::REGISTRATION_FAILED, "registration failed"),
                    limits,
                )
                .await;
                return;
            }
        };
        let mut session = Session::new(
            peer,
            broker,
            registration,
            metrics.clone(),
            limits.max_json_depth,
            share_creations,
        );
        tracing::info!("peer connected");
        let welcome = json_frame(&ServerMsg::Welcome {
            you: peer,
            ice_servers: ice_servers_for(peer, &config, turn.as_deref()),
        });
        if send_within(&mut socket, welcome, limits).await.is_err() {
            return;
        }
        // A timer in the task itself (an `Interval` would box one), re-armed at every tick.
        let ping = sleep(limits.ping_interval());
        tokio::pin!(ping);
        let mut ice_refresh_at = turn.as_ref().map(|i| Instant::now() + i.refresh_every());
        let mut pacing = Pacing {
            bucket: TokenBucket::new(limits.rate_limit_burst, limits.rate_limit_per_sec),
            rate_limited: 0,
            last_heard: Instant::now(),
        };

        // One await per kind of work (wait for an event, handle a client message, send one frame),
        // and nothing held across them but the connection's own state: the task stays small
        // while the socket idles.
        let exit = loop {
            let event = tokio::select! {
                frame = socket.recv() => Event::Frame(frame),
                msg = session.registration.inbox.recv() => Event::Inbox(msg),
                _ = &mut ping => Event::Tick,
            };
            let frame = match on_event(event, &mut session, &mut pacing, &metrics, limits) {
                Step::Handle(text) => {
                    match session
                        .handle(text.as_str(), limits.max_shares_per_peer)
                        .await
                    {
                        Some(reply) => json_frame(&reply),
                        None => continue,
                    }
                }
                Step::Send(frame) => frame,
                Step::Wait => continue,
                Step::Ping => {
                    let now = Instant::now();
                    ping.as_mut().reset(now + limits.ping_interval());
                    match (&turn, ice_refresh_at) {
                        // Fresh TURN credentials before the last ones expire; a text frame
                        // keeps the socket alive as a ping would.
                        (Some(issuer), Some(at)) if now >= at => {
                            ice_refresh_at = Some(now + issuer.refresh_every());
                            json_frame(&ServerMsg::IceServers {
                                ice_servers: ice_servers_for(peer, &config, Some(issuer)),
                            })
                        }
                        _ => Message::Ping(Default::default()),
                    }
                }
                Step::End(exit) => break exit,
            };
            match send_within(&mut socket, frame, limits).await {
                Ok(()) => {}
                Err(Unsent::Closed) => break Exit::ClientGone,
                Err(Unsent::TooSlow) => break Exit::TooSlow,
            }
        };
        if let Exit::ClientClosed = exit {
            // Flushing sends tungstenite's queued echo: the closing handshake completes.
            let _ = Box::pin(timeout(limits.idle_timeout(), socket.flush())).await;
        }
        metrics.disconnect(exit.cause());
        if matches!(exit.cause(), Disconnect::Shutdown) {
            // The peer is not gone: its browser reconnects to another node and its direct
            // connections carry on. Telling its peers it left would tear down working transfers.
            session.introduced.clear();
        }
        // Shares withdrawn, registration removed, introduced peers told; before any goodbye, which
        // may take a while.
        drop(session);
        if let Exit::Close(code, reason, cause) = exit {
            tracing::debug!(code, reason, "closing socket");
            if send_within(&mut socket, close(code, reason), limits)
                .await
                .is_ok()
                && matches!(cause, Disconnect::RateLimited | Disconnect::BadFrame)
            {
                linger(&mut socket).await;
            }
        }
        tracing::info!(cause = exit.cause().label(), "peer disconnected");
    }
}

/// Checks one frame from the client: `Ok(Some(text))` is a message for the session, `Ok(None)`
/// needs nothing, `Err(step)` is a refusal to send or the end of the connection.
fn on_frame(
    frame: Option<Result<Message, axum::Error>>,
    pacing: &mut Pacing,
    metrics: &Metrics,
    limits: &Limits,
) -> Result<Option<Utf8Bytes>, Step> {
    let text = match frame {
        None => return Err(Step::End(Exit::ClientGone)),
        Some(Ok(Message::Close(_))) => return Err(Step::End(Exit::ClientClosed)),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(None),
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Binary(_))) => {
            metrics.reject(Rejection::BinaryFrame);
            tracing::info!("refused frame: binary");
            return Err(Step::End(Exit::Close(
                close_code::BAD_FRAME,
                "binary frames are not accepted",
                Disconnect::BadFrame,
            )));
        }
        Some(Err(e)) => {
            // Oversize and malformed frames surface here; the read side is unusable after any
            // of them.
            let reason = match classify_read_error(&e) {
                ReadFailure::Gone => {
                    tracing::debug!(error = %e, "socket ended without a close frame");
                    return Err(Step::End(Exit::ClientGone));
                }
                ReadFailure::Oversize => Rejection::OversizeFrame,
                ReadFailure::Malformed => Rejection::BadFrame,
            };
            metrics.reject(reason);
            tracing::info!(reason = reason.label(), error = %e, "refused frame");
            return Err(Step::End(Exit::Close(
                close_code::BAD_FRAME,
                "frame too large or malformed",
                Disconnect::BadFrame,
            )));
        }
    };
    metrics.message_received();
    if pacing.bucket.try_take() {
        // Only a client that keeps pushing past the limit is closed.
        pacing.rate_limited = 0;
        return Ok(Some(text));
    }
    metrics.reject(Rejection::RateLimited);
    pacing.rate_limited = pacing.rate_limited.saturating_add(1);
    if limits.rate_limit_close_after > 0 && pacing.rate_limited >= limits.rate_limit_close_after {
        tracing::warn!(
            rejections = pacing.rate_limited,
            "rate limit exceeded persistently"
        );
        return Err(Step::End(Exit::Close(
            close_code::RATE_LIMITED,
            "rate limit exceeded",
            Disconnect::RateLimited,
        )));
    }
    tracing::debug!(rejections = pacing.rate_limited, "message rate limited");
    let reply = ServerMsg::error(
        ErrorCode::RateLimited,
        format!(
            "more than {} messages per second; slow down",
            limits.rate_limit_per_sec
        ),
    );
    Err(Step::Send(json_frame(&reply)))
}

/// How long a misbehaving client's input is drained after its close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// After closing on a client that flooded us, reads and drops what it already sent until its
/// close reply, for at most [`CLOSE_LINGER`]. Dropping a TCP socket with unread input makes the
/// kernel answer with a reset, which can destroy the close frame (and the code that says why)
/// before the client reads it.
async fn linger(socket: &mut WebSocket) {
    let drain = async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = Box::pin(timeout(CLOSE_LINGER, drain)).await;
}

/// One peer's state, owned by its socket task.
struct Session {
    peer: PeerId,
    broker: DynBroker,
    registration: Registration,
    /// Each lease with the guard that counts it in the `shares` gauge.
    shares: Vec<(ShareLease, GaugeGuard)>,
    /// Peers this one may signal: introduced through a share, in either direction.
    introduced: HashSet<PeerId>,
    metrics: Arc<Metrics>,
    max_json_depth: usize,
    share_creations: Option<(Arc<PerIpRate>, IpAddr)>,
    /// Counts this peer in `peers_connected` for as long as the registration lives.
    _connected: GaugeGuard,
}

impl Session {
    fn new(
        peer: PeerId,
        broker: DynBroker,
        registration: Registration,
        metrics: Arc<Metrics>,
        max_json_depth: usize,
        share_creations: Option<(Arc<PerIpRate>, IpAddr)>,
    ) -> Self {
        Self {
            peer,
            broker,
            registration,
            shares: Vec::new(),
            introduced: HashSet::new(),
            _connected: metrics.track(Gauge::PeersConnected),
            metrics,
            max_json_depth,
            share_creations,
        }
    }

    fn reject(&self, reason: Rejection) {
        self.metrics.reject(reason);
        tracing::debug!(reason = reason.label(), "refused message");
    }

    /// Tracks introductions from messages delivered to this peer.
    fn observe(&mut self, msg: &ServerMsg) {
        match msg {
            ServerMsg::PeerJoined { peer, .. } => {
                self.introduced.insert(*peer);
            }
            ServerMsg::PeerLeft { peer } => {
                self.introduced.remove(peer);
            }
            _ => {}
        }
    }

    /// Handles one client text frame; the reply to send back, if any.
    async fn handle(&mut self, text: &str, max_shares: usize) -> Option<ServerMsg> {
        let msg = match decode_client_msg(text, self.max_json_depth) {
            Ok(m) => m,
            Err(e) => {
                self.reject(match e {
                    DecodeError::TooDeep { .. } => Rejection::TooDeep,
                    DecodeError::Invalid(_) => Rejection::BadMessage,
                });
                return Some(e.to_server_msg());
            }
        };
        match msg {
            ClientMsg::Ping => Some(ServerMsg::Pong),
            ClientMsg::CreateShare => {
                if self.shares.len() >= max_shares {
                    self.reject(Rejection::TooManyShares);
                    return Some(ServerMsg::error(
                        ErrorCode::TooManyShares,
                        format!("at most {max_shares} shares per connection"),
                    ));
                }
                if let Some((rate, ip)) = &self.share_creations {
                    if !rate.check(*ip) {
                        self.reject(Rejection::ShareRate);
                        return Some(ServerMsg::error(
                            ErrorCode::TooManyShares,
                            "too many new shares from this address; try again in a minute",
                        ));
                    }
                }
                Some(match self.broker.create_share(self.peer).await {
                    Ok(lease) => {
                        let (share, token) = (lease.share.clone(), lease.token.clone());
                        self.metrics.share_created();
                        self.shares.push((lease, self.metrics.track(Gauge::Shares)));
                        tracing::debug!(shares = self.shares.len(), "share created");
                        ServerMsg::ShareCreated { share, token }
                    }
                    Err(e) => self.broker_error(e),
                })
            }
            // Share ids and tokens are capabilities: they stay out of the logs.
            // Boxed: rare, and its future would otherwise enlarge every idle socket's task.
            ClientMsg::ReclaimShare { share, token } => {
                Some(Box::pin(self.reclaim_share(share, token, max_shares)).await)
            }
            ClientMsg::Join { share } => {
                let owner = match self.broker.share_owner(&share).await {
                    Ok(Some(owner)) if owner != self.peer => owner,
                    Ok(_) => return Some(self.no_such_share()),
                    Err(e) => {
                        self.metrics.join(JoinOutcome::Error);
                        return Some(self.broker_error(e));
                    }
                };
                // Told again on every join, also when this pair was introduced before: the
                // first `peer_joined` may have been dropped on the way (a full inbox on the
                // sender's node), and a receiver whose join stalled joins again. Senders ignore
                // a join until the receiver's sealed hello, so a repeat costs them nothing.
                let joined = ServerMsg::PeerJoined {
                    share: share.clone(),
                    peer: self.peer,
                };
                match self.broker.publish(owner, joined).await {
                    Ok(()) => {
                        self.introduced.insert(owner);
                        self.metrics.join(JoinOutcome::Ok);
                        tracing::debug!(sender = %owner, "joined a share");
                        Some(ServerMsg::Joined {
                            share,
                            sender: owner,
                        })
                    }
                    Err(BrokerError::UnknownPeer) => Some(self.no_such_share()),
                    Err(e) => {
                        self.metrics.join(JoinOutcome::Error);
                        Some(self.broker_error(e))
                    }
                }
            }
            // The payload is opaque and never logged.
            ClientMsg::Signal { to, payload } => {
                if !self.introduced.contains(&to) {
                    self.reject(Rejection::UnknownPeer);
                    tracing::debug!(%to, "signal to a peer not introduced");
                    return Some(unknown_peer(to));
                }
                let msg = ServerMsg::Signal {
                    from: self.peer,
                    payload,
                };
                match self.broker.publish(to, msg).await {
                    Ok(()) => {
                        self.metrics.message_relayed();
                        None
                    }
                    Err(BrokerError::UnknownPeer) => {
                        self.reject(Rejection::UnknownPeer);
                        Some(unknown_peer(to))
                    }
                    Err(e) => Some(self.broker_error(e)),
                }
            }
        }
    }

    /// A sender back after a reconnect takes its share (same id) under this peer.
    async fn reclaim_share(
        &mut self,
        share: ShareId,
        token: ClaimToken,
        max_shares: usize,
    ) -> ServerMsg {
        let refused = || {
            ServerMsg::error(
                ErrorCode::ReclaimRefused,
                "this share cannot be reclaimed: wrong token, or gone",
            )
        };
        // Already held by this connection (a repeated reclaim): no second lease.
        if let Some((lease, _)) = self.shares.iter().find(|(l, _)| l.share == share) {
            if lease.token == token {
                return ServerMsg::ShareReclaimed { share };
            }
            self.reject(Rejection::ReclaimRefused);
            return refused();
        }
        if self.shares.len() >= max_shares {
            self.reject(Rejection::TooManyShares);
            return ServerMsg::error(
                ErrorCode::TooManyShares,
                format!("at most {max_shares} shares per connection"),
            );
        }
        match self.broker.reclaim_share(&share, &token, self.peer).await {
            Ok(lease) => {
                self.metrics.share_reclaimed();
                self.shares.push((lease, self.metrics.track(Gauge::Shares)));
                tracing::debug!(shares = self.shares.len(), "share reclaimed");
                ServerMsg::ShareReclaimed { share }
            }
            Err(BrokerError::ClaimRefused) => {
                self.reject(Rejection::ReclaimRefused);
                refused()
            }
            Err(e) => self.broker_error(e),
        }
    }

    fn no_such_share(&self) -> ServerMsg {
        self.metrics.join(JoinOutcome::NoSuchShare);
        self.reject(Rejection::NoSuchShare);
        ServerMsg::error(ErrorCode::NoSuchShare, "this share is not available")
    }

    /// Counts a broker failure and turns it into the client's error frame.
    fn broker_error(&self, e: BrokerError) -> ServerMsg {
        self.metrics.broker_error(&e);
        match e {
            BrokerError::UnknownPeer => {
                self.reject(Rejection::UnknownPeer);
                ServerMsg::error(ErrorCode::UnknownPeer, e.to_string())
            }
            BrokerError::PeerBusy => {
                self.reject(Rejection::PeerBusy);
                ServerMsg::error(ErrorCode::PeerBusy, e.to_string())
            }
            BrokerError::ShareRecordsFull => {
                self.reject(Rejection::ShareRecordsFull);
                ServerMsg::error(ErrorCode::TooManyShares, e.to_string())
            }
            other => {
                self.reject(Rejection::Internal);
                tracing::error!(error = %other, "broker failure");
                ServerMsg::error(ErrorCode::Internal, "broker failure")
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Introductions still queued in the inbox count too: a receiver that joined just before
        // this socket ended must hear that its sender left.
        self.registration.unregister();
        while let Some(msg) = self.registration.inbox.try_recv() {
            self.observe(&msg);
        }
        if self.introduced.is_empty() {
            return;
        }
        // Runs on close, error, panic and abort alike; publishing must not wait on this task.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.broker.clone();
        let metrics = self.metrics.clone();
        let peer = self.peer;
        let targets: Vec<PeerId> = self.introduced.drain().collect();
        rt.spawn(
            async move {
                for to in targets {
                    if let Err(e) = broker.publish(to, ServerMsg::PeerLeft { peer }).await {
                        metrics.broker_error(&e);
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
    }
}

fn unknown_peer(to: PeerId) -> ServerMsg {
    ServerMsg::error(
        ErrorCode::UnknownPeer,
        format!("peer {to} is not connected or was not introduced to you"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};

    fn classify(e: WsError) -> ReadFailure {
        classify_read_error(&axum::Error::new(e))
    }

    #[test]
    fn read_errors_are_told_apart() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify(WsError::Io(reset)), ReadFailure::Gone);
        assert_eq!(
            classify(WsError::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )),
            ReadFailure::Gone
        );
        assert_eq!(
            classify(WsError::Capacity(CapacityError::MessageTooLong {
                size: 100_000,
                max_size: 65_536
            })),
            ReadFailure::Oversize
        );
        assert_eq!(
            classify(WsError::Protocol(ProtocolError::UnmaskedFrameFromClient)),
            ReadFailure::Malformed
        );
        assert_eq!(classify(WsError::Utf8), ReadFailure::Malformed);
    }
}
