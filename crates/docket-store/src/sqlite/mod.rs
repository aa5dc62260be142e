//! The embedded SQLite backend.
//!
//! One connection, owned by one writer thread. Callers send it closures; the
//! thread takes every request that is waiting, runs them in ONE transaction,
//! each under its own savepoint (so one request's error rolls back only its
//! own writes), commits once, and only then answers. This is group commit:
//! under load many transitions share one commit, while each remains atomic on
//! its own. WAL mode with `synchronous = NORMAL` keeps commits cheap; other
//! processes opening the same file wait on SQLite's write lock
//! (`BEGIN IMMEDIATE` + busy timeout).
//!
//! Reads for the API, the dashboard and reports (run lists, counts, a run's
//! attempts, events, steps and ledger, tokens, stats) run on
//! [`READERS`] read-only connections of their own when the database is a
//! file: WAL lets them read while the writer commits, so a slow aggregate
//! (counting a million runs for `/metrics`) never holds up a transition.
//! Every write answers only after its commit, so a read that follows it sees
//! it. An in-memory database has one connection: everything goes through
//! the writer thread. The engine's own reads on its hot path (`next_due`,
//! `ledger_get`, `expired_leases`) stay on the writer thread, ordered with
//! its writes.

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

use crate::DbErrorKind;
use crate::{
    AttemptEnd, AttemptRecord, ClaimRequest, EventFilter, EventRecord, LeaseRef, LeaseState,
    LedgerBegin, LedgerEntry, LedgerWrite, NewRun, OperatorRequest, Result, Run, RunFilter,
    StatusCount, StepRecord, Store, StoreError, Triggered,
};
use async_trait::async_trait;
use docket_core::{RunId, RunStatus, Timestamp};
use rusqlite::{Connection, OptionalExtension};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// What the writer thread runs: a request, which returns what to do once the
/// transaction's fate is known (`None` = committed, `Some(e)` = commit failed).
type Reply = Box<dyn FnOnce(Option<String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Reply + Send>;
/// What a reader thread runs.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// Read-only connections (and threads) of a file database.
pub const READERS: usize = 2;

/// Most requests folded into one transaction.
const MAX_BATCH: usize = 512;

/// The SQLite store. Cheap to share behind an `Arc`; dropping the last handle
/// stops the writer thread after it has finished its queue.
pub struct SqliteStore {
    tx: mpsc::Sender<Job>,
    /// The database file, for the reader connections (`None`: in memory,
    /// reads go through the writer thread).
    path: Option<String>,
    /// The reader threads' queue, started at the first read (a process
    /// that only runs a worker never pays for them); `None` inside when
    /// they could not start (reads then go through the writer thread).
    readers: std::sync::OnceLock<Option<mpsc::Sender<ReadJob>>>,
    /// The checkpoint thread holds a weak reference and stops with the store.
    alive: std::sync::Arc<()>,
    /// Other connections' commits, seen by the writer thread (file
    /// databases only): see [`SqliteStore::wakeups`].
    watch: Option<std::sync::Arc<Watch>>,
    /// The WAL size past which a checkpoint truncates it.
    wal_limit: i64,
    /// Where the next claim starts visiting tenants (`plan::fair`).
    fair: std::sync::Arc<crate::plan::fair::Cursor>,
}

/// Prepared statements kept by the writer connection (see `start`).
const WRITER_STATEMENT_CACHE: usize = 128;

/// A reader connection's page cache, as `PRAGMA cache_size` (negative:
/// KiB): 512 KiB instead of SQLite's 2 MiB (see `start_readers`).
const READER_CACHE_KIB: i64 = -512;

/// How often an idle writer thread looks for other connections' commits
/// once a worker listens: every [`WATCH_MIN`] right after activity (a
/// commit seen, a request served), doubling while nothing happens up to
/// [`WATCH_MAX`]. `PRAGMA data_version` reads the WAL index in shared
/// memory (no disk I/O, ~1 µs), so a look is cheap; the backoff keeps an
/// idle worker from waking 500 times a second, and bounds cross-process
/// pickup at `WATCH_MAX` instead of the poll.
pub const WATCH_MIN: std::time::Duration = std::time::Duration::from_millis(1);
/// The longest wait between two looks (see [`WATCH_MIN`]).
pub const WATCH_MAX: std::time::Duration = std::time::Duration::from_millis(8);

/// The next wait between looks: back to [`WATCH_MIN`] after activity,
/// doubled (up to [`WATCH_MAX`]) after a quiet look.
fn next_watch_wait(current: std::time::Duration, active: bool) -> std::time::Duration {
    if active {
        WATCH_MIN
    } else {
        (current * 2).min(WATCH_MAX)
    }
}

/// Commits made by other connections to the same file — another process
/// (a web app triggering runs, a second worker) or another store — turned
/// into wake-ups. SQLite's `PRAGMA data_version` changes on a connection
/// exactly when some OTHER connection committed, so the writer's own
/// commits never wake anyone.
struct Watch {
    /// Set by the first [`Store::wakeups`] call: until then nobody listens
    /// and the writer blocks on its queue as before.
    on: std::sync::atomic::AtomicBool,
    tx: tokio::sync::broadcast::Sender<String>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi::ErrorCode as C;
    let kind = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked | C::OutOfMemory => DbErrorKind::Busy,
            C::SystemIoFailure | C::CannotOpen | C::DiskFull | C::FileLockingProtocolFailed => {
                DbErrorKind::Connection
            }
            C::ConstraintViolation => DbErrorKind::Constraint,
            C::DatabaseCorrupt | C::NotADatabase => DbErrorKind::Corrupt,
            _ => DbErrorKind::Bug,
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(_) => DbErrorKind::Corrupt,
        _ => DbErrorKind::Bug,
    };
    StoreError::Db {
        kind,
        source: Box::new(e),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and migrates it.
    pub fn open(path: &str) -> Result<Self> {
        Self::open_with_wal_limit(path, WAL_TRUNCATE_BYTES)
    }

    /// [`SqliteStore::open`] with the WAL truncated once it outgrows
    /// `wal_limit_bytes` instead of [`WAL_TRUNCATE_BYTES`] (tests use a
    /// small limit).
    pub fn open_with_wal_limit(path: &str, wal_limit_bytes: i64) -> Result<Self> {
        let conn = Connection::open(path).map_err(db_err)?;
        let mut store = Self::start(conn, true)?;
        start_checkpointer(
            path,
            std::sync::Arc::downgrade(&store.alive),
            wal_limit_bytes,
        )?;
        store.path = Some(path.to_string());
        store.wal_limit = wal_limit_bytes;
        Ok(store)
    }

    /// Runs one round of the checkpoint thread now, on a connection of its
    /// own (tests call it instead of waiting for the thread). Nothing for
    /// an in-memory store.
    pub fn checkpoint(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let conn = checkpoint_connection(path)?;
        checkpoint_round(&conn, page_size(&conn)?, self.wal_limit)
    }

    /// A private in-memory database, gone when the store is dropped.
    pub fn open_in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory().map_err(db_err)?;
        Self::start(conn, false)
    }

    fn start(conn: Connection, file: bool) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        // Every write of the process runs on this one connection (hot path,
        // triggers, operator commands, schedules, leads): rusqlite's default
        // cache of 16 prepared statements would evict and re-parse under a
        // mixed load. A cached statement costs a few KB.
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
        if file {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(db_err)?;
            // Checkpoints run on their own thread and connection, so a
            // commit on the writer thread never pays for one: that was the
            // main source of tail latency in the pickup benchmark.
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(db_err)?;
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(db_err)?;
        migrate(&conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let watch = file.then(|| {
            std::sync::Arc::new(Watch {
                on: std::sync::atomic::AtomicBool::new(false),
                tx: tokio::sync::broadcast::channel(16).0,
            })
        });
        let w = watch.clone();
        std::thread::Builder::new()
            .name("docket-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, w))
            .map_err(|e| StoreError::Database(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            tx,
            path: None,
            wal_limit: WAL_TRUNCATE_BYTES,
            fair: Default::default(),
            readers: std::sync::OnceLock::new(),
            alive: std::sync::Arc::new(()),
            watch,
        })
    }

    /// Runs `f` in the writer thread inside a transaction (under a savepoint)
    /// and returns its result once committed.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (otx, orx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |conn: &Connection| {
            let res = savepoint(conn, f);
            Box::new(move |commit_err: Option<String>| {
                let res = match commit_err {
                    None => res,
                    Some(e) => Err(StoreError::Database(e)),
                };
                let _ = otx.send(res);
            })
        });
        self.tx
            .send(job)
            .map_err(|_| StoreError::Database("sqlite writer thread has stopped".into()))?;
        orx.await
            .map_err(|_| StoreError::Database("sqlite writer thread dropped a request".into()))?
    }
}

