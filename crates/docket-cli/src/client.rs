//! The CLI client of the HTTP API: `docket trigger` and `docket runs …`.
//! Tables for people, `--json` for scripts.

use serde_json::{json, Value};
use std::time::Duration;

/// Where the server is and who is calling.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The server's base URL.
    #[arg(long, env = "DOCKET_URL", default_value = "http://127.0.0.1:7878")]
    pub url: String,
    /// An API token (see `docket token create`).
    #[arg(long, env = "DOCKET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Sent as X-Tenant-ID (must match the token's tenant).
    #[arg(long, env = "DOCKET_TENANT")]
    pub tenant: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `docket trigger`.
#[derive(clap::Args, Debug)]
pub struct TriggerArgs {
    /// The job's name.
    pub job: String,
    /// The input as JSON (default `null`); `@FILE` reads a file, `-` stdin.
    pub input: Option<String>,
    /// Idempotency key: a second trigger with it returns the first run.
    #[arg(long)]
    pub key: Option<String>,
    /// Not before this instant (RFC 3339).
    #[arg(long)]
    pub run_after: Option<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Correlation id carried into every attempt.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Debounce this trigger (instead of the job's own debounce): collapse
    /// it with triggers of the same key within this window (`30s`, `5m`;
    /// needs --debounce-keep). See docs/FLOW_CONTROL.md, "Debounce".
    #[arg(long)]
    pub debounce_window: Option<String>,
    /// `first` (the first trigger's run is due at once, later ones in the
    /// window return it) or `last` (the run is due when the window ends,
    /// with the last input).
    #[arg(long)]
    pub debounce_keep: Option<String>,
    /// The debounce key template (default `{{ job }}`), e.g.
    /// `{{ input.customer_id }}`.
    #[arg(long)]
    pub debounce_key: Option<String>,
    /// Wait until the run is terminal or waits for input (at most
    /// --timeout; exit codes as `docket runs wait`).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (`30s`, `2m`, `500ms`).
    #[arg(long, default_value = "30s")]
    pub timeout: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// `docket runs …`.
#[derive(clap::Subcommand, Debug)]
pub enum RunsCmd {
    /// List runs, newest first.
    List {
        /// Statuses (comma-separated): pending, running, needs_input,
        /// postponed, completed, failed, cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Only failed and needs_input runs.
        #[arg(long)]
        needs_attention: bool,
        /// Created at or after (RFC 3339).
        #[arg(long)]
        created_after: Option<String>,
        /// Created before (RFC 3339).
        #[arg(long)]
        created_before: Option<String>,
        /// Page size (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (printed under a full page).
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// A run with its attempts (gaps, retry decisions), steps, ledger and
    /// timeline.
    Show {
        /// The run's id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait until a run is terminal or waits for input. Exit 0 when
    /// completed, 1 when failed or cancelled, 2 when the timeout passed
    /// first, 3 when it waits for an operator (approve or reject).
    Wait {
        /// The run's id.
        id: String,
        /// `30s`, `2m`, `500ms` (at most 300s).
        #[arg(long, default_value = "30s")]
        timeout: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Retry a failed run (same run; completed steps kept).
    Retry {
        /// The run's id.
        id: String,
        /// A JSON object merged into the run's variables first.
        #[arg(long)]
        vars: Option<String>,
        /// Why (stored in the audit trail).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a run.
    Cancel {
        /// The run's id.
        id: String,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Skip the failed step of a failed run.
    Skip {
        /// The run's id.
        id: String,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a new run with a finished run's input.
    Retrigger {
        /// The run's id.
        id: String,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Postpone a run: `--until` an instant or by `--delay`.
    Postpone {
        /// The run's id.
        id: String,
        /// Not before this instant (RFC 3339).
        #[arg(long, conflicts_with = "delay")]
        until: Option<String>,
        /// Not before now plus this (`10m`, `30s`).
        #[arg(long)]
        delay: Option<String>,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a final run (completed, failed, cancelled) with its history;
    /// audited. `docket runs show --json` keeps a copy first.
    Delete {
        /// The run's id.
        id: String,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Act on many runs at once: by `--ids` or by filter (`--status`,
    /// `--job`, `--since`). Without `--yes` it only prints how many runs
    /// match (a dry run); with `--yes` it acts, page by page, printing each
    /// run's result. Each run is audited as if done alone.
    Bulk {
        /// retry, cancel, retrigger, postpone or delete.
        action: String,
        /// These runs (comma-separated ids) instead of a filter.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["status", "job", "since"])]
        ids: Vec<String>,
        /// Statuses (comma-separated), required with a filter.
        #[arg(long)]
        status: Option<String>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Only runs created in the last `1h`, `30m`, `7d`…
        #[arg(long)]
        since: Option<String>,
        /// retry: a JSON object merged into each run's variables.
        #[arg(long)]
        vars: Option<String>,
        /// postpone: by this much (`10m`, `2h`).
        #[arg(long)]
        delay: Option<String>,
        /// Why (stored on each run's audit event).
        #[arg(long)]
        comment: Option<String>,
        /// Runs per request (1 to 500).
        #[arg(long, default_value_t = 100)]
        page: usize,
        /// Act (without it: only count).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write runs with their full history (attempts, steps, ledger,
    /// events, timeline) as JSON Lines, one run per line, newest first:
    /// for archiving before deleting or pruning.
    Export {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Statuses (comma-separated).
        #[arg(long)]
        status: Option<String>,
        /// Only runs created in the last `1h`, `30m`, `7d`…
        #[arg(long)]
        since: Option<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Approve a run waiting for input.
    Approve {
        /// The run's id.
        id: String,
        /// JSON handed to the handler.
        #[arg(long)]
        data: Option<String>,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send a signal to a run (docs/DURABLE.md, "Signals"): kept until a
    /// wait of the run for NAME consumes it; a run waiting for it is due
    /// at once.
    Signal {
        /// The run's id.
        id: String,
        /// The signal's name.
        name: String,
        /// The payload (JSON; default null).
        #[arg(long)]
        data: Option<String>,
        /// An id for idempotency: the same id twice is one signal.
        #[arg(long)]
        signal_id: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Reject a run waiting for input.
    Reject {
        /// The run's id.
        id: String,
        /// JSON handed to the handler.
        #[arg(long)]
        data: Option<String>,
        /// Why.
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// A failure of a client command, with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// The message.
    pub message: String,
    /// The process's exit code.
    pub code: u8,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure { message, code: 1 }
    }
}

pub(crate) type Res<T> = Result<T, Failure>;

pub(crate) struct Client {
    http: reqwest::Client,
    conn: Conn,
}

impl Client {
    pub(crate) fn new(conn: Conn) -> Res<Client> {
        if !conn.url.starts_with("http://") && !conn.url.starts_with("https://") {
            return Err(format!(
                "--url must start with http:// or https://, not `{}`",
                conn.url
            )
            .into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Client { http, conn })
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Res<(u16, Value)> {
        let url = format!("{}{}", self.conn.url.trim_end_matches('/'), path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.conn.token {
            req = req.bearer_auth(t);
        }
        if let Some(t) = &self.conn.tenant {
            req = req.header("X-Tenant-ID", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.map_err(|e| {
            let hint = if url.starts_with("https://") {
                " (this build speaks plain HTTP only; put TLS in a proxy or build docket-cli with --features tls)"
            } else if e.is_connect() {
                " (is `docket serve` running there? --url or DOCKET_URL names the server)"
            } else {
                ""
            };
            // reqwest's own text repeats the URL; its innermost cause says
            // what happened ("Connection refused").
            let mut cause = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                cause = s.to_string();
                src = s.source();
            }
            format!("cannot reach {url}: {cause}{hint}")
        })?;
        let status = res.status().as_u16();
        let text = res
            .text()
            .await
            .map_err(|e| format!("reading the answer from {url}: {e}"))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            return Err(format!("HTTP {status}: {msg}").into());
        }
        Ok((status, v))
    }
}

fn parse_json_arg(what: &str, s: &str) -> Res<Value> {
    let text = if s == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)
            .map_err(|e| format!("reading {what} from stdin: {e}"))?;
        buf
    } else if let Some(path) = s.strip_prefix('@') {
        std::fs::read_to_string(path).map_err(|e| format!("reading {what} from {path}: {e}"))?
    } else {
        s.to_string()
    };
    serde_json::from_str(&text).map_err(|e| format!("{what} is not valid JSON: {e}").into())
}

pub(crate) fn print_json(v: &Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as an aligned table under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(&c);
            } else {
                let pad = widths[i] - c.chars().count();
                out.push_str(&c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn short(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_string()
    } else {
        let mut t: String = text.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn status_of(run: &Value) -> String {
    let st = s(&run["status"]);
    if run["retry_scheduled"] == true {
        "pending (retry scheduled)".into()
    } else if let Some(r) = run["terminal_reason"].as_str() {
        format!("{st} ({r})")
    } else {
        st
    }
}

pub(crate) fn print_run_line(run: &Value) {
    // Attempt numbers count claims; deferrals, postponements, input waits
    // and shutdown releases are forgiven, so say what the budget sees.
    let attempt = match run["attempts_forgiven"].as_u64() {
        Some(f) if f > 0 => format!(
            "{} ({} against the retry budget)",
            s(&run["attempt"]),
            run["attempt"].as_u64().unwrap_or(0).saturating_sub(f)
        ),
        _ => s(&run["attempt"]),
    };
    outln!(
        "run {}  job {}  status {}  attempt {attempt}",
        s(&run["id"]),
        s(&run["job"]),
        status_of(run)
    );
}

/// `docket trigger`.
pub async fn trigger(a: TriggerArgs) -> Res<()> {
    let input = match &a.input {
        Some(i) => parse_json_arg("the input", i)?,
        None => Value::Null,
    };
    let c = Client::new(a.conn.clone())?;
    let mut body = json!({ "job": a.job, "input": input, "priority": a.priority });
    if let Some(k) = &a.key {
        body["idempotency_key"] = json!(k);
    }
    if let Some(t) = &a.run_after {
        body["run_after"] = json!(t);
    }
    if let Some(cid) = &a.correlation_id {
        body["correlation_id"] = json!(cid);
    }
    if a.debounce_window.is_some() || a.debounce_keep.is_some() || a.debounce_key.is_some() {
        let mut d = serde_json::Map::new();
        for (k, v) in [
            ("window", &a.debounce_window),
            ("keep", &a.debounce_keep),
            ("key", &a.debounce_key),
        ] {
            if let Some(v) = v {
                d.insert(k.into(), json!(v));
            }
        }
        body["debounce"] = Value::Object(d);
    }
    let (_, v) = c
        .call(reqwest::Method::POST, "/api/runs", Some(body))
        .await?;
    if !a.wait {
        if a.conn.json {
            print_json(&v);
        } else {
            let verb = if v["collapsed"] == true {
                "collapsed into"
            } else if v["existing"] == true {
                "existing"
            } else {
                "created"
            };
            outln!(
                "{verb} run {} ({})",
                s(&v["run"]["id"]),
                s(&v["run"]["status"])
            );
        }
        return Ok(());
    }
    let id = s(&v["run"]["id"]);
    wait_run(&c, &id, &a.timeout, a.conn.json).await
}

async fn wait_run(c: &Client, id: &str, timeout: &str, json_out: bool) -> Res<()> {
    let (_, w) = c
        .call(
            reqwest::Method::GET,
            &format!("/api/runs/{id}/wait?timeout={timeout}&until=needs_input"),
            None,
        )
        .await?;
    if json_out {
        print_json(&w);
    } else {
        print_run_line(&w["run"]);
        if let Some(out) = w["run"].get("output").filter(|o| !o.is_null()) {
            outln!("output {out}");
        }
        if let Some(e) = w["run"]["last_error_message"].as_str() {
            let label = if w["run"]["status"] == "failed" {
                "last error"
            } else {
                "an earlier attempt's error"
            };
            outln!("{label} {}: {e}", s(&w["run"]["last_error_class"]));
        }
    }
    match (w["terminal"].as_bool(), w["run"]["status"].as_str()) {
        (Some(true), Some("completed")) => Ok(()),
        // Waiting longer would only wait for a person.
        (_, Some("needs_input")) => Err(Failure {
            message: format!(
                "run {id} waits for input: `docket runs approve {id}` or `docket runs reject {id}` (with --data and --comment)"
            ),
            code: 3,
        }),
        (Some(true), st) => Err(Failure {
            message: format!("run {id} ended {}", st.unwrap_or("?")),
            code: 1,
        }),
        _ => Err(Failure {
            message: format!(
                "run {id} is still {} after {timeout}",
                s(&w["run"]["status"])
            ),
            code: 2,
        }),
    }
}

pub(crate) fn ms(v: &Value) -> String {
    match v.as_i64() {
        Some(n) if n >= 10_000 => format!("{:.1} s", n as f64 / 1000.0),
        Some(n) => format!("{n} ms"),
        None => "-".into(),
    }
}

fn show(v: &Value) {
    let run = &v["run"];
    print_run_line(run);
    outln!(
        "tenant {}  created {}  updated {}  finished {}",
        s(&run["tenant"]),
        s(&run["created_at"]),
        s(&run["updated_at"]),
        s(&run["finished_at"])
    );
    if let Some(k) = run["idempotency_key"].as_str() {
        outln!("idempotency key {k}");
    }
    if let Some(f) = run["retriggered_from"].as_str() {
        outln!("retriggered from {f}");
    }
    if run["debounce"].is_object() {
        let d = &run["debounce"];
        outln!(
            "debounce key {}  keep {}  window until {}  collapsed {}",
            s(&d["key"]),
            s(&d["keep"]),
            s(&d["until"]),
            d["collapsed"]
        );
    }
    outln!("input {}", run["input"]);
    if run["variables"] != json!({}) {
        outln!("variables {}", run["variables"]);
    }
    if !run["output"].is_null() {
        outln!("output {}", run["output"]);
    }
    if let Some(e) = run["last_error_message"].as_str() {
        let label = if run["status"] == "failed" {
            "last error"
        } else {
            "an earlier attempt's error"
        };
        outln!("{label} {}: {e}", s(&run["last_error_class"]));
    }
    if run["status"] == "needs_input" {
        outln!("waiting for input {}", run["input_request"]);
    }
    let attempts = v["attempts"].as_array().cloned().unwrap_or_default();
    if !attempts.is_empty() {
        outln!("\nattempts");
        let rows: Vec<Vec<String>> = attempts
            .iter()
            .map(|a| {
                let err = match a["error_class"].as_str() {
                    Some(c) => short(&format!("{c}: {}", s(&a["error_message"])), 60),
                    None => "-".into(),
                };
                let decision = if a["retry"].is_object() {
                    let r = &a["retry"];
                    format!(
                        "retry after {} ({}, policy {}), eligible {}",
                        ms(&r["delay_ms"]),
                        s(&r["reason"]),
                        s(&r["policy"]),
                        s(&r["eligible_at"])
                    )
                } else {
                    "-".into()
                };
                vec![
                    s(&a["attempt"]),
                    s(&a["started_at"]),
                    ms(&a["gap_ms"]),
                    ms(&a["duration_ms"]),
                    s(&a["outcome"]),
                    err,
                    decision,
                ]
            })
            .collect();
        table(
            &[
                "#", "started", "gap", "took", "outcome", "error", "decision",
            ],
            &rows,
        );
    }
    let steps = v["steps"].as_array().cloned().unwrap_or_default();
    if !steps.is_empty() {
        outln!("\nsteps");
        let rows: Vec<Vec<String>> = steps
            .iter()
            .map(|x| {
                vec![
                    s(&x["name"]),
                    s(&x["status"]),
                    s(&x["attempt"]),
                    short(&s(&x["error_message"]), 50),
                    s(&x["actor"]),
                ]
            })
            .collect();
        table(&["step", "status", "attempt", "error", "by"], &rows);
    }
    let ledger = v["ledger"].as_array().cloned().unwrap_or_default();
    if !ledger.is_empty() {
        outln!("\nledger");
        let rows: Vec<Vec<String>> = ledger
            .iter()
            .map(|x| {
                vec![
                    s(&x["idempotency_key"]),
                    s(&x["action"]),
                    s(&x["state"]),
                    s(&x["attempt"]),
                ]
            })
            .collect();
        table(&["key", "action", "state", "attempt"], &rows);
    }
    outln!("\ntimeline");
    let rows: Vec<Vec<String>> = v["timeline"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let mut what = s(&e["summary"]);
            if let Some(c) = e["comment"].as_str() {
                what.push_str(&format!(" — “{c}”"));
            }
            vec![s(&e["at"]), s(&e["kind"]), what]
        })
        .collect();
    table(&["at", "event", "what"], &rows);
}

/// `docket runs …`.
pub async fn runs(cmd: RunsCmd) -> Res<()> {
    use reqwest::Method;
    match cmd {
        RunsCmd::List {
            status,
            job,
            needs_attention,
            created_after,
            created_before,
            limit,
            cursor,
            conn,
        } => {
            let c = Client::new(conn.clone())?;
            let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            if let Some(v) = status {
                q.push(("status", v));
            }
            if let Some(v) = job {
                q.push(("job", v));
            }
            if needs_attention {
                q.push(("needs_attention", "true".into()));
            }
            if let Some(v) = created_after {
                q.push(("created_after", v));
            }
            if let Some(v) = created_before {
                q.push(("created_before", v));
            }
            if let Some(v) = cursor {
                q.push(("cursor", v));
            }
            let qs = serde_urlencoded_pairs(&q);
            let (_, v) = c
                .call(Method::GET, &format!("/api/runs?{qs}"), None)
                .await?;
            if conn.json {
                print_json(&v);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = v["runs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        s(&r["job"]),
                        status_of(r),
                        s(&r["attempt"]),
                        s(&r["created_at"]),
                        short(&s(&r["last_error_message"]), 50),
                    ]
                })
                .collect();
            table(
                &["id", "job", "status", "attempt", "created", "last error"],
                &rows,
            );
            if let Some(next) = v["next_cursor"].as_str() {
                outln!("more: --cursor {next}");
            }
            Ok(())
        }
        RunsCmd::Show { id, conn } => {
            let c = Client::new(conn.clone())?;
            let (_, v) = c
                .call(Method::GET, &format!("/api/runs/{id}"), None)
                .await?;
            if conn.json {
                print_json(&v);
            } else {
                show(&v);
            }
            Ok(())
        }
        RunsCmd::Wait { id, timeout, conn } => {
            let c = Client::new(conn.clone())?;
            wait_run(&c, &id, &timeout, conn.json).await
        }
        RunsCmd::Retry {
            id,
            vars,
            comment,
            conn,
        } => {
            let mut body = json!({ "comment": comment });
            if let Some(v) = vars {
                body["updated_variables"] = parse_json_arg("--vars", &v)?;
            }
            op(conn, &id, "retry", body).await
        }
        RunsCmd::Cancel { id, comment, conn } => {
            op(conn, &id, "cancel", json!({ "comment": comment })).await
        }
        RunsCmd::Skip { id, comment, conn } => {
            op(conn, &id, "skip", json!({ "comment": comment })).await
        }
        RunsCmd::Bulk {
            action,
            ids,
            status,
            job,
            since,
            vars,
            delay,
            comment,
            page,
            yes,
            conn,
        } => {
            let mut body = json!({ "action": action, "limit": page });
            if !ids.is_empty() {
                body["ids"] = json!(ids);
            } else {
                let Some(status) = status else {
                    return Err("give --ids, or a filter with --status (and --job, --since)"
                        .to_string()
                        .into());
                };
                let mut filter = json!({
                    "status": status.split(',').map(str::trim).collect::<Vec<_>>()
                });
                if let Some(j) = job {
                    filter["job"] = json!(j);
                }
                if let Some(since) = since {
                    filter["created_after"] = json!(since_time(&since)?);
                }
                body["filter"] = filter;
            }
            if let Some(c) = comment {
                body["comment"] = json!(c);
            }
            if let Some(v) = vars {
                body["updated_variables"] = parse_json_arg("--vars", &v)?;
            }
            if let Some(d) = delay {
                let dur = parse_delay(&d)
                    .ok_or_else(|| format!("--delay `{d}`: use 30s, 10m, 2h or 500ms"))?;
                body["delay_ms"] = json!(u64::try_from(dur.as_millis()).unwrap_or(u64::MAX));
            }
            bulk(conn, body, yes).await
        }
        RunsCmd::Export {
            job,
            status,
            since,
            out,
            conn,
        } => export(conn, job, status, since, out).await,
        RunsCmd::Delete { id, comment, conn } => {
            op(conn, &id, "delete", json!({ "comment": comment })).await
        }
        RunsCmd::Retrigger { id, comment, conn } => {
            op(conn, &id, "retrigger", json!({ "comment": comment })).await
        }
        RunsCmd::Postpone {
            id,
            until,
            delay,
            comment,
            conn,
        } => {
            let mut body = json!({ "comment": comment });
            match (until, delay) {
                (Some(u), None) => body["until"] = json!(u),
                (None, Some(d)) => {
                    let dur = parse_delay(&d)
                        .ok_or_else(|| format!("--delay `{d}`: use 30s, 10m, 2h or 500ms"))?;
                    // Saturating, not truncating: the server then refuses
                    // it, naming delay_ms and its range.
                    body["delay_ms"] = json!(u64::try_from(dur.as_millis()).unwrap_or(u64::MAX));
                }
                _ => return Err("give --until or --delay".to_string().into()),
            }
            op(conn, &id, "postpone", body).await
        }
        RunsCmd::Approve {
            id,
            data,
            comment,
            conn,
        } => decide(conn, &id, "approve", data, comment).await,
        RunsCmd::Reject {
            id,
            data,
            comment,
            conn,
        } => decide(conn, &id, "reject", data, comment).await,
        RunsCmd::Signal {
            id,
            name,
            data,
            signal_id,
            conn,
        } => signal(conn, &id, &name, data, signal_id).await,
    }
}

/// `docket runs signal RUN NAME --data JSON [--signal-id ID]`.
async fn signal(
    conn: Conn,
    id: &str,
    name: &str,
    data: Option<String>,
    signal_id: Option<String>,
) -> Res<()> {
    let data = data
        .map(|d| parse_json_arg("--data", &d))
        .transpose()?
        .unwrap_or(Value::Null);
    let mut body = json!({ "data": data });
    if let Some(sid) = signal_id {
        body["signal_id"] = json!(sid);
    }
    let c = Client::new(conn.clone())?;
    let (_, v) = c
        .call(
            reqwest::Method::POST,
            &format!("/api/runs/{}/signals/{}", encode(id), encode(name)),
            Some(body),
        )
        .await?;
    if conn.json {
        print_json(&v);
    } else {
        let what = if v["duplicate"] == true {
            "already had signal"
        } else if v["woke"] == true {
            "signalled (it was waiting: due now)"
        } else {
            "signalled (kept until it waits for it)"
        };
        outln!("run {id} {what}: \"{name}\" id {}", s(&v["signal"]["id"]));
    }
    Ok(())
}

/// `--since 1h`: now minus that, as RFC 3339.
fn since_time(since: &str) -> Res<String> {
    let d = parse_delay(since).ok_or_else(|| format!("--since `{since}`: use 30m, 2h, 7d"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok(docket::Timestamp(now.saturating_sub(d.as_millis() as i64).max(0)).to_rfc3339())
}

/// `docket runs bulk`: a dry run (the count) unless `yes`, then page by
/// page until the server's cursor runs out.
async fn bulk(conn: Conn, mut body: Value, yes: bool) -> Res<()> {
    let c = Client::new(conn.clone())?;
    let action = body["action"].as_str().unwrap_or("").to_string();
    if !yes {
        body["dry_run"] = json!(true);
        let (_, v) = c
            .call(reqwest::Method::POST, "/api/runs/bulk", Some(body))
            .await?;
        if conn.json {
            print_json(&v);
        } else {
            outln!(
                "{} runs match: run again with --yes to {action} them (each is audited)",
                s(&v["matched"])
            );
        }
        return Ok(());
    }
    let (mut ok, mut refused) = (0u64, 0u64);
    loop {
        let (_, v) = c
            .call(reqwest::Method::POST, "/api/runs/bulk", Some(body.clone()))
            .await?;
        ok += v["succeeded"].as_u64().unwrap_or(0);
        refused += v["failed"].as_u64().unwrap_or(0);
        if conn.json {
            outln!("{}", v);
        } else {
            for r in v["results"].as_array().cloned().unwrap_or_default() {
                if r["ok"] == true {
                    let new = r["new_run_id"]
                        .as_str()
                        .map(|n| format!(" (new run {n})"))
                        .unwrap_or_default();
                    outln!("{} {action}: {}{new}", s(&r["run_id"]), s(&r["status"]));
                } else {
                    outln!(
                        "{} refused ({}): {}",
                        s(&r["run_id"]),
                        s(&r["error"]),
                        s(&r["message"])
                    );
                }
            }
        }
        match v["next_cursor"].as_str() {
            Some(next) => body["cursor"] = json!(next),
            None => break,
        }
    }
    if !conn.json {
        outln!("{action}: {ok} done, {refused} refused");
    }
    Ok(())
}

/// `docket runs export`: JSON Lines of runs with their full history.
async fn export(
    conn: Conn,
    job: Option<String>,
    status: Option<String>,
    since: Option<String>,
    out: Option<std::path::PathBuf>,
) -> Res<()> {
    use std::io::Write as _;
    let c = Client::new(conn)?;
    let mut q: Vec<(&str, String)> = vec![("limit", "500".into())];
    if let Some(v) = status {
        q.push(("status", v));
    }
    if let Some(v) = job {
        q.push(("job", v));
    }
    if let Some(v) = since {
        q.push(("created_after", since_time(&v)?));
    }
    let mut sink: Box<dyn std::io::Write> = match &out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut n = 0u64;
    loop {
        let (_, page) = c
            .call(
                reqwest::Method::GET,
                &format!("/api/runs?{}", serde_urlencoded_pairs(&q)),
                None,
            )
            .await?;
        for r in page["runs"].as_array().cloned().unwrap_or_default() {
            let id = s(&r["id"]);
            // A run deleted or pruned since the page was read is skipped.
            match c
                .call(reqwest::Method::GET, &format!("/api/runs/{id}"), None)
                .await
            {
                Ok((_, full)) => {
                    writeln!(sink, "{full}").map_err(|e| format!("writing the export: {e}"))?;
                    n += 1;
                }
                Err(f) if f.message.starts_with("HTTP 404") => continue,
                Err(f) => return Err(f),
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => {
                q.retain(|(k, _)| *k != "cursor");
                q.push(("cursor", next.to_string()));
            }
            None => break,
        }
    }
    sink.flush()
        .map_err(|e| format!("writing the export: {e}"))?;
    if let Some(p) = out {
        eprintln_safe(&format!("exported {n} runs to {}", p.display()));
    }
    Ok(())
}

/// A line on stderr that never panics (stderr may be closed).
fn eprintln_safe(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `approve` or `reject`, with optional `--data` JSON for the handler.
async fn decide(
    conn: Conn,
    id: &str,
    what: &str,
    data: Option<String>,
    comment: Option<String>,
) -> Res<()> {
    let data = data
        .map(|d| parse_json_arg("--data", &d))
        .transpose()?
        .unwrap_or(Value::Null);
    op(conn, id, what, json!({ "data": data, "comment": comment })).await
}

fn serde_urlencoded_pairs(q: &[(&str, String)]) -> String {
    q.iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub(crate) fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `30s`, `10m`, `2h`, `500ms`.
pub(crate) fn parse_delay(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..split].parse().ok()?;
    // Checked: an overflowing product would wrap to a short delay in a
    // release build. The server range-checks the result (`delay_ms`).
    match &s[split..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86_400).map(Duration::from_secs),
        _ => None,
    }
}

async fn op(conn: Conn, id: &str, what: &str, mut body: Value) -> Res<()> {
    if body["comment"].is_null() {
        body.as_object_mut().map(|o| o.remove("comment"));
    }
    let c = Client::new(conn.clone())?;
    let (_, v) = c
        .call(
            reqwest::Method::POST,
            &format!("/api/runs/{id}/{what}"),
            Some(body),
        )
        .await?;
    if conn.json {
        print_json(&v);
    } else if what == "delete" {
        outln!(
            "deleted run {id} ({}, audited as run_deleted)",
            status_of(&v)
        );
    } else if what == "retrigger" {
        outln!(
            "retriggered {id} as run {} ({})",
            s(&v["run"]["id"]),
            s(&v["run"]["status"])
        );
    } else {
        let extra = if v["cancel_requested"] == true && v["status"] == "running" {
            " (cancel requested: it stops at its next step boundary)"
        } else if (what == "approve" || what == "reject") && v["status"] == "pending" {
            // The decision is stored; the handler runs again to act on it.
            " (the handler runs again to act on the decision: `docket runs wait` for the outcome)"
        } else {
            ""
        };
        outln!(
            "{what}: run {} is now {}{extra}",
            s(&v["id"]),
            status_of(&v)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(parse_delay("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_delay("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_delay("soon"), None);
        // Would wrap to 44 s if multiplied unchecked.
        assert_eq!(parse_delay("307445734561825861m"), None);
        assert_eq!(encode("a b&c,d"), "a%20b%26c,d");
        assert_eq!(short("abcdef", 4), "abc…");
        assert_eq!(ms(&json!(1500)), "1500 ms");
        assert_eq!(ms(&json!(15000)), "15.0 s");
    }
}
