-- Docket migration 0016 (SQLite): what operators read of flow control, the
-- runs a closing circuit breaker releases, and the late reservations a rate
-- limit's taker may send on (docs/FLOW_CONTROL.md, "Debounce";
-- docs/RATE_LIMITS.md). Released: never edit this file; change the schema
-- with a new step (ARCHITECTURE.md, "Migrations"). Runs inside the step's
-- transaction, together with the schema_version bump.

-- Open debounce windows (GET /api/limits, docket limits, /metrics): a
-- tenant's current windows by end, so the read walks the windows that have
-- not ended instead of every key that ever had one (runs_debounce_current
-- keeps one entry per key until its run is pruned).
CREATE INDEX runs_debounce_open ON runs (tenant, debounce_until)
    WHERE debounce_current IS NOT NULL;

-- Deferrals by an open circuit breaker, per breaker (retry_policy
-- 'circuit_breaker:NAME') by the time they were deferred to: the breaker's
-- close moves the runs still waiting for a later time to now. Only ends
-- that defer for an open breaker add an entry.
CREATE INDEX attempts_circuit_open ON attempts (retry_policy, eligible_at)
    WHERE retry_reason = 'circuit_open';

-- A bucket's reservations by due time: a take that finds the bucket empty
-- looks for a reservation due a while ago and not yet used, to send on it
-- instead of letting it go to waste (plan::rate::take_over).
CREATE INDEX rate_reservations_due ON rate_reservations (key, due_at);
