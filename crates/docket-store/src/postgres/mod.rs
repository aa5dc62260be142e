//! The PostgreSQL backend: many `docket` processes on many machines share one
//! database.
//!
//! - All of Docket's tables live in one schema (default `docket`, chosen with
//!   `?schema=NAME` in the URL or [`PgStore::connect_with`]); every pooled
//!   connection sets its `search_path` to it.
//! - Migrations run at connect: numbered steps (`postgres/migrations/`),
//!   each in its own transaction under a transaction-level advisory lock
//!   derived from the schema name, so processes starting together apply
//!   each step once. A schema whose `docket_meta.schema_version` is newer
//!   than [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) is refused with [`StoreError::SchemaTooNew`] and
//!   left untouched.
//! - The hot path (`hot.rs`): a claim is one statement that picks due runs
//!   with `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on,
//!   nor take, each other's runs; a batch of attempt ends is one set-based
//!   statement, and `finish_and_claim` sends the ends and the refill claim
//!   as one statement (one round trip, one commit). They run on two
//!   connections of the store's own, with planner settings that keep their
//!   plans on the indexes whatever the statistics.
//! - Writes of an attempt are fenced by its lease (the run row is locked
//!   `FOR UPDATE`, then status and lease id are compared), as in SQLite.
//! - A trigger's statement sends `pg_notify('docket_wakeup', job)` for each
//!   job with new runs, delivered when it commits; a job's further triggers
//!   within 5 ms are coalesced into one notification at the end of that
//!   window (debounced on the sending side). [`PgStore::listen`] turns them
//!   into a channel an idle worker can wait on; polling stays the fallback.
//! - Expired leases are reaped by every worker, with no leader:
//!   `Store::reap` locks only runs still running under the expired lease
//!   (`FOR UPDATE SKIP LOCKED`, fenced on lease and expiry), so concurrent
//!   reapers reap each lease once (`hot.rs`).
//!
//! The behaviour is the SQLite backend's, checked by the same conformance
//! suite. What differs, by nature:
//! - event ids come from an identity sequence, so under concurrent writers
//!   an event with a lower id may become visible after one with a higher id
//!   (commit order is not id order): a reader tailing events by id must
//!   allow for that;
//! - the ends of one `finish` call are applied in run id order (answers in
//!   the caller's order) so that concurrent batches lock rows in one order
//!   and cannot deadlock; events of different runs in one batch therefore
//!   follow run ids, not the batch's order;
//! - an end for a run that does not exist is `Err(NotFound)` in its slot
//!   (SQLite fails the whole call);
//! - jsonb cannot store the NUL character (`\u0000`) in strings, and text
//!   columns cannot store NUL bytes: such a trigger fails with
//!   [`StoreError::Database`] (such an attempt end fails alone, in its slot).

mod children;
mod connections;
mod durable;
mod hot;
mod ops;
mod schedules;
mod signals;

mod limits;
mod retention;
mod stats;
mod tokens;
mod workers;

use crate::{
    AttemptEnd, AttemptRecord, ClaimRequest, EventFilter, EventRecord, LeaseRef, LeaseState,
    NewRun, Result, Run, RunFilter, StatusCount, Store, StoreError, Triggered,
};
use async_trait::async_trait;
use docket_core::{RunId, RunStatus, Timestamp};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::Connection;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// The schema used when the URL names none.
pub const DEFAULT_SCHEMA: &str = "docket";

/// The `LISTEN/NOTIFY` channel on which triggers announce new runs; the
/// payload is the job's name. The channel is database-wide: stores on other
/// schemas of the same database share it (a spurious wake-up is harmless).
pub const WAKEUP_CHANNEL: &str = "docket_wakeup";

/// The `application_name` of Docket's connections unless the URL sets one
/// (`?application_name=…`), so that an operator can tell them apart in
/// `pg_stat_activity`.
pub const DEFAULT_APPLICATION_NAME: &str = "docket";

/// Connections per store's pool.
const MAX_CONNECTIONS: u32 = 10;

/// How long a call waits for a pooled connection (e.g. while the server is
/// unreachable) before failing with a transient [`StoreError::Database`].
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL store. Cheap to clone (it wraps a connection pool).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    schema: String,
    /// How to open a connection outside the pool.
    opts: PgConnectOptions,
    /// The hot path's own connections (see [`HotSlot`]).
    hot: Arc<[tokio::sync::Mutex<HotSlot>; HOT_CONNECTIONS]>,
    /// Sending-side debounce of wake-ups.
    notifier: Arc<Notifier>,
    /// Where the next claim starts visiting tenants (`plan::fair`).
    fair: Arc<crate::plan::fair::Cursor>,
    /// Taken by this process's keyed claims, from the key locks to the
    /// commit (see `hot::KeyedTurn`).
    keyed_turn: Arc<hot::KeyedTurn>,
}

