//! The JSON shapes of the REST API. Times are RFC 3339 text (UTC, ms).

use docket::{AttemptRecord, EventRecord, Run, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

fn ts(t: Timestamp) -> String {
    t.to_rfc3339()
}

fn ts_opt(t: Option<Timestamp>) -> Option<String> {
    t.map(ts)
}

/// A run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    /// Its id (a UUIDv7).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its job.
    pub job: String,
    /// `pending`, `running`, `needs_input`, `postponed`, `completed`,
    /// `failed` or `cancelled`.
    pub status: String,
    /// A pending run waiting out a retry delay after a failure.
    pub retry_scheduled: bool,
    /// Higher runs first.
    pub priority: i32,
    /// The input as triggered.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Variables (merged by operator retries).
    #[schema(value_type = Object)]
    pub variables: Value,
    /// The handler's output once completed.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// The latest attempt's number (0 before the first).
    pub attempt: u32,
    /// Attempts not counted against the retry budget.
    pub attempts_forgiven: u32,
    /// Not claimable before this instant.
    pub run_after: String,
    /// The live lease, while running.
    pub lease_id: Option<String>,
    /// When the live lease runs out.
    pub lease_expires_at: Option<String>,
    /// The worker holding the lease.
    pub worker: Option<String>,
    /// The trigger's idempotency key.
    pub idempotency_key: Option<String>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// When it was triggered.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// When it reached a terminal state.
    pub finished_at: Option<String>,
    /// Why it failed, when failed.
    pub terminal_reason: Option<String>,
    /// The latest failure's class.
    pub last_error_class: Option<String>,
    /// The latest failure's message.
    pub last_error_message: Option<String>,
    /// A cancel was requested while it was running.
    pub cancel_requested: bool,
    /// The run this one was retriggered from.
    pub retriggered_from: Option<String>,
    /// What the handler asks for, while `needs_input`.
    #[schema(value_type = Option<Object>)]
    pub input_request: Option<Value>,
    /// The W3C trace id of the trace the run belongs to (32 hex digits),
    /// when it was triggered with a `traceparent` or with traces on.
    pub trace_id: Option<String>,
    /// Its concurrency key (docs/FLOW_CONTROL.md), if its job has a limit.
    pub concurrency_key: Option<String>,
    /// How many runs with its key may run at once.
    pub concurrency_limit: Option<u32>,
    /// The run that spawned this one (`ctx.spawn`), if it is a child run.
    pub parent: Option<String>,
    /// Its debounce window (docs/FLOW_CONTROL.md, "Debounce"), if it was
    /// triggered with one: the key, the mode, the window's end and how many
    /// triggers were collapsed into it.
    pub debounce: Option<DebounceView>,
    /// Why a postponed run waits, when it is suspended in a durable wait
    /// (`GET /api/runs/{id}` only; `null` in lists and otherwise).
    pub wait: Option<WaitView>,
}

/// A debounced run's window.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DebounceView {
    /// The rendered debounce key.
    pub key: String,
    /// `first` (the first trigger's input, due at once) or `last` (the
    /// last trigger's input, due at the window's end).
    pub keep: String,
    /// The window's end (RFC 3339): a trigger at or after it opens a new
    /// window.
    pub until: String,
    /// How many later triggers were collapsed into this run.
    pub collapsed: u32,
    /// Whether this is still its key's current window (false once a later
    /// trigger opened a new one).
    pub current: bool,
}

/// What a suspended run waits for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WaitView {
    /// `signal` (a signal of `name`, reachable by `key` too when set),
    /// `sleep` (a durable sleep named `name`) or `children` (a join waiting
    /// for `waiting` of `of` child runs to end).
    pub kind: String,
    /// The signal's name, or the sleep's (`null` for children).
    pub name: Option<String>,
    /// The correlation key of a keyed signal wait.
    pub key: Option<String>,
    /// Its deadline (RFC 3339): the wait's timeout, or the wake time
    /// (`null` for children: a join has none).
    pub until: Option<String>,
    /// Children not final yet (`children` only).
    pub waiting: Option<u32>,
    /// Children the join waits for in all (`children` only).
    pub of: Option<u32>,
    /// In words: `waiting for signal "paid" until …`, `sleeping until …`,
    /// `waiting for 12 of 1000 children`.
    pub summary: String,
}

