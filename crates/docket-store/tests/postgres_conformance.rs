//! The conformance suite against PostgreSQL, plus PostgreSQL-only behaviour
//! (migration locking and refusal, concurrent claimers, wake-ups).
//!
//! Needs `DOCKET_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); without it every test says so
//! and passes. Each test works in a fresh schema `t_<uuid>`; schemas left by
//! runs more than an hour old are dropped.
#![cfg(feature = "postgres")]

use docket_store::conformance::T0;
use docket_store::postgres::PgStore;
use docket_store::{ClaimRequest, DynStore, NewRun, Store, StoreError, SCHEMA_VERSION};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use uuid::Uuid;

const URL_VAR: &str = "DOCKET_TEST_POSTGRES_URL";

/// The test database's URL, or `None` after saying why the test is skipped.
fn url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            eprintln!(
                "skipping: set {URL_VAR}=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests"
            );
            None
        }
    }
}

/// A fresh schema name; UUIDv7, so its age can be read back.
fn fresh_schema() -> String {
    format!("t_{}", Uuid::now_v7().simple())
}

static SWEPT: AtomicBool = AtomicBool::new(false);

/// Drops `t_<uuid>` schemas created more than an hour ago (by earlier
/// test runs), once per test binary.
async fn sweep_old_schemas(store: &PgStore) {
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_catalog.pg_namespace WHERE nspname LIKE 't\\_%'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for name in names {
        let Ok(id) = Uuid::parse_str(&name[2..]) else {
            continue;
        };
        let Some(ts) = id.get_timestamp() else {
            continue;
        };
        if ts.to_unix().0 + 3600 < now {
            // `name` was read from the catalog and matched a uuid: safe to quote.
            let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .execute(store.pool())
                .await;
        }
    }
}

async fn fresh_pg() -> Option<PgStore> {
    let url = url()?;
    let store = PgStore::connect_with(&url, &fresh_schema())
        .await
        .expect("connect to the test database");
    sweep_old_schemas(&store).await;
    Some(store)
}

async fn fresh() -> Option<DynStore> {
    Some(Arc::new(fresh_pg().await?))
}

docket_store::conformance_tests!(optional: fresh().await);

#[tokio::test]
async fn connect_url_chooses_schema() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = PgStore::connect(&format!("{url}{sep}schema={schema}"))
        .await
        .unwrap();
    assert_eq!(store.schema(), schema);
    assert_eq!(store.backend(), "postgres");
    let search_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(search_path, format!("\"{schema}\""));
    let via_open = docket_store::open(&format!("{url}{sep}schema={schema}"))
        .await
        .unwrap();
    assert_eq!(via_open.backend(), "postgres");
    let bad = PgStore::connect_with(&url, "no; such").await;
    assert!(matches!(bad, Err(StoreError::BadUrl(_))));
}

#[tokio::test]
async fn newer_schema_is_refused_and_left_alone() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let store = PgStore::connect_with(&url, &schema).await.unwrap();
    store
        .trigger(vec![NewRun::new("job", json!(1))], T0)
        .await
        .unwrap();
    sqlx::query("UPDATE docket_meta SET value = '999' WHERE key = 'schema_version'")
        .execute(store.pool())
        .await
        .unwrap();
    // Something a migration would recreate, to prove none ran.
    sqlx::query("DROP INDEX runs_lease")
        .execute(store.pool())
        .await
        .unwrap();
    let err = PgStore::connect_with(&url, &schema).await.unwrap_err();
    match err {
        StoreError::SchemaTooNew { found, supported } => {
            assert_eq!(found, 999);
            assert_eq!(supported, SCHEMA_VERSION);
        }
        e => panic!("expected SchemaTooNew, got {e}"),
    }
    let version: String =
        sqlx::query_scalar("SELECT value FROM docket_meta WHERE key = 'schema_version'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(version, "999");
    let index: Option<String> = sqlx::query_scalar("SELECT to_regclass('runs_lease')::text")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(index, None, "the refused connect must not migrate");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(runs, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_migrate_once() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let (a, b, c) = tokio::join!(
        PgStore::connect_with(&url, &schema),
        PgStore::connect_with(&url, &schema),
        PgStore::connect_with(&url, &schema),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let version: String =
        sqlx::query_scalar("SELECT value FROM docket_meta WHERE key = 'schema_version'")
            .fetch_one(a.pool())
            .await
            .unwrap();
    assert_eq!(version, SCHEMA_VERSION.to_string());
    let n = NewRun::new("job", json!({}));
    a.trigger(vec![n.clone()], T0).await.unwrap();
    assert!(b.get_run(n.id).await.unwrap().is_some());
    assert!(c.get_run(n.id).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_share_a_run() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let total = 500;
    let runs: Vec<NewRun> = (0..total)
        .map(|i| {
            let mut n = NewRun::new("job", json!(i));
            n.priority = i % 3;
            n
        })
        .collect();
    store.trigger(runs, T0).await.unwrap();
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store
                    .claim(ClaimRequest {
                        jobs: vec!["job".into()],
                        limit: 7,
                        now: T0,
                        lease_ms: 60_000,
                        worker: format!("w{w}"),
                    })
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|r| (r.id, r.lease_id.unwrap())));
            }
        }));
    }
    let mut ids = HashSet::new();
    let mut leases = HashSet::new();
    let mut claimed = 0;
    for t in tasks {
        for (id, lease) in t.await.unwrap() {
            claimed += 1;
            assert!(ids.insert(id), "run {id} claimed twice");
            assert!(leases.insert(lease), "lease {lease} handed out twice");
        }
    }
    // A claimer that found every remaining row locked stops early; sweep up.
    let rest = store
        .claim(ClaimRequest {
            jobs: vec!["job".into()],
            limit: 1000,
            now: T0,
            lease_ms: 60_000,
            worker: "sweeper".into(),
        })
        .await
        .unwrap();
    for r in rest {
        claimed += 1;
        assert!(ids.insert(r.id), "run {} claimed twice", r.id);
    }
    assert_eq!(claimed, total as usize);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(attempts, total as i64);
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'attempt_started'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(started, total as i64);
}

