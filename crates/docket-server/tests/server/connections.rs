//! Connections, circuit breakers and the job-wide forensic report through
//! the API and `/metrics`, with the HTTP jobs calling a real local service.

use crate::common::*;
use axum::http::StatusCode as AxumStatus;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A service that answers every request 503 and counts them.
async fn failing_service() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            (AxumStatus::SERVICE_UNAVAILABLE, "down for maintenance")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, hits)
}

fn config(base: &str) -> String {
    format!(
        r#"
[connections.crm]
base_url = "{base}"
breaker = {{ failures = 2, window_ms = 60000, open_ms = 600000 }}

[jobs.ping]
connection = "crm"
method = "POST"
path = "/emails"
idempotency_key = "{{{{ input.id }}}}/ping/v1"
timeout_ms = 2000
body = {{ id = "{{{{ input.id }}}}" }}

[jobs.ping.retry]
base_delay_ms = 50
max_delay_ms = 50
max_attempts = 3
jitter_ms = 0
"#
    )
}

fn metric_line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

async fn metrics(s: &TestServer, token: &str) -> String {
    let res = s
        .http
        .get(s.url("/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.text().await.unwrap()
}

#[tokio::test]
async fn breaker_state_shows_in_the_api_and_metrics_and_deferred_runs_send_nothing() {
    let (base, hits) = failing_service().await;
    let s = TestServer::start_with(Opts {
        http_toml: Some(config(&base)),
        ..Opts::default()
    })
    .await;

    let (st, v) = s.get("/api/connections").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let c = &v["connections"][0];
    assert_eq!(c["name"], "crm");
    assert_eq!(c["status"], "enabled");
    assert_eq!(c["jobs"], json!(["ping"]));
    assert_eq!(c["breaker"]["state"], "closed");
    assert_eq!(c["breaker"]["failures_to_open"], 2);

    // Two 503s of the first run open the breaker: once the second attempt's
    // end is stored (the engine announces it; no polling), it is open.
    let first = s.trigger("ping", json!({ "id": "p-1" })).await;
    s.docket
        .wait_until(first.parse().unwrap(), Duration::from_secs(15), |r| {
            r.attempt >= 2 && r.status != docket::RunStatus::Running
        })
        .await
        .unwrap();
    let (_, v) = s.get("/api/breakers").await;
    let b = v["breakers"][0].clone();
    assert_eq!(b["state"], "open", "{v}");
    assert_eq!(b["connection"], "crm");
    assert_eq!(b["times_opened"], 1);
    assert!(b["reset_at"].is_string(), "{b}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    let m = metrics(&s, &s.a).await;
    assert_eq!(
        metric_line(
            &m,
            "docket_circuit_breaker_state{connection=\"crm\",state=\"open\"}"
        ),
        Some("docket_circuit_breaker_state{connection=\"crm\",state=\"open\"} 1"),
        "{m}"
    );
    assert_eq!(
        metric_line(
            &m,
            "docket_circuit_breaker_state{connection=\"crm\",state=\"closed\"}"
        ),
        Some("docket_circuit_breaker_state{connection=\"crm\",state=\"closed\"} 0")
    );
    assert_eq!(
        metric_line(
            &m,
            "docket_circuit_breaker_opened_total{connection=\"crm\"}"
        ),
        Some("docket_circuit_breaker_opened_total{connection=\"crm\"} 1")
    );

    // The dashboard's overview lists it.
    let (st, stats) = s.get("/api/stats?window=1h").await;
    assert_eq!(st, StatusCode::OK, "{stats}");
    assert_eq!(stats["breakers"][0]["connection"], "crm", "{stats}");
    assert_eq!(stats["breakers"][0]["state"], "open");

    // While open, a second run is rescheduled (circuit_open): no request.
    let second = s.trigger("ping", json!({ "id": "p-2" })).await;
    // Its deferral is stored with one attempt forgiven.
    s.docket
        .wait_until(second.parse().unwrap(), Duration::from_secs(15), |r| {
            r.attempts_forgiven >= 1
        })
        .await
        .unwrap();
    let (_, v) = s.get("/api/breakers").await;
    assert_eq!(v["breakers"][0]["deferred"], 1, "{v}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "an open breaker sends nothing"
    );
    let (_, run) = s.get(&format!("/api/runs/{second}")).await;
    assert_eq!(run["run"]["status"], "pending", "{run}");
    let m = metrics(&s, &s.a).await;
    assert!(
        m.contains("docket_circuit_breaker_deferred_total{connection=\"crm\"} "),
        "{m}"
    );

    // The job-wide report: the first run's two 503s were a delayed retry.
    let (st, r) = s.get("/api/jobs/ping/forensics").await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["runs_examined"], 2, "{r}");
    assert_eq!(r["truncated"], false);
    assert_eq!(r["counts"], json!({ "delayed_retry": 1 }), "{r}");
    assert_eq!(r["same_action_same_error_within_backoff_window"], 0);
    assert_eq!(r["verdicts"][0]["first"]["run_id"], first);
    assert_eq!(r["verdicts"][0]["error_class"], "unavailable");

    // A run's report carries the fingerprints.
    let (st, f) = s.get(&format!("/api/runs/{first}/forensics")).await;
    assert_eq!(st, StatusCode::OK, "{f}");
    let a1 = &f["attempts"][0];
    assert_eq!(a1["fingerprint"]["idempotency_key"], "p-1/ping/v1", "{a1}");
    assert_eq!(a1["fingerprint"]["error_class"], "unavailable");
    assert!(
        a1["failure_key"].as_str().is_some_and(|k| k.len() == 16),
        "{a1}"
    );
    assert_eq!(
        f["attempts"][0]["failure_key"], f["attempts"][1]["failure_key"],
        "the same failure twice has one key"
    );
    s.stop().await;
}

#[tokio::test]
async fn connections_are_disabled_and_enabled_per_tenant_with_an_audit_trail() {
    let (base, _hits) = failing_service().await;
    let s = TestServer::start_with(Opts {
        worker: false,
        http_toml: Some(config(&base)),
        ..Opts::default()
    })
    .await;

    let (st, v) = s
        .post(
            "/api/connections/crm/disable",
            json!({ "comment": "rotating the CRM key" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "disabled");
    assert_eq!(v["changed_by"], "alice");
    assert_eq!(v["comment"], "rotating the CRM key");

    // The other tenant's connection is untouched.
    let (_, other) = s
        .call(Method::GET, "/api/connections", Some(&s.b.clone()), None)
        .await;
    assert_eq!(other["connections"][0]["status"], "enabled", "{other}");

    let m = metrics(&s, &s.a).await;
    assert_eq!(
        metric_line(
            &m,
            "docket_connection_status{tenant=\"acme\",connection=\"crm\",status=\"disabled\"}"
        ),
        Some("docket_connection_status{tenant=\"acme\",connection=\"crm\",status=\"disabled\"} 1"),
        "{m}"
    );
    let m = metrics(&s, &s.b).await;
    assert!(
        m.contains(
            "docket_connection_status{tenant=\"globex\",connection=\"crm\",status=\"enabled\"} 1"
        ),
        "{m}"
    );

    let (st, v) = s.post("/api/connections/crm/expire", json!({})).await;
    assert_eq!(
        (st, v["status"].clone()),
        (StatusCode::OK, json!("expired"))
    );
    let (st, v) = s
        .post(
            "/api/connections/crm/enable",
            json!({ "comment": "re-authorized" }),
        )
        .await;
    assert_eq!(
        (st, v["status"].clone()),
        (StatusCode::OK, json!("enabled"))
    );

    let (st, d) = s.get("/api/connections/crm").await;
    assert_eq!(st, StatusCode::OK, "{d}");
    let audit = d["audit"].as_array().unwrap();
    let changes: Vec<(String, String)> = audit
        .iter()
        .map(|a| {
            (
                a["from_status"].as_str().unwrap().to_string(),
                a["to_status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("enabled".into(), "disabled".into()),
            ("disabled".into(), "expired".into()),
            ("expired".into(), "enabled".into())
        ]
    );
    assert_eq!(audit[0]["actor"], "alice");
    assert_eq!(audit[2]["comment"], "re-authorized");

    // Bad input: named, 4xx, nothing changed.
    let (st, e) = s.post("/api/connections/nope/disable", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("known: crm"),
        "{e}"
    );
    let (st, e) = s
        .post("/api/connections/crm/disable", json!({ "colour": "red" }))
        .await;
    assert!(st.is_client_error(), "{st} {e}");
    let (st, e) = s
        .post(
            "/api/connections/crm/disable",
            json!({ "comment": "x".repeat(5000) }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (st, _) = s
        .call(Method::POST, "/api/connections/crm/disable", None, None)
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (_, d) = s.get("/api/connections/crm").await;
    assert_eq!(
        d["connection"]["status"], "enabled",
        "refused calls change nothing"
    );
    assert_eq!(d["audit"].as_array().unwrap().len(), 3);

    // The job-wide report's parameters are checked.
    let (st, e) = s.get("/api/jobs/ping/forensics?since=yesterday").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["field"], "since");
    let (st, e) = s.get("/api/jobs/ping/forensics?colour=red").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    let (st, e) = s.get("/api/jobs/no-such-job/forensics").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    let (st, r) = s
        .get("/api/jobs/ping/forensics?since=2020-01-01T00:00:00Z")
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["runs_examined"], 0);
    s.stop().await;
}

#[tokio::test]
async fn a_server_without_connections_says_so() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let (st, v) = s.get("/api/connections").await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "connections": [] })));
    let (st, v) = s.get("/api/breakers").await;
    assert_eq!((st, v), (StatusCode::OK, json!({ "breakers": [] })));
    let (_, stats) = s.get("/api/stats?window=1h").await;
    assert_eq!(stats["breakers"], Value::Null, "no connections: {stats}");
    let (st, e) = s.post("/api/connections/crm/enable", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    let msg: &Value = &e["error"]["message"];
    assert!(msg.as_str().unwrap().contains("--config"), "{e}");
    s.stop().await;
}

/// A process that runs no worker (`--role api`) reports no breakers — they
/// would only ever read "closed" — and says why; connection statuses still
/// show.
#[tokio::test]
async fn an_api_only_process_does_not_report_breakers_it_never_uses() {
    let (base, _hits) = failing_service().await;
    let mut o = Opts {
        worker: false,
        http_toml: Some(config(&base)),
        ..Opts::default()
    };
    o.config.runs_jobs = false;
    let s = TestServer::start_with(o).await;
    let (st, v) = s.get("/api/breakers").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["breakers"], json!([]));
    assert!(v["note"].as_str().unwrap().contains("--role api"), "{v}");
    let (_, c) = s.get("/api/connections").await;
    assert_eq!(c["connections"][0]["breaker"], Value::Null, "{c}");
    assert_eq!(c["connections"][0]["status"], "enabled");
    let m = metrics(&s, &s.a).await;
    assert!(!m.contains("docket_circuit_breaker_state{"), "{m}");
    assert!(
        m.contains(
            "docket_connection_status{tenant=\"acme\",connection=\"crm\",status=\"enabled\"} 1"
        ),
        "{m}"
    );
    s.stop().await;
}
