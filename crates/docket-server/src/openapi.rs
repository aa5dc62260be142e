//! Completes the generated OpenAPI document so that it describes the server
//! as it is (checked by schemathesis, see tests/server/schemathesis.rs):
//! every answer an operation can give (401 on every authenticated route,
//! 400/413/422 where a body or parameters are read), request schemas that
//! forbid what the server refuses (bodies that are not objects, empty
//! `job`/`cmd`, `limit` outside 1..=500, times outside the accepted range),
//! and response fields that can be any JSON marked so (`RunView.input`).
//!
//! utoipa's derive cannot say most of this (conditional requirements,
//! patterns, per-route error sets), so it is applied to the document's JSON
//! once, when the router is built.

use serde_json::{json, Map, Value};

/// The longest comment, idempotency key or correlation id (bytes).
const MAX_TEXT: u64 = 1000;
/// The longest `delay_ms` of a postponement: 100 years.
pub const MAX_DELAY_MS: u64 = 3_155_760_000_000;

/// RFC 3339 in UTC (`…Z`) within 1970-01-01..=9999-12-31; days up to 28
/// so that every string the pattern admits is a real date. The server also
/// accepts other days and numeric offsets; the description says so.
const TIME_PATTERN: &str = r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,3})?Z$";

pub(crate) fn time_schema(nullable: bool, what: &str) -> Value {
    json!({
        "type": if nullable { json!(["string", "null"]) } else { json!("string") },
        "pattern": TIME_PATTERN,
        "description": format!("{what} RFC 3339 (e.g. 2026-01-31T12:00:00Z, any offset), from 1970-01-01T00:00:00.000Z to 9999-12-31T23:59:59.999Z."),
    })
}

fn error_response(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn add(responses: &mut Map<String, Value>, code: &str, description: &str, schema: &str) {
    responses
        .entry(code.to_string())
        .or_insert_with(|| error_response(description, schema));
}

fn prop<'a>(doc: &'a mut Value, schema: &str, field: &str) -> Option<&'a mut Value> {
    doc.pointer_mut(&format!("/components/schemas/{schema}/properties/{field}"))
}

pub(crate) fn set(doc: &mut Value, schema: &str, field: &str, value: Value) {
    if let Some(p) = prop(doc, schema, field) {
        let description = p.get("description").cloned();
        *p = value;
        if let (Some(d), Some(o)) = (description, p.as_object_mut()) {
            o.entry("description").or_insert(d);
        }
    }
}

pub(crate) fn merge(doc: &mut Value, schema: &str, field: &str, extra: Value) {
    if let (Some(Value::Object(p)), Value::Object(e)) = (prop(doc, schema, field), extra) {
        p.extend(e);
    }
}

/// Applies the completions to the document `doc` (OpenAPI JSON). `jobs`:
/// the registered job names, listed as the values of `job` (empty: any
/// name).
pub fn complete(doc: &mut Value, jobs: &[String]) {
    operations(doc);
    requests(doc, jobs);
    responses(doc);
    crate::worker_api::complete_openapi(doc);
}

fn operations(doc: &mut Value) {
    let Some(Value::Object(paths)) = doc.get_mut("paths") else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        let cmd = path == "/api/core/cmd" || path == "/api/bpm/cmd";
        let envelope = if cmd { "CommandResponse" } else { "ErrorBody" };
        for (_, op) in item.iter_mut() {
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            let secured = op
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| !s.is_empty());
            let has_body = op.contains_key("requestBody");
            let has_query = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"));
            if let Some(body) = op.get_mut("requestBody") {
                request_body(body);
            }
            let Some(Value::Object(responses)) = op.get_mut("responses") else {
                continue;
            };
            if secured {
                add(
                    responses,
                    "401",
                    "No valid token (`unauthorized`)",
                    envelope,
                );
            }
            if path.contains('{') {
                add(
                    responses,
                    "400",
                    "A path segment that is not UTF-8 text (`invalid_parameter`)",
                    envelope,
                );
            }
            if has_query {
                add(
                    responses,
                    "400",
                    "A query parameter is unknown or wrong (`invalid_parameter`, named)",
                    envelope,
                );
            }
            if has_body {
                add(
                    responses,
                    "400",
                    "The body is not JSON (`invalid_json`)",
                    envelope,
                );
                add(
                    responses,
                    "413",
                    "The body is over the limit (`content_too_large`)",
                    envelope,
                );
                add(
                    responses,
                    "422",
                    "The body is not an object, or a field is wrong (`invalid_field`, named)",
                    envelope,
                );
            }
        }
    }
}

