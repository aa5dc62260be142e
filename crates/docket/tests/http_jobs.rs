//! HTTP jobs from `docket.toml` against a real HTTP server spawned by each
//! test on 127.0.0.1, which misbehaves on demand: timeouts, 429 with
//! Retry-After, 5xx, 4xx, connection resets, and a call that commits and
//! then never answers. Time is the injected manual clock; the only real
//! waiting is a request timeout of one second where a test
//! needs the server to stay silent.

use docket::http::{http_date, BreakerPhase, HttpJobs, EXCERPT_BYTES};
use docket::{
    Actor, Clock, Docket, ErrorClass, History, LedgerState, ManualClock, Run, RunId, RunStatus,
    TerminalReason, Timestamp, TriggerOptions, WorkerConfig,
};
use docket_store::sqlite::SqliteStore;
use docket_store::ConnectionStatus;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const T0: Timestamp = Timestamp(1_767_225_600_000);
const SECRET: &str = "s3cr3t-token-value";

// ---------------------------------------------------------------- server

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: String,
}

/// How the server answers the next scripted request.
#[derive(Clone, Debug)]
enum Reply {
    Status(u16, Vec<(&'static str, String)>, String),
    /// Never answer (until the test ends).
    Hang,
    /// Close the connection with a TCP reset, without answering.
    Reset,
    /// Record a charge under the request's Idempotency-Key, then never
    /// answer: the effect landed, the caller times out.
    CommitThenHang,
    /// Answer 200 once the test calls [`TestServer::release`].
    Held,
}

fn status(code: u16) -> Reply {
    Reply::Status(code, vec![], format!("{{\"status\": {code}}}"))
}

#[derive(Default)]
struct ServerState {
    seen: Mutex<Vec<Seen>>,
    script: Mutex<VecDeque<Reply>>,
    charges: Mutex<HashMap<String, Value>>,
    stop: Notify,
    /// Notified (one permit) at each request's arrival.
    arrived: Notify,
    /// Lets a [`Reply::Held`] answer.
    release: Notify,
}

struct TestServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.state.stop.notify_waiters();
        self.accept.abort();
    }
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState::default());
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, st.clone()));
            }
        });
        TestServer {
            addr,
            state,
            accept,
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn push(&self, r: Reply) {
        self.state.script.lock().unwrap().push_back(r);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until the server has seen `n` requests.
    async fn wait_for_requests(&self, n: usize) {
        while self.seen().len() < n {
            tokio::time::timeout(Duration::from_secs(10), self.state.arrived.notified())
                .await
                .unwrap_or_else(|_| panic!("the server saw {:?}, not {n} requests", self.seen()));
        }
    }

    /// Lets the held request ([`Reply::Held`]) answer.
    fn release(&self) {
        self.state.release.notify_one();
    }

    /// Requests (method and path, reconcile lookups included) carrying the
    /// Idempotency-Key `key`.
    fn with_key(&self, key: &str) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.headers.get("idempotency-key").map(String::as_str) == Some(key))
            .map(|s| format!("{} {}", s.method, s.target))
            .collect()
    }

    /// Requests other than reconcile lookups (`GET /charges?…`).
    fn sends(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| !(s.method == "GET" && s.target.starts_with("/api/charges?")))
            .collect()
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string(),
    })
}

async fn respond(sock: &mut TcpStream, code: u16, headers: &[(&str, String)], body: &str) {
    let mut out = format!(
        "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = sock.write_all(out.as_bytes()).await;
    let _ = sock.shutdown().await;
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

async fn hang(state: &ServerState) {
    // Bounded: the test's own request timeout is far shorter.
    tokio::select! {
        _ = state.stop.notified() => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
}

async fn serve(mut sock: TcpStream, st: Arc<ServerState>) {
    let Some(req) = read_request(&mut sock).await else {
        return;
    };
    st.seen.lock().unwrap().push(req.clone());
    st.arrived.notify_one();
    let key = req
        .headers
        .get("idempotency-key")
        .cloned()
        .unwrap_or_default();
    let path = req.target.strip_prefix("/api").unwrap_or(&req.target);
    // Reconcile lookups answer from what was committed.
    if req.method == "GET" {
        if let Some(q) = path.strip_prefix("/charges?key=") {
            let found = st.charges.lock().unwrap().get(&percent_decode(q)).cloned();
            return match found {
                Some(c) => {
                    respond(
                        &mut sock,
                        200,
                        &[],
                        &json!({"found": true, "charge": c}).to_string(),
                    )
                    .await
                }
                None => respond(&mut sock, 404, &[], r#"{"found": false}"#).await,
            };
        }
    }
    let reply = st.script.lock().unwrap().pop_front();
    match reply {
        None => {
            // Echoes what it got — including the credential, which Docket
            // must redact from its evidence.
            let body: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
            let auth = req.headers.get("authorization").cloned();
            if path.starts_with("/charges") {
                st.charges.lock().unwrap().insert(key.clone(), body.clone());
            }
            let out = json!({"ok": true, "received": body, "auth_seen": auth});
            respond(&mut sock, 200, &[], &out.to_string()).await;
        }
        Some(Reply::Status(code, headers, body)) => respond(&mut sock, code, &headers, &body).await,
        Some(Reply::Hang) => hang(&st).await,
        Some(Reply::Reset) => {
            let _ = sock.set_zero_linger();
            drop(sock);
        }
        Some(Reply::Held) => {
            // Answered when the test releases it; a bounded wait (the
            // test's own request timeout is far shorter).
            if tokio::time::timeout(Duration::from_secs(30), st.release.notified())
                .await
                .is_ok()
            {
                respond(&mut sock, 200, &[], r#"{"held": true}"#).await;
            }
        }
        Some(Reply::CommitThenHang) => {
            let body: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
            st.charges.lock().unwrap().insert(key, body);
            hang(&st).await;
        }
    }
}

// ---------------------------------------------------------------- engine

struct Env {
    docket: Docket,
    clock: ManualClock,
    http: HttpJobs,
    server: TestServer,
    dir: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("docket-http-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secrets.toml"), format!("crm = \"{SECRET}\"\n")).unwrap();
    dir
}

/// The `crm` connection (credential from a secrets file; breaker settings
/// given) plus `jobs`, with `{base}` replaced by the server's URL.
fn config(server: &TestServer, breaker: &str, jobs: &str) -> String {
    format!(
        "[connections.crm]\nbase_url = \"{base}/api\"\nsecrets_file = \"secrets.toml\"\nsecret = \"crm\"\nbreaker = {breaker}\n\n{jobs}",
        base = server.base()
    )
    .replace("{base}", &server.base())
}

async fn setup_with(breaker: &str, jobs: &str) -> Env {
    let server = TestServer::start().await;
    let dir = temp_dir();
    let http = HttpJobs::from_toml(&config(&server, breaker, jobs), &dir).unwrap();
    let clock = ManualClock::new(T0);
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let docket = Docket::with_store(store, Arc::new(clock.clone()));
    http.install(&docket).unwrap();
    Env {
        docket,
        clock,
        http,
        server,
        dir,
    }
}

async fn setup(jobs: &str) -> Env {
    setup_with("{ failures = 0 }", jobs).await
}

impl Env {
    async fn trigger(&self, job: &str, input: Value) -> RunId {
        self.docket.trigger(job, input).await.unwrap().run.id
    }

    async fn tick(&self) -> usize {
        self.docket
            .worker(WorkerConfig {
                concurrency: 1,
                prefetch: 0,
                ..Default::default()
            })
            .tick()
            .await
            .unwrap()
    }

    async fn run(&self, id: RunId) -> Run {
        self.docket.get_run(id).await.unwrap()
    }

    async fn history(&self, id: RunId) -> History {
        self.docket.history(id).await.unwrap()
    }

    /// Moves the clock to the run's `run_after` and runs it once.
    async fn next_attempt(&self, id: RunId) -> Run {
        let r = self.run(id).await;
        assert_eq!(r.status, RunStatus::Pending, "{r:?}");
        if r.run_after > self.clock.now() {
            self.clock.set(r.run_after);
        }
        assert_eq!(self.tick().await, 1);
        self.run(id).await
    }

    async fn events(&self, id: RunId, kind: &str) -> Vec<Value> {
        self.history(id)
            .await
            .events
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.data)
            .collect()
    }
}

fn actor(comment: &str) -> Actor {
    Actor::new("ops", Some(comment.to_string()))
}

fn no_backoff() -> &'static str {
    "retry = { base_delay_ms = 1000, multiplier = 1.0, max_delay_ms = 1000, jitter_ms = 0, max_attempts = 5 }"
}

// ---------------------------------------------------------------- tests

/// Method, URL, headers and body come from templates over the run's input;
/// the credential comes from the secrets file; the Idempotency-Key header is
/// the business-intent key; the response is evidence without the secret.
#[tokio::test]
async fn a_templated_request_carries_the_intent_key_and_the_credential() {
    let env = setup(&format!(
        r#"
        [jobs.send-email]
        connection = "crm"
        method = "PUT"
        path = "/emails/{{{{ input.prospect_id | urlencode }}}}"
        idempotency_key = "{{{{ input.prospect_id }}}}/send-email/{{{{ input.campaign }}}}/v1"
        headers = {{ "X-Campaign" = "{{{{ input.campaign }}}}", "X-Region" = "{{{{ variables.region | default('eu') }}}}" }}
        body = {{ to = "{{{{ input.email }}}}", amount = "{{{{ input.amount }}}}", greeting = "Hello {{{{ input.name }}}}", fixed = [1, "two"] }}
        {}
        "#,
        no_backoff()
    ))
    .await;
    let id = env
        .trigger(
            "send-email",
            json!({"prospect_id": "prospect-7ca677ed25d3", "campaign": "campaign-9", "email": "ada@example.com", "amount": 12.5, "name": "Ada"}),
        )
        .await;
    assert_eq!(env.tick().await, 1);
    let run = env.run(id).await;
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");

    let seen = env.server.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "PUT");
    assert_eq!(s.target, "/api/emails/prospect-7ca677ed25d3");
    assert_eq!(
        s.headers["idempotency-key"],
        "prospect-7ca677ed25d3/send-email/campaign-9/v1"
    );
    assert_eq!(s.headers["authorization"], format!("Bearer {SECRET}"));
    assert_eq!(s.headers["x-campaign"], "campaign-9");
    assert_eq!(s.headers["x-region"], "eu");
    let body: Value = serde_json::from_str(&s.body).unwrap();
    assert_eq!(
        body,
        json!({"to": "ada@example.com", "amount": 12.5, "greeting": "Hello Ada", "fixed": [1, "two"]})
    );

    let out = run.output.unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"]["received"]["amount"], 12.5);

    let h = env.history(id).await;
    let ev: Vec<_> = h
        .events
        .iter()
        .filter(|e| e.kind == "http_response")
        .collect();
    assert_eq!(ev.len(), 1);
    let d = &ev[0].data;
    assert_eq!(d["status"], 200);
    assert_eq!(d["class"], "ok");
    assert_eq!(d["purpose"], "request");
    assert_eq!(d["connection"], "crm");
    assert_eq!(
        d["idempotency_key"],
        "prospect-7ca677ed25d3/send-email/campaign-9/v1"
    );
    assert!(d["duration_ms"].is_u64());
    assert!(d["body_excerpt"].as_str().unwrap().contains("[redacted]"));
    // The server echoed the credential: Docket redacted it everywhere it
    // writes — events, the action's stored result, the run's output.
    assert_eq!(out["body"]["auth_seen"], "Bearer [redacted]");
    let all = serde_json::to_string(&h).unwrap();
    assert!(!all.contains(SECRET), "{all}");
    assert_eq!(h.ledger[0].state, LedgerState::Committed);
}

/// A 503 then a 200: two requests with the SAME Idempotency-Key, the retry
/// scheduled by the job's policy, both responses recorded.
#[tokio::test]
async fn the_key_is_the_same_on_every_attempt() {
    let env = setup(&format!(
        r#"
        [jobs.charge]
        connection = "crm"
        path = "/charges"
        idempotency_key = "order-{{{{ input.order }}}}/charge/v1"
        body = {{ amount = "{{{{ input.amount }}}}" }}
        {}
        "#,
        no_backoff()
    ))
    .await;
    env.server.push(status(503));
    let id = env
        .trigger("charge", json!({"order": 7, "amount": 10}))
        .await;
    env.tick().await;
    let r = env.run(id).await;
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.run_after, T0.plus_millis(1_000));
    let att = env.history(id).await.attempts;
    assert_eq!(att[0].error_class, Some(ErrorClass::Unavailable));
    assert_eq!(att[0].retry_reason, Some(docket::RetryReason::Backoff));
    assert_eq!(att[0].retry_policy.as_deref(), Some("charge"));
    let r = env.next_attempt(id).await;
    assert_eq!(r.status, RunStatus::Completed);
    let keys: Vec<_> = env
        .server
        .sends()
        .iter()
        .map(|s| s.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys, ["order-7/charge/v1", "order-7/charge/v1"]);
    let statuses: Vec<_> = env
        .events(id, "http_response")
        .await
        .iter()
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(503), json!(200)]);
}

