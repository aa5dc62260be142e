//! The engine's side of the worker protocol (docs/WORKER_PROTOCOL.md):
//! handlers that run in another process, in any language, reached over
//! HTTP by `docket-server`.
//!
//! The server stays the one place that decides: a remote worker reports
//! what its handler did, and this module turns that into the same store
//! calls the in-process worker makes — the same claim, the same
//! [`attempt_outcome`] (retry policy, suspensions, cancels), the same
//! [`Ctx`] phases for steps and ledger-guarded actions, the same fences. A
//! remote worker cannot pick a retry delay or write under a lease it does
//! not hold: every such write is refused and recorded by the store
//! (`stale_write_refused`).

use crate::ctx::ActionStart;
use crate::error::Control;
use crate::worker::{attempt_outcome, input_check};
use crate::{Ctx, Docket, Error, Job, JobError, Reconciled, Result, Stepped};
use docket_core::{ErrorClass, RunId, RunStatus, TerminalReason, Timestamp};
use docket_store::{
    AttemptEnd, ClaimRequest, LeaseRef, Outcome, RetryRecord, Run, StepStatus, StoreError,
    WorkerSeen,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Most runs one claim hands out.
pub const MAX_CLAIM: usize = 100;
/// Longest long poll of a claim.
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(60);
/// While a long poll waits, it looks again at least this often (a lost
/// wake-up, a run that became due in another process on SQLite).
const CLAIM_RECHECK: Duration = Duration::from_secs(1);
/// When runs of the asked jobs are due but this claim did not get them
/// (another tenant's, or taken by another worker), the next look is this
/// much later, not at once.
const DUE_BLOCKED_RECHECK: Duration = Duration::from_millis(100);

/// A remote worker asks for runs.
#[derive(Clone, Debug)]
pub struct RemoteClaim {
    /// Only runs of this tenant (the worker token's); `None`: every tenant
    /// (the insecure development mode names one too).
    pub tenant: Option<String>,
    /// The worker's name, stored on each attempt.
    pub worker: String,
    /// Jobs it runs; each must be a remote job ([`Job::remote`]).
    pub jobs: Vec<String>,
    /// At most this many runs (1..=[`MAX_CLAIM`]).
    pub max: usize,
}

/// A run handed to a remote worker, with what its handler needs to know.
#[derive(Clone, Debug)]
pub struct ClaimedRun {
    /// The run as claimed (`lease_id`, `attempt`, `lease_expires_at` set).
    pub run: Run,
    /// When the handler's time runs out (claim time + the job's timeout).
    pub deadline: Timestamp,
    /// The job's handler timeout.
    pub timeout: Duration,
    /// The job's lease length (each heartbeat extends the lease by it).
    pub lease: Duration,
    /// How often to heartbeat: a third of the lease.
    pub heartbeat: Duration,
}

/// A heartbeat's answer for one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteLease {
    /// The lease.
    pub lease: LeaseRef,
    /// Still held (extended); `false`: lost, stop the handler.
    pub held: bool,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// The new expiry, when held.
    pub expires_at: Option<Timestamp>,
}

/// A failure reported by a remote handler.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteFailure {
    /// Its class (decides the retry).
    pub class: ErrorClass,
    /// The message (bounded when stored).
    pub message: String,
    /// A provider's reset time, relative to now.
    pub retry_after: Option<Duration>,
    /// The step or action that failed.
    pub action: Option<String>,
    /// The failing action's idempotency key.
    pub key: Option<String>,
}

/// How a remote handler ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RemoteEnd {
    /// It returned this output.
    Completed(Value),
    /// It failed: the job's policy decides.
    Failed(RemoteFailure),
    /// It postponed the run (not a failure).
    Postponed(Timestamp),
    /// It waits for an operator.
    NeedsInput {
        /// The wait's name (the decision is read back as step `input:NAME`).
        name: String,
        /// What it asks for.
        request: Value,
    },
}

