//! The event hub and `GET /api/events` (server-sent events).
//!
//! One task per server tails the store's event table and publishes every
//! event once, in id order, to a broadcast channel; each SSE connection
//! filters it for its tenant, run and job. Metrics are fed from the same
//! tail.
//!
//! ## Ordering and resumption
//!
//! On SQLite, event ids are given in commit order, so reading "after the
//! last id seen" misses nothing. On PostgreSQL ids come from a sequence and
//! a transaction that took a lower id may commit after one with a higher id
//! is already visible. The hub therefore publishes in id order only: an id
//! above a gap is held back until the gap fills, or until it has stayed
//! open for [`HubConfig::gap_timeout`] (a rolled-back transaction leaves a
//! gap that never fills). Gaps given up on are still watched for a while
//! ([`HubConfig::late_window`]): an event that arrives later is published
//! late rather than lost. So an SSE `id` is a safe resume point: every
//! event below it has been published (or its transaction never committed),
//! and `Last-Event-ID` resumption replays from the store exactly the events
//! after it.

use crate::auth::Caller;
use crate::dto::EventView;
use crate::error::ApiError;
use crate::extract::QueryPairs;
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use docket::{EventFilter, EventRecord, RunId};
use docket_store::DynStore;
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch, Notify};

/// How the hub tails the store.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Pause between reads when nothing new was found.
    pub poll_interval: Duration,
    /// How long an id gap holds back later events.
    pub gap_timeout: Duration,
    /// How long a gap given up on is still watched for a late event.
    pub late_window: Duration,
    /// Events read per query.
    pub batch: usize,
    /// Events buffered per subscriber; one that falls further behind
    /// catches up from the store.
    pub channel_capacity: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            poll_interval: Duration::from_millis(100),
            gap_timeout: Duration::from_secs(2),
            late_window: Duration::from_secs(60),
            batch: 1000,
            channel_capacity: 4096,
        }
    }
}

/// Tails the store's events and publishes each once.
pub struct EventHub {
    tx: broadcast::Sender<Arc<EventRecord>>,
    nudge: Notify,
    /// The largest id published so far.
    position: AtomicI64,
}

/// The ordering state of the tail (pure, so it can be tested alone).
#[derive(Debug)]
pub(crate) struct Sequencer {
    /// Every id below this is published or given up on.
    next: i64,
    /// Seen ids at or above `next`, held back by a gap.
    held: BTreeMap<i64, EventRecord>,
    /// Since when the gap at `next` has been open.
    gap_since: Option<Instant>,
    /// Gaps given up on, watched until the instant given.
    skipped: BTreeMap<i64, Instant>,
}

impl Sequencer {
    pub(crate) fn new(after: i64) -> Self {
        Sequencer {
            next: after + 1,
            held: BTreeMap::new(),
            gap_since: None,
            skipped: BTreeMap::new(),
        }
    }

    /// The id after which the next read starts.
    pub(crate) fn cursor(&self) -> i64 {
        self.next - 1
    }

    /// The lowest skipped id still watched, if any.
    pub(crate) fn oldest_skipped(&self) -> Option<i64> {
        self.skipped.keys().next().copied()
    }

    /// Takes events read from the store; returns those to publish now, in
    /// order (late arrivals of skipped gaps first).
    pub(crate) fn accept(
        &mut self,
        events: Vec<EventRecord>,
        now: Instant,
        cfg: &HubConfig,
    ) -> Vec<EventRecord> {
        let mut out = Vec::new();
        self.skipped.retain(|_, until| *until > now);
        for e in events {
            if e.id >= self.next {
                self.held.entry(e.id).or_insert(e);
            } else if self.skipped.remove(&e.id).is_some() {
                out.push(e);
            }
        }
        loop {
            while let Some(e) = self.held.remove(&self.next) {
                out.push(e);
                self.next += 1;
                self.gap_since = None;
            }
            let Some((&first, _)) = self.held.iter().next() else {
                self.gap_since = None;
                break;
            };
            let since = *self.gap_since.get_or_insert(now);
            if now.duration_since(since) < cfg.gap_timeout {
                break;
            }
            // Give up on the gap: those ids are watched for a while.
            for id in self.next..first {
                self.skipped.insert(id, now + cfg.late_window);
            }
            self.next = first;
            self.gap_since = None;
        }
        out
    }
}

