//! The patch formats: JSON merge patch (RFC 7386), strategic merge patch for the lists the
//! served kinds mark as merged by a key, and JSON patch (RFC 6902). Pure: each applies a patch
//! document to an object's JSON or says which part of the patch it cannot apply.

use serde_json::{Map, Value};

/// The patch content types the server accepts.
pub(crate) const MERGE: &str = "application/merge-patch+json";
pub(crate) const STRATEGIC: &str = "application/strategic-merge-patch+json";
pub(crate) const JSON: &str = "application/json-patch+json";
pub(crate) const APPLY: &str = "application/apply-patch+yaml";

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// How a list of the served kinds merges under a strategic merge patch (the Go types'
/// `patchStrategy:"merge"`); every other list is replaced, as in a merge patch.
enum ListMerge {
    ByKey(&'static str),
    Primitive,
}

/// Paths are the object's field names joined with '.', list elements adding nothing.
fn list_merge(path: &str) -> Option<ListMerge> {
    Some(match path {
        "metadata.ownerReferences" => ListMerge::ByKey("uid"),
        "metadata.finalizers" | "spec.podCIDRs" => ListMerge::Primitive,
        "status.conditions" | "status.addresses" => ListMerge::ByKey("type"),
        "status.podIPs" | "status.hostIPs" => ListMerge::ByKey("ip"),
        "status.volumesAttached" => ListMerge::ByKey("name"),
        "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers" | "spec.volumes" => {
            ListMerge::ByKey("name")
        }
        "spec.containers.env" | "spec.initContainers.env" => ListMerge::ByKey("name"),
        "spec.containers.ports" | "spec.initContainers.ports" => ListMerge::ByKey("containerPort"),
        "spec.containers.volumeMounts" | "spec.initContainers.volumeMounts" => {
            ListMerge::ByKey("mountPath")
        }
        _ => return None,
    })
}

/// A strategic merge patch: a merge patch in which the keyed lists above merge element by
/// element. Directives (`$patch`, `$retainKeys`, `$setElementOrder/…`, `$deleteFromPrimitiveList/…`)
/// are refused, naming the directive.
pub(crate) fn strategic(target: &mut Value, patch: &Value) -> Result<(), String> {
    strategic_at(target, patch, "")
}

fn strategic_at(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        let here = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if k.starts_with('$') {
            return Err(format!(
                "strategic merge patch directive {k:?} at {path:?} is not supported by lab-kube"
            ));
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (list_merge(&here), v) {
            (Some(how), Value::Array(items)) => {
                let slot = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !slot.is_array() {
                    *slot = Value::Array(Vec::new());
                }
                if let Value::Array(list) = slot {
                    merge_list(list, items, how, &here)?;
                }
            }
            _ => strategic_at(t.entry(k.clone()).or_insert(Value::Null), v, &here)?,
        }
    }
    Ok(())
}

fn merge_list(
    list: &mut Vec<Value>,
    items: &[Value],
    how: ListMerge,
    path: &str,
) -> Result<(), String> {
    match how {
        ListMerge::Primitive => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        ListMerge::ByKey(key) => {
            for item in items {
                let Some(id) = item.get(key).filter(|id| !id.is_null()) else {
                    return Err(format!(
                        "an element of {path} in the patch has no merge key {key:?}: {item}"
                    ));
                };
                match list.iter_mut().find(|e| e.get(key) == Some(id)) {
                    Some(existing) => strategic_at(existing, item, path)?,
                    None => list.push(item.clone()),
                }
            }
        }
    }
    Ok(())
}

/// One JSON pointer token list (`/a/b~1c` → `a`, `b/c`).
fn tokens(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!("path {pointer:?} does not start with '/'"));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn index(list: &[Value], token: &str, pointer: &str, for_add: bool) -> Result<usize, String> {
    if for_add && token == "-" {
        return Ok(list.len());
    }
    let i = token
        .parse::<usize>()
        .map_err(|_| format!("{token:?} in {pointer:?} is not an array index"))?;
    let max = if for_add {
        list.len()
    } else {
        list.len().saturating_sub(1)
    };
    if i > max || (!for_add && list.is_empty()) {
        return Err(format!("index {i} in {pointer:?} is out of range"));
    }
    Ok(i)
}

fn parent<'a>(doc: &'a mut Value, pointer: &str) -> Result<(&'a mut Value, String), String> {
    let mut toks = tokens(pointer)?;
    let Some(last) = toks.pop() else {
        return Err("the whole document cannot be the target here".to_string());
    };
    let mut cur = doc;
    for t in &toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("{pointer:?}: no member {t:?}"))?,
            Value::Array(a) => {
                let i = index(a, t, pointer, false)?;
                &mut a[i]
            }
            _ => return Err(format!("{pointer:?}: {t:?} is inside a scalar")),
        };
    }
    Ok((cur, last))
}

