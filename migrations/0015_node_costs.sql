-- Node costs for margin (issue "What finance expects of a billing system"):
-- the node cost sheet (`[margin] node_costs`), loaded as rows so that the
-- margin panel and the admin route compute in SQL. Each load writes every
-- type under a new version; readers take the newest version only. A node
-- is of the first type (lowest priority, the sheet's order) it matches: the
-- id itself when `exact`, else any id starting with `prefix` (the sheet's
-- `gpu-*`; `*` is the empty prefix). capacity_per_hour is in the unit of
-- the allocation resource's usage counter: vCPU-microseconds,
-- KiB-milliseconds of memory or GPU-milliseconds (see
-- idlemeter_core::margin for the allocation rule).
CREATE TABLE IF NOT EXISTS node_costs
(
    version UInt64,
    priority UInt32,
    node_type String,
    prefix String,
    exact UInt8,
    currency String,
    cost_per_hour Decimal(38, 12),
    allocate_by String,
    capacity_per_hour UInt64
)
ENGINE = ReplacingMergeTree()
ORDER BY (version, priority);
