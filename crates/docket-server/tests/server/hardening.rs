//! Issue 11 part 4: the insecure development mode cannot be driven by
//! other web sites, and every malformed request gets the JSON error
//! envelope with operator words.

use crate::common::{no_auth, Opts, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn runs_of(s: &TestServer) -> usize {
    let (_, v) = s.call(Method::GET, "/api/runs", None, None).await;
    v["runs"].as_array().map_or(0, Vec::len)
}

fn insecure_without_worker() -> Opts {
    let mut o = no_auth();
    o.worker = false;
    o
}

#[tokio::test]
async fn insecure_mode_refuses_cross_site_writes_and_foreign_hosts() {
    let s = TestServer::start_with(insecure_without_worker()).await;
    let port = s.base.rsplit(':').next().unwrap().to_string();
    // A web page's form or fetch: text/plain, no preflight, foreign Origin.
    let res = s
        .http
        .post(s.url("/api/runs"))
        .header("content-type", "text/plain")
        .header("origin", "http://evil.example")
        .body(r#"{"job":"noop"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    // A foreign Origin with a JSON body, and a non-JSON body without one.
    for (ct, origin) in [
        ("application/json", Some("http://evil.example")),
        ("text/plain", None),
        ("application/x-www-form-urlencoded", None),
    ] {
        let mut r = s
            .http
            .post(s.url("/api/runs"))
            .header("content-type", ct)
            .body(r#"{"job":"noop"}"#);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        let res = r.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{ct} {origin:?}");
        let v: Value = res.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    assert_eq!(runs_of(&s).await, 0, "no cross-site write created a run");

    // DNS rebinding: a foreign Host reads nothing, on any route.
    for path in ["/api/runs", "/", "/healthz", "/api/openapi.json"] {
        let res = s
            .http
            .get(s.url(path))
            .header("host", format!("evil.example:{port}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["field"], "Host", "{v}");
    }

    // Same origin is fine: loopback names, with the bound port.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let res = s
            .http
            .post(s.url("/api/runs"))
            .header("host", host.clone())
            .header("origin", format!("http://{host}"))
            .json(&json!({"job": "noop"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "{host}");
    }
    let (st, _) = s
        .call(
            Method::POST,
            "/api/runs",
            None,
            Some(json!({"job": "noop"})),
        )
        .await;
    assert_eq!(
        st,
        StatusCode::CREATED,
        "a plain JSON client (the CLI) works"
    );
    assert_eq!(runs_of(&s).await, 4);
    s.stop().await;
}

/// With tokens, a bearer header is the guard: foreign Hosts and text/plain
/// bodies (curl's `-d`) still work as before.
#[tokio::test]
async fn with_tokens_host_and_content_type_are_not_checked() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let res = s
        .http
        .post(s.url("/api/runs"))
        .bearer_auth(&s.a)
        .header("host", "docket.internal:7878")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"job":"noop"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    s.stop().await;
}

#[tokio::test]
async fn the_dashboard_needs_no_sign_in_in_insecure_mode() {
    let s = TestServer::start_with(insecure_without_worker()).await;
    let html = s
        .http
        .get(s.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(r#"data-auth="none""#), "{html}");
    s.stop().await;
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let html = s
        .http
        .get(s.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(r#"data-auth="token""#), "{html}");
    s.stop().await;
}

#[tokio::test]
async fn arrays_and_other_non_objects_are_not_request_objects() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let id = s.trigger("noop", json!(null)).await;
    let (st, v) = s
        .post(&format!("/api/runs/{id}/cancel"), json!(["x"]))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "body", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON object"),
        "{v}"
    );
    let (_, r) = s.get(&format!("/api/runs/{id}")).await;
    assert_eq!(r["run"]["status"], "pending", "nothing was cancelled");

    let (st, v) = s.post("/api/runs", json!([null, null])).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        !m.contains("not valid JSON") && m.contains("JSON object"),
        "{v}"
    );
    let (st, v) = s.post("/api/runs/batch", json!({"runs": [["noop"]]})).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["field"], "runs[0]", "{v}");
    let (st, v) = s.post("/api/runs", json!(null)).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, v) = s.get("/api/runs").await;
    assert_eq!(v["runs"].as_array().unwrap().len(), 1);

    // The command envelope speaks JSON, not Rust.
    let (st, v) = s
        .post(
            "/api/core/cmd",
            json!({"cmd": "RetryFailedTaskCommand", "data": {"instanceGuid": id, "waitTimeoutMs": -1}}),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(!m.contains("u64") && !m.contains("struct"), "{m}");
    assert!(m.contains("non-negative integer"), "{m}");
    s.stop().await;
}

/// Sends raw bytes and returns the status line and the body.
async fn raw(s: &TestServer, request: &[u8]) -> (u16, String) {
    let addr = s.base.trim_start_matches("http://");
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&out);
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len = text[..i]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if out.len() >= i + 4 + len {
                            break;
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .expect("the server answered within 5 s");
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (code, body)
}

fn envelope(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    assert!(v["error"]["code"].is_string(), "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v
}

#[tokio::test]
async fn protocol_level_errors_answer_in_the_envelope() {
    let s = TestServer::start_with(Opts {
        worker: false,
        ..Opts::default()
    })
    .await;
    let auth = format!("Authorization: Bearer {}\r\n", s.a);
    // A huge Content-Length with a small body: 413 at once, no waiting.
    let req = format!(
        "POST /api/runs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 999999999999\r\n\r\n{{}}"
    );
    let (code, body) = raw(&s, req.as_bytes()).await;
    assert_eq!(code, 413);
    assert_eq!(envelope(&body)["error"]["code"], "content_too_large");

    // An id that is not UTF-8.
    let req =
        format!("GET /api/runs/%FF%FE HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let (code, body) = raw(&s, req.as_bytes()).await;
    assert!((400..500).contains(&code), "{code}");
    envelope(&body);

    // A long path.
    let long = "a".repeat(20_000);
    let req =
        format!("GET /api/runs/{long} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let (code, body) = raw(&s, req.as_bytes()).await;
    assert_eq!(code, 414);
    envelope(&body);

    // Huge headers.
    let big = "b".repeat(40_000);
    let req = format!(
        "GET /api/runs HTTP/1.1\r\nHost: x\r\n{auth}X-Big: {big}\r\nConnection: close\r\n\r\n"
    );
    let (code, body) = raw(&s, req.as_bytes()).await;
    assert_eq!(code, 431);
    envelope(&body);
    s.stop().await;
}
