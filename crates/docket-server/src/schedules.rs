//! Schedules over HTTP: list, show (next fire times in the zone and in UTC,
//! the last slot's run, the history of slots and changes), create or
//! update, pause, resume, trigger now, backfill, delete. Every change is
//! audited with the token's name and the request's comment. A schedule
//! belongs to the caller's tenant.

use crate::auth::Caller;
use crate::dto::{CommentRequest, TriggerResponse};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, ApiPath, OptionalJson};
use crate::runs::{check_comment, time_problem};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use docket::schedule::ScheduleView;
use docket::{Actor, CatchUp, Overlap, PutOutcome, ScheduleSpec, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// How many fire times a schedule shows.
pub const NEXT_FIRE_TIMES: usize = 5;
/// How many history rows `GET /api/schedules/{name}` shows.
pub const HISTORY_ROWS: usize = 50;

fn ts(t: Option<Timestamp>) -> Option<String> {
    t.map(Timestamp::to_rfc3339)
}

/// A coming slot.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FireTimeView {
    /// The slot, RFC 3339 UTC (the run's key names it).
    pub slot: String,
    /// The slot in the schedule's zone, with its offset and zone name.
    pub local: String,
    /// When it fires: the slot plus its deterministic jitter (UTC).
    pub fires_at: String,
}

/// One row of a schedule's history: a handled slot or a change.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryView {
    /// `fired`, `caught_up`, `backfilled`, `triggered`, `unbuffered`,
    /// `skipped`, `buffered`; or `created`, `updated`, `paused`, `resumed`,
    /// `deleted`.
    pub kind: String,
    /// The slot (slot rows).
    pub slot: Option<String>,
    /// When it was handled (a fired slot: when it fired).
    pub at: String,
    /// The slot's run.
    pub run_id: Option<String>,
    /// Why (skipped slots: `previous_run_unfinished`, `buffer_full`,
    /// `catch_up_none`, `superseded`, `outside_catch_up_window`).
    pub reason: Option<String>,
    /// Who.
    pub actor: Option<String>,
    /// Their comment.
    pub comment: Option<String>,
    /// More (`late_ms`, `existing`, a changed definition).
    #[schema(value_type = Object)]
    pub data: Value,
}

/// A schedule.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleDto {
    /// Unique in the tenant.
    pub name: String,
    /// The job each slot runs.
    pub job: String,
    /// The input template.
    #[schema(value_type = Object)]
    pub input: Value,
    /// The cron expression, or null with `every_ms`.
    pub cron: Option<String>,
    /// The interval in milliseconds, or null with `cron`.
    pub every_ms: Option<i64>,
    /// The IANA time zone.
    pub timezone: String,
    /// No slot before (RFC 3339).
    pub start: Option<String>,
    /// No slot after (RFC 3339).
    pub end: Option<String>,
    /// The jitter window.
    pub jitter_ms: i64,
    /// `allow`, `skip`, `buffer_one`, `cancel_other`.
    pub overlap: String,
    /// `last`, `all`, `none`.
    pub catch_up: String,
    /// Missed slots older than this are skipped.
    pub catch_up_window_ms: i64,
    /// False while paused.
    pub enabled: bool,
    /// `config` (docket.toml) or `api`.
    pub source: String,
    /// Every slot at or before this instant has been handled.
    pub cursor: String,
    /// A slot waiting for the previous run (`buffer_one`).
    pub buffered_slot: Option<String>,
    /// The newest slot that made a run.
    pub last_slot: Option<String>,
    /// Its run.
    pub last_run_id: Option<String>,
    /// Its run's status.
    pub last_run_status: Option<String>,
    /// When it fired.
    pub last_fired_at: Option<String>,
    /// The next fire times.
    pub next: Vec<FireTimeView>,
    /// Who changed it last.
    pub updated_by: String,
    /// When.
    pub updated_at: String,
    /// Their comment.
    pub comment: Option<String>,
}

