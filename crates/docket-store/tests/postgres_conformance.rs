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
                        tenant: None,
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
            tenant: None,
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
    // Only one notification for the two runs of the job. PostgreSQL delivers
    // notifications in commit order, so a sentinel sent after the trigger
    // committed arrives after any second one would have: read up to it.
    let sentinel = format!("sentinel-{}", Uuid::now_v7().simple());
    sqlx::query("SELECT pg_notify('docket_wakeup', $1)")
        .bind(&sentinel)
        .execute(store.pool())
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                Ok(j) if j == sentinel => return,
                Ok(j) => assert_ne!(j, job, "one notification per job per trigger"),
                Err(e) => panic!("listener stopped: {e}"),
            }
        }
    })
    .await
    .expect("the sentinel within 10 s");
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
            tenant: None,
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

// ---------------------------------------------------------------------------
// The set-based hot path (`postgres/hot.rs`) against SQLite, row for row.
// ---------------------------------------------------------------------------

use docket_core::{ErrorClass, LeaseId, RunId, RunStatus, TerminalReason, Timestamp};
use docket_store::{
    sqlite::SqliteStore, AttemptEnd, ErrorInfo, EventFilter, Outcome, RetryRecord, Run,
};
use serde_json::Value;
use std::collections::HashMap;

fn err(class: ErrorClass) -> ErrorInfo {
    ErrorInfo {
        class,
        message: format!("{class} happened"),
        fingerprint: format!("fp-{class}"),
        failure_key: format!("fk-{class}"),
        action: Some("send".into()),
    }
}

fn retry(at: Timestamp) -> RetryRecord {
    RetryRecord {
        policy: "default".into(),
        delay_ms: at.0 - T0.0,
        eligible_at: at,
        reason: docket_core::policy::RetryReason::Backoff,
    }
}

fn claim_at(now: Timestamp, limit: usize) -> ClaimRequest {
    ClaimRequest {
        tenant: None,
        jobs: vec!["job".into()],
        limit,
        now,
        lease_ms: 30_000,
        worker: "w1".into(),
    }
}

/// An event without its id: (kind, run, job, attempt, lease, data, at).
type EventRow = (
    String,
    RunId,
    String,
    Option<u32>,
    Option<String>,
    Value,
    i64,
);

/// What a scenario leaves behind, with lease ids replaced by
/// `lease:<run>:<attempt>` (they are random) and event ids by their order.
#[derive(Debug, PartialEq)]
struct Snapshot {
    answers: Vec<String>,
    claimed: Vec<Vec<RunId>>,
    runs: Vec<Run>,
    attempts: Vec<docket_store::AttemptRecord>,
    events: Vec<EventRow>,
}

fn normalize_json(v: &mut Value, leases: &HashMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(n) = leases.get(s.as_str()) {
                *s = n.clone();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| normalize_json(x, leases)),
        Value::Object(o) => o.values_mut().for_each(|x| normalize_json(x, leases)),
        _ => {}
    }
}

