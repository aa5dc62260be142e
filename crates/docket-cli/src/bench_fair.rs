//! `docket bench fairness`: how long tenant B's runs wait while tenant A
//! has a backlog (docs/FLOW_CONTROL.md, "Tenant fairness").
//!
//! Two phases, each in a fresh database, one worker (concurrency 8, the
//! default prefetch): without a backlog, then with `--runs` (default
//! 100,000) runs of tenant A enqueued first, all due. A's handler takes
//! 1 ms (it stands for real work, so the backlog lasts while B is
//! measured). In each phase B triggers 200 runs one at a time, 20 a
//! second; B's pickup latency is handler start − trigger return. The
//! backlog phase checks that A still had runs waiting when B's last run
//! started, so every B run was measured against the backlog, and reports
//! how many A runs were still pending then.

use docket::{Docket, Job, JobError, TriggerOptions, WorkerConfig};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// B's runs per phase.
const B_RUNS: usize = 200;
/// B's trigger interval.
const B_EVERY: Duration = Duration::from_millis(50);
/// How long B's runs may take to start, all told.
const BOUND: Duration = Duration::from_secs(120);

#[derive(Serialize, Debug)]
struct PhaseReport {
    workload: &'static str,
    backend: String,
    backlog: usize,
    b_runs: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    a_pending_at_end: Option<i64>,
}

/// Runs both phases and prints one line (or JSON object) per phase.
pub async fn run(url: Option<&str>, runs: Option<usize>, json_out: bool) -> Result<(), BoxError> {
    let backlog = runs.unwrap_or(100_000);
    let mut reports = Vec::new();
    for n in [0, backlog] {
        let db = crate::bench::Db::fresh(url).await?;
        let r = phase(&db, n).await;
        db.cleanup().await;
        reports.push(r?);
    }
    for r in &reports {
        if json_out {
            outln!("{}", serde_json::to_string(r)?);
        } else {
            outln!(
                "fairness {:<8} backlog {:>7}  B pickup p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms{}",
                r.backend,
                r.backlog,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.a_pending_at_end
                    .map(|n| format!("  (A still pending at the end: {n})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

async fn phase(db: &crate::bench::Db, backlog: usize) -> Result<PhaseReport, BoxError> {
    let d = Docket::open(&db.url).await?;
    d.register(Job::new("a-work", |_ctx, _: Value| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, JobError>(Value::Null)
    }))?;
    let starts: Arc<Mutex<HashMap<docket::RunId, Instant>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (s, c, n) = (starts.clone(), count.clone(), done.clone());
    d.register(Job::new("b-pickup", move |ctx, _: Value| {
        s.lock()
            .expect("starts")
            .insert(ctx.run_id(), Instant::now());
        c.fetch_add(1, Ordering::SeqCst);
        n.notify_one();
        async move { Ok::<_, JobError>(Value::Null) }
    }))?;
    enqueue_backlog(&d, backlog).await?;
    let handle = d
        .worker(WorkerConfig {
            concurrency: 8,
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        })
        .start();
    let b = |i: usize| {
        let d = d.clone();
        async move {
            d.trigger_with(
                "b-pickup",
                json!({ "i": i }),
                TriggerOptions {
                    tenant: Some("tenant-b".into()),
                    ..Default::default()
                },
            )
            .await
        }
    };
    // Warm up: the first trigger pays for statement preparation.
    b(usize::MAX).await?;
    crate::bench::wait_count(&count, &done, 1, BOUND).await?;
    let mut returned = Vec::with_capacity(B_RUNS);
    let mut tick = tokio::time::interval(B_EVERY);
    for i in 0..B_RUNS {
        tick.tick().await;
        let id = b(i).await?.run.id;
        returned.push((id, Instant::now()));
    }
    crate::bench::wait_count(&count, &done, B_RUNS + 1, BOUND).await?;
    let a_pending = if backlog > 0 {
        let counts = d.store().count_runs(Some("tenant-a".into())).await?;
        Some(
            counts
                .iter()
                .filter(|c| c.status == docket::RunStatus::Pending)
                .map(|c| c.count)
                .sum::<i64>(),
        )
    } else {
        None
    };
    handle.shutdown(Duration::from_secs(5)).await;
    let mut lat: Vec<f64> = {
        let starts = starts.lock().expect("starts");
        returned
            .iter()
            .map(|(id, ret)| starts[id].saturating_duration_since(*ret).as_secs_f64() * 1_000.0)
            .collect()
    };
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    if a_pending == Some(0) {
        return Err(format!(
            "tenant A's backlog of {backlog} drained before B's last run started: \
             use a larger --runs so every B run is measured against it"
        )
        .into());
    }
    Ok(PhaseReport {
        workload: "fairness",
        backend: db.backend.clone(),
        backlog,
        b_runs: B_RUNS,
        p50_ms: crate::bench::percentile(&lat, 50.0),
        p99_ms: crate::bench::percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
        a_pending_at_end: a_pending,
    })
}

/// Tenant A's backlog, due now, in batches of 1,000.
async fn enqueue_backlog(d: &Docket, n: usize) -> Result<(), BoxError> {
    let mut left = n;
    while left > 0 {
        let k = left.min(1_000);
        let batch: Vec<(String, Value, TriggerOptions)> = (0..k)
            .map(|i| {
                (
                    "a-work".to_string(),
                    json!({ "i": i }),
                    TriggerOptions {
                        tenant: Some("tenant-a".into()),
                        ..Default::default()
                    },
                )
            })
            .collect();
        d.trigger_batch(batch).await?;
        left -= k;
    }
    Ok(())
}
