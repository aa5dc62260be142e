//! Shared rate limits and circuit breakers across real `docket serve`
//! processes on one PostgreSQL schema (docs/RATE_LIMITS.md).
//!
//! Needs `DOCKET_TEST_POSTGRES_URL`; without it the test says so and passes,
//! except under `CI=true`, where it fails. Real time by necessity: the
//! processes share nothing but the database and the wall clock, so there is
//! no clock to inject across them. The rate test takes about 12 s.

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
    let mut child = Command::new(BIN)
        .args(["serve", "--db", db_url, "--addr", "127.0.0.1:0", "--config"])
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
/// plus one more burst for reservations honoured late and one request for
/// the window's edges), and the limit is used, not undershot.
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
    // 10 s at 20/s after a burst of 5: 205 tokens. Never more (the bound
    // above, and the total here). Fewer is the known under-use of
    // docs/RATE_LIMITS.md ("Accuracy"): a reservation picked up later than
    // its grace is lost. Measured 165 on a loaded 2-core machine; half the
    // tokens is the floor below which the limit would be broken, not merely
    // under-used.
    assert!(
        times.len() >= 103 && times.len() <= 216,
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
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await
        .unwrap();
}
