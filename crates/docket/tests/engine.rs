//! Engine behaviour on embedded SQLite, with the injected clock.

use docket::{
    Docket, ErrorClass, Job, JobError, ManualClock, RetryPolicy, RunStatus, TerminalReason,
    Timestamp, TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

const T0: Timestamp = Timestamp(1_767_225_600_000);
const BOUND: Duration = Duration::from_secs(30);

fn engine() -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    (Docket::with_store(store, Arc::new(clock.clone())), clock)
}

fn policy(base: u64, jitter: u64, max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        name: "test-policy".into(),
        base_delay_ms: base,
        multiplier: 2.0,
        max_delay_ms: 60_000,
        max_attempts,
        jitter_ms: jitter,
        overrides: BTreeMap::new(),
    }
}

fn one_worker(d: &Docket) -> docket::Worker {
    d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    })
}

/// Seed 002's test, as written there: freeze time at T0, the handler raises a
/// timeout, one worker tick; not claimable at T0, nor at T0 + delay − 1 ms;
/// claimable at T0 + delay with attempt 2 and the same idempotency key.
#[tokio::test]
async fn timeout_retry_is_not_claimable_before_its_delay() {
    let (d, clock) = engine();
    let p = policy(1_000, 500, 5);
    d.register(
        Job::new("revenue_action", |_ctx, _input: Value| async move {
            Err::<Value, _>(JobError::timeout(
                "TimeoutError: vendor did not answer in 60s",
            ))
        })
        .retry(p.clone()),
    )
    .unwrap();
    let key = "prospect-7ca677ed25d3/send-email/campaign-9/v1";
    let run = d
        .trigger_with(
            "revenue_action",
            json!({"prospect": "prospect-7ca677ed25d3"}),
            TriggerOptions {
                idempotency_key: Some(key.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run;
    assert_eq!(one_worker(&d).tick().await.unwrap(), 1);

    let delay = (p.backoff_ms(ErrorClass::Timeout, 1) + p.jitter_for(run.id, 1)) as i64;
    let claim = |now: Timestamp| {
        let d = d.clone();
        async move {
            d.store()
                .claim(docket_store::ClaimRequest {
                    tenant: None,
                    jobs: vec!["revenue_action".into()],
                    limit: 10,
                    now,
                    lease_ms: 60_000,
                    worker: "probe".into(),
                })
                .await
                .unwrap()
        }
    };
    assert!(claim(T0).await.is_empty(), "claimable at T0");
    assert!(
        claim(T0.plus_millis(delay - 1)).await.is_empty(),
        "claimable at T0 + delay - 1ms"
    );
    let got = claim(T0.plus_millis(delay)).await;
    assert_eq!(got.len(), 1, "not claimable at T0 + delay");
    assert_eq!(got[0].attempt, 2);
    assert_eq!(got[0].idempotency_key.as_deref(), Some(key));

    // The evidence of the decision is on the first attempt's row.
    let att = d.store().attempts(run.id).await.unwrap();
    assert_eq!(att[0].retry_policy.as_deref(), Some("test-policy"));
    assert_eq!(att[0].delay_ms, Some(delay));
    assert_eq!(att[0].eligible_at, Some(T0.plus_millis(delay)));
    assert_eq!(att[0].error_class, Some(ErrorClass::Timeout));
    let _ = clock;
}

#[tokio::test]
async fn retries_follow_the_policy_until_exhausted() {
    let (d, clock) = engine();
    d.register(
        Job::new("flaky", |_ctx, _: Value| async move {
            Err::<Value, _>(JobError::unavailable("503"))
        })
        .retry(policy(100, 0, 3)),
    )
    .unwrap();
    let id = d.trigger("flaky", json!({})).await.unwrap().run.id;
    let w = one_worker(&d);
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(w.tick().await.unwrap(), 0, "no immediate retry");
    clock.advance_millis(100);
    assert_eq!(w.tick().await.unwrap(), 1);
    clock.advance_millis(199);
    assert_eq!(w.tick().await.unwrap(), 0);
    clock.advance_millis(1);
    assert_eq!(w.tick().await.unwrap(), 1);
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Failed);
    assert_eq!(
        h.run.terminal_reason,
        Some(TerminalReason::MaxRetriesExhausted)
    );
    let delays: Vec<_> = h.attempts.iter().map(|a| a.delay_ms).collect();
    assert_eq!(delays, [Some(100), Some(200), None]);
    let kinds: Vec<_> = h.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run_triggered",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "attempt_started",
            "attempt_failed",
            "run_failed"
        ]
    );
}