/// Every status class of the table, each from a real response.
#[tokio::test]
async fn responses_are_classified() {
    let env = setup(&format!(
        r#"
        [jobs.call]
        connection = "crm"
        path = "/call"
        {}
        "#,
        no_backoff()
    ))
    .await;
    let later = T0.plus_millis(90_000);
    let cases: Vec<(Reply, ErrorClass, Result<Timestamp, TerminalReason>)> = vec![
        (
            status(400),
            ErrorClass::InvalidInput,
            Err(TerminalReason::InvalidInput),
        ),
        (
            Reply::Status(422, vec![], r#"{"error": "email is invalid"}"#.into()),
            ErrorClass::InvalidInput,
            Err(TerminalReason::InvalidInput),
        ),
        (
            status(401),
            ErrorClass::Unauthorized,
            Err(TerminalReason::PermanentError),
        ),
        (
            status(403),
            ErrorClass::Unauthorized,
            Err(TerminalReason::PermanentError),
        ),
        (
            status(404),
            ErrorClass::NotFound,
            Err(TerminalReason::PermanentError),
        ),
        (
            status(418),
            ErrorClass::Permanent,
            Err(TerminalReason::PermanentError),
        ),
        (
            status(413),
            ErrorClass::ContentTooLarge,
            Err(TerminalReason::ContentTooLarge),
        ),
        (
            status(502),
            ErrorClass::Unavailable,
            Ok(T0.plus_millis(1_000)),
        ),
        (
            status(503),
            ErrorClass::Unavailable,
            Ok(T0.plus_millis(1_000)),
        ),
        (
            status(504),
            ErrorClass::Unavailable,
            Ok(T0.plus_millis(1_000)),
        ),
        (
            status(429),
            ErrorClass::RateLimited,
            Ok(T0.plus_millis(1_000)),
        ),
        (
            Reply::Status(429, vec![("retry-after", "120".into())], "slow down".into()),
            ErrorClass::RateLimited,
            Ok(T0.plus_millis(120_000)),
        ),
        (
            Reply::Status(
                429,
                vec![("retry-after", http_date(later))],
                "slow down".into(),
            ),
            ErrorClass::RateLimited,
            Ok(later),
        ),
        (
            Reply::Status(
                503,
                vec![("retry-after", "60".into())],
                "maintenance".into(),
            ),
            ErrorClass::Unavailable,
            Ok(T0.plus_millis(60_000)),
        ),
    ];
    for (i, (reply, class, expect)) in cases.into_iter().enumerate() {
        let label = format!("case {i}: {reply:?}");
        env.server.push(reply);
        let id = env.trigger("call", json!({"case": i})).await;
        assert_eq!(env.tick().await, 1, "{label}");
        let r = env.run(id).await;
        assert_eq!(r.last_error_class, Some(class), "{label}");
        match expect {
            Err(reason) => {
                assert_eq!(r.status, RunStatus::Failed, "{label}");
                assert_eq!(r.terminal_reason, Some(reason), "{label}");
                assert_eq!(r.attempt, 1, "{label}: no retry");
            }
            Ok(at) => {
                assert_eq!(r.status, RunStatus::Pending, "{label}");
                assert_eq!(r.run_after, at, "{label}");
            }
        }
        let ev = env.events(id, "http_response").await;
        assert_eq!(ev.len(), 1, "{label}");
        assert_eq!(ev[0]["class"], class.as_str(), "{label}");
    }
    // The 422's message quotes the provider's answer.
    let failed = env
        .docket
        .list_runs(docket::RunFilter {
            statuses: vec![RunStatus::Failed],
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(failed.iter().any(|r| r
        .last_error_message
        .as_deref()
        .unwrap_or_default()
        .contains("HTTP 422 from POST")
        && r.last_error_message
            .as_deref()
            .unwrap()
            .contains("email is invalid")));
    assert_eq!(env.server.seen().len(), 14);
}

/// No answer within the timeout → `timeout`, ledger `unknown`; without a
/// reconcile request the next attempt never repeats it blindly. A reset →
/// `network`, retried (the ledger says it failed before landing). A refused
/// connection → `network`.
#[tokio::test]
async fn timeouts_resets_and_refused_connections() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let env = setup(&format!(
        r#"
        [jobs.call]
        connection = "crm"
        path = "/call"
        timeout_ms = 1000
        {p}

        [jobs.dead]
        url = "http://{dead}/nothing-listens-here"
        timeout_ms = 2000
        {p}
        "#,
        p = no_backoff()
    ))
    .await;

    env.server.push(Reply::Hang);
    let hung = env.trigger("call", json!({"n": 1})).await;
    env.tick().await;
    let r = env.run(hung).await;
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.last_error_class, Some(ErrorClass::Timeout));
    let h = env.history(hung).await;
    assert_eq!(h.ledger[0].state, LedgerState::Unknown);
    let ev = env.events(hung, "http_response").await;
    assert_eq!(ev[0]["class"], "timeout");
    assert!(ev[0]["status"].is_null());
    let r = env.next_attempt(hung).await;
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.terminal_reason, Some(TerminalReason::PermanentError));
    assert!(r
        .last_error_message
        .unwrap()
        .contains("may or may not have happened"));
    assert_eq!(env.server.sends().len(), 1, "never repeated blindly");

    env.server.push(Reply::Reset);
    let reset = env.trigger("call", json!({"n": 2})).await;
    env.tick().await;
    let r = env.run(reset).await;
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.last_error_class, Some(ErrorClass::Network));
    assert_eq!(
        env.history(reset).await.ledger[0].state,
        LedgerState::FailedRetryable
    );
    let r = env.next_attempt(reset).await;
    assert_eq!(r.status, RunStatus::Completed);

    let refused = env.trigger("dead", json!({})).await;
    env.tick().await;
    let r = env.run(refused).await;
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.last_error_class, Some(ErrorClass::Network));
    let ev = env.events(refused, "http_response").await;
    assert_eq!(ev[0]["class"], "network");
}

const CHARGE_WITH_RECONCILE: &str = r#"
    [jobs.charge]
    connection = "crm"
    path = "/charges"
    timeout_ms = 1000
    idempotency_key = "{{ input.prospect_id }}/charge/{{ input.campaign }}/v1"
    body = { amount = "{{ input.amount }}" }
    retry = { base_delay_ms = 1000, multiplier = 1.0, max_delay_ms = 1000, jitter_ms = 0, max_attempts = 5 }
    [jobs.charge.reconcile]
    path = "/charges?key={{ idempotency_key | urlencode }}"
    timeout_ms = 10000
    found_when = "status == 200 && body.found == true"
"#;

/// The seed's case: the provider commits the charge, then the answer never
/// comes. The next attempt reconciles (asks by key), finds it, and does NOT
/// charge again.
#[tokio::test]
async fn committed_then_timed_out_is_reconciled_not_repeated() {
    let env = setup(CHARGE_WITH_RECONCILE).await;
    env.server.push(Reply::CommitThenHang);
    let id = env
        .trigger(
            "charge",
            json!({"prospect_id": "prospect-7ca677ed25d3", "campaign": "campaign-9", "amount": 49}),
        )
        .await;
    env.tick().await;
    let r = env.run(id).await;
    assert_eq!(r.last_error_class, Some(ErrorClass::Timeout));
    assert_eq!(env.history(id).await.ledger[0].state, LedgerState::Unknown);

    let r = env.next_attempt(id).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    let out = r.output.unwrap();
    assert_eq!(out["reconciled"], true);
    assert_eq!(out["body"]["charge"]["amount"], 49);
    let posts: Vec<_> = env
        .server
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1, "the charge was not repeated");
    let lookups: Vec<_> = env
        .server
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET")
        .collect();
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        lookups[0].target,
        "/api/charges?key=prospect-7ca677ed25d3/charge/campaign-9/v1"
    );
    let h = env.history(id).await;
    assert_eq!(h.ledger[0].state, LedgerState::Committed);
    assert!(h.events.iter().any(|e| e.kind == "action_reconciled"));
    let ev = env.events(id, "http_response").await;
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1]["purpose"], "reconcile");
    assert_eq!(ev[1]["finding"], "committed");
}

