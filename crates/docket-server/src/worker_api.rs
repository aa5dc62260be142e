//! The worker protocol over HTTP, v1 (`/api/worker/v1/…`;
//! docs/WORKER_PROTOCOL.md is the contract): remote workers in any
//! language claim runs of remote jobs, heartbeat their leases, run steps
//! and ledger-guarded actions, and end attempts. Each handler here only
//! checks the request and calls the engine (`docket::remote`), which runs
//! the same code as the in-process worker: the server decides retries,
//! fences every write by the lease and writes the evidence.
//!
//! Only worker tokens reach these routes ([`WorkerCaller`]); they reach
//! only their tenant's runs (another tenant's run answers 404, as an
//! unknown one). `GET /api/workers` (operator tokens) lists the roster.

use crate::auth::{check_label, Caller, WorkerCaller};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiPath};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use docket::remote::{
    ActionAnswer, ClaimedRun, EndAnswer, RemoteClaim, RemoteEnd, RemoteFailure, RemoteReconciled,
    StepFound, MAX_CLAIM,
};
use docket::{ErrorClass, JobError, RunId, Timestamp};
use docket_store::LeaseRef;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;
use utoipa::ToSchema;

/// Most jobs one claim names.
pub const MAX_CLAIM_JOBS: usize = 100;
/// Most leases one heartbeat extends.
pub const MAX_HEARTBEAT_LEASES: usize = 1000;
/// The default long poll of a claim.
pub const DEFAULT_CLAIM_WAIT_MS: u64 = 20_000;
/// The longest long poll of a claim.
pub const MAX_CLAIM_WAIT_MS: u64 = 60_000;
/// Longest step/action name, idempotency key, message or log line.
const MAX_NAME: usize = 1000;
const MAX_MESSAGE: usize = 65_536;

// ---- request and response shapes ----

/// `POST /api/worker/v1/claim`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// The worker's name (1–100 of letters, digits, `-_.@`), stored on
    /// every attempt it runs.
    pub worker: String,
    /// The remote jobs it runs (1–100).
    pub jobs: Vec<String>,
    /// How many runs it wants (1–100; default 1).
    #[serde(default)]
    pub max: Option<usize>,
    /// How long to wait for a run when none is due (0–60000 ms, default
    /// 20000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// A run handed to a worker.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClaimedRunView {
    /// The run.
    pub run_id: String,
    /// Its job.
    pub job: String,
    /// Its tenant.
    pub tenant: String,
    /// Its input.
    #[schema(value_type = Object)]
    pub input: Value,
    /// Its variables (merged by operator retries).
    #[schema(value_type = Object)]
    pub variables: Value,
    /// This attempt's number (1-based).
    pub attempt: u32,
    /// The lease fencing this attempt: send it with every call.
    pub lease_id: String,
    /// When the lease runs out unless heartbeated.
    pub lease_expires_at: String,
    /// The job's lease length; each heartbeat extends the lease by it.
    pub lease_ms: u64,
    /// How often to heartbeat.
    pub heartbeat_ms: u64,
    /// The trigger's idempotency key.
    pub idempotency_key: Option<String>,
    /// The correlation id (the trigger's, or the run id).
    pub correlation_id: String,
    /// When the handler's time runs out.
    pub deadline: String,
    /// The job's handler timeout.
    pub timeout_ms: u64,
    /// A cancel was requested (stop at the next step boundary).
    pub cancel_requested: bool,
    /// The W3C trace context the run was triggered in (the trigger span's,
    /// when the server exports traces): the worker's own spans for this
    /// attempt and the `traceparent` of its outgoing calls continue this
    /// trace. Absent when the run has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C trace state that goes with `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// The claimed runs (possibly none, after the long poll).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClaimResponse {
    /// The runs.
    pub runs: Vec<ClaimedRunView>,
}

/// A lease: a run and the lease id of its attempt.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseItem {
    /// The run.
    pub run_id: String,
    /// The lease.
    pub lease_id: String,
}

/// `POST /api/worker/v1/heartbeat`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The worker's name.
    pub worker: String,
    /// The leases it holds (at most 1000).
    pub leases: Vec<LeaseItem>,
}

/// One lease after a heartbeat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseStateView {
    /// The run.
    pub run_id: String,
    /// The lease.
    pub lease_id: String,
    /// Still held (extended). `false`: lost; stop the handler.
    pub held: bool,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// The new expiry, when held.
    pub lease_expires_at: Option<String>,
}

