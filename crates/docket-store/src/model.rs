//! The rows a store reads and writes.

pub use docket_core::debounce::Keep;
use docket_core::{ErrorClass, LeaseId, RunId, RunStatus, TerminalReason, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tenant used when none is given.
pub const DEFAULT_TENANT: &str = "default";

/// A run to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    /// Its id (chosen by the caller so a batch can be referred to at once).
    pub id: RunId,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The job to run.
    pub job: String,
    /// The input, as given.
    pub input: Value,
    /// Higher runs first.
    pub priority: i32,
    /// Not claimable before this instant (`now` when absent).
    pub run_after: Option<Timestamp>,
    /// Deduplicates triggers per (tenant, job).
    pub idempotency_key: Option<String>,
    /// Carried into every attempt's context and event.
    pub correlation_id: Option<String>,
    /// The run this one was retriggered from.
    pub retriggered_from: Option<RunId>,
    /// Who triggered it (a token name, `api`, `library`).
    pub actor: Option<String>,
    /// The W3C trace context it was triggered in, kept for every attempt.
    pub trace: Option<TraceContext>,
    /// Its concurrency key and limit (rendered by the engine from the job's
    /// template at trigger time); `None`: not limited.
    pub concurrency: Option<ConcurrencyKey>,
    /// Its debounce key, mode and window (rendered by the engine from the
    /// job's or the trigger's template); `None`: every trigger makes a run.
    pub debounce: Option<DebounceKey>,
}

/// A trigger's debounce: triggers of one (tenant, job) with the same `key`
/// within `window_ms` of the window's first trigger are collapsed into one
/// run (docs/FLOW_CONTROL.md, "Debounce").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebounceKey {
    /// The rendered key (e.g. `acme/42`).
    pub key: String,
    /// Which input the run keeps.
    pub keep: Keep,
    /// The window's length (at least 1 ms).
    pub window_ms: i64,
}

/// A debounced run's window, as stored on the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDebounce {
    /// The rendered key.
    pub key: String,
    /// Which input it keeps.
    pub keep: Keep,
    /// The window's end: a trigger at or after it opens a new window.
    pub until: Timestamp,
    /// How many later triggers were collapsed into this run.
    pub collapsed: u32,
    /// Whether this is still the key's current window (the latest run of
    /// the key; cleared when a later trigger opens a new window).
    pub current: bool,
}

/// An open debounce window (`LimitStore::debounce_windows`): a trigger of
/// its key now would be collapsed into its run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebounceWindow {
    /// The tenant (windows are per tenant and job).
    pub tenant: String,
    /// The job.
    pub job: String,
    /// The rendered key.
    pub key: String,
    /// The mode the window was opened with.
    pub keep: Keep,
    /// When it opened: the first trigger's time (its run's creation).
    pub opened_at: Timestamp,
    /// Its end (exclusive): a trigger at or after it opens a new window.
    pub until: Timestamp,
    /// The window's run, which collapsed triggers answer with.
    pub run: RunId,
    /// That run's status now (`pending` until a `keep = last` window ends;
    /// a `keep = first` window's run may be running or even final).
    pub status: RunStatus,
    /// Triggers collapsed into it so far.
    pub collapsed: u32,
}

/// How many debounce windows of one (tenant, job) are open now
/// (`LimitStore::debounce_counts`, the `/metrics` gauge).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebounceCount {
    /// The tenant.
    pub tenant: String,
    /// The job.
    pub job: String,
    /// Open windows.
    pub open: u64,
}

/// One concurrency key's use now (`Store::concurrency_usage`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// The key.
    pub key: String,
    /// The largest limit among its runs (they normally all carry the same).
    pub limit: u32,
    /// Its runs running now.
    pub running: u64,
    /// Its runs due now but not running: held back when `running >= limit`.
    pub due: u64,
    /// Its runs waiting (pending or postponed, due or not).
    pub waiting: u64,
}

/// A run's concurrency key and the limit it carries: at most `limit` runs
/// with the same `key` are running at once, across every process on the
/// database (docs/FLOW_CONTROL.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencyKey {
    /// The rendered key (e.g. `acme/42`).
    pub key: String,
    /// At least 1.
    pub limit: u32,
}

