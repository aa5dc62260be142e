//! `docket-stress-worker`: one worker process for the multi-process tests
//! (`tests/multiprocess.rs`) and for trying Docket on many machines by hand.
//!
//! It opens `--db`, registers the deterministic job `stress`, and runs a
//! worker until SIGTERM (or ctrl-c), then shuts down gracefully. The job's
//! input is `{"i": N, "sleep_ms": MS}`: the handler sleeps `sleep_ms`
//! (default 0), fails with `unavailable` on the first attempt of every run
//! whose `i` is a multiple of `--fail-every`, and otherwise completes with
//! `{"i": N, "by": WORKER}`. Every execution is appended to `--exec-log`
//! (one line: run id, attempt, lease id, worker) before the handler does
//! anything else, so a test can prove that no lease ran twice. With
//! `--scheduler-tick-ms` it also runs a scheduler (`tests/multiprocess.rs`,
//! schedules).
//!
//! ```text
//! docket-stress-worker --db postgres://…?schema=s&application_name=a --name w1
//! ```

use clap::Parser;
use docket::{Docket, Job, JobError, RetryPolicy, WorkerConfig};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs one Docket worker for the `stress` job until SIGTERM.
#[derive(Parser, Debug)]
#[command(name = "docket-stress-worker")]
struct Args {
    /// Database URL.
    #[arg(long)]
    db: String,
    /// The worker's name (stored on every attempt it runs).
    #[arg(long)]
    name: String,
    /// Handlers running at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Lease length of the `stress` job, in milliseconds (the handler
    /// timeout is half of it).
    #[arg(long, default_value_t = 2_000)]
    lease_ms: u64,
    /// Runs whose `i` is a multiple of this fail their first attempt with
    /// `unavailable` (0: none).
    #[arg(long, default_value_t = 7)]
    fail_every: u64,
    /// Append one line per execution here.
    #[arg(long)]
    exec_log: Option<std::path::PathBuf>,
    /// Grace period at shutdown, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    grace_ms: u64,
    /// Also run a scheduler that ticks this often (0: none), as holder
    /// `--name`.
    #[arg(long, default_value_t = 0)]
    scheduler_tick_ms: u64,
    /// The scheduler's lead length (a hung leader is replaced after it).
    #[arg(long, default_value_t = 2_000)]
    scheduler_lead_ms: u64,
}

#[derive(Deserialize)]
struct Input {
    i: u64,
    #[serde(default)]
    sleep_ms: u64,
}

/// The retry policy of the `stress` job: short, fixed delays, no jitter.
fn policy() -> RetryPolicy {
    RetryPolicy {
        name: "stress".into(),
        base_delay_ms: 20,
        multiplier: 1.0,
        max_delay_ms: 20,
        max_attempts: 10,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DOCKET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let docket = Docket::open(&args.db).await?;
    let log = match &args.exec_log {
        Some(p) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ))),
        None => None,
    };
    let name = args.name.clone();
    let fail_every = args.fail_every;
    let lease = Duration::from_millis(args.lease_ms);
    docket.register(
        Job::new("stress", move |ctx, input: Input| {
            let log = log.clone();
            let name = name.clone();
            async move {
                if let Some(log) = &log {
                    // One write per line (O_APPEND): lines of concurrent
                    // handlers and processes never interleave, and a line
                    // survives kill -9 once written.
                    let line = format!(
                        "{} {} {} {}\n",
                        ctx.run_id(),
                        ctx.attempt(),
                        ctx.lease_id(),
                        name
                    );
                    let mut f = log.lock().expect("exec log");
                    f.write_all(line.as_bytes())
                        .map_err(|e| JobError::permanent(format!("exec log: {e}")))?;
                }
                if input.sleep_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(input.sleep_ms)).await;
                }
                if input.i.checked_rem(fail_every) == Some(0) && ctx.attempt() == 1 {
                    return Err(JobError::unavailable(format!(
                        "planned transient failure of run {}",
                        input.i
                    )));
                }
                Ok::<Value, JobError>(json!({ "i": input.i, "by": name }))
            }
        })
        .lease(lease)
        .timeout(lease / 2)
        .retry(policy()),
    )?;
    let handle = docket
        .worker(WorkerConfig {
            name: args.name.clone(),
            concurrency: args.concurrency,
            poll_interval: Duration::from_millis(200),
            reap_interval: Duration::from_millis(500),
            ..Default::default()
        })
        .start();
    let scheduler = (args.scheduler_tick_ms > 0).then(|| {
        docket
            .scheduler(docket::SchedulerConfig {
                holder: args.name.clone(),
                tick: Duration::from_millis(args.scheduler_tick_ms),
                lead_ttl: Duration::from_millis(args.scheduler_lead_ms),
            })
            .start()
    });
    println!("ready {}", args.name);
    let released = handle
        .shutdown_on_signal(Duration::from_millis(args.grace_ms))
        .await;
    if let Some(s) = scheduler {
        s.shutdown().await;
    }
    println!("stopped {} released={released}", args.name);
    Ok(())
}