/// What ending an attempt did.
#[derive(Clone, Debug, PartialEq)]
pub struct EndAnswer {
    /// The run's status now.
    pub status: RunStatus,
    /// The retry scheduled, if any (policy, delay, reason, eligible time).
    pub retry: Option<RetryRecord>,
    /// Why it failed for good, if it did.
    pub terminal_reason: Option<TerminalReason>,
    /// A message for the worker (a deferral's or a cancel's).
    pub message: Option<String>,
}

/// A stored step, for `steps/get`.
#[derive(Clone, Debug, PartialEq)]
pub enum StepFound {
    /// Completed with this result.
    Completed(Value),
    /// Skipped by an operator.
    Skipped(Option<String>),
    /// Not stored (or failed earlier: it runs again).
    Missing,
    /// Not stored, and an operator asked to cancel the run: no new step
    /// starts, so the server ended the attempt (the run is `cancelled`) —
    /// the same answer `actions/begin` gives.
    Ended(ActionAnswer),
}

/// The answer to an action call.
#[derive(Clone, Debug, PartialEq)]
pub enum ActionAnswer {
    /// This run completed the action before: its stored result.
    Replay(Value),
    /// An operator skipped the failed action.
    Skipped(Option<String>),
    /// Committed by another run with the same key: not sent again.
    Committed(Value),
    /// The key is held by this attempt: send the action now.
    Run,
    /// The key is held by this attempt but the outcome of the last one is
    /// unknown: reconcile first.
    Reconcile,
    /// The action is done (committed now): its result.
    Done(Value),
    /// The action failed: the error to raise in the handler.
    Failed(JobError),
    /// The server ended the attempt (a deferral or a cancel): stop.
    Ended {
        /// `deferred` or `cancelled`.
        decision: &'static str,
        /// The run's end.
        end: EndAnswer,
        /// When the run is due again (a deferral).
        until: Option<Timestamp>,
    },
}

/// What a reconcile function found, reported by a remote worker.
#[derive(Clone, Debug, PartialEq)]
pub enum RemoteReconciled {
    /// The effect landed, with this result.
    Committed(Value),
    /// It did not land: send it now.
    NotDone,
    /// Still cannot tell.
    StillUnknown,
    /// Asking failed with this error.
    Error(RemoteFailure),
    /// The action has no reconcile function.
    NoReconcile,
}

/// Wakes long polls: bumped on every trigger in this process and every
/// wake-up from other processes.
pub(crate) struct RemoteWake {
    rx: watch::Receiver<u64>,
}

impl RemoteFailure {
    fn into_job_error(self, now: Timestamp) -> JobError {
        let mut e = JobError::new(self.class, self.message);
        e.retry_after = self
            .retry_after
            .map(|d| now.plus_millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)));
        e.action = self.action;
        e.key = self.key;
        e
    }
}

fn lease_of(run: &Run) -> LeaseRef {
    LeaseRef {
        run_id: run.id,
        lease_id: run.lease_id.expect("claimed run has a lease"),
    }
}

fn heartbeat_every(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(50))
}

impl Docket {
    /// A remote job by name, or why the name cannot be claimed.
    fn remote_job(&self, name: &str) -> Result<Arc<Job>> {
        match self.job(name) {
            Some(j) if j.remote => Ok(j),
            Some(_) => Err(Error::InvalidInput(format!(
                "job `{name}` is not a remote job: it runs in the server's own worker (declare it with `remote = true` in docket.toml)"
            ))),
            None => Err(Error::UnknownJob(name.to_string())),
        }
    }

    /// Claims up to `req.max` due runs of remote jobs, at once (no wait),
    /// and records the worker in the roster. A run whose input fails the
    /// job's check is ended at once (`invalid_input`, through the policy, as
    /// in-process) and not handed out.
    pub async fn remote_claim(&self, req: &RemoteClaim) -> Result<Vec<ClaimedRun>> {
        self.remote_seen(req).await?;
        self.remote_claim_once(req).await
    }