/// A timeout whose request never landed: reconcile finds nothing (404), so
/// the request is sent again with the same key.
#[tokio::test]
async fn timed_out_and_not_done_is_sent_again_with_the_same_key() {
    let env = setup(CHARGE_WITH_RECONCILE).await;
    env.server.push(Reply::Hang);
    let id = env
        .trigger(
            "charge",
            json!({"prospect_id": "p-1", "campaign": "c-1", "amount": 5}),
        )
        .await;
    env.tick().await;
    let r = env.next_attempt(id).await;
    assert_eq!(r.status, RunStatus::Completed);
    let posts: Vec<_> = env
        .server
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .map(|s| s.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(posts, ["p-1/charge/c-1/v1", "p-1/charge/c-1/v1"]);
    let findings: Vec<_> = env
        .events(id, "http_response")
        .await
        .iter()
        .map(|e| e["finding"].clone())
        .collect();
    assert_eq!(findings, [Value::Null, json!("not_done"), Value::Null]);
}

/// A reconcile lookup that cannot tell (503) leaves the outcome unknown: the
/// attempt fails `timeout` and reconciles again later; a JSON pointer rule
/// decides `found`.
#[tokio::test]
async fn reconcile_that_cannot_tell_tries_again_later() {
    let env = setup(
        r#"
        [jobs.charge]
        connection = "crm"
        path = "/pay"
        timeout_ms = 1000
        retry = { base_delay_ms = 1000, multiplier = 1.0, max_delay_ms = 1000, jitter_ms = 0 }
        [jobs.charge.reconcile]
        path = "/lookup/{{ idempotency_key | urlencode }}"
        timeout_ms = 10000
        found_pointer = "/payment/id"
        "#,
    )
    .await;
    env.server.push(Reply::CommitThenHang);
    env.server.push(status(503));
    env.server.push(Reply::Status(
        200,
        vec![],
        r#"{"payment": {"id": "pay_1"}}"#.into(),
    ));
    let id = env.trigger("charge", json!({})).await;
    env.tick().await;
    let r = env.next_attempt(id).await;
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.last_error_class, Some(ErrorClass::Timeout));
    assert!(r.last_error_message.unwrap().contains("still unknown"));
    let r = env.next_attempt(id).await;
    assert_eq!(r.status, RunStatus::Completed);
    assert_eq!(r.output.unwrap()["body"]["payment"]["id"], "pay_1");
    let methods: Vec<_> = env.server.seen().iter().map(|s| s.method.clone()).collect();
    assert_eq!(methods, ["POST", "GET", "GET"]);
}

/// Per-job overrides: 409 → `duplicate` (the action is already done: the
/// run completes, the ledger says committed), 404 → `ok`, 500 → `permanent`.
#[tokio::test]
async fn classification_is_configurable_per_job() {
    let env = setup(&format!(
        r#"
        [jobs.create]
        connection = "crm"
        path = "/contacts"
        classify = {{ 409 = "duplicate", 404 = "ok", 500 = "permanent" }}
        {}
        "#,
        no_backoff()
    ))
    .await;
    env.server.push(status(409));
    env.server.push(status(404));
    env.server.push(status(500));
    let a = env.trigger("create", json!({"n": 1})).await;
    env.tick().await;
    let b = env.trigger("create", json!({"n": 2})).await;
    env.tick().await;
    let c = env.trigger("create", json!({"n": 3})).await;
    env.tick().await;
    let ra = env.run(a).await;
    assert_eq!(ra.status, RunStatus::Completed);
    assert_eq!(ra.output.unwrap()["duplicate"], true);
    assert_eq!(env.history(a).await.ledger[0].state, LedgerState::Committed);
    assert_eq!(env.run(b).await.status, RunStatus::Completed);
    let rc = env.run(c).await;
    assert_eq!(rc.status, RunStatus::Failed);
    assert_eq!(rc.last_error_class, Some(ErrorClass::Permanent));
}

/// The breaker: two transient failures open it (event on the run that
/// opened it); a due run is then NOT sent but deferred to the reset time as
/// a `circuit_open` retry decision that spends no attempt; at the reset time
/// one run probes (half-open) and its success closes the breaker; a failing
/// probe opens it again.
#[tokio::test]
async fn the_breaker_opens_defers_half_opens_and_closes() {
    let env = setup_with(
        "{ failures = 2, window_ms = 60000, open_ms = 30000 }",
        r#"
        [jobs.sync]
        connection = "crm"
        path = "/sync"
        retry = { base_delay_ms = 600000, max_delay_ms = 600000, jitter_ms = 0, max_attempts = 5 }

        [jobs.sync-once]
        connection = "crm"
        path = "/sync"
        retry = { max_attempts = 1 }
        "#,
    )
    .await;
    env.server.push(status(503));
    env.server.push(status(503));
    let r1 = env.trigger("sync", json!({"n": 1})).await;
    env.tick().await;
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Closed);
    assert_eq!(env.http.breakers()[0].failures_in_window, 1);
    let r2 = env.trigger("sync", json!({"n": 2})).await;
    env.tick().await;
    let b = &env.http.breakers()[0];
    assert_eq!((b.state, b.times_opened), (BreakerPhase::Open, 1));
    let reset = T0.plus_millis(30_000);
    assert_eq!(b.reset_at, Some(reset));
    assert!(env.events(r1, "circuit_opened").await.is_empty());
    let opened = env.events(r2, "circuit_opened").await;
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0]["connection"], "crm");
    assert_eq!(opened[0]["failures"], 2);
    assert_eq!(opened[0]["cause"], "unavailable");
    assert_eq!(opened[0]["reset_at"], json!(reset));

    // Deferred: no request, no attempt spent (max_attempts = 1 still runs).
    let r3 = env.trigger("sync-once", json!({"n": 3})).await;
    env.clock.advance_millis(1_000);
    assert_eq!(env.tick().await, 1);
    assert_eq!(env.server.seen().len(), 2);
    let r = env.run(r3).await;
    assert_eq!(r.status, RunStatus::Pending);
    assert_eq!(r.run_after, reset);
    let att = env.history(r3).await.attempts;
    assert_eq!(att[0].retry_reason, Some(docket::RetryReason::CircuitOpen));
    assert_eq!(att[0].retry_policy.as_deref(), Some("circuit_breaker:crm"));
    assert_eq!(att[0].delay_ms, Some(29_000));
    assert_eq!(env.http.breakers()[0].deferred, 1);

    // Half-open at the reset time: r3 is the probe and closes the breaker.
    let r = env.next_attempt(r3).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    assert_eq!(env.server.seen().len(), 3);
    assert_eq!(env.events(r3, "circuit_half_open").await.len(), 1);
    assert_eq!(env.events(r3, "circuit_closed").await.len(), 1);
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Closed);
    let kinds: Vec<String> = env
        .history(r3)
        .await
        .events
        .into_iter()
        .map(|e| e.kind.to_string())
        .filter(|k| k.starts_with("circuit") || k == "http_response")
        .collect();
    assert_eq!(
        kinds,
        ["circuit_half_open", "http_response", "circuit_closed"]
    );

    // Open again, and a failing probe re-opens it.
    env.server.push(status(503));
    env.server.push(status(503));
    env.trigger("sync", json!({"n": 4})).await;
    env.tick().await;
    env.trigger("sync", json!({"n": 5})).await;
    env.tick().await;
    assert_eq!(env.http.breakers()[0].times_opened, 2);
    env.clock.advance_millis(30_000);
    env.server.push(Reply::Reset);
    let r6 = env.trigger("sync", json!({"n": 6})).await;
    env.tick().await;
    let reopened = env.events(r6, "circuit_opened").await;
    assert_eq!(reopened.len(), 1, "{:?}", env.history(r6).await.events);
    assert_eq!(reopened[0]["from"], "half_open");
    assert_eq!(reopened[0]["cause"], "network");
    let b = &env.http.breakers()[0];
    assert_eq!((b.state, b.times_opened), (BreakerPhase::Open, 3));
}

/// An outage of many poll intervals costs O(1) writes per run, not one
/// deferral per run per open period: while the breaker is open this process
/// claims one run of the connection per open period (its deferral is the
/// recorded decision) and then none until the reset time, where one run
/// probes. 40 runs, a 120 s outage with the breaker open 10 s at a time, a
/// worker claiming up to 8 runs at a time and turning every second: at most
/// one deferral per run and about two claimed runs per open period (a probe
/// and a deferral) — before, every due run was claimed and deferred again in
/// every open period.
#[tokio::test]
async fn an_outage_costs_each_run_at_most_one_deferral() {
    let env = setup_with(
        "{ failures = 2, window_ms = 60000, open_ms = 10000 }",
        &format!(
            "[jobs.sync]\nconnection = \"crm\"\npath = \"/sync\"\n{}",
            "retry = { base_delay_ms = 1000, multiplier = 1.0, max_delay_ms = 1000, jitter_ms = 0, max_attempts = 100 }"
        ),
    )
    .await;
    let failing = |env: &Env| {
        let mut script = env.server.state.script.lock().unwrap();
        if script.is_empty() {
            script.push_back(status(503));
        }
    };
    let mut ids = Vec::new();
    for n in 0..2 {
        failing(&env);
        ids.push(env.trigger("sync", json!({ "n": n })).await);
        env.tick().await;
    }
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Open);
    for n in 2..40 {
        ids.push(env.trigger("sync", json!({ "n": n })).await);
    }
    // The outage: every request fails; a worker that claims up to 8 runs at
    // a time turns every second.
    let wide = env.docket.worker(WorkerConfig {
        concurrency: 8,
        prefetch: 8,
        ..Default::default()
    });
    let mut turns = 0;
    for _ in 0..120 {
        env.clock.advance_millis(1_000);
        for _ in 0..100 {
            failing(&env);
            turns += 1;
            if wide.tick().await.unwrap() == 0 {
                break;
            }
        }
    }
    let opened = env.http.breakers()[0].times_opened;
    assert!(
        opened >= 12,
        "the breaker re-opened at each probe: {opened}"
    );
    let mut deferrals = 0;
    let mut claimed = 0;
    let mut most = 0;
    for id in &ids {
        let h = env.history(*id).await;
        let deferred = h
            .attempts
            .iter()
            .filter(|a| a.outcome == "deferred")
            .count();
        // A deferral spends no attempt budget.
        assert_eq!(h.run.attempts_forgiven as usize, deferred);
        most = most.max(deferred);
        deferrals += deferred;
        claimed += h.attempts.len();
    }
    let events = env
        .docket
        .store()
        .events(docket_store::EventFilter {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    println!("{opened} open periods, {turns} worker turns: {deferrals} deferrals (at most {most} per run), {claimed} attempts, {events} events");
    assert!(most <= 1, "{most} deferrals of one run in one outage");
    assert!(
        deferrals as u64 <= opened && claimed as u64 <= 2 * opened + 2,
        "{deferrals} deferrals and {claimed} attempts in {opened} open periods ({turns} worker turns)"
    );
    // The service is back: at the next reset one run probes and closes the
    // breaker, and every run completes.
    env.server.state.script.lock().unwrap().clear();
    env.clock.advance_millis(10_000);
    for _ in 0..200 {
        if wide.tick().await.unwrap() == 0 {
            break;
        }
    }
    env.clock.advance_millis(1_000);
    for _ in 0..200 {
        if wide.tick().await.unwrap() == 0 {
            break;
        }
    }
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Closed);
    for id in &ids {
        assert_eq!(env.run(*id).await.status, RunStatus::Completed, "{id}");
    }
}

