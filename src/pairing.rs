//! Pairing without the server: the offer and the answer of one WebRTC connection as two short
//! codes a person copies (or scans as a QR code) from one screen to the other.
//!
//! A code carries only what the other side needs of a session description, not the SDP: the ICE
//! username fragment and password, the DTLS certificate's SHA-256 fingerprint and the gathered
//! candidates, packed as binary (postcard) and encoded base64url. A browser's offer SDP is
//! ~1.5 kB; its code is ~160 characters, one small QR code. Each side rebuilds a session
//! description from the other's code ([`Endpoint::to_sdp`]).
//!
//! The offer code also carries a fresh 128-bit secret. The answer is sealed under a key derived
//! from it (AES-256-GCM, as signaling is: see [`crate::seal`]), so an answer made for another
//! offer, or altered, is refused with a clear message. The fingerprints then bind the DTLS
//! connection to the two codes: whoever holds neither code cannot sit in the middle.

use crate::protocol::ShareId;
use crate::seal::{SealError, ShareKey, SECRET_BYTES};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::net::IpAddr;

const OFFER_PREFIX: &str = "bd1o.";
const ANSWER_PREFIX: &str = "bd1a.";
/// Binds a sealed answer to its role (an offer is never sealed).
const ANSWER_AAD: &[u8] = b"beamdrop pairing answer";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("this is not a beamdrop pairing code")]
    NotACode,
    #[error("this is an answer code: paste it on the sending page")]
    AnswerNotOffer,
    #[error("this is an offer code: paste it on the receiving page")]
    OfferNotAnswer,
    #[error("the code is damaged or incomplete: copy all of it again")]
    Damaged,
    #[error("this answer belongs to another pairing code (or was altered): pair again")]
    WrongAnswer,
    #[error("the browser's session description lacks {0}")]
    Sdp(&'static str),
    #[error("could not seal the answer: {0}")]
    Seal(String),
}

/// How a candidate was found (RFC 8445), which sets its priority when rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Host,
    Srflx,
    Prflx,
    Relay,
}

impl Kind {
    fn sdp(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Srflx => "srflx",
            Kind::Prflx => "prflx",
            Kind::Relay => "relay",
        }
    }

    /// RFC 8445 §5.1.2.2's recommended type preferences.
    fn preference(self) -> u32 {
        match self {
            Kind::Host => 126,
            Kind::Prflx => 110,
            Kind::Srflx => 100,
            Kind::Relay => 0,
        }
    }
}

/// One UDP candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub kind: Kind,
    pub ip: IpAddr,
    pub port: u16,
}

/// One side of a connection, as the other side needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ufrag: String,
    pub pwd: String,
    /// SHA-256 of the DTLS certificate.
    pub fingerprint: [u8; 32],
    pub candidates: Vec<Candidate>,
}

/// The DTLS role a rebuilt description states: an offer leaves it to the answerer, which then
/// takes the client role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    ActPass,
    Active,
}

