-- Docket migration 0015 (SQLite): unkeyed claimable runs by due time, for
-- `next_due` (the driver's "when is the next run due"). Without it that
-- query read every claimable run (a backlog scheduled for later, or held
-- behind a key, was scanned at every idle turn, on SQLite on the writer
-- thread); with it, the first entry in due order answers. `runs_claim`
-- is ordered by tenant and priority, so it cannot.
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

CREATE INDEX IF NOT EXISTS runs_due ON runs (run_after)
    WHERE status IN ('pending', 'postponed') AND concurrency_key IS NULL;
