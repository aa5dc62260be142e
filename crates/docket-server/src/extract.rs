//! Request body and query extraction with errors that name the field.
//!
//! - a body over the limit → 413 `content_too_large`;
//! - a body that is not JSON → 400 `invalid_json` with line and column;
//! - JSON of the wrong shape → 422 `invalid_field` naming the JSON path;
//! - an unknown or malformed query parameter → 400 `invalid_parameter`.
//!
//! Bodies are read as JSON whatever their `Content-Type` (curl's `-d` sends
//! a form type); authentication uses bearer tokens, not cookies, so this
//! opens no cross-site hole.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A JSON body, parsed with field-naming errors.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// A JSON body that may be empty (then `T::default()`).
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

/// The JSON type of a value, in words.
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Every request body is a JSON object, and so is each item of a batch's
/// `runs`. serde would otherwise read an array as a struct's fields in
/// order (`["x"]` as `{"comment": "x"}`), so arrays are refused here, before
/// the typed parse, naming where.
fn check_objects(v: &serde_json::Value) -> Result<(), ApiError> {
    if !v.is_object() {
        return Err(ApiError::invalid_field(
            "body",
            format!(
                "`body`: expected a JSON object, not {} (see GET /api/openapi.json for the fields)",
                kind(v)
            ),
        ));
    }
    if let Some(serde_json::Value::Array(runs)) = v.get("runs") {
        for (i, r) in runs.iter().enumerate() {
            if !r.is_object() {
                let f = format!("runs[{i}]");
                return Err(ApiError::invalid_field(
                    f.clone(),
                    format!("`{f}`: expected a JSON object, not {}", kind(r)),
                ));
            }
        }
    }
    Ok(())
}

/// Parses a JSON request body into `T`, naming the field at fault: 400
/// when it is not JSON, 422 when it is not an object or a field is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        // Nested beyond what the parser reads (127 levels): valid JSON, but
        // a value Docket would refuse to store anyway (its bound is lower),
        // so it is the field's fault: parse again, tracking the path, to
        // name the field.
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let path = match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => e.path().to_string(),
                Ok(_) => ".".into(),
            };
            let field = deep_field(&path);
            return Err(ApiError::invalid_field(
                field.clone(),
                format!(
                    "`{field}` nests more than 127 levels of arrays/objects; Docket stores at most {}",
                    docket_store::MAX_JSON_DEPTH
                ),
            ));
        }
        Err(e) => {
            return Err(ApiError::invalid_json(format!(
                "the body is not valid JSON: {e}"
            )))
        }
    };
    check_objects(&value)?;
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let field = if path == "." {
                missing_field(&inner).unwrap_or_else(|| "body".into())
            } else {
                match missing_field(&inner) {
                    Some(f) => format!("{path}.{f}"),
                    None => path,
                }
            };
            Err(ApiError::invalid_field(
                field.clone(),
                format!("`{field}`: {}", plain(&inner)),
            ))
        }
    }
}

/// The request field holding a too-deep value, from the parser's path to
/// where it gave up (`runs[2].input[0].a[0]…` → `runs[2].input`): the path
/// up to the first segment that holds caller JSON.
fn deep_field(path: &str) -> String {
    const VALUES: [&str; 3] = ["input", "data", "updated_variables"];
    let mut prefix: Vec<&str> = Vec::new();
    for seg in path.split('.') {
        let name = seg.split('[').next().unwrap_or(seg);
        if VALUES.contains(&name) {
            prefix.push(name);
            return prefix.join(".");
        }
        prefix.push(seg);
    }
    "body".into()
}

#[cfg(test)]
mod deep_field_tests {
    #[test]
    fn names_the_field_holding_the_value() {
        assert_eq!(super::deep_field("input[0].a[0].a"), "input");
        assert_eq!(super::deep_field("runs[2].input.a[0]"), "runs[2].input");
        assert_eq!(super::deep_field("data[0]"), "data");
        assert_eq!(super::deep_field("."), "body");
    }
}

/// serde's wording without Rust's type names or the parser's position:
/// `expected i32` → `expected an integer`, `expected struct TriggerRequest`
/// (or a sequence "with N elements") → `expected a JSON object`.
pub(crate) fn plain(msg: &str) -> String {
    let msg = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    let mut out = msg.to_string();
    if let Some(i) = out.find("expected struct ") {
        out.truncate(i);
        out.push_str("expected a JSON object");
        if let Some(rest) = out.strip_prefix("invalid length ") {
            // `[]` against a struct: the length is beside the point.
            let _ = rest;
            out = "expected a JSON object, not an array".into();
        }
    }
    for (rust, words) in [
        ("expected i32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected f64", "expected a number"),
        ("expected i8", "expected an integer"),
        ("expected i16", "expected an integer"),
        ("expected u8", "expected a non-negative integer"),
        ("expected u16", "expected a non-negative integer"),
        ("expected f32", "expected a number"),
        ("integer `", "the number `"),
    ] {
        out = out.replace(rust, words);
    }
    out
}

