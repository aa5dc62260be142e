//! Durable steps, guarded actions, waits for input, postpone, cancel and the
//! operator operations, on embedded SQLite with the injected clock.

use docket::{
    intent_key, Actor, Ctx, Docket, Error, InputDecision, Job, JobError, LedgerState, ManualClock,
    Reconciled, RetryPolicy, RunStatus, StepStatus, Stepped, TerminalReason, Timestamp,
    TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

const T0: Timestamp = Timestamp(1_767_225_600_000);
const BOUND: Duration = Duration::from_secs(30);

fn engine() -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    (Docket::with_store(store, Arc::new(clock.clone())), clock)
}

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        name: "fast".into(),
        base_delay_ms: 100,
        multiplier: 1.0,
        max_delay_ms: 100,
        max_attempts,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    }
}

/// Counts closure executions by name.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, usize>>>);

impl Calls {
    fn hit(&self, name: &str) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(name.to_string()).or_default();
        *n += 1;
        *n
    }
    fn get(&self, name: &str) -> usize {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

async fn tick(d: &Docket) -> usize {
    d.worker(WorkerConfig {
        concurrency: 4,
        ..Default::default()
    })
    .tick()
    .await
    .unwrap()
}

fn ops(comment: &str) -> Actor {
    Actor::new("ops-alice", Some(comment.to_string()))
}

async fn kinds(d: &Docket, id: docket::RunId) -> Vec<String> {
    d.history(id)
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

#[tokio::test]
async fn completed_steps_are_never_executed_again() {
    let (d, clock) = engine();
    let calls = Calls::default();
    let c = calls.clone();
    d.register(
        Job::new("import", move |ctx: Ctx, _: Value| {
            let c = c.clone();
            async move {
                let mut total = 0u64;
                for i in 0..3 {
                    let n = ctx
                        .step(format!("batch-{i}"), || async {
                            let k = c.hit(&format!("batch-{i}"));
                            if i == 1 && k == 1 {
                                return Err(JobError::unavailable("503 from the CRM"));
                            }
                            Ok(10u64 * (i + 1))
                        })
                        .await?;
                    total += n.into_option().unwrap_or(0);
                }
                Ok::<_, JobError>(json!({ "total": total }))
            }
        })
        .retry(policy(3)),
    )
    .unwrap();
    let id = d.trigger("import", json!({})).await.unwrap().run.id;
    assert_eq!(tick(&d).await, 1);
    clock.advance_millis(100);
    assert_eq!(tick(&d).await, 1);
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(h.run.output, Some(json!({"total": 60})));
    assert_eq!(
        (
            calls.get("batch-0"),
            calls.get("batch-1"),
            calls.get("batch-2")
        ),
        (1, 2, 1)
    );
    assert!(h.steps.iter().all(|s| s.status == StepStatus::Completed));
    let failed: Vec<_> = h
        .events
        .iter()
        .filter(|e| e.kind == "step_failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].data["step"], "batch-1");
    assert_eq!(failed[0].data["error_class"], "unavailable");
    assert_eq!(h.attempts[0].action.as_deref(), Some("batch-1"));
}

#[tokio::test]
async fn a_step_name_used_twice_is_an_error_that_says_so() {
    let (d, _clock) = engine();
    d.register(Job::new("dup", |ctx: Ctx, _: Value| async move {
        ctx.step("same", || async { Ok(1) }).await?;
        ctx.step("same", || async { Ok(2) }).await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    let id = d.trigger("dup", json!({})).await.unwrap().run.id;
    tick(&d).await;
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.terminal_reason, Some(TerminalReason::PermanentError));
    assert!(run
        .last_error_message
        .unwrap()
        .contains("step `same` is used twice"));
}

fn email_job(calls: Calls, remote: Arc<Mutex<Vec<String>>>, timeout_first: bool) -> Job {
    Job::new("send-email", move |ctx: Ctx, input: Value| {
        let (calls, remote) = (calls.clone(), remote.clone());
        async move {
            let prospect = input["prospect"].as_str().unwrap_or_default().to_string();
            let key = intent_key([prospect.as_str(), "send-email", "campaign-9", "v1"]);
            let remote_check = remote.clone();
            let sent = ctx
                .action_with_reconcile(
                    "send-email",
                    key,
                    None,
                    move |key| async move {
                        Ok(if remote_check.lock().unwrap().contains(&key) {
                            Reconciled::Committed(json!({ "message_id": format!("m-{key}") }))
                        } else {
                            Reconciled::NotDone
                        })
                    },
                    move |key| async move {
                        let n = calls.hit("send");
                        remote.lock().unwrap().push(key.clone());
                        if timeout_first && n == 1 {
                            // The provider committed, then the worker stopped waiting.
                            return Err(JobError::timeout("SMTP answer did not arrive in 30s"));
                        }
                        Ok(json!({ "message_id": format!("m-{key}") }))
                    },
                )
                .await?;
            Ok::<_, JobError>(sent.into_option().unwrap_or(Value::Null))
        }
    })
    .retry(policy(5))
}

#[tokio::test]
async fn a_timed_out_action_is_reconciled_not_repeated() {
    let (d, clock) = engine();
    let calls = Calls::default();
    let remote = Arc::new(Mutex::new(Vec::new()));
    d.register(email_job(calls.clone(), remote.clone(), true))
        .unwrap();
    let id = d
        .trigger("send-email", json!({"prospect": "prospect-7ca677ed25d3"}))
        .await
        .unwrap()
        .run
        .id;
    tick(&d).await;
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Pending);
    assert_eq!(h.ledger[0].state, LedgerState::Unknown);
    assert_eq!(
        h.ledger[0].idempotency_key,
        "prospect-7ca677ed25d3/send-email/campaign-9/v1"
    );
    clock.advance_millis(100);
    tick(&d).await;
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(calls.get("send"), 1, "the email was sent once");
    assert_eq!(remote.lock().unwrap().len(), 1);
    assert_eq!(h.ledger[0].state, LedgerState::Committed);
    let k = kinds(&d, id).await;
    assert!(k.contains(&"action_unknown".to_string()));
    assert!(k.contains(&"action_reconciled".to_string()));
}

#[tokio::test]
async fn a_committed_action_is_not_repeated_by_a_duplicate_dispatch() {
    let (d, _clock) = engine();
    let calls = Calls::default();
    let remote = Arc::new(Mutex::new(Vec::new()));
    d.register(email_job(calls.clone(), remote.clone(), false))
        .unwrap();
    let a = d
        .trigger("send-email", json!({"prospect": "p-1"}))
        .await
        .unwrap()
        .run
        .id;
    let b = d
        .trigger("send-email", json!({"prospect": "p-1"}))
        .await
        .unwrap()
        .run
        .id;
    assert_ne!(a, b, "two runs: a duplicate dispatch upstream");
    let w = d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    });
    w.tick().await.unwrap();
    w.tick().await.unwrap();
    assert_eq!(calls.get("send"), 1);
    let ha = d.history(a).await.unwrap();
    let hb = d.history(b).await.unwrap();
    assert_eq!(ha.run.output, hb.run.output);
    let dup: Vec<_> = hb
        .events
        .iter()
        .filter(|e| e.kind == "duplicate_suppressed")
        .collect();
    assert_eq!(dup.len(), 1);
    assert_eq!(dup[0].data["committed_by_run"], json!(a));
}

#[tokio::test]
async fn an_unknown_action_without_reconcile_stops_for_an_operator() {
    let (d, clock) = engine();
    let calls = Calls::default();
    let c = calls.clone();
    d.register(
        Job::new("charge", move |ctx: Ctx, _: Value| {
            let c = c.clone();
            async move {
                ctx.action("charge-card", "order-42/charge/v1", |_key| async {
                    c.hit("charge");
                    Err::<Value, _>(JobError::timeout("gateway timeout"))
                })
                .await?;
                Ok::<_, JobError>(json!(null))
            }
        })
        .retry(policy(5)),
    )
    .unwrap();
    let id = d.trigger("charge", json!({})).await.unwrap().run.id;
    tick(&d).await;
    clock.advance_millis(100);
    tick(&d).await;
    let run = d.get_run(id).await.unwrap();
    assert_eq!(calls.get("charge"), 1, "never repeated blindly");
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run
        .last_error_message
        .unwrap()
        .contains("may or may not have happened"));
}

#[tokio::test]
async fn wait_for_input_then_approve_or_reject() {
    let (d, _clock) = engine();
    let calls = Calls::default();
    let c = calls.clone();
    d.register(Job::new("refund", move |ctx: Ctx, input: Value| {
        let c = c.clone();
        async move {
            ctx.step("prepare", || async {
                c.hit("prepare");
                Ok(1)
            })
            .await?;
            let decision = ctx
                .wait_for_input("approval", json!({ "amount": input["amount"] }))
                .await?;
            Ok::<_, JobError>(match decision {
                InputDecision::Approved(data) => json!({ "refunded": true, "by": data }),
                InputDecision::Rejected(data) => json!({ "refunded": false, "why": data }),
            })
        }
    }))
    .unwrap();
    let a = d
        .trigger("refund", json!({"amount": 1500}))
        .await
        .unwrap()
        .run
        .id;
    let b = d
        .trigger("refund", json!({"amount": 2500}))
        .await
        .unwrap()
        .run
        .id;
    tick(&d).await;
    for id in [a, b] {
        let r = d.get_run(id).await.unwrap();
        assert_eq!(r.status, RunStatus::NeedsInput);
        assert_eq!(
            r.input_request.as_ref().unwrap()["request"]["amount"],
            json!(if id == a { 1500 } else { 2500 })
        );
    }
    let err = d.approve(a, json!({}), ops("x")).await;
    assert!(err.is_ok());
    let refused = d.approve(a, json!({}), ops("again")).await.unwrap_err();
    assert!(
        matches!(
            refused,
            Error::WrongState {
                current: RunStatus::Pending,
                ..
            }
        ),
        "{refused}"
    );
    d.reject(b, json!("too large"), ops("policy"))
        .await
        .unwrap();
    tick(&d).await;
    assert_eq!(
        d.get_run(a).await.unwrap().output,
        Some(json!({"refunded": true, "by": {}}))
    );
    assert_eq!(
        d.get_run(b).await.unwrap().output,
        Some(json!({"refunded": false, "why": "too large"}))
    );
    assert_eq!(
        calls.get("prepare"),
        2,
        "once per run, not again after the decision"
    );
    let k = kinds(&d, a).await;
    assert!(
        k.contains(&"input_requested".to_string()) && k.contains(&"input_received".to_string())
    );
}

#[tokio::test]
async fn postpone_by_handler_and_operator_spends_no_budget() {
    let (d, clock) = engine();
    let calls = Calls::default();
    let c = calls.clone();
    d.register(
        Job::new("later", move |ctx: Ctx, _: Value| {
            let c = c.clone();
            async move {
                if c.hit("later") == 1 {
                    return Err(ctx.postpone(T0.plus_millis(60_000)));
                }
                Ok::<_, JobError>(json!("done"))
            }
        })
        .retry(policy(1)),
    )
    .unwrap();
    let id = d.trigger("later", json!({})).await.unwrap().run.id;
    tick(&d).await;
    let r = d.get_run(id).await.unwrap();
    assert_eq!(r.status, RunStatus::Postponed);
    assert_eq!(r.run_after, T0.plus_millis(60_000));
    clock.advance_millis(59_999);
    assert_eq!(tick(&d).await, 0);
    clock.advance_millis(1);
    assert_eq!(tick(&d).await, 1);
    assert_eq!(
        d.get_run(id).await.unwrap().status,
        RunStatus::Completed,
        "max_attempts 1 and still completed"
    );

    let other = d.trigger("later", json!({})).await.unwrap().run.id;
    let r = d
        .postpone(other, T0.plus_millis(120_000), ops("customer asked"))
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Postponed);
    assert_eq!(r.run_after, T0.plus_millis(120_000));
    let done = d.cancel(id, ops("too late")).await.unwrap_err();
    assert_eq!(
        done.to_string(),
        format!("run {id} is completed: cannot cancel a run that is completed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_running_stops_at_the_next_step_boundary() {
    let (d, _clock) = engine();
    let calls = Calls::default();
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Notify::new());
    let (c, e, g) = (calls.clone(), entered.clone(), gate.clone());
    d.register(Job::new("long", move |ctx: Ctx, _: Value| {
        let (c, e, g) = (c.clone(), e.clone(), g.clone());
        async move {
            ctx.step("first", || async {
                c.hit("first");
                e.notify_one();
                g.notified().await;
                Ok(1)
            })
            .await?;
            ctx.step("second", || async {
                c.hit("second");
                Ok(2)
            })
            .await?;
            Ok::<_, JobError>(json!(null))
        }
    }))
    .unwrap();
    let pending = d.trigger("long", json!({})).await.unwrap().run.id;
    let id = d.trigger("long", json!({})).await.unwrap().run.id;
    assert_eq!(
        d.cancel(pending, ops("not needed")).await.unwrap().status,
        RunStatus::Cancelled
    );
    let w = d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    });
    let t = tokio::spawn(async move { w.tick().await.unwrap() });
    tokio::time::timeout(BOUND, entered.notified())
        .await
        .unwrap();
    let r = d.cancel(id, ops("stop it")).await.unwrap();
    assert_eq!(r.status, RunStatus::Running);
    assert!(r.cancel_requested);
    gate.notify_one();
    tokio::time::timeout(BOUND, t).await.unwrap().unwrap();
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Cancelled);
    assert_eq!((calls.get("first"), calls.get("second")), (1, 0));
    assert_eq!(
        h.events.last().unwrap().kind,
        "run_cancelled",
        "nothing is written after the cancel"
    );
}

