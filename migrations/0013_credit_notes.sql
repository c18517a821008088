-- Credit notes and the credit balance (issue "What finance expects of a
-- billing system"). Both are issued in the ledger (PostgreSQL) and copied
-- here through its outbox, as invoices are, so that panels and the
-- accounts the rater and the API read see them.
--
-- invoices: what the customer's credit balance paid of the invoice, and the
-- negative spend it carried to that balance (the total being zero). One
-- ALTER; the migration runner treats "column already exists" as applied.
ALTER TABLE invoices
    ADD COLUMN balance_applied Decimal(38, 12) DEFAULT 0,
    ADD COLUMN balance_carried Decimal(38, 12) DEFAULT 0;

-- credit_notes: one row per note, numbered in its own gapless series per
-- issuer; `total = net + tax`, positive; settlement is `next_invoice` (the
-- customer's credit balance) or `wallet` (a deposit `credit_note:N`).
CREATE TABLE IF NOT EXISTS credit_notes
(
    issuer String,
    number UInt64,
    customer String,
    invoice_number UInt64,
    period_start DateTime,
    currency String,
    net Decimal(38, 12),
    tax Decimal(38, 12),
    total Decimal(38, 12),
    settlement String,
    reason String,
    line_count UInt16,
    issued_at DateTime
)
ENGINE = ReplacingMergeTree()
ORDER BY (issuer, number);

-- credit_note_lines: what each note credits of each invoice line (a
-- positive amount), written before its header row.
CREATE TABLE IF NOT EXISTS credit_note_lines
(
    issuer String,
    number UInt64,
    line_no UInt16,
    customer String,
    invoice_number UInt64,
    invoice_line_no UInt16,
    resource String,
    amount Decimal(38, 12)
)
ENGINE = ReplacingMergeTree()
ORDER BY (issuer, number, line_no);
