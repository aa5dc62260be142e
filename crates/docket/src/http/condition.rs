//! Conditions (`when`, `approval`, a reconcile's `found_when`) in evalexpr's
//! small expression language: `input.amount > 1000 && input.tier == "gold"`.
//!
//! A run's JSON is mapped into evalexpr's context under dotted names
//! (`input.customer.tier`, `variables.region`, `input.items.0`): only the
//! names the expression reads are looked up, so a name the data lacks is
//! reported by name instead of silently comparing against nothing.

use evalexpr::{
    build_operator_tree, ContextWithMutableVariables, DefaultNumericTypes, HashMapContext, Node,
    Value as EValue,
};
use serde_json::Value;

/// A compiled condition.
pub(crate) struct Condition {
    /// The expression as written in `docket.toml`.
    pub(crate) source: String,
    node: Node<DefaultNumericTypes>,
    reads: Vec<String>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

/// Why a condition could not be decided.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ConditionError {
    /// The expression reads a field the data does not have (the dotted name).
    Missing(String),
    /// Anything else: a type mismatch, an object where a value was wanted.
    Invalid(String),
}

impl Condition {
    /// Compiles `source`; every name it reads must be one of `roots` or start
    /// with `root.` (e.g. `input.amount`), and it must not assign anything.
    pub(crate) fn compile(source: &str, roots: &[&str]) -> Result<Condition, String> {
        let node = build_operator_tree::<DefaultNumericTypes>(source)
            .map_err(|e| format!("cannot parse `{source}`: {e}"))?;
        check_shape(&node, source)?;
        let reads: Vec<String> = node
            .iter_read_variable_identifiers()
            .map(String::from)
            .collect();
        let all: Vec<String> = node.iter_variable_identifiers().map(String::from).collect();
        if let Some(w) = all.iter().find(|i| !reads.contains(i)) {
            return Err(format!(
                "`{source}` assigns to `{w}`: a condition may only read values"
            ));
        }
        for name in &reads {
            let root = name.split('.').next().unwrap_or_default();
            if !roots.contains(&root) {
                return Err(format!(
                    "`{source}` reads `{name}`; names must start with {}",
                    roots
                        .iter()
                        .map(|r| format!("`{r}.`"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
        }
        Ok(Condition {
            source: source.to_string(),
            node,
            reads,
        })
    }

    /// The dotted names the condition reads (`input.amount`).
    pub(crate) fn reads(&self) -> &[String] {
        &self.reads
    }

    /// Evaluates the condition against `data`, an object whose keys are the
    /// roots (`{"input": …, "variables": …}`).
    pub(crate) fn eval(&self, data: &Value) -> Result<bool, ConditionError> {
        let mut ctx = HashMapContext::<DefaultNumericTypes>::new();
        for name in &self.reads {
            let v = lookup(data, name).ok_or_else(|| ConditionError::Missing(name.clone()))?;
            let v = to_evalexpr(v).map_err(|why| {
                ConditionError::Invalid(format!("`{}`: `{name}` {why}", self.source))
            })?;
            ctx.set_value(name.clone(), v)
                .map_err(|e| ConditionError::Invalid(e.to_string()))?;
        }
        self.node.eval_boolean_with_context(&ctx).map_err(|e| {
            ConditionError::Invalid(format!("`{}` cannot be evaluated: {e}", self.source))
        })
    }
}

/// evalexpr parses an incomplete expression (`a >`) into a tree with a
/// missing operand and only fails when evaluating it: refuse such trees (and
/// assignments) at load instead.
fn check_shape(node: &Node<DefaultNumericTypes>, source: &str) -> Result<(), String> {
    use evalexpr::Operator::*;
    let n = node.children().len();
    let want = match node.operator() {
        Add | Sub | Mul | Div | Mod | Exp | Eq | Neq | Gt | Lt | Geq | Leq | And | Or => Some(2),
        Not | Neg | FunctionIdentifier { .. } => Some(1),
        RootNode if n == 0 => return Err(format!("`{source}` is empty")),
        Assign
        | AddAssign
        | SubAssign
        | MulAssign
        | DivAssign
        | ModAssign
        | ExpAssign
        | AndAssign
        | OrAssign
        | VariableIdentifierWrite { .. } => {
            return Err(format!(
                "`{source}` assigns: a condition may only read values"
            ))
        }
        _ => None,
    };
    if want.is_some_and(|w| w != n) {
        return Err(format!(
            "`{source}` is incomplete: `{}` needs {} operand(s)",
            node.operator(),
            want.unwrap_or(0)
        ));
    }
    node.children()
        .iter()
        .try_for_each(|c| check_shape(c, source))
}

/// The value at a dotted path (`input.items.0.sku`); numeric segments index
/// arrays. `None` when any segment is missing (a JSON `null` is present).
pub(crate) fn lookup<'a>(data: &'a Value, dotted: &str) -> Option<&'a Value> {
    let mut cur = data;
    for seg in dotted.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn to_evalexpr(v: &Value) -> Result<EValue<DefaultNumericTypes>, &'static str> {
    Ok(match v {
        Value::Null => EValue::Empty,
        Value::Bool(b) => EValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => EValue::Int(i),
            None => EValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => EValue::String(s.clone()),
        Value::Array(a) => EValue::Tuple(a.iter().map(to_evalexpr).collect::<Result<_, _>>()?),
        Value::Object(_) => {
            return Err("is an object: compare one of its fields (e.g. `input.customer.tier`)")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROOTS: &[&str] = &["input", "variables"];

    #[test]
    fn dotted_names_numbers_and_strings() {
        let c = Condition::compile(
            r#"input.amount > 1000 && input.customer.tier == "gold""#,
            ROOTS,
        )
        .unwrap();
        let data = json!({"input": {"amount": 1500.5, "customer": {"tier": "gold"}}});
        assert_eq!(c.eval(&data), Ok(true));
        let data = json!({"input": {"amount": 10, "customer": {"tier": "gold"}}});
        assert_eq!(c.eval(&data), Ok(false));
        let c = Condition::compile("len(input.items) > 1 && input.items.0 == 3", ROOTS).unwrap();
        assert_eq!(c.eval(&json!({"input": {"items": [3, 4]}})), Ok(true));
    }

    #[test]
    fn a_missing_field_is_named() {
        let c = Condition::compile("input.amount > 1000", ROOTS).unwrap();
        assert_eq!(
            c.eval(&json!({"input": {"amont": 3}})),
            Err(ConditionError::Missing("input.amount".into()))
        );
        let c = Condition::compile("input.customer > 1", ROOTS).unwrap();
        assert!(matches!(
            c.eval(&json!({"input": {"customer": {}}})),
            Err(ConditionError::Invalid(m)) if m.contains("is an object")
        ));
        let c = Condition::compile(r#"input.amount > "x""#, ROOTS).unwrap();
        assert!(matches!(
            c.eval(&json!({"input": {"amount": 1}})),
            Err(ConditionError::Invalid(_))
        ));
    }

    #[test]
    fn compile_refuses_foreign_names_assignments_and_bad_syntax() {
        let e = Condition::compile("inptu.amount > 3", ROOTS).unwrap_err();
        assert!(e.contains("`inptu.amount`"), "{e}");
        let e = Condition::compile("input.a = 3", ROOTS).unwrap_err();
        assert!(e.contains("assigns"), "{e}");
        assert!(Condition::compile("input.a >", ROOTS).is_err());
    }
}