impl SqliteStore {
    /// Runs the read `f` on a reader connection, in one read transaction
    /// (one snapshot for all its statements); on the writer thread when the
    /// database is in memory.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let Some(path) = &self.path else {
            return self.call(f).await;
        };
        let readers = self.readers.get_or_init(|| match start_readers(path) {
            Ok(tx) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no reader connections; reads go through the writer thread");
                None
            }
        });
        let Some(readers) = readers else {
            return self.call(f).await;
        };
        let (otx, orx) = oneshot::channel::<Result<T>>();
        let job: ReadJob = Box::new(move |conn: &Connection| {
            let res = match conn.execute_batch("BEGIN DEFERRED") {
                Ok(()) => {
                    let res = f(conn);
                    let _ = conn.execute_batch("COMMIT");
                    res
                }
                Err(e) => Err(db_err(e)),
            };
            let _ = otx.send(res);
        });
        readers
            .send(job)
            .map_err(|_| StoreError::Database("sqlite reader threads have stopped".into()))?;
        orx.await
            .map_err(|_| StoreError::Database("sqlite reader thread dropped a request".into()))?
    }
}

/// Opens the read-only connections and their threads; they stop when the
/// store (the queue's only sender) is dropped.
fn start_readers(path: &str) -> Result<mpsc::Sender<ReadJob>> {
    let (tx, rx) = mpsc::channel::<ReadJob>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    for i in 0..READERS {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db_err)?;
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(db_err)?;
        // A reader's page cache is private memory that an occasional
        // aggregate (a count for /metrics) fills and keeps: 2 MiB each by
        // default. Its pages are in the OS page cache anyway.
        conn.pragma_update(None, "cache_size", READER_CACHE_KIB)
            .map_err(db_err)?;
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("docket-sqlite-reader-{i}"))
            .spawn(move || loop {
                // Hold the lock only to take one job, not while running it.
                let job = match rx.lock() {
                    Ok(guard) => guard.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(&conn),
                    Err(_) => return,
                }
            })
            .map_err(|e| StoreError::Database(format!("cannot start reader thread: {e}")))?;
    }
    Ok(tx)
}

