//! The agent's configuration: the reference's environment variables, same names and meanings,
//! validated at start with an error that names the variable and the bad value.
//!
//! [`REFERENCE_README`] lists every variable of the reference's README (v1.23) and
//! [`OTHERS`] the further variables the agent knows, each with its [`Status`]: implemented
//! (parsed into [`Config`]), accepted without effect (logged), or refused at start when set to
//! a value that asks for behaviour vpc-cni does not have. README.md's Configuration tables list
//! the same variables (a unit test keeps them in step).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use dataplane::Randomize;
use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// False with DISABLE_NETWORK_RESOURCE_PROVISIONING=true or ENABLE_IMDS_ONLY_MODE=true:
    /// the agent then uses only the ENIs and addresses IMDS lists and makes no EC2 call.
    pub provisioning: bool,
    /// ENABLE_IMDS_ONLY_MODE=true: no EC2 call at all (implies `provisioning == false`).
    pub imds_only: bool,
    pub warm_eni_target: u32,
    pub warm_ip_target: Option<u32>,
    pub minimum_ip_target: Option<u32>,
    /// ENABLE_PREFIX_DELEGATION: ENI slots take /28 prefixes (Nitro instance types only).
    pub prefix_delegation: bool,
    /// WARM_PREFIX_TARGET (default 1; read with prefix delegation, unless WARM_IP_TARGET or
    /// MINIMUM_IP_TARGET is set).
    pub warm_prefix_target: u32,
    pub max_eni: Option<u32>,
    pub ip_cooldown_s: u64,
    pub cluster_name: Option<String>,
    pub additional_eni_tags: std::collections::BTreeMap<String, String>,
    /// vpc-cni extension: ENIs younger than this are not deleted (the reference's fixed 60 s).
    pub min_eni_age_s: u64,
    /// AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: new ENIs in the subnet, with the security groups, of
    /// the node's ENIConfig; the primary ENI carries no pods.
    pub custom_networking: bool,
    /// ENI_CONFIG_LABEL_DEF / ENI_CONFIG_ANNOTATION_DEF: the node label and annotation that
    /// name its ENIConfig.
    pub eni_config_label: String,
    pub eni_config_annotation: String,
    /// ANNOTATE_POD_IP: write `vpc.amazonaws.com/pod-ips` on each pod the agent gives an
    /// address (through the Kubernetes API, outside the plugin's path).
    pub annotate_pod_ip: bool,
    /// MY_NODE_NAME: the node's name in the Kubernetes API (the DaemonSet sets it from
    /// `spec.nodeName`).
    pub node_name: Option<String>,
    /// KUBECONFIG: the API server and credentials; unset, the pod's service account.
    pub kubeconfig: Option<String>,
    /// `VPC_CNI_PREFIX_RETRY`: seconds an ENI EC2 could give no /28 prefix uses secondary IPs
    /// before prefixes are tried again.
    pub prefix_retry_s: u64,
    pub external_snat: bool,
    pub exclude_snat_cidrs: Vec<Ipv4Net>,
    pub randomize_snat: Randomize,
    pub node_port_support: bool,
    pub connmark: u32,
    pub eni_mtu: u32,
    pub pod_mtu: u32,
    pub veth_prefix: String,
    /// ENABLE_BANDWIDTH_PLUGIN: chain the upstream `bandwidth` plugin.
    pub enable_bandwidth_plugin: bool,
    pub checkpoint: PathBuf,
    pub socket: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub plugin_binary: Option<PathBuf>,
    /// Where the chained plugins (portmap, bandwidth) are copied from (`VPC_CNI_CHAINED_PLUGINS_DIR`).
    pub chained_plugins_dir: Option<PathBuf>,
    /// Where the node's sysctls are written (`VPC_CNI_PROC_SYS`, default `/proc/sys`): an
    /// unprivileged container sees `/proc/sys` read-only and writes through a host mount.
    pub proc_sys: PathBuf,
    /// The plugin's log file; empty: stderr (AWS_VPC_K8S_PLUGIN_LOG_FILE `stderr` or set empty).
    pub plugin_log_file: String,
    pub plugin_log_level: String,
    pub log_file: String,
    pub log_level: String,
    /// `VPC_CNI_LOG_FORMAT`: text lines (default) or JSON lines.
    pub log_format: LogFormat,
    /// `None` when DISABLE_METRICS=true.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `None` when DISABLE_INTROSPECTION=true.
    pub introspection_addr: Option<std::net::SocketAddr>,
    /// What the operator should know about accepted variables that change nothing (or not
    /// what the reference would): logged once logging is set up.
    pub notices: Vec<Notice>,
}

/// How the agent writes its log lines (`VPC_CNI_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (without colour codes unless the output is a terminal).
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// A variable that was accepted but does not do in vpc-cni what it does in the reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub var: &'static str,
    /// vpc-cni behaves differently from the reference with this value (log as a warning);
    /// false: the variable simply has no effect here (log as information).
    pub differs: bool,
    pub message: String,
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The value is not one the variable takes.
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// The value asks for behaviour vpc-cni does not implement (yet).
    #[error("{var}={value:?}: vpc-cni does not implement {feature} yet; {todo}")]
    NotImplemented {
        var: &'static str,
        value: String,
        feature: &'static str,
        todo: String,
    },
}

impl ConfigError {
    /// The variable the error is about.
    pub fn var(&self) -> &'static str {
        match self {
            ConfigError::Invalid { var, .. } | ConfigError::NotImplemented { var, .. } => var,
        }
    }

    /// The value the variable was set to.
    pub fn value(&self) -> &str {
        match self {
            ConfigError::Invalid { value, .. } | ConfigError::NotImplemented { value, .. } => value,
        }
    }
}

fn err(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it (the reference's "Boolean as a String").
pub fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(err(
            var,
            value,
            "expected a boolean: true or false (also 1, t, T, TRUE, True, 0, f, F, FALSE, False)",
        )),
    }
}

/// What vpc-cni does with a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Parsed into [`Config`] with the reference's meaning.
    Implemented,
    /// Accepted and without effect in vpc-cni (`why`); logged when set. A `boolean` one must
    /// still be a valid boolean.
    NoEffect { boolean: bool, why: &'static str },
    /// A boolean accepted with either value, but vpc-cni always behaves as the reference does
    /// with `behaves_as` (`why`). Logged as a difference when the value in effect (set, or the
    /// reference's `default`) is the other one.
    BehavesAs {
        behaves_as: bool,
        default: bool,
        why: &'static str,
    },
    /// Not implemented: a value outside `keeps` (which keep the reference's default
    /// behaviour) is refused at start, naming `feature`; `hint` says more on what to do.
    /// `note`, when a kept value is set, is logged as a difference.
    Refused {
        keeps: Keep,
        feature: &'static str,
        hint: Option<&'static str>,
        note: Option<&'static str>,
    },
}

/// The values of a refused variable that vpc-cni accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A boolean with this value (the reference's default).
    Bool(bool),
    /// Nothing: unset or empty.
    Empty,
    /// One of `kept` (case-insensitive); the others of `valid` are refused, anything else is
    /// invalid.
    OneOf {
        valid: &'static [&'static str],
        kept: &'static [&'static str],
    },
}