/// A W3C trace context (<https://www.w3.org/TR/trace-context/>) as its two
/// headers. The store keeps it as given; the engine validates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The `traceparent` header: version, trace id, parent span id, flags.
    pub traceparent: String,
    /// The `tracestate` header (vendor entries), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl NewRun {
    /// A run of `job` with `input` in the default tenant, due now.
    pub fn new(job: impl Into<String>, input: Value) -> Self {
        NewRun {
            id: RunId::new(),
            tenant: DEFAULT_TENANT.to_string(),
            job: job.into(),
            input,
            priority: 0,
            run_after: None,
            idempotency_key: None,
            correlation_id: None,
            retriggered_from: None,
            actor: None,
            trace: None,
            concurrency: None,
            debounce: None,
        }
    }
}

/// The answer to a trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct Triggered {
    /// The run (new, or the existing one with the same idempotency key).
    pub run: Run,
    /// True when nothing was created: the idempotency key was already used,
    /// or the trigger was collapsed into an existing run by a debounce.
    pub existing: bool,
    /// True when the trigger was collapsed into `run` by a debounce (and
    /// recorded there as a `trigger_collapsed` event).
    pub collapsed: bool,
}

/// A run as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Its id.
    pub id: RunId,
    /// Its tenant.
    pub tenant: String,
    /// Its job.
    pub job: String,
    /// Its status.
    pub status: RunStatus,
    /// Higher runs first.
    pub priority: i32,
    /// The input as triggered.
    pub input: Value,
    /// Variables, merged by operator retries (an object).
    pub variables: Value,
    /// The handler's output once completed.
    pub output: Option<Value>,
    /// The number of the latest attempt (0 before the first claim).
    pub attempt: u32,
    /// Attempts that do not count against the policy's budget (postponements,
    /// releases at shutdown, operator retries resetting the budget). The
    /// policy sees `attempt − attempts_forgiven`.
    pub attempts_forgiven: u32,
    /// Not claimable before this instant.
    pub run_after: Timestamp,
    /// The live lease, while running.
    pub lease_id: Option<LeaseId>,
    /// When the live lease runs out.
    pub lease_expires_at: Option<Timestamp>,
    /// The worker holding the lease.
    pub worker: Option<String>,
    /// The trigger's idempotency key.
    pub idempotency_key: Option<String>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// When it was triggered.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
    /// Why it failed, when failed.
    pub terminal_reason: Option<TerminalReason>,
    /// The class of the latest failure.
    pub last_error_class: Option<ErrorClass>,
    /// The message of the latest failure.
    pub last_error_message: Option<String>,
    /// A cancel was requested while it was running.
    pub cancel_requested: bool,
    /// The run this one was retriggered from.
    pub retriggered_from: Option<RunId>,
    /// What the handler asked for, while `needs_input`.
    pub input_request: Option<Value>,
    /// The W3C trace context it was triggered in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    /// The run that spawned this one (`ctx.spawn`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<RunId>,
    /// Its concurrency key and limit, if its job has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyKey>,
    /// Its debounce window and how many triggers were collapsed into it,
    /// if it was triggered with a debounce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce: Option<RunDebounce>,
}

impl Run {
    /// The attempt number the retry policy should see (budget-adjusted).
    pub fn policy_attempt(&self) -> u32 {
        self.attempt.saturating_sub(self.attempts_forgiven).max(1)
    }

    /// A pending run whose `run_after` lies in the future after a failure.
    pub fn is_retry_scheduled(&self, now: Timestamp) -> bool {
        self.status == RunStatus::Pending && self.run_after > now && self.last_error_class.is_some()
    }
}

/// What a worker asks for when it claims.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimRequest {
    /// Only runs of these jobs.
    pub jobs: Vec<String>,
    /// At most this many.
    pub limit: usize,
    /// The injected clock's now.
    pub now: Timestamp,
    /// Lease length in milliseconds.
    pub lease_ms: i64,
    /// The claiming worker's name (stored on the attempt).
    pub worker: String,
    /// Only runs of this tenant (a remote worker's token reaches one
    /// tenant); `None`: every tenant.
    pub tenant: Option<String>,
}

/// A lease held by a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// The run.
    pub run_id: RunId,
    /// The lease.
    pub lease_id: LeaseId,
}

/// A heartbeat's answer for one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    /// The lease still holds the run (and was extended).
    pub held: bool,
    /// An operator asked to cancel the run.
    pub cancel_requested: bool,
}

