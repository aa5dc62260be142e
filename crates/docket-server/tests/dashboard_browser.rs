//! The dashboard in a real headless Chromium, driven over WebDriver
//! (chromedriver + fantoccini), against a real server on a loopback port
//! with a SQLite file store, a worker and bearer tokens.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them). Without chromedriver the test fails when `CI=true` and is skipped
//! with one line otherwise. Every wait is bounded: the browser is polled
//! for elements (fantoccini's `wait().at_most(..)`), the API is asked with
//! long polls; nothing sleeps to wait.
//!
//! Screenshots of the main pages go to `$TMPDIR/docket-dashboard-shots/`,
//! and into `docs/` when `DOCKET_UPDATE_SCREENSHOTS=1`.

use docket::{Docket, Job, JobError, RetryPolicy, WorkerConfig};
use docket_server::{auth, HubConfig, Server, ServerConfig};
use docket_store::{
    AttemptEnd, ClaimRequest, ConnectionChange, ConnectionStatus, ErrorInfo, NewRun, Outcome,
    RetryRecord,
};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

type R<T = ()> = Result<T, String>;

/// How long any one element may take to appear.
const WAIT: Duration = Duration::from_secs(20);

fn chromedriver() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DOCKET_CHROMEDRIVER") {
        return Some(PathBuf::from(p));
    }
    let fixed = Path::new("/usr/bin/chromedriver");
    if fixed.exists() {
        return Some(fixed.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromedriver"))
            .find(|p| p.exists())
    })
}

fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("DOCKET_CHROMIUM") {
        return PathBuf::from(p);
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("chromium"))
}

/// Starts chromedriver on a free loopback port; returns it and its URL once
/// it says it is listening (read from its output, not waited for).
async fn start_chromedriver(bin: &Path) -> R<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut child = tokio::process::Command::new(bin)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no chromedriver stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("started successfully") {
                return Ok(());
            }
        }
        Err("chromedriver exited before it was ready".to_string())
    })
    .await
    .map_err(|_| "chromedriver did not start within 30 s".to_string())?;
    ready?;
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, format!("http://127.0.0.1:{port}")))
}

async fn browser(webdriver: &str, profile: &Path) -> R<Client> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium().to_string_lossy(),
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1360,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(webdriver)
        .await
        .map_err(|e| format!("cannot open a Chromium session: {e}"))
}

/// The server under test.
struct Env {
    base: String,
    docket: Docket,
    http: reqwest::Client,
    token: String,
    other_token: String,
}

fn register_jobs(d: &Docket) {
    let fast = |name: &str, base: u64, attempts: u32| RetryPolicy {
        name: name.into(),
        base_delay_ms: base,
        multiplier: 2.0,
        max_delay_ms: 10_000,
        jitter_ms: 0,
        max_attempts: attempts,
        ..RetryPolicy::default()
    };
    d.register(
        Job::new("send-invoice-email", |ctx, _input: Value| async move {
            if ctx.attempt() <= 2 {
                return Err(JobError::unavailable(
                    "503 Service Unavailable from the mail provider",
                ));
            }
            Ok(json!({"sent": true}))
        })
        .retry(fast("mail-backoff", 400, 5)),
    )
    .map_err(|e| e.to_string())
    .unwrap();
    d.register(
        Job::new("charge-card", |ctx, _input: Value| async move {
            if ctx.variables()["use_backup_gateway"] != json!(true) {
                return Err(
                    JobError::network("ECONNRESET talking to the payment gateway")
                        .in_action("charge"),
                );
            }
            Ok(json!({"charged": true, "gateway": "backup"}))
        })
        .retry(fast("payments", 150, 3)),
    )
    .unwrap();
    d.register(Job::new("approve-refund", |ctx, input: Value| async move {
        let d = ctx
            .wait_for_input("refund-approval", json!({"amount": input["amount"]}))
            .await?;
        Ok(json!({ "decision": format!("{d:?}") }))
    }))
    .unwrap();
    d.register(Job::new("import-batch", |ctx, _input: Value| async move {
        ctx.step("extract", || async { Ok::<_, JobError>(120) })
            .await?;
        ctx.step("load", || async {
            Err::<i64, _>(JobError::permanent("row 42: missing customer_id"))
        })
        .await?;
        Ok(json!("loaded"))
    }))
    .unwrap();
    // Child runs (issue 16): a parent that spawns three children and joins them.
    d.register(Job::new("thumbnail", |_ctx, input: Value| async move {
        Ok::<_, JobError>(json!({ "thumb": input["i"] }))
    }))
    .unwrap();
    d.register(Job::new(
        "make-thumbnails",
        |ctx, _input: Value| async move {
            let kids = (0..3)
                .map(|i| {
                    (
                        format!("thumb-{i}"),
                        "thumbnail".to_string(),
                        json!({ "i": i }),
                    )
                })
                .collect();
            let hs = ctx
                .spawn_many(kids, docket::SpawnOptions::default())
                .await?;
            let done = ctx.join(&hs).await?;
            Ok(json!({ "completed": done.iter().filter(|r| r.is_completed()).count() }))
        },
    ))
    .unwrap();
    d.register(Job::new(
        "nightly-report",
        |_ctx, input: Value| async move { Ok::<_, JobError>(json!({"rows": input["rows"]})) },
    ))
    .unwrap();
}

impl Env {
    async fn start(dir: &Path) -> (Env, tokio::sync::oneshot::Sender<()>) {
        Env::start_with(dir, None, |_| {}).await
    }

