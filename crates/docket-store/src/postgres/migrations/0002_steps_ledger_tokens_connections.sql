-- Docket migration 0002 (PostgreSQL): durable steps, the side-effect ledger, API tokens, connection states (schema version 2).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs in the connection's schema
-- (search_path), inside the step's transaction under the migration advisory
-- lock, together with the schema_version bump. Steps 0001-0003 use IF NOT
-- EXISTS because schemas from before numbered steps may hold some of their
-- objects already (see migrate in postgres/mod.rs).

-- Durable steps (see the SQLite step 0002).
CREATE TABLE IF NOT EXISTS steps (
    run_id        uuid NOT NULL,
    name          text NOT NULL,
    status        text NOT NULL,
    result        jsonb,
    error_class   text,
    error_message text,
    attempt       integer NOT NULL,
    updated_at    bigint NOT NULL,
    actor         text,
    comment       text,
    PRIMARY KEY (run_id, name)
);

-- The side-effect ledger: one row per (tenant, idempotency key).
CREATE TABLE IF NOT EXISTS ledger (
    tenant          text NOT NULL,
    idempotency_key text NOT NULL,
    action          text NOT NULL,
    run_id          uuid NOT NULL,
    attempt         integer NOT NULL,
    lease_id        uuid NOT NULL,
    state           text NOT NULL,
    result          jsonb,
    error_class     text,
    error_message   text,
    created_at      bigint NOT NULL,
    updated_at      bigint NOT NULL,
    PRIMARY KEY (tenant, idempotency_key)
);
CREATE INDEX IF NOT EXISTS ledger_run ON ledger (run_id);

-- API tokens (docket-server): only a SHA-256 hash of each secret is kept.
-- A name is unique among a tenant's live tokens; it is recorded as the actor
-- of every operator action made with the token.
CREATE TABLE IF NOT EXISTS tokens (
    id         text PRIMARY KEY,
    tenant     text NOT NULL,
    name       text NOT NULL,
    hash       text NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    revoked_at bigint
);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_live_name ON tokens (tenant, name)
    WHERE revoked_at IS NULL;

-- Connection states (docket.toml connections): only whether an operator
-- disabled a connection or marked its credentials expired; credentials are
-- never stored. No row means `enabled`. Every change also writes an audit
-- row in the same transaction.
CREATE TABLE IF NOT EXISTS connection_states (
    tenant     text NOT NULL,
    name       text NOT NULL,
    status     text NOT NULL CHECK (status IN ('enabled', 'disabled', 'expired')),
    updated_at bigint NOT NULL,
    updated_by text NOT NULL,
    comment    text,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS connection_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant      text NOT NULL,
    name        text NOT NULL,
    from_status text NOT NULL,
    to_status   text NOT NULL,
    actor       text NOT NULL,
    comment     text,
    at          bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS connection_audit_name ON connection_audit (tenant, name, id);
