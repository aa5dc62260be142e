//! `docket bench W1|W2|W3|all --separate`: the workloads as the peer
//! harness (`peers/common/driver.sh` with `peers/docket/`) runs them, the
//! producer and the worker each in a process of its own, so its figures
//! can be reproduced without the peers.
//!
//! This process only orchestrates: it starts this binary again as the
//! hidden `docket bench-child <role>` for each side, reads the child's
//! `READY` and `RESULT {json}` lines from its stdout (each wait bounded;
//! a child that fails, exits early or says nothing in time is killed and
//! its stderr reported), and computes the report from their results.
//!
//! - W1: `enqueue-w1` triggers the runs in batches of 1,000 and exits;
//!   then `worker-w1` starts, takes t0 right before starting its worker,
//!   counts executions, and once every run executed polls the database
//!   until none is pending or running: t1. Processed runs/s = N / (t1 − t0).
//! - W2: `worker-w2` starts (default settings, concurrency 8), says
//!   `READY` and stays idle for 3 s; then `produce-w2` triggers one run at
//!   a time, 100 a second on an absolute schedule. Pickup = handler start in
//!   the worker − trigger return in the producer (0 if the handler started
//!   first), and as the harness measures it, from the instant right before
//!   the trigger call. Both processes read the system's wall clock
//!   (`SystemTime`, as the harness's Docket peer does).
//! - W3: `enqueue-w3` triggers the runs (3 attempts, no backoff: the
//!   harness's policy), `worker-w3` runs them; each fails its first two
//!   executions. Wall = worker start → nothing pending or running. The
//!   worker counts executions per run and, after it stopped, the attempt
//!   rows from the database: both must be exactly 3 per run.
//!
//! Peak RSS is the worker process's high-water mark (`VmHWM`, what
//! `/usr/bin/time -v` reports as "Maximum resident set size"), read by the
//! worker itself after its worker stopped.

use crate::bench::{peak_rss_mb, percentile, BoxError, Db, Report};
use docket::{
    Docket, Job, JobError, RetryPolicy, RunFilter, RunStatus, TriggerOptions, WorkerConfig,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::Notify;

/// W1's and W3's trigger batches, as the harness (`W1_BATCH`).
const BATCH: usize = 1_000;
/// W2: triggers a second (`W2_RATE`).
const RATE: u32 = 100;
/// W2: how long the worker sits idle before the producer starts
/// (`W2_IDLE_S`): the part of the workload that lets its polling back off.
const IDLE: Duration = Duration::from_secs(3);
/// W3: executions per run (two planned failures, then success).
const W3_EXECUTIONS: u32 = 3;
/// Bounds: a child's start-up (to `READY`) and a whole workload step.
const START_BOUND: Duration = Duration::from_secs(60);
const STEP_BOUND: Duration = Duration::from_secs(600);

/// One side of a workload, run by `docket bench-child`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// W1: trigger the runs, print the enqueue time.
    EnqueueW1,
    /// W1: drain them.
    WorkerW1,
    /// W2: trigger one run at a time at 100/s.
    ProduceW2,
    /// W2: an idle worker; record each handler's start.
    WorkerW2,
    /// W3: trigger the failing runs.
    EnqueueW3,
    /// W3: run them to success.
    WorkerW3,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::EnqueueW1 => "enqueue-w1",
            Role::WorkerW1 => "worker-w1",
            Role::ProduceW2 => "produce-w2",
            Role::WorkerW2 => "worker-w2",
            Role::EnqueueW3 => "enqueue-w3",
            Role::WorkerW3 => "worker-w3",
        }
    }
}

/// Arguments of the hidden `docket bench-child` (started by `docket bench
/// --separate`; not for people).
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// This process's side of the workload.
    #[arg(value_enum)]
    role: Role,
    /// The database, already chosen (and for PostgreSQL its schema) by the
    /// parent.
    #[arg(long)]
    db: String,
    /// Runs in the workload.
    #[arg(long)]
    runs: usize,
    /// Worker concurrency (and prefetch).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

// ---------------------------------------------------------------- parent

