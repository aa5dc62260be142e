//! What each operator command writes, computed once for both backends.
//!
//! A backend locks the run, reads it (and, for [`OperatorCommand::Skip`],
//! the name of its latest failed step), calls [`operator`], and persists the
//! plan in one transaction: the run's update, the step write, the events —
//! every event carrying the operator (`actor`) and the comment.

use super::end::EventWrite;
use crate::model::{OperatorCommand, Run};
use crate::StoreError;
use docket_core::{EventKind, RunStatus, Timestamp, Transition};
use serde_json::{json, Value};

/// The run's new fields. `None`/`false` keeps the stored value.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorRunWrite {
    /// The new status (unchanged for a cancel requested of a running run).
    pub status: RunStatus,
    /// When the run is claimable again.
    pub run_after: Option<Timestamp>,
    /// The run's new variables (merged by the plan).
    pub variables: Option<Value>,
    /// The run is no longer final: clear `terminal_reason` and `finished_at`.
    pub reopen: bool,
    /// The run is now final: `finished_at` is the command's time.
    pub finish: bool,
    /// A fresh attempt budget: `attempts_forgiven` becomes `attempt`.
    pub reset_budget: bool,
    /// Clear the handler's request for input.
    pub clear_input_request: bool,
    /// Ask the running attempt to stop at its next step boundary.
    pub request_cancel: bool,
}

/// A command's write to the run's steps.
#[derive(Clone, Debug, PartialEq)]
pub enum StepWrite {
    /// Store the operator's decision as the completed step `name` (the wait
    /// for input returns it), recorded under the run's current attempt.
    Decide {
        /// `input:<wait name>`.
        name: String,
        /// `{"decision": "approved"|"rejected", "data": …}`.
        result: Value,
    },
    /// Mark the failed step `name` skipped (by the operator, with comment).
    Skip {
        /// The step.
        name: String,
    },
    /// Forget the run's failed steps, so that they run again.
    DeleteFailed,
}

/// Everything a command writes.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorPlan {
    /// The run row.
    pub run: OperatorRunWrite,
    /// The step write, if any.
    pub step: Option<StepWrite>,
    /// The events, in append order (no attempt, no lease; actor and comment).
    pub events: Vec<EventWrite>,
}

/// Whether the plan for `command` needs the run's latest failed step.
pub fn needs_failed_step(command: &OperatorCommand) -> bool {
    matches!(command, OperatorCommand::Skip)
}

fn wrong_state(run: &Run, message: String) -> StoreError {
    StoreError::WrongState {
        run_id: run.id,
        current: run.status,
        message,
    }
}

fn event(kind: EventKind, data: Value) -> EventWrite {
    EventWrite {
        kind,
        data,
        fill: super::end::Fill::None,
    }
}

