//! Rate limits on the engine (docs/RATE_LIMITS.md), on embedded SQLite with
//! the injected clock: every instant below is exact.

use docket::{
    AttemptOutcome, Docket, Error, Job, ManualClock, RetryReason, RunStatus, Timestamp,
    TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const T0: Timestamp = Timestamp(1_767_225_600_000);

fn engine() -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    (Docket::with_store(store, Arc::new(clock.clone())), clock)
}

/// A job that records the instant each run's handler ran.
fn recording(name: &str, ran: Arc<Mutex<Vec<(String, i64)>>>, clock: ManualClock) -> Job {
    Job::new(name.to_string(), move |ctx, _input: Value| {
        let ran = ran.clone();
        let clock = clock.clone();
        async move {
            use docket::Clock;
            ran.lock()
                .unwrap()
                .push((ctx.tenant().to_string(), clock.now().millis_since(T0)));
            Ok(json!({}))
        }
    })
}

/// 20 a second with a burst of 5: of 30 runs due at once, 5 run at once and
/// then exactly one every 50 ms; each of the other 25 is deferred exactly
/// once (to its reserved token, no attempt spent) and runs at its token's
/// time, never a millisecond early.
#[tokio::test]
async fn twenty_a_second_burst_five_runs_exactly_one_per_token() {
    let (d, clock) = engine();
    let ran = Arc::new(Mutex::new(Vec::new()));
    d.register(recording("sync", ran.clone(), clock.clone()).rate_limit(20.0, 5))
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(d.trigger("sync", json!({ "i": i })).await.unwrap().run.id);
    }
    let w = d.worker(WorkerConfig {
        concurrency: 100,
        ..Default::default()
    });
    assert_eq!(w.tick().await.unwrap(), 30);
    assert_eq!(ran.lock().unwrap().len(), 5);
    // Each window of 50 ms pays for exactly one more run.
    for step in 1..=25i64 {
        clock.set(T0.plus_millis(step * 50 - 1));
        assert_eq!(
            w.tick().await.unwrap(),
            0,
            "nothing is due before {step}'s token"
        );
        clock.set(T0.plus_millis(step * 50));
        assert_eq!(
            w.tick().await.unwrap(),
            1,
            "one run per token at step {step}"
        );
    }
    let times: Vec<i64> = ran.lock().unwrap().iter().map(|(_, t)| *t).collect();
    let expected: Vec<i64> = [0; 5].into_iter().chain((1..=25).map(|s| s * 50)).collect();
    assert_eq!(times, expected);
    let mut deferred_runs = 0;
    for id in ids {
        let run = d.get_run(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed);
        let attempts = d.store().attempts(id).await.unwrap();
        let deferrals: Vec<_> = attempts
            .iter()
            .filter(|a| a.outcome == AttemptOutcome::Deferred)
            .collect();
        // One recorded decision per run at most, spending no budget.
        assert!(deferrals.len() <= 1, "{attempts:?}");
        if let Some(a) = deferrals.first() {
            deferred_runs += 1;
            assert_eq!(a.retry_reason, Some(RetryReason::RateLimited));
            assert_eq!(a.retry_policy.as_deref(), Some("rate_limit:job:sync"));
            let msg = a.error_message.as_deref().unwrap();
            assert!(
                msg.starts_with("rate limit sync: next token at 2026-01-01T00:00:"),
                "{msg}"
            );
            assert_eq!(run.attempts_forgiven, 1);
        }
    }
    assert_eq!(deferred_runs, 25);
}

/// With a key template each key has its own bucket: two tenants each get
/// their burst at once.
#[tokio::test]
async fn a_key_template_gives_each_key_its_own_bucket() {
    let (d, clock) = engine();
    let ran = Arc::new(Mutex::new(Vec::new()));
    d.register(
        recording("sync", ran.clone(), clock.clone())
            .rate_limit(1.0, 2)
            .rate_limit_key("{{ tenant }}"),
    )
    .unwrap();
    for tenant in ["acme", "acme", "acme", "globex", "globex"] {
        d.trigger_with(
            "sync",
            json!({}),
            TriggerOptions {
                tenant: Some(tenant.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let w = d.worker(WorkerConfig {
        concurrency: 10,
        ..Default::default()
    });
    w.tick().await.unwrap();
    let mut got: Vec<String> = ran.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
    got.sort();
    assert_eq!(got, ["acme", "acme", "globex", "globex"]);
    clock.set(T0.plus_millis(1_000));
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(
        ran.lock().unwrap().last().unwrap(),
        &("acme".to_string(), 1_000)
    );
    let buckets = d.store().rate_buckets("job:sync/".into()).await.unwrap();
    let keys: Vec<&str> = buckets.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(keys, ["job:sync/acme", "job:sync/globex"]);
}

/// Bad limits are refused at registration, naming the field.
#[tokio::test]
async fn bad_rate_limits_are_refused_naming_the_field() {
    let (d, clock) = engine();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let job = || recording("sync", ran.clone(), clock.clone());
    for (j, field) in [
        (job().rate_limit(0.0, 5), "rate_limit.per_second"),
        (job().rate_limit(-2.0, 5), "rate_limit.per_second"),
        (job().rate_limit(20.0, 0), "rate_limit.burst"),
        (
            job()
                .rate_limit(20.0, 5)
                .rate_limit_key("{{ variables.x }}"),
            "rate_limit_key",
        ),
        (job().rate_limit_key("{{ tenant }}"), "rate_limit_key"),
    ] {
        match d.register(j) {
            Err(Error::InvalidJob { problem, .. }) => {
                assert!(problem.starts_with(field), "{problem}")
            }
            other => panic!("{other:?}"),
        }
    }
}

/// A run whose input lacks the key's field fails `invalid_input` naming it,
/// without running.
#[tokio::test]
async fn a_missing_key_field_fails_the_run_naming_it() {
    let (d, clock) = engine();
    let ran = Arc::new(Mutex::new(Vec::new()));
    d.register(
        recording("sync", ran.clone(), clock.clone())
            .rate_limit(1.0, 1)
            .rate_limit_key("{{ input.customer_id }}"),
    )
    .unwrap();
    let id = d.trigger("sync", json!({})).await.unwrap().run.id;
    d.worker(WorkerConfig::default()).tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run
        .last_error_message
        .unwrap()
        .contains("the input has no field `input.customer_id`"));
    assert!(ran.lock().unwrap().is_empty());
}
