//! Customer accounts, read for billing: what each customer brings to a bill
//! besides its usage ([`idlemeter_core::Account`]). The rater's figures, the
//! invoice preview and the close all read them here, so that one customer's
//! account is the same wherever its money is computed.
//!
//! For a period starting at `P`, as at an instant `at`:
//! - the one-time credit left after the customer's latest invoice before `P`;
//! - the prepaid wallet: deposits made before `at`, less what invoices before
//!   `P` drew from it;
//! - the credit balance: credit notes settled to the next invoice issued
//!   before `at`, plus what invoices before `P` carried to it, less what
//!   they applied of it;
//! - the tax rate of `[billing] tax_rates`;
//! - an adjustment for each of the latest `adjust_lookback_periods` invoiced
//!   periods rated under the same sheet and policy, whose rated quantities
//!   (the rater's newest state of that period, re-rated when late samples
//!   arrive) now bill more or less than was invoiced for them.
//!
//! Every read covers a range of customers in one query per table, so that a
//! close of a million customers costs a few queries per chunk.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use idlemeter_core::rating::CustomerUsage;
use idlemeter_core::{
    adjustment_for, Account, BillingTerms, CustomerId, InvoicedPeriod, PlanSpan, PriceSheet,
    Subscription,
};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use crate::invoices::Carried;
use crate::sql::{statement, Fetch};
use crate::{from_column, Context, CustomerRow, Error, InvoiceRow, Result, Store, SubscriptionRow};

/// The checksum rated figures, states and invoices are keyed by: the sheet's
/// text and, when an idle policy classifies idle time, the policy's.
pub fn ratings_checksum(sheet_text: &str, policy_text: Option<&str>) -> String {
    let sheet = hex(&Sha256::digest(sheet_text.as_bytes()));
    match policy_text {
        None => sheet,
        Some(policy) => with_policy(&sheet, policy),
    }
}

/// The price sheet and idle policy money is rated with (`[rater] sheet` and
/// `[rater] idle_policy`): the invoicer and the API bill with the same ones,
/// and find the rater's figures by their checksum.
#[derive(Debug, Clone, Copy)]
pub struct SheetSource<'a> {
    pub sheet_text: &'a str,
    /// The sheet's path, for messages and invoices.
    pub sheet_label: &'a str,
    /// `(text, path)` of the idle policy, if one classifies idle time.
    pub policy: Option<(&'a str, &'a str)>,
}

impl SheetSource<'_> {
    pub fn checksum(&self) -> String {
        ratings_checksum(self.sheet_text, self.policy.map(|(text, _)| text))
    }

    /// The version label of the idle rule ratings under this source carry.
    pub fn idle_version(&self) -> std::result::Result<String, idlemeter_core::SheetError> {
        use idlemeter_core::IdlePolicy as _;
        Ok(match self.policy {
            Some((text, label)) => {
                idlemeter_core::policy::Policy::from_toml(text, label)?.version_label()
            }
            None => idlemeter_core::SessionOrConnection.version().to_owned(),
        })
    }
}

/// A sheet's checksum combined with an idle policy's text.
pub fn with_policy(sheet_checksum: &str, policy_text: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(sheet_checksum.as_bytes());
    digest.update(b"\0");
    digest.update(policy_text.as_bytes());
    hex(&digest.finalize())
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// How accounts are read: the terms, their parsed tax rates, and the sheet
/// (and checksum) whose rated quantities adjustments compare.
#[derive(Debug, Clone, Copy)]
pub struct AccountReader<'a> {
    pub store: &'a Store,
    pub terms: &'a BillingTerms,
    pub tax_rates: &'a BTreeMap<CustomerId, Decimal>,
    pub sheet: &'a PriceSheet,
    pub sheet_checksum: &'a str,
    /// Adjustments already billed (see [`Self::issued_adjustments`]), read
    /// once for a whole run; `None` reads them per range.
    pub adjusted: Option<&'a Adjusted>,
}

/// Adjustments already billed, per (customer, period they adjust).
pub type Adjusted = HashMap<(String, u32), Decimal>;

/// The accounts of a range of customers.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    /// Every customer of the range with an invoice before the period, a
    /// deposit or a tax rate; others have a new account.
    pub accounts: BTreeMap<CustomerId, Account>,
    /// Customers invoiced before the period (they are invoiced again: fees).
    pub invoiced_before: BTreeSet<String>,
    /// Customers with an invoice for this period already: (customer, number).
    pub invoiced_now: BTreeMap<String, InvoiceRow>,
    /// Customers invoiced for a later period: their balances moved on.
    pub invoiced_later: BTreeSet<String>,
    /// Invoiced periods that could not be compared for an adjustment (no
    /// rated quantities of that period under this sheet): (customer, period).
    pub not_adjustable: Vec<(String, u32)>,
    /// The buyer details of customers with a record (name, tax id, billing
    /// email), frozen on the invoices issued now.
    pub buyers: BTreeMap<String, Vec<String>>,
}

