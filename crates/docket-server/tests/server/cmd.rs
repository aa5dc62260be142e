//! The seed's command endpoint: shapes, messages and the bounded wait.

use crate::common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn cmd(s: &TestServer, path: &str, cmd: &str, data: Value) -> (StatusCode, Value) {
    s.post(path, json!({ "cmd": cmd, "data": data })).await
}

#[tokio::test]
async fn retry_failed_again_then_succeeds_with_merged_variables() {
    let s = TestServer::start().await;
    let id = s.trigger("flaky", json!({"failures": 2})).await;
    s.until(&id, &["failed"]).await;
    let (st, v) = cmd(
        &s,
        "/api/core/cmd",
        "GetProcessStateCommand",
        json!({"instanceGuid": id}),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["isSuccessful"], true);
    assert_eq!(v["statusCode"], "00");
    assert_eq!(v["data"]["status"], "error");
    assert_eq!(v["data"]["error"]["attemptNumber"], 1);
    assert!(v["data"]["error"]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("503"));
    assert_eq!(v["data"]["state"]["variables"], json!({}));

    let (st, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({
            "instanceGuid": id,
            "updatedVariables": {"retryCount": 1, "timeout": 10000},
            "comment": "Retrying after increasing timeout value"
        }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["isSuccessful"], false);
    assert_eq!(v["message"], "Task retry failed.");
    assert_eq!(v["statusCode"], "99");
    assert_eq!(v["data"]["instanceGuid"], id.as_str());
    assert_eq!(v["data"]["status"], "error");
    assert_eq!(v["data"]["error"]["attemptNumber"], 2);
    assert_eq!(v["data"]["error"]["taskId"], "Task_CreditCheck");
    assert!(v["data"]["error"]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("503 Service Unavailable"));
    assert!(v["data"]["error"]["lastAttemptAt"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    let actions: Vec<&str> = v["data"]["nextActions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["command"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "RetryFailedTaskCommand",
            "SkipFailedTaskCommand",
            "CancelProcessInstanceCommand"
        ]
    );

    let (st, v) = cmd(
        &s,
        "/api/bpm/cmd",
        "RetryFailedTaskCommand",
        json!({
            "instanceGuid": id,
            "updatedVariables": {"retryCount": 2},
            "comment": "third time"
        }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["isSuccessful"], true, "{v}");
    assert_eq!(
        v["message"],
        "Task retried successfully and process continued."
    );
    assert_eq!(v["statusCode"], "00");
    assert_eq!(v["data"]["status"], "completed");
    assert_eq!(v["data"]["retriedTask"]["previousAttempts"], 2);
    assert_eq!(v["data"]["retriedTask"]["retryComment"], "third time");
    assert_eq!(v["data"]["result"]["waiting"], false);
    assert!(v["data"]["result"]["taskExecutionTime"].is_i64());
    assert_eq!(
        v["data"]["state"]["variables"],
        json!({"retryCount": 2, "timeout": 10000})
    );
    // The comments are in the audit trail with the token's name.
    let (_, d) = s.get(&format!("/api/runs/{id}")).await;
    let audit: Vec<(String, String)> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "operator_retry")
        .map(|e| {
            (
                e["actor"].as_str().unwrap().into(),
                e["comment"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        audit,
        [
            (
                "alice".to_string(),
                "Retrying after increasing timeout value".to_string()
            ),
            ("alice".into(), "third time".into())
        ]
    );

    // Not in error state now.
    let (st, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"instanceGuid": id}),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(
        v,
        json!({
            "isSuccessful": false,
            "message": "Process instance is not in error state. Current state: completed",
            "statusCode": "99",
            "data": { "currentStatus": "completed" }
        })
    );
    s.stop().await;
}

#[tokio::test]
async fn retry_then_waiting_at_user_task_and_bound_passing() {
    let s = TestServer::start().await;
    let id = s.trigger("approval", json!({"failures": 1})).await;
    s.until(&id, &["failed"]).await;
    let (st, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"instanceGuid": id}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["isSuccessful"], true);
    assert_eq!(
        v["message"],
        "Task retried successfully. Process waiting at next UserTask."
    );
    assert_eq!(v["data"]["status"], "waiting");
    assert_eq!(v["data"]["currentActivityId"], "Task_ApprovalDecision");
    assert_eq!(v["data"]["currentTask"]["taskType"], "UserTask");
    assert_eq!(v["data"]["currentTask"]["request"], json!({"amount": 100}));
    let acts: Vec<&str> = v["data"]["nextActions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(&acts[..2], ["approve", "reject"]);

    // A retried attempt that outlasts the bound: answered as still running.
    let slow = s
        .trigger("flaky", json!({"failures": 1, "sleep_ms": 1500}))
        .await;
    s.until(&slow, &["failed"]).await;
    let started = std::time::Instant::now();
    let (st, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"instanceGuid": slow, "waitTimeoutMs": 200}),
    )
    .await;
    assert!(started.elapsed() < std::time::Duration::from_millis(1400));
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["isSuccessful"], true);
    assert_eq!(v["data"]["status"], "running");
    assert_eq!(v["data"]["result"]["timedOut"], true);
    s.until(&slow, &["completed"]).await;
    let (st, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"instanceGuid": slow, "waitTimeoutMs": 300001}),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["data"]["field"], "data.waitTimeoutMs");
    s.stop().await;
}