/// A disabled or expired connection fails its runs at once with
/// `connection_unresolved` — before any request — and says to re-authorize
/// and retry; enabling it and retrying the run (with new variables) works.
/// States are per tenant and audited.
#[tokio::test]
async fn disabled_or_expired_connections_fail_before_any_request() {
    let env = setup(
        r#"
        [jobs.sync]
        connection = "crm"
        path = "/sync"
        headers = { "X-Region" = "{{ variables.region | default('eu') }}" }
        "#,
    )
    .await;
    env.http
        .disable_connection("default", "crm", &actor("rotating keys"))
        .await
        .unwrap();
    let a = env.trigger("sync", json!({})).await;
    env.tick().await;
    let r = env.run(a).await;
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(
        r.terminal_reason,
        Some(TerminalReason::ConnectionUnresolved)
    );
    assert_eq!(r.attempt, 1);
    let msg = r.last_error_message.unwrap();
    assert!(msg.contains("connection `crm` is disabled"), "{msg}");
    assert!(
        msg.contains("enable it (`docket connections enable crm`), then retry the run"),
        "{msg}"
    );
    assert!(msg.contains("rotating keys"), "{msg}");

    env.http
        .expire_connection("default", "crm", &actor("token expired"))
        .await
        .unwrap();
    let b = env.trigger("sync", json!({})).await;
    env.tick().await;
    let r = env.run(b).await;
    assert_eq!(
        r.terminal_reason,
        Some(TerminalReason::ConnectionUnresolved)
    );
    let msg = r.last_error_message.unwrap();
    assert!(msg.contains("expired credentials"), "{msg}");
    assert!(msg.contains("re-authorize it, enable it"), "{msg}");
    assert!(env.server.seen().is_empty(), "no request was sent");

    // Another tenant's state is its own.
    let other = env
        .docket
        .trigger_with(
            "sync",
            json!({}),
            TriggerOptions {
                tenant: Some("acme".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .run
        .id;
    env.tick().await;
    assert_eq!(env.run(other).await.status, RunStatus::Completed);
    assert_eq!(env.server.seen().len(), 1);

    let info = env.http.connection("default", "crm").await.unwrap();
    assert_eq!(info.status, ConnectionStatus::Expired);
    assert_eq!(info.changed_by.as_deref(), Some("ops"));
    assert!(info.credential_available);
    assert_eq!(info.jobs, ["sync"]);
    let shown = serde_json::to_string(&env.http.connections("default").await.unwrap()).unwrap();
    assert!(
        !shown.contains(SECRET) && shown.contains("secrets.toml"),
        "{shown}"
    );

    env.http
        .enable_connection("default", "crm", &actor("re-authorized"))
        .await
        .unwrap();
    env.docket
        .retry(b, Some(json!({"region": "us"})), actor("connection fixed"))
        .await
        .unwrap();
    env.tick().await;
    assert_eq!(env.run(b).await.status, RunStatus::Completed);
    let seen = env.server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].headers["x-region"], "us",
        "variables reach templates"
    );

    let audit = env.http.connection_audit("default", "crm").await.unwrap();
    let trail: Vec<_> = audit
        .iter()
        .map(|a| (a.to_status, a.comment.clone().unwrap()))
        .collect();
    assert_eq!(
        trail,
        [
            (ConnectionStatus::Disabled, "rotating keys".to_string()),
            (ConnectionStatus::Expired, "token expired".to_string()),
            (ConnectionStatus::Enabled, "re-authorized".to_string()),
        ]
    );
    assert!(env
        .http
        .disable_connection("default", "nope", &actor("x"))
        .await
        .unwrap_err()
        .to_string()
        .contains("unknown connection `nope`"));
}

/// The state lives in the database: a new process (a new store handle, a
/// new HttpJobs) on the same file still refuses the disabled connection.
/// A credential that cannot be read is unresolved too, naming its source.
#[tokio::test]
async fn connection_state_survives_a_restart_and_missing_credentials_are_unresolved() {
    let server = TestServer::start().await;
    let dir = temp_dir();
    let db = dir.join("docket.db");
    let text = format!(
        "{}\n[connections.billing]\nbase_url = \"{}\"\ntoken_env = \"DOCKET_HTTP_TEST_SURELY_UNSET\"\n\n[jobs.bill]\nconnection = \"billing\"\npath = \"/bill\"\n",
        config(&server, "{ failures = 0 }", "[jobs.sync]\nconnection = \"crm\"\npath = \"/sync\"\n"),
        server.base()
    );
    let clock = ManualClock::new(T0);
    {
        let store = Arc::new(SqliteStore::open(db.to_str().unwrap()).unwrap());
        let docket = Docket::with_store(store, Arc::new(clock.clone()));
        let http = HttpJobs::from_toml(&text, &dir).unwrap();
        http.install(&docket).unwrap();
        http.disable_connection("default", "crm", &actor("maintenance"))
            .await
            .unwrap();
    }
    let store = Arc::new(SqliteStore::open(db.to_str().unwrap()).unwrap());
    let docket = Docket::with_store(store, Arc::new(clock.clone()));
    let http = HttpJobs::from_toml(&text, &dir).unwrap();
    http.install(&docket).unwrap();
    let a = docket.trigger("sync", json!({})).await.unwrap().run.id;
    let b = docket.trigger("bill", json!({})).await.unwrap().run.id;
    let w = docket.worker(WorkerConfig {
        concurrency: 2,
        ..Default::default()
    });
    w.tick().await.unwrap();
    let ra = docket.get_run(a).await.unwrap();
    assert_eq!(
        ra.terminal_reason,
        Some(TerminalReason::ConnectionUnresolved)
    );
    assert!(ra.last_error_message.unwrap().contains("maintenance"));
    let rb = docket.get_run(b).await.unwrap();
    assert_eq!(
        rb.terminal_reason,
        Some(TerminalReason::ConnectionUnresolved)
    );
    let msg = rb.last_error_message.unwrap();
    assert!(
        msg.contains("environment variable DOCKET_HTTP_TEST_SURELY_UNSET is not set"),
        "{msg}"
    );
    assert!(
        msg.contains("provide the credential where the worker runs"),
        "{msg}"
    );
    let info = http.connection("default", "billing").await.unwrap();
    assert!(!info.credential_available);
    assert!(server.seen().is_empty());
    drop(docket);
    let _ = std::fs::remove_dir_all(&dir);
}

const CONDITIONS: &str = r#"
    [jobs.notify]
    connection = "crm"
    path = "/notify"
    when = "input.amount > 0"

    [jobs.refund]
    connection = "crm"
    path = "/refunds"
    body = { amount = "{{ input.amount }}", order = "{{ input.order }}" }
    approval = "input.amount > 1000"

    [jobs.refund-soft]
    connection = "crm"
    path = "/refunds"
    body = { amount = "{{ input.amount }}" }
    approval = "input.amount > 1000"
    on_reject = "complete"
"#;

/// `when` false → the step is skipped (not failed) and the run completes
/// without a request; a condition over a missing field fails `invalid_input`
/// naming it.
#[tokio::test]
async fn when_conditions_skip_the_request() {
    let env = setup(CONDITIONS).await;
    let zero = env.trigger("notify", json!({"amount": 0})).await;
    env.tick().await;
    let r = env.run(zero).await;
    assert_eq!(r.status, RunStatus::Completed);
    assert_eq!(r.output.as_ref().unwrap()["skipped"], true);
    let skipped = env.events(zero, "step_skipped").await;
    assert_eq!(skipped[0]["step"], "notify");
    assert!(skipped[0]["reason"]
        .as_str()
        .unwrap()
        .contains("input.amount > 0"));
    assert!(env.server.seen().is_empty());

    let five = env.trigger("notify", json!({"amount": 5})).await;
    env.tick().await;
    assert_eq!(env.run(five).await.status, RunStatus::Completed);
    assert_eq!(env.server.seen().len(), 1);

    let missing = env.trigger("notify", json!({"total": 5})).await;
    env.tick().await;
    let r = env.run(missing).await;
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.terminal_reason, Some(TerminalReason::InvalidInput));
    assert!(r.last_error_message.unwrap().contains("`input.amount`"));
    assert_eq!(env.server.seen().len(), 1);
}

/// Only a request about to go out needs its connection: with the
/// connection disabled, a false `when` still skips and completes, and an
/// approval gate still asks first; the approved request then fails
/// `connection_unresolved` before anything is sent.
#[tokio::test]
async fn conditions_come_before_the_connection() {
    let env = setup(CONDITIONS).await;
    env.http
        .disable_connection("default", "crm", &actor("maintenance"))
        .await
        .unwrap();
    let zero = env.trigger("notify", json!({"amount": 0})).await;
    env.tick().await;
    let r = env.run(zero).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    assert_eq!(r.output.as_ref().unwrap()["skipped"], true);

    let big = env
        .trigger("refund", json!({"amount": 5000, "order": "o-1"}))
        .await;
    env.tick().await;
    assert_eq!(env.run(big).await.status, RunStatus::NeedsInput);
    env.docket
        .approve(big, Value::Null, docket::Actor::new("ops", None))
        .await
        .unwrap();
    env.tick().await;
    let r = env.run(big).await;
    assert_eq!(
        r.terminal_reason,
        Some(TerminalReason::ConnectionUnresolved),
        "{r:?}"
    );
    assert!(env.server.seen().is_empty(), "nothing was sent");
}

