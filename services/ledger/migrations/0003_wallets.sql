-- Prepaid wallets: deposits are recorded here, and every issued invoice
-- says what it drew; an invoice that would draw more than the wallet holds
-- is refused in its issuing transaction.
CREATE TABLE wallet_deposits (
    issuer TEXT NOT NULL,
    customer TEXT NOT NULL,
    deposit_id TEXT NOT NULL,
    amount NUMERIC NOT NULL CHECK (amount > 0),
    deposited_at TIMESTAMPTZ NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, customer, deposit_id)
);
CREATE TRIGGER wallet_deposits_immutable BEFORE UPDATE OR DELETE ON wallet_deposits
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

ALTER TABLE invoices ADD COLUMN wallet_applied NUMERIC NOT NULL DEFAULT 0
    CHECK (wallet_applied >= 0);
