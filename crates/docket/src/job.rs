//! Job definitions: a handler plus its policy, timeout and lease.

use crate::{Ctx, JobError};
use docket_core::RetryPolicy;
use futures::future::BoxFuture;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub(crate) type ErasedHandler =
    Arc<dyn Fn(Ctx, Value) -> BoxFuture<'static, Result<Value, JobError>> + Send + Sync>;
pub(crate) type Validator = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;
/// How many of the job's runs this process may claim at `now`: `None` for
/// no limit. (An HTTP job's circuit breaker says 0 while it is turning
/// requests away, 1 when one run should probe or record a deferral.)
pub(crate) type ClaimGate = Arc<dyn Fn(docket_core::Timestamp) -> Option<usize> + Send + Sync>;

/// A named kind of work.
///
/// ```
/// use docket::{Job, JobError};
/// use std::time::Duration;
///
/// #[derive(serde::Deserialize)]
/// struct Email { to: String }
///
/// let job = Job::new("send-email", |_ctx, input: Email| async move {
///     if input.to.is_empty() {
///         return Err(JobError::invalid_input("`to` is empty"));
///     }
///     Ok(serde_json::json!({ "sent_to": input.to }))
/// })
/// .timeout(Duration::from_secs(10))
/// .lease(Duration::from_secs(30));
/// assert_eq!(job.name(), "send-email");
/// ```
#[derive(Clone)]
pub struct Job {
    pub(crate) name: String,
    pub(crate) handler: ErasedHandler,
    pub(crate) policy: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) lease: Duration,
    pub(crate) validator: Option<Validator>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) gate: Option<ClaimGate>,
    /// Served by remote workers over the worker protocol
    /// (docs/WORKER_PROTOCOL.md): the in-process worker never claims it.
    pub(crate) remote: bool,
    /// `Job::rate_limit`'s numbers, checked at registration.
    pub(crate) rate_limit: Option<(f64, u32)>,
    /// `Job::rate_limit_key`'s template, read at registration.
    pub(crate) rate_key: Option<String>,
    /// The checked rate limit (set by `Docket::register`).
    pub(crate) rate: Option<crate::rate::RateSpec>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