    /// [`Env::start`] with `docket.toml` HTTP jobs and more jobs.
    async fn start_with(
        dir: &Path,
        http_jobs: Option<docket::http::HttpJobs>,
        more_jobs: impl FnOnce(&Docket),
    ) -> (Env, tokio::sync::oneshot::Sender<()>) {
        let url = format!("sqlite://{}", dir.join("docket.db").display());
        let docket = Docket::open(&url).await.unwrap();
        register_jobs(&docket);
        more_jobs(&docket);
        if let Some(h) = &http_jobs {
            h.install(&docket).unwrap();
        }
        let now = docket.clock().now();
        let a = auth::issue_token("acme", "alice", now).unwrap();
        let b = auth::issue_token("globex", "bob", now).unwrap();
        docket.store().create_token(a.record).await.unwrap();
        docket.store().create_token(b.record).await.unwrap();
        // A remote worker of acme's, as a claim would record it.
        docket
            .store()
            .touch_worker(docket_store::WorkerSeen {
                tenant: "acme".into(),
                name: "ts-billing-1".into(),
                jobs: Some(vec!["charge-card".into()]),
                now,
            })
            .await
            .unwrap();
        let server = Server::start(
            docket.clone(),
            ServerConfig {
                hub: HubConfig {
                    poll_interval: Duration::from_millis(20),
                    ..HubConfig::default()
                },
                // The run page links a run's trace here (`--trace-url`).
                trace_url: Some("https://traces.example/trace/{trace_id}".into()),
                http: http_jobs,
                ..ServerConfig::default()
            },
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await;
        });
        (
            Env {
                base,
                docket,
                http: reqwest::Client::new(),
                token: a.secret,
                other_token: b.secret,
            },
            stop,
        )
    }

    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get_as(&self, token: &str, path: &str) -> Value {
        let (s, v) = self.call(token, reqwest::Method::GET, path, None).await;
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    async fn trigger_as(
        &self,
        token: &str,
        job: &str,
        input: Value,
        run_after: Option<String>,
    ) -> String {
        let mut body = json!({"job": job, "input": input});
        if let Some(t) = run_after {
            body["run_after"] = json!(t);
        }
        let (s, v) = self
            .call(token, reqwest::Method::POST, "/api/runs", Some(body))
            .await;
        assert_eq!(s, 201, "{v}");
        v["run"]["id"].as_str().unwrap().to_string()
    }

    async fn trigger(&self, job: &str, input: Value) -> String {
        self.trigger_as(&self.token.clone(), job, input, None).await
    }

    /// Long-polls until the run is in one of `statuses` (bounded).
    async fn until(&self, id: &str, statuses: &[&str]) -> Value {
        self.until_as(&self.token, id, statuses).await
    }

    /// [`Env::until`] with another tenant's token.
    async fn until_as(&self, token: &str, id: &str, statuses: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.get_as(token, &format!("/api/runs/{id}")).await;
            let st = v["run"]["status"].as_str().unwrap_or("").to_string();
            if statuses.contains(&st.as_str()) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} stayed {st}, wanted {statuses:?}"
            );
            // A long poll: answers at once when the run ends.
            self.get_as(token, &format!("/api/runs/{id}/wait?timeout=200ms"))
                .await;
        }
    }

    /// A run whose evidence was written by a misbehaving dispatcher: the
    /// policy chose 8 s after attempt 2, yet attempt 3 started 100 ms
    /// later (written straight into the store; the engine itself never
    /// does this). Its job has no worker here.
    async fn crafted_hot_retry(&self) -> String {
        let store = self.docket.store();
        let now = self.docket.clock().now();
        let t0 = now.plus_millis(-30_000);
        let mut n = NewRun::new(
            "crm-sync",
            json!({"contact": "c-1842", "fields": ["email"]}),
        );
        n.tenant = "acme".into();
        n.idempotency_key = Some("crm-sync:c-1842:v3".into());
        let id = n.id;
        store.trigger(vec![n], t0).await.unwrap();
        let err = |m: &str| ErrorInfo {
            class: docket::ErrorClass::Unavailable,
            message: m.into(),
            fingerprint: "crm-sync/unavailable".into(),
            failure_key: "crm-sync/unavailable".into(),
            action: Some("push-contact".into()),
        };
        let attempt = |at: i64| ClaimRequest {
            tenant: None,
            jobs: vec!["crm-sync".into()],
            limit: 1,
            now: t0.plus_millis(at),
            lease_ms: 30_000,
            worker: "worker-b".into(),
        };
        // (claim at, end at, delay chosen, eligible at) per retried attempt.
        for (start, end, delay, eligible) in [(0, 900, 4_000, 4_900), (5_200, 6_000, 8_000, 6_050)]
        {
            let run = store.claim(attempt(start)).await.unwrap().remove(0);
            store
                .finish(vec![AttemptEnd {
                    run_id: id,
                    lease_id: run.lease_id.unwrap(),
                    now: t0.plus_millis(end),
                    outcome: Outcome::Retry {
                        error: err("503 from the CRM API"),
                        retry: RetryRecord {
                            policy: "crm-exponential".into(),
                            delay_ms: delay,
                            eligible_at: t0.plus_millis(eligible),
                            reason: docket::RetryReason::Backoff,
                        },
                    },
                }])
                .await
                .unwrap()
                .remove(0)
                .unwrap();
        }
        let run = store.claim(attempt(6_100)).await.unwrap().remove(0);
        store
            .finish(vec![AttemptEnd {
                run_id: id,
                lease_id: run.lease_id.unwrap(),
                now: t0.plus_millis(6_700),
                outcome: Outcome::Failed {
                    error: Some(err("503 from the CRM API")),
                    reason: docket::TerminalReason::MaxRetriesExhausted,
                    detail: "3 attempts".into(),
                },
            }])
            .await
            .unwrap()
            .remove(0)
            .unwrap();
        id.to_string()
    }
}

async fn el(c: &Client, css: &str) -> R<fantoccini::elements::Element> {
    c.wait()
        .at_most(WAIT)
        .every(Duration::from_millis(50))
        .for_element(Locator::Css(css))
        .await
        .map_err(|e| format!("waiting for `{css}`: {e}"))
}

async fn text(c: &Client, css: &str) -> R<String> {
    el(c, css)
        .await?
        .text()
        .await
        .map_err(|e| format!("text of `{css}`: {e}"))
}

async fn click(c: &Client, css: &str) -> R {
    el(c, css)
        .await?
        .click()
        .await
        .map_err(|e| format!("click `{css}`: {e}"))
}

async fn type_into(c: &Client, css: &str, s: &str) -> R {
    let e = el(c, css).await?;
    e.clear().await.map_err(|e| format!("clear `{css}`: {e}"))?;
    e.send_keys(s)
        .await
        .map_err(|e| format!("type into `{css}`: {e}"))
}

