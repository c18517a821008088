//! Invoicing: closing billing periods into invoices that never change.
//!
//! [`Invoicer::close_period`] issues, for every customer with usage in the
//! period (or an earlier invoice, for plan fees), one invoice per (issuer,
//! customer, period, currency):
//! - usage, included-usage, fee and credit lines from the same core function
//!   as `idlemeter rate` and the online rater, over every sample of the period,
//!   with the one-time credit left after the customer's previous invoice (so an
//!   E2B Hobby $100 credit is consumed across months and never goes negative);
//! - an adjustment line per earlier period whose usage, re-rated now, differs
//!   from what was invoiced for it (late samples): the issued invoice is never
//!   changed, the difference is billed on this one and names its period;
//! - a tax line at the customer's rate, on the total after credits;
//! - a number: the issuer's last number + 1, in customer order, without gaps.
//!
//! Idempotent and crash-safe: lines are written first, then all headers of a
//! run in one insert, in number order; a header is the commit marker. A rerun
//! skips what has a header and recomputes the rest identically (same numbers,
//! same lines; orphaned lines of the crashed run collapse). Two runs at once on
//! one host are serialised by a lock file; run the scheduler in one place.

mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use idlemeter_core::invoice::{bill_customer, Adjustment, CustomerBill, LineKind};
use idlemeter_core::policy::{Policy, PolicyIdle};
use idlemeter_core::rating::{rate_samples, CustomerUsage, NumberedSample};
use idlemeter_core::{BillingOptions, CustomerId, PriceSheet, SessionOrConnection};
use idlemeter_rater::Period;
use idlemeter_store::{from_column, to_column, InvoiceRow, Store};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use render::{to_csv, to_html, to_json, Invoice};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] idlemeter_store::Error),
    #[error(transparent)]
    Core(#[from] idlemeter_core::Error),
    #[error(transparent)]
    Sheet(#[from] idlemeter_core::SheetError),
    #[error("tax rate of {customer}: {reason}")]
    TaxRate { customer: String, reason: String },
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
    #[error("lock {path}: {reason}")]
    Lock { path: String, reason: String },
    #[error("invoice of {customer}: {reason}")]
    Amount { customer: String, reason: String },
    #[error("invoice {number} of {customer} does not add up: lines {lines}, total {total}")]
    SumMismatch {
        number: u64,
        customer: String,
        lines: Decimal,
        total: Decimal,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `[invoicer]` settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InvoicerConfig {
    /// Who issues the invoices; numbering is per issuer.
    pub issuer: String,
    pub sheet: String,
    /// Idle policy file for rating (as the rater's); empty for the default.
    pub idle_policy: String,
    pub period: Period,
    /// Late usage arriving within this long after a period ends is on its
    /// invoice; later usage becomes an adjustment on the next one.
    pub grace_seconds: u64,
    /// When the scheduler looks for periods to close (cron, with seconds).
    pub schedule: String,
    /// How many earlier invoiced periods are re-rated for adjustments.
    pub adjust_lookback_periods: usize,
    /// Tax rate per customer, decimal strings ("0.2" for 20 %); default 0.
    pub tax_rates: BTreeMap<String, String>,
    /// Serialises runs on one host.
    pub lock_file: String,
}

impl Default for InvoicerConfig {
    fn default() -> Self {
        Self {
            issuer: "idlemeter".to_owned(),
            sheet: "prices/northflank.toml".to_owned(),
            idle_policy: String::new(),
            period: Period::Month,
            grace_seconds: 3600,
            schedule: "0 30 * * * *".to_owned(),
            adjust_lookback_periods: 3,
            tax_rates: BTreeMap::new(),
            // Absolute, so the scheduler and a CLI run started elsewhere on
            // the same host share it.
            lock_file: std::env::temp_dir()
                .join("idlemeter-invoicer.lock")
                .display()
                .to_string(),
        }
    }
}

/// What a close did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct CloseOutcome {
    /// Newly issued invoices (would-be, in a dry run), in number order.
    pub issued: Vec<Invoice>,
    /// Customers whose invoice for the period already existed.
    pub already_issued: Vec<Invoice>,
    /// For already issued invoices in a dry run: what a re-issue would total
    /// now, where it differs (the difference will be an adjustment).
    pub differences: Vec<(u64, String, Decimal, Decimal)>,
    /// Customers with nothing to bill.
    pub nothing_to_bill: usize,
    /// Customers skipped because they have an invoice for a later period.
    pub behind_a_later_invoice: Vec<String>,
    /// Customers whose invoice could not be computed (an amount too large
    /// to compute exactly, lines that do not add up), with why: reported in
    /// `rating_errors` and left unissued, while everyone else is invoiced.
    /// A later run retries them.
    pub failed: Vec<(String, String)>,
}

/// The invoicer with its sheet and policy loaded.
#[derive(Debug)]
pub struct Invoicer {
    store: Store,
    sheet: PriceSheet,
    sheet_checksum: String,
    idle: IdleRule,
    config: InvoicerConfig,
    tax_rates: BTreeMap<CustomerId, Decimal>,
}

#[derive(Debug)]
enum IdleRule {
    Default,
    Policy(Box<PolicyIdle>),
}

impl IdleRule {
    fn rate(&self, sheet: &PriceSheet, samples: &[NumberedSample]) -> Vec<CustomerUsage> {
        match self {
            IdleRule::Default => rate_samples(sheet, samples, &SessionOrConnection).customers,
            IdleRule::Policy(policy) => rate_samples(sheet, samples, policy.as_ref()).customers,
        }
    }
}

impl Invoicer {
    pub fn new(
        store: Store,
        sheet_text: &str,
        policy_text: Option<&str>,
        config: InvoicerConfig,
    ) -> Result<Self> {
        let sheet = PriceSheet::from_toml(sheet_text, &config.sheet)?;
        parse_schedule(&config.schedule)?;
        let mut digest = Sha256::new();
        digest.update(sheet_text.as_bytes());
        let idle = match policy_text {
            Some(text) => {
                digest.update(b"\0");
                digest.update(text.as_bytes());
                IdleRule::Policy(Box::new(PolicyIdle::new(Policy::from_toml(
                    text,
                    &config.idle_policy,
                )?)))
            }
            None => IdleRule::Default,
        };
        let sheet_checksum = digest
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let mut tax_rates = BTreeMap::new();
        for (customer, rate) in &config.tax_rates {
            let invalid = |reason: String| Error::TaxRate {
                customer: customer.clone(),
                reason,
            };
            let id = CustomerId::parse(customer.clone()).map_err(|e| invalid(e.to_string()))?;
            let rate: Decimal = rate
                .parse()
                .map_err(|e| invalid(format!("{rate:?} is not a decimal: {e}")))?;
            if rate.is_sign_negative() || rate >= Decimal::ONE {
                return Err(invalid(format!("{rate} is not in [0, 1)")));
            }
            tax_rates.insert(id, rate);
        }
        Ok(Self {
            store,
            sheet,
            sheet_checksum,
            idle,
            config,
            tax_rates,
        })
    }

    pub fn config(&self) -> &InvoicerConfig {
        &self.config
    }

    /// The period containing `time`.
    pub fn period_of(&self, time: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = self.config.period.start_of(time);
        (start, self.config.period.next(start))
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
        let issuer = &self.config.issuer;
        let issued = self.store.invoices(issuer).await?;
        let start_s = unix_secs(start);
        let mut outcome = CloseOutcome::default();
        let mut done: BTreeSet<String> = BTreeSet::new();
        for row in issued.iter().filter(|row| row.period_start == start_s) {
            done.insert(row.customer.clone());
            let lines = self.store.invoice_lines(row).await?;
            outcome
                .already_issued
                .push(Invoice::from_rows(row, &lines)?);
        }
        let mut customers: BTreeSet<String> = self
            .store
            .customers_with_samples(unix_ms(start), unix_ms(end))
            .await?
            .into_iter()
            .map(|(customer, _)| customer.as_str().to_owned())
            .collect();
        // Customers invoiced before keep being invoiced (plan fees, adjustments).
        customers.extend(
            issued
                .iter()
                .filter(|row| row.period_start < start_s)
                .map(|row| row.customer.clone()),
        );
        // A customer already invoiced for a later period is not invoiced
        // behind it: their credit and wallet balances have moved on.
        let later: BTreeSet<&str> = issued
            .iter()
            .filter(|row| row.period_start > start_s)
            .map(|row| row.customer.as_str())
            .collect();
        let todo: Vec<String> = customers
            .into_iter()
            .filter(|customer| !done.contains(customer))
            .filter(|customer| {
                let behind = later.contains(customer.as_str());
                if behind {
                    outcome.behind_a_later_invoice.push(customer.clone());
                }
                !behind
            })
            .collect();
        if !outcome.behind_a_later_invoice.is_empty() {
            tracing::warn!(
                count = outcome.behind_a_later_invoice.len(),
                period = %start,
                "customers already invoiced for a later period are skipped; their late usage will be an adjustment instead"
            );
        }
        if dry_run {
            for invoice in &outcome.already_issued {
                let usage = self
                    .prefetch(std::slice::from_ref(&invoice.customer), start, end, &issued)
                    .await?;
                let recomputed = self
                    .compute(
                        &invoice.customer,
                        start,
                        end,
                        &issued,
                        invoice.number,
                        &usage,
                    )
                    .await?;
                if let Some(recomputed) = recomputed {
                    if recomputed.total != invoice.total {
                        outcome.differences.push((
                            invoice.number,
                            invoice.customer.clone(),
                            invoice.total,
                            recomputed.total,
                        ));
                    }
                }
            }
        }
        let mut next = self.store.last_invoice_number(issuer).await? + 1;
        let mut computed = 0;
        for chunk in todo.chunks(CHUNK) {
            // One query per period for the whole chunk, not one per customer.
            let usage = self.prefetch(chunk, start, end, &issued).await?;
            for customer in chunk {
                match self
                    .compute(customer, start, end, &issued, next, &usage)
                    .await
                {
                    // Every amount must fit its column, checked here so that
                    // one customer's cannot fail the whole run's insert.
                    Ok(Some(invoice)) if let Err(unfit) = invoice.to_rows(0, 0) => {
                        let error = Error::Amount {
                            customer: customer.clone(),
                            reason: unfit.to_string(),
                        };
                        tracing::error!(%customer, %error, "invoice amounts do not fit the invoice tables; invoicing the others");
                        if !dry_run {
                            self.report_failure(customer, start_s, now, &error).await;
                        }
                        outcome.failed.push((customer.clone(), error.to_string()));
                    }
                    Ok(Some(invoice)) => {
                        outcome.issued.push(invoice);
                        next += 1;
                    }
                    Ok(None) => outcome.nothing_to_bill += 1,
                    // The store failing is everyone's problem.
                    Err(Error::Store(error)) => return Err(Error::Store(error)),
                    Err(error) => {
                        tracing::error!(%customer, %error, "invoice not computed; invoicing the others");
                        if !dry_run {
                            self.report_failure(customer, start_s, now, &error).await;
                        }
                        outcome.failed.push((customer.clone(), error.to_string()));
                    }
                }
                computed += 1;
                progress(computed, todo.len());
            }
        }
        if dry_run || outcome.issued.is_empty() {
            return Ok(outcome);
        }
        let issued_at = unix_secs(now);
        // Above every line written before, whatever this host's clock says,
        // so this run's lines replace a crashed run's.
        let written_ms = u64::try_from(Utc::now().timestamp_millis())
            .unwrap_or(0)
            .max(self.store.last_line_version(issuer).await? + 1);
        let mut lines = Vec::new();
        let mut headers = Vec::new();
        for invoice in &outcome.issued {
            let (header, rows) = invoice.to_rows(issued_at, written_ms)?;
            headers.push(header);
            lines.extend(rows);
        }
        for chunk in lines.chunks(100_000) {
            self.store.insert_invoice_lines(chunk).await?;
        }
        // One block: the run's headers appear together, so a crash before
        // this line leaves no header and a rerun numbers everything the same.
        self.store.insert_invoices(&headers).await?;
        tracing::info!(
            issuer = %issuer,
            period = %start,
            issued = outcome.issued.len(),
            already = outcome.already_issued.len(),
            "period closed"
        );
        Ok(outcome)
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
            detected_at: unix_secs(now),
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
        let schedule = parse_schedule(&self.config.schedule)?;
        tokio::pin!(shutdown);
        tracing::info!(schedule = %self.config.schedule, issuer = %self.config.issuer, "invoicer started");
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
            let previous = self
                .config
                .period
                .start_of(current - chrono::Duration::seconds(1));
            match self.close_period(previous, now, false, &|_, _| {}).await {
                Ok(outcome) => tracing::info!(
                    period = %previous,
                    issued = outcome.issued.len(),
                    already = outcome.already_issued.len(),
                    "scheduled close"
                ),
                Err(error) => {
                    tracing::warn!(period = %previous, %error, "scheduled close failed; retrying at the next firing")
                }
            }
        }
    }

    /// A draft of the open period for one customer: what the invoice would be
    /// if the period closed now. Never stored.
    pub async fn preview(&self, customer: &str, now: DateTime<Utc>) -> Result<Option<Invoice>> {
        let (start, end) = self.period_of(now);
        let issued = self.store.invoices(&self.config.issuer).await?;
        let usage = self
            .prefetch(&[customer.to_owned()], start, end, &issued)
            .await?;
        let mut draft = self
            .compute(customer, start, end, &issued, 0, &usage)
            .await?;
        if let Some(invoice) = &mut draft {
            invoice.status = "draft".to_owned();
        }
        Ok(draft)
    }

    /// The invoice of one customer for [start, end), numbered `number`;
    /// `None` when there is nothing to bill.
    async fn compute(
        &self,
        customer: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        issued: &[InvoiceRow],
        number: u64,
        prefetched: &Prefetched,
    ) -> Result<Option<Invoice>> {
        let id = CustomerId::parse(customer.to_owned())
            .map_err(|error| idlemeter_store::Error::BadRow(error.to_string()))?;
        let usage = prefetched.usage(unix_secs(start), &id, &self.sheet);
        let earlier: Vec<&InvoiceRow> = issued
            .iter()
            .filter(|row| row.customer == customer && row.period_start < unix_secs(start))
            .collect();
        let mut options = BillingOptions::default();
        if let Some(previous) = earlier.iter().max_by_key(|row| row.period_start) {
            let left = from_column(previous.one_time_credit_left)?;
            if !left.is_sign_negative() {
                options.one_time_credit_left.insert(id.clone(), left);
            }
        }
        let adjustments = self.adjustments(&id, &earlier, prefetched).await?;
        if !adjustments.is_empty() {
            options.adjustments.insert(id.clone(), adjustments);
        }
        let bill = bill_customer(&self.sheet, &usage, &options)?;
        let consumed = bill.lines.iter().any(|line| {
            matches!(line.kind, LineKind::Usage | LineKind::Included) && !line.quantity.is_zero()
        });
        if !consumed && bill.lines.iter().all(|line| line.amount.is_zero()) {
            // Nothing used and nothing charged: no invoice, no number.
            return Ok(None);
        }
        let tax_rate = self.tax_rates.get(&id).copied().unwrap_or_default();
        let digits = self.sheet.currency.minor_digits();
        let tax = self
            .sheet
            .line_rounding
            .round(bill.total.max(Decimal::ZERO) * tax_rate, digits);
        let one_time_credit_left = one_time_left_after(&bill, &options, &id);
        // The prepaid wallet pays what is due after credits and tax.
        let mut wallet_balance = prefetched
            .wallet_deposits
            .get(customer)
            .copied()
            .unwrap_or_default();
        for row in &earlier {
            wallet_balance -= from_column(row.wallet_applied)?;
        }
        // Deposits are not rounded at entry: the wallet pays whole minor units.
        let wallet_balance =
            wallet_balance.round_dp_with_strategy(digits, rust_decimal::RoundingStrategy::ToZero);
        let due = bill.total + tax;
        let wallet_applied = wallet_balance
            .max(Decimal::ZERO)
            .min(due.max(Decimal::ZERO));
        let invoice = Invoice::from_bill(
            &self.config.issuer,
            number,
            &bill,
            BillContext {
                start,
                end,
                currency: self.sheet.currency.code().to_owned(),
                sheet: self.config.sheet.clone(),
                sheet_checksum: self.sheet_checksum.clone(),
                tax_rate,
                tax,
                one_time_credit_left,
                wallet_balance,
                wallet_applied,
            },
        );
        let lines_sum: Decimal = invoice.lines.iter().map(|line| line.amount).sum();
        if lines_sum != invoice.total {
            return Err(Error::SumMismatch {
                number,
                customer: customer.to_owned(),
                lines: lines_sum,
                total: invoice.total,
            });
        }
        Ok(Some(invoice))
    }

    /// Rates the customers `first..=last` of `chunk` over [start, end) and
    /// over each earlier period some of them will need for adjustments.
    async fn prefetch(
        &self,
        chunk: &[String],
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        issued: &[InvoiceRow],
    ) -> Result<Prefetched> {
        let mut prefetched = Prefetched::default();
        let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
            return Ok(prefetched);
        };
        let members: BTreeSet<&str> = chunk.iter().map(String::as_str).collect();
        for (customer, amount) in self
            .store
            .wallet_deposits(&self.config.issuer, first, last, unix_secs(end))
            .await?
        {
            if members.contains(customer.as_str()) {
                prefetched
                    .wallet_deposits
                    .insert(customer, from_column(amount)?);
            }
        }
        let line_counts: std::collections::HashMap<(&str, u64), u16> = issued
            .iter()
            .map(|row| ((row.customer.as_str(), row.number), row.line_count))
            .collect();
        for (customer, number, line_no, for_period, amount) in self
            .store
            .adjustment_lines(&self.config.issuer, first, last)
            .await?
        {
            // A line beyond its header's count is a crashed run's leftover.
            let counted = line_counts
                .get(&(customer.as_str(), number))
                .is_some_and(|count| line_no <= *count);
            if counted && members.contains(customer.as_str()) {
                prefetched
                    .issued_adjustments
                    .entry(customer)
                    .or_default()
                    .push((for_period, from_column(amount)?));
            }
        }
        let mut periods: BTreeMap<u32, u32> = BTreeMap::new();
        periods.insert(unix_secs(start), unix_secs(end));
        for customer in &members {
            let mut earlier: Vec<&InvoiceRow> = issued
                .iter()
                .filter(|row| row.customer == *customer && row.period_start < unix_secs(start))
                .collect();
            earlier.sort_by_key(|row| std::cmp::Reverse(row.period_start));
            for row in earlier
                .into_iter()
                .take(self.config.adjust_lookback_periods)
            {
                periods.insert(row.period_start, row.period_end);
            }
        }
        for (period_start, period_end) in periods {
            let samples: Vec<NumberedSample> = self
                .store
                .samples_for_rating_range(
                    first,
                    last,
                    u64::from(period_start) * 1000,
                    u64::from(period_end) * 1000,
                )
                .await?
                .into_iter()
                .filter(|sample| members.contains(sample.customer.as_str()))
                .enumerate()
                .map(|(position, sample)| NumberedSample {
                    line: position as u64 + 1,
                    sample,
                })
                .collect();
            let rated = self.idle.rate(&self.sheet, &samples);
            prefetched.by_period.insert(
                period_start,
                rated
                    .into_iter()
                    .map(|usage| (usage.customer.as_str().to_owned(), usage))
                    .collect(),
            );
        }
        Ok(prefetched)
    }

    /// For each of the customer's latest invoiced periods rated under this
    /// very sheet (and policy): what that period owes now beyond what was
    /// billed for it. Both sides are taken after that period's own monthly
    /// credit, which expired with it: usage re-rated now, less the monthly
    /// credit it would have had, minus (the invoice's usage and fees less the
    /// monthly credit it applied, plus adjustments already issued for it).
    /// One-time credits are a balance and cover the adjustment on this
    /// invoice instead. Periods rated under another sheet are not re-rated:
    /// a price change is not late usage.
    async fn adjustments(
        &self,
        customer: &CustomerId,
        earlier: &[&InvoiceRow],
        prefetched: &Prefetched,
    ) -> Result<Vec<Adjustment>> {
        let mut recent: Vec<&&InvoiceRow> = earlier
            .iter()
            .filter(|row| row.sheet_checksum == self.sheet_checksum)
            .collect();
        recent.sort_by_key(|row| std::cmp::Reverse(row.period_start));
        recent.truncate(self.config.adjust_lookback_periods);
        recent.reverse();
        let issued_adjustments = prefetched
            .issued_adjustments
            .get(customer.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let no_one_time = BillingOptions {
            one_time_credit_left: [(customer.clone(), Decimal::ZERO)].into_iter().collect(),
            ..BillingOptions::default()
        };
        let mut adjustments = Vec::new();
        for row in recent {
            let start =
                DateTime::from_timestamp(i64::from(row.period_start), 0).unwrap_or_default();
            let usage = prefetched.usage(row.period_start, customer, &self.sheet);
            let rebilled = bill_customer(&self.sheet, &usage, &no_one_time)?;
            let monthly_granted: Decimal = rebilled
                .lines
                .iter()
                .filter(|line| line.resource == "credit.monthly")
                .filter_map(|line| line.credit_available)
                .sum();
            let fees = from_column(row.fees)?;
            let owed_now = (rebilled.subtotal + fees - monthly_granted).max(Decimal::ZERO);
            let mut billed = from_column(row.subtotal)? + fees + from_column(row.monthly_credits)?;
            for (period, amount) in issued_adjustments {
                if *period == row.period_start {
                    billed += *amount;
                }
            }
            let difference = owed_now - billed;
            if !difference.is_zero() {
                adjustments.push(Adjustment {
                    period_start: start,
                    amount: difference,
                    note: format!(
                        "period from {} re-rated after late samples: {billed} billed, {owed_now} owed",
                        start.format("%Y-%m-%d")
                    ),
                });
            }
        }
        Ok(adjustments)
    }
}

/// How many customers are rated per query.
const CHUNK: usize = 2_000;

/// Rated usage of a chunk of customers, per period start (Unix seconds).
#[derive(Debug, Default)]
struct Prefetched {
    by_period: BTreeMap<u32, std::collections::HashMap<String, CustomerUsage>>,
    /// Wallet deposits made before the period's end, per customer.
    wallet_deposits: std::collections::HashMap<String, Decimal>,
    /// Adjustments already issued, per customer: (for_period, amount).
    issued_adjustments: std::collections::HashMap<String, Vec<(u32, Decimal)>>,
}

impl Prefetched {
    /// The customer's usage in the period; nothing if they had none (or the
    /// period was not prefetched, which `prefetch` rules out).
    fn usage(&self, period_start: u32, customer: &CustomerId, sheet: &PriceSheet) -> CustomerUsage {
        self.by_period
            .get(&period_start)
            .and_then(|customers| customers.get(customer.as_str()))
            .cloned()
            .unwrap_or_else(|| CustomerUsage::nothing(customer.clone(), sheet))
    }
}

/// The one-time credit left after `bill`: what was available minus what the
/// bill applied; -1 when the plan has no one-time credit.
fn one_time_left_after(
    bill: &CustomerBill,
    options: &BillingOptions,
    customer: &CustomerId,
) -> Decimal {
    bill.lines
        .iter()
        .find(|line| line.kind == LineKind::Credit && line.resource == "credit.one_time")
        .and_then(|line| {
            line.credit_available
                .map(|available| available + line.amount)
        })
        .or_else(|| options.one_time_credit_left.get(customer).copied())
        .unwrap_or(Decimal::NEGATIVE_ONE)
}

/// What an invoice adds to its bill.
#[derive(Debug, Clone)]
pub(crate) struct BillContext {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub currency: String,
    pub sheet: String,
    pub sheet_checksum: String,
    pub tax_rate: Decimal,
    pub tax: Decimal,
    pub one_time_credit_left: Decimal,
    pub wallet_balance: Decimal,
    pub wallet_applied: Decimal,
}

fn parse_schedule(schedule: &str) -> Result<cron::Schedule> {
    schedule
        .parse()
        .map_err(|error: cron::error::Error| Error::Schedule {
            schedule: schedule.to_owned(),
            reason: error.to_string(),
        })
}

fn unix_ms(time: DateTime<Utc>) -> u64 {
    u64::try_from(time.timestamp_millis()).unwrap_or(0)
}

fn unix_secs(time: DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp()).unwrap_or(0)
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

/// Decimal <-> column, for the render module.
pub(crate) fn column(value: Decimal) -> Result<i128> {
    Ok(to_column(value)?)
}
