//! Every forensic verdict, produced from real engine activity (the rows are
//! written by the engine and the store, never by hand) — on SQLite and on
//! PostgreSQL (each test in a schema of its own; the PostgreSQL variants
//! are skipped, saying so, without `DOCKET_TEST_POSTGRES_URL`).

use docket::{
    intent_key, Actor, Ctx, Docket, Job, JobError, ManualClock, RetryPolicy, Severity, Timestamp,
    Verdict, WorkerConfig,
};
use docket_store::postgres::PgStore;
use docket_store::sqlite::SqliteStore;
use docket_store::{AttemptEnd, DynStore, ErrorInfo, Outcome, RetryRecord};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

const T0: Timestamp = Timestamp(1_767_225_600_000);
const BOUND: Duration = Duration::from_secs(30);

/// Runs `test` on an engine over SQLite (in memory).
async fn on_sqlite<F: Future<Output = ()>>(test: impl FnOnce(Docket, ManualClock) -> F) {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    run_on(store, test).await;
}

/// Runs `test` on an engine over PostgreSQL, in a fresh schema dropped
/// afterwards (`t_<uuidv7>`: one a failed test leaves behind is swept by the
/// store's conformance tests after an hour).
async fn on_postgres<F: Future<Output = ()>>(test: impl FnOnce(Docket, ManualClock) -> F) {
    let Ok(url) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = Arc::new(PgStore::connect_with(&url, &schema).await.unwrap());
    let pool = store.pool().clone();
    run_on(store, test).await;
    sqlx::raw_sql(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

async fn run_on<F: Future<Output = ()>>(
    store: DynStore,
    test: impl FnOnce(Docket, ManualClock) -> F,
) {
    let clock = ManualClock::new(T0);
    test(Docket::with_store(store, Arc::new(clock.clone())), clock).await;
}

/// One test per backend for each scenario: `<scenario>::sqlite` and
/// `<scenario>::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::on_sqlite(super::$name).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::on_postgres(super::$name).await;
            }
        }
    )*};
}

on_both_backends!(
    delayed_retry_then_terminal_policy_failure,
    retry_without_backoff_is_caught,
    lease_overlap_from_a_worker_that_outlived_its_lease,
    duplicate_dispatch_between_runs_with_one_key,
    duplicate_log_when_one_attempt_is_reported_twice,
);

fn policy(base: u64, max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        name: "p".into(),
        base_delay_ms: base,
        multiplier: 1.0,
        max_delay_ms: base,
        max_attempts,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    }
}

fn failing(name: &str, policy: RetryPolicy) -> Job {
    Job::new(name.to_string(), |ctx: Ctx, _: Value| async move {
        ctx.step("call-crm", || async {
            Err::<Value, _>(JobError::unavailable("503 Service Unavailable"))
        })
        .await?;
        Ok::<_, JobError>(json!(null))
    })
    .retry(policy)
}

async fn tick(d: &Docket) -> usize {
    d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    })
    .tick()
    .await
    .unwrap()
}

fn verdicts(r: &docket::ForensicReport) -> Vec<Verdict> {
    r.verdicts.iter().map(|v| v.verdict).collect()
}

async fn delayed_retry_then_terminal_policy_failure(d: Docket, clock: ManualClock) {
    d.register(failing("sync", policy(1_000, 3))).unwrap();
    let id = d.trigger("sync", json!({})).await.unwrap().run.id;
    for _ in 0..3 {
        tick(&d).await;
        clock.advance_millis(1_000);
    }
    let r = d.forensics(id).await.unwrap();
    assert_eq!(
        verdicts(&r),
        [Verdict::DelayedRetry, Verdict::TerminalPolicyFailure]
    );
    assert_eq!(r.verdicts[0].gap_ms, 1_000);
    assert_eq!(r.verdicts[0].expected_delay_ms, Some(1_000));
    assert_eq!(r.verdicts[0].action, "call-crm");
    assert_eq!(r.timeline.len(), 3);
    assert_eq!(r.timeline[1].gap_since_previous_ms, Some(1_000));
    assert_eq!(r.timeline[0].fingerprint.as_ref().unwrap().attempt, 1);
}

async fn retry_without_backoff_is_caught(d: Docket, clock: ManualClock) {
    d.register(failing("sync", policy(60_000, 5))).unwrap();
    let id = d.trigger("sync", json!({})).await.unwrap().run.id;
    tick(&d).await;
    // Someone moves the retry forward, defeating the policy's delay.
    d.postpone(id, T0.plus_millis(10), Actor::new("impatient", None))
        .await
        .unwrap();
    clock.advance_millis(10);
    tick(&d).await;
    let r = d.forensics(id).await.unwrap();
    assert_eq!(verdicts(&r), [Verdict::RetryWithoutBackoff]);
    assert_eq!(r.verdicts[0].severity, Severity::Critical);
    assert!(r.verdicts[0]
        .explanation
        .contains("the policy chose a delay of 60000 ms"));
    let job = d.forensics_for_job("sync", T0, None).await.unwrap();
    assert_eq!(job.same_action_same_error_within_backoff_window, 1);
    assert_eq!(job.runs_examined, 1);
}

