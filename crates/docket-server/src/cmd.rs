//! The seed's command endpoint: `POST /api/core/cmd` (and `/api/bpm/cmd`,
//! the path the seed's own client code calls).
//!
//! Request: `{"cmd": "RetryFailedTaskCommand", "data": {...}}`. Answer:
//! `{"isSuccessful", "message", "statusCode": "00" | "99", "data"}` with
//! the shapes of seed 003. A process instance is a run (`instanceGuid` is
//! its id), a task is a durable step (or the job itself when the run has no
//! steps), the process variables are the run's variables, and "error state"
//! is `failed`.
//!
//! `RetryFailedTaskCommand` answers with the retried attempt's outcome: it
//! waits (at most `data.waitTimeoutMs`, default 30,000) until that attempt
//! ends, then answers "retried successfully and process continued",
//! "retry failed" (with the attempt number, the error and `nextActions`),
//! or "waiting at next UserTask" — or, when the bound passes first, with
//! the run still running.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::AppState;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use docket::{Actor, Run, RunId, RunStatus, StepStatus, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;
use utoipa::ToSchema;

/// The default bound on waiting for a retried attempt's outcome.
pub const DEFAULT_RETRY_WAIT_MS: u64 = 30_000;
/// The largest bound a request may ask for.
pub const MAX_RETRY_WAIT_MS: u64 = 300_000;

/// The command envelope.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CommandRequest {
    /// `RetryFailedTaskCommand`, `SkipFailedTaskCommand`,
    /// `CancelProcessInstanceCommand` or `GetProcessStateCommand`.
    pub cmd: String,
    /// The command's fields; all take `instanceGuid` (the run's id).
    /// Retry also takes `updatedVariables` (an object merged into the run's
    /// variables), `comment` (audit trail) and `waitTimeoutMs` (default
    /// 30000, at most 300000; 0 answers at once); skip and cancel take
    /// `comment`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
}

/// The answer envelope.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandResponse {
    /// Whether the command did what was asked.
    pub is_successful: bool,
    /// A sentence for people.
    pub message: String,
    /// `00` on success, `99` otherwise.
    pub status_code: String,
    /// The command's result (shapes in docs/API.md).
    #[schema(value_type = Object)]
    pub data: Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RetryData {
    instance_guid: String,
    updated_variables: Option<Value>,
    comment: Option<String>,
    #[serde(default, deserialize_with = "crate::extract::integral::opt_u64")]
    wait_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceData {
    instance_guid: String,
    comment: Option<String>,
}

fn envelope(status: StatusCode, ok: bool, message: impl Into<String>, data: Value) -> Response {
    (
        status,
        Json(CommandResponse {
            is_successful: ok,
            message: message.into(),
            status_code: if ok { "00" } else { "99" }.into(),
            data,
        }),
    )
        .into_response()
}

impl ApiError {
    /// The error in the command envelope (same HTTP status).
    pub(crate) fn into_envelope(self) -> Response {
        let mut data = json!({ "code": self.detail.code });
        if let Some(f) = &self.detail.field {
            data["field"] = json!(f);
        }
        if let Some(s) = &self.detail.current_status {
            data["currentStatus"] = json!(s);
        }
        envelope(self.status, false, self.detail.message, data)
    }
}

fn not_found(guid: &str) -> Response {
    envelope(
        StatusCode::NOT_FOUND,
        false,
        format!("Process instance '{guid}' not found."),
        Value::Null,
    )
}

fn not_in_error(status: RunStatus) -> Response {
    envelope(
        StatusCode::CONFLICT,
        false,
        format!("Process instance is not in error state. Current state: {status}"),
        json!({ "currentStatus": status.to_string() }),
    )
}

/// The seed's word for a run's state.
fn seed_status(run: &Run, now: Timestamp) -> &'static str {
    match run.status {
        RunStatus::Failed => "error",
        RunStatus::NeedsInput => "waiting",
        RunStatus::Completed => "completed",
        RunStatus::Cancelled => "cancelled",
        RunStatus::Postponed => "postponed",
        RunStatus::Pending if run.is_retry_scheduled(now) => "retry_scheduled",
        RunStatus::Pending | RunStatus::Running => "running",
    }
}

