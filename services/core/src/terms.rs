//! The terms every money figure is computed under, shared by the rater, the
//! invoicer and the usage API (`[billing]` in the configuration): who issues
//! the invoices, how long a billing period is, how far back late usage is
//! adjusted, and each customer's tax rate. One definition, so that the cost
//! a customer sees and the invoice they get cannot disagree on them.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::ids::CustomerId;
use crate::period::Period;

/// `[billing]` settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BillingTerms {
    /// Who issues the invoices; numbering and accounts are per issuer.
    pub issuer: String,
    /// `month` (calendar month, UTC) or `day` (for tests and daily plans).
    pub period: Period,
    /// How many earlier invoiced periods late usage is adjusted for.
    pub adjust_lookback_periods: usize,
    /// Tax rate per customer ("0.2" for 20 %), checked when the settings
    /// are read; 0 for customers not listed.
    pub tax_rates: TaxRates,
    /// The seller as invoice documents print it, one line each (name,
    /// address, tax id); the issuer's name when empty.
    pub seller: Vec<String>,
}

impl Default for BillingTerms {
    fn default() -> Self {
        Self {
            issuer: "idlemeter".to_owned(),
            period: Period::Month,
            adjust_lookback_periods: 3,
            tax_rates: TaxRates::default(),
            seller: Vec::new(),
        }
    }
}

/// A tax rate that cannot be used, and whose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[billing] tax_rates of {customer:?}: {reason}")]
pub struct TermsError {
    pub customer: String,
    pub reason: String,
}

/// Each customer's tax rate: a valid customer id and a decimal in [0, 1),
/// checked as the settings are read (a bad rate stops the service at start,
/// naming the customer), and written back as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaxRates(BTreeMap<CustomerId, Decimal>);

impl TaxRates {
    /// Checks `(customer, rate)` pairs as written in `[billing] tax_rates`.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, TermsError> {
        let mut rates = BTreeMap::new();
        for (customer, rate) in pairs {
            let invalid = |reason: String| TermsError {
                customer: customer.to_owned(),
                reason,
            };
            let id = CustomerId::parse(customer).map_err(|e| invalid(e.to_string()))?;
            let parsed: Decimal = rate
                .parse()
                .map_err(|e| invalid(format!("{rate:?} is not a decimal: {e}")))?;
            if parsed.is_sign_negative() || parsed >= Decimal::ONE {
                return Err(invalid(format!("{parsed} is not in [0, 1)")));
            }
            rates.insert(id, parsed);
        }
        Ok(Self(rates))
    }

    /// The rates of the customers listed.
    pub fn rates(&self) -> &BTreeMap<CustomerId, Decimal> {
        &self.0
    }
}

impl Serialize for TaxRates {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .map(|(customer, rate)| (customer.as_str(), rate.to_string())),
        )
    }
}

impl<'de> Deserialize<'de> for TaxRates {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let written = BTreeMap::<String, String>::deserialize(deserializer)?;
        Self::parse(
            written
                .iter()
                .map(|(customer, rate)| (customer.as_str(), rate.as_str())),
        )
        .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tax_rates_must_be_fractions_of_valid_customers() {
        let rates = TaxRates::parse([("acme", "0.2")]).expect("valid");
        assert_eq!(
            rates.rates().values().next().copied(),
            Some(Decimal::new(2, 1))
        );
        let error = TaxRates::parse([("acme", "0.2"), ("beta", "1")]).expect_err("100 %");
        assert!(error.to_string().contains("beta"), "{error}");
        assert!(TaxRates::parse([("gamma", "twenty")]).is_err());
        assert!(TaxRates::parse([("not an id!", "0.1")]).is_err());
    }

    #[test]
    fn tax_rates_are_checked_as_the_settings_are_read_and_written_back_alike() {
        let terms: BillingTerms =
            toml::from_str("[tax_rates]\nacme = \"0.2\"\n").expect("valid terms");
        assert_eq!(
            terms
                .tax_rates
                .rates()
                .get(&CustomerId::parse("acme").expect("id")),
            Some(&Decimal::new(2, 1))
        );
        let error = toml::from_str::<BillingTerms>("[tax_rates]\nbeta = \"1.5\"\n")
            .expect_err("150 % is refused at load");
        assert!(error.to_string().contains("beta"), "{error}");
        let written = toml::to_string(&terms).expect("serialises");
        assert!(written.contains("acme = \"0.2\""), "{written}");
    }
}
