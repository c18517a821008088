//! What the scheduler exports about its closes.

use super::*;

/// What the scheduler exports: whether its runs succeed, and what they issue.
#[derive(Debug, Clone)]
pub(crate) struct InvoicerMetrics {
    runs: prometheus::IntCounterVec,
    last_run_succeeded: prometheus::IntGauge,
    last_success: prometheus::IntGauge,
    customers_failed: prometheus::IntCounter,
    invoices_issued: prometheus::IntCounter,
}

impl InvoicerMetrics {
    /// Registers the invoicer's metrics labelled with its sheet's currency
    /// (one invoicer runs per currency's sheet).
    pub(crate) fn register(registry: &prometheus::Registry, currency: &str) -> Result<Self> {
        use idlemeter_telemetry::registered;
        use prometheus::{IntCounter, IntCounterVec, IntGauge};
        let opts = |name: &str, help: &str| {
            prometheus::Opts::new(name, help).const_label("currency", currency)
        };
        let runs = registered(
            registry,
            IntCounterVec::new(
                opts(
                    "idlemeter_invoicer_runs_total",
                    "scheduled closes by outcome (ok, failed)",
                ),
                &["outcome"],
            )?,
        )?;
        let gauge = |name, help| registered(registry, IntGauge::with_opts(opts(name, help))?);
        let counter = |name, help| registered(registry, IntCounter::with_opts(opts(name, help))?);
        let last_run_succeeded = gauge(
            "idlemeter_invoicer_last_run_succeeded",
            "1 unless the last scheduled close failed as a whole",
        )?;
        let last_success = gauge(
            "idlemeter_invoicer_last_success_timestamp_seconds",
            "when the last scheduled close succeeded (the process start before the first)",
        )?;
        let customers_failed = counter(
            "idlemeter_invoicer_customers_failed_total",
            "customers a close could not invoice (reported in rating_errors, retried next run)",
        )?;
        let invoices_issued = counter(
            "idlemeter_invoicer_invoices_issued_total",
            "invoices issued by scheduled closes",
        )?;
        for outcome in ["ok", "failed"] {
            runs.with_label_values(&[outcome]);
        }
        last_run_succeeded.set(1);
        last_success.set(Utc::now().timestamp());
        Ok(Self {
            runs,
            last_run_succeeded,
            last_success,
            customers_failed,
            invoices_issued,
        })
    }

    pub(crate) fn observe(&self, outcome: &Result<CloseOutcome>) {
        match outcome {
            Ok(outcome) => {
                self.runs.with_label_values(&["ok"]).inc();
                self.last_run_succeeded.set(1);
                self.last_success.set(Utc::now().timestamp());
                self.customers_failed.inc_by(outcome.failed.len() as u64);
                self.invoices_issued.inc_by(outcome.issued_count as u64);
            }
            Err(_) => {
                self.runs.with_label_values(&["failed"]).inc();
                self.last_run_succeeded.set(0);
            }
        }
    }
}