/// The WAL size past which the checkpoint thread truncates it (64 MiB).
pub const WAL_TRUNCATE_BYTES: i64 = 64 << 20;

/// Which checkpoint to run after a PASSIVE one left `wal_frames` frames of
/// `page_size` bytes in the WAL: a PASSIVE checkpoint never blocks the
/// writer, but under continuous writes it never catches up with the end of
/// the WAL, so SQLite never restarts it and the file grows without bound
/// (10.7 GB after a million runs). Past [`WAL_TRUNCATE_BYTES`] a TRUNCATE
/// checkpoint finishes the copy, holding new writers for as long as that
/// takes (the PASSIVE ones have copied nearly everything already), and
/// empties the file.
fn needs_truncate(wal_frames: i64, page_size: i64, limit: i64) -> bool {
    wal_frames.saturating_mul(page_size) >= limit
}

/// Copies the WAL back into the database file every 200 ms with a PASSIVE
/// checkpoint, which never blocks the writer, and truncates it once it
/// outgrows `limit` bytes (see [`needs_truncate`]). Stops when the store is
/// dropped.
fn start_checkpointer(path: &str, alive: std::sync::Weak<()>, limit: i64) -> Result<()> {
    let conn = checkpoint_connection(path)?;
    let page_size = page_size(&conn)?;
    std::thread::Builder::new()
        .name("docket-sqlite-checkpoint".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if alive.upgrade().is_none() {
                return;
            }
            if let Err(e) = checkpoint_round(&conn, page_size, limit) {
                tracing::debug!(error = %e, "checkpoint skipped");
            }
        })
        .map_err(|e| StoreError::Database(format!("cannot start checkpoint thread: {e}")))?;
    Ok(())
}

