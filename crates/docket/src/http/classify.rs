//! What an HTTP response or a transport failure means for the run.
//!
//! | response | class | the policy then |
//! | --- | --- | --- |
//! | 2xx | ok | the action is committed |
//! | 429 | `rate_limited` (Retry-After honoured: seconds or an HTTP date) | retries |
//! | 502, 503, 504 | `unavailable` (Retry-After honoured) | retries |
//! | other 5xx except 501, 505 | `unavailable` | retries |
//! | 501, 505 | `permanent` | fails `permanent_error` |
//! | 400, 422 | `invalid_input` | fails `invalid_input` |
//! | 401, 403 | `unauthorized` | fails `permanent_error` |
//! | 404 | `not_found` | fails `permanent_error` |
//! | 413 | `content_too_large` | fails `content_too_large` |
//! | other 4xx, 1xx, 3xx (redirects are not followed) | `permanent` | fails `permanent_error` |
//! | no answer within the timeout, after the request was sent | `timeout` | ledger `unknown`: reconcile, then retry |
//! | connection refused, reset, closed mid-answer, DNS failure, connect timeout | `network` | retries |
//!
//! Each job can override single statuses: `[jobs.X.classify] 409 = "duplicate"`,
//! `404 = "ok"`, `500 = "permanent"`.

use docket_core::{ErrorClass, Timestamp};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::UNIX_EPOCH;

/// What a response status means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Success: the action is committed with the response as its result.
    Ok,
    /// A failure of this class (`duplicate` completes the action as
    /// already done).
    Failure(ErrorClass),
}

impl Verdict {
    /// `ok` or the class's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Failure(c) => c.as_str(),
        }
    }
}

impl Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The default meaning of a status (the table in this module's docs).
pub fn default_verdict(status: u16) -> Verdict {
    use ErrorClass::*;
    match status {
        200..=299 => Verdict::Ok,
        429 => Verdict::Failure(RateLimited),
        501 | 505 => Verdict::Failure(Permanent),
        500..=599 => Verdict::Failure(Unavailable),
        400 | 422 => Verdict::Failure(InvalidInput),
        401 | 403 => Verdict::Failure(Unauthorized),
        404 => Verdict::Failure(NotFound),
        413 => Verdict::Failure(ContentTooLarge),
        _ => Verdict::Failure(Permanent),
    }
}

/// A job's classification: the defaults plus its overrides.
#[derive(Clone, Debug, Default)]
pub(crate) struct Classifier {
    overrides: BTreeMap<u16, Verdict>,
}

impl Classifier {
    /// Parses `[jobs.X.classify]`: status code → `ok` or an error class.
    pub(crate) fn parse(map: &BTreeMap<String, String>) -> Result<Classifier, String> {
        let mut overrides = BTreeMap::new();
        for (k, v) in map {
            let code: u16 = k
                .trim()
                .parse()
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| format!("`{k}` is not an HTTP status code (100 to 599)"))?;
            let verdict = if v == "ok" {
                Verdict::Ok
            } else {
                Verdict::Failure(
                    v.parse::<ErrorClass>()
                        .map_err(|e| format!("status {code}: {e}, or ok"))?,
                )
            };
            overrides.insert(code, verdict);
        }
        Ok(Classifier { overrides })
    }

    /// The verdict for a status.
    pub(crate) fn classify(&self, status: u16) -> Verdict {
        self.overrides
            .get(&status)
            .copied()
            .unwrap_or_else(|| default_verdict(status))
    }
}

/// A Retry-After header's reset time: delta seconds from `now` (the docket
/// clock) or an HTTP date. `None` when unparseable.
pub(crate) fn retry_after(value: &str, now: Timestamp) -> Option<Timestamp> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = v.parse().ok()?;
        return Some(now.plus_millis(secs.checked_mul(1_000)?));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let ms = at.duration_since(UNIX_EPOCH).ok()?.as_millis();
    Some(Timestamp(i64::try_from(ms).ok()?))
}

/// Formats an instant as an HTTP date (for tests and messages).
pub fn http_date(t: Timestamp) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_millis(t.0.max(0) as u64))
}

/// The class of a transport failure. A failure to connect proves the
/// request was not sent (`network`, retried without reconciling); a timeout
/// after sending proves nothing (`timeout`: the ledger says `unknown`).
pub(crate) fn transport_class(e: &reqwest::Error) -> ErrorClass {
    if e.is_connect() {
        ErrorClass::Network
    } else if e.is_timeout() {
        ErrorClass::Timeout
    } else {
        ErrorClass::Network
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table() {
        use ErrorClass::*;
        for (s, v) in [
            (200, Verdict::Ok),
            (204, Verdict::Ok),
            (429, Verdict::Failure(RateLimited)),
            (502, Verdict::Failure(Unavailable)),
            (503, Verdict::Failure(Unavailable)),
            (504, Verdict::Failure(Unavailable)),
            (500, Verdict::Failure(Unavailable)),
            (501, Verdict::Failure(Permanent)),
            (400, Verdict::Failure(InvalidInput)),
            (422, Verdict::Failure(InvalidInput)),
            (401, Verdict::Failure(Unauthorized)),
            (403, Verdict::Failure(Unauthorized)),
            (404, Verdict::Failure(NotFound)),
            (413, Verdict::Failure(ContentTooLarge)),
            (409, Verdict::Failure(Permanent)),
            (418, Verdict::Failure(Permanent)),
            (302, Verdict::Failure(Permanent)),
        ] {
            assert_eq!(default_verdict(s), v, "status {s}");
        }
    }

    #[test]
    fn overrides() {
        let c = Classifier::parse(&BTreeMap::from([
            ("409".to_string(), "duplicate".to_string()),
            ("404".to_string(), "ok".to_string()),
        ]))
        .unwrap();
        assert_eq!(c.classify(409), Verdict::Failure(ErrorClass::Duplicate));
        assert_eq!(c.classify(404), Verdict::Ok);
        assert_eq!(c.classify(503), Verdict::Failure(ErrorClass::Unavailable));
        let e = Classifier::parse(&BTreeMap::from([("4xx".into(), "ok".into())])).unwrap_err();
        assert!(e.contains("`4xx`"), "{e}");
        let e = Classifier::parse(&BTreeMap::from([("409".into(), "dupe".into())])).unwrap_err();
        assert!(e.contains("dupe"), "{e}");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = Timestamp(1_767_225_600_000);
        assert_eq!(retry_after("120", now), Some(now.plus_millis(120_000)));
        let date = http_date(now.plus_millis(90_000));
        assert_eq!(retry_after(&date, now), Some(now.plus_millis(90_000)));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("", now), None);
    }
}
