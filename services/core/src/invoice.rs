//! The billing function: from rated quantities and a customer's account to
//! the lines and total of their bill. Every figure that is money in
//! idlemeter comes from [`bill`]: the rater's hourly and live figures (so
//! `/cost`, `/cost/history`, spend alerts, budget caps and the dashboards),
//! the invoice preview and the issued invoice. They differ only in the
//! usage and the [`Account`] they pass.
//!
//! A usage line's exact amount is the fraction
//! `quantity_base x unit_price / unit_divisor`, computed in integers and
//! rounded to the minor unit by the sheet's rule in one step. Fees, credits
//! and tax are rounded once each. Totals are sums of rounded lines, checked
//! before they are returned.
//!
//! Order of the lines and of the arithmetic:
//! 1. usage and included lines (`subtotal`), the plan fee (`fees`) and
//!    adjustments of earlier periods (`adjustments`);
//!
//!    A customer whose plan changed during the period (a [`Subscription`])
//!    is billed each plan **per second**: a plan's monthly fee, included
//!    usage and monthly credit count for the share of the period's seconds
//!    the customer was on it. Each plan's fee is its own line, rounded
//!    once; the allowances of the plans are pooled (each share rounded down
//!    to a whole base unit) and consumed in the usual order; the one-time
//!    credit is that of the first plan in the period that grants one;
//! 2. credits: monthly ones first, on this period's charges only, then the
//!    one-time balance on what is still payable, adjustments included; never
//!    more than is payable (`credits`, zero or negative);
//! 3. tax at the account's rate on what is payable after credits (`tax`);
//!    `spend` is what the period costs: everything so far;
//! 4. the customer's credit balance (credit notes settled to the next
//!    invoice, negative totals carried forward) pays the spend, up to its
//!    balance (`balance_applied`); a negative spend is not issued as a
//!    negative total: it is carried to the balance (`balance_carried`) and
//!    the total is zero;
//! 5. the prepaid wallet pays what is left, up to its balance, in whole
//!    minor units (`wallet_applied`); `total` is what is left due.
//!
//! `total` is the sum of every line, never negative, and
//! `spend = total + wallet_applied + balance_applied - balance_carried`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ids::CustomerId;
use crate::money::{Money, RoundingRule};
use crate::pricing::{
    base_unit_name, CreditKind, PriceSheet, PricedBand, ResourcePrice, ResourceSlot,
};
use crate::rating::CustomerUsage;

/// Decimal places of a displayed quantity. The amount never uses it: it is
/// computed from the exact base quantity.
const QUANTITY_DISPLAY_DIGITS: u32 = 12;

/// What a line bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// Metered usage at a price.
    Usage,
    /// Usage covered by the plan's included allowance, at zero.
    Included,
    /// The plan's fee for the period.
    Fee,
    /// A credit applied against the period's charges (a negative amount).
    Credit,
    /// Usage of an earlier, already invoiced period that arrived after it
    /// closed (or a correction of it), billed on this invoice.
    Adjustment,
    /// Tax on what is payable after credits.
    Tax,
    /// A payment from the customer's prepaid wallet (a negative amount).
    Wallet,
    /// Running time the idle rule classified idle, on a resource billed only
    /// while active: in seconds, not billed (amount zero). One per such
    /// resource and price version, after its usage lines.
    Idle,
    /// The customer's credit balance: `balance.applied` pays part of the
    /// spend (a negative amount); `balance.carried` moves a negative spend
    /// to the balance (a positive amount, the total being zero).
    Balance,
}

impl LineKind {
    /// The name used in JSON and in ClickHouse columns.
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Usage => "usage",
            LineKind::Included => "included",
            LineKind::Fee => "fee",
            LineKind::Credit => "credit",
            LineKind::Adjustment => "adjustment",
            LineKind::Tax => "tax",
            LineKind::Wallet => "wallet",
            LineKind::Idle => "idle",
            LineKind::Balance => "balance",
        }
    }
}

