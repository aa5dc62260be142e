//! Schedules through the engine, clock-controlled: the scheduler's ticks,
//! leadership, every overlap policy, catch-up after a downtime, backfill,
//! DST, jitter, and docket.toml's add/change/remove. SQLite in memory; the
//! same behaviours on PostgreSQL when `DOCKET_TEST_POSTGRES_URL` is set.

use docket::schedule::{schedules_from_toml, SCHEDULER_TASK};
use docket::{
    Actor, CatchUp, Docket, Error, Job, JobError, ManualClock, Overlap, RunFilter, RunStatus,
    ScheduleSpec, SchedulerConfig, Timestamp,
};
use docket_store::sqlite::SqliteStore;
use docket_store::DynStore;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// 2026-01-01T00:00:00Z.
const T0: Timestamp = Timestamp(1_767_225_600_000);
const MIN: i64 = 60_000;

fn engine_on(store: DynStore) -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let d = Docket::with_store(store, Arc::new(clock.clone()));
    d.register(Job::new("job", |_ctx, input: Value| async move {
        Ok::<_, JobError>(input)
    }))
    .unwrap();
    (d, clock)
}

fn engine() -> (Docket, ManualClock) {
    engine_on(Arc::new(SqliteStore::open_in_memory().unwrap()))
}

fn scheduler(d: &Docket, holder: &str) -> docket::Scheduler {
    d.scheduler(SchedulerConfig {
        holder: holder.into(),
        tick: Duration::from_millis(50),
        lead_ttl: Duration::from_secs(5),
    })
}