#[tokio::test]
async fn skip_cancel_not_found_and_bad_envelopes() {
    let s = TestServer::start().await;
    let id = s.trigger("stepper", json!({"failures": 9})).await;
    s.until(&id, &["failed"]).await;
    let (_, st) = cmd(
        &s,
        "/api/core/cmd",
        "GetProcessStateCommand",
        json!({"instanceGuid": id}),
    )
    .await;
    assert_eq!(st["data"]["state"]["completedTasks"], json!(["validate"]));
    assert_eq!(st["data"]["error"]["taskId"], "charge");
    let (code, v) = cmd(&s, "/api/core/cmd", "SkipFailedTaskCommand", json!({"instanceGuid": id, "comment": "All retry attempts exhausted - manual intervention required"})).await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["isSuccessful"], true);
    assert_eq!(v["data"]["skippedTask"]["taskId"], "charge");
    s.until(&id, &["completed"]).await;
    let (_, st) = cmd(
        &s,
        "/api/core/cmd",
        "GetProcessStateCommand",
        json!({"instanceGuid": id}),
    )
    .await;
    assert_eq!(st["data"]["status"], "completed");
    assert_eq!(
        st["data"]["state"]["completedTasks"],
        json!(["validate", "notify"])
    );
    let (code, v) = cmd(
        &s,
        "/api/core/cmd",
        "SkipFailedTaskCommand",
        json!({"instanceGuid": id}),
    )
    .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(
        v["message"],
        "Process instance is not in error state. Current state: completed"
    );

    let w = s.trigger("approval", json!({})).await;
    s.until(&w, &["needs_input"]).await;
    let (code, v) = cmd(
        &s,
        "/api/core/cmd",
        "CancelProcessInstanceCommand",
        json!({"instanceGuid": w, "comment": "customer withdrew"}),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["message"], "Process instance cancelled.");
    assert_eq!(v["data"]["status"], "cancelled");
    let (code, v) = cmd(
        &s,
        "/api/core/cmd",
        "CancelProcessInstanceCommand",
        json!({"instanceGuid": w}),
    )
    .await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert_eq!(
        v["message"],
        "Process instance cannot be cancelled. Current state: cancelled"
    );

    for guid in ["invalid-guid", "0190c3e0-0000-7000-8000-000000000000"] {
        let (code, v) = cmd(
            &s,
            "/api/core/cmd",
            "RetryFailedTaskCommand",
            json!({"instanceGuid": guid}),
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(
            v,
            json!({
                "isSuccessful": false,
                "message": format!("Process instance '{guid}' not found."),
                "statusCode": "99",
                "data": null
            })
        );
    }
    let (code, v) = cmd(&s, "/api/core/cmd", "DeleteEverythingCommand", json!({})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(v["data"]["field"], "cmd");
    let (code, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"comment": "x"}),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["data"]["field"], "data.instanceGuid");
    let (code, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"instanceGuid": 5}),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["data"]["field"], "data.instanceGuid");
    let (code, v) = cmd(
        &s,
        "/api/core/cmd",
        "RetryFailedTaskCommand",
        json!({"instanceGuid": id, "updatedVariables": 3}),
    )
    .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["data"]["field"], "data.updatedVariables");
    let (code, v) = s.post("/api/core/cmd", json!({"data": {}})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["data"]["field"], "cmd");
    let res = s
        .http
        .post(s.url("/api/core/cmd"))
        .bearer_auth(&s.a)
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["isSuccessful"], false);
    let (code, v) = s
        .call(
            Method::POST,
            "/api/bpm/cmd",
            None,
            Some(json!({"cmd": "GetProcessStateCommand", "data": {"instanceGuid": id}})),
        )
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(v["statusCode"], "99");
    s.stop().await;
}

