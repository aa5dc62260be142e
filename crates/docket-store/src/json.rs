//! The one bound on stored JSON, and tolerant decoding of JSON columns.
//!
//! Why a bound: both backends read JSON columns back with `serde_json`,
//! whose parser refuses values nested 128 or more arrays/objects deep
//! (a guard against stack overflow), while writing has no such limit
//! (`Value::to_string`, and PostgreSQL's `jsonb` accepts thousands of
//! levels). So a value could be stored that could never be read again, and
//! because a list decodes every row, one such row failed the whole list.
//! Docket therefore refuses, at the write, any value nested deeper than
//! [`MAX_JSON_DEPTH`] levels, with [`StoreError::TooDeep`] naming the field
//! and the depth; the 27 levels between that bound and the parser's leave
//! room for the envelopes Docket wraps around a caller's value (an event's
//! payload, an HTTP action's `{"status", "body"}`), which are checked too.
//!
//! Why tolerant reads: rows written before the bound existed (or by hand)
//! may still be undecodable. A JSON column that cannot be decoded is read
//! as [`undecodable`]`(reason)` — `{"docket_undecodable": "<reason>"}` —
//! so one such row is shown with a marker and never fails a list, a page
//! or a run's history.

use crate::StoreError;
use serde_json::Value;

/// The deepest nesting of arrays and objects Docket stores in any JSON
/// value (run input and variables, output, input requests and decisions,
/// step and ledger results, event payloads). A scalar has depth 0, `[]` and
/// `{"a": 1}` depth 1, `[[1]]` depth 2.
pub const MAX_JSON_DEPTH: usize = 100;

/// The key of the marker that replaces a stored JSON value that cannot be
/// decoded.
pub const UNDECODABLE_KEY: &str = "docket_undecodable";

/// How deeply `v` nests arrays and objects (see [`MAX_JSON_DEPTH`]).
///
/// Iterative, so a value nested far deeper than any stack allows is
/// measured safely. It visits every node once: cheaper than serializing
/// the value, which every write does anyway; a scalar costs nothing.
pub fn json_depth(v: &Value) -> usize {
    let mut stack: Vec<(&Value, usize)> = match v {
        Value::Array(_) | Value::Object(_) => vec![(v, 1)],
        _ => return 0,
    };
    let mut max = 0;
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().filter(is_nest).map(|c| (c, d + 1))),
            Value::Object(o) => stack.extend(o.values().filter(is_nest).map(|c| (c, d + 1))),
            _ => {}
        }
    }
    max
}

fn is_nest(v: &&Value) -> bool {
    matches!(v, Value::Array(_) | Value::Object(_))
}

/// Refuses a value nested deeper than [`MAX_JSON_DEPTH`]:
/// [`StoreError::TooDeep`] naming `field` and the depth.
pub fn check_depth(field: &str, v: &Value) -> Result<(), StoreError> {
    let depth = json_depth(v);
    if depth > MAX_JSON_DEPTH {
        return Err(StoreError::TooDeep {
            field: field.to_string(),
            depth,
            max: MAX_JSON_DEPTH,
        });
    }
    Ok(())
}

/// The marker stored JSON is read as when it cannot be decoded.
pub fn undecodable(reason: impl std::fmt::Display) -> Value {
    serde_json::json!({ UNDECODABLE_KEY: reason.to_string() })
}

/// The reason of an [`undecodable`] marker, when `v` is one.
pub fn undecodable_reason(v: &Value) -> Option<&str> {
    match v {
        Value::Object(o) if o.len() == 1 => o.get(UNDECODABLE_KEY)?.as_str(),
        _ => None,
    }
}

/// Decodes a JSON column's text; what cannot be decoded becomes the
/// [`undecodable`] marker instead of an error.
pub fn decode_text(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(undecodable)
}

/// Checks the inputs of a trigger: one refused run refuses the batch,
/// which is one transaction.
pub(crate) fn check_runs(runs: &[crate::NewRun]) -> Result<(), StoreError> {
    runs.iter().try_for_each(|r| check_depth("input", &r.input))
}

/// Checks a ledger write's result.
pub(crate) fn check_ledger(w: &crate::LedgerWrite) -> Result<(), StoreError> {
    w.result
        .as_ref()
        .map_or(Ok(()), |v| check_depth("result", v))
}

