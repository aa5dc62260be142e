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
    Docket, ManualClock, RunStatus, Telemetry, TelemetryConfig, Timestamp, TraceContext,
    TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use std::collections::VecDeque;
use std::net::SocketAddr;
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
