//! The worker protocol v1 (docs/WORKER_PROTOCOL.md) against a real server:
//! every call, fencing (a stale lease refused and recorded), a worker that
//! vanishes mid-attempt (lease expiry through the retry policy), steps
//! replayed, the ledger race between two remote workers, and scope and
//! tenant isolation in both directions.
//!
//! The "remote workers" here are plain HTTP calls made by the test, so each
//! test decides exactly when a worker claims, reports or disappears.

use crate::common::{Opts, TestServer};
use docket::{Job, RetryPolicy};
use docket_server::auth;
use docket_store::TokenScope;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A retry policy that retries quickly and deterministically.
fn fast() -> RetryPolicy {
    RetryPolicy {
        name: "fast".into(),
        base_delay_ms: 20,
        max_delay_ms: 50,
        jitter_ms: 0,
        max_attempts: 3,
        ..RetryPolicy::default()
    }
}

/// Registers the remote jobs the tests use.
fn remote_jobs(s: &TestServer) {
    s.docket
        .register(Job::remote("remote-steps").retry(fast()))
        .unwrap();
    // A short lease, so a vanished worker costs little time.
    s.docket
        .register(
            Job::remote("remote-short")
                .retry(fast())
                .timeout(Duration::from_millis(100))
                .lease(Duration::from_millis(300)),
        )
        .unwrap();
    s.docket
        .register(Job::remote("remote-checked").validate(|v| {
            v.get("email")
                .map(|_| ())
                .ok_or_else(|| "`email` is required".to_string())
        }))
        .unwrap();
}

/// A worker token for `tenant`.
async fn worker_token(s: &TestServer, tenant: &str, name: &str) -> String {
    let t =
        auth::issue_scoped_token(tenant, name, TokenScope::Worker, s.docket.clock().now()).unwrap();
    s.docket.store().create_token(t.record).await.unwrap();
    t.secret
}

async fn setup() -> (TestServer, String) {
    setup_on(None).await
}

/// A server on `db` (default: in-memory SQLite) with the remote jobs and
/// an `acme` worker token.
async fn setup_on(db: Option<String>) -> (TestServer, String) {
    let s = TestServer::start_with(Opts {
        db,
        ..Opts::default()
    })
    .await;
    remote_jobs(&s);
    let w = worker_token(&s, "acme", "acme-worker").await;
    (s, w)
}

/// A fresh PostgreSQL schema's URL (`t_<uuidv7>`, swept by the store's
/// PostgreSQL tests after an hour), or `None` after saying why the test is
/// skipped.
pub fn postgres() -> Option<String> {
    match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(u) if !u.trim().is_empty() => Some(format!(
            "{u}{}schema=t_{}",
            if u.contains('?') { '&' } else { '?' },
            uuid::Uuid::now_v7().simple()
        )),
        _ => {
            // CI fails, never skips, without PostgreSQL.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but DOCKET_TEST_POSTGRES_URL is not: the PostgreSQL variants must run"
            );
            eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run the PostgreSQL variant");
            None
        }
    }
}

/// A POST with `token`.
async fn post(s: &TestServer, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    s.call(Method::POST, path, Some(token), Some(body)).await
}

