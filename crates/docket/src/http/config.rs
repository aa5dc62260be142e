//! `docket.toml`: its format (see docs/HTTP_JOBS.md), parsed and checked
//! once at load. Every problem found is reported with its place
//! (`jobs.send-email.when`), all at once.

use super::breaker::BreakerConfig;
use super::classify::Classifier;
use super::condition::Condition;
use super::connections::{Auth, ConnectionDef, SecretSource};
use super::schema::InputSchema;
use super::template::{JsonTemplate, Templates};
use docket_core::RetryPolicy;
use reqwest::header::HeaderName;
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The idempotency key used when a job sets none: stable across the
/// attempts of one run, but NOT across two runs of the same intent. Set a
/// business-intent template instead, e.g.
/// `{{ input.prospect_id }}/send-email/{{ input.campaign }}/v1`.
pub const DEFAULT_KEY_TEMPLATE: &str = "{{ job }}/{{ run_id }}";

/// Default request timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Default cap on a response body kept as the action's result (1 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// A `docket.toml` that cannot be used: every problem, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfigError {
    /// The file (or `<string>`).
    pub file: String,
    /// (place, problem) pairs, e.g. (`jobs.send-email.when`, `cannot parse …`).
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for HttpConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        if self.problems.len() == 1 {
            let (place, problem) = &self.problems[0];
            return write!(f, "{place}: {problem}");
        }
        write!(f, "{} problems:", self.problems.len())?;
        for (place, problem) in &self.problems {
            write!(f, "\n  {place}: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for HttpConfigError {}

/// The file's two sections, each entry kept as TOML so that each is read
/// on its own: an unknown key in one job is reported with every other
/// problem, not as the one parse error that stops the rest.
#[derive(Debug, Deserialize, Default)]
struct FileConfig {
    #[serde(default)]
    connections: BTreeMap<String, toml::Value>,
    #[serde(default)]
    jobs: BTreeMap<String, toml::Value>,
    /// `[retention]`: how long final runs and the ledger are kept.
    retention: Option<toml::Value>,
}

/// A `retention` table: durations such as `"7d"` (see
/// [`parse_duration`](crate::retention::parse_duration)).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    completed: Option<String>,
    failed: Option<String>,
    cancelled: Option<String>,
    ledger: Option<String>,
    /// The pruner's pause between rounds (top-level table only).
    interval: Option<String>,
    /// Runs per pruning batch, i.e. per transaction (top-level only).
    batch: Option<i64>,
}

/// How the pruner runs, from the top-level `[retention]` table (`None`:
/// the pruner's default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrunerSettings {
    /// `interval`: the pause between two pruning rounds.
    pub interval_ms: Option<i64>,
    /// `batch`: runs (and ledger rows) per batch, 1 to 10,000.
    pub batch: Option<usize>,
}

/// The largest pruning batch: one transaction should stay short, since a
/// claim on SQLite waits behind it.
const MAX_PRUNE_BATCH: i64 = 10_000;

/// Parses the pruner's settings of the top-level table; refused in a job's.
fn pruner_settings(place: &str, r: &RawRetention, top: bool, p: &mut Problems) -> PrunerSettings {
    let mut out = PrunerSettings::default();
    if !top {
        for (key, set) in [
            ("interval", r.interval.is_some()),
            ("batch", r.batch.is_some()),
        ] {
            if set {
                p.add(
                    format!("{place}.{key}"),
                    "the pruner's settings are global: set them in the top-level [retention] table",
                );
            }
        }
        return out;
    }
    if let Some(v) = &r.interval {
        match crate::retention::parse_duration(v) {
            Ok(ms) => out.interval_ms = Some(ms),
            Err(e) => p.add(format!("{place}.interval"), e),
        }
    }
    if let Some(n) = r.batch {
        if (1..=MAX_PRUNE_BATCH).contains(&n) {
            out.batch = Some(n as usize);
        } else {
            p.add(
                format!("{place}.batch"),
                format!("must be 1 to {MAX_PRUNE_BATCH} runs per batch, not {n}"),
            );
        }
    }
    out
}

/// Parses one retention table at `place`; `ledger` only where allowed.
fn retention(
    place: &str,
    r: RawRetention,
    ledger_allowed: bool,
    p: &mut Problems,
) -> (crate::retention::Retention, Option<i64>) {
    // `interval` and `batch` are the pruner's (see `pruner_settings`).
    let mut one = |key: &str, v: &Option<String>| -> Option<i64> {
        let v = v.as_ref()?;
        match crate::retention::parse_duration(v) {
            Ok(ms) => Some(ms),
            Err(e) => {
                p.add(format!("{place}.{key}"), e);
                None
            }
        }
    };
    let out = crate::retention::Retention {
        completed_ms: one("completed", &r.completed),
        failed_ms: one("failed", &r.failed),
        cancelled_ms: one("cancelled", &r.cancelled),
    };
    let ledger = one("ledger", &r.ledger);
    if ledger.is_some() && !ledger_allowed {
        p.add(
            format!("{place}.ledger"),
            "the ledger has one window for every job: set it in the top-level [retention] table",
        );
    }
    (out, ledger)
}

/// One section's entry, or its shape problem recorded at its place.
fn entry<T: serde::de::DeserializeOwned>(
    place: String,
    v: toml::Value,
    p: &mut Problems,
) -> Option<T> {
    match v.try_into::<T>() {
        Ok(t) => Some(t),
        Err(e) => {
            p.add(place, e.message().trim().to_string());
            None
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    base_url: String,
    token_env: Option<String>,
    header: Option<String>,
    value_env: Option<String>,
    secrets_file: Option<String>,
    secret: Option<String>,
    #[serde(default)]
    breaker: BreakerConfig,
    rate_limit: Option<RawRate>,
    rate_limit_key: Option<String>,
}

/// `rate_limit = { per_second = 20, burst = 5 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: i64,
}

/// `debounce = { key = "{{ input.customer_id }}", window = "30s", keep = "last" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebounce {
    key: Option<String>,
    window: Option<String>,
    keep: Option<String>,
}

/// A job's checked debounce, or the problems named by field
/// (`jobs.sync.debounce.window`).
fn debounce(place: &str, raw: Option<RawDebounce>, p: &mut Problems) -> Option<crate::Debounce> {
    let raw = raw?;
    let field = format!("{place}.debounce");
    let Some(window) = raw.window else {
        p.add(
            format!("{field}.window"),
            "is required: how long after the first trigger later ones are collapsed (a duration like \"30s\")",
        );
        return None;
    };
    let Some(keep) = raw.keep else {
        p.add(
            format!("{field}.keep"),
            "is required: \"first\" (the first trigger runs at once, later ones in the window are dropped) or \"last\" (the run waits for the window to end and takes the last input)",
        );
        return None;
    };
    match crate::Debounce::parse(raw.key.as_deref(), &window, &keep) {
        Ok(d) => Some(d),
        Err((name, e)) => {
            p.add(format!("{field}.{name}"), e);
            None
        }
    }
}

