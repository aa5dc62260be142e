//! The REST API over runs and jobs.

use crate::auth::Caller;
use crate::dto::*;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiPath, OptionalJson, QueryPairs};
use crate::AppState;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use docket::{Actor, EventRecord, Run, RunFilter, RunId, RunStatus, Timestamp, TriggerOptions};
use serde_json::{json, Value};
use std::time::Duration;

/// Most runs in one batch trigger.
pub const MAX_BATCH: usize = 1000;
/// Longest idempotency key, correlation id or comment.
const MAX_TEXT: usize = 1000;
/// The default and longest long poll.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(300);

/// The caller's run, or 404 (also for another tenant's run).
pub async fn load_run(state: &AppState, caller: &Caller, id: RunId) -> ApiResult<Run> {
    match state.docket.store().get_run(id).await? {
        Some(r) if r.tenant == caller.tenant => Ok(r),
        _ => Err(ApiError::run_not_found(id)),
    }
}

fn parse_id(s: &str) -> ApiResult<RunId> {
    s.parse().map_err(|_| ApiError::run_not_found(s))
}

fn check_text(field: &str, v: &Option<String>) -> ApiResult<()> {
    match v {
        Some(s) if s.len() > MAX_TEXT => Err(ApiError::invalid_field(
            field,
            format!("`{field}` is longer than {MAX_TEXT} bytes"),
        )),
        _ => Ok(()),
    }
}

/// 422 when an operator's comment is longer than the limit.
pub(crate) fn check_comment(v: &Option<String>) -> ApiResult<()> {
    check_text("comment", v)
}

/// The words of a time's error: not RFC 3339, or outside Docket's range.
pub(crate) fn time_problem(field: &str, s: &str, e: docket::TimeError) -> String {
    match e {
        docket::TimeError::NotRfc3339 => {
            format!("`{field}`: `{s}` is not an RFC 3339 time such as 2026-01-31T12:00:00Z")
        }
        docket::TimeError::OutOfRange => format!(
            "`{field}`: `{s}` is outside the accepted range {}",
            docket::TIME_RANGE
        ),
    }
}

/// A body field's time: 422 naming the field (and the range) when it is not
/// RFC 3339 or outside 1970-01-01T00:00:00.000Z..=9999-12-31T23:59:59.999Z.
fn parse_time(field: &str, s: &str) -> ApiResult<Timestamp> {
    Timestamp::parse_checked(s)
        .map_err(|e| ApiError::invalid_field(field, time_problem(field, s, e)))
}

/// A query parameter's time: 400 naming the parameter (and the range).
pub(crate) fn param_time(param: &str, s: &str) -> ApiResult<Timestamp> {
    Timestamp::parse_checked(s).map_err(|e| ApiError::bad_param(param, time_problem(param, s, e)))
}

impl AppState {
    fn now(&self) -> Timestamp {
        self.docket.clock().now()
    }

    fn view(&self, r: &Run) -> RunView {
        RunView::new(r, self.now())
    }

    pub(crate) fn trigger_response(&self, t: &docket::Triggered) -> TriggerResponse {
        TriggerResponse {
            run: self.view(&t.run),
            existing: t.existing,
            collapsed: t.collapsed,
        }
    }

    /// Checks one trigger request and turns it into the engine's form.
    fn prepare(
        &self,
        caller: &Caller,
        prefix: &str,
        r: TriggerRequest,
    ) -> ApiResult<(String, Value, TriggerOptions)> {
        let field = |f: &str| format!("{prefix}{f}");
        if !self.docket.job_names().contains(&r.job) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_job",
                format!(
                    "`{}`: unknown job `{}`: it is not registered on this server (see GET /api/jobs)",
                    field("job"),
                    r.job
                ),
            )
            .field(field("job")));
        }
        let size = serde_json::to_vec(&r.input).map(|v| v.len()).unwrap_or(0);
        if size > self.config.max_input_bytes {
            return Err(ApiError::too_large(format!(
                "input of job `{}` is {size} bytes, the limit is {} bytes",
                r.job, self.config.max_input_bytes
            ))
            .field(field("input")));
        }
        // Checked here as well as in the store so that a batch names the
        // run at fault (`runs[2].input`).
        if let Err(e) = docket_store::json::check_depth(&field("input"), &r.input) {
            return Err(e.into());
        }
        check_text(&field("idempotency_key"), &r.idempotency_key)?;
        if r.idempotency_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            let f = field("idempotency_key");
            return Err(ApiError::invalid_field(
                f.clone(),
                format!("`{f}` is empty: omit it, or give a key that names the intent (a second trigger with the same key returns the first run)"),
            ));
        }
        check_text(&field("correlation_id"), &r.correlation_id)?;
        let run_after = r
            .run_after
            .as_deref()
            .map(|s| parse_time(&field("run_after"), s))
            .transpose()?;
        let debounce = r
            .debounce
            .map(|d| debounce_rule(&field("debounce"), d))
            .transpose()?;
        Ok((
            r.job,
            r.input,
            TriggerOptions {
                idempotency_key: r.idempotency_key,
                run_after,
                priority: r.priority,
                correlation_id: r.correlation_id,
                tenant: Some(caller.tenant.clone()),
                actor: Some(caller.name.clone()),
                trace: None,
                debounce,
            },
        ))
    }
}

