//! Operator operations on runs: cancel, postpone, approve / reject, retry
//! with updated variables, skip the failed step, retrigger. Each records who
//! did it and why, in the same transaction as the change.

use crate::{Docket, Error, Result, Run, RunId, Timestamp, Triggered};
use docket_core::RunStatus;
use docket_store::{NewRun, OperatorCommand, OperatorRequest, StoreError};
use serde_json::Value;

/// Who gives an operator command, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// Stored as the event's actor (a token's name, `cli`, …).
    pub name: String,
    /// Stored in the audit trail.
    pub comment: Option<String>,
    /// The W3C trace context the command was given in (the caller's
    /// `traceparent`): with traces on, the operator span is a child of it
    /// (linked to the run's trace) instead of a span of the run's trace.
    pub trace: Option<crate::TraceContext>,
}

impl Actor {
    /// An actor with a comment.
    pub fn new(name: impl Into<String>, comment: Option<String>) -> Actor {
        Actor {
            name: name.into(),
            comment,
            trace: None,
        }
    }

    /// The same actor, acting in the caller's trace `trace` (ignored when
    /// its `traceparent` is invalid, as the W3C recommendation says).
    pub fn with_trace(mut self, trace: Option<crate::TraceContext>) -> Actor {
        self.trace = trace.and_then(crate::telemetry::valid);
        self
    }
}

fn map_store(e: StoreError) -> Error {
    match e {
        StoreError::WrongState {
            run_id,
            current,
            message,
        } => Error::WrongState {
            run_id,
            current,
            message,
        },
        StoreError::NotFound(id) => Error::RunNotFound(id),
        e => Error::Store(e),
    }
}

impl Docket {
    async fn operate(&self, id: RunId, by: Actor, command: OperatorCommand) -> Result<Run> {
        // Traces on: the action becomes a span in the run's trace, with who
        // and why (built after the answer, which names the trace).
        let traced = self.telemetry().map(|t| {
            (
                t.clone(),
                std::time::SystemTime::now(),
                command.name(),
                by.clone(),
            )
        });
        let run = self
            .store()
            .operator(OperatorRequest {
                run_id: id,
                actor: by.name,
                comment: by.comment,
                now: self.clock().now(),
                command,
            })
            .await
            .map_err(map_store)?;
        if let Some((t, started, command, by)) = traced {
            t.operator(
                &run,
                command,
                &by.name,
                by.comment.as_deref(),
                by.trace.as_ref(),
                started,
            );
        }
        let _ = self.inner.changes.send(id);
        if run.status == RunStatus::Pending {
            self.wake_workers();
        }
        Ok(run)
    }

    /// Cancels a run: at once when pending, postponed or waiting for input;
    /// a running run stops at its next step boundary and ends `cancelled`.
    pub async fn cancel(&self, id: RunId, by: Actor) -> Result<Run> {
        self.operate(id, by, OperatorCommand::Cancel).await
    }

    /// Postpones a pending, postponed or waiting run until `until`, which
    /// must be within [`Timestamp::MIN`]..=[`Timestamp::MAX`]
    /// ([`Error::InvalidInput`] otherwise).
    pub async fn postpone(&self, id: RunId, until: Timestamp, by: Actor) -> Result<Run> {
        if !until.in_range() {
            return Err(Error::InvalidInput(format!(
                "postpone until {} ms: outside {}",
                until.as_millis(),
                crate::TIME_RANGE
            )));
        }
        self.operate(id, by, OperatorCommand::Postpone { until })
            .await
    }

    /// Approves a run waiting for input; its wait returns `Approved(data)`.
    pub async fn approve(&self, id: RunId, data: Value, by: Actor) -> Result<Run> {
        self.operate(id, by, OperatorCommand::Approve { data })
            .await
    }

    /// Rejects a run waiting for input; its wait returns `Rejected(data)`.
    pub async fn reject(&self, id: RunId, data: Value, by: Actor) -> Result<Run> {
        self.operate(id, by, OperatorCommand::Reject { data }).await
    }

    /// Retries a failed run: the same run, completed steps kept, the failed
    /// step runs again, `updated_variables` (an object) merged into the run's
    /// variables first, a fresh attempt budget.
    pub async fn retry(
        &self,
        id: RunId,
        updated_variables: Option<Value>,
        by: Actor,
    ) -> Result<Run> {
        if let Some(v) = &updated_variables {
            if !v.is_object() {
                return Err(Error::InvalidInput(
                    "updated_variables must be a JSON object".into(),
                ));
            }
        }
        self.operate(id, by, OperatorCommand::Retry { updated_variables })
            .await
    }

    /// Skips the failed step of a failed run (recorded `skipped`); the run
    /// continues past it.
    pub async fn skip(&self, id: RunId, by: Actor) -> Result<Run> {
        self.operate(id, by, OperatorCommand::Skip).await
    }

    /// A new run with the same input, validated against the job's current
    /// definition, linked to the original (which stays exactly as it was).
    /// Only failed, cancelled or completed runs can be retriggered.
    pub async fn retrigger(&self, id: RunId, by: Actor) -> Result<Triggered> {
        let original = self.get_run(id).await?;
        if !original.status.can_retrigger() {
            return Err(Error::WrongState {
                run_id: id,
                current: original.status,
                message: format!(
                    "cannot retrigger a run that is {}: only failed, cancelled or completed runs can be retriggered",
                    original.status
                ),
            });
        }
        if let Some(why) = docket_store::json::undecodable_reason(&original.input) {
            return Err(Error::InvalidInput(format!(
                "run {id}'s stored input cannot be read back ({why}), so it cannot be retriggered: trigger a new run with the input"
            )));
        }
        self.check_trigger(&original.job, &original.input)?;
        if let Some(job) = self.job(&original.job) {
            if let Some(validate) = &job.validator {
                validate(&original.input).map_err(|m| {
                    Error::InvalidInput(format!(
                        "the original input fails job `{}`'s current validation: {m}",
                        original.job
                    ))
                })?;
            }
        }
        let mut n = NewRun::new(original.job.clone(), original.input.clone());
        n.tenant = original.tenant.clone();
        n.priority = original.priority;
        n.correlation_id = original.correlation_id.clone();
        n.retriggered_from = Some(original.id);
        n.concurrency = self.concurrency_of(&n.job, &n.tenant, &n.input)?;
        n.actor = Some(by.name);
        // The new run joins the trace the command was given in (the
        // original's trace is the original's).
        n.trace = by.trace;
        if let Some(t) = self.telemetry() {
            n.trace = Some(t.trigger(&n.job, n.id, n.trace.as_ref()));
        }
        let mut out = self.store().trigger(vec![n], self.clock().now()).await?;
        self.wake_workers();
        Ok(out.remove(0))
    }
}