/// Runs the same sequence of triggers, claims and ends (every outcome, a
/// stale end, a run ended twice in one call) on `store`.
async fn hot_path_scenario(store: DynStore, ids: &[RunId], stray: LeaseId) -> Snapshot {
    let runs: Vec<NewRun> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut n = NewRun::new("job", json!({ "i": i }));
            n.id = *id;
            n.priority = (i % 3) as i32;
            n
        })
        .collect();
    store.trigger(runs, T0).await.unwrap();
    let mut answers = Vec::new();
    let mut claimed = Vec::new();
    let first = store.claim(claim_at(T0, 8)).await.unwrap();
    claimed.push(first.iter().map(|r| r.id).collect());
    let l = |r: &Run| r.lease_id.unwrap();
    let t1 = T0.plus_millis(1_000);
    let end = |r: &Run, outcome: Outcome| AttemptEnd {
        run_id: r.id,
        lease_id: l(r),
        now: t1,
        outcome,
    };
    // In run id order: PostgreSQL applies a call's ends in that order.
    let mut by_id = first.clone();
    by_id.sort_by_key(|r| r.id);
    let mut ends = vec![
        end(
            &by_id[0],
            Outcome::Completed {
                output: json!({ "ok": 1 }),
            },
        ),
        end(
            &by_id[1],
            Outcome::Retry {
                error: err(ErrorClass::Unavailable),
                retry: retry(T0.plus_millis(60_000)),
            },
        ),
        end(
            &by_id[2],
            Outcome::Failed {
                error: Some(err(ErrorClass::Permanent)),
                reason: TerminalReason::PermanentError,
                detail: "no".into(),
            },
        ),
        end(
            &by_id[3],
            Outcome::Failed {
                error: None,
                reason: TerminalReason::Unresolved,
                detail: "ended without completing".into(),
            },
        ),
        end(
            &by_id[4],
            Outcome::Postponed {
                until: T0.plus_millis(3_600_000),
            },
        ),
        end(
            &by_id[5],
            Outcome::NeedsInput {
                name: "approve".into(),
                request: json!({ "q": "ok?" }),
            },
        ),
        // Stale: the right run, a lease it never had.
        AttemptEnd {
            run_id: by_id[6].id,
            lease_id: stray,
            now: t1,
            outcome: Outcome::Completed {
                output: json!(null),
            },
        },
    ];
    // The same run twice: the second end finds it completed.
    ends.push(end(&by_id[0], Outcome::Completed { output: json!(2) }));
    let (res, got) = store
        .finish_and_claim(ends, vec![claim_at(t1, 3), claim_at(t1, 2)])
        .await
        .unwrap();
    answers.extend(res.iter().map(|r| format!("{r:?}")));
    claimed.push(got.iter().map(|r| r.id).collect());
    // Second round: expired leases through the policy, a cancel, a release
    // (which makes its run claimable at once: the claim must see it).
    let mut open: Vec<Run> = Vec::new();
    for id in ids {
        let r = store.get_run(*id).await.unwrap().unwrap();
        if r.status == RunStatus::Running {
            open.push(r);
        }
    }
    open.sort_by_key(|r| r.id);
    let t2 = T0.plus_millis(40_000);
    let mut ends = Vec::new();
    for (k, r) in open.iter().enumerate() {
        let outcome = match k % 4 {
            0 => Outcome::Retry {
                error: err(ErrorClass::LeaseExpired),
                retry: retry(T0.plus_millis(90_000)),
            },
            1 => Outcome::Failed {
                error: Some(err(ErrorClass::LeaseExpired)),
                reason: TerminalReason::MaxRetriesExhausted,
                detail: "out of attempts".into(),
            },
            2 => Outcome::Cancelled,
            _ => Outcome::Released,
        };
        ends.push(AttemptEnd {
            run_id: r.id,
            lease_id: l(r),
            now: t2,
            outcome,
        });
    }
    let (res, got) = store
        .finish_and_claim(ends, vec![claim_at(t2, 10)])
        .await
        .unwrap();
    answers.extend(res.iter().map(|r| format!("{r:?}")));
    claimed.push(got.iter().map(|r| r.id).collect());
    // Lease ids, by (run, attempt).
    let mut attempts = Vec::new();
    for id in ids {
        attempts.extend(store.attempts(*id).await.unwrap());
    }
    let mut leases: HashMap<String, String> = HashMap::new();
    for a in &attempts {
        leases.insert(
            a.lease_id.to_string(),
            format!("lease:{}:{}", a.run_id, a.attempt),
        );
    }
    leases.insert(stray.to_string(), "stray".into());
    let norm = |l: Option<LeaseId>| {
        l.map(|l| {
            leases
                .get(&l.to_string())
                .cloned()
                .unwrap_or_else(|| l.to_string())
        })
    };
    let mut runs = Vec::new();
    for id in ids {
        let mut r = store.get_run(*id).await.unwrap().unwrap();
        r.lease_id = None;
        runs.push(r);
    }
    for a in &mut attempts {
        a.lease_id = LeaseId(Uuid::nil());
    }
    let events = store
        .events(EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            let mut data = e.data;
            normalize_json(&mut data, &leases);
            (
                e.kind.to_string(),
                e.run_id,
                e.job,
                e.attempt,
                norm(e.lease_id),
                data,
                e.at.0,
            )
        })
        .collect();
    let answers = answers
        .into_iter()
        .map(|a| leases.iter().fold(a, |a, (k, v)| a.replace(k.as_str(), v)))
        .collect();
    Snapshot {
        answers,
        claimed,
        runs,
        attempts,
        events,
    }
}

#[tokio::test]
async fn finish_and_claim_matches_sqlite_row_for_row() {
    let Some(pg) = fresh().await else { return };
    let ids: Vec<RunId> = (0..12).map(|_| RunId::new()).collect();
    let stray = LeaseId::new();
    let lite: DynStore = Arc::new(SqliteStore::open_in_memory().unwrap());
    let a = hot_path_scenario(lite, &ids, stray).await;
    let b = hot_path_scenario(pg, &ids, stray).await;
    assert_eq!(a.answers, b.answers);
    assert_eq!(a.claimed, b.claimed);
    assert_eq!(a.runs, b.runs);
    assert_eq!(a.attempts, b.attempts);
    assert_eq!(a.events.len(), b.events.len());
    for (x, y) in a.events.iter().zip(&b.events) {
        assert_eq!(x, y);
    }
    // The release in the second call was claimed by that call's claim.
    assert!(!b.claimed[2].is_empty());
}

