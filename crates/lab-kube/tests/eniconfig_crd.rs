//! deploy/base/eniconfig-crd.yaml describes the resource lab-kube serves: the same group,
//! version, names, scope and spec schema. A change to either side without the other fails here.

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use lab_kube::Resource;
use serde::Deserialize;

fn manifest() -> CustomResourceDefinition {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base/eniconfig-crd.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value = serde_json::Value::deserialize(serde_norway::Deserializer::from_str(&text))
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    let crd: CustomResourceDefinition = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{}: not a CustomResourceDefinition: {e}", path.display()));
    // Nothing in the file is lost by the typed decoding (no misspelt field).
    assert_eq!(serde_json::to_value(&crd).expect("serialises"), value);
    crd
}

fn prop<'a>(schema: &'a JSONSchemaProps, name: &str) -> &'a JSONSchemaProps {
    schema
        .properties
        .as_ref()
        .and_then(|p| p.get(name))
        .unwrap_or_else(|| panic!("no property {name}"))
}

#[test]
fn the_crd_manifest_describes_the_served_eniconfig() {
    let r = Resource::EniConfigs;
    let crd = manifest();
    let spec = &crd.spec;
    assert_eq!(crd.metadata.name.as_deref(), Some(r.qualified().as_str()));
    assert_eq!(spec.group, r.group());
    assert_eq!(
        spec.scope,
        if r.namespaced() {
            "Namespaced"
        } else {
            "Cluster"
        }
    );
    assert_eq!(spec.names.kind, r.kind());
    assert_eq!(spec.names.list_kind.as_deref(), Some(r.list_kind()));
    assert_eq!(spec.names.plural, r.plural());
    assert_eq!(spec.names.singular.as_deref(), Some(r.singular()));
    let [version] = spec.versions.as_slice() else {
        panic!("one version, not {}", spec.versions.len());
    };
    assert_eq!(version.name, r.version());
    assert!(version.served && version.storage);
    assert!(
        version.subresources.is_none(),
        "lab-kube serves no ENIConfig subresource"
    );
    let root = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a schema");
    assert_eq!(root.x_kubernetes_preserve_unknown_fields, Some(true));
    let eni_spec = prop(root, "spec");
    assert_eq!(eni_spec.type_.as_deref(), Some("object"));
    assert_eq!(
        eni_spec.required.as_deref(),
        Some(&["subnet".to_string()][..])
    );
    assert_eq!(prop(eni_spec, "subnet").type_.as_deref(), Some("string"));
    let sgs = prop(eni_spec, "securityGroups");
    assert_eq!(sgs.type_.as_deref(), Some("array"));
    let items = match &sgs.items {
        Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s)) => s,
        other => panic!("securityGroups items: {other:?}"),
    };
    assert_eq!(items.type_.as_deref(), Some("string"));
    let names: BTreeSet<_> = eni_spec
        .properties
        .iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["subnet", "securityGroups"]));
    assert_eq!(prop(root, "status").type_.as_deref(), Some("object"));
    // The Rust type's spec has exactly these fields.
    let spec_json = serde_json::to_value(lab_kube::EniConfigSpec {
        subnet: "subnet-1".to_string(),
        security_groups: Some(vec!["sg-1".to_string()]),
    })
    .expect("serialises");
    let fields: BTreeSet<_> = spec_json
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, names);
}
