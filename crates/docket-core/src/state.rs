//! Run states and the transition table of DESIGN.md, as code.
//!
//! Every write the store makes to a run's status is one of these transitions;
//! the store checks it with [`RunStatus::apply`] so an illegal move is a typed
//! error naming both the state and the transition, never a silent no-op.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting to be claimed once `run_after <= now`. With a future
    /// `run_after` after a failure it is shown as *retry scheduled*.
    Pending,
    /// Claimed by a worker under a live lease.
    Running,
    /// Waiting for an operator to approve or reject.
    NeedsInput,
    /// Deliberately scheduled for later; not a failure.
    Postponed,
    /// Finished successfully. Terminal.
    Completed,
    /// Ended with a terminal reason. Terminal, but an operator can retry or skip.
    Failed,
    /// Stopped by an operator or the API. Terminal.
    Cancelled,
}

impl RunStatus {
    /// Every status.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::NeedsInput,
        RunStatus::Postponed,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The snake_case name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::NeedsInput => "needs_input",
            RunStatus::Postponed => "postponed",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// `completed`, `failed` and `cancelled` are terminal.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    /// The state `t` leads to from `self`, or the reason it may not.
    pub fn apply(self, t: Transition) -> Result<RunStatus, IllegalTransition> {
        use RunStatus::*;
        use Transition::*;
        let to = match (t, self) {
            (Claim, Pending | Postponed) => Running,
            (Complete, Running) => Completed,
            (ScheduleRetry, Running) => Pending,
            (Fail, Running) => Failed,
            (Release, Running) => Pending,
            (RequestInput, Running) => NeedsInput,
            (Decide, NeedsInput) => Pending,
            (Postpone, Pending | Running | NeedsInput | Postponed) => Postponed,
            (Cancel, Pending | Running | NeedsInput | Postponed) => Cancelled,
            (OperatorRetry, Failed) => Pending,
            (OperatorSkip, Failed) => Pending,
            _ => {
                return Err(IllegalTransition {
                    from: self,
                    transition: t,
                })
            }
        };
        Ok(to)
    }

    /// Whether a run in this state may be retriggered (a new run, same input).
    pub const fn can_retrigger(self) -> bool {
        self.is_terminal()
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown run status `{s}`; expected one of pending, running, needs_input, postponed, completed, failed, cancelled")
            })
    }
}

/// A move between run states (the rows of DESIGN.md's transition table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// A worker takes the run under a new lease.
    Claim,
    /// The handler returned Ok.
    Complete,
    /// A failure the policy retries (including an expired lease).
    ScheduleRetry,
    /// A failure the policy stops on.
    Fail,
    /// A worker shutting down hands the run back without failing it.
    Release,
    /// The handler asks an operator for input.
    RequestInput,
    /// An operator approves or rejects.
    Decide,
    /// The handler or an operator postpones the run.
    Postpone,
    /// The run is cancelled (a running one at its next step boundary).
    Cancel,
    /// An operator retries a failed run.
    OperatorRetry,
    /// An operator skips the failed step of a failed run.
    OperatorSkip,
}

impl Transition {
    /// Every transition.
    pub const ALL: [Transition; 11] = [
        Transition::Claim,
        Transition::Complete,
        Transition::ScheduleRetry,
        Transition::Fail,
        Transition::Release,
        Transition::RequestInput,
        Transition::Decide,
        Transition::Postpone,
        Transition::Cancel,
        Transition::OperatorRetry,
        Transition::OperatorSkip,
    ];
}

