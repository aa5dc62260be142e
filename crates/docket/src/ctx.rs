//! What a handler knows about the attempt it runs in, and the tools that make
//! retries safe: durable steps, guarded actions, waits for a person,
//! postponement, progress and logs.

use crate::error::Control;
use crate::telemetry::TraceContext;
use crate::{Docket, JobError};
use docket_core::EventKind;
use docket_core::{ErrorClass, LeaseId, RunId, Timestamp};
use docket_store::{
    LeaseRef, LedgerBegin, LedgerEntry, LedgerState, LedgerWrite, StepRecord, StepStatus,
    StoreError,
};
use opentelemetry::KeyValue;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The context of one attempt, handed to the handler.
#[derive(Clone)]
pub struct Ctx {
    pub(crate) run_id: RunId,
    pub(crate) job: String,
    pub(crate) tenant: String,
    pub(crate) attempt: u32,
    pub(crate) lease_id: LeaseId,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) correlation_id: String,
    pub(crate) deadline: Timestamp,
    pub(crate) variables: Value,
    pub(crate) cancelled: Arc<AtomicBool>,
    pub(crate) docket: Docket,
    pub(crate) state: Arc<tokio::sync::Mutex<StepState>>,
    /// Events the store could not take when the handler recorded them;
    /// written before the attempt's end (see [`Ctx::record_event`]).
    pub(crate) kept: Arc<std::sync::Mutex<Vec<KeptEvent>>>,
    /// The attempt's trace (docs/OBSERVABILITY.md).
    pub(crate) trace: crate::telemetry::AttemptTrace,
}

/// An event kept for the attempt's end: the store failed when the handler
/// recorded it.
#[derive(Clone, Debug)]
pub(crate) struct KeptEvent {
    pub(crate) kind: EventKind,
    pub(crate) data: Value,
    pub(crate) at: Timestamp,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("run_id", &self.run_id)
            .field("job", &self.job)
            .field("attempt", &self.attempt)
            .field("lease_id", &self.lease_id)
            .finish_non_exhaustive()
    }
}

/// Steps loaded once per attempt, and the names this attempt used.
#[derive(Default)]
pub(crate) struct StepState {
    loaded: Option<HashMap<String, StepRecord>>,
    used: HashSet<String>,
}

/// What a durable step gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Stepped<T> {
    /// The step's result: computed now, or stored by an earlier attempt.
    Done(T),
    /// An operator skipped this step after it failed; the run continues
    /// past it without a result.
    Skipped {
        /// The operator's comment.
        comment: Option<String>,
    },
}

impl<T> Stepped<T> {
    /// The result, or `None` when skipped.
    pub fn into_option(self) -> Option<T> {
        match self {
            Stepped::Done(v) => Some(v),
            Stepped::Skipped { .. } => None,
        }
    }

    /// True when an operator skipped the step.
    pub fn is_skipped(&self) -> bool {
        matches!(self, Stepped::Skipped { .. })
    }
}

/// An operator's answer to [`Ctx::wait_for_input`].
#[derive(Clone, Debug, PartialEq)]
pub enum InputDecision {
    /// Approved, with the operator's data.
    Approved(Value),
    /// Rejected, with the operator's data. What that means is the handler's
    /// call: nothing fails or retries by itself.
    Rejected(Value),
}

/// What the first phase of an action found ([`Ctx::action_begin`]).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ActionStart {
    /// This run already completed (or an operator skipped) the step.
    Replayed(Stepped<Value>),
    /// Committed by another run with the same key (a duplicate dispatch):
    /// not sent again; the step is stored with this result.
    Committed(Value),
    /// The key is held by this attempt: send the action.
    Send,
    /// The key is held by this attempt, but the last attempt left the
    /// outcome unknown: reconcile before sending.
    Reconcile,
}

/// A reconcile function's finding about an action whose outcome was unknown.
#[derive(Clone, Debug, PartialEq)]
pub enum Reconciled {
    /// The effect landed; here is its result. The action is not repeated.
    Committed(Value),
    /// The effect did not land; the action runs again (same key).
    NotDone,
    /// Still cannot tell; the attempt fails `timeout` and the policy
    /// schedules a retry, which reconciles again.
    StillUnknown,
}

