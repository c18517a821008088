//! Secrets the API must use later (alert signing secrets) are stored sealed:
//! encrypted with ChaCha20-Poly1305 under `[api] secrets_key`, and bound to
//! the row they belong to (customer and alert id as associated data), so a
//! sealed value copied onto another row does not open. A reader of the
//! table (a backup, a dashboard user with SQL) sees no usable secret.
//!
//! Stored form: `sealed1:<hex nonce><hex ciphertext and tag>`. A value
//! without that prefix was written before sealing and is used as it is
//! (re-create the alert to seal it).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use idlemeter_core::Secret;

const PREFIX: &str = "sealed1:";
const NONCE_LEN: usize = 12;

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("[api] secrets_key is not set: secrets cannot be stored (generate one with `openssl rand -hex 32`)")]
    NoKey,
    #[error("[api] secrets_key must be 64 hex digits (32 bytes), got {0} characters")]
    BadKey(usize),
    #[error("a sealed secret is malformed or was sealed for another row or key")]
    CannotOpen,
}

/// Seals and opens stored secrets with the configured key.
#[derive(Clone, Default)]
pub struct Sealer {
    cipher: Option<ChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("has_key", &self.cipher.is_some())
            .finish()
    }
}

impl Sealer {
    /// From `[api] secrets_key`: 64 hex digits, or empty (nothing can be
    /// sealed; legacy plain values still open).
    pub fn from_key(key: &Secret) -> Result<Self, SealError> {
        if key.is_empty() {
            return Ok(Self::default());
        }
        let bytes = hex::decode(key.expose().trim())
            .ok()
            .filter(|bytes| bytes.len() == 32)
            .ok_or(SealError::BadKey(key.expose().trim().len()))?;
        Ok(Self {
            cipher: Some(ChaCha20Poly1305::new(Key::from_slice(&bytes))),
        })
    }

    /// Encrypts `plain` for the row named by `context`.
    pub fn seal(&self, plain: &str, context: &str) -> Result<String, SealError> {
        let cipher = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::CannotOpen)?;
        Ok(format!(
            "{PREFIX}{}{}",
            hex::encode(nonce),
            hex::encode(sealed)
        ))
    }

    /// The secret stored as `stored` on the row named by `context`.
    pub fn open(&self, stored: &str, context: &str) -> Result<Secret, SealError> {
        let Some(sealed) = stored.strip_prefix(PREFIX) else {
            return Ok(Secret::new(stored));
        };
        let cipher = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let bytes = hex::decode(sealed).map_err(|_| SealError::CannotOpen)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::CannotOpen);
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::CannotOpen)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| SealError::CannotOpen)
    }
}

/// The associated data of an alert's secret.
pub fn alert_context(customer: &str, alert_id: &str) -> String {
    format!("spend_alert/{customer}/{alert_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::from_key(&Secret::new("11".repeat(32))).expect("valid key")
    }

    /// Finding "secrets": alert signing secrets are stored encrypted.
    #[test]
    fn alert_secrets_are_stored_sealed_and_open_only_for_their_row_and_key() {
        let sealer = sealer();
        let stored = sealer
            .seal("whsec_abc123", &alert_context("acme", "al_1"))
            .expect("sealed");
        assert!(stored.starts_with(PREFIX), "{stored}");
        assert!(!stored.contains("abc123"), "{stored}");
        let opened = sealer
            .open(&stored, &alert_context("acme", "al_1"))
            .expect("opens");
        assert_eq!(opened.expose(), "whsec_abc123");
        // Another row, another key, a flipped byte: refused.
        assert_eq!(
            sealer.open(&stored, &alert_context("acme", "al_2")),
            Err(SealError::CannotOpen)
        );
        let other = Sealer::from_key(&Secret::new("22".repeat(32))).expect("valid key");
        assert_eq!(
            other.open(&stored, &alert_context("acme", "al_1")),
            Err(SealError::CannotOpen)
        );
        let mut flipped = stored.clone();
        flipped.pop();
        flipped.push(if stored.ends_with('0') { '1' } else { '0' });
        assert!(sealer
            .open(&flipped, &alert_context("acme", "al_1"))
            .is_err());
        // Two seals of one secret differ (fresh nonces).
        assert_ne!(
            stored,
            sealer
                .seal("whsec_abc123", &alert_context("acme", "al_1"))
                .expect("sealed")
        );
    }

    #[test]
    fn without_a_key_nothing_is_sealed_and_bad_keys_are_refused() {
        assert_eq!(Sealer::default().seal("x", "c"), Err(SealError::NoKey));
        assert_eq!(
            Sealer::default()
                .open("legacy", "c")
                .map(|s| s.expose().to_owned()),
            Ok("legacy".to_owned())
        );
        assert_eq!(
            Sealer::from_key(&Secret::new("abc")).map(|_| ()),
            Err(SealError::BadKey(3))
        );
    }
}