/// One line of a customer's bill. Every number serializes as a decimal string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    pub kind: LineKind,
    /// `vcpu`, `memory`, `gpu.H100`, `disk`, `egress`, `plan.pro`,
    /// `credit.monthly`, `credit.one_time`.
    pub resource: String,
    /// In `unit`, rounded for display to 12 decimal places.
    pub quantity: Decimal,
    pub unit: String,
    pub unit_price: Decimal,
    /// Rounded once to the currency's minor unit by the sheet's rule.
    pub amount: Decimal,
    /// Effective date of the price version that priced the line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_version: Option<DateTime<Utc>>,
    /// 1-based tier of a tiered price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<usize>,
    /// The exact quantity in integer base units, traceable to the counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity_base: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_unit: Option<&'static str>,
    /// For a credit or wallet line, what was available before applying it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credit_available: Option<Decimal>,
}

/// One customer's bill for the rated period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerBill {
    pub customer: CustomerId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    pub lines: Vec<InvoiceLine>,
    /// Sum of the usage and included lines.
    pub subtotal: Decimal,
    /// Sum of the fee lines.
    pub fees: Decimal,
    /// Sum of the adjustment lines (late usage of earlier periods).
    pub adjustments: Decimal,
    /// Sum of the credit lines (zero or negative).
    pub credits: Decimal,
    /// The part of `credits` that is the plan's monthly credit (what a later
    /// adjustment of this period nets against).
    pub monthly_credits: Decimal,
    /// The account's tax rate and the tax line's amount.
    pub tax_rate: Decimal,
    pub tax: Decimal,
    /// What the period costs: `subtotal + fees + adjustments + credits +
    /// tax`. Spend alerts and budget caps compare this.
    pub spend: Decimal,
    /// Credit balance available before this bill, what it paid, and the
    /// negative spend this bill carried to it (each zero or positive).
    pub credit_balance: Decimal,
    pub balance_applied: Decimal,
    pub balance_carried: Decimal,
    /// Prepaid balance available before this bill, and what it paid.
    pub wallet_balance: Decimal,
    pub wallet_applied: Decimal,
    /// The sum of every line: `spend - balance_applied + balance_carried -
    /// wallet_applied`, what is due. Never negative.
    pub total: Decimal,
    /// One-time credit left after this bill; `None` when the plan has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_time_credit_left: Option<Decimal>,
}

impl CustomerBill {
    /// Nothing used and nothing charged: no invoice (and no number) for it.
    pub fn bills_nothing(&self) -> bool {
        let consumed = self.lines.iter().any(|line| {
            matches!(line.kind, LineKind::Usage | LineKind::Included) && !line.quantity.is_zero()
        });
        !consumed && self.lines.iter().all(|line| line.amount.is_zero())
    }
}

/// Late usage of an earlier period, to bill on this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    /// The earlier period's start; the line is named after it.
    pub period_start: DateTime<Utc>,
    /// Already rounded to the currency's minor unit.
    pub amount: Decimal,
    /// Why, for people: `usage of 2026-10 re-rated: 67.74 -> 70.11`.
    pub note: String,
}

/// What a customer brings to a bill beyond its usage: what is left of the
/// one-time credit, adjustments of earlier periods, the tax rate and the
/// prepaid wallet. [`Account::default`] is a new account: the plan's whole
/// one-time credit, nothing to adjust, no tax, no wallet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    /// `None`: the plan's whole one-time credit (the first period billed).
    pub one_time_credit_left: Option<Decimal>,
    /// Adjustments to bill on this period. They are payable like usage:
    /// the one-time credit applies to them too.
    pub adjustments: Vec<Adjustment>,
    /// In [0, 1): 0.2 is 20 %.
    pub tax_rate: Decimal,
    /// Prepaid money available: deposits so far less what earlier invoices
    /// drew. Paid out in whole minor units, never below zero.
    pub wallet_balance: Decimal,
    /// Credit owed to the customer: credit notes settled to the next
    /// invoice and negative totals carried forward, less what earlier
    /// invoices applied. Applied before the wallet, in whole minor units.
    pub credit_balance: Decimal,
    /// The plans the customer was on during the period, from their
    /// subscription; `None`: the sheet's plan for them, all period.
    pub subscription: Option<Subscription>,
    /// The currency the customer is billed in, from their record; `None`
    /// for the sheet's. A sheet in another currency refuses to bill them.
    pub currency: Option<String>,
}

