-- The samples rating reads, for the customers from first to last
-- (inclusive; first = last for one customer): every sample closing an
-- interval in [from_ms, to_ms) plus, per (customer, sandbox, epoch) with one
-- there, its last sample before from_ms as the baseline.
SELECT
    customer, sandbox, node, epoch, seq, ts_ms, state,
    vcpu_milli, mem_bytes, gpu_model, gpu_count, disk_bytes,
    cpu_used_usec, net_rx_bytes, net_tx_bytes, vcpu_alloc_usec,
    mem_alloc_kib_ms, mem_used_kib_ms, gpu_alloc_ms, disk_mib_ms, api_calls,
    mem_used_bytes, exec_sessions, open_conns,
    counters_present, running_ms, suspended_ms, active_ms,
    vcpu_alloc_active_usec, vcpu_max_usec, vcpu_max_active_usec, cpu_used_active_usec,
    mem_alloc_active_kib_ms, mem_max_kib_ms, mem_max_active_kib_ms, mem_used_active_kib_ms,
    gpu_alloc_active_ms, disk_running_mib_ms, disk_active_mib_ms
FROM usage_samples FINAL
WHERE customer >= {first} AND customer <= {last}
  AND (
      (ts_ms >= {from_ms} AND ts_ms < {to_ms})
      OR (customer, sandbox, epoch, seq) IN (
          SELECT customer, sandbox, epoch, max(seq) FROM usage_samples
          WHERE customer >= {first} AND customer <= {last} AND ts_ms < {from_ms}
            AND (customer, sandbox, epoch) IN (
                SELECT customer, sandbox, epoch FROM usage_samples
                WHERE customer >= {first} AND customer <= {last} AND ts_ms >= {from_ms} AND ts_ms < {to_ms}
            )
          GROUP BY customer, sandbox, epoch
      )
  )
ORDER BY customer, sandbox, epoch, seq
