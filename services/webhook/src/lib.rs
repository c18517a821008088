//! Signed webhooks to the platform's control plane.
//!
//! Each decision is POSTed as JSON with two headers:
//! - `Idlemeter-Delivery`: the decision id. It is the same when a decision is
//!   delivered again (a retry, or a replay after a restart), so the receiver
//!   acts at most once per id.
//! - `Idlemeter-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//!   `"<t>.<body>"` with the shared secret. The receiver recomputes it, compares
//!   in constant time, and refuses a `t` older than its tolerance (5 min is
//!   usual): a captured request cannot be replayed later. [`verify`] is that
//!   check, for receivers written in Rust and for the tests.
//!
//! Transport is plain HTTP/1.1 through hyper; HTTPS needs a TLS-terminating
//! proxy in front of the receiver for now (the signature protects integrity
//! and origin, not confidentiality).

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "idlemeter-signature";
pub const DELIVERY_HEADER: &str = "idlemeter-delivery";

type HmacSha256 = Hmac<Sha256>;

/// The `Idlemeter-Signature` value for `body` sent at `unix_seconds`.
pub fn sign(secret: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix_seconds},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Why a webhook was refused by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature header is malformed: {0}")]
    Malformed(String),
    #[error("signed {age_s} s ago, beyond the tolerance of {tolerance_s} s (a replay?)")]
    Stale { age_s: i64, tolerance_s: i64 },
    #[error("signature does not match the body")]
    Mismatch,
}

/// Checks a received webhook: the signature matches `body` and was made
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
    let age_s = now_unix - timestamp;
    if age_s.abs() > tolerance_s {
        return Err(VerifyError::Stale { age_s, tolerance_s });
    }
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&signature)
        .map_err(|_| VerifyError::Mismatch)
}

/// Posts signed JSON bodies to one URL.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    url: hyper::Uri,
    secret: Vec<u8>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Why a delivery failed (after its retries).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("webhook url {0:?} is not an http:// URL")]
    Url(String),
    #[error("webhook POST failed: {0}")]
    Transport(String),
    #[error("webhook answered {0}")]
    Status(u16),
}

impl WebhookSender {
    pub fn new(url: &str, secret: &str) -> Result<Self, DeliveryError> {
        let parsed: hyper::Uri = url
            .parse()
            .map_err(|_| DeliveryError::Url(url.to_owned()))?;
        if parsed.scheme_str() != Some("http") {
            return Err(DeliveryError::Url(url.to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Ok(Self {
            url: parsed,
            secret: secret.as_bytes().to_vec(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// POSTs `body` once, signed now; 2xx is success.
    pub async fn post(
        &self,
        delivery_id: &str,
        body: Vec<u8>,
        now_unix: i64,
    ) -> Result<(), DeliveryError> {
        let signature = sign(&self.secret, now_unix, &body);
        let request = hyper::Request::post(self.url.clone())
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(DELIVERY_HEADER, delivery_id)
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| DeliveryError::Transport(error.to_string()))?;
        let response = tokio::time::timeout(Duration::from_secs(5), self.client.request(request))
            .await
            .map_err(|_| DeliveryError::Transport("timed out after 5 s".to_owned()))?
            .map_err(|error| DeliveryError::Transport(error.to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(response.status().as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec-test";
    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_signed_body_verifies_and_any_change_is_refused() {
        let body = br#"{"id":"a","action":"suspend"}"#;
        let header = sign(SECRET, NOW, body);
        assert_eq!(verify(SECRET, &header, body, NOW + 10, 300), Ok(()));
        // Tampered body, wrong secret, tampered timestamp.
        let tampered = br#"{"id":"a","action":"stop"}"#;
        assert_eq!(
            verify(SECRET, &header, tampered, NOW, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"other", &header, body, NOW, 300),
            Err(VerifyError::Mismatch)
        );
        let moved = header.replace(&format!("t={NOW}"), &format!("t={}", NOW + 1));
        assert_eq!(
            verify(SECRET, &moved, body, NOW, 300),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn an_old_signature_is_a_replay() {
        let body = b"{}";
        let header = sign(SECRET, NOW, body);
        assert_eq!(
            verify(SECRET, &header, body, NOW + 301, 300),
            Err(VerifyError::Stale {
                age_s: 301,
                tolerance_s: 300
            })
        );
        assert!(matches!(
            verify(SECRET, "v1=00", body, NOW, 300),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // Computed independently: printf '1800000000.{}' | openssl dgst -sha256 -hmac whsec-test
        assert_eq!(
            sign(SECRET, NOW, b"{}"),
            format!("t={NOW},v1={}", KNOWN_VECTOR)
        );
    }

    const KNOWN_VECTOR: &str = "cd976c6b32128622a959e90cfe2320d91db050f1fdad344eebc7879bc5c41eb5";
}
