//! Schedules in the engine: the Rust API (`Docket::schedule` and the
//! operator calls) and the scheduler loop.
//!
//! The scheduler runs in every process that starts one, but only the
//! process that leads the task `schedules` (expiring leadership,
//! `Store::try_lead`) ticks. Each tick reads every schedule, asks the pure
//! functions of `docket_core::schedule` what its due slots do, and writes
//! the answer with ONE `Store::schedule_tick` per schedule, fenced by the
//! leader's token and by compare-and-set on the schedule's cursor. A slot's
//! run is created through the idempotent trigger with the key
//! `schedule:NAME:<slot RFC 3339>`. So a slot makes one run whatever
//! happens: two leaders (one stale), a tick retried after a lost answer, a
//! restart between slots.
//!
//! **Bounded fire delay.** With a live leader a slot fires within one tick
//! interval (default 500 ms) plus one store round trip of its fire time
//! (slot + jitter). When the leader dies or hangs (SIGSTOP), its lead
//! expires after `lead_ttl` (default 5 s) and another process takes over
//! at its next tick: a slot fires within `lead_ttl + tick` (≈ 5.5 s) of its
//! fire time. Slots delayed that way are still on time
//! (`docket_core::schedule::ON_TIME_GRACE_MS`, 60 s) and fire normally.

use crate::{Actor, Docket, Error, Result, Triggered};
pub use docket_core::schedule::ScheduleError;
use docket_core::schedule::{
    self as rule, CatchUp, Overlap, OverlapAction, Rule, SlotPlan, DEFAULT_CATCH_UP_WINDOW_MS,
    MAX_SLOTS_PER_TICK,
};
use docket_core::{RunStatus, Timestamp};
use docket_store::{
    FencingToken, NewRun, PutOutcome, Schedule, ScheduleDef, ScheduleHistory, SchedulePut,
    ScheduleTick, SlotKind, SlotOutcome, DEFAULT_TENANT,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The leadership task the scheduler runs under.
pub const SCHEDULER_TASK: &str = "schedules";

/// The most slots one backfill request fires.
pub const MAX_BACKFILL_SLOTS: usize = 1_000;

/// A schedule as the Rust API, `docket.toml` and the HTTP API give it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleSpec {
    /// Unique per tenant: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The tenant (default `default`).
    pub tenant: Option<String>,
    /// The job each slot runs (must be registered).
    pub job: String,
    /// The input: a JSON template whose strings may say `{{ slot }}` (the
    /// slot, RFC 3339 UTC), `{{ slot_local }}` (in the zone),
    /// `{{ slot_ms }}` and `{{ schedule }}`.
    pub input: Value,
    /// A cron expression: 5 fields, 6 with seconds first, or `@hourly`,
    /// `@daily`, … Exactly one of `cron` and `every`.
    pub cron: Option<String>,
    /// A fixed interval, e.g. `"30s"`, `"5m"`, `"1h 30m"`.
    pub every: Option<String>,
    /// IANA time zone of the cron expression (default `UTC`).
    pub timezone: Option<String>,
    /// No slot before.
    pub start: Option<Timestamp>,
    /// No slot after.
    pub end: Option<Timestamp>,
    /// Deterministic jitter window added to each slot.
    pub jitter_ms: u64,
    /// Overlap policy (default `skip`).
    pub overlap: Overlap,
    /// Catch-up policy (default `last`).
    pub catch_up: CatchUp,
    /// Catch-up window, a duration (default 24 h).
    pub catch_up_window: Option<String>,
    /// Paused (default false: enabled).
    pub paused: bool,
}

impl ScheduleSpec {
    /// A schedule of `job` on a cron expression, in UTC, with input `{}`.
    pub fn cron(name: impl Into<String>, job: impl Into<String>, cron: impl Into<String>) -> Self {
        ScheduleSpec {
            cron: Some(cron.into()),
            ..Self::base(name.into(), job.into())
        }
    }

    /// A schedule of `job` every `every` (a duration like `"30s"`).
    pub fn every(
        name: impl Into<String>,
        job: impl Into<String>,
        every: impl Into<String>,
    ) -> Self {
        ScheduleSpec {
            every: Some(every.into()),
            ..Self::base(name.into(), job.into())
        }
    }