#[tokio::test]
async fn invalid_input_fails_at_once_without_retries() {
    #[derive(serde::Deserialize)]
    struct Email {
        #[allow(dead_code)]
        to: String,
    }
    let (d, _clock) = engine();
    d.register(Job::new("email", |_ctx, _: Email| async move {
        Ok::<_, JobError>(json!(1))
    }))
    .unwrap();
    d.register(
        Job::new("checked", |_ctx, _: Value| async move {
            Ok::<_, JobError>(json!(1))
        })
        .validate(|v| {
            if v.get("amount").is_some() {
                Ok(())
            } else {
                Err("field `amount` is required".into())
            }
        }),
    )
    .unwrap();
    let a = d
        .trigger("email", json!({"subject": "hi"}))
        .await
        .unwrap()
        .run
        .id;
    let b = d.trigger("checked", json!({})).await.unwrap().run.id;
    let w = d.worker(WorkerConfig {
        concurrency: 4,
        ..Default::default()
    });
    assert_eq!(w.tick().await.unwrap(), 2);
    for (id, needle) in [(a, "missing field `to`"), (b, "field `amount` is required")] {
        let run = d.get_run(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Failed);
        assert_eq!(run.terminal_reason, Some(TerminalReason::InvalidInput));
        assert!(
            run.last_error_message.as_deref().unwrap().contains(needle),
            "{:?}",
            run.last_error_message
        );
        assert_eq!(run.attempt, 1);
    }
}

#[tokio::test]
async fn oversized_input_is_refused_at_trigger_and_nothing_is_stored() {
    let (d, _clock) = engine();
    d.register(Job::new("j", |_ctx, _: Value| async move {
        Ok::<_, JobError>(json!(1))
    }))
    .unwrap();
    d.set_max_input_bytes(100);
    let err = d
        .trigger("j", json!({"blob": "x".repeat(200)}))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("content_too_large"), "{err}");
    let err = d.trigger("nope", json!({})).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown job `nope`: register it before triggering it"
    );
    assert!(d.list_runs(Default::default()).await.unwrap().is_empty());
}

#[tokio::test]
async fn registration_refuses_a_timeout_not_shorter_than_the_lease() {
    let (d, _clock) = engine();
    let job = Job::new(
        "j",
        |_ctx, _: Value| async move { Ok::<_, JobError>(json!(1)) },
    )
    .timeout(Duration::from_secs(30))
    .lease(Duration::from_secs(30));
    let err = d.register(job).unwrap_err().to_string();
    assert!(err.contains("must be shorter than the lease"), "{err}");
    let bad_policy = Job::new(
        "j",
        |_ctx, _: Value| async move { Ok::<_, JobError>(json!(1)) },
    )
    .retry(RetryPolicy {
        max_attempts: 0,
        ..RetryPolicy::default()
    });
    assert!(d
        .register(bad_policy)
        .unwrap_err()
        .to_string()
        .contains("max_attempts"));
    // Durations whose sums would leave the RFC 3339 range are refused.
    let huge_lease = Job::new(
        "j",
        |_ctx, _: Value| async move { Ok::<_, JobError>(json!(1)) },
    )
    .lease(Duration::from_secs(u64::MAX / 4));
    let err = d.register(huge_lease).unwrap_err().to_string();
    assert!(
        err.contains("the lease") && err.contains("366 days"),
        "{err}"
    );
    let huge_delay = Job::new(
        "j",
        |_ctx, _: Value| async move { Ok::<_, JobError>(json!(1)) },
    )
    .retry(RetryPolicy {
        max_delay_ms: u64::MAX,
        ..RetryPolicy::default()
    });
    let err = d.register(huge_delay).unwrap_err().to_string();
    assert!(
        err.contains("max_delay_ms") && err.contains("100 years"),
        "{err}"
    );
    assert!(d.job_names().is_empty());
}

