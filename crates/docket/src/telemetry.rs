//! Traces: OpenTelemetry spans from the trigger, through every attempt, to
//! each outgoing request of an HTTP job (docs/OBSERVABILITY.md).
//!
//! Off unless a [`Telemetry`] is given to [`Docket::set_telemetry`]: the
//! engine then checks one `OnceLock` per attempt and builds nothing. On, it
//! exports with the OpenTelemetry SDK's batch processor (its own thread, a
//! bounded queue) over OTLP/HTTP (protobuf), so a collector that is slow or
//! down never blocks or fails a run; spans it could not export, and spans
//! that found the queue full, are counted ([`Telemetry::spans_dropped`],
//! `docket_trace_spans_dropped_total` in `/metrics`).
//!
//! Retries are new spans in the same trace: every attempt's parent is the
//! trace context the run was triggered in (stored with the run, so an
//! attempt next week still joins it), and each attempt after the first links
//! to the previous one. Attempt span ids are derived from (run id, attempt
//! number), so the link needs nothing stored per attempt and a worker that
//! died mid-attempt does not break the chain.
//!
//! [`Docket::set_telemetry`]: crate::Docket::set_telemetry

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use docket_core::{LeaseId, RunId};
use docket_store::{Outcome, Run};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;

pub use docket_store::TraceContext;

/// How to export traces. Everything left `None` comes from the standard
/// OpenTelemetry environment variables.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP traces URL, e.g. `http://localhost:4318/v1/traces`.
    /// `None`: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, else
    /// `http://localhost:4318/v1/traces`.
    pub endpoint: Option<String>,
    /// `service.name` when `OTEL_SERVICE_NAME` is not set (default `docket`).
    pub service_name: Option<String>,
    /// How long one export may take (default: `OTEL_EXPORTER_OTLP_TIMEOUT`,
    /// else 10 s). The export runs on the batch processor's thread, never
    /// on a run's.
    pub export_timeout: Option<Duration>,
}

/// Telemetry could not be set up (a bad endpoint URL, typically).
#[derive(Debug, thiserror::Error)]
#[error("traces: {0}")]
pub struct TelemetryError(String);

/// Spans exported and lost, shared by the exporter, the queue gate and
/// the metrics.
#[derive(Debug, Default)]
struct Counts {
    /// Spans the collector accepted.
    exported: AtomicU64,
    /// Spans whose export failed.
    dropped: AtomicU64,
    /// Spans the gate turned away because the queue was full.
    queue_full: AtomicU64,
    /// Spans the gate let into the SDK's queue.
    queued: AtomicU64,
    /// Spans the SDK handed to the exporter (they left its queue).
    handed: AtomicU64,
}