/// A failure's description, stored on the attempt row and the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Its class.
    pub class: ErrorClass,
    /// Its message (bounded by the engine).
    pub message: String,
    /// The fingerprint line (see `docket_core::Fingerprint::to_line`).
    pub fingerprint: String,
    /// The failure key (same job, action, class).
    pub failure_key: String,
    /// The step or action that failed, if any.
    pub action: Option<String>,
}

/// The policy's retry decision as stored evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryRecord {
    /// The policy's name (`retry_policy`).
    pub policy: String,
    /// The delay chosen (`delay_ms`).
    pub delay_ms: i64,
    /// When the run becomes eligible (`eligible_at`, the new `run_after`).
    pub eligible_at: Timestamp,
    /// Why this long (a deferral reason spends no budget).
    pub reason: docket_core::policy::RetryReason,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The handler returned Ok.
    Completed {
        /// Its output.
        output: Value,
    },
    /// A failure the policy retries: the run goes back to pending.
    Retry {
        /// The failure.
        error: ErrorInfo,
        /// The decision.
        retry: RetryRecord,
    },
    /// A failure the policy stops on: the run fails.
    Failed {
        /// The failure, when there was one (not for `unresolved`).
        error: Option<ErrorInfo>,
        /// The terminal reason.
        reason: TerminalReason,
        /// A sentence for the operator.
        detail: String,
    },
    /// The handler postponed the run; no attempt budget is spent.
    Postponed {
        /// Claimable again at this instant.
        until: Timestamp,
    },
    /// The handler asks an operator for input.
    NeedsInput {
        /// The wait's name.
        name: String,
        /// What it asks.
        request: Value,
    },
    /// A cancel was requested; the attempt stopped at a step boundary.
    Cancelled,
    /// The worker shut down and hands the run back, due at once; no attempt
    /// budget is spent.
    Released,
    /// The handler joins child runs that are not all final (`ctx.join`):
    /// the run is postponed with no time of its own — its `run_after` is
    /// what [`Store::join_children`](crate::Store::join_children) and the
    /// children's ends wrote (far future while any is open, the last
    /// child's end time after). No attempt budget is spent.
    AwaitingChildren {
        /// Children not final when the join was stored.
        waiting: u32,
        /// Children the join waits for in all.
        of: u32,
    },
}

impl Outcome {
    /// The name stored in the attempt row's `outcome` column.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Completed { .. } => "completed",
            Outcome::Retry { .. } => "retry_scheduled",
            Outcome::Failed { .. } => "failed",
            Outcome::Postponed { .. } => "postponed",
            Outcome::NeedsInput { .. } => "needs_input",
            Outcome::Cancelled => "cancelled",
            Outcome::Released => "released",
            Outcome::AwaitingChildren { .. } => "postponed",
        }
    }
}

/// The end of one attempt, fenced by its lease.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptEnd {
    /// The run.
    pub run_id: RunId,
    /// The lease the attempt ran under.
    pub lease_id: LeaseId,
    /// The injected clock's now.
    pub now: Timestamp,
    /// What happened.
    pub outcome: Outcome,
}

impl AttemptEnd {
    /// Whether this end, if its lease holds, leaves its run claimable by
    /// `now` (a release, or a retry or postponement due by then): a claim
    /// after it may take the run again.
    pub fn frees_by(&self, now: Timestamp) -> bool {
        match &self.outcome {
            Outcome::Released => self.now <= now,
            Outcome::Retry { retry, .. } => retry.eligible_at <= now,
            Outcome::Postponed { until } => *until <= now,
            Outcome::Completed { .. }
            | Outcome::AwaitingChildren { .. }
            | Outcome::Failed { .. }
            | Outcome::NeedsInput { .. }
            | Outcome::Cancelled => false,
        }
    }
}

/// One attempt as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The run.
    pub run_id: RunId,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// The lease it ran under.
    pub lease_id: LeaseId,
    /// The worker that ran it.
    pub worker: String,
    /// When it was claimed.
    pub started_at: Timestamp,
    /// When it ended (absent while running).
    pub finished_at: Option<Timestamp>,
    /// How it ended (`running` while it runs).
    pub outcome: docket_core::AttemptOutcome,
    /// The failure's class.
    pub error_class: Option<ErrorClass>,
    /// The failure's message.
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
    /// The retry decision: eligible again at.
    pub eligible_at: Option<Timestamp>,
    /// The retry decision: why this long.
    pub retry_reason: Option<docket_core::policy::RetryReason>,
}

