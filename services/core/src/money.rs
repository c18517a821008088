//! Money, currencies and the one rounding an invoice line gets.
//!
//! Prices and quantities keep full precision through rating. The only place a
//! value is rounded to the currency's minor unit is [`RoundingRule::round_ratio`]
//! (usage lines, computed as an exact fraction) and [`RoundingRule::round`]
//! (fees and credits, written as decimals in the sheet), each applied once per
//! invoice line, so the sum of the lines is the invoice total by construction.

use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// An ISO 4217 currency and the number of digits of its minor unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    minor_digits: u32,
}

/// Minor-unit digits of the currencies a sheet may name without stating them.
const KNOWN_CURRENCIES: &[(&str, u32)] = &[
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("CHF", 2),
    ("CAD", 2),
    ("AUD", 2),
    ("SEK", 2),
    ("NOK", 2),
    ("DKK", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("INR", 2),
];

/// Largest minor-unit precision accepted: beyond it no currency exists and the
/// exact line arithmetic would lose headroom.
pub const MAX_MINOR_DIGITS: u32 = 6;

impl Currency {
    /// Parses a three-letter uppercase code. `minor_digits` may be omitted for
    /// the well-known currencies and is required for any other.
    pub fn parse(code: &str, minor_digits: Option<u32>) -> Result<Self, String> {
        let bytes: [u8; 3] = code
            .as_bytes()
            .try_into()
            .map_err(|_| format!("{code:?} is not a three-letter ISO 4217 code"))?;
        if !bytes.iter().all(u8::is_ascii_uppercase) {
            return Err(format!("{code:?} is not a three-letter ISO 4217 code"));
        }
        let known = KNOWN_CURRENCIES
            .iter()
            .find(|(known_code, _)| *known_code == code)
            .map(|(_, digits)| *digits);
        let minor_digits = match (minor_digits, known) {
            (Some(stated), _) if stated > MAX_MINOR_DIGITS => {
                return Err(format!(
                    "{stated} minor-unit digits is more than {MAX_MINOR_DIGITS}"
                ))
            }
            (Some(stated), _) => stated,
            (None, Some(known)) => known,
            (None, None) => {
                return Err(format!(
                    "{code} is not a known currency: state its minor_digits"
                ))
            }
        };
        Ok(Self {
            code: bytes,
            minor_digits,
        })
    }

    /// The US dollar, the currency of every shipped sheet.
    pub fn usd() -> Self {
        Self {
            code: *b"USD",
            minor_digits: 2,
        }
    }

    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("the code was checked to be ASCII")
    }

    /// Digits after the decimal point of the minor unit (2 for cents).
    pub fn minor_digits(&self) -> u32 {
        self.minor_digits
    }

    /// Minor units per major unit (100 for cents).
    pub fn minor_per_major(&self) -> u128 {
        10u128.pow(self.minor_digits)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount in a currency. Sums refuse to mix currencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    pub amount: Decimal,
    pub currency: Currency,
}

impl Money {
    pub fn new(amount: Decimal, currency: Currency) -> Self {
        Self { amount, currency }
    }

    pub fn zero(currency: Currency) -> Self {
        Self::new(Decimal::ZERO, currency)
    }

    /// Adds two amounts of the same currency; `None` on a currency mismatch or
    /// on overflow.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        if self.currency != other.currency {
            return None;
        }
        Some(Money::new(
            self.amount.checked_add(other.amount)?,
            self.currency,
        ))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// How an invoice line is rounded to the minor unit, named by the price sheet.
/// Every rule acts on the magnitude, so a credit of -0.125 rounds like a
/// charge of 0.125 with the sign kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingRule {
    /// Nearest; halves away from zero (0.125 -> 0.13). Commercial rounding.
    HalfUp,
    /// Nearest; halves to the even digit (0.125 -> 0.12). Banker's rounding.
    HalfEven,
    /// Away from zero (0.121 -> 0.13): any fraction of a cent bills a cent.
    Up,
    /// Toward zero (0.129 -> 0.12): fractions of a cent are forgiven.
    Down,
}