impl Endpoint {
    /// Takes what a code needs from a complete local description (ICE gathering finished).
    /// Candidates other than UDP over an IP address (TCP, mDNS names) are left out: the codes
    /// are for two machines that see each other, and a name would not resolve on the other one.
    pub fn from_sdp(sdp: &str) -> Result<Endpoint, PairingError> {
        let mut ufrag = None;
        let mut pwd = None;
        let mut fingerprint = None;
        let mut candidates = Vec::new();
        for line in sdp.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
                ufrag.get_or_insert_with(|| v.to_owned());
            } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
                pwd.get_or_insert_with(|| v.to_owned());
            } else if let Some(v) = line.strip_prefix("a=fingerprint:sha-256 ") {
                if fingerprint.is_none() {
                    fingerprint = parse_fingerprint(v);
                }
            } else if let Some(v) = line.strip_prefix("a=candidate:") {
                if let Some(c) = parse_candidate(v) {
                    if !candidates.contains(&c) {
                        candidates.push(c);
                    }
                }
            }
        }
        Ok(Endpoint {
            ufrag: ufrag.ok_or(PairingError::Sdp("an ICE username fragment"))?,
            pwd: pwd.ok_or(PairingError::Sdp("an ICE password"))?,
            fingerprint: fingerprint.ok_or(PairingError::Sdp("a SHA-256 DTLS fingerprint"))?,
            candidates,
        })
    }

    /// A session description for one data channel section, as a browser accepts it as the
    /// remote offer (`ActPass`) or answer (`Active`), with every candidate in it.
    pub fn to_sdp(&self, setup: Setup) -> String {
        // The session id only needs to be stable for this description.
        let session = u64::from_be_bytes(self.fingerprint[..8].try_into().unwrap_or([0; 8])) >> 1;
        let mut sdp = String::with_capacity(1024);
        let fingerprint = self
            .fingerprint
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let setup = match setup {
            Setup::ActPass => "actpass",
            Setup::Active => "active",
        };
        for line in [
            "v=0".to_owned(),
            format!("o=- {session} 2 IN IP4 127.0.0.1"),
            "s=-".to_owned(),
            "t=0 0".to_owned(),
            "a=group:BUNDLE 0".to_owned(),
            "a=msid-semantic: WMS".to_owned(),
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel".to_owned(),
            "c=IN IP4 0.0.0.0".to_owned(),
            format!("a=ice-ufrag:{}", self.ufrag),
            format!("a=ice-pwd:{}", self.pwd),
            format!("a=fingerprint:sha-256 {fingerprint}"),
            format!("a=setup:{setup}"),
            "a=mid:0".to_owned(),
            "a=sctp-port:5000".to_owned(),
            "a=max-message-size:262144".to_owned(),
        ] {
            sdp.push_str(&line);
            sdp.push_str("\r\n");
        }
        for (i, c) in self.candidates.iter().enumerate() {
            // RFC 8445 §5.1.2.1, component 1; earlier candidates first within a kind.
            let local = 65_535u32.saturating_sub(i as u32);
            let priority = (c.kind.preference() << 24) + (local << 8) + 255;
            let related = match c.kind {
                Kind::Host => String::new(),
                _ => " raddr 0.0.0.0 rport 0".to_owned(),
            };
            let _ = write!(
                sdp,
                "a=candidate:{} 1 udp {priority} {} {} typ {}{related}\r\n",
                i + 1,
                c.ip,
                c.port,
                c.kind.sdp()
            );
        }
        sdp.push_str("a=end-of-candidates\r\n");
        sdp
    }
}