/// Decides what `command` does to `run` at `now`, or why it may not.
/// `failed_step` is the run's latest failed step (read only when
/// [`needs_failed_step`]).
pub fn operator(
    run: &Run,
    command: &OperatorCommand,
    failed_step: Option<&str>,
    now: Timestamp,
) -> Result<OperatorPlan, StoreError> {
    let check = |t: Transition| {
        run.status
            .apply(t)
            .map_err(|e| wrong_state(run, e.to_string()))
    };
    let mut w = OperatorRunWrite {
        status: run.status,
        run_after: None,
        variables: None,
        reopen: false,
        finish: false,
        reset_budget: false,
        clear_input_request: false,
        request_cancel: false,
    };
    let mut step = None;
    let mut events = Vec::new();
    match command {
        OperatorCommand::Cancel => {
            let to = check(Transition::Cancel)?;
            if run.status == RunStatus::Running {
                // The attempt stops itself at its next step boundary and
                // ends `cancelled` under its own lease.
                w.request_cancel = true;
                events.push(event(
                    EventKind::CancelRequested,
                    json!({ "at_step_boundary": true }),
                ));
            } else {
                w.status = to;
                w.finish = true;
                w.clear_input_request = true;
                events.push(event(
                    EventKind::RunCancelled,
                    json!({ "from": run.status }),
                ));
            }
        }
        OperatorCommand::Postpone { until } => {
            if run.status == RunStatus::Running {
                return Err(wrong_state(run, "cannot postpone a run that is running: its handler can postpone itself, or cancel it".into()));
            }
            w.status = check(Transition::Postpone)?;
            w.run_after = Some(*until);
            w.clear_input_request = true;
            events.push(event(
                EventKind::RunPostponed,
                json!({ "until": until, "by": "operator", "from": run.status }),
            ));
        }
        OperatorCommand::Approve { data } | OperatorCommand::Reject { data } => {
            w.status = check(Transition::Decide)?;
            w.run_after = Some(now);
            w.clear_input_request = true;
            let approved = matches!(command, OperatorCommand::Approve { .. });
            let name = run
                .input_request
                .as_ref()
                .and_then(|r| r.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("input")
                .to_string();
            let decision = if approved { "approved" } else { "rejected" };
            step = Some(StepWrite::Decide {
                name: format!("input:{name}"),
                result: json!({ "decision": decision, "data": data }),
            });
            events.push(event(
                EventKind::InputReceived,
                json!({ "name": name, "decision": decision, "data": data }),
            ));
        }
        OperatorCommand::Retry { updated_variables } => {
            w.status = check(Transition::OperatorRetry)?;
            w.run_after = Some(now);
            w.variables = Some(match updated_variables {
                Some(p) => crate::merge_variables(&run.variables, p),
                None => run.variables.clone(),
            });
            w.reopen = true;
            w.reset_budget = true;
            step = Some(StepWrite::DeleteFailed);
            events.push(event(
                EventKind::OperatorRetry,
                json!({ "updated_variables": updated_variables, "previous_reason": run.terminal_reason, "fresh_attempt_budget": true }),
            ));
        }
        OperatorCommand::Skip => {
            w.status = check(Transition::OperatorSkip)?;
            let Some(name) = failed_step else {
                return Err(wrong_state(run, "the run failed outside any step, so there is no failed step to skip; retry or retrigger it".into()));
            };
            w.run_after = Some(now);
            w.reopen = true;
            w.reset_budget = true;
            step = Some(StepWrite::Skip {
                name: name.to_string(),
            });
            events.push(event(EventKind::StepSkipped, json!({ "step": name })));
            events.push(event(
                EventKind::OperatorSkip,
                json!({ "step": name, "previous_reason": run.terminal_reason }),
            ));
        }
    }
    Ok(OperatorPlan {
        run: w,
        step,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use docket_core::{RunId, TerminalReason};

    fn run(status: RunStatus) -> Run {
        let mut r: Run = serde_json::from_value(json!({
            "id": RunId(uuid::Uuid::from_u128(7)), "tenant": "t", "job": "j", "status": "pending",
            "priority": 0, "input": {}, "variables": {"a": 1, "b": 2}, "output": null, "attempt": 2,
            "attempts_forgiven": 0, "run_after": 0, "retriggered_from": null, "lease_id": null,
            "lease_expires_at": null, "worker": null, "created_at": 0, "updated_at": 0,
            "finished_at": null, "terminal_reason": null, "last_error_class": null,
            "last_error_message": null, "idempotency_key": null, "correlation_id": null,
            "input_request": {"name": "ok", "request": {}}, "cancel_requested": false
        }))
        .expect("a run");
        r.status = status;
        if status == RunStatus::Failed {
            r.terminal_reason = Some(TerminalReason::PermanentError);
        }
        r
    }

    fn kinds(p: &OperatorPlan) -> Vec<&str> {
        p.events.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn cancel_requests_a_stop_of_a_running_run_and_ends_any_other_at_once() {
        let p = operator(
            &run(RunStatus::Running),
            &OperatorCommand::Cancel,
            None,
            Timestamp(9),
        )
        .unwrap();
        assert_eq!(p.run.status, RunStatus::Running);
        assert!(p.run.request_cancel && !p.run.finish);
        assert_eq!(kinds(&p), ["cancel_requested"]);
        let p = operator(
            &run(RunStatus::NeedsInput),
            &OperatorCommand::Cancel,
            None,
            Timestamp(9),
        )
        .unwrap();
        assert_eq!(p.run.status, RunStatus::Cancelled);
        assert!(p.run.finish && p.run.clear_input_request);
        assert!(operator(
            &run(RunStatus::Completed),
            &OperatorCommand::Cancel,
            None,
            Timestamp(9)
        )
        .is_err());
    }

    #[test]
    fn retry_merges_variables_reopens_and_gives_a_fresh_budget() {
        let cmd = OperatorCommand::Retry {
            updated_variables: Some(json!({"b": 3})),
        };
        let p = operator(&run(RunStatus::Failed), &cmd, None, Timestamp(9)).unwrap();
        assert_eq!(p.run.status, RunStatus::Pending);
        assert_eq!(p.run.variables, Some(json!({"a": 1, "b": 3})));
        assert!(p.run.reopen && p.run.reset_budget);
        assert_eq!(p.step, Some(StepWrite::DeleteFailed));
        assert_eq!(
            p.events[0].data["previous_reason"],
            json!("permanent_error")
        );
        let err = operator(&run(RunStatus::Pending), &cmd, None, Timestamp(9)).unwrap_err();
        assert!(matches!(err, StoreError::WrongState { .. }), "{err}");
    }

    #[test]
    fn skip_needs_a_failed_step_and_records_two_events() {
        let r = run(RunStatus::Failed);
        assert!(needs_failed_step(&OperatorCommand::Skip));
        let err = operator(&r, &OperatorCommand::Skip, None, Timestamp(9)).unwrap_err();
        assert!(err.to_string().contains("no failed step"), "{err}");
        let p = operator(&r, &OperatorCommand::Skip, Some("charge"), Timestamp(9)).unwrap();
        assert_eq!(
            p.step,
            Some(StepWrite::Skip {
                name: "charge".into()
            })
        );
        assert_eq!(kinds(&p), ["step_skipped", "operator_skip"]);
    }

    #[test]
    fn a_decision_completes_the_wait_step_under_its_name() {
        let p = operator(
            &run(RunStatus::NeedsInput),
            &OperatorCommand::Reject {
                data: json!({"why": "no"}),
            },
            None,
            Timestamp(9),
        )
        .unwrap();
        assert_eq!(p.run.status, RunStatus::Pending);
        assert_eq!(p.run.run_after, Some(Timestamp(9)));
        match p.step {
            Some(StepWrite::Decide { name, result }) => {
                assert_eq!(name, "input:ok");
                assert_eq!(result["decision"], json!("rejected"));
            }
            other => panic!("{other:?}"),
        }
        let err = operator(
            &run(RunStatus::Running),
            &OperatorCommand::Postpone {
                until: Timestamp(99),
            },
            None,
            Timestamp(9),
        )
        .unwrap_err();
        assert!(err.to_string().contains("postpone itself"), "{err}");
    }
}
