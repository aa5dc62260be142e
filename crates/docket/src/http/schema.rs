//! A job's input JSON Schema (boon: drafts 4 to 2020-12, formats asserted).
//! A run whose input fails it ends `failed` with `invalid_input`, and the
//! message names each offending field (`input.email is required`,
//! `input.amount: want number, but got string`).

use boon::{Compiler, Draft, ErrorKind, InstanceToken, SchemaIndex, Schemas, ValidationError};
use serde_json::Value;

/// Messages after which the rest are summarized.
const MAX_MESSAGES: usize = 5;
const LOCATION: &str = "file:///docket/input-schema.json";

/// A compiled input schema.
pub(crate) struct InputSchema {
    schemas: Schemas,
    index: SchemaIndex,
}

impl std::fmt::Debug for InputSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InputSchema")
    }
}

impl InputSchema {
    /// Compiles a schema. It must be self-contained: `$ref`s to other files
    /// or URLs are not fetched.
    pub(crate) fn compile(schema: Value) -> Result<InputSchema, String> {
        let mut c = Compiler::new();
        c.set_default_draft(Draft::V2020_12);
        c.enable_format_assertions();
        c.use_loader(Box::new(boon::SchemeUrlLoader::new()));
        c.add_resource(LOCATION, schema)
            .map_err(|e| format!("invalid schema: {e}"))?;
        let mut schemas = Schemas::new();
        let index = c
            .compile(LOCATION, &mut schemas)
            .map_err(|e| format!("invalid schema: {e}"))?;
        Ok(InputSchema { schemas, index })
    }

    /// Checks `input`; the error names every offending field (up to five).
    pub(crate) fn check(&self, input: &Value) -> Result<(), String> {
        let Err(err) = self.schemas.validate(input, self.index) else {
            return Ok(());
        };
        let mut msgs = Vec::new();
        leaves(&err, &mut msgs);
        msgs.dedup();
        let more = msgs.len().saturating_sub(MAX_MESSAGES);
        msgs.truncate(MAX_MESSAGES);
        let mut out = format!(
            "the input does not match the job's input schema: {}",
            msgs.join("; ")
        );
        if more > 0 {
            out.push_str(&format!(" (and {more} more)"));
        }
        Err(out)
    }
}

fn field(tokens: &[InstanceToken<'_>]) -> String {
    let mut s = String::from("input");
    for t in tokens {
        match t {
            InstanceToken::Prop(p) => {
                s.push('.');
                s.push_str(p);
            }
            InstanceToken::Item(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn leaves(e: &ValidationError<'_, '_>, out: &mut Vec<String>) {
    if !e.causes.is_empty() {
        for c in &e.causes {
            leaves(c, out);
        }
        return;
    }
    let at = field(&e.instance_location.tokens);
    match &e.kind {
        ErrorKind::Required { want } => {
            for w in want {
                out.push(format!("`{at}.{w}` is required"));
            }
        }
        ErrorKind::DependentRequired { prop, missing } => {
            for m in missing {
                out.push(format!(
                    "`{at}.{m}` is required when `{at}.{prop}` is given"
                ));
            }
        }
        kind => out.push(format!("`{at}`: {kind}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_fields() {
        let s = InputSchema::compile(json!({
            "type": "object",
            "required": ["email", "amount"],
            "properties": {
                "email": {"type": "string", "format": "email"},
                "amount": {"type": "number", "minimum": 0},
                "items": {"type": "array", "items": {"type": "integer"}}
            }
        }))
        .unwrap();
        assert_eq!(s.check(&json!({"email": "a@b.co", "amount": 3})), Ok(()));
        let e = s.check(&json!({"amount": 3})).unwrap_err();
        assert!(e.contains("`input.email` is required"), "{e}");
        let e = s
            .check(&json!({"email": "a@b.co", "amount": "3"}))
            .unwrap_err();
        assert!(e.contains("`input.amount`"), "{e}");
        let e = s
            .check(&json!({"email": "nope", "amount": 1, "items": [1, "x"]}))
            .unwrap_err();
        assert!(
            e.contains("`input.email`") && e.contains("`input.items[1]`"),
            "{e}"
        );
    }

    #[test]
    fn a_broken_schema_is_refused() {
        assert!(InputSchema::compile(json!({"type": "objekt"})).is_err());
        assert!(InputSchema::compile(json!({"$ref": "https://example.com/s.json"})).is_err());
    }
}
