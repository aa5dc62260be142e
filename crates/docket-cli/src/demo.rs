//! `docket demo`: Docket on a temporary SQLite file, calling a small local
//! HTTP service that misbehaves on a fixed script per prospect — a call that
//! commits and then answers too late, 429 with `Retry-After`, 503s, plain
//! timeouts, a 422 — then the timelines, ledger and forensic verdicts of
//! every run, and a CHECKS block that proves what the engine promised: the
//! committed-then-timed-out call is reconciled, not repeated; the 422 fails
//! at once; every retry waited at least the policy's delay.
//!
//! Everything runs on the real clock and finishes in a few seconds. With
//! `--keep` the API, the dashboard, the worker and the service stay up until
//! ctrl-c (or SIGTERM), and the database file is kept.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use docket::http::HttpJobs;
use docket::{
    Docket, ErrorClass, EventRecord, ForensicReport, History, JobReport, LedgerState, PairVerdict,
    RunId, RunStatus, TerminalReason, Timestamp, TriggerOptions, Verdict, WorkerConfig,
};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The job every demo run uses.
const JOB: &str = "send-email";
/// The campaign in every run's input (part of the idempotency key).
const CAMPAIGN: &str = "spring-renewal";
/// The seed's prospect: its call commits and then times out.
const SEED_PROSPECT: &str = "prospect-7ca677ed25d3";
/// The request timeout of the job. Short, so the demo is quick; the
/// service's late answers come well after it.
const REQUEST_TIMEOUT_MS: u64 = 1_000;
/// When a "hanging" call is finally answered (the caller is long gone).
const LATE_ANSWER_MS: u64 = 3 * REQUEST_TIMEOUT_MS;
/// The policy: 300 ms, 600 ms, 1200 ms (+ jitter below 100 ms), 4 attempts.
const BASE_DELAY_MS: u64 = 300;
const MAX_DELAY_MS: u64 = 2_000;
const JITTER_MS: u64 = 100;
const MAX_ATTEMPTS: u32 = 4;
/// What the 429 asks for, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// Arguments of `docket demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep running after the report — API, dashboard, worker and the
    /// demo service — until ctrl-c, and keep the database file.
    #[arg(long)]
    pub keep: bool,
    /// Where the API and dashboard listen with --keep. Loopback only: the
    /// demo server has no authentication.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: SocketAddr,
    /// Print a machine-readable summary (JSON) instead of the report.
    #[arg(long)]
    pub json: bool,
    /// Give up (exit 1) when the runs are not all final after this many
    /// seconds.
    #[arg(long, default_value_t = 60)]
    pub deadline_secs: u64,
}

// ------------------------------------------------------------ the service

/// How the service answers one POST.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// Commit the email under the request's key, answer 200.
    Ok,
    /// Answer this status (nothing committed), with `Retry-After` if given.
    Status(u16, Option<u64>),
    /// Commit nothing and answer only long after the caller's timeout.
    Hang,
    /// Commit, then answer only long after the caller's timeout: the
    /// effect landed, but the caller cannot know.
    CommitThenHang,
}

impl Reply {
    fn describe(self) -> String {
        match self {
            Reply::Ok => "200, committed".into(),
            Reply::Status(code, Some(s)) => format!("{code} with Retry-After: {s}"),
            Reply::Status(422, None) => "422, echoing the request's Authorization header".into(),
            Reply::Status(code, None) => format!("{code}"),
            Reply::Hang => format!("no answer for {LATE_ANSWER_MS} ms, nothing committed"),
            Reply::CommitThenHang => {
                format!("committed, then no answer for {LATE_ANSWER_MS} ms")
            }
        }
    }
}

/// One request as the service saw it.
#[derive(Clone, Debug, Serialize)]
struct Call {
    /// Milliseconds since the service started, when the request arrived.
    received_ms: u64,
    /// … and when the service answered (for a late answer: when it meant
    /// to; the caller had given up).
    answered_ms: u64,
    method: &'static str,
    prospect: Option<String>,
    idempotency_key: String,
    answer: String,
    committed: bool,
}

/// The misbehaving service: scripted per prospect, counting commits per
/// idempotency key. Any prospect without a script gets 200 at once.
struct Service {
    started: Instant,
    token: String,
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    /// Key → (email id, how many times it was committed).
    commits: Mutex<BTreeMap<String, (String, u32)>>,
    calls: Mutex<Vec<Call>>,
}

impl Service {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {}", self.token))
    }

    fn commit(&self, key: &str) {
        let mut c = self.commits.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.len() + 1;
        let e = c
            .entry(key.to_string())
            .or_insert_with(|| (format!("email-{n:04}"), 0));
        e.1 += 1;
    }

    fn log(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn commits_for(&self, key: &str) -> u32 {
        self.commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map_or(0, |c| c.1)
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": "missing or wrong bearer token" })),
    )
        .into_response()
}

