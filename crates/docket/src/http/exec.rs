//! The handler of an HTTP job: resolve the connection, check the `when`
//! condition, render the request, wait for approval if asked, ask the
//! circuit breaker, then send it as a ledger-guarded action (reconciling
//! first when an earlier attempt left its outcome unknown), recording every
//! response as evidence.

// `JobError` is the engine's handler error (152 bytes); boxing it here
// would only be unboxed again at the engine's boundary.
#![allow(clippy::result_large_err)]

use super::breaker::{Admission, Breaker, Transition};
use super::classify::{retry_after, transport_class, Verdict};
use super::condition::{Condition, ConditionError};
use super::config::{
    Body, Compiled, OnReject, OnTimeout, ReconcileSpec, RequestSpec, RequestStep, SleepFor,
    StepKind, StepSpec, Target, Work,
};
use super::connections::{ConnectionDef, Credential};
use crate::telemetry::TraceContext;
use crate::{Ctx, InputDecision, JobError, Reconciled, Signalled, Stepped};
use docket_core::EventKind;
use docket_core::{ErrorClass, TerminalReason, Timestamp};
use docket_store::ConnectionStatus;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most of a response body kept in an evidence event.
pub const EXCERPT_BYTES: usize = 2048;

/// The most of a response body quoted in an error message.
const MESSAGE_EXCERPT: usize = 300;

const REDACTED: &str = "[redacted]";

/// Everything the handlers share.
pub(crate) struct Shared {
    pub(crate) compiled: Compiled,
    pub(crate) breakers: BTreeMap<String, Arc<Breaker>>,
    pub(crate) client: reqwest::Client,
    /// A [`watch_probe`] task is running.
    pub(crate) probe_watch: Arc<AtomicBool>,
}

/// How often a [`watch_probe`] task reads the breakers it watches when no
/// wake-up comes (a lost notification; a probe that never reports, whose
/// deadline then passes).
const PROBE_RECHECK: Duration = Duration::from_secs(1);

/// A request ready to send (no credential in it: that is added at send
/// time and never shown).
#[derive(Clone, Debug)]
struct Prepared {
    method: reqwest::Method,
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<PreparedBody>,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum PreparedBody {
    Json(Value),
    Text(String),
}

impl Prepared {
    /// What an approver sees: the request as it would be sent, minus the
    /// credential.
    fn describe(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value::String(v.to_str().unwrap_or("<binary>").to_string()),
                )
            })
            .collect();
        json!({
            "method": self.method.as_str(),
            "url": self.url,
            "headers": headers,
            "body": match &self.body {
                Some(PreparedBody::Json(v)) => v.clone(),
                Some(PreparedBody::Text(t)) => Value::String(t.clone()),
                None => Value::Null,
            },
        })
    }
}

/// What came back from one exchange.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Vec<u8>,
    truncated: bool,
}

/// Requests made by this attempt, for the breaker.
#[derive(Default)]
struct Tracker {
    requests: u32,
    last_transient: bool,
}

fn invalid(what: &str, why: impl std::fmt::Display) -> JobError {
    JobError::invalid_input(format!("{what}: {why}"))
}

fn decide(c: &Condition, which: &str, data: &Value) -> Result<bool, JobError> {
    c.eval(data).map_err(|e| match e {
        ConditionError::Missing(field) => JobError::invalid_input(format!(
            "condition `{which}` ({}) refers to `{field}`, which the run does not have: fix the input (or the run's variables) and start a new run",
            c.source
        )),
        ConditionError::Invalid(m) => JobError::invalid_input(format!("condition `{which}`: {m}")),
    })
}