/// The trace exporter of one process: an OpenTelemetry tracer provider with
/// a batch processor and the OTLP/HTTP exporter.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    counts: Arc<Counts>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Exports over OTLP/HTTP (protobuf) as configured. The sampler is the
    /// SDK's (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; default
    /// parent-based always-on), as are the batch settings (`OTEL_BSP_*`).
    pub fn otlp(config: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        let exporter = match &config.endpoint {
            Some(e) => exporter.with_endpoint(e.clone()),
            None => exporter,
        };
        let exporter = match config.export_timeout {
            Some(t) => exporter.with_timeout(t),
            None => exporter,
        };
        let exporter = exporter
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        Ok(Self::with_exporter(exporter, config.service_name))
    }

    /// From the environment, the way every OpenTelemetry SDK reads it: on
    /// when `OTEL_TRACES_EXPORTER=otlp` or an OTLP endpoint variable is set,
    /// off (`None`) otherwise, and always off with `OTEL_SDK_DISABLED=true`
    /// or `OTEL_TRACES_EXPORTER=none`.
    pub fn from_env() -> Result<Option<Telemetry>, TelemetryError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let exporter = var("OTEL_TRACES_EXPORTER");
        let on = match exporter.as_deref() {
            Some("otlp") => true,
            Some("none") => false,
            Some(other) => {
                return Err(TelemetryError(format!(
                    "OTEL_TRACES_EXPORTER={other} is not supported: use otlp or none"
                )))
            }
            None => {
                var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                    || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
            }
        };
        if !on {
            return Ok(None);
        }
        if let Some(p) = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .filter(|p| p != "http/protobuf")
        {
            return Err(TelemetryError(format!(
                "OTLP protocol {p} is not supported: Docket exports http/protobuf"
            )));
        }
        Self::otlp(TelemetryConfig::default()).map(Some)
    }

    /// Any exporter (tests, or a vendor's exporter crate), batched the same
    /// way, its lost spans counted.
    pub fn with_exporter(
        exporter: impl SpanExporter + 'static,
        service_name: Option<String>,
    ) -> Telemetry {
        Self::with_exporter_queue(exporter, service_name, None)
    }

    /// [`Telemetry::with_exporter`] with a queue of `queue_size` spans
    /// (`None`: `OTEL_BSP_MAX_QUEUE_SIZE`, else the SDK's 2,048).
    pub fn with_exporter_queue(
        exporter: impl SpanExporter + 'static,
        service_name: Option<String>,
        queue_size: Option<usize>,
    ) -> Telemetry {
        let cap = queue_size.unwrap_or_else(env_queue_size).max(1);
        Self::assemble(exporter, service_name, BatchConfigBuilder::default(), cap)
    }

    /// The provider: the gate, the SDK's batch processor (`batch`, its
    /// queue set to `cap`) and the counting exporter.
    fn assemble(
        exporter: impl SpanExporter + 'static,
        service_name: Option<String>,
        batch: BatchConfigBuilder,
        cap: usize,
    ) -> Telemetry {
        let counts = Arc::new(Counts::default());
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.unwrap_or_else(|| "docket".into()));
        }
        let batch = BatchSpanProcessor::builder(Counting {
            inner: exporter,
            counts: counts.clone(),
        })
        .with_batch_config(batch.with_max_queue_size(cap).build())
        .build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_span_processor(Gate {
                inner: batch,
                cap: cap as u64,
                counts: counts.clone(),
            })
            .build();
        let tracer = provider.tracer("docket");
        Telemetry {
            provider,
            tracer,
            counts,
        }
    }

    /// Exports every span ended so far and waits for the answer. Blocking:
    /// call it from a blocking context (`spawn_blocking`), not a runtime
    /// thread.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        self.provider
            .force_flush()
            .map_err(|e| TelemetryError(e.to_string()))
    }

    /// Exports what is left and stops the exporter (blocking, as
    /// [`Telemetry::force_flush`]).
    pub fn shutdown(&self) -> Result<(), TelemetryError> {
        self.provider
            .shutdown()
            .map_err(|e| TelemetryError(e.to_string()))
    }

    /// Spans the collector accepted.
    pub fn spans_exported(&self) -> u64 {
        self.counts.exported.load(Ordering::Relaxed)
    }

    /// Spans lost: their export failed (collector down or refusing), or
    /// the queue was full when they ended (a collector slower than the span
    /// rate for longer than the queue lasts).
    pub fn spans_dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed) + self.spans_dropped_queue_full()
    }

    /// The part of [`Telemetry::spans_dropped`] that found the queue full.
    pub fn spans_dropped_queue_full(&self) -> u64 {
        self.counts.queue_full.load(Ordering::Relaxed)
    }

    /// The span of a trigger, a child of the caller's context when there is
    /// a valid one; its context is what the run stores.
    pub(crate) fn trigger(
        &self,
        job: &str,
        run: RunId,
        given: Option<&TraceContext>,
    ) -> TraceContext {
        let parent = given.and_then(extract).unwrap_or_default();
        let mut span = self
            .tracer
            .span_builder(format!("docket trigger {job}"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("docket.job", job.to_string()),
                KeyValue::new("docket.run_id", run.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        let sc = span.span_context().clone();
        span.end();
        inject(&sc)
    }

    /// Starts the span of one attempt: a child of the run's stored context
    /// (or, for a run triggered with traces off, in a trace whose id is the
    /// run id), linked to the previous attempt's span.
    pub(crate) fn attempt(&self, run: &Run, lease_id: LeaseId) -> Context {
        let parent = run.trace.as_ref().and_then(extract);
        let trace_id = parent
            .as_ref()
            .map(|p| p.span().span_context().trace_id())
            .unwrap_or_else(|| TraceId::from_bytes(run.id.0.into_bytes()));
        let mut b = self
            .tracer
            .span_builder(format!("docket attempt {}", run.job))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("docket.job", run.job.clone()),
                KeyValue::new("docket.run_id", run.id.to_string()),
                KeyValue::new("docket.attempt", i64::from(run.attempt)),
                KeyValue::new("docket.lease_id", lease_id.to_string()),
                KeyValue::new("docket.tenant", run.tenant.clone()),
            ]);
        b.trace_id = Some(trace_id);
        b.span_id = Some(attempt_span_id(run.id, run.attempt));
        if run.attempt > 1 {
            let prev = SpanContext::new(
                trace_id,
                attempt_span_id(run.id, run.attempt - 1),
                opentelemetry::trace::TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            );
            b = b.with_links(vec![Link::with_context(prev)]);
        }
        let span = b.start_with_context(&self.tracer, &parent.unwrap_or_default());
        Context::new().with_span(span)
    }

    /// The span of an attempt the reaper ended (its lease expired before
    /// the worker reported back): the attempt's own span id, parent and
    /// link, so the chain of attempts has no hole when the worker died
    /// (its span was never exported), with the reap's outcome and retry
    /// decision. Its times are the reap's: when the attempt really started
    /// is not known here.
    pub(crate) fn reaped(&self, run: &Run, lease_id: LeaseId, outcome: &Outcome) {
        let cx = self.attempt(run, lease_id);
        cx.span().set_attributes([
            KeyValue::new("docket.reaped", true),
            KeyValue::new("docket.worker", run.worker.clone().unwrap_or_default()),
        ]);
        end_attempt(&cx, outcome);
    }

    /// A client span for one outgoing request, a child of `parent`.
    pub(crate) fn request(
        &self,
        parent: &Context,
        purpose: &str,
        method: &str,
        url: &str,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(format!("{method} {purpose}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.full", url.to_string()),
                KeyValue::new("docket.purpose", purpose.to_string()),
            ])
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    /// The span of an operator action on `run` (retry, skip, approve, …),
    /// with who and the comment: a child of the caller's context when the
    /// command came with one (linked to the run's trace, so both traces
    /// lead to each other), else a span of the run's trace.
    pub(crate) fn operator(
        &self,
        run: &Run,
        command: &str,
        actor: &str,
        comment: Option<&str>,
        caller: Option<&TraceContext>,
        started: std::time::SystemTime,
    ) {
        let stored = run.trace.as_ref().and_then(extract);
        let caller = caller.and_then(extract);
        let link = match (&caller, &stored) {
            (Some(_), Some(s)) => Some(s.span().span_context().clone()),
            (Some(_), None) => Some(SpanContext::new(
                TraceId::from_bytes(run.id.0.into_bytes()),
                attempt_span_id(run.id, run.attempt.max(1)),
                opentelemetry::trace::TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            )),
            _ => None,
        };
        let parent = caller.or(stored);
        let mut b = self
            .tracer
            .span_builder(format!("docket operator {command}"))
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("docket.job", run.job.clone()),
                KeyValue::new("docket.run_id", run.id.to_string()),
                KeyValue::new("docket.operator.command", command.to_string()),
                KeyValue::new("docket.operator.actor", actor.to_string()),
                KeyValue::new("docket.status", run.status.to_string()),
            ]);
        if let Some(c) = comment {
            b.attributes
                .get_or_insert_with(Vec::new)
                .push(KeyValue::new("docket.operator.comment", c.to_string()));
        }
        if let Some(l) = link {
            b = b.with_links(vec![Link::with_context(l)]);
        }
        if parent.is_none() {
            b.trace_id = Some(TraceId::from_bytes(run.id.0.into_bytes()));
        }
        b.start_with_context(&self.tracer, &parent.unwrap_or_default())
            .end();
    }

    /// A child span of `parent` named `name` (a step, a ledger-guarded
    /// action).
    pub(crate) fn child(&self, parent: &Context, name: String, attrs: Vec<KeyValue>) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }
}

