//! Many worker processes against one PostgreSQL database: real OS processes
//! (`docket-stress-worker`), killed with SIGKILL, stopped with SIGSTOP and
//! resumed with SIGCONT, cut off from the database with
//! `pg_terminate_backend`, and (with `DOCKET_TEST_PG_RESTART=1`) left
//! without a database while PostgreSQL restarts.
//!
//! Needs `DOCKET_TEST_POSTGRES_URL`; without it each test says so and
//! passes. Each test works in a fresh schema `t_<uuid>` (dropped when the
//! test passes) and names its workers' connections with an
//! `application_name` of its own, so it never touches another test's rows or
//! connections. The tests run one at a time (they share two CPUs).
//!
//! Every wait is bounded and polls the database or waits for a process.

use docket::{Clock, SystemClock, Timestamp};
use docket_store::postgres::PgStore;
use docket_store::{ClaimRequest, NewRun, Store};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const URL_VAR: &str = "DOCKET_TEST_POSTGRES_URL";
const RESTART_VAR: &str = "DOCKET_TEST_PG_RESTART";

/// One test at a time: each starts four processes on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            eprintln!(
                "skipping: set {URL_VAR}=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests"
            );
            None
        }
    }
}

/// A fresh schema for one test, its workers' URL and application name.
struct Db {
    store: PgStore,
    schema: String,
    app: String,
    worker_url: String,
    dir: PathBuf,
}

