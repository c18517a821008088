//! The rater's Prometheus counters, labelled with its sheet's currency.

use super::*;

/// Rater metrics.
#[derive(Debug, Clone)]
pub(crate) struct RaterMetrics {
    pub(crate) snapshots_written: prometheus::IntCounter,
    pub(crate) live_figures_written: prometheus::IntCounter,
    pub(crate) customers_failed: prometheus::IntCounter,
    pub(crate) samples_refused: prometheus::IntCounter,
    pub(crate) samples_read: prometheus::IntCounter,
    pub(crate) passes_failed: prometheus::IntCounter,
}

impl RaterMetrics {
    /// Registers the rater's counters labelled with its sheet's currency
    /// (one rater runs per currency's sheet).
    pub(crate) fn new(registry: &prometheus::Registry, currency: &str) -> Result<Self> {
        let counter = |name: &str, help: &str| -> Result<prometheus::IntCounter> {
            let opts = prometheus::Opts::new(name, help).const_label("currency", currency);
            Ok(idlemeter_telemetry::registered(
                registry,
                prometheus::IntCounter::with_opts(opts)?,
            )?)
        };
        Ok(Self {
            snapshots_written: counter(
                "idlemeter_rater_snapshots_written_total",
                "period-to-date snapshots rated and stored",
            )?,
            live_figures_written: counter(
                "idlemeter_rater_live_figures_written_total",
                "provisional period-to-date figures of the open hour written",
            )?,
            customers_failed: counter(
                "idlemeter_rater_customer_failures_total",
                "customer ratings that failed and were reported in rating_errors",
            )?,
            samples_refused: counter(
                "idlemeter_rater_samples_refused_total",
                "samples rating refused (reported in rating_errors)",
            )?,
            samples_read: counter(
                "idlemeter_rater_samples_read_total",
                "samples read from the store by rating passes",
            )?,
            passes_failed: counter(
                "idlemeter_rater_pass_failures_total",
                "closed-hour or live rating passes that failed as a whole (retried at the next tick)",
            )?,
        })
    }
}
