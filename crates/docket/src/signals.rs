//! Durable signals (docs/DURABLE.md, "Signals"): a handler waits for a
//! named signal ([`Ctx::wait_for_signal`]) without holding a worker slot or
//! a lease; a signal is sent to one run ([`Docket::signal`]) or, by
//! correlation key, to every run waiting for it ([`Docket::signal_by_key`]).

use crate::ctx::store_err;
use crate::error::Control;
use crate::{Ctx, Docket, Error, JobError, Result};
use docket_core::{RunId, Timestamp};
use docket_store::signals::{check_key, check_name, check_payload, MAX_SIGNAL_BYTES};
use docket_store::{SendKeyed, SendSignal, StoreError, WaitOutcome, WaitSignal};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

pub use docket_store::{Sent, SignalRecord, SignalWaitRecord};

/// A signal as a wait receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Its id (the sender's `signal_id`, or one Docket made).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The correlation key it was sent by, if it was.
    pub key: Option<String>,
    /// Its payload.
    pub data: Value,
    /// Who sent it (a token's name, `api`, `rust`, …).
    pub sent_by: String,
    /// When Docket received it.
    pub received_at: Timestamp,
}

/// What a wait for a signal returned: the handler decides what a timeout
/// means (fail, go on without, remind someone and wait again).
#[derive(Clone, Debug, PartialEq)]
pub enum Signalled {
    /// A signal arrived in time.
    Received(Signal),
    /// The timeout passed first (at `until`).
    TimedOut {
        /// The wait's deadline.
        until: Timestamp,
    },
}

impl Signalled {
    /// The signal, or `None` on a timeout.
    pub fn into_signal(self) -> Option<Signal> {
        match self {
            Signalled::Received(s) => Some(s),
            Signalled::TimedOut { .. } => None,
        }
    }

    /// True when the wait timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Signalled::TimedOut { .. })
    }
}

/// How a signal is sent ([`Docket::signal`], [`Docket::signal_by_key`]).
#[derive(Clone, Debug, Default)]
pub struct SignalOptions {
    /// An id for idempotency: the same id for the same run twice is one
    /// signal (the second send answers the first). Docket makes one when
    /// absent (so every send is a new signal).
    pub signal_id: Option<String>,
    /// Who sends it, for the timeline (default `rust`; the server passes
    /// the token's name, or `api`).
    pub sent_by: Option<String>,
    /// Only a run of this tenant (another tenant's run is "not found").
    pub tenant: Option<String>,
}

impl From<SignalRecord> for Signal {
    fn from(r: SignalRecord) -> Signal {
        Signal {
            id: r.id,
            name: r.name,
            key: r.key,
            data: r.data,
            sent_by: r.sent_by,
            received_at: r.received_at,
        }
    }
}

/// Checks what a send carries; the message names the field.
fn check_send(name: &str, data: &Value, opts: &SignalOptions) -> Result<()> {
    check_name("name", name).map_err(Error::InvalidInput)?;
    if let Some(id) = &opts.signal_id {
        check_name("signal_id", id).map_err(Error::InvalidInput)?;
    }
    if let Err(size) = check_payload(data) {
        return Err(Error::ContentTooLarge {
            job: format!("signal `{name}`"),
            size,
            limit: MAX_SIGNAL_BYTES,
        });
    }
    docket_store::json::check_depth("data", data).map_err(|e| Error::InvalidInput(e.to_string()))
}

fn map_store(e: StoreError) -> Error {
    match e {
        StoreError::WrongState {
            run_id,
            current,
            message,
        } => Error::WrongState {
            run_id,
            current,
            message,
        },
        StoreError::NotFound(id) => Error::RunNotFound(id),
        e => Error::Store(e),
    }
}

impl Docket {
    /// Sends the signal `name` with `data` to the run `run`, durably: kept
    /// until a wait of the run for `name` consumes it (one signal per wait,
    /// in arrival order); a run suspended in such a wait is due at once.
    /// Refused for a final run ([`Error::WrongState`] naming its state),
    /// an unknown run or one of another tenant ([`Error::RunNotFound`]), a
    /// payload over 64 KiB ([`Error::ContentTooLarge`]) or a bad name
    /// ([`Error::InvalidInput`]). A repeated `signal_id` answers the stored
    /// signal with `duplicate: true`.
    pub async fn signal(
        &self,
        run: RunId,
        name: &str,
        data: Value,
        opts: SignalOptions,
    ) -> Result<Sent> {
        check_send(name, &data, &opts)?;
        let sent = self
            .store()
            .send_signal(SendSignal {
                run_id: run,
                tenant: opts.tenant,
                name: name.to_string(),
                signal_id: opts
                    .signal_id
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                data,
                sent_by: opts.sent_by.unwrap_or_else(|| "rust".into()),
                now: self.clock().now(),
            })
            .await
            .map_err(map_store)?;
        if sent.woke {
            self.wake_workers();
        }
        let _ = self.inner.changes.send(run);
        Ok(sent)
    }

