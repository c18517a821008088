-- Margin in [{from}, {to}) (see idlemeter_core::margin for the rule): one
-- row per sandbox (its attributed usage revenue, its allocated node cost)
-- and one per customer with sandbox '' (all their revenue, all their
-- sandboxes' cost). Revenue and cost are subtracted only in one currency:
-- customers billed in another currency than the node cost sheet's are left
-- out. Money is Decimal throughout. Placeholders: {revenue_lines},
-- {sandbox_costs}, {from}, {to}.
SELECT customer, sandbox, currency, node_type, revenue, cost, revenue - cost AS margin
FROM
(
    SELECT
        customer, sandbox, currency, node_type, sandbox_cost AS cost,
        vcpu_revenue * toDecimal128(sandbox_vcpu_usec, 0) / toDecimal128(greatest(customer_vcpu_usec, 1), 0)
            + memory_revenue * toDecimal128(sandbox_mem_kib_ms, 0) / toDecimal128(greatest(customer_mem_kib_ms, 1), 0)
            + gpu_revenue * toDecimal128(sandbox_gpu_ms, 0) / toDecimal128(greatest(customer_gpu_ms, 1), 0) AS revenue,
        sandbox_cost_currency
    FROM
    (
        SELECT *
        FROM
        (
            SELECT customer, sandbox, argMax(node_type, cost) AS node_type,
                   any(cost_currency) AS sandbox_cost_currency,
                   sum(vcpu_usec) AS sandbox_vcpu_usec, sum(mem_kib_ms) AS sandbox_mem_kib_ms,
                   sum(gpu_ms) AS sandbox_gpu_ms, sum(cost) AS sandbox_cost
            FROM ({sandbox_costs})
            GROUP BY customer, sandbox
        ) AS sandboxes
        ANY INNER JOIN
        (
            -- Every sandbox of the customer, costed or not: a sandbox on a
            -- node no type prices still holds its share of the revenue.
            SELECT customer, sum(epoch_vcpu_usec) AS customer_vcpu_usec,
                   sum(epoch_mem_kib_ms) AS customer_mem_kib_ms, sum(epoch_gpu_ms) AS customer_gpu_ms
            FROM
            (
                SELECT customer, sandbox, epoch,
                       max(vcpu_alloc_usec_hi) - min(vcpu_alloc_usec_lo) AS epoch_vcpu_usec,
                       max(mem_alloc_kib_ms_hi) - min(mem_alloc_kib_ms_lo) AS epoch_mem_kib_ms,
                       max(gpu_alloc_ms_hi) - min(gpu_alloc_ms_lo) AS epoch_gpu_ms
                FROM usage_minutes
                WHERE minute >= toDateTime({from}) AND minute < toDateTime({to})
                GROUP BY customer, sandbox, epoch
            )
            GROUP BY customer
        ) AS customers
        USING customer
    ) AS allocations
    ANY INNER JOIN
    (
        SELECT customer, any(currency) AS currency,
               sumIf(amount, kind = 'usage' AND resource = 'vcpu') AS vcpu_revenue,
               sumIf(amount, kind = 'usage' AND resource = 'memory') AS memory_revenue,
               sumIf(amount, kind = 'usage' AND startsWith(resource, 'gpu.')) AS gpu_revenue
        FROM ({revenue_lines})
        GROUP BY customer
    ) AS revenues
    USING customer
)
WHERE currency = sandbox_cost_currency
UNION ALL
SELECT customer, '' AS sandbox, currency, '' AS node_type, revenue, cost, revenue - cost AS margin
FROM
(
    SELECT customer, any(currency) AS currency, sum(amount) AS revenue
    FROM ({revenue_lines})
    WHERE kind NOT IN ('tax', 'wallet', 'balance')
    GROUP BY customer
) AS revenues
ANY INNER JOIN
(
    SELECT customer, any(cost_currency) AS customer_cost_currency, sum(cost) AS cost
    FROM ({sandbox_costs})
    GROUP BY customer
) AS costs
USING customer
WHERE currency = customer_cost_currency