fn get<'a>(doc: &'a Value, pointer: &str) -> Result<&'a Value, String> {
    doc.pointer(pointer)
        .ok_or_else(|| format!("{pointer:?} does not exist"))
}

fn add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    if pointer.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (p, last) = parent(doc, pointer)?;
    match p {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) => {
            let i = index(a, &last, pointer, true)?;
            a.insert(i, value);
        }
        _ => return Err(format!("{pointer:?}: the parent is a scalar")),
    }
    Ok(())
}

fn remove(doc: &mut Value, pointer: &str) -> Result<Value, String> {
    let (p, last) = parent(doc, pointer)?;
    match p {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("{pointer:?} does not exist")),
        Value::Array(a) => {
            let i = index(a, &last, pointer, false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("{pointer:?}: the parent is a scalar")),
    }
}

/// RFC 6902. The error names the failing operation (its index and `op`) and why.
pub(crate) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Array(ops) = patch else {
        return Err("a JSON patch must be an array of operations".to_string());
    };
    for (i, op) in ops.iter().enumerate() {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let fail = |why: String| format!("operation {i} ({name:?}): {why}");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("no \"path\"".to_string()))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| fail("no \"value\"".to_string()))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| fail("no \"from\"".to_string()))
        };
        match name {
            "add" => add(doc, path, value()?).map_err(fail)?,
            "remove" => {
                remove(doc, path).map_err(fail)?;
            }
            "replace" => {
                get(doc, path).map_err(fail)?;
                if path.is_empty() {
                    *doc = value()?;
                } else {
                    remove(doc, path).map_err(fail)?;
                    add(doc, path, value()?).map_err(fail)?;
                }
            }
            "move" => {
                let v = remove(doc, from()?).map_err(fail)?;
                add(doc, path, v).map_err(fail)?;
            }
            "copy" => {
                let v = get(doc, from()?).map_err(fail)?.clone();
                add(doc, path, v).map_err(fail)?;
            }
            "test" => {
                let want = value()?;
                if get(doc, path).map_err(fail)? != &want {
                    return Err(fail(format!("{path:?} is not {want}")));
                }
            }
            other => return Err(fail(format!("unknown op {other:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge(
            &mut t,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            t,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
    }

    #[test]
    fn strategic_merge_merges_keyed_lists_and_refuses_directives() {
        let mut node = json!({"metadata": {"finalizers": ["a"]}, "status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "MemoryPressure", "status": "False"}]}});
        strategic(
            &mut node,
            &json!({"metadata": {"finalizers": ["b", "a"], "labels": {"x": "1"}},
                    "status": {"conditions": [{"type": "Ready", "status": "True"},
                                              {"type": "NetworkUnavailable", "status": "False"}]}}),
        )
        .expect("applies");
        assert_eq!(
            node,
            json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1"}}, "status": {"conditions": [
                {"type": "Ready", "status": "True"}, {"type": "MemoryPressure", "status": "False"},
                {"type": "NetworkUnavailable", "status": "False"}]}})
        );
        let e =
            strategic(&mut node, &json!({"status": {"$patch": "replace"}})).expect_err("directive");
        assert!(e.contains("$patch"), "{e}");
        let e = strategic(
            &mut node,
            &json!({"status": {"conditions": [{"status": "x"}]}}),
        )
        .expect_err("no key");
        assert!(e.contains("status.conditions") && e.contains("type"), "{e}");
    }

    #[test]
    fn json_patch_follows_rfc_6902() {
        let mut d = json!({"metadata": {"annotations": {"a/b": "1"}}, "l": [1, 2]});
        json_patch(
            &mut d,
            &json!([
                {"op": "test", "path": "/metadata/annotations/a~1b", "value": "1"},
                {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}},
                {"op": "replace", "path": "/l/0", "value": 9},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "copy", "from": "/l/0", "path": "/c"},
                {"op": "move", "from": "/c", "path": "/m"},
                {"op": "remove", "path": "/metadata/annotations/a~1b"}
            ]),
        )
        .expect("applies");
        assert_eq!(
            d,
            json!({"metadata": {"annotations": {}, "labels": {"x": "y"}}, "l": [9, 2, 3], "m": 9})
        );
        let e =
            json_patch(&mut d, &json!([{"op": "remove", "path": "/nope"}])).expect_err("missing");
        assert!(e.contains("operation 0") && e.contains("/nope"), "{e}");
        let e = json_patch(&mut d, &json!([{"op": "test", "path": "/m", "value": 1}]))
            .expect_err("test");
        assert!(e.contains("\"test\""), "{e}");
        assert!(json_patch(&mut d, &json!({"op": "add"})).is_err());
    }
}
