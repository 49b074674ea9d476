//! The nftables table `ip vpc-cni`: connmark for pod egress and NodePort return traffic,
//! and SNAT to the node's primary IP (reference §2.5, nftables backend semantics).
//!
//! ```text
//! table ip vpc-cni {
//!   chain marks {                    # before kube-proxy DNAT (-100): daddr is still local
//!     type filter hook prerouting priority mangle; policy accept;
//!     iifname "<prefix>*" jump from-pod
//!     iifname "<primary>" ct state new fib daddr . iif type local ct mark set ct mark | M  # node_port_support
//!   }
//!   chain from-pod {
//!     ct mark & M == M meta mark set meta mark | M      # restore (node_port_support or SNAT)
//!     meta iifgroup vmap { 0x76630001 : jump eni-1, … : jump eni-63 }   # secondary-ENI pods
//!   }
//!   chain eni-<d> { meta mark set meta mark | <d << 8> }   # d = 1..=63, for `fwmark` rules
//!   chain prerouting {               # after DNAT, so ClusterIP traffic is judged by its pod
//!     type filter hook prerouting priority dstnat + 10; policy accept;
//!     iifname "<prefix>*" ct state new jump snat-mark                         # !external_snat
//!   }
//!   chain snat-mark {
//!     fib daddr type local return
//!     ip daddr { <vpc cidrs>, <excluded cidrs> } return
//!     ct mark set ct mark | M
//!     meta mark set meta mark | M    # the first packet; later ones get it in from-pod
//!   }
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip daddr != { <vpc>, <excluded> } fib daddr type != local snat to <primary ip> fully-random
//!   }
//! }
//! ```
//! Per packet of an established connection this is one base chain for a pod's packet (the
//! `ct state new` test of `prerouting` fails at once) and no FIB lookup for the primary
//! interface's: the reference marks NodePort connections on every packet, here on the first
//! (the ct mark stays with the connection).
//!
//! The packet mark then sends marked pod traffic through `fwmark M lookup main pref 1024`
//! (out of the primary interface, whose address it is SNATed to).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use crate::{DataplaneError, ENI_MARK_MASK, MAX_ENI_DEVICE, eni_mark, pod_group};

/// Name of our table (family `ip`).
pub const NFT_TABLE: &str = "vpc-cni";

/// SNAT port randomisation (`AWS_VPC_K8S_CNI_RANDOMIZESNAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Randomize {
    /// `prng`: `fully-random` (default).
    #[default]
    Prng,
    /// `hashrandom`: `random`.
    HashRandom,
    /// `none`: plain SNAT.
    None,
}

