-- Docket migration 0010 (SQLite): durable signals (docs/DURABLE.md, "Signals").
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- One row per signal a run received: pending until a wait of the run
-- consumes it (delivered_to names that wait's step). seq is the arrival
-- order.
CREATE TABLE signals (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    name         TEXT NOT NULL,
    key          TEXT,
    data         TEXT NOT NULL,
    sent_by      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    delivered_to TEXT,
    delivered_at INTEGER
);
-- A signal id is one signal per run (idempotent sends).
CREATE UNIQUE INDEX signals_run_id ON signals (run_id, id);
-- A wait takes the oldest pending signal of its name.
CREATE INDEX signals_pending ON signals (run_id, name, seq) WHERE delivered_at IS NULL;
-- A repeated keyed send finds the runs the first one reached.
CREATE INDEX signals_tenant_id ON signals (tenant, id);

-- A run's open waits (one per wait step); closed when the wait is
-- delivered or times out.
CREATE TABLE signal_waits (
    run_id  TEXT NOT NULL,
    wait    TEXT NOT NULL,
    tenant  TEXT NOT NULL,
    name    TEXT NOT NULL,
    key     TEXT,
    until   INTEGER NOT NULL,
    since   INTEGER NOT NULL,
    PRIMARY KEY (run_id, wait)
) WITHOUT ROWID;
-- Keyed sends: who waits for (tenant, name, key).
CREATE INDEX signal_waits_key ON signal_waits (tenant, name, key);

-- Set when a signal reaches a run whose running attempt already recorded a
-- wait for it; the attempt's postponement then leaves the run due at once
-- (plan::signal::postponement_wakes). Every attempt end clears it.
ALTER TABLE runs ADD COLUMN wake_requested INTEGER NOT NULL DEFAULT 0;
