-- Hourly rollup per (customer, sandbox, epoch, hour), fed by a materialized view.
--
-- Counters are cumulative within an epoch, so an hour keeps the smallest and the
-- largest value of each counter seen in it; usage in an hour is its max minus the
-- max of the epoch's previous hour (or its own min for the epoch's first hour).
-- min, max and uniqExact are idempotent: inserting the same sample twice, as a
-- replay after a crash does, cannot change any of them. A sample belongs to the
-- hour it was taken in (it closes the interval it describes).
CREATE TABLE IF NOT EXISTS usage_hourly
(
    customer String,
    sandbox String,
    epoch UInt64,
    hour DateTime,
    samples AggregateFunction(uniqExact, UInt64),
    running_samples AggregateFunction(uniqExactIf, UInt64, UInt8),
    first_seq AggregateFunction(min, UInt64),
    last_seq AggregateFunction(max, UInt64),
    first_ts_ms AggregateFunction(min, UInt64),
    last_ts_ms AggregateFunction(max, UInt64),
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
    disk_mib_ms_max AggregateFunction(max, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (customer, sandbox, epoch, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    customer,
    sandbox,
    epoch,
    toStartOfHour(ts) AS hour,
    uniqExactState(seq) AS samples,
    uniqExactIfState(seq, state = 'running') AS running_samples,
    minState(seq) AS first_seq,
    maxState(seq) AS last_seq,
    minState(ts_ms) AS first_ts_ms,
    maxState(ts_ms) AS last_ts_ms,
    minState(cpu_used_usec) AS cpu_used_usec_min,
    maxState(cpu_used_usec) AS cpu_used_usec_max,
    minState(net_rx_bytes) AS net_rx_bytes_min,
    maxState(net_rx_bytes) AS net_rx_bytes_max,
    minState(net_tx_bytes) AS net_tx_bytes_min,
    maxState(net_tx_bytes) AS net_tx_bytes_max,
    minState(vcpu_alloc_usec) AS vcpu_alloc_usec_min,
    maxState(vcpu_alloc_usec) AS vcpu_alloc_usec_max,
    minState(mem_alloc_kib_ms) AS mem_alloc_kib_ms_min,
    maxState(mem_alloc_kib_ms) AS mem_alloc_kib_ms_max,
    minState(mem_used_kib_ms) AS mem_used_kib_ms_min,
    maxState(mem_used_kib_ms) AS mem_used_kib_ms_max,
    minState(gpu_alloc_ms) AS gpu_alloc_ms_min,
    maxState(gpu_alloc_ms) AS gpu_alloc_ms_max,
    minState(disk_mib_ms) AS disk_mib_ms_min,
    maxState(disk_mib_ms) AS disk_mib_ms_max
FROM usage_samples
GROUP BY customer, sandbox, epoch, hour;
