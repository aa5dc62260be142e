//! Retention and queue operations through the engine: the pruner under its
//! expiring lead, pausing a job against a real worker, and how long a claim
//! waits while pruning runs (both backends for the last; PostgreSQL with
//! `DOCKET_TEST_POSTGRES_URL`).

use docket::retention::{PrunerConfig, Retention, RetentionConfig};
use docket::{
    Actor, Clock, Docket, Job, JobError, ManualClock, RunStatus, Timestamp, WorkerConfig,
};
use docket_store::{AttemptEnd, ClaimRequest, DynStore, NewRun, Outcome};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T0: Timestamp = Timestamp(1_767_225_600_000);
const HOUR: i64 = 3_600_000;

fn noop() -> Job {
    Job::new("noop", |_ctx, input: Value| async move {
        Ok::<_, JobError>(input)
    })
}

fn keep_completed_one_hour() -> RetentionConfig {
    RetentionConfig {
        default: Retention {
            completed_ms: Some(HOUR),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pruner(holder: &str) -> PrunerConfig {
    PrunerConfig {
        batch: 2,
        lead_ttl: Duration::from_secs(10),
        holder: holder.into(),
        ..PrunerConfig::new(keep_completed_one_hour())
    }
}

async fn completed_runs(d: &Docket, n: usize) -> Vec<docket::RunId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(d.trigger("noop", json!(i)).await.unwrap().run.id);
    }
    let w = d.worker(WorkerConfig {
        concurrency: n,
        ..Default::default()
    });
    assert_eq!(w.tick().await.unwrap(), n);
    for id in &ids {
        assert_eq!(d.get_run(*id).await.unwrap().status, RunStatus::Completed);
    }
    ids
}

/// Two processes run a pruner; only the lead's holder prunes. A leader that
/// stops renewing (hung) loses the task when its lead expires, and the
/// other takes over; the hung one, back, prunes nothing.
#[tokio::test]
async fn only_the_leader_prunes_and_a_hung_leader_is_replaced() {
    let clock = ManualClock::new(T0);
    let store: DynStore = Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
    let a = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let b = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    a.register(noop()).unwrap();
    let first = completed_runs(&a, 5).await;
    clock.advance_millis(HOUR);
    let r = a.prune_once(&pruner("a")).await.unwrap();
    assert!(r.led && !r.lost_lead);
    assert_eq!((r.runs, r.batches), (5, 3), "batches of 2: 2 + 2 + 1");
    for id in first {
        assert!(a.store().get_run(id).await.unwrap().is_none());
    }
    // More runs become eligible; a's lead (10 s) still holds: b stands by.
    let second = completed_runs(&a, 3).await;
    clock.set(T0.plus_millis(HOUR + 5_000));
    let r = b.prune_once(&pruner("b")).await.unwrap();
    assert!(!r.led);
    assert_eq!(r.runs, 0);
    // a hangs (never renews); past its lead, b takes over and prunes.
    clock.set(T0.plus_millis(2 * HOUR + 1));
    let r = b.prune_once(&pruner("b")).await.unwrap();
    assert!(r.led);
    assert_eq!(r.runs, 3);
    for id in second {
        assert!(b.store().get_run(id).await.unwrap().is_none());
    }
    // a comes back inside b's lead: it does not lead, prunes nothing.
    let r = a.prune_once(&pruner("a")).await.unwrap();
    assert!(!r.led);
}

/// The leading pruner forgets remote workers not seen for the roster's
/// window (7 days); a standing-by one forgets nothing.
#[tokio::test]
async fn the_leading_pruner_forgets_workers_silent_for_a_week() {
    let clock = ManualClock::new(T0);
    let store: DynStore = Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
    let a = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let b = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let seen = |name: &str, at: Timestamp| docket_store::WorkerSeen {
        tenant: "acme".into(),
        name: name.into(),
        jobs: Some(vec!["noop".into()]),
        now: at,
    };
    store.touch_worker(seen("gone", T0)).await.unwrap();
    let week = docket_store::workers::ROSTER_WINDOW_MS;
    store
        .touch_worker(seen("alive", T0.plus_millis(week)))
        .await
        .unwrap();
    clock.set(T0.plus_millis(week + 1));
    assert_eq!(a.prune_once(&pruner("a")).await.unwrap().workers, 1);
    let r = b.prune_once(&pruner("b")).await.unwrap();
    assert!(!r.led);
    assert_eq!(r.workers, 0);
    let left = store.list_workers(None).await.unwrap();
    assert_eq!(
        left.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["alive"]
    );
}

/// The background pruner runs a round at once and, at shutdown, gives up
/// its lead so another process can take over without waiting for it to
/// expire. An invalid configuration is refused before it starts.
#[tokio::test]
async fn the_pruner_task_prunes_and_resigns_at_shutdown() {
    let clock = ManualClock::new(T0);
    let store: DynStore = Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
    let d = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    d.register(noop()).unwrap();
    let ids = completed_runs(&d, 3).await;
    clock.advance_millis(HOUR);
    let mut cfg = pruner("a");
    cfg.interval = Duration::from_secs(3600);
    let handle = d.start_pruner(cfg).unwrap();
    // shutdown() returns after the first round (it runs before the task
    // looks at the stop signal) and the resignation.
    handle.shutdown().await;
    for id in ids {
        assert!(store.get_run(id).await.unwrap().is_none());
    }
    let other = store
        .try_lead("prune".into(), "b".into(), clock.now(), 10_000)
        .await
        .unwrap();
    assert!(other.is_some(), "the lead was given up at shutdown");
    let mut bad = pruner("c");
    bad.retention.ledger_ms = Some(1);
    assert!(matches!(
        d.start_pruner(bad),
        Err(docket::Error::InvalidInput(m)) if m.contains("shorter")
    ));
}

/// A paused job's runs are not run by a worker (they stay pending, and
/// triggers still queue them) until it is resumed; other jobs run.
#[tokio::test]
async fn a_paused_job_waits_until_resumed() {
    let clock = ManualClock::new(T0);
    let store: DynStore = Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap());
    let d = Docket::with_store(store, Arc::new(clock.clone()));
    d.register(noop()).unwrap();
    d.register(Job::new("other", |_ctx, v: Value| async move {
        Ok::<_, JobError>(v)
    }))
    .unwrap();
    let by = || Actor::new("ops-alice", Some("incident 12".into()));
    assert!(d.pause_job("default", "noop", by()).await.unwrap());
    let paused = d.trigger("noop", json!(1)).await.unwrap().run.id;
    let other = d.trigger("other", json!(2)).await.unwrap().run.id;
    let w = d.worker(WorkerConfig {
        concurrency: 4,
        ..Default::default()
    });
    assert_eq!(w.tick().await.unwrap(), 1, "only the other job's run");
    assert_eq!(d.get_run(other).await.unwrap().status, RunStatus::Completed);
    assert_eq!(d.get_run(paused).await.unwrap().status, RunStatus::Pending);
    assert_eq!(d.pauses(Some("default")).await.unwrap().len(), 1);
    assert!(d.resume_job("default", "noop", by()).await.unwrap());
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(
        d.get_run(paused).await.unwrap().status,
        RunStatus::Completed
    );
    assert!(matches!(
        d.pause_job("default", " ", by()).await,
        Err(docket::Error::InvalidInput(_))
    ));
}

