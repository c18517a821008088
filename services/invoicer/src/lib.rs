//! Invoicing: closing billing periods into invoices that never change.
//!
//! [`Invoicer::close_period`] issues, for every customer the rater rated in
//! the period or invoiced before (plan fees, adjustments), one invoice per
//! (issuer, customer, period, currency). It reads no samples: each
//! customer's usage is the rater's period-end rated quantities (the
//! `usage` of its newest `rating_state` row), and the bill is
//! [`idlemeter_core::bill`], the function every other money figure comes
//! from, with the customer's account as at the period's end
//! ([`idlemeter_store::AccountReader`]: one-time credit left, wallet, tax
//! rate, adjustments of earlier periods from their re-rated quantities). A
//! close therefore costs a few queries per chunk of customers, whatever
//! their sample rate.
//!
//! A customer whose period-end state is missing or older than the period's
//! end (the rater was down, or is behind) is caught up here exactly as the
//! rater would: its newest state, carried forward by its stored samples
//! since. That costs that customer's samples only, and is counted.
//!
//! Numbers: the issuer's last number + 1, in customer order, without gaps.
//! Idempotent and crash-safe: per chunk of customers, lines are written
//! first, then the chunk's headers in one insert, in number order; a header
//! is the commit marker. A rerun skips what has a header and numbers the
//! rest the same way (orphaned lines of the crashed run are replaced). Two
//! runs at once on one host are serialised by a lock file; run the scheduler
//! in one place.

pub mod events;

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

/// What a close did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct CloseOutcome {
    /// Newly issued invoices (would-be, in a dry run), in number order: the
    /// first `keep_issued` of them.
    pub issued: Vec<Invoice>,
    /// How many were issued, and their totals per currency.
    pub issued_count: usize,
    pub issued_totals: BTreeMap<String, Decimal>,
    /// Customers whose invoice for the period already existed (headers).
    pub already_issued: Vec<Invoice>,
    /// For already issued invoices in a dry run: what a re-issue would total
    /// now, where it differs (the difference will be an adjustment).
    pub differences: Vec<(u64, String, Decimal, Decimal)>,
    /// Customers with nothing to bill.
    pub nothing_to_bill: usize,
    /// Customers skipped because they have an invoice for a later period.
    pub behind_a_later_invoice: Vec<String>,
    /// Customers whose period-end rated quantities were missing or behind
    /// the period's end and were caught up from their samples here.
    pub caught_up: usize,
    /// Invoiced periods not compared for an adjustment: no rated quantities
    /// of them under this sheet.
    pub not_adjustable: usize,
    /// Customers whose invoice could not be computed (an amount too large
    /// to compute exactly, lines that do not add up), with why: reported in
    /// `rating_errors` and left unissued, while everyone else is invoiced.
    /// A later run retries them.
    pub failed: Vec<(String, String)>,
    /// Where the time went.
    pub timings: CloseTimings,
}

impl CloseOutcome {
    /// Counts a chunk's issued invoices into the totals per currency,
    /// keeping the first `keep` of them whole.
    fn count_issued(&mut self, invoices: Vec<Invoice>, keep: usize) {
        for invoice in invoices {
            self.issued_count += 1;
            *self
                .issued_totals
                .entry(invoice.currency.clone())
                .or_default() += invoice.total;
            if self.issued.len() < keep {
                self.issued.push(invoice);
            }
        }
    }
}

/// Where a close's time went: reading accounts and rated quantities,
/// billing, and waiting for the previous chunk's write (the rest of each
/// write overlaps the next chunk).
#[derive(Debug, Clone, Copy, Default)]
pub struct CloseTimings {
    pub read: Duration,
    pub bill: Duration,
    pub write_wait: Duration,
}

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
    tax_rates: BTreeMap<CustomerId, Decimal>,
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

/// What the scheduler exports: whether its runs succeed, and what they issue.
#[derive(Debug, Clone)]
struct InvoicerMetrics {
    runs: prometheus::IntCounterVec,
    last_run_succeeded: prometheus::IntGauge,
    last_success: prometheus::IntGauge,
    customers_failed: prometheus::IntCounter,
    invoices_issued: prometheus::IntCounter,
}

