//! Instance types as max pods needs them, and the reference's max-pods values.
//!
//! The reference publishes `misc/eni-max-pods.txt`: ENIs × (IPv4 addresses per ENI − 1) + 2
//! (the 2 being host-network pods such as aws-node and kube-proxy), ENIs counted on the
//! default network card. EKS's max-pods calculator adds the other modes: with prefix
//! delegation (Nitro or bare metal only) each address slot but the primary holds a /28 of 16
//! addresses; with custom networking the primary ENI carries no pods (one ENI fewer);
//! `MAX_ENI` lowers the ENIs; and the value recommended for kubelet's `--max-pods` is capped at
//! 110 on instances with at most 30 vCPUs, 250 above.
//!
//! The built-in table holds the common types (ENIs and addresses from EC2's published limits
//! as the reference's generated table lists them, vCPUs from EC2's instance specifications);
//! any other type comes from `DescribeInstanceTypes` ([`from_ec2`]).

use cloud::InstanceTypeLimits;

/// kubelet's recommended `--max-pods` ceiling at or below [`CPU_THRESHOLD`] vCPUs, and above.
pub const CEILING_LOW_CPU: u32 = 110;
pub const CEILING_HIGH_CPU: u32 = 250;
pub const CPU_THRESHOLD: u32 = 30;

/// What max pods needs of an instance type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeInfo {
    pub limits: InstanceTypeLimits,
    pub vcpus: u32,
    /// Nitro hypervisor or bare metal: the types that take prefix delegation.
    pub prefix_capable: bool,
}

/// (type, ENIs, IPv4 per ENI, vCPUs, Nitro or bare metal)
const TABLE: &[(&str, u32, u32, u32, bool)] = &[
    ("t2.medium", 3, 6, 2, false),
    ("m4.large", 2, 10, 2, false),
    ("t3.nano", 2, 2, 2, true),
    ("t3.micro", 2, 2, 2, true),
    ("t3.small", 3, 4, 2, true),
    ("t3.medium", 3, 6, 2, true),
    ("t3.large", 3, 12, 2, true),
    ("t3.xlarge", 4, 15, 4, true),
    ("t3.2xlarge", 4, 15, 8, true),
    ("m5.large", 3, 10, 2, true),
    ("c5.large", 3, 10, 2, true),
    ("r5.large", 3, 10, 2, true),
    ("m6i.large", 3, 10, 2, true),
    ("c6i.large", 3, 10, 2, true),
    ("m5.xlarge", 4, 15, 4, true),
    ("c5.xlarge", 4, 15, 4, true),
    ("r5.xlarge", 4, 15, 4, true),
    ("m6i.xlarge", 4, 15, 4, true),
    ("c6i.xlarge", 4, 15, 4, true),
    ("m5.2xlarge", 4, 15, 8, true),
    ("c5.2xlarge", 4, 15, 8, true),
    ("r5.2xlarge", 4, 15, 8, true),
    ("m6i.2xlarge", 4, 15, 8, true),
    ("c6i.2xlarge", 4, 15, 8, true),
    ("m5.4xlarge", 8, 30, 16, true),
    ("c5.4xlarge", 8, 30, 16, true),
    ("r5.4xlarge", 8, 30, 16, true),
    ("m6i.4xlarge", 8, 30, 16, true),
    ("c6i.4xlarge", 8, 30, 16, true),
    ("m5.8xlarge", 8, 30, 32, true),
    ("r5.8xlarge", 8, 30, 32, true),
    ("m6i.8xlarge", 8, 30, 32, true),
    ("c5.9xlarge", 8, 30, 36, true),
    ("m5.12xlarge", 8, 30, 48, true),
    ("r5.12xlarge", 8, 30, 48, true),
    ("c5.12xlarge", 8, 30, 48, true),
    ("m5.16xlarge", 15, 50, 64, true),
    ("r5.16xlarge", 15, 50, 64, true),
    ("c5.18xlarge", 15, 50, 72, true),
    ("m5.24xlarge", 15, 50, 96, true),
    ("c5.24xlarge", 15, 50, 96, true),
    ("r5.24xlarge", 15, 50, 96, true),
    ("m5.metal", 15, 50, 96, true),
];