#[tokio::test]
async fn an_end_the_server_refuses_fails_alone() {
    let Some(store) = fresh().await else { return };
    let runs: Vec<NewRun> = (0..3).map(|i| NewRun::new("job", json!(i))).collect();
    store.trigger(runs, T0).await.unwrap();
    let claimed = store.claim(claim_at(T0, 3)).await.unwrap();
    let mut ends: Vec<AttemptEnd> = claimed
        .iter()
        .map(|r| AttemptEnd {
            run_id: r.id,
            lease_id: r.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Completed {
                output: json!("done"),
            },
        })
        .collect();
    // PostgreSQL text cannot hold NUL: the server refuses this end.
    let mut bad = err(ErrorClass::Unavailable);
    bad.message = "nul \0 inside".into();
    ends[1].outcome = Outcome::Retry {
        error: bad,
        retry: retry(T0.plus_millis(1_000)),
    };
    let (res, _) = store
        .finish_and_claim(ends, vec![claim_at(T0, 5)])
        .await
        .unwrap();
    assert!(res[0].is_ok() && res[2].is_ok(), "{res:?}");
    assert!(
        matches!(&res[1], Err(e) if !e.is_transient() && e.db_kind() == Some(docket_store::DbErrorKind::Bug)),
        "{res:?}"
    );
    assert_eq!(
        store.get_run(claimed[0].id).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    assert_eq!(
        store.get_run(claimed[1].id).await.unwrap().unwrap().status,
        RunStatus::Running
    );
    assert_eq!(
        store.get_run(claimed[2].id).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
}

#[tokio::test]
async fn url_parameters_are_applied() {
    let Some(url) = url() else { return };
    let sep = if url.contains('?') { '&' } else { '?' };
    let store = PgStore::connect_with(
        &format!("{url}{sep}synchronous_commit=off&application_name=docket-param-test"),
        &fresh_schema(),
    )
    .await
    .unwrap();
    let (sync, app): (String, String) = sqlx::query_as(
        "SELECT current_setting('synchronous_commit'), current_setting('application_name')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(sync, "off");
    assert_eq!(app, "docket-param-test");
    let plain = PgStore::connect_with(&url, &fresh_schema()).await.unwrap();
    let app: String = sqlx::query_scalar("SELECT current_setting('application_name')")
        .fetch_one(plain.pool())
        .await
        .unwrap();
    assert_eq!(app, docket_store::postgres::DEFAULT_APPLICATION_NAME);
    let bad = PgStore::connect_with(
        &format!("{url}{sep}synchronous_commit=maybe"),
        &fresh_schema(),
    )
    .await;
    assert!(matches!(bad, Err(StoreError::BadUrl(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_triggers_are_coalesced_but_never_unannounced() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let mut rx = store.listen().await.unwrap();
    let job = format!("job-{}", Uuid::now_v7().simple());
    for i in 0..3 {
        store
            .trigger(vec![NewRun::new(job.clone(), json!(i))], T0)
            .await
            .unwrap();
    }
    // The first trigger notifies at once; the next ones, inside its 5 ms
    // window, are coalesced into one more at the window's end. However the
    // timing falls, the last trigger is announced.
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while got < 2 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(j)) if j == job => got += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("listener stopped: {e}"),
            Err(_) => panic!("only {got} wake-ups for 3 triggers within 10 s"),
        }
    }
    // No more than one per trigger: once every deferred wake-up has been
    // sent, a sentinel job's trigger (first of its window: notified at its
    // commit) arrives after all of them, in commit order.
    store.flush_wakeups().await;
    let sentinel = format!("sentinel-{}", Uuid::now_v7().simple());
    store
        .trigger(vec![NewRun::new(sentinel.clone(), json!(null))], T0)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(j)) if j == job => got += 1,
            Ok(Ok(j)) if j == sentinel => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("listener stopped: {e}"),
            Err(_) => panic!("the sentinel's wake-up did not arrive within 10 s"),
        }
    }
    assert!((2..=3).contains(&got), "{got} wake-ups for 3 triggers");
}

/// A JSON column too deep for the reader (as an older Docket could write)
/// is read as a marker; lists and the run's history still answer.
#[tokio::test]
async fn a_poisoned_row_is_listed_with_a_marker() {
    use docket_store::conformance::{nested_json, Poison};
    let Some(store) = fresh_pg().await else {
        return;
    };
    let pool = store.pool().clone();
    let deep = nested_json(200).to_string();
    let store: DynStore = Arc::new(store);
    docket_store::conformance::a_poisoned_row_is_listed_with_a_marker(store, |what, run| {
        let pool = pool.clone();
        let deep = deep.clone();
        async move {
            let q = match what {
                Poison::Run => sqlx::query(
                    "UPDATE runs SET input = $1::jsonb, output = $1::jsonb WHERE id = $2",
                )
                .bind(deep)
                .bind(run.0),
                Poison::Step => {
                    sqlx::query("UPDATE steps SET result = $1::jsonb WHERE run_id = $2")
                        .bind(deep)
                        .bind(run.0)
                }
                Poison::Ledger => sqlx::query(
                    "UPDATE ledger SET result = $1::jsonb WHERE idempotency_key = 'poison'",
                )
                .bind(deep),
                Poison::Event => sqlx::query(
                    "UPDATE events SET data = $1::jsonb WHERE run_id = $2 AND kind = 'progress'",
                )
                .bind(deep)
                .bind(run.0),
            };
            let done = q.execute(&pool).await.unwrap();
            assert_eq!(done.rows_affected(), 1, "{what:?}");
        }
    })
    .await;
}

/// Docket's sessions are ended by the server when left idle inside a
/// transaction (a process stopped mid-transaction would otherwise keep its
/// run's row locked, and the reapers skip locked rows).
#[tokio::test]
async fn sessions_idle_in_a_transaction_are_ended() {
    let Some(store) = fresh_pg().await else {
        return;
    };
    let timeout: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(timeout, docket_store::postgres::IDLE_IN_TRANSACTION_TIMEOUT);
}

/// A fresh schema holding the previous release's tables and rows (schema
/// version 2), loaded from `tests/fixtures/postgres_v2.sql`.
async fn v2_schema(url: &str) -> String {
    use sqlx::Connection;
    let schema = fresh_schema();
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    // A fresh `t_<uuid>` name: safe to quote.
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";"
    ))
    .execute(&mut c)
    .await
    .unwrap();
    sqlx::raw_sql(include_str!("fixtures/postgres_v2.sql"))
        .execute(&mut c)
        .await
        .unwrap();
    schema
}

