//! Templates for URLs, headers, bodies and idempotency keys (minijinja:
//! `{{ input.email }}`, `{{ variables.region }}`, `{{ idempotency_key }}`,
//! `{{ input.name | urlencode }}`).
//!
//! A JSON body is written as a TOML table whose string leaves are
//! templates. A leaf that is exactly one expression (`"{{ input.amount }}"`)
//! keeps the value's JSON type (a number stays a number); any other string
//! leaf renders to a string.

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value;

/// Every template of a configuration, compiled once, by name
/// (`jobs.send-email.path`).
pub(crate) struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

/// A JSON value whose strings are templates.
#[derive(Debug, Clone)]
pub(crate) enum JsonTemplate {
    /// A value with nothing to fill in.
    Literal(Value),
    /// A string template (by name).
    Text(String),
    /// One whole expression: its value keeps its JSON type.
    Expr {
        /// Where it is written (for messages).
        place: String,
        /// The expression inside `{{ … }}`.
        expr: String,
    },
    /// An array of templates.
    Array(Vec<JsonTemplate>),
    /// An object of templates.
    Object(Vec<(String, JsonTemplate)>),
}

impl Templates {
    pub(crate) fn new() -> Templates {
        let mut env = Environment::new();
        // Lenient enough for `{% if input.coupon %}` and `| default(…)`,
        // strict about printing a value that is not there.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        Templates { env }
    }