impl EventHub {
    /// Starts the tail after event id `after` (the store's last id at
    /// start, so only new events are published). Stops when `stop` turns
    /// true. `observe` sees every published event first (metrics).
    pub fn start(
        store: DynStore,
        after: i64,
        cfg: HubConfig,
        mut stop: watch::Receiver<bool>,
        observe: impl Fn(&EventRecord) + Send + Sync + 'static,
    ) -> Arc<EventHub> {
        let (tx, _) = broadcast::channel(cfg.channel_capacity.max(1));
        let hub = Arc::new(EventHub {
            tx,
            nudge: Notify::new(),
            position: AtomicI64::new(after),
        });
        let h = hub.clone();
        tokio::spawn(async move {
            let mut seq = Sequencer::new(after);
            let mut backoff = cfg.poll_interval;
            loop {
                if *stop.borrow() {
                    return;
                }
                let mut found = 0;
                let mut read = store
                    .events(EventFilter {
                        after_id: Some(seq.cursor()),
                        limit: cfg.batch,
                        ..Default::default()
                    })
                    .await;
                if let (Ok(events), Some(low)) = (&mut read, seq.oldest_skipped()) {
                    // Late arrivals of skipped gaps.
                    match store
                        .events(EventFilter {
                            after_id: Some(low - 1),
                            limit: usize::try_from(seq.cursor() - low + 1)
                                .unwrap_or(cfg.batch)
                                .min(cfg.batch),
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(late) => events.extend(late),
                        Err(e) => tracing::debug!(error = %e, "late-event read failed"),
                    }
                }
                match read {
                    Ok(events) => {
                        found = events.len();
                        backoff = cfg.poll_interval;
                        for e in seq.accept(events, Instant::now(), &cfg) {
                            observe(&e);
                            h.position.fetch_max(e.id, Ordering::SeqCst);
                            let _ = h.tx.send(Arc::new(e));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "event tail failed");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
                // A full batch: read on at once. Otherwise wait for the poll
                // interval or a nudge from a request of this server.
                if found >= cfg.batch {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = h.nudge.notified() => {}
                    _ = stop.changed() => {}
                }
            }
        });
        hub
    }

    /// Every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRecord>> {
        self.tx.subscribe()
    }

    /// The largest event id published so far (read after subscribing, it
    /// is where a subscriber that falls behind resumes from the store).
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::SeqCst)
    }

    /// Asks the tail to read now (after this server changed something).
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }
}

/// What an SSE connection wants.
struct Filter {
    tenant: String,
    run: Option<RunId>,
    job: Option<String>,
    kinds: Vec<String>,
}

impl Filter {
    fn matches(&self, e: &EventRecord) -> bool {
        e.tenant == self.tenant
            && self.run.is_none_or(|r| r == e.run_id)
            && self.job.as_ref().is_none_or(|j| *j == e.job)
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| e.kind == k.as_str()))
    }

    fn store_filter(&self, after: i64, limit: usize) -> EventFilter {
        EventFilter {
            tenant: Some(self.tenant.clone()),
            run_id: self.run,
            job: self.job.clone(),
            after_id: Some(after),
            limit,
        }
    }
}

fn sse_event(e: &EventRecord) -> Event {
    let view = EventView::from(e);
    Event::default()
        .id(e.id.to_string())
        .event(e.kind.clone())
        .json_data(&view)
        .unwrap_or_else(|_| {
            Event::default()
                .id(e.id.to_string())
                .comment("unencodable event")
        })
}

/// Server-sent events of the caller's tenant.
///
/// Each event has `id` (resume with `Last-Event-ID`), `event` (the kind)
/// and `data` (the event as JSON). Without `Last-Event-ID` (or
/// `last_event_id`) only new events are sent; with it, the stored events
/// after that id first, then new ones, without gaps or repeats.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "events",
    params(
        ("run_id" = Option<String>, Query, description = "Only this run's events"),
        ("job" = Option<String>, Query, description = "Only this job's events"),
        ("kind" = Option<String>, Query, description = "Only these kinds (comma-separated or repeated)"),
        ("last_event_id" = Option<i64>, Query, description = "Resume after this id (as the Last-Event-ID header)"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this id"),
    ),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = EventView),
        (status = 400, description = "A bad parameter", body = crate::error::ErrorBody),
        (status = 401, description = "No valid token", body = crate::error::ErrorBody),
        (status = 404, description = "The run is not in the caller's tenant", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    q: QueryPairs,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    q.only(&["run_id", "job", "kind", "last_event_id"])?;
    let run = match q.get("run_id") {
        None => None,
        Some(s) => {
            let id: RunId = s
                .parse()
                .map_err(|_| ApiError::bad_param("run_id", format!("`{s}` is not a run id")))?;
            // Another tenant's run answers as a missing one.
            crate::runs::load_run(&state, &caller, id).await?;
            Some(id)
        }
    };
    let resume = match (headers.get("last-event-id"), q.get("last_event_id")) {
        (Some(h), _) => Some(
            h.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_param("Last-Event-ID", "Last-Event-ID must be an event id")
                })?,
        ),
        (None, Some(s)) => Some(s.parse::<i64>().map_err(|_| {
            ApiError::bad_param("last_event_id", "last_event_id must be an event id")
        })?),
        (None, None) => None,
    };
    let filter = Filter {
        tenant: caller.tenant,
        run,
        job: q.get("job").map(str::to_string),
        kinds: q.all("kind").into_iter().map(str::to_string).collect(),
    };
    let rx = state.hub.subscribe();
    let position = state.hub.position();
    let (tx, out) = mpsc::channel::<Event>(256);
    let store = state.store().clone();
    let stop = state.stop.clone();
    tokio::spawn(pump(store, filter, resume, position, rx, tx, stop));
    let stream = futures::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|e| (Ok(e), out))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Replays stored events after `after`, sending matching ones; returns the
