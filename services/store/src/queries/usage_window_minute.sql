-- Usage per (sandbox, epoch, minute) for a range of minutes. Minute rows
-- give the minutes from the start of the range's first hour; the hourly
-- rollup gives every earlier hour. Both fold what precedes the range into
-- bucket 0, the epoch's baseline (see usage_window_rollup.sql). Rows are
-- combined with min and max only, so a minute written twice, or in two
-- parts by a process that resumed inside it, counts once.
-- Only epochs with minutes in the range are read, from both sources.
-- from_hour is the start of from's hour; first and last bound the sandboxes.
SELECT
    sandbox,
    epoch,
    bucket,
    sum(n) AS sample_count,
    min(cpu_lo), min(rx_lo), min(tx_lo), min(vcpu_lo),
    min(mem_alloc_lo), min(mem_used_lo), min(gpu_lo), min(disk_lo),
    max(cpu_hi), max(rx_hi), max(tx_hi), max(vcpu_hi),
    max(mem_alloc_hi), max(mem_used_hi), max(gpu_hi), max(disk_hi)
FROM
(
    SELECT
        sandbox,
        epoch,
        toUInt32(0) AS bucket,
        toUInt64(0) AS n,
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
    WHERE customer = {customer} AND hour < toDateTime({from_hour})
      AND sandbox >= {first} AND sandbox <= {last}
      AND (sandbox, epoch) IN (
          SELECT sandbox, epoch FROM usage_minutes
          WHERE customer = {customer} AND minute >= toDateTime({from}) AND minute < toDateTime({to})
            AND sandbox >= {first} AND sandbox <= {last}
      )
    GROUP BY sandbox, epoch
    UNION ALL
    SELECT
        sandbox,
        epoch,
        toUInt32(if(minute < toDateTime({from}), 0, toUInt32(minute))) AS bucket,
        toUInt64(max(last_seq) - min(first_seq) + 1) AS n,
        min(cpu_used_usec_lo) AS cpu_lo,
        min(net_rx_bytes_lo) AS rx_lo,
        min(net_tx_bytes_lo) AS tx_lo,
        min(vcpu_alloc_usec_lo) AS vcpu_lo,
        min(mem_alloc_kib_ms_lo) AS mem_alloc_lo,
        min(mem_used_kib_ms_lo) AS mem_used_lo,
        min(gpu_alloc_ms_lo) AS gpu_lo,
        min(disk_mib_ms_lo) AS disk_lo,
        max(cpu_used_usec_hi) AS cpu_hi,
        max(net_rx_bytes_hi) AS rx_hi,
        max(net_tx_bytes_hi) AS tx_hi,
        max(vcpu_alloc_usec_hi) AS vcpu_hi,
        max(mem_alloc_kib_ms_hi) AS mem_alloc_hi,
        max(mem_used_kib_ms_hi) AS mem_used_hi,
        max(gpu_alloc_ms_hi) AS gpu_hi,
        max(disk_mib_ms_hi) AS disk_hi
    FROM usage_minutes
    WHERE customer = {customer} AND minute >= toDateTime({from_hour}) AND minute < toDateTime({to})
      AND sandbox >= {first} AND sandbox <= {last}
      AND (sandbox, epoch) IN (
          SELECT sandbox, epoch FROM usage_minutes
          WHERE customer = {customer} AND minute >= toDateTime({from}) AND minute < toDateTime({to})
            AND sandbox >= {first} AND sandbox <= {last}
      )
    GROUP BY sandbox, epoch, bucket
)
GROUP BY sandbox, epoch, bucket
ORDER BY sandbox, epoch, bucket
