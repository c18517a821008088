//! Kafka adapter of idlemeter, over rdkafka (librdkafka, bundled).
//!
//! It speaks the Kafka protocol to Apache Kafka, Redpanda, MSK and, in tests,
//! tansu. idlemeter never relies on Kafka transactions: exactly-once comes from
//! idempotent writes downstream plus committing offsets only after the sink
//! acknowledged (see docs/INVARIANTS.md at the repository root), so
//! consumers built here have auto-commit and auto offset store turned off.
//!
//! Kafka is a trust boundary: every client here takes its TLS and SASL
//! settings from one [`KafkaSettings`] (librdkafka is built with OpenSSL).

use std::collections::BTreeMap;
use std::time::Duration;

use idlemeter_core::Secret;

pub mod shares;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Message, TopicPartitionList};
use serde::{Deserialize, Serialize};
pub use shares::{shard_of, CustomerShares};

/// Errors of the Kafka adapter, with the topic or client they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("kafka settings: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A group consumer whose rebalances are logged: which partitions a process
/// gained or lost, and when, is the first question after any ingest incident.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// Consumer context that logs every rebalance with the partitions it moved,
/// and keeps the revoked ones for a consumer that holds state per partition
/// ([`GroupContext::take_revoked`]).
#[derive(Debug, Clone)]
pub struct GroupContext {
    group_id: String,
    revoked: std::sync::Arc<std::sync::Mutex<Vec<(String, i32)>>>,
    assigned: Assigned,
    /// Partitions assigned at a known offset whose first message has not
    /// come yet, with that offset ([`GroupContext::skipped_before`]).
    starts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>>,
}

/// The partitions a group consumer holds now, kept by its context.
pub type Assigned = std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(String, i32)>>>;

