//! Invoicing: closing billing periods into invoices that never change.
//!
//! [`Invoicer::close_period`] issues, for every customer the rater rated in
//! the period or invoiced before (plan fees, adjustments), one invoice per
//! (issuer, customer, period, currency). It reads no samples, only their
//! count per chunk of customers: each customer's usage is the rater's
//! period-end rated quantities (the `usage` of its newest `rating_state`
//! row) where that state rated every sample stored for the period, and the
//! bill is
//! [`idlemeter_core::bill`], the function every other money figure comes
//! from, with the customer's account as at the period's end
//! ([`idlemeter_store::AccountReader`]: one-time credit left, wallet, tax
//! rate, adjustments of earlier periods from their re-rated quantities). A
//! close therefore costs a few queries per chunk of customers, whatever
//! their sample rate.
//!
//! A customer whose period-end state is missing, older than the period's
//! end (the rater was down, or is behind) or short of samples stored since
//! it was rated is caught up here exactly as the rater would: its newest
//! state that rated every sample stored before its end (else none), carried
//! forward by its stored samples since. That costs that customer's samples
//! only, and is counted.
//!
//! Files: `close.rs` (the close and the preview), `ledger.rs` (numbers,
//! issuing, credit notes, deposits and the import, in the PostgreSQL
//! ledger), `schedule.rs` (the scheduler), `config.rs` (`[invoicer]` and its
//! cron schedule), `metrics.rs`, `events.rs` (billing events).
//!
//! Numbers: the issuer's last number + 1, in customer order, without gaps.
//! Idempotent and crash-safe: per chunk of customers, lines are written
//! first, then the chunk's headers in one insert, in number order; a header
//! is the commit marker. A rerun skips what has a header and numbers the
//! rest the same way (orphaned lines of the crashed run are replaced). Two
//! runs at once on one host are serialised by a lock file; run the scheduler
//! in one place.

mod close;
mod config;
pub mod events;
mod ledger;
mod metrics;
mod schedule;

