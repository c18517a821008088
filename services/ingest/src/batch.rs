//! One batch of consumed messages: the rows compaction decided on, the dead
//! letters, and the producer timestamps for latency.

use std::time::Duration;

use idlemeter_bus::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER};
use idlemeter_core::Compacted;
use idlemeter_proto::decode_node_batch;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

use crate::partitions::Partitions;
use crate::IngestMetrics;

/// A message that could not be used, or only partly, kept byte for byte.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// What was wrong, for people: `sample 3: field `state`: 0 is not a lifecycle state`.
    pub reason: String,
    /// `topic/partition/offset` of the original message.
    pub source: String,
}

/// What consecutive messages produced: rows to write and dead letters.
#[derive(Debug, Default)]
pub struct Batch {
    rows: Compacted,
    dead_letters: Vec<DeadLetter>,
    messages: usize,
    samples: usize,
    /// Producer timestamps (Unix ms) of the messages, for end-to-end latency.
    produced_at_ms: Vec<i64>,
}

impl Batch {
    /// No message taken in.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Samples decoded (before compaction).
    pub fn sample_count(&self) -> usize {
        self.samples
    }

    /// Rows to write.
    pub fn rows(&self) -> &Compacted {
        &self.rows
    }

    pub fn rows_mut(&mut self) -> &mut Compacted {
        &mut self.rows
    }

    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead_letters
    }

    /// Takes one message in: its good samples into its partition's
    /// compactor (whose decided rows join the batch), the message itself into
    /// the dead letters if any part of it was refused.
    pub(crate) fn accept(
        &mut self,
        message: &BorrowedMessage<'_>,
        metrics: &IngestMetrics,
        partitions: &mut Partitions,
        arrived_ms: i64,
    ) {
        metrics.messages_consumed.inc();
        self.messages += 1;
        let source = format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let payload = message.payload().unwrap_or_default();
        let refusal = match decode_node_batch(payload) {
            Ok(decoded) => {
                metrics
                    .samples_consumed
                    .inc_by(decoded.samples.len() as u64);
                self.samples += decoded.samples.len();
                partitions.push(
                    message.partition(),
                    message.offset(),
                    decoded.samples,
                    arrived_ms,
                    &mut self.rows,
                );
                if decoded.rejected.is_empty() {
                    None
                } else {
                    metrics
                        .samples_rejected
                        .inc_by(decoded.rejected.len() as u64);
                    let reasons: Vec<String> =
                        decoded.rejected.iter().map(ToString::to_string).collect();
                    Some(format!(
                        "{} of the batch's samples refused (the others were ingested): {}",
                        reasons.len(),
                        reasons.join("; ")
                    ))
                }
            }
            Err(error) => {
                partitions.skip(message.partition(), message.offset());
                Some(error.to_string())
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(%source, %reason, "dead-lettering message");
            self.dead_letters.push(DeadLetter {
                key: message.key().map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                reason,
                source,
            });
        }
        if let Some(produced_at) = message.timestamp().to_millis() {
            self.produced_at_ms.push(produced_at);
        }
    }

    /// Produces the dead letters and waits for the broker's acknowledgement.
    /// Delivered ones are removed, so a retry never sends one twice.
    pub async fn send_dead_letters(
        &mut self,
        producer: &FutureProducer,
        topic: &str,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let deliveries = self.dead_letters.iter().map(|letter| {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: DEAD_LETTER_REASON_HEADER,
                    value: Some(letter.reason.as_str()),
                })
                .insert(Header {
                    key: DEAD_LETTER_SOURCE_HEADER,
                    value: Some(letter.source.as_str()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .payload(letter.payload.as_slice())
                .headers(headers);
            if let Some(key) = &letter.key {
                record = record.key(key.as_slice());
            }
            producer.send(record, Duration::from_secs(30))
        });
        let outcomes = futures::future::join_all(deliveries).await;
        let mut first_error = None;
        let mut outcome_of_each = outcomes.into_iter();
        self.dead_letters.retain(|_| match outcome_of_each.next() {
            Some(Ok(_)) => false,
            Some(Err((error, _))) => {
                first_error.get_or_insert(error);
                true
            }
            None => true,
        });
        match first_error {
            None => Ok(()),
            Some(error) => Err(error),
        }
    }

    /// Records produce→durable latency of every message in the batch.
    pub fn observe_latency(&self, metrics: &IngestMetrics) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        for produced_at in &self.produced_at_ms {
            let seconds = (now_ms - produced_at).max(0) as f64 / 1000.0;
            metrics.end_to_end_seconds.observe(seconds);
        }
    }
}
