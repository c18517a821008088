//! Plans and per-customer terms: monthly fees, included usage, credits and
//! negotiated unit prices.
//!
//! Rating carries fees and credits into its output as invoice lines so they
//! are never lost; the invoicing job decides which period they fall in and how
//! much of a one-time credit is left (see the crate README for `total`).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::pricing::{CreditKind, ResourceSlot};

/// A credit granted by a plan, in the sheet's currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit {
    pub kind: CreditKind,
    pub amount: Decimal,
    pub note: Option<String>,
}

/// A plan a customer is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    /// Billed once per period, whatever the usage.
    pub monthly_fee: Decimal,
    /// Usage included per period, in base units per resource slot; billed at
    /// zero before any price applies.
    pub included_base: BTreeMap<ResourceSlot, u128>,
    /// Applied in the order written in the sheet.
    pub credits: Vec<Credit>,
}

/// What a sheet says about one customer in particular.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CustomerTerms {
    /// The plan, when not the sheet's default.
    pub plan: Option<String>,
    /// Negotiated flat unit prices replacing the published ones in every
    /// version.
    pub unit_prices: BTreeMap<ResourceSlot, Decimal>,
}
