//! The engine when the store fails under it (PostgreSQL: its connections
//! are terminated at a chosen moment). Skipped, saying so, without
//! `DOCKET_TEST_POSTGRES_URL`.

use docket::{Docket, Job, JobError, RunStatus, WorkerConfig};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An attempt's end that the store could not take (the worker's connections
/// were terminated while the handler ran) is kept and stored again once the
/// store answers: the run completes on its first attempt, no lease expires,
/// the handler runs once. (Before, the end was dropped and the run came back
/// after its lease expired, as a second attempt.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_the_store_did_not_take_is_stored_again() {
    let Ok(base) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return;
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let app = format!("docket-faults-{tag}");
    let schema = format!("faults_{tag}");
    let sep = if base.contains('?') { '&' } else { '?' };
    let d = Docket::open(&format!(
        "{base}{sep}schema={schema}&application_name={app}"
    ))
    .await
    .unwrap();
    let admin = sqlx::PgPool::connect(&base).await.unwrap();

    let runs = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let (r, c, a, name) = (runs.clone(), cut.clone(), admin.clone(), app.clone());
    d.register(
        Job::new("cut-off", move |_ctx, _: Value| {
            let (r, c, a, name) = (r.clone(), c.clone(), a.clone(), name.clone());
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Every connection of this Docket, hot path included:
                    // storing this attempt's end meets a dead connection.
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                         WHERE application_name = $1",
                    )
                    .bind(&name)
                    .fetch_one(&a)
                    .await
                    .unwrap();
                    c.store(n as usize, Ordering::SeqCst);
                }
                Ok::<_, JobError>(json!("done"))
            }
        })
        .timeout(Duration::from_secs(1))
        .lease(Duration::from_secs(2)),
    )
    .unwrap();
    let handle = d
        .worker(WorkerConfig {
            poll_interval: Duration::from_millis(50),
            reap_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        })
        .start();
    let id = d.trigger("cut-off", json!({})).await.unwrap().run.id;
    let run = d.wait(id, Duration::from_secs(30)).await.unwrap();
    handle.shutdown(Duration::from_secs(5)).await;

    assert!(
        cut.load(Ordering::SeqCst) >= 1,
        "the test cut connections off"
    );
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.attempt, 1, "no second attempt: {run:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    let attempts = d.store().attempts(id).await.unwrap();
    let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["completed"]);

    drop(d);
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .unwrap();
}
