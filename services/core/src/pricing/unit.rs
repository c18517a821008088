//! Billing units: what one unit of a priced resource is, in integer base units.
//!
//! Rating accumulates every quantity as an integer in a base unit fixed per
//! resource kind (vCPU-microseconds, byte-milliseconds, GPU-milliseconds, bytes).
//! A sheet's unit (`vcpu-hour`, `GiB-second`, `GB-month`, `gpu-hour`, `GB`) is
//! then just an integer divisor of that base, so the price of a line is the exact
//! fraction `base x price / divisor` and is rounded once.
//!
//! Byte units are explicit about their base: `GB` is 10^9 bytes and `GiB` is
//! 2^30 bytes; a sheet says which its platform means by the unit it names.

use std::fmt;

use crate::pricing::ResourceKind;

/// Milliseconds per named time unit; a month has the length the sheet states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    Second,
    Minute,
    Hour,
    Day,
    Month,
}

impl TimeUnit {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "second" => Some(TimeUnit::Second),
            "minute" => Some(TimeUnit::Minute),
            "hour" => Some(TimeUnit::Hour),
            "day" => Some(TimeUnit::Day),
            "month" => Some(TimeUnit::Month),
            _ => None,
        }
    }

    fn millis(self, month_hours: Option<u32>) -> Result<u128, String> {
        Ok(match self {
            TimeUnit::Second => 1_000,
            TimeUnit::Minute => 60_000,
            TimeUnit::Hour => 3_600_000,
            TimeUnit::Day => 86_400_000,
            TimeUnit::Month => {
                let hours = month_hours.ok_or_else(|| {
                    "a month unit needs `month_hours` in [sheet] to say how long a month is"
                        .to_owned()
                })?;
                u128::from(hours) * 3_600_000
            }
        })
    }
}

/// What a priced unit counts, before the time dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// One vCPU; base is thousandths of a vCPU (so vCPU x ms = vCPU-microseconds).
    Vcpu,
    /// One GPU of the resource's model.
    Gpu,
    /// A number of bytes.
    Bytes(u128),
}

impl Measure {
    fn parse(text: &str) -> Option<Self> {
        let bytes = match text {
            "vcpu" => return Some(Measure::Vcpu),
            "gpu" => return Some(Measure::Gpu),
            "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return None,
        };
        Some(Measure::Bytes(bytes))
    }

    /// Base amount units in one measured unit.
    fn base(self) -> u128 {
        match self {
            Measure::Vcpu => 1_000,
            Measure::Gpu => 1,
            Measure::Bytes(bytes) => bytes,
        }
    }
}

/// A sheet's unit for one resource, resolved to an integer divisor of the
/// resource's base unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingUnit {
    text: String,
    /// Base units in one billing unit.
    divisor: u128,
    /// Base units of the measure alone (one vCPU, one GiB), to turn a stated
    /// minimum such as "0.125 GiB" into a base rate per millisecond.
    measure_base: u128,
}