impl ScheduleDto {
    fn new(v: &ScheduleView) -> Self {
        let s = &v.schedule;
        let d = &s.def;
        ScheduleDto {
            name: d.name.clone(),
            job: d.job.clone(),
            input: d.input.clone(),
            cron: d.cron.clone(),
            every_ms: d.every_ms,
            timezone: d.timezone.clone(),
            start: ts(d.start_at),
            end: ts(d.end_at),
            jitter_ms: d.jitter_ms,
            overlap: d.overlap.as_str().into(),
            catch_up: d.catch_up.as_str().into(),
            catch_up_window_ms: d.catch_up_window_ms,
            enabled: !d.paused,
            source: d.source.clone(),
            cursor: s.cursor_at.to_rfc3339(),
            buffered_slot: ts(s.buffered_slot),
            last_slot: ts(s.last_slot),
            last_run_id: s.last_run_id.map(|r| r.to_string()),
            last_run_status: v.last_run_status.map(|r| r.to_string()),
            last_fired_at: ts(s.last_fired_at),
            next: v
                .next
                .iter()
                .map(|f| FireTimeView {
                    slot: f.slot.to_rfc3339(),
                    local: f.local.clone(),
                    fires_at: f.fires_at.to_rfc3339(),
                })
                .collect(),
            updated_by: s.updated_by.clone(),
            updated_at: s.updated_at.to_rfc3339(),
            comment: s.comment.clone(),
        }
    }
}

/// The tenant's schedules.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    /// By name.
    pub schedules: Vec<ScheduleDto>,
}

/// A schedule with its history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleDetail {
    /// The schedule.
    pub schedule: ScheduleDto,
    /// Newest first: handled slots (with their runs and reasons) and changes.
    pub history: Vec<HistoryView>,
}

/// A schedule to create or replace.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// Letters, digits, `-`, `_`, `.` (1-128).
    pub name: String,
    /// A registered job.
    pub job: String,
    /// The input template (default `{}`): strings may say `{{ slot }}`,
    /// `{{ slot_local }}`, `{{ slot_ms }}`, `{{ schedule }}`.
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// A cron expression (5 fields, 6 with seconds, or `@hourly` …); or
    /// `every`.
    pub cron: Option<String>,
    /// An interval such as `"30s"`, `"5m"`; or `cron`.
    pub every: Option<String>,
    /// IANA time zone (default `UTC`).
    pub timezone: Option<String>,
    /// No slot before (RFC 3339).
    pub start: Option<String>,
    /// No slot after (RFC 3339).
    pub end: Option<String>,
    /// Deterministic jitter window (default 0).
    #[serde(default, deserialize_with = "crate::extract::integral::opt_u64")]
    pub jitter_ms: Option<u64>,
    /// `allow`, `skip` (default), `buffer_one`, `cancel_other`.
    pub overlap: Option<String>,
    /// `last` (default), `all`, `none`.
    pub catch_up: Option<String>,
    /// A duration (default `"24h"`).
    pub catch_up_window: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
    /// Stored in the history.
    pub comment: Option<String>,
}

/// A range of slots to fire.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequest {
    /// From this instant (RFC 3339), inclusive.
    pub from: String,
    /// To this instant (RFC 3339), inclusive.
    pub to: String,
    /// Stored in the history.
    pub comment: Option<String>,
}

/// The runs a backfill fired (or found), in slot order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillResponse {
    /// One per slot.
    pub runs: Vec<TriggerResponse>,
}

/// The answer to a delete.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// The schedule's name.
    pub deleted: String,
}

fn time(field: &str, s: &str) -> ApiResult<Timestamp> {
    Timestamp::parse_checked(s)
        .map_err(|e| ApiError::invalid_field(field, time_problem(field, s, e)))
}

fn actor(caller: &Caller, comment: Option<String>) -> Actor {
    Actor::new(caller.name.clone(), comment)
}

