//! The four resources this server serves (their names, kinds, scopes and field labels), the
//! typed objects that hold them, and the lab's `ENIConfig` type with the upstream shape.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group of `ENIConfig` (amazon-vpc-cni-k8s's CRD).
pub const ENICONFIG_GROUP: &str = "crd.k8s.amazonaws.com";
/// The served and stored version of `ENIConfig`.
pub const ENICONFIG_VERSION: &str = "v1alpha1";

/// A resource this server serves. Every other path answers 404.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// core/v1 `nodes`, cluster-scoped, with a `status` subresource.
    Nodes,
    /// core/v1 `pods`, namespaced, with a `status` subresource.
    Pods,
    /// core/v1 `events` (the `Event` of `/api/v1`, not `events.k8s.io`), namespaced.
    Events,
    /// `eniconfigs.crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped, no subresources.
    EniConfigs,
}

/// A field a `fieldSelector` may name: its label, where it is in the object's JSON, and the
/// value it has when absent (the Go zero value the real server compares with).
#[derive(Debug)]
pub(crate) struct FieldLabel {
    pub label: &'static str,
    pub pointer: &'static str,
    pub absent: &'static str,
}

const fn field(label: &'static str, pointer: &'static str) -> FieldLabel {
    FieldLabel {
        label,
        pointer,
        absent: "",
    }
}

const NODE_FIELDS: &[FieldLabel] = &[
    field("metadata.name", "/metadata/name"),
    FieldLabel {
        label: "spec.unschedulable",
        pointer: "/spec/unschedulable",
        absent: "false",
    },
];
const POD_FIELDS: &[FieldLabel] = &[
    field("metadata.name", "/metadata/name"),
    field("metadata.namespace", "/metadata/namespace"),
    field("spec.nodeName", "/spec/nodeName"),
    field("spec.restartPolicy", "/spec/restartPolicy"),
    field("spec.schedulerName", "/spec/schedulerName"),
    field("spec.serviceAccountName", "/spec/serviceAccountName"),
    FieldLabel {
        label: "spec.hostNetwork",
        pointer: "/spec/hostNetwork",
        absent: "false",
    },
    field("status.phase", "/status/phase"),
    field("status.podIP", "/status/podIP"),
    field("status.nominatedNodeName", "/status/nominatedNodeName"),
];
const EVENT_FIELDS: &[FieldLabel] = &[
    field("metadata.name", "/metadata/name"),
    field("metadata.namespace", "/metadata/namespace"),
    field("involvedObject.kind", "/involvedObject/kind"),
    field("involvedObject.namespace", "/involvedObject/namespace"),
    field("involvedObject.name", "/involvedObject/name"),
    field("involvedObject.uid", "/involvedObject/uid"),
    field("involvedObject.apiVersion", "/involvedObject/apiVersion"),
    field(
        "involvedObject.resourceVersion",
        "/involvedObject/resourceVersion",
    ),
    field("involvedObject.fieldPath", "/involvedObject/fieldPath"),
    field("reason", "/reason"),
    field("reportingComponent", "/reportingComponent"),
    field("source", "/source/component"),
    field("type", "/type"),
];
const CUSTOM_FIELDS: &[FieldLabel] = &[
    field("metadata.name", "/metadata/name"),
    field("metadata.namespace", "/metadata/namespace"),
];

impl Resource {
    /// Every resource served, in discovery order.
    pub const ALL: [Resource; 4] = [
        Resource::Nodes,
        Resource::Pods,
        Resource::Events,
        Resource::EniConfigs,
    ];

