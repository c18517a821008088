//! The online rater: turns stored samples into money, hour by hour.
//!
//! Every closed hour (an hour that ended at least `grace_seconds` ago), each
//! customer with usage in the billing period gets a snapshot: the bill of the
//! period *to date*, rated by [`idlemeter_core::rate_report`], the very function
//! `idlemeter rate` prints, and stored line by line in `rated_usage`. Snapshots
//! are cumulative, so the cost of one hour is the difference of two snapshots
//! and rounding (line rounding, per-minute increments) never accumulates across
//! hours: a span that crosses an hour boundary is rounded up once, in the
//! snapshot that sees its end.
//!
//! A snapshot is keyed by the sheet's checksum. A changed sheet therefore
//! re-rates every hour of the period beside the old results, which stay, and
//! `rating_changes` records the old and new totals and which lines moved.
//!
//! Cost: each snapshot re-reads and re-rates the period to date. That is exact
//! and simple; carrying span state between hours is the known next step when a
//! customer's month outgrows one rating pass.

mod period;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use idlemeter_core::invoice::{CustomerBill, InvoiceLine};
use idlemeter_core::policy::{Policy, PolicyIdle};
use idlemeter_core::{
    rate_report, BillingOptions, CustomerId, IdlePolicy, NumberedSample, PriceSheet,
    SessionOrConnection, UsageSample,
};
use idlemeter_store::{to_column, RatedLineRow, RatingChangeRow, Store};
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub use period::Period;

/// Errors of the rater, with the sheet or customer they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sheet(#[from] idlemeter_core::Error),
    #[error(transparent)]
    Store(#[from] idlemeter_store::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Configuration of the online rater.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RaterConfig {
    /// The price sheet every customer is rated with.
    pub sheet: String,
    /// Billing period: `month` (calendar month, UTC) or `day` (for testing).
    pub period: Period,
    /// How long after an hour ends before it is rated (late samples).
    pub grace_seconds: u64,
    /// How often to look for newly closed hours.
    pub interval_seconds: u64,
    /// Idle policy file whose activity signals classify running seconds as
    /// idle (for sheets that bill idle seconds differently); empty for the
    /// built-in session-or-connection rule. Part of the snapshot checksum.
    pub idle_policy: String,
}

impl Default for RaterConfig {
    fn default() -> Self {
        Self {
            sheet: "prices/northflank.toml".to_owned(),
            period: Period::Month,
            grace_seconds: 300,
            interval_seconds: 60,
            idle_policy: String::new(),
        }
    }
}

/// The idle classification the rater uses.
#[derive(Debug, Clone)]
enum Idle {
    SessionOrConnection,
    Policy(Box<PolicyIdle>),
}

impl IdlePolicy for Idle {
    fn version(&self) -> &str {
        match self {
            Idle::SessionOrConnection => SessionOrConnection.version(),
            Idle::Policy(policy) => policy.version(),
        }
    }

    fn is_idle(&self, previous: &UsageSample, closing: &UsageSample) -> bool {
        match self {
            Idle::SessionOrConnection => SessionOrConnection.is_idle(previous, closing),
            Idle::Policy(policy) => policy.is_idle(previous, closing),
        }
    }
}

/// What one pass rated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RatingPass {
    pub snapshots_written: usize,
    pub snapshots_present: usize,
    pub changes_recorded: usize,
    pub samples_refused: usize,
}

/// The rater with its sheet loaded.
#[derive(Debug)]
pub struct Rater {
    store: Store,
    sheet: PriceSheet,
    sheet_label: String,
    sheet_checksum: String,
    config: RaterConfig,
    idle: Idle,
    snapshots_written: prometheus::IntCounter,
}