async fn schema_version(store: &PgStore) -> String {
    sqlx::query_scalar("SELECT value FROM docket_meta WHERE key = 'schema_version'")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// The columns and indexes of a schema, to compare two of them.
async fn layout(store: &PgStore) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
                || ' ' || coalesce(column_default, '') || ' ' || is_identity
           FROM information_schema.columns WHERE table_schema = $1
         UNION ALL
         SELECT replace(indexdef, $1, '') FROM pg_catalog.pg_indexes WHERE schemaname = $1
         ORDER BY 1",
    )
    .bind(store.schema())
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// The previous release's schema is migrated to the newest version on
/// connect, every row intact; connecting again changes nothing, and the
/// result has the layout of a fresh schema.
#[tokio::test]
async fn a_version_2_fixture_migrates_with_data_intact() {
    let Some(url) = url() else { return };
    let schema = v2_schema(&url).await;
    let store = PgStore::connect_with(&url, &schema).await.unwrap();
    assert_eq!(schema_version(&store).await, SCHEMA_VERSION.to_string());
    let before = layout(&store).await;
    let store: DynStore = Arc::new(store);
    docket_store::conformance::v2_fixture_migrates_with_data_intact(store).await;
    let again = PgStore::connect_with(&url, &schema).await.unwrap();
    assert_eq!(schema_version(&again).await, SCHEMA_VERSION.to_string());
    assert_eq!(
        layout(&again).await,
        before,
        "a second connect migrates nothing"
    );
    let fresh = fresh_pg().await.unwrap();
    assert_eq!(layout(&fresh).await, before);
}

/// A schema from before versioning (tables, but no version row) is taken as
/// version 0: every step runs, and completes it without touching its rows.
#[tokio::test]
async fn a_schema_without_a_version_row_is_completed() {
    let Some(url) = url() else { return };
    let schema = v2_schema(&url).await;
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(&format!(
            "DELETE FROM \"{schema}\".docket_meta; DROP TABLE \"{schema}\".ledger;"
        ))
        .execute(&mut c)
        .await
        .unwrap();
    }
    let store = PgStore::connect_with(&url, &schema).await.unwrap();
    assert_eq!(schema_version(&store).await, SCHEMA_VERSION.to_string());
    let a = docket_store::conformance::v2_fixture::COMPLETED
        .parse()
        .unwrap();
    let run = store.get_run(a).await.unwrap().unwrap();
    assert_eq!(run.output, Some(json!({"sent": 1})));
    assert_eq!(store.steps(a).await.unwrap().len(), 1);
    assert!(store.ledger_for_run(a).await.unwrap().is_empty());
}

