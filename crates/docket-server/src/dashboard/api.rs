//! The JSON endpoints the dashboard's pages call, beside the REST API (same
//! bearer tokens, same tenant confinement):
//!
//! - `GET /api/dashboard/whoami` — the token's tenant and name, the jobs;
//! - `GET /api/dashboard/runs` — a bounded page of runs with filters by
//!   status, job and text, the "needs attention" quick filter and its count;
//! - `GET /api/dashboard/evaluations?ids=…` — the worst forensic verdict of
//!   each run (the list's evaluation badges);
//! - `GET /api/runs/{id}/forensics` — a run's verdicts, attempts with gaps,
//!   the policy's delays and fingerprints, and the retry picture (SVG); in
//!   the OpenAPI document and used by `docket forensics` too;
//! - `GET /api/stats?window=1h|1d` — runs triggered in the window by job
//!   and status, failures and retries by error class, failure rate, the
//!   chart (SVG), connections that are not usable and open circuit
//!   breakers.

use super::svg;
use crate::auth::Caller;
use crate::dto::RunView;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, QueryPairs};
use crate::runs::load_run;
use crate::AppState;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use docket::{PairVerdict, RunId, RunStatus, Severity, Timestamp};
use docket_store::{ConnectionStatus, RunScan, WindowQuery};
use serde::Serialize;
use std::collections::BTreeMap;

/// Most runs one list request examines when filters leave gaps (the page
/// then says where to continue).
pub const SCAN_BUDGET: usize = 2_000;
/// Most runs one stats request examines (newest first).
pub const STATS_MAX_RUNS: usize = 50_000;
/// Most runs one evaluations request takes.
pub const MAX_EVALUATIONS: usize = 100;

/// The dashboard's API routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/dashboard/whoami", get(whoami))
        .route("/api/dashboard/runs", get(runs))
        .route("/api/dashboard/evaluations", get(evaluations))
        .route("/api/stats", get(stats))
}

fn now(state: &AppState) -> Timestamp {
    state.docket.clock().now()
}

fn parse_id(s: &str) -> ApiResult<RunId> {
    s.parse().map_err(|_| ApiError::run_not_found(s))
}

/// Who the token is.
#[derive(Debug, Serialize)]
pub struct WhoAmI {
    /// The tenant every answer is confined to.
    pub tenant: String,
    /// The token's name (the actor of operator actions).
    pub name: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The server's clock (RFC 3339).
    pub now: String,
    /// The jobs registered on this server, by name.
    pub jobs: Vec<String>,
    /// Where a run's trace is linked (`{trace_id}` replaced), if set.
    pub trace_url: Option<String>,
}

async fn whoami(State(state): State<AppState>, caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        tenant: caller.tenant,
        name: caller.name,
        backend: state.store().backend().to_string(),
        now: now(&state).to_rfc3339(),
        jobs: state.docket.job_names(),
        trace_url: state.config.trace_url.clone(),
    })
}

/// A page of the runs list.
#[derive(Debug, Serialize)]
pub struct DashRunPage {
    /// Matching runs, newest first.
    pub runs: Vec<RunView>,
    /// Pass as `cursor` for the next page; absent at the end.
    pub next_cursor: Option<String>,
    /// How many runs were examined for this page.
    pub examined: usize,
    /// True when the search budget ran out before the page filled: older
    /// runs were not examined yet (continue with `next_cursor`).
    pub partial: bool,
    /// The tenant's runs needing attention (failed or needs_input).
    pub attention_count: i64,
    /// The server's clock (RFC 3339), for ages and countdowns.
    pub now: String,
}

fn flag(q: &QueryPairs, name: &str) -> ApiResult<bool> {
    match q.get(name) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(ApiError::bad_param(
            name,
            format!("{name} must be true or false, not `{v}`"),
        )),
    }
}

