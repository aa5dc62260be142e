//! Debounced triggers through the engine (`Job::debounce`,
//! `TriggerOptions::debounce`) on embedded SQLite, with the injected clock
//! (docs/FLOW_CONTROL.md, "Debounce").

use docket::{
    Debounce, Docket, EventKind, Job, Keep, ManualClock, RunStatus, Timestamp, TriggerOptions,
    WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T0: Timestamp = Timestamp(1_767_225_600_000);

fn engine() -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    (Docket::with_store(store, Arc::new(clock.clone())), clock)
}

/// A job recording the inputs it ran with.
fn recording(name: &str, seen: Arc<Mutex<Vec<Value>>>) -> Job {
    Job::new(name, move |_ctx, input: Value| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(input);
            Ok(json!({}))
        }
    })
}

fn worker(d: &Docket) -> docket::Worker {
    d.worker(WorkerConfig {
        concurrency: 1,
        ..Default::default()
    })
}

/// keep = last through `Docket::trigger_with`: three triggers of one
/// customer within the window make one run, due at the window's end, that
/// runs ONCE with the last input; another customer gets its own run; the
/// answer says which triggers were collapsed; the run's timeline has the
/// collapse events with the actor.
#[tokio::test]
async fn keep_last_runs_once_with_the_last_input_at_the_window_end() {
    let (d, clock) = engine();
    let seen = Arc::new(Mutex::new(Vec::new()));
    d.register(recording("sync", seen.clone()).debounce(Debounce::last(
        "{{ tenant }}/{{ input.customer }}",
        Duration::from_secs(30),
    )))
    .unwrap();
    let opts = || TriggerOptions {
        actor: Some("crm-webhook".into()),
        ..Default::default()
    };
    let first = d
        .trigger_with("sync", json!({ "customer": 7, "v": 1 }), opts())
        .await
        .unwrap();
    assert!(!first.collapsed && !first.existing);
    let rd = first.run.debounce.clone().unwrap();
    assert_eq!((rd.key.as_str(), rd.keep), ("default/7", Keep::Last));
    clock.advance(Duration::from_secs(10));
    let second = d
        .trigger_with("sync", json!({ "customer": 7, "v": 2 }), opts())
        .await
        .unwrap();
    assert!(second.collapsed && second.existing);
    assert_eq!(second.run.id, first.run.id);
    let other = d
        .trigger_with("sync", json!({ "customer": 8, "v": 1 }), opts())
        .await
        .unwrap();
    assert!(!other.collapsed);
    clock.advance(Duration::from_secs(19));
    let third = d
        .trigger_with("sync", json!({ "customer": 7, "v": 3 }), opts())
        .await
        .unwrap();
    assert!(third.collapsed);
    // 29 s after the first trigger: nothing is due yet.
    let w = worker(&d);
    assert_eq!(w.tick().await.unwrap(), 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(w.tick().await.unwrap(), 1);
    assert_eq!(
        seen.lock().unwrap().clone(),
        [json!({ "customer": 7, "v": 3 })]
    );
    let h = d.history(first.run.id).await.unwrap();
    assert_eq!(h.run.status, RunStatus::Completed);
    assert_eq!(h.run.debounce.as_ref().unwrap().collapsed, 2);
    let collapses: Vec<_> = h
        .events
        .iter()
        .filter(|e| e.kind == EventKind::TriggerCollapsed)
        .collect();
    assert_eq!(collapses.len(), 2);
    assert!(collapses
        .iter()
        .all(|e| e.actor.as_deref() == Some("crm-webhook")));
    assert!(collapses
        .iter()
        .all(|e| e.data["input_replaced"] == json!(true)));
    // After the window (and the run): a new window.
    let next = d
        .trigger_with("sync", json!({ "customer": 7, "v": 4 }), opts())
        .await
        .unwrap();
    assert!(!next.collapsed);
    assert_ne!(next.run.id, first.run.id);
}

/// keep = first: the first trigger runs at once; later ones in the window
/// return it and their input is dropped.
#[tokio::test]
async fn keep_first_runs_the_first_input_at_once() {
    let (d, clock) = engine();
    let seen = Arc::new(Mutex::new(Vec::new()));
    d.register(
        recording("notify", seen.clone())
            .debounce(Debounce::first("{{ input.user }}", Duration::from_secs(60))),
    )
    .unwrap();
    let a = d
        .trigger("notify", json!({ "user": "u1", "n": 1 }))
        .await
        .unwrap();
    let w = worker(&d);
    assert_eq!(w.tick().await.unwrap(), 1, "due at once");
    clock.advance(Duration::from_secs(59));
    let b = d
        .trigger("notify", json!({ "user": "u1", "n": 2 }))
        .await
        .unwrap();
    assert!(b.collapsed);
    assert_eq!(b.run.id, a.run.id);
    assert_eq!(b.run.status, RunStatus::Completed);
    assert_eq!(w.tick().await.unwrap(), 0);
    assert_eq!(
        seen.lock().unwrap().clone(),
        [json!({ "user": "u1", "n": 1 })]
    );
    clock.advance(Duration::from_secs(1));
    let c = d
        .trigger("notify", json!({ "user": "u1", "n": 3 }))
        .await
        .unwrap();
    assert!(!c.collapsed, "exactly at the window's end: a new window");
}

/// A trigger's own debounce replaces the job's for that trigger; a job
/// without one can be debounced per trigger.
#[tokio::test]
async fn a_trigger_may_bring_its_own_debounce() {
    let (d, _clock) = engine();
    d.register(recording("plain", Arc::default())).unwrap();
    let opts = || TriggerOptions {
        debounce: Some(Debounce::first("{{ input.k }}", Duration::from_secs(5))),
        ..Default::default()
    };
    let a = d
        .trigger_with("plain", json!({ "k": "x" }), opts())
        .await
        .unwrap();
    let b = d
        .trigger_with("plain", json!({ "k": "x" }), opts())
        .await
        .unwrap();
    assert!(b.collapsed);
    assert_eq!(a.run.id, b.run.id);
    let c = d.trigger("plain", json!({ "k": "x" })).await.unwrap();
    assert!(!c.collapsed, "without a debounce every trigger makes a run");
}

/// Bad debounces are refused naming the field: at registration (a zero
/// window, an unknown template variable) and at trigger (an input without
/// the key's field, a bad trigger debounce). Nothing is written.
#[tokio::test]
async fn bad_debounces_are_refused_naming_the_field() {
    let (d, _clock) = engine();
    let job = |dbc: Debounce| recording("j", Arc::default()).debounce(dbc);
    let e = d
        .register(job(Debounce::last("{{ input.c }}", Duration::ZERO)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("debounce.window") && e.contains("positive"),
        "{e}"
    );
    let e = d
        .register(job(Debounce::last(
            "{{ customer }}",
            Duration::from_secs(1),
        )))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("debounce.key") && e.contains("unknown variable `customer`"),
        "{e}"
    );
    d.register(job(Debounce::last("{{ input.c }}", Duration::from_secs(1))))
        .unwrap();
    let e = d.trigger("j", json!({ "other": 1 })).await.unwrap_err();
    assert!(
        matches!(&e, docket::Error::InvalidInput(m) if m.contains("the debounce key needs `input.c`")),
        "{e}"
    );
    let e = d
        .trigger_with(
            "j",
            json!({ "c": 1 }),
            TriggerOptions {
                debounce: Some(Debounce::first("{{ input.c }}", Duration::ZERO)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, docket::Error::InvalidInput(m) if m.contains("debounce.window")),
        "{e}"
    );
    assert!(d
        .store()
        .list_runs(Default::default())
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        Debounce::parse(None, "-5s", "last"),
        Err(("window", _))
    ));
    assert!(matches!(
        Debounce::parse(None, "5s", "latest"),
        Err(("keep", _))
    ));
}