/// An attempt's trace, as its [`Ctx`](crate::Ctx) carries it.
#[derive(Clone, Debug, Default)]
pub(crate) enum AttemptTrace {
    /// Traces off and the run was triggered without a context.
    #[default]
    None,
    /// Traces off: the context the run was triggered in, passed on as is.
    Stored(TraceContext),
    /// Traces on: the attempt span's context.
    Span(Arc<Telemetry>, Context),
}

impl AttemptTrace {
    /// What an outgoing call sends.
    pub(crate) fn headers(&self) -> Option<TraceContext> {
        match self {
            AttemptTrace::None => None,
            AttemptTrace::Stored(t) => Some(t.clone()),
            AttemptTrace::Span(_, cx) => Some(headers_of(cx)),
        }
    }

    /// The OpenTelemetry context (empty when traces are off).
    pub(crate) fn otel(&self) -> Context {
        match self {
            AttemptTrace::Span(_, cx) => cx.clone(),
            _ => Context::new(),
        }
    }

    /// A child span of the attempt, when traces are on; `what` is only
    /// called then, so nothing is built when they are off.
    pub(crate) fn child(&self, what: impl FnOnce() -> (String, Vec<KeyValue>)) -> Option<Context> {
        match self {
            AttemptTrace::Span(t, cx) => {
                let (name, attrs) = what();
                Some(t.child(cx, name, attrs))
            }
            _ => None,
        }
    }

