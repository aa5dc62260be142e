//! What a claim costs with 10,000 runs held back by one concurrency key
//! ahead of one claimable run (docs/FLOW_CONTROL.md, docs/BENCHMARKS.md).
//! A measurement, not a test of speed: it prints medians and (PostgreSQL)
//! the plans, and asserts only what was claimed.
//!
//! `cargo test --release -p docket-store --test keyed_claim_cost -- --ignored --nocapture`
//! (PostgreSQL with `DOCKET_TEST_POSTGRES_URL` set).

use docket_core::RunStatus;
use docket_store::conformance::T0;
use docket_store::{AttemptEnd, ClaimRequest, ConcurrencyKey, DynStore, NewRun, Outcome};
use serde_json::json;
use std::time::{Duration, Instant};

const HELD: usize = 10_000;
const ROUNDS: usize = 200;

fn keyed(key: &str, at: i64) -> NewRun {
    let mut n = NewRun::new("job", json!({}));
    n.run_after = Some(T0.plus_millis(at));
    n.concurrency = Some(ConcurrencyKey {
        key: key.into(),
        limit: 1,
    });
    n
}

fn req(limit: usize) -> ClaimRequest {
    ClaimRequest {
        tenant: None,
        jobs: vec!["job".into()],
        limit,
        now: T0.plus_millis(1_000_000),
        lease_ms: 30_000,
        worker: "w".into(),
    }
}

/// Median of claiming one run and releasing it (the run is due again at
/// once), `ROUNDS` times; the claim alone is timed.
async fn median_claim(store: &DynStore, want_key: Option<&str>) -> Duration {
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let got = store.claim(req(1)).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].concurrency.as_ref().map(|k| k.key.as_str()),
            want_key
        );
        let r = store
            .finish(vec![AttemptEnd {
                run_id: got[0].id,
                lease_id: got[0].lease_id.unwrap(),
                now: T0.plus_millis(1_000_000),
                outcome: Outcome::Released,
            }])
            .await
            .unwrap();
        assert_eq!(r[0].as_ref().unwrap(), &RunStatus::Pending);
    }
    times.sort();
    times[ROUNDS / 2]
}

/// Fills `store` with one running run of key `hot` (limit 1) and `HELD`
/// runs of `hot` held behind it, all due before the one claimable run.
async fn fill(store: &DynStore, claimable: NewRun) {
    store.trigger(vec![keyed("hot", 0)], T0).await.unwrap();
    let running = store.claim(req(1)).await.unwrap();
    assert_eq!(running.len(), 1);
    for chunk in (1..=HELD as i64).collect::<Vec<_>>().chunks(2_000) {
        let batch: Vec<NewRun> = chunk.iter().map(|&i| keyed("hot", i)).collect();
        store.trigger(batch, T0).await.unwrap();
    }
    store.trigger(vec![claimable], T0).await.unwrap();
}

async fn measure(label: &str, open: impl Fn() -> DynStore) {
    // Baseline: the same claimable runs, nothing held.
    for (what, key) in [("unkeyed", None), ("keyed (other key)", Some("cold"))] {
        let make = || {
            let mut n = match key {
                Some(k) => keyed(k, HELD as i64 + 10),
                None => NewRun::new("job", json!({})),
            };
            n.run_after = Some(T0.plus_millis(HELD as i64 + 10));
            n
        };
        let empty = open();
        empty.trigger(vec![make()], T0).await.unwrap();
        let base = median_claim(&empty, key).await;
        let full = open();
        fill(&full, make()).await;
        let held = median_claim(&full, key).await;
        println!(
            "{label}: claim of one {what} run: median {:.3} ms alone, {:.3} ms behind {HELD} held runs of one key",
            base.as_secs_f64() * 1e3,
            held.as_secs_f64() * 1e3
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn claim_cost_behind_held_runs_sqlite() {
    measure("sqlite (file)", || {
        let dir = std::env::temp_dir().join(format!("docket-kcc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.db");
        std::sync::Arc::new(
            docket_store::sqlite::SqliteStore::open(path.to_str().unwrap()).unwrap(),
        )
    })
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn claim_cost_behind_held_runs_postgres() {
    let Ok(url) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        eprintln!("skipping: DOCKET_TEST_POSTGRES_URL is not set");
        return;
    };
    let mut schemas = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..4 {
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let s = docket_store::postgres::PgStore::connect_with(&url, &schema)
            .await
            .unwrap();
        schemas.push(schema);
        stores.push(std::sync::Arc::new(s));
    }
    let all = stores.clone();
    let next = std::sync::Mutex::new(stores.into_iter());
    measure("postgres", || {
        let s: DynStore = next.lock().unwrap().next().unwrap();
        s
    })
    .await;
    // The plans of the keyed claim's reads, on the last (full) schema.
    let pool = all[3].pool();
    for sql in [
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) WITH RECURSIVE k(key) AS (
            SELECT (SELECT min(concurrency_key) FROM runs WHERE status IN ('pending', 'postponed') AND concurrency_key IS NOT NULL)
            UNION ALL
            SELECT (SELECT min(concurrency_key) FROM runs WHERE status IN ('pending', 'postponed') AND concurrency_key IS NOT NULL AND concurrency_key > k.key)
            FROM k WHERE k.key IS NOT NULL)
         SELECT key FROM k WHERE key IS NOT NULL",
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT id FROM runs
         WHERE concurrency_key = 'hot' AND status IN ('pending', 'postponed') AND run_after <= 9999999999999
         ORDER BY priority DESC, run_after, id LIMIT 8",
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT count(*) FROM runs
         WHERE status = 'running' AND concurrency_key = 'hot'",
    ] {
        let plan: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
        println!("{}\n", plan.join("\n"));
    }
    for (s, schema) in all.iter().zip(&schemas) {
        let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(s.pool())
            .await;
    }
}