fn checkpoint_connection(path: &str) -> Result<Connection> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_millis(100))
        .map_err(db_err)?;
    Ok(conn)
}

fn page_size(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(db_err)
}

/// One checkpoint round (what the thread does every 200 ms): PASSIVE, then
/// TRUNCATE when the WAL has outgrown `limit` bytes. A busy database (a
/// writer or reader past the timeout) is an error; the next round retries.
fn checkpoint_round(conn: &Connection, page_size: i64, limit: i64) -> Result<()> {
    let frames: i64 = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .map_err(db_err)?;
    if needs_truncate(frames, page_size, limit) {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(db_err)?;
    }
    Ok(())
}

fn savepoint<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    conn.execute_batch("SAVEPOINT req").map_err(db_err)?;
    let res = f(conn);
    let end = if res.is_ok() {
        "RELEASE req"
    } else {
        "ROLLBACK TO req; RELEASE req"
    };
    conn.execute_batch(end).map_err(db_err)?;
    res
}

/// Wakes listeners when another connection committed since the last look;
/// says whether one did.
fn look_for_other_commits(conn: &Connection, watch: &Watch, seen: &mut Option<i64>) -> bool {
    let Ok(v) = conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) else {
        return false;
    };
    let changed = seen.is_some_and(|s| s != v);
    if changed {
        // "" = look at every job; nobody listening is fine.
        let _ = watch.tx.send(String::new());
    }
    *seen = Some(v);
    changed
}

/// The next request; while a worker listens for other connections'
/// commits, an idle thread looks for them between [`WATCH_MIN`] and
/// [`WATCH_MAX`] apart.
fn next_job(
    conn: &Connection,
    rx: &mpsc::Receiver<Job>,
    watch: Option<&Watch>,
    seen: &mut Option<i64>,
) -> Option<Job> {
    let mut wait = WATCH_MIN;
    loop {
        let Some(w) = watch.filter(|w| w.on.load(std::sync::atomic::Ordering::Relaxed)) else {
            return rx.recv().ok();
        };
        let changed = look_for_other_commits(conn, w, seen);
        wait = next_watch_wait(wait, changed);
        match rx.recv_timeout(wait) {
            Ok(j) => return Some(j),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>, watch: Option<std::sync::Arc<Watch>>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    let mut seen: Option<i64> = None;
    while let Some(first) = next_job(&conn, &rx, watch.as_deref(), &mut seen) {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if conn.execute_batch("BEGIN IMMEDIATE").is_err() {
            // No shared transaction (the write lock stayed busy past the
            // timeout): run each request alone. Its savepoint is then its own
            // transaction, committed by RELEASE, so each stays atomic and
            // gets its own error.
            for job in batch.drain(..) {
                job(&conn)(None);
            }
            continue;
        }
        for job in batch.drain(..) {
            replies.push(job(&conn));
        }
        let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies.drain(..) {
            reply(commit.clone().err());
        }
    }
}

/// The schema, as numbered forward-only steps: step `n` (1-based) takes a
/// database from version `n - 1` to `n`. A released step is never edited;
/// a schema change is a new step at the end (ARCHITECTURE.md, "Migrations").
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

/// Brings the database to [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) by applying [`MIGRATIONS`].
fn migrate(conn: &Connection) -> Result<()> {
    migrate_with(conn, MIGRATIONS)
}

/// Applies `steps` after the stored version, each in its own `BEGIN
/// IMMEDIATE` transaction together with its version bump, so a failed step
/// leaves the database at the previous version with nothing half-written.
/// The version is read again under the write lock before every step: a
/// process that starts at the same time and migrated first makes the rest
/// a no-op, never a second application. A database newer than `steps` is
/// refused untouched. No version row (a database from before versioning, or
/// a new file) counts as version 0: steps 1-3 are written with IF NOT EXISTS,
/// so they complete whatever such a database already has.
fn migrate_with(conn: &Connection, steps: &[&str]) -> Result<()> {
    let newest = steps.len() as i64;
    // Up to date (every open but the first after an upgrade) or refused:
    // answered from a read, without waiting for the write lock.
    if stored_version(conn, newest)? == newest {
        return Ok(());
    }
    loop {
        conn.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
        let found = match stored_version(conn, newest) {
            Ok(found) if found < newest => found,
            done => {
                // Up to date, or refused: nothing was written.
                let _ = conn.execute_batch("ROLLBACK");
                return done.map(|_| ());
            }
        };
        // Index `found` is step `found + 1`.
        let step = steps[found as usize];
        let applied = conn
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS docket_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            )
            .and_then(|()| conn.execute_batch(step))
            .and_then(|()| {
            conn.execute(
                "INSERT INTO docket_meta (key, value) VALUES ('schema_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(found + 1).to_string()],
            )
        });
        match applied.and_then(|_| conn.execute_batch("COMMIT")) {
            Ok(()) => {}
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(db_err(e));
            }
        }
    }
}