    /// A client span for an outgoing request, when traces are on.
    pub(crate) fn request(&self, purpose: &str, method: &str, url: &str) -> Option<Context> {
        match self {
            AttemptTrace::Span(t, cx) => Some(t.request(cx, purpose, method, url)),
            _ => None,
        }
    }
}

/// Ends a step's or action's span with how it went.
pub(crate) fn end_stepped<T>(
    span: Option<Context>,
    out: &Result<crate::Stepped<T>, crate::JobError>,
) {
    let Some(cx) = span else { return };
    let s = cx.span();
    match out {
        Ok(crate::Stepped::Done(_)) => s.set_attribute(KeyValue::new("docket.result", "done")),
        Ok(crate::Stepped::Skipped { .. }) => {
            s.set_attribute(KeyValue::new("docket.result", "skipped"))
        }
        Err(e) if e.control.is_some() => {
            // A suspension (input, postpone, in flight), not a failure.
            s.set_attribute(KeyValue::new("docket.result", "suspended"))
        }
        Err(e) => {
            s.set_attribute(KeyValue::new("error.type", e.class.as_str()));
            s.set_status(Status::error(e.message.clone()));
        }
    }
    s.end();
}

/// Sets `key` to `value` on a span, when there is one.
pub(crate) fn note(span: Option<&Context>, key: &'static str, value: &'static str) {
    if let Some(cx) = span {
        cx.span().set_attribute(KeyValue::new(key, value));
    }
}