#[tokio::test]
async fn idempotent_trigger_returns_the_existing_run() {
    let (d, _clock) = engine();
    d.register(Job::new("j", |_ctx, _: Value| async move {
        Ok::<_, JobError>(json!(1))
    }))
    .unwrap();
    let o = || TriggerOptions {
        idempotency_key: Some("order-1".into()),
        ..Default::default()
    };
    let a = d.trigger_with("j", json!(1), o()).await.unwrap();
    let b = d.trigger_with("j", json!(2), o()).await.unwrap();
    assert!(!a.existing);
    assert!(b.existing);
    assert_eq!(a.run.id, b.run.id);
    let batch = d
        .trigger_batch(vec![
            ("j".into(), json!(3), o()),
            ("j".into(), json!(4), TriggerOptions::default()),
        ])
        .await
        .unwrap();
    assert!(batch[0].existing && !batch[1].existing);
    assert_eq!(d.list_runs(Default::default()).await.unwrap().len(), 2);
}

#[tokio::test]
async fn rate_limit_reset_time_is_honoured() {
    let (d, _clock) = engine();
    d.register(
        Job::new("rl", |_ctx, _: Value| async move {
            Err::<Value, _>(JobError::rate_limited("429", Some(T0.plus_millis(45_000))))
        })
        .retry(policy(100, 0, 5)),
    )
    .unwrap();
    let id = d.trigger("rl", json!({})).await.unwrap().run.id;
    one_worker(&d).tick().await.unwrap();
    let att = d.store().attempts(id).await.unwrap();
    assert_eq!(att[0].delay_ms, Some(45_000));
    assert_eq!(att[0].retry_reason.as_deref(), Some("retry_after"));
    assert_eq!(
        d.get_run(id).await.unwrap().run_after,
        T0.plus_millis(45_000)
    );
}

#[tokio::test]
async fn a_panicking_handler_fails_the_run_permanently() {
    let (d, _clock) = engine();
    d.register(Job::new("boom", |_ctx, _: Value| async move {
        if true {
            panic!("index out of bounds");
        }
        Ok::<Value, JobError>(json!(1))
    }))
    .unwrap();
    let id = d.trigger("boom", json!({})).await.unwrap().run.id;
    one_worker(&d).tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.terminal_reason, Some(TerminalReason::PermanentError));
    assert!(run
        .last_error_message
        .unwrap()
        .contains("index out of bounds"));
}

/// A worker whose lease expired and was reclaimed cannot complete the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lease_cannot_complete_or_fail() {
    let (d, clock) = engine();
    let gate = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let (g, e, c) = (gate.clone(), entered.clone(), calls.clone());
    d.register(
        Job::new("slow", move |_ctx, _: Value| {
            let (g, e, c) = (g.clone(), e.clone(), c.clone());
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    e.notify_one();
                    g.notified().await;
                    return Err::<Value, _>(JobError::unavailable(
                        "late failure from the first worker",
                    ));
                }
                Ok(json!({"by": "second"}))
            }
        })
        .timeout(Duration::from_secs(20))
        .lease(Duration::from_secs(30))
        .retry(policy(1_000, 0, 5)),
    )
    .unwrap();
    let id = d.trigger("slow", json!({})).await.unwrap().run.id;
    let first = one_worker(&d);
    let first_tick = tokio::spawn(async move { first.tick().await.unwrap() });
    tokio::time::timeout(BOUND, entered.notified())
        .await
        .expect("first attempt started");
    let lease1 = d.get_run(id).await.unwrap().lease_id;

    // The lease runs out; the reaper fails the attempt through the policy.
    clock.advance(Duration::from_secs(31));
    assert_eq!(d.reap_expired().await.unwrap(), 1);
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!(
        run.run_after,
        T0.plus_millis(31_000 + 1_000),
        "lease_expired goes through the backoff"
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(one_worker(&d).tick().await.unwrap(), 1);
    assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Completed);

    // Now the first worker reports: refused, recorded, and the run is untouched.
    gate.notify_one();
    tokio::time::timeout(BOUND, first_tick)
        .await
        .unwrap()
        .unwrap();
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(h.run.output, Some(json!({"by": "second"})));
    let stale: Vec<_> = h
        .events
        .iter()
        .filter(|e| e.kind == "stale_write_refused")
        .collect();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].lease_id, lease1);
    assert_eq!(h.attempts[0].outcome, "lease_expired");
    assert_eq!(h.attempts[0].error_class, Some(ErrorClass::LeaseExpired));
    assert_eq!(h.attempts[1].outcome, "completed");
}