/// The plans a customer was on during one period, in order: each counts
/// for its share of the period's seconds (see [`bill`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub spans: Vec<PlanSpan>,
    /// Seconds in the period.
    pub period_seconds: u64,
}

/// A plan and how long, within the period, the customer was on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSpan {
    pub plan: String,
    /// When the span starts (the plan's effective date, or the period's
    /// start).
    pub from: DateTime<Utc>,
    pub seconds: u64,
}

/// Accounts by customer, for billing many customers at once; a customer not
/// in the map has a new account ([`Account::default`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillingOptions {
    pub accounts: BTreeMap<CustomerId, Account>,
}

impl BillingOptions {
    pub fn account(&self, customer: &CustomerId) -> Cow<'_, Account> {
        self.accounts
            .get(customer)
            .map_or_else(|| Cow::Owned(Account::default()), Cow::Borrowed)
    }
}

/// Prices one customer's rated usage into a bill with their account in
/// `options` (a new account if absent).
pub fn bill_customer(
    sheet: &PriceSheet,
    usage: &CustomerUsage,
    options: &BillingOptions,
) -> Result<CustomerBill> {
    bill(sheet, usage, &options.account(&usage.customer))
}

/// The billing function (see the module doc).
pub fn bill(sheet: &PriceSheet, usage: &CustomerUsage, account: &Account) -> Result<CustomerBill> {
    let pricer = LinePricer {
        sheet,
        customer: &usage.customer,
        plans: &[],
    };
    if let Some(currency) = &account.currency {
        if currency != sheet.currency.code() {
            return Err(Error::Currency {
                customer: usage.customer.to_string(),
                currency: currency.clone(),
                sheet: sheet.label.clone(),
                sheet_currency: sheet.currency.code().to_owned(),
            });
        }
    }
    let plans = plans_of(sheet, &usage.customer, account.subscription.as_ref())?;
    let pricer = LinePricer {
        plans: &plans,
        ..pricer
    };
    let mut lines = pricer.usage_lines(usage)?;
    let subtotal = pricer.sum(&lines)?;
    let fee_lines: Vec<InvoiceLine> = plans
        .iter()
        .filter(|share| !share.plan.monthly_fee.is_zero())
        .map(|share| pricer.fee_line(share))
        .collect();
    let fees = pricer.sum(&fee_lines)?;
    let adjustment_lines: Vec<InvoiceLine> = account
        .adjustments
        .iter()
        .map(|adjustment| pricer.adjustment_line(adjustment))
        .collect();
    let adjustments = pricer.sum(&adjustment_lines)?;
    let this_period = pricer.add(subtotal, fees)?;
    let payable = pricer.add(this_period, adjustments)?;
    let credit_lines = pricer.credit_lines(this_period, adjustments, account)?;
    let credits = pricer.sum(&credit_lines)?;
    let monthly_credits = pricer.sum(
        &credit_lines
            .iter()
            .filter(|line| line.resource == MONTHLY_CREDIT)
            .cloned()
            .collect::<Vec<_>>(),
    )?;
    let one_time_credit_left = credit_lines
        .iter()
        .find(|line| line.resource == ONE_TIME_CREDIT)
        .and_then(|line| {
            line.credit_available
                .map(|available| available + line.amount)
        })
        .or(account.one_time_credit_left);
    lines.extend(fee_lines);
    lines.extend(adjustment_lines);
    lines.extend(credit_lines);
    let after_credits = pricer.add(payable, credits)?;
    let tax_line = pricer.tax_line(after_credits, account.tax_rate)?;
    let tax = tax_line
        .as_ref()
        .map_or(Decimal::new(0, pricer.digits()), |line| line.amount);
    let spend = pricer.add(after_credits, tax)?;
    lines.extend(tax_line);
    let zero = Decimal::new(0, pricer.digits());
    let credit_balance = pricer.wallet_available(account.credit_balance);
    // Zeros at the currency's scale (never `-0`), so amounts print alike.
    let or_zero = |amount: Decimal| if amount.is_zero() { zero } else { amount };
    let (balance_applied, balance_carried) = if spend.is_sign_negative() && !spend.is_zero() {
        (zero, -spend)
    } else {
        (or_zero(credit_balance.min(spend)), zero)
    };
    if !balance_applied.is_zero() {
        lines.push(InvoiceLine {
            credit_available: Some(credit_balance),
            ..one_off(
                LineKind::Balance,
                BALANCE_APPLIED.to_owned(),
                "credit",
                -balance_applied,
            )
        });
    }
    if !balance_carried.is_zero() {
        lines.push(one_off(
            LineKind::Balance,
            BALANCE_CARRIED.to_owned(),
            "credit",
            balance_carried,
        ));
    }
    let mut due = spend;
    if !balance_applied.is_zero() || !balance_carried.is_zero() {
        due = pricer.add(pricer.add(spend, -balance_applied)?, balance_carried)?;
    }
    let wallet_balance = pricer.wallet_available(account.wallet_balance);
    let wallet_applied = or_zero(wallet_balance.min(due));
    let mut total = due;
    if !wallet_applied.is_zero() {
        lines.push(pricer.wallet_line(wallet_applied, wallet_balance));
        total = pricer.add(due, -wallet_applied)?;
    }
    pricer.check_sum("total", pricer.sum(&lines)?, total)?;
    if total.is_sign_negative() && !total.is_zero() {
        return Err(Error::SumMismatch {
            customer: usage.customer.to_string(),
            total_name: "total (never negative)",
            lines: total.to_string(),
            stated: zero.to_string(),
        });
    }
    Ok(CustomerBill {
        customer: usage.customer.clone(),
        plan: plans.last().map(|share| share.plan.name.clone()),
        lines,
        subtotal,
        fees,
        adjustments,
        credits,
        monthly_credits,
        tax_rate: account.tax_rate,
        tax,
        spend,
        credit_balance,
        balance_applied,
        balance_carried,
        wallet_balance,
        wallet_applied,
        total,
        one_time_credit_left,
    })
}