/// The leases, in the order asked.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    /// One per lease asked.
    pub leases: Vec<LeaseStateView>,
}

/// A failure reported by a worker.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailureBody {
    /// Docket's error class: `timeout`, `network`, `rate_limited`,
    /// `unavailable`, `lease_expired`, `invalid_input`, `content_too_large`,
    /// `connection_unresolved`, `unauthorized`, `not_found`, `permanent`,
    /// `duplicate`.
    pub class: String,
    /// A message for the operator (stored bounded to 4 KiB).
    pub message: String,
    /// A provider's reset time (Retry-After), in ms from now; honoured when
    /// later than the policy's delay.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// The step or action that failed.
    #[serde(default)]
    pub action: Option<String>,
    /// Its idempotency key.
    #[serde(default)]
    pub key: Option<String>,
}

/// `POST /api/worker/v1/runs/{id}/end`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// `completed`, `failed`, `postponed` or `needs_input`.
    pub outcome: String,
    /// `completed`: the output (any JSON).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub output: Option<Value>,
    /// `failed`: the error.
    #[serde(default)]
    pub error: Option<FailureBody>,
    /// `postponed`: not before this instant.
    #[serde(default)]
    pub until: Option<String>,
    /// `needs_input`: the wait's name.
    #[serde(default)]
    pub name: Option<String>,
    /// `needs_input`: what it asks for (any JSON).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub request: Option<Value>,
}

/// A retry the policy scheduled.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerRetryView {
    /// When the run is due again.
    pub at: String,
    /// The delay the policy chose.
    pub delay_ms: i64,
    /// The policy's name.
    pub policy: String,
    /// Why (`backoff`, `rate_limited`, `action_in_flight`, …).
    pub reason: String,
}

/// What ending an attempt did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EndResponse {
    /// The run's status now.
    pub status: String,
    /// The retry scheduled, if any.
    pub retry: Option<WorkerRetryView>,
    /// Why the run failed for good, if it did.
    pub terminal_reason: Option<String>,
}

/// A call on a step.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The step's name (`input:NAME` for a wait's decision, with `get`).
    pub name: String,
}

/// A stored step.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepGetResponse {
    /// Whether the step is stored (completed or skipped).
    pub found: bool,
    /// `completed` or `skipped`, when found; the run's status (`cancelled`)
    /// when the server ended the attempt.
    pub status: Option<String>,
    /// The completed step's result.
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// The operator's comment on a skipped step.
    pub comment: Option<String>,
    /// `cancelled`: the step is not stored and an operator asked to cancel
    /// the run, so no new step starts — the server ended the attempt, as
    /// `actions/begin` does. Stop the handler and do not call `end`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// True when the server ended the attempt (with `decision`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_ended: Option<bool>,
    /// Why the server ended the attempt, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /api/worker/v1/runs/{id}/steps/complete`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepCompleteRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The step's name.
    pub name: String,
    /// Its result (any JSON).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub result: Value,
}

/// A step stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepCompleteResponse {
    /// A cancel was requested: start no new step.
    pub cancel_requested: bool,
}

/// `POST /api/worker/v1/runs/{id}/steps/fail`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepFailRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The step's name.
    pub name: String,
    /// The failure.
    pub error: FailureBody,
}

/// An empty answer.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Empty {}

/// `POST /api/worker/v1/runs/{id}/actions/begin`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionBeginRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The action's (step) name.
    pub name: String,
    /// Its idempotency key, from business intent.
    pub key: String,
}

/// `POST /api/worker/v1/runs/{id}/actions/commit`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionCommitRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The action's name.
    pub name: String,
    /// Its idempotency key.
    pub key: String,
    /// What the service answered (any JSON).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub result: Value,
}

/// `POST /api/worker/v1/runs/{id}/actions/fail`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionFailRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The action's name.
    pub name: String,
    /// Its idempotency key.
    pub key: String,
    /// How sending it failed (`timeout`: the outcome is unknown).
    pub error: FailureBody,
}

/// `POST /api/worker/v1/runs/{id}/actions/reconciled`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionReconciledRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// The action's name.
    pub name: String,
    /// Its idempotency key.
    pub key: String,
    /// `committed`, `not_done`, `still_unknown`, `error` or `no_reconcile`.
    pub found: String,
    /// `committed`: the effect's result.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// `error`: how asking failed.
    #[serde(default)]
    pub error: Option<FailureBody>,
}