async fn runs(
    State(state): State<AppState>,
    caller: Caller,
    q: QueryPairs,
) -> ApiResult<Json<DashRunPage>> {
    q.only(&["status", "job", "q", "attention", "cursor", "limit"])?;
    let mut statuses = Vec::new();
    for s in q.all("status") {
        let st: RunStatus = s.parse().map_err(|m| ApiError::bad_param("status", m))?;
        if !statuses.contains(&st) {
            statuses.push(st);
        }
    }
    let attention = flag(&q, "attention")?;
    let limit = match q.get("limit") {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=200).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_param(
                    "limit",
                    format!("limit must be 1 to 200, not `{s}`"),
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
    let job = q.get("job").filter(|j| !j.is_empty()).map(str::to_string);
    let text = q
        .get("q")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    if text.as_ref().is_some_and(|t| t.len() > 200) {
        return Err(ApiError::bad_param("q", "q is longer than 200 bytes"));
    }
    let attention_count = state.store().attention_count(caller.tenant.clone()).await?;
    let now = now(&state);
    let view = |r: &docket::Run| RunView::new(r, now);
    // A whole run id: that run, if it is the caller's.
    if let Some(id) = text.as_deref().and_then(|t| t.parse::<RunId>().ok()) {
        let runs = match state.store().get_run(id).await? {
            Some(r) if r.tenant == caller.tenant && before_id.is_none() => vec![view(&r)],
            _ => Vec::new(),
        };
        return Ok(Json(DashRunPage {
            runs,
            next_cursor: None,
            examined: 1,
            partial: false,
            attention_count,
            now: now.to_rfc3339(),
        }));
    }
    if attention {
        let wanted = [RunStatus::Failed, RunStatus::NeedsInput];
        if statuses.is_empty() {
            statuses = wanted.to_vec();
        } else {
            statuses.retain(|s| wanted.contains(s));
            if statuses.is_empty() {
                return Ok(Json(DashRunPage {
                    runs: Vec::new(),
                    next_cursor: None,
                    examined: 0,
                    partial: false,
                    attention_count,
                    now: now.to_rfc3339(),
                }));
            }
        }
    }
    let page = state
        .store()
        .scan_runs(RunScan {
            tenant: caller.tenant.clone(),
            statuses,
            job,
            text,
            before_id,
            limit,
            budget: SCAN_BUDGET,
        })
        .await?;
    Ok(Json(DashRunPage {
        partial: page.runs.len() < limit && page.resume_before.is_some(),
        runs: page.runs.iter().map(view).collect(),
        next_cursor: page.resume_before.map(|id| id.to_string()),
        examined: page.examined,
        attention_count,
        now: now.to_rfc3339(),
    }))
}

/// The worst verdict of one run.
#[derive(Debug, Serialize)]
pub struct Evaluation {
    /// The run.
    pub run_id: String,
    /// The worst severity among its verdicts (`None`: no pair of failures).
    pub worst: Option<Severity>,
    /// The verdict of that severity that came first.
    pub verdict: Option<String>,
    /// Its explanation.
    pub explanation: Option<String>,
    /// How many verdicts of each kind.
    pub counts: BTreeMap<String, usize>,
}

/// The answer of `/api/dashboard/evaluations`.
#[derive(Debug, Serialize)]
pub struct Evaluations {
    /// One per run asked for that the caller can see.
    pub evaluations: Vec<Evaluation>,
}

fn worst(verdicts: &[PairVerdict]) -> Option<&PairVerdict> {
    verdicts
        .iter()
        .fold(None, |best: Option<&PairVerdict>, v| match best {
            Some(b) if b.severity >= v.severity => Some(b),
            _ => Some(v),
        })
}

async fn evaluations(
    State(state): State<AppState>,
    caller: Caller,
    q: QueryPairs,
) -> ApiResult<Json<Evaluations>> {
    q.only(&["ids"])?;
    let ids = q.all("ids");
    if ids.len() > MAX_EVALUATIONS {
        return Err(ApiError::bad_param(
            "ids",
            format!("at most {MAX_EVALUATIONS} ids, not {}", ids.len()),
        ));
    }
    let mut out = Vec::with_capacity(ids.len());
    for s in ids {
        let Ok(id) = s.parse::<RunId>() else {
            return Err(ApiError::bad_param("ids", format!("`{s}` is not a run id")));
        };
        if load_run(&state, &caller, id).await.is_err() {
            continue;
        }
        let report = state.docket.forensics(id).await?;
        let mut counts = BTreeMap::new();
        for v in &report.verdicts {
            *counts.entry(v.verdict.as_str().to_string()).or_insert(0) += 1;
        }
        let w = worst(&report.verdicts);
        out.push(Evaluation {
            run_id: id.to_string(),
            worst: w.map(|v| v.severity),
            verdict: w.map(|v| v.verdict.as_str().to_string()),
            explanation: w.map(|v| v.explanation.clone()),
            counts,
        });
    }
    Ok(Json(Evaluations { evaluations: out }))
}

/// One attempt as the forensic view sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ForensicAttempt {
    /// Its number.
    pub attempt: u32,
    /// Its lease.
    pub lease_id: String,
    /// The worker.
    pub worker: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Its outcome.
    pub outcome: String,
    /// The failure's class.
    pub error_class: Option<String>,
    /// From the previous attempt's end to this one's start.
    pub gap_ms: Option<i64>,
    /// The delay the policy chose after the previous attempt.
    pub policy_delay_ms: Option<i64>,
    /// When a refused late report of this attempt arrived.
    pub late_report_at: Option<String>,
    /// The step or action that failed (`None`: outside any step).
    pub action: Option<String>,
    /// Why the policy retried (`backoff`, `retry_after`, `circuit_open`, …).
    pub retry_reason: Option<String>,
    /// The delay the policy chose after this attempt.
    pub delay_ms: Option<i64>,
    /// The failure fingerprint (action, error class, worker, lease,
    /// idempotency key, timings), decoded.
    #[schema(value_type = Option<Object>)]
    pub fingerprint: Option<docket::Fingerprint>,
    /// A hash of (job, action, error class): equal for "the same failure".
    pub failure_key: Option<String>,
}