    /// Records the claiming worker in the roster (once per claim call, not
    /// per look of a long poll).
    async fn remote_seen(&self, req: &RemoteClaim) -> Result<()> {
        for name in &req.jobs {
            self.remote_job(name)?;
        }
        if let Some(tenant) = &req.tenant {
            self.store()
                .touch_worker(WorkerSeen {
                    tenant: tenant.clone(),
                    name: req.worker.clone(),
                    jobs: Some(req.jobs.clone()),
                    now: self.clock().now(),
                })
                .await?;
        }
        Ok(())
    }

    async fn remote_claim_once(&self, req: &RemoteClaim) -> Result<Vec<ClaimedRun>> {
        let max = req.max.clamp(1, MAX_CLAIM);
        // One request per lease length. Concurrency limits are enforced by
        // the store per key, across every process, at each claim
        // (`plan::concurrency`), so nothing is counted or serialised here.
        let mut by_lease: BTreeMap<Duration, Vec<String>> = BTreeMap::new();
        for name in &req.jobs {
            let j = self.remote_job(name)?;
            by_lease.entry(j.lease).or_default().push(name.clone());
        }
        let now = self.clock().now();
        let request = |lease: Duration, jobs: Vec<String>, limit: usize| ClaimRequest {
            jobs,
            limit,
            now,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            worker: req.worker.clone(),
            tenant: req.tenant.clone(),
        };
        let claims: Vec<ClaimRequest> = by_lease
            .into_iter()
            .map(|(lease, jobs)| request(lease, jobs, max))
            .collect();
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let (_, runs) = self.store().finish_and_claim(Vec::new(), claims).await?;
        let mut out = Vec::with_capacity(runs.len());
        let mut invalid = Vec::new();
        for run in runs {
            let Some(job) = self.job(&run.job) else {
                continue;
            };
            if let Some(Err(msg)) = input_check(&job, &run) {
                let lease = lease_of(&run);
                let outcome = attempt_outcome(
                    &job,
                    &run,
                    lease.lease_id,
                    Err(JobError::invalid_input(msg)),
                    false,
                    now,
                );
                invalid.push(AttemptEnd {
                    run_id: run.id,
                    lease_id: lease.lease_id,
                    now,
                    outcome,
                });
                continue;
            }
            out.push(ClaimedRun {
                deadline: now.plus(job.timeout),
                timeout: job.timeout,
                lease: job.lease,
                heartbeat: heartbeat_every(job.lease),
                run,
            });
        }
        if !invalid.is_empty() {
            let ids: Vec<RunId> = invalid.iter().map(|e| e.run_id).collect();
            for (r, id) in self.store().finish(invalid).await?.into_iter().zip(ids) {
                if let Err(e) = r {
                    tracing::warn!(run = %id, error = %e, "could not end a run with invalid input");
                }
                let _ = self.inner.changes.send(id);
            }
        }
        Ok(out)
    }

