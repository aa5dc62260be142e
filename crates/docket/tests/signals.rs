//! Durable signals through the engine (docs/DURABLE.md, "Signals"): every
//! scenario runs on embedded SQLite and on PostgreSQL (a fresh schema each,
//! with `DOCKET_TEST_POSTGRES_URL`; with `CI` set and no URL the PostgreSQL
//! variants fail instead of skipping), under the injected manual clock.

use docket::signals::SignalOptions;
use docket::Clock;
use docket::{
    Actor, Ctx, Docket, Job, JobError, ManualClock, RunId, RunStatus, Signalled, Timestamp,
    WorkerConfig,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T0: Timestamp = Timestamp(1_767_225_600_000);
const HOUR: Duration = Duration::from_secs(3600);

async fn engine(pg: bool) -> Option<(Docket, ManualClock)> {
    let clock = ManualClock::new(T0);
    let store: docket_store::DynStore = if pg {
        let url = match std::env::var("DOCKET_TEST_POSTGRES_URL") {
            Ok(u) if !u.trim().is_empty() => u,
            _ => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI is set but DOCKET_TEST_POSTGRES_URL is not: the PostgreSQL variants must run"
                );
                println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run the PostgreSQL variant");
                return None;
            }
        };
        let schema = format!("signals_{}", uuid::Uuid::now_v7().simple());
        Arc::new(
            docket_store::postgres::PgStore::connect_with(&url, &schema)
                .await
                .expect("connect to the test database"),
        )
    } else {
        Arc::new(docket_store::sqlite::SqliteStore::open_in_memory().unwrap())
    };
    Some((Docket::with_store(store, Arc::new(clock.clone())), clock))
}

/// Runs each scenario on both backends.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() {
                let (d, c) = super::engine(false).await.unwrap();
                super::$name(d, c).await;
            } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $name() {
                if let Some((d, c)) = super::engine(true).await {
                    super::$name(d, c).await;
                }
            } )*
        }
    };
}

both!(
    a_signal_sent_before_the_wait_is_delivered_when_it_waits,
    a_signal_wakes_a_waiting_run_which_holds_no_lease_and_spends_no_budget,
    a_wait_times_out_under_the_clock_and_the_handler_acts_on_it,
    a_duplicate_signal_id_is_one_signal,
    two_signals_of_one_name_reach_two_waits_in_order,
    a_keyed_signal_wakes_every_run_waiting_for_its_key,
    a_waiting_run_holds_no_worker_slot,
    a_waiting_run_is_cancelled_at_once,
    signals_to_final_or_unknown_runs_are_refused,
);

fn worker(d: &Docket, concurrency: usize) -> docket::Worker {
    d.worker(WorkerConfig {
        concurrency,
        ..Default::default()
    })
}

/// A job that waits for the signal `input.name` (keyed by `input.key` when
/// given), at most an hour, and outputs its payload, or `"timeout"`.
fn waiter(d: &Docket, calls: Arc<AtomicUsize>) {
    d.register(
        Job::new("waiter", move |ctx: Ctx, input: Value| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let name = input["name"].as_str().unwrap_or("paid").to_string();
                let got = match input["key"].as_str() {
                    Some(k) => ctx.wait_for_signal_keyed(&name, k, HOUR).await?,
                    None => ctx.wait_for_signal(&name, HOUR).await?,
                };
                Ok::<_, JobError>(match got {
                    Signalled::Received(s) => json!({"data": s.data, "sent_by": s.sent_by}),
                    Signalled::TimedOut { until } => json!({"timeout": until}),
                })
            }
        })
        .retry(docket::RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }),
    )
    .unwrap();
}

