-- Per (kind, resource) totals of a customer's rated snapshots (rated_usage,
-- migration 0003) needed to cost the windows of (from, to]: every snapshot
-- with as_of in (from, to], and for each (period, checksum) the latest one at
-- or before from, where the first window starts. Periods that started at or
-- after `to` are left out. Per period only the checksum rated most recently
-- in the whole period counts (a re-rating supersedes), the rule of
-- period_spend.sql and of the dashboards.
SELECT
    toUInt32(period_start_dt) AS period_start,
    sheet_checksum,
    toUInt32(as_of_dt) AS as_of,
    currency,
    kind,
    resource,
    amount,
    toUInt32(rated_at_dt) AS rated_at
FROM
(
    SELECT
        period_start AS period_start_dt,
        sheet_checksum,
        as_of AS as_of_dt,
        any(currency) AS currency,
        kind,
        resource,
        sum(amount) AS amount,
        max(rated_at) AS rated_at_dt
    FROM rated_usage FINAL
    WHERE customer = {customer}
      AND period_start < toDateTime({to})
      AND (period_start, sheet_checksum) IN (
          SELECT period_start, argMax(sheet_checksum, rated_at) FROM rated_usage
          WHERE customer = {customer} AND period_start < toDateTime({to})
          GROUP BY period_start
      )
      AND (
          (as_of > toDateTime({from}) AND as_of <= toDateTime({to}))
          OR (period_start, sheet_checksum, as_of) IN (
              SELECT period_start, sheet_checksum, max(as_of) FROM rated_usage
              WHERE customer = {customer} AND period_start < toDateTime({to}) AND as_of <= toDateTime({from})
              GROUP BY period_start, sheet_checksum
          )
      )
    GROUP BY period_start, sheet_checksum, as_of, kind, resource
)
ORDER BY period_start, sheet_checksum, as_of, kind, resource