/// At most one wake-up per job per this window from one store: a trigger
/// right after another of the same job defers its notification to the end
/// of the window, where all deferred ones go out as one. Listeners are
/// woken at most that much later, never not at all.
const NOTIFY_WINDOW: Duration = Duration::from_millis(5);

/// The sending side of wake-ups: the first trigger of a job in a window
/// notifies inside its own statement (no extra round trip; delivered at its
/// commit); later ones in the window are coalesced into one `pg_notify`
/// sent when the window ends.
#[derive(Default)]
struct Notifier {
    state: std::sync::Mutex<NotifyState>,
    /// Signalled when a deferred send has gone out.
    sent: tokio::sync::Notify,
}

#[derive(Default)]
struct NotifyState {
    /// When each job last notified (or will, at the end of its window).
    last: std::collections::HashMap<String, tokio::time::Instant>,
    /// Jobs waiting for the end of their window.
    deferred: std::collections::BTreeSet<String>,
    /// A task is waiting to send the deferred ones.
    flushing: bool,
    /// Deferred sends taken but not yet answered by the server.
    sending: usize,
}

impl Notifier {
    /// Of `jobs`, those that may notify now; the others' window is open.
    fn admit(&self, jobs: &[String]) -> Vec<String> {
        let now = tokio::time::Instant::now();
        let mut st = self.state.lock().expect("notifier");
        if st.last.len() > 10_000 {
            st.last
                .retain(|_, t| now.duration_since(*t) < NOTIFY_WINDOW);
        }
        jobs.iter()
            .filter(|j| match st.last.get(j.as_str()) {
                Some(t) if now.duration_since(*t) < NOTIFY_WINDOW => false,
                _ => {
                    st.last.insert((*j).clone(), now);
                    true
                }
            })
            .cloned()
            .collect()
    }

    /// Sends a wake-up for `jobs` at the end of the current window (best
    /// effort: a lost wake-up delays a worker until its next poll).
    fn defer(self: &Arc<Self>, jobs: Vec<String>, pool: &PgPool) {
        if jobs.is_empty() {
            return;
        }
        let mut st = self.state.lock().expect("notifier");
        st.deferred.extend(jobs);
        if st.flushing {
            return;
        }
        st.flushing = true;
        let me = self.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NOTIFY_WINDOW).await;
            let jobs: Vec<String> = {
                let mut st = me.state.lock().expect("notifier");
                st.flushing = false;
                st.sending += 1;
                let now = tokio::time::Instant::now();
                let jobs: Vec<String> = std::mem::take(&mut st.deferred).into_iter().collect();
                for j in &jobs {
                    st.last.insert(j.clone(), now);
                }
                jobs
            };
            let res = sqlx::query("SELECT pg_notify($1, j) FROM unnest($2::text[]) AS j")
                .bind(WAKEUP_CHANNEL)
                .bind(&jobs)
                .execute(&pool)
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "deferred pg_notify failed");
            }
            me.state.lock().expect("notifier").sending -= 1;
            me.sent.notify_waiters();
        });
    }

    /// Resolves once no deferred wake-up is waiting or being sent.
    async fn flushed(&self) {
        loop {
            let sent = self.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            {
                let st = self.state.lock().expect("notifier");
                if !st.flushing && st.sending == 0 {
                    return;
                }
            }
            sent.await;
        }
    }
}

/// Connections of a store reserved for the hot path (claims and finishes).
const HOT_CONNECTIONS: usize = 2;

/// Planner settings of the hot path's connections. Their statements are a
/// fixed few whose only good plans are index plans (the claim walks
/// `runs_claim` in order and stops after `LIMIT` rows; a finish looks its
/// runs and attempts up by primary key). Without statistics (a fresh table,
/// autovacuum off or behind) PostgreSQL may prefer a bitmap scan of every
/// due run plus a sort, or a sequential scan of `attempts`, whose cost grows
/// with the table; these settings rule such plans out, and the generic plan
/// spares re-planning each execution.
/// How long PostgreSQL lets a Docket session sit idle inside a transaction
/// before ending it (and releasing its row locks): a bound on how long a
/// stopped process can keep a run from being reaped. Shorter than any
/// sensible lease, far longer than Docket's own gaps between the statements
/// of one transaction.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

