//! Child runs through the engine (`ctx.spawn`, `ctx.spawn_many`,
//! `ctx.join`), on SQLite and on PostgreSQL (`DOCKET_TEST_POSTGRES_URL`,
//! a fresh schema per test; with `CI=true` a missing URL fails), with the
//! injected clock.

use docket::{
    Actor, ChildPolicy, Ctx, Docket, ErrorClass, Job, JobError, ManualClock, RetryPolicy,
    RunStatus, SpawnOptions, StepStatus, Timestamp, WorkerConfig,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T0: Timestamp = Timestamp(1_767_225_600_000);
const BOUND: Duration = Duration::from_secs(60);

async fn engine(url: &str) -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = docket_store::open(url).await.unwrap();
    (Docket::with_store(store, Arc::new(clock.clone())), clock)
}

fn pg_url(prefix: &str) -> Option<String> {
    match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(base) if !base.trim().is_empty() => {
            let sep = if base.contains('?') { '&' } else { '?' };
            Some(format!(
                "{base}{sep}schema={prefix}_{}",
                uuid::Uuid::new_v4().simple()
            ))
        }
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: DOCKET_TEST_POSTGRES_URL must be set"
            );
            println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
            None
        }
    }
}

/// One test on both backends.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (d, clock) = super::engine("sqlite::memory:").await;
                super::$name(d, clock).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(url) = super::pg_url("children") else {
                    return;
                };
                let (d, clock) = super::engine(&url).await;
                super::$name(d, clock).await;
            }
        }
    };
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        name: "fast".into(),
        base_delay_ms: 100,
        multiplier: 1.0,
        max_delay_ms: 100,
        max_attempts,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    }
}

fn worker(d: &Docket, concurrency: usize) -> docket::Worker {
    d.worker(WorkerConfig {
        concurrency,
        ..Default::default()
    })
}

/// Ticks until a tick claims nothing (bounded).
async fn drain(w: &docket::Worker) {
    for _ in 0..10_000 {
        if w.tick().await.unwrap() == 0 {
            return;
        }
    }
    panic!("the queue never drained");
}

fn register_echo(d: &Docket) {
    d.register(Job::new("echo", |_ctx: Ctx, input: Value| async move {
        Ok::<_, JobError>(json!({ "echo": input }))
    }))
    .unwrap();
}

