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
//! A customer whose rating fails (an amount too large to compute, a stored
//! state that does not load) is logged, counted and written to
//! `rating_errors`; every other customer is rated as usual. Samples rating
//! refuses are written there too, by sandbox, epoch and seq.

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
    ratings_checksum, to_column, unix_ms, unix_seconds, AccountReader, Accounts, Counted,
    Currencies, CurrencyLane, MeteredRange, RatedLineRow, RatingChangeRow, RatingErrorRow,
    RatingStateRow, Store,
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

/// Samples for live rating, as the stream delivers them.
pub type LiveFeed = tokio::sync::mpsc::Receiver<Vec<UsageSample>>;

/// What one pass rated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RatingPass {
    pub snapshots_written: usize,
    /// Snapshots found already written (a customer rated through the newest
    /// closed hour counts once, whatever its hours).
    pub snapshots_present: usize,
    pub changes_recorded: usize,
    pub samples_refused: usize,
    /// Customers whose rating failed (reported in `rating_errors`).
    pub customers_failed: usize,
    /// Finished periods re-rated because samples arrived after their last
    /// hour was rated.
    pub periods_rerated: usize,
    /// Samples read from the store by this pass.
    pub samples_read: usize,
}

/// What one live pass rated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LivePass {
    pub customers_rated: usize,
    pub customers_failed: usize,
    pub samples_read: usize,
}

/// A customer's state ahead of the last final hour: the live figure's.
#[derive(Debug, Clone)]
struct LiveState {
    period_start: DateTime<Utc>,
    state: RatingState,
    /// Newest sample time rated, Unix ms.
    newest_ms: u64,
    /// The account the live figure bills with, and when it was read (`None`:
    /// to be read before the next figure).
    account: Account,
    account_read: Option<std::time::Instant>,
    /// Metered quantities of the period, read with the account.
    metered: Vec<Metered>,
}

/// A customer's metered quantities for a live figure: a refusal is logged
/// and leaves them out (the hourly pass records it against the customer).
fn live_metered(range: &MeteredRange, customer: &CustomerId) -> Vec<Metered> {
    match range.of(customer.as_str()) {
        Ok(metered) => metered.to_vec(),
        Err(reason) => {
            tracing::warn!(%customer, %reason, "metered usage left out of the live figure");
            Vec::new()
        }
    }
}

/// A customer's state at its newest final hour: (period start, as_of, state).
/// A customer's newest final state, kept so the next hour need not read it
/// back.
#[derive(Debug, Clone)]
struct FinalState {
    period_start: DateTime<Utc>,
    /// The end of the hour it rates through.
    as_of: DateTime<Utc>,
    state: RatingState,
    /// How many of the period's samples it has rated (see [`Rated`]).
    samples: u64,
}

/// A state to go on rating from: what it covers and how much of it.
#[derive(Debug)]
struct Rated {
    state: RatingState,
    /// The time (Unix ms) its samples run to.
    until_ms: u64,
    /// How many distinct samples of the period (taken from its start up to
    /// `until_ms`) it has rated: each read's samples in its own range,
    /// added up hour after hour. Stored with every state; the period-end
    /// state's figure is compared with the period's stored samples, and a
    /// difference (samples that arrived after their hour was rated, or a
    /// read that came from a replica still catching up) re-rates the
    /// period (`Rater::rerate_late`).
    samples: u64,
}

impl FinalState {
    fn of(period_start: DateTime<Utc>, as_of: DateTime<Utc>, rated: Rated) -> Self {
        Self {
            period_start,
            as_of,
            state: rated.state,
            samples: rated.samples,
        }
    }
}

/// How many of `samples` (a read of `[from_ms, ..)` with its baselines)
/// were taken in the read's own range: what the read adds to a state's
/// count.
fn in_range(samples: &[NumberedSample], from_ms: u64) -> u64 {
    samples
        .iter()
        .filter(|numbered| {
            u64::try_from(numbered.sample.ts.timestamp_millis()).is_ok_and(|ts| ts >= from_ms)
        })
        .count() as u64
}

/// Rater metrics.
#[derive(Debug, Clone)]
struct RaterMetrics {
    snapshots_written: prometheus::IntCounter,
    live_figures_written: prometheus::IntCounter,
    customers_failed: prometheus::IntCounter,
    samples_refused: prometheus::IntCounter,
    samples_read: prometheus::IntCounter,
    passes_failed: prometheus::IntCounter,
}

