//! Schedules: their definitions, their cursors and their history.
//!
//! A schedule (a cron expression or an interval in a time zone, see
//! `docket_core::schedule`) turns each slot into one run. The store keeps
//! the definition, a **cursor** (every slot at or before it has been
//! handled: fired, skipped or buffered) and a **history**: one row per
//! handled slot (fired on time, caught up, backfilled, triggered by hand,
//! skipped with its reason, buffered) and one per operator change (created,
//! updated, paused, resumed, deleted, with who and the comment).
//!
//! Exactly once per slot rests on two things, both in one transaction
//! ([`ScheduleStore::schedule_tick`]):
//!
//! 1. a slot's run is created through the idempotent trigger with the key
//!    `schedule:NAME:<slot RFC 3339>` (`docket_core::schedule::slot_key`),
//!    so two schedulers firing one slot make one run;
//! 2. the cursor moves by compare-and-set, under the scheduler's fencing
//!    token (the `leaders` row must still carry it, unexpired): a stale or
//!    duplicate tick changes nothing and writes no history.

use crate::lead::FencingToken;
use crate::{NewRun, Result, Triggered};
use async_trait::async_trait;
use docket_core::schedule::{CatchUp, Overlap};
use docket_core::{RunId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a schedule is: everything an operator or `docket.toml` sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleDef {
    /// The tenant it belongs to; its runs are the tenant's.
    pub tenant: String,
    /// Unique per tenant.
    pub name: String,
    /// The job each slot runs.
    pub job: String,
    /// The input of each run: a JSON template (strings may use
    /// `{{ slot }}`, `{{ slot_ms }}` and `{{ schedule }}`).
    pub input: Value,
    /// A cron expression (5 or 6 fields, or a shortcut); or `None` with
    /// `every_ms`.
    pub cron: Option<String>,
    /// A fixed interval in milliseconds; or `None` with `cron`.
    pub every_ms: Option<i64>,
    /// The IANA time zone the cron expression is read in.
    pub timezone: String,
    /// No slot before this instant.
    pub start_at: Option<Timestamp>,
    /// No slot after this instant.
    pub end_at: Option<Timestamp>,
    /// Width of the deterministic jitter window added to each slot.
    pub jitter_ms: i64,
    /// What a slot does while the previous run is unfinished.
    pub overlap: Overlap,
    /// What happens to slots missed while no scheduler ran.
    pub catch_up: CatchUp,
    /// Missed slots older than this are skipped.
    pub catch_up_window_ms: i64,
    /// A paused schedule fires nothing; its slots are not caught up.
    pub paused: bool,
    /// Where it comes from: `config` (docket.toml) or `api`.
    pub source: String,
}

/// A stored schedule: its definition and where the scheduler stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The definition.
    #[serde(flatten)]
    pub def: ScheduleDef,
    /// Every slot at or before this instant has been handled.
    pub cursor_at: Timestamp,
    /// A slot waiting for the previous run to end (`buffer_one`).
    pub buffered_slot: Option<Timestamp>,
    /// The newest slot that made a run.
    pub last_slot: Option<Timestamp>,
    /// That run.
    pub last_run_id: Option<RunId>,
    /// When it was fired.
    pub last_fired_at: Option<Timestamp>,
    /// Created at.
    pub created_at: Timestamp,
    /// Last changed at.
    pub updated_at: Timestamp,
    /// Who changed it last.
    pub updated_by: String,
    /// Their comment.
    pub comment: Option<String>,
}

/// A change of a schedule's definition (create or update).
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulePut {
    /// The new definition.
    pub def: ScheduleDef,
    /// Who.
    pub actor: String,
    /// Why.
    pub comment: Option<String>,
    /// When; a new schedule's cursor starts here (no slot before its
    /// creation fires).
    pub now: Timestamp,
}

/// What [`ScheduleStore::put_schedule`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutOutcome {
    /// It did not exist.
    Created,
    /// Its definition changed.
    Updated,
    /// The definition was the same: nothing was written.
    Unchanged,
}

/// How a slot was handled, as its history row says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    /// Fired on time.
    Fired,
    /// Fired late, as a catch-up after a downtime.
    CaughtUp,
    /// Fired by a backfill request.
    Backfilled,
    /// Fired by hand ("trigger now").
    Triggered,
    /// A buffered slot fired after the previous run ended.
    Unbuffered,
    /// Not fired: the history row says why.
    Skipped,
    /// Waiting for the previous run to end (`buffer_one`).
    Buffered,
}

impl SlotKind {
    /// The snake_case name stored in the history.
    pub const fn as_str(self) -> &'static str {
        match self {
            SlotKind::Fired => "fired",
            SlotKind::CaughtUp => "caught_up",
            SlotKind::Backfilled => "backfilled",
            SlotKind::Triggered => "triggered",
            SlotKind::Unbuffered => "unbuffered",
            SlotKind::Skipped => "skipped",
            SlotKind::Buffered => "buffered",
        }
    }
}

/// One slot's outcome in a tick.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotOutcome {
    /// The slot.
    pub slot: Timestamp,
    /// How it was handled.
    pub kind: SlotKind,
    /// The run to trigger (its idempotency key is the slot's), for the
    /// kinds that fire.
    pub run: Option<NewRun>,
    /// Why (a skipped slot), or what (a cancelled previous run).
    pub reason: Option<String>,
}

