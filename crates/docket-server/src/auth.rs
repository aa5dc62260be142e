//! Bearer tokens and tenants.
//!
//! Every `/api` request carries `Authorization: Bearer <token>`. The token is
//! hashed (SHA-256) and looked up in the store; a revoked or unknown token
//! answers 401. The token decides the tenant: an `X-Tenant-ID` header, as in
//! the seed's command API, must name the same tenant or be absent (403
//! otherwise). The token's name is recorded as the actor of operator actions.
//!
//! With [`AuthMode::InsecureNoAuth`] (the development flag, loopback only)
//! no token is needed: the tenant is `X-Tenant-ID` or `default`, the actor
//! `anonymous`.
//!
//! A token has a scope ([`TokenScope`]): `operator` tokens reach the API
//! and never the worker protocol; `worker` tokens reach only the worker
//! protocol (`/api/worker/v1/…`) for their tenant's runs.

use crate::error::ApiError;
use crate::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use docket::Timestamp;
use docket_store::{NewToken, TokenRecord, TokenScope};
use sha2::{Digest, Sha256};

/// The prefix of every token secret.
pub const TOKEN_PREFIX: &str = "dkt_";

/// The header naming the tenant (optional with a token).
pub const TENANT_HEADER: &str = "x-tenant-id";

/// How requests are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Bearer tokens from the store (the default).
    Tokens,
    /// No authentication. Refused by the server unless it listens on a
    /// loopback address.
    InsecureNoAuth,
}

/// Who is calling: the tenant they reach and the name recorded as actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The tenant every read and write is confined to.
    pub tenant: String,
    /// The token's name (the actor of operator actions).
    pub name: String,
}

/// A new token's secret, shown once, and the row that stores its hash.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The secret: `dkt_` and 64 hex digits (256 random bits).
    pub secret: String,
    /// What to store (the hash, never the secret).
    pub record: NewToken,
}

/// The lower-case hex SHA-256 of a token secret.
pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Makes an operator token for `tenant` named `name`: 256 bits from the
/// operating system's random source.
pub fn issue_token(tenant: &str, name: &str, now: Timestamp) -> Result<IssuedToken, String> {
    issue_scoped_token(tenant, name, TokenScope::Operator, now)
}

/// Makes a token for `tenant` named `name` with `scope` (see
/// [`TokenScope`]).
pub fn issue_scoped_token(
    tenant: &str,
    name: &str,
    scope: TokenScope,
    now: Timestamp,
) -> Result<IssuedToken, String> {
    check_label("tenant", tenant)?;
    check_label("name", name)?;
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("no random source: {e}"))?;
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let mut id = [0u8; 6];
    getrandom::getrandom(&mut id).map_err(|e| format!("no random source: {e}"))?;
    Ok(IssuedToken {
        record: NewToken {
            id: format!("tok_{}", hex::encode(id)),
            tenant: tenant.to_string(),
            name: name.to_string(),
            hash: hash_token(&secret),
            scope,
            created_at: now,
        },
        secret,
    })
}

/// Tenants and token names: 1 to 100 characters of letters, digits, `-`,
/// `_`, `.`, `@` (they appear in headers, metrics labels and logs).
pub fn check_label(what: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 100
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} `{v}`: use 1 to 100 letters, digits, `-`, `_`, `.` or `@`"
        ))
    }
}

fn tenant_header(parts: &Parts) -> Result<Option<String>, ApiError> {
    match parts.headers.get(TENANT_HEADER) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::bad_param("X-Tenant-ID", "X-Tenant-ID is not valid text"))?;
            check_label("tenant", s).map_err(|m| ApiError::bad_param("X-Tenant-ID", m))?;
            Ok(Some(s.to_string()))
        }
    }
}

/// Authenticates a request's parts for the operator API: a worker token is
/// refused (403, field `scope`), so it can neither read runs nor act as an
/// operator.
pub async fn authenticate(state: &AppState, parts: &Parts) -> Result<Caller, ApiError> {
    let (caller, scope) = authenticate_any(state, parts).await?;
    if scope != TokenScope::Operator {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token `{}` has scope `{scope}`: it may only call the worker protocol (/api/worker/v1/…); use an operator token here",
                caller.name
            ),
        )
        .field("scope"));
    }
    Ok(caller)
}

/// Authenticates a call of the worker protocol: only a worker token (or
/// the insecure development mode) may claim and report; an operator token
/// is refused (403, field `scope`).
pub async fn authenticate_worker(state: &AppState, parts: &Parts) -> Result<Caller, ApiError> {
    let (caller, scope) = authenticate_any(state, parts).await?;
    if state.auth == AuthMode::Tokens && scope != TokenScope::Worker {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token `{}` has scope `{scope}`: the worker protocol takes a worker token (`docket token create --scope worker`)",
                caller.name
            ),
        )
        .field("scope"));
    }
    Ok(caller)
}

/// The caller and its token's scope (`operator` in the insecure mode).
async fn authenticate_any(
    state: &AppState,
    parts: &Parts,
) -> Result<(Caller, TokenScope), ApiError> {
    let header_tenant = tenant_header(parts)?;
    if state.auth == AuthMode::InsecureNoAuth {
        return Ok((
            Caller {
                tenant: header_tenant.unwrap_or_else(|| docket::DEFAULT_TENANT.to_string()),
                name: "anonymous".to_string(),
            },
            TokenScope::Operator,
        ));
    }
    let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "missing `Authorization: Bearer <token>` header",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    let Some(secret) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return Err(ApiError::unauthorized(
            "the Authorization header must be `Bearer <token>`",
        ));
    };
    let secret = secret.trim();
    if !secret.starts_with(TOKEN_PREFIX) || secret.len() > 200 {
        return Err(ApiError::unauthorized("invalid token"));
    }
    let token: Option<TokenRecord> = state.store().token_by_hash(hash_token(secret)).await?;
    let token = match token {
        Some(t) if t.revoked_at.is_none() => t,
        Some(_) => return Err(ApiError::unauthorized("this token was revoked")),
        None => return Err(ApiError::unauthorized("invalid token")),
    };
    if let Some(t) = header_tenant {
        if t != token.tenant {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("X-Tenant-ID `{t}` does not match the token's tenant"),
            )
            .field("X-Tenant-ID"));
        }
    }
    Ok((
        Caller {
            tenant: token.tenant,
            name: token.name,
        },
        token.scope,
    ))
}

/// A caller of the worker protocol (see [`authenticate_worker`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCaller(pub Caller);

impl FromRequestParts<AppState> for WorkerCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate_worker(state, parts).await.map(WorkerCaller)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(state, parts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let a = issue_token("acme", "ci", Timestamp(0)).unwrap();
        let b = issue_token("acme", "ci", Timestamp(0)).unwrap();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.starts_with("dkt_"));
        assert_eq!(a.secret.len(), 4 + 64);
        assert_eq!(a.record.hash, hash_token(&a.secret));
        assert_eq!(a.record.hash.len(), 64);
        assert!(!a.record.hash.contains(&a.secret[4..]));
        assert!(issue_token("bad tenant", "x", Timestamp(0)).is_err());
        assert!(issue_token("t", "", Timestamp(0)).is_err());
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
