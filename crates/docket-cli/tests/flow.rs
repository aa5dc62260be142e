//! Concurrency keys across processes (docs/FLOW_CONTROL.md): three
//! `docket serve` processes on one PostgreSQL schema run a docket.toml HTTP
//! job with `concurrency_key` / `concurrency_limit = 2` against a real local
//! HTTP service that records how many requests per key it is serving at
//! once. The most it ever sees per key is exactly 2.
//!
//! Needs `DOCKET_TEST_POSTGRES_URL` (with `CI=true` a missing database is a
//! failure, not a skip). Works in a fresh schema, dropped at the end. Every
//! wait is bounded and polls the database (no event crosses the process
//! boundary).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_docket");

fn pg_url() -> Option<String> {
    match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: DOCKET_TEST_POSTGRES_URL must be set"
            );
            eprintln!("skipping: set DOCKET_TEST_POSTGRES_URL to run PostgreSQL tests");
            None
        }
    }
}

/// Per key: requests being served now, and the most ever at once.
#[derive(Default)]
struct Seen {
    now: HashMap<String, usize>,
    max: HashMap<String, usize>,
    total: usize,
}

/// A service on a loopback port: `POST /work/<key>` holds the request for
/// `hold`, counting it as in flight for `<key>`, then answers 200.
fn recording_service(hold: Duration) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let s = seen.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming().map_while(Result::ok) {
            let s = s.clone();
            std::thread::spawn(move || serve_one(sock, &s, hold));
        }
    });
    (format!("http://{addr}"), seen)
}

fn serve_one(mut sock: std::net::TcpStream, seen: &Mutex<Seen>, hold: Duration) {
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    let key = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.strip_prefix("/work/"))
        .unwrap_or("?")
        .to_string();
    {
        let mut s = seen.lock().unwrap();
        let n = s.now.entry(key.clone()).or_insert(0);
        *n += 1;
        let n = *n;
        let m = s.max.entry(key.clone()).or_insert(0);
        *m = (*m).max(n);
        s.total += 1;
    }
    // The work itself: the time a request holds its slot.
    std::thread::sleep(hold);
    {
        let mut s = seen.lock().unwrap();
        *s.now.get_mut(&key).unwrap() -= 1;
    }
    let _ = sock.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
    );
}

/// A `docket serve` process; killed on drop.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(db: &str, config: &str) -> Served {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--db",
            db,
            "--addr",
            "127.0.0.1:0",
            "--config",
            config,
            "--insecure-dev-no-auth",
        ])
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
    let mut early = Vec::new();
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not log its address within 30 s: {early:?}");
        };
        early.push(line.clone());
        if line.contains("docket API listening") {
            let addr = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            return Served {
                child,
                url: format!("http://{addr}"),
            };
        }
    }
}

fn docket(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("DOCKET_URL")
        .env_remove("DOCKET_TOKEN")
        .env_remove("DOCKET_DB")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_key_limit_holds_across_three_processes() {
    let Some(url) = pg_url() else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let sep = if url.contains('?') { '&' } else { '?' };
    let db = format!("{url}{sep}schema={schema}");
    let store = docket_store::postgres::PgStore::connect_with(&url, &schema)
        .await
        .expect("connect to the test database");
    let (service, seen) = recording_service(Duration::from_millis(150));
    let dir = std::env::temp_dir().join(format!("docket-flow-{schema}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("docket.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[connections.svc]
base_url = "{service}"

[jobs.work]
connection = "svc"
method = "POST"
path = "/work/{{{{ input.customer }}}}"
idempotency_key = "{{{{ input.id }}}}/work/v1"
body = {{ id = "{{{{ input.id }}}}" }}
concurrency_key = "{{{{ tenant }}}}-{{{{ input.customer }}}}"
concurrency_limit = 2
"#
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let servers: Vec<Served> = (0..3).map(|_| serve(&db, &config)).collect();

    // A trigger whose input lacks the key's field is refused, naming it.
    let (code, _, err) = docket(&["trigger", "work", r#"{"id":"x"}"#, "--url", &servers[0].url]);
    assert_ne!(code, 0);
    assert!(err.contains("input.customer"), "{err}");

    // The job is paused while the runs are queued, so that all the work is
    // available at once when it resumes: 3 customers x 10 runs, each
    // request held 150 ms, far more than 2 slots per key, over 24 worker
    // slots in 3 processes.
    let (code, out, err) = docket(&["jobs", "pause", "work", "--url", &servers[0].url]);
    assert_eq!(code, 0, "{out} {err}");
    let customers = ["c1", "c2", "c3"];
    let runs = 30;
    let mut ids = Vec::new();
    for i in 0..runs {
        let input = format!(r#"{{"id":"r{i}","customer":"{}"}}"#, customers[i % 3]);
        let server = &servers[i % 3].url;
        let (code, out, err) = docket(&["trigger", "work", &input, "--url", server, "--json"]);
        assert_eq!(code, 0, "{out} {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("trigger --json");
        let id = v["id"]
            .as_str()
            .or_else(|| v["run"]["id"].as_str())
            .unwrap_or_else(|| panic!("no run id in {v}"))
            .to_string();
        ids.push(id);
    }
    let (code, out, err) = docket(&["jobs", "resume", "work", "--url", &servers[1].url]);
    assert_eq!(code, 0, "{out} {err}");
    // Each run's end, waited for on the server's long poll (bounded), not
    // by polling the table.
    for id in &ids {
        let (code, out, err) = docket(&[
            "runs",
            "wait",
            id,
            "--timeout",
            "60s",
            "--url",
            &servers[0].url,
        ]);
        assert_eq!(
            code, 0,
            "run {id} did not complete within 60 s: {out} {err}"
        );
    }
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.total, runs, "one request per run");
        for c in customers {
            assert_eq!(
                s.max.get(c).copied(),
                Some(2),
                "most requests of {c} at once (limit 2 across 3 processes): {:?}",
                s.max
            );
        }
    }
    // Held runs spent no attempt: every run completed at its first.
    let attempts: i64 = sqlx::query_scalar("SELECT max(attempt)::int8 FROM runs")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(attempts, 1);
    drop(servers);
    let _ = sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(store.pool())
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
