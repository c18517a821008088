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
//! Cost: each hour's snapshot continues the carried rating state of the
//! hour before ([`RatingState`], stored in `rating_state`), so a pass reads
//! and rates only that hour's samples: the 720th hour of a month costs what
//! the first did. A restarted rater, or another replica, resumes from the
//! newest stored state; a changed sheet or policy (a new checksum) finds
//! none and rates the period from its first sample.
//!
//! Live cost: every `live_interval_seconds` the rater advances a copy of
//! each customer's state with the samples since its last look and writes
//! the provisional period-to-date bill to `live_usage`; `/cost`, spend
//! alerts and budget caps read the newer of that and the last final
//! snapshot, so they act within seconds of the spend.
//!
//! A customer whose rating fails (an amount too large to compute, metered
//! usage that does not add up) is logged, counted and written to
//! `rating_errors`; every other customer is rated as usual. Samples rating
//! refuses are written there too, by sandbox, epoch and seq. A stored state
//! that does not load is a cache miss: the period is rated from its start.
//!
//! Files: `closed.rs` (closed hours and late re-rating), `live.rs` (the open
//! hour), `config.rs`, `metrics.rs`; here the rater itself and what both
//! paths share.

mod closed;
mod config;
mod live;
mod metrics;

use closed::FinalState;
pub use closed::RatingPass;
pub use config::{LiveSource, RaterConfig};
pub use live::LivePass;
use live::LiveState;
use metrics::RaterMetrics;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use idlemeter_bus::CustomerShares;
use idlemeter_core::events::Meters;
use idlemeter_core::invoice::CustomerBill;
use idlemeter_core::metering::{Metered, PricedMeters};
use idlemeter_core::policy::{IdleRule, Policy, PolicyIdle};
use idlemeter_core::{
    floor_hour, report_usage, Account, BillingOptions, BillingTerms, CustomerId, LineError,
    NumberedSample, PriceSheet, RateReport, RatingState, UsageSample,
};
use idlemeter_store::{
    ratings_checksum, to_column, unix_ms, unix_seconds, AccountReader, Accounts, Currencies,
    CurrencyLane, MeteredRange, RatedLineRow, RatingChangeRow, RatingErrorRow, RatingStateRow,
    Store,
};
use rust_decimal::Decimal;
use serde::Deserialize;

pub use idlemeter_core::Period;

/// Errors of the rater, with the sheet or customer they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sheet(#[from] idlemeter_core::Error),
    #[error(transparent)]
    Store(#[from] idlemeter_store::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Terms(#[from] idlemeter_core::TermsError),
    /// An amount that cannot be stored exactly: this customer's problem,
    /// not the store's.
    #[error("{0}")]
    Amount(String),
    /// The sheet prices a meter the meters file does not define.
    #[error("{0}")]
    Meters(String),
    /// A sheet given the lane of another currency.
    #[error("{0}")]
    Lane(String),
    /// A customer's metered usage that cannot be billed (an aggregate
    /// below zero): this customer's problem.
    #[error("customer {customer}: {reason}")]
    Metered { customer: String, reason: String },
}

