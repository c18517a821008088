-- Each customer's newest rated quantities in a period under a sheet checksum
-- (rating_state, migrations 0009 and 0011): what closing the period bills,
-- one row per customer in a range. A state re-rated after late samples has
-- the same as_of and a newer revision, and wins. Customers first to last,
-- inclusive; period_start in Unix seconds. A count written before migration
-- 0017 (counts_rated = 0) may count samples the state never rated: it reads
-- as 0.
SELECT
    customer,
    toUInt32(max(as_of)) AS newest_as_of,
    toUInt32(argMax(rated_at, (as_of, revision))) AS newest_rated_at,
    argMax(usage, (as_of, revision)) AS newest_usage,
    argMax(if(counts_rated = 1, samples, 0), (as_of, revision)) AS newest_samples
FROM rating_state
WHERE customer >= {first} AND customer <= {last}
  AND period_start = toDateTime({period_start})
  AND sheet_checksum = {sheet_checksum}
GROUP BY customer
ORDER BY customer