impl Keep {
    /// What to do instead, for the refusal message.
    fn todo(&self) -> String {
        match self {
            Keep::Bool(b) => format!("unset it or set it to {b} (the reference's default)"),
            Keep::Empty => "unset it (the reference's default is empty)".to_string(),
            Keep::OneOf { kept, .. } => format!("unset it or set it to {}", kept.join(" or ")),
        }
    }
}

/// One environment variable and what vpc-cni does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub status: Status,
}

const fn implemented(name: &'static str) -> Var {
    Var {
        name,
        status: Status::Implemented,
    }
}

const fn no_effect(name: &'static str, boolean: bool, why: &'static str) -> Var {
    Var {
        name,
        status: Status::NoEffect { boolean, why },
    }
}

const fn refused(name: &'static str, keeps: Keep, feature: &'static str) -> Var {
    Var {
        name,
        status: Status::Refused {
            keeps,
            feature,
            hint: None,
            note: None,
        },
    }
}

const fn refused_hint(
    name: &'static str,
    keeps: Keep,
    feature: &'static str,
    hint: &'static str,
) -> Var {
    Var {
        name,
        status: Status::Refused {
            keeps,
            feature,
            hint: Some(hint),
            note: None,
        },
    }
}

/// Every variable of the reference's README (v1.23), in its order.
pub const REFERENCE_README: &[Var] = &[
    Var {
        name: "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
        status: Status::BehavesAs {
            behaves_as: true,
            default: false,
            why: "vpc-cni does not read the node object, so it keeps adding and releasing ENIs \
                  and addresses on a cordoned (unschedulable) node",
        },
    },
    implemented("AWS_VPC_CNI_NODE_PORT_SUPPORT"),
    implemented("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG"),
    implemented("ENI_CONFIG_ANNOTATION_DEF"),
    implemented("ENI_CONFIG_LABEL_DEF"),
    implemented("HOST_CNI_BIN_PATH"),
    implemented("HOST_CNI_CONFDIR_PATH"),
    implemented("AWS_VPC_ENI_MTU"),
    implemented("AWS_VPC_K8S_CNI_EXTERNALSNAT"),
    implemented("AWS_VPC_K8S_CNI_RANDOMIZESNAT"),
    implemented("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS"),
    implemented("POD_MTU"),
    implemented("WARM_ENI_TARGET"),
    implemented("WARM_IP_TARGET"),
    implemented("MINIMUM_IP_TARGET"),
    implemented("MAX_ENI"),
    implemented("AWS_VPC_K8S_CNI_LOGLEVEL"),
    implemented("AWS_VPC_K8S_CNI_LOG_FILE"),
    implemented("AWS_VPC_K8S_PLUGIN_LOG_FILE"),
    implemented("AWS_VPC_K8S_PLUGIN_LOG_LEVEL"),
    implemented("INTROSPECTION_BIND_ADDRESS"),
    implemented("DISABLE_INTROSPECTION"),
    implemented("DISABLE_METRICS"),
    implemented("AWS_VPC_K8S_CNI_VETHPREFIX"),
    implemented("ADDITIONAL_ENI_TAGS"),
    no_effect(
        "AWS_VPC_K8S_CNI_CONFIGURE_RPFILTER",
        true,
        "deprecated, a no-op in the reference too; vpc-cni always sets the primary \
         interface's rp_filter to 2 (loose)",
    ),
    implemented("CLUSTER_NAME"),
    no_effect(
        "CLUSTER_ENDPOINT",
        false,
        "vpc-cni finds the API server from its service account (or KUBECONFIG)",
    ),
    refused(
        "ENABLE_POD_ENI",
        Keep::Bool(false),
        "security groups for pods (trunk and branch ENIs)",
    ),
    no_effect(
        "POD_SECURITY_GROUP_ENFORCING_MODE",
        false,
        "read only with security groups for pods (ENABLE_POD_ENI=true), which vpc-cni refuses",
    ),
    refused_hint(
        "DISABLE_TCP_EARLY_DEMUX",
        Keep::Bool(false),
        "turning off net.ipv4.tcp_early_demux",
        "it is needed only with ENABLE_POD_ENI=true, which vpc-cni refuses",
    ),
    Var {
        name: "ENABLE_SUBNET_DISCOVERY",
        status: Status::BehavesAs {
            behaves_as: false,
            default: true,
            why: "vpc-cni creates secondary ENIs in the primary ENI's subnet only: subnets \
                  tagged kubernetes.io/role/cni are not considered and a primary subnet tagged \
                  kubernetes.io/role/cni=0 is still used (with true, the reference does the \
                  same when no subnet carries the tag)",
        },
    },
    implemented("ENABLE_PREFIX_DELEGATION"),
    implemented("WARM_PREFIX_TARGET"),
    implemented("DISABLE_NETWORK_RESOURCE_PROVISIONING"),
    implemented("ENABLE_BANDWIDTH_PLUGIN"),
    implemented("ANNOTATE_POD_IP"),
    refused_hint(
        "ENABLE_IPv4",
        Keep::Bool(true),
        "clusters without IPv4",
        "vpc-cni runs IPv4 clusters only",
    ),
    refused_hint(
        "ENABLE_IPv6",
        Keep::Bool(false),
        "IPv6 clusters",
        "vpc-cni runs IPv4 clusters only",
    ),
    no_effect(
        "ENABLE_NFTABLES",
        true,
        "deprecated in the reference; vpc-cni programs its own nftables table, and uses \
         iptables only to remove aws-node's rules when it adopts a node (and to put them back \
         on `uninstall --to aws-node`)",
    ),
    refused(
        "AWS_EXTERNAL_SERVICE_CIDRS",
        Keep::Empty,
        "routing external service CIDRs through the main table",
    ),
    refused_hint(
        "AWS_EC2_ENDPOINT",
        Keep::Empty,
        "a custom EC2 endpoint through AWS_EC2_ENDPOINT",
        "set AWS_ENDPOINT_URL_EC2 to the endpoint instead (vpc-cni's EC2 client reads the \
         AWS SDK's standard variable)",
    ),
    refused_hint(
        "DISABLE_LEAKED_ENI_CLEANUP",
        Keep::Bool(false),
        "turning off the leaked-ENI clean-up",
        "with provisioning, vpc-cni deletes this instance's detached ENIs when it starts (and \
         an ENI of its pool detached behind its back once EC2 shows it detached); to make no \
         EC2 call at all, set DISABLE_NETWORK_RESOURCE_PROVISIONING=true or \
         ENABLE_IMDS_ONLY_MODE=true",
    ),
    refused(
        "ENABLE_V6_EGRESS",
        Keep::Bool(false),
        "IPv6 egress for pods of an IPv4 cluster",
    ),
    no_effect(
        "ENABLE_V4_EGRESS",
        true,
        "read only in IPv6 clusters (ENABLE_IPv6=true), which vpc-cni refuses",
    ),
    implemented("IP_COOLDOWN_PERIOD"),
    refused(
        "DISABLE_POD_V6",
        Keep::Bool(false),
        "disabling IPv6 in pods (the chained tuning plugin)",
    ),
    Var {
        name: "NETWORK_POLICY_ENFORCING_MODE",
        status: Status::Refused {
            keeps: Keep::OneOf {
                valid: &["none", "strict", "standard"],
                kept: &["standard", "none"],
            },
            feature: "strict network policy enforcement",
            hint: Some(
                "a new pod starts default-deny only when the CNI calls the network policy \
                 agent as it sets the pod up, which vpc-cni does not do",
            ),
            note: Some(
                "vpc-cni does not call the network policy agent when it sets up a pod: a new \
                 pod starts with the default allow until the agent applies its policies (the \
                 standard mode's window)",
            ),
        },
    },
    implemented("ENABLE_IMDS_ONLY_MODE"),
    refused(
        "ENABLE_MULTI_NIC",
        Keep::Bool(false),
        "network cards other than card 0 (multi-NIC)",
    ),
];

