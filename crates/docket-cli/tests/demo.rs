//! `docket demo`, end to end: the real binary, its real local service and a
//! temporary SQLite file. Every wait is bounded by a deadline.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_docket");
/// The demo takes a few seconds; this bounds a slow, loaded machine.
const DEADLINE: Duration = Duration::from_secs(120);

/// A directory for the demo's temporary files (its TMPDIR), removed at the
/// end even when the child was killed and could not clean up.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("docket-demo-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo(scratch: &Scratch, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("demo")
        .args(args)
        .env("TMPDIR", &scratch.0)
        .env_remove("DOCKET_LOG")
        .kill_on_drop(true);
    c
}

fn run_of<'a>(summary: &'a Value, scenario: &str) -> &'a Value {
    summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["scenario"] == scenario)
        .unwrap_or_else(|| panic!("no run for scenario {scenario}"))
}

fn verdicts(run: &Value) -> Vec<&str> {
    run["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["verdict"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn demo_reconciles_the_seed_prospect_fails_the_422_at_once_and_backs_off() {
    let scratch = Scratch::new();
    let out = tokio::time::timeout(DEADLINE, demo(&scratch, &["--json"]).output())
        .await
        .expect("docket demo --json finished within the deadline")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let s: Value = serde_json::from_str(&stdout).expect("--json prints one JSON document");
    assert_eq!(s["ok"], true, "{stdout}");
    assert!(
        s["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{stdout}"
    );

    // The seed's prospect: committed on the first call, which timed out;
    // reconciled on the second attempt; the service saw one POST and one
    // commit for its key.
    let seed = run_of(&s, "committed_then_timed_out");
    assert_eq!(seed["prospect"], "prospect-7ca677ed25d3");
    assert_eq!(seed["status"], "completed");
    assert_eq!(seed["service"]["commits"], 1, "{seed:#}");
    assert_eq!(seed["service"]["posts"], 1, "{seed:#}");
    assert_eq!(seed["reconciled"], true);
    assert_eq!(seed["ledger_state"], "committed");
    assert_eq!(seed["attempts"][0]["error_class"], "timeout");
    let ledger: Vec<(&str, Option<&str>, bool)> = seed["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["event"].as_str().unwrap(),
                l["state"].as_str(),
                l["reconcile_first"] == true,
            )
        })
        .collect();
    assert_eq!(
        ledger,
        vec![
            ("action_started", Some("started"), false),
            ("action_unknown", Some("unknown"), false),
            // The second attempt takes the key over to reconcile it: it
            // sends nothing (the service saw one POST).
            ("action_started", Some("started"), true),
            ("action_reconciled", Some("committed"), false),
        ],
        "unknown, then taken over and committed by the reconcile lookup; never sent again"
    );

    // The 422: failed at once, one attempt, invalid_input.
    let bad = run_of(&s, "invalid_input");
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["terminal_reason"], "invalid_input");
    assert_eq!(bad["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(bad["service"]["posts"], 1);
    assert!(
        bad["last_error"].as_str().unwrap().contains("[redacted]"),
        "the echoed credential is redacted: {bad:#}"
    );

    // The retried runs completed, with delayed retries only.
    for id in [
        "committed_then_timed_out",
        "rate_limited",
        "unavailable_twice",
        "timed_out_not_committed",
    ] {
        let r = run_of(&s, id);
        assert_eq!(r["status"], "completed", "{id}: {r:#}");
        assert!(
            verdicts(r).iter().all(|v| *v == "delayed_retry"),
            "{id}: {:?}",
            verdicts(r)
        );
        assert_eq!(r["service"]["commits"], 1, "{id}: one side effect");
    }
    assert_eq!(verdicts(run_of(&s, "unavailable_twice")), ["delayed_retry"]);
    assert_eq!(
        verdicts(run_of(&s, "timed_out_not_committed")),
        ["delayed_retry"]
    );
    let limited = run_of(&s, "rate_limited");
    assert_eq!(limited["attempts"][0]["retry_reason"], "retry_after");
    let posts: Vec<&Value> = limited["service"]["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["method"] == "POST")
        .collect();
    let seen_gap =
        posts[1]["received_ms"].as_i64().unwrap() - posts[0]["answered_ms"].as_i64().unwrap();
    assert!(seen_gap >= 1000, "Retry-After: 1 honoured: {seen_gap} ms");

    // Exhausted: the policy's 4 attempts, then terminal_policy_failure.
    let ex = run_of(&s, "unavailable_exhausted");
    assert_eq!(ex["status"], "failed");
    assert_eq!(ex["terminal_reason"], "max_retries_exhausted");
    assert_eq!(ex["attempts"].as_array().unwrap().len(), 4);
    assert_eq!(
        verdicts(ex),
        ["delayed_retry", "delayed_retry", "terminal_policy_failure"]
    );

    // No retry came early, by the attempt rows or by the classifier.
    for r in s["runs"].as_array().unwrap() {
        for a in r["attempts"].as_array().unwrap() {
            if let (Some(gap), Some(delay)) = (a["gap_ms"].as_i64(), a["policy_delay_ms"].as_i64())
            {
                assert!(gap >= delay, "{}: {a}", r["prospect"]);
            }
        }
    }
    let report = &s["job_report"];
    assert_eq!(report["runs_examined"], 6);
    assert!(report["counts"].get("retry_without_backoff").is_none());
    assert!(report["counts"].get("lease_overlap").is_none());
    assert_eq!(report["same_action_same_error_within_backoff_window"], 0);

    // The temporary database is gone.
    let db = PathBuf::from(s["database"].as_str().unwrap());
    assert!(db.starts_with(&scratch.0), "{}", db.display());
    assert!(!db.exists(), "{} removed at exit", db.display());
}

#[tokio::test]
async fn demo_keep_serves_the_runs_through_the_api() {
    let scratch = Scratch::new();
    // Port 0: the OS picks a free port; the demo prints the bound address.
    let mut child = demo(&scratch, &["--keep", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    let mut base = None;
    // Read the report until the demo says it stays up.
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no 'still running' line before the deadline: {seen:#?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the demo exited early: {seen:#?}"));
        if let Some(rest) = line.strip_prefix("Dashboard: ") {
            base = Some(
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches('/')
                    .to_string(),
            );
        }
        let done = line.starts_with("Docket is still running");
        seen.push(line);
        if done {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let base = base.unwrap_or_else(|| panic!("no dashboard address: {seen:#?}"));
    assert!(
        seen.iter().any(|l| l.contains("All 9 checks passed")),
        "{seen:#?}"
    );

    let client = reqwest::Client::new();
    // The listener was bound before the runs were triggered, so the kernel
    // queues this connection even if the server were not polling yet: one
    // request, with a bound, no polling.
    let health = client
        .get(format!("{base}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("/healthz answers");
    assert!(health.status().is_success(), "{}", health.status());
    let page: Value = client
        .get(format!("{base}/api/runs?job=send-email"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let runs = page["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6, "{page:#}");
    let prospects: Vec<&str> = runs
        .iter()
        .map(|r| r["input"]["prospect_id"].as_str().unwrap())
        .collect();
    assert!(
        prospects.contains(&"prospect-7ca677ed25d3"),
        "{prospects:?}"
    );
    let seed = runs
        .iter()
        .find(|r| r["input"]["prospect_id"] == "prospect-7ca677ed25d3")
        .unwrap();
    assert_eq!(seed["status"], "completed");
    assert!(runs
        .iter()
        .all(|r| r["status"] == "completed" || r["status"] == "failed"));

    child.kill().await.unwrap();
}

#[tokio::test]
async fn demo_refuses_to_serve_without_authentication_beyond_loopback() {
    let scratch = Scratch::new();
    let out = tokio::time::timeout(
        DEADLINE,
        demo(&scratch, &["--keep", "--addr", "0.0.0.0:0"]).output(),
    )
    .await
    .expect("refused within the deadline")
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve the demo on 0.0.0.0:0") && stderr.contains("loopback"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing ran");
}
