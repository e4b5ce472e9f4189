//! HMAC-SHA256 signing of pilot traffic with per-slot keys.
//!
//! The coordinator keeps one master secret. Each slot's key is
//! `HMAC-SHA256(master, "wsp-slot-key\n" + slot id)`, handed to that slot's
//! pilots in a key file. A pilot signs the exact bytes of every request body;
//! the signature travels hex-encoded in [`SIGNATURE_HEADER`].

use crate::ids::SlotId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// HTTP header carrying the hex HMAC of the request body.
pub const SIGNATURE_HEADER: &str = "x-wsp-signature";
/// HTTP header naming the slot whose key signed the body.
pub const SLOT_HEADER: &str = "x-wsp-slot";

/// Errors reading or using keys.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key file {path} is not hex ({reason})")]
    BadKeyFile { path: String, reason: String },
    #[error("signature is not hex")]
    BadSignatureEncoding,
}

/// A 32-byte per-slot key.
#[derive(Clone, PartialEq, Eq)]
pub struct SlotKey([u8; 32]);

impl std::fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotKey(<redacted>)")
    }
}

impl SlotKey {
    /// Derives a slot's key from the coordinator's master secret.
    pub fn derive(master: &[u8], slot: &SlotId) -> Result<Self, AuthError> {
        if master.is_empty() {
            return Err(AuthError::EmptyKey);
        }
        let mut mac = HmacSha256::new_from_slice(master).map_err(|_| AuthError::EmptyKey)?;
        mac.update(b"wsp-slot-key\n");
        mac.update(slot.as_str().as_bytes());
        let out = mac.finalize().into_bytes();
        let mut k = [0u8; 32];
        k.copy_from_slice(&out);
        Ok(Self(k))
    }

    /// The key as written to a key file: 64 hex digits and a newline.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the contents of a key file (surrounding whitespace allowed).
    pub fn from_hex(path: &str, text: &str) -> Result<Self, AuthError> {
        let bytes = hex::decode(text.trim()).map_err(|e| AuthError::BadKeyFile {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        if bytes.len() != 32 {
            return Err(AuthError::BadKeyFile {
                path: path.to_string(),
                reason: format!("expected 32 bytes, found {}", bytes.len()),
            });
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes);
        Ok(Self(k))
    }

    /// Hex HMAC-SHA256 of `body` under this key.
    pub fn sign(&self, body: &[u8]) -> String {
        // A 32-byte key is always accepted by HMAC.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Checks `signature_hex` against `body` in constant time.
    pub fn verify(&self, body: &[u8], signature_hex: &str) -> Result<bool, AuthError> {
        let sig = hex::decode(signature_hex.trim()).map_err(|_| AuthError::BadSignatureEncoding)?;
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(body);
        Ok(mac.verify_slice(&sig).is_ok())
    }
}

/// Generates a fresh random master secret (32 bytes).
pub fn generate_master_secret() -> Vec<u8> {
    use rand::RngCore;
    let mut k = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

/// Hex SHA-256 of a bearer token, as stored in the coordinator's config.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_only_with_the_same_slot_key_and_body() {
        let master = b"master secret";
        let a = SlotId::generate();
        let b = SlotId::generate();
        let ka = SlotKey::derive(master, &a).unwrap();
        let kb = SlotKey::derive(master, &b).unwrap();
        let sig = ka.sign(b"{\"x\":1}");
        assert!(ka.verify(b"{\"x\":1}", &sig).unwrap());
        assert!(!ka.verify(b"{\"x\":2}", &sig).unwrap());
        assert!(!kb.verify(b"{\"x\":1}", &sig).unwrap());
        assert!(ka.verify(b"{}", "zz").is_err());
    }

    #[test]
    fn key_file_round_trip() {
        let k = SlotKey::derive(b"m", &SlotId::generate()).unwrap();
        let back = SlotKey::from_hex("f", &format!("{}\n", k.to_hex())).unwrap();
        assert_eq!(k, back);
        assert!(SlotKey::from_hex("f", "abcd").is_err());
    }
}
