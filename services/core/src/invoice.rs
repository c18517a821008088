//! From rated quantities to invoice lines: included usage, tiers, plan fees
//! and credits, each line rounded once.
//!
//! A usage line's exact amount is the fraction
//! `quantity_base x unit_price / unit_divisor`, computed in integers and
//! rounded to the minor unit by the sheet's rule in one step. Fees and credits
//! are decimals from the sheet, rounded once each. Totals are sums of rounded
//! lines, checked two ways before they are returned.
//!
//! `subtotal` is the sum of the usage lines; `total = subtotal + fees -
//! credits applied`, where credits apply (monthly ones first, then one-time)
//! up to what is payable, so a total is never below zero.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
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
    /// For a credit line, what was available before applying it.
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
    /// `subtotal + fees + adjustments + credits`, the sum of every line;
    /// never negative unless a negative adjustment exceeds every charge.
    pub total: Decimal,
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

/// What the invoicer knows that a sheet cannot: how much of each customer's
/// one-time credit is left. A customer not in the map has the plan's whole
/// one-time credit (their first period).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillingOptions {
    pub one_time_credit_left: BTreeMap<CustomerId, Decimal>,
    /// Adjustments to bill on this period, per customer. They are payable
    /// like usage: credits apply to them too.
    pub adjustments: BTreeMap<CustomerId, Vec<Adjustment>>,
}

/// Prices one customer's rated usage into a bill.
pub fn bill_customer(
    sheet: &PriceSheet,
    usage: &CustomerUsage,
    options: &BillingOptions,
) -> Result<CustomerBill> {
    let pricer = LinePricer {
        sheet,
        customer: &usage.customer,
    };
    let mut lines = pricer.usage_lines(usage)?;
    let subtotal = pricer.sum(&lines)?;
    let plan = sheet.plan_for(&usage.customer);
    let fee_lines: Vec<InvoiceLine> = plan
        .filter(|plan| !plan.monthly_fee.is_zero())
        .map(|plan| pricer.fee_line(&plan.name, plan.monthly_fee))
        .into_iter()
        .collect();
    let fees = pricer.sum(&fee_lines)?;
    let adjustment_lines: Vec<InvoiceLine> = options
        .adjustments
        .get(&usage.customer)
        .map(|adjustments| {
            adjustments
                .iter()
                .map(|adjustment| pricer.adjustment_line(adjustment))
                .collect()
        })
        .unwrap_or_default();
    let adjustments = pricer.sum(&adjustment_lines)?;
    let this_period = pricer.add(subtotal, fees)?;
    let payable = pricer.add(this_period, adjustments)?;
    let credit_lines = pricer.credit_lines(this_period, adjustments, options)?;
    let credits = pricer.sum(&credit_lines)?;
    lines.extend(fee_lines);
    lines.extend(adjustment_lines);
    lines.extend(credit_lines);
    let total = pricer.add(payable, credits)?;
    pricer.check_sum("total", pricer.sum(&lines)?, total)?;
    debug_assert!(
        !total.is_sign_negative() || total.is_zero() || adjustments.is_sign_negative(),
        "credits never exceed the payable amount"
    );
    Ok(CustomerBill {
        customer: usage.customer.clone(),
        plan: plan.map(|plan| plan.name.clone()),
        lines,
        subtotal,
        fees,
        adjustments,
        credits,
        total,
    })
}

struct LinePricer<'a> {
    sheet: &'a PriceSheet,
    customer: &'a CustomerId,
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
        let mut included_left: BTreeMap<ResourceSlot, u128> = self
            .sheet
            .plan_for(self.customer)
            .map(|plan| plan.included_base.clone())
            .unwrap_or_default();
        let mut lines = Vec::new();
        for (version_index, version) in self.sheet.versions().iter().enumerate() {
            for (slot_index, published) in version.resources.iter().enumerate() {
                let slot = ResourceSlot(slot_index);
                let quantity = usage.quantity(version_index, slot);
                let Some(published) = published.as_ref().filter(|_| quantity > 0) else {
                    continue;
                };
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
            }
        }
        Ok(lines)
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

    fn fee_line(&self, plan: &str, fee: Decimal) -> InvoiceLine {
        let amount = self.rule().round(fee, self.digits());
        InvoiceLine {
            kind: LineKind::Fee,
            resource: format!("plan.{plan}"),
            quantity: Decimal::ONE,
            unit: "month".to_owned(),
            unit_price: fee,
            amount,
            price_version: None,
            tier: None,
            quantity_base: None,
            base_unit: None,
            credit_available: None,
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
        options: &BillingOptions,
    ) -> Result<Vec<InvoiceLine>> {
        let Some(plan) = self.sheet.plan_for(self.customer) else {
            return Ok(Vec::new());
        };
        let granted = |kind: CreditKind| -> Decimal {
            plan.credits
                .iter()
                .filter(|credit| credit.kind == kind)
                .map(|credit| credit.amount)
                .sum()
        };
        let has_kind = |kind: CreditKind| plan.credits.iter().any(|credit| credit.kind == kind);
        let one_time_left = options.one_time_credit_left.get(self.customer).copied();
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
        InvoiceLine {
            kind: LineKind::Adjustment,
            resource: format!("adjustment.{}", adjustment.period_start.format("%Y-%m-%d")),
            quantity: Decimal::ONE,
            unit: "adjustment".to_owned(),
            unit_price: amount,
            amount,
            price_version: Some(adjustment.period_start),
            tier: None,
            quantity_base: None,
            base_unit: None,
            credit_available: None,
        }
    }

    fn credit_line(&self, kind: CreditKind, applied: Decimal, available: Decimal) -> InvoiceLine {
        InvoiceLine {
            kind: LineKind::Credit,
            resource: format!("credit.{}", kind.as_str()),
            quantity: Decimal::ONE,
            unit: "credit".to_owned(),
            unit_price: -applied,
            amount: -applied,
            price_version: None,
            tier: None,
            quantity_base: None,
            base_unit: None,
            credit_available: Some(available),
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
