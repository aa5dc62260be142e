//! Jobs without code: jobs whose handler is an HTTP request declared in
//! `docket.toml` (the format is in `docs/HTTP_JOBS.md`).
//!
//! ```toml
//! [connections.crm]
//! base_url = "https://crm.example.com/api"
//! token_env = "CRM_TOKEN"                     # sent as `Authorization: Bearer …`
//!
//! [jobs.send-email]
//! connection = "crm"
//! method = "POST"
//! path = "/emails"
//! idempotency_key = "{{ input.prospect_id }}/send-email/{{ input.campaign }}/v1"
//! body = { to = "{{ input.email }}", campaign = "{{ input.campaign }}" }
//! reconcile = { path = "/emails?key={{ idempotency_key | urlencode }}" }
//! ```
//!
//! Each attempt of such a job:
//!
//! 1. evaluates `when`: false → the step is recorded skipped and the run
//!    completes (the connection is not needed);
//! 2. renders the idempotency key, URL, headers and body from the run's
//!    input and variables (a field that is not there → `invalid_input`
//!    naming it);
//! 3. evaluates `approval`: true → the run waits in `needs_input` with the
//!    request it would send; approved → sent; rejected → `on_reject`;
//! 4. fails at once with `connection_unresolved` (no request) when the
//!    connection is disabled or expired for the run's tenant, or its
//!    credential cannot be read;
//! 5. asks the connection's circuit breaker: open → rescheduled to the reset
//!    time with reason `circuit_open`, no attempt spent (the worker claims
//!    one run of the connection's jobs per open period, to record that
//!    decision, then none until the reset time, where one run probes);
//! 6. sends the request as a ledger-guarded action with an `Idempotency-Key`
//!    header (the same key on every attempt), reconciling first when an
//!    earlier attempt left the outcome unknown; every response (and every
//!    transport failure) is an `http_response` event with status, class,
//!    timing and a body excerpt of at most 2 KiB, never a credential;
//! 7. classifies the answer (see [`default_verdict`]) and lets the job's
//!    retry policy decide.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let docket = docket::Docket::open("sqlite://docket.db").await?;
//! let http = docket::http::HttpJobs::load("docket.toml")?;
//! http.install(&docket)?;
//! for b in http.breakers() {
//!     println!("{}: {}", b.connection, b.state.as_str());
//! }
//! # Ok(()) }
//! ```

mod breaker;
mod classify;
mod condition;
mod config;
mod connections;
mod exec;
mod schema;
mod template;

pub use breaker::{BreakerConfig, BreakerPhase, BreakerState};
pub use classify::{default_verdict, http_date, Verdict};
pub use config::{
    HttpConfigError, OnReject, OnTimeout, PrunerSettings, DEFAULT_KEY_TEMPLATE,
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT_MS, MAX_STEPS,
};
pub use connections::ConnectionInfo;

/// A connection's shared limits ([`HttpJobs::limits`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ConnectionLimits {
    /// The connection.
    pub connection: String,
    /// Its rate limit, if it has one.
    pub rate_limit: Option<RateLimitInfo>,
    /// Its rate limit's buckets as stored (one, or one per key), by key.
    pub buckets: Vec<BucketInfo>,
    /// Its circuit breaker, as stored.
    pub breaker: BreakerState,
}

/// A rate limit as configured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RateLimitInfo {
    /// Tokens a second.
    pub per_second: f64,
    /// The bucket's capacity.
    pub burst: u32,
    /// The key template, when each key has its own bucket.
    pub key: Option<String>,
}

/// One bucket now.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BucketInfo {
    /// Its key (`connection:crm` or `connection:crm/<key>`).
    pub key: String,
    /// Whole tokens left now.
    pub tokens_left: u64,
    /// When the next token is due (now when one is left).
    pub next_token_at: docket_core::Timestamp,
    /// Runs holding a reserved token, not yet used.
    pub reserved: u64,
}
pub use docket_store::{ConnectionAudit, ConnectionState, ConnectionStatus};
pub use exec::EXCERPT_BYTES;