async fn kinds(d: &Docket, id: RunId) -> Vec<String> {
    d.history(id)
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

async fn a_signal_sent_before_the_wait_is_delivered_when_it_waits(d: Docket, _c: ManualClock) {
    waiter(&d, Arc::default());
    let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
    let sent = d
        .signal(id, "paid", json!({"amount": 42}), SignalOptions::default())
        .await
        .unwrap();
    assert!(!sent.woke && !sent.duplicate);
    assert_eq!(sent.signal.sent_by, "rust");
    worker(&d, 1).tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(
        run.output,
        Some(json!({"data": {"amount": 42}, "sent_by": "rust"}))
    );
    assert_eq!(run.attempt, 1, "no suspension was needed");
    let k = kinds(&d, id).await;
    let pos = |kind: &str| k.iter().position(|x| x == kind).unwrap();
    assert!(pos("signal_received") < pos("signal_delivered"));
    assert!(pos("signal_delivered") < pos("run_completed"));
}

async fn a_signal_wakes_a_waiting_run_which_holds_no_lease_and_spends_no_budget(
    d: Docket,
    c: ManualClock,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    waiter(&d, calls.clone());
    let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
    let w = worker(&d, 1);
    w.tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Postponed);
    assert_eq!(run.lease_id, None, "a waiting run holds no lease");
    assert_eq!(
        run.run_after,
        T0.plus_millis(3_600_000),
        "due at the timeout"
    );
    let waits = d.signal_waits(id).await.unwrap();
    assert_eq!(
        (waits[0].wait.as_str(), waits[0].name.as_str()),
        ("signal:paid:1", "paid")
    );
    c.advance_millis(60_000);
    let now = c.now();
    let sent = d
        .signal(
            id,
            "paid",
            json!("settled"),
            SignalOptions {
                sent_by: Some("ops-alice".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(sent.woke);
    assert_eq!(d.get_run(id).await.unwrap().run_after, now, "due now");
    assert_eq!(w.tick().await.unwrap(), 1);
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(
        run.output,
        Some(json!({"data": "settled", "sent_by": "ops-alice"}))
    );
    assert_eq!(
        (run.attempt, run.attempts_forgiven),
        (2, 1),
        "no budget spent"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let signals = d.signals(id).await.unwrap();
    assert_eq!(signals[0].delivered_to.as_deref(), Some("signal:paid:1"));
    assert!(d.signal_waits(id).await.unwrap().is_empty());
}

async fn a_wait_times_out_under_the_clock_and_the_handler_acts_on_it(d: Docket, c: ManualClock) {
    waiter(&d, Arc::default());
    let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
    let w = worker(&d, 1);
    w.tick().await.unwrap();
    c.advance_millis(3_599_999);
    assert_eq!(w.tick().await.unwrap(), 0, "not due a millisecond early");
    c.advance_millis(1);
    assert_eq!(w.tick().await.unwrap(), 1);
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(
        run.output,
        Some(json!({"timeout": T0.plus_millis(3_600_000)}))
    );
    assert!(kinds(&d, id)
        .await
        .contains(&"signal_timed_out".to_string()));
}

async fn a_duplicate_signal_id_is_one_signal(d: Docket, _c: ManualClock) {
    waiter(&d, Arc::default());
    let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
    let opts = || SignalOptions {
        signal_id: Some("evt-1".into()),
        ..Default::default()
    };
    let first = d.signal(id, "paid", json!(1), opts()).await.unwrap();
    let second = d.signal(id, "paid", json!(2), opts()).await.unwrap();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(second.signal, first.signal);
    assert_eq!(d.signals(id).await.unwrap().len(), 1);
    worker(&d, 1).tick().await.unwrap();
    assert_eq!(
        d.get_run(id).await.unwrap().output,
        Some(json!({"data": 1, "sent_by": "rust"}))
    );
}

async fn two_signals_of_one_name_reach_two_waits_in_order(d: Docket, _c: ManualClock) {
    d.register(Job::new("two", |ctx: Ctx, _: Value| async move {
        let mut got = Vec::new();
        for _ in 0..2 {
            let s = ctx.wait_for_signal("item", HOUR).await?;
            got.push(s.into_signal().map(|s| s.data));
        }
        Ok::<_, JobError>(json!(got))
    }))
    .unwrap();
    let id = d.trigger("two", json!({})).await.unwrap().run.id;
    let w = worker(&d, 1);
    w.tick().await.unwrap();
    d.signal(id, "item", json!("a"), SignalOptions::default())
        .await
        .unwrap();
    d.signal(id, "item", json!("b"), SignalOptions::default())
        .await
        .unwrap();
    w.tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(run.output, Some(json!(["a", "b"])));
    let steps: Vec<String> = d
        .history(id)
        .await
        .unwrap()
        .steps
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(steps.contains(&"signal:item:1".to_string()));
    assert!(steps.contains(&"signal:item:2".to_string()));
}

async fn a_keyed_signal_wakes_every_run_waiting_for_its_key(d: Docket, _c: ManualClock) {
    waiter(&d, Arc::default());
    let mut ids = Vec::new();
    for key in ["order-42", "order-42", "order-42", "order-43"] {
        ids.push(
            d.trigger("waiter", json!({"name": "settled", "key": key}))
                .await
                .unwrap()
                .run
                .id,
        );
    }
    let w = worker(&d, 4);
    assert_eq!(w.tick().await.unwrap(), 4);
    let sent = d
        .signal_by_key(
            docket::DEFAULT_TENANT,
            "settled",
            "order-42",
            json!({"order": 42}),
            SignalOptions::default(),
        )
        .await
        .unwrap();
    let mut woke: Vec<RunId> = sent
        .iter()
        .filter(|s| s.woke)
        .map(|s| s.signal.run_id)
        .collect();
    woke.sort();
    assert_eq!(woke, ids[..3].to_vec());
    assert_eq!(w.tick().await.unwrap(), 3);
    for id in &ids[..3] {
        let run = d.get_run(*id).await.unwrap();
        assert_eq!(run.status, RunStatus::Completed);
        assert_eq!(run.output.unwrap()["data"], json!({"order": 42}));
    }
    assert_eq!(
        d.get_run(ids[3]).await.unwrap().status,
        RunStatus::Postponed
    );
    // Another tenant's keyed send reaches none of them.
    let other = d
        .signal_by_key(
            "globex",
            "settled",
            "order-43",
            json!(1),
            SignalOptions::default(),
        )
        .await
        .unwrap();
    assert!(other.is_empty());
}

/// With one worker slot, a run waiting for a signal does not block another
/// run: it is postponed, not running.
async fn a_waiting_run_holds_no_worker_slot(d: Docket, _c: ManualClock) {
    waiter(&d, Arc::default());
    d.register(Job::new("quick", |_ctx: Ctx, _: Value| async move {
        Ok::<_, JobError>(json!("done"))
    }))
    .unwrap();
    let w = worker(&d, 1);
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
        w.tick().await.unwrap();
        waiting.push(id);
    }
    let quick = d.trigger("quick", json!({})).await.unwrap().run.id;
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(d.get_run(quick).await.unwrap().status, RunStatus::Completed);
    for id in waiting {
        assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Postponed);
    }
}

async fn a_waiting_run_is_cancelled_at_once(d: Docket, _c: ManualClock) {
    waiter(&d, Arc::default());
    let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
    worker(&d, 1).tick().await.unwrap();
    let run = d.cancel(id, Actor::new("ops", None)).await.unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    let e = d
        .signal(id, "paid", json!(1), SignalOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
}

async fn signals_to_final_or_unknown_runs_are_refused(d: Docket, _c: ManualClock) {
    let unknown = RunId::new();
    assert!(matches!(
        d.signal(unknown, "paid", json!(1), SignalOptions::default()).await,
        Err(docket::Error::RunNotFound(r)) if r == unknown
    ));
    waiter(&d, Arc::default());
    let id = d.trigger("waiter", json!({})).await.unwrap().run.id;
    assert!(matches!(
        d.signal(id, "bad name", json!(1), SignalOptions::default()).await,
        Err(docket::Error::InvalidInput(m)) if m.contains("`name`")
    ));
    let big = json!("x".repeat(docket_store::signals::MAX_SIGNAL_BYTES));
    assert!(matches!(
        d.signal(id, "paid", big, SignalOptions::default()).await,
        Err(docket::Error::ContentTooLarge { .. })
    ));
    let opts = SignalOptions {
        tenant: Some("globex".into()),
        ..Default::default()
    };
    assert!(matches!(
        d.signal(id, "paid", json!(1), opts).await,
        Err(docket::Error::RunNotFound(_))
    ));
    assert!(d.signals(id).await.unwrap().is_empty());
}
