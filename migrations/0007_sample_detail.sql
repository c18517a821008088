-- Sample detail (wire fields 40-47, `SampleDetail` in the core): GPU busy time
-- and memory, pressure stall totals, peak memory and block I/O. Not billed by
-- the default sheets; kept so that nothing a collector sent is dropped.
--
-- ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`. The statement is one
-- ALTER (all columns or none), and the migration runner treats "column
-- already exists" on an `ALTER TABLE ... ADD COLUMN` as applied, so a crash
-- between this statement and its record is still harmless on rerun.
ALTER TABLE usage_samples
    ADD COLUMN gpu_busy_ms UInt64 DEFAULT 0,
    ADD COLUMN gpu_mem_used_bytes UInt64 DEFAULT 0,
    ADD COLUMN cpu_pressure_usec UInt64 DEFAULT 0,
    ADD COLUMN mem_pressure_usec UInt64 DEFAULT 0,
    ADD COLUMN io_pressure_usec UInt64 DEFAULT 0,
    ADD COLUMN mem_peak_bytes UInt64 DEFAULT 0,
    ADD COLUMN io_read_bytes UInt64 DEFAULT 0,
    ADD COLUMN io_write_bytes UInt64 DEFAULT 0;
