-- Docket schema, version 3 (SQLite): version 1 plus steps, ledger, tokens, connections (2), leaders (3). Times are integer milliseconds since the
-- Unix epoch from the injected clock; ids are UUID text (v7, so they sort by
-- creation time).
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

-- Durable steps: a completed step's result is returned on every later
-- attempt instead of running it again. `failed` and `skipped` rows record
-- what the operator retry and skip commands act on.
CREATE TABLE IF NOT EXISTS steps (
    run_id        TEXT NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    result        TEXT,
    error_class   TEXT,
    error_message TEXT,
    attempt       INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    actor         TEXT,
    comment       TEXT,
    PRIMARY KEY (run_id, name)
) WITHOUT ROWID;

-- The side-effect ledger: one row per (tenant, idempotency key).
CREATE TABLE IF NOT EXISTS ledger (
    tenant          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    action          TEXT NOT NULL,
    run_id          TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    lease_id        TEXT NOT NULL,
    state           TEXT NOT NULL,
    result          TEXT,
    error_class     TEXT,
    error_message   TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (tenant, idempotency_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_run ON ledger (run_id);

-- API tokens (docket-server): only a SHA-256 hash of each secret is kept.
-- A name is unique among a tenant's live tokens; it is recorded as the actor
-- of every operator action made with the token.
CREATE TABLE IF NOT EXISTS tokens (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_live_name ON tokens (tenant, name)
    WHERE revoked_at IS NULL;

-- Connection states (docket.toml connections): only whether an operator
-- disabled a connection or marked its credentials expired; credentials are
-- never stored. No row means `enabled`. Every change also writes an audit
-- row in the same transaction.
CREATE TABLE IF NOT EXISTS connection_states (
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('enabled', 'disabled', 'expired')),
    updated_at INTEGER NOT NULL,
    updated_by TEXT NOT NULL,
    comment    TEXT,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS connection_audit (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    from_status TEXT NOT NULL,
    to_status   TEXT NOT NULL,
    actor       TEXT NOT NULL,
    comment     TEXT,
    at          INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS connection_audit_name ON connection_audit (tenant, name, id);
-- Leadership that expires, of periodic tasks run on one node at a time
-- (Store::try_lead; lead.rs): renewed by its holder, taken over with a
-- larger fencing token once expired.
CREATE TABLE IF NOT EXISTS leaders (
    task       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
