//! A token reaches only its tenant: every endpoint, with another tenant's
//! run id, answers as if the run did not exist, and changes nothing.

use crate::common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn another_tenants_run_is_404_on_every_endpoint() {
    let s = TestServer::start().await;
    let failed = s.trigger("flaky", json!({"failures": 9})).await;
    s.until(&failed, &["failed"]).await;
    let waiting = s.trigger("approval", json!({})).await;
    s.until(&waiting, &["needs_input"]).await;
    let b = s.b.clone();
    let as_b = |m: Method, p: String, body: Option<serde_json::Value>| {
        let s = &s;
        let b = b.clone();
        async move { s.call(m, &p, Some(&b), body).await }
    };
    for (m, path, id) in [
        (Method::GET, "", &failed),
        (Method::GET, "/wait?timeout=10ms", &failed),
        (Method::POST, "/retry", &failed),
        (Method::POST, "/skip", &failed),
        (Method::POST, "/retrigger", &failed),
        (Method::POST, "/cancel", &waiting),
        (Method::POST, "/approve", &waiting),
        (Method::POST, "/reject", &waiting),
    ] {
        let (st, v) = as_b(m.clone(), format!("/api/runs/{id}{path}"), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{m} {path}: {v}");
        assert_eq!(v["error"]["message"], format!("run {id} not found"));
    }
    let (st, _) = as_b(
        Method::POST,
        format!("/api/runs/{waiting}/postpone"),
        Some(json!({"delay_ms": 10})),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Unknown ids answer the same way: nothing distinguishes "exists elsewhere".
    let (_, unknown) = as_b(
        Method::GET,
        format!("/api/runs/{}", docket::RunId::new()),
        None,
    )
    .await;
    assert_eq!(unknown["error"]["code"], "not_found");
    // The seed's commands.
    for cmd in [
        "RetryFailedTaskCommand",
        "SkipFailedTaskCommand",
        "CancelProcessInstanceCommand",
        "GetProcessStateCommand",
    ] {
        for path in ["/api/core/cmd", "/api/bpm/cmd"] {
            let (st, v) = as_b(
                Method::POST,
                path.into(),
                Some(json!({"cmd": cmd, "data": {"instanceGuid": failed}})),
            )
            .await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{cmd}");
            assert_eq!(
                v["message"],
                format!("Process instance '{failed}' not found.")
            );
            assert_eq!(v["statusCode"], "99");
        }
    }
    // Lists, jobs, metrics and events show nothing of acme.
    let (_, v) = as_b(Method::GET, "/api/runs".into(), None).await;
    assert_eq!(v["runs"].as_array().unwrap().len(), 0);
    let (_, v) = as_b(Method::GET, "/api/runs?needs_attention=true".into(), None).await;
    assert_eq!(v["runs"].as_array().unwrap().len(), 0);
    let (_, v) = as_b(Method::GET, "/api/jobs".into(), None).await;
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(j["runs"], json!({}), "{j}");
    }
    let res = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    let text = res.text().await.unwrap();
    assert!(!text.contains("acme"), "{text}");
    let res = s
        .http
        .get(s.url(&format!("/api/events?run_id={failed}")))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // A replay of every stored event for globex holds none of acme's.
    let mut res = s
        .http
        .get(s.url("/api/events?last_event_id=0"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let got = tokio::time::timeout(std::time::Duration::from_millis(300), res.chunk()).await;
    if let Ok(Ok(Some(chunk))) = got {
        let text = String::from_utf8_lossy(&chunk);
        assert!(!text.contains("data:"), "globex received an event: {text}");
    }
    // Nothing changed for acme.
    let (_, v) = s.get(&format!("/api/runs/{failed}")).await;
    assert_eq!(v["run"]["status"], "failed");
    assert!(v["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] != "bob"));
    let (_, v) = s.get(&format!("/api/runs/{waiting}")).await;
    assert_eq!(v["run"]["status"], "needs_input");
    // And globex's own run is invisible to acme.
    let (st, v) = as_b(
        Method::POST,
        "/api/runs".into(),
        Some(json!({"job": "noop"})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let theirs = v["run"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["run"]["tenant"], "globex");
    let (st, _) = s.get(&format!("/api/runs/{theirs}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = as_b(
        Method::POST,
        "/api/runs/batch".into(),
        Some(json!({"runs": [{"job": "noop"}]})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(v["runs"][0]["run"]["tenant"], "globex");
    let (_, v) = s.get("/api/runs").await;
    assert!(v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["tenant"] == "acme"));
    // The same idempotency key in two tenants makes two runs.
    let body = json!({"job": "noop", "idempotency_key": "same"});
    let (st1, v1) = s.post("/api/runs", body.clone()).await;
    let (st2, v2) = as_b(Method::POST, "/api/runs".into(), Some(body)).await;
    assert_eq!((st1, st2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_ne!(v1["run"]["id"], v2["run"]["id"]);
    s.stop().await;
}
