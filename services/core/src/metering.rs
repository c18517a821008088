//! Metered usage on the bill: which meters a price sheet prices, the time
//! windows each is aggregated over, and their aggregates as quantities in
//! base units beside the ones rated from samples.
//!
//! The rule: a meter's quantity under a price version is its aggregation
//! (SUM, COUNT, MAX, UNIQUE_COUNT, LATEST) over the customer's events whose
//! time falls in the part of the rated range that version was in force,
//! `[max(from, effective_from), min(to, next version's effective_from))`.
//! Only SUM and COUNT add up across hours; MAX, UNIQUE_COUNT and LATEST do
//! not, so every figure aggregates its whole window again (from the
//! period's start), never adds smaller ones.
//!
//! A meter's base unit is 10^-12 of its unit, the scale its values are
//! stored at ([`VALUE_SCALE`]), so a quantity is an exact integer and a
//! line's amount is computed like any other resource's. An aggregate below
//! zero (a SUM of negative values) cannot be billed and is refused with the
//! meter and the customer named.

use std::str::FromStr;

use rust_decimal::Decimal;

use crate::events::{Meter, Meters, VALUE_SCALE};
use crate::pricing::{PriceSheet, ResourceSlot};
use crate::rating::CustomerUsage;

/// A meter a sheet prices, with its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedMeter {
    pub slot: ResourceSlot,
    pub meter: Meter,
}

/// The meters a sheet prices; empty for a sheet that prices none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PricedMeters {
    meters: Vec<PricedMeter>,
}

/// One meter aggregated over one price version's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterWindow<'a> {
    pub version: usize,
    pub slot: ResourceSlot,
    pub meter: &'a Meter,
    /// Unix milliseconds, `from_ms < to_ms`.
    pub from_ms: i64,
    pub to_ms: i64,
}

/// A meter's quantity under a price version, in base units (10^-12 of the
/// meter's unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub version: usize,
    pub slot: ResourceSlot,
    pub quantity: u128,
}

