//! Connections and circuit breakers of the HTTP jobs declared in
//! `docket.toml` (`docket::http`), and the job-wide forensic report.
//!
//! A connection's status (`enabled`, `disabled`, `expired`) is per tenant
//! and kept in the store, with an audit trail: every process sharing the
//! store sees a change at its runs' next attempt. A circuit breaker's state
//! is this process's (see `docket::http` for several processes): the API
//! shows the breakers of the worker running in the same process, and none
//! (saying why) in a process that runs no worker (`--role api`).

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiPath, OptionalJson, QueryPairs};
use crate::runs::check_comment;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use docket::http::{BreakerState, ConnectionInfo, ConnectionStatus, HttpJobs};
use docket::{Actor, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

use crate::dto::CommentRequest;

/// How far back `GET /api/jobs/{job}/forensics` looks without `since`.
pub const DEFAULT_FORENSICS_WINDOW_MS: i64 = 24 * 3600 * 1000;

fn ts(t: Option<Timestamp>) -> Option<String> {
    t.map(Timestamp::to_rfc3339)
}

/// A circuit breaker of this process.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BreakerView {
    /// The connection it guards.
    pub connection: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Transient failures within the current window.
    pub failures_in_window: usize,
    /// Transient failures within the window that open it (0: disabled).
    pub failures_to_open: u32,
    /// The window, in milliseconds.
    pub window_ms: u64,
    /// How long it stays open before a probe, in milliseconds.
    pub open_ms: u64,
    /// When it last opened.
    pub opened_at: Option<String>,
    /// When an open breaker lets a probe through.
    pub reset_at: Option<String>,
    /// Until when the current probe holds the half-open slot.
    pub probe_deadline: Option<String>,
    /// When its state last changed.
    pub changed_at: Option<String>,
    /// How often it opened since this process started.
    pub times_opened: u64,
    /// Runs it deferred (rescheduled with reason `circuit_open`) since this
    /// process started.
    pub deferred: u64,
}

impl From<&BreakerState> for BreakerView {
    fn from(b: &BreakerState) -> Self {
        BreakerView {
            connection: b.connection.clone(),
            state: b.state.as_str().to_string(),
            failures_in_window: b.failures_in_window,
            failures_to_open: b.config.failures,
            window_ms: b.config.window_ms,
            open_ms: b.config.open_ms,
            opened_at: ts(b.opened_at),
            reset_at: ts(b.reset_at),
            probe_deadline: ts(b.probe_deadline),
            changed_at: ts(b.changed_at),
            times_opened: b.times_opened,
            deferred: b.deferred,
        }
    }
}

/// A connection as the caller's tenant sees it: never a credential, only
/// where it is read from and whether it can be read now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectionView {
    /// Its name in `docket.toml`.
    pub name: String,
    /// Its base URL.
    pub base_url: String,
    /// `none`, `bearer` or `header`.
    pub auth: String,
    /// Where the credential is read from (a variable's or key's name).
    pub credential_source: Option<String>,
    /// Whether the credential can be read now.
    pub credential_available: bool,
    /// Why it cannot, if so.
    pub credential_problem: Option<String>,
    /// `enabled`, `disabled` or `expired` for the caller's tenant.
    pub status: String,
    /// When an operator last changed the status.
    pub changed_at: Option<String>,
    /// Who did.
    pub changed_by: Option<String>,
    /// Their comment.
    pub comment: Option<String>,
    /// The jobs that use it.
    pub jobs: Vec<String>,
    /// Its circuit breaker in this process (`null` when this process runs
    /// no worker: see `GET /api/breakers`).
    pub breaker: Option<BreakerView>,
}

impl From<ConnectionInfo> for ConnectionView {
    fn from(c: ConnectionInfo) -> Self {
        ConnectionView {
            breaker: Some(BreakerView::from(&c.breaker)),
            name: c.name,
            base_url: c.base_url,
            auth: c.auth,
            credential_source: c.credential_source,
            credential_available: c.credential_available,
            credential_problem: c.credential_problem,
            status: c.status.as_str().to_string(),
            changed_at: ts(c.changed_at),
            changed_by: c.changed_by,
            comment: c.comment,
            jobs: c.jobs,
        }
    }
}

