//! The API's semantics for the served kinds, without HTTP: get, list, create, replace, patch
//! and delete, with the real server's rules where this crate implements them (system fields,
//! resourceVersion preconditions, the status subresource, generation, pod validation and
//! status on create, graceful pod deletion, finalizers). Errors are `ApiError`s.

use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
use serde_json::Value;

use crate::patch;
use crate::resource::{Object, Resource, invalid_name};
use crate::select::{self, Selector};
use crate::status::{self, ApiError};
use crate::store::{Inner, Store, generated_name, key, later, new_uid, now};

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The upstream ENIConfig schema (structural): `spec` an object, `spec.subnet` a required
/// string, `spec.securityGroups` an array of strings, `status` an object.
fn eniconfig_schema(v: &Value) -> Vec<(String, String)> {
    let mut causes = Vec::new();
    let wrong = |field: String, want: &str, got: &Value| {
        let why = format!(
            "Invalid value: {:?}: {field} in body must be of type {want}",
            json_type(got)
        );
        (field, why)
    };
    match v.get("spec") {
        None | Some(Value::Null) => {}
        Some(Value::Object(spec)) => {
            match spec.get("subnet") {
                None | Some(Value::Null) => {}
                Some(Value::String(_)) => {}
                Some(other) => causes.push(wrong("spec.subnet".to_string(), "string", other)),
            }
            match spec.get("securityGroups") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        if !item.is_string() {
                            causes.push(wrong(format!("spec.securityGroups[{i}]"), "string", item));
                        }
                    }
                }
                Some(other) => {
                    causes.push(wrong("spec.securityGroups".to_string(), "array", other))
                }
            }
            if spec.get("subnet").is_none_or(Value::is_null) {
                causes.push(("spec.subnet".to_string(), "Required value".to_string()));
            }
        }
        Some(other) => causes.push(wrong("spec".to_string(), "object", other)),
    }
    if let Some(s) = v.get("status").filter(|s| !s.is_null() && !s.is_object()) {
        causes.push(wrong("status".to_string(), "object", s));
    }
    causes
}

/// Decodes a request body (or a patched object) as an object of `resource`: it must name the
/// resource's `apiVersion` and `kind`, and decode into the typed struct.
pub(crate) fn decode(resource: Resource, v: Value) -> Result<Object, ApiError> {
    let Value::Object(map) = &v else {
        return Err(ApiError::bad_request(format!(
            "the body must be a JSON object holding a {}, not {}",
            resource.kind(),
            json_type(&v)
        )));
    };
    let field = |k: &str| {
        map.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if kind.is_empty() {
        return Err(ApiError::bad_request(
            "Object 'Kind' is missing in the body",
        ));
    }
    if api_version.is_empty() {
        return Err(ApiError::bad_request(
            "Object 'apiVersion' is missing in the body",
        ));
    }
    if (api_version.as_str(), kind.as_str()) != (resource.api_version(), resource.kind()) {
        return Err(ApiError::bad_request(format!(
            "the body holds apiVersion {api_version:?} kind {kind:?}, but {resource} holds \
             apiVersion {:?} kind {:?}",
            resource.api_version(),
            resource.kind()
        )));
    }
    if resource == Resource::EniConfigs {
        let causes = eniconfig_schema(&v);
        if !causes.is_empty() {
            let name = v
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            return Err(ApiError::invalid(resource, &name, causes));
        }
    }
    Object::from_value(resource, v).map_err(|e| {
        ApiError::bad_request(format!(
            "{kind} in version {:?} cannot be handled as a {kind}: {e}",
            resource.version()
        ))
    })
}

/// The namespace rule: a namespaced object takes the URL's namespace (a different one in the
/// body is refused); a cluster-scoped one has none.
fn place(resource: Resource, object: &mut Object, url_ns: Option<&str>) -> Result<(), ApiError> {
    let meta = object.meta_mut();
    if !resource.namespaced() {
        meta.namespace = None;
        return Ok(());
    }
    let url_ns = url_ns.unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != url_ns => Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({ns}) does not match the namespace sent on \
             the request ({url_ns})"
        ))),
        _ => {
            meta.namespace = Some(url_ns.to_string());
            Ok(())
        }
    }
}