/// Ends an attempt's span with its outcome and, for a failure, the error
/// class and the retry decision.
pub(crate) fn end_attempt(cx: &Context, outcome: &Outcome) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("docket.outcome", outcome.name()));
    let error = match outcome {
        Outcome::Retry { error, retry } => {
            span.set_attributes([
                KeyValue::new("docket.retry.policy", retry.policy.clone()),
                KeyValue::new("docket.retry.reason", retry.reason.as_str()),
                KeyValue::new("docket.retry.delay_ms", retry.delay_ms),
                KeyValue::new("docket.retry.eligible_at", retry.eligible_at.to_rfc3339()),
            ]);
            Some(error)
        }
        Outcome::Failed { error, reason, .. } => {
            span.set_attribute(KeyValue::new("docket.terminal_reason", reason.as_str()));
            error.as_ref()
        }
        _ => None,
    };
    if let Some(e) = error {
        span.set_attribute(KeyValue::new("error.type", e.class.as_str()));
        span.set_status(Status::error(e.message.clone()));
    }
    span.end();
}

/// Ends a request span: the response status, when there was a response,
/// and the error class when the exchange failed (transport or status).
pub(crate) fn end_request(cx: Context, status: Option<u16>, failed: Option<&str>) {
    let span = cx.span();
    if let Some(code) = status {
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
    }
    if let Some(class) = failed {
        span.set_attribute(KeyValue::new("error.type", class.to_string()));
        span.set_status(Status::error(class.to_string()));
    }
    span.end();
}

/// The W3C headers of `cx`'s span (to send on an outgoing request).
pub(crate) fn headers_of(cx: &Context) -> TraceContext {
    inject(&cx.span().span_context().clone())
}

/// A stored or given context, validated: `None` when its `traceparent` is
/// not a valid W3C header (the recommendation says to ignore it then and
/// start a new trace, not to refuse the request).
pub fn valid(given: TraceContext) -> Option<TraceContext> {
    // Written back by the propagator, so only what it understood (valid
    // header characters) is stored and later sent.
    extract(&given).map(|cx| inject(&cx.span().span_context().clone()))
}

/// The W3C headers of an OpenTelemetry context's span, to trigger a run in
/// it (`TriggerOptions::trace`), e.g. `trace_context_of(&Context::current())`
/// in an application that traces with OpenTelemetry. `None` when the
/// context has no valid span.
pub fn trace_context_of(cx: &Context) -> Option<TraceContext> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| inject(&sc))
}

fn extract(t: &TraceContext) -> Option<Context> {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_string(), t.traceparent.clone());
    if let Some(s) = &t.tracestate {
        carrier.insert("tracestate".to_string(), s.clone());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

fn inject(sc: &SpanContext) -> TraceContext {
    let cx = Context::new().with_remote_span_context(sc.clone());
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    TraceContext {
        traceparent: carrier.remove("traceparent").unwrap_or_default(),
        tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
    }
}

/// The span id of attempt `attempt` of `run`: FNV-1a over the run id and
/// the number, so the next attempt (on any worker, any day) can link to it
/// without reading anything. Never the invalid all-zero id.
pub fn attempt_span_id(run: RunId, attempt: u32) -> SpanId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run.0.as_bytes().iter().chain(attempt.to_be_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    SpanId::from_bytes(h.max(1).to_be_bytes())
}

/// `OTEL_BSP_MAX_QUEUE_SIZE` read as the SDK reads it (default 2,048), so
/// the gate and the SDK agree on the queue's size.
fn env_queue_size() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_048)
}

/// In front of the SDK's batch processor: counts the spans its queue would
/// drop, which the SDK counts privately. It lets a span in only while fewer
/// than `cap` spans are between it and the exporter (let in, not yet handed
/// to the exporter). That number is never below what the SDK's queue holds
/// (the SDK takes spans off its queue before handing them over), so the
/// SDK's queue never overflows: every lost span is turned away here, and
/// counted. The price: while a batch is being gathered, the gate may turn a
/// span away that the queue would still have taken (at most one batch's
/// worth, and only when the queue is nearly full anyway).
#[derive(Debug)]
struct Gate<P> {
    inner: P,
    cap: u64,
    counts: Arc<Counts>,
}