impl Job {
    /// A job whose handler takes typed input `I` (deserialized from the run's
    /// input; a failure ends the run `invalid_input` without retries) and
    /// returns typed output `O`.
    pub fn new<I, O, F, Fut>(name: impl Into<String>, handler: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, JobError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |ctx: Ctx, input: Value| {
            let handler = handler.clone();
            Box::pin(async move {
                let typed: I = serde_json::from_value(input).map_err(|e| {
                    JobError::invalid_input(format!("input does not match the job's type: {e}"))
                })?;
                let out = handler(ctx, typed).await?;
                serde_json::to_value(out)
                    .map_err(|e| JobError::permanent(format!("output cannot be serialized: {e}")))
            })
        });
        Job {
            name: name.into(),
            handler: erased,
            policy: RetryPolicy::default(),
            timeout: Duration::from_secs(60),
            lease: Duration::from_secs(5 * 60),
            validator: None,
            concurrency: None,
            gate: None,
            remote: false,
            rate_limit: None,
            rate_key: None,
            rate: None,
        }
    }

    /// A job whose handler runs in a remote worker (any language) over the
    /// worker protocol (docs/WORKER_PROTOCOL.md). The server knows its
    /// policy, timeout, lease and input check from this definition; the
    /// in-process worker never claims its runs, and expired leases of its
    /// runs are reaped through its policy like any other job's.
    ///
    /// ```
    /// use docket::{Job, RetryPolicy};
    /// use std::time::Duration;
    /// let job = Job::remote("send-welcome").timeout(Duration::from_secs(30));
    /// assert!(job.is_remote());
    /// ```
    pub fn remote(name: impl Into<String>) -> Self {
        let mut job = Job::new(name, |_ctx, _input: Value| async move {
            Err::<Value, _>(JobError::permanent(
                "a remote job's handler runs in a remote worker, not in this process",
            ))
        });
        job.remote = true;
        job
    }

    /// Whether remote workers serve this job ([`Job::remote`]).
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the handler timeout (default 60 s). It must be shorter than the
    /// lease, or registration refuses the job.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the lease length (default 5 min). Heartbeats extend it while the
    /// handler runs; a crashed worker's runs come back when it expires.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Limits how many runs of this job one worker runs (and holds) at once;
    /// the worker claims no more of them than that. The limit is per worker
    /// process, not across the cluster — except for a remote job, whose
    /// limit caps the job's running runs in the store across all remote
    /// workers (checked at each worker-protocol claim).
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = Some(limit.max(1));
        self
    }

    /// Limits how often the job's runs start, across every process on the
    /// database: a token bucket of `burst` tokens gaining `per_second` a
    /// second (docs/RATE_LIMITS.md). A run that finds no token is deferred
    /// to the time of the token it reserves (reason `rate_limited`, no
    /// attempt spent). Checked at registration: `per_second` must be
    /// positive and `burst` at least 1.
    ///
    /// ```
    /// let job = docket::Job::new("sync", |_ctx, _input: serde_json::Value| async move {
    ///     Ok(serde_json::json!({}))
    /// })
    /// .rate_limit(20.0, 5)
    /// .rate_limit_key("{{ tenant }}/{{ input.customer_id }}");
    /// # let _ = job;
    /// ```
    pub fn rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.rate_limit = Some((per_second, burst));
        self
    }

    /// One bucket per key instead of one for the job: a template over
    /// `{{ tenant }}`, `{{ job }}` and `{{ input.FIELD }}` (dotted paths).
    /// Any other variable is refused at registration; a run whose input
    /// lacks the field fails `invalid_input` naming it.
    pub fn rate_limit_key(mut self, template: impl Into<String>) -> Self {
        self.rate_key = Some(template.into());
        self
    }

    /// The checked rate limit, or what is wrong with it (naming the field).
    pub(crate) fn rate_spec(&self) -> Result<Option<crate::rate::RateSpec>, String> {
        let key = match &self.rate_key {
            Some(t) => Some(
                crate::rate::KeyTemplate::parse(t).map_err(|e| format!("rate_limit_key: {e}"))?,
            ),
            None => None,
        };
        match self.rate_limit {
            None if key.is_some() => Err("rate_limit_key: set without a rate_limit".to_string()),
            None => Ok(None),
            Some((per_second, burst)) => {
                let limit = docket_core::RateLimit::new(per_second, burst)
                    .map_err(|e| format!("rate_limit.{e}"))?;
                Ok(Some(crate::rate::RateSpec { limit, key }))
            }
        }
    }

    /// Adds an input check run before the handler; an `Err(message)` ends the
    /// run `failed` with `invalid_input` and that message, spending no retries.
    pub fn validate(
        mut self,
        f: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validator = Some(Arc::new(f));
        self
    }

    /// Claims at most `gate(now)` of the job's runs at a time.
    pub(crate) fn claim_gate(
        mut self,
        gate: impl Fn(docket_core::Timestamp) -> Option<usize> + Send + Sync + 'static,
    ) -> Self {
        self.gate = Some(Arc::new(gate));
        self
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        /// The longest lease (and so handler timeout) a job may declare.
        const MAX_LEASE: Duration = Duration::from_secs(366 * 86_400);
        if self.name.is_empty() || self.name.len() > 200 {
            return Err("the name must be 1 to 200 characters".into());
        }
        if self.timeout.is_zero() {
            return Err("the timeout must be positive".into());
        }
        if self.lease > MAX_LEASE {
            return Err(format!(
                "the lease ({:?}) is over {} days: a lease is renewed by heartbeats while the handler runs, so it only needs to cover a stall",
                self.lease,
                MAX_LEASE.as_secs() / 86_400
            ));
        }
        if self.timeout >= self.lease {
            return Err(format!(
                "the handler timeout ({:?}) must be shorter than the lease ({:?}), or a second worker could start the run while the first is still in it",
                self.timeout, self.lease
            ));
        }
        self.rate_spec()?;
        self.policy.validate().map_err(|e| e.to_string())
    }
}