/// An idle worker starts a new run on trigger, not at its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_wakes_an_idle_worker() {
    let clock = docket::SystemClock;
    let d = Docket::with_store(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        Arc::new(clock),
    );
    d.register(Job::new("ping", |_ctx, _: Value| async move {
        Ok::<_, JobError>(json!("pong"))
    }))
    .unwrap();
    let handle = d
        .worker(WorkerConfig {
            poll_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .start();
    // Let the worker reach its idle wait: a first run proves it is looping.
    let warm = d.trigger("ping", json!({})).await.unwrap().run.id;
    d.wait(warm, BOUND).await.unwrap();
    let id = d.trigger("ping", json!({})).await.unwrap().run.id;
    let run = d.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(run.output, Some(json!("pong")));
    handle.shutdown(Duration::from_secs(1)).await;
}

/// Two processes on one SQLite file — a web app that triggers, a worker
/// that runs — modelled by two stores (two connections, exactly as two
/// processes have): the worker is woken by the other connection's commit,
/// not by its poll (an hour here, so only the wake-up can pass the bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_from_another_connection_wakes_an_idle_worker() {
    let dir = std::env::temp_dir().join(format!("docket-xproc-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db").display().to_string();
    let open = || {
        Docket::with_store(
            Arc::new(SqliteStore::open(&path).unwrap()),
            Arc::new(docket::SystemClock),
        )
    };
    let (worker_side, web_side) = (open(), open());
    for d in [&worker_side, &web_side] {
        d.register(Job::new("ping", |_ctx, _: Value| async move {
            Ok::<_, JobError>(json!("pong"))
        }))
        .unwrap();
    }
    let handle = worker_side
        .worker(WorkerConfig {
            poll_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .start();
    // A first run through the worker's own store proves it is looping and
    // has subscribed to wake-ups.
    let warm = worker_side.trigger("ping", json!({})).await.unwrap().run.id;
    worker_side.wait(warm, BOUND).await.unwrap();
    for _ in 0..3 {
        let id = web_side.trigger("ping", json!({})).await.unwrap().run.id;
        let run = web_side.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(run.output, Some(json!("pong")));
    }
    handle.shutdown(Duration::from_secs(1)).await;
}

/// A retry is claimed at its eligible time even while another attempt keeps
/// the worker busy: the driver waits for the earliest due run, not for the
/// poll interval (an hour here, so only that can pass the bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_picked_up_at_its_time_while_other_attempts_run() {
    let d = Docket::with_store(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        Arc::new(docket::SystemClock),
    );
    let release = Arc::new(Notify::new());
    let r = release.clone();
    d.register(Job::new("long", move |_ctx, _: Value| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok::<_, JobError>(json!("done"))
        }
    }))
    .unwrap();
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    d.register(
        Job::new("flaky", move |_ctx, _: Value| {
            let t = t.clone();
            async move {
                if t.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(JobError::unavailable("503 once"))
                } else {
                    Ok(json!("ok"))
                }
            }
        })
        .retry(policy(200, 0, 3)),
    )
    .unwrap();
    let handle = d
        .worker(WorkerConfig {
            concurrency: 4,
            poll_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .start();
    let long = d.trigger("long", json!({})).await.unwrap().run.id;
    let flaky = d.trigger("flaky", json!({})).await.unwrap().run.id;
    let run = d.wait(flaky, Duration::from_secs(20)).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.attempt, 2);
    let attempts = d.store().attempts(flaky).await.unwrap();
    let delay = attempts[0].delay_ms.unwrap();
    let gap = attempts[1]
        .started_at
        .millis_since(attempts[0].finished_at.unwrap());
    assert!(gap >= delay, "never early: gap {gap} ms, delay {delay} ms");
    let long_run = d.get_run(long).await.unwrap();
    assert_eq!(
        long_run.status,
        RunStatus::Running,
        "the other attempt was still running"
    );
    release.notify_one();
    d.wait(long, BOUND).await.unwrap();
    handle.shutdown(Duration::from_secs(1)).await;
}

