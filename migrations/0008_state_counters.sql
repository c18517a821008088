-- Billed counters by lifecycle state and activity (wire fields 50-64,
-- `StateCounters` in the core) and which billed counters a sample carries
-- (`counters_present`, a bit set; 0 for every row stored before this
-- migration, which therefore keeps rating from its gauges, as it did).
--
-- One ALTER, all columns or none; see 0007 for why a rerun is harmless.
ALTER TABLE usage_samples
    ADD COLUMN counters_present UInt32 DEFAULT 0,
    ADD COLUMN running_ms UInt64 DEFAULT 0,
    ADD COLUMN suspended_ms UInt64 DEFAULT 0,
    ADD COLUMN active_ms UInt64 DEFAULT 0,
    ADD COLUMN vcpu_alloc_active_usec UInt64 DEFAULT 0,
    ADD COLUMN vcpu_max_usec UInt64 DEFAULT 0,
    ADD COLUMN vcpu_max_active_usec UInt64 DEFAULT 0,
    ADD COLUMN cpu_used_active_usec UInt64 DEFAULT 0,
    ADD COLUMN mem_alloc_active_kib_ms UInt64 DEFAULT 0,
    ADD COLUMN mem_max_kib_ms UInt64 DEFAULT 0,
    ADD COLUMN mem_max_active_kib_ms UInt64 DEFAULT 0,
    ADD COLUMN mem_used_active_kib_ms UInt64 DEFAULT 0,
    ADD COLUMN gpu_alloc_active_ms UInt64 DEFAULT 0,
    ADD COLUMN disk_running_mib_ms UInt64 DEFAULT 0,
    ADD COLUMN disk_active_mib_ms UInt64 DEFAULT 0;
