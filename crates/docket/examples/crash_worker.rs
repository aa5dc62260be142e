//! A worker process for the crash test (`tests/durable.rs`), and an example
//! of a multi-step job with a guarded side effect.
//!
//! DB is a store URL (`sqlite://PATH` or `postgres://…?schema=NAME`).
//! `crash_worker DB COUNTS REMOTE crash` triggers one run and dies by
//! `abort()` in the middle of its third step (an action whose remote side has
//! already committed). `crash_worker DB COUNTS REMOTE resume` runs a worker
//! until that run is terminal: after the dead attempt's lease expires, steps
//! 1 and 2 come from storage and the action is reconciled, not repeated.
//! COUNTS gets one line per closure execution; REMOTE plays the provider.

use docket::{
    intent_key, Ctx, Docket, Job, JobError, Reconciled, RetryPolicy, RunStatus, WorkerConfig,
};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

fn append(path: &PathBuf, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open");
    writeln!(f, "{line}").expect("write");
    f.sync_all().expect("sync");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, db, counts, remote, mode] = &args[..] else {
        eprintln!("usage: crash_worker DB COUNTS REMOTE crash|resume");
        std::process::exit(2);
    };
    let (counts, remote) = (PathBuf::from(counts), PathBuf::from(remote));
    let crash = mode == "crash";
    let docket = Docket::open(db).await.expect("open");
    let (c, r) = (counts.clone(), remote.clone());
    docket
        .register(
            Job::new("crashy", move |ctx: Ctx, input: Value| {
                let (c, r) = (c.clone(), r.clone());
                async move {
                    for i in 1..=2 {
                        ctx.step(format!("step-{i}"), || async {
                            append(&c, &format!("step-{i}"));
                            Ok(i)
                        })
                        .await?;
                    }
                    let order = input["order"].as_str().unwrap_or("order-1").to_string();
                    let (c2, r2, r3) = (c.clone(), r.clone(), r.clone());
                    ctx.action_with_reconcile(
                        "charge",
                        intent_key([order.as_str(), "charge", "v1"]),
                        None,
                        move |key| async move {
                            let seen = std::fs::read_to_string(&r3).unwrap_or_default();
                            Ok(if seen.lines().any(|l| l == key) {
                                Reconciled::Committed(json!({ "charge": key }))
                            } else {
                                Reconciled::NotDone
                            })
                        },
                        move |key| async move {
                            append(&c2, "charge");
                            append(&r2, &key);
                            if crash {
                                // The provider committed; the worker dies
                                // before it hears back.
                                std::process::abort();
                            }
                            Ok(json!({ "charge": key }))
                        },
                    )
                    .await?;
                    ctx.step("step-4", || async {
                        append(&c, "step-4");
                        Ok(4)
                    })
                    .await?;
                    Ok::<_, JobError>(json!("done"))
                }
            })
            .lease(Duration::from_secs(1))
            .timeout(Duration::from_millis(900))
            .retry(RetryPolicy {
                base_delay_ms: 10,
                jitter_ms: 0,
                ..RetryPolicy::default()
            }),
        )
        .expect("register");
    if crash {
        docket
            .trigger("crashy", json!({ "order": "order-7" }))
            .await
            .expect("trigger");
        docket
            .worker(WorkerConfig {
                concurrency: 1,
                ..Default::default()
            })
            .tick()
            .await
            .expect("tick");
        eprintln!("crash_worker: the run finished without crashing");
        std::process::exit(3);
    }
    let run = docket
        .list_runs(Default::default())
        .await
        .expect("list")
        .remove(0);
    let worker = docket
        .worker(WorkerConfig {
            concurrency: 1,
            poll_interval: Duration::from_millis(50),
            reap_interval: Duration::from_millis(100),
            ..Default::default()
        })
        .start();
    let done = docket
        .wait(run.id, Duration::from_secs(20))
        .await
        .expect("wait");
    worker.shutdown(Duration::from_secs(2)).await;
    std::process::exit(if done.status == RunStatus::Completed {
        0
    } else {
        1
    });
}