async fn runs(d: &Docket) -> Vec<docket::Run> {
    let mut r = d
        .list_runs(RunFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    r.sort_by_key(|r| r.idempotency_key.clone());
    r
}

fn keys(runs: &[docket::Run]) -> Vec<String> {
    runs.iter()
        .map(|r| r.idempotency_key.clone().unwrap_or_default())
        .collect()
}

fn key(name: &str, t: Timestamp) -> String {
    format!("schedule:{name}:{}", t.to_rfc3339())
}

async fn finish_all(d: &Docket) {
    for r in runs(d).await {
        if !r.status.is_terminal() {
            let _ = d.cancel(r.id, Actor::new("test", None)).await;
        }
    }
}

/// Each minute slot fires once, at its time, with the slot's key and the
/// rendered input; a second scheduler does not lead while the first does,
/// and takes over when the first stops renewing (a hung leader).
async fn fires_each_slot_once_and_fails_over(d: Docket, clock: ManualClock) {
    let mut spec = ScheduleSpec::cron("every-minute", "job", "* * * * *");
    spec.input = json!({ "at": "{{ slot }}", "name": "{{ schedule }}" });
    spec.overlap = Overlap::Allow;
    d.schedule(spec).await.unwrap();
    let a = scheduler(&d, "a");
    let b = scheduler(&d, "b");
    // Before the first slot: nothing.
    clock.set(T0.plus_millis(59_999));
    assert!(a.tick().await.unwrap().led);
    assert!(!b.tick().await.unwrap().led, "two leaders");
    assert!(runs(&d).await.is_empty());
    // At the slot: one run; ticking again (both) adds nothing.
    clock.set(T0.plus_millis(MIN + 10));
    a.tick().await.unwrap();
    a.tick().await.unwrap();
    b.tick().await.unwrap();
    let r = runs(&d).await;
    assert_eq!(keys(&r), [key("every-minute", T0.plus_millis(MIN))]);
    assert_eq!(
        r[0].input,
        json!({ "at": "2026-01-01T00:01:00.000Z", "name": "every-minute" })
    );
    // `a` renews just before the next slot, then hangs (stops ticking).
    clock.set(T0.plus_millis(2 * MIN - 1));
    assert!(a.tick().await.unwrap().led);
    clock.set(T0.plus_millis(2 * MIN + 4_000));
    assert!(!b.tick().await.unwrap().led, "a's lead has not expired yet");
    assert_eq!(runs(&d).await.len(), 1, "the slot waits for a leader");
    // a's lead expired at 2 min + 4,999 ms; b's next tick takes over.
    clock.set(T0.plus_millis(2 * MIN + 5_100));
    assert!(b.tick().await.unwrap().led);
    // a resumes: its old token writes nothing, and it does not lead.
    assert!(!a.tick().await.unwrap().led);
    let r = runs(&d).await;
    assert_eq!(
        keys(&r),
        [
            key("every-minute", T0.plus_millis(MIN)),
            key("every-minute", T0.plus_millis(2 * MIN))
        ]
    );
    let view = d
        .schedule_view("default", "every-minute", 5, 10)
        .await
        .unwrap();
    assert_eq!(view.next.len(), 5);
    assert_eq!(view.next[0].slot, T0.plus_millis(3 * MIN));
    assert_eq!(view.schedule.last_slot, Some(T0.plus_millis(2 * MIN)));
    let late = view
        .history
        .iter()
        .find(|h| h.kind == "fired" && h.slot_at == Some(T0.plus_millis(2 * MIN)))
        .unwrap();
    // Fired 5.1 s late: within the documented bound (lead 5 s + tick).
    assert_eq!(late.data["late_ms"], json!(5_100));
    let c = d.schedule_counters();
    assert_eq!(c.fired.get("fired"), Some(&2));
    assert!((c.max_late_seconds - 5.1).abs() < 1e-9, "{c:?}");
}

#[tokio::test]
async fn fires_each_slot_once_and_fails_over_sqlite() {
    let (d, clock) = engine();
    fires_each_slot_once_and_fails_over(d, clock).await;
}

/// The leader's lead is renewed by its ticks and resigned at shutdown, so
/// another process takes over at once.
#[tokio::test]
async fn a_stopped_scheduler_resigns() {
    let (d, _clock) = engine();
    assert!(scheduler(&d, "a").tick().await.unwrap().led);
    assert!(!scheduler(&d, "b").tick().await.unwrap().led);
    // The loop's first tick renews a's lead; stopping it resigns, so b
    // takes over at once although the (frozen) clock never expires it.
    let h = scheduler(&d, "a").start();
    h.shutdown().await;
    assert!(scheduler(&d, "b").tick().await.unwrap().led);
    assert_eq!(SCHEDULER_TASK, "schedules");
}

#[tokio::test]
async fn overlap_skip_and_allow() {
    let (d, clock) = engine();
    let mut skip = ScheduleSpec::cron("skip", "job", "* * * * *");
    skip.overlap = Overlap::Skip;
    d.schedule(skip).await.unwrap();
    let mut allow = ScheduleSpec::cron("allow", "job", "* * * * *");
    allow.overlap = Overlap::Allow;
    d.schedule(allow).await.unwrap();
    let s = scheduler(&d, "a");
    for m in 1..=3 {
        clock.set(T0.plus_millis(m * MIN));
        s.tick().await.unwrap();
    }
    // No worker ran: every run is still pending.
    let all = runs(&d).await;
    let by = |n: &str| {
        all.iter()
            .filter(|r| {
                r.idempotency_key
                    .as_deref()
                    .unwrap()
                    .contains(&format!(":{n}:"))
            })
            .count()
    };
    assert_eq!(by("allow"), 3);
    assert_eq!(by("skip"), 1);
    let h = d
        .schedule_view("default", "skip", 0, 10)
        .await
        .unwrap()
        .history;
    let skipped: Vec<_> = h.iter().filter(|h| h.kind == "skipped").collect();
    assert_eq!(skipped.len(), 2);
    assert!(skipped
        .iter()
        .all(|h| h.reason.as_deref() == Some("previous_run_unfinished")));
    // Once the run ends, the next slot fires again.
    finish_all(&d).await;
    clock.set(T0.plus_millis(4 * MIN));
    s.tick().await.unwrap();
    let all = runs(&d).await;
    assert!(all
        .iter()
        .any(|r| r.idempotency_key == Some(key("skip", T0.plus_millis(4 * MIN)))));
    assert_eq!(
        d.schedule_counters().skipped.get("previous_run_unfinished"),
        Some(&2)
    );
}

#[tokio::test]
async fn overlap_buffer_one_keeps_one_slot_waiting() {
    let (d, clock) = engine();
    let mut spec = ScheduleSpec::cron("buf", "job", "* * * * *");
    spec.overlap = Overlap::BufferOne;
    d.schedule(spec).await.unwrap();
    let s = scheduler(&d, "a");
    for m in 1..=3 {
        clock.set(T0.plus_millis(m * MIN));
        s.tick().await.unwrap();
    }
    assert_eq!(keys(&runs(&d).await), [key("buf", T0.plus_millis(MIN))]);
    let v = d.schedule_view("default", "buf", 0, 10).await.unwrap();
    assert_eq!(v.schedule.buffered_slot, Some(T0.plus_millis(2 * MIN)));
    let kinds: Vec<(String, Option<String>)> = v
        .history
        .iter()
        .rev()
        .filter(|h| h.slot_at.is_some())
        .map(|h| (h.kind.clone(), h.reason.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("fired".to_string(), None),
            (
                "buffered".to_string(),
                Some("previous_run_unfinished".to_string())
            ),
            ("skipped".to_string(), Some("buffer_full".to_string())),
        ]
    );
    // The first run ends: the buffered slot fires with ITS key.
    finish_all(&d).await;
    clock.set(T0.plus_millis(3 * MIN + 500));
    s.tick().await.unwrap();
    assert_eq!(
        keys(&runs(&d).await),
        [
            key("buf", T0.plus_millis(MIN)),
            key("buf", T0.plus_millis(2 * MIN))
        ]
    );
    let v = d.schedule_view("default", "buf", 0, 1).await.unwrap();
    assert_eq!(v.schedule.buffered_slot, None);
    assert_eq!(v.history[0].kind, "unbuffered");
}

#[tokio::test]
async fn overlap_cancel_other_cancels_then_fires() {
    let (d, clock) = engine();
    let mut spec = ScheduleSpec::cron("cancel", "job", "* * * * *");
    spec.overlap = Overlap::CancelOther;
    d.schedule(spec).await.unwrap();
    let s = scheduler(&d, "a");
    clock.set(T0.plus_millis(MIN));
    s.tick().await.unwrap();
    clock.set(T0.plus_millis(2 * MIN));
    s.tick().await.unwrap();
    let r = runs(&d).await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].status, RunStatus::Cancelled, "the first slot's run");
    assert_eq!(r[1].status, RunStatus::Pending);
    let h = d.history(r[0].id).await.unwrap();
    let cancel = h.events.iter().find(|e| e.kind == "run_cancelled").unwrap();
    assert_eq!(cancel.actor.as_deref(), Some("schedule:cancel"));
}