/// A trigger's debounce, checked: 422 naming the field
/// (`debounce.window`, `debounce.keep`, `debounce.key`).
fn debounce_rule(field: &str, d: crate::dto::DebounceRequest) -> ApiResult<docket::Debounce> {
    check_text(&format!("{field}.key"), &d.key)?;
    docket::Debounce::parse(d.key.as_deref(), &d.window, &d.keep).map_err(|(name, e)| {
        ApiError::invalid_field(format!("{field}.{name}"), format!("`{field}.{name}`: {e}"))
    })
}

/// The W3C trace context a request carries (`traceparent`, `tracestate`).
/// Not checked here: the engine ignores an invalid one, as the W3C
/// recommendation says, instead of refusing the request.
pub(crate) fn trace_headers(h: &HeaderMap) -> Option<docket::TraceContext> {
    let traceparent = h.get("traceparent")?.to_str().ok()?.trim().to_string();
    // Several `tracestate` headers are one list (W3C, "Combined header").
    let states: Vec<&str> = h
        .get_all("tracestate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    Some(docket::TraceContext {
        traceparent,
        tracestate: (!states.is_empty()).then(|| states.join(",")),
    })
}

/// Triggers a run.
///
/// 201 with the new run; 200 with the existing run when the idempotency key
/// was already used for this job in this tenant, or when the trigger was
/// collapsed into an existing run by a debounce (`collapsed: true`).
#[utoipa::path(
    post, path = "/api/runs", tag = "runs",
    request_body = TriggerRequest,
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the run and every attempt join this trace (an invalid value is ignored, as the W3C recommendation says)"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, kept with `traceparent`"),
    ),
    responses(
        (status = 201, description = "Created", body = TriggerResponse),
        (status = 200, description = "The run that already had this idempotency key, or the run this trigger was collapsed into by a debounce (`collapsed`)", body = TriggerResponse),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 413, description = "Body or input over the limit (`content_too_large`)", body = ErrorBody),
        (status = 422, description = "A field is wrong, or the job is unknown", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<TriggerRequest>,
) -> ApiResult<Response> {
    let (job, input, mut opts) = state.prepare(&caller, "", req)?;
    opts.trace = trace_headers(&headers);
    let t = state.docket.trigger_with(&job, input, opts).await?;
    state.hub.nudge();
    let code = if t.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(state.trigger_response(&t))).into_response())
}