/// Runs workload `w` (`W1`, `W2` or `W3`) on `db` in separate processes.
pub(crate) async fn run(
    w: &str,
    db: &Db,
    runs: Option<usize>,
    concurrency: usize,
) -> Result<Report, BoxError> {
    let base = Report {
        workload: w.to_string(),
        backend: db.backend.clone(),
        mode: "separate".into(),
        concurrency,
        ..Default::default()
    };
    match w {
        "W1" => w1(db, runs.unwrap_or(10_000), concurrency, base).await,
        "W2" => w2(db, runs.unwrap_or(500), base).await,
        _ => w3(db, runs.unwrap_or(1_000), concurrency, base).await,
    }
}

async fn w1(db: &Db, runs: usize, concurrency: usize, base: Report) -> Result<Report, BoxError> {
    let mut enq = Child::spawn(Role::EnqueueW1, db, runs, concurrency)?;
    let e = enq.result(STEP_BOUND).await?;
    enq.exit(START_BOUND).await?;
    let mut wk = Child::spawn(Role::WorkerW1, db, runs, concurrency)?;
    wk.line("READY", START_BOUND).await?;
    let r = wk.result(STEP_BOUND).await?;
    wk.exit(START_BOUND).await?;
    let (enqueue_s, drain_s) = (num(&e, "enqueue_s")?, num(&r, "drain_s")?);
    let executions = count(&r, "executions")?;
    check_completed(&r, runs)?;
    Ok(Report {
        runs,
        enqueue_per_s: Some(runs as f64 / enqueue_s),
        processed_per_s: Some(runs as f64 / drain_s),
        executions_expected: Some(runs),
        executions_actual: Some(executions),
        duplicates: Some(executions - count(&r, "distinct")?),
        wall_s: enqueue_s + drain_s,
        peak_rss_mb: r["peak_rss_mb"].as_f64(),
        ..base
    })
}

async fn w2(db: &Db, runs: usize, base: Report) -> Result<Report, BoxError> {
    let mut wk = Child::spawn(Role::WorkerW2, db, runs, 8)?;
    wk.line("READY", START_BOUND).await?;
    // The workload's idle phase (the harness's W2_IDLE_S), not a wait for
    // anything: the worker's wake-up checks back off while it is idle.
    tokio::time::sleep(IDLE).await;
    let mut pr = Child::spawn(Role::ProduceW2, db, runs, 8)?;
    let p = pr.result(STEP_BOUND).await?;
    pr.exit(START_BOUND).await?;
    let r = wk.result(STEP_BOUND).await?;
    wk.exit(START_BOUND).await?;
    check_completed(&r, runs)?;
    let before = floats(&p, "before")?;
    let returned = floats(&p, "returned")?;
    let mut started: Vec<Option<f64>> = vec![None; runs];
    let mut duplicates = 0;
    for s in r["started"].as_array().ok_or("worker-w2: no `started`")? {
        let (i, t) = (s[0].as_u64(), s[1].as_f64());
        let (Some(i), Some(t)) = (i, t) else {
            return Err(format!("worker-w2: bad start {s}").into());
        };
        match started.get_mut(i as usize) {
            Some(slot @ None) => *slot = Some(t),
            Some(Some(_)) => duplicates += 1,
            None => return Err(format!("worker-w2: run {i} was never triggered").into()),
        }
    }
    if before.len() != runs || returned.len() != runs {
        return Err(format!("produce-w2 triggered {} of {runs} runs", before.len()).into());
    }
    let mut lat = Vec::with_capacity(runs);
    let mut harness = Vec::with_capacity(runs);
    for (i, s) in started.iter().enumerate() {
        let s = s.ok_or_else(|| format!("worker-w2: run {i} never started"))?;
        // A handler that started before trigger() returned to the producer
        // counts as 0 ms, as in the in-process W2.
        lat.push((s - returned[i]).max(0.0));
        harness.push(s - before[i]);
    }
    lat.sort_by(f64::total_cmp);
    harness.sort_by(f64::total_cmp);
    let executions = count(&r, "executions")?;
    Ok(Report {
        runs,
        p50_ms: Some(percentile(&lat, 50.0)),
        p95_ms: Some(percentile(&lat, 95.0)),
        p99_ms: Some(percentile(&lat, 99.0)),
        harness_p50_ms: Some(percentile(&harness, 50.0)),
        harness_p95_ms: Some(percentile(&harness, 95.0)),
        harness_p99_ms: Some(percentile(&harness, 99.0)),
        executions_expected: Some(runs),
        executions_actual: Some(executions),
        duplicates: Some(duplicates),
        wall_s: num(&p, "produce_s")?,
        peak_rss_mb: r["peak_rss_mb"].as_f64(),
        ..base
    })
}