/// The ledger's begin and compare-and-set, the same sequence on both
/// backends: a begin, a second run finding it in flight, the holder's
/// commit, a late failure refused, a begin finding it committed, and a
/// takeover once a holder's lease expired. Answers, ledger rows and events
/// must match row for row.
async fn ledger_scenario(
    store: DynStore,
    ids: &[RunId],
) -> (Vec<String>, Vec<Value>, Vec<EventRow>) {
    let runs: Vec<NewRun> = ids
        .iter()
        .map(|id| {
            let mut n = NewRun::new("job", json!({}));
            n.id = *id;
            n
        })
        .collect();
    store.trigger(runs, T0).await.unwrap();
    let mut got = store.claim(claim_at(T0, 3)).await.unwrap();
    got.sort_by_key(|r| r.id);
    let lease = |r: &Run| docket_store::LeaseRef {
        run_id: r.id,
        lease_id: r.lease_id.unwrap(),
    };
    let (a, b, c) = (lease(&got[0]), lease(&got[1]), lease(&got[2]));
    let w = |state, result: Option<Value>, class: Option<ErrorClass>| docket_store::LedgerWrite {
        tenant: "default".into(),
        idempotency_key: "k1".into(),
        action: "charge".into(),
        state,
        result,
        error_class: class,
        error_message: class.map(|c| format!("{c} late")),
    };
    let t = |ms| T0.plus_millis(ms);
    let mut answers = Vec::new();
    let begin = |l, at| store.ledger_begin(l, "k1".into(), "charge".into(), at);
    answers.push(format!("{:?}", begin(a, t(1)).await));
    answers.push(format!("{:?}", begin(b, t(2)).await));
    answers.push(format!(
        "{:?}",
        store
            .ledger_write(
                a,
                w(
                    docket_store::LedgerState::Committed,
                    Some(json!({"id": 7})),
                    None
                ),
                "action_committed".into(),
                t(3)
            )
            .await
    ));
    answers.push(format!(
        "{:?}",
        store
            .ledger_write(
                a,
                w(
                    docket_store::LedgerState::FailedRetryable,
                    None,
                    Some(ErrorClass::Unavailable)
                ),
                "action_failed".into(),
                t(4)
            )
            .await
    ));
    answers.push(format!("{:?}", begin(b, t(5)).await));
    // A second key: its holder's lease expires, another run takes it over.
    let expiry = got[2].lease_expires_at.unwrap();
    answers.push(format!(
        "{:?}",
        store
            .ledger_begin(c, "k2".into(), "charge".into(), t(6))
            .await
    ));
    answers.push(format!(
        "{:?}",
        store
            .ledger_begin(b, "k2".into(), "charge".into(), expiry)
            .await
    ));
    let mut leases: HashMap<String, String> = HashMap::new();
    for (n, l) in [("a", a), ("b", b), ("c", c)] {
        leases.insert(l.lease_id.to_string(), format!("lease:{n}"));
    }
    let answers = answers
        .into_iter()
        .map(|x| {
            leases.iter().fold(x, |x, (k, v)| {
                // Debug prints lease ids as LeaseId(<uuid>).
                x.replace(k.as_str(), v)
            })
        })
        .collect();
    let mut rows = Vec::new();
    for key in ["k1", "k2"] {
        let e = store
            .ledger_get("default".into(), key.into())
            .await
            .unwrap()
            .unwrap();
        let mut v = serde_json::to_value(&e).unwrap();
        normalize_json(&mut v, &leases);
        rows.push(v);
    }
    let events = store
        .events(EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind != "run_triggered" && e.kind != "attempt_started")
        .map(|e| {
            let mut data = e.data;
            normalize_json(&mut data, &leases);
            let l = e
                .lease_id
                .map(|l| leases.get(&l.to_string()).cloned().unwrap_or_default());
            (
                e.kind.to_string(),
                e.run_id,
                e.job,
                e.attempt,
                l,
                data,
                e.at.0,
            )
        })
        .collect();
    (answers, rows, events)
}

#[tokio::test]
async fn the_ledger_matches_sqlite_row_for_row() {
    let Some(pg) = fresh().await else { return };
    let ids: Vec<RunId> = (0..3).map(|_| RunId::new()).collect();
    let lite: DynStore = Arc::new(SqliteStore::open_in_memory().unwrap());
    let (la, lr, le) = ledger_scenario(lite, &ids).await;
    let (pa, pr, pe) = ledger_scenario(pg, &ids).await;
    assert_eq!(la, pa);
    assert_eq!(lr, pr);
    assert_eq!(le.len(), pe.len(), "{le:#?}\n{pe:#?}");
    for (x, y) in le.iter().zip(&pe) {
        assert_eq!(x, y);
    }
    // The scenario exercised every answer: taken, in flight, committed,
    // refused, takeover with reconcile first.
    let all = la.join("\n");
    for needle in [
        "Acquired",
        "InFlight",
        "LedgerConflict",
        "Committed(",
        "reconcile_first: true",
    ] {
        assert!(all.contains(needle), "{needle} missing from {all}");
    }
}

/// An event with its audit fields: (kind, run, attempt, lease, actor,
/// comment, data, at).
type AuditRow = (
    String,
    RunId,
    Option<u32>,
    Option<String>,
    Option<String>,
    Option<String>,
    Value,
    i64,
);

