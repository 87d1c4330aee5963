//! The signaling wire protocol: one serde enum per direction, shared by the server and the WASM
//! client. Messages are JSON text frames, internally tagged by `type` so they read well in devtools.
//!
//! The server never looks inside a [`ClientMsg::Signal`] payload: it is an opaque string (SDP and ICE
//! sealed with the share key, so ciphertext to the server) relayed between peer ids.

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

/// The constructors and conversions of a 128-bit lowercase-hex newtype (share ids, claim tokens):
/// it can only hold a valid value, and (de)serializes as its string.
macro_rules! hex128_newtype {
    ($name:ident, $error:ident) => {
        impl $name {
            #[cfg(feature = "ssr")]
            pub fn new_random() -> Self {
                let bytes: [u8; 16] = rand::random();
                Self(hex::encode(bytes))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = $error;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                if is_hex128(&s) {
                    Ok(Self(s))
                } else {
                    Err($error)
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

/// 128 bits as 32 lowercase hex digits: the form of share ids and claim tokens.
fn is_hex128(s: &str) -> bool {
    s.len() == SHARE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

hex128_newtype!(ShareId, BadShareId);

impl fmt::Display for ShareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Proof that a connection speaks for a share's sender: 128 random bits as 32 lowercase hex
/// digits, told only to the socket that created the share (in [`ServerMsg::ShareCreated`]). After
/// a reconnect the sender's page presents it in [`ClientMsg::ReclaimShare`] to take the same share
/// id back under its new peer id. The server keeps only a hash of it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClaimToken(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a claim token is 32 lowercase hex digits")]
pub struct BadClaimToken;

hex128_newtype!(ClaimToken, BadClaimToken);

/// A secret: never printed, so it cannot end up in a log line by accident.
impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClaimToken(..)")
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

impl IceServer {
    /// Whether it offers a relay (a `turn:` or `turns:` URL), not only STUN.
    pub fn relays(&self) -> bool {
        self.urls
            .iter()
            .any(|u| u.starts_with("turn:") || u.starts_with("turns:"))
    }
}

/// Client → server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Create a share bound to this connection's peer.
    CreateShare,
    /// After a reconnect: bind the share this page created earlier (same id, so the link already
    /// handed out keeps working) to this connection's peer. Answered with
    /// [`ServerMsg::ShareReclaimed`], or [`ErrorCode::ReclaimRefused`] when the token does not
    /// match or the share is long gone.
    ReclaimShare { share: ShareId, token: ClaimToken },
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
    /// Fresh ICE servers (new TURN credentials, sent before the welcome's expire): for
    /// connections made and ICE restarts done from now on.
    IceServers {
        ice_servers: Vec<IceServer>,
    },
    /// The new share, and the token that lets this page reclaim it after a reconnect.
    ShareCreated {
        share: ShareId,
        token: ClaimToken,
    },
    /// The share is bound to this connection's peer again; receivers can join it.
    ShareReclaimed {
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
    /// This connection sent messages faster than its rate limit: slow down. Persisting closes the
    /// socket with [`close_code::RATE_LIMITED`].
    RateLimited,
    /// A [`ClientMsg::ReclaimShare`] with a token that does not match, or for a share the server
    /// no longer knows (never existed, or gone longer than the reclaim window): nothing changed.
    ReclaimRefused,
}

/// What two browsers exchange inside [`ClientMsg::Signal`] / [`ServerMsg::Signal`] payloads.
/// The server never parses it (it is sealed with the share key, see `seal.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SignalPayload {
    /// Receiver → sender, after [`ServerMsg::Joined`] and again after a broken connection:
    /// "connect to me". Only a holder of the link's `#secret` can seal one, so the sender sets up
    /// a connection for nobody else. `attempt` grows with each one a page sends.
    Hello {
        attempt: u32,
    },
    /// Sender → receiver: a payload from you did not open (altered on the way, or sealed with
    /// another key). Sealed with the right key, so a receiver holding a wrong secret cannot
    /// open this either, and says the link is damaged; one holding the right one learns that
    /// something between the two pages altered its message.
    Rejected,
    /// Receiver → sender: "I was `from`; my signaling socket came back under this peer id, and
    /// the connection you have with `from` is mine: signal it here from now on". Sent while
    /// that connection still lives (a phone changed networks), so it can be restarted (ICE)
    /// instead of replaced. Sealed like everything else, so only a link holder can send one;
    /// one who also knew another receiver's peer id could break that receiver's connection,
    /// never take it over (its DTLS keys stay with the two browsers).
    Moved {
        from: PeerId,
    },
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
    /// The client kept exceeding its message rate limit after being told to slow down.
    pub const RATE_LIMITED: u16 = 4005;
}

/// Deepest JSON nesting (arrays and objects) the server decodes by default. A client message
/// needs 1; anything past the limit is refused before serde recurses into it.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 16;

/// Why a client text frame is not a [`ClientMsg`]. Always answered with
/// [`ErrorCode::BadMessage`]; the connection stays open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Arrays/objects nested deeper than the limit (found by a byte scan, before any parsing).
    #[error("message nested deeper than {max} levels")]
    TooDeep { max: usize },
    /// Not JSON, or not a known message.
    #[error("{0}")]
    Invalid(String),
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::BadMessage
    }

    /// The error frame the server answers with.
    pub fn to_server_msg(&self) -> ServerMsg {
        ServerMsg::error(self.code(), self.to_string())
    }
}

/// Whether `json` nests arrays/objects deeper than `max_depth`, by one pass over the bytes that
/// skips string contents (and their escapes). No allocation, no recursion.
///
/// Sound for any input: serde_json parses left to right and stops at the first error, and on any
/// valid JSON prefix this scan sees the same strings and brackets, so serde never recurses deeper
/// than the depth this scan reports.
pub fn json_depth_exceeds(json: &[u8], max_depth: usize) -> bool {
    // Nesting deeper than `max_depth` needs more than `max_depth` opening brackets somewhere. A
    // plain count (vectorised) settles nearly every real message, whose brackets are a few; only
    // the rest get the scan that tells brackets in strings apart.
    let opening = json.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if opening <= max_depth {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Text frame → [`ClientMsg`], or a typed error: the server's one decoder (and the fuzz target's).
/// Frame size is bounded before this, by the WebSocket layer; nesting is bounded here, before
/// serde sees the text.
pub fn decode_client_msg(text: &str, max_depth: usize) -> Result<ClientMsg, DecodeError> {
    if json_depth_exceeds(text.as_bytes(), max_depth) {
        return Err(DecodeError::TooDeep { max: max_depth });
    }
    serde_json::from_str(text).map_err(|e| DecodeError::Invalid(e.to_string()))
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

    fn token() -> ClaimToken {
        "fedcba9876543210fedcba9876543210".parse().unwrap()
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
            (
                ClientMsg::ReclaimShare {
                    share: share(),
                    token: token(),
                },
                json!({"type": "reclaim_share", "share": "0123456789abcdef0123456789abcdef",
                       "token": "fedcba9876543210fedcba9876543210"}),
            ),
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
                ServerMsg::IceServers {
                    ice_servers: vec![IceServer {
                        urls: vec!["turn:198.18.0.1:3478?transport=tcp".into()],
                        username: Some("1700000600:00000000-0000-0000-0000-000000000002".into()),
                        credential: Some("c2VjcmV0".into()),
                    }],
                },
                json!({"type": "ice_servers", "ice_servers": [{
                    "urls": ["turn:198.18.0.1:3478?transport=tcp"],
                    "username": "1700000600:00000000-0000-0000-0000-000000000002",
                    "credential": "c2VjcmV0"}]}),
            ),
            (
                ServerMsg::ShareCreated {
                    share: share(),
                    token: token(),
                },
                json!({"type": "share_created", "share": "0123456789abcdef0123456789abcdef",
                       "token": "fedcba9876543210fedcba9876543210"}),
            ),
            (
                ServerMsg::ShareReclaimed { share: share() },
                json!({"type": "share_reclaimed", "share": "0123456789abcdef0123456789abcdef"}),
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
            (
                ServerMsg::error(ErrorCode::RateLimited, "slow down"),
                json!({"type": "error", "code": "rate_limited", "message": "slow down"}),
            ),
            (
                ServerMsg::error(ErrorCode::ReclaimRefused, "no"),
                json!({"type": "error", "code": "reclaim_refused", "message": "no"}),
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
        assert_eq!(
            serde_json::to_value(SignalPayload::Hello { attempt: 2 }).unwrap(),
            json!({"type": "hello", "attempt": 2})
        );
        assert_eq!(
            serde_json::to_value(SignalPayload::Rejected).unwrap(),
            json!({"type": "rejected"})
        );
        let moved = SignalPayload::Moved {
            from: PeerId(uuid::Uuid::nil()),
        };
        let v = json!({"type": "moved", "from": "00000000-0000-0000-0000-000000000000"});
        assert_eq!(serde_json::to_value(&moved).unwrap(), v);
        assert_eq!(serde_json::from_value::<SignalPayload>(v).unwrap(), moved);
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
    fn claim_tokens_are_validated_and_never_printed() {
        for bad in [
            "",
            "FEDCBA9876543210FEDCBA9876543210",
            "fedcba98",
            "x".repeat(32).as_str(),
        ] {
            assert!(bad.parse::<ClaimToken>().is_err(), "{bad:?}");
        }
        let missing = json!({"type": "reclaim_share", "share": "0123456789abcdef0123456789abcdef"});
        assert!(serde_json::from_value::<ClientMsg>(missing).is_err());
        let msg = ClientMsg::ReclaimShare {
            share: share(),
            token: token(),
        };
        assert!(!format!("{msg:?}").contains(token().as_str()));
    }

    #[test]
    fn unknown_types_are_rejected() {
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"shutdown"}"#).is_err());
        assert!(serde_json::from_str::<ClientMsg>(r#"{"to":"x"}"#).is_err());
    }

    #[test]
    fn error_codes_golden_json() {
        let cases = [
            (ErrorCode::BadMessage, "bad_message"),
            (ErrorCode::UnknownPeer, "unknown_peer"),
            (ErrorCode::NoSuchShare, "no_such_share"),
            (ErrorCode::PeerBusy, "peer_busy"),
            (ErrorCode::TooManyShares, "too_many_shares"),
            (ErrorCode::Internal, "internal"),
            (ErrorCode::RateLimited, "rate_limited"),
            (ErrorCode::ReclaimRefused, "reclaim_refused"),
        ];
        for (code, golden) in cases {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(golden));
            assert_eq!(
                serde_json::from_value::<ErrorCode>(json!(golden)).unwrap(),
                code
            );
        }
    }

    #[test]
    fn close_codes_are_stable() {
        assert_eq!(close_code::IDLE_TIMEOUT, 4001);
        assert_eq!(close_code::BAD_FRAME, 4002);
        assert_eq!(close_code::RECONNECT, 4003);
        assert_eq!(close_code::REGISTRATION_FAILED, 4004);
        assert_eq!(close_code::RATE_LIMITED, 4005);
    }

    /// Nesting depth as serde_json's parser walks it (duplicate keys included, which a
    /// `serde_json::Value` would collapse): arrays and objects count, scalars are 0.
    struct Depth(usize);

    impl<'de> Deserialize<'de> for Depth {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Depth;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_bool<E>(self, _: bool) -> Result<Depth, E> {
                    Ok(Depth(0))
                }
                fn visit_i64<E>(self, _: i64) -> Result<Depth, E> {
                    Ok(Depth(0))
                }
                fn visit_u64<E>(self, _: u64) -> Result<Depth, E> {
                    Ok(Depth(0))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Depth, E> {
                    Ok(Depth(0))
                }
                fn visit_str<E>(self, _: &str) -> Result<Depth, E> {
                    Ok(Depth(0))
                }
                fn visit_unit<E>(self) -> Result<Depth, E> {
                    Ok(Depth(0))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Depth, A::Error> {
                    let mut max = 0;
                    while let Some(Depth(d)) = a.next_element()? {
                        max = max.max(d);
                    }
                    Ok(Depth(max + 1))
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Depth, A::Error> {
                    let mut max = 0;
                    while let Some((serde::de::IgnoredAny, Depth(d))) = a.next_entry()? {
                        max = max.max(d);
                    }
                    Ok(Depth(max + 1))
                }
            }
            d.deserialize_any(V)
        }
    }

    #[test]
    fn depth_scan_counts_brackets_outside_strings_only() {
        assert!(!json_depth_exceeds(b"", 0));
        assert!(!json_depth_exceeds(b"42", 0));
        assert!(json_depth_exceeds(b"[]", 0));
        assert!(!json_depth_exceeds(b"[]", 1));
        assert!(json_depth_exceeds(b"[[]]", 1));
        assert!(!json_depth_exceeds(b"[[],{},[{}]]", 3));
        assert!(json_depth_exceeds(b"[[],{},[{}]]", 2));
        // Brackets inside strings, escaped quotes and escaped backslashes.
        let s = br#"{"type":"signal","payload":"[[[[{{{{\"[[[[\\","to":"x"}"#;
        assert!(!json_depth_exceeds(s, 1));
        let s = br#"{"a":"\\",  "b":[[1]]}"#;
        assert!(json_depth_exceeds(s, 2));
        assert!(!json_depth_exceeds(s, 3));
        // Unbalanced closers never go negative.
        assert!(!json_depth_exceeds(b"]]]]}}}}[", 1));
        assert!(json_depth_exceeds(b"]]]]}}}}[[", 1));
        // The scan agrees with a real parse on valid JSON.
        for text in [
            r#"{"type":"ping"}"#,
            r#"{"a":[1,{"b":[[],[[]]]}],"c":"]]]"}"#,
            r#"[{"\\\"":"[{"},[[[["x"]]]]]"#,
        ] {
            let Depth(d) = serde_json::from_str(text).unwrap();
            assert!(!json_depth_exceeds(text.as_bytes(), d), "{text}");
            assert!(json_depth_exceeds(text.as_bytes(), d - 1), "{text}");
        }
    }

    #[test]
    fn decode_refuses_deep_nesting_before_parsing() {
        let max = DEFAULT_MAX_JSON_DEPTH;
        let nested = |n: usize| {
            format!(
                r#"{{"type":"ping","x":{}{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // Unknown fields are ignored, so moderate nesting inside one is still a valid Ping.
        assert_eq!(
            decode_client_msg(&nested(max - 1), max),
            Ok(ClientMsg::Ping)
        );
        assert_eq!(
            decode_client_msg(&nested(max), max),
            Err(DecodeError::TooDeep { max })
        );
        // Far past serde_json's own recursion limit, and unterminated: the same typed error.
        let bomb = "[".repeat(100_000);
        let err = decode_client_msg(&bomb, max).unwrap_err();
        assert_eq!(err, DecodeError::TooDeep { max });
        assert_eq!(err.code(), ErrorCode::BadMessage);
        assert!(matches!(
            err.to_server_msg(),
            ServerMsg::Error {
                code: ErrorCode::BadMessage,
                ..
            }
        ));
        assert!(matches!(
            decode_client_msg("{not json", max),
            Err(DecodeError::Invalid(_))
        ));
        assert_eq!(
            decode_client_msg(r#"{"type":"ping"}"#, max),
            Ok(ClientMsg::Ping)
        );
    }

    /// splitmix64: a tiny deterministic generator, so every run sees the same inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// Mutates a valid message: bit flips, structural insertions, deletions, splices, nesting.
    fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
        const INTERESTING: &[u8] =
            b"{}[]\":,\\ 0123456789-.eE+tfnulasr\x00\x7f\xff\xc3\xa9\xe2\x9c";
        for _ in 0..1 + rng.below(8) {
            let len = input.len();
            match rng.below(10) {
                0 if len > 0 => {
                    let i = rng.below(len);
                    input[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = rng.below(len + 1);
                    input.insert(i, *rng.pick(INTERESTING));
                }
                2 if len > 0 => {
                    let i = rng.below(len);
                    let n = 1 + rng.below((len - i).min(8));
                    input.drain(i..i + n);
                }
                3 if len > 0 => {
                    let i = rng.below(len);
                    let n = 1 + rng.below((len - i).min(16));
                    let chunk = input[i..i + n].to_vec();
                    let at = rng.below(len + 1);
                    input.splice(at..at, chunk);
                }
                4 => input.truncate(rng.below(len + 1)),
                5 => {
                    // Splice in the tail of another seed.
                    let other = rng.pick(seeds);
                    let from = rng.below(other.len());
                    let at = rng.below(len + 1);
                    input.splice(at..at, other[from..].iter().copied());
                }
                6 => {
                    // Nest: around everything, or as a new field.
                    let n = rng.below(2 * DEFAULT_MAX_JSON_DEPTH + 2);
                    let (open, close) = if rng.below(2) == 0 {
                        (b'[', b']')
                    } else {
                        (b'{', b'}')
                    };
                    if rng.below(2) == 0 {
                        let mut wrapped = vec![open; n];
                        wrapped.append(input);
                        wrapped.extend(std::iter::repeat_n(close, n));
                        *input = wrapped;
                    } else if let Some(i) = input.iter().rposition(|&b| b == b'}') {
                        let mut field = b",\"x\":".to_vec();
                        field.extend(std::iter::repeat_n(b'[', n));
                        field.extend(std::iter::repeat_n(b']', n));
                        input.splice(i..i, field);
                    }
                }
                7 if len > 0 => {
                    // String boundaries are what the depth scan must get right.
                    let i = rng.below(len);
                    input[i] = *rng.pick(b"\"\\[{");
                }
                8 => {
                    let i = rng.below(len + 1);
                    let junk: Vec<u8> = (0..rng.below(12)).map(|_| rng.next() as u8).collect();
                    input.splice(i..i, junk);
                }
                _ => {
                    // Swap one message type tag for another (or for nonsense).
                    let from =
                        *rng.pick(&["ping", "join", "signal", "create_share", "reclaim_share"]);
                    let to = *rng.pick(&[
                        "ping",
                        "join",
                        "signal",
                        "create_share",
                        "reclaim_share",
                        "error",
                        "",
                        "PING",
                    ]);
                    let text = String::from_utf8_lossy(input).replacen(from, to, 1);
                    *input = text.into_bytes();
                }
            }
        }
    }

    #[test]
    fn decoder_survives_twenty_thousand_mutated_inputs() {
        let max = DEFAULT_MAX_JSON_DEPTH;
        let seeds: Vec<Vec<u8>> = [
            ClientMsg::Ping,
            ClientMsg::CreateShare,
            ClientMsg::Join { share: share() },
            ClientMsg::ReclaimShare {
                share: share(),
                token: token(),
            },
            ClientMsg::Signal {
                to: pid(7),
                payload: "{\"type\":\"offer\",\"sdp\":\"v=0\\r\\n\"} [ { \\ ünïcødé ✓".into(),
            },
            ClientMsg::Signal {
                to: pid(u128::MAX),
                payload: "x".repeat(300),
            },
        ]
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .chain([
            br#"{"type":"ping","extra":[1,{"a":[null,true,false,-1.5e3]}]}"#.to_vec(),
            br#"{"type":"signal","to":"00000000-0000-0000-0000-000000000001","payload":"\"\\\u00e9\ud83d\ude00"}"#.to_vec(),
        ])
        .collect();

        let mut rng = Rng(0x5eed_0bea_4d20_0001);
        let (mut ok, mut too_deep, mut invalid, mut valid_json) = (0, 0, 0, 0);
        for _ in 0..20_000 {
            let mut input = rng.pick(&seeds).clone();
            mutate(&mut rng, &seeds, &mut input);
            let text = String::from_utf8_lossy(&input);
            let Ok(result) = std::panic::catch_unwind(|| decode_client_msg(&text, max)) else {
                panic!("the decoder panicked on {text:?}");
            };
            // Wherever the input is JSON at all, the byte scan agrees with a real parse.
            if let Ok(Depth(depth)) = serde_json::from_str(&text) {
                let deep = depth > max;
                assert_eq!(json_depth_exceeds(text.as_bytes(), max), deep, "{text:?}");
                valid_json += 1;
            }
            match result {
                Ok(msg) => {
                    ok += 1;
                    assert!(!json_depth_exceeds(text.as_bytes(), max), "{text:?}");
                    // Whatever decoded re-encodes to the same message.
                    let again = serde_json::to_string(&msg).unwrap();
                    assert_eq!(decode_client_msg(&again, max), Ok(msg), "{text:?}");
                }
                Err(DecodeError::TooDeep { max: m }) => {
                    too_deep += 1;
                    assert_eq!(m, max);
                    assert!(json_depth_exceeds(text.as_bytes(), max), "{text:?}");
                }
                Err(e @ DecodeError::Invalid(_)) => {
                    invalid += 1;
                    assert_eq!(e.code(), ErrorCode::BadMessage);
                }
            }
        }
        // The mutations reach every outcome, or the run proves little.
        let counts = format!("ok {ok}, too deep {too_deep}, invalid {invalid}, JSON {valid_json}");
        assert!(
            ok > 250 && too_deep > 250 && invalid > 250 && valid_json > 1000,
            "{counts}"
        );
    }

    #[cfg(feature = "ssr")]
    #[test]
    fn random_share_ids_are_valid_and_distinct() {
        let a = ShareId::new_random();
        let b = ShareId::new_random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().parse::<ShareId>().unwrap(), a);
        let t = ClaimToken::new_random();
        assert_ne!(t, ClaimToken::new_random());
        assert_eq!(t.as_str().parse::<ClaimToken>().unwrap(), t);
    }
}