const HOT_SETTINGS: [(&str, &str); 3] = [
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// One of the hot path's own connections: claims and finishes run on them
/// (with [`HOT_SETTINGS`]) rather than on pooled connections, which sqlx
/// pings when they are taken and again when they are given back (two round
/// trips per use). One caller per connection at a time.
#[derive(Default)]
struct HotSlot {
    conn: Option<PgConnection>,
    /// A call was under way when its future was dropped: the connection may
    /// be mid-protocol, so it is replaced.
    busy: bool,
}

/// A hot-path connection, held for one call.
struct HotConn<'a>(tokio::sync::MutexGuard<'a, HotSlot>);

impl HotConn<'_> {
    fn conn(&mut self) -> &mut PgConnection {
        self.0.conn.as_mut().expect("connected before use")
    }

    /// Marks the call done. A call that failed as a whole (the server was
    /// unreachable, the connection broke) drops the connection, so the next
    /// call opens a fresh one.
    fn done<T>(mut self, res: &Result<T>) {
        self.0.busy = false;
        if res.is_err() {
            self.0.conn = None;
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Maps a sqlx error: decoding problems are [`StoreError::Corrupt`], the rest
/// (connection lost, pool exhausted, the server's own errors) are
/// [`StoreError::Database`], which callers may retry.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        e => StoreError::Db {
            kind: pg_kind(&e),
            source: Box::new(e),
        },
    }
}

/// The kind of a driver error, by SQLSTATE class where the server answered.
fn pg_kind(e: &sqlx::Error) -> crate::DbErrorKind {
    use crate::DbErrorKind as K;
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => K::Connection,
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.to_string()).unwrap_or_default();
            match code.get(..2).unwrap_or("") {
                // connection exception; operator intervention (shutdown,
                // restart, cannot connect now)
                "08" | "57" => K::Connection,
                // transaction rollback (serialization, deadlock); insufficient
                // resources; lock not available
                "40" | "53" | "55" => K::Busy,
                "23" => K::Constraint,
                "XX" if code == "XX001" || code == "XX002" => K::Corrupt,
                _ => K::Bug,
            }
        }
        _ => K::Bug,
    }
}

/// Splits a Docket parameter (`?schema=NAME`, `?synchronous_commit=off`)
/// off a URL: returns the URL without it (other query parameters kept, for
/// sqlx) and its value, if given.
fn split_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let prefix = format!("{name}=");
    let mut value = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix(prefix.as_str()) {
            Some(v) => {
                value = Some(v.to_string());
                false
            }
            None => !kv.is_empty(),
        })
        .collect();
    if rest.is_empty() {
        (base.to_string(), value)
    } else {
        (format!("{base}?{}", rest.join("&")), value)
    }
}

/// The values PostgreSQL accepts for `synchronous_commit`.
const SYNCHRONOUS_COMMIT: [&str; 5] = ["on", "off", "local", "remote_write", "remote_apply"];