/// A decimal as its column, a refusal being the customer's problem.
fn column(value: Decimal) -> Result<i128> {
    to_column(value).map_err(|error| Error::Amount(error.to_string()))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Samples for live rating, as the stream delivers them.
pub type LiveFeed = tokio::sync::mpsc::Receiver<Vec<UsageSample>>;

/// The rater with its sheet loaded.
#[derive(Debug)]
pub struct Rater {
    store: Store,
    sheet: PriceSheet,
    sheet_label: String,
    sheet_checksum: String,
    config: RaterConfig,
    terms: BillingTerms,
    idle: IdleRule,
    /// The meters the sheet prices (none unless [`Self::with_meters`]).
    meters: PricedMeters,
    metrics: RaterMetrics,
    /// The state of each customer's newest final hour.
    finals: Mutex<HashMap<CustomerId, FinalState>>,
    /// Each customer's live state, ahead of its final one.
    live: Mutex<HashMap<CustomerId, LiveState>>,
    /// New samples from the stream, when live rating reads it.
    feed: Option<LiveFeed>,
    /// The closed hour older periods were last looked at for late samples.
    lookback_checked: Mutex<Option<DateTime<Utc>>>,
    /// The customers this sheet rates, when one rater runs per currency
    /// (see [`Self::with_lane`]), and their currencies as last read.
    lane: Option<(CurrencyLane, LaneCache)>,
    /// This replica's share of the customers (all of them unless
    /// [`Self::with_shares`]), and the share's generation the caches above
    /// were built under.
    shares: CustomerShares,
    shares_seen: Mutex<u64>,
}

/// Customers' currencies as last read, and when.
type LaneCache = Mutex<Option<(std::time::Instant, Arc<Currencies>)>>;

/// How long the live path trusts customers' currencies before reading them
/// again (the hourly pass reads them every time).
const LANE_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

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
        let sheet_checksum = ratings_checksum(sheet_text, None);
        let metrics = RaterMetrics::new(registry, sheet.currency.code())?;
        Ok(Self {
            store,
            sheet,
            sheet_label: config.sheet.clone(),
            sheet_checksum,
            config,
            terms: BillingTerms::default(),
            idle: IdleRule::SessionOrConnection,
            meters: PricedMeters::default(),
            metrics,
            finals: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            feed: None,
            lookback_checked: Mutex::new(None),
            lane: None,
            shares: CustomerShares::all(),
            shares_seen: Mutex::new(0),
        })
    }

    /// Rates only the customers of the shards this replica holds (see
    /// [`idlemeter_bus::shares`]): two or more raters then divide the
    /// customers, each rated by one of them, and a dead replica's customers
    /// are rated by the one that takes its shards.
    pub fn with_shares(mut self, shares: CustomerShares) -> Self {
        self.shares = shares;
        self
    }

    /// Customers came or went since the last pass: forget the caches kept
    /// for them (another replica may have rated them meanwhile) and look at
    /// older periods again for the newcomers.
    fn follow_shares(&self) {
        let generation = self.shares.generation();
        let mut seen = self.shares_seen.lock().expect("not poisoned");
        if *seen != generation {
            *seen = generation;
            self.finals.lock().expect("not poisoned").clear();
            self.live.lock().expect("not poisoned").clear();
            *self.lookback_checked.lock().expect("not poisoned") = None;
            tracing::info!(shards = ?self.shares.held(), "customer shards changed");
        }
    }

    /// Rates only the customers of `lane`: those billed in this sheet's
    /// currency (and, for the primary sheet, those without a record). A
    /// deployment with a sheet per currency runs one rater per sheet.
    pub fn with_lane(mut self, lane: CurrencyLane) -> Result<Self> {
        if lane.currency != self.sheet.currency.code() {
            return Err(Error::Lane(format!(
                "sheet {} prices in {}, not in its lane's {}",
                self.sheet_label,
                self.sheet.currency.code(),
                lane.currency
            )));
        }
        self.lane = Some((lane, Mutex::new(None)));
        Ok(self)
    }

    /// Keeps the customers this rater rates: those of its shards (all
    /// without shares) and of its lane (all without one).
    async fn keep_mine<T>(
        &self,
        items: &mut Vec<T>,
        customer: impl Fn(&T) -> &str,
        max_age: std::time::Duration,
    ) -> Result<()> {
        items.retain(|item| self.shares.owns(customer(item)));
        let Some((lane, cache)) = &self.lane else {
            return Ok(());
        };
        let cached = cache
            .lock()
            .expect("not poisoned")
            .as_ref()
            .filter(|(read, _)| read.elapsed() < max_age)
            .map(|(_, currencies)| Arc::clone(currencies));
        let currencies = match cached {
            Some(currencies) => currencies,
            None => {
                let read = Arc::new(self.store.customer_currencies(&self.terms.issuer).await?);
                *cache.lock().expect("not poisoned") =
                    Some((std::time::Instant::now(), Arc::clone(&read)));
                read
            }
        };
        items.retain(|item| lane.admits(customer(item), &currencies));
        Ok(())
    }

    /// Classifies idle seconds with `policy_text` (the file named by
    /// `config.idle_policy`) instead of the session-or-connection rule. The
    /// policy's text joins the sheet's in the snapshot checksum, so changing
    /// the policy re-rates like changing the sheet.
    pub fn with_idle_policy(mut self, policy_text: &str) -> Result<Self> {
        let policy = Policy::from_toml(policy_text, &self.config.idle_policy)
            .map_err(|error| Error::Sheet(error.into()))?;
        self.sheet_checksum = idlemeter_store::with_policy(&self.sheet_checksum, policy_text);
        self.idle = IdleRule::Policy(Box::new(PolicyIdle::new(policy)));
        Ok(self)
    }

    /// Bills the meters the sheet prices with their definitions in
    /// `meters` (`[events] meters`); fails naming a priced meter it lacks.
    /// A meter's quantity is aggregated again from the period's start for
    /// every figure (see `idlemeter_core::metering`), so it is not part of
    /// the carried state, and the sheet checksum does not cover it.
    pub fn with_meters(mut self, meters: &Meters) -> Result<Self> {
        self.meters = PricedMeters::new(&self.sheet, meters).map_err(Error::Meters)?;
        Ok(self)
    }

    /// Rates the open hour from `feed` (the samples topic, see
    /// [`feed_from_kafka`]) instead of polling the store.
    pub fn with_live_feed(mut self, feed: LiveFeed) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Bills under `terms` (issuer, period, tax rates, lookback): the
    /// terms the invoicer and the API are given, so that every figure is
    /// the invoice's.
    pub fn with_terms(mut self, terms: BillingTerms) -> Result<Self> {
        self.terms = terms;
        Ok(self)
    }

    pub fn sheet_checksum(&self) -> &str {
        &self.sheet_checksum
    }

    /// The currency of this rater's sheet.
    pub fn currency(&self) -> &str {
        self.sheet.currency.code()
    }

    fn period(&self) -> Period {
        self.terms.period
    }

    fn account_reader(&self) -> AccountReader<'_> {
        AccountReader {
            store: &self.store,
            terms: &self.terms,
            tax_rates: self.terms.tax_rates.rates(),
            sheet: &self.sheet,
            sheet_checksum: &self.sheet_checksum,
            adjusted: None,
        }
    }

    /// One customer's account and metered usage of its period up to `at`.
    async fn account_and_metered(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<(Account, MeteredRange)> {
        let id = customer.as_str();
        let (accounts, metered) = self
            .accounts_and_metered((id, id), period_start, at)
            .await?;
        Ok((accounts.account(customer), metered))
    }

    /// The accounts and metered usage of the customers `first..=last` for
    /// their period up to `at`.
    async fn accounts_and_metered(
        &self,
        (first, last): (&str, &str),
        period_start: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<(Accounts, MeteredRange)> {
        let accounts = self
            .account_reader()
            .read(first, last, period_start, at)
            .await?;
        let metered = self.metered_range((first, last), period_start, at).await?;
        Ok((accounts, metered))
    }

    /// The metered quantities of the customers `first..=last` over
    /// `[period_start, until)`; nothing when the sheet prices no meter.
    async fn metered_range(
        &self,
        customers: (&str, &str),
        period_start: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<MeteredRange> {
        let range = (unix_ms(period_start), unix_ms(until));
        Ok(self
            .store
            .metered(&self.sheet, &self.meters, customers, range.0, range.1)
            .await?)
    }

    /// A customer's samples closing intervals in `[from_ms, to_ms)`, with
    /// each series' baseline, numbered by position.
    async fn read_samples(
        &self,
        customer: &CustomerId,
        from_ms: u64,
        to_ms: u64,
        read: &mut usize,
    ) -> Result<Vec<NumberedSample>> {
        let samples = NumberedSample::numbered(
            self.store
                .samples_for_rating(customer, from_ms, to_ms)
                .await?,
        );
        *read += samples.len();
        self.metrics.samples_read.inc_by(samples.len() as u64);
        Ok(samples)
    }

    /// The bill of what `state` rated so far for `customer` with their
    /// account, and the quantities it bills (`CustomerUsage::to_text`).
    fn report(
        &self,
        customer: &CustomerId,
        state: &RatingState,
        account: &Account,
        metered: &[Metered],
    ) -> Result<(RateReport, String)> {
        let mut usage = state.usage(&self.sheet, &self.idle);
        // A customer with nothing rated yet still has fees and adjustments.
        if !usage
            .customers
            .iter()
            .any(|rated| &rated.customer == customer)
        {
            usage
                .customers
                .push(idlemeter_core::rating::CustomerUsage::nothing(
                    customer.clone(),
                    &self.sheet,
                ));
        }
        if let Some(rated) = usage
            .customers
            .iter_mut()
            .find(|rated| &rated.customer == customer)
        {
            self.meters.apply(&self.sheet, rated, metered);
        }
        let text = usage
            .customers
            .iter()
            .find(|rated| &rated.customer == customer)
            .map(|rated| rated.to_text())
            .unwrap_or_default();
        let options = BillingOptions {
            accounts: [(customer.clone(), account.clone())].into_iter().collect(),
        };
        Ok((
            report_usage(&self.sheet, usage, &options, Vec::new())?,
            text,
        ))
    }

    /// Logs, counts and stores the samples rating refused.
    async fn report_refused(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        samples: &[NumberedSample],
        errors: &[LineError],
        now: DateTime<Utc>,
    ) -> Result<()> {
        if errors.is_empty() {
            return Ok(());
        }
        tracing::warn!(%customer, refused = errors.len(), first = ?errors.first(), "samples refused while rating");
        self.metrics.samples_refused.inc_by(errors.len() as u64);
        let rows: Vec<RatingErrorRow> = errors
            .iter()
            .map(|error| {
                let sample = usize::try_from(error.line)
                    .ok()
                    .and_then(|line| line.checked_sub(1))
                    .and_then(|index| samples.get(index))
                    .map(|numbered| &numbered.sample);
                RatingErrorRow {
                    customer: customer.to_string(),
                    sandbox: sample.map(|s| s.sandbox.to_string()).unwrap_or_default(),
                    epoch: sample.map_or(0, |s| s.epoch.0),
                    seq: sample.map_or(0, |s| s.seq),
                    field: error.field.clone(),
                    reason: error.reason.clone(),
                    period_start: unix_seconds(period_start),
                    sheet_checksum: self.sheet_checksum.clone(),
                    detected_at: unix_seconds(now),
                }
            })
            .collect();
        self.store.insert_rating_errors(&rows).await?;
        Ok(())
    }

    /// A customer whose rating failed: logged, counted and stored, so that
    /// the pass goes on with everyone else.
    async fn customer_failed(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        error: &Error,
    ) {
        tracing::error!(%customer, %error, "rating this customer failed; rating the others");
        self.metrics.customers_failed.inc();
        let row = RatingErrorRow {
            customer: customer.to_string(),
            sandbox: String::new(),
            epoch: 0,
            seq: 0,
            field: "customer".to_owned(),
            reason: error.to_string(),
            period_start: unix_seconds(period_start),
            sheet_checksum: self.sheet_checksum.clone(),
            detected_at: unix_seconds(now),
        };
        if let Err(store_error) = self.store.insert_rating_errors(&[row]).await {
            tracing::warn!(%customer, %store_error, "could not store the rating error");
        }
    }

    /// The stored rows of one customer's bill in `report`, line by line.
    fn bill_rows(
        &self,
        report: &RateReport,
        bill: &CustomerBill,
        period_start: u32,
        as_of: u32,
        rated_at: u32,
    ) -> Result<Vec<RatedLineRow>> {
        bill.lines
            .iter()
            .enumerate()
            .map(|(line_no, line)| {
                Ok(RatedLineRow {
                    customer: bill.customer.to_string(),
                    period_start,
                    as_of,
                    sheet: self.sheet_label.clone(),
                    sheet_checksum: self.sheet_checksum.clone(),
                    idle_policy: report.idle_policy.clone(),
                    currency: report.currency.clone(),
                    line_no: u16::try_from(line_no).unwrap_or(u16::MAX),
                    kind: line.kind.as_str().to_owned(),
                    resource: line.resource.clone(),
                    price_version: line
                        .price_version
                        .map(|version| version.to_rfc3339())
                        .unwrap_or_default(),
                    quantity: column(line.quantity)?,
                    quantity_base: line.quantity_base.clone().unwrap_or_default(),
                    unit: line.unit.clone(),
                    unit_price: column(line.unit_price)?,
                    amount: column(line.amount)?,
                    rated_at,
                })
            })
            .collect()
    }

    /// Rates closed hours every `interval_seconds` and the open hour every
    /// `live_interval_seconds` until `shutdown`.
    pub async fn run_until_stopped(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut ticker =
            tokio::time::interval(Duration::from_secs(self.config.interval_seconds.max(1)));
        let live_every = self.config.live_interval_seconds;
        let mut live_ticker = tokio::time::interval(Duration::from_secs(live_every.max(1)));
        live_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut feed = self.feed.take();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    match self.rate_closed_hours(Utc::now()).await {
                        Ok(pass) if pass.snapshots_written > 0 || pass.customers_failed > 0 => {
                            tracing::info!(?pass, "rated closed hours")
                        }
                        Ok(_) => {}
                        Err(error) => {
                            self.metrics.passes_failed.inc();
                            tracing::warn!(%error, "rating pass failed; retrying next tick")
                        }
                    }
                }
                _ = live_ticker.tick(), if live_every > 0 => {
                    let live_started = std::time::Instant::now();
                    let result = match feed.as_mut() {
                        Some(feed) => {
                            let mut samples = Vec::new();
                            while let Ok(batch) = feed.try_recv() {
                                samples.extend(batch);
                            }
                            self.rate_live_samples(Utc::now(), samples).await
                        }
                        None => self.rate_live(Utc::now()).await,
                    };
                    match result {
                        Ok(pass) => tracing::debug!(?pass, elapsed_ms = live_started.elapsed().as_millis() as u64, "rated the open hour"),
                        Err(error) => {
                            self.metrics.passes_failed.inc();
                            tracing::warn!(%error, "live rating pass failed; retrying next tick")
                        }
                    }
                }
                _ = &mut shutdown => return Ok(()),
            }
        }
    }
}