impl RunView {
    /// The view of a run at `now`.
    pub fn new(r: &Run, now: Timestamp) -> Self {
        RunView {
            id: r.id.to_string(),
            tenant: r.tenant.clone(),
            job: r.job.clone(),
            status: r.status.to_string(),
            retry_scheduled: r.is_retry_scheduled(now),
            priority: r.priority,
            input: r.input.clone(),
            variables: r.variables.clone(),
            output: r.output.clone(),
            attempt: r.attempt,
            attempts_forgiven: r.attempts_forgiven,
            run_after: ts(r.run_after),
            lease_id: r.lease_id.map(|l| l.to_string()),
            lease_expires_at: ts_opt(r.lease_expires_at),
            worker: r.worker.clone(),
            idempotency_key: r.idempotency_key.clone(),
            correlation_id: r.correlation_id.clone(),
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
            finished_at: ts_opt(r.finished_at),
            terminal_reason: r.terminal_reason.map(|t| t.to_string()),
            last_error_class: r.last_error_class.map(|c| c.to_string()),
            last_error_message: r.last_error_message.clone(),
            cancel_requested: r.cancel_requested,
            retriggered_from: r.retriggered_from.map(|i| i.to_string()),
            input_request: r.input_request.clone(),
            // version-traceid-parentid-flags; checked by the engine.
            trace_id: r
                .trace
                .as_ref()
                .and_then(|t| t.traceparent.split('-').nth(1))
                .map(String::from),
            concurrency_key: r.concurrency.as_ref().map(|k| k.key.clone()),
            concurrency_limit: r.concurrency.as_ref().map(|k| k.limit),
            parent: r.parent_id.map(|p| p.to_string()),
            debounce: r.debounce.as_ref().map(|d| DebounceView {
                key: d.key.clone(),
                keep: d.keep.to_string(),
                until: ts(d.until),
                collapsed: d.collapsed,
                current: d.current,
            }),
            wait: None,
        }
    }
}

/// The answer to a trigger.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TriggerResponse {
    /// The run: new, or the one that already had the idempotency key.
    pub run: RunView,
    /// True when nothing was created (HTTP 200 instead of 201): the
    /// idempotency key was already used, or the trigger was collapsed into
    /// `run` by a debounce.
    pub existing: bool,
    /// True when the trigger was collapsed into `run` by a debounce (a
    /// `trigger_collapsed` event on it records the trigger).
    pub collapsed: bool,
}

/// A run to trigger.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// The job's name.
    pub job: String,
    /// The input (any JSON; default `null`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: Value,
    /// A second trigger with this key for the same job returns the first run.
    pub idempotency_key: Option<String>,
    /// Not before this instant (RFC 3339).
    pub run_after: Option<String>,
    /// Higher runs first (default 0).
    #[serde(default, deserialize_with = "crate::extract::integral::i32")]
    pub priority: i32,
    /// Carried into every attempt and event.
    pub correlation_id: Option<String>,
    /// Collapse this trigger with others of the same key within a window
    /// (replacing the job's own debounce for this trigger).
    pub debounce: Option<DebounceRequest>,
}

/// A trigger's debounce (docs/FLOW_CONTROL.md, "Debounce").
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DebounceRequest {
    /// The key template over `{{ tenant }}`, `{{ job }}` and
    /// `{{ input.FIELD }}` (default `{{ job }}`: every trigger of the job
    /// in the tenant).
    pub key: Option<String>,
    /// The window, a duration like `"30s"`, `"5m"`, `"500ms"` (1 ms to 366
    /// days).
    pub window: String,
    /// `first`: the first trigger's run is due at once and later triggers
    /// in the window return it, their input dropped. `last`: the run is
    /// due when the window after the first trigger ends and each later
    /// trigger in the window replaces its input while it has not started.
    pub keep: String,
}

/// Runs to trigger together (all or none).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 1,000 runs.
    pub runs: Vec<TriggerRequest>,
}

/// The answer to a batch trigger, in the request's order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// One answer per requested run.
    pub runs: Vec<TriggerResponse>,
}