impl BillingUnit {
    /// Parses `measure-time` (`vcpu-second`, `GiB-hour`, `gpu-hour`,
    /// `GB-month`) for time-integrated resources, or a bare byte measure (`GB`)
    /// for network egress, checking that it fits the resource kind.
    pub fn parse(text: &str, kind: ResourceKind, month_hours: Option<u32>) -> Result<Self, String> {
        if kind == ResourceKind::Meter {
            return Self::parse_count(text);
        }
        let (measure_text, time_text) = match text.split_once('-') {
            Some((measure, time)) => (measure, Some(time)),
            None => (text, None),
        };
        let measure = Measure::parse(measure_text).ok_or_else(|| {
            format!(
                "{measure_text:?} is not a unit: use vcpu, gpu, B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
        })?;
        check_measure_fits(kind, measure, text)?;
        let time_millis = match (kind, time_text) {
            (ResourceKind::Egress, None) => 1,
            (ResourceKind::Egress, Some(_)) => {
                return Err(format!(
                    "{text:?}: egress is priced per byte measure, e.g. \"GB\""
                ))
            }
            (_, None) => {
                return Err(format!(
                    "{text:?} has no time unit: write e.g. \"{measure_text}-hour\""
                ))
            }
            (_, Some(time)) => TimeUnit::parse(time)
                .ok_or_else(|| {
                    format!("{time:?} is not a time unit: use second, minute, hour, day or month")
                })?
                .millis(month_hours)?,
        };
        Ok(Self {
            text: text.to_owned(),
            divisor: measure.base() * time_millis,
            measure_base: measure.base(),
        })
    }

    /// A meter's unit: a label (`"token"`), or a count and a label
    /// (`"1000000 tokens"`), the price being per that many of the meter's
    /// units. The base is 10^-12 of a unit, the scale meter values are
    /// stored at ([`crate::events::VALUE_SCALE`]).
    fn parse_count(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let (count, label) = match trimmed.split_once(' ') {
            Some((count, label)) if count.bytes().all(|byte| byte.is_ascii_digit()) => {
                let count: u128 = count
                    .parse()
                    .map_err(|_| format!("{text:?}: {count:?} is not a whole number"))?;
                (count, label.trim())
            }
            _ => (1, trimmed),
        };
        if label.is_empty() {
            return Err(format!(
                "{text:?}: a meter's unit names what it counts, e.g. \"token\" or \"1000000 tokens\""
            ));
        }
        if count == 0 || count > 1_000_000_000_000_000 {
            return Err(format!("{text:?}: the count must be from 1 to 10^18 units"));
        }
        let base = 10u128.pow(crate::events::VALUE_SCALE);
        Ok(Self {
            text: text.to_owned(),
            divisor: count * base,
            measure_base: base,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Base units in one billing unit (e.g. 3.6e9 vCPU-microseconds in a vCPU-hour).
    pub fn divisor(&self) -> u128 {
        self.divisor
    }

    /// Base units of one measured unit without time (1000 for a vCPU, 2^30 for a GiB).
    pub fn measure_base(&self) -> u128 {
        self.measure_base
    }
}

impl fmt::Display for BillingUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn check_measure_fits(kind: ResourceKind, measure: Measure, text: &str) -> Result<(), String> {
    let fits = matches!(
        (kind, measure),
        (ResourceKind::Vcpu, Measure::Vcpu)
            | (ResourceKind::Gpu, Measure::Gpu)
            | (
                ResourceKind::Memory | ResourceKind::Disk | ResourceKind::Egress,
                Measure::Bytes(_)
            )
    );
    if fits {
        Ok(())
    } else {
        Err(format!("{text:?} is not a unit for {}", kind.as_str()))
    }
}

/// The integer base unit each resource kind accumulates in, for traceability.
pub fn base_unit_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Vcpu => "vcpu-microsecond",
        ResourceKind::Memory | ResourceKind::Disk => "byte-millisecond",
        ResourceKind::Gpu => "gpu-millisecond",
        ResourceKind::Egress => "byte",
        ResourceKind::Meter => "picounit",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn divisor(text: &str, kind: ResourceKind) -> Result<u128, String> {
        BillingUnit::parse(text, kind, Some(730)).map(|unit| unit.divisor())
    }

    #[test]
    fn units_resolve_to_exact_base_divisors() {
        assert_eq!(divisor("vcpu-second", ResourceKind::Vcpu), Ok(1_000_000));
        assert_eq!(divisor("vcpu-hour", ResourceKind::Vcpu), Ok(3_600_000_000));
        assert_eq!(
            divisor("GiB-second", ResourceKind::Memory),
            Ok((1 << 30) * 1000)
        );
        assert_eq!(
            divisor("GB-hour", ResourceKind::Memory),
            Ok(1_000_000_000 * 3_600_000)
        );
        assert_eq!(divisor("gpu-hour", ResourceKind::Gpu), Ok(3_600_000));
        assert_eq!(
            divisor("GB-month", ResourceKind::Disk),
            Ok(1_000_000_000 * 730 * 3_600_000)
        );
        assert_eq!(divisor("GB", ResourceKind::Egress), Ok(1_000_000_000));
    }

    #[test]
    fn units_refuse_the_wrong_resource_or_a_missing_month_length() {
        assert!(divisor("GiB-hour", ResourceKind::Vcpu).is_err());
        assert!(divisor("vcpu", ResourceKind::Vcpu).is_err());
        assert!(divisor("GB-hour", ResourceKind::Egress).is_err());
        assert!(divisor("Gb-hour", ResourceKind::Memory).is_err());
        assert!(divisor("GB-fortnight", ResourceKind::Memory).is_err());
        assert!(BillingUnit::parse("GB-month", ResourceKind::Disk, None).is_err());
        assert_eq!(divisor("token", ResourceKind::Meter), Ok(1_000_000_000_000));
        assert_eq!(
            divisor("1000000 tokens", ResourceKind::Meter),
            Ok(1_000_000_000_000_000_000)
        );
        assert!(divisor("0 tokens", ResourceKind::Meter).is_err());
        assert!(divisor("  ", ResourceKind::Meter).is_err());
    }
}