/// Shutdown lets attempts finish within the grace period, then releases the
/// rest so another worker takes them at once, with no attempt budget spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_unfinished_runs() {
    let (d, _clock) = engine();
    let entered = Arc::new(Notify::new());
    let e = entered.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    d.register(
        Job::new("stuck", move |_ctx, _: Value| {
            let (e, c) = (e.clone(), c.clone());
            async move {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    e.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok::<_, JobError>(json!("done"))
            }
        })
        .retry(policy(10_000, 0, 1)),
    )
    .unwrap();
    let id = d.trigger("stuck", json!({})).await.unwrap().run.id;
    let handle = one_worker(&d).start();
    tokio::time::timeout(BOUND, entered.notified())
        .await
        .unwrap();
    assert_eq!(handle.shutdown(Duration::from_millis(20)).await, 1);
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!(
        run.policy_attempt(),
        1,
        "a release spends no attempt budget"
    );
    // max_attempts = 1, so this only completes because the release was free.
    assert_eq!(one_worker(&d).tick().await.unwrap(), 1);
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(h.attempts[0].outcome, "released");
}

/// Shutdown reports every run it released, prefetched ones included: with
/// one handler slot and three prefetched runs, the running attempt finishes
/// within the grace period and the three prefetched runs, which never
/// started, are handed back — 3 released (it said 0: a prefetched run that
/// is released by its own task, after the handler before it finished, was
/// not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_counts_the_prefetched_runs_it_releases() {
    let (d, _clock) = engine();
    let entered = Arc::new(Notify::new());
    let go = Arc::new(Notify::new());
    let (e, g) = (entered.clone(), go.clone());
    d.register(Job::new("slow", move |_ctx, _: Value| {
        let (e, g) = (e.clone(), g.clone());
        async move {
            e.notify_one();
            g.notified().await;
            Ok::<_, JobError>(json!("done"))
        }
    }))
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(d.trigger("slow", json!({ "i": i })).await.unwrap().run.id);
    }
    let handle = d
        .worker(WorkerConfig {
            concurrency: 1,
            prefetch: 3,
            ..Default::default()
        })
        .start();
    tokio::time::timeout(BOUND, entered.notified())
        .await
        .unwrap();
    // All four claimed: one running, three prefetched.
    for id in &ids {
        d.wait_until(*id, BOUND, |r| r.status == RunStatus::Running)
            .await
            .unwrap();
    }
    // Shutdown stops claiming and starting as soon as it is first polled;
    // only then may the running handler finish.
    let mut shutdown = Box::pin(handle.shutdown(BOUND));
    std::future::poll_fn(|cx| {
        let _ = std::future::Future::poll(shutdown.as_mut(), cx);
        std::task::Poll::Ready(())
    })
    .await;
    go.notify_one();
    assert_eq!(shutdown.await, 3, "the three prefetched runs");
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(d.get_run(*id).await.unwrap().status);
    }
    statuses.sort_by_key(|s| s.to_string());
    assert_eq!(
        statuses,
        [
            RunStatus::Completed,
            RunStatus::Pending,
            RunStatus::Pending,
            RunStatus::Pending
        ]
    );
}

/// 8 workers, each with its own connection to one database file, 5,000
/// runs: each completed exactly once, never two attempts under one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_complete_each_run_exactly_once() {
    const RUNS: usize = 5_000;
    let dir = std::env::temp_dir().join(format!("docket-8w-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("docket.db").display());
    let executions: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let total = Arc::new(AtomicUsize::new(0));
    let mut engines = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let d = Docket::open(&url).await.unwrap();
        let (ex, dn, tt) = (executions.clone(), done.clone(), total.clone());
        d.register(Job::new("count", move |ctx, _: Value| {
            let (ex, dn, tt) = (ex.clone(), dn.clone(), tt.clone());
            async move {
                *ex.lock()
                    .unwrap()
                    .entry(ctx.run_id().to_string())
                    .or_default() += 1;
                if tt.fetch_add(1, Ordering::SeqCst) + 1 >= RUNS {
                    dn.notify_one();
                }
                Ok::<_, JobError>(json!(null))
            }
        }))
        .unwrap();
        handles.push(
            d.worker(WorkerConfig {
                concurrency: 4,
                poll_interval: Duration::from_millis(50),
                ..Default::default()
            })
            .start(),
        );
        engines.push(d);
    }
    let batch: Vec<_> = (0..RUNS)
        .map(|i| ("count".to_string(), json!(i), TriggerOptions::default()))
        .collect();
    let ids: Vec<_> = engines[0]
        .trigger_batch(batch)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.run.id)
        .collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        while total.load(Ordering::SeqCst) < RUNS {
            done.notified().await;
        }
    })
    .await
    .expect("all runs executed within the bound");
    for id in &ids {
        assert_eq!(
            engines[0].wait(*id, BOUND).await.unwrap().status,
            RunStatus::Completed
        );
    }
    for h in handles {
        h.shutdown(Duration::from_secs(5)).await;
    }
    {
        let ex = executions.lock().unwrap();
        assert_eq!(ex.len(), RUNS);
        assert!(ex.values().all(|n| *n == 1), "some run executed twice");
    }
    let mut leases = std::collections::HashSet::new();
    let mut workers = std::collections::HashSet::new();
    for id in &ids {
        let att = engines[0].store().attempts(*id).await.unwrap();
        assert_eq!(att.len(), 1);
        assert!(
            leases.insert(att[0].lease_id),
            "two attempts under one lease"
        );
        workers.insert(att[0].worker.clone());
    }
    assert!(workers.len() > 1, "the work was shared between workers");
}

