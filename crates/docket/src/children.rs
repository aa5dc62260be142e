//! Child runs from a handler: fan-out ([`Ctx::spawn`], [`Ctx::spawn_many`])
//! and fan-in ([`Ctx::join`], [`Ctx::join_all`]). docs/DURABLE.md, "Child
//! runs", says how to use them; `docket_store::children` says how the store
//! keeps them exactly once and wakes a joining parent.

use crate::ctx::store_err;
use crate::error::Control;
use crate::{Ctx, JobError};
use docket_core::{ErrorClass, RunId, RunStatus, TerminalReason};
use docket_store::plan::child::step_child;
use docket_store::{ChildSpawn, NewRun, Run};
use serde_json::Value;
use std::collections::HashMap;

pub use docket_store::ChildPolicy;

/// How many children one spawn transaction creates at most
/// ([`Ctx::spawn_many`] splits larger fan-outs into batches of this size).
pub const SPAWN_BATCH: usize = 500;

/// Options of a spawn.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpawnOptions {
    /// What cancelling the parent does to the child (default: cancel it).
    pub policy: ChildPolicy,
    /// The child's priority (higher runs first).
    pub priority: i32,
}

/// A child run, as its parent knows it: the step name it was spawned under
/// and its id. Join it with [`Ctx::join`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChildHandle {
    /// The name given to `spawn` (the parent's step is `spawn:NAME`).
    pub name: String,
    /// The child run.
    pub run_id: RunId,
}

/// A final child, as a join returns it. What a failed or cancelled child
/// means is the parent's decision: fail, continue without it, or retry it
/// ([`Ctx::retry_child`]) and join again.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildResult {
    /// The child's handle.
    pub handle: ChildHandle,
    /// Its final status (`completed`, `failed` or `cancelled`).
    pub status: RunStatus,
    /// Its output, when it completed.
    pub output: Option<Value>,
    /// Why it failed for good, when it failed.
    pub terminal_reason: Option<TerminalReason>,
    /// Its last error's class and message, if any.
    pub error_class: Option<ErrorClass>,
    /// Its last error's message, if any.
    pub error_message: Option<String>,
}

impl ChildResult {
    fn of(handle: ChildHandle, run: &Run) -> ChildResult {
        ChildResult {
            handle,
            status: run.status,
            output: run.output.clone(),
            terminal_reason: run.terminal_reason,
            error_class: run.last_error_class,
            error_message: run.last_error_message.clone(),
        }
    }

    /// True when the child completed.
    pub fn is_completed(&self) -> bool {
        self.status == RunStatus::Completed
    }

    /// The output of a completed child, or a permanent error naming the
    /// child and how it ended (propagate it with `?` to fail the parent).
    pub fn into_output(self) -> Result<Value, JobError> {
        if self.is_completed() {
            return Ok(self.output.unwrap_or(Value::Null));
        }
        Err(JobError::permanent(format!(
            "child `{}` ({}) ended {}{}",
            self.handle.name,
            self.handle.run_id,
            self.status.as_str(),
            self.error_message
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )))
    }
}

impl Ctx {
    /// Starts a child run of `job` EXACTLY ONCE per (this run, `name`):
    /// `let h = ctx.spawn("resize-1", "resize", json!({..}), SpawnOptions::default()).await?;`.
    ///
    /// The child and the step `spawn:NAME` that holds its id are written in
    /// one transaction fenced by this attempt's lease, so a replay (after a
    /// crash or a join) finds the step and returns the same child; it never
    /// creates a second one. The child inherits this run's tenant,
    /// correlation id and trace context; its `parent_id` links it here.
    /// An unknown job (or an input over the size limit) fails this step
    /// `invalid_input`, naming the job. Names are unique within a run, like
    /// steps'.
    pub async fn spawn(
        &self,
        name: impl Into<String>,
        job: &str,
        input: Value,
        opts: SpawnOptions,
    ) -> Result<ChildHandle, JobError> {
        let mut out = self
            .spawn_many(vec![(name.into(), job.to_string(), input)], opts)
            .await?;
        Ok(out.remove(0))
    }

    /// [`Ctx::spawn`] for many children (`(name, job, input)` each), in
    /// transactions of up to [`SPAWN_BATCH`] children: a fan-out of 1,000
    /// is 2 transactions, not 1,000. Children already spawned (a replay)
    /// are found, not spawned again. Handles come back in the given order.
    pub async fn spawn_many(
        &self,
        children: Vec<(String, String, Value)>,
        opts: SpawnOptions,
    ) -> Result<Vec<ChildHandle>, JobError> {
        let mut handles: Vec<Option<ChildHandle>> = Vec::with_capacity(children.len());
        let mut todo = Vec::new();
        for (name, job, input) in children {
            let step = docket_store::plan::child::step_name(&name);
            self.claim_name(&step).await?;
            if let Some(rec) = self.stored(&step).await? {
                if let Some(run_id) = step_child(rec.result.as_ref()) {
                    handles.push(Some(ChildHandle { name, run_id }));
                    continue;
                }
            }
            if let Err(e) = self.docket.check_trigger(&job, &input) {
                let e = JobError::new(
                    ErrorClass::InvalidInput,
                    format!("spawn `{name}`: cannot start a child of job `{job}`: {e}"),
                );
                self.record_failure(&step, &e).await;
                return Err(e);
            }
            handles.push(None);
            todo.push((handles.len() - 1, name, job, input));
        }
        if !todo.is_empty() {
            self.check_cancel()?;
        }
        for batch in todo.chunks(SPAWN_BATCH) {
            let spawns = batch
                .iter()
                .map(|(_, name, job, input)| {
                    let mut run = NewRun::new(job.clone(), input.clone());
                    run.tenant = self.tenant.clone();
                    run.correlation_id = Some(self.correlation_id.clone());
                    run.priority = opts.priority;
                    run.actor = Some(format!("run:{}", self.run_id));
                    run.trace = self.trace_context();
                    ChildSpawn {
                        step: name.clone(),
                        run,
                        policy: opts.policy,
                    }
                })
                .collect();
            let spawned = self
                .docket
                .store()
                .spawn_children(self.lease(), spawns, self.now())
                .await
                .map_err(store_err)?;
            for ((i, name, _, _), s) in batch.iter().zip(spawned) {
                handles[*i] = Some(ChildHandle {
                    name: name.clone(),
                    run_id: s.run_id,
                });
            }
            self.docket.wake_workers();
        }
        Ok(handles.into_iter().flatten().collect())
    }

