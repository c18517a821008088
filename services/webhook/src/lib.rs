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
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const SIGNATURE_HEADER: &str = "idlemeter-signature";
pub const DELIVERY_HEADER: &str = "idlemeter-delivery";

pub use idlemeter_core::signature::{sign, verify, VerifyError};

/// Posts signed JSON bodies to one URL.
#[derive(Clone)]
pub struct WebhookSender {
    url: hyper::Uri,
    secret: Vec<u8>,
    /// Connect here instead of resolving the URL's host (which still goes
    /// in the `Host` header): the address a caller checked.
    connect_to: Option<std::net::SocketAddr>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Shows where it posts, never the secret.
impl std::fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSender")
            .field("url", &self.url)
            .field("connect_to", &self.connect_to)
            .field("secret", &idlemeter_core::secret::REDACTED)
            .finish_non_exhaustive()
    }
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
            connect_to: None,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Connects to `address` rather than to what the URL's host resolves to
    /// at connection time: the caller resolved and checked it.
    pub fn connecting_to(mut self, address: std::net::SocketAddr) -> Self {
        self.connect_to = Some(address);
        self
    }

    /// POSTs `body` once, signed now; 2xx is success.
    pub async fn post(
        &self,
        delivery_id: &str,
        body: Vec<u8>,
        now_unix: i64,
    ) -> Result<(), DeliveryError> {
        let signature = sign(&self.secret, now_unix, &body);
        let mut request = hyper::Request::post(self.url.clone());
        if let Some(address) = self.connect_to {
            let path = self
                .url
                .path_and_query()
                .map_or("/", hyper::http::uri::PathAndQuery::as_str);
            let host = self.url.authority().map_or("", |a| a.as_str()).to_owned();
            request = hyper::Request::post(format!("http://{address}{path}"))
                .header(hyper::header::HOST, host);
        }
        let request = request
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
        // A timestamp at the edge of i64 is stale, not an overflow.
        assert!(verify(SECRET, "t=-9223372036854775808,v1=00", body, i64::MAX, 300).is_err());
    }

    /// Finding "secrets": a sender's Debug never shows its secret.
    #[test]
    fn a_sender_debug_shows_no_secret() {
        let sender = WebhookSender::new("http://hooks.example.com/x", "whsec_do_not_print")
            .expect("valid url");
        let printed = format!("{sender:?}");
        assert!(!printed.contains("do_not_print"), "{printed}");
        assert!(printed.contains("hooks.example.com"), "{printed}");
    }

    /// Finding "alert webhooks can reach internal addresses": a sender
    /// pinned to an address connects there (never resolving the URL's
    /// host, here one that cannot resolve) and still says the host.
    #[tokio::test]
    async fn a_pinned_sender_connects_to_the_checked_address_with_the_urls_host() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let received = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buffer).await.expect("read");
                assert!(n > 0, "closed early");
                request.extend_from_slice(&buffer[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("answer");
            String::from_utf8_lossy(&request).into_owned()
        });
        let sender = WebhookSender::new("http://hooks.invalid:8123/in?x=1", "s")
            .expect("valid url")
            .connecting_to(address);
        sender
            .post("d-1", b"{}".to_vec(), NOW)
            .await
            .expect("delivered");
        let request = received.await.expect("receiver");
        assert!(
            request.starts_with("POST /in?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("host: hooks.invalid:8123\r\n"),
            "{request}"
        );
        // Without the pin the host must resolve, and it does not.
        let unpinned = WebhookSender::new("http://hooks.invalid:8123/in", "s").expect("valid url");
        assert!(unpinned.post("d-2", b"{}".to_vec(), NOW).await.is_err());
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