fn render_request(
    shared: &Shared,
    spec: &RequestSpec,
    conn: Option<&ConnectionDef>,
    data: &Value,
    key: &str,
) -> Result<Prepared, JobError> {
    let t = &shared.compiled.templates;
    let url = match &spec.target {
        Target::Path(name) => {
            let path = t.render(name, data).map_err(|e| invalid("template", e))?;
            match conn {
                Some(c) => c.join(&path),
                None => path,
            }
        }
        Target::Url(name) => t.render(name, data).map_err(|e| invalid("template", e))?,
    };
    reqwest::Url::parse(&url).map_err(|e| invalid("the rendered URL", format!("`{url}`: {e}")))?;
    let mut headers = Vec::with_capacity(spec.headers.len() + 1);
    for (name, tpl) in &spec.headers {
        let v = t.render(tpl, data).map_err(|e| invalid("template", e))?;
        let v = HeaderValue::from_str(&v).map_err(|_| {
            invalid(
                "header",
                format!("`{name}` renders to a value that cannot be sent"),
            )
        })?;
        headers.push((name.clone(), v));
    }
    let key = HeaderValue::from_str(key).map_err(|_| {
        invalid(
            "idempotency key",
            format!("`{key}` cannot be sent as an Idempotency-Key header (use ASCII)"),
        )
    })?;
    headers.push((HeaderName::from_static("idempotency-key"), key));
    let body = match &spec.body {
        None => None,
        Some(Body::Json(j)) => Some(PreparedBody::Json(
            t.render_json(j, data).map_err(|e| invalid("template", e))?,
        )),
        Some(Body::Text(name)) => Some(PreparedBody::Text(
            t.render(name, data).map_err(|e| invalid("template", e))?,
        )),
    };
    Ok(Prepared {
        method: spec.method.clone(),
        url,
        headers,
        body,
        timeout: spec.timeout,
    })
}

/// Fails the run `connection_unresolved` when the connection is disabled or
/// expired for the run's tenant or its credential cannot be read.
async fn resolve(ctx: &Ctx, conn: &ConnectionDef) -> Result<Option<Credential>, JobError> {
    let state = ctx
        .docket
        .store()
        .connection_state(ctx.tenant().to_string(), conn.name.clone())
        .await
        .map_err(|e| {
            JobError::unavailable(format!(
                "store: cannot read the state of connection `{}`: {e}",
                conn.name
            ))
        })?;
    if let Some(s) = state.filter(|s| !s.status.is_usable()) {
        let (what, fix) = match s.status {
            ConnectionStatus::Expired => (
                "has expired credentials",
                "re-authorize it, enable it (`docket connections enable",
            ),
            _ => ("is disabled", "enable it (`docket connections enable"),
        };
        return Err(JobError::new(
            ErrorClass::ConnectionUnresolved,
            format!(
                "connection `{}` {what} (set by {} at {}{}): {fix} {}`), then retry the run; no request was sent",
                conn.name,
                s.updated_by,
                s.updated_at.to_rfc3339(),
                s.comment.map(|c| format!(": {c}")).unwrap_or_default(),
                conn.name
            ),
        ));
    }
    conn.credential().map_err(|why| {
        JobError::new(
            ErrorClass::ConnectionUnresolved,
            format!(
                "connection `{}` cannot be resolved: {why}; provide the credential where the worker runs (it is read at each request; an environment variable needs a restart of the worker), then retry the run; no request was sent",
                conn.name
            ),
        )
    })
}

/// Runs one attempt of an HTTP job: its one request, or its workflow.
pub(crate) async fn run(
    shared: Arc<Shared>,
    job: String,
    ctx: Ctx,
    input: Value,
) -> Result<Value, JobError> {
    let spec = shared
        .compiled
        .jobs
        .get(&job)
        .ok_or_else(|| JobError::permanent(format!("HTTP job `{job}` is not configured")))?;
    let mut data = json!({
        "input": input,
        "variables": ctx.variables(),
        "job": spec.name,
        "run_id": ctx.run_id().to_string(),
        "tenant": ctx.tenant(),
        "correlation_id": ctx.correlation_id(),
    });
    match &spec.work {
        Work::Single(step) => {
            if let Some(w) = &step.when {
                if !decide(w, "when", &data).map_err(|e| e.in_action(step.action.clone()))? {
                    return skip_when(&ctx, &step.action, w).await;
                }
            }
            let key = render_key(&shared, step, &data)?;
            request(&shared, &spec.name, step, &ctx, &mut data, key, "approval").await
        }
        Work::Steps(steps) => workflow(&shared, &spec.name, steps, &ctx, data).await,
    }
}

/// A `when` that is false: the step is recorded skipped.
async fn skip_when(ctx: &Ctx, step: &str, w: &Condition) -> Result<Value, JobError> {
    let reason = format!(
        "condition `when` ({}) is false: the request was not sent",
        w.source
    );
    ctx.skip_step(step.to_string(), reason.clone()).await?;
    Ok(json!({ "sent": false, "skipped": true, "reason": reason }))
}

