//! The store conformance suite: every store behaviour, written once, run
//! against every backend (River's shared driver suite is the model).
//!
//! Each function takes a fresh, empty store. A backend's test file calls
//! [`conformance_tests!`](crate::conformance_tests) with a factory and gets one
//! `#[tokio::test]` per behaviour.

use crate::*;
use docket_core::policy::RetryReason;
use docket_core::{ErrorClass, LeaseId, RunStatus, TerminalReason, Timestamp};
use serde_json::json;

/// A fixed starting instant for tests: 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp(1_767_225_600_000);

fn claim_req(now: Timestamp, limit: usize) -> ClaimRequest {
    ClaimRequest {
        tenant: None,
        jobs: vec!["job".into()],
        limit,
        now,
        lease_ms: 30_000,
        worker: "w1".into(),
    }
}

async fn one(store: &DynStore, run: NewRun) -> Run {
    store.trigger(vec![run], T0).await.unwrap().remove(0).run
}

/// An operator (`op`) cancels `run` at `now`.
pub(crate) async fn cancel(store: &DynStore, run: RunId, now: Timestamp) {
    store
        .operator(OperatorRequest {
            run_id: run,
            actor: "op".into(),
            comment: None,
            now,
            command: OperatorCommand::Cancel,
        })
        .await
        .unwrap();
}

/// The events of `run`, in order.
pub(crate) async fn events_of(store: &DynStore, run: RunId) -> Vec<EventRecord> {
    store
        .events(EventFilter {
            run_id: Some(run),
            ..Default::default()
        })
        .await
        .unwrap()
}

fn err_info(class: ErrorClass) -> ErrorInfo {
    ErrorInfo {
        class,
        message: format!("{class} happened"),
        fingerprint: "fp".into(),
        failure_key: "fk".into(),
        action: None,
    }
}

async fn kinds(store: &DynStore, run: RunId) -> Vec<String> {
    events_of(store, run)
        .await
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

/// Trigger stores the run as given and writes `run_triggered`.
pub async fn trigger_stores_run_and_event(store: DynStore) {
    let mut n = NewRun::new("job", json!({"to": "a@example.com"}));
    n.correlation_id = Some("corr-1".into());
    n.priority = 3;
    let t = store.trigger(vec![n.clone()], T0).await.unwrap();
    assert_eq!(t.len(), 1);
    assert!(!t[0].existing);
    let run = store.get_run(n.id).await.unwrap().expect("run stored");
    assert_eq!(run.status, RunStatus::Pending);
    assert_eq!(run.input, json!({"to": "a@example.com"}));
    assert_eq!(run.variables, json!({}));
    assert_eq!(run.run_after, T0);
    assert_eq!(run.attempt, 0);
    assert_eq!(run.priority, 3);
    assert_eq!(run.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(run.tenant, DEFAULT_TENANT);
    assert_eq!(kinds(&store, n.id).await, ["run_triggered"]);
    assert!(store.get_run(RunId::new()).await.unwrap().is_none());
}

/// The trace context a run was triggered in reads back as given, through
/// every read (trigger answer, get, list, claim), in one batch with a run
/// without one (the PostgreSQL trigger is one set-based statement).
pub async fn trace_context_round_trips(store: DynStore) {
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut with_state = NewRun::new("job", json!(1));
    with_state.trace = Some(TraceContext {
        traceparent: traceparent.into(),
        tracestate: Some("vendor=abc,other=1".into()),
    });
    let mut parent_only = NewRun::new("job", json!(2));
    parent_only.trace = Some(TraceContext {
        traceparent: traceparent.into(),
        tracestate: None,
    });
    let without = NewRun::new("job", json!(3));
    let batch = vec![with_state.clone(), parent_only.clone(), without.clone()];
    let t = store.trigger(batch.clone(), T0).await.unwrap();
    for (given, got) in batch.iter().zip(&t) {
        assert_eq!(got.run.trace, given.trace, "trigger answer");
        let read = store.get_run(given.id).await.unwrap().unwrap();
        assert_eq!(read.trace, given.trace, "get_run");
    }
    let listed = store.list_runs(RunFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 3);
    for r in &listed {
        let given = batch.iter().find(|n| n.id == r.id).unwrap();
        assert_eq!(r.trace, given.trace, "list_runs");
    }
    let claimed = store.claim(claim_req(T0, 10)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    for r in &claimed {
        let given = batch.iter().find(|n| n.id == r.id).unwrap();
        assert_eq!(r.trace, given.trace, "claim");
    }
}

fn keyed(job: &str, key: &str, limit: u32, at: i64) -> NewRun {
    let mut n = NewRun::new(job, json!({ "at": at }));
    n.run_after = Some(T0.plus_millis(at));
    n.concurrency = Some(ConcurrencyKey {
        key: key.into(),
        limit,
    });
    n
}

fn end_with(run: &Run, now: Timestamp, outcome: Outcome) -> AttemptEnd {
    AttemptEnd {
        run_id: run.id,
        lease_id: run.lease_id.expect("a claimed run"),
        now,
        outcome,
    }
}

fn ids(runs: &[Run]) -> Vec<RunId> {
    runs.iter().map(|r| r.id).collect()
}

/// A concurrency key's limit holds: at most `limit` runs of a key run at
/// once, the rest stay pending (no attempt spent, one `run_held` event per
/// episode), other keys and unkeyed runs are not held up, and a freed slot
/// goes to the key's next run in claim order.
pub async fn concurrency_key_limits_running_runs_in_claim_order(store: DynStore) {
    let a: Vec<NewRun> = (0..5).map(|i| keyed("job", "acme/42", 2, i)).collect();
    let b = keyed("job", "acme/43", 2, 10);
    let free = NewRun::new("job", json!("free"));
    let mut all = a.clone();
    all.push(b.clone());
    all.push(free.clone());
    let t = store.trigger(all, T0).await.unwrap();
    assert_eq!(
        t[0].run.concurrency,
        Some(ConcurrencyKey {
            key: "acme/42".into(),
            limit: 2
        })
    );
    assert_eq!(t[6].run.concurrency, None);
    let now = T0.plus_millis(100);
    let first = store.claim(claim_req(now, 10)).await.unwrap();
    let got = ids(&first);
    // Keyed runs first (two of acme/42 in claim order, acme/43's one), then
    // the unkeyed run.
    assert_eq!(got, vec![a[0].id, a[1].id, b.id, free.id]);
    for held in &a[2..] {
        let r = store.get_run(held.id).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Pending);
        assert_eq!(r.attempt, 0, "a held run spends no attempt");
        assert_eq!(kinds(&store, held.id).await, ["run_triggered", "run_held"]);
    }
    let ev = store
        .events(EventFilter {
            run_id: Some(a[2].id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ev[1].data["message"],
        json!("held by concurrency key acme/42: 2 of 2 running")
    );
    // Claiming again finds the key full: nothing, and no second event.
    assert!(store.claim(claim_req(now, 10)).await.unwrap().is_empty());
    assert_eq!(kinds(&store, a[2].id).await, ["run_triggered", "run_held"]);
    // next_due does not report held runs (an idle worker would spin).
    assert_eq!(store.next_due(vec!["job".into()]).await.unwrap(), None);
    // A completion frees a slot: the key's next run in claim order.
    let done = store
        .finish(vec![end_with(
            &first[0],
            now,
            Outcome::Completed { output: json!(1) },
        )])
        .await
        .unwrap();
    assert_eq!(done[0].as_ref().unwrap(), &RunStatus::Completed);
    assert_eq!(
        store.next_due(vec!["job".into()]).await.unwrap(),
        Some(T0.plus_millis(2))
    );
    let next = store.claim(claim_req(now, 10)).await.unwrap();
    assert_eq!(ids(&next), vec![a[2].id]);
    // Its episode ended with the claim: held again later, it gets a new event.
    assert_eq!(
        kinds(&store, a[2].id).await,
        ["run_triggered", "run_held", "attempt_started"]
    );
}

/// Every way a keyed run leaves `running` frees its slot: a postponement,
/// a release, a cancel, a terminal failure, and an expired lease reaped.
pub async fn concurrency_key_slot_frees_on_every_exit(store: DynStore) {
    let runs: Vec<NewRun> = (0..7).map(|i| keyed("job", "k", 1, i)).collect();
    store.trigger(runs.clone(), T0).await.unwrap();
    let mut now = T0.plus_millis(100);
    let exits: Vec<Outcome> = vec![
        Outcome::Postponed {
            until: T0.plus_millis(1_000_000),
        },
        Outcome::Released,
        Outcome::Cancelled,
        Outcome::Failed {
            error: Some(err_info(ErrorClass::Permanent)),
            reason: TerminalReason::PermanentError,
            detail: "no".into(),
        },
    ];
    let mut order = Vec::new();
    for exit in exits {
        let c = store.claim(claim_req(now, 10)).await.unwrap();
        assert_eq!(c.len(), 1, "limit 1");
        assert!(store.claim(claim_req(now, 10)).await.unwrap().is_empty());
        order.push(c[0].id);
        // A released run is due again at once (`run_after` = now), so it
        // queues behind the runs due before it.
        let r = store
            .finish(vec![end_with(&c[0], now, exit)])
            .await
            .unwrap();
        assert!(r[0].is_ok(), "{r:?}");
        now = now.plus_millis(1);
    }
    // The lease expires and a reaper ends it: the slot frees.
    let c = store.claim(claim_req(now, 10)).await.unwrap();
    assert_eq!(c.len(), 1);
    order.push(c[0].id);
    let later = now.plus_millis(30_000);
    assert!(store.claim(claim_req(later, 10)).await.unwrap().is_empty());
    let expired = store.expired_leases(later, 10).await.unwrap();
    assert_eq!(ids(&expired), vec![c[0].id]);
    store
        .reap(expired.iter().map(|r| reap_end(r, later)).collect())
        .await
        .unwrap();
    let c = store.claim(claim_req(later, 10)).await.unwrap();
    assert_eq!(c.len(), 1);
    order.push(c[0].id);
    let want: Vec<RunId> = runs.iter().take(6).map(|r| r.id).collect();
    assert_eq!(order, want, "claimed one at a time, in claim order");
}

/// Many claims at once never take more than a key's limit, on a backend
/// with many connections (PostgreSQL: each claim locks the key before it
/// counts); every run is eventually claimed.
pub async fn concurrency_key_holds_under_racing_claims(store: DynStore) {
    let runs: Vec<NewRun> = (0..40)
        .map(|i| keyed("job", if i % 2 == 0 { "even" } else { "odd" }, 2, i))
        .collect();
    store.trigger(runs, T0).await.unwrap();
    let now = T0.plus_millis(100);
    let mut done = 0;
    while done < 40 {
        let claims = (0..6).map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.claim(claim_req(now, 3)).await.unwrap() })
        });
        let mut got: Vec<Run> = Vec::new();
        for c in claims {
            got.extend(c.await.unwrap());
        }
        let running = store
            .list_runs(RunFilter {
                statuses: vec![RunStatus::Running],
                limit: 100,
                ..RunFilter::default()
            })
            .await
            .unwrap();
        for key in ["even", "odd"] {
            let n = running
                .iter()
                .filter(|r| r.concurrency.as_ref().is_some_and(|k| k.key == key))
                .count();
            assert!(n <= 2, "{n} runs of {key} running at once");
        }
        assert!(!got.is_empty(), "a free key's runs are claimable");
        let ends: Vec<AttemptEnd> = got
            .iter()
            .map(|r| {
                end_with(
                    r,
                    now,
                    Outcome::Completed {
                        output: json!(null),
                    },
                )
            })
            .collect();
        done += ends.len();
        store.finish(ends).await.unwrap();
    }
}

/// A second trigger with the same (tenant, job, key) returns the first run.
pub async fn idempotency_key_returns_existing_run(store: DynStore) {
    let mut a = NewRun::new("job", json!(1));
    a.idempotency_key = Some("k".into());
    let mut b = NewRun::new("job", json!(2));
    b.idempotency_key = Some("k".into());
    let mut other_tenant = b.clone();
    other_tenant.id = RunId::new();
    other_tenant.tenant = "t2".into();
    let first = store.trigger(vec![a.clone()], T0).await.unwrap().remove(0);
    let out = store
        .trigger(vec![b.clone(), other_tenant.clone()], T0)
        .await
        .unwrap();
    assert!(!first.existing);
    assert!(out[0].existing);
    assert_eq!(out[0].run.id, a.id);
    assert_eq!(out[0].run.input, json!(1));
    assert!(!out[1].existing, "keys are per tenant");
    assert!(store.get_run(b.id).await.unwrap().is_none());
}

/// Claim takes only due runs, in priority, run_after, id order, and writes
/// the attempt row and `attempt_started` in the same transaction.
pub async fn claim_order_and_eligibility(store: DynStore) {
    let mut low = NewRun::new("job", json!("low"));
    low.priority = 0;
    let mut high = NewRun::new("job", json!("high"));
    high.priority = 5;
    let mut later = NewRun::new("job", json!("later"));
    later.run_after = Some(T0.plus_millis(1_000));
    let other = NewRun::new("other-job", json!("other"));
    store
        .trigger(
            vec![low.clone(), high.clone(), later.clone(), other.clone()],
            T0,
        )
        .await
        .unwrap();
    let got = store.claim(claim_req(T0, 10)).await.unwrap();
    let ids: Vec<_> = got.iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        [high.id, low.id],
        "priority first, future and other jobs excluded"
    );
    for r in &got {
        assert_eq!(r.status, RunStatus::Running);
        assert_eq!(r.attempt, 1);
        assert!(r.lease_id.is_some());
        assert_eq!(r.lease_expires_at, Some(T0.plus_millis(30_000)));
        assert_eq!(r.worker.as_deref(), Some("w1"));
        let att = store.attempts(r.id).await.unwrap();
        assert_eq!(att.len(), 1);
        assert_eq!(att[0].outcome, "running");
        assert_eq!(Some(att[0].lease_id), r.lease_id);
        assert_eq!(
            kinds(&store, r.id).await,
            ["run_triggered", "attempt_started"]
        );
    }
    assert!(store.claim(claim_req(T0, 10)).await.unwrap().is_empty());
    assert!(store
        .claim(claim_req(T0.plus_millis(999), 10))
        .await
        .unwrap()
        .is_empty());
    let got = store
        .claim(claim_req(T0.plus_millis(1_000), 10))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, later.id);
    assert_eq!(
        store.next_due(vec!["other-job".into()]).await.unwrap(),
        Some(T0)
    );
    assert_eq!(store.next_due(vec!["job".into()]).await.unwrap(), None);
}

/// Claim honours its limit, and equal-priority runs go by run_after then id.
pub async fn claim_limit_and_fifo(store: DynStore) {
    let runs: Vec<NewRun> = (0..5).map(|i| NewRun::new("job", json!(i))).collect();
    store.trigger(runs.clone(), T0).await.unwrap();
    let a = store.claim(claim_req(T0, 2)).await.unwrap();
    let b = store.claim(claim_req(T0, 10)).await.unwrap();
    let got: Vec<_> = a.iter().chain(b.iter()).map(|r| r.id).collect();
    assert_eq!(got, runs.iter().map(|r| r.id).collect::<Vec<_>>());
    assert_eq!(a.len(), 2);
}

