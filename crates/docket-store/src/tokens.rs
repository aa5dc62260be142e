//! API tokens: how the server knows who calls it and for which tenant.
//!
//! A token is shown once, when created; the store keeps only its SHA-256
//! hash (tokens are 256 random bits, so a plain hash is enough — no salt or
//! slow hash is needed against guessing). A token belongs to exactly one
//! tenant and has a name, unique among the tenant's live tokens, which the
//! server records as the actor of every operator action made with it.

use crate::Result;
use async_trait::async_trait;
use docket_core::Timestamp;
use serde::{Deserialize, Serialize};

/// What a token may do (docs/WORKER_PROTOCOL.md, "Authentication and
/// token scopes"). The two never overlap, so a leaked worker token cannot
/// read runs or act as an operator, and an operator token cannot take work
/// away from the workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    /// The REST API: trigger, read, operator commands, events (the default).
    #[default]
    Operator,
    /// Only the worker protocol (`/api/worker/v1/…`), for its tenant's runs.
    Worker,
}

impl TokenScope {
    /// `operator` or `worker`, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            TokenScope::Operator => "operator",
            TokenScope::Worker => "worker",
        }
    }
}

impl std::fmt::Display for TokenScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "operator" => Ok(TokenScope::Operator),
            "worker" => Ok(TokenScope::Worker),
            other => Err(format!(
                "unknown token scope `{other}`: use `operator` or `worker`"
            )),
        }
    }
}

/// A token to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewToken {
    /// Its id (shown in listings; used to revoke it).
    pub id: String,
    /// The tenant it reaches.
    pub tenant: String,
    /// Its name (the actor of operator actions made with it).
    pub name: String,
    /// Lower-case hex SHA-256 of the secret.
    pub hash: String,
    /// What it may do.
    pub scope: TokenScope,
    /// When it was created.
    pub created_at: Timestamp,
}

/// A stored token (never the secret itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its id.
    pub id: String,
    /// The tenant it reaches.
    pub tenant: String,
    /// Its name.
    pub name: String,
    /// What it may do.
    pub scope: TokenScope,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was revoked; a revoked token authenticates nothing.
    pub revoked_at: Option<Timestamp>,
}

/// Storage of API tokens, plus the one query the server needs to start
/// tailing events. A supertrait of [`Store`](crate::Store), so every backend
/// implements it and a `DynStore` offers it.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores a token. A live token of the same name in the same tenant is a
    /// [`StoreError::Conflict`](crate::StoreError::Conflict), and nothing is
    /// written.
    async fn create_token(&self, token: NewToken) -> Result<TokenRecord>;

    /// The token with this hash, revoked or not.
    async fn token_by_hash(&self, hash: String) -> Result<Option<TokenRecord>>;

    /// Tokens, revoked ones included, oldest first; of one tenant or all.
    async fn list_tokens(&self, tenant: Option<String>) -> Result<Vec<TokenRecord>>;

    /// Revokes a live token by id. Returns the token, or `None` when no live
    /// token has that id (unknown or already revoked).
    async fn revoke_token(&self, id: String, now: Timestamp) -> Result<Option<TokenRecord>>;

    /// The largest event id stored, if any: where a reader that wants only
    /// new events starts.
    async fn last_event_id(&self) -> Result<Option<i64>>;
}
