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
    /// Tax rate per customer as a decimal string ("0.2" for 20 %); 0 for
    /// customers not listed.
    pub tax_rates: BTreeMap<String, String>,
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
            tax_rates: BTreeMap::new(),
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

impl BillingTerms {
    /// The tax rates, checked: a valid customer id and a decimal in [0, 1).
    pub fn tax_rates(&self) -> Result<BTreeMap<CustomerId, Decimal>, TermsError> {
        let mut rates = BTreeMap::new();
        for (customer, rate) in &self.tax_rates {
            let invalid = |reason: String| TermsError {
                customer: customer.clone(),
                reason,
            };
            let id = CustomerId::parse(customer.clone()).map_err(|e| invalid(e.to_string()))?;
            let parsed: Decimal = rate
                .parse()
                .map_err(|e| invalid(format!("{rate:?} is not a decimal: {e}")))?;
            if parsed.is_sign_negative() || parsed >= Decimal::ONE {
                return Err(invalid(format!("{parsed} is not in [0, 1)")));
            }
            rates.insert(id, parsed);
        }
        Ok(rates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tax_rates_must_be_fractions_of_valid_customers() {
        let mut terms = BillingTerms::default();
        terms.tax_rates.insert("acme".to_owned(), "0.2".to_owned());
        let rates = terms.tax_rates().expect("valid");
        assert_eq!(rates.values().next().copied(), Some(Decimal::new(2, 1)));
        terms.tax_rates.insert("beta".to_owned(), "1".to_owned());
        let error = terms.tax_rates().expect_err("100 % is refused");
        assert!(error.to_string().contains("beta"), "{error}");
        terms.tax_rates.remove("beta");
        terms
            .tax_rates
            .insert("gamma".to_owned(), "twenty".to_owned());
        assert!(terms.tax_rates().is_err());
    }
}
