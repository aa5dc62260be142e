//! `GET /api/limits`: flow control as it stands now, for operators
//! (docs/FLOW_CONTROL.md). Concurrency keys: per key, its running runs, its
//! limit, and its runs due and waiting (held back while running >= limit).
//! Debounce: the open windows (a trigger of their key now would be
//! collapsed into their run), with the run, the count and the mode. Both
//! only of the caller's tenant.

use crate::auth::Caller;
use crate::error::{ApiResult, ErrorBody};
use crate::AppState;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most keys one answer lists (the first, by key).
pub const MAX_KEYS: usize = 1_000;

/// One concurrency key's use now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    /// The key (rendered at trigger time from the job's template).
    pub key: String,
    /// How many of its runs may run at once.
    pub limit: u32,
    /// Its runs running now (every process).
    pub running: u64,
    /// Its runs due now and not running: held while `running >= limit`.
    pub due: u64,
    /// Its runs waiting: pending or postponed, due or not.
    pub waiting: u64,
    /// Whether due runs are held back now (`due > 0 && running >= limit`).
    pub held: bool,
}

/// One open debounce window: triggers of its key now are collapsed into
/// its run (docs/FLOW_CONTROL.md, "Debounce").
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DebounceWindowView {
    /// The job.
    pub job: String,
    /// The key (rendered at trigger time from the debounce's template).
    pub key: String,
    /// Which input the run keeps: `first` (throttle) or `last` (debounce).
    pub keep: String,
    /// When the window opened (its first trigger), RFC 3339.
    pub opened_at: String,
    /// When it ends (exclusive: a trigger at this instant opens a new
    /// window), RFC 3339.
    pub until: String,
    /// The window's run: the one collapsed triggers answer with. With
    /// `keep = last` it is pending until the window ends.
    pub run: String,
    /// That run's status now.
    pub run_status: String,
    /// Triggers collapsed into it so far.
    pub collapsed: u32,
}

/// Flow control in the caller's tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Every concurrency key with runs running or waiting, by key (at most
    /// 1,000; `truncated` says when there were more).
    pub concurrency: Vec<KeyView>,
    /// More keys exist than listed.
    pub truncated: bool,
    /// The open debounce windows, by job then key (at most 1,000;
    /// `debounce_truncated` says when there were more).
    pub debounce: Vec<DebounceWindowView>,
    /// More open windows exist than listed.
    pub debounce_truncated: bool,
}

/// Concurrency keys of the caller's tenant with runs running or waiting
/// (per key, running, limit, due and waiting runs) and its open debounce
/// windows.
#[utoipa::path(
    get, path = "/api/limits", tag = "ops", operation_id = "limits",
    responses(
        (status = 200, description = "Flow control now", body = Limits),
        (status = 401, description = "No valid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn limits(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Limits>> {
    let mut keys = state
        .docket
        .store()
        .concurrency_usage(
            Some(caller.tenant.clone()),
            state.docket.clock().now(),
            MAX_KEYS + 1,
        )
        .await?;
    let truncated = keys.len() > MAX_KEYS;
    keys.truncate(MAX_KEYS);
    let mut windows = state
        .docket
        .store()
        .debounce_windows(
            Some(caller.tenant.clone()),
            state.docket.clock().now(),
            MAX_KEYS + 1,
        )
        .await?;
    let debounce_truncated = windows.len() > MAX_KEYS;
    windows.truncate(MAX_KEYS);
    Ok(Json(Limits {
        concurrency: keys.into_iter().map(view).collect(),
        truncated,
        debounce: windows.into_iter().map(window_view).collect(),
        debounce_truncated,
    }))
}

fn window_view(w: docket_store::DebounceWindow) -> DebounceWindowView {
    DebounceWindowView {
        job: w.job,
        key: w.key,
        keep: w.keep.as_str().to_string(),
        opened_at: w.opened_at.to_rfc3339(),
        until: w.until.to_rfc3339(),
        run: w.run.to_string(),
        run_status: w.status.as_str().to_string(),
        collapsed: w.collapsed,
    }
}

fn view(k: docket_store::KeyUsage) -> KeyView {
    KeyView {
        held: k.due > 0 && k.running >= u64::from(k.limit),
        key: k.key,
        limit: k.limit,
        running: k.running,
        due: k.due,
        waiting: k.waiting,
    }
}
