//! The policy service's Prometheus metrics, all named `idlemeter_policy_*`.

use super::*;

/// Metrics, all named `idlemeter_policy_*`.
#[derive(Debug, Clone)]
pub struct PolicyMetrics {
    pub samples_observed: IntCounter,
    pub leases_observed: IntCounter,
    pub messages_refused: IntCounter,
    pub decisions: IntCounterVec,
    pub commands_sent: IntCounter,
    pub stale_decisions: IntCounter,
    pub offsets_skipped: IntCounter,
    pub webhook_failures: IntCounter,
    pub sandboxes_tracked: IntGauge,
    pub snapshots: IntCounter,
    /// Wall clock at emission minus the deciding sample's timestamp.
    pub decision_delay_seconds: Histogram,
    /// Wall clock at consumption minus the message's Kafka timestamp.
    pub consume_delay_seconds: Histogram,
    pub lag_messages: IntGauge,
}

impl PolicyMetrics {
    pub fn register(registry: &Registry) -> Result<Self> {
        use idlemeter_telemetry::{gauge, histogram, registered};
        let counter = |name, help| idlemeter_telemetry::counter(registry, name, help);
        let decisions = registered(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "idlemeter_policy_decisions_total",
                    "decisions by rule and action",
                ),
                &["rule", "action"],
            )?,
        )?;
        let sandboxes_tracked = gauge(
            registry,
            "idlemeter_policy_sandboxes_tracked",
            "sandboxes in the engine's state",
        )?;
        let lag_messages = gauge(
            registry,
            "idlemeter_policy_lag_messages",
            "messages not yet committed on the partitions this process owns (samples and leases)",
        )?;
        let decision_delay_seconds = histogram(
            registry,
            "idlemeter_policy_decision_delay_seconds",
            "deciding sample's timestamp to command acknowledged by Kafka",
            vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
        )?;
        let consume_delay_seconds = histogram(
            registry,
            "idlemeter_policy_consume_delay_seconds",
            "message's Kafka timestamp to consumed by the policy service",
            vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
        )?;
        Ok(Self {
            samples_observed: counter(
                "idlemeter_policy_samples_observed_total",
                "samples fed to the engine",
            )?,
            leases_observed: counter(
                "idlemeter_policy_leases_observed_total",
                "keep-alive leases received",
            )?,
            messages_refused: counter(
                "idlemeter_policy_messages_refused_total",
                "messages that were not node batches or leases (ingest dead-letters bad batches)",
            )?,
            decisions,
            commands_sent: counter(
                "idlemeter_policy_commands_sent_total",
                "commands acknowledged by Kafka",
            )?,
            stale_decisions: counter(
                "idlemeter_policy_stale_decisions_total",
                "decisions recorded but not sent: older than stale_after_s when made",
            )?,
            offsets_skipped: counter(
                "idlemeter_policy_offsets_skipped_total",
                "offsets the broker skipped where a partition was resumed (samples at the group's commit, leases at the time state starts from): see the error logged",
            )?,
            webhook_failures: counter(
                "idlemeter_policy_webhook_failures_total",
                "webhook deliveries that failed after their retries",
            )?,
            sandboxes_tracked,
            snapshots: counter(
                "idlemeter_policy_snapshots_total",
                "state snapshots written",
            )?,
            decision_delay_seconds,
            consume_delay_seconds,
            lag_messages,
        })
    }
}