#[tokio::test]
async fn concurrent_triggers_with_one_key_create_one_run() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = NewRun::new("job", json!(i));
            n.idempotency_key = Some("same".into());
            store.trigger(vec![n], T0).await.unwrap().remove(0)
        }));
    }
    let mut created = 0;
    let mut ids = HashSet::new();
    for t in tasks {
        let t = t.await.unwrap();
        if !t.existing {
            created += 1;
        }
        ids.insert(t.run.id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn trigger_batch_dedups_within_itself() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let mut a = NewRun::new("job", json!(1));
    a.idempotency_key = Some("k".into());
    let mut b = NewRun::new("job", json!(2));
    b.idempotency_key = Some("k".into());
    let out = store.trigger(vec![a.clone(), b], T0).await.unwrap();
    assert!(!out[0].existing);
    assert!(out[1].existing);
    assert_eq!(out[1].run.id, a.id);
    let events = store.events(Default::default()).await.unwrap();
    assert_eq!(events.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_notifies_listeners_once_per_job() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let mut rx = store.listen().await.unwrap();
    // Other tests' stores notify on the same channel: only look for ours.
    let job = format!("job-{}", Uuid::now_v7().simple());
    store
        .trigger(
            vec![
                NewRun::new(job.clone(), json!(1)),
                NewRun::new(job.clone(), json!(2)),
            ],
            T0,
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Ok(j) if j == job => return j,
                Ok(_) => continue,
                Err(e) => panic!("listener stopped: {e}"),
            }
        }
    })
    .await
    .expect("a wake-up within 10 s");
    assert_eq!(got, job);
    // Only one notification for the two runs of the job.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    while let Ok(j) = rx.try_recv() {
        assert_ne!(j, job, "one notification per job per trigger");
    }
}

#[tokio::test]
async fn claims_beyond_the_prepared_lease_ids_still_get_distinct_leases() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let total = 4_200; // more than the lease ids made in Rust per claim (4096)
    let runs: Vec<NewRun> = (0..total).map(|i| NewRun::new("job", json!(i))).collect();
    let first = runs[0].id;
    let last = runs[total - 1].id;
    store.trigger(runs, T0).await.unwrap();
    let got = store
        .claim(ClaimRequest {
            jobs: vec!["job".into()],
            limit: 10_000,
            now: T0,
            lease_ms: 1_000,
            worker: "w".into(),
        })
        .await
        .unwrap();
    assert_eq!(got.len(), total);
    assert_eq!(got[0].id, first);
    assert_eq!(got[total - 1].id, last);
    let leases: HashSet<_> = got.iter().map(|r| r.lease_id.unwrap()).collect();
    assert_eq!(leases.len(), total);
    let events = store
        .events(docket_store::EventFilter {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let started: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "attempt_started")
        .map(|e| e.run_id)
        .collect();
    assert_eq!(
        started,
        got.iter().map(|r| r.id).collect::<Vec<_>>(),
        "events in claim order"
    );
}
