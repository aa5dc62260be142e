//! `docket bench`: the three workloads of the engine issue.
//!
//! - W1 drain: enqueue N no-op runs (batch trigger), then process them at
//!   concurrency C: enqueue runs/s, processed runs/s, peak RSS.
//! - W2 pickup: an idle worker; runs triggered one at a time at ~100/s;
//!   percentiles of (handler start − trigger return).
//! - W3 retry: runs that fail twice and succeed on the third attempt with a
//!   10 ms backoff and no jitter; wall time; executions counted and checked.
//!
//! Every attempt row and event is written as in production: the bench uses
//! the public API and the same store.

use docket::{
    Docket, Job, JobError, RetryPolicy, RunFilter, RunStatus, TriggerOptions, WorkerConfig,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Arguments of `docket bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Which workload: W1, W2, W3 or all; or claim-scale (claim cost with
    /// 10,000 vs `--runs` pending runs, default 1,000,000); or steady (W1
    /// repeated for `--runs`, default 1,000,000, with retention
    /// `--retention-ms`: throughput and size of the first vs the last
    /// 100,000); or bulk-retry (`--runs`, default 10,000, failed runs
    /// retried through `POST /api/runs/bulk` while `GET /api/runs` is
    /// timed); or fairness (tenant B's pickup latency without and with a
    /// backlog of `--runs`, default 100,000, runs of tenant A).
    #[arg(default_value = "all")]
    workload: String,
    /// Database URL (default: a fresh SQLite file in a temporary directory).
    /// For PostgreSQL, a fresh schema is used and dropped afterwards.
    #[arg(long)]
    db: Option<String>,
    /// Runs per workload (default: W1 10,000, W2 500, W3 1,000).
    #[arg(long)]
    runs: Option<usize>,
    /// Worker concurrency.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Runs claimed ahead of free handler slots (default: the worker's
    /// default, equal to the concurrency). 0 claims only for free slots.
    #[arg(long)]
    prefetch: Option<usize>,
    /// One JSON object per workload per line.
    #[arg(long)]
    json: bool,
    /// `steady`: completed runs are pruned this long after they finished.
    #[arg(long, default_value_t = 3_000)]
    retention_ms: i64,
    /// W1: give the job a rate limit of this many runs a second (burst: the
    /// same number, at most 1,000,000), shared through the database
    /// (docs/RATE_LIMITS.md). A limit above W1's throughput measures the
    /// cost of taking a token per run.
    #[arg(long)]
    rate_limit: Option<f64>,
    /// W1: give the job a job-wide concurrency limit of this many runs
    /// across every process (a concurrency key without a template,
    /// docs/FLOW_CONTROL.md): with the worker's concurrency or more it
    /// never binds and measures the cost of keyed claims.
    #[arg(long)]
    job_limit: Option<usize>,
    /// W1: each handler waits this many milliseconds (a stand-in for a call
    /// to another service) instead of returning at once. With a real
    /// handler time a concurrency limit equal to the worker's concurrency
    /// no longer binds; with a no-op handler the store's round trip is
    /// part of every run's time.
    #[arg(long)]
    handler_ms: Option<u64>,
    /// W1, W2, W3: run them as the peer harness does, the worker in one
    /// process and the producer in another (this binary started again),
    /// instead of both in this process (docs/BENCHMARKS.md, "Separate
    /// processes"). The peak RSS is then the worker process's.
    #[arg(long)]
    separate: bool,
}

/// One workload's figures.
#[derive(Serialize, Debug, Default)]
pub(crate) struct Report {
    pub(crate) workload: String,
    pub(crate) backend: String,
    /// `in-process` (producer and worker in this process) or `separate`
    /// (each in a process of its own, as in the peer harness).
    pub(crate) mode: String,
    pub(crate) runs: usize,
    pub(crate) concurrency: usize,
    pub(crate) enqueue_per_s: Option<f64>,
    pub(crate) processed_per_s: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p95_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    /// Separate W2: pickup as the harness measures it, from the instant
    /// right before the trigger call (so including its commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) harness_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) harness_p95_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) harness_p99_ms: Option<f64>,
    pub(crate) executions_expected: Option<usize>,
    pub(crate) executions_actual: Option<usize>,
    /// Separate mode: executions of a run that had already executed (W3:
    /// beyond its three).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) duplicates: Option<usize>,
    pub(crate) wall_s: f64,
    pub(crate) peak_rss_mb: Option<f64>,
    /// PostgreSQL W1: write commits (transaction ids handed out) during
    /// the drain per processed run; counts the whole server, so run it on
    /// a server with nothing else writing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) commits_per_run: Option<f64>,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub async fn run(args: BenchArgs) -> Result<(), BoxError> {
    if args.separate
        && !matches!(
            args.workload.to_ascii_uppercase().as_str(),
            "W1" | "W2" | "W3" | "ALL"
        )
    {
        return Err(format!("--separate runs W1, W2, W3 or all, not `{}`", args.workload).into());
    }
    if args.workload.eq_ignore_ascii_case("steady") {
        return crate::bench_steady::run(
            args.db.as_deref(),
            args.runs,
            args.concurrency,
            args.retention_ms,
            args.json,
        )
        .await;
    }
    if args.workload.eq_ignore_ascii_case("bulk-retry") {
        return crate::bench_bulk::run(args.db.as_deref(), args.runs, args.json).await;
    }
    if args.workload.eq_ignore_ascii_case("fairness") {
        return crate::bench_fair::run(args.db.as_deref(), args.runs, args.json).await;
    }
    if args.workload.eq_ignore_ascii_case("claim-scale") {
        return crate::bench_scale::run(args.db.as_deref(), args.runs, args.json).await;
    }
    let which: Vec<&str> = match args.workload.to_ascii_uppercase().as_str() {
        "ALL" => vec!["W1", "W2", "W3"],
        "W1" => vec!["W1"],
        "W2" => vec!["W2"],
        "W3" => vec!["W3"],
        other => {
            return Err(format!("unknown workload `{other}`: expected W1, W2, W3, all, claim-scale, steady, bulk-retry or fairness").into())
        }
    };
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.separate
        && (args.prefetch.is_some()
            || args.rate_limit.is_some()
            || args.job_limit.is_some()
            || args.handler_ms.is_some())
    {
        return Err(
            "--separate runs the harness's settings: no --prefetch, --rate-limit, --job-limit or --handler-ms"
                .into(),
        );
    }
    let mut reports = Vec::new();
    for w in which {
        let db = Db::fresh(args.db.as_deref()).await?;
        reset_peak_rss();
        let report = if args.separate {
            let r = crate::bench_separate::run(w, &db, args.runs, args.concurrency).await;
            db.cleanup().await;
            r?
        } else {
            let r = match w {
                "W1" => {
                    let opts = W1Opts {
                        prefetch: args.prefetch,
                        rate_limit: args.rate_limit,
                        job_limit: args.job_limit,
                        handler_ms: args.handler_ms,
                    };
                    w1(&db, args.runs.unwrap_or(10_000), args.concurrency, opts).await?
                }
                "W2" => w2(&db, args.runs.unwrap_or(500)).await?,
                _ => w3(&db, args.runs.unwrap_or(1_000), args.concurrency).await?,
            };
            db.cleanup().await;
            r
        };
        if args.json {
            outln!("{}", serde_json::to_string(&report)?);
        }
        reports.push(report);
    }
    if !args.json {
        print_table(&reports);
    }
    for r in &reports {
        if r.executions_expected != r.executions_actual {
            return Err(format!(
                "{}: expected {:?} executions, counted {:?}",
                r.workload, r.executions_expected, r.executions_actual
            )
            .into());
        }
    }
    Ok(())
}

/// A fresh database for one workload: a SQLite file in a temporary
/// directory, or a fresh PostgreSQL schema.
pub(crate) struct Db {
    /// Its URL.
    pub(crate) url: String,
    /// `sqlite` or `postgres`.
    pub(crate) backend: String,
    tmp: Option<std::path::PathBuf>,
}

impl Db {
    /// A fresh database: `url`'s (a fresh schema for PostgreSQL) or a
    /// temporary SQLite file.
    pub(crate) async fn fresh(url: Option<&str>) -> Result<Db, BoxError> {
        match url {
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("docket-bench-{}", uuid::Uuid::new_v4().simple()));
                std::fs::create_dir_all(&dir)?;
                Ok(Db {
                    url: format!("sqlite://{}", dir.join("bench.db").display()),
                    backend: "sqlite".into(),
                    tmp: Some(dir),
                })
            }
            Some(u) if u.starts_with("postgres") => {
                let schema = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
                let sep = if u.contains('?') { '&' } else { '?' };
                Ok(Db {
                    url: format!("{u}{sep}schema={schema}"),
                    backend: "postgres".into(),
                    tmp: None,
                })
            }
            Some(u) => Ok(Db {
                url: u.to_string(),
                backend: "sqlite".into(),
                tmp: None,
            }),
        }
    }

    /// Removes the temporary file or drops the schema.
    pub(crate) async fn cleanup(&self) {
        if let Some(dir) = &self.tmp {
            let _ = std::fs::remove_dir_all(dir);
        }
        if self.backend == "postgres" {
            // The fresh schema goes, as the --db help promises.
            if let Ok(pg) = docket_store::postgres::PgStore::connect(&self.url).await {
                let _ = pg.drop_schema().await;
            }
        }
    }
}

fn progress(len: usize, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {per_sec}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Waits, with a bound, until `counter` reaches `target`.
pub(crate) async fn wait_count(
    counter: &AtomicUsize,
    notify: &Notify,
    target: usize,
    bound: Duration,
) -> Result<(), BoxError> {
    tokio::time::timeout(bound, async {
        loop {
            let n = notify.notified();
            if counter.load(Ordering::SeqCst) >= target {
                return;
            }
            n.await;
        }
    })
    .await
    .map_err(|_| {
        format!(
            "only {} of {target} executions within {bound:?}",
            counter.load(Ordering::SeqCst)
        )
        .into()
    })
}

async fn all_completed(d: &Docket, runs: usize) -> Result<(), BoxError> {
    let counts = d.store().count_runs(None).await?;
    let completed: i64 = counts
        .iter()
        .filter(|c| c.status == RunStatus::Completed)
        .map(|c| c.count)
        .sum();
    if completed as usize != runs {
        return Err(format!("{completed} of {runs} runs completed: {counts:?}").into());
    }
    Ok(())
}

/// The engine of one workload. Traces follow the `OTEL_*` variables as in
/// `serve` (off unless an OTLP endpoint is set), so their cost can be
/// measured with the same binary (docs/BENCHMARKS.md).
async fn open(db: &Db) -> Result<Docket, BoxError> {
    let d = Docket::open(&db.url).await?;
    if let Some(t) = docket::Telemetry::from_env()? {
        let _ = d.set_telemetry(t);
    }
    Ok(d)
}

/// W1's variations (`docket bench W1 --prefetch … --rate-limit …
/// --job-limit … --handler-ms …`).
struct W1Opts {
    prefetch: Option<usize>,
    rate_limit: Option<f64>,
    job_limit: Option<usize>,
    handler_ms: Option<u64>,
}

async fn w1(db: &Db, runs: usize, concurrency: usize, opts: W1Opts) -> Result<Report, BoxError> {
    let W1Opts {
        prefetch,
        rate_limit,
        job_limit,
        handler_ms,
    } = opts;
    let pause = handler_ms.map(Duration::from_millis);
    let d = open(db).await?;
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (c, n) = (count.clone(), done.clone());
    let pb = progress(runs, "W1");
    let pb2 = pb.clone();
    let job = Job::new("noop", move |_ctx, _: Value| {
        let (c, n, pb) = (c.clone(), n.clone(), pb2.clone());
        async move {
            if let Some(p) = pause {
                // The handler's own work (a call elsewhere), not a wait.
                tokio::time::sleep(p).await;
            }
            let k = c.fetch_add(1, Ordering::SeqCst) + 1;
            pb.inc(1);
            if k >= runs {
                n.notify_one();
            }
            Ok::<_, JobError>(Value::Null)
        }
    });
    let job = match rate_limit {
        Some(r) => job.rate_limit(r, r.clamp(1.0, 1_000_000.0) as u32),
        None => job,
    };
    let job = match job_limit {
        Some(n) => job.concurrency(n),
        None => job,
    };
    d.register(job)?;
    let start = Instant::now();
    for chunk_start in (0..runs).step_by(1_000) {
        let batch = (chunk_start..(chunk_start + 1_000).min(runs))
            .map(|i| {
                (
                    "noop".to_string(),
                    json!({ "i": i }),
                    TriggerOptions::default(),
                )
            })
            .collect();
        d.trigger_batch(batch).await?;
    }
    let enqueue_s = start.elapsed().as_secs_f64();
    // Read before the drain's clock starts (it opens a connection).
    let commits_before = commits(db).await?;
    let t = Instant::now();
    let mut config = WorkerConfig {
        concurrency,
        prefetch: concurrency,
        ..Default::default()
    };
    if let Some(p) = prefetch {
        config.prefetch = p;
    }
    let handle = d.worker(config).start();
    wait_count(&count, &done, runs, Duration::from_secs(600)).await?;
    handle.shutdown(Duration::from_secs(10)).await;
    let drain_s = t.elapsed().as_secs_f64();
    pb.finish_and_clear();
    all_completed(&d, runs).await?;
    let commits_per_run = match (commits_before, commits(db).await?) {
        (Some(a), Some(b)) => Some((b - a) as f64 / runs as f64),
        _ => None,
    };
    Ok(Report {
        workload: "W1".into(),
        backend: db.backend.clone(),
        mode: "in-process".into(),
        runs,
        concurrency,
        enqueue_per_s: Some(runs as f64 / enqueue_s),
        processed_per_s: Some(runs as f64 / drain_s),
        executions_expected: Some(runs),
        executions_actual: Some(count.load(Ordering::SeqCst)),
        wall_s: start.elapsed().as_secs_f64(),
        peak_rss_mb: peak_rss_mb(),
        commits_per_run,
        ..Default::default()
    })
}

/// PostgreSQL: the transaction ids handed out so far (the next one to be
/// assigned). Only a transaction that writes gets one, so the difference
/// over the drain is its write commits (each a WAL flush), read at once,
/// without waiting for the statistics collector; it counts the whole
/// server, so run it on a server with nothing else writing. SQLite: `None`.
async fn commits(db: &Db) -> Result<Option<i64>, BoxError> {
    if db.backend != "postgres" {
        return Ok(None);
    }
    let pg = docket_store::postgres::PgStore::connect(&db.url).await?;
    let n: i64 = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8")
        .fetch_one(pg.pool())
        .await?;
    Ok(Some(n))
}

async fn w2(db: &Db, runs: usize) -> Result<Report, BoxError> {
    let d = open(db).await?;
    let starts: Arc<Mutex<HashMap<docket::RunId, Instant>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (s, c, n) = (starts.clone(), count.clone(), done.clone());
    d.register(Job::new("pickup", move |ctx, _: Value| {
        let now = Instant::now();
        s.lock().expect("starts").insert(ctx.run_id(), now);
        c.fetch_add(1, Ordering::SeqCst);
        n.notify_one();
        async move { Ok::<_, JobError>(Value::Null) }
    }))?;
    let handle = d
        .worker(WorkerConfig {
            concurrency: 8,
            poll_interval: Duration::from_secs(1),
            ..Default::default()
        })
        .start();
    // Warm up: the first trigger pays for statement preparation.
    let warm = d.trigger("pickup", json!({})).await?.run.id;
    d.wait(warm, Duration::from_secs(10)).await?;
    let pb = progress(runs, "W2");
    let start = Instant::now();
    let mut returned = Vec::with_capacity(runs);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..runs {
        tick.tick().await;
        let id = d.trigger("pickup", json!({ "i": i })).await?.run.id;
        returned.push((id, Instant::now()));
        pb.inc(1);
    }
    wait_count(&count, &done, runs + 1, Duration::from_secs(60)).await?;
    let wall = start.elapsed().as_secs_f64();
    handle.shutdown(Duration::from_secs(5)).await;
    pb.finish_and_clear();
    let mut lat: Vec<f64> = {
        let starts = starts.lock().expect("starts");
        returned
            .iter()
            .map(|(id, ret)| {
                let s = starts[id];
                // The handler may start before trigger() has returned to its
                // caller; that counts as zero latency, never negative.
                s.saturating_duration_since(*ret).as_secs_f64() * 1_000.0
            })
            .collect()
    };
    lat.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    all_completed(&d, runs + 1).await?;
    Ok(Report {
        workload: "W2".into(),
        backend: db.backend.clone(),
        mode: "in-process".into(),
        runs,
        concurrency: 8,
        p50_ms: Some(percentile(&lat, 50.0)),
        p95_ms: Some(percentile(&lat, 95.0)),
        p99_ms: Some(percentile(&lat, 99.0)),
        executions_expected: Some(runs),
        executions_actual: Some(count.load(Ordering::SeqCst) - 1),
        wall_s: wall,
        peak_rss_mb: peak_rss_mb(),
        ..Default::default()
    })
}

async fn w3(db: &Db, runs: usize, concurrency: usize) -> Result<Report, BoxError> {
    let d = open(db).await?;
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (c, n) = (count.clone(), done.clone());
    let policy = RetryPolicy {
        name: "bench-10ms".into(),
        base_delay_ms: 10,
        multiplier: 1.0,
        max_delay_ms: 10,
        max_attempts: 5,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    };
    let pb = progress(runs * 3, "W3");
    let pb2 = pb.clone();
    d.register(
        Job::new("flaky", move |ctx, _: Value| {
            let (c, n, pb) = (c.clone(), n.clone(), pb2.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                pb.inc(1);
                n.notify_one();
                if ctx.attempt() < 3 {
                    Err(JobError::unavailable(format!(
                        "planned failure {}",
                        ctx.attempt()
                    )))
                } else {
                    Ok(Value::Null)
                }
            }
        })
        .retry(policy),
    )?;
    let start = Instant::now();
    let batch = (0..runs)
        .map(|i| {
            (
                "flaky".to_string(),
                json!({ "i": i }),
                TriggerOptions::default(),
            )
        })
        .collect();
    let ids: Vec<_> = d
        .trigger_batch(batch)
        .await?
        .into_iter()
        .map(|t| t.run.id)
        .collect();
    let handle = d
        .worker(WorkerConfig {
            concurrency,
            poll_interval: Duration::from_millis(5),
            ..Default::default()
        })
        .start();
    wait_count(&count, &done, runs * 3, Duration::from_secs(600)).await?;
    for id in &ids {
        d.wait(*id, Duration::from_secs(30)).await?;
    }
    let wall = start.elapsed().as_secs_f64();
    handle.shutdown(Duration::from_secs(5)).await;
    pb.finish_and_clear();
    all_completed(&d, runs).await?;
    // Executions read back from the evidence, not only from the counter.
    let mut attempt_rows = 0;
    for id in &ids {
        let att = d.store().attempts(*id).await?;
        if att.len() != 3 {
            return Err(format!("run {id} has {} attempts, expected 3", att.len()).into());
        }
        attempt_rows += att.len();
    }
    let counted = count.load(Ordering::SeqCst);
    if counted != attempt_rows {
        return Err(format!("counted {counted} executions but {attempt_rows} attempt rows").into());
    }
    let _ = d.list_runs(RunFilter::default()).await?;
    Ok(Report {
        workload: "W3".into(),
        backend: db.backend.clone(),
        mode: "in-process".into(),
        runs,
        concurrency,
        processed_per_s: Some(runs as f64 / wall),
        executions_expected: Some(runs * 3),
        executions_actual: Some(counted),
        wall_s: wall,
        peak_rss_mb: peak_rss_mb(),
        ..Default::default()
    })
}

/// The `p`th percentile (nearest rank) of sorted figures.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Resets the kernel's peak-RSS counter so each workload reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print_table(reports: &[Report]) {
    let f = |v: Option<f64>, prec: usize| {
        v.map(|x| format!("{x:.prec$}"))
            .unwrap_or_else(|| "-".into())
    };
    outln!(
        "{:<4} {:<9} {:<10} {:>6} {:>4} {:>11} {:>12} {:>7} {:>7} {:>7} {:>13} {:>7} {:>8}",
        "load",
        "backend",
        "mode",
        "runs",
        "conc",
        "enqueue/s",
        "processed/s",
        "p50ms",
        "p95ms",
        "p99ms",
        "executions",
        "wall_s",
        "rss_mb"
    );
    for r in reports {
        let ex = match (r.executions_actual, r.executions_expected) {
            (Some(a), Some(e)) => format!("{a}/{e}"),
            _ => "-".into(),
        };
        outln!(
            "{:<4} {:<9} {:<10} {:>6} {:>4} {:>11} {:>12} {:>7} {:>7} {:>7} {:>13} {:>7.2} {:>8}",
            r.workload,
            r.backend,
            r.mode,
            r.runs,
            r.concurrency,
            f(r.enqueue_per_s, 0),
            f(r.processed_per_s, 0),
            f(r.p50_ms, 3),
            f(r.p95_ms, 3),
            f(r.p99_ms, 3),
            ex,
            r.wall_s,
            f(r.peak_rss_mb, 1)
        );
    }
}
