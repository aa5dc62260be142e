//! Debounced triggers over HTTP (docs/FLOW_CONTROL.md, "Debounce"): the
//! trigger body's `debounce`, the 200 answer of a collapsed trigger, the
//! count in `GET /api/runs/{id}`, the timeline, and 422s naming the field.

use crate::common::{Opts, TestServer};
use crate::events::Sse;
use reqwest::{Method, StatusCode};
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

/// The open debounce windows are in `GET /api/limits` (and so in `docket
/// limits`) and counted in `/metrics`, each tenant's only: two tenants
/// debounce with the same key template and input, and neither sees the
/// other's keys, runs or counts. On SQLite and on PostgreSQL.
async fn open_windows_are_listed_and_counted_per_tenant(opts: Opts) {
    let s = TestServer::start_with(opts).await;
    let debounce = json!({ "key": "k{{ input.c }}", "window": "1h", "keep": "last" });
    let trigger = |token: String, c: i64| {
        let s = &s;
        let debounce = debounce.clone();
        async move {
            let (st, v) = s
                .call(
                    Method::POST,
                    "/api/runs",
                    Some(&token),
                    Some(json!({ "job": "noop", "input": { "c": c }, "debounce": debounce })),
                )
                .await;
            assert!(st.is_success(), "{v}");
            v["run"]["id"].as_str().unwrap().to_string()
        }
    };
    // globex first: once acme's last collapse is published, so is globex's.
    let theirs = trigger(s.b.clone(), 1).await;
    trigger(s.b.clone(), 1).await;
    let mut sse = Sse::open(&s, "", None).await;
    let one = trigger(s.a.clone(), 1).await;
    trigger(s.a.clone(), 1).await;
    trigger(s.a.clone(), 1).await;
    let two = trigger(s.a.clone(), 2).await;

    let (st, v) = s.get("/api/limits").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["debounce_truncated"], false);
    let windows = v["debounce"].as_array().unwrap();
    let shape: Vec<(String, String, String, String, u64)> = windows
        .iter()
        .map(|w| {
            (
                w["key"].as_str().unwrap().to_string(),
                w["keep"].as_str().unwrap().to_string(),
                w["run"].as_str().unwrap().to_string(),
                w["run_status"].as_str().unwrap().to_string(),
                w["collapsed"].as_u64().unwrap(),
            )
        })
        .collect();
    let w = |key: &str, run: &str, collapsed| {
        (
            key.to_string(),
            "last".to_string(),
            run.to_string(),
            "pending".to_string(),
            collapsed,
        )
    };
    assert_eq!(shape, [w("k1", &one, 2), w("k2", &two, 0)]);
    assert!(windows.iter().all(|w| w["job"] == "noop"));
    let at = |w: &serde_json::Value, f: &str| {
        docket::Timestamp::parse_rfc3339(w[f].as_str().unwrap()).expect("RFC 3339")
    };
    assert_eq!(
        at(&windows[0], "until").millis_since(at(&windows[0], "opened_at")),
        3_600_000
    );
    let (st, other) = s.call(Method::GET, "/api/limits", Some(&s.b), None).await;
    assert_eq!(st, StatusCode::OK, "{other}");
    let theirs_listed: Vec<(&str, &str, u64)> = other["debounce"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["key"].as_str().unwrap(),
                w["run"].as_str().unwrap(),
                w["collapsed"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(theirs_listed, [("k1", theirs.as_str(), 1)]);
    for id in [&one, &two] {
        assert!(
            !other.to_string().contains(id.as_str()),
            "acme's run leaked"
        );
    }
    assert!(
        !v.to_string().contains(theirs.as_str()),
        "globex's run leaked"
    );

    // /metrics: the collapses once the tail published them (the metrics
    // observe each event before it is sent), the open windows from the store.
    let mut seen = 0;
    while seen < 2 {
        if sse.next().await.kind == "trigger_collapsed" {
            seen += 1;
        }
    }
    let scrape = |token: String| {
        let s = &s;
        async move {
            s.http
                .get(s.url("/metrics"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let m = scrape(s.a.clone()).await;
    for line in [
        "docket_debounce_collapsed_total{tenant=\"acme\",job=\"noop\"} 2",
        "docket_debounce_windows_open{tenant=\"acme\",job=\"noop\"} 2",
        "# TYPE docket_debounce_collapsed_total counter",
        "# TYPE docket_debounce_windows_open gauge",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in:\n{m}");
    }
    assert!(!m.contains("globex"), "{m}");
    let m = scrape(s.b.clone()).await;
    for line in [
        "docket_debounce_collapsed_total{tenant=\"globex\",job=\"noop\"} 1",
        "docket_debounce_windows_open{tenant=\"globex\",job=\"noop\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in:\n{m}");
    }
    assert!(!m.contains("acme"), "{m}");
    // The OpenAPI document describes the windows.
    let (_, doc) = s.get("/api/openapi.json").await;
    let view = &doc["components"]["schemas"]["DebounceWindowView"]["properties"];
    assert_eq!(view["keep"]["enum"], json!(["first", "last"]));
    assert!(view["collapsed"].is_object() && view["until"].is_object());
    assert!(doc["components"]["schemas"]["Limits"]["properties"]["debounce"].is_object());
    s.stop().await;
}

#[tokio::test]
async fn open_windows_are_listed_and_counted_per_tenant_sqlite() {
    open_windows_are_listed_and_counted_per_tenant(server_opts()).await;
}

#[tokio::test]
async fn open_windows_are_listed_and_counted_per_tenant_postgres() {
    let Some(db) = crate::worker_protocol::postgres() else {
        return;
    };
    open_windows_are_listed_and_counted_per_tenant(Opts {
        db: Some(db),
        ..server_opts()
    })
    .await;
}
