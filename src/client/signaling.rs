//! The signaling WebSocket, reopened when it drops: a stream of [`Event`]s, and per connection a
//! cloneable [`Signaling`] handle for sending [`ClientMsg`]s.
//!
//! When a connection ends (the server restarting closes with 4003; a network drop closes with
//! 1006) the stream says so ([`Event::Lost`]), waits ([`Backoff::SIGNALING`]: 250 ms doubling to
//! 5 s, jittered) and opens a new one ([`Event::Connected`], then the server's `welcome` with a
//! new peer id). Handles of a lost connection are dead: what they send is dropped, so nothing
//! addressed under an old identity reaches the new connection. Dropping the stream closes the
//! socket and cancels any pending retry.

use super::{window, ClientError};
use crate::protocol::{ClientMsg, ServerMsg};
use crate::reconnect::{reconnects_after, Backoff};
use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::stream::{LocalBoxStream, SplitStream};
use futures::{SinkExt, Stream, StreamExt};
use gloo_net::websocket::{futures::WebSocket, Message, WebSocketError};
use gloo_timers::future::TimeoutFuture;

/// Sends on one connection; dead (sends are dropped) once that connection is lost.
#[derive(Clone)]
pub struct Signaling {
    out: UnboundedSender<ClientMsg>,
}

impl Signaling {
    pub fn send(&self, msg: ClientMsg) {
        // Fails only once the connection is gone; the event stream reports that.
        let _ = self.out.unbounded_send(msg);
    }

    /// Ends the writer task, so the socket is released as soon as its reader is.
    fn close(&self) {
        self.out.close_channel();
    }
}

/// What the signaling connection reports, in order.
pub enum Event {
    /// A connection was opened (the first, or after a loss); send through this handle. The
    /// server's `welcome` follows.
    Connected(Signaling),
    Msg(ServerMsg),
    /// The connection ended. With `retrying`, another is opened after a backoff; without, this
    /// is the last event.
    Lost {
        why: String,
        retrying: bool,
    },
}

/// Opens `/ws` on the page's own origin, forever reopened as described in the module docs.
pub fn connect() -> impl Stream<Item = Event> + Unpin {
    let driver = Driver {
        policy: Backoff::SIGNALING,
        failures: 0,
        current: None,
        done: false,
    };
    futures::stream::unfold(driver, Driver::step).boxed_local()
}

struct Driver {
    policy: Backoff,
    /// Connections lost (or not opened) since the last `welcome`.
    failures: u32,
    current: Option<(
        Signaling,
        LocalBoxStream<'static, Result<Message, WebSocketError>>,
    )>,
    done: bool,
}

impl Driver {
    async fn step(mut self) -> Option<(Event, Self)> {
        if self.done {
            return None;
        }
        let Some((_, incoming)) = self.current.as_mut() else {
            if self.failures > 0 {
                // `failures` ≥ 1 here, and `lost` only retries while a delay exists.
                let delay = self
                    .policy
                    .delay_ms(self.failures - 1, js_sys::Math::random())
                    .unwrap_or(self.policy.max_ms);
                TimeoutFuture::new(delay).await;
            }
            return Some(match open() {
                Ok((signaling, incoming)) => {
                    self.current = Some((signaling.clone(), incoming.boxed_local()));
                    (Event::Connected(signaling), self)
                }
                Err(e) => self.lost(e.to_string(), true),
            });
        };
        loop {
            let why = match incoming.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMsg>(&text) {
                    Ok(msg) => {
                        if matches!(msg, ServerMsg::Welcome { .. }) {
                            self.failures = 0;
                        }
                        return Some((Event::Msg(msg), self));
                    }
                    Err(e) => {
                        leptos::logging::warn!("unreadable server message: {e}");
                        continue;
                    }
                },
                Some(Ok(Message::Bytes(_))) => {
                    leptos::logging::warn!("unexpected binary frame from the server");
                    continue;
                }
                // Browsers fire `close` after every `error`: wait for it and its code.
                Some(Err(WebSocketError::ConnectionError)) => continue,
                Some(Err(WebSocketError::ConnectionClose(close))) => {
                    let retrying = reconnects_after(close.code);
                    let why = if close.reason.is_empty() {
                        format!("connection closed (code {})", close.code)
                    } else {
                        format!("{} (code {})", close.reason, close.code)
                    };
                    return Some(self.lost(why, retrying));
                }
                Some(Err(e)) => e.to_string(),
                None => "connection to the server closed".into(),
            };
            return Some(self.lost(why, true));
        }
    }

    /// The current connection (if any) is gone: its handles die, and another attempt follows
    /// unless `retry` is false or the attempts are used up.
    fn lost(mut self, why: String, retry: bool) -> (Event, Self) {
        if let Some((signaling, _)) = self.current.take() {
            signaling.close();
        }
        let retrying = retry && self.policy.delay_ms(self.failures, 0.0).is_some();
        self.failures += 1;
        self.done = !retrying;
        (Event::Lost { why, retrying }, self)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some((signaling, _)) = self.current.take() {
            signaling.close();
        }
    }
}

/// One connection: its handle, and its read half. The socket closes once the writer task has
/// ended (every handle dropped or closed) and the read half is dropped.
fn open() -> Result<(Signaling, SplitStream<WebSocket>), ClientError> {
    let location = window()?.location();
    let scheme = if location.protocol()? == "https:" {
        "wss"
    } else {
        "ws"
    };
    let url = format!("{scheme}://{}/ws", location.host()?);
    let socket = WebSocket::open(&url).map_err(|e| ClientError::Signaling(e.to_string()))?;
    let (mut write, read) = socket.split();
    let (out, mut queue) = unbounded::<ClientMsg>();
    wasm_bindgen_futures::spawn_local(async move {
        while let Some(msg) = queue.next().await {
            let Ok(text) = serde_json::to_string(&msg) else {
                continue;
            };
            if write.send(Message::Text(text)).await.is_err() {
                break;
            }
        }
        let _ = write.close().await;
    });
    Ok((Signaling { out }, read))
}