/// A crash between the spawn and the next step (the attempt fails after
/// spawning) replays the spawn: the same children, never a second set. The
/// children inherit tenant and correlation id and link to the parent; the
/// join returns their outputs in order; the join spends no budget.
async fn spawn_is_exactly_once_across_a_replay(d: Docket, clock: ManualClock) {
    register_echo(&d);
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    d.register(
        Job::new("parent", move |ctx: Ctx, _: Value| {
            let a = a.clone();
            async move {
                let mut hs = Vec::new();
                for i in 0..3 {
                    // Below the parent's priority, so that the one-slot
                    // worker below claims the parent before the children.
                    let low = SpawnOptions {
                        priority: -1,
                        ..Default::default()
                    };
                    hs.push(ctx.spawn(format!("c{i}"), "echo", json!(i), low).await?);
                }
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(JobError::unavailable(
                        "the worker died right after spawning",
                    ));
                }
                let out = ctx.join(&hs).await?;
                let outs: Vec<Value> = out
                    .into_iter()
                    .map(|r| r.into_output())
                    .collect::<Result<_, _>>()?;
                Ok::<_, JobError>(json!(outs))
            }
        })
        .retry(policy(2)),
    )
    .unwrap();
    let id = d
        .trigger_with(
            "parent",
            json!({}),
            docket::TriggerOptions {
                tenant: Some("acme".into()),
                correlation_id: Some("order-42".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run
        .id;
    let w = worker(&d, 1);
    // Attempt 1 spawns, then fails.
    w.tick().await.unwrap();
    assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Pending);
    clock.advance_millis(100);
    // Attempt 2 replays the spawns and joins (the children are not done).
    w.tick().await.unwrap();
    let parent = d.get_run(id).await.unwrap();
    assert_eq!(parent.status, RunStatus::Postponed);
    assert_eq!(parent.lease_id, None, "a joining run holds no lease");
    let kids = d.store().children(id, None, 0).await.unwrap();
    assert_eq!(kids.len(), 3, "the replay found the same children");
    for k in &kids {
        assert_eq!(k.parent_id, Some(id));
        assert_eq!(k.tenant, "acme");
        assert_eq!(k.correlation_id.as_deref(), Some("order-42"));
    }
    drain(&w).await;
    let parent = d.get_run(id).await.unwrap();
    assert_eq!(parent.status, RunStatus::Completed, "{parent:?}");
    assert_eq!(
        parent.output,
        Some(json!([{"echo": 0}, {"echo": 1}, {"echo": 2}]))
    );
    assert_eq!(d.store().children(id, None, 0).await.unwrap().len(), 3);
    // Attempts: fail, join, finish; only the failure spent budget.
    assert_eq!((parent.attempt, parent.attempts_forgiven), (3, 1));
    let h = d.history(id).await.unwrap();
    let spawned = h
        .events
        .iter()
        .filter(|e| e.kind == "child_spawned")
        .count();
    assert_eq!(spawned, 3);
    assert!(h
        .steps
        .iter()
        .filter(|s| s.name.starts_with("spawn:"))
        .all(|s| s.status == StepStatus::Completed));
}
both!(spawn_is_exactly_once_across_a_replay);

/// A fan-out of 1,000 whose worker dies in the middle of spawning (after
/// the first batch, holding its lease): once the lease expires, the next
/// attempt finds the 500 spawned children and spawns the other 500 — no
/// duplicate — joins, and completes when the last child ends.
async fn fan_out_of_1000_survives_a_killed_worker(d: Docket, clock: ManualClock) {
    register_echo(&d);
    let attempts = Arc::new(AtomicUsize::new(0));
    let spawned_half = Arc::new(tokio::sync::Notify::new());
    let (a, half) = (attempts.clone(), spawned_half.clone());
    d.register(
        Job::new("fan", move |ctx: Ctx, _: Value| {
            let (a, half) = (a.clone(), half.clone());
            async move {
                let all: Vec<(String, String, Value)> = (0..1000)
                    .map(|i| (format!("c{i}"), "echo".to_string(), json!(i)))
                    .collect();
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first batch is stored; then the process "dies":
                    // it never reports and never heartbeats again.
                    ctx.spawn_many(all[..500].to_vec(), SpawnOptions::default())
                        .await?;
                    half.notify_one();
                    std::future::pending::<()>().await;
                }
                let hs = ctx.spawn_many(all, SpawnOptions::default()).await?;
                let rs = ctx.join(&hs).await?;
                let done = rs.iter().filter(|r| r.is_completed()).count();
                Ok::<_, JobError>(json!({ "children": hs.len(), "completed": done }))
            }
        })
        .retry(policy(3))
        .timeout(Duration::from_secs(20))
        .lease(Duration::from_secs(30)),
    )
    .unwrap();
    let id = d.trigger("fan", json!({})).await.unwrap().run.id;
    let dying = worker(&d, 1);
    let killed = tokio::spawn(async move { dying.tick().await });
    tokio::time::timeout(BOUND, spawned_half.notified())
        .await
        .expect("the first batch was spawned");
    killed.abort();
    assert_eq!(d.store().family(id).await.unwrap().unwrap().children, 500);
    // The lease (30 s) runs out; another worker reaps it and,
    // after the retry delay, runs the parent again.
    clock.advance_millis(31_000);
    let w = worker(&d, 250);
    w.tick().await.unwrap(); // reaps, claims 250 of the first children
    clock.advance_millis(100);
    drain(&w).await;
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(
        run.output,
        Some(json!({"children": 1000, "completed": 1000}))
    );
    let mut kids = Vec::new();
    let mut after = None;
    loop {
        let page = d.store().children(id, after, 400).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        kids.extend(page);
    }
    assert_eq!(kids.len(), 1000, "no duplicate child");
    let inputs: HashSet<String> = kids.iter().map(|k| k.input.to_string()).collect();
    assert_eq!(inputs.len(), 1000);
    assert!(kids.iter().all(|k| k.status == RunStatus::Completed));
    // The joining parent was woken once, by the last child: attempts are
    // the killed one, the spawn-and-join, and the final one.
    assert_eq!(run.attempt, 3);
}
both!(fan_out_of_1000_survives_a_killed_worker);

/// The parent decides what a failed child means: fail, continue without
/// it, or retry it and join again.
async fn a_failed_child_under_each_parent_choice(d: Docket, clock: ManualClock) {
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let f = flaky_calls.clone();
    d.register(
        Job::new("flaky", move |_ctx: Ctx, _: Value| {
            let f = f.clone();
            async move {
                // Fails for good the first time, succeeds once retried.
                if f.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(JobError::permanent("bad luck"));
                }
                Ok::<_, JobError>(json!("ok"))
            }
        })
        .retry(policy(1)),
    )
    .unwrap();
    d.register(
        Job::new("boom", |_ctx: Ctx, _: Value| async move {
            Err::<Value, _>(JobError::permanent("always"))
        })
        .retry(policy(1)),
    )
    .unwrap();
    d.register(Job::new("parent", |ctx: Ctx, input: Value| async move {
        let choice = input["choice"].as_str().unwrap_or("fail").to_string();
        let job = if choice == "retry" { "flaky" } else { "boom" };
        let h = ctx
            .spawn("only", job, json!({}), SpawnOptions::default())
            .await?;
        let r = ctx.join(std::slice::from_ref(&h)).await?.remove(0);
        match choice.as_str() {
            "fail" => Ok(r.into_output()?),
            "continue" => Ok(json!({ "child": r.status.as_str() })),
            _ => {
                if !r.is_completed() {
                    ctx.retry_child(&h).await?;
                    ctx.join(std::slice::from_ref(&h)).await?;
                }
                Ok(json!({ "child": "retried" }))
            }
        }
    }))
    .unwrap();
    let w = worker(&d, 4);
    let mut ids = Vec::new();
    for choice in ["fail", "continue", "retry"] {
        ids.push(
            d.trigger("parent", json!({ "choice": choice }))
                .await
                .unwrap()
                .run
                .id,
        );
    }
    drain(&w).await;
    clock.advance_millis(100);
    drain(&w).await;
    let fail = d.get_run(ids[0]).await.unwrap();
    assert_eq!(fail.status, RunStatus::Failed);
    assert_eq!(fail.last_error_class, Some(ErrorClass::Permanent));
    assert!(fail.last_error_message.unwrap().contains("child `only`"));
    let cont = d.get_run(ids[1]).await.unwrap();
    assert_eq!(cont.status, RunStatus::Completed);
    assert_eq!(cont.output, Some(json!({"child": "failed"})));
    let retried = d.get_run(ids[2]).await.unwrap();
    assert_eq!(retried.status, RunStatus::Completed, "{retried:?}");
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 2);
}
both!(a_failed_child_under_each_parent_choice);

