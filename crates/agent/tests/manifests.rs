//! `deploy/`'s manifests, checked without a cluster (there is no kube-apiserver here).
//!
//! - Schema: every YAML document is decoded into its Kubernetes API type (k8s-openapi) by
//!   apiVersion and kind, and re-serialised; any difference from the document is a field the
//!   type does not have (k8s-openapi skips unknown fields when decoding), a required field
//!   missing, or a value of the wrong type, reported with its JSON path. The string enums and
//!   quantities the API server checks beyond the types are checked too ([`api_server_rules`]).
//!   Kustomizations and the Prometheus Operator's PodMonitor/ServiceMonitor have no k8s-openapi
//!   type: they are checked with a small schema of our own ([`Shape`]), honest about its reach:
//!   required keys, and only the keys it models (any other key is refused, to be modelled
//!   first), with the Kubernetes types they embed (ObjectMeta, LabelSelector) decoded as above.
//! - Layout: every file a kustomization lists exists and every manifest file is listed.
//! - Agreement with the agent: the env names are variables the agent implements (none it
//!   refuses) and spell out its defaults; the paths the agent uses are on the host paths they
//!   must be; probes and scrapers use the agent's metrics listener; the ClusterRole grants
//!   exactly `agent::rbac::RULES`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};

use agent::config::{self, Config, Status};
use agent::rbac;
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

// ---- loading ---------------------------------------------------------------------------------

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn deploy_dir() -> PathBuf {
    repo_dir().join("deploy")
}

/// `path` as the repository names it (`deploy/base/daemonset.yaml`), for messages.
fn shown(path: &Path) -> String {
    let repo = repo_dir().canonicalize().expect("the repository");
    let full = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    full.strip_prefix(&repo)
        .unwrap_or(&full)
        .display()
        .to_string()
}

/// Every YAML file under deploy/, sorted.
fn yaml_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no manifest under deploy/");
    out
}

/// One YAML document of a file.
struct Doc {
    /// `deploy/base/daemonset.yaml`, with `#<n>` when the file holds several documents.
    name: String,
    file: PathBuf,
    value: Value,
}

/// The documents of `text` as JSON values.
fn parse_yaml(text: &str) -> Result<Vec<Value>, String> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).map_err(|e| e.to_string()))
        .collect()
}

fn docs_of(file: &Path) -> Vec<Doc> {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", shown(file)));
    let values = parse_yaml(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", shown(file)));
    let several = values.len() > 1;
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| Doc {
            name: if several {
                format!("{}#{i}", shown(file))
            } else {
                shown(file)
            },
            file: file.to_path_buf(),
            value,
        })
        .collect()
}

fn all_docs() -> Vec<Doc> {
    yaml_files().iter().flat_map(|f| docs_of(f)).collect()
}

fn api_kind(v: &Value) -> (&str, &str) {
    (
        v["apiVersion"].as_str().unwrap_or_default(),
        v["kind"].as_str().unwrap_or_default(),
    )
}

fn is<T: Resource>(v: &Value) -> bool {
    api_kind(v) == (T::API_VERSION, T::KIND)
}

/// The one document of type `T` under deploy/ (panics unless there is exactly one).
fn the<T: Resource + DeserializeOwned>() -> (String, T) {
    let mut found: Vec<(String, T)> = all_docs()
        .into_iter()
        .filter(|d| is::<T>(&d.value))
        .map(|d| {
            let t = serde_json::from_value(d.value)
                .unwrap_or_else(|e| panic!("{}: not a {}: {e}", d.name, T::KIND));
            (d.name, t)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{} documents of kind {}",
        found.len(),
        T::KIND
    );
    found.remove(0)
}

// ---- the schema check --------------------------------------------------------------------------

/// Decodes `v` into `T` and compares its re-serialised form with `v`.
fn typed<T: DeserializeOwned + Serialize>(v: &Value, path: &str) -> Vec<String> {
    let decoded: Result<T, _> = serde_path_to_error::deserialize(v);
    match decoded {
        Err(e) => {
            let at = e.path().to_string();
            let at = if at == "." {
                path.to_string()
            } else {
                format!("{path}.{at}")
            };
            vec![format!("{at}: {}", e.inner())]
        }
        Ok(t) => {
            let back = serde_json::to_value(&t).expect("a decoded value serialises");
            let mut out = Vec::new();
            diff(v, &back, path, &mut out);
            out
        }
    }
}

/// What `back` (the typed round trip) lost or gained against `orig`.
fn diff(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None if va.is_null() => out.push(format!("{p}: null (drop the key)")),
                    None => out.push(format!("{p}: unknown field (the API type has none)")),
                    Some(vb) => diff(va, vb, &p, out),
                }
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(format!(
                        "{path}.{k}: missing, a required field (decoded as {vb})"
                    ));
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if orig != back => out.push(format!("{path}: {orig} reads back as {back}")),
        _ => {}
    }
}

