//! The port through which billing code publishes keyed messages, with no
//! broker in sight: `idlemeter_bus::KafkaSettings::publisher` implements it
//! over Kafka, the invoicer's billing events take it, and tests pass a
//! closure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Publishes keyed messages to one topic and resolves once every one was
/// acknowledged (or with the first error, as text).
pub type Publisher = Arc<
    dyn Fn(Vec<(String, Vec<u8>)>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;