fn parse_data<T: DeserializeOwned>(data: Value) -> Result<T, ApiError> {
    // serde would read an array as the fields in order; refuse it.
    if !data.is_object() {
        return Err(ApiError::invalid_field(
            "data",
            "`data`: expected a JSON object with the command's fields (instanceGuid, …)",
        ));
    }
    serde_path_to_error::deserialize::<_, T>(data).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let field = match msg.strip_prefix("missing field `") {
            Some(rest) => {
                let f = rest.split('`').next().unwrap_or("");
                if path == "." {
                    format!("data.{f}")
                } else {
                    format!("data.{path}.{f}")
                }
            }
            None if path == "." => "data".to_string(),
            None => format!("data.{path}"),
        };
        ApiError::invalid_field(
            field.clone(),
            format!("`{field}`: {}", crate::extract::plain(&msg)),
        )
    })
}

/// What the command endpoint knows about a run's steps.
struct Tasks {
    completed: Vec<String>,
    failed: Option<String>,
}

async fn tasks(state: &AppState, run: &Run) -> Result<Tasks, ApiError> {
    let mut steps = state.docket.store().steps(run.id).await?;
    steps.sort_by_key(|s| s.updated_at);
    Ok(Tasks {
        completed: steps
            .iter()
            .filter(|s| s.status == StepStatus::Completed && !s.name.starts_with("input:"))
            .map(|s| s.name.clone())
            .collect(),
        failed: steps
            .iter()
            .rev()
            .find(|s| s.status == StepStatus::Failed)
            .map(|s| s.name.clone()),
    })
}

fn current_node(run: &Run, t: &Tasks) -> Value {
    match run.status {
        RunStatus::NeedsInput => json!(input_name(run)),
        _ => json!(t
            .completed
            .last()
            .cloned()
            .unwrap_or_else(|| run.job.clone())),
    }
}

fn input_name(run: &Run) -> String {
    run.input_request
        .as_ref()
        .and_then(|r| r.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("input")
        .to_string()
}

fn next_actions(run: &Run) -> Value {
    match run.status {
        RunStatus::Failed => json!([
            { "action": "retry", "label": "Retry Again", "command": "RetryFailedTaskCommand" },
            { "action": "skip", "label": "Skip This Task", "command": "SkipFailedTaskCommand" },
            { "action": "cancel", "label": "Cancel Process", "command": "CancelProcessInstanceCommand" },
        ]),
        RunStatus::NeedsInput => json!([
            { "action": "approve", "label": "Approve" },
            { "action": "reject", "label": "Reject" },
            { "action": "cancel", "label": "Cancel Process", "command": "CancelProcessInstanceCommand" },
        ]),
        RunStatus::Pending | RunStatus::Running | RunStatus::Postponed => json!([
            { "action": "cancel", "label": "Cancel Process", "command": "CancelProcessInstanceCommand" },
        ]),
        RunStatus::Completed | RunStatus::Cancelled => json!([
            { "action": "retrigger", "label": "Run Again" },
        ]),
    }
}

/// The `error` object of a failed run.
async fn error_info(state: &AppState, run: &Run, t: &Tasks) -> Result<Value, ApiError> {
    let attempts = state.docket.store().attempts(run.id).await?;
    let last = attempts.last();
    let task = t
        .failed
        .clone()
        .or_else(|| last.and_then(|a| a.action.clone()))
        .unwrap_or_else(|| run.job.clone());
    Ok(json!({
        "taskId": task,
        "taskName": task,
        "errorMessage": run.last_error_message.clone().unwrap_or_default(),
        "errorClass": run.last_error_class.map(|c| c.to_string()),
        "terminalReason": run.terminal_reason.map(|r| r.to_string()),
        "attemptNumber": run.attempt,
        "lastAttemptAt": last.and_then(|a| a.finished_at).unwrap_or(run.updated_at).to_rfc3339(),
    }))
}

/// The caller's run by guid, or the seed's not-found answer.
async fn find(state: &AppState, caller: &Caller, guid: &str) -> Result<Run, Response> {
    let Ok(id) = guid.parse::<RunId>() else {
        return Err(not_found(guid));
    };
    match crate::runs::load_run(state, caller, id).await {
        Ok(r) => Ok(r),
        Err(e) if e.status == StatusCode::NOT_FOUND => Err(not_found(guid)),
        Err(e) => Err(e.into_envelope()),
    }
}

/// The seed's command API.
#[utoipa::path(
    post, path = "/api/core/cmd", tag = "commands",
    request_body = CommandRequest,
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the operator action (retry, skip, cancel) becomes a span in this trace, linked to the run's (an invalid value is ignored)"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, kept with `traceparent`"),
    ),
    responses(
        (status = 200, description = "The command ran (see isSuccessful)", body = CommandResponse),
        (status = 400, description = "Not JSON, or an unknown command", body = CommandResponse),
        (status = 401, description = "No valid token", body = CommandResponse),
        (status = 404, description = "Process instance '…' not found.", body = CommandResponse),
        (status = 409, description = "Process instance is not in error state. Current state: …", body = CommandResponse),
        (status = 422, description = "A field is wrong (named)", body = CommandResponse),
    ),
    security(("bearer" = []))
)]
pub async fn core_cmd(
    state: State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<ApiJson<CommandRequest>, ApiError>,
) -> Response {
    command(state, caller, &headers, body).await
}

