//! Job definitions: a handler plus its policy, timeout and lease.

use crate::{Ctx, JobError};
use docket_core::concurrency::KeyTemplate;
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
    /// The concurrency limit (`concurrency_limit`), enforced by the store
    /// across every process per concurrency key.
    pub(crate) concurrency: Option<usize>,
    /// The key template as given, parsed at registration (`None`: the
    /// job-wide key, the job's name).
    pub(crate) concurrency_key: Option<String>,
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
    /// Collapses triggers with the same key within a window
    /// (`Job::debounce`), checked at registration.
    pub(crate) debounce: Option<crate::Debounce>,
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
            concurrency_key: None,
            debounce: None,
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

    /// The job-wide concurrency limit: the same as
    /// [`Job::concurrency_limit`]. At most `limit` runs of this job (with
    /// [`Job::concurrency_key`]: per key) run at once across EVERY process
    /// on the database, in-process and remote workers alike; the store
    /// enforces it at each claim (docs/FLOW_CONTROL.md). (Before concurrency
    /// keys this limit was per worker process.) A limit of 0 is refused at
    /// registration.
    pub fn concurrency(self, limit: usize) -> Self {
        self.concurrency_limit(limit)
    }

    /// At most `limit` runs with the same concurrency key are running at
    /// once, across every process on the database. Without
    /// [`Job::concurrency_key`] the key is the job's name (a job-wide limit).
    /// A run held back by its key is not a failure and spends no attempt: it
    /// stays pending and is claimed as soon as a slot frees. A limit of 0 is
    /// refused at registration.
    ///
    /// ```
    /// use docket::Job;
    /// let job = Job::remote("sync-customer")
    ///     .concurrency_key("{{ tenant }}/{{ input.customer_id }}")
    ///     .concurrency_limit(2);
    /// assert_eq!(job.concurrency_key_template(), Some("{{ tenant }}/{{ input.customer_id }}"));
    /// ```
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency = Some(limit);
        self
    }

    /// The concurrency key template, over `tenant`, `job` and
    /// `input.<field>` (e.g. `"{{ tenant }}/{{ input.customer_id }}"`).
    /// Rendered once, when a run is triggered, and stored on the run; a
    /// trigger whose input lacks a field the key needs is refused
    /// (`invalid_input`, naming the field). Needs
    /// [`Job::concurrency_limit`]; an unknown variable is refused at
    /// registration.
    pub fn concurrency_key(mut self, template: impl Into<String>) -> Self {
        self.concurrency_key = Some(template.into());
        self
    }

    /// The concurrency key template, if one was set.
    pub fn concurrency_key_template(&self) -> Option<&str> {
        self.concurrency_key.as_deref()
    }

    /// The concurrency key and limit of a run of this job in `tenant` with
    /// `input` (`Ok(None)`: the job has no limit), or the input field the
    /// key needs and the input lacks.
    pub(crate) fn concurrency_of(
        &self,
        tenant: &str,
        input: &serde_json::Value,
    ) -> Result<Option<docket_store::ConcurrencyKey>, String> {
        let Some(limit) = self.concurrency else {
            return Ok(None);
        };
        let template = match &self.concurrency_key {
            Some(t) => KeyTemplate::parse(t).map_err(|e| e.0)?,
            None => KeyTemplate::job_wide(),
        };
        let key = template
            .render(tenant, &self.name, input)
            .map_err(|e| e.to_string())?;
        if key.len() > docket_core::concurrency::MAX_KEY_LEN {
            return Err(format!(
                "the concurrency key is {} bytes, over the {} allowed",
                key.len(),
                docket_core::concurrency::MAX_KEY_LEN
            ));
        }
        Ok(Some(docket_store::ConcurrencyKey {
            key,
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        }))
    }

    /// Collapses triggers of this job whose key renders the same within a
    /// window into one run, keeping the first input (its run due at once)
    /// or the last (its run due when the window ends): see
    /// [`crate::Debounce`] and docs/FLOW_CONTROL.md, "Debounce". A window of
    /// zero, over 366 days, or an unknown template variable is refused at
    /// registration, naming the field (`debounce.window`, `debounce.key`).
    /// A trigger may give its own ([`crate::TriggerOptions::debounce`]).
    pub fn debounce(mut self, debounce: crate::Debounce) -> Self {
        self.debounce = Some(debounce);
        self
    }

    /// The job's debounce, if it has one.
    pub fn debounce_rule(&self) -> Option<&crate::Debounce> {
        self.debounce.as_ref()
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
        if self.concurrency == Some(0) {
            return Err("concurrency_limit must be at least 1".into());
        }
        if let Some(t) = &self.concurrency_key {
            if self.concurrency.is_none() {
                return Err(
                    "concurrency_key needs concurrency_limit (how many runs per key may run at once)"
                        .into(),
                );
            }
            KeyTemplate::parse(t).map_err(|e| format!("concurrency_key: {}", e.0))?;
        }
        if self.timeout >= self.lease {
            return Err(format!(
                "the handler timeout ({:?}) must be shorter than the lease ({:?}), or a second worker could start the run while the first is still in it",
                self.timeout, self.lease
            ));
        }
        if let Some(d) = &self.debounce {
            d.check().map_err(|e| format!("debounce.{e}"))?;
        }
        self.rate_spec()?;
        self.policy.validate().map_err(|e| e.to_string())
    }
}