/// Downtime from 00:00:30 to 05:10 on an hourly... every-10-minutes
/// schedule: `last` fires the newest missed slot only, `all` every one in
/// the window, `none` none; each recorded with its slot and lateness.
#[tokio::test]
async fn catch_up_modes_after_a_downtime() {
    for (mode, expect_fired) in [
        (CatchUp::Last, 1usize),
        (CatchUp::All, 6),
        (CatchUp::None, 0),
    ] {
        let (d, clock) = engine();
        let mut spec = ScheduleSpec::cron("c", "job", "*/10 * * * *");
        spec.overlap = Overlap::Allow;
        spec.catch_up = mode;
        spec.catch_up_window = Some("1h".into());
        d.schedule(spec).await.unwrap();
        // Down from T0 to T0 + 2h05m: slots every 10 min were missed.
        clock.set(T0.plus_millis(125 * MIN));
        scheduler(&d, "a").tick().await.unwrap();
        let r = runs(&d).await;
        assert_eq!(r.len(), expect_fired, "{mode:?}");
        let h = d
            .schedule_view("default", "c", 0, 100)
            .await
            .unwrap()
            .history;
        let caught: Vec<_> = h.iter().filter(|h| h.kind == "caught_up").collect();
        assert_eq!(caught.len(), expect_fired);
        if mode == CatchUp::Last {
            assert_eq!(
                r[0].idempotency_key,
                Some(key("c", T0.plus_millis(120 * MIN)))
            );
            assert_eq!(caught[0].data["late_ms"], json!(5 * MIN));
            assert!(h.iter().any(|h| h.reason.as_deref() == Some("superseded")));
        }
        // Slots before the window (now - 1h) are summarised in one row.
        let outside: Vec<_> = h
            .iter()
            .filter(|h| h.reason.as_deref() == Some("outside_catch_up_window"))
            .collect();
        assert_eq!(outside.len(), 1, "{mode:?}");
        assert_eq!(outside[0].slot_at, Some(T0.plus_millis(10 * MIN)));
        if mode == CatchUp::None {
            assert!(h
                .iter()
                .any(|h| h.reason.as_deref() == Some("catch_up_none")));
        }
        // And nothing more at the next tick.
        scheduler(&d, "a").tick().await.unwrap();
        assert_eq!(runs(&d).await.len(), expect_fired);
    }
}