/// The QoS class the real server gives a new pod (quantities compared as written).
fn qos_class(spec: &PodSpec) -> &'static str {
    let (mut any, mut guaranteed) = (false, true);
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let res = c.resources.as_ref();
        for r in ["cpu", "memory"] {
            let limit = res.and_then(|x| x.limits.as_ref()).and_then(|m| m.get(r));
            let request = res.and_then(|x| x.requests.as_ref()).and_then(|m| m.get(r));
            any |= limit.is_some() || request.is_some();
            match (limit, request) {
                (Some(l), Some(q)) if l == q => {}
                (Some(_), None) => {}
                _ => guaranteed = false,
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Pod spec fields an update may change (others are immutable once created).
fn immutable_part(spec: Option<&PodSpec>) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        for f in [
            "activeDeadlineSeconds",
            "tolerations",
            "terminationGracePeriodSeconds",
            "schedulingGates",
        ] {
            m.remove(f);
        }
        for list in ["containers", "initContainers"] {
            for c in m
                .get_mut(list)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(c) = c.as_object_mut() {
                    c.remove("image");
                }
            }
        }
    }
    v
}

/// What is wrong with `object` (and, on an update, with the change from `old`).
fn validate(object: &Object, old: Option<&Object>) -> Vec<(String, String)> {
    let mut causes = Vec::new();
    let meta = object.meta();
    for (k, v) in meta.labels.iter().flatten() {
        if !select::valid_key(k) {
            causes.push((
                "metadata.labels".to_string(),
                format!("Invalid value: {k:?}: not a valid label key"),
            ));
        }
        if !select::valid_value(v) {
            causes.push((
                "metadata.labels".to_string(),
                format!("Invalid value: {v:?}: not a valid label value (key {k:?})"),
            ));
        }
    }
    for k in meta.annotations.iter().flatten().map(|(k, _)| k) {
        if !select::valid_key(k) {
            causes.push((
                "metadata.annotations".to_string(),
                format!("Invalid value: {k:?}: not a valid annotation key"),
            ));
        }
    }
    if let Some(old) = old {
        let before = old.meta().finalizers.clone().unwrap_or_default();
        if old.meta().deletion_timestamp.is_some() {
            for f in meta.finalizers.iter().flatten() {
                if !before.contains(f) {
                    causes.push((
                        "metadata.finalizers".to_string(),
                        format!("Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [{f:?}]"),
                    ));
                }
            }
        }
    }
    match (object, old) {
        (Object::Pod(pod), None) => {
            let containers = pod.spec.as_ref().map(|s| s.containers.as_slice());
            if containers.is_none_or(<[_]>::is_empty) {
                causes.push(("spec.containers".to_string(), "Required value".to_string()));
            }
            for (i, c) in containers.into_iter().flatten().enumerate() {
                if c.name.is_empty() {
                    causes.push((
                        format!("spec.containers[{i}].name"),
                        "Required value".to_string(),
                    ));
                }
                if c.image.as_deref().unwrap_or_default().is_empty() {
                    causes.push((
                        format!("spec.containers[{i}].image"),
                        "Required value".to_string(),
                    ));
                }
            }
        }
        (Object::Pod(pod), Some(Object::Pod(before)))
            if immutable_part(pod.spec.as_ref()) != immutable_part(before.spec.as_ref()) =>
        {
            causes.push((
                "spec".to_string(),
                "Forbidden: pod updates may not change fields other than \
                     `spec.containers[*].image`, `spec.initContainers[*].image`, \
                     `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to \
                     existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be \
                     set to 1 if it was previously negative)"
                    .to_string(),
            ));
        }
        (Object::Event(event), _) => {
            let ns = meta.namespace.as_deref().unwrap_or_default();
            let involved = event
                .involved_object
                .namespace
                .as_deref()
                .unwrap_or_default();
            let ok = if involved.is_empty() {
                ns.is_empty() || ns == "default"
            } else {
                involved == ns
            };
            if !ok {
                causes.push((
                    "involvedObject.namespace".to_string(),
                    format!("Invalid value: {involved:?}: does not match event.namespace"),
                ));
            }
        }
        _ => {}
    }
    causes
}

/// The object's JSON without `metadata`, to tell a change of content from one of metadata.
fn content(object: &Object) -> Value {
    let mut v = object.to_value();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
    }
    v
}

