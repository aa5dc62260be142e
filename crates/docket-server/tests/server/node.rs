//! The seed's JavaScript client code (RetryManager with backoff, the
//! circuit breaker, retryWithLimit, retryWithFallback) run with `node`
//! against a real server, unchanged except for the base URL.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn failed_run(s: &TestServer, job: &str, input: Value) -> String {
    // No token: the seed's fetch sends none, so this server runs with the
    // development flag and every request is in the `default` tenant.
    let (st, v) = s
        .call(
            reqwest::Method::POST,
            "/api/runs",
            None,
            Some(json!({"job": job, "input": input})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["run"]["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, w) = s
            .call(
                reqwest::Method::GET,
                &format!("/api/runs/{id}/wait?timeout=5s"),
                None,
                None,
            )
            .await;
        if w["run"]["status"] == "failed" {
            return id;
        }
        assert!(tokio::time::Instant::now() < deadline, "{w}");
    }
}

#[tokio::test]
async fn seed_javascript_clients_work_unchanged() {
    let node = std::process::Command::new("node").arg("--version").output();
    if node.is_err() {
        eprintln!("skipped: `node` is not installed");
        return;
    }
    let s = TestServer::start_with(no_auth()).await;
    let recovers = failed_run(&s, "flaky", json!({"failures": 2})).await;
    let always = failed_run(&s, "flaky", json!({"failures": 99})).await;
    let ok = failed_run(&s, "flaky", json!({"failures": 1})).await;
    let limited = failed_run(&s, "flaky", json!({"failures": 99})).await;
    let fallback = failed_run(&s, "stepper", json!({"failures": 99})).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/seed_client.js");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg(script)
            .args([&recovers, &always, &ok, &limited, &fallback])
            .env("DOCKET_URL", &s.base)
            .output(),
    )
    .await
    .expect("node finishes within 60 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result:\n{stdout}\n{stderr}"));
    let r: Value = serde_json::from_str(line).unwrap();
    assert!(stdout.contains("Retry successful on attempt 2"), "{stdout}");
    assert!(
        stderr.contains("Retry attempt 1 failed: Task retry failed."),
        "{stderr}"
    );
    assert_eq!(r["backoff"]["isSuccessful"], true);
    assert_eq!(
        r["backoff"]["message"],
        "Task retried successfully and process continued."
    );
    assert_eq!(r["backoff"]["variables"]["retryAttempt"], 2);
    assert_eq!(r["breaker"]["state"], "OPEN");
    assert_eq!(
        r["breaker"]["errors"],
        json!([
            "Retry failed",
            "Retry failed",
            "Circuit breaker is OPEN - retry not allowed yet"
        ])
    );
    assert_eq!(
        r["breakerOk"],
        json!({"state": "CLOSED", "failures": 0, "isSuccessful": true})
    );
    let msgs = r["limit"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 6);
    assert!(
        msgs[..5].iter().all(|m| m == "Task retry failed."),
        "{msgs:?}"
    );
    assert_eq!(msgs[5], "threw: Maximum retry limit (5) reached");
    assert_eq!(r["limit"]["retryCount"], 5);
    let fb = r["fallback"]["messages"].as_array().unwrap();
    assert!(fb[..4].iter().all(|m| m == "Task retry failed."), "{fb:?}");
    assert_eq!(fb[4], "Task skipped successfully and process continued.");
    assert_eq!(
        r["fallback"]["variables"]["apiEndpoint"],
        "https://backup-api.example.com"
    );
    assert_eq!(r["fallback"]["variables"]["retryAttempt"], 4);
    // The seed's comments are in the audit trail.
    let (_, d) = s
        .call(
            reqwest::Method::GET,
            &format!("/api/runs/{limited}"),
            None,
            None,
        )
        .await;
    let comments: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "operator_retry")
        .map(|e| e["comment"].as_str().unwrap())
        .collect();
    assert_eq!(comments[0], "Retry attempt 1 of 5");
    assert_eq!(comments.len(), 5);
    s.stop().await;
}