/// `approval` true → `needs_input` with the request it would send (no
/// credential in it); approve → sent; reject → failed `rejected` or, with
/// `on_reject = "complete"`, completed without sending. Below the threshold
/// it is sent at once.
#[tokio::test]
async fn approval_gates_the_request() {
    let env = setup(CONDITIONS).await;
    let small = env
        .trigger("refund", json!({"amount": 500, "order": "o-1"}))
        .await;
    env.tick().await;
    assert_eq!(env.run(small).await.status, RunStatus::Completed);
    assert_eq!(env.server.seen().len(), 1);

    let big = env
        .trigger("refund", json!({"amount": 5000, "order": "o-2"}))
        .await;
    env.tick().await;
    let r = env.run(big).await;
    assert_eq!(r.status, RunStatus::NeedsInput);
    let stored = r.input_request.unwrap();
    assert_eq!(stored["name"], "approval");
    let ask = stored["request"].clone();
    let ask_text = ask.to_string();
    assert_eq!(ask["request"]["method"], "POST");
    assert!(ask["request"]["url"]
        .as_str()
        .unwrap()
        .ends_with("/api/refunds"));
    assert_eq!(
        ask["request"]["body"],
        json!({"amount": 5000, "order": "o-2"})
    );
    assert_eq!(ask["condition"], "input.amount > 1000");
    assert!(!ask_text.contains(SECRET) && !ask_text.to_lowercase().contains("authorization"));
    assert_eq!(env.server.seen().len(), 1, "nothing sent while waiting");
    env.docket
        .approve(big, json!({"ok": true}), actor("looks right"))
        .await
        .unwrap();
    env.tick().await;
    assert_eq!(env.run(big).await.status, RunStatus::Completed);
    let seen = env.server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        serde_json::from_str::<Value>(&seen[1].body).unwrap(),
        json!({"amount": 5000, "order": "o-2"})
    );

    let rejected = env
        .trigger("refund", json!({"amount": 7000, "order": "o-3"}))
        .await;
    env.tick().await;
    env.docket
        .reject(rejected, json!({}), actor("fraud"))
        .await
        .unwrap();
    env.tick().await;
    let r = env.run(rejected).await;
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.terminal_reason, Some(TerminalReason::Rejected));

    let soft = env.trigger("refund-soft", json!({"amount": 7000})).await;
    env.tick().await;
    env.docket
        .reject(soft, json!({"why": "no"}), actor("no"))
        .await
        .unwrap();
    env.tick().await;
    let r = env.run(soft).await;
    assert_eq!(r.status, RunStatus::Completed);
    let out = r.output.unwrap();
    assert_eq!(
        (out["sent"].clone(), out["rejected"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(
        env.server.seen().len(),
        2,
        "rejected requests were never sent"
    );
}

/// Input that fails the job's JSON Schema, or that a template needs and
/// lacks, fails the run `invalid_input` naming the field — at once, with no
/// request and no retry.
#[tokio::test]
async fn invalid_input_names_the_field() {
    let env = setup(
        r#"
        [jobs.send-email]
        connection = "crm"
        path = "/emails"
        body = { to = "{{ input.email }}" }
        [jobs.send-email.input_schema]
        type = "object"
        required = ["email", "amount"]
        properties = { email = { type = "string" }, amount = { type = "number" } }

        [jobs.lookup]
        connection = "crm"
        method = "GET"
        path = "/accounts/{{ input.account }}"
        "#,
    )
    .await;
    let cases = [
        (
            "send-email",
            json!({"amount": 3}),
            "`input.email` is required",
        ),
        (
            "send-email",
            json!({"email": "a@b.co", "amount": "3"}),
            "`input.amount`",
        ),
        (
            "lookup",
            json!({"acount": "x"}),
            "`input.account` is undefined",
        ),
    ];
    for (job, input, want) in cases {
        let id = env.trigger(job, input).await;
        env.tick().await;
        let r = env.run(id).await;
        assert_eq!(r.status, RunStatus::Failed, "{job}");
        assert_eq!(
            r.terminal_reason,
            Some(TerminalReason::InvalidInput),
            "{job}"
        );
        assert_eq!(r.attempt, 1);
        let msg = r.last_error_message.unwrap();
        assert!(msg.contains(want), "{job}: {msg}");
    }
    assert!(env.server.seen().is_empty());
}

/// Evidence is bounded: a 10 KiB error body leaves a ≤ 2 KiB excerpt in
/// the event and a short quote in the message.
#[tokio::test]
async fn evidence_is_bounded() {
    let env = setup(
        r#"
        [jobs.call]
        connection = "crm"
        path = "/call"
        "#,
    )
    .await;
    env.server
        .push(Reply::Status(422, vec![], "x".repeat(10 * 1024)));
    let id = env.trigger("call", json!({})).await;
    env.tick().await;
    let ev = env.events(id, "http_response").await;
    assert!(ev[0]["body_excerpt"].as_str().unwrap().len() <= EXCERPT_BYTES);
    assert_eq!(ev[0]["body_truncated"], true);
    assert_eq!(ev[0]["body_bytes"], 10 * 1024);
    assert!(env.run(id).await.last_error_message.unwrap().len() < 500);
}

/// The repository's example `docket.toml` loads.
#[test]
fn the_example_docket_toml_loads() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docket.toml");
    let http = HttpJobs::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(http.job_names().contains(&"send-email".to_string()));
    assert!(http.job_names().contains(&"refund".to_string()));
    assert!(http.job_names().contains(&"invoice-flow".to_string()));
    assert_eq!(http.connection_names(), ["crm", "payments"]);
    // It sets retention: 7 days for completed runs, 30 for send-email's.
    let keep = http.retention();
    let day = 86_400_000;
    assert_eq!(
        keep.window("refund", docket::RunStatus::Completed),
        Some(7 * day)
    );
    assert_eq!(
        keep.window("send-email", docket::RunStatus::Completed),
        Some(30 * day)
    );
    assert_eq!(keep.ledger_window(), 90 * day);
}

/// `{"a": [{"a": [… 0 …]}]}` nested `depth` levels.
fn nested(depth: usize) -> Value {
    let mut v = json!(0);
    for i in 0..depth {
        v = if i % 2 == 0 {
            json!([v])
        } else {
            json!({ "a": v })
        };
    }
    v
}

/// Issue 11: a response nested 127 levels deep was stored inside
/// `{"status", "body"}` (128 levels) and could never be read back, which
/// broke the run and every list of the tenant. Now a response whose result
/// would nest deeper than the store keeps fails the run `content_too_large`
/// naming the depth (the ledger records the request as committed); one the
/// parser cannot read as JSON (128+ levels) is kept as text. Every run reads
/// back, alone and in a list.
#[tokio::test]
async fn a_deeply_nested_response_is_refused_with_its_depth_or_kept() {
    let env = setup(&format!(
        r#"
        [jobs.call]
        connection = "crm"
        path = "/call"
        idempotency_key = "call-{{{{ input.depth }}}}"
        {}
        "#,
        no_backoff()
    ))
    .await;
    let max = docket_store::MAX_JSON_DEPTH;
    for depth in [10, max - 1, max, 126, 127, 128, 129, 1_000] {
        env.server
            .push(Reply::Status(200, vec![], nested(depth).to_string()));
        let id = env.trigger("call", json!({ "depth": depth })).await;
        assert_eq!(env.tick().await, 1);
        let run = env.run(id).await;
        let ledger = env.docket.store().ledger_for_run(id).await.unwrap();
        assert_eq!(ledger[0].state, docket_store::LedgerState::Committed);
        // The stored result is `{"status": 200, "body": …}`: one level more.
        if depth < max {
            assert_eq!(run.status, RunStatus::Completed, "{depth}: {run:?}");
            assert_eq!(ledger[0].result.as_ref().unwrap()["body"], nested(depth));
        } else if depth <= 127 {
            assert_eq!(run.status, RunStatus::Failed, "{depth}: {run:?}");
            assert_eq!(run.terminal_reason, Some(TerminalReason::ContentTooLarge));
            assert_eq!(run.attempt, 1);
            let msg = run.last_error_message.unwrap();
            assert!(
                msg.contains(&format!("`result` nests {} levels", depth + 1))
                    && msg.contains(&format!("at most {max}")),
                "{depth}: {msg}"
            );
        } else {
            assert_eq!(run.status, RunStatus::Completed, "{depth}: {run:?}");
            assert!(ledger[0].result.as_ref().unwrap()["body"].is_string());
        }
        assert_eq!(env.history(id).await.run.id, id);
    }
    let all = env
        .docket
        .list_runs(docket_store::RunFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 8);
    assert!(all.iter().all(|r| !serde_json::to_string(r)
        .unwrap()
        .contains("docket_undecodable")));
}

// ------------------------------------------------- shared limits (issue 14)

/// A second "process": another Docket with its own `HttpJobs` (its own
/// breakers) on the same store and clock.
fn second(env: &Env, store: docket_store::DynStore, config_text: &str) -> (Docket, HttpJobs) {
    let http = HttpJobs::from_toml(config_text, &env.dir).unwrap();
    let docket = Docket::with_store(store, Arc::new(env.clock.clone()));
    http.install(&docket).unwrap();
    (docket, http)
}

async fn tick_on(d: &Docket) -> usize {
    d.worker(WorkerConfig {
        concurrency: 1,
        prefetch: 0,
        ..Default::default()
    })
    .tick()
    .await
    .unwrap()
}

const SHARED_JOBS: &str = r#"
        [jobs.sync]
        connection = "crm"
        path = "/sync"
        retry = { base_delay_ms = 600000, max_delay_ms = 600000, jitter_ms = 0, max_attempts = 5 }
        "#;

/// Two Docket instances ("processes", each with its own breakers) on one
/// store: failures in A open the breaker, B stops sending at once (its
/// next run is deferred without a request), and at the reset time A and B
/// both try and exactly one probe goes out and closes it for both.
/// Two "processes" on one store: A (the `Env`) and B, each with its own
/// breakers, sharing the clock; the breaker opens after 2 failures for
/// 30 s.
async fn two_processes(
    store_a: docket_store::DynStore,
    store_b: docket_store::DynStore,
) -> (Env, Docket, HttpJobs) {
    let server = TestServer::start().await;
    let dir = temp_dir();
    let text = config(
        &server,
        "{ failures = 2, window_ms = 60000, open_ms = 30000 }",
        SHARED_JOBS,
    );
    let http = HttpJobs::from_toml(&text, &dir).unwrap();
    let clock = ManualClock::new(T0);
    let docket = Docket::with_store(store_a, Arc::new(clock.clone()));
    http.install(&docket).unwrap();
    let env = Env {
        docket,
        clock,
        http,
        server,
        dir,
    };
    let (b, http_b) = second(&env, store_b, &text);
    (env, b, http_b)
}

/// Two handles on one SQLite file, as two processes would open it.
fn sqlite_pair() -> (docket_store::DynStore, docket_store::DynStore, PathBuf) {
    let dir = temp_dir();
    let path = dir.join("shared.db").to_str().unwrap().to_string();
    let a: docket_store::DynStore = Arc::new(SqliteStore::open(&path).unwrap());
    let b: docket_store::DynStore = Arc::new(SqliteStore::open(&path).unwrap());
    (a, b, dir)
}

/// Two pools on one fresh PostgreSQL schema, as two processes would open
/// it (`None`: no database, the test is skipped).
async fn pg_pair() -> Option<(docket_store::DynStore, docket_store::DynStore)> {
    let base = pg_url()?;
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let a: docket_store::DynStore = Arc::new(
        docket_store::postgres::PgStore::connect_with(&base, &schema)
            .await
            .unwrap(),
    );
    let b: docket_store::DynStore = Arc::new(
        docket_store::postgres::PgStore::connect_with(&base, &schema)
            .await
            .unwrap(),
    );
    Some((a, b))
}

async fn a_breaker_opened_in_one_process_stops_the_other(
    store_a: docket_store::DynStore,
    store_b: docket_store::DynStore,
) {
    let (env, b, http_b) = two_processes(store_a, store_b).await;

    env.server.push(status(503));
    env.server.push(status(503));
    env.trigger("sync", json!({"n": 1})).await;
    env.tick().await;
    env.trigger("sync", json!({"n": 2})).await;
    env.tick().await;
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Open);
    // B has not seen it yet (its copy), but its next run asks the store.
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::Closed);
    let r3 = b.trigger("sync", json!({"n": 3})).await.unwrap().run.id;
    assert_eq!(tick_on(&b).await, 1);
    assert_eq!(env.server.seen().len(), 2, "B sent nothing");
    let reset = T0.plus_millis(30_000);
    let r = env.run(r3).await;
    assert_eq!((r.status, r.run_after), (RunStatus::Pending, reset));
    assert_eq!(
        env.history(r3).await.attempts[0].retry_reason,
        Some(docket::RetryReason::CircuitOpen)
    );
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::Open);
    // B's claim gate now holds its runs back: no more claims until reset.
    b.trigger("sync", json!({"n": 4})).await.unwrap();
    assert_eq!(tick_on(&b).await, 0);

    // At the reset time both processes claim a run; one probe goes out.
    // The service holds the probe's answer: the other process's run is
    // deferred while the probe is out (without the hold, a probe that
    // closed the breaker before the other process asked let that process
    // send normally, which is right, but not what this test is about).
    env.clock.set(reset);
    env.trigger("sync", json!({"n": 5})).await;
    env.server.push(Reply::Held);
    let tick_a = env.tick();
    let tick_b = tick_on(&b);
    tokio::pin!(tick_a, tick_b);
    let (first, a_first) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            n = &mut tick_a => (n, true),
            n = &mut tick_b => (n, false),
        }
    })
    .await
    .expect("the process that did not probe deferred its run while the probe was out");
    assert_eq!(first, 1, "it claimed its run");
    env.server.wait_for_requests(3).await;
    assert_eq!(env.server.seen().len(), 3, "exactly one probe");
    env.server.release();
    let second = if a_first { tick_b.await } else { tick_a.await };
    assert_eq!(second, 1);
    assert_eq!(env.server.seen().len(), 3, "exactly one probe");
    let mut half_open = 0;
    let mut closed = 0;
    let mut probe_deferred = 0;
    for id in env.docket.list_runs(Default::default()).await.unwrap() {
        half_open += env.events(id.id, "circuit_half_open").await.len();
        closed += env.events(id.id, "circuit_closed").await.len();
        probe_deferred += env
            .history(id.id)
            .await
            .attempts
            .iter()
            .filter(|a| {
                a.retry_reason == Some(docket::RetryReason::CircuitOpen)
                    && a.eligible_at > Some(reset)
            })
            .count();
    }
    assert_eq!((half_open, closed, probe_deferred), (1, 1, 1));
    env.http.refresh_breakers().await;
    http_b.refresh_breakers().await;
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Closed);
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::Closed);
    let limits = http_b.limits("crm").await.unwrap();
    assert_eq!(limits.breaker.state, BreakerPhase::Closed);
    assert_eq!(limits.breaker.times_opened, 1);
}

