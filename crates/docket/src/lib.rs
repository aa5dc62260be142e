//! Docket: durable jobs that can explain every retry.
//!
//! A [`Docket`] holds a store (embedded SQLite by default, PostgreSQL for many
//! machines), a job registry and an injected clock. Workers claim due runs
//! under leases, run their handlers with a timeout, and record every outcome —
//! and every retry decision of the one central policy — in the same
//! transaction as the state change.
//!
//! ```
//! use docket::{Docket, Job, JobError, WorkerConfig};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), docket::Error> {
//! let docket = Docket::open("sqlite::memory:").await?;
//! docket.register(Job::new("greet", |_ctx, name: String| async move {
//!     Ok::<_, JobError>(format!("hello, {name}"))
//! }))?;
//! let run = docket.trigger("greet", serde_json::json!("Ada")).await?.run;
//! let worker = docket.worker(WorkerConfig::default()).start();
//! let done = docket.wait(run.id, Duration::from_secs(5)).await?;
//! assert_eq!(done.output, Some(serde_json::json!("hello, Ada")));
//! worker.shutdown(Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub mod bulk;
mod children;
mod ctx;
mod debounce;
mod error;
mod forensics;
pub mod http;
mod job;
mod ops;
mod rate;
pub mod remote;

pub mod schedule;
pub mod signals;

pub mod telemetry;

pub mod retention;
mod worker;

pub use children::{ChildHandle, ChildPolicy, ChildResult, SpawnOptions, SPAWN_BATCH};
pub use ctx::{intent_key, Ctx, InputDecision, Reconciled, Stepped};
pub use docket_core::forensics::{FailureRecord, PairVerdict, Severity, Verdict};
pub use docket_core::policy::RetryReason;

pub use debounce::Debounce;
pub use docket_core::debounce::Keep;
pub use docket_core::schedule::{CatchUp, Overlap};
pub use docket_core::{
    AttemptOutcome, Clock, ErrorClass, EventKind, Fingerprint, ManualClock, RetryPolicy, RunId,
    RunStatus, SystemClock, TerminalReason, TimeError, Timestamp, TIME_RANGE,
};
pub use docket_store::{
    AttemptRecord, EventFilter, EventRecord, LedgerEntry, LedgerState, Run, RunFilter, StatusCount,
    StepRecord, StepStatus, Triggered, DEFAULT_TENANT,
};
pub use docket_store::{PutOutcome, Schedule, ScheduleHistory};
pub use error::{Error, JobError, Result};
pub use forensics::{ForensicReport, JobReport, TimelineEntry, MAX_JOB_REPORT_RUNS};
pub use job::Job;
pub use ops::Actor;
pub use schedule::{
    FireTime, ScheduleCounters, ScheduleSpec, ScheduleView, Scheduler, SchedulerConfig,
    SchedulerHandle, TickReport,
};

pub use signals::{Signal, SignalOptions, Signalled};
pub use telemetry::{Telemetry, TelemetryConfig, TraceContext};
pub use worker::{ReaperHandle, Worker, WorkerConfig, WorkerHandle};

use docket_store::{DynStore, NewRun};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};

/// Default limit on a run's serialized input: 1 MiB.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 1024 * 1024;

/// The engine: store, job registry, clock and in-process wake-ups.
/// Cloning is cheap and shares everything.
#[derive(Clone)]
pub struct Docket {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: DynStore,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) jobs: RwLock<HashMap<String, Arc<Job>>>,
    /// One Notify per running worker: a trigger wakes every idle worker at
    /// once instead of at its next poll.
    pub(crate) wakers: Mutex<Vec<Arc<Notify>>>,
    /// Run changes made by this process (for `wait`).
    pub(crate) changes: broadcast::Sender<RunId>,
    pub(crate) max_input_bytes: AtomicUsize,
    /// Store failures met by this process's workers, by kind (see
    /// [`Docket::store_errors`]).
    pub(crate) store_errors: Mutex<std::collections::BTreeMap<docket_store::DbErrorKind, u64>>,
    /// Wakes the worker protocol's long polls (`remote.rs`), started by
    /// the first one.
    pub(crate) remote_wake: tokio::sync::OnceCell<remote::RemoteWake>,

    /// What this process's scheduler fired and skipped (`/metrics`).
    pub(crate) schedule_counters: Mutex<ScheduleCounters>,

    /// Traces, when on: set once, read once per trigger and attempt.
    pub(crate) telemetry: std::sync::OnceLock<Arc<Telemetry>>,
}