impl GroupContext {
    /// Partitions revoked since the last call. The revocation is recorded
    /// before the consumer delivers any message of a later assignment, so a
    /// consumer that drains this before handling each message never applies
    /// a replayed message to state it built before losing the partition.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        let mut revoked = self
            .revoked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *revoked)
    }

    /// The partitions held now, updated at every rebalance (revocations
    /// before, assignments after).
    pub fn assigned_handle(&self) -> Assigned {
        std::sync::Arc::clone(&self.assigned)
    }

    /// Whether this consumer holds `topic[partition]` now. A message of a
    /// partition not held (fetched before a revocation) is not this
    /// consumer's to act on, and no offset of it is this consumer's to
    /// commit: another member owns it and its state.
    pub fn holds(&self, topic: &str, partition: i32) -> bool {
        self.assigned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|(held, number)| *number == partition && held == topic)
    }

    /// The step every group consumer takes with a message before acting on
    /// it: `None` when its partition is no longer held (fetched before a
    /// revocation: the partition's owner now reads it from the group's
    /// commit, with the state), else how many offsets the broker skipped
    /// before it (see [`Self::skipped_before`]).
    pub fn admit(&self, message: &impl Message) -> Option<u64> {
        if !self.holds(message.topic(), message.partition()) {
            return None;
        }
        Some(self.skipped_before(message.topic(), message.partition(), message.offset()))
    }

    /// How many offsets the broker skipped before this message: nonzero
    /// only for the first message of a partition assigned at a known offset
    /// (the group's commit, or the first offset at a time a replay starts
    /// from) that comes from a later offset, which is logged
    /// as an error. A Kafka broker serves every offset it still has; one
    /// that skips some loses what they held: retention deleted them before
    /// they were consumed, or the broker does not serve a fetch that starts
    /// inside a record batch (tansu 0.6 with memory storage serves the next
    /// batch instead; see the README's "Brokers").
    pub fn skipped_before(&self, topic: &str, partition: i32, offset: i64) -> u64 {
        let mut starts = self
            .starts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if starts.is_empty() {
            return 0;
        }
        // Found without building a key: this runs for every message until
        // each assigned partition's first one has come.
        let Some((key, start)) = starts
            .iter()
            .find(|((held, number), _)| *number == partition && held == topic)
            .map(|(key, start)| (key.clone(), *start))
        else {
            return 0;
        };
        starts.remove(&key);
        if offset <= start {
            return 0;
        }
        tracing::error!(
            group = %self.group_id,
            topic,
            partition,
            assigned_at = start,
            first_fetched = offset,
            "the broker skipped offsets: the partition was assigned at a known offset (the group's commit, or where a replay starts), and its first message came from a later one; what the skipped offsets held is lost to this consumer"
        );
        (offset - start) as u64
    }

    /// Notes the offsets `assigned` starts its partitions at, for
    /// [`Self::skipped_before`] to check the first message of each against.
    fn expect_first(&self, assigned: &TopicPartitionList) {
        self.starts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(
                assigned
                    .elements()
                    .iter()
                    .filter_map(|element| match element.offset() {
                        rdkafka::Offset::Offset(offset) => {
                            Some(((element.topic().to_owned(), element.partition()), offset))
                        }
                        _ => None,
                    }),
            );
    }

    /// `offsets` less the partitions this consumer does not hold now.
    pub fn held_only(&self, offsets: &TopicPartitionList) -> TopicPartitionList {
        let mut kept = TopicPartitionList::new();
        for element in offsets.elements() {
            if self.holds(element.topic(), element.partition()) {
                // The offset of an element read from a list is valid.
                let _ = kept.add_partition_offset(
                    element.topic(),
                    element.partition(),
                    element.offset(),
                );
            }
        }
        kept
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    /// librdkafka's rebalance, except that an (eager) assignment starts
    /// each partition at the offset committed for it, looked up here and
    /// given to `assign` explicitly: a partition revoked and assigned back
    /// to this process resumes from the group's commit (its state was
    /// dropped with the revocation), never from where this process's
    /// fetcher had got to. Should the lookup fail, librdkafka looks the
    /// offsets up itself, as it does by default.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let outcome = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.pre_rebalance(base_consumer, &Rebalance::Assign(tpl));
                let start = if cooperative {
                    tpl.clone()
                } else {
                    match base_consumer.committed_offsets(tpl.clone(), COMMITTED_LOOKUP) {
                        Ok(committed) => committed,
                        Err(error) => {
                            tracing::warn!(group = %self.group_id, %error, "committed offsets not found; librdkafka looks them up");
                            tpl.clone()
                        }
                    }
                };
                let assigned = if cooperative {
                    base_consumer.incremental_assign(&start)
                } else {
                    base_consumer.assign(&start)
                };
                self.post_rebalance(base_consumer, &Rebalance::Assign(&start));
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                let revoked = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                self.post_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                revoked
            }
            other => {
                let rebalance = Rebalance::Error(KafkaError::Rebalance(other.into()));
                self.pre_rebalance(base_consumer, &rebalance);
                // As librdkafka does: an error drops the assignment.
                let dropped = base_consumer.unassign();
                self.post_rebalance(base_consumer, &rebalance);
                dropped
            }
        };
        if let Err(error) = outcome {
            tracing::error!(group = %self.group_id, %error, "rebalance not applied");
        }
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                tracing::info!(
                    group = %self.group_id,
                    partitions = %describe(partitions),
                    "partitions revoked"
                );
                let revoked: Vec<(String, i32)> = partitions
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_owned(), element.partition()))
                    .collect();
                let mut assigned = self
                    .assigned
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for partition in &revoked {
                    assigned.remove(partition);
                }
                drop(assigned);
                let mut starts = self
                    .starts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for partition in &revoked {
                    starts.remove(partition);
                }
                drop(starts);
                self.revoked
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(revoked);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group_id, %error, "rebalance failed")
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            self.assigned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(
                    partitions
                        .elements()
                        .iter()
                        .map(|element| (element.topic().to_owned(), element.partition())),
                );
            self.expect_first(partitions);
            tracing::info!(
                group = %self.group_id,
                partitions = %describe(partitions),
                "partitions assigned"
            );
        }
    }
}