/// Triggers many runs in one transaction: all are created, or none.
///
/// 201 when at least one run was created, 200 when every run already
/// existed (idempotency keys) or was collapsed into an existing run
/// (debounce). Entries are applied in order: two entries with one debounce
/// key collapse into one run.
#[utoipa::path(
    post, path = "/api/runs/batch", tag = "runs",
    request_body = BatchRequest,
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context for every run of the batch (an invalid value is ignored)"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, kept with `traceparent`"),
    ),
    responses(
        (status = 201, description = "Created (in request order)", body = BatchResponse),
        (status = 200, description = "Every run already existed or was collapsed into one (debounce)", body = BatchResponse),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 413, description = "Body or an input over the limit", body = ErrorBody),
        (status = 422, description = "A field is wrong (named as `runs[i].field`)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn trigger_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<BatchRequest>,
) -> ApiResult<Response> {
    let trace = trace_headers(&headers);
    if req.runs.is_empty() || req.runs.len() > MAX_BATCH {
        return Err(ApiError::invalid_field(
            "runs",
            format!(
                "`runs` must hold 1 to {MAX_BATCH} runs, not {}",
                req.runs.len()
            ),
        ));
    }
    let mut batch = Vec::with_capacity(req.runs.len());
    for (i, r) in req.runs.into_iter().enumerate() {
        let mut one = state.prepare(&caller, &format!("runs[{i}]."), r)?;
        one.2.trace = trace.clone();
        batch.push(one);
    }
    let out = state.docket.trigger_batch(batch).await?;
    state.hub.nudge();
    let code = if out.iter().all(|t| t.existing) {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let runs = out.iter().map(|t| state.trigger_response(t)).collect();
    Ok((code, Json(BatchResponse { runs })).into_response())
}

/// Lists the caller's runs, newest first.
#[utoipa::path(
    get, path = "/api/runs", tag = "runs",
    params(
        ("status" = Option<String>, Query, description = "Any of these statuses (comma-separated or repeated)"),
        ("job" = Option<String>, Query, description = "Only this job"),
        ("needs_attention" = Option<bool>, Query, description = "Only failed and needs_input runs"),
        ("created_after" = Option<String>, Query, description = "Created at or after (RFC 3339)"),
        ("created_before" = Option<String>, Query, description = "Created before (RFC 3339)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("limit" = Option<usize>, Query, description = "1 to 500 (default 50)"),
        ("parent" = Option<String>, Query, description = "Only the child runs of this run, in spawn order (oldest first); combines with `cursor` and `limit` only"),
    ),
    responses(
        (status = 200, description = "A page", body = RunPage),
        (status = 400, description = "A bad parameter (named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: QueryPairs,
) -> ApiResult<Json<RunPage>> {
    q.only(&[
        "status",
        "job",
        "needs_attention",
        "created_after",
        "created_before",
        "cursor",
        "limit",
        "parent",
    ])?;
    let mut statuses = Vec::new();
    for s in q.all("status") {
        let st: RunStatus = s.parse().map_err(|m| ApiError::bad_param("status", m))?;
        if !statuses.contains(&st) {
            statuses.push(st);
        }
    }
    let attention = match q.get("needs_attention") {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(v) => {
            return Err(ApiError::bad_param(
                "needs_attention",
                format!("needs_attention must be true or false, not `{v}`"),
            ))
        }
    };
    if attention {
        let wanted = [RunStatus::Failed, RunStatus::NeedsInput];
        if statuses.is_empty() {
            statuses = wanted.to_vec();
        } else {
            statuses.retain(|s| wanted.contains(s));
            if statuses.is_empty() {
                return Ok(Json(RunPage {
                    runs: Vec::new(),
                    next_cursor: None,
                }));
            }
        }
    }
    let time = |p: &str| -> ApiResult<Option<Timestamp>> {
        q.get(p).map(|s| param_time(p, s)).transpose()
    };
    // An empty `parent` is no parent filter (like an empty form field).
    if let Some(parent) = q.get("parent").filter(|p| !p.is_empty()) {
        let keep = ChildFilter {
            statuses,
            job: q.get("job").map(str::to_string),
            after: time("created_after")?,
            before: time("created_before")?,
        };
        return children_page(&state, &caller, &q, parent, keep)
            .await
            .map(Json);
    }
    let limit = match q.get("limit") {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_param(
                    "limit",
                    format!("limit must be 1 to 500, not `{s}`"),
                ))
            }
        },
    };
    let before_id = q
        .get("cursor")
        .map(|s| {
            s.parse::<RunId>()
                .map_err(|_| ApiError::bad_param("cursor", format!("`{s}` is not a cursor")))
        })
        .transpose()?;
    let mut runs = state
        .docket
        .list_runs(RunFilter {
            tenant: Some(caller.tenant.clone()),
            statuses,
            job: q.get("job").map(str::to_string),
            created_after: time("created_after")?,
            created_before: time("created_before")?,
            before_id,
            limit: limit + 1,
        })
        .await?;
    let more = runs.len() > limit;
    runs.truncate(limit);
    let next_cursor = if more {
        runs.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(RunPage {
        runs: runs.iter().map(|r| state.view(r)).collect(),
        next_cursor,
    }))
}