impl RaterMetrics {
    /// Registers the rater's counters labelled with its sheet's currency
    /// (one rater runs per currency's sheet).
    fn new(registry: &prometheus::Registry, currency: &str) -> Result<Self> {
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

/// The rater with its sheet loaded.
#[derive(Debug)]
pub struct Rater {
    store: Store,
    sheet: PriceSheet,
    sheet_label: String,
    sheet_checksum: String,
    config: RaterConfig,
    terms: BillingTerms,
    tax_rates: std::collections::BTreeMap<CustomerId, Decimal>,
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
            tax_rates: std::collections::BTreeMap::new(),
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
        self.tax_rates = terms.tax_rates.rates().clone();
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
            tax_rates: &self.tax_rates,
            sheet: &self.sheet,
            sheet_checksum: &self.sheet_checksum,
            adjusted: None,
        }
    }

    /// Rates every closed hour of the current period (and the previous one, so
    /// a period's last hours are rated after a restart across its end) in
    /// which a customer has samples, and the newest closed hour, that has no
    /// snapshot under this sheet yet; then re-rates finished periods that
    /// received samples since their last hour was rated. Idempotent: a second
    /// call with the same `now` writes nothing.
    pub async fn rate_closed_hours(&self, now: DateTime<Utc>) -> Result<RatingPass> {
        self.follow_shares();
        let closed_until =
            floor_hour(now - chrono::Duration::seconds(self.config.grace_seconds as i64));
        let last_hour_start = closed_until - chrono::Duration::hours(1);
        let current = self.period().start_of(last_hour_start);
        let previous = self.period().previous(current);
        let mut pass = RatingPass::default();
        for period_start in [previous, current] {
            let full_end = self.period().next(period_start);
            let period_end = full_end.min(closed_until);
            let customers = self
                .my_customers_with_usage(period_start, period_end, true)
                .await?;
            for (customer, _, _) in &customers {
                // One query for what this sheet already rated, not one per hour.
                let rated = self
                    .store
                    .rated_hours(customer, unix_seconds(period_start), &self.sheet_checksum)
                    .await?;
                if rated.contains(&unix_seconds(period_end)) {
                    // Rated through the newest closed hour: nothing is due
                    // (late samples of a finished period: `rerate_late`).
                    pass.snapshots_present += 1;
                    continue;
                }
                // Only hours in which samples close intervals can differ from
                // the hour before (a quiet hour's snapshot would repeat it;
                // readers take the newest snapshot at or before a time), and
                // the newest closed hour, so that the state reaches it.
                let mut due: BTreeSet<DateTime<Utc>> = self
                    .store
                    .sample_hours(customer, unix_ms(period_start), unix_ms(period_end))
                    .await?
                    .into_iter()
                    .filter_map(|hour| DateTime::from_timestamp(i64::from(hour) + 3600, 0))
                    .filter(|as_of| *as_of <= period_end)
                    .collect();
                due.insert(period_end);
                for as_of in due {
                    if rated.contains(&unix_seconds(as_of)) {
                        pass.snapshots_present += 1;
                    } else if let Err(error) = self
                        .rate_snapshot(customer, (period_start, as_of), now, &mut pass)
                        .await
                    {
                        // The store failing is everyone's problem: retry the
                        // pass. Anything else is this customer's.
                        if matches!(error, Error::Store(_)) {
                            return Err(error);
                        }
                        self.customer_failed(customer, period_start, now, &error)
                            .await;
                        pass.customers_failed += 1;
                        break;
                    }
                }
            }
            if period_end == full_end {
                self.rerate_late(period_start, &customers, now, &mut pass)
                    .await?;
            }
        }
        // Periods before the previous one that an invoice may still adjust:
        // looked at once per closed hour.
        let look_back = {
            let mut last = self.lookback_checked.lock().expect("not poisoned");
            let due = *last != Some(closed_until);
            *last = Some(closed_until);
            due
        };
        if look_back {
            let mut period_start = previous;
            for _ in 1..self.terms.adjust_lookback_periods {
                period_start = self.period().previous(period_start);
                let customers = self
                    .my_customers_with_usage(period_start, self.period().next(period_start), false)
                    .await?;
                self.rerate_late(period_start, &customers, now, &mut pass)
                    .await?;
            }
        }
        Ok(pass)
    }

