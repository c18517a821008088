//! Usage events and meter values (migration 0012), and meters read back
//! with OpenMeter's aggregations.

use std::collections::BTreeMap;

use idlemeter_core::events::{Aggregation, Meter, MeterValue, UsageEvent};
use idlemeter_core::metering::{Metered, PricedMeters};
use idlemeter_core::PriceSheet;

use crate::sql::Fetch;
use crate::{Context, Result, Store};

/// The meter query's template (see the file for its parts).
pub const METER_WINDOWS_SQL: &str = include_str!("queries/meter_windows.sql");

/// The metered quantities query's template (see the file).
pub const METER_TOTALS_SQL: &str = include_str!("queries/meter_totals.sql");

/// The metered quantities of a range of customers over a time range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeteredRange {
    /// Per customer with events, their quantities per (version, meter).
    pub customers: BTreeMap<String, Vec<Metered>>,
    /// Customers whose aggregate cannot be billed, and why (they are not
    /// in `customers`).
    pub refused: BTreeMap<String, String>,
}

impl MeteredRange {
    /// Everyone with metered usage, billable or not.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.customers.keys().chain(self.refused.keys())
    }

    /// A customer's quantities, or why they cannot be billed.
    pub fn of(&self, customer: &str) -> std::result::Result<&[Metered], &str> {
        match self.refused.get(customer) {
            Some(reason) => Err(reason),
            None => Ok(self.customers.get(customer).map_or(&[], Vec::as_slice)),
        }
    }
}

/// The aggregate of a meter in SQL, as text.
fn aggregate_sql(aggregation: Aggregation) -> &'static str {
    match aggregation {
        Aggregation::Sum => "toString(sum(value))",
        Aggregation::Count => "toString(count())",
        Aggregation::Max => "toString(max(value))",
        Aggregation::UniqueCount => "toString(uniqExact(value_text))",
        Aggregation::Latest => "toString(argMax(value, time_ms))",
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct EventRow {
    pub customer: String,
    pub subject: String,
    pub source: String,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub time_ms: u64,
    pub received_ms: u64,
    pub data: String,
}

impl EventRow {
    pub fn of(event: &UsageEvent) -> Self {
        Self {
            customer: event.customer.as_str().to_owned(),
            subject: event.subject.clone(),
            source: event.source.clone(),
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            time_ms: u64::try_from(event.time_ms).unwrap_or(0),
            received_ms: u64::try_from(event.received_ms).unwrap_or(0),
            data: event.data.to_string(),
        }
    }
}

/// What one meter took of one event.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct MeterValueRow {
    pub customer: String,
    pub meter: String,
    pub subject: String,
    pub source: String,
    pub id: String,
    pub time_ms: u64,
    /// Decimal(38, 12): the value times 10^12.
    pub value: i128,
    pub value_text: String,
    pub group_keys: Vec<String>,
    pub group_values: Vec<String>,
    pub received_ms: u64,
}

impl MeterValueRow {
    /// Fails for a value Decimal(38, 12) cannot hold exactly (the API
    /// refuses such events first; see `idlemeter_core::events`).
    pub fn of(event: &UsageEvent, meter: &Meter, value: MeterValue) -> Result<Self> {
        let (group_keys, group_values) = value.groups.into_iter().unzip();
        Ok(Self {
            customer: event.customer.as_str().to_owned(),
            meter: meter.slug.clone(),
            subject: event.subject.clone(),
            source: event.source.clone(),
            id: event.id.clone(),
            time_ms: u64::try_from(event.time_ms).unwrap_or(0),
            value: crate::rated::to_column(value.value)?,
            value_text: value.text,
            group_keys,
            group_values,
            received_ms: u64::try_from(event.received_ms).unwrap_or(0),
        })
    }
}

/// A meter read over a range: which rows, grouped how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterQuery<'a> {
    pub customer: &'a str,
    /// Only this subject's events, when set.
    pub subject: Option<&'a str>,
    pub from_ms: u64,
    pub to_ms: u64,
    /// Window length; 0: one window over the whole range.
    pub window_ms: u64,
    /// groupBy keys of the meter to group by, in this order.
    pub group_by: &'a [String],
    /// Also group by subject.
    pub by_subject: bool,
}

/// One window (and group) of a meter's aggregate.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct MeterWindowRow {
    pub window_start_ms: u64,
    /// The subject, when grouped by it ("" otherwise).
    pub subject_group: String,
    pub groups: Vec<String>,
    /// The aggregate as a decimal text.
    pub value: String,
}