/// The configured connections.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectionList {
    /// By name (empty when the server has no `docket.toml` jobs).
    pub connections: Vec<ConnectionView>,
}

/// One change of a connection's status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectionAuditView {
    /// The status before.
    pub from_status: String,
    /// The status after.
    pub to_status: String,
    /// Who (the token's name).
    pub actor: String,
    /// Their comment.
    pub comment: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}

/// A connection with its audit trail.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectionDetail {
    /// The connection.
    pub connection: ConnectionView,
    /// Every change of its status for the caller's tenant, oldest first.
    pub audit: Vec<ConnectionAuditView>,
}

/// This process's circuit breakers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BreakerList {
    /// By connection name.
    pub breakers: Vec<BreakerView>,
    /// Why the list is empty when this process runs no worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Said when this process runs no worker (`--role api`).
pub const NO_LOCAL_BREAKERS: &str = "this process runs no worker (docket serve --role api): circuit breakers live in the worker processes (--role all or worker); their circuit_opened, circuit_half_open and circuit_closed events are in every run's timeline";

/// The forensic verdicts across a job's runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobForensics {
    /// The job.
    pub job: String,
    /// Runs created at or after this instant were examined (RFC 3339).
    pub since: String,
    /// How many runs.
    pub runs_examined: usize,
    /// More runs matched than one report examines (the newest were).
    pub truncated: bool,
    /// Verdicts by kind (`delayed_retry`, `retry_without_backoff`, …).
    #[schema(value_type = Object)]
    pub counts: BTreeMap<String, usize>,
    /// Pairs where the same action failed with the same error inside the
    /// backoff window the policy chose (retry without backoff, lease
    /// overlap).
    pub same_action_same_error_within_backoff_window: usize,
    /// Every verdict: the two failures, the verdict, its severity, the gap
    /// against the policy's delay and an explanation.
    #[schema(value_type = Vec<Object>)]
    pub verdicts: Vec<Value>,
}

/// A connection as shown, without a breaker where this process has no live
/// one.
fn view(state: &AppState, c: ConnectionInfo) -> ConnectionView {
    let mut v = ConnectionView::from(c);
    if !state.config.runs_jobs {
        v.breaker = None;
    }
    v
}

fn http_jobs(state: &AppState) -> Option<&HttpJobs> {
    state.config.http.as_ref()
}

fn unknown_connection(state: &AppState, name: &str) -> ApiError {
    let known = http_jobs(state)
        .map(|h| h.connection_names())
        .unwrap_or_default();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        if known.is_empty() {
            format!("connection `{name}` not found: this server has no connections (they come from the [connections.*] of the file given to `docket serve --config`)")
        } else {
            format!(
                "connection `{name}` not found (known: {})",
                known.join(", ")
            )
        },
    )
}

fn known(state: &AppState, name: &str) -> ApiResult<HttpJobs> {
    match http_jobs(state) {
        Some(h) if h.connection_names().iter().any(|n| n == name) => Ok(h.clone()),
        _ => Err(unknown_connection(state, name)),
    }
}

/// The connections of `docket.toml` with the caller's tenant's status and
/// this process's circuit breakers.
#[utoipa::path(
    get, path = "/api/connections", tag = "connections",
    // Unique across the document (runs::list is `list`): generators such
    // as openapi-typescript refuse duplicates.
    operation_id = "list_connections",
    responses((status = 200, description = "The connections", body = ConnectionList)),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<ConnectionList>> {
    let connections = match http_jobs(&state) {
        Some(h) => h
            .connections(&caller.tenant)
            .await?
            .into_iter()
            .map(|c| view(&state, c))
            .collect(),
        None => Vec::new(),
    };
    Ok(Json(ConnectionList { connections }))
}

