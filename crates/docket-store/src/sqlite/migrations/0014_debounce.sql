-- Docket migration 0014 (SQLite): debounced triggers (docs/FLOW_CONTROL.md,
-- "Debounce"). Released: never edit this file; change the schema with a new
-- step (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- A debounced run's key (rendered at trigger time), its mode ('first' or
-- 'last'), its window's end (exclusive) and how many later triggers were
-- collapsed into it. NULL key: not debounced.
ALTER TABLE runs ADD COLUMN debounce_key TEXT;
ALTER TABLE runs ADD COLUMN debounce_keep TEXT;
ALTER TABLE runs ADD COLUMN debounce_until INTEGER;
ALTER TABLE runs ADD COLUMN collapsed INTEGER NOT NULL DEFAULT 0;
-- 1 on the key's current window (its latest run), NULL once a later trigger
-- opened a new window. At most one current window per (tenant, job, key):
-- two triggers racing to open one cannot both succeed.
ALTER TABLE runs ADD COLUMN debounce_current INTEGER;
CREATE UNIQUE INDEX runs_debounce_current ON runs (tenant, job, debounce_key)
    WHERE debounce_current IS NOT NULL;
