-- Docket migration 0004 (PostgreSQL): schedules (schema version 4).
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- in the connection's schema, together with the schema_version bump.

-- A schedule's definition and where the scheduler stands (schedules.rs):
-- every slot at or before cursor_at has been handled. The cursor moves by
-- compare-and-set under the scheduler's fencing token.
CREATE TABLE schedules (
    tenant             text NOT NULL,
    name               text NOT NULL,
    job                text NOT NULL,
    input              jsonb NOT NULL,
    cron               text,
    every_ms           bigint,
    timezone           text NOT NULL,
    start_at           bigint,
    end_at             bigint,
    jitter_ms          bigint NOT NULL,
    overlap            text NOT NULL,
    catch_up           text NOT NULL,
    catch_up_window_ms bigint NOT NULL,
    paused             boolean NOT NULL,
    source             text NOT NULL,
    cursor_at          bigint NOT NULL,
    buffered_slot      bigint,
    last_slot          bigint,
    last_run_id        text,
    last_fired_at      bigint,
    created_at         bigint NOT NULL,
    updated_at         bigint NOT NULL,
    updated_by         text NOT NULL,
    comment            text,
    PRIMARY KEY (tenant, name)
);

-- Every handled slot (fired, caught up, backfilled, triggered, skipped with
-- its reason, buffered) and every change (created, updated, paused,
-- resumed, deleted, with who and the comment). Kept after a delete.
CREATE TABLE schedule_history (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant   text NOT NULL,
    schedule text NOT NULL,
    kind     text NOT NULL,
    slot_at  bigint,
    at       bigint NOT NULL,
    run_id   text,
    reason   text,
    actor    text,
    comment  text,
    data     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX schedule_history_schedule ON schedule_history (tenant, schedule, id);
