//! Pausing and resuming jobs, deleting a final run: over HTTP, per tenant,
//! audited, shown in `/api/jobs` and `/metrics`.

use crate::common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

async fn events(s: &TestServer) -> Vec<docket::EventRecord> {
    s.docket
        .store()
        .events(docket::EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_paused_job_queues_until_resumed_for_its_tenant_only() {
    let s = TestServer::start().await;
    let (st, v) = s
        .post("/api/jobs/noop/pause", json!({ "comment": "incident 12" }))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({ "tenant": "acme", "job": "noop", "paused": true, "changed": true })
    );
    let (_, v) = s.post("/api/jobs/noop/pause", json!({})).await;
    assert_eq!(v["changed"], false, "already paused");
    // acme's run is triggered first; globex's, triggered after it, runs to
    // the end while acme's stays queued (the claim takes the oldest first).
    let queued = s.trigger("noop", json!(1)).await;
    let (st, v) = s
        .call(
            Method::POST,
            "/api/runs",
            Some(&s.b.clone()),
            Some(json!({ "job": "noop", "input": 2 })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let other = v["run"]["id"].as_str().unwrap().to_string();
    let (_, v) = s
        .call(
            Method::GET,
            &format!("/api/runs/{other}/wait?timeout=10s"),
            Some(&s.b.clone()),
            None,
        )
        .await;
    assert_eq!(v["run"]["status"], "completed", "{v}");
    let (_, v) = s.get(&format!("/api/runs/{queued}")).await;
    assert_eq!(v["run"]["status"], "pending");
    // Shown in /api/jobs and /metrics, per tenant.
    let (_, jobs) = s.get("/api/jobs").await;
    let noop = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "noop")
        .unwrap()
        .clone();
    assert_eq!(noop["paused"], true);
    // Queue health: the paused job's run is due and waits.
    assert_eq!(noop["queue"]["due"], 1, "{noop}");
    assert_eq!(noop["queue"]["running"], 0);
    assert!(noop["queue"]["lag_seconds"].as_f64().unwrap() >= 0.0);
    // Paused is not held by a limit nor deferred (store conformance
    // `queue_health_counts_held_and_deferred` counts those).
    assert_eq!(
        (
            noop["queue"]["held"].clone(),
            noop["queue"]["deferred"].clone()
        ),
        (json!(0), json!(0))
    );
    let (_, jobs) = s
        .call(Method::GET, "/api/jobs", Some(&s.b.clone()), None)
        .await;
    assert!(jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["paused"] == false));
    let res = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(&s.a)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        res.contains("docket_job_paused{tenant=\"acme\",job=\"noop\"} 1"),
        "{res}"
    );
    assert!(
        res.contains("docket_job_paused{tenant=\"acme\",job=\"flaky\"} 0"),
        "{res}"
    );
    assert!(
        res.contains("docket_queue_due{tenant=\"acme\",job=\"noop\"} 1"),
        "{res}"
    );
    assert!(
        res.contains("docket_queue_due{tenant=\"acme\",job=\"flaky\"} 0"),
        "{res}"
    );
    assert!(
        res.contains("docket_queue_lag_seconds{tenant=\"acme\",job=\"noop\"}"),
        "{res}"
    );
    for gauge in ["docket_queue_held", "docket_queue_deferred"] {
        assert!(
            res.contains(&format!("{gauge}{{tenant=\"acme\",job=\"noop\"}} 0")),
            "{res}"
        );
    }
    // Resume: the queued run runs.
    let (st, v) = s.post("/api/jobs/noop/resume", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (v["paused"].clone(), v["changed"].clone()),
        (json!(false), json!(true))
    );
    s.until(&queued, &["completed"]).await;
    let (_, jobs) = s.get("/api/jobs").await;
    let noop = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "noop")
        .unwrap()
        .clone();
    assert_eq!(noop["queue"]["due"], 0, "{noop}");
    assert_eq!(noop["queue"]["completed_5m"], 1, "{noop}");
    // `*`: every job of the tenant.
    let (_, v) = s.post("/api/jobs/*/pause", json!({})).await;
    assert_eq!(v["job"], "*");
    let (_, jobs) = s.get("/api/jobs").await;
    assert!(jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["paused"] == true));
    s.post("/api/jobs/*/resume", json!({})).await;
    // Audited with the token's name and the comment.
    let paused: Vec<_> = events(&s)
        .await
        .into_iter()
        .filter(|e| e.kind == "job_paused")
        .collect();
    assert_eq!(paused.len(), 2, "{paused:?}");
    assert_eq!(paused[0].tenant, "acme");
    assert_eq!(paused[0].actor.as_deref(), Some("alice"));
    assert_eq!(paused[0].comment.as_deref(), Some("incident 12"));
    // Bad input: an unknown job, an unknown field.
    let (st, v) = s.post("/api/jobs/nope/pause", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "unknown_job");
    let (st, _) = s.post("/api/jobs/noop/pause", json!({ "colour": 1 })).await;
    assert!(st.is_client_error());
    s.stop().await;
}