/// The seed's command API at the path its client code calls.
#[utoipa::path(
    post, path = "/api/bpm/cmd", tag = "commands",
    request_body = CommandRequest,
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the operator action (retry, skip, cancel) becomes a span in this trace, linked to the run's (an invalid value is ignored)"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, kept with `traceparent`"),
    ),
    responses(
        (status = 200, description = "The command ran (see isSuccessful)", body = CommandResponse),
        (status = 400, description = "Not JSON, or an unknown command", body = CommandResponse),
        (status = 401, description = "No valid token", body = CommandResponse),
        (status = 404, description = "Process instance '…' not found.", body = CommandResponse),
        (status = 409, description = "Process instance is not in error state. Current state: …", body = CommandResponse),
        (status = 422, description = "A field is wrong (named)", body = CommandResponse),
    ),
    security(("bearer" = []))
)]
pub async fn bpm_cmd(
    state: State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<ApiJson<CommandRequest>, ApiError>,
) -> Response {
    command(state, caller, &headers, body).await
}

async fn command(
    State(state): State<AppState>,
    caller: Result<Caller, ApiError>,
    headers: &HeaderMap,
    body: Result<ApiJson<CommandRequest>, ApiError>,
) -> Response {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return e.into_envelope(),
    };
    let req = match body {
        Ok(ApiJson(r)) => r,
        Err(e) => return e.into_envelope(),
    };
    // The caller's trace context: operator actions become spans in it.
    let trace = crate::runs::trace_headers(headers);
    let res = match req.cmd.as_str() {
        "RetryFailedTaskCommand" => retry(&state, &caller, trace, req.data).await,
        "SkipFailedTaskCommand" => skip(&state, &caller, trace, req.data).await,
        "CancelProcessInstanceCommand" => cancel(&state, &caller, trace, req.data).await,
        "GetProcessStateCommand" => get_state(&state, &caller, req.data).await,
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_command",
            format!(
                "Unknown command '{other}'. Expected RetryFailedTaskCommand, SkipFailedTaskCommand, CancelProcessInstanceCommand or GetProcessStateCommand."
            ),
        )
        .field("cmd")
        .into_envelope()),
    };
    res.unwrap_or_else(|r| r)
}

type CmdResult = Result<Response, Response>;

fn env_err(e: ApiError) -> Response {
    e.into_envelope()
}