/// The built-in entry of `instance_type`.
pub fn builtin(instance_type: &str) -> Option<TypeInfo> {
    TABLE.iter().find(|(t, ..)| *t == instance_type).map(
        |&(_, max_enis, ipv4_per_eni, vcpus, prefix_capable)| TypeInfo {
            limits: InstanceTypeLimits {
                max_enis,
                ipv4_per_eni,
            },
            vcpus,
            prefix_capable,
        },
    )
}

/// What `DescribeInstanceTypes` said of a type, for max pods; `None` when it lists no vCPUs.
pub fn from_ec2(info: &cloud::InstanceTypeInfo) -> Option<TypeInfo> {
    Some(TypeInfo {
        limits: info.limits,
        vcpus: info.vcpus?,
        prefix_capable: info.is_nitro(),
    })
}

/// The types of the built-in table.
pub fn builtin_types() -> Vec<&'static str> {
    TABLE.iter().map(|(t, ..)| *t).collect()
}

/// How a node's pods get addresses, for max pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    pub prefix_delegation: bool,
    pub custom_networking: bool,
    /// `MAX_ENI`, when it lowers the type's ENIs.
    pub max_eni: Option<u32>,
}

/// Max pods of one type in one mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPods {
    /// What the addresses allow (`eni-max-pods.txt` in the default mode).
    pub by_addresses: u32,
    /// The value for kubelet's `--max-pods`: the above, capped by the vCPUs.
    pub recommended: u32,
    /// Prefix delegation was asked for and the type cannot take it: counted as secondary IPs.
    pub prefix_refused: bool,
}

/// The reference's max pods for `info` in `mode`.
pub fn compute(info: &TypeInfo, mode: Mode) -> MaxPods {
    let mut enis = info.limits.max_enis;
    if let Some(m) = mode.max_eni {
        enis = enis.min(m);
    }
    if mode.custom_networking {
        enis = enis.saturating_sub(1);
    }
    let slots = info.limits.ipv4_per_eni.saturating_sub(1);
    let prefixes = mode.prefix_delegation && info.prefix_capable;
    let per_slot = if prefixes {
        ipam::planner::PREFIX_ADDRS
    } else {
        1
    };
    let by_addresses = enis * slots * per_slot + 2;
    let ceiling = if info.vcpus > CPU_THRESHOLD {
        CEILING_HIGH_CPU
    } else {
        CEILING_LOW_CPU
    };
    MaxPods {
        by_addresses,
        recommended: by_addresses.min(ceiling),
        prefix_refused: mode.prefix_delegation && !prefixes,
    }
}