/// `AB:CD:…` (32 bytes) as bytes.
fn parse_fingerprint(hex_pairs: &str) -> Option<[u8; 32]> {
    let bytes: Vec<u8> = hex_pairs
        .trim()
        .split(':')
        .map(|pair| u8::from_str_radix(pair, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// `foundation component transport priority address port typ kind …` (after `a=candidate:`),
/// if it is a UDP candidate for an IP address.
fn parse_candidate(value: &str) -> Option<Candidate> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    let [_, component, transport, _, address, port, typ, kind, ..] = fields[..] else {
        return None;
    };
    if component != "1" || !transport.eq_ignore_ascii_case("udp") || typ != "typ" {
        return None;
    }
    let kind = match kind {
        "host" => Kind::Host,
        "srflx" => Kind::Srflx,
        "prflx" => Kind::Prflx,
        "relay" => Kind::Relay,
        _ => return None,
    };
    Some(Candidate {
        kind,
        ip: address.parse().ok()?,
        port: port.parse().ok()?,
    })
}

/// What the sending side shows first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Seals the answer.
    pub secret: [u8; SECRET_BYTES],
    /// The share the files belong to (the sender's, or one made up for the pairing): the
    /// receiver keys partial downloads by it, so a download broken off resumes when paired
    /// again, or through the link.
    pub share: [u8; 16],
    pub endpoint: Endpoint,
}

impl Offer {
    /// An offer for `endpoint` of the files of `share` (`None`: a share id made up for it),
    /// with a fresh secret.
    pub fn new(share: Option<&ShareId>, endpoint: Endpoint) -> Result<Offer, PairingError> {
        let random = || {
            let mut bytes = [0u8; 16];
            getrandom::getrandom(&mut bytes)
                .map(|()| bytes)
                .map_err(|e| PairingError::Seal(e.to_string()))
        };
        let share = match share.and_then(|s| hex::decode(s.as_str()).ok()) {
            Some(bytes) => bytes.try_into().or_else(|_| random())?,
            None => random()?,
        };
        Ok(Offer {
            secret: random()?,
            share,
            endpoint,
        })
    }

    /// The share the offered files belong to.
    pub fn share(&self) -> ShareId {
        // 16 bytes as 32 lowercase hex digits are a share id by definition.
        hex::encode(self.share)
            .parse()
            .unwrap_or_else(|_| unreachable!("32 lowercase hex digits"))
    }

    pub fn code(&self) -> String {
        // Serializing plain data into a Vec cannot fail.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!("{OFFER_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Reads an offer code as pasted (spaces and line breaks anywhere are ignored).
    pub fn from_code(code: &str) -> Result<Offer, PairingError> {
        let bytes = decode(
            code,
            OFFER_PREFIX,
            ANSWER_PREFIX,
            PairingError::AnswerNotOffer,
        )?;
        postcard::from_bytes(&bytes).map_err(|_| PairingError::Damaged)
    }

    /// The answer code for this offer: `endpoint` sealed under the offer's secret.
    pub fn answer_code(&self, endpoint: &Endpoint) -> Result<String, PairingError> {
        let key = self.key()?;
        let plain = postcard::to_allocvec(endpoint).unwrap_or_default();
        let sealed = key
            .seal_bytes(ANSWER_AAD, &plain)
            .map_err(|e| PairingError::Seal(e.to_string()))?;
        Ok(format!("{ANSWER_PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed)))
    }

    /// Opens an answer code made for this offer.
    pub fn open_answer(&self, code: &str) -> Result<Endpoint, PairingError> {
        let sealed = decode(
            code,
            ANSWER_PREFIX,
            OFFER_PREFIX,
            PairingError::OfferNotAnswer,
        )?;
        let plain = self
            .key()?
            .open_bytes(ANSWER_AAD, &sealed)
            .map_err(|_| PairingError::WrongAnswer)?;
        postcard::from_bytes(&plain).map_err(|_| PairingError::Damaged)
    }

    fn key(&self) -> Result<ShareKey, PairingError> {
        ShareKey::for_pairing(&self.secret)
            .map_err(|e: SealError| PairingError::Seal(e.to_string()))
    }
}

/// The bytes of a code with prefix `want`; `other` is the other kind's prefix (`mixed` says so).
fn decode(
    code: &str,
    want: &str,
    other: &str,
    mixed: PairingError,
) -> Result<Vec<u8>, PairingError> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let body = match code.strip_prefix(want) {
        Some(body) => body,
        None if code.starts_with(other) => return Err(mixed),
        None => return Err(PairingError::NotACode),
    };
    URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| PairingError::Damaged)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An offer as Chromium makes it once ICE gathering is complete (trimmed of nothing that
    /// matters here): UDP host, TCP host, srflx, relay and an mDNS host candidate.
    const CHROMIUM_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=extmap-allow-mixed\r\n\
a=msid-semantic: WMS\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
c=IN IP4 0.0.0.0\r\n\
a=candidate:1467250027 1 udp 2122260223 192.168.1.2 46243 typ host generation 0 network-id 1\r\n\
a=candidate:435653019 1 tcp 1518280447 192.168.1.2 9 typ host tcptype active generation 0 network-id 1\r\n\
a=candidate:842163049 1 udp 1686052607 203.0.113.7 46243 typ srflx raddr 192.168.1.2 rport 46243 generation 0 network-id 1\r\n\
a=candidate:3 1 udp 41885439 2001:db8::9 50000 typ relay raddr 203.0.113.7 rport 46243 generation 0\r\n\
a=candidate:4 1 udp 2122260223 1b2c3d4e-aaaa-bbbb-cccc-0123456789ab.local 5000 typ host generation 0\r\n\
a=ice-ufrag:Xa3b\r\n\
a=ice-pwd:0123456789abcdefghijklmn\r\n\
a=ice-options:trickle\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sctp-port:5000\r\n\
a=max-message-size:262144\r\n";

    fn endpoint() -> Endpoint {
        Endpoint::from_sdp(CHROMIUM_OFFER).unwrap()
    }

    #[test]
    fn a_browser_offer_gives_its_ice_credentials_fingerprint_and_udp_ip_candidates() {
        let e = endpoint();
        assert_eq!(e.ufrag, "Xa3b");
        assert_eq!(e.pwd, "0123456789abcdefghijklmn");
        assert_eq!(e.fingerprint[..4], [0x00, 0x11, 0x22, 0x33]);
        assert_eq!(e.fingerprint[31], 0xFF);
        assert_eq!(
            e.candidates,
            [
                Candidate {
                    kind: Kind::Host,
                    ip: "192.168.1.2".parse().unwrap(),
                    port: 46243
                },
                Candidate {
                    kind: Kind::Srflx,
                    ip: "203.0.113.7".parse().unwrap(),
                    port: 46243
                },
                Candidate {
                    kind: Kind::Relay,
                    ip: "2001:db8::9".parse().unwrap(),
                    port: 50000
                },
            ]
        );
    }

    #[test]
    fn a_description_without_credentials_or_fingerprint_is_refused() {
        let no_pwd = CHROMIUM_OFFER.replace("a=ice-pwd:", "a=x-pwd:");
        assert_eq!(
            Endpoint::from_sdp(&no_pwd),
            Err(PairingError::Sdp("an ICE password"))
        );
        let sha1 = CHROMIUM_OFFER.replace("a=fingerprint:sha-256", "a=fingerprint:sha-1");
        assert!(matches!(
            Endpoint::from_sdp(&sha1),
            Err(PairingError::Sdp(_))
        ));
    }

    #[test]
    fn a_rebuilt_description_reads_back_the_same_and_states_its_role() {
        let e = endpoint();
        let offer = e.to_sdp(Setup::ActPass);
        assert_eq!(Endpoint::from_sdp(&offer).unwrap(), e);
        assert!(offer.contains("\r\na=setup:actpass\r\n"));
        assert!(offer.contains("\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"));
        assert!(offer.ends_with("a=end-of-candidates\r\n"));
        let answer = e.to_sdp(Setup::Active);
        assert!(answer.contains("\r\na=setup:active\r\n"));
        // Host before server-reflexive before relayed.
        let priorities: Vec<u32> = answer
            .lines()
            .filter_map(|l| l.strip_prefix("a=candidate:"))
            .map(|l| l.split_whitespace().nth(3).unwrap().parse().unwrap())
            .collect();
        assert!(priorities.windows(2).all(|w| w[0] > w[1]), "{priorities:?}");
    }

    #[test]
    fn offer_and_answer_codes_round_trip_and_fit_one_small_qr_code() {
        let offer = Offer::new(None, endpoint()).unwrap();
        let code = offer.code();
        assert!(code.starts_with("bd1o."));
        // As pasted from a chat: wrapped, with spaces.
        let pasted = format!("  {}\n{} ", &code[..40], &code[40..]);
        assert_eq!(Offer::from_code(&pasted).unwrap(), offer);
        // The sender's share travels with it.
        let share: ShareId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let of_share = Offer::new(Some(&share), endpoint()).unwrap();
        assert_eq!(Offer::from_code(&of_share.code()).unwrap().share(), share);
        assert_ne!(offer.share(), share);
        let answer = offer.answer_code(&endpoint()).unwrap();
        assert_eq!(offer.open_answer(&answer).unwrap(), endpoint());
        for code in [&code, &answer] {
            assert!(code.len() < 220, "{} characters: {code}", code.len());
            let qr = qrcode::QrCode::new(code.as_bytes()).unwrap();
            let qrcode::Version::Normal(v) = qr.version() else {
                panic!("micro QR")
            };
            assert!(v <= 10, "QR version {v} for {} characters", code.len());
        }
    }

    #[test]
    fn an_answer_for_another_offer_or_altered_is_refused() {
        let offer = Offer::new(None, endpoint()).unwrap();
        let other = Offer::new(None, endpoint()).unwrap();
        assert_ne!(offer.secret, other.secret);
        let answer = other.answer_code(&endpoint()).unwrap();
        assert_eq!(offer.open_answer(&answer), Err(PairingError::WrongAnswer));
        let mine = offer.answer_code(&endpoint()).unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&mine[5..]).unwrap();
        bytes[20] ^= 1;
        let altered = format!("bd1a.{}", URL_SAFE_NO_PAD.encode(bytes));
        assert_eq!(offer.open_answer(&altered), Err(PairingError::WrongAnswer));
    }

    #[test]
    fn codes_in_the_wrong_place_or_damaged_say_so() {
        let offer = Offer::new(None, endpoint()).unwrap();
        let answer = offer.answer_code(&endpoint()).unwrap();
        assert_eq!(Offer::from_code(&answer), Err(PairingError::AnswerNotOffer));
        assert_eq!(
            offer.open_answer(&offer.code()),
            Err(PairingError::OfferNotAnswer)
        );
        assert_eq!(
            Offer::from_code("https://example.com/"),
            Err(PairingError::NotACode)
        );
        let code = offer.code();
        assert_eq!(
            Offer::from_code(&code[..code.len() / 2]),
            Err(PairingError::Damaged)
        );
        assert_eq!(Offer::from_code("bd1o.!!!"), Err(PairingError::Damaged));
    }
}