/// A request's idempotency key, rendered (never empty).
fn render_key(shared: &Shared, step: &RequestStep, data: &Value) -> Result<String, JobError> {
    let key = shared
        .compiled
        .templates
        .render(&step.key_template, data)
        .map_err(|e| invalid("template", e).in_action(step.action.clone()))?;
    if key.trim().is_empty() {
        return Err(JobError::invalid_input(
            "the idempotency key template renders to an empty key",
        )
        .in_action(step.action.clone()));
    }
    Ok(key)
}

/// One attempt of a workflow job: its steps in order, each a durable step
/// (a completed one is replayed from its stored result, never run again),
/// each result readable by later steps' templates as `steps.NAME`. The
/// output is the last step's result.
async fn workflow(
    shared: &Shared,
    job: &str,
    steps: &[StepSpec],
    ctx: &Ctx,
    mut data: Value,
) -> Result<Value, JobError> {
    data["steps"] = json!({});
    // Rendered keys of this run's request steps: two steps must never
    // share one, or the second would get the first's stored result.
    let mut keys: Vec<(String, &str)> = Vec::new();
    let mut last = Value::Null;
    for s in steps {
        let name = s.name.as_str();
        let result = match ctx.stored(name).await? {
            // Skipped by its `when` or an operator, in an earlier attempt.
            Some(rec) if rec.status == docket_store::StepStatus::Skipped => json!({
                "sent": false, "skipped_by_operator": true, "comment": rec.comment,
            }),
            // Completed (or skipped by its `when`) in an earlier attempt:
            // its stored result, with no connection check, rate limit
            // token or breaker admission, since nothing is sent.
            Some(rec) if rec.status == docket_store::StepStatus::Completed => {
                if let StepKind::Request(r) = &s.kind {
                    if let Ok(key) = render_key(shared, r, &data) {
                        keys.push((key, name));
                    }
                }
                rec.result.unwrap_or(Value::Null)
            }
            _ => match &s.when {
                Some(w)
                    if !decide(w, "when", &data).map_err(|e| e.in_action(s.name.clone()))? =>
                {
                    let reason = format!(
                        "condition `when` ({}) is false: the step was skipped",
                        w.source
                    );
                    ctx.skip_step(name, reason.clone()).await?;
                    json!({ "sent": false, "skipped": true, "reason": reason })
                }
                _ => match &s.kind {
                    StepKind::Request(r) => {
                        let key = render_key(shared, r, &data)?;
                        if let Some((_, other)) = keys.iter().find(|(k, _)| *k == key) {
                            return Err(JobError::invalid_input(format!(
                                "steps `{other}` and `{name}` of job `{job}` render the same idempotency key `{key}`: each step is its own action and needs its own key"
                            ))
                            .in_action(s.name.clone()));
                        }
                        keys.push((key.clone(), name));
                        let approval = format!("approval:{name}");
                        request(shared, job, r, ctx, &mut data, key, &approval).await?
                    }
                    StepKind::Sleep(how) => sleep_step(shared, ctx, name, how, &data).await?,
                    StepKind::Signal(w) => {
                        let key = match &w.key {
                            Some(t) => {
                                Some(shared.compiled.templates.render(t, &data).map_err(|e| {
                                    invalid("template", e).in_action(s.name.clone())
                                })?)
                            }
                            None => None,
                        };
                        let timeout = Duration::from_millis(w.timeout_ms as u64);
                        let got = match &key {
                            Some(k) => ctx.wait_for_signal_keyed(&w.signal, k, timeout).await,
                            None => ctx.wait_for_signal(&w.signal, timeout).await,
                        }
                        .map_err(|e| e.in_action(s.name.clone()))?;
                        match got {
                            Signalled::Received(sig) => json!({
                                "received": true,
                                "timed_out": false,
                                "signal_id": sig.id,
                                "name": sig.name,
                                "key": sig.key,
                                "data": sig.data,
                                "sent_by": sig.sent_by,
                                "received_at": sig.received_at.to_rfc3339(),
                            }),
                            Signalled::TimedOut { until } => match w.on_timeout {
                                OnTimeout::Continue => json!({
                                    "received": false,
                                    "timed_out": true,
                                    "until": until.to_rfc3339(),
                                }),
                                OnTimeout::Fail => {
                                    let e = JobError::permanent(format!(
                                        "step `{name}` of job `{job}`: no signal \"{}\"{} arrived within {} (by {}); on_timeout = \"fail\"",
                                        w.signal,
                                        key.map(|k| format!(" with key \"{k}\"")).unwrap_or_default(),
                                        w.timeout_src,
                                        until.to_rfc3339()
                                    ));
                                    ctx.record_failure(name, &e).await;
                                    return Err(e.in_action(s.name.clone()));
                                }
                            },
                        }
                    }
                },
            },
        };
        data["steps"][name] = result.clone();
        last = result;
    }
    Ok(last)
}