/// An append-only event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Global, increasing id (usable as SSE `Last-Event-ID`).
    pub id: i64,
    /// The run.
    pub run_id: RunId,
    /// The run's tenant.
    pub tenant: String,
    /// The run's job.
    pub job: String,
    /// `run_triggered`, `attempt_started`, `retry_scheduled`, … (stored by
    /// name).
    pub kind: docket_core::EventKind,
    /// When (injected clock).
    pub at: Timestamp,
    /// The attempt it belongs to, if any.
    pub attempt: Option<u32>,
    /// The lease it belongs to, if any.
    pub lease_id: Option<LeaseId>,
    /// Who did it, for operator actions.
    pub actor: Option<String>,
    /// The operator's comment.
    pub comment: Option<String>,
    /// Details.
    pub data: Value,
}

/// Which runs to list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Any of these statuses (all when empty).
    pub statuses: Vec<RunStatus>,
    /// Only this job.
    pub job: Option<String>,
    /// Created at or after.
    pub created_after: Option<Timestamp>,
    /// Created before.
    pub created_before: Option<Timestamp>,
    /// Cursor: only runs with an id below this one (ids sort by creation).
    pub before_id: Option<RunId>,
    /// At most this many (0 means 100).
    pub limit: usize,
}

/// Which events to read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventFilter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this run.
    pub run_id: Option<RunId>,
    /// Only this job.
    pub job: Option<String>,
    /// Only events with a larger id.
    pub after_id: Option<i64>,
    /// At most this many (0 means 1000).
    pub limit: usize,
}

/// Number of runs of one job in one status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCount {
    /// The job.
    pub job: String,
    /// The status.
    pub status: RunStatus,
    /// How many.
    pub count: i64,
}

/// What became of a durable step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Done; its result is returned instead of running it again.
    Completed,
    /// Failed on its latest try; an operator retry runs it again.
    Failed,
    /// An operator skipped it after it failed; the run continues past it.
    Skipped,
}

impl StepStatus {
    /// The name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
        }
    }
}

impl std::str::FromStr for StepStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "completed" => Ok(StepStatus::Completed),
            "failed" => Ok(StepStatus::Failed),
            "skipped" => Ok(StepStatus::Skipped),
            _ => Err(format!("unknown step status `{s}`")),
        }
    }
}

/// A durable step of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The run.
    pub run_id: RunId,
    /// The step's name, unique in the run.
    pub name: String,
    /// Completed, failed or skipped.
    pub status: StepStatus,
    /// The stored result of a completed step.
    pub result: Option<Value>,
    /// The failure's class, for a failed step.
    pub error_class: Option<ErrorClass>,
    /// The failure's message, for a failed step.
    pub error_message: Option<String>,
    /// The attempt that last wrote it.
    pub attempt: u32,
    /// When it was last written.
    pub updated_at: Timestamp,
    /// Who skipped it.
    pub actor: Option<String>,
    /// The operator's comment when skipped.
    pub comment: Option<String>,
}

/// The state of one side effect in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerState {
    /// Written before the action runs.
    Started,
    /// The action is done; its result is stored and it never runs again.
    Committed,
    /// The worker stopped waiting (timeout, or its attempt died): whether
    /// the effect landed is not known until reconciled.
    Unknown,
    /// Failed in a way a retry may fix.
    FailedRetryable,
    /// Failed in a way no retry fixes.
    FailedTerminal,
}

impl LedgerState {
    /// The name stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            LedgerState::Started => "started",
            LedgerState::Committed => "committed",
            LedgerState::Unknown => "unknown",
            LedgerState::FailedRetryable => "failed_retryable",
            LedgerState::FailedTerminal => "failed_terminal",
        }
    }
}

impl std::fmt::Display for LedgerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LedgerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            LedgerState::Started,
            LedgerState::Committed,
            LedgerState::Unknown,
            LedgerState::FailedRetryable,
            LedgerState::FailedTerminal,
        ]
        .into_iter()
        .find(|l| l.as_str() == s)
        .ok_or_else(|| format!("unknown ledger state `{s}`"))
    }
}