/// `target` with the status of `source` (for kinds with a status subresource).
fn with_status_of(target: Object, source: &Object) -> Object {
    match (target, source) {
        (Object::Node(mut t), Object::Node(s)) => {
            t.status = s.status.clone();
            Object::Node(t)
        }
        (Object::Pod(mut t), Object::Pod(s)) => {
            t.status = s.status.clone();
            Object::Pod(t)
        }
        (t, _) => t,
    }
}

/// Whether an object marked for deletion may now go: no finalizers left and, for a pod, its
/// grace period ended (a kubelet confirms with a DELETE of grace period 0).
fn deletion_complete(object: &Object) -> bool {
    let meta = object.meta();
    meta.deletion_timestamp.is_some()
        && meta.finalizers.as_ref().is_none_or(Vec::is_empty)
        && (object.resource() != Resource::Pods
            || meta.deletion_grace_period_seconds.unwrap_or(0) == 0)
}

pub(crate) fn get(
    store: &Store,
    resource: Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<Value, ApiError> {
    store
        .lock()
        .objects
        .get(&key(resource, ns, name))
        .map(Object::to_value)
        .ok_or_else(|| ApiError::not_found(resource, name))
}

/// The selected objects of `resource` (in `ns`, or all namespaces) as list items, and the
/// resourceVersion of the list.
pub(crate) fn list(
    store: &Store,
    resource: Resource,
    ns: Option<&str>,
    selector: &Selector,
) -> (Vec<Value>, u64) {
    let g = store.lock();
    let items = g
        .objects
        .iter()
        .filter(|((r, n, _), _)| *r == resource && ns.is_none_or(|ns| ns == n))
        .map(|(_, o)| o.to_value())
        .filter(|v| selector.matches(v))
        .map(|mut v| {
            if !resource.list_items_typed()
                && let Value::Object(m) = &mut v
            {
                m.remove("apiVersion");
                m.remove("kind");
            }
            v
        })
        .collect();
    (items, g.rv)
}

/// POST: creates the object in the body.
pub(crate) fn create(
    store: &Store,
    resource: Resource,
    url_ns: Option<&str>,
    body: Value,
) -> Result<Value, ApiError> {
    let object = decode(resource, body)?;
    store
        .mutate(|g| create_locked(g, resource, url_ns, object))
        .map(|o| o.to_value())
}

fn create_locked(
    g: &mut Inner,
    resource: Resource,
    url_ns: Option<&str>,
    mut object: Object,
) -> Result<Object, ApiError> {
    place(resource, &mut object, url_ns)?;
    let meta = object.meta_mut();
    if meta
        .resource_version
        .as_deref()
        .is_some_and(|rv| !rv.is_empty())
    {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let namespace = meta.namespace.clone();
    let mut name = meta.name.clone().unwrap_or_default();
    let prefix = meta.generate_name.clone().unwrap_or_default();
    if name.is_empty() && !prefix.is_empty() {
        name = generated_name(&prefix);
        for _ in 0..8 {
            if !g
                .objects
                .contains_key(&key(resource, namespace.as_deref(), &name))
            {
                break;
            }
            name = generated_name(&prefix);
        }
    }
    meta.name = Some(name.clone());
    meta.uid = Some(new_uid());
    meta.creation_timestamp = Some(now());
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.managed_fields = None;
    meta.self_link = None;
    meta.generation = (resource == Resource::EniConfigs).then_some(1);
    if let Object::Pod(pod) = &mut object {
        let qos = pod.spec.as_ref().map(qos_class).map(str::to_string);
        pod.status = Some(PodStatus {
            phase: Some("Pending".to_string()),
            qos_class: qos,
            ..PodStatus::default()
        });
    }
    let mut causes = Vec::new();
    if let Some(why) = invalid_name(&name) {
        causes.push(("metadata.name".to_string(), why));
    }
    causes.extend(validate(&object, None));
    if !causes.is_empty() {
        return Err(ApiError::invalid(resource, &name, causes));
    }
    let k = key(resource, namespace.as_deref(), &name);
    if g.objects.contains_key(&k) {
        return Err(ApiError::already_exists(resource, &name));
    }
    let rv = g.next_rv();
    object.meta_mut().resource_version = Some(rv.to_string());
    g.insert(k, object.clone());
    Ok(object)
}

/// Where an update came from: a PUT body, or a patch applied to the stored object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Write {
    Put,
    Patch,
}

/// The addressed object of an update.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target<'a> {
    pub resource: Resource,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    /// The `status` subresource.
    pub status: bool,
}