/// The stored schema version (0 when there is none: no `docket_meta` table
/// or no row); a version newer than `newest` is [`StoreError::SchemaTooNew`].
/// Only reads.
fn stored_version(conn: &Connection, newest: i64) -> Result<i64> {
    let has_meta: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'docket_meta')",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if !has_meta {
        return Ok(0);
    }
    let found: Option<String> = conn
        .query_row(
            "SELECT value FROM docket_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(db_err)?;
    let found: i64 = match found {
        Some(v) => v
            .parse()
            .ok()
            .filter(|v| *v >= 0)
            .ok_or_else(|| StoreError::Corrupt(format!("schema_version `{v}`")))?,
        None => 0,
    };
    if found > newest {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: newest,
        });
    }
    Ok(found)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn trigger(&self, runs: Vec<NewRun>, now: Timestamp) -> Result<Vec<Triggered>> {
        crate::json::check_runs(&runs)?;
        self.call(move |c| ops::trigger(c, runs, now)).await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<Run>> {
        let cursor = self.fair.clone();
        self.call(move |c| hot::claim(c, &req, &cursor)).await
    }

    async fn finish(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<RunStatus>>> {
        let (ends, refused) = crate::json::Refused::screen(ends);
        let stored = self.call(move |c| hot::finish_all(c, ends)).await?;
        Ok(refused.merge(stored))
    }

    async fn finish_and_claim(
        &self,
        ends: Vec<AttemptEnd>,
        claims: Vec<ClaimRequest>,
    ) -> Result<(Vec<Result<RunStatus>>, Vec<Run>)> {
        let (ends, refused) = crate::json::Refused::screen(ends);
        let cursor = self.fair.clone();
        let (finished, runs) = self
            .call(move |c| {
                let finished = hot::finish_all(c, ends)?;
                let budget = claims.iter().map(|c| c.limit).max().unwrap_or(0);
                let mut runs = Vec::new();
                // No savepoint per claim: an error fails the whole request,
                // and `call`'s own savepoint rolls all of it back (a second
                // one journaled each changed page twice).
                for mut req in claims {
                    req.limit = req.limit.min(budget - runs.len());
                    if req.limit > 0 {
                        runs.extend(hot::claim(c, &req, &cursor)?);
                    }
                }
                Ok((finished, runs))
            })
            .await?;
        Ok((refused.merge(finished), runs))
    }

    async fn heartbeat(
        &self,
        leases: Vec<LeaseRef>,
        expires_at: Timestamp,
    ) -> Result<Vec<LeaseState>> {
        self.call(move |c| ops::heartbeat(c, &leases, expires_at))
            .await
    }

    async fn expired_leases(&self, now: Timestamp, limit: usize) -> Result<Vec<Run>> {
        self.call(move |c| ops::expired_leases(c, now, limit)).await
    }

    async fn try_lead(
        &self,
        task: String,
        holder: String,
        now: Timestamp,
        ttl_ms: i64,
    ) -> Result<Option<crate::FencingToken>> {
        self.call(move |c| {
            // `?N`: SQLite numbers `$N` parameters by first appearance.
            c.prepare_cached(&crate::lead::TRY_LEAD_SQL.replace('$', "?"))
                .map_err(db_err)?
                .query_row(
                    rusqlite::params![task, holder, now.0, now.plus_millis(ttl_ms).0],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map(|t| t.map(crate::FencingToken))
                .map_err(db_err)
        })
        .await
    }

    async fn resign(&self, task: String, token: crate::FencingToken, now: Timestamp) -> Result<()> {
        self.call(move |c| {
            c.prepare_cached(&crate::lead::RESIGN_SQL.replace('$', "?"))
                .map_err(db_err)?
                .execute(rusqlite::params![task, token.0, now.0])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn reap(&self, ends: Vec<AttemptEnd>) -> Result<Vec<Result<Option<RunStatus>>>> {
        self.call(move |c| hot::reap_all(c, ends)).await
    }

    async fn next_due(&self, jobs: Vec<String>) -> Result<Option<Timestamp>> {
        self.call(move |c| ops::next_due(c, &jobs)).await
    }

    async fn concurrency_usage(
        &self,
        tenant: Option<String>,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<crate::KeyUsage>> {
        self.read(move |c| ops::concurrency_usage(c, tenant.as_deref(), now, limit))
            .await
    }

    async fn get_run(&self, id: RunId) -> Result<Option<Run>> {
        self.read(move |c| ops::get_run(c, id)).await
    }

    async fn list_runs(&self, filter: RunFilter) -> Result<Vec<Run>> {
        self.read(move |c| ops::list_runs(c, &filter)).await
    }

    async fn count_runs(&self, tenant: Option<String>) -> Result<Vec<StatusCount>> {
        self.read(move |c| ops::count_runs(c, tenant.as_deref()))
            .await
    }

    async fn attempts(&self, run_id: RunId) -> Result<Vec<AttemptRecord>> {
        self.read(move |c| ops::attempts(c, run_id)).await
    }

    async fn events(&self, filter: EventFilter) -> Result<Vec<EventRecord>> {
        self.read(move |c| ops::events(c, &filter)).await
    }

    async fn steps(&self, run_id: RunId) -> Result<Vec<StepRecord>> {
        self.read(move |c| durable::steps(c, run_id)).await
    }

    async fn save_step(
        &self,
        lease: LeaseRef,
        name: String,
        result: serde_json::Value,
        now: Timestamp,
    ) -> Result<LeaseState> {
        crate::json::check_depth("result", &result)?;
        self.call(move |c| durable::save_step(c, lease, &name, &result, now))
            .await?
    }

    async fn fail_step(
        &self,
        lease: LeaseRef,
        name: String,
        class: docket_core::ErrorClass,
        message: String,
        now: Timestamp,
    ) -> Result<()> {
        self.call(move |c| durable::fail_step(c, lease, &name, class, &message, now))
            .await?
    }

    async fn ledger_get(&self, tenant: String, key: String) -> Result<Option<LedgerEntry>> {
        self.call(move |c| durable::ledger_get(c, &tenant, &key))
            .await
    }

    async fn ledger_for_run(&self, run_id: RunId) -> Result<Vec<LedgerEntry>> {
        self.read(move |c| durable::ledger_for_run(c, run_id)).await
    }

    async fn ledger_begin(
        &self,
        lease: LeaseRef,
        idempotency_key: String,
        action: String,
        now: Timestamp,
    ) -> Result<LedgerBegin> {
        self.call(move |c| durable::ledger_begin(c, lease, &idempotency_key, &action, now))
            .await?
    }

    async fn ledger_write(
        &self,
        lease: LeaseRef,
        write: LedgerWrite,
        event: docket_core::EventKind,
        now: Timestamp,
    ) -> Result<()> {
        crate::json::check_ledger(&write)?;
        self.call(move |c| durable::ledger_write(c, lease, &write, &event, now))
            .await?
    }

    async fn append_event(
        &self,
        lease: LeaseRef,
        kind: docket_core::EventKind,
        data: serde_json::Value,
        now: Timestamp,
    ) -> Result<()> {
        crate::json::check_depth("data", &data)?;
        self.call(move |c| durable::append_event(c, lease, &kind, &data, now))
            .await?
    }

    async fn operator(&self, req: OperatorRequest) -> Result<Run> {
        crate::json::check_operator(&req)?;
        self.call(move |c| durable::operator(c, &req)).await
    }

    async fn prune(
        &self,
        req: crate::retention::PruneRequest,
    ) -> Result<crate::retention::PruneReport> {
        self.call(move |c| retention::prune(c, &req)).await
    }

    async fn set_pause(&self, change: crate::retention::PauseChange) -> Result<bool> {
        self.call(move |c| retention::set_pause(c, &change)).await
    }

    async fn pauses(&self, tenant: Option<String>) -> Result<Vec<crate::retention::Pause>> {
        self.read(move |c| retention::pauses(c, tenant.as_deref()))
            .await
    }

    async fn queue_health(
        &self,
        q: crate::retention::HealthQuery,
    ) -> Result<Vec<crate::retention::JobHealth>> {
        self.read(move |c| retention::queue_health(c, &q)).await
    }

    async fn delete_run(&self, req: crate::retention::DeleteRequest) -> Result<Run> {
        self.call(move |c| retention::delete_run(c, &req)).await
    }

    /// For a file database: a wake-up (`""`, every job) within about
    /// [`WATCH_MAX`] of any commit made by another connection to the
    /// same file — another process triggering runs, or finishing them.
    /// In memory there is no other connection: `None`.
    async fn wakeups(&self) -> Result<Option<tokio::sync::broadcast::Receiver<String>>> {
        let Some(w) = &self.watch else {
            return Ok(None);
        };
        let rx = w.tx.subscribe();
        w.on.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the writer so it starts looking now, not after its next job.
        let _ = self
            .tx
            .send(Box::new(|_: &Connection| -> Reply { Box::new(|_| ()) }));
        Ok(Some(rx))
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    #[test]
    fn schema_version_is_the_number_of_steps() {
        assert_eq!(MIGRATIONS.len() as i64, crate::SCHEMA_VERSION);
    }

    fn version(c: &Connection) -> String {
        c.query_row(
            "SELECT value FROM docket_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// Steps that fail if applied twice (a second CREATE TABLE, a duplicate
    /// primary key, a second ADD COLUMN) prove each ran exactly once.
    const PROBE: &[&str] = &[
        "CREATE TABLE probe (n INTEGER PRIMARY KEY);",
        "INSERT INTO probe (n) VALUES (2);",
        "ALTER TABLE probe ADD COLUMN x TEXT; INSERT INTO probe (n, x) VALUES (3, 'c');",
    ];

    #[test]
    fn each_step_is_applied_once_in_order_and_reopening_is_a_no_op() {
        let c = Connection::open_in_memory().unwrap();
        migrate_with(&c, &PROBE[..1]).unwrap();
        assert_eq!(version(&c), "1");
        // A newer build applies only the steps after the stored version.
        migrate_with(&c, PROBE).unwrap();
        assert_eq!(version(&c), "3");
        migrate_with(&c, PROBE).unwrap();
        assert_eq!(version(&c), "3");
        let rows: Vec<(i64, Option<String>)> = c
            .prepare("SELECT n, x FROM probe ORDER BY n")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(2, None), (3, Some("c".to_string()))]);
    }

    /// How many migrating connections are blocked on the write lock.
    static BLOCKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Counts a connection as blocked on its first busy retry, then keeps
    /// retrying (yielding) until the lock is free.
    fn count_blocked(attempt: i32) -> bool {
        if attempt == 0 {
            BLOCKED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        std::thread::yield_now();
        true
    }

    /// Two processes opening one file at once apply each step once: both
    /// read version 0, then queue on the write lock (held here until both
    /// are seen waiting); the version is read again under the lock before
    /// every step, so the second finds the first's steps done.
    #[test]
    fn concurrent_opens_apply_each_step_once() {
        let dir = std::env::temp_dir().join(format!("docket-mig-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let opens: Vec<_> = (0..2)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let c = Connection::open(&path).unwrap();
                    c.busy_handler(Some(count_blocked)).unwrap();
                    migrate_with(&c, PROBE)
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while BLOCKED.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "both openers reach the write lock"
            );
            std::thread::yield_now();
        }
        holder.execute_batch("COMMIT").unwrap();
        for open in opens {
            open.join().unwrap().unwrap();
        }
        let c = Connection::open(&path).unwrap();
        assert_eq!(version(&c), "3");
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM probe", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    /// A step that fails leaves the database at the previous version, with
    /// none of its own statements applied; the steps before it stay.
    #[test]
    fn a_failing_step_is_rolled_back_alone() {
        let c = Connection::open_in_memory().unwrap();
        let steps = [
            PROBE[0],
            "INSERT INTO probe (n) VALUES (7); INSERT INTO no_such_table VALUES (1);",
        ];
        assert!(migrate_with(&c, &steps).is_err());
        assert_eq!(version(&c), "1");
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM probe", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "the failed step's first insert was rolled back");
        assert!(c.is_autocommit(), "no transaction is left open");
    }

    /// A version newer than the steps is refused and nothing is written.
    #[test]
    fn a_newer_version_is_refused() {
        let c = Connection::open_in_memory().unwrap();
        migrate_with(&c, PROBE).unwrap();
        match migrate_with(&c, &PROBE[..2]) {
            Err(StoreError::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (3, 2));
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
        assert_eq!(version(&c), "3");
        assert!(c.is_autocommit());
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;

    #[test]
    fn looks_back_off_while_quiet_and_snap_back_on_activity() {
        let mut w = WATCH_MIN;
        let mut seen = Vec::new();
        for _ in 0..6 {
            w = next_watch_wait(w, false);
            seen.push(w.as_millis());
        }
        assert_eq!(seen, [2, 4, 8, 8, 8, 8]);
        assert_eq!(next_watch_wait(WATCH_MAX, true), WATCH_MIN);
    }
}

#[cfg(test)]
mod wal_tests {
    use super::*;

    #[test]
    fn the_wal_is_truncated_once_it_outgrows_the_limit() {
        assert!(!needs_truncate(0, 4096, WAL_TRUNCATE_BYTES));
        assert!(!needs_truncate(16_383, 4096, WAL_TRUNCATE_BYTES));
        assert!(needs_truncate(16_384, 4096, WAL_TRUNCATE_BYTES));
        assert!(
            needs_truncate(i64::MAX, 4096, WAL_TRUNCATE_BYTES),
            "no overflow"
        );
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;

    /// Readers keep a small private page cache; the writer keeps SQLite's.
    #[tokio::test]
    async fn readers_keep_a_small_page_cache() {
        let dir = std::env::temp_dir().join(format!("docket-readers-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.db");
        let store = SqliteStore::open(path.to_str().unwrap()).unwrap();
        let size = |c: &Connection| {
            c.query_row("PRAGMA cache_size", [], |r| r.get::<_, i64>(0))
                .map_err(db_err)
        };
        assert_eq!(store.read(size).await.unwrap(), READER_CACHE_KIB);
        assert_eq!(store.call(size).await.unwrap(), -2000, "SQLite's default");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
