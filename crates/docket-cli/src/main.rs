//! The `docket` command.

// First: its `outln!` macro is used by the modules below.
#[macro_use]
mod out;
mod bench;
mod bench_bulk;
mod bench_fair;
mod bench_scale;
mod bench_separate;
mod bench_steady;
mod client;
mod demo;
mod demo_children;
mod inspect;
mod schedules;

mod jobs;
mod serve;
mod tokens;

use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;

/// Durable jobs that can explain every retry.
#[derive(Parser, Debug)]
#[command(name = "docket", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure throughput and latency (workloads W1 drain, W2 pickup, W3 retry).
    Bench(bench::BenchArgs),
    /// One process of `docket bench --separate` (started by it).
    #[command(hide = true)]
    BenchChild(bench_separate::ChildArgs),
    /// Docket against a local service that misbehaves: timelines, ledger,
    /// forensic verdicts and checks, in a few seconds (--keep: stay up).
    Demo(demo::DemoArgs),
    /// Run the HTTP API and a worker (or either alone with --role).
    Serve(serve::ServeArgs),
    /// Trigger a run through the API.
    Trigger(client::TriggerArgs),
    /// List, inspect, wait for and operate on runs through the API.
    #[command(subcommand)]
    Runs(client::RunsCmd),
    /// Why every retry happened: a run's attempt timeline and verdicts, or
    /// the verdicts across a job's runs (`--job J --since T`).
    Forensics(inspect::ForensicsArgs),
    /// List, show, enable, disable and expire the connections of the HTTP
    /// jobs through the API.
    #[command(subcommand)]
    Connections(inspect::ConnectionsCmd),
    /// The circuit breakers of the server's connections.
    Breakers(inspect::BreakersArgs),
    /// The remote workers seen by the server (worker protocol): jobs, last
    /// heartbeat, runs running.
    Workers(inspect::WorkersArgs),
    /// Flow control now: per concurrency key, running runs against the
    /// limit, due and waiting runs; the open debounce windows with their
    /// run and collapsed count (docs/FLOW_CONTROL.md).
    Limits(inspect::LimitsArgs),

    /// List, show, pause, resume, trigger, backfill and delete schedules
    /// through the API.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCmd),

    /// The jobs with their run counts and pause state; `pause` / `resume`.
    Jobs(jobs::JobsArgs),
    /// Create, list and revoke API tokens (directly on the database).
    #[command(subcommand)]
    Token(tokens::TokenCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DOCKET_LOG").unwrap_or_else(|_| {
                // The server logs its requests and lifecycle; other
                // commands only warnings.
                let level = if matches!(cli.command, Command::Serve(_)) {
                    "info"
                } else {
                    "warn"
                };
                tracing_subscriber::EnvFilter::new(level)
            }),
        )
        .with_writer(std::io::stderr)
        // With stderr gone (a closed pipe), tracing would report the failed
        // write with `eprintln!`, which panics — inside whatever task
        // logged, e.g. the one that turns SIGTERM into a shutdown.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Bench(args) => bench::run(args)
                .await
                .map_err(|e| Failed::new(e.to_string())),
            Command::BenchChild(args) => bench_separate::child(args)
                .await
                .map_err(|e| Failed::new(e.to_string())),
            Command::Demo(args) => demo::run(args).await.map_err(Failed::new),
            Command::Serve(args) => serve::run(args).await.map_err(Failed::new),
            Command::Token(cmd) => tokens::run(cmd).await.map_err(Failed::new),
            Command::Trigger(args) => client::trigger(args).await.map_err(Failed::from),
            Command::Runs(cmd) => client::runs(cmd).await.map_err(Failed::from),
            Command::Forensics(args) => inspect::forensics(args).await.map_err(Failed::from),
            Command::Connections(cmd) => inspect::connections(cmd).await.map_err(Failed::from),
            Command::Breakers(args) => inspect::breakers(args).await.map_err(Failed::from),
            Command::Workers(args) => inspect::workers(args).await.map_err(Failed::from),
            Command::Limits(args) => inspect::limits(args).await.map_err(Failed::from),

            Command::Schedules(cmd) => schedules::run(cmd).await.map_err(Failed::from),

            Command::Jobs(args) => jobs::run(args).await.map_err(Failed::from),
        }
    });
    // Output that could not be written (other than to a reader that went
    // away, which ends the output quietly) fails a command that succeeded.
    let result = result.and_then(|()| out::failure().map_or(Ok(()), |m| Err(Failed::new(m))));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: it panics when stderr is closed too.
            let _ = writeln!(std::io::stderr(), "error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// A command's failure: the message for stderr and the exit code.
struct Failed {
    message: String,
    code: u8,
}

impl Failed {
    fn new(message: impl Into<String>) -> Failed {
        Failed {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<client::Failure> for Failed {
    fn from(f: client::Failure) -> Failed {
        Failed {
            message: f.message,
            code: f.code,
        }
    }
}