/// The string enumerations and quantities the API server validates beyond the types (which
/// hold them as plain strings), for the fields these manifests may use.
fn api_server_rules(v: &Value, path: &str, out: &mut Vec<String>) {
    const ENUMS: &[(&str, &[&str])] = &[
        ("imagePullPolicy", &["Always", "IfNotPresent", "Never"]),
        (
            "dnsPolicy",
            &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        ),
        ("protocol", &["TCP", "UDP", "SCTP"]),
        ("restartPolicy", &["Always", "OnFailure", "Never"]),
        ("scheme", &["HTTP", "HTTPS"]),
    ];
    const HOST_PATH_TYPES: &[&str] = &[
        "",
        "DirectoryOrCreate",
        "Directory",
        "FileOrCreate",
        "File",
        "Socket",
        "CharDevice",
        "BlockDevice",
    ];
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{path}.{k}");
                let allowed = ENUMS.iter().find(|(name, _)| name == k).map(|(_, a)| *a);
                let allowed = allowed.or(match (k.as_str(), path.ends_with(".hostPath")) {
                    ("type", true) => Some(HOST_PATH_TYPES),
                    _ => None,
                });
                if let (Some(allowed), Some(s)) = (allowed, x.as_str())
                    && !allowed.contains(&s)
                {
                    out.push(format!("{p}: {s:?} is not one of {allowed:?}"));
                }
                if (k == "requests" || k == "limits") && path.ends_with(".resources") {
                    for (r, q) in x.as_object().into_iter().flatten() {
                        match q.as_str() {
                            Some(q) if is_quantity(q) => {}
                            _ => out.push(format!("{p}.{r}: {q} is not a quantity")),
                        }
                    }
                }
                api_server_rules(x, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                api_server_rules(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// A Kubernetes resource quantity: a decimal number with an optional SI, binary or exponent
/// suffix (`25m`, `32Mi`, `1.5`, `1e3`).
fn is_quantity(q: &str) -> bool {
    let digits_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(digits_end);
    let num = num.strip_prefix(['+', '-']).unwrap_or(num);
    let number_ok = !num.is_empty()
        && num.chars().filter(|c| *c == '.').count() <= 1
        && num.chars().any(|c| c.is_ascii_digit())
        && num.chars().all(|c| c.is_ascii_digit() || c == '.');
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

/// A small schema for the documents k8s-openapi has no type for. It models only what these
/// manifests use (and a little around it); a key it does not model is refused, so that a
/// typo is never taken for a field.
enum Shape {
    Str,
    /// This exact string.
    Is(&'static str),
    /// A Prometheus duration (`30s`, `1m30s`): the operator's CRD pattern.
    Duration,
    List(&'static Shape),
    /// (key, required, shape); any other key is refused.
    Obj(&'static [(&'static str, bool, Shape)]),
    /// A value of a Kubernetes API type, checked as the typed documents are.
    K8s(fn(&Value, &str) -> Vec<String>),
}

use Shape::{Duration, Is, K8s, List, Obj, Str};

/// kustomize.config.k8s.io/v1beta1 Kustomization: the keys of kustomize's `Kustomization`
/// type that these overlays use, or that an overlay here would likely use next.
const KUSTOMIZATION: Shape = Obj(&[
    ("apiVersion", true, Is("kustomize.config.k8s.io/v1beta1")),
    ("kind", true, Is("Kustomization")),
    ("resources", false, List(&Str)),
    ("components", false, List(&Str)),
    ("namespace", false, Str),
    (
        "images",
        false,
        List(&Obj(&[
            ("name", true, Str),
            ("newName", false, Str),
            ("newTag", false, Str),
            ("digest", false, Str),
        ])),
    ),
    (
        "patches",
        false,
        List(&Obj(&[
            ("path", false, Str),
            ("patch", false, Str),
            (
                "target",
                false,
                Obj(&[
                    ("group", false, Str),
                    ("version", false, Str),
                    ("kind", false, Str),
                    ("name", false, Str),
                    ("namespace", false, Str),
                    ("labelSelector", false, Str),
                ]),
            ),
        ])),
    ),
]);

/// An endpoint of a PodMonitor (`podMetricsEndpoints`) or ServiceMonitor (`endpoints`).
const SCRAPE_ENDPOINT: Shape = Obj(&[
    ("port", false, Str),
    ("path", false, Str),
    ("scheme", false, Is("http")),
    ("interval", false, Duration),
    ("scrapeTimeout", false, Duration),
]);

const NAMESPACE_SELECTOR: Shape = Obj(&[("matchNames", false, List(&Str))]);

/// monitoring.coreos.com/v1 PodMonitor; the CRD requires `spec` and `spec.selector`.
const POD_MONITOR: Shape = Obj(&[
    ("apiVersion", true, Is("monitoring.coreos.com/v1")),
    ("kind", true, Is("PodMonitor")),
    ("metadata", true, K8s(typed::<ObjectMeta>)),
    (
        "spec",
        true,
        Obj(&[
            ("selector", true, K8s(typed::<LabelSelector>)),
            ("namespaceSelector", false, NAMESPACE_SELECTOR),
            ("jobLabel", false, Str),
            ("podMetricsEndpoints", false, List(&SCRAPE_ENDPOINT)),
        ]),
    ),
]);

/// monitoring.coreos.com/v1 ServiceMonitor; the CRD requires `spec` and `spec.selector`.
const SERVICE_MONITOR: Shape = Obj(&[
    ("apiVersion", true, Is("monitoring.coreos.com/v1")),
    ("kind", true, Is("ServiceMonitor")),
    ("metadata", true, K8s(typed::<ObjectMeta>)),
    (
        "spec",
        true,
        Obj(&[
            ("selector", true, K8s(typed::<LabelSelector>)),
            ("namespaceSelector", false, NAMESPACE_SELECTOR),
            ("jobLabel", false, Str),
            ("endpoints", false, List(&SCRAPE_ENDPOINT)),
        ]),
    ),
]);

fn is_duration(s: &str) -> bool {
    const UNITS: [&str; 7] = ["y", "w", "d", "h", "m", "s", "ms"];
    if s == "0" {
        return true;
    }
    let mut rest = s;
    let mut last = None;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if n == 0 {
            return false;
        }
        rest = &rest[n..];
        // "ms" before "m": the longest unit first.
        let Some(unit) = (0..UNITS.len())
            .rev()
            .find(|&u| rest.starts_with(UNITS[u]) && (UNITS[u] != "m" || !rest.starts_with("ms")))
        else {
            return false;
        };
        if last.is_some_and(|l| unit <= l) {
            return false;
        }
        last = Some(unit);
        rest = &rest[UNITS[unit].len()..];
    }
    last.is_some()
}

fn check_shape(shape: &Shape, v: &Value, path: &str, out: &mut Vec<String>) {
    match shape {
        Str if v.is_string() => {}
        Str => out.push(format!("{path}: {v} is not a string")),
        Is(want) if v.as_str() == Some(want) => {}
        Is(want) => out.push(format!("{path}: {v}, want {want:?}")),
        Duration if v.as_str().is_some_and(is_duration) => {}
        Duration => out.push(format!("{path}: {v} is not a duration such as \"30s\"")),
        List(item) => match v.as_array() {
            Some(a) => {
                for (i, x) in a.iter().enumerate() {
                    check_shape(item, x, &format!("{path}[{i}]"), out);
                }
            }
            None => out.push(format!("{path}: {v} is not a list")),
        },
        Obj(fields) => {
            let Some(m) = v.as_object() else {
                out.push(format!("{path}: {v} is not a mapping"));
                return;
            };
            for (k, x) in m {
                match fields.iter().find(|(name, ..)| name == k) {
                    Some((_, _, s)) => check_shape(s, x, &format!("{path}.{k}"), out),
                    None => out.push(format!(
                        "{path}.{k}: unknown field (or one tests/manifests.rs does not model yet)"
                    )),
                }
            }
            for (k, required, _) in fields.iter() {
                if *required && !m.contains_key(*k) {
                    out.push(format!("{path}.{k}: missing, a required field"));
                }
            }
        }
        K8s(check) => out.extend(check(v, path)),
    }
}

/// Whether a namespaced document sits in kube-system and a cluster-scoped one has no namespace.
fn namespace_rule(v: &Value, namespaced: bool, out: &mut Vec<String>) {
    match (namespaced, v["metadata"]["namespace"].as_str()) {
        (true, Some("kube-system")) | (false, None) => {}
        (true, ns) => out.push(format!(
            "$.metadata.namespace: {ns:?}, want \"kube-system\""
        )),
        (false, Some(ns)) => out.push(format!(
            "$.metadata.namespace: {ns:?} on a cluster-scoped object"
        )),
    }
}

/// Everything wrong with one document, each with its JSON path.
fn check_document(v: &Value, is_kustomization_file: bool) -> Vec<String> {
    let mut out = Vec::new();
    if is_kustomization_file {
        check_shape(&KUSTOMIZATION, v, "$", &mut out);
        return out;
    }
    let typed_doc = |check: fn(&Value, &str) -> Vec<String>, namespaced, out: &mut Vec<String>| {
        out.extend(check(v, "$"));
        api_server_rules(v, "$", out);
        namespace_rule(v, namespaced, out);
    };
    match api_kind(v) {
        _ if is::<DaemonSet>(v) => typed_doc(typed::<DaemonSet>, true, &mut out),
        _ if is::<ServiceAccount>(v) => typed_doc(typed::<ServiceAccount>, true, &mut out),
        _ if is::<Service>(v) => typed_doc(typed::<Service>, true, &mut out),
        _ if is::<ClusterRole>(v) => typed_doc(typed::<ClusterRole>, false, &mut out),
        _ if is::<ClusterRoleBinding>(v) => typed_doc(typed::<ClusterRoleBinding>, false, &mut out),
        _ if is::<CustomResourceDefinition>(v) => {
            typed_doc(typed::<CustomResourceDefinition>, false, &mut out)
        }
        ("monitoring.coreos.com/v1", "PodMonitor") => {
            check_shape(&POD_MONITOR, v, "$", &mut out);
            namespace_rule(v, true, &mut out);
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            check_shape(&SERVICE_MONITOR, v, "$", &mut out);
            namespace_rule(v, true, &mut out);
        }
        (api, kind) => out.push(format!(
            "no schema for apiVersion {api:?} kind {kind:?}: add its type to tests/manifests.rs"
        )),
    }
    out
}

/// Unquoted scalars that this YAML 1.2 parser reads as strings but kubectl's YAML 1.1 parser
/// reads as booleans (`value: on` is `true` to kubectl, a type error for an env value): each as
/// `line N: scalar`. Quoting them is the fix.
fn yaml11_booleans(text: &str) -> Vec<String> {
    const YAML11_ONLY: [&str; 16] = [
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
        "OFF",
    ];
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let line = line.split(" #").next().unwrap_or_default().trim_end();
        let scalar = match line.rsplit_once(": ") {
            Some((_, v)) => v.trim(),
            None => line
                .trim_start()
                .strip_prefix("- ")
                .unwrap_or_default()
                .trim(),
        };
        if YAML11_ONLY.contains(&scalar) {
            out.push(format!("line {}: {scalar}", i + 1));
        }
    }
    out
}

fn is_kustomization_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "kustomization.yaml")
}