/// A page of runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    /// Newest first.
    pub runs: Vec<RunView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// One attempt, with the gap since the previous one and its retry decision.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// 1-based.
    pub attempt: u32,
    /// The lease it ran under.
    pub lease_id: String,
    /// The worker that ran it.
    pub worker: String,
    /// When it was claimed.
    pub started_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Milliseconds it ran.
    pub duration_ms: Option<i64>,
    /// Milliseconds from the previous attempt's end to this one's start.
    pub gap_ms: Option<i64>,
    /// `running`, `completed`, `retry_scheduled`, `failed`, `postponed`,
    /// `needs_input`, `cancelled`, `released`, `lease_expired`.
    pub outcome: String,
    /// The failure's class.
    pub error_class: Option<String>,
    /// The failure's message.
    pub error_message: Option<String>,
    /// The failure's fingerprint.
    pub fingerprint: Option<String>,
    /// The step or action that failed.
    pub action: Option<String>,
    /// The policy's decision after this attempt, if it retried.
    pub retry: Option<RetryView>,
}

/// A stored retry decision.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetryView {
    /// The policy's name.
    pub policy: Option<String>,
    /// The delay chosen.
    pub delay_ms: Option<i64>,
    /// When the run became eligible again.
    pub eligible_at: Option<String>,
    /// `backoff`, `retry_after`, `circuit_open`, `action_in_flight`, `rate_limited`.
    pub reason: Option<String>,
}

impl AttemptView {
    /// Views of a run's attempts, with gaps.
    pub fn list(attempts: &[AttemptRecord]) -> Vec<AttemptView> {
        let mut prev_end: Option<Timestamp> = None;
        attempts
            .iter()
            .map(|a| {
                let gap = prev_end.map(|p| a.started_at.millis_since(p));
                prev_end = a.finished_at;
                let retry = (a.retry_policy.is_some() || a.delay_ms.is_some()).then(|| RetryView {
                    policy: a.retry_policy.clone(),
                    delay_ms: a.delay_ms,
                    eligible_at: ts_opt(a.eligible_at),
                    reason: a.retry_reason.map(|r| r.to_string()),
                });
                AttemptView {
                    attempt: a.attempt,
                    lease_id: a.lease_id.to_string(),
                    worker: a.worker.clone(),
                    started_at: ts(a.started_at),
                    finished_at: ts_opt(a.finished_at),
                    duration_ms: a.finished_at.map(|f| f.millis_since(a.started_at)),
                    gap_ms: gap,
                    outcome: a.outcome.to_string(),
                    error_class: a.error_class.map(|c| c.to_string()),
                    error_message: a.error_message.clone(),
                    fingerprint: a.fingerprint.clone(),
                    action: a.action.clone(),
                    retry,
                }
            })
            .collect()
    }
}

/// An event.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// Increasing id (the SSE id; resume with `Last-Event-ID`).
    pub id: i64,
    /// The run.
    pub run_id: String,
    /// The run's job.
    pub job: String,
    /// `run_triggered`, `attempt_started`, `retry_scheduled`, …
    pub kind: String,
    /// When.
    pub at: String,
    /// The attempt it belongs to.
    pub attempt: Option<u32>,
    /// The lease it belongs to.
    pub lease_id: Option<String>,
    /// Who did it (operator actions: the token's name).
    pub actor: Option<String>,
    /// The operator's comment.
    pub comment: Option<String>,
    /// Details.
    #[schema(value_type = Object)]
    pub data: Value,
}

impl From<&EventRecord> for EventView {
    fn from(e: &EventRecord) -> Self {
        EventView {
            id: e.id,
            run_id: e.run_id.to_string(),
            job: e.job.clone(),
            kind: e.kind.to_string(),
            at: ts(e.at),
            attempt: e.attempt,
            lease_id: e.lease_id.map(|l| l.to_string()),
            actor: e.actor.clone(),
            comment: e.comment.clone(),
            data: e.data.clone(),
        }
    }
}

