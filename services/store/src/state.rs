//! What the rater carries between passes, its live figures and the samples
//! it refused (migration 0009).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use idlemeter_core::{CustomerId, PriceSheet, RatingState};

use crate::sql::{statement, Fetch};
use crate::{unix_ms, unix_seconds, Counted, RatedLineRow, Result, Store};

/// A customer's rating state as the rater saved it, loaded for a sheet.
#[derive(Debug)]
pub struct SavedState {
    pub customer: String,
    /// What the state covers: samples up to this instant (Unix ms).
    pub as_of_ms: u64,
    pub state: RatingState,
    /// See [`RatingStateRow::samples`].
    pub samples: u64,
}

/// See `queries/rating_states.sql`.
pub const RATING_STATES_SQL: &str = include_str!("queries/rating_states.sql");
/// See `queries/rated_quantities.sql`.
pub const RATED_QUANTITIES_SQL: &str = include_str!("queries/rated_quantities.sql");
/// See `queries/live_lines.sql`.
pub const LIVE_LINES_SQL: &str = include_str!("queries/live_lines.sql");

/// A customer's carried rating state at the end of a rated hour.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct RatingStateRow {
    pub customer: String,
    /// Unix seconds.
    pub period_start: u32,
    pub sheet_checksum: String,
    /// Unix seconds: the end of the hour the state has rated.
    pub as_of: u32,
    /// Series (sandbox, epoch) carried: a size figure for operators.
    pub series: u32,
    /// `idlemeter_core::RatingState` as JSON.
    pub state: String,
    pub rated_at: u32,
    /// The state's quantities, closed (`CustomerUsage::to_text`).
    pub usage: String,
    /// How many distinct samples of the period, taken before `as_of`, the
    /// state has rated: what the rater compares with the samples stored
    /// for the period (migration 0011). A state whose count falls short is
    /// re-rated, or rated again by the close.
    pub samples: u64,
    /// Orders states of the same as_of: wall-clock ms of the write.
    pub revision: u64,
    /// 1: `samples` counts what the state rated (migration 0017). Rows
    /// written before have 0, and readers take their count as 0.
    pub counts_rated: u8,
}

/// A customer's newest rated quantities in a period (see
/// [`Store::rated_quantities`]).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct RatedQuantities {
    pub customer: String,
    /// Unix seconds: the end of the hour rated through.
    pub as_of: u32,
    pub rated_at: u32,
    /// `CustomerUsage::to_text`; empty in rows older than migration 0011.
    pub usage: String,
    /// See [`RatingStateRow::samples`].
    pub samples: u64,
}

/// What [`Store::rated_through`] found.
#[derive(Debug, Default)]
pub struct RatedThrough {
    /// The customers whose quantities can be billed as they are.
    pub complete: HashMap<String, RatedQuantities>,
    /// The others with a state in the period: rated short of `until`,
    /// older than migration 0011, or short of samples stored since.
    pub incomplete: Vec<RatedQuantities>,
}

/// One sample rating refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct RatingErrorRow {
    pub customer: String,
    pub sandbox: String,
    pub epoch: u64,
    pub seq: u64,
    pub field: String,
    pub reason: String,
    pub period_start: u32,
    pub sheet_checksum: String,
    pub detected_at: u32,
}

impl Store {
    pub async fn insert_rating_state(&self, row: &RatingStateRow) -> Result<()> {
        self.insert_rows("rating_state", std::slice::from_ref(row))
            .await
    }

    /// Many states in one insert (fixtures, benchmarks, bulk re-rating).
    pub async fn insert_rating_states(&self, rows: &[RatingStateRow]) -> Result<()> {
        self.insert_rows("rating_state", rows).await
    }