#[tokio::test]
async fn backfill_and_trigger_now_go_through_the_slot_keys() {
    let (d, clock) = engine();
    let mut spec = ScheduleSpec::cron("b", "job", "0 * * * *");
    spec.overlap = Overlap::Allow;
    spec.paused = true;
    d.schedule(spec).await.unwrap();
    clock.set(T0.plus_millis(600 * MIN));
    let by = || Actor::new("alice", Some("outage".into()));
    let out = d
        .backfill_schedule(
            "default",
            "b",
            T0.plus_millis(60 * MIN),
            T0.plus_millis(180 * MIN),
            by(),
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|t| !t.existing));
    // Backfilling an overlapping range makes no second run for a slot.
    let again = d
        .backfill_schedule(
            "default",
            "b",
            T0.plus_millis(120 * MIN),
            T0.plus_millis(240 * MIN),
            by(),
        )
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|t| t.existing).collect::<Vec<_>>(),
        [true, true, false]
    );
    assert_eq!(runs(&d).await.len(), 4);
    let t = d.trigger_schedule("default", "b", by()).await.unwrap();
    assert_eq!(
        t.run.idempotency_key,
        Some(key("b", T0.plus_millis(600 * MIN)))
    );
    let h = d
        .schedule_view("default", "b", 0, 100)
        .await
        .unwrap()
        .history;
    assert_eq!(h[0].kind, "triggered");
    assert_eq!(h[0].actor.as_deref(), Some("alice"));
    assert_eq!(h.iter().filter(|h| h.kind == "backfilled").count(), 6);
    // Too long a range, or reversed, is refused.
    assert!(matches!(
        d.backfill_schedule("default", "b", T0, T0.plus_millis(100_000 * MIN), by())
            .await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        d.backfill_schedule("default", "b", T0.plus_millis(MIN), T0, by())
            .await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        d.trigger_schedule("default", "nope", by()).await,
        Err(Error::ScheduleNotFound(_))
    ));
}

#[tokio::test]
async fn pause_and_resume_do_not_catch_up_paused_slots() {
    let (d, clock) = engine();
    let mut spec = ScheduleSpec::cron("p", "job", "* * * * *");
    spec.overlap = Overlap::Allow;
    spec.catch_up = CatchUp::All;
    d.schedule(spec).await.unwrap();
    let s = scheduler(&d, "a");
    d.set_schedule_paused("default", "p", true, Actor::new("bob", None))
        .await
        .unwrap();
    clock.set(T0.plus_millis(5 * MIN + 1));
    s.tick().await.unwrap();
    assert!(runs(&d).await.is_empty());
    d.set_schedule_paused("default", "p", false, Actor::new("bob", None))
        .await
        .unwrap();
    s.tick().await.unwrap();
    assert!(runs(&d).await.is_empty(), "paused slots were caught up");
    clock.set(T0.plus_millis(6 * MIN));
    s.tick().await.unwrap();
    assert_eq!(keys(&runs(&d).await), [key("p", T0.plus_millis(6 * MIN))]);
}