/// One row of the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The tenant.
    pub tenant: String,
    /// The action's idempotency key (from business intent).
    pub idempotency_key: String,
    /// The action's name.
    pub action: String,
    /// The run that last wrote it.
    pub run_id: RunId,
    /// The attempt that last wrote it.
    pub attempt: u32,
    /// The lease that last wrote it.
    pub lease_id: LeaseId,
    /// Its state.
    pub state: LedgerState,
    /// The committed result.
    pub result: Option<Value>,
    /// The failure's class.
    pub error_class: Option<ErrorClass>,
    /// The failure's message.
    pub error_message: Option<String>,
    /// When first written.
    pub created_at: Timestamp,
    /// When last written.
    pub updated_at: Timestamp,
}

/// A ledger write made by an attempt (fenced by its lease).
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerWrite {
    /// The tenant.
    pub tenant: String,
    /// The idempotency key.
    pub idempotency_key: String,
    /// The action's name.
    pub action: String,
    /// The new state.
    pub state: LedgerState,
    /// The result (committed).
    pub result: Option<Value>,
    /// The failure's class.
    pub error_class: Option<ErrorClass>,
    /// The failure's message.
    pub error_message: Option<String>,
}

/// What [`crate::Store::ledger_begin`] found for a key, and did about it.
#[derive(Clone, Debug, PartialEq)]
pub enum LedgerBegin {
    /// The caller's attempt now holds the key `started` (the row was
    /// absent, or its last holder is gone). When `reconcile_first`, the
    /// previous outcome is unknown (a timeout, or a `started` row whose
    /// attempt died): ask the remote side whether the effect landed before
    /// sending anything.
    Acquired {
        /// The row as it was before (none for a new key).
        previous: Option<LedgerEntry>,
        /// Reconcile before sending.
        reconcile_first: bool,
    },
    /// The effect is committed (by this run or another): never act again,
    /// return the stored result.
    Committed(LedgerEntry),
    /// Another attempt holds the key `started` and its lease is live: its
    /// request may be in flight. Do not send; wait for its outcome. An
    /// `action_in_flight` event naming the holder was recorded on the
    /// caller's run.
    InFlight {
        /// The row, naming the holder (run, attempt, lease).
        entry: LedgerEntry,
        /// When the holder's lease expires unless renewed.
        holder_lease_expires_at: Timestamp,
    },
}

/// What an operator asks of a run.
#[derive(Clone, Debug, PartialEq)]
pub enum OperatorCommand {
    /// Pending, postponed or needs_input: cancelled at once. Running: cancel
    /// requested; the run stops at its next step boundary.
    Cancel,
    /// Not claimable before `until`; spends no attempt budget.
    Postpone {
        /// The new `run_after`.
        until: Timestamp,
    },
    /// Resume a needs_input run; the wait returns `Approved(data)`.
    Approve {
        /// The operator's data.
        data: Value,
    },
    /// Resume a needs_input run; the wait returns `Rejected(data)`.
    Reject {
        /// The operator's data.
        data: Value,
    },
    /// A failed run runs again: same run, completed steps kept, the failed
    /// step runs again, variables merged, fresh attempt budget.
    Retry {
        /// Merged (top-level keys) into the run's variables.
        updated_variables: Option<Value>,
    },
    /// A failed run continues past its failed step, recorded `skipped`.
    Skip,
}

impl OperatorCommand {
    /// The command's name (`cancel`, `retry`, …).
    pub fn name(&self) -> &'static str {
        match self {
            OperatorCommand::Cancel => "cancel",
            OperatorCommand::Postpone { .. } => "postpone",
            OperatorCommand::Approve { .. } => "approve",
            OperatorCommand::Reject { .. } => "reject",
            OperatorCommand::Retry { .. } => "retry",
            OperatorCommand::Skip => "skip",
        }
    }
}

/// An operator command with who gave it and why.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorRequest {
    /// The run.
    pub run_id: RunId,
    /// Who (a token's name, `cli`, …).
    pub actor: String,
    /// Why (stored in the audit trail).
    pub comment: Option<String>,
    /// The injected clock's now.
    pub now: Timestamp,
    /// What.
    pub command: OperatorCommand,
}

/// Top-level merge of `patch` into `base`: each key of `patch` replaces the
/// same key of `base` (an operator retry's `updated_variables`). A `base`
/// that is not an object is treated as empty.
pub fn merge_variables(base: &Value, patch: &Value) -> Value {
    let mut out = base.as_object().cloned().unwrap_or_default();
    if let Some(p) = patch.as_object() {
        for (k, v) in p {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}