/// Options of one trigger.
#[derive(Clone, Debug, Default)]
pub struct TriggerOptions {
    /// A trigger with a key already used for this tenant's job returns the
    /// existing run instead of creating one.
    pub idempotency_key: Option<String>,
    /// Not before this instant.
    pub run_after: Option<Timestamp>,
    /// Higher runs first (default 0).
    pub priority: i32,
    /// Carried into the context and every event.
    pub correlation_id: Option<String>,
    /// The tenant (default `default`).
    pub tenant: Option<String>,
    /// Who triggered it (stored on the `run_triggered` event).
    pub actor: Option<String>,
    /// The W3C trace context it was triggered in (e.g. the request's
    /// `traceparent`; [`TraceContext`]). Stored with the run: every attempt
    /// joins that trace. An invalid `traceparent` is ignored, as the W3C
    /// recommendation says.
    pub trace: Option<TraceContext>,
    /// Collapse this trigger with others of the same key (replacing the
    /// job's own [`Job::debounce`], if any, for this trigger): see
    /// [`Debounce`] and docs/FLOW_CONTROL.md, "Debounce". The answer's
    /// `collapsed` says whether it was collapsed into an existing run.
    pub debounce: Option<Debounce>,
}

/// A run with its whole history.
#[derive(Clone, Debug, serde::Serialize)]
pub struct History {
    /// The run.
    pub run: Run,
    /// Its attempts, by number.
    pub attempts: Vec<AttemptRecord>,
    /// Its durable steps (completed, failed, skipped; waits as `input:NAME`).
    pub steps: Vec<StepRecord>,
    /// The ledger rows its actions last wrote.
    pub ledger: Vec<LedgerEntry>,
    /// Its events, in order.
    pub events: Vec<EventRecord>,
}

impl Docket {
    /// Opens a store by URL (`sqlite://PATH`, `sqlite::memory:`,
    /// `postgres://…`) with the system clock.
    pub async fn open(url: &str) -> Result<Docket> {
        let store = docket_store::open(url).await?;
        Ok(Self::with_store(store, Arc::new(SystemClock)))
    }