#[tokio::test]
async fn operator_retry_merges_variables_and_keeps_completed_steps() {
    let (d, _clock) = engine();
    let calls = Calls::default();
    let c = calls.clone();
    d.register(
        Job::new("credit-check", move |ctx: Ctx, _: Value| {
            let c = c.clone();
            async move {
                ctx.step("validate", || async {
                    c.hit("validate");
                    Ok(true)
                })
                .await?;
                let timeout = ctx.variables()["timeout"].as_u64().unwrap_or(0);
                ctx.step("check", || async {
                    c.hit("check");
                    if timeout < 30_000 {
                        return Err(JobError::timeout("bureau did not answer in 10s"));
                    }
                    Ok(720)
                })
                .await?;
                Ok::<_, JobError>(json!({ "score": 720 }))
            }
        })
        .retry(policy(1)),
    )
    .unwrap();
    let id = d.trigger("credit-check", json!({})).await.unwrap().run.id;
    let refused = d.retry(id, None, ops("early")).await.unwrap_err();
    assert!(refused.to_string().contains("is pending"), "{refused}");
    tick(&d).await;
    assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Failed);
    let bad = d.retry(id, Some(json!([1])), ops("x")).await.unwrap_err();
    assert!(matches!(bad, Error::InvalidInput(_)));
    d.retry(
        id,
        Some(json!({"timeout": 30000})),
        ops("increase timeout to 30s"),
    )
    .await
    .unwrap();
    tick(&d).await;
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(h.run.variables, json!({"timeout": 30000}));
    assert_eq!((calls.get("validate"), calls.get("check")), (1, 2));
    let audit = h
        .events
        .iter()
        .find(|e| e.kind == "operator_retry")
        .unwrap();
    assert_eq!(audit.actor.as_deref(), Some("ops-alice"));
    assert_eq!(audit.comment.as_deref(), Some("increase timeout to 30s"));
}

