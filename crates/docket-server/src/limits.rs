//! `GET /api/limits`: flow control as it stands now, for operators
//! (docs/FLOW_CONTROL.md). Concurrency keys: per key, its running runs, its
//! limit, and its runs due and waiting (held back while running >= limit).

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

/// Flow control in the caller's tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Every concurrency key with runs running or waiting, by key (at most
    /// 1,000; `truncated` says when there were more).
    pub concurrency: Vec<KeyView>,
    /// More keys exist than listed.
    pub truncated: bool,
}

/// Concurrency keys of the caller's tenant with runs running or waiting:
/// per key, running, limit, due and waiting runs.
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
    Ok(Json(Limits {
        concurrency: keys.into_iter().map(view).collect(),
        truncated,
    }))
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
