//! Signaling the broker cannot read or forge: every payload between a sender and a receiver is
//! sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the link's `#secret` and the
//! share id. The secret never reaches the server; the broker relays ciphertext.
//!
//! Sealed form: `v1.` + base64url(nonce ‖ ciphertext ‖ tag). The additional data binds each payload
//! to its direction (`from` → `to` peer ids), so one receiver's payloads cannot be replayed to another.

use crate::protocol::{PeerId, ShareId};
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;

/// Bytes of randomness in a link secret.
pub const SECRET_BYTES: usize = 16;
const PREFIX: &str = "v1.";
const NONCE_LEN: usize = 12;
const INFO: &[u8] = b"beamdrop signaling v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The `#secret` is missing, too short or not hex: the link is incomplete or damaged.
    #[error("this link is incomplete or damaged")]
    BadSecret,
    /// Not a sealed payload, altered in transit, or sealed under another key.
    #[error("a signaling message failed authentication (altered, or sealed with another key)")]
    Rejected,
    #[error("could not seal: {0}")]
    Seal(String),
}

/// The per-share AES-256-GCM key.
#[derive(Clone)]
pub struct ShareKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for ShareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShareKey(..)")
    }
}

fn aad(from: PeerId, to: PeerId) -> String {
    format!("{from}>{to}")
}

impl ShareKey {
    /// Derives the key from the link secret (hex, ≥ 128 bits) and the share id.
    pub fn derive(secret_hex: &str, share: &ShareId) -> Result<Self, SealError> {
        let secret = hex::decode(secret_hex).map_err(|_| SealError::BadSecret)?;
        if secret.len() < SECRET_BYTES {
            return Err(SealError::BadSecret);
        }
        Self::from_secret(&secret, share.as_str().as_bytes(), INFO)
    }

    /// The key of a pairing without the server (see [`crate::pairing`]), from the secret its
    /// offer code carries.
    pub fn for_pairing(secret: &[u8; SECRET_BYTES]) -> Result<Self, SealError> {
        Self::from_secret(secret, b"beamdrop pairing", b"beamdrop pairing v1")
    }

    fn from_secret(secret: &[u8], salt: &[u8], info: &[u8]) -> Result<Self, SealError> {
        let hk = Hkdf::<Sha256>::new(Some(salt), secret);
        let mut key = [0u8; 32];
        hk.expand(info, &mut key)
            .map_err(|e| SealError::Seal(e.to_string()))?;
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|e| SealError::Seal(e.to_string()))?;
        Ok(Self { cipher })
    }

    /// Seals `plaintext` for the payload `from` → `to`, with a fresh random nonce.
    pub fn seal(&self, from: PeerId, to: PeerId, plaintext: &str) -> Result<String, SealError> {
        let sealed = self.seal_bytes(aad(from, to).as_bytes(), plaintext.as_bytes())?;
        Ok(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(sealed)))
    }

    /// Opens a payload sealed by [`ShareKey::seal`] for `from` → `to`.
    pub fn open(&self, from: PeerId, to: PeerId, sealed: &str) -> Result<String, SealError> {
        let body = sealed.strip_prefix(PREFIX).ok_or(SealError::Rejected)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError::Rejected)?;
        let plain = self.open_bytes(aad(from, to).as_bytes(), &bytes)?;
        String::from_utf8(plain).map_err(|_| SealError::Rejected)
    }

    /// `nonce ‖ ciphertext ‖ tag` of `msg`, bound to `aad`, with a fresh random nonce.
    pub fn seal_bytes(&self, aad: &[u8], msg: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(&nonce, Payload { msg, aad })
            .map_err(|e| SealError::Seal(e.to_string()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    /// Opens what [`ShareKey::seal_bytes`] made with the same `aad`.
    pub fn open_bytes(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Rejected);
        }
        let (nonce, msg) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg, aad })
            .map_err(|_| SealError::Rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const SECRET: &str = "00112233445566778899aabbccddeeff";

    fn share() -> ShareId {
        "0123456789abcdef0123456789abcdef".parse().unwrap()
    }

    fn peers() -> (PeerId, PeerId) {
        (PeerId(Uuid::from_u128(1)), PeerId(Uuid::from_u128(2)))
    }

    #[test]
    fn round_trip_and_ciphertext_hides_the_plaintext() {
        let key = ShareKey::derive(SECRET, &share()).unwrap();
        let (a, b) = peers();
        let sdp = r#"{"type":"offer","sdp":"v=0 c=IN IP4 192.0.2.1"}"#;
        let sealed = key.seal(a, b, sdp).unwrap();
        assert!(sealed.starts_with("v1."));
        assert!(!sealed.contains("192.0.2.1"));
        assert_eq!(key.open(a, b, &sealed).unwrap(), sdp);
        // Fresh nonce each time.
        assert_ne!(key.seal(a, b, sdp).unwrap(), sealed);
    }

    #[test]
    fn tampered_ciphertext_is_rejected() {
        let key = ShareKey::derive(SECRET, &share()).unwrap();
        let (a, b) = peers();
        let sealed = key.seal(a, b, "hello").unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed[3..]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let tampered = format!("v1.{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(key.open(a, b, &tampered), Err(SealError::Rejected));
        bytes[last] ^= 0x01;
        bytes[NONCE_LEN] ^= 0x80;
        let tampered = format!("v1.{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(key.open(a, b, &tampered), Err(SealError::Rejected));
        assert_eq!(key.open(a, b, "plain text"), Err(SealError::Rejected));
        assert_eq!(key.open(a, b, "v1.AAAA"), Err(SealError::Rejected));
    }

    #[test]
    fn wrong_key_wrong_share_or_wrong_direction_is_rejected() {
        let (a, b) = peers();
        let key = ShareKey::derive(SECRET, &share()).unwrap();
        let sealed = key.seal(a, b, "hello").unwrap();
        let other_secret = ShareKey::derive("ffeeddccbbaa99887766554433221100", &share()).unwrap();
        assert_eq!(other_secret.open(a, b, &sealed), Err(SealError::Rejected));
        let other_share =
            ShareKey::derive(SECRET, &"fedcba9876543210fedcba9876543210".parse().unwrap()).unwrap();
        assert_eq!(other_share.open(a, b, &sealed), Err(SealError::Rejected));
        assert_eq!(key.open(b, a, &sealed), Err(SealError::Rejected));
    }

    #[test]
    fn short_or_malformed_secrets_are_bad_links() {
        assert_eq!(
            ShareKey::derive("", &share()).unwrap_err(),
            SealError::BadSecret
        );
        assert_eq!(
            ShareKey::derive("00112233", &share()).unwrap_err(),
            SealError::BadSecret
        );
        assert_eq!(
            ShareKey::derive("zz112233445566778899aabbccddeeff", &share()).unwrap_err(),
            SealError::BadSecret
        );
    }
}