/// Every operator command, accepted and refused, and the ends that lead to
/// them (a deferral among them), on `store`: the answers, then every row.
async fn operator_scenario(
    store: DynStore,
    ids: &[RunId],
) -> (
    Vec<String>,
    Vec<Run>,
    Vec<docket_store::AttemptRecord>,
    Vec<docket_store::StepRecord>,
    Vec<AuditRow>,
) {
    use docket_store::{LeaseRef, OperatorCommand, OperatorRequest};
    let runs: Vec<NewRun> = ids
        .iter()
        .map(|id| {
            let mut n = NewRun::new("job", json!({}));
            n.id = *id;
            n
        })
        .collect();
    store.trigger(runs, T0).await.unwrap();
    let claimed = store.claim(claim_at(T0, ids.len())).await.unwrap();
    let run = |i: usize| claimed.iter().find(|r| r.id == ids[i]).unwrap().clone();
    let lease = |i: usize| LeaseRef {
        run_id: ids[i],
        lease_id: run(i).lease_id.unwrap(),
    };
    let t1 = T0.plus_millis(1_000);
    // Run 3's failed step, for skip; run 4 fails outside any step.
    store
        .fail_step(
            lease(3),
            "charge".into(),
            ErrorClass::Permanent,
            "card declined".into(),
            t1,
        )
        .await
        .unwrap();
    let deferral = Outcome::Retry {
        error: err(ErrorClass::Unavailable),
        retry: RetryRecord {
            policy: "circuit_breaker:crm".into(),
            delay_ms: 5_000,
            eligible_at: t1.plus_millis(5_000),
            reason: docket_core::policy::RetryReason::CircuitOpen,
        },
    };
    let failed = || Outcome::Failed {
        error: Some(err(ErrorClass::Permanent)),
        reason: TerminalReason::PermanentError,
        detail: "no".into(),
    };
    let ask = || Outcome::NeedsInput {
        name: "approve".into(),
        request: json!({ "q": "ok?" }),
    };
    let ends: Vec<AttemptEnd> = [
        (0, ask()),
        (1, ask()),
        (3, failed()),
        (4, failed()),
        (5, deferral),
    ]
    .into_iter()
    .map(|(i, outcome)| AttemptEnd {
        run_id: ids[i],
        lease_id: run(i).lease_id.unwrap(),
        now: t1,
        outcome,
    })
    .collect();
    let mut answers: Vec<String> = store
        .finish(ends)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{r:?}"))
        .collect();
    let t2 = T0.plus_millis(2_000);
    let cmds = [
        (
            0,
            OperatorCommand::Approve {
                data: json!({ "ok": true }),
            },
        ),
        (
            1,
            OperatorCommand::Reject {
                data: json!({ "why": "no" }),
            },
        ),
        (2, OperatorCommand::Cancel), // running: requested
        (2, OperatorCommand::Postpone { until: t2 }), // refused: running
        (3, OperatorCommand::Skip),
        (4, OperatorCommand::Skip), // refused: no failed step
        (
            4,
            OperatorCommand::Retry {
                updated_variables: Some(json!({ "b": 3 })),
            },
        ),
        (
            4,
            OperatorCommand::Retry {
                updated_variables: None,
            },
        ), // refused: pending
        (
            5,
            OperatorCommand::Postpone {
                until: T0.plus_millis(9_000),
            },
        ),
        (5, OperatorCommand::Cancel), // postponed: cancelled at once
        (5, OperatorCommand::Approve { data: json!(null) }), // refused: cancelled
    ];
    for (k, (i, command)) in cmds.into_iter().enumerate() {
        let r = store
            .operator(OperatorRequest {
                run_id: ids[i],
                actor: format!("op{k}"),
                comment: Some(format!("because {k}")),
                now: t2,
                command,
            })
            .await;
        answers.push(match r {
            Ok(run) => format!("ok {}", run.status),
            Err(e) => format!("err {e}"),
        });
    }
    // The running run stops at its boundary under its own lease.
    let res = store
        .finish(vec![AttemptEnd {
            run_id: ids[2],
            lease_id: run(2).lease_id.unwrap(),
            now: t2,
            outcome: Outcome::Cancelled,
        }])
        .await
        .unwrap();
    answers.push(format!("{res:?}"));
    let mut leases: HashMap<String, String> = HashMap::new();
    let (mut runs, mut attempts, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    for id in ids {
        let mut r = store.get_run(*id).await.unwrap().unwrap();
        r.lease_id = None;
        runs.push(r);
        for mut a in store.attempts(*id).await.unwrap() {
            leases.insert(
                a.lease_id.to_string(),
                format!("lease:{}:{}", a.run_id, a.attempt),
            );
            a.lease_id = LeaseId(Uuid::nil());
            attempts.push(a);
        }
        steps.extend(store.steps(*id).await.unwrap());
    }
    let answers = answers
        .into_iter()
        .map(|a| leases.iter().fold(a, |a, (k, v)| a.replace(k.as_str(), v)))
        .collect();
    let events = store
        .events(EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            let mut data = e.data;
            normalize_json(&mut data, &leases);
            let l = e
                .lease_id
                .map(|l| leases.get(&l.to_string()).cloned().unwrap_or_default());
            (
                e.kind.to_string(),
                e.run_id,
                e.attempt,
                l,
                e.actor,
                e.comment,
                data,
                e.at.0,
            )
        })
        .collect();
    (answers, runs, attempts, steps, events)
}

