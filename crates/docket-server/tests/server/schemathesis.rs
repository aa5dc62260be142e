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
    // schema-valid past time is a documented 422, so the operations that
    // take it (postpone, and bulk with action postpone) are not held to
    // "every schema-valid request is accepted".
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks]\nnot_a_server_error.enabled = true\nstatus_code_conformance.enabled = true\n\
         content_type_conformance.enabled = true\nresponse_schema_conformance.enabled = true\n\
         positive_data_acceptance.enabled = true\nignored_auth.enabled = true\n\
         unsupported_method.enabled = true\nnegative_data_rejection.enabled = false\n\
         missing_required_header.enabled = false\nuse_after_free.enabled = false\n\
         ensure_resource_availability.enabled = false\nobject_level_authorization.enabled = false\n\
         response_headers_conformance.enabled = false\nallow_header_conformance.enabled = false\n\n\
         [[operations]]\ninclude-path = \"/api/runs/{id}/postpone\"\n\
         checks.positive_data_acceptance.enabled = false\n\n\
         [[operations]]\ninclude-path = \"/api/runs/bulk\"\n\
         checks.positive_data_acceptance.enabled = false\n",
    )
    .unwrap();
    let child = tokio::process::Command::new(&bin)
        .current_dir(&dir)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(s.url("/api/openapi.json"))
        .args(["--url", &s.base])
        .args(["-H", &format!("Authorization: Bearer {}", s.a)])
        // Streams and long polls answer only when something happens or
        // their timeout passes: not request/response operations to fuzz.
        .args(["--exclude-path", "/api/events"])
        .args(["--exclude-path", "/api/runs/{id}/wait"])
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
    let _ = std::fs::remove_dir_all(&dir);
    s.stop().await;
    assert!(out.status.success(), "schemathesis failed:\n{text}");
}
