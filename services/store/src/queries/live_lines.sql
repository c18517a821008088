-- The lines of a customer's newest live figure (live_usage, migration 0009)
-- for one period and checksum. as_of is the table's version, so merges keep
-- the newest row per line; a line an older figure had and the newest has not
-- survives with its older as_of and is left out here.
SELECT ?fields FROM live_usage FINAL
WHERE customer = {customer} AND period_start = toDateTime({period_start}) AND sheet_checksum = {sheet_checksum}
  AND as_of = (
      SELECT max(as_of) FROM live_usage
      WHERE customer = {customer} AND period_start = toDateTime({period_start}) AND sheet_checksum = {sheet_checksum}
  )
ORDER BY line_no
