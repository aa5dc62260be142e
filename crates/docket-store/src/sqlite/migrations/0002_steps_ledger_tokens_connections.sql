-- Docket migration 0002 (SQLite): durable steps, the side-effect ledger, API tokens, connection states (schema version 2).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump. Steps 0001-0003 use IF NOT EXISTS
-- because databases from before numbered steps may hold some of their
-- objects already (see migrate in sqlite/mod.rs).

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