    /// Re-rates, from its samples, the finished period of every customer
    /// whose period-end state did not rate every sample stored for the
    /// period: samples that arrived after their hour was rated, or a read
    /// served by a replica still catching up. The new period-end state is
    /// what the close bills, or, after the close, what the next invoice
    /// adjusts for. `customers` carries each one's stored row count
    /// (duplicates not yet merged included): when it equals the state's
    /// count nothing is due; otherwise the distinct samples decide, so
    /// duplicates awaiting a merge never re-rate a period.
    async fn rerate_late(
        &self,
        period_start: DateTime<Utc>,
        customers: &[(CustomerId, u64, u64)],
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        if customers.is_empty() {
            return Ok(());
        }
        let end = self.period().next(period_start);
        // States older than migration 0011 (no closed quantities) are left
        // alone: their periods were invoiced from samples, and re-rating them
        // now would start adjusting invoices an older release issued.
        let rated: HashMap<String, (u32, u64)> = self
            .store
            .rated_quantities(
                "",
                "\u{10ffff}",
                unix_seconds(period_start),
                &self.sheet_checksum,
            )
            .await?
            .into_iter()
            .filter(|row| !row.usage.is_empty())
            .map(|row| (row.customer, (row.as_of, row.samples)))
            .collect();
        for (customer, _, count) in customers {
            let Some(&(as_of, rated)) = rated.get(customer.as_str()) else {
                continue;
            };
            if as_of != unix_seconds(end) || rated == *count {
                continue;
            }
            let stored = self
                .store
                .sample_counts(
                    Counted::Distinct,
                    (customer.as_str(), customer.as_str()),
                    unix_ms(period_start),
                    unix_ms(end),
                )
                .await?
                .get(customer.as_str())
                .copied()
                .unwrap_or(0);
            if stored == rated {
                continue;
            }
            tracing::info!(%customer, period = %period_start, rated, stored, "samples the period-end state did not rate: re-rating the period");
            match self.rerate_period(customer, period_start, now, pass).await {
                Ok(()) => pass.periods_rerated += 1,
                Err(Error::Store(error)) => return Err(Error::Store(error)),
                Err(error) => {
                    self.customer_failed(customer, period_start, now, &error)
                        .await;
                    pass.customers_failed += 1;
                }
            }
        }
        Ok(())
    }

    /// The period-end state of a finished period, rated again from its
    /// first sample (see [`Self::rerate_late`]).
    async fn rerate_period(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        let end = self.period().next(period_start);
        let mut state = RatingState::new(&self.sheet);
        let samples = self
            .read_samples(
                customer,
                unix_ms(period_start),
                unix_ms(end),
                &mut pass.samples_read,
            )
            .await?;
        let errors = state.advance(&self.sheet, &samples, &self.idle);
        self.report_refused(customer, period_start, &samples, &errors, now)
            .await?;
        let rated = Rated {
            state,
            until_ms: unix_ms(end),
            samples: in_range(&samples, unix_ms(period_start)),
        };
        let report = self
            .store_state(customer, (period_start, end), &rated, now)
            .await?;
        self.rewrite_lines(customer, &report, (period_start, end), now)
            .await?;
        let mut finals = self.finals.lock().expect("not poisoned");
        if finals
            .get(customer)
            .is_some_and(|last| last.period_start == period_start)
        {
            finals.insert(customer.clone(), FinalState::of(period_start, end, rated));
        }
        Ok(())
    }

    /// Writes the snapshot at `as_of` again from a re-rated `report`, so
    /// that what the API, spend alerts and dashboards read for the period
    /// is the figure its close bills. A line the new bill no longer has is
    /// written again at zero: the table keeps the newest row per line
    /// number, and the old one must not count.
    async fn rewrite_lines(
        &self,
        customer: &CustomerId,
        report: &RateReport,
        (period_start, as_of): (DateTime<Utc>, DateTime<Utc>),
        now: DateTime<Utc>,
    ) -> Result<()> {
        let Some(bill) = bill_of(report, customer) else {
            return Ok(());
        };
        let (period_secs, as_of_secs, rated_at) = (
            unix_seconds(period_start),
            unix_seconds(as_of),
            unix_seconds(now),
        );
        let mut rows = self.bill_rows(report, bill, period_secs, as_of_secs, rated_at)?;
        let old = self
            .store
            .rated_lines(customer, period_secs, &self.sheet_checksum, as_of_secs)
            .await?;
        let kept = rows.len();
        for mut gone in old
            .into_iter()
            .filter(|row| usize::from(row.line_no) >= kept)
        {
            gone.quantity = 0;
            gone.amount = 0;
            gone.rated_at = rated_at;
            rows.push(gone);
        }
        self.store.insert_rated_lines(&rows).await?;
        Ok(())
    }

