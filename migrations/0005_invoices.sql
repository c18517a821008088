-- Invoices: a closed billing period made final, numbered without gaps per
-- issuer, never changed once issued.
--
-- invoice_lines are written first, then the invoices header row: a header is
-- the invoice's commit marker. A run that crashes between the two leaves lines
-- without a header. The rerun writes its lines for the same (number, customer)
-- with a later written_ms, which replaces them line by line; readers take only
-- the header's customer and its first line_count lines, so a leftover line of
-- the crashed run (a longer invoice, another customer) is never read. A header
-- is written once: the invoicer never issues a (issuer, customer, period,
-- currency) that has one. Money is Decimal(38, 12), already rounded to the
-- currency's minor unit.
CREATE TABLE IF NOT EXISTS invoice_lines
(
    issuer String,
    number UInt64,
    line_no UInt16,
    customer String,
    kind String,
    resource String,
    quantity Decimal(38, 12),
    unit String,
    unit_price Decimal(38, 12),
    amount Decimal(38, 12),
    -- The period an adjustment line bills usage of (else the invoice's own).
    for_period DateTime,
    note String,
    written_ms UInt64
)
ENGINE = ReplacingMergeTree(written_ms)
ORDER BY (issuer, number, customer, line_no);

CREATE TABLE IF NOT EXISTS invoices
(
    issuer String,
    number UInt64,
    customer String,
    period_start DateTime,
    period_end DateTime,
    currency String,
    plan String,
    sheet String,
    sheet_checksum String,
    subtotal Decimal(38, 12),
    fees Decimal(38, 12),
    adjustments Decimal(38, 12),
    credits Decimal(38, 12),
    -- The monthly part of credits (what later adjustments for this period
    -- net against).
    monthly_credits Decimal(38, 12),
    tax_rate Decimal(38, 12),
    tax Decimal(38, 12),
    total Decimal(38, 12),
    -- One-time credit left after this invoice; -1 when the plan has none.
    one_time_credit_left Decimal(38, 12),
    line_count UInt16,
    -- Paid from the customer's prepaid wallet (a positive amount).
    wallet_applied Decimal(38, 12),
    issued_at DateTime
)
ENGINE = ReplacingMergeTree()
ORDER BY (issuer, customer, period_start, currency);

-- Prepaid wallets: money a customer paid in advance, drawn by invoices after
-- their credits and tax. A deposit id is unique per customer: recording the
-- same deposit twice keeps one row.
CREATE TABLE IF NOT EXISTS wallet_deposits
(
    issuer String,
    customer String,
    deposit_id String,
    amount Decimal(38, 12),
    deposited_at DateTime
)
ENGINE = ReplacingMergeTree()
ORDER BY (issuer, customer, deposit_id);