async fn goto(c: &Client, url: &str) -> R {
    c.goto(url).await.map_err(|e| format!("goto {url}: {e}"))
}

async fn js(c: &Client, script: &str) -> R<Value> {
    c.execute(script, vec![])
        .await
        .map_err(|e| format!("script `{script}`: {e}"))
}

async fn statuses_in_list(c: &Client) -> R<Vec<String>> {
    let v = js(
        c,
        "return [...document.querySelectorAll('#runs-body tr')].map(t => t.dataset.status)",
    )
    .await?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

async fn shot(c: &Client, name: &str, w: u32, h: u32) -> R {
    save_shot(c, name, w, h, true).await
}

/// Saves a screenshot into the temporary folder, and into `docs/` when
/// asked (`DOCKET_UPDATE_SCREENSHOTS=1`) and `to_docs`.
async fn save_shot(c: &Client, name: &str, w: u32, h: u32, to_docs: bool) -> R {
    c.set_window_size(w, h)
        .await
        .map_err(|e| format!("resize: {e}"))?;
    // Resizing re-lays the page out; the next screenshot captures it.
    let png = c
        .screenshot()
        .await
        .map_err(|e| format!("screenshot: {e}"))?;
    if png.len() < 8 || &png[1..4] != b"PNG" {
        return Err(format!("{name}: not a PNG"));
    }
    let tmp = std::env::temp_dir().join("docket-dashboard-shots");
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    std::fs::write(tmp.join(name), &png).map_err(|e| e.to_string())?;
    if to_docs && std::env::var("DOCKET_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        std::fs::write(docs.join(name), &png).map_err(|e| e.to_string())?;
    }
    Ok(())
}

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

async fn scenario(c: &Client, env: &Env) -> R {
    // Runs of every kind, made by the real engine (and one crafted).
    let email = env
        .trigger("send-invoice-email", json!({"invoice": "INV-2031"}))
        .await;
    let charge = env
        .trigger(
            "charge-card",
            json!({"order": "ORD-7731", "amount_cents": 4599}),
        )
        .await;
    let refund = env.trigger("approve-refund", json!({"amount": 120})).await;
    let refund2 = env.trigger("approve-refund", json!({"amount": 75})).await;
    let import = env
        .trigger("import-batch", json!({"file": "customers-0611.csv"}))
        .await;
    for i in 0..3 {
        let id = env
            .trigger("nightly-report", json!({"rows": 1000 + i}))
            .await;
        env.until(&id, &["completed"]).await;
    }
    let later = env
        .docket
        .clock()
        .now()
        .plus_millis(2 * 3_600_000)
        .to_rfc3339();
    env.trigger_as(
        &env.token.clone(),
        "nightly-report",
        json!({"rows": 0}),
        Some(later),
    )
    .await;
    let hot = env.crafted_hot_retry().await;
    let other = env
        .trigger_as(
            &env.other_token.clone(),
            "import-batch",
            json!({"file": "globex.csv"}),
            None,
        )
        .await;
    env.docket
        .store()
        .set_connection_status(ConnectionChange {
            tenant: "acme".into(),
            name: "crm".into(),
            status: ConnectionStatus::Disabled,
            actor: "alice".into(),
            comment: Some("API key rotated; re-authorize".into()),
            now: env.docket.clock().now(),
        })
        .await
        .unwrap();
    env.until(&email, &["completed"]).await;
    env.until(&charge, &["failed"]).await;
    env.until(&import, &["failed"]).await;
    env.until(&refund, &["needs_input"]).await;
    env.until(&refund2, &["needs_input"]).await;
    env.until_as(&env.other_token, &other, &["failed"]).await;

    // Sign in.
    goto(c, &format!("{}/", env.base)).await?;
    el(c, "body[data-page='signin']").await?;
    type_into(c, "#token", &env.token).await?;
    click(c, "#signin-submit").await?;
    el(c, "body[data-page='runs'] #main[data-ready='runs']").await?;
    check!(
        text(c, "#who-tenant").await? == "acme",
        "signed in as the wrong tenant"
    );

    // The list: every acme run, never globex's; the attention count.
    el(c, &format!("tr[data-run-id='{hot}']")).await?;
    check!(
        c.find(Locator::Css(&format!("tr[data-run-id='{other}']")))
            .await
            .is_err(),
        "another tenant's run is listed"
    );
    let badge = text(c, "#attention-badge").await?;
    check!(
        badge == "5",
        "needs-attention count is {badge}, want 5 (3 failed + 2 needs_input)"
    );
    check!(text(c, "#attention-count").await? == "5", "header count");
    // Evaluation badges on failed runs: the hot retry is critical.
    el(
        c,
        &format!("[data-eval-for='{hot}'] [data-severity='critical']"),
    )
    .await?;
    el(c, &format!("[data-eval-for='{charge}'] [data-severity]")).await?;
    shot(c, "dashboard-runs.png", 1360, 900).await?;

    // Live: a run triggered elsewhere appears without reloading the page.
    js(c, "window.__samePage = 'yes'; return true").await?;
    let fresh = env.trigger("nightly-report", json!({"rows": 7})).await;
    el(c, &format!("tr[data-run-id='{fresh}']")).await?;
    check!(
        js(c, "return window.__samePage").await? == json!("yes"),
        "the page reloaded"
    );

    // The needs-attention filter.
    click(c, "#attention-toggle").await?;
    el(c, "#runs-table[data-query*='attention=true']").await?;
    let st = statuses_in_list(c).await?;
    check!(
        st.len() == 5,
        "attention list has {} rows: {st:?}",
        st.len()
    );
    check!(
        st.iter().all(|s| s == "failed" || s == "needs_input"),
        "attention list shows {st:?}"
    );
    // Text search on top: the import whose step failed on row 42.
    type_into(c, "#f-q", "row 42").await?;
    el(c, "#runs-table[data-query*='q=row+42']").await?;
    let st = statuses_in_list(c).await?;
    check!(st.len() == 1, "search found {st:?}");
    el(c, &format!("tr[data-run-id='{import}']")).await?;
    type_into(c, "#f-q", "").await?;
    el(c, "#runs-table[data-query='attention=true&limit=50']").await?;

    // The run whose history has retries: timeline, verdicts, picture.
    click(c, &format!("tr[data-run-id='{hot}'] a.run-link")).await?;
    el(c, "#main[data-ready='run']").await?;
    el(
        c,
        "#r-chart svg.retry-chart[data-attempts='3'][data-early='1']",
    )
    .await?;
    el(
        c,
        "#r-verdicts li[data-verdict='retry_without_backoff'] [data-severity='critical']",
    )
    .await?;
    el(c, "#r-verdicts li[data-verdict='delayed_retry']").await?;
    el(c, "#r-eval [data-severity='critical']").await?;
    let rows = js(
        c,
        "return document.querySelectorAll('#r-timeline tbody tr').length",
    )
    .await?;
    check!(rows.as_u64().unwrap_or(0) >= 12, "timeline has {rows} rows");
    let kinds = js(
        c,
        "return [...document.querySelectorAll('#r-timeline tbody tr')].map(t => t.dataset.kind)",
    )
    .await?;
    for k in [
        "run_triggered",
        "attempt",
        "retry decision",
        "attempt_failed",
        "run_failed",
    ] {
        check!(
            kinds.as_array().is_some_and(|a| a.iter().any(|x| x == k)),
            "timeline lacks {k}: {kinds}"
        );
    }
    check!(
        text(c, "#r-timeline")
            .await?
            .contains("policy crm-exponential chose a delay of 8.0s"),
        "the retry decision is not in the timeline"
    );
    shot(c, "dashboard-run.png", 1360, 1500).await?;

    // Retry the failed charge with updated variables and a comment.
    goto(c, &format!("{}/runs/{charge}", env.base)).await?;
    el(c, "#main[data-ready='run']").await?;
    el(
        c,
        "#r-chart svg.retry-chart[data-attempts='3'][data-early='0']",
    )
    .await?;
    click(c, "#act-retry").await?;
    el(c, "#action-dialog[open][data-action='retry']").await?;
    type_into(c, "#ad-vars", r#"{"use_backup_gateway": true}"#).await?;
    type_into(c, "#ad-comment", "primary gateway is down; use the backup").await?;
    click(c, "#ad-confirm").await?;
    // The page follows the run live to its end.
    el(c, "#r-status [data-status='completed']").await?;
    el(c, "#r-timeline tr[data-kind='operator_retry']").await?;
    let v = env.until(&charge, &["completed"]).await;
    check!(
        v["run"]["variables"]["use_backup_gateway"] == json!(true),
        "variables not merged: {}",
        v["run"]["variables"]
    );
    let retried = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "operator_retry")
        .cloned()
        .ok_or("no operator_retry event")?;
    check!(
        retried["comment"] == json!("primary gateway is down; use the backup")
            && retried["actor"] == json!("alice"),
        "operator_retry event: {retried}"
    );
    shot(c, "dashboard-run-retried.png", 1360, 1500).await?;

    // Approve a run waiting for input, with data.
    goto(c, &format!("{}/runs/{refund}", env.base)).await?;
    el(c, "#r-status [data-status='needs_input']").await?;
    check!(
        text(c, "#r-request").await?.contains("120"),
        "the input request is not shown"
    );
    click(c, "#act-approve").await?;
    el(c, "#action-dialog[open][data-action='approve']").await?;
    type_into(c, "#ad-data", r#"{"approved_by": "finance", "limit": 150}"#).await?;
    type_into(c, "#ad-comment", "within policy").await?;
    click(c, "#ad-confirm").await?;
    el(c, "#r-status [data-status='completed']").await?;
    let v = env.until(&refund, &["completed"]).await;
    check!(
        v["run"]["output"]["decision"]
            .as_str()
            .is_some_and(|d| d.contains("Approved") && d.contains("finance")),
        "output: {}",
        v["run"]["output"]
    );
    check!(
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "input_received"
                && e["comment"] == json!("within policy")
                && e["actor"] == json!("alice")),
        "no audited decision: {}",
        v["events"]
    );

    // A refused action shows the server's message.
    goto(c, &format!("{}/runs/{refund2}", env.base)).await?;
    el(c, "#r-status [data-status='needs_input']").await?;
    click(c, "#act-approve").await?;
    el(c, "#action-dialog[open][data-action='approve']").await?;
    let (s, body) = env
        .call(
            &env.token,
            reqwest::Method::POST,
            &format!("/api/runs/{refund2}/reject"),
            Some(json!({"comment": "someone else decided first"})),
        )
        .await;
    check!(s == 200, "reject through the API: {s} {body}");
    click(c, "#ad-confirm").await?;
    el(c, "#ad-error:not([hidden])").await?;
    let msg = text(c, "#ad-error").await?;
    check!(
        msg.starts_with("Refused: ")
            && msg.contains("cannot approve or reject a run that is completed"),
        "refusal shown as `{msg}`"
    );
    check!(
        el(c, "#action-dialog[open]").await.is_ok(),
        "the dialog closed on a refusal"
    );
    click(c, "#ad-cancel").await?;

    // The overview.
    goto(c, &format!("{}/overview", env.base)).await?;
    el(c, "#main[data-ready='overview']").await?;
    el(c, "#ov-chart svg.window-chart[data-buckets='12']").await?;
    el(c, "#ov-jobs tr[data-job='charge-card']").await?;
    check!(
        text(c, "#ov-connections").await?.contains("crm"),
        "the disabled connection is not listed"
    );
    check!(
        text(c, "#ov-breakers").await?.starts_with("none"),
        "breakers section"
    );
    let workers = text(c, "#ov-workers li[data-worker='ts-billing-1']").await?;
    check!(
        workers.contains("charge-card") && workers.contains("0 running"),
        "remote workers section: {workers}"
    );
    let classes = text(c, "#ov-classes").await?;
    check!(
        classes.contains("unavailable") && classes.contains("network"),
        "classes table: {classes}"
    );
    shot(c, "dashboard-overview.png", 1360, 1420).await?;
    let (st, day) = env
        .call(
            &env.token,
            reqwest::Method::GET,
            "/api/stats?window=1d",
            None,
        )
        .await;
    check!(st == 200, "stats for a day: {st} {day}");
    click(c, "#w-1d").await?;
    el(c, "#ov-chart svg.window-chart[data-buckets='24']").await?;

    // Schedules: the list with next fire times, pause from the page, one
    // schedule's next runs and its history (slots with their runs).
    let (st, body) = env
        .call(
            &env.token,
            reqwest::Method::POST,
            "/api/schedules",
            Some(
                json!({"name": "nightly-charge", "job": "charge-card", "cron": "30 2 * * *",
                        "timezone": "Europe/Berlin", "input": {"at": "{{ slot }}"}}),
            ),
        )
        .await;
    check!(st == 201, "create a schedule: {st} {body}");
    let (st, body) = env
        .call(
            &env.token,
            reqwest::Method::POST,
            "/api/schedules/nightly-charge/backfill",
            Some(json!({"from": "2026-03-28T00:00:00Z", "to": "2026-03-30T12:00:00Z"})),
        )
        .await;
    check!(st == 200, "backfill: {st} {body}");
    goto(c, &format!("{}/schedules", env.base)).await?;
    el(c, "#main[data-ready='schedules']").await?;
    el(
        c,
        "#sc-list tr[data-schedule='nightly-charge'] [data-state='enabled']",
    )
    .await?;
    let row = text(c, "#sc-list tr[data-schedule='nightly-charge']").await?;
    check!(
        row.contains("30 2 * * *") && row.contains("Europe/Berlin") && row.contains("T02:30:00"),
        "schedule row: {row}"
    );
    click(
        c,
        "#sc-list tr[data-schedule='nightly-charge'] button[data-action='pause']",
    )
    .await?;
    el(
        c,
        "#sc-list tr[data-schedule='nightly-charge'] [data-state='paused']",
    )
    .await?;
    click(c, "#sc-list tr[data-schedule='nightly-charge'] a").await?;
    el(
        c,
        "#sc-detail[data-schedule='nightly-charge']:not([hidden])",
    )
    .await?;
    el(c, "#sc-history tr[data-kind='paused']").await?;
    let history = text(c, "#sc-history").await?;
    check!(
        history.contains("backfilled") && history.contains("alice"),
        "schedule history: {history}"
    );
    check!(
        js(c, "return document.querySelectorAll(\"#sc-history tr[data-kind='backfilled'] a[href^='/runs/']\").length").await?
            == json!(2),
        "backfilled slots link their runs (29 March has no 02:30 in Berlin)"
    );
    shot(c, "dashboard-schedules.png", 1360, 900).await?;

    operations(c, env).await?;
    children(c, env).await?;

    // Signing out forgets the token.
    click(c, "#signout").await?;
    el(c, "body[data-page='signin'] #signin-error:not([hidden])").await?;
    check!(
        js(c, "return sessionStorage.getItem('docket.token')").await? == Value::Null,
        "the token survived sign-out"
    );
    Ok(())
}

/// Child runs (issue 16): the parent's page lists its children with their
/// statuses, each linking to its page, which links back to the parent.
async fn children(c: &Client, env: &Env) -> R {
    let parent = env.trigger("make-thumbnails", json!({})).await;
    let done = env.until(&parent, &["completed"]).await;
    check!(
        done["children"] == json!(3),
        "children count: {}",
        done["children"]
    );
    goto(c, &format!("{}/runs/{parent}", env.base)).await?;
    el(c, "#main[data-ready='run']").await?;
    el(c, "#r-children-card:not([hidden])").await?;
    let rows = js(
        c,
        "return [...document.querySelectorAll('#r-children tbody tr')].map(t => t.innerText)",
    )
    .await?;
    let rows = rows.as_array().cloned().unwrap_or_default();
    check!(rows.len() == 3, "children rows: {rows:?}");
    check!(
        rows.iter()
            .all(|r| r.as_str().unwrap_or("").contains("thumbnail")
                && r.as_str()
                    .unwrap_or("")
                    .to_lowercase()
                    .contains("completed")),
        "children rows: {rows:?}"
    );
    check!(
        text(c, "#r-children-count").await? == "(3)",
        "the count shows 3"
    );
    click(c, "#r-children tbody tr a").await?;
    el(c, "#main[data-ready='run'] #r-parent").await?;
    check!(
        text(c, "#r-parent").await? == parent,
        "the child links to its parent"
    );
    click(c, "#r-parent").await?;
    el(c, "#main[data-ready='run'] #r-children-card:not([hidden])").await?;
    check!(
        text(c, "#r-id").await? == parent,
        "the parent link leads back to the parent"
    );
    Ok(())
}

/// Queue operations (issue 15): pause and resume a job from the overview
/// (with a comment, shown as a badge wherever the job is), a bulk retry of
/// selected runs with its dry-run count and confirmation, and the deletion
/// of a final run from its page.
async fn operations(c: &Client, env: &Env) -> R {
    // Pause nightly-report: its new run is queued, not claimed, and the
    // job carries a "paused" badge in the list.
    goto(c, &format!("{}/overview", env.base)).await?;
    el(c, "#main[data-ready='overview']").await?;
    el(
        c,
        "#ov-queues tr[data-job='nightly-report'] [data-state='active']",
    )
    .await?;
    click(
        c,
        "#ov-queues tr[data-job='nightly-report'] button[data-action='pause']",
    )
    .await?;
    el(c, "#op-dialog[open][data-op='pause']").await?;
    type_into(c, "#op-comment", "incident 42: report database down").await?;
    click(c, "#op-confirm").await?;
    el(
        c,
        "#ov-queues tr[data-job='nightly-report'] [data-state='paused']",
    )
    .await?;
    let jobs = env.get_as(&env.token, "/api/jobs").await;
    let job = |jobs: &Value| {
        jobs["jobs"]
            .as_array()
            .and_then(|a| a.iter().find(|j| j["name"] == "nightly-report").cloned())
            .unwrap_or(Value::Null)
    };
    check!(job(&jobs)["paused"] == json!(true), "not paused: {jobs}");
    let held = env.trigger("nightly-report", json!({"rows": 3})).await;
    goto(c, &format!("{}/?job=nightly-report", env.base)).await?;
    el(
        c,
        &format!("#runs-body tr[data-run-id='{held}'] .paused-badge"),
    )
    .await?;
    goto(c, &format!("{}/runs/{held}", env.base)).await?;
    el(c, "#r-job .paused-badge").await?;
    // The queue shows it due while paused.
    let jobs = env.get_as(&env.token, "/api/jobs").await;
    check!(
        job(&jobs)["queue"]["due"].as_u64() >= Some(1),
        "the held run is not due: {jobs}"
    );
    // Resume: the held run is claimed and completes.
    goto(c, &format!("{}/overview", env.base)).await?;
    el(c, "#main[data-ready='overview']").await?;
    click(
        c,
        "#ov-queues tr[data-job='nightly-report'] button[data-action='resume']",
    )
    .await?;
    el(c, "#op-dialog[open][data-op='resume']").await?;
    click(c, "#op-confirm").await?;
    el(
        c,
        "#ov-queues tr[data-job='nightly-report'] [data-state='active']",
    )
    .await?;
    env.until(&held, &["completed"]).await;

    // Bulk retry of two selected failed runs: the dialog shows the dry
    // run's count, then the per-run results; each run is audited with the
    // comment. A third failed run is left alone.
    let mut failed = Vec::new();
    for n in 0..3 {
        failed.push(
            env.trigger("charge-card", json!({"order": format!("BULK-{n}")}))
                .await,
        );
    }
    for id in &failed {
        env.until(id, &["failed"]).await;
    }
    goto(c, &format!("{}/?job=charge-card&status=failed", env.base)).await?;
    el(c, "#main[data-ready='runs']").await?;
    for id in &failed[..2] {
        click(
            c,
            &format!("#runs-body tr[data-run-id='{id}'] input[data-pick]"),
        )
        .await?;
    }
    el(c, "#bulk-bar[data-selected='2']").await?;
    click(c, "#bulk-bar [data-bulk='retry']").await?;
    el(c, "#op-dialog[open][data-op='bulk-retry'][data-count='2']").await?;
    let prompt = text(c, "#op-confirm").await?;
    check!(prompt.contains("retry 2 runs"), "confirm button: {prompt}");
    type_into(c, "#op-comment", "gateway fixed, bulk retry").await?;
    click(c, "#op-confirm").await?;
    el(
        c,
        "#op-dialog[data-state='done'][data-ok='2'][data-refused='0']",
    )
    .await?;
    for id in &failed[..2] {
        el(
            c,
            &format!("#op-results li[data-run-id='{id}'][data-ok='true']"),
        )
        .await?;
        let d = env.get_as(&env.token, &format!("/api/runs/{id}")).await;
        let audited = d["timeline"].as_array().is_some_and(|t| {
            t.iter().any(|e| {
                e["comment"] == json!("gateway fixed, bulk retry") && e["actor"] == json!("alice")
            })
        });
        check!(
            audited,
            "run {id} has no audit event of the bulk retry: {d}"
        );
    }
    let third = env
        .get_as(&env.token, &format!("/api/runs/{}", failed[2]))
        .await;
    check!(
        third["run"]["status"] == json!("failed") && third["run"]["attempt"] == json!(3),
        "the unselected run was touched: {third}"
    );
    save_shot(c, "dashboard-bulk.png", 1360, 900, false).await?;
    click(c, "#op-cancel").await?;

    // A run triggered inside a trace (a `traceparent` on the trigger)
    // links to that trace from its page, through the configured URL.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traced: Value = env
        .http
        .post(format!("{}/api/runs", env.base))
        .bearer_auth(&env.token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"job": "charge-card", "input": {"order": "TRACED"}}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let traced = traced["run"]["id"]
        .as_str()
        .ok_or(format!("no run in {traced}"))?
        .to_string();
    goto(c, &format!("{}/runs/{}", env.base, traced)).await?;
    el(c, "#main[data-ready='run']").await?;
    el(
        c,
        &format!("a[href='https://traces.example/trace/{trace_id}']"),
    )
    .await?;

    // Delete the third (final) run from its page, with a confirmation.
    goto(c, &format!("{}/runs/{}", env.base, failed[2])).await?;
    el(c, "#main[data-ready='run']").await?;
    click(c, "#act-delete").await?;
    el(c, "#action-dialog[open][data-action='delete']").await?;
    type_into(c, "#ad-comment", "test data").await?;
    click(c, "#ad-confirm").await?;
    el(c, "body[data-page='runs'] #main[data-ready='runs']").await?;
    let (st, v) = env
        .call(
            &env.token,
            reqwest::Method::GET,
            &format!("/api/runs/{}", failed[2]),
            None,
        )
        .await;
    check!(st == 404, "the deleted run is still there: {st} {v}");

    // "All matching the filter": every completed nightly-report run,
    // counted by the dry run, then deleted page by page.
    let list = "/api/runs?job=nightly-report&status=completed&limit=100";
    let before = env.get_as(&env.token, list).await["runs"]
        .as_array()
        .map_or(0, Vec::len);
    check!(before >= 1, "no completed nightly-report runs to act on");
    goto(
        c,
        &format!("{}/?job=nightly-report&status=completed", env.base),
    )
    .await?;
    el(c, "#main[data-ready='runs']").await?;
    click(c, "#bulk-all").await?;
    el(c, "#bulk-bar[data-selected='all']").await?;
    click(c, "#bulk-bar [data-bulk='delete']").await?;
    el(
        c,
        &format!("#op-dialog[open][data-op='bulk-delete'][data-count='{before}']"),
    )
    .await?;
    click(c, "#op-confirm").await?;
    el(
        c,
        &format!("#op-dialog[data-state='done'][data-ok='{before}'][data-refused='0']"),
    )
    .await?;
    let after = env.get_as(&env.token, list).await;
    check!(
        after["runs"].as_array().is_some_and(Vec::is_empty),
        "completed runs left after deleting all matching: {after}"
    );
    click(c, "#op-cancel").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let Some(driver) = chromedriver() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "chromedriver is not installed: the dashboard browser test needs Debian's \
                 `chromium` and `chromium-driver` (apt-get install chromium chromium-driver; \
                 .ci/run installs them)"
            );
        }
        eprintln!(
            "skipped: chromedriver is not installed (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("docket-dash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("profile")).unwrap();
    let (env, stop) = Env::start(&dir).await;
    let worker = env
        .docket
        .worker(WorkerConfig {
            poll_interval: Duration::from_millis(20),
            reap_interval: Duration::from_millis(50),
            ..WorkerConfig::default()
        })
        .start();
    let (mut driver_proc, webdriver) = start_chromedriver(&driver).await.unwrap();
    let client = browser(&webdriver, &dir.join("profile")).await.unwrap();
    let result = scenario(&client, &env).await;
    if result.is_err() {
        let _ = save_shot(&client, "dashboard-failure.png", 1360, 1200, false).await;
    }
    let _ = client.close().await;
    let _ = driver_proc.kill().await;
    let _ = stop.send(());
    worker.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        panic!(
            "{e} (a screenshot is in {})",
            std::env::temp_dir()
                .join("docket-dashboard-shots")
                .display()
        );
    }
}