/// What an issued invoice billed for its own period, as a later adjustment
/// of that period compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoicedPeriod {
    pub period_start: DateTime<Utc>,
    /// The invoice's usage lines, fees and monthly credit (zero or negative).
    pub subtotal: Decimal,
    pub fees: Decimal,
    pub monthly_credits: Decimal,
    /// Adjustments of this period already billed on later invoices.
    pub adjusted: Decimal,
    /// The plans of that period, when the customer's subscription set them.
    pub subscription: Option<Subscription>,
}

/// What an invoiced period owes now beyond what was billed for it, from its
/// usage rated now (`usage`, late samples included): both sides after that
/// period's own monthly credit, which expired with it. The one-time credit
/// is a balance and covers the adjustment on the bill that carries it.
/// `None` when nothing changed.
pub fn adjustment_for(
    sheet: &PriceSheet,
    usage: &CustomerUsage,
    invoiced: &InvoicedPeriod,
) -> Result<Option<Adjustment>> {
    let no_one_time = Account {
        one_time_credit_left: Some(Decimal::ZERO),
        subscription: invoiced.subscription.clone(),
        ..Account::default()
    };
    let rebilled = bill(sheet, usage, &no_one_time)?;
    let monthly_granted: Decimal = rebilled
        .lines
        .iter()
        .filter(|line| line.resource == MONTHLY_CREDIT)
        .filter_map(|line| line.credit_available)
        .sum();
    let owed_now = (rebilled.subtotal + invoiced.fees - monthly_granted).max(Decimal::ZERO);
    let billed = invoiced.subtotal + invoiced.fees + invoiced.monthly_credits + invoiced.adjusted;
    let difference = owed_now - billed;
    if difference.is_zero() {
        return Ok(None);
    }
    Ok(Some(Adjustment {
        period_start: invoiced.period_start,
        amount: difference,
        note: format!(
            "period from {} re-rated after late samples: {billed} billed, {owed_now} owed",
            invoiced.period_start.format("%Y-%m-%d")
        ),
    }))
}

