//! Traces end to end: a real OTLP/HTTP collector started by each test
//! (decoding the protobuf it receives), a local HTTP endpoint an HTTP job
//! calls (recording the `traceparent` it gets), the engine on SQLite with
//! the injected clock. Waits are on the SDK's `force_flush`, which returns
//! once the collector has answered.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use docket::http::HttpJobs;
use docket::telemetry::attempt_span_id;
use docket::{
    Actor, Ctx, Docket, Job, JobError, ManualClock, Reconciled, RetryPolicy, RunStatus, Telemetry,
    TelemetryConfig, Timestamp, TraceContext, TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

const T0: Timestamp = Timestamp(1_767_225_600_000);
/// The caller's trace: what a web app's request would carry.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn caller_context() -> TraceContext {
    TraceContext {
        traceparent: format!("00-{TRACE_ID}-{CALLER_SPAN}-01"),
        tracestate: Some("vendor=abc".into()),
    }
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

// ---------------------------------------------------------------- collector

/// Every span the collector decoded, in arrival order.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

async fn collect(State(c): State<Collector>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    let mut spans = c.0.lock().unwrap();
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            spans.extend(ss.spans);
        }
    }
    // An empty ExportTraceServiceResponse: everything accepted.
    (StatusCode::OK, Vec::new())
}

impl Collector {
    async fn start() -> (Collector, String) {
        let c = Collector::default();
        let addr = serve(
            Router::new()
                .route("/v1/traces", post(collect))
                .with_state(c.clone()),
        )
        .await;
        (c, format!("http://{addr}/v1/traces"))
    }

    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(v) => Some(v.clone()),
            AnyValue::IntValue(v) => Some(v.to_string()),
            other => Some(format!("{other:?}")),
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Exports everything ended so far and waits for the collector's answer.
async fn flush(t: &Arc<Telemetry>) -> Result<(), String> {
    let t = t.clone();
    tokio::task::spawn_blocking(move || t.force_flush().map_err(|e| e.to_string()))
        .await
        .unwrap()
}

// ---------------------------------------------------------------- endpoint

/// The `traceparent` and `tracestate` headers of one request.
type Seen = (Option<String>, Option<String>);

/// The service an HTTP job calls: answers from a script (then 200), and
/// keeps the trace headers of every request.
#[derive(Clone, Default)]
struct Endpoint {
    script: Arc<Mutex<VecDeque<u16>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn hook(State(e): State<Endpoint>, headers: HeaderMap) -> StatusCode {
    let h = |k: &str| headers.get(k).map(|v| v.to_str().unwrap().to_string());
    e.seen
        .lock()
        .unwrap()
        .push((h("traceparent"), h("tracestate")));
    let code = e.script.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(code).unwrap()
}

impl Endpoint {
    async fn start(script: &[u16]) -> (Endpoint, String) {
        let e = Endpoint::default();
        e.script.lock().unwrap().extend(script);
        let addr = serve(
            Router::new()
                .route("/hook", post(hook))
                .with_state(e.clone()),
        )
        .await;
        (e, format!("http://{addr}/hook"))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// An engine on SQLite with the HTTP job `call` (1 s between attempts).
fn engine(url: &str) -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let d = Docket::with_store(store, Arc::new(clock.clone()));
    let dir = std::env::temp_dir();
    let http = HttpJobs::from_toml(
        &format!(
            r#"
            [jobs.call]
            url = "{url}"
            retry = {{ base_delay_ms = 1000, multiplier = 1.0, max_delay_ms = 1000, jitter_ms = 0, max_attempts = 5 }}
            "#
        ),
        &dir,
    )
    .unwrap();
    http.install(&d).unwrap();
    (d, clock)
}

/// Runs every attempt of `run` (one tick each, moving the clock past each
/// retry's 1 s delay) until it is terminal.
async fn run_to_end(d: &Docket, clock: &ManualClock, run: docket::RunId) -> docket::Run {
    let w = d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    });
    for _ in 0..10 {
        w.tick().await.unwrap();
        let r = d.get_run(run).await.unwrap();
        if r.status.is_terminal() {
            return r;
        }
        clock.advance_millis(1_000);
    }
    panic!("run {run} did not finish in 10 attempts");
}

// ---------------------------------------------------------------- tests

/// A run triggered in the caller's trace and retried twice: one trace from
/// the trigger through every attempt (each a new span, linked to the one
/// before) to each outgoing request, whose `traceparent` names the request
/// span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_trigger_through_retried_attempts_to_each_request() {
    let (collector, endpoint_url) = Collector::start().await;
    let (endpoint, url) = Endpoint::start(&[503, 503]).await;
    let (d, clock) = engine(&url);
    let t = Telemetry::otlp(TelemetryConfig {
        endpoint: Some(endpoint_url),
        ..Default::default()
    })
    .unwrap();
    d.set_telemetry(t).unwrap();
    let telemetry = d.telemetry().unwrap().clone();

