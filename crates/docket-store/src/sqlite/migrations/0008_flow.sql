-- Docket migration 0008 (SQLite): concurrency keys (docs/FLOW_CONTROL.md).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- The key a run was given at trigger time (rendered from its job's
-- template) and the limit it carries: at most concurrency_limit runs with
-- the same key are running at once. NULL: the run has no key.
ALTER TABLE runs ADD COLUMN concurrency_key TEXT;
ALTER TABLE runs ADD COLUMN concurrency_limit INTEGER;
-- When a due run was first found held back by its key in the current
-- episode (one run_held event per episode); cleared when it is claimed.
ALTER TABLE runs ADD COLUMN held_at INTEGER;

-- Unkeyed runs keep their claim index, now without keyed runs, so that a
-- backlog of held-back keyed runs is never walked by an unkeyed claim.
DROP INDEX runs_claim;
CREATE INDEX runs_claim ON runs (priority DESC, run_after, id)
    WHERE status IN ('pending', 'postponed') AND concurrency_key IS NULL;
-- Keyed runs are claimed per key, in claim order within the key.
CREATE INDEX runs_keyed_claim ON runs (concurrency_key, priority DESC, run_after, id)
    WHERE status IN ('pending', 'postponed') AND concurrency_key IS NOT NULL;
-- A key's running runs, counted under the key's lock at each keyed claim.
CREATE INDEX runs_keyed_running ON runs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;