/// Completion under the live lease completes; under any other it is refused,
/// recorded, and changes nothing.
pub async fn completion_is_fenced_by_lease(store: DynStore) {
    let n = NewRun::new("job", json!({}));
    one(&store, n.clone()).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let lease = run.lease_id.unwrap();
    let stale = store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: LeaseId::new(),
            now: T0.plus_millis(5),
            outcome: Outcome::Completed {
                output: json!("stale"),
            },
        }])
        .await
        .unwrap();
    assert!(matches!(
        stale[0],
        Err(StoreError::StaleLease {
            status: RunStatus::Running,
            ..
        })
    ));
    let still = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(still.status, RunStatus::Running);
    assert_eq!(still.output, None);
    let ok = store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: lease,
            now: T0.plus_millis(10),
            outcome: Outcome::Completed {
                output: json!({"sent": true}),
            },
        }])
        .await
        .unwrap();
    assert_eq!(ok[0].as_ref().unwrap(), &RunStatus::Completed);
    let done = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.output, Some(json!({"sent": true})));
    assert_eq!(done.finished_at, Some(T0.plus_millis(10)));
    assert_eq!(done.lease_id, None);
    // The same lease cannot write twice either.
    let again = store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: lease,
            now: T0.plus_millis(11),
            outcome: Outcome::Released,
        }])
        .await
        .unwrap();
    assert!(matches!(
        again[0],
        Err(StoreError::StaleLease {
            status: RunStatus::Completed,
            ..
        })
    ));
    assert_eq!(
        kinds(&store, n.id).await,
        [
            "run_triggered",
            "attempt_started",
            "stale_write_refused",
            "run_completed",
            "stale_write_refused"
        ]
    );
    let att = store.attempts(n.id).await.unwrap();
    assert_eq!(att[0].outcome, "completed");
    assert_eq!(att[0].finished_at, Some(T0.plus_millis(10)));
}

/// A retry writes the policy's decision on the attempt, sets run_after, and
/// writes `attempt_failed` then `retry_scheduled`, atomically.
pub async fn retry_records_the_decision(store: DynStore) {
    let n = NewRun::new("job", json!({}));
    one(&store, n.clone()).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let eligible = T0.plus_millis(1_234);
    let st = store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: run.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Retry {
                error: err_info(ErrorClass::Timeout),
                retry: RetryRecord {
                    policy: "p".into(),
                    delay_ms: 1_234,
                    eligible_at: eligible,
                    reason: RetryReason::Backoff,
                },
            },
        }])
        .await
        .unwrap();
    assert_eq!(st[0].as_ref().unwrap(), &RunStatus::Pending);
    let r = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.run_after, eligible);
    assert_eq!(r.last_error_class, Some(ErrorClass::Timeout));
    assert!(r.is_retry_scheduled(T0));
    let a = &store.attempts(n.id).await.unwrap()[0];
    assert_eq!(a.outcome, "failed");
    assert_eq!(a.error_class, Some(ErrorClass::Timeout));
    assert_eq!(a.retry_policy.as_deref(), Some("p"));
    assert_eq!(a.delay_ms, Some(1_234));
    assert_eq!(a.eligible_at, Some(eligible));
    assert_eq!(a.retry_reason, Some(RetryReason::Backoff));
    assert_eq!(a.fingerprint.as_deref(), Some("fp"));
    assert_eq!(
        kinds(&store, n.id).await,
        [
            "run_triggered",
            "attempt_started",
            "attempt_failed",
            "retry_scheduled"
        ]
    );
    // The decision's event carries the same fields on every backend.
    let evs = store
        .events(EventFilter {
            run_id: Some(n.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let data = &evs
        .iter()
        .find(|e| e.kind == "retry_scheduled")
        .unwrap()
        .data;
    assert_eq!(
        data,
        &json!({ "retry_policy": "p", "delay_ms": 1_234, "eligible_at": eligible,
                 "reason": "backoff", "next_attempt": 2 })
    );
    let failed = &evs
        .iter()
        .find(|e| e.kind == "attempt_failed")
        .unwrap()
        .data;
    assert_eq!(failed["error_class"], "timeout");
    assert_eq!(failed["fingerprint"], "fp");
    assert!(store
        .claim(claim_req(eligible.plus_millis(-1), 1))
        .await
        .unwrap()
        .is_empty());
    let again = store.claim(claim_req(eligible, 1)).await.unwrap();
    assert_eq!(again[0].attempt, 2);
    assert_ne!(again[0].lease_id, run.lease_id);
}

fn rate_req(holder: &str, limit: docket_core::RateLimit, at: i64) -> RateTakeRequest {
    RateTakeRequest {
        key: "connection:crm".into(),
        holder: holder.into(),
        limit,
        now: T0.plus_millis(at),
    }
}

/// A bucket grants its burst, then reserves one token per taker at its due
/// time; a holder coming back early is told the same time, on time goes
/// ahead on its reservation (the bucket untouched), and a second take
/// afterwards reserves anew.
pub async fn rate_buckets_take_reserve_and_use_reservations(store: DynStore) {
    let l = docket_core::RateLimit::new(10.0, 2).unwrap();
    let take = |h: &str, at: i64| store.rate_take(rate_req(h, l, at));
    let deferred = |at: i64| RateTake::Deferred {
        until: T0.plus_millis(at),
    };
    assert_eq!(take("h1", 0).await.unwrap(), RateTake::Granted);
    assert_eq!(take("h2", 0).await.unwrap(), RateTake::Granted);
    assert_eq!(take("h3", 0).await.unwrap(), deferred(100));
    assert_eq!(take("h3", 50).await.unwrap(), deferred(100));
    assert_eq!(take("h4", 0).await.unwrap(), deferred(200));
    assert_eq!(take("h3", 100).await.unwrap(), RateTake::Granted);
    // h3's reservation is used: at 100 ms the bucket is 1 token in debt
    // (h4's), so h3's next take reserves the token due at 300 ms.
    assert_eq!(take("h3", 100).await.unwrap(), deferred(300));
    let rows = store.rate_buckets("connection:".into()).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].key.as_str(), rows[0].reserved, rows[0].limit),
        ("connection:crm", 2, l)
    );
    assert_eq!(
        (rows[0].tokens, rows[0].refilled_at),
        (-2 * docket_core::rate::TOKEN, T0.plus_millis(100))
    );
    assert!(store.rate_buckets("job:".into()).await.unwrap().is_empty());
}

/// Takers racing for one bucket (on PostgreSQL, on several connections)
/// never share a token: exactly `burst` are granted and every other taker
/// gets its own due time.
pub async fn rate_takes_race_without_losing_tokens(store: DynStore) {
    let l = docket_core::RateLimit::new(1.0, 10).unwrap();
    let takes: Vec<_> = (0..30)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.rate_take(rate_req(&format!("h{i}"), l, 0)).await })
        })
        .collect();
    let mut granted = 0;
    let mut dues = Vec::new();
    for t in takes {
        match t.await.unwrap().unwrap() {
            RateTake::Granted => granted += 1,
            RateTake::Deferred { until } => dues.push(until.millis_since(T0)),
        }
    }
    dues.sort();
    assert_eq!(granted, 10);
    assert_eq!(dues, (1..=20).map(|s| s * 1_000).collect::<Vec<_>>());
}