#[tokio::test]
async fn skip_failed_step_continues_past_it() {
    let (d, _clock) = engine();
    d.register(
        Job::new("enrich", |ctx: Ctx, _: Value| async move {
            let extra = ctx
                .step("lookup", || async {
                    Err::<Value, _>(JobError::new(docket::ErrorClass::NotFound, "404 company"))
                })
                .await?;
            Ok::<_, JobError>(json!({ "skipped": extra.is_skipped() }))
        })
        .retry(policy(3)),
    )
    .unwrap();
    let id = d.trigger("enrich", json!({})).await.unwrap().run.id;
    tick(&d).await;
    assert_eq!(
        d.get_run(id).await.unwrap().terminal_reason,
        Some(TerminalReason::PermanentError)
    );
    d.skip(id, ops("company unknown, continue")).await.unwrap();
    tick(&d).await;
    let h = d.history(id).await.unwrap();
    assert_eq!(h.run.output, Some(json!({"skipped": true})));
    assert_eq!(h.steps[0].status, StepStatus::Skipped);
    assert!(Stepped::<u8>::Skipped { comment: None }
        .into_option()
        .is_none());
}

#[tokio::test]
async fn retrigger_links_a_new_run_and_leaves_the_original() {
    let (d, _clock) = engine();
    d.register(Job::new("j", |_ctx: Ctx, v: Value| async move {
        Ok::<_, JobError>(v)
    }))
    .unwrap();
    let id = d
        .trigger_with(
            "j",
            json!({"x": 1}),
            TriggerOptions {
                idempotency_key: Some("k".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run
        .id;
    let refused = d.retrigger(id, ops("early")).await.unwrap_err();
    assert!(refused
        .to_string()
        .contains("cannot retrigger a run that is pending"));
    tick(&d).await;
    let before = d.history(id).await.unwrap();
    let t = d.retrigger(id, ops("again")).await.unwrap();
    assert!(!t.existing);
    assert_ne!(t.run.id, id);
    assert_eq!(t.run.retriggered_from, Some(id));
    assert_eq!(t.run.input, json!({"x": 1}));
    let after = d.history(id).await.unwrap();
    assert_eq!(before.run, after.run);
    assert_eq!(before.events.len(), after.events.len());
}

#[tokio::test]
async fn progress_and_logs_are_events() {
    let (d, _clock) = engine();
    d.register(Job::new("p", |ctx: Ctx, _: Value| async move {
        ctx.progress(1, 2, "half").await?;
        ctx.log("info", "contacted CRM", json!({"records": 3}))
            .await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    let id = d.trigger("p", json!({})).await.unwrap().run.id;
    tick(&d).await;
    let h = d.history(id).await.unwrap();
    let p = h.events.iter().find(|e| e.kind == "progress").unwrap();
    assert_eq!(p.data, json!({"current": 1, "total": 2, "message": "half"}));
    let l = h.events.iter().find(|e| e.kind == "log").unwrap();
    assert_eq!(l.data["data"], json!({"records": 3}));
}

#[test]
fn intent_keys_are_stable_and_escaped() {
    assert_eq!(
        intent_key(["prospect-7ca677ed25d3", "send-email", "campaign-9", "v1"]),
        "prospect-7ca677ed25d3/send-email/campaign-9/v1"
    );
    assert_eq!(intent_key(["a/b", "c"]), "a%2Fb/c");
    assert_ne!(intent_key(["a/b", "c"]), intent_key(["a", "b/c"]));
}

/// Kept for the crash test's counters: executions per step, read from a file
/// the child process appended to.
fn read_counts(path: &std::path::Path) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *m.entry(line.to_string()).or_default() += 1;
    }
    m
}

/// A worker PROCESS aborted in the middle of step 3 (an action whose remote
/// side already committed). After lease expiry the next attempt, in another
/// process, takes steps 1 and 2 from storage and reconciles the action
/// instead of repeating it.
async fn killed_worker_process_resumes_from_storage(url: &str, dir: &std::path::Path) {
    let counts = dir.join("counts.txt");
    let remote = dir.join("remote.txt");
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("crash_worker");
    assert!(
        example.exists(),
        "`cargo test -p docket` builds the examples; missing {}",
        example.display()
    );
    let run = |mode: &'static str| {
        tokio::process::Command::new(&example)
            .arg(url)
            .arg(&counts)
            .arg(&remote)
            .arg(mode)
            .status()
    };
    let status = tokio::time::timeout(BOUND, run("crash"))
        .await
        .expect("the child ends within the bound")
        .unwrap();
    assert!(
        !status.success(),
        "the child must die by abort, not exit cleanly: {status:?}"
    );
    let c = read_counts(&counts);
    assert_eq!(
        (c.get("step-1"), c.get("step-2"), c.get("charge")),
        (Some(&1), Some(&1), Some(&1))
    );
    assert_eq!(c.get("step-4"), None);

    let status = tokio::time::timeout(BOUND, run("resume"))
        .await
        .expect("the resuming worker ends within the bound")
        .unwrap();
    assert!(status.success());
    let c = read_counts(&counts);
    assert_eq!(c.get("step-1"), Some(&1), "step 1 came from storage");
    assert_eq!(c.get("step-2"), Some(&1), "step 2 came from storage");
    assert_eq!(
        c.get("charge"),
        Some(&1),
        "the interrupted action was reconciled, not repeated"
    );
    assert_eq!(c.get("step-4"), Some(&1));
    let d = Docket::open(url).await.unwrap();
    let runs = d.list_runs(Default::default()).await.unwrap();
    assert_eq!(runs.len(), 1);
    let h = d.history(runs[0].id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(h.attempts[0].outcome, "lease_expired");
    assert_eq!(
        h.attempts[0].error_class,
        Some(docket::ErrorClass::LeaseExpired)
    );
    assert_eq!(h.ledger[0].state, LedgerState::Committed);
    assert!(h.events.iter().any(|e| e.kind == "action_reconciled"));
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("docket-crash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_resumes_from_storage_sqlite() {
    let dir = temp_dir();
    let url = format!("sqlite://{}", dir.join("docket.db").display());
    killed_worker_process_resumes_from_storage(&url, &dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_resumes_from_storage_postgres() {
    let Ok(base) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema=crash_{}", uuid::Uuid::new_v4().simple());
    killed_worker_process_resumes_from_storage(&url, &temp_dir()).await;
}

#[tokio::test]
async fn handler_can_skip_a_step_and_fail_with_a_named_reason() {
    let (d, _clock) = engine();
    d.register(Job::new("gate", |ctx: Ctx, input: Value| async move {
        if input["amount"].as_u64().unwrap_or(0) < 1000 {
            ctx.skip_step("notify", "amount below 1000").await?;
            return Ok(json!("no notification"));
        }
        Err::<Value, _>(JobError::terminal(
            TerminalReason::Rejected,
            "approval rejected by ops-alice",
        ))
    }))
    .unwrap();
    let small = d
        .trigger("gate", json!({"amount": 10}))
        .await
        .unwrap()
        .run
        .id;
    let big = d
        .trigger("gate", json!({"amount": 5000}))
        .await
        .unwrap()
        .run
        .id;
    tick(&d).await;
    let h = d.history(small).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(
        h.steps[0].result,
        Some(json!({"skipped": true, "reason": "amount below 1000"}))
    );
    assert!(h
        .events
        .iter()
        .any(|e| e.kind == "step_skipped" && e.data["step"] == "notify"));
    let r = d.get_run(big).await.unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.terminal_reason, Some(TerminalReason::Rejected));
    assert_eq!(r.attempt, 1);
}

/// A durable sleep suspends the run between two steps: no lease, no worker
/// slot, no budget spent (a job with one attempt still completes), the step
/// before it runs once, and the run resumes at the stored wake time — not
/// earlier when claimed early, and not longer when the clock has moved on.
#[tokio::test]
async fn a_durable_sleep_suspends_and_resumes_without_spending_budget() {
    let (d, clock) = engine();
    let calls = Calls::default();
    let c = calls.clone();
    d.register(
        Job::new("nap", move |ctx: Ctx, _: Value| {
            let c = c.clone();
            async move {
                ctx.step("before", || async {
                    c.hit("before");
                    Ok::<_, JobError>(1)
                })
                .await?;
                ctx.sleep("cool-off", Duration::from_secs(3600)).await?;
                c.hit("after");
                Ok::<_, JobError>(json!("woke"))
            }
        })
        .retry(policy(1)),
    )
    .unwrap();
    let w = d.worker(WorkerConfig::default());
    let id = d.trigger("nap", json!({})).await.unwrap().run.id;
    w.tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Postponed);
    assert_eq!(run.run_after, T0.plus_millis(3_600_000));
    assert_eq!(run.lease_id, None, "a sleeping run holds no lease");
    assert_eq!((calls.get("before"), calls.get("after")), (1, 0));
    // Claimed early (an operator moved it): it sleeps again until the stored time.
    d.postpone(id, T0.plus_millis(60_000), Actor::new("ops", None))
        .await
        .unwrap();
    clock.advance_millis(60_000);
    w.tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Postponed);
    assert_eq!(
        run.run_after,
        T0.plus_millis(3_600_000),
        "not a new hour from now"
    );
    // At the wake time it resumes; the step before the sleep is replayed.
    clock.advance_millis(3_540_000);
    w.tick().await.unwrap();
    let run = d.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    assert_eq!(run.output, Some(json!("woke")));
    assert_eq!((calls.get("before"), calls.get("after")), (1, 1));
    assert_eq!(run.attempt, 3);
    assert_eq!(run.attempts_forgiven, 2, "sleeping spent no budget");
}

/// A sleeping run is cancelled at once: it holds no lease to wait for.
#[tokio::test]
async fn a_sleeping_run_is_cancelled_at_once() {
    let (d, _clock) = engine();
    d.register(Job::new("nap", |ctx: Ctx, _: Value| async move {
        ctx.sleep("long", Duration::from_secs(30 * 86_400)).await?;
        Ok::<_, JobError>(json!(null))
    }))
    .unwrap();
    let id = d.trigger("nap", json!({})).await.unwrap().run.id;
    d.worker(WorkerConfig::default()).tick().await.unwrap();
    assert_eq!(d.get_run(id).await.unwrap().status, RunStatus::Postponed);
    let run = d.cancel(id, Actor::new("ops", None)).await.unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
}
