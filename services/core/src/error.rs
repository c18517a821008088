//! The crate's errors: a refused sheet, a rejected input line, and the
//! arithmetic guards that stop a bill rather than let it be wrong.

use serde::Serialize;

pub use crate::pricing::SheetError;

/// Why rating could not produce a bill at all. Bad input lines are not errors
/// of this kind: they are reported as [`LineError`]s beside the bill.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sheet(#[from] SheetError),
    /// A quantity times a price left the exact integer range (about 3.4e38).
    #[error("customer {customer}: the amount of {resource} is too large to compute exactly")]
    AmountOverflow { customer: String, resource: String },
    /// The customer is billed in a currency the sheet does not price in:
    /// nothing is converted, ever.
    #[error(
        "customer {customer} is billed in {currency}; sheet {sheet} prices in {sheet_currency}"
    )]
    Currency {
        customer: String,
        currency: String,
        sheet: String,
        sheet_currency: String,
    },
    /// A subscription names a plan the sheet does not define.
    #[error("customer {customer}: plan {plan:?} of their subscription is not in sheet {sheet}")]
    UnknownPlan {
        customer: String,
        plan: String,
        sheet: String,
    },
    /// Money summed two ways disagreed: a bug, refused rather than billed.
    #[error("customer {customer}: lines sum to {lines} but the {total_name} is {stated}")]
    SumMismatch {
        customer: String,
        total_name: &'static str,
        lines: String,
        stated: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One input line (a JSONL line, or a record's position) that was rejected or
/// only partly billed, with the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    /// 1-based line number in the input.
    pub line: u64,
    pub field: String,
    pub reason: String,
}

impl LineError {
    pub fn new(line: u64, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            line,
            field: field.into(),
            reason: reason.into(),
        }
    }
}
