//! Signals over HTTP: a run waits, a signal wakes it, its payload is the
//! output; idempotent ids; the 400/404/409/413/422 answers; keyed fan-out
//! within the caller's tenant; the run's `wait` and the metrics (waiting
//! for a signal, sleeping).

use crate::common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn as_bob(
    s: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    s.call(method, path, Some(&s.b.clone()), body).await
}

#[tokio::test]
async fn a_signal_wakes_a_waiting_run_and_becomes_its_output() {
    let s = TestServer::start().await;
    let id = s.trigger("waiter", json!({"name": "paid"})).await;
    let run = s.until(&id, &["postponed"]).await;
    assert_eq!(run["wait"]["kind"], "signal", "{run}");
    assert_eq!(run["wait"]["name"], "paid");
    assert!(run["wait"]["summary"]
        .as_str()
        .unwrap()
        .starts_with("waiting for signal \"paid\" until"));
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/signals/paid"),
            json!({"data": {"amount": 42}, "signal_id": "evt-1"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["duplicate"].clone(), v["woke"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(v["signal"]["sent_by"], "alice");
    let run = s.until(&id, &["completed"]).await;
    assert_eq!(
        run["output"],
        json!({"data": {"amount": 42}, "sent_by": "alice"})
    );
    assert!(run["wait"].is_null());
    // The same id again: the original, 200, even now the run is final.
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/signals/paid"),
            json!({"data": "other", "signal_id": "evt-1"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["duplicate"], true);
    assert_eq!(v["signal"]["data"], json!({"amount": 42}));
    assert_eq!(v["signal"]["delivered_to"], "signal:paid:1");
    // A new signal for a final run: 409 naming its state.
    let (st, v) = s
        .post(&format!("/api/runs/{id}/signals/paid"), json!({}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["current_status"], "completed", "{v}");
    // The timeline says who sent what, and the list shows it delivered.
    let (_, detail) = s.get(&format!("/api/runs/{id}")).await;
    let received = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "signal_received")
        .unwrap()
        .clone();
    assert_eq!(received["actor"], "alice");
    assert!(
        received["summary"]
            .as_str()
            .unwrap()
            .contains("signal \"paid\" received from alice"),
        "{received}"
    );
    let (st, list) = s.get(&format!("/api/runs/{id}/signals")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["signals"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn bad_signals_are_refused_with_the_field_named() {
    let s = TestServer::start().await;
    let id = s.trigger("waiter", json!({})).await;
    s.until(&id, &["postponed"]).await;
    let unknown = docket::RunId::new();
    let (st, _) = s
        .post(&format!("/api/runs/{unknown}/signals/paid"), json!({}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = as_bob(
        &s,
        Method::POST,
        &format!("/api/runs/{id}/signals/paid"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "another tenant's run does not exist"
    );
    let (st, v) = s
        .post(&format!("/api/runs/{id}/signals/bad%20name"), json!({}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["field"], "name", "{v}");
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/signals/paid"),
            json!({"signal_id": "no spaces"}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "signal_id");
    let big = "x".repeat(docket_store::signals::MAX_SIGNAL_BYTES);
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/signals/paid"),
            json!({"data": big}),
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["field"], "data");
    let (st, v) = s
        .post("/api/signals", json!({"name": "paid", "key": ""}))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "key");
    // Nothing of the refused ones was kept.
    assert!(s
        .docket
        .signals(id.parse().unwrap())
        .await
        .unwrap()
        .is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_keyed_signal_wakes_the_callers_runs_waiting_for_its_key() {
    let s = TestServer::start().await;
    let mut acme = Vec::new();
    for key in ["order-42", "order-42", "order-43"] {
        acme.push(
            s.trigger("waiter", json!({"name": "settled", "key": key}))
                .await,
        );
    }
    let (st, v) = as_bob(
        &s,
        Method::POST,
        "/api/runs",
        Some(json!({"job": "waiter", "input": {"name": "settled", "key": "order-42"}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let globex = v["run"]["id"].as_str().unwrap().to_string();
    for id in &acme {
        s.until(id, &["postponed"]).await;
    }
    // globex's run, through bob's token (bounded; each wait is a long poll
    // that answers when the run changes).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, r) = as_bob(&s, Method::GET, &format!("/api/runs/{globex}"), None).await;
        if r["run"]["status"] == "postponed" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r}");
        as_bob(
            &s,
            Method::GET,
            &format!("/api/runs/{globex}/wait?timeout=200ms"),
            None,
        )
        .await;
    }
    let (_, metrics) = as_bob(&s, Method::GET, "/metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("docket_runs_waiting_signal{tenant=\"globex\",name=\"settled\"} 1"),
        "{metrics}"
    );
    let (st, v) = s
        .post(
            "/api/signals",
            json!({"name": "settled", "key": "order-42", "data": {"paid": true}, "signal_id": "whk-1"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut runs: Vec<String> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    runs.sort();
    let mut expected = acme[..2].to_vec();
    expected.sort();
    assert_eq!(runs, expected);
    assert_eq!(v["woke"].as_array().unwrap().len(), 2);
    for id in &acme[..2] {
        let run = s.until(id, &["completed"]).await;
        assert_eq!(run["output"]["data"], json!({"paid": true}));
    }
    // The repeat reaches no run twice.
    let (_, v) = s
        .post(
            "/api/signals",
            json!({"name": "settled", "key": "order-42", "data": 2, "signal_id": "whk-1"}),
        )
        .await;
    assert_eq!(v["woke"], json!([]), "{v}");
    let (_, r) = s.get(&format!("/api/runs/{}", acme[2])).await;
    assert_eq!(r["run"]["status"], "postponed");
    let (_, r) = as_bob(&s, Method::GET, &format!("/api/runs/{globex}"), None).await;
    assert_eq!(
        r["run"]["status"], "postponed",
        "another tenant's run is not reached"
    );
    s.stop().await;
}

/// `docket_runs_sleeping{tenant}` counts the caller's tenant's runs in a
/// durable sleep, and a run suspended in a signal wait is not one of them.
#[tokio::test]
async fn metrics_count_sleeping_runs_by_tenant() {
    let s = TestServer::start().await;
    let three_days = 3 * 24 * 3_600_000u64;
    let napper = s.trigger("napper", json!({"ms": three_days})).await;
    let waiter = s.trigger("waiter", json!({"name": "paid"})).await;
    let run = s.until(&napper, &["postponed"]).await;
    assert_eq!(run["wait"]["kind"], "sleep", "{run}");
    s.until(&waiter, &["postponed"]).await;
    let (_, m) = s.get("/metrics").await;
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(m.contains("# TYPE docket_runs_sleeping gauge"), "{m}");
    assert!(m.contains("docket_runs_sleeping{tenant=\"acme\"} 1"), "{m}");
    assert!(
        m.contains("docket_runs_waiting_signal{tenant=\"acme\",name=\"paid\"} 1"),
        "{m}"
    );
    let (_, m) = as_bob(&s, Method::GET, "/metrics", None).await;
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(
        m.contains("docket_runs_sleeping{tenant=\"globex\"} 0"),
        "{m}"
    );
}
