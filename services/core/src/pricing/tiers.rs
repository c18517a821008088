//! Tiered prices: graduated (each band at its own price) and volume (the whole
//! quantity at the price of the band it reaches).
//!
//! Tier bounds are held in the resource's integer base unit, so splitting a
//! quantity into bands is exact integer arithmetic.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// How tiers apply to a quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// Each band of the quantity is priced at its tier's price.
    Graduated,
    /// The whole quantity is priced at the tier its total falls in.
    Volume,
}

/// One tier: up to (and including) `up_to_base` base units at `unit_price`;
/// `None` is unbounded and only allowed last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub up_to_base: Option<u128>,
    pub unit_price: Decimal,
}

/// The price of a resource: flat or tiered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TieredPrice {
    Flat(Decimal),
    Tiered { mode: TierMode, tiers: Vec<Tier> },
}

/// A part of a quantity with the unit price it bills at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedBand {
    /// 1-based tier number, `None` for a flat price.
    pub tier: Option<usize>,
    pub quantity_base: u128,
    pub unit_price: Decimal,
}

impl TieredPrice {
    /// Splits a quantity (base units) into the bands it bills as. Empty bands
    /// are left out; a zero quantity yields no band.
    pub fn bands(&self, quantity_base: u128) -> Vec<PricedBand> {
        if quantity_base == 0 {
            return Vec::new();
        }
        match self {
            TieredPrice::Flat(unit_price) => vec![PricedBand {
                tier: None,
                quantity_base,
                unit_price: *unit_price,
            }],
            TieredPrice::Tiered {
                mode: TierMode::Volume,
                tiers,
            } => volume_band(tiers, quantity_base).into_iter().collect(),
            TieredPrice::Tiered {
                mode: TierMode::Graduated,
                tiers,
            } => graduated_bands(tiers, quantity_base),
        }
    }
}

fn volume_band(tiers: &[Tier], quantity_base: u128) -> Option<PricedBand> {
    let (index, tier) = tiers
        .iter()
        .enumerate()
        .find(|(_, tier)| tier.up_to_base.is_none_or(|up_to| quantity_base <= up_to))?;
    Some(PricedBand {
        tier: Some(index + 1),
        quantity_base,
        unit_price: tier.unit_price,
    })
}

fn graduated_bands(tiers: &[Tier], quantity_base: u128) -> Vec<PricedBand> {
    let mut bands = Vec::new();
    let mut lower = 0u128;
    for (index, tier) in tiers.iter().enumerate() {
        let upper = tier.up_to_base.unwrap_or(u128::MAX).min(quantity_base);
        if upper > lower {
            bands.push(PricedBand {
                tier: Some(index + 1),
                quantity_base: upper - lower,
                unit_price: tier.unit_price,
            });
        }
        lower = lower.max(upper);
        if lower >= quantity_base {
            break;
        }
    }
    bands
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(mode: TierMode) -> TieredPrice {
        TieredPrice::Tiered {
            mode,
            tiers: vec![
                Tier {
                    up_to_base: Some(100),
                    unit_price: Decimal::from(3),
                },
                Tier {
                    up_to_base: Some(1000),
                    unit_price: Decimal::from(2),
                },
                Tier {
                    up_to_base: None,
                    unit_price: Decimal::ONE,
                },
            ],
        }
    }

    fn summary(bands: &[PricedBand]) -> Vec<(usize, u128, i64)> {
        bands
            .iter()
            .map(|band| {
                (
                    band.tier.unwrap_or(0),
                    band.quantity_base,
                    i64::try_from(band.unit_price.mantissa()).unwrap_or(-1),
                )
            })
            .collect()
    }

    #[test]
    fn graduated_tiers_price_each_band_separately() {
        let bands = schedule(TierMode::Graduated).bands(1500);
        assert_eq!(summary(&bands), vec![(1, 100, 3), (2, 900, 2), (3, 500, 1)]);
        let bands = schedule(TierMode::Graduated).bands(100);
        assert_eq!(summary(&bands), vec![(1, 100, 3)]);
    }

    #[test]
    fn volume_tiers_price_everything_at_the_reached_tier() {
        assert_eq!(
            summary(&schedule(TierMode::Volume).bands(1000)),
            vec![(2, 1000, 2)]
        );
        assert_eq!(
            summary(&schedule(TierMode::Volume).bands(1001)),
            vec![(3, 1001, 1)]
        );
    }

    #[test]
    fn zero_quantity_has_no_band() {
        assert!(schedule(TierMode::Graduated).bands(0).is_empty());
        assert!(TieredPrice::Flat(Decimal::ONE).bands(0).is_empty());
    }
}
