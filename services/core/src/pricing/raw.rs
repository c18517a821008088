//! The price sheet as written in TOML, before cross-field validation.
//!
//! Every table refuses unknown keys, so a misspelt `unit_prise` is an error and
//! never a silently free resource. Fields checked against others later carry
//! their span, so those checks can still point at a line.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::money::RoundingRule;
use crate::pricing::{Basis, CreditKind, IdleBilling, TierMode};
use crate::sample::LifecycleState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSheet {
    pub sheet: RawHeader,
    #[serde(default)]
    pub plans: BTreeMap<Spanned<String>, RawPlan>,
    #[serde(default)]
    pub customers: BTreeMap<Spanned<String>, RawCustomer>,
    pub versions: Vec<RawVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeader {
    pub platform: String,
    pub currency: Spanned<String>,
    pub minor_digits: Option<u32>,
    pub line_rounding: RoundingRule,
    pub month_hours: Option<u32>,
    pub default_plan: Option<Spanned<String>>,
    #[allow(dead_code)] // documentation for the reviewer, kept to refuse typos
    pub source: Option<String>,
    #[allow(dead_code)]
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlan {
    pub monthly_fee: Option<PriceText>,
    #[serde(default)]
    pub included: BTreeMap<Spanned<String>, PriceText>,
    #[serde(default)]
    pub credits: Vec<RawCredit>,
    #[allow(dead_code)]
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredit {
    pub kind: CreditKind,
    pub amount: PriceText,
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCustomer {
    pub plan: Option<Spanned<String>>,
    #[serde(default)]
    pub unit_prices: BTreeMap<Spanned<String>, PriceText>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVersion {
    pub effective_from: Spanned<toml::value::Datetime>,
    pub note: Option<String>,
    pub resources: RawResources,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResources {
    pub vcpu: Option<RawResource>,
    pub memory: Option<RawResource>,
    #[serde(default)]
    pub gpu: BTreeMap<String, RawResource>,
    pub disk: Option<RawResource>,
    pub egress: Option<RawResource>,
    /// Meters of usage events by slug (`[versions.resources.meters.<slug>]`).
    #[serde(default)]
    pub meters: BTreeMap<String, RawResource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResource {
    pub unit: Spanned<String>,
    pub unit_price: Option<Spanned<PriceText>>,
    pub basis: Option<Spanned<Basis>>,
    pub increment_seconds: Option<Spanned<u32>>,
    pub idle: Option<IdleBilling>,
    pub bills_while: Option<Spanned<Vec<LifecycleState>>>,
    pub minimum: Option<Spanned<PriceText>>,
    pub tier_mode: Option<TierMode>,
    pub tiers: Option<Spanned<Vec<RawTier>>>,
    #[allow(dead_code)]
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTier {
    pub up_to: Option<PriceText>,
    pub unit_price: PriceText,
}

/// A non-negative decimal written as a TOML string (`"0.000014"`) or integer.
/// TOML floats are refused: they are binary and would round a price before it
/// is ever used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PriceText(pub Decimal);

impl<'de> Deserialize<'de> for PriceText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PriceTextVisitor)
    }
}

struct PriceTextVisitor;

impl Visitor<'_> for PriceTextVisitor {
    type Value = PriceText;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a non-negative decimal written as a string, e.g. \"0.000014\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<PriceText, E> {
        let value = Decimal::from_str(text.trim())
            .map_err(|_| E::custom(format!("{text:?} is not a decimal number")))?;
        if value.is_sign_negative() && !value.is_zero() {
            return Err(E::custom(format!("{text:?} is negative")));
        }
        Ok(PriceText(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<PriceText, E> {
        if value < 0 {
            return Err(E::custom(format!("{value} is negative")));
        }
        Ok(PriceText(Decimal::from(value)))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<PriceText, E> {
        Ok(PriceText(Decimal::from(value)))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<PriceText, E> {
        Err(E::custom(format!(
            "{value} is a TOML float: write decimals as quoted strings (\"{value}\") so no binary rounding touches them"
        )))
    }
}