/// Builds an idempotency key from business intent, e.g.
/// `intent_key(["prospect-7ca677ed25d3", "send-email", "campaign-9", "v1"])`
/// → `"prospect-7ca677ed25d3/send-email/campaign-9/v1"`. Stable across
/// attempts by construction; never put the attempt number, run id, a fresh
/// uuid or a timestamp in it (see docs/DURABLE.md for the unsafe shapes).
pub fn intent_key<I, S>(parts: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    parts
        .into_iter()
        .map(|p| p.as_ref().replace('%', "%25").replace('/', "%2F"))
        .collect::<Vec<_>>()
        .join("/")
}

pub(crate) fn store_err(e: StoreError) -> JobError {
    match e {
        // The attempt lost its lease: nothing it does will be recorded.
        StoreError::StaleLease { .. } => JobError::new(ErrorClass::LeaseExpired, e.to_string()),
        StoreError::Conflict(m) => JobError::permanent(m),
        // A value nested too deep to be stored and read back: the same
        // value fails the same way on every attempt, so it is terminal.
        e @ StoreError::TooDeep { .. } => JobError::new(ErrorClass::ContentTooLarge, e.to_string()),
        e => JobError::unavailable(format!("store: {e}")),
    }
}

impl Ctx {
    /// The run.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }
    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }
    /// The run's tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
    /// This attempt's number (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The lease fencing this attempt's writes.
    pub fn lease_id(&self) -> LeaseId {
        self.lease_id
    }
    /// The run's idempotency key, stable across attempts, if it was triggered
    /// with one.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
    /// The correlation id (the trigger's, or the run id): attach it to every
    /// outbound request.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
    /// The W3C trace context to send on this attempt's outgoing calls
    /// (`traceparent`, `tracestate`): the attempt span's when traces are on,
    /// else the one the run was triggered in, if any. HTTP jobs send it.
    pub fn trace_context(&self) -> Option<TraceContext> {
        self.trace.headers()
    }
    /// The attempt's OpenTelemetry context (its span), for a client that
    /// propagates or parents spans itself; empty when traces are off.
    pub fn otel_context(&self) -> opentelemetry::Context {
        self.trace.otel()
    }
    /// When the handler's timeout runs out (injected clock).
    pub fn deadline(&self) -> Timestamp {
        self.deadline
    }
    /// The run's variables (merged by operator retries).
    pub fn variables(&self) -> &Value {
        &self.variables
    }
    /// True once a cancel was requested or the lease was lost: long work
    /// should stop at its next safe point. Steps check it at every boundary.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn lease(&self) -> LeaseRef {
        LeaseRef {
            run_id: self.run_id,
            lease_id: self.lease_id,
        }
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.docket.clock().now()
    }

    pub(crate) async fn stored(&self, name: &str) -> Result<Option<StepRecord>, JobError> {
        let mut st = self.state.lock().await;
        if st.loaded.is_none() {
            let steps = self
                .docket
                .store()
                .steps(self.run_id)
                .await
                .map_err(store_err)?;
            st.loaded = Some(steps.into_iter().map(|s| (s.name.clone(), s)).collect());
        }
        Ok(st.loaded.as_ref().and_then(|m| m.get(name).cloned()))
    }

    pub(crate) async fn claim_name(&self, name: &str) -> Result<(), JobError> {
        if name.is_empty() || name.starts_with("input:") {
            return Err(JobError::permanent(format!(
                "invalid step name `{name}`: it must be non-empty and must not start with `input:`"
            )));
        }
        if !self.state.lock().await.used.insert(name.to_string()) {
            return Err(JobError::permanent(format!(
                "step `{name}` is used twice in run {}: step names must be unique within a run (build them from loop indices, e.g. `batch-{{i}}`)",
                self.run_id
            )));
        }
        Ok(())
    }

    /// Claims the first unused name `{prefix}{n}` (n = 1, 2, …) in this
    /// attempt: the n-th numbered wait of a kind (signal waits), the same
    /// n on every replay as long as the handler makes its waits in the
    /// same order.
    pub(crate) async fn claim_numbered(&self, prefix: &str) -> String {
        let mut st = self.state.lock().await;
        let mut n = 1u32;
        loop {
            let name = format!("{prefix}{n}");
            if st.used.insert(name.clone()) {
                return name;
            }
            n += 1;
        }
    }

    pub(crate) fn check_cancel(&self) -> Result<(), JobError> {
        if self.is_cancelled() {
            return Err(JobError::control(
                Control::Cancelled,
                "cancel requested: stopping at this step boundary",
            ));
        }
        Ok(())
    }

    async fn save(&self, name: &str, value: Value) -> Result<(), JobError> {
        let st = self
            .docket
            .store()
            .save_step(self.lease(), name.to_string(), value, self.now())
            .await
            .map_err(store_err)?;
        if st.cancel_requested {
            self.cancelled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    pub(crate) async fn record_failure(&self, name: &str, e: &JobError) {
        if e.is_suspension() {
            return;
        }
        if let Err(err) = self
            .docket
            .store()
            .fail_step(
                self.lease(),
                name.to_string(),
                e.class,
                e.message.clone(),
                self.now(),
            )
            .await
        {
            tracing::warn!(run = %self.run_id, step = name, error = %err, "could not record the step's failure");
        }
    }

    /// A durable step. Its result is stored when it completes (with a
    /// `step_completed` event, in one transaction); on every later attempt of
    /// this run the stored result is returned and `f` is not called. A
    /// failure is recorded `step_failed` with its class, and the run then
    /// goes through the retry policy. No new step starts once a cancel was
    /// requested.
    pub async fn step<T, F, Fut>(
        &self,
        name: impl Into<String>,
        f: F,
    ) -> Result<Stepped<T>, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
    {
        let name = name.into();
        let span = self.trace.child(|| {
            (
                format!("docket step {name}"),
                vec![KeyValue::new("docket.step", name.clone())],
            )
        });
        let out = self.step_inner(name, f).await;
        crate::telemetry::end_stepped(span, &out);
        out
    }

    async fn step_inner<T, F, Fut>(&self, name: String, f: F) -> Result<Stepped<T>, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
    {
        self.claim_name(&name).await?;
        if let Some(done) = self.replay::<T>(&name).await? {
            return Ok(done);
        }
        self.check_cancel()?;
        match f().await {
            Ok(v) => {
                let value = serde_json::to_value(&v).map_err(|e| {
                    JobError::permanent(format!("step `{name}`: result cannot be stored: {e}"))
                })?;
                self.save(&name, value).await?;
                Ok(Stepped::Done(v))
            }
            Err(e) => {
                self.record_failure(&name, &e).await;
                Err(e.in_action(name))
            }
        }
    }

    /// A stored completed or skipped step, if any.
    async fn replay<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<Stepped<T>>, JobError> {
        match self.stored(name).await? {
            Some(rec) if rec.status == StepStatus::Completed => {
                let v = serde_json::from_value(rec.result.unwrap_or(Value::Null)).map_err(|e| {
                    JobError::permanent(format!(
                        "step `{name}`: stored result does not fit the type asked for: {e}"
                    ))
                })?;
                Ok(Some(Stepped::Done(v)))
            }
            Some(rec) if rec.status == StepStatus::Skipped => Ok(Some(Stepped::Skipped {
                comment: rec.comment,
            })),
            _ => Ok(None),
        }
    }

    /// A side effect guarded by the ledger. Without a reconcile function, an
    /// outcome left unknown (a timeout, a crash mid-call) fails the run
    /// `permanent_error` asking an operator to check the remote side; use
    /// [`Ctx::action_with_reconcile`] when the remote side can be asked.
    pub async fn action<T, F, Fut>(
        &self,
        name: impl Into<String>,
        idempotency_key: impl Into<String>,
        f: F,
    ) -> Result<Stepped<T>, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
    {
        self.action_inner(
            name.into(),
            idempotency_key.into(),
            None::<fn(String) -> std::future::Ready<Result<Reconciled, JobError>>>,
            None,
            f,
        )
        .await
    }

    /// A side effect guarded by the ledger, with a reconcile function.
    ///
    /// - `started` is written before `f` runs, `committed` with its result after;
    /// - a failure is recorded `failed_retryable` or `failed_terminal`; a
    ///   timeout (of `timeout`, or class `timeout`) leaves `unknown`, and so
    ///   does an attempt that died with the action `started`;
    /// - the next attempt that meets `unknown` calls `reconcile(key)` before
    ///   anything else: [`Reconciled::Committed`] stores the result without
    ///   repeating the effect, [`Reconciled::NotDone`] runs `f` again with the
    ///   same key, [`Reconciled::StillUnknown`] fails the attempt `timeout`
    ///   so the policy schedules a retry;
    /// - a `committed` action never runs again, also from another run with the
    ///   same key (a duplicate dispatch): the stored result is returned and a
    ///   `duplicate_suppressed` event recorded.
    ///
    /// `f` and `reconcile` receive the idempotency key: send it with the
    /// request (e.g. an `Idempotency-Key` header).
    pub async fn action_with_reconcile<T, F, Fut, R, RFut>(
        &self,
        name: impl Into<String>,
        idempotency_key: impl Into<String>,
        timeout: Option<Duration>,
        reconcile: R,
        f: F,
    ) -> Result<Stepped<T>, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
        R: FnOnce(String) -> RFut,
        RFut: Future<Output = Result<Reconciled, JobError>>,
    {
        self.action_inner(
            name.into(),
            idempotency_key.into(),
            Some(reconcile),
            timeout,
            f,
        )
        .await
    }

    async fn ledger(
        &self,
        name: &str,
        key: &str,
        state: LedgerState,
        result: Option<Value>,
        err: Option<&JobError>,
        event: EventKind,
    ) -> Result<(), StoreError> {
        self.docket
            .store()
            .ledger_write(
                self.lease(),
                LedgerWrite {
                    tenant: self.tenant.clone(),
                    idempotency_key: key.to_string(),
                    action: name.to_string(),
                    state,
                    result,
                    error_class: err.map(|e| e.class),
                    error_message: err.map(|e| e.message.clone()),
                },
                event,
                self.now(),
            )
            .await
    }

    async fn action_inner<T, F, Fut, R, RFut>(
        &self,
        name: String,
        key: String,
        reconcile: Option<R>,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<Stepped<T>, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
        R: FnOnce(String) -> RFut,
        RFut: Future<Output = Result<Reconciled, JobError>>,
    {
        let span = self.trace.child(|| {
            (
                format!("docket action {name}"),
                vec![
                    KeyValue::new("docket.action", name.clone()),
                    KeyValue::new("docket.idempotency_key", key.clone()),
                ],
            )
        });
        let out = self
            .guarded_action(name, key, reconcile, timeout, f, span.as_ref())
            .await;
        crate::telemetry::end_stepped(span, &out);
        out
    }

    async fn guarded_action<T, F, Fut, R, RFut>(
        &self,
        name: String,
        key: String,
        reconcile: Option<R>,
        timeout: Option<Duration>,
        f: F,
        span: Option<&opentelemetry::Context>,
    ) -> Result<Stepped<T>, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
        R: FnOnce(String) -> RFut,
        RFut: Future<Output = Result<Reconciled, JobError>>,
    {
        self.claim_name(&name).await?;
        let decode = |v: Value, how: &str| -> Result<T, JobError> {
            serde_json::from_value(v).map_err(|e| {
                JobError::permanent(format!(
                    "action `{name}`: {how} result does not fit the type asked for: {e}"
                ))
            })
        };
        let start = self.action_begin(&name, &key).await?;
        crate::telemetry::note(
            span,
            "docket.ledger.begin",
            match &start {
                ActionStart::Replayed(_) => "replayed",
                ActionStart::Committed(_) => "committed",
                ActionStart::Send => "acquired",
                ActionStart::Reconcile => "acquired_to_reconcile",
            },
        );
        match start {
            ActionStart::Replayed(Stepped::Done(v)) => {
                return Ok(Stepped::Done(decode(v, "the stored")?))
            }
            ActionStart::Replayed(Stepped::Skipped { comment }) => {
                return Ok(Stepped::Skipped { comment })
            }
            ActionStart::Committed(v) => return Ok(Stepped::Done(decode(v, "the stored")?)),
            ActionStart::Send => {}
            ActionStart::Reconcile => {
                let found = match reconcile {
                    Some(reconcile) => Some(reconcile(key.clone()).await),
                    None => None,
                };
                crate::telemetry::note(
                    span,
                    "docket.reconcile",
                    match &found {
                        Some(Ok(Reconciled::Committed(_))) => "committed",
                        Some(Ok(Reconciled::NotDone)) => "not_done",
                        Some(Ok(Reconciled::StillUnknown)) => "still_unknown",
                        Some(Err(_)) => "failed",
                        None => "no_reconcile_function",
                    },
                );
                if let Some(v) = self.action_reconciled(&name, &key, found).await? {
                    return Ok(Stepped::Done(decode(v, "the reconciled")?));
                }
            }
        }
        let res = match timeout {
            Some(t) => match tokio::time::timeout(t, f(key.clone())).await {
                Ok(r) => r,
                Err(_) => Err(JobError::timeout(format!(
                    "action `{name}` did not answer within {t:?}"
                ))),
            },
            None => f(key.clone()).await,
        };
        match res {
            Ok(v) => {
                let value = serde_json::to_value(&v).map_err(|e| {
                    JobError::permanent(format!("action `{name}`: result cannot be stored: {e}"))
                })?;
                self.action_commit(&name, &key, value).await?;
                Ok(Stepped::Done(v))
            }
            Err(e) => Err(self.action_failed(&name, &key, e).await),
        }
    }

    /// The first phase of an action (for [`Ctx::action`] and for remote
    /// workers, which run the phases as separate calls): a stored step is
    /// replayed; otherwise one transaction decides who may send (the key is
    /// taken for this attempt, or it is committed, or another live attempt
    /// is sending: an `ActionInFlight` deferral). The action's name must be
    /// claimed by the caller.
    pub(crate) async fn action_begin(
        &self,
        name: &str,
        key: &str,
    ) -> Result<ActionStart, JobError> {
        if key.is_empty() {
            return Err(JobError::permanent(format!(
                "action `{name}`: the idempotency key is empty"
            )));
        }
        if let Some(done) = self.replay::<Value>(name).await? {
            return Ok(ActionStart::Replayed(done));
        }
        self.check_cancel()?;
        // One transaction decides who may send: the key is taken for this
        // attempt, or it is committed, or another live attempt is sending.
        let begin = self
            .docket
            .store()
            .ledger_begin(self.lease(), key.to_string(), name.to_string(), self.now())
            .await
            .map_err(store_err)?;
        match begin {
            LedgerBegin::Committed(entry) => {
                let result = entry.result.clone().unwrap_or(Value::Null);
                if entry.run_id != self.run_id {
                    self.docket
                        .store()
                        .append_event(
                            self.lease(),
                            "duplicate_suppressed".into(),
                            json!({ "action": name, "idempotency_key": key, "committed_by_run": entry.run_id, "committed_by_attempt": entry.attempt, "committed_by_lease": entry.lease_id, "committed_at": entry.updated_at }),
                            self.now(),
                        )
                        .await
                        .map_err(store_err)?;
                }
                self.save(name, result.clone()).await?;
                Ok(ActionStart::Committed(result))
            }
            LedgerBegin::InFlight {
                entry,
                holder_lease_expires_at,
            } => Err(self.in_flight(name, key, &entry, holder_lease_expires_at)),
            LedgerBegin::Acquired {
                reconcile_first: true,
                ..
            } => Ok(ActionStart::Reconcile),
            LedgerBegin::Acquired { .. } => Ok(ActionStart::Send),
        }
    }

    /// After [`ActionStart::Reconcile`]: what the reconcile function found
    /// (`None`: the action has none). `Some(result)` when the effect landed
    /// (committed without repeating it); `None` when it did not and the
    /// action is to be sent now; an error when the outcome is still unknown
    /// (the row is left `unknown` again).
    pub(crate) async fn action_reconciled(
        &self,
        name: &str,
        key: &str,
        found: Option<Result<Reconciled, JobError>>,
    ) -> Result<Option<Value>, JobError> {
        let name = name.to_string();
        let Some(found) = found else {
            let e = JobError::permanent(format!(
                "action `{name}` (key {key}) may or may not have happened: its last attempt ended with the outcome unknown and the action has no reconcile function; check the remote side, then skip the step (it happened) or retry the run (it did not)"
            ));
            return Err(self.still_unknown(name, key, e).await);
        };
        match found {
            Ok(Reconciled::Committed(v)) => {
                self.ledger_end(
                    &name,
                    key,
                    LedgerState::Committed,
                    Some(v.clone()),
                    None,
                    EventKind::ActionReconciled,
                )
                .await?;
                self.save(&name, v.clone()).await?;
                return Ok(Some(v));
            }
            Ok(Reconciled::NotDone) => {
                self.docket
                    .store()
                    .append_event(
                        self.lease(),
                        "action_reconciled".into(),
                        json!({ "action": name, "idempotency_key": key, "found": "not_done" }),
                        self.now(),
                    )
                    .await
                    .map_err(store_err)?;
            }
            Ok(Reconciled::StillUnknown) => {
                let e = JobError::timeout(format!("action `{name}` (key {key}): outcome still unknown after reconciling; retrying later"));
                return Err(self.still_unknown(name, key, e).await);
            }
            Err(e) => {
                // Asking failed: the outcome is as unknown as before.
                return Err(self.still_unknown(name, key, e).await);
            }
        }
        self.check_cancel()?;
        Ok(None)
    }

    /// The last phase of an action that was sent and answered: commits
    /// the row (final) and stores the step. A result too deeply nested to
    /// store commits the row with a marker (the effect happened) and fails
    /// the attempt `content_too_large`. A refused ledger write defers.
    pub(crate) async fn action_commit(
        &self,
        name: &str,
        key: &str,
        value: Value,
    ) -> Result<(), JobError> {
        if let Err(e) = docket_store::json::check_depth("result", &value) {
            // The effect happened, so the ledger must say so (or a
            // retry would repeat it); only its result cannot be
            // kept. The row is committed with a marker in its place
            // and the attempt fails `content_too_large`.
            let e = JobError::new(
                ErrorClass::ContentTooLarge,
                format!("action `{name}` (key {key}) succeeded, but its {e}: the ledger records it committed without its result"),
            );
            let marker = serde_json::json!({ "docket_not_stored": e.message.clone() });
            self.ledger_end(
                name,
                key,
                LedgerState::Committed,
                Some(marker),
                None,
                EventKind::ActionCommitted,
            )
            .await?;
            self.record_failure(name, &e).await;
            return Err(e.in_action(name.to_string()).with_key(key));
        }
        self.ledger_end(
            name,
            key,
            LedgerState::Committed,
            Some(value.clone()),
            None,
            EventKind::ActionCommitted,
        )
        .await?;
        self.save(name, value).await
    }

    /// The last phase of an action whose sending failed: the row becomes
    /// `unknown` (class `timeout`: the worker only stopped waiting, which
    /// proves nothing about the remote side), `failed_retryable` or
    /// `failed_terminal`, the step's failure is recorded, and the error to
    /// raise is answered (a refused ledger write: a deferral instead). A
    /// suspension passes through, the row left `started` for the next
    /// attempt to reconcile.
    pub(crate) async fn action_failed(&self, name: &str, key: &str, e: JobError) -> JobError {
        // The row stays `started` under this lease: once the attempt is
        // over, the next begin finds its holder gone and reconciles.
        if e.is_suspension() {
            return e;
        }
        let (state, event) = match e.class {
            ErrorClass::Timeout => (LedgerState::Unknown, EventKind::ActionUnknown),
            c if c.is_retryable() => (LedgerState::FailedRetryable, EventKind::ActionFailed),
            _ => (LedgerState::FailedTerminal, EventKind::ActionFailed),
        };
        // A refused write (the row was taken over, or is committed)
        // changes nothing: this attempt's failure stands as its own
        // evidence and never downgrades the row.
        match self
            .ledger_end(name, key, state, None, Some(&e), event)
            .await
        {
            Ok(()) => {}
            Err(le) if le.is_suspension() => {}
            Err(le) => return le,
        }
        self.record_failure(name, &e).await;
        e.in_action(name.to_string()).with_key(key)
    }

    /// Leaves the row this attempt took over `unknown` again (nothing was
    /// sent, and the outcome is as unknown as before) and fails the attempt
    /// with `e`. A refused write (the row moved on meanwhile) stands in
    /// for `e`: it defers the run to read the row again.
    async fn still_unknown(&self, name: String, key: &str, e: JobError) -> JobError {
        if let Err(le) = self
            .ledger_end(
                &name,
                key,
                LedgerState::Unknown,
                None,
                Some(&e),
                EventKind::ActionUnknown,
            )
            .await
        {
            return le;
        }
        self.record_failure(&name, &e).await;
        e.in_action(name).with_key(key)
    }

    /// How long a run that found its action in flight elsewhere waits
    /// before it looks again: at most this, or until the holder's lease
    /// expires if that is sooner.
    pub const IN_FLIGHT_RECHECK: Duration = Duration::from_secs(1);

    /// The deferral of an attempt that found its action's key held by
    /// another live attempt: nothing is sent; the run is rescheduled (no
    /// attempt spent) to look again when the holder has had time to finish.
    fn in_flight(
        &self,
        name: &str,
        key: &str,
        holder: &LedgerEntry,
        holder_lease_expires_at: Timestamp,
    ) -> JobError {
        let now = self.now();
        let until = holder_lease_expires_at
            .min(now.plus_millis(Self::IN_FLIGHT_RECHECK.as_millis() as i64))
            .max(now);
        JobError::control(
            Control::ActionInFlight { until },
            &format!(
                "action `{name}` (key {key}) is in flight in run {} (attempt {}, lease {}): not sent again; waiting for its outcome, next look at {until}",
                holder.run_id, holder.attempt, holder.lease_id
            ),
        )
        .in_action(name.to_string())
        .with_key(key)
    }

    /// Moves the ledger row this attempt holds to its outcome. A refusal
    /// (another attempt took the key over after this one's lease lapsed,
    /// or it is committed) defers the run so the next attempt reads the
    /// row as it is; it never overwrites it.
    async fn ledger_end(
        &self,
        name: &str,
        key: &str,
        state: LedgerState,
        result: Option<Value>,
        err: Option<&JobError>,
        event: EventKind,
    ) -> Result<(), JobError> {
        match self.ledger(name, key, state, result, err, event).await {
            Err(StoreError::LedgerConflict {
                current,
                holder_run,
                ..
            }) => {
                let until = self
                    .now()
                    .plus_millis(Self::IN_FLIGHT_RECHECK.as_millis() as i64);
                Err(JobError::control(
                    Control::ActionInFlight { until },
                    &format!(
                        "action `{name}` (key {key}): the ledger row is {current} by run {holder_run}, not this attempt's; {state} not recorded; looking again at {until}"
                    ),
                )
                .in_action(name.to_string())
                .with_key(key))
            }
            r => r.map_err(store_err),
        }
    }

    /// Waits for an operator. The first time, the run becomes `needs_input`
    /// with `request` stored (propagate the error with `?`); once an operator
    /// approves or rejects, the handler runs again, completed steps replay,
    /// and this call returns the decision.
    pub async fn wait_for_input(
        &self,
        name: impl Into<String>,
        request: Value,
    ) -> Result<InputDecision, JobError> {
        let name = name.into();
        if let Some(rec) = self.stored(&format!("input:{name}")).await? {
            let r = rec.result.unwrap_or(Value::Null);
            let data = r.get("data").cloned().unwrap_or(Value::Null);
            return Ok(match r.get("decision").and_then(Value::as_str) {
                Some("approved") => InputDecision::Approved(data),
                _ => InputDecision::Rejected(data),
            });
        }
        self.check_cancel()?;
        Err(JobError::control(
            Control::NeedsInput { name, request },
            "waiting for input",
        ))
    }

    /// Sleeps durably for `duration`: see [`Ctx::sleep_until`].
    pub async fn sleep(&self, name: impl Into<String>, duration: Duration) -> Result<(), JobError> {
        let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        let until = self.now().plus_millis(ms);
        self.sleep_until(name, until).await
    }

    /// Sleeps durably until `until`: `ctx.sleep_until("cool-off", t).await?`.
    ///
    /// The first time, the wake time is stored as the step `sleep:NAME` and
    /// the run is postponed to it: it holds no worker slot and no lease while
    /// it sleeps, spends no attempt budget, survives restarts and deploys,
    /// and can be cancelled at once. When it runs again (from the top,
    /// replaying completed steps), the same name finds the stored wake time,
    /// so a replay never sleeps twice or longer; past it, this returns `Ok`.
    /// Woken early (an operator's retry, a postponement moved), it sleeps
    /// again until the stored time. Names are unique within a run, like
    /// steps'.
    pub async fn sleep_until(
        &self,
        name: impl Into<String>,
        until: Timestamp,
    ) -> Result<(), JobError> {
        let name = format!("sleep:{}", name.into());
        self.claim_name(&name).await?;
        let until = match self.stored(&name).await? {
            Some(rec) => rec
                .result
                .as_ref()
                .and_then(|r| r.get("until"))
                .and_then(|u| serde_json::from_value::<Timestamp>(u.clone()).ok())
                .unwrap_or(until),
            None => {
                let until = until.clamp(Timestamp::MIN, Timestamp::MAX);
                self.save(&name, json!({ "until": until, "from": self.now() }))
                    .await?;
                until
            }
        };
        if self.now() >= until {
            return Ok(());
        }
        self.check_cancel()?;
        Err(JobError::control(
            Control::Postpone { until },
            &format!("sleeping (`{name}`) until {}", until.to_rfc3339()),
        ))
    }

    /// Postpones the run until `until`: return the error
    /// (`return Err(ctx.postpone(t))`). Not a failure; spends no attempt
    /// budget. Completed steps replay when it runs again. A time outside
    /// [`Timestamp::MIN`]..=[`Timestamp::MAX`] is clamped into it, so the
    /// stored time always renders as RFC 3339.
    pub fn postpone(&self, until: Timestamp) -> JobError {
        let until = until.clamp(Timestamp::MIN, Timestamp::MAX);
        JobError::control(Control::Postpone { until }, "postponed by the handler")
    }

    /// Appends an event of `kind` to the run (fenced by the lease): evidence
    /// such as an HTTP response's status, timing and a bounded body excerpt.
    /// Never put secrets in `data`.
    ///
    /// Evidence is not dropped when the store fails (a dropped connection,
    /// a database restart): the event is kept, with its time, and written
    /// before the attempt's end — retried with that end, under the same
    /// lease, for as long as the worker retries the end — and this returns
    /// `Ok`. Only a lost lease (the write is refused and recorded as
    /// `stale_write_refused`) or a missing run is an error.
    ///
    /// `kind` is the handler's own name (letters, digits, `_`, `.`, `-`; at
    /// most 64 bytes); one of Docket's own kinds (`run_completed`, …) is
    /// refused as a permanent error, since it would forge the engine's
    /// evidence.
    pub async fn record_event(&self, kind: &str, data: Value) -> Result<(), JobError> {
        let kind = EventKind::custom(kind).map_err(|e| JobError::permanent(e.to_string()))?;
        self.record(kind, data).await
    }

    /// [`Ctx::record_event`] for any kind, Docket's own included.
    pub(crate) async fn record(&self, kind: EventKind, data: Value) -> Result<(), JobError> {
        let now = self.now();
        match self
            .docket
            .store()
            .append_event(self.lease(), kind.clone(), data.clone(), now)
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::Database(msg)) => {
                tracing::warn!(run = %self.run_id, %kind, error = %msg, "could not record an event now; it is written with the attempt's end");
                self.kept
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(KeptEvent {
                        kind,
                        data,
                        at: now,
                    });
                Ok(())
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// Records that the handler skipped a step on purpose (a `when`
    /// condition was false): the step is stored as completed with
    /// `{"skipped": true, "reason": …}` so it is not evaluated again, and a
    /// `step_skipped` event names it. A skip, not a failure.
    pub async fn skip_step(
        &self,
        name: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<(), JobError> {
        let name = name.into();
        let reason = reason.into();
        self.claim_name(&name).await?;
        if self.replay::<Value>(&name).await?.is_some() {
            return Ok(());
        }
        self.save(&name, json!({ "skipped": true, "reason": reason }))
            .await?;
        self.record(
            EventKind::StepSkipped,
            json!({ "step": name, "reason": reason, "by": "handler" }),
        )
        .await
    }

    /// Records progress as a `progress` event of the run.
    pub async fn progress(
        &self,
        current: u64,
        total: u64,
        message: impl Into<String>,
    ) -> Result<(), JobError> {
        self.docket
            .store()
            .append_event(
                self.lease(),
                EventKind::Progress,
                json!({ "current": current, "total": total, "message": message.into() }),
                self.now(),
            )
            .await
            .map_err(store_err)
    }

    /// Records a log line as a `log` event of the run (level: `debug`,
    /// `info`, `warn`, `error`). Never put secrets in `data`.
    pub async fn log(
        &self,
        level: &str,
        message: impl Into<String>,
        data: Value,
    ) -> Result<(), JobError> {
        self.docket
            .store()
            .append_event(
                self.lease(),
                EventKind::Log,
                json!({ "level": level, "message": message.into(), "data": data }),
                self.now(),
            )
            .await
            .map_err(store_err)
    }
}