/// Schema names are spliced into DDL (identifiers cannot be parameters), so
/// only plain identifiers are accepted: a letter or `_`, then letters, digits
/// and `_`, at most 63 bytes.
fn valid_schema(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// The advisory lock key that serialises migrations of one schema
/// (FNV-1a of a fixed prefix and the schema name).
fn migration_lock_key(schema: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "docket-migrate:".bytes().chain(schema.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

impl PgStore {
    /// Connects to `postgres://…` (or `postgresql://…`), migrating the
    /// schema named by the URL's `?schema=NAME` (default `docket`).
    ///
    /// Docket's own URL parameters, besides sqlx's (`application_name`,
    /// `sslmode`, `options`, …):
    /// - `schema=NAME`: where the tables live (default `docket`);
    /// - `synchronous_commit=off` (or `local`, `remote_write`, …): sets
    ///   PostgreSQL's `synchronous_commit` on Docket's connections. **An
    ///   opt-in that trades durability for throughput**: with `off`, a
    ///   commit returns before its WAL is flushed, so a crash of the server
    ///   or the machine may lose the last few hundred milliseconds of
    ///   committed claims and ends (never corrupting anything). See
    ///   docs/POSTGRES.md. The default is the server's setting (`on`).
    pub async fn connect(url: &str) -> Result<Self> {
        let (base, schema) = split_param(url, "schema");
        let schema = schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_string());
        Self::open(&base, schema).await
    }

    /// Connects to `url` using `schema` (any `?schema=` in the URL is
    /// ignored), creating and migrating it if needed.
    pub async fn connect_with(url: &str, schema: &str) -> Result<Self> {
        let (base, _) = split_param(url, "schema");
        Self::open(&base, schema.to_string()).await
    }

    async fn open(url: &str, schema: String) -> Result<Self> {
        if !valid_schema(&schema) {
            return Err(StoreError::BadUrl(format!(
                "{url} (schema `{schema}`: use letters, digits and _)"
            )));
        }
        let (url, sync) = split_param(url, "synchronous_commit");
        let url = url.as_str();
        let mut opts = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url} ({e})")))?;
        if opts.get_application_name().is_none() {
            opts = opts.application_name(DEFAULT_APPLICATION_NAME);
        }
        if let Some(v) = sync {
            if !SYNCHRONOUS_COMMIT.contains(&v.as_str()) {
                return Err(StoreError::BadUrl(format!(
                    "{url} (synchronous_commit `{v}`: use one of {})",
                    SYNCHRONOUS_COMMIT.join(", ")
                )));
            }
            opts = opts.options([("synchronous_commit", v.as_str())]);
        }
        // A process stopped (SIGSTOP, a long pause) in the middle of one of
        // its few multi-statement transactions (durable steps, the ledger)
        // would keep its run's row locked, and the reapers skip locked rows:
        // the server ends such a session instead, which releases the lock.
        // Docket never leaves a transaction idle for more than moments.
        opts = opts.options([(
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        )]);
        // Migrate over one direct connection first: a server that is down or
        // refuses us is reported at once, with its own error (a pool would
        // retry until its acquire timeout and report only that).
        let mut conn = PgConnection::connect_with(&opts).await.map_err(db)?;
        set_search_path(&mut conn, &schema).await.map_err(db)?;
        migrate(&mut conn, &schema).await?;
        let _ = conn.close().await;
        let search_path = schema.clone();
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |conn, _meta| {
                let search_path = search_path.clone();
                Box::pin(async move { set_search_path(conn, &search_path).await })
            })
            .connect_lazy_with(opts.clone());
        Ok(PgStore {
            pool,
            schema,
            opts,
            hot: Arc::default(),
            notifier: Arc::default(),
            fair: Arc::default(),
            keyed_turn: Arc::default(),
        })
    }

    /// A connection for a hot-path call (see [`HotSlot`]): a free one, or
    /// the first once it is free.
    async fn hot_conn(&self) -> Result<HotConn<'_>> {
        let mut g = match self.hot.iter().find_map(|m| m.try_lock().ok()) {
            Some(g) => g,
            None => self.hot[0].lock().await,
        };
        if g.busy {
            g.conn = None;
        }
        if g.conn.is_none() {
            let opts = self.opts.clone().options(HOT_SETTINGS);
            let mut c = PgConnection::connect_with(&opts).await.map_err(db)?;
            set_search_path(&mut c, &self.schema).await.map_err(db)?;
            g.conn = Some(c);
        }
        g.busy = true;
        Ok(HotConn(g))
    }

    /// Drops this store's schema with everything in it (tests and
    /// benchmarks clean up with it). The store is unusable afterwards.
    pub async fn drop_schema(&self) -> Result<()> {
        // The name was validated by `valid_schema`.
        sqlx::raw_sql(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The schema this store's tables live in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection pool (every connection's `search_path` is
    /// [`schema`](Self::schema)), for work outside the [`Store`] trait
    /// (tests, maintenance). Periodic work that must run on one node at a
    /// time leads through [`Store::try_lead`], never a session lock: a
    /// stopped holder would keep it.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Waits until every wake-up this store deferred (coalesced triggers of
    /// a job within its 5 ms window) has been sent: call it before closing
    /// the store so the last triggers are announced, or in a test to order
    /// a later notification after them.
    pub async fn flush_wakeups(&self) {
        self.notifier.flushed().await;
    }

    /// Subscribes to trigger wake-ups: each message is the name of a job that
    /// has new runs. An empty string means wake-ups may have been lost (the
    /// listening connection was re-established): check every job. A
    /// [`broadcast::error::RecvError::Lagged`] means the same.
    ///
    /// Spawns a task holding one pooled connection that `LISTEN`s on
    /// [`WAKEUP_CHANNEL`], reconnecting with backoff when the connection
    /// fails. The task stops when the pool is closed, or at the first
    /// notification after every receiver has been dropped. Notifications are
    /// only a hint to wake up early: a worker must still poll (see
    /// [`Store::next_due`]), since retries and postponements announce nothing.
    pub async fn listen(&self) -> Result<broadcast::Receiver<String>> {
        let listener = new_listener(&self.pool).await.map_err(db)?;
        let (tx, rx) = broadcast::channel(1024);
        tokio::spawn(forward_wakeups(self.pool.clone(), listener, tx));
        Ok(rx)
    }
}

/// Points `search_path` at `schema` (quoted: the name was validated).
async fn set_search_path(
    conn: &mut PgConnection,
    schema: &str,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('search_path', $1, false)")
        .bind(format!("\"{schema}\""))
        .execute(conn)
        .await?;
    Ok(())
}

/// The schema, as numbered forward-only steps: step `n` (1-based) takes a
/// schema from version `n - 1` to `n`, numbered as the SQLite steps. A
/// released step is never edited; a schema change is a new step at the end
/// (ARCHITECTURE.md, "Migrations").
pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_initial.sql"),
    include_str!("migrations/0002_steps_ledger_tokens_connections.sql"),
    include_str!("migrations/0003_leaders.sql"),
    include_str!("migrations/0004_schedules.sql"),
    include_str!("migrations/0005_trace_context.sql"),
    include_str!("migrations/0006_worker_scope.sql"),
    include_str!("migrations/0007_retention.sql"),
    include_str!("migrations/0008_flow.sql"),
    include_str!("migrations/0009_rate.sql"),
    include_str!("migrations/0010_signals.sql"),
    include_str!("migrations/0011_children.sql"),
    include_str!("migrations/0012_fair.sql"),
    include_str!("migrations/0013_sleeping.sql"),
    include_str!("migrations/0014_debounce.sql"),
    include_str!("migrations/0015_due.sql"),
    include_str!("migrations/0016_flow_reads.sql"),
];

