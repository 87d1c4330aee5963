//! `/ws`: one task per WebSocket, with one exit path. The task owns the peer's registration
//! (`peer_state:<id>`), its share leases and the set of peers it was introduced to; all of it is
//! released by `Drop`, however the task ends.

use super::broker::{BrokerError, DynBroker, Registration, ShareLease};
use super::AppState;
use crate::protocol::{close_code, ClientMsg, ErrorCode, PeerId, ServerMsg};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::{interval, timeout, Instant, MissedTickBehavior};

pub async fn handler(ws: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    let max = state.config.limits.max_frame_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| run(socket, state))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

fn text(msg: &ServerMsg) -> Message {
    // Serializing our own enum cannot fail (no maps with non-string keys, no foreign types).
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// Sends one frame, giving up after `limit`. A client that stops reading eventually fills the TCP
/// buffers; an unbounded send would then wedge its task forever: no idle timeout, no shutdown, and
/// the peer and its shares would stay registered.
async fn send_within(
    tx: &mut SplitSink<WebSocket, Message>,
    msg: Message,
    limit: Duration,
) -> bool {
    matches!(timeout(limit, tx.send(msg)).await, Ok(Ok(())))
}

/// Why the loop ended, and what (if anything) to tell the client.
enum Exit {
    ClientGone,
    Close(u16, &'static str),
}

async fn run(socket: WebSocket, state: AppState) {
    let peer = PeerId::new_random();
    let (mut tx, mut rx) = socket.split();
    let write_limit = state.config.limits.idle_timeout();
    let registration = match state.broker.register(peer).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "registration failed");
            let _ = send_within(
                &mut tx,
                close(close_code::REGISTRATION_FAILED, "registration failed"),
                write_limit,
            )
            .await;
            return;
        }
    };
    let mut session = Session::new(peer, state.broker.clone(), registration);
    tracing::debug!(%peer, "peer connected");
    let limits = &state.config.limits;
    let welcome = ServerMsg::Welcome {
        you: peer,
        ice_servers: state.config.ice_servers.clone(),
    };
    if !send_within(&mut tx, text(&welcome), write_limit).await {
        return;
    }
    let mut ping = interval(limits.ping_interval());
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let stopping = super::stopped(state.shutdown.clone());
    tokio::pin!(stopping);

    let exit = loop {
        tokio::select! {
            frame = rx.next() => {
                last_heard = Instant::now();
                match frame {
                    None => break Exit::ClientGone,
                    Some(Ok(Message::Close(_))) => {
                        // Complete the closing handshake: flushing sends the queued close echo.
                        let _ = timeout(write_limit, tx.flush()).await;
                        break Exit::ClientGone;
                    }
                    Some(Err(e)) => {
                        // Oversize messages surface here; the read side is unusable after it.
                        tracing::debug!(%peer, error = %e, "socket read error");
                        break Exit::Close(close_code::BAD_FRAME, "frame too large or malformed");
                    }
                    Some(Ok(Message::Binary(_))) => {
                        break Exit::Close(close_code::BAD_FRAME, "binary frames are not accepted");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Text(t))) => {
                        if let Some(reply) = session.handle(t.as_str(), limits.max_shares_per_peer).await {
                            if !send_within(&mut tx, text(&reply), write_limit).await {
                                break Exit::ClientGone;
                            }
                        }
                    }
                }
            }
            msg = session.registration.inbox.recv() => {
                let Some(msg) = msg else { break Exit::ClientGone };
                session.observe(&msg);
                if !send_within(&mut tx, text(&msg), write_limit).await {
                    break Exit::ClientGone;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > limits.idle_timeout() {
                    break Exit::Close(close_code::IDLE_TIMEOUT, "idle timeout");
                }
                if !send_within(&mut tx, Message::Ping(Default::default()), write_limit).await {
                    break Exit::ClientGone;
                }
            }
            _ = &mut stopping => {
                break Exit::Close(close_code::RECONNECT, "server restarting, reconnect");
            }
        }
    };
    if let Exit::Close(code, reason) = exit {
        tracing::debug!(%peer, code, reason, "closing socket");
        let _ = send_within(&mut tx, close(code, reason), write_limit).await;
    }
    tracing::debug!(%peer, "peer disconnected");
    // `session` drops here: shares withdrawn, registration removed, introduced peers told.
}

