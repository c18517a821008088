-- Delivery state of outbox items sent outside (billing events): how many
-- attempts failed, when the next one is due and why the last one failed.
ALTER TABLE outbox
    ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN last_error TEXT;
CREATE INDEX outbox_due ON outbox (topic, next_attempt_at) WHERE delivered_at IS NULL;