/// An action call's answer (docs/WORKER_PROTOCOL.md, "Ledger-guarded
/// actions").
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ActionResponse {
    /// `replay`, `skipped`, `committed`, `run`, `reconcile`, `done`,
    /// `failed`, `deferred` or `cancelled`.
    pub decision: String,
    /// The result (`replay`, `committed`, `done`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub result: Option<Value>,
    /// The operator's comment (`skipped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The error to raise in the handler (`failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureBody>,
    /// `deferred`, `cancelled`: the server ended the attempt; stop the
    /// handler and do not call `end`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_ended: Option<bool>,
    /// The run's status after the server ended the attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `deferred`: when the run is due again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Why, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /api/worker/v1/runs/{id}/progress`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// Done so far.
    pub current: u64,
    /// Out of.
    pub total: u64,
    /// What is going on.
    #[serde(default)]
    pub message: Option<String>,
}

/// `POST /api/worker/v1/runs/{id}/log`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    /// The attempt's lease.
    pub lease_id: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The line.
    pub message: String,
    /// Structured data (never secrets).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
}

/// A registered remote worker.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    /// Its name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// The jobs of its last claim.
    pub jobs: Vec<String>,
    /// When it was first seen.
    pub first_seen_at: String,
    /// Its last claim or heartbeat.
    pub last_seen_at: String,
    /// Runs running under its name now.
    pub running: u64,
}

/// The registered remote workers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    /// Most recently seen first.
    pub workers: Vec<WorkerView>,
}

// ---- the OpenAPI document ----

/// What the derive cannot say about the worker protocol's shapes: ranges,
/// enums, "any JSON" values (so generated clients get exact types).
pub(crate) fn complete_openapi(doc: &mut Value) {
    use crate::openapi::{merge, set, time_schema};
    use serde_json::json;
    let any = |what: &str| json!({ "description": what });
    let uuid = json!({ "type": "string", "format": "uuid" });
    let name = json!({ "type": "string", "pattern": "^[A-Za-z0-9._@-]{1,100}$" });
    set(doc, "ClaimRequest", "worker", name.clone());
    set(doc, "HeartbeatRequest", "worker", name);
    merge(
        doc,
        "ClaimRequest",
        "jobs",
        json!({ "minItems": 1, "maxItems": MAX_CLAIM_JOBS }),
    );
    set(
        doc,
        "ClaimRequest",
        "max",
        json!({ "type": ["integer", "null"], "minimum": 1, "maximum": MAX_CLAIM }),
    );
    set(
        doc,
        "ClaimRequest",
        "wait_ms",
        json!({ "type": ["integer", "null"], "minimum": 0, "maximum": MAX_CLAIM_WAIT_MS }),
    );
    merge(
        doc,
        "HeartbeatRequest",
        "leases",
        json!({ "maxItems": MAX_HEARTBEAT_LEASES }),
    );
    for schema in ["LeaseItem", "LeaseStateView"] {
        set(doc, schema, "run_id", uuid.clone());
        set(doc, schema, "lease_id", uuid.clone());
    }
    for schema in [
        "EndRequest",
        "StepRequest",
        "StepCompleteRequest",
        "StepFailRequest",
        "ActionBeginRequest",
        "ActionCommitRequest",
        "ActionFailRequest",
        "ActionReconciledRequest",
        "ProgressRequest",
        "LogRequest",
    ] {
        set(doc, schema, "lease_id", uuid.clone());
    }
    let label = json!({ "type": "string", "minLength": 1, "maxLength": MAX_NAME });
    for schema in [
        "StepRequest",
        "StepCompleteRequest",
        "StepFailRequest",
        "ActionBeginRequest",
        "ActionCommitRequest",
        "ActionFailRequest",
        "ActionReconciledRequest",
    ] {
        set(doc, schema, "name", label.clone());
    }
    for schema in [
        "ActionBeginRequest",
        "ActionCommitRequest",
        "ActionFailRequest",
        "ActionReconciledRequest",
    ] {
        set(doc, schema, "key", label.clone());
    }
    set(
        doc,
        "EndRequest",
        "name",
        json!({ "type": ["string", "null"], "minLength": 1, "maxLength": MAX_NAME }),
    );
    let text = json!({ "type": "string", "maxLength": MAX_MESSAGE });
    set(doc, "FailureBody", "message", text.clone());
    set(doc, "LogRequest", "message", text);
    set(
        doc,
        "ProgressRequest",
        "message",
        json!({ "type": ["string", "null"], "maxLength": MAX_MESSAGE }),
    );
    for field in ["action", "key"] {
        set(
            doc,
            "FailureBody",
            field,
            json!({ "type": ["string", "null"], "maxLength": MAX_NAME }),
        );
    }
    let classes: Vec<&str> = ErrorClass::ALL.iter().map(|c| c.as_str()).collect();
    set(
        doc,
        "FailureBody",
        "class",
        json!({ "type": "string", "enum": classes }),
    );
    set(
        doc,
        "FailureBody",
        "retry_after_ms",
        json!({ "type": ["integer", "null"], "minimum": 0 }),
    );
    set(
        doc,
        "EndRequest",
        "outcome",
        json!({ "type": "string", "enum": ["completed", "failed", "postponed", "needs_input"] }),
    );
    set(
        doc,
        "EndRequest",
        "until",
        time_schema(true, "`postponed`: not before this instant:"),
    );
    set(
        doc,
        "EndRequest",
        "output",
        any("`completed`: the output, any JSON."),
    );
    set(
        doc,
        "EndRequest",
        "request",
        any("`needs_input`: what it asks for, any JSON."),
    );
    set(
        doc,
        "ActionReconciledRequest",
        "found",
        json!({ "type": "string", "enum": ["committed", "not_done", "still_unknown", "error", "no_reconcile"] }),
    );
    set(
        doc,
        "LogRequest",
        "level",
        json!({ "type": "string", "enum": ["debug", "info", "warn", "error"] }),
    );
    set(
        doc,
        "ActionResponse",
        "decision",
        json!({ "type": "string", "enum": ["replay", "skipped", "committed", "run", "reconcile", "done", "failed", "deferred", "cancelled"] }),
    );
    for (schema, field) in [
        ("ClaimedRunView", "input"),
        ("ClaimedRunView", "variables"),
        ("StepGetResponse", "result"),
        ("StepCompleteRequest", "result"),
        ("ActionCommitRequest", "result"),
        ("ActionReconciledRequest", "result"),
        ("ActionResponse", "result"),
        ("LogRequest", "data"),
    ] {
        set(doc, schema, field, any("Any JSON."));
    }
}