/// Variables outside the reference's README: from the reference's code, and vpc-cni's own.
pub const OTHERS: &[Var] = &[
    implemented("AWS_VPC_K8S_CNI_CONNMARK"),
    implemented("AWS_VPC_K8S_CNI_BACKING_STORE"),
    refused(
        "MANAGE_UNTAGGED_ENI",
        Keep::Bool(true),
        "leaving alone the ENIs without this instance's node.k8s.amazonaws.com/instance_id tag",
    ),
    implemented("METRICS_BIND_ADDRESS"),
    implemented("VPC_CNI_AGENT_SOCKET"),
    implemented("VPC_CNI_PLUGIN_BINARY"),
    implemented("VPC_CNI_CHAINED_PLUGINS_DIR"),
    implemented("VPC_CNI_MIN_ENI_AGE"),
    implemented("VPC_CNI_PREFIX_RETRY"),
    implemented("VPC_CNI_LOG_FORMAT"),
    implemented("VPC_CNI_PROC_SYS"),
    implemented("MY_NODE_NAME"),
    implemented("KUBECONFIG"),
];

/// The implemented variables the reference's `/v1/networkutils-env-settings` shows (host
/// networking: SNAT, connmark, MTU, veth names); the other implemented ones are shown by
/// `/v1/ipamd-env-settings` (see [`Config::effective_values`]).
pub const NETWORK_VARS: &[&str] = &[
    "AWS_VPC_CNI_NODE_PORT_SUPPORT",
    "AWS_VPC_ENI_MTU",
    "AWS_VPC_K8S_CNI_EXTERNALSNAT",
    "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
    "AWS_VPC_K8S_CNI_CONNMARK",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
    "POD_MTU",
];

/// Every variable the agent knows.
pub fn variables() -> impl Iterator<Item = &'static Var> {
    REFERENCE_README.iter().chain(OTHERS)
}

/// Checks every variable that is not [`Status::Implemented`]: refuses what vpc-cni does not
/// implement, and returns what to log about the rest.
fn check_unimplemented(vars: &HashMap<String, String>) -> Result<Vec<Notice>, ConfigError> {
    let mut notices = Vec::new();
    for v in variables() {
        let name = v.name;
        let value = vars.get(name).map(|s| s.trim()).filter(|s| !s.is_empty());
        match v.status {
            Status::Implemented => {}
            Status::NoEffect { boolean, why } => {
                if let Some(value) = value {
                    if boolean {
                        parse_bool(name, value)?;
                    }
                    notices.push(Notice {
                        var: name,
                        differs: false,
                        message: format!("{name}={value:?}: accepted, no effect: {why}"),
                    });
                }
            }
            Status::BehavesAs {
                behaves_as,
                default,
                why,
            } => {
                let in_effect = match value {
                    Some(value) => parse_bool(name, value)?,
                    None => default,
                };
                if in_effect != behaves_as {
                    let shown = match value {
                        Some(value) => format!("{name}={value:?}"),
                        None => format!("{name} unset (the reference's default {default})"),
                    };
                    notices.push(Notice {
                        var: name,
                        differs: true,
                        message: format!("{shown}: vpc-cni behaves as with {behaves_as}: {why}"),
                    });
                }
            }
            Status::Refused {
                keeps,
                feature,
                hint,
                note,
            } => {
                let Some(value) = value else { continue };
                let kept = match keeps {
                    Keep::Bool(b) => parse_bool(name, value)? == b,
                    Keep::Empty => false,
                    Keep::OneOf { valid, kept } => {
                        let lower = value.to_ascii_lowercase();
                        if !valid.contains(&lower.as_str()) {
                            return Err(err(
                                name,
                                value,
                                format!("expected one of {}", valid.join(", ")),
                            ));
                        }
                        kept.contains(&lower.as_str())
                    }
                };
                if !kept {
                    let mut todo = keeps.todo();
                    if let Some(hint) = hint {
                        todo = format!("{todo}; {hint}");
                    }
                    return Err(ConfigError::NotImplemented {
                        var: name,
                        value: value.to_string(),
                        feature,
                        todo,
                    });
                }
                if let Some(note) = note {
                    notices.push(Notice {
                        var: name,
                        differs: true,
                        message: format!("{name}={value:?}: {note}"),
                    });
                }
            }
        }
    }
    Ok(notices)
}

/// The environment, remembering which variables the parser read.
struct Env<'a> {
    vars: &'a HashMap<String, String>,
    read: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Env<'a> {
    fn new(vars: &'a HashMap<String, String>) -> Self {
        Env {
            vars,
            read: RefCell::default(),
        }
    }

    /// The value as set (trimmed), empty included.
    fn raw(&self, var: &'static str) -> Option<&'a str> {
        self.read.borrow_mut().insert(var);
        self.vars.get(var).map(|s| s.trim())
    }

    /// A set, non-empty value (the reference treats empty as unset).
    fn get(&self, var: &'static str) -> Option<&'a str> {
        self.raw(var).filter(|s| !s.is_empty())
    }

    fn string(&self, var: &'static str, default: &str) -> String {
        self.get(var).unwrap_or(default).to_string()
    }

    fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => parse_bool(var, v),
        }
    }

    fn number<T: std::str::FromStr>(&self, var: &'static str) -> Result<Option<T>, ConfigError> {
        self.get(var)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| err(var, v, "expected a non-negative whole number"))
            })
            .transpose()
    }

    /// An optional target: a whole number, where zero or less means unset (the reference's
    /// "non-positive is the same as not setting the variable").
    fn target(&self, var: &'static str) -> Result<Option<u32>, ConfigError> {
        match self.get(var) {
            None => Ok(None),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n <= 0 => Ok(None),
                Ok(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| err(var, v, "expected a number of addresses")),
                Err(_) => Err(err(var, v, "expected a whole number")),
            },
        }
    }
}

fn parse_mark(var: &'static str, v: &str) -> Result<u32, ConfigError> {
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse::<u32>(),
    };
    match parsed {
        Ok(0) | Err(_) => Err(err(var, v, "expected a non-zero mark such as 0x80")),
        Ok(m) => Ok(m),
    }
}

