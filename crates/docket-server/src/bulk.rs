//! `POST /api/runs/bulk`: an operator action on many runs of the caller's
//! tenant, by id list or by filter, one bounded page per call with a
//! cursor, per-run results, and a dry run that counts first. Each run's
//! action is the single-run operation, audited as if done alone
//! (`docket::bulk`).

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiJson;
use crate::runs::check_comment;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use docket::bulk::{BulkAction, BulkRequest, BulkTarget, MAX_BULK_PAGE};
use docket::{Actor, RunFilter, RunId, RunStatus, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Which runs, by filter (all of the tenant's runs that match).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Only this job.
    pub job: Option<String>,
    /// Any of these statuses (required: name the states to act on).
    #[serde(default)]
    pub status: Vec<String>,
    /// Created at or after (RFC 3339).
    pub created_after: Option<String>,
    /// Created before (RFC 3339).
    pub created_before: Option<String>,
}

/// A bulk action: `ids` or `filter`, one of them.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// `retry`, `cancel`, `retrigger`, `postpone` or `delete`.
    pub action: String,
    /// These runs (at most 10,000 per call).
    pub ids: Option<Vec<String>>,
    /// Or every run matching this filter.
    pub filter: Option<BulkFilter>,
    /// Stored on each run's audit event.
    pub comment: Option<String>,
    /// `retry`: merged into each run's variables.
    pub updated_variables: Option<Value>,
    /// `postpone`: not before this instant (RFC 3339, in the future).
    pub until: Option<String>,
    /// `postpone`: or not before now plus this many milliseconds.
    pub delay_ms: Option<u64>,
    /// Only count the matching runs; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Runs handled in this call, 1 to 500 (default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous call, to continue.
    pub cursor: Option<String>,
}

/// What happened to one run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkItemView {
    /// The run.
    pub run_id: String,
    /// Whether the action was applied.
    pub ok: bool,
    /// Its status after the action (delete: before it; a refusal: now).
    pub status: Option<String>,
    /// `retrigger`: the new run.
    pub new_run_id: Option<String>,
    /// Why not: `wrong_state`, `not_found`, `invalid_input`, `store_error`.
    pub error: Option<String>,
    /// The refusal's sentence.
    pub message: Option<String>,
}

/// One call's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkResponse {
    /// The action.
    pub action: String,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Dry run: how many runs match (up to 1,000,000).
    pub matched: Option<usize>,
    /// Per run, in the order handled.
    pub results: Vec<BulkItemView>,
    /// Applied in this call.
    pub succeeded: usize,
    /// Refused in this call.
    pub failed: usize,
    /// Pass it as `cursor` to continue; null when done.
    pub next_cursor: Option<String>,
}

const MAX_IDS: usize = 10_000;

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_field(field, message)
}

fn time(field: &str, s: &Option<String>) -> ApiResult<Option<Timestamp>> {
    s.as_deref()
        .map(|v| {
            Timestamp::parse_checked(v)
                .map_err(|e| bad(field, crate::runs::time_problem(field, v, e)))
        })
        .transpose()
}