#[test]
fn every_manifest_matches_its_schema() {
    let mut problems = Vec::new();
    let mut kinds = BTreeSet::new();
    for file in yaml_files() {
        let text = fs::read_to_string(&file).expect("readable");
        for b in yaml11_booleans(&text) {
            problems.push(format!(
                "{}: {b}: a boolean to kubectl (YAML 1.1), a string here: quote it",
                shown(&file)
            ));
        }
    }
    for doc in all_docs() {
        if doc.value.is_null() {
            problems.push(format!("{}: an empty document", doc.name));
            continue;
        }
        kinds.insert(api_kind(&doc.value).1.to_string());
        for p in check_document(&doc.value, is_kustomization_file(&doc.file)) {
            problems.push(format!("{}: {p}", doc.name));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    for kind in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Kustomization",
        "PodMonitor",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/: {kinds:?}");
    }
}

/// The check itself finds what it is for: each mistake is reported at its path.
#[test]
fn the_schema_check_finds_unknown_missing_and_mistyped_fields() {
    let (_, ds) = the::<DaemonSet>();
    let good = serde_json::to_value(&ds).unwrap();
    assert_eq!(check_document(&good, false), Vec::<String>::new());

    let mut bad = good.clone();
    let spec = &mut bad["spec"]["template"]["spec"];
    spec["hostNetwrok"] = Value::Bool(true);
    let c = &mut spec["containers"][0];
    c.as_object_mut().unwrap().remove("name");
    c["imagePullPolicy"] = "Sometimes".into();
    c["resources"]["requests"]["memory"] = "lots".into();
    let problems = check_document(&bad, false);
    for want in [
        "$.spec.template.spec.hostNetwrok: unknown field",
        "$.spec.template.spec.containers[0].name: missing",
        "$.spec.template.spec.containers[0].imagePullPolicy: \"Sometimes\"",
        "$.spec.template.spec.containers[0].resources.requests.memory: \"lots\"",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "{want} not in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 4, "{problems:#?}");

    let mut bad = good.clone();
    bad["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] = 1.into();
    let problems = check_document(&bad, false);
    assert!(
        problems.len() == 1
            && problems[0].starts_with("$.spec.template.spec.containers[0].env[0].value: "),
        "{problems:#?}"
    );

    let pm = parse_yaml(
        "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x, namespace: kube-system, lables: {}}\n\
         spec:\n  podMetricsEndpoints: [{port: metrics, interval: 30 s, honorLabels: true}]\n",
    )
    .unwrap()
    .remove(0);
    let mut problems = check_document(&pm, false);
    problems.sort();
    assert_eq!(
        problems,
        [
            "$.metadata.lables: unknown field (the API type has none)",
            "$.spec.podMetricsEndpoints[0].honorLabels: unknown field (or one tests/manifests.rs does not model yet)",
            "$.spec.podMetricsEndpoints[0].interval: \"30 s\" is not a duration such as \"30s\"",
            "$.spec.selector: missing, a required field",
        ]
    );
    let k = parse_yaml(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresource: [a.yaml]\n",
    )
    .unwrap()
    .remove(0);
    assert_eq!(
        check_document(&k, true),
        ["$.resource: unknown field (or one tests/manifests.rs does not model yet)"]
    );
    assert_eq!(
        yaml11_booleans("a: on\nb: \"on\"\nc: yes # why\n- No\nd: true\ne: none\n# f: no\n"),
        ["line 1: on", "line 3: yes", "line 4: No"]
    );
    for q in ["25m", "32Mi", "1", "0.5", "1e3", "+2Gi"] {
        assert!(is_quantity(q), "{q}");
    }
    for q in ["", "m", "1.2.3", "32MiB", "lots", "1e"] {
        assert!(!is_quantity(q), "{q}");
    }
    for d in ["30s", "1m30s", "500ms", "1h", "0"] {
        assert!(is_duration(d), "{d}");
    }
    for d in ["", "30", "s", "30s1m", "1m1m", "30 s"] {
        assert!(!is_duration(d), "{d}");
    }
}

// ---- the kustomize layout ----------------------------------------------------------------------

/// The kustomization files under deploy/, each with its parsed document.
fn kustomizations() -> Vec<(PathBuf, Value)> {
    yaml_files()
        .into_iter()
        .filter(|f| is_kustomization_file(f))
        .map(|f| {
            let mut docs = docs_of(&f);
            assert_eq!(docs.len(), 1, "{}: one document", shown(&f));
            (f, docs.remove(0).value)
        })
        .collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

#[test]
fn the_kustomize_layout_lists_every_manifest_and_only_existing_files() {
    let mut listed = BTreeSet::new();
    let mut problems = Vec::new();
    for (file, k) in kustomizations() {
        let dir = file.parent().expect("a directory");
        for r in strings(&k["resources"]) {
            let target = dir.join(r);
            if r.ends_with(".yaml") || r.ends_with(".yml") {
                // kustomize loads files from the kustomization's own directory tree only.
                if Path::new(r).components().any(|c| c == Component::ParentDir) {
                    problems.push(format!("{}: {r} is outside its directory", shown(&file)));
                } else if !target.is_file() {
                    problems.push(format!("{}: {r} does not exist", shown(&file)));
                } else {
                    listed.insert(target.canonicalize().expect("exists"));
                }
            } else if !target.join("kustomization.yaml").is_file() {
                problems.push(format!(
                    "{}: {r} is not a directory with a kustomization.yaml",
                    shown(&file)
                ));
            }
        }
    }
    for f in yaml_files() {
        if !is_kustomization_file(&f) && !listed.contains(&f.canonicalize().expect("exists")) {
            problems.push(format!("{}: no kustomization lists it", shown(&f)));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The image name without its tag or digest.
fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod spec")
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

#[test]
fn the_image_overrides_name_the_image_the_daemonset_runs() {
    let (_, ds) = the::<DaemonSet>();
    let images: BTreeSet<&str> = all_containers(pod_spec(&ds))
        .map(|c| image_name(c.image.as_deref().expect("every container names its image")))
        .collect();
    let mut overrides = 0;
    for (file, k) in kustomizations() {
        for i in k["images"].as_array().into_iter().flatten() {
            let name = i["name"].as_str().unwrap_or_default();
            assert!(
                images.contains(name),
                "{}: images[].name {name:?} matches no container image ({images:?}): the override would do nothing",
                shown(&file)
            );
            overrides += 1;
        }
    }
    assert!(overrides > 0, "no kustomization overrides the image");
    assert_eq!(
        image_name("registry.example.com:5000/vpc-cni:0.1.0"),
        "registry.example.com:5000/vpc-cni"
    );
    assert_eq!(image_name("vpc-cni@sha256:00"), "vpc-cni");
}

// ---- agreement with the agent ------------------------------------------------------------------

/// The container's literal env values. The one value from the downward API, MY_NODE_NAME
/// from `spec.nodeName` (the node's name, no default of the agent's), is left out.
fn env_of(c: &Container) -> HashMap<String, String> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            if e.value.is_none() && e.name == "MY_NODE_NAME" && field == Some("spec.nodeName") {
                return None;
            }
            let value = e
                .value
                .clone()
                .unwrap_or_else(|| panic!("{}: env {} has no literal value", c.name, e.name));
            Some((e.name.clone(), value))
        })
        .collect()
}

fn agent_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1, "one container, the agent");
    &spec.containers[0]
}

fn config_of(c: &Container) -> Config {
    config::from_env(&env_of(c))
        .unwrap_or_else(|e| panic!("container {}: the agent refuses its env: {e}", c.name))
}

/// Every variable a container sets is one the agent implements: known, not refused, not one
/// without effect (which would only mislead a reader of the manifest).
#[test]
fn the_env_names_variables_the_agent_implements() {
    let (name, ds) = the::<DaemonSet>();
    let known: HashMap<&str, Status> = config::variables().map(|v| (v.name, v.status)).collect();
    let mut problems = Vec::new();
    for c in all_containers(pod_spec(&ds)) {
        for e in c.env.iter().flatten() {
            match known.get(e.name.as_str()) {
                None => problems.push(format!("{}: {}: not a variable the agent knows", c.name, e.name)),
                Some(Status::Refused { .. }) => problems.push(format!(
                    "{}: {}: the agent refuses it (unless set to the reference's default): leave it out",
                    c.name, e.name
                )),
                Some(Status::Implemented) => {}
                Some(other) => problems.push(format!(
                    "{}: {}: accepted but without the reference's effect ({other:?}): leave it out",
                    c.name, e.name
                )),
            }
        }
        config_of(c);
    }
    assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
}

/// Deliberate changes from the agent's defaults, in every container: the sysctls go through
/// the host's /proc/sys/net, as the containers are not privileged.
const CHANGED: &[(&str, &str)] = &[("VPC_CNI_PROC_SYS", "/host/proc/sys")];

/// The env spells out the agent's defaults: a value here that differs is a deliberate change
/// (then say so in [`CHANGED`]), never a default that moved in config.rs and not in the
/// manifest.
#[test]
fn the_env_values_are_the_agents_defaults() {
    let (_, ds) = the::<DaemonSet>();
    let changed: HashMap<String, String> = CHANGED
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let defaults = config::from_env(&changed).expect("the defaults");
    let mut problems = Vec::new();
    for c in all_containers(pod_spec(&ds)) {
        let env = env_of(c);
        for (k, v) in CHANGED {
            if env.get(*k).map(String::as_str) != Some(*v) {
                problems.push(format!("{}: {k} should be {v:?}", c.name));
            }
        }
        for (name, value) in &env {
            let mut one = changed.clone();
            one.insert(name.clone(), value.clone());
            if config::from_env(&one).as_ref() != Ok(&defaults) {
                problems.push(format!("{}: {name}={value:?}", c.name));
            }
        }
    }
    problems.sort();
    assert!(
        problems.is_empty(),
        "not the agent's default (change the test if that is meant):\n{}",
        problems.join("\n")
    );
    for c in all_containers(pod_spec(&ds)) {
        assert_eq!(config_of(c), defaults, "container {}: all together", c.name);
    }
    assert!(
        env_of(agent_container(pod_spec(&ds))).contains_key("WARM_ENI_TARGET"),
        "the agent's env spells out the warm pool target"
    );
}

/// The host path a container path is on (through the deepest mount of a hostPath volume).
fn host_path(spec: &PodSpec, c: &Container, path: &Path) -> Option<PathBuf> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?;
    let host = &volume.host_path.as_ref()?.path;
    let rest = path.strip_prefix(&mount.mount_path).expect("a prefix");
    Some(if rest.as_os_str().is_empty() {
        PathBuf::from(host)
    } else {
        Path::new(host).join(rest)
    })
}

#[test]
fn the_agents_paths_are_the_host_paths_they_must_be() {
    let (_, ds) = the::<DaemonSet>();
    let spec = pod_spec(&ds);
    let agent = agent_container(spec);
    let cfg = config_of(agent);
    let on_host = |c: &Container, p: &Path| {
        host_path(spec, c, p)
            .unwrap_or_else(|| panic!("container {}: {} is on no host path", c.name, p.display()))
    };
    // The conflist names the socket to the plugin, which runs on the host.
    assert_eq!(on_host(agent, &cfg.socket), cfg.socket, "the plugin socket");
    // aws-node's checkpoint at aws-node's path: a node moves between the two in place.
    assert_eq!(
        on_host(agent, &cfg.checkpoint),
        cfg.checkpoint,
        "the checkpoint"
    );
    assert_eq!(cfg.checkpoint, Path::new("/var/run/aws-node/ipam.json"));
    // Where kubelet's runtime looks for plugins and network configurations by default.
    assert_eq!(on_host(agent, &cfg.cni_bin_dir), Path::new("/opt/cni/bin"));
    assert_eq!(
        on_host(agent, &cfg.cni_conf_dir),
        Path::new("/etc/cni/net.d")
    );
    // The log directory, at the same path in and out: the plugin (on the host) logs there, and
    // so does the agent when AWS_VPC_K8S_CNI_LOG_FILE names a file beside the plugin's log.
    let plugin_log = Path::new(&cfg.plugin_log_file);
    assert_eq!(
        on_host(agent, plugin_log),
        plugin_log,
        "the plugin log's directory"
    );
    // iptables-restore and kube-proxy share the host's lock.
    let lock = Path::new("/run/xtables.lock");
    assert_eq!(on_host(agent, lock), lock);
    // The init container installs into the same host directory.
    for init in spec.init_containers.iter().flatten() {
        let init_cfg = config_of(init);
        assert_eq!(
            on_host(init, &init_cfg.cni_bin_dir),
            Path::new("/opt/cni/bin")
        );
    }
    // Every volume is mounted, and every mount is a volume.
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mounted: BTreeSet<&str> = all_containers(spec)
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(volumes, mounted, "volumes and mounts");
}

fn port_named<'a>(
    c: &'a Container,
    port: &IntOrString,
) -> Option<&'a k8s_openapi::api::core::v1::ContainerPort> {
    c.ports.iter().flatten().find(|p| match port {
        IntOrString::String(n) => p.name.as_deref() == Some(n.as_str()),
        IntOrString::Int(i) => p.container_port == *i,
    })
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "matchExpressions: extend tests/manifests.rs to read them"
    );
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// Probes, the metrics port and the scrapers all use the agent's metrics listener, on an
/// address kubelet and Prometheus reach (host network: the node's).
#[test]
fn probes_and_scrapers_use_the_agents_metrics_listener() {
    let (_, ds) = the::<DaemonSet>();
    let spec = pod_spec(&ds);
    let agent = agent_container(spec);
    let addr = config_of(agent)
        .metrics_addr
        .expect("metrics on: the probes are served there");
    assert!(
        !addr.ip().is_loopback(),
        "{addr}: kubelet probes the node's address"
    );
    let metrics = IntOrString::String("metrics".into());
    let port = port_named(agent, &metrics).expect("a container port named metrics");
    assert_eq!(
        i64::from(port.container_port),
        i64::from(addr.port()),
        "the metrics port"
    );
    for (probe, path) in [
        (&agent.readiness_probe, "/readyz"),
        (&agent.liveness_probe, "/livez"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{path}: an httpGet probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        let p =
            port_named(agent, &get.port).unwrap_or_else(|| panic!("{path}: port {:?}", get.port));
        assert_eq!(
            i64::from(p.container_port),
            i64::from(addr.port()),
            "{path}'s port"
        );
        assert!(get.host.is_none(), "{path}: the pod's (node's) address");
    }
    let pod_labels = labels(
        ds.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .expect("template metadata"),
    );
    let mut scrapers = 0;
    for doc in all_docs() {
        match api_kind(&doc.value) {
            ("monitoring.coreos.com/v1", "PodMonitor") => {
                let selector: LabelSelector =
                    serde_json::from_value(doc.value["spec"]["selector"].clone()).unwrap();
                assert!(
                    selects(&selector, &pod_labels),
                    "{}: selects no agent pod",
                    doc.name
                );
                for e in doc.value["spec"]["podMetricsEndpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let port = IntOrString::String(e["port"].as_str().unwrap_or_default().into());
                    assert!(
                        port_named(agent, &port).is_some(),
                        "{}: port {port:?}",
                        doc.name
                    );
                    assert_eq!(e["path"], "/metrics", "{}", doc.name);
                }
                scrapers += 1;
            }
            _ if is::<Service>(&doc.value) => {
                let svc: Service = serde_json::from_value(doc.value.clone()).unwrap();
                let s = svc.spec.as_ref().expect("a Service spec");
                let selector = LabelSelector {
                    match_labels: s.selector.clone(),
                    match_expressions: None,
                };
                assert!(
                    selects(&selector, &pod_labels),
                    "{}: selects no agent pod",
                    doc.name
                );
                for p in s.ports.iter().flatten() {
                    let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
                    let cp = port_named(agent, &target)
                        .unwrap_or_else(|| panic!("{}: targetPort {target:?}", doc.name));
                    assert_eq!(i64::from(cp.container_port), i64::from(addr.port()));
                }
                // The ServiceMonitors that select this Service scrape one of its ports.
                let svc_labels = labels(&svc.metadata);
                let port_names: BTreeSet<&str> = s
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| p.name.as_deref())
                    .collect();
                for sm in all_docs().into_iter().filter(|d| {
                    api_kind(&d.value) == ("monitoring.coreos.com/v1", "ServiceMonitor")
                }) {
                    let selector: LabelSelector =
                        serde_json::from_value(sm.value["spec"]["selector"].clone()).unwrap();
                    assert!(
                        selects(&selector, &svc_labels),
                        "{}: selects no Service",
                        sm.name
                    );
                    for e in sm.value["spec"]["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        let port = e["port"].as_str().unwrap_or_default();
                        assert!(port_names.contains(port), "{}: port {port:?}", sm.name);
                        assert_eq!(e["path"], "/metrics", "{}", sm.name);
                    }
                    scrapers += 1;
                }
            }
            _ => {}
        }
    }
    assert!(scrapers > 0, "no PodMonitor or ServiceMonitor");
}

