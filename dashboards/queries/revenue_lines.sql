-- Revenue per (UTC day, customer, bill line) from the online rater's
-- cumulative snapshots (rated_usage): a day's amount is the line's
-- period-to-date amount at the day's last snapshot minus that at the
-- previous day's. Per (customer, period) only the most recently rated sheet
-- checksum counts (a re-rating supersedes). The rater writes a snapshot for
-- every closed hour after a customer's first sample, so a period's first day
-- has no previous day and starts from 0. Each line carries its currency
-- (a customer's sheet's): panels sum money per currency, never across.
-- A fragment: panels select from it.
-- Placeholders: {from}, {to} (Unix seconds; days in [from, to) are kept).
SELECT
    toUInt32(today.day) AS day,
    customer,
    currency,
    kind,
    resource,
    unit,
    today.cum_amount - yesterday.prev_amount AS amount,
    today.cum_quantity - yesterday.prev_quantity AS quantity
FROM
(
    SELECT
        customer, period_start, kind, resource,
        any(unit) AS unit,
        any(currency) AS currency,
        toUInt32(intDiv(toUInt32(as_of) - 1, 86400) * 86400) AS day,
        argMax(line_amount, as_of) AS cum_amount,
        argMax(line_quantity, as_of) AS cum_quantity
    FROM
    (
        SELECT customer, period_start, sheet_checksum, as_of, kind, resource,
               any(unit) AS unit, any(currency) AS currency,
               sum(amount) AS line_amount, sum(quantity) AS line_quantity
        FROM rated_usage FINAL
        WHERE as_of > toDateTime({from} - 86400) AND as_of <= toDateTime({to})
        GROUP BY customer, period_start, sheet_checksum, as_of, kind, resource
    )
    WHERE (customer, period_start, sheet_checksum) IN (
        SELECT customer, period_start, argMax(sheet_checksum, rated_at)
        FROM rated_usage WHERE period_start < toDateTime({to})
        GROUP BY customer, period_start
    )
    GROUP BY customer, period_start, kind, resource, day
) AS today
ANY LEFT JOIN
(
    SELECT
        customer, period_start, kind, resource,
        toUInt32(intDiv(toUInt32(as_of) - 1, 86400) * 86400 + 86400) AS day,
        argMax(line_amount, as_of) AS prev_amount,
        argMax(line_quantity, as_of) AS prev_quantity
    FROM
    (
        SELECT customer, period_start, sheet_checksum, as_of, kind, resource,
               sum(amount) AS line_amount, sum(quantity) AS line_quantity
        FROM rated_usage FINAL
        WHERE as_of > toDateTime({from} - 2 * 86400) AND as_of <= toDateTime({to})
        GROUP BY customer, period_start, sheet_checksum, as_of, kind, resource
    )
    WHERE (customer, period_start, sheet_checksum) IN (
        SELECT customer, period_start, argMax(sheet_checksum, rated_at)
        FROM rated_usage WHERE period_start < toDateTime({to})
        GROUP BY customer, period_start
    )
    GROUP BY customer, period_start, kind, resource, day
) AS yesterday
USING (customer, period_start, kind, resource, day)
WHERE day >= {from} AND day < {to}
