//! Signals over HTTP (docs/DURABLE.md, "Signals"): send one to a run
//! (`POST /api/runs/{id}/signals/{name}`), list a run's signals
//! (`GET /api/runs/{id}/signals`), and send one by correlation key to every
//! run of the caller's tenant waiting for it (`POST /api/signals`). The
//! sender recorded in the run's timeline is the token's name.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiPath, OptionalJson};
use crate::runs::load_run;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use docket::signals::{SignalOptions, SignalRecord};
use docket::{RunId, Timestamp};
use docket_store::signals::{check_key, check_name, check_payload, MAX_SIGNAL_BYTES};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A signal for one run (the body is optional: no body sends `null`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The payload (any JSON, at most 64 KiB as JSON text; default `null`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
    /// An id for idempotency: the same id for the same run twice is one
    /// signal (the repeat answers 200 with the original). 1 to 128 of
    /// `A-Z a-z 0-9 _ . -`. Docket makes one when absent.
    pub signal_id: Option<String>,
}

/// A signal for every run waiting for its name and key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyedSignalRequest {
    /// The signal's name (1 to 128 of `A-Z a-z 0-9 _ . -`).
    pub name: String,
    /// The correlation key (1 to 256 bytes, no control characters),
    /// matched exactly.
    pub key: String,
    /// The payload (any JSON, at most 64 KiB; default `null`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
    /// An id for idempotency (as for a run's signal): a repeat reaches no
    /// run twice and answers the runs the first send reached.
    pub signal_id: Option<String>,
}

/// A signal one run received.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignalView {
    /// Its id.
    pub id: String,
    /// The run.
    pub run_id: String,
    /// Its name.
    pub name: String,
    /// The correlation key it was sent by, if it was.
    pub key: Option<String>,
    /// Its payload.
    #[schema(value_type = Object)]
    pub data: Value,
    /// Who sent it (the token's name; `rust` from the library).
    pub sent_by: String,
    /// When it was received (RFC 3339).
    pub received_at: String,
    /// The wait that consumed it (`signal:NAME:N`); `null` while pending.
    pub delivered_to: Option<String>,
    /// When it was consumed (RFC 3339).
    pub delivered_at: Option<String>,
}

impl From<&SignalRecord> for SignalView {
    fn from(s: &SignalRecord) -> Self {
        SignalView {
            id: s.id.clone(),
            run_id: s.run_id.to_string(),
            name: s.name.clone(),
            key: s.key.clone(),
            data: s.data.clone(),
            sent_by: s.sent_by.clone(),
            received_at: s.received_at.to_rfc3339(),
            delivered_to: s.delivered_to.clone(),
            delivered_at: s.delivered_at.map(Timestamp::to_rfc3339),
        }
    }
}

/// The answer to a signal for one run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignalSent {
    /// The signal as stored (the original for a repeated `signal_id`).
    pub signal: SignalView,
    /// The `signal_id` was already used for this run: nothing was written
    /// (HTTP 200 instead of 201).
    pub duplicate: bool,
    /// The run was waiting for this name and is due now.
    pub woke: bool,
}

/// The answer to a keyed signal.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyedSignalSent {
    /// The signal's id (the request's, or the one Docket made: send it
    /// again with this id to retry safely).
    pub signal_id: String,
    /// Every run the signal reached (by this call or an earlier one with
    /// the same id), by id.
    pub runs: Vec<String>,
    /// The runs this call woke.
    pub woke: Vec<String>,
}

/// A run's signals.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignalList {
    /// In arrival order.
    pub signals: Vec<SignalView>,
}

fn check_body(data: &Value, signal_id: &Option<String>) -> ApiResult<()> {
    if let Some(id) = signal_id {
        check_name("signal_id", id).map_err(|m| ApiError::invalid_field("signal_id", m))?;
    }
    if let Err(size) = check_payload(data) {
        return Err(ApiError::too_large(format!(
            "`data` is {size} bytes of JSON; a signal's payload is at most {MAX_SIGNAL_BYTES} bytes"
        ))
        .field("data"));
    }
    Ok(())
}

/// The two path parameters of a run's signal.
#[derive(Debug)]
pub struct RunAndName(String, String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RunAndName {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        use axum::extract::Path;
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((id, name))) => Ok(RunAndName(id, name)),
            Err(_) => Err(ApiError::bad_param(
                "path",
                format!(
                    "the path `{}` does not decode to UTF-8 text",
                    parts.uri.path()
                ),
            )),
        }
    }
}

/// Sends a signal to a run: kept until a wait of the run for this name
/// consumes it; a run suspended in such a wait is due at once.
#[utoipa::path(
    post, path = "/api/runs/{id}/signals/{name}", tag = "operator",
    operation_id = "signal_run",
    params(
        ("id" = String, Path, description = "The run's id"),
        ("name" = String, Path, description = "The signal's name: 1 to 128 of `A-Z a-z 0-9 _ . -`"),
    ),
    request_body(content = Option<SignalRequest>, description = "Optional"),
    responses(
        (status = 201, description = "Stored (and the run woken if it waited for it)", body = SignalSent),
        (status = 200, description = "The `signal_id` was already used for this run: the original", body = SignalSent),
        (status = 400, description = "A bad signal name (the field is named)", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is final (its state is named)", body = ErrorBody),
        (status = 413, description = "The payload is over 64 KiB", body = ErrorBody),
        (status = 422, description = "A bad `signal_id` (named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send(
    State(state): State<AppState>,
    caller: Caller,
    RunAndName(id, name): RunAndName,
    OptionalJson(req): OptionalJson<SignalRequest>,
) -> ApiResult<Response> {
    let id: RunId = id.parse().map_err(|_| ApiError::run_not_found(&id))?;
    check_name("name", &name).map_err(|m| ApiError::bad_param("name", m))?;
    check_body(&req.data, &req.signal_id)?;
    let sent = state
        .docket
        .signal(
            id,
            &name,
            req.data,
            SignalOptions {
                signal_id: req.signal_id,
                sent_by: Some(caller.name.clone()),
                tenant: Some(caller.tenant.clone()),
            },
        )
        .await?;
    state.hub.nudge();
    let status = if sent.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(SignalSent {
            signal: SignalView::from(&sent.signal),
            duplicate: sent.duplicate,
            woke: sent.woke,
        }),
    )
        .into_response())
}

