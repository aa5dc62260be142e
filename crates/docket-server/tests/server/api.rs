//! The REST API: every endpoint and its error paths.

use crate::common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn trigger_201_then_existing_200_and_show() {
    let s = TestServer::start().await;
    let body = json!({ "job": "noop", "input": {"x": 1}, "idempotency_key": "k1", "correlation_id": "c1", "priority": 3 });
    let (st, v) = s.post("/api/runs", body.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["existing"], false);
    assert_eq!(v["run"]["tenant"], "acme");
    assert_eq!(v["run"]["priority"], 3);
    let id = v["run"]["id"].as_str().unwrap().to_string();
    let (st, v2) = s.post("/api/runs", body).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v2["existing"], true);
    assert_eq!(v2["run"]["id"], id.as_str());
    let done = s.until(&id, &["completed"]).await;
    assert_eq!(done["output"], json!({"x": 1}));
    let (st, d) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
    let kinds: Vec<&str> = d["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["run_triggered", "attempt_started", "run_completed"]);
    assert_eq!(d["events"][0]["actor"], "alice");
    assert!(d["timeline"][0]["summary"]
        .as_str()
        .unwrap()
        .contains("alice"));
    s.stop().await;
}

#[tokio::test]
async fn batch_is_all_or_nothing_and_names_the_bad_item() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({ "runs": [ {"job": "noop", "input": 1}, {"job": "nope"} ] }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "unknown_job");
    assert_eq!(v["error"]["field"], "runs[1].job");
    let (_, page) = s.get("/api/runs").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 0, "nothing written");
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({ "runs": [ {"job": "noop", "input": 1, "idempotency_key": "a"}, {"job": "noop", "input": 2} ] }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({ "runs": [ {"job": "noop", "input": 1, "idempotency_key": "a"} ] }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["runs"][0]["existing"], true);
    let (st, v) = s.post("/api/runs/batch", json!({ "runs": [] })).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "runs");
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({ "runs": [ {"job": "noop", "priority": "high"} ] }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "runs[0].priority");
    s.stop().await;
}

#[tokio::test]
async fn bad_input_is_400_or_422_naming_the_field_and_writes_nothing() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let raw = |body: &'static str| {
        let s = &s;
        async move {
            let res = s
                .http
                .post(s.url("/api/runs"))
                .bearer_auth(&s.a)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = res.status();
            (st, res.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = raw("{\"job\": ").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "invalid_json");
    let (st, v) = raw("").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = raw("{\"input\": 1}").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "job");
    let (st, v) = raw("{\"job\": 7}").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "job");
    let (st, v) = raw("{\"job\": \"noop\", \"surprise\": 1}").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "surprise");
    let (st, v) = raw("{\"job\": \"nope\"}").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["code"], "unknown_job");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    let (st, v) = raw("{\"job\": \"noop\", \"run_after\": \"tomorrow\"}").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "run_after");
    let (st, v) = raw("[1,2]").await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, page) = s.get("/api/runs").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 0, "nothing written");
    s.stop().await;
}

#[tokio::test]
async fn oversized_body_and_input_are_413_content_too_large() {
    let mut o = Opts {
        worker: false,
        ..Opts::default()
    };
    o.config.max_body_bytes = 64 * 1024;
    o.config.max_input_bytes = 16 * 1024;
    let s = TestServer::start_with(o).await;
    let big = "x".repeat(100 * 1024);
    let (st, v) = s
        .post("/api/runs", json!({ "job": "noop", "input": big }))
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "content_too_large");
    let mid = "x".repeat(20 * 1024);
    let (st, v) = s
        .post("/api/runs", json!({ "job": "noop", "input": mid }))
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "content_too_large");
    assert_eq!(v["error"]["field"], "input");
    let (st, v) = s
        .post(
            "/api/core/cmd",
            json!({ "cmd": "GetProcessStateCommand", "data": { "pad": big } }),
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["isSuccessful"], false);
    let (_, page) = s.get("/api/runs").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 0, "nothing written");
    s.stop().await;
}

