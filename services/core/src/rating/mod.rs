//! Rating: usage samples in, integer quantities per customer, price version
//! and resource out.
//!
//! [`rate_samples`] is a pure function of (samples, sheet, idle policy): the
//! offline CLI and the online rater call the same code. It puts samples back
//! into (sandbox, epoch) series, walks each series interval by interval and
//! adds base-unit quantities into one row per customer. Turning quantities
//! into money is [`crate::invoice`]'s job, once per line.

mod carried;
mod idle;
mod interval;
mod series;
mod usage;

use std::collections::HashMap;

pub use carried::{RatingState, StateError};
pub use idle::{
    is_gap, is_gap_after, IdlePolicy, NeverIdle, SessionOrConnection, DEFAULT_GAP_AFTER_S,
};
pub(crate) use interval::interval_is_refused;

use crate::error::LineError;
use crate::ids::CustomerId;
use crate::pricing::{PriceSheet, ResourceSlot};
use crate::sample::UsageSample;

/// A sample with the input line (or record position) it came from, so every
/// error and every line of a bill can point back at its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberedSample {
    /// 1-based line number in the input.
    pub line: u64,
    pub sample: UsageSample,
}

impl NumberedSample {
    /// `samples` numbered by position from 1, as the lines of a file are:
    /// what a reader numbers the samples it read from a store with.
    pub fn numbered(samples: impl IntoIterator<Item = UsageSample>) -> Vec<Self> {
        samples
            .into_iter()
            .zip(1..)
            .map(|(sample, line)| Self { line, sample })
            .collect()
    }
}

/// Rated quantities of one customer, in base units, per (version, slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerUsage {
    pub customer: CustomerId,
    slot_count: usize,
    /// Version-major: `quantities[version * slot_count + slot]`.
    quantities: Vec<u128>,
    /// Per price version: running milliseconds the idle rule classified
    /// idle, kept for versions with a resource billed only while active
    /// (`idle = "free"`): the seconds its idle lines report.
    idle_ms: Vec<u64>,
}

impl CustomerUsage {
    /// A customer who used nothing under `sheet` (a period with only a fee).
    pub fn nothing(customer: CustomerId, sheet: &PriceSheet) -> Self {
        Self {
            customer,
            slot_count: sheet.slot_count(),
            quantities: vec![0; sheet.versions().len() * sheet.slot_count()],
            idle_ms: vec![0; sheet.versions().len()],
        }
    }

    /// Running milliseconds classified idle under a price version (zero for
    /// versions whose resources bill idle time like any other).
    pub fn idle_ms(&self, version: usize) -> u64 {
        self.idle_ms.get(version).copied().unwrap_or(0)
    }

    /// Base-unit quantity rated for a resource under a price version.
    pub fn quantity(&self, version: usize, slot: ResourceSlot) -> u128 {
        self.quantities
            .get(version * self.slot_count + slot.0)
            .copied()
            .unwrap_or(0)
    }

    /// Sets the quantity of a resource under a price version: how metered
    /// usage (a meter's aggregate, which samples do not carry) joins the
    /// quantities rated from samples. Out of the sheet's range does nothing.
    pub fn set_quantity(&mut self, version: usize, slot: ResourceSlot, quantity: u128) {
        if slot.0 < self.slot_count {
            if let Some(cell) = self.quantities.get_mut(version * self.slot_count + slot.0) {
                *cell = quantity;
            }
        }
    }