/// One transaction of the scheduler (or of an operator's trigger/backfill)
/// for one schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleTick {
    /// The schedule's tenant.
    pub tenant: String,
    /// The schedule.
    pub name: String,
    /// The leadership the tick is made under, `(task, token)`: checked in
    /// the transaction. `None` for an operator's request.
    pub fence: Option<(String, FencingToken)>,
    /// Compare-and-set of the cursor: the tick applies only while the
    /// cursor is still this. `None`: the cursor is not read or moved.
    pub expect_cursor: Option<Timestamp>,
    /// The cursor after the tick (with `expect_cursor`).
    pub new_cursor: Option<Timestamp>,
    /// `Some(slot)` sets the buffered slot, `Some(None)` clears it.
    pub set_buffer: Option<Option<Timestamp>>,
    /// The slots handled, oldest first.
    pub slots: Vec<SlotOutcome>,
    /// Who (`scheduler`, or the operator).
    pub actor: String,
    /// Their comment.
    pub comment: Option<String>,
    /// When.
    pub now: Timestamp,
}

/// The answer to a tick.
#[derive(Clone, Debug, PartialEq)]
pub struct TickOutcome {
    /// False when nothing was written: the schedule is gone, the fence is
    /// stale, or the cursor moved (another scheduler handled the slots).
    pub applied: bool,
    /// The runs of the fired slots, in slot order (`existing` when the
    /// slot's run already existed).
    pub runs: Vec<Triggered>,
}

/// One row of a schedule's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleHistory {
    /// Grows with every row.
    pub id: i64,
    /// The tenant.
    pub tenant: String,
    /// The schedule.
    pub schedule: String,
    /// A [`SlotKind`] name, or `created`, `updated`, `paused`, `resumed`,
    /// `deleted`.
    pub kind: String,
    /// The slot, for slot rows.
    pub slot_at: Option<Timestamp>,
    /// When it was written (a fired slot: when it fired).
    pub at: Timestamp,
    /// The slot's run.
    pub run_id: Option<RunId>,
    /// Why.
    pub reason: Option<String>,
    /// Who.
    pub actor: Option<String>,
    /// Their comment.
    pub comment: Option<String>,
    /// More: the definition of a created/updated schedule, whether a slot's
    /// run already existed, how late a slot fired (`late_ms`).
    pub data: Value,
}

/// Stored schedules. Every change is one transaction with its history row.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Creates or updates a schedule (the cursor of an existing one is
    /// kept), with a `created` / `updated` history row carrying the
    /// definition; an identical definition writes nothing.
    async fn put_schedule(&self, put: SchedulePut) -> Result<(Schedule, PutOutcome)>;

    /// One schedule.
    async fn get_schedule(&self, tenant: String, name: String) -> Result<Option<Schedule>>;

    /// The schedules of a tenant (or all), by tenant and name.
    async fn list_schedules(&self, tenant: Option<String>) -> Result<Vec<Schedule>>;

    /// Pauses or resumes, with its history row. Resuming moves the cursor
    /// to `now`: slots that fell while paused are not caught up. `None`
    /// when there is no such schedule. Pausing a paused schedule (or
    /// resuming a running one) changes and writes nothing.
    async fn set_schedule_paused(
        &self,
        tenant: String,
        name: String,
        paused: bool,
        actor: String,
        comment: Option<String>,
        now: Timestamp,
    ) -> Result<Option<Schedule>>;

    /// Deletes a schedule with a `deleted` history row (the history stays;
    /// a buffered slot is dropped; runs already made are untouched).
    /// False when there was none.
    async fn delete_schedule(
        &self,
        tenant: String,
        name: String,
        actor: String,
        comment: Option<String>,
        now: Timestamp,
    ) -> Result<bool>;

    /// Applies a tick (see [`ScheduleTick`]) in one transaction: checks the
    /// fence and the cursor, triggers the fired slots' runs (idempotently),
    /// writes a history row per slot, moves the cursor, the buffer and the
    /// last fired slot. Nothing at all when the check fails.
    async fn schedule_tick(&self, tick: ScheduleTick) -> Result<TickOutcome>;

    /// A schedule's history, newest first, at most `limit` rows (also after
    /// the schedule was deleted).
    async fn schedule_history(
        &self,
        tenant: String,
        name: String,
        limit: usize,
    ) -> Result<Vec<ScheduleHistory>>;
}

/// The definition as the history's `data` of a created/updated row.
pub(crate) fn def_json(def: &ScheduleDef) -> Value {
    serde_json::to_value(def).unwrap_or(Value::Null)
}

/// Columns of `schedules`, in [`Schedule`]'s order, shared by both backends.
pub(crate) const COLS: &str =
    "tenant, name, job, input, cron, every_ms, timezone, start_at, end_at, \
    jitter_ms, overlap, catch_up, catch_up_window_ms, paused, source, cursor_at, buffered_slot, \
    last_slot, last_run_id, last_fired_at, created_at, updated_at, updated_by, comment";

/// Columns of `schedule_history`.
pub(crate) const HISTORY_COLS: &str =
    "id, tenant, schedule, kind, slot_at, at, run_id, reason, actor, comment, data";