/// Feeds live rating from the samples topic: every batch from `consumer`
/// (a [`idlemeter_bus::KafkaSettings::tail_consumer`] subscribed to it),
/// decoded, into `sender`, until the receiver goes. A batch that does not
/// decode is skipped here (ingest dead-letters it; it is never billed).
pub async fn feed_from_kafka(
    consumer: idlemeter_bus::GroupConsumer,
    sender: tokio::sync::mpsc::Sender<Vec<UsageSample>>,
) {
    use rdkafka::Message;
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "live feed: reading the samples topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Ok(batch) = idlemeter_proto::decode_node_batch(message.payload().unwrap_or_default())
        else {
            continue;
        };
        if sender.send(batch.samples).await.is_err() {
            return;
        }
    }
}

/// Samples numbered by position from 1, the line numbers rating reports.
fn short(checksum: &str) -> &str {
    checksum.get(..12).unwrap_or(checksum)
}

/// Orders two writes of the same state (not a time anything is billed at).
fn wall_clock_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// `customer`'s bill in `report`, if it has one.
fn bill_of<'a>(report: &'a RateReport, customer: &CustomerId) -> Option<&'a CustomerBill> {
    report
        .customers
        .iter()
        .find(|bill| &bill.customer == customer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use idlemeter_core::IdlePolicy;

    fn rater() -> Rater {
        let store = Store::new(&idlemeter_store::ClickHouseSettings {
            url: "http://127.0.0.1:9".to_owned(),
            database: "unused".to_owned(),
            user: "default".to_owned(),
            password: Default::default(),
            cluster: None,
            max_replica_delay_s: idlemeter_store::DEFAULT_MAX_REPLICA_DELAY_S,
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
        assert_eq!(plain.idle.version(), "session-or-connection/v2");
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
