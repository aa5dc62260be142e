//! The [`Store`] trait and its backends.
//!
//! A store is the only place run state lives. Every method that changes state
//! is ONE transaction that writes the run, its attempt row and its events
//! together, so evidence can never disagree with state. Every query that
//! decides eligibility takes `now` as a parameter: no backend reads its own
//! clock for that.
//!
//! Writes made on behalf of an attempt are fenced by its [`LeaseId`]: when the
//! run has been reclaimed (or reaped, or cancelled) the write is refused,
//! recorded as a `stale_write_refused` event, and reported as
//! [`StoreError::StaleLease`]. It never changes the run.

pub mod children;
#[cfg(feature = "conformance")]
pub mod children_conformance;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod connections;
#[cfg(feature = "conformance")]
pub mod debounce_conformance;
pub mod json;
pub mod lead;
pub mod limits;
pub mod model;
pub mod plan;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod retention;
#[cfg(feature = "conformance")]
pub mod retention_conformance;
pub mod schedules;
#[cfg(feature = "conformance")]
pub mod signal_conformance;
pub mod signals;
pub mod sqlite;
pub mod stats;
pub mod tokens;
pub mod workers;

pub use children::{ChildPolicy, ChildSpawn, ChildStore, Family, JoinState, Spawned};
pub use connections::{
    ConnectionAudit, ConnectionChange, ConnectionState, ConnectionStatus, ConnectionStore,
};
pub use json::{MAX_JSON_DEPTH, UNDECODABLE_KEY};
pub use lead::FencingToken;
pub use limits::{
    BreakerChange, BreakerChanged, BreakerRow, BreakerUpdate, BreakerWrite, LimitStore,
    RateBucketRow, RateTake, RateTakeRequest, ReleasedRun,
};
pub use model::*;
pub use schedules::{
    PutOutcome, Schedule, ScheduleDef, ScheduleHistory, SchedulePut, ScheduleStore, ScheduleTick,
    SlotKind, SlotOutcome, TickOutcome,
};
pub use signals::{
    SendKeyed, SendSignal, Sent, SignalRecord, SignalStore, SignalWaitRecord, WaitOutcome,
    WaitSignal,
};
pub use stats::{BucketCount, ClassCount, RunScan, ScanPage, StatsStore, WindowQuery, WindowStats};
pub use tokens::{NewToken, TokenRecord, TokenScope, TokenStore};
pub use workers::{WorkerRecord, WorkerSeen, WorkerStore};

use async_trait::async_trait;
use docket_core::{LeaseId, RunId, RunStatus, Timestamp};
use std::sync::Arc;

/// The schema version this build writes: the number of migration steps
/// (`sqlite/migrations/`, `postgres/migrations/`; ARCHITECTURE.md,
/// "Migrations"). A database with a higher version was written by a newer
/// Docket and is refused, never modified.
pub const SCHEMA_VERSION: i64 = 16;

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The write was made under a lease that no longer holds the run.
    #[error(
        "stale lease {lease_id} for run {run_id}: the run is {status} under another lease or none"
    )]
    StaleLease {
        /// The run.
        run_id: RunId,
        /// The lease the writer held.
        lease_id: LeaseId,
        /// The run's status now.
        status: RunStatus,
    },
    /// No run with that id (in that tenant).
    #[error("run {0} not found")]
    NotFound(RunId),
    /// An operation that the run's current state does not allow.
    #[error("run {run_id} is {current}: {message}")]
    WrongState {
        /// The run.
        run_id: RunId,
        /// Its current status.
        current: RunStatus,
        /// What was refused.
        message: String,
    },
    /// A uniqueness rule was broken (e.g. a step name used twice in a run).
    #[error("{0}")]
    Conflict(String),
    /// The database was written by a newer Docket.
    #[error("database schema version {found} is newer than this Docket supports ({supported}); upgrade Docket, the database was not modified")]
    SchemaTooNew {
        /// The version found.
        found: i64,
        /// The version this build writes.
        supported: i64,
    },
    /// The connection URL is not understood.
    #[error("invalid database url `{0}`: expected sqlite://PATH, sqlite::memory: or postgres://…")]
    BadUrl(String),
    /// The database driver failed: the kind says whether trying again can
    /// help, the source is the driver's own error (sqlx, rusqlite).
    #[error("database error ({kind}): {source}")]
    Db {
        /// What kind of failure.
        kind: DbErrorKind,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The store could not do the call for a reason outside the driver
    /// (its writer thread stopped, a reply was dropped, a commit failed):
    /// treated as transient.
    #[error("database error: {0}")]
    Database(String),
    /// A stored value could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A ledger write was refused: the row is not held `started` by the
    /// writer's attempt (another attempt holds it, or it is final). The
    /// refusal is recorded as a `ledger_write_refused` event.
    #[error("ledger key `{idempotency_key}` is {current} (held by run {holder_run}): {attempted} refused")]
    LedgerConflict {
        /// The key.
        idempotency_key: String,
        /// The state the writer asked for.
        attempted: LedgerState,
        /// The row's state.
        current: LedgerState,
        /// The run that holds or committed the row.
        holder_run: RunId,
    },
    /// A JSON value nests arrays/objects deeper than [`MAX_JSON_DEPTH`]:
    /// refused before anything is written, since it could not be read back.
    #[error("`{field}` nests {depth} levels of arrays/objects; Docket stores at most {max}")]
    TooDeep {
        /// What the value is (`input`, `output`, `result`, `data`, …).
        field: String,
        /// Its depth.
        depth: usize,
        /// [`MAX_JSON_DEPTH`].
        max: usize,
    },
}

