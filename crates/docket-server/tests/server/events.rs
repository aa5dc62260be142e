//! Server-sent events: live delivery, filters, resumption with
//! Last-Event-ID, and shutdown ending the stream.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

pub struct Sse {
    res: reqwest::Response,
    buf: String,
}

#[derive(Debug, Clone)]
pub struct Ev {
    pub id: i64,
    pub kind: String,
    pub data: Value,
}

impl Sse {
    pub async fn open(s: &TestServer, query: &str, last_id: Option<i64>) -> Sse {
        let mut r = s
            .http
            .get(s.url(&format!("/api/events{query}")))
            .bearer_auth(&s.a);
        if let Some(id) = last_id {
            r = r.header("Last-Event-ID", id.to_string());
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Sse {
            res,
            buf: String::new(),
        }
    }

    /// The next event, waiting at most 10 s.
    pub async fn next(&mut self) -> Ev {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if let Some(id) = id {
                    return Ev {
                        id,
                        kind,
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .expect("the stream stays open");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events until one of `kind` for `run` arrives (inclusive).
    pub async fn until(&mut self, run: &str, kind: &str) -> Vec<Ev> {
        let mut out = Vec::new();
        loop {
            let e = self.next().await;
            let done = e.kind == kind && e.data["run_id"] == run;
            out.push(e);
            if done {
                return out;
            }
        }
    }
}

#[tokio::test]
async fn live_events_in_order_filtered_by_run_and_job() {
    let s = TestServer::start().await;
    let mut all = Sse::open(&s, "", None).await;
    let mut by_job = Sse::open(&s, "?job=unavailable", None).await;
    let other = s.trigger("noop", json!(1)).await;
    let id = s.trigger("unavailable", json!({"failures": 1})).await;
    let mut by_run = Sse::open(
        &s,
        &format!("?run_id={id}&kind=retry_scheduled,run_completed"),
        Some(0),
    )
    .await;
    let evs = all.until(&id, "run_completed").await;
    let ids: Vec<i64> = evs.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let mine: Vec<&str> = evs
        .iter()
        .filter(|e| e.data["run_id"] == id.as_str())
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        mine,
        [
            "run_triggered",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled",
            "attempt_started",
            "run_completed"
        ]
    );
    assert!(evs.iter().any(|e| e.data["run_id"] == other.as_str()));
    let e = by_job.until(&id, "run_completed").await;
    assert!(e.iter().all(|e| e.data["job"] == "unavailable"));
    // The run filter with Last-Event-ID 0 replays the stored ones first.
    let a = by_run.next().await;
    let b = by_run.next().await;
    assert_eq!(
        (a.kind.as_str(), b.kind.as_str()),
        ("retry_scheduled", "run_completed")
    );
    assert_eq!(a.data["data"]["retry_policy"], "fast");
    s.stop().await;
}

#[tokio::test]
async fn resume_with_last_event_id_has_no_gaps_or_repeats() {
    let s = TestServer::start().await;
    let mut live = Sse::open(&s, "", None).await;
    let id = s.trigger("unavailable", json!({"failures": 2})).await;
    let first = live.until(&id, "run_completed").await;
    drop(live);
    // Another run happens while "disconnected".
    let id2 = s.trigger("noop", json!(2)).await;
    s.until(&id2, &["completed"]).await;
    let cut = first[2].id;
    let mut resumed = Sse::open(&s, "", Some(cut)).await;
    let rest = resumed.until(&id2, "run_completed").await;
    let mut got: Vec<i64> = first.iter().map(|e| e.id).filter(|i| *i <= cut).collect();
    got.extend(rest.iter().map(|e| e.id));
    // Exactly the stored events, in order.
    let (_, d1) = s.get(&format!("/api/runs/{id}")).await;
    let (_, d2) = s.get(&format!("/api/runs/{id2}")).await;
    let mut stored: Vec<i64> = d1["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(d2["events"].as_array().unwrap())
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    stored.sort();
    assert_eq!(got, stored);
    // A live event after the replay arrives once.
    let id3 = s.trigger("noop", json!(3)).await;
    let more = resumed.until(&id3, "run_completed").await;
    assert_eq!(more[0].kind, "run_triggered");
    assert!(more[0].id > *stored.last().unwrap());
    // A bad Last-Event-ID is a 400 naming it.
    let res = s
        .http
        .get(s.url("/api/events"))
        .bearer_auth(&s.a)
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["field"], "Last-Event-ID");
    let res = s
        .http
        .get(s.url("/api/events?run_id=nope"))
        .bearer_auth(&s.a)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // Shutting down ends open streams (stop() is bounded).
    s.stop().await;
    assert!(resumed
        .res
        .chunk()
        .await
        .map(|c| c.is_none())
        .unwrap_or(true));
}

/// A subscriber that falls behind the hub (here: a one-event buffer and a
/// batch of 40 runs) catches up from the store without gaps or repeats.
#[tokio::test]
async fn a_lagging_subscriber_catches_up_from_the_store() {
    let mut o = Opts::default();
    o.config.hub.channel_capacity = 1;
    let s = TestServer::start_with(o).await;
    let mut sse = Sse::open(&s, "?kind=run_triggered,run_completed", None).await;
    let runs: Vec<Value> = (0..40)
        .map(|i| json!({"job": "noop", "input": i}))
        .collect();
    let (st, v) = s.post("/api/runs/batch", json!({ "runs": runs })).await;
    assert_eq!(st, 201);
    let ids: Vec<String> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"]["id"].as_str().unwrap().to_string())
        .collect();
    let mut seen = Vec::new();
    let mut completed = std::collections::HashSet::new();
    while completed.len() < ids.len() {
        let e = sse.next().await;
        if e.kind == "run_completed" {
            completed.insert(e.data["run_id"].as_str().unwrap().to_string());
        }
        seen.push(e.id);
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "in order, no repeats: {seen:?}"
    );
    assert_eq!(seen.len(), 80, "40 triggered + 40 completed");
    s.stop().await;
}