async fn lease_overlap_from_a_worker_that_outlived_its_lease(d: Docket, clock: ManualClock) {
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let (e, g, c) = (entered.clone(), gate.clone(), calls.clone());
    d.register(
        Job::new("slow", move |_ctx: Ctx, _: Value| {
            let (e, g, c) = (e.clone(), g.clone(), c.clone());
            async move {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    e.notify_one();
                    g.notified().await;
                }
                Err::<Value, _>(JobError::unavailable("503"))
            }
        })
        .timeout(Duration::from_secs(20))
        .lease(Duration::from_secs(30))
        .retry(policy(1_000, 5)),
    )
    .unwrap();
    let id = d.trigger("slow", json!({})).await.unwrap().run.id;
    let first = d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    });
    let t = tokio::spawn(async move { first.tick().await.unwrap() });
    tokio::time::timeout(BOUND, entered.notified())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(31));
    d.reap_expired().await.unwrap();
    clock.advance(Duration::from_secs(1));
    tick(&d).await; // attempt 2 fails while attempt 1 is still running
    clock.advance(Duration::from_secs(8));
    gate.notify_one(); // attempt 1 reports its failure late
    tokio::time::timeout(BOUND, t).await.unwrap().unwrap();
    let r = d.forensics(id).await.unwrap();
    assert!(r.failures.iter().any(|f| f.late_report));
    assert_eq!(verdicts(&r), [Verdict::LeaseOverlap]);
    assert_eq!(r.verdicts[0].severity, Severity::Critical);
}

async fn duplicate_dispatch_between_runs_with_one_key(d: Docket, _clock: ManualClock) {
    d.register(
        Job::new("send", |ctx: Ctx, input: Value| async move {
            let key = intent_key([
                input["prospect"].as_str().unwrap_or_default(),
                "send-email",
                "campaign-9",
                "v1",
            ]);
            ctx.action("send-email", key, |_key| async {
                Err::<Value, _>(JobError::unavailable("503"))
            })
            .await?;
            Ok::<_, JobError>(json!(null))
        })
        .retry(policy(1_000, 5)),
    )
    .unwrap();
    d.trigger("send", json!({"prospect": "prospect-7ca677ed25d3"}))
        .await
        .unwrap();
    d.trigger("send", json!({"prospect": "prospect-7ca677ed25d3"}))
        .await
        .unwrap();
    tick(&d).await;
    tick(&d).await;
    let job = d.forensics_for_job("send", T0, None).await.unwrap();
    assert_eq!(job.runs_examined, 2);
    assert_eq!(job.counts.get(&Verdict::DuplicateDispatch), Some(&1));
    assert!(job.verdicts[0]
        .explanation
        .contains("prospect-7ca677ed25d3/send-email/campaign-9/v1"));
}

async fn duplicate_log_when_one_attempt_is_reported_twice(d: Docket, _clock: ManualClock) {
    d.register(failing("sync", policy(1_000, 5))).unwrap();
    let id = d.trigger("sync", json!({})).await.unwrap().run.id;
    tick(&d).await;
    // The worker's report is delivered again (a retried request whose first
    // answer was lost): the store refuses it and keeps it as evidence.
    let a = d.store().attempts(id).await.unwrap().remove(0);
    let again = AttemptEnd {
        run_id: id,
        lease_id: a.lease_id,
        now: T0.plus_millis(5),
        outcome: Outcome::Retry {
            error: ErrorInfo {
                class: a.error_class.unwrap(),
                message: a.error_message.clone().unwrap(),
                fingerprint: a.fingerprint.clone().unwrap(),
                failure_key: a.failure_key.clone().unwrap(),
                action: a.action.clone(),
            },
            retry: RetryRecord {
                policy: a.retry_policy.clone().unwrap(),
                delay_ms: a.delay_ms.unwrap(),
                eligible_at: a.eligible_at.unwrap(),
                reason: a.retry_reason.unwrap(),
            },
        },
    };
    assert!(d.store().finish(vec![again]).await.unwrap()[0].is_err());
    let r = d.forensics(id).await.unwrap();
    assert_eq!(verdicts(&r), [Verdict::DuplicateLog]);
    assert_eq!(r.verdicts[0].severity, Severity::Info);
}
