//! Conformance: debounced triggers (docs/FLOW_CONTROL.md, "Debounce"), on
//! every backend. Each test gets TWO handles on one database (on SQLite in
//! memory, the same store twice; on a SQLite file, two stores on the file;
//! on PostgreSQL, two pools on one schema), so the racing test races two
//! processes' worth of connections. Instantiate with
//! [`debounce_conformance_tests!`](crate::debounce_conformance_tests).

use crate::conformance::T0;
use crate::*;
use docket_core::{EventKind, RunStatus, Timestamp};
use serde_json::{json, Value};

/// Two handles on one database.
pub type Pair = (DynStore, DynStore);

const WINDOW: i64 = 1_000;

fn debounced(job: &str, key: &str, keep: Keep, input: Value) -> NewRun {
    let mut n = NewRun::new(job, input);
    n.actor = Some("tester".into());
    n.debounce = Some(DebounceKey {
        key: key.into(),
        keep,
        window_ms: WINDOW,
    });
    n
}

async fn at(store: &DynStore, run: NewRun, ms: i64) -> Triggered {
    store
        .trigger(vec![run], T0.plus_millis(ms))
        .await
        .unwrap()
        .remove(0)
}

async fn collapses(store: &DynStore, run: RunId) -> Vec<EventRecord> {
    crate::conformance::events_of(store, run)
        .await
        .into_iter()
        .filter(|e| e.kind == EventKind::TriggerCollapsed)
        .collect()
}

fn claim(now: Timestamp) -> ClaimRequest {
    ClaimRequest {
        tenant: None,
        jobs: vec!["job".into()],
        limit: 10,
        now,
        lease_ms: 30_000,
        worker: "w1".into(),
    }
}