/// `--insecure-dev-no-auth`: the dashboard opens without a sign-in form,
/// `/signin` goes on to the page, and the page's own writes (same origin,
/// JSON) pass the cross-site checks that refuse other sites.
async fn no_auth_scenario(c: &Client, base: &str, http: &reqwest::Client) -> R {
    let res = http
        .post(format!("{base}/api/runs"))
        .json(&json!({"job": "nightly-report", "input": {"rows": 1}}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    check!(
        res.status() == 201,
        "trigger without a token: {}",
        res.status()
    );
    let v: Value = res.json().await.map_err(|e| e.to_string())?;
    let id = v["run"]["id"].as_str().unwrap_or("").to_string();

    goto(c, &format!("{base}/")).await?;
    el(
        c,
        "body[data-page='runs'][data-auth='none'] #main[data-ready='runs']",
    )
    .await?;
    el(c, &format!("tr[data-run-id='{id}']")).await?;
    check!(
        c.find(Locator::Css("#signin-form")).await.is_err(),
        "a sign-in form is shown"
    );
    check!(
        js(c, "return location.pathname").await? == json!("/"),
        "the dashboard left the runs page"
    );
    check!(
        js(c, "return document.getElementById('signout').hidden").await? == json!(true),
        "a sign-out button without sign-in"
    );
    goto(c, &format!("{base}/signin?next=%2Foverview")).await?;
    el(c, "body[data-page='overview'] #main[data-ready='overview']").await?;

    // A write from the page itself is same-origin and JSON: accepted.
    let status = js(
        c,
        "return fetch('/api/runs', {method: 'POST', headers: {'Content-Type': 'application/json'}, \
         body: JSON.stringify({job: 'nightly-report'})}).then((r) => r.status)",
    )
    .await?;
    check!(status == json!(201), "the page's own write: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_without_auth_in_headless_chromium() {
    let Some(driver) = chromedriver() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("chromedriver is not installed (apt-get install chromium chromium-driver)");
        }
        eprintln!(
            "skipped: chromedriver is not installed (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("docket-dash-noauth-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("profile")).unwrap();
    let docket = Docket::open("sqlite::memory:").await.unwrap();
    register_jobs(&docket);
    let server = Server::start(
        docket.clone(),
        ServerConfig {
            auth: docket_server::AuthMode::InsecureNoAuth,
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .serve(listener, async move {
                let _ = rx.await;
            })
            .await;
    });
    let (mut driver_proc, webdriver) = start_chromedriver(&driver).await.unwrap();
    let client = browser(&webdriver, &dir.join("profile")).await.unwrap();
    let result = no_auth_scenario(&client, &base, &reqwest::Client::new()).await;
    if result.is_err() {
        let _ = save_shot(&client, "dashboard-noauth-failure.png", 1360, 1000, false).await;
    }
    let _ = client.close().await;
    let _ = driver_proc.kill().await;
    let _ = stop.send(());
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A local service that answers every request 200 (for the rate-limited
/// connection).
fn ok_service() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut got = Vec::new();
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
                let _ = sock.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            });
        }
    });
    format!("http://{addr}")
}

