//! The lab cluster's objects, pure: the `Node` of each node instance and the `ENIConfig`s the
//! lab seeds, the changes `vpc-lab kube …` makes to them, and the `Pod` a kubelet would hold
//! for a runtime pod. Unit-tested without root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{
    Container, Event, HostIP, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Pod, PodIP,
    PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lab_aws::seed;
use lab_aws::world::{Instance, World};
use lab_kube::EniConfig;

/// The node label naming its availability zone (EKS sets it; custom networking's usual
/// `ENI_CONFIG_LABEL_DEF`).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";
pub const OS_LABEL: &str = "kubernetes.io/os";
pub const ARCH_LABEL: &str = "kubernetes.io/arch";
/// `status.capacity.pods` and `status.allocatable.pods` of a seeded node (kubelet's default
/// `maxPods`).
pub const DEFAULT_MAX_PODS: u32 = 110;
/// The image of the one container of a runtime pod's `Pod`.
pub const POD_IMAGE: &str = "registry.k8s.io/pause:3.10";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    }
}

/// The `Node` a kubelet on `inst` would register: named after the instance, with the labels
/// EKS puts on its nodes (zone, region, instance type, OS, architecture, hostname), the
/// instance as `spec.providerID` (`aws:///<az>/<instance id>`), its primary address, a `Ready`
/// condition and room for [`DEFAULT_MAX_PODS`] pods.
pub fn node(world: &World, inst: &Instance) -> Node {
    let labels: BTreeMap<String, String> = [
        (HOSTNAME_LABEL, inst.name.as_str()),
        (ZONE_LABEL, inst.az.as_str()),
        (REGION_LABEL, world.region.as_str()),
        (INSTANCE_TYPE_LABEL, inst.instance_type.as_str()),
        (OS_LABEL, "linux"),
        (ARCH_LABEL, "amd64"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut addresses = Vec::new();
    if let Some(e) = inst.primary_eni() {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: e.primary_ip.to_string(),
        });
    }
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: inst.name.clone(),
    });
    let mut n = Node {
        metadata: ObjectMeta {
            labels: Some(labels),
            ..meta(&inst.name)
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("aws:///{}/{}", inst.az, inst.id)),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(addresses),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("KubeletReady".into()),
                message: Some("kubelet is posting ready status".into()),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    };
    set_capacity(&mut n, DEFAULT_MAX_PODS);
    n
}

/// The `Node` of every node instance (role `node`; not the VPC host).
pub fn nodes(world: &World) -> Vec<Node> {
    world
        .instances
        .iter()
        .filter(|i| i.node)
        .map(|i| node(world, i))
        .collect()
}

/// The `ENIConfig`s the lab seeds: one named after the instances' zone, naming the pod subnet
/// of that zone and the pods' security group, and [`seed::OTHER_ZONE_ENICONFIG`], naming the
/// pod subnet of the other zone (which an agent must refuse).
pub fn eniconfigs(world: &World) -> Result<Vec<EniConfig>> {
    let pods = seed::pod_network(world).context("the lab's pod network (custom networking)")?;
    let sg = [pods.security_group.as_str()];
    Ok(vec![
        EniConfig::new(&pods.subnet.az, &pods.subnet.id, &sg),
        EniConfig::new(seed::OTHER_ZONE_ENICONFIG, &pods.other_zone_subnet.id, &sg),
    ])
}

/// `K=V` → (K, V), both valid as a label's (or, with `annotation`, an annotation's: any value).
pub fn parse_key_value(s: &str, annotation: bool) -> Result<(String, String)> {
    let Some((k, v)) = s.split_once('=') else {
        bail!("{s:?} is not KEY=VALUE");
    };
    check_key(k)?;
    if !annotation && !lab_kube::valid_label_value(v) {
        bail!(
            "{v:?} (of {k}) is not a valid label value: at most 63 characters of a-z, A-Z, 0-9, '-', '_' or '.', beginning and ending with a letter or digit"
        );
    }
    Ok((k.to_string(), v.to_string()))
}

/// A valid label or annotation key, or an error naming it.
pub fn check_key(k: &str) -> Result<()> {
    if !lab_kube::valid_label_key(k) {
        bail!(
            "{k:?} is not a valid label or annotation key ([prefix/]name, name at most 63 characters of a-z, A-Z, 0-9, '-', '_' or '.')"
        );
    }
    Ok(())
}

/// Sets (`Some`) or removes (`None`) label `key`; whether anything changed.
pub fn set_label(node: &mut Node, key: &str, value: Option<&str>) -> bool {
    set_in(&mut node.metadata.labels, key, value)
}

/// Sets (`Some`) or removes (`None`) annotation `key`; whether anything changed.
pub fn set_annotation(node: &mut Node, key: &str, value: Option<&str>) -> bool {
    set_in(&mut node.metadata.annotations, key, value)
}

