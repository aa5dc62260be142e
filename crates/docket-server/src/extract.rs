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

/// Parses JSON bytes into `T`, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            use serde_json::error::Category;
            match inner.classify() {
                // Nested beyond what the parser reads (127 levels): valid
                // JSON, but a value Docket would refuse to store anyway
                // (its bound is lower), so it is the field's fault.
                Category::Syntax if inner.to_string().starts_with("recursion limit exceeded") => {
                    let field = deep_field(&path);
                    Err(ApiError::invalid_field(
                        field.clone(),
                        format!(
                            "`{field}` nests more than 127 levels of arrays/objects; Docket stores at most {}",
                            docket_store::MAX_JSON_DEPTH
                        ),
                    ))
                }
                Category::Syntax | Category::Eof | Category::Io => Err(ApiError::invalid_json(
                    format!("the body is not valid JSON: {inner}"),
                )),
                Category::Data => {
                    let field = if path == "." {
                        missing_field(&inner.to_string()).unwrap_or_else(|| "body".into())
                    } else {
                        match missing_field(&inner.to_string()) {
                            Some(f) => format!("{path}.{f}"),
                            None => path,
                        }
                    };
                    Err(ApiError::invalid_field(
                        field.clone(),
                        format!("`{field}`: {}", plain(&inner.to_string())),
                    ))
                }
            }
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
fn plain(msg: &str) -> String {
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
        assert_eq!(
            e.detail.message,
            "`body`: expected a JSON object, not an array"
        );
        let e = parse_json::<Inner>(b"\"x\"").unwrap_err();
        assert_eq!(
            e.detail.message,
            "`body`: invalid type: string \"x\", expected a JSON object"
        );
    }
}
