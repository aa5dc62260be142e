-- Docket migration 0013 (SQLite): postponed runs by tenant, for the
-- `docket_runs_sleeping` gauge (SignalStore::count_sleeping). The claim's
-- partial indexes hold pending runs too and are split by concurrency key,
-- so neither can answer "the tenant's postponed runs" alone.
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

CREATE INDEX IF NOT EXISTS runs_postponed ON runs (tenant) WHERE status = 'postponed';
