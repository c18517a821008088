//! One batch of consumed messages: the rows compaction decided on, the dead
//! letters, and the producer timestamps for latency.

use std::time::Duration;

use idlemeter_bus::{
    DEAD_LETTER_OMITTED_HEADER, DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER,
};
use idlemeter_core::Compacted;
use idlemeter_proto::decode_node_batch;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

use crate::admission::Admission;
use crate::partitions::Partitions;
use crate::IngestMetrics;

/// Longest reason header a dead letter carries, in bytes: brokers refuse
/// messages over their limit (1 MB by default), and a message with a
/// hundred thousand bad samples must still be dead-lettered.
pub const MAX_REASON_BYTES: usize = 4_096;

/// How many refused samples a reason lists one by one.
const LISTED_REASONS: usize = 20;

/// The reason of a message whose `reasons` samples were refused: the first
/// [`LISTED_REASONS`], a count of the rest, at most [`MAX_REASON_BYTES`].
pub fn refusal_reason(reasons: &[String]) -> String {
    let listed = reasons.len().min(LISTED_REASONS);
    let mut reason = format!(
        "{} of the batch's samples refused (the others were ingested): {}",
        reasons.len(),
        reasons[..listed].join("; ")
    );
    if reasons.len() > listed {
        reason.push_str(&format!("; and {} more", reasons.len() - listed));
    }
    cap_reason(reason)
}

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary, saying so.
pub fn cap_reason(reason: String) -> String {
    cap_to(reason, MAX_REASON_BYTES)
}

fn cap_to(mut reason: String, max: usize) -> String {
    const MARK: &str = " [cut]";
    if reason.len() <= max {
        return reason;
    }
    let mut end = max - MARK.len();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    reason.push_str(MARK);
    reason
}

/// A message that could not be used, or only partly, kept byte for byte.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// What was wrong, for people: `sample 3: field `state`: 0 is not a lifecycle state`.
    pub reason: String,
    /// `topic/partition/offset` of the original message.
    pub source: String,
    /// Size of the payload left out because the broker refused the letter
    /// with it (see [`Batch::send_dead_letters`]).
    pub omitted: Option<usize>,
}

impl DeadLetter {
    fn omit_payload(&mut self) {
        let size = self.payload.len();
        self.omitted.get_or_insert(size);
        self.payload = Vec::new();
        self.reason = cap_to(std::mem::take(&mut self.reason), 1_024);
    }
}

/// A dead letter of one row ClickHouse refused (`row` holds one sample or
/// one minute row), as JSON: a sample in the shape of `idlemeter rate`'s
/// input, a minute row with its columns. `messages` names the batch's
/// messages the row was made from (`topic/partition/offset..offset`).
pub fn row_dead_letter(row: idlemeter_core::Compacted, reason: &str, messages: &str) -> DeadLetter {
    let (customer, payload, table) = if let Some(sample) = row.samples.first() {
        (
            sample.customer.to_string(),
            serde_json::to_vec(sample),
            "usage_samples",
        )
    } else if let Some(minute) = row.minutes.first() {
        (
            minute.customer.to_string(),
            serde_json::to_vec(minute),
            "usage_minutes",
        )
    } else {
        (String::new(), Ok(Vec::new()), "none")
    };
    DeadLetter {
        key: Some(customer.into_bytes()),
        payload: payload.unwrap_or_default(),
        reason: cap_reason(reason.to_owned()),
        source: format!("ingest/{table} row from {messages}"),
        omitted: None,
    }
}