#[tokio::test]
async fn a_breaker_opened_in_one_process_stops_the_other_sqlite() {
    let (a, b, _dir) = sqlite_pair();
    a_breaker_opened_in_one_process_stops_the_other(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_in_one_process_stops_the_other_postgres() {
    let Some((a, b)) = pg_pair().await else {
        return;
    };
    a_breaker_opened_in_one_process_stops_the_other(a, b).await;
}

/// A run another process deferred to a half-open probe's deadline comes
/// back as soon as the probe closes the breaker, not at the deadline: the
/// close's transaction makes it due at once (`deferral_released`), and the
/// deferring process, whose claim gate held the connection's runs while
/// the probe was out, learns of the close from the store's wake-up
/// (PostgreSQL's NOTIFY, SQLite's `data_version`) and runs it. The clock
/// stays at the reset time, 11 s short of the deadline, and the worker's
/// poll is an hour: only the wake-up can bring it back.
async fn a_run_deferred_to_the_probe_returns_when_the_probe_closes_the_breaker(
    store_a: docket_store::DynStore,
    store_b: docket_store::DynStore,
) {
    let (env, b, http_b) = two_processes(store_a, store_b).await;
    env.server.push(status(503));
    env.server.push(status(503));
    for n in 0..2 {
        env.trigger("sync", json!({ "n": n })).await;
        assert_eq!(env.tick().await, 1);
    }
    assert_eq!(env.http.breakers()[0].state, BreakerPhase::Open);

    // At the reset time A probes; the service holds the answer.
    let reset = T0.plus_millis(30_000);
    env.clock.set(reset);
    env.server.push(Reply::Held);
    let probe_run = env.trigger("sync", json!({ "n": "probe" })).await;
    let a = env.docket.clone();
    let probe = tokio::spawn(async move { tick_on(&a).await });
    env.server.wait_for_requests(3).await;
    // B's run is deferred to the probe's deadline: its 10 s request timeout
    // plus 1 s.
    let deadline = reset.plus_millis(11_000);
    let q = b.trigger("sync", json!({ "n": "q" })).await.unwrap().run.id;
    assert_eq!(tick_on(&b).await, 1);
    let r = env.run(q).await;
    assert_eq!((r.status, r.run_after), (RunStatus::Pending, deadline));
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::HalfOpen);
    let worker_b = b
        .worker(WorkerConfig {
            concurrency: 1,
            prefetch: 0,
            poll_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .start();

    env.server.release();
    assert_eq!(probe.await.unwrap(), 1);
    assert_eq!(env.run(probe_run).await.status, RunStatus::Completed);
    let done = b
        .wait(q, Duration::from_secs(20))
        .await
        .expect("the deferred run ran once the probe closed the breaker");
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(env.clock.now(), reset, "the clock never moved");
    let h = env.history(q).await;
    assert_eq!(h.attempts.len(), 2);
    assert_eq!(h.attempts[1].started_at, reset, "claimed at once");
    assert_eq!(
        env.events(q, "deferral_released").await,
        [json!({ "connection": "crm", "deferred_until": deadline, "reason": "circuit_closed" })]
    );
    assert_eq!(env.server.seen().len(), 4, "2 failures, the probe, q");
    assert_eq!(http_b.breakers()[0].state, BreakerPhase::Closed);
    worker_b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_deferred_to_the_probe_returns_when_the_probe_closes_the_breaker_sqlite() {
    let (a, b, _dir) = sqlite_pair();
    a_run_deferred_to_the_probe_returns_when_the_probe_closes_the_breaker(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_deferred_to_the_probe_returns_when_the_probe_closes_the_breaker_postgres() {
    let Some((a, b)) = pg_pair().await else {
        return;
    };
    a_run_deferred_to_the_probe_returns_when_the_probe_closes_the_breaker(a, b).await;
}

fn pg_url() -> Option<String> {
    match std::env::var("DOCKET_TEST_POSTGRES_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true: DOCKET_TEST_POSTGRES_URL must be set")
        }
        _ => {
            println!("skipping: set DOCKET_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run PostgreSQL tests");
            None
        }
    }
}

/// A connection's rate limit is taken before each request: with 10 a
/// second and a burst of 2, of 4 runs due at once two send, the other two
/// are deferred (no request) to their reserved tokens, 100 ms apart, and
/// send then; `limits` shows the bucket.
#[tokio::test]
async fn a_connection_rate_limit_defers_before_sending() {
    let server = TestServer::start().await;
    let dir = temp_dir();
    let text = format!(
        "[connections.crm]\nbase_url = \"{}/api\"\nrate_limit = {{ per_second = 10, burst = 2 }}\n\n[jobs.sync]\nconnection = \"crm\"\npath = \"/sync\"\n",
        server.base()
    );
    let http = HttpJobs::from_toml(&text, &dir).unwrap();
    let clock = ManualClock::new(T0);
    let docket = Docket::with_store(
        Arc::new(SqliteStore::open_in_memory().unwrap()),
        Arc::new(clock.clone()),
    );
    http.install(&docket).unwrap();
    let env = Env {
        docket,
        clock,
        http,
        server,
        dir,
    };
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(env.trigger("sync", json!({ "n": n })).await);
    }
    for _ in 0..4 {
        env.tick().await;
    }
    assert_eq!(env.server.seen().len(), 2);
    let l = env.http.limits("crm").await.unwrap();
    assert_eq!(l.buckets.len(), 1);
    assert_eq!(
        (
            l.buckets[0].tokens_left,
            l.buckets[0].reserved,
            l.buckets[0].next_token_at
        ),
        (0, 2, T0.plus_millis(300))
    );
    let mut dues = Vec::new();
    for id in &ids[2..] {
        let r = env.run(*id).await;
        let a = &env.history(*id).await.attempts[0];
        assert_eq!(a.retry_reason, Some(docket::RetryReason::RateLimited));
        assert!(a
            .error_message
            .as_deref()
            .unwrap()
            .starts_with("rate limit crm: next token at "));
        dues.push(r.run_after.millis_since(T0));
    }
    assert_eq!(dues, [100, 200]);
    let r = env.next_attempt(ids[2]).await;
    assert_eq!(r.status, RunStatus::Completed);
    let r = env.next_attempt(ids[3]).await;
    assert_eq!(r.status, RunStatus::Completed);
    assert_eq!(env.server.seen().len(), 4);
}

/// Bad limits in docket.toml are load errors naming the field.
#[test]
fn bad_rate_limits_in_docket_toml_name_the_field() {
    let dir = temp_dir();
    for (limit, field) in [
        (
            "rate_limit = { per_second = 0, burst = 5 }",
            "connections.crm.rate_limit.per_second",
        ),
        (
            "rate_limit = { per_second = -1, burst = 5 }",
            "connections.crm.rate_limit.per_second",
        ),
        (
            "rate_limit = { per_second = 5, burst = 0 }",
            "connections.crm.rate_limit.burst",
        ),
        (
            "rate_limit = { per_second = 5, burst = 1 }\nrate_limit_key = \"{{ nope }}\"",
            "connections.crm.rate_limit_key",
        ),
    ] {
        let text = format!(
            "[connections.crm]\nbase_url = \"http://127.0.0.1:1\"\n{limit}\n\n[jobs.sync]\nconnection = \"crm\"\npath = \"/sync\"\n"
        );
        let e = HttpJobs::from_toml(&text, &dir).unwrap_err();
        assert!(
            e.problems.iter().any(|(place, _)| place == field),
            "{field}: {e}"
        );
    }
}

// ---------------------------------------------------------------- workflows

/// The invoice workflow of docs/HTTP_JOBS.md: create an invoice, wait up to
/// 3 days for the "paid" signal, then send a receipt (or, on a timeout with
/// `on_timeout = "continue"`, a reminder).
fn invoice_job(on_timeout: &str) -> String {
    format!(
        r#"
        [jobs.invoice]
        connection = "crm"
        {retry}
        [[jobs.invoice.steps]]
        name = "create_invoice"
        path = "/invoices"
        idempotency_key = "{{{{ input.order }}}}/invoice/v1"
        body = {{ order = "{{{{ input.order }}}}" }}
        [[jobs.invoice.steps]]
        name = "paid"
        wait_for_signal = "paid"
        timeout = "3d"
        on_timeout = "{on_timeout}"
        [[jobs.invoice.steps]]
        name = "receipt"
        when = "steps.paid.received == true"
        path = "/receipts"
        idempotency_key = "{{{{ input.order }}}}/receipt/v1"
        body = {{ invoice = "{{{{ steps.create_invoice.body.id }}}}", amount = "{{{{ steps.paid.data.amount }}}}", by = "{{{{ steps.paid.sent_by }}}}" }}
        [[jobs.invoice.steps]]
        name = "remind"
        when = "steps.paid.timed_out == true"
        path = "/reminders"
        idempotency_key = "{{{{ input.order }}}}/remind/v1"
        body = {{ invoice = "{{{{ steps.create_invoice.body.id }}}}", unpaid_since = "{{{{ steps.paid.until }}}}" }}
        "#,
        retry = no_backoff()
    )
}

/// An environment on `store` (SQLite or PostgreSQL).
async fn setup_on(store: docket_store::DynStore, jobs: &str) -> Env {
    let server = TestServer::start().await;
    let dir = temp_dir();
    let http = HttpJobs::from_toml(&config(&server, "{ failures = 0 }", jobs), &dir).unwrap();
    let clock = ManualClock::new(T0);
    let docket = Docket::with_store(store, Arc::new(clock.clone()));
    http.install(&docket).unwrap();
    Env {
        docket,
        clock,
        http,
        server,
        dir,
    }
}

async fn sqlite_store() -> docket_store::DynStore {
    Arc::new(SqliteStore::open_in_memory().unwrap())
}

async fn pg_store() -> Option<docket_store::DynStore> {
    let base = pg_url()?;
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    Some(Arc::new(
        docket_store::postgres::PgStore::connect_with(&base, &schema)
            .await
            .unwrap(),
    ))
}

/// `name_sqlite` and `name_postgres` tests running `body(store)`.
macro_rules! on_both_backends {
    ($body:ident, $sqlite:ident, $postgres:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            $body(sqlite_store().await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(store) = pg_store().await else {
                return;
            };
            $body(store).await;
        }
    };
}

fn invoice_created(server: &TestServer) {
    server.push(Reply::Status(
        201,
        vec![],
        r#"{"id": "inv_42", "total": 42}"#.into(),
    ));
}

/// Invoice → wait for "paid" (the run holds nothing while it waits, and
/// says what it waits for) → the signal → the receipt, which reads the
/// invoice's id and the signal's payload. Each request is an action with
/// its own key, ledger row and evidence.
async fn invoice_paid_receipt(store: docket_store::DynStore) {
    let env = setup_on(store, &invoice_job("fail")).await;
    invoice_created(&env.server);
    let id = env.trigger("invoice", json!({"order": "o-1"})).await;
    assert_eq!(env.tick().await, 1);
    let r = env.run(id).await;
    assert_eq!(r.status, RunStatus::Postponed, "{r:?}");
    assert_eq!(r.run_after, T0.plus_millis(3 * 86_400_000));
    assert_eq!((r.lease_id, r.attempts_forgiven), (None, 1), "{r:?}");
    let waits = env.docket.signal_waits(id).await.unwrap();
    assert_eq!(
        (waits[0].name.as_str(), waits[0].until),
        ("paid", T0.plus_millis(3 * 86_400_000))
    );
    assert_eq!(
        env.server.with_key("o-1/invoice/v1"),
        ["POST /api/invoices"]
    );

    env.clock.advance(Duration::from_secs(3600));
    env.docket
        .signal(
            id,
            "paid",
            json!({"amount": 42}),
            docket::SignalOptions {
                sent_by: Some("stripe-webhook".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(env.run(id).await.run_after, env.clock.now(), "due at once");
    assert_eq!(env.tick().await, 1);
    let r = env.run(id).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    // Nothing was sent twice; the receipt read both earlier results.
    assert_eq!(env.server.with_key("o-1/invoice/v1").len(), 1);
    assert_eq!(
        env.server.with_key("o-1/receipt/v1"),
        ["POST /api/receipts"]
    );
    assert!(env.server.with_key("o-1/remind/v1").is_empty());
    let receipt = env.server.seen().pop().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&receipt.body).unwrap(),
        json!({"invoice": "inv_42", "amount": 42, "by": "stripe-webhook"})
    );
    // The output is the last step's result: the skipped reminder.
    let out = r.output.unwrap();
    assert_eq!(out["skipped"], json!(true), "{out}");
    // Evidence: one http_response per request, under the step's name.
    let actions: Vec<Value> = env
        .events(id, "http_response")
        .await
        .into_iter()
        .map(|e| json!([e["action"], e["idempotency_key"], e["status"]]))
        .collect();
    assert_eq!(
        actions,
        [
            json!(["create_invoice", "o-1/invoice/v1", 201]),
            json!(["receipt", "o-1/receipt/v1", 200])
        ]
    );
    assert_eq!(env.events(id, "action_committed").await.len(), 2);
    assert_eq!(env.events(id, "signal_delivered").await.len(), 1);
    assert_eq!(env.events(id, "step_skipped").await.len(), 1);
}
on_both_backends!(
    invoice_paid_receipt,
    a_workflow_creates_an_invoice_waits_for_paid_and_sends_a_receipt_sqlite,
    a_workflow_creates_an_invoice_waits_for_paid_and_sends_a_receipt_postgres
);

/// A signal sent before the run reaches its wait is kept and delivered
/// when it does: the run goes through in one attempt.
async fn signal_before_the_wait(store: docket_store::DynStore) {
    let env = setup_on(store, &invoice_job("fail")).await;
    invoice_created(&env.server);
    let id = env.trigger("invoice", json!({"order": "o-2"})).await;
    env.docket
        .signal(id, "paid", json!({"amount": 7}), Default::default())
        .await
        .unwrap();
    assert_eq!(env.tick().await, 1);
    let r = env.run(id).await;
    assert_eq!((r.status, r.attempt), (RunStatus::Completed, 1), "{r:?}");
    let receipt = env.server.seen().pop().unwrap();
    assert_eq!(receipt.target, "/api/receipts");
    assert_eq!(
        serde_json::from_str::<Value>(&receipt.body).unwrap()["amount"],
        json!(7)
    );
}
on_both_backends!(
    signal_before_the_wait,
    a_signal_sent_before_the_wait_is_delivered_when_it_is_reached_sqlite,
    a_signal_sent_before_the_wait_is_delivered_when_it_is_reached_postgres
);

/// No "paid" within 3 days (the manual clock moves): `on_timeout = "fail"`
/// fails the run naming the step, and sends nothing more.
async fn timeout_fails(store: docket_store::DynStore) {
    let env = setup_on(store, &invoice_job("fail")).await;
    invoice_created(&env.server);
    let id = env.trigger("invoice", json!({"order": "o-3"})).await;
    env.tick().await;
    env.clock.advance(Duration::from_secs(3 * 86_400 - 1));
    assert_eq!(env.tick().await, 0, "not due before its deadline");
    let r = env.next_attempt_after_wait(id).await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    assert_eq!(r.terminal_reason, Some(TerminalReason::PermanentError));
    let msg = r.last_error_message.unwrap();
    assert!(
        msg.contains("step `paid` of job `invoice`") && msg.contains("within 3d"),
        "{msg}"
    );
    assert_eq!(env.server.seen().len(), 1, "only the invoice was sent");
    assert_eq!(env.events(id, "signal_timed_out").await.len(), 1);
    // A signal after the deadline cannot revive a failed run.
    let late = env
        .docket
        .signal(id, "paid", json!({}), Default::default())
        .await;
    assert!(late.is_err());
}
on_both_backends!(
    timeout_fails,
    a_wait_that_times_out_with_on_timeout_fail_fails_naming_the_step_sqlite,
    a_wait_that_times_out_with_on_timeout_fail_fails_naming_the_step_postgres
);

/// `on_timeout = "continue"`: the next steps see the timeout
/// (`steps.paid.timed_out`, `steps.paid.until`): the receipt is skipped,
/// the reminder goes out.
async fn timeout_continues(store: docket_store::DynStore) {
    let env = setup_on(store, &invoice_job("continue")).await;
    invoice_created(&env.server);
    let id = env.trigger("invoice", json!({"order": "o-4"})).await;
    env.tick().await;
    let r = env.next_attempt_after_wait(id).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    assert!(env.server.with_key("o-4/receipt/v1").is_empty());
    assert_eq!(
        env.server.with_key("o-4/remind/v1"),
        ["POST /api/reminders"]
    );
    let remind = env.server.seen().pop().unwrap();
    let until = T0.plus_millis(3 * 86_400_000);
    assert_eq!(
        serde_json::from_str::<Value>(&remind.body).unwrap(),
        json!({"invoice": "inv_42", "unpaid_since": until.to_rfc3339()})
    );
    assert_eq!(r.output.unwrap()["status"], json!(200));
}
on_both_backends!(
    timeout_continues,
    a_wait_that_times_out_with_on_timeout_continue_lets_the_next_step_see_it_sqlite,
    a_wait_that_times_out_with_on_timeout_continue_lets_the_next_step_see_it_postgres
);

impl Env {
    /// Moves the clock to a postponed run's `run_after` and runs it once.
    async fn next_attempt_after_wait(&self, id: RunId) -> Run {
        let r = self.run(id).await;
        assert_eq!(r.status, RunStatus::Postponed, "{r:?}");
        self.clock.set(r.run_after);
        assert_eq!(self.tick().await, 1);
        self.run(id).await
    }
}

const ORDER_JOB: &str = r#"
        [jobs.order]
        connection = "crm"
        retry = { base_delay_ms = 1000, multiplier = 1.0, max_delay_ms = 1000, jitter_ms = 0, max_attempts = 5 }
        [[jobs.order.steps]]
        name = "create_invoice"
        path = "/invoices"
        idempotency_key = "{{ input.order }}/invoice/v1"
        [[jobs.order.steps]]
        name = "charge"
        path = "/charges"
        idempotency_key = "{{ input.order }}/charge/v1"
        body = { invoice = "{{ steps.create_invoice.body.id }}" }
        [jobs.order.steps.reconcile]
        path = "/charges?key={{ idempotency_key | urlencode }}"
        "#;

type StoreMaker = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = docket_store::DynStore>>>
        + Send
        + Sync,
>;

/// A worker process killed between steps (its runtime, store connections
/// and HTTP client dropped while the second request is out): after its
/// lease expires another process takes the run over; the first step comes
/// from storage and is not sent again, the second is reconciled (not
/// found) and sent again with the same key, once.
async fn killed_between_steps(make: StoreMaker) {
    let env = setup_on(make().await, ORDER_JOB).await;
    invoice_created(&env.server);
    env.server.push(Reply::Hang);
    let id = env.trigger("order", json!({"order": "o-5"})).await;

    // Process A: a thread with a runtime of its own, its own store
    // connection and HTTP client; killed by dropping its runtime.
    let text = config(&env.server, "{ failures = 0 }", ORDER_JOB);
    let (dir, clock, m) = (env.dir.clone(), env.clock.clone(), make.clone());
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let http = HttpJobs::from_toml(&text, &dir).unwrap();
            let d = Docket::with_store(m().await, Arc::new(clock));
            http.install(&d).unwrap();
            tokio::select! {
                _ = tick_on(&d) => panic!("the attempt ended before it was killed"),
                _ = killed => {}
            }
        });
        // Every task of the process (the attempt's handler too) dies here.
        rt.shutdown_background();
    });
    // The invoice is answered and committed; the charge is out: kill A.
    env.server.wait_for_requests(2).await;
    kill.send(()).unwrap();
    tokio::task::spawn_blocking(move || a.join().unwrap())
        .await
        .unwrap();
    let r = env.run(id).await;
    assert_eq!(r.status, RunStatus::Running, "{r:?}");
    let steps = env.history(id).await.steps;
    assert!(
        steps.iter().any(|s| s.name == "create_invoice"),
        "{steps:?}"
    );

    // Process B (this test's Docket) once A's lease has expired.
    env.clock.set(r.lease_expires_at.unwrap().plus_millis(1));
    env.tick().await;
    let r = env.next_attempt(id).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    let attempts = env.history(id).await.attempts;
    assert_eq!(attempts[0].error_class, Some(ErrorClass::LeaseExpired));
    assert_eq!(
        env.server.with_key("o-5/invoice/v1"),
        ["POST /api/invoices"]
    );
    assert_eq!(
        env.server.with_key("o-5/charge/v1"),
        [
            "POST /api/charges",
            "GET /api/charges?key=o-5/charge/v1",
            "POST /api/charges"
        ]
    );
    let charge = env.server.seen().pop().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&charge.body).unwrap(),
        json!({"invoice": "inv_42"}),
        "the replayed invoice's id"
    );
}