/// ids sent and the largest id read.
async fn replay(
    store: &DynStore,
    filter: &Filter,
    mut after: i64,
    tx: &mpsc::Sender<Event>,
    sent: &mut HashSet<i64>,
) -> Result<i64, ()> {
    const PAGE: usize = 500;
    loop {
        let page = store
            .events(filter.store_filter(after, PAGE))
            .await
            .map_err(|e| tracing::warn!(error = %e, "event replay failed"))?;
        let n = page.len();
        for e in page {
            after = after.max(e.id);
            if filter.matches(&e) && sent.insert(e.id) {
                tx.send(sse_event(&e)).await.map_err(|_| ())?;
            }
        }
        if n < PAGE {
            return Ok(after);
        }
    }
}

async fn pump(
    store: DynStore,
    filter: Filter,
    resume: Option<i64>,
    position: i64,
    mut rx: broadcast::Receiver<Arc<EventRecord>>,
    tx: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    // Ids sent by a replay, so the live stream does not repeat them.
    let mut sent: HashSet<i64> = HashSet::new();
    let floor = resume.unwrap_or(i64::MAX);
    let mut last = match resume {
        Some(after) => match replay(&store, &filter, after, &tx, &mut sent).await {
            Ok(l) => l,
            Err(()) => return,
        },
        // Live only: a lagging client catches up from where the hub was.
        None => position,
    };
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = stop.changed() => return,
            _ = tx.closed() => return,
        };
        match msg {
            Ok(e) => {
                if resume.is_some() && e.id <= floor {
                    continue;
                }
                if !sent.is_empty() {
                    if sent.contains(&e.id) {
                        continue;
                    }
                    if e.id > last {
                        sent.clear();
                    }
                }
                last = last.max(e.id);
                if filter.matches(&e) && tx.send(sse_event(&e)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // This client fell behind the hub: fill in from the store.
                tracing::debug!(missed = n, "SSE client lagged; replaying from the store");
                match replay(&store, &filter, last, &tx, &mut sent).await {
                    Ok(l) => last = l,
                    Err(()) => return,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use docket::Timestamp;

    fn ev(id: i64) -> EventRecord {
        EventRecord {
            id,
            run_id: RunId::new(),
            tenant: "t".into(),
            job: "j".into(),
            kind: "k".into(),
            at: Timestamp(0),
            attempt: None,
            lease_id: None,
            actor: None,
            comment: None,
            data: serde_json::json!({}),
        }
    }

    fn ids(v: &[EventRecord]) -> Vec<i64> {
        v.iter().map(|e| e.id).collect()
    }

    #[test]
    fn publishes_in_order_holding_back_behind_a_gap() {
        let cfg = HubConfig::default();
        let t0 = Instant::now();
        let mut s = Sequencer::new(10);
        assert_eq!(ids(&s.accept(vec![ev(11), ev(12)], t0, &cfg)), [11, 12]);
        assert_eq!(s.cursor(), 12);
        // 13 is not visible yet (committed later): 14 and 15 wait.
        assert!(s.accept(vec![ev(14), ev(15)], t0, &cfg).is_empty());
        assert_eq!(s.cursor(), 12);
        // The read repeats from the cursor; duplicates are ignored.
        assert_eq!(
            ids(&s.accept(vec![ev(13), ev(14), ev(15)], t0, &cfg)),
            [13, 14, 15]
        );
        assert_eq!(s.cursor(), 15);
    }

    #[test]
    fn a_gap_that_never_fills_is_given_up_and_a_late_event_still_published() {
        let cfg = HubConfig {
            gap_timeout: Duration::from_millis(500),
            ..HubConfig::default()
        };
        let t0 = Instant::now();
        let mut s = Sequencer::new(0);
        assert!(s.accept(vec![ev(2)], t0, &cfg).is_empty());
        assert!(s
            .accept(vec![ev(2)], t0 + Duration::from_millis(100), &cfg)
            .is_empty());
        let out = s.accept(vec![ev(2), ev(3)], t0 + Duration::from_millis(600), &cfg);
        assert_eq!(ids(&out), [2, 3]);
        assert_eq!(s.oldest_skipped(), Some(1));
        // Id 1 commits after all: published late, once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(ids(&s.accept(vec![ev(1)], t1, &cfg)), [1]);
        assert!(s.accept(vec![ev(1)], t1, &cfg).is_empty());
        assert_eq!(s.oldest_skipped(), None);
    }

    #[test]
    fn skipped_gaps_expire() {
        let cfg = HubConfig {
            gap_timeout: Duration::ZERO,
            late_window: Duration::from_secs(1),
            ..HubConfig::default()
        };
        let t0 = Instant::now();
        let mut s = Sequencer::new(0);
        assert_eq!(ids(&s.accept(vec![ev(3)], t0, &cfg)), [3]);
        assert_eq!(s.oldest_skipped(), Some(1));
        assert!(s
            .accept(vec![], t0 + Duration::from_secs(2), &cfg)
            .is_empty());
        assert_eq!(s.oldest_skipped(), None);
        assert!(s
            .accept(vec![ev(1)], t0 + Duration::from_secs(2), &cfg)
            .is_empty());
    }
}