const MONTHLY_CREDIT: &str = "credit.monthly";
/// The line of what the credit balance paid.
pub const BALANCE_APPLIED: &str = "balance.applied";
/// The line that carries a negative spend to the credit balance.
pub const BALANCE_CARRIED: &str = "balance.carried";
const ONE_TIME_CREDIT: &str = "credit.one_time";

struct LinePricer<'a> {
    sheet: &'a PriceSheet,
    customer: &'a CustomerId,
    /// The plans of the period with their shares (empty: no plan).
    plans: &'a [PlanShare<'a>],
}

/// A plan and the share of the period it counts for: `seconds /
/// period_seconds` (1/1 for the whole period).
#[derive(Debug, Clone)]
struct PlanShare<'a> {
    plan: &'a crate::pricing::Plan,
    from: Option<DateTime<Utc>>,
    seconds: u64,
    period_seconds: u64,
}

impl PlanShare<'_> {
    fn whole(&self) -> bool {
        self.seconds == self.period_seconds
    }

    /// `amount x seconds / period_seconds`, exact before any rounding.
    fn of(&self, amount: Decimal) -> Decimal {
        if self.whole() {
            return amount;
        }
        amount * Decimal::from(self.seconds) / Decimal::from(self.period_seconds)
    }

    /// `base x seconds / period_seconds`, rounded down to a base unit.
    fn of_base(&self, base: u128) -> u128 {
        if self.whole() {
            return base;
        }
        base.checked_mul(u128::from(self.seconds)).map_or(
            base / u128::from(self.period_seconds) * u128::from(self.seconds),
            |product| product / u128::from(self.period_seconds),
        )
    }
}

/// The plans a bill applies: the subscription's spans, or the sheet's plan
/// for the customer over the whole period.
fn plans_of<'a>(
    sheet: &'a PriceSheet,
    customer: &CustomerId,
    subscription: Option<&Subscription>,
) -> Result<Vec<PlanShare<'a>>> {
    let Some(subscription) = subscription else {
        return Ok(sheet
            .plan_for(customer)
            .map(|plan| PlanShare {
                plan,
                from: None,
                seconds: 1,
                period_seconds: 1,
            })
            .into_iter()
            .collect());
    };
    subscription
        .spans
        .iter()
        .filter(|span| span.seconds > 0)
        .map(|span| {
            let plan = sheet
                .plan_named(&span.plan)
                .ok_or_else(|| Error::UnknownPlan {
                    customer: customer.to_string(),
                    plan: span.plan.clone(),
                    sheet: sheet.label.clone(),
                })?;
            Ok(PlanShare {
                plan,
                from: Some(span.from),
                seconds: span.seconds.min(subscription.period_seconds),
                period_seconds: subscription.period_seconds.max(1),
            })
        })
        .collect()
}

