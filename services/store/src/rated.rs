//! Reading samples for the rater and storing what it rated (migration 0003).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use idlemeter_core::{
    CounterSet, CustomerId, Epoch, LifecycleState, NodeId, SampleDetail, SandboxId, StateCounters,
    UsageSample, VcpuMillis,
};
use rust_decimal::Decimal;
use serde_repr::Deserialize_repr;

use crate::sql::{statement, Fetch};
use crate::{Error, Result, Store};

/// Samples of the customers `first..=last` closing an interval in
/// `[from_ms, to_ms)`, plus, for each epoch with samples there, its last
/// sample before `from_ms` as the baseline.
pub const SAMPLES_FOR_RATING_SQL: &str = include_str!("queries/samples_for_rating.sql");

/// Scale of every `Decimal(38, 12)` column.
pub const MONEY_SCALE: u32 = 12;

#[derive(Debug, Clone, Copy, Deserialize_repr)]
#[repr(i8)]
enum StoredState {
    Running = 1,
    Suspended = 2,
    Stopped = 3,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct StoredSample {
    customer: String,
    sandbox: String,
    node: String,
    epoch: u64,
    seq: u64,
    ts_ms: u64,
    state: StoredState,
    vcpu_milli: u32,
    mem_bytes: u64,
    gpu_model: String,
    gpu_count: u32,
    disk_bytes: u64,
    cpu_used_usec: u64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
    vcpu_alloc_usec: u64,
    mem_alloc_kib_ms: u64,
    mem_used_kib_ms: u64,
    gpu_alloc_ms: u64,
    disk_mib_ms: u64,
    api_calls: u64,
    mem_used_bytes: u64,
    exec_sessions: u32,
    open_conns: u32,
    counters_present: u32,
    running_ms: u64,
    suspended_ms: u64,
    active_ms: u64,
    vcpu_alloc_active_usec: u64,
    vcpu_max_usec: u64,
    vcpu_max_active_usec: u64,
    cpu_used_active_usec: u64,
    mem_alloc_active_kib_ms: u64,
    mem_max_kib_ms: u64,
    mem_max_active_kib_ms: u64,
    mem_used_active_kib_ms: u64,
    gpu_alloc_active_ms: u64,
    disk_running_mib_ms: u64,
    disk_active_mib_ms: u64,
}

impl TryFrom<StoredSample> for UsageSample {
    type Error = Error;
    fn try_from(row: StoredSample) -> Result<Self> {
        let bad = |what: String| {
            Error::BadRow(format!("usage_samples {}/{}: {what}", row.sandbox, row.seq))
        };
        let ts = i64::try_from(row.ts_ms)
            .ok()
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .ok_or_else(|| bad(format!("ts_ms {} out of range", row.ts_ms)))?;
        Ok(UsageSample {
            customer: CustomerId::parse(row.customer.clone()).map_err(|e| bad(e.to_string()))?,
            node: NodeId::parse(row.node.clone()).map_err(|e| bad(e.to_string()))?,
            sandbox: SandboxId::parse(row.sandbox.clone()).map_err(|e| bad(e.to_string()))?,
            epoch: Epoch(row.epoch),
            seq: row.seq,
            ts,
            state: match row.state {
                StoredState::Running => LifecycleState::Running,
                StoredState::Suspended => LifecycleState::Suspended,
                StoredState::Stopped => LifecycleState::Stopped,
            },
            vcpu: VcpuMillis(row.vcpu_milli),
            mem_bytes: row.mem_bytes,
            gpu_model: Some(row.gpu_model).filter(|model| !model.is_empty()),
            gpu_count: row.gpu_count,
            disk_bytes: row.disk_bytes,
            cpu_used_usec: row.cpu_used_usec,
            net_rx_bytes: row.net_rx_bytes,
            net_tx_bytes: row.net_tx_bytes,
            vcpu_alloc_usec: row.vcpu_alloc_usec,
            mem_alloc_kib_ms: row.mem_alloc_kib_ms,
            mem_used_kib_ms: row.mem_used_kib_ms,
            gpu_alloc_ms: row.gpu_alloc_ms,
            disk_mib_ms: row.disk_mib_ms,
            api_calls: row.api_calls,
            mem_used_bytes: row.mem_used_bytes,
            exec_sessions: row.exec_sessions,
            open_conns: row.open_conns,
            // Rating reads the billed columns only; the detail stays in the table.
            detail: SampleDetail::default(),
            state_counters: StateCounters {
                running_ms: row.running_ms,
                suspended_ms: row.suspended_ms,
                active_ms: row.active_ms,
                vcpu_alloc_active_usec: row.vcpu_alloc_active_usec,
                vcpu_max_usec: row.vcpu_max_usec,
                vcpu_max_active_usec: row.vcpu_max_active_usec,
                cpu_used_active_usec: row.cpu_used_active_usec,
                mem_alloc_active_kib_ms: row.mem_alloc_active_kib_ms,
                mem_max_kib_ms: row.mem_max_kib_ms,
                mem_max_active_kib_ms: row.mem_max_active_kib_ms,
                mem_used_active_kib_ms: row.mem_used_active_kib_ms,
                gpu_alloc_active_ms: row.gpu_alloc_active_ms,
                disk_running_mib_ms: row.disk_running_mib_ms,
                disk_active_mib_ms: row.disk_active_mib_ms,
            },
            counters_present: CounterSet(row.counters_present & CounterSet::ALL.0),
        })
    }
}

/// One stored bill line of a rated snapshot. Field order is column order.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct RatedLineRow {
    pub customer: String,
    /// Unix seconds.
    pub period_start: u32,
    /// Unix seconds: the end of the last hour the snapshot covers.
    pub as_of: u32,
    pub sheet: String,
    pub sheet_checksum: String,
    pub idle_policy: String,
    pub currency: String,
    pub line_no: u16,
    pub kind: String,
    pub resource: String,
    pub price_version: String,
    /// `Decimal(38, 12)` mantissas; see [`to_column`] and [`from_column`].
    pub quantity: i128,
    pub quantity_base: String,
    pub unit: String,
    pub unit_price: i128,
    pub amount: i128,
    pub rated_at: u32,
}