/// A `sleep` / `sleep_until` step: a durable sleep (`sleep:NAME`); its
/// result is `{"until": …}`, the stored wake time.
async fn sleep_step(
    shared: &Shared,
    ctx: &Ctx,
    name: &str,
    how: &SleepFor,
    data: &Value,
) -> Result<Value, JobError> {
    let stored = ctx
        .stored(&format!("sleep:{name}"))
        .await?
        .and_then(|r| r.result)
        .and_then(|r| r.get("until").cloned())
        .and_then(|u| serde_json::from_value::<Timestamp>(u).ok());
    let until = match (stored, how) {
        (Some(u), _) => u,
        (None, SleepFor::Millis(ms)) => ctx.now().plus_millis(*ms),
        (None, SleepFor::Until(t)) => {
            let text = shared
                .compiled
                .templates
                .render(t, data)
                .map_err(|e| invalid("template", e).in_action(name.to_string()))?;
            Timestamp::parse_checked(text.trim()).map_err(|e| {
                let why = match e {
                    docket_core::TimeError::NotRfc3339 => {
                        "not an RFC 3339 time (e.g. 2026-05-01T09:00:00Z)".to_string()
                    }
                    docket_core::TimeError::OutOfRange => {
                        format!("outside {}", docket_core::TIME_RANGE)
                    }
                };
                JobError::invalid_input(format!("`{t}` renders `{}`, which is {why}", text.trim()))
                    .in_action(name.to_string())
            })?
        }
    };
    ctx.sleep_until(name, until).await?;
    Ok(json!({ "until": until.to_rfc3339() }))
}