/// Spring forward in Europe/Berlin: `30 2 * * *` has no slot on 29 March;
/// fall back: 02:30 fires once on 25 October.
#[tokio::test]
async fn dst_through_the_scheduler() {
    let (d, clock) = engine();
    let start = Timestamp::parse_rfc3339("2026-03-27T12:00:00Z").unwrap();
    clock.set(start);
    let mut spec = ScheduleSpec::cron("dst", "job", "30 2 * * *");
    spec.timezone = Some("Europe/Berlin".into());
    spec.overlap = Overlap::Allow;
    d.schedule(spec).await.unwrap();
    let s = scheduler(&d, "a");
    // Tick every 15 minutes for four days.
    for i in 1..=(4 * 96) {
        clock.set(start.plus_millis(i * 15 * MIN));
        s.tick().await.unwrap();
    }
    assert_eq!(
        keys(&runs(&d).await),
        [
            "schedule:dst:2026-03-28T01:30:00.000Z",
            "schedule:dst:2026-03-30T00:30:00.000Z",
            "schedule:dst:2026-03-31T00:30:00.000Z",
        ]
    );
    // Autumn.
    let start = Timestamp::parse_rfc3339("2026-10-24T12:00:00Z").unwrap();
    for i in 1..=(2 * 96) {
        clock.set(start.plus_millis(i * 15 * MIN));
        s.tick().await.unwrap();
    }
    let autumn: Vec<String> = keys(&runs(&d).await)
        .into_iter()
        .filter(|k| k.contains("-10-"))
        .collect();
    assert_eq!(
        autumn,
        [
            // Caught up after the long gap between the two loops.
            "schedule:dst:2026-10-24T00:30:00.000Z",
            // 02:30 CEST; the repeated 02:30 CET (01:30Z) does not fire.
            "schedule:dst:2026-10-25T00:30:00.000Z",
            "schedule:dst:2026-10-26T01:30:00.000Z"
        ]
    );
}

#[tokio::test]
async fn jitter_delays_the_fire_time_deterministically() {
    let (d, clock) = engine();
    let mut spec = ScheduleSpec::cron("j", "job", "0 * * * *");
    spec.jitter_ms = 600_000;
    spec.overlap = Overlap::Allow;
    d.schedule(spec).await.unwrap();
    let slot = T0.plus_millis(60 * MIN);
    let j = docket_core::schedule::jitter_ms("j", slot, 600_000);
    assert!((0..600_000).contains(&j));
    let v = d.schedule_view("default", "j", 1, 0).await.unwrap();
    assert_eq!(v.next[0].fires_at, slot.plus_millis(j));
    let s = scheduler(&d, "a");
    clock.set(slot.plus_millis(j - 1));
    s.tick().await.unwrap();
    assert!(runs(&d).await.is_empty(), "fired before its jitter");
    clock.set(slot.plus_millis(j));
    s.tick().await.unwrap();
    assert_eq!(
        keys(&runs(&d).await),
        [key("j", slot)],
        "the key names the slot, not the fire time"
    );
}

#[tokio::test]
async fn bad_definitions_are_refused_naming_the_field() {
    let (d, _clock) = engine();
    let e = d
        .schedule(ScheduleSpec::cron("x", "job", "0 0 32 * *"))
        .await
        .unwrap_err();
    match e {
        Error::InvalidSchedule { field, message, .. } => {
            assert_eq!(field, "cron");
            assert!(message.contains("day of month"), "{message}");
            assert!(message.contains("column 5"), "{message}");
        }
        e => panic!("{e:?}"),
    }
    let mut tz = ScheduleSpec::cron("x", "job", "* * * * *");
    tz.timezone = Some("Europe/Atlantis".into());
    assert!(
        matches!(d.schedule(tz).await, Err(Error::InvalidSchedule { field, .. }) if field == "timezone")
    );
    assert!(matches!(
        d.schedule(ScheduleSpec::every("x", "job", "soon")).await,
        Err(Error::InvalidSchedule { field, .. }) if field == "every"
    ));
    assert!(matches!(
        d.schedule(ScheduleSpec::cron("x", "nope", "* * * * *"))
            .await,
        Err(Error::UnknownJob(_))
    ));
    assert!(matches!(
        d.schedule(ScheduleSpec::cron("a b", "job", "* * * * *")).await,
        Err(Error::InvalidSchedule { field, .. }) if field == "name"
    ));
    assert!(
        d.list_schedule_views(None, 1).await.unwrap().is_empty(),
        "half-written"
    );
}