/// Claims (long poll up to `wait_ms`) and answers the runs.
async fn claim(s: &TestServer, w: &str, worker: &str, jobs: &[&str], wait_ms: u64) -> Vec<Value> {
    let (st, v) = post(
        s,
        w,
        "/api/worker/v1/claim",
        json!({ "worker": worker, "jobs": jobs, "max": 10, "wait_ms": wait_ms }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v["runs"].as_array().unwrap().clone()
}

/// Claims exactly one run, waiting up to 5 s for it.
async fn claim_one(s: &TestServer, w: &str, worker: &str, job: &str) -> Value {
    let runs = claim(s, w, worker, &[job], 5_000).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

fn path(run: &Value, call: &str) -> String {
    format!(
        "/api/worker/v1/runs/{}/{call}",
        run["run_id"].as_str().unwrap()
    )
}

fn lease(run: &Value) -> Value {
    run["lease_id"].clone()
}

async fn end(s: &TestServer, w: &str, run: &Value, body: Value) -> (StatusCode, Value) {
    let mut body = body;
    body["lease_id"] = lease(run);
    post(s, w, &path(run, "end"), body).await
}

async fn events(s: &TestServer, id: &str) -> Vec<Value> {
    let h = s.docket.history(id.parse().unwrap()).await.unwrap();
    h.events
        .iter()
        .map(|e| json!({ "kind": e.kind.to_string(), "data": e.data, "lease_id": e.lease_id.map(|l| l.to_string()) }))
        .collect()
}

fn kinds(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

/// Every call once, in a run's life: claim (with every field), heartbeat,
/// steps get/complete/fail, progress, log, end completed; the roster lists
/// the worker with its jobs and last heartbeat.
#[tokio::test]
async fn a_remote_worker_runs_a_job_through_every_call() {
    every_call(None).await;
}

/// The same on PostgreSQL.
#[tokio::test]
async fn a_remote_worker_runs_a_job_through_every_call_postgres() {
    if let Some(db) = postgres() {
        every_call(Some(db)).await;
    }
}

async fn every_call(db: Option<String>) {
    let (s, w) = setup_on(db).await;
    let (st, v) = s
        .post(
            "/api/runs",
            json!({ "job": "remote-steps", "input": { "n": 1 }, "idempotency_key": "order-7", "correlation_id": "req-9" }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["run"]["id"].as_str().unwrap().to_string();
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    assert_eq!(run["run_id"], json!(id));
    assert_eq!(run["job"], "remote-steps");
    assert_eq!(run["tenant"], "acme");
    assert_eq!(run["input"], json!({ "n": 1 }));
    assert_eq!(run["variables"], json!({}));
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["idempotency_key"], "order-7");
    assert_eq!(run["correlation_id"], "req-9");
    assert_eq!(run["timeout_ms"], 60_000);
    assert_eq!(run["lease_ms"], 300_000);
    assert_eq!(run["heartbeat_ms"], 100_000);
    assert_eq!(run["cancel_requested"], false);
    for f in ["lease_id", "lease_expires_at", "deadline"] {
        assert!(run[f].is_string(), "{f}: {run}");
    }
    // The in-process worker never touched it: the attempt is this worker's.
    let (_, shown) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(shown["run"]["worker"], "ts-1");

    let (st, hb) = post(
        &s,
        &w,
        "/api/worker/v1/heartbeat",
        json!({ "worker": "ts-1", "leases": [{ "run_id": id, "lease_id": lease(&run) }] }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{hb}");
    assert_eq!(hb["leases"][0]["held"], true);
    assert_eq!(hb["leases"][0]["cancel_requested"], false);
    assert!(hb["leases"][0]["lease_expires_at"].is_string());

    let (st, g) = post(
        &s,
        &w,
        &path(&run, "steps/get"),
        json!({ "lease_id": lease(&run), "name": "fetch" }),
    )
    .await;
    assert_eq!(
        (st, g.clone()),
        (
            StatusCode::OK,
            json!({ "found": false, "status": null, "result": null, "comment": null })
        )
    );
    let (st, c) = post(
        &s,
        &w,
        &path(&run, "steps/complete"),
        json!({ "lease_id": lease(&run), "name": "fetch", "result": { "rows": 3 } }),
    )
    .await;
    assert_eq!(
        (st, c),
        (StatusCode::OK, json!({ "cancel_requested": false }))
    );
    // A second completion of the name is a conflict, as in-process.
    let (st, c) = post(
        &s,
        &w,
        &path(&run, "steps/complete"),
        json!({ "lease_id": lease(&run), "name": "fetch", "result": 1 }),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{c}");
    let (st, _) = post(
        &s,
        &w,
        &path(&run, "steps/fail"),
        json!({ "lease_id": lease(&run), "name": "enrich", "error": { "class": "network", "message": "ECONNRESET" } }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = post(
        &s,
        &w,
        &path(&run, "progress"),
        json!({ "lease_id": lease(&run), "current": 1, "total": 2, "message": "half" }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = post(
        &s,
        &w,
        &path(&run, "log"),
        json!({ "lease_id": lease(&run), "level": "info", "message": "sent", "data": { "id": "m-1" } }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, e) = end(
        &s,
        &w,
        &run,
        json!({ "outcome": "completed", "output": { "ok": true } }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_eq!(e["status"], "completed");
    let done = s.until(&id, &["completed"]).await;
    assert_eq!(done["output"], json!({ "ok": true }));

    let h = s.docket.history(id.parse().unwrap()).await.unwrap();
    assert_eq!(h.steps.len(), 2);
    let ks = kinds(&events(&s, &id).await);
    for k in [
        "attempt_started",
        "step_completed",
        "step_failed",
        "progress",
        "log",
        "run_completed",
    ] {
        assert!(ks.contains(&k.to_string()), "{k} missing from {ks:?}");
    }
    let evs = events(&s, &id).await;
    let p = evs.iter().find(|e| e["kind"] == "progress").unwrap();
    assert_eq!(
        p["data"],
        json!({ "current": 1, "total": 2, "message": "half" })
    );

    // The roster, for operators.
    let (st, ws) = s.get("/api/workers").await;
    assert_eq!(st, StatusCode::OK, "{ws}");
    assert_eq!(ws["workers"].as_array().unwrap().len(), 1, "{ws}");
    assert_eq!(ws["workers"][0]["name"], "ts-1");
    assert_eq!(ws["workers"][0]["tenant"], "acme");
    assert_eq!(ws["workers"][0]["jobs"], json!(["remote-steps"]));
    assert_eq!(ws["workers"][0]["running"], 0);
    assert!(ws["workers"][0]["last_seen_at"].is_string());
    s.stop().await;
}

/// A failure reported by the worker goes through the job's policy (the
/// decision is stored on the attempt); the next attempt, claimed at its
/// eligible time, gets the completed step back instead of running it.
#[tokio::test]
async fn a_failure_is_retried_by_the_policy_and_steps_replay() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (st, _) = post(
        &s,
        &w,
        &path(&run, "steps/complete"),
        json!({ "lease_id": lease(&run), "name": "validate", "result": { "valid": true } }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, e) = end(
        &s,
        &w,
        &run,
        json!({ "outcome": "failed", "error": { "class": "unavailable", "message": "503 from CRM", "action": "sync" } }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_eq!(e["status"], "pending");
    assert_eq!(e["retry"]["policy"], "fast");
    assert_eq!(e["retry"]["delay_ms"], 20);
    assert_eq!(e["terminal_reason"], Value::Null);

    let again = claim_one(&s, &w, "ts-1", "remote-steps").await;
    assert_eq!(again["attempt"], 2);
    assert_ne!(again["lease_id"], run["lease_id"]);
    let (st, g) = post(
        &s,
        &w,
        &path(&again, "steps/get"),
        json!({ "lease_id": lease(&again), "name": "validate" }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(g["found"], true);
    assert_eq!(g["status"], "completed");
    assert_eq!(g["result"], json!({ "valid": true }));
    // A terminal class stops at once, whatever the budget.
    let (_, e) = end(
        &s,
        &w,
        &again,
        json!({ "outcome": "failed", "error": { "class": "invalid_input", "message": "no such customer" } }),
    )
    .await;
    assert_eq!(e["status"], "failed");
    assert_eq!(e["terminal_reason"], "invalid_input");
    let attempts = s
        .docket
        .store()
        .attempts(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].retry_policy.as_deref(), Some("fast"));
    assert_eq!(attempts[0].delay_ms, Some(20));
    assert_eq!(attempts[0].worker, "ts-1");
    s.stop().await;
}

/// Rate limits: a Retry-After later than the policy's delay is honoured.
#[tokio::test]
async fn retry_after_is_honoured_when_later_than_the_policy() {
    let (s, w) = setup().await;
    s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (_, e) = end(
        &s,
        &w,
        &run,
        json!({ "outcome": "failed", "error": { "class": "rate_limited", "message": "429", "retry_after_ms": 60000 } }),
    )
    .await;
    assert_eq!(e["status"], "pending", "{e}");
    assert_eq!(e["retry"]["delay_ms"], 60_000, "{e}");
    s.stop().await;
}

/// An end under a lease that no longer holds the run is refused (409
/// `stale_lease`, naming the run's status) and recorded as
/// `stale_write_refused`; so are a step and an action under it.
#[tokio::test]
async fn a_stale_lease_is_refused_and_recorded() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (st, _) = end(&s, &w, &run, json!({ "outcome": "completed", "output": 1 })).await;
    assert_eq!(st, StatusCode::OK);
    let (st, e) = end(&s, &w, &run, json!({ "outcome": "completed", "output": 2 })).await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["code"], "stale_lease");
    assert_eq!(e["error"]["current_status"], "completed");
    let (st, e) = post(
        &s,
        &w,
        &path(&run, "steps/complete"),
        json!({ "lease_id": lease(&run), "name": "late", "result": 1 }),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("stale_lease"))
    );
    let (st, e) = post(
        &s,
        &w,
        &path(&run, "actions/begin"),
        json!({ "lease_id": lease(&run), "name": "send", "key": "k-1" }),
    )
    .await;
    assert_eq!(
        (st, e["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("stale_lease"))
    );
    // A lease id that never held the run: refused the same way.
    let (st, _) = post(
        &s,
        &w,
        &path(&run, "end"),
        json!({ "lease_id": uuid::Uuid::new_v4().to_string(), "outcome": "completed" }),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let evs = events(&s, &id).await;
    let refused: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "stale_write_refused")
        .collect();
    assert_eq!(refused.len(), 4, "{evs:?}");
    assert_eq!(refused[0]["lease_id"], lease(&run));
    let (_, shown) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(shown["run"]["output"], 1, "the refused end changed nothing");
    s.stop().await;
}

/// A worker that vanishes mid-attempt (no heartbeat, no end) costs one
/// lease: the run is reaped as a `lease_expired` failure through the job's
/// policy and claimed again; the vanished worker's late end is refused and
/// recorded.
#[tokio::test]
async fn a_vanished_worker_costs_one_lease_expiry_through_the_policy() {
    vanished_worker(None).await;
}

/// The same on PostgreSQL.
#[tokio::test]
async fn a_vanished_worker_costs_one_lease_expiry_postgres() {
    if let Some(db) = postgres() {
        vanished_worker(Some(db)).await;
    }
}

/// A server that runs no worker of its own (`docket serve --role api`)
/// reaps the leases it hands out: its reaper turns a vanished remote
/// worker's expired lease into a retry, as a worker process would.
#[tokio::test]
async fn an_api_only_server_reaps_a_vanished_remote_worker() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    remote_jobs(&s);
    let w = worker_token(&s, "acme", "acme-worker").await;
    let reaper = s.docket.start_reaper(Duration::from_millis(50));
    vanished_worker_on(s, w).await;
    reaper.stop().await;
}

async fn vanished_worker(db: Option<String>) {
    let (s, w) = setup_on(db).await;
    vanished_worker_on(s, w).await;
}

async fn vanished_worker_on(s: TestServer, w: String) {
    let id = s.trigger("remote-short", json!({})).await;
    let first = claim_one(&s, &w, "doomed", "remote-short").await;
    assert_eq!(first["lease_ms"], 300);
    // The worker is gone. The server's reaper (the in-process worker's, or
    // the api role's own) turns the expired lease into a retry; the next
    // claim waits for it.
    let second = claim_one(&s, &w, "survivor", "remote-short").await;
    assert_eq!(second["run_id"], json!(id));
    assert_eq!(second["attempt"], 2);
    let attempts = s
        .docket
        .store()
        .attempts(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        attempts[0].error_class,
        Some(docket::ErrorClass::LeaseExpired)
    );
    assert_eq!(attempts[0].retry_policy.as_deref(), Some("fast"));
    assert_eq!(attempts[0].worker, "doomed");
    // The first worker comes back and reports: refused, recorded.
    let (st, e) = end(
        &s,
        &w,
        &first,
        json!({ "outcome": "completed", "output": "late" }),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"]["current_status"], "running");
    let (st, _) = end(
        &s,
        &w,
        &second,
        json!({ "outcome": "completed", "output": "ok" }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let done = s.until(&id, &["completed"]).await;
    assert_eq!(done["output"], "ok");
    let ks = kinds(&events(&s, &id).await);
    assert!(
        ks.contains(&"lease_expired".to_string()) || ks.contains(&"attempt_failed".to_string()),
        "{ks:?}"
    );
    assert!(ks.contains(&"stale_write_refused".to_string()), "{ks:?}");
    s.stop().await;
}

/// Heartbeats keep a short lease alive past its length; a lost lease
/// answers `held: false`.
#[tokio::test]
async fn heartbeats_keep_a_lease_and_report_its_loss() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-short", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-short").await;
    let hb = json!({ "worker": "ts-1", "leases": [{ "run_id": id, "lease_id": lease(&run) }] });
    // Heartbeat well within the 300 ms lease, for longer than the lease;
    // the in-process reaper runs every ~50 ms meanwhile.
    for _ in 0..8 {
        let (st, v) = post(&s, &w, "/api/worker/v1/heartbeat", hb.clone()).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["leases"][0]["held"], true, "{v}");
        // A bounded wait on the server (a long poll that times out), not
        // a sleep: nothing ends the run meanwhile.
        s.get(&format!("/api/runs/{id}/wait?timeout=60ms")).await;
    }
    let (st, _) = end(&s, &w, &run, json!({ "outcome": "completed" })).await;
    assert_eq!(st, StatusCode::OK, "the lease was still held");
    let (_, v) = post(&s, &w, "/api/worker/v1/heartbeat", hb).await;
    assert_eq!(v["leases"][0]["held"], false);
    s.stop().await;
}

/// The ledger race: two remote workers run two runs that share one
/// action key against a slow service. Exactly one sends; the other is
/// deferred by the server (attempt ended, no budget spent) and, claimed
/// again, finds the action committed: one effect.
#[tokio::test]
async fn two_remote_workers_racing_on_one_key_cause_one_effect() {
    ledger_race(None).await;
}

/// The same on PostgreSQL (many connections: the ledger row's lock decides).
#[tokio::test]
async fn two_remote_workers_racing_on_one_key_cause_one_effect_postgres() {
    if let Some(db) = postgres() {
        ledger_race(Some(db)).await;
    }
}

async fn ledger_race(db: Option<String>) {
    let (s, _) = setup_on(db).await;
    let w1 = worker_token(&s, "acme", "w1").await;
    let w2 = worker_token(&s, "acme", "w2").await;
    let a = s.trigger("remote-steps", json!({ "n": 1 })).await;
    let b = s.trigger("remote-steps", json!({ "n": 2 })).await;
    let mut runs = claim(&s, &w1, "w1", &["remote-steps"], 5_000).await;
    assert!(!runs.is_empty());
    let r1 = runs.remove(0);
    let r2 = if runs.is_empty() {
        claim_one(&s, &w2, "w2", "remote-steps").await
    } else {
        runs.remove(0)
    };
    let effects = Arc::new(AtomicUsize::new(0));
    let key = "prospect-7/send-email/campaign-9";
    // Both begin at once.
    let begin = |tok: String, run: Value| {
        let s = &s;
        async move {
            post(
                s,
                &tok,
                &path(&run, "actions/begin"),
                json!({ "lease_id": lease(&run), "name": "send-email", "key": key }),
            )
            .await
        }
    };
    let ((s1, d1), (s2, d2)) =
        tokio::join!(begin(w1.clone(), r1.clone()), begin(w2.clone(), r2.clone()));
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{d1} {d2}");
    let decisions = [
        d1["decision"].as_str().unwrap(),
        d2["decision"].as_str().unwrap(),
    ];
    let mut sorted = decisions;
    sorted.sort();
    assert_eq!(sorted, ["deferred", "run"], "{d1} {d2}");
    let (winner, wtok, loser, ldec) = if decisions[0] == "run" {
        (r1.clone(), w1.clone(), r2.clone(), d2.clone())
    } else {
        (r2.clone(), w2.clone(), r1.clone(), d1.clone())
    };
    assert_eq!(ldec["attempt_ended"], true);
    assert_eq!(ldec["status"], "pending");
    assert!(ldec["until"].is_string());
    // The slow service, called by the winner only.
    effects.fetch_add(1, Ordering::SeqCst);
    let (st, c) = post(
        &s,
        &wtok,
        &path(&winner, "actions/commit"),
        json!({ "lease_id": lease(&winner), "name": "send-email", "key": key, "result": { "message_id": "m-1" } }),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        c,
        json!({ "decision": "done", "result": { "message_id": "m-1" } })
    );
    let (st, _) = end(&s, &wtok, &winner, json!({ "outcome": "completed" })).await;
    assert_eq!(st, StatusCode::OK);
    // The deferred run comes back (no attempt budget spent) and finds the
    // action committed: not sent again.
    let loser_id = loser["run_id"].as_str().unwrap().to_string();
    let again = claim_one(&s, &w2, "w2", "remote-steps").await;
    assert_eq!(again["run_id"], json!(loser_id));
    let (_, d) = post(
        &s,
        &w2,
        &path(&again, "actions/begin"),
        json!({ "lease_id": lease(&again), "name": "send-email", "key": key }),
    )
    .await;
    assert_eq!(d["decision"], "committed", "{d}");
    assert_eq!(d["result"], json!({ "message_id": "m-1" }));
    let (st, _) = end(&s, &w2, &again, json!({ "outcome": "completed" })).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    for id in [&a, &b] {
        s.until(id, &["completed"]).await;
    }
    let loser_events = kinds(&events(&s, &loser_id).await);
    for k in ["action_in_flight", "duplicate_suppressed"] {
        assert!(
            loser_events.contains(&k.to_string()),
            "{k}: {loser_events:?}"
        );
    }
    let attempts = s
        .docket
        .store()
        .attempts(loser_id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        attempts[0].retry_reason.as_ref().map(|r| r.to_string()),
        Some("action_in_flight".to_string())
    );
    s.stop().await;
}

/// The outcome of an action left unknown (`timeout`) is reconciled by the
/// next attempt before anything is sent again.
#[tokio::test]
async fn an_unknown_action_is_reconciled_before_it_is_sent_again() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let body = |run: &Value, extra: Value| {
        let mut b = json!({ "lease_id": lease(run), "name": "charge", "key": "order-7/charge" });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (_, d) = post(&s, &w, &path(&run, "actions/begin"), body(&run, json!({}))).await;
    assert_eq!(d["decision"], "run");
    let (_, d) = post(
        &s,
        &w,
        &path(&run, "actions/fail"),
        body(
            &run,
            json!({ "error": { "class": "timeout", "message": "no answer in 10 s" } }),
        ),
    )
    .await;
    assert_eq!(d["decision"], "failed");
    assert_eq!(d["error"]["class"], "timeout");
    assert_eq!(d["error"]["key"], "order-7/charge");
    let ledger = s
        .docket
        .store()
        .ledger_get("acme".into(), "order-7/charge".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ledger.state, docket::LedgerState::Unknown);
    let (_, e) = end(
        &s,
        &w,
        &run,
        json!({ "outcome": "failed", "error": d["error"] }),
    )
    .await;
    assert_eq!(e["status"], "pending");
    let again = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (_, d) = post(
        &s,
        &w,
        &path(&again, "actions/begin"),
        body(&again, json!({})),
    )
    .await;
    assert_eq!(d["decision"], "reconcile", "{d}");
    let (_, d) = post(
        &s,
        &w,
        &path(&again, "actions/reconciled"),
        body(
            &again,
            json!({ "found": "committed", "result": { "charge_id": "ch_1" } }),
        ),
    )
    .await;
    assert_eq!(
        d,
        json!({ "decision": "done", "result": { "charge_id": "ch_1" } })
    );
    let ledger = s
        .docket
        .store()
        .ledger_get("acme".into(), "order-7/charge".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ledger.state, docket::LedgerState::Committed);
    let (_, e) = end(&s, &w, &again, json!({ "outcome": "completed" })).await;
    assert_eq!(e["status"], "completed");
    let ks = kinds(&events(&s, &id).await);
    assert!(ks.contains(&"action_reconciled".to_string()), "{ks:?}");
    s.stop().await;
}

/// Suspensions: waiting for input (the decision read back as
/// `input:NAME`), postponing, and an operator's cancel at the next action
/// boundary (ended by the server).
#[tokio::test]
async fn input_postpone_and_cancel_suspend_the_run() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (_, e) = end(
        &s,
        &w,
        &run,
        json!({ "outcome": "needs_input", "name": "approve", "request": { "amount": 120 } }),
    )
    .await;
    assert_eq!(e["status"], "needs_input", "{e}");
    let (st, v) = s
        .post(
            &format!("/api/runs/{id}/approve"),
            json!({ "data": { "ok": 1 } }),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (_, g) = post(
        &s,
        &w,
        &path(&run, "steps/get"),
        json!({ "lease_id": lease(&run), "name": "input:approve" }),
    )
    .await;
    assert_eq!(g["result"]["decision"], "approved", "{g}");
    assert_eq!(g["result"]["data"], json!({ "ok": 1 }));
    let (_, e) = end(
        &s,
        &w,
        &run,
        json!({ "outcome": "postponed", "until": "2099-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(e["status"], "postponed", "{e}");
    let runs = s
        .docket
        .store()
        .attempts(id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(runs.len(), 2);

    // Cancel while running: the heartbeat says so, and the next action
    // call ends the run cancelled on the server.
    let id = s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (st, _) = s.post(&format!("/api/runs/{id}/cancel"), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (_, hb) = post(
        &s,
        &w,
        "/api/worker/v1/heartbeat",
        json!({ "worker": "ts-1", "leases": [{ "run_id": id, "lease_id": lease(&run) }] }),
    )
    .await;
    assert_eq!(hb["leases"][0]["cancel_requested"], true);
    let (_, d) = post(
        &s,
        &w,
        &path(&run, "actions/begin"),
        json!({ "lease_id": lease(&run), "name": "send", "key": "k" }),
    )
    .await;
    assert_eq!(d["decision"], "cancelled", "{d}");
    assert_eq!(d["attempt_ended"], true);
    assert_eq!(d["status"], "cancelled");
    s.until(&id, &["cancelled"]).await;
    s.stop().await;
}

/// A run whose input fails the job's check is failed `invalid_input` by
/// the server at claim time and never handed out.
#[tokio::test]
async fn invalid_input_is_failed_by_the_server_at_claim() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-checked", json!({ "name": "x" })).await;
    let runs = claim(&s, &w, "ts-1", &["remote-checked"], 0).await;
    assert!(runs.is_empty(), "{runs:?}");
    let r = s.until(&id, &["failed"]).await;
    assert_eq!(r["terminal_reason"], "invalid_input");
    s.stop().await;
}

/// A claim long-polls: it answers when a run is triggered while it waits.
#[tokio::test]
async fn a_claim_waits_for_a_trigger() {
    let (s, w) = setup().await;
    let s = Arc::new(s);
    let waiting = {
        let s = s.clone();
        let w = w.clone();
        tokio::spawn(async move { claim(&s, &w, "ts-1", &["remote-steps"], 10_000).await })
    };
    // The claim is registered before the trigger: the roster shows it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ws = s
            .docket
            .store()
            .list_workers(Some("acme".into()))
            .await
            .unwrap();
        if !ws.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    let started = tokio::time::Instant::now();
    let id = s.trigger("remote-steps", json!({})).await;
    let runs = waiting.await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["run_id"], json!(id));
    // Woken by the trigger, well before the 10 s wait ran out.
    assert!(started.elapsed() < Duration::from_secs(5));
    // An empty wait answers empty at once.
    assert!(claim(&s, &w, "ts-1", &["remote-steps"], 0).await.is_empty());
    Arc::try_unwrap(s).ok().unwrap().stop().await;
}

/// Scopes and tenants, both directions: a worker token cannot read runs,
/// trigger, or act as an operator; an operator token cannot claim or
/// report; a worker token reaches only its tenant's runs.
#[tokio::test]
async fn scopes_and_tenants_are_isolated_both_ways() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-steps", json!({})).await;
    // Worker token on the operator API.
    for (m, p, body) in [
        (Method::GET, "/api/runs".to_string(), None),
        (Method::GET, format!("/api/runs/{id}"), None),
        (
            Method::POST,
            "/api/runs".to_string(),
            Some(json!({ "job": "remote-steps" })),
        ),
        (
            Method::POST,
            format!("/api/runs/{id}/cancel"),
            Some(json!({})),
        ),
        (Method::GET, "/api/workers".to_string(), None),
        (Method::GET, "/api/events".to_string(), None),
    ] {
        let (st, v) = s.call(m.clone(), &p, Some(&w), body).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{m} {p}: {v}");
        assert_eq!(v["error"]["field"], "scope", "{m} {p}: {v}");
    }
    // Operator token on the worker protocol.
    let (st, v) = post(
        &s,
        &s.a.clone(),
        "/api/worker/v1/claim",
        json!({ "worker": "x", "jobs": ["remote-steps"], "wait_ms": 0 }),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["field"], "scope");
    // No token at all.
    let (st, _) = s
        .call(
            Method::POST,
            "/api/worker/v1/claim",
            None,
            Some(json!({ "worker": "x", "jobs": ["remote-steps"] })),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Another tenant's worker sees nothing of acme's.
    let g = worker_token(&s, "globex", "globex-worker").await;
    assert!(claim(&s, &g, "g-1", &["remote-steps"], 0).await.is_empty());
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (st, v) = end(&s, &g, &run, json!({ "outcome": "completed" })).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (_, hb) = post(
        &s,
        &g,
        "/api/worker/v1/heartbeat",
        json!({ "worker": "g-1", "leases": [{ "run_id": id, "lease_id": lease(&run) }] }),
    )
    .await;
    assert_eq!(hb["leases"][0]["held"], false);
    let (st, _) = post(
        &s,
        &g,
        &path(&run, "steps/get"),
        json!({ "lease_id": lease(&run), "name": "x" }),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Still acme's and untouched.
    let (st, _) = end(&s, &w, &run, json!({ "outcome": "completed" })).await;
    assert_eq!(st, StatusCode::OK);
    // The roster is per tenant.
    let (_, ws) = s
        .call(Method::GET, "/api/workers", Some(&s.b.clone()), None)
        .await;
    assert_eq!(ws["workers"].as_array().unwrap().len(), 1, "{ws}");
    assert_eq!(ws["workers"][0]["name"], "g-1");
    s.stop().await;
}

/// Bad requests name the field; an in-process job cannot be claimed.
#[tokio::test]
async fn bad_requests_name_the_field() {
    let (s, w) = setup().await;
    let cases = [
        (json!({ "worker": "x", "jobs": ["noop"] }), "jobs[0]"),
        (json!({ "worker": "x", "jobs": ["nope"] }), "jobs[0]"),
        (json!({ "worker": "x", "jobs": [] }), "jobs"),
        (
            json!({ "worker": "bad name", "jobs": ["remote-steps"] }),
            "worker",
        ),
        (
            json!({ "worker": "x", "jobs": ["remote-steps"], "max": 0 }),
            "max",
        ),
        (
            json!({ "worker": "x", "jobs": ["remote-steps"], "wait_ms": 600000 }),
            "wait_ms",
        ),
    ];
    for (body, field) in cases {
        let (st, v) = post(&s, &w, "/api/worker/v1/claim", body.clone()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    for (body, field) in [
        (
            json!({ "lease_id": lease(&run), "outcome": "exploded" }),
            "outcome",
        ),
        (
            json!({ "lease_id": lease(&run), "outcome": "failed" }),
            "error",
        ),
        (
            json!({ "lease_id": lease(&run), "outcome": "failed", "error": { "class": "oops", "message": "m" } }),
            "error.class",
        ),
        (
            json!({ "lease_id": lease(&run), "outcome": "postponed", "until": "tomorrow" }),
            "until",
        ),
        (
            json!({ "lease_id": "not-a-uuid", "outcome": "completed" }),
            "lease_id",
        ),
    ] {
        let (st, v) = post(&s, &w, &path(&run, "end"), body.clone()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    let (st, v) = post(
        &s,
        &w,
        &path(&run, "steps/complete"),
        json!({ "lease_id": lease(&run), "name": "input:sneaky", "result": 1 }),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    s.stop().await;
}

/// No body a worker token sends to a worker route produces a 5xx, on a
/// live lease or a made-up one.
#[tokio::test]
async fn no_worker_input_produces_a_server_error() {
    let (s, w) = setup().await;
    s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let live = run["run_id"].as_str().unwrap().to_string();
    let deep = "[".repeat(5000);
    let bodies = [
        "null".to_string(),
        "[]".into(),
        "\"x\"".into(),
        "1e999".into(),
        "{}".into(),
        deep,
        json!({ "lease_id": lease(&run), "name": "", "key": "", "outcome": "completed", "level": "x",
                "current": -1, "total": 1, "message": "m", "found": "x", "worker": "w", "jobs": ["remote-steps"],
                "wait_ms": 0, "leases": [{ "run_id": "x", "lease_id": "y" }] })
        .to_string(),
        json!({ "lease_id": lease(&run), "name": "n", "key": "k", "result": deep_json(150), "output": deep_json(150),
                "data": deep_json(150), "level": "info", "message": "m", "outcome": "completed" })
        .to_string(),
    ];
    for id in [
        live.as_str(),
        "0190c3e0-0000-7000-8000-000000000000",
        "nope",
    ] {
        for call in [
            "end",
            "steps/get",
            "steps/complete",
            "steps/fail",
            "actions/begin",
            "actions/commit",
            "actions/fail",
            "actions/reconciled",
            "progress",
            "log",
        ] {
            for body in &bodies {
                let res = s
                    .http
                    .post(s.url(&format!("/api/worker/v1/runs/{id}/{call}")))
                    .bearer_auth(&w)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(
                    !res.status().is_server_error(),
                    "{call} on {id} with {body:.40}: {}",
                    res.status()
                );
            }
        }
    }
    for call in ["claim", "heartbeat"] {
        for body in &bodies {
            let res = s
                .http
                .post(s.url(&format!("/api/worker/v1/{call}")))
                .bearer_auth(&w)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert!(
                !res.status().is_server_error(),
                "{call} with {body:.40}: {}",
                res.status()
            );
        }
    }
    s.stop().await;
}

/// JSON nested `depth` levels.
fn deep_json(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

/// The claim answer carries the run's trace context, so a remote worker
/// continues the trace the run was triggered in; a run without one has
/// neither field.
async fn claim_carries_the_trace_context(db: Option<String>) {
    let (s, w) = setup_on(db).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = s
        .http
        .post(s.url("/api/runs"))
        .bearer_auth(&s.a)
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=abc")
        .json(&json!({ "job": "remote-steps", "input": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let traced: Value = res.json().await.unwrap();
    let run = claim_one(&s, &w, "w1", "remote-steps").await;
    assert_eq!(run["run_id"], traced["run"]["id"]);
    assert_eq!(run["traceparent"], traceparent, "{run}");
    assert_eq!(run["tracestate"], "vendor=abc", "{run}");

    s.post("/api/runs", json!({ "job": "remote-steps", "input": {} }))
        .await;
    let plain = claim_one(&s, &w, "w1", "remote-steps").await;
    assert_ne!(plain["run_id"], run["run_id"]);
    assert!(plain.get("traceparent").is_none(), "{plain}");
    assert!(plain.get("tracestate").is_none(), "{plain}");
    s.stop().await;
}

#[tokio::test]
async fn claim_carries_the_trace_context_sqlite() {
    claim_carries_the_trace_context(None).await;
}

#[tokio::test]
async fn claim_carries_the_trace_context_postgres() {
    if let Some(db) = postgres() {
        claim_carries_the_trace_context(Some(db)).await;
    }
}

/// A remote job's `concurrency` caps its running runs across every remote
/// worker: claims take only the free room, a claim at the limit gets
/// nothing (even two at once), and an ended run frees its place.
#[tokio::test]
async fn a_remote_jobs_concurrency_caps_claims_across_workers() {
    concurrency_caps(None).await;
}

#[tokio::test]
async fn a_remote_jobs_concurrency_caps_claims_across_workers_postgres() {
    if let Some(db) = postgres() {
        concurrency_caps(Some(db)).await;
    }
}

async fn concurrency_caps(db: Option<String>) {
    let (s, w) = setup_on(db).await;
    s.docket
        .register(Job::remote("remote-limited").retry(fast()).concurrency(2))
        .unwrap();
    for i in 0..4 {
        s.trigger("remote-limited", json!({ "i": i })).await;
    }
    let first = claim(&s, &w, "ts-1", &["remote-limited"], 0).await;
    assert_eq!(first.len(), 2, "the limit is 2: {first:?}");
    // Another worker (same tenant) at the limit: nothing, even when two
    // claim at once.
    let (a, b) = tokio::join!(
        claim(&s, &w, "ts-2", &["remote-limited"], 0),
        claim(&s, &w, "ts-3", &["remote-limited"], 0)
    );
    assert_eq!(a.len() + b.len(), 0, "{a:?} {b:?}");
    // One ends: exactly one place is free, and two racing claims share it.
    let (st, e) = end(&s, &w, &first[0], json!({ "outcome": "completed" })).await;
    assert_eq!(st, StatusCode::OK, "{e}");
    let (a, b) = tokio::join!(
        claim(&s, &w, "ts-2", &["remote-limited"], 0),
        claim(&s, &w, "ts-3", &["remote-limited"], 0)
    );
    assert_eq!(a.len() + b.len(), 1, "{a:?} {b:?}");
    // A job without a limit in the same claim is not held back.
    s.trigger("remote-steps", json!({})).await;
    let mixed = claim(&s, &w, "ts-2", &["remote-limited", "remote-steps"], 0).await;
    assert_eq!(mixed.len(), 1, "{mixed:?}");
    assert_eq!(mixed[0]["job"], "remote-steps");
    s.stop().await;
}

/// `steps/get` of a step not stored after an operator's cancel ends the
/// attempt on the server (`cancelled`, like `actions/begin`), so a worker
/// learns of the cancel before running the step; a stored step still
/// replays first.
#[tokio::test]
async fn steps_get_after_a_cancel_ends_the_attempt() {
    let (s, w) = setup().await;
    let id = s.trigger("remote-steps", json!({})).await;
    let run = claim_one(&s, &w, "ts-1", "remote-steps").await;
    let (st, v) = post(
        &s,
        &w,
        &path(&run, "steps/complete"),
        json!({ "lease_id": lease(&run), "name": "a", "result": 1 }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (st, _) = s.post(&format!("/api/runs/{id}/cancel"), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    // A stored step replays, as in-process.
    let (st, g) = post(
        &s,
        &w,
        &path(&run, "steps/get"),
        json!({ "lease_id": lease(&run), "name": "a" }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{g}");
    assert_eq!(g["found"], true, "{g}");
    assert_eq!(g["result"], 1);
    assert!(g.get("attempt_ended").is_none(), "{g}");
    // A new one does not start: the server ends the attempt.
    let (st, g) = post(
        &s,
        &w,
        &path(&run, "steps/get"),
        json!({ "lease_id": lease(&run), "name": "b" }),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{g}");
    assert_eq!(g["found"], false, "{g}");
    assert_eq!(g["decision"], "cancelled", "{g}");
    assert_eq!(g["attempt_ended"], true);
    assert_eq!(g["status"], "cancelled");
    let r = s.until(&id, &["cancelled"]).await;
    assert_eq!(r["status"], "cancelled");
    // The lease is gone: a later call is refused.
    let (st, v) = post(
        &s,
        &w,
        &path(&run, "steps/get"),
        json!({ "lease_id": lease(&run), "name": "b" }),
    )
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    s.stop().await;
}