    /// The quantities as stored beside a rating state: `versions x slots`,
    /// then `version.slot=quantity` for each quantity that is not zero,
    /// e.g. `2x7 0.1=3600000 1.1=120`, then `i<version>=<ms>` for each idle
    /// tally that is not zero. Exact (integers in base units) and small:
    /// what closing a period reads per customer.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let versions = self.quantities.len() / self.slot_count.max(1);
        let mut text = format!("{versions}x{}", self.slot_count);
        for (index, quantity) in self.quantities.iter().enumerate() {
            if *quantity > 0 {
                let (version, slot) = (index / self.slot_count, index % self.slot_count);
                let _ = write!(text, " {version}.{slot}={quantity}");
            }
        }
        for (version, idle_ms) in self.idle_ms.iter().enumerate() {
            if *idle_ms > 0 {
                let _ = write!(text, " i{version}={idle_ms}");
            }
        }
        text
    }

    /// Reads [`Self::to_text`] back for `customer`, checked against the
    /// sheet it is to be billed under.
    pub fn from_text(
        text: &str,
        customer: CustomerId,
        sheet: &PriceSheet,
    ) -> Result<Self, UsageTextError> {
        let invalid = |reason: String| UsageTextError {
            text: text.chars().take(80).collect(),
            reason,
        };
        let mut usage = Self::nothing(customer, sheet);
        let mut parts = text.split_ascii_whitespace();
        let shape = parts.next().ok_or_else(|| invalid("empty".to_owned()))?;
        let expected = format!("{}x{}", sheet.versions().len(), sheet.slot_count());
        if shape != expected {
            return Err(invalid(format!(
                "made for {shape} price versions x resources, the sheet has {expected}"
            )));
        }
        for part in parts {
            if let Some(idle) = part.strip_prefix('i') {
                let parsed = idle.split_once('=').and_then(|(version, ms)| {
                    Some((version.parse::<usize>().ok()?, ms.parse::<u64>().ok()?))
                });
                match parsed {
                    Some((version, ms)) if version < usage.idle_ms.len() => {
                        usage.idle_ms[version] = ms;
                        continue;
                    }
                    _ => return Err(invalid(format!("{part:?} is not i<version>=<ms>"))),
                }
            }
            let parsed = part.split_once('=').and_then(|(key, quantity)| {
                let (version, slot) = key.split_once('.')?;
                Some((
                    version.parse::<usize>().ok()?,
                    slot.parse::<usize>().ok()?,
                    quantity.parse::<u128>().ok()?,
                ))
            });
            let Some((version, slot, quantity)) = parsed else {
                return Err(invalid(format!("{part:?} is not version.slot=quantity")));
            };
            if slot >= usage.slot_count || version >= sheet.versions().len() {
                return Err(invalid(format!("{part:?} is outside the sheet")));
            }
            usage.quantities[version * usage.slot_count + slot] = quantity;
        }
        Ok(usage)
    }
}

impl CustomerUsage {
    /// The quantities a bill's usage and included lines price (and the idle
    /// tallies its idle lines report), read back from those lines as (kind,
    /// resource, price version as RFC 3339, quantity in base units): the
    /// exact inverse of the usage lines of [`crate::invoice::bill`], which
    /// split a quantity into included and priced bands without losing any.
    /// Other kinds are skipped.
    pub fn from_lines<'a>(
        customer: CustomerId,
        sheet: &PriceSheet,
        lines: impl IntoIterator<Item = (&'a str, &'a str, &'a str, &'a str)>,
    ) -> Result<Self, UsageTextError> {
        let mut usage = Self::nothing(customer, sheet);
        for (kind, resource, version, quantity) in lines {
            if kind != "usage" && kind != "included" && kind != "idle" {
                continue;
            }
            let invalid = |reason: &str| UsageTextError {
                text: format!("{kind} {resource} {version} {quantity}"),
                reason: reason.to_owned(),
            };
            let slot = sheet
                .slot_by_name(resource)
                .ok_or_else(|| invalid("no such resource in the sheet"))?;
            let version = sheet
                .versions()
                .iter()
                .position(|candidate| candidate.effective_from.to_rfc3339() == version)
                .ok_or_else(|| invalid("no such price version in the sheet"))?;
            let quantity: u128 = quantity
                .parse()
                .map_err(|_| invalid("quantity is not an integer in base units"))?;
            if kind == "idle" {
                // Every idle line of a version reports the same tally.
                let ms = u64::try_from(quantity).map_err(|_| invalid("idle ms overflow"))?;
                usage.idle_ms[version] = usage.idle_ms[version].max(ms);
                continue;
            }
            let cell = &mut usage.quantities[version * usage.slot_count + slot.0];
            *cell = cell
                .checked_add(quantity)
                .ok_or_else(|| invalid("quantity overflows"))?;
        }
        Ok(usage)
    }
}