/// A batch of takes answers what the same takes one after another would,
/// in the caller's order, across several buckets and with one holder twice
/// (its second take sees its first); batches racing from several
/// connections over two shared buckets (locked in opposite request order)
/// neither deadlock nor share a token.
pub async fn rate_take_many_is_takes_in_order_and_races_safely(store: DynStore) {
    let l = docket_core::RateLimit::new(10.0, 2).unwrap();
    let req = |key: &str, h: &str, at: i64| RateTakeRequest {
        key: key.into(),
        holder: h.into(),
        limit: l,
        now: T0.plus_millis(at),
    };
    let deferred = |at: i64| RateTake::Deferred {
        until: T0.plus_millis(at),
    };
    let got = store
        .rate_take_many(vec![
            req("job:b", "h1", 0),
            req("job:a", "h1", 0),
            req("job:b", "h2", 0),
            req("job:b", "h3", 0),
            req("job:b", "h3", 50),
            req("job:a", "h2", 0),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![
            RateTake::Granted,
            RateTake::Granted,
            RateTake::Granted,
            deferred(100),
            deferred(100),
            RateTake::Granted,
        ]
    );
    assert_eq!(store.rate_take_many(Vec::new()).await.unwrap(), Vec::new());
    let rows = store.rate_buckets("job:".into()).await.unwrap();
    let seen: Vec<(&str, u64)> = rows.iter().map(|r| (r.key.as_str(), r.reserved)).collect();
    assert_eq!(seen, vec![("job:a", 0), ("job:b", 1)]);

    // Racing batches: 10 tokens per bucket, 12 batches of 2 takes (one
    // per bucket, half of them listing "y" first).
    let l = docket_core::RateLimit::new(1.0, 10).unwrap();
    let req = |key: &str, h: String| RateTakeRequest {
        key: key.into(),
        holder: h,
        limit: l,
        now: T0,
    };
    let batches: Vec<_> = (0..12)
        .map(|i| {
            let store = store.clone();
            let (x, y) = (req("job:x", format!("h{i}")), req("job:y", format!("h{i}")));
            let reqs = if i % 2 == 0 { vec![x, y] } else { vec![y, x] };
            tokio::spawn(async move { store.rate_take_many(reqs).await })
        })
        .collect();
    let mut granted = 0;
    let mut dues = Vec::new();
    for b in batches {
        for t in b.await.unwrap().unwrap() {
            match t {
                RateTake::Granted => granted += 1,
                RateTake::Deferred { until } => dues.push(until.millis_since(T0)),
            }
        }
    }
    dues.sort();
    assert_eq!(granted, 20);
    assert_eq!(dues, vec![1_000, 1_000, 2_000, 2_000]);
}

/// A breaker's state changes are read-modify-writes under a lock: racing
/// updates (on PostgreSQL, on several connections) each see the previous
/// one's state; an update that answers `None` writes nothing.
pub async fn breaker_updates_apply_one_after_another(store: DynStore) {
    assert_eq!(store.breaker_get("crm".into()).await.unwrap(), None);
    let unchanged = store
        .breaker_update(
            "crm".into(),
            T0,
            Box::new(|old| {
                assert_eq!(old, None);
                None
            }),
        )
        .await
        .unwrap();
    assert_eq!(unchanged, None);
    assert_eq!(store.breaker_get("crm".into()).await.unwrap(), None);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .breaker_update(
                        "crm".into(),
                        T0.plus_millis(i),
                        Box::new(|old| {
                            let n = old.map_or(0, |v| v["n"].as_i64().unwrap());
                            Some(json!({ "n": n + 1 }))
                        }),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().unwrap()["n"].as_i64().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
    let row = store.breaker_get("crm".into()).await.unwrap().unwrap();
    assert_eq!(row.state, json!({ "n": 20 }));
    let kept = store
        .breaker_update("crm".into(), T0.plus_millis(99), Box::new(|_| None))
        .await
        .unwrap();
    assert_eq!(kept, Some(json!({ "n": 20 })));
    assert!(store.breaker_get("other".into()).await.unwrap().is_none());
}

/// A circuit breaker's deferral is a retry decision that sent nothing: the
/// attempt ends `deferred` (not `failed`), with an `attempt_deferred` event
/// instead of `attempt_failed`, and spends no attempt budget.
pub async fn circuit_deferral_is_not_a_failure(store: DynStore) {
    let n = NewRun::new("job", json!({}));
    one(&store, n.clone()).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let until = T0.plus_millis(30_000);
    store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: run.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Retry {
                error: err_info(ErrorClass::Unavailable),
                retry: RetryRecord {
                    policy: "circuit_breaker:crm".into(),
                    delay_ms: 30_000,
                    eligible_at: until,
                    reason: RetryReason::CircuitOpen,
                },
            },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let r = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.run_after, until);
    assert_eq!(r.attempts_forgiven, 1);
    let a = &store.attempts(n.id).await.unwrap()[0];
    assert_eq!(a.outcome, "deferred");
    assert_eq!(a.retry_reason, Some(RetryReason::CircuitOpen));
    assert_eq!(
        kinds(&store, n.id).await,
        [
            "run_triggered",
            "attempt_started",
            "attempt_deferred",
            "retry_scheduled"
        ]
    );
}

/// A terminal failure ends the run with its reason.
pub async fn terminal_failure_records_reason(store: DynStore) {
    let n = NewRun::new("job", json!({}));
    one(&store, n.clone()).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: run.lease_id.unwrap(),
            now: T0.plus_millis(3),
            outcome: Outcome::Failed {
                error: Some(err_info(ErrorClass::InvalidInput)),
                reason: TerminalReason::InvalidInput,
                detail: "field `to` missing".into(),
            },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let r = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.terminal_reason, Some(TerminalReason::InvalidInput));
    assert_eq!(r.finished_at, Some(T0.plus_millis(3)));
    assert_eq!(
        kinds(&store, n.id).await,
        [
            "run_triggered",
            "attempt_started",
            "attempt_failed",
            "run_failed"
        ]
    );
    let ev = store
        .events(EventFilter {
            run_id: Some(n.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ev[3].data["reason"], "invalid_input");
    assert!(store
        .claim(claim_req(T0.plus_millis(1_000_000), 1))
        .await
        .unwrap()
        .is_empty());
}

/// Heartbeats extend live leases, report lost ones, and carry cancel requests.
pub async fn heartbeat_extends_and_detects_loss(store: DynStore) {
    one(&store, NewRun::new("job", json!({}))).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let live = LeaseRef {
        run_id: run.id,
        lease_id: run.lease_id.unwrap(),
    };
    let lost = LeaseRef {
        run_id: run.id,
        lease_id: LeaseId::new(),
    };
    let st = store
        .heartbeat(vec![live, lost], T0.plus_millis(60_000))
        .await
        .unwrap();
    assert_eq!(
        st,
        [
            LeaseState {
                held: true,
                cancel_requested: false
            },
            LeaseState {
                held: false,
                cancel_requested: false
            }
        ]
    );
    let r = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(r.lease_expires_at, Some(T0.plus_millis(60_000)));
    assert!(store
        .expired_leases(T0.plus_millis(59_999), 10)
        .await
        .unwrap()
        .is_empty());
    let exp = store
        .expired_leases(T0.plus_millis(60_000), 10)
        .await
        .unwrap();
    assert_eq!(exp.len(), 1);
    assert_eq!(exp[0].id, run.id);
}

/// An expired lease goes through the retry path with class lease_expired,
/// and the late worker's completion is then refused.
pub async fn expired_lease_retry_then_stale_completion(store: DynStore) {
    one(&store, NewRun::new("job", json!({}))).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let lease = run.lease_id.unwrap();
    let now = T0.plus_millis(30_000);
    store
        .finish(vec![AttemptEnd {
            run_id: run.id,
            lease_id: lease,
            now,
            outcome: Outcome::Retry {
                error: err_info(ErrorClass::LeaseExpired),
                retry: RetryRecord {
                    policy: "p".into(),
                    delay_ms: 500,
                    eligible_at: now.plus_millis(500),
                    reason: RetryReason::Backoff,
                },
            },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(
        store.claim(claim_req(now, 1)).await.unwrap().is_empty(),
        "no immediate re-dispatch"
    );
    let second = store
        .claim(claim_req(now.plus_millis(500), 1))
        .await
        .unwrap()
        .remove(0);
    let late = store
        .finish(vec![AttemptEnd {
            run_id: run.id,
            lease_id: lease,
            now: now.plus_millis(600),
            outcome: Outcome::Completed { output: json!(1) },
        }])
        .await
        .unwrap();
    assert!(matches!(late[0], Err(StoreError::StaleLease { .. })));
    let r = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Running);
    assert_eq!(r.lease_id, second.lease_id);
    let att = store.attempts(run.id).await.unwrap();
    assert_eq!(att[0].outcome, "lease_expired");
    assert_eq!(att[1].outcome, "running");
    let k = kinds(&store, run.id).await;
    assert_eq!(
        k,
        [
            "run_triggered",
            "attempt_started",
            "lease_expired",
            "attempt_failed",
            "retry_scheduled",
            "attempt_started",
            "stale_write_refused"
        ]
    );
}

/// A refused failure report is evidence: its `stale_write_refused` event
/// carries the end's error class, message, action and fingerprint (a late
/// report of an attempt whose lease expired is how forensics see a lease
/// overlap), with the run's current status, lease and attempt — the same
/// payload on every backend, for a refused `Retry` and a refused `Failed`.
pub async fn stale_failure_reports_keep_their_error(store: DynStore) {
    one(&store, NewRun::new("job", json!({}))).await;
    let first = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let old = first.lease_id.unwrap();
    // The lease is gone (a release), then the old attempt reports a retry.
    store
        .finish(vec![AttemptEnd {
            run_id: first.id,
            lease_id: old,
            now: T0.plus_millis(10),
            outcome: Outcome::Released,
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let error = ErrorInfo {
        class: ErrorClass::Unavailable,
        message: "HTTP 503 from crm".into(),
        fingerprint: "fp-503".into(),
        failure_key: "fk".into(),
        action: Some("send_email".into()),
    };
    let late_retry = AttemptEnd {
        run_id: first.id,
        lease_id: old,
        now: T0.plus_millis(20),
        outcome: Outcome::Retry {
            error: error.clone(),
            retry: RetryRecord {
                policy: "p".into(),
                delay_ms: 500,
                eligible_at: T0.plus_millis(520),
                reason: RetryReason::Backoff,
            },
        },
    };
    let res = store.finish(vec![late_retry]).await.unwrap();
    assert!(
        matches!(res[0], Err(StoreError::StaleLease { .. })),
        "{res:?}"
    );
    // Another attempt holds the run; the old one reports a terminal failure,
    // then one without an error (unresolved).
    let second = store
        .claim(claim_req(T0.plus_millis(30), 1))
        .await
        .unwrap()
        .remove(0);
    let late_failed = |error: Option<ErrorInfo>, at: i64| AttemptEnd {
        run_id: first.id,
        lease_id: old,
        now: T0.plus_millis(at),
        outcome: Outcome::Failed {
            error,
            reason: TerminalReason::MaxRetriesExhausted,
            detail: "gave up".into(),
        },
    };
    let res = store
        .finish(vec![late_failed(Some(error), 40)])
        .await
        .unwrap();
    assert!(
        matches!(res[0], Err(StoreError::StaleLease { .. })),
        "{res:?}"
    );
    let res = store.finish(vec![late_failed(None, 50)]).await.unwrap();
    assert!(
        matches!(res[0], Err(StoreError::StaleLease { .. })),
        "{res:?}"
    );

    let refused: Vec<_> = store
        .events(EventFilter {
            run_id: Some(first.id),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "stale_write_refused")
        .map(|e| (e.at, e.lease_id, e.data))
        .collect();
    let reported = |attempted: &str, status: &str, lease: Option<LeaseId>, attempt: u32| {
        json!({
            "attempted": attempted,
            "current_status": status,
            "current_lease_id": lease,
            "current_attempt": attempt,
            "error_class": "unavailable",
            "message": "HTTP 503 from crm",
            "action": "send_email",
            "fingerprint": "fp-503",
        })
    };
    assert_eq!(
        refused,
        [
            (
                T0.plus_millis(20),
                Some(old),
                reported("retry_scheduled", "pending", None, 1)
            ),
            (
                T0.plus_millis(40),
                Some(old),
                reported("failed", "running", second.lease_id, 2)
            ),
            (
                T0.plus_millis(50),
                Some(old),
                json!({
                    "attempted": "failed",
                    "current_status": "running",
                    "current_lease_id": second.lease_id,
                    "current_attempt": 2,
                })
            ),
        ]
    );
}

/// Release, postpone and input requests leave the run resumable and spend no
/// attempt budget.
pub async fn release_postpone_and_input_forgive_attempts(store: DynStore) {
    let n = NewRun::new("job", json!({}));
    one(&store, n.clone()).await;
    let r1 = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: r1.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Released,
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let r2 = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    assert_eq!(r2.attempt, 2);
    assert_eq!(r2.policy_attempt(), 1);
    let until = T0.plus_millis(10_000);
    store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: r2.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Postponed { until },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let p = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(p.status, RunStatus::Postponed);
    assert!(store
        .claim(claim_req(until.plus_millis(-1), 1))
        .await
        .unwrap()
        .is_empty());
    let r3 = store.claim(claim_req(until, 1)).await.unwrap().remove(0);
    assert_eq!(r3.policy_attempt(), 1);
    store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: r3.lease_id.unwrap(),
            now: until,
            outcome: Outcome::NeedsInput {
                name: "approval".into(),
                request: json!({"amount": 1200}),
            },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let w = store.get_run(n.id).await.unwrap().unwrap();
    assert_eq!(w.status, RunStatus::NeedsInput);
    assert_eq!(
        w.input_request,
        Some(json!({"name": "approval", "request": {"amount": 1200}}))
    );
    assert!(store
        .claim(claim_req(until.plus_millis(1_000_000), 1))
        .await
        .unwrap()
        .is_empty());
    let att: Vec<_> = store
        .attempts(n.id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(att, ["released", "postponed", "needs_input"]);
}

/// Several ends in one call: each is its own unit; a stale one does not
/// spoil the others.
pub async fn batched_finish_isolates_each_end(store: DynStore) {
    let runs: Vec<NewRun> = (0..3).map(|i| NewRun::new("job", json!(i))).collect();
    store.trigger(runs, T0).await.unwrap();
    let claimed = store.claim(claim_req(T0, 3)).await.unwrap();
    let mut ends: Vec<AttemptEnd> = claimed
        .iter()
        .map(|r| AttemptEnd {
            run_id: r.id,
            lease_id: r.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Completed {
                output: json!(null),
            },
        })
        .collect();
    ends[1].lease_id = LeaseId::new();
    // An end for a run that does not exist fails in its own slot too.
    let ghost = RunId::new();
    ends.push(AttemptEnd {
        run_id: ghost,
        lease_id: LeaseId::new(),
        now: T0,
        outcome: Outcome::Completed {
            output: json!(null),
        },
    });
    let res = store.finish(ends).await.unwrap();
    assert_eq!(res.len(), 4);
    assert!(res[0].is_ok() && res[2].is_ok());
    assert!(matches!(res[1], Err(StoreError::StaleLease { .. })));
    assert!(
        matches!(res[3], Err(StoreError::NotFound(id)) if id == ghost),
        "{:?}",
        res[3]
    );
    let statuses: Vec<_> = futures_lite_join(&store, claimed.iter().map(|r| r.id).collect()).await;
    assert_eq!(
        statuses,
        [
            RunStatus::Completed,
            RunStatus::Running,
            RunStatus::Completed
        ]
    );
}

/// A reaper's verdict on an expired lease, as the engine builds it.
fn reap_end(run: &Run, now: Timestamp) -> AttemptEnd {
    AttemptEnd {
        run_id: run.id,
        lease_id: run.lease_id.expect("an expired lease"),
        now,
        outcome: Outcome::Retry {
            error: err_info(ErrorClass::LeaseExpired),
            retry: RetryRecord {
                policy: "p".into(),
                delay_ms: 500,
                eligible_at: now.plus_millis(500),
                reason: RetryReason::Backoff,
            },
        },
    }
}

/// Two reapers that read the same expired leases, then reap them at once,
/// reap each run exactly once: one `lease_expired` attempt row and one
/// `lease_expired` event per expiry; the other reaper's end changes and
/// writes nothing (no `stale_write_refused`). A lease a heartbeat extended
/// after the reapers read it, a lease not yet expired by the reap's `now`,
/// and a run claimed again since are not reaped either.
pub async fn concurrent_reapers_reap_each_expired_lease_once(store: DynStore) {
    let runs: Vec<NewRun> = (0..6).map(|i| NewRun::new("job", json!(i))).collect();
    store.trigger(runs, T0).await.unwrap();
    let claimed = store.claim(claim_req(T0, 6)).await.unwrap();
    assert_eq!(claimed.len(), 6);
    let now = T0.plus_millis(30_000);
    // Both reapers read before either writes: the race that matters.
    let a = store.expired_leases(now, 10).await.unwrap();
    let b = store.expired_leases(now, 10).await.unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    // The worker of one run heartbeats after the reapers read it.
    let alive = &a[0];
    let st = store
        .heartbeat(
            vec![LeaseRef {
                run_id: alive.id,
                lease_id: alive.lease_id.unwrap(),
            }],
            now.plus_millis(30_000),
        )
        .await
        .unwrap();
    assert!(st[0].held);
    let ends_a: Vec<AttemptEnd> = a.iter().map(|r| reap_end(r, now)).collect();
    let ends_b: Vec<AttemptEnd> = b.iter().map(|r| reap_end(r, now)).collect();
    let (ra, rb) = tokio::join!(store.reap(ends_a), store.reap(ends_b.clone()));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((ra.len(), rb.len()), (6, 6));
    for (i, run) in a.iter().enumerate() {
        let applied: Vec<RunStatus> = [&ra[i], &rb[i]]
            .into_iter()
            .filter_map(|r| match r {
                Ok(applied) => *applied,
                Err(e) => panic!("run {i}: {e}"),
            })
            .collect();
        let k = kinds(&store, run.id).await;
        let att = store.attempts(run.id).await.unwrap();
        let now_run = store.get_run(run.id).await.unwrap().unwrap();
        if run.id == alive.id {
            assert!(applied.is_empty(), "a live lease was reaped: {applied:?}");
            assert_eq!(now_run.status, RunStatus::Running);
            assert_eq!(now_run.lease_id, alive.lease_id);
            assert_eq!(now_run.lease_expires_at, Some(now.plus_millis(30_000)));
            assert_eq!(k, ["run_triggered", "attempt_started"]);
            assert_eq!(att.len(), 1);
            assert_eq!(att[0].outcome, "running");
        } else {
            assert_eq!(applied, [RunStatus::Pending], "run {i}: reaped once");
            assert_eq!(now_run.status, RunStatus::Pending);
            assert_eq!(now_run.lease_id, None);
            assert_eq!(
                k,
                [
                    "run_triggered",
                    "attempt_started",
                    "lease_expired",
                    "attempt_failed",
                    "retry_scheduled"
                ],
                "run {i}"
            );
            assert_eq!(att.len(), 1);
            assert_eq!(att[0].outcome, "lease_expired");
            assert_eq!(att[0].error_class, Some(ErrorClass::LeaseExpired));
        }
    }
    // The runs are claimed again; a reaper still holding the old reads, and
    // one whose `now` is before the new leases expire, change nothing.
    let again = store
        .claim(claim_req(now.plus_millis(500), 10))
        .await
        .unwrap();
    assert_eq!(again.len(), 5);
    let late = store.reap(ends_b).await.unwrap();
    let early = store
        .reap(
            again
                .iter()
                .map(|r| reap_end(r, now.plus_millis(500 + 29_999)))
                .collect(),
        )
        .await
        .unwrap();
    for r in late.iter().chain(&early) {
        assert!(matches!(r, Ok(None)), "{r:?}");
    }
    for run in &again {
        let k = kinds(&store, run.id).await;
        assert_eq!(k.iter().filter(|k| *k == "lease_expired").count(), 1);
        assert!(!k.iter().any(|k| k == "stale_write_refused"), "{k:?}");
        assert_eq!(k.last().map(String::as_str), Some("attempt_started"));
        let got = store.get_run(run.id).await.unwrap().unwrap();
        assert_eq!(got.status, RunStatus::Running);
        assert_eq!(got.lease_id, run.lease_id);
    }
}

/// Leadership expires: one holder at a time; the holder renews under the
/// same token; once its lead expires (it stopped renewing: killed, stopped,
/// cut off) the next to ask takes over with a larger token, and the old
/// holder is refused while the new one leads. Resigning is fenced on the
/// token. Tasks are independent; two holders asking at once for a free
/// task: one leads.
pub async fn leadership_expires_and_is_fenced(store: DynStore) {
    let lead = |holder: &str, at: i64| {
        store.try_lead("pruner".into(), holder.into(), T0.plus_millis(at), 1_000)
    };
    let t1 = lead("a", 0).await.unwrap().expect("a free task");
    assert_eq!(lead("b", 500).await.unwrap(), None, "two leaders");
    // A renews: same token, lead until 1,900.
    assert_eq!(lead("a", 900).await.unwrap(), Some(t1));
    assert_eq!(lead("b", 1_899).await.unwrap(), None);
    // A stops renewing; at its expiry B takes over with a larger token.
    let t2 = lead("b", 1_900).await.unwrap().expect("an expired lead");
    assert!(t2 > t1, "{t2:?} after {t1:?}");
    assert_eq!(
        lead("a", 1_950).await.unwrap(),
        None,
        "the old leader is back"
    );
    // Another task is independent.
    assert!(store
        .try_lead("schedules".into(), "a".into(), T0.plus_millis(1_950), 1_000)
        .await
        .unwrap()
        .is_some());
    // Resigning under the old token changes nothing; under B's, A takes over.
    store
        .resign("pruner".into(), t1, T0.plus_millis(2_000))
        .await
        .unwrap();
    assert_eq!(lead("a", 2_000).await.unwrap(), None);
    store
        .resign("pruner".into(), t2, T0.plus_millis(2_000))
        .await
        .unwrap();
    let t3 = lead("a", 2_000).await.unwrap().expect("resigned");
    assert!(t3 > t2);
    // A holder that lost its lead and asks again gets a new token.
    let t4 = lead("a", 3_000).await.unwrap().expect("expired, free");
    assert!(t4 > t3);
    // Two holders at once, for a free task: one leads.
    let (x, y) = tokio::join!(
        store.try_lead("race".into(), "x".into(), T0, 1_000),
        store.try_lead("race".into(), "y".into(), T0, 1_000)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert!(x.is_some() != y.is_some(), "{x:?} {y:?}");
}

async fn futures_lite_join(store: &DynStore, ids: Vec<RunId>) -> Vec<RunStatus> {
    let mut out = Vec::new();
    for id in ids {
        out.push(store.get_run(id).await.unwrap().unwrap().status);
    }
    out
}

/// Listing filters by tenant, job, status and time, newest first, with a cursor.
pub async fn list_filters_and_pagination(store: DynStore) {
    let mut all = Vec::new();
    for i in 0..7 {
        let mut n = NewRun::new(if i % 2 == 0 { "job" } else { "other" }, json!(i));
        if i == 6 {
            n.tenant = "t2".into();
        }
        all.push(n.clone());
        store.trigger(vec![n], T0.plus_millis(i)).await.unwrap();
    }
    let page1 = store
        .list_runs(RunFilter {
            tenant: Some(DEFAULT_TENANT.into()),
            limit: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids1: Vec<_> = page1.iter().map(|r| r.id).collect();
    assert_eq!(ids1, [all[5].id, all[4].id, all[3].id, all[2].id]);
    let page2 = store
        .list_runs(RunFilter {
            tenant: Some(DEFAULT_TENANT.into()),
            limit: 4,
            before_id: Some(all[2].id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        page2.iter().map(|r| r.id).collect::<Vec<_>>(),
        [all[1].id, all[0].id]
    );
    let jobs = store
        .list_runs(RunFilter {
            job: Some("job".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 4);
    let timed = store
        .list_runs(RunFilter {
            created_after: Some(T0.plus_millis(2)),
            created_before: Some(T0.plus_millis(4)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        timed.iter().map(|r| r.id).collect::<Vec<_>>(),
        [all[3].id, all[2].id]
    );
    store
        .claim(claim_req(T0.plus_millis(100), 1))
        .await
        .unwrap();
    let running = store
        .list_runs(RunFilter {
            statuses: vec![RunStatus::Running, RunStatus::Failed],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    let counts = store.count_runs(Some(DEFAULT_TENANT.into())).await.unwrap();
    let total: i64 = counts.iter().map(|c| c.count).sum();
    assert_eq!(total, 6);
    assert!(counts.contains(&StatusCount {
        job: "job".into(),
        status: RunStatus::Running,
        count: 1
    }));
}

/// Events are read in id order, after a cursor, per run, job or tenant.
pub async fn events_cursor_and_filters(store: DynStore) {
    let a = NewRun::new("job", json!(1));
    let mut b = NewRun::new("other", json!(2));
    b.tenant = "t2".into();
    store.trigger(vec![a.clone(), b.clone()], T0).await.unwrap();
    store.claim(claim_req(T0, 1)).await.unwrap();
    let all = store.events(EventFilter::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    let after = store
        .events(EventFilter {
            after_id: Some(all[0].id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(after.len(), 2);
    let t2 = store
        .events(EventFilter {
            tenant: Some("t2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(t2.len(), 1);
    assert_eq!(t2[0].run_id, b.id);
    let job = store
        .events(EventFilter {
            job: Some("job".into()),
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(job.len(), 1);
    assert_eq!(job[0].kind, "run_triggered");
    assert_eq!(all[2].kind, "attempt_started");
    assert_eq!(all[2].attempt, Some(1));
    assert!(all[2].lease_id.is_some());
}

async fn claimed(store: &DynStore) -> (Run, LeaseRef) {
    one(store, NewRun::new("job", json!({}))).await;
    let run = store.claim(claim_req(T0, 1)).await.unwrap().remove(0);
    let lease = LeaseRef {
        run_id: run.id,
        lease_id: run.lease_id.unwrap(),
    };
    (run, lease)
}

fn op(run_id: RunId, command: OperatorCommand) -> OperatorRequest {
    OperatorRequest {
        run_id,
        actor: "ops-alice".into(),
        comment: Some("because".into()),
        now: T0.plus_millis(50),
        command,
    }
}

async fn fail_run(store: &DynStore, lease: LeaseRef) {
    store
        .finish(vec![AttemptEnd {
            run_id: lease.run_id,
            lease_id: lease.lease_id,
            now: T0.plus_millis(20),
            outcome: Outcome::Failed {
                error: Some(err_info(ErrorClass::Unavailable)),
                reason: TerminalReason::MaxRetriesExhausted,
                detail: "gave up".into(),
            },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
}

/// A completed step is stored with `step_completed`; its name cannot be
/// completed twice; a stale lease cannot write one; a failed step can be
/// completed later.
pub async fn steps_are_stored_fenced_and_unique(store: DynStore) {
    let (run, lease) = claimed(&store).await;
    let st = store
        .save_step(lease, "fetch".into(), json!({"rows": 3}), T0.plus_millis(1))
        .await
        .unwrap();
    assert_eq!(
        st,
        LeaseState {
            held: true,
            cancel_requested: false
        }
    );
    let dup = store
        .save_step(lease, "fetch".into(), json!(0), T0.plus_millis(2))
        .await
        .unwrap_err();
    assert!(
        matches!(dup, StoreError::Conflict(ref m) if m.contains("step `fetch`")),
        "{dup}"
    );
    let stale = LeaseRef {
        run_id: run.id,
        lease_id: LeaseId::new(),
    };
    assert!(matches!(
        store.save_step(stale, "x".into(), json!(1), T0).await,
        Err(StoreError::StaleLease { .. })
    ));
    store
        .fail_step(
            lease,
            "send".into(),
            ErrorClass::Timeout,
            "smtp timed out".into(),
            T0.plus_millis(3),
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .fail_step(lease, "fetch".into(), ErrorClass::Timeout, "no".into(), T0)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let steps = store.steps(run.id).await.unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].name, "fetch");
    assert_eq!(steps[0].status, StepStatus::Completed);
    assert_eq!(steps[0].result, Some(json!({"rows": 3})));
    assert_eq!(steps[0].attempt, 1);
    assert_eq!(steps[1].status, StepStatus::Failed);
    assert_eq!(steps[1].error_class, Some(ErrorClass::Timeout));
    store
        .save_step(lease, "send".into(), json!("ok"), T0.plus_millis(4))
        .await
        .unwrap();
    let steps = store.steps(run.id).await.unwrap();
    assert!(steps.iter().all(|s| s.status == StepStatus::Completed));
    assert_eq!(
        kinds(&store, run.id).await,
        [
            "run_triggered",
            "attempt_started",
            "step_completed",
            "stale_write_refused",
            "step_failed",
            "step_completed"
        ]
    );
}

fn ledger_w(key: &str, state: LedgerState) -> LedgerWrite {
    LedgerWrite {
        tenant: DEFAULT_TENANT.into(),
        idempotency_key: key.into(),
        action: "send-email".into(),
        state,
        result: None,
        error_class: None,
        error_message: None,
    }
}

/// Ledger rows are keyed by (tenant, key), begun `started`, moved on in
/// place by compare-and-set, fenced by the lease.
pub async fn ledger_rows_are_written_fenced(store: DynStore) {
    let (run, lease) = claimed(&store).await;
    let key = "prospect-7ca677ed25d3/send-email/campaign-9/v1";
    let begun = store
        .ledger_begin(lease, key.into(), "send-email".into(), T0.plus_millis(1))
        .await
        .unwrap();
    assert_eq!(
        begun,
        LedgerBegin::Acquired {
            previous: None,
            reconcile_first: false
        }
    );
    let e = store
        .ledger_get(DEFAULT_TENANT.into(), key.into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.state, LedgerState::Started);
    assert_eq!(e.run_id, run.id);
    assert_eq!(e.lease_id, lease.lease_id);
    assert_eq!(e.attempt, 1);
    let mut w = ledger_w(key, LedgerState::Committed);
    w.result = Some(json!({"message_id": "m-1"}));
    store
        .ledger_write(
            lease,
            w.clone(),
            "action_committed".into(),
            T0.plus_millis(2),
        )
        .await
        .unwrap();
    let e = store
        .ledger_get(DEFAULT_TENANT.into(), key.into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.state, LedgerState::Committed);
    assert_eq!(e.result, Some(json!({"message_id": "m-1"})));
    assert_eq!(e.created_at, T0.plus_millis(1));
    assert_eq!(e.updated_at, T0.plus_millis(2));
    assert!(store
        .ledger_get("other".into(), key.into())
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.ledger_for_run(run.id).await.unwrap().len(), 1);
    // A late failure of the very attempt that committed never downgrades it.
    let mut late = ledger_w(key, LedgerState::FailedRetryable);
    late.error_class = Some(ErrorClass::Unavailable);
    late.error_message = Some("503 after commit".into());
    match store
        .ledger_write(lease, late, "action_failed".into(), T0.plus_millis(3))
        .await
    {
        Err(StoreError::LedgerConflict {
            current,
            attempted,
            holder_run,
            ..
        }) => {
            assert_eq!(current, LedgerState::Committed);
            assert_eq!(attempted, LedgerState::FailedRetryable);
            assert_eq!(holder_run, run.id);
        }
        other => panic!("a late failure must be refused, got {other:?}"),
    }
    let e = store
        .ledger_get(DEFAULT_TENANT.into(), key.into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.state, LedgerState::Committed);
    assert_eq!(e.result, Some(json!({"message_id": "m-1"})));
    // `started` is only written by a begin.
    assert!(matches!(
        store
            .ledger_write(
                lease,
                ledger_w("other-key", LedgerState::Started),
                "action_started".into(),
                T0.plus_millis(3)
            )
            .await,
        Err(StoreError::Conflict(_))
    ));
    let stale = LeaseRef {
        run_id: run.id,
        lease_id: LeaseId::new(),
    };
    assert!(matches!(
        store
            .ledger_write(stale, w, "action_committed".into(), T0)
            .await,
        Err(StoreError::StaleLease { .. })
    ));
    let events = store
        .events(EventFilter {
            run_id: Some(run.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let k: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        &k[2..],
        [
            "action_started",
            "action_committed",
            "ledger_write_refused",
            "ledger_write_refused",
            "stale_write_refused"
        ]
    );
    let refused = &events[4].data;
    assert_eq!(refused["attempted"], "failed_retryable");
    assert_eq!(refused["current_state"], "committed");
    assert_eq!(refused["held_by_run"], json!(run.id));
    assert_eq!(refused["error_class"], "unavailable");
    assert_eq!(refused["message"], "503 after commit");
}

/// Claims `n` runs of `job`, each with its own lease.
async fn claimed_n(store: &DynStore, n: usize, now: Timestamp) -> Vec<(Run, LeaseRef)> {
    let runs: Vec<NewRun> = (0..n).map(|_| NewRun::new("job", json!({}))).collect();
    store.trigger(runs, T0).await.unwrap();
    let got = store.claim(claim_req(now, n)).await.unwrap();
    assert_eq!(got.len(), n);
    got.into_iter()
        .map(|r| {
            let lease = LeaseRef {
                run_id: r.id,
                lease_id: r.lease_id.unwrap(),
            };
            (r, lease)
        })
        .collect()
}

/// A key `started` by another run's live attempt is in flight: a second
/// run may not take it (and the refusal names the holder); once the
/// holder's lease has expired it is taken over with a reconcile first,
/// and the old holder can no longer move it.
pub async fn ledger_in_flight_until_the_holders_lease_expires(store: DynStore) {
    let pair = claimed_n(&store, 2, T0).await;
    let ((a, la), (b, lb)) = (pair[0].clone(), pair[1].clone());
    let key = "charge/order-42";
    let begin =
        |lease: LeaseRef, at: Timestamp| store.ledger_begin(lease, key.into(), "charge".into(), at);
    assert!(matches!(
        begin(la, T0.plus_millis(1)).await.unwrap(),
        LedgerBegin::Acquired {
            reconcile_first: false,
            ..
        }
    ));
    let expires = a.lease_expires_at.unwrap();
    match begin(lb, T0.plus_millis(2)).await.unwrap() {
        LedgerBegin::InFlight {
            entry,
            holder_lease_expires_at,
        } => {
            assert_eq!(entry.run_id, a.id);
            assert_eq!(entry.lease_id, la.lease_id);
            assert_eq!(holder_lease_expires_at, expires);
        }
        other => panic!("another live attempt holds the key, got {other:?}"),
    }
    let ev = store
        .events(EventFilter {
            run_id: Some(b.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let in_flight = ev
        .iter()
        .find(|e| e.kind == "action_in_flight")
        .expect("recorded");
    assert_eq!(in_flight.data["held_by_run"], json!(a.id));
    assert_eq!(in_flight.data["held_by_lease"], json!(la.lease_id));
    assert_eq!(in_flight.data["idempotency_key"], key);
    // Still live one millisecond before expiry…
    assert!(matches!(
        begin(lb, expires.plus_millis(-1)).await.unwrap(),
        LedgerBegin::InFlight { .. }
    ));
    // …gone at expiry (even before the reaper ran): taken over, reconcile
    // first, since A may have sent.
    match begin(lb, expires).await.unwrap() {
        LedgerBegin::Acquired {
            previous,
            reconcile_first,
        } => {
            assert!(reconcile_first);
            assert_eq!(previous.unwrap().run_id, a.id);
        }
        other => panic!("an expired holder's key is taken over, got {other:?}"),
    }
    // A's late commit is refused: B holds the row now.
    let mut commit = ledger_w(key, LedgerState::Committed);
    commit.action = "charge".into();
    assert!(matches!(
        store
            .ledger_write(la, commit.clone(), "action_committed".into(), expires.plus_millis(1))
            .await,
        Err(StoreError::LedgerConflict { current: LedgerState::Started, holder_run, .. }) if holder_run == b.id
    ));
    store
        .ledger_write(
            lb,
            commit,
            "action_committed".into(),
            expires.plus_millis(2),
        )
        .await
        .unwrap();
    // A third begin, by anyone, returns the committed row.
    match begin(la, expires.plus_millis(3)).await.unwrap() {
        LedgerBegin::Committed(e) => assert_eq!(e.run_id, b.id),
        other => panic!("committed is final, got {other:?}"),
    }
}

/// Runs racing to begin one key: exactly one takes it, every other one is
/// told it is in flight — also when the begins overlap on PostgreSQL.
pub async fn ledger_begin_race_has_one_winner(store: DynStore) {
    let runs = claimed_n(&store, 6, T0).await;
    let key = "race/one-key";
    let tasks: Vec<_> = runs
        .iter()
        .map(|(_, l)| {
            let store = store.clone();
            let l = *l;
            tokio::spawn(async move {
                store
                    .ledger_begin(l, key.into(), "charge".into(), T0.plus_millis(5))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    let won: Vec<_> = got
        .iter()
        .filter(|b| matches!(b, LedgerBegin::Acquired { .. }))
        .collect();
    assert_eq!(won.len(), 1, "{got:?}");
    let row = store
        .ledger_get(DEFAULT_TENANT.into(), key.into())
        .await
        .unwrap()
        .unwrap();
    for b in &got {
        if let LedgerBegin::InFlight { entry, .. } = b {
            assert_eq!(entry.lease_id, row.lease_id);
        }
    }
    assert_eq!(got.len() - won.len(), 5);
}

/// Cancel: at once when not running; requested (seen by heartbeats and step
/// saves) when running; refused with the state when terminal.
pub async fn operator_cancel_by_state(store: DynStore) {
    let pending = one(&store, NewRun::new("other", json!({}))).await;
    let r = store
        .operator(op(pending.id, OperatorCommand::Cancel))
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(r.finished_at, Some(T0.plus_millis(50)));
    let ev = store
        .events(EventFilter {
            run_id: Some(pending.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "run_cancelled");
    assert_eq!(last.actor.as_deref(), Some("ops-alice"));
    assert_eq!(last.comment.as_deref(), Some("because"));
    let again = store
        .operator(op(pending.id, OperatorCommand::Cancel))
        .await
        .unwrap_err();
    assert!(
        matches!(
            again,
            StoreError::WrongState {
                current: RunStatus::Cancelled,
                ..
            }
        ),
        "{again}"
    );
    assert!(again.to_string().contains("cancelled"));

    let (run, lease) = claimed(&store).await;
    let r = store
        .operator(op(run.id, OperatorCommand::Cancel))
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Running);
    assert!(r.cancel_requested);
    let hb = store
        .heartbeat(vec![lease], T0.plus_millis(60_000))
        .await
        .unwrap();
    assert!(hb[0].cancel_requested);
    let st = store
        .save_step(lease, "a".into(), json!(1), T0.plus_millis(60))
        .await
        .unwrap();
    assert!(st.cancel_requested);
    store
        .finish(vec![AttemptEnd {
            run_id: run.id,
            lease_id: lease.lease_id,
            now: T0.plus_millis(70),
            outcome: Outcome::Cancelled,
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(
        store.get_run(run.id).await.unwrap().unwrap().status,
        RunStatus::Cancelled
    );
}

/// Approve and reject resume a needs_input run and store the decision as
/// the wait's step; any other state is refused.
pub async fn operator_approve_and_reject(store: DynStore) {
    for approve in [true, false] {
        let (run, lease) = claimed(&store).await;
        store
            .finish(vec![AttemptEnd {
                run_id: run.id,
                lease_id: lease.lease_id,
                now: T0.plus_millis(5),
                outcome: Outcome::NeedsInput {
                    name: "approval".into(),
                    request: json!({"amount": 1500}),
                },
            }])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        let data = json!({"note": "checked"});
        let cmd = if approve {
            OperatorCommand::Approve { data: data.clone() }
        } else {
            OperatorCommand::Reject { data: data.clone() }
        };
        let r = store.operator(op(run.id, cmd.clone())).await.unwrap();
        assert_eq!(r.status, RunStatus::Pending);
        assert_eq!(r.input_request, None);
        assert_eq!(r.run_after, T0.plus_millis(50));
        let steps = store.steps(run.id).await.unwrap();
        assert_eq!(steps[0].name, "input:approval");
        assert_eq!(
            steps[0].result,
            Some(json!({"decision": if approve { "approved" } else { "rejected" }, "data": data}))
        );
        assert_eq!(steps[0].actor.as_deref(), Some("ops-alice"));
        let err = store.operator(op(run.id, cmd)).await.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::WrongState {
                    current: RunStatus::Pending,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            kinds(&store, run.id).await.last().unwrap(),
            "input_received"
        );
    }
}

/// Retry of a failed run: pending at once, variables merged, failed steps
/// forgotten (completed ones kept), a fresh attempt budget, audited.
pub async fn operator_retry_merges_variables_and_resets_budget(store: DynStore) {
    let (run, lease) = claimed(&store).await;
    store
        .save_step(lease, "done".into(), json!(1), T0)
        .await
        .unwrap();
    store
        .fail_step(
            lease,
            "broken".into(),
            ErrorClass::Unavailable,
            "503".into(),
            T0,
        )
        .await
        .unwrap();
    let refused = store
        .operator(op(
            run.id,
            OperatorCommand::Retry {
                updated_variables: None,
            },
        ))
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        StoreError::WrongState {
            current: RunStatus::Running,
            ..
        }
    ));
    fail_run(&store, lease).await;
    let r = store
        .operator(op(
            run.id,
            OperatorCommand::Retry {
                updated_variables: Some(json!({"timeout": 30000, "retryAttempt": 2})),
            },
        ))
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.variables, json!({"timeout": 30000, "retryAttempt": 2}));
    assert_eq!(r.terminal_reason, None);
    assert_eq!(r.finished_at, None);
    assert_eq!(r.attempts_forgiven, r.attempt);
    let steps = store.steps(run.id).await.unwrap();
    assert_eq!(
        steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["done"]
    );
    let ev = store
        .events(EventFilter {
            run_id: Some(run.id),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = ev.last().unwrap();
    assert_eq!(last.kind, "operator_retry");
    assert_eq!(last.actor.as_deref(), Some("ops-alice"));
    assert_eq!(
        last.data["updated_variables"],
        json!({"timeout": 30000, "retryAttempt": 2})
    );
    let again = store
        .claim(claim_req(T0.plus_millis(50), 1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.attempt, 2);
    assert_eq!(again.policy_attempt(), 1);
}

/// Skip marks the failed step skipped (with who and why) and resumes the
/// run; a run that failed outside any step has nothing to skip.
pub async fn operator_skip_records_the_failed_step(store: DynStore) {
    let (run, lease) = claimed(&store).await;
    store
        .fail_step(
            lease,
            "enrich".into(),
            ErrorClass::NotFound,
            "404".into(),
            T0,
        )
        .await
        .unwrap();
    fail_run(&store, lease).await;
    let r = store
        .operator(op(run.id, OperatorCommand::Skip))
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Pending);
    let s = &store.steps(run.id).await.unwrap()[0];
    assert_eq!(s.status, StepStatus::Skipped);
    assert_eq!(s.comment.as_deref(), Some("because"));
    let k = kinds(&store, run.id).await;
    assert_eq!(&k[k.len() - 2..], ["step_skipped", "operator_skip"]);

    let (run2, lease2) = claimed(&store).await;
    fail_run(&store, lease2).await;
    let err = store
        .operator(op(run2.id, OperatorCommand::Skip))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no failed step to skip"), "{err}");
    assert_eq!(
        store.get_run(run2.id).await.unwrap().unwrap().status,
        RunStatus::Failed
    );
}

/// Postpone: pending/needs_input/postponed become postponed until T; a
/// running or terminal run is refused with its state.
pub async fn operator_postpone_by_state(store: DynStore) {
    let p = one(&store, NewRun::new("other", json!({}))).await;
    let until = T0.plus_millis(3_600_000);
    let r = store
        .operator(op(p.id, OperatorCommand::Postpone { until }))
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Postponed);
    assert_eq!(r.run_after, until);
    assert_eq!(r.attempts_forgiven, 0);
    let (run, _lease) = claimed(&store).await;
    let err = store
        .operator(op(run.id, OperatorCommand::Postpone { until }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::WrongState {
                current: RunStatus::Running,
                ..
            }
        ),
        "{err}"
    );
    let missing = store
        .operator(op(RunId::new(), OperatorCommand::Cancel))
        .await
        .unwrap_err();
    assert!(matches!(missing, StoreError::NotFound(_)));
}

/// Progress and log events are appended under the live lease only.
pub async fn append_event_is_fenced(store: DynStore) {
    let (run, lease) = claimed(&store).await;
    store
        .append_event(
            lease,
            "progress".into(),
            json!({"current": 1, "total": 4}),
            T0.plus_millis(1),
        )
        .await
        .unwrap();
    let stale = LeaseRef {
        run_id: run.id,
        lease_id: LeaseId::new(),
    };
    assert!(matches!(
        store.append_event(stale, "log".into(), json!({}), T0).await,
        Err(StoreError::StaleLease { .. })
    ));
    let ev = store
        .events(EventFilter {
            run_id: Some(run.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ev[2].kind, "progress");
    assert_eq!(ev[2].data, json!({"current": 1, "total": 4}));
    assert_eq!(ev[2].attempt, Some(1));
}

/// `{"a": [{"a": [… 0 …]}]}` nested `depth` levels (arrays and objects
/// alternate, so both kinds are measured).
pub fn nested_json(depth: usize) -> serde_json::Value {
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

/// The depths the JSON bound is tested at: well inside, at the bound, just
/// past it, around `serde_json`'s read limit (127/128), and far past both.
pub const JSON_DEPTHS: [usize; 8] = [10, 100, 101, 126, 127, 128, 129, 1000];

fn assert_too_deep<T: std::fmt::Debug>(r: Result<T>, field: &str, depth: usize) {
    match r {
        Err(StoreError::TooDeep {
            field: f,
            depth: d,
            max,
        }) => {
            assert_eq!((f.as_str(), d, max), (field, depth, MAX_JSON_DEPTH));
        }
        other => panic!("expected `{field}` at depth {depth} to be refused, got {other:?}"),
    }
}

/// Every JSON value the store accepts reads back exactly — run input,
/// output, input requests, operator data, step and ledger results, event
/// payloads — at any depth up to [`MAX_JSON_DEPTH`]; a deeper one is
/// refused with [`StoreError::TooDeep`] naming the field and its depth,
/// and nothing of that write is stored (other ends of the same batch are).
pub async fn json_at_any_depth_reads_back_or_is_refused(store: DynStore) {
    let mut inputs = Vec::new();
    for depth in JSON_DEPTHS {
        let v = nested_json(depth);
        let ok = depth <= MAX_JSON_DEPTH;
        let at = T0.plus_millis(depth as i64);

        // Run input.
        let n = NewRun::new("deep-input", v.clone());
        let id = n.id;
        let t = store.trigger(vec![n], T0).await;
        if ok {
            t.unwrap();
            assert_eq!(store.get_run(id).await.unwrap().unwrap().input, v);
            inputs.push((id, v.clone()));
        } else {
            assert_too_deep(t, "input", depth);
            assert!(store.get_run(id).await.unwrap().is_none());
        }

        // Step result, ledger result, event payload, output.
        let (run, lease) = claimed(&store).await;
        let r = store.save_step(lease, "s".into(), v.clone(), at).await;
        let w = LedgerWrite {
            tenant: DEFAULT_TENANT.into(),
            idempotency_key: format!("deep-{depth}"),
            action: "a".into(),
            state: LedgerState::Committed,
            result: Some(v.clone()),
            error_class: None,
            error_message: None,
        };
        store
            .ledger_begin(lease, w.idempotency_key.clone(), w.action.clone(), at)
            .await
            .unwrap();
        let l = store
            .ledger_write(lease, w, "action_committed".into(), at)
            .await;
        let e = store
            .append_event(lease, "progress".into(), v.clone(), at)
            .await;
        let (_, other) = claimed(&store).await;
        let ends = store
            .finish(vec![
                AttemptEnd {
                    run_id: run.id,
                    lease_id: lease.lease_id,
                    now: at,
                    outcome: Outcome::Completed { output: v.clone() },
                },
                AttemptEnd {
                    run_id: other.run_id,
                    lease_id: other.lease_id,
                    now: at,
                    outcome: Outcome::Completed { output: json!(1) },
                },
            ])
            .await
            .unwrap();
        let mut ends = ends.into_iter();
        let first = ends.next().unwrap();
        assert_eq!(ends.next().unwrap().unwrap(), RunStatus::Completed);
        let steps = store.steps(run.id).await.unwrap();
        let ledger = store
            .ledger_get(DEFAULT_TENANT.into(), format!("deep-{depth}"))
            .await
            .unwrap();
        let progress: Vec<_> = store
            .events(EventFilter {
                run_id: Some(run.id),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "progress")
            .collect();
        let stored = store.get_run(run.id).await.unwrap().unwrap();
        if ok {
            r.unwrap();
            l.unwrap();
            e.unwrap();
            assert_eq!(first.unwrap(), RunStatus::Completed);
            assert_eq!(steps[0].result, Some(v.clone()));
            assert_eq!(ledger.unwrap().result, Some(v.clone()));
            assert_eq!(progress[0].data, v);
            assert_eq!(stored.output, Some(v.clone()));
        } else {
            assert_too_deep(r, "result", depth);
            assert_too_deep(l, "result", depth);
            assert_too_deep(e, "data", depth);
            assert_too_deep(first, "output", depth);
            assert!(steps.is_empty() && progress.is_empty());
            // The begin took the key; the refused result left it started.
            let row = ledger.expect("begun");
            assert_eq!((row.state, row.result), (LedgerState::Started, None));
            assert_eq!(stored.status, RunStatus::Running);
            assert_eq!(stored.output, None);
            // The refused end wrote nothing; the lease still holds the run.
            store
                .finish(vec![AttemptEnd {
                    run_id: run.id,
                    lease_id: lease.lease_id,
                    now: at,
                    outcome: Outcome::Completed { output: json!(0) },
                }])
                .await
                .unwrap()
                .remove(0)
                .unwrap();
        }

        // Input request and the operator's decision.
        let (run, lease) = claimed(&store).await;
        let ask = |request: serde_json::Value| AttemptEnd {
            run_id: run.id,
            lease_id: lease.lease_id,
            now: at,
            outcome: Outcome::NeedsInput {
                name: "approval".into(),
                request,
            },
        };
        let (asked, _) = store
            .finish_and_claim(vec![ask(v.clone())], Vec::new())
            .await
            .unwrap();
        let asked = asked.into_iter().next().unwrap();
        if ok {
            assert_eq!(asked.unwrap(), RunStatus::NeedsInput);
            let r = store.get_run(run.id).await.unwrap().unwrap();
            assert_eq!(r.input_request.unwrap()["request"], v);
        } else {
            assert_too_deep(asked, "input_request", depth);
            store.finish(vec![ask(json!({}))]).await.unwrap()[0]
                .as_ref()
                .unwrap();
        }
        let approved = store
            .operator(op(run.id, OperatorCommand::Approve { data: v.clone() }))
            .await;
        if ok {
            approved.unwrap();
            let steps = store.steps(run.id).await.unwrap();
            assert_eq!(steps[0].result.as_ref().unwrap()["data"], v);
            let events = store
                .events(EventFilter {
                    run_id: Some(run.id),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(events.last().unwrap().data["data"], v);
        } else {
            assert_too_deep(approved, "data", depth);
            let r = store.get_run(run.id).await.unwrap().unwrap();
            assert_eq!(r.status, RunStatus::NeedsInput);
        }
        let retry = store
            .operator(op(
                run.id,
                OperatorCommand::Retry {
                    updated_variables: Some(json!({ "deep": v })),
                },
            ))
            .await;
        if !ok {
            assert_too_deep(retry, "updated_variables", depth + 1);
        }
    }
    // Every run stored reads back in a list, as it was written.
    let listed = store.list_runs(RunFilter::default()).await.unwrap();
    for (id, v) in inputs {
        let r = listed.iter().find(|r| r.id == id).expect("run listed");
        assert_eq!(r.input, v);
    }
    assert!(listed
        .iter()
        .all(|r| !r.input.to_string().contains(UNDECODABLE_KEY)));
}

/// Which JSON columns [`a_poisoned_row_is_listed_with_a_marker`] asks the
/// backend to spoil.
#[derive(Clone, Copy, Debug)]
pub enum Poison {
    /// `runs.input` and `runs.output` of the run.
    Run,
    /// `steps.result` of the run's step `s`.
    Step,
    /// `ledger.result` of the key `poison`.
    Ledger,
    /// `events.data` of the run's `progress` event.
    Event,
}

/// A JSON column that cannot be decoded (written by an older Docket, or by
/// hand: the backend's test writes it with raw SQL through `poison`) never
/// fails a read: the value reads as `{"docket_undecodable": "<reason>"}`,
/// and lists, pages, steps, the ledger and events still answer with every
/// other row intact.
pub async fn a_poisoned_row_is_listed_with_a_marker<F, Fut>(store: DynStore, poison: F)
where
    F: Fn(Poison, RunId) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = one(&store, NewRun::new("other", json!({"n": 1}))).await;
    let (run, lease) = claimed(&store).await;
    store
        .save_step(lease, "s".into(), json!(1), T0)
        .await
        .unwrap();
    let w = LedgerWrite {
        tenant: DEFAULT_TENANT.into(),
        idempotency_key: "poison".into(),
        action: "a".into(),
        state: LedgerState::Committed,
        result: Some(json!(1)),
        error_class: None,
        error_message: None,
    };
    store
        .ledger_begin(lease, "poison".into(), "a".into(), T0)
        .await
        .unwrap();
    store
        .ledger_write(lease, w, "action_committed".into(), T0)
        .await
        .unwrap();
    store
        .append_event(lease, "progress".into(), json!(1), T0)
        .await
        .unwrap();
    let after = one(&store, NewRun::new("other", json!({"n": 2}))).await;
    for p in [Poison::Run, Poison::Step, Poison::Ledger, Poison::Event] {
        poison(p, run.id).await;
    }
    let marked = |v: &serde_json::Value| {
        v[UNDECODABLE_KEY]
            .as_str()
            .is_some_and(|reason| !reason.is_empty())
    };
    let listed = store.list_runs(RunFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let bad = listed.iter().find(|r| r.id == run.id).unwrap();
    assert!(marked(&bad.input), "{:?}", bad.input);
    assert!(marked(bad.output.as_ref().unwrap()), "{:?}", bad.output);
    for good in [&before, &after] {
        let r = listed.iter().find(|r| r.id == good.id).unwrap();
        assert_eq!(r.input, good.input);
    }
    // A page that holds the poisoned row, and the one after it.
    let page = store
        .list_runs(RunFilter {
            limit: 1,
            before_id: Some(after.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page[0].id, run.id);
    let got = store.get_run(run.id).await.unwrap().unwrap();
    assert!(marked(&got.input));
    assert!(marked(
        &store.steps(run.id).await.unwrap()[0]
            .result
            .clone()
            .unwrap()
    ));
    let l = store
        .ledger_get(DEFAULT_TENANT.into(), "poison".into())
        .await
        .unwrap()
        .unwrap();
    assert!(marked(l.result.as_ref().unwrap()));
    assert!(marked(
        store.ledger_for_run(run.id).await.unwrap()[0]
            .result
            .as_ref()
            .unwrap()
    ));
    let events = store.events(EventFilter::default()).await.unwrap();
    let progress = events.iter().find(|e| e.kind == "progress").unwrap();
    assert!(marked(&progress.data));
    assert!(events.iter().any(|e| e.run_id == after.id));
}

/// A token whose holder is late is not wasted: from half the reservation's
/// grace after its due time to the grace, a taker that finds the bucket
/// empty sends on it, and the late holder's reservation moves to the slot
/// that taker would have reserved (it is told to come back then, and goes
/// ahead on it). Earlier the holder keeps it; later it is gone, never sent.
/// At 20/s with a burst of 1 the grace is 50 ms.
pub async fn rate_a_late_holders_token_goes_to_the_next_taker(store: DynStore) {
    let l = docket_core::RateLimit::new(20.0, 1).unwrap();
    let take = |key: &str, holder: &str, at: i64| {
        let store = store.clone();
        let req = RateTakeRequest {
            key: key.into(),
            holder: holder.into(),
            limit: l,
            now: T0.plus_millis(at),
        };
        async move { store.rate_take(req).await.unwrap() }
    };
    let deferred = |ms: i64| RateTake::Deferred {
        until: T0.plus_millis(ms),
    };
    for key in ["early", "window", "past"] {
        assert_eq!(take(key, "first", 0).await, RateTake::Granted);
        assert_eq!(take(key, "late", 0).await, deferred(50));
    }
    // 10 ms late: the holder may still come; the newcomer waits its turn.
    assert_eq!(take("early", "new", 60).await, deferred(100));
    assert_eq!(take("early", "late", 70).await, RateTake::Granted);
    // 30 ms late (half the grace is 25): the newcomer sends on it; the
    // late holder gets the newcomer's slot.
    assert_eq!(take("window", "new", 80).await, RateTake::Granted);
    assert_eq!(take("window", "late", 90).await, deferred(100));
    assert_eq!(take("window", "late", 100).await, RateTake::Granted);
    let b = store.rate_buckets("window".into()).await.unwrap().remove(0);
    assert_eq!(b.reserved, 0, "every reservation was used once");
    // 51 ms late (past the grace): never sent, by anyone.
    assert_eq!(take("past", "second", 0).await, deferred(100));
    assert_eq!(take("past", "new", 101).await, deferred(150));
    assert_eq!(take("past", "second", 101).await, RateTake::Granted);
}

/// A breaker's close releases, in its own transaction, exactly the runs it
/// deferred to a later time that still wait for it: each is due at the
/// close's time, with a `deferral_released` event, and workers are woken
/// (PostgreSQL: a `NOTIFY` for its job, received by a listener). Not
/// another breaker's deferrals, not a rate limit's, not a run the breaker
/// deferred to a time already past, not a cancelled one; a second close
/// finds nothing (one write per run per outage), and a change that does
/// not release moves nothing.
pub async fn breaker_close_releases_the_runs_it_deferred(store: DynStore) {
    let probe_deadline = T0.plus_millis(11_000);
    let cases = [
        (
            "released",
            "circuit_breaker:crm",
            RetryReason::CircuitOpen,
            probe_deadline,
        ),
        (
            "due_already",
            "circuit_breaker:crm",
            RetryReason::CircuitOpen,
            T0.plus_millis(500),
        ),
        (
            "other_breaker",
            "circuit_breaker:erp",
            RetryReason::CircuitOpen,
            probe_deadline,
        ),
        (
            "rate_limited",
            "rate_limit:connection:crm",
            RetryReason::RateLimited,
            probe_deadline,
        ),
        (
            "cancelled",
            "circuit_breaker:crm",
            RetryReason::CircuitOpen,
            probe_deadline,
        ),
    ];
    let runs: Vec<NewRun> = cases
        .iter()
        .map(|(name, ..)| NewRun::new("job", json!({ "case": name })))
        .collect();
    store.trigger(runs.clone(), T0).await.unwrap();
    let claimed = store.claim(claim_req(T0, 10)).await.unwrap();
    assert_eq!(claimed.len(), cases.len());
    let ends = claimed
        .iter()
        .map(|r| {
            let (_, policy, reason, until) = cases
                .iter()
                .find(|c| r.input["case"] == c.0)
                .expect("a case");
            AttemptEnd {
                run_id: r.id,
                lease_id: r.lease_id.unwrap(),
                now: T0,
                outcome: Outcome::Retry {
                    error: err_info(ErrorClass::Unavailable),
                    retry: RetryRecord {
                        policy: policy.to_string(),
                        delay_ms: until.millis_since(T0),
                        eligible_at: *until,
                        reason: *reason,
                    },
                },
            }
        })
        .collect();
    for r in store.finish(ends).await.unwrap() {
        r.unwrap();
    }
    let id = |name: &str| runs[cases.iter().position(|c| c.0 == name).unwrap()].id;
    cancel(&store, id("cancelled"), T0.plus_millis(1)).await;
    let mut wakeups = store.wakeups().await.unwrap();
    let before: Vec<Run> = {
        let mut v = Vec::new();
        for r in &runs {
            v.push(store.get_run(r.id).await.unwrap().unwrap());
        }
        v
    };

    let close = T0.plus_millis(1_000);
    let closed = json!({ "phase": "closed" });
    let state = closed.clone();
    let changed = store
        .breaker_change(
            "crm".into(),
            close,
            Box::new(move |_| BreakerWrite {
                state: Some(state),
                release: true,
            }),
        )
        .await
        .unwrap();
    assert_eq!(changed.state, Some(closed.clone()));
    assert_eq!(
        changed.released,
        [ReleasedRun {
            id: id("released"),
            tenant: DEFAULT_TENANT.into(),
            job: "job".into(),
            deferred_until: probe_deadline,
        }]
    );
    for (run, was) in runs.iter().zip(&before) {
        let now = store.get_run(run.id).await.unwrap().unwrap();
        if run.id == id("released") {
            assert_eq!((now.status, now.run_after), (RunStatus::Pending, close));
            let ev = events_of(&store, run.id).await;
            let last = ev.last().unwrap();
            assert_eq!(last.kind, "deferral_released");
            assert_eq!(last.at, close);
            assert_eq!(
                last.data,
                json!({ "connection": "crm", "deferred_until": probe_deadline, "reason": "circuit_closed" })
            );
        } else {
            assert_eq!(&now, was, "{} is untouched", run.input["case"]);
        }
    }
    assert_eq!(
        store
            .breaker_get("crm".into())
            .await
            .unwrap()
            .unwrap()
            .state,
        closed
    );
    if store.backend() == "postgres" {
        let rx = wakeups.as_mut().expect("PostgreSQL has a wake-up channel");
        let job = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the release wakes workers")
            .unwrap();
        assert_eq!(job, "job");
    }
    // The runs are claimable at the close's time.
    let due: Vec<RunId> = store
        .claim(claim_req(close, 10))
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(due, [id("due_already"), id("released")]);
    // Once: a second close, or a change that does not release, moves nothing.
    for release in [true, false] {
        let again = store
            .breaker_change(
                "crm".into(),
                close.plus_millis(1),
                Box::new(move |_| BreakerWrite {
                    state: None,
                    release,
                }),
            )
            .await
            .unwrap();
        assert_eq!(
            (again.state, again.released),
            (Some(closed.clone()), vec![])
        );
    }
}

/// Generates one `#[tokio::test]` per conformance behaviour, each with a
/// fresh store from the factory.
///
/// Two forms:
/// - `conformance_tests!(EXPR)`: `EXPR` is evaluated inside each async test
///   and yields a `DynStore` (it may `.await`).
/// - `conformance_tests!(optional: EXPR)`: `EXPR` yields an
///   `Option<DynStore>`; `None` means the backend is not available here
///   (e.g. no database URL configured) and the test returns at once. The
///   factory should say why it skipped.
#[macro_export]
macro_rules! conformance_tests {
    (optional: $factory:expr) => {
        $crate::conformance_tests!(@names @optional $factory);
    };
    ($factory:expr) => {
        $crate::conformance_tests!(@names @required $factory);
    };
    (@names @$kind:ident $factory:expr) => {
        $crate::conformance_tests!(@each @$kind $factory;
            trigger_stores_run_and_event,
            trace_context_round_trips,
            idempotency_key_returns_existing_run,
            claim_order_and_eligibility,
            claim_limit_and_fifo,
            concurrency_key_limits_running_runs_in_claim_order,
            concurrency_key_slot_frees_on_every_exit,
            concurrency_key_holds_under_racing_claims,
            completion_is_fenced_by_lease,
            retry_records_the_decision,
            terminal_failure_records_reason,
            heartbeat_extends_and_detects_loss,
            expired_lease_retry_then_stale_completion,
            concurrent_reapers_reap_each_expired_lease_once,
            leadership_expires_and_is_fenced,
            stale_failure_reports_keep_their_error,
            release_postpone_and_input_forgive_attempts,
            batched_finish_isolates_each_end,
            circuit_deferral_is_not_a_failure,
            rate_buckets_take_reserve_and_use_reservations,
            rate_takes_race_without_losing_tokens,
            rate_take_many_is_takes_in_order_and_races_safely,
            breaker_updates_apply_one_after_another,
            list_filters_and_pagination,
            events_cursor_and_filters,
            tokens_create_find_list,
            tokens_revoke,
            tokens_keep_their_scope,
            workers_roster_upserts_and_counts_running,
            workers_not_seen_since_the_cutoff_are_forgotten,
            claim_by_tenant_takes_only_that_tenant,
            claims_share_slots_among_tenants,
            finish_and_claim_shares_slots_among_tenants,
            last_event_id_tracks_events,
            steps_are_stored_fenced_and_unique,
            ledger_rows_are_written_fenced,
            ledger_in_flight_until_the_holders_lease_expires,
            ledger_begin_race_has_one_winner,
            operator_cancel_by_state,
            operator_approve_and_reject,
            operator_retry_merges_variables_and_resets_budget,
            operator_skip_records_the_failed_step,
            operator_postpone_by_state,
            append_event_is_fenced,
            connections_default_enabled_and_set,
            connections_audit_every_change,
            json_at_any_depth_reads_back_or_is_refused,
            schedules_are_stored_changed_and_audited,
            schedule_ticks_fire_each_slot_once_under_the_fence,
            schedule_manual_fires_and_skips_are_history,
            breaker_close_releases_the_runs_it_deferred,
            rate_a_late_holders_token_goes_to_the_next_taker,
        );
    };
    (@each @required $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: $crate::DynStore = $factory;
                $crate::conformance::$name(store).await;
            }
        )*
    };
    (@each @optional $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: ::std::option::Option<$crate::DynStore> = $factory;
                if let ::std::option::Option::Some(store) = store {
                    $crate::conformance::$name(store).await;
                }
            }
        )*
    };
}

fn new_token(tenant: &str, name: &str, secret: &str) -> NewToken {
    NewToken {
        id: format!("tok-{tenant}-{name}-{secret}"),
        tenant: tenant.into(),
        name: name.into(),
        hash: format!("hash-of-{secret}"),
        scope: crate::TokenScope::Operator,
        created_at: T0,
    }
}

/// Tokens are stored by hash, found by hash, listed per tenant, and a name
/// is unique among a tenant's live tokens (a refused create writes nothing).
pub async fn tokens_create_find_list(store: DynStore) {
    let a = store
        .create_token(new_token("acme", "ci", "s1"))
        .await
        .unwrap();
    assert_eq!(a.tenant, "acme");
    assert_eq!(a.name, "ci");
    assert_eq!(a.revoked_at, None);
    let mut b = new_token("globex", "ci", "s2");
    b.created_at = T0.plus_millis(1);
    store.create_token(b).await.unwrap();
    let found = store
        .token_by_hash("hash-of-s1".into())
        .await
        .unwrap()
        .expect("found by hash");
    assert_eq!(found, a);
    assert!(store
        .token_by_hash("hash-of-nothing".into())
        .await
        .unwrap()
        .is_none());
    let dup = store
        .create_token(new_token("acme", "ci", "s3"))
        .await
        .unwrap_err();
    assert!(
        matches!(dup, StoreError::Conflict(ref m) if m.contains("acme") && m.contains("ci")),
        "{dup}"
    );
    assert!(store
        .token_by_hash("hash-of-s3".into())
        .await
        .unwrap()
        .is_none());
    let all = store.list_tokens(None).await.unwrap();
    assert_eq!(
        all.iter().map(|t| t.tenant.as_str()).collect::<Vec<_>>(),
        ["acme", "globex"]
    );
    let acme = store.list_tokens(Some("acme".into())).await.unwrap();
    assert_eq!(acme, vec![a]);
}

/// A revoked token stays listed with its revocation time, is found by hash
/// as revoked, cannot be revoked twice, and frees its name.
pub async fn tokens_revoke(store: DynStore) {
    let t = store
        .create_token(new_token("acme", "ops", "s1"))
        .await
        .unwrap();
    let later = T0.plus_millis(5_000);
    let revoked = store
        .revoke_token(t.id.clone(), later)
        .await
        .unwrap()
        .expect("revoked");
    assert_eq!(revoked.revoked_at, Some(later));
    assert!(store
        .revoke_token(t.id.clone(), later)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .revoke_token("no-such-token".into(), later)
        .await
        .unwrap()
        .is_none());
    let found = store
        .token_by_hash("hash-of-s1".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.revoked_at, Some(later));
    // The name is free again once its token is revoked.
    store
        .create_token(new_token("acme", "ops", "s2"))
        .await
        .unwrap();
    assert_eq!(
        store.list_tokens(Some("acme".into())).await.unwrap().len(),
        2
    );
}

/// `last_event_id` is `None` on an empty store, then the largest event id.
pub async fn last_event_id_tracks_events(store: DynStore) {
    assert_eq!(store.last_event_id().await.unwrap(), None);
    one(&store, NewRun::new("job", json!(1))).await;
    one(&store, NewRun::new("job", json!(2))).await;
    let events = store.events(EventFilter::default()).await.unwrap();
    let max = events.iter().map(|e| e.id).max();
    assert!(max.is_some());
    assert_eq!(store.last_event_id().await.unwrap(), max);
}

fn conn_change(tenant: &str, name: &str, status: ConnectionStatus, at: i64) -> ConnectionChange {
    ConnectionChange {
        tenant: tenant.into(),
        name: name.into(),
        status,
        actor: "ops".into(),
        comment: Some(format!("set {status}")),
        now: T0.plus_millis(at),
    }
}

/// A connection never changed has no stored state (it is enabled); a change
/// is stored per (tenant, name), listed per tenant, and read back.
pub async fn connections_default_enabled_and_set(store: DynStore) {
    assert_eq!(
        store
            .connection_state("acme".into(), "crm".into())
            .await
            .unwrap(),
        None
    );
    assert!(store.list_connection_states(None).await.unwrap().is_empty());
    let s = store
        .set_connection_status(conn_change("acme", "crm", ConnectionStatus::Disabled, 5))
        .await
        .unwrap();
    assert_eq!(s.status, ConnectionStatus::Disabled);
    assert_eq!(s.updated_at, T0.plus_millis(5));
    assert_eq!(s.updated_by, "ops");
    assert_eq!(s.comment.as_deref(), Some("set disabled"));
    assert!(!s.status.is_usable());
    // Another tenant's connection of the same name is separate.
    store
        .set_connection_status(conn_change("globex", "crm", ConnectionStatus::Expired, 6))
        .await
        .unwrap();
    let got = store
        .connection_state("acme".into(), "crm".into())
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(got, s);
    let all = store.list_connection_states(None).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|s| (s.tenant.as_str(), s.status))
            .collect::<Vec<_>>(),
        [
            ("acme", ConnectionStatus::Disabled),
            ("globex", ConnectionStatus::Expired)
        ]
    );
    let acme = store
        .list_connection_states(Some("acme".into()))
        .await
        .unwrap();
    assert_eq!(acme.len(), 1);
    let back = store
        .set_connection_status(conn_change("acme", "crm", ConnectionStatus::Enabled, 7))
        .await
        .unwrap();
    assert!(back.status.is_usable());
    // A change without an actor is refused and writes nothing.
    let mut bad = conn_change("acme", "crm", ConnectionStatus::Disabled, 8);
    bad.actor = String::new();
    assert!(matches!(
        store.set_connection_status(bad).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .connection_state("acme".into(), "crm".into())
            .await
            .unwrap()
            .unwrap()
            .status,
        ConnectionStatus::Enabled
    );
}

/// Every change, a repeated one included, writes an audit row with the
/// status before and after, the actor, the comment and the time.
pub async fn connections_audit_every_change(store: DynStore) {
    for (i, st) in [
        ConnectionStatus::Expired,
        ConnectionStatus::Expired,
        ConnectionStatus::Enabled,
    ]
    .into_iter()
    .enumerate()
    {
        store
            .set_connection_status(conn_change("acme", "billing", st, i as i64))
            .await
            .unwrap();
    }
    let audit = store
        .connection_audit("acme".into(), "billing".into())
        .await
        .unwrap();
    let steps: Vec<_> = audit
        .iter()
        .map(|a| (a.from_status, a.to_status, a.at))
        .collect();
    assert_eq!(
        steps,
        [
            (ConnectionStatus::Enabled, ConnectionStatus::Expired, T0),
            (
                ConnectionStatus::Expired,
                ConnectionStatus::Expired,
                T0.plus_millis(1)
            ),
            (
                ConnectionStatus::Expired,
                ConnectionStatus::Enabled,
                T0.plus_millis(2)
            ),
        ]
    );
    assert!(audit.windows(2).all(|w| w[0].id < w[1].id));
    assert!(audit.iter().all(|a| a.actor == "ops"
        && a.tenant == "acme"
        && a.name == "billing"
        && a.comment.is_some()));
    assert!(store
        .connection_audit("acme".into(), "crm".into())
        .await
        .unwrap()
        .is_empty());
}

/// The runs of the previous-release fixtures
/// (`tests/fixtures/{sqlite,postgres}_v2.sql`, schema version 2).
pub mod v2_fixture {
    /// Completed, with a completed step and a committed ledger row.
    pub const COMPLETED: &str = "019ad8a0-0000-7000-8000-00000000000a";
    /// Pending with a retry scheduled after a timeout.
    pub const RETRYING: &str = "019ad8a0-0000-7000-8000-00000000000b";
    /// Failed (invalid input), with a failed step.
    pub const FAILED: &str = "019ad8a0-0000-7000-8000-00000000000c";
    /// Pending, never claimed.
    pub const PENDING: &str = "019ad8a0-0000-7000-8000-00000000000d";
    /// Running (lease not expired at T0 + 30 s), with a progress event and
    /// a `started` ledger row.
    pub const RUNNING: &str = "019ad8a0-0000-7000-8000-00000000000e";
}

/// A store opened on a previous-release fixture (version 2) was migrated to
/// the newest version with every row intact and readable through the
/// `Store` API, and works for new runs. Both backends load the same rows.
pub async fn v2_fixture_migrates_with_data_intact(store: DynStore) {
    use v2_fixture::*;
    let id = |s: &str| -> RunId { s.parse().unwrap() };
    let run = |s: &'static str| {
        let store = store.clone();
        async move { store.get_run(id(s)).await.unwrap().expect(s) }
    };
    let all = store
        .events(EventFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let last_fixture_event = all.iter().map(|e| e.id).max().unwrap();

    let a = run(COMPLETED).await;
    assert_eq!(a.status, RunStatus::Completed);
    assert_eq!(a.input, json!({"n": COMPLETED}));
    assert_eq!(a.output, Some(json!({"sent": 1})));
    assert_eq!(a.priority, 9);
    assert_eq!(a.idempotency_key.as_deref(), Some("order-1"));
    assert_eq!(a.attempt, 1);
    assert_eq!(a.finished_at, Some(T0.plus_millis(5)));
    let att = store.attempts(a.id).await.unwrap();
    assert_eq!(att.len(), 1);
    assert_eq!(att[0].outcome, "completed");
    assert_eq!(att[0].worker, "w1");
    assert_eq!(att[0].started_at, T0.plus_millis(1));
    let steps = store.steps(a.id).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].name, "fetch");
    assert_eq!(steps[0].status, StepStatus::Completed);
    assert_eq!(steps[0].result, Some(json!({"rows": 3})));
    let l = store
        .ledger_get(DEFAULT_TENANT.into(), "order-1/send-email".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.state, LedgerState::Committed);
    assert_eq!(l.result, Some(json!({"message_id": "m-1"})));
    assert_eq!((l.run_id, l.attempt), (a.id, 1));
    assert_eq!(l.lease_id, att[0].lease_id);
    assert_eq!(
        kinds(&store, a.id).await,
        [
            "run_triggered",
            "attempt_started",
            "step_completed",
            "action_started",
            "action_committed",
            "run_completed"
        ]
    );

    let b = run(RETRYING).await;
    assert_eq!(b.status, RunStatus::Pending);
    assert_eq!(b.run_after, T0.plus_millis(60_011));
    assert_eq!(b.last_error_class, Some(ErrorClass::Timeout));
    assert_eq!(b.last_error_message.as_deref(), Some("timed out"));
    let att = store.attempts(b.id).await.unwrap();
    assert_eq!(att.len(), 1);
    assert_eq!(att[0].outcome, "failed");
    assert_eq!(att[0].retry_policy.as_deref(), Some("default"));
    assert_eq!(att[0].delay_ms, Some(60_000));
    assert_eq!(att[0].eligible_at, Some(T0.plus_millis(60_011)));

    let c = run(FAILED).await;
    assert_eq!(c.status, RunStatus::Failed);
    assert_eq!(c.terminal_reason, Some(TerminalReason::InvalidInput));
    let steps = store.steps(c.id).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].status, StepStatus::Failed);
    assert_eq!(steps[0].error_class, Some(ErrorClass::InvalidInput));
    assert_eq!(
        steps[0].error_message.as_deref(),
        Some("field `to` missing")
    );
    assert_eq!(store.attempts(c.id).await.unwrap()[0].outcome, "failed");

    let d = run(PENDING).await;
    assert_eq!(d.status, RunStatus::Pending);
    assert_eq!(d.attempt, 0);
    assert_eq!(d.run_after, T0.plus_millis(1_000_000));
    assert!(store.attempts(d.id).await.unwrap().is_empty());

    let e = run(RUNNING).await;
    assert_eq!(e.status, RunStatus::Running);
    assert_eq!(e.lease_expires_at, Some(T0.plus_millis(30_030)));
    let progress: Vec<_> = store
        .events(EventFilter {
            run_id: Some(e.id),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.kind == "progress")
        .collect();
    assert_eq!(progress.len(), 1);
    assert_eq!(progress[0].data, json!({"done": 1, "of": 2}));
    let held = store
        .ledger_get(DEFAULT_TENANT.into(), "order-2/charge".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((held.state, held.run_id), (LedgerState::Started, e.id));
    // The running attempt's lease still fences its writes.
    let lease = LeaseRef {
        run_id: e.id,
        lease_id: e.lease_id.unwrap(),
    };
    store
        .save_step(lease, "after-upgrade".into(), json!(1), T0.plus_millis(40))
        .await
        .unwrap();

    // Constraints came through: the idempotency key still deduplicates.
    let mut again = NewRun::new("job", json!({}));
    again.idempotency_key = Some("order-1".into());
    let t = store.trigger(vec![again], T0).await.unwrap().remove(0);
    assert!(t.existing);
    assert_eq!(t.run.id, a.id);

    // New work goes through, with event ids after the fixture's.
    let n = NewRun::new("after-migration", json!({"new": true}));
    one(&store, n.clone()).await;
    let mut req = claim_req(T0.plus_millis(100), 1);
    req.jobs = vec!["after-migration".into()];
    let claimed = store.claim(req).await.unwrap().remove(0);
    assert_eq!(claimed.id, n.id);
    let st = store
        .finish(vec![AttemptEnd {
            run_id: n.id,
            lease_id: claimed.lease_id.unwrap(),
            now: T0.plus_millis(101),
            outcome: Outcome::Completed { output: json!(7) },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(st, RunStatus::Completed);
    let new_events = store
        .events(EventFilter {
            run_id: Some(n.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        new_events
            .iter()
            .map(|e| e.kind.as_str())
            .collect::<Vec<_>>(),
        ["run_triggered", "attempt_started", "run_completed"]
    );
    assert!(new_events.iter().all(|e| e.id > last_fixture_event));
    // And the table the migration added works.
    assert!(store
        .try_lead("pruner".into(), "a".into(), T0, 1_000)
        .await
        .unwrap()
        .is_some());
}

/// A token keeps its scope: `operator` by default, `worker` when asked,
/// read back by hash and in listings.
pub async fn tokens_keep_their_scope(store: DynStore) {
    let op = store
        .create_token(new_token("acme", "ops", "s1"))
        .await
        .unwrap();
    assert_eq!(op.scope, TokenScope::Operator);
    let mut w = new_token("acme", "billing-worker", "s2");
    w.scope = TokenScope::Worker;
    w.created_at = T0.plus_millis(1);
    let w = store.create_token(w).await.unwrap();
    assert_eq!(w.scope, TokenScope::Worker);
    let found = store
        .token_by_hash("hash-of-s2".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.scope, TokenScope::Worker);
    let listed = store.list_tokens(Some("acme".into())).await.unwrap();
    assert_eq!(
        listed.iter().map(|t| t.scope).collect::<Vec<_>>(),
        [TokenScope::Operator, TokenScope::Worker]
    );
}

/// The worker roster: a claim registers a worker with its jobs, a heartbeat
/// (no jobs) only moves `last_seen_at` (never back), tenants are apart, and
/// `running` counts the tenant's runs running under the worker's name.
pub async fn workers_roster_upserts_and_counts_running(store: DynStore) {
    let seen = |tenant: &str, name: &str, jobs: Option<&[&str]>, at: i64| WorkerSeen {
        tenant: tenant.into(),
        name: name.into(),
        jobs: jobs.map(|j| j.iter().map(|s| s.to_string()).collect()),
        now: T0.plus_millis(at),
    };
    store
        .touch_worker(seen("acme", "w1", Some(&["job", "b", "job"]), 0))
        .await
        .unwrap();
    store
        .touch_worker(seen("acme", "w1", None, 500))
        .await
        .unwrap();
    // A late, older heartbeat does not move the time back.
    store
        .touch_worker(seen("acme", "w1", None, 100))
        .await
        .unwrap();
    store
        .touch_worker(seen("globex", "w1", Some(&["job"]), 50))
        .await
        .unwrap();
    let mut r = NewRun::new("job", json!({}));
    r.tenant = "acme".into();
    one(&store, r).await;
    store.claim(claim_req(T0, 1)).await.unwrap();
    let acme = store.list_workers(Some("acme".into())).await.unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0].name, "w1");
    assert_eq!(acme[0].jobs, ["b", "job"]);
    assert_eq!(acme[0].first_seen_at, T0);
    assert_eq!(acme[0].last_seen_at, T0.plus_millis(500));
    assert_eq!(acme[0].running, 1, "claimed by worker w1 (claim_req)");
    let globex = store.list_workers(Some("globex".into())).await.unwrap();
    assert_eq!(globex.len(), 1);
    assert_eq!(globex[0].running, 0, "the running run is acme's");
    let all = store.list_workers(None).await.unwrap();
    assert_eq!(
        all.iter().map(|w| w.tenant.as_str()).collect::<Vec<_>>(),
        ["acme", "globex"],
        "most recently seen first"
    );
}

/// Forgetting workers removes exactly those last seen before the cutoff
/// that hold no running run; the cutoff itself is kept.
pub async fn workers_not_seen_since_the_cutoff_are_forgotten(store: DynStore) {
    let seen = |tenant: &str, name: &str, at: i64| WorkerSeen {
        tenant: tenant.into(),
        name: name.into(),
        jobs: Some(vec!["job".into()]),
        now: T0.plus_millis(at),
    };
    // w1 (acme) runs a run and is long silent; w2 is silent and idle; w3 was
    // seen exactly at the cutoff; globex's old one is idle too.
    for (tenant, name, at) in [
        ("acme", "w1", 0),
        ("acme", "w2", 10),
        ("acme", "w3", 1_000),
        ("globex", "old", 20),
    ] {
        store.touch_worker(seen(tenant, name, at)).await.unwrap();
    }
    let mut r = NewRun::new("job", json!({}));
    r.tenant = "acme".into();
    one(&store, r).await;
    store.claim(claim_req(T0, 1)).await.unwrap();
    let n = store.forget_workers(T0.plus_millis(1_000)).await.unwrap();
    assert_eq!(n, 2, "w2 and globex/old");
    let left: Vec<(String, String)> = store
        .list_workers(None)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.tenant, w.name))
        .collect();
    assert_eq!(
        left,
        [
            ("acme".to_string(), "w3".to_string()),
            ("acme".to_string(), "w1".to_string())
        ],
        "the one at the cutoff, and the one still running a run"
    );
    assert_eq!(
        store.forget_workers(T0.plus_millis(1_000)).await.unwrap(),
        0
    );
}

/// A claim naming a tenant takes only that tenant's runs, in claim order;
/// without one it takes every tenant's.
pub async fn claim_by_tenant_takes_only_that_tenant(store: DynStore) {
    let mut ids = Vec::new();
    for (i, tenant) in ["acme", "globex", "acme"].iter().enumerate() {
        let mut r = NewRun::new("job", json!({ "i": i }));
        r.tenant = tenant.to_string();
        r.run_after = Some(T0.plus_millis(i as i64));
        ids.push(one(&store, r).await.id);
    }
    let mut req = claim_req(T0.plus_millis(10), 10);
    req.tenant = Some("acme".into());
    let got = store.claim(req).await.unwrap();
    assert_eq!(
        got.iter().map(|r| r.id).collect::<Vec<_>>(),
        [ids[0], ids[2]]
    );
    assert!(got.iter().all(|r| r.tenant == "acme"));
    let mut req = claim_req(T0.plus_millis(10), 10);
    req.tenant = Some("initech".into());
    assert!(store.claim(req).await.unwrap().is_empty());
    let rest = store
        .claim(claim_req(T0.plus_millis(10), 10))
        .await
        .unwrap();
    assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[1]]);
}

/// `n` due runs of `tenant`, each due one millisecond after the previous,
/// starting at `from`.
async fn backlog(store: &DynStore, tenant: &str, n: usize, from: Timestamp) -> Vec<RunId> {
    let runs: Vec<NewRun> = (0..n)
        .map(|i| {
            let mut r = NewRun::new("job", json!({ "tenant": tenant, "i": i }));
            r.tenant = tenant.into();
            r.run_after = Some(from.plus_millis(i as i64));
            r
        })
        .collect();
    let ids = runs.iter().map(|r| r.id).collect();
    store.trigger(runs, T0).await.unwrap();
    ids
}

fn tenants_of(runs: &[Run]) -> Vec<String> {
    runs.iter().map(|r| r.tenant.clone()).collect()
}

/// Tenant fairness (`plan::fair`): one tenant's backlog, due earlier, does
/// not hold back another tenant's run. Claims of one slot visit the
/// tenants in turn; a larger claim deals its slots round-robin and gives
/// the slots a tenant cannot use to the tenants that filled theirs; within
/// a tenant the claim order is unchanged.
pub async fn claims_share_slots_among_tenants(store: DynStore) {
    let a = backlog(&store, "a", 40, T0).await;
    let b = backlog(&store, "b", 1, T0.plus_millis(100)).await;
    let c = backlog(&store, "c", 2, T0.plus_millis(200)).await;
    let now = T0.plus_millis(1_000);
    // One slot per claim: a, b, c, then a again (the rotation wraps).
    let mut served = Vec::new();
    for _ in 0..4 {
        let got = store.claim(claim_req(now, 1)).await.unwrap();
        assert_eq!(got.len(), 1);
        served.push(got[0].clone());
    }
    assert_eq!(tenants_of(&served), ["a", "b", "c", "a"]);
    // Within a tenant, claim order: a's oldest first, then its next.
    assert_eq!(
        served.iter().map(|r| r.id).collect::<Vec<_>>(),
        [a[0], b[0], c[0], a[1]]
    );
    // Eight slots, b has nothing left, c one run: c takes its one, a the
    // other seven (refilled), none left idle while a has due runs.
    let got = store.claim(claim_req(now, 8)).await.unwrap();
    assert_eq!(got.len(), 8);
    let mut ts = tenants_of(&got);
    ts.sort();
    assert_eq!(ts, ["a", "a", "a", "a", "a", "a", "a", "c"]);
    assert!(got.iter().any(|r| r.id == c[1]));
    let a_ids: Vec<RunId> = got
        .iter()
        .filter(|r| r.tenant == "a")
        .map(|r| r.id)
        .collect();
    assert_eq!(a_ids, a[2..9], "a's runs in claim order");
    // A claim scoped to one tenant takes only that tenant's runs.
    let mut req = claim_req(now, 3);
    req.tenant = Some("a".into());
    assert_eq!(
        tenants_of(&store.claim(req).await.unwrap()),
        ["a", "a", "a"]
    );
    // A run of another tenant triggered now is served by the next claim,
    // ahead of a's 28 older runs.
    let d = backlog(&store, "d", 1, now).await;
    let mut first_d = None;
    for i in 0..2 {
        let got = store.claim(claim_req(now, 1)).await.unwrap();
        if got[0].tenant == "d" {
            first_d = Some(i);
            assert_eq!(got[0].id, d[0]);
        }
    }
    assert!(first_d.is_some(), "d is served within two one-slot claims");
    // A tenant whose only run is due later passes its slot on: no claim
    // comes back empty while a's runs are due.
    backlog(&store, "e", 1, now.plus_millis(60_000)).await;
    for _ in 0..4 {
        let got = store.claim(claim_req(now, 1)).await.unwrap();
        assert_eq!(tenants_of(&got), ["a"]);
    }
}

/// The combined end-and-claim shares its claim among tenants too: ending
/// an attempt of the tenant with the backlog and refilling the slot in the
/// same call serves the other tenant's waiting run.
pub async fn finish_and_claim_shares_slots_among_tenants(store: DynStore) {
    backlog(&store, "a", 10, T0).await;
    let now = T0.plus_millis(1_000);
    let first = store.claim(claim_req(now, 1)).await.unwrap();
    assert_eq!(tenants_of(&first), ["a"]);
    backlog(&store, "b", 1, now).await;
    let end = AttemptEnd {
        run_id: first[0].id,
        lease_id: first[0].lease_id.unwrap(),
        outcome: Outcome::Completed {
            output: json!(null),
        },
        now,
    };
    let (ended, got) = store
        .finish_and_claim(vec![end], vec![claim_req(now, 1)])
        .await
        .unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].as_ref().unwrap(), &RunStatus::Completed);
    assert_eq!(tenants_of(&got), ["b"], "b's run, not a's next");
    let (_, got) = store
        .finish_and_claim(Vec::new(), vec![claim_req(now, 4)])
        .await
        .unwrap();
    assert_eq!(tenants_of(&got), ["a", "a", "a", "a"]);
}

fn sched_def(tenant: &str, name: &str) -> ScheduleDef {
    ScheduleDef {
        tenant: tenant.into(),
        name: name.into(),
        job: "job".into(),
        input: json!({"slot": "{{ slot }}"}),
        cron: Some("*/5 * * * *".into()),
        every_ms: None,
        timezone: "Europe/Berlin".into(),
        start_at: None,
        end_at: None,
        jitter_ms: 0,
        overlap: docket_core::schedule::Overlap::Skip,
        catch_up: docket_core::schedule::CatchUp::Last,
        catch_up_window_ms: 3_600_000,
        paused: false,
        source: "api".into(),
    }
}

fn sched_put(def: ScheduleDef, now: Timestamp) -> SchedulePut {
    SchedulePut {
        def,
        actor: "alice".into(),
        comment: Some("why".into()),
        now,
    }
}

fn slot_run(tenant: &str, name: &str, slot: Timestamp) -> NewRun {
    let mut r = NewRun::new("job", json!({ "slot": slot }));
    r.tenant = tenant.into();
    r.idempotency_key = Some(docket_core::schedule::slot_key(name, slot));
    r.actor = Some(format!("schedule:{name}"));
    r
}

fn fire(tenant: &str, name: &str, slot: Timestamp, kind: SlotKind) -> SlotOutcome {
    SlotOutcome {
        slot,
        kind,
        run: Some(slot_run(tenant, name, slot)),
        reason: None,
    }
}

/// Schedules are created, changed (cursor kept), listed per tenant, paused
/// and resumed (the cursor jumps to now: no catch-up of paused slots) and
/// deleted; every change is a history row with who and why, an identical
/// definition writes nothing, and the history outlives the schedule.
pub async fn schedules_are_stored_changed_and_audited(store: DynStore) {
    let (s, o) = store
        .put_schedule(sched_put(sched_def("acme", "nightly"), T0))
        .await
        .unwrap();
    assert_eq!(o, PutOutcome::Created);
    assert_eq!(s.cursor_at, T0, "no slot before its creation fires");
    assert_eq!(s.def, sched_def("acme", "nightly"));
    let (_, o) = store
        .put_schedule(sched_put(sched_def("acme", "nightly"), T0.plus_millis(5)))
        .await
        .unwrap();
    assert_eq!(o, PutOutcome::Unchanged);
    store
        .put_schedule(sched_put(sched_def("globex", "nightly"), T0))
        .await
        .unwrap();
    let mut changed = sched_def("acme", "nightly");
    changed.cron = Some("0 * * * *".into());
    changed.overlap = docket_core::schedule::Overlap::BufferOne;
    let (s, o) = store
        .put_schedule(sched_put(changed.clone(), T0.plus_millis(10)))
        .await
        .unwrap();
    assert_eq!(o, PutOutcome::Updated);
    assert_eq!(
        (s.def.clone(), s.cursor_at, s.created_at),
        (changed, T0, T0)
    );
    assert_eq!(s.updated_at, T0.plus_millis(10));
    let acme = store.list_schedules(Some("acme".into())).await.unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(store.list_schedules(None).await.unwrap().len(), 2);
    // Pause, pause again (nothing), resume an hour later: cursor jumps.
    let p = store
        .set_schedule_paused(
            "acme".into(),
            "nightly".into(),
            true,
            "bob".into(),
            Some("maintenance".into()),
            T0.plus_millis(20),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(p.def.paused);
    store
        .set_schedule_paused(
            "acme".into(),
            "nightly".into(),
            true,
            "bob".into(),
            None,
            T0.plus_millis(30),
        )
        .await
        .unwrap();
    let later = T0.plus_millis(3_600_000);
    let r = store
        .set_schedule_paused(
            "acme".into(),
            "nightly".into(),
            false,
            "bob".into(),
            None,
            later,
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!r.def.paused);
    assert_eq!(r.cursor_at, later);
    assert!(store
        .set_schedule_paused(
            "acme".into(),
            "nope".into(),
            true,
            "bob".into(),
            None,
            later
        )
        .await
        .unwrap()
        .is_none());
    assert!(store
        .delete_schedule(
            "acme".into(),
            "nightly".into(),
            "carol".into(),
            Some("gone".into()),
            later
        )
        .await
        .unwrap());
    assert!(!store
        .delete_schedule("acme".into(), "nightly".into(), "carol".into(), None, later)
        .await
        .unwrap());
    assert!(store
        .get_schedule("acme".into(), "nightly".into())
        .await
        .unwrap()
        .is_none());
    assert!(store
        .get_schedule("globex".into(), "nightly".into())
        .await
        .unwrap()
        .is_some());
    let h = store
        .schedule_history("acme".into(), "nightly".into(), 100)
        .await
        .unwrap();
    let kinds: Vec<&str> = h.iter().rev().map(|h| h.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["created", "updated", "paused", "resumed", "deleted"]
    );
    assert_eq!(h[0].actor.as_deref(), Some("carol"));
    assert_eq!(h[0].comment.as_deref(), Some("gone"));
    assert_eq!(h[2].comment.as_deref(), Some("maintenance"));
    assert_eq!(h[3].data["cron"], json!("0 * * * *"));
    assert_eq!(
        store
            .schedule_history("globex".into(), "nightly".into(), 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A tick fires its slots' runs, writes their history and moves the cursor
/// in one transaction, only under a live fencing token and only from the
/// cursor it read: a stale leader, a repeated tick and a racing tick change
/// nothing, so each slot makes exactly one run.
pub async fn schedule_ticks_fire_each_slot_once_under_the_fence(store: DynStore) {
    store
        .put_schedule(sched_put(sched_def("acme", "s"), T0))
        .await
        .unwrap();
    let token = store
        .try_lead("schedules".into(), "p1".into(), T0, 10_000)
        .await
        .unwrap()
        .unwrap();
    let slot1 = T0.plus_millis(300_000);
    let slot2 = T0.plus_millis(600_000);
    let tick = |fence, expect: Timestamp, slots: Vec<SlotOutcome>, now: Timestamp| ScheduleTick {
        tenant: "acme".into(),
        name: "s".into(),
        fence: Some(("schedules".to_string(), fence)),
        expect_cursor: Some(expect),
        new_cursor: slots.last().map(|s: &SlotOutcome| s.slot),
        set_buffer: None,
        slots,
        actor: "scheduler".into(),
        comment: None,
        now,
    };
    let now = slot1.plus_millis(40);
    let out = store
        .schedule_tick(tick(
            token,
            T0,
            vec![fire("acme", "s", slot1, SlotKind::Fired)],
            now.min(T0.plus_millis(9_999)),
        ))
        .await
        .unwrap();
    assert!(out.applied);
    assert_eq!(out.runs.len(), 1);
    assert!(!out.runs[0].existing);
    let run = &out.runs[0].run;
    assert_eq!(run.tenant, "acme");
    assert_eq!(
        run.idempotency_key.as_deref(),
        Some("schedule:s:2026-01-01T00:05:00.000Z")
    );
    let s = store
        .get_schedule("acme".into(), "s".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.cursor_at, s.last_slot, s.last_run_id),
        (slot1, Some(slot1), Some(run.id))
    );
    // The same tick again (a retry whose answer was lost): the cursor moved.
    let again = store
        .schedule_tick(tick(
            token,
            T0,
            vec![fire("acme", "s", slot1, SlotKind::Fired)],
            T0.plus_millis(9_000),
        ))
        .await
        .unwrap();
    assert!(!again.applied);
    // The lead expires; p2 takes over. p1's token no longer writes.
    let later = T0.plus_millis(20_000);
    let t2 = store
        .try_lead("schedules".into(), "p2".into(), later, 10_000)
        .await
        .unwrap()
        .unwrap();
    let stale = store
        .schedule_tick(tick(
            token,
            slot1,
            vec![fire("acme", "s", slot2, SlotKind::Fired)],
            later,
        ))
        .await
        .unwrap();
    assert!(!stale.applied, "a stale leader wrote");
    // Two ticks from the same cursor at once: one applies.
    let (a, b) = tokio::join!(
        store.schedule_tick(tick(
            t2,
            slot1,
            vec![fire("acme", "s", slot2, SlotKind::Fired)],
            later
        )),
        store.schedule_tick(tick(
            t2,
            slot1,
            vec![fire("acme", "s", slot2, SlotKind::Fired)],
            later
        ))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.applied != b.applied, "{a:?} {b:?}");
    // A skipped slot is history with its reason, no run.
    let slot3 = T0.plus_millis(900_000);
    let skip = store
        .schedule_tick(tick(
            t2,
            slot2,
            vec![SlotOutcome {
                slot: slot3,
                kind: SlotKind::Skipped,
                run: None,
                reason: Some("previous_run_unfinished".into()),
            }],
            T0.plus_millis(25_000),
        ))
        .await
        .unwrap();
    assert!(skip.applied && skip.runs.is_empty());
    let runs = store
        .list_runs(RunFilter {
            tenant: Some("acme".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 2, "one run per slot");
    let h = store
        .schedule_history("acme".into(), "s".into(), 100)
        .await
        .unwrap();
    let slots: Vec<(&str, Option<Timestamp>, Option<&str>)> = h
        .iter()
        .rev()
        .skip(1)
        .map(|h| (h.kind.as_str(), h.slot_at, h.reason.as_deref()))
        .collect();
    assert_eq!(
        slots,
        [
            ("fired", Some(slot1), None),
            ("fired", Some(slot2), None),
            ("skipped", Some(slot3), Some("previous_run_unfinished"))
        ]
    );
    assert_eq!(h[2].run_id, Some(run.id));
    let s = store
        .get_schedule("acme".into(), "s".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.cursor_at, s.last_slot), (slot3, Some(slot2)));
    // A deleted schedule's tick changes nothing.
    store
        .delete_schedule("acme".into(), "s".into(), "op".into(), None, later)
        .await
        .unwrap();
    let gone = store
        .schedule_tick(tick(
            t2,
            slot3,
            vec![fire(
                "acme",
                "s",
                T0.plus_millis(1_200_000),
                SlotKind::Fired,
            )],
            later,
        ))
        .await
        .unwrap();
    assert!(!gone.applied);
}

/// Operator fires (trigger now, backfill) leave the cursor alone, reuse the
/// slot's run when it exists (same key), and a buffered slot is kept and
/// cleared by ticks.
pub async fn schedule_manual_fires_and_skips_are_history(store: DynStore) {
    store
        .put_schedule(sched_put(sched_def(DEFAULT_TENANT, "b"), T0))
        .await
        .unwrap();
    let slots: Vec<Timestamp> = (1..=3).map(|i| T0.plus_millis(i * 300_000)).collect();
    let manual = |outcomes: Vec<SlotOutcome>| ScheduleTick {
        tenant: DEFAULT_TENANT.into(),
        name: "b".into(),
        fence: None,
        expect_cursor: None,
        new_cursor: Some(T0.plus_millis(1)),
        set_buffer: None,
        slots: outcomes,
        actor: "alice".into(),
        comment: Some("backfill the outage".into()),
        now: T0.plus_millis(2_000_000),
    };
    let first = store
        .schedule_tick(manual(vec![fire(
            DEFAULT_TENANT,
            "b",
            slots[0],
            SlotKind::Backfilled,
        )]))
        .await
        .unwrap();
    let out = store
        .schedule_tick(manual(
            slots
                .iter()
                .map(|s| fire(DEFAULT_TENANT, "b", *s, SlotKind::Backfilled))
                .collect(),
        ))
        .await
        .unwrap();
    assert!(out.applied);
    assert_eq!(
        out.runs.iter().map(|t| t.existing).collect::<Vec<_>>(),
        [true, false, false]
    );
    assert_eq!(out.runs[0].run.id, first.runs[0].run.id);
    let s = store
        .get_schedule(DEFAULT_TENANT.into(), "b".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.cursor_at, T0,
        "an operator's fire does not move the cursor"
    );
    assert_eq!(s.last_slot, Some(slots[2]));
    let h = store
        .schedule_history(DEFAULT_TENANT.into(), "b".into(), 2)
        .await
        .unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].kind, "backfilled");
    assert_eq!(h[0].comment.as_deref(), Some("backfill the outage"));
    assert_eq!(h[0].data["late_ms"], json!(2_000_000 - 900_000));
    // Buffer a slot, then clear it.
    let mut b = manual(vec![SlotOutcome {
        slot: slots[2],
        kind: SlotKind::Buffered,
        run: None,
        reason: None,
    }]);
    b.set_buffer = Some(Some(slots[2]));
    store.schedule_tick(b).await.unwrap();
    let s = store
        .get_schedule(DEFAULT_TENANT.into(), "b".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.buffered_slot, Some(slots[2]));
    let mut c = manual(vec![]);
    c.set_buffer = Some(None);
    store.schedule_tick(c).await.unwrap();
    let s = store
        .get_schedule(DEFAULT_TENANT.into(), "b".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.buffered_slot, None);
    // A fired kind without a run is refused, writing nothing.
    let bad = store
        .schedule_tick(manual(vec![SlotOutcome {
            slot: slots[0],
            kind: SlotKind::Fired,
            run: None,
            reason: None,
        }]))
        .await;
    assert!(bad.is_err());
}
