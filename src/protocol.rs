//! The signaling wire protocol: one serde enum per direction, shared by the server and the WASM
//! client. Messages are JSON text frames, internally tagged by `type` so they read well in devtools.
//!
//! The server never looks inside a [`ClientMsg::Signal`] payload: it is an opaque string (SDP and ICE
//! today, ciphertext once signaling is sealed) relayed between peer ids.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// A server-issued signaling identity, fresh for every WebSocket connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerId(pub Uuid);

impl PeerId {
    #[cfg(feature = "ssr")]
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The topic this peer alone is subscribed to.
    pub fn topic(&self) -> String {
        format!("peer:{}", self.0)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An unguessable share token (128 random bits, URL-safe), distinct from any peer id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShareId(String);

/// Length of a share id: 128 bits as 32 lowercase hex digits.
pub const SHARE_ID_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a share id is {SHARE_ID_LEN} lowercase hex digits")]
pub struct BadShareId;

impl ShareId {
    #[cfg(feature = "ssr")]
    pub fn new_random() -> Self {
        let bytes: [u8; 16] = rand::random();
        Self(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ShareId {
    type Error = BadShareId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = s.len() == SHARE_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s))
        } else {
            Err(BadShareId)
        }
    }
}

impl std::str::FromStr for ShareId {
    type Err = BadShareId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<ShareId> for String {
    fn from(s: ShareId) -> String {
        s.0
    }
}

impl fmt::Display for ShareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One ICE server handed to browsers (from the server's config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Client → server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Create a share bound to this connection's peer.
    CreateShare,
    /// Join a share as a receiver: introduces this peer and the share's owner to each other.
    Join { share: ShareId },
    /// Relay an opaque payload to a peer this peer was introduced to. The server fills in `from`.
    Signal { to: PeerId, payload: String },
    /// Application-level keep-alive; answered with [`ServerMsg::Pong`].
    Ping,
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message on every connection: this connection's identity and the ICE servers to use.
    Welcome {
        you: PeerId,
        ice_servers: Vec<IceServer>,
    },
    ShareCreated {
        share: ShareId,
    },
    /// To a receiver after [`ClientMsg::Join`]: the share's sender.
    Joined {
        share: ShareId,
        sender: PeerId,
    },
    /// To a sender: a receiver joined one of its shares.
    PeerJoined {
        share: ShareId,
        peer: PeerId,
    },
    /// A peer this peer was introduced to has disconnected.
    PeerLeft {
        peer: PeerId,
    },
    Signal {
        from: PeerId,
        payload: String,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl ServerMsg {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMsg::Error {
            code,
            message: message.into(),
        }
    }
}

/// Why the server refused a message; the connection stays open unless a close code says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not a known message.
    BadMessage,
    /// The target is not a registered peer this peer was introduced to.
    UnknownPeer,
    /// No such share (never existed, or its sender left).
    NoSuchShare,
    /// The target's inbox is full; try again later.
    PeerBusy,
    /// A peer may own only a bounded number of shares.
    TooManyShares,
    /// The broker backend failed.
    Internal,
}

/// What two browsers exchange inside [`ClientMsg::Signal`] / [`ServerMsg::Signal`] payloads.
/// The server never parses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SignalPayload {
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    Candidate {
        candidate: String,
        #[serde(default)]
        sdp_mid: Option<String>,
        #[serde(default)]
        sdp_m_line_index: Option<u16>,
    },
}

/// WebSocket close codes that say why the server ended a connection.
pub mod close_code {
    /// Nothing received within the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// A frame over the size limit or not text.
    pub const BAD_FRAME: u16 = 4002;
    /// The server is shutting down: reconnect (to another node).
    pub const RECONNECT: u16 = 4003;
    /// The peer could not be registered.
    pub const REGISTRATION_FAILED: u16 = 4004;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pid(n: u128) -> PeerId {
        PeerId(Uuid::from_u128(n))
    }

    fn share() -> ShareId {
        "0123456789abcdef0123456789abcdef".parse().unwrap()
    }

