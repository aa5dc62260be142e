-- Docket migration 0007 (SQLite): retention and pausing.
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- The pruner: final runs in the order they finished, per status. Only rows
-- with a finished_at are indexed, so a run enters it once, when it ends
-- (and leaves it if an operator retries it).
CREATE INDEX runs_finished ON runs (status, finished_at) WHERE finished_at IS NOT NULL;
-- Ledger pruning: rows by last write.
CREATE INDEX ledger_updated ON ledger (updated_at);

-- Paused jobs per tenant (job '*': every job of the tenant). The claim and
-- next_due skip runs that a row here covers; triggers still queue.
CREATE TABLE job_pauses (
    tenant     TEXT NOT NULL,
    job        TEXT NOT NULL,
    paused_at  INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    comment    TEXT,
    PRIMARY KEY (tenant, job)
) WITHOUT ROWID;