/// Keeps every span it is given (no collector needed).
#[derive(Clone, Debug, Default)]
struct Keep(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

impl opentelemetry_sdk::trace::SpanExporter for Keep {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch);
        std::future::ready(Ok(()))
    }
}

/// A command given with a `traceparent` is a span in the caller's trace
/// (who and the comment as attributes), linked to the run's trace; an
/// invalid one is ignored (the span is then in the run's trace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_with_a_traceparent_is_a_span_in_the_callers_trace() {
    use opentelemetry::trace::TraceId;
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let kept = Keep::default();
    s.docket
        .set_telemetry(docket::Telemetry::with_exporter(kept.clone(), None))
        .unwrap();
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut run_traces = Vec::new();
    for (path, traceparent) in [
        (
            "/api/core/cmd",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        ),
        ("/api/bpm/cmd", "00-not-valid-01".to_string()),
    ] {
        let id = s.trigger("noop", json!(1)).await;
        let run: docket::RunId = id.parse().unwrap();
        run_traces.push(s.docket.get_run(run).await.unwrap().trace.unwrap());
        let res = s
            .http
            .post(s.url(path))
            .bearer_auth(&s.a)
            .header("traceparent", traceparent)
            .header("tracestate", "vendor=abc")
            .json(&json!({
                "cmd": "CancelProcessInstanceCommand",
                "data": {"instanceGuid": id, "comment": "duplicate order"},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
    let t = s.docket.telemetry().unwrap().clone();
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .unwrap()
        .unwrap();
    let spans = kept.0.lock().unwrap().clone();
    let ops: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "docket operator cancel")
        .collect();
    assert_eq!(
        ops.len(),
        2,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let attr = |s: &opentelemetry_sdk::trace::SpanData, k: &str| {
        s.attributes
            .iter()
            .find(|a| a.key.as_str() == k)
            .map(|a| a.value.to_string())
    };
    let trace_of = |tp: &str| TraceId::from_hex(tp.split('-').nth(1).unwrap()).unwrap();
    // With the caller's context: its child, linked to the run's trace.
    let given = ops
        .iter()
        .find(|o| o.span_context.trace_id() == trace_of(&format!("00-{caller_trace}-")))
        .expect("the command's span is in the caller's trace");
    assert_eq!(given.parent_span_id.to_string(), "00f067aa0ba902b7");
    assert_eq!(
        attr(given, "docket.operator.actor").as_deref(),
        Some("alice")
    );
    assert_eq!(
        attr(given, "docket.operator.comment").as_deref(),
        Some("duplicate order")
    );
    assert_eq!(given.links.len(), 1);
    assert_eq!(
        given.links[0].span_context.trace_id(),
        trace_of(&run_traces[0].traceparent)
    );
    // An invalid one: ignored, the span is in the run's trace, unlinked.
    let other = ops.iter().find(|o| !std::ptr::eq(**o, *given)).unwrap();
    assert_eq!(
        other.span_context.trace_id(),
        trace_of(&run_traces[1].traceparent)
    );
    assert!(other.links.is_empty());
    s.stop().await;
}