    /// The plural name in URLs (`pods`).
    pub const fn plural(self) -> &'static str {
        match self {
            Resource::Nodes => "nodes",
            Resource::Pods => "pods",
            Resource::Events => "events",
            Resource::EniConfigs => "eniconfigs",
        }
    }

    /// The singular name discovery reports (`pod`).
    pub const fn singular(self) -> &'static str {
        match self {
            Resource::Nodes => "node",
            Resource::Pods => "pod",
            Resource::Events => "event",
            Resource::EniConfigs => "eniconfig",
        }
    }

    /// The object kind (`Pod`).
    pub const fn kind(self) -> &'static str {
        match self {
            Resource::Nodes => "Node",
            Resource::Pods => "Pod",
            Resource::Events => "Event",
            Resource::EniConfigs => "ENIConfig",
        }
    }

    /// The kind of a list (`PodList`).
    pub const fn list_kind(self) -> &'static str {
        match self {
            Resource::Nodes => "NodeList",
            Resource::Pods => "PodList",
            Resource::Events => "EventList",
            Resource::EniConfigs => "ENIConfigList",
        }
    }

    /// The API group: empty for the core group.
    pub const fn group(self) -> &'static str {
        match self {
            Resource::EniConfigs => ENICONFIG_GROUP,
            _ => "",
        }
    }

    /// The version within the group.
    pub const fn version(self) -> &'static str {
        match self {
            Resource::EniConfigs => ENICONFIG_VERSION,
            _ => "v1",
        }
    }

    /// `apiVersion` as objects carry it (`v1`, `crd.k8s.amazonaws.com/v1alpha1`).
    pub const fn api_version(self) -> &'static str {
        match self {
            Resource::EniConfigs => "crd.k8s.amazonaws.com/v1alpha1",
            _ => "v1",
        }
    }

    /// Whether objects live in namespaces.
    pub const fn namespaced(self) -> bool {
        matches!(self, Resource::Pods | Resource::Events)
    }

    /// The resource as error messages qualify it: `pods`, `eniconfigs.crd.k8s.amazonaws.com`.
    pub fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    pub(crate) const fn short_names(self) -> &'static [&'static str] {
        match self {
            Resource::Nodes => &["no"],
            Resource::Pods => &["po"],
            Resource::Events => &["ev"],
            Resource::EniConfigs => &[],
        }
    }

    /// Whether `<name>/status` exists: then the main resource ignores status changes and the
    /// subresource changes nothing but status.
    pub(crate) const fn has_status_subresource(self) -> bool {
        matches!(self, Resource::Nodes | Resource::Pods)
    }

    /// Whether a PUT without `metadata.resourceVersion` is allowed (custom resources refuse it).
    pub(crate) const fn allows_unconditional_update(self) -> bool {
        !matches!(self, Resource::EniConfigs)
    }

    /// Whether a PUT of a missing object creates it (as the real registry does for events).
    pub(crate) const fn creates_on_update(self) -> bool {
        matches!(self, Resource::Events)
    }

    /// Whether DELETE answers with the deleted object rather than a `Status` (pods do).
    pub(crate) const fn returns_deleted_object(self) -> bool {
        matches!(self, Resource::Pods)
    }

    /// Whether list items carry `apiVersion` and `kind` (custom resources do, built-in kinds
    /// do not: the real server strips them from the items of a list).
    pub(crate) const fn list_items_typed(self) -> bool {
        matches!(self, Resource::EniConfigs)
    }

    pub(crate) const fn field_labels(self) -> &'static [FieldLabel] {
        match self {
            Resource::Nodes => NODE_FIELDS,
            Resource::Pods => POD_FIELDS,
            Resource::Events => EVENT_FIELDS,
            Resource::EniConfigs => CUSTOM_FIELDS,
        }
    }

    /// The resource named `plural` in `group`/`version`, if served.
    pub(crate) fn lookup(group: &str, version: &str, plural: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| r.group() == group && r.version() == version && r.plural() == plural)
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.qualified())
    }
}

/// Why `name` is not a DNS-1123 subdomain, the rule for the served kinds' names.
pub(crate) fn invalid_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("Required value: name or generateName is required".to_string());
    }
    let ok = name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then(|| {
        format!(
            "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', and must start and end with an alphanumeric \
             character"
        )
    })
}

/// `ENIConfig.spec`: the subnet and security groups of a node's secondary ENIs under custom
/// networking. `subnet` is required by the upstream schema; `securityGroups` is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniConfigSpec {
    pub subnet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<Vec<String>>,
}

/// `ENIConfig.status`: an object with no fields upstream (the server prunes whatever it holds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniConfigStatus {}

/// An `ENIConfig` (`crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped), shaped as upstream's
/// CRD: the schema preserves unknown fields at the top level (kept in `other`) and prunes them
/// inside `spec` and `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniConfig {
    /// Always `crd.k8s.amazonaws.com/v1alpha1` once stored.
    #[serde(default)]
    pub api_version: String,
    /// Always `ENIConfig` once stored.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<EniConfigSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<EniConfigStatus>,
    /// Top-level fields the schema does not name (`x-kubernetes-preserve-unknown-fields`).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl EniConfig {
    /// An `ENIConfig` named `name` (by convention an availability zone or a label's value).
    pub fn new(name: &str, subnet: &str, security_groups: &[&str]) -> EniConfig {
        EniConfig {
            api_version: Resource::EniConfigs.api_version().to_string(),
            kind: Resource::EniConfigs.kind().to_string(),
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(EniConfigSpec {
                subnet: subnet.to_string(),
                security_groups: Some(security_groups.iter().map(|s| s.to_string()).collect()),
            }),
            status: None,
            other: BTreeMap::new(),
        }
    }
}

impl k8s_openapi::Resource for EniConfig {
    const API_VERSION: &'static str = "crd.k8s.amazonaws.com/v1alpha1";
    const GROUP: &'static str = ENICONFIG_GROUP;
    const KIND: &'static str = "ENIConfig";
    const VERSION: &'static str = ENICONFIG_VERSION;
    const URL_PATH_SEGMENT: &'static str = "eniconfigs";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for EniConfig {
    const LIST_KIND: &'static str = "ENIConfigList";
}

impl k8s_openapi::Metadata for EniConfig {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A stored object: one of the served kinds, typed.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Node(Box<Node>),
    Pod(Box<Pod>),
    Event(Box<Event>),
    EniConfig(Box<EniConfig>),
}

