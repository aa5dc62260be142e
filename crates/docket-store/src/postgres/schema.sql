-- Docket schema, version 3 (PostgreSQL). The same tables and columns as the
-- SQLite schema. Runs in the connection's schema (search_path), inside the
-- migration transaction, under an advisory lock. Times are BIGINT
-- milliseconds since the Unix epoch from the injected clock; ids are uuids
-- (v7, so they sort by creation time); JSON is jsonb.
CREATE TABLE IF NOT EXISTS runs (
    id                 uuid PRIMARY KEY,
    tenant             text NOT NULL,
    job                text NOT NULL,
    status             text NOT NULL,
    priority           integer NOT NULL DEFAULT 0,
    input              jsonb NOT NULL,
    variables          jsonb NOT NULL DEFAULT '{}',
    output             jsonb,
    attempt            integer NOT NULL DEFAULT 0,
    attempts_forgiven  integer NOT NULL DEFAULT 0,
    run_after          bigint NOT NULL,
    lease_id           uuid,
    lease_expires_at   bigint,
    worker             text,
    idempotency_key    text,
    correlation_id     text,
    created_at         bigint NOT NULL,
    updated_at         bigint NOT NULL,
    finished_at        bigint,
    terminal_reason    text,
    last_error_class   text,
    last_error_message text,
    cancel_requested   boolean NOT NULL DEFAULT false,
    retriggered_from   uuid,
    input_request      jsonb
);
-- Trigger deduplication: one run per (tenant, job, idempotency key).
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency ON runs (tenant, job, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The claim path: walks only claimable rows, in claim order.
CREATE INDEX IF NOT EXISTS runs_claim ON runs (priority DESC, run_after, id)
    WHERE status IN ('pending', 'postponed');
-- The lease reaper: only running rows.
CREATE INDEX IF NOT EXISTS runs_lease ON runs (lease_expires_at) WHERE status = 'running';
-- Listing, newest first, per tenant.
CREATE INDEX IF NOT EXISTS runs_tenant_id ON runs (tenant, id);
-- "Needs attention" (failed, needs_input) stays fast at any table size. A
-- full (tenant, status, id) index would take a new entry on every
-- transition, twice per run; this one only when a run fails or waits for a
-- person (as in the SQLite schema).
CREATE INDEX IF NOT EXISTS runs_attention ON runs (tenant, id)
    WHERE status IN ('failed', 'needs_input');

CREATE TABLE IF NOT EXISTS attempts (
    run_id        uuid NOT NULL,
    attempt       integer NOT NULL,
    lease_id      uuid NOT NULL,
    worker        text NOT NULL,
    started_at    bigint NOT NULL,
    finished_at   bigint,
    outcome       text NOT NULL,
    error_class   text,
    error_message text,
    fingerprint   text,
    failure_key   text,
    action        text,
    retry_policy  text,
    delay_ms      bigint,
    eligible_at   bigint,
    retry_reason  text,
    PRIMARY KEY (run_id, attempt)
);
-- A lease fences exactly one attempt: two attempts under one lease cannot be stored.
CREATE UNIQUE INDEX IF NOT EXISTS attempts_lease ON attempts (lease_id);

CREATE TABLE IF NOT EXISTS events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id   uuid NOT NULL,
    tenant   text NOT NULL,
    job      text NOT NULL,
    kind     text NOT NULL,
    at       bigint NOT NULL,
    attempt  integer,
    lease_id uuid,
    actor    text,
    comment  text,
    data     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);

-- Durable steps (see the SQLite schema).
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
-- Leadership that expires, of periodic tasks run on one node at a time
-- (Store::try_lead; lead.rs): renewed by its holder, taken over with a
-- larger fencing token once expired.
CREATE TABLE IF NOT EXISTS leaders (
    task       text PRIMARY KEY,
    holder     text NOT NULL,
    token      bigint NOT NULL,
    expires_at bigint NOT NULL
);
