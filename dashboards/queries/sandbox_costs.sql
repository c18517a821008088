-- Node cost allocated to each sandbox epoch in [{from}, {to}) (see
-- idlemeter_core::margin for the rule): its allocation
-- counters' growth over the range (usage_minutes) on its node (from its
-- samples, up to 31 days before the range) costed by the node's type in the
-- newest node_costs load: cost_per_hour x allocated / capacity_per_hour, a
-- Decimal truncated to 12 places. A sandbox on a node no type matches has
-- no row (uncosted). A fragment: sandbox_margin.sql sums it by sandbox.
SELECT
    customer,
    sandbox,
    epoch,
    argMin(type_name, priority) AS node_type,
    argMin(cost_in, priority) AS cost_currency,
    any(epoch_vcpu_usec) AS vcpu_usec,
    any(epoch_mem_kib_ms) AS mem_kib_ms,
    any(epoch_gpu_ms) AS gpu_ms,
    argMin(epoch_cost, priority) AS cost
FROM
(
    SELECT
        customer, sandbox, epoch, node, epoch_vcpu_usec, epoch_mem_kib_ms, epoch_gpu_ms,
        priority, node_type AS type_name, currency AS cost_in,
        cost_per_hour * toDecimal128(multiIf(allocate_by = 'gpu', epoch_gpu_ms, allocate_by = 'memory', epoch_mem_kib_ms, epoch_vcpu_usec), 0)
            / toDecimal128(capacity_per_hour, 0) AS epoch_cost
    FROM
    (
        SELECT customer, sandbox, epoch, epoch_vcpu_usec, epoch_mem_kib_ms, epoch_gpu_ms, node
        FROM
        (
            SELECT customer, sandbox, epoch,
                   max(vcpu_alloc_usec_hi) - min(vcpu_alloc_usec_lo) AS epoch_vcpu_usec,
                   max(mem_alloc_kib_ms_hi) - min(mem_alloc_kib_ms_lo) AS epoch_mem_kib_ms,
                   max(gpu_alloc_ms_hi) - min(gpu_alloc_ms_lo) AS epoch_gpu_ms
            FROM usage_minutes
            WHERE minute >= toDateTime({from}) AND minute < toDateTime({to})
            GROUP BY customer, sandbox, epoch
        ) AS allocated
        ANY INNER JOIN
        (
            SELECT customer, sandbox, epoch, any(node) AS node
            FROM usage_samples
            WHERE ts >= toDateTime({from} - 2678400) AND ts < toDateTime({to})
            GROUP BY customer, sandbox, epoch
        ) AS placed
        USING (customer, sandbox, epoch)
    ) AS epochs
    CROSS JOIN
    (
        SELECT priority, node_type, prefix, exact, currency, cost_per_hour, allocate_by, capacity_per_hour
        FROM node_costs
        WHERE version = (SELECT max(version) FROM node_costs) AND capacity_per_hour > 0
    ) AS types
    WHERE if(exact = 1, node = prefix, substring(node, 1, length(prefix)) = prefix)
)
GROUP BY customer, sandbox, epoch, node