/// Whether the broker will refuse `error` however often it is retried: the
/// message itself is the problem, not the broker's state.
pub fn is_permanent(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidRecord
                | Code::MessageBatchTooLarge
                | Code::PolicyViolation
        )
    )
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
    /// The topic the messages came from (ingest reads one).
    topic: String,
    /// First and last offset taken in, per partition.
    offsets: std::collections::BTreeMap<i32, (i64, i64)>,
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
        admission: &mut Admission,
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
        if self.topic.is_empty() {
            message.topic().clone_into(&mut self.topic);
        }
        self.offsets
            .entry(message.partition())
            .and_modify(|(_, last)| *last = message.offset())
            .or_insert((message.offset(), message.offset()));
        let payload = message.payload().unwrap_or_default();
        let refusal = match decode_node_batch(payload) {
            Ok(decoded) => {
                metrics
                    .samples_consumed
                    .inc_by(decoded.samples.len() as u64);
                // The window is judged on the wall clock, not on the quiet
                // clock (which stops while ingest is blocked).
                let (admitted, refused) =
                    admission.admit(decoded.samples, chrono::Utc::now().timestamp_millis());
                self.samples += admitted.len();
                partitions.push(
                    message.partition(),
                    message.offset(),
                    admitted,
                    arrived_ms,
                    &mut self.rows,
                );
                let reasons: Vec<String> = decoded
                    .rejected
                    .iter()
                    .map(ToString::to_string)
                    .chain(refused)
                    .collect();
                if reasons.is_empty() {
                    None
                } else {
                    metrics.samples_rejected.inc_by(reasons.len() as u64);
                    Some(refusal_reason(&reasons))
                }
            }
            Err(error) => {
                partitions.skip(message.partition(), message.offset());
                Some(cap_reason(error.to_string()))
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(%source, %reason, "dead-lettering message");
            self.dead_letters.push(DeadLetter {
                key: message.key().map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                reason,
                source,
                omitted: None,
            });
        }
        if let Some(produced_at) = message.timestamp().to_millis() {
            self.produced_at_ms.push(produced_at);
        }
    }

    /// Produces the dead letters and waits for the broker's acknowledgement.
    /// Delivered ones are removed, so a retry never sends one twice.
    ///
    /// A letter the broker refuses for good (too large, invalid) would be
    /// retried forever and stall the partition for every tenant: it is sent
    /// again without its payload (headers say where the original is, and
    /// how large it was); if even that is refused it is dropped, logged with
    /// its source, and counted in the returned number. Transient errors
    /// (broker down, timeouts) are returned for the caller to retry.
    pub async fn send_dead_letters(
        &mut self,
        producer: &FutureProducer,
        topic: &str,
    ) -> Result<u64, rdkafka::error::KafkaError> {
        let mut dropped = 0;
        // Round 1 sends as they are; round 2 sends the letters refused for
        // good without their payloads; what round 2 refuses for good is dropped.
        for round in 0..2 {
            let deliveries = self.dead_letters.iter().map(|letter| {
                let omitted = letter.omitted.map(|size| size.to_string());
                let mut headers = OwnedHeaders::new()
                    .insert(Header {
                        key: DEAD_LETTER_REASON_HEADER,
                        value: Some(letter.reason.as_str()),
                    })
                    .insert(Header {
                        key: DEAD_LETTER_SOURCE_HEADER,
                        value: Some(letter.source.as_str()),
                    });
                if let Some(size) = &omitted {
                    headers = headers.insert(Header {
                        key: DEAD_LETTER_OMITTED_HEADER,
                        value: Some(size.as_str()),
                    });
                }
                let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                    .payload(letter.payload.as_slice())
                    .headers(headers);
                if let Some(key) = &letter.key {
                    record = record.key(key.as_slice());
                }
                producer.send(record, Duration::from_secs(30))
            });
            let outcomes = futures::future::join_all(deliveries).await;
            let mut transient = None;
            let mut refused_for_good = 0;
            let mut outcome_of_each = outcomes.into_iter();
            self.dead_letters.retain_mut(|letter| match outcome_of_each.next() {
                Some(Ok(_)) => false,
                Some(Err((error, _))) if is_permanent(&error) => {
                    if round == 0 {
                        tracing::warn!(source = %letter.source, %error, bytes = letter.payload.len(), "dead letter refused by the broker; sending it without its payload");
                        letter.omit_payload();
                        refused_for_good += 1;
                        true
                    } else {
                        tracing::error!(source = %letter.source, %error, reason = %letter.reason, "dead letter refused even without its payload; dropped (the original stays at its source offset until retention)");
                        dropped += 1;
                        false
                    }
                }
                Some(Err((error, _))) => {
                    transient.get_or_insert(error);
                    true
                }
                None => true,
            });
            if let Some(error) = transient {
                return Err(error);
            }
            if refused_for_good == 0 {
                break;
            }
        }
        Ok(dropped)
    }

    /// The messages taken in, as `topic/partition/first..last` ranges.
    pub fn message_ranges(&self) -> String {
        let ranges: Vec<String> = self
            .offsets
            .iter()
            .map(|(partition, (first, last))| format!("{}/{partition}/{first}..{last}", self.topic))
            .collect();
        ranges.join(", ")
    }

    /// Adds dead letters made after the batch was closed (rows ClickHouse
    /// refused), to be sent by the next [`Batch::send_dead_letters`].
    pub fn push_dead_letters(&mut self, letters: Vec<DeadLetter>) {
        self.dead_letters.extend(letters);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_capped_at_a_character_boundary_and_say_so() {
        let long = "é".repeat(MAX_REASON_BYTES);
        let capped = cap_reason(long);
        assert!(capped.len() <= MAX_REASON_BYTES, "{}", capped.len());
        assert!(capped.ends_with(" [cut]"));
        assert_eq!(cap_reason("short".to_owned()), "short");
        let reasons: Vec<String> = (0..25).map(|i| format!("sample {i}: bad")).collect();
        let reason = refusal_reason(&reasons);
        assert!(
            reason.starts_with("25 of the batch's samples refused"),
            "{reason}"
        );
        assert!(reason.contains("sample 19: bad; and 5 more"), "{reason}");
        assert!(!reason.contains("sample 20:"), "{reason}");
    }

    #[test]
    fn messages_too_large_or_invalid_are_permanent_and_broker_trouble_is_not() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode as Code;
        for code in [
            Code::MessageSizeTooLarge,
            Code::InvalidRecord,
            Code::MessageBatchTooLarge,
        ] {
            assert!(
                is_permanent(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        for code in [
            Code::BrokerTransportFailure,
            Code::MessageTimedOut,
            Code::NotLeaderForPartition,
            Code::UnknownTopicOrPartition,
            Code::QueueFull,
        ] {
            assert!(
                !is_permanent(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_letter_left_without_its_payload_keeps_its_first_size() {
        let mut letter = DeadLetter {
            key: None,
            payload: vec![7; 5_000],
            reason: "r".repeat(3_000),
            source: "t/0/1".to_owned(),
            omitted: None,
        };
        letter.omit_payload();
        letter.omit_payload();
        assert_eq!(letter.omitted, Some(5_000));
        assert!(letter.payload.is_empty());
        assert!(letter.reason.len() <= 1_024);
    }
}
