-- One bill everywhere (issue "One bill everywhere").
--
-- rating_state gains the state's rated quantities, closed as the end of the
-- data would close them (idlemeter_core::CustomerUsage::to_text: integers in
-- base units per price version and resource). Closing a period reads this
-- column of each customer's period-end state, a few hundred bytes, instead of
-- re-rating the period's samples, and bills it with the same function as the
-- rater's figures. Rows written before this migration have '' and are
-- re-rated from their samples by whoever reads them.
--
-- samples: for a period-end state, how many stored sample rows of the
-- period it rated (0: not counted). When the period's count changes later
-- (samples that arrived after its last hour was rated), the rater re-rates
-- the period and writes a new period-end state, which the close and later
-- adjustments read. revision orders two states of the same as_of (the
-- re-rated one is newer): wall-clock milliseconds of the write.
-- One ALTER; the migration runner treats "column already exists" as applied.
ALTER TABLE rating_state
    ADD COLUMN usage String DEFAULT '',
    ADD COLUMN samples UInt64 DEFAULT 0,
    ADD COLUMN revision UInt64 DEFAULT 0;
