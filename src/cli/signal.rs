//! The CLI's side of the signaling broker: the same `/ws` and the same messages as a browser.

use crate::protocol::{ClientMsg, PeerId, ServerMsg, SignalPayload};
use crate::seal::ShareKey;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot reach the server at {url}: {source}")]
    Connect {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("the server closed the connection")]
    Closed,
    #[error("the server sent something unreadable: {0}")]
    Unreadable(String),
    #[error("the server did not greet us")]
    NoWelcome,
}

/// A connection to the broker, with this peer's id.
pub struct Signaling {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub me: PeerId,
}

impl Signaling {
    /// Connects to `base` (`http(s)://host[:port]`) and waits for the welcome.
    pub async fn connect(base: &str) -> Result<Self, SignalError> {
        let url = ws_url(base);
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| SignalError::Connect {
                url: url.clone(),
                source: Box::new(e),
            })?;
        let mut s = Self {
            ws,
            me: PeerId(uuid::Uuid::nil()),
        };
        match s.recv().await? {
            ServerMsg::Welcome { you, .. } => s.me = you,
            _ => return Err(SignalError::NoWelcome),
        }
        Ok(s)
    }

    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), SignalError> {
        let text =
            serde_json::to_string(msg).map_err(|e| SignalError::Unreadable(e.to_string()))?;
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(|_| SignalError::Closed)
    }

    /// Sends `payload` to `to`, sealed with `key`.
    pub async fn signal(
        &mut self,
        key: &ShareKey,
        to: PeerId,
        payload: &SignalPayload,
    ) -> Result<(), SignalError> {
        let json =
            serde_json::to_string(payload).map_err(|e| SignalError::Unreadable(e.to_string()))?;
        let sealed = key
            .seal(self.me, to, &json)
            .map_err(|e| SignalError::Unreadable(e.to_string()))?;
        self.send(&ClientMsg::Signal {
            to,
            payload: sealed,
        })
        .await
    }

    /// The next message from the server (pings are answered on the way). Cancel-safe.
    pub async fn recv(&mut self) -> Result<ServerMsg, SignalError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text)
                        .map_err(|e| SignalError::Unreadable(e.to_string()));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return Err(SignalError::Closed)
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Opens a payload from `from` to `me`; `None` if it does not open under `key` or is not a
/// signal payload.
pub fn open(key: &ShareKey, from: PeerId, me: PeerId, sealed: &str) -> Option<SignalPayload> {
    let json = key.open(from, me, sealed).ok()?;
    serde_json::from_str(&json).ok()
}

/// `http://host:port[/…]` → `ws://host:port/ws` (https → wss).
pub fn ws_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let (scheme, rest) = match base.split_once("://") {
        Some(("https", rest)) => ("wss", rest),
        Some((_, rest)) => ("ws", rest),
        None => ("ws", base),
    };
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}/ws")
}

#[cfg(test)]
mod tests {
    use super::ws_url;

    #[test]
    fn the_socket_is_on_the_links_host() {
        assert_eq!(ws_url("http://127.0.0.1:3000"), "ws://127.0.0.1:3000/ws");
        assert_eq!(
            ws_url("https://drop.example.org/s/abc"),
            "wss://drop.example.org/ws"
        );
        assert_eq!(ws_url("localhost:3000/"), "ws://localhost:3000/ws");
    }
}
