//! Shared rate limits and circuit breakers across real `docket serve`
//! processes on one PostgreSQL schema (docs/RATE_LIMITS.md).
//!
//! Needs `DOCKET_TEST_POSTGRES_URL`; without it the test says so and passes,
//! except under `CI=true`, where it fails. Real time by necessity: the
//! processes share nothing but the database and the wall clock, so there is
//! no clock to inject across them. The rate test takes about 12 s, the
//! breaker test about 6 s.

use docket::{Clock, SystemClock};
use docket_store::postgres::PgStore;
use docket_store::{NewRun, Store};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_docket");
const URL_VAR: &str = "DOCKET_TEST_POSTGRES_URL";

fn url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true: {URL_VAR} must be set, PostgreSQL tests may not be skipped")
        }
        _ => {
            eprintln!("skipping: set {URL_VAR}=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
            None
        }
    }
}

/// A local service that answers every request 200 and records when each
/// arrived.
/// A service on a loopback port that answers 200 and sends the time each
/// request arrived on the returned channel.
fn recording_service() -> (String, std::sync::mpsc::Receiver<Instant>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().map_while(Result::ok) {
            let s = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut got = Vec::new();
                // Read up to the end of the headers and the (small) body.
                while let Ok(n) = sock.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = s.send(Instant::now());
                let _ = sock.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
                );
            });
        }
    });
    (format!("http://{addr}"), seen)
}

/// A `docket serve` process, killed on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `docket serve` on the schema's URL with `config`, and waits (at
/// most 30 s) until it listens.
fn serve(db_url: &str, config: &std::path::Path) -> Served {
    serve_with(db_url, config, &[])
}

/// [`serve`] with more arguments.
fn serve_with(db_url: &str, config: &std::path::Path, args: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--db", db_url, "--addr", "127.0.0.1:0"])
        .args(args)
        .arg("--config")
        .arg(config)
        .env("DOCKET_LOG", "info")
        .env_remove("DOCKET_DB")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let served = Served(child);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("docket serve listens within 30 s");
        if line.contains("docket API listening") {
            // Keep draining its log so it never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return served;
        }
    }
}

/// Three processes send a connection's requests, limited to 20 a second
/// with a burst of 5: in every window of the 10 s measured, the requests
/// the service saw stay within the documented bound (burst + rate · t,
/// plus one more burst for tokens sent late and one request for the
/// window's edges), and the limit is used, not undershot. Prints how late
/// the deferred runs came back for their tokens (from the attempt rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_rate_limit_holds_across_three_processes() {
    let Some(base) = url() else { return };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(&base, &schema).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let db_url = format!("{base}{sep}schema={schema}");
    let (service, seen) = recording_service();
    let dir = std::env::temp_dir().join(format!("docket-rate-{schema}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("docket.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[connections.svc]
base_url = "{service}"
rate_limit = {{ per_second = 20, burst = 5 }}

[jobs.hit]
connection = "svc"
path = "/hit"
idempotency_key = "{{{{ input.i }}}}/hit/v1"
body = {{ i = "{{{{ input.i }}}}" }}
"#
        ),
    )
    .unwrap();
    let _procs: Vec<Served> = (0..3).map(|_| serve(&db_url, &config)).collect();
    // More runs than 10 s of tokens, all due at once.
    let now = SystemClock.now();
    let runs: Vec<NewRun> = (0..300)
        .map(|i| NewRun::new("hit", json!({ "i": i })))
        .collect();
    store.trigger(runs, now).await.unwrap();
    // Bounded: 300 requests at 20/s take 15 s; we measure the first 10 s.
    // Waits on the service's arrivals (bounded), then collects every one
    // until 200 ms past the 10 s window: the window is real time by
    // necessity, since three OS processes share the bucket.
    let (end, mut times) = tokio::task::spawn_blocking(move || {
        let first = seen
            .recv_timeout(Duration::from_secs(40))
            .expect("no request arrived within 40 s");
        let end = first + Duration::from_secs(10);
        let stop = end + Duration::from_millis(200);
        let mut times = vec![first];
        while let Some(left) = stop.checked_duration_since(Instant::now()) {
            match seen.recv_timeout(left) {
                Ok(t) => times.push(t),
                Err(_) => break,
            }
        }
        (end, times)
    })
    .await
    .unwrap();
    times.retain(|t| *t <= end);
    times.sort();
    let (rate, burst) = (20.0, 5.0);
    // The largest excess over burst + rate · t in any window, and where.
    let mut worst = (f64::MIN, 0usize, 0.0f64);
    for i in 0..times.len() {
        for j in i..times.len() {
            let t = times[j].duration_since(times[i]).as_secs_f64();
            let n = j - i + 1;
            let excess = n as f64 - (burst + rate * t);
            if excess > worst.0 {
                worst = (excess, n, t);
            }
            let bound = 2.0 * burst + rate * t + 1.0;
            assert!(
                n as f64 <= bound,
                "{n} requests within {t:.3} s: more than {bound:.1} (20/s, burst 5)"
            );
        }
    }
    // 10 s at 20/s after a burst of 5: 205 tokens, plus at most one more
    // burst for tokens sent late (the bound above; the total here). The
    // runs due at once are worked through first (about 1.2 s here), so the
    // runs holding the first reserved tokens come back late for them:
    // those tokens used to be lost (173 to 180 requests, docs/RATE_LIMITS.md,
    // "Accuracy"); now the runs asking meanwhile send on them (205 to 208
    // measured on a 2-core machine at load 3 to 6). The floor leaves 20 for
    // a machine more loaded than that, and fails the old behaviour.
    assert!(
        times.len() >= 185 && times.len() <= 216,
        "{} requests in 10 s (205 tokens)",
        times.len()
    );
    eprintln!(
        "{} requests in 10 s; largest excess over burst + rate·t: {:.2} ({} requests in {:.3} s)",
        times.len(),
        worst.0,
        worst.1,
        worst.2
    );
    drop(_procs);
    let late = reservation_lateness(&store).await;
    eprintln!("{late}");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .unwrap();
}

