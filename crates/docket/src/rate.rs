//! Rate limits of jobs and connections, shared by every process on the
//! database (docs/RATE_LIMITS.md).
//!
//! A limited run takes a token from its bucket right after it is claimed
//! (a job's limit) or right before its request is sent (a connection's
//! limit). With no token left it reserves the next one and is deferred to
//! that token's time, as a retry decision with reason `rate_limited` that
//! spends no attempt; when it comes back it goes ahead on the token it
//! reserved. So a run is deferred at most once per limit, however long
//! the queue, and that deferral is the one recorded decision.

use crate::error::Control;
use crate::JobError;
use docket_core::rate::RateLimit;
use docket_core::{RunId, Timestamp};
use docket_store::{DynStore, RateTake, RateTakeRequest};
use serde_json::Value;

/// A bucket key template: text with `{{ tenant }}`, `{{ job }}` and
/// `{{ input.a.b }}` filled in per run. Anything else between `{{ }}` is
/// refused when the template is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Tenant,
    Job,
    Input(Vec<String>),
}

impl KeyTemplate {
    /// Reads a template; the error names what is wrong.
    pub(crate) fn parse(source: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("`{source}`: a `{{{{` is not closed"))?;
            let var = after[..close].trim();
            parts.push(match var {
                "tenant" => Part::Tenant,
                "job" => Part::Job,
                v if v.starts_with("input.") && v.len() > 6 => {
                    let path: Vec<String> = v[6..].split('.').map(str::to_string).collect();
                    if path.iter().any(|p| p.is_empty()) {
                        return Err(format!("`{source}`: `{v}` is not a field path"));
                    }
                    Part::Input(path)
                }
                v => {
                    return Err(format!(
                        "`{source}`: unknown variable `{v}` (use tenant, job or input.FIELD)"
                    ))
                }
            });
            rest = &after[close + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("`{source}`: a `}}}}` has no `{{{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(KeyTemplate {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// The key of one run; a missing input field is named.
    pub(crate) fn render(&self, tenant: &str, job: &str, input: &Value) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Tenant => out.push_str(tenant),
                Part::Job => out.push_str(job),
                Part::Input(path) => {
                    let mut v = input;
                    for seg in path {
                        v = v.get(seg).ok_or_else(|| {
                            format!("the input has no field `input.{}`", path.join("."))
                        })?;
                    }
                    match v {
                        Value::String(s) => out.push_str(s),
                        Value::Null => {
                            return Err(format!(
                                "the input field `input.{}` is null",
                                path.join(".")
                            ))
                        }
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A rate limit with its optional key template.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RateSpec {
    pub(crate) limit: RateLimit,
    pub(crate) key: Option<KeyTemplate>,
}

impl RateSpec {
    /// The bucket of one run: `PREFIX` alone, or `PREFIX/<rendered key>`.
    pub(crate) fn bucket(
        &self,
        prefix: &str,
        tenant: &str,
        job: &str,
        input: &Value,
    ) -> Result<String, String> {
        Ok(match &self.key {
            None => prefix.to_string(),
            Some(t) => format!("{prefix}/{}", t.render(tenant, job, input)?),
        })
    }
}

/// Takes a token of `bucket` for `run`, or defers the run to its reserved
/// token (a [`Control::RateLimited`] error; `?` propagates it). A store
/// error is a retryable `unavailable` failure: nothing was sent.
pub(crate) async fn take(
    store: &DynStore,
    bucket: &str,
    limit: RateLimit,
    run: RunId,
    now: Timestamp,
) -> Result<(), JobError> {
    let req = RateTakeRequest {
        key: bucket.to_string(),
        holder: run.to_string(),
        limit,
        now,
    };
    answer(bucket, store.rate_take(req).await)
}

/// What a take's answer means for the run: go ahead, deferred to its
/// reserved token (a [`Control::RateLimited`] error), or, when the store
/// failed, a retryable `unavailable` failure (nothing was sent).
pub(crate) fn answer(
    bucket: &str,
    taken: Result<RateTake, docket_store::StoreError>,
) -> Result<(), JobError> {
    match taken {
        Ok(RateTake::Granted) => Ok(()),
        Ok(RateTake::Deferred { until }) => Err(JobError::control(
            Control::RateLimited {
                until,
                key: bucket.to_string(),
            },
            &format!(
                "rate limit {}: next token at {}",
                display(bucket),
                until.to_rfc3339()
            ),
        )),
        Err(e) => Err(JobError::unavailable(format!(
            "rate limit {}: the bucket could not be read: {e}",
            display(bucket)
        ))),
    }
}

/// A bucket's name for people: its key without the `job:` or
/// `connection:` prefix (`payments`, `sync/acme`).
pub(crate) fn display(bucket: &str) -> &str {
    bucket.split_once(':').map_or(bucket, |(_, name)| name)
}

/// The bucket of a job's own limit.
pub(crate) fn job_bucket(job: &str) -> String {
    format!("job:{job}")
}

/// The bucket of a connection's limit.
pub(crate) fn connection_bucket(connection: &str) -> String {
    format!("connection:{connection}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_templates_render_and_refuse_unknown_variables() {
        let t = KeyTemplate::parse("{{ tenant }}/{{job}}/{{ input.customer.id }}").unwrap();
        assert_eq!(
            t.render("acme", "sync", &json!({"customer": {"id": 42}}))
                .unwrap(),
            "acme/sync/42"
        );
        assert_eq!(
            t.render("acme", "sync", &json!({})).unwrap_err(),
            "the input has no field `input.customer.id`"
        );
        for bad in ["{{ variables.x }}", "{{ input. }}", "{{ tenant", "a}}"] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad}");
        }
        assert!(KeyTemplate::parse("{{ nope }}")
            .unwrap_err()
            .contains("unknown variable `nope`"));
    }
}
