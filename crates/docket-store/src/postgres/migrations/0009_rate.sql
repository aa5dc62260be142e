-- Docket migration 0009 (PostgreSQL): shared rate limits and circuit breakers.
-- Released: never edit this file; change the schema with a new step
-- (ARCHITECTURE.md, "Migrations"). Runs inside the step's transaction,
-- together with the schema_version bump.

-- Token buckets shared by every process on the database (LimitStore::rate_take;
-- plan/rate.rs, docket_core::rate). tokens are nano-tokens at refilled_at,
-- negative while tokens are reserved ahead; per_second and burst are the
-- limit of the last take, kept for operators.
CREATE TABLE rate_buckets (
    key         text PRIMARY KEY,
    tokens      bigint NOT NULL,
    refilled_at bigint NOT NULL,
    per_second  double precision NOT NULL,
    burst       bigint NOT NULL
);

-- A token reserved by a holder (a run) that found the bucket empty: used
-- when the holder comes back at due_at, so a run is deferred once.
CREATE TABLE rate_reservations (
    key    text NOT NULL,
    holder text NOT NULL,
    due_at bigint NOT NULL,
    PRIMARY KEY (key, holder)
);

-- A connection's circuit breaker, shared by every process: its state as
-- JSON (docket::http::breaker), changed under the row's lock.
CREATE TABLE breakers (
    name       text PRIMARY KEY,
    state      text NOT NULL,
    changed_at bigint NOT NULL
);
