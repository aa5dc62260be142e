//! Schemathesis (property-based API testing, from PyPI; `.ci/run` installs
//! the pinned version) against a real server with a token and some runs:
//! it generates requests from `/api/openapi.json` — valid and invalid — and
//! checks that no answer is a 5xx and every answer matches the document
//! (status codes, content types, schemas). Bounded: a fixed number of
//! examples per operation and a hard time limit.
//!
//! Without schemathesis the test FAILS, saying how to install it: CI must
//! never skip it silently.

use crate::common::{Opts, TestServer};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

/// The version `.ci/run` installs.
const PINNED: &str = "4.32.5";
/// The worker protocol's operations (docs/WORKER_PROTOCOL.md).
const WORKER_PATHS: &[&str] = &[
    "/api/worker/v1/claim",
    "/api/worker/v1/heartbeat",
    "/api/worker/v1/runs/{id}/end",
    "/api/worker/v1/runs/{id}/steps/get",
    "/api/worker/v1/runs/{id}/steps/complete",
    "/api/worker/v1/runs/{id}/steps/fail",
    "/api/worker/v1/runs/{id}/actions/begin",
    "/api/worker/v1/runs/{id}/actions/commit",
    "/api/worker/v1/runs/{id}/actions/fail",
    "/api/worker/v1/runs/{id}/actions/reconciled",
    "/api/worker/v1/runs/{id}/progress",
    "/api/worker/v1/runs/{id}/log",
];
/// The whole run's bound.
const LIMIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_schema_violation() {
    let bin = std::env::var("DOCKET_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    let version = std::process::Command::new(&bin).arg("--version").output();
    match version {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout).to_string();
            if !v.contains(PINNED) {
                eprintln!("note: schemathesis {PINNED} is the pinned version, found {v}");
            }
        }
        _ => panic!(
            "schemathesis is not installed: `pip install schemathesis=={PINNED}` \
             (.ci/run installs it), or set DOCKET_SCHEMATHESIS to its path"
        ),
    }
    let s = TestServer::start_with(Opts::default()).await;
    // Some data for the operations that read runs.
    for job in ["noop", "flaky", "approval", "stepper"] {
        s.trigger(job, json!({"failures": 1})).await;
    }
    let dir = std::env::temp_dir().join(format!("docket-schemathesis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // `until` must lie in the future, which a schema cannot say: a
    // schema-valid past time is a documented 422, so that one operation is
    // not held to "every schema-valid request is accepted". The same for a
    // schedule (a valid cron expression, an IANA zone, `cron` or `every`,
    // `end` after `start`) and a backfill (`to` after `from`, at most 1,000
    // slots): their other checks (no 5xx, documented statuses, response
    // schemas) still hold.
    // Bulk with action postpone takes the same `until`.
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!("[checks]\nnot_a_server_error.enabled = true\nstatus_code_conformance.enabled = true\n\
         content_type_conformance.enabled = true\nresponse_schema_conformance.enabled = true\n\
         positive_data_acceptance.enabled = true\nignored_auth.enabled = true\n\
         unsupported_method.enabled = true\nnegative_data_rejection.enabled = false\n\
         missing_required_header.enabled = false\nuse_after_free.enabled = false\n\
         ensure_resource_availability.enabled = false\nobject_level_authorization.enabled = false\n\
         response_headers_conformance.enabled = false\nallow_header_conformance.enabled = false\n\n\
         [[operations]]\ninclude-path = \"/api/runs/{{id}}/postpone\"\n\
         checks.positive_data_acceptance.enabled = false\n\n\
         [[operations]]\ninclude-path = \"/api/schedules\"\ninclude-method = \"POST\"\n\
         checks.positive_data_acceptance.enabled = false\n\n\
         [[operations]]\ninclude-path = \"/api/schedules/{{name}}/backfill\"\n\
         checks.positive_data_acceptance.enabled = false\n\n\
         [[operations]]\ninclude-path = \"/api/runs/bulk\"\n\
         checks.positive_data_acceptance.enabled = false\n{}",
        // The worker protocol answers an operator token (the one given
        // here) 403 `forbidden` (documented), and a worker token a random
        // lease 404/409: no schema-valid request is accepted as such.
        WORKER_PATHS
            .iter()
            .map(|p| format!(
                "\n[[operations]]\ninclude-path = \"{p}\"\nchecks.positive_data_acceptance.enabled = false\n"
            ))
            .collect::<String>()
        ),
    )
    .unwrap();
    let (ok, text) = run(
        &bin,
        &dir,
        &config,
        &s,
        &s.a,
        &[
            // Streams and long polls answer only when something happens or
            // their timeout passes: not request/response operations to fuzz.
            "--exclude-path",
            "/api/events",
            "--exclude-path",
            "/api/runs/{id}/wait",
        ],
    )
    .await;
    let operator = (ok, text);
    // The worker protocol with a worker token (the run above had an
    // operator token: every worker call answered 403). The claim is a long
    // poll: left out.
    let t = docket_server::auth::issue_scoped_token(
        "acme",
        "fuzz-worker",
        docket_store::TokenScope::Worker,
        s.docket.clock().now(),
    )
    .unwrap();
    s.docket.store().create_token(t.record).await.unwrap();
    let (ok, text) = run(
        &bin,
        &dir,
        &config,
        &s,
        &t.secret,
        &[
            "--include-path-regex",
            "^/api/worker/v1/",
            "--exclude-path",
            "/api/worker/v1/claim",
        ],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    s.stop().await;
    assert!(operator.0, "schemathesis failed:\n{}", operator.1);
    assert!(ok, "schemathesis (worker token) failed:\n{text}");
}

/// One schemathesis run against `s` with `token`: success and its output.
async fn run(
    bin: &str,
    dir: &std::path::Path,
    config: &std::path::Path,
    s: &TestServer,
    token: &str,
    filters: &[&str],
) -> (bool, String) {
    let child = tokio::process::Command::new(bin)
        .current_dir(dir)
        .arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(s.url("/api/openapi.json"))
        .args(["--url", &s.base])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(filters)
        // One worker: CPython 3.11 can fail compiling in two threads at
        // once ("AST constructor recursion depth mismatch"), which
        // schemathesis reports as a runtime error.
        .args(["--max-examples", "25", "--seed", "7", "--workers", "1"])
        .args(["--request-timeout", "20", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .env("SCHEMATHESIS_HOOKS", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start schemathesis");
    let out = child.wait_with_output();
    let out = tokio::time::timeout(LIMIT, out)
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran over {LIMIT:?}"))
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
