//! Flow limits shared by every process on one database: rate limits as
//! token buckets ([`LimitStore::rate_take`]), circuit breakers' states
//! ([`LimitStore::breaker_change`], whose close also releases the runs the
//! breaker deferred) and, for operators, the open debounce windows
//! ([`LimitStore::debounce_windows`]). A supertrait of
//! [`Store`](crate::Store); what a take writes is computed by
//! [`plan::rate`](crate::plan::rate), what a release writes by
//! [`plan::breaker`](crate::plan::breaker).

use crate::{DebounceCount, DebounceWindow, Result};
use async_trait::async_trait;
use docket_core::rate::RateLimit;
use docket_core::{RunId, Timestamp};
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
    /// ([`breaker_change`](LimitStore::breaker_change) that never releases
    /// deferred runs.)
    async fn breaker_update(
        &self,
        name: String,
        now: Timestamp,
        update: BreakerUpdate,
    ) -> Result<Option<Value>> {
        let change: BreakerChange = Box::new(move |old| BreakerWrite {
            state: update(old),
            release: false,
        });
        Ok(self.breaker_change(name, now, change).await?.state)
    }

    /// [`breaker_update`](LimitStore::breaker_update), and when `change`
    /// answers `release` (the breaker closed), in the same transaction:
    /// the runs deferred by this breaker to a time after `now` that still
    /// wait for it are due at `now` instead. Those are the pending runs
    /// whose latest attempt ended deferred with reason `circuit_open` under
    /// the policy `circuit_breaker:NAME` ([`plan::breaker`](crate::plan::breaker))
    /// and whose `run_after` is still the time it deferred them to; they
    /// are found through the partial index `attempts_circuit_open`, at most
    /// [`RELEASE_LIMIT`](crate::plan::breaker::RELEASE_LIMIT) of them, and
    /// each gets a `deferral_released` event. Workers are woken: on
    /// PostgreSQL by the `NOTIFY` a trigger sends, per job released; on
    /// SQLite other processes see the commit. PostgreSQL skips a run
    /// another transaction holds locked right now (it keeps its deferral).
    async fn breaker_change(
        &self,
        name: String,
        now: Timestamp,
        change: BreakerChange,
    ) -> Result<BreakerChanged>;

    /// The open debounce windows (a trigger of their key now would be
    /// collapsed: [`plan::debounce::is_open`](crate::plan::debounce::is_open))
    /// of `tenant`, or of every tenant, by (tenant, job, key); at most
    /// `limit`. Reads the windows that have not ended (index
    /// `runs_debounce_open`), not every key that ever had one.
    async fn debounce_windows(
        &self,
        tenant: Option<String>,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<DebounceWindow>>;

    /// How many debounce windows are open now per (tenant, job), of
    /// `tenant` or of every tenant, by (tenant, job).
    async fn debounce_counts(
        &self,
        tenant: Option<String>,
        now: Timestamp,
    ) -> Result<Vec<DebounceCount>>;
}

/// What a [`BreakerChange`] answers, computed under the breaker row's lock.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerWrite {
    /// The state to store; `None`: leave the row as it is.
    pub state: Option<Value>,
    /// The breaker closed: release the runs it deferred (see
    /// [`LimitStore::breaker_change`]).
    pub release: bool,
}

/// A change of a breaker's stored state that may release the runs it
/// deferred: computed under the row's lock from the stored state (`None`:
/// never stored).
pub type BreakerChange = Box<dyn FnOnce(Option<Value>) -> BreakerWrite + Send>;

/// What [`LimitStore::breaker_change`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerChanged {
    /// The state after (`None`: never stored).
    pub state: Option<Value>,
    /// The runs made due at once, by id.
    pub released: Vec<ReleasedRun>,
}

/// A run a closing breaker made due at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleasedRun {
    /// The run.
    pub id: RunId,
    /// Its tenant.
    pub tenant: String,
    /// Its job.
    pub job: String,
    /// The time it had been deferred to.
    pub deferred_until: Timestamp,
}
