//! Billing periods and hour arithmetic, in UTC: the one definition the
//! rater, the invoicer and the API share.

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// The length of a billing period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// Calendar month, starting on the 1st at 00:00 UTC.
    Month,
    /// Calendar day, 00:00 UTC; for tests and daily-billed plans.
    Day,
}

impl Period {
    /// Start of the period containing `time`.
    pub fn start_of(self, time: DateTime<Utc>) -> DateTime<Utc> {
        let day = Utc
            .with_ymd_and_hms(time.year(), time.month(), time.day(), 0, 0, 0)
            .single()
            .expect("midnight UTC exists every day");
        match self {
            Period::Day => day,
            Period::Month => day.with_day(1).expect("every month has a 1st"),
        }
    }

    /// The period containing `time`, as [start, end).
    pub fn bounds(self, time: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = self.start_of(time);
        (start, self.next(start))
    }

    /// Start of the period before the one starting at `start`.
    pub fn previous(self, start: DateTime<Utc>) -> DateTime<Utc> {
        self.start_of(start - chrono::Duration::seconds(1))
    }

    /// Start of the period after the one starting at `start`.
    pub fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Period::Day => start + chrono::Duration::days(1),
            Period::Month => start
                .checked_add_months(chrono::Months::new(1))
                .expect("months after 1970 are representable"),
        }
    }
}

/// `time` truncated to the start of its hour.
pub fn floor_hour(time: DateTime<Utc>) -> DateTime<Utc> {
    time.with_nanosecond(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_minute(0))
        .expect("truncating to the hour is always valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("rfc3339")
    }

    #[test]
    fn months_start_on_the_first_and_roll_over_the_year() {
        let start = Period::Month.start_of(at("2026-12-31T23:59:59Z"));
        assert_eq!(start, at("2026-12-01T00:00:00Z"));
        assert_eq!(Period::Month.next(start), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            Period::Day.start_of(at("2026-11-03T17:20:00Z")),
            at("2026-11-03T00:00:00Z")
        );
        assert_eq!(
            floor_hour(at("2026-11-03T17:20:31.5Z")),
            at("2026-11-03T17:00:00Z")
        );
    }
}
