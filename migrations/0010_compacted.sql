-- Compacted ingest (issue "Ingest at a million samples a second").
--
-- Ingest no longer writes every per-second sample. It writes the samples
-- rating needs (see idlemeter_core::compact) to usage_samples, and one row
-- per sandbox-minute to usage_minutes: the first and last seq and timestamp
-- of the minute's samples and the smallest and largest value of each rollup
-- counter. Hourly rollups come from the minute rows (usage_hours), with
-- min/max states only: the uniqExact states of usage_hourly cost most of the
-- CPU of an insert and of every merge.
--
-- usage_minutes is keyed by the minute's first seq as well: a replay writes
-- the same row again (collapsed by the merge), and a process that resumes in
-- the middle of a minute writes a row of its part of it, which every reader
-- combines with min and max, never by adding rows. usage_hours takes min and
-- max only, for the same reason. Existing data is carried over: the minute
-- rows of every stored sample, and through the view their hours.

DROP TABLE IF EXISTS usage_hourly_mv;

CREATE TABLE IF NOT EXISTS usage_minutes
(
    customer String,
    sandbox String,
    epoch UInt64,
    minute DateTime,
    first_seq UInt64,
    last_seq UInt64,
    first_ts_ms UInt64,
    last_ts_ms UInt64,
    vcpu_milli UInt32,
    state Enum8('running' = 1, 'suspended' = 2, 'stopped' = 3),
    cpu_used_usec_lo UInt64,
    cpu_used_usec_hi UInt64,
    net_rx_bytes_lo UInt64,
    net_rx_bytes_hi UInt64,
    net_tx_bytes_lo UInt64,
    net_tx_bytes_hi UInt64,
    vcpu_alloc_usec_lo UInt64,
    vcpu_alloc_usec_hi UInt64,
    mem_alloc_kib_ms_lo UInt64,
    mem_alloc_kib_ms_hi UInt64,
    mem_used_kib_ms_lo UInt64,
    mem_used_kib_ms_hi UInt64,
    gpu_alloc_ms_lo UInt64,
    gpu_alloc_ms_hi UInt64,
    disk_mib_ms_lo UInt64,
    disk_mib_ms_hi UInt64,
    running_ms_lo UInt64,
    running_ms_hi UInt64,
    suspended_ms_lo UInt64,
    suspended_ms_hi UInt64,
    active_ms_lo UInt64,
    active_ms_hi UInt64
)
ENGINE = ReplacingMergeTree(last_seq)
PARTITION BY toYYYYMM(minute)
ORDER BY (customer, sandbox, epoch, minute, first_seq);