/// `keep = first`: the first trigger makes a run due at once; triggers of
/// the key inside `[first, first + window)` return it (whatever it is
/// doing) and their input is dropped; a trigger exactly at the window's end
/// opens a new window. Each collapse is a `trigger_collapsed` event with the
/// actor, the mode and the dropped input's size and hash, and the count is
/// on the run.
pub async fn keep_first_collapses_within_the_window((store, _): Pair) {
    let first = at(
        &store,
        debounced("job", "k", Keep::First, json!({ "n": 1 })),
        0,
    )
    .await;
    assert!(!first.existing && !first.collapsed);
    let r = first.run;
    assert_eq!(r.run_after, T0, "due at once");
    let d = r.debounce.clone().expect("debounce on the run");
    assert_eq!(
        (d.key.as_str(), d.keep, d.until, d.collapsed, d.current),
        ("k", Keep::First, T0.plus_millis(WINDOW), 0, true)
    );
    // Collapsed while pending, and while running.
    let second = at(
        &store,
        debounced("job", "k", Keep::First, json!({ "n": 2 })),
        10,
    )
    .await;
    assert!(second.existing && second.collapsed);
    assert_eq!(second.run.id, r.id);
    assert_eq!(
        second.run.input,
        json!({ "n": 1 }),
        "the first input is kept"
    );
    assert_eq!(second.run.debounce.as_ref().unwrap().collapsed, 1);
    let claimed = store.claim(claim(T0.plus_millis(20))).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let third = at(
        &store,
        debounced("job", "k", Keep::First, json!({ "n": 3 })),
        WINDOW - 1,
    )
    .await;
    assert!(third.collapsed);
    assert_eq!(third.run.id, r.id);
    assert_eq!(third.run.status, RunStatus::Running);
    let stored = store.get_run(r.id).await.unwrap().unwrap();
    assert_eq!(stored.debounce.as_ref().unwrap().collapsed, 2);
    assert_eq!(stored.input, json!({ "n": 1 }));
    let ev = collapses(&store, r.id).await;
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0].actor.as_deref(), Some("tester"));
    assert_eq!(ev[0].data["keep"], json!("first"));
    assert_eq!(ev[0].data["input_replaced"], json!(false));
    assert_eq!(ev[0].data["collapsed"], json!(1));
    assert_eq!(
        ev[0].data["discarded_input"],
        crate::plan::debounce::digest(&json!({ "n": 2 }))
    );
    assert_eq!(ev[1].data["collapsed"], json!(2));
    // Exactly at the window's end: a new window and a new run.
    let next = at(
        &store,
        debounced("job", "k", Keep::First, json!({ "n": 4 })),
        WINDOW,
    )
    .await;
    assert!(!next.existing && !next.collapsed);
    assert_ne!(next.run.id, r.id);
    let nd = next.run.debounce.clone().unwrap();
    assert_eq!((nd.until, nd.current), (T0.plus_millis(2 * WINDOW), true));
    let old = store.get_run(r.id).await.unwrap().unwrap();
    assert!(
        !old.debounce.unwrap().current,
        "the old window is no longer current"
    );
    let trig = store
        .events(EventFilter {
            run_id: Some(next.run.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trig[0].data["debounce"]["opened"], json!("window_ended"));
}

/// `keep = last`: the run is due when the window after the FIRST trigger
/// ends (later triggers do not move it); each trigger inside the window
/// replaces the input while the run has not started. A trigger that finds
/// the run already started (a claimer whose clock is ahead) opens a new
/// window with its own run, so the last input is never lost and a started
/// run's input never changes.
pub async fn keep_last_replaces_the_input_until_the_run_starts((store, _): Pair) {
    let first = at(
        &store,
        debounced("job", "k", Keep::Last, json!({ "n": 1 })),
        0,
    )
    .await;
    let r = first.run;
    assert_eq!(
        r.run_after,
        T0.plus_millis(WINDOW),
        "due at the window's end"
    );
    let second = at(
        &store,
        debounced("job", "k", Keep::Last, json!({ "n": 2 })),
        400,
    )
    .await;
    assert!(second.existing && second.collapsed);
    assert_eq!(second.run.id, r.id);
    assert_eq!(second.run.input, json!({ "n": 2 }), "the last input wins");
    assert_eq!(
        second.run.run_after,
        T0.plus_millis(WINDOW),
        "a fixed window"
    );
    let ev = collapses(&store, r.id).await;
    assert_eq!(ev[0].data["input_replaced"], json!(true));
    assert_eq!(
        ev[0].data["discarded_input"],
        crate::plan::debounce::digest(&json!({ "n": 1 }))
    );
    assert!(store
        .claim(claim(T0.plus_millis(WINDOW - 1)))
        .await
        .unwrap()
        .is_empty());
    // A claimer whose clock is at the window's end takes the run...
    let claimed = store.claim(claim(T0.plus_millis(WINDOW))).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].input, json!({ "n": 2 }));
    // ...and a trigger from a process whose clock is still inside the
    // window finds it started: a new window, a new run; the running run's
    // input is untouched.
    let late = at(
        &store,
        debounced("job", "k", Keep::Last, json!({ "n": 3 })),
        WINDOW - 1,
    )
    .await;
    assert!(!late.existing && !late.collapsed);
    assert_ne!(late.run.id, r.id);
    assert_eq!(late.run.input, json!({ "n": 3 }));
    assert_eq!(late.run.run_after, T0.plus_millis(2 * WINDOW - 1));
    let running = store.get_run(r.id).await.unwrap().unwrap();
    assert_eq!(running.input, json!({ "n": 2 }));
    assert_eq!(running.debounce.as_ref().unwrap().collapsed, 1);
    assert!(!running.debounce.unwrap().current);
    let trig = store
        .events(EventFilter {
            run_id: Some(late.run.id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(trig[0].data["debounce"]["opened"], json!("run_started"));
}

/// Cancelling a pending debounced run ends its window: the next trigger of
/// the key opens a new one (both modes).
pub async fn a_cancelled_run_ends_its_window((store, _): Pair) {
    for keep in [Keep::First, Keep::Last] {
        let key = format!("cancel-{keep}");
        let r = at(&store, debounced("job", &key, keep, json!(1)), 0)
            .await
            .run;
        crate::conformance::cancel(&store, r.id, T0.plus_millis(1)).await;
        let next = at(&store, debounced("job", &key, keep, json!(2)), 2).await;
        assert!(!next.collapsed, "{keep}");
        assert_ne!(next.run.id, r.id);
        assert_eq!(next.run.input, json!(2));
    }
}

/// An idempotency key is checked first: a repeated key returns its run
/// (not counted as a collapse); a new key inside the window is collapsed
/// (and its key is not stored).
pub async fn an_idempotency_key_wins_over_the_debounce((store, _): Pair) {
    let mut a = debounced("job", "k", Keep::First, json!(1));
    a.idempotency_key = Some("i-1".into());
    let r = at(&store, a, 0).await.run;
    let mut again = debounced("job", "k", Keep::First, json!(2));
    again.idempotency_key = Some("i-1".into());
    let t = at(&store, again, 10).await;
    assert!(t.existing && !t.collapsed);
    assert_eq!(t.run.id, r.id);
    assert_eq!(t.run.debounce.as_ref().unwrap().collapsed, 0);
    let mut other = debounced("job", "k", Keep::First, json!(3));
    other.idempotency_key = Some("i-2".into());
    let t = at(&store, other, 20).await;
    assert!(t.collapsed);
    assert_eq!(t.run.id, r.id);
    assert_eq!(t.run.idempotency_key.as_deref(), Some("i-1"));
    assert_eq!(
        collapses(&store, r.id).await[0].data["idempotency_key"],
        json!("i-2")
    );
    // A repeated idempotency key after the window still returns its run.
    let mut late = debounced("job", "k", Keep::First, json!(4));
    late.idempotency_key = Some("i-1".into());
    let t = at(&store, late, 5 * WINDOW).await;
    assert!(t.existing && !t.collapsed);
    assert_eq!(t.run.id, r.id);
}

/// A batch is applied in order, in one transaction: two entries of one key
/// collapse (the second into the first's run), other keys, tenants, jobs
/// and undebounced entries make their own runs.
pub async fn a_batch_collapses_entries_of_one_key_in_order((store, _): Pair) {
    let a = debounced("job", "k", Keep::Last, json!({ "n": 1 }));
    let b = debounced("job", "k", Keep::Last, json!({ "n": 2 }));
    let plain = NewRun::new("job", json!("plain"));
    let other_key = debounced("job", "k2", Keep::Last, json!({ "n": 3 }));
    let mut other_tenant = debounced("job", "k", Keep::Last, json!({ "n": 4 }));
    other_tenant.tenant = "acme".into();
    let other_job = debounced("job2", "k", Keep::Last, json!({ "n": 5 }));
    let c = debounced("job", "k", Keep::Last, json!({ "n": 6 }));
    let out = store
        .trigger(
            vec![a.clone(), b, plain, other_key, other_tenant, other_job, c],
            T0,
        )
        .await
        .unwrap();
    let flags: Vec<(bool, bool)> = out.iter().map(|t| (t.existing, t.collapsed)).collect();
    assert_eq!(
        flags,
        [
            (false, false),
            (true, true),
            (false, false),
            (false, false),
            (false, false),
            (false, false),
            (true, true)
        ]
    );
    assert_eq!(out[1].run.id, a.id);
    assert_eq!(out[6].run.id, a.id);
    let ids: std::collections::HashSet<RunId> = out.iter().map(|t| t.run.id).collect();
    assert_eq!(ids.len(), 5);
    let stored = store.get_run(a.id).await.unwrap().unwrap();
    assert_eq!(stored.input, json!({ "n": 6 }), "the batch's last input");
    assert_eq!(stored.debounce.unwrap().collapsed, 2);
    let inputs: Vec<Value> = collapses(&store, a.id)
        .await
        .iter()
        .map(|e| e.data["discarded_input"].clone())
        .collect();
    assert_eq!(
        inputs,
        [
            crate::plan::debounce::digest(&json!({ "n": 1 })),
            crate::plan::debounce::digest(&json!({ "n": 2 }))
        ]
    );
}

/// Triggers of one key racing from two handles (two processes' worth of
/// connections), many at once: exactly one run per window, every other
/// trigger collapsed into it and counted once.
pub async fn racing_triggers_make_one_run_per_window((one, two): Pair) {
    const N: usize = 8;
    for round in 0..4 {
        let keep = if round % 2 == 0 {
            Keep::First
        } else {
            Keep::Last
        };
        let key = format!("race-{round}");
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for i in 0..N {
            let store = if i % 2 == 0 { one.clone() } else { two.clone() };
            let b = barrier.clone();
            let run = debounced("job", &key, keep, json!({ "i": i }));
            tasks.push(tokio::spawn(async move {
                b.wait().await;
                store.trigger(vec![run], T0).await.unwrap().remove(0)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        let created: Vec<&Triggered> = out.iter().filter(|t| !t.existing).collect();
        assert_eq!(created.len(), 1, "round {round}: one run per window");
        let id = created[0].run.id;
        assert!(out.iter().all(|t| t.run.id == id));
        assert_eq!(out.iter().filter(|t| t.collapsed).count(), N - 1);
        let stored = one.get_run(id).await.unwrap().unwrap();
        assert_eq!(stored.debounce.unwrap().collapsed as usize, N - 1);
        assert_eq!(collapses(&one, id).await.len(), N - 1);
        let runs = one
            .list_runs(RunFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            runs.iter()
                .filter(|r| r.debounce.as_ref().is_some_and(|d| d.key == key))
                .count(),
            1
        );
    }
}

/// Two batches racing from two handles with the same keys in opposite
/// orders (`[a, b]` and `[b, a]`), repeatedly, with and without open
/// windows: neither fails (no deadlock between the two transactions), and
/// each key keeps exactly one run per window.
pub async fn opposite_batches_of_the_same_keys_do_not_deadlock((one, two): Pair) {
    for round in 0..6 {
        // Rounds alternate between opening windows and collapsing into them.
        let now = T0.plus_millis((round / 2) * 10 * WINDOW);
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for (i, store) in [one.clone(), two.clone()].into_iter().enumerate() {
            let b = barrier.clone();
            let mut keys = ["a", "b", "c"];
            if i == 1 {
                keys.reverse();
            }
            let runs: Vec<NewRun> = keys
                .iter()
                .map(|k| debounced("job", k, Keep::Last, json!({ "by": i })))
                .collect();
            tasks.push(tokio::spawn(async move {
                b.wait().await;
                store.trigger(runs, now).await
            }));
        }
        for t in tasks {
            let out = t.await.unwrap();
            assert!(out.is_ok(), "round {round}: {out:?}");
        }
        for key in ["a", "b", "c"] {
            let runs = one
                .list_runs(RunFilter {
                    limit: 1_000,
                    ..Default::default()
                })
                .await
                .unwrap();
            let of_key = runs
                .iter()
                .filter(|r| r.debounce.as_ref().is_some_and(|d| d.key == key))
                .count();
            assert_eq!(of_key as i64, round / 2 + 1, "round {round}, key {key}");
        }
    }
}

/// What operators read (`GET /api/limits`, `/metrics`): the open windows
/// of one tenant or of all, and their count per (tenant, job). Open means
/// a trigger now would be collapsed (`plan::debounce::is_open`): not a
/// window that ended (its end is outside it), whose run was cancelled, or
/// a `keep = last` window whose run started (here: claimed by a process
/// whose clock is ahead); a `keep = first` window stays open while its run
/// runs. Both handles read the same rows, and another tenant's windows
/// never appear in a tenant's read.
pub async fn open_windows_are_listed_per_tenant((one, two): Pair) {
    let in_tenant = |mut n: NewRun, tenant: &str| {
        n.tenant = tenant.into();
        n
    };
    // keep = first, collapsed once, then running.
    let a = at(&one, debounced("job", "a", Keep::First, json!(1)), 0)
        .await
        .run;
    at(&two, debounced("job", "a", Keep::First, json!(2)), 10).await;
    let claimed = one.claim(claim(T0.plus_millis(20))).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [a.id]);
    // keep = last, collapsed twice, pending until its end.
    let b = at(&one, debounced("job", "b", Keep::Last, json!(1)), 100)
        .await
        .run;
    at(&two, debounced("job", "b", Keep::Last, json!(2)), 110).await;
    at(&one, debounced("job", "b", Keep::Last, json!(3)), 120).await;
    // keep = last, started by a clock ahead of the reads'.
    let c = at(&one, debounced("job", "c", Keep::Last, json!(1)), 0)
        .await
        .run;
    let ahead = one.claim(claim(T0.plus_millis(WINDOW))).await.unwrap();
    assert_eq!(ahead.iter().map(|r| r.id).collect::<Vec<_>>(), [c.id]);
    // Cancelled.
    let d = at(&one, debounced("job", "d", Keep::First, json!(1)), 0)
        .await
        .run;
    crate::conformance::cancel(&one, d.id, T0.plus_millis(1)).await;
    // Ended before the reads' time.
    at(
        &one,
        debounced("job", "old", Keep::First, json!(0)),
        -WINDOW - 1,
    )
    .await;
    // Another job of the tenant, and another tenant with the same key.
    let z = at(&two, debounced("job2", "z", Keep::First, json!(1)), 200)
        .await
        .run;
    let other = at(
        &two,
        in_tenant(debounced("job", "a", Keep::Last, json!(1)), "other"),
        0,
    )
    .await
    .run;

    let now = T0.plus_millis(500);
    let window = |run: &Run, status: RunStatus, collapsed: u32| {
        let d = run.debounce.clone().unwrap();
        DebounceWindow {
            tenant: run.tenant.clone(),
            job: run.job.clone(),
            key: d.key,
            keep: d.keep,
            opened_at: run.created_at,
            until: d.until,
            run: run.id,
            status,
            collapsed,
        }
    };
    let acme = vec![
        window(&a, RunStatus::Running, 1),
        window(&b, RunStatus::Pending, 2),
        window(&z, RunStatus::Pending, 0),
    ];
    assert_eq!(acme[1].opened_at, T0.plus_millis(100));
    assert_eq!(acme[1].until, T0.plus_millis(100 + WINDOW));
    for store in [&one, &two] {
        let mine = store
            .debounce_windows(Some(DEFAULT_TENANT.into()), now, 100)
            .await
            .unwrap();
        assert_eq!(mine, acme);
        let theirs = store
            .debounce_windows(Some("other".into()), now, 100)
            .await
            .unwrap();
        assert_eq!(theirs, [window(&other, RunStatus::Pending, 0)]);
        let all = store.debounce_windows(None, now, 100).await.unwrap();
        let mut expected = acme.clone();
        expected.push(window(&other, RunStatus::Pending, 0));
        assert_eq!(all, expected);
        let first = store
            .debounce_windows(Some(DEFAULT_TENANT.into()), now, 1)
            .await
            .unwrap();
        assert_eq!(first, acme[..1]);
        let count = |tenant: &str, job: &str, open: u64| DebounceCount {
            tenant: tenant.into(),
            job: job.into(),
            open,
        };
        assert_eq!(
            store
                .debounce_counts(Some(DEFAULT_TENANT.into()), now)
                .await
                .unwrap(),
            [
                count(DEFAULT_TENANT, "job", 2),
                count(DEFAULT_TENANT, "job2", 1)
            ]
        );
        assert_eq!(
            store.debounce_counts(None, now).await.unwrap(),
            [
                count(DEFAULT_TENANT, "job", 2),
                count(DEFAULT_TENANT, "job2", 1),
                count("other", "job", 1)
            ]
        );
        // At b's end, b's window is over (the end is outside it).
        let later = store
            .debounce_windows(
                Some(DEFAULT_TENANT.into()),
                T0.plus_millis(100 + WINDOW),
                100,
            )
            .await
            .unwrap();
        assert_eq!(
            later.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(),
            ["z"]
        );
    }
}

/// Instantiates the debounce conformance tests for a backend: `$factory`
/// yields a [`Pair`] of handles on one fresh database (with `optional:`,
/// an `Option<Pair>`; `None` skips).
#[macro_export]
macro_rules! debounce_conformance_tests {
    (optional: $factory:expr) => {
        $crate::debounce_conformance_tests!(@names @optional $factory);
    };
    ($factory:expr) => {
        $crate::debounce_conformance_tests!(@names @required $factory);
    };
    (@names @$kind:ident $factory:expr) => {
        $crate::debounce_conformance_tests!(@each @$kind $factory;
            keep_first_collapses_within_the_window,
            keep_last_replaces_the_input_until_the_run_starts,
            a_cancelled_run_ends_its_window,
            an_idempotency_key_wins_over_the_debounce,
            a_batch_collapses_entries_of_one_key_in_order,
            racing_triggers_make_one_run_per_window,
            opposite_batches_of_the_same_keys_do_not_deadlock,
            open_windows_are_listed_per_tenant,
        );
    };
    (@each @required $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let pair: $crate::debounce_conformance::Pair = $factory;
                $crate::debounce_conformance::$name(pair).await;
            }
        )*
    };
    (@each @optional $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let pair: ::std::option::Option<$crate::debounce_conformance::Pair> = $factory;
                if let ::std::option::Option::Some(pair) = pair {
                    $crate::debounce_conformance::$name(pair).await;
                }
            }
        )*
    };
}
