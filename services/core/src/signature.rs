//! HMAC-SHA256 signatures with a timestamp, one format for everything
//! idlemeter signs: webhooks to the platform, alert webhooks, and the
//! suspend/resume commands the policy service sends to the nodes.
//!
//! The signature is `t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<body>"` with the shared secret. A receiver recomputes it, compares
//! in constant time, and refuses a `t` further from its clock than its
//! tolerance, so a captured message cannot be replayed later. Pure: the
//! clock comes in as an argument.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], unix_seconds: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signature of `body` sent at `unix_seconds`.
pub fn sign(secret: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    let tag = mac(secret, unix_seconds, body).finalize().into_bytes();
    format!("t={unix_seconds},v1={}", hex::encode(tag))
}

/// Why a signed message was refused by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature header is malformed: {0}")]
    Malformed(String),
    #[error("signed {age_s} s ago, beyond the tolerance of {tolerance_s} s (a replay?)")]
    Stale { age_s: i64, tolerance_s: i64 },
    #[error("signature does not match the body")]
    Mismatch,
}

/// Checks a received message: the signature matches `body` and was made
/// within `tolerance_s` of `now_unix` (either side, for clock skew).
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = Some(value),
            Some(("v1", value)) => signature = Some(value),
            _ => {}
        }
    }
    let timestamp: i64 = timestamp
        .ok_or_else(|| VerifyError::Malformed("no t=".to_owned()))?
        .parse()
        .map_err(|_| VerifyError::Malformed("t is not an integer".to_owned()))?;
    let signature =
        hex::decode(signature.ok_or_else(|| VerifyError::Malformed("no v1=".to_owned()))?)
            .map_err(|_| VerifyError::Malformed("v1 is not hex".to_owned()))?;
    let age_s = now_unix.saturating_sub(timestamp);
    if age_s.saturating_abs() > tolerance_s {
        return Err(VerifyError::Stale { age_s, tolerance_s });
    }
    mac(secret, timestamp, body)
        .verify_slice(&signature)
        .map_err(|_| VerifyError::Mismatch)
}