use crate::{Actor, Ctx, Docket, Error, Job, Result};
use breaker::Breaker;
use docket_core::{Clock, SystemClock};
use docket_store::ConnectionChange;
use exec::Shared;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The directory relative file names of a configuration file are read
/// from, absolute so that messages name the file a worker really looks for.
fn config_dir(path: &Path) -> std::path::PathBuf {
    // `docket.toml` has the parent "" (not "."), which has no absolute form.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The HTTP jobs and connections of one `docket.toml`. Cloning is cheap and
/// shares the breakers.
#[derive(Clone)]
pub struct HttpJobs {
    shared: Arc<Shared>,
    docket: Arc<OnceLock<Docket>>,
}

impl std::fmt::Debug for HttpJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpJobs")
            .field("jobs", &self.job_names())
            .field("connections", &self.connection_names())
            .finish()
    }
}

impl HttpJobs {
    /// Reads and checks a `docket.toml`. Relative file names in it
    /// (`secrets_file`, `input_schema_file`) are relative to its directory.
    /// Sections other than `[connections.*]` and `[jobs.*]` are ignored
    /// (they belong to the server). Credentials are not read here but at
    /// each request, so a rotated secret is picked up without a restart.
    pub fn load(path: impl AsRef<Path>) -> std::result::Result<HttpJobs, HttpConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| HttpConfigError {
            file: path.display().to_string(),
            problems: vec![("file".into(), format!("cannot read it: {e}"))],
        })?;
        Self::build(&text, &path.display().to_string(), &config_dir(path))
    }

    /// Like [`HttpJobs::load`], from text; relative file names are taken
    /// from `base_dir`.
    pub fn from_toml(
        text: &str,
        base_dir: impl AsRef<Path>,
    ) -> std::result::Result<HttpJobs, HttpConfigError> {
        Self::build(text, "<string>", base_dir.as_ref())
    }

    fn build(text: &str, file: &str, dir: &Path) -> std::result::Result<HttpJobs, HttpConfigError> {
        let compiled = config::compile(text, file, dir)?;
        let breakers = compiled
            .connections
            .values()
            .map(|c| {
                (
                    c.name.clone(),
                    Arc::new(Breaker::new(&c.name, c.breaker.clone())),
                )
            })
            .collect();
        let client = reqwest::Client::builder()
            // A redirect of a POST would silently become a GET: never follow.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("docket/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpConfigError {
                file: file.to_string(),
                problems: vec![("http client".into(), e.to_string())],
            })?;
        Ok(HttpJobs {
            shared: Arc::new(Shared {
                compiled,
                breakers,
                client,
                probe_watch: Default::default(),
            }),
            docket: Arc::new(OnceLock::new()),
        })
    }

    /// The `[retention]` table and the jobs' `retention` tables (empty:
    /// nothing is pruned). Already validated.
    pub fn retention(&self) -> crate::retention::RetentionConfig {
        self.shared.compiled.retention.clone()
    }

    /// The pruner's `interval` and `batch` from the top-level `[retention]`
    /// table (`None`: the pruner's defaults).
    pub fn pruner_settings(&self) -> PrunerSettings {
        self.shared.compiled.pruner
    }

    /// The configured job names, sorted.
    pub fn job_names(&self) -> Vec<String> {
        self.shared.compiled.jobs.keys().cloned().collect()
    }

    /// The remote jobs (`remote = true`) of the file, sorted: served by
    /// remote workers over the worker protocol.
    pub fn remote_job_names(&self) -> Vec<String> {
        self.shared.compiled.remote.keys().cloned().collect()
    }

    /// The configured connection names, sorted.
    pub fn connection_names(&self) -> Vec<String> {
        self.shared.compiled.connections.keys().cloned().collect()
    }

    /// The engine jobs (handler, retry policy, timeout, lease, input schema
    /// check), to register yourself; [`HttpJobs::install`] does it for you.
    pub fn jobs(&self) -> Vec<Job> {
        self.shared
            .compiled
            .jobs
            .values()
            .map(|spec| {
                let shared = self.shared.clone();
                let name = spec.name.clone();
                let mut job = Job::new(spec.name.clone(), move |ctx: Ctx, input: Value| {
                    exec::run(shared.clone(), name.clone(), ctx, input)
                })
                .retry(spec.policy.clone())
                .timeout(spec.job_timeout)
                .lease(spec.lease);
                if let Some(n) = spec.concurrency {
                    job = job.concurrency_limit(n);
                }
                if let Some(t) = &spec.concurrency_key {
                    job = job.concurrency_key(t.clone());
                }
                if let Some(d) = &spec.debounce {
                    job = job.debounce(d.clone());
                }
                if let Some(r) = &spec.rate {
                    job = job.rate_limit(r.limit.per_second, r.limit.burst);
                    if let Some(k) = &r.key {
                        job = job.rate_limit_key(k.source());
                    }
                }
                if let Some(schema) = spec.schema.clone() {
                    job = job.validate(move |input| schema.check(input));
                }
                // An open breaker keeps this process from claiming the
                // job's runs (see `Breaker::claim_limit`).
                // A workflow's runs are not held back: a run that wakes from
                // a sleep or a signal may have no request to send soon, and
                // each request still asks the breaker before it goes out.
                let breaker = match &spec.work {
                    config::Work::Single(r) => r
                        .connection
                        .as_ref()
                        .and_then(|c| self.shared.breakers.get(c).cloned()),
                    config::Work::Steps(_) => None,
                };
                if let Some(b) = breaker {
                    job = job.claim_gate(move |now| b.claim_limit(now));
                }
                job
            })
            .chain(self.shared.compiled.remote.values().map(|spec| {
                let mut job = Job::remote(spec.name.clone())
                    .retry(spec.policy.clone())
                    .timeout(spec.job_timeout)
                    .lease(spec.lease);
                if let Some(n) = spec.concurrency {
                    job = job.concurrency_limit(n);
                }
                if let Some(t) = &spec.concurrency_key {
                    job = job.concurrency_key(t.clone());
                }
                if let Some(d) = &spec.debounce {
                    job = job.debounce(d.clone());
                }
                if let Some(schema) = spec.schema.clone() {
                    job = job.validate(move |input| schema.check(input));
                }
                job
            }))
            .collect()
    }

    /// Registers every job on `docket` (replacing jobs of the same names)
    /// and binds the connection functions below to its store and clock.
    pub fn install(&self, docket: &Docket) -> Result<()> {
        for job in self.jobs() {
            docket.register(job)?;
        }
        let _ = self.docket.set(docket.clone());
        Ok(())
    }

    fn installed(&self) -> Result<&Docket> {
        self.docket.get().ok_or_else(|| {
            Error::InvalidInput("HttpJobs is not installed on a Docket: call install first".into())
        })
    }

    fn now(&self) -> docket_core::Timestamp {
        match self.docket.get() {
            Some(d) => d.clock().now(),
            None => SystemClock.now(),
        }
    }

    /// Connections whose credential cannot be read now, with why (never the
    /// value): worth a warning at start, since their runs will fail
    /// `connection_unresolved`.
    pub fn credential_problems(&self) -> Vec<(String, String)> {
        self.shared
            .compiled
            .connections
            .values()
            .filter_map(|c| c.credential().err().map(|why| (c.name.clone(), why)))
            .collect()
    }

    /// Reads every breaker's shared state from the store into this
    /// process's copy, so that [`HttpJobs::breakers`] shows what every
    /// process sees (a no-op before [`HttpJobs::install`]).
    pub async fn refresh_breakers(&self) {
        if let Some(d) = self.docket.get() {
            for b in self.shared.breakers.values() {
                b.refresh(d.store()).await;
            }
        }
    }

    /// A connection's shared limits: its rate limit with each of its
    /// buckets (tokens left now, when the next token is due, runs holding a
    /// reserved token) and its circuit breaker, all as stored.
    pub async fn limits(&self, name: &str) -> Result<ConnectionLimits> {
        let def = self.connection_def(name)?;
        let docket = self.installed()?;
        let now = docket.clock().now();
        let b = &self.shared.breakers[name];
        b.refresh(docket.store()).await;
        let prefix = crate::rate::connection_bucket(name);
        let buckets = match &def.rate {
            None => Vec::new(),
            Some(spec) => docket
                .store()
                .rate_buckets(prefix.clone())
                .await?
                .into_iter()
                // `connection:crm` and `connection:crm/…`, not `connection:crm2`.
                .filter(|r| r.key == prefix || r.key.starts_with(&format!("{prefix}/")))
                .map(|r| {
                    let bucket = docket_core::rate::Bucket {
                        tokens: r.tokens,
                        refilled_at: r.refilled_at,
                    };
                    let (tokens_left, next) =
                        docket_core::rate::status(Some(bucket), &spec.limit, now);
                    BucketInfo {
                        key: r.key,
                        tokens_left,
                        next_token_at: next,
                        reserved: r.reserved,
                    }
                })
                .collect(),
        };
        Ok(ConnectionLimits {
            connection: name.to_string(),
            rate_limit: def.rate.as_ref().map(|r| RateLimitInfo {
                per_second: r.limit.per_second,
                burst: r.limit.burst,
                key: r.key.as_ref().map(|k| k.source().to_string()),
            }),
            buckets,
            breaker: b.state(now),
        })
    }

    /// Every connection's circuit breaker, by connection name, as this
    /// process last saw the shared state ([`HttpJobs::refresh_breakers`]
    /// reads it again).
    pub fn breakers(&self) -> Vec<BreakerState> {
        let now = self.now();
        self.shared
            .breakers
            .values()
            .map(|b| b.state(now))
            .collect()
    }

    fn connection_def(&self, name: &str) -> Result<&connections::ConnectionDef> {
        self.shared.compiled.connections.get(name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "unknown connection `{name}` (known: {})",
                self.connection_names().join(", ")
            ))
        })
    }

    /// One connection as a tenant sees it: base URL, where its credential
    /// comes from (never the value), its status, breaker and jobs.
    pub async fn connection(&self, tenant: &str, name: &str) -> Result<ConnectionInfo> {
        let def = self.connection_def(name)?;
        let docket = self.installed()?;
        let state = docket
            .store()
            .connection_state(tenant.to_string(), name.to_string())
            .await?;
        let jobs = self
            .shared
            .compiled
            .jobs
            .values()
            .filter(|j| j.uses_connection(name))
            .map(|j| j.name.clone())
            .collect();
        let b = &self.shared.breakers[name];
        b.refresh(docket.store()).await;
        let breaker = b.state(self.now());
        Ok(def.info(tenant, state, breaker, jobs))
    }

    /// Every connection as a tenant sees it, by name.
    pub async fn connections(&self, tenant: &str) -> Result<Vec<ConnectionInfo>> {
        let mut out = Vec::new();
        for name in self.connection_names() {
            out.push(self.connection(tenant, &name).await?);
        }
        Ok(out)
    }

    /// Sets a connection's status for a tenant, with an audit record (who,
    /// when, comment). Stored in the database: it survives restarts and
    /// every process sharing the store sees it at its runs' next attempt.
    pub async fn set_connection_status(
        &self,
        tenant: &str,
        name: &str,
        status: ConnectionStatus,
        actor: &Actor,
    ) -> Result<ConnectionState> {
        self.connection_def(name)?;
        let docket = self.installed()?;
        Ok(docket
            .store()
            .set_connection_status(ConnectionChange {
                tenant: tenant.to_string(),
                name: name.to_string(),
                status,
                actor: actor.name.clone(),
                comment: actor.comment.clone(),
                now: docket.clock().now(),
            })
            .await?)
    }

    /// Enables a connection (e.g. after re-authorizing it); failed runs can
    /// then be retried.
    pub async fn enable_connection(
        &self,
        tenant: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<ConnectionState> {
        self.set_connection_status(tenant, name, ConnectionStatus::Enabled, actor)
            .await
    }

    /// Disables a connection: runs that need it fail `connection_unresolved`
    /// before any request.
    pub async fn disable_connection(
        &self,
        tenant: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<ConnectionState> {
        self.set_connection_status(tenant, name, ConnectionStatus::Disabled, actor)
            .await
    }

    /// Marks a connection's credentials expired: runs that need it fail
    /// `connection_unresolved` until it is enabled again.
    pub async fn expire_connection(
        &self,
        tenant: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<ConnectionState> {
        self.set_connection_status(tenant, name, ConnectionStatus::Expired, actor)
            .await
    }

    /// A connection's audit trail for a tenant, oldest first.
    pub async fn connection_audit(&self, tenant: &str, name: &str) -> Result<Vec<ConnectionAudit>> {
        self.connection_def(name)?;
        Ok(self
            .installed()?
            .store()
            .connection_audit(tenant.to_string(), name.to_string())
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_files_are_read_from_the_config_files_absolute_directory() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(config_dir(Path::new("docket.toml")), cwd);
        assert_eq!(config_dir(Path::new("conf/docket.toml")), cwd.join("conf"));
        assert_eq!(
            config_dir(Path::new("/etc/docket/docket.toml")),
            Path::new("/etc/docket")
        );
    }
}