impl LinePricer<'_> {
    fn rule(&self) -> RoundingRule {
        self.sheet.line_rounding
    }

    fn digits(&self) -> u32 {
        self.sheet.currency.minor_digits()
    }

    /// Included then priced lines, by version then resource then tier.
    fn usage_lines(&self, usage: &CustomerUsage) -> Result<Vec<InvoiceLine>> {
        let mut included_left: BTreeMap<ResourceSlot, u128> = BTreeMap::new();
        for share in self.plans {
            for (slot, base) in &share.plan.included_base {
                *included_left.entry(*slot).or_default() += share.of_base(*base);
            }
        }
        let mut lines = Vec::new();
        for (version_index, version) in self.sheet.versions().iter().enumerate() {
            for (slot_index, published) in version.resources.iter().enumerate() {
                let slot = ResourceSlot(slot_index);
                let quantity = usage.quantity(version_index, slot);
                let Some(published) = published.as_ref() else {
                    continue;
                };
                let idle_ms = usage.idle_ms(version_index);
                let idle_line = (published.bills_only_active_time() && idle_ms > 0)
                    .then(|| self.idle_line(slot, version.effective_from, idle_ms));
                if quantity == 0 {
                    lines.extend(idle_line);
                    continue;
                }
                let left = included_left.entry(slot).or_default();
                let included = quantity.min(*left);
                *left -= included;
                let context = LineContext {
                    slot,
                    published,
                    effective_from: version.effective_from,
                };
                if included > 0 {
                    lines.push(self.usage_line(
                        &context,
                        &PricedBand {
                            tier: None,
                            quantity_base: included,
                            unit_price: Decimal::ZERO,
                        },
                        true,
                    )?);
                }
                let price = self
                    .sheet
                    .price_for(self.customer, version_index, slot)
                    .expect("a version that rated a quantity prices it");
                for band in price.bands(quantity - included) {
                    lines.push(self.usage_line(&context, &band, false)?);
                }
                lines.extend(idle_line);
            }
        }
        Ok(lines)
    }

    /// The idle line of a resource billed only while active: the version's
    /// idle time in seconds (exact to the millisecond), at zero.
    fn idle_line(
        &self,
        slot: ResourceSlot,
        effective_from: DateTime<Utc>,
        idle_ms: u64,
    ) -> InvoiceLine {
        InvoiceLine {
            kind: LineKind::Idle,
            resource: self.sheet.slot_name(slot),
            quantity: Decimal::from(idle_ms) / Decimal::ONE_THOUSAND,
            unit: "second".to_owned(),
            unit_price: Decimal::ZERO,
            amount: Decimal::new(0, self.digits()),
            price_version: Some(effective_from),
            tier: None,
            quantity_base: Some(idle_ms.to_string()),
            base_unit: Some("ms"),
            credit_available: None,
        }
    }

    fn usage_line(
        &self,
        context: &LineContext<'_>,
        band: &PricedBand,
        included: bool,
    ) -> Result<InvoiceLine> {
        let resource = self.sheet.slot_name(context.slot);
        let divisor = context.published.unit.divisor();
        let amount = self
            .exact_amount(band.quantity_base, band.unit_price, divisor)
            .ok_or_else(|| Error::AmountOverflow {
                customer: self.customer.to_string(),
                resource: resource.clone(),
            })?;
        Ok(InvoiceLine {
            kind: if included {
                LineKind::Included
            } else {
                LineKind::Usage
            },
            resource,
            quantity: display_quantity(band.quantity_base, divisor),
            unit: context.published.unit.as_str().to_owned(),
            unit_price: band.unit_price,
            amount,
            price_version: Some(context.effective_from),
            tier: band.tier,
            quantity_base: Some(band.quantity_base.to_string()),
            base_unit: Some(base_unit_name(context.published.kind)),
            credit_available: None,
        })
    }

    /// `quantity_base x unit_price / divisor`, rounded once to minor units.
    fn exact_amount(
        &self,
        quantity_base: u128,
        unit_price: Decimal,
        divisor: u128,
    ) -> Option<Decimal> {
        let mantissa = u128::try_from(unit_price.mantissa()).ok()?;
        let numerator = quantity_base
            .checked_mul(mantissa)?
            .checked_mul(self.sheet.currency.minor_per_major())?;
        let denominator = divisor.checked_mul(10u128.checked_pow(unit_price.scale())?)?;
        let minor_units = self.rule().round_ratio(numerator, denominator);
        Decimal::try_from_i128_with_scale(i128::try_from(minor_units).ok()?, self.digits()).ok()
    }

    /// A plan's fee for its share of the period: the quantity is the
    /// share (1 for the whole period, shown to 6 places), the amount the
    /// exact share of the fee rounded once.
    fn fee_line(&self, share: &PlanShare<'_>) -> InvoiceLine {
        let fee = share.plan.monthly_fee;
        let amount = self.rule().round(share.of(fee), self.digits());
        let quantity = share.of(Decimal::ONE).round_dp(6).normalize();
        InvoiceLine {
            quantity,
            unit_price: fee,
            price_version: if share.whole() { None } else { share.from },
            ..one_off(
                LineKind::Fee,
                format!("plan.{}", share.plan.name),
                "month",
                amount,
            )
        }
    }

    /// Monthly credits first, on this period's charges only (they expire with
    /// the period; an adjustment for an earlier period was already netted of
    /// that period's monthly credit), then one-time credits, a balance, on what
    /// is still payable including adjustments. Never more than is payable.
    fn credit_lines(
        &self,
        this_period: Decimal,
        adjustments: Decimal,
        account: &Account,
    ) -> Result<Vec<InvoiceLine>> {
        let granted = |kind: CreditKind| -> Decimal {
            match kind {
                // Each plan's monthly credit for its share of the period.
                CreditKind::Monthly => self
                    .plans
                    .iter()
                    .map(|share| {
                        share.of(share
                            .plan
                            .credits
                            .iter()
                            .filter(|credit| credit.kind == kind)
                            .map(|credit| credit.amount)
                            .sum())
                    })
                    .sum(),
                // The first plan's that grants one, whole.
                CreditKind::OneTime => self
                    .plans
                    .iter()
                    .find(|share| share.plan.credits.iter().any(|credit| credit.kind == kind))
                    .map(|share| {
                        share
                            .plan
                            .credits
                            .iter()
                            .filter(|credit| credit.kind == kind)
                            .map(|credit| credit.amount)
                            .sum()
                    })
                    .unwrap_or_default(),
            }
        };
        let has_kind = |kind: CreditKind| {
            self.plans
                .iter()
                .any(|share| share.plan.credits.iter().any(|credit| credit.kind == kind))
        };
        let one_time_left = account.one_time_credit_left;
        let mut still_payable = this_period.max(Decimal::ZERO);
        let mut lines = Vec::new();
        for kind in [CreditKind::Monthly, CreditKind::OneTime] {
            if !has_kind(kind) {
                continue;
            }
            let available = match kind {
                CreditKind::OneTime => one_time_left.unwrap_or_else(|| granted(kind)),
                CreditKind::Monthly => granted(kind),
            };
            let available = self.rule().round(available, self.digits());
            if kind == CreditKind::OneTime {
                still_payable = self.add(still_payable, adjustments)?.max(Decimal::ZERO);
            }
            let applied = available.min(still_payable);
            still_payable = self.add(still_payable, -applied)?;
            lines.push(self.credit_line(kind, applied, available));
        }
        Ok(lines)
    }

    fn adjustment_line(&self, adjustment: &Adjustment) -> InvoiceLine {
        let amount = self.rule().round(adjustment.amount, self.digits());
        let resource = format!("adjustment.{}", adjustment.period_start.format("%Y-%m-%d"));
        InvoiceLine {
            price_version: Some(adjustment.period_start),
            ..one_off(LineKind::Adjustment, resource, "adjustment", amount)
        }
    }

    fn credit_line(&self, kind: CreditKind, applied: Decimal, available: Decimal) -> InvoiceLine {
        let resource = format!("credit.{}", kind.as_str());
        InvoiceLine {
            credit_available: Some(available),
            ..one_off(LineKind::Credit, resource, "credit", -applied)
        }
    }

    /// Tax at `rate` on what is payable after credits (nothing on a negative
    /// amount), rounded once; no line at a zero rate.
    fn tax_line(&self, taxable: Decimal, rate: Decimal) -> Result<Option<InvoiceLine>> {
        if rate.is_zero() {
            return Ok(None);
        }
        let base = taxable.max(Decimal::ZERO);
        let exact = base
            .checked_mul(rate)
            .ok_or_else(|| Error::AmountOverflow {
                customer: self.customer.to_string(),
                resource: "tax".to_owned(),
            })?;
        let amount = self.rule().round(exact, self.digits());
        Ok(Some(InvoiceLine {
            quantity: base,
            unit_price: rate,
            ..one_off(LineKind::Tax, "tax".to_owned(), "amount", amount)
        }))
    }

    /// The wallet pays whole minor units: a balance is truncated, never
    /// rounded up, and a negative one pays nothing.
    fn wallet_available(&self, balance: Decimal) -> Decimal {
        balance
            .round_dp_with_strategy(self.digits(), RoundingStrategy::ToZero)
            .max(Decimal::ZERO)
    }

    fn wallet_line(&self, applied: Decimal, available: Decimal) -> InvoiceLine {
        InvoiceLine {
            credit_available: Some(available),
            ..one_off(LineKind::Wallet, "wallet".to_owned(), "payment", -applied)
        }
    }

    fn add(&self, left: Decimal, right: Decimal) -> Result<Decimal> {
        let currency = self.sheet.currency;
        Money::new(left, currency)
            .checked_add(Money::new(right, currency))
            .map(|sum| sum.amount)
            .ok_or_else(|| Error::AmountOverflow {
                customer: self.customer.to_string(),
                resource: "total".to_owned(),
            })
    }

    fn sum(&self, lines: &[InvoiceLine]) -> Result<Decimal> {
        let zero = Decimal::new(0, self.digits());
        lines
            .iter()
            .try_fold(zero, |sum, line| self.add(sum, line.amount))
    }

    /// Refuses a bill whose lines do not add up to what it states.
    fn check_sum(&self, total_name: &'static str, lines: Decimal, stated: Decimal) -> Result<()> {
        debug_assert_eq!(
            lines, stated,
            "{total_name} of {} must equal its lines",
            self.customer
        );
        if lines != stated {
            return Err(Error::SumMismatch {
                customer: self.customer.to_string(),
                total_name,
                lines: lines.to_string(),
                stated: stated.to_string(),
            });
        }
        Ok(())
    }
}