/// Why a customer's total moved when the sheet changed.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct RatingChangeRow {
    pub customer: String,
    pub period_start: u32,
    pub as_of: u32,
    pub sheet: String,
    pub old_checksum: String,
    pub new_checksum: String,
    pub old_total: i128,
    pub new_total: i128,
    pub explanation: String,
    pub detected_at: u32,
}

/// A decimal as a `Decimal(38, 12)` mantissa; refuses values that would lose
/// digits (more than 12 places) or do not fit the column (38 digits).
///
/// Computed in integers: `Decimal::rescale` cannot hold 12 places for values
/// above about 7.9e16 (its 96-bit mantissa) and keeps fewer places instead,
/// which read as 12 would be a different amount.
pub fn to_column(value: Decimal) -> Result<i128> {
    let refused = || {
        Error::BadRow(format!(
            "{value} has more than {MONEY_SCALE} decimal places or is too large for Decimal(38, {MONEY_SCALE})"
        ))
    };
    let value = if value.scale() > MONEY_SCALE {
        value.normalize()
    } else {
        value
    };
    let Some(places) = MONEY_SCALE.checked_sub(value.scale()) else {
        return Err(refused());
    };
    let mantissa = value
        .mantissa()
        .checked_mul(10i128.pow(places))
        .ok_or_else(refused)?;
    if mantissa.unsigned_abs() >= 10u128.pow(38) {
        return Err(refused());
    }
    Ok(mantissa)
}

