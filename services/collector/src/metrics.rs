//! Prometheus metrics of the collector, all named `idlemeter_collector_*`.

use idlemeter_telemetry::histogram;
use prometheus::{Histogram, IntCounter, IntGauge, Registry};

/// Every metric the collector exports.
#[derive(Debug, Clone)]
pub struct CollectorMetrics {
    pub ticks: IntCounter,
    pub tick_failures: IntCounter,
    pub tick_seconds: Histogram,
    pub samples: IntCounter,
    pub sandboxes: IntGauge,
    pub unlabelled_sandboxes: IntGauge,
    pub epochs_started: IntCounter,
    pub sandboxes_stopped: IntCounter,
    pub spool_batches: IntGauge,
    pub spool_bytes: IntGauge,
    pub spool_dropped_batches: IntCounter,
    pub spool_shrunk_batches: IntCounter,
    pub spool_boundaries_lost: IntCounter,
    pub batches_sent: IntCounter,
    pub send_failures: IntCounter,
    pub commands_applied: IntCounter,
    pub commands_ignored: IntCounter,
}

impl CollectorMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let tick_seconds = histogram(
            registry,
            "idlemeter_collector_tick_seconds",
            "time to read every sandbox, advance counters, save state and spool the batch",
            vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
        )?;
        let counter = |name, help| idlemeter_telemetry::counter(registry, name, help);
        let gauge = |name, help| idlemeter_telemetry::gauge(registry, name, help);
        Ok(Self {
            ticks: counter("idlemeter_collector_ticks_total", "sampling ticks completed")?,
            tick_failures: counter(
                "idlemeter_collector_tick_failures_total",
                "sampling ticks that failed",
            )?,
            tick_seconds,
            samples: counter("idlemeter_collector_samples_total", "sandbox samples produced")?,
            sandboxes: gauge("idlemeter_collector_sandboxes", "sandboxes read in the last tick")?,
            unlabelled_sandboxes: gauge(
                "idlemeter_collector_unlabelled_sandboxes",
                "sandboxes without a label file (metered with a zero allocation)",
            )?,
            epochs_started: counter(
                "idlemeter_collector_epochs_started_total",
                "sandbox epochs started",
            )?,
            sandboxes_stopped: counter(
                "idlemeter_collector_sandboxes_stopped_total",
                "sandboxes whose cgroup vanished (final stopped sample sent)",
            )?,
            spool_batches: gauge(
                "idlemeter_collector_spool_batches",
                "node batches waiting in the spool",
            )?,
            spool_bytes: gauge("idlemeter_collector_spool_bytes", "bytes waiting in the spool")?,
            spool_shrunk_batches: counter(
                "idlemeter_collector_spool_shrunk_batches_total",
                "spooled batches cut down to their epoch boundaries (first and stopped samples) at the bound",
            )?,
            spool_boundaries_lost: counter(
                "idlemeter_collector_spool_boundaries_lost_total",
                "shrunk batches dropped at the bound all the same: epoch boundaries lost",
            )?,
            spool_dropped_batches: counter(
                "idlemeter_collector_spool_dropped_batches_total",
                "oldest spooled batches dropped because the spool hit its bound",
            )?,
            batches_sent: counter(
                "idlemeter_collector_batches_sent_total",
                "node batches acknowledged by kafka",
            )?,
            send_failures: counter(
                "idlemeter_collector_send_failures_total",
                "failed attempts to send a node batch",
            )?,
            commands_applied: counter(
                "idlemeter_collector_commands_applied_total",
                "suspend and resume commands applied",
            )?,
            commands_ignored: counter(
                "idlemeter_collector_commands_ignored_total",
                "commands for this node that were not applied (too old, stale epoch, unknown sandbox, unsupported)",
            )?,
        })
    }
}