/// A checked rate limit with its key template, or the problems named by
/// field (`connections.crm.rate_limit.per_second`).
fn rate(
    place: &str,
    raw: Option<RawRate>,
    key: Option<String>,
    p: &mut Problems,
) -> Option<crate::rate::RateSpec> {
    let key = match key {
        Some(t) => match crate::rate::KeyTemplate::parse(&t) {
            Ok(k) => Some(k),
            Err(e) => {
                p.add(format!("{place}.rate_limit_key"), e);
                None
            }
        },
        None => None,
    };
    let Some(r) = raw else {
        if key.is_some() {
            p.add(
                format!("{place}.rate_limit_key"),
                "needs a `rate_limit = { per_second = …, burst = … }`",
            );
        }
        return None;
    };
    let burst = match u32::try_from(r.burst) {
        Ok(b) => b,
        Err(_) => {
            p.add(
                format!("{place}.rate_limit.burst"),
                format!(
                    "must be from 1 to {}, got {}",
                    docket_core::rate::MAX_BURST,
                    r.burst
                ),
            );
            return None;
        }
    };
    match docket_core::RateLimit::new(r.per_second, burst) {
        Ok(limit) => Some(crate::rate::RateSpec { limit, key }),
        Err(e) => {
            p.add(format!("{place}.rate_limit.{}", e.field), e.problem);
            None
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    connection: Option<String>,
    method: Option<String>,
    path: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    action: Option<String>,
    timeout_ms: Option<u64>,
    job_timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    retry: Option<Value>,
    #[serde(default)]
    classify: BTreeMap<String, String>,
    input_schema: Option<Value>,
    input_schema_file: Option<String>,
    when: Option<String>,
    approval: Option<String>,
    on_reject: Option<String>,
    reconcile: Option<RawReconcile>,
    max_response_bytes: Option<usize>,
    concurrency: Option<usize>,
    /// At most this many runs per concurrency key run at once, across every
    /// process (docs/FLOW_CONTROL.md). `concurrency` is its older name.
    concurrency_limit: Option<usize>,
    /// The concurrency key template (`{{ tenant }}/{{ input.customer_id }}`);
    /// without it the key is the job's name.
    concurrency_key: Option<String>,
    rate_limit: Option<RawRate>,
    rate_limit_key: Option<String>,
    /// Collapses triggers with the same key within a window
    /// (docs/FLOW_CONTROL.md, "Debounce").
    debounce: Option<RawDebounce>,
    /// Served by remote workers over the worker protocol: only the policy
    /// keys apply (docs/WORKER_PROTOCOL.md, "Declaring remote jobs").
    remote: Option<bool>,
    retention: Option<RawRetention>,
    /// A workflow: HTTP requests, sleeps and signal waits in order
    /// (docs/HTTP_JOBS.md, "Workflows"), instead of one request.
    steps: Option<Vec<toml::Value>>,
}

/// One entry of a job's `steps`: exactly one of a request (`path` or
/// `url`), `sleep`, `sleep_until` or `wait_for_signal`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Option<String>,
    connection: Option<String>,
    method: Option<String>,
    path: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    classify: BTreeMap<String, String>,
    approval: Option<String>,
    on_reject: Option<String>,
    reconcile: Option<RawReconcile>,
    max_response_bytes: Option<usize>,
    when: Option<String>,
    sleep: Option<String>,
    sleep_until: Option<String>,
    wait_for_signal: Option<String>,
    key: Option<String>,
    timeout: Option<String>,
    on_timeout: Option<String>,
}

/// The request keys of a job or of a request step.
struct RawRequest {
    connection: Option<String>,
    method: Option<String>,
    path: Option<String>,
    url: Option<String>,
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    timeout_ms: Option<u64>,
    classify: BTreeMap<String, String>,
    when: Option<String>,
    approval: Option<String>,
    on_reject: Option<String>,
    reconcile: Option<RawReconcile>,
    max_response_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    method: Option<String>,
    path: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    found_when: Option<String>,
    found_pointer: Option<String>,
    not_found_when: Option<String>,
    timeout_ms: Option<u64>,
}

/// What a rejected approval means (`on_reject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReject {
    /// The run fails with terminal reason `rejected` (the default).
    Fail,
    /// The run completes without sending the request.
    Complete,
}

/// Where a request goes: a path under the connection's base URL, or an
/// absolute URL (a template name either way).
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Path(String),
    Url(String),
}

/// A request's method, target, headers and body (templates by name).
#[derive(Clone, Debug)]
pub(crate) struct RequestSpec {
    pub(crate) method: Method,
    pub(crate) target: Target,
    pub(crate) headers: Vec<(HeaderName, String)>,
    pub(crate) body: Option<Body>,
    pub(crate) timeout: Duration,
}

/// A request body: JSON (a TOML table / array / value) or text.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    Json(JsonTemplate),
    Text(String),
}

/// How a reconcile response is read.
#[derive(Debug)]
pub(crate) struct ReconcileSpec {
    pub(crate) request: RequestSpec,
    pub(crate) found_when: Option<Condition>,
    pub(crate) found_pointer: Option<String>,
    pub(crate) not_found_when: Condition,
}

/// One HTTP request as a job or a workflow step runs it, compiled.
#[derive(Debug)]
pub(crate) struct RequestStep {
    /// The action's name in the ledger, attempts and fingerprints (the
    /// job's `action` or name; a workflow step's name).
    pub(crate) action: String,
    pub(crate) connection: Option<String>,
    pub(crate) request: RequestSpec,
    pub(crate) key_template: String,
    pub(crate) classify: Classifier,
    /// A single-request job's `when` (a workflow step's is on its
    /// [`StepSpec`]).
    pub(crate) when: Option<Condition>,
    pub(crate) approval: Option<Condition>,
    pub(crate) on_reject: OnReject,
    pub(crate) reconcile: Option<ReconcileSpec>,
    pub(crate) max_response_bytes: usize,
}

/// What a signal wait that timed out means (`on_timeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    /// The run fails `permanent_error`, naming the step (the default).
    Fail,
    /// The workflow goes on; the step's result says `timed_out: true`.
    Continue,
}

/// How long a sleep step sleeps.
#[derive(Debug)]
pub(crate) enum SleepFor {
    /// `sleep = "1h"` (milliseconds).
    Millis(i64),
    /// `sleep_until`: a template (by name) rendering an RFC 3339 time.
    Until(String),
}

/// A `wait_for_signal` step.
#[derive(Debug)]
pub(crate) struct SignalStep {
    pub(crate) signal: String,
    /// The correlation key template (by name), if any.
    pub(crate) key: Option<String>,
    pub(crate) timeout_ms: i64,
    pub(crate) timeout_src: String,
    pub(crate) on_timeout: OnTimeout,
}

/// What a workflow step does.
#[derive(Debug)]
pub(crate) enum StepKind {
    Request(Box<RequestStep>),
    Sleep(SleepFor),
    Signal(SignalStep),
}

/// One step of a workflow job, compiled.
#[derive(Debug)]
pub(crate) struct StepSpec {
    pub(crate) name: String,
    pub(crate) when: Option<Condition>,
    pub(crate) kind: StepKind,
}

/// What a job does: one request, or a workflow of steps.
#[derive(Debug)]
pub(crate) enum Work {
    Single(Box<RequestStep>),
    Steps(Vec<StepSpec>),
}

/// One job, compiled.
#[derive(Debug)]
pub(crate) struct JobSpec {
    pub(crate) name: String,
    pub(crate) work: Work,
    pub(crate) job_timeout: Duration,
    pub(crate) lease: Duration,
    pub(crate) policy: RetryPolicy,
    pub(crate) schema: Option<Arc<InputSchema>>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) concurrency_key: Option<String>,
    /// The job's own rate limit (`rate_limit`, `rate_limit_key`).
    pub(crate) rate: Option<crate::rate::RateSpec>,
    /// The job's debounce (`debounce`).
    pub(crate) debounce: Option<crate::Debounce>,
}

impl JobSpec {
    /// Every connection the job's requests use.
    pub(crate) fn uses_connection(&self, name: &str) -> bool {
        match &self.work {
            Work::Single(r) => r.connection.as_deref() == Some(name),
            Work::Steps(steps) => steps.iter().any(|s| {
                matches!(&s.kind, StepKind::Request(r) if r.connection.as_deref() == Some(name))
            }),
        }
    }
}

/// A remote job (`remote = true`): its policy, without code.
#[derive(Debug)]
pub(crate) struct RemoteSpec {
    pub(crate) name: String,
    pub(crate) job_timeout: Duration,
    pub(crate) lease: Duration,
    pub(crate) policy: RetryPolicy,
    pub(crate) schema: Option<Arc<InputSchema>>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) concurrency_key: Option<String>,
    /// The job's debounce (`debounce`).
    pub(crate) debounce: Option<crate::Debounce>,
}

/// A whole configuration, compiled.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) templates: Templates,
    pub(crate) connections: BTreeMap<String, ConnectionDef>,
    pub(crate) jobs: BTreeMap<String, JobSpec>,
    pub(crate) remote: BTreeMap<String, RemoteSpec>,
    pub(crate) retention: crate::retention::RetentionConfig,
    pub(crate) pruner: PrunerSettings,
}

const RETRY_KEYS: &[&str] = &[
    "name",
    "base_delay_ms",
    "multiplier",
    "max_delay_ms",
    "max_attempts",
    "jitter_ms",
    "overrides",
];

struct Problems(Vec<(String, String)>);

impl Problems {
    fn add(&mut self, place: impl Into<String>, problem: impl Into<String>) {
        self.0.push((place.into(), problem.into()));
    }
}