impl Accounts {
    pub fn account(&self, customer: &CustomerId) -> Account {
        self.accounts.get(customer).cloned().unwrap_or_default()
    }
}

impl AccountReader<'_> {
    /// Accounts of the customers `first..=last` for the period starting at
    /// `period_start`, as at `at` (see the module doc).
    pub async fn read(
        &self,
        first: &str,
        last: &str,
        period_start: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<Accounts> {
        let issuer = self.terms.issuer.as_str();
        let period = unix(period_start);
        let mut out = Accounts::default();
        let period_end = self.terms.period.next(period_start);
        let (invoices, deposits, credit_notes, records, subscriptions) = futures::future::join5(
            self.store.invoices_between(issuer, first, last),
            self.store
                .carried(Carried::WalletDeposits, (issuer, first, last), unix(at)),
            self.store
                .carried(Carried::CreditNotes, (issuer, first, last), unix(at)),
            self.store.customers_between(issuer, first, last),
            self.store
                .subscriptions_between(issuer, first, last, unix(period_end)),
        )
        .await;
        let (invoices, deposits, credit_notes) = (invoices?, deposits?, credit_notes?);
        let records: HashMap<String, CustomerRow> = records?
            .into_iter()
            .map(|row| (row.id.clone(), row))
            .collect();
        let mut plan_changes: HashMap<String, Vec<SubscriptionRow>> = HashMap::new();
        for row in subscriptions? {
            plan_changes
                .entry(row.customer.clone())
                .or_default()
                .push(row);
        }
        let mut earlier: HashMap<&str, Vec<&InvoiceRow>> = HashMap::new();
        for row in &invoices {
            match row.period_start.cmp(&period) {
                std::cmp::Ordering::Less => {
                    earlier.entry(row.customer.as_str()).or_default().push(row)
                }
                std::cmp::Ordering::Equal => {
                    out.invoiced_now.insert(row.customer.clone(), row.clone());
                }
                std::cmp::Ordering::Greater => {
                    out.invoiced_later.insert(row.customer.clone());
                }
            }
        }
        let deposits: HashMap<String, i128> = deposits.into_iter().collect();
        let credit_notes: HashMap<String, i128> = credit_notes.into_iter().collect();
        // Which earlier periods each customer may be adjusted for.
        let mut lookback: BTreeMap<u32, Vec<&InvoiceRow>> = BTreeMap::new();
        for rows in earlier.values_mut() {
            rows.sort_by_key(|row| std::cmp::Reverse(row.period_start));
            for row in rows
                .iter()
                .filter(|row| row.sheet_checksum == self.sheet_checksum)
                .take(self.terms.adjust_lookback_periods)
            {
                lookback.entry(row.period_start).or_default().push(row);
            }
        }
        let read_here;
        let adjusted = match self.adjusted {
            Some(adjusted) => adjusted,
            None if lookback.is_empty() => {
                read_here = Adjusted::new();
                &read_here
            }
            None => {
                read_here = self.issued_adjustments(&invoices).await?;
                &read_here
            }
        };
        let mut adjustments: BTreeMap<String, Vec<idlemeter_core::Adjustment>> = BTreeMap::new();
        for (earlier_period, rows) in &lookback {
            // Only quantities rated through the period's end from every
            // sample stored for it: a state still short of late samples
            // would adjust by less than the usage (even credit back what
            // the invoice billed from the samples); the rater re-rates it,
            // and a later invoice adjusts.
            let earlier_start = time(*earlier_period);
            let period = (earlier_start, self.terms.period.next(earlier_start));
            let rated = self
                .store
                .rated_through((first, last), period, self.sheet_checksum)
                .await?
                .complete;
            for row in rows {
                let Some(quantities) = rated.get(&row.customer) else {
                    out.not_adjustable
                        .push((row.customer.clone(), *earlier_period));
                    continue;
                };
                let customer = customer_id(&row.customer)?;
                let usage =
                    CustomerUsage::from_text(&quantities.usage, customer.clone(), self.sheet)
                        .map_err(|error| Error::BadRow(error.to_string()))?;
                let invoiced = InvoicedPeriod {
                    subscription: subscription(
                        self.sheet,
                        &customer,
                        plan_changes.get(&row.customer).map(Vec::as_slice),
                        earlier_start,
                        period.1,
                    ),
                    period_start: earlier_start,
                    subtotal: from_column(row.subtotal)?,
                    fees: from_column(row.fees)?,
                    monthly_credits: from_column(row.monthly_credits)?,
                    adjusted: adjusted
                        .get(&(row.customer.clone(), row.period_start))
                        .copied()
                        .unwrap_or_default(),
                };
                if let Some(adjustment) = adjustment_for(self.sheet, &usage, &invoiced)
                    .map_err(|error| Error::BadRow(error.to_string()))?
                {
                    adjustments
                        .entry(row.customer.clone())
                        .or_default()
                        .push(adjustment);
                }
            }
        }
        let mut customers: BTreeSet<&str> = earlier.keys().copied().collect();
        customers.extend(deposits.keys().map(String::as_str));
        customers.extend(credit_notes.keys().map(String::as_str));
        customers.extend(records.keys().map(String::as_str));
        customers.extend(plan_changes.keys().map(String::as_str));
        let mut with_tax: Vec<&CustomerId> = self
            .tax_rates
            .keys()
            .filter(|customer| customer.as_str() >= first && customer.as_str() <= last)
            .collect();
        with_tax.sort();
        customers.extend(with_tax.iter().map(|customer| customer.as_str()));
        for customer in customers {
            let id = customer_id(customer)?;
            let rows = earlier.get(customer).map(Vec::as_slice).unwrap_or_default();
            let one_time_credit_left = rows
                .first()
                .map(|latest| from_column(latest.one_time_credit_left))
                .transpose()?
                .filter(|left| !left.is_sign_negative());
            let mut wallet_balance = deposits
                .get(customer)
                .map(|amount| from_column(*amount))
                .transpose()?
                .unwrap_or_default();
            let mut credit_balance = credit_notes
                .get(customer)
                .map(|amount| from_column(*amount))
                .transpose()?
                .unwrap_or_default();
            for row in rows {
                wallet_balance -= from_column(row.wallet_applied)?;
                credit_balance +=
                    from_column(row.balance_carried)? - from_column(row.balance_applied)?;
            }
            let mut account_adjustments = adjustments.remove(customer).unwrap_or_default();
            account_adjustments.sort_by_key(|adjustment| adjustment.period_start);
            if !rows.is_empty() {
                out.invoiced_before.insert(customer.to_owned());
            }
            let record = records.get(customer);
            if let Some(record) = record {
                out.buyers.insert(customer.to_owned(), buyer_lines(record));
            }
            // The customer's record decides their tax rate (when it has
            // one) and currency; else `[billing] tax_rates` and the sheet's.
            let recorded_rate = record
                .map(|record| from_column(record.tax_rate))
                .transpose()?
                .filter(|rate| !rate.is_sign_negative());
            let tax_rate = match recorded_rate {
                Some(rate) => rate,
                None => self.tax_rates.get(&id).copied().unwrap_or_default(),
            };
            let subscription = subscription(
                self.sheet,
                &id,
                plan_changes.get(customer).map(Vec::as_slice),
                period_start,
                period_end,
            );
            out.accounts.insert(
                id.clone(),
                Account {
                    one_time_credit_left,
                    adjustments: account_adjustments,
                    tax_rate,
                    wallet_balance,
                    credit_balance,
                    subscription,
                    currency: record.map(|record| record.currency.clone()),
                },
            );
        }
        Ok(out)
    }

    /// Adjustments already billed on `invoices`, per (customer, period they
    /// adjust): their adjustment lines, found by number (the lines' key), a
    /// line beyond its header's count being a crashed run's leftover.
    pub async fn issued_adjustments(&self, invoices: &[InvoiceRow]) -> Result<Adjusted> {
        let line_counts: HashMap<(&str, u64), u16> = invoices
            .iter()
            .map(|row| ((row.customer.as_str(), row.number), row.line_count))
            .collect();
        let mut adjusted = Adjusted::new();
        let numbers: Vec<u64> = invoices.iter().map(|row| row.number).collect();
        for (customer, number, line_no, for_period, amount) in self
            .store
            .adjustment_lines_of(&self.terms.issuer, &numbers)
            .await?
        {
            let counted = line_counts
                .get(&(customer.as_str(), number))
                .is_some_and(|count| line_no <= *count);
            if counted {
                *adjusted.entry((customer, for_period)).or_default() += from_column(amount)?;
            }
        }
        Ok(adjusted)
    }
}

