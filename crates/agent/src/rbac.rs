//! The Kubernetes API access the agent needs: the one home of the facts that
//! `deploy/base/clusterrole.yaml` grants (`tests/manifests.rs` compares the two, so a new API
//! call without its rule, or a rule without a call, fails there).
//!
//! Today the agent makes no Kubernetes API call at all (it has no API client: it learns the node
//! from IMDS and pods from the plugin), so [`RULES`] is empty, and the DaemonSet does not mount a
//! service account token either. Whoever gives the agent an API client adds its rules here.

/// One permission: `verbs` on `resource` of API group `api_group` (`""` is the core group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Every permission the agent uses, and no other.
pub const RULES: &[Rule] = &[];

/// Whether the agent talks to the Kubernetes API at all (it needs a service account token then).
pub fn uses_the_api() -> bool {
    !RULES.is_empty()
}