/// Parses and checks a configuration. Relative file names
/// (`secrets_file`, `input_schema_file`) are taken from `base_dir`.
pub(crate) fn compile(
    text: &str,
    file: &str,
    base_dir: &Path,
) -> Result<Compiled, HttpConfigError> {
    let fail = |problems| HttpConfigError {
        file: file.to_string(),
        problems,
    };
    let raw: FileConfig =
        toml::from_str(text).map_err(|e| fail(vec![("toml".into(), e.to_string())]))?;
    let mut p = Problems(Vec::new());
    let mut templates = Templates::new();
    // Declared, even if invalid: a job naming an invalid connection should
    // not also be told the connection does not exist.
    let declared: std::collections::BTreeSet<String> = raw.connections.keys().cloned().collect();
    let mut connections = BTreeMap::new();
    for (name, v) in raw.connections {
        let Some(c) = entry::<RawConnection>(format!("connections.{name}"), v, &mut p) else {
            continue;
        };
        if let Some(def) = connection(&name, c, base_dir, &mut p) {
            connections.insert(name, def);
        }
    }
    let mut keep = crate::retention::RetentionConfig::default();
    let mut pruner = PrunerSettings::default();
    if let Some(v) = raw.retention {
        if let Some(r) = entry::<RawRetention>("retention".into(), v, &mut p) {
            pruner = pruner_settings("retention", &r, true, &mut p);
            let (default, ledger) = retention("retention", r, true, &mut p);
            keep.default = default;
            keep.ledger_ms = ledger;
        }
    }
    let mut jobs = BTreeMap::new();
    let mut remote = BTreeMap::new();
    for (name, v) in raw.jobs {
        let Some(mut j) = entry::<RawJob>(format!("jobs.{name}"), v, &mut p) else {
            continue;
        };
        if let Some(r) = j.retention.take() {
            let place = format!("jobs.{name}.retention");
            pruner_settings(&place, &r, false, &mut p);
            let (own, _) = retention(&place, r, false, &mut p);
            keep.jobs.insert(name.clone(), own);
        }
        if j.remote == Some(true) {
            if let Some(spec) = remote_job(&name, j, base_dir, &mut p) {
                remote.insert(name, spec);
            }
            continue;
        }
        if let Some(spec) = job(&name, j, &declared, base_dir, &mut templates, &mut p) {
            jobs.insert(name, spec);
        }
    }
    if p.0.is_empty() {
        if let Err(e) = keep.validate() {
            p.add("retention", e);
        }
    }
    if !p.0.is_empty() {
        return Err(fail(p.0));
    }
    Ok(Compiled {
        templates,
        connections,
        jobs,
        remote,
        retention: keep,
        pruner,
    })
}

/// A remote job: the policy keys only (`retry`, `job_timeout_ms`,
/// `lease_ms`, `input_schema` or `input_schema_file`, `concurrency`); an
/// HTTP job's keys are refused by name, since nothing would use them.
fn remote_job(name: &str, mut j: RawJob, base: &Path, p: &mut Problems) -> Option<RemoteSpec> {
    let place = format!("jobs.{name}");
    let before = p.0.len();
    let (concurrency, concurrency_key) = flow(&place, &j, p);
    let debounce = debounce(&place, j.debounce.take(), p);
    if name.is_empty() || name.len() > 200 {
        p.add(&place, "a job name must be 1 to 200 characters");
    }
    let http_keys = [
        ("connection", j.connection.is_some()),
        ("method", j.method.is_some()),
        ("path", j.path.is_some()),
        ("url", j.url.is_some()),
        ("headers", !j.headers.is_empty()),
        ("body", j.body.is_some()),
        ("idempotency_key", j.idempotency_key.is_some()),
        ("action", j.action.is_some()),
        ("timeout_ms", j.timeout_ms.is_some()),
        ("classify", !j.classify.is_empty()),
        ("when", j.when.is_some()),
        ("approval", j.approval.is_some()),
        ("on_reject", j.on_reject.is_some()),
        ("reconcile", j.reconcile.is_some()),
        ("max_response_bytes", j.max_response_bytes.is_some()),
        ("rate_limit", j.rate_limit.is_some()),
        ("rate_limit_key", j.rate_limit_key.is_some()),
        ("steps", j.steps.is_some()),
    ];
    for (key, set) in http_keys {
        if set {
            p.add(
                format!("{place}.{key}"),
                "a remote job (`remote = true`) runs its code in a remote worker: only `retry`, `job_timeout_ms`, `lease_ms`, `input_schema`/`input_schema_file`, `concurrency_limit` (or `concurrency`), `concurrency_key` and `debounce` apply",
            );
        }
    }
    let policy = policy(&format!("{place}.retry"), name, j.retry, p);
    let schema = input_schema(&place, j.input_schema, j.input_schema_file, base, p);
    const MAX_LEASE_MS: u64 = 366 * 86_400_000;
    let job_timeout_ms = j.job_timeout_ms.unwrap_or(60_000);
    let lease_ms = j
        .lease_ms
        .unwrap_or((job_timeout_ms.min(MAX_LEASE_MS) * 2).max(5 * 60 * 1_000));
    if job_timeout_ms == 0 {
        p.add(format!("{place}.job_timeout_ms"), "must be positive");
    }
    for (field, v) in [("job_timeout_ms", job_timeout_ms), ("lease_ms", lease_ms)] {
        if v > MAX_LEASE_MS {
            p.add(
                format!("{place}.{field}"),
                format!("must be at most {MAX_LEASE_MS} ms (366 days)"),
            );
        }
    }
    if lease_ms <= job_timeout_ms {
        p.add(
            format!("{place}.lease_ms"),
            format!("must be longer than the job timeout ({job_timeout_ms} ms)"),
        );
    }
    (p.0.len() == before).then(|| RemoteSpec {
        name: name.to_string(),
        job_timeout: Duration::from_millis(job_timeout_ms),
        lease: Duration::from_millis(lease_ms),
        policy,
        schema,
        concurrency,
        concurrency_key,
        debounce,
    })
}

/// A job's concurrency limit and key template, checked: a limit of 0, a key
/// without a limit, an unknown template variable, or `concurrency` and
/// `concurrency_limit` disagreeing are refused naming the field.
fn flow(place: &str, j: &RawJob, p: &mut Problems) -> (Option<usize>, Option<String>) {
    let limit = match (j.concurrency, j.concurrency_limit) {
        (Some(a), Some(b)) if a != b => {
            p.add(
                format!("{place}.concurrency_limit"),
                "differs from `concurrency` (its older name): give one",
            );
            None
        }
        (a, b) => b.or(a),
    };
    let field = if j.concurrency_limit.is_some() {
        "concurrency_limit"
    } else {
        "concurrency"
    };
    if limit == Some(0) {
        p.add(format!("{place}.{field}"), "must be at least 1");
    }
    if let Some(t) = &j.concurrency_key {
        if limit.is_none() {
            p.add(
                format!("{place}.concurrency_key"),
                "needs `concurrency_limit` (how many runs per key may run at once)",
            );
        }
        if let Err(e) = docket_core::concurrency::KeyTemplate::parse(t) {
            p.add(format!("{place}.concurrency_key"), e.0);
        }
    }
    (limit, j.concurrency_key.clone())
}

/// A job's input schema, inline or from a file (relative to `base`).
fn input_schema(
    place: &str,
    inline: Option<Value>,
    file: Option<String>,
    base: &Path,
    p: &mut Problems,
) -> Option<Arc<InputSchema>> {
    let schema_value = match (inline, file) {
        (Some(s), None) => Some(s),
        (None, Some(f)) => {
            let path = resolve_path(base, &f);
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
            {
                Ok(v) => Some(v),
                Err(e) => {
                    p.add(
                        format!("{place}.input_schema_file"),
                        format!("{}: {e}", path.display()),
                    );
                    None
                }
            }
        }
        (Some(_), Some(_)) => {
            p.add(
                place,
                "give `input_schema` or `input_schema_file`, not both",
            );
            None
        }
        (None, None) => None,
    };
    schema_value.and_then(|s| match InputSchema::compile(s) {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            p.add(format!("{place}.input_schema"), e);
            None
        }
    })
}

fn resolve_path(base: &Path, f: &str) -> PathBuf {
    let p = PathBuf::from(f);
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

fn connection(
    name: &str,
    c: RawConnection,
    base: &Path,
    p: &mut Problems,
) -> Option<ConnectionDef> {
    let place = format!("connections.{name}");
    let before = p.0.len();
    match reqwest::Url::parse(&c.base_url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        Ok(u) => p.add(
            format!("{place}.base_url"),
            format!("scheme `{}` is not http or https", u.scheme()),
        ),
        Err(e) => p.add(
            format!("{place}.base_url"),
            format!("`{}`: {e}", c.base_url),
        ),
    }
    let source = match (&c.token_env, &c.value_env, &c.secrets_file, &c.secret) {
        (None, None, None, None) => None,
        (Some(v), None, None, None) | (None, Some(v), None, None) => {
            Some(SecretSource::Env(v.clone()))
        }
        (None, None, Some(f), Some(k)) => Some(SecretSource::File {
            path: resolve_path(base, f),
            key: k.clone(),
        }),
        (None, None, Some(_), None) => {
            p.add(
                &place,
                "`secrets_file` needs `secret`, the key to read from it",
            );
            None
        }
        (None, None, None, Some(_)) => {
            p.add(&place, "`secret` needs `secrets_file`");
            None
        }
        _ => {
            p.add(
                &place,
                "give one credential source: `token_env`, `value_env` (with `header`), or `secrets_file` with `secret`",
            );
            None
        }
    };
    if c.value_env.is_some() && c.header.is_none() {
        p.add(
            &place,
            "`value_env` needs `header`, the header that carries it",
        );
    }
    let auth = match (c.header, source) {
        (None, None) => Auth::None,
        (None, Some(s)) => Auth::Bearer(s),
        (Some(h), Some(s)) => match HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => Auth::Header { name, source: s },
            Err(_) => {
                p.add(
                    format!("{place}.header"),
                    format!("`{h}` is not a header name"),
                );
                Auth::None
            }
        },
        (Some(_), None) => {
            p.add(
                &place,
                "`header` needs a credential source (`value_env` or `secrets_file` with `secret`)",
            );
            Auth::None
        }
    };
    if c.breaker.failures > 0 && (c.breaker.window_ms == 0 || c.breaker.open_ms == 0) {
        p.add(
            format!("{place}.breaker"),
            "`window_ms` and `open_ms` must be positive (or set `failures = 0` to disable the breaker)",
        );
    }
    let rate = rate(&place, c.rate_limit, c.rate_limit_key, p);
    (p.0.len() == before).then(|| ConnectionDef {
        name: name.to_string(),
        base_url: c.base_url,
        auth,
        breaker: c.breaker,
        rate,
    })
}

