//! What a claim writes, computed once for both backends, and which runs it
//! may take — both from the state machine, like every other transition.
//!
//! A claim is set-based on both backends (one statement picks and updates
//! many runs), so its picking rule is SQL: [`CLAIMABLE_SQL`], which a test
//! checks against the transition table and against the partial index the
//! claim walks.

use super::end::{EventWrite, Fill};
use crate::model::ClaimRequest;
use docket_core::{EventKind, RunStatus, Timestamp, Transition};
use serde_json::json;

/// The statuses a claim picks, as SQL: exactly those the transition table
/// lets [`Transition::Claim`] leave (see [`claimable`]).
pub const CLAIMABLE_SQL: &str = "'pending', 'postponed'";

/// The statuses [`Transition::Claim`] may leave.
pub fn claimable() -> Vec<RunStatus> {
    RunStatus::ALL
        .into_iter()
        .filter(|s| s.apply(Transition::Claim).is_ok())
        .collect()
}

/// What claiming one run writes (besides the new lease id and the attempt
/// number, which the backend draws and increments).
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimPlan {
    /// The claimed run's status.
    pub status: RunStatus,
    /// The new lease's deadline.
    pub lease_expires_at: Timestamp,
    /// The `attempt_started` event (the same for every run of the claim).
    pub event: EventWrite,
}

/// What a claim by `req` writes to each run it takes.
pub fn claim(req: &ClaimRequest) -> ClaimPlan {
    let status = RunStatus::Pending
        .apply(Transition::Claim)
        .expect("a pending run is claimable");
    let lease_expires_at = req.now.plus_millis(req.lease_ms);
    ClaimPlan {
        status,
        lease_expires_at,
        event: EventWrite {
            kind: EventKind::AttemptStarted,
            data: json!({ "worker": req.worker, "lease_expires_at": lease_expires_at }),
            fill: Fill::None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_picks_exactly_what_the_state_machine_lets_it_leave() {
        let sql: Vec<String> = claimable()
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        assert_eq!(CLAIMABLE_SQL, sql.join(", "));
        // Every claimable status leads to the same one.
        for s in claimable() {
            assert_eq!(s.apply(Transition::Claim), Ok(RunStatus::Running));
        }
    }

    #[test]
    fn the_claim_index_covers_exactly_the_claimable_runs() {
        let predicate = format!("WHERE status IN ({CLAIMABLE_SQL});");
        for schema in [
            include_str!("../sqlite/migrations/0001_initial.sql"),
            include_str!("../postgres/migrations/0001_initial.sql"),
        ] {
            let index = schema
                .split("CREATE INDEX IF NOT EXISTS runs_claim")
                .nth(1)
                .expect("the runs_claim index");
            let stmt = &index[..index.find(';').expect("a statement") + 1];
            assert!(stmt.contains(&predicate), "{stmt}");
        }
    }

    #[test]
    fn a_claim_leases_until_now_plus_the_lease_and_records_the_worker() {
        let p = claim(&ClaimRequest {
            jobs: vec!["j".into()],
            limit: 1,
            now: Timestamp(1_000),
            lease_ms: 30_000,
            worker: "w1".into(),
            tenant: None,
        });
        assert_eq!(p.status, RunStatus::Running);
        assert_eq!(p.lease_expires_at, Timestamp(31_000));
        assert_eq!(p.event.kind, EventKind::AttemptStarted);
        assert_eq!(p.event.data["worker"], json!("w1"));
    }
}
