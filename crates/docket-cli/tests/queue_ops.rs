//! Queue operations from the command line, end to end: `docket runs bulk`
//! (dry run, then --yes), `docket runs export`, `docket runs delete`,
//! `docket jobs [pause|resume]`, and a served `[retention]` table pruning.
//! The real binary, a real server on a loopback port, a temporary SQLite
//! file (helpers as in tests/cli.rs).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_docket");

fn tmp_db() -> String {
    let dir = std::env::temp_dir().join(format!("docket-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("docket.db").to_str().unwrap().to_string()
}

fn docket(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("DOCKET_URL")
        .env_remove("DOCKET_TOKEN")
        .env_remove("DOCKET_DB")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the command with its stdout a pipe whose reader is already gone
/// (as under `| head -1` once head has its line): the exit code and stderr.
/// The reader is closed before the command starts, so its first write
/// fails whatever the timing.
#[allow(dead_code)]
fn docket_into_closed_pipe(args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(args)
        .env_remove("DOCKET_URL")
        .env_remove("DOCKET_TOKEN")
        .env_remove("DOCKET_DB")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Served {
    /// Taken by `terminate`; killed on drop otherwise, so a failing test
    /// leaves no server behind.
    child: Option<Child>,
    url: String,
    /// Log lines before "listening".
    #[allow(dead_code)]
    early: Vec<String>,
}

/// Starts `docket serve` on 127.0.0.1:0 and reads the bound address from
/// its log (waiting at most 30 s).
fn serve(db: &str, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--db", db, "--addr", "127.0.0.1:0", "--demo-jobs"])
        .args(extra)
        .env("DOCKET_LOG", "info")
        .env_remove("DOCKET_DB")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Keep draining after the test stops listening.
            let _ = tx.send(line);
        }
    });
    let mut early = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not log its address within 30 s: {early:?}");
        };
        early.push(line.clone());
        if line.contains("docket API listening") {
            let addr = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            return Served {
                child: Some(child),
                url: format!("http://{addr}"),
                early,
            };
        }
    }
}

/// SIGTERM, then the exit code (waiting at most 20 s).
impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[allow(dead_code)]
fn terminate(mut s: Served) -> i32 {
    let mut child = s.child.take().expect("the server is running");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().map(|st| st.code().unwrap_or(-1)));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("docket serve stops within 20 s of SIGTERM")
        .unwrap()
}