impl AccountReader<'_> {
    /// Every adjustment already billed by the issuer: read once for a close
    /// (adjustment lines are few), then shared by its chunks.
    pub async fn all_issued_adjustments(&self) -> Result<Adjusted> {
        let issuer = self.terms.issuer.as_str();
        let counts: HashMap<(String, u64), u16> = self
            .store
            .client
            .query(
                "SELECT customer, number, line_count FROM invoices FINAL WHERE issuer = ? \
                 AND (customer, number) IN (SELECT customer, number FROM invoice_lines \
                 WHERE issuer = ? AND kind = 'adjustment')",
            )
            .bind(issuer)
            .bind(issuer)
            .fetch_all::<(String, u64, u16)>()
            .await
            .context("line counts of invoices with adjustments")?
            .into_iter()
            .map(|(customer, number, count)| ((customer, number), count))
            .collect();
        let mut adjusted = Adjusted::new();
        for (customer, number, line_no, for_period, amount) in self
            .store
            .adjustment_lines(issuer, "", "\u{10ffff}")
            .await?
        {
            let counted = counts
                .get(&(customer.clone(), number))
                .is_some_and(|count| line_no <= *count);
            if counted {
                *adjusted.entry((customer, for_period)).or_default() += from_column(amount)?;
            }
        }
        Ok(adjusted)
    }
}

