-- Docket migration 0011 (PostgreSQL): child runs (fan-out and fan-in).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs in the connection's schema, inside
-- the step's transaction. Columns with constant defaults: no table rewrite.

-- The run that spawned this one (ctx.spawn), and what cancelling that
-- parent does to it: 'cancel' (cancelled with it) or 'abandon' (left
-- running). NULL for a run that is nobody's child.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS parent_id uuid;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS child_policy text;
-- true once the parent's join waits for this child: its end (to a final
-- state) then decrements the parent's join_waiting, in its statement.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS parent_waits boolean NOT NULL DEFAULT false;
-- On a joining parent: how many of the children it waits for are not
-- final yet, and how many it waits for in all (for "12 of 1,000").
ALTER TABLE runs ADD COLUMN IF NOT EXISTS join_waiting int4 NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS join_of int4 NOT NULL DEFAULT 0;
-- A parent's children, oldest first (ids are UUIDv7): listing, counting,
-- the cancel cascade.
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent_id, id) WHERE parent_id IS NOT NULL;
-- Parents suspended in a join, for the metrics gauge: only those rows.
CREATE INDEX IF NOT EXISTS runs_joining ON runs (tenant) WHERE join_waiting > 0;