fn parse_mtu(var: &'static str, v: &str) -> Result<u32, ConfigError> {
    match v.parse::<u32>() {
        Ok(m) if (576..=9001).contains(&m) => Ok(m),
        _ => Err(err(var, v, "expected an MTU between 576 and 9001")),
    }
}

impl Config {
    /// The warm-pool targets these settings ask for.
    pub fn targets(&self) -> ipam::planner::Targets {
        ipam::planner::Targets {
            warm_eni: self.warm_eni_target,
            warm_ip: self.warm_ip_target,
            min_ip: self.minimum_ip_target,
            prefixes: self.prefix_delegation,
            warm_prefix: self.warm_prefix_target,
        }
    }
}

/// Parses the agent configuration from environment variables. A variable set to a value
/// vpc-cni does not implement is refused here, before the agent touches the node.
pub fn from_env(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let notices = check_unimplemented(vars)?;
    let env = Env::new(vars);
    parse(&env, notices)
}

fn parse(env: &Env, notices: Vec<Notice>) -> Result<Config, ConfigError> {
    let imds_only = env.boolean("ENABLE_IMDS_ONLY_MODE", false)?;
    let provisioning = !env.boolean("DISABLE_NETWORK_RESOURCE_PROVISIONING", false)? && !imds_only;
    let warm_eni_target = env.number::<u32>("WARM_ENI_TARGET")?.unwrap_or(1);
    let warm_ip_target = env.target("WARM_IP_TARGET")?;
    let minimum_ip_target = env.target("MINIMUM_IP_TARGET")?;
    let prefix_delegation = env.boolean("ENABLE_PREFIX_DELEGATION", false)?;
    let warm_prefix_target = env.number::<u32>("WARM_PREFIX_TARGET")?.unwrap_or(1);
    let max_eni = match env.get("MAX_ENI") {
        None => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n < 1 => None, // the reference's "unset" is -1
            Ok(n) if n <= 100 => Some(n as u32),
            _ => {
                return Err(err(
                    "MAX_ENI",
                    v,
                    "expected a number of ENIs between 1 and 100",
                ));
            }
        },
    };
    let ip_cooldown_s = env.number::<u64>("IP_COOLDOWN_PERIOD")?.unwrap_or(30);
    let cluster_name = env.get("CLUSTER_NAME").map(str::to_string);
    let additional_eni_tags = match env.get("ADDITIONAL_ENI_TAGS") {
        None => Default::default(),
        Some(v) => {
            let tags: std::collections::BTreeMap<String, String> = serde_json::from_str(v)
                .map_err(|e| {
                    err(
                        "ADDITIONAL_ENI_TAGS",
                        v,
                        format!("expected a JSON object of string tags: {e}"),
                    )
                })?;
            if let Some(k) = tags.keys().find(|k| k.contains("k8s.amazonaws.com")) {
                return Err(err(
                    "ADDITIONAL_ENI_TAGS",
                    v,
                    format!("tag key {k:?} is in the reserved k8s.amazonaws.com namespace"),
                ));
            }
            tags
        }
    };
    let min_eni_age_s = env.number::<u64>("VPC_CNI_MIN_ENI_AGE")?.unwrap_or(60);
    let prefix_retry_s = env.number::<u64>("VPC_CNI_PREFIX_RETRY")?.unwrap_or(120);
    let annotate_pod_ip = env.boolean("ANNOTATE_POD_IP", false)?;
    let custom_networking = env.boolean("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false)?;
    let eni_config_label = env.string("ENI_CONFIG_LABEL_DEF", crate::k8s::ENI_CONFIG_KEY);
    let eni_config_annotation = env.string("ENI_CONFIG_ANNOTATION_DEF", crate::k8s::ENI_CONFIG_KEY);
    let node_name = env.get("MY_NODE_NAME").map(str::to_string);
    let kubeconfig = env.get("KUBECONFIG").map(str::to_string);

    let external_snat = env.boolean("AWS_VPC_K8S_CNI_EXTERNALSNAT", false)?;
    let mut exclude_snat_cidrs = Vec::new();
    if let Some(v) = env.get("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS") {
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net: Ipv4Net = part.parse().map_err(|_| {
                err(
                    "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                    v,
                    format!("{part:?} is not an IPv4 CIDR such as 10.0.0.0/8"),
                )
            })?;
            exclude_snat_cidrs.push(net.trunc());
        }
    }
    let randomize_snat = match env.get("AWS_VPC_K8S_CNI_RANDOMIZESNAT") {
        None | Some("prng") => Randomize::Prng,
        Some("hashrandom") => Randomize::HashRandom,
        Some("none") => Randomize::None,
        Some(v) => {
            return Err(err(
                "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                v,
                "expected prng, hashrandom or none",
            ));
        }
    };
    let node_port_support = env.boolean("AWS_VPC_CNI_NODE_PORT_SUPPORT", true)?;
    let connmark = match env.get("AWS_VPC_K8S_CNI_CONNMARK") {
        None => 0x80,
        Some(v) => match parse_mark("AWS_VPC_K8S_CNI_CONNMARK", v)? {
            m if m & dataplane::ENI_MARK_MASK != 0 => {
                return Err(err(
                    "AWS_VPC_K8S_CNI_CONNMARK",
                    v,
                    "the mark bits 0x3f00 select pods' ENIs; choose a mark outside them, such as 0x80",
                ));
            }
            m => m,
        },
    };

    let eni_mtu = match env.get("AWS_VPC_ENI_MTU") {
        None => 9001,
        Some(v) => parse_mtu("AWS_VPC_ENI_MTU", v)?,
    };
    let pod_mtu = match env.get("POD_MTU") {
        None => eni_mtu,
        Some(v) => parse_mtu("POD_MTU", v)?,
    };
    let veth_prefix = env.string("AWS_VPC_K8S_CNI_VETHPREFIX", "eni");
    if veth_prefix.len() > 4
        || ["eth", "lo", "vlan"].contains(&veth_prefix.as_str())
        || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(err(
            "AWS_VPC_K8S_CNI_VETHPREFIX",
            &veth_prefix,
            "expected at most 4 letters or digits, not eth, lo or vlan",
        ));
    }

    let path = |var: &'static str, default: &str| -> Result<PathBuf, ConfigError> {
        let v = env.string(var, default);
        if !v.starts_with('/') {
            return Err(err(var, &v, "expected an absolute path"));
        }
        Ok(PathBuf::from(v))
    };
    // The plugin logs to stderr when its pluginLogFile is empty; the reference reads an
    // empty AWS_VPC_K8S_PLUGIN_LOG_FILE as stderr too.
    let plugin_log_file = match env.raw("AWS_VPC_K8S_PLUGIN_LOG_FILE") {
        None => "/var/log/aws-routed-eni/plugin.log".to_string(),
        Some(v) if v.is_empty() || v.eq_ignore_ascii_case("stderr") => String::new(),
        Some(v) if v.eq_ignore_ascii_case("stdout") => {
            return Err(err(
                "AWS_VPC_K8S_PLUGIN_LOG_FILE",
                v,
                "the plugin's stdout carries the CNI result; use stderr or a file path",
            ));
        }
        Some(v) => v.to_string(),
    };
    let level = |var: &'static str| -> Result<String, ConfigError> {
        let v = env.string(var, "info").to_ascii_lowercase();
        match v.as_str() {
            "trace" | "debug" | "info" | "warn" | "error" => Ok(v),
            "fatal" => Ok("error".to_string()),
            _ => Err(err(
                var,
                &v,
                "expected trace, debug, info, warn, error or fatal",
            )),
        }
    };

    let addr = |var: &'static str, default: &str| -> Result<std::net::SocketAddr, ConfigError> {
        let v = env.string(var, default);
        if v.starts_with("unix:") {
            return Err(ConfigError::NotImplemented {
                var,
                value: v,
                feature: "endpoints on a Unix socket",
                todo: format!("unset it or set an address such as {default}"),
            });
        }
        v.parse()
            .map_err(|_| err(var, &v, "expected an address such as 127.0.0.1:61679"))
    };
    let metrics_addr = if env.boolean("DISABLE_METRICS", false)? {
        None
    } else {
        Some(addr("METRICS_BIND_ADDRESS", "0.0.0.0:61678")?)
    };
    let introspection_addr = if env.boolean("DISABLE_INTROSPECTION", false)? {
        None
    } else {
        Some(addr("INTROSPECTION_BIND_ADDRESS", "127.0.0.1:61679")?)
    };

    Ok(Config {
        metrics_addr,
        introspection_addr,
        provisioning,
        imds_only,
        warm_eni_target,
        warm_ip_target,
        minimum_ip_target,
        prefix_delegation,
        warm_prefix_target,
        max_eni,
        ip_cooldown_s,
        cluster_name,
        additional_eni_tags,
        min_eni_age_s,
        prefix_retry_s,
        custom_networking,
        eni_config_label,
        eni_config_annotation,
        annotate_pod_ip,
        node_name,
        kubeconfig,
        external_snat,
        exclude_snat_cidrs,
        randomize_snat,
        node_port_support,
        connmark,
        eni_mtu,
        pod_mtu,
        veth_prefix,
        enable_bandwidth_plugin: env.boolean("ENABLE_BANDWIDTH_PLUGIN", false)?,
        checkpoint: path(
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            "/var/run/aws-node/ipam.json",
        )?,
        socket: path("VPC_CNI_AGENT_SOCKET", proto::DEFAULT_SOCKET)?,
        cni_bin_dir: path("HOST_CNI_BIN_PATH", "/host/opt/cni/bin")?,
        cni_conf_dir: path("HOST_CNI_CONFDIR_PATH", "/host/etc/cni/net.d")?,
        plugin_binary: env.get("VPC_CNI_PLUGIN_BINARY").map(PathBuf::from),
        chained_plugins_dir: env
            .get("VPC_CNI_CHAINED_PLUGINS_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        proc_sys: path("VPC_CNI_PROC_SYS", "/proc/sys")?,
        plugin_log_file,
        plugin_log_level: level("AWS_VPC_K8S_PLUGIN_LOG_LEVEL")?,
        log_file: env.string("AWS_VPC_K8S_CNI_LOG_FILE", "stderr"),
        log_level: level("AWS_VPC_K8S_CNI_LOGLEVEL")?,
        log_format: match env.get("VPC_CNI_LOG_FORMAT") {
            None => LogFormat::Text,
            Some(v) if v.eq_ignore_ascii_case("text") => LogFormat::Text,
            Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
            Some(v) => return Err(err("VPC_CNI_LOG_FORMAT", v, "expected text or json")),
        },
        notices,
    })
}

