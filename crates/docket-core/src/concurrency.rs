//! Concurrency keys: the template a job declares and the key it renders
//! for one run.
//!
//! A job may say "at most N runs with the same key run at once, across every
//! process on the database" (docs/FLOW_CONTROL.md). The key is a template
//! over the run's tenant, job and input, e.g. `{{ tenant }}/{{ input.customer_id }}`.
//! It is rendered ONCE, when the run is triggered, and stored on the run
//! with its limit, so the store needs no job registry to enforce it and a
//! later change of the template only affects later runs.

use serde_json::Value;
use std::fmt;

/// A parsed key template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Tenant,
    Job,
    /// `input.a.b`: the path below the input (never empty).
    Input(Vec<String>),
}

/// Why a template could not be parsed: the message names the offending
/// variable or construct.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

/// Why a key could not be rendered for one run's input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The input has no value (or `null`) at this path (`input.customer_id`).
    #[error("the concurrency key needs `{0}`, which the input does not have")]
    Missing(String),
}

/// The longest key stored; a longer rendering is refused at trigger time
/// (a key is an index entry, and keys this long are a template mistake).
pub const MAX_KEY_LEN: usize = 512;

impl KeyTemplate {
    /// Parses `source`. Variables are `{{ tenant }}`, `{{ job }}` and
    /// `{{ input.<path> }}` (dot-separated object fields); anything else,
    /// an unclosed `{{` or an empty template is an error naming it.
    pub fn parse(source: &str) -> Result<KeyTemplate, TemplateError> {
        if source.trim().is_empty() {
            return Err(TemplateError("the key template is empty".into()));
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| TemplateError(format!("unclosed `{{{{` in `{source}`")))?;
            let var = after[..close].trim();
            parts.push(match var {
                "tenant" => Part::Tenant,
                "job" => Part::Job,
                v if v.starts_with("input.") => {
                    let path: Vec<String> = v["input.".len()..]
                        .split('.')
                        .map(str::to_string)
                        .collect();
                    if path.iter().any(|p| p.is_empty()) {
                        return Err(TemplateError(format!(
                            "bad input path `{v}` in the key template"
                        )));
                    }
                    Part::Input(path)
                }
                v => {
                    return Err(TemplateError(format!(
                        "unknown variable `{v}` in the key template (use `tenant`, `job` or `input.<field>`)"
                    )))
                }
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(KeyTemplate {
            source: source.to_string(),
            parts,
        })
    }

    /// The job-wide key: the job's name (a limit without a template).
    pub fn job_wide() -> KeyTemplate {
        KeyTemplate {
            source: "{{ job }}".into(),
            parts: vec![Part::Job],
        }
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The key of a run of `job` in `tenant` with `input`. A string value is
    /// inserted as is, any other JSON value as its compact JSON text; a
    /// missing or `null` field is an error naming its path.
    pub fn render(&self, tenant: &str, job: &str, input: &Value) -> Result<String, RenderError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Tenant => out.push_str(tenant),
                Part::Job => out.push_str(job),
                Part::Input(path) => {
                    let mut v = input;
                    for field in path {
                        v = match v.get(field) {
                            Some(x) => x,
                            None => {
                                return Err(RenderError::Missing(format!(
                                    "input.{}",
                                    path.join(".")
                                )))
                            }
                        };
                    }
                    match v {
                        Value::Null => {
                            return Err(RenderError::Missing(format!("input.{}", path.join("."))))
                        }
                        Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_tenant_job_and_input_paths() {
        let t = KeyTemplate::parse("{{ tenant }}/{{input.customer.id}}:{{ job }}").unwrap();
        let input = json!({ "customer": { "id": 42 } });
        assert_eq!(t.render("acme", "sync", &input).unwrap(), "acme/42:sync");
        let s = json!({ "customer": { "id": "c-7" } });
        assert_eq!(t.render("acme", "sync", &s).unwrap(), "acme/c-7:sync");
        assert_eq!(t.source(), "{{ tenant }}/{{input.customer.id}}:{{ job }}");
    }

    #[test]
    fn a_literal_template_is_one_key_and_the_job_wide_key_is_the_job() {
        let t = KeyTemplate::parse("payments").unwrap();
        assert_eq!(t.render("a", "j", &json!({})).unwrap(), "payments");
        assert_eq!(
            KeyTemplate::job_wide().render("a", "j", &json!(1)).unwrap(),
            "j"
        );
    }

    #[test]
    fn a_missing_or_null_field_names_its_path() {
        let t = KeyTemplate::parse("{{ input.customer_id }}").unwrap();
        for input in [json!({}), json!({ "customer_id": null }), json!(3)] {
            assert_eq!(
                t.render("a", "j", &input),
                Err(RenderError::Missing("input.customer_id".into()))
            );
        }
    }

    #[test]
    fn unknown_variables_and_bad_syntax_are_named() {
        let e = KeyTemplate::parse("{{ tenant }}/{{ customer }}").unwrap_err();
        assert!(e.0.contains("unknown variable `customer`"), "{e}");
        let e = KeyTemplate::parse("{{ input. }}").unwrap_err();
        assert!(e.0.contains("`input.`"), "{e}");
        let e = KeyTemplate::parse("{{ tenant").unwrap_err();
        assert!(e.0.contains("unclosed"), "{e}");
        assert!(KeyTemplate::parse("  ").is_err());
    }
}