#[test]
fn bulk_export_delete_and_pause_from_the_command_line() {
    let db = tmp_db();
    let (code, secret, err) = docket(
        &[
            "token", "create", "--tenant", "acme", "--name", "alice", "--db", &db,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let secret = secret.trim().to_string();
    let s = serve(&db, &[]);
    let env = [
        ("DOCKET_URL", s.url.as_str()),
        ("DOCKET_TOKEN", secret.as_str()),
    ];
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (code, out, err) = docket(
            &[
                "trigger",
                "fail-then-succeed",
                r#"{"failures":1,"class":"permanent"}"#,
                "--wait",
                "--timeout",
                "20s",
                "--json",
            ],
            &env,
        );
        assert_eq!(code, 1, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        ids.push(v["run"]["id"].as_str().unwrap().to_string());
    }
    let bulk = [
        "runs",
        "bulk",
        "retry",
        "--job",
        "fail-then-succeed",
        "--status",
        "failed",
        "--since",
        "1h",
        "--comment",
        "vendor fixed",
        "--page",
        "2",
    ];
    // Without --yes: only the count.
    let (code, out, err) = docket(&bulk, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 runs match"), "{out}");
    let (_, out, _) = docket(&["runs", "list", "--status", "failed", "--json"], &env);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["runs"].as_array().unwrap().len(),
        3,
        "a dry run changes nothing"
    );
    let mut act = bulk.to_vec();
    act.push("--yes");
    let (code, out, err) = docket(&act, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("retry: 3 done, 0 refused"), "{out}");
    for id in &ids {
        let (code, out, _) = docket(&["runs", "wait", id, "--timeout", "20s"], &env);
        assert_eq!(code, 0, "{out}");
    }
    // Export: one JSON line per run with its full history.
    let file = std::path::Path::new(&db).with_file_name("export.jsonl");
    let (code, _, err) = docket(
        &[
            "runs",
            "export",
            "--job",
            "fail-then-succeed",
            "--out",
            file.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exported 3 runs"), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l["run"]["status"], "completed");
        assert_eq!(l["attempts"].as_array().unwrap().len(), 2);
        assert!(l["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "operator_retry"));
    }
    // Delete one (audited); a second delete: 404.
    let (code, out, err) = docket(&["runs", "delete", &ids[0], "--comment", "archived"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted run"), "{out}");
    let (code, _, err) = docket(&["runs", "delete", &ids[0]], &env);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 404"), "{err}");
    // Pause, shown by `docket jobs`, then resume.
    let (code, out, err) = docket(&["jobs", "pause", "noop", "--comment", "incident"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("job noop is now paused for tenant acme"),
        "{out}"
    );
    let (_, out, _) = docket(&["jobs"], &env);
    let row = out
        .lines()
        .find(|l| l.starts_with("noop"))
        .unwrap()
        .to_string();
    assert!(row.contains("paused"), "{out}");
    let (code, out, _) = docket(&["jobs", "resume", "noop"], &env);
    assert_eq!(code, 0);
    assert!(out.contains("now running"), "{out}");
    let (code, _, err) = docket(&["jobs", "pause", "nope"], &env);
    assert_eq!(code, 1);
    assert!(err.contains("unknown job"), "{err}");
}

/// `[retention]` in the served configuration: checked strictly at start
/// (the key named), and a valid one starts the pruner.
#[test]
fn serve_checks_retention_and_starts_the_pruner() {
    let db = tmp_db();
    let cfg = std::path::Path::new(&db).with_file_name("docket.toml");
    std::fs::write(&cfg, "[retention]\ncompleted = \"0d\"\nfailed = \"30\"\n").unwrap();
    let (code, _, err) = docket(
        &[
            "serve",
            "--db",
            &db,
            "--addr",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("retention.completed") && err.contains("zero"),
        "{err}"
    );
    assert!(
        err.contains("retention.failed") && err.contains("no unit"),
        "{err}"
    );
    std::fs::write(
        &cfg,
        "[retention]\ncompleted = \"7d\"\nfailed = \"30d\"\nledger = \"90d\"\n",
    )
    .unwrap();
    let s = serve(&db, &["--config", cfg.to_str().unwrap()]);
    assert!(
        s.early.iter().any(|l| l.contains("pruner started")),
        "{:?}",
        s.early
    );
    assert_eq!(terminate(s), 0);
}

/// `docket bench bulk-retry` (issue 15's bulk measurement) on a small
/// scale: it exits 0 only when every failed run was retried through
/// `POST /api/runs/bulk`, none is left failed and each has its own audit
/// event; its JSON says so.
#[test]
fn bench_bulk_retry_retries_and_audits_every_run() {
    let (code, out, err) = docket(&["bench", "bulk-retry", "--runs", "300", "--json"], &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(r["dry_run_matched"], 300, "{r}");
    assert_eq!(r["succeeded"], 300, "{r}");
    assert_eq!(r["left_failed"], 0, "{r}");
    assert_eq!(r["audited_runs"], 300, "{r}");
    assert!(r["list_requests"].as_u64() > Some(0), "{r}");
}

/// `docket bench W1 --separate --runs 200` and `W2 --separate --runs 20`
/// on `db` (a fresh SQLite file when `None`): the worker and the producer
/// run in processes of their own, and the JSON reports are complete and
/// exact (every run executed once, latencies in order). Not the speed.
fn bench_separate_reports_every_run(db: Option<&str>, backend: &str) {
    let run = |workload: &str, runs: &str| {
        let mut args = vec!["bench", workload, "--separate", "--runs", runs, "--json"];
        if let Some(db) = db {
            args.extend(["--db", db]);
        }
        let (code, out, err) = docket(&args, &[]);
        assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
        let r: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(r["workload"], workload, "{r}");
        assert_eq!(r["backend"], backend, "{r}");
        assert_eq!(r["mode"], "separate", "{r}");
        assert_eq!(r["runs"].as_u64(), runs.parse().ok(), "{r}");
        assert_eq!(r["executions_expected"], r["runs"], "{r}");
        assert_eq!(r["executions_actual"], r["runs"], "{r}");
        assert_eq!(r["duplicates"], 0, "{r}");
        assert!(r["peak_rss_mb"].as_f64() > Some(0.0), "{r}");
        assert!(r["wall_s"].as_f64() > Some(0.0), "{r}");
        r
    };

    let w1 = run("W1", "200");
    assert!(w1["enqueue_per_s"].as_f64() > Some(0.0), "{w1}");
    assert!(w1["processed_per_s"].as_f64() > Some(0.0), "{w1}");

    let w2 = run("W2", "20");
    let ms = |k: &str| w2[k].as_f64().unwrap_or_else(|| panic!("no {k}: {w2}"));
    let (p50, p95, p99) = (ms("p50_ms"), ms("p95_ms"), ms("p99_ms"));
    assert!(0.0 <= p50 && p50 <= p95 && p95 <= p99, "{w2}");
    // From right before the trigger call (the harness's measure) is never
    // shorter than from its return.
    let (h50, h95, h99) = (
        ms("harness_p50_ms"),
        ms("harness_p95_ms"),
        ms("harness_p99_ms"),
    );
    assert!(h50 >= p50 && h95 >= p95 && h99 >= p99, "{w2}");
    assert!(h50 <= h95 && h95 <= h99, "{w2}");
}

#[test]
fn bench_separate_reports_every_run_on_sqlite() {
    bench_separate_reports_every_run(None, "sqlite");
}

#[test]
fn bench_separate_reports_every_run_on_postgres() {
    match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => {
            bench_separate_reports_every_run(Some(&url), "postgres")
        }
        _ => eprintln!("skipping: DOCKET_TEST_POSTGRES_URL is not set"),
    }
}

/// A child that fails is reported with its own error, and the bench fails.
#[test]
fn bench_separate_reports_a_failing_child() {
    let dir = std::env::temp_dir().join(format!("docket-missing-{}", uuid::Uuid::new_v4()));
    let db = format!("sqlite://{}", dir.join("x.db").display());
    let (code, out, err) = docket(&["bench", "W1", "--separate", "--db", &db], &[]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("enqueue-w1 exited before its RESULT line"),
        "{err}"
    );
    assert!(err.contains("unable to open database file"), "{err}");
}
