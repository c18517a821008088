-- Each customer's newest rated quantities in a period under a sheet checksum
-- (rating_state, migrations 0009 and 0011): what closing the period bills,
-- one row per customer in a range. A state re-rated after late samples has
-- the same as_of and a newer revision, and wins. Parameters: first customer,
-- last customer (inclusive), period start (Unix seconds), checksum.
SELECT
    customer,
    toUInt32(max(as_of)) AS newest_as_of,
    toUInt32(argMax(rated_at, (as_of, revision))) AS newest_rated_at,
    argMax(usage, (as_of, revision)) AS newest_usage,
    argMax(samples, (as_of, revision)) AS newest_samples
FROM rating_state
WHERE customer >= ? AND customer <= ?
  AND period_start = toDateTime(?)
  AND sheet_checksum = ?
GROUP BY customer
ORDER BY customer