impl Store {
    /// Customers with a rating state in a period under a checksum: those
    /// the rater rated.
    pub async fn rated_customers(
        &self,
        period_start: u32,
        sheet_checksum: &str,
    ) -> Result<Vec<String>> {
        statement!(
            self.client,
            "SELECT DISTINCT customer FROM rating_state \
             WHERE period_start = toDateTime({period_start}) \
             AND sheet_checksum = {sheet_checksum} ORDER BY customer",
            period_start,
            sheet_checksum,
        )
        .all("customers rated in a period")
        .await
    }

    /// Customers with an invoice of the issuer.
    pub async fn invoiced_customers(&self, issuer: &str) -> Result<Vec<String>> {
        self.client
            .query("SELECT DISTINCT customer FROM invoices WHERE issuer = ? ORDER BY customer")
            .bind(issuer)
            .all(format!("customers invoiced by {issuer}"))
            .await
    }

    /// Every invoice header of the customers `first..=last` of an issuer.
    pub async fn invoices_between(
        &self,
        issuer: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<InvoiceRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM invoices FINAL WHERE issuer = {issuer} \
             AND customer >= {first} AND customer <= {last} ORDER BY customer, period_start",
            issuer,
            first,
            last
        )
        .all(format!("invoices of {first} .. {last}"))
        .await
    }
}

/// A customer record as an invoice's buyer block: name, the id, tax id and
/// billing email, the empty ones left out.
fn buyer_lines(record: &CustomerRow) -> Vec<String> {
    [
        record.name.clone(),
        format!("Customer {}", record.id),
        if record.tax_id.is_empty() {
            String::new()
        } else {
            format!("Tax ID {}", record.tax_id)
        },
        record.billing_email.clone(),
    ]
    .into_iter()
    .filter(|line| !line.is_empty())
    .collect()
}

/// The plans a customer was on from `start` to `end`, from their plan
/// changes (effective before `end`, in date order): the plan in force at
/// `start` (the last change at or before it, else the sheet's plan for
/// them), then each change within. `None` without any change: the sheet's
/// plan applies as it always did.
pub fn subscription(
    sheet: &PriceSheet,
    customer: &CustomerId,
    changes: Option<&[SubscriptionRow]>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Option<Subscription> {
    let changes = changes.filter(|changes| !changes.is_empty())?;
    let (start_s, end_s) = (start.timestamp(), end.timestamp());
    let mut current: Option<String> = sheet.plan_for(customer).map(|plan| plan.name.clone());
    let mut cursor = start_s;
    let mut spans: Vec<PlanSpan> = Vec::new();
    let close = |plan: &Option<String>, from: i64, to: i64, spans: &mut Vec<PlanSpan>| {
        let Some(plan) = plan else { return };
        if to <= from {
            return;
        }
        let seconds = (to - from) as u64;
        match spans.last_mut() {
            Some(last) if &last.plan == plan => last.seconds += seconds,
            _ => spans.push(PlanSpan {
                plan: plan.clone(),
                from: time_s(from),
                seconds,
            }),
        }
    };
    for change in changes {
        let at = i64::from(change.effective_from);
        if at >= end_s {
            break;
        }
        if at > cursor {
            close(&current, cursor, at, &mut spans);
            cursor = at;
        }
        current = Some(change.plan.clone());
    }
    close(&current, cursor, end_s, &mut spans);
    Some(Subscription {
        spans,
        period_seconds: u64::try_from(end_s - start_s).unwrap_or(0),
    })
}

fn time_s(unix: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(unix, 0).unwrap_or_default()
}

fn customer_id(name: &str) -> Result<CustomerId> {
    CustomerId::parse(name.to_owned()).map_err(|error| Error::BadRow(error.to_string()))
}

fn unix(time: DateTime<Utc>) -> u32 {
    u32::try_from(time.timestamp()).unwrap_or(0)
}

fn time(unix: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(unix), 0).unwrap_or_default()
}
