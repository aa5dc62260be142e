-- Docket migration 0001 (SQLite): runs, attempts and events (schema version 1).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump. Steps 0001-0003 use IF NOT EXISTS
-- because databases from before numbered steps may hold some of their
-- objects already (see migrate in sqlite/mod.rs).
-- Times are integer milliseconds since the Unix epoch from the injected clock;
-- ids are UUID text (v7, so they sort by creation time).
CREATE TABLE IF NOT EXISTS runs (
    id                 TEXT PRIMARY KEY,
    tenant             TEXT NOT NULL,
    job                TEXT NOT NULL,
    status             TEXT NOT NULL,
    priority           INTEGER NOT NULL DEFAULT 0,
    input              TEXT NOT NULL,
    variables          TEXT NOT NULL DEFAULT '{}',
    output             TEXT,
    attempt            INTEGER NOT NULL DEFAULT 0,
    attempts_forgiven  INTEGER NOT NULL DEFAULT 0,
    run_after          INTEGER NOT NULL,
    lease_id           TEXT,
    lease_expires_at   INTEGER,
    worker             TEXT,
    idempotency_key    TEXT,
    correlation_id     TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    finished_at        INTEGER,
    terminal_reason    TEXT,
    last_error_class   TEXT,
    last_error_message TEXT,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    retriggered_from   TEXT,
    input_request      TEXT
);
-- Trigger deduplication: one run per (tenant, job, idempotency key).
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency ON runs (tenant, job, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim path: walks only claimable rows, in claim order.
CREATE INDEX IF NOT EXISTS runs_claim ON runs (priority DESC, run_after, id)
    WHERE status IN ('pending', 'postponed');
-- The lease reaper: only running rows.
CREATE INDEX IF NOT EXISTS runs_lease ON runs (lease_expires_at) WHERE status = 'running';
-- Listing, newest first, per tenant. Never updated after insert.
CREATE INDEX IF NOT EXISTS runs_tenant_id ON runs (tenant, id);
-- "Needs attention" (failed, needs_input) stays fast at any table size. A
-- full (tenant, status, id) index would be rewritten on every transition,
-- twice per run; this one only when a run fails or waits for a person.
CREATE INDEX IF NOT EXISTS runs_attention ON runs (tenant, id)
    WHERE status IN ('failed', 'needs_input');

CREATE TABLE IF NOT EXISTS attempts (
    run_id        TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    lease_id      TEXT NOT NULL,
    worker        TEXT NOT NULL,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    outcome       TEXT NOT NULL,
    error_class   TEXT,
    error_message TEXT,
    fingerprint   TEXT,
    failure_key   TEXT,
    action        TEXT,
    retry_policy  TEXT,
    delay_ms      INTEGER,
    eligible_at   INTEGER,
    retry_reason  TEXT,
    PRIMARY KEY (run_id, attempt)
) WITHOUT ROWID;
-- A lease fences exactly one attempt: two attempts under one lease cannot be stored.
CREATE UNIQUE INDEX IF NOT EXISTS attempts_lease ON attempts (lease_id);

CREATE TABLE IF NOT EXISTS events (
    -- A plain rowid (max + 1): AUTOINCREMENT would write sqlite_sequence on
    -- every event. Ids still only grow, as pruning never deletes the newest.
    id       INTEGER PRIMARY KEY,
    run_id   TEXT NOT NULL,
    tenant   TEXT NOT NULL,
    job      TEXT NOT NULL,
    kind     TEXT NOT NULL,
    at       INTEGER NOT NULL,
    attempt  INTEGER,
    lease_id TEXT,
    actor    TEXT,
    comment  TEXT,
    data     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);