/// A `Decimal(38, 12)` mantissa back as a decimal: with fewer places where
/// the trailing ones are zeros and 12 would not fit a decimal's 96-bit
/// mantissa; refused where the amount itself does not fit one.
pub fn from_column(mantissa: i128) -> Result<Decimal> {
    let (mut digits, mut scale) = (mantissa, MONEY_SCALE);
    while digits.unsigned_abs() >= 1u128 << 96 && scale > 0 && digits % 10 == 0 {
        digits /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(digits, scale)
        .map_err(|error| Error::BadRow(format!("decimal {mantissa}e-12: {error}")))
}

/// How [`Store::sample_counts`] counts a customer's stored samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Every stored row, duplicates awaiting a merge included: cheap, and
    /// equal to the distinct count unless a replay's rows await a merge
    /// (where it equals a rating state's count, so does the distinct one).
    Rows,
    /// Distinct samples, duplicates collapsed as rating reads them
    /// (`FINAL`): what a rating state's count must equal for the state to
    /// cover the range.
    Distinct,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SnapshotTotal {
    sheet_checksum: String,
    total: i128,
}

impl Store {
    /// Customers with at least one sample taken in `[from_ms, to_ms)`, each with
    /// the time (Unix ms) of its first sample there and how many sample rows
    /// are stored there (duplicates not yet merged included: a count that
    /// changes means "look again", never money).
    pub async fn customers_with_samples(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<(CustomerId, u64, u64)>> {
        let rows: Vec<(String, u64, u64)> = statement!(
            self.client,
            "SELECT customer, min(ts_ms), count() FROM usage_samples \
             WHERE ts_ms >= {from_ms} AND ts_ms < {to_ms} GROUP BY customer ORDER BY customer",
            from_ms,
            to_ms
        )
        .all("customers with samples")
        .await?;
        rows.into_iter()
            .map(|(name, first_ms, count)| {
                let customer = CustomerId::parse(name).map_err(|e| Error::BadRow(e.to_string()))?;
                Ok((customer, first_ms, count))
            })
            .collect()
    }

    /// How many samples each customer from `first` to `last` (inclusive)
    /// has stored in `[from_ms, to_ms)`, counted as `counted` says;
    /// customers with none are absent. The bounds on `ts` (whole seconds,
    /// a superset of the range) let ClickHouse skip the months outside it
    /// (`usage_samples` is partitioned by the month of `ts`).
    pub async fn sample_counts(
        &self,
        counted: Counted,
        (first, last): (&str, &str),
        from_ms: u64,
        to_ms: u64,
    ) -> Result<HashMap<String, u64>> {
        let table = match counted {
            Counted::Rows => "usage_samples",
            Counted::Distinct => "usage_samples FINAL",
        };
        let sql = format!(
            "SELECT customer, count() FROM {table} \
             WHERE customer >= {{first}} AND customer <= {{last}} \
             AND ts_ms >= {{from_ms}} AND ts_ms < {{to_ms}} \
             AND ts >= toDateTime(intDiv({{from_ms}}, 1000)) \
             AND ts <= toDateTime(intDiv({{to_ms}}, 1000)) GROUP BY customer"
        );
        let rows: Vec<(String, u64)> = statement!(self.client, &sql, first, last, from_ms, to_ms)
            .all(format!("{counted:?} sample counts of {first} .. {last}"))
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// One customer's samples for rating `[from_ms, to_ms)`; see
    /// [`SAMPLES_FOR_RATING_SQL`]. Duplicates are already collapsed (FINAL).
    pub async fn samples_for_rating(
        &self,
        customer: &CustomerId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<UsageSample>> {
        let customer = customer.as_str();
        self.samples_for_rating_range(customer, customer, from_ms, to_ms)
            .await
    }

    /// [`Self::samples_for_rating`] for every customer from `first` to `last`
    /// (inclusive) in one query.
    pub async fn samples_for_rating_range(
        &self,
        first: &str,
        last: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<UsageSample>> {
        let rows: Vec<StoredSample> = statement!(
            self.client,
            SAMPLES_FOR_RATING_SQL,
            first,
            last,
            from_ms,
            to_ms
        )
        .all(format!("samples for rating {first} .. {last}"))
        .await?;
        rows.into_iter().map(UsageSample::try_from).collect()
    }

    /// Stores one snapshot's lines in one insert.
    pub async fn insert_rated_lines(&self, rows: &[RatedLineRow]) -> Result<()> {
        self.insert_rows("rated_usage", rows).await
    }

    pub async fn insert_rating_change(&self, row: &RatingChangeRow) -> Result<()> {
        self.insert_rows("rating_changes", std::slice::from_ref(row))
            .await
    }

    /// Totals of the snapshots of one (customer, period, as_of), per sheet checksum.
    pub async fn snapshot_totals(
        &self,
        customer: &CustomerId,
        period_start: u32,
        as_of: u32,
    ) -> Result<Vec<(String, Decimal)>> {
        let rows: Vec<SnapshotTotal> = statement!(
            self.client,
            "SELECT sheet_checksum, sum(amount) AS total FROM rated_usage FINAL \
             WHERE customer = {customer} AND period_start = toDateTime({period_start}) \
             AND as_of = toDateTime({as_of}) \
             GROUP BY sheet_checksum ORDER BY sheet_checksum",
            customer = customer.as_str(),
            period_start,
            as_of,
        )
        .all(format!("snapshot totals of {customer}"))
        .await?;
        rows.into_iter()
            .map(|row| Ok((row.sheet_checksum, from_column(row.total)?)))
            .collect()
    }

    /// The `as_of` times (Unix seconds) of one customer's snapshots of a period
    /// under one sheet checksum.
    pub async fn rated_hours(
        &self,
        customer: &CustomerId,
        period_start: u32,
        sheet_checksum: &str,
    ) -> Result<std::collections::HashSet<u32>> {
        let hours: Vec<u32> = statement!(
            self.client,
            "SELECT DISTINCT toUInt32(as_of) FROM rated_usage \
             WHERE customer = {customer} AND period_start = toDateTime({period_start}) \
             AND sheet_checksum = {sheet_checksum}",
            customer = customer.as_str(),
            period_start,
            sheet_checksum,
        )
        .all(format!("rated hours of {customer}"))
        .await?;
        Ok(hours.into_iter().collect())
    }

    /// The hours (Unix seconds of their start) in `[from_ms, to_ms)` in which
    /// the customer has samples: the hours whose snapshot can differ from
    /// the one before.
    pub async fn sample_hours(
        &self,
        customer: &CustomerId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<std::collections::BTreeSet<u32>> {
        let hours: Vec<u32> = statement!(
            self.client,
            "SELECT DISTINCT toUInt32(toStartOfHour(ts)) FROM usage_samples \
             WHERE customer = {customer} AND ts_ms >= {from_ms} AND ts_ms < {to_ms}",
            customer = customer.as_str(),
            from_ms,
            to_ms
        )
        .all(format!("hours with samples of {customer}"))
        .await?;
        Ok(hours.into_iter().collect())
    }

    /// Lines of one snapshot, in line order.
    pub async fn rated_lines(
        &self,
        customer: &CustomerId,
        period_start: u32,
        sheet_checksum: &str,
        as_of: u32,
    ) -> Result<Vec<RatedLineRow>> {
        statement!(
            self.client,
            "SELECT ?fields FROM rated_usage FINAL \
             WHERE customer = {customer} AND period_start = toDateTime({period_start}) \
             AND sheet_checksum = {sheet_checksum} \
             AND as_of = toDateTime({as_of}) ORDER BY line_no",
            customer = customer.as_str(),
            period_start,
            sheet_checksum,
            as_of,
        )
        .all(format!("rated lines of {customer}"))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_trip_through_the_column_scale_and_refuse_extra_digits() {
        let value: Decimal = "0.000014".parse().expect("decimal");
        assert_eq!(
            from_column(to_column(value).expect("fits")).expect("back"),
            value
        );
        assert_eq!(to_column(Decimal::ONE).expect("fits"), 1_000_000_000_000);
        let too_fine: Decimal = "0.0000000000001".parse().expect("decimal");
        assert!(to_column(too_fine).is_err());
        // Above 7.9e16 a decimal cannot hold 12 places: the column still can.
        let large: Decimal = "3333333333333333333333333.33".parse().expect("decimal");
        let column = to_column(large).expect("fits 38 digits");
        assert_eq!(column, 3_333_333_333_333_333_333_333_333_330_000_000_000);
        assert_eq!(from_column(column).expect("back"), large);
        let too_large: Decimal = "79228162514264337593543950335".parse().expect("decimal");
        assert!(to_column(too_large).is_err(), "39 digits at 12 places");
        assert!(from_column(i128::MAX).is_err());
    }

    /// Finding "a value stored ten thousand times too small": a deposit of
    /// 1e17 (`invoices deposit --amount 100000000000000000`) is stored to
    /// the cent, and what cannot be stored exactly is refused, never
    /// rescaled. `Decimal::rescale(12)` alone stops at 8 places for it.
    #[test]
    fn a_value_stored_ten_thousand_times_too_small_is_stored_exactly_or_refused() {
        let deposit = Decimal::from(100_000_000_000_000_000u64);
        let mut rescaled = deposit;
        rescaled.rescale(MONEY_SCALE);
        assert!(
            rescaled.scale() < MONEY_SCALE,
            "the trap: {}",
            rescaled.scale()
        );
        let column = to_column(deposit).expect("fits Decimal(38, 12)");
        assert_eq!(column, 100_000_000_000_000_000 * 10i128.pow(MONEY_SCALE));
        assert_eq!(from_column(column).expect("back"), deposit);
        let cents: Decimal = "100000000000000000.01".parse().expect("decimal");
        assert_eq!(
            from_column(to_column(cents).expect("fits")).expect("back"),
            cents
        );
        let beyond: Decimal = "100000000000000000000000000.5".parse().expect("decimal");
        assert!(
            to_column(beyond).is_err(),
            "39 digits are refused, not rounded"
        );
    }
}
