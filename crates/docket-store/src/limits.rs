//! Flow limits shared by every process on one database: rate limits as
//! token buckets ([`LimitStore::rate_take`]) and circuit breakers' states
//! ([`LimitStore::breaker_update`]). A supertrait of
//! [`Store`](crate::Store); what a take writes is computed by
//! [`plan::rate`](crate::plan::rate).

use crate::Result;
use async_trait::async_trait;
use docket_core::rate::RateLimit;
use docket_core::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::plan::rate::RateTake;

/// One take of a token.
#[derive(Clone, Debug, PartialEq)]
pub struct RateTakeRequest {
    /// The bucket, e.g. `connection:payments` or `job:sync/acme`.
    pub key: String,
    /// Who takes (a run id): its reservation, if it has one, is used.
    pub holder: String,
    /// The limit, as configured by the caller (stored with the bucket for
    /// operators).
    pub limit: RateLimit,
    /// The injected clock's now.
    pub now: Timestamp,
}

/// A stored bucket, as operators see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateBucketRow {
    /// The bucket's key.
    pub key: String,
    /// Nano-tokens (`docket_core::rate::TOKEN` per token) at `refilled_at`;
    /// negative while tokens are reserved ahead.
    pub tokens: i64,
    /// When `tokens` was last brought up to date.
    pub refilled_at: Timestamp,
    /// The limit its last take used.
    pub limit: RateLimit,
    /// Reservations not yet used.
    pub reserved: u64,
}

/// A change of a breaker's stored state, computed under the row's lock from
/// the stored state (`None`: never stored). Answers the state to store, or
/// `None` to leave the row as it is. The engine's breaker
/// (`docket::http`) decides; the store only persists.
pub type BreakerUpdate = Box<dyn FnOnce(Option<Value>) -> Option<Value> + Send>;

/// A breaker's stored state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerRow {
    /// The connection it guards.
    pub name: String,
    /// Its state, as the engine wrote it.
    pub state: Value,
    /// When it was last written.
    pub changed_at: Timestamp,
}

/// Storage of shared limits.
#[async_trait]
pub trait LimitStore: Send + Sync {
    /// Takes one token of the bucket `key`, or uses the holder's reservation,
    /// or reserves the next token: one short transaction (PostgreSQL: the
    /// bucket's row is locked; SQLite: the writer's lock), so takers in
    /// every process on the database share the bucket without races.
    async fn rate_take(&self, req: RateTakeRequest) -> Result<RateTake>;

    /// [`rate_take`](LimitStore::rate_take) for each request, in ONE
    /// transaction (one commit, however many runs a claim brought): the
    /// answers, in the order of `reqs`, are those of taking one after
    /// another in that order. Buckets are locked in key order, so batches
    /// racing from several processes cannot deadlock.
    async fn rate_take_many(&self, reqs: Vec<RateTakeRequest>) -> Result<Vec<RateTake>>;

    /// The stored buckets whose key starts with `prefix`, by key.
    async fn rate_buckets(&self, prefix: String) -> Result<Vec<RateBucketRow>>;

    /// Reads the stored state of the breaker `name` (no lock).
    async fn breaker_get(&self, name: String) -> Result<Option<BreakerRow>>;

    /// Changes the breaker `name` in one transaction: the row is locked
    /// (PostgreSQL; SQLite: the writer's lock), `update` computes the new
    /// state from the stored one, and the new state (if any) is written with
    /// `changed_at = now`. Answers the state after (`None`: never stored).
    /// Concurrent updates from every process apply one after another.
    async fn breaker_update(
        &self,
        name: String,
        now: Timestamp,
        update: BreakerUpdate,
    ) -> Result<Option<Value>>;
}