impl Db {
    async fn fresh(url: &str, tag: &str) -> Db {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let schema = format!("t_{id}");
        let app = format!("docket-mp-{tag}-{}", &id[20..]);
        let sep = if url.contains('?') { '&' } else { '?' };
        // Each worker appends `-<its name>` to the application name.
        let worker_url = format!("{url}{sep}schema={schema}&application_name={app}");
        // The test's own connections keep the default application name, so
        // cutting the workers off never cuts the test off.
        let store = PgStore::connect_with(url, &schema)
            .await
            .expect("connect to the test database");
        let dir = std::env::temp_dir().join(format!("docket-mp-{tag}-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        Db {
            store,
            schema,
            app,
            worker_url,
            dir,
        }
    }

    async fn trigger(&self, from: u64, n: u64, sleep_ms: u64) {
        let now = SystemClock.now();
        let mut i = from;
        while i < from + n {
            let batch: Vec<NewRun> = (i..(i + 2_000).min(from + n))
                .map(|i| NewRun::new("stress", json!({ "i": i, "sleep_ms": sleep_ms })))
                .collect();
            i += batch.len() as u64;
            self.store.trigger(batch, now).await.unwrap();
        }
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn completed(&self) -> i64 {
        self.scalar("SELECT count(*) FROM runs WHERE status = 'completed'")
            .await
    }

    /// Waits (bounded) until `n` runs are completed.
    async fn wait_completed(&self, n: i64, bound: Duration, workers: &mut Workers) {
        let done = poll_until(bound, Some(&mut *workers), || async {
            self.completed().await >= n
        })
        .await;
        if !done {
            let counts = self.store.count_runs(None).await.unwrap();
            panic!(
                "only {} of {n} runs completed within {bound:?}: {counts:?}\n{}",
                self.completed().await,
                workers.stderr_tail()
            );
        }
    }

    /// Terminates every connection of the workers; returns how many.
    async fn cut_workers_off(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name LIKE $1 || '-%'",
        )
        .bind(&self.app)
        .fetch_one(self.store.pool())
        .await
        .unwrap()
    }

    /// The invariants every scenario must end with; returns the number of
    /// retries scheduled.
    async fn check_evidence(&self, runs: i64, workers: &Workers) -> i64 {
        // Nothing lost: every run completed.
        assert_eq!(self.completed().await, runs, "every run ends completed");
        assert_eq!(self.scalar("SELECT count(*) FROM runs").await, runs);
        // None completed twice.
        assert_eq!(
            self.scalar(
                "SELECT count(*) FROM (SELECT run_id FROM attempts WHERE outcome = 'completed'
                 GROUP BY run_id HAVING count(*) > 1) x"
            )
            .await,
            0,
            "a run completed twice"
        );
        assert_eq!(
            self.scalar("SELECT count(*) FROM attempts WHERE outcome = 'completed'")
                .await,
            runs
        );
        // Executions = runs + scheduled retries, from the attempt rows: every
        // attempt either completed its run or was retried by the policy.
        let attempts = self.scalar("SELECT count(*) FROM attempts").await;
        let retries = self
            .scalar("SELECT count(*) FROM attempts WHERE retry_policy IS NOT NULL")
            .await;
        assert_eq!(
            attempts,
            runs + retries,
            "attempts = runs + scheduled retries"
        );
        assert_eq!(
            self.scalar(
                "SELECT count(*) FROM attempts WHERE retry_policy IS NOT NULL
                 AND (retry_policy <> 'stress' OR eligible_at IS NULL OR delay_ms IS NULL
                      OR outcome NOT IN ('failed', 'lease_expired'))"
            )
            .await,
            0,
            "every retry carries the policy's decision"
        );
        // Every retry decision has its event.
        assert_eq!(
            self.scalar("SELECT count(*) FROM events WHERE kind = 'retry_scheduled'")
                .await,
            retries
        );
        // No attempt ran twice under one lease: each lease id appears at
        // most once among all processes' executions, and each belongs to an
        // attempt row.
        let execs = workers.executions();
        let mut seen = HashSet::new();
        for (lease, line) in &execs {
            assert!(seen.insert(lease.clone()), "lease ran twice: {line}");
        }
        let leases: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT lease_id FROM attempts")
            .fetch_all(self.store.pool())
            .await
            .unwrap();
        let leases: HashSet<String> = leases.iter().map(|l| l.to_string()).collect();
        for (lease, line) in &execs {
            assert!(
                leases.contains(lease),
                "execution without attempt row: {line}"
            );
        }
        // Every attempt that reported an outcome was executed exactly once
        // (an expired lease may have been claimed and never started).
        let reported: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT lease_id FROM attempts WHERE outcome <> 'lease_expired'")
                .fetch_all(self.store.pool())
                .await
                .unwrap();
        for l in reported {
            assert!(
                seen.contains(&l.to_string()),
                "attempt {l} has an outcome but no execution"
            );
        }
        retries
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

/// The worker processes of one test; killed (SIGKILL) if the test fails.
struct Workers {
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Workers {
    fn start(db: &Db, names: &[&str]) -> Workers {
        let mut w = Workers {
            children: Vec::new(),
            dir: db.dir.clone(),
        };
        for name in names {
            w.spawn(db, name);
        }
        w
    }

    /// Starts one more worker process.
    fn spawn(&mut self, db: &Db, name: &str) {
        self.spawn_with(db, name, &[]);
    }

    /// Starts one more worker process with extra arguments.
    fn spawn_with(&mut self, db: &Db, name: &str, extra: &[&str]) {
        let stderr = std::fs::File::create(db.dir.join(format!("{name}.stderr"))).unwrap();
        let stdout = std::fs::File::create(db.dir.join(format!("{name}.stdout"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_docket-stress-worker"))
            .args(["--db", &format!("{}-{name}", db.worker_url), "--name", name])
            .args([
                "--concurrency",
                "8",
                "--lease-ms",
                "2000",
                "--fail-every",
                "7",
            ])
            .arg("--exec-log")
            .arg(db.dir.join(format!("{name}.exec")))
            .args(extra)
            .env("DOCKET_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start docket-stress-worker");
        self.children.push((name.to_string(), child));
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to one worker with kill(1).
    fn signal(&self, name: &str, signal: &str) {
        let (_, child) = self
            .children
            .iter()
            .find(|(n, _)| n == name)
            .expect("a worker of that name");
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} {name}");
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

    /// SIGKILL, at once: the process gets no chance to release anything.
    fn kill9(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .expect("a worker of that name");
        let (_, mut child) = self.children.remove(i);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM to all, then wait (bounded) for each to exit cleanly.
    fn stop(&mut self) {
        for (_, child) in &self.children {
            let ok = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (name, child) in &mut self.children {
            let status = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                assert!(Instant::now() < deadline, "worker {name} ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(
                status.success(),
                "worker {name} exited with {status}:\n{}",
                read(&self.dir.join(format!("{name}.stderr")))
            );
        }
        self.children.clear();
    }

    /// Every execution of every process (also killed ones): lease id → line.
    fn executions(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "exec") {
                for line in read(&path).lines() {
                    let lease = line.split(' ').nth(2).expect("run attempt lease worker");
                    out.push((lease.to_string(), line.to_string()));
                }
            }
        }
        out
    }

    fn stderr_of(&self, name: &str) -> String {
        read(&self.dir.join(format!("{name}.stderr")))
    }

    fn stderr_tail(&self) -> String {
        let mut s = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "stderr") {
                let text = read(&path);
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                s.push_str(&format!("{}: {:?}\n", path.display(), tail));
            }
        }
        s
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

/// (attempt, worker, outcome, error class, retry policy, eligible at).
type AttemptRow = (
    i32,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
);

fn names(tag: &str) -> Vec<String> {
    (0..4).map(|i| format!("{tag}-w{i}")).collect()
}

/// 4 processes drain 10,000 runs, every 7th failing its first attempt with
/// `unavailable`; then one process is killed with SIGKILL while it holds
/// runs, and those come back after lease expiry through the retry policy
/// and finish elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_drain_then_one_is_killed() {
    let Some(url) = url() else { return };
    let _serial = SERIAL.lock().await;
    let db = Db::fresh(&url, "kill").await;
    let names = names("kill");
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();

    // Phase 1: 10,000 runs, 1 in 7 failing transiently once.
    db.trigger(0, 10_000, 0).await;
    let mut workers = Workers::start(&db, &refs);
    db.wait_completed(10_000, Duration::from_secs(120), &mut workers)
        .await;
    let retries = db.check_evidence(10_000, &workers).await;
    // The planned failures, each retried once, then completed.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM attempts WHERE attempt = 1 AND error_class = 'unavailable'
             AND outcome = 'failed' AND retry_policy = 'stress'"
        )
        .await,
        1_429 // multiples of 7 below 10,000
    );
    assert!(retries >= 1_429);
    // All four processes took part.
    assert_eq!(
        db.scalar("SELECT count(DISTINCT worker) FROM attempts")
            .await,
        4
    );

    // Phase 2: slower runs; kill one process in the middle.
    db.trigger(10_000, 3_000, 20).await;
    let victim = refs[0];
    // Wait until the victim is in the thick of it.
    let in_thick = || async {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE status = 'running' AND worker = $1",
        )
        .bind(victim)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
        held >= 4 && db.completed().await >= 10_300
    };
    assert!(
        poll_until(Duration::from_secs(60), Some(&mut workers), in_thick).await,
        "the victim never held runs"
    );
    workers.kill9(victim);
    // A statement the victim sent just before it died still runs to its
    // end on the server; the run states settle once its sessions are gone.
    assert!(
        poll_until(Duration::from_secs(30), None, || sessions_gone(&db, victim)).await,
        "the victim's sessions outlived it"
    );
    let orphans: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM runs WHERE status = 'running' AND worker = $1")
            .bind(victim)
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    assert!(!orphans.is_empty(), "the victim held no runs when killed");
    eprintln!(
        "killed {victim} holding {} runs; phase 1 retries: {retries}",
        orphans.len()
    );
    db.wait_completed(13_000, Duration::from_secs(120), &mut workers)
        .await;
    db.check_evidence(13_000, &workers).await;
    // Each orphan: its attempt under the dead worker's lease expired and
    // went through the policy (a retry decision, not an immediate
    // re-dispatch); a later attempt by another process completed it.
    for id in &orphans {
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT attempt, worker, outcome, error_class, retry_policy, eligible_at
                 FROM attempts WHERE run_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(db.store.pool())
        .await
        .unwrap();
        let (expired_at, dead) = rows
            .iter()
            .enumerate()
            .rev()
            .find(|(_, r)| r.1 == victim)
            .expect("an attempt of the victim");
        assert_eq!(dead.2, "lease_expired", "run {id}: {rows:?}");
        assert_eq!(dead.3.as_deref(), Some("lease_expired"));
        assert_eq!(dead.4.as_deref(), Some("stress"));
        assert!(dead.5.is_some());
        let last = rows.last().unwrap();
        assert!(
            expired_at < rows.len() - 1,
            "run {id} not retried: {rows:?}"
        );
        assert_eq!(last.2, "completed");
        assert_ne!(last.1, victim);
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT kind FROM events WHERE run_id = $1 ORDER BY id")
                .bind(id)
                .fetch_all(db.store.pool())
                .await
                .unwrap();
        let pos = |k: &str| kinds.iter().position(|x| x == k);
        assert!(
            pos("lease_expired") < pos("retry_scheduled")
                && pos("retry_scheduled") < pos("run_completed"),
            "run {id}: {kinds:?}"
        );
    }
    workers.stop();
    db.drop_schema().await;
}

/// The workers' connections are terminated twice in the middle of a load:
/// they report it, back off, reconnect and finish; no run is lost, none is
/// completed twice, nothing needs a manual step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_terminated_connections() {
    let Some(url) = url() else { return };
    let _serial = SERIAL.lock().await;
    let db = Db::fresh(&url, "term").await;
    let names = names("term");
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let runs = 6_000;
    db.trigger(0, runs as u64, 2).await;
    let mut workers = Workers::start(&db, &refs);
    let mut cut = 0;
    for at in [1_500, 3_500] {
        db.wait_completed(at, Duration::from_secs(120), &mut workers)
            .await;
        let n = db.cut_workers_off().await;
        assert!(n >= 4, "expected every worker connected, terminated {n}");
        cut += n;
    }
    db.wait_completed(runs, Duration::from_secs(120), &mut workers)
        .await;
    let retries = db.check_evidence(runs, &workers).await;
    let expired = db
        .scalar("SELECT count(*) FROM attempts WHERE outcome = 'lease_expired'")
        .await;
    eprintln!(
        "terminated {cut} worker connections in two rounds; {retries} retries, {expired} of them after a lease expiry"
    );
    // The workers said so: at least one warning per process about the
    // lost connection.
    for name in &refs {
        let err = workers.stderr_of(name);
        assert!(
            err.contains("WARN") || err.contains("ERROR"),
            "worker {name} reported nothing after {cut} terminated connections:\n{err}"
        );
    }
    workers.stop();
    db.drop_schema().await;
}

/// PostgreSQL restarts in the middle of a load (`DOCKET_TEST_PG_RESTART=1`
/// only: it cuts every other test's connections too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_a_postgres_restart() {
    let Some(url) = url() else { return };
    if std::env::var(RESTART_VAR).as_deref() != Ok("1") {
        eprintln!(
            "skipping: set {RESTART_VAR}=1 to restart PostgreSQL during a load (disturbs other tests)"
        );
        return;
    }
    let _serial = SERIAL.lock().await;
    let db = Db::fresh(&url, "restart").await;
    let names = names("restart");
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let runs = 6_000;
    db.trigger(0, runs as u64, 2).await;
    let mut workers = Workers::start(&db, &refs);
    db.wait_completed(2_000, Duration::from_secs(120), &mut workers)
        .await;
    let version = db
        .scalar("SELECT current_setting('server_version_num')::bigint / 10000")
        .await;
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version.to_string(),
            "main",
            "restart",
        ])
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart failed: {status}");
    // The test's own pool reconnects like the workers'.
    db.wait_completed(runs, Duration::from_secs(180), &mut workers)
        .await;
    let retries = db.check_evidence(runs, &workers).await;
    let mut warned = HashMap::new();
    for name in &refs {
        let err = workers.stderr_of(name);
        let first = err.lines().find(|l| l.contains("WARN")).map(str::to_string);
        eprintln!("{name} after the restart: {first:?}");
        warned.insert(*name, first.is_some());
    }
    eprintln!("restart survived; {retries} retries");
    assert!(
        warned.values().all(|w| *w),
        "every worker reports the restart: {warned:?}"
    );
    workers.stop();
    db.drop_schema().await;
}