/// Spawning a job nobody registered fails the parent's step
/// `invalid_input`, naming the job; nothing is spawned.
async fn spawning_an_unknown_job_fails_the_step(d: Docket, _clock: ManualClock) {
    d.register(Job::new("parent", |ctx: Ctx, _: Value| async move {
        ctx.spawn("x", "no-such-job", json!({}), SpawnOptions::default())
            .await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    let id = d.trigger("parent", json!({})).await.unwrap().run.id;
    worker(&d, 1).tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.last_error_class, Some(ErrorClass::InvalidInput));
    assert!(run.last_error_message.unwrap().contains("no-such-job"));
    let h = d.history(id).await.unwrap();
    let step = h.steps.iter().find(|s| s.name == "spawn:x").unwrap();
    assert_eq!(step.status, StepStatus::Failed);
    assert!(d.store().children(id, None, 0).await.unwrap().is_empty());
}
both!(spawning_an_unknown_job_fails_the_step);

/// Cancelling a joining parent cancels its `cancel` children at once and
/// leaves its `abandon` children running on their own.
async fn cancel_cascades_by_policy(d: Docket, _clock: ManualClock) {
    d.register(Job::new("hold", |ctx: Ctx, _: Value| async move {
        ctx.wait_for_input("go", json!({})).await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    d.register(Job::new("parent", |ctx: Ctx, _: Value| async move {
        let a = ctx
            .spawn("a", "hold", json!({}), SpawnOptions::default())
            .await?;
        let b = ctx
            .spawn(
                "b",
                "hold",
                json!({}),
                SpawnOptions {
                    policy: ChildPolicy::Abandon,
                    ..Default::default()
                },
            )
            .await?;
        ctx.join(&[a, b]).await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    let id = d.trigger("parent", json!({})).await.unwrap().run.id;
    drain(&worker(&d, 4)).await;
    let kids = d.store().children(id, None, 0).await.unwrap();
    assert!(kids.iter().all(|k| k.status == RunStatus::NeedsInput));
    let fam = d.store().family(id).await.unwrap().unwrap();
    assert_eq!(fam.waiting.map(|w| (w.waiting, w.of)), Some((2, 2)));
    let run = d
        .cancel(id, Actor::new("ops-alice", Some("not needed".into())))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(
        d.get_run(kids[0].id).await.unwrap().status,
        RunStatus::Cancelled
    );
    assert_eq!(
        d.get_run(kids[1].id).await.unwrap().status,
        RunStatus::NeedsInput
    );
    let h = d.history(kids[0].id).await.unwrap();
    let last = h.events.last().unwrap();
    assert_eq!(last.kind, "cancelled_with_parent");
    assert_eq!(last.actor.as_deref(), Some("ops-alice"));
}
both!(cancel_cascades_by_policy);

/// With worker concurrency 2, 100 parents joining children that wait for
/// a person hold no slot: a new run is picked up and completes at once.
async fn joining_parents_hold_no_slot(d: Docket, _clock: ManualClock) {
    d.register(Job::new("hold", |ctx: Ctx, _: Value| async move {
        ctx.wait_for_input("go", json!({})).await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    d.register(Job::new("parent", |ctx: Ctx, _: Value| async move {
        let h = ctx
            .spawn("a", "hold", json!({}), SpawnOptions::default())
            .await?;
        ctx.join(&[h]).await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    d.register(Job::new("quick", |_ctx: Ctx, _: Value| async move {
        Ok::<_, JobError>(json!("done"))
    }))
    .unwrap();
    let mut parents = Vec::new();
    for _ in 0..100 {
        parents.push(d.trigger("parent", json!({})).await.unwrap().run.id);
    }
    let handle = worker(&d, 2).start();
    for p in &parents {
        d.wait_until(*p, BOUND, |r| r.status == RunStatus::Postponed)
            .await
            .unwrap();
    }
    assert_eq!(d.store().count_joining(None).await.unwrap(), 100);
    let q = d.trigger("quick", json!({})).await.unwrap().run.id;
    let run = d.wait(q, BOUND).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    handle.shutdown(Duration::from_secs(5)).await;
}
both!(joining_parents_hold_no_slot);