/// Stored quantities that do not read back under a sheet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rated quantities {text:?}: {reason}")]
pub struct UsageTextError {
    pub text: String,
    pub reason: String,
}

/// The result of rating: quantities per customer (in customer id order) and
/// the input lines that were refused or only partly billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedUsage {
    pub customers: Vec<CustomerUsage>,
    /// Sorted by line, then field.
    pub errors: Vec<LineError>,
    /// Version of the idle policy that classified the intervals.
    pub idle_policy: String,
}

/// Rates samples against a sheet. Samples may be in any order and repeated;
/// see [`crate::sample`] for the interval semantics.
pub fn rate_samples<P: IdlePolicy>(
    sheet: &PriceSheet,
    samples: &[NumberedSample],
    policy: &P,
) -> RatedUsage {
    let mut errors = Vec::new();
    let series = series::build_series(samples, &mut errors);
    let mut accumulator = Accumulator::new(sheet.versions().len(), sheet.slot_count());
    let mut rater = interval::SeriesRater::new(sheet, policy, &mut accumulator, &mut errors);
    for members in &series {
        rater.rate_series(samples, members);
    }
    errors.sort_by(|left, right| (left.line, &left.field).cmp(&(right.line, &right.field)));
    RatedUsage {
        customers: accumulator.into_customers(),
        errors,
        idle_policy: policy.version().to_owned(),
    }
}

/// One row of quantities per customer, found by id once per series.
#[derive(Debug, Clone)]
pub(crate) struct Accumulator {
    slot_count: usize,
    version_count: usize,
    row_len: usize,
    row_index: HashMap<CustomerId, usize>,
    customers: Vec<CustomerId>,
    rows: Vec<Vec<u128>>,
    /// Per row, per price version: idle running milliseconds.
    idle: Vec<Vec<u64>>,
    last_row: Option<usize>,
}

impl Accumulator {
    fn new(version_count: usize, slot_count: usize) -> Self {
        Self {
            slot_count,
            version_count,
            row_len: version_count * slot_count,
            row_index: HashMap::new(),
            customers: Vec::new(),
            rows: Vec::new(),
            idle: Vec::new(),
            last_row: None,
        }
    }

    /// The row of a customer, created on first sight.
    fn row_of(&mut self, customer: &CustomerId) -> usize {
        if let Some(last) = self.last_row {
            if &self.customers[last] == customer {
                return last;
            }
        }
        let row = match self.row_index.get(customer) {
            Some(row) => *row,
            None => {
                self.customers.push(customer.clone());
                self.rows.push(vec![0; self.row_len]);
                self.idle.push(vec![0; self.version_count]);
                self.row_index.insert(customer.clone(), self.rows.len() - 1);
                self.rows.len() - 1
            }
        };
        self.last_row = Some(row);
        row
    }

    fn add(&mut self, row: usize, version: usize, slot: ResourceSlot, quantity: u128) {
        let cell = &mut self.rows[row][version * self.slot_count + slot.0];
        // u128 base units: 1e38 byte-ms is ~3e18 GiB-years; saturating keeps
        // an impossible overflow from wrapping into a small bill.
        *cell = cell.saturating_add(quantity);
    }

    fn add_idle(&mut self, row: usize, version: usize, ms: u64) {
        if let Some(cell) = self.idle[row].get_mut(version) {
            *cell = cell.saturating_add(ms);
        }
    }

    fn into_customers(self) -> Vec<CustomerUsage> {
        let slot_count = self.slot_count;
        let mut customers: Vec<CustomerUsage> = self
            .customers
            .into_iter()
            .zip(self.rows)
            .zip(self.idle)
            .map(|((customer, quantities), idle_ms)| CustomerUsage {
                customer,
                slot_count,
                quantities,
                idle_ms,
            })
            .collect();
        customers.sort_by(|left, right| left.customer.cmp(&right.customer));
        customers
    }
}
