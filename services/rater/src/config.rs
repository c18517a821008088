//! `[rater]` settings.

use super::*;

/// Configuration of the online rater.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RaterConfig {
    /// The price sheet customers are rated with: everyone's, or, with
    /// `currency_sheets`, that of the customers billed in its currency and
    /// of those without a customer record.
    pub sheet: String,
    /// One more sheet per further currency (EUR beside USD): a customer
    /// whose record names a currency is rated, billed and invoiced by the
    /// sheet of that currency only. Amounts are never converted.
    pub currency_sheets: Vec<String>,
    /// How long after an hour ends before it is rated (late samples).
    pub grace_seconds: u64,
    /// How often to look for newly closed hours.
    pub interval_seconds: u64,
    /// Idle policy file whose activity signals classify running seconds as
    /// idle (for sheets that bill idle seconds differently); empty for the
    /// built-in session-or-connection rule. Part of the snapshot checksum.
    pub idle_policy: String,
    /// How often to rate the open hour into the live figure; 0 turns live
    /// rating off.
    pub live_interval_seconds: u64,
    /// Where live rating reads new samples: `kafka` (the samples topic, read
    /// from its end by every rater process; scales with the stream) or
    /// `clickhouse` (polls `usage_samples`; small fleets and tests).
    pub live_source: LiveSource,
    /// How far back each live pass re-reads, for samples that reach the
    /// store late (a late sample older than this is left to the hour's final
    /// rating; with counters it changes no money).
    pub live_lateness_seconds: u64,
    /// How long live figures use a customer's account (credits left,
    /// wallet, adjustments) before reading it again. Hourly figures always
    /// read it.
    pub account_refresh_seconds: u64,
    /// Run as one of several replicas that divide the customers between
    /// them (on the `[topics] shares` coordination topic), each customer
    /// rated by one. Off: this rater rates everyone (one replica; two
    /// would both rate everyone, which collapses to the same rows but
    /// doubles the work).
    pub divide_customers: bool,
}

impl Default for RaterConfig {
    fn default() -> Self {
        Self {
            sheet: "prices/northflank.toml".to_owned(),
            currency_sheets: Vec::new(),
            grace_seconds: 300,
            interval_seconds: 60,
            idle_policy: String::new(),
            live_interval_seconds: 5,
            live_source: LiveSource::Kafka,
            live_lateness_seconds: 10,
            account_refresh_seconds: 60,
            divide_customers: false,
        }
    }
}

/// Where live rating reads new samples.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LiveSource {
    Kafka,
    Clickhouse,
}