    /// Rates one customer's hour ending `as_of` of the period starting
    /// `period_start`.
    async fn rate_snapshot(
        &self,
        customer: &CustomerId,
        (period_start, as_of): (DateTime<Utc>, DateTime<Utc>),
        now: DateTime<Utc>,
        pass: &mut RatingPass,
    ) -> Result<()> {
        let (period_secs, as_of_secs) = (unix_seconds(period_start), unix_seconds(as_of));
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
        // The newest state at or before this hour: usually the hour before;
        // this hour's own when a pass stored it and died before the lines
        // (it then rates nothing more); an older one after a gap.
        let mut rated = self.resume(customer, period_start, as_of).await?;
        let samples = self
            .read_samples(
                customer,
                rated.until_ms,
                unix_ms(as_of),
                &mut pass.samples_read,
            )
            .await?;
        let errors = rated.state.advance(&self.sheet, &samples, &self.idle);
        self.report_refused(customer, period_start, &samples, &errors, now)
            .await?;
        pass.samples_refused += errors.len();
        rated.samples += in_range(&samples, rated.until_ms);
        rated.until_ms = unix_ms(as_of);
        // The state first: a state without lines is found by the next pass,
        // which writes the lines from it.
        let report = self
            .store_state(customer, (period_start, as_of), &rated, now)
            .await?;
        self.finals
            .lock()
            .expect("not poisoned")
            .insert(customer.clone(), FinalState::of(period_start, as_of, rated));
        let Some(bill) = bill_of(&report, customer) else {
            return Ok(());
        };
        let rated_at = unix_seconds(now);
        let rows = self.bill_rows(&report, bill, period_secs, as_of_secs, rated_at)?;
        self.store.insert_rated_lines(&rows).await?;
        self.metrics.snapshots_written.inc();
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

    /// Bills a rated state with the customer's account as at `as_of` and
    /// stores it (with its closed quantities and the count of samples it
    /// rated); returns the bill.
    async fn store_state(
        &self,
        customer: &CustomerId,
        (period_start, as_of): (DateTime<Utc>, DateTime<Utc>),
        rated: &Rated,
        now: DateTime<Utc>,
    ) -> Result<RateReport> {
        let state = &rated.state;
        let (account, metered) = self
            .account_and_metered(customer, period_start, as_of)
            .await?;
        let metered = metered
            .of(customer.as_str())
            .map_err(|reason| Error::Metered {
                customer: customer.to_string(),
                reason: reason.to_owned(),
            })?;
        let (report, usage) = self.report(customer, state, &account, metered)?;
        self.store
            .insert_rating_state(&RatingStateRow {
                customer: customer.to_string(),
                period_start: unix_seconds(period_start),
                sheet_checksum: self.sheet_checksum.clone(),
                as_of: unix_seconds(as_of),
                series: u32::try_from(state.series_count()).unwrap_or(u32::MAX),
                state: state.to_json(),
                rated_at: unix_seconds(now),
                usage,
                samples: rated.samples,
                revision: wall_clock_ms(),
                counts_rated: 1,
            })
            .await?;
        Ok(report)
    }

    /// The state to continue from to rate up to `before`: the cached final
    /// state if it is not newer, else the newest stored one at or before it,
    /// else nothing (the period's start).
    async fn resume(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        before: DateTime<Utc>,
    ) -> Result<Rated> {
        let scratch = || Rated {
            state: RatingState::new(&self.sheet),
            until_ms: unix_ms(period_start),
            samples: 0,
        };
        if before <= period_start {
            return Ok(scratch());
        }
        if let Some(last) = self.finals.lock().expect("not poisoned").get(customer) {
            if last.period_start == period_start && last.as_of <= before {
                return Ok(Rated {
                    state: last.state.clone(),
                    until_ms: unix_ms(last.as_of),
                    samples: last.samples,
                });
            }
        }
        // A stored state that does not load is none: states are a cache of
        // the samples, and rating from the period's start gives the same
        // figures, only slower.
        let saved = self
            .store
            .rating_state_before(customer, period_start, self.sheet_key(), before)
            .await?;
        Ok(saved.map_or_else(scratch, |saved| Rated {
            state: saved.state,
            until_ms: saved.as_of_ms,
            samples: saved.samples,
        }))
    }

    /// The sheet and its checksum, as stored states are keyed.
    fn sheet_key(&self) -> (&PriceSheet, &str) {
        (&self.sheet, &self.sheet_checksum)
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

    /// The customers of this replica with samples in `[start, end)` (and,
    /// with `metered`, those with metered events there), as
    /// (customer, first sample ms, sample count).
    async fn my_customers_with_usage(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        metered: bool,
    ) -> Result<Vec<(CustomerId, u64, u64)>> {
        let mut customers = self
            .store
            .customers_with_samples(unix_ms(start), unix_ms(end))
            .await?;
        if metered {
            self.add_metered_customers(&mut customers, start, end)
                .await?;
        }
        self.keep_mine(
            &mut customers,
            |(customer, _, _)| customer.as_str(),
            std::time::Duration::ZERO,
        )
        .await?;
        Ok(customers)
    }

    /// Adds to `customers` (sorted, from the samples) those with only
    /// metered usage in `[period_start, until)`, without samples counted.
    async fn add_metered_customers(
        &self,
        customers: &mut Vec<(CustomerId, u64, u64)>,
        period_start: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<()> {
        if self.meters.is_empty() {
            return Ok(());
        }
        let metered = self
            .metered_range(("", "\u{10ffff}"), period_start, until)
            .await?;
        let known: BTreeSet<CustomerId> = customers.iter().map(|(id, _, _)| id.clone()).collect();
        for name in metered.names() {
            match CustomerId::parse(name.clone()) {
                Ok(id) if !known.contains(&id) => customers.push((id, 0, 0)),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(customer = %name, %error, "metered usage of an invalid customer id is not rated")
                }
            }
        }
        customers.sort_by(|left, right| left.0.cmp(&right.0));
        Ok(())
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
        let samples = numbered(
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

    /// Rates the open hour from the store (the `clickhouse` live source):
    /// every customer's samples of the last `live_interval_seconds +
    /// live_lateness_seconds`, with each series' baseline before them, read
    /// in one query, then [`Self::rate_live_samples`]. The query filters
    /// `usage_samples` by time, which its order key does not lead with: fine
    /// for tests and small fleets; fleets use the `kafka` live source.
    pub async fn rate_live(&self, now: DateTime<Utc>) -> Result<LivePass> {
        let lateness = chrono::Duration::seconds(self.config.live_lateness_seconds as i64);
        let window = chrono::Duration::seconds(self.config.live_interval_seconds.max(1) as i64);
        let period_start = self.period().start_of(now);
        let from = (now - window - lateness).max(period_start);
        let recent = self
            .store
            .samples_for_rating_range("", "\u{10ffff}", unix_ms(from), unix_ms(now) + 1)
            .await?;
        self.rate_live_samples(now, recent).await
    }

    /// Rates `recent` samples (from the store or the stream, in any order)
    /// into the live figures of their customers: each customer's live state
    /// carried forward by them, billed, and every figure written to
    /// `live_usage` in one insert. A customer seen for the first time (or in
    /// a new period) is resumed from its newest final state and its stored
    /// samples since; after that only new samples are rated. A series'
    /// baseline bridges samples a pass did not see: with counters that costs
    /// no money (see the module doc).
    pub async fn rate_live_samples(
        &self,
        now: DateTime<Utc>,
        recent: Vec<UsageSample>,
    ) -> Result<LivePass> {
        self.follow_shares();
        let period_start = self.period().start_of(now);
        let mut pass = LivePass {
            samples_read: recent.len(),
            ..LivePass::default()
        };
        self.metrics.samples_read.inc_by(recent.len() as u64);
        // Grouped by moving each sample once (a pass at 100k samples/s holds
        // a second of them; sorting them would move each many times).
        let mut by_customer: HashMap<CustomerId, Vec<NumberedSample>> = HashMap::new();
        for numbered in numbered(recent) {
            match by_customer.get_mut(&numbered.sample.customer) {
                Some(group) => group.push(numbered),
                None => {
                    by_customer.insert(numbered.sample.customer.clone(), vec![numbered]);
                }
            }
        }
        let mut customers: Vec<&CustomerId> = by_customer.keys().collect();
        self.keep_mine(&mut customers, |customer| customer.as_str(), LANE_REFRESH)
            .await?;
        customers.sort();
        self.resume_live(&customers, period_start, now, &mut pass)
            .await?;
        self.refresh_accounts(&customers, period_start, now).await?;
        // Every customer's figure in one insert: one per customer would
        // cost a round trip each.
        let mut pending = Vec::new();
        for customer in customers {
            let group = &by_customer[customer];
            match self
                .rate_live_customer(customer, period_start, now, group, &mut pass, &mut pending)
                .await
            {
                Ok(()) => pass.customers_rated += 1,
                Err(Error::Store(error)) => return Err(Error::Store(error)),
                Err(error) => {
                    tracing::warn!(%customer, %error, "live rating of this customer failed; the hour's final rating will report it");
                    pass.customers_failed += 1;
                }
            }
        }
        if !pending.is_empty() {
            self.store.insert_live_lines(&pending).await?;
        }
        Ok(pass)
    }

    /// Gives every one of `customers` (sorted) without a live state one: its
    /// newest final state carried forward by its stored samples since, read
    /// for up to `RESUME_CHUNK` customers per query (a restarted rater
    /// resumes a thousand customers in a few queries, not two thousand).
    async fn resume_live(
        &self,
        customers: &[&CustomerId],
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        pass: &mut LivePass,
    ) -> Result<()> {
        const RESUME_CHUNK: usize = 200;
        let missing: Vec<CustomerId> = {
            let live = self.live.lock().expect("not poisoned");
            customers
                .iter()
                .filter(|customer| !live.contains_key(**customer))
                .map(|customer| (*customer).clone())
                .collect()
        };
        for (chunk, first, last) in idlemeter_core::ids::id_ranges(&missing, RESUME_CHUNK) {
            let stored = self
                .store
                .rating_states_before(
                    (first.as_str(), last.as_str()),
                    period_start,
                    self.sheet_key(),
                    now,
                )
                .await?;
            let mut states: HashMap<String, (RatingState, u64)> = stored
                .into_iter()
                .map(|saved| (saved.customer, (saved.state, saved.as_of_ms)))
                .collect();
            let (accounts, metered) = self
                .accounts_and_metered((first.as_str(), last.as_str()), period_start, now)
                .await?;
            let from_ms = chunk
                .iter()
                .map(|customer| {
                    states
                        .get(customer.as_str())
                        .map_or(unix_ms(period_start), |(_, from)| *from)
                })
                .min()
                .unwrap_or(unix_ms(period_start));
            let samples = self
                .store
                .samples_for_rating_range(first.as_str(), last.as_str(), from_ms, unix_ms(now) + 1)
                .await?;
            pass.samples_read += samples.len();
            self.metrics.samples_read.inc_by(samples.len() as u64);
            for customer in chunk {
                let (mut state, resumed_ms) = states
                    .remove(customer.as_str())
                    .unwrap_or_else(|| (RatingState::new(&self.sheet), unix_ms(period_start)));
                let own = numbered(
                    samples
                        .iter()
                        .filter(|sample| &sample.customer == customer)
                        .cloned(),
                );
                // What the final state already rated is at or below its
                // baselines: advancing skips it.
                state.advance(&self.sheet, &own, &self.idle);
                let newest_ms = own
                    .iter()
                    .map(|numbered| unix_ms(numbered.sample.ts))
                    .max()
                    .unwrap_or(resumed_ms);
                self.live.lock().expect("not poisoned").insert(
                    customer.clone(),
                    LiveState {
                        period_start,
                        state,
                        newest_ms,
                        account: accounts.account(customer),
                        account_read: Some(std::time::Instant::now()),
                        metered: live_metered(&metered, customer),
                    },
                );
            }
        }
        Ok(())
    }

    /// Reads again, a range of up to `ACCOUNT_CHUNK` customers per query,
    /// the accounts of those of `customers` (sorted) whose live account is
    /// older than `account_refresh_seconds`.
    async fn refresh_accounts(
        &self,
        customers: &[&CustomerId],
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        const ACCOUNT_CHUNK: usize = 200;
        let refresh = Duration::from_secs(self.config.account_refresh_seconds);
        let stale: Vec<CustomerId> = {
            let live = self.live.lock().expect("not poisoned");
            customers
                .iter()
                .filter(|customer| {
                    live.get(**customer).is_some_and(|state| {
                        state.period_start == period_start
                            && state
                                .account_read
                                .is_none_or(|read| read.elapsed() >= refresh)
                    })
                })
                .map(|customer| (*customer).clone())
                .collect()
        };
        for (chunk, first, last) in idlemeter_core::ids::id_ranges(&stale, ACCOUNT_CHUNK) {
            let (accounts, metered) = self
                .accounts_and_metered((first.as_str(), last.as_str()), period_start, now)
                .await?;
            let mut live = self.live.lock().expect("not poisoned");
            for customer in chunk {
                if let Some(state) = live.get_mut(customer) {
                    state.account = accounts.account(customer);
                    state.metered = live_metered(&metered, customer);
                    state.account_read = Some(std::time::Instant::now());
                }
            }
        }
        Ok(())
    }

    async fn rate_live_customer(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        recent: &[NumberedSample],
        pass: &mut LivePass,
        pending: &mut Vec<RatedLineRow>,
    ) -> Result<()> {
        let cached = self.live.lock().expect("not poisoned").remove(customer);
        let (mut live, samples): (LiveState, Cow<'_, [NumberedSample]>) = match cached {
            Some(live) if live.period_start == period_start => (live, Cow::Borrowed(recent)),
            // The period turned: the old period's last samples move the
            // baselines, which carry into the new one.
            Some(mut live) if live.period_start < period_start => {
                let (old, new): (Vec<NumberedSample>, Vec<NumberedSample>) = recent
                    .iter()
                    .cloned()
                    .partition(|numbered| numbered.sample.ts < period_start);
                live.state.advance(&self.sheet, &old, &self.idle);
                let next = LiveState {
                    period_start,
                    state: live.state.next_period(),
                    newest_ms: unix_ms(period_start),
                    account: Account::default(),
                    account_read: None,
                    metered: Vec::new(),
                };
                (next, Cow::Owned(new))
            }
            // `resume_live` gave every customer of the pass a live state;
            // only a clock that went back across a period start gets here.
            _ => {
                self.resume_live(&[customer], period_start, now, pass)
                    .await?;
                let live = self
                    .live
                    .lock()
                    .expect("not poisoned")
                    .remove(customer)
                    .expect("resume_live inserts a state for every customer it is given");
                (live, Cow::Borrowed(recent))
            }
        };
        let newest = samples
            .iter()
            .map(|numbered| unix_ms(numbered.sample.ts))
            .max()
            .unwrap_or(live.newest_ms);
        live.state.advance(&self.sheet, &samples, &self.idle);
        live.newest_ms = live.newest_ms.max(newest);
        if live.account_read.is_none() {
            let (account, metered) = self
                .account_and_metered(customer, period_start, now)
                .await?;
            live.account = account;
            live.metered = live_metered(&metered, customer);
            live.account_read = Some(std::time::Instant::now());
        }
        let (report, _) = self.report(customer, &live.state, &live.account, &live.metered)?;
        let as_of_secs = u32::try_from(live.newest_ms / 1000).unwrap_or(u32::MAX);
        let rows = match bill_of(&report, customer) {
            Some(bill) => self.bill_rows(
                &report,
                bill,
                unix_seconds(period_start),
                as_of_secs,
                unix_seconds(now),
            )?,
            None => Vec::new(),
        };
        if !rows.is_empty() {
            pending.extend(rows);
            self.metrics.live_figures_written.inc();
        }
        self.live
            .lock()
            .expect("not poisoned")
            .insert(customer.clone(), live);
        Ok(())
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
            old_total: column(old_total)?,
            new_total: column(bill.total)?,
            explanation,
            detected_at,
        })
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
fn numbered(samples: impl IntoIterator<Item = UsageSample>) -> Vec<NumberedSample> {
    samples
        .into_iter()
        .enumerate()
        .map(|(position, sample)| NumberedSample {
            line: position as u64 + 1,
            sample,
        })
        .collect()
}

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