    /// The newest state at or before `before` of every customer from `first`
    /// to `last` (inclusive) with one in the period under the sheet, in one
    /// query, each loaded for `sheet`. A state that does not load is left
    /// out with a warning: states are a cache of the samples, and the
    /// caller rates that customer from the period's start instead.
    pub async fn rating_states_before(
        &self,
        (first, last): (&str, &str),
        period_start: DateTime<Utc>,
        (sheet, sheet_checksum): (&PriceSheet, &str),
        before: DateTime<Utc>,
    ) -> Result<Vec<SavedState>> {
        let period_start = unix_seconds(period_start);
        let before = unix_seconds(before);
        let rows: Vec<(String, u32, String, u64)> = statement!(
            self.client,
            RATING_STATES_SQL,
            first,
            last,
            period_start,
            sheet_checksum,
            before
        )
        .all(format!("rating states of {first} .. {last}"))
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(customer, as_of, text, samples)| {
                match RatingState::from_json(&text, sheet) {
                    Ok(state) => Some(SavedState {
                        customer,
                        as_of_ms: u64::from(as_of) * 1000,
                        state,
                        samples,
                    }),
                    Err(error) => {
                        tracing::warn!(%customer, as_of, %error, "stored rating state does not load; rating from the period's start");
                        None
                    }
                }
            })
            .collect())
    }

    /// [`Self::rating_states_before`] of one customer.
    pub async fn rating_state_before(
        &self,
        customer: &CustomerId,
        period_start: DateTime<Utc>,
        sheet: (&PriceSheet, &str),
        before: DateTime<Utc>,
    ) -> Result<Option<SavedState>> {
        let id = customer.as_str();
        let states = self
            .rating_states_before((id, id), period_start, sheet, before)
            .await?;
        Ok(states.into_iter().next())
    }

    /// Every customer's (from `first` to `last`, inclusive) newest rated
    /// quantities in a period under a checksum: one row per customer, read
    /// from the state table (merges keep one row per customer and period),
    /// never from the samples.
    pub async fn rated_quantities(
        &self,
        first: &str,
        last: &str,
        period_start: u32,
        sheet_checksum: &str,
    ) -> Result<Vec<RatedQuantities>> {
        statement!(
            self.client,
            RATED_QUANTITIES_SQL,
            first,
            last,
            period_start,
            sheet_checksum
        )
        .all(format!("rated quantities of {first} .. {last}"))
        .await
    }

    /// [`Self::rated_quantities`] of the customers `first..=last` in the
    /// period starting `period_start`, split by whether they can be billed
    /// as they are through `until`: rated through it, closed (not older
    /// than migration 0011), and from every distinct sample stored in
    /// `[period_start, until)` (the state's count equals the stored rows,
    /// or, where those differ because a replay's rows await a merge, the
    /// distinct samples). What the close bills and what an adjustment
    /// compares an issued invoice with.
    pub async fn rated_through(
        &self,
        (first, last): (&str, &str),
        (period_start, until): (DateTime<Utc>, DateTime<Utc>),
        sheet_checksum: &str,
    ) -> Result<RatedThrough> {
        let (from_ms, to_ms) = (unix_ms(period_start), unix_ms(until));
        let (rows, stored_rows) = futures::try_join!(
            self.rated_quantities(first, last, unix_seconds(period_start), sheet_checksum),
            self.sample_counts(Counted::Rows, (first, last), from_ms, to_ms),
        )?;
        self.split_complete(rows, &stored_rows, (period_start, until))
            .await
    }

    /// [`Self::rated_through`]'s split of `rows` (in customer order), for a
    /// caller that has counted each customer's stored rows in
    /// `[period_start, until)` already (`stored_rows`, as
    /// [`Counted::Rows`] counts them; absent: none). The distinct samples
    /// are counted only for customers whose rows differ from their count.
    pub async fn split_complete(
        &self,
        rows: Vec<RatedQuantities>,
        stored_rows: &HashMap<String, u64>,
        (period_start, until): (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<RatedThrough> {
        let count = |counts: &HashMap<String, u64>, customer: &str| {
            counts.get(customer).copied().unwrap_or(0)
        };
        let (reaching, mut incomplete): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|row| row.as_of >= unix_seconds(until) && !row.usage.is_empty());
        let differ: Vec<&str> = reaching
            .iter()
            .filter(|row| row.samples != count(stored_rows, &row.customer))
            .map(|row| row.customer.as_str())
            .collect();
        let distinct = match (differ.first(), differ.last()) {
            (Some(low), Some(high)) => {
                let range = (unix_ms(period_start), unix_ms(until));
                self.sample_counts(Counted::Distinct, (low, high), range.0, range.1)
                    .await?
            }
            _ => HashMap::new(),
        };
        let mut complete = HashMap::new();
        for row in reaching {
            let customer = row.customer.as_str();
            if row.samples == count(stored_rows, customer)
                || row.samples == count(&distinct, customer)
            {
                complete.insert(row.customer.clone(), row);
            } else {
                incomplete.push(row);
            }
        }
        Ok(RatedThrough {
            complete,
            incomplete,
        })
    }

    /// Replaces the customer's live figure with these lines (all of one
    /// as_of).
    pub async fn insert_live_lines(&self, rows: &[RatedLineRow]) -> Result<()> {
        self.insert_rows("live_usage", rows).await
    }

    /// The lines of the newest live figure of a customer's period under a
    /// checksum, in line order.
    pub async fn live_lines(
        &self,
        customer: &str,
        period_start: u32,
        sheet_checksum: &str,
    ) -> Result<Vec<RatedLineRow>> {
        statement!(
            self.client,
            LIVE_LINES_SQL,
            customer,
            period_start,
            sheet_checksum
        )
        .all(format!("live lines of {customer}"))
        .await
    }

    pub async fn insert_rating_errors(&self, rows: &[RatingErrorRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        self.insert_rows("rating_errors", rows).await
    }

    /// The samples rating refused for a customer, by sandbox, epoch and seq.
    pub async fn rating_errors_of(&self, customer: &str) -> Result<Vec<RatingErrorRow>> {
        self.client
            .query(
                "SELECT ?fields FROM rating_errors FINAL WHERE customer = ? \
                 ORDER BY sandbox, epoch, seq, field",
            )
            .bind(customer)
            .all(format!("rating errors of {customer}"))
            .await
    }
}
