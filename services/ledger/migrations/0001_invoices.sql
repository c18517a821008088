-- Invoice numbers, issued invoices and the outbox that carries them to
-- ClickHouse. A number is claimed, its invoice written and its outbox row
-- queued in one transaction: a number exists only with its invoice, and
-- the series row's lock makes two issuers wait for each other instead of
-- sharing or skipping a number.

-- One gapless series per issuer and kind (`invoice`, `credit_note`).
CREATE TABLE invoice_series (
    issuer TEXT NOT NULL,
    series TEXT NOT NULL,
    next_number BIGINT NOT NULL CHECK (next_number >= 1),
    PRIMARY KEY (issuer, series)
);

-- One invoice per customer and period, immutable once written.
CREATE TABLE invoices (
    issuer TEXT NOT NULL,
    number BIGINT NOT NULL CHECK (number >= 1),
    customer TEXT NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    period_end TIMESTAMPTZ NOT NULL,
    currency TEXT NOT NULL,
    total NUMERIC NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL,
    document JSONB NOT NULL,
    PRIMARY KEY (issuer, number),
    UNIQUE (issuer, customer, period_start)
);

-- What ClickHouse (the dashboards' copy) has yet to receive, in order.
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    payload JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at TIMESTAMPTZ
);
CREATE INDEX outbox_pending ON outbox (topic, id) WHERE delivered_at IS NULL;

-- Invoices are never updated or deleted: the database refuses it.
CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% of an issued % is refused: issued documents are immutable (issue a credit note)',
        TG_OP, TG_TABLE_NAME;
END;
$$;
CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