/// Egress configuration for [`apply_snat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatConfig {
    pub primary_ifname: String,
    /// Source address for SNAT (the primary ENI's primary IP).
    pub primary_ip: Ipv4Addr,
    /// Destinations that are not SNATed nor marked.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`: treated like VPC CIDRs.
    pub exclude_cidrs: Vec<Ipv4Net>,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`: no SNAT and no pod-egress connmark.
    pub external_snat: bool,
    pub randomize: Randomize,
    /// Connmark bit (0x80).
    pub connmark: u32,
    /// Host veth prefix (`eni`); pod traffic is `iifname "<prefix>*"`.
    pub veth_prefix: String,
    /// `AWS_VPC_CNI_NODE_PORT_SUPPORT`: mark connections arriving on the primary interface
    /// for a local address, restore the mark on replies from pods.
    pub node_port_support: bool,
}

fn table_obj() -> Value {
    json!({"table": {"family": "ip", "name": NFT_TABLE}})
}

fn chain(name: &str, base: Option<(&str, &str, i32)>) -> Value {
    let mut c = json!({"family": "ip", "table": NFT_TABLE, "name": name});
    if let Some((ty, hook, prio)) = base {
        c["type"] = json!(ty);
        c["hook"] = json!(hook);
        c["prio"] = json!(prio);
        c["policy"] = json!("accept");
    }
    json!({"add": {"chain": c}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "ip", "table": NFT_TABLE, "chain": chain, "expr": expr}}})
}

fn iifname(name: &str) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}})
}

fn fib_type(flags: &[&str], op: &str) -> Value {
    json!({"match": {"op": op, "left": {"fib": {"result": "type", "flags": flags}}, "right": "local"}})
}

fn or_mark(key: Value, m: u32) -> Value {
    json!({"mangle": {"key": key.clone(), "value": {"|": [key, m]}}})
}

fn ct_mark() -> Value {
    json!({"ct": {"key": "mark"}})
}

fn daddr_set(op: &str, nets: &[Ipv4Net]) -> Value {
    let set: Vec<Value> = nets
        .iter()
        .map(|n| json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}}))
        .collect();
    json!({"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"set": set}}})
}

/// The libnftables-JSON batch [`apply_snat`] applies (exposed for tests and debugging):
/// delete and recreate the whole table in one transaction.
pub fn snat_ruleset(c: &SnatConfig) -> Result<Value, DataplaneError> {
    let invalid = |what: &'static str, value: String| DataplaneError::Invalid { what, value };
    if c.connmark == 0 || c.connmark & ENI_MARK_MASK != 0 {
        return Err(invalid(
            "connmark (non-zero, and clear of the ENI mark bits 0x3f00)",
            format!("{:#x}", c.connmark),
        ));
    }
    if c.veth_prefix.is_empty() || c.veth_prefix.len() > 4 || c.veth_prefix.contains('"') {
        return Err(invalid("veth prefix", c.veth_prefix.clone()));
    }
    if c.primary_ifname.is_empty() || c.primary_ifname.contains(['"', '*']) {
        return Err(invalid("primary interface", c.primary_ifname.clone()));
    }
    let m = c.connmark;
    let pods = format!("{}*", c.veth_prefix);
    let mut nosnat: Vec<Ipv4Net> = c
        .vpc_cidrs
        .iter()
        .chain(&c.exclude_cidrs)
        .copied()
        .collect();
    nosnat = Ipv4Net::aggregate(&nosnat);

    let mut cmds = vec![
        json!({"add": table_obj()}),
        json!({"delete": table_obj()}),
        json!({"add": table_obj()}),
        chain("marks", Some(("filter", "prerouting", -150))),
        chain("from-pod", None),
        chain("prerouting", Some(("filter", "prerouting", -90))),
        chain("snat-mark", None),
        chain("postrouting", Some(("nat", "postrouting", 100))),
    ];
    let ct_new = json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}});
    let meta_mark = || json!({"meta": {"key": "mark"}});
    cmds.push(rule(
        "marks",
        vec![iifname(&pods), json!({"jump": {"target": "from-pod"}})],
    ));
    if c.node_port_support {
        cmds.push(rule(
            "marks",
            vec![
                iifname(&c.primary_ifname),
                ct_new.clone(),
                fib_type(&["daddr", "iif"], "=="),
                or_mark(ct_mark(), m),
            ],
        ));
    }
    if c.node_port_support || !c.external_snat {
        cmds.push(rule(
            "from-pod",
            vec![
                json!({"match": {"op": "==", "left": {"&": [ct_mark(), m]}, "right": m}}),
                or_mark(meta_mark(), m),
            ],
        ));
    }
    // Pod egress through a secondary ENI: the host veth's device group names the ENI; one
    // verdict-map lookup jumps to the ENI's chain, which sets its mark bits for the ENI's
    // `fwmark` rule. Every secondary ENI the mark bits can express is listed, so the table
    // does not change when ENIs come and go.
    let mut vmap = Vec::new();
    for d in 1..=MAX_ENI_DEVICE {
        let name = format!("eni-{d}");
        cmds.push(chain(&name, None));
        cmds.push(rule(&name, vec![or_mark(meta_mark(), eni_mark(d))]));
        vmap.push(json!([pod_group(d), {"jump": {"target": name}}]));
    }
    cmds.push(rule(
        "from-pod",
        vec![json!({"vmap": {"key": {"meta": {"key": "iifgroup"}}, "data": {"set": vmap}}})],
    ));
    if !c.external_snat {
        cmds.push(rule(
            "prerouting",
            vec![
                iifname(&pods),
                ct_new,
                json!({"jump": {"target": "snat-mark"}}),
            ],
        ));
        cmds.push(rule(
            "snat-mark",
            vec![fib_type(&["daddr"], "=="), json!({"return": null})],
        ));
        if !nosnat.is_empty() {
            cmds.push(rule(
                "snat-mark",
                vec![daddr_set("==", &nosnat), json!({"return": null})],
            ));
        }
        cmds.push(rule("snat-mark", vec![or_mark(ct_mark(), m)]));
        cmds.push(rule("snat-mark", vec![or_mark(meta_mark(), m)]));
    }
    if !c.external_snat {
        let mut snat = json!({"addr": c.primary_ip.to_string()});
        match c.randomize {
            Randomize::Prng => snat["flags"] = json!(["fully-random"]),
            Randomize::HashRandom => snat["flags"] = json!(["random"]),
            Randomize::None => {}
        }
        let mut expr = Vec::new();
        if !nosnat.is_empty() {
            expr.push(daddr_set("!=", &nosnat));
        }
        expr.push(fib_type(&["daddr"], "!="));
        expr.push(json!({"counter": null}));
        expr.push(json!({"snat": snat}));
        cmds.push(rule("postrouting", expr));
    }
    Ok(json!({"nftables": cmds}))
}

fn apply(table: Value) -> Result<(), DataplaneError> {
    let nft_err = |msg: String| DataplaneError::Nft {
        table: NFT_TABLE.into(),
        msg,
    };
    // validate against the nftables crate's schema, then hand it to `nft -j -f -`
    let typed: nftables::schema::Nftables =
        serde_json::from_value(table).map_err(|e| nft_err(format!("bad ruleset: {e}")))?;
    nftables::helper::apply_ruleset(&typed).map_err(|e| match e {
        nftables::helper::NftablesError::NftFailed { stderr, .. } => {
            nft_err(format!("nft rejected the ruleset: {}", stderr.trim()))
        }
        other => nft_err(other.to_string()),
    })
}

/// Replaces the table `ip vpc-cni` atomically (one `nft` transaction: delete + recreate),
/// in the calling thread's netns.
pub fn apply_snat(c: &SnatConfig) -> Result<(), DataplaneError> {
    apply(snat_ruleset(c)?)
}

/// Deletes the table `ip vpc-cni` (absent is fine).
pub fn remove_snat() -> Result<(), DataplaneError> {
    apply(json!({"nftables": [
        {"add": table_obj()},
        {"delete": table_obj()},
    ]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SnatConfig {
        SnatConfig {
            primary_ifname: "eth0".into(),
            primary_ip: Ipv4Addr::new(172, 31, 15, 228),
            vpc_cidrs: vec!["172.31.0.0/16".parse().unwrap()],
            exclude_cidrs: vec![
                "172.31.5.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            external_snat: false,
            randomize: Randomize::Prng,
            connmark: 0x80,
            veth_prefix: "eni".into(),
            node_port_support: true,
        }
    }

    fn text(v: &Value) -> String {
        v.to_string()
    }

    #[test]
    fn ruleset_has_snat_marks_and_aggregated_cidrs() {
        let v = snat_ruleset(&cfg()).unwrap();
        let s = text(&v);
        assert!(
            s.contains(r#""snat":{"addr":"172.31.15.228","flags":["fully-random"]}"#),
            "{s}"
        );
        assert!(s.contains(r#""right":"eni*""#));
        assert!(s.contains(r#""right":"eth0""#));
        // 172.31.5.0/24 is inside 172.31.0.0/16: merged away (nft rejects overlaps)
        assert!(!s.contains("172.31.5.0"), "{s}");
        assert!(s.contains(r#""addr":"10.0.0.0","len":8"#));
        // the typed schema accepts it
        let _: nftables::schema::Nftables = serde_json::from_value(v).unwrap();
    }

    /// The rules of `chain`, as JSON text.
    fn rules_of(v: &Value, chain: &str) -> String {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(Value::to_string)
            .collect()
    }

    /// The SNAT and connmark rules (not the jump to `from-pod` nor the ENI marks, which are
    /// always there).
    fn snat_rules(v: &Value) -> String {
        let marks = rules_of(v, "marks").replace(r#"{"jump":{"target":"from-pod"}}"#, "");
        let from_pod = rules_of(v, "from-pod");
        let restore: String = from_pod.split("\"vmap\"").next().unwrap().into();
        ["prerouting", "snat-mark", "postrouting"]
            .iter()
            .map(|c| rules_of(v, c))
            .chain([marks, restore])
            .collect()
    }

    #[test]
    fn established_packets_skip_the_new_connection_work() {
        let v = snat_ruleset(&cfg()).unwrap();
        // NodePort connections are marked on their first packet, before any FIB lookup
        let marks = rules_of(&v, "marks");
        let (new, fib) = (marks.find(r#""right":"new""#), marks.find(r#""fib""#));
        assert!(new.is_some() && new < fib, "{marks}");
        // the first packet of a SNATed connection gets the packet mark with the ct mark
        let snat_mark = rules_of(&v, "snat-mark");
        assert!(
            snat_mark.contains(r#"{"|":[{"meta":{"key":"mark"}},128]}"#),
            "{snat_mark}"
        );
        // established pod packets: the restore and the ENI vmap, in one chain
        let from_pod = rules_of(&v, "from-pod");
        assert!(
            from_pod.contains(r#"{"&":[{"ct":{"key":"mark"}},128]}"#),
            "{from_pod}"
        );
        assert!(from_pod.contains(r#""iifgroup""#), "{from_pod}");
        assert_eq!(
            rules_of(&v, "prerouting").matches("\"rule\"").count(),
            1,
            "prerouting only judges new connections"
        );
    }

    #[test]
    fn external_snat_drops_snat_and_egress_mark_keeps_nodeport() {
        let mut c = cfg();
        c.external_snat = true;
        let s = snat_rules(&snat_ruleset(&c).unwrap());
        assert!(!s.contains("\"snat\":{"), "{s}");
        assert!(!s.contains("\"jump\""), "{s}");
        assert!(s.contains("\"iif\""), "node-port mark missing: {s}");
        c.node_port_support = false;
        let v = snat_ruleset(&c).unwrap();
        assert!(!snat_rules(&v).contains("\"mangle\""), "{v}");
        assert!(
            rules_of(&v, "from-pod").contains("iifgroup"),
            "ENI marks stay"
        );
    }

    #[test]
    fn pod_egress_is_marked_for_its_eni_by_the_veth_group() {
        let v = snat_ruleset(&cfg()).unwrap();
        assert!(rules_of(&v, "marks").contains(r#""right":"eni*""#));
        let m = rules_of(&v, "from-pod");
        assert!(m.contains(r#""iifgroup""#), "{m}");
        // device 3: group 0x76630003 jumps to eni-3, which ORs 0x300 into the mark
        assert!(
            m.contains(&format!(
                r#"[{},{{"jump":{{"target":"eni-3"}}}}]"#,
                0x7663_0003u32
            )),
            "{m}"
        );
        assert!(rules_of(&v, "eni-3").contains(r#"{"|":[{"meta":{"key":"mark"}},768]}"#));
        assert!(!rules_of(&v, "eni-63").is_empty());
        assert!(rules_of(&v, "eni-64").is_empty());
        let _: nftables::schema::Nftables = serde_json::from_value(v).unwrap();
        // a connmark inside the ENI bits is refused, naming it
        let mut c = cfg();
        c.connmark = 0x100;
        let e = snat_ruleset(&c).unwrap_err().to_string();
        assert!(e.contains("0x100"), "{e}");
    }

    #[test]
    fn randomize_flags() {
        let mut c = cfg();
        c.randomize = Randomize::HashRandom;
        assert!(text(&snat_ruleset(&c).unwrap()).contains(r#""flags":["random"]"#));
        c.randomize = Randomize::None;
        let s = text(&snat_ruleset(&c).unwrap());
        assert!(s.contains(r#""snat":{"addr":"172.31.15.228"}"#), "{s}");
    }

    #[test]
    fn invalid_config_is_rejected_naming_value() {
        let mut c = cfg();
        c.veth_prefix = "toolong".into();
        let e = snat_ruleset(&c).unwrap_err();
        assert!(e.to_string().contains("toolong"));
        let mut c = cfg();
        c.connmark = 0;
        assert!(snat_ruleset(&c).is_err());
    }

    #[test]
    fn empty_cidrs_snat_everything_but_local() {
        let mut c = cfg();
        c.vpc_cidrs.clear();
        c.exclude_cidrs.clear();
        let s = snat_rules(&snat_ruleset(&c).unwrap());
        assert!(!s.contains("\"set\""), "{s}");
        assert!(s.contains("\"snat\""));
    }
}
