-- Credit notes and the credit balance. A credit note corrects an issued
-- invoice without touching it: numbered in its own gapless series
-- (invoice_series, series 'credit_note'), immutable, and settled either to
-- the customer's credit balance (applied by their next invoice) or to
-- their prepaid wallet (a deposit 'credit_note:N' written in the same
-- transaction).
CREATE TABLE credit_notes (
    issuer TEXT NOT NULL,
    number BIGINT NOT NULL CHECK (number >= 1),
    customer TEXT NOT NULL,
    invoice_number BIGINT NOT NULL,
    currency TEXT NOT NULL,
    net NUMERIC NOT NULL CHECK (net > 0),
    tax NUMERIC NOT NULL CHECK (tax >= 0),
    total NUMERIC NOT NULL CHECK (total = net + tax),
    settlement TEXT NOT NULL CHECK (settlement IN ('next_invoice', 'wallet')),
    reason TEXT NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL,
    document JSONB NOT NULL,
    PRIMARY KEY (issuer, number),
    FOREIGN KEY (issuer, invoice_number) REFERENCES invoices (issuer, number)
);
CREATE INDEX credit_notes_of_invoice ON credit_notes (issuer, invoice_number);
CREATE INDEX credit_notes_of_customer ON credit_notes (issuer, customer);
CREATE TRIGGER credit_notes_immutable BEFORE UPDATE OR DELETE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- What each invoice took from the credit balance, and the negative spend it
-- carried to it (its total being zero).
ALTER TABLE invoices
    ADD COLUMN balance_applied NUMERIC NOT NULL DEFAULT 0 CHECK (balance_applied >= 0),
    ADD COLUMN balance_carried NUMERIC NOT NULL DEFAULT 0 CHECK (balance_carried >= 0);