async fn pg_connect(base: String, schema: String) -> docket_store::DynStore {
    Arc::new(
        docket_store::postgres::PgStore::connect_with(&base, &schema)
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_steps_does_not_send_the_first_step_again_sqlite() {
    let dir = temp_dir();
    let path = dir.join("shared.db").to_str().unwrap().to_string();
    killed_between_steps(Arc::new(move || {
        let path = path.clone();
        Box::pin(
            async move { Arc::new(SqliteStore::open(&path).unwrap()) as docket_store::DynStore },
        )
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_steps_does_not_send_the_first_step_again_postgres() {
    let Some(base) = pg_url() else { return };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    killed_between_steps(Arc::new(move || {
        let (base, schema) = (base.clone(), schema.clone());
        Box::pin(pg_connect(base, schema))
    }))
    .await;
}

/// Runs sleeping in a `sleep` step hold no worker slot: with concurrency 1,
/// five sleeping workflows do not keep a new run from completing; at the
/// wake time they go on from their next step.
async fn sleepers_hold_no_slot(store: docket_store::DynStore) {
    let env = setup_on(
        store,
        r#"
        [jobs.nap]
        connection = "crm"
        [[jobs.nap.steps]]
        name = "nap"
        sleep = "1h"
        [[jobs.nap.steps]]
        name = "after"
        path = "/after"
        idempotency_key = "{{ input.n }}/after"
        [jobs.ping]
        connection = "crm"
        path = "/ping"
        "#,
    )
    .await;
    let mut naps = Vec::new();
    for n in 0..5 {
        naps.push(env.trigger("nap", json!({"n": n})).await);
    }
    let handle = env
        .docket
        .worker(WorkerConfig {
            concurrency: 1,
            ..Default::default()
        })
        .start();
    let bound = Duration::from_secs(20);
    for id in &naps {
        let r = env
            .docket
            .wait_until(*id, bound, |r| r.status == RunStatus::Postponed)
            .await
            .unwrap();
        assert_eq!((r.run_after, r.lease_id), (T0.plus_millis(3_600_000), None));
    }
    let ping = env.trigger("ping", json!({})).await;
    let r = env.docket.wait(ping, bound).await.unwrap();
    assert_eq!(r.status, RunStatus::Completed);
    assert!(env.server.seen().iter().all(|s| s.target == "/api/ping"));
    handle.shutdown(Duration::from_secs(5)).await;
    // At the wake time each goes on from its next step.
    env.clock.advance(Duration::from_secs(3600));
    for _ in 0..5 {
        assert_eq!(env.tick().await, 1);
    }
    for id in &naps {
        let r = env.run(*id).await;
        assert_eq!(
            (r.status, r.attempt - r.attempts_forgiven),
            (RunStatus::Completed, 1)
        );
    }
    assert_eq!(env.server.seen().len(), 6);
}
on_both_backends!(
    sleepers_hold_no_slot,
    a_sleep_step_holds_no_worker_slot_sqlite,
    a_sleep_step_holds_no_worker_slot_postgres
);

/// A wait with a `key` template is reached by `signal_by_key` (what
/// `POST /api/signals` calls) with the rendered key; a per-step approval
/// holds that step's request until an operator approves.
#[tokio::test]
async fn a_keyed_wait_and_a_step_approval() {
    let env = setup(
        r#"
        [jobs.settle]
        connection = "crm"
        [[jobs.settle.steps]]
        name = "settled"
        wait_for_signal = "payment-settled"
        key = "order-{{ input.order }}"
        timeout = "1d"
        [[jobs.settle.steps]]
        name = "refund"
        path = "/refunds"
        idempotency_key = "{{ input.order }}/refund/v1"
        approval = "steps.settled.data.amount > 100"
        body = { amount = "{{ steps.settled.data.amount }}" }
        "#,
    )
    .await;
    let id = env.trigger("settle", json!({"order": 42})).await;
    env.tick().await;
    let waits = env.docket.signal_waits(id).await.unwrap();
    assert_eq!(waits[0].key.as_deref(), Some("order-42"));
    let sent = env
        .docket
        .signal_by_key(
            "default",
            "payment-settled",
            "order-42",
            json!({"amount": 500}),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);
    env.tick().await;
    let r = env.run(id).await;
    assert_eq!(r.status, RunStatus::NeedsInput, "{r:?}");
    assert!(env.server.seen().is_empty(), "nothing sent before approval");
    env.docket
        .approve(id, json!({}), actor("ok"))
        .await
        .unwrap();
    env.tick().await;
    let r = env.run(id).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    assert_eq!(env.server.with_key("42/refund/v1"), ["POST /api/refunds"]);
}

/// A completed request step is replayed from storage without asking for
/// its connection again: disabling it after the step was sent does not
/// fail the run when it wakes from its sleep.
#[tokio::test]
async fn a_replayed_step_needs_no_connection() {
    let env = setup(
        r#"
        [jobs.later]
        [[jobs.later.steps]]
        name = "first"
        connection = "crm"
        path = "/first"
        [[jobs.later.steps]]
        name = "nap"
        sleep = "1h"
        [[jobs.later.steps]]
        name = "second"
        url = "{base}/api/second"
        "#,
    )
    .await;
    let id = env.trigger("later", json!({})).await;
    env.tick().await;
    env.http
        .disable_connection("default", "crm", &actor("maintenance"))
        .await
        .unwrap();
    let r = env.next_attempt_after_wait(id).await;
    assert_eq!(r.status, RunStatus::Completed, "{r:?}");
    let targets: Vec<String> = env.server.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/api/first", "/api/second"]);
}