/// How late the deferred runs came back for their reserved tokens, from
/// the stored attempts: each `rate_limited` deferral's due time (its
/// `eligible_at`, the reserved token's time) against the start of the
/// run's next attempt.
#[derive(Debug)]
struct Lateness {
    /// Deferrals whose run came back.
    returned: usize,
    /// Of those, how many came back after the reservation's grace.
    past_grace: usize,
    /// The due times of those, from and to, in ms after the first due
    /// time of any reservation.
    past_grace_due: (i64, i64),
    /// Runs deferred more than once.
    deferred_again: usize,
    /// Median and largest lateness, in milliseconds.
    median_ms: i64,
    max_ms: i64,
}

impl std::fmt::Display for Lateness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} deferred runs came back: {} after their reservation's grace (250 ms; their tokens were due {} to {} ms after the first), {} deferred again; lateness median {} ms, max {} ms",
            self.returned,
            self.past_grace,
            self.past_grace_due.0,
            self.past_grace_due.1,
            self.deferred_again,
            self.median_ms,
            self.max_ms
        )
    }
}

async fn reservation_lateness(store: &PgStore) -> Lateness {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT d.eligible_at, n.started_at FROM attempts d
         JOIN attempts n ON n.run_id = d.run_id AND n.attempt = d.attempt + 1
         WHERE d.retry_reason = 'rate_limited'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let deferred_again: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT run_id FROM attempts WHERE retry_reason = 'rate_limited'
         GROUP BY run_id HAVING COUNT(*) > 1) x",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let first = rows.iter().map(|r| r.0).min().unwrap_or(0);
    let past: Vec<i64> = rows
        .iter()
        .filter(|(due, started)| started - due > 250)
        .map(|(due, _)| due - first)
        .collect();
    let mut late: Vec<i64> = rows.iter().map(|(due, started)| started - due).collect();
    late.sort_unstable();
    Lateness {
        returned: late.len(),
        past_grace: past.len(),
        past_grace_due: (
            past.iter().copied().min().unwrap_or(0),
            past.iter().copied().max().unwrap_or(0),
        ),
        deferred_again: usize::try_from(deferred_again).unwrap_or(0),
        median_ms: late.get(late.len() / 2).copied().unwrap_or(0),
        max_ms: late.last().copied().unwrap_or(0),
    }
}

