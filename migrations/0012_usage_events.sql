-- Usage events (issue "Meet users where they are"): CloudEvents taken by the
-- API's OpenMeter-compatible `POST /api/v1/events`, carried on Kafka
-- (usage.events) and stored by ingest after the offsets' batch is acked, as
-- samples are.
--
-- usage_events: every accepted event, its data as JSON text. An event is
-- identified by (source, id): the sorting key ends with them, so a duplicate
-- (a client's retry, a replayed Kafka batch) collapses into one row in
-- merges and FINAL reads. Partitions are by month of the event's time, so
-- a duplicate collapses when both copies carry the same time (a time the
-- client sent) or fall in the same month (the time of receipt, when the
-- event had none).
CREATE TABLE IF NOT EXISTS usage_events
(
    customer String,
    subject String,
    source String,
    id String,
    type String,
    time_ms UInt64,
    received_ms UInt64,
    data String
)
ENGINE = ReplacingMergeTree(received_ms)
PARTITION BY toYYYYMM(toDateTime(intDiv(time_ms, 1000)))
ORDER BY (customer, source, id);

-- meter_values: what each meter takes of each event of its type (the value
-- at valueProperty, 1 for COUNT, the text for UNIQUE_COUNT, and the groupBy
-- values), derived by ingest with idlemeter_core::events, the function the
-- API validated the event with. Meters aggregate these rows when read.
CREATE TABLE IF NOT EXISTS meter_values
(
    customer String,
    meter String,
    subject String,
    source String,
    id String,
    time_ms UInt64,
    value Decimal(38, 12),
    value_text String,
    group_keys Array(String),
    group_values Array(String),
    received_ms UInt64
)
ENGINE = ReplacingMergeTree(received_ms)
PARTITION BY toYYYYMM(toDateTime(intDiv(time_ms, 1000)))
ORDER BY (customer, meter, source, id);