impl Config {
    /// The value in effect of every implemented variable, defaults applied, as the text an
    /// operator would set (unset optional values are empty): what the introspection endpoints
    /// `/v1/ipamd-env-settings` and `/v1/networkutils-env-settings` show.
    pub fn effective_values(&self) -> Vec<(&'static str, String)> {
        fn opt<T: ToString>(v: &Option<T>) -> String {
            v.as_ref().map(ToString::to_string).unwrap_or_default()
        }
        let path = |p: &PathBuf| p.display().to_string();
        let randomize = match self.randomize_snat {
            Randomize::Prng => "prng",
            Randomize::HashRandom => "hashrandom",
            Randomize::None => "none",
        };
        let cidrs: Vec<String> = self
            .exclude_snat_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        vec![
            (
                "AWS_VPC_CNI_NODE_PORT_SUPPORT",
                self.node_port_support.to_string(),
            ),
            ("HOST_CNI_BIN_PATH", path(&self.cni_bin_dir)),
            ("HOST_CNI_CONFDIR_PATH", path(&self.cni_conf_dir)),
            ("AWS_VPC_ENI_MTU", self.eni_mtu.to_string()),
            (
                "AWS_VPC_K8S_CNI_EXTERNALSNAT",
                self.external_snat.to_string(),
            ),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", randomize.to_string()),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", cidrs.join(",")),
            ("POD_MTU", self.pod_mtu.to_string()),
            ("WARM_ENI_TARGET", self.warm_eni_target.to_string()),
            ("WARM_IP_TARGET", opt(&self.warm_ip_target)),
            ("MINIMUM_IP_TARGET", opt(&self.minimum_ip_target)),
            (
                "ENABLE_PREFIX_DELEGATION",
                self.prefix_delegation.to_string(),
            ),
            ("WARM_PREFIX_TARGET", self.warm_prefix_target.to_string()),
            ("MAX_ENI", opt(&self.max_eni)),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", self.log_level.clone()),
            ("AWS_VPC_K8S_CNI_LOG_FILE", self.log_file.clone()),
            (
                "AWS_VPC_K8S_PLUGIN_LOG_FILE",
                if self.plugin_log_file.is_empty() {
                    "stderr".to_string()
                } else {
                    self.plugin_log_file.clone()
                },
            ),
            (
                "AWS_VPC_K8S_PLUGIN_LOG_LEVEL",
                self.plugin_log_level.clone(),
            ),
            ("INTROSPECTION_BIND_ADDRESS", opt(&self.introspection_addr)),
            (
                "DISABLE_INTROSPECTION",
                self.introspection_addr.is_none().to_string(),
            ),
            ("DISABLE_METRICS", self.metrics_addr.is_none().to_string()),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", self.veth_prefix.clone()),
            (
                "ADDITIONAL_ENI_TAGS",
                serde_json::to_string(&self.additional_eni_tags).unwrap_or_default(),
            ),
            ("CLUSTER_NAME", opt(&self.cluster_name)),
            (
                "DISABLE_NETWORK_RESOURCE_PROVISIONING",
                (!self.provisioning).to_string(),
            ),
            (
                "ENABLE_BANDWIDTH_PLUGIN",
                self.enable_bandwidth_plugin.to_string(),
            ),
            ("IP_COOLDOWN_PERIOD", self.ip_cooldown_s.to_string()),
            ("ENABLE_IMDS_ONLY_MODE", self.imds_only.to_string()),
            ("AWS_VPC_K8S_CNI_CONNMARK", format!("{:#x}", self.connmark)),
            ("AWS_VPC_K8S_CNI_BACKING_STORE", path(&self.checkpoint)),
            ("METRICS_BIND_ADDRESS", opt(&self.metrics_addr)),
            ("VPC_CNI_AGENT_SOCKET", path(&self.socket)),
            (
                "VPC_CNI_PLUGIN_BINARY",
                self.plugin_binary.as_ref().map(path).unwrap_or_default(),
            ),
            (
                "VPC_CNI_CHAINED_PLUGINS_DIR",
                self.chained_plugins_dir
                    .as_ref()
                    .map(path)
                    .unwrap_or_default(),
            ),
            ("VPC_CNI_MIN_ENI_AGE", self.min_eni_age_s.to_string()),
            ("VPC_CNI_PREFIX_RETRY", self.prefix_retry_s.to_string()),
            ("ANNOTATE_POD_IP", self.annotate_pod_ip.to_string()),
            (
                "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
                self.custom_networking.to_string(),
            ),
            ("ENI_CONFIG_LABEL_DEF", self.eni_config_label.clone()),
            (
                "ENI_CONFIG_ANNOTATION_DEF",
                self.eni_config_annotation.clone(),
            ),
            ("MY_NODE_NAME", self.node_name.clone().unwrap_or_default()),
            ("KUBECONFIG", self.kubeconfig.clone().unwrap_or_default()),
            ("VPC_CNI_LOG_FORMAT", self.log_format.as_str().to_string()),
            ("VPC_CNI_PROC_SYS", path(&self.proc_sys)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        from_env(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = parse(&[]).unwrap();
        assert!(c.provisioning);
        assert_eq!(c.warm_eni_target, 1);
        assert_eq!(c.warm_ip_target, None);
        assert_eq!(c.ip_cooldown_s, 30);
        assert_eq!(c.connmark, 0x80);
        assert_eq!((c.eni_mtu, c.pod_mtu), (9001, 9001));
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.randomize_snat, Randomize::Prng);
        assert!(c.node_port_support && !c.external_snat);
        assert_eq!(c.checkpoint, PathBuf::from("/var/run/aws-node/ipam.json"));
    }

    #[test]
    fn values_are_parsed() {
        let c = parse(&[
            ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true"),
            ("WARM_IP_TARGET", "5"),
            ("MINIMUM_IP_TARGET", "0"),
            ("MAX_ENI", "-1"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "10.0.0.0/8, 192.168.1.7/24",
            ),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x4000"),
            ("POD_MTU", "1500"),
            ("CLUSTER_NAME", "prod"),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
        ])
        .unwrap();
        assert!(!c.provisioning);
        assert_eq!(c.warm_ip_target, Some(5));
        assert_eq!(c.minimum_ip_target, None);
        assert_eq!(c.max_eni, None);
        assert_eq!(
            c.exclude_snat_cidrs,
            vec![
                "10.0.0.0/8".parse::<Ipv4Net>().unwrap(),
                "192.168.1.0/24".parse().unwrap()
            ]
        );
        assert_eq!(c.randomize_snat, Randomize::None);
        assert_eq!(c.connmark, 0x4000);
        assert_eq!((c.eni_mtu, c.pod_mtu), (9001, 1500));
        assert_eq!(c.cluster_name.as_deref(), Some("prod"));
        assert_eq!(c.additional_eni_tags["team"], "net");
    }

    #[test]
    fn errors_name_the_variable_and_value() {
        for (var, value) in [
            ("WARM_ENI_TARGET", "one"),
            ("IP_COOLDOWN_PERIOD", "-5"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/33"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "sometimes"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x200"),
            ("AWS_VPC_ENI_MTU", "70000"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "toolong"),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "maybe"),
            ("AWS_VPC_K8S_CNI_BACKING_STORE", "relative/ipam.json"),
            ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "stdout"),
            ("ENABLE_PREFIX_DELEGATION", "maybe"),
            ("WARM_PREFIX_TARGET", "-1"),
            ("ENABLE_IPv6", "true"),
            ("MAX_ENI", "1000"),
            ("INTROSPECTION_BIND_ADDRESS", "localhost"),
            ("INTROSPECTION_BIND_ADDRESS", "unix:/run/introspection.sock"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "verbose"),
            ("WARM_IP_TARGET", "five"),
            ("NETWORK_POLICY_ENFORCING_MODE", "lenient"),
            ("ADDITIONAL_ENI_TAGS", "{not json"),
            ("ADDITIONAL_ENI_TAGS", r#"{"node.k8s.amazonaws.com/x":"y"}"#),
            ("VPC_CNI_LOG_FORMAT", "yaml"),
        ] {
            let e = parse(&[(var, value)]).unwrap_err();
            assert_eq!(e.var(), var);
            let text = e.to_string();
            assert!(text.starts_with(var), "{text}");
            assert_eq!(e.value(), value, "{text}");
        }
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        assert_eq!(parse(&[]).unwrap().log_format, LogFormat::Text);
        for (v, want) in [
            ("json", LogFormat::Json),
            ("JSON", LogFormat::Json),
            ("text", LogFormat::Text),
            ("", LogFormat::Text),
        ] {
            assert_eq!(
                parse(&[("VPC_CNI_LOG_FORMAT", v)]).unwrap().log_format,
                want,
                "{v}"
            );
        }
    }