/// One request as the failing-then-healthy service saw it.
#[derive(Clone, Debug)]
struct Hit {
    /// Arrival, milliseconds since the epoch (the processes' clocks are
    /// this machine's, so comparable with the stored events' times).
    at: i64,
    /// The `X-Proc` header: which process sent it.
    proc: String,
    /// What the service answered.
    code: u16,
}

/// A service on a loopback port: the first `failures` requests get 503 at
/// once, every later one 200 after `latency`. Each request is sent on the
/// returned channel when it arrives.
fn failing_then_healthy(failures: usize, latency: Duration) -> (String, mpsc::Receiver<Hit>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::channel();
    let count = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    std::thread::spawn(move || {
        for mut sock in listener.incoming().map_while(Result::ok) {
            let (tx, count) = (tx.clone(), count.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut got = Vec::new();
                let head = loop {
                    let Ok(n) = sock.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break head;
                        }
                    }
                };
                let at = SystemClock.now().0;
                let proc = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-proc:"))
                    .unwrap_or("?")
                    .trim()
                    .to_string();
                let code = {
                    let mut c = count.lock().unwrap();
                    *c += 1;
                    if *c <= failures {
                        503
                    } else {
                        200
                    }
                };
                let _ = tx.send(Hit { at, proc, code });
                if code == 200 {
                    // The service's own latency: the time a request (the
                    // probe among them) is out.
                    std::thread::sleep(latency);
                }
                let reply = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                );
                let _ = sock.write_all(reply.as_bytes());
            });
        }
    });
    (format!("http://{addr}"), seen)
}