impl RoundingRule {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundingRule::HalfUp => "half_up",
            RoundingRule::HalfEven => "half_even",
            RoundingRule::Up => "up",
            RoundingRule::Down => "down",
        }
    }

    /// Rounds the exact non-negative fraction `numerator / denominator` to an
    /// integer. Used for usage lines, whose exact amount is a fraction of
    /// integers, so no decimal precision is lost before this single rounding.
    pub fn round_ratio(self, numerator: u128, denominator: u128) -> u128 {
        debug_assert!(denominator > 0, "a unit divisor is never zero");
        let quotient = numerator / denominator;
        let remainder = numerator % denominator;
        let rest = denominator - remainder;
        let bump = match self {
            RoundingRule::Down => false,
            RoundingRule::Up => remainder > 0,
            RoundingRule::HalfUp => remainder > 0 && remainder >= rest,
            RoundingRule::HalfEven => remainder > rest || (remainder == rest && quotient % 2 == 1),
        };
        quotient + u128::from(bump)
    }

    /// Rounds a decimal amount (a fee or a credit) to `digits` places.
    pub fn round(self, amount: Decimal, digits: u32) -> Decimal {
        let strategy = match self {
            RoundingRule::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            RoundingRule::HalfEven => RoundingStrategy::MidpointNearestEven,
            RoundingRule::Up => RoundingStrategy::AwayFromZero,
            RoundingRule::Down => RoundingStrategy::ToZero,
        };
        let mut rounded = amount.round_dp_with_strategy(digits, strategy);
        rounded.rescale(digits);
        rounded
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).expect("test decimal")
    }

    #[test]
    fn ratio_rounding_follows_each_rule_at_the_half() {
        // 1125 / 10 = 112.5
        assert_eq!(RoundingRule::HalfUp.round_ratio(1125, 10), 113);
        assert_eq!(RoundingRule::HalfEven.round_ratio(1125, 10), 112);
        assert_eq!(RoundingRule::HalfEven.round_ratio(1135, 10), 114);
        assert_eq!(RoundingRule::Up.round_ratio(1121, 10), 113);
        assert_eq!(RoundingRule::Down.round_ratio(1129, 10), 112);
        assert_eq!(RoundingRule::Up.round_ratio(1120, 10), 112);
    }

    #[test]
    fn ratio_rounding_near_but_not_at_the_half() {
        // 1 / 3 and 2 / 3
        assert_eq!(RoundingRule::HalfUp.round_ratio(1, 3), 0);
        assert_eq!(RoundingRule::HalfUp.round_ratio(2, 3), 1);
        assert_eq!(RoundingRule::HalfEven.round_ratio(2, 3), 1);
        assert_eq!(RoundingRule::HalfEven.round_ratio(u128::MAX, u128::MAX), 1);
    }

    #[test]
    fn decimal_rounding_acts_on_the_magnitude_and_keeps_scale() {
        let cents = |rule: RoundingRule, text: &str| rule.round(dec(text), 2).to_string();
        assert_eq!(cents(RoundingRule::HalfUp, "-0.125"), "-0.13");
        assert_eq!(cents(RoundingRule::HalfEven, "0.125"), "0.12");
        assert_eq!(cents(RoundingRule::Up, "-5.941"), "-5.95");
        assert_eq!(cents(RoundingRule::Down, "5.949"), "5.94");
        assert_eq!(cents(RoundingRule::HalfUp, "30"), "30.00");
    }

    #[test]
    fn currency_knows_common_codes_and_requires_digits_for_others() {
        assert_eq!(Currency::parse("USD", None), Ok(Currency::usd()));
        assert_eq!(
            Currency::parse("JPY", None).map(|c| c.minor_digits()),
            Ok(0)
        );
        assert!(Currency::parse("XTS", None).is_err());
        assert_eq!(
            Currency::parse("XTS", Some(3)).map(|c| c.minor_digits()),
            Ok(3)
        );
        assert!(Currency::parse("usd", None).is_err());
        assert!(Currency::parse("USD", Some(9)).is_err());
    }

    #[test]
    fn money_refuses_to_add_across_currencies() {
        let dollars = Money::new(dec("1.00"), Currency::usd());
        let euros = Money::new(dec("1.00"), Currency::parse("EUR", None).expect("eur"));
        assert_eq!(dollars.checked_add(euros), None);
        assert_eq!(
            dollars.checked_add(dollars).map(|m| m.to_string()),
            Some("2.00 USD".to_owned())
        );
    }
}