    fn base(name: String, job: String) -> Self {
        ScheduleSpec {
            name,
            tenant: None,
            job,
            input: Value::Object(Default::default()),
            cron: None,
            every: None,
            timezone: None,
            start: None,
            end: None,
            jitter_ms: 0,
            overlap: Overlap::default(),
            catch_up: CatchUp::default(),
            catch_up_window: None,
            paused: false,
        }
    }

    /// Checks every field and builds the stored definition (`source`:
    /// `config` or `api`). The error names the field.
    pub fn to_def(&self, source: &str) -> Result<ScheduleDef> {
        let bad = |e: rule::ScheduleError| Error::InvalidSchedule {
            schedule: self.name.clone(),
            field: e.field.to_string(),
            message: e.message,
        };
        rule::check_name(&self.name).map_err(bad)?;
        let every_ms = self
            .every
            .as_deref()
            .map(|e| rule::parse_duration_ms("every", e))
            .transpose()
            .map_err(bad)?;
        const YEAR_MS: i64 = 366 * 24 * 3_600_000;
        let too_long = |field: &'static str, ms: Option<i64>| match ms {
            Some(ms) if ms > YEAR_MS => Err(bad(rule::ScheduleError {
                field,
                message: "must be at most 366 days".into(),
            })),
            _ => Ok(()),
        };
        too_long("every", every_ms)?;
        let timezone = self.timezone.clone().unwrap_or_else(|| "UTC".into());
        Rule::new(
            self.cron.as_deref(),
            every_ms,
            &timezone,
            self.start,
            self.end,
        )
        .map_err(bad)?;
        let window = self
            .catch_up_window
            .as_deref()
            .map(|w| rule::parse_duration_ms("catch_up_window", w))
            .transpose()
            .map_err(bad)?
            .unwrap_or(DEFAULT_CATCH_UP_WINDOW_MS);
        too_long("catch_up_window", Some(window))?;
        let jitter_ms = i64::try_from(self.jitter_ms)
            .ok()
            .filter(|j| *j <= 24 * 3_600_000)
            .ok_or_else(|| {
                bad(rule::ScheduleError {
                    field: "jitter_ms",
                    message: "must be at most one day (86400000)".into(),
                })
            })?;
        Ok(ScheduleDef {
            tenant: self
                .tenant
                .clone()
                .unwrap_or_else(|| DEFAULT_TENANT.to_string()),
            name: self.name.clone(),
            job: self.job.clone(),
            input: self.input.clone(),
            cron: self.cron.as_ref().map(|c| c.trim().to_string()),
            every_ms,
            timezone,
            start_at: self.start,
            end_at: self.end,
            jitter_ms,
            overlap: self.overlap,
            catch_up: self.catch_up,
            catch_up_window_ms: window,
            paused: self.paused,
            source: source.to_string(),
        })
    }
}

/// The rule of a stored schedule.
pub fn rule_of(def: &ScheduleDef) -> std::result::Result<Rule, rule::ScheduleError> {
    Rule::new(
        def.cron.as_deref(),
        def.every_ms,
        &def.timezone,
        def.start_at,
        def.end_at,
    )
}

/// A fire time, in the zone and in UTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FireTime {
    /// The slot.
    pub slot: Timestamp,
    /// When it fires (slot + jitter).
    pub fires_at: Timestamp,
    /// The slot in the schedule's zone, RFC 3339 with offset and zone name.
    pub local: String,
}

/// A schedule with what an operator wants to see.
#[derive(Clone, Debug, Serialize)]
pub struct ScheduleView {
    /// The schedule.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// The next fire times (empty while paused, or past the end).
    pub next: Vec<FireTime>,
    /// The status of the last slot's run.
    pub last_run_status: Option<RunStatus>,
    /// The newest history rows (slots and changes), newest first.
    pub history: Vec<ScheduleHistory>,
}