#[tokio::test]
async fn list_filters_and_cursor_pagination() {
    let s = TestServer::start().await;
    let ok = s.trigger("noop", json!(1)).await;
    let failed = s.trigger("flaky", json!({"failures": 9})).await;
    let waiting = s.trigger("approval", json!({})).await;
    s.until(&ok, &["completed"]).await;
    s.until(&failed, &["failed"]).await;
    s.until(&waiting, &["needs_input"]).await;
    let ids = |v: &Value| -> Vec<String> {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, v) = s.get("/api/runs?needs_attention=true").await;
    assert_eq!(ids(&v), [waiting.clone(), failed.clone()]);
    let (_, v) = s.get("/api/runs?status=completed&status=failed").await;
    assert_eq!(ids(&v), [failed.clone(), ok.clone()]);
    let (_, v) = s.get("/api/runs?status=completed,needs_input").await;
    assert_eq!(ids(&v), [waiting.clone(), ok.clone()]);
    let (_, v) = s
        .get("/api/runs?needs_attention=true&status=completed")
        .await;
    assert_eq!(ids(&v).len(), 0);
    let (_, v) = s.get("/api/runs?job=flaky").await;
    assert_eq!(ids(&v), std::slice::from_ref(&failed));
    let (_, v) = s
        .get("/api/runs?created_after=2000-01-01T00:00:00Z&created_before=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(ids(&v).len(), 3);
    let (_, v) = s.get("/api/runs?created_before=2000-01-01T00:00:00Z").await;
    assert_eq!(ids(&v).len(), 0);
    // Pages of 2 then 1.
    let (_, p1) = s.get("/api/runs?limit=2").await;
    assert_eq!(ids(&p1), [waiting.clone(), failed.clone()]);
    let cursor = p1["next_cursor"].as_str().unwrap().to_string();
    let (_, p2) = s.get(&format!("/api/runs?limit=2&cursor={cursor}")).await;
    assert_eq!(ids(&p2), std::slice::from_ref(&ok));
    assert!(p2["next_cursor"].is_null());
    for (q, field) in [
        ("status=exploded", "status"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("cursor=zzz", "cursor"),
        ("created_after=yesterday", "created_after"),
        ("needs_attention=maybe", "needs_attention"),
        ("colour=blue", "colour"),
    ] {
        let (st, v) = s.get(&format!("/api/runs?{q}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"]["field"], field, "{q}");
    }
    s.stop().await;
}

#[tokio::test]
async fn operator_commands_and_wrong_state_409() {
    let s = TestServer::start().await;
    // retry with variables and comment, recorded with the token's name.
    let id = s.trigger("flaky", json!({"failures": 1})).await;
    s.until(&id, &["failed"]).await;
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/retry"),
            json!({"updated_variables": {"timeout": 30000}, "comment": "bigger timeout"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let done = s.until(&id, &["completed"]).await;
    assert_eq!(done["variables"]["timeout"], 30000);
    assert_eq!(done["output"]["variables"]["timeout"], 30000);
    let (_, d) = s.get(&format!("/api/runs/{id}")).await;
    let op = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "operator_retry")
        .unwrap()
        .clone();
    assert_eq!(op["actor"], "alice");
    assert_eq!(op["comment"], "bigger timeout");
    let line = d["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "operator_retry")
        .unwrap()["summary"]
        .clone();
    assert_eq!(
        line,
        "retried by alice with variables {\"timeout\":30000}, fresh attempt budget: “bigger timeout”"
    );
    // The attempts show the gap and outcome of each.
    assert_eq!(d["attempts"][0]["outcome"], "failed");
    assert!(d["attempts"][1]["gap_ms"].as_i64().unwrap() >= 0);
    // Retrying a completed run: 409 naming the state, and nothing written.
    let events_before = d["events"].as_array().unwrap().len();
    let (st, v) = s.post(&format!("/api/runs/{id}/retry"), json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(v["error"]["code"], "wrong_state");
    assert_eq!(v["error"]["current_status"], "completed");
    assert_eq!(
        v["error"]["message"],
        format!("run {id} is completed: cannot retry a run that is completed")
    );
    for cmd in ["skip", "approve", "reject", "cancel"] {
        let (st, v) = s.post(&format!("/api/runs/{id}/{cmd}"), json!({})).await;
        assert_eq!(st, StatusCode::CONFLICT, "{cmd}: {v}");
        assert_eq!(v["error"]["current_status"], "completed");
    }
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/postpone"),
            json!({"delay_ms": 1000}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let (_, after) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(
        after["events"].as_array().unwrap().len(),
        events_before,
        "refused commands write nothing"
    );
    assert_eq!(after["run"]["status"], "completed");
    // retrigger: a new run linked to the original.
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/retrigger"),
            json!({"comment": "again"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["run"]["retriggered_from"], id.as_str());
    // updated_variables must be an object.
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/retry"),
            json!({"updated_variables": [1]}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "updated_variables");
    s.stop().await;
}

#[tokio::test]
async fn skip_approve_reject_postpone_cancel() {
    let s = TestServer::start().await;
    let id = s.trigger("stepper", json!({"failures": 5})).await;
    s.until(&id, &["failed"]).await;
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/skip"),
            json!({"comment": "charged by hand"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let done = s.until(&id, &["completed"]).await;
    assert_eq!(done["output"]["charged"], Value::Null);
    let (_, d) = s.get(&format!("/api/runs/{id}")).await;
    let names: Vec<&str> = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"skipped"), "{names:?}");

    let a = s.trigger("approval", json!({})).await;
    s.until(&a, &["needs_input"]).await;
    let (st, _) = s
        .post(
            &format!("/api/runs/{a}/approve"),
            json!({"data": {"ok": true}, "comment": "fine"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let done = s.until(&a, &["completed"]).await;
    assert!(done["output"]["decision"]
        .as_str()
        .unwrap()
        .starts_with("Approved"));
    let r = s.trigger("approval", json!({})).await;
    s.until(&r, &["needs_input"]).await;
    let (st, _) = s
        .call(
            Method::POST,
            &format!("/api/runs/{r}/reject"),
            Some(&s.a.clone()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let done = s.until(&r, &["completed"]).await;
    assert!(done["output"]["decision"]
        .as_str()
        .unwrap()
        .starts_with("Rejected"));

    // postpone far away, then the long poll times out, then cancel.
    let p = s.trigger("noop", json!(null)).await;
    let (st, v) = s
        .post(
            &format!("/api/runs/{p}/postpone"),
            json!({"until": "2999-01-01T00:00:00Z", "comment": "later"}),
        )
        .await;
    // The worker may have run it already.
    if st == StatusCode::OK {
        assert_eq!(v["status"], "postponed");
        let (st, w) = s.get(&format!("/api/runs/{p}/wait?timeout=100ms")).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(w["terminal"], false);
        let (st, v) = s
            .post(
                &format!("/api/runs/{p}/cancel"),
                json!({"comment": "no longer needed"}),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["status"], "cancelled");
        let (_, w) = s.get(&format!("/api/runs/{p}/wait")).await;
        assert_eq!(w["terminal"], true);
    } else {
        assert_eq!(st, StatusCode::CONFLICT);
    }
    let (st, v) = s.post(&format!("/api/runs/{p}/postpone"), json!({})).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (st, v) = s
        .post(&format!("/api/runs/{p}/postpone"), json!({"until": "soon"}))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "until");
    let (st, v) = s
        .post(
            &format!("/api/runs/{p}/postpone"),
            json!({"until": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is in the past"),
        "{v}"
    );

    // Cancel while running: stops at the next step boundary.
    let c = s.trigger("sleepy", json!({"ms": 300})).await;
    s.until(&c, &["running"]).await;
    let (st, v) = s.post(&format!("/api/runs/{c}/cancel"), json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (_, w) = s.get(&format!("/api/runs/{c}/wait?timeout=10s")).await;
    assert_eq!(w["run"]["status"], "cancelled");
    s.stop().await;
}

#[tokio::test]
async fn wait_jobs_health_metrics_openapi_and_unknown_routes() {
    let s = TestServer::start().await;
    let id = s.trigger("unavailable", json!({"failures": 1})).await;
    let (st, w) = s.get(&format!("/api/runs/{id}/wait?timeout=10s")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(w["terminal"], true);
    assert_eq!(w["run"]["status"], "completed");
    let (st, v) = s.get(&format!("/api/runs/{id}/wait?timeout=forever")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["field"], "timeout");
    let (st, _) = s.get(&format!("/api/runs/{id}/wait?timeout=301s")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // until=needs_input answers as soon as a person is needed.
    let gate = s.trigger("approval", json!({})).await;
    let (st, w) = s
        .get(&format!(
            "/api/runs/{gate}/wait?timeout=20s&until=needs_input"
        ))
        .await;
    assert_eq!(st, StatusCode::OK, "{w}");
    assert_eq!(
        (w["terminal"].clone(), w["run"]["status"].clone()),
        (json!(false), json!("needs_input"))
    );
    let (st, v) = s.get(&format!("/api/runs/{gate}/wait?until=later")).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["field"], "until");

    let (st, v) = s.get("/api/jobs").await;
    assert_eq!(st, StatusCode::OK);
    let jobs = v["jobs"].as_array().unwrap();
    let u = jobs.iter().find(|j| j["name"] == "unavailable").unwrap();
    assert_eq!(u["runs"]["completed"], 1);

    let (st, v) = s.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["backend"], "sqlite");

    // Metrics: the hub has seen the attempts (wait for it, bounded).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let res = s
            .http
            .get(s.url("/metrics"))
            .bearer_auth(&s.a)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let text = res.text().await.unwrap();
        if text.contains("docket_runs_completed_total{tenant=\"acme\",job=\"unavailable\"} 1") {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        // A long poll on a finished run answers at once; this bounds the loop.
        s.get(&format!("/api/runs/{id}/wait?timeout=50ms")).await;
    };
    assert!(
        text.contains("docket_runs{tenant=\"acme\",job=\"unavailable\",status=\"completed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("docket_attempts_started_total{tenant=\"acme\",job=\"unavailable\"} 2"),
        "{text}"
    );
    assert!(text.contains("docket_attempt_failures_total{tenant=\"acme\",job=\"unavailable\",error_class=\"unavailable\"} 1"), "{text}");
    assert!(
        text.contains("docket_retries_scheduled_total{tenant=\"acme\",job=\"unavailable\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("docket_pickup_latency_seconds_count{tenant=\"acme\",job=\"unavailable\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(
            "docket_attempt_duration_seconds_count{tenant=\"acme\",job=\"unavailable\"} 2"
        ),
        "{text}"
    );
    let (st, _) = s.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    let (st, v) = s.get("/api/nothing-here").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "no_route");
    let (st, v) = s
        .call(Method::DELETE, "/api/runs", Some(&s.a.clone()), None)
        .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["error"]["code"], "method_not_allowed");
    let (st, v) = s.get("/api/runs/not-a-uuid").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "not_found");
    s.stop().await;
}

/// Every route the issue names is in the OpenAPI document, and every
/// documented operation is served (not the fallback 404/405).
#[tokio::test]
async fn openapi_has_every_route() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let (st, doc) = s.call(Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("post", "/api/runs"),
        ("get", "/api/runs"),
        ("post", "/api/runs/batch"),
        ("get", "/api/runs/{id}"),
        ("post", "/api/runs/{id}/cancel"),
        ("post", "/api/runs/{id}/retry"),
        ("post", "/api/runs/{id}/retrigger"),
        ("post", "/api/runs/{id}/skip"),
        ("post", "/api/runs/{id}/postpone"),
        ("post", "/api/runs/{id}/approve"),
        ("post", "/api/runs/{id}/reject"),
        ("get", "/api/runs/{id}/wait"),
        ("get", "/api/jobs"),
        ("get", "/api/events"),
        ("post", "/api/core/cmd"),
        ("post", "/api/bpm/cmd"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/api/openapi.json"),
        ("get", "/api/runs/{id}/forensics"),
        ("get", "/api/jobs/{job}/forensics"),
        ("get", "/api/connections"),
        ("get", "/api/connections/{name}"),
        ("post", "/api/connections/{name}/enable"),
        ("post", "/api/connections/{name}/disable"),
        ("post", "/api/connections/{name}/expire"),
        ("get", "/api/breakers"),
        // The worker protocol (docs/WORKER_PROTOCOL.md).
        ("post", "/api/worker/v1/claim"),
        ("post", "/api/worker/v1/heartbeat"),
        ("post", "/api/worker/v1/runs/{id}/end"),
        ("post", "/api/worker/v1/runs/{id}/steps/get"),
        ("post", "/api/worker/v1/runs/{id}/steps/complete"),
        ("post", "/api/worker/v1/runs/{id}/steps/fail"),
        ("post", "/api/worker/v1/runs/{id}/actions/begin"),
        ("post", "/api/worker/v1/runs/{id}/actions/commit"),
        ("post", "/api/worker/v1/runs/{id}/actions/fail"),
        ("post", "/api/worker/v1/runs/{id}/actions/reconciled"),
        ("post", "/api/worker/v1/runs/{id}/progress"),
        ("post", "/api/worker/v1/runs/{id}/log"),
        ("get", "/api/workers"),
        ("get", "/api/limits"),
        ("get", "/api/schedules"),
        ("post", "/api/schedules"),
        ("get", "/api/schedules/{name}"),
        ("delete", "/api/schedules/{name}"),
        ("post", "/api/schedules/{name}/pause"),
        ("post", "/api/schedules/{name}/resume"),
        ("post", "/api/schedules/{name}/trigger"),
        ("post", "/api/schedules/{name}/backfill"),
        ("post", "/api/jobs/{job}/pause"),
        ("post", "/api/jobs/{job}/resume"),
        ("post", "/api/runs/{id}/delete"),
        ("post", "/api/runs/bulk"),
        ("post", "/api/runs/{id}/signals/{name}"),
        ("get", "/api/runs/{id}/signals"),
        ("post", "/api/signals"),
        ("get", "/api/connections/{name}/limits"),
    ];
    for (m, p) in expected {
        assert!(
            paths.get(p).and_then(|x| x.get(m)).is_some(),
            "{m} {p} missing from the OpenAPI document"
        );
    }
    // Operation ids are unique (OpenAPI requires it; client generators
    // such as the TypeScript package's openapi-typescript refuse duplicates).
    let mut ids = std::collections::BTreeMap::new();
    for (p, ops) in paths {
        for (m, op) in ops.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            if let Some(other) = ids.insert(id.clone(), format!("{m} {p}")) {
                panic!("operationId `{id}` of {m} {p} is also {other}'s");
            }
        }
    }
    let mut n = 0;
    for (p, ops) in paths {
        for m in ops.as_object().unwrap().keys() {
            n += 1;
            let path = p
                .replace("{id}", "0190c3e0-0000-7000-8000-000000000000")
                .replace("{job}", "noop")
                .replace("{name}", "crm");
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            if path == "/api/events" {
                let res = s
                    .http
                    .get(s.url(&path))
                    .bearer_auth(&s.a)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                continue;
            }
            let (st, v) = s
                .call(method.clone(), &path, Some(&s.a.clone()), Some(json!({})))
                .await;
            assert_ne!(
                v.get("error").and_then(|e| e.get("code")),
                Some(&json!("no_route")),
                "{m} {p}"
            );
            assert_ne!(st, StatusCode::METHOD_NOT_ALLOWED, "{m} {p}");
            assert!(!st.is_server_error(), "{m} {p}: {st} {v}");
            // No client input produces a 5xx.
            let deep = "[".repeat(5000);
            let bodies = [
                "null",
                "[]",
                "\"x\"",
                "1e999",
                "{\"job\": null}",
                "{\"cmd\": 1, \"data\": []}",
                "\u{0}",
                &deep,
                "{\"runs\": [{}]}",
            ];
            for body in bodies {
                let res = s
                    .http
                    .request(
                        method.clone(),
                        s.url(&format!("{path}?timeout=1ms&limit=-1&status=%FF")),
                    )
                    .bearer_auth(&s.a)
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert!(
                    !res.status().is_server_error(),
                    "{m} {p} with {body:.20}: {}",
                    res.status()
                );
            }
        }
    }
    assert_eq!(
        n,
        expected.len(),
        "every operation in the document is expected"
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    s.stop().await;
}

#[tokio::test]
async fn auth_missing_wrong_revoked_and_tenant_header() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let (st, v) = s.call(Method::GET, "/api/runs", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (st, _) = s
        .call(Method::GET, "/api/runs", Some("dkt_0000"), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let res = s
        .http
        .get(s.url("/api/runs"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers().contains_key("www-authenticate"));
    // X-Tenant-ID must match the token's tenant.
    let res = s
        .http
        .get(s.url("/api/runs"))
        .bearer_auth(&s.a)
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = s
        .http
        .get(s.url("/api/runs"))
        .bearer_auth(&s.a)
        .header("x-tenant-id", "globex")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // A revoked token is refused at once.
    let t = docket_server::auth::issue_token("acme", "temp", s.docket.clock().now()).unwrap();
    let rec = s.docket.store().create_token(t.record).await.unwrap();
    let (st, _) = s
        .call(Method::GET, "/api/runs", Some(&t.secret), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    s.docket
        .store()
        .revoke_token(rec.id, s.docket.clock().now())
        .await
        .unwrap();
    let (st, v) = s
        .call(Method::GET, "/api/runs", Some(&t.secret), None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(v["error"]["message"].as_str().unwrap().contains("revoked"));
    s.stop().await;
}

#[tokio::test]
async fn insecure_dev_mode_uses_the_tenant_header_and_is_loopback_only() {
    let s = TestServer::start_with(no_auth()).await;
    let res = s
        .http
        .post(s.url("/api/runs"))
        .header("x-tenant-id", "dev")
        .json(&json!({"job": "noop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["run"]["tenant"], "dev");
    let (st, v) = s.call(Method::GET, "/api/runs", None, None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["runs"].as_array().unwrap().len(),
        0,
        "default tenant sees nothing of `dev`"
    );
    s.stop().await;

    let docket = docket::Docket::open("sqlite::memory:").await.unwrap();
    let cfg = docket_server::ServerConfig {
        auth: docket_server::AuthMode::InsecureNoAuth,
        ..Default::default()
    };
    let server = docket_server::Server::start(docket, cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = server.serve(listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

/// An empty idempotency key is refused, naming the field, and nothing is
/// written (it would make unrelated triggers one run).
#[tokio::test]
async fn an_empty_idempotency_key_is_refused() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let (st, v) = s
        .post(
            "/api/runs",
            json!({"job": "noop", "input": {}, "idempotency_key": " "}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "idempotency_key");
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({"runs": [{"job": "noop"}, {"job": "noop", "idempotency_key": ""}]}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "runs[1].idempotency_key");
    let (_, list) = s.get("/api/runs").await;
    assert_eq!(
        list["runs"].as_array().unwrap().len(),
        0,
        "nothing written: {list}"
    );
    let e = s
        .docket
        .trigger_with(
            "noop",
            json!({}),
            docket::TriggerOptions {
                idempotency_key: Some(String::new()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("idempotency key"), "{e}");
    s.stop().await;
}

/// `traceparent`/`tracestate` on a trigger (single and batch) put the run in
/// the caller's trace: the run view shows the trace id, the engine keeps
/// the context; an invalid header is ignored, not an error. With traces
/// off (no exporter here) `/metrics` has no trace series.
#[tokio::test]
async fn a_traceparent_header_puts_the_run_in_the_callers_trace() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let post = |path: &'static str, tp: String, body: Value| {
        s.http
            .post(s.url(path))
            .bearer_auth(&s.a)
            .header("traceparent", tp)
            .header("tracestate", "vendor=abc")
            .json(&body)
            .send()
    };
    let res = post(
        "/api/runs",
        parent.clone(),
        json!({ "job": "noop", "input": 1 }),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["run"]["trace_id"], trace_id);
    let id: docket::RunId = v["run"]["id"].as_str().unwrap().parse().unwrap();
    let stored = s.docket.get_run(id).await.unwrap().trace.unwrap();
    assert_eq!(stored.traceparent, parent);
    assert_eq!(stored.tracestate.as_deref(), Some("vendor=abc"));
    let (_, shown) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(shown["run"]["trace_id"], trace_id, "{shown}");

    let res = post(
        "/api/runs/batch",
        parent.clone(),
        json!({ "runs": [ {"job": "noop", "input": 1}, {"job": "noop", "input": 2} ] }),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let v: Value = res.json().await.unwrap();
    for r in v["runs"].as_array().unwrap() {
        assert_eq!(r["run"]["trace_id"], trace_id, "{r}");
    }

    let res = post(
        "/api/runs",
        "00-xyz-00f067aa0ba902b7-01".into(),
        json!({ "job": "noop", "input": 1 }),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "ignored, not refused");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["run"]["trace_id"], Value::Null);

    let (_, plain) = s
        .post("/api/runs", json!({ "job": "noop", "input": 1 }))
        .await;
    assert_eq!(plain["run"]["trace_id"], Value::Null);
    let metrics = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(&s.a)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("docket_trace_spans"), "{metrics}");
    s.stop().await;
}

/// With traces on, `/metrics` counts the spans exported and lost: here the
/// collector is down, so every span is lost and the run still completes.
#[tokio::test]
async fn metrics_count_the_spans_lost_to_a_collector_that_is_down() {
    let s = TestServer::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("http://{}/v1/traces", closed.local_addr().unwrap());
    drop(closed);
    s.docket
        .set_telemetry(
            docket::Telemetry::otlp(docket::TelemetryConfig {
                endpoint: Some(down),
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
    let id = s.trigger("noop", json!(1)).await;
    s.until(&id, &["completed"]).await;
    let t = s.docket.telemetry().unwrap().clone();
    let flushed = tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .unwrap();
    assert!(flushed.is_err(), "the collector is down");
    let metrics = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(&s.a)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("docket_trace_spans_dropped_total "))
        .expect("the dropped-spans series")
        .parse()
        .unwrap();
    assert!(dropped >= 2, "the trigger and the attempt: {dropped}");
    assert!(metrics.contains("docket_trace_spans_exported_total 0"));
    s.stop().await;
}