/// Waits until `holds` answers true, at most `bound`; false if it never
/// did. What these tests wait for is changed by OTHER processes (a claim,
/// a completion, a session ending, a late end refused) and no event
/// crosses that boundary (Docket notifies triggers only), so this is the
/// one place here that looks again after a pause (20 ms), bounded, and
/// fails at once when a worker process died.
async fn poll_until<F, Fut>(
    bound: Duration,
    mut workers: Option<&mut Workers>,
    mut holds: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if holds().await {
            return true;
        }
        if let Some(w) = workers.as_deref_mut() {
            w.assert_alive();
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a killed process's sessions are gone: a statement it sent just
/// before it died still runs to its end on the server.
async fn sessions_gone(db: &Db, name: &str) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(format!("{}-{name}", db.app))
    .fetch_one(db.store.pool())
    .await
    .unwrap()
        == 0
}

/// How long after its lease expired an expired lease must have been reaped
/// while any worker runs: 1.25 × the stress worker's `reap_interval`
/// (500 ms, jittered) plus one reap round, with slack for a loaded 2-core
/// machine. Before every worker reaped, a stopped leader made this
/// unbounded.
const REAP_BOUND_MS: i64 = 3_000;
/// The stress worker's lease length.
const LEASE_MS: i64 = 2_000;

/// The process that would lead periodic work is stopped (SIGSTOP: a long
/// pause, a frozen VM) while it holds runs, and another is killed
/// (SIGKILL) while it holds runs. The third recovers both processes' runs
/// within the documented bound, read from the evidence (each
/// `lease_expired` event's time against its lease's expiry and against the
/// kill). Then the stopped process resumes (SIGCONT): its late ends are
/// refused, nothing is reaped or completed twice, and it goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_process_does_not_stop_lease_recovery() {
    let Some(url) = url() else { return };
    let _serial = SERIAL.lock().await;
    let db = Db::fresh(&url, "stop").await;
    let (leader, victim, rescuer) = ("stop-leader", "stop-victim", "stop-rescuer");

    // An expired lease planted before any worker runs: once the first
    // process has reaped it, its reaper has run (and, when reaping needed a
    // leader, it led and kept leading while its session lived).
    let past = Timestamp(SystemClock.now().0 - 60_000);
    let ghost = NewRun::new("stress", json!({ "i": 1 }));
    let ghost_id = ghost.id;
    db.store.trigger(vec![ghost], past).await.unwrap();
    let planted = db
        .store
        .claim(ClaimRequest {
            tenant: None,
            jobs: vec!["stress".into()],
            limit: 1,
            now: past,
            lease_ms: 1_000,
            worker: "ghost".into(),
        })
        .await
        .unwrap();
    assert_eq!(planted.len(), 1);
    let mut workers = Workers::start(&db, &[leader]);
    db.wait_completed(1, Duration::from_secs(60), &mut workers)
        .await;
    let ghost_rows: Vec<(String, String)> =
        sqlx::query_as("SELECT worker, outcome FROM attempts WHERE run_id = $1 ORDER BY attempt")
            .bind(ghost_id.0)
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    assert_eq!(
        ghost_rows,
        [
            ("ghost".to_string(), "lease_expired".to_string()),
            (leader.to_string(), "completed".to_string())
        ]
    );

    // The leader takes runs, and is stopped while it holds them.
    db.trigger(100, 16, 800).await;
    let held_by = |name: &'static str| {
        let pool = db.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM runs WHERE status = 'running' AND worker = $1",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(
        poll_until(Duration::from_secs(30), Some(&mut workers), || async {
            held_by(leader).await >= 4
        })
        .await,
        "the leader never held runs"
    );
    workers.signal(leader, "STOP");
    let stopped_at = SystemClock.now().0;

    // Two more processes; one is killed while it holds runs.
    workers.spawn(&db, victim);
    workers.spawn(&db, rescuer);
    db.trigger(1_000, 200, 300).await;
    assert!(
        poll_until(Duration::from_secs(60), Some(&mut workers), || async {
            held_by(victim).await >= 4
        })
        .await,
        "the victim never held runs"
    );
    workers.kill9(victim);
    let killed_at = SystemClock.now().0;
    let orphan_leases = |name: &'static str| {
        let pool = db.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "SELECT lease_id FROM runs WHERE status = 'running' AND worker = $1",
            )
            .bind(name)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    // The victim's last statement may still be running on the server;
    // its sessions end within moments of its death.
    assert!(
        poll_until(Duration::from_secs(30), None, || sessions_gone(&db, victim)).await,
        "the victim's sessions outlived it"
    );
    let victim_leases = orphan_leases(victim).await;
    assert!(
        !victim_leases.is_empty(),
        "the victim held no runs when killed"
    );

    // Everything completes while the leader is still stopped.
    db.wait_completed(1 + 16 + 200, Duration::from_secs(60), &mut workers)
        .await;

    // The bound, from the evidence: every lease of the stopped and the
    // killed process was reaped (once) soon after it expired.
    let reaped: Vec<(uuid::Uuid, i64, i64, String)> = sqlx::query_as(
        "SELECT e.lease_id, e.at, (e.data->>'lease_expires_at')::int8, a.worker
         FROM events e JOIN attempts a ON a.lease_id = e.lease_id
         WHERE e.kind = 'lease_expired' AND a.worker = ANY($1)",
    )
    .bind(vec![leader.to_string(), victim.to_string()])
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    let leader_reaped = reaped
        .iter()
        .filter(|(_, at, _, w)| w == leader && *at > stopped_at)
        .count();
    assert!(
        leader_reaped >= 1,
        "the stopped leader's runs were reaped: {reaped:?}"
    );
    for l in &victim_leases {
        assert!(
            reaped.iter().any(|(lease, _, _, _)| lease == l),
            "victim lease {l} not reaped"
        );
    }
    let mut worst = 0;
    for (lease, at, expired, _) in &reaped {
        let late = at - expired;
        assert!(
            (0..=REAP_BOUND_MS).contains(&late),
            "lease {lease} reaped {late} ms after it expired (bound {REAP_BOUND_MS} ms)"
        );
        worst = worst.max(late);
    }
    let since_kill = reaped
        .iter()
        .filter(|(l, _, _, _)| victim_leases.contains(l))
        .map(|(_, at, _, _)| at - killed_at)
        .max()
        .unwrap();
    assert!(
        since_kill <= LEASE_MS + REAP_BOUND_MS,
        "the victim's runs came back {since_kill} ms after the kill"
    );
    eprintln!(
        "stopped leader's leases reaped: {leader_reaped}; killed victim's: {}; worst delay after expiry {worst} ms; last victim run back {since_kill} ms after the kill",
        victim_leases.len()
    );

    // The leader resumes: its late ends are refused, and it works on; the
    // rescuer leaves so that the last runs are the leader's.
    workers.signal(leader, "CONT");
    let i = workers
        .children
        .iter()
        .position(|(n, _)| n == rescuer)
        .unwrap();
    let (_, resc) = workers.children.remove(i);
    let mut rest = Workers {
        children: vec![(rescuer.to_string(), resc)],
        dir: db.dir.clone(),
    };
    rest.stop();
    db.trigger(5_000, 20, 0).await;
    db.wait_completed(1 + 16 + 200 + 20, Duration::from_secs(60), &mut workers)
        .await;
    // The attempts it was running when stopped finished after their runs
    // were reaped: their ends were refused (kept as evidence), not applied.
    let refused_late_ends = || async {
        db.scalar(&format!(
            "SELECT count(*) FROM events e JOIN attempts a ON a.lease_id = e.lease_id
             WHERE e.kind = 'stale_write_refused' AND a.worker = '{leader}'
               AND a.outcome = 'lease_expired'"
        ))
        .await
    };
    assert!(
        poll_until(Duration::from_secs(30), Some(&mut workers), || async {
            refused_late_ends().await >= 1
        })
        .await,
        "the resumed leader's late ends left no evidence"
    );
    eprintln!(
        "the resumed leader's refused late ends: {}",
        refused_late_ends().await
    );
    workers.stop();
    db.check_evidence(1 + 16 + 200 + 20, &rest).await;
    // Each expired lease was reaped once: one `lease_expired` attempt row,
    // one `lease_expired` event.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM (SELECT lease_id FROM events WHERE kind = 'lease_expired'
             GROUP BY lease_id HAVING count(*) > 1) x"
        )
        .await,
        0,
        "a lease reaped twice"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM events WHERE kind = 'lease_expired'")
            .await,
        db.scalar("SELECT count(*) FROM attempts WHERE outcome = 'lease_expired'")
            .await,
    );
    // The resumed leader's late writes were refused, never applied.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM events e JOIN attempts a ON a.lease_id = e.lease_id
             WHERE e.kind = 'stale_write_refused' AND a.outcome <> 'lease_expired'"
        )
        .await,
        0
    );
    db.drop_schema().await;
}

