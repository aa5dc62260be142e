//! Conformance cases of retention, pausing and deletion (see
//! [`retention`](crate::retention)), run against every backend by
//! [`retention_conformance_tests!`](crate::retention_conformance_tests) like
//! the main suite.

use crate::retention::*;
use crate::*;
use docket_core::{ErrorClass, RunStatus, TerminalReason, Timestamp};
use serde_json::json;

/// A fixed starting instant for tests: 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp(1_767_225_600_000);
const HOUR: i64 = 3_600_000;

fn claim_of(jobs: &[&str], now: Timestamp, limit: usize) -> ClaimRequest {
    ClaimRequest {
        jobs: jobs.iter().map(|j| j.to_string()).collect(),
        limit,
        now,
        lease_ms: 30_000,
        worker: "w1".into(),
        tenant: None,
    }
}

/// Triggers a run of `job` at `at` and claims it (it is the only due run).
async fn claimed_at(store: &DynStore, job: &str, at: Timestamp) -> (Run, LeaseRef) {
    let id = store
        .trigger(vec![NewRun::new(job, json!({}))], at)
        .await
        .unwrap()
        .remove(0)
        .run
        .id;
    let run = store
        .claim(claim_of(&[job], at, 1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(run.id, id);
    let lease = LeaseRef {
        run_id: run.id,
        lease_id: run.lease_id.unwrap(),
    };
    (run, lease)
}

/// A run of `job` brought to the final `status` at `at`, with a step and
/// a few events.
async fn final_run(store: &DynStore, job: &str, status: RunStatus, at: Timestamp) -> RunId {
    let (run, lease) = claimed_at(store, job, at).await;
    store
        .save_step(lease, "s1".into(), json!({"ok": 1}), at)
        .await
        .unwrap();
    let outcome = match status {
        RunStatus::Completed => Outcome::Completed { output: json!(1) },
        RunStatus::Failed => Outcome::Failed {
            error: Some(ErrorInfo {
                class: ErrorClass::Permanent,
                message: "no".into(),
                fingerprint: "fp".into(),
                failure_key: "fk".into(),
                action: None,
            }),
            reason: TerminalReason::PermanentError,
            detail: "no".into(),
        },
        RunStatus::Cancelled => Outcome::Cancelled,
        other => panic!("{other} is not final"),
    };
    let got = store
        .finish(vec![AttemptEnd {
            run_id: run.id,
            lease_id: lease.lease_id,
            now: at,
            outcome,
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(got, status);
    run.id
}

use crate::conformance::events_of;

async fn all_events(store: &DynStore) -> Vec<EventRecord> {
    store
        .events(EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Whether the run and all its rows are gone (true) or all there (false).
async fn gone(store: &DynStore, id: RunId) -> bool {
    let run = store.get_run(id).await.unwrap();
    let attempts = store.attempts(id).await.unwrap();
    let events = events_of(store, id).await;
    let steps = store.steps(id).await.unwrap();
    match run {
        None => {
            assert!(attempts.is_empty(), "attempts of pruned run {id} left");
            assert!(
                events.iter().all(|e| e.kind == RUN_DELETED),
                "events of pruned run {id} left: {events:?}"
            );
            assert!(steps.is_empty(), "steps of pruned run {id} left");
            true
        }
        Some(run) => {
            // A kept run keeps its history (a pending run has no attempt yet).
            assert!(!events.is_empty());
            assert!(run.attempt == 0 || !attempts.is_empty());
            false
        }
    }
}

fn config() -> RetentionConfig {
    let mut c = RetentionConfig {
        default: Retention {
            completed_ms: Some(HOUR),
            failed_ms: Some(2 * HOUR),
            cancelled_ms: None,
        },
        ..Default::default()
    };
    c.jobs.insert(
        "slow".into(),
        Retention {
            completed_ms: Some(3 * HOUR),
            ..Default::default()
        },
    );
    c
}

/// Pruning removes exactly the final runs past their (per job, per status)
/// window with all their attempts, events and steps; it never touches a
/// non-final run or one still inside its window; it reports counts per job
/// in one `runs_pruned` event; and it proceeds in bounded batches.
pub async fn prune_removes_exactly_the_eligible_runs(store: DynStore) {
    let a_done: Vec<RunId> = futures_seq(&store, "fast", RunStatus::Completed, 3).await;
    let a_failed = final_run(&store, "fast", RunStatus::Failed, T0).await;
    let a_cancelled = final_run(&store, "fast", RunStatus::Cancelled, T0).await;
    let slow_done = final_run(&store, "slow", RunStatus::Completed, T0).await;
    let late_done = final_run(&store, "fast", RunStatus::Completed, T0.plus_millis(HOUR)).await;
    // Non-final runs, some of them old: pending, running, retried by an
    // operator after failing (pending again, finished_at cleared).
    let (running, _) = claimed_at(&store, "other", T0).await;
    let retried = final_run(&store, "fast", RunStatus::Failed, T0).await;
    store
        .operator(OperatorRequest {
            run_id: retried,
            actor: "ops".into(),
            comment: None,
            now: T0,
            command: OperatorCommand::Retry {
                updated_variables: None,
            },
        })
        .await
        .unwrap();

    let pending = store
        .trigger(vec![NewRun::new("fast", json!({}))], T0)
        .await
        .unwrap()
        .remove(0)
        .run
        .id;
    let now = T0.plus_millis(HOUR + 1);
    let mut req = config().plan(now, 2);
    // Bounded batches: 3 eligible runs with a limit of 2.
    let first = store.prune(req.clone()).await.unwrap();
    assert_eq!(first.runs(), 2);
    assert!(first.is_full(2));
    let second = store.prune(req.clone()).await.unwrap();
    assert_eq!(second.runs(), 1);
    assert!(!second.is_full(2));
    req.limit = 100;
    let third = store.prune(req.clone()).await.unwrap();
    assert_eq!(third, PruneReport::default(), "nothing more is eligible");
    for id in &a_done {
        assert!(gone(&store, *id).await);
    }
    for id in [
        a_failed,
        a_cancelled,
        slow_done,
        late_done,
        pending,
        running.id,
        retried,
    ] {
        assert!(!gone(&store, id).await, "{id} was pruned");
    }
    // Counts per job: (steps, attempts) one each per run; events as written.
    let total = |f: fn(&PrunedJob) -> u64| -> u64 {
        [&first, &second]
            .iter()
            .flat_map(|r| r.jobs.iter())
            .map(f)
            .sum()
    };
    assert_eq!(total(|p| p.completed), 3);
    assert_eq!(total(|p| p.attempts), 3);
    assert_eq!(total(|p| p.steps), 3);
    assert_eq!(
        total(|p| p.events),
        3 * 4,
        "triggered, started, step, completed"
    );
    let pruned: Vec<EventRecord> = all_events(&store)
        .await
        .into_iter()
        .filter(|e| e.kind == RUNS_PRUNED)
        .collect();
    assert_eq!(pruned.len(), 2, "one event per batch and job");
    assert!(pruned.iter().all(|e| e.run_id == NO_RUN && e.job == "fast"));
    assert_eq!(pruned[0].data["completed"], json!(2));
    assert_eq!(pruned[0].data["events"], json!(8));
    assert_eq!(pruned[1].data["runs"], json!(1));

    // Later: failed (2 h) and the late completed run go; slow (3 h) stays.
    let report = store
        .prune(config().plan(T0.plus_millis(2 * HOUR), 100))
        .await
        .unwrap();
    assert_eq!(report.runs(), 2);
    assert!(gone(&store, a_failed).await && gone(&store, late_done).await);
    assert!(!gone(&store, slow_done).await);
    let report = store
        .prune(config().plan(T0.plus_millis(3 * HOUR), 100))
        .await
        .unwrap();
    assert_eq!(report.jobs.len(), 1);
    assert_eq!(report.jobs[0].job, "slow");
    assert!(gone(&store, slow_done).await);
    // Cancelled runs have no window: kept forever; non-final runs too.
    let report = store
        .prune(config().plan(T0.plus_millis(1000 * HOUR), 100))
        .await
        .unwrap();
    assert_eq!(report.runs(), 0);
    for id in [a_cancelled, pending, running.id, retried] {
        assert!(!gone(&store, id).await);
    }
    // A class naming a non-final status is refused.
    let bad = PruneRequest {
        classes: vec![PruneClass {
            jobs: JobSelector::AllExcept(vec![]),
            status: RunStatus::Pending,
            finished_before: T0.plus_millis(1000 * HOUR),
        }],
        ledger_before: None,
        limit: 10,
        now: T0,
        lead: None,
    };
    assert!(store.prune(bad).await.is_err());
    assert!(!gone(&store, pending).await);
}

async fn futures_seq(store: &DynStore, job: &str, status: RunStatus, n: usize) -> Vec<RunId> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(final_run(store, job, status, T0).await);
    }
    out
}

/// Commits `key` for a run of `job` (claimed at `at`), then completes it.
async fn commit_effect(store: &DynStore, key: &str, at: Timestamp) -> RunId {
    let (run, lease) = claimed_at(store, "mail", at).await;
    let begun = store
        .ledger_begin(lease, key.into(), "send".into(), at)
        .await
        .unwrap();
    assert!(matches!(begun, LedgerBegin::Acquired { .. }));
    store
        .ledger_write(
            lease,
            LedgerWrite {
                tenant: DEFAULT_TENANT.into(),
                idempotency_key: key.into(),
                action: "send".into(),
                state: LedgerState::Committed,
                result: Some(json!({"message_id": "m-1"})),
                error_class: None,
                error_message: None,
            },
            "action_committed".into(),
            at,
        )
        .await
        .unwrap();
    store
        .finish(vec![AttemptEnd {
            run_id: run.id,
            lease_id: lease.lease_id,
            now: at,
            outcome: Outcome::Completed { output: json!(1) },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    run.id
}

/// The ledger outlives the runs that wrote it: pruning a run inside the
/// ledger's window keeps its ledger row, so a duplicate run with the same
/// action key gets the stored result (the effect is NOT repeated); a row is
/// pruned only after its own window AND once its run is gone; a row whose
/// run is still kept stays whatever its age.
pub async fn ledger_outlives_pruned_runs(store: DynStore) {
    let mut cfg = config();
    cfg.ledger_ms = Some(10 * HOUR);
    let key = "prospect-1/send-email/campaign-9/v1";
    let first = commit_effect(&store, key, T0).await;
    let kept_key = "prospect-2/send-email/campaign-9/v1";
    let (kept_run, kept_lease) = claimed_at(&store, "mail", T0).await;
    store
        .ledger_begin(kept_lease, kept_key.into(), "send".into(), T0)
        .await
        .unwrap();
    // The run that holds kept_key runs long and fails two hours later;
    // failed runs of `mail` are kept 10 h, so until T0 + 12 h.
    cfg.jobs.insert(
        "mail".into(),
        Retention {
            failed_ms: Some(10 * HOUR),
            ..Default::default()
        },
    );
    store
        .finish(vec![AttemptEnd {
            run_id: kept_run.id,
            lease_id: kept_lease.lease_id,
            now: T0.plus_millis(2 * HOUR),
            outcome: Outcome::Failed {
                error: None,
                reason: TerminalReason::Unresolved,
                detail: "x".into(),
            },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    cfg.validate().unwrap();

    // Inside the ledger window: the run is pruned, its ledger row is not.
    let r = store
        .prune(cfg.plan(T0.plus_millis(2 * HOUR), 100))
        .await
        .unwrap();
    assert_eq!(r.runs(), 1);
    assert!(gone(&store, first).await);
    let row = store
        .ledger_get(DEFAULT_TENANT.into(), key.into())
        .await
        .unwrap()
        .expect("the ledger row outlives its run");
    assert_eq!(row.state, LedgerState::Committed);
    // A duplicate arrives (another run, same business intent): the
    // committed effect is returned, not executed again.
    let (_, dup) = claimed_at(&store, "mail", T0.plus_millis(3 * HOUR)).await;
    let again = store
        .ledger_begin(dup, key.into(), "send".into(), T0.plus_millis(3 * HOUR))
        .await
        .unwrap();
    match again {
        LedgerBegin::Committed(e) => assert_eq!(e.result, Some(json!({"message_id": "m-1"}))),
        other => panic!("a pruned run's committed effect would repeat: {other:?}"),
    }

    // Past the ledger window (10 h after the rows' last write), the row
    // whose run is gone goes, with one `ledger_pruned` event; kept_key's row
    // stays while its run is kept.
    let r = store
        .prune(cfg.plan(T0.plus_millis(10 * HOUR), 100))
        .await
        .unwrap();
    assert_eq!((r.runs(), r.ledger_rows()), (0, 1));
    assert!(store
        .ledger_get(DEFAULT_TENANT.into(), key.into())
        .await
        .unwrap()
        .is_none());
    assert!(store
        .ledger_get(DEFAULT_TENANT.into(), kept_key.into())
        .await
        .unwrap()
        .is_some());
    let ev: Vec<EventRecord> = all_events(&store)
        .await
        .into_iter()
        .filter(|e| e.kind == LEDGER_PRUNED)
        .collect();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].data["rows"], json!(1));
    assert_eq!(ev[0].tenant, DEFAULT_TENANT);
    // When kept_run's own window ends, it goes and its ledger row with it
    // (in the same batch); the duplicate, still running, stays.
    let r = store
        .prune(cfg.plan(T0.plus_millis(12 * HOUR), 100))
        .await
        .unwrap();
    assert_eq!((r.runs(), r.ledger_rows()), (1, 1));
    assert!(gone(&store, kept_run.id).await);
    assert!(store
        .ledger_get(DEFAULT_TENANT.into(), kept_key.into())
        .await
        .unwrap()
        .is_none());
}

/// Old ledger rows whose run is still kept never stall ledger pruning:
/// with a batch of 1 and three such rows first in age order, the batch
/// still prunes the next row whose run is gone.
pub async fn ledger_pruning_skips_rows_of_kept_runs(store: DynStore) {
    for i in 0..3 {
        let (_, lease) = claimed_at(&store, "mail", T0).await;
        store
            .ledger_begin(lease, format!("kept-{i}"), "send".into(), T0)
            .await
            .unwrap();
    }
    commit_effect(&store, "gone", T0.plus_millis(1)).await;
    let mut cfg = config();
    cfg.ledger_ms = Some(2 * HOUR);
    let r = store
        .prune(cfg.plan(T0.plus_millis(3 * HOUR), 1))
        .await
        .unwrap();
    assert_eq!((r.runs(), r.ledger_rows()), (1, 1));
    assert!(store
        .ledger_get(DEFAULT_TENANT.into(), "gone".into())
        .await
        .unwrap()
        .is_none());
    for i in 0..3 {
        assert!(store
            .ledger_get(DEFAULT_TENANT.into(), format!("kept-{i}"))
            .await
            .unwrap()
            .is_some());
    }
}

/// A trigger's idempotency key is remembered by its run: once the run is
/// pruned, the same key makes a NEW run (documented in OPERATIONS.md).
pub async fn idempotency_key_after_prune_makes_a_new_run(store: DynStore) {
    let mut r = NewRun::new("fast", json!({"n": 1}));
    r.idempotency_key = Some("order-42".into());
    let first = store.trigger(vec![r.clone()], T0).await.unwrap().remove(0);
    assert!(!first.existing);
    let run = store
        .claim(claim_of(&["fast"], T0, 1))
        .await
        .unwrap()
        .remove(0);
    store
        .finish(vec![AttemptEnd {
            run_id: run.id,
            lease_id: run.lease_id.unwrap(),
            now: T0,
            outcome: Outcome::Completed { output: json!(1) },
        }])
        .await
        .unwrap();
    let mut again = r.clone();
    again.id = RunId::new();
    let dup = store
        .trigger(vec![again.clone()], T0)
        .await
        .unwrap()
        .remove(0);
    assert!(dup.existing, "inside retention the key returns the run");
    assert_eq!(dup.run.id, first.run.id);
    store
        .prune(config().plan(T0.plus_millis(HOUR), 10))
        .await
        .unwrap();
    assert!(gone(&store, first.run.id).await);
    again.id = RunId::new();
    let fresh = store
        .trigger(vec![again.clone()], T0.plus_millis(HOUR))
        .await
        .unwrap()
        .remove(0);
    assert!(!fresh.existing, "after pruning the key makes a new run");
    assert_eq!(fresh.run.id, again.id);
}

/// A pruner that lost its lead deletes nothing: the lead is checked in the
/// pruning transaction.
pub async fn prune_is_fenced_by_the_lead(store: DynStore) {
    let id = final_run(&store, "fast", RunStatus::Completed, T0).await;
    let now = T0.plus_millis(2 * HOUR);
    let old = store
        .try_lead(PRUNE_TASK.into(), "a".into(), now, 1000)
        .await
        .unwrap()
        .unwrap();
    let later = now.plus_millis(1000);
    let new = store
        .try_lead(PRUNE_TASK.into(), "b".into(), later, 1000)
        .await
        .unwrap()
        .unwrap();
    assert!(new > old);
    let mut req = config().plan(later, 10);
    req.lead = Some((PRUNE_TASK.into(), old));
    let r = store.prune(req.clone()).await.unwrap();
    assert!(r.fenced_out);
    assert!(!gone(&store, id).await);
    req.lead = Some((PRUNE_TASK.into(), new));
    let r = store.prune(req).await.unwrap();
    assert!(!r.fenced_out);
    assert_eq!(r.runs(), 1);
    assert!(gone(&store, id).await);
}

/// A paused job's runs are not claimed and not reported due (triggers still
/// queue); `*` pauses every job of the tenant and only that tenant; pausing
/// and resuming are audited once per change; resuming makes the runs
/// claimable again.
pub async fn paused_jobs_are_not_claimed(store: DynStore) {
    let mut other_tenant = NewRun::new("a", json!({}));
    other_tenant.tenant = "t2".into();
    store
        .trigger(
            vec![
                NewRun::new("a", json!({})),
                NewRun::new("b", json!({})),
                other_tenant,
            ],
            T0,
        )
        .await
        .unwrap();
    let change = |job: &str, paused: bool| PauseChange {
        tenant: DEFAULT_TENANT.into(),
        job: job.into(),
        paused,
        actor: "ops-alice".into(),
        comment: Some("incident 12".into()),
        now: T0,
    };
    assert!(store.set_pause(change("a", true)).await.unwrap());
    assert!(
        !store.set_pause(change("a", true)).await.unwrap(),
        "already paused"
    );
    let p = store.pauses(None).await.unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].job.as_str(), p[0].actor.as_str()), ("a", "ops-alice"));
    // Triggers still queue.
    let queued = store
        .trigger(vec![NewRun::new("a", json!({}))], T0)
        .await
        .unwrap();
    assert_eq!(queued[0].run.status, RunStatus::Pending);
    // Only b of the default tenant, and a of t2, are claimed.
    let got = store.claim(claim_of(&["a", "b"], T0, 10)).await.unwrap();
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|r| (r.tenant.clone(), r.job.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![("default".into(), "b".into()), ("t2".into(), "a".into())]
    );
    assert_eq!(store.next_due(vec!["a".into()]).await.unwrap(), None);
    // `*`: all jobs of the tenant.
    store
        .trigger(vec![NewRun::new("b", json!({}))], T0)
        .await
        .unwrap();
    assert!(store.set_pause(change(ALL_JOBS, true)).await.unwrap());
    assert!(store
        .claim(claim_of(&["a", "b"], T0, 10))
        .await
        .unwrap()
        .is_empty());
    assert!(store.set_pause(change(ALL_JOBS, false)).await.unwrap());
    assert_eq!(
        store.claim(claim_of(&["b"], T0, 10)).await.unwrap().len(),
        1
    );
    assert!(store
        .claim(claim_of(&["a"], T0, 10))
        .await
        .unwrap()
        .is_empty());
    // Resume: a's two runs are due and claimed.
    assert!(store.set_pause(change("a", false)).await.unwrap());
    assert!(!store.set_pause(change("a", false)).await.unwrap());
    assert_eq!(store.next_due(vec!["a".into()]).await.unwrap(), Some(T0));
    assert_eq!(
        store.claim(claim_of(&["a"], T0, 10)).await.unwrap().len(),
        2
    );
    assert!(store.pauses(None).await.unwrap().is_empty());
    let audit: Vec<(String, String)> = all_events(&store)
        .await
        .into_iter()
        .filter(|e| e.kind == JOB_PAUSED || e.kind == JOB_RESUMED)
        .map(|e| {
            assert_eq!(e.run_id, NO_RUN);
            assert_eq!(e.actor.as_deref(), Some("ops-alice"));
            assert_eq!(e.comment.as_deref(), Some("incident 12"));
            (e.kind.to_string(), e.job)
        })
        .collect();
    assert_eq!(
        audit,
        vec![
            (JOB_PAUSED.to_string(), "a".into()),
            (JOB_PAUSED.to_string(), "*".into()),
            (JOB_RESUMED.to_string(), "*".into()),
            (JOB_RESUMED.to_string(), "a".into()),
        ]
    );
    assert!(store.set_pause(change("", true)).await.is_err());
}

/// Only a final run can be deleted; it goes with all its rows, and a
/// `run_deleted` event that keeps its id, actor, comment and last state.
pub async fn delete_run_only_final_and_audited(store: DynStore) {
    let done = final_run(&store, "fast", RunStatus::Completed, T0).await;
    let (running, _) = claimed_at(&store, "fast", T0).await;
    let req = |run_id| DeleteRequest {
        run_id,
        actor: "ops-alice".into(),
        comment: Some("GDPR request 7".into()),
        now: T0.plus_millis(5),
    };
    match store.delete_run(req(running.id)).await {
        Err(StoreError::WrongState { current, .. }) => assert_eq!(current, RunStatus::Running),
        other => panic!("deleting a running run: {other:?}"),
    }
    assert!(!gone(&store, running.id).await);
    let deleted = store.delete_run(req(done)).await.unwrap();
    assert_eq!(deleted.status, RunStatus::Completed);
    assert!(gone(&store, done).await);
    let ev = events_of(&store, done).await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, RUN_DELETED);
    assert_eq!(ev[0].actor.as_deref(), Some("ops-alice"));
    assert_eq!(ev[0].comment.as_deref(), Some("GDPR request 7"));
    assert_eq!(ev[0].data["status"], json!("completed"));
    // The audit event is the newest event: its id is never reused.
    let newest = all_events(&store).await.last().unwrap().id;
    assert_eq!(newest, ev[0].id);
    assert!(matches!(
        store.delete_run(req(done)).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Queue health per (tenant, job): due runs and the oldest one (lag),
/// running, scheduled for later, finished recently; per tenant or all.
pub async fn queue_health_counts_due_lag_running_and_recent(store: DynStore) {
    final_run(&store, "a", RunStatus::Completed, T0.plus_millis(20)).await;
    final_run(&store, "a", RunStatus::Failed, T0.plus_millis(20)).await;
    claimed_at(&store, "a", T0).await;
    let at = |ms: i64| {
        let mut r = NewRun::new("a", json!({}));
        r.run_after = Some(T0.plus_millis(ms));
        r
    };
    let mut other = NewRun::new("b", json!({}));
    other.tenant = "t2".into();
    store
        .trigger(vec![at(0), at(10), at(HOUR), other], T0)
        .await
        .unwrap();
    let now = T0.plus_millis(100);
    let all = store
        .queue_health(HealthQuery {
            tenant: None,
            now,
            since: T0,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let a = &all[0];
    assert_eq!((a.tenant.as_str(), a.job.as_str()), ("default", "a"));
    assert_eq!(
        (a.due, a.oldest_due_at, a.running, a.scheduled),
        (2, Some(T0), 1, 1)
    );
    assert_eq!(a.lag_ms(now), 100);
    assert_eq!((a.completed_recently, a.failed_recently), (1, 1));
    assert_eq!((all[1].tenant.as_str(), all[1].due), ("t2", 1));
    let mine = store
        .queue_health(HealthQuery {
            tenant: Some(DEFAULT_TENANT.into()),
            now,
            since: T0.plus_millis(21),
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].completed_recently, mine[0].failed_recently),
        (0, 0)
    );
    assert_eq!(mine[0].due, 2);
}

/// Queue health tells the runs held back by a concurrency key (due, in
/// `due` and in `held`) and the runs deferred without sending (scheduled,
/// in `scheduled` and in `deferred`) from the rest.
pub async fn queue_health_counts_held_and_deferred(store: DynStore) {
    let keyed = |i: i64| {
        let mut r = NewRun::new("k", json!({ "i": i }));
        r.concurrency = Some(ConcurrencyKey {
            key: "acme/1".into(),
            limit: 1,
        });
        r
    };
    store
        .trigger(vec![keyed(0), keyed(1), keyed(2)], T0)
        .await
        .unwrap();
    // The first claim takes one (the key's limit) and finds two held.
    let got = store.claim(claim_of(&["k"], T0, 8)).await.unwrap();
    assert_eq!(got.len(), 1);
    // A run deferred by a rate limit's token, one retried by backoff.
    let (_, lease) = claimed_at(&store, "d", T0).await;
    let (_, failed) = claimed_at(&store, "d", T0).await;
    let later = T0.plus_millis(HOUR);
    let retry = |lease: LeaseRef, reason: docket_core::policy::RetryReason| AttemptEnd {
        run_id: lease.run_id,
        lease_id: lease.lease_id,
        now: T0,
        outcome: Outcome::Retry {
            error: ErrorInfo {
                class: ErrorClass::RateLimited,
                message: "no token".into(),
                fingerprint: "fp".into(),
                failure_key: "fk".into(),
                action: None,
            },
            retry: RetryRecord {
                policy: "p".into(),
                delay_ms: HOUR,
                eligible_at: later,
                reason,
            },
        },
    };
    let ends = store
        .finish(vec![
            retry(lease, docket_core::policy::RetryReason::RateLimited),
            retry(failed, docket_core::policy::RetryReason::Backoff),
        ])
        .await
        .unwrap();
    assert!(ends.iter().all(|e| e.is_ok()), "{ends:?}");
    let h = store
        .queue_health(HealthQuery {
            tenant: None,
            now: T0.plus_millis(1),
            since: T0,
        })
        .await
        .unwrap();
    let of = |job: &str| h.iter().find(|x| x.job == job).cloned().unwrap();
    let k = of("k");
    assert_eq!((k.due, k.held, k.running), (2, 2, 1));
    let d = of("d");
    assert_eq!((d.due, d.scheduled, d.deferred, d.held), (0, 2, 1, 0));
}

/// One `#[tokio::test]` per retention conformance case, like
/// [`conformance_tests!`](crate::conformance_tests).
#[macro_export]
macro_rules! retention_conformance_tests {
    (optional: $factory:expr) => {
        $crate::retention_conformance_tests!(@each @optional $factory;
            prune_removes_exactly_the_eligible_runs,
            ledger_outlives_pruned_runs,
            ledger_pruning_skips_rows_of_kept_runs,
            idempotency_key_after_prune_makes_a_new_run,
            prune_is_fenced_by_the_lead,
            paused_jobs_are_not_claimed,
            delete_run_only_final_and_audited,
            queue_health_counts_due_lag_running_and_recent,
            queue_health_counts_held_and_deferred,
        );
    };
    ($factory:expr) => {
        $crate::retention_conformance_tests!(@each @required $factory;
            prune_removes_exactly_the_eligible_runs,
            ledger_outlives_pruned_runs,
            ledger_pruning_skips_rows_of_kept_runs,
            idempotency_key_after_prune_makes_a_new_run,
            prune_is_fenced_by_the_lead,
            paused_jobs_are_not_claimed,
            delete_run_only_final_and_audited,
            queue_health_counts_due_lag_running_and_recent,
            queue_health_counts_held_and_deferred,
        );
    };
    (@each @required $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: $crate::DynStore = $factory;
                $crate::retention_conformance::$name(store).await;
            }
        )*
    };
    (@each @optional $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: ::std::option::Option<$crate::DynStore> = $factory;
                if let ::std::option::Option::Some(store) = store {
                    $crate::retention_conformance::$name(store).await;
                }
            }
        )*
    };
}
