-- The newest carried rating state (rating_state, migration 0009) at or before
-- a time of every customer in a range, for one period and sheet checksum:
-- what a rater resumes live rating from. Parameters: first customer, last
-- customer (inclusive), period start, checksum, before (Unix seconds).
SELECT customer, toUInt32(max(as_of)) AS as_of_unix, argMax(state, (as_of, revision)) AS state
FROM rating_state FINAL
WHERE customer >= ? AND customer <= ?
  AND period_start = toDateTime(?)
  AND sheet_checksum = ?
  AND as_of <= toDateTime(?)
GROUP BY customer
ORDER BY customer