/// Creates or upgrades the schema by applying [`MIGRATIONS`]. Refuses (and
/// leaves alone) a schema written by a newer Docket.
async fn migrate(conn: &mut PgConnection, schema: &str) -> Result<()> {
    migrate_with(conn, schema, MIGRATIONS).await
}

/// Applies `steps` after the stored version, each in its own transaction
/// together with its version bump, under a transaction-level advisory lock
/// derived from the schema name (taken again by every step's transaction).
/// The version is read under the lock before every step, so processes that
/// start together apply each step once: the later ones find it done. A
/// failed step leaves the schema at the previous version with nothing
/// half-written. No version row (a schema from before versioning, or a new
/// one) counts as version 0: steps 1-3 are written with IF NOT EXISTS, so
/// they complete whatever such a schema already has.
async fn migrate_with(conn: &mut PgConnection, schema: &str, steps: &[&str]) -> Result<()> {
    let newest = steps.len() as i64;
    loop {
        let mut tx = conn.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(migration_lock_key(schema))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let has_meta: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
                WHERE schemaname = $1 AND tablename = 'docket_meta')",
        )
        .bind(schema)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let found: i64 = if has_meta {
            let v: Option<String> =
                sqlx::query_scalar("SELECT value FROM docket_meta WHERE key = 'schema_version'")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            match v {
                Some(v) => v
                    .parse()
                    .ok()
                    .filter(|v| *v >= 0)
                    .ok_or_else(|| StoreError::Corrupt(format!("schema_version `{v}`")))?,
                None => 0,
            }
        } else {
            0
        };
        if found > newest {
            // Dropping `tx` rolls back: nothing was written.
            return Err(StoreError::SchemaTooNew {
                found,
                supported: newest,
            });
        }
        if found == newest {
            return tx.commit().await.map_err(db);
        }
        // The name was validated by `valid_schema`; identifiers cannot
        // be bound as parameters.
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", schema);
        sqlx::raw_sql(&create).execute(&mut *tx).await.map_err(db)?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS docket_meta (key text PRIMARY KEY, value text NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        // Index `found` is step `found + 1`.
        sqlx::raw_sql(steps[found as usize])
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO docket_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind((found + 1).to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
    }
}

async fn new_listener(pool: &PgPool) -> std::result::Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(WAKEUP_CHANNEL).await?;
    Ok(listener)
}

