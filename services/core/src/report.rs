//! The rating output document and the entry points the CLI and the rater call.
//!
//! Shape (every number a decimal string; customers by id, lines by price
//! version, resource, tier, then fees and credits; errors by line):
//!
//! ```json
//! {"currency": "USD", "sheet": "prices/e2b.toml", "platform": "e2b",
//!  "line_rounding": "half_up", "idle_policy": "session-or-connection/v2",
//!  "customers": [{"customer": "acme", "plan": "hobby",
//!    "lines": [{"kind": "usage", "resource": "vcpu", "quantity": "7200",
//!               "unit": "vcpu-second", "unit_price": "0.000014", "amount": "0.10", ...}],
//!    "subtotal": "0.10", "fees": "0.00", "credits": "-0.10", "total": "0.00"}],
//!  "errors": [{"line": 3, "field": "vcpu", "reason": "..."}]}
//! ```

use serde::Serialize;

use crate::error::{LineError, Result};
use crate::invoice::{bill_customer, BillingOptions, CustomerBill};
use crate::jsonl::parse_samples;
use crate::pricing::PriceSheet;
use crate::rating::{rate_samples, IdlePolicy, NumberedSample, RatedUsage, SessionOrConnection};

/// The rating of one period of samples against one sheet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateReport {
    /// ISO 4217 code of every amount in the document.
    pub currency: String,
    /// The label the sheet was loaded under.
    pub sheet: String,
    pub platform: String,
    pub line_rounding: &'static str,
    /// Version of the idle policy that classified running intervals.
    pub idle_policy: String,
    pub customers: Vec<CustomerBill>,
    /// Input lines refused or only partly billed, by line.
    pub errors: Vec<LineError>,
}

/// Rates JSONL samples against a TOML sheet with the default idle policy,
/// treating the input as one billing period of accounts that still hold their
/// whole one-time credits. This is what `idlemeter rate` prints.
pub fn rate_jsonl(sheet_toml: &str, sheet_label: &str, samples_jsonl: &str) -> Result<RateReport> {
    let sheet = PriceSheet::from_toml(sheet_toml, sheet_label)?;
    let parsed = parse_samples(samples_jsonl);
    rate_report(
        &sheet,
        &parsed.samples,
        &SessionOrConnection,
        &BillingOptions::default(),
        parsed.errors,
    )
}

/// Rates parsed samples into the output document. `input_errors` (from
/// parsing) are merged with the rating's own, by line.
pub fn rate_report<P: IdlePolicy>(
    sheet: &PriceSheet,
    samples: &[NumberedSample],
    policy: &P,
    options: &BillingOptions,
    input_errors: Vec<LineError>,
) -> Result<RateReport> {
    report_usage(
        sheet,
        rate_samples(sheet, samples, policy),
        options,
        input_errors,
    )
}

/// The output document of quantities already rated (by [`rate_samples`] or
/// a carried [`crate::RatingState`]).
pub fn report_usage(
    sheet: &PriceSheet,
    usage: RatedUsage,
    options: &BillingOptions,
    input_errors: Vec<LineError>,
) -> Result<RateReport> {
    let customers = usage
        .customers
        .iter()
        .map(|customer| bill_customer(sheet, customer, options))
        .collect::<Result<Vec<_>>>()?;
    let mut errors = input_errors;
    errors.extend(usage.errors);
    errors.sort_by(|left, right| (left.line, &left.field).cmp(&(right.line, &right.field)));
    Ok(RateReport {
        currency: sheet.currency.code().to_owned(),
        sheet: sheet.label.clone(),
        platform: sheet.platform.clone(),
        line_rounding: sheet.line_rounding.as_str(),
        idle_policy: usage.idle_policy,
        customers,
        errors,
    })
}
