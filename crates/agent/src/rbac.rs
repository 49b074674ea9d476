//! The Kubernetes API access the agent needs: the one home of the facts that
//! `deploy/base/clusterrole.yaml` grants (`tests/manifests.rs` compares the two, so a new API
//! call without its rule, or a rule without a call, fails there).
//!
//! The calls are [`crate::k8s`]'s: a watch on the agent's own node (its capacity and ENIConfig
//! label), a watch on the ENIConfigs (custom networking), events on the node, and the pod IP
//! annotation.

/// One permission: `verbs` on `resource` of API group `api_group` (`""` is the core group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every permission the agent uses, and no other.
pub const RULES: &[Rule] = &[
    Rule {
        api_group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
    Rule {
        api_group: "",
        resource: "pods",
        verbs: &["get", "patch"],
    },
    Rule {
        api_group: "",
        resource: "events",
        verbs: &["create"],
    },
    Rule {
        api_group: "crd.k8s.amazonaws.com",
        resource: "eniconfigs",
        verbs: &["get", "list", "watch"],
    },
];

/// Whether the agent talks to the Kubernetes API at all (it needs a service account token then).
pub fn uses_the_api() -> bool {
    !RULES.is_empty()
}
