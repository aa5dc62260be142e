//! Conformance cases of signals (see [`signals`](crate::signals)), run
//! against every backend by
//! [`signal_conformance_tests!`](crate::signal_conformance_tests) like the
//! main suite.

use crate::*;
use docket_core::{LeaseId, RunStatus, Timestamp};
use serde_json::{json, Value};

/// A fixed starting instant for tests: 2026-01-01T00:00:00Z.
pub const T0: Timestamp = Timestamp(1_767_225_600_000);
const HOUR: i64 = 3_600_000;

async fn trigger(store: &DynStore, tenant: &str) -> RunId {
    let mut n = NewRun::new("job", json!({}));
    n.tenant = tenant.into();
    store.trigger(vec![n], T0).await.unwrap().remove(0).run.id
}

/// Claims `id` at `now` (it must be the only due run of the job).
async fn claim(store: &DynStore, id: RunId, now: Timestamp) -> LeaseRef {
    let run = store
        .claim(ClaimRequest {
            tenant: None,
            jobs: vec!["job".into()],
            limit: 1,
            now,
            lease_ms: 30_000,
            worker: "w1".into(),
        })
        .await
        .unwrap()
        .pop()
        .expect("the run is due");
    assert_eq!(run.id, id);
    LeaseRef {
        run_id: id,
        lease_id: run.lease_id.unwrap(),
    }
}