/// How long a rebalance waits for the group's committed offsets.
const COMMITTED_LOOKUP: Duration = Duration::from_secs(10);

/// `topic[partition]` for each, with `@offset` where one is set.
fn describe(partitions: &TopicPartitionList) -> String {
    let listed: Vec<String> = partitions
        .elements()
        .iter()
        .map(|element| match element.offset() {
            rdkafka::Offset::Offset(offset) => {
                format!("{}[{}]@{offset}", element.topic(), element.partition())
            }
            _ => format!("{}[{}]", element.topic(), element.partition()),
        })
        .collect();
    if listed.is_empty() {
        "none".to_owned()
    } else {
        listed.join(",")
    }
}

/// How to reach the brokers, and as whom. Every client idlemeter makes
/// (producers, group and tail consumers, the admin client) is built from
/// these, so one setting secures all of them. `properties` passes any other
/// librdkafka setting through unchanged (and wins over everything else).
///
/// Security: `security_protocol` is `plaintext` (the default), `ssl`,
/// `sasl_plaintext` or `sasl_ssl`; SASL mechanisms `PLAIN`, `SCRAM-SHA-256`
/// and `SCRAM-SHA-512` are built in (MSK: `sasl_ssl` with SCRAM, or `ssl`
/// with client certificates). Passwords are [`Secret`]s, and properties
/// whose name says password, secret or key material print redacted too.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list.
    pub brokers: String,
    #[serde(default)]
    pub security_protocol: String,
    #[serde(default)]
    pub sasl_mechanism: String,
    #[serde(default)]
    pub sasl_username: String,
    #[serde(default)]
    pub sasl_password: Secret,
    /// PEM file of the CA that signed the brokers' certificates (empty:
    /// the system's trust store).
    #[serde(default)]
    pub ssl_ca_location: String,
    /// Client certificate and key (PEM files) for mutual TLS.
    #[serde(default)]
    pub ssl_certificate_location: String,
    #[serde(default)]
    pub ssl_key_location: String,
    #[serde(default)]
    pub ssl_key_password: Secret,
    #[serde(default, serialize_with = "serialize_properties")]
    pub properties: BTreeMap<String, String>,
    /// Replicas of each topic idlemeter creates (1: a single broker, as in
    /// development; 3 on a production Apache Kafka, Redpanda or MSK cluster).
    /// Topics that exist are left as they are.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Topic-level configuration for the topics idlemeter creates, e.g.
    /// `min.insync.replicas = "2"` beside a replication factor of 3.
    #[serde(default)]
    pub topic_config: BTreeMap<String, String>,
    /// Every message its own record batch (librdkafka's
    /// `batch.num.messages = 1`), for a broker that cannot serve a fetch
    /// starting inside a batch: tansu 0.6 with memory storage (the test
    /// suite's broker) answers such a fetch with the next batch, and a
    /// consumer that resumes from its group's commit would lose the rest of
    /// the batch (consumers log it: [`GroupContext::skipped_before`]). Off
    /// for Apache Kafka, Redpanda, MSK and tansu with sqlite storage, which
    /// serve every offset.
    #[serde(default)]
    pub single_message_batches: bool,
}

fn default_replication_factor() -> i32 {
    1
}

/// Whether a librdkafka property holds a secret (printed redacted).
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("password")
        || name.contains("secret")
        || name == "sasl.oauthbearer.config"
        || name == "ssl.key.pem"
        || name == "ssl.keystore.password"
}

fn redacted_properties(properties: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    properties
        .iter()
        .map(|(name, value)| {
            let shown = if is_secret_property(name) && !value.is_empty() {
                idlemeter_core::secret::REDACTED
            } else {
                value.as_str()
            };
            (name.as_str(), shown)
        })
        .collect()
}