/// The breaker of a connection shared by three processes (each sends one
/// request at a time): the service fails its first 3 requests, which open
/// the breaker (3 failures, open 2 s); from then until the reset no process
/// sends (only requests already on their way when it opened may arrive,
/// one per other process at most); at the reset exactly one probe goes
/// out (the service takes 300 ms to answer, while the other processes'
/// runs are due too) and its success closes the breaker; then every
/// process sends again within 1.5 s (not at the probe's deadline: the close
/// releases the runs deferred to it) and every run but the 3 that failed
/// completes.
/// Asserted from the service's record against the stored
/// `circuit_opened` / `circuit_half_open` / `circuit_closed` events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_in_one_process_stops_the_others_and_one_probe_closes_it() {
    let Some(base) = url() else { return };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(&base, &schema).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let db_url = format!("{base}{sep}schema={schema}");
    let (service, seen) = failing_then_healthy(3, Duration::from_millis(300));
    let dir = std::env::temp_dir().join(format!("docket-breaker-{schema}"));
    std::fs::create_dir_all(&dir).unwrap();
    let procs: Vec<Served> = (1..=3)
        .map(|p| {
            // The same connection and job everywhere; only the header that
            // tells the service which process sent a request differs.
            let config = dir.join(format!("docket-{p}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"
[connections.svc]
base_url = "{service}"
breaker = {{ failures = 3, window_ms = 60000, open_ms = 2000 }}

[jobs.hit]
connection = "svc"
path = "/hit"
timeout_ms = 2000
headers = {{ "X-Proc" = "p{p}" }}
idempotency_key = "{{{{ input.i }}}}/hit/v1"
body = {{ i = "{{{{ input.i }}}}" }}
retry = {{ base_delay_ms = 600000, max_delay_ms = 600000, jitter_ms = 0, max_attempts = 5 }}
"#
                ),
            )
            .unwrap();
            serve_with(&db_url, &config, &["--concurrency", "1"])
        })
        .collect();
    let runs = 30;
    let items: Vec<NewRun> = (0..runs)
        .map(|i| NewRun::new("hit", json!({ "i": i })))
        .collect();
    store.trigger(items, SystemClock.now()).await.unwrap();
    // Every run but the 3 that failed (their retries are 10 minutes away)
    // sends once and gets 200: wait for those on the service's channel
    // (bounded), and take whatever else has arrived by then.
    let hits = tokio::task::spawn_blocking(move || {
        let mut hits: Vec<Hit> = Vec::new();
        while hits.iter().filter(|h| h.code == 200).count() < runs - 3 {
            match seen.recv_timeout(Duration::from_secs(60)) {
                Ok(h) => hits.push(h),
                Err(_) => panic!("the service saw only {hits:?} within 60 s of the last"),
            }
        }
        hits.extend(seen.try_iter());
        hits
    })
    .await
    .unwrap();
    drop(procs);

    let events: Vec<(String, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT kind, at, data FROM events WHERE kind LIKE 'circuit_%' ORDER BY at, id",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        ["circuit_opened", "circuit_half_open", "circuit_closed"],
        "one outage, one probe: {events:?}"
    );
    // The breaker's own times (the events are written right after each
    // change, a few milliseconds later): it opened at `reset_at - open_ms`
    // and closed at the stored row's `changed_at`, both taken before the
    // change committed.
    let reset_at = events[0].2["reset_at"].as_i64().unwrap();
    let opened_at = reset_at - 2000;
    let (state, closed_at): (String, i64) =
        sqlx::query_as("SELECT state, changed_at FROM breakers WHERE name = 'svc'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(state.contains("\"closed\""), "{state}");
    assert!(closed_at <= events[2].1 && closed_at > reset_at);
    let codes: Vec<u16> = hits.iter().map(|h| h.code).collect();
    assert_eq!(codes.iter().filter(|c| **c == 503).count(), 3, "{hits:?}");
    assert_eq!(hits.len(), runs, "one request per run: {hits:?}");

    // Open: nothing is sent; a request may still arrive only if its
    // process had admitted it before the breaker opened (one in flight per
    // process, and the opener's own was answered).
    let while_open: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.at > opened_at && h.at < reset_at)
        .collect();
    assert!(
        while_open.len() <= 2,
        "sent while open ({opened_at}..{reset_at}): {while_open:?}"
    );
    // Half-open: exactly one request, the probe, answered 200.
    let probes: Vec<&Hit> = hits
        .iter()
        .filter(|h| h.at >= reset_at && h.at <= closed_at)
        .collect();
    assert_eq!(probes.len(), 1, "exactly one probe: {probes:?}");
    assert_eq!(probes[0].code, 200);
    // Closed again: every process sends, soon. The others' runs deferred
    // to the probe's deadline (its 2 s timeout plus 1 s: 3 s after it went
    // out) were released by the close, and the processes, whose claim
    // gates held the connection's runs while the probe was out, learnt of
    // the close from its wake-up: they used to wait out that deadline.
    let mut back = Vec::new();
    for p in ["p1", "p2", "p3"] {
        let first = hits
            .iter()
            .filter(|h| h.at > closed_at && h.proc == p)
            .map(|h| h.at)
            .min()
            .unwrap_or_else(|| panic!("{p} sent nothing after the breaker closed: {hits:?}"));
        back.push(first - closed_at);
    }
    assert!(
        back.iter().all(|ms| *ms < 1_500),
        "every process sends again within 1.5 s of the close, long before the probe's deadline: {back:?} ms"
    );
    // The contest: runs the other processes deferred at the reset to the
    // probe's deadline (they asked while the probe was out), each released
    // by the close.
    let contested: i64 = sqlx::query_scalar(
        "SELECT count(*)::int8 FROM attempts WHERE retry_reason = 'circuit_open' AND eligible_at > $1",
    )
    .bind(reset_at)
    .fetch_one(store.pool())
    .await
    .unwrap();
    let released: i64 =
        sqlx::query_scalar("SELECT count(*)::int8 FROM events WHERE kind = 'deferral_released'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(
        released, contested,
        "every run deferred to the probe was released"
    );
    eprintln!(
        "{} requests; {} arrived while open (in flight at the open); probe at +{} ms after the reset; \
         closed at +{} ms; {contested} runs deferred while the probe was out, {released} released; \
         the processes sent again {back:?} ms after the close",
        hits.len(),
        while_open.len(),
        probes[0].at - reset_at,
        closed_at - reset_at
    );
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