fn summary(e: &EventRecord) -> String {
    let d = &e.data;
    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let n = |k: &str| d.get(k).and_then(Value::as_i64);
    let t = |k: &str| n(k).map(|v| Timestamp(v).to_rfc3339()).unwrap_or_default();
    let att = e
        .attempt
        .map(|a| format!("attempt {a}"))
        .unwrap_or_default();
    let by = e
        .actor
        .as_ref()
        .map(|a| format!(" by {a}"))
        .unwrap_or_default();
    match e.kind.as_str() {
        "run_triggered" => match d.get("debounce") {
            Some(db) => format!(
                "triggered{by}: opens debounce window `{}` (keep {}) until {}",
                db["key"].as_str().unwrap_or(""),
                db["keep"].as_str().unwrap_or(""),
                db["until"]
                    .as_i64()
                    .map(|v| Timestamp(v).to_rfc3339())
                    .unwrap_or_default()
            ),
            None => format!("triggered{by}"),
        },
        "trigger_collapsed" => format!(
            "a trigger{by} was collapsed into this run (debounce `{}`, keep {}: {}; {} collapsed so far)",
            s("key"),
            s("keep"),
            if d.get("input_replaced") == Some(&Value::Bool(true)) {
                "its input replaced the run's"
            } else {
                "its input was dropped"
            },
            n("collapsed").unwrap_or(0)
        ),
        "attempt_started" => format!("{att} started on {}", s("worker")),
        // Why a due run waits (docs/FLOW_CONTROL.md, "What a held run does").
        "run_held" => format!(
            "held by concurrency key {}: {} of {} running",
            s("concurrency_key"),
            n("running").unwrap_or(0),
            n("limit").unwrap_or(0)
        ),
        "child_spawned" if d.get("child").is_some() => format!(
            "spawned child {} ({}, step {}, on cancel: {})",
            s("child"),
            s("job"),
            s("step"),
            s("policy")
        ),
        "child_spawned" => format!("spawned by parent {} (step {})", s("parent"), s("step")),
        "waiting_for_children" => format!(
            "waiting for {} of {} children",
            n("waiting").unwrap_or(0),
            n("of").unwrap_or(0)
        ),
        "cancelled_with_parent" => format!("cancelled with its parent {}", s("parent")),
        "signal_received" => format!(
            "signal \"{}\"{} received from {}{}",
            s("name"),
            d.get("key")
                .and_then(Value::as_str)
                .map(|k| format!(" (key \"{k}\")"))
                .unwrap_or_default(),
            s("sent_by"),
            match s("woke").as_str() {
                "now" => ": the waiting run is due now",
                "" => ": kept until the run waits for it",
                _ => ": the run is due once its attempt suspends",
            }
        ),
        "signal_waiting" => format!(
            "{att} waits for signal \"{}\"{} until {}",
            s("name"),
            d.get("key")
                .and_then(Value::as_str)
                .map(|k| format!(" with key \"{k}\""))
                .unwrap_or_default(),
            t("until")
        ),
        "signal_delivered" => format!(
            "signal \"{}\" from {} delivered to `{}`",
            s("name"),
            s("sent_by"),
            s("wait")
        ),
        "signal_timed_out" => format!(
            "wait `{}` for signal \"{}\" timed out at {}",
            s("wait"),
            s("name"),
            t("until")
        ),
        "attempt_failed" => format!("{att} failed: {}: {}", s("error_class"), s("message")),
        "attempt_deferred" => format!("{att} deferred, nothing sent: {}", s("message")),
        "deferral_released" => format!(
            "due now: circuit breaker of {} closed (it was deferred until {})",
            s("connection"),
            t("deferred_until")
        ),
        "http_response" => {
            let what = if s("purpose") == "reconcile" {
                "reconcile "
            } else {
                ""
            };
            let answer = match n("status") {
                Some(code) => format!("{code} {}", s("class")),
                None => format!("no answer ({})", s("class")),
            };
            let finding = match s("finding") {
                f if f.is_empty() => String::new(),
                f => format!(": {}", f.replace('_', " ")),
            };
            format!(
                "{what}{} {} → {answer}{finding} in {} ms",
                s("method"),
                s("url"),
                n("duration_ms").unwrap_or(0)
            )
        }
        "action_in_flight" => format!(
            "action {} not sent: key {} is in flight in run {} (attempt {}); waiting for its outcome",
            s("action"),
            s("idempotency_key"),
            s("held_by_run"),
            n("held_by_attempt").unwrap_or(0)
        ),
        "duplicate_suppressed" => format!(
            "action {} not sent: key {} was committed by run {}; its result returned",
            s("action"),
            s("idempotency_key"),
            s("committed_by_run")
        ),
        "ledger_write_refused" => format!(
            "ledger write {} refused for key {}: the row is {} (run {})",
            s("attempted"),
            s("idempotency_key"),
            s("current_state"),
            s("held_by_run")
        ),
        "action_started" | "action_committed" | "action_unknown" | "action_failed"
        | "action_reconciled" => {
            let found = match s("found") {
                f if f.is_empty() => String::new(),
                f => format!(" ({})", f.replace('_', " ")),
            };
            let state = match e.kind.as_str() {
                "action_reconciled" if found.is_empty() => "reconciled: committed".to_string(),
                "action_reconciled" => "reconciled".to_string(),
                "action_started" if e.data.get("reconcile_first") == Some(&Value::Bool(true)) => {
                    "taken over to reconcile first (outcome unknown)".to_string()
                }
                k => k.trim_start_matches("action_").to_string(),
            };
            format!(
                "action {} {state}{found}, key {}",
                s("action"),
                s("idempotency_key")
            )
        }
        "retry_scheduled" => format!(
            "retry scheduled by policy {} after {} ms (reason {}), eligible at {}",
            s("retry_policy"),
            n("delay_ms").unwrap_or(0),
            s("reason"),
            t("eligible_at")
        ),
        "run_failed" => format!("failed: {} — {}", s("reason"), s("detail")),
        "run_completed" => format!("{att} completed"),
        "run_postponed" => format!("postponed until {}", t("until")),
        "lease_expired" => format!("{att}: lease expired"),
        "stale_write_refused" => format!(
            "a write under a stale lease was refused (it tried `{}`)",
            s("attempted")
        ),
        "step_completed" | "step_failed" | "step_skipped" => {
            format!("{}: {}", e.kind.as_str().replace('_', " "), s("step"))
        }
        "operator_retry" => {
            let who = e.actor.as_deref().unwrap_or("an operator");
            let vars = match d.get("updated_variables") {
                Some(v) if !v.is_null() => format!(" with variables {v}"),
                _ => String::new(),
            };
            let why = e
                .comment
                .as_deref()
                .map(|c| format!(": “{c}”"))
                .unwrap_or_default();
            format!("retried by {who}{vars}, fresh attempt budget{why}")
        }
        "input_requested" => format!("waiting for input `{}`", s("name")),
        "input_received" => format!("input `{}` {}", s("name"), s("decision")),
        k => {
            let who = e
                .actor
                .as_ref()
                .map(|a| format!(" by {a}"))
                .unwrap_or_default();
            format!("{}{who}", k.replace('_', " "))
        }
    }
}

/// The stored step and ledger rows keep times as epoch milliseconds; the
/// API sends every time as RFC 3339, like the rest of the run.
fn times_as_rfc3339(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for key in ["created_at", "updated_at"] {
            if let Some(ms) = o.get(key).and_then(Value::as_i64) {
                o.insert(key.into(), json!(Timestamp::from_millis(ms).to_rfc3339()));
            }
        }
    }
    v
}