async fn w3(db: &Db, runs: usize, concurrency: usize, base: Report) -> Result<Report, BoxError> {
    let mut enq = Child::spawn(Role::EnqueueW3, db, runs, concurrency)?;
    enq.result(STEP_BOUND).await?;
    enq.exit(START_BOUND).await?;
    let mut wk = Child::spawn(Role::WorkerW3, db, runs, concurrency)?;
    wk.line("READY", START_BOUND).await?;
    let r = wk.result(STEP_BOUND).await?;
    wk.exit(START_BOUND).await?;
    check_completed(&r, runs)?;
    let expected = runs * W3_EXECUTIONS as usize;
    let (exact, rows) = (count(&r, "exactly_three")?, count(&r, "attempt_rows")?);
    if exact != runs || rows != expected {
        return Err(format!(
            "W3: {exact} of {runs} runs executed exactly {W3_EXECUTIONS} times, {rows} attempt rows (expected {expected}): {r}"
        )
        .into());
    }
    let wall = num(&r, "wall_s")?;
    let executions = count(&r, "executions")?;
    Ok(Report {
        runs,
        processed_per_s: Some(runs as f64 / wall),
        executions_expected: Some(expected),
        executions_actual: Some(executions),
        duplicates: Some(count(&r, "more")?),
        wall_s: wall,
        peak_rss_mb: r["peak_rss_mb"].as_f64(),
        ..base
    })
}

fn num(v: &Value, k: &str) -> Result<f64, BoxError> {
    v[k].as_f64()
        .ok_or_else(|| format!("result without `{k}`: {v}").into())
}

fn count(v: &Value, k: &str) -> Result<usize, BoxError> {
    v[k].as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| format!("result without `{k}`: {v}").into())
}

fn floats(v: &Value, k: &str) -> Result<Vec<f64>, BoxError> {
    v[k].as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect())
        .ok_or_else(|| format!("result without `{k}`").into())
}

fn check_completed(r: &Value, runs: usize) -> Result<(), BoxError> {
    let completed = count(r, "completed")?;
    if completed != runs {
        return Err(format!("{completed} of {runs} runs completed: {r}").into());
    }
    Ok(())
}

/// A child process: this binary as `docket bench-child <role>`, killed
/// when dropped (so on every error path).
struct Child {
    role: Role,
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
}

impl Child {
    fn spawn(role: Role, db: &Db, runs: usize, concurrency: usize) -> Result<Child, BoxError> {
        let exe = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(&exe)
            .arg("bench-child")
            .arg(role.name())
            .args(["--db", &db.url])
            .args(["--runs", &runs.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {} {}: {e}", exe.display(), role.name()))?;
        let stdout = child.stdout.take().ok_or("child without stdout")?;
        let mut err = child.stderr.take().ok_or("child without stderr")?;
        // Read stderr all along, so a chatty child never blocks on a full
        // pipe; kept for the error message.
        let stderr = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        });
        Ok(Child {
            role,
            child,
            lines: BufReader::new(stdout).lines(),
            stderr,
        })
    }

    /// The rest of the child's first stdout line starting with `prefix`,
    /// within `bound`.
    async fn line(&mut self, prefix: &str, bound: Duration) -> Result<String, BoxError> {
        let got = tokio::time::timeout(bound, async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(l)) => {
                        if let Some(rest) = l.strip_prefix(prefix) {
                            return Ok(rest.trim().to_string());
                        }
                    }
                    Ok(None) => return Err(format!("exited before its {} line", prefix.trim())),
                    Err(e) => return Err(format!("unreadable stdout: {e}")),
                }
            }
        })
        .await;
        match got {
            Ok(Ok(rest)) => Ok(rest),
            Ok(Err(why)) => Err(self.fail(&why).await),
            Err(_) => Err(self
                .fail(&format!("no {} line within {bound:?}", prefix.trim()))
                .await),
        }
    }

    /// The child's `RESULT {json}`.
    async fn result(&mut self, bound: Duration) -> Result<Value, BoxError> {
        let rest = self.line("RESULT ", bound).await?;
        serde_json::from_str(&rest)
            .map_err(|e| format!("{}: bad RESULT {rest}: {e}", self.role.name()).into())
    }

    /// Waits, with a bound, for the child to exit successfully.
    async fn exit(mut self, bound: Duration) -> Result<(), BoxError> {
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(Ok(st)) if st.success() => Ok(()),
            Ok(Ok(st)) => Err(self.fail(&format!("exited with {st}")).await),
            Ok(Err(e)) => Err(self.fail(&format!("cannot wait: {e}")).await),
            Err(_) => Err(self.fail(&format!("did not exit within {bound:?}")).await),
        }
    }

    /// Kills the child and says why, with the end of its stderr.
    async fn fail(&mut self, why: &str) -> BoxError {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(START_BOUND, self.child.wait()).await;
        let err = match tokio::time::timeout(START_BOUND, &mut self.stderr).await {
            Ok(Ok(s)) => s,
            _ => String::new(),
        };
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "bench --separate: {} {why}{}{}",
            self.role.name(),
            if tail.is_empty() {
                ""
            } else {
                "; its stderr:\n"
            },
            tail.join("\n")
        )
        .into()
    }
}

