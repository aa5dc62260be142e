-- Docket migration 0010 (PostgreSQL): durable signals (docs/DURABLE.md,
-- "Signals"); the same tables as SQLite's 0010.
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

CREATE TABLE signals (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT NOT NULL,
    run_id       UUID NOT NULL,
    tenant       TEXT NOT NULL,
    name         TEXT NOT NULL,
    key          TEXT,
    data         JSONB NOT NULL,
    sent_by      TEXT NOT NULL,
    received_at  BIGINT NOT NULL,
    delivered_to TEXT,
    delivered_at BIGINT
);
CREATE UNIQUE INDEX signals_run_id ON signals (run_id, id);
CREATE INDEX signals_pending ON signals (run_id, name, seq) WHERE delivered_at IS NULL;
CREATE INDEX signals_tenant_id ON signals (tenant, id);

CREATE TABLE signal_waits (
    run_id  UUID NOT NULL,
    wait    TEXT NOT NULL,
    tenant  TEXT NOT NULL,
    name    TEXT NOT NULL,
    key     TEXT,
    until   BIGINT NOT NULL,
    since   BIGINT NOT NULL,
    PRIMARY KEY (run_id, wait)
);
CREATE INDEX signal_waits_key ON signal_waits (tenant, name, key);

ALTER TABLE runs ADD COLUMN wake_requested BOOLEAN NOT NULL DEFAULT false;
