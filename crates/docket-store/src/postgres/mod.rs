//! The PostgreSQL backend: many `docket` processes on many machines share one
//! database.
//!
//! - All of Docket's tables live in one schema (default `docket`, chosen with
//!   `?schema=NAME` in the URL or [`PgStore::connect_with`]); every pooled
//!   connection sets its `search_path` to it.
//! - Migrations run at connect, in one transaction under a transaction-level
//!   advisory lock derived from the schema name, so processes starting
//!   together do not race. A schema whose `docket_meta.schema_version` is newer
//!   than [`SCHEMA_VERSION`] is refused with [`StoreError::SchemaTooNew`] and
//!   left untouched.
//! - `claim` is one statement: it picks due runs with `FOR UPDATE SKIP
//!   LOCKED`, so concurrent claimers never wait on, nor take, each other's
//!   runs.
//! - Writes of an attempt are fenced by its lease (`SELECT … FOR UPDATE`,
//!   then a compare of status and lease id), as in SQLite.
//! - After a trigger commits, `pg_notify('docket_wakeup', job)` is sent once
//!   per job with new runs; [`PgStore::listen`] turns those into a channel an
//!   idle worker can wait on.
//!
//! The behaviour is the SQLite backend's, checked by the same conformance
//! suite. What differs, by nature:
//! - event ids come from an identity sequence, so under concurrent writers
//!   an event with a lower id may become visible after one with a higher id
//!   (commit order is not id order): a reader tailing events by id must
//!   allow for that;
//! - the ends of one `finish` call are applied in run id order (each under
//!   its own savepoint, answers in the caller's order) so that concurrent
//!   batches lock rows in one order and cannot deadlock; events of different
//!   runs in one batch therefore follow run ids, not the batch's order;
//! - jsonb cannot store the NUL character (`\u0000`) in strings, and text
//!   columns cannot store NUL bytes: such a trigger fails with
//!   [`StoreError::Database`].

mod connections;
mod durable;
mod hot;
mod ops;
mod stats;
mod tokens;

use crate::{
    AttemptEnd, AttemptRecord, ClaimRequest, EventFilter, EventRecord, LeaseRef, LeaseState,
    NewRun, Result, Run, RunFilter, StatusCount, Store, StoreError, Triggered, SCHEMA_VERSION,
};
use async_trait::async_trait;
use docket_core::{RunId, RunStatus, Timestamp};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::Connection;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

/// The schema used when the URL names none.
pub const DEFAULT_SCHEMA: &str = "docket";

/// The `LISTEN/NOTIFY` channel on which triggers announce new runs; the
/// payload is the job's name. The channel is database-wide: stores on other
/// schemas of the same database share it (a spurious wake-up is harmless).
pub const WAKEUP_CHANNEL: &str = "docket_wakeup";

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
    /// The hot-path task's queue (see `hot.rs`): claims and finishes.
    hot: mpsc::UnboundedSender<hot::Op>,
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
        e => StoreError::Database(e.to_string()),
    }
}

/// Splits `?schema=NAME` off a URL: returns the URL without it (other query
/// parameters kept, for sqlx) and the schema, if given.
fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("schema=") {
            Some(v) => {
                schema = Some(v.to_string());
                false
            }
            None => !kv.is_empty(),
        })
        .collect();
    if rest.is_empty() {
        (base.to_string(), schema)
    } else {
        (format!("{base}?{}", rest.join("&")), schema)
    }
}

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
    pub async fn connect(url: &str) -> Result<Self> {
        let (base, schema) = split_schema(url);
        let schema = schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_string());
        Self::open(&base, schema).await
    }

    /// Connects to `url` using `schema` (any `?schema=` in the URL is
    /// ignored), creating and migrating it if needed.
    pub async fn connect_with(url: &str, schema: &str) -> Result<Self> {
        let (base, _) = split_schema(url);
        Self::open(&base, schema.to_string()).await
    }

    async fn open(url: &str, schema: String) -> Result<Self> {
        if !valid_schema(&schema) {
            return Err(StoreError::BadUrl(format!(
                "{url} (schema `{schema}`: use letters, digits and _)"
            )));
        }
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url} ({e})")))?
            .application_name("docket");
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
            .connect_lazy_with(opts);
        let (hot, rx) = mpsc::unbounded_channel();
        tokio::spawn(hot::hot_path(pool.clone(), rx));
        Ok(PgStore { pool, schema, hot })
    }

    /// The schema this store's tables live in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The connection pool (every connection's `search_path` is
    /// [`schema`](Self::schema)), for work outside the [`Store`] trait such as
    /// periodic jobs under an advisory lock.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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

    /// Announces new runs of `jobs` (at most once per job). Best effort: the
    /// trigger has committed already, and a lost wake-up only delays a
    /// worker until its next poll.
    async fn notify(&self, jobs: Vec<String>) {
        if jobs.is_empty() {
            return;
        }
        let res = sqlx::query("SELECT pg_notify($1, j) FROM unnest($2::text[]) AS j")
            .bind(WAKEUP_CHANNEL)
            .bind(&jobs)
            .execute(&self.pool)
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "pg_notify after trigger failed");
        }
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

