-- Customers and subscriptions as data (issue "What finance expects of a
-- billing system"). Both are written in the ledger (PostgreSQL) and copied
-- here through its outbox, so that the rater, the API and the invoicer read
-- one customer alike, and panels can join them.
--
-- customers: the newest version of each customer's record wins. tax_rate
-- and spend_limit are exact decimals, -1 when the record has none (the
-- tax rate is then [billing] tax_rates').
-- metadata is the record's JSON object, as text.
CREATE TABLE IF NOT EXISTS customers
(
    issuer String,
    id String,
    name String,
    currency String,
    tax_rate Decimal(38, 12),
    tax_id String,
    billing_email String,
    spend_limit Decimal(38, 12),
    metadata String,
    version UInt64,
    updated_at DateTime
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (issuer, id);

-- subscriptions: the plan a customer is on from `effective_from` until
-- their next row's; a change recorded again for the same instant replaces
-- the earlier (recorded_ms is the version).
CREATE TABLE IF NOT EXISTS subscriptions
(
    issuer String,
    customer String,
    effective_from DateTime,
    plan String,
    recorded_ms UInt64
)
ENGINE = ReplacingMergeTree(recorded_ms)
ORDER BY (issuer, customer, effective_from);
