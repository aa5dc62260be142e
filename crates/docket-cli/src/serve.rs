//! `docket serve`: the HTTP API and a worker in one process (by default),
//! or either alone (`--role api|worker`) for scale-out.
//!
//! Configuration, strongest first: command-line flags, environment
//! variables (`DOCKET_DB`, `DOCKET_ADDR`, `DOCKET_ROLE`, …), the TOML file
//! given with `--config` (or `DOCKET_CONFIG`), then the defaults: the SQLite
//! file `docket.db` in the current directory, `127.0.0.1:7878`, role `all`.
//!
//! SIGTERM or ctrl-c: the API stops taking connections, ends event streams
//! and long polls and answers what is in flight; the worker stops claiming,
//! lets running attempts finish within the grace period and releases the
//! rest so another worker takes them at once.

use docket::{Docket, Job, JobError, WorkerConfig};
use docket_server::{AuthMode, Server, ServerConfig};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

/// What a process does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The API and a worker.
    All,
    /// Only the HTTP API (workers run elsewhere, on the same database).
    Api,
    /// Only a worker.
    Worker,
}

/// Arguments of `docket serve`.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// Database: a SQLite file path, `sqlite://PATH`, `sqlite::memory:` or
    /// `postgres://…` [default: docket.db].
    #[arg(long, env = "DOCKET_DB")]
    pub db: Option<String>,
    /// Address to listen on [default: 127.0.0.1:7878].
    #[arg(long, env = "DOCKET_ADDR")]
    pub addr: Option<SocketAddr>,
    /// A TOML file with any of: db, addr, role, concurrency, demo_jobs,
    /// insecure_dev_no_auth, shutdown_grace_secs, max_body_bytes,
    /// max_input_bytes, and HTTP jobs (`[connections.*]`, `[jobs.*]`, see
    /// docs/HTTP_JOBS.md).
    #[arg(long, env = "DOCKET_CONFIG")]
    pub config: Option<PathBuf>,
    /// `all` (API and worker), `api` or `worker` [default: all].
    #[arg(long, env = "DOCKET_ROLE", value_enum)]
    pub role: Option<Role>,
    /// Handlers running at once in this process's worker [default: 8].
    #[arg(long, env = "DOCKET_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Register the built-in demo jobs (noop, echo, fail-then-succeed,
    /// approval, sleep) so the API can be tried end to end.
    #[arg(long, env = "DOCKET_DEMO_JOBS")]
    pub demo_jobs: bool,
    /// DEVELOPMENT ONLY: no authentication (the tenant is X-Tenant-ID or
    /// `default`). Refused unless the address is loopback.
    #[arg(long, env = "DOCKET_INSECURE_DEV_NO_AUTH")]
    pub insecure_dev_no_auth: bool,
    /// Seconds running attempts get to finish at shutdown [default: 30].
    #[arg(long, env = "DOCKET_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Largest request body in bytes [default: 2097152].
    #[arg(long, env = "DOCKET_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest run input in bytes [default: 1048576].
    #[arg(long, env = "DOCKET_MAX_INPUT_BYTES")]
    pub max_input_bytes: Option<usize>,
    /// Export traces over OTLP/HTTP to this URL (e.g.
    /// `http://localhost:4318/v1/traces`). Without it, traces follow the
    /// standard `OTEL_*` variables and are off unless an OTLP endpoint or
    /// `OTEL_TRACES_EXPORTER=otlp` is set (docs/OBSERVABILITY.md).
    #[arg(long, env = "DOCKET_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Where the dashboard links a run's trace: a URL with `{trace_id}`,
    /// e.g. `http://localhost:16686/trace/{trace_id}` (Jaeger).
    #[arg(long, env = "DOCKET_TRACE_URL")]
    pub trace_url: Option<String>,
}