pub use close::{CloseOutcome, CloseTimings};
pub use config::{CronSchedule, InvoicerConfig};
pub use ledger::{record_deposit, LedgerImport};
use metrics::InvoicerMetrics;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use idlemeter_core::credit_note::{CreditRequest, CreditableLine, CreditedInvoice, Settlement};
use idlemeter_core::events::Meters;
use idlemeter_core::metering::PricedMeters;
use idlemeter_core::policy::{IdleRule, Policy, PolicyIdle};
use idlemeter_core::rating::{CustomerUsage, NumberedSample};
use idlemeter_core::{bill, Account, BillingTerms, CustomerId, PriceSheet, RatingState};
use idlemeter_store::{
    unix_ms, unix_seconds, AccountReader, Accounts, Adjusted, BillContext, Counted, CreditNoteRows,
    IssuedRows, MeteredRange, RatedQuantities, SavedState, SheetSource, Store,
};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use idlemeter_store::document::{to_csv, to_html, to_json};
pub use idlemeter_store::{CreditNote, CreditNoteLine, Invoice, Line};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] idlemeter_store::Error),
    #[error(transparent)]
    Core(#[from] idlemeter_core::Error),
    #[error(transparent)]
    Sheet(#[from] idlemeter_core::SheetError),
    #[error(transparent)]
    Terms(#[from] idlemeter_core::TermsError),
    #[error(
        "period {start} .. {end} has not ended yet (grace until {closable}); preview it instead"
    )]
    PeriodOpen {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        closable: DateTime<Utc>,
    },
    #[error(
        "schedule {schedule:?} is not a cron expression (sec min hour day month weekday): {reason}"
    )]
    Schedule { schedule: String, reason: String },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("lock {path}: {reason}")]
    Lock { path: String, reason: String },
    #[error("invoice of {customer}: {reason}")]
    Amount { customer: String, reason: String },
    #[error("rated quantities of {customer}: {reason}")]
    Quantities { customer: String, reason: String },
    #[error("writing invoices: {0}")]
    Write(String),
    #[error(transparent)]
    Ledger(#[from] idlemeter_ledger::Error),
    /// The sheet prices a meter the meters file does not define.
    #[error("{0}")]
    Meters(String),
    /// A credit note refused, and why.
    #[error("{0}")]
    Credit(String),
    /// A sheet given the lane of another currency.
    #[error("{0}")]
    Lane(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The invoicer with its sheet and policy loaded.
#[derive(Debug)]
pub struct Invoicer {
    store: Store,
    sheet: PriceSheet,
    sheet_label: String,
    sheet_checksum: String,
    idle: IdleRule,
    config: InvoicerConfig,
    terms: BillingTerms,
    /// The meters the sheet prices (none unless [`Invoicer::with_meters`]).
    meters: PricedMeters,
    /// Where numbers are claimed and invoices issued, when configured
    /// ([`Invoicer::with_ledger`]); else ClickHouse under the lock file.
    ledger: Option<idlemeter_ledger::Ledger>,
    metrics: Option<InvoicerMetrics>,
    /// The customers this sheet closes, when one runs per currency.
    lane: Option<idlemeter_store::CurrencyLane>,
    /// This replica's customers, when replicas divide them.
    share: idlemeter_core::Share,
}

impl Invoicer {
    /// Bills with `source`, the rater's sheet and idle policy, under `terms`.
    pub fn new(
        store: Store,
        source: SheetSource<'_>,
        config: InvoicerConfig,
        terms: BillingTerms,
    ) -> Result<Self> {
        let sheet = PriceSheet::from_toml(source.sheet_text, source.sheet_label)?;
        let idle = match source.policy {
            Some((text, label)) => {
                IdleRule::Policy(Box::new(PolicyIdle::new(Policy::from_toml(text, label)?)))
            }
            None => IdleRule::SessionOrConnection,
        };
        Ok(Self {
            store,
            sheet,
            sheet_label: source.sheet_label.to_owned(),
            lane: None,
            share: idlemeter_core::Share::everyone(),
            sheet_checksum: source.checksum(),
            idle,
            config,
            terms,
            meters: PricedMeters::default(),
            ledger: None,
            metrics: None,
        })
    }

    /// Issues through `ledger` (PostgreSQL): each chunk's numbers are
    /// claimed and its invoices written in one transaction, then copied to
    /// ClickHouse through the outbox. Two invoicers sharing only the
    /// database never share or skip a number; the lock file is then only
    /// a courtesy between runs on one host.
    /// Closes only the customers `share` admits: two or more invoicer
    /// replicas divide the customers, each closing its own (numbers are
    /// claimed in the ledger, so they stay unique and gapless across them).
    /// A replica that dies mid-close leaves its customers to the one that
    /// takes its shards, at that one's next firing: every firing closes the
    /// previous period again and skips what is already invoiced.
    pub fn with_share(mut self, share: idlemeter_core::Share) -> Self {
        self.share = share;
        self
    }

    /// Closes only the customers of `lane` (those billed in this sheet's
    /// currency; see [`idlemeter_store::CurrencyLane`]): a deployment with
    /// a sheet per currency runs one invoicer per sheet.
    pub fn with_lane(mut self, lane: idlemeter_store::CurrencyLane) -> Result<Self> {
        if lane.currency != self.sheet.currency.code() {
            return Err(Error::Lane(format!(
                "sheet {} prices in {}, not in its lane's {}",
                self.sheet_label,
                self.sheet.currency.code(),
                lane.currency
            )));
        }
        self.lane = Some(lane);
        Ok(self)
    }

    /// The sheet's currency.
    pub fn currency(&self) -> &str {
        self.sheet.currency.code()
    }

    pub fn with_ledger(mut self, ledger: idlemeter_ledger::Ledger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Bills the meters the sheet prices with their definitions in
    /// `meters` (`[events] meters`), as the rater does; fails naming a
    /// priced meter it lacks. A close aggregates each meter over the whole
    /// period again, so events that arrived after the rater's last hour
    /// and within the grace are on the invoice.
    pub fn with_meters(mut self, meters: &Meters) -> Result<Self> {
        self.meters = PricedMeters::new(&self.sheet, meters).map_err(Error::Meters)?;
        Ok(self)
    }

    /// The metered quantities of the customers `first..=last` over
    /// `[start, until)`; nothing when the sheet prices no meter.
    async fn metered_in(
        &self,
        customers: (&str, &str),
        start: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<MeteredRange> {
        let (from, to) = (unix_ms(start), unix_ms(until));
        Ok(self
            .store
            .metered(&self.sheet, &self.meters, customers, from, to)
            .await?)
    }

    /// Exports the scheduler's runs to `registry` (`idlemeter_invoicer_*`).
    pub fn with_metrics(mut self, registry: &prometheus::Registry) -> Result<Self> {
        self.metrics = Some(InvoicerMetrics::register(
            registry,
            self.sheet.currency.code(),
        )?);
        Ok(self)
    }

    pub fn config(&self) -> &InvoicerConfig {
        &self.config
    }

    pub fn terms(&self) -> &BillingTerms {
        &self.terms
    }

    /// The period containing `time`.
    pub fn period_of(&self, time: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        self.terms.period.bounds(time)
    }

    fn accounts<'a>(&'a self, adjusted: Option<&'a Adjusted>) -> AccountReader<'a> {
        AccountReader {
            store: &self.store,
            terms: &self.terms,
            tax_rates: self.terms.tax_rates.rates(),
            sheet: &self.sheet,
            sheet_checksum: &self.sheet_checksum,
            adjusted,
        }
    }
}
