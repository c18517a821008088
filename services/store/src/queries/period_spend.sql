-- What a customer has spent so far: the total of their latest rated snapshot
-- (rated_usage, migration 0003) in their latest billing period. When a period
-- was rated under several sheet checksums (a re-rating), the checksum rated
-- most recently in the period wins, the same rule as snapshot_lines.sql and
-- the dashboards' revenue_lines.sql. total is what is due (every line);
-- spend is what the period costs, before a prepaid wallet or the credit
-- balance paid part of it (what spend alerts, budget caps and spend
-- limits compare).
SELECT
    toUInt32(period_start) AS period_start_unix,
    sheet_checksum,
    toUInt32(as_of) AS as_of_unix,
    sum(amount) AS total,
    sumIf(amount, kind NOT IN ('wallet', 'balance')) AS spend
FROM rated_usage FINAL
WHERE customer = {customer}
  AND (period_start, sheet_checksum) IN (
      SELECT period_start, argMax(sheet_checksum, rated_at) FROM rated_usage
      WHERE customer = {customer}
        AND period_start = (SELECT max(period_start) FROM rated_usage WHERE customer = {customer})
      GROUP BY period_start
  )
GROUP BY period_start, as_of, sheet_checksum
ORDER BY as_of DESC
LIMIT 1