/// The other filters of a children page, applied to each page read.
struct ChildFilter {
    statuses: Vec<RunStatus>,
    job: Option<String>,
    after: Option<Timestamp>,
    before: Option<Timestamp>,
}

impl ChildFilter {
    fn keeps(&self, r: &Run) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&r.status))
            && self.job.as_ref().is_none_or(|j| &r.job == j)
            && self.after.is_none_or(|t| r.created_at >= t)
            && self.before.is_none_or(|t| r.created_at < t)
    }
}

/// `GET /api/runs?parent=ID`: a run's children, oldest first. The other
/// filters apply to each page of children read, so a page may hold fewer
/// runs than `limit` (even none) while `next_cursor` says more follow.
async fn children_page(
    state: &AppState,
    caller: &Caller,
    q: &QueryPairs,
    parent: &str,
    keep: ChildFilter,
) -> ApiResult<RunPage> {
    let parent: RunId = parent
        .parse()
        .map_err(|_| ApiError::bad_param("parent", format!("`{parent}` is not a run id")))?;
    load_run(state, caller, parent).await?;
    let limit = match q.get("limit") {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_param(
                    "limit",
                    format!("limit must be 1 to 500, not `{s}`"),
                ))
            }
        },
    };
    let after = q
        .get("cursor")
        .map(|s| {
            s.parse::<RunId>()
                .map_err(|_| ApiError::bad_param("cursor", format!("`{s}` is not a cursor")))
        })
        .transpose()?;
    let mut runs = state
        .docket
        .store()
        .children(parent, after, limit + 1)
        .await?;
    let more = runs.len() > limit;
    runs.truncate(limit);
    Ok(RunPage {
        next_cursor: more
            .then(|| runs.last().map(|r| r.id.to_string()))
            .flatten(),
        runs: runs
            .iter()
            .filter(|r| keep.keeps(r))
            .map(|r| state.view(r))
            .collect(),
    })
}

/// A run with its attempts, steps, ledger entries and events, and the
/// timeline built from them (and its children count and current wait).
#[utoipa::path(
    get, path = "/api/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run and its history", body = RunDetail),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<RunDetail>> {
    let id = parse_id(&id)?;
    load_run(&state, &caller, id).await?;
    // The family first: a join it shows is only reported if the history,
    // read after it, still has the run postponed (not woken meanwhile).
    let family = state.docket.store().family(id).await?;
    let h = state.docket.history(id).await?;
    let attempts = AttemptView::list(&h.attempts);
    let timeline = h
        .events
        .iter()
        .map(|e| {
            let mut summary = summary(e);
            if e.kind == "attempt_started" {
                if let Some(a) = attempts.iter().find(|a| Some(a.attempt) == e.attempt) {
                    if let Some(gap) = a.gap_ms {
                        summary.push_str(&format!(" ({gap} ms after the previous attempt ended)"));
                    }
                }
            }
            TimelineEntry {
                at: e.at.to_rfc3339(),
                kind: e.kind.to_string(),
                attempt: e.attempt,
                actor: e.actor.clone(),
                comment: e.comment.clone(),
                summary,
                event_id: e.id,
            }
        })
        .collect();
    let mut run = state.view(&h.run);
    let joining = family
        .as_ref()
        .and_then(|f| f.waiting)
        .filter(|_| h.run.status == RunStatus::Postponed);
    run.wait = match joining {
        Some(w) => Some(crate::dto::WaitView {
            kind: "children".into(),
            name: None,
            key: None,
            until: None,
            waiting: Some(w.waiting),
            of: Some(w.of),
            summary: format!("waiting for {} of {} children", w.waiting, w.of),
        }),
        None => crate::signals::wait_of(&state, &h.run, &h.steps).await?,
    };
    Ok(Json(RunDetail {
        run,
        attempts,
        steps: h
            .steps
            .iter()
            .map(|s| times_as_rfc3339(serde_json::to_value(s).unwrap_or(Value::Null)))
            .collect(),
        ledger: h
            .ledger
            .iter()
            .map(|l| times_as_rfc3339(serde_json::to_value(l).unwrap_or(Value::Null)))
            .collect(),
        events: h.events.iter().map(EventView::from).collect(),
        timeline,
        children: family.as_ref().map_or(0, |f| f.children),
    }))
}

fn actor(caller: &Caller, comment: Option<String>) -> Actor {
    Actor::new(caller.name.clone(), comment)
}

async fn after_write(state: &AppState, run: &Run) -> Json<RunView> {
    state.hub.nudge();
    Json(state.view(run))
}

/// Cancels a run: at once when pending, postponed or waiting for input; a
/// running run stops at its next step boundary (`cancel_requested`).
#[utoipa::path(
    post, path = "/api/runs/{id}/cancel", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<CommentRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The run after the command", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run's state does not allow it (named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<RunView>> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    load_run(&state, &caller, id).await?;
    let run = state.docket.cancel(id, actor(&caller, req.comment)).await?;
    Ok(after_write(&state, &run).await)
}