/// An open circuit breaker reschedules the run to its reset time as a retry
/// decision with reason `circuit_open`, consuming no attempt.
#[tokio::test]
async fn circuit_open_defers_without_spending_an_attempt() {
    let (d, clock) = engine();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    d.register(
        Job::new("crm-sync", move |_ctx, _: Value| {
            let c = c.clone();
            async move {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(JobError::circuit_open(
                        "crm",
                        T0.plus_millis(5_000),
                        "breaker `crm` is open",
                    ));
                }
                Ok(json!("synced"))
            }
        })
        .retry(policy(100, 0, 1)),
    )
    .unwrap();
    let id = d.trigger("crm-sync", json!({})).await.unwrap().run.id;
    one_worker(&d).tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!(run.run_after, T0.plus_millis(5_000));
    let att = d.store().attempts(id).await.unwrap();
    assert_eq!(att[0].retry_reason.as_deref(), Some("circuit_open"));
    assert_eq!(att[0].retry_policy.as_deref(), Some("circuit_breaker:crm"));
    assert_eq!(att[0].delay_ms, Some(5_000));
    clock.advance_millis(5_000);
    one_worker(&d).tick().await.unwrap();
    // max_attempts = 1: it completes only because the deferral was free.
    assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Completed);
}

/// A job's concurrency limit caps how many of its runs one worker claims.
#[tokio::test]
async fn job_concurrency_limit_caps_claims() {
    let (d, _clock) = engine();
    d.register(
        Job::new("one-at-a-time", |_ctx, _: Value| async move {
            Ok::<_, JobError>(json!(1))
        })
        .concurrency(1),
    )
    .unwrap();
    d.register(Job::new("free", |_ctx, _: Value| async move {
        Ok::<_, JobError>(json!(1))
    }))
    .unwrap();
    for _ in 0..3 {
        d.trigger("one-at-a-time", json!({})).await.unwrap();
        d.trigger("free", json!({})).await.unwrap();
    }
    let w = d.worker(WorkerConfig {
        concurrency: 8,
        ..Default::default()
    });
    assert_eq!(
        w.tick().await.unwrap(),
        4,
        "3 free runs and 1 of the limited job"
    );
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(w.tick().await.unwrap(), 0);
}

/// `{"a": [{"a": [… 0 …]}]}` nested `depth` levels.
fn nested(depth: usize) -> Value {
    let mut v = json!(0);
    for i in 0..depth {
        v = if i % 2 == 0 {
            json!([v])
        } else {
            json!({ "a": v })
        };
    }
    v
}