/// One request (a single-request job's, or a workflow step's) with its
/// approval gate, connection checks, rate limit, breaker, ledger and
/// evidence; `input_name` names its approval's wait.
async fn request(
    shared: &Shared,
    job: &str,
    spec: &RequestStep,
    ctx: &Ctx,
    data: &mut Value,
    key: String,
    input_name: &str,
) -> Result<Value, JobError> {
    let ctx = ctx.clone();
    let conn = spec
        .connection
        .as_ref()
        .and_then(|c| shared.compiled.connections.get(c));
    let with_action = |e: JobError| e.in_action(spec.action.clone());
    data["idempotency_key"] = Value::String(key.clone());
    let data = &*data;
    let request = render_request(shared, &spec.request, conn, data, &key).map_err(with_action)?;
    let reconcile_request = match &spec.reconcile {
        Some(r) => Some(render_request(shared, &r.request, conn, data, &key).map_err(with_action)?),
        None => None,
    };
    if let Some(a) = &spec.approval {
        if decide(a, "approval", data).map_err(with_action)? {
            let ask = json!({
                "kind": "approval",
                "job": job,
                "action": spec.action,
                "condition": a.source,
                "connection": spec.connection,
                "idempotency_key": key,
                "request": request.describe(),
                "on_reject": match spec.on_reject { OnReject::Fail => "fail", OnReject::Complete => "complete" },
                "message": format!("approve to send this request; reject to {}", match spec.on_reject {
                    OnReject::Fail => "fail the run (reason rejected)",
                    OnReject::Complete => "complete the run without sending it",
                }),
            });
            match ctx.wait_for_input(input_name, ask).await? {
                InputDecision::Approved(_) => {}
                InputDecision::Rejected(decision) => match spec.on_reject {
                    OnReject::Fail => {
                        return Err(with_action(JobError::terminal(
                            TerminalReason::Rejected,
                            format!(
                                "an operator rejected the request of `{}` (approval: {}); it was not sent",
                                spec.action, a.source
                            ),
                        )))
                    }
                    OnReject::Complete => {
                        ctx.skip_step(
                            spec.action.clone(),
                            "an operator rejected the request: it was not sent",
                        )
                        .await?;
                        return Ok(json!({ "sent": false, "rejected": true, "decision": decision }));
                    }
                },
            }
        }
    }

    // Only a request about to go out needs its connection: a `when` that is
    // false skips without it, and a person can approve while an operator
    // re-authorizes it.
    let credential = match conn {
        Some(c) => resolve(&ctx, c).await.map_err(with_action)?,
        None => None,
    };
    // The connection's rate limit, before the breaker is asked (so a probe
    // is never held back by a token) and before anything is sent: no token
    // → deferred to the one this run reserved, no request.
    if let Some((c, r)) = conn.and_then(|c| c.rate.as_ref().map(|r| (c, r))) {
        let bucket = r
            .bucket(
                &crate::rate::connection_bucket(&c.name),
                ctx.tenant(),
                job,
                &data["input"],
            )
            .map_err(|e| with_action(JobError::invalid_input(format!("rate_limit_key: {e}"))))?;
        crate::rate::take(
            ctx.docket.store(),
            &bucket,
            r.limit,
            ctx.run_id(),
            ctx.docket.clock().now(),
        )
        .await
        .map_err(with_action)?;
    }
    let breaker = conn.and_then(|c| shared.breakers.get(&c.name).cloned());
    let mut probe = false;
    if let (Some(b), Some(c)) = (&breaker, conn) {
        let probe_ms = request.timeout.as_millis() as u64
            + reconcile_request
                .as_ref()
                .map(|r| r.timeout.as_millis() as u64)
                .unwrap_or(0)
            + 1_000;
        match b
            .admit_shared(ctx.docket.store(), ctx.docket.clock().now(), probe_ms)
            .await
        {
            Admission::Defer { until } => {
                if b.waits_for_probe(ctx.docket.clock().now()) {
                    watch_probe(shared, &ctx.docket).await;
                }
                return Err(with_action(JobError::circuit_open(
                    c.name.clone(),
                    until,
                    format!(
                        "the circuit breaker of connection `{}` is open until {}: the request was not sent",
                        c.name, until
                    ),
                )));
            }
            Admission::Send {
                probe: p,
                transition,
            } => {
                probe = p;
                if let Some(t) = transition {
                    breaker_event(&ctx, &c.name, &t, None).await;
                }
            }
        }
    }

    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let secret = credential.as_ref().map(|c| c.secret.clone());
    let cred = credential.map(|c| (c.header, c.value));
    let sender = Sender {
        client: shared.client.clone(),
        ctx: ctx.clone(),
        connection: spec.connection.clone(),
        action: spec.action.clone(),
        credential: cred,
        secret,
        tracker: tracker.clone(),
        max_body: spec.max_response_bytes,
        probe,
    };
    let result = match (&spec.reconcile, reconcile_request) {
        (Some(r), Some(rreq)) => {
            let s2 = sender.clone();
            ctx.action_with_reconcile(
                spec.action.clone(),
                key.clone(),
                None,
                move |k| async move { s2.reconcile(r, rreq, k).await },
                |k| sender.send(spec, request, k),
            )
            .await
        }
        _ => {
            ctx.action(spec.action.clone(), key.clone(), |k| {
                sender.send(spec, request, k)
            })
            .await
        }
    };

    if let (Some(b), Some(c)) = (&breaker, conn) {
        let (requests, transient) = {
            let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
            (t.requests, t.last_transient)
        };
        let store = ctx.docket.store();
        let now = ctx.docket.clock().now();
        if requests == 0 {
            if probe {
                b.release_probe_shared(store, now).await;
            }
        } else if let Some(t) = b.record_shared(store, now, probe, transient).await {
            let cause = result.as_ref().err().map(|e| e.class);
            breaker_event(&ctx, &c.name, &t, cause).await;
            if t == Transition::Closed {
                // The close made the runs deferred to the probe's deadline
                // due now: this process's idle workers claim them at once.
                ctx.docket.wake_workers();
            }
        }
    }

    match result? {
        Stepped::Done(v) => Ok(v),
        Stepped::Skipped { comment } => Ok(json!({
            "sent": false,
            "skipped_by_operator": true,
            "comment": comment,
        })),
    }
}