/// Retries a failed run: same run, completed steps kept, the failed step
/// runs again, `updated_variables` merged into the variables first, a fresh
/// attempt budget; `comment` goes into the audit trail.
#[utoipa::path(
    post, path = "/api/runs/{id}/retry", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<RetryRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The run after the command", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is not failed (its state is named)", body = ErrorBody),
        (status = 422, description = "updated_variables is not an object", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<RetryRequest>,
) -> ApiResult<Json<RunView>> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    if let Some(v) = &req.updated_variables {
        if !v.is_object() {
            return Err(ApiError::invalid_field(
                "updated_variables",
                "`updated_variables` must be a JSON object",
            ));
        }
    }
    load_run(&state, &caller, id).await?;
    let run = state
        .docket
        .retry(id, req.updated_variables, actor(&caller, req.comment))
        .await?;
    Ok(after_write(&state, &run).await)
}

/// Skips the failed step of a failed run; the run continues past it.
#[utoipa::path(
    post, path = "/api/runs/{id}/skip", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<CommentRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The run after the command", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is not failed (its state is named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn skip(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<RunView>> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    load_run(&state, &caller, id).await?;
    let run = state.docket.skip(id, actor(&caller, req.comment)).await?;
    Ok(after_write(&state, &run).await)
}

/// A new run with the same input, linked to this one (which stays as it
/// is). Only failed, cancelled or completed runs.
#[utoipa::path(
    post, path = "/api/runs/{id}/retrigger", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<CommentRequest>, description = "Optional"),
    responses(
        (status = 201, description = "The new run", body = TriggerResponse),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is not terminal (its state is named)", body = ErrorBody),
        (status = 422, description = "The input fails the job's current validation", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retrigger(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    load_run(&state, &caller, id).await?;
    let t = state
        .docket
        .retrigger(id, actor(&caller, req.comment))
        .await?;
    state.hub.nudge();
    Ok((StatusCode::CREATED, Json(state.trigger_response(&t))).into_response())
}

/// Postpones a pending, postponed or waiting run (`until` or `delay_ms`).
#[utoipa::path(
    post, path = "/api/runs/{id}/postpone", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body = PostponeRequest,
    responses(
        (status = 200, description = "The run after the command", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run's state does not allow it (named)", body = ErrorBody),
        (status = 422, description = "Neither or both of until and delay_ms, `until` in the past or after 9999-12-31T23:59:59.999Z, `delay_ms` past that time", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn postpone(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<PostponeRequest>,
) -> ApiResult<Json<RunView>> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    let until = match (&req.until, req.delay_ms) {
        (Some(u), None) => {
            let t = parse_time("until", u)?;
            // Most likely a time zone slip: say so rather than run it now.
            if t < state.now() {
                return Err(ApiError::invalid_field(
                    "until",
                    format!(
                        "`until` ({}) is in the past (now is {}): give a later time, or `delay_ms`",
                        t.to_rfc3339(),
                        state.now().to_rfc3339()
                    ),
                ));
            }
            t
        }
        (None, Some(ms)) => {
            // The run must come due no later than Timestamp::MAX, the last
            // time RFC 3339 can write: a longer delay is refused, not
            // clamped, so what is stored is what was asked for.
            let now = state.now();
            let max = u64::try_from(Timestamp::MAX.millis_since(now))
                .unwrap_or(0)
                .min(crate::openapi::MAX_DELAY_MS);
            if ms > max {
                return Err(ApiError::invalid_field(
                    "delay_ms",
                    format!(
                        "`delay_ms` must be 0 to {max} (100 years, and the run must come due by {}), not {ms}",
                        Timestamp::MAX
                    ),
                ));
            }
            now.plus_millis(ms as i64)
        }
        _ => {
            return Err(ApiError::invalid_field(
                "until",
                "give exactly one of `until` (RFC 3339) and `delay_ms`",
            ))
        }
    };
    load_run(&state, &caller, id).await?;
    let run = state
        .docket
        .postpone(id, until, actor(&caller, req.comment))
        .await?;
    Ok(after_write(&state, &run).await)
}

/// Approves a run waiting for input; the handler runs again and its wait
/// returns `Approved(data)`.
#[utoipa::path(
    post, path = "/api/runs/{id}/approve", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<DecisionRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The run after the command", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is not waiting for input (its state is named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn approve(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<DecisionRequest>,
) -> ApiResult<Json<RunView>> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    load_run(&state, &caller, id).await?;
    let run = state
        .docket
        .approve(id, req.data, actor(&caller, req.comment))
        .await?;
    Ok(after_write(&state, &run).await)
}

/// Rejects a run waiting for input; the handler runs again and its wait
/// returns `Rejected(data)`.
#[utoipa::path(
    post, path = "/api/runs/{id}/reject", tag = "operator",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<DecisionRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The run after the command", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is not waiting for input (its state is named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn reject(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<DecisionRequest>,
) -> ApiResult<Json<RunView>> {
    let id = parse_id(&id)?;
    check_text("comment", &req.comment)?;
    load_run(&state, &caller, id).await?;
    let run = state
        .docket
        .reject(id, req.data, actor(&caller, req.comment))
        .await?;
    Ok(after_write(&state, &run).await)
}

/// Parses a duration: `500ms`, `30s`, `2m`, or plain seconds (`30`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Long poll: answers once the run is terminal (with `until=needs_input`,
/// also once it waits for a person), or when `timeout` passes (default 30
/// s, at most 300 s) with `terminal: false`.
#[utoipa::path(
    get, path = "/api/runs/{id}/wait", tag = "runs",
    params(
        ("id" = String, Path, description = "The run's id"),
        ("timeout" = Option<String>, Query, description = "`500ms`, `30s`, `2m` or seconds; default 30 s, at most 300 s"),
        ("until" = Option<String>, Query, description = "`terminal` (default), or `needs_input`: also answer once the run waits for an operator"),
    ),
    responses(
        (status = 200, description = "The run, terminal or as last seen", body = WaitResponse),
        (status = 400, description = "A bad timeout", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn wait(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    q: QueryPairs,
) -> ApiResult<Json<WaitResponse>> {
    q.only(&["timeout", "until"])?;
    let stop_at_input = match q.get("until") {
        None | Some("terminal") => false,
        Some("needs_input") => true,
        Some(other) => {
            return Err(ApiError::bad_param(
                "until",
                format!("until must be `terminal` or `needs_input`, not `{other}`"),
            ))
        }
    };
    let done = move |r: &docket::Run| {
        r.status.is_terminal() || (stop_at_input && r.status == RunStatus::NeedsInput)
    };
    let timeout = match q.get("timeout") {
        None => DEFAULT_WAIT,
        Some(s) => match parse_duration(s) {
            Some(d) if d <= MAX_WAIT => d,
            _ => {
                return Err(ApiError::bad_param(
                    "timeout",
                    format!("timeout must be like 500ms, 30s or 2m, at most 300s; not `{s}`"),
                ))
            }
        },
    };
    let id = parse_id(&id)?;
    load_run(&state, &caller, id).await?;
    let mut stop = state.stop.clone();
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let waited = tokio::select! {
        r = state.docket.wait_until(id, timeout, done) => r,
        _ = stopping => state.docket.get_run(id).await.map(|r| {
            if done(&r) { Ok(r) } else { Err(docket::Error::WaitTimedOut(Box::new(r))) }
        })?,
    };
    match waited {
        Ok(run) => Ok(Json(WaitResponse {
            terminal: run.status.is_terminal(),
            run: state.view(&run),
        })),
        Err(docket::Error::WaitTimedOut(run)) => Ok(Json(WaitResponse {
            run: state.view(&run),
            terminal: run.status.is_terminal(),
        })),
        Err(e) => Err(e.into()),
    }
}

/// The registered jobs, with the caller's tenant's run counts.
#[utoipa::path(
    get, path = "/api/jobs", tag = "jobs",
    responses((status = 200, description = "The jobs", body = JobList)),
    security(("bearer" = []))
)]
pub async fn jobs(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<JobList>> {
    let counts = state
        .docket
        .store()
        .count_runs(Some(caller.tenant.clone()))
        .await?;
    let health = state
        .docket
        .queue_health(Some(&caller.tenant), crate::metrics::HEALTH_WINDOW)
        .await?;
    let now = state.now();
    let queue = |job: &str| {
        health
            .iter()
            .find(|h| h.job == job)
            .map_or_else(QueueView::default, |h| QueueView {
                due: h.due,
                lag_seconds: h.lag_ms(now) as f64 / 1000.0,
                running: h.running,
                held: h.held,
                scheduled: h.scheduled,
                deferred: h.deferred,
                completed_5m: h.completed_recently,
                failed_5m: h.failed_recently,
                throughput_per_minute: (h.completed_recently + h.failed_recently) as f64
                    / (crate::metrics::HEALTH_WINDOW.as_secs_f64() / 60.0),
            })
    };
    let pauses = state.docket.pauses(Some(&caller.tenant)).await?;
    let paused = |job: &str| {
        pauses
            .iter()
            .any(|p| p.job == job || p.job == docket::retention::ALL_JOBS)
    };
    let jobs = state
        .docket
        .job_names()
        .into_iter()
        .map(|name| {
            let mut runs = serde_json::Map::new();
            for c in counts.iter().filter(|c| c.job == name) {
                runs.insert(c.status.to_string(), json!(c.count));
            }
            JobView {
                paused: paused(&name),
                queue: queue(&name),
                name,
                runs: Value::Object(runs),
            }
        })
        .collect();
    Ok(Json(JobList { jobs }))
}

/// Liveness and store reachability (no token needed).
#[utoipa::path(
    get, path = "/healthz", tag = "ops",
    responses(
        (status = 200, description = "Serving, and the store answers", body = Health),
        (status = 503, description = "The store does not answer", body = ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.docket.store().last_event_id().await?;
    Ok(Json(Health {
        status: "ok".into(),
        backend: state.docket.store().backend().into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}

/// Prometheus metrics of the caller's tenant (text exposition format).
#[utoipa::path(
    get, path = "/metrics", tag = "ops",
    responses(
        (status = 200, description = "Prometheus text", content_type = "text/plain", body = String),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn metrics(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let counts = state
        .docket
        .store()
        .count_runs(Some(caller.tenant.clone()))
        .await?;
    let runs: Vec<(String, String, i64)> = counts
        .into_iter()
        .map(|c| (c.job, c.status.to_string(), c.count))
        .collect();
    let mut body = state.metrics.render(&caller.tenant, &runs);
    let joining = state
        .docket
        .store()
        .count_joining(Some(caller.tenant.clone()))
        .await?;
    crate::metrics::render_joining(&mut body, &caller.tenant, joining);
    crate::metrics::render_store_errors(&mut body, &state.docket.store_errors());
    let waiting = state
        .docket
        .store()
        .waiting_for_signals(Some(caller.tenant.clone()))
        .await?;
    crate::signals::render_waiting(&mut body, &caller.tenant, &waiting);
    let sleeping = state
        .docket
        .store()
        .count_sleeping(Some(caller.tenant.clone()))
        .await?;
    crate::metrics::render_sleeping(&mut body, &caller.tenant, sleeping);
    crate::metrics::render_schedules(&mut body, &state.docket.schedule_counters());

    if let Some(t) = state.docket.telemetry() {
        crate::metrics::render_traces(&mut body, t.spans_exported(), t.spans_dropped());
    }

    let keys = state
        .docket
        .store()
        .concurrency_usage(
            Some(caller.tenant.clone()),
            state.now(),
            crate::limits::MAX_KEYS,
        )
        .await?;
    crate::metrics::render_concurrency(&mut body, &caller.tenant, &keys);
    let open = state
        .docket
        .store()
        .debounce_counts(Some(caller.tenant.clone()), state.now())
        .await?;
    state
        .metrics
        .render_debounce(&mut body, &caller.tenant, &state.docket.job_names(), &open);
    let pauses = state.docket.pauses(Some(&caller.tenant)).await?;
    crate::metrics::render_paused(
        &mut body,
        &caller.tenant,
        &state.docket.job_names(),
        &pauses,
    );
    let health = state
        .docket
        .queue_health(Some(&caller.tenant), crate::metrics::HEALTH_WINDOW)
        .await?;
    crate::metrics::render_queue(
        &mut body,
        &caller.tenant,
        &state.docket.job_names(),
        &health,
        state.now(),
    );
    if let Some(http) = &state.config.http {
        // One read of the stored states (never-changed ones are enabled);
        // no credential is read for a scrape.
        let stored = state
            .store()
            .list_connection_states(Some(caller.tenant.clone()))
            .await?;
        let statuses = http
            .connection_names()
            .into_iter()
            .map(|name| {
                let status = stored
                    .iter()
                    .find(|c| c.name == name)
                    .map_or(docket::http::ConnectionStatus::Enabled, |c| c.status);
                (name, status)
            })
            .collect::<Vec<_>>();
        // No breaker series from a process without a worker: they would
        // only ever read "closed".
        let breakers = if state.config.runs_jobs {
            http.refresh_breakers().await;
            http.breakers()
        } else {
            Vec::new()
        };
        crate::metrics::render_connections(&mut body, &caller.tenant, &breakers, &statuses);
        // Shared limits, as stored: every connection's breaker and the
        // tokens of each connection's bucket (keyed buckets are left out:
        // their keys may name other tenants' data).
        let mut limits = Vec::new();
        for name in http.connection_names() {
            match http.limits(&name).await {
                Ok(l) => limits.push(l),
                // Not installed on this server's Docket: nothing to show.
                Err(docket::Error::InvalidInput(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        crate::metrics::render_limits(&mut body, &limits);
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timeline says why a held run waits, in the words of
    /// docs/FLOW_CONTROL.md, from the stored `run_held` event's fields.
    #[test]
    fn a_held_run_reads_held_by_its_key() {
        let e = stored(docket_store::plan::concurrency::held_event("acme/42", 2, 2));
        assert_eq!(
            summary(&e),
            "held by concurrency key acme/42: 2 of 2 running"
        );
    }

    /// An event as a store writes it (what the plan computed) and reads it
    /// back.
    fn stored(w: docket_store::plan::end::EventWrite) -> EventRecord {
        EventRecord {
            id: 1,
            run_id: docket::RunId::new(),
            tenant: "acme".into(),
            job: "sync".into(),
            kind: w.kind,
            at: Timestamp(0),
            attempt: None,
            lease_id: None,
            actor: None,
            comment: None,
            data: w.data,
        }
    }

    /// A run a closing breaker released says so, from the stored
    /// `deferral_released` event's fields.
    #[test]
    fn a_released_run_reads_due_now() {
        let e = stored(docket_store::plan::breaker::released_event(
            "crm",
            Timestamp(1_767_225_611_000),
        ));
        assert_eq!(
            summary(&e),
            "due now: circuit breaker of crm closed (it was deferred until 2026-01-01T00:00:11.000Z)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("3h"), None);
    }
}
