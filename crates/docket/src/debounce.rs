//! Debounced triggers: a job's (or one trigger's) rule that collapses
//! triggers with the same key within a window into one run
//! (docs/FLOW_CONTROL.md, "Debounce").

use docket_core::concurrency::{KeyTemplate, RenderError, MAX_KEY_LEN};
use docket_core::debounce::{check_window_ms, Keep};
use std::time::Duration;

/// Collapse triggers of one job whose key renders the same within a window
/// into one run.
///
/// - [`Debounce::first`] (`keep = "first"`, a throttle): the first trigger
///   makes a run that is due at once; triggers with the same key in the
///   `window` after it return that run, their input dropped.
/// - [`Debounce::last`] (`keep = "last"`, a debounce): the first trigger
///   makes a run that is due when the `window` after it ends (a fixed
///   window: later triggers do not push it back); each trigger inside the
///   window replaces the run's input while the run has not started.
///
/// The key is a template over `{{ tenant }}`, `{{ job }}` and
/// `{{ input.FIELD }}` (the template of concurrency keys), rendered once at
/// trigger time. Windows are per tenant and job whatever the key says.
///
/// ```
/// use docket::{Debounce, Job};
/// use std::time::Duration;
///
/// let job = Job::new("sync-customer", |_ctx, _input: serde_json::Value| async move {
///     Ok(serde_json::json!({}))
/// })
/// .debounce(Debounce::last("{{ input.customer_id }}", Duration::from_secs(30)));
/// # let _ = job;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Debounce {
    key: String,
    window: Duration,
    keep: Keep,
}

impl Debounce {
    /// A debounce keeping `keep`'s input.
    pub fn new(key: impl Into<String>, window: Duration, keep: Keep) -> Debounce {
        Debounce {
            key: key.into(),
            window,
            keep,
        }
    }

    /// Keep the first trigger's input; its run is due at once (a throttle).
    pub fn first(key: impl Into<String>, window: Duration) -> Debounce {
        Debounce::new(key, window, Keep::First)
    }

    /// Keep the last trigger's input; the run is due when the window after
    /// the first trigger ends.
    pub fn last(key: impl Into<String>, window: Duration) -> Debounce {
        Debounce::new(key, window, Keep::Last)
    }

    /// A debounce from its configured text (docket.toml's `debounce`
    /// table, the HTTP trigger body): `key` (default `{{ job }}`: every
    /// trigger of the job in the tenant), `window` (a duration like
    /// `"30s"`, 1 ms to 366 days) and `keep` (`first` or `last`). The error
    /// names the field (`key`, `window` or `keep`) and what is wrong.
    pub fn parse(
        key: Option<&str>,
        window: &str,
        keep: &str,
    ) -> Result<Debounce, (&'static str, String)> {
        let window_ms = docket_core::debounce::parse_window(window).map_err(|e| ("window", e))?;
        let keep: Keep = keep.parse().map_err(|e| ("keep", e))?;
        let key = key.unwrap_or("{{ job }}");
        KeyTemplate::parse(key).map_err(|e| ("key", e.0))?;
        Ok(Debounce::new(
            key,
            Duration::from_millis(window_ms.unsigned_abs()),
            keep,
        ))
    }

    /// The key template as given.
    pub fn key_template(&self) -> &str {
        &self.key
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Which input is kept.
    pub fn keep(&self) -> Keep {
        self.keep
    }

    /// The window in milliseconds, checked; the message names the field
    /// below the debounce (`window: …`).
    pub(crate) fn window_ms(&self) -> Result<i64, String> {
        let ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        check_window_ms(ms).map_err(|e| format!("window: {e}"))
    }

    /// The parsed key template; the message names the field (`key: …`).
    pub(crate) fn template(&self) -> Result<KeyTemplate, String> {
        KeyTemplate::parse(&self.key).map_err(|e| format!("key: {}", e.0))
    }

    /// Checks the window and the template (the message names the field
    /// below the debounce: `window: …`, `key: …`).
    pub(crate) fn check(&self) -> Result<(), String> {
        self.window_ms()?;
        self.template()?;
        Ok(())
    }

    /// The store's form for a run of `job` in `tenant` with `input`, or what
    /// is wrong (naming the field: `debounce.key`, `debounce.window`).
    pub(crate) fn render(
        &self,
        tenant: &str,
        job: &str,
        input: &serde_json::Value,
    ) -> Result<docket_store::DebounceKey, String> {
        let window_ms = self.window_ms().map_err(|e| format!("debounce.{e}"))?;
        let template = self.template().map_err(|e| format!("debounce.{e}"))?;
        let key = template.render(tenant, job, input).map_err(|e| match e {
            RenderError::Missing(path) => {
                format!("the debounce key needs `{path}`, which the input does not have")
            }
        })?;
        if key.len() > MAX_KEY_LEN {
            return Err(format!(
                "the debounce key is {} bytes, over the {MAX_KEY_LEN} allowed",
                key.len()
            ));
        }
        Ok(docket_store::DebounceKey {
            key,
            keep: self.keep,
            window_ms,
        })
    }
}
