//! `docket bench steady`: W1 repeated with retention on, to see whether
//! throughput and the database's size hold steady as runs are processed and
//! pruned (issue 15's steady-state measurement).
//!
//! A producer keeps at most 20,000 runs queued (batch triggers of 1,000); a
//! worker processes them; a pruner (interval 1 s, batches of 1,000) deletes
//! completed runs `--retention-ms` after they finished. Every 100,000
//! processed runs the block's rate and the database's size are recorded.
//! Reported: the first and last block's runs/s and their ratio (goal
//! ≥ 0.9), the size after the first block and at the end. On a PostgreSQL
//! server with autovacuum off, each block ends with a VACUUM of the
//! schema's tables standing in for autovacuum (reported with its time), or
//! pruned space would never be reused.

use docket::retention::{PrunerConfig, Retention, RetentionConfig};
use docket::{Docket, Job, JobError, TriggerOptions, WorkerConfig};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const BLOCK: usize = 100_000;
const QUEUED: usize = 20_000;

#[derive(Serialize, Debug)]
struct Block {
    processed: usize,
    runs_per_s: f64,
    db_mb: f64,
    runs_rows: i64,
    /// Seconds of the stand-in VACUUM after this block (PostgreSQL with
    /// autovacuum off), while the worker went on.
    vacuum_s: Option<f64>,
}

#[derive(Serialize, Debug)]
struct SteadyReport {
    workload: &'static str,
    backend: String,
    runs: usize,
    concurrency: usize,
    retention_ms: i64,
    blocks: Vec<Block>,
    first_runs_per_s: f64,
    last_runs_per_s: f64,
    ratio: f64,
    first_db_mb: f64,
    last_db_mb: f64,
    wall_s: f64,
}

/// The database's size in MB: the SQLite file and its WAL, or the
/// PostgreSQL schema's tables, indexes and TOAST.
async fn db_mb(url: &str, path: Option<&std::path::Path>) -> Result<f64, BoxError> {
    if let Some(p) = path {
        let mut n = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let wal = p.with_extension("db-wal");
        n += std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
        return Ok(n as f64 / 1e6);
    }
    let pg = docket_store::postgres::PgStore::connect(url).await?;
    let bytes: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind = 'r'",
    )
    .fetch_one(pg.pool())
    .await?;
    Ok(bytes as f64 / 1e6)
}

/// On a PostgreSQL server with autovacuum off, VACUUMs the schema's tables
/// (what autovacuum would do, so that pruned space is reused); answers how
/// long it took, or `None` when autovacuum is on (nothing to stand in for).
async fn vacuum_if_autovacuum_off(url: &str) -> Result<Option<f64>, BoxError> {
    let pg = docket_store::postgres::PgStore::connect(url).await?;
    let on: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pg.pool())
        .await?;
    if on == "on" {
        return Ok(None);
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind = 'r'",
    )
    .fetch_all(pg.pool())
    .await?;
    let t = Instant::now();
    for table in tables {
        // Names come from the catalog, quoted as identifiers.
        let sql = format!("VACUUM \"{}\"", table.replace('"', "\"\""));
        sqlx::query(&sql).execute(pg.pool()).await?;
    }
    Ok(Some(t.elapsed().as_secs_f64()))
}

