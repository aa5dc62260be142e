//! What a circuit breaker's close writes besides its state
//! ([`LimitStore::breaker_change`](crate::LimitStore::breaker_change)):
//! the runs it deferred to a later time are due at once.
//!
//! While a breaker is half-open, every process but the prober defers the
//! runs it claimed to the probe's deadline (the probe's request timeout,
//! plus its reconcile's, plus 1 s). When the probe closes the breaker
//! sooner, those runs would otherwise wait out that deadline with the
//! service healthy again. The close's transaction moves them to now, once:
//! one write and one event per run per outage, as the deferral was.

use super::end::{EventWrite, Fill};
use docket_core::{EventKind, Timestamp};
use serde_json::json;

/// The most runs one close releases. Runs past it (only when more than
/// this many were deferred while the probe was out) keep their deferral:
/// they come back at the probe's deadline, as before.
pub const RELEASE_LIMIT: usize = 1_000;

/// The retry policy the engine records on a run an open breaker deferred
/// (`docket::worker`'s `circuit_breaker:NAME`): how the release finds the
/// breaker's deferrals.
pub fn deferral_policy(connection: &str) -> String {
    format!("circuit_breaker:{connection}")
}

/// The runs the close of a breaker releases, as SQL with the placeholders
/// `{policy}` ([`deferral_policy`]), `{now}` and `{limit}` in the backend's
/// syntax: pending runs whose latest attempt was deferred by the breaker
/// (`retry_reason = 'circuit_open'`) to a time after `now`, and whose
/// `run_after` is still that time (an operator who postponed or cancelled
/// one since decided otherwise). Walks the partial index
/// `attempts_circuit_open (retry_policy, eligible_at)` from `now` on.
/// Columns: run id, tenant, job, the time it was deferred to.
pub fn deferred_sql(policy: &str, now: &str, limit: &str) -> String {
    format!(
        "SELECT runs.id, runs.tenant, runs.job, attempts.eligible_at
         FROM attempts JOIN runs ON runs.id = attempts.run_id
         WHERE attempts.retry_reason = 'circuit_open' AND attempts.retry_policy = {policy}
           AND attempts.eligible_at > {now}
           AND runs.attempt = attempts.attempt AND runs.status = 'pending'
           AND runs.run_after = attempts.eligible_at
         ORDER BY attempts.eligible_at, runs.id LIMIT {limit}"
    )
}

/// The `deferral_released` event on a released run.
pub fn released_event(connection: &str, deferred_until: Timestamp) -> EventWrite {
    EventWrite {
        kind: EventKind::DeferralReleased,
        data: json!({
            "connection": connection,
            "deferred_until": deferred_until,
            "reason": "circuit_closed",
        }),
        fill: Fill::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_names_the_connection_and_the_time_it_replaces() {
        assert_eq!(deferral_policy("crm"), "circuit_breaker:crm");
        let e = released_event("crm", Timestamp(42));
        assert_eq!(e.kind, EventKind::DeferralReleased);
        assert_eq!(
            e.data,
            json!({ "connection": "crm", "deferred_until": 42, "reason": "circuit_closed" })
        );
        let sql = deferred_sql("?1", "?2", "?3");
        assert!(sql.contains("attempts.retry_policy = ?1") && sql.contains("LIMIT ?3"));
    }
}
