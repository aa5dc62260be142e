//! `docket bench bulk-retry`: issue 15's bulk measurement. `--runs`
//! (default 10,000) runs fail; then, through a real server on a loopback
//! port, `POST /api/runs/bulk` retries every failed run by filter, page by
//! page with the cursor (500 runs per call), while a second client keeps
//! calling `GET /api/runs?limit=50`. Reported: the bulk's wall time and
//! rate, the latency of the concurrent `GET /api/runs` (p50/p99/max, and
//! the same measured for 2 s before the bulk as a baseline), and the checks
//! that make the figures mean something: every run was retried (none left
//! failed) and every run has its own `operator_retry` audit event with the
//! bulk's actor and comment.
//!
//! The worker is stopped before the bulk, so retried runs stay pending and
//! the measurement is the API's and the store's alone.

use crate::bench::Db;
use docket::{Docket, Job, JobError, RunStatus, TriggerOptions, WorkerConfig};
use docket_server::{auth, Server, ServerConfig};
use docket_store::{EventFilter, DEFAULT_TENANT};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const JOB: &str = "bulk-fail";
const COMMENT: &str = "bench bulk retry";
const PAGE: usize = 500;

#[derive(Serialize, Debug)]
struct BulkReport {
    workload: &'static str,
    backend: String,
    runs: usize,
    page: usize,
    dry_run_matched: usize,
    dry_run_ms: f64,
    bulk_s: f64,
    bulk_runs_per_s: f64,
    bulk_calls: usize,
    succeeded: usize,
    refused: usize,
    left_failed: i64,
    audited_runs: usize,
    list_requests: usize,
    list_p50_ms: f64,
    list_p99_ms: f64,
    list_max_ms: f64,
    baseline_list_p50_ms: f64,
    baseline_list_p99_ms: f64,
}

async fn count(d: &Docket, status: RunStatus) -> Result<i64, BoxError> {
    Ok(d.store()
        .count_runs(None)
        .await?
        .iter()
        .filter(|c| c.job == JOB && c.status == status)
        .map(|c| c.count)
        .sum())
}