/// `vpc-cni-agent max-pods`: the four modes of one type, as lines.
pub fn report(instance_type: &str, info: &TypeInfo, max_eni: Option<u32>) -> String {
    let mut out = format!(
        "{instance_type}: {} ENIs × {} IPv4 addresses, {} vCPUs, {}{}\n",
        info.limits.max_enis,
        info.limits.ipv4_per_eni,
        info.vcpus,
        if info.prefix_capable {
            "Nitro or bare metal (prefix delegation possible)"
        } else {
            "not Nitro (no prefix delegation)"
        },
        max_eni.map_or(String::new(), |m| format!(", MAX_ENI={m}"))
    );
    out.push_str(&format!(
        "{:<36} {:>10} {:>18}\n",
        "mode", "addresses", "kubelet --max-pods"
    ));
    for (name, prefix_delegation, custom_networking) in [
        ("secondary IPs", false, false),
        ("prefix delegation", true, false),
        ("custom networking", false, true),
        ("custom networking + prefix delegation", true, true),
    ] {
        let m = compute(
            info,
            Mode {
                prefix_delegation,
                custom_networking,
                max_eni,
            },
        );
        let note = if m.prefix_refused {
            " (type refuses prefixes)"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<36} {:>10} {:>18}{note}\n",
            name, m.by_addresses, m.recommended
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's published values (aws/amazon-vpc-cni-k8s v1.23.1, misc/eni-max-pods.txt).
    const ENI_MAX_PODS: &[(&str, u32)] = &[
        ("c5.18xlarge", 737),
        ("c5.4xlarge", 234),
        ("c5.9xlarge", 234),
        ("c5.large", 29),
        ("c6i.xlarge", 58),
        ("m4.large", 20),
        ("m5.16xlarge", 737),
        ("m5.24xlarge", 737),
        ("m5.4xlarge", 234),
        ("m5.8xlarge", 234),
        ("m5.large", 29),
        ("m5.metal", 737),
        ("m5.xlarge", 58),
        ("m6i.large", 29),
        ("r5.2xlarge", 58),
        ("r5.large", 29),
        ("t2.medium", 17),
        ("t3.large", 35),
        ("t3.medium", 17),
        ("t3.micro", 4),
        ("t3.nano", 4),
        ("t3.small", 11),
        ("t3.xlarge", 58),
    ];

    fn info(t: &str) -> TypeInfo {
        builtin(t).unwrap_or_else(|| panic!("{t} not in the built-in table"))
    }

    #[test]
    fn the_default_mode_gives_the_reference_published_values() {
        for (t, want) in ENI_MAX_PODS {
            assert_eq!(
                compute(&info(t), Mode::default()).by_addresses,
                *want,
                "{t}"
            );
        }
    }

    #[test]
    fn prefix_delegation_custom_networking_and_the_kubelet_caps() {
        let m5 = info("m5.large");
        let pd = Mode {
            prefix_delegation: true,
            ..Mode::default()
        };
        // 3 × 9 × 16 + 2, capped at 110 (2 vCPUs): the 110 pods on an m5.large.
        assert_eq!(
            compute(&m5, pd),
            MaxPods {
                by_addresses: 434,
                recommended: 110,
                prefix_refused: false
            }
        );
        let cn = Mode {
            custom_networking: true,
            ..Mode::default()
        };
        assert_eq!(compute(&m5, cn).by_addresses, 2 * 9 + 2);
        assert_eq!(
            compute(
                &m5,
                Mode {
                    prefix_delegation: true,
                    custom_networking: true,
                    max_eni: None
                }
            )
            .by_addresses,
            2 * 9 * 16 + 2
        );
        // Above 30 vCPUs the ceiling is 250; below it a small type keeps its own value.
        assert_eq!(compute(&info("m5.24xlarge"), pd).recommended, 250);
        assert_eq!(
            compute(&info("m5.24xlarge"), Mode::default()).recommended,
            250
        );
        assert_eq!(
            compute(&info("c5.9xlarge"), Mode::default()).recommended,
            234
        );
        assert_eq!(compute(&info("t3.medium"), Mode::default()).recommended, 17);
        // A Xen type takes no prefixes: counted as secondary IPs, and said so.
        let m4 = compute(&info("m4.large"), pd);
        assert_eq!((m4.by_addresses, m4.prefix_refused), (20, true));
        // MAX_ENI lowers the ENIs, never raises them.
        let capped = Mode {
            max_eni: Some(2),
            ..Mode::default()
        };
        assert_eq!(compute(&m5, capped).by_addresses, 2 * 9 + 2);
        let high = Mode {
            max_eni: Some(99),
            ..Mode::default()
        };
        assert_eq!(compute(&m5, high).by_addresses, 29);
    }

    #[test]
    fn the_report_lists_every_mode() {
        let r = report("m5.large", &info("m5.large"), None);
        for line in [
            "m5.large: 3 ENIs × 10 IPv4 addresses, 2 vCPUs",
            "secondary IPs",
            "prefix delegation",
            "custom networking + prefix delegation",
        ] {
            assert!(r.contains(line), "{line:?} in\n{r}");
        }
        let pd: Vec<&str> = r
            .lines()
            .find(|l| l.starts_with("prefix delegation "))
            .map(|l| l.split_whitespace().skip(2).collect())
            .unwrap_or_default();
        assert_eq!(pd, ["434", "110"], "{r}");
    }
}