fn serialize_properties<S: serde::Serializer>(
    properties: &BTreeMap<String, String>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    redacted_properties(properties).serialize(serializer)
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            security_protocol: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: Secret::default(),
            ssl_ca_location: String::new(),
            ssl_certificate_location: String::new(),
            ssl_key_location: String::new(),
            ssl_key_password: Secret::default(),
            properties: BTreeMap::new(),
            replication_factor: default_replication_factor(),
            topic_config: BTreeMap::new(),
            single_message_batches: false,
        }
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &self.sasl_password)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &self.ssl_key_password)
            .field("properties", &redacted_properties(&self.properties))
            .field("replication_factor", &self.replication_factor)
            .field("topic_config", &self.topic_config)
            .finish()
    }
}

/// Topic names; defaults are the production names, tests use unique ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    #[serde(default = "default_samples_topic")]
    pub samples: String,
    #[serde(default = "default_dead_letter_topic")]
    pub samples_dead_letter: String,
    #[serde(default = "default_commands_topic")]
    pub commands: String,
    /// Keep-alive leases for the idle policy (JSON, keyed by sandbox).
    #[serde(default = "default_leases_topic")]
    pub leases: String,
    /// Usage events (CloudEvents JSON, keyed by subject) from the API's
    /// OpenMeter-compatible endpoint, for ingest.
    #[serde(default = "default_events_topic")]
    pub events: String,
    /// Partitions of each topic idlemeter creates (the dead-letter topic has
    /// one). They bound how many replicas of ingest and policy share the
    /// work; samples and leases must have the same count, since the policy
    /// pairs partition i of both. Existing topics keep theirs.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// The coordination topic replicas divide customers on (no messages;
    /// one partition per shard; see [`shares`]). Each service that divides
    /// customers joins its own group on it, named after the topic.
    #[serde(default = "default_shares_topic")]
    pub shares: String,
    /// Its partitions: the most replicas that can share a service's work.
    #[serde(default = "default_shares_partitions")]
    pub shares_partitions: i32,
}

fn default_shares_topic() -> String {
    "idlemeter.shares".to_owned()
}
fn default_shares_partitions() -> i32 {
    64
}

impl Topics {
    /// Joins the replicas of `service` (e.g. `rater.USD`) in dividing the
    /// customers.
    pub async fn share_customers(
        &self,
        kafka: &KafkaSettings,
        service: &str,
    ) -> Result<CustomerShares> {
        let group = format!("{}.{service}", self.shares);
        CustomerShares::join(kafka, &self.shares, &group, self.shares_partitions).await
    }
}

fn default_partitions() -> i32 {
    8
}

fn default_samples_topic() -> String {
    "usage.samples".to_owned()
}
fn default_dead_letter_topic() -> String {
    "usage.samples.dlq".to_owned()
}
fn default_commands_topic() -> String {
    "sandbox.commands".to_owned()
}
fn default_leases_topic() -> String {
    "sandbox.leases".to_owned()
}
fn default_events_topic() -> String {
    "usage.events".to_owned()
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            samples: default_samples_topic(),
            samples_dead_letter: default_dead_letter_topic(),
            commands: default_commands_topic(),
            leases: default_leases_topic(),
            events: default_events_topic(),
            partitions: default_partitions(),
            shares: default_shares_topic(),
            shares_partitions: default_shares_partitions(),
        }
    }
}

/// Header carrying why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "idlemeter-dlq-reason";
/// Headers carrying where a dead-lettered message came from.
pub const DEAD_LETTER_SOURCE_HEADER: &str = "idlemeter-dlq-source";
/// Header of a dead letter sent without its payload (the broker refused it
/// with it): the payload's size in bytes. The original is at the source.
pub const DEAD_LETTER_OMITTED_HEADER: &str = "idlemeter-dlq-payload-omitted";