/// PUT: replaces the object by the body. Answers the HTTP code (201 when a PUT created it).
pub(crate) fn replace(store: &Store, t: Target<'_>, body: Value) -> Result<(u16, Value), ApiError> {
    let object = decode(t.resource, body)?;
    store
        .mutate(|g| update_locked(g, t, object, Write::Put))
        .map(|(code, o)| (code, o.to_value()))
}

fn update_locked(
    g: &mut Inner,
    t: Target<'_>,
    mut new: Object,
    write: Write,
) -> Result<(u16, Object), ApiError> {
    let resource = t.resource;
    let meta = new.meta_mut();
    match meta.name.as_deref() {
        None | Some("") => meta.name = Some(t.name.to_string()),
        Some(n) if n != t.name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({})",
                t.name
            )));
        }
        Some(_) => {}
    }
    place(resource, &mut new, t.namespace)?;
    let k = key(resource, t.namespace, t.name);
    let Some(old) = g.objects.get(&k).cloned() else {
        if write == Write::Put && resource.creates_on_update() && !t.status {
            return create_locked(g, resource, t.namespace, new).map(|o| (201, o));
        }
        return Err(ApiError::not_found(resource, t.name));
    };
    let old_rv = old.meta().resource_version.clone().unwrap_or_default();
    let new_rv = new.meta().resource_version.clone().unwrap_or_default();
    if new_rv.is_empty() {
        if write == Write::Put && !resource.allows_unconditional_update() {
            return Err(ApiError::invalid(
                resource,
                t.name,
                vec![(
                    "metadata.resourceVersion".to_string(),
                    "Invalid value: 0x0: must be specified for an update".to_string(),
                )],
            ));
        }
    } else if new_rv != old_rv {
        if new_rv.parse::<u64>().is_err() {
            return Err(ApiError::bad_request(format!(
                "invalid metadata.resourceVersion {new_rv:?}: not an integer"
            )));
        }
        return Err(ApiError::conflict(resource, t.name));
    }
    let mut result = if t.status {
        with_status_of(old.clone(), &new)
    } else if resource.has_status_subresource() {
        with_status_of(new, &old)
    } else {
        new
    };
    {
        let (m, o) = (result.meta_mut(), old.meta());
        if let Some(uid) = m.uid.take().filter(|u| !u.is_empty())
            && Some(&uid) != o.uid.as_ref()
        {
            return Err(ApiError::invalid(
                resource,
                t.name,
                vec![(
                    "metadata.uid".to_string(),
                    format!("Invalid value: {uid:?}: field is immutable"),
                )],
            ));
        }
        m.uid.clone_from(&o.uid);
        m.creation_timestamp.clone_from(&o.creation_timestamp);
        m.deletion_timestamp.clone_from(&o.deletion_timestamp);
        m.deletion_grace_period_seconds = o.deletion_grace_period_seconds;
        m.generation = o.generation;
        m.resource_version.clone_from(&o.resource_version);
        m.managed_fields = None;
        m.self_link = None;
    }
    let causes = validate(&result, Some(&old));
    if !causes.is_empty() {
        return Err(ApiError::invalid(resource, t.name, causes));
    }
    if resource == Resource::EniConfigs && content(&result) != content(&old) {
        let m = result.meta_mut();
        m.generation = Some(m.generation.unwrap_or(1) + 1);
    }
    if result == old {
        return Ok((200, old));
    }
    let rv = g.next_rv();
    result.meta_mut().resource_version = Some(rv.to_string());
    if deletion_complete(&result) {
        g.objects.remove(&k);
        g.record(crate::store::ChangeType::Deleted, &result, Some(&old));
    } else {
        g.replace(k, result.clone());
    }
    Ok((200, result))
}

