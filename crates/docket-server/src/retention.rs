//! Queue operations over HTTP: pausing and resuming a job (or every job of
//! the caller's tenant, `*`), and deleting a final run. See
//! docs/OPERATIONS.md.

use crate::auth::Caller;
use crate::dto::{CommentRequest, RunView};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiPath, OptionalJson};
use crate::runs::{check_comment, load_run};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use docket::retention::ALL_JOBS;
use docket::Actor;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A job's pause state after a pause or resume.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PauseView {
    /// The caller's tenant.
    pub tenant: String,
    /// The job, or `*` for every job of the tenant.
    pub job: String,
    /// Whether it is paused now.
    pub paused: bool,
    /// Whether this call changed it (false: it already was).
    pub changed: bool,
}

/// The job must be registered here (as for a trigger), or `*`.
fn check_job(state: &AppState, job: &str) -> ApiResult<()> {
    if job == ALL_JOBS || state.docket.job_names().iter().any(|j| j == job) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_job",
        format!(
            "unknown job `{job}`: it is not registered on this server (see GET /api/jobs); `*` pauses every job of the tenant"
        ),
    ))
}

async fn set(
    state: AppState,
    caller: Caller,
    job: String,
    req: CommentRequest,
    paused: bool,
) -> ApiResult<Json<PauseView>> {
    check_comment(&req.comment)?;
    check_job(&state, &job)?;
    let by = Actor::new(caller.name.clone(), req.comment);
    let changed = if paused {
        state.docket.pause_job(&caller.tenant, &job, by).await?
    } else {
        state.docket.resume_job(&caller.tenant, &job, by).await?
    };
    state.hub.nudge();
    Ok(Json(PauseView {
        tenant: caller.tenant,
        job,
        paused,
        changed,
    }))
}

/// Pauses a job for the caller's tenant (`*`: every job of the tenant): its
/// runs stay queued — triggers still create them — but no worker of any
/// process claims them until it is resumed. Audited (`job_paused`).
#[utoipa::path(
    post, path = "/api/jobs/{job}/pause", tag = "jobs",
    operation_id = "pause_job",
    params(("job" = String, Path, description = "A registered job, or `*` for every job of the tenant")),
    request_body(content = Option<CommentRequest>, description = "Optional"),
    responses(
        (status = 200, description = "Paused (changed = false: it already was)", body = PauseView),
        (status = 404, description = "No such job on this server", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(job): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<PauseView>> {
    set(state, caller, job, req, true).await
}

/// Resumes a paused job (or `*`) of the caller's tenant; its due runs are
/// claimed at once. Audited (`job_resumed`).
#[utoipa::path(
    post, path = "/api/jobs/{job}/resume", tag = "jobs",
    operation_id = "resume_job",
    params(("job" = String, Path, description = "A registered job, or `*`")),
    request_body(content = Option<CommentRequest>, description = "Optional"),
    responses(
        (status = 200, description = "Running (changed = false: it was not paused)", body = PauseView),
        (status = 404, description = "No such job on this server", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(job): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<PauseView>> {
    set(state, caller, job, req, false).await
}

/// Deletes a final run (completed, failed, cancelled) with its attempts,
/// events and steps. Audited: a `run_deleted` event keeps its id, who
/// deleted it, the comment and its last state. Export it first
/// (`docket runs export`) to keep its history.
#[utoipa::path(
    post, path = "/api/runs/{id}/delete", tag = "operator",
    operation_id = "delete_run",
    params(("id" = String, Path, description = "The run's id")),
    request_body(content = Option<CommentRequest>, description = "Optional"),
    responses(
        (status = 200, description = "The run as it was before it was deleted", body = RunView),
        (status = 404, description = "No such run in the caller's tenant", body = ErrorBody),
        (status = 409, description = "The run is not final (its state is named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<RunView>> {
    let id = id.parse().map_err(|_| ApiError::run_not_found(&id))?;
    check_comment(&req.comment)?;
    load_run(&state, &caller, id).await?;
    let run = state
        .docket
        .delete_run(id, Actor::new(caller.name.clone(), req.comment))
        .await?;
    state.hub.nudge();
    Ok(Json(RunView::new(&run, state.docket.clock().now())))
}
