-- Customers and their subscriptions as data. A customer record carries
-- what billing needs of them (currency, tax rate and tax id, billing email,
-- spend limit, metadata); every change bumps its version and is copied to
-- ClickHouse through the outbox. A subscription row puts the customer on a
-- plan from an instant until their next row; rows of periods already
-- invoiced are never written (the ledger refuses them).
CREATE TABLE customers (
    issuer TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    currency TEXT NOT NULL,
    -- NULL: the rate of [billing] tax_rates (or none).
    tax_rate NUMERIC CHECK (tax_rate IS NULL OR (tax_rate >= 0 AND tax_rate < 1)),
    tax_id TEXT NOT NULL,
    billing_email TEXT NOT NULL,
    spend_limit NUMERIC CHECK (spend_limit IS NULL OR spend_limit > 0),
    metadata JSONB NOT NULL,
    version BIGINT NOT NULL CHECK (version >= 1),
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (issuer, id)
);

CREATE TABLE subscriptions (
    issuer TEXT NOT NULL,
    customer TEXT NOT NULL,
    effective_from TIMESTAMPTZ NOT NULL,
    plan TEXT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (issuer, customer, effective_from),
    FOREIGN KEY (issuer, customer) REFERENCES customers (issuer, id)
);