fn spec(caller: &Caller, r: ScheduleRequest) -> ApiResult<ScheduleSpec> {
    let overlap: Overlap = match &r.overlap {
        Some(o) => o.parse().map_err(|e: docket::schedule::ScheduleError| {
            ApiError::invalid_field("overlap", e.to_string())
        })?,
        None => Overlap::default(),
    };
    let catch_up: CatchUp = match &r.catch_up {
        Some(o) => o.parse().map_err(|e: docket::schedule::ScheduleError| {
            ApiError::invalid_field("catch_up", e.to_string())
        })?,
        None => CatchUp::default(),
    };
    Ok(ScheduleSpec {
        name: r.name,
        tenant: Some(caller.tenant.clone()),
        job: r.job,
        input: r.input.unwrap_or_else(|| Value::Object(Default::default())),
        cron: r.cron,
        every: r.every,
        timezone: r.timezone,
        start: r.start.as_deref().map(|s| time("start", s)).transpose()?,
        end: r.end.as_deref().map(|s| time("end", s)).transpose()?,
        jitter_ms: r.jitter_ms.unwrap_or(0),
        overlap,
        catch_up,
        catch_up_window: r.catch_up_window,
        paused: !r.enabled.unwrap_or(true),
    })
}

async fn detail(state: &AppState, caller: &Caller, name: &str) -> ApiResult<ScheduleDetail> {
    let v = state
        .docket
        .schedule_view(&caller.tenant, name, NEXT_FIRE_TIMES, HISTORY_ROWS)
        .await?;
    Ok(ScheduleDetail {
        schedule: ScheduleDto::new(&v),
        history: v
            .history
            .iter()
            .map(|h| HistoryView {
                kind: h.kind.clone(),
                slot: ts(h.slot_at),
                at: h.at.to_rfc3339(),
                run_id: h.run_id.map(|r| r.to_string()),
                reason: h.reason.clone(),
                actor: h.actor.clone(),
                comment: h.comment.clone(),
                data: h.data.clone(),
            })
            .collect(),
    })
}

/// The caller's schedules with their next fire times.
#[utoipa::path(
    get, path = "/api/schedules", tag = "schedules",
    operation_id = "list_schedules",
    responses((status = 200, description = "The schedules", body = ScheduleList)),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<ScheduleList>> {
    let views = state
        .docket
        .list_schedule_views(Some(&caller.tenant), NEXT_FIRE_TIMES)
        .await?;
    Ok(Json(ScheduleList {
        schedules: views.iter().map(ScheduleDto::new).collect(),
    }))
}

/// Creates a schedule, or replaces the definition of the one with that
/// name (its position is kept: no slot fires twice).
///
/// 201 when created, 200 when updated or unchanged.
#[utoipa::path(
    post, path = "/api/schedules", tag = "schedules",
    operation_id = "put_schedule",
    request_body = ScheduleRequest,
    responses(
        (status = 201, description = "Created", body = ScheduleDetail),
        (status = 200, description = "Updated (or unchanged)", body = ScheduleDetail),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is wrong (named; a cron error gives the field and column), or the job is unknown", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ScheduleRequest>,
) -> ApiResult<Response> {
    check_comment(&req.comment)?;
    let comment = req.comment.clone();
    let spec = spec(&caller, req)?;
    let (s, outcome) = state
        .docket
        .put_schedule(spec, "api", actor(&caller, comment))
        .await?;
    let body = detail(&state, &caller, &s.def.name).await?;
    let code = if outcome == PutOutcome::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(body)).into_response())
}

/// A schedule: its next 5 fire times (in its zone and in UTC), the last
/// slot's run and status, and its history (slots fired, caught up,
/// skipped with the reason; changes with who and why), newest first.
#[utoipa::path(
    get, path = "/api/schedules/{name}", tag = "schedules",
    operation_id = "show_schedule",
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, description = "The schedule", body = ScheduleDetail),
        (status = 404, description = "No such schedule in the caller's tenant", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
) -> ApiResult<Json<ScheduleDetail>> {
    Ok(Json(detail(&state, &caller, &name).await?))
}