impl InvoicerMetrics {
    /// Registers the invoicer's metrics labelled with its sheet's currency
    /// (one invoicer runs per currency's sheet).
    fn register(registry: &prometheus::Registry, currency: &str) -> Result<Self> {
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

    fn observe(&self, outcome: &Result<CloseOutcome>) {
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
        let tax_rates = terms.tax_rates.rates().clone();
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
            tax_rates,
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

    /// Copies every issued invoice the outbox still holds into ClickHouse,
    /// then marks it delivered; returns how many. A copy repeated after a
    /// crash collapses in ClickHouse (same rows, same version).
    pub async fn relay_outbox(&self) -> Result<usize> {
        match &self.ledger {
            Some(ledger) => Ok(ledger.relay(&self.store).await?),
            None => Ok(0),
        }
    }

    /// Records a prepaid wallet deposit: in the ledger (copied to
    /// ClickHouse) when there is one, else in ClickHouse. `false` when the
    /// same deposit id was recorded before.
    pub async fn deposit(&self, row: &idlemeter_store::WalletDepositRow) -> Result<bool> {
        record_deposit(self.ledger.as_ref(), &self.store, row).await
    }

    /// Issues a credit note on invoice `number` (see
    /// [`idlemeter_core::credit_note`] for what may be credited), numbered
    /// in the credit-note series, settled to the customer's credit balance
    /// or wallet, then copied to ClickHouse. Needs the ledger.
    pub async fn credit_note(
        &self,
        number: u64,
        request: &CreditRequest,
        settlement: Settlement,
        reason: &str,
    ) -> Result<CreditNote> {
        let Some(ledger) = &self.ledger else {
            return Err(Error::Ledger(idlemeter_ledger::Error::Settings(
                "credit notes are issued in the ledger: set [ledger] url".to_owned(),
            )));
        };
        if reason.trim().is_empty() {
            return Err(Error::Credit(
                "a credit note needs a reason (it is printed on the note)".to_owned(),
            ));
        }
        let issuer = self.terms.issuer.clone();
        let (_, record) = ledger
            .credit(&issuer, number, |credited, note_number| {
                let note = self
                    .draft_credit_note(credited, request, settlement, reason)
                    .map_err(|error| format!("credit note on invoice {number}: {error}"))?;
                let note = CreditNote {
                    number: note_number,
                    ..note
                };
                let (header, lines) = note.to_rows().map_err(|error| error.to_string())?;
                let deposit_copy = (settlement == Settlement::Wallet)
                    .then(|| {
                        serde_json::to_value(idlemeter_store::WalletDepositRow {
                            issuer: issuer.clone(),
                            customer: note.customer.clone(),
                            deposit_id: format!("credit_note:{note_number}"),
                            amount: header.total,
                            deposited_at: header.issued_at,
                        })
                    })
                    .transpose()
                    .map_err(|error| error.to_string())?;
                Ok(idlemeter_ledger::CreditNoteRecord {
                    customer: note.customer.clone(),
                    invoice_number: number,
                    currency: note.currency.clone(),
                    net: note.net,
                    tax: note.tax,
                    total: note.total,
                    settlement: settlement.as_str().to_owned(),
                    reason: reason.to_owned(),
                    document: serde_json::to_value(CreditNoteRows { header, lines })
                        .map_err(|error| error.to_string())?,
                    deposit_copy,
                })
            })
            .await?;
        self.relay_outbox().await?;
        let rows: CreditNoteRows = serde_json::from_value(record.document)
            .map_err(|error| Error::Write(format!("the credit note's document: {error}")))?;
        Ok(CreditNote::from_rows(&rows.header, &rows.lines)?)
    }

    /// A credit note's figures from the invoice and its earlier notes, not
    /// yet numbered.
    fn draft_credit_note(
        &self,
        credited: &idlemeter_ledger::Credited,
        request: &CreditRequest,
        settlement: Settlement,
        reason: &str,
    ) -> Result<CreditNote> {
        let rows: IssuedRows = serde_json::from_value(credited.invoice_document.clone())
            .map_err(|error| Error::Write(format!("the invoice's document: {error}")))?;
        let invoice = Invoice::from_rows(&rows.header, &rows.lines)?;
        let mut credited_lines: BTreeMap<u16, Decimal> = BTreeMap::new();
        let (mut credited_net, mut credited_tax) = (Decimal::ZERO, Decimal::ZERO);
        for document in &credited.earlier_notes {
            let earlier: CreditNoteRows = serde_json::from_value(document.clone())
                .map_err(|error| Error::Write(format!("an earlier credit note: {error}")))?;
            let earlier = CreditNote::from_rows(&earlier.header, &earlier.lines)?;
            for line in &earlier.lines {
                *credited_lines.entry(line.invoice_line_no).or_default() += line.amount;
            }
            credited_net += earlier.net;
            credited_tax += earlier.tax;
        }
        let currency = if invoice.currency == self.sheet.currency.code() {
            self.sheet.currency
        } else {
            idlemeter_core::Currency::parse(&invoice.currency, None).map_err(Error::Credit)?
        };
        let lines: Vec<CreditableLine> = invoice
            .lines
            .iter()
            .map(|line| CreditableLine {
                line_no: line.line_no,
                kind: line.kind.clone(),
                resource: line.resource.clone(),
                amount: line.amount,
            })
            .collect();
        let draft = idlemeter_core::credit_note::credit_note(
            &CreditedInvoice {
                lines: &lines,
                payable: invoice.subtotal + invoice.fees + invoice.adjustments + invoice.credits,
                tax_rate: invoice.tax_rate,
                tax: invoice.tax,
                credited_lines: &credited_lines,
                credited_net,
                credited_tax,
                minor_digits: currency.minor_digits(),
                rounding: self.sheet.line_rounding,
            },
            request,
        )
        .map_err(|error| Error::Credit(error.to_string()))?;
        let note = CreditNote {
            issuer: invoice.issuer.clone(),
            number: 0,
            customer: invoice.customer.clone(),
            invoice_number: invoice.number,
            period_start: invoice.period_start,
            currency: invoice.currency.clone(),
            settlement: settlement.as_str().to_owned(),
            reason: reason.to_owned(),
            lines: draft
                .lines
                .iter()
                .enumerate()
                .map(|(index, line)| CreditNoteLine {
                    line_no: index as u16 + 1,
                    invoice_line_no: line.invoice_line_no,
                    resource: line.resource.clone(),
                    amount: line.amount,
                })
                .collect(),
            net: draft.net,
            tax: draft.tax,
            total: draft.total,
            issued_at: Utc::now(),
        };
        let summed: Decimal = note.lines.iter().map(|line| line.amount).sum();
        if summed != note.net || note.net + note.tax != note.total {
            return Err(Error::Credit(format!(
                "credit note lines sum to {summed}, net {} + tax {} stated as {}: refused",
                note.net, note.tax, note.total
            )));
        }
        Ok(note)
    }

    /// Copies the invoices of this issuer that ClickHouse holds into the
    /// ledger, under their own numbers (the move to PostgreSQL); the
    /// series then continues after the highest. `progress(done, total)`
    /// as invoices are read. Safe to run again: present ones are counted,
    /// conflicting ones reported and skipped.
    pub async fn import_to_ledger(
        &self,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<LedgerImport> {
        let Some(ledger) = &self.ledger else {
            return Err(Error::Ledger(idlemeter_ledger::Error::Settings(
                "no ledger configured: set [ledger] url".to_owned(),
            )));
        };
        let mut report = LedgerImport::default();
        // Deposits first, so the ledger's wallets hold what the imported
        // invoices drew.
        for row in self.store.wallet_deposit_rows(&self.terms.issuer).await? {
            if deposit_in_ledger(ledger, &row).await? {
                report.deposits += 1;
            }
        }
        // Their copies for ClickHouse repeat rows it has (they collapse).
        ledger.relay(&self.store).await?;
        let headers = self.store.invoices(&self.terms.issuer).await?;
        for (done, header) in headers.iter().enumerate() {
            let lines = self.store.invoice_lines(header).await?;
            let invoice = Invoice::from_rows(header, &lines)?;
            let issued_at = DateTime::from_timestamp(i64::from(header.issued_at), 0)
                .unwrap_or(invoice.period_end);
            let record = ledger_record(
                &invoice,
                IssuedRows {
                    header: header.clone(),
                    lines,
                },
            )
            .map_err(Error::Write)?;
            match ledger
                .import_invoice(&self.terms.issuer, invoice.number, issued_at, &record)
                .await?
            {
                idlemeter_ledger::Imported::Inserted => report.imported += 1,
                idlemeter_ledger::Imported::Present => report.present += 1,
                idlemeter_ledger::Imported::Conflict(reason) => report.conflicts.push(reason),
            }
            progress(done + 1, headers.len());
        }
        Ok(report)
    }

    /// Issues a chunk's invoices through the ledger (see
    /// [`Self::with_ledger`]) and relays them; returns (issued, already
    /// issued by another run, refused with why).
    async fn issue_in_ledger(
        &self,
        ledger: &idlemeter_ledger::Ledger,
        start: DateTime<Utc>,
        mut drafts: Vec<Invoice>,
        issued_at: u32,
        written_ms: u64,
    ) -> Result<(Vec<Invoice>, Vec<Invoice>, Vec<(String, String)>)> {
        let done = ledger
            .issue(
                &self.terms.issuer,
                start,
                &mut drafts,
                |invoice| invoice.customer.as_str(),
                |invoice, number| {
                    invoice.number = number;
                    let (header, lines) = invoice
                        .to_rows(issued_at, written_ms)
                        .map_err(|error| error.to_string())?;
                    ledger_record(invoice, IssuedRows { header, lines })
                },
            )
            .await?;
        self.relay_outbox().await?;
        let mut already = Vec::with_capacity(done.already.len());
        for (_, document) in done.already {
            let rows: IssuedRows = serde_json::from_value(document)
                .map_err(|error| Error::Write(format!("an issued invoice's document: {error}")))?;
            already.push(Invoice::from_rows(&rows.header, &rows.lines)?);
        }
        let refused = done
            .refused
            .iter()
            .map(|(index, reason)| (drafts[*index].customer.clone(), reason.clone()))
            .collect();
        let numbered: std::collections::HashSet<usize> =
            done.numbered.iter().map(|(index, _)| *index).collect();
        let issued = drafts
            .into_iter()
            .enumerate()
            .filter(|(index, _)| numbered.contains(index))
            .map(|(_, invoice)| invoice)
            .collect();
        Ok((issued, already, refused))
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
            tax_rates: &self.tax_rates,
            sheet: &self.sheet,
            sheet_checksum: &self.sheet_checksum,
            adjusted,
        }
    }

    /// Who to bill for the period: everyone the rater rated in it, everyone
    /// invoiced before (plan fees, adjustments), everyone with metered usage
    /// in it, on a plan, or with a record; in this invoicer's currency lane
    /// and share. Names only, in order; the rest is read chunk by chunk.
    async fn customers_to_bill(
        &self,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<Vec<String>> {
        let issuer = &self.terms.issuer;
        let start_s = unix_seconds(start);
        let mut customers: BTreeSet<String> = self
            .store
            .rated_customers(start_s, &self.sheet_checksum)
            .await?
            .into_iter()
            .collect();
        customers.extend(self.store.invoiced_customers(issuer).await?);
        // And everyone with metered usage in the period (events only).
        customers.extend(
            self.metered_in(("", "\u{10ffff}"), start, end)
                .await?
                .names()
                .cloned(),
        );
        // And everyone on a plan of their subscription (fees), and everyone
        // with a record (a record the sheet cannot bill, in another
        // currency, is then reported, not skipped in silence).
        customers.extend(self.store.subscribed_customers(issuer).await?);
        let currencies = self.store.customer_currencies(issuer).await?;
        customers.extend(currencies.keys().cloned());
        let mut customers: Vec<String> = customers.into_iter().collect();
        if let Some(lane) = &self.lane {
            customers.retain(|customer| lane.admits(customer, &currencies));
        }
        customers.retain(|customer| self.share.admits(customer));
        Ok(customers)
    }

    /// Closes the period starting at `period_start` (see the module doc).
    /// `progress(done, total)` is called as customers are computed.
    pub async fn close_period(
        &self,
        period_start: DateTime<Utc>,
        now: DateTime<Utc>,
        dry_run: bool,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<CloseOutcome> {
        let (start, end) = self.period_of(period_start);
        let closable = end + chrono::Duration::seconds(self.config.grace_seconds as i64);
        if now < closable {
            return Err(Error::PeriodOpen {
                start,
                end,
                closable,
            });
        }
        let _lock = if dry_run {
            None
        } else {
            Some(FileLock::acquire(&self.config.lock_file).await?)
        };
        let issuer = &self.terms.issuer;
        let start_s = unix_seconds(start);
        if !dry_run {
            // Invoices a crashed run issued but did not copy: copied first,
            // so the accounts read below see them.
            let relayed = self.relay_outbox().await?;
            if relayed > 0 {
                tracing::info!(
                    relayed,
                    "copied invoices a previous run issued to ClickHouse"
                );
            }
        }
        let customers = self.customers_to_bill((start, end)).await?;
        let adjusted = self.accounts(None).all_issued_adjustments().await?;
        let mut outcome = CloseOutcome::default();
        let mut next = self.store.last_invoice_number(issuer).await? + 1;
        let mut computed = 0;
        // Above every line written before, whatever this host's clock says,
        // so this run's lines replace a crashed run's.
        let written_ms = u64::try_from(Utc::now().timestamp_millis())
            .unwrap_or(0)
            .max(self.store.last_line_version(issuer).await? + 1);
        // One chunk's write runs while the next chunk is read and billed;
        // a chunk's headers are written only after the previous chunk's,
        // so numbers stay in order and without gaps across a crash.
        let mut writing: Option<tokio::task::JoinHandle<Result<()>>> = None;
        for (chunk, first, last) in
            idlemeter_core::ids::id_ranges(&customers, self.config.chunk_customers)
        {
            let reading = std::time::Instant::now();
            let reader = self.accounts(Some(&adjusted));
            let (accounts, rated, metered) = tokio::try_join!(
                async { Ok::<_, Error>(reader.read(first, last, start, end).await?) },
                self.rated_in(first, last, (start, end)),
                self.metered_in((first, last), start, end),
            )?;
            outcome.timings.read += reading.elapsed();
            let billing = std::time::Instant::now();
            outcome.not_adjustable += accounts.not_adjustable.len();
            let mut chunk_issued = Vec::new();
            for customer in chunk {
                computed += 1;
                progress(computed, customers.len());
                if let Some(header) = accounts.invoiced_now.get(customer) {
                    outcome
                        .already_issued
                        .push(Invoice::from_rows(header, &[])?);
                    continue;
                }
                if accounts.invoiced_later.contains(customer) {
                    outcome.behind_a_later_invoice.push(customer.clone());
                    continue;
                }
                match self
                    .invoice_of(
                        customer,
                        (start, end),
                        &accounts,
                        (rated.get(customer), &metered),
                        next,
                    )
                    .await
                {
                    Ok((Some(invoice), caught_up)) => {
                        outcome.caught_up += usize::from(caught_up);
                        // Every amount must fit its column, checked here so
                        // that one customer's cannot fail the chunk's insert.
                        if let Err(unfit) = invoice.to_rows(0, 0) {
                            let error = Error::Amount {
                                customer: customer.clone(),
                                reason: unfit.to_string(),
                            };
                            self.failed(customer, start_s, now, dry_run, error, &mut outcome)
                                .await;
                            continue;
                        }
                        chunk_issued.push(invoice);
                        next += 1;
                    }
                    Ok((None, caught_up)) => {
                        outcome.caught_up += usize::from(caught_up);
                        outcome.nothing_to_bill += 1;
                    }
                    // The store failing is everyone's problem.
                    Err(Error::Store(error)) => return Err(Error::Store(error)),
                    Err(error) => {
                        self.failed(customer, start_s, now, dry_run, error, &mut outcome)
                            .await
                    }
                }
            }
            outcome.timings.bill += billing.elapsed();
            if dry_run {
                self.compare_issued(&mut outcome, (start, end), &accounts, (&rated, &metered))
                    .await?;
            } else if let Some(ledger) = &self.ledger {
                let waiting = std::time::Instant::now();
                let (issued, already, refused) = self
                    .issue_in_ledger(ledger, start, chunk_issued, unix_seconds(now), written_ms)
                    .await?;
                outcome.timings.write_wait += waiting.elapsed();
                outcome.already_issued.extend(already);
                for (customer, reason) in refused {
                    let error = Error::Amount {
                        customer: customer.clone(),
                        reason,
                    };
                    self.failed(&customer, start_s, now, dry_run, error, &mut outcome)
                        .await;
                }
                chunk_issued = issued;
            } else {
                let rows = chunk_rows(&chunk_issued, unix_seconds(now), written_ms)?;
                let waiting = std::time::Instant::now();
                if let Some(previous) = writing.take() {
                    previous
                        .await
                        .map_err(|error| Error::Write(error.to_string()))??;
                }
                outcome.timings.write_wait += waiting.elapsed();
                let store = self.store.clone();
                writing = Some(tokio::spawn(async move { write_rows(&store, rows).await }));
            }
            outcome.count_issued(chunk_issued, self.config.keep_issued);
        }
        if let Some(last) = writing.take() {
            let waiting = std::time::Instant::now();
            last.await
                .map_err(|error| Error::Write(error.to_string()))??;
            outcome.timings.write_wait += waiting.elapsed();
        }
        if !outcome.behind_a_later_invoice.is_empty() {
            tracing::warn!(
                count = outcome.behind_a_later_invoice.len(),
                period = %start,
                "customers already invoiced for a later period are skipped; their late usage will be an adjustment instead"
            );
        }
        if !dry_run {
            tracing::info!(
                issuer = %issuer,
                period = %start,
                issued = outcome.issued_count,
                already = outcome.already_issued.len(),
                caught_up = outcome.caught_up,
                "period closed"
            );
        }
        Ok(outcome)
    }

    /// The rater's quantities of the customers `first..=last` for the
    /// period starting `start` that can be billed as they are through
    /// `until` ([`Store::rated_through`]). A customer left out is rated
    /// from its samples by [`Self::usage_at`].
    async fn rated_in(
        &self,
        first: &str,
        last: &str,
        period: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<HashMap<String, RatedQuantities>> {
        let rated = self
            .store
            .rated_through((first, last), period, &self.sheet_checksum)
            .await?;
        for row in &rated.incomplete {
            if row.as_of >= unix_seconds(period.1) && !row.usage.is_empty() {
                // The rater re-rates it on a later pass; the close cannot wait.
                tracing::info!(customer = %row.customer, rated = row.samples, "the rater's period-end state did not rate every stored sample; rating the period from its samples");
            }
        }
        Ok(rated.complete)
    }

    /// In a dry run: what each already issued invoice of the chunk would
    /// total if it were issued now.
    async fn compare_issued(
        &self,
        outcome: &mut CloseOutcome,
        period: (DateTime<Utc>, DateTime<Utc>),
        accounts: &Accounts,
        (rated, metered): (&HashMap<String, RatedQuantities>, &MeteredRange),
    ) -> Result<()> {
        for (customer, header) in &accounts.invoiced_now {
            if let (Some(recomputed), _) = self
                .invoice_of(
                    customer,
                    period,
                    accounts,
                    (rated.get(customer), metered),
                    header.number,
                )
                .await?
            {
                let issued = idlemeter_store::from_column(header.total)?;
                if recomputed.total != issued {
                    outcome.differences.push((
                        header.number,
                        customer.clone(),
                        issued,
                        recomputed.total,
                    ));
                }
            }
        }
        Ok(())
    }

    async fn failed(
        &self,
        customer: &str,
        period_start: u32,
        now: DateTime<Utc>,
        dry_run: bool,
        error: Error,
        outcome: &mut CloseOutcome,
    ) {
        tracing::error!(%customer, %error, "invoice not computed; invoicing the others");
        if !dry_run {
            self.report_failure(customer, period_start, now, &error)
                .await;
        }
        outcome
            .failed
            .push((customer.to_owned(), error.to_string()));
    }

    /// The invoice of one customer for [start, end) as at `end`, numbered
    /// `number`; `None` when there is nothing to bill. Also says whether the
    /// customer's quantities had to be caught up from samples.
    async fn invoice_of(
        &self,
        customer: &str,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        accounts: &Accounts,
        (rated, metered): (Option<&RatedQuantities>, &MeteredRange),
        number: u64,
    ) -> Result<(Option<Invoice>, bool)> {
        let id = CustomerId::parse(customer.to_owned()).map_err(|error| Error::Quantities {
            customer: customer.to_owned(),
            reason: error.to_string(),
        })?;
        let (mut usage, caught_up) = self.usage_at(&id, start, end, rated).await?;
        self.apply_metered(&mut usage, metered)?;
        let account = accounts.account(&id);
        let mut invoice = self.invoice(&id, &usage, &account, start, end, number)?;
        if let Some(invoice) = &mut invoice {
            invoice.buyer = accounts.buyers.get(customer).cloned().unwrap_or_default();
        }
        Ok((invoice, caught_up))
    }

    /// The bill of `usage` with `account`, as an invoice; `None` when
    /// nothing was used and nothing is charged (no invoice, no number).
    fn invoice(
        &self,
        customer: &CustomerId,
        usage: &CustomerUsage,
        account: &Account,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        number: u64,
    ) -> Result<Option<Invoice>> {
        let bill = bill(&self.sheet, usage, account)?;
        if bill.bills_nothing() {
            return Ok(None);
        }
        debug_assert_eq!(&bill.customer, customer);
        let invoice = Invoice::from_bill(
            &self.terms.issuer,
            number,
            &bill,
            BillContext {
                start,
                end,
                currency: self.sheet.currency.code().to_owned(),
                sheet: self.sheet_label.clone(),
                sheet_checksum: self.sheet_checksum.clone(),
                idle_policy: idlemeter_core::IdlePolicy::version(&self.idle).to_owned(),
            },
        );
        if !invoice.lines_add_up() {
            return Err(Error::Amount {
                customer: customer.to_string(),
                reason: format!("lines do not add up to the total {}", invoice.total),
            });
        }
        Ok(Some(invoice))
    }

    /// Puts a customer's metered quantities of `metered` on `usage`, in
    /// place of what the rater's figure held for them.
    fn apply_metered(&self, usage: &mut CustomerUsage, metered: &MeteredRange) -> Result<()> {
        if self.meters.is_empty() {
            return Ok(());
        }
        let quantities =
            metered
                .of(usage.customer.as_str())
                .map_err(|reason| Error::Quantities {
                    customer: usage.customer.to_string(),
                    reason: reason.to_owned(),
                })?;
        self.meters.apply(&self.sheet, usage, quantities);
        Ok(())
    }

    /// A customer's rated quantities of the period starting at `start`,
    /// through `until`: the rater's, when [`Self::rated_in`] found them
    /// complete; else its newest state before `until` that rated every
    /// sample stored before its end (or nothing) carried forward by the
    /// stored samples since, as the rater would (`true`: caught up here).
    async fn usage_at(
        &self,
        customer: &CustomerId,
        start: DateTime<Utc>,
        until: DateTime<Utc>,
        rated: Option<&RatedQuantities>,
    ) -> Result<(CustomerUsage, bool)> {
        if let Some(rated) = rated {
            let usage = CustomerUsage::from_text(&rated.usage, customer.clone(), &self.sheet)
                .map_err(|error| Error::Quantities {
                    customer: customer.to_string(),
                    reason: error.to_string(),
                })?;
            return Ok((usage, false));
        }
        let saved = self
            .store
            .rating_state_before(customer, start, (&self.sheet, &self.sheet_checksum), until)
            .await?;
        let (mut state, from_ms) = match saved {
            Some(saved) if self.rated_all(customer, start, &saved).await? => {
                (saved.state, saved.as_of_ms)
            }
            saved => {
                if let Some(saved) = saved {
                    tracing::info!(%customer, rated = saved.samples, "stored rating state did not rate every stored sample before its end; rating the period from its samples");
                }
                (RatingState::new(&self.sheet), unix_ms(start))
            }
        };
        let samples: Vec<NumberedSample> = self
            .store
            .samples_for_rating(customer, from_ms, unix_ms(until))
            .await?
            .into_iter()
            .enumerate()
            .map(|(position, sample)| NumberedSample {
                line: position as u64 + 1,
                sample,
            })
            .collect();
        state.advance(&self.sheet, &samples, &self.idle);
        let usage = state
            .usage(&self.sheet, &self.idle)
            .customers
            .into_iter()
            .find(|usage| &usage.customer == customer)
            .unwrap_or_else(|| CustomerUsage::nothing(customer.clone(), &self.sheet));
        Ok((usage, true))
    }

    /// Whether `saved`, a state of the period starting at `start`, rated
    /// every distinct sample stored from `start` up to its end.
    async fn rated_all(
        &self,
        customer: &CustomerId,
        start: DateTime<Utc>,
        saved: &SavedState,
    ) -> Result<bool> {
        let id = customer.as_str();
        let stored = self
            .store
            .sample_counts(Counted::Distinct, (id, id), unix_ms(start), saved.as_of_ms)
            .await?;
        Ok(stored.get(id).copied().unwrap_or(0) == saved.samples)
    }

    /// Stores why a customer's invoice was not computed in `rating_errors`
    /// (field `invoice`), beside the rater's reports.
    async fn report_failure(
        &self,
        customer: &str,
        period_start: u32,
        now: DateTime<Utc>,
        error: &Error,
    ) {
        let row = idlemeter_store::RatingErrorRow {
            customer: customer.to_owned(),
            sandbox: String::new(),
            epoch: 0,
            seq: 0,
            field: "invoice".to_owned(),
            reason: error.to_string(),
            period_start,
            sheet_checksum: self.sheet_checksum.clone(),
            detected_at: unix_seconds(now),
        };
        if let Err(store_error) = self.store.insert_rating_errors(&[row]).await {
            tracing::warn!(%customer, %store_error, "could not store the invoicing error");
        }
    }

    /// Runs the schedule until `shutdown`: at each firing, closes the latest
    /// period whose grace has passed (idempotent: what is issued is skipped).
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<()> {
        let schedule = self.config.schedule.schedule();
        tokio::pin!(shutdown);
        tracing::info!(schedule = %self.config.schedule, issuer = %self.terms.issuer, "invoicer started");
        loop {
            let Some(next) = schedule.upcoming(Utc).next() else {
                return Ok(());
            };
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            let now = Utc::now();
            let grace = chrono::Duration::seconds(self.config.grace_seconds as i64);
            let (current, _) = self.period_of(now - grace);
            let previous = self.terms.period.previous(current);
            let outcome = self.close_period(previous, now, false, &|_, _| {}).await;
            if let Some(metrics) = &self.metrics {
                metrics.observe(&outcome);
            }
            match outcome {
                Ok(outcome) if !outcome.failed.is_empty() => tracing::warn!(
                    period = %previous,
                    issued = outcome.issued_count,
                    failed = outcome.failed.len(),
                    "scheduled close left customers uninvoiced (see rating_errors); retrying them at the next firing"
                ),
                Ok(outcome) => tracing::info!(
                    period = %previous,
                    issued = outcome.issued_count,
                    already = outcome.already_issued.len(),
                    "scheduled close"
                ),
                Err(error) => {
                    tracing::warn!(period = %previous, %error, "scheduled close failed; retrying at the next firing")
                }
            }
        }
    }

    /// The invoice closing the open period at `now` would issue for one
    /// customer, as a draft (never stored): the period's quantities through
    /// `now` and the account as at `now`, billed by the same function as
    /// the close.
    pub async fn preview(&self, customer: &str, now: DateTime<Utc>) -> Result<Option<Invoice>> {
        let (start, end) = self.period_of(now);
        let accounts = self
            .accounts(None)
            .read(customer, customer, start, now)
            .await?;
        let rated = self.rated_in(customer, customer, (start, now)).await?;
        let id = CustomerId::parse(customer.to_owned()).map_err(|error| Error::Quantities {
            customer: customer.to_owned(),
            reason: error.to_string(),
        })?;
        let (mut usage, _) = self.usage_at(&id, start, now, rated.get(customer)).await?;
        let metered = self.metered_in((customer, customer), start, now).await?;
        self.apply_metered(&mut usage, &metered)?;
        let mut draft = self.invoice(&id, &usage, &accounts.account(&id), start, end, 0)?;
        if let Some(invoice) = &mut draft {
            invoice.status = "draft".to_owned();
            invoice.buyer = accounts.buyers.get(customer).cloned().unwrap_or_default();
        }
        Ok(draft)
    }
}

/// What [`Invoicer::import_to_ledger`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LedgerImport {
    /// Wallet deposits copied.
    pub deposits: usize,
    pub imported: usize,
    /// Already in the ledger, identical.
    pub present: usize,
    /// Invoices whose number or period the ledger holds differently.
    pub conflicts: Vec<String>,
}

/// Records a deposit in the ledger (then relays it) or, without one, in
/// ClickHouse; `false` when the ledger had it already.
pub async fn record_deposit(
    ledger: Option<&idlemeter_ledger::Ledger>,
    store: &Store,
    row: &idlemeter_store::WalletDepositRow,
) -> Result<bool> {
    let Some(ledger) = ledger else {
        store.insert_wallet_deposit(row).await?;
        return Ok(true);
    };
    let new = deposit_in_ledger(ledger, row).await?;
    ledger.relay(store).await?;
    Ok(new)
}

/// An issued invoice as the ledger keeps it: its figures, and its stored
/// rows as the document.
fn ledger_record(
    invoice: &Invoice,
    rows: IssuedRows,
) -> std::result::Result<idlemeter_ledger::InvoiceRecord, String> {
    Ok(idlemeter_ledger::InvoiceRecord {
        customer: invoice.customer.clone(),
        period_start: invoice.period_start,
        period_end: invoice.period_end,
        currency: invoice.currency.clone(),
        total: invoice.total,
        wallet_applied: invoice.wallet_applied,
        balance_applied: invoice.balance_applied,
        balance_carried: invoice.balance_carried,
        document: serde_json::to_value(rows).map_err(|error| error.to_string())?,
    })
}

/// Records a deposit row in the ledger with the row as its ClickHouse copy.
async fn deposit_in_ledger(
    ledger: &idlemeter_ledger::Ledger,
    row: &idlemeter_store::WalletDepositRow,
) -> Result<bool> {
    let amount = idlemeter_store::from_column(row.amount)?;
    let at = DateTime::from_timestamp(i64::from(row.deposited_at), 0).unwrap_or_default();
    let payload = serde_json::to_value(row).map_err(|error| Error::Write(error.to_string()))?;
    Ok(ledger
        .deposit(
            &row.issuer,
            &row.customer,
            &row.deposit_id,
            amount,
            at,
            &payload,
        )
        .await?)
}

/// A chunk's invoices as rows: (headers, lines).
type ChunkRows = (
    Vec<idlemeter_store::InvoiceRow>,
    Vec<idlemeter_store::InvoiceLineRow>,
);

fn chunk_rows(invoices: &[Invoice], issued_at: u32, written_ms: u64) -> Result<ChunkRows> {
    let mut headers = Vec::with_capacity(invoices.len());
    let mut lines = Vec::new();
    for invoice in invoices {
        let (header, rows) = invoice.to_rows(issued_at, written_ms)?;
        headers.push(header);
        lines.extend(rows);
    }
    Ok((headers, lines))
}

/// Lines first, then the headers in one insert: the headers are the
/// chunk's commit marker.
async fn write_rows(store: &Store, (headers, lines): ChunkRows) -> Result<()> {
    if headers.is_empty() {
        return Ok(());
    }
    store.insert_invoice_lines(&lines).await?;
    store.insert_invoices(&headers).await?;
    Ok(())
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

/// An exclusive lock on a file, held until dropped.
#[derive(Debug)]
struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Waits (up to 10 minutes) for the lock: a second run waits for the
    /// first, then finds its invoices issued.
    async fn acquire(path: &str) -> Result<Self> {
        let failed = |reason: String| Error::Lock {
            path: path.to_owned(),
            reason,
        };
        let path_buf = PathBuf::from(path);
        if let Some(parent) = path_buf.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| failed(e.to_string()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path_buf)
            .map_err(|e| failed(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(failed(
                            "still held by another run after 10 minutes".to_owned(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(failed(error.to_string())),
            }
        }
    }
}
