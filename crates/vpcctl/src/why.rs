//! `vpcctl why <namespace>/<name>`: why a pod has (or has no) address, from the agent's
//! `/v1/state` alone — the facts the state holds, never a guess about what kubelet or the
//! runtime did.
//!
//! In order: the pod holds an address (which, on which ENI, since when); or its address was
//! lost (why, when); or the agent knows no such pod, and then what an ADD for it meets now:
//! a free address, or why there is none (all assigned, some cooling and for how long, the
//! node at its limit, provisioning off, EC2's refusal, the provisioner's blocker, ADDs
//! waiting, ENI operations in flight, the agent not ready).

use std::fmt;
use std::fmt::Write;
use std::str::FromStr;

use crate::doc::{State, StateAnswer};
use crate::show::{ago, intents, secs_up, short_id};

/// `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl FromStr for PodName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodName {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("{s:?} is not <namespace>/<name>")),
        }
    }
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The answer: whether the pod has a working address, and the explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub has_address: bool,
    pub text: String,
}

/// Why `pod` has or has no address, from the agent's answer to `/v1/state`.
pub fn why(pod: &PodName, state: &StateAnswer) -> Verdict {
    let s = match state {
        StateAnswer::Starting(reason) => {
            return Verdict {
                has_address: false,
                text: format!(
                    "The agent has no address pool yet, so no pod gets an address: the agent is \
                     not ready: {reason}\n"
                ),
            };
        }
        StateAnswer::Known(s) => s,
    };
    let mut text = String::new();
    let held: Vec<_> = s
        .pods
        .iter()
        .filter(|p| p.namespace == pod.namespace && p.pod == pod.name)
        .collect();
    for p in &held {
        let _ = writeln!(
            text,
            "{pod} has {} on {} (device {}), assigned {} (container {}, interface {}).",
            p.ip,
            p.eni,
            p.device_number,
            ago(s.now_ms, p.since_ms),
            short_id(&p.container_id),
            p.if_name
        );
    }
    let lost: Vec<_> = s
        .lost
        .iter()
        .filter(|l| l.namespace == pod.namespace && l.pod == pod.name)
        .collect();
    for l in &lost {
        let when = l
            .lost_ms
            .map(|t| ago(s.now_ms, t))
            .unwrap_or_else(|| "at the agent's start".into());
        let _ = writeln!(
            text,
            "{pod} has no working address: {}{} was lost {when} ({}): {}.",
            l.ip,
            l.eni
                .as_ref()
                .map(|e| format!(" (on {e})"))
                .unwrap_or_default(),
            l.reason,
            l.why
        );
        if let Some(e) = &l.parked_on {
            let _ = writeln!(
                text,
                "EC2 lists {} on {e} again, another ENI: it is parked there, not the pod's \
                 working address.",
                l.ip
            );
        }
        let _ = writeln!(
            text,
            "The address stays blocked until the pod (container {}) is deleted; a new pod gets a \
             new address.",
            short_id(&l.container_id)
        );
    }
    if !held.is_empty() {
        return Verdict {
            has_address: true,
            text,
        };
    }
    if !lost.is_empty() {
        return Verdict {
            has_address: false,
            text,
        };
    }
    let st = &s.stats;
    let _ = writeln!(
        text,
        "The agent holds no address for {pod}: no pod of that name is assigned one, and none \
         was lost."
    );
    if st.available > 0 {
        let _ = writeln!(
            text,
            "An ADD for it now would get one: {} of the node's {} addresses are available.",
            st.available, st.total
        );
        if !s.probes.ready {
            let _ = writeln!(
                text,
                "- the agent is not ready: {}",
                s.probes.readiness.as_deref().unwrap_or("(no reason given)")
            );
        }
    } else {
        let _ = writeln!(
            text,
            "An ADD for it now would get no address ({} ENIs, {} addresses: {} assigned, {} \
             cooling, 0 available):",
            st.enis, st.total, st.assigned, st.cooling
        );
        for r in no_address(s) {
            let _ = writeln!(text, "- {r}");
        }
    }
    Verdict {
        has_address: false,
        text,
    }
}

