-- The latest sample of each of a customer's sandboxes (its current state),
-- after a cursor in id order, optionally only one sandbox.
-- only_flag is 1 to read only the sandbox `only`, else 0.
SELECT
    sandbox,
    argMax(node, ts_ms) AS node,
    argMax(epoch, ts_ms) AS epoch,
    argMax(toString(state), ts_ms) AS state,
    min(ts_ms) AS first_seen_ms,
    max(ts_ms) AS last_seen_ms,
    argMax(vcpu_milli, ts_ms) AS vcpu_milli,
    argMax(mem_bytes, ts_ms) AS mem_bytes,
    argMax(gpu_model, ts_ms) AS gpu_model,
    argMax(gpu_count, ts_ms) AS gpu_count,
    argMax(disk_bytes, ts_ms) AS disk_bytes,
    argMax(exec_sessions, ts_ms) AS exec_sessions,
    argMax(open_conns, ts_ms) AS open_conns
FROM usage_samples
WHERE customer = {customer} AND sandbox > {after} AND ({only_flag} = 0 OR sandbox = {only})
GROUP BY sandbox
ORDER BY sandbox
LIMIT {limit}