    /// [`remote_claim`](Docket::remote_claim) as a long poll: when nothing
    /// is due, waits until a run may be (a trigger in this process, a
    /// wake-up from another, the earliest `run_after` of these jobs, at
    /// most a second between looks), `wait` passes, or `stop` resolves.
    pub async fn remote_claim_wait(
        &self,
        req: &RemoteClaim,
        wait: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Vec<ClaimedRun>> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CLAIM_WAIT);
        let mut wake = self.remote_wake().await;
        self.remote_seen(req).await?;
        tokio::pin!(stop);
        loop {
            wake.borrow_and_update();
            let runs = self.remote_claim_once(req).await?;
            if !runs.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(runs);
            }
            let now = self.clock().now();
            let next = match self.store().next_due(req.jobs.clone()).await? {
                // Due, but not ours to take (another tenant's, or claimed
                // meanwhile): look again a little later, never spin.
                Some(t) if t <= now => DUE_BLOCKED_RECHECK,
                Some(t) => Duration::from_millis(t.millis_since(now).max(1) as u64),
                None => CLAIM_RECHECK,
            }
            .min(CLAIM_RECHECK);
            let until = (tokio::time::Instant::now() + next).min(deadline);
            tokio::select! {
                _ = wake.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = &mut stop => return Ok(Vec::new()),
            }
        }
    }

    /// The long polls' wake-up channel, started on first use: one waker
    /// among the workers' (so every trigger of this process bumps it) plus
    /// the store's wake-ups from other processes. Also what a circuit
    /// breaker's copy waits on while another process's probe is out
    /// (`http::exec::watch_probe`).
    pub(crate) async fn remote_wake(&self) -> watch::Receiver<u64> {
        let wake = self
            .inner
            .remote_wake
            .get_or_init(|| async {
                let (tx, rx) = watch::channel(0u64);
                let notify = Arc::new(Notify::new());
                self.inner
                    .wakers
                    .lock()
                    .expect("wakers lock")
                    .push(notify.clone());
                let mut remote = self.store().wakeups().await.ok().flatten();
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = notify.notified() => {}
                            r = async {
                                match remote.as_mut() {
                                    Some(rx) => rx.recv().await.map(|_| ()).map_err(|e| matches!(e, tokio::sync::broadcast::error::RecvError::Closed)),
                                    None => std::future::pending().await,
                                }
                            } => {
                                if r == Err(true) {
                                    remote = None;
                                }
                            }
                        }
                        // `RemoteWake::rx` keeps the channel open while the
                        // engine lives; once it is gone, so is this task.
                        if tx.is_closed() {
                            return;
                        }
                        tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                });
                RemoteWake { rx }
            })
            .await;
        wake.rx.clone()
    }

    /// Extends the leases a remote worker holds, each by its job's lease
    /// length. A lease of another tenant's run, of a run that is not a
    /// remote job's, or unknown, answers not held (and is not extended).
    pub async fn remote_heartbeat(
        &self,
        tenant: Option<&str>,
        worker: &str,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<RemoteLease>> {
        let now = self.clock().now();
        if let Some(t) = tenant {
            self.store()
                .touch_worker(WorkerSeen {
                    tenant: t.to_string(),
                    name: worker.to_string(),
                    jobs: None,
                    now,
                })
                .await?;
        }
        let mut out: Vec<RemoteLease> = leases
            .iter()
            .map(|l| RemoteLease {
                lease: *l,
                held: false,
                cancel_requested: false,
                expires_at: None,
            })
            .collect();
        let mut groups: BTreeMap<Duration, Vec<usize>> = BTreeMap::new();
        for (i, l) in leases.iter().enumerate() {
            let Some(run) = self.store().get_run(l.run_id).await? else {
                continue;
            };
            if tenant.is_some_and(|t| t != run.tenant) {
                continue;
            }
            let Some(job) = self.job(&run.job).filter(|j| j.remote) else {
                continue;
            };
            groups.entry(job.lease).or_default().push(i);
        }
        for (len, idx) in groups {
            let expires = now.plus(len);
            let states = self
                .store()
                .heartbeat(idx.iter().map(|i| leases[*i]).collect(), expires)
                .await?;
            for (st, i) in states.into_iter().zip(idx) {
                out[i].held = st.held;
                out[i].cancel_requested = st.cancel_requested;
                out[i].expires_at = st.held.then_some(expires);
            }
        }
        Ok(out)
    }

    /// The run a remote call names, checked: in the caller's tenant (else
    /// not found, so ids do not leak), of a remote job.
    async fn remote_run(&self, tenant: Option<&str>, lease: LeaseRef) -> Result<(Run, Arc<Job>)> {
        let run = self
            .store()
            .get_run(lease.run_id)
            .await?
            .filter(|r| tenant.is_none_or(|t| t == r.tenant))
            .ok_or(Error::RunNotFound(lease.run_id))?;
        let job = self.remote_job(&run.job)?;
        Ok((run, job))
    }

    /// Refuses a call under a lease that no longer holds the run. A write
    /// call's refusal is recorded by the store itself (the fenced append
    /// fails and writes `stale_write_refused`, naming the call); a read's is
    /// only answered.
    async fn remote_fence(&self, run: &Run, lease: LeaseRef, call: Option<&str>) -> Result<()> {
        if run.status == RunStatus::Running && run.lease_id == Some(lease.lease_id) {
            return Ok(());
        }
        if let Some(call) = call {
            // Refused and recorded by the store's own fence.
            let r = self
                .store()
                .append_event(
                    lease,
                    docket_core::EventKind::Custom(format!("worker_protocol:{call}")),
                    Value::Null,
                    self.clock().now(),
                )
                .await;
            if let Err(e) = r {
                return Err(e.into());
            }
        }
        Err(StoreError::StaleLease {
            run_id: run.id,
            lease_id: lease.lease_id,
            status: run.status,
        }
        .into())
    }

    /// The attempt's context on the server, for one call: the same [`Ctx`]
    /// the in-process handler gets, so steps and actions run the same code.
    fn remote_ctx(&self, run: &Run, job: &Job, lease: LeaseRef) -> Ctx {
        Ctx {
            run_id: run.id,
            job: run.job.clone(),
            tenant: run.tenant.clone(),
            attempt: run.attempt,
            lease_id: lease.lease_id,
            idempotency_key: run.idempotency_key.clone(),
            correlation_id: run
                .correlation_id
                .clone()
                .unwrap_or_else(|| run.id.to_string()),
            deadline: self.clock().now().plus(job.timeout),
            variables: run.variables.clone(),
            cancelled: Arc::new(AtomicBool::new(run.cancel_requested)),
            docket: self.clone(),
            state: Default::default(),
            kept: Default::default(),
            // Remote attempts get no server-side span (yet): the run's
            // stored context is what their calls carry.
            trace: run.trace.clone().map_or(
                crate::telemetry::AttemptTrace::None,
                crate::telemetry::AttemptTrace::Stored,
            ),
        }
    }

    /// Stores an attempt's end computed by [`attempt_outcome`].
    async fn remote_store_end(
        &self,
        run: &Run,
        lease: LeaseRef,
        outcome: Outcome,
        now: Timestamp,
    ) -> Result<EndAnswer> {
        let (retry, terminal_reason) = match &outcome {
            Outcome::Retry { retry, .. } => (Some(retry.clone()), None),
            Outcome::Failed { reason, .. } => (None, Some(*reason)),
            _ => (None, None),
        };
        let end = AttemptEnd {
            run_id: run.id,
            lease_id: lease.lease_id,
            now,
            outcome,
        };
        let status = self
            .store()
            .finish(vec![end])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Database("no answer for the attempt's end".into()))??;
        let _ = self.inner.changes.send(run.id);
        if matches!(status, RunStatus::Pending | RunStatus::Postponed) || run.concurrency.is_some()
        {
            // A retry may be due at once, or the end freed a concurrency
            // key's slot: wake workers and long polls.
            self.wake_workers();
        }
        Ok(EndAnswer {
            status,
            retry,
            terminal_reason,
            message: None,
        })
    }

    /// Ends a remote attempt: the handler's report becomes an outcome by
    /// the same function as in-process (the job's policy decides every
    /// failure), fenced by the lease: a stale end is refused and recorded.
    pub async fn remote_end(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        end: RemoteEnd,
    ) -> Result<EndAnswer> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        let now = self.clock().now();
        let result = match end {
            RemoteEnd::Completed(v) => Ok(v),
            RemoteEnd::Failed(f) => Err(f.into_job_error(now)),
            RemoteEnd::Postponed(until) => {
                let until = until.clamp(Timestamp::MIN, Timestamp::MAX);
                Err(JobError::control(
                    Control::Postpone { until },
                    "postponed by the handler",
                ))
            }
            RemoteEnd::NeedsInput { name, request } => Err(JobError::control(
                Control::NeedsInput { name, request },
                "waiting for input",
            )),
        };
        // The run as read now: for a live lease its attempt is this
        // attempt; for a stale one the store refuses the end anyway.
        let cancel = run.cancel_requested && run.lease_id == Some(lease.lease_id);
        let outcome = attempt_outcome(&job, &run, lease.lease_id, result, cancel, now);
        self.remote_store_end(&run, lease, outcome, now).await
    }

    /// Ends the attempt because a step or action call met a suspension only
    /// the server may decide (an action in flight elsewhere, a cancel).
    async fn remote_suspend(
        &self,
        run: &Run,
        job: &Job,
        lease: LeaseRef,
        e: JobError,
    ) -> Result<ActionAnswer> {
        let now = self.clock().now();
        let (decision, until) = match e.control.as_deref() {
            Some(Control::ActionInFlight { until }) => ("deferred", Some(*until)),
            _ => ("cancelled", None),
        };
        let message = e.message.clone();
        let outcome = attempt_outcome(job, run, lease.lease_id, Err(e), false, now);
        let mut end = self.remote_store_end(run, lease, outcome, now).await?;
        end.message = Some(message);
        Ok(ActionAnswer::Ended {
            decision,
            end,
            until,
        })
    }

    /// A stored step (or `input:NAME` decision) of the attempt's run.
    pub async fn remote_step_get(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
    ) -> Result<StepFound> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, None).await?;
        let steps = self.store().steps(run.id).await?;
        Ok(match steps.into_iter().find(|s| s.name == name) {
            Some(s) if s.status == StepStatus::Completed => {
                StepFound::Completed(s.result.unwrap_or(Value::Null))
            }
            Some(s) if s.status == StepStatus::Skipped => StepFound::Skipped(s.comment),
            // As in-process (`Ctx::step`): a stored step replays even after
            // a cancel, but no new one starts. Without this a worker whose
            // steps are all new would learn of the cancel only from its
            // next heartbeat or `steps/complete`, after running the step.
            _ if run.cancel_requested => {
                let e = JobError::control(
                    Control::Cancelled,
                    "cancel requested: stopping at this step boundary",
                );
                StepFound::Ended(self.remote_suspend(&run, &job, lease, e).await?)
            }
            _ => StepFound::Missing,
        })
    }

    /// Stores a completed step (fenced). Answers whether a cancel was
    /// requested (the worker then starts no new step).
    pub async fn remote_step_complete(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
        result: Value,
    ) -> Result<bool> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some("steps/complete"))
            .await?;
        let ctx = self.remote_ctx(&run, &job, lease);
        ctx.claim_name(name).await.map_err(job_err)?;
        let st = self
            .store()
            .save_step(lease, name.to_string(), result, self.clock().now())
            .await?;
        Ok(st.cancel_requested)
    }

    /// Records a step's failure (fenced).
    pub async fn remote_step_fail(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
        failure: RemoteFailure,
    ) -> Result<()> {
        let (run, _) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some("steps/fail")).await?;
        Ok(self
            .store()
            .fail_step(
                lease,
                name.to_string(),
                failure.class,
                crate::worker::bounded(failure.message),
                self.clock().now(),
            )
            .await?)
    }

    /// Appends a `progress` or `log` event (fenced).
    pub async fn remote_event(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        kind: docket_core::EventKind,
        data: Value,
    ) -> Result<()> {
        let (run, _) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some(kind.as_str())).await?;
        Ok(self
            .store()
            .append_event(lease, kind, data, self.clock().now())
            .await?)
    }

    /// Turns a phase's answer into the protocol's: a suspension ends the
    /// attempt on the server; any other error is the handler's to raise.
    async fn remote_action_answer(
        &self,
        run: &Run,
        job: &Job,
        lease: LeaseRef,
        r: std::result::Result<ActionAnswer, JobError>,
    ) -> Result<ActionAnswer> {
        match r {
            Ok(a) => Ok(a),
            Err(e) if e.is_suspension() => self.remote_suspend(run, job, lease, e).await,
            Err(e) => Ok(ActionAnswer::Failed(e)),
        }
    }

    /// `actions/begin`: replays, finds the key committed elsewhere, takes it
    /// for this attempt (send or reconcile), or ends the attempt (in flight
    /// elsewhere, or cancelled) — [`Ctx::action`]'s first phase.
    pub async fn remote_action_begin(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
        key: &str,
    ) -> Result<ActionAnswer> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some("actions/begin"))
            .await?;
        let ctx = self.remote_ctx(&run, &job, lease);
        let r = async {
            ctx.claim_name(name).await?;
            Ok(match ctx.action_begin(name, key).await? {
                ActionStart::Replayed(Stepped::Done(v)) => ActionAnswer::Replay(v),
                ActionStart::Replayed(Stepped::Skipped { comment }) => {
                    ActionAnswer::Skipped(comment)
                }
                ActionStart::Committed(v) => ActionAnswer::Committed(v),
                ActionStart::Send => ActionAnswer::Run,
                ActionStart::Reconcile => ActionAnswer::Reconcile,
            })
        }
        .await;
        self.remote_action_answer(&run, &job, lease, r).await
    }

    /// `actions/commit`: the action was sent and answered.
    pub async fn remote_action_commit(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
        key: &str,
        result: Value,
    ) -> Result<ActionAnswer> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some("actions/commit"))
            .await?;
        let ctx = self.remote_ctx(&run, &job, lease);
        let r = ctx
            .action_commit(name, key, result.clone())
            .await
            .map(|()| ActionAnswer::Done(result));
        self.remote_action_answer(&run, &job, lease, r).await
    }

    /// `actions/fail`: sending the action failed.
    pub async fn remote_action_fail(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
        key: &str,
        failure: RemoteFailure,
    ) -> Result<ActionAnswer> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some("actions/fail")).await?;
        let ctx = self.remote_ctx(&run, &job, lease);
        let now = self.clock().now();
        let e = ctx
            .action_failed(name, key, failure.into_job_error(now))
            .await;
        self.remote_action_answer(&run, &job, lease, Err(e)).await
    }

    /// `actions/reconciled`: what the worker's reconcile function found.
    pub async fn remote_action_reconciled(
        &self,
        tenant: Option<&str>,
        lease: LeaseRef,
        name: &str,
        key: &str,
        found: RemoteReconciled,
    ) -> Result<ActionAnswer> {
        let (run, job) = self.remote_run(tenant, lease).await?;
        self.remote_fence(&run, lease, Some("actions/reconciled"))
            .await?;
        let ctx = self.remote_ctx(&run, &job, lease);
        let now = self.clock().now();
        let found = match found {
            RemoteReconciled::Committed(v) => Some(Ok(Reconciled::Committed(v))),
            RemoteReconciled::NotDone => Some(Ok(Reconciled::NotDone)),
            RemoteReconciled::StillUnknown => Some(Ok(Reconciled::StillUnknown)),
            RemoteReconciled::Error(f) => Some(Err(f.into_job_error(now))),
            RemoteReconciled::NoReconcile => None,
        };
        let r = ctx
            .action_reconciled(name, key, found)
            .await
            .map(|done| match done {
                Some(v) => ActionAnswer::Done(v),
                None => ActionAnswer::Run,
            });
        self.remote_action_answer(&run, &job, lease, r).await
    }
}

/// A step name the context refuses (empty, `input:`…) is bad input.
fn job_err(e: JobError) -> Error {
    Error::InvalidInput(e.message)
}