/// PATCH: applies `body` (of `content_type`) to the stored object, then updates it.
pub(crate) fn patch(
    store: &Store,
    t: Target<'_>,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Value), ApiError> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let accepted: &[&str] = if t.resource == Resource::EniConfigs {
        &[patch::JSON, patch::MERGE]
    } else {
        &[patch::JSON, patch::MERGE, patch::STRATEGIC]
    };
    if !accepted.contains(&media.as_str()) {
        let why = if media == patch::APPLY {
            "server-side apply (application/apply-patch+yaml) is not implemented by lab-kube"
        } else {
            media.as_str()
        };
        return Err(ApiError::unsupported_media_type(why, accepted));
    }
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the {media} patch is not valid JSON: {e}")))?;
    store
        .mutate(|g| {
            let Some(old) = g.objects.get(&key(t.resource, t.namespace, t.name)) else {
                return Err(ApiError::not_found(t.resource, t.name));
            };
            let mut v = old.to_value();
            match media.as_str() {
                patch::MERGE => {
                    if !doc.is_object() {
                        return Err(ApiError::bad_request(format!(
                            "a merge patch must be a JSON object, not {}",
                            json_type(&doc)
                        )));
                    }
                    patch::merge(&mut v, &doc);
                }
                patch::STRATEGIC => {
                    patch::strategic(&mut v, &doc).map_err(ApiError::bad_request)?
                }
                _ => patch::json_patch(&mut v, &doc).map_err(|e| {
                    ApiError::invalid_patch(format!("the JSON patch cannot be applied: {e}"))
                })?,
            }
            let new = decode(t.resource, v)?;
            update_locked(g, t, new, Write::Patch)
        })
        .map(|(code, o)| (code, o.to_value()))
}

/// What a DELETE asks: `DeleteOptions` from the body or the query.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DeleteOpts {
    pub grace_period_seconds: Option<i64>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// DELETE: removes the object, or marks it (a pod's grace period, finalizers). Answers the