#[tokio::test]
async fn every_operator_command_matches_sqlite_row_for_row() {
    let Some(pg) = fresh().await else { return };
    let ids: Vec<RunId> = (0..6).map(|_| RunId::new()).collect();
    let lite: DynStore = Arc::new(SqliteStore::open_in_memory().unwrap());
    let (la, lr, lat, ls, le) = operator_scenario(lite, &ids).await;
    let (pa, pr, pat, ps, pe) = operator_scenario(pg, &ids).await;
    assert_eq!(la, pa);
    assert_eq!(lr, pr);
    assert_eq!(lat, pat);
    assert_eq!(ls, ps);
    assert_eq!(le.len(), pe.len(), "{le:#?}\n{pe:#?}");
    for (x, y) in le.iter().zip(&pe) {
        assert_eq!(x, y);
    }
    // Every command ran, and each refusal named why.
    let all = la.join("\n");
    for needle in [
        "ok pending",
        "ok running",
        "ok postponed",
        "ok cancelled",
        "postpone itself",
        "no failed step",
        "cannot retry a run that is pending",
        "cannot approve or reject a run that is cancelled",
    ] {
        assert!(all.contains(needle), "{needle} missing from {all}");
    }
    let kinds: Vec<&str> = le.iter().map(|e| e.0.as_str()).collect();
    for k in [
        "attempt_deferred",
        "input_received",
        "cancel_requested",
        "operator_skip",
        "step_skipped",
        "operator_retry",
        "run_postponed",
        "run_cancelled",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    // The audit fields travel with every command's event.
    assert!(le.iter().any(|e| e.0 == "operator_retry"
        && e.4.as_deref() == Some("op6")
        && e.5.as_deref() == Some("because 6")));
}

/// What a debounce scenario answered and wrote: each trigger's answer
/// (existing, collapsed, run id), every run, every event.
type DebounceRows = (
    Vec<(bool, bool, RunId)>,
    Vec<docket_store::Run>,
    Vec<(String, RunId, Option<String>, serde_json::Value, i64)>,
);

async fn debounce_scenario(store: &DynStore) -> DebounceRows {
    use docket_store::{DebounceKey, Keep, OperatorCommand, OperatorRequest};
    let mut n = 0u128;
    let mut next = |key: &str, keep: Keep, input: serde_json::Value| {
        n += 1;
        let mut r = NewRun::new("job", input);
        r.id = RunId(Uuid::from_u128(n));
        r.actor = Some(format!("actor-{n}"));
        r.debounce = Some(DebounceKey {
            key: key.into(),
            keep,
            window_ms: 1_000,
        });
        r
    };
    let mut answers = Vec::new();
    let mut ids = Vec::new();
    let steps: Vec<(i64, Vec<NewRun>)> = vec![
        (
            0,
            vec![
                next("f", Keep::First, json!(1)),
                next("l", Keep::Last, json!(1)),
            ],
        ),
        (
            10,
            vec![
                next("f", Keep::First, json!(2)),
                next("l", Keep::Last, json!(2)),
            ],
        ),
        (
            999,
            vec![
                next("l", Keep::Last, json!(3)),
                NewRun::new("job", json!("plain")),
                next("l2", Keep::Last, json!(1)),
                next("l2", Keep::Last, json!(2)),
            ],
        ),
        (
            1_000,
            vec![
                next("f", Keep::First, json!(4)),
                next("l", Keep::Last, json!(4)),
            ],
        ),
    ];
    for (at, mut batch) in steps {
        // The undebounced run's id is random: give it a fixed one.
        for r in &mut batch {
            if r.debounce.is_none() {
                r.id = RunId(Uuid::from_u128(1_000));
            }
        }
        let out = store.trigger(batch, T0.plus_millis(at)).await.unwrap();
        for t in out {
            ids.push(t.run.id);
            answers.push((t.existing, t.collapsed, t.run.id));
        }
    }
    // A cancel ends a window; a claim starts the `l` run of the second
    // window, so a trigger inside its window opens a third.
    let f2 = answers[answers.len() - 2].2;
    store
        .operator(OperatorRequest {
            run_id: f2,
            actor: "op".into(),
            comment: None,
            now: T0.plus_millis(1_001),
            command: OperatorCommand::Cancel,
        })
        .await
        .unwrap();
    store
        .claim(ClaimRequest {
            tenant: None,
            jobs: vec!["job".into()],
            limit: 100,
            now: T0.plus_millis(2_000),
            lease_ms: 30_000,
            worker: "w".into(),
        })
        .await
        .unwrap();
    let out = store
        .trigger(
            vec![
                next("f", Keep::First, json!(5)),
                next("l", Keep::Last, json!(5)),
            ],
            T0.plus_millis(1_500),
        )
        .await
        .unwrap();
    for t in out {
        ids.push(t.run.id);
        answers.push((t.existing, t.collapsed, t.run.id));
    }
    ids.sort();
    ids.dedup();
    let mut runs = Vec::new();
    for id in &ids {
        let mut r = store.get_run(*id).await.unwrap().unwrap();
        r.lease_id = None;
        runs.push(r);
    }
    let events = store
        .events(docket_store::EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.as_str() != "attempt_started")
        .map(|e| (e.kind.to_string(), e.run_id, e.actor, e.data, e.at.0))
        .collect();
    (answers, runs, events)
}

/// Debounced triggers (both modes, a batch, a cancel, a started run) write
/// the same runs and events, row for row, on both backends.
#[tokio::test]
async fn debounce_matches_sqlite_row_for_row() {
    let Some(pg) = fresh().await else { return };
    let lite: DynStore = Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
    let a = debounce_scenario(&lite).await;
    let b = debounce_scenario(&pg).await;
    assert_eq!(a.0, b.0, "answers");
    assert_eq!(a.1, b.1, "runs");
    assert_eq!(a.2, b.2, "events");
    // What operators read of its windows (`GET /api/limits`, `/metrics`),
    // at each time the scenario reached: the same rows on both.
    let mut open = 0;
    for ms in [0, 10, 999, 1_000, 1_001, 1_999, 2_000, 2_500, 3_000] {
        let now = T0.plus_millis(ms);
        let windows = lite.debounce_windows(None, now, 100).await.unwrap();
        assert_eq!(
            windows,
            pg.debounce_windows(None, now, 100).await.unwrap(),
            "windows at {ms}"
        );
        assert_eq!(
            lite.debounce_counts(None, now).await.unwrap(),
            pg.debounce_counts(None, now).await.unwrap(),
            "counts at {ms}"
        );
        open += windows.len();
    }
    assert!(open > 0, "the scenario has open windows to compare");
    // The scenario did what it says.
    let collapsed = a.0.iter().filter(|x| x.1).count();
    assert_eq!(collapsed, 4, "{:?}", a.0);
    let opened: Vec<&str> =
        a.2.iter()
            .filter_map(|e| e.3.get("debounce").and_then(|d| d["opened"].as_str()))
            .collect();
    assert!(
        opened.contains(&"run_cancelled") && opened.contains(&"run_started"),
        "{opened:?}"
    );
}

/// A round whose claim cannot be one statement with its ends (keyed runs
/// wait, two tenants have due runs) still commits ONCE: the end, the keyed
/// claim that takes the slot the end freed, and each tenant's claim are
/// written by one transaction, so every row they wrote carries that
/// transaction's id as `xmin`.
#[tokio::test]
async fn a_round_with_keys_and_several_tenants_commits_once() {
    let Some(pg) = fresh_pg().await else { return };
    let pool = pg.pool().clone();
    let store: DynStore = Arc::new(pg);
    let keyed = |at: i64| {
        let mut n = NewRun::new("job", json!({ "at": at }));
        n.run_after = Some(T0.plus_millis(at));
        n.concurrency = Some(docket_store::ConcurrencyKey {
            key: "k".into(),
            limit: 1,
        });
        n
    };
    let (k1, k2) = (keyed(0), keyed(1));
    let keyed_ids = [k1.id, k2.id];
    store.trigger(vec![k1, k2], T0).await.unwrap();
    let now = T0.plus_millis(10);
    let first = store.claim(claim_at(now, 1)).await.unwrap();
    assert_eq!(
        first.iter().map(|r| r.id).collect::<Vec<_>>(),
        [keyed_ids[0]]
    );
    let unkeyed: Vec<NewRun> = ["a", "b"]
        .iter()
        .map(|t| {
            let mut n = NewRun::new("job", json!({ "tenant": t }));
            n.tenant = (*t).into();
            n
        })
        .collect();
    let mut ids: Vec<Uuid> = unkeyed.iter().map(|r| r.id.0).collect();
    store.trigger(unkeyed, T0).await.unwrap();
    let now = now.plus_millis(5);
    let end = docket_store::AttemptEnd {
        run_id: first[0].id,
        lease_id: first[0].lease_id.unwrap(),
        now,
        outcome: docket_store::Outcome::Completed { output: json!(1) },
    };
    let (ended, got) = store
        .finish_and_claim(vec![end], vec![claim_at(now, 10)])
        .await
        .unwrap();
    assert!(ended[0].is_ok(), "{ended:?}");
    let mut got_ids: Vec<Uuid> = got.iter().map(|r| r.id.0).collect();
    got_ids.sort();
    ids.push(keyed_ids[1].0);
    ids.sort();
    assert_eq!(got_ids, ids, "the freed key slot and both tenants' runs");
    ids.push(keyed_ids[0].0);
    let writers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT xmin::text FROM runs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        writers.len(),
        1,
        "one transaction wrote the round: {writers:?}"
    );
    let event_writers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT xmin::text FROM events WHERE run_id = ANY($1) AND at = $2",
    )
    .bind(&ids)
    .bind(now.0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(event_writers, writers, "the round's events too");
}
