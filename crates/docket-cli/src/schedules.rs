//! `docket schedules …`: list, show, pause, resume, trigger, backfill and
//! delete schedules through the API. Tables for people, `--json` for
//! scripts.

use crate::client::{encode, print_json, s, table};
use crate::client::{Client, Conn, Res};
use reqwest::Method;
use serde_json::{json, Value};

/// `docket schedules …`.
#[derive(clap::Subcommand, Debug)]
pub enum SchedulesCmd {
    /// Every schedule: job, rule, zone, state, next fire time, last slot.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// One schedule: its next 5 fire times (in its zone and UTC) and its
    /// history (fired, caught up, skipped slots with reasons; changes).
    Show {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pause a schedule: no slot fires until it is resumed.
    Pause {
        /// The schedule's name.
        name: String,
        /// Why (stored in its history).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume a schedule from now (paused slots are not caught up).
    Resume {
        /// The schedule's name.
        name: String,
        /// Why (stored in its history).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Fire a schedule now (a run keyed `schedule:NAME:<now>`).
    Trigger {
        /// The schedule's name.
        name: String,
        /// Why (stored in its history).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Fire every slot between two instants (RFC 3339, inclusive); a slot
    /// whose run exists is not fired again.
    Backfill {
        /// The schedule's name.
        name: String,
        /// From (RFC 3339).
        #[arg(long)]
        from: String,
        /// To (RFC 3339).
        #[arg(long)]
        to: String,
        /// Why (stored in its history).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a schedule (its runs and history stay).
    Delete {
        /// The schedule's name.
        name: String,
        /// Why (stored in its history).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

const HEADER: [&str; 7] = ["name", "job", "rule", "zone", "state", "next", "last slot"];

fn row(v: &Value) -> Vec<String> {
    let rule = match v["cron"].as_str() {
        Some(c) => c.to_string(),
        None => format!("every {} ms", s(&v["every_ms"])),
    };
    let state = if v["enabled"].as_bool() == Some(false) {
        "paused".to_string()
    } else {
        "enabled".to_string()
    };
    let last = match v["last_slot"].as_str() {
        Some(slot) => format!("{slot} ({})", s(&v["last_run_status"])),
        None => "-".into(),
    };
    vec![
        s(&v["name"]),
        s(&v["job"]),
        rule,
        s(&v["timezone"]),
        state,
        v["next"][0]["local"].as_str().unwrap_or("-").to_string(),
        last,
    ]
}

fn comment_body(comment: Option<String>) -> Value {
    match comment {
        Some(c) => json!({ "comment": c }),
        None => json!({}),
    }
}

/// Runs `docket schedules …`.
pub async fn run(cmd: SchedulesCmd) -> Res<()> {
    let (conn, name, verb, body) = match cmd {
        SchedulesCmd::List { conn } => {
            let c = Client::new(conn.clone())?;
            let (_, v) = c.call(Method::GET, "/api/schedules", None).await?;
            if conn.json {
                print_json(&v);
                return Ok(());
            }
            let list = v["schedules"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                outln!(
                    "no schedules: declare [schedules.NAME] in docket.toml or POST /api/schedules"
                );
            } else {
                table(&HEADER, &list.iter().map(row).collect::<Vec<_>>());
            }
            return Ok(());
        }
        SchedulesCmd::Show { name, conn } => {
            let c = Client::new(conn.clone())?;
            let path = format!("/api/schedules/{}", encode(&name));
            let (_, v) = c.call(Method::GET, &path, None).await?;
            if conn.json {
                print_json(&v);
                return Ok(());
            }
            let sched = &v["schedule"];
            table(&HEADER, &[row(sched)]);
            outln!(
                "\noverlap {}, catch-up {} (window {} ms), jitter {} ms, source {}",
                s(&sched["overlap"]),
                s(&sched["catch_up"]),
                s(&sched["catch_up_window_ms"]),
                s(&sched["jitter_ms"]),
                s(&sched["source"])
            );
            let next = sched["next"].as_array().cloned().unwrap_or_default();
            if !next.is_empty() {
                outln!("\nnext fire times");
                let rows: Vec<Vec<String>> = next
                    .iter()
                    .map(|f| vec![s(&f["local"]), s(&f["slot"]), s(&f["fires_at"])])
                    .collect();
                table(&["in zone", "UTC", "fires at (with jitter)"], &rows);
            }
            let history = v["history"].as_array().cloned().unwrap_or_default();
            if !history.is_empty() {
                outln!("\nhistory (newest first)");
                let rows: Vec<Vec<String>> = history
                    .iter()
                    .map(|h| {
                        vec![
                            s(&h["at"]),
                            s(&h["kind"]),
                            s(&h["slot"]),
                            s(&h["run_id"]),
                            s(&h["reason"]),
                            s(&h["actor"]),
                            s(&h["comment"]),
                        ]
                    })
                    .collect();
                table(
                    &["at", "kind", "slot", "run", "reason", "who", "comment"],
                    &rows,
                );
            }
            return Ok(());
        }
        SchedulesCmd::Pause {
            name,
            comment,
            conn,
        } => (conn, name, "pause", comment_body(comment)),
        SchedulesCmd::Resume {
            name,
            comment,
            conn,
        } => (conn, name, "resume", comment_body(comment)),
        SchedulesCmd::Trigger {
            name,
            comment,
            conn,
        } => (conn, name, "trigger", comment_body(comment)),
        SchedulesCmd::Backfill {
            name,
            from,
            to,
            comment,
            conn,
        } => {
            let mut body = comment_body(comment);
            body["from"] = json!(from);
            body["to"] = json!(to);
            (conn, name, "backfill", body)
        }
        SchedulesCmd::Delete {
            name,
            comment,
            conn,
        } => {
            let c = Client::new(conn.clone())?;
            let path = format!("/api/schedules/{}", encode(&name));
            let (_, v) = c
                .call(Method::DELETE, &path, Some(comment_body(comment)))
                .await?;
            if conn.json {
                print_json(&v);
            } else {
                outln!("schedule {name} deleted");
            }
            return Ok(());
        }
    };
    let c = Client::new(conn.clone())?;
    let path = format!("/api/schedules/{}/{verb}", encode(&name));
    let (_, v) = c.call(Method::POST, &path, Some(body)).await?;
    if conn.json {
        print_json(&v);
        return Ok(());
    }
    match verb {
        "trigger" => outln!("schedule {name} fired: run {}", s(&v["run"]["id"])),
        "backfill" => {
            let runs = v["runs"].as_array().cloned().unwrap_or_default();
            let existing = runs.iter().filter(|r| r["existing"] == json!(true)).count();
            outln!(
                "schedule {name}: {} slots, {} new runs, {existing} already had a run",
                runs.len(),
                runs.len() - existing
            );
        }
        _ => outln!(
            "schedule {name} is now {}",
            if v["schedule"]["enabled"] == json!(true) {
                "enabled"
            } else {
                "paused"
            }
        ),
    }
    Ok(())
}