// ---- checks ----

fn run_id(s: &str) -> ApiResult<RunId> {
    s.parse().map_err(|_| ApiError::run_not_found(s))
}

fn lease(run: &str, lease_id: &str) -> ApiResult<LeaseRef> {
    let run_id = run_id(run)?;
    let lease_id = lease_id.parse().map_err(|_| {
        ApiError::invalid_field(
            "lease_id",
            format!("`lease_id`: `{lease_id}` is not a UUID"),
        )
    })?;
    Ok(LeaseRef { run_id, lease_id })
}

fn text(field: &str, v: &str, max: usize) -> ApiResult<()> {
    if v.len() > max {
        return Err(ApiError::invalid_field(
            field,
            format!("`{field}` is longer than {max} bytes"),
        ));
    }
    Ok(())
}

fn name(field: &str, v: &str) -> ApiResult<()> {
    if v.is_empty() {
        return Err(ApiError::invalid_field(
            field,
            format!("`{field}` is empty"),
        ));
    }
    text(field, v, MAX_NAME)
}

fn worker_name(v: &str) -> ApiResult<()> {
    check_label("worker", v).map_err(|m| ApiError::invalid_field("worker", m))
}

fn class(field: &str, v: &str) -> ApiResult<ErrorClass> {
    v.parse().map_err(|_| {
        ApiError::invalid_field(
            field,
            format!(
                "`{field}`: `{v}` is not an error class; use one of {}",
                ErrorClass::ALL
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

fn failure(prefix: &str, f: FailureBody) -> ApiResult<RemoteFailure> {
    let class = class(&format!("{prefix}.class"), &f.class)?;
    text(&format!("{prefix}.message"), &f.message, MAX_MESSAGE)?;
    if let Some(a) = &f.action {
        text(&format!("{prefix}.action"), a, MAX_NAME)?;
    }
    if let Some(k) = &f.key {
        text(&format!("{prefix}.key"), k, MAX_NAME)?;
    }
    Ok(RemoteFailure {
        class,
        message: f.message,
        retry_after: f
            .retry_after_ms
            .map(|ms| Duration::from_millis(ms.min(docket_core_max_delay_ms()))),
        action: f.action,
        key: f.key,
    })
}

/// Retry-After beyond 100 years is clamped there (a time Docket can store).
const fn docket_core_max_delay_ms() -> u64 {
    100 * 366 * 86_400_000
}

fn time(field: &str, s: &str) -> ApiResult<Timestamp> {
    Timestamp::parse_checked(s)
        .map_err(|e| ApiError::invalid_field(field, crate::runs::time_problem(field, s, e)))
}

fn failure_view(e: &JobError) -> FailureBody {
    FailureBody {
        class: e.class.as_str().to_string(),
        message: e.message.clone(),
        retry_after_ms: None,
        action: e.action.clone(),
        key: e.key().map(str::to_string),
    }
}

fn end_view(e: EndAnswer) -> EndResponse {
    EndResponse {
        status: e.status.to_string(),
        retry: e.retry.map(|r| WorkerRetryView {
            at: r.eligible_at.to_rfc3339(),
            delay_ms: r.delay_ms,
            policy: r.policy,
            reason: r.reason.to_string(),
        }),
        terminal_reason: e.terminal_reason.map(|r| r.as_str().to_string()),
    }
}

fn action_view(a: ActionAnswer) -> ActionResponse {
    let d = |s: &str| ActionResponse {
        decision: s.to_string(),
        ..Default::default()
    };
    match a {
        ActionAnswer::Replay(v) => ActionResponse {
            result: Some(v),
            ..d("replay")
        },
        ActionAnswer::Skipped(comment) => ActionResponse {
            comment,
            ..d("skipped")
        },
        ActionAnswer::Committed(v) => ActionResponse {
            result: Some(v),
            ..d("committed")
        },
        ActionAnswer::Run => d("run"),
        ActionAnswer::Reconcile => d("reconcile"),
        ActionAnswer::Done(v) => ActionResponse {
            result: Some(v),
            ..d("done")
        },
        ActionAnswer::Failed(e) => ActionResponse {
            error: Some(failure_view(&e)),
            ..d("failed")
        },
        ActionAnswer::Ended {
            decision,
            end,
            until,
        } => ActionResponse {
            attempt_ended: Some(true),
            status: Some(end.status.to_string()),
            until: until.map(|t| t.to_rfc3339()),
            message: end.message,
            ..d(decision)
        },
    }
}

fn claimed_view(c: ClaimedRun) -> ClaimedRunView {
    let r = c.run;
    ClaimedRunView {
        run_id: r.id.to_string(),
        job: r.job,
        tenant: r.tenant,
        input: r.input,
        variables: r.variables,
        attempt: r.attempt,
        lease_id: r.lease_id.map(|l| l.to_string()).unwrap_or_default(),
        lease_expires_at: r
            .lease_expires_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        lease_ms: c.lease.as_millis() as u64,
        heartbeat_ms: c.heartbeat.as_millis() as u64,
        idempotency_key: r.idempotency_key,
        correlation_id: r.correlation_id.unwrap_or_else(|| r.id.to_string()),
        deadline: c.deadline.to_rfc3339(),
        timeout_ms: c.timeout.as_millis() as u64,
        cancel_requested: r.cancel_requested,
        traceparent: r.trace.as_ref().map(|t| t.traceparent.clone()),
        tracestate: r.trace.and_then(|t| t.tracestate),
    }
}

/// The tenant a worker call is confined to.
fn tenant(w: &WorkerCaller) -> Option<&str> {
    Some(w.0.tenant.as_str())
}

// ---- handlers ----

/// Claims runs of remote jobs for the caller's tenant: a long poll that
/// answers as soon as runs are claimed, or empty after `wait_ms`.
#[utoipa::path(
    post, path = "/api/worker/v1/claim", tag = "worker",
    request_body = ClaimRequest,
    responses(
        (status = 200, description = "The claimed runs (possibly none)", body = ClaimResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 422, description = "A job is unknown or not remote, or a field is wrong (named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn claim(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> ApiResult<Json<ClaimResponse>> {
    worker_name(&req.worker)?;
    if req.jobs.is_empty() || req.jobs.len() > MAX_CLAIM_JOBS {
        return Err(ApiError::invalid_field(
            "jobs",
            format!("`jobs`: name 1 to {MAX_CLAIM_JOBS} remote jobs"),
        ));
    }
    for (i, j) in req.jobs.iter().enumerate() {
        let field = format!("jobs[{i}]");
        match state.docket.job_is_remote(j) {
            Some(true) => {}
            Some(false) => {
                return Err(ApiError::invalid_field(
                    field.clone(),
                    format!("`{field}`: job `{j}` is not a remote job (declare it with `remote = true` in docket.toml)"),
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_job",
                    format!("`{field}`: unknown job `{j}`: it is not registered on this server"),
                )
                .field(field))
            }
        }
    }
    let max = req.max.unwrap_or(1);
    if !(1..=MAX_CLAIM).contains(&max) {
        return Err(ApiError::invalid_field(
            "max",
            format!("`max` must be 1 to {MAX_CLAIM}"),
        ));
    }
    let wait = req.wait_ms.unwrap_or(DEFAULT_CLAIM_WAIT_MS);
    if wait > MAX_CLAIM_WAIT_MS {
        return Err(ApiError::invalid_field(
            "wait_ms",
            format!("`wait_ms` must be 0 to {MAX_CLAIM_WAIT_MS}"),
        ));
    }
    let claim = RemoteClaim {
        tenant: tenant(&caller).map(str::to_string),
        worker: req.worker,
        jobs: req.jobs,
        max,
    };
    let mut stop = state.stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let runs = state
        .docket
        .remote_claim_wait(&claim, Duration::from_millis(wait), stopped)
        .await?;
    Ok(Json(ClaimResponse {
        runs: runs.into_iter().map(claimed_view).collect(),
    }))
}

/// Extends the caller's leases (each by its job's lease length).
#[utoipa::path(
    post, path = "/api/worker/v1/heartbeat", tag = "worker",
    request_body = HeartbeatRequest,
    responses(
        (status = 200, description = "Each lease: held or lost, and cancel requests", body = HeartbeatResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    worker_name(&req.worker)?;
    if req.leases.len() > MAX_HEARTBEAT_LEASES {
        return Err(ApiError::invalid_field(
            "leases",
            format!("`leases`: at most {MAX_HEARTBEAT_LEASES}"),
        ));
    }
    let mut refs = Vec::with_capacity(req.leases.len());
    for (i, l) in req.leases.iter().enumerate() {
        let run_id = l.run_id.parse().map_err(|_| {
            ApiError::invalid_field(format!("leases[{i}].run_id"), "not a run id (UUID)")
        })?;
        let lease_id = l.lease_id.parse().map_err(|_| {
            ApiError::invalid_field(format!("leases[{i}].lease_id"), "not a lease id (UUID)")
        })?;
        refs.push(LeaseRef { run_id, lease_id });
    }
    let states = state
        .docket
        .remote_heartbeat(tenant(&caller), &req.worker, refs)
        .await?;
    Ok(Json(HeartbeatResponse {
        leases: states
            .into_iter()
            .map(|s| LeaseStateView {
                run_id: s.lease.run_id.to_string(),
                lease_id: s.lease.lease_id.to_string(),
                held: s.held,
                cancel_requested: s.cancel_requested,
                lease_expires_at: s.expires_at.map(|t| t.to_rfc3339()),
            })
            .collect(),
    }))
}

/// Ends an attempt: completed, failed (the job's policy decides the
/// retry), postponed, or waiting for input. Fenced by the lease: a stale
/// one is refused (409 `stale_lease`) and recorded.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/end", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = EndRequest,
    responses(
        (status = 200, description = "The run's new status and the retry decision", body = EndResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The lease no longer holds the run (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn end(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<EndRequest>,
) -> ApiResult<Json<EndResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    let end = match req.outcome.as_str() {
        "completed" => RemoteEnd::Completed(req.output.unwrap_or(Value::Null)),
        "failed" => {
            let Some(e) = req.error else {
                return Err(ApiError::invalid_field(
                    "error",
                    "`error` is required with outcome `failed`",
                ));
            };
            RemoteEnd::Failed(failure("error", e)?)
        }
        "postponed" => {
            let Some(until) = req.until else {
                return Err(ApiError::invalid_field(
                    "until",
                    "`until` is required with outcome `postponed`",
                ));
            };
            RemoteEnd::Postponed(time("until", &until)?)
        }
        "needs_input" => {
            let Some(n) = req.name else {
                return Err(ApiError::invalid_field(
                    "name",
                    "`name` is required with outcome `needs_input`",
                ));
            };
            name("name", &n)?;
            RemoteEnd::NeedsInput {
                name: n,
                request: req.request.unwrap_or(Value::Null),
            }
        }
        other => {
            return Err(ApiError::invalid_field(
                "outcome",
                format!(
                    "`outcome`: `{other}` is not one of completed, failed, postponed, needs_input"
                ),
            ))
        }
    };
    let ended = state.docket.remote_end(tenant(&caller), lease, end).await?;
    state.hub.nudge();
    Ok(Json(end_view(ended)))
}

/// A stored step of the run (or a wait's decision, `input:NAME`).
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/steps/get", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = StepRequest,
    responses(
        (status = 200, description = "The step, if stored; or the attempt ended by the server (a cancel was requested and the step is not stored)", body = StepGetResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The lease no longer holds the run (`stale_lease`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn step_get(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<StepRequest>,
) -> ApiResult<Json<StepGetResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    let found = state
        .docket
        .remote_step_get(tenant(&caller), lease, &req.name)
        .await?;
    Ok(Json(match found {
        StepFound::Completed(v) => StepGetResponse {
            found: true,
            status: Some("completed".into()),
            result: Some(v),
            comment: None,
            decision: None,
            attempt_ended: None,
            message: None,
        },
        StepFound::Skipped(comment) => StepGetResponse {
            found: true,
            status: Some("skipped".into()),
            result: None,
            comment,
            decision: None,
            attempt_ended: None,
            message: None,
        },
        StepFound::Missing => StepGetResponse {
            found: false,
            status: None,
            result: None,
            comment: None,
            decision: None,
            attempt_ended: None,
            message: None,
        },
        StepFound::Ended(answer) => {
            // The attempt ended on the server: wake SSE subscribers, as the
            // action calls' endings do.
            state.hub.nudge();
            let a = action_view(answer);
            StepGetResponse {
                found: false,
                status: a.status,
                result: None,
                comment: None,
                decision: Some(a.decision),
                attempt_ended: a.attempt_ended,
                message: a.message,
            }
        }
    }))
}

/// Stores a completed step (once per name and run), fenced by the lease.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/steps/complete", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = StepCompleteRequest,
    responses(
        (status = 200, description = "Stored; whether a cancel was requested", body = StepCompleteResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded), or the step is already stored (`conflict`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn step_complete(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<StepCompleteRequest>,
) -> ApiResult<Json<StepCompleteResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    let cancel_requested = state
        .docket
        .remote_step_complete(tenant(&caller), lease, &req.name, req.result)
        .await?;
    state.hub.nudge();
    Ok(Json(StepCompleteResponse { cancel_requested }))
}

/// Records a step's failure (its class), fenced by the lease.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/steps/fail", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = StepFailRequest,
    responses(
        (status = 200, description = "Recorded", body = Empty),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded), or the step is already stored (`conflict`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn step_fail(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<StepFailRequest>,
) -> ApiResult<Json<Empty>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    let f = failure("error", req.error)?;
    state
        .docket
        .remote_step_fail(tenant(&caller), lease, &req.name, f)
        .await?;
    state.hub.nudge();
    Ok(Json(Empty {}))
}

/// Begins a ledger-guarded action: replay, committed elsewhere, run,
/// reconcile, or the attempt ended by the server (deferred, cancelled).
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/actions/begin", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = ActionBeginRequest,
    responses(
        (status = 200, description = "The decision", body = ActionResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn action_begin(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<ActionBeginRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    name("key", &req.key)?;
    let a = state
        .docket
        .remote_action_begin(tenant(&caller), lease, &req.name, &req.key)
        .await?;
    state.hub.nudge();
    Ok(Json(action_view(a)))
}

/// Commits an action the service answered: the ledger row becomes
/// `committed` (final) and the step is stored.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/actions/commit", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = ActionCommitRequest,
    responses(
        (status = 200, description = "`done`, `failed` or `deferred`", body = ActionResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn action_commit(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<ActionCommitRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    name("key", &req.key)?;
    let a = state
        .docket
        .remote_action_commit(tenant(&caller), lease, &req.name, &req.key, req.result)
        .await?;
    state.hub.nudge();
    Ok(Json(action_view(a)))
}

/// Records that sending an action failed (`timeout`: outcome unknown).
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/actions/fail", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = ActionFailRequest,
    responses(
        (status = 200, description = "`failed` (the error to raise) or `deferred`", body = ActionResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn action_fail(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<ActionFailRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    name("key", &req.key)?;
    let f = failure("error", req.error)?;
    let a = state
        .docket
        .remote_action_fail(tenant(&caller), lease, &req.name, &req.key, f)
        .await?;
    state.hub.nudge();
    Ok(Json(action_view(a)))
}

/// What the worker's reconcile function found about an action whose last
/// outcome was unknown.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/actions/reconciled", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = ActionReconciledRequest,
    responses(
        (status = 200, description = "`done`, `run`, `failed` or `deferred`", body = ActionResponse),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn action_reconciled(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<ActionReconciledRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let lease = lease(&id, &req.lease_id)?;
    name("name", &req.name)?;
    name("key", &req.key)?;
    let found = match req.found.as_str() {
        "committed" => RemoteReconciled::Committed(req.result.unwrap_or(Value::Null)),
        "not_done" => RemoteReconciled::NotDone,
        "still_unknown" => RemoteReconciled::StillUnknown,
        "no_reconcile" => RemoteReconciled::NoReconcile,
        "error" => {
            let Some(e) = req.error else {
                return Err(ApiError::invalid_field(
                    "error",
                    "`error` is required with found `error`",
                ));
            };
            RemoteReconciled::Error(failure("error", e)?)
        }
        other => {
            return Err(ApiError::invalid_field(
                "found",
                format!("`found`: `{other}` is not one of committed, not_done, still_unknown, error, no_reconcile"),
            ))
        }
    };
    let a = state
        .docket
        .remote_action_reconciled(tenant(&caller), lease, &req.name, &req.key, found)
        .await?;
    state.hub.nudge();
    Ok(Json(action_view(a)))
}

/// Appends a `progress` event to the run, fenced by the lease.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/progress", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = ProgressRequest,
    responses(
        (status = 200, description = "Recorded", body = Empty),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn progress(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<ProgressRequest>,
) -> ApiResult<Json<Empty>> {
    let lease = lease(&id, &req.lease_id)?;
    let message = req.message.unwrap_or_default();
    text("message", &message, MAX_MESSAGE)?;
    state
        .docket
        .remote_event(
            tenant(&caller),
            lease,
            docket::EventKind::Progress,
            serde_json::json!({ "current": req.current, "total": req.total, "message": message }),
        )
        .await?;
    state.hub.nudge();
    Ok(Json(Empty {}))
}

/// Appends a `log` event to the run, fenced by the lease.
#[utoipa::path(
    post, path = "/api/worker/v1/runs/{id}/log", tag = "worker",
    params(("id" = String, Path, description = "The run's id")),
    request_body = LogRequest,
    responses(
        (status = 200, description = "Recorded", body = Empty),
        (status = 403, description = "Not a worker token (`forbidden`, field `scope`)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "A stale lease (`stale_lease`, recorded)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn log(
    State(state): State<AppState>,
    caller: WorkerCaller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<LogRequest>,
) -> ApiResult<Json<Empty>> {
    let lease = lease(&id, &req.lease_id)?;
    if !matches!(req.level.as_str(), "debug" | "info" | "warn" | "error") {
        return Err(ApiError::invalid_field(
            "level",
            format!(
                "`level`: `{}` is not one of debug, info, warn, error",
                req.level
            ),
        ));
    }
    text("message", &req.message, MAX_MESSAGE)?;
    state
        .docket
        .remote_event(
            tenant(&caller),
            lease,
            docket::EventKind::Log,
            serde_json::json!({ "level": req.level, "message": req.message, "data": req.data }),
        )
        .await?;
    state.hub.nudge();
    Ok(Json(Empty {}))
}

/// The remote workers seen in the caller's tenant, most recent first, with
/// their jobs, last claim or heartbeat, and runs running now.
#[utoipa::path(
    get, path = "/api/workers", tag = "worker",
    responses((status = 200, description = "The workers", body = WorkerList)),
    security(("bearer" = []))
)]
pub async fn workers(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<WorkerList>> {
    let list = state
        .store()
        .list_workers(Some(caller.tenant.clone()))
        .await?;
    Ok(Json(WorkerList {
        workers: list
            .into_iter()
            .map(|w| WorkerView {
                name: w.name,
                tenant: w.tenant,
                jobs: w.jobs,
                first_seen_at: w.first_seen_at.to_rfc3339(),
                last_seen_at: w.last_seen_at.to_rfc3339(),
                running: w.running,
            })
            .collect(),
    }))
}
