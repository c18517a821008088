-- Rated usage: what each customer owes for the billing period to date, as of
-- the end of each closed hour, rated by the same core as `idlemeter rate`.
--
-- One row per bill line of a snapshot (customer, period, sheet checksum, as_of).
-- Snapshots are cumulative ("total to date"), so the cost of one hour is the
-- difference of two consecutive snapshots and rounding never accumulates across
-- hours. The sheet checksum is part of the key: re-rating with a changed sheet
-- writes new snapshots beside the old ones, which are kept; rating_changes says
-- what changed. Money is Decimal(38, 12); lines are already rounded to the
-- currency's minor unit by the sheet's rule.
CREATE TABLE IF NOT EXISTS rated_usage
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
ENGINE = ReplacingMergeTree(rated_at)
PARTITION BY toYYYYMM(period_start)
ORDER BY (customer, period_start, sheet_checksum, as_of, line_no);

-- Why a customer's period total changed between two sheet versions.
CREATE TABLE IF NOT EXISTS rating_changes
(
    customer String,
    period_start DateTime,
    as_of DateTime,
    sheet String,
    old_checksum String,
    new_checksum String,
    old_total Decimal(38, 12),
    new_total Decimal(38, 12),
    explanation String,
    detected_at DateTime
)
ENGINE = ReplacingMergeTree(detected_at)
ORDER BY (customer, period_start, as_of, new_checksum);