/// The overview's Limits card (issue 14): a concurrency key with 2 of 2
/// running and a run held, a connection whose rate limit has no token left
/// (one run deferred to its reserved token) and a connection whose breaker
/// is open; and the held and deferred runs' timelines say why they wait.
async fn limits_scenario(c: &Client, env: &Env, release: &tokio::sync::Semaphore) -> R {
    // Two runs of customer 42 run (and wait for the test), the third is
    // held by the key acme/42.
    let mut keyed = Vec::new();
    for n in 0..3 {
        keyed.push(
            env.trigger("sync-customer", json!({"customer_id": 42, "n": n}))
                .await,
        );
    }
    env.until(&keyed[0], &["running"]).await;
    env.until(&keyed[1], &["running"]).await;
    // The held run's event is written by the claim that found it held.
    let held = &keyed[2];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = env.get_as(&env.token, &format!("/api/runs/{held}")).await;
        if d["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e["kind"] == "run_held"))
        {
            break;
        }
        check!(
            tokio::time::Instant::now() < deadline,
            "no run_held event on {held}: {d}"
        );
        // A long poll on the run (it stays pending): bounded, no sleep.
        env.get_as(&env.token, &format!("/api/runs/{held}/wait?timeout=200ms"))
            .await;
    }
    // payments: one token (burst 1, one more in 100 s): the first refund
    // sends, the second is deferred to its reserved token.
    let sent = env.trigger("refund", json!({"order": 1})).await;
    env.until(&sent, &["completed"]).await;
    let deferred = env.trigger("refund", json!({"order": 2})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = env
            .get_as(&env.token, &format!("/api/runs/{deferred}"))
            .await;
        if d["run"]["attempt"].as_u64() >= Some(1) && d["run"]["status"] == "pending" {
            break;
        }
        check!(
            tokio::time::Instant::now() < deadline,
            "the second refund was not deferred: {d}"
        );
        env.get_as(
            &env.token,
            &format!("/api/runs/{deferred}/wait?timeout=200ms"),
        )
        .await;
    }
    // crm: nothing listens; one failure opens its breaker.
    let failed = env.trigger("crm-push", json!({"contact": 7})).await;
    env.until(&failed, &["pending", "failed"]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.get_as(&env.token, "/api/connections/crm/limits").await["breaker"]["state"] != "open"
    {
        check!(
            tokio::time::Instant::now() < deadline,
            "the crm breaker did not open"
        );
        env.get_as(
            &env.token,
            &format!("/api/runs/{failed}/wait?timeout=200ms"),
        )
        .await;
    }

    goto(c, &format!("{}/", env.base)).await?;
    el(c, "body[data-page='signin']").await?;
    type_into(c, "#token", &env.token).await?;
    click(c, "#signin-submit").await?;
    el(c, "body[data-page='runs'] #main[data-ready='runs']").await?;
    goto(c, &format!("{}/overview", env.base)).await?;
    el(c, "#main[data-ready='overview']").await?;
    // The busiest key first: acme/42, 2 of 2 running, held.
    let first = el(c, "#ov-limit-keys tbody tr:first-child[data-key='acme/42']").await?;
    let row = first.text().await.map_err(|e| e.to_string())?;
    check!(
        row.contains("2 / 2") && row.contains("held"),
        "key row: {row}"
    );
    el(c, "#ov-limit-keys tr[data-key='acme/7'][data-held='false']").await?;
    let pay = text(c, "#ov-limit-conns tr[data-connection='payments']").await?;
    check!(
        pay.contains("0.01/s, burst 1") && pay.contains("(in "),
        "payments row: {pay}"
    );
    check!(
        text(
            c,
            "#ov-limit-conns tr[data-connection='payments'] [data-q='tokens']"
        )
        .await?
            == "0"
            && text(
                c,
                "#ov-limit-conns tr[data-connection='payments'] [data-q='reserved']"
            )
            .await?
                == "1",
        "payments tokens and reservations: {pay}"
    );
    el(
        c,
        "#ov-limit-conns tr[data-connection='payments'] [data-breaker='closed']",
    )
    .await?;
    el(
        c,
        "#ov-limit-conns tr[data-connection='crm'] [data-breaker='open']",
    )
    .await?;
    let crm = text(c, "#ov-limit-conns tr[data-connection='crm']").await?;
    check!(
        crm.contains("none") && crm.contains("open until"),
        "crm row: {crm}"
    );
    save_shot(c, "dashboard-limits.png", 1360, 1600, false).await?;

    // The held run's timeline says why it waits.
    goto(c, &format!("{}/runs/{held}", env.base)).await?;
    el(c, "#main[data-ready='run']").await?;
    let timeline = text(c, "#r-timeline").await?;
    check!(
        timeline.contains("held by concurrency key acme/42: 2 of 2 running"),
        "held run's timeline: {timeline}"
    );
    // The deferred run's too.
    goto(c, &format!("{}/runs/{deferred}", env.base)).await?;
    el(c, "#main[data-ready='run']").await?;
    let timeline = text(c, "#r-timeline").await?;
    check!(
        timeline.contains("rate limit payments: next token at 20"),
        "deferred run's timeline: {timeline}"
    );
    release.add_permits(100);
    for id in &keyed {
        env.until(id, &["completed"]).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_limits_in_headless_chromium() {
    let Some(driver) = chromedriver() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("chromedriver is not installed (apt-get install chromium chromium-driver)");
        }
        eprintln!(
            "skipped: chromedriver is not installed (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("docket-dash-limits-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("profile")).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = format!(
        r#"
[connections.payments]
base_url = "{ok}"
rate_limit = {{ per_second = 0.01, burst = 1 }}

[connections.crm]
base_url = "http://{closed}"
breaker = {{ failures = 1, window_ms = 60000, open_ms = 600000 }}

[jobs.refund]
connection = "payments"
path = "/refunds"

[jobs.crm-push]
connection = "crm"
path = "/contacts"
timeout_ms = 2000
retry = {{ base_delay_ms = 600000, max_delay_ms = 600000, jitter_ms = 0, max_attempts = 3 }}
"#,
        ok = ok_service()
    );
    let http = docket::http::HttpJobs::from_toml(&toml, &dir).unwrap();
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let r = release.clone();
    let (env, stop) = Env::start_with(&dir, Some(http), move |d| {
        d.register(
            Job::new("sync-customer", move |_ctx, _input: Value| {
                let r = r.clone();
                async move {
                    // Bounded: the test releases it, or it ends after 60 s.
                    let _ = tokio::time::timeout(Duration::from_secs(60), r.acquire()).await;
                    Ok::<_, JobError>(json!("synced"))
                }
            })
            .concurrency_key("{{ tenant }}/{{ input.customer_id }}")
            .concurrency_limit(2),
        )
        .unwrap();
    })
    .await;
    // A key with room: one run of customer 7, waiting in the future.
    let later = in_an_hour(&env);
    env.trigger_as(
        &env.token.clone(),
        "sync-customer",
        json!({"customer_id": 7}),
        Some(later),
    )
    .await;
    let worker = env
        .docket
        .worker(WorkerConfig {
            poll_interval: Duration::from_millis(20),
            reap_interval: Duration::from_millis(50),
            ..WorkerConfig::default()
        })
        .start();
    let (mut driver_proc, webdriver) = start_chromedriver(&driver).await.unwrap();
    let client = browser(&webdriver, &dir.join("profile")).await.unwrap();
    let result = limits_scenario(&client, &env, &release).await;
    if result.is_err() {
        let _ = save_shot(&client, "dashboard-limits-failure.png", 1360, 1600, false).await;
    }
    release.add_permits(100);
    let _ = client.close().await;
    let _ = driver_proc.kill().await;
    let _ = stop.send(());
    worker.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        panic!(
            "{e} (a screenshot is in {})",
            std::env::temp_dir()
                .join("docket-dashboard-shots")
                .display()
        );
    }
}

/// RFC 3339 of the server's clock in an hour.
fn in_an_hour(env: &Env) -> String {
    env.docket.clock().now().plus_millis(3_600_000).to_rfc3339()
}