fn set_in(map: &mut Option<BTreeMap<String, String>>, key: &str, value: Option<&str>) -> bool {
    match value {
        Some(v) => {
            let m = map.get_or_insert_with(BTreeMap::new);
            m.insert(key.to_string(), v.to_string()).as_deref() != Some(v)
        }
        None => {
            let removed = map.as_mut().and_then(|m| m.remove(key)).is_some();
            if map.as_ref().is_some_and(BTreeMap::is_empty) {
                *map = None;
            }
            removed
        }
    }
}

/// Sets `status.capacity.pods` and `status.allocatable.pods`.
pub fn set_capacity(node: &mut Node, pods: u32) {
    let status = node.status.get_or_insert_with(NodeStatus::default);
    for m in [&mut status.capacity, &mut status.allocatable] {
        m.get_or_insert_with(BTreeMap::new)
            .insert("pods".to_string(), Quantity(pods.to_string()));
    }
}

/// The `Pod` a runtime pod `namespace/name` on `node` has in the API before its sandbox is
/// created (scheduled: `spec.nodeName` set; `Pending`).
pub fn pod(namespace: &str, name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some(namespace.to_string()),
            ..meta(name)
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers: vec![Container {
                name: "app".into(),
                image: Some(POD_IMAGE.into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Pending".into()),
            qos_class: Some("BestEffort".into()),
            ..PodStatus::default()
        }),
    }
}

/// What a kubelet reports once the pod's sandbox has its network: `Running`, its addresses and
/// its node's address.
pub fn set_running(pod: &mut Pod, ips: &[Ipv4Addr], host_ip: Option<Ipv4Addr>) {
    let status = pod.status.get_or_insert_with(PodStatus::default);
    status.phase = Some("Running".into());
    status.pod_ip = ips.first().map(ToString::to_string);
    status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
    if let Some(h) = host_ip {
        status.host_ip = Some(h.to_string());
        status.host_ips = Some(vec![HostIP { ip: h.to_string() }]);
    }
}

