//! Child runs over the API: a run's `parent`, `children` count and current
//! `wait`, `GET /api/runs?parent=ID` (paged, tenant-scoped, bad input named),
//! the timeline and the metrics gauge.

use crate::common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn ids(v: &Value) -> Vec<String> {
    v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_parent_shows_its_children_and_its_wait() {
    let s = TestServer::start().await;
    // Children that wait for a person: the parent joins and waits.
    let waiting = s
        .trigger("fan", json!({ "children": 2, "job": "approval" }))
        .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let detail = loop {
        let (_, v) = s.get(&format!("/api/runs/{waiting}")).await;
        if v["run"]["wait"].is_object() {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never waited: {v}");
        s.get(&format!("/api/runs/{waiting}/wait?timeout=100ms"))
            .await;
    };
    assert_eq!(detail["run"]["status"], "postponed");
    assert_eq!(detail["children"], 2);
    assert_eq!(
        detail["run"]["wait"],
        json!({
            "kind": "children", "waiting": 2, "of": 2, "name": null, "key": null,
            "until": null, "summary": "waiting for 2 of 2 children"
        })
    );
    let m = s
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
        m.contains("docket_runs_waiting_for_children{tenant=\"acme\"} 1"),
        "{m}"
    );

    // Children that complete: the parent completes; its children list in
    // spawn order, paged, each linking back.
    let done = s.trigger("fan", json!({ "children": 3 })).await;
    s.until(&done, &["completed"]).await;
    let (_, v) = s.get(&format!("/api/runs/{done}")).await;
    assert_eq!(v["run"]["output"], json!({ "completed": 3 }));
    assert_eq!(v["children"], 3);
    assert!(v["run"]["wait"].is_null());
    assert!(v["run"]["parent"].is_null());
    let spawned: Vec<&Value> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "child_spawned")
        .collect();
    assert_eq!(spawned.len(), 3);
    assert!(spawned[0]["summary"]
        .as_str()
        .unwrap()
        .starts_with("spawned child"));
    let (st, p1) = s.get(&format!("/api/runs?parent={done}&limit=2")).await;
    assert_eq!(st, StatusCode::OK, "{p1}");
    assert_eq!(ids(&p1).len(), 2);
    let cursor = p1["next_cursor"].as_str().unwrap().to_string();
    let (_, p2) = s
        .get(&format!("/api/runs?parent={done}&limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&p2).len(), 1);
    assert!(p2["next_cursor"].is_null());
    let kid = &ids(&p1)[0];
    let (_, k) = s.get(&format!("/api/runs/{kid}")).await;
    assert_eq!(k["run"]["parent"], json!(done));
    assert_eq!(k["run"]["input"], json!({ "i": 0 }));
    assert_eq!(k["children"], 0);

    // The other filters apply to the children.
    let (_, all) = s
        .get(&format!(
            "/api/runs?parent={done}&status=completed&limit=10"
        ))
        .await;
    assert_eq!(ids(&all).len(), 3, "{all}");
    let (_, none) = s
        .get(&format!("/api/runs?parent={done}&status=failed&job=echo"))
        .await;
    assert_eq!(ids(&none).len(), 0, "{none}");
    // Bad input is named; another tenant sees nothing.
    for (q, field) in [
        ("parent=nope".to_string(), "parent"),
        (format!("parent={done}&status=bogus"), "status"),
    ] {
        let (st, v) = s.get(&format!("/api/runs?{q}")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"]["field"], field, "{q}");
    }
    let (st, _) = s
        .call(
            Method::GET,
            &format!("/api/runs?parent={done}"),
            Some(&s.b.clone()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    s.stop().await;
}
