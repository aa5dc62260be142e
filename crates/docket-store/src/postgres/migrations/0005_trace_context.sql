-- Docket migration 0005 (PostgreSQL): the W3C trace context a run was
-- triggered in (schema version 4 on this branch; the number is renumbered
-- on merge). Released: never edit this file; change the schema with a new
-- step (ARCHITECTURE.md, "Migrations"). Runs in the connection's schema
-- (search_path), inside the step's transaction under the migration advisory
-- lock, together with the schema_version bump.

-- Kept with the run so that an attempt next week still joins the trace of
-- the request that triggered it (docs/OBSERVABILITY.md). NULL: no context.
ALTER TABLE runs ADD COLUMN traceparent TEXT;
ALTER TABLE runs ADD COLUMN tracestate TEXT;