    let run = d
        .trigger_with(
            "call",
            json!({}),
            TriggerOptions {
                trace: Some(caller_context()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run;
    // The stored context is the trigger span's, in the caller's trace.
    let stored = run.trace.clone().expect("the run keeps its trace context");
    assert!(
        stored.traceparent.starts_with(&format!("00-{TRACE_ID}-")),
        "{stored:?}"
    );
    assert_eq!(stored.tracestate.as_deref(), Some("vendor=abc"));
    let done = run_to_end(&d, &clock, run.id).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.attempt, 3);
    flush(&telemetry).await.unwrap();

    let spans = collector.spans();
    let trigger = spans
        .iter()
        .find(|s| s.name == "docket trigger call")
        .expect("trigger span");
    assert_eq!(hex(&trigger.trace_id), TRACE_ID);
    assert_eq!(
        hex(&trigger.parent_span_id),
        CALLER_SPAN,
        "child of the caller"
    );
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "docket attempt call")
        .collect();
    attempts.sort_by_key(|s| attr(s, "docket.attempt"));
    assert_eq!(attempts.len(), 3, "one span per attempt");
    for (i, a) in attempts.iter().enumerate() {
        let n = i as u32 + 1;
        assert_eq!(
            hex(&a.trace_id),
            TRACE_ID,
            "attempt {n} in the caller's trace"
        );
        assert_eq!(
            a.parent_span_id, trigger.span_id,
            "attempt {n} under the trigger"
        );
        assert_eq!(attr(a, "docket.attempt").as_deref(), Some(&*n.to_string()));
        assert_eq!(attr(a, "docket.run_id"), Some(run.id.to_string()));
        assert_eq!(
            a.span_id,
            attempt_span_id(run.id, n).to_bytes().to_vec(),
            "derived span id"
        );
        if n == 1 {
            assert!(a.links.is_empty());
        } else {
            assert_eq!(a.links.len(), 1, "attempt {n} links to attempt {}", n - 1);
            assert_eq!(a.links[0].span_id, attempts[i - 1].span_id);
            assert_eq!(hex(&a.links[0].trace_id), TRACE_ID);
            // The backoff is the gap between the spans: the retry decision
            // of the previous attempt says when.
            let prev = attempts[i - 1];
            assert_eq!(
                attr(prev, "docket.outcome").as_deref(),
                Some("retry_scheduled")
            );
            assert_eq!(attr(prev, "error.type").as_deref(), Some("unavailable"));
            assert_eq!(attr(prev, "docket.retry.delay_ms").as_deref(), Some("1000"));
            assert!(attr(prev, "docket.retry.policy").is_some());
            assert!(attr(prev, "docket.retry.eligible_at").is_some());
        }
    }
    assert_eq!(
        attr(attempts[2], "docket.outcome").as_deref(),
        Some("completed")
    );

    // Each request carried a traceparent in the trace, naming its client
    // span, which is a child of its attempt's span.
    let seen = endpoint.seen();
    assert_eq!(seen.len(), 3);
    for (i, (tp, ts)) in seen.iter().enumerate() {
        let tp = tp.as_deref().expect("traceparent sent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], TRACE_ID, "request {i} in the caller's trace");
        assert_eq!(ts.as_deref(), Some("vendor=abc"), "tracestate passed on");
        let client = spans
            .iter()
            .find(|s| hex(&s.span_id) == parts[2])
            .unwrap_or_else(|| panic!("no span {} for request {i}", parts[2]));
        assert_eq!(client.kind, 3, "SPAN_KIND_CLIENT");
        assert_eq!(client.parent_span_id, attempts[i].span_id);
        let code = if i < 2 { "503" } else { "200" };
        assert_eq!(
            attr(client, "http.response.status_code").as_deref(),
            Some(code)
        );
    }
    // The ledger-guarded action of the HTTP job is a span too.
    assert!(
        spans
            .iter()
            .filter(|s| s.name.starts_with("docket action "))
            .count()
            >= 3,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(telemetry.spans_dropped(), 0);
    assert_eq!(telemetry.spans_exported(), spans.len() as u64);
}

/// A collector that is down costs a counter, nothing else: the run
/// completes as it would without traces, and the lost spans are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_only_a_counter() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("http://{}/v1/traces", closed.local_addr().unwrap());
    drop(closed);
    let (endpoint, url) = Endpoint::start(&[503]).await;
    let (d, clock) = engine(&url);
    d.set_telemetry(
        Telemetry::otlp(TelemetryConfig {
            endpoint: Some(down),
            ..Default::default()
        })
        .unwrap(),
    )
    .unwrap();
    let telemetry = d.telemetry().unwrap().clone();
    let run = d.trigger("call", json!({})).await.unwrap().run;
    let done = run_to_end(&d, &clock, run.id).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.attempt, 2);
    assert_eq!(endpoint.seen().len(), 2);
    // The export fails (connection refused): reported to whoever flushes,
    // counted for /metrics.
    assert!(flush(&telemetry).await.is_err());
    assert!(
        telemetry.spans_dropped() >= 5,
        "trigger, 2 attempts, 2 requests (and actions): {}",
        telemetry.spans_dropped()
    );
    assert_eq!(telemetry.spans_exported(), 0);
}

/// Traces off: nothing is exported, but a context the run was triggered in
/// is kept and passed on, unchanged, to the job's requests; an invalid one
/// is ignored (not stored, not sent), as the W3C recommendation says.
#[tokio::test]
async fn with_traces_off_the_stored_context_is_passed_on_and_an_invalid_one_ignored() {
    let (endpoint, url) = Endpoint::start(&[]).await;
    let (d, clock) = engine(&url);
    assert!(d.telemetry().is_none());
    let given = caller_context();
    let run = d
        .trigger_with(
            "call",
            json!({}),
            TriggerOptions {
                trace: Some(given.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run;
    assert_eq!(run.trace.as_ref(), Some(&given));
    assert_eq!(
        d.get_run(run.id).await.unwrap().trace.as_ref(),
        Some(&given)
    );
    run_to_end(&d, &clock, run.id).await;
    let bad = d
        .trigger_with(
            "call",
            json!({}),
            TriggerOptions {
                trace: Some(TraceContext {
                    traceparent: "00-not-a-trace-01".into(),
                    tracestate: None,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run;
    assert_eq!(bad.trace, None);
    run_to_end(&d, &clock, bad.id).await;
    assert_eq!(
        endpoint.seen(),
        vec![(Some(given.traceparent), given.tracestate), (None, None)]
    );
}

/// A Rust job `flow`: step `prepare`, the ledger-guarded action `charge`
/// (its first call times out after the effect landed, so the next attempt
/// reconciles it: committed), then step `finish`, which fails permanently
/// while `broken` is set.
fn flow_job(charges: Arc<AtomicU32>, broken: Arc<AtomicBool>) -> Job {
    Job::new("flow", move |ctx: Ctx, _input: serde_json::Value| {
        let (charges, broken) = (charges.clone(), broken.clone());
        async move {
            ctx.step("prepare", || async { Ok::<_, JobError>(1) })
                .await?;
            ctx.action_with_reconcile(
                "charge",
                "charge-key-1",
                None,
                |_key| async { Ok(Reconciled::Committed(json!({ "charge": "ch_1" }))) },
                move |_key| async move {
                    charges.fetch_add(1, Ordering::SeqCst);
                    Err::<serde_json::Value, _>(JobError::timeout("no answer from the provider"))
                },
            )
            .await?;
            ctx.step("finish", || async move {
                if broken.load(Ordering::SeqCst) {
                    Err(JobError::permanent("the card is blocked"))
                } else {
                    Ok(2)
                }
            })
            .await?;
            Ok::<_, JobError>(json!({}))
        }
    })
    .retry(RetryPolicy {
        name: "fast".into(),
        base_delay_ms: 1000,
        multiplier: 1.0,
        max_delay_ms: 1000,
        max_attempts: 5,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    })
}

/// Step spans, the reconcile of a ledger-guarded action, and an operator
/// retry given in the caller's trace: a span there with who and the
/// comment, linked to the run's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_reconciled_actions_and_operator_actions_are_spans() {
    let (collector, endpoint_url) = Collector::start().await;
    let (d, clock) = engine("http://127.0.0.1:9/unused");
    let charges = Arc::new(AtomicU32::new(0));
    let broken = Arc::new(AtomicBool::new(true));
    d.register(flow_job(charges.clone(), broken.clone()))
        .unwrap();
    d.set_telemetry(
        Telemetry::otlp(TelemetryConfig {
            endpoint: Some(endpoint_url),
            ..Default::default()
        })
        .unwrap(),
    )
    .unwrap();
    let telemetry = d.telemetry().unwrap().clone();
    let run = d.trigger("flow", json!({})).await.unwrap().run;
    let failed = run_to_end(&d, &clock, run.id).await;
    assert_eq!(failed.status, RunStatus::Failed);
    assert_eq!(failed.attempt, 2, "attempt 1 timed out, attempt 2 failed");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "reconciled, not repeated"
    );
    broken.store(false, Ordering::SeqCst);
    d.retry(
        run.id,
        None,
        Actor::new("ops-alice", Some("card unblocked".into())).with_trace(Some(caller_context())),
    )
    .await
    .unwrap();
    let done = run_to_end(&d, &clock, run.id).await;
    assert_eq!(done.status, RunStatus::Completed);
    flush(&telemetry).await.unwrap();
    let spans = collector.spans();
    let names: Vec<&String> = spans.iter().map(|s| &s.name).collect();
    let attempt = |n: u32| {
        spans
            .iter()
            .find(|s| s.span_id == attempt_span_id(run.id, n).to_bytes().to_vec())
            .unwrap_or_else(|| panic!("attempt {n}: {names:?}"))
    };
    let run_trace = attempt(1).trace_id.clone();
    let under = |name: &str, n: u32| -> &Span {
        spans
            .iter()
            .find(|s| s.name == name && s.parent_span_id == attempt(n).span_id)
            .unwrap_or_else(|| panic!("no {name} under attempt {n}: {names:?}"))
    };

    // Steps: a span per step per attempt, with how it went.
    let prepare = under("docket step prepare", 1);
    assert_eq!(attr(prepare, "docket.step").as_deref(), Some("prepare"));
    assert_eq!(attr(prepare, "docket.result").as_deref(), Some("done"));
    assert_eq!(prepare.trace_id, run_trace);
    let finish = under("docket step finish", 2);
    assert_eq!(attr(finish, "error.type").as_deref(), Some("permanent"));
    assert_eq!(
        finish.status.as_ref().map(|s| s.code),
        Some(2),
        "STATUS_CODE_ERROR"
    );
    let finish = under("docket step finish", 3);
    assert_eq!(attr(finish, "docket.result").as_deref(), Some("done"));

    // The action: sent in attempt 1 (outcome unknown), reconciled in 2.
    let sent = under("docket action charge", 1);
    assert_eq!(
        attr(sent, "docket.idempotency_key").as_deref(),
        Some("charge-key-1")
    );
    assert_eq!(
        attr(sent, "docket.ledger.begin").as_deref(),
        Some("acquired")
    );
    assert_eq!(attr(sent, "error.type").as_deref(), Some("timeout"));
    let reconciled = under("docket action charge", 2);
    assert_eq!(
        attr(reconciled, "docket.ledger.begin").as_deref(),
        Some("acquired_to_reconcile")
    );
    assert_eq!(
        attr(reconciled, "docket.reconcile").as_deref(),
        Some("committed")
    );
    assert_eq!(attr(reconciled, "docket.result").as_deref(), Some("done"));
    let replayed = under("docket action charge", 3);
    assert_eq!(
        attr(replayed, "docket.ledger.begin").as_deref(),
        Some("replayed")
    );

    // The operator's retry: in the caller's trace, who and why, linked to
    // the run's trace.
    let op = spans
        .iter()
        .find(|s| s.name == "docket operator retry")
        .unwrap_or_else(|| panic!("no operator span: {names:?}"));
    assert_eq!(hex(&op.trace_id), TRACE_ID);
    assert_eq!(hex(&op.parent_span_id), CALLER_SPAN);
    assert_eq!(
        attr(op, "docket.operator.actor").as_deref(),
        Some("ops-alice")
    );
    assert_eq!(
        attr(op, "docket.operator.comment").as_deref(),
        Some("card unblocked")
    );
    assert_eq!(attr(op, "docket.run_id"), Some(run.id.to_string()));
    assert_eq!(op.links.len(), 1, "linked to the run's trace");
    assert_eq!(op.links[0].trace_id, run_trace);
    // The retried attempt stays in the run's trace.
    assert_eq!(attempt(3).trace_id, run_trace);
    assert_eq!(telemetry.spans_dropped(), 0);
}

/// An attempt whose worker died: the reaper ends it (lease expired) and
/// writes its span — the attempt's own span id, so the next attempt's link
/// leads somewhere — with the retry decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_ended_by_the_reaper_is_a_span_with_the_retry_decision() {
    let (collector, endpoint_url) = Collector::start().await;
    let (endpoint, url) = Endpoint::start(&[]).await;
    let (d, clock) = engine(&url);
    d.set_telemetry(
        Telemetry::otlp(TelemetryConfig {
            endpoint: Some(endpoint_url),
            ..Default::default()
        })
        .unwrap(),
    )
    .unwrap();
    let telemetry = d.telemetry().unwrap().clone();
    let run = d
        .trigger_with(
            "call",
            json!({}),
            TriggerOptions {
                trace: Some(caller_context()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run;
    // A worker claims attempt 1 and dies (it never reports back).
    let claimed = d
        .store()
        .claim(docket_store::ClaimRequest {
            jobs: vec!["call".into()],
            limit: 1,
            now: d.clock().now(),
            lease_ms: 5_000,
            worker: "doomed".into(),
            tenant: None,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let lease = claimed[0].lease_id.unwrap();
    clock.advance_millis(6_000);
    assert_eq!(d.reap_expired().await.unwrap(), 1);
    // Reaping again (another node, the same expired lease) adds no span.
    assert_eq!(d.reap_expired().await.unwrap(), 0);
    clock.advance_millis(1_000);
    let done = run_to_end(&d, &clock, run.id).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.attempt, 2);
    assert_eq!(endpoint.seen().len(), 1);
    flush(&telemetry).await.unwrap();

    let spans = collector.spans();
    let first = attempt_span_id(run.id, 1).to_bytes().to_vec();
    let reaped: Vec<&Span> = spans.iter().filter(|s| s.span_id == first).collect();
    assert_eq!(reaped.len(), 1, "one span for the reaped attempt");
    let reaped = reaped[0];
    assert_eq!(reaped.name, "docket attempt call");
    assert_eq!(hex(&reaped.trace_id), TRACE_ID);
    assert_eq!(
        attr(reaped, "docket.reaped").as_deref(),
        Some("BoolValue(true)")
    );
    assert_eq!(attr(reaped, "docket.worker").as_deref(), Some("doomed"));
    assert_eq!(attr(reaped, "docket.lease_id"), Some(lease.to_string()));
    assert_eq!(attr(reaped, "docket.attempt").as_deref(), Some("1"));
    assert_eq!(
        attr(reaped, "docket.outcome").as_deref(),
        Some("retry_scheduled")
    );
    assert_eq!(attr(reaped, "error.type").as_deref(), Some("lease_expired"));
    assert_eq!(
        attr(reaped, "docket.retry.delay_ms").as_deref(),
        Some("1000")
    );
    assert!(attr(reaped, "docket.retry.policy").is_some());
    assert!(attr(reaped, "docket.retry.eligible_at").is_some());
    let trigger = spans
        .iter()
        .find(|s| s.name == "docket trigger call")
        .expect("trigger span");
    assert_eq!(reaped.parent_span_id, trigger.span_id);
    // The next attempt links to it, as to any attempt before it.
    let second = spans
        .iter()
        .find(|s| s.span_id == attempt_span_id(run.id, 2).to_bytes().to_vec())
        .expect("attempt 2");
    assert_eq!(second.links.len(), 1);
    assert_eq!(second.links[0].span_id, first);
    assert_eq!(attr(second, "docket.outcome").as_deref(), Some("completed"));
}