#[tokio::test]
async fn only_a_final_run_is_deleted_and_the_deletion_is_audited() {
    let s = TestServer::start().await;
    let done = s.trigger("noop", json!(1)).await;
    s.until(&done, &["completed"]).await;
    let (st, v) = s
        .post(
            &format!("/api/runs/{done}/delete"),
            json!({ "comment": "GDPR request 7" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "completed");
    let (st, _) = s.get(&format!("/api/runs/{done}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let del: Vec<_> = events(&s)
        .await
        .into_iter()
        .filter(|e| e.kind == "run_deleted")
        .collect();
    assert_eq!(del.len(), 1, "{del:?}");
    assert_eq!(del[0].run_id.to_string(), done);
    assert_eq!(del[0].actor.as_deref(), Some("alice"));
    assert_eq!(del[0].comment.as_deref(), Some("GDPR request 7"));
    // A run that is not final: 409 naming its state.
    let (st, _) = s.post("/api/jobs/noop/pause", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let pending = s.trigger("noop", json!(2)).await;
    let (st, v) = s
        .post(&format!("/api/runs/{pending}/delete"), json!({}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(v["error"]["current_status"], "pending");
    // Another tenant's run: 404, untouched.
    let (st, _) = s
        .call(
            Method::POST,
            &format!("/api/runs/{pending}/delete"),
            Some(&s.b.clone()),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn bulk_retry_by_filter_counts_first_then_acts_page_by_page() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(s.trigger("flaky", json!({ "failures": 1 })).await);
    }
    for id in &ids {
        s.until(id, &["failed"]).await;
    }
    let body = |extra: serde_json::Value| {
        let mut b = json!({
            "action": "retry",
            "filter": { "job": "flaky", "status": ["failed"] },
            "comment": "vendor fixed",
            "limit": 2,
        });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (st, v) = s
        .post("/api/runs/bulk", body(json!({ "dry_run": true })))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["matched"], 5);
    assert_eq!(v["results"], json!([]));
    let mut cursor = serde_json::Value::Null;
    let mut handled = 0;
    loop {
        let (st, v) = s
            .post("/api/runs/bulk", body(json!({ "cursor": cursor })))
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["failed"], 0, "{v}");
        handled += v["results"].as_array().unwrap().len();
        cursor = v["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(handled, 5);
    for id in &ids {
        s.until(id, &["completed"]).await;
    }
    // Per-run refusals: a completed run (wrong state), another tenant's
    // run (not found) — the call itself succeeds.
    let (st, v) = s
        .call(
            Method::POST,
            "/api/runs",
            Some(&s.b.clone()),
            Some(json!({ "job": "noop", "input": 1 })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let foreign = v["run"]["id"].as_str().unwrap().to_string();
    let (st, v) = s
        .post(
            "/api/runs/bulk",
            json!({ "action": "retry", "ids": [ids[0], foreign] }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["results"][0]["error"], "wrong_state");
    assert_eq!(v["results"][0]["status"], "completed");
    assert_eq!(v["results"][1]["error"], "not_found");
    assert_eq!(
        (v["succeeded"].clone(), v["failed"].clone()),
        (json!(0), json!(2))
    );
    // Bad input: named.
    for (b, field) in [
        (json!({ "action": "retry" }), "ids"),
        (
            json!({ "action": "retry", "filter": { "job": "flaky" } }),
            "filter.status",
        ),
        (json!({ "action": "explode", "ids": [ids[0]] }), "action"),
        (json!({ "action": "retry", "ids": ["nope"] }), "ids[0]"),
        (json!({ "action": "postpone", "ids": [ids[0]] }), "until"),
        (
            json!({ "action": "retry", "ids": [ids[0]], "limit": 0 }),
            "limit",
        ),
    ] {
        let (st, v) = s.post("/api/runs/bulk", b.clone()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{b}: {v}");
        assert_eq!(v["error"]["field"], field, "{b}: {v}");
    }
    s.stop().await;
}