impl KafkaSettings {
    fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id);
        for (property, value) in [
            ("security.protocol", self.security_protocol.as_str()),
            ("sasl.mechanism", self.sasl_mechanism.as_str()),
            ("sasl.username", self.sasl_username.as_str()),
            ("sasl.password", self.sasl_password.expose()),
            ("ssl.ca.location", self.ssl_ca_location.as_str()),
            (
                "ssl.certificate.location",
                self.ssl_certificate_location.as_str(),
            ),
            ("ssl.key.location", self.ssl_key_location.as_str()),
            ("ssl.key.password", self.ssl_key_password.expose()),
        ] {
            if !value.is_empty() {
                config.set(property, value);
            }
        }
        config
    }

    /// An idempotent producer (acks=all): a retried send is never duplicated in
    /// the log.
    pub fn producer(&self, client_id: &str) -> Result<FutureProducer> {
        let mut config = self.client_config(client_id);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // Node batches of counters compress 3-4x: less broker disk and
            // memory, less network, for little CPU.
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "30000");
        if self.single_message_batches {
            config.set("batch.num.messages", "1");
        }
        apply_overrides(&mut config, &self.properties);
        config.create().map_err(|source| Error::Kafka {
            context: format!("producer {client_id}"),
            source,
        })
    }

    /// A group consumer that commits only when told to: no auto-commit and no
    /// automatic offset store. New groups start at the earliest offset so no
    /// sample produced before the first deployment is skipped.
    pub fn consumer(&self, client_id: &str, group_id: &str) -> Result<GroupConsumer> {
        self.consumer_with(client_id, group_id, &[])
    }

    /// [`Self::consumer`] for services that act on each message as it
    /// arrives (the policy service, the collector's commands): a fetch that
    /// finds nothing new returns after 10 ms instead of librdkafka's 500, so
    /// a message produced just after is read within milliseconds even from
    /// a broker that does not answer a waiting fetch early. Costs a few idle
    /// fetch requests a second per partition leader.
    pub fn prompt_consumer(&self, client_id: &str, group_id: &str) -> Result<GroupConsumer> {
        self.consumer_with(client_id, group_id, &[("fetch.wait.max.ms", "10")])
    }

    fn consumer_with(
        &self,
        client_id: &str,
        group_id: &str,
        extra: &[(&str, &str)],
    ) -> Result<GroupConsumer> {
        let mut config = self.client_config(client_id);
        for (property, value) in extra {
            config.set(*property, *value);
        }
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // Bounded prefetch: memory stays flat while the sink is slow.
            .set("queued.max.messages.kbytes", "65536");
        apply_overrides(&mut config, &self.properties);
        let context = GroupContext {
            group_id: group_id.to_owned(),
            revoked: Default::default(),
            assigned: Default::default(),
            starts: Default::default(),
        };
        config
            .create_with_context(context)
            .map_err(|source| Error::Kafka {
                context: format!("consumer {client_id} in group {group_id}"),
                source,
            })
    }

    /// A consumer of every partition of `topic` from the first message at
    /// or after `since_ms` (Kafka timestamps), committing nothing: for a
    /// stream every replica must see whole (the policy's leases). A broker
    /// that cannot look offsets up by time is read from the beginning.
    pub fn replay_consumer(
        &self,
        client_id: &str,
        topic: &str,
        since_ms: i64,
    ) -> Result<GroupConsumer> {
        let consumer = self.tail_consumer(client_id)?;
        let kafka = |context: &str| {
            let context = format!("{context} {topic}");
            move |source| Error::Kafka { context, source }
        };
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(kafka("metadata of"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|found| found.name() == topic)
            .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
            .collect();
        let mut wanted = rdkafka::TopicPartitionList::new();
        for partition in &partitions {
            wanted
                .add_partition_offset(topic, *partition, rdkafka::Offset::Offset(since_ms))
                .map_err(kafka("offsets of"))?;
        }
        let start = consumer
            .offsets_for_times(wanted, timeout)
            .unwrap_or_else(|error| {
                tracing::warn!(%topic, %error, "offsets by time not available; reading from the beginning");
                let mut beginning = rdkafka::TopicPartitionList::new();
                for partition in &partitions {
                    let _ = beginning.add_partition_offset(topic, *partition, rdkafka::Offset::Beginning);
                }
                beginning
            });
        consumer.assign(&start).map_err(kafka("assign"))?;
        consumer.context().expect_first(&start);
        Ok(consumer)
    }

    /// A consumer that reads a topic from its end onwards and never commits:
    /// for views rebuilt from the stream (the rater's live figures), where
    /// each process reads every partition itself. Its group id is unique to
    /// the process, so replicas do not split the partitions between them.
    pub fn tail_consumer(&self, client_id: &str) -> Result<GroupConsumer> {
        let group_id = format!(
            "{client_id}-tail-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_millis())
                .unwrap_or(0)
        );
        let mut config = self.client_config(client_id);
        config
            .set("group.id", &group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // A live view wants each batch as soon as the broker has it
            // (librdkafka waits up to 500 ms by default when a fetch finds
            // nothing new).
            .set("fetch.wait.max.ms", "50")
            .set("queued.max.messages.kbytes", "65536");
        apply_overrides(&mut config, &self.properties);
        config
            .create_with_context(GroupContext {
                group_id: group_id.clone(),
                revoked: Default::default(),
                assigned: Default::default(),
                starts: Default::default(),
            })
            .map_err(|source| Error::Kafka {
                context: format!("tail consumer {client_id} ({group_id})"),
                source,
            })
    }

    /// A client for readiness checks ([`BrokerProbe::check`]).
    pub fn probe(&self, client_id: &str) -> Result<BrokerProbe> {
        let mut config = self.client_config(client_id);
        apply_overrides(&mut config, &self.properties);
        config
            .create()
            .map(BrokerProbe)
            .map_err(|source| Error::Kafka {
                context: format!("probe {client_id}"),
                source,
            })
    }

    /// Creates the topics that do not exist yet; existing ones are left alone.
    pub async fn ensure_topics(&self, topics: &[(&str, i32)]) -> Result<()> {
        let mut config = self.client_config("idlemeter-admin");
        apply_overrides(&mut config, &self.properties);
        let admin: AdminClient<DefaultClientContext> =
            config.create().map_err(|source| Error::Kafka {
                context: "admin client".to_owned(),
                source,
            })?;
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| {
                let replication = TopicReplication::Fixed(self.replication_factor);
                self.topic_config.iter().fold(
                    NewTopic::new(name, *partitions, replication),
                    |topic, (key, value)| topic.set(key, value),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|source| Error::Kafka {
                context: "create topics".to_owned(),
                source,
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
            }
        }
        Ok(())
    }
}

/// User properties win over our defaults, so operators can tune anything.
fn apply_overrides(config: &mut ClientConfig, properties: &BTreeMap<String, String>) {
    for (key, value) in properties {
        config.set(key, value);
    }
}

/// Asks the brokers for their metadata: whether a service can reach Kafka
/// with its own settings (addresses, TLS, SASL).
pub struct BrokerProbe(BaseConsumer);

impl std::fmt::Debug for BrokerProbe {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BrokerProbe")
    }
}

impl BrokerProbe {
    /// Blocks up to `limit`: run it off the async threads.
    pub fn check(&self, limit: Duration) -> std::result::Result<(), String> {
        self.0
            .fetch_metadata(None, limit)
            .map(|_| ())
            .map_err(|error| format!("kafka brokers unreachable: {error}"))
    }
}

pub use idlemeter_core::publish::Publisher;

impl KafkaSettings {
    /// A [`Publisher`] to `topic` over an idempotent producer: a message
    /// retried by the producer is not duplicated in the log.
    pub fn publisher(&self, client_id: &str, topic: &str) -> Result<Publisher> {
        let producer = self.producer(client_id)?;
        let topic = topic.to_owned();
        Ok(std::sync::Arc::new(
            move |messages: Vec<(String, Vec<u8>)>| {
                // Enqueue every message now, then wait for each acknowledgement.
                let mut deliveries = Vec::with_capacity(messages.len());
                let mut refused = None;
                for (key, payload) in &messages {
                    match producer.send_result(
                        rdkafka::producer::FutureRecord::to(&topic)
                            .key(key)
                            .payload(payload),
                    ) {
                        Ok(delivery) => deliveries.push(delivery),
                        Err((error, _)) => {
                            refused = Some(error.to_string());
                            break;
                        }
                    }
                }
                Box::pin(async move {
                    if let Some(error) = refused {
                        return Err(error);
                    }
                    for delivery in deliveries {
                        match delivery.await {
                            Ok(Ok(_)) => {}
                            Ok(Err((error, _))) => return Err(error.to_string()),
                            Err(_) => return Err("the producer was dropped".to_owned()),
                        }
                    }
                    Ok(())
                })
            },
        ))
    }
}

/// Reads a group's lag on its own connections, so that its requests
/// (offset fetches, list offsets) never queue ahead of the consumer's own
/// fetches: on a broker that answers one request at a time per connection,
/// sharing the consumer's would add their round trips to message latency.
pub struct LagReader {
    client: BaseConsumer,
}

impl std::fmt::Debug for LagReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("LagReader")
    }
}