/// One connection with its audit trail.
#[utoipa::path(
    get, path = "/api/connections/{name}", tag = "connections",
    operation_id = "show_connection",
    params(("name" = String, Path, description = "The connection's name")),
    responses(
        (status = 200, description = "The connection", body = ConnectionDetail),
        (status = 404, description = "No such connection", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
) -> ApiResult<Json<ConnectionDetail>> {
    let h = known(&state, &name)?;
    let connection = view(&state, h.connection(&caller.tenant, &name).await?);
    let audit = h
        .connection_audit(&caller.tenant, &name)
        .await?
        .into_iter()
        .map(|a| ConnectionAuditView {
            from_status: a.from_status.as_str().to_string(),
            to_status: a.to_status.as_str().to_string(),
            actor: a.actor,
            comment: a.comment,
            at: a.at.to_rfc3339(),
        })
        .collect();
    Ok(Json(ConnectionDetail { connection, audit }))
}

async fn set_status(
    state: AppState,
    caller: Caller,
    name: String,
    req: CommentRequest,
    status: ConnectionStatus,
) -> ApiResult<Json<ConnectionView>> {
    check_comment(&req.comment)?;
    let h = known(&state, &name)?;
    let actor = Actor::new(caller.name.clone(), req.comment);
    h.set_connection_status(&caller.tenant, &name, status, &actor)
        .await?;
    tracing::info!(connection = %name, tenant = %caller.tenant, actor = %caller.name, status = status.as_str(), "connection status changed");
    Ok(Json(view(
        &state,
        h.connection(&caller.tenant, &name).await?,
    )))
}

/// Enables a connection for the caller's tenant (after re-authorizing it);
/// runs that failed `connection_unresolved` can then be retried.
#[utoipa::path(
    post, path = "/api/connections/{name}/enable", tag = "connections",
    params(("name" = String, Path, description = "The connection's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the audit trail"),
    responses(
        (status = 200, description = "The connection after the change", body = ConnectionView),
        (status = 404, description = "No such connection", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<ConnectionView>> {
    set_status(state, caller, name, req, ConnectionStatus::Enabled).await
}

/// Disables a connection for the caller's tenant: runs that need it fail
/// `connection_unresolved` before any request is sent.
#[utoipa::path(
    post, path = "/api/connections/{name}/disable", tag = "connections",
    params(("name" = String, Path, description = "The connection's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the audit trail"),
    responses(
        (status = 200, description = "The connection after the change", body = ConnectionView),
        (status = 404, description = "No such connection", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn disable(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<ConnectionView>> {
    set_status(state, caller, name, req, ConnectionStatus::Disabled).await
}

/// Marks a connection's credentials expired for the caller's tenant: runs
/// that need it fail `connection_unresolved` until it is enabled again.
#[utoipa::path(
    post, path = "/api/connections/{name}/expire", tag = "connections",
    params(("name" = String, Path, description = "The connection's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the audit trail"),
    responses(
        (status = 200, description = "The connection after the change", body = ConnectionView),
        (status = 404, description = "No such connection", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn expire(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<ConnectionView>> {
    set_status(state, caller, name, req, ConnectionStatus::Expired).await
}

/// A connection's rate limit as configured.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RateLimitView {
    /// Tokens gained per second.
    pub per_second: f64,
    /// The bucket's capacity.
    pub burst: u32,
    /// The key template, when each key has its own bucket.
    pub key: Option<String>,
}

/// One bucket of a connection's rate limit, now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BucketView {
    /// The bucket's key (`connection:NAME` or `connection:NAME/KEY`).
    pub key: String,
    /// Whole tokens left now.
    pub tokens_left: u64,
    /// When the next token is due (RFC 3339; now when one is left).
    pub next_token_at: String,
    /// Runs deferred to a token reserved for them, not yet used.
    pub reserved: u64,
}

/// A connection's limits, shared by every process on the database.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectionLimitsView {
    /// The connection.
    pub connection: String,
    /// Its rate limit (`null`: none).
    pub rate_limit: Option<RateLimitView>,
    /// Its buckets as stored, by key (empty before the first request).
    pub buckets: Vec<BucketView>,
    /// Its circuit breaker, as stored (every process sees this state).
    pub breaker: BreakerView,
}

/// A connection's rate limit (tokens left and the next token's time per
/// bucket) and circuit breaker, as every process on the database sees them.
#[utoipa::path(
    get, path = "/api/connections/{name}/limits", tag = "connections",
    operation_id = "connection_limits",
    params(("name" = String, Path, description = "The connection's name")),
    responses(
        (status = 200, description = "The connection's limits", body = ConnectionLimitsView),
        (status = 404, description = "No such connection", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn limits(
    State(state): State<AppState>,
    _caller: Caller,
    ApiPath(name): ApiPath,
) -> ApiResult<Json<ConnectionLimitsView>> {
    let h = known(&state, &name)?;
    let l = h.limits(&name).await?;
    Ok(Json(ConnectionLimitsView {
        connection: l.connection,
        rate_limit: l.rate_limit.map(|r| RateLimitView {
            per_second: r.per_second,
            burst: r.burst,
            key: r.key,
        }),
        buckets: l
            .buckets
            .into_iter()
            .map(|b| BucketView {
                key: b.key,
                tokens_left: b.tokens_left,
                next_token_at: b.next_token_at.to_rfc3339(),
                reserved: b.reserved,
            })
            .collect(),
        breaker: BreakerView::from(&l.breaker),
    }))
}

/// This process's circuit breakers, one per connection.
#[utoipa::path(
    get, path = "/api/breakers", tag = "connections",
    responses((status = 200, description = "The breakers", body = BreakerList)),
    security(("bearer" = []))
)]
pub async fn breakers(State(state): State<AppState>, _caller: Caller) -> Json<BreakerList> {
    if !state.config.runs_jobs {
        return Json(BreakerList {
            breakers: Vec::new(),
            note: http_jobs(&state).map(|_| NO_LOCAL_BREAKERS.to_string()),
        });
    }
    let breakers = match http_jobs(&state) {
        Some(h) => {
            h.refresh_breakers().await;
            h.breakers().iter().map(BreakerView::from).collect()
        }
        None => Vec::new(),
    };
    Json(BreakerList {
        breakers,
        note: None,
    })
}

/// The forensic verdicts across a job's runs created since `since` (the
/// caller's tenant; the newest 10,000 runs at most): duplicate dispatches
/// between runs, retries without backoff, lease overlaps, and the count of
/// `same_action_same_error_within_backoff_window`.
#[utoipa::path(
    get, path = "/api/jobs/{job}/forensics", tag = "jobs",
    params(
        ("job" = String, Path, description = "The job's name"),
        ("since" = Option<String>, Query, description = "RFC 3339; default 24 hours ago"),
    ),
    responses(
        (status = 200, description = "The report", body = JobForensics),
        (status = 400, description = "A bad or unknown query parameter (named)", body = ErrorBody),
        (status = 404, description = "No such job, and no runs of it", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn job_forensics(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(job): ApiPath,
    q: QueryPairs,
) -> ApiResult<Json<JobForensics>> {
    q.only(&["since"])?;
    let now = state.docket.clock().now();
    let since = match q.get("since") {
        None => now.plus_millis(-DEFAULT_FORENSICS_WINDOW_MS),
        Some(s) => crate::runs::param_time("since", s)?,
    };
    let report = state
        .docket
        .forensics_for_job(&job, since, Some(caller.tenant.clone()))
        .await?;
    if report.runs_examined == 0 && !state.docket.job_names().contains(&job) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "job `{job}` is not registered and has no runs since {}",
                since.to_rfc3339()
            ),
        ));
    }
    Ok(Json(JobForensics {
        job: report.job,
        since: since.to_rfc3339(),
        runs_examined: report.runs_examined,
        truncated: report.truncated,
        counts: report
            .counts
            .iter()
            .map(|(v, n)| (v.as_str().to_string(), *n))
            .collect(),
        same_action_same_error_within_backoff_window: report
            .same_action_same_error_within_backoff_window,
        verdicts: report
            .verdicts
            .iter()
            .map(|v| serde_json::to_value(v).unwrap_or(Value::Null))
            .collect(),
    }))
}
