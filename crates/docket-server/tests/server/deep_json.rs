//! Deeply nested JSON: what the API accepts reads back; what is too deep is
//! a 422 naming the field; a stored row that cannot be decoded is shown
//! with a marker and never fails a list (no 5xx from bad data).

use crate::common::{Opts, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// `{"a": [{"a": [… 0 …]}]}` nested `depth` levels.
fn nested(depth: usize) -> Value {
    let mut v = json!(0);
    for i in 0..depth {
        v = if i % 2 == 0 {
            json!([v])
        } else {
            json!({ "a": v })
        };
    }
    v
}

#[tokio::test]
async fn trigger_input_reads_back_or_is_a_422_naming_the_field() {
    let srv = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    for depth in [10, 100, 101, 126, 127, 128, 129, 1000] {
        let input = nested(depth);
        let (s, v) = srv
            .post("/api/runs", json!({ "job": "noop", "input": input }))
            .await;
        if depth <= docket_store::MAX_JSON_DEPTH {
            assert_eq!(s, StatusCode::CREATED, "depth {depth}: {v}");
            let id = v["run"]["id"].as_str().unwrap();
            let (s, got) = srv.get(&format!("/api/runs/{id}")).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(got["run"]["input"], input, "depth {depth}");
        } else {
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "depth {depth}: {v}");
            assert_eq!(v["error"]["code"], "invalid_field", "{v}");
            assert_eq!(v["error"]["field"], "input", "{v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains("at most 100"), "{msg}");
        }
        let (s, v) = srv
            .post(
                "/api/runs/batch",
                json!({ "runs": [
                    { "job": "noop", "input": 1 },
                    { "job": "noop", "input": nested(depth) },
                ] }),
            )
            .await;
        if depth <= docket_store::MAX_JSON_DEPTH {
            assert!(s.is_success(), "depth {depth}: {s} {v}");
        } else {
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "depth {depth}: {v}");
            assert_eq!(v["error"]["field"], "runs[1].input", "{v}");
        }
    }
    let (s, v) = srv.get("/api/runs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    srv.stop().await;
}

#[tokio::test]
async fn a_run_that_cannot_be_decoded_is_listed_with_a_marker() {
    let dir = std::env::temp_dir().join(format!("docket-deep-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("docket.db");
    let p = path.to_str().unwrap().to_string();
    let srv = TestServer::start_with(Opts {
        worker: false,
        db: Some(format!("sqlite://{p}")),
        ..Opts::default()
    })
    .await;
    let first = srv.trigger("noop", json!({"n": 1})).await;
    let bad = srv.trigger("noop", json!({"n": 2})).await;
    let last = srv.trigger("noop", json!({"n": 3})).await;
    // Older data: a value deeper than the reader accepts (as an HTTP job's
    // response 127 levels deep, wrapped, used to be stored).
    let c = rusqlite::Connection::open(&p).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let n = c
        .execute(
            "UPDATE runs SET input = ?1, output = ?1 WHERE id = ?2",
            rusqlite::params![nested(128).to_string(), bad],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(c);
    let marked = |v: &Value| {
        v["docket_undecodable"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    };

    let (s, v) = srv.get("/api/runs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let runs = v["runs"].as_array().expect("runs");
    let ids: Vec<&str> = runs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&last, &bad, &first]);
    assert!(marked(&runs[1]["input"]), "{}", runs[1]);
    assert_eq!(runs[0]["input"], json!({"n": 3}));
    assert_eq!(runs[2]["input"], json!({"n": 1}));

    let (s, v) = srv.get("/api/dashboard/runs").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let dash: Vec<&str> = v["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(dash, [&last, &bad, &first], "{v}");

    let (s, v) = srv.get(&format!("/api/runs/{bad}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(marked(&v["run"]["input"]), "{v}");
    assert!(marked(&v["run"]["output"]), "{v}");
    let (s, v) = srv.get(&format!("/api/dashboard/runs?q={bad}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    srv.stop().await;
}
