-- Docket migration 0009 (SQLite): shared rate limits and circuit breakers.
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- Token buckets shared by every process on the database (LimitStore::rate_take;
-- plan/rate.rs, docket_core::rate). tokens are nano-tokens at refilled_at,
-- negative while tokens are reserved ahead; per_second and burst are the
-- limit of the last take, kept for operators.
CREATE TABLE rate_buckets (
    key         TEXT PRIMARY KEY,
    tokens      INTEGER NOT NULL,
    refilled_at INTEGER NOT NULL,
    per_second  REAL NOT NULL,
    burst       INTEGER NOT NULL
);

-- A token reserved by a holder (a run) that found the bucket empty: used
-- when the holder comes back at due_at, so a run is deferred once.
CREATE TABLE rate_reservations (
    key    TEXT NOT NULL,
    holder TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    PRIMARY KEY (key, holder)
);

-- A connection's circuit breaker, shared by every process: its state as
-- JSON (docket::http::breaker), changed under the row's lock.
CREATE TABLE breakers (
    name       TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    changed_at INTEGER NOT NULL
);