/// The docket.toml round trip: add, change, remove by editing the file and
/// applying it again (what `docket serve` does at start); API schedules
/// are left alone.
#[tokio::test]
async fn docket_toml_add_change_remove() {
    let (d, clock) = engine();
    d.schedule(ScheduleSpec::cron("from-api", "job", "@daily"))
        .await
        .unwrap();
    let v1 = r#"
        [schedules.a]
        job = "job"
        cron = "*/5 * * * *"
        timezone = "Europe/Berlin"
        input = { n = 1, at = "{{ slot }}" }

        [schedules.b]
        job = "job"
        every = "30s"
        overlap = "allow"
    "#;
    let applied = d
        .apply_config_schedules(schedules_from_toml(v1).unwrap())
        .await
        .unwrap();
    assert_eq!((applied.created.len(), applied.removed.len()), (2, 0));
    clock.set(T0.plus_millis(5 * MIN));
    scheduler(&d, "a").tick().await.unwrap();
    // Restart with the same file: nothing changes.
    let again = d
        .apply_config_schedules(schedules_from_toml(v1).unwrap())
        .await
        .unwrap();
    assert_eq!(again.unchanged, ["a", "b"]);
    let cursor = d
        .schedule_view("default", "a", 0, 0)
        .await
        .unwrap()
        .schedule
        .cursor_at;
    // Change a, remove b.
    let v2 = r#"
        [schedules.a]
        job = "job"
        cron = "*/10 * * * *"
        timezone = "Europe/Berlin"
        input = { n = 2 }
        catch_up = "none"
    "#;
    let applied = d
        .apply_config_schedules(schedules_from_toml(v2).unwrap())
        .await
        .unwrap();
    assert_eq!(applied.updated, ["a"]);
    assert_eq!(applied.removed, ["b"]);
    let a = d.schedule_view("default", "a", 1, 10).await.unwrap();
    assert_eq!(a.schedule.def.cron.as_deref(), Some("*/10 * * * *"));
    assert_eq!(a.schedule.def.catch_up, CatchUp::None);
    assert_eq!(a.schedule.cursor_at, cursor, "an update keeps the position");
    assert_eq!(a.history[0].kind, "updated");
    assert_eq!(a.history[0].actor.as_deref(), Some("docket.toml"));
    assert!(matches!(
        d.schedule_view("default", "b", 0, 0).await,
        Err(Error::ScheduleNotFound(_))
    ));
    assert!(d.schedule_view("default", "from-api", 0, 0).await.is_ok());
    // b's runs stay.
    assert!(runs(&d).await.iter().any(|r| r
        .idempotency_key
        .as_deref()
        .unwrap()
        .starts_with("schedule:b:")));
    // Bad files: every problem with its place; nothing applied.
    let bad = r#"
        [schedules.x]
        job = "job"
        cron = "0 25 * * *"
        [schedules.y]
        job = "job"
        every = "1m"
        overlap = "sometimes"
        [schedules.z]
        job = "job"
        cron = "* * * * *"
        colour = "blue"
    "#;
    let problems = schedules_from_toml(bad).unwrap_err();
    let places: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        places,
        ["schedules.x.cron", "schedules.y.overlap", "schedules.z"],
        "{problems:?}"
    );
    let unknown = r#"
        [schedules.q]
        job = "missing"
        cron = "* * * * *"
    "#;
    let e = d
        .apply_config_schedules(schedules_from_toml(unknown).unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown job `missing`"), "{e}");
    assert!(
        d.schedule_view("default", "a", 0, 0).await.is_ok(),
        "a refused file removed a schedule"
    );
}

