-- Rating carried between passes (issue "Money from counters").
--
-- rating_state: what the rater carried at the end of the newest closed hour
-- it rated, per (customer, period, sheet checksum): per (sandbox, epoch) the
-- last good sample and the spans still open, and the quantities rated so far
-- (idlemeter_core::RatingState as JSON). The next pass, in this process or
-- another replica after a restart, resumes from it and reads only the
-- samples since. as_of is the version: merges keep the newest state only, so
-- the table holds one row per customer and period, not one per hour. A
-- re-rating under a new sheet or policy has a new checksum, so it starts
-- from the stored samples. States are a cache of a pure function of the
-- samples: dropping a partition only makes the next pass rate that period
-- from its start.
CREATE TABLE IF NOT EXISTS rating_state
(
    customer String,
    period_start DateTime,
    sheet_checksum String,
    as_of DateTime,
    series UInt32,
    state String,
    rated_at DateTime
)
ENGINE = ReplacingMergeTree(as_of)
PARTITION BY toYYYYMM(period_start)
ORDER BY (customer, period_start, sheet_checksum);

-- live_usage: the provisional bill of the open hour: the period to date as
-- of the newest sample rated, refreshed every few seconds, columns as in
-- rated_usage (as_of is that sample's second). Only the newest figure per
-- (customer, period, checksum) matters, so as_of is the version and merges
-- keep one row per line; readers take the lines of the newest as_of. The
-- final snapshot in rated_usage replaces it when the hour closes; readers
-- take whichever is newer.
CREATE TABLE IF NOT EXISTS live_usage
(
    customer String,
    period_start DateTime,
    as_of DateTime,
    sheet String,
    sheet_checksum String,
    idle_policy String,
    currency String,
    line_no UInt16,
    kind String,
    resource String,
    price_version String,
    quantity Decimal(38, 12),
    quantity_base String,
    unit String,
    unit_price Decimal(38, 12),
    amount Decimal(38, 12),
    rated_at DateTime
)
ENGINE = ReplacingMergeTree(as_of)
PARTITION BY toYYYYMM(period_start)
ORDER BY (customer, period_start, sheet_checksum, line_no);

-- rating_errors: samples rating refused (a counter that went back, a
-- conflicting duplicate, a GPU model without a price), named by customer,
-- sandbox, epoch and seq, with the reason. One customer's bad data is
-- reported here and rating of everyone else goes on. A pass that rates the
-- same samples again writes the same key, so replays do not multiply rows.
CREATE TABLE IF NOT EXISTS rating_errors
(
    customer String,
    sandbox String,
    epoch UInt64,
    seq UInt64,
    field String,
    reason String,
    period_start DateTime,
    sheet_checksum String,
    detected_at DateTime
)
ENGINE = ReplacingMergeTree(detected_at)
PARTITION BY toYYYYMM(period_start)
ORDER BY (customer, sandbox, epoch, seq, field, sheet_checksum);