/// Ends the attempt postponed until `until` (what the engine does when a
/// wait answers `Waiting`).
async fn suspend(store: &DynStore, lease: LeaseRef, now: Timestamp, until: Timestamp) {
    store
        .finish(vec![AttemptEnd {
            run_id: lease.run_id,
            lease_id: lease.lease_id,
            now,
            outcome: Outcome::Postponed { until },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
}

fn send(id: RunId, name: &str, signal_id: &str, data: Value, now: Timestamp) -> SendSignal {
    SendSignal {
        run_id: id,
        tenant: None,
        name: name.into(),
        signal_id: signal_id.into(),
        data,
        sent_by: "api".into(),
        now,
    }
}

fn wait(n: u32, name: &str, key: Option<&str>, until: Timestamp, now: Timestamp) -> WaitSignal {
    WaitSignal {
        wait: format!("signal:{name}:{n}"),
        name: name.into(),
        key: key.map(str::to_string),
        until,
        now,
    }
}

async fn kinds(store: &DynStore, id: RunId) -> Vec<String> {
    store
        .events(EventFilter {
            run_id: Some(id),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind.to_string())
        .collect()
}

/// A signal sent before the run waits is kept (no wake: nobody waits) and
/// the run's first wait for the name consumes it: marked delivered to the
/// wait and stored as the wait's step in the same transaction, with
/// `signal_received` (naming the sender) and `signal_delivered`.
pub async fn a_signal_sent_before_the_wait_is_kept_for_it(store: DynStore) {
    let id = trigger(&store, "default").await;
    let sent = store
        .send_signal(send(id, "paid", "s1", json!({"amount": 42}), T0))
        .await
        .unwrap();
    assert!(!sent.duplicate);
    assert!(!sent.woke, "nobody waits yet");
    assert_eq!(sent.signal.delivered_to, None);
    let lease = claim(&store, id, T0).await;
    let at = T0.plus_millis(5);
    let out = store
        .signal_wait(lease, wait(1, "paid", None, at.plus_millis(HOUR), at))
        .await
        .unwrap();
    let WaitOutcome::Delivered(sig) = out else {
        panic!("{out:?}")
    };
    assert_eq!(sig.id, "s1");
    assert_eq!(sig.data, json!({"amount": 42}));
    assert_eq!(sig.delivered_to.as_deref(), Some("signal:paid:1"));
    assert_eq!(sig.delivered_at, Some(at));
    let steps = store.steps(id).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].name, "signal:paid:1");
    assert_eq!(
        steps[0].result.as_ref().unwrap()["signal"]["data"],
        json!({"amount": 42})
    );
    assert_eq!(store.signals(id).await.unwrap(), vec![*sig]);
    assert!(store.signal_waits(id).await.unwrap().is_empty());
    let k = kinds(&store, id).await;
    assert_eq!(
        k,
        [
            "run_triggered",
            "signal_received",
            "attempt_started",
            "signal_delivered"
        ]
    );
    let events = store
        .events(EventFilter {
            run_id: Some(id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events[1].actor.as_deref(), Some("api"));
    assert_eq!(events[1].data["data"], json!({"amount": 42}));
    // The step is final: the same wait cannot consume a second signal.
    store
        .send_signal(send(id, "paid", "s2", json!(2), at))
        .await
        .unwrap();
    let again = store
        .signal_wait(lease, wait(1, "paid", None, at.plus_millis(HOUR), at))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
}

/// A run suspended in a wait is made due by a signal for its name (at the
/// send's time, in the send's transaction), and its next wait consumes
/// it. A signal of another name neither wakes it nor is consumed by it.
pub async fn a_signal_wakes_a_suspended_wait(store: DynStore) {
    let id = trigger(&store, "default").await;
    let lease = claim(&store, id, T0).await;
    let until = T0.plus_millis(3 * 24 * HOUR);
    let out = store
        .signal_wait(lease, wait(1, "paid", None, until, T0))
        .await
        .unwrap();
    assert_eq!(out, WaitOutcome::Waiting { until });
    let waits = store.signal_waits(id).await.unwrap();
    assert_eq!(waits.len(), 1);
    assert_eq!((waits[0].name.as_str(), waits[0].until), ("paid", until));
    suspend(&store, lease, T0, until).await;
    assert_eq!(
        store.waiting_for_signals(None).await.unwrap(),
        vec![("paid".to_string(), 1)]
    );
    let t1 = T0.plus_millis(HOUR);
    let other = store
        .send_signal(send(id, "shipped", "o1", json!(null), t1))
        .await
        .unwrap();
    assert!(!other.woke);
    assert_eq!(store.get_run(id).await.unwrap().unwrap().run_after, until);
    let sent = store
        .send_signal(send(id, "paid", "p1", json!("yes"), t1))
        .await
        .unwrap();
    assert!(sent.woke);
    let run = store.get_run(id).await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.run_after),
        (RunStatus::Postponed, t1),
        "due at once"
    );
    let lease = claim(&store, id, t1).await;
    // A replay asks with a new deadline; the stored one is kept.
    let out = store
        .signal_wait(lease, wait(1, "paid", None, t1.plus_millis(HOUR), t1))
        .await
        .unwrap();
    let WaitOutcome::Delivered(sig) = out else {
        panic!("{out:?}")
    };
    assert_eq!(sig.id, "p1");
    let pending: Vec<_> = store
        .signals(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.delivered_to.is_none())
        .map(|s| s.id)
        .collect();
    assert_eq!(pending, ["o1"], "the other name stays pending");
    assert!(store.waiting_for_signals(None).await.unwrap().is_empty());
}

/// A signal that reaches a run while the attempt that recorded the wait
/// is still running cannot move `run_after` (the end writes it); it sets
/// the run's wake flag, and the attempt's postponement then leaves the run
/// due at the end's time instead of the wait's deadline. Without the flag
/// the same end postpones to the deadline.
pub async fn a_signal_during_the_waiting_attempt_wakes_it_at_its_end(store: DynStore) {
    let id = trigger(&store, "default").await;
    let lease = claim(&store, id, T0).await;
    let until = T0.plus_millis(HOUR);
    store
        .signal_wait(lease, wait(1, "paid", None, until, T0))
        .await
        .unwrap();
    let t1 = T0.plus_millis(10);
    let sent = store
        .send_signal(send(id, "paid", "p1", json!(1), t1))
        .await
        .unwrap();
    assert!(sent.woke);
    let t2 = T0.plus_millis(20);
    suspend(&store, lease, t2, until).await;
    let run = store.get_run(id).await.unwrap().unwrap();
    assert_eq!((run.status, run.run_after), (RunStatus::Postponed, t2));
    // The flag was cleared by that end: the next suspension is not cut short.
    let lease = claim(&store, id, t2).await;
    let out = store
        .signal_wait(lease, wait(1, "paid", None, until, t2))
        .await
        .unwrap();
    assert!(matches!(out, WaitOutcome::Delivered(_)), "{out:?}");
    let out = store
        .signal_wait(lease, wait(2, "paid", None, until, t2))
        .await
        .unwrap();
    assert_eq!(out, WaitOutcome::Waiting { until });
    suspend(&store, lease, t2, until).await;
    assert_eq!(store.get_run(id).await.unwrap().unwrap().run_after, until);
}

/// A wait past its deadline with no signal stores a timeout (so a replay
/// sees the same answer) and closes; a signal received after the deadline
/// is not delivered to it but kept for a later wait.
pub async fn a_wait_times_out_and_later_signals_are_kept(store: DynStore) {
    let id = trigger(&store, "default").await;
    let lease = claim(&store, id, T0).await;
    let until = T0.plus_millis(HOUR);
    store
        .signal_wait(lease, wait(1, "paid", None, until, T0))
        .await
        .unwrap();
    suspend(&store, lease, T0, until).await;
    // Sent after the deadline, before the run was claimed again.
    let late = until.plus_millis(1);
    store
        .send_signal(send(id, "paid", "late", json!(1), late))
        .await
        .unwrap();
    let lease = claim(&store, id, late).await;
    let out = store
        .signal_wait(lease, wait(1, "paid", None, late.plus_millis(HOUR), late))
        .await
        .unwrap();
    assert_eq!(out, WaitOutcome::TimedOut { until });
    let steps = store.steps(id).await.unwrap();
    assert_eq!(steps[0].result, Some(json!({"timeout": {"until": until}})));
    assert!(kinds(&store, id)
        .await
        .contains(&"signal_timed_out".to_string()));
    // The next wait for the name gets it.
    let out = store
        .signal_wait(lease, wait(2, "paid", None, late.plus_millis(HOUR), late))
        .await
        .unwrap();
    assert!(
        matches!(&out, WaitOutcome::Delivered(s) if s.id == "late"),
        "{out:?}"
    );
}

/// The same signal id for the same run twice is one signal: the second
/// send writes nothing and answers the stored one (its payload, not the
/// repeat's), also once the signal was delivered or the run finished.
pub async fn duplicate_signal_ids_are_one_signal(store: DynStore) {
    let id = trigger(&store, "default").await;
    let first = store
        .send_signal(send(id, "paid", "once", json!(1), T0))
        .await
        .unwrap();
    let again = store
        .send_signal(send(id, "paid", "once", json!(2), T0.plus_millis(1)))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.signal, first.signal);
    assert_eq!(store.signals(id).await.unwrap().len(), 1);
    let received = kinds(&store, id)
        .await
        .into_iter()
        .filter(|k| k == "signal_received")
        .count();
    assert_eq!(received, 1);
    store
        .operator(OperatorRequest {
            run_id: id,
            actor: "ops".into(),
            comment: None,
            now: T0,
            command: OperatorCommand::Cancel,
        })
        .await
        .unwrap();
    let after = store
        .send_signal(send(id, "paid", "once", json!(3), T0.plus_millis(2)))
        .await
        .unwrap();
    assert!(after.duplicate, "a repeat answers the original, even now");
}

/// Two signals of one name reach two waits of that name in arrival order,
/// one each.
pub async fn two_signals_of_one_name_reach_two_waits_in_order(store: DynStore) {
    let id = trigger(&store, "default").await;
    for (i, sid) in ["b-first", "a-second"].iter().enumerate() {
        store
            .send_signal(send(id, "item", sid, json!(i), T0.plus_millis(i as i64)))
            .await
            .unwrap();
    }
    let lease = claim(&store, id, T0.plus_millis(5)).await;
    let mut got = Vec::new();
    for n in 1..=3 {
        let out = store
            .signal_wait(
                lease,
                wait(n, "item", None, T0.plus_millis(HOUR), T0.plus_millis(5)),
            )
            .await
            .unwrap();
        got.push(match out {
            WaitOutcome::Delivered(s) => s.id,
            WaitOutcome::Waiting { .. } => "waiting".into(),
            o => panic!("{o:?}"),
        });
    }
    assert_eq!(got, ["b-first", "a-second", "waiting"]);
}

/// Refusals: a final run (its state named), an unknown run, another
/// tenant's run (not found, like an unknown one). Nothing is written.
pub async fn signals_to_final_unknown_or_foreign_runs_are_refused(store: DynStore) {
    let id = trigger(&store, "acme").await;
    let mut s = send(id, "paid", "x", json!(1), T0);
    s.tenant = Some("globex".into());
    assert!(matches!(
        store.send_signal(s).await,
        Err(StoreError::NotFound(r)) if r == id
    ));
    let unknown = RunId::new();
    assert!(matches!(
        store.send_signal(send(unknown, "paid", "x", json!(1), T0)).await,
        Err(StoreError::NotFound(r)) if r == unknown
    ));
    let lease = claim(&store, id, T0).await;
    store
        .finish(vec![AttemptEnd {
            run_id: id,
            lease_id: lease.lease_id,
            now: T0,
            outcome: Outcome::Completed { output: json!(1) },
        }])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let e = store
        .send_signal(send(id, "paid", "y", json!(1), T0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            StoreError::WrongState {
                current: RunStatus::Completed,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(store.signals(id).await.unwrap().is_empty());
}

/// A wait under a lease that no longer holds the run consumes nothing: the
/// write is refused and recorded, the signal stays pending for the attempt
/// that holds the run (exactly once: never lost, never twice).
pub async fn a_stale_wait_consumes_nothing(store: DynStore) {
    let id = trigger(&store, "default").await;
    store
        .send_signal(send(id, "paid", "s1", json!(1), T0))
        .await
        .unwrap();
    let lease = claim(&store, id, T0).await;
    let stale = LeaseRef {
        run_id: id,
        lease_id: LeaseId::new(),
    };
    let e = store
        .signal_wait(stale, wait(1, "paid", None, T0.plus_millis(HOUR), T0))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::StaleLease { .. }), "{e:?}");
    assert!(kinds(&store, id)
        .await
        .contains(&"stale_write_refused".to_string()));
    assert!(store.steps(id).await.unwrap().is_empty());
    assert_eq!(store.signals(id).await.unwrap()[0].delivered_to, None);
    let out = store
        .signal_wait(lease, wait(1, "paid", None, T0.plus_millis(HOUR), T0))
        .await
        .unwrap();
    assert!(matches!(out, WaitOutcome::Delivered(_)));
}

/// A keyed send reaches every non-final run of the tenant waiting for
/// exactly that name and key, in one transaction, and wakes each; not a
/// run waiting for another key, another tenant's, one waiting for another
/// name, or one not waiting. Nobody waiting: nothing is stored. A repeat of
/// the id answers the runs the first reached, as duplicates.
pub async fn keyed_signals_reach_every_waiting_run_of_the_tenant(store: DynStore) {
    let until = T0.plus_millis(HOUR);
    let mut waiting = Vec::new();
    // Created and suspended one by one (each is the only due run).
    for (tenant, name, key) in [
        ("acme", "settled", "order-42"),
        ("acme", "settled", "order-42"),
        ("acme", "settled", "order-43"),
        ("globex", "settled", "order-42"),
        ("acme", "refunded", "order-42"),
    ] {
        let id = trigger(&store, tenant).await;
        let lease = claim(&store, id, T0).await;
        let out = store
            .signal_wait(lease, wait(1, name, Some(key), until, T0))
            .await
            .unwrap();
        assert_eq!(out, WaitOutcome::Waiting { until });
        suspend(&store, lease, T0, until).await;
        waiting.push(id);
    }
    let idle = trigger(&store, "acme").await;
    let t1 = T0.plus_millis(1000);
    let keyed = |sid: &str| SendKeyed {
        tenant: "acme".into(),
        name: "settled".into(),
        key: "order-42".into(),
        signal_id: sid.into(),
        data: json!({"paid": true}),
        sent_by: "webhook".into(),
        now: t1,
    };
    let sent = store.send_keyed_signal(keyed("evt-1")).await.unwrap();
    let mut reached: Vec<RunId> = sent.iter().map(|s| s.signal.run_id).collect();
    reached.sort();
    let mut expected = vec![waiting[0], waiting[1]];
    expected.sort();
    assert_eq!(reached, expected);
    assert!(sent.iter().all(|s| s.woke && !s.duplicate));
    assert!(sent
        .iter()
        .all(|s| s.signal.key.as_deref() == Some("order-42")));
    for id in &expected {
        assert_eq!(store.get_run(*id).await.unwrap().unwrap().run_after, t1);
    }
    for id in [waiting[2], waiting[3], waiting[4], idle] {
        assert!(store.signals(id).await.unwrap().is_empty(), "{id}");
        assert_ne!(store.get_run(id).await.unwrap().unwrap().run_after, t1);
    }
    // Out of the way of the claims below.
    store
        .operator(OperatorRequest {
            run_id: idle,
            actor: "ops".into(),
            comment: None,
            now: t1,
            command: OperatorCommand::Cancel,
        })
        .await
        .unwrap();
    let again = store.send_keyed_signal(keyed("evt-1")).await.unwrap();
    let mut again_ids: Vec<RunId> = again.iter().map(|s| s.signal.run_id).collect();
    again_ids.sort();
    assert_eq!(again_ids, expected);
    assert!(again.iter().all(|s| s.duplicate));
    // Nobody waits for order-99: nothing stored, nobody reached.
    let mut none = keyed("evt-2");
    none.key = "order-99".into();
    assert!(store.send_keyed_signal(none).await.unwrap().is_empty());
    // The woken runs consume it.
    for id in expected {
        let lease = claim(&store, id, t1).await;
        let out = store
            .signal_wait(lease, wait(1, "settled", Some("order-42"), until, t1))
            .await
            .unwrap();
        assert!(
            matches!(&out, WaitOutcome::Delivered(s) if s.id == "evt-1"),
            "{out:?}"
        );
    }
}

/// Runs suspended in waits are counted by signal name (and tenant); a run
/// whose wait closed, or that is not suspended, is not.
pub async fn runs_waiting_for_signals_are_counted_by_name(store: DynStore) {
    let until = T0.plus_millis(HOUR);
    for (tenant, name) in [("acme", "paid"), ("acme", "paid"), ("globex", "approved")] {
        let id = trigger(&store, tenant).await;
        let lease = claim(&store, id, T0).await;
        store
            .signal_wait(lease, wait(1, name, None, until, T0))
            .await
            .unwrap();
        suspend(&store, lease, T0, until).await;
    }
    assert_eq!(
        store.waiting_for_signals(None).await.unwrap(),
        vec![("approved".to_string(), 1), ("paid".to_string(), 2)]
    );
    assert_eq!(
        store
            .waiting_for_signals(Some("acme".into()))
            .await
            .unwrap(),
        vec![("paid".to_string(), 2)]
    );
}

/// Runs suspended in a durable sleep are counted (by tenant): a postponed
/// run whose `sleep:` step wakes it at its `run_after`. A run postponed by
/// its handler, one whose sleep is over (it resumed and postponed itself
/// to another time), a sleeping run of another tenant, and a run that is
/// no longer postponed are not.
pub async fn runs_sleeping_are_counted(store: DynStore) {
    let wake = T0.plus_millis(3 * 24 * HOUR);
    // (tenant, sleep step's wake time, postponed until)
    let cases = [
        ("acme", Some(wake), wake),
        ("acme", Some(wake.plus_millis(1)), wake.plus_millis(1)),
        ("acme", None, wake),
        ("acme", Some(T0), wake),
        ("globex", Some(wake), wake),
    ];
    let mut ids = Vec::new();
    for (tenant, sleep, until) in cases {
        let id = trigger(&store, tenant).await;
        let lease = claim(&store, id, T0).await;
        if let Some(t) = sleep {
            store
                .save_step(
                    lease,
                    "sleep:nap".into(),
                    json!({ "until": t, "from": T0 }),
                    T0,
                )
                .await
                .unwrap();
        }
        suspend(&store, lease, T0, until).await;
        ids.push(id);
    }
    assert_eq!(store.count_sleeping(Some("acme".into())).await.unwrap(), 2);
    assert_eq!(
        store.count_sleeping(Some("globex".into())).await.unwrap(),
        1
    );
    assert_eq!(
        store.count_sleeping(Some("initech".into())).await.unwrap(),
        0
    );
    assert_eq!(store.count_sleeping(None).await.unwrap(), 3);
    // Woken (claimed), the first no longer sleeps.
    claim(&store, ids[0], wake).await;
    assert_eq!(store.count_sleeping(Some("acme".into())).await.unwrap(), 1);
}

/// Instantiates every signal conformance case for a store factory, like
/// [`conformance_tests!`](crate::conformance_tests).
#[macro_export]
macro_rules! signal_conformance_tests {
    (optional: $factory:expr) => {
        $crate::signal_conformance_tests!(@names @optional $factory);
    };
    ($factory:expr) => {
        $crate::signal_conformance_tests!(@names @required $factory);
    };
    (@names @$kind:ident $factory:expr) => {
        $crate::signal_conformance_tests!(@each @$kind $factory;
            a_signal_sent_before_the_wait_is_kept_for_it,
            a_signal_wakes_a_suspended_wait,
            a_signal_during_the_waiting_attempt_wakes_it_at_its_end,
            a_wait_times_out_and_later_signals_are_kept,
            duplicate_signal_ids_are_one_signal,
            two_signals_of_one_name_reach_two_waits_in_order,
            signals_to_final_unknown_or_foreign_runs_are_refused,
            a_stale_wait_consumes_nothing,
            keyed_signals_reach_every_waiting_run_of_the_tenant,
            runs_waiting_for_signals_are_counted_by_name,
            runs_sleeping_are_counted,
        );
    };
    (@each @required $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: $crate::DynStore = $factory;
                $crate::signal_conformance::$name(store).await;
            }
        )*
    };
    (@each @optional $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let store: ::std::option::Option<$crate::DynStore> = $factory;
                if let ::std::option::Option::Some(store) = store {
                    $crate::signal_conformance::$name(store).await;
                }
            }
        )*
    };
}