/// `POST /crm/emails`: sends an email (the side effect), as scripted.
async fn send_email(State(svc): State<Arc<Service>>, headers: HeaderMap, body: String) -> Response {
    let received_ms = svc.ms();
    if !svc.authorized(&headers) {
        return unauthorized();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let prospect = body
        .get("prospect")
        .and_then(Value::as_str)
        .map(str::to_string);
    let reply = prospect
        .as_ref()
        .and_then(|p| {
            svc.scripts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(p)
                .and_then(VecDeque::pop_front)
        })
        .unwrap_or(Reply::Ok);
    let committed = matches!(reply, Reply::Ok | Reply::CommitThenHang);
    if committed {
        svc.commit(&key);
    }
    let late = matches!(reply, Reply::Hang | Reply::CommitThenHang);
    svc.log(Call {
        received_ms,
        answered_ms: if late {
            received_ms + LATE_ANSWER_MS
        } else {
            svc.ms()
        },
        method: "POST",
        prospect: prospect.clone(),
        idempotency_key: key.clone(),
        answer: reply.describe(),
        committed,
    });
    if late {
        // Bounded: the answer comes, just after the caller stopped waiting.
        tokio::time::sleep(Duration::from_millis(LATE_ANSWER_MS)).await;
    }
    match reply {
        Reply::Ok | Reply::CommitThenHang => (
            StatusCode::OK,
            Json(json!({ "sent": true, "idempotency_key": key })),
        )
            .into_response(),
        Reply::Hang => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Reply::Status(422, _) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            // Like some providers' debug output, it echoes the credential
            // back: Docket must keep it out of its evidence.
            Json(json!({
                "error": "`to` is not a deliverable address",
                "field": "to",
                "echo": { "authorization": headers.get("authorization").and_then(|v| v.to_str().ok()) },
            })),
        )
            .into_response(),
        Reply::Status(code, retry_after) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut resp = (
                status,
                Json(json!({ "error": status.canonical_reason().unwrap_or("error") })),
            )
                .into_response();
            if let Some(s) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", HeaderValue::from(s));
            }
            resp
        }
    }
}

/// `GET /crm/emails?key=K`: the reconcile lookup — was this key committed?
async fn find_email(
    State(svc): State<Arc<Service>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let received_ms = svc.ms();
    if !svc.authorized(&headers) {
        return unauthorized();
    }
    let key = q.get("key").cloned().unwrap_or_default();
    let found = svc
        .commits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .map(|c| c.0.clone());
    svc.log(Call {
        received_ms,
        answered_ms: svc.ms(),
        method: "GET",
        prospect: None,
        idempotency_key: key.clone(),
        answer: if found.is_some() {
            "200 found".into()
        } else {
            "404 not found".into()
        },
        committed: false,
    });
    match found {
        Some(id) => (
            StatusCode::OK,
            Json(json!({ "found": true, "id": id, "idempotency_key": key })),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "found": false }))).into_response(),
    }
}

// ------------------------------------------------------------ scenarios

/// One prospect's story.
struct Scenario {
    /// A stable name for scripts (`--json`).
    id: &'static str,
    prospect: &'static str,
    /// What the service does.
    script: Vec<Reply>,
    /// What Docket should make of it.
    expect: &'static str,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            id: "committed_then_timed_out",
            prospect: SEED_PROSPECT,
            script: vec![Reply::CommitThenHang],
            expect: "the attempt times out, the ledger says unknown; the next attempt reconciles, finds the email and completes without sending it again",
        },
        Scenario {
            id: "rate_limited",
            prospect: "prospect-3f9a1c20b7e4",
            script: vec![Reply::Status(429, Some(RETRY_AFTER_SECS))],
            expect: "rate_limited; the retry waits for Retry-After (longer than the backoff), then completes",
        },
        Scenario {
            id: "unavailable_twice",
            prospect: "prospect-b5d2e8a41c07",
            script: vec![Reply::Status(503, None), Reply::Status(503, None)],
            expect: "unavailable twice, retried on the policy's backoff, then completes",
        },
        Scenario {
            id: "timed_out_not_committed",
            prospect: "prospect-1e6c9d7f3a58",
            script: vec![Reply::Hang, Reply::Hang],
            expect: "times out twice; each retry reconciles first (not found), sends again with the same key, and completes",
        },
        Scenario {
            id: "invalid_input",
            prospect: "prospect-0a4b7e2d9c61",
            script: vec![Reply::Status(422, None)],
            expect: "invalid_input: fails at once after one attempt, no retry",
        },
        Scenario {
            id: "unavailable_exhausted",
            prospect: "prospect-9d3f5a8b2e10",
            script: vec![Reply::Status(503, None); 10],
            expect: "unavailable on every attempt: the policy stops after its 4 attempts (max_retries_exhausted)",
        },
    ]
}

fn key_for(prospect: &str) -> String {
    format!("{prospect}/{JOB}/{CAMPAIGN}/v1")
}