/// A handler's output, a step's result, an action's result or an input
/// request nested deeper than the store keeps ends the run `failed` with
/// `content_too_large` and a message naming the value and its depth — one
/// attempt, no retries; within the bound each reads back exactly. A
/// committed action's ledger row says so even when its result is too deep.
#[tokio::test]
async fn values_too_deep_to_store_fail_the_run_naming_the_depth() {
    let (d, _clock) = engine();
    d.register(
        Job::new("deep", |ctx, input: Value| async move {
            let depth = input["depth"].as_u64().unwrap() as usize;
            match input["where"].as_str().unwrap() {
                "step" => {
                    ctx.step("s", || async move { Ok::<_, JobError>(nested(depth)) })
                        .await?;
                }
                "action" => {
                    ctx.action("a", format!("deep-{depth}"), |_key| async move {
                        Ok::<_, JobError>(nested(depth))
                    })
                    .await?;
                }
                "request" => {
                    ctx.wait_for_input("approval", nested(depth)).await?;
                }
                _ => {}
            }
            Ok(nested(depth))
        })
        .retry(policy(10, 0, 5)),
    )
    .unwrap();
    let max = docket_store::MAX_JSON_DEPTH;
    for depth in [10, max, max + 1, 127, 128, 1000] {
        for place in ["output", "step", "action", "request"] {
            let id = d
                .trigger("deep", json!({ "depth": depth, "where": place }))
                .await
                .unwrap()
                .run
                .id;
            assert_eq!(one_worker(&d).tick().await.unwrap(), 1);
            let run = d.get_run(id).await.unwrap();
            let steps = d.store().steps(id).await.unwrap();
            let ledger = d.store().ledger_for_run(id).await.unwrap();
            if depth <= max {
                match place {
                    "request" => {
                        assert_eq!(run.status, RunStatus::NeedsInput, "{place} {depth}");
                        assert_eq!(run.input_request.unwrap()["request"], nested(depth));
                    }
                    _ => {
                        assert_eq!(run.status, RunStatus::Completed, "{place} {depth}");
                        assert_eq!(run.output, Some(nested(depth)));
                    }
                }
                if place == "step" || place == "action" {
                    assert_eq!(steps[0].result, Some(nested(depth)));
                }
                if place == "action" {
                    assert_eq!(ledger[0].result, Some(nested(depth)));
                }
                continue;
            }
            assert_eq!(run.status, RunStatus::Failed, "{place} {depth}: {run:?}");
            assert_eq!(run.attempt, 1, "not retried");
            assert_eq!(run.terminal_reason, Some(TerminalReason::ContentTooLarge));
            let msg = run.last_error_message.unwrap();
            let field = match place {
                "output" => "output",
                "request" => "input_request",
                _ => "result",
            };
            assert!(
                msg.contains(&format!("`{field}` nests {depth} levels"))
                    && msg.contains(&format!("at most {max}")),
                "{place} {depth}: {msg}"
            );
            if place == "action" {
                // The effect happened: committed, with a marker for the
                // result that could not be kept.
                assert_eq!(ledger[0].state, docket_store::LedgerState::Committed);
                let kept = ledger[0].result.as_ref().unwrap();
                assert!(kept["docket_not_stored"]
                    .as_str()
                    .is_some_and(|m| m.contains("nests")));
            }
        }
    }
    // Every run reads back in a list.
    let all = d
        .list_runs(docket_store::RunFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 24);
    assert!(all.iter().all(|r| !serde_json::to_string(r)
        .unwrap()
        .contains("docket_undecodable")));
}

/// A run whose stored input cannot be read back (older data, written
/// before the nesting bound) never reaches its handler: it fails
/// `invalid_input` saying so, and it cannot be retriggered with the marker
/// as its input.
#[tokio::test]
async fn an_undecodable_input_fails_the_run_and_is_not_retriggered() {
    let dir = std::env::temp_dir().join(format!("docket-undecodable-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap().to_string();
    let clock = ManualClock::new(T0);
    let d = Docket::with_store(
        Arc::new(SqliteStore::open(&p).unwrap()),
        Arc::new(clock.clone()),
    );
    let ran = Arc::new(AtomicUsize::new(0));
    let seen = ran.clone();
    d.register(Job::new("echo", move |_ctx, input: Value| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, JobError>(input) }
    }))
    .unwrap();
    let id = d.trigger("echo", json!({"n": 1})).await.unwrap().run.id;
    let c = rusqlite::Connection::open(&p).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = c
        .execute(
            "UPDATE runs SET input = ?1 WHERE id = ?2",
            rusqlite::params![nested(128).to_string(), id.to_string()],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(c);
    assert_eq!(one_worker(&d).tick().await.unwrap(), 1);
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.terminal_reason, Some(TerminalReason::InvalidInput));
    assert!(run
        .last_error_message
        .as_deref()
        .is_some_and(|m| m.contains("stored input cannot be read back")));
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler never ran");
    let err = d
        .retrigger(id, docket::Actor::new("ops", None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, docket::Error::InvalidInput(ref m) if m.contains("cannot be retriggered")),
        "{err}"
    );
}