impl PricedMeters {
    /// The meters `sheet` prices, each looked up in `meters`; a priced meter
    /// that is not defined is an error naming it (a sheet would otherwise
    /// price usage nothing records).
    pub fn new(sheet: &PriceSheet, meters: &Meters) -> Result<Self, String> {
        let meters = sheet
            .priced_meters()
            .map(|(slot, slug)| {
                let meter = meters.get(slug).ok_or_else(|| {
                    format!(
                        "price sheet {} prices meter {slug:?}, which the meters file does not define ([events] meters)",
                        sheet.label
                    )
                })?;
                Ok(PricedMeter {
                    slot,
                    meter: meter.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { meters })
    }

    pub fn is_empty(&self) -> bool {
        self.meters.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PricedMeter> {
        self.meters.iter()
    }

    /// Every (meter, price version) window of `[from_ms, to_ms)` in which
    /// the version prices the meter, in meter then version order.
    pub fn windows(&self, sheet: &PriceSheet, from_ms: i64, to_ms: i64) -> Vec<MeterWindow<'_>> {
        let versions = sheet.versions();
        let mut windows = Vec::new();
        for priced in &self.meters {
            for (index, version) in versions.iter().enumerate() {
                let priced_here = version
                    .resources
                    .get(priced.slot.0)
                    .is_some_and(Option::is_some);
                let start = version.effective_from_ms.max(from_ms);
                let end = versions
                    .get(index + 1)
                    .map_or(to_ms, |next| next.effective_from_ms.min(to_ms));
                if priced_here && start < end {
                    windows.push(MeterWindow {
                        version: index,
                        slot: priced.slot,
                        meter: &priced.meter,
                        from_ms: start,
                        to_ms: end,
                    });
                }
            }
        }
        windows
    }
}

impl MeterWindow<'_> {
    /// The window's aggregate (as decimal text, as the store returns it) as
    /// a quantity; refuses what cannot be billed, saying why.
    pub fn metered(&self, aggregate: &str) -> Result<Metered, String> {
        Ok(Metered {
            version: self.version,
            slot: self.slot,
            quantity: base_quantity(aggregate)
                .map_err(|reason| format!("meter {:?}: {reason}", self.meter.slug))?,
        })
    }
}

/// A meter's aggregate in base units: the value times 10^12, exactly.
pub fn base_quantity(aggregate: &str) -> Result<u128, String> {
    let value = Decimal::from_str(aggregate.trim())
        .map_err(|_| format!("aggregate {aggregate:?} is not a decimal number"))?;
    if value.is_sign_negative() && !value.is_zero() {
        return Err(format!(
            "aggregate {value} is below zero, which no price can bill"
        ));
    }
    let value = value.normalize();
    if value.scale() > VALUE_SCALE {
        return Err(format!(
            "aggregate {value} has more than {VALUE_SCALE} decimal places"
        ));
    }
    let mantissa =
        u128::try_from(value.mantissa()).map_err(|_| format!("aggregate {value} is below zero"))?;
    10u128
        .checked_pow(VALUE_SCALE - value.scale())
        .and_then(|factor| mantissa.checked_mul(factor))
        .ok_or_else(|| format!("aggregate {value} is too large"))
}

impl PricedMeters {
    /// Sets a customer's metered quantities on their usage rated from
    /// samples, in place of whatever it held for the priced meters (a
    /// stored figure read back is replaced, not added to).
    pub fn apply(&self, sheet: &PriceSheet, usage: &mut CustomerUsage, metered: &[Metered]) {
        for priced in &self.meters {
            for version in 0..sheet.versions().len() {
                usage.set_quantity(version, priced.slot, 0);
            }
        }
        for quantity in metered {
            usage.set_quantity(quantity.version, quantity.slot, quantity.quantity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHEET: &str = r#"
[sheet]
platform = "test"
currency = "USD"
line_rounding = "half_even"
default_plan = "starter"

[plans.starter]
included = { "meter.tokens" = "1" }

[[versions]]
effective_from = 2026-01-01T00:00:00Z
[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.05"
[versions.resources.meters.tokens]
unit = "1000000 tokens"
unit_price = "2.00"

[[versions]]
effective_from = 2026-01-01T12:00:00Z
[versions.resources.vcpu]
unit = "vcpu-hour"
unit_price = "0.05"
[versions.resources.meters.tokens]
unit = "1000000 tokens"
unit_price = "1.50"
[versions.resources.meters.snapshots]
unit = "snapshot"
unit_price = "0.10"
"#;

    fn meters() -> Meters {
        Meters::from_toml(
            r#"
[[meters]]
slug = "tokens"
eventType = "prompt"
aggregation = "SUM"
valueProperty = "$.tokens"

[[meters]]
slug = "snapshots"
eventType = "snapshot"
aggregation = "COUNT"
"#,
            "test",
        )
        .expect("meters parse")
    }

    #[test]
    fn windows_follow_the_versions_that_price_each_meter() {
        let sheet = PriceSheet::from_toml(SHEET, "sheet").expect("sheet parses");
        let priced = PricedMeters::new(&sheet, &meters()).expect("every meter defined");
        let day = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        let hour = 3_600_000;
        let windows: Vec<(String, usize, i64, i64)> = priced
            .windows(&sheet, day + 6 * hour, day + 18 * hour)
            .iter()
            .map(|w| {
                (
                    w.meter.slug.clone(),
                    w.version,
                    (w.from_ms - day) / hour,
                    (w.to_ms - day) / hour,
                )
            })
            .collect();
        // Slugs in order: snapshots before tokens; snapshots only in version 1.
        assert_eq!(
            windows,
            vec![
                ("snapshots".to_owned(), 1, 12, 18),
                ("tokens".to_owned(), 0, 6, 12),
                ("tokens".to_owned(), 1, 12, 18),
            ]
        );
        assert!(priced.windows(&sheet, day, day + 6 * hour).len() == 1);
    }

    #[test]
    fn metered_quantities_bill_per_version_after_the_included_allowance() {
        let sheet = PriceSheet::from_toml(SHEET, "sheet").expect("sheet parses");
        let priced = PricedMeters::new(&sheet, &meters()).expect("every meter defined");
        let customer = crate::CustomerId::parse("acme".to_owned()).expect("valid id");
        let day = 1_767_225_600_000;
        let windows = priced.windows(&sheet, day, day + 86_400_000);
        let aggregates = ["3", "1500000", "2000000"];
        let metered: Vec<Metered> = windows
            .iter()
            .zip(aggregates)
            .map(|(window, aggregate)| window.metered(aggregate).expect("billable"))
            .collect();
        let mut usage = CustomerUsage::nothing(customer, &sheet);
        priced.apply(&sheet, &mut usage, &metered);
        let bill = crate::invoice::bill(&sheet, &usage, &crate::invoice::Account::default())
            .expect("bills");
        let lines: Vec<(String, String, String, String)> = bill
            .lines
            .iter()
            .map(|line| {
                (
                    format!("{} {}", line.kind.as_str(), line.resource),
                    line.quantity.normalize().to_string(),
                    line.unit.clone(),
                    line.amount.to_string(),
                )
            })
            .collect();
        let line = |kind: &str, quantity: &str, unit: &str, amount: &str| {
            (
                kind.to_owned(),
                quantity.to_owned(),
                unit.to_owned(),
                amount.to_owned(),
            )
        };
        assert_eq!(
            lines,
            vec![
                // 1.5M tokens at 2.00 per million, the first million included.
                line("included meter.tokens", "1", "1000000 tokens", "0.00"),
                line("usage meter.tokens", "0.5", "1000000 tokens", "1.00"),
                line("usage meter.snapshots", "3", "snapshot", "0.30"),
                line("usage meter.tokens", "2", "1000000 tokens", "3.00"),
            ]
        );
        assert_eq!(bill.total.to_string(), "4.30");
        let text = usage.to_text();
        let back =
            CustomerUsage::from_text(&text, usage.customer.clone(), &sheet).expect("reads back");
        assert_eq!(back, usage);
    }

    #[test]
    fn an_undefined_priced_meter_is_named() {
        let sheet = PriceSheet::from_toml(SHEET, "sheet").expect("sheet parses");
        let error = PricedMeters::new(&sheet, &Meters::default()).expect_err("snapshots undefined");
        assert!(error.contains("\"snapshots\""), "{error}");
    }

    #[test]
    fn aggregates_become_exact_base_quantities() {
        assert_eq!(base_quantity("1500"), Ok(1_500_000_000_000_000));
        assert_eq!(base_quantity("0.000000000001"), Ok(1));
        assert_eq!(base_quantity("12.500000000000"), Ok(12_500_000_000_000));
        assert_eq!(base_quantity("0"), Ok(0));
        assert!(base_quantity("-3")
            .expect_err("negative")
            .contains("below zero"));
        assert!(base_quantity("0.0000000000001").is_err());
        assert!(base_quantity("tokens").is_err());
    }
}