impl KafkaSettings {
    /// A [`LagReader`] for `group_id` (it never joins the group).
    pub fn lag_reader(&self, group_id: &str) -> Result<LagReader> {
        let mut config = self.client_config("idlemeter-lag");
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false");
        apply_overrides(&mut config, &self.properties);
        config
            .create()
            .map(|client| LagReader { client })
            .map_err(|source| Error::Kafka {
                context: format!("lag reader of group {group_id}"),
                source,
            })
    }
}

impl LagReader {
    /// Messages not yet committed on the partitions `consumer` owns now:
    /// high watermark minus the group's committed offset (the low
    /// watermark before the first commit). `None` once the consumer is
    /// dropped; `Some(None)` when the broker did not answer within 2 s.
    /// Blocks: run it off the async threads.
    pub fn lag_of(&self, consumer: &std::sync::Weak<GroupConsumer>) -> Option<Option<i64>> {
        let assignment = consumer.upgrade()?.assignment().ok();
        Some(assignment.and_then(|assignment| self.lag(assignment)))
    }

    fn lag(&self, assignment: rdkafka::TopicPartitionList) -> Option<i64> {
        use rdkafka::Offset;
        const TIMEOUT: Duration = Duration::from_secs(2);
        if assignment.count() == 0 {
            return Some(0);
        }
        let committed = self.client.committed_offsets(assignment, TIMEOUT).ok()?;
        let mut lag = 0;
        for element in committed.elements() {
            let (low, high) = self
                .client
                .fetch_watermarks(element.topic(), element.partition(), TIMEOUT)
                .ok()?;
            let from = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => low,
            };
            lag += (high - from).max(0);
        }
        Some(lag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> GroupContext {
        GroupContext {
            group_id: "g".to_owned(),
            revoked: Default::default(),
            assigned: Default::default(),
            starts: Default::default(),
        }
    }

    #[test]
    fn only_held_partitions_are_acted_on_and_committed() {
        let context = context();
        context
            .assigned
            .lock()
            .expect("not poisoned")
            .extend([("samples".to_owned(), 1), ("samples".to_owned(), 3)]);
        assert!(context.holds("samples", 1));
        assert!(!context.holds("samples", 2));
        assert!(!context.holds("other", 1));
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in [(1, 10), (2, 20), (3, 30)] {
            offsets
                .add_partition_offset("samples", partition, rdkafka::Offset::Offset(offset))
                .expect("a fresh partition");
        }
        let kept: Vec<(i32, rdkafka::Offset)> = context
            .held_only(&offsets)
            .elements()
            .iter()
            .map(|element| (element.partition(), element.offset()))
            .collect();
        assert_eq!(
            kept,
            vec![
                (1, rdkafka::Offset::Offset(10)),
                (3, rdkafka::Offset::Offset(30))
            ]
        );
    }

    #[test]
    fn a_message_is_admitted_only_from_a_held_partition_with_what_was_skipped() {
        let context = context();
        context
            .assigned
            .lock()
            .expect("not poisoned")
            .insert(("samples".to_owned(), 1));
        context
            .starts
            .lock()
            .expect("not poisoned")
            .insert(("samples".to_owned(), 1), 10);
        let message = |partition, offset| {
            rdkafka::message::OwnedMessage::new(
                None,
                None,
                "samples".to_owned(),
                rdkafka::Timestamp::NotAvailable,
                partition,
                offset,
                None,
            )
        };
        assert_eq!(context.admit(&message(2, 5)), None, "not held");
        assert_eq!(context.admit(&message(1, 12)), Some(2), "10 and 11 skipped");
        assert_eq!(context.admit(&message(1, 13)), Some(0));
    }

    #[test]
    fn a_first_message_past_the_assigned_offset_counts_the_skipped_ones_once() {
        let context = context();
        context.starts.lock().expect("not poisoned").extend([
            (("samples".to_owned(), 1), 10),
            (("samples".to_owned(), 2), 20),
        ]);
        assert_eq!(
            context.skipped_before("samples", 1, 10),
            0,
            "served as asked"
        );
        assert_eq!(
            context.skipped_before("samples", 1, 50),
            0,
            "only the first message of an assignment is checked"
        );
        assert_eq!(
            context.skipped_before("samples", 2, 27),
            7,
            "20..=26 skipped"
        );
        assert_eq!(context.skipped_before("samples", 2, 90), 0, "reported once");
        assert_eq!(
            context.skipped_before("samples", 3, 5),
            0,
            "assigned without a known offset"
        );
    }

    fn secured() -> KafkaSettings {
        KafkaSettings {
            brokers: "127.0.0.1:1".to_owned(),
            security_protocol: "sasl_ssl".to_owned(),
            sasl_mechanism: "SCRAM-SHA-512".to_owned(),
            sasl_username: "ingest".to_owned(),
            sasl_password: Secret::new("kafka-pa55word"),
            ssl_key_password: Secret::new("key-pa55word"),
            properties: BTreeMap::from([
                (
                    "ssl.keystore.password".to_owned(),
                    "keystore-s3cret".to_owned(),
                ),
                ("compression.type".to_owned(), "gzip".to_owned()),
            ]),
            ..KafkaSettings::default()
        }
    }

    /// Finding "secrets": Kafka's SASL settings print redacted.
    #[test]
    fn kafka_passwords_and_secret_properties_print_redacted() {
        let settings = secured();
        let debug = format!("{settings:?}");
        let json = serde_json::to_string(&settings).expect("serialises");
        for printed in [&debug, &json] {
            for secret in ["pa55word", "s3cret"] {
                assert!(!printed.contains(secret), "{printed}");
            }
            assert!(
                printed.contains("gzip") && printed.contains("ingest"),
                "{printed}"
            );
        }
    }

    /// Finding "Kafka is a trust boundary": TLS and SASL (SCRAM) clients can
    /// be made, of every kind. A librdkafka built without OpenSSL refuses
    /// `sasl_ssl` here.
    #[tokio::test]
    async fn every_client_takes_tls_and_sasl_settings() {
        let settings = secured();
        for (name, made) in [
            ("producer", settings.producer("t").map(|_| ())),
            ("consumer", settings.consumer("t", "g").map(|_| ())),
            ("tail consumer", settings.tail_consumer("t").map(|_| ())),
        ] {
            assert!(made.is_ok(), "{name}: {made:?}");
        }
        let config = settings.client_config("t");
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.password"), Some("kafka-pa55word"));
        // Unset fields are not passed: librdkafka's defaults stay.
        assert_eq!(config.get("ssl.ca.location"), None);
    }
}