impl<P: SpanProcessor> SpanProcessor for Gate<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        // `handed` only grows, so reading it first can only overstate the
        // queue: the gate errs towards turning away, never overflowing.
        let handed = self.counts.handed.load(Ordering::Acquire);
        let admitted =
            self.counts
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                    (queued.saturating_sub(handed) < self.cap).then_some(queued + 1)
                });
        match admitted {
            Ok(_) => self.inner.on_end(span),
            Err(_) => {
                self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The SDK's exporter, counting what it exported and what it lost.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    counts: Arc<Counts>,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len() as u64;
        let counts = self.counts.clone();
        // These spans have left the SDK's queue: room for as many more.
        counts.handed.fetch_add(n, Ordering::Release);
        let fut = self.inner.export(batch);
        async move {
            let r = fut.await;
            match &r {
                Ok(()) => counts.exported.fetch_add(n, Ordering::Relaxed),
                Err(_) => counts.dropped.fetch_add(n, Ordering::Relaxed),
            };
            r
        }
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exporter that reports each call and then waits to be released.
    #[derive(Debug)]
    struct Held {
        called: std::sync::mpsc::SyncSender<usize>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl SpanExporter for Held {
        fn export(
            &self,
            batch: Vec<SpanData>,
        ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
            let _ = self.called.send(batch.len());
            // Bounded: a broken test fails instead of hanging.
            let _ = self
                .release
                .lock()
                .expect("release")
                .recv_timeout(Duration::from_secs(10));
            async { Ok(()) }
        }
    }

    #[test]
    fn spans_that_find_the_queue_full_are_counted_and_no_others_are_lost() {
        let (called_tx, called) = std::sync::mpsc::sync_channel(16);
        let (release, release_rx) = std::sync::mpsc::channel();
        let held = Held {
            called: called_tx,
            release: std::sync::Mutex::new(release_rx),
        };
        // A queue of 4, exported one span at a time.
        let t = Telemetry::assemble(
            held,
            None,
            BatchConfigBuilder::default().with_max_export_batch_size(1),
            4,
        );
        let end = |name: &str| t.tracer.start(name.to_string()).end();
        end("first");
        // The exporter has the first span and is stuck: the queue is empty.
        assert_eq!(called.recv_timeout(Duration::from_secs(10)), Ok(1));
        for i in 0..10 {
            end(&format!("span {i}"));
        }
        // Four fit in the queue; six found it full.
        assert_eq!(t.spans_dropped_queue_full(), 6);
        assert_eq!(t.spans_dropped(), 6);
        // Released, the exporter gets the first and the four queued: the
        // SDK itself dropped none.
        drop(release);
        t.force_flush().expect("flush");
        assert_eq!(t.spans_exported(), 5);
        assert_eq!(t.spans_dropped(), 6);
    }

    #[test]
    fn attempt_span_ids_differ_by_run_and_attempt_and_are_stable() {
        let a = RunId::new();
        let b = RunId::new();
        assert_eq!(attempt_span_id(a, 1), attempt_span_id(a, 1));
        assert_ne!(attempt_span_id(a, 1), attempt_span_id(a, 2));
        assert_ne!(attempt_span_id(a, 1), attempt_span_id(b, 1));
        assert_ne!(attempt_span_id(a, 1), SpanId::INVALID);
    }

    #[test]
    fn an_otel_context_becomes_the_headers_of_its_span() {
        assert_eq!(trace_context_of(&Context::new()), None);
        let given = valid(TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: Some("v=1".into()),
        })
        .unwrap();
        let cx = extract(&given).unwrap();
        assert_eq!(trace_context_of(&cx), Some(given));
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        let ok = TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: Some("v=1".into()),
        };
        assert_eq!(valid(ok.clone()), Some(ok));
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            let t = TraceContext {
                traceparent: bad.into(),
                tracestate: None,
            };
            assert_eq!(valid(t), None, "{bad}");
        }
    }
}
