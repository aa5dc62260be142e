//! `docket bench claim-scale`: what a claim costs when the queue is large.
//!
//! For each queue size (10,000 and `--runs`, default 1,000,000 pending runs
//! of one job) in a fresh database: enqueue the runs, then time claims of 8
//! runs. Each claimed run is handed back at once (`Released`: pending again,
//! due now, behind every other due run), so the queue keeps its size while
//! the claims walk it. Reports claim latency percentiles per size and the
//! ratio large / small of the medians — the goal is under 1.5: a claim must
//! not cost more because more runs wait.
//!
//! Each claim is a full store call as a worker makes it (one statement and
//! its commit); on PostgreSQL with the default `synchronous_commit = on`
//! the commit's WAL flush is part of it. Add `?synchronous_commit=off` to a
//! PostgreSQL URL to time the statement without the flush.

use docket::{Clock, SystemClock};
use docket_store::postgres::PgStore;
use docket_store::{AttemptEnd, ClaimRequest, DynStore, NewRun, Outcome};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Claims timed per queue size (after 100 warm-up claims).
const CLAIMS: usize = 2_000;
/// Runs per claim (the default worker's batch).
const BATCH: usize = 8;
/// The small queue.
const SMALL: usize = 10_000;

#[derive(Serialize, Debug)]
struct SizeReport {
    workload: &'static str,
    backend: String,
    pending: usize,
    claims: usize,
    batch: usize,
    enqueue_s: f64,
    claim_p50_us: f64,
    claim_p95_us: f64,
    claim_p99_us: f64,
}

/// Runs the claim-scale bench (`docket bench claim-scale`).
pub async fn run(db: Option<&str>, large: Option<usize>, json_out: bool) -> Result<(), BoxError> {
    let large = large.unwrap_or(1_000_000);
    let mut reports = Vec::new();
    for size in [SMALL, large] {
        let fresh = Fresh::open(db).await?;
        let r = measure(&fresh.store, &fresh.backend, size).await;
        fresh.cleanup().await;
        let r = r?;
        if json_out {
            outln!("{}", serde_json::to_string(&r)?);
        }
        reports.push(r);
    }
    let ratio = reports[1].claim_p50_us / reports[0].claim_p50_us;
    let ratio99 = reports[1].claim_p99_us / reports[0].claim_p99_us;
    if json_out {
        outln!(
            "{}",
            json!({ "workload": "claim-scale", "ratio_p50": ratio, "ratio_p99": ratio99 })
        );
    } else {
        outln!(
            "{:<12} {:<9} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10}",
            "load",
            "backend",
            "pending",
            "claims",
            "enqueue_s",
            "p50_us",
            "p95_us",
            "p99_us"
        );
        for r in &reports {
            outln!(
                "{:<12} {:<9} {:>9} {:>7} {:>10.1} {:>10.0} {:>10.0} {:>10.0}",
                r.workload,
                r.backend,
                r.pending,
                r.claims,
                r.enqueue_s,
                r.claim_p50_us,
                r.claim_p95_us,
                r.claim_p99_us
            );
        }
        outln!(
            "claim cost ratio {} / {} pending: p50 {ratio:.2}, p99 {ratio99:.2} (goal: p50 < 1.5)",
            reports[1].pending,
            reports[0].pending
        );
    }
    Ok(())
}

/// A fresh, empty database: a new schema on PostgreSQL, a new file in a
/// temporary directory on SQLite.
struct Fresh {
    store: DynStore,
    backend: String,
    pg: Option<PgStore>,
    dir: Option<std::path::PathBuf>,
}

impl Fresh {
    async fn open(url: Option<&str>) -> Result<Fresh, BoxError> {
        match url {
            Some(u) if u.starts_with("postgres") => {
                let schema = format!(
                    "bench_{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                );
                let pg = PgStore::connect_with(u, &schema).await?;
                Ok(Fresh {
                    store: Arc::new(pg.clone()),
                    backend: "postgres".into(),
                    pg: Some(pg),
                    dir: None,
                })
            }
            Some(u) => Err(format!(
                "claim-scale makes its own databases: give a postgres:// URL or none (SQLite), not `{u}`"
            )
            .into()),
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("docket-scale-{}", uuid::Uuid::new_v4().simple()));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("scale.db").display());
                Ok(Fresh {
                    store: docket_store::open(&url).await?,
                    backend: "sqlite".into(),
                    pg: None,
                    dir: Some(dir),
                })
            }
        }
    }

    async fn cleanup(self) {
        if let Some(pg) = &self.pg {
            if let Err(e) = pg.drop_schema().await {
                eprintln!("warning: could not drop {}: {e}", pg.schema());
            }
        }
        drop(self.store);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn measure(store: &DynStore, backend: &str, size: usize) -> Result<SizeReport, BoxError> {
    let clock = SystemClock;
    let start = Instant::now();
    let mut made = 0;
    while made < size {
        let n = (size - made).min(5_000);
        let batch: Vec<NewRun> = (made..made + n)
            .map(|i| NewRun::new("scale", json!({ "i": i })))
            .collect();
        store.trigger(batch, clock.now()).await?;
        made += n;
    }
    let enqueue_s = start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(CLAIMS);
    for k in 0..CLAIMS + 100 {
        let t = Instant::now();
        let runs = store
            .claim(ClaimRequest {
                tenant: None,
                jobs: vec!["scale".into()],
                limit: BATCH,
                now: clock.now(),
                lease_ms: 60_000,
                worker: "claim-scale".into(),
            })
            .await?;
        let took = t.elapsed();
        if runs.len() != BATCH {
            return Err(format!("claimed {} of {BATCH} with {size} pending", runs.len()).into());
        }
        if k >= 100 {
            lat.push(took);
        }
        let now = clock.now();
        let ends = runs
            .iter()
            .map(|r| AttemptEnd {
                run_id: r.id,
                lease_id: r.lease_id.expect("claimed"),
                now,
                outcome: Outcome::Released,
            })
            .collect();
        for r in store.finish(ends).await? {
            r?;
        }
    }
    lat.sort();
    let pct = |p: f64| -> f64 {
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1].as_secs_f64() * 1e6
    };
    Ok(SizeReport {
        workload: "claim-scale",
        backend: backend.to_string(),
        pending: size,
        claims: CLAIMS,
        batch: BATCH,
        enqueue_s,
        claim_p50_us: pct(50.0),
        claim_p95_us: pct(95.0),
        claim_p99_us: pct(99.0),
    })
}