impl Object {
    pub(crate) fn resource(&self) -> Resource {
        match self {
            Object::Node(_) => Resource::Nodes,
            Object::Pod(_) => Resource::Pods,
            Object::Event(_) => Resource::Events,
            Object::EniConfig(_) => Resource::EniConfigs,
        }
    }

    pub(crate) fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Event(o) => &o.metadata,
            Object::EniConfig(o) => &o.metadata,
        }
    }

    pub(crate) fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Node(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Event(o) => &mut o.metadata,
            Object::EniConfig(o) => &mut o.metadata,
        }
    }

    /// The object's JSON, with `apiVersion` and `kind`.
    pub(crate) fn to_value(&self) -> Value {
        let v = match self {
            Object::Node(o) => serde_json::to_value(o),
            Object::Pod(o) => serde_json::to_value(o),
            Object::Event(o) => serde_json::to_value(o),
            Object::EniConfig(o) => serde_json::to_value(o),
        };
        // These types have string keys and no fallible Serialize impls.
        v.unwrap_or_else(|e| {
            tracing::error!(error = %e, "serialising a stored object failed");
            Value::Null
        })
    }

    /// Decodes `v` as an object of `resource` (the serde round trip through the typed struct).
    pub(crate) fn from_value(resource: Resource, v: Value) -> Result<Object, serde_json::Error> {
        let mut o = match resource {
            Resource::Nodes => Object::Node(Box::new(serde_json::from_value(v)?)),
            Resource::Pods => Object::Pod(Box::new(serde_json::from_value(v)?)),
            Resource::Events => Object::Event(Box::new(serde_json::from_value(v)?)),
            Resource::EniConfigs => Object::EniConfig(Box::new(serde_json::from_value(v)?)),
        };
        o.set_type();
        Ok(o)
    }

    /// Sets `apiVersion` and `kind` where the type holds them as data (ENIConfig); the
    /// k8s-openapi types write theirs themselves.
    pub(crate) fn set_type(&mut self) {
        if let Object::EniConfig(e) = self {
            e.api_version = Resource::EniConfigs.api_version().to_string();
            e.kind = Resource::EniConfigs.kind().to_string();
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for k8s_openapi::api::core::v1::Node {}
    impl Sealed for k8s_openapi::api::core::v1::Pod {}
    impl Sealed for k8s_openapi::api::core::v1::Event {}
    impl Sealed for super::EniConfig {}
}

/// A kind the store holds: `Node`, `Pod`, `Event` (k8s-openapi) or [`EniConfig`].
pub trait Kind:
    Clone + Serialize + DeserializeOwned + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed
{
    /// The resource objects of this kind live in.
    const RESOURCE: Resource;
    #[doc(hidden)]
    fn into_object(self) -> Object;
    #[doc(hidden)]
    fn from_object(object: &Object) -> Option<&Self>;
}

macro_rules! kind {
    ($ty:ty, $variant:ident, $resource:expr) => {
        impl Kind for $ty {
            const RESOURCE: Resource = $resource;
            fn into_object(self) -> Object {
                Object::$variant(Box::new(self))
            }
            fn from_object(object: &Object) -> Option<&Self> {
                match object {
                    Object::$variant(o) => Some(o),
                    _ => None,
                }
            }
        }
    };
}

kind!(Node, Node, Resource::Nodes);
kind!(Pod, Pod, Resource::Pods);
kind!(Event, Event, Resource::Events);
kind!(EniConfig, EniConfig, Resource::EniConfigs);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_typed_kinds_agree_with_the_resource_table() {
        use k8s_openapi::Resource as _;
        assert_eq!(Node::KIND, Resource::Nodes.kind());
        assert_eq!(Pod::URL_PATH_SEGMENT, Resource::Pods.plural());
        assert_eq!(Event::API_VERSION, Resource::Events.api_version());
        assert_eq!(EniConfig::API_VERSION, Resource::EniConfigs.api_version());
        assert_eq!(EniConfig::KIND, Resource::EniConfigs.kind());
        for r in Resource::ALL {
            assert_eq!(
                Resource::lookup(r.group(), r.version(), r.plural()),
                Some(r)
            );
        }
        assert_eq!(Resource::lookup("", "v1", "eniconfigs"), None);
        assert_eq!(
            Resource::EniConfigs.qualified(),
            "eniconfigs.crd.k8s.amazonaws.com"
        );
    }

    #[test]
    fn an_eniconfig_keeps_unknown_top_level_fields_and_prunes_status() {
        let v = serde_json::json!({
            "apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
            "metadata": {"name": "us-west-2a"},
            "spec": {"subnet": "subnet-1", "securityGroups": null, "extra": 1},
            "status": {"x": 1},
            "note": "kept"
        });
        let o = Object::from_value(Resource::EniConfigs, v).expect("decodes");
        let back = o.to_value();
        assert_eq!(
            back,
            serde_json::json!({
                "apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
                "metadata": {"name": "us-west-2a"},
                "spec": {"subnet": "subnet-1"},
                "status": {},
                "note": "kept"
            })
        );
    }
}