/// `n` completed runs of `job`, finished at T0, written straight through
/// the store (fast).
async fn seed_completed(store: &DynStore, job: &str, n: usize) {
    for chunk in 0..n.div_ceil(500) {
        let k = 500.min(n - chunk * 500);
        let runs: Vec<NewRun> = (0..k).map(|i| NewRun::new(job, json!(i))).collect();
        store.trigger(runs, T0).await.unwrap();
        let claimed = store
            .claim(ClaimRequest {
                jobs: vec![job.into()],
                limit: k,
                now: T0,
                lease_ms: 60_000,
                worker: "seed".into(),
                tenant: None,
            })
            .await
            .unwrap();
        let ends = claimed
            .iter()
            .map(|r| AttemptEnd {
                run_id: r.id,
                lease_id: r.lease_id.unwrap(),
                now: T0,
                outcome: Outcome::Completed { output: json!(1) },
            })
            .collect();
        store.finish(ends).await.unwrap();
    }
}

/// Pruning proceeds in bounded batches while workers claim: a claim made
/// during pruning waits at most about one batch. Measured and printed
/// (docs/OPERATIONS.md quotes it); the assertion is a loose bound so the
/// test holds on a loaded machine, and fails if pruning were one long
/// transaction (4,000 runs with their rows take far longer than a batch).
async fn claims_are_not_held_up_by_pruning(store: DynStore, label: &str) {
    const N: usize = 4_000;
    seed_completed(&store, "old", N).await;
    let pending: Vec<NewRun> = (0..600).map(|i| NewRun::new("live", json!(i))).collect();
    store.trigger(pending, T0).await.unwrap();
    let clock = ManualClock::new(T0.plus_millis(2 * HOUR));
    // The same claims without pruning, for comparison.
    let mut quiet = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        store
            .claim(ClaimRequest {
                jobs: vec!["live".into()],
                limit: 1,
                now: clock.now(),
                lease_ms: 60_000,
                worker: "w".into(),
                tenant: None,
            })
            .await
            .unwrap();
        quiet.push(t.elapsed());
    }
    quiet.sort();
    let d = Docket::with_store(store.clone(), Arc::new(clock.clone()));
    let cfg = PrunerConfig {
        batch: 250,
        max_batches: 1_000,
        ..PrunerConfig::new(keep_completed_one_hour())
    };
    let claimer = {
        let store = store.clone();
        let now = clock.now();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                let got = store
                    .claim(ClaimRequest {
                        jobs: vec!["live".into()],
                        limit: 1,
                        now,
                        lease_ms: 60_000,
                        worker: "w".into(),
                        tenant: None,
                    })
                    .await
                    .unwrap();
                lat.push(t.elapsed());
                if got.is_empty() {
                    return lat;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let t = Instant::now();
    let round = d.prune_once(&cfg).await.unwrap();
    let prune_time = t.elapsed();
    let mut lat = claimer.await.unwrap();
    assert_eq!(round.runs, N as u64);
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    let max = *lat.last().unwrap();
    let per_batch = prune_time / round.batches as u32;
    println!(
        "{label}: pruned {N} runs in {} batches of 250, {prune_time:?} ({per_batch:?} per batch); \
         {} concurrent claims: p99 {p99:?}, max {max:?}; without pruning: p99 {:?}, max {:?}",
        round.batches,
        lat.len(),
        quiet[quiet.len() * 99 / 100],
        quiet.last().unwrap()
    );
    assert!(
        max < Duration::from_millis(500),
        "{label}: a claim waited {max:?} during pruning"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_claims_are_not_held_up_by_pruning() {
    let dir = std::env::temp_dir().join(format!("docket-prune-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let store: DynStore =
        Arc::new(docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap());
    claims_are_not_held_up_by_pruning(store, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claims_are_not_held_up_by_pruning() {
    let url = match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => {
            eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL to run PostgreSQL tests");
            return;
        }
    };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = docket_store::postgres::PgStore::connect_with(&url, &schema)
        .await
        .unwrap();
    claims_are_not_held_up_by_pruning(Arc::new(store), "postgres").await;
}