/// Runs `docket bench steady`.
pub async fn run(
    db: Option<&str>,
    total: Option<usize>,
    concurrency: usize,
    retention_ms: i64,
    json_out: bool,
) -> Result<(), BoxError> {
    let total = total.unwrap_or(1_000_000);
    if total < 2 * BLOCK {
        return Err(format!("--runs must be at least {}", 2 * BLOCK).into());
    }
    let (url, path, backend, schema_url) = match db {
        Some(u) if u.starts_with("postgres") => {
            let schema = format!(
                "steady_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            let sep = if u.contains('?') { '&' } else { '?' };
            let url = format!("{u}{sep}schema={schema}");
            (url.clone(), None, "postgres", Some(url))
        }
        _ => {
            let dir = std::env::temp_dir()
                .join(format!("docket-steady-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir)?;
            let p = dir.join("bench.db");
            (format!("sqlite://{}", p.display()), Some(p), "sqlite", None)
        }
    };
    let d = Docket::open(&url).await?;
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    d.register(Job::new("noop", move |_ctx, _: Value| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, JobError>(Value::Null)
        }
    }))?;
    let worker = d
        .worker(WorkerConfig {
            concurrency,
            prefetch: concurrency,
            ..Default::default()
        })
        .start();
    let pruner = d.start_pruner(PrunerConfig {
        interval: Duration::from_secs(1),
        batch: 1_000,
        max_batches: 1_000,
        ..PrunerConfig::new(RetentionConfig {
            default: Retention {
                completed_ms: Some(retention_ms),
                ..Default::default()
            },
            ..Default::default()
        })
    })?;
    let start = Instant::now();
    let mut block_start = Instant::now();
    let mut next_mark = BLOCK;
    let mut triggered = 0usize;
    let mut blocks = Vec::new();
    while blocks.len() < total / BLOCK {
        let done = count.load(Ordering::SeqCst);
        if triggered < total && triggered - done.min(triggered) < QUEUED {
            let n = 1_000.min(total - triggered);
            let batch = (0..n)
                .map(|i| {
                    (
                        "noop".to_string(),
                        json!({ "i": triggered + i }),
                        TriggerOptions::default(),
                    )
                })
                .collect();
            d.trigger_batch(batch).await?;
            triggered += n;
            continue;
        }
        if done >= next_mark {
            let secs = block_start.elapsed().as_secs_f64();
            // The next block's clock starts now: the worker goes on during
            // the reads (and VACUUM) below.
            block_start = Instant::now();
            let rows: i64 = d
                .store()
                .count_runs(None)
                .await?
                .iter()
                .map(|c| c.count)
                .sum();
            let vacuum_s = match path {
                None => vacuum_if_autovacuum_off(&url).await?,
                Some(_) => None,
            };
            blocks.push(Block {
                processed: next_mark,
                runs_per_s: BLOCK as f64 / secs,
                db_mb: db_mb(&url, path.as_deref()).await?,
                runs_rows: rows,
                vacuum_s,
            });
            if !json_out {
                let b = blocks.last().expect("just pushed");
                eprintln!(
                    "{:>9} processed: {:>8.0} runs/s, {:>7.1} MB, {} runs stored{}",
                    b.processed,
                    b.runs_per_s,
                    b.db_mb,
                    b.runs_rows,
                    b.vacuum_s
                        .map(|v| format!(", VACUUM (autovacuum is off) {v:.1} s"))
                        .unwrap_or_default()
                );
            }
            next_mark += BLOCK;
            continue;
        }
        if start.elapsed() > Duration::from_secs(3_600) {
            return Err(format!("only {done} of {total} runs processed in an hour").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    worker.shutdown(Duration::from_secs(10)).await;
    pruner.shutdown().await;
    let (first, last) = (&blocks[0], blocks.last().expect("at least two blocks"));
    let report = SteadyReport {
        workload: "steady",
        backend: backend.into(),
        runs: total,
        concurrency,
        retention_ms,
        first_runs_per_s: first.runs_per_s,
        last_runs_per_s: last.runs_per_s,
        ratio: last.runs_per_s / first.runs_per_s,
        first_db_mb: first.db_mb,
        last_db_mb: last.db_mb,
        wall_s: start.elapsed().as_secs_f64(),
        blocks,
    };
    if json_out {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!(
            "steady ({backend}, {total} runs, retention {retention_ms} ms): first 100k {:.0} runs/s, last 100k {:.0} runs/s (ratio {:.2}); size {:.1} MB after the first 100k, {:.1} MB at the end",
            report.first_runs_per_s,
            report.last_runs_per_s,
            report.ratio,
            report.first_db_mb,
            report.last_db_mb
        );
    }
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if let Some(u) = schema_url {
        if let Ok(pg) = docket_store::postgres::PgStore::connect(&u).await {
            let _ = pg.drop_schema().await;
        }
    }
    Ok(())
}
