//! Tenant fairness across real worker processes on one PostgreSQL schema
//! (docs/FLOW_CONTROL.md, "Fairness"): three `docket-stress-worker`
//! processes, each with its own in-memory tenant cursor, drain tenant A's
//! backlog while tenant B triggers single runs; B's runs are claimed
//! within a bounded number of A's claims, not behind A's backlog.
//!
//! Needs `DOCKET_TEST_POSTGRES_URL`; without it the test says so and passes,
//! except under `CI=true`, where it fails. It works in a fresh schema
//! `t_<uuid>` (dropped when it passes). Every wait is bounded and polls the
//! database or waits for a process. Nothing is asserted about time: the
//! bound is a count of A's attempts, read from the attempt rows.

use docket::{Clock, SystemClock};
use docket_store::postgres::PgStore;
use docket_store::{NewRun, Store};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const URL_VAR: &str = "DOCKET_TEST_POSTGRES_URL";

/// Worker processes.
const PROCESSES: usize = 3;
/// The stress worker's defaults (`--concurrency`; its `WorkerConfig` keeps
/// the default prefetch), and the driver's adaptive prefetch growth
/// (`worker::driver::PREFETCH_GROWTH`).
const CONCURRENCY: usize = 8;
const PREFETCH: usize = 8;
const PREFETCH_GROWTH: usize = 8;
/// The most runs one process holds or is claiming at once, so the most
/// one claim can take: its handler slots plus the largest prefetch
/// (`Prefetch::capacity`; a claim asks for `capacity - in hand`, and the
/// runs of the rounds in flight count as in hand). 8 + 64 = 72.
const MOST_PER_CLAIM: usize = CONCURRENCY + PREFETCH * PREFETCH_GROWTH;
/// The most tenant-A attempts that may start between B's trigger and B's
/// own attempt start. B's run is claimed by the first claim that reads it
/// (every claim asks for at least `PREFETCH` = 8 slots, since a driver
/// claims only when half its capacity is free or a handler slot is idle,
/// and with two tenants and 8 or more slots both get a share: no cursor is
/// involved). Before that, each process may still start A attempts from
/// (1) the rounds it had in flight when B was committed, which read the
/// tenants before B existed, and (2) the rounds running beside the one
/// that takes B, which find B's row locked (`SKIP LOCKED`) or already
/// taken and fill their slots with A. Each of those is at most
/// `MOST_PER_CLAIM` runs per process, as a process never has more in hand
/// or being claimed. A third `MOST_PER_CLAIM` per process is slack for
/// what is not structural: rounds a process may turn while B's trigger
/// transaction commits, and the millisecond resolution of the times
/// compared. 3 × 72 × 3 = 648. Claimed in due-time order (no fairness),
/// B's run waits behind A's whole remaining backlog: tens of thousands.
const A_BEFORE_B_BOUND: usize = PROCESSES * MOST_PER_CLAIM * 3;

/// A's backlog, enqueued before the workers start, and its handler time
/// (it stands for real work, so that the backlog outlasts B's runs).
const A_RUNS: u64 = 30_000;
const A_SLEEP_MS: u64 = 1;
/// B's runs, each triggered once the previous one was claimed.
const B_RUNS: usize = 20;
const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";

fn url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true: {URL_VAR} must be set, PostgreSQL tests may not be skipped")
        }
        _ => {
            eprintln!("skipping: set {URL_VAR}=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
            None
        }
    }
}

/// A fresh schema, its workers' URL and a directory for their logs.
struct Db {
    store: PgStore,
    schema: String,
    worker_url: String,
    dir: PathBuf,
    /// The test's own `LISTEN` channel: every statement that writes
    /// `attempts` or updates `runs` in this schema notifies it (statement
    /// triggers installed by `fresh`), so waits are on events, not a timer.
    channel: String,
}