fn method(place: &str, m: Option<&str>, default: Method, p: &mut Problems) -> Method {
    match m {
        None => default,
        Some(m) => match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                p.add(place, format!("`{m}` is not an HTTP method"));
                default
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn request_spec(
    place: &str,
    method: Method,
    path: Option<String>,
    url: Option<String>,
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    timeout_ms: u64,
    has_connection: bool,
    templates: &mut Templates,
    p: &mut Problems,
) -> RequestSpec {
    let target = match (path, url) {
        (Some(path), None) if has_connection => {
            let n = format!("{place}.path");
            if let Err(e) = templates.add(&n, &path) {
                p.add(&n, e);
            }
            Target::Path(n)
        }
        (Some(_), None) => {
            p.add(
                format!("{place}.path"),
                "`path` needs a `connection` (its base URL); use `url` for an absolute URL",
            );
            Target::Path(String::new())
        }
        (None, Some(url)) => {
            let n = format!("{place}.url");
            if let Err(e) = templates.add(&n, &url) {
                p.add(&n, e);
            }
            Target::Url(n)
        }
        (None, None) => {
            p.add(
                place,
                "give `path` (under the connection's base URL) or `url`",
            );
            Target::Path(String::new())
        }
        (Some(_), Some(_)) => {
            p.add(place, "give `path` or `url`, not both");
            Target::Path(String::new())
        }
    };
    let mut hs = Vec::new();
    for (k, v) in headers {
        let n = format!("{place}.headers.{k}");
        match HeaderName::from_bytes(k.as_bytes()) {
            Ok(h) if h.as_str() == "idempotency-key" => p.add(
                &n,
                "Docket sets Idempotency-Key itself from `idempotency_key`",
            ),
            Ok(h) => {
                if let Err(e) = templates.add(&n, &v) {
                    p.add(&n, e);
                }
                hs.push((h, n));
            }
            Err(_) => p.add(&n, format!("`{k}` is not a header name")),
        }
    }
    let body = body.map(|b| {
        let n = format!("{place}.body");
        match b {
            Value::String(s) => {
                if let Err(e) = templates.add(&n, &s) {
                    p.add(&n, e);
                }
                Body::Text(n)
            }
            other => match templates.add_json(&n, &other) {
                Ok(t) => Body::Json(t),
                Err(e) => {
                    p.add(&n, e);
                    Body::Json(JsonTemplate::Literal(Value::Null))
                }
            },
        }
    });
    if timeout_ms == 0 {
        p.add(format!("{place}.timeout_ms"), "must be positive");
    }
    RequestSpec {
        method,
        target,
        headers: hs,
        body,
        timeout: Duration::from_millis(timeout_ms.max(1)),
    }
}

fn condition(
    place: String,
    src: Option<String>,
    roots: &[&str],
    p: &mut Problems,
) -> Option<Condition> {
    let src = src?;
    match Condition::compile(&src, roots) {
        Ok(c) => Some(c),
        Err(e) => {
            p.add(place, e);
            None
        }
    }
}

fn policy(place: &str, job: &str, raw: Option<Value>, p: &mut Problems) -> RetryPolicy {
    let Some(raw) = raw else {
        return RetryPolicy::default();
    };
    let Value::Object(map) = &raw else {
        p.add(place, "must be a table");
        return RetryPolicy::default();
    };
    for k in map.keys() {
        if !RETRY_KEYS.contains(&k.as_str()) {
            p.add(
                format!("{place}.{k}"),
                format!("unknown field; expected one of {}", RETRY_KEYS.join(", ")),
            );
        }
    }
    let named = map.contains_key("name");
    match serde_json::from_value::<RetryPolicy>(raw) {
        Ok(mut policy) => {
            if !named {
                policy.name = job.to_string();
            }
            if let Err(e) = policy.validate() {
                p.add(place, e.to_string());
            }
            policy
        }
        Err(e) => {
            p.add(place, e.to_string());
            RetryPolicy::default()
        }
    }
}

/// The request part of a job or of a request step at `place`: target,
/// headers, body, key template (`default_key` when none is given),
/// conditions, reconcile, classification. `roots` are the names conditions
/// may read.
#[allow(clippy::too_many_arguments)]
fn request_step(
    place: &str,
    action: String,
    r: RawRequest,
    default_key: String,
    roots: &[&str],
    declared: &std::collections::BTreeSet<String>,
    templates: &mut Templates,
    p: &mut Problems,
) -> RequestStep {
    let before = p.0.len();
    if let Some(c) = &r.connection {
        if !declared.contains(c) {
            let known: Vec<&str> = declared.iter().map(String::as_str).collect();
            p.add(
                format!("{place}.connection"),
                format!(
                    "no connection `{c}` is declared (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }
    let timeout_ms = r.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    let m = method(
        &format!("{place}.method"),
        r.method.as_deref(),
        Method::POST,
        p,
    );
    let request = request_spec(
        place,
        m,
        r.path,
        r.url,
        r.headers,
        r.body,
        timeout_ms,
        r.connection.is_some(),
        templates,
        p,
    );
    let key_template = format!("{place}.idempotency_key");
    let key_src = r.idempotency_key.unwrap_or(default_key);
    if let Err(e) = templates.add(&key_template, &key_src) {
        p.add(&key_template, e);
    }
    let when = condition(format!("{place}.when"), r.when, roots, p);
    let approval = condition(format!("{place}.approval"), r.approval, roots, p);
    let on_reject = match r.on_reject.as_deref() {
        None | Some("fail") => OnReject::Fail,
        Some("complete") => OnReject::Complete,
        Some(other) => {
            p.add(
                format!("{place}.on_reject"),
                format!("`{other}`: expected `fail` or `complete`"),
            );
            OnReject::Fail
        }
    };
    if approval.is_none() && r.on_reject.is_some() && p.0.len() == before {
        p.add(
            format!("{place}.on_reject"),
            "only meaningful with `approval`",
        );
    }
    let has_connection = r.connection.is_some();
    let reconcile = r.reconcile.map(|r| {
        let rp = format!("{place}.reconcile");
        let m = method(&format!("{rp}.method"), r.method.as_deref(), Method::GET, p);
        let request = request_spec(
            &rp,
            m,
            r.path,
            r.url,
            r.headers,
            None,
            r.timeout_ms.unwrap_or(timeout_ms),
            has_connection,
            templates,
            p,
        );
        let response_roots = &["status", "body"];
        let found_when = condition(format!("{rp}.found_when"), r.found_when, response_roots, p);
        if let Some(ptr) = &r.found_pointer {
            if !(ptr.is_empty() || ptr.starts_with('/')) {
                p.add(
                    format!("{rp}.found_pointer"),
                    format!("`{ptr}` is not a JSON pointer (it starts with `/`)"),
                );
            }
        }
        let not_found_when = condition(
            format!("{rp}.not_found_when"),
            Some(r.not_found_when.unwrap_or_else(|| "status == 404".into())),
            response_roots,
            p,
        )
        .unwrap_or_else(|| Condition::compile("status == 404", response_roots).expect("valid"));
        ReconcileSpec {
            request,
            found_when,
            found_pointer: r.found_pointer,
            not_found_when,
        }
    });
    let classify = match Classifier::parse(&r.classify) {
        Ok(c) => c,
        Err(e) => {
            p.add(format!("{place}.classify"), e);
            Classifier::default()
        }
    };
    let max_response_bytes = r.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if max_response_bytes == 0 {
        p.add(format!("{place}.max_response_bytes"), "must be positive");
    }
    RequestStep {
        action,
        connection: r.connection,
        request,
        key_template,
        classify,
        when,
        approval,
        on_reject,
        reconcile,
        max_response_bytes,
    }
}

impl RequestStep {
    /// The most one send of this request may take: its timeout plus its
    /// reconcile lookup's.
    fn needed_ms(&self) -> u64 {
        self.request.timeout.as_millis() as u64
            + self
                .reconcile
                .as_ref()
                .map(|r| r.request.timeout.as_millis() as u64)
                .unwrap_or(0)
    }
}

fn job(
    name: &str,
    j: RawJob,
    declared: &std::collections::BTreeSet<String>,
    base: &Path,
    templates: &mut Templates,
    p: &mut Problems,
) -> Option<JobSpec> {
    let place = format!("jobs.{name}");
    let before = p.0.len();
    let (concurrency, concurrency_key) = flow(&place, &j, p);
    if name.is_empty() || name.len() > 200 {
        p.add(&place, "a job name must be 1 to 200 characters");
    }
    let policy = policy(&format!("{place}.retry"), name, j.retry.clone(), p);
    let schema = input_schema(
        &place,
        j.input_schema.clone(),
        j.input_schema_file.clone(),
        base,
        p,
    );
    let rate = rate(&place, j.rate_limit, j.rate_limit_key.clone(), p);
    let connection = j.connection.clone();
    let job_timeout_given = j.job_timeout_ms;
    let lease_given = j.lease_ms;
    let (work, needed) = match j.steps {
        Some(raw_steps) => {
            let request_keys = [
                ("method", j.method.is_some()),
                ("path", j.path.is_some()),
                ("url", j.url.is_some()),
                ("headers", !j.headers.is_empty()),
                ("body", j.body.is_some()),
                ("idempotency_key", j.idempotency_key.is_some()),
                ("action", j.action.is_some()),
                ("timeout_ms", j.timeout_ms.is_some()),
                ("classify", !j.classify.is_empty()),
                ("when", j.when.is_some()),
                ("approval", j.approval.is_some()),
                ("on_reject", j.on_reject.is_some()),
                ("reconcile", j.reconcile.is_some()),
                ("max_response_bytes", j.max_response_bytes.is_some()),
            ];
            for (key, set) in request_keys {
                if set {
                    p.add(
                        format!("{place}.{key}"),
                        "a job with `steps` sends its requests in its steps: put this key in the step it belongs to",
                    );
                }
            }
            if rate.is_some() {
                p.add(
                    format!("{place}.rate_limit"),
                    "a job with `steps` takes no job-wide rate limit (it would be taken at every wake-up, not per request): give the connection a `rate_limit`, taken before each request",
                );
            }
            if let Some(c) = &connection {
                if !declared.contains(c) {
                    p.add(
                        format!("{place}.connection"),
                        format!("no connection `{c}` is declared"),
                    );
                }
            }
            let steps = workflow_steps(
                name,
                &place,
                raw_steps,
                connection.as_deref(),
                declared,
                templates,
                p,
            );
            let needed: u64 = steps
                .iter()
                .map(|s| match &s.kind {
                    StepKind::Request(r) => r.needed_ms(),
                    _ => 0,
                })
                .sum();
            (Work::Steps(steps), needed)
        }
        None => {
            let action = j.action.clone().unwrap_or_else(|| name.to_string());
            if action.is_empty() || action.starts_with("input:") {
                p.add(
                    format!("{place}.action"),
                    "must be non-empty and not start with `input:`",
                );
            }
            let r = request_step(
                &place,
                action,
                RawRequest {
                    connection: j.connection,
                    method: j.method,
                    path: j.path,
                    url: j.url,
                    headers: j.headers,
                    body: j.body,
                    idempotency_key: j.idempotency_key,
                    timeout_ms: j.timeout_ms,
                    classify: j.classify,
                    when: j.when,
                    approval: j.approval,
                    on_reject: j.on_reject,
                    reconcile: j.reconcile,
                    max_response_bytes: j.max_response_bytes,
                },
                DEFAULT_KEY_TEMPLATE.to_string(),
                &["input", "variables"],
                declared,
                templates,
                p,
            );
            let needed = r.needed_ms();
            (Work::Single(Box::new(r)), needed)
        }
    };
    let job_timeout_ms = job_timeout_given.unwrap_or(needed + 5_000);
    if job_timeout_ms <= needed {
        p.add(
            format!("{place}.job_timeout_ms"),
            format!("{job_timeout_ms} ms leaves no time after the request and reconcile timeouts ({needed} ms)"),
        );
    }
    // A lease (and so a job timeout) of at most 366 days keeps every
    // computed time inside the RFC 3339 range (and `* 2` from overflowing).
    const MAX_LEASE_MS: u64 = 366 * 86_400_000;
    for (field, v) in [
        ("job_timeout_ms", Some(job_timeout_ms)),
        ("lease_ms", lease_given),
    ] {
        if v.is_some_and(|v| v > MAX_LEASE_MS) {
            p.add(
                format!("{place}.{field}"),
                format!("must be at most {MAX_LEASE_MS} ms (366 days)"),
            );
        }
    }
    let lease_ms =
        lease_given.unwrap_or((job_timeout_ms.min(MAX_LEASE_MS) * 2).max(5 * 60 * 1_000));
    if lease_ms <= job_timeout_ms {
        p.add(
            format!("{place}.lease_ms"),
            format!("must be longer than the job timeout ({job_timeout_ms} ms)"),
        );
    }
    let debounce = debounce(&place, j.debounce, p);
    (p.0.len() == before).then(|| JobSpec {
        name: name.to_string(),
        work,
        job_timeout: Duration::from_millis(job_timeout_ms),
        lease: Duration::from_millis(lease_ms),
        policy,
        schema,
        concurrency,
        concurrency_key,
        rate,
        debounce,
    })
}

/// The most steps a workflow job may declare.
pub const MAX_STEPS: usize = 100;

/// A step name: an identifier, so that templates can read
/// `steps.NAME.body.id`.
fn valid_step_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && n.len() <= 64
}

/// A step's duration (`sleep`, `timeout`): a positive integer and one unit,
/// `ms`, `s`, `m`, `h`, `d` or `w` (`"3d"`, `"90m"`).
fn step_duration(text: &str) -> Result<i64, String> {
    let digits = text.chars().take_while(|c| c.is_ascii_digit()).count();
    let (num, unit) = text.split_at(digits);
    let mult: i64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => 0,
    };
    if num.is_empty() || mult == 0 {
        return Err(format!(
            "`{text}` is not a duration: write a positive integer and a unit (ms, s, m, h, d, w), e.g. \"3d\""
        ));
    }
    match num.parse::<i64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(0) => Err(format!("`{text}` is zero: a duration must be positive")),
        Some(ms) if ms <= 100 * 366 * 86_400_000 => Ok(ms),
        _ => Err(format!("`{text}` is too long: at most 100 years")),
    }
}

/// The steps of a workflow job, checked: names (identifiers, unique), one
/// kind each with only its keys, a key template per request step that no
/// other step shares, and templates that read only earlier steps.
#[allow(clippy::too_many_arguments)]
fn workflow_steps(
    job: &str,
    place: &str,
    raw: Vec<toml::Value>,
    job_connection: Option<&str>,
    declared: &std::collections::BTreeSet<String>,
    templates: &mut Templates,
    p: &mut Problems,
) -> Vec<StepSpec> {
    if raw.is_empty() {
        p.add(format!("{place}.steps"), "needs at least one step");
    }
    if raw.len() > MAX_STEPS {
        p.add(
            format!("{place}.steps"),
            format!("has {} steps; at most {MAX_STEPS}", raw.len()),
        );
    }
    // The names first, so that every reference can be checked.
    let mut parsed: Vec<(String, Option<RawStep>)> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, v) in raw.into_iter().enumerate() {
        let at = format!("{place}.steps[{i}]");
        let Some(s) = entry::<RawStep>(at.clone(), v, p) else {
            parsed.push((at, None));
            names.push(String::new());
            continue;
        };
        let name = s.name.clone().unwrap_or_default();
        let sp = if s.name.is_none() {
            p.add(
                format!("{at}.name"),
                "every step needs a `name` (later steps read its result as `steps.NAME`)",
            );
            at
        } else if !valid_step_name(&name) {
            p.add(
                format!("{at}.name"),
                format!("`{name}` is not a step name: use letters, digits and `_`, starting with a letter or `_` (at most 64), so templates can read `steps.{name}`"),
            );
            at
        } else if let Some(first) = names.iter().position(|n| *n == name) {
            p.add(
                format!("{at}.name"),
                format!("step `{name}` is declared twice (steps[{first}] and steps[{i}]): step names must be unique in a job"),
            );
            at
        } else {
            format!("{place}.steps.{name}")
        };
        names.push(name);
        parsed.push((sp, Some(s)));
    }
    let roots = &["input", "variables", "steps"];
    let mut out = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for (i, (sp, s)) in parsed.into_iter().enumerate() {
        let Some(s) = s else { continue };
        let before = p.0.len();
        let name = names[i].clone();
        let kinds: Vec<&str> = [
            (
                s.path.is_some() || s.url.is_some(),
                "a request (`path`/`url`)",
            ),
            (s.sleep.is_some(), "a `sleep`"),
            (s.sleep_until.is_some(), "a `sleep_until`"),
            (s.wait_for_signal.is_some(), "a `wait_for_signal`"),
        ]
        .into_iter()
        .filter_map(|(set, what)| set.then_some(what))
        .collect();
        if kinds.len() != 1 {
            p.add(
                &sp,
                if kinds.is_empty() {
                    "a step is one of: a request (`path` or `url`), `sleep`, `sleep_until` or `wait_for_signal`; this one is none".to_string()
                } else {
                    format!(
                        "a step does one thing, but this one is {}: split it into steps",
                        kinds.join(" and ")
                    )
                },
            );
            continue;
        }
        let is_request = s.path.is_some() || s.url.is_some();
        let is_wait = s.wait_for_signal.is_some();
        if !is_request {
            for (key, set) in [
                ("connection", s.connection.is_some()),
                ("method", s.method.is_some()),
                ("headers", !s.headers.is_empty()),
                ("body", s.body.is_some()),
                ("idempotency_key", s.idempotency_key.is_some()),
                ("timeout_ms", s.timeout_ms.is_some()),
                ("classify", !s.classify.is_empty()),
                ("approval", s.approval.is_some()),
                ("on_reject", s.on_reject.is_some()),
                ("reconcile", s.reconcile.is_some()),
                ("max_response_bytes", s.max_response_bytes.is_some()),
            ] {
                if set {
                    p.add(
                        format!("{sp}.{key}"),
                        "belongs to a request step (one with `path` or `url`)",
                    );
                }
            }
        }
        if !is_wait {
            for (key, set) in [
                ("key", s.key.is_some()),
                ("timeout", s.timeout.is_some()),
                ("on_timeout", s.on_timeout.is_some()),
            ] {
                if set {
                    p.add(format!("{sp}.{key}"), "belongs to a `wait_for_signal` step");
                }
            }
        }
        let when = if is_request {
            None
        } else {
            condition(format!("{sp}.when"), s.when.clone(), roots, p)
        };
        let kind = if is_request {
            let key_src = s
                .idempotency_key
                .clone()
                .unwrap_or_else(|| format!("{{{{ job }}}}/{{{{ run_id }}}}/{name}"));
            if let Some((other, _)) = keys.iter().find(|(_, k)| k.trim() == key_src.trim()) {
                p.add(
                    format!("{sp}.idempotency_key"),
                    format!("`{key_src}` is also step `{other}`'s key template: each step is its own action and needs its own key (e.g. end it with `/{name}`)"),
                );
            }
            keys.push((name.clone(), key_src.clone()));
            let mut r = request_step(
                &sp,
                name.clone(),
                RawRequest {
                    connection: s.connection.or_else(|| job_connection.map(String::from)),
                    method: s.method,
                    path: s.path,
                    url: s.url,
                    headers: s.headers,
                    body: s.body,
                    idempotency_key: Some(key_src),
                    timeout_ms: s.timeout_ms,
                    classify: s.classify,
                    when: s.when,
                    approval: s.approval,
                    on_reject: s.on_reject,
                    reconcile: s.reconcile,
                    max_response_bytes: s.max_response_bytes,
                },
                String::new(),
                roots,
                declared,
                templates,
                p,
            );
            // The workflow evaluates every step's `when` itself.
            let w = r.when.take();
            (w, StepKind::Request(Box::new(r)))
        } else if let Some(d) = &s.sleep {
            match step_duration(d) {
                Ok(ms) => (when, StepKind::Sleep(SleepFor::Millis(ms))),
                Err(e) => {
                    p.add(format!("{sp}.sleep"), e);
                    continue;
                }
            }
        } else if let Some(t) = &s.sleep_until {
            let n = format!("{sp}.sleep_until");
            if let Err(e) = templates.add(&n, t) {
                p.add(&n, e);
            }
            (when, StepKind::Sleep(SleepFor::Until(n)))
        } else {
            let signal = s.wait_for_signal.clone().unwrap_or_default();
            if let Err(e) = docket_store::signals::check_name("wait_for_signal", &signal) {
                p.add(format!("{sp}.wait_for_signal"), e);
            }
            let key = s.key.as_ref().map(|k| {
                let n = format!("{sp}.key");
                if let Err(e) = templates.add(&n, k) {
                    p.add(&n, e);
                }
                n
            });
            let timeout_src = s.timeout.clone().unwrap_or_default();
            let timeout_ms = match &s.timeout {
                None => {
                    p.add(
                        format!("{sp}.timeout"),
                        "a `wait_for_signal` step needs a `timeout` (e.g. \"3d\"), and `on_timeout` says what then",
                    );
                    0
                }
                Some(t) => step_duration(t).unwrap_or_else(|e| {
                    p.add(format!("{sp}.timeout"), e);
                    0
                }),
            };
            let on_timeout = match s.on_timeout.as_deref() {
                None | Some("fail") => OnTimeout::Fail,
                Some("continue") => OnTimeout::Continue,
                Some(other) => {
                    p.add(
                        format!("{sp}.on_timeout"),
                        format!("`{other}`: expected `fail` or `continue`"),
                    );
                    OnTimeout::Fail
                }
            };
            (
                when,
                StepKind::Signal(SignalStep {
                    signal,
                    key,
                    timeout_ms,
                    timeout_src,
                    on_timeout,
                }),
            )
        };
        // Templates and conditions may read only earlier steps.
        let (when, kind) = kind;
        let mut reads = templates.reads_under(&sp);
        if let StepKind::Request(r) = &kind {
            if let Some(Body::Json(b)) = &r.request.body {
                reads.extend(templates.json_reads(b));
            }
            if let Some(c) = &r.approval {
                reads.extend(
                    c.reads()
                        .iter()
                        .map(|v| (format!("{sp}.approval"), v.clone())),
                );
            }
        }
        if let Some(c) = &when {
            reads.extend(c.reads().iter().map(|v| (format!("{sp}.when"), v.clone())));
        }
        reads.sort();
        reads.dedup();
        for (at, var) in reads {
            let mut parts = var.split('.');
            if parts.next() != Some("steps") {
                continue;
            }
            let Some(target) = parts.next() else { continue };
            match names.iter().position(|n| n == target) {
                Some(k) if k < i => {}
                Some(k) if k == i => p.add(
                    &at,
                    format!("`{var}`: step `{name}` of job `{job}` reads its own result; a step reads only earlier steps' results"),
                ),
                Some(_) => p.add(
                    &at,
                    format!("`{var}`: step `{target}` comes after step `{name}` in job `{job}`; a step reads only earlier steps' results"),
                ),
                None => p.add(
                    &at,
                    format!(
                        "`{var}`: job `{job}` has no step `{target}` (its steps: {})",
                        names.iter().filter(|n| !n.is_empty()).cloned().collect::<Vec<_>>().join(", ")
                    ),
                ),
            }
        }
        if p.0.len() == before {
            out.push(StepSpec { name, when, kind });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<(String, String)> {
        compile(text, "docket.toml", Path::new("."))
            .map(|_| Vec::new())
            .unwrap_or_else(|e| e.problems)
    }

    #[test]
    fn a_remote_job_takes_the_policy_keys_only() {
        let c = compile(
            r#"
            [jobs.send-welcome]
            remote = true
            job_timeout_ms = 30000
            lease_ms = 60000
            input_schema = { type = "object", required = ["email"] }
            [jobs.send-welcome.retry]
            max_attempts = 5
            base_delay_ms = 1000
            "#,
            "docket.toml",
            Path::new("."),
        )
        .unwrap();
        assert!(c.jobs.is_empty());
        let r = &c.remote["send-welcome"];
        assert_eq!(r.job_timeout, Duration::from_millis(30_000));
        assert_eq!(r.lease, Duration::from_millis(60_000));
        assert_eq!(r.policy.max_attempts, 5);
        assert_eq!(r.policy.base_delay_ms, 1000);
        let schema = r.schema.as_ref().unwrap();
        assert!(schema.check(&serde_json::json!({"email": "a@b"})).is_ok());
        assert!(schema.check(&serde_json::json!({})).is_err());
        // HTTP keys are refused by name; a lease must outlast the timeout.
        let p = problems(
            r#"
            [jobs.r]
            remote = true
            url = "http://x"
            job_timeout_ms = 5000
            lease_ms = 5000
            "#,
        );
        let places: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(places, ["jobs.r.url", "jobs.r.lease_ms"], "{p:?}");
    }

    #[test]
    fn a_debounce_compiles_and_bad_ones_are_named() {
        let c = compile(
            r#"
            [connections.crm]
            base_url = "https://crm.example.com/api"
            [jobs.sync]
            connection = "crm"
            path = "/sync"
            debounce = { key = "{{ tenant }}/{{ input.customer_id }}", window = "30s", keep = "last" }
            [jobs.r]
            remote = true
            debounce = { window = "500ms", keep = "first" }
            "#,
            "docket.toml",
            Path::new("."),
        )
        .unwrap();
        let d = c.jobs["sync"].debounce.as_ref().unwrap();
        assert_eq!(d.key_template(), "{{ tenant }}/{{ input.customer_id }}");
        assert_eq!(d.window(), Duration::from_secs(30));
        assert_eq!(d.keep(), crate::Keep::Last);
        let r = c.remote["r"].debounce.as_ref().unwrap();
        assert_eq!(
            (r.key_template(), r.keep()),
            ("{{ job }}", crate::Keep::First)
        );
        let p = problems(
            r#"
            [jobs.a]
            remote = true
            debounce = { key = "x", window = "0s", keep = "last" }
            [jobs.b]
            remote = true
            debounce = { key = "{{ customer }}", window = "5s", keep = "last" }
            [jobs.c]
            remote = true
            debounce = { window = "5s" }
            [jobs.d]
            remote = true
            debounce = { window = "-5s", keep = "first" }
            [jobs.e]
            remote = true
            debounce = { window = "5s", keep = "newest" }
            [jobs.f]
            remote = true
            debounce = { keep = "first" }
            "#,
        );
        let has = |place: &str, what: &str| p.iter().any(|(pl, m)| pl == place && m.contains(what));
        assert!(has("jobs.a.debounce.window", "positive"), "{p:?}");
        assert!(
            has("jobs.b.debounce.key", "unknown variable `customer`"),
            "{p:?}"
        );
        assert!(has("jobs.c.debounce.keep", "is required"), "{p:?}");
        assert!(has("jobs.d.debounce.window", "positive"), "{p:?}");
        assert!(
            has("jobs.e.debounce.keep", "`newest` is not a debounce mode"),
            "{p:?}"
        );
        assert!(has("jobs.f.debounce.window", "is required"), "{p:?}");
        assert_eq!(p.len(), 6, "{p:?}");
    }

    #[test]
    fn a_good_file_compiles() {
        let c = compile(
            r#"
            [server]
            listen = "127.0.0.1:8080"   # other sections are not ours

            [connections.crm]
            base_url = "https://crm.example.com/api"
            token_env = "CRM_TOKEN"
            breaker = { failures = 3, window_ms = 10000, open_ms = 5000 }

            [jobs.send-email]
            connection = "crm"
            path = "/emails"
            idempotency_key = "{{ input.prospect_id }}/send-email/{{ input.campaign }}/v1"
            when = "input.opted_in == true"
            body = { to = "{{ input.email }}", n = "{{ input.n }}" }
            classify = { 409 = "duplicate" }
            retry = { base_delay_ms = 1000, max_attempts = 4, overrides = { rate_limited = { max_attempts = 8 } } }
            input_schema = { type = "object", required = ["email"] }
            concurrency = 2
            [jobs.send-email.reconcile]
            path = "/emails?key={{ idempotency_key | urlencode }}"
            found_when = "status == 200 && body.found == true"
            "#,
            "docket.toml",
            Path::new("."),
        )
        .unwrap();
        let j = &c.jobs["send-email"];
        let Work::Single(r) = &j.work else {
            panic!("one request")
        };
        assert_eq!(r.action, "send-email");
        assert_eq!(j.policy.name, "send-email");
        assert_eq!(j.policy.max_attempts, 4);
        assert_eq!(r.request.method, Method::POST);
        assert!(r.reconcile.is_some() && j.schema.is_some() && r.when.is_some());
        assert_eq!(j.job_timeout, Duration::from_millis(25_000));
        assert_eq!(c.connections["crm"].breaker.failures, 3);
        assert_eq!(j.concurrency, Some(2));
    }

    #[test]
    fn durations_out_of_range_are_refused_not_overflowed() {
        let p = problems(
            r#"
            [connections.crm]
            base_url = "https://crm.example.com/api"
            [jobs.a]
            connection = "crm"
            path = "/x"
            job_timeout_ms = 9223372036854775807
            [jobs.b]
            connection = "crm"
            path = "/x"
            lease_ms = 99999999999999
            retry = { max_delay_ms = 9223372036854775807 }
            "#,
        );
        let has = |place: &str, what: &str| {
            p.iter()
                .any(|(pl, m)| pl.ends_with(place) && m.contains(what))
        };
        assert!(has("jobs.a.job_timeout_ms", "366 days"), "{p:?}");
        assert!(has("jobs.b.lease_ms", "366 days"), "{p:?}");
        assert!(p.iter().any(|(_, m)| m.contains("100 years")), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let ps = problems(
            r#"
            [connections.crm]
            base_url = "ftp://x"
            token_env = "A"
            value_env = "B"

            [jobs.a]
            connection = "nope"
            path = "/x/{{ input.y"
            when = "inptu.amount > 3"
            approval = "input.amount >"
            on_reject = "explode"
            classify = { 4000 = "ok" }
            retry = { max_attempt = 3 }
            headers = { "Idempotency-Key" = "x" }
            input_schema = { type = "objekt" }

            [jobs.b]
            path = "/needs-a-connection"
            "#,
        );
        let places: Vec<&str> = ps.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "connections.crm.base_url",
            "connections.crm",
            "jobs.a.connection",
            "jobs.a.path",
            "jobs.a.when",
            "jobs.a.approval",
            "jobs.a.on_reject",
            "jobs.a.classify",
            "jobs.a.retry.max_attempt",
            "jobs.a.headers.Idempotency-Key",
            "jobs.a.input_schema",
            "jobs.b.path",
        ] {
            assert!(places.contains(&want), "{want} missing from {ps:#?}");
        }
        let e = HttpConfigError {
            file: "docket.toml".into(),
            problems: ps,
        };
        assert!(e.to_string().starts_with("docket.toml: "));
    }

    #[test]
    fn a_job_on_an_invalid_connection_is_not_told_it_is_missing() {
        let ps = problems(
            r#"
            [connections.c]
            base_url = "ftp://x"
            [jobs.y]
            connection = "c"
            path = "/y"
            "#,
        );
        assert!(
            ps.iter().any(|(p, _)| p == "connections.c.base_url"),
            "{ps:?}"
        );
        assert!(!ps.iter().any(|(p, _)| p == "jobs.y.connection"), "{ps:?}");
    }

    #[test]
    fn the_pruners_interval_and_batch_are_global_and_bounded() {
        let c = compile(
            "[retention]\ncompleted = \"1h\"\ninterval = \"10s\"\nbatch = 200\n[jobs.a]\nurl = \"http://x/a\"\n",
            "docket.toml",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            c.pruner,
            PrunerSettings {
                interval_ms: Some(10_000),
                batch: Some(200)
            }
        );
        let ps = problems(
            "[retention]\ninterval = \"0s\"\nbatch = 0\n[jobs.a]\nurl = \"http://x/a\"\nretention = { batch = 5 }\n",
        );
        let at = |place: &str| ps.iter().find(|(p, _)| p == place).map(|(_, m)| m.clone());
        assert!(at("retention.interval").is_some(), "{ps:?}");
        assert!(
            at("retention.batch").unwrap().contains("1 to 10000"),
            "{ps:?}"
        );
        assert!(
            at("jobs.a.retention.batch").unwrap().contains("global"),
            "{ps:?}"
        );
    }

    #[test]
    fn retention_tables_are_parsed_strictly() {
        let c = compile(
            r#"
            [retention]
            completed = "7d"
            failed = "30d"
            cancelled = "30d"
            ledger = "90d"
            [jobs.a]
            url = "http://x/a"
            retention = { completed = "1h" }
            [jobs.b]
            url = "http://x/b"
            "#,
            "docket.toml",
            Path::new("."),
        )
        .unwrap();
        let day = 86_400_000;
        assert_eq!(c.retention.default.completed_ms, Some(7 * day));
        assert_eq!(c.retention.default.failed_ms, Some(30 * day));
        assert_eq!(c.retention.ledger_ms, Some(90 * day));
        assert_eq!(
            c.retention.window("a", docket_core::RunStatus::Completed),
            Some(3_600_000)
        );
        assert_eq!(
            c.retention.window("a", docket_core::RunStatus::Failed),
            Some(30 * day)
        );
        assert_eq!(
            c.retention.window("b", docket_core::RunStatus::Completed),
            Some(7 * day)
        );
        let ps = problems(
            r#"
            [retention]
            completed = "0d"
            failed = "-1d"
            cancelled = "30"
            [jobs.a]
            url = "http://x/a"
            retention = { completed = "1.5h", ledger = "1d" }
            "#,
        );
        let places: Vec<&str> = ps.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            places,
            vec![
                "retention.completed",
                "retention.failed",
                "retention.cancelled",
                "jobs.a.retention.completed",
                "jobs.a.retention.ledger",
            ],
            "{ps:?}"
        );
        assert!(
            ps[0].1.contains("zero") && ps[1].1.contains("negative"),
            "{ps:?}"
        );
        let ps = problems("[retention]\ncompleted = \"7d\"\nkeep = \"1d\"\n");
        assert!(ps[0].0 == "retention" && ps[0].1.contains("keep"), "{ps:?}");
        // The ledger must outlive every run window.
        let ps = problems("[retention]\nfailed = \"30d\"\nledger = \"7d\"\n");
        assert!(
            ps[0].0 == "retention" && ps[0].1.contains("shorter"),
            "{ps:?}"
        );
    }

    #[test]
    fn toml_syntax_errors_and_unknown_fields() {
        let ps = problems("[jobs.a\n");
        assert_eq!(ps[0].0, "toml");
        let ps = problems("[jobs.a]\nurl = \"http://x\"\nmethdo = \"GET\"\n");
        assert!(ps[0].1.contains("methdo"), "{ps:?}");
        // Every section's unknown keys at once, each at its place, with the
        // other problems.
        let ps = problems(
            r#"
            [connections.c]
            base_url = "http://x"
            tokn_env = "T"
            [jobs.a]
            url = "http://x"
            retyr = { max_attempts = 2 }
            [jobs.b]
            url = "http://x"
            when = "input.x >"
            "#,
        );
        let at = |place: &str| ps.iter().find(|(p, _)| p == place).map(|(_, m)| m.clone());
        assert!(
            at("connections.c").is_some_and(|m| m.contains("tokn_env")),
            "{ps:?}"
        );
        assert!(at("jobs.a").is_some_and(|m| m.contains("retyr")), "{ps:?}");
        assert!(at("jobs.b.when").is_some(), "{ps:?}");
    }

    const INVOICE: &str = r#"
        [connections.billing]
        base_url = "https://billing.example.com"
        [jobs.invoice]
        connection = "billing"
        input_schema = { type = "object", required = ["order"] }
        retry = { max_attempts = 3 }
        [[jobs.invoice.steps]]
        name = "create_invoice"
        path = "/invoices"
        idempotency_key = "{{ input.order }}/invoice/v1"
        body = { order = "{{ input.order }}" }
        [[jobs.invoice.steps]]
        name = "paid"
        wait_for_signal = "paid"
        key = "{{ steps.create_invoice.body.id }}"
        timeout = "3d"
        on_timeout = "continue"
        [[jobs.invoice.steps]]
        name = "cool_off"
        sleep = "1h"
        when = "steps.paid.received == true"
        [[jobs.invoice.steps]]
        name = "receipt"
        path = "/receipts"
        idempotency_key = "{{ input.order }}/receipt/v1"
        body = { invoice = "{{ steps.create_invoice.body.id }}", amount = "{{ steps.paid.data.amount }}" }
        "#;

    #[test]
    fn a_workflow_job_compiles_its_steps_in_order() {
        let c = compile(INVOICE, "docket.toml", Path::new(".")).unwrap();
        let j = &c.jobs["invoice"];
        let Work::Steps(steps) = &j.work else {
            panic!("steps")
        };
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["create_invoice", "paid", "cool_off", "receipt"]);
        let StepKind::Request(r) = &steps[0].kind else {
            panic!("a request")
        };
        // The step's name is its action; the job's connection is its default.
        assert_eq!(r.action, "create_invoice");
        assert_eq!(r.connection.as_deref(), Some("billing"));
        let StepKind::Signal(w) = &steps[1].kind else {
            panic!("a wait")
        };
        assert_eq!(
            (w.signal.as_str(), w.timeout_ms, w.on_timeout),
            ("paid", 3 * 86_400_000, OnTimeout::Continue)
        );
        assert!(matches!(
            steps[2].kind,
            StepKind::Sleep(SleepFor::Millis(3_600_000))
        ));
        assert!(steps[2].when.is_some());
        // Two requests of 10 s each, plus 5 s: sleeps and waits take no time
        // of an attempt.
        assert_eq!(j.job_timeout, Duration::from_millis(25_000));
    }

    fn workflow_problems(steps: &str) -> Vec<(String, String)> {
        problems(&format!(
            "[connections.billing]\nbase_url = \"https://b.example.com\"\n[jobs.wf]\nconnection = \"billing\"\n{steps}"
        ))
    }

    #[test]
    fn bad_workflow_steps_are_refused_naming_the_job_and_the_step() {
        let at = |ps: &[(String, String)], place: &str| {
            ps.iter()
                .find(|(p, _)| p == place)
                .map(|(_, m)| m.clone())
                .unwrap_or_else(|| panic!("nothing at {place}: {ps:#?}"))
        };
        // An unknown step, a later step, the step itself.
        let ps = workflow_problems(
            r#"
            [[jobs.wf.steps]]
            name = "a"
            path = "/a/{{ steps.nope.body.id }}"
            idempotency_key = "{{ input.o }}/a"
            [[jobs.wf.steps]]
            name = "b"
            path = "/b"
            idempotency_key = "{{ input.o }}/b"
            body = { x = "{{ steps.c.body.id }}", y = "n={{ steps.b.status }}" }
            [[jobs.wf.steps]]
            name = "c"
            sleep = "1h"
            when = "steps.zz.status == 200"
            "#,
        );
        let m = at(&ps, "jobs.wf.steps.a.path");
        assert!(
            m.contains("`steps.nope.body.id`")
                && m.contains("job `wf` has no step `nope`")
                && m.contains("a, b, c"),
            "{m}"
        );
        let m = at(&ps, "jobs.wf.steps.b.body.x");
        assert!(m.contains("step `c` comes after step `b`"), "{m}");
        let m = at(&ps, "jobs.wf.steps.b.body.y");
        assert!(m.contains("reads its own result"), "{m}");
        let m = at(&ps, "jobs.wf.steps.c.when");
        assert!(m.contains("no step `zz`"), "{m}");

        // Duplicate names, bad names, missing names.
        let ps = workflow_problems(
            r#"
            [[jobs.wf.steps]]
            name = "a"
            sleep = "1h"
            [[jobs.wf.steps]]
            name = "a"
            sleep = "2h"
            [[jobs.wf.steps]]
            name = "send-it"
            sleep = "1h"
            [[jobs.wf.steps]]
            sleep = "1h"
            "#,
        );
        assert!(at(&ps, "jobs.wf.steps[1].name").contains("step `a` is declared twice"));
        assert!(at(&ps, "jobs.wf.steps[2].name").contains("`send-it` is not a step name"));
        assert!(at(&ps, "jobs.wf.steps[3].name").contains("needs a `name`"));

        // Sleeps of zero or garbage; a step that is two things or none;
        // keys of another kind; a wait without a timeout.
        let ps = workflow_problems(
            r#"
            [[jobs.wf.steps]]
            name = "zero"
            sleep = "0s"
            [[jobs.wf.steps]]
            name = "garbage"
            sleep = "soon"
            [[jobs.wf.steps]]
            name = "both"
            path = "/x"
            sleep = "1h"
            [[jobs.wf.steps]]
            name = "none"
            [[jobs.wf.steps]]
            name = "nap"
            sleep = "1h"
            body = { a = 1 }
            timeout = "1d"
            [[jobs.wf.steps]]
            name = "wait"
            wait_for_signal = "paid"
            on_timeout = "explode"
            "#,
        );
        assert!(at(&ps, "jobs.wf.steps.zero.sleep").contains("zero"));
        assert!(at(&ps, "jobs.wf.steps.garbage.sleep").contains("not a duration"));
        assert!(at(&ps, "jobs.wf.steps.both").contains("a request (`path`/`url`) and a `sleep`"));
        assert!(at(&ps, "jobs.wf.steps.none").contains("this one is none"));
        assert!(at(&ps, "jobs.wf.steps.nap.body").contains("request step"));
        assert!(at(&ps, "jobs.wf.steps.nap.timeout").contains("wait_for_signal"));
        assert!(at(&ps, "jobs.wf.steps.wait.timeout").contains("needs a `timeout`"));
        assert!(at(&ps, "jobs.wf.steps.wait.on_timeout").contains("`explode`"));

        // One key template for two steps; the job's own request keys.
        let ps = workflow_problems(
            r#"
            path = "/x"
            rate_limit = { per_second = 1, burst = 1 }
            [[jobs.wf.steps]]
            name = "a"
            path = "/a"
            idempotency_key = "{{ input.o }}/v1"
            [[jobs.wf.steps]]
            name = "b"
            path = "/b"
            idempotency_key = "{{ input.o }}/v1"
            [[jobs.wf.steps]]
            name = "c"
            path = "/c"
            "#,
        );
        assert!(at(&ps, "jobs.wf.steps.b.idempotency_key").contains("also step `a`'s key template"));
        assert!(at(&ps, "jobs.wf.path").contains("put this key in the step"));
        assert!(at(&ps, "jobs.wf.rate_limit").contains("connection"));
        assert!(
            !ps.iter().any(|(p, _)| p.starts_with("jobs.wf.steps.c")),
            "{ps:#?}"
        );
        // No steps at all; `steps` on a remote job.
        let ps = workflow_problems("steps = []\n");
        assert!(at(&ps, "jobs.wf.steps").contains("at least one step"));
        let ps =
            problems("[jobs.r]\nremote = true\n[[jobs.r.steps]]\nname = \"a\"\nsleep = \"1h\"\n");
        assert!(at(&ps, "jobs.r.steps").contains("remote"));
    }
}
