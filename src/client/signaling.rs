//! The signaling WebSocket: a cloneable handle for sending [`ClientMsg`]s and a stream of
//! [`ServerMsg`]s. The socket closes when both the handle clones and the stream are dropped.

use super::{window, ClientError};
use crate::protocol::{ClientMsg, ServerMsg};
use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::{SinkExt, Stream, StreamExt};
use gloo_net::websocket::{futures::WebSocket, Message};

#[derive(Clone)]
pub struct Signaling {
    out: UnboundedSender<ClientMsg>,
}

/// What the socket delivers: a message, or why it stopped.
pub type Incoming = Result<ServerMsg, ClientError>;

impl Signaling {
    /// Opens `/ws` on the page's own origin.
    pub fn connect() -> Result<(Signaling, impl Stream<Item = Incoming> + Unpin), ClientError> {
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
        let incoming = read
            .map(|frame| match frame {
                Ok(Message::Text(text)) => serde_json::from_str::<ServerMsg>(&text)
                    .map_err(|e| ClientError::Signaling(format!("unreadable server message: {e}"))),
                Ok(Message::Bytes(_)) => {
                    Err(ClientError::Signaling("unexpected binary frame".into()))
                }
                Err(e) => Err(ClientError::Signaling(e.to_string())),
            })
            .chain(futures::stream::once(futures::future::ready(Err(
                ClientError::Signaling("connection to the server closed".into()),
            ))));
        Ok((Signaling { out }, incoming))
    }

    pub fn send(&self, msg: ClientMsg) {
        // Fails only once the socket task ended; the stream reports that.
        let _ = self.out.unbounded_send(msg);
    }
}