impl Db {
    async fn fresh(url: &str) -> Db {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let schema = format!("t_{id}");
        let sep = if url.contains('?') { '&' } else { '?' };
        let worker_url = format!(
            "{url}{sep}schema={schema}&application_name=docket-fair-{}",
            &id[20..]
        );
        let store = PgStore::connect_with(url, &schema)
            .await
            .expect("connect to the test database");
        let dir = std::env::temp_dir().join(format!("docket-fair-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let channel = format!("fair_{}", &id[20..]);
        // Statement-level (one notification per claim or end statement,
        // not per row); created in the test's schema, dropped with it.
        sqlx::raw_sql(&format!(
            "CREATE FUNCTION fair_changed() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN PERFORM pg_notify('{channel}', TG_TABLE_NAME); RETURN NULL; END $f$;
             CREATE TRIGGER fair_attempts AFTER INSERT OR UPDATE ON attempts
                 FOR EACH STATEMENT EXECUTE FUNCTION fair_changed();
             CREATE TRIGGER fair_runs AFTER UPDATE ON runs
                 FOR EACH STATEMENT EXECUTE FUNCTION fair_changed();"
        ))
        .execute(store.pool())
        .await
        .expect("install the test's change notifications");
        Db {
            store,
            schema,
            worker_url,
            dir,
            channel,
        }
    }

    /// A listener on the test's channel (see `channel`).
    async fn changes(&self) -> sqlx::postgres::PgListener {
        let mut l = sqlx::postgres::PgListener::connect_with(self.store.pool())
            .await
            .expect("listen");
        l.listen(&self.channel).await.expect("listen");
        l
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn drop_schema(&self) {
        let _ = sqlx::raw_sql(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(self.store.pool())
        .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The worker processes; killed (SIGKILL) if the test fails.
struct Workers {
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Workers {
    /// `n` stress workers at their default concurrency and prefetch. No
    /// planned failures, and a lease long enough that a loaded machine
    /// never lets one expire: every run executes exactly once.
    fn start(db: &Db, n: usize) -> Workers {
        let mut children = Vec::new();
        for i in 0..n {
            let name = format!("fair-w{i}");
            let out = |ext: &str| std::fs::File::create(db.dir.join(format!("{name}.{ext}")));
            let child = Command::new(env!("CARGO_BIN_EXE_docket-stress-worker"))
                .args([
                    "--db",
                    &format!("{}-{name}", db.worker_url),
                    "--name",
                    &name,
                ])
                .args(["--fail-every", "0", "--lease-ms", "60000"])
                .arg("--exec-log")
                .arg(db.dir.join(format!("{name}.exec")))
                .env("DOCKET_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(out("stdout").unwrap())
                .stderr(out("stderr").unwrap())
                .spawn()
                .expect("start docket-stress-worker");
            children.push((name, child));
        }
        Workers {
            children,
            dir: db.dir.clone(),
        }
    }

    fn assert_alive(&mut self) {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "worker {name} exited early ({status}):\n{}",
                    read(&self.dir.join(format!("{name}.stderr")))
                );
            }
        }
    }

    /// SIGTERM to all, then wait (bounded, on each process's exit) for
    /// each to exit cleanly.
    async fn stop(&mut self) {
        for (_, child) in &self.children {
            let ok = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (name, mut child) in std::mem::take(&mut self.children) {
            let pid = child.id().to_string();
            let exited = tokio::task::spawn_blocking(move || child.wait());
            let status = match tokio::time::timeout_at(deadline, exited).await {
                Ok(joined) => joined.unwrap().unwrap(),
                Err(_) => {
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                    panic!("worker {name} ignored SIGTERM for 30 s");
                }
            };
            assert!(
                status.success(),
                "worker {name} exited with {status}:\n{}",
                read(&self.dir.join(format!("{name}.stderr")))
            );
        }
    }

    /// How many times each run was executed, over every process's log.
    fn executions(&self) -> HashMap<String, usize> {
        let mut out: HashMap<String, usize> = HashMap::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "exec") {
                for line in read(&path).lines() {
                    let run = line.split(' ').next().expect("run attempt lease worker");
                    *out.entry(run.to_string()).or_default() += 1;
                }
            }
        }
        out
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `holds` is true or `bound` has passed, checking it again at
/// every change notification (a burst of them is one check) and that the
/// workers still run; whether it held.
async fn wait_until<F, Fut>(
    bound: Duration,
    changes: &mut sqlx::postgres::PgListener,
    workers: &mut Workers,
    mut holds: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if holds().await {
            return true;
        }
        workers.assert_alive();
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Err(_) => return holds().await,
            Ok(n) => {
                n.expect("change notifications");
                while changes.next_buffered().is_some() {}
            }
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[i64], p: f64) -> i64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Three worker processes drain tenant A's backlog of 30,000 due runs,
/// enqueued before they start; tenant B triggers 20 single runs, each once
/// the previous one was claimed. For every B run, the A attempts started
/// between B's trigger and B's own attempt start stay within
/// [`A_BEFORE_B_BOUND`] (a count from the structure of the claims, not a
/// time), while A still had runs waiting when B's last run started (so
/// every B run was measured against the backlog). Every run executes
/// exactly once. Prints B's pickup (attempt start − trigger) percentiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_claim_a_small_tenant_past_a_large_backlog() {
    let Some(url) = url() else { return };
    let db = Db::fresh(&url).await;

    // A's backlog, all due now, in batches of one bulk trigger each.
    let now = SystemClock.now();
    let mut i = 0;
    while i < A_RUNS {
        let batch: Vec<NewRun> = (i..(i + 2_000).min(A_RUNS))
            .map(|i| NewRun {
                tenant: TENANT_A.into(),
                ..NewRun::new("stress", json!({ "i": i, "sleep_ms": A_SLEEP_MS }))
            })
            .collect();
        i += batch.len() as u64;
        db.store.trigger(batch, now).await.unwrap();
    }

    let mut changes = db.changes().await;
    let mut workers = Workers::start(&db, PROCESSES);
    // B starts once every process is claiming A's runs.
    let all_claiming = wait_until(
        Duration::from_secs(60),
        &mut changes,
        &mut workers,
        || async {
            db.scalar("SELECT count(DISTINCT worker) FROM attempts")
                .await
                == PROCESSES as i64
        },
    )
    .await;
    assert!(all_claiming, "not every process claimed within 60 s");

    // B's runs, one at a time: each is triggered once the previous one
    // has its attempt row (was claimed).
    let mut b_ids = Vec::new();
    for i in 0..B_RUNS {
        let run = NewRun {
            tenant: TENANT_B.into(),
            ..NewRun::new("stress", json!({ "i": A_RUNS + i as u64 }))
        };
        let id = run.id;
        db.store
            .trigger(vec![run], SystemClock.now())
            .await
            .unwrap();
        // Bounded: without fairness B's run would wait for A's whole
        // backlog (about half a minute here); the count below then fails.
        let claimed = wait_until(
            Duration::from_secs(120),
            &mut changes,
            &mut workers,
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM attempts WHERE run_id = $1)",
                )
                .bind(id.0)
                .fetch_one(db.store.pool())
                .await
                .unwrap()
            },
        )
        .await;
        let a_pending = db
            .scalar("SELECT count(*) FROM runs WHERE tenant = 'tenant-a' AND status = 'pending'")
            .await;
        assert!(
            claimed,
            "B's run {i} was not claimed within 120 s ({a_pending} of A's runs pending)"
        );
        b_ids.push(id.0);
    }

    // Everything drains: A's rest and B's runs.
    let total = A_RUNS as i64 + B_RUNS as i64;
    let drained = wait_until(
        Duration::from_secs(300),
        &mut changes,
        &mut workers,
        || async {
            db.scalar("SELECT count(*) FROM runs WHERE status = 'completed'")
                .await
                == total
        },
    )
    .await;
    assert!(
        drained,
        "not every run completed within 300 s: {:?}",
        db.store.count_runs(None).await.unwrap()
    );
    workers.stop().await;

    // Each B run: its trigger time, its attempt's start, and the A
    // attempts started between them (both ends included).
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT r.created_at, s.started_at,
                (SELECT count(*) FROM attempts a JOIN runs ra ON ra.id = a.run_id
                 WHERE ra.tenant = $2 AND a.started_at >= r.created_at
                   AND a.started_at <= s.started_at)
         FROM runs r JOIN attempts s ON s.run_id = r.id AND s.attempt = 1
         WHERE r.id = ANY($1) ORDER BY r.created_at",
    )
    .bind(&b_ids)
    .bind(TENANT_A)
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), B_RUNS);
    let a_before: Vec<i64> = rows.iter().map(|r| r.2).collect();
    let last_b_start = rows.iter().map(|r| r.1).max().unwrap();
    // A's runs not yet started when B's last run started.
    let a_waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs r WHERE r.tenant = $1 AND NOT EXISTS
           (SELECT 1 FROM attempts a WHERE a.run_id = r.id AND a.started_at <= $2)",
    )
    .bind(TENANT_A)
    .bind(last_b_start)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    let mut pickup: Vec<i64> = rows.iter().map(|r| r.1 - r.0).collect();
    pickup.sort_unstable();
    eprintln!(
        "B pickup (attempt start - trigger) p50 {} ms, p99 {} ms, max {} ms; \
         A attempts started before each B run: max {}, all {a_before:?} (bound {A_BEFORE_B_BOUND}); \
         A runs not yet started when B's last run started: {a_waiting} of {A_RUNS}",
        pct(&pickup, 0.50),
        pct(&pickup, 0.99),
        pickup[pickup.len() - 1],
        a_before.iter().max().unwrap(),
    );
    for (i, n) in a_before.iter().enumerate() {
        assert!(
            *n as usize <= A_BEFORE_B_BOUND,
            "B's run {i}: {n} of A's attempts started between its trigger and its own start \
             (bound {A_BEFORE_B_BOUND}): it waited behind A's backlog; all: {a_before:?}"
        );
    }
    assert!(
        a_waiting > 0,
        "A's backlog was drained before B's last run started: not every B run was measured against it"
    );

    // Every run executed exactly once: one attempt each, completed, and
    // one execution each in the processes' logs.
    assert_eq!(
        db.scalar("SELECT count(*) FROM attempts WHERE attempt > 1")
            .await,
        0,
        "a run was attempted twice"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM attempts").await, total);
    let execs = workers.executions();
    assert_eq!(execs.len() as i64, total, "every run executed");
    let twice: Vec<_> = execs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "runs executed more than once: {twice:?}");
    db.drop_schema().await;
}