/// `GET /api/runs?limit=50` in a loop until `stop`; the latencies in ms.
async fn lister(
    http: reqwest::Client,
    base: String,
    token: String,
    stop: Arc<AtomicBool>,
) -> Result<Vec<f64>, BoxError> {
    let mut out = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        let res = http
            .get(format!("{base}/api/runs?limit=50"))
            .bearer_auth(&token)
            .send()
            .await?;
        let status = res.status();
        res.bytes().await?;
        if !status.is_success() {
            return Err(format!("GET /api/runs: {status}").into());
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    crate::bench::percentile(sorted, p)
}

/// Runs `docket bench bulk-retry`.
pub async fn run(db: Option<&str>, runs: Option<usize>, json_out: bool) -> Result<(), BoxError> {
    let total = runs.unwrap_or(10_000);
    if total == 0 {
        return Err("--runs must be at least 1".into());
    }
    let db = Db::fresh(db).await?;
    let result = measure(&db, total).await;
    db.cleanup().await;
    let r = result?;
    if json_out {
        outln!("{}", serde_json::to_string(&r)?);
    } else {
        outln!(
            "bulk retry of {} failed runs ({}): {:.1} s, {:.0} runs/s in {} calls of {}; {} retried, {} refused, {} left failed, {} runs audited",
            r.runs, r.backend, r.bulk_s, r.bulk_runs_per_s, r.bulk_calls, r.page, r.succeeded, r.refused, r.left_failed, r.audited_runs
        );
        outln!(
            "dry run: {} matched in {:.0} ms",
            r.dry_run_matched,
            r.dry_run_ms
        );
        outln!(
            "concurrent GET /api/runs?limit=50: {} requests, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (idle baseline: p50 {:.1} ms, p99 {:.1} ms)",
            r.list_requests, r.list_p50_ms, r.list_p99_ms, r.list_max_ms, r.baseline_list_p50_ms, r.baseline_list_p99_ms
        );
    }
    if r.succeeded != total || r.left_failed != 0 || r.audited_runs != total {
        return Err(format!(
            "expected {total} runs retried and audited: {} retried, {} left failed, {} audited",
            r.succeeded, r.left_failed, r.audited_runs
        )
        .into());
    }
    Ok(())
}

async fn measure(db: &Db, total: usize) -> Result<BulkReport, BoxError> {
    let d = Docket::open(&db.url).await?;
    d.register(Job::new(JOB, |_ctx, _: Value| async move {
        Err::<Value, _>(JobError::permanent("the bench's job always fails"))
    }))?;
    // The failed runs: triggered in batches, failed by a worker.
    let worker = d
        .worker(WorkerConfig {
            concurrency: 8,
            ..Default::default()
        })
        .start();
    let mut triggered = 0;
    while triggered < total {
        let n = 1_000.min(total - triggered);
        let batch = (0..n)
            .map(|i| {
                (
                    JOB.to_string(),
                    json!({ "i": triggered + i }),
                    TriggerOptions::default(),
                )
            })
            .collect();
        d.trigger_batch(batch).await?;
        triggered += n;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while count(&d, RunStatus::Failed).await? < total as i64 {
        if Instant::now() > deadline {
            return Err("the runs did not all fail within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.shutdown(Duration::from_secs(10)).await;

    // The server, with a token of the runs' tenant.
    let token = auth::issue_token(DEFAULT_TENANT, "bench", d.clock().now())?;
    d.store().create_token(token.record).await?;
    let token = token.secret;
    let server = Server::start(d.clone(), ServerConfig::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_server, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let _ = server
            .serve(listener, async move {
                let _ = rx.await;
            })
            .await;
    });
    let http = reqwest::Client::new();

    // Baseline: the list's latency with nothing else going on.
    let stop = Arc::new(AtomicBool::new(false));
    let base_task = tokio::spawn(lister(
        http.clone(),
        base.clone(),
        token.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let mut baseline = base_task.await??;
    baseline.sort_by(f64::total_cmp);

    let bulk = |body: Value| {
        let http = http.clone();
        let base = base.clone();
        let token = token.clone();
        async move {
            let res = http
                .post(format!("{base}/api/runs/bulk"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await?;
            let status = res.status();
            let v: Value = res.json().await?;
            if !status.is_success() {
                return Err::<Value, BoxError>(format!("POST /api/runs/bulk: {status} {v}").into());
            }
            Ok(v)
        }
    };
    let filter = json!({ "job": JOB, "status": ["failed"] });
    let t = Instant::now();
    let dry = bulk(json!({ "action": "retry", "filter": filter, "dry_run": true })).await?;
    let dry_run_ms = t.elapsed().as_secs_f64() * 1e3;
    let matched = dry["matched"].as_u64().unwrap_or(0) as usize;

    let stop = Arc::new(AtomicBool::new(false));
    let list_task = tokio::spawn(lister(
        http.clone(),
        base.clone(),
        token.clone(),
        stop.clone(),
    ));
    let t = Instant::now();
    let (mut succeeded, mut refused, mut calls) = (0usize, 0usize, 0usize);
    let mut cursor = Value::Null;
    loop {
        let page = bulk(json!({
            "action": "retry", "filter": filter, "comment": COMMENT,
            "limit": PAGE, "cursor": cursor,
        }))
        .await?;
        calls += 1;
        succeeded += page["succeeded"].as_u64().unwrap_or(0) as usize;
        refused += page["failed"].as_u64().unwrap_or(0) as usize;
        cursor = page["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    let bulk_s = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let mut lat = list_task.await??;
    lat.sort_by(f64::total_cmp);
    let _ = stop_server.send(());
    let _ = serving.await;

    // Every run audited: its own operator_retry event with the bulk's
    // actor and comment.
    let mut audited = HashSet::new();
    let mut after_id = None;
    loop {
        let events = d
            .store()
            .events(EventFilter {
                job: Some(JOB.into()),
                after_id,
                limit: 1_000,
                ..Default::default()
            })
            .await?;
        let Some(last) = events.last() else { break };
        after_id = Some(last.id);
        for e in &events {
            if e.kind == docket::EventKind::OperatorRetry
                && e.actor.as_deref() == Some("bench")
                && e.comment.as_deref() == Some(COMMENT)
            {
                audited.insert(e.run_id);
            }
        }
    }
    Ok(BulkReport {
        workload: "bulk-retry",
        backend: db.backend.clone(),
        runs: total,
        page: PAGE,
        dry_run_matched: matched,
        dry_run_ms,
        bulk_s,
        bulk_runs_per_s: succeeded as f64 / bulk_s,
        bulk_calls: calls,
        succeeded,
        refused,
        left_failed: count(&d, RunStatus::Failed).await?,
        audited_runs: audited.len(),
        list_requests: lat.len(),
        list_p50_ms: pct(&lat, 50.0),
        list_p99_ms: pct(&lat, 99.0),
        list_max_ms: lat.last().copied().unwrap_or(0.0),
        baseline_list_p50_ms: pct(&baseline, 50.0),
        baseline_list_p99_ms: pct(&baseline, 99.0),
    })
}