/// HTTP code and the body (the object, or a `Status` when removed and the kind says so).
pub(crate) fn delete(
    store: &Store,
    resource: Resource,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOpts,
) -> Result<(u16, Value), ApiError> {
    store.mutate(|g| {
        let k = key(resource, ns, name);
        let Some(old) = g.objects.get(&k).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        let meta = old.meta();
        let failed = |what: &str, want: &str, have: &str| {
            ApiError::conflict_because(
                resource,
                name,
                &format!(
                    "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                ),
            )
        };
        if let Some(uid) = &opts.uid
            && Some(uid) != meta.uid.as_ref()
        {
            return Err(failed("UID", uid, meta.uid.as_deref().unwrap_or_default()));
        }
        if let Some(rv) = &opts.resource_version
            && Some(rv) != meta.resource_version.as_ref()
        {
            let have = meta.resource_version.as_deref().unwrap_or_default();
            return Err(failed("ResourceVersion", rv, have));
        }
        // Negative grace periods are taken as 1 s, as the real server does.
        let asked = opts.grace_period_seconds.map(|s| if s < 0 { 1 } else { s });
        let mut marked = old.clone();
        if let Object::Pod(pod) = &old {
            let spec = pod.spec.as_ref();
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let unscheduled = spec
                .and_then(|s| s.node_name.as_deref())
                .is_none_or(str::is_empty);
            let grace = if unscheduled || matches!(phase, Some("Succeeded" | "Failed")) {
                0
            } else {
                asked.unwrap_or_else(|| {
                    spec.and_then(|s| s.termination_grace_period_seconds)
                        .unwrap_or(30)
                })
            };
            let m = marked.meta_mut();
            if grace > 0 {
                if m.deletion_timestamp.is_some()
                    && m.deletion_grace_period_seconds.is_some_and(|g| g <= grace)
                {
                    return Ok((200, old.to_value()));
                }
                m.deletion_timestamp = Some(later(grace));
                m.deletion_grace_period_seconds = Some(grace);
                let rv = g.next_rv();
                marked.meta_mut().resource_version = Some(rv.to_string());
                g.replace(k, marked.clone());
                return Ok((200, marked.to_value()));
            }
            if m.deletion_timestamp.is_some() {
                m.deletion_grace_period_seconds = Some(0);
            }
        }
        if marked.meta().finalizers.as_ref().is_some_and(|f| !f.is_empty()) {
            let m = marked.meta_mut();
            if m.deletion_timestamp.is_none() {
                m.deletion_timestamp = Some(now());
            }
            m.deletion_grace_period_seconds = Some(0);
            if marked == old {
                return Ok((200, old.to_value()));
            }
            let rv = g.next_rv();
            marked.meta_mut().resource_version = Some(rv.to_string());
            g.replace(k, marked.clone());
            return Ok((200, marked.to_value()));
        }
        let Some(gone) = g.remove(&k) else {
            return Err(ApiError::not_found(resource, name));
        };
        if resource.returns_deleted_object() {
            return Ok((200, gone.to_value()));
        }
        let done = status::deleted(resource, name, gone.meta().uid.clone());
        serde_json::to_value(done)
            .map(|v| (200, v))
            .map_err(|e| ApiError::internal(format!("serialising a Status: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: Option<&str>) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": {"app": "web"}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
               "status": {"phase": "Running", "podIP": "10.0.0.1"}})
    }

    fn target<'a>(resource: Resource, ns: Option<&'a str>, name: &'a str) -> Target<'a> {
        Target {
            resource,
            namespace: ns,
            name,
            status: false,
        }
    }

    #[test]
    fn create_sets_system_fields_and_resets_pod_status() {
        let s = Store::new();
        let v = create(&s, Resource::Pods, Some("ns"), pod("p", None)).expect("created");
        assert_eq!(v["metadata"]["namespace"], "ns");
        assert_eq!(v["metadata"]["resourceVersion"], "1");
        assert!(v["metadata"]["uid"].is_string());
        assert!(v["metadata"]["creationTimestamp"].is_string());
        assert_eq!(
            v["status"],
            json!({"phase": "Pending", "qosClass": "BestEffort"})
        );
        let e = create(&s, Resource::Pods, Some("ns"), pod("p", None)).expect_err("exists");
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
        let e = create(&s, Resource::Pods, Some("other"), {
            let mut p = pod("q", None);
            p["metadata"]["namespace"] = json!("ns");
            p
        })
        .expect_err("namespace mismatch");
        assert_eq!(e.code, 400, "{e:?}");
        let e = create(&s, Resource::Nodes, None, pod("n", None)).expect_err("a pod is no node");
        assert!(e.message.contains("\"Pod\""), "{}", e.message);
        let e = create(
            &s,
            Resource::Pods,
            Some("ns"),
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x"}, "spec": {"containers": [{"name": "c"}]}}),
        )
        .expect_err("no image");
        assert_eq!(e.code, 422);
        assert!(
            e.message.contains("spec.containers[0].image"),
            "{}",
            e.message
        );
    }

    #[test]
    fn updates_keep_status_apart_and_check_versions() {
        let s = Store::new();
        let created =
            create(&s, Resource::Pods, Some("ns"), pod("p", Some("n1"))).expect("created");
        let t = target(Resource::Pods, Some("ns"), "p");
        // The main resource ignores status; a stale version conflicts.
        let mut body = created.clone();
        body["status"] = json!({"phase": "Running"});
        body["metadata"]["annotations"] = json!({"a": "1"});
        let (_, v) = replace(&s, t, body.clone()).expect("replaced");
        assert_eq!(v["status"]["phase"], "Pending");
        assert_eq!(v["metadata"]["annotations"]["a"], "1");
        assert_eq!(v["metadata"]["resourceVersion"], "2");
        let e = replace(&s, t, body).expect_err("stale");
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        // The status subresource changes nothing but status.
        let st = Target { status: true, ..t };
        let (_, v) = patch(
            &s,
            st,
            patch::MERGE,
            br#"{"status":{"phase":"Running"},"metadata":{"labels":{"x":"y"}}}"#,
        )
        .expect("patched");
        assert_eq!(v["status"]["phase"], "Running");
        assert!(v["metadata"]["labels"].get("x").is_none());
        // Pod specs are immutable but for images.
        let e =
            patch(&s, t, patch::MERGE, br#"{"spec":{"nodeName":"n2"}}"#).expect_err("immutable");
        assert_eq!(e.code, 422);
        patch(
            &s,
            t,
            patch::JSON,
            br#"[{"op":"replace","path":"/spec/containers/0/image","value":"nginx"}]"#,
        )
        .expect("image may change");
        // A no-op update takes no new version.
        let rv = s.resource_version();
        patch(
            &s,
            t,
            patch::MERGE,
            br#"{"metadata":{"annotations":{"a":"1"}}}"#,
        )
        .expect("no-op");
        assert_eq!(s.resource_version(), rv);
        let e = patch(&s, t, patch::APPLY, b"{}").expect_err("apply");
        assert_eq!(e.code, 415);
        assert!(e.message.contains("server-side apply"), "{}", e.message);
    }

    #[test]
    fn custom_resources_need_a_version_to_put_and_count_generations() {
        let s = Store::new();
        let eni = json!({"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
                         "metadata": {"name": "az1"}, "spec": {"subnet": "subnet-1"}});
        let v = create(&s, Resource::EniConfigs, None, eni.clone()).expect("created");
        assert_eq!(v["metadata"]["generation"], 1);
        let t = target(Resource::EniConfigs, None, "az1");
        let e = replace(&s, t, eni.clone()).expect_err("no version");
        assert_eq!(e.code, 422);
        let (_, v) =
            patch(&s, t, patch::MERGE, br#"{"spec":{"subnet":"subnet-2"}}"#).expect("patched");
        assert_eq!(v["metadata"]["generation"], 2);
        let (_, v) =
            patch(&s, t, patch::MERGE, br#"{"metadata":{"labels":{"a":"b"}}}"#).expect("patched");
        assert_eq!(v["metadata"]["generation"], 2);
        let e = patch(&s, t, patch::STRATEGIC, b"{}").expect_err("no strategic for CRs");
        assert_eq!(e.code, 415);
        let e = patch(&s, t, patch::MERGE, br#"{"spec":{"subnet":7}}"#).expect_err("schema");
        assert!(e.message.contains("spec.subnet"), "{}", e.message);
        let e = create(
            &s,
            Resource::EniConfigs,
            None,
            json!({"apiVersion": "crd.k8s.amazonaws.com/v1alpha1",
            "kind": "ENIConfig", "metadata": {"name": "az2"}, "spec": {}}),
        )
        .expect_err("no subnet");
        assert!(
            e.message.contains("spec.subnet: Required value"),
            "{}",
            e.message
        );
    }

    #[test]
    fn delete_is_graceful_for_scheduled_pods_and_waits_for_finalizers() {
        let s = Store::new();
        create(&s, Resource::Pods, Some("ns"), pod("p", Some("n1"))).expect("created");
        let none = DeleteOpts::default();
        let (_, v) = delete(&s, Resource::Pods, Some("ns"), "p", &none).expect("marked");
        assert_eq!(v["metadata"]["deletionGracePeriodSeconds"], 30);
        assert!(api_exists(&s, Resource::Pods, Some("ns"), "p"));
        let now = DeleteOpts {
            grace_period_seconds: Some(0),
            ..none.clone()
        };
        let (_, v) = delete(&s, Resource::Pods, Some("ns"), "p", &now).expect("gone");
        assert_eq!(v["kind"], "Pod");
        assert!(!api_exists(&s, Resource::Pods, Some("ns"), "p"));

        let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "finalizers": ["x/y"]}});
        create(&s, Resource::Nodes, None, n.clone()).expect("created");
        let (_, v) = delete(&s, Resource::Nodes, None, "n1", &none).expect("marked");
        assert!(v["metadata"]["deletionTimestamp"].is_string());
        let wrong = DeleteOpts {
            uid: Some("nope".into()),
            ..none.clone()
        };
        let e = delete(&s, Resource::Nodes, None, "n1", &wrong).expect_err("precondition");
        assert_eq!(e.code, 409);
        n["metadata"] = json!({"name": "n1", "finalizers": []});
        let t = target(Resource::Nodes, None, "n1");
        replace(&s, t, n).expect("finalizer removed");
        assert!(!api_exists(&s, Resource::Nodes, None, "n1"));
        create(
            &s,
            Resource::Nodes,
            None,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}}),
        )
        .expect("created");
        let (_, v) = delete(&s, Resource::Nodes, None, "n2", &none).expect("gone");
        assert_eq!(
            (v["kind"].as_str(), v["status"].as_str()),
            (Some("Status"), Some("Success"))
        );
    }

    fn api_exists(s: &Store, r: Resource, ns: Option<&str>, name: &str) -> bool {
        get(s, r, ns, name).is_ok()
    }

    #[test]
    fn events_must_sit_in_their_objects_namespace() {
        let s = Store::new();
        let ev = |ns: &str| {
            json!({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "n1."},
            "involvedObject": {"kind": "Node", "name": "n1", "namespace": ns}, "reason": "Test"})
        };
        let v =
            create(&s, Resource::Events, Some("default"), ev("")).expect("a node event in default");
        let name = v["metadata"]["name"].as_str().expect("a name");
        assert!(name.starts_with("n1.") && name.len() == 8, "{name}");
        let e =
            create(&s, Resource::Events, Some("kube-system"), ev("default")).expect_err("mismatch");
        assert!(
            e.message.contains("involvedObject.namespace"),
            "{}",
            e.message
        );
    }
}