/// A run's signals in arrival order, pending and delivered.
#[utoipa::path(
    get, path = "/api/runs/{id}/signals", tag = "runs",
    operation_id = "list_run_signals",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run's signals", body = SignalList),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<SignalList>> {
    let id: RunId = id.parse().map_err(|_| ApiError::run_not_found(&id))?;
    load_run(&state, &caller, id).await?;
    let signals = state.docket.signals(id).await?;
    Ok(Json(SignalList {
        signals: signals.iter().map(SignalView::from).collect(),
    }))
}

/// Sends a signal by correlation key to every run of the caller's tenant
/// that waits for this name with exactly this key now, in one transaction,
/// and answers the runs it reached. Nobody waiting: nothing is kept (the
/// answer's `runs` is empty; send it again later with the same
/// `signal_id`).
#[utoipa::path(
    post, path = "/api/signals", tag = "operator",
    operation_id = "signal_by_key",
    request_body = KeyedSignalRequest,
    responses(
        (status = 200, description = "The runs reached (possibly none)", body = KeyedSignalSent),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 413, description = "The payload is over 64 KiB", body = ErrorBody),
        (status = 422, description = "A bad `name`, `key` or `signal_id` (named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send_keyed(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<KeyedSignalRequest>,
) -> ApiResult<Json<KeyedSignalSent>> {
    check_name("name", &req.name).map_err(|m| ApiError::invalid_field("name", m))?;
    check_key("key", &req.key).map_err(|m| ApiError::invalid_field("key", m))?;
    check_body(&req.data, &req.signal_id)?;
    let signal_id = req
        .signal_id
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let sent = state
        .docket
        .signal_by_key(
            &caller.tenant,
            &req.name,
            &req.key,
            req.data,
            SignalOptions {
                signal_id: Some(signal_id.clone()),
                sent_by: Some(caller.name.clone()),
                tenant: Some(caller.tenant.clone()),
            },
        )
        .await?;
    state.hub.nudge();
    Ok(Json(KeyedSignalSent {
        signal_id,
        runs: sent.iter().map(|s| s.signal.run_id.to_string()).collect(),
        woke: sent
            .iter()
            .filter(|s| s.woke)
            .map(|s| s.signal.run_id.to_string())
            .collect(),
    }))
}

/// What a postponed run waits for, from its open signal waits and its
/// durable sleeps (`sleep:NAME` steps whose wake time is the run's
/// `run_after`); `None` for any other run.
pub(crate) async fn wait_of(
    state: &AppState,
    run: &docket::Run,
    steps: &[docket::StepRecord],
) -> ApiResult<Option<crate::dto::WaitView>> {
    if run.status != docket::RunStatus::Postponed {
        return Ok(None);
    }
    if let Some(w) = state.docket.signal_waits(run.id).await?.into_iter().next() {
        let key = w
            .key
            .as_ref()
            .map(|k| format!(" with key \"{k}\""))
            .unwrap_or_default();
        return Ok(Some(crate::dto::WaitView {
            kind: "signal".into(),
            summary: format!(
                "waiting for signal \"{}\"{key} until {}",
                w.name,
                w.until.to_rfc3339()
            ),
            name: Some(w.name),
            key: w.key,
            until: Some(w.until.to_rfc3339()),
            waiting: None,
            of: None,
        }));
    }
    let sleep = steps.iter().find_map(|s| {
        let name = s.name.strip_prefix("sleep:")?;
        let until: Timestamp =
            serde_json::from_value(s.result.as_ref()?.get("until")?.clone()).ok()?;
        (until == run.run_after).then(|| (name.to_string(), until))
    });
    Ok(sleep.map(|(name, until)| crate::dto::WaitView {
        kind: "sleep".into(),
        summary: format!("sleeping until {}", until.to_rfc3339()),
        name: Some(name),
        key: None,
        until: Some(until.to_rfc3339()),
        waiting: None,
        of: None,
    }))
}

/// `docket_runs_waiting_signal{tenant,name}`: runs suspended in a wait for
/// a signal, by its name (read from the store at scrape time).
pub fn render_waiting(out: &mut String, tenant: &str, counts: &[(String, i64)]) {
    use std::fmt::Write;
    out.push_str("# HELP docket_runs_waiting_signal Runs suspended in a wait for a signal, by signal name (read from the store).\n# TYPE docket_runs_waiting_signal gauge\n");
    for (name, n) in counts {
        let _ = writeln!(
            out,
            "docket_runs_waiting_signal{{tenant=\"{tenant}\",name=\"{name}\"}} {n}"
        );
    }
}