    /// Waits until every child in `handles` is final, then returns each
    /// one's result, in the order given.
    ///
    /// While any is open, the run suspends (propagate the error with `?`):
    /// the join is stored, the attempt ends postponed with no time of its
    /// own, and the run holds no worker slot and no lease and spends no
    /// attempt budget. The end of the last open child makes it due in that
    /// end's transaction; the handler then runs again from the top
    /// (completed steps and spawns replay) and this call returns the
    /// results. Handles that are not this run's children are ignored.
    pub async fn join(&self, handles: &[ChildHandle]) -> Result<Vec<ChildResult>, JobError> {
        if let Some(done) = self.joined(handles).await? {
            return Ok(done);
        }
        self.check_cancel()?;
        let ids: Vec<RunId> = handles.iter().map(|h| h.run_id).collect();
        let state = self
            .docket
            .store()
            .join_children(self.lease(), ids, self.now())
            .await
            .map_err(store_err)?;
        if state.waiting == 0 {
            // All ended between the read and the join: no suspension.
            if let Some(done) = self.joined(handles).await? {
                return Ok(done);
            }
        }
        Err(JobError::control(
            Control::AwaitChildren {
                waiting: state.waiting,
                of: state.of,
            },
            &format!("waiting for {} of {} children", state.waiting, state.of),
        ))
    }

    /// [`Ctx::join`] over every child this run spawned (in spawn order).
    pub async fn join_all(&self) -> Result<Vec<ChildResult>, JobError> {
        let handles: Vec<ChildHandle> = self
            .all_children()
            .await?
            .into_iter()
            .map(|(name, run)| ChildHandle {
                name,
                run_id: run.id,
            })
            .collect();
        self.join(&handles).await
    }

    /// This run's children with the names they were spawned under.
    async fn all_children(&self) -> Result<Vec<(String, Run)>, JobError> {
        let names: HashMap<RunId, String> = self
            .docket
            .store()
            .steps(self.run_id)
            .await
            .map_err(store_err)?
            .into_iter()
            .filter_map(|s| {
                let name = s.name.strip_prefix("spawn:")?.to_string();
                Some((step_child(s.result.as_ref())?, name))
            })
            .collect();
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .docket
                .store()
                .children(self.run_id, after, 1000)
                .await
                .map_err(store_err)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            let full = page.len() < 1000;
            for run in page {
                let name = names
                    .get(&run.id)
                    .cloned()
                    .unwrap_or_else(|| run.id.to_string());
                out.push((name, run));
            }
            if full {
                break;
            }
        }
        Ok(out)
    }

    /// The results when every child of `handles` is final, else `None`.
    async fn joined(&self, handles: &[ChildHandle]) -> Result<Option<Vec<ChildResult>>, JobError> {
        let runs: HashMap<RunId, Run> = self
            .all_children()
            .await?
            .into_iter()
            .map(|(_, r)| (r.id, r))
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            let Some(run) = runs.get(&h.run_id) else {
                continue; // not this run's child: ignored
            };
            if !run.status.is_terminal() {
                return Ok(None);
            }
            out.push(ChildResult::of(h.clone(), run));
        }
        Ok(Some(out))
    }
}

impl Ctx {
    /// Retries a failed child of this run (an operator retry,
    /// audited with actor `run:<parent id>`: a fresh budget, its completed
    /// steps kept), so that the next [`Ctx::join`] waits for it again:
    /// `if !r.is_completed() { ctx.retry_child(&h).await?; ctx.join(&[h]).await?; }`.
    /// A child that is not this run's, or that the operator retry refuses, is a
    /// permanent error. Bound your retries: a child that always fails
    /// would otherwise be retried on every replay.
    pub async fn retry_child(&self, child: &ChildHandle) -> Result<(), JobError> {
        let run = self
            .docket
            .store()
            .get_run(child.run_id)
            .await
            .map_err(store_err)?;
        if run.as_ref().and_then(|r| r.parent_id) != Some(self.run_id) {
            return Err(JobError::permanent(format!(
                "retry_child: {} is not a child of run {}",
                child.run_id, self.run_id
            )));
        }
        let by = crate::Actor::new(
            format!("run:{}", self.run_id),
            Some(format!("retried by its parent (child `{}`)", child.name)),
        );
        self.docket
            .retry(child.run_id, None, by)
            .await
            .map_err(|e| JobError::permanent(format!("retry_child `{}`: {e}", child.name)))?;
        self.docket.wake_workers();
        Ok(())
    }
}
