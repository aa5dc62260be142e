//! Schedules through the API: create, bad input named, list and show with
//! the next fire times in the zone and in UTC, pause / resume / trigger /
//! backfill / delete audited with the token's name and the comment, per
//! tenant, and the scheduler's metrics.

use crate::common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn schedules_over_the_api() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let body = json!({
        "name": "nightly",
        "job": "noop",
        "cron": "30 2 * * *",
        "timezone": "Europe/Berlin",
        "input": {"at": "{{ slot }}"},
        "overlap": "buffer_one",
        "comment": "first version"
    });
    let (code, v) = s.post("/api/schedules", body.clone()).await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    let sched = &v["schedule"];
    assert_eq!(sched["overlap"], "buffer_one");
    assert_eq!(sched["enabled"], true);
    let next = sched["next"].as_array().unwrap();
    assert_eq!(next.len(), 5);
    // 02:30 in Berlin, with its offset; the UTC slot beside it.
    let local = next[0]["local"].as_str().unwrap();
    assert!(
        local.contains("T02:30:00") && local.contains("[Europe/Berlin]"),
        "{local}"
    );
    let slot = next[0]["slot"].as_str().unwrap();
    assert!(slot.ends_with(":30:00.000Z"), "{slot}");
    assert_eq!(v["history"][0]["kind"], "created");
    assert_eq!(v["history"][0]["actor"], "alice");
    assert_eq!(v["history"][0]["comment"], "first version");
    // The same again: 200, unchanged.
    let (code, _) = s.post("/api/schedules", body).await;
    assert_eq!(code, StatusCode::OK);

    // Bad input: the field and the problem, nothing written.
    let (code, v) = s
        .post(
            "/api/schedules",
            json!({"name": "x", "job": "noop", "cron": "0 0 32 * *"}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "cron");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("day of month") && m.contains("column 5"), "{m}");
    let (code, v) = s
        .post(
            "/api/schedules",
            json!({"name": "x", "job": "noop", "every": "1m", "timezone": "Nowhere/Else"}),
        )
        .await;
    assert_eq!(
        (code, v["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("timezone"))
    );
    let (code, v) = s
        .post(
            "/api/schedules",
            json!({"name": "x", "job": "nope", "every": "1m"}),
        )
        .await;
    assert_eq!(
        (code, v["error"]["code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("unknown_job"))
    );
    let (code, v) = s
        .post(
            "/api/schedules",
            json!({"name": "x", "job": "noop", "every": "1m", "overlap": "never"}),
        )
        .await;
    assert_eq!(
        (code, v["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("overlap"))
    );
    let (_, v) = s.get("/api/schedules").await;
    assert_eq!(v["schedules"].as_array().unwrap().len(), 1, "{v}");

    // Pause, resume, trigger now, backfill, each audited.
    let (code, v) = s
        .post(
            "/api/schedules/nightly/pause",
            json!({"comment": "maintenance"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v["schedule"]["enabled"], false);
    assert!(v["schedule"]["next"].as_array().unwrap().is_empty());
    let (_, v) = s.post("/api/schedules/nightly/resume", json!({})).await;
    assert_eq!(v["schedule"]["enabled"], true);
    let (code, v) = s
        .post(
            "/api/schedules/nightly/trigger",
            json!({"comment": "by hand"}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert!(v["run"]["idempotency_key"]
        .as_str()
        .unwrap()
        .starts_with("schedule:nightly:"));
    let (code, v) = s
        .post(
            "/api/schedules/nightly/backfill",
            json!({"from": "2026-03-27T00:00:00Z", "to": "2026-03-31T00:00:00Z", "comment": "outage"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    let keys: Vec<&str> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"]["idempotency_key"].as_str().unwrap())
        .collect();
    // 29 March has no 02:30 in Berlin (spring forward).
    assert_eq!(
        keys,
        [
            "schedule:nightly:2026-03-27T01:30:00.000Z",
            "schedule:nightly:2026-03-28T01:30:00.000Z",
            "schedule:nightly:2026-03-30T00:30:00.000Z",
        ]
    );
    let (code, v) = s
        .post(
            "/api/schedules/nightly/backfill",
            json!({"from": "2026-03-31T00:00:00Z", "to": "2026-03-27T00:00:00Z"}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, v) = s.get("/api/schedules/nightly").await;
    let kinds: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "backfilled",
            "backfilled",
            "backfilled",
            "triggered",
            "resumed",
            "paused",
            "created"
        ]
    );
    assert_eq!(v["history"][5]["comment"], "maintenance");
    assert_eq!(v["history"][0]["comment"], "outage");
    assert_eq!(v["history"][0]["actor"], "alice");

    // Another tenant sees none of it.
    let (code, _) = s
        .call(
            Method::GET,
            "/api/schedules/nightly",
            Some(&s.b.clone()),
            None,
        )
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (_, v) = s
        .call(Method::GET, "/api/schedules", Some(&s.b.clone()), None)
        .await;
    assert_eq!(v["schedules"], json!([]));

    // Metrics name the scheduler's series.
    let (_, text) = s.get("/metrics").await;
    let text = text.as_str().unwrap_or_default().to_string();
    assert!(
        text.contains("docket_schedule_slots_fired_total{kind=\"backfilled\"} 3"),
        "{text}"
    );
    assert!(text.contains("docket_schedule_late_seconds_max"));

    // Delete: 200, then 404.
    let (code, v) = s
        .call(
            Method::DELETE,
            "/api/schedules/nightly",
            Some(&s.a.clone()),
            Some(json!({"comment": "gone"})),
        )
        .await;
    assert_eq!((code, v), (StatusCode::OK, json!({"deleted": "nightly"})));
    let (code, v) = s.get("/api/schedules/nightly").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "not_found");
    let (code, _) = s.post("/api/schedules/nightly/trigger", json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    s.stop().await;
}