/// What kind of database failure a [`StoreError::Db`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DbErrorKind {
    /// The connection was lost or could not be made (I/O, pool timeout,
    /// the server shutting down or restarting). Transient.
    Connection,
    /// The database was busy: locked, a serialization failure, a deadlock,
    /// out of resources for now. Transient.
    Busy,
    /// A constraint refused the write (unique, foreign key, check). Not
    /// transient: the same write fails again.
    Constraint,
    /// A stored value could not be decoded, or the file is damaged.
    Corrupt,
    /// Anything else: a statement the database rejects (a bug in Docket,
    /// or a schema changed by hand). Not transient.
    Bug,
}

impl DbErrorKind {
    /// The snake_case name used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            DbErrorKind::Connection => "connection",
            DbErrorKind::Busy => "busy",
            DbErrorKind::Constraint => "constraint",
            DbErrorKind::Corrupt => "corrupt",
            DbErrorKind::Bug => "bug",
        }
    }

    /// Whether trying the same call again later may succeed.
    pub const fn is_transient(self) -> bool {
        matches!(self, DbErrorKind::Connection | DbErrorKind::Busy)
    }
}

impl std::fmt::Display for DbErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl StoreError {
    /// Whether retrying the same call later may succeed: a lost
    /// connection, a busy or restarting database, a store thread that
    /// failed a call. A statement the database rejects, a constraint or a
    /// corrupt row fails the same way again: not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Db { kind, .. } => kind.is_transient(),
            StoreError::Database(_) => true,
            _ => false,
        }
    }

    /// The kind, for logs and metrics: a driver error's own, `corrupt` for a
    /// row that cannot be decoded, `connection` for the store's own
    /// transient failures; `None` for domain answers (stale lease, wrong
    /// state, not found, conflicts).
    pub fn db_kind(&self) -> Option<DbErrorKind> {
        match self {
            StoreError::Db { kind, .. } => Some(*kind),
            StoreError::Database(_) => Some(DbErrorKind::Connection),
            StoreError::Corrupt(_) => Some(DbErrorKind::Corrupt),
            _ => None,
        }
    }
}

/// The result type of store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How a worker's driver best sends its hot-path rounds
/// ([`Store::finish_and_claim`]) to a store: a property of the backend's
/// costs, not a decision about any run. Measured in docs/BENCHMARKS.md
/// ("Session 8"): on PostgreSQL each round waits for its commit's WAL
/// flush, so a second round in flight and ends that wait a moment for a
/// claim's commit raise W1 throughput; on SQLite (WAL, `synchronous =
/// NORMAL`: a commit is no flush) both only cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundHints {
    /// Rounds worth having in flight at once (at least 1).
    pub in_flight: usize,
    /// Whether attempt ends are worth holding briefly for a claim round to
    /// share its commit, rather than taking a round of their own.
    pub hold_ends: bool,
}

impl Default for RoundHints {
    fn default() -> Self {
        RoundHints {
            in_flight: 1,
            hold_ends: false,
        }
    }
}

