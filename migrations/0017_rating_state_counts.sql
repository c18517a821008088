-- Rating states count what they rated (issue "Scale out", found by its
-- test): `samples` of a row with counts_rated = 1 is how many distinct
-- samples of the period, taken before as_of, the state's reads rated, added
-- up hour after hour. Rows written before this migration have 0: their
-- `samples` was the period's row count when the pass began (period end) or
-- 0, which can count samples the state never rated; readers take such a
-- count as 0, so the rater re-rates the period (within the look-back) and
-- the close rates it from its samples. One ALTER; the migration runner
-- treats "column already exists" as applied.
ALTER TABLE rating_state
    ADD COLUMN counts_rated UInt8 DEFAULT 0;
