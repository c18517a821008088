//! The idle-suspend policy service.
//!
//! It consumes `usage.samples` (its own consumer group) and `sandbox.leases`
//! (every partition, in every replica), feeds them to the pure [`Engine`] of
//! `idlemeter_core::policy`, and for every decision:
//! 1. produces a `SandboxCommand` on `sandbox.commands`, keyed by node, unless
//!    the action is `notify` (the collector of that node freezes or stops the
//!    sandbox);
//! 2. inserts a row into ClickHouse `policy_decisions` with the rule, policy
//!    version and signals;
//! 3. POSTs it, signed, to the platform's webhook if one is configured (in the
//!    background, with retries: a slow receiver never delays a suspend).
//!
//! Steps 1 and 2 are acknowledged before the next message is read. Every
//! `snapshot_interval_ms` the engine's state goes to `policy_state` and only
//! then are the offsets consumed so far committed. A replica holds the state
//! of the sandboxes whose samples reach its partitions: the first sample of a
//! sandbox new to it (at start, or after a rebalance gave it the partition)
//! reads the sandbox's snapshot, and a revoked partition's sandboxes are
//! forgotten, left to their next owner. That owner replays from the last
//! commit, which is never ahead of the snapshot: the engine recognises
//! samples it has seen by seq, and replayed decisions carry the same ids (the
//! row collapses, the collector and the receiver act once per id). So neither
//! a restart nor a replica's death forgets an idle streak or suspends early.
//!
//! Leases are keyed by sandbox, samples by node, so a lease may arrive on
//! another replica's partition: every replica reads every lease, applies
//! those of the sandboxes it holds and keeps the others, in case the sandbox
//! comes to it.

pub use idlemeter_webhook as webhook;

pub mod whatif;

mod metrics;
mod service;
mod wire;

pub use metrics::PolicyMetrics;
pub use service::PolicyService;
pub use wire::{command_of, decision_row, decode_lease};

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use idlemeter_bus::{GroupConsumer, KafkaSettings, Topics};
use idlemeter_core::policy::{Action, Decision, Engine, Input, Lease, Policy, SandboxState, Spend};
use idlemeter_core::CustomerId;
use idlemeter_proto::{decode_node_batch, v1, SCHEMA_VERSION};
use idlemeter_store::{DecisionRow, PolicyStateRow, Store};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use webhook::{sign, verify, WebhookSender};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] idlemeter_bus::Error),
    #[error(transparent)]
    Store(#[from] idlemeter_store::Error),
    #[error("kafka {context}: {source}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Policy(#[from] idlemeter_core::SheetError),
    #[error("policy state row of {customer}/{sandbox} is unreadable: {reason}")]
    State {
        customer: String,
        sandbox: String,
        reason: String,
    },
    #[error(transparent)]
    Webhook(#[from] webhook::DeliveryError),
    #[error("webhook_url is set but webhook_secret is empty: refusing to send unsigned webhooks")]
    UnsignedWebhook,
    #[error(transparent)]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long the loop keeps reading already-waiting messages before it emits
/// their decisions together.
const GATHER: Duration = Duration::from_millis(20);

/// Settings of the policy service (`[policy]` in the configuration file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Path of the policy file.
    pub file: String,
    pub group_id: String,
    /// How often state is snapshotted and offsets committed.
    pub snapshot_interval_ms: u64,
    /// Sandboxes not running and not seen for this long are forgotten.
    pub forget_after_s: u64,
    /// A decision older than this (wall clock minus its sample's time) when it
    /// is made, as when a new group replays the topic's history, is recorded
    /// in `policy_decisions` but sends no command and no webhook: the sandbox
    /// has moved on since. 0 sends everything.
    pub stale_after_s: u64,
    /// How often the spend of customers with a `spend_limit` is read (the
    /// newer of the rater's live and hourly figures; budget caps); 0 turns
    /// budget caps off.
    pub spend_poll_interval_s: u64,
    /// `http://` URL receiving signed decisions; empty for none.
    pub webhook_url: String,
    pub webhook_secret: idlemeter_core::Secret,
    /// Per-cluster key the commands on `sandbox.commands` are signed with
    /// (HMAC-SHA256, the webhooks' format, in the `idlemeter-signature`
    /// header); collectors refuse commands that do not verify with theirs.
    /// Empty sends unsigned commands, which collectors refuse.
    pub command_key: idlemeter_core::Secret,
    /// How far back a starting replica reads `sandbox.leases`. Every
    /// replica reads every lease (a lease is keyed by sandbox, the samples
    /// by node, so they need not share a partition); what an owner applied
    /// is in its snapshots, so this only has to cover the leases sent since
    /// the last snapshot before a stop, and while no replica ran.
    pub lease_lookback_s: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            file: "policies/sprites.toml".to_owned(),
            group_id: "idlemeter-policy".to_owned(),
            snapshot_interval_ms: 5_000,
            forget_after_s: 2 * 86_400,
            stale_after_s: 300,
            spend_poll_interval_s: 60,
            webhook_url: String::new(),
            webhook_secret: idlemeter_core::Secret::default(),
            command_key: idlemeter_core::Secret::default(),
            lease_lookback_s: 86_400,
        }
    }
}
