-- Docket migration 0004 (SQLite): schedules (schema version 4).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- A schedule's definition and where the scheduler stands (schedules.rs):
-- every slot at or before cursor_at has been handled. The cursor moves by
-- compare-and-set under the scheduler's fencing token.
CREATE TABLE schedules (
    tenant             TEXT NOT NULL,
    name               TEXT NOT NULL,
    job                TEXT NOT NULL,
    input              TEXT NOT NULL,
    cron               TEXT,
    every_ms           INTEGER,
    timezone           TEXT NOT NULL,
    start_at           INTEGER,
    end_at             INTEGER,
    jitter_ms          INTEGER NOT NULL,
    overlap            TEXT NOT NULL,
    catch_up           TEXT NOT NULL,
    catch_up_window_ms INTEGER NOT NULL,
    paused             INTEGER NOT NULL,
    source             TEXT NOT NULL,
    cursor_at          INTEGER NOT NULL,
    buffered_slot      INTEGER,
    last_slot          INTEGER,
    last_run_id        TEXT,
    last_fired_at      INTEGER,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    updated_by         TEXT NOT NULL,
    comment            TEXT,
    PRIMARY KEY (tenant, name)
);

-- Every handled slot (fired, caught up, backfilled, triggered, skipped with
-- its reason, buffered) and every change (created, updated, paused,
-- resumed, deleted, with who and the comment). Kept after a delete.
CREATE TABLE schedule_history (
    id       INTEGER PRIMARY KEY,
    tenant   TEXT NOT NULL,
    schedule TEXT NOT NULL,
    kind     TEXT NOT NULL,
    slot_at  INTEGER,
    at       INTEGER NOT NULL,
    run_id   TEXT,
    reason   TEXT,
    actor    TEXT,
    comment  TEXT,
    data     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX schedule_history_schedule ON schedule_history (tenant, schedule, id);