/// Creates or upgrades the schema, in one transaction under an advisory
/// lock. Refuses (and leaves alone) a schema written by a newer Docket.
async fn migrate(conn: &mut PgConnection, schema: &str) -> Result<()> {
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
                .map_err(|_| StoreError::Corrupt(format!("schema_version `{v}`")))?,
            None => 0,
        }
    } else {
        0
    };
    if found > SCHEMA_VERSION {
        // Dropping `tx` rolls back: nothing was written.
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found < SCHEMA_VERSION {
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
        sqlx::raw_sql(include_str!("schema.sql"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO docket_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(SCHEMA_VERSION.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    }
    tx.commit().await.map_err(db)
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

    async fn wakeups(&self) -> Result<Option<broadcast::Receiver<String>>> {
        self.listen().await.map(Some)
    }

    async fn trigger(&self, runs: Vec<NewRun>, now: Timestamp) -> Result<Vec<Triggered>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let out = ops::trigger(&mut tx, runs, now).await?;
        tx.commit().await.map_err(db)?;
        let mut jobs: Vec<String> = out
            .iter()
            .filter(|t| !t.existing)
            .map(|t| t.run.job.clone())
            .collect();
        jobs.sort();
        jobs.dedup();
        self.notify(jobs).await;
        Ok(out)
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Run>> {
        if req.jobs.is_empty() || req.limit == 0 {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(hot::Op::Claim(req, _))) =
            self.hot.send(hot::Op::Claim(req, tx))
        {
            return hot::claim_only(&self.pool, &req).await;
        }
        rx.await
            .map_err(|_| StoreError::Database("the hot-path task stopped".into()))?
    }

    async fn finish(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<RunStatus>>> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(hot::Op::Finish(ends, _))) =
            self.hot.send(hot::Op::Finish(ends, tx))
        {
            return hot::finish(&self.pool, ends).await;
        }
        rx.await
            .map_err(|_| StoreError::Database("the hot-path task stopped".into()))?
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

    async fn next_due(&self, jobs: Vec<String>) -> Result<Option<Timestamp>> {
        ops::next_due(&self.pool, &jobs).await
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

    async fn ledger_write(
        &self,
        lease: crate::LeaseRef,
        write: crate::LedgerWrite,
        event: String,
        now: Timestamp,
    ) -> Result<()> {
        durable::ledger_write(&self.pool, lease, &write, &event, now).await
    }

    async fn append_event(
        &self,
        lease: crate::LeaseRef,
        kind: String,
        data: serde_json::Value,
        now: Timestamp,
    ) -> Result<()> {
        durable::append_event(&self.pool, lease, &kind, &data, now).await
    }

    async fn operator(&self, req: crate::OperatorRequest) -> Result<Run> {
        durable::operator(&self.pool, &req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_param_is_split_off() {
        assert_eq!(
            split_schema("postgres://u@h/db?schema=s1"),
            ("postgres://u@h/db".to_string(), Some("s1".to_string()))
        );
        assert_eq!(
            split_schema("postgres://u@h/db?sslmode=disable&schema=s1&application_name=x"),
            (
                "postgres://u@h/db?sslmode=disable&application_name=x".to_string(),
                Some("s1".to_string())
            )
        );
        assert_eq!(
            split_schema("postgres://u@h/db"),
            ("postgres://u@h/db".to_string(), None)
        );
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