/// The configuration file's keys (all optional).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    db: Option<String>,
    addr: Option<SocketAddr>,
    role: Option<Role>,
    concurrency: Option<usize>,
    demo_jobs: Option<bool>,
    insecure_dev_no_auth: Option<bool>,
    shutdown_grace_secs: Option<u64>,
    max_body_bytes: Option<usize>,
    max_input_bytes: Option<usize>,
    otlp_endpoint: Option<String>,
    trace_url: Option<String>,
    /// HTTP jobs and their connections (`docket::http`): accepted here,
    /// read by `HttpJobs::load` from the same file.
    #[allow(dead_code)]
    connections: Option<toml::Value>,
    #[allow(dead_code)]
    jobs: Option<toml::Value>,
    /// Schedules (`docket::schedule::schedules_from_toml`): accepted here,
    /// read from the same file.
    #[allow(dead_code)]
    schedules: Option<toml::Value>,

    /// `[retention]` (docs/OPERATIONS.md): read by `HttpJobs::load` too.
    #[allow(dead_code)]
    retention: Option<toml::Value>,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The store URL.
    pub db_url: String,
    /// Where the API listens.
    pub addr: SocketAddr,
    /// What this process runs.
    pub role: Role,
    /// Worker concurrency.
    pub concurrency: usize,
    /// Register the demo jobs.
    pub demo_jobs: bool,
    /// Authentication off (loopback only).
    pub insecure_dev_no_auth: bool,
    /// Shutdown grace period.
    pub grace: Duration,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Run input limit.
    pub max_input_bytes: usize,
    /// Where traces go (OTLP/HTTP), when set here rather than by `OTEL_*`.
    pub otlp_endpoint: Option<String>,
    /// The dashboard's trace link template.
    pub trace_url: Option<String>,
}

/// A database argument as a store URL: plain paths are SQLite files.
pub fn db_url(db: &str) -> String {
    if db.starts_with("sqlite:") || db.starts_with("postgres://") || db.starts_with("postgresql://")
    {
        db.to_string()
    } else {
        format!("sqlite://{db}")
    }
}

impl Settings {
    /// Merges flags and environment (already merged by clap) over the file
    /// over the defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Settings, String> {
        let file: FileConfig = match &args.config {
            None => FileConfig::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read config file {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("config file {}: {e}", p.display()))?
            }
        };
        let defaults = ServerConfig::default();
        let concurrency = args.concurrency.or(file.concurrency).unwrap_or(8);
        let addr = args
            .addr
            .or(file.addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7878)));
        let role = args.role.or(file.role).unwrap_or(Role::All);
        let insecure = args.insecure_dev_no_auth || file.insecure_dev_no_auth.unwrap_or(false);
        if insecure && role != Role::Worker && !addr.ip().is_loopback() {
            return Err(format!(
                "refusing to serve without authentication on {addr}: --insecure-dev-no-auth is only allowed on a loopback address (127.0.0.1, ::1)"
            ));
        }
        if concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        let trace_url = args.trace_url.clone().or(file.trace_url);
        if let Some(u) = &trace_url {
            // The dashboard makes it a link: only a web address, and one
            // that names the trace.
            if !(u.starts_with("http://") || u.starts_with("https://")) || !u.contains("{trace_id}")
            {
                return Err(format!(
                    "trace_url `{u}` must be an http:// or https:// URL containing {{trace_id}}, e.g. http://localhost:16686/trace/{{trace_id}}"
                ));
            }
        }
        Ok(Settings {
            db_url: db_url(
                args.db
                    .as_deref()
                    .or(file.db.as_deref())
                    .unwrap_or("docket.db"),
            ),
            addr,
            role,
            concurrency,
            demo_jobs: args.demo_jobs || file.demo_jobs.unwrap_or(false),
            insecure_dev_no_auth: insecure,
            grace: Duration::from_secs(
                args.shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(30),
            ),
            max_body_bytes: args
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(defaults.max_body_bytes),
            max_input_bytes: args
                .max_input_bytes
                .or(file.max_input_bytes)
                .unwrap_or(defaults.max_input_bytes),
            otlp_endpoint: args.otlp_endpoint.clone().or(file.otlp_endpoint),
            trace_url,
        })
    }
}

