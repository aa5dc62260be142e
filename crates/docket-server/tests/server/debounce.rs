//! Debounced triggers over HTTP (docs/FLOW_CONTROL.md, "Debounce"): the
//! trigger body's `debounce`, the 200 answer of a collapsed trigger, the
//! count in `GET /api/runs/{id}`, the timeline, and 422s naming the field.

use crate::common::{Opts, TestServer};
use reqwest::StatusCode;
use serde_json::json;

fn server_opts() -> Opts {
    Opts {
        worker: false,
        ..Opts::default()
    }
}

/// A collapsed trigger answers 200 with the run it was collapsed into
/// (`existing` and `collapsed` true), as a repeated idempotency key does;
/// the run shows the count, and its timeline the collapse with the actor.
/// A batch applies its entries in order.
#[tokio::test]
async fn a_collapsed_trigger_answers_200_with_the_run_and_is_on_its_timeline() {
    let s = TestServer::start_with(server_opts()).await;
    let debounce = json!({ "key": "{{ tenant }}/{{ input.c }}", "window": "1h", "keep": "last" });
    let (st, v) = s
        .post(
            "/api/runs",
            json!({ "job": "noop", "input": { "c": 1, "v": 1 }, "debounce": debounce }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["existing"].clone(), v["collapsed"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(v["run"]["debounce"]["key"], "acme/1");
    assert_eq!(v["run"]["debounce"]["keep"], "last");
    assert_eq!(v["run"]["debounce"]["collapsed"], 0);
    assert_eq!(
        v["run"]["run_after"], v["run"]["debounce"]["until"],
        "due at the window's end"
    );
    let id = v["run"]["id"].as_str().unwrap().to_string();
    let (st, v) = s
        .post(
            "/api/runs",
            json!({ "job": "noop", "input": { "c": 1, "v": 2 }, "debounce": debounce }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["existing"].clone(), v["collapsed"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(v["run"]["id"], id.as_str());
    assert_eq!(v["run"]["input"], json!({ "c": 1, "v": 2 }));
    // A batch: two entries of one new key make one run, in order.
    let (st, b) = s
        .post(
            "/api/runs/batch",
            json!({ "runs": [
                { "job": "noop", "input": { "c": 2, "v": 1 }, "debounce": debounce },
                { "job": "noop", "input": { "c": 2, "v": 2 }, "debounce": debounce },
                { "job": "noop", "input": { "c": 1, "v": 3 }, "debounce": debounce },
            ] }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let runs = b["runs"].as_array().unwrap();
    assert_eq!(runs[0]["collapsed"], false);
    assert_eq!(runs[1]["collapsed"], true);
    assert_eq!(runs[1]["run"]["id"], runs[0]["run"]["id"]);
    assert_eq!(runs[2]["collapsed"], true);
    assert_eq!(runs[2]["run"]["id"], id.as_str());
    let (st, d) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(d["run"]["debounce"]["collapsed"], 2);
    assert_eq!(d["run"]["debounce"]["current"], true);
    assert_eq!(d["run"]["input"], json!({ "c": 1, "v": 3 }));
    let collapsed: Vec<&serde_json::Value> = d["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "trigger_collapsed")
        .collect();
    assert_eq!(collapsed.len(), 2);
    let line = collapsed[0]["summary"].as_str().unwrap();
    assert!(
        line.contains("by alice") && line.contains("acme/1") && line.contains("replaced"),
        "{line}"
    );
    assert!(
        !line.contains("\"v\""),
        "the timeline never shows the replaced input: {line}"
    );
    // The OpenAPI document describes the body and the answer.
    let (_, doc) = s.get("/api/openapi.json").await;
    assert!(doc["components"]["schemas"]["DebounceRequest"]["properties"]["keep"].is_object());
    assert!(doc["components"]["schemas"]["TriggerResponse"]["properties"]["collapsed"].is_object());
    s.stop().await;
}

/// A bad debounce is 422 naming the field (in a batch, with the entry's
/// index), and nothing is written.
#[tokio::test]
async fn a_bad_debounce_is_422_naming_the_field_and_writes_nothing() {
    let s = TestServer::start_with(server_opts()).await;
    for (debounce, field) in [
        (json!({ "window": "0s", "keep": "last" }), "debounce.window"),
        (
            json!({ "window": "-5s", "keep": "last" }),
            "debounce.window",
        ),
        (
            json!({ "window": "soon", "keep": "first" }),
            "debounce.window",
        ),
        (json!({ "window": "5s", "keep": "latest" }), "debounce.keep"),
        (
            json!({ "key": "{{ customer }}", "window": "5s", "keep": "first" }),
            "debounce.key",
        ),
    ] {
        let (st, v) = s
            .post(
                "/api/runs",
                json!({ "job": "noop", "input": {}, "debounce": debounce }),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    // The key needs an input field the input lacks.
    let (st, v) = s
        .post(
            "/api/runs",
            json!({ "job": "noop", "input": {}, "debounce": { "key": "{{ input.c }}", "window": "5s", "keep": "first" } }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("input.c"),
        "{v}"
    );
    let (st, v) = s
        .post(
            "/api/runs/batch",
            json!({ "runs": [
                { "job": "noop" },
                { "job": "noop", "debounce": { "window": "0ms", "keep": "first" } },
            ] }),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "runs[1].debounce.window");
    let (_, page) = s.get("/api/runs").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 0, "nothing written");
    s.stop().await;
}
