-- API keys in the ledger: every change of a key (its creation, its
-- revocation) is a new version row, never an update, so the table is the
-- keys' audit trail. Each version is copied to ClickHouse (api_keys) through
-- the outbox, where the API's key cache reads them.
CREATE TABLE api_keys (
    key_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    customer TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('customer', 'admin', 'ingest')),
    secret_sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, version)
);
CREATE TRIGGER api_keys_immutable BEFORE UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
