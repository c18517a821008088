//! `[invoicer]` settings and the cron schedule they name, parsed when
//! the settings are read.

use super::*;

/// `[invoicer]` settings. Issuer, period, tax rates and the adjustment
/// lookback are `[billing]` ([`BillingTerms`]), shared with the rater and
/// the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InvoicerConfig {
    /// Late usage arriving within this long after a period ends is on its
    /// invoice; later usage becomes an adjustment on the next one. Longer
    /// than the rater's grace, so that the rater has rated the last hour.
    pub grace_seconds: u64,
    /// When the scheduler looks for periods to close (cron, with seconds),
    /// checked when the settings are read.
    pub schedule: CronSchedule,
    /// Serialises runs on one host.
    pub lock_file: String,
    /// Customers billed per chunk: the close's memory is bounded by one
    /// chunk's accounts, quantities and invoices.
    pub chunk_customers: usize,
    /// Issued invoices a close returns in full (for the CLI and tests);
    /// beyond it only their count and totals.
    pub keep_issued: usize,
    /// Billing events (`invoice.issued`), with a ledger: POSTed signed to
    /// this URL ("" for none) ...
    pub events_webhook_url: String,
    /// ... with this HMAC key (`Idlemeter-Signature`, as alerts are signed),
    pub events_webhook_secret: idlemeter_core::Secret,
    /// ... and/or published to this Kafka topic ("" for none), keyed by
    /// delivery id.
    pub events_topic: String,
    /// Longest wait between delivery attempts of one event (backoff from 1 s).
    pub events_retry_max_s: u64,
    /// How often, with a ledger, customers' spend is compared with their
    /// records' spend limits (`customer.spend_limit_reached`); 0 never.
    pub spend_limit_check_s: u64,
    /// The scheduler runs as one of several replicas that divide the
    /// customers (on the `[topics] shares` coordination topic); needs a
    /// ledger (`[ledger] url`), where numbers are claimed. `invoices close`
    /// from the command line always closes everyone.
    pub divide_customers: bool,
}

impl Default for InvoicerConfig {
    fn default() -> Self {
        Self {
            grace_seconds: 3600,
            schedule: "0 30 * * * *"
                .parse()
                .expect("the default schedule is a cron expression"),
            // Absolute, so the scheduler and a CLI run started elsewhere on
            // the same host share it.
            lock_file: std::env::temp_dir()
                .join("idlemeter-invoicer.lock")
                .display()
                .to_string(),
            chunk_customers: 20_000,
            keep_issued: 10_000,
            events_webhook_url: String::new(),
            events_webhook_secret: idlemeter_core::Secret::default(),
            events_topic: String::new(),
            events_retry_max_s: 300,
            spend_limit_check_s: 60,
            divide_customers: false,
        }
    }
}

/// A cron expression with seconds (`sec min hour day month weekday`),
/// parsed when the settings are read, so a bad one stops the scheduler at
/// start with the reason; written back as it was given.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    schedule: cron::Schedule,
}

impl CronSchedule {
    /// The parsed schedule.
    pub fn schedule(&self) -> &cron::Schedule {
        &self.schedule
    }
}

impl std::str::FromStr for CronSchedule {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let schedule = text
            .parse()
            .map_err(|error: cron::error::Error| Error::Schedule {
                schedule: text.to_owned(),
                reason: error.to_string(),
            })?;
        Ok(Self {
            text: text.to_owned(),
            schedule,
        })
    }
}

impl std::fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for CronSchedule {}

impl Serialize for CronSchedule {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for CronSchedule {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