CREATE TABLE IF NOT EXISTS usage_hours
(
    customer String,
    sandbox String,
    epoch UInt64,
    hour DateTime,
    first_seq AggregateFunction(min, UInt64),
    last_seq AggregateFunction(max, UInt64),
    first_ts_ms AggregateFunction(min, UInt64),
    last_ts_ms AggregateFunction(max, UInt64),
    vcpu_milli AggregateFunction(max, UInt32),
    cpu_used_usec_min AggregateFunction(min, UInt64),
    cpu_used_usec_max AggregateFunction(max, UInt64),
    net_rx_bytes_min AggregateFunction(min, UInt64),
    net_rx_bytes_max AggregateFunction(max, UInt64),
    net_tx_bytes_min AggregateFunction(min, UInt64),
    net_tx_bytes_max AggregateFunction(max, UInt64),
    vcpu_alloc_usec_min AggregateFunction(min, UInt64),
    vcpu_alloc_usec_max AggregateFunction(max, UInt64),
    mem_alloc_kib_ms_min AggregateFunction(min, UInt64),
    mem_alloc_kib_ms_max AggregateFunction(max, UInt64),
    mem_used_kib_ms_min AggregateFunction(min, UInt64),
    mem_used_kib_ms_max AggregateFunction(max, UInt64),
    gpu_alloc_ms_min AggregateFunction(min, UInt64),
    gpu_alloc_ms_max AggregateFunction(max, UInt64),
    disk_mib_ms_min AggregateFunction(min, UInt64),
    disk_mib_ms_max AggregateFunction(max, UInt64),
    running_ms_min AggregateFunction(min, UInt64),
    running_ms_max AggregateFunction(max, UInt64),
    suspended_ms_min AggregateFunction(min, UInt64),
    suspended_ms_max AggregateFunction(max, UInt64),
    active_ms_min AggregateFunction(min, UInt64),
    active_ms_max AggregateFunction(max, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (customer, sandbox, epoch, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hours_mv TO usage_hours AS
SELECT
    customer,
    sandbox,
    epoch,
    toStartOfHour(minute) AS hour,
    minState(first_seq) AS first_seq,
    maxState(last_seq) AS last_seq,
    minState(first_ts_ms) AS first_ts_ms,
    maxState(last_ts_ms) AS last_ts_ms,
    maxState(vcpu_milli) AS vcpu_milli,
    minState(cpu_used_usec_lo) AS cpu_used_usec_min,
    maxState(cpu_used_usec_hi) AS cpu_used_usec_max,
    minState(net_rx_bytes_lo) AS net_rx_bytes_min,
    maxState(net_rx_bytes_hi) AS net_rx_bytes_max,
    minState(net_tx_bytes_lo) AS net_tx_bytes_min,
    maxState(net_tx_bytes_hi) AS net_tx_bytes_max,
    minState(vcpu_alloc_usec_lo) AS vcpu_alloc_usec_min,
    maxState(vcpu_alloc_usec_hi) AS vcpu_alloc_usec_max,
    minState(mem_alloc_kib_ms_lo) AS mem_alloc_kib_ms_min,
    maxState(mem_alloc_kib_ms_hi) AS mem_alloc_kib_ms_max,
    minState(mem_used_kib_ms_lo) AS mem_used_kib_ms_min,
    maxState(mem_used_kib_ms_hi) AS mem_used_kib_ms_max,
    minState(gpu_alloc_ms_lo) AS gpu_alloc_ms_min,
    maxState(gpu_alloc_ms_hi) AS gpu_alloc_ms_max,
    minState(disk_mib_ms_lo) AS disk_mib_ms_min,
    maxState(disk_mib_ms_hi) AS disk_mib_ms_max,
    minState(running_ms_lo) AS running_ms_min,
    maxState(running_ms_hi) AS running_ms_max,
    minState(suspended_ms_lo) AS suspended_ms_min,
    maxState(suspended_ms_hi) AS suspended_ms_max,
    minState(active_ms_lo) AS active_ms_min,
    maxState(active_ms_hi) AS active_ms_max
FROM usage_minutes
GROUP BY customer, sandbox, epoch, hour;

INSERT INTO usage_minutes
SELECT
    customer,
    sandbox,
    epoch,
    toStartOfMinute(ts) AS minute,
    min(seq) AS first_seq,
    max(seq) AS last_seq,
    min(ts_ms) AS first_ts_ms,
    max(ts_ms) AS last_ts_ms,
    max(vcpu_milli) AS vcpu_milli,
    argMax(state, seq) AS state,
    min(cpu_used_usec) AS cpu_used_usec_lo,
    max(cpu_used_usec) AS cpu_used_usec_hi,
    min(net_rx_bytes) AS net_rx_bytes_lo,
    max(net_rx_bytes) AS net_rx_bytes_hi,
    min(net_tx_bytes) AS net_tx_bytes_lo,
    max(net_tx_bytes) AS net_tx_bytes_hi,
    min(vcpu_alloc_usec) AS vcpu_alloc_usec_lo,
    max(vcpu_alloc_usec) AS vcpu_alloc_usec_hi,
    min(mem_alloc_kib_ms) AS mem_alloc_kib_ms_lo,
    max(mem_alloc_kib_ms) AS mem_alloc_kib_ms_hi,
    min(mem_used_kib_ms) AS mem_used_kib_ms_lo,
    max(mem_used_kib_ms) AS mem_used_kib_ms_hi,
    min(gpu_alloc_ms) AS gpu_alloc_ms_lo,
    max(gpu_alloc_ms) AS gpu_alloc_ms_hi,
    min(disk_mib_ms) AS disk_mib_ms_lo,
    max(disk_mib_ms) AS disk_mib_ms_hi,
    min(running_ms) AS running_ms_lo,
    max(running_ms) AS running_ms_hi,
    min(suspended_ms) AS suspended_ms_lo,
    max(suspended_ms) AS suspended_ms_hi,
    min(active_ms) AS active_ms_lo,
    max(active_ms) AS active_ms_hi
FROM usage_samples
GROUP BY customer, sandbox, epoch, minute;
