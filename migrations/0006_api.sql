-- Customer usage API (services/api): API keys and spend alerts.
--
-- api_keys: one row per key version. The secret is never stored, only the
-- hex SHA-256 of it (secrets are 256 random bits, so a fast hash is enough: no
-- dictionary to guess from). Revoking writes a new version with revoked_at
-- set; readers take the latest version (FINAL: the ReplacingMergeTree keeps
-- the highest `version`). customer is empty for an
-- admin key, which sees every tenant.
CREATE TABLE IF NOT EXISTS api_keys
(
    key_id String,
    customer String,
    role String,
    secret_sha256 String,
    name String,
    created_at DateTime,
    -- 0 (1970-01-01 00:00:00) while the key is valid.
    revoked_at DateTime,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_id;

-- Spend alerts: notify a webhook when a customer's spend in the current
-- billing period reaches a threshold. Each alert signs its webhooks with its
-- own secret (shown once, when it is created), so one tenant can never sign
-- as idlemeter to another's endpoint. Deleting writes a new version with
-- deleted = 1.
CREATE TABLE IF NOT EXISTS spend_alerts
(
    customer String,
    alert_id String,
    threshold Decimal(38, 12),
    currency String,
    webhook_url String,
    webhook_secret String,
    created_at DateTime,
    deleted UInt8,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (customer, alert_id);

-- One row per alert and billing period whose threshold was crossed and whose
-- webhook was acknowledged: an alert fires once per period.
CREATE TABLE IF NOT EXISTS spend_alert_firings
(
    customer String,
    alert_id String,
    period_start DateTime,
    spend Decimal(38, 12),
    fired_at DateTime
)
ENGINE = ReplacingMergeTree(fired_at)
ORDER BY (customer, alert_id, period_start);
