//! What an attempt's end writes, computed once for both backends.
//!
//! A backend reads the run's fence (status, lease, attempt), then:
//! - when the end's lease still holds the run, persists [`end`]'s plan:
//!   one update of the run, one of the attempt row, the events in order;
//! - otherwise records [`refused`]'s event and writes nothing else.
//!
//! The plan is built from the end alone. The only values that depend on the
//! locked row — an expired lease's deadline and the next attempt's number —
//! are named by [`Fill`], and each backend fills them from the row it
//! locked (SQLite in Rust, PostgreSQL inside its set-based statement).

use crate::model::{AttemptEnd, Outcome};
use docket_core::{AttemptOutcome, ErrorClass, EventKind, RunStatus, Timestamp, Transition};
use serde_json::{json, Value};

/// The run's new fields. `None` keeps the stored value.
#[derive(Clone, Debug, PartialEq)]
pub struct RunWrite {
    /// The new status (always a transition out of `running`).
    pub status: RunStatus,
    /// The handler's output.
    pub output: Option<Value>,
    /// When the run is claimable again.
    pub run_after: Option<Timestamp>,
    /// Sets `finished_at` to the end's time.
    pub finished: bool,
    /// Why the run failed for good.
    pub terminal_reason: Option<&'static str>,
    /// The failure's class (the run's `last_error_class`).
    pub error_class: Option<ErrorClass>,
    /// The failure's message (the run's `last_error_message`).
    pub error_message: Option<String>,
    /// Clears a pending cancel request (the run is final).
    pub clear_cancel: bool,
    /// Attempts added to `attempts_forgiven`: an attempt that spent no
    /// budget (a deferral, a postponement, a wait for input, a release).
    pub forgive: u32,
    /// The handler's request for input.
    pub input_request: Option<Value>,
}

/// The attempt row's new fields. `None` keeps the stored value.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptWrite {
    /// How the attempt ended.
    pub outcome: AttemptOutcome,
    /// The failure's class.
    pub error_class: Option<ErrorClass>,
    /// The failure's message (or an unresolved run's detail).
    pub error_message: Option<String>,
    /// The failure's fingerprint line.
    pub fingerprint: Option<String>,
    /// The failure key.
    pub failure_key: Option<String>,
    /// The step or action that failed.
    pub action: Option<String>,
    /// The retry decision: policy name.
    pub retry_policy: Option<String>,
    /// The retry decision: delay chosen.
    pub delay_ms: Option<i64>,
    /// The retry decision (or the postponement): eligible again at.
    pub eligible_at: Option<Timestamp>,
    /// The retry decision: why this long.
    pub retry_reason: Option<docket_core::policy::RetryReason>,
}

/// A value of an event's data that only the locked run row knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The data is complete.
    None,
    /// The data is `{"lease_expires_at": <the run's lease deadline>}`.
    LeaseExpiresAt,
    /// Add `"next_attempt": <the run's attempt + 1>` to the data.
    NextAttempt,
}

impl Fill {
    /// The name PostgreSQL's statement switches on.
    pub const fn as_str(self) -> &'static str {
        match self {
            Fill::None => "",
            Fill::LeaseExpiresAt => "lease_expires_at",
            Fill::NextAttempt => "next_attempt",
        }
    }

    /// Completes `data` from the run's attempt number and lease deadline.
    pub fn apply(self, data: Value, attempt: u32, lease_expires_at: Option<Timestamp>) -> Value {
        match self {
            Fill::None => data,
            Fill::LeaseExpiresAt => json!({ "lease_expires_at": lease_expires_at }),
            Fill::NextAttempt => {
                let mut data = data;
                data["next_attempt"] = json!(attempt + 1);
                data
            }
        }
    }
}

/// An event an end appends (under the end's time, attempt and lease).
#[derive(Clone, Debug, PartialEq)]
pub struct EventWrite {
    /// Its kind.
    pub kind: EventKind,
    /// Its data, complete but for `fill`.
    pub data: Value,
    /// What the backend adds from the locked row.
    pub fill: Fill,
}

impl EventWrite {
    fn new(kind: EventKind, data: Value) -> EventWrite {
        EventWrite {
            kind,
            data,
            fill: Fill::None,
        }
    }
}

/// Everything an end whose lease holds the run writes.
#[derive(Clone, Debug, PartialEq)]
pub struct EndPlan {
    /// The run row.
    pub run: RunWrite,
    /// The attempt row.
    pub attempt: AttemptWrite,
    /// The events, in append order.
    pub events: Vec<EventWrite>,
}