/// Counters of the scheduler in this process (`/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScheduleCounters {
    /// Slots that made a run, by kind (`fired`, `caught_up`, `backfilled`,
    /// `triggered`, `unbuffered`).
    pub fired: BTreeMap<String, u64>,
    /// Slots skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// How late the last fired slot was, seconds behind its fire time.
    pub last_late_seconds: f64,
    /// The largest such lateness seen.
    pub max_late_seconds: f64,
    /// The sum of lateness of every fired slot, and their number (a
    /// Prometheus summary).
    pub late_seconds_sum: f64,
    /// Slots counted in `late_seconds_sum`.
    pub late_count: u64,
}

fn render(v: &Value, name: &str, slot: Timestamp, local: &str) -> Value {
    match v {
        Value::String(s) if s.trim() == "{{ slot_ms }}" => Value::from(slot.0),
        Value::String(s) => Value::String(
            s.replace("{{ slot }}", &slot.to_rfc3339())
                .replace("{{ slot_local }}", local)
                .replace("{{ slot_ms }}", &slot.0.to_string())
                .replace("{{ schedule }}", name),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|x| render(x, name, slot, local)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), render(x, name, slot, local)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The run of a slot: rendered input, the slot's key, the schedule as actor,
/// and its job's concurrency key. A slot whose input lacks a field the key
/// needs gets the job-wide key (the job's name), so it is still limited.
fn slot_run(d: &Docket, def: &ScheduleDef, r: &Rule, slot: Timestamp) -> NewRun {
    let mut run = NewRun::new(
        def.job.clone(),
        render(&def.input, &def.name, slot, &r.in_zone(slot)),
    );
    run.tenant = def.tenant.clone();
    run.idempotency_key = Some(rule::slot_key(&def.name, slot));
    run.actor = Some(format!("schedule:{}", def.name));
    run.concurrency = match d.concurrency_of(&run.job, &run.tenant, &run.input) {
        Ok(k) => k,
        Err(_) => d.job(&run.job).and_then(|j| {
            j.concurrency.map(|limit| docket_store::ConcurrencyKey {
                key: run.job.clone(),
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
            })
        }),
    };
    run
}

fn unfinished(s: Option<RunStatus>) -> bool {
    s.is_some_and(|s| !s.is_terminal())
}

impl Docket {
    /// Creates or updates a schedule in the default tenant (or the spec's),
    /// as `library`. See [`Docket::put_schedule`].
    pub async fn schedule(&self, spec: ScheduleSpec) -> Result<Schedule> {
        let (s, _) = self
            .put_schedule(spec, "api", Actor::new("library", None))
            .await?;
        Ok(s)
    }

    /// Creates or updates a schedule, audited. Refused before anything is
    /// written when a field is invalid ([`Error::InvalidSchedule`] naming
    /// it) or the job is not registered ([`Error::UnknownJob`]).
    pub async fn put_schedule(
        &self,
        spec: ScheduleSpec,
        source: &str,
        by: Actor,
    ) -> Result<(Schedule, PutOutcome)> {
        let def = spec.to_def(source)?;
        if self.job(&def.job).is_none() {
            return Err(Error::UnknownJob(def.job));
        }
        Ok(self
            .store()
            .put_schedule(SchedulePut {
                def,
                actor: by.name,
                comment: by.comment,
                now: self.clock().now(),
            })
            .await?)
    }

    async fn must_get(&self, tenant: &str, name: &str) -> Result<Schedule> {
        self.store()
            .get_schedule(tenant.into(), name.into())
            .await?
            .ok_or_else(|| Error::ScheduleNotFound(name.to_string()))
    }

    /// A schedule with its next `n` fire times, the last run's status and
    /// its newest `history` rows.
    pub async fn schedule_view(
        &self,
        tenant: &str,
        name: &str,
        n: usize,
        history: usize,
    ) -> Result<ScheduleView> {
        let s = self.must_get(tenant, name).await?;
        self.view_of(s, n, history).await
    }

    /// Every schedule of a tenant (or all) with its next `n` fire times.
    pub async fn list_schedule_views(
        &self,
        tenant: Option<&str>,
        n: usize,
    ) -> Result<Vec<ScheduleView>> {
        let all = self
            .store()
            .list_schedules(tenant.map(str::to_string))
            .await?;
        let mut out = Vec::with_capacity(all.len());
        for s in all {
            out.push(self.view_of(s, n, 0).await?);
        }
        Ok(out)
    }

    async fn view_of(&self, s: Schedule, n: usize, history: usize) -> Result<ScheduleView> {
        let next = match (s.def.paused, rule_of(&s.def)) {
            (false, Ok(r)) => {
                let from = s.cursor_at.max(self.clock().now());
                r.next_n(from, n)
                    .into_iter()
                    .map(|slot| FireTime {
                        slot,
                        fires_at: rule::fire_at(&s.def.name, slot, s.def.jitter_ms as u64),
                        local: r.in_zone(slot),
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let last_run_status = match s.last_run_id {
            Some(id) => self.store().get_run(id).await?.map(|r| r.status),
            None => None,
        };
        let history = if history > 0 {
            self.store()
                .schedule_history(s.def.tenant.clone(), s.def.name.clone(), history)
                .await?
        } else {
            Vec::new()
        };
        Ok(ScheduleView {
            schedule: s,
            next,
            last_run_status,
            history,
        })
    }

    /// Pauses (or resumes) a schedule, audited. Resuming does not catch up
    /// the slots that fell while it was paused.
    pub async fn set_schedule_paused(
        &self,
        tenant: &str,
        name: &str,
        paused: bool,
        by: Actor,
    ) -> Result<Schedule> {
        self.store()
            .set_schedule_paused(
                tenant.into(),
                name.into(),
                paused,
                by.name,
                by.comment,
                self.clock().now(),
            )
            .await?
            .ok_or_else(|| Error::ScheduleNotFound(name.to_string()))
    }

    /// Deletes a schedule, audited. Its runs stay; a buffered slot is
    /// dropped; its history stays readable.
    pub async fn delete_schedule(&self, tenant: &str, name: &str, by: Actor) -> Result<()> {
        let gone = self
            .store()
            .delete_schedule(
                tenant.into(),
                name.into(),
                by.name,
                by.comment,
                self.clock().now(),
            )
            .await?;
        if gone {
            Ok(())
        } else {
            Err(Error::ScheduleNotFound(name.to_string()))
        }
    }

    /// Fires the schedule now, as a slot at the current instant (key
    /// `schedule:NAME:<now>`), audited, through the same path as the
    /// scheduler. The schedule's cursor does not move.
    pub async fn trigger_schedule(&self, tenant: &str, name: &str, by: Actor) -> Result<Triggered> {
        let now = self.clock().now();
        let mut out = self
            .fire_by_hand(tenant, name, vec![now], SlotKind::Triggered, by)
            .await?;
        out.pop()
            .ok_or_else(|| Error::ScheduleNotFound(name.to_string()))
    }

    /// Fires every slot of the schedule in `from..=to` (at most
    /// [`MAX_BACKFILL_SLOTS`]), audited; a slot whose run exists (same key)
    /// returns that run. The cursor does not move.
    pub async fn backfill_schedule(
        &self,
        tenant: &str,
        name: &str,
        from: Timestamp,
        to: Timestamp,
        by: Actor,
    ) -> Result<Vec<Triggered>> {
        if to < from {
            return Err(Error::InvalidInput(format!(
                "backfill of `{name}`: `to` ({to}) is before `from` ({from})"
            )));
        }
        let s = self.must_get(tenant, name).await?;
        let r = rule_of(&s.def).map_err(|e| Error::InvalidSchedule {
            schedule: name.to_string(),
            field: e.field.into(),
            message: e.message,
        })?;
        let slots = r.slots(Timestamp(from.0 - 1), to, MAX_BACKFILL_SLOTS + 1);
        if slots.len() > MAX_BACKFILL_SLOTS {
            return Err(Error::InvalidInput(format!(
                "backfill of `{name}` from {from} to {to} has more than {MAX_BACKFILL_SLOTS} slots; ask for a shorter range"
            )));
        }
        self.fire_by_hand(tenant, name, slots, SlotKind::Backfilled, by)
            .await
    }

    async fn fire_by_hand(
        &self,
        tenant: &str,
        name: &str,
        slots: Vec<Timestamp>,
        kind: SlotKind,
        by: Actor,
    ) -> Result<Vec<Triggered>> {
        let s = self.must_get(tenant, name).await?;
        let r = rule_of(&s.def).map_err(|e| Error::InvalidSchedule {
            schedule: name.to_string(),
            field: e.field.into(),
            message: e.message,
        })?;
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .store()
            .schedule_tick(ScheduleTick {
                tenant: tenant.into(),
                name: name.into(),
                fence: None,
                expect_cursor: None,
                new_cursor: None,
                set_buffer: None,
                slots: slots
                    .iter()
                    .map(|&slot| SlotOutcome {
                        slot,
                        kind,
                        run: Some(slot_run(self, &s.def, &r, slot)),
                        reason: None,
                    })
                    .collect(),
                actor: by.name,
                comment: by.comment,
                now: self.clock().now(),
            })
            .await?;
        if !out.applied {
            return Err(Error::ScheduleNotFound(name.to_string()));
        }
        self.count_fired(kind, &slots, self.clock().now(), &s.def);
        self.wake_workers();
        Ok(out.runs)
    }

    /// This process's scheduler counters.
    pub fn schedule_counters(&self) -> ScheduleCounters {
        self.inner
            .schedule_counters
            .lock()
            .expect("counters")
            .clone()
    }

    fn count_fired(&self, kind: SlotKind, slots: &[Timestamp], now: Timestamp, def: &ScheduleDef) {
        let mut c = self.inner.schedule_counters.lock().expect("counters");
        for slot in slots {
            *c.fired.entry(kind.as_str().to_string()).or_default() += 1;
            let late = now
                .millis_since(rule::fire_at(&def.name, *slot, def.jitter_ms as u64))
                .max(0) as f64
                / 1000.0;
            c.last_late_seconds = late;
            c.max_late_seconds = c.max_late_seconds.max(late);
            c.late_seconds_sum += late;
            c.late_count += 1;
        }
    }

    fn count_skipped(&self, reason: &str) {
        *self
            .inner
            .schedule_counters
            .lock()
            .expect("counters")
            .skipped
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// A scheduler for this engine. Start it in as many processes as you
    /// like: one leads at a time.
    pub fn scheduler(&self, config: SchedulerConfig) -> Scheduler {
        Scheduler {
            docket: self.clone(),
            config,
            token: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// One schedule's tick under `token` at `now`: what the module says.
    /// Answers how many store writes were applied (0 or 1).
    async fn tick_schedule(
        &self,
        s: &Schedule,
        token: FencingToken,
        now: Timestamp,
    ) -> Result<bool> {
        let def = &s.def;
        let r = match rule_of(def) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(schedule = %def.name, tenant = %def.tenant, error = %e, "a stored schedule is invalid; skipped");
                return Ok(false);
            }
        };
        let jitter = def.jitter_ms as u64;
        let mut outcomes = Vec::new();
        let mut new_cursor = s.cursor_at;
        // Slots older than the catch-up window are skipped without being
        // listed one by one (a per-second schedule after a week away): one
        // history row names the first of them.
        let mut from = s.cursor_at;
        let window_start = Timestamp(
            now.0
                .saturating_sub(def.catch_up_window_ms)
                .saturating_sub(1),
        );
        if from < window_start {
            if let Some(first) = r.next_after(from).filter(|f| *f <= window_start) {
                outcomes.push(SlotOutcome {
                    slot: first,
                    kind: SlotKind::Skipped,
                    run: None,
                    reason: Some("outside_catch_up_window".into()),
                });
            }
            from = window_start;
            new_cursor = window_start;
        }
        let due: Vec<Timestamp> = r
            .slots(from, now, MAX_SLOTS_PER_TICK)
            .into_iter()
            .take_while(|slot| rule::fire_at(&def.name, *slot, jitter) <= now)
            .collect();
        let prev = match s.last_run_id {
            Some(id) => self.store().get_run(id).await?.map(|r| r.status),
            None => None,
        };
        let mut prev_unfinished = unfinished(prev);
        let mut buffered = s.buffered_slot;
        let mut set_buffer = None;
        let mut cancel = None;
        // A buffered slot fires once the previous run has ended.
        if let Some(b) = buffered.filter(|_| !prev_unfinished) {
            outcomes.push(SlotOutcome {
                slot: b,
                kind: SlotKind::Unbuffered,
                run: Some(slot_run(self, def, &r, b)),
                reason: None,
            });
            buffered = None;
            set_buffer = Some(None);
            prev_unfinished = true;
        }
        let mut fired_in_tick = set_buffer.is_some();
        for plan in rule::plan_due(
            &def.name,
            &due,
            jitter,
            def.catch_up,
            def.catch_up_window_ms,
            now,
        ) {
            let slot = plan.slot();
            let kind = match plan {
                SlotPlan::Skip { reason, .. } => {
                    outcomes.push(SlotOutcome {
                        slot,
                        kind: SlotKind::Skipped,
                        run: None,
                        reason: Some(reason),
                    });
                    new_cursor = slot;
                    continue;
                }
                SlotPlan::OnTime { .. } => SlotKind::Fired,
                SlotPlan::CatchUp { .. } => SlotKind::CaughtUp,
            };
            match rule::overlap(def.overlap, prev_unfinished, buffered.is_some()) {
                OverlapAction::Fire => {}
                OverlapAction::CancelThenFire => {
                    if fired_in_tick {
                        // The run to cancel is this tick's: the next tick
                        // (at once) cancels it and fires this slot.
                        break;
                    }
                    cancel = s.last_run_id;
                }
                OverlapAction::Buffer => {
                    outcomes.push(SlotOutcome {
                        slot,
                        kind: SlotKind::Buffered,
                        run: None,
                        reason: Some("previous_run_unfinished".into()),
                    });
                    buffered = Some(slot);
                    set_buffer = Some(Some(slot));
                    new_cursor = slot;
                    continue;
                }
                OverlapAction::Skip { reason } => {
                    outcomes.push(SlotOutcome {
                        slot,
                        kind: SlotKind::Skipped,
                        run: None,
                        reason: Some(reason),
                    });
                    new_cursor = slot;
                    continue;
                }
            }
            outcomes.push(SlotOutcome {
                slot,
                kind,
                run: Some(slot_run(self, def, &r, slot)),
                reason: None,
            });
            prev_unfinished = true;
            fired_in_tick = true;
            new_cursor = slot;
        }
        if outcomes.is_empty() {
            return Ok(false);
        }
        if let Some(id) = cancel {
            let comment = format!(
                "overlap cancel_other: schedule `{}` fires its next slot",
                def.name
            );
            match self
                .cancel(
                    id,
                    Actor::new(format!("schedule:{}", def.name), Some(comment)),
                )
                .await
            {
                Ok(_) | Err(Error::WrongState { .. }) | Err(Error::RunNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let counted: Vec<(SlotKind, Timestamp, Option<String>)> = outcomes
            .iter()
            .map(|o| (o.kind, o.slot, o.reason.clone()))
            .collect();
        let out = self
            .store()
            .schedule_tick(ScheduleTick {
                tenant: def.tenant.clone(),
                name: def.name.clone(),
                fence: Some((SCHEDULER_TASK.to_string(), token)),
                expect_cursor: Some(s.cursor_at),
                new_cursor: Some(new_cursor),
                set_buffer,
                slots: outcomes,
                actor: "scheduler".into(),
                comment: None,
                now,
            })
            .await?;
        if !out.applied {
            return Ok(false);
        }
        for (kind, slot, reason) in counted {
            match kind {
                SlotKind::Skipped => self.count_skipped(reason.as_deref().unwrap_or("skipped")),
                SlotKind::Buffered => {}
                k => self.count_fired(k, &[slot], now, def),
            }
        }
        if !out.runs.is_empty() {
            self.wake_workers();
            for t in &out.runs {
                let _ = self.inner.changes.send(t.run.id);
            }
        }
        Ok(true)
    }
}

/// How a scheduler runs.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Unique per process: the leadership holder.
    pub holder: String,
    /// How often the leader looks at the schedules (and others ask to lead).
    pub tick: Duration,
    /// How long a lead lasts without renewal: a hung leader is replaced
    /// after at most this long.
    pub lead_ttl: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            holder: format!(
                "scheduler-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            tick: Duration::from_millis(500),
            lead_ttl: Duration::from_secs(5),
        }
    }
}

/// What one tick did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Whether this process led the tick.
    pub led: bool,
    /// Schedules whose tick was written.
    pub written: usize,
}

/// The scheduler: [`Scheduler::tick`] once (tests, with a manual clock), or
/// [`Scheduler::start`] a loop.
#[derive(Clone)]
pub struct Scheduler {
    docket: Docket,
    config: SchedulerConfig,
    token: Arc<std::sync::Mutex<Option<FencingToken>>>,
}

/// A running scheduler loop.
pub struct SchedulerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Scheduler {
    /// Asks to lead (or renews), and when it leads, ticks every schedule
    /// that is not paused at the clock's now.
    pub async fn tick(&self) -> Result<TickReport> {
        let d = &self.docket;
        let now = d.clock().now();
        let ttl = i64::try_from(self.config.lead_ttl.as_millis()).unwrap_or(i64::MAX);
        let token = d
            .store()
            .try_lead(SCHEDULER_TASK.into(), self.config.holder.clone(), now, ttl)
            .await?;
        *self.token.lock().expect("token") = token;
        let Some(token) = token else {
            return Ok(TickReport::default());
        };
        let mut report = TickReport {
            led: true,
            written: 0,
        };
        for s in d.store().list_schedules(None).await? {
            if s.def.paused {
                continue;
            }
            // One schedule's failure must not hold up the others.
            match d.tick_schedule(&s, token, now).await {
                Ok(true) => report.written += 1,
                Ok(false) => {}
                Err(e) => {
                    if let Error::Store(se) = &e {
                        d.note_store_error(se);
                    }
                    tracing::warn!(schedule = %s.def.name, tenant = %s.def.tenant, error = %e, "schedule tick failed; next tick tries again");
                }
            }
        }
        Ok(report)
    }

    /// Runs [`Scheduler::tick`] every `tick` until stopped; resigns the
    /// lead at stop so another process takes over at once.
    pub fn start(self) -> SchedulerHandle {
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = self.tick().await {
                    tracing::warn!(error = %e, "scheduler tick failed; trying again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.config.tick) => {}
                    _ = stop_rx.changed() => break,
                }
            }
            let token = *self.token.lock().expect("token");
            if let Some(token) = token {
                let now = self.docket.clock().now();
                let _ = self
                    .docket
                    .store()
                    .resign(SCHEDULER_TASK.into(), token, now)
                    .await;
            }
        });
        SchedulerHandle { stop, task }
    }
}

impl SchedulerHandle {
    /// Stops the loop (after its current tick) and resigns the lead.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A `[schedules.NAME]` table of `docket.toml`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    job: String,
    cron: Option<String>,
    every: Option<String>,
    timezone: Option<String>,
    input: Option<toml::Value>,
    overlap: Option<String>,
    catch_up: Option<String>,
    catch_up_window: Option<String>,
    jitter_ms: Option<u64>,
    enabled: Option<bool>,
    start: Option<String>,
    end: Option<String>,
    tenant: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct RawFile {
    #[serde(default)]
    schedules: BTreeMap<String, toml::Value>,
}

/// Reads the `[schedules.NAME]` tables of a `docket.toml` (other sections
/// are ignored). Every problem is reported, with its place
/// (`schedules.nightly.cron`), all at once; the job names are checked when
/// the schedules are applied ([`Docket::apply_config_schedules`]).
pub fn schedules_from_toml(
    text: &str,
) -> std::result::Result<Vec<ScheduleSpec>, Vec<(String, String)>> {
    let raw: RawFile =
        toml::from_str(text).map_err(|e| vec![("toml".to_string(), e.to_string())])?;
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (name, v) in raw.schedules {
        let place = format!("schedules.{name}");
        let r: RawSchedule = match v.try_into() {
            Ok(r) => r,
            Err(e) => {
                problems.push((place, e.message().trim().to_string()));
                continue;
            }
        };
        let mut bad = |field: &str, m: String| problems.push((format!("{place}.{field}"), m));
        let overlap = match r.overlap.as_deref().map(str::parse::<Overlap>).transpose() {
            Ok(o) => o.unwrap_or_default(),
            Err(e) => {
                bad("overlap", e.message);
                continue;
            }
        };
        let catch_up = match r.catch_up.as_deref().map(str::parse::<CatchUp>).transpose() {
            Ok(o) => o.unwrap_or_default(),
            Err(e) => {
                bad("catch_up", e.message);
                continue;
            }
        };
        let mut time = |field: &str, s: &Option<String>| match s {
            None => Ok(None),
            Some(s) => Timestamp::parse_rfc3339(s).map(Some).ok_or_else(|| {
                bad(
                    field,
                    format!("`{s}` is not an RFC 3339 time such as 2026-01-31T12:00:00Z"),
                )
            }),
        };
        let (Ok(start), Ok(end)) = (time("start", &r.start), time("end", &r.end)) else {
            continue;
        };
        let input = match r.input {
            Some(v) => serde_json::to_value(v).unwrap_or(Value::Null),
            None => Value::Object(Default::default()),
        };
        let spec = ScheduleSpec {
            name: name.clone(),
            tenant: r.tenant,
            job: r.job,
            input,
            cron: r.cron,
            every: r.every,
            timezone: r.timezone,
            start,
            end,
            jitter_ms: r.jitter_ms.unwrap_or(0),
            overlap,
            catch_up,
            catch_up_window: r.catch_up_window,
            paused: !r.enabled.unwrap_or(true),
        };
        match spec.to_def("config") {
            Ok(_) => out.push(spec),
            Err(Error::InvalidSchedule { field, message, .. }) => {
                problems.push((format!("{place}.{field}"), message))
            }
            Err(e) => problems.push((place, e.to_string())),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// What applying `docket.toml`'s schedules did, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedSchedules {
    /// New schedules.
    pub created: Vec<String>,
    /// Changed definitions (their position is kept).
    pub updated: Vec<String>,
    /// The same as stored.
    pub unchanged: Vec<String>,
    /// Schedules from an earlier `docket.toml` that are gone from it.
    pub removed: Vec<String>,
}

impl Docket {
    /// Applies the schedules of a `docket.toml` (see
    /// [`schedules_from_toml`]): each is created or updated (audited as
    /// `docket.toml`), and every schedule that came from the file
    /// (`source = config`) but is no longer in it is deleted — its runs
    /// stay, a buffered slot is dropped, no further slot fires. Schedules
    /// created through the API are left alone. All are checked (fields and
    /// job names) before anything is written.
    pub async fn apply_config_schedules(
        &self,
        specs: Vec<ScheduleSpec>,
    ) -> Result<AppliedSchedules> {
        for s in &specs {
            let def = s.to_def("config")?;
            if self.job(&def.job).is_none() {
                return Err(Error::InvalidSchedule {
                    schedule: def.name,
                    field: "job".into(),
                    message: format!("unknown job `{}`: no such job is registered", def.job),
                });
            }
        }
        let by = || Actor::new("docket.toml", None);
        let mut report = AppliedSchedules::default();
        let mut keep = std::collections::BTreeSet::new();
        for s in specs {
            let (sched, outcome) = self.put_schedule(s, "config", by()).await?;
            let name = sched.def.name.clone();
            keep.insert((sched.def.tenant.clone(), name.clone()));
            match outcome {
                PutOutcome::Created => report.created.push(name),
                PutOutcome::Updated => report.updated.push(name),
                PutOutcome::Unchanged => report.unchanged.push(name),
            }
        }
        for s in self.store().list_schedules(None).await? {
            let key = (s.def.tenant.clone(), s.def.name.clone());
            if s.def.source == "config" && !keep.contains(&key) {
                let gone = Actor::new("docket.toml", Some("removed from docket.toml".into()));
                match self.delete_schedule(&key.0, &key.1, gone).await {
                    Ok(()) | Err(Error::ScheduleNotFound(_)) => report.removed.push(key.1),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_templates_render_the_slot_and_name() {
        let v = serde_json::json!({"at": "{{ slot }}", "ms": "{{ slot_ms }}", "n": ["{{ schedule }}-x", 1]});
        let out = render(&v, "nightly", Timestamp(1_000), "local");
        assert_eq!(
            out,
            serde_json::json!({"at": "1970-01-01T00:00:01.000Z", "ms": 1000, "n": ["nightly-x", 1]})
        );
    }
}