/// Keeps this process's copies of the breakers up to date while another
/// process's half-open probe is out. Meanwhile the claim gate holds the
/// connection's runs until the probe's deadline (`Breaker::claim_limit`),
/// up to the probe's request timeout plus 1 s; when the probe closes the
/// breaker sooner, this process must learn of it to claim again. One task
/// per process, started by a deferral to a probe: at every wake-up this
/// process gets (a `NOTIFY`, which the close's release sends; SQLite's
/// `data_version` watch; a trigger here), and at least every
/// [`PROBE_RECHECK`], it reads the stored state of each breaker whose copy
/// waits for a probe (one read each), and wakes this process's workers
/// once one no longer does. It ends when none waits any more. It
/// subscribes before the deferral is stored, so the close's wake-up cannot
/// come before it listens.
async fn watch_probe(shared: &Shared, docket: &crate::Docket) {
    if shared.probe_watch.swap(true, Ordering::AcqRel) {
        return;
    }
    let wake = docket.remote_wake().await;
    tokio::spawn(probe_watch_loop(
        shared.breakers.values().cloned().collect(),
        shared.probe_watch.clone(),
        docket.clone(),
        wake,
    ));
}

async fn probe_watch_loop(
    breakers: Vec<Arc<Breaker>>,
    running: Arc<AtomicBool>,
    docket: crate::Docket,
    mut wake: tokio::sync::watch::Receiver<u64>,
) {
    let waiting = || -> Vec<&Arc<Breaker>> {
        let now = docket.clock().now();
        breakers.iter().filter(|b| b.waits_for_probe(now)).collect()
    };
    loop {
        let watched = waiting();
        if watched.is_empty() {
            running.store(false, Ordering::Release);
            // A deferral that found the flag still set a moment ago did
            // not start a task of its own: go on for it.
            if waiting().is_empty() || running.swap(true, Ordering::AcqRel) {
                return;
            }
            continue;
        }
        let mut changed = false;
        for b in watched {
            b.refresh(docket.store()).await;
            changed |= !b.waits_for_probe(docket.clock().now());
        }
        if changed {
            docket.wake_workers();
        }
        if let Ok(Err(_)) = tokio::time::timeout(PROBE_RECHECK, wake.changed()).await {
            // The engine is gone.
            running.store(false, Ordering::Release);
            return;
        }
    }
}

async fn breaker_event(ctx: &Ctx, connection: &str, t: &Transition, cause: Option<ErrorClass>) {
    // A log line for operators; the event below is the evidence.
    tracing::info!(connection, run = %ctx.run_id(), transition = ?t, "circuit breaker changed state");
    let (kind, data) = match t {
        Transition::Opened {
            until,
            failures,
            reopened,
        } => (
            EventKind::CircuitOpened,
            json!({
                "connection": connection,
                "from": if *reopened { "half_open" } else { "closed" },
                "failures": failures,
                "reset_at": until,
                "reset_at_rfc3339": until.to_rfc3339(),
                "cause": cause.map(|c| c.as_str()),
            }),
        ),
        Transition::HalfOpen => (
            EventKind::CircuitHalfOpen,
            json!({ "connection": connection, "probe_run": ctx.run_id() }),
        ),
        Transition::Closed => (
            EventKind::CircuitClosed,
            json!({ "connection": connection }),
        ),
    };
    evidence(ctx, kind, data).await;
}

/// Records an evidence event; a failure to record (the attempt lost its
/// lease) is logged, and the attempt's own next write reports it.
async fn evidence(ctx: &Ctx, kind: EventKind, data: Value) {
    if let Err(e) = ctx.record(kind.clone(), data).await {
        tracing::warn!(run = %ctx.run_id(), %kind, error = %e, "could not record an evidence event");
    }
}

fn redact(s: &str, secret: Option<&str>) -> String {
    match secret {
        Some(sec) if sec.len() >= 4 && s.contains(sec) => s.replace(sec, REDACTED),
        _ => s.to_string(),
    }
}