async fn retry(
    state: &AppState,
    caller: &Caller,
    trace: Option<docket::TraceContext>,
    data: Value,
) -> CmdResult {
    let d: RetryData = parse_data(data).map_err(env_err)?;
    if let Some(v) = &d.updated_variables {
        if !v.is_object() {
            return Err(env_err(ApiError::invalid_field(
                "data.updatedVariables",
                "`data.updatedVariables` must be a JSON object",
            )));
        }
    }
    let wait_ms = d.wait_timeout_ms.unwrap_or(DEFAULT_RETRY_WAIT_MS);
    if wait_ms > MAX_RETRY_WAIT_MS {
        return Err(env_err(ApiError::invalid_field(
            "data.waitTimeoutMs",
            format!("`data.waitTimeoutMs` must be at most {MAX_RETRY_WAIT_MS}"),
        )));
    }
    let run = find(state, caller, &d.instance_guid).await?;
    if run.status != RunStatus::Failed {
        return Err(not_in_error(run.status));
    }
    let before = tasks(state, &run).await.map_err(env_err)?;
    let task = before.failed.clone().unwrap_or_else(|| run.job.clone());
    let previous_attempts = run.attempt;
    // Subscribe before the retry so no event of the new attempt is missed.
    let mut rx = state.hub.subscribe();
    let retried = match state
        .docket
        .retry(
            run.id,
            d.updated_variables,
            Actor::new(caller.name.clone(), d.comment.clone()).with_trace(trace),
        )
        .await
    {
        Ok(r) => r,
        Err(docket::Error::WrongState { current, .. }) => return Err(not_in_error(current)),
        Err(e) => return Err(env_err(e.into())),
    };
    state.hub.nudge();
    let retried_at = state.docket.clock().now();
    let run = wait_outcome(state, &mut rx, retried, previous_attempts, wait_ms).await;
    let now = state.docket.clock().now();
    let t = tasks(state, &run).await.map_err(env_err)?;
    let mut retried_task = json!({
        "taskId": task,
        "taskName": task,
        "previousAttempts": previous_attempts,
        "retriedAt": retried_at.to_rfc3339(),
    });
    if let Some(c) = &d.comment {
        retried_task["retryComment"] = json!(c);
    }
    let attempts = state
        .docket
        .store()
        .attempts(run.id)
        .await
        .map_err(|e| env_err(e.into()))?;
    let this = attempts.iter().find(|a| a.attempt > previous_attempts);
    let exec_ms = this.and_then(|a| a.finished_at.map(|f| f.millis_since(a.started_at)));
    let guid = run.id.to_string();
    let failed_again = run.status == RunStatus::Failed
        || (run.status == RunStatus::Pending && run.attempt > previous_attempts);
    if failed_again {
        let error = error_info(state, &run, &t).await.map_err(env_err)?;
        let mut data = json!({
            "instanceGuid": guid,
            "status": seed_status(&run, now),
            "error": error,
            "nextActions": next_actions(&run),
        });
        if run.status == RunStatus::Pending {
            data["error"]["nextRetryAt"] = json!(run.run_after.to_rfc3339());
        }
        return Ok(envelope(StatusCode::OK, false, "Task retry failed.", data));
    }
    let state_obj = json!({
        "variables": run.variables,
        "currentNode": current_node(&run, &t),
        "completedTasks": t.completed,
    });
    match run.status {
        RunStatus::NeedsInput => {
            let name = input_name(&run);
            Ok(envelope(
                StatusCode::OK,
                true,
                "Task retried successfully. Process waiting at next UserTask.",
                json!({
                    "instanceGuid": guid,
                    "status": "waiting",
                    "currentActivityId": name,
                    "retriedTask": retried_task,
                    "currentTask": {
                        "taskId": name,
                        "taskName": name,
                        "taskType": "UserTask",
                        "request": run.input_request.as_ref().and_then(|r| r.get("request")).cloned(),
                    },
                    "state": { "variables": run.variables },
                    "nextActions": next_actions(&run),
                }),
            ))
        }
        RunStatus::Completed | RunStatus::Postponed | RunStatus::Cancelled => Ok(envelope(
            StatusCode::OK,
            true,
            "Task retried successfully and process continued.",
            json!({
                "instanceGuid": guid,
                "status": seed_status(&run, now),
                "currentActivityId": current_node(&run, &t),
                "retriedTask": retried_task,
                "result": {
                    "message": "Task execution successful",
                    "taskExecutionTime": exec_ms,
                    "waiting": false,
                    "output": run.output,
                },
                "state": state_obj,
            }),
        )),
        _ => Ok(envelope(
            StatusCode::OK,
            true,
            format!("Task retried; the process is still running after waiting {wait_ms} ms."),
            json!({
                "instanceGuid": guid,
                "status": "running",
                "currentActivityId": current_node(&run, &t),
                "retriedTask": retried_task,
                "result": {
                    "message": "The retried task has not finished yet",
                    "taskExecutionTime": null,
                    "waiting": false,
                    "timedOut": true,
                },
                "state": state_obj,
                "nextActions": next_actions(&run),
            }),
        )),
    }
}

/// Whether the attempt after `previous` has ended (or the run moved on).
fn settled(run: &Run, previous: u32) -> bool {
    match run.status {
        RunStatus::Completed
        | RunStatus::Failed
        | RunStatus::Cancelled
        | RunStatus::NeedsInput
        | RunStatus::Postponed => true,
        RunStatus::Pending => run.attempt > previous,
        RunStatus::Running => false,
    }
}