/// The node a pod is scheduled on.
pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Whether `event` concerns node `node`: it is about the `Node` itself, was reported from that
/// host (`source.host`, `reportingInstance`), or is about a pod `on_node` says runs there.
pub fn event_concerns_node(
    event: &Event,
    node: &str,
    on_node: impl Fn(&str, &str) -> bool,
) -> bool {
    let o = &event.involved_object;
    let kind = o.kind.as_deref().unwrap_or_default();
    let name = o.name.as_deref().unwrap_or_default();
    (kind == "Node" && name == node)
        || event
            .source
            .as_ref()
            .and_then(|s| s.host.as_deref())
            .is_some_and(|h| h == node)
        || event.reporting_instance.as_deref() == Some(node)
        || (kind == "Pod" && on_node(o.namespace.as_deref().unwrap_or("default"), name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EventSource, ObjectReference};

    fn world() -> World {
        let mut w = lab_aws::world::sample();
        w.vpc_cidrs.push(seed::POD_CIDR);
        for (id, cidr, az) in [
            ("subnet-p", seed::POD_SUBNET, "us-west-2a"),
            ("subnet-q", seed::POD_SUBNET_OTHER_ZONE, "us-west-2b"),
        ] {
            w.subnets.push(lab_aws::world::Subnet {
                id: id.into(),
                cidr,
                az: az.into(),
                name: String::new(),
            });
        }
        w.security_groups.push(lab_aws::world::SecurityGroup {
            id: "sg-pods".into(),
            name: seed::POD_SG_NAME.into(),
        });
        let mut host = w.instances[0].clone();
        host.name = "vpc-host".into();
        host.id = "i-9".into();
        host.node = false;
        w.instances.push(host);
        w
    }

    #[test]
    fn a_node_per_node_instance_as_eks_labels_it() {
        let w = world();
        let ns = nodes(&w);
        assert_eq!(ns.len(), 1, "the VPC host is not a node");
        let n = &ns[0];
        assert_eq!(n.metadata.name.as_deref(), Some("instance1"));
        let labels = n.metadata.labels.as_ref().unwrap();
        for (k, v) in [
            ("kubernetes.io/hostname", "instance1"),
            ("topology.kubernetes.io/zone", "us-west-2a"),
            ("topology.kubernetes.io/region", "us-west-2"),
            ("node.kubernetes.io/instance-type", "m5.large"),
            ("kubernetes.io/os", "linux"),
        ] {
            assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(
            n.spec.as_ref().unwrap().provider_id.as_deref(),
            Some("aws:///us-west-2a/i-1")
        );
        let st = n.status.as_ref().unwrap();
        for m in [&st.capacity, &st.allocatable] {
            assert_eq!(m.as_ref().unwrap()["pods"], Quantity("110".into()));
        }
        let addrs = st.addresses.as_ref().unwrap();
        assert_eq!(
            (addrs[0].type_.as_str(), addrs[0].address.as_str()),
            ("InternalIP", "172.31.15.228")
        );
        assert_eq!(st.conditions.as_ref().unwrap()[0].status, "True");
        // The shape the API serves: what kube's clients read.
        let v = serde_json::to_value(n).unwrap();
        assert_eq!(v["kind"], "Node");
        assert_eq!(v["status"]["capacity"]["pods"], "110");
    }

    #[test]
    fn eniconfigs_name_the_zone_and_the_other_zone() {
        let e = eniconfigs(&world()).unwrap();
        let got: Vec<(String, String, Vec<String>)> = e
            .iter()
            .map(|c| {
                let s = c.spec.clone().unwrap();
                (
                    c.metadata.name.clone().unwrap(),
                    s.subnet,
                    s.security_groups.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "us-west-2a".to_string(),
                    "subnet-p".to_string(),
                    vec!["sg-pods".to_string()]
                ),
                (
                    "other-zone".to_string(),
                    "subnet-q".to_string(),
                    vec!["sg-pods".to_string()]
                ),
            ]
        );
        let err = format!("{:#}", eniconfigs(&lab_aws::world::sample()).unwrap_err());
        assert!(err.contains("100.64.0.0/16"), "{err}");
    }

    #[test]
    fn labels_annotations_and_capacity_change_as_asked() {
        let w = world();
        let mut n = node(&w, &w.instances[0]);
        assert!(set_label(&mut n, "k8s.amazonaws.com/eniConfig", Some("x")));
        assert!(!set_label(&mut n, "k8s.amazonaws.com/eniConfig", Some("x")));
        assert!(set_label(&mut n, ZONE_LABEL, None));
        assert!(!set_label(&mut n, ZONE_LABEL, None));
        let labels = n.metadata.labels.clone().unwrap();
        assert_eq!(labels["k8s.amazonaws.com/eniConfig"], "x");
        assert!(!labels.contains_key(ZONE_LABEL));
        assert!(set_annotation(
            &mut n,
            "a.example/b",
            Some("any value / at all")
        ));
        assert!(set_annotation(&mut n, "a.example/b", None));
        assert_eq!(n.metadata.annotations, None, "an emptied map goes away");
        set_capacity(&mut n, 29);
        let st = n.status.as_ref().unwrap();
        assert_eq!(st.capacity.as_ref().unwrap()["pods"].0, "29");
        assert_eq!(st.allocatable.as_ref().unwrap()["pods"].0, "29");

        assert_eq!(
            parse_key_value("k8s.amazonaws.com/eniConfig=us-west-2a", false).unwrap(),
            (
                "k8s.amazonaws.com/eniConfig".to_string(),
                "us-west-2a".to_string()
            )
        );
        assert_eq!(parse_key_value("a=", false).unwrap().1, "");
        assert_eq!(parse_key_value("a=b c", true).unwrap().1, "b c");
        for bad in ["novalue", "=v", "Bad Key=v", "k=bad value", "k=-x"] {
            let e = parse_key_value(bad, false).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = parse_key_value("k=bad value", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"bad value\""), "{e}");
    }

    #[test]
    fn a_runtime_pods_pod_is_scheduled_then_running() {
        let mut p = pod("default", "pod-a", "instance1");
        assert_eq!(pod_node(&p), Some("instance1"));
        assert_eq!(p.spec.as_ref().unwrap().containers[0].name, "app");
        assert_eq!(p.status.as_ref().unwrap().phase.as_deref(), Some("Pending"));
        set_running(
            &mut p,
            &["100.64.3.4".parse().unwrap()],
            Some("172.31.15.228".parse().unwrap()),
        );
        let st = p.status.as_ref().unwrap();
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.pod_ip.as_deref(), Some("100.64.3.4"));
        assert_eq!(st.pod_ips.as_ref().unwrap()[0].ip, "100.64.3.4");
        assert_eq!(st.host_ip.as_deref(), Some("172.31.15.228"));
    }

    #[test]
    fn events_of_a_node() {
        let ev = |kind: &str, name: &str, host: Option<&str>| Event {
            involved_object: ObjectReference {
                kind: Some(kind.into()),
                name: Some(name.into()),
                namespace: (kind == "Pod").then(|| "default".to_string()),
                ..ObjectReference::default()
            },
            source: host.map(|h| EventSource {
                host: Some(h.into()),
                ..EventSource::default()
            }),
            ..Event::default()
        };
        let on = |ns: &str, name: &str| ns == "default" && name == "pod-a";
        assert!(event_concerns_node(
            &ev("Node", "instance1", None),
            "instance1",
            on
        ));
        assert!(!event_concerns_node(
            &ev("Node", "instance2", None),
            "instance1",
            on
        ));
        assert!(event_concerns_node(
            &ev("Pod", "pod-a", None),
            "instance1",
            on
        ));
        assert!(!event_concerns_node(
            &ev("Pod", "pod-b", None),
            "instance1",
            on
        ));
        assert!(event_concerns_node(
            &ev("Pod", "pod-b", Some("instance1")),
            "instance1",
            on
        ));
    }
}