/// Schedules across processes: four processes run a scheduler over a
/// schedule with a slot every second for 15 s; the leader is killed
/// (SIGKILL) and the next leader stopped (SIGSTOP) midway. Every slot makes
/// exactly one run, none is missing, each fires within the documented bound
/// (lead + tick, plus slack for a loaded machine), and the stopped leader,
/// resumed, writes nothing with its stale token.
#[tokio::test]
async fn schedules_fire_each_slot_once_across_processes() {
    const TICK_MS: i64 = 200;
    const LEAD_MS: i64 = 2_000;
    const SLACK_MS: i64 = 1_500;
    let Some(url) = url() else { return };
    let _serial = SERIAL.lock().await;
    let db = Db::fresh(&url, "sched").await;
    // The schema exists once the store connected; the schedule starts in 3 s
    // (process start-up) and has 16 slots, one a second.
    let now = SystemClock.now();
    let start = Timestamp((now.0 / 1_000 + 3) * 1_000);
    let end = start.plus_millis(15_000);
    let def = docket_store::ScheduleDef {
        tenant: docket_store::DEFAULT_TENANT.into(),
        name: "mp".into(),
        job: "stress".into(),
        input: json!({ "i": "{{ slot_ms }}" }),
        cron: None,
        every_ms: Some(1_000),
        timezone: "UTC".into(),
        start_at: Some(start),
        end_at: Some(end),
        jitter_ms: 0,
        overlap: docket::Overlap::Allow,
        catch_up: docket::CatchUp::Last,
        catch_up_window_ms: 3_600_000,
        paused: false,
        source: "api".into(),
    };
    use docket_store::ScheduleStore;
    db.store
        .put_schedule(docket_store::SchedulePut {
            def,
            actor: "test".into(),
            comment: None,
            now,
        })
        .await
        .unwrap();
    let tick = TICK_MS.to_string();
    let lead = LEAD_MS.to_string();
    let extra = [
        "--scheduler-tick-ms",
        tick.as_str(),
        "--scheduler-lead-ms",
        lead.as_str(),
    ];
    let names = ["s1", "s2", "s3", "s4"];
    let mut workers = Workers {
        children: Vec::new(),
        dir: db.dir.clone(),
    };
    for n in names {
        workers.spawn_with(&db, n, &extra);
    }
    let leader = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT holder FROM leaders WHERE task = 'schedules' AND expires_at > $1",
        )
        .bind(SystemClock.now().0)
        .fetch_optional(db.store.pool())
        .await
        .unwrap()
    };
    let fired = || db.scalar("SELECT count(*) FROM runs");
    // Kill the leader after the 4th slot.
    assert!(
        poll_until(Duration::from_secs(30), Some(&mut workers), || async {
            fired().await >= 4
        })
        .await,
        "the first slots never fired"
    );
    let first = leader().await.expect("a leader");
    workers.kill9(&first);
    // The next leader takes over; stop it after the 9th slot.
    assert!(
        poll_until(Duration::from_secs(30), Some(&mut workers), || async {
            fired().await >= 9 && leader().await.is_some_and(|l| l != first)
        })
        .await,
        "no second leader"
    );
    let second = leader().await.expect("the second leader");
    workers.signal(&second, "STOP");
    // The remaining processes finish the schedule: 16 slots, one run each.
    let done = poll_until(Duration::from_secs(40), None, || async {
        fired().await >= 16
            && db
                .scalar("SELECT count(*) FROM schedule_history WHERE kind = 'fired'")
                .await
                >= 16
    })
    .await;
    // Resume the stopped leader and let it tick with its stale token.
    workers.signal(&second, "CONT");
    assert!(
        done,
        "only {} slots fired\n{}",
        fired().await,
        workers.stderr_tail()
    );
    let third = leader().await.expect("a leader after the stop");
    assert!(
        third != first && third != second,
        "{first} {second} {third}"
    );
    tokio::time::sleep(Duration::from_millis(3 * TICK_MS as u64)).await;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT h.run_id, h.slot_at, h.at FROM schedule_history h WHERE h.kind = 'fired' ORDER BY h.slot_at",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    let slots: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let expect: Vec<i64> = (0..16).map(|i| start.0 + i * 1_000).collect();
    assert_eq!(slots, expect, "each slot fired once, none missing");
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM runs ORDER BY idempotency_key")
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    let want: Vec<String> = expect
        .iter()
        .map(|t| format!("schedule:mp:{}", Timestamp(*t).to_rfc3339()))
        .collect();
    assert_eq!(keys, want, "one run per slot");
    let mut worst = 0;
    for (_, slot, at) in &rows {
        let late = at - slot;
        worst = worst.max(late);
        assert!(
            (0..=LEAD_MS + TICK_MS + SLACK_MS).contains(&late),
            "slot {slot} fired {late} ms late (bound {} ms)",
            LEAD_MS + TICK_MS
        );
    }
    println!(
        "worst slot delay {worst} ms with a killed and a stopped leader (bound {} + slack)",
        LEAD_MS + TICK_MS
    );
    // Every run completes.
    db.wait_completed(16, Duration::from_secs(60), &mut workers)
        .await;
    workers.stop();
    db.drop_schema().await;
}
