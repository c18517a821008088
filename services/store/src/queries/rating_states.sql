-- The newest carried rating state (rating_state, migration 0009) at or before
-- a time of every customer in a range, for one period and sheet checksum:
-- what a rater resumes rating from, with how many of the period's samples it
-- rated (migration 0011; a count written before migration 0017 reads as 0,
-- see rated_quantities.sql). Customers first to last, inclusive;
-- period_start and before in Unix seconds.
SELECT
    customer,
    toUInt32(max(as_of)) AS as_of_unix,
    argMax(state, (as_of, revision)) AS state,
    argMax(if(counts_rated = 1, samples, 0), (as_of, revision)) AS rated_samples
FROM rating_state FINAL
WHERE customer >= {first} AND customer <= {last}
  AND period_start = toDateTime({period_start})
  AND sheet_checksum = {sheet_checksum}
  AND as_of <= toDateTime({before})
GROUP BY customer
ORDER BY customer
