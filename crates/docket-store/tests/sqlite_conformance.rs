//! The conformance suite against SQLite (in memory, and on a file).

mod memory {
    docket_store::conformance_tests!(std::sync::Arc::new(
        docket_store::sqlite::SqliteStore::open_in_memory().unwrap()
    ));
}

mod file {
    fn fresh() -> docket_store::DynStore {
        let dir = std::env::temp_dir().join(format!("docket-conf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        std::sync::Arc::new(
            docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap(),
        )
    }
    docket_store::conformance_tests!(fresh());
}

/// A database written by a newer Docket is refused with a clear error and
/// left exactly as it was.
#[test]
fn newer_schema_is_refused_and_not_modified() {
    let dir = std::env::temp_dir().join(format!("docket-schema-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap();
    drop(docket_store::sqlite::SqliteStore::open(p).unwrap());
    {
        let c = rusqlite::Connection::open(p).unwrap();
        c.execute(
            "UPDATE docket_meta SET value = '999' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        c.execute("DROP INDEX runs_claim", []).unwrap();
    }
    let err = docket_store::sqlite::SqliteStore::open(p).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "database schema version 999 is newer than this Docket supports ({}); upgrade Docket, the database was not modified",
            docket_store::SCHEMA_VERSION
        )
    );
    let c = rusqlite::Connection::open(p).unwrap();
    let v: String = c
        .query_row(
            "SELECT value FROM docket_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, "999");
    let idx: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'runs_claim'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(idx, 0, "the refused open must not re-create anything");
}

/// Reads of a file database do not queue behind writes: with the write lock
/// held by another connection (so the writer thread is stuck in a
/// transition), lists, counts and lookups still answer; the transition goes
/// through once the lock is released, and is then visible to reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_while_the_writer_waits() {
    use docket_store::{NewRun, RunFilter, Store};
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("docket-readers-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap().to_string();
    let store = std::sync::Arc::new(docket_store::sqlite::SqliteStore::open(&p).unwrap());
    let t0 = docket_store::conformance::T0;
    let first = store
        .trigger(vec![NewRun::new("job", serde_json::json!(1))], t0)
        .await
        .unwrap()
        .remove(0)
        .run;

    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        c.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let s = store.clone();
    let write = tokio::spawn(async move {
        s.trigger(vec![NewRun::new("job", serde_json::json!(2))], t0)
            .await
    });

    let bound = Duration::from_secs(5);
    let runs = tokio::time::timeout(bound, store.list_runs(RunFilter::default()))
        .await
        .expect("a list answers while the writer waits")
        .unwrap();
    assert_eq!(runs.len(), 1, "the blocked trigger is not visible yet");
    let counts = tokio::time::timeout(bound, store.count_runs(None))
        .await
        .expect("a count answers while the writer waits")
        .unwrap();
    assert_eq!(counts[0].count, 1);
    let got = tokio::time::timeout(bound, store.get_run(first.id))
        .await
        .expect("a lookup answers while the writer waits")
        .unwrap();
    assert_eq!(got.map(|r| r.id), Some(first.id));
    assert!(
        !write.is_finished(),
        "the trigger is still waiting for the lock"
    );

    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(15), write)
        .await
        .expect("the trigger commits once the lock is released")
        .unwrap()
        .unwrap()
        .remove(0)
        .run;
    let runs = store.list_runs(RunFilter::default()).await.unwrap();
    assert!(
        runs.iter().any(|r| r.id == second.id),
        "a read after the answer sees the write"
    );
    assert_eq!(runs.len(), 2);
}

/// A JSON column too deep for the reader (as an older Docket could write)
/// is read as a marker; lists and the run's history still answer.
#[tokio::test]
async fn a_poisoned_row_is_listed_with_a_marker() {
    use docket_store::conformance::{nested_json, Poison};
    let dir = std::env::temp_dir().join(format!("docket-poison-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap().to_string();
    let store: docket_store::DynStore =
        std::sync::Arc::new(docket_store::sqlite::SqliteStore::open(&p).unwrap());
    let deep = nested_json(200).to_string();
    docket_store::conformance::a_poisoned_row_is_listed_with_a_marker(store, |what, run| {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        let (sql, key) = match what {
            Poison::Run => (
                "UPDATE runs SET input = ?1, output = ?1 WHERE id = ?2",
                run.to_string(),
            ),
            Poison::Step => (
                "UPDATE steps SET result = ?1 WHERE run_id = ?2",
                run.to_string(),
            ),
            Poison::Ledger => (
                "UPDATE ledger SET result = ?1 WHERE idempotency_key = ?2",
                "poison".to_string(),
            ),
            Poison::Event => (
                "UPDATE events SET data = ?1 WHERE run_id = ?2 AND kind = 'progress'",
                run.to_string(),
            ),
        };
        assert_eq!(
            c.execute(sql, rusqlite::params![deep, key]).unwrap(),
            1,
            "{what:?}"
        );
        async {}
    })
    .await;
}

/// A version 2 database (before expiring leadership) is migrated in place:
/// it gains the `leaders` table and keeps its runs.
#[tokio::test]
async fn a_version_2_database_gains_the_leaders_table() {
    use docket_store::Store;
    let dir = std::env::temp_dir().join(format!("docket-schema-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap();
    let t0 = docket_store::conformance::T0;
    {
        let store = docket_store::sqlite::SqliteStore::open(p).unwrap();
        let run = docket_store::NewRun::new("job", serde_json::json!({}));
        store.trigger(vec![run], t0).await.unwrap();
    }
    {
        let c = rusqlite::Connection::open(p).unwrap();
        c.execute_batch(
            // Undo every step after 2 (leaders, schedules, trace context,
            // the worker protocol's token scope and roster, retention,
            // concurrency keys, rate limits and breakers, signals, child
            // runs, the postponed runs' index, debounce, the due index, the
            // flow reads' indexes) so
            // the database is a true version 2.
            "DROP INDEX runs_due;
             DROP INDEX runs_postponed;
             DROP INDEX runs_keyed_claim;
             DROP INDEX runs_keyed_running;
             DROP INDEX runs_claim;
             CREATE INDEX runs_claim ON runs (priority DESC, run_after, id)
                 WHERE status IN ('pending', 'postponed');
             ALTER TABLE runs DROP COLUMN concurrency_key;
             ALTER TABLE runs DROP COLUMN concurrency_limit;
             ALTER TABLE runs DROP COLUMN held_at;
             DROP TABLE leaders;
             DROP TABLE schedules;
             DROP TABLE schedule_history;
             ALTER TABLE runs DROP COLUMN traceparent;
             ALTER TABLE runs DROP COLUMN tracestate;
             DROP TABLE workers;
             ALTER TABLE tokens DROP COLUMN scope;

             DROP TABLE job_pauses;
             DROP INDEX runs_finished;
             DROP INDEX ledger_updated;

             DROP INDEX runs_parent;
             DROP INDEX runs_joining;
             ALTER TABLE runs DROP COLUMN parent_id;
             ALTER TABLE runs DROP COLUMN child_policy;
             ALTER TABLE runs DROP COLUMN parent_waits;
             ALTER TABLE runs DROP COLUMN join_waiting;
             ALTER TABLE runs DROP COLUMN join_of;
             DROP TABLE rate_buckets;
             DROP TABLE rate_reservations;
             DROP TABLE breakers;
             DROP TABLE signals;
             DROP TABLE signal_waits;
             ALTER TABLE runs DROP COLUMN wake_requested;
             DROP INDEX runs_debounce_open;
             DROP INDEX attempts_circuit_open;
             DROP INDEX runs_debounce_current;
             ALTER TABLE runs DROP COLUMN debounce_key;
             ALTER TABLE runs DROP COLUMN debounce_keep;
             ALTER TABLE runs DROP COLUMN debounce_until;
             ALTER TABLE runs DROP COLUMN collapsed;
             ALTER TABLE runs DROP COLUMN debounce_current;
             UPDATE docket_meta SET value = '2' WHERE key = 'schema_version';",
        )
        .unwrap();
    }
    let store = docket_store::sqlite::SqliteStore::open(p).unwrap();
    assert_eq!(store.count_runs(None).await.unwrap()[0].count, 1);
    assert!(store
        .try_lead("pruner".into(), "a".into(), t0, 1_000)
        .await
        .unwrap()
        .is_some());
}

/// A file holding the previous release's database (schema version 2, with
/// runs in several states), loaded from `tests/fixtures/sqlite_v2.sql`.
/// `meta` is run on it afterwards (to make it look older still).
fn v2_database(meta: &str) -> String {
    let dir = std::env::temp_dir().join(format!("docket-v2-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db").to_str().unwrap().to_string();
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(include_str!("fixtures/sqlite_v2.sql"))
        .unwrap();
    c.execute_batch(meta).unwrap();
    path
}

fn schema_version(path: &str) -> String {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT value FROM docket_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// The previous release's database is migrated to the newest version on
/// open, every row intact; opening it again changes nothing.
#[tokio::test]
async fn a_version_2_fixture_migrates_with_data_intact() {
    let p = v2_database("");
    assert_eq!(schema_version(&p), "2");
    let store = docket_store::sqlite::SqliteStore::open(&p).unwrap();
    assert_eq!(schema_version(&p), docket_store::SCHEMA_VERSION.to_string());
    docket_store::conformance::v2_fixture_migrates_with_data_intact(std::sync::Arc::new(store))
        .await;
    let schema = |p: &str| -> Vec<(String, String)> {
        let c = rusqlite::Connection::open(p).unwrap();
        let mut s = c
            .prepare("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = schema(&p);
    drop(docket_store::sqlite::SqliteStore::open(&p).unwrap());
    assert_eq!(schema(&p), before, "a second open migrates nothing");
    assert_eq!(schema_version(&p), docket_store::SCHEMA_VERSION.to_string());
    // Migrated and fresh databases end with the same tables and indexes.
    let fresh = std::env::temp_dir().join(format!("docket-fresh-{}.db", uuid::Uuid::new_v4()));
    let fresh = fresh.to_str().unwrap();
    drop(docket_store::sqlite::SqliteStore::open(fresh).unwrap());
    assert_eq!(schema(fresh), before);
}

/// A database from before versioning (tables, but no version row) is taken
/// as version 0: every step runs, and completes it without touching its rows.
#[tokio::test]
async fn a_database_without_a_version_row_is_completed() {
    let p = v2_database("DELETE FROM docket_meta; DROP TABLE ledger;");
    let store = docket_store::sqlite::SqliteStore::open(&p).unwrap();
    assert_eq!(schema_version(&p), docket_store::SCHEMA_VERSION.to_string());
    use docket_store::Store;
    let a = docket_store::conformance::v2_fixture::COMPLETED
        .parse()
        .unwrap();
    let run = store.get_run(a).await.unwrap().unwrap();
    assert_eq!(run.output, Some(serde_json::json!({"sent": 1})));
    assert_eq!(store.steps(a).await.unwrap().len(), 1);
    assert!(store.ledger_for_run(a).await.unwrap().is_empty());
}

/// The WAL does not grow without bound: once it outgrows the limit, the
/// checkpoint thread truncates it. (Before: PASSIVE checkpoints only, and a
/// million runs left a 10.7 GB WAL beside an 86 MB database.) The limit is
/// 1 MiB here instead of 64 MiB, and ~4 MiB are written.
#[tokio::test]
async fn the_wal_is_truncated_once_it_outgrows_its_limit() {
    use docket_store::Store;
    let dir = std::env::temp_dir().join(format!("docket-wal-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap();
    let wal = dir.join("docket.db-wal");
    let limit = 1 << 20;
    let store = docket_store::sqlite::SqliteStore::open_with_wal_limit(p, limit).unwrap();
    let t0 = docket_store::conformance::T0;
    let mut peak = 0;
    for batch in 0..40 {
        let runs = (0..10)
            .map(|i| {
                docket_store::NewRun::new(
                    "job",
                    serde_json::json!({ "pad": "x".repeat(10_000), "i": batch * 10 + i }),
                )
            })
            .collect();
        store.trigger(runs, t0).await.unwrap();
        peak = peak.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    assert!(peak > 2 * limit as u64, "the test wrote too little: {peak}");
    // One round of the checkpoint thread, run now (the thread does the
    // same every 200 ms; a round it ran meanwhile leaves nothing to do).
    store.checkpoint().unwrap();
    let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert!(size <= limit as u64, "WAL still {size} bytes (peak {peak})");
    // Nothing was lost: every run reads back.
    let n: i64 = store
        .count_runs(None)
        .await
        .unwrap()
        .iter()
        .map(|c| c.count)
        .sum();
    assert_eq!(n, 400);
}
