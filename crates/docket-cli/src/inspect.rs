//! `docket forensics`, `docket connections` and `docket breakers`: the
//! forensic report and the HTTP jobs' connections through the API. Tables
//! for people, `--json` for scripts.

use crate::client::{encode, ms, parse_delay, print_json, print_run_line, s, short, table};
use crate::client::{Client, Conn, Failure, Res};
use docket::{Clock, SystemClock, Timestamp};
use reqwest::Method;
use serde_json::{json, Value};

/// Arguments of `docket forensics`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["run", "job"])))]
pub struct ForensicsArgs {
    /// A run's id: its attempt timeline with fingerprints and the verdict
    /// on each pair of failures.
    pub run: Option<String>,
    /// A job: the verdicts across its runs (duplicate dispatches between
    /// runs, retries without backoff, lease overlaps…).
    #[arg(long, conflicts_with = "run")]
    pub job: Option<String>,
    /// With --job: runs created since this instant (RFC 3339) or this long
    /// ago (`30m`, `6h`, `7d`) [default: 24h].
    #[arg(long, requires = "job")]
    pub since: Option<String>,
    /// Exit with code 3 when a verdict is critical (retry without backoff,
    /// lease overlap): for a cron job or a CI check.
    #[arg(long)]
    pub fail_on_critical: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `docket connections …`.
#[derive(clap::Subcommand, Debug)]
pub enum ConnectionsCmd {
    /// Every connection: status, credential source, breaker, jobs.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// One connection with its audit trail.
    Show {
        /// The connection's name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Enable a connection (after re-authorizing it); runs that failed
    /// `connection_unresolved` can then be retried.
    Enable {
        /// The connection's name.
        name: String,
        /// Why (stored in the audit trail).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Disable a connection: runs that need it fail `connection_unresolved`
    /// before any request.
    Disable {
        /// The connection's name.
        name: String,
        /// Why (stored in the audit trail).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Mark a connection's credentials expired: runs that need it fail
    /// `connection_unresolved` until it is enabled again.
    Expire {
        /// The connection's name.
        name: String,
        /// Why (stored in the audit trail).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Arguments of `docket breakers`.
#[derive(clap::Args, Debug)]
pub struct BreakersArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// `docket workers`.
#[derive(clap::Args, Debug)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// Lists the remote workers of the token's tenant (`GET /api/workers`).
pub async fn workers(a: WorkersArgs) -> Res<()> {
    let c = Client::new(a.conn.clone())?;
    let (_, v) = c.call(Method::GET, "/api/workers", None).await?;
    if a.conn.json {
        print_json(&v);
        return Ok(());
    }
    let list = v["workers"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        outln!("no remote workers have claimed or heartbeated in this tenant");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            vec![
                s(&w["name"]),
                w["jobs"]
                    .as_array()
                    .map(|j| j.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                s(&w["last_seen_at"]),
                s(&w["running"]),
                s(&w["first_seen_at"]),
            ]
        })
        .collect();
    table(
        &["worker", "jobs", "last seen", "running", "first seen"],
        &rows,
    );
    Ok(())
}

/// `docket limits`.
#[derive(clap::Args, Debug)]
pub struct LimitsArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// Flow control in the token's tenant (`GET /api/limits`): per concurrency
/// key, running runs, the limit, due and waiting runs, held or not; then
/// the open debounce windows.
pub async fn limits(a: LimitsArgs) -> Res<()> {
    let c = Client::new(a.conn.clone())?;
    let (_, v) = c.call(Method::GET, "/api/limits", None).await?;
    if a.conn.json {
        print_json(&v);
        return Ok(());
    }
    concurrency_keys(&v);
    debounce_windows(&v);
    Ok(())
}

fn concurrency_keys(v: &Value) {
    let list = v["concurrency"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        outln!("no concurrency key has runs running or waiting in this tenant");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|k| {
            vec![
                s(&k["key"]),
                format!("{}/{}", s(&k["running"]), s(&k["limit"])),
                s(&k["due"]),
                s(&k["waiting"]),
                if k["held"].as_bool() == Some(true) {
                    "held".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    table(&["concurrency key", "running", "due", "waiting", ""], &rows);
    if v["truncated"].as_bool() == Some(true) {
        outln!("(more keys than listed)");
    }
}

/// The open debounce windows: per (job, key) the window, its run and how
/// many triggers were collapsed into it.
fn debounce_windows(v: &Value) {
    let list = v["debounce"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        outln!("no debounce window is open in this tenant");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            vec![
                s(&w["job"]),
                s(&w["key"]),
                s(&w["keep"]),
                s(&w["opened_at"]),
                s(&w["until"]),
                format!("{} ({})", s(&w["run"]), s(&w["run_status"])),
                s(&w["collapsed"]),
            ]
        })
        .collect();
    table(
        &[
            "debounced job",
            "key",
            "keep",
            "opened",
            "until",
            "run",
            "collapsed",
        ],
        &rows,
    );
    if v["debounce_truncated"].as_bool() == Some(true) {
        outln!("(more windows than listed)");
    }
}

/// `--since`: an RFC 3339 instant, or a duration meaning that long ago.
fn since_param(since: Option<&str>, now: Timestamp) -> Res<String> {
    let Some(text) = since else {
        return Ok(now.plus_millis(-24 * 3_600_000).to_rfc3339());
    };
    if let Some(t) = Timestamp::parse_rfc3339(text) {
        return Ok(t.to_rfc3339());
    }
    match parse_delay(text) {
        Some(d) => Ok(now
            .plus_millis(-i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .to_rfc3339()),
        None => Err(format!(
            "--since `{text}` is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor a duration (30m, 6h, 7d)"
        )
        .into()),
    }
}

/// The random end of a UUIDv7 (its start is a timestamp, alike for ids
/// made close together).
fn id_tail(id: &str) -> String {
    match id.rsplit_once('-') {
        Some((_, tail)) if id.len() > 13 => format!("…{tail}"),
        _ => id.to_string(),
    }
}

fn critical(verdicts: &[Value]) -> usize {
    verdicts
        .iter()
        .filter(|v| v["severity"] == "critical")
        .count()
}

fn verdict_rows(verdicts: &[Value], with_runs: bool) -> Vec<Vec<String>> {
    let mut sorted: Vec<&Value> = verdicts.iter().collect();
    // Critical first, then warnings, then the expected ones.
    let rank = |v: &Value| match v["severity"].as_str() {
        Some("critical") => 0,
        Some("warning") => 1,
        _ => 2,
    };
    sorted.sort_by_key(|v| rank(v));
    sorted
        .into_iter()
        .map(|v| {
            let pair = |f: &Value| {
                let late = if f["late_report"] == true {
                    " (late)"
                } else {
                    ""
                };
                if with_runs {
                    format!("{}#{}{late}", s(&f["run_id"]), s(&f["attempt"]))
                } else {
                    format!("#{}{late}", s(&f["attempt"]))
                }
            };
            vec![
                s(&v["severity"]),
                s(&v["verdict"]),
                s(&v["action"]),
                s(&v["error_class"]),
                format!("{} → {}", pair(&v["first"]), pair(&v["second"])),
                ms(&v["gap_ms"]),
                ms(&v["expected_delay_ms"]),
                s(&v["explanation"]),
            ]
        })
        .collect()
}

const VERDICT_HEADER: [&str; 8] = [
    "severity",
    "verdict",
    "action",
    "class",
    "failures",
    "gap",
    "policy delay",
    "explanation",
];

/// `docket forensics`.
pub async fn forensics(a: ForensicsArgs) -> Res<()> {
    let c = Client::new(a.conn.clone())?;
    let verdicts = match (&a.run, &a.job) {
        (Some(id), _) => run_report(&c, id, a.conn.json).await?,
        (None, Some(job)) => {
            let since = since_param(a.since.as_deref(), SystemClock.now())?;
            job_report(&c, job, &since, a.conn.json).await?
        }
        (None, None) => return Err("name a run, or a job with --job".to_string().into()),
    };
    let n = critical(&verdicts);
    if a.fail_on_critical && n > 0 {
        return Err(Failure {
            message: format!("{n} critical verdict(s)"),
            code: 3,
        });
    }
    Ok(())
}

async fn run_report(c: &Client, id: &str, json_out: bool) -> Res<Vec<Value>> {
    let path = format!("/api/runs/{}/forensics", encode(id));
    let (_, mut f) = c.call(Method::GET, &path, None).await?;
    // The SVG picture is for the dashboard, not a terminal or a script.
    if let Some(o) = f.as_object_mut() {
        o.remove("chart_svg");
    }
    let verdicts = f["verdicts"].as_array().cloned().unwrap_or_default();
    if json_out {
        print_json(&f);
        return Ok(verdicts);
    }
    let (_, run) = c
        .call(Method::GET, &format!("/api/runs/{}", encode(id)), None)
        .await?;
    print_run_line(&run["run"]);
    let attempts = f["attempts"].as_array().cloned().unwrap_or_default();
    outln!("\ntimeline");
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            let fp = &a["fingerprint"];
            vec![
                s(&a["attempt"]),
                s(&a["started_at"]),
                ms(&a["gap_ms"]),
                ms(&a["policy_delay_ms"]),
                s(&a["outcome"]),
                s(&a["error_class"]),
                s(&a["action"]),
                match a["retry_reason"].as_str() {
                    Some(r) => format!("{r} {}", ms(&a["delay_ms"])),
                    None => "-".into(),
                },
                id_tail(&s(&a["lease_id"])),
                s(&a["worker"]),
                short(&s(&fp["idempotency_key"]), 40),
                s(&a["failure_key"]),
                s(&a["late_report_at"]),
            ]
        })
        .collect();
    table(
        &[
            "#",
            "started",
            "gap",
            "policy delay",
            "outcome",
            "class",
            "action",
            "next",
            "lease",
            "worker",
            "idempotency key",
            "failure key",
            "late report",
        ],
        &rows,
    );
    outln!();
    if verdicts.is_empty() {
        outln!("no verdicts: fewer than two failures of the same action with the same error class");
    } else {
        outln!("verdicts (worst {})", s(&f["worst"]));
        table(&VERDICT_HEADER, &verdict_rows(&verdicts, false));
    }
    Ok(verdicts)
}

async fn job_report(c: &Client, job: &str, since: &str, json_out: bool) -> Res<Vec<Value>> {
    let path = format!(
        "/api/jobs/{}/forensics?since={}",
        encode(job),
        encode(since)
    );
    let (_, r) = c.call(Method::GET, &path, None).await?;
    let verdicts = r["verdicts"].as_array().cloned().unwrap_or_default();
    if json_out {
        print_json(&r);
        return Ok(verdicts);
    }
    outln!(
        "job {}  since {}  runs examined {}{}",
        s(&r["job"]),
        s(&r["since"]),
        s(&r["runs_examined"]),
        if r["truncated"] == true {
            " (the newest only: narrow --since for older runs)"
        } else {
            ""
        }
    );
    outln!(
        "same_action_same_error_within_backoff_window {}",
        s(&r["same_action_same_error_within_backoff_window"])
    );
    let counts = r["counts"].as_object().cloned().unwrap_or_default();
    if counts.is_empty() {
        outln!("no verdicts: no two failures of the same action with the same error class");
        return Ok(verdicts);
    }
    let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    outln!("verdicts {}", line.join(", "));
    outln!();
    table(&VERDICT_HEADER, &verdict_rows(&verdicts, true));
    Ok(verdicts)
}

fn connection_row(c: &Value) -> Vec<String> {
    let b = &c["breaker"];
    let breaker = match b["state"].as_str() {
        Some("open") => format!("open until {}", s(&b["reset_at"])),
        Some("closed") => format!(
            "closed ({}/{} failures)",
            s(&b["failures_in_window"]),
            s(&b["failures_to_open"])
        ),
        Some(other) => other.to_string(),
        None => "not in this process (--role api)".to_string(),
    };
    let credential = match (
        c["credential_source"].as_str(),
        c["credential_available"].as_bool(),
    ) {
        (None, _) => "none".to_string(),
        (Some(src), Some(true)) => src.to_string(),
        (Some(_), _) => format!("MISSING: {}", s(&c["credential_problem"])),
    };
    vec![
        s(&c["name"]),
        s(&c["status"]),
        s(&c["base_url"]),
        credential,
        breaker,
        c["jobs"]
            .as_array()
            .map(|j| j.iter().map(s).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
    ]
}

const CONNECTION_HEADER: [&str; 6] = [
    "name",
    "status",
    "base url",
    "credential",
    "breaker",
    "jobs",
];

/// `docket connections …`.
pub async fn connections(cmd: ConnectionsCmd) -> Res<()> {
    let (conn, name, verb, comment) = match cmd {
        ConnectionsCmd::List { conn } => {
            let c = Client::new(conn.clone())?;
            let (_, v) = c.call(Method::GET, "/api/connections", None).await?;
            if conn.json {
                print_json(&v);
                return Ok(());
            }
            let list = v["connections"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                outln!("no connections: the server was started without [connections.*] in its --config file");
            } else {
                table(
                    &CONNECTION_HEADER,
                    &list.iter().map(connection_row).collect::<Vec<_>>(),
                );
            }
            return Ok(());
        }
        ConnectionsCmd::Show { name, conn } => {
            let c = Client::new(conn.clone())?;
            let path = format!("/api/connections/{}", encode(&name));
            let (_, v) = c.call(Method::GET, &path, None).await?;
            if conn.json {
                print_json(&v);
                return Ok(());
            }
            table(&CONNECTION_HEADER, &[connection_row(&v["connection"])]);
            let audit = v["audit"].as_array().cloned().unwrap_or_default();
            if !audit.is_empty() {
                outln!("\naudit");
                let rows: Vec<Vec<String>> = audit
                    .iter()
                    .map(|a| {
                        vec![
                            s(&a["at"]),
                            format!("{} → {}", s(&a["from_status"]), s(&a["to_status"])),
                            s(&a["actor"]),
                            s(&a["comment"]),
                        ]
                    })
                    .collect();
                table(&["at", "change", "actor", "comment"], &rows);
            }
            return Ok(());
        }
        ConnectionsCmd::Enable {
            name,
            comment,
            conn,
        } => (conn, name, "enable", comment),
        ConnectionsCmd::Disable {
            name,
            comment,
            conn,
        } => (conn, name, "disable", comment),
        ConnectionsCmd::Expire {
            name,
            comment,
            conn,
        } => (conn, name, "expire", comment),
    };
    let c = Client::new(conn.clone())?;
    let body = match comment {
        Some(text) => json!({ "comment": text }),
        None => json!({}),
    };
    let path = format!("/api/connections/{}/{verb}", encode(&name));
    let (_, v) = c.call(Method::POST, &path, Some(body)).await?;
    if conn.json {
        print_json(&v);
    } else {
        outln!("connection {} is now {}", s(&v["name"]), s(&v["status"]));
    }
    Ok(())
}

/// `docket breakers`.
pub async fn breakers(a: BreakersArgs) -> Res<()> {
    let c = Client::new(a.conn.clone())?;
    let (_, v) = c.call(Method::GET, "/api/breakers", None).await?;
    if a.conn.json {
        print_json(&v);
        return Ok(());
    }
    let list = v["breakers"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        match v["note"].as_str() {
            Some(note) => outln!("no breakers here: {note}"),
            None => outln!(
                "no breakers: the server was started without [connections.*] in its --config file"
            ),
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                s(&b["connection"]),
                s(&b["state"]),
                format!(
                    "{}/{}",
                    s(&b["failures_in_window"]),
                    s(&b["failures_to_open"])
                ),
                s(&b["reset_at"]),
                s(&b["opened_at"]),
                s(&b["times_opened"]),
                s(&b["deferred"]),
            ]
        })
        .collect();
    table(
        &[
            "connection",
            "state",
            "failures",
            "reset at",
            "opened at",
            "opened",
            "deferred",
        ],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_or_a_duration_ago() {
        let now = Timestamp::parse_rfc3339("2026-11-22T12:00:00Z").unwrap();
        assert_eq!(
            since_param(Some("2h"), now).unwrap(),
            "2026-11-22T10:00:00.000Z"
        );
        assert_eq!(since_param(None, now).unwrap(), "2026-11-21T12:00:00.000Z");
        assert_eq!(
            since_param(Some("2026-11-01T00:00:00Z"), now).unwrap(),
            "2026-11-01T00:00:00.000Z"
        );
        let e = since_param(Some("yesterday"), now).err().unwrap();
        assert!(e.message.contains("yesterday"), "{}", e.message);
    }
}
