-- Docket migration 0001 (PostgreSQL): runs, attempts and events (schema version 1).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs in the connection's schema
-- (search_path), inside the step's transaction under the migration advisory
-- lock, together with the schema_version bump. Steps 0001-0003 use IF NOT
-- EXISTS because schemas from before numbered steps may hold some of their
-- objects already (see migrate in postgres/mod.rs).
-- The same tables and columns as the SQLite steps. Times are BIGINT
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