/// A line of one unit at `amount` (already rounded): fees, adjustments,
/// credits and wallet payments.
fn one_off(kind: LineKind, resource: String, unit: &str, amount: Decimal) -> InvoiceLine {
    InvoiceLine {
        kind,
        resource,
        quantity: Decimal::ONE,
        unit: unit.to_owned(),
        unit_price: amount,
        amount,
        price_version: None,
        tier: None,
        quantity_base: None,
        base_unit: None,
        credit_available: None,
    }
}

/// Where a usage line's price came from.
struct LineContext<'a> {
    slot: ResourceSlot,
    published: &'a ResourcePrice,
    effective_from: DateTime<Utc>,
}

/// `quantity_base / divisor` for display, exact in its integer part.
fn display_quantity(quantity_base: u128, divisor: u128) -> Decimal {
    let whole = Decimal::try_from_i128_with_scale(
        i128::try_from(quantity_base / divisor).unwrap_or(i128::MAX),
        0,
    )
    .unwrap_or(Decimal::MAX);
    let remainder = quantity_base % divisor;
    let fraction = match (i128::try_from(remainder), i128::try_from(divisor)) {
        (Ok(remainder), Ok(divisor)) => Decimal::try_from_i128_with_scale(remainder, 0)
            .ok()
            .zip(Decimal::try_from_i128_with_scale(divisor, 0).ok())
            .and_then(|(remainder, divisor)| remainder.checked_div(divisor))
            .unwrap_or_default(),
        _ => Decimal::ZERO,
    };
    // A whole part near Decimal::MAX cannot take a fraction: show it whole.
    whole
        .checked_add(fraction)
        .unwrap_or(whole)
        .round_dp(QUANTITY_DISPLAY_DIGITS)
        .normalize()
}