    /// Sends the signal `name` with `data` to every run of `tenant` that
    /// waits for `name` with exactly `key` at this moment
    /// ([`Ctx::wait_for_signal_keyed`]), in one transaction, and answers
    /// one [`Sent`] per run reached. Nobody waiting: nothing is kept (the
    /// answer is empty; see docs/DURABLE.md, "External events by
    /// correlation key"). A repeated `signal_id` answers the runs the first
    /// send reached, as duplicates.
    pub async fn signal_by_key(
        &self,
        tenant: &str,
        name: &str,
        key: &str,
        data: Value,
        opts: SignalOptions,
    ) -> Result<Vec<Sent>> {
        check_send(name, &data, &opts)?;
        check_key("key", key).map_err(Error::InvalidInput)?;
        let sent = self
            .store()
            .send_keyed_signal(SendKeyed {
                tenant: tenant.to_string(),
                name: name.to_string(),
                key: key.to_string(),
                signal_id: opts
                    .signal_id
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                data,
                sent_by: opts.sent_by.unwrap_or_else(|| "rust".into()),
                now: self.clock().now(),
            })
            .await
            .map_err(map_store)?;
        if sent.iter().any(|s| s.woke) {
            self.wake_workers();
        }
        for s in &sent {
            let _ = self.inner.changes.send(s.signal.run_id);
        }
        Ok(sent)
    }

    /// The signals a run received, in arrival order (pending ones have no
    /// `delivered_to`).
    pub async fn signals(&self, run: RunId) -> Result<Vec<SignalRecord>> {
        Ok(self.store().signals(run).await?)
    }

    /// The run's open waits for signals.
    pub async fn signal_waits(&self, run: RunId) -> Result<Vec<SignalWaitRecord>> {
        Ok(self.store().signal_waits(run).await?)
    }
}

impl Ctx {
    /// Waits durably for the signal `name`, at most `timeout`:
    /// `let paid = ctx.wait_for_signal("paid", Duration::from_secs(3 * 86_400)).await?;`
    ///
    /// The oldest signal of that name the run received and no earlier wait
    /// consumed is returned ([`Signalled::Received`]); it is stored as this
    /// wait's result in the transaction that consumes it, so a replay gets
    /// the same signal and no signal is delivered twice or lost. With none
    /// yet, the wait is recorded (the first time, with its deadline) and
    /// the run is suspended (propagate the error with `?`): it holds no
    /// worker slot and no lease, spends no attempt budget, and is due again
    /// when a signal of that name arrives or at the deadline, when this
    /// returns [`Signalled::TimedOut`] (also stored).
    ///
    /// Waits are numbered by name in the order the handler makes them
    /// (`signal:paid:1`, `signal:paid:2`, …; the step names in the run's
    /// history): calling it twice, in a loop, receives two signals in
    /// arrival order, one each. Make waits in the same order on every
    /// replay, as with steps. No new wait starts once a cancel was
    /// requested.
    pub async fn wait_for_signal(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Signalled, JobError> {
        self.wait_signal(name, None, timeout).await
    }

    /// [`Ctx::wait_for_signal`], also reachable by correlation key: a
    /// `POST /api/signals` (or [`Docket::signal_by_key`]) with this name and
    /// exactly this `key`, from the run's tenant, is delivered to this wait
    /// (and to every other run waiting for the same name and key). A signal
    /// sent to the run by id is delivered too.
    pub async fn wait_for_signal_keyed(
        &self,
        name: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<Signalled, JobError> {
        check_key("key", key).map_err(JobError::permanent)?;
        self.wait_signal(name, Some(key), timeout).await
    }

    async fn wait_signal(
        &self,
        name: &str,
        key: Option<&str>,
        timeout: Duration,
    ) -> Result<Signalled, JobError> {
        check_name("signal name", name).map_err(JobError::permanent)?;
        let wait = self.claim_numbered(&format!("signal:{name}:")).await;
        if let Some(rec) = self.stored(&wait).await? {
            return replayed(&wait, rec.result.unwrap_or(Value::Null));
        }
        self.check_cancel()?;
        let now = self.now();
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let out = self
            .docket
            .store()
            .signal_wait(
                self.lease(),
                WaitSignal {
                    wait: wait.clone(),
                    name: name.to_string(),
                    key: key.map(str::to_string),
                    until: now.plus_millis(ms),
                    now,
                },
            )
            .await
            .map_err(store_err)?;
        match out {
            WaitOutcome::Delivered(r) => Ok(Signalled::Received((*r).into())),
            WaitOutcome::TimedOut { until } => Ok(Signalled::TimedOut { until }),
            WaitOutcome::Waiting { until } => Err(JobError::control(
                Control::Postpone { until },
                &format!(
                    "waiting for signal \"{name}\"{} (`{wait}`) until {}",
                    key.map(|k| format!(" with key \"{k}\""))
                        .unwrap_or_default(),
                    until.to_rfc3339()
                ),
            )),
        }
    }
}

/// A stored wait's answer, as the store wrote it (`plan::signal`).
fn replayed(wait: &str, v: Value) -> Result<Signalled, JobError> {
    if let Some(s) = v.get("signal") {
        return serde_json::from_value::<Signal>(s.clone())
            .map(Signalled::Received)
            .map_err(|e| {
                JobError::permanent(format!("wait `{wait}`: stored signal unreadable: {e}"))
            });
    }
    let until = v
        .pointer("/timeout/until")
        .and_then(|u| serde_json::from_value::<Timestamp>(u.clone()).ok())
        .ok_or_else(|| {
            JobError::permanent(format!("wait `{wait}`: stored result unreadable: {v}"))
        })?;
    Ok(Signalled::TimedOut { until })
}