async fn forward_wakeups(pool: PgPool, mut listener: PgListener, tx: broadcast::Sender<String>) {
    loop {
        let msg = match listener.try_recv().await {
            Ok(Some(n)) => n.payload().to_string(),
            // The connection dropped and was re-established (listening
            // again): whatever was sent meanwhile is lost.
            Ok(None) => String::new(),
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, "docket wake-up listener failed; reconnecting");
                let mut backoff = Duration::from_millis(100);
                loop {
                    tokio::time::sleep(backoff).await;
                    if pool.is_closed() || tx.receiver_count() == 0 {
                        return;
                    }
                    match new_listener(&pool).await {
                        Ok(l) => break listener = l,
                        Err(e) => {
                            tracing::warn!(error = %e, "docket wake-up listener cannot reconnect");
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
                String::new()
            }
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn round_hints(&self) -> crate::RoundHints {
        crate::RoundHints {
            // One per hot connection: the next round executes on one while
            // the last one's commit is flushed on the other.
            in_flight: HOT_CONNECTIONS,
            hold_ends: true,
        }
    }

    async fn try_lead(
        &self,
        task: String,
        holder: String,
        now: Timestamp,
        ttl_ms: i64,
    ) -> Result<Option<crate::FencingToken>> {
        let token: Option<i64> = sqlx::query_scalar(crate::lead::TRY_LEAD_SQL)
            .bind(task)
            .bind(holder)
            .bind(now.0)
            .bind(now.plus_millis(ttl_ms).0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(token.map(crate::FencingToken))
    }

    async fn resign(&self, task: String, token: crate::FencingToken, now: Timestamp) -> Result<()> {
        sqlx::query(crate::lead::RESIGN_SQL)
            .bind(task)
            .bind(token.0)
            .bind(now.0)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn wakeups(&self) -> Result<Option<broadcast::Receiver<String>>> {
        self.listen().await.map(Some)
    }

    async fn trigger(&self, runs: Vec<NewRun>, now: Timestamp) -> Result<Vec<Triggered>> {
        crate::json::check_runs(&runs)?;
        // One statement, in autocommit: the insert is atomic on its own, and
        // the wake-up it sends is delivered when it commits.
        let mut jobs: Vec<String> = runs.iter().map(|r| r.job.clone()).collect();
        jobs.sort();
        jobs.dedup();
        let now_jobs = self.notifier.admit(&jobs);
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let out = ops::trigger(&mut conn, runs, now, &now_jobs).await?;
        drop(conn);
        let mut later: Vec<String> = out
            .iter()
            .filter(|t| !t.existing && !now_jobs.contains(&t.run.job))
            .map(|t| t.run.job.clone())
            .collect();
        later.sort();
        later.dedup();
        self.notifier.defer(later, &self.pool);
        Ok(out)
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Run>> {
        if req.jobs.is_empty() || req.limit == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.hot_conn().await?;
        let res = hot::claim(c.conn(), &req, &self.fair, &self.keyed_turn).await;
        c.done(&res);
        res
    }

    async fn finish(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<RunStatus>>> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let (ends, refused) = crate::json::Refused::screen(ends);
        if ends.is_empty() {
            return Ok(refused.merge(Vec::new()));
        }
        let mut c = self.hot_conn().await?;
        let res = hot::finish(c.conn(), ends).await;
        c.done(&res);
        Ok(refused.merge(res?))
    }

    async fn finish_and_claim(
        &self,
        ends: Vec<AttemptEnd>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<Result<RunStatus>>, Vec<Run>)> {
        let (ends, refused) = crate::json::Refused::screen(ends);
        let mut c = self.hot_conn().await?;
        let res = hot::finish_and_claim(c.conn(), ends, claims, &self.fair, &self.keyed_turn).await;
        c.done(&res);
        let (finished, runs) = res?;
        Ok((refused.merge(finished), runs))
    }

    async fn heartbeat(
        &self,
        leases: Vec<LeaseRef>,
        expires_at: Timestamp,
    ) -> Result<Vec<LeaseState>> {
        ops::heartbeat(&self.pool, &leases, expires_at).await
    }

    async fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Run>> {
        ops::expired_leases(&self.pool, now, limit).await
    }

    async fn reap(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<Option<RunStatus>>>> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        // A pooled connection, not the hot path's: reaping is background
        // work and must not queue behind (or delay) claims and ends.
        let mut conn = self.pool.acquire().await.map_err(db)?;
        hot::reap(&mut conn, ends).await
    }

    async fn next_due(&self, jobs: Vec<String>) -> Result<Option<Timestamp>> {
        ops::next_due(&self.pool, &jobs).await
    }

    async fn concurrency_usage(
        &self,
        tenant: Option<String>,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<crate::KeyUsage>> {
        ops::concurrency_usage(&self.pool, tenant.as_deref(), now, limit).await
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>> {
        ops::get_run(&self.pool, id).await
    }

    async fn list_runs(&self, filter: RunFilter) -> Result<Vec<Run>> {
        ops::list_runs(&self.pool, &filter).await
    }

    async fn count_runs(&self, tenant: Option<String>) -> Result<Vec<StatusCount>> {
        ops::count_runs(&self.pool, tenant.as_deref()).await
    }

    async fn attempts(&self, run_id: RunId) -> Result<Vec<AttemptRecord>> {
        ops::attempts(&self.pool, run_id).await
    }

    async fn events(&self, filter: EventFilter) -> Result<Vec<EventRecord>> {
        ops::events(&self.pool, &filter).await
    }

    async fn steps(&self, run_id: RunId) -> Result<Vec<crate::StepRecord>> {
        durable::steps(&self.pool, run_id).await
    }

    async fn save_step(
        &self,
        lease: crate::LeaseRef,
        name: String,
        result: serde_json::Value,
        now: Timestamp,
    ) -> Result<crate::LeaseState> {
        crate::json::check_depth("result", &result)?;
        durable::save_step(&self.pool, lease, &name, &result, now).await
    }

    async fn fail_step(
        &self,
        lease: crate::LeaseRef,
        name: String,
        class: docket_core::ErrorClass,
        message: String,
        now: Timestamp,
    ) -> Result<()> {
        durable::fail_step(&self.pool, lease, &name, class, &message, now).await
    }

    async fn ledger_get(&self, tenant: String, key: String) -> Result<Option<crate::LedgerEntry>> {
        durable::ledger_get(&self.pool, &tenant, &key).await
    }

    async fn ledger_for_run(&self, run_id: RunId) -> Result<Vec<crate::LedgerEntry>> {
        durable::ledger_for_run(&self.pool, run_id).await
    }

    async fn ledger_begin(
        &self,
        lease: crate::LeaseRef,
        idempotency_key: String,
        action: String,
        now: Timestamp,
    ) -> Result<crate::LedgerBegin> {
        durable::ledger_begin(&self.pool, lease, &idempotency_key, &action, now).await
    }

    async fn ledger_write(
        &self,
        lease: crate::LeaseRef,
        write: crate::LedgerWrite,
        event: docket_core::EventKind,
        now: Timestamp,
    ) -> Result<()> {
        crate::json::check_ledger(&write)?;
        durable::ledger_write(&self.pool, lease, &write, &event, now).await
    }

    async fn append_event(
        &self,
        lease: crate::LeaseRef,
        kind: docket_core::EventKind,
        data: serde_json::Value,
        now: Timestamp,
    ) -> Result<()> {
        crate::json::check_depth("data", &data)?;
        durable::append_event(&self.pool, lease, &kind, &data, now).await
    }

    async fn operator(&self, req: crate::OperatorRequest) -> Result<Run> {
        crate::json::check_operator(&req)?;
        durable::operator(&self.pool, &req).await
    }

    async fn prune(
        &self,
        req: crate::retention::PruneRequest,
    ) -> Result<crate::retention::PruneReport> {
        retention::prune(&self.pool, &req).await
    }

    async fn set_pause(&self, change: crate::retention::PauseChange) -> Result<bool> {
        retention::set_pause(&self.pool, &change).await
    }

    async fn pauses(&self, tenant: Option<String>) -> Result<Vec<crate::retention::Pause>> {
        retention::pauses(&self.pool, tenant.as_deref()).await
    }

    async fn queue_health(
        &self,
        q: crate::retention::HealthQuery,
    ) -> Result<Vec<crate::retention::JobHealth>> {
        retention::queue_health(&self.pool, &q).await
    }

    async fn delete_run(&self, req: crate::retention::DeleteRequest) -> Result<Run> {
        retention::delete_run(&self.pool, &req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_param_is_split_off() {
        assert_eq!(
            split_param("postgres://u@h/db?schema=s1", "schema"),
            ("postgres://u@h/db".to_string(), Some("s1".to_string()))
        );
        assert_eq!(
            split_param(
                "postgres://u@h/db?sslmode=disable&schema=s1&application_name=x",
                "schema"
            ),
            (
                "postgres://u@h/db?sslmode=disable&application_name=x".to_string(),
                Some("s1".to_string())
            )
        );
        assert_eq!(
            split_param("postgres://u@h/db", "schema"),
            ("postgres://u@h/db".to_string(), None)
        );
    }

    #[test]
    fn a_second_wake_up_in_the_window_is_deferred() {
        let n = Notifier::default();
        let jobs = vec!["a".to_string(), "b".to_string()];
        assert_eq!(n.admit(&jobs), jobs);
        // Back to back: both windows are still open.
        assert!(n.admit(&jobs).is_empty());
        assert_eq!(n.admit(&["c".to_string()]), vec!["c".to_string()]);
        std::thread::sleep(NOTIFY_WINDOW * 2);
        assert_eq!(n.admit(&jobs), jobs);
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("docket"));
        assert!(valid_schema("t_0190abcd"));
        assert!(!valid_schema(""));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema("a\"; DROP TABLE x; --"));
        assert!(!valid_schema(&"a".repeat(64)));
        assert_ne!(migration_lock_key("a"), migration_lock_key("b"));
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    #[test]
    fn schema_version_is_the_number_of_steps() {
        assert_eq!(MIGRATIONS.len() as i64, crate::SCHEMA_VERSION);
    }

    /// A connection to a fresh schema of the test database, or `None`
    /// (the test then passes, saying why) without `DOCKET_TEST_POSTGRES_URL`.
    async fn fresh() -> Option<(PgConnection, String)> {
        let Ok(url) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
            eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL to run PostgreSQL tests");
            return None;
        };
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(&url).await.unwrap();
        set_search_path(&mut conn, &schema).await.unwrap();
        Some((conn, schema))
    }

    async fn version(c: &mut PgConnection) -> String {
        sqlx::query_scalar("SELECT value FROM docket_meta WHERE key = 'schema_version'")
            .fetch_one(c)
            .await
            .unwrap()
    }

    async fn drop_schema(c: &mut PgConnection, schema: &str) {
        // A fresh `t_<uuid>` name: safe to quote.
        sqlx::raw_sql(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(c)
            .await
            .unwrap();
    }

    /// Steps that fail if applied twice (a second CREATE TABLE, a duplicate
    /// primary key, a second ADD COLUMN) prove each ran exactly once.
    const PROBE: &[&str] = &[
        "CREATE TABLE probe (n integer PRIMARY KEY);",
        "INSERT INTO probe (n) VALUES (2);",
        "ALTER TABLE probe ADD COLUMN x text; INSERT INTO probe (n, x) VALUES (3, 'c');",
    ];

    #[tokio::test]
    async fn each_step_is_applied_once_in_order_and_reconnecting_is_a_no_op() {
        let Some((mut c, schema)) = fresh().await else {
            return;
        };
        migrate_with(&mut c, &schema, &PROBE[..1]).await.unwrap();
        assert_eq!(version(&mut c).await, "1");
        migrate_with(&mut c, &schema, PROBE).await.unwrap();
        assert_eq!(version(&mut c).await, "3");
        migrate_with(&mut c, &schema, PROBE).await.unwrap();
        assert_eq!(version(&mut c).await, "3");
        let rows: Vec<(i32, Option<String>)> = sqlx::query_as("SELECT n, x FROM probe ORDER BY n")
            .fetch_all(&mut c)
            .await
            .unwrap();
        assert_eq!(rows, [(2, None), (3, Some("c".to_string()))]);
        // A build with fewer steps refuses the schema and writes nothing.
        match migrate_with(&mut c, &schema, &PROBE[..2]).await {
            Err(StoreError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (3, 2));
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
        assert_eq!(version(&mut c).await, "3");
        drop_schema(&mut c, &schema).await;
    }

    /// Two processes connecting at once apply each step once: the version is
    /// read again under the advisory lock before every step.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_connects_apply_each_step_once() {
        let Some((mut a, schema)) = fresh().await else {
            return;
        };
        let url = std::env::var("DOCKET_TEST_POSTGRES_URL").unwrap();
        let mut b = PgConnection::connect(&url).await.unwrap();
        set_search_path(&mut b, &schema).await.unwrap();
        let (ra, rb) = tokio::join!(
            migrate_with(&mut a, &schema, PROBE),
            migrate_with(&mut b, &schema, PROBE)
        );
        ra.unwrap();
        rb.unwrap();
        assert_eq!(version(&mut a).await, "3");
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe")
            .fetch_one(&mut a)
            .await
            .unwrap();
        assert_eq!(n, 2);
        drop_schema(&mut a, &schema).await;
    }

    /// A step that fails leaves the schema at the previous version, with
    /// none of its own statements applied; the steps before it stay.
    #[tokio::test]
    async fn a_failing_step_is_rolled_back_alone() {
        let Some((mut c, schema)) = fresh().await else {
            return;
        };
        let steps = [
            PROBE[0],
            "INSERT INTO probe (n) VALUES (7); INSERT INTO no_such_table VALUES (1);",
        ];
        assert!(migrate_with(&mut c, &schema, &steps).await.is_err());
        assert_eq!(version(&mut c).await, "1");
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 0, "the failed step's first insert was rolled back");
        drop_schema(&mut c, &schema).await;
    }
}