fn cut(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

/// Sends requests for one attempt and records their evidence.
#[derive(Clone)]
struct Sender {
    client: reqwest::Client,
    ctx: Ctx,
    connection: Option<String>,
    action: String,
    credential: Option<(HeaderName, HeaderValue)>,
    secret: Option<String>,
    tracker: Arc<Mutex<Tracker>>,
    max_body: usize,
    probe: bool,
}

impl Sender {
    async fn exchange(
        &self,
        req: &Prepared,
        trace: Option<TraceContext>,
    ) -> Result<Answer, reqwest::Error> {
        let mut rb = self.client.request(req.method.clone(), &req.url);
        for (k, v) in &req.headers {
            rb = rb.header(k.clone(), v.clone());
        }
        // W3C trace context: the request span's (traces on) or the one the
        // run was triggered in. After the job's own headers, so it wins.
        if let Some(t) = trace {
            rb = rb.header("traceparent", t.traceparent);
            if let Some(state) = t.tracestate {
                rb = rb.header("tracestate", state);
            }
        }
        if let Some((k, v)) = &self.credential {
            rb = rb.header(k.clone(), v.clone());
        }
        rb = match &req.body {
            Some(PreparedBody::Json(v)) => rb.json(v),
            Some(PreparedBody::Text(t)) => rb.body(t.clone()),
            None => rb,
        };
        let mut resp = rb.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp.chunk().await? {
            let room = self.max_body - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            retry_after,
            body,
            truncated,
        })
    }

    /// One exchange with its evidence event. `Err` is a transport failure
    /// (class, message).
    async fn attempt(
        &self,
        purpose: &str,
        req: &Prepared,
        key: &str,
        classify: impl Fn(u16) -> Verdict,
    ) -> (Result<(Answer, Verdict), (ErrorClass, String)>, Value) {
        let secret = self.secret.as_deref();
        let url = redact(&req.url, secret);
        let span = self.ctx.trace.request(purpose, req.method.as_str(), &url);
        let trace = match &span {
            Some(cx) => Some(crate::telemetry::headers_of(cx)),
            None => self.ctx.trace_context(),
        };
        let started = Instant::now();
        let out = tokio::time::timeout(req.timeout, self.exchange(req, trace)).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let mut ev = json!({
            "purpose": purpose,
            "action": self.action,
            "connection": self.connection,
            "method": req.method.as_str(),
            "url": url,
            "idempotency_key": key,
            "attempt": self.ctx.attempt(),
            "probe": self.probe,
            "duration_ms": duration_ms,
        });
        let res = match out {
            Err(_) => Err((
                ErrorClass::Timeout,
                format!(
                    "{} {url}: no answer within {} ms (the request may or may not have been processed)",
                    req.method,
                    req.timeout.as_millis()
                ),
            )),
            Ok(Err(e)) => {
                let class = transport_class(&e);
                let mut chain = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    chain.push_str(&format!(": {s}"));
                    src = s.source();
                }
                Err((class, redact(&format!("{} {url}: {chain}", req.method), secret)))
            }
            Ok(Ok(a)) => {
                let v = classify(a.status);
                Ok((a, v))
            }
        };
        match &res {
            Err((class, msg)) => {
                ev["status"] = Value::Null;
                ev["class"] = json!(class.as_str());
                ev["error"] = json!(msg);
            }
            Ok((a, v)) => {
                let text = redact(&String::from_utf8_lossy(&a.body), secret);
                let (excerpt, cut_short) = cut(&text, EXCERPT_BYTES);
                ev["status"] = json!(a.status);
                ev["class"] = json!(v.as_str());
                ev["body_excerpt"] = json!(excerpt);
                ev["body_bytes"] = json!(a.body.len());
                ev["body_truncated"] = json!(cut_short || a.truncated);
                if let Some(ra) = &a.retry_after {
                    ev["retry_after"] = json!(ra);
                }
            }
        }
        if let Some(cx) = span {
            let (status, failed) = match &res {
                Err((c, _)) => (None, Some(c.as_str())),
                Ok((a, Verdict::Failure(c))) => (Some(a.status), Some(c.as_str())),
                Ok((a, Verdict::Ok)) => (Some(a.status), None),
            };
            crate::telemetry::end_request(cx, status, failed);
        }
        {
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            t.requests += 1;
            t.last_transient = match &res {
                Err((c, _)) => c.is_retryable(),
                Ok((_, Verdict::Failure(c))) => c.is_retryable(),
                Ok((_, Verdict::Ok)) => false,
            };
        }
        (res, ev)
    }

    /// The body as JSON (or text), with the credential redacted should the
    /// provider echo it: it becomes the action's stored result.
    fn parsed_body(&self, a: &Answer) -> Value {
        let text = redact(&String::from_utf8_lossy(&a.body), self.secret.as_deref());
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    async fn send(
        &self,
        spec: &RequestStep,
        req: Prepared,
        key: String,
    ) -> Result<Value, JobError> {
        let (res, ev) = self
            .attempt("request", &req, &key, |s| spec.classify.classify(s))
            .await;
        evidence(&self.ctx, EventKind::HttpResponse, ev).await;
        let (a, verdict) = match res {
            Err((class, msg)) => return Err(JobError::new(class, msg)),
            Ok(x) => x,
        };
        let body = self.parsed_body(&a);
        let result = |extra: Option<(&str, Value)>| {
            let mut v = json!({ "status": a.status, "body": body });
            if a.truncated {
                v["body_truncated"] = json!(true);
            }
            if let Some((k, x)) = extra {
                v[k] = x;
            }
            v
        };
        match verdict {
            Verdict::Ok => Ok(result(None)),
            // Already done (e.g. a 409 the job maps to `duplicate`): the
            // action is committed, not failed.
            Verdict::Failure(ErrorClass::Duplicate) => Ok(result(Some(("duplicate", json!(true))))),
            Verdict::Failure(class) => {
                let secret = self.secret.as_deref();
                let text = redact(&String::from_utf8_lossy(&a.body), secret);
                let (excerpt, more) = cut(text.trim(), MESSAGE_EXCERPT);
                let msg = format!(
                    "HTTP {} from {} {}{}{}",
                    a.status,
                    req.method,
                    redact(&req.url, secret),
                    if excerpt.is_empty() { "" } else { ": " },
                    excerpt
                ) + if more { "…" } else { "" };
                let reset: Option<Timestamp> = a
                    .retry_after
                    .as_deref()
                    .and_then(|v| retry_after(v, self.ctx.docket.clock().now()));
                let mut e = JobError::new(class, msg);
                e.retry_after = reset;
                Err(e)
            }
        }
    }

    async fn reconcile(
        &self,
        spec: &ReconcileSpec,
        req: Prepared,
        key: String,
    ) -> Result<Reconciled, JobError> {
        let (res, mut ev) = self
            .attempt("reconcile", &req, &key, super::classify::default_verdict)
            .await;
        let finding = match &res {
            Err(_) => Reconciled::StillUnknown,
            Ok((a, _)) => {
                let body = self.parsed_body(a);
                let data = json!({ "status": a.status, "body": body });
                let pointer_ok = spec
                    .found_pointer
                    .as_deref()
                    .map(|p| body.pointer(p).is_some_and(|v| !v.is_null()));
                let found = match &spec.found_when {
                    Some(c) => c.eval(&data) == Ok(true) && pointer_ok.unwrap_or(true),
                    None => (200..300).contains(&a.status) && pointer_ok.unwrap_or(true),
                };
                if found {
                    Reconciled::Committed(
                        json!({ "status": a.status, "body": body, "reconciled": true }),
                    )
                } else if spec.not_found_when.eval(&data) == Ok(true) {
                    Reconciled::NotDone
                } else {
                    Reconciled::StillUnknown
                }
            }
        };
        ev["finding"] = json!(match &finding {
            Reconciled::Committed(_) => "committed",
            Reconciled::NotDone => "not_done",
            Reconciled::StillUnknown => "still_unknown",
        });
        evidence(&self.ctx, EventKind::HttpResponse, ev).await;
        Ok(finding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_and_cut() {
        assert_eq!(
            redact("Bearer tok-1234 x", Some("tok-1234")),
            "Bearer [redacted] x"
        );
        assert_eq!(redact("abc", Some("ab")), "abc");
        assert_eq!(redact("abc", None), "abc");
        let s = "é".repeat(2000);
        let (c, more) = cut(&s, EXCERPT_BYTES);
        assert!(more && c.len() <= EXCERPT_BYTES && c.len() >= EXCERPT_BYTES - 1);
        assert_eq!(cut("short", 10), ("short", false));
    }
}