impl Store {
    /// Stores events and their meter values; duplicates of (source, id)
    /// collapse (ReplacingMergeTree), so a replayed batch changes nothing.
    /// Values first: whoever sees an event stored also sees what it
    /// metered.
    pub async fn insert_events(&self, events: &[EventRow], values: &[MeterValueRow]) -> Result<()> {
        self.insert_rows("meter_values", values).await?;
        self.insert_rows("usage_events", events).await
    }

    /// Every stored event of a customer, oldest first (tests, audits).
    pub async fn events_of(&self, customer: &str) -> Result<Vec<EventRow>> {
        self.client
            .query(
                "SELECT ?fields FROM usage_events FINAL WHERE customer = ? \
                 ORDER BY time_ms, source, id",
            )
            .bind(customer)
            .all(format!("events of {customer}"))
            .await
    }

    /// `meter` aggregated per window (and group) over the query's range,
    /// windows in order. Duplicated events count once (FINAL).
    pub async fn query_meter(
        &self,
        meter: &Meter,
        query: &MeterQuery<'_>,
    ) -> Result<Vec<MeterWindowRow>> {
        let aggregate = aggregate_sql(meter.aggregation);
        let window = if query.window_ms == 0 {
            "toUInt64(?)".to_owned()
        } else {
            "intDiv(time_ms - ?, ?) * ? + ?".to_owned()
        };
        // One `group_values[indexOf(group_keys, ?)]` per requested key.
        let groups = if query.group_by.is_empty() {
            "emptyArrayString()".to_owned()
        } else {
            let picks: Vec<&str> = query
                .group_by
                .iter()
                .map(|_| "group_values[indexOf(group_keys, ?)]")
                .collect();
            format!("[{}]", picks.join(", "))
        };
        let subject = if query.by_subject { "subject" } else { "''" };
        let filter = if query.subject.is_some() {
            " AND subject = ?"
        } else {
            ""
        };
        let sql = METER_WINDOWS_SQL
            .replace("{window}", &window)
            .replace("{subject}", subject)
            .replace("{groups}", &groups)
            .replace("{aggregate}", aggregate)
            .replace("{filter}", filter);
        let mut statement = self.client.query(&sql);
        statement = if query.window_ms == 0 {
            statement.bind(query.from_ms)
        } else {
            statement
                .bind(query.from_ms)
                .bind(query.window_ms)
                .bind(query.window_ms)
                .bind(query.from_ms)
        };
        for key in query.group_by {
            statement = statement.bind(key.as_str());
        }
        statement = statement
            .bind(query.customer)
            .bind(meter.slug.as_str())
            .bind(query.from_ms)
            .bind(query.to_ms);
        if let Some(subject) = query.subject {
            statement = statement.bind(subject);
        }
        statement
            .fetch_all::<MeterWindowRow>()
            .await
            .context(format!("meter {} of {}", meter.slug, query.customer))
    }

    /// One meter's aggregate per customer of `first..=last` over
    /// `[from_ms, to_ms)`, as decimal text, customers in order.
    pub async fn meter_totals(
        &self,
        meter: &Meter,
        (first, last): (&str, &str),
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<(String, String)>> {
        let sql = METER_TOTALS_SQL.replace("{aggregate}", aggregate_sql(meter.aggregation));
        self.client
            .query(&sql)
            .bind(first)
            .bind(last)
            .bind(meter.slug.as_str())
            .bind(from_ms)
            .bind(to_ms)
            .all(format!("meter {} totals {first}..={last}", meter.slug))
            .await
    }

    /// The metered quantities of the customers `first..=last` over
    /// `[from_ms, to_ms)` under `sheet`: one query per priced meter and
    /// price version window (see `idlemeter_core::metering` for the rule);
    /// no query when the sheet prices no meter.
    pub async fn metered(
        &self,
        sheet: &PriceSheet,
        priced: &PricedMeters,
        (first, last): (&str, &str),
        from_ms: u64,
        to_ms: u64,
    ) -> Result<MeteredRange> {
        let mut range = MeteredRange::default();
        if priced.is_empty() {
            return Ok(range);
        }
        let (from, to) = (
            i64::try_from(from_ms).unwrap_or(i64::MAX),
            i64::try_from(to_ms).unwrap_or(i64::MAX),
        );
        for window in priced.windows(sheet, from, to) {
            let rows = self
                .meter_totals(
                    window.meter,
                    (first, last),
                    u64::try_from(window.from_ms).unwrap_or(0),
                    u64::try_from(window.to_ms).unwrap_or(0),
                )
                .await?;
            for (customer, aggregate) in rows {
                match window.metered(&aggregate) {
                    Ok(metered) => range.customers.entry(customer).or_default().push(metered),
                    Err(reason) => {
                        range.refused.entry(customer).or_insert(reason);
                    }
                }
            }
        }
        for customer in range.refused.keys() {
            range.customers.remove(customer);
        }
        Ok(range)
    }
}