/// One entry of a run's timeline: an event, and for attempt starts the
/// attempt's summary (gap since the previous attempt, outcome, decision).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    /// When.
    pub at: String,
    /// The event's kind.
    pub kind: String,
    /// The attempt it belongs to.
    pub attempt: Option<u32>,
    /// Who did it.
    pub actor: Option<String>,
    /// The operator's comment.
    pub comment: Option<String>,
    /// A one-line description for people.
    pub summary: String,
    /// The event's id.
    pub event_id: i64,
}

/// A run with its whole history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunDetail {
    /// The run.
    pub run: RunView,
    /// Its attempts, by number, with gaps and retry decisions.
    pub attempts: Vec<AttemptView>,
    /// Its durable steps: `name`, `status`, `result`, `error_class`,
    /// `error_message`, `attempt`, `updated_at` (RFC 3339), `actor`,
    /// `comment`.
    #[schema(value_type = Vec<Object>)]
    pub steps: Vec<Value>,
    /// Ledger entries of its actions: `idempotency_key`, `action`, `state`,
    /// `attempt`, `lease_id`, `result`, `error_class`, `error_message`,
    /// `created_at` and `updated_at` (RFC 3339).
    #[schema(value_type = Vec<Object>)]
    pub ledger: Vec<Value>,
    /// Its events, in order.
    pub events: Vec<EventView>,
    /// Events and attempts as one readable timeline.
    pub timeline: Vec<TimelineEntry>,
    /// How many child runs it spawned (list them with
    /// `GET /api/runs?parent=ID`).
    pub children: i64,
}

/// The answer of a long poll.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WaitResponse {
    /// The run as last seen.
    pub run: RunView,
    /// True when the run is terminal; false when the timeout passed first.
    pub terminal: bool,
}

/// A registered job and the caller's tenant's runs of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Its name.
    pub name: String,
    /// Runs of this tenant by status (only statuses with runs).
    #[schema(value_type = Object)]
    pub runs: Value,
    /// Paused for this tenant (by itself or by `*`): its runs are not
    /// claimed (`POST /api/jobs/{job}/resume`).
    pub paused: bool,
    /// Its queue now (read from the store).
    pub queue: QueueView,
}

/// A job's queue health for the tenant.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct QueueView {
    /// Runs due now (pending or postponed, `run_after` passed).
    pub due: u64,
    /// Seconds the oldest due run has waited (0 when none is due).
    pub lag_seconds: f64,
    /// Runs running now.
    pub running: u64,
    /// Of `due`: runs held back by their concurrency key (no slot free for
    /// the key; docs/FLOW_CONTROL.md).
    pub held: u64,
    /// Runs waiting for a later time (retries, postponements, deferrals).
    pub scheduled: u64,
    /// Of `scheduled`: runs deferred without sending by a limit — a rate
    /// limit's token, an open circuit's reset, another run's action in
    /// flight — no attempt spent.
    pub deferred: u64,
    /// Runs completed in the last 5 minutes.
    pub completed_5m: u64,
    /// Runs failed in the last 5 minutes.
    pub failed_5m: u64,
    /// (completed + failed) in the last 5 minutes, per minute.
    pub throughput_per_minute: f64,
}

/// The registered jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Sorted by name.
    pub jobs: Vec<JobView>,
}

/// An operator's comment (cancel, skip, retrigger).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommentRequest {
    /// Stored on the audit event.
    pub comment: Option<String>,
}

/// An operator retry.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Merged (top-level keys) into the run's variables before the retry.
    #[schema(value_type = Option<Object>)]
    pub updated_variables: Option<Value>,
    /// Stored on the audit event.
    pub comment: Option<String>,
}

/// An operator postponement: `until` or `delay_ms`, one of them.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostponeRequest {
    /// Not before this instant (RFC 3339).
    pub until: Option<String>,
    /// Or: not before now plus this many milliseconds.
    #[serde(default, deserialize_with = "crate::extract::integral::opt_u64")]
    pub delay_ms: Option<u64>,
    /// Stored on the audit event.
    pub comment: Option<String>,
}

/// An operator's decision on a run waiting for input.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    /// Handed to the handler's wait (default `null`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
    /// Stored on the audit event.
    pub comment: Option<String>,
}

/// The health check's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The server's version.
    pub version: String,
}
