//! Exactly once under concurrency: several runs carrying one idempotency
//! key race against a real (local) HTTP service that does NOT deduplicate,
//! so every request it receives is an effect. The ledger must let exactly
//! one of them send; the others wait for its outcome and return the
//! committed result. Both backends.

use docket::{
    Ctx, Docket, Job, JobError, ManualClock, Reconciled, RetryPolicy, RunStatus, Stepped,
    Timestamp, WorkerConfig,
};
use docket_core::forensics::Verdict;
use docket_core::Clock;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

const T0: Timestamp = Timestamp(1_767_225_600_000);
const BOUND: Duration = Duration::from_secs(20);

/// A payment service: `POST /charges` with an `Idempotency-Key` header
/// commits a charge (and counts it: it does not deduplicate) but answers
/// only once the test opens the gate; `GET /charges?key=K` says whether K
/// was charged.
#[derive(Default)]
struct Service {
    effects: Mutex<HashMap<String, usize>>,
    committed: Mutex<HashMap<String, Value>>,
    arrived: Notify,
}

struct Running {
    addr: SocketAddr,
    svc: Arc<Service>,
    gate: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Running {
    async fn start() -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = Arc::new(Service::default());
        let (gate, gate_rx) = watch::channel(false);
        let s = svc.clone();
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, s.clone(), gate_rx.clone()));
            }
        });
        Running {
            addr,
            svc,
            gate,
            accept,
        }
    }

    fn effects(&self, key: &str) -> usize {
        self.svc
            .effects
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

async fn serve(mut sock: TcpStream, svc: Arc<Service>, mut gate: watch::Receiver<bool>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let first = head.lines().next().unwrap_or_default().to_string();
    let key = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case("idempotency-key"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = if let Some(rest) = first.strip_prefix("GET /charges?key=") {
        let k = rest.split(' ').next().unwrap_or_default().to_string();
        let found = svc.committed.lock().unwrap().get(&k).cloned();
        json!({ "found": found.is_some(), "charge": found })
    } else {
        // The effect happens on arrival, before the answer: a slow answer
        // is exactly when a duplicate could be sent.
        let charge = json!({ "charge_id": format!("ch-{key}") });
        *svc.effects.lock().unwrap().entry(key.clone()).or_default() += 1;
        svc.committed.lock().unwrap().insert(key, charge.clone());
        svc.arrived.notify_waiters();
        // Bounded by the test's own timeouts; opened by the test.
        let _ = tokio::time::timeout(BOUND, gate.wait_for(|open| *open)).await;
        charge
    };
    let body = body.to_string();
    let out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.shutdown().await;
}

fn charge_job(addr: SocketAddr) -> Job {
    let base = format!("http://{addr}");
    Job::new("charge", move |ctx: Ctx, input: Value| {
        let base = base.clone();
        async move {
            let key = format!("charge/order-{}", input["order"]);
            let client = reqwest::Client::new();
            let (c1, b1) = (client.clone(), base.clone());
            let got = ctx
                .action_with_reconcile(
                    "charge",
                    key,
                    Some(Duration::from_secs(15)),
                    move |k: String| async move {
                        let v: Value = c1
                            .get(format!("{b1}/charges?key={k}"))
                            .send()
                            .await
                            .map_err(|e| JobError::network(e.to_string()))?
                            .json()
                            .await
                            .map_err(|e| JobError::network(e.to_string()))?;
                        Ok(if v["found"] == true {
                            Reconciled::Committed(v["charge"].clone())
                        } else {
                            Reconciled::NotDone
                        })
                    },
                    move |k: String| async move {
                        client
                            .post(format!("{base}/charges"))
                            .header("idempotency-key", k)
                            .json(&json!({"amount": 100}))
                            .send()
                            .await
                            .map_err(|e| JobError::network(e.to_string()))?
                            .json::<Value>()
                            .await
                            .map_err(|e| JobError::network(e.to_string()))
                    },
                )
                .await?;
            match got {
                Stepped::Done(v) => Ok(v),
                Stepped::Skipped { .. } => Ok(Value::Null),
            }
        }
    })
    .retry(RetryPolicy {
        name: "fast".into(),
        base_delay_ms: 100,
        multiplier: 1.0,
        max_delay_ms: 100,
        max_attempts: 3,
        jitter_ms: 0,
        overrides: BTreeMap::new(),
    })
    .timeout(Duration::from_secs(20))
    .lease(Duration::from_secs(30))
}

/// N runs, one key, a slow service: one effect; the others wait for the
/// first one's outcome (a recorded deferral naming it, no budget spent)
/// and then return its committed result; forensics names the duplicate
/// dispatch from the evidence.
async fn runs_racing_on_one_key_commit_one_effect(d: Docket, clock: ManualClock) {
    const N: usize = 4;
    let svc = Running::start().await;
    d.register(charge_job(svc.addr)).unwrap();
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(
            d.trigger("charge", json!({"order": 42}))
                .await
                .unwrap()
                .run
                .id,
        );
    }
    let key = "charge/order-42";
    let arrived = svc.svc.arrived.notified();
    let worker = d.worker(WorkerConfig {
        concurrency: N,
        ..Default::default()
    });
    // One tick claims all N at once: they overlap in time.
    let first = tokio::spawn(async move { worker.tick().await.unwrap() });
    tokio::time::timeout(BOUND, arrived)
        .await
        .expect("the first request reaches the service");
    // The sender is the run whose attempt holds the key.
    let mut sender = None;
    for id in &ids {
        if !d.history(*id).await.unwrap().ledger.is_empty() {
            sender = Some(*id);
        }
    }
    let sender = sender.expect("one run holds the key");
    // While its request is in flight, every other run must step back
    // without sending (before the fix they reconciled, heard "not done"
    // and sent again).
    let mut waiting = Vec::new();
    for id in ids.iter().filter(|id| **id != sender) {
        let r = d
            .wait_until(*id, BOUND, |r| {
                r.status != RunStatus::Running || svc.effects(key) > 1
            })
            .await
            .unwrap();
        assert_eq!(
            svc.effects(key),
            1,
            "a second request was sent while the first was in flight"
        );
        assert_eq!(r.status, RunStatus::Pending);
        assert!(r.run_after > clock.now(), "rescheduled, not due at once");
        waiting.push(r);
    }
    svc.gate.send(true).unwrap();
    assert_eq!(first.await.unwrap(), N);
    assert_eq!(
        d.get_run(sender).await.unwrap().status,
        RunStatus::Completed
    );
    // The others look again after the recheck delay and find it committed.
    clock.advance(Duration::from_secs(2));
    let again = d.worker(WorkerConfig {
        concurrency: N,
        ..Default::default()
    });
    assert_eq!(again.tick().await.unwrap(), N - 1);
    assert_eq!(svc.effects(key), 1, "exactly one effect");
    let out = d.get_run(sender).await.unwrap().output;
    for id in &ids {
        let h = d.history(*id).await.unwrap();
        assert_eq!(h.run.status, RunStatus::Completed, "{:?}", h.events);
        assert_eq!(h.run.output, out, "every run returns the one result");
        if *id == sender {
            continue;
        }
        // Evidence: the deferral names the holder and spent no budget.
        let a1 = &h.attempts[0];
        assert_eq!(a1.outcome, "deferred");
        assert_eq!(a1.retry_reason, Some(docket::RetryReason::ActionInFlight));
        assert!(a1
            .error_message
            .as_deref()
            .unwrap()
            .contains(&sender.to_string()));
        assert_eq!(h.run.attempts_forgiven, 1);
        let in_flight = h
            .events
            .iter()
            .find(|e| e.kind == "action_in_flight")
            .expect("in-flight decision recorded");
        assert_eq!(in_flight.data["held_by_run"], json!(sender));
        let dup = h
            .events
            .iter()
            .find(|e| e.kind == "duplicate_suppressed")
            .expect("duplicate suppressed");
        assert_eq!(dup.data["committed_by_run"], json!(sender));
        // The run's own forensic report names the other run.
        let f = d.forensics(*id).await.unwrap();
        assert!(
            f.verdicts
                .iter()
                .any(|v| v.verdict == Verdict::DuplicateDispatch
                    && (v.first.run_id == sender || v.second.run_id == sender)),
            "{:?}",
            f.verdicts
        );
    }
    let report = d
        .forensics_for_job("charge", T0.plus_millis(-1), None)
        .await
        .unwrap();
    let dups: Vec<_> = report
        .verdicts
        .iter()
        .filter(|v| v.verdict == Verdict::DuplicateDispatch)
        .collect();
    assert_eq!(dups.len(), N - 1, "one verdict per duplicate run");
    for v in dups {
        assert_eq!(v.first.run_id, sender, "each names the run that sent");
        assert!(v.explanation.contains(key));
    }
}

fn temp_url() -> String {
    let dir = std::env::temp_dir().join(format!("docket-once-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}", dir.join("docket.db").display())
}

async fn engine(url: &str) -> (Docket, ManualClock) {
    let clock = ManualClock::new(T0);
    let store = docket_store::open(url).await.unwrap();
    (Docket::with_store(store, Arc::new(clock.clone())), clock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_racing_on_one_key_commit_one_effect_sqlite() {
    let (d, clock) = engine(&temp_url()).await;
    runs_racing_on_one_key_commit_one_effect(d, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_racing_on_one_key_commit_one_effect_postgres() {
    let Ok(base) = std::env::var("DOCKET_TEST_POSTGRES_URL") else {
        println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
        return;
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}schema=once_{}", uuid::Uuid::new_v4().simple());
    let (d, clock) = engine(&url).await;
    runs_racing_on_one_key_commit_one_effect(d, clock).await;
}