/// One peer's state, owned by its socket task.
struct Session {
    peer: PeerId,
    broker: DynBroker,
    registration: Registration,
    shares: Vec<ShareLease>,
    /// Peers this one may signal: introduced through a share, in either direction.
    introduced: HashSet<PeerId>,
}

impl Session {
    fn new(peer: PeerId, broker: DynBroker, registration: Registration) -> Self {
        Self {
            peer,
            broker,
            registration,
            shares: Vec::new(),
            introduced: HashSet::new(),
        }
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
        let msg = match serde_json::from_str::<ClientMsg>(text) {
            Ok(m) => m,
            Err(e) => return Some(ServerMsg::error(ErrorCode::BadMessage, e.to_string())),
        };
        match msg {
            ClientMsg::Ping => Some(ServerMsg::Pong),
            ClientMsg::CreateShare => {
                if self.shares.len() >= max_shares {
                    return Some(ServerMsg::error(
                        ErrorCode::TooManyShares,
                        format!("at most {max_shares} shares per connection"),
                    ));
                }
                Some(match self.broker.create_share(self.peer).await {
                    Ok(lease) => {
                        let share = lease.share.clone();
                        self.shares.push(lease);
                        ServerMsg::ShareCreated { share }
                    }
                    Err(e) => broker_error(e),
                })
            }
            ClientMsg::Join { share } => {
                let owner = match self.broker.share_owner(&share).await {
                    Ok(Some(owner)) if owner != self.peer => owner,
                    Ok(_) => {
                        return Some(ServerMsg::error(
                            ErrorCode::NoSuchShare,
                            "this share is not available",
                        ))
                    }
                    Err(e) => return Some(broker_error(e)),
                };
                let joined = ServerMsg::PeerJoined {
                    share: share.clone(),
                    peer: self.peer,
                };
                match self.broker.publish(owner, joined).await {
                    Ok(()) => {
                        self.introduced.insert(owner);
                        Some(ServerMsg::Joined {
                            share,
                            sender: owner,
                        })
                    }
                    Err(BrokerError::UnknownPeer) => Some(ServerMsg::error(
                        ErrorCode::NoSuchShare,
                        "this share is not available",
                    )),
                    Err(e) => Some(broker_error(e)),
                }
            }
            ClientMsg::Signal { to, payload } => {
                if !self.introduced.contains(&to) {
                    return Some(unknown_peer(to));
                }
                let msg = ServerMsg::Signal {
                    from: self.peer,
                    payload,
                };
                match self.broker.publish(to, msg).await {
                    Ok(()) => None,
                    Err(BrokerError::UnknownPeer) => Some(unknown_peer(to)),
                    Err(e) => Some(broker_error(e)),
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.introduced.is_empty() {
            return;
        }
        // Runs on close, error, panic and abort alike; publishing must not wait on this task.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.broker.clone();
        let peer = self.peer;
        let targets: Vec<PeerId> = self.introduced.drain().collect();
        rt.spawn(async move {
            for to in targets {
                let _ = broker.publish(to, ServerMsg::PeerLeft { peer }).await;
            }
        });
    }
}

fn unknown_peer(to: PeerId) -> ServerMsg {
    ServerMsg::error(
        ErrorCode::UnknownPeer,
        format!("peer {to} is not connected or was not introduced to you"),
    )
}

fn broker_error(e: BrokerError) -> ServerMsg {
    match e {
        BrokerError::UnknownPeer => ServerMsg::error(ErrorCode::UnknownPeer, e.to_string()),
        BrokerError::PeerBusy => ServerMsg::error(ErrorCode::PeerBusy, e.to_string()),
        other => {
            tracing::error!(error = %other, "broker failure");
            ServerMsg::error(ErrorCode::Internal, "broker failure")
        }
    }
}
