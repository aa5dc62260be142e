//! `docket jobs`: the registered jobs with their run counts and pause
//! state, and `docket jobs pause|resume` (through the API).

use crate::client::{encode, print_json, s, table, Client, Conn, Res};
use serde_json::{json, Value};

/// `docket jobs …`.
#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub cmd: Option<JobsCmd>,
    #[command(flatten)]
    pub conn: Conn,
}

/// What to do with jobs (none: list them).
#[derive(clap::Subcommand, Debug)]
pub enum JobsCmd {
    /// Pause a job for your tenant: its runs stay queued (triggers still
    /// create them) but no worker claims them until it is resumed.
    Pause(PauseArgs),
    /// Resume a paused job; its due runs are claimed at once.
    Resume(PauseArgs),
}

/// Arguments of `docket jobs pause|resume`.
#[derive(clap::Args, Debug)]
pub struct PauseArgs {
    /// The job (or use --all).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub job: Option<String>,
    /// Every job of the tenant (`*`).
    #[arg(long)]
    pub all: bool,
    /// Why (stored in the audit trail).
    #[arg(long)]
    pub comment: Option<String>,
    #[command(flatten)]
    pub conn: Conn,
}

/// Runs `docket jobs …`.
pub async fn run(a: JobsArgs) -> Res<()> {
    match a.cmd {
        None => list(a.conn).await,
        Some(JobsCmd::Pause(p)) => set(p, "pause").await,
        Some(JobsCmd::Resume(p)) => set(p, "resume").await,
    }
}

async fn list(conn: Conn) -> Res<()> {
    let c = Client::new(conn.clone())?;
    let (_, v) = c.call(reqwest::Method::GET, "/api/jobs", None).await?;
    if conn.json {
        print_json(&v);
        return Ok(());
    }
    let n = |j: &Value, k: &str| j["runs"][k].as_i64().unwrap_or(0).to_string();
    let rows: Vec<Vec<String>> = v["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|j| {
            let q = &j["queue"];
            vec![
                s(&j["name"]),
                if j["paused"] == true {
                    "paused"
                } else {
                    "running"
                }
                .to_string(),
                s(&q["due"]),
                format!("{:.1}s", q["lag_seconds"].as_f64().unwrap_or(0.0)),
                s(&q["running"]),
                s(&q["held"]),
                s(&q["scheduled"]),
                s(&q["deferred"]),
                format!("{:.1}", q["throughput_per_minute"].as_f64().unwrap_or(0.0)),
                n(j, "failed"),
                n(j, "completed"),
            ]
        })
        .collect();
    table(
        &[
            "job",
            "state",
            "due",
            "lag",
            "running",
            "held",
            "scheduled",
            "deferred",
            "per min (5m)",
            "failed",
            "completed",
        ],
        &rows,
    );
    Ok(())
}

async fn set(p: PauseArgs, what: &str) -> Res<()> {
    let job = if p.all {
        "*".to_string()
    } else {
        p.job.clone().unwrap_or_default()
    };
    let c = Client::new(p.conn.clone())?;
    let mut body = json!({});
    if let Some(comment) = &p.comment {
        body["comment"] = json!(comment);
    }
    let (_, v) = c
        .call(
            reqwest::Method::POST,
            &format!("/api/jobs/{}/{what}", encode(&job)),
            Some(body),
        )
        .await?;
    if p.conn.json {
        print_json(&v);
        return Ok(());
    }
    let who = if job == "*" {
        "every job".to_string()
    } else {
        format!("job {job}")
    };
    let state = if v["paused"] == true {
        "paused"
    } else {
        "running"
    };
    if v["changed"] == true {
        outln!("{who} is now {state} for tenant {}", s(&v["tenant"]));
    } else {
        outln!(
            "{who} was already {state} for tenant {} (nothing changed)",
            s(&v["tenant"])
        );
    }
    Ok(())
}
