-- Usage per (sandbox, epoch, window) from the hourly rollup of the minute rows, for hour and day
-- windows (width in seconds: 3600 or 86400, windows aligned to UTC). Every
-- hour before the range is folded into bucket 0, the epoch's baseline, so a
-- window's usage is its largest counters minus the previous window's (see
-- idlemeter_core::rollup). Only epochs with samples in the range are read.
-- first and last bound the sandboxes (inclusive).
SELECT
    sandbox,
    epoch,
    toUInt32(if(hour < toDateTime({from}), 0, intDiv(toUInt32(hour), {width}) * {width})) AS bucket,
    -- Samples spanned: last - first seq + 1.
    toUInt64(maxMerge(last_seq) - minMerge(first_seq) + 1) AS sample_count,
    minMerge(cpu_used_usec_min) AS cpu_lo,
    minMerge(net_rx_bytes_min) AS rx_lo,
    minMerge(net_tx_bytes_min) AS tx_lo,
    minMerge(vcpu_alloc_usec_min) AS vcpu_lo,
    minMerge(mem_alloc_kib_ms_min) AS mem_alloc_lo,
    minMerge(mem_used_kib_ms_min) AS mem_used_lo,
    minMerge(gpu_alloc_ms_min) AS gpu_lo,
    minMerge(disk_mib_ms_min) AS disk_lo,
    maxMerge(cpu_used_usec_max) AS cpu_hi,
    maxMerge(net_rx_bytes_max) AS rx_hi,
    maxMerge(net_tx_bytes_max) AS tx_hi,
    maxMerge(vcpu_alloc_usec_max) AS vcpu_hi,
    maxMerge(mem_alloc_kib_ms_max) AS mem_alloc_hi,
    maxMerge(mem_used_kib_ms_max) AS mem_used_hi,
    maxMerge(gpu_alloc_ms_max) AS gpu_hi,
    maxMerge(disk_mib_ms_max) AS disk_hi
FROM usage_hours
WHERE customer = {customer}
  AND hour < toDateTime({to})
  AND sandbox >= {first} AND sandbox <= {last}
  AND (sandbox, epoch) IN (
      SELECT sandbox, epoch FROM usage_hours
      WHERE customer = {customer} AND hour >= toDateTime({from}) AND hour < toDateTime({to})
        AND sandbox >= {first} AND sandbox <= {last}
  )
GROUP BY sandbox, epoch, bucket
ORDER BY sandbox, epoch, bucket