fn config_toml(service: &str) -> String {
    format!(
        r#"# docket demo: one HTTP job against the local demo service.
[connections.crm]
base_url = "{service}/crm"
secrets_file = "secrets.toml"          # a token generated for this demo
secret = "crm_token"
# Higher than the demo's transient failures, so every retry follows the policy.
breaker = {{ failures = 50, window_ms = 60000, open_ms = 5000 }}

[jobs.{JOB}]
connection = "crm"
method = "POST"
path = "/emails"
idempotency_key = "{{{{ input.prospect_id }}}}/{JOB}/{{{{ input.campaign }}}}/v1"
timeout_ms = {REQUEST_TIMEOUT_MS}
body = {{ to = "{{{{ input.email }}}}", prospect = "{{{{ input.prospect_id }}}}", campaign = "{{{{ input.campaign }}}}" }}

[jobs.{JOB}.retry]
base_delay_ms = {BASE_DELAY_MS}
multiplier = 2.0
max_delay_ms = {MAX_DELAY_MS}
max_attempts = {MAX_ATTEMPTS}
jitter_ms = {JITTER_MS}

[jobs.{JOB}.input_schema]
type = "object"
required = ["prospect_id", "campaign", "email"]
properties = {{ prospect_id = {{ type = "string" }}, campaign = {{ type = "string" }}, email = {{ type = "string" }} }}

[jobs.{JOB}.reconcile]
method = "GET"
path = "/emails?key={{{{ idempotency_key | urlencode }}}}"
found_when = "status == 200 && body.found == true"
"#
    )
}

// ------------------------------------------------------------ the summary

/// One attempt, as the report shows it.
#[derive(Serialize)]
struct AttemptRow {
    attempt: u32,
    /// From the trigger to the attempt's start.
    started_ms: i64,
    duration_ms: Option<i64>,
    outcome: String,
    error_class: Option<ErrorClass>,
    /// From the previous attempt's end to this one's start.
    gap_ms: Option<i64>,
    /// The delay the policy chose after the previous attempt.
    policy_delay_ms: Option<i64>,
    /// The decision after this attempt: `backoff`, `retry_after`, …
    retry_reason: Option<String>,
    /// … and its delay.
    retry_delay_ms: Option<i64>,
}

/// One HTTP exchange as Docket recorded it (an `http_response` event).
#[derive(Serialize)]
struct RequestRow {
    attempt: Option<u32>,
    purpose: String,
    method: String,
    status: Option<u64>,
    class: String,
    duration_ms: Option<u64>,
    finding: Option<String>,
    retry_after: Option<String>,
    /// When the event was recorded, from the trigger.
    at_ms: i64,
}

/// One ledger event (`action_started`, `action_unknown`, …).
#[derive(Serialize)]
struct LedgerRow {
    attempt: Option<u32>,
    event: String,
    state: Option<String>,
    found: Option<String>,
    /// On `action_started`: the key was taken over from an attempt whose
    /// outcome is unknown, so it is reconciled before anything is sent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    reconcile_first: bool,
}

/// What the service saw for one prospect.
#[derive(Serialize)]
struct ServiceView {
    posts: usize,
    commits: u32,
    lookups: usize,
    calls: Vec<Call>,
}

/// One run of the demo.
#[derive(Serialize)]
struct RunSummary {
    scenario: &'static str,
    prospect: String,
    expect: &'static str,
    /// What the service does with this prospect's POSTs.
    script: String,
    run_id: RunId,
    idempotency_key: String,
    status: RunStatus,
    terminal_reason: Option<TerminalReason>,
    last_error: Option<String>,
    output: Option<Value>,
    attempts: Vec<AttemptRow>,
    requests: Vec<RequestRow>,
    ledger: Vec<LedgerRow>,
    ledger_state: Option<LedgerState>,
    /// The action's result came from the reconcile lookup.
    reconciled: bool,
    verdicts: Vec<PairVerdict>,
    service: ServiceView,
}

/// One line of CHECKS.
#[derive(Serialize)]
struct Check {
    ok: bool,
    name: String,
    detail: String,
}

/// The whole demo, for `--json`.
#[derive(Serialize)]
struct Summary {
    ok: bool,
    elapsed_ms: u64,
    database: String,
    service: String,
    job: &'static str,
    runs: Vec<RunSummary>,
    job_report: Option<JobReport>,
    checks: Vec<Check>,
}

fn ledger_rows(events: &[EventRecord]) -> Vec<LedgerRow> {
    events
        .iter()
        .filter(|e| e.kind.as_str().starts_with("action_"))
        .map(|e| LedgerRow {
            attempt: e.attempt,
            event: e.kind.to_string(),
            state: e
                .data
                .get("state")
                .and_then(Value::as_str)
                .map(String::from),
            found: e
                .data
                .get("found")
                .and_then(Value::as_str)
                .map(String::from),
            reconcile_first: e.data.get("reconcile_first") == Some(&Value::Bool(true)),
        })
        .collect()
}

fn request_rows(events: &[EventRecord], t0: Timestamp) -> Vec<RequestRow> {
    let s = |e: &EventRecord, k: &str| e.data.get(k).and_then(Value::as_str).map(String::from);
    events
        .iter()
        .filter(|e| e.kind == "http_response")
        .map(|e| RequestRow {
            attempt: e.attempt,
            purpose: s(e, "purpose").unwrap_or_default(),
            method: s(e, "method").unwrap_or_default(),
            status: e.data.get("status").and_then(Value::as_u64),
            class: s(e, "class").unwrap_or_default(),
            duration_ms: e.data.get("duration_ms").and_then(Value::as_u64),
            finding: s(e, "finding"),
            retry_after: s(e, "retry_after"),
            at_ms: e.at.millis_since(t0),
        })
        .collect()
}