impl Rater {
    /// Loads and checks the sheet (file, line and field on error).
    pub fn new(
        store: Store,
        sheet_text: &str,
        config: RaterConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self> {
        let sheet = PriceSheet::from_toml(sheet_text, &config.sheet)
            .map_err(|error| Error::Sheet(error.into()))?;
        let sheet_checksum: String = Sha256::digest(sheet_text.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let snapshots_written = prometheus::IntCounter::new(
            "idlemeter_rater_snapshots_written_total",
            "period-to-date snapshots rated and stored",
        )?;
        registry.register(Box::new(snapshots_written.clone()))?;
        Ok(Self {
            store,
            sheet,
            sheet_label: config.sheet.clone(),
            sheet_checksum,
            config,
            idle: Idle::SessionOrConnection,
            snapshots_written,
        })
    }

    /// Classifies idle seconds with `policy_text` (the file named by
    /// `config.idle_policy`) instead of the session-or-connection rule. The
    /// policy's text joins the sheet's in the snapshot checksum, so changing
    /// the policy re-rates like changing the sheet.
    pub fn with_idle_policy(mut self, policy_text: &str) -> Result<Self> {
        let policy = Policy::from_toml(policy_text, &self.config.idle_policy)
            .map_err(|error| Error::Sheet(error.into()))?;
        let mut digest = Sha256::new();
        digest.update(self.sheet_checksum.as_bytes());
        digest.update(b"\0");
        digest.update(policy_text.as_bytes());
        self.sheet_checksum = digest
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        self.idle = Idle::Policy(Box::new(PolicyIdle::new(policy)));
        Ok(self)
    }

    pub fn sheet_checksum(&self) -> &str {
        &self.sheet_checksum
    }

    /// Rates every closed hour of the current period (and the previous one, so
    /// a period's last hours are rated after a restart across its end) that has
    /// no snapshot under this sheet yet. Idempotent: a second call with the
    /// same `now` writes nothing.
    pub async fn rate_closed_hours(&self, now: DateTime<Utc>) -> Result<RatingPass> {
        let closed_until =
            period::floor_hour(now - chrono::Duration::seconds(self.config.grace_seconds as i64));
        let last_hour_start = closed_until - chrono::Duration::hours(1);
        let current = self.config.period.start_of(last_hour_start);
        let previous = self
            .config
            .period
            .start_of(current - chrono::Duration::seconds(1));
        let mut pass = RatingPass::default();
        for period_start in [previous, current] {
            let period_end = self.config.period.next(period_start).min(closed_until);
            let customers = self
                .store
                .customers_with_samples(unix_ms(period_start), unix_ms(period_end))
                .await?;
            for (customer, first_ms) in &customers {
                // Hours before the customer's first sample of the period bill nothing.
                let first_sample =
                    DateTime::from_timestamp_millis(*first_ms as i64).unwrap_or(period_start);
                let mut as_of = period::floor_hour(first_sample) + chrono::Duration::hours(1);
                // One query for what this sheet already rated, not one per hour.
                let rated = self
                    .store
                    .rated_hours(customer, unix_secs(period_start), &self.sheet_checksum)
                    .await?;
                while as_of <= period_end {
                    if rated.contains(&unix_secs(as_of)) {
                        pass.snapshots_present += 1;
                    } else {
                        self.rate_snapshot(customer, period_start, as_of, now, &mut pass)
                            .await?;
                    }
                    as_of += chrono::Duration::hours(1);
                }
            }
        }
        Ok(pass)
    }

    async fn rate_snapshot(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        as_of: DateTime<Utc>,
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        let (period_secs, as_of_secs) = (unix_secs(period_start), unix_secs(as_of));
        // Snapshots of other sheet versions: the new one is explained against them.
        let existing = self
            .store
            .snapshot_totals(customer, period_secs, as_of_secs)
            .await?;
        if existing
            .iter()
            .any(|(checksum, _)| checksum == &self.sheet_checksum)
        {
            pass.snapshots_present += 1;
            return Ok(());
        }
        let samples: Vec<NumberedSample> = self
            .store
            .samples_for_rating(customer, unix_ms(period_start), unix_ms(as_of))
            .await?
            .into_iter()
            .enumerate()
            .map(|(position, sample)| NumberedSample {
                line: position as u64 + 1,
                sample,
            })
            .collect();
        let report = rate_report(
            &self.sheet,
            &samples,
            &self.idle,
            &BillingOptions::default(),
            Vec::new(),
        )?;
        if !report.errors.is_empty() {
            pass.samples_refused += report.errors.len();
            tracing::warn!(%customer, refused = report.errors.len(), first = ?report.errors.first(), "samples refused while rating");
        }
        let Some(bill) = report
            .customers
            .iter()
            .find(|bill| &bill.customer == customer)
        else {
            return Ok(());
        };
        let rated_at = unix_secs(now);
        let rows = bill
            .lines
            .iter()
            .enumerate()
            .map(|(line_no, line)| {
                self.line_row(
                    customer,
                    period_secs,
                    as_of_secs,
                    &report.currency,
                    &report.idle_policy,
                    line_no,
                    line,
                    rated_at,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        self.store.insert_rated_lines(&rows).await?;
        self.snapshots_written.inc();
        pass.snapshots_written += 1;
        for (old_checksum, old_total) in existing {
            let change = self
                .explain_change(
                    customer,
                    &old_checksum,
                    old_total,
                    bill,
                    period_secs,
                    as_of_secs,
                    rated_at,
                )
                .await?;
            self.store.insert_rating_change(&change).await?;
            pass.changes_recorded += 1;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn line_row(
        &self,
        customer: &CustomerId,
        period_start: u32,
        as_of: u32,
        currency: &str,
        idle_policy: &str,
        line_no: usize,
        line: &InvoiceLine,
        rated_at: u32,
    ) -> Result<RatedLineRow> {
        Ok(RatedLineRow {
            customer: customer.to_string(),
            period_start,
            as_of,
            sheet: self.sheet_label.clone(),
            sheet_checksum: self.sheet_checksum.clone(),
            idle_policy: idle_policy.to_owned(),
            currency: currency.to_owned(),
            line_no: u16::try_from(line_no).unwrap_or(u16::MAX),
            kind: line.kind.as_str().to_owned(),
            resource: line.resource.clone(),
            price_version: line
                .price_version
                .map(|version| version.to_rfc3339())
                .unwrap_or_default(),
            quantity: to_column(line.quantity)?,
            quantity_base: line.quantity_base.clone().unwrap_or_default(),
            unit: line.unit.clone(),
            unit_price: to_column(line.unit_price)?,
            amount: to_column(line.amount)?,
            rated_at,
        })
    }

    /// Compares the new bill with the stored snapshot of another sheet version,
    /// line by line, into one readable sentence.
    #[allow(clippy::too_many_arguments)]
    async fn explain_change(
        &self,
        customer: &CustomerId,
        old_checksum: &str,
        old_total: Decimal,
        bill: &CustomerBill,
        period_start: u32,
        as_of: u32,
        detected_at: u32,
    ) -> Result<RatingChangeRow> {
        let old_lines = self
            .store
            .rated_lines(customer, period_start, old_checksum, as_of)
            .await?;
        let mut differences = Vec::new();
        for line in &bill.lines {
            let old = old_lines
                .iter()
                .find(|old| old.resource == line.resource && old.kind == line.kind.as_str());
            let mut old_amount = match old {
                Some(old) => idlemeter_store::from_column(old.amount)?,
                None => Decimal::ZERO,
            };
            // Stored amounts carry the column's 12 places; both are whole
            // minor units, so showing the old one at the new one's scale is exact.
            old_amount.rescale(line.amount.scale());
            if old_amount != line.amount {
                differences.push(format!(
                    "{} {}: {} -> {} (unit price {})",
                    line.kind.as_str(),
                    line.resource,
                    old_amount,
                    line.amount,
                    line.unit_price
                ));
            }
        }
        for old in &old_lines {
            if !bill
                .lines
                .iter()
                .any(|line| line.resource == old.resource && line.kind.as_str() == old.kind)
            {
                let old_amount = idlemeter_store::from_column(old.amount)?.normalize();
                differences.push(format!(
                    "{} {}: {} -> gone",
                    old.kind, old.resource, old_amount
                ));
            }
        }
        let explanation = if differences.is_empty() {
            format!(
                "sheet {} changed ({} -> {}) without changing this bill",
                self.sheet_label,
                short(old_checksum),
                short(&self.sheet_checksum)
            )
        } else {
            format!(
                "sheet {} changed ({} -> {}): {}",
                self.sheet_label,
                short(old_checksum),
                short(&self.sheet_checksum),
                differences.join("; ")
            )
        };
        Ok(RatingChangeRow {
            customer: customer.to_string(),
            period_start,
            as_of,
            sheet: self.sheet_label.clone(),
            old_checksum: old_checksum.to_owned(),
            new_checksum: self.sheet_checksum.clone(),
            old_total: to_column(old_total)?,
            new_total: to_column(bill.total)?,
            explanation,
            detected_at,
        })
    }

    /// Rates closed hours every `interval_seconds` until `shutdown`.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut ticker =
            tokio::time::interval(Duration::from_secs(self.config.interval_seconds.max(1)));
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = &mut shutdown => return Ok(()),
            }
            match self.rate_closed_hours(Utc::now()).await {
                Ok(pass) if pass.snapshots_written > 0 => {
                    tracing::info!(?pass, "rated closed hours")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "rating pass failed; retrying next tick"),
            }
        }
    }
}

fn short(checksum: &str) -> &str {
    checksum.get(..12).unwrap_or(checksum)
}

fn unix_ms(time: DateTime<Utc>) -> u64 {
    u64::try_from(time.timestamp_millis()).unwrap_or(0)
}

fn unix_secs(time: DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rater() -> Rater {
        let store = Store::new(&idlemeter_store::ClickHouseSettings {
            url: "http://127.0.0.1:9".to_owned(),
            database: "unused".to_owned(),
            user: "default".to_owned(),
            password: String::new(),
        });
        let sheet = include_str!("../../../prices/sprites.toml");
        Rater::new(
            store,
            sheet,
            RaterConfig::default(),
            &prometheus::Registry::new(),
        )
        .expect("the shipped sheet loads")
    }

    #[test]
    fn an_idle_policy_changes_the_classification_and_the_checksum() {
        let plain = rater();
        assert_eq!(plain.idle.version(), "session-or-connection/v1");
        let policy = include_str!("../../../policies/sprites.toml");
        let with_policy = rater().with_idle_policy(policy).expect("policy loads");
        assert_eq!(with_policy.idle.version(), "sprites/2026-11-01");
        assert_ne!(plain.sheet_checksum(), with_policy.sheet_checksum());
        let error = rater()
            .with_idle_policy("[policy]\nname = \"x\"\n")
            .expect_err("a policy without a version is refused");
        assert!(error.to_string().contains("version"), "{error}");
    }
}