/// Durable storage of runs, attempts, events, steps and the ledger.
///
/// Implemented by [`sqlite::SqliteStore`] and (with the `postgres` feature)
/// `postgres::PgStore`. Both pass the same conformance suite.
#[async_trait]
pub trait Store:
    TokenStore
    + WorkerStore
    + ConnectionStore
    + StatsStore
    + ScheduleStore
    + ChildStore
    + SignalStore
    + LimitStore
    + Send
    + Sync
    + 'static
{
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// How a worker's driver best sends its rounds to this store (see
    /// [`RoundHints`]). The default: one round at a time, ends never held.
    fn round_hints(&self) -> RoundHints {
        RoundHints::default()
    }

    /// Creates runs, all in one transaction. A run whose (tenant, job,
    /// idempotency key) already exists is not created; the existing run is
    /// returned with `existing = true`. Writes a `run_triggered` event per
    /// new run.
    async fn trigger(&self, runs: Vec<NewRun>, now: Timestamp) -> Result<Vec<Triggered>>;

    /// Claims up to `limit` due runs (status pending or postponed,
    /// `run_after <= now`) of the given jobs, ordered by priority (higher
    /// first), then `run_after`, then id. Each gets a new lease id,
    /// attempt + 1 and `lease_expires_at = now + lease_ms`; its attempt row
    /// and an `attempt_started` event are written in the same transaction.
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Run>>;

    /// Ends attempts (completion, retry, failure, postponement, input
    /// request, cancellation, release). Each end is its own transaction
    /// (backends may group several into one commit, each under a savepoint)
    /// and is fenced by its lease: a stale one yields
    /// `Err(StoreError::StaleLease)` in its slot and a `stale_write_refused`
    /// event.
    async fn finish(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<RunStatus>>>;

    /// [`finish`](Store::finish) then [`claim`](Store::claim) for each
    /// request, in one round trip where the backend can (SQLite: one commit).
    /// Each end and each claim stays its own atomic unit. The claims share
    /// one budget, the largest `limit` among them: a later request claims at
    /// most what the earlier ones left. This is the worker's hot path: the
    /// ends of finished attempts and the claim that refills their slots
    /// share a commit.
    async fn finish_and_claim(
        &self,
        ends: Vec<AttemptEnd>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<Result<RunStatus>>, Vec<Run>)> {
        let finished = if ends.is_empty() {
            Vec::new()
        } else {
            self.finish(ends).await?
        };
        let budget = claims.iter().map(|c| c.limit).max().unwrap_or(0);
        let mut runs = Vec::new();
        for mut req in claims {
            req.limit = req.limit.min(budget - runs.len());
            if req.limit > 0 {
                runs.extend(self.claim(req).await?);
            }
        }
        Ok((finished, runs))
    }

    /// Extends live leases to `expires_at`. For each lease: whether it is
    /// still held, and whether a cancellation was requested.
    async fn heartbeat(
        &self,
        leases: Vec<LeaseRef>,
        expires_at: Timestamp,
    ) -> Result<Vec<LeaseState>>;

    /// Running runs whose lease expired at or before `now`.
    async fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Run>>;

    /// Reaps expired leases: applies each end (the engine's verdict on an
    /// attempt whose lease expired: a `lease_expired` retry or failure) only
    /// while its run is still `running` under the end's lease AND that lease
    /// expired at or before the end's `now` — the fence is checked on the
    /// locked row, in the transaction that writes. Answers per end:
    /// `Ok(Some(status))` when it was applied, `Ok(None)` when it changed
    /// nothing — another reaper got there first, the attempt ended, a
    /// heartbeat extended the lease, or (PostgreSQL) another transaction
    /// holds the run's row right now (`FOR UPDATE SKIP LOCKED`: the next
    /// round sees it again) — or `Err` for an end that failed alone
    /// (PostgreSQL: a value the server refused). An end that changed nothing
    /// wrote nothing, not even a `stale_write_refused` event: a reaper is not
    /// the attempt's writer. Each applied end is its own atomic unit, as in
    /// [`finish`](Store::finish).
    ///
    /// This is what lets every worker reap, with no leader: two reapers
    /// that read the same expired lease reap it once, and the other's end
    /// is a no-op.
    async fn reap(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<Option<RunStatus>>>>;

    /// The earliest `run_after` among claimable runs of these jobs, if any:
    /// lets an idle worker sleep exactly until the next run is due.
    async fn next_due(&self, jobs: Vec<String>) -> Result<Option<Timestamp>>;

    /// Every concurrency key with runs running or waiting (in `tenant`'s
    /// runs, or every tenant's), by key: running, limit, due and pending
    /// counts (`GET /api/limits`, `docket limits`, `/metrics`). Reads the
    /// keyed runs that are claimable or running (bounded by those, not by
    /// the table); at most `limit` keys.
    async fn concurrency_usage(
        &self,
        tenant: Option<String>,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<KeyUsage>>;

    /// One run.
    async fn get_run(&self, id: RunId) -> Result<Option<Run>>;

    /// Runs matching a filter, newest first, with cursor pagination.
    async fn list_runs(&self, filter: RunFilter) -> Result<Vec<Run>>;

    /// Counts of runs by (job, status), for a tenant or all.
    async fn count_runs(&self, tenant: Option<String>) -> Result<Vec<StatusCount>>;

    /// The attempt rows of a run, by attempt number.
    async fn attempts(&self, run_id: RunId) -> Result<Vec<AttemptRecord>>;

    /// Events in id order.
    async fn events(&self, filter: EventFilter) -> Result<Vec<EventRecord>>;

    /// The durable steps of a run, by name.
    async fn steps(&self, run_id: RunId) -> Result<Vec<StepRecord>>;

    /// Stores a completed step's result with a `step_completed` event, fenced
    /// by the lease. A step already completed or skipped under that name is a
    /// [`StoreError::Conflict`]. Answers whether a cancel was requested, so
    /// the engine stops at this step boundary.
    async fn save_step(
        &self,
        lease: LeaseRef,
        name: String,
        result: serde_json::Value,
        now: Timestamp,
    ) -> Result<LeaseState>;

    /// Records a step's failure (`failed` row, `step_failed` event with its
    /// error class), fenced by the lease. A step already completed or
    /// skipped is a [`StoreError::Conflict`].
    async fn fail_step(
        &self,
        lease: LeaseRef,
        name: String,
        class: docket_core::ErrorClass,
        message: String,
        now: Timestamp,
    ) -> Result<()>;

    /// One ledger row.
    async fn ledger_get(
        &self,
        tenant: String,
        idempotency_key: String,
    ) -> Result<Option<LedgerEntry>>;

    /// The ledger rows last written by a run.
    async fn ledger_for_run(&self, run_id: RunId) -> Result<Vec<LedgerEntry>>;

    /// Takes the key for the attempt's action, or reports why not, in one
    /// transaction fenced by the lease (the decision is
    /// [`plan::ledger_begin`]): an absent row, or one whose holder is gone
    /// (`unknown`, `failed_*`, `started` under a lease that is no longer
    /// live), becomes `started` under the caller's lease (`action_started`
    /// event); a `committed` row is returned untouched; a `started` row
    /// under another live lease is in flight (`action_in_flight` event on
    /// the caller's run, naming the holder).
    /// The tenant is the run's.
    async fn ledger_begin(
        &self,
        lease: LeaseRef,
        idempotency_key: String,
        action: String,
        now: Timestamp,
    ) -> Result<LedgerBegin>;

    /// Moves a ledger row the caller's attempt holds `started` to
    /// `write.state` (compare-and-set on state and lease, decided by
    /// [`plan::ledger_write`]), with an event of kind `event`, fenced by
    /// the lease. `committed` is final. Any other row is refused with
    /// [`StoreError::LedgerConflict`] and a `ledger_write_refused` event.
    async fn ledger_write(
        &self,
        lease: LeaseRef,
        write: LedgerWrite,
        event: docket_core::EventKind,
        now: Timestamp,
    ) -> Result<()>;

    /// Appends an event to a running run (progress, logs, suppressed
    /// duplicates), fenced by the lease.
    async fn append_event(
        &self,
        lease: LeaseRef,
        kind: docket_core::EventKind,
        data: serde_json::Value,
        now: Timestamp,
    ) -> Result<()>;

    /// Applies an operator command in one transaction with its audit event
    /// (actor and comment). A command the run's state does not allow is a
    /// [`StoreError::WrongState`] naming the state.
    async fn operator(&self, req: OperatorRequest) -> Result<Run>;

    /// Prunes one bounded batch in ONE transaction (the plan comes from
    /// [`RetentionConfig::plan`](retention::RetentionConfig::plan)): at most
    /// `limit` final runs matching a class, each with all its attempts,
    /// events and steps, and at most `limit` ledger rows last written at or
    /// before `ledger_before` whose writing run is gone. A non-final run is
    /// never touched (the status is checked again by the delete). Writes one
    /// [`RUNS_PRUNED`](retention::RUNS_PRUNED) event per (tenant, job) and
    /// one [`LEDGER_PRUNED`](retention::LEDGER_PRUNED) per tenant, with the
    /// counts. With `lead`, the task's row must still carry the token and be
    /// unexpired at `now`, or nothing is deleted (`fenced_out`).
    async fn prune(&self, req: retention::PruneRequest) -> Result<retention::PruneReport>;

    /// Pauses or resumes a job (or every job, `*`) of a tenant, with a
    /// [`JOB_PAUSED`](retention::JOB_PAUSED) /
    /// [`JOB_RESUMED`](retention::JOB_RESUMED) audit event, in one
    /// transaction. Answers whether anything changed (pausing a paused job
    /// changes nothing and writes no event). A paused job's runs are not
    /// claimed and not reported by `next_due`; triggers still queue.
    async fn set_pause(&self, change: retention::PauseChange) -> Result<bool>;

    /// The pauses in force, of a tenant or all, by tenant and job.
    async fn pauses(&self, tenant: Option<String>) -> Result<Vec<retention::Pause>>;

    /// Deletes a final run with its attempts, events and steps, in one
    /// transaction with a [`RUN_DELETED`](retention::RUN_DELETED) audit
    /// event (which keeps the run's id, actor, comment and last state).
    /// A run that is not final is a [`StoreError::WrongState`]; its
    /// ledger rows stay (the ledger has its own retention).
    async fn delete_run(&self, req: retention::DeleteRequest) -> Result<Run>;

    /// Queue health per (tenant, job): due runs and the oldest due
    /// `run_after` (the lag), running, scheduled for later, and runs
    /// completed / failed since `since`. Jobs with none of these are absent.
    async fn queue_health(&self, q: retention::HealthQuery) -> Result<Vec<retention::JobHealth>>;

    /// Asks to lead the periodic `task` as `holder` (unique per process)
    /// until `now + ttl_ms` (see [`lead`](crate::lead)). Answers the fencing token when
    /// `holder` leads it now: the task was free, its lead had expired at or
    /// before `now` (a new, larger token), or `holder` already led it (the
    /// same token; the lead is renewed). `None` while another holder's lead
    /// has not expired. Renew before `ttl_ms` runs out; a holder that lost
    /// the lead and asks again gets a new token, never its old one.
    async fn try_lead(
        &self,
        task: String,
        holder: String,
        now: Timestamp,
        ttl_ms: i64,
    ) -> Result<Option<FencingToken>>;

    /// Gives up the lead of `task` held under `token` (at shutdown), so that
    /// the next node to ask takes over at once instead of when it expires.
    /// A no-op under any other token, or once expired.
    async fn resign(&self, task: String, token: FencingToken, now: Timestamp) -> Result<()>;

    /// Wake-ups sent by other processes when they trigger runs: job names,
    /// or `""` for "check every job" (after a lost connection). `None` when
    /// the backend has no such channel (SQLite: one process wakes its own
    /// workers in memory; other processes are seen by polling).
    async fn wakeups(&self) -> Result<Option<tokio::sync::broadcast::Receiver<String>>> {
        Ok(None)
    }
}

/// A shared, type-erased store.
pub type DynStore = Arc<dyn Store>;

/// Opens a store from a URL: `sqlite://PATH` (created if missing),
/// `sqlite::memory:` (one private in-memory database), or
/// `postgres://…` (with the `postgres` feature; `?schema=NAME` chooses the
/// schema, default `docket`).
pub async fn open(url: &str) -> Result<DynStore> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.trim_start_matches("//");
        let store = if path == ":memory:" || path.is_empty() {
            sqlite::SqliteStore::open_in_memory()?
        } else {
            sqlite::SqliteStore::open(path)?
        };
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(postgres::PgStore::connect(url).await?));
    }
    Err(StoreError::BadUrl(url.to_string()))
}