// ----------------------------------------------------------------- child

/// Milliseconds since the epoch on the system's clock, shared by every
/// process on the machine (what the harness's Docket peer reads).
fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1_000.0)
        .unwrap_or(0.0)
}

fn say(line: &str) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn run_index(input: &Value) -> usize {
    input["i"].as_u64().map_or(usize::MAX, |i| i as usize)
}

/// What the handlers of a worker process record.
#[derive(Default)]
struct Seen {
    /// Executions per run index.
    per_run: HashMap<usize, u32>,
    /// W2: (run index, handler start in epoch ms), in start order.
    started: Vec<(usize, f64)>,
    /// Runs whose handler succeeded.
    succeeded: HashSet<usize>,
}

/// The harness's W3 policy: the smallest backoff Docket allows.
fn w3_policy() -> RetryPolicy {
    RetryPolicy {
        name: "bench-w3-no-backoff".into(),
        base_delay_ms: 0,
        multiplier: 1.0,
        max_delay_ms: 0,
        max_attempts: W3_EXECUTIONS,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    }
}

/// The one job of a workload, registered by both of its processes.
fn job(role: Role, seen: Arc<Mutex<Seen>>, done: Arc<Notify>, runs: usize) -> Job {
    let w3 = matches!(role, Role::EnqueueW3 | Role::WorkerW3);
    let j = Job::new(
        if w3 { "flaky" } else { "noop" },
        move |_ctx, input: Value| {
            let t = epoch_ms();
            let i = run_index(&input);
            let mut s = seen.lock().expect("seen");
            let n = {
                let e = s.per_run.entry(i).or_insert(0);
                *e += 1;
                *e
            };
            let result = if role == Role::WorkerW2 {
                s.started.push((i, t));
                Ok(Value::Null)
            } else if w3 && n < W3_EXECUTIONS {
                Err(JobError::unavailable(format!("planned failure {n}")))
            } else {
                Ok(Value::Null)
            };
            if result.is_ok() {
                s.succeeded.insert(i);
                if s.succeeded.len() >= runs {
                    done.notify_one();
                }
            }
            async move { result }
        },
    );
    if w3 {
        j.retry(w3_policy())
    } else {
        j
    }
}

/// `docket bench-child <role>`: one side of a separate-process workload.
pub async fn child(args: ChildArgs) -> Result<(), BoxError> {
    let d = Docket::open(&args.db).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(Notify::new());
    d.register(job(args.role, seen.clone(), done.clone(), args.runs))?;
    let name = if matches!(args.role, Role::EnqueueW3 | Role::WorkerW3) {
        "flaky"
    } else {
        "noop"
    };
    match args.role {
        Role::EnqueueW1 | Role::EnqueueW3 => {
            let t0 = Instant::now();
            for from in (0..args.runs).step_by(BATCH) {
                let batch = (from..(from + BATCH).min(args.runs))
                    .map(|i| {
                        (
                            name.to_string(),
                            json!({ "i": i }),
                            TriggerOptions::default(),
                        )
                    })
                    .collect();
                d.trigger_batch(batch).await?;
            }
            let s = t0.elapsed().as_secs_f64();
            say(&format!("RESULT {}", json!({ "enqueue_s": s })))
        }
        Role::ProduceW2 => {
            let (mut before, mut returned) = (Vec::new(), Vec::new());
            let start = tokio::time::Instant::now();
            let t0 = Instant::now();
            for i in 0..args.runs {
                // An absolute schedule: a slow trigger does not shift the
                // ones after it.
                tokio::time::sleep_until(start + Duration::from_secs(1) * i as u32 / RATE).await;
                before.push(epoch_ms());
                d.trigger(name, json!({ "i": i })).await?;
                returned.push(epoch_ms());
            }
            let produce_s = t0.elapsed().as_secs_f64();
            say(&format!(
                "RESULT {}",
                json!({ "before": before, "returned": returned, "produce_s": produce_s })
            ))
        }
        Role::WorkerW1 | Role::WorkerW2 | Role::WorkerW3 => worker(&d, &args, &seen, &done).await,
    }
}

