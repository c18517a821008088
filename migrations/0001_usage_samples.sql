-- Raw samples, one row per (customer, sandbox, epoch, seq).
--
-- ReplacingMergeTree on the sample identity: a replayed Kafka message inserts
-- rows identical to the first ones, and merges collapse them deterministically
-- (the rows are equal, so which copy survives does not matter). Until a merge
-- runs, readers that need exact raw rows use FINAL; the rollups below are built
-- only from min/max/uniqExact, which duplicates cannot change.
-- Works on ClickHouse 18.16 and current releases (checked with chDB in tests).
CREATE TABLE IF NOT EXISTS usage_samples
(
    customer String,
    sandbox String,
    node String,
    epoch UInt64,
    seq UInt64,
    ts DateTime,
    ts_ms UInt64,
    state Enum8('running' = 1, 'suspended' = 2, 'stopped' = 3),
    vcpu_milli UInt32,
    mem_bytes UInt64,
    gpu_model String,
    gpu_count UInt32,
    disk_bytes UInt64,
    cpu_used_usec UInt64,
    net_rx_bytes UInt64,
    net_tx_bytes UInt64,
    vcpu_alloc_usec UInt64,
    mem_alloc_kib_ms UInt64,
    mem_used_kib_ms UInt64,
    gpu_alloc_ms UInt64,
    disk_mib_ms UInt64,
    api_calls UInt64,
    mem_used_bytes UInt64,
    exec_sessions UInt32,
    open_conns UInt32
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (customer, sandbox, epoch, seq);