    /// The effective values name every implemented variable once (and no other), with the
    /// defaults applied; the network group is a part of them.
    #[test]
    fn effective_values_cover_exactly_the_implemented_variables() {
        let c = parse(&[("WARM_IP_TARGET", "5"), ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "")]).unwrap();
        let values = c.effective_values();
        let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "a name twice: {names:?}");
        let implemented: BTreeSet<&str> = variables()
            .filter(|v| v.status == Status::Implemented)
            .map(|v| v.name)
            .collect();
        assert_eq!(unique, implemented);
        for n in NETWORK_VARS {
            assert!(implemented.contains(n), "{n}");
        }
        let get = |n: &str| values.iter().find(|(k, _)| *k == n).unwrap().1.as_str();
        assert_eq!(get("WARM_IP_TARGET"), "5");
        assert_eq!(get("MINIMUM_IP_TARGET"), "");
        assert_eq!(get("AWS_VPC_ENI_MTU"), "9001");
        assert_eq!(get("AWS_VPC_K8S_CNI_CONNMARK"), "0x80");
        assert_eq!(get("AWS_VPC_K8S_PLUGIN_LOG_FILE"), "stderr");
        assert_eq!(get("INTROSPECTION_BIND_ADDRESS"), "127.0.0.1:61679");
        assert_eq!(get("ADDITIONAL_ENI_TAGS"), "{}");
        assert_eq!(get("VPC_CNI_LOG_FORMAT"), "text");
    }

    /// The variables of the reference's README (v1.23), from its headings.
    const REFERENCE_README_V1_23: [&str; 50] = [
        "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
        "AWS_VPC_CNI_NODE_PORT_SUPPORT",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG",
        "ENI_CONFIG_ANNOTATION_DEF",
        "ENI_CONFIG_LABEL_DEF",
        "HOST_CNI_BIN_PATH",
        "HOST_CNI_CONFDIR_PATH",
        "AWS_VPC_ENI_MTU",
        "AWS_VPC_K8S_CNI_EXTERNALSNAT",
        "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
        "POD_MTU",
        "WARM_ENI_TARGET",
        "WARM_IP_TARGET",
        "MINIMUM_IP_TARGET",
        "MAX_ENI",
        "AWS_VPC_K8S_CNI_LOGLEVEL",
        "AWS_VPC_K8S_CNI_LOG_FILE",
        "AWS_VPC_K8S_PLUGIN_LOG_FILE",
        "AWS_VPC_K8S_PLUGIN_LOG_LEVEL",
        "INTROSPECTION_BIND_ADDRESS",
        "DISABLE_INTROSPECTION",
        "DISABLE_METRICS",
        "AWS_VPC_K8S_CNI_VETHPREFIX",
        "ADDITIONAL_ENI_TAGS",
        "AWS_VPC_K8S_CNI_CONFIGURE_RPFILTER",
        "CLUSTER_NAME",
        "CLUSTER_ENDPOINT",
        "ENABLE_POD_ENI",
        "POD_SECURITY_GROUP_ENFORCING_MODE",
        "DISABLE_TCP_EARLY_DEMUX",
        "ENABLE_SUBNET_DISCOVERY",
        "ENABLE_PREFIX_DELEGATION",
        "WARM_PREFIX_TARGET",
        "DISABLE_NETWORK_RESOURCE_PROVISIONING",
        "ENABLE_BANDWIDTH_PLUGIN",
        "ANNOTATE_POD_IP",
        "ENABLE_IPv4",
        "ENABLE_IPv6",
        "ENABLE_NFTABLES",
        "AWS_EXTERNAL_SERVICE_CIDRS",
        "AWS_EC2_ENDPOINT",
        "DISABLE_LEAKED_ENI_CLEANUP",
        "ENABLE_V6_EGRESS",
        "ENABLE_V4_EGRESS",
        "IP_COOLDOWN_PERIOD",
        "DISABLE_POD_V6",
        "NETWORK_POLICY_ENFORCING_MODE",
        "ENABLE_IMDS_ONLY_MODE",
        "ENABLE_MULTI_NIC",
    ];

    const TRUE_SPELLINGS: [&str; 6] = ["1", "t", "T", "TRUE", "true", "True"];
    const FALSE_SPELLINGS: [&str; 6] = ["0", "f", "F", "FALSE", "false", "False"];

    fn spellings(b: bool) -> [&'static str; 6] {
        if b { TRUE_SPELLINGS } else { FALSE_SPELLINGS }
    }

    #[test]
    fn the_list_holds_every_variable_of_the_reference_readme_once() {
        let names: Vec<&str> = REFERENCE_README.iter().map(|v| v.name).collect();
        assert_eq!(names, REFERENCE_README_V1_23);
        let all: BTreeSet<&str> = variables().map(|v| v.name).collect();
        assert_eq!(
            all.len(),
            REFERENCE_README.len() + OTHERS.len(),
            "a name twice"
        );
    }

    /// What the parser reads is exactly the implemented variables: an implemented one the
    /// parser ignores, or one it reads that the list calls unimplemented, fails here.
    #[test]
    fn the_parser_reads_exactly_the_implemented_variables() {
        let vars = HashMap::new();
        let env = Env::new(&vars);
        super::parse(&env, Vec::new()).unwrap();
        let read = env.read.into_inner();
        let implemented: BTreeSet<&str> = variables()
            .filter(|v| v.status == Status::Implemented)
            .map(|v| v.name)
            .collect();
        assert_eq!(read, implemented);
    }

    /// Every refused variable, over the whole list: each value that asks for what vpc-cni
    /// does not implement is refused with the variable named and what to do; each value that
    /// keeps the reference's default is accepted.
    #[test]
    fn every_refused_variable_is_refused() {
        let mut refused = 0;
        for v in variables() {
            let Status::Refused { keeps, feature, .. } = v.status else {
                continue;
            };
            refused += 1;
            let (changing, kept): (Vec<&str>, Vec<&str>) = match keeps {
                Keep::Bool(b) => (spellings(!b).to_vec(), spellings(b).to_vec()),
                Keep::Empty => (vec!["10.0.0.0/8", "https://ec2.example"], vec![]),
                Keep::OneOf { valid, kept } => (
                    valid
                        .iter()
                        .filter(|x| !kept.contains(x))
                        .copied()
                        .collect(),
                    kept.to_vec(),
                ),
            };
            assert!(!changing.is_empty(), "{}: no value to refuse", v.name);
            for value in changing {
                let e = parse(&[(v.name, value)]).unwrap_err();
                let ConfigError::NotImplemented {
                    var, feature: f, ..
                } = &e
                else {
                    panic!("{}={value}: not a refusal: {e}", v.name);
                };
                assert_eq!((*var, *f), (v.name, feature));
                assert_eq!(e.value(), value);
                let text = e.to_string();
                assert!(text.starts_with(v.name), "{text}");
                assert!(text.contains("does not implement"), "{text}");
                assert!(text.contains("unset it"), "{text}");
            }
            for value in kept.into_iter().chain(["", "  "]) {
                parse(&[(v.name, value)])
                    .unwrap_or_else(|e| panic!("{}={value:?} refused: {e}", v.name));
            }
        }
        assert!(refused >= 11, "{refused}");
    }

    #[test]
    fn a_refusal_says_what_to_do() {
        let e = parse(&[("ENABLE_POD_ENI", "true")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ENABLE_POD_ENI=\"true\": vpc-cni does not implement security groups for pods \
             (trunk and branch ENIs) yet; unset it or set it to false (the reference's default)"
        );
        let e = parse(&[("AWS_EC2_ENDPOINT", "https://ec2.example")]).unwrap_err();
        assert!(e.to_string().contains("set AWS_ENDPOINT_URL_EC2"), "{e}");
        let e = parse(&[("NETWORK_POLICY_ENFORCING_MODE", "Strict")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unset it or set it to standard or none"),
            "{e}"
        );
    }

    #[test]
    fn booleans_are_read_as_go_parse_bool_reads_them() {
        for (b, spelling) in TRUE_SPELLINGS
            .iter()
            .map(|s| (true, *s))
            .chain(FALSE_SPELLINGS.iter().map(|s| (false, *s)))
        {
            assert_eq!(parse_bool("DISABLE_METRICS", spelling), Ok(b), "{spelling}");
            let c = parse(&[
                ("DISABLE_METRICS", spelling),
                ("ENABLE_BANDWIDTH_PLUGIN", spelling),
            ])
            .unwrap();
            assert_eq!(c.metrics_addr.is_none(), b, "{spelling}");
            assert_eq!(c.enable_bandwidth_plugin, b, "{spelling}");
        }
        for bad in ["yes", "no", "on", "tRUE", "2", "truthy"] {
            assert!(parse_bool("X", bad).is_err(), "{bad}");
        }
        // Every boolean: implemented, without effect, behaving as one value, refused.
        for var in [
            "DISABLE_METRICS",
            "AWS_VPC_K8S_CNI_EXTERNALSNAT",
            "ENABLE_BANDWIDTH_PLUGIN",
            "ENABLE_IMDS_ONLY_MODE",
            "ENABLE_NFTABLES",
            "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
            "ENABLE_POD_ENI",
            "ENABLE_IPv4",
        ] {
            let e = parse(&[(var, "yes")]).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{e}");
            assert_eq!((e.var(), e.value()), (var, "yes"));
            assert!(e.to_string().starts_with(&format!("{var}=\"yes\"")), "{e}");
        }
    }

    #[test]
    fn variables_without_effect_are_accepted_and_noted() {
        for v in variables() {
            let Status::NoEffect { boolean, .. } = v.status else {
                continue;
            };
            let value = if boolean { "true" } else { "anything" };
            let c = parse(&[(v.name, value)]).unwrap();
            assert!(
                c.notices.iter().any(|n| n.var == v.name && !n.differs),
                "{}: {:?}",
                v.name,
                c.notices
            );
            assert!(!parse(&[]).unwrap().notices.iter().any(|n| n.var == v.name));
        }
    }

    #[test]
    fn a_difference_from_the_reference_is_noted_when_in_effect() {
        // The reference's defaults (its manifest sets ENABLE_SUBNET_DISCOVERY=true and
        // NETWORK_POLICY_ENFORCING_MODE=standard).
        let c = parse(&[
            ("ENABLE_SUBNET_DISCOVERY", "true"),
            ("NETWORK_POLICY_ENFORCING_MODE", "standard"),
        ])
        .unwrap();
        let noted: Vec<&str> = c
            .notices
            .iter()
            .filter(|n| n.differs)
            .map(|n| n.var)
            .collect();
        assert_eq!(
            noted,
            [
                "AWS_MANAGE_ENIS_NON_SCHEDULABLE",
                "ENABLE_SUBNET_DISCOVERY",
                "NETWORK_POLICY_ENFORCING_MODE"
            ]
        );
        // Set to what vpc-cni does: nothing to say.
        let c = parse(&[
            ("ENABLE_SUBNET_DISCOVERY", "false"),
            ("AWS_MANAGE_ENIS_NON_SCHEDULABLE", "true"),
        ])
        .unwrap();
        assert!(c.notices.is_empty(), "{:?}", c.notices);
    }

    #[test]
    fn the_reference_manifest_environment_is_accepted() {
        // config/master/aws-k8s-cni.yaml (v1.23), aws-node container.
        let c = parse(&[
            ("ADDITIONAL_ENI_TAGS", "{}"),
            ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "true"),
            ("AWS_VPC_ENI_MTU", "9001"),
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "false"),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "false"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG"),
            (
                "AWS_VPC_K8S_CNI_LOG_FILE",
                "/host/var/log/aws-routed-eni/ipamd.log",
            ),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "prng"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "eni"),
            (
                "AWS_VPC_K8S_PLUGIN_LOG_FILE",
                "/var/log/aws-routed-eni/plugin.log",
            ),
            ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "DEBUG"),
            ("DISABLE_INTROSPECTION", "false"),
            ("DISABLE_METRICS", "false"),
            ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "false"),
            ("ENABLE_IMDS_ONLY_MODE", "false"),
            ("ENABLE_IPv4", "true"),
            ("ENABLE_IPv6", "false"),
            ("ENABLE_MULTI_NIC", "false"),
            ("ENABLE_POD_ENI", "false"),
            ("ENABLE_PREFIX_DELEGATION", "false"),
            ("ENABLE_SUBNET_DISCOVERY", "true"),
            ("NETWORK_POLICY_ENFORCING_MODE", "standard"),
            ("WARM_ENI_TARGET", "1"),
            ("WARM_PREFIX_TARGET", "1"),
            ("DISABLE_TCP_EARLY_DEMUX", "false"),
        ])
        .unwrap();
        assert_eq!(
            (c.log_level.as_str(), c.plugin_log_level.as_str()),
            ("debug", "debug")
        );
        assert!(c.provisioning);
    }

    #[test]
    fn reference_spellings_of_implemented_values() {
        let c = parse(&[
            ("ENABLE_IMDS_ONLY_MODE", "true"),
            ("AWS_VPC_K8S_CNI_LOGLEVEL", "FATAL"),
            ("AWS_VPC_K8S_PLUGIN_LOG_FILE", "stderr"),
            ("WARM_IP_TARGET", "-1"),
            ("MINIMUM_IP_TARGET", "-3"),
        ])
        .unwrap();
        assert!(c.imds_only && !c.provisioning);
        assert_eq!(c.log_level, "error");
        assert_eq!(c.plugin_log_file, "", "empty: the plugin logs to stderr");
        assert_eq!((c.warm_ip_target, c.minimum_ip_target), (None, None));
        let c = parse(&[("AWS_VPC_K8S_PLUGIN_LOG_FILE", "")]).unwrap();
        assert_eq!(c.plugin_log_file, "");
        assert!(parse(&[]).unwrap().provisioning);
    }

    /// The status words README.md's Configuration tables use for a variable.
    fn readme_status(status: &Status) -> String {
        match status {
            Status::Implemented => "implemented".into(),
            Status::NoEffect { .. } => "accepted, no effect".into(),
            Status::BehavesAs { behaves_as, .. } => {
                format!("accepted, behaves as `{behaves_as}`")
            }
            Status::Refused { .. } => "refused".into(),
        }
    }

    /// README.md lists every variable of the list in the table of its kind (the reference's
    /// README, or the others), with its status, and no other.
    #[test]
    fn the_readme_tables_match_the_list() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let section = text
            .split("\n## ")
            .find(|s| s.starts_with("Configuration"))
            .expect("README.md has a ## Configuration section");
        let mut tables: HashMap<&str, Vec<(String, String)>> = HashMap::new();
        let mut current = "";
        for line in section.lines() {
            if let Some(h) = line.strip_prefix("### ") {
                current = h.trim();
            } else if let Some(row) = line.strip_prefix("| `") {
                let cells: Vec<&str> = row.split(" | ").collect();
                let name = cells[0].trim_end_matches('`').to_string();
                let status = cells.get(2).copied().unwrap_or_default().to_string();
                tables.entry(current).or_default().push((name, status));
            }
        }
        for (heading, list) in [
            ("Variables of the reference's README", REFERENCE_README),
            ("Other variables", OTHERS),
        ] {
            let rows = tables.remove(heading).unwrap_or_default();
            let listed: Vec<&str> = list.iter().map(|v| v.name).collect();
            let in_readme: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(in_readme, listed, "README.md table {heading:?}");
            for (v, (_, status)) in list.iter().zip(&rows) {
                let want = readme_status(&v.status);
                assert!(
                    status.starts_with(&want),
                    "README.md: {} has status {status:?}, want {want:?}…",
                    v.name
                );
            }
        }
        assert!(tables.is_empty(), "variables in other tables: {tables:?}");
    }
}