/// A run's forensic view.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ForensicsView {
    /// The run.
    pub run_id: String,
    /// The worst severity among the verdicts (`info`, `warning`,
    /// `critical`).
    #[schema(value_type = Option<String>)]
    pub worst: Option<Severity>,
    /// A verdict per pair of failures of the same action and error class:
    /// `first`, `second`, `action`, `error_class`, `verdict`, `severity`,
    /// `gap_ms`, `expected_delay_ms`, `explanation`.
    #[schema(value_type = Vec<Object>)]
    pub verdicts: Vec<PairVerdict>,
    /// Every attempt with its gap and the policy's delay before it.
    pub attempts: Vec<ForensicAttempt>,
    /// The retry picture: attempts on a time axis, gaps against the
    /// policy's delays.
    pub chart_svg: String,
}

/// A run's attempt timeline with fingerprints, and a verdict for each pair
/// of failures of the same action with the same error class.
#[utoipa::path(
    get, path = "/api/runs/{id}/forensics", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The forensic view", body = ForensicsView),
        (status = 404, description = "No such run in the caller's tenant", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn forensics(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<ForensicsView>> {
    let id = parse_id(&id)?;
    load_run(&state, &caller, id).await?;
    let report = state.docket.forensics(id).await?;
    let now = now(&state);
    let late = |attempt: u32| {
        report
            .failures
            .iter()
            .filter(|f| f.late_report && f.attempt == attempt)
            .map(|f| f.finished_at)
            .max()
    };
    let mut chart = svg::RetryChart {
        now: now.0,
        next_eligible: report
            .run
            .is_retry_scheduled(now)
            .then_some(report.run.run_after.0),
        ..Default::default()
    };
    let mut attempts = Vec::with_capacity(report.timeline.len());
    for t in &report.timeline {
        let a = &t.attempt;
        let late_at = late(a.attempt);
        chart.attempts.push(svg::ChartAttempt {
            attempt: a.attempt,
            start: a.started_at.0,
            end: a.finished_at.map(|f| f.0),
            outcome: a.outcome.to_string(),
            error_class: a.error_class.map(|c| c.to_string()),
            delay_ms: a.delay_ms,
            eligible_at: a.eligible_at.map(|e| e.0),
            late_report_at: late_at.map(|l| l.0),
        });
        attempts.push(ForensicAttempt {
            attempt: a.attempt,
            lease_id: a.lease_id.to_string(),
            worker: a.worker.clone(),
            started_at: a.started_at.to_rfc3339(),
            finished_at: a.finished_at.map(Timestamp::to_rfc3339),
            outcome: a.outcome.to_string(),
            error_class: a.error_class.map(|c| c.to_string()),
            gap_ms: t.gap_since_previous_ms,
            policy_delay_ms: t.policy_delay_before_ms,
            late_report_at: late_at.map(Timestamp::to_rfc3339),
            action: a.action.clone(),
            retry_reason: a.retry_reason.map(|r| r.to_string()),
            delay_ms: a.delay_ms,
            failure_key: t.fingerprint.as_ref().map(docket::Fingerprint::failure_key),
            fingerprint: t.fingerprint.clone(),
        });
    }
    Ok(Json(ForensicsView {
        run_id: id.to_string(),
        worst: worst(&report.verdicts).map(|v| v.severity),
        chart_svg: svg::retry_chart(&chart),
        verdicts: report.verdicts,
        attempts,
    }))
}

/// Runs of one job by status.
#[derive(Debug, Serialize)]
pub struct JobCounts {
    /// The job.
    pub job: String,
    /// Runs by status (only statuses with runs).
    pub counts: BTreeMap<String, i64>,
    /// All its runs.
    pub total: i64,
}

/// One time bucket of the window.
#[derive(Debug, Serialize)]
pub struct StatsBucket {
    /// Its start (RFC 3339).
    pub start: String,
    /// Runs created in it.
    pub created: i64,
    /// Of those, how many completed.
    pub completed: i64,
    /// Of those, how many failed.
    pub failed: i64,
    /// failed / (completed + failed), when any ended.
    pub failure_rate: Option<f64>,
    /// Retries scheduled in it, by error class.
    pub retries: BTreeMap<String, i64>,
}

/// Failures of one error class over the window.
#[derive(Debug, Serialize)]
pub struct ClassTotals {
    /// The class.
    pub error_class: String,
    /// Failed attempts.
    pub failures: i64,
    /// Of those, answered with a retry.
    pub retries: i64,
    /// Of those, ending the run.
    pub terminal: i64,
}

/// A connection that is not usable.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    /// Its name.
    pub name: String,
    /// `disabled` or `expired`.
    pub status: String,
    /// When it changed (RFC 3339).
    pub updated_at: String,
    /// Who changed it.
    pub updated_by: String,
    /// Their comment.
    pub comment: Option<String>,
}

/// The overview.
#[derive(Debug, Serialize)]
pub struct StatsView {
    /// `1h` or `1d`.
    pub window: String,
    /// The window's start (RFC 3339).
    pub since: String,
    /// A bucket's width.
    pub bucket_ms: i64,
    /// Oldest first.
    pub buckets: Vec<StatsBucket>,
    /// By error class, most failures first.
    pub classes: Vec<ClassTotals>,
    /// Runs created in the window that ended, and the share that failed.
    pub failure_rate: Option<f64>,
    /// Runs triggered in the window by job and current status (every
    /// registered job listed).
    pub jobs: Vec<JobCounts>,
    /// The tenant's runs needing attention.
    pub attention_count: i64,
    /// Runs examined for the window.
    pub examined: usize,
    /// True when the window held more runs than were examined.
    pub capped: bool,
    /// Connections that are disabled or whose credentials expired.
    pub connections: Vec<ConnectionView>,
    /// Circuit breakers that are not closed (open or half-open) in this
    /// process. `None`: the server has no connections, or runs no worker.
    pub breakers: Option<Vec<crate::connections::BreakerView>>,
    /// The chart (SVG): retries by error class per bucket and the failure
    /// rate.
    pub chart_svg: String,
}

async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    q: QueryPairs,
) -> ApiResult<Json<StatsView>> {
    q.only(&["window"])?;
    let window = q.get("window").unwrap_or("1h").to_string();
    let (span, bucket_ms) = match window.as_str() {
        "1h" => (3_600_000, 300_000),
        "1d" => (86_400_000, 3_600_000),
        w => {
            return Err(ApiError::bad_param(
                "window",
                format!("window must be 1h or 1d, not `{w}`"),
            ))
        }
    };
    let now = now(&state);
    let since = now.plus_millis(-span);
    let n = (span / bucket_ms) as usize;
    let w = state
        .store()
        .window_stats(WindowQuery {
            tenant: caller.tenant.clone(),
            since,
            bucket_ms,
            max_runs: STATS_MAX_RUNS,
        })
        .await?;
    let mut buckets: Vec<StatsBucket> = (0..n)
        .map(|i| StatsBucket {
            start: since.plus_millis(bucket_ms * i as i64).to_rfc3339(),
            created: 0,
            completed: 0,
            failed: 0,
            failure_rate: None,
            retries: BTreeMap::new(),
        })
        .collect();
    let slot = |b: i64| usize::try_from(b).ok().map(|b| b.min(n - 1));
    for r in &w.runs {
        let Some(b) = slot(r.bucket) else { continue };
        let bucket = &mut buckets[b];
        bucket.created += r.count;
        match r.status {
            RunStatus::Completed => bucket.completed += r.count,
            RunStatus::Failed => bucket.failed += r.count,
            _ => {}
        }
    }
    let mut totals: BTreeMap<String, ClassTotals> = BTreeMap::new();
    for c in &w.classes {
        let class = c.error_class.to_string();
        if let Some(b) = slot(c.bucket) {
            if c.retries > 0 {
                *buckets[b].retries.entry(class.clone()).or_insert(0) += c.retries;
            }
        }
        let t = totals.entry(class.clone()).or_insert(ClassTotals {
            error_class: class,
            failures: 0,
            retries: 0,
            terminal: 0,
        });
        t.failures += c.failures;
        t.retries += c.retries;
        t.terminal += c.terminal;
    }
    let rate = |failed: i64, completed: i64| {
        (failed + completed > 0).then(|| failed as f64 / (failed + completed) as f64)
    };
    for b in &mut buckets {
        b.failure_rate = rate(b.failed, b.completed);
    }
    let failure_rate = rate(
        buckets.iter().map(|b| b.failed).sum(),
        buckets.iter().map(|b| b.completed).sum(),
    );
    let mut classes: Vec<ClassTotals> = totals.into_values().collect();
    classes.sort_by(|a, b| {
        b.failures
            .cmp(&a.failures)
            .then(a.error_class.cmp(&b.error_class))
    });
    let chart = svg::WindowChart {
        buckets: buckets
            .iter()
            .map(|b| svg::WindowBucket {
                retries: b.retries.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                failure_rate: b.failure_rate,
            })
            .collect(),
        bucket_ms,
        classes: classes
            .iter()
            .filter(|c| c.retries > 0)
            .map(|c| c.error_class.clone())
            .collect(),
    };
    let mut jobs: BTreeMap<String, JobCounts> = BTreeMap::new();
    for name in state.docket.job_names() {
        jobs.insert(
            name.clone(),
            JobCounts {
                job: name,
                counts: BTreeMap::new(),
                total: 0,
            },
        );
    }
    // From the window, not `count_runs`: counting every run of a large
    // store would scan it all (over a second at a million runs, on the
    // SQLite writer thread).
    for r in &w.runs {
        let j = jobs.entry(r.job.clone()).or_insert(JobCounts {
            job: r.job.clone(),
            counts: BTreeMap::new(),
            total: 0,
        });
        *j.counts.entry(r.status.to_string()).or_insert(0) += r.count;
        j.total += r.count;
    }
    let connections = state
        .store()
        .list_connection_states(Some(caller.tenant.clone()))
        .await?
        .into_iter()
        .filter(|c| c.status != ConnectionStatus::Enabled)
        .map(|c| ConnectionView {
            name: c.name,
            status: c.status.to_string(),
            updated_at: c.updated_at.to_rfc3339(),
            updated_by: c.updated_by,
            comment: c.comment,
        })
        .collect();
    Ok(Json(StatsView {
        window,
        since: since.to_rfc3339(),
        bucket_ms,
        chart_svg: svg::window_chart(&chart),
        buckets,
        classes,
        failure_rate,
        jobs: jobs.into_values().collect(),
        attention_count: state.store().attention_count(caller.tenant).await?,
        examined: w.examined,
        capped: w.capped,
        connections,
        breakers: state
            .config
            .http
            .as_ref()
            .filter(|_| state.config.runs_jobs)
            .map(|h| {
                h.breakers()
                    .iter()
                    .filter(|b| b.state != docket::http::BreakerPhase::Closed)
                    .map(crate::connections::BreakerView::from)
                    .collect()
            }),
    }))
}
