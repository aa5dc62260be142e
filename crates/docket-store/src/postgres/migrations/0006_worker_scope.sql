-- Docket migration 0006 (PostgreSQL): token scopes and registered remote
-- workers (the worker protocol, docs/WORKER_PROTOCOL.md).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs in the connection's schema
-- (search_path), inside the step's transaction under the migration advisory
-- lock, together with the schema_version bump.

-- What a token may do: `operator` (the API, never the worker protocol) or
-- `worker` (only the worker protocol, for its tenant's runs). Tokens made
-- before scopes existed keep what they could do: operator.
ALTER TABLE tokens ADD COLUMN scope text NOT NULL DEFAULT 'operator';

-- Remote workers seen by the server (a claim or a heartbeat), per tenant:
-- listed by GET /api/workers and `docket workers`. Evidence of who ran an
-- attempt stays on the attempt row; this is only the roster.
CREATE TABLE workers (
    tenant        text NOT NULL,
    name          text NOT NULL,
    jobs          text NOT NULL,
    first_seen_at bigint NOT NULL,
    last_seen_at  bigint NOT NULL,
    PRIMARY KEY (tenant, name)
);