/// Registers the demo jobs.
///
/// - `noop`: returns its input.
/// - `echo`: returns its input, the run's variables and the attempt number.
/// - `fail-then-succeed`: input `{"failures": N, "class": C}` (default 2,
///   `unavailable`): fails with class C while the attempt is at most N,
///   then succeeds. A retryable class is retried by the policy; a terminal
///   one (`permanent`) fails the run, for operator retries.
/// - `approval`: waits for an operator's approve/reject, returns it.
/// - `sleep`: input `{"ms": N}` (default 5000): a step that sleeps, then
///   one more step; cancel it while it runs.
/// - `fan-out`: input `{"children": N}`: spawns N `echo` children, joins
///   them, outputs `{"children": N, "completed": M}` (`demo_children.rs`).
/// - `wait-signal`: input `{"name": S}` (optional `"key"`, `"timeout_ms"`,
///   default one day): waits durably for the signal S
///   (`docket runs signal RUN S --data …`, or `POST /api/signals` with the
///   key) and completes with its payload as the output; fails when the
///   timeout passes first.
pub fn register_demo_jobs(d: &Docket) -> Result<(), docket::Error> {
    d.register(Job::new("noop", |_ctx, input: Value| async move {
        Ok::<_, JobError>(input)
    }))?;
    d.register(Job::new("echo", |ctx, input: Value| async move {
        Ok::<_, JobError>(json!({
            "input": input,
            "variables": ctx.variables(),
            "attempt": ctx.attempt(),
        }))
    }))?;
    d.register(Job::new(
        "fail-then-succeed",
        |ctx, input: Value| async move {
            let failures = input.get("failures").and_then(Value::as_u64).unwrap_or(2);
            let class = input
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("unavailable");
            let Ok(class) = class.parse::<docket::ErrorClass>() else {
                return Err(JobError::invalid_input(format!(
                    "unknown error class `{class}` (try unavailable, timeout or permanent)"
                )));
            };
            if u64::from(ctx.attempt()) <= failures {
                return Err(JobError::new(
                    class,
                    format!("demo failure {} of {failures} ({class})", ctx.attempt()),
                ));
            }
            Ok(json!({ "succeeded_on_attempt": ctx.attempt(), "variables": ctx.variables() }))
        },
    ))?;
    d.register(Job::new("approval", |ctx, input: Value| async move {
        let decision = ctx.wait_for_input("approval", input).await?;
        Ok::<_, JobError>(match decision {
            docket::InputDecision::Approved(data) => json!({ "approved": true, "data": data }),
            docket::InputDecision::Rejected(data) => json!({ "approved": false, "data": data }),
        })
    }))?;
    d.register(Job::new("sleep", |ctx, input: Value| async move {
        let ms = input.get("ms").and_then(Value::as_u64).unwrap_or(5_000);
        ctx.step("sleep", || async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, JobError>(ms)
        })
        .await?;
        ctx.step("after-sleep", || async { Ok::<_, JobError>(()) })
            .await?;
        Ok(json!({ "slept_ms": ms }))
    }))?;
    crate::demo_children::register(d)?;
    d.register(Job::new("wait-signal", |ctx, input: Value| async move {
        let Some(name) = input.get("name").and_then(Value::as_str) else {
            return Err(JobError::invalid_input(
                "`name`: give the signal's name, e.g. {\"name\": \"paid\"}",
            ));
        };
        let timeout = Duration::from_millis(
            input
                .get("timeout_ms")
                .and_then(Value::as_u64)
                .unwrap_or(86_400_000),
        );
        let got = match input.get("key").and_then(Value::as_str) {
            Some(key) => ctx.wait_for_signal_keyed(name, key, timeout).await?,
            None => ctx.wait_for_signal(name, timeout).await?,
        };
        match got {
            docket::Signalled::Received(sig) => Ok::<_, JobError>(sig.data),
            docket::Signalled::TimedOut { until } => Err(JobError::permanent(format!(
                "no signal \"{name}\" arrived by {}",
                until.to_rfc3339()
            ))),
        }
    }))?;
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `docket serve`.
pub async fn run(args: ServeArgs) -> Result<(), String> {
    let s = Settings::resolve(&args)?;
    // A bad configuration is reported before anything is created on disk.
    let http = match &args.config {
        Some(path) => Some(docket::http::HttpJobs::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let schedules = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            docket::schedule::schedules_from_toml(&text).map_err(|problems| {
                let list: Vec<String> = problems
                    .iter()
                    .map(|(place, problem)| format!("{place}: {problem}"))
                    .collect();
                format!("{}: {}", path.display(), list.join("; "))
            })?
        }
        None => Vec::new(),
    };
    let docket = Docket::open(&s.db_url)
        .await
        .map_err(|e| format!("cannot open {}: {e}", redact(&s.db_url)))?;
    if s.demo_jobs {
        register_demo_jobs(&docket).map_err(|e| e.to_string())?;
    }
    // Traces: off unless configured (here, or by the OTEL_* variables).
    let telemetry = match &s.otlp_endpoint {
        Some(endpoint) => Some(docket::Telemetry::otlp(docket::TelemetryConfig {
            endpoint: Some(endpoint.clone()),
            ..Default::default()
        })),
        None => docket::Telemetry::from_env().transpose(),
    };
    if let Some(t) = telemetry {
        let t = t.map_err(|e| e.to_string())?;
        let _ = docket.set_telemetry(t);
        tracing::info!("traces on: exported over OTLP/HTTP");
    }
    // HTTP jobs declared in the configuration file ([connections.*], [jobs.*]).
    let mut http_jobs = None;
    if let Some(http) = http {
        http.install(&docket).map_err(|e| e.to_string())?;
        if !http.job_names().is_empty() {
            tracing::info!(jobs = ?http.job_names(), connections = ?http.connection_names(), "HTTP jobs loaded");
        }
        for (connection, why) in http.credential_problems() {
            tracing::warn!(%connection, problem = %why, "a connection's credential cannot be read: its runs will fail connection_unresolved until it can");
        }
        http_jobs = Some(http);
    }
    // Schedules declared in the configuration file ([schedules.*]): added,
    // changed, or removed when gone from the file (before any scheduler
    // of this process ticks).
    if args.config.is_some() {
        let applied = docket
            .apply_config_schedules(schedules)
            .await
            .map_err(|e| {
                format!(
                    "schedules of {}: {e}",
                    args.config
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            })?;
        if applied != Default::default() {
            tracing::info!(created = ?applied.created, updated = ?applied.updated, unchanged = ?applied.unchanged, removed = ?applied.removed, "schedules applied from the configuration file");
        }
    }
    let jobs = docket.job_names();
    if jobs.is_empty() {
        tracing::warn!("no jobs are registered: every trigger will be refused (start with --demo-jobs to try the API)");
    }
    tracing::info!(
        role = ?s.role,
        db = %redact(&s.db_url),
        backend = docket.store().backend(),
        jobs = ?jobs,
        "docket starting"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        signal().await;
        // Stop first: logging may fail, the shutdown must not.
        let _ = on_signal.send(true);
        tracing::info!("signal received: shutting down");
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let worker = (s.role != Role::Api).then(|| {
        docket
            .worker(WorkerConfig {
                concurrency: s.concurrency,
                prefetch: s.concurrency,
                ..WorkerConfig::default()
            })
            .start()
    });
    // An api-only process hands out leases to remote workers (the worker
    // protocol) but runs no worker, whose reaper would return a vanished
    // remote worker's runs: it runs a reaper of its own.
    let reaper = (s.role == Role::Api).then(|| docket.start_reaper(Duration::from_secs(1)));
    // Every process that runs jobs also offers to run the schedules: one
    // leads at a time (expiring leadership), so a dead or stopped leader is
    // replaced within the lead's 5 s.
    let scheduler =
        (s.role != Role::Api).then(|| docket.scheduler(docket::SchedulerConfig::default()).start());

    // Pruning (`[retention]`): every worker process runs a pruner; the one
    // holding the `prune` lead prunes, the others stand by.
    let retention = http_jobs
        .as_ref()
        .map(|h| h.retention())
        .unwrap_or_default();
    let pruner = if s.role != Role::Api && retention.is_enabled() {
        tracing::info!(?retention, "pruner started");
        Some(
            docket
                .start_pruner({
                    let mut cfg = docket::retention::PrunerConfig::new(retention);
                    if let Some(settings) = http_jobs.as_ref().map(|h| h.pruner_settings()) {
                        if let Some(ms) = settings.interval_ms {
                            cfg.interval = Duration::from_millis(ms as u64);
                        }
                        if let Some(n) = settings.batch {
                            cfg.batch = n;
                        }
                    }
                    cfg
                })
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let api = async {
        if s.role == Role::Worker {
            return Ok(());
        }
        let server = Server::start(
            docket.clone(),
            ServerConfig {
                auth: if s.insecure_dev_no_auth {
                    AuthMode::InsecureNoAuth
                } else {
                    AuthMode::Tokens
                },
                max_body_bytes: s.max_body_bytes,
                max_input_bytes: s.max_input_bytes,
                http: http_jobs.clone(),
                runs_jobs: s.role != Role::Api,
                trace_url: s.trace_url.clone(),
                ..ServerConfig::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(s.addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", s.addr))?;
        server
            .serve(listener, stopped(stop_rx.clone()))
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!("API stopped");
        Ok(())
    };
    // Whatever ends the API (a signal, or an error) stops the worker too.
    let api = async {
        let res: Result<(), String> = api.await;
        if s.role != Role::Worker {
            let _ = stop_tx.send(true);
        }
        res
    };
    let work = async {
        if let Some(w) = worker {
            tracing::info!(concurrency = s.concurrency, "worker started");
            stopped(stop_rx.clone()).await;
            let released = w.shutdown(s.grace).await;
            tracing::info!(released, "worker stopped");
        }
        if let Some(sch) = scheduler {
            stopped(stop_rx.clone()).await;
            // Resigns the lead: another process takes the schedules at once.
            sch.shutdown().await;
        }
    };
    let (res, ()) = tokio::join!(api, work);
    if let Some(p) = pruner {
        p.shutdown().await;
    }
    if let Some(r) = reaper {
        r.stop().await;
    }
    if let Some(t) = docket.telemetry().cloned() {
        // The last spans (blocking: the exporter's own thread answers).
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    res
}

/// A database URL without its password, for logs.
pub(crate) fn redact(url: &str) -> String {
    let mut out = url.to_string();
    // user:password@ in the authority (a password may itself hold '@').
    if let Some(i) = out.find("://") {
        let start = i + 3;
        let end = out[start..]
            .find(['/', '?'])
            .map_or(out.len(), |e| start + e);
        if let Some(at) = out[start..end].rfind('@') {
            let creds = &out[start..start + at];
            if let Some((user, _)) = creds.split_once(':') {
                out = format!("{}{user}:***{}", &out[..start], &out[start + at..]);
            }
        }
    }
    // ?password=… (libpq's form) anywhere in the query.
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_settings_and_a_trace_url_that_is_not_a_web_link_refused() {
        let d = Settings::resolve(&ServeArgs::default()).unwrap();
        assert_eq!((d.otlp_endpoint, d.trace_url), (None, None));
        let ok = ServeArgs {
            otlp_endpoint: Some("http://localhost:4318/v1/traces".into()),
            trace_url: Some("http://localhost:16686/trace/{trace_id}".into()),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&ok).unwrap();
        assert_eq!(s.otlp_endpoint.as_deref(), ok.otlp_endpoint.as_deref());
        assert_eq!(s.trace_url.as_deref(), ok.trace_url.as_deref());
        for bad in ["javascript:alert(1)//{trace_id}", "http://jaeger/trace/"] {
            let err = Settings::resolve(&ServeArgs {
                trace_url: Some(bad.into()),
                ..ServeArgs::default()
            })
            .unwrap_err();
            assert!(
                err.contains("trace_url") && err.contains("{trace_id}"),
                "{err}"
            );
        }
    }

    #[test]
    fn settings_layer_flags_over_file_over_defaults() {
        let d = Settings::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(d.db_url, "sqlite://docket.db");
        assert_eq!(d.addr.to_string(), "127.0.0.1:7878");
        assert_eq!(d.role, Role::All);
        assert!(!d.insecure_dev_no_auth);
        let dir = std::env::temp_dir().join(format!("docket-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("docket.toml");
        std::fs::write(
            &f,
            "db = \"/var/lib/docket.db\"\naddr = \"127.0.0.1:9000\"\nrole = \"api\"\nconcurrency = 4\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f.clone()),
            addr: Some("127.0.0.1:9100".parse().unwrap()),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.db_url, "sqlite:///var/lib/docket.db");
        assert_eq!(s.addr.to_string(), "127.0.0.1:9100", "the flag wins");
        assert_eq!(s.role, Role::Api);
        assert_eq!(s.concurrency, 4);
        std::fs::write(&f, "colour = \"blue\"\n").unwrap();
        let err = Settings::resolve(&args).unwrap_err();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn urls_and_redaction() {
        assert_eq!(db_url("x.db"), "sqlite://x.db");
        assert_eq!(db_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(db_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            redact("postgres://user:secret@host/db"),
            "postgres://user:***@host/db"
        );
        assert_eq!(
            redact("postgres://user:p@ss@host:5432/db?schema=s&password=x2"),
            "postgres://user:***@host:5432/db?schema=s&password=***"
        );
        assert_eq!(
            redact("sqlite:///var/lib/a@b.db"),
            "sqlite:///var/lib/a@b.db"
        );
    }
}