impl Transition {
    /// What the transition does, as an operator would say it ("retry",
    /// "skip the failed step of").
    pub const fn verb(self) -> &'static str {
        match self {
            Transition::Claim => "claim",
            Transition::Complete => "complete",
            Transition::ScheduleRetry => "schedule a retry of",
            Transition::Fail => "fail",
            Transition::Release => "release",
            Transition::RequestInput => "ask for input on",
            Transition::Decide => "approve or reject",
            Transition::Postpone => "postpone",
            Transition::Cancel => "cancel",
            Transition::OperatorRetry => "retry",
            Transition::OperatorSkip => "skip the failed step of",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// A transition that the table does not allow from the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a run that is {from}", transition.verb())]
pub struct IllegalTransition {
    /// The state the run is in.
    pub from: RunStatus,
    /// The transition that was asked for.
    pub transition: Transition,
}

/// How one attempt ended, as its attempt row records it. Distinct from the
/// run's status: a `deferred` attempt (an open circuit, an action in flight
/// elsewhere) sent nothing and is not a failure, though its run goes back
/// to `pending` exactly like a failed attempt's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// Not ended yet.
    Running,
    /// The handler returned Ok.
    Completed,
    /// The handler failed (retried or not: see the run).
    Failed,
    /// Nothing was sent; rescheduled without spending budget.
    Deferred,
    /// The lease expired before the attempt ended.
    LeaseExpired,
    /// The run failed without an error of its own (e.g. its steps could not
    /// be resolved).
    Unresolved,
    /// The handler postponed the run.
    Postponed,
    /// The handler asked for input.
    NeedsInput,
    /// Stopped at a step boundary after a cancel was requested.
    Cancelled,
    /// Handed back by a worker shutting down.
    Released,
}

impl AttemptOutcome {
    /// Every outcome.
    pub const ALL: [AttemptOutcome; 10] = [
        AttemptOutcome::Running,
        AttemptOutcome::Completed,
        AttemptOutcome::Failed,
        AttemptOutcome::Deferred,
        AttemptOutcome::LeaseExpired,
        AttemptOutcome::Unresolved,
        AttemptOutcome::Postponed,
        AttemptOutcome::NeedsInput,
        AttemptOutcome::Cancelled,
        AttemptOutcome::Released,
    ];

    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Running => "running",
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Deferred => "deferred",
            AttemptOutcome::LeaseExpired => "lease_expired",
            AttemptOutcome::Unresolved => "unresolved",
            AttemptOutcome::Postponed => "postponed",
            AttemptOutcome::NeedsInput => "needs_input",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::Released => "released",
        }
    }
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttemptOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AttemptOutcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown attempt outcome `{s}`"))
    }
}

impl PartialEq<&str> for AttemptOutcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_happy_path() {
        let s = RunStatus::Pending;
        let s = s.apply(Transition::Claim).unwrap();
        assert_eq!(s, RunStatus::Running);
        assert_eq!(s.apply(Transition::Complete).unwrap(), RunStatus::Completed);
    }

    #[test]
    fn illegal_transition_names_both() {
        let err = RunStatus::Completed.apply(Transition::Claim).unwrap_err();
        assert_eq!(err.to_string(), "cannot claim a run that is completed");
        let err = RunStatus::Running
            .apply(Transition::OperatorRetry)
            .unwrap_err();
        assert_eq!(err.to_string(), "cannot retry a run that is running");
    }

    #[test]
    fn only_failed_runs_leave_a_terminal_state() {
        for from in RunStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for t in Transition::ALL {
                let ok = from.apply(t).is_ok();
                let expected = from == RunStatus::Failed
                    && matches!(t, Transition::OperatorRetry | Transition::OperatorSkip);
                assert_eq!(ok, expected, "{from} --{t}-->");
            }
        }
    }

    fn status() -> impl Strategy<Value = RunStatus> {
        proptest::sample::select(RunStatus::ALL.to_vec())
    }
    fn transition() -> impl Strategy<Value = Transition> {
        proptest::sample::select(Transition::ALL.to_vec())
    }

    proptest! {
        // Completed and cancelled are absorbing: no sequence of transitions
        // leaves them, and failed can only go back to pending by an operator.
        #[test]
        fn no_transition_out_of_completed_or_cancelled(ts in proptest::collection::vec(transition(), 0..20)) {
            for start in [RunStatus::Completed, RunStatus::Cancelled] {
                let mut s = start;
                for t in &ts {
                    if let Ok(next) = s.apply(*t) { s = next; }
                }
                prop_assert_eq!(s, start);
            }
        }

        #[test]
        fn every_accepted_transition_is_in_the_table(from in status(), t in transition()) {
            match from.apply(t) {
                Ok(to) => {
                    prop_assert!(!from.is_terminal() || from == RunStatus::Failed);
                    if from == RunStatus::Failed {
                        prop_assert_eq!(to, RunStatus::Pending);
                    }
                    if t == Transition::Claim {
                        prop_assert_eq!(to, RunStatus::Running);
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.from, from);
                    prop_assert_eq!(e.transition, t);
                }
            }
        }
    }
}