/// (api group, resource, verb) for every permission a list of rules grants.
type Grant = (String, String, String);

#[test]
fn the_cluster_role_grants_exactly_the_agents_rbac_rules() {
    let (role_file, role) = the::<ClusterRole>();
    let mut granted: BTreeSet<Grant> = BTreeSet::new();
    for (i, r) in role.rules.iter().flatten().enumerate() {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "{role_file}: rules[{i}]: resourceNames and nonResourceURLs are not in agent::rbac::Rule"
        );
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let used: BTreeSet<Grant> = rbac::RULES
        .iter()
        .flat_map(|r| {
            r.verbs.iter().map(|v| {
                (
                    r.api_group.to_string(),
                    r.resource.to_string(),
                    v.to_string(),
                )
            })
        })
        .collect();
    assert_eq!(
        granted.difference(&used).collect::<Vec<_>>(),
        Vec::<&Grant>::new(),
        "{role_file} grants what the agent does not use (agent::rbac::RULES)"
    );
    assert_eq!(
        used.difference(&granted).collect::<Vec<_>>(),
        Vec::<&Grant>::new(),
        "{role_file} lacks what the agent uses (agent::rbac::RULES)"
    );

    let (_, sa) = the::<ServiceAccount>();
    let (binding_file, binding) = the::<ClusterRoleBinding>();
    let (ds_file, ds) = the::<DaemonSet>();
    let sa_name = sa
        .metadata
        .name
        .as_deref()
        .expect("the ServiceAccount's name");
    assert_eq!(binding.role_ref.kind, "ClusterRole", "{binding_file}");
    assert_eq!(
        Some(binding.role_ref.name.as_str()),
        role.metadata.name.as_deref(),
        "{binding_file}"
    );
    let subjects: Vec<(&str, &str, Option<&str>)> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
        .collect();
    assert_eq!(
        subjects,
        [("ServiceAccount", sa_name, sa.metadata.namespace.as_deref())],
        "{binding_file}"
    );
    let spec = pod_spec(&ds);
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some(sa_name),
        "{ds_file}"
    );
    // A token only when the agent calls the API.
    assert_eq!(
        spec.automount_service_account_token != Some(false),
        rbac::uses_the_api(),
        "{ds_file}: automountServiceAccountToken must be false exactly while agent::rbac::RULES is empty"
    );
}