    /// An engine over an existing store and clock (tests inject a
    /// [`ManualClock`]).
    pub fn with_store(store: DynStore, clock: Arc<dyn Clock>) -> Docket {
        let (changes, _) = broadcast::channel(1024);
        Docket {
            inner: Arc::new(Inner {
                store,
                clock,
                jobs: RwLock::new(HashMap::new()),
                wakers: Mutex::new(Vec::new()),
                changes,
                max_input_bytes: AtomicUsize::new(DEFAULT_MAX_INPUT_BYTES),
                store_errors: Mutex::new(Default::default()),
                remote_wake: tokio::sync::OnceCell::new(),

                schedule_counters: Mutex::new(Default::default()),

                telemetry: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Changes the input size limit (default [`DEFAULT_MAX_INPUT_BYTES`]).
    pub fn set_max_input_bytes(&self, limit: usize) {
        self.inner.max_input_bytes.store(limit, Ordering::Relaxed);
    }

    /// Turns traces on ([`telemetry`]). Once per engine: a second call
    /// gives its `Telemetry` back.
    pub fn set_telemetry(&self, telemetry: Telemetry) -> std::result::Result<(), Telemetry> {
        self.inner
            .telemetry
            .set(Arc::new(telemetry))
            .map_err(|t| Arc::into_inner(t).expect("not shared yet"))
    }

    /// The trace exporter, when traces are on.
    pub fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        self.inner.telemetry.get()
    }

    /// The store.
    pub fn store(&self) -> &DynStore {
        &self.inner.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// Registers a job. Refused (with the rule named) when its timeout is not
    /// shorter than its lease or its policy is inconsistent.
    pub fn register(&self, mut job: Job) -> Result<()> {
        job.check().map_err(|problem| Error::InvalidJob {
            job: job.name.clone(),
            problem,
        })?;
        job.rate = job.rate_spec().map_err(|problem| Error::InvalidJob {
            job: job.name.clone(),
            problem,
        })?;
        self.inner
            .jobs
            .write()
            .expect("jobs lock")
            .insert(job.name.clone(), Arc::new(job));
        Ok(())
    }

    /// The registered job names, sorted.
    pub fn job_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .jobs
            .read()
            .expect("jobs lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Whether the job `name` is served by remote workers ([`Job::remote`]);
    /// `None` when no such job is registered.
    pub fn job_is_remote(&self, name: &str) -> Option<bool> {
        self.job(name).map(|j| j.remote)
    }

    pub(crate) fn job(&self, name: &str) -> Option<Arc<Job>> {
        self.inner
            .jobs
            .read()
            .expect("jobs lock")
            .get(name)
            .cloned()
    }

    /// Triggers a run of `job` with `input`, due now.
    pub async fn trigger(&self, job: &str, input: Value) -> Result<Triggered> {
        self.trigger_with(job, input, TriggerOptions::default())
            .await
    }

    /// Triggers a run with options. With an idempotency key already used,
    /// the existing run is returned and `existing` is true.
    pub async fn trigger_with(
        &self,
        job: &str,
        input: Value,
        opts: TriggerOptions,
    ) -> Result<Triggered> {
        let mut out = self
            .trigger_batch(vec![(job.to_string(), input, opts)])
            .await?;
        Ok(out.remove(0))
    }

    /// Triggers many runs in ONE transaction: all are created or none.
    pub async fn trigger_batch(
        &self,
        runs: Vec<(String, Value, TriggerOptions)>,
    ) -> Result<Vec<Triggered>> {
        let mut new = Vec::with_capacity(runs.len());
        for (job, input, o) in runs {
            self.check_trigger(&job, &input)?;
            if o.idempotency_key
                .as_deref()
                .is_some_and(|k| k.trim().is_empty())
            {
                // An empty key would make every keyless-looking trigger of
                // the job one run.
                return Err(Error::InvalidInput(format!(
                    "the idempotency key of a `{job}` trigger is empty: omit it, or give a key that names the intent"
                )));
            }
            if let Some(t) = o.run_after.filter(|t| !t.in_range()) {
                // Out of range it could not be shown as RFC 3339 anywhere.
                return Err(Error::InvalidInput(format!(
                    "run_after {} of a `{job}` trigger is outside {TIME_RANGE}",
                    t.as_millis()
                )));
            }
            let mut n = NewRun::new(job, input);
            n.idempotency_key = o.idempotency_key;
            n.run_after = o.run_after;
            n.priority = o.priority;
            n.correlation_id = o.correlation_id;
            n.actor = o.actor;
            n.trace = o.trace.and_then(telemetry::valid);
            if let Some(t) = self.inner.telemetry.get() {
                // The trigger's own span, in the caller's trace: the run
                // stores its context, so attempts are its children.
                n.trace = Some(t.trigger(&n.job, n.id, n.trace.as_ref()));
            }
            if let Some(t) = o.tenant {
                n.tenant = t;
            }
            n.concurrency = self.concurrency_of(&n.job, &n.tenant, &n.input)?;
            n.debounce = self.debounce_of(&n.job, &n.tenant, &n.input, o.debounce.as_ref())?;
            new.push(n);
        }
        let out = self
            .inner
            .store
            .trigger(new, self.inner.clock.now())
            .await?;
        self.wake_workers();
        Ok(out)
    }

    pub(crate) fn check_trigger(&self, job: &str, input: &Value) -> Result<()> {
        if self.job(job).is_none() {
            return Err(Error::UnknownJob(job.to_string()));
        }
        let size = serde_json::to_vec(input)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        let limit = self.inner.max_input_bytes.load(Ordering::Relaxed);
        if size > limit {
            return Err(Error::ContentTooLarge {
                job: job.to_string(),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// The concurrency key and limit a new run of `job` gets (rendered once,
    /// here, and stored on the run); a trigger whose input lacks a field
    /// the key needs is refused as `invalid_input` naming the field.
    pub(crate) fn concurrency_of(
        &self,
        job: &str,
        tenant: &str,
        input: &Value,
    ) -> Result<Option<docket_store::ConcurrencyKey>> {
        let Some(j) = self.job(job) else {
            return Ok(None);
        };
        j.concurrency_of(tenant, input)
            .map_err(|e| Error::InvalidInput(format!("`{job}` trigger: {e}")))
    }

    /// The debounce a new run of `job` gets: the trigger's own, else the
    /// job's (rendered once, here); a bad trigger debounce or an input
    /// lacking a field the key needs is refused as `invalid_input` naming
    /// the field.
    pub(crate) fn debounce_of(
        &self,
        job: &str,
        tenant: &str,
        input: &Value,
        given: Option<&Debounce>,
    ) -> Result<Option<docket_store::DebounceKey>> {
        let job_rule = self.job(job).and_then(|j| j.debounce.clone());
        let Some(rule) = given.cloned().or(job_rule) else {
            return Ok(None);
        };
        rule.render(tenant, job, input)
            .map(Some)
            .map_err(|e| Error::InvalidInput(format!("`{job}` trigger: {e}")))
    }

    /// Whether any registered job has a rate limit of its own (its tokens
    /// are taken by the driver right after each claim).
    pub(crate) fn has_job_rate_limits(&self) -> bool {
        self.any_job(|j| j.rate.is_some())
    }

    /// Whether any registered job has a concurrency limit (then an
    /// attempt's end may free a slot other workers wait for).
    pub(crate) fn has_concurrency_limits(&self) -> bool {
        self.any_job(|j| j.concurrency.is_some())
    }

    /// Whether any registered job matches `f`.
    fn any_job(&self, f: impl Fn(&Job) -> bool) -> bool {
        self.inner
            .jobs
            .read()
            .expect("jobs lock")
            .values()
            .any(|j| f(j))
    }

    pub(crate) fn wake_workers(&self) {
        for w in self.inner.wakers.lock().expect("wakers lock").iter() {
            w.notify_one();
        }
    }

    /// One run.
    pub async fn get_run(&self, id: RunId) -> Result<Run> {
        self.inner
            .store
            .get_run(id)
            .await?
            .ok_or(Error::RunNotFound(id))
    }

    /// Runs matching a filter, newest first.
    pub async fn list_runs(&self, filter: RunFilter) -> Result<Vec<Run>> {
        Ok(self.inner.store.list_runs(filter).await?)
    }

    /// The run with its attempts and events.
    pub async fn history(&self, id: RunId) -> Result<History> {
        let run = self.get_run(id).await?;
        let attempts = self.inner.store.attempts(id).await?;
        let events = self
            .inner
            .store
            .events(EventFilter {
                run_id: Some(id),
                limit: 100_000,
                ..Default::default()
            })
            .await?;
        let steps = self.inner.store.steps(id).await?;
        let ledger = self.inner.store.ledger_for_run(id).await?;
        Ok(History {
            run,
            attempts,
            steps,
            ledger,
            events,
        })
    }

    /// Waits (wall time, at most `timeout`) until the run is terminal, then
    /// returns it. Woken at once by changes this process makes; runs finished
    /// by other processes are seen by polling every 100 ms.
    pub async fn wait(&self, id: RunId, timeout: Duration) -> Result<Run> {
        self.wait_until(id, timeout, |r| r.status.is_terminal())
            .await
    }

    /// Like [`Docket::wait`], until `done` holds for the run (for example
    /// "terminal, or waiting for a person":
    /// `|r| r.status.is_terminal() || r.status == RunStatus::NeedsInput`).
    /// On timeout, `Error::WaitTimedOut` with the run as last read.
    pub async fn wait_until(
        &self,
        id: RunId,
        timeout: Duration,
        done: impl Fn(&Run) -> bool,
    ) -> Result<Run> {
        let mut rx = self.inner.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // A dropped connection or a restarting database is not the
            // run's answer: keep waiting (the deadline still holds).
            let run = match self.get_run(id).await {
                Ok(run) => Some(run),
                Err(Error::Store(e))
                    if e.is_transient() && tokio::time::Instant::now() < deadline =>
                {
                    tracing::warn!(run = %id, error = %e, "waiting for a run: the store failed a read; trying again");
                    None
                }
                Err(e) => return Err(e),
            };
            if let Some(run) = run.filter(|r| done(r)) {
                return Ok(run);
            }
            let poll = tokio::time::sleep(Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    let run = self.get_run(id).await?;
                    return if done(&run) { Ok(run) } else { Err(Error::WaitTimedOut(Box::new(run))) };
                }
                _ = poll => {}
                _ = wait_for(&mut rx, id) => {}
            }
        }
    }

    /// How many store failures this process's workers met, by kind, since
    /// it started (`/metrics`: `docket_store_errors_total{kind}`). Transient
    /// kinds (`connection`, `busy`) are waited out; the others are bugs or
    /// bad data and are logged as errors with their cause.
    pub fn store_errors(&self) -> Vec<(docket_store::DbErrorKind, u64)> {
        self.inner
            .store_errors
            .lock()
            .expect("store errors")
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect()
    }

    pub(crate) fn note_store_error(&self, e: &docket_store::StoreError) {
        if let Some(kind) = e.db_kind() {
            *self
                .inner
                .store_errors
                .lock()
                .expect("store errors")
                .entry(kind)
                .or_default() += 1;
        }
    }

    /// A worker for the registered jobs.
    pub fn worker(&self, config: WorkerConfig) -> Worker {
        Worker::new(self.clone(), config)
    }
}

async fn wait_for(rx: &mut broadcast::Receiver<RunId>, id: RunId) {
    loop {
        match rx.recv().await {
            Ok(changed) if changed == id => return,
            Ok(_) => {}
            // Missed some: re-read the run to be safe.
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}