/// The same engine behaviours on PostgreSQL.
#[tokio::test]
async fn fires_each_slot_once_and_fails_over_postgres() {
    let Ok(base) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema=sched_{}", uuid::Uuid::new_v4().simple());
    let store = docket_store::open(&url).await.unwrap();
    let (d, clock) = engine_on(store);
    fires_each_slot_once_and_fails_over(d, clock).await;
}

/// A restart of the process (a new engine on the same SQLite file) across
/// slots: the slots missed while it was down are caught up as configured,
/// and no slot fires twice.
#[tokio::test]
async fn sqlite_restart_across_slots_catches_up_without_duplicates() {
    for (mode, expect) in [
        (CatchUp::Last, 3usize),
        (CatchUp::All, 10),
        (CatchUp::None, 3),
    ] {
        let dir = std::env::temp_dir().join(format!("docket-sched-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docket.db");
        let open = |at: Timestamp| {
            let store: DynStore = Arc::new(SqliteStore::open(path.to_str().unwrap()).unwrap());
            let (d, clock) = engine_on(store);
            clock.set(at);
            (d, clock)
        };
        {
            let (d, clock) = open(T0);
            let mut spec = ScheduleSpec::cron("r", "job", "* * * * *");
            spec.overlap = Overlap::Allow;
            spec.catch_up = mode;
            d.schedule(spec).await.unwrap();
            let s = scheduler(&d, "first-process");
            for m in 1..=2 {
                clock.set(T0.plus_millis(m * MIN));
                s.tick().await.unwrap();
            }
            assert_eq!(runs(&d).await.len(), 2);
        }
        // Down from 00:02 to 00:10:30: slots 3..=9 were missed (more than
        // 60 s late), slot 10 is on time.
        let (d, _clock) = open(T0.plus_millis(10 * MIN + 30_000));
        let s = scheduler(&d, "second-process");
        assert!(
            s.tick().await.unwrap().led,
            "the dead process's lead expired"
        );
        s.tick().await.unwrap();
        let r = runs(&d).await;
        let mut ks = keys(&r);
        ks.dedup();
        assert_eq!(ks.len(), r.len(), "a slot fired twice");
        assert_eq!(r.len(), expect, "{mode:?}: {ks:?}");
        let want_last = key("r", T0.plus_millis(10 * MIN));
        assert_eq!(ks.last(), Some(&want_last));
        let h = d
            .schedule_view("default", "r", 0, 100)
            .await
            .unwrap()
            .history;
        let missed_reason = match mode {
            CatchUp::Last => Some("superseded"),
            CatchUp::None => Some("catch_up_none"),
            CatchUp::All => None,
        };
        let skipped = h.iter().filter(|h| h.kind == "skipped").count();
        let caught = h.iter().filter(|h| h.kind == "caught_up").count();
        match missed_reason {
            Some(reason) => {
                assert_eq!(skipped, 7, "{mode:?}");
                assert!(h
                    .iter()
                    .filter(|h| h.kind == "skipped")
                    .all(|h| h.reason.as_deref() == Some(reason)));
            }
            None => assert_eq!(caught, 7),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The example docket.toml's schedule: valid, and a newcomer's demo job.
#[test]
fn the_example_docket_toml_has_a_valid_schedule() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docket.toml");
    let specs = schedules_from_toml(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(specs.len(), 1);
    assert_eq!(
        (specs[0].name.as_str(), specs[0].job.as_str()),
        ("heartbeat", "echo")
    );
    let def = specs[0].to_def("config").unwrap();
    let rule = docket::schedule::rule_of(&def).unwrap();
    // Fires within a minute of any start.
    let next = rule.next_after(T0.plus_millis(1)).unwrap();
    assert!(next.millis_since(T0) <= 60_000, "{next}");
}