    /// Compiles `source` under `name`.
    pub(crate) fn add(&mut self, name: &str, source: &str) -> Result<(), String> {
        self.env
            .add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| describe(&e))
    }

    /// Renders the template `name`. An undefined value names the field.
    pub(crate) fn render(&self, name: &str, data: &Value) -> Result<String, String> {
        let t = self.env.get_template(name).map_err(|e| describe(&e))?;
        t.render(Serde(data))
            .map_err(|e| format!("`{name}`: {}", describe(&e)))
    }

    /// Compiles a JSON body (or any JSON with template strings) whose
    /// templates are named under `prefix`.
    pub(crate) fn add_json(&mut self, prefix: &str, v: &Value) -> Result<JsonTemplate, String> {
        Ok(match v {
            Value::String(s) if !s.contains("{{") && !s.contains("{%") => {
                JsonTemplate::Literal(v.clone())
            }
            Value::String(s) => match whole_expression(s) {
                Some(expr) => {
                    self.env
                        .compile_expression_owned(expr.to_string())
                        .map_err(|e| format!("`{prefix}`: {}", describe(&e)))?;
                    JsonTemplate::Expr {
                        place: prefix.to_string(),
                        expr: expr.to_string(),
                    }
                }
                None => {
                    self.add(prefix, s)
                        .map_err(|e| format!("`{prefix}`: {e}"))?;
                    JsonTemplate::Text(prefix.to_string())
                }
            },
            Value::Array(items) => JsonTemplate::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.add_json(&format!("{prefix}.{i}"), item))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => JsonTemplate::Object(
                m.iter()
                    .map(|(k, item)| {
                        Ok((k.clone(), self.add_json(&format!("{prefix}.{k}"), item)?))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            other => JsonTemplate::Literal(other.clone()),
        })
    }

    /// The variables (dotted, `steps.create_invoice.body.id`) read by every
    /// template named `prefix.…`, as (template name, variable) pairs.
    pub(crate) fn reads_under(&self, prefix: &str) -> Vec<(String, String)> {
        let dotted = format!("{prefix}.");
        let mut out = Vec::new();
        for (name, t) in self.env.templates() {
            if name.starts_with(&dotted) {
                for v in t.undeclared_variables(true) {
                    out.push((name.to_string(), v));
                }
            }
        }
        out
    }

    /// The variables read by the whole-expression leaves of a JSON template
    /// (its text leaves are templates: see [`Templates::reads_under`]).
    pub(crate) fn json_reads(&self, t: &JsonTemplate) -> Vec<(String, String)> {
        match t {
            JsonTemplate::Literal(_) | JsonTemplate::Text(_) => Vec::new(),
            JsonTemplate::Expr { place, expr } => match self.env.compile_expression(expr) {
                Ok(e) => e
                    .undeclared_variables(true)
                    .into_iter()
                    .map(|v| (place.clone(), v))
                    .collect(),
                Err(_) => Vec::new(),
            },
            JsonTemplate::Array(items) => items.iter().flat_map(|i| self.json_reads(i)).collect(),
            JsonTemplate::Object(fields) => fields
                .iter()
                .flat_map(|(_, i)| self.json_reads(i))
                .collect(),
        }
    }

    /// Fills a JSON template.
    pub(crate) fn render_json(&self, t: &JsonTemplate, data: &Value) -> Result<Value, String> {
        Ok(match t {
            JsonTemplate::Literal(v) => v.clone(),
            JsonTemplate::Text(name) => Value::String(self.render(name, data)?),
            JsonTemplate::Expr { place, expr } => {
                let e = self
                    .env
                    .compile_expression_owned(expr.to_string())
                    .map_err(|e| format!("`{place}`: {}", describe(&e)))?;
                let v = e
                    .eval(Serde(data))
                    .map_err(|e| format!("`{place}`: {}", describe(&e)))?;
                if v.is_undefined() {
                    let mut names: Vec<String> = e.undeclared_variables(true).into_iter().collect();
                    names.sort();
                    let missing = names
                        .into_iter()
                        .find(|n| super::condition::lookup(data, n).is_none())
                        .unwrap_or_else(|| expr.trim().to_string());
                    return Err(format!("`{place}`: `{missing}` is undefined"));
                }
                serde_json::to_value(&v).map_err(|e| format!("`{place}`: {e}"))?
            }
            JsonTemplate::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.render_json(i, data))
                    .collect::<Result<_, _>>()?,
            ),
            JsonTemplate::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), self.render_json(t, data)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// `"{{ input.amount }}"` → `Some("input.amount")`; anything with text or a
/// second block around it → `None`.
fn whole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    let inner = inner.trim_start_matches('-').trim_end_matches('-').trim();
    (!inner.is_empty()).then_some(inner)
}

/// minijinja's message with its detail (which names the undefined field).
fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) => format!("{d} ({})", e.kind()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_render_and_whole_expressions_keep_their_type() {
        let mut t = Templates::new();
        let body = json!({
            "to": "{{ input.email }}",
            "amount": "{{ input.amount }}",
            "note": "Dear {{ input.name }}",
            "fixed": 3,
            "tags": ["{{ input.tag }}", "x"],
            "region": "{{ variables.region | default('eu') }}",
        });
        let tpl = t.add_json("jobs.j.body", &body).unwrap();
        let data = json!({"input": {"email": "a@b.c", "amount": 12.5, "name": "Ada", "tag": "vip"}, "variables": {}});
        assert_eq!(
            t.render_json(&tpl, &data).unwrap(),
            json!({"to": "a@b.c", "amount": 12.5, "note": "Dear Ada", "fixed": 3, "tags": ["vip", "x"], "region": "eu"})
        );
    }

    #[test]
    fn an_undefined_field_is_named() {
        let mut t = Templates::new();
        t.add("jobs.j.path", "/emails/{{ input.emial }}").unwrap();
        let e = t
            .render("jobs.j.path", &json!({"input": {"email": "x"}}))
            .unwrap_err();
        assert!(e.contains("`input.emial` is undefined"), "{e}");
        let tpl = t
            .add_json("jobs.j.body", &json!({"n": "{{ input.count }}"}))
            .unwrap();
        let e = t.render_json(&tpl, &json!({"input": {}})).unwrap_err();
        assert!(e.contains("`input.count` is undefined"), "{e}");
    }

    #[test]
    fn urlencode_and_syntax_errors() {
        let mut t = Templates::new();
        t.add("u", "/search?q={{ input.q | urlencode }}").unwrap();
        // Like Jinja's, `urlencode` keeps `/` (legal in a query).
        assert_eq!(
            t.render("u", &json!({"input": {"q": "a b/c&d"}})).unwrap(),
            "/search?q=a%20b/c%26d"
        );
        assert!(t.add("bad", "{{ input.x ").is_err());
        assert!(whole_expression("{{ a }} and {{ b }}").is_none());
        assert_eq!(whole_expression(" {{ a.b }} "), Some("a.b"));
    }
}