/// Deletes a schedule. Its runs stay as they are; a buffered slot is
/// dropped; its history stays in the store.
#[utoipa::path(
    delete, path = "/api/schedules/{name}", tag = "schedules",
    operation_id = "delete_schedule",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the history"),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<Deleted>> {
    check_comment(&req.comment)?;
    state
        .docket
        .delete_schedule(&caller.tenant, &name, actor(&caller, req.comment))
        .await?;
    Ok(Json(Deleted { deleted: name }))
}

async fn set_paused(
    state: AppState,
    caller: Caller,
    name: String,
    req: CommentRequest,
    paused: bool,
) -> ApiResult<Json<ScheduleDetail>> {
    check_comment(&req.comment)?;
    state
        .docket
        .set_schedule_paused(&caller.tenant, &name, paused, actor(&caller, req.comment))
        .await?;
    Ok(Json(detail(&state, &caller, &name).await?))
}

/// Pauses a schedule: no slot fires until it is resumed.
#[utoipa::path(
    post, path = "/api/schedules/{name}/pause", tag = "schedules",
    operation_id = "pause_schedule",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the history"),
    responses(
        (status = 200, description = "The schedule after the change", body = ScheduleDetail),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<ScheduleDetail>> {
    set_paused(state, caller, name, req, true).await
}

/// Resumes a schedule from now: slots that fell while it was paused are
/// not caught up (backfill them if wanted).
#[utoipa::path(
    post, path = "/api/schedules/{name}/resume", tag = "schedules",
    operation_id = "resume_schedule",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the history"),
    responses(
        (status = 200, description = "The schedule after the change", body = ScheduleDetail),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Json<ScheduleDetail>> {
    set_paused(state, caller, name, req, false).await
}

/// Fires the schedule now: a run keyed `schedule:NAME:<now>`, recorded as a
/// `triggered` slot.
#[utoipa::path(
    post, path = "/api/schedules/{name}/trigger", tag = "schedules",
    operation_id = "trigger_schedule",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body(content = Option<CommentRequest>, description = "Optional; stored in the history"),
    responses(
        (status = 201, description = "The run", body = TriggerResponse),
        (status = 404, description = "No such schedule", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    OptionalJson(req): OptionalJson<CommentRequest>,
) -> ApiResult<Response> {
    check_comment(&req.comment)?;
    let t = state
        .docket
        .trigger_schedule(&caller.tenant, &name, actor(&caller, req.comment))
        .await?;
    state.hub.nudge();
    Ok((StatusCode::CREATED, Json(state.trigger_response(&t))).into_response())
}

/// Fires every slot of the schedule between `from` and `to` (inclusive, at
/// most 1,000), through the same path as the scheduler: a slot whose run
/// exists returns it (`existing`).
#[utoipa::path(
    post, path = "/api/schedules/{name}/backfill", tag = "schedules",
    operation_id = "backfill_schedule",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body = BackfillRequest,
    responses(
        (status = 200, description = "The runs, in slot order", body = BackfillResponse),
        (status = 404, description = "No such schedule", body = ErrorBody),
        (status = 422, description = "A time is wrong, `to` is before `from`, or the range has more than 1,000 slots", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn backfill(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath,
    ApiJson(req): ApiJson<BackfillRequest>,
) -> ApiResult<Json<BackfillResponse>> {
    check_comment(&req.comment)?;
    let from = time("from", &req.from)?;
    let to = time("to", &req.to)?;
    let runs = state
        .docket
        .backfill_schedule(&caller.tenant, &name, from, to, actor(&caller, req.comment))
        .await?;
    state.hub.nudge();
    Ok(Json(BackfillResponse {
        runs: runs.iter().map(|t| state.trigger_response(t)).collect(),
    }))
}
