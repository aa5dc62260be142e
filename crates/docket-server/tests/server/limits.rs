//! Issue 11 part 4: times and durations are range-checked wherever they
//! enter (422 for a body field, 400 for a query parameter, naming it and
//! the range) and always render as RFC 3339.

use crate::common::{Opts, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const RANGE: &str = "1970-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z";

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
async fn huge_postpone_delays_are_422_and_far_dates_are_rfc3339() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let id = s.trigger("noop", json!(null)).await;
    let path = format!("/api/runs/{id}/postpone");
    for ms in [
        json!(9_223_372_036_854_775_808u64),
        json!(9_223_372_036_854_775_807u64),
        json!(u64::MAX),
        json!(253_402_300_799_999u64),
    ] {
        let (st, v) = s.post(&path, json!({ "delay_ms": ms })).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{ms}: {v}");
        assert_eq!(v["error"]["field"], "delay_ms", "{v}");
        assert!(message(&v).contains("9999-12-31T23:59:59.999Z"), "{v}");
    }
    let (_, v) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(
        v["run"]["status"], "pending",
        "a refused postpone wrote nothing"
    );

    // The last second RFC 3339 can write is accepted, and shown as written.
    let (st, v) = s
        .post(&path, json!({"until": "9999-12-31T23:59:59Z"}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["run_after"], "9999-12-31T23:59:59.000Z");
    let (_, v) = s.get(&format!("/api/runs/{id}")).await;
    let timeline = v["timeline"].to_string();
    assert!(
        timeline.contains("postponed until 9999-12-31T23:59:59.000Z"),
        "{timeline}"
    );
    assert!(!v.to_string().contains("ms\""), "no @…ms times: {v}");

    // An offset that puts it past the range is named, with the range.
    let (st, v) = s
        .post(&path, json!({"until": "9999-12-31T23:00:00-01:00"}))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "until");
    assert!(message(&v).contains(RANGE), "{v}");
    s.stop().await;
}

#[tokio::test]
async fn trigger_and_query_times_outside_the_range_are_refused_naming_it() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let (st, v) = s
        .post(
            "/api/runs",
            json!({"job": "noop", "run_after": "1969-12-31T23:59:59Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "run_after");
    assert!(message(&v).contains(RANGE), "{v}");
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({"runs": [{"job": "noop"}, {"job": "noop", "run_after": "0001-01-01T00:00:00Z"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "runs[1].run_after");
    let (_, v) = s.get("/api/runs").await;
    assert_eq!(v["runs"], json!([]), "nothing was written");

    let (st, v) = s
        .post(
            "/api/runs",
            json!({"job": "noop", "run_after": "9999-12-31T23:59:59.999Z"}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["run"]["run_after"], "9999-12-31T23:59:59.999Z");

    for path in [
        "/api/runs?created_after=1969-01-01T00:00:00Z",
        "/api/runs?created_before=0001-01-01T00:00:00Z",
        "/api/jobs/noop/forensics?since=1900-01-01T00:00:00Z",
    ] {
        let (st, v) = s.get(path).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(message(&v).contains(RANGE), "{path}: {v}");
        assert!(v["error"]["field"].is_string(), "{v}");
    }
    s.stop().await;
}

/// The Rust API refuses an out-of-range time where one enters the engine.
#[tokio::test]
async fn the_engine_refuses_out_of_range_times() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let d = &s.docket;
    let err = d
        .trigger_with(
            "noop",
            json!(null),
            docket::TriggerOptions {
                run_after: Some(docket::Timestamp::from_millis(i64::MAX)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, docket::Error::InvalidInput(_)), "{err}");
    let t = d.trigger("noop", json!(null)).await.unwrap();
    let err = d
        .postpone(
            t.run.id,
            docket::Timestamp::from_millis(253_402_300_800_000),
            docket::Actor::new("test", None),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, docket::Error::InvalidInput(_)), "{err}");
    assert_eq!(
        d.get_run(t.run.id).await.unwrap().status.to_string(),
        "pending"
    );
    s.stop().await;
}

/// Step and ledger times are RFC 3339 like every other time of the API.
#[tokio::test]
async fn step_times_are_rfc3339() {
    let s = TestServer::start().await;
    let id = s.trigger("stepper", json!({"failures": 0})).await;
    s.until(&id, &["completed"]).await;
    let (_, v) = s.get(&format!("/api/runs/{id}")).await;
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{v}");
    for st in steps {
        let t = st["updated_at"].as_str().unwrap_or_else(|| panic!("{st}"));
        assert!(docket::Timestamp::parse_rfc3339(t).is_some(), "{t}");
        assert!(t.ends_with('Z'), "{t}");
    }
    s.stop().await;
}