/// Acts on many runs: by `ids` or by `filter` (its `status` is required),
/// at most `limit` runs per call; continue with `cursor` = `next_cursor`
/// until it is null. `dry_run` counts the matching runs first. Each run's
/// action is its own transaction with its own audit event (actor, comment)
/// exactly as if done alone; a run in the wrong state (or not found) is
/// reported in its result, not as a failure of the call.
#[utoipa::path(
    post, path = "/api/runs/bulk", tag = "operator",
    operation_id = "bulk_runs",
    request_body = BulkBody,
    responses(
        (status = 200, description = "One page of per-run results, or the dry run's count", body = BulkResponse),
        (status = 422, description = "A field is wrong (named)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn bulk(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(b): ApiJson<BulkBody>,
) -> ApiResult<Json<BulkResponse>> {
    check_comment(&b.comment)?;
    let now = state.docket.clock().now();
    let action = match b.action.as_str() {
        "retry" => {
            if b.updated_variables
                .as_ref()
                .is_some_and(|v| !v.is_object() && !v.is_null())
            {
                return Err(bad(
                    "updated_variables",
                    "`updated_variables` must be a JSON object",
                ));
            }
            BulkAction::Retry {
                updated_variables: b.updated_variables.clone().filter(|v| !v.is_null()),
            }
        }
        "cancel" => BulkAction::Cancel,
        "retrigger" => BulkAction::Retrigger,
        "delete" => BulkAction::Delete,
        "postpone" => {
            let until = match (time("until", &b.until)?, b.delay_ms) {
                (Some(t), None) if t >= now => t,
                (Some(t), None) => {
                    return Err(bad(
                        "until",
                        format!(
                            "`until` ({}) is in the past (now is {})",
                            t.to_rfc3339(),
                            now.to_rfc3339()
                        ),
                    ))
                }
                (None, Some(ms)) if ms <= crate::openapi::MAX_DELAY_MS => {
                    let t = now.plus_millis(ms as i64);
                    if t > Timestamp::MAX {
                        return Err(bad("delay_ms", "`delay_ms` would end after 9999-12-31"));
                    }
                    t
                }
                (None, Some(_)) => {
                    return Err(bad("delay_ms", "`delay_ms` must be 0 to 100 years"));
                }
                _ => {
                    return Err(bad(
                        "until",
                        "postpone needs `until` (RFC 3339) or `delay_ms`, one of them",
                    ))
                }
            };
            BulkAction::Postpone { until }
        }
        other => {
            return Err(bad(
                "action",
                format!(
                    "unknown action `{other}`: use retry, cancel, retrigger, postpone or delete"
                ),
            ))
        }
    };
    let target = match (&b.ids, &b.filter) {
        (Some(ids), None) => {
            if ids.is_empty() || ids.len() > MAX_IDS {
                return Err(bad("ids", format!("`ids` must hold 1 to {MAX_IDS} run ids")));
            }
            let mut parsed = Vec::with_capacity(ids.len());
            for (i, s) in ids.iter().enumerate() {
                parsed.push(s.parse::<RunId>().map_err(|_| {
                    bad(&format!("ids[{i}]"), format!("`{s}` is not a run id"))
                })?);
            }
            BulkTarget::Ids(parsed)
        }
        (None, Some(f)) => {
            if f.status.is_empty() {
                return Err(bad(
                    "filter.status",
                    "`filter.status` is required: name the states to act on (e.g. [\"failed\"])",
                ));
            }
            let mut statuses = Vec::new();
            for (i, s) in f.status.iter().enumerate() {
                let st: RunStatus = s
                    .parse()
                    .map_err(|m: String| bad(&format!("filter.status[{i}]"), m))?;
                if !statuses.contains(&st) {
                    statuses.push(st);
                }
            }
            BulkTarget::Filter(RunFilter {
                statuses,
                job: f.job.clone(),
                created_after: time("filter.created_after", &f.created_after)?,
                created_before: time("filter.created_before", &f.created_before)?,
                ..Default::default()
            })
        }
        _ => {
            return Err(bad(
                "ids",
                "give `ids` (a list of run ids) or `filter` (job, status, created_after, created_before), one of them",
            ))
        }
    };
    let limit = b.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_BULK_PAGE {
        return Err(bad(
            "limit",
            format!("`limit` must be 1 to {MAX_BULK_PAGE}"),
        ));
    }
    let cursor = b
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<RunId>()
                .map_err(|_| bad("cursor", format!("`{c}` is not a cursor")))
        })
        .transpose()?;
    let page = state
        .docket
        .bulk(BulkRequest {
            tenant: caller.tenant.clone(),
            action,
            target,
            by: Actor::new(caller.name.clone(), b.comment.clone()),
            limit,
            cursor,
            dry_run: b.dry_run,
        })
        .await?;
    if page.succeeded > 0 {
        state.hub.nudge();
    }
    Ok(Json(BulkResponse {
        action: page.action,
        dry_run: page.dry_run,
        matched: page.matched,
        succeeded: page.succeeded,
        failed: page.failed,
        next_cursor: page.next_cursor.map(|c| c.to_string()),
        results: page
            .results
            .into_iter()
            .map(|i| BulkItemView {
                run_id: i.run_id.to_string(),
                ok: i.ok,
                status: i.status,
                new_run_id: i.new_run_id.map(|r| r.to_string()),
                error: i.error,
                message: i.message,
            })
            .collect(),
    }))
}