async fn worker(
    d: &Docket,
    args: &ChildArgs,
    seen: &Mutex<Seen>,
    done: &Notify,
) -> Result<(), BoxError> {
    let config = WorkerConfig {
        concurrency: args.concurrency,
        prefetch: args.concurrency,
        ..Default::default()
    };
    let runs = args.runs;
    let succeeded = || seen.lock().expect("seen").succeeded.len();
    // W1 and W3 take t0 after READY, right before the worker starts; W2
    // says READY once its worker listens.
    if args.role != Role::WorkerW2 {
        say("READY")?;
    }
    let t0 = Instant::now();
    let handle = d.worker(config).start();
    if args.role == Role::WorkerW2 {
        say("READY")?;
    }
    tokio::time::timeout(STEP_BOUND, async {
        loop {
            let n = done.notified();
            if succeeded() >= runs {
                return;
            }
            n.await;
        }
    })
    .await
    .map_err(|_| {
        format!(
            "only {} of {runs} runs succeeded within {STEP_BOUND:?}",
            succeeded()
        )
    })?;
    if args.role != Role::WorkerW2 {
        // As the harness: done once the queue itself shows nothing left.
        let deadline = Instant::now() + STEP_BOUND;
        while unfinished(d).await? > 0 {
            if Instant::now() > deadline {
                return Err("runs left unfinished".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let elapsed_s = t0.elapsed().as_secs_f64();
    handle.shutdown(Duration::from_secs(10)).await;
    let rss = peak_rss_mb();
    // Read after the worker stopped: no execution can come later.
    let s = std::mem::take(&mut *seen.lock().expect("seen"));
    let executions: u32 = s.per_run.values().sum();
    let completed: i64 = d
        .store()
        .count_runs(None)
        .await?
        .iter()
        .filter(|c| c.status == RunStatus::Completed)
        .map(|c| c.count)
        .sum();
    let mut r = json!({
        "executions": executions,
        "distinct": s.per_run.len(),
        "completed": completed,
        "peak_rss_mb": rss,
    });
    match args.role {
        Role::WorkerW1 => r["drain_s"] = json!(elapsed_s),
        Role::WorkerW2 => r["started"] = json!(s.started),
        _ => {
            r["wall_s"] = json!(elapsed_s);
            r["exactly_three"] = json!(s.per_run.values().filter(|&&n| n == W3_EXECUTIONS).count());
            r["more"] = json!(s
                .per_run
                .values()
                .map(|&n| n.saturating_sub(W3_EXECUTIONS) as usize)
                .sum::<usize>());
            r["attempt_rows"] = json!(attempt_rows(d).await?);
        }
    }
    say(&format!("RESULT {r}"))
}

/// Runs not finished: pending (due or a retry scheduled), running,
/// postponed or waiting for input.
async fn unfinished(d: &Docket) -> Result<i64, BoxError> {
    Ok(d.store()
        .count_runs(None)
        .await?
        .iter()
        .filter(|c| {
            matches!(
                c.status,
                RunStatus::Pending
                    | RunStatus::Running
                    | RunStatus::Postponed
                    | RunStatus::NeedsInput
            )
        })
        .map(|c| c.count)
        .sum())
}

/// The attempt rows of every run, read from the database.
async fn attempt_rows(d: &Docket) -> Result<usize, BoxError> {
    let mut rows = 0;
    let mut before = None;
    loop {
        let page = d
            .list_runs(RunFilter {
                before_id: before,
                limit: 500,
                ..Default::default()
            })
            .await?;
        let Some(last) = page.last() else {
            return Ok(rows);
        };
        before = Some(last.id);
        for r in &page {
            rows += d.store().attempts(r.id).await?.len();
        }
    }
}