    #[test]
    fn client_messages_golden_json() {
        let cases = [
            (ClientMsg::CreateShare, json!({"type": "create_share"})),
            (
                ClientMsg::Join { share: share() },
                json!({"type": "join", "share": "0123456789abcdef0123456789abcdef"}),
            ),
            (
                ClientMsg::Signal {
                    to: pid(1),
                    payload: "opaque".into(),
                },
                json!({"type": "signal", "to": "00000000-0000-0000-0000-000000000001", "payload": "opaque"}),
            ),
            (ClientMsg::Ping, json!({"type": "ping"})),
        ];
        for (msg, golden) in cases {
            assert_eq!(serde_json::to_value(&msg).unwrap(), golden);
            assert_eq!(serde_json::from_value::<ClientMsg>(golden).unwrap(), msg);
        }
    }

    #[test]
    fn server_messages_golden_json() {
        let cases = [
            (
                ServerMsg::Welcome {
                    you: pid(2),
                    ice_servers: vec![IceServer {
                        urls: vec!["stun:127.0.0.1:3478".into()],
                        ..Default::default()
                    }],
                },
                json!({"type": "welcome", "you": "00000000-0000-0000-0000-000000000002",
                       "ice_servers": [{"urls": ["stun:127.0.0.1:3478"]}]}),
            ),
            (
                ServerMsg::ShareCreated { share: share() },
                json!({"type": "share_created", "share": "0123456789abcdef0123456789abcdef"}),
            ),
            (
                ServerMsg::Joined {
                    share: share(),
                    sender: pid(3),
                },
                json!({"type": "joined", "share": "0123456789abcdef0123456789abcdef",
                       "sender": "00000000-0000-0000-0000-000000000003"}),
            ),
            (
                ServerMsg::PeerJoined {
                    share: share(),
                    peer: pid(4),
                },
                json!({"type": "peer_joined", "share": "0123456789abcdef0123456789abcdef",
                       "peer": "00000000-0000-0000-0000-000000000004"}),
            ),
            (
                ServerMsg::PeerLeft { peer: pid(5) },
                json!({"type": "peer_left", "peer": "00000000-0000-0000-0000-000000000005"}),
            ),
            (
                ServerMsg::Signal {
                    from: pid(6),
                    payload: "x".into(),
                },
                json!({"type": "signal", "from": "00000000-0000-0000-0000-000000000006", "payload": "x"}),
            ),
            (ServerMsg::Pong, json!({"type": "pong"})),
            (
                ServerMsg::error(ErrorCode::UnknownPeer, "no"),
                json!({"type": "error", "code": "unknown_peer", "message": "no"}),
            ),
        ];
        for (msg, golden) in cases {
            assert_eq!(serde_json::to_value(&msg).unwrap(), golden);
            assert_eq!(serde_json::from_value::<ServerMsg>(golden).unwrap(), msg);
        }
    }

    #[test]
    fn signal_payload_golden_json() {
        let c = SignalPayload::Candidate {
            candidate: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(0),
        };
        let v = json!({"type": "candidate", "candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host",
                       "sdp_mid": "0", "sdp_m_line_index": 0});
        assert_eq!(serde_json::to_value(&c).unwrap(), v);
        assert_eq!(serde_json::from_value::<SignalPayload>(v).unwrap(), c);
        assert_eq!(
            serde_json::to_value(SignalPayload::Offer { sdp: "v=0".into() }).unwrap(),
            json!({"type": "offer", "sdp": "v=0"})
        );
    }

    #[test]
    fn share_ids_are_validated() {
        assert!("0123456789ABCDEF0123456789abcdef"
            .parse::<ShareId>()
            .is_err());
        assert!("short".parse::<ShareId>().is_err());
        assert!(
            serde_json::from_value::<ClientMsg>(json!({"type": "join", "share": "../etc"}))
                .is_err()
        );
    }

    #[test]
    fn unknown_types_are_rejected() {
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"shutdown"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"to":"x"}"#).is_err());
    }

    #[cfg(feature = "ssr")]
    #[test]
    fn random_share_ids_are_valid_and_distinct() {
        let a = ShareId::new_random();
        let b = ShareId::new_random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().parse::<ShareId>().unwrap(), a);
    }
}