/// The transition an outcome makes.
pub fn transition(outcome: &Outcome) -> Transition {
    match outcome {
        Outcome::Completed { .. } => Transition::Complete,
        Outcome::Retry { .. } => Transition::ScheduleRetry,
        Outcome::Failed { .. } => Transition::Fail,
        Outcome::Postponed { .. } => Transition::Postpone,
        Outcome::NeedsInput { .. } => Transition::RequestInput,
        Outcome::Cancelled => Transition::Cancel,
        Outcome::Released => Transition::Release,
        Outcome::AwaitingChildren { .. } => Transition::Postpone,
    }
}

/// The status an end whose lease holds the run leaves it in (every end is
/// a legal transition out of `running`, the only state an attempt ends
/// from).
pub fn status_after(outcome: &Outcome) -> RunStatus {
    RunStatus::Running
        .apply(transition(outcome))
        .expect("every attempt end is a legal transition out of running")
}

/// What `end` writes when its lease holds the run (which is then
/// `running`: the only state an attempt can end from).
pub fn end(end: &AttemptEnd) -> EndPlan {
    let status = status_after(&end.outcome);
    let mut run = RunWrite {
        status,
        output: None,
        run_after: None,
        finished: status.is_terminal(),
        terminal_reason: None,
        error_class: None,
        error_message: None,
        clear_cancel: false,
        forgive: 0,
        input_request: None,
    };
    let mut attempt = AttemptWrite {
        outcome: AttemptOutcome::Completed,
        error_class: None,
        error_message: None,
        fingerprint: None,
        failure_key: None,
        action: None,
        retry_policy: None,
        delay_ms: None,
        eligible_at: None,
        retry_reason: None,
    };
    let mut events = Vec::new();
    match &end.outcome {
        Outcome::Completed { output } => {
            run.output = Some(output.clone());
            run.clear_cancel = true;
            attempt.outcome = AttemptOutcome::Completed;
            events.push(EventWrite::new(EventKind::RunCompleted, json!({})));
        }
        Outcome::Retry { error, retry } => {
            // A deferral (an open breaker, an action in flight elsewhere)
            // sent nothing: not a failure, and no budget spent.
            let deferred = retry.reason.is_deferral();
            run.run_after = Some(retry.eligible_at);
            run.error_class = Some(error.class);
            run.error_message = Some(error.message.clone());
            run.forgive = u32::from(deferred);
            attempt.error_class = Some(error.class);
            attempt.error_message = Some(error.message.clone());
            attempt.fingerprint = Some(error.fingerprint.clone());
            attempt.failure_key = Some(error.failure_key.clone());
            attempt.action = error.action.clone();
            attempt.retry_policy = Some(retry.policy.clone());
            attempt.delay_ms = Some(retry.delay_ms);
            attempt.eligible_at = Some(retry.eligible_at);
            attempt.retry_reason = Some(retry.reason);
            attempt.outcome = if error.class == ErrorClass::LeaseExpired {
                events.push(lease_expired());
                AttemptOutcome::LeaseExpired
            } else if deferred {
                AttemptOutcome::Deferred
            } else {
                AttemptOutcome::Failed
            };
            events.push(if deferred {
                EventWrite::new(
                    EventKind::AttemptDeferred,
                    json!({ "message": error.message, "action": error.action }),
                )
            } else {
                attempt_failed(error)
            });
            events.push(EventWrite {
                kind: EventKind::RetryScheduled,
                data: json!({ "retry_policy": retry.policy, "delay_ms": retry.delay_ms,
                              "eligible_at": retry.eligible_at, "reason": retry.reason }),
                fill: Fill::NextAttempt,
            });
        }
        Outcome::Failed {
            error,
            reason,
            detail,
        } => {
            run.terminal_reason = Some(reason.as_str());
            run.clear_cancel = true;
            match error {
                Some(e) => {
                    run.error_class = Some(e.class);
                    run.error_message = Some(e.message.clone());
                    attempt.error_class = Some(e.class);
                    attempt.error_message = Some(e.message.clone());
                    attempt.fingerprint = Some(e.fingerprint.clone());
                    attempt.failure_key = Some(e.failure_key.clone());
                    attempt.action = e.action.clone();
                    attempt.outcome = if e.class == ErrorClass::LeaseExpired {
                        events.push(lease_expired());
                        AttemptOutcome::LeaseExpired
                    } else {
                        AttemptOutcome::Failed
                    };
                    events.push(attempt_failed(e));
                }
                None => {
                    run.error_message = Some(detail.clone());
                    attempt.error_message = Some(detail.clone());
                    attempt.outcome = AttemptOutcome::Unresolved;
                }
            }
            events.push(EventWrite::new(
                EventKind::RunFailed,
                json!({ "reason": reason, "detail": detail, "advice": reason.advice() }),
            ));
        }
        Outcome::Postponed { until } => {
            run.run_after = Some(*until);
            run.forgive = 1;
            attempt.outcome = AttemptOutcome::Postponed;
            attempt.eligible_at = Some(*until);
            events.push(EventWrite::new(
                EventKind::RunPostponed,
                json!({ "until": until, "by": "handler" }),
            ));
        }
        Outcome::NeedsInput { name, request } => {
            let req = json!({ "name": name, "request": request });
            run.input_request = Some(req.clone());
            run.forgive = 1;
            attempt.outcome = AttemptOutcome::NeedsInput;
            events.push(EventWrite::new(EventKind::InputRequested, req));
        }
        Outcome::Cancelled => {
            attempt.outcome = AttemptOutcome::Cancelled;
            events.push(EventWrite::new(
                EventKind::RunCancelled,
                json!({ "at_step_boundary": true }),
            ));
        }
        Outcome::AwaitingChildren { waiting, of } => {
            // run_after stays as stored: the join wrote "never" and the
            // last child's end writes "now", whichever order they commit in.
            run.forgive = 1;
            attempt.outcome = AttemptOutcome::Postponed;
            events.push(EventWrite::new(
                EventKind::WaitingForChildren,
                json!({ "waiting": waiting, "of": of }),
            ));
        }
        Outcome::Released => {
            run.run_after = Some(end.now);
            run.forgive = 1;
            attempt.outcome = AttemptOutcome::Released;
            events.push(EventWrite::new(
                EventKind::AttemptReleased,
                json!({ "reason": "worker shutdown" }),
            ));
        }
    }
    EndPlan {
        run,
        attempt,
        events,
    }
}

