//! `labelSelector` and `fieldSelector`: parsing (errors name the bad term) and matching an
//! object's JSON. Pure.

use serde_json::Value;

use crate::resource::Resource;

#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

#[derive(Clone, Debug, PartialEq)]
struct FieldReq {
    pointer: &'static str,
    absent: &'static str,
    value: String,
    equal: bool,
}

/// A parsed `labelSelector` and `fieldSelector` (both empty: everything matches).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

pub(crate) fn valid_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
    });
    name_ok && prefix_ok
}

pub(crate) fn valid_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_label_term(term: &str) -> Result<LabelReq, String> {
    let t = term.trim();
    let bad = |why: &str| format!("unable to parse requirement {t:?}: {why}");
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if valid_key(k) {
            Ok(k.to_string())
        } else {
            Err(bad(&format!("{k:?} is not a valid label key")))
        }
    };
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        if valid_value(v) {
            Ok(v.to_string())
        } else {
            Err(bad(&format!("{v:?} is not a valid label value")))
        }
    };
    if let Some(open) = t.find('(') {
        let Some(inner) = t[open + 1..].strip_suffix(')') else {
            return Err(bad("a set must end with ')'"));
        };
        let mut words = t[..open].split_whitespace();
        let (Some(k), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad("expected `key in (…)` or `key notin (…)`"));
        };
        let values = inner.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
        return match op {
            "in" => Ok(LabelReq::In(key(k)?, values)),
            "notin" => Ok(LabelReq::NotIn(key(k)?, values)),
            other => Err(bad(&format!("unknown set operator {other:?}"))),
        };
    }
    if let Some(k) = t.strip_prefix('!') {
        return Ok(LabelReq::NotExists(key(k)?));
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(LabelReq::NotEquals(key(k)?, value(v)?));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(LabelReq::Equals(key(k)?, value(v)?));
    }
    for (op, gt) in [('>', true), ('<', false)] {
        if let Some((k, v)) = t.split_once(op) {
            let n = v
                .trim()
                .parse::<i64>()
                .map_err(|_| bad(&format!("{:?} is not an integer", v.trim())))?;
            return Ok(if gt {
                LabelReq::Gt(key(k)?, n)
            } else {
                LabelReq::Lt(key(k)?, n)
            });
        }
    }
    Ok(LabelReq::Exists(key(t)?))
}

fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_terms(s).into_iter().map(parse_label_term).collect()
}

/// Splits on `sep` not preceded by a backslash.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut escaped) = (0usize, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn parse_fields(resource: Resource, s: &str) -> Result<Vec<FieldReq>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for term in split_unescaped(s, ',') {
        let (k, v, equal) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, v, true)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, v, true)
        } else {
            return Err(format!(
                "invalid selector: {s:?}; can't understand {term:?}"
            ));
        };
        let k = k.trim();
        let Some(label) = resource.field_labels().iter().find(|f| f.label == k) else {
            return Err(format!(
                "field label not supported: {k} (for {resource}: {})",
                resource
                    .field_labels()
                    .iter()
                    .map(|f| f.label)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        out.push(FieldReq {
            pointer: label.pointer,
            absent: label.absent,
            value: unescape(v),
            equal,
        });
    }
    Ok(out)
}

fn field_text(v: Option<&Value>, absent: &str) -> String {
    match v {
        None | Some(Value::Null) => absent.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(other) => other.to_string(),
    }
}

impl Selector {
    /// Parses the query's selectors for `resource`; the error names the bad term or field.
    pub fn parse(
        resource: Resource,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Selector, String> {
        Ok(Selector {
            labels: parse_labels(labels.unwrap_or_default())?,
            fields: parse_fields(resource, fields.unwrap_or_default())?,
        })
    }

    /// Whether the object `v` (its JSON) is selected.
    pub fn matches(&self, v: &Value) -> bool {
        let labels = v.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|m| m.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Equals(k, want) => label(k) == Some(want.as_str()),
            LabelReq::NotEquals(k, want) => label(k) != Some(want.as_str()),
            LabelReq::In(k, set) => label(k).is_some_and(|l| set.iter().any(|s| s == l)),
            LabelReq::NotIn(k, set) => label(k).is_none_or(|l| set.iter().all(|s| s != l)),
            LabelReq::Gt(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            LabelReq::Lt(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        });
        labels_ok
            && self
                .fields
                .iter()
                .all(|f| (field_text(v.pointer(f.pointer), f.absent) == f.value) == f.equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: Option<&str>) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "labels": labels},
               "spec": {"nodeName": node}})
    }

    fn sel(labels: &str, fields: &str) -> Selector {
        Selector::parse(Resource::Pods, Some(labels), Some(fields)).expect("parses")
    }

    #[test]
    fn label_selectors_follow_the_real_semantics() {
        let p = pod(json!({"app": "web", "tier": "3"}), None);
        for (s, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier", true),
            ("app=web,missing", false),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("missing notin (a)", true),
            ("tier>2", true),
            ("tier<3", false),
            ("example.com/role", false),
        ] {
            assert_eq!(sel(s, "").matches(&p), want, "{s}");
        }
    }

    #[test]
    fn bad_label_selectors_name_the_term() {
        for bad in ["app=we b", "a b", "in (x", "app in x)", "=x", "tier>two"] {
            let e = Selector::parse(Resource::Pods, Some(bad), None).expect_err(bad);
            assert!(e.contains("unable to parse requirement"), "{bad}: {e}");
        }
    }

    #[test]
    fn field_selectors_use_the_resources_field_labels() {
        let on = pod(json!({}), Some("node-1"));
        let off = pod(json!({}), None);
        assert!(sel("", "spec.nodeName=node-1").matches(&on));
        assert!(!sel("", "spec.nodeName=node-1").matches(&off));
        assert!(sel("", "spec.nodeName=").matches(&off));
        assert!(sel("", "spec.nodeName!=node-2,metadata.name=p").matches(&on));
        assert!(sel("", "spec.hostNetwork=false").matches(&on));
        assert!(sel("", r"metadata.name=a\,b").fields[0].value == "a,b");
        let e = Selector::parse(Resource::Pods, None, Some("spec.foo=x")).expect_err("unknown");
        assert!(e.contains("field label not supported: spec.foo"), "{e}");
        let e =
            Selector::parse(Resource::Nodes, None, Some("spec.nodeName=x")).expect_err("pods only");
        assert!(e.contains("spec.nodeName"), "{e}");
        let e = Selector::parse(Resource::Pods, None, Some("nonsense")).expect_err("no op");
        assert!(e.contains("nonsense"), "{e}");
    }
}
