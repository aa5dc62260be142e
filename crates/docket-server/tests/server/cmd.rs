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