/// What makes the DaemonSet a node's CNI: on every node, before other pods, in the node's
/// network namespace.
#[test]
fn the_daemonset_runs_on_every_node_in_the_host_network() {
    let (file, ds) = the::<DaemonSet>();
    let spec = pod_spec(&ds);
    assert_eq!(
        ds.metadata.namespace.as_deref(),
        Some("kube-system"),
        "{file}"
    );
    assert_eq!(spec.host_network, Some(true), "{file}: hostNetwork");
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "{file}"
    );
    let tolerations: Vec<_> = spec.tolerations.iter().flatten().collect();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "{file}: a toleration of every taint"
    );
    let update = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .expect("updateStrategy");
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"), "{file}");
    assert_eq!(
        update
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::String("10%".into())),
        "{file}"
    );
    for c in all_containers(spec) {
        assert_eq!(
            c.image_pull_policy.as_deref(),
            Some("IfNotPresent"),
            "{file}: {}: the image may exist only on the node",
            c.name
        );
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        assert!(
            requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
            "{file}: {}: requests",
            c.name
        );
    }
    let sc = agent_container(spec)
        .security_context
        .as_ref()
        .expect("a securityContext");
    let caps: BTreeSet<&str> = sc
        .capabilities
        .iter()
        .flat_map(|c| c.add.iter().flatten())
        .map(String::as_str)
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from(["NET_ADMIN", "NET_RAW"]),
        "{file}: the agent's capabilities"
    );
    // Capabilities rather than privileged: the sysctls go through the host's /proc/sys/net,
    // mounted where VPC_CNI_PROC_SYS says, in every container.
    for c in all_containers(spec) {
        let sc = c.security_context.as_ref();
        assert!(
            !sc.and_then(|s| s.privileged).unwrap_or(false),
            "{file}: {} is privileged",
            c.name
        );
        let mounted = c.volume_mounts.iter().flatten().find_map(|m| {
            let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
            (v.host_path.as_ref()?.path == "/proc/sys/net").then_some(m.mount_path.clone())
        });
        assert_eq!(
            mounted.as_deref(),
            Some("/host/proc/sys/net"),
            "{file}: {}: the host's /proc/sys/net at VPC_CNI_PROC_SYS/net",
            c.name
        );
    }
}