/// An optional body is absent or an object, never `null`: utoipa writes
/// `Option<T>` as "T or null".
fn request_body(body: &mut Value) {
    let Some(schema) = body.pointer_mut("/content/application~1json/schema") else {
        return;
    };
    if let Some(Value::Array(alts)) = schema.get("oneOf") {
        if let Some(r) = alts.iter().find(|a| a.get("$ref").is_some()) {
            *schema = r.clone();
        }
    }
}

fn requests(doc: &mut Value, jobs: &[String]) {
    let text = |what: &str| json!({"type": ["string", "null"], "maxLength": MAX_TEXT, "description": what});
    let mut job = json!({"type": "string", "minLength": 1, "description": "A registered job (GET /api/jobs)."});
    if !jobs.is_empty() {
        job["enum"] = json!(jobs);
    }
    set(doc, "TriggerRequest", "job", job.clone());
    set(doc, "ScheduleRequest", "job", job);
    set(
        doc,
        "ScheduleRequest",
        "input",
        json!({"description": "The input template: any JSON (default {}); strings may say {{ slot }}, {{ slot_local }}, {{ slot_ms }}, {{ schedule }}."}),
    );
    set(
        doc,
        "ScheduleRequest",
        "name",
        json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$", "description": "Letters, digits, '-', '_', '.' (1-128)."}),
    );
    set(
        doc,
        "ScheduleRequest",
        "start",
        time_schema(true, "No slot before:"),
    );
    set(
        doc,
        "ScheduleRequest",
        "end",
        time_schema(true, "No slot after:"),
    );
    set(
        doc,
        "ScheduleRequest",
        "overlap",
        json!({"type": ["string", "null"], "enum": ["allow", "skip", "buffer_one", "cancel_other", null]}),
    );
    set(
        doc,
        "ScheduleRequest",
        "catch_up",
        json!({"type": ["string", "null"], "enum": ["last", "all", "none", null]}),
    );
    set(
        doc,
        "ScheduleRequest",
        "jitter_ms",
        json!({"type": ["integer", "null"], "minimum": 0, "maximum": 86_400_000u64, "description": "Deterministic jitter window (default 0, at most a day)."}),
    );
    set(
        doc,
        "ScheduleRequest",
        "comment",
        text("Stored in the schedule's history."),
    );
    set(
        doc,
        "BackfillRequest",
        "from",
        time_schema(false, "From (inclusive):"),
    );
    set(
        doc,
        "BackfillRequest",
        "to",
        time_schema(false, "To (inclusive):"),
    );
    set(
        doc,
        "BackfillRequest",
        "comment",
        text("Stored in the schedule's history."),
    );
    set(
        doc,
        "TriggerRequest",
        "input",
        json!({"description": "The input: any JSON (default null), at most --max-input-bytes (1 MiB)."}),
    );
    set(
        doc,
        "TriggerRequest",
        "run_after",
        time_schema(true, "Not before this instant:"),
    );
    set(
        doc,
        "TriggerRequest",
        "idempotency_key",
        json!({"type": ["string", "null"], "maxLength": MAX_TEXT, "pattern": "\\S",
               "description": "A second trigger with this key for the same job returns the first run; not blank."}),
    );
    set(
        doc,
        "TriggerRequest",
        "correlation_id",
        text("Carried into every attempt and event."),
    );
    set(
        doc,
        "DebounceRequest",
        "keep",
        json!({"type": "string", "enum": ["first", "last"],
               "description": "`first`: the first trigger's run is due at once; later triggers in the window return it, their input dropped. `last`: the run is due when the window after the first trigger ends; each later trigger in the window replaces its input while it has not started."}),
    );
    set(
        doc,
        "DebounceRequest",
        "key",
        json!({"type": ["string", "null"], "maxLength": MAX_TEXT,
               "description": "The key template over {{ tenant }}, {{ job }} and {{ input.FIELD }} (default {{ job }}: every trigger of the job in the tenant)."}),
    );
    for schema in ["DebounceView", "DebounceWindowView"] {
        set(
            doc,
            schema,
            "keep",
            json!({"type": "string", "enum": ["first", "last"], "description": "Which trigger's input the run keeps."}),
        );
    }
    set(
        doc,
        "DebounceWindowView",
        "run_status",
        json!({"type": "string",
               "enum": ["pending", "running", "needs_input", "postponed", "completed", "failed"],
               "description": "The window's run's status now (never `cancelled`: a cancel ends the window)."}),
    );
    merge(
        doc,
        "BatchRequest",
        "runs",
        json!({"minItems": 1, "maxItems": crate::runs::MAX_BATCH}),
    );
    for schema in [
        "CommentRequest",
        "RetryRequest",
        "PostponeRequest",
        "DecisionRequest",
    ] {
        set(doc, schema, "comment", text("Stored on the audit event."));
    }
    set(
        doc,
        "BulkBody",
        "comment",
        text("Stored on each run's audit event."),
    );
    set(
        doc,
        "BulkBody",
        "action",
        json!({"type": "string", "enum": ["retry", "cancel", "retrigger", "postpone", "delete"]}),
    );
    set(
        doc,
        "BulkBody",
        "ids",
        json!({"type": "array", "minItems": 1, "maxItems": 10000,
               "items": {"type": "string", "format": "uuid"}, "description": "These runs."}),
    );
    set(
        doc,
        "BulkBody",
        "filter",
        json!({"$ref": "#/components/schemas/BulkFilter", "description": "Or every run of the tenant matching this filter."}),
    );
    if let Some(Value::Object(p)) = doc.pointer_mut("/components/schemas/BulkBody") {
        // `ids` or `filter`, exactly one; postpone needs `until` or
        // `delay_ms`, exactly one.
        p.insert(
            "oneOf".into(),
            json!([{"required": ["ids"]}, {"required": ["filter"]}]),
        );
        p.insert(
            "if".into(),
            json!({"properties": {"action": {"const": "postpone"}}, "required": ["action"]}),
        );
        p.insert(
            "then".into(),
            json!({"oneOf": [
                {"required": ["until"], "properties": {"until": {"type": "string"}, "delay_ms": {"type": "null"}}},
                {"required": ["delay_ms"], "properties": {"delay_ms": {"type": "integer"}, "until": {"type": "null"}}}
            ]}),
        );
    }
    if let Some(Value::Object(p)) = doc.pointer_mut("/components/schemas/BulkFilter") {
        p.insert("required".into(), json!(["status"]));
    }
    set(
        doc,
        "BulkBody",
        "limit",
        json!({"type": ["integer", "null"], "minimum": 1, "maximum": 500, "description": "Runs handled in this call (default 100)."}),
    );
    set(
        doc,
        "BulkBody",
        "cursor",
        json!({"type": ["string", "null"], "format": "uuid", "description": "`next_cursor` of the previous call."}),
    );
    set(
        doc,
        "BulkBody",
        "delay_ms",
        json!({"type": ["integer", "null"], "minimum": 0, "maximum": MAX_DELAY_MS,
               "description": "postpone: not before now plus this many milliseconds."}),
    );
    set(
        doc,
        "BulkBody",
        "until",
        time_schema(true, "postpone: not before this instant (in the future):"),
    );
    set(
        doc,
        "BulkBody",
        "updated_variables",
        json!({"type": ["object", "null"], "description": "retry: merged into each run's variables."}),
    );
    set(
        doc,
        "BulkFilter",
        "status",
        json!({"type": "array", "minItems": 1, "items": {"type": "string", "enum": ["pending", "running", "needs_input", "postponed", "completed", "failed", "cancelled"]},
               "description": "Any of these statuses (required)."}),
    );
    set(
        doc,
        "BulkFilter",
        "created_after",
        time_schema(true, "Created at or after:"),
    );
    set(
        doc,
        "BulkFilter",
        "created_before",
        time_schema(true, "Created before:"),
    );
    set(
        doc,
        "DecisionRequest",
        "data",
        json!({"description": "Handed to the handler's wait: any JSON (default null)."}),
    );
    set(
        doc,
        "RetryRequest",
        "updated_variables",
        json!({"type": ["object", "null"], "description": "Merged (top-level keys) into the run's variables before the retry."}),
    );
    set(
        doc,
        "PostponeRequest",
        "until",
        time_schema(
            false,
            "Not before this instant, which must be in the future:",
        ),
    );
    set(
        doc,
        "PostponeRequest",
        "delay_ms",
        json!({"type": "integer", "minimum": 0, "maximum": MAX_DELAY_MS,
               "description": "Or: not before now plus this many milliseconds (0 to 100 years)."}),
    );
    if let Some(Value::Object(p)) = doc.pointer_mut("/components/schemas/PostponeRequest") {
        p.insert(
            "oneOf".into(),
            json!([{"required": ["until"]}, {"required": ["delay_ms"]}]),
        );
    }
    set(
        doc,
        "CommandRequest",
        "cmd",
        json!({"type": "string", "enum": ["RetryFailedTaskCommand", "SkipFailedTaskCommand", "CancelProcessInstanceCommand", "GetProcessStateCommand"]}),
    );
    set(
        doc,
        "CommandRequest",
        "data",
        json!({
            "type": "object",
            "required": ["instanceGuid"],
            "properties": {
                "instanceGuid": {"type": "string", "description": "The run's id."},
                "updatedVariables": {"type": ["object", "null"], "description": "Retry: merged into the run's variables."},
                "comment": text("The audit trail's comment."),
                "waitTimeoutMs": {"type": ["integer", "null"], "minimum": 0, "maximum": crate::cmd::MAX_RETRY_WAIT_MS, "description": "Retry: how long to wait for the retried attempt (default 30000)."}
            },
            "description": "The command's fields."
        }),
    );
    if let Some(Value::Object(p)) = doc.pointer_mut("/components/schemas/CommandRequest") {
        p.insert("required".into(), json!(["cmd", "data"]));
    }
    // Query parameters.
    let Some(Value::Object(paths)) = doc.get_mut("paths") else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let Some(Value::Array(params)) = op.get_mut("parameters") else {
                continue;
            };
            for p in params.iter_mut() {
                if p["in"] != "query" {
                    continue;
                }
                let schema = match p["name"].as_str().unwrap_or("") {
                    "limit" => json!({"type": "integer", "minimum": 1, "maximum": 500}),
                    "since" | "created_after" | "created_before" => time_schema(false, "A time:"),
                    "cursor" => json!({"type": "string", "format": "uuid"}),
                    "status" => {
                        json!({"type": "string", "pattern": "^(pending|running|needs_input|postponed|completed|failed|cancelled)(,(pending|running|needs_input|postponed|completed|failed|cancelled))*$"})
                    }
                    _ => continue,
                };
                p["schema"] = schema;
            }
        }
    }
}

fn responses(doc: &mut Value) {
    set(
        doc,
        "CommandResponse",
        "data",
        json!({"description": "The command's result (shapes in docs/API.md), or null (e.g. not found)."}),
    );
    // Any JSON, `null` included.
    for (schema, field) in [
        ("SignalView", "data"),
        ("SignalRequest", "data"),
        ("KeyedSignalRequest", "data"),
    ] {
        set(
            doc,
            schema,
            field,
            json!({"description": "The signal's payload: any JSON (at most 64 KiB), or null."}),
        );
    }
    set(
        doc,
        "RunView",
        "input",
        json!({"description": "The input as triggered: any JSON."}),
    );
    set(
        doc,
        "RunView",
        "output",
        json!({"description": "The handler's output once completed: any JSON, or null."}),
    );
    set(
        doc,
        "ScheduleDto",
        "input",
        json!({"description": "The input template: any JSON."}),
    );
    set(
        doc,
        "HistoryView",
        "data",
        json!({"description": "More about the row: any JSON object."}),
    );
    set(
        doc,
        "RunView",
        "input_request",
        json!({"description": "What a run waiting for input asks: any JSON, or null."}),
    );
}
