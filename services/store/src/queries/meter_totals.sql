-- One meter's aggregate per customer over a range of customers and a time
-- window: what a price version bills of a meter (idlemeter_core::metering).
-- Duplicated events count once (FINAL). idlemeter-store fills the aggregate
-- part in braces from trusted pieces (the meter's aggregation), never from
-- request text. This comment holds no placeholder mark: the client binds
-- every mark of the text, comments included.
SELECT
    customer,
    {aggregate} AS value
FROM meter_values FINAL
WHERE customer >= ? AND customer <= ? AND meter = ? AND time_ms >= ? AND time_ms < ?
GROUP BY customer
ORDER BY customer