/// serde reports a missing field at the path of its parent object.
fn missing_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

async fn body_bytes(req: Request, state: &crate::AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is over the limit of {} bytes",
                state.config.max_body_bytes
            ))
        } else {
            ApiError::new(rej.status(), "bad_request", rej.body_text())
        }
    })
}

impl<T: DeserializeOwned> FromRequest<crate::AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &crate::AppState) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid_json("the request body is empty"));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

impl<T: DeserializeOwned + Default> FromRequest<crate::AppState> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &crate::AppState) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

/// Integers in request bodies: JSON Schema (and JavaScript) count `5.0` as
/// the integer 5, so it is accepted as one; `5.5` and out-of-range values
/// are refused with the field named. Use with `#[serde(deserialize_with)]`.
pub mod integral {
    use serde::de::{Deserialize, Deserializer, Error};

    fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i128>, D::Error> {
        let v = Option::<serde_json::Number>::deserialize(d)?;
        Ok(match v {
            None => None,
            Some(n) => Some(if let Some(i) = n.as_i64() {
                i128::from(i)
            } else if let Some(u) = n.as_u64() {
                i128::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() != 0.0 || !f.is_finite() || f.abs() > 1.9e19 {
                    return Err(D::Error::custom(format!(
                        "invalid type: number {n}, expected an integer"
                    )));
                }
                f as i128
            }),
        })
    }

    fn range<E: Error, T: TryFrom<i128>>(v: i128, what: &str) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format!("invalid value: {v}, expected {what}")))
    }

    /// An `i32` (`priority`).
    pub fn i32<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        match whole(d)? {
            Some(v) => range(v, "an integer from -2147483648 to 2147483647"),
            None => Err(D::Error::custom("invalid type: null, expected an integer")),
        }
    }

    /// An optional `u64` (`delay_ms`, `waitTimeoutMs`).
    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        whole(d)?
            .map(|v| range(v, "a non-negative integer"))
            .transpose()
    }
}

/// A path parameter (a run id, a connection or job name) as text. Unlike
/// axum's `Path`, a segment that does not decode to UTF-8 answers 400
/// `invalid_parameter` in the JSON envelope, not a plain-text rejection.
#[derive(Debug)]
pub struct ApiPath(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        use axum::extract::Path;
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(_) => Err(ApiError::bad_param(
                "path",
                format!(
                    "the path `{}` does not decode to UTF-8 text: percent-encode a valid UTF-8 id or name",
                    parts.uri.path()
                ),
            )),
        }
    }
}

/// A request's query parameters in order, repeated keys kept.
#[derive(Debug, Default)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .map(QueryPairs)
            .map_err(|e| ApiError::bad_param("query", format!("malformed query string: {e}")))
    }
}

impl QueryPairs {
    /// Refuses any parameter not in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        for (k, _) in &self.0 {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_param(
                    k.clone(),
                    format!(
                        "unknown query parameter `{k}`; expected one of: {}",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The last value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, comma-separated values split.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        job: String,
        priority: Option<i32>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Outer {
        runs: Vec<Inner>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Outer>(br#"{"runs":[{"job":"a"},{"job":5}]}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.detail.field.as_deref(), Some("runs[1].job"));
        let e = parse_json::<Outer>(br#"{"runs":[{"priority":1}]}"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("runs[0].job"));
        let e = parse_json::<Outer>(br#"{}"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("runs"));
        let e = parse_json::<Outer>(br#"{"runs": ["#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.detail.code, "invalid_json");
        let e = parse_json::<Outer>(br#"{"runs":[{"job":"a","nope":1}]}"#).unwrap_err();
        assert_eq!(e.detail.field.as_deref(), Some("runs[0].nope"));
    }

    #[test]
    fn messages_say_json_not_rust() {
        let e = parse_json::<Inner>(br#"{"job":"a","priority":"high"}"#).unwrap_err();
        assert_eq!(
            e.detail.message,
            "`priority`: invalid type: string \"high\", expected an integer"
        );
        let e = parse_json::<Inner>(b"[]").unwrap_err();
        assert!(e
            .detail
            .message
            .starts_with("`body`: expected a JSON object, not an array"));
        let e = parse_json::<Inner>(b"\"x\"").unwrap_err();
        assert!(e
            .detail
            .message
            .starts_with("`body`: expected a JSON object, not a string"));
    }
}