/// Checks the data an operator command stores.
pub(crate) fn check_operator(req: &crate::OperatorRequest) -> Result<(), StoreError> {
    use crate::OperatorCommand as C;
    match &req.command {
        C::Approve { data, .. } | C::Reject { data, .. } => check_depth("data", data),
        C::Retry {
            updated_variables: Some(v),
            ..
        } => check_depth("updated_variables", v),
        _ => Ok(()),
    }
}

/// Checks the JSON values an attempt end would store (its output or input
/// request).
pub(crate) fn check_end(end: &crate::AttemptEnd) -> Result<(), StoreError> {
    match &end.outcome {
        crate::Outcome::Completed { output } => check_depth("output", output),
        crate::Outcome::NeedsInput { request, .. } => check_depth("input_request", request),
        _ => Ok(()),
    }
}

/// Ends whose values are too deep, taken out of a batch before it reaches
/// a backend: each gets [`StoreError::TooDeep`] in its own slot, nothing of
/// it is written, and the other ends are stored as usual.
#[derive(Default)]
pub(crate) struct Refused(Vec<(usize, StoreError)>);

impl Refused {
    /// Splits `ends` into those to store and the refused.
    pub(crate) fn screen(ends: Vec<crate::AttemptEnd>) -> (Vec<crate::AttemptEnd>, Refused) {
        // The common case allocates nothing new.
        if ends.iter().all(|e| check_end(e).is_ok()) {
            return (ends, Refused::default());
        }
        let mut keep = Vec::with_capacity(ends.len());
        let mut refused = Vec::new();
        for (i, e) in ends.into_iter().enumerate() {
            match check_end(&e) {
                Ok(()) => keep.push(e),
                Err(err) => refused.push((i, err)),
            }
        }
        (keep, Refused(refused))
    }

    /// Puts the refused ends' errors back in their callers' slots.
    pub(crate) fn merge<T>(self, stored: Vec<Result<T, StoreError>>) -> Vec<Result<T, StoreError>> {
        if self.0.is_empty() {
            return stored;
        }
        let mut out = Vec::with_capacity(stored.len() + self.0.len());
        let mut stored = stored.into_iter();
        let mut refused = self.0.into_iter().peekable();
        loop {
            if refused.peek().is_some_and(|(i, _)| *i == out.len()) {
                let (_, e) = refused.next().expect("peeked");
                out.push(Err(e));
            } else if let Some(s) = stored.next() {
                out.push(s);
            } else if let Some((_, e)) = refused.next() {
                out.push(Err(e));
            } else {
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `[[…[0]…]]` with `depth` arrays.
    fn nested(depth: usize) -> Value {
        let mut v = json!(0);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!([])), 1);
        assert_eq!(json_depth(&json!({"a": 1})), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        assert_eq!(json_depth(&nested(2_000)), 2_000);
    }

    #[test]
    fn the_bound_is_below_what_the_reader_accepts() {
        // Everything the bound lets through, plus Docket's envelopes, must
        // parse again: serde_json reads at most 127 levels.
        let max = nested(MAX_JSON_DEPTH);
        assert!(check_depth("x", &max).is_ok());
        let wrapped = json!({"status": 200, "body": {"data": max}});
        assert_eq!(
            serde_json::from_str::<Value>(&wrapped.to_string()).unwrap(),
            wrapped
        );
        assert!(serde_json::from_str::<Value>(&nested(127).to_string()).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(128).to_string()).is_err());
        let e = check_depth("input", &nested(MAX_JSON_DEPTH + 1)).unwrap_err();
        assert!(e.to_string().contains("`input`"), "{e}");
        assert!(e.to_string().contains("101"), "{e}");
    }

    #[test]
    fn undecodable_text_becomes_a_marker() {
        assert_eq!(decode_text("[1]"), json!([1]));
        let v = decode_text(&nested(128).to_string());
        assert!(v[UNDECODABLE_KEY]
            .as_str()
            .is_some_and(|r| r.contains("recursion limit")));
    }

    #[test]
    fn refused_errors_go_back_to_their_slots() {
        let r = Refused(vec![
            (0, StoreError::Conflict("a".into())),
            (2, StoreError::Conflict("c".into())),
            (4, StoreError::Conflict("e".into())),
        ]);
        let out = r.merge(vec![Ok::<_, StoreError>(1), Ok(3)]);
        let shown: Vec<String> = out
            .iter()
            .map(|r| match r {
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            })
            .collect();
        assert_eq!(shown, ["a", "1", "c", "3", "e"]);
    }
}