/// Waits, at most `wait_ms`, for the retried attempt's outcome; returns the
/// run as last seen. Woken by the event hub; re-reads every 250 ms as well.
async fn wait_outcome(
    state: &AppState,
    rx: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<docket::EventRecord>>,
    mut run: Run,
    previous: u32,
    wait_ms: u64,
) -> Run {
    let id = run.id;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut stop = state.stop.clone();
    loop {
        if settled(&run, previous) {
            return run;
        }
        let woke = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => false,
            _ = async { let _ = stop.wait_for(|s| *s).await; } => false,
            _ = async {
                loop {
                    match rx.recv().await {
                        Ok(e) if e.run_id == id => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            } => true,
            _ = tokio::time::sleep(Duration::from_millis(250)) => true,
        };
        if let Ok(Some(r)) = state.docket.store().get_run(id).await {
            run = r;
        }
        if !woke {
            return run;
        }
    }
}

async fn skip(
    state: &AppState,
    caller: &Caller,
    trace: Option<docket::TraceContext>,
    data: Value,
) -> CmdResult {
    let d: InstanceData = parse_data(data).map_err(env_err)?;
    let run = find(state, caller, &d.instance_guid).await?;
    if run.status != RunStatus::Failed {
        return Err(not_in_error(run.status));
    }
    let t = tasks(state, &run).await.map_err(env_err)?;
    let task = t.failed.clone().unwrap_or_else(|| run.job.clone());
    let after = match state
        .docket
        .skip(
            run.id,
            Actor::new(caller.name.clone(), d.comment.clone()).with_trace(trace),
        )
        .await
    {
        Ok(r) => r,
        Err(docket::Error::WrongState { current, .. }) => return Err(not_in_error(current)),
        Err(e) => return Err(env_err(e.into())),
    };
    state.hub.nudge();
    let now = state.docket.clock().now();
    Ok(envelope(
        StatusCode::OK,
        true,
        "Task skipped successfully and process continued.",
        json!({
            "instanceGuid": after.id.to_string(),
            "status": seed_status(&after, now),
            "skippedTask": {
                "taskId": task,
                "taskName": task,
                "skippedAt": now.to_rfc3339(),
                "comment": d.comment,
            },
            "state": { "variables": after.variables },
        }),
    ))
}

async fn cancel(
    state: &AppState,
    caller: &Caller,
    trace: Option<docket::TraceContext>,
    data: Value,
) -> CmdResult {
    let d: InstanceData = parse_data(data).map_err(env_err)?;
    let run = find(state, caller, &d.instance_guid).await?;
    let after = match state
        .docket
        .cancel(
            run.id,
            Actor::new(caller.name.clone(), d.comment.clone()).with_trace(trace),
        )
        .await
    {
        Ok(r) => r,
        Err(docket::Error::WrongState { current, .. }) => {
            return Err(envelope(
                StatusCode::CONFLICT,
                false,
                format!("Process instance cannot be cancelled. Current state: {current}"),
                json!({ "currentStatus": current.to_string() }),
            ))
        }
        Err(e) => return Err(env_err(e.into())),
    };
    state.hub.nudge();
    let (message, status) = if after.status == RunStatus::Cancelled {
        ("Process instance cancelled.", "cancelled")
    } else {
        (
            "Cancellation requested; the process stops at its next step boundary.",
            "cancelling",
        )
    };
    Ok(envelope(
        StatusCode::OK,
        true,
        message,
        json!({
            "instanceGuid": after.id.to_string(),
            "status": status,
            "comment": d.comment,
        }),
    ))
}

async fn get_state(state: &AppState, caller: &Caller, data: Value) -> CmdResult {
    let d: InstanceData = parse_data(data).map_err(env_err)?;
    let run = find(state, caller, &d.instance_guid).await?;
    let now = state.docket.clock().now();
    let t = tasks(state, &run).await.map_err(env_err)?;
    let mut data = json!({
        "instanceGuid": run.id.to_string(),
        "status": seed_status(&run, now),
        "runStatus": run.status.to_string(),
        "job": run.job,
        "currentActivityId": current_node(&run, &t),
        "attemptNumber": run.attempt,
        "state": {
            "variables": run.variables,
            "currentNode": current_node(&run, &t),
            "completedTasks": t.completed,
        },
        "nextActions": next_actions(&run),
    });
    if run.status == RunStatus::Failed || run.last_error_class.is_some() {
        data["error"] = error_info(state, &run, &t).await.map_err(env_err)?;
    }
    if run.status == RunStatus::NeedsInput {
        let name = input_name(&run);
        data["currentTask"] = json!({
            "taskId": name,
            "taskName": name,
            "taskType": "UserTask",
            "request": run.input_request.as_ref().and_then(|r| r.get("request")).cloned(),
        });
    }
    if let Some(out) = &run.output {
        data["output"] = out.clone();
    }
    Ok(envelope(
        StatusCode::OK,
        true,
        "Process state retrieved.",
        data,
    ))
}