fn lease_expired() -> EventWrite {
    EventWrite {
        kind: EventKind::LeaseExpired,
        data: Value::Null,
        fill: Fill::LeaseExpiresAt,
    }
}

fn attempt_failed(e: &crate::model::ErrorInfo) -> EventWrite {
    EventWrite::new(
        EventKind::AttemptFailed,
        json!({ "error_class": e.class, "message": e.message,
                "fingerprint": e.fingerprint, "action": e.action }),
    )
}

/// The `stale_write_refused` event's data for an end whose lease no longer
/// holds the run: what the end tried (kept as evidence of a late report)
/// and the run as it stands. Written without an attempt number, under the
/// end's lease.
pub fn refused(
    end: &AttemptEnd,
    current_status: RunStatus,
    current_lease: Option<docket_core::LeaseId>,
    current_attempt: u32,
) -> Value {
    let mut data = refused_attempt(end);
    data["current_status"] = json!(current_status);
    data["current_lease_id"] = json!(current_lease);
    data["current_attempt"] = json!(current_attempt);
    data
}

/// The part of [`refused`] that depends on the end alone (PostgreSQL's
/// statement adds the rest from the locked row).
pub fn refused_attempt(end: &AttemptEnd) -> Value {
    let mut data = json!({ "attempted": end.outcome.name() });
    let error = match &end.outcome {
        Outcome::Retry { error, .. } => Some(error),
        Outcome::Failed { error, .. } => error.as_ref(),
        _ => None,
    };
    if let Some(e) = error {
        data["error_class"] = json!(e.class);
        data["message"] = json!(e.message);
        data["action"] = json!(e.action);
        data["fingerprint"] = json!(e.fingerprint);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ErrorInfo, RetryRecord};
    use docket_core::policy::RetryReason;
    use docket_core::{LeaseId, RunId, TerminalReason};

    fn at(outcome: Outcome) -> AttemptEnd {
        AttemptEnd {
            run_id: RunId(uuid::Uuid::from_u128(1)),
            lease_id: LeaseId(uuid::Uuid::from_u128(2)),
            now: Timestamp(5_000),
            outcome,
        }
    }

    fn error(class: ErrorClass) -> ErrorInfo {
        ErrorInfo {
            class,
            message: "boom".into(),
            fingerprint: "fp".into(),
            failure_key: "fk".into(),
            action: Some("charge".into()),
        }
    }

    fn retry(class: ErrorClass, reason: RetryReason) -> Outcome {
        Outcome::Retry {
            error: error(class),
            retry: RetryRecord {
                policy: "default".into(),
                delay_ms: 1_000,
                eligible_at: Timestamp(6_000),
                reason,
            },
        }
    }

    fn kinds(p: &EndPlan) -> Vec<&str> {
        p.events.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn every_outcome_is_a_legal_transition_out_of_running() {
        for o in [
            Outcome::Completed { output: json!(1) },
            retry(ErrorClass::Unavailable, RetryReason::Backoff),
            Outcome::Failed {
                error: None,
                reason: TerminalReason::PermanentError,
                detail: "x".into(),
            },
            Outcome::Postponed {
                until: Timestamp(1),
            },
            Outcome::NeedsInput {
                name: "n".into(),
                request: json!({}),
            },
            Outcome::Cancelled,
            Outcome::Released,
        ] {
            let to = status_after(&o);
            assert_eq!(RunStatus::Running.apply(transition(&o)), Ok(to));
            assert_eq!(end(&at(o)).run.status, to);
        }
    }

    #[test]
    fn a_deferral_is_its_own_outcome_and_spends_no_budget() {
        for reason in [RetryReason::CircuitOpen, RetryReason::ActionInFlight] {
            let p = end(&at(retry(ErrorClass::Unavailable, reason)));
            assert_eq!(p.attempt.outcome, AttemptOutcome::Deferred);
            assert_eq!(p.run.forgive, 1);
            assert_eq!(kinds(&p), ["attempt_deferred", "retry_scheduled"]);
        }
        let p = end(&at(retry(ErrorClass::Unavailable, RetryReason::Backoff)));
        assert_eq!(p.attempt.outcome, AttemptOutcome::Failed);
        assert_eq!(p.run.forgive, 0);
        assert_eq!(p.run.status, RunStatus::Pending);
        assert_eq!(p.run.run_after, Some(Timestamp(6_000)));
        assert_eq!(kinds(&p), ["attempt_failed", "retry_scheduled"]);
        assert_eq!(p.events[1].fill, Fill::NextAttempt);
    }

    #[test]
    fn an_expired_lease_records_its_deadline_from_the_row() {
        let p = end(&at(retry(ErrorClass::LeaseExpired, RetryReason::Backoff)));
        assert_eq!(p.attempt.outcome, AttemptOutcome::LeaseExpired);
        assert_eq!(
            kinds(&p),
            ["lease_expired", "attempt_failed", "retry_scheduled"]
        );
        let filled = p.events[0]
            .fill
            .apply(p.events[0].data.clone(), 3, Some(Timestamp(4_000)));
        assert_eq!(filled["lease_expires_at"], json!(Timestamp(4_000)));
        let next = p.events[2].fill.apply(p.events[2].data.clone(), 3, None);
        assert_eq!(next["next_attempt"], json!(4));
        assert_eq!(next["reason"], json!("backoff"));
    }

    #[test]
    fn final_ends_finish_the_run_and_only_final_ones_clear_a_cancel_request() {
        let failed = end(&at(Outcome::Failed {
            error: Some(error(ErrorClass::Permanent)),
            reason: TerminalReason::PermanentError,
            detail: "no".into(),
        }));
        assert_eq!(failed.run.status, RunStatus::Failed);
        assert!(failed.run.finished && failed.run.clear_cancel);
        assert_eq!(failed.run.terminal_reason, Some("permanent_error"));
        assert_eq!(kinds(&failed), ["attempt_failed", "run_failed"]);
        let unresolved = end(&at(Outcome::Failed {
            error: None,
            reason: TerminalReason::PermanentError,
            detail: "steps".into(),
        }));
        assert_eq!(unresolved.attempt.outcome, AttemptOutcome::Unresolved);
        assert_eq!(unresolved.run.error_class, None);
        assert_eq!(unresolved.run.error_message.as_deref(), Some("steps"));
        let done = end(&at(Outcome::Completed { output: json!(1) }));
        assert!(done.run.finished && done.run.clear_cancel);
        let cancelled = end(&at(Outcome::Cancelled));
        assert!(cancelled.run.finished && !cancelled.run.clear_cancel);
        for o in [
            Outcome::Postponed {
                until: Timestamp(9_000),
            },
            Outcome::NeedsInput {
                name: "ok".into(),
                request: json!({}),
            },
            Outcome::Released,
        ] {
            let p = end(&at(o));
            assert!(!p.run.finished);
            assert_eq!(p.run.forgive, 1, "{:?}", p.attempt.outcome);
        }
    }

    #[test]
    fn a_refused_end_keeps_what_it_tried_and_the_run_as_it_stands() {
        let e = at(retry(ErrorClass::RateLimited, RetryReason::RetryAfter));
        let data = refused(&e, RunStatus::Pending, None, 2);
        assert_eq!(data["attempted"], json!("retry_scheduled"));
        assert_eq!(data["error_class"], json!("rate_limited"));
        assert_eq!(data["current_status"], json!("pending"));
        assert_eq!(data["current_attempt"], json!(2));
    }
}