fn summarize(sc: &Scenario, h: &History, f: &ForensicReport, svc: &Service) -> RunSummary {
    let key = key_for(sc.prospect);
    let t0 = h.run.created_at;
    let attempts = f
        .timeline
        .iter()
        .map(|t| {
            let a = &t.attempt;
            AttemptRow {
                attempt: a.attempt,
                started_ms: a.started_at.millis_since(t0),
                duration_ms: a.finished_at.map(|e| e.millis_since(a.started_at)),
                outcome: a.outcome.to_string(),
                error_class: a.error_class,
                gap_ms: t.gap_since_previous_ms,
                policy_delay_ms: t.policy_delay_before_ms,
                retry_reason: a.retry_reason.map(|r| r.to_string()),
                retry_delay_ms: a.delay_ms,
            }
        })
        .collect();
    let calls: Vec<Call> = svc
        .calls()
        .into_iter()
        .filter(|c| c.prospect.as_deref() == Some(sc.prospect) || c.idempotency_key == key)
        .collect();
    let ledger_entry = h.ledger.iter().find(|l| l.idempotency_key == key);
    RunSummary {
        scenario: sc.id,
        prospect: sc.prospect.to_string(),
        expect: sc.expect,
        script: describe_script(&sc.script),
        run_id: h.run.id,
        idempotency_key: key.clone(),
        status: h.run.status,
        terminal_reason: h.run.terminal_reason,
        last_error: h.run.last_error_message.clone(),
        output: h.run.output.clone(),
        attempts,
        requests: request_rows(&h.events, t0),
        ledger: ledger_rows(&h.events),
        ledger_state: ledger_entry.map(|l| l.state),
        reconciled: ledger_entry
            .and_then(|l| l.result.as_ref())
            .and_then(|r| r.get("reconciled"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        verdicts: f.verdicts.clone(),
        service: ServiceView {
            posts: calls.iter().filter(|c| c.method == "POST").count(),
            commits: svc.commits_for(&key),
            lookups: calls.iter().filter(|c| c.method == "GET").count(),
            calls,
        },
    }
}

// ------------------------------------------------------------ the checks

/// A check; `detail` says what went wrong, so a passing one has none.
fn check(ok: bool, name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        ok,
        name: name.into(),
        detail: if ok { String::new() } else { detail.into() },
    }
}

fn checks(
    runs: &[RunSummary],
    histories: &[History],
    report: Option<&JobReport>,
    token: &str,
) -> Vec<Check> {
    let by = |id: &str| runs.iter().find(|r| r.scenario == id);
    let mut out = Vec::new();

    if let Some(r) = by("committed_then_timed_out") {
        let timed_out = r
            .attempts
            .first()
            .is_some_and(|a| a.error_class == Some(ErrorClass::Timeout));
        let unknown = r.ledger.iter().any(|l| l.event == "action_unknown");
        let reconciled_event = r
            .ledger
            .iter()
            .any(|l| l.event == "action_reconciled" && l.state.as_deref() == Some("committed"));
        let ok = r.status == RunStatus::Completed
            && timed_out
            && unknown
            && reconciled_event
            && r.reconciled
            && r.ledger_state == Some(LedgerState::Committed)
            && r.service.commits == 1
            && r.service.posts == 1;
        out.push(check(
            ok,
            format!(
                "{}: committed once, reconciled, not repeated (service saw {} commit{} for key {})",
                r.prospect,
                r.service.commits,
                if r.service.commits == 1 { "" } else { "s" },
                r.idempotency_key
            ),
            format!(
                "attempt 1 timed out: {timed_out}; ledger unknown: {unknown}; reconciled as committed: {reconciled_event}; POSTs: {}; run {}",
                r.service.posts, r.status
            ),
        ));
    }

    if let Some(r) = by("invalid_input") {
        let ok = r.status == RunStatus::Failed
            && r.terminal_reason == Some(TerminalReason::InvalidInput)
            && r.attempts.len() == 1
            && r.service.posts == 1;
        out.push(check(
            ok,
            format!(
                "422 failed at once after {} attempt{} ({}: {}, no retry)",
                r.attempts.len(),
                if r.attempts.len() == 1 { "" } else { "s" },
                r.status,
                r.terminal_reason.map_or("-", |t| t.as_str())
            ),
            format!("service saw {} POST(s)", r.service.posts),
        ));
    }

    // The policy's schedule, attempt by attempt, and the classifier over
    // the whole job.
    let mut short = Vec::new();
    let mut retries = 0;
    for r in runs {
        for a in &r.attempts {
            if let (Some(gap), Some(delay)) = (a.gap_ms, a.policy_delay_ms) {
                retries += 1;
                if gap < delay {
                    short.push(format!(
                        "{} attempt {}: {gap} ms < {delay} ms",
                        r.prospect, a.attempt
                    ));
                }
            }
        }
    }
    let count = |v: Verdict| report.and_then(|j| j.counts.get(&v).copied()).unwrap_or(0);
    let no_backoff = count(Verdict::RetryWithoutBackoff);
    let overlap = count(Verdict::LeaseOverlap);
    let window = report.map_or(0, |j| j.same_action_same_error_within_backoff_window);
    out.push(check(
        report.is_some() && short.is_empty() && no_backoff == 0 && overlap == 0 && window == 0 && retries > 0,
        "every retry waited at least the policy's delay (no retry_without_backoff)",
        if short.is_empty() {
            format!("{retries} retries; job report: retry_without_backoff {no_backoff}, lease_overlap {overlap}, same_action_same_error_within_backoff_window {window}")
        } else {
            short.join("; ")
        },
    ));

    if let Some(r) = by("rate_limited") {
        // From the provider's side: when it answered 429, and when the next
        // request came.
        let posts: Vec<&Call> = r
            .service
            .calls
            .iter()
            .filter(|c| c.method == "POST")
            .collect();
        let service_gap =
            (posts.len() >= 2).then(|| posts[1].received_ms as i64 - posts[0].answered_ms as i64);
        let decision = r.attempts.first().and_then(|a| a.retry_reason.clone());
        let wanted = (RETRY_AFTER_SECS * 1000) as i64;
        let ok = r.status == RunStatus::Completed
            && decision.as_deref() == Some("retry_after")
            && service_gap.is_some_and(|g| g >= wanted);
        out.push(check(
            ok,
            format!(
                "429 retry waited ≥ Retry-After ({} s): the service saw the retry {} ms after its 429",
                RETRY_AFTER_SECS,
                service_gap.map_or("-".into(), |g| g.to_string())
            ),
            format!(
                "engine decision: {} after {} ms (backoff alone would be ≈{BASE_DELAY_MS} ms)",
                decision.unwrap_or_else(|| "-".into()),
                r.attempts
                    .first()
                    .and_then(|a| a.retry_delay_ms)
                    .map_or("-".into(), |d| d.to_string())
            ),
        ));
    }

    if let Some(r) = by("timed_out_not_committed") {
        let not_done = r
            .ledger
            .iter()
            .filter(|l| l.found.as_deref() == Some("not_done"))
            .count();
        let ok = r.status == RunStatus::Completed && not_done >= 1 && r.service.commits == 1;
        out.push(check(
            ok,
            format!(
                "a timeout that did not commit is reconciled as not done ({not_done}×), then sent again with the same key (service saw {} commit)",
                r.service.commits
            ),
            format!("{} POSTs, {} lookups", r.service.posts, r.service.lookups),
        ));
    }

    if let Some(r) = by("unavailable_exhausted") {
        let last = r.verdicts.last().map(|v| v.verdict);
        let ok = r.status == RunStatus::Failed
            && r.terminal_reason == Some(TerminalReason::MaxRetriesExhausted)
            && r.attempts.len() == MAX_ATTEMPTS as usize
            && last == Some(Verdict::TerminalPolicyFailure);
        out.push(check(
            ok,
            format!(
                "503 on every attempt: stopped after {} attempts ({}), last pair terminal_policy_failure",
                r.attempts.len(),
                r.terminal_reason.map_or("-", |t| t.as_str())
            ),
            format!("last verdict: {}", last.map_or("-", |v| v.as_str())),
        ));
    }

    let retried: Vec<&RunSummary> = [
        "committed_then_timed_out",
        "rate_limited",
        "unavailable_twice",
        "timed_out_not_committed",
    ]
    .iter()
    .filter_map(|id| by(id))
    .collect();
    let bad: Vec<String> = retried
        .iter()
        .filter(|r| {
            r.status != RunStatus::Completed
                || r.verdicts
                    .iter()
                    .any(|v| v.verdict != Verdict::DelayedRetry)
        })
        .map(|r| format!("{} ({})", r.prospect, r.status))
        .collect();
    let delayed: usize = retried.iter().map(|r| r.verdicts.len()).sum();
    out.push(check(
        bad.is_empty() && !retried.is_empty(),
        format!(
            "the {} retried runs completed, with delayed_retry verdicts only ({delayed})",
            retried.len()
        ),
        if bad.is_empty() {
            "pairs need two failures of the same class: a run that failed once has no verdict"
                .into()
        } else {
            format!("not as expected: {}", bad.join(", "))
        },
    ));

    // The credential: never in any stored row; the 422's echo of it is
    // redacted.
    let stored = serde_json::to_string(histories).unwrap_or_default();
    let leaked = stored.contains(token);
    let redacted = by("invalid_input").is_some_and(|r| {
        r.last_error
            .as_deref()
            .is_some_and(|m| m.contains("[redacted]"))
    });
    out.push(check(
        !leaked && redacted,
        "the credential never appears in the evidence (the 422 echoed it back; stored as [redacted])",
        format!("token found in stored rows: {leaked}; echo redacted: {redacted}"),
    ));
    out
}

// ------------------------------------------------------------ output

fn ms(v: Option<i64>) -> String {
    v.map_or("—".into(), |v| format!("{v} ms"))
}

/// "503 (×2); any later POST: 200": consecutive repeats grouped, and what
/// comes after the script when a run can get there.
fn describe_script(script: &[Reply]) -> String {
    let mut parts: Vec<(String, usize)> = Vec::new();
    for s in script.iter().map(|r| r.describe()) {
        match parts.last_mut() {
            Some((last, n)) if *last == s => *n += 1,
            _ => parts.push((s, 1)),
        }
    }
    let mut out = parts
        .iter()
        .map(|(s, n)| {
            if *n == 1 {
                s.clone()
            } else {
                format!("{s} (×{n})")
            }
        })
        .collect::<Vec<_>>()
        .join(", then ");
    // A 4xx other than 429 ends the run: nothing comes after it.
    let terminal =
        matches!(script.last(), Some(Reply::Status(c, _)) if (400..500).contains(c) && *c != 429);
    if script.len() < MAX_ATTEMPTS as usize && !terminal {
        out.push_str("; any later POST: 200");
    }
    out
}

fn print_run(r: &RunSummary) {
    outln!();
    outln!("━━ {} — the service: {}", r.prospect, r.script);
    outln!("   expected: {}", r.expect);
    outln!(
        "   run {}  {}{}",
        r.run_id,
        r.status,
        r.terminal_reason
            .map(|t| format!(" ({})", t.as_str()))
            .unwrap_or_default()
    );
    outln!("   idempotency key {}", r.idempotency_key);
    outln!();
    outln!(
        "   {:<8} {:>8} {:>7}  {:<16} {:<13} {:>8} {:>12}  retry decision",
        "attempt",
        "started",
        "took",
        "outcome",
        "class",
        "gap",
        "policy delay"
    );
    for a in &r.attempts {
        let decision = match (&a.retry_reason, a.retry_delay_ms) {
            (Some(reason), Some(d)) => format!("{reason}: next in {d} ms"),
            _ if a.outcome == "failed" => {
                format!("stop: {}", r.terminal_reason.map_or("-", |t| t.as_str()))
            }
            _ => String::new(),
        };
        let line = format!(
            "   {:<8} {:>8} {:>7}  {:<16} {:<13} {:>8} {:>12}  {}",
            a.attempt,
            format!("+{} ms", a.started_ms),
            ms(a.duration_ms),
            a.outcome,
            a.error_class.map_or("—", |c| c.as_str()),
            ms(a.gap_ms),
            ms(a.policy_delay_ms),
            decision
        );
        outln!("{}", line.trim_end());
    }
    outln!();
    outln!("   requests (Docket's http_response evidence)");
    for q in &r.requests {
        let took = q.duration_ms.unwrap_or(0);
        let answer = match (q.status, &q.finding) {
            (None, _) => format!("no answer within {took} ms ({})", q.class),
            (Some(s), Some(f)) => format!("{s} → {f} ({took} ms)"),
            (Some(s), None) => format!(
                "{s} {}{} ({took} ms)",
                q.class,
                q.retry_after
                    .as_ref()
                    .map(|r| format!(", Retry-After: {r}"))
                    .unwrap_or_default()
            ),
        };
        // The event is written after the answer: the request went out
        // `duration_ms` earlier.
        outln!(
            "     a{} {:<9} {:<4} sent {:>8}  {}",
            q.attempt.unwrap_or(0),
            q.purpose,
            q.method,
            format!("+{} ms", q.at_ms - took as i64),
            answer
        );
    }
    let path: Vec<String> = r
        .ledger
        .iter()
        .map(|l| {
            let what = l.event.trim_start_matches("action_");
            let detail = l.state.as_deref().or(l.found.as_deref()).unwrap_or("");
            match what {
                "reconciled" => format!("a{} reconciled: {detail}", l.attempt.unwrap_or(0)),
                "started" if l.reconcile_first => {
                    format!("a{} taken over (reconcile first)", l.attempt.unwrap_or(0))
                }
                _ => format!("a{} {what}", l.attempt.unwrap_or(0)),
            }
        })
        .collect();
    outln!(
        "   ledger: {}  ⇒  {}{}",
        if path.is_empty() {
            "—".into()
        } else {
            path.join(" → ")
        },
        r.ledger_state.map_or("—", |s| s.as_str()),
        if r.reconciled { " (via reconcile)" } else { "" }
    );
    outln!(
        "   service saw: {} POST{}, {} commit{} for the key, {} reconcile lookup{}",
        r.service.posts,
        if r.service.posts == 1 { "" } else { "s" },
        r.service.commits,
        if r.service.commits == 1 { "" } else { "s" },
        r.service.lookups,
        if r.service.lookups == 1 { "" } else { "s" },
    );
    if r.verdicts.is_empty() {
        outln!("   verdicts: none (fewer than two failures of one class: nothing to pair)");
    } else {
        outln!("   verdicts:");
        for v in &r.verdicts {
            outln!(
                "     a{}→a{} {} [{}] {}: {}",
                v.first.attempt,
                v.second.attempt,
                v.error_class,
                format!("{:?}", v.severity).to_lowercase(),
                v.verdict.as_str(),
                v.explanation
            );
        }
    }
}

fn print_report(s: &Summary, db: &Path, keep: bool) {
    outln!("Docket demo: durable HTTP jobs against a service that misbehaves");
    outln!();
    outln!(
        "  database   {} ({})",
        db.display(),
        if keep {
            "kept"
        } else {
            "temporary, removed at exit"
        }
    );
    outln!(
        "  service    {}/crm (local, scripted per prospect)",
        s.service
    );
    outln!(
        "  job        {JOB}: POST /crm/emails, timeout {REQUEST_TIMEOUT_MS} ms, Idempotency-Key <prospect>/{JOB}/<campaign>/v1"
    );
    outln!(
        "  policy     {BASE_DELAY_MS} ms × 2^(attempt−1), at most {MAX_DELAY_MS} ms, + jitter < {JITTER_MS} ms; {MAX_ATTEMPTS} attempts; Retry-After wins when later"
    );
    outln!("  reconcile  GET /crm/emails?key=… before anything else when the ledger says unknown");
    outln!("  finished   {} runs in {} ms", s.runs.len(), s.elapsed_ms);
    for r in &s.runs {
        print_run(r);
    }
    outln!();
    if let Some(j) = &s.job_report {
        outln!("━━ job report: {} ({} runs)", j.job, j.runs_examined);
        for (v, n) in &j.counts {
            outln!("   {:<24} {n}", v.as_str());
        }
        outln!(
            "   same_action_same_error_within_backoff_window: {}",
            j.same_action_same_error_within_backoff_window
        );
        outln!();
    }
    outln!("CHECKS");
    for c in &s.checks {
        outln!("  {} {}", if c.ok { "✓" } else { "✗" }, c.name);
        if !c.ok {
            outln!("      {}", c.detail);
        }
    }
    let failed = s.checks.iter().filter(|c| !c.ok).count();
    outln!();
    if failed == 0 {
        outln!(
            "All {} checks passed in {:.1} s.",
            s.checks.len(),
            s.elapsed_ms as f64 / 1000.0
        );
    } else {
        outln!("{failed} of {} checks FAILED.", s.checks.len());
    }
}

// ------------------------------------------------------------ running it

/// A directory removed when dropped (unless kept).
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Resolves on SIGTERM or ctrl-c.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `docket demo`. `Err` when it cannot run, or when a check failed.
pub async fn run(args: DemoArgs) -> Result<(), String> {
    if args.keep && !args.addr.ip().is_loopback() {
        return Err(format!(
            "refusing to serve the demo on {}: it has no authentication; use a loopback address such as 127.0.0.1:7878",
            args.addr
        ));
    }
    if args.deadline_secs == 0 {
        return Err("--deadline-secs must be at least 1".into());
    }
    // Bind first: a busy port should fail before anything else happens.
    let api_listener = match args.keep {
        true => Some(
            tokio::net::TcpListener::bind(args.addr)
                .await
                .map_err(|e| format!("cannot listen on {} (--addr): {e}", args.addr))?,
        ),
        false => None,
    };

    let dir = TempDir {
        path: std::env::temp_dir().join(format!("docket-demo-{}", uuid::Uuid::new_v4().simple())),
        keep: args.keep,
    };
    std::fs::create_dir_all(&dir.path)
        .map_err(|e| format!("cannot create {}: {e}", dir.path.display()))?;
    // A token for this demo only, in a secrets file next to the database:
    // Docket reads it at each request and must never store or print it.
    let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        dir.path.join("secrets.toml"),
        format!("crm_token = \"{token}\"\n"),
    )
    .map_err(|e| format!("cannot write the demo's secrets file: {e}"))?;

    // The service.
    let svc = Arc::new(Service {
        started: Instant::now(),
        token: token.clone(),
        scripts: Mutex::new(
            scenarios()
                .into_iter()
                .map(|s| (s.prospect.to_string(), s.script.into_iter().collect()))
                .collect(),
        ),
        commits: Mutex::new(BTreeMap::new()),
        calls: Mutex::new(Vec::new()),
    });
    let svc_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot start the demo service: {e}"))?;
    let service_url = format!(
        "http://{}",
        svc_listener.local_addr().map_err(|e| e.to_string())?
    );
    let router = Router::new()
        .route("/crm/emails", post(send_email).get(find_email))
        .with_state(svc.clone());
    let service_task = tokio::spawn(async move {
        let _ = axum::serve(svc_listener, router).await;
    });

    // Docket on a fresh SQLite file, with the HTTP job.
    let db = dir.path.join("docket.db");
    let docket = Docket::open(&format!("sqlite://{}", db.display()))
        .await
        .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let config = config_toml(&service_url);
    std::fs::write(dir.path.join("docket.toml"), &config)
        .map_err(|e| format!("cannot write the demo's docket.toml: {e}"))?;
    let http = HttpJobs::from_toml(&config, &dir.path).map_err(|e| e.to_string())?;
    http.install(&docket).map_err(|e| e.to_string())?;
    let worker = docket
        .worker(WorkerConfig {
            concurrency: 8,
            prefetch: 8,
            ..WorkerConfig::default()
        })
        .start();

    // With --keep the dashboard is up from the start, so the runs can be
    // watched live.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut api_addr = args.addr;
    let server_task = match api_listener {
        Some(listener) => {
            // The bound address: `--addr 127.0.0.1:0` picks a free port.
            api_addr = listener.local_addr().map_err(|e| e.to_string())?;
            let server = docket_server::Server::start(
                docket.clone(),
                docket_server::ServerConfig {
                    auth: docket_server::AuthMode::InsecureNoAuth,
                    http: Some(http.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut rx = stop_rx.clone();
            if !args.json {
                outln!("Dashboard: http://{api_addr}/ (the runs appear there as they happen)\n");
            }
            Some(tokio::spawn(async move {
                server
                    .serve(listener, async move {
                        let _ = rx.wait_for(|v| *v).await;
                    })
                    .await
            }))
        }
        None => None,
    };

    // Trigger every prospect's run in one transaction, then wait for all.
    let started = Instant::now();
    let since = docket.clock().now();
    let list = scenarios();
    let batch = list
        .iter()
        .map(|s| {
            (
                JOB.to_string(),
                json!({
                    "prospect_id": s.prospect,
                    "campaign": CAMPAIGN,
                    "email": format!("ops+{}@example.com", s.prospect),
                }),
                TriggerOptions {
                    correlation_id: Some(s.prospect.to_string()),
                    actor: Some("docket demo".into()),
                    ..TriggerOptions::default()
                },
            )
        })
        .collect();
    let triggered = docket
        .trigger_batch(batch)
        .await
        .map_err(|e| format!("trigger: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
    let wait_all = async {
        let mut unfinished = Vec::new();
        for t in &triggered {
            let left = deadline.saturating_duration_since(Instant::now());
            match docket.wait(t.run.id, left).await {
                Ok(_) => {}
                Err(docket::Error::WaitTimedOut(run)) => {
                    unfinished.push(format!("{} ({})", run.id, run.status))
                }
                Err(e) => return Err(format!("waiting for run {}: {e}", t.run.id)),
            }
        }
        Ok(unfinished)
    };
    // Ctrl-c while waiting still removes the temporary files (the
    // directory guard runs when this returns).
    let unfinished = tokio::select! {
        r = wait_all => r?,
        _ = stop_signal() => {
            worker.shutdown(Duration::from_secs(1)).await;
            return Err("interrupted before the runs finished".into());
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;

    // The evidence.
    let mut runs = Vec::new();
    let mut histories = Vec::new();
    for (sc, t) in list.iter().zip(&triggered) {
        let h = docket.history(t.run.id).await.map_err(|e| e.to_string())?;
        let f = docket
            .forensics(t.run.id)
            .await
            .map_err(|e| e.to_string())?;
        runs.push(summarize(sc, &h, &f, &svc));
        histories.push(h);
    }
    let job_report = docket
        .forensics_for_job(JOB, since, None)
        .await
        .map_err(|e| e.to_string())?;
    let mut checks = checks(&runs, &histories, Some(&job_report), &token);
    checks.insert(
        0,
        check(
            unfinished.is_empty(),
            format!(
                "all {} runs reached a final state within {} s ({} ms)",
                triggered.len(),
                args.deadline_secs,
                elapsed_ms
            ),
            format!("still running at the deadline: {}", unfinished.join(", ")),
        ),
    );
    let summary = Summary {
        ok: checks.iter().all(|c| c.ok),
        elapsed_ms,
        database: db.display().to_string(),
        service: service_url.clone(),
        job: JOB,
        runs,
        job_report: Some(job_report),
        checks,
    };
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?
        );
    } else {
        print_report(&summary, &db, args.keep);
    }

    if let Some(server) = server_task {
        if !args.json {
            print_keep(&api_addr, &service_url, &db, &summary);
        }
        stop_signal().await;
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Err(e))) => eprintln!("the API stopped with an error: {e}"),
            Ok(_) => {}
            Err(_) => eprintln!("the API did not stop within 5 s"),
        }
        if !args.json {
            outln!("Stopped. The database is kept at {}", db.display());
        }
    }
    worker.shutdown(Duration::from_secs(2)).await;
    service_task.abort();
    drop(docket);
    let failed = summary.checks.iter().filter(|c| !c.ok).count();
    if failed > 0 {
        return Err(format!(
            "{failed} of {} demo checks failed (see CHECKS)",
            summary.checks.len()
        ));
    }
    Ok(())
}

fn print_keep(addr: &SocketAddr, service: &str, db: &Path, s: &Summary) {
    let base = format!("http://{addr}");
    let seed = s
        .runs
        .iter()
        .find(|r| r.prospect == SEED_PROSPECT)
        .map(|r| r.run_id.to_string())
        .unwrap_or_else(|| "RUN_ID".into());
    outln!();
    outln!("Docket is still running (ctrl-c to stop). No authentication: loopback only.");
    outln!("  dashboard  {base}/");
    outln!("  API        {base}/api/runs");
    outln!("  service    {service}/crm/emails (prospects without a script get 200 at once)");
    outln!("  database   {}", db.display());
    outln!();
    outln!("Try:");
    outln!("  curl -s {base}/api/runs/{seed}");
    outln!("  curl -s {base}/api/runs/{seed}/forensics");
    outln!("  docket runs show {seed} --url {base}");
    outln!("  docket forensics {seed} --url {base}");
    outln!("  docket forensics --job {JOB} --url {base}");
    outln!("  docket connections list --url {base}");
    outln!(
        "  curl -s -X POST {base}/api/runs -H 'content-type: application/json' -d '{{\"job\":\"{JOB}\",\"input\":{{\"prospect_id\":\"prospect-new\",\"campaign\":\"{CAMPAIGN}\",\"email\":\"new@example.com\"}}}}'"
    );
}