/// Why a new pod gets no address now (the pool has none available): each fact of the state
/// that stands in the way, one sentence each.
pub fn no_address(s: &State) -> Vec<String> {
    let st = &s.stats;
    let mut out = Vec::new();
    if st.total == 0 {
        out.push("the node's ENIs have no secondary address".into());
    } else if st.cooling == 0 {
        out.push(format!(
            "no free address: all {} are assigned to pods",
            st.total
        ));
    } else {
        let first = s.cooling.iter().map(|c| c.left_ms).min().unwrap_or(0);
        let last = s.cooling.iter().map(|c| c.left_ms).max().unwrap_or(0);
        let first = if secs_up(first) == secs_up(last) {
            String::new()
        } else {
            format!("; the first is free in {}", secs_up(first))
        };
        out.push(format!(
            "no free address: {} assigned, {} cooling for up to {} (IP_COOLDOWN_PERIOD is \
             {}{first})",
            st.assigned,
            st.cooling,
            secs_up(last),
            secs_up(s.cooldown_ms),
        ));
    }
    if !s.provisioning {
        out.push(
            "provisioning is off (DISABLE_NETWORK_RESOURCE_PROVISIONING=true or \
             ENABLE_IMDS_ONLY_MODE=true): the agent adds no address; assign more secondary IPs \
             to the node's ENIs, or delete pods"
                .into(),
        );
    }
    match &s.limits {
        Some(l) if l.at_limit => out.push(format!(
            "the node is at its limit: {}",
            l.message.clone().unwrap_or_else(|| format!(
                "{} pod IPs: {} ENIs × {} secondary IPs",
                l.max_ips, l.max_enis, l.ips_per_eni
            ))
        )),
        Some(l) if l.at_max_pods => out.push(format!(
            "the node is at its max-pods ceiling: it holds {} addresses, its max pods is {}",
            st.total, l.max_pods
        )),
        Some(l) if s.provisioning => out.push(format!(
            "the node holds {} of the {} addresses it may have ({} ENIs × {} secondary IPs): \
             below its limit",
            st.total, l.max_ips, l.max_enis, l.ips_per_eni
        )),
        _ => {}
    }
    if let Some(r) = &s.ec2_refused {
        out.push(format!("EC2 refused the last request for addresses: {r}"));
    }
    if let Some(b) = &s.blocker
        && s.limits.as_ref().and_then(|l| l.message.as_ref()) != Some(b)
    {
        out.push(format!("the provisioner is blocked: {b}"));
    }
    if s.pending > 0 {
        out.push(format!(
            "the provisioner is requesting more: {} ADDs are waiting for an address",
            s.pending
        ));
    }
    if !s.intents.is_empty() {
        out.push(format!("ENI operations in flight: {}", intents(s)));
    }
    if !s.probes.ready {
        out.push(format!(
            "the agent is not ready: {}",
            s.probes.readiness.as_deref().unwrap_or("(no reason given)")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_namespace_slash_name() {
        assert_eq!(
            "default/web-0".parse::<PodName>(),
            Ok(PodName {
                namespace: "default".into(),
                name: "web-0".into()
            })
        );
        for bad in ["web-0", "/web-0", "default/", "a/b/c", ""] {
            assert!(bad.parse::<PodName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_starting_agent_is_the_answer() {
        let v = why(
            &"default/web-0".parse().unwrap(),
            &StateAnswer::Starting("conflist not written yet: restoring the pool (for 2s)".into()),
        );
        assert!(!v.has_address);
        assert!(
            v.text
                .contains("not ready: conflist not written yet: restoring the pool (for 2s)"),
            "{}",
            v.text
        );
    }
}
