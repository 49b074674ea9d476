//! The agent's configuration: the reference's environment variables, same names and meanings,
//! validated at start with an error that names the variable and the bad value.

use std::collections::HashMap;
use std::path::PathBuf;

use dataplane::Randomize;
use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub provisioning: bool,
    pub warm_eni_target: u32,
    pub warm_ip_target: Option<u32>,
    pub minimum_ip_target: Option<u32>,
    pub max_eni: Option<u32>,
    pub ip_cooldown_s: u64,
    pub cluster_name: Option<String>,
    pub additional_eni_tags: std::collections::BTreeMap<String, String>,
    /// vpc-cni extension: ENIs younger than this are not deleted (the reference's fixed 60 s).
    pub min_eni_age_s: u64,
    pub external_snat: bool,
    pub exclude_snat_cidrs: Vec<Ipv4Net>,
    pub randomize_snat: Randomize,
    pub node_port_support: bool,
    pub connmark: u32,
    pub eni_mtu: u32,
    pub pod_mtu: u32,
    pub veth_prefix: String,
    pub checkpoint: PathBuf,
    pub socket: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub plugin_binary: Option<PathBuf>,
    pub plugin_log_file: String,
    pub plugin_log_level: String,
    pub log_file: String,
    pub log_level: String,
    /// `None` when DISABLE_METRICS=true.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `None` when DISABLE_INTROSPECTION=true.
    pub introspection_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

fn err(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        value: value.to_string(),
        reason: reason.into(),
    }
}

struct Env<'a>(&'a HashMap<String, String>);

impl Env<'_> {
    /// A set, non-empty value (the reference treats empty as unset).
    fn get(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or(default).to_string()
    }

    fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(err(var, v, "expected true or false")),
            },
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

/// Parses the agent configuration from environment variables.
pub fn from_env(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let env = Env(vars);

    if env.boolean("ENABLE_IPv6", false)? {
        return Err(err(
            "ENABLE_IPv6",
            env.get("ENABLE_IPv6").unwrap_or_default(),
            "IPv6 clusters are not supported yet; unset it (IPv4 is the default)",
        ));
    }
    if let Some(v) = env.get("ENABLE_IPv4")
        && !env.boolean("ENABLE_IPv4", true)?
    {
        return Err(err(
            "ENABLE_IPv4",
            v,
            "IPv4 is the only supported mode; set it to true",
        ));
    }
    if env.boolean("ENABLE_PREFIX_DELEGATION", false)? {
        return Err(err(
            "ENABLE_PREFIX_DELEGATION",
            env.get("ENABLE_PREFIX_DELEGATION").unwrap_or_default(),
            "prefix delegation is not supported yet; unset it to use secondary IPs",
        ));
    }

    let provisioning = !env.boolean("DISABLE_NETWORK_RESOURCE_PROVISIONING", false)?;
    let warm_eni_target = env.number::<u32>("WARM_ENI_TARGET")?.unwrap_or(1);
    let warm_ip_target = env.number::<u32>("WARM_IP_TARGET")?.filter(|n| *n > 0);
    let minimum_ip_target = env.number::<u32>("MINIMUM_IP_TARGET")?.filter(|n| *n > 0);
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
    let plugin_log_file = env.string(
        "AWS_VPC_K8S_PLUGIN_LOG_FILE",
        "/var/log/aws-routed-eni/plugin.log",
    );
    if plugin_log_file.eq_ignore_ascii_case("stdout") {
        return Err(err(
            "AWS_VPC_K8S_PLUGIN_LOG_FILE",
            &plugin_log_file,
            "the plugin's stdout carries the CNI result; use stderr or a file path",
        ));
    }
    let level = |var: &'static str| -> Result<String, ConfigError> {
        let v = env.string(var, "info").to_ascii_lowercase();
        match v.as_str() {
            "trace" | "debug" | "info" | "warn" | "error" => Ok(v),
            _ => Err(err(var, &v, "expected trace, debug, info, warn or error")),
        }
    };

    let addr = |var: &'static str, default: &str| -> Result<std::net::SocketAddr, ConfigError> {
        let v = env.string(var, default);
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
        warm_eni_target,
        warm_ip_target,
        minimum_ip_target,
        max_eni,
        ip_cooldown_s,
        cluster_name,
        additional_eni_tags,
        min_eni_age_s,
        external_snat,
        exclude_snat_cidrs,
        randomize_snat,
        node_port_support,
        connmark,
        eni_mtu,
        pod_mtu,
        veth_prefix,
        checkpoint: path(
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            "/var/run/aws-node/ipam.json",
        )?,
        socket: path("VPC_CNI_AGENT_SOCKET", proto::DEFAULT_SOCKET)?,
        cni_bin_dir: path("HOST_CNI_BIN_PATH", "/host/opt/cni/bin")?,
        cni_conf_dir: path("HOST_CNI_CONFDIR_PATH", "/host/etc/cni/net.d")?,
        plugin_binary: env.get("VPC_CNI_PLUGIN_BINARY").map(PathBuf::from),
        plugin_log_file,
        plugin_log_level: level("AWS_VPC_K8S_PLUGIN_LOG_LEVEL")?,
        log_file: env.string("AWS_VPC_K8S_CNI_LOG_FILE", "stderr"),
        log_level: level("AWS_VPC_K8S_CNI_LOGLEVEL")?,
    })
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
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("ENABLE_IPv6", "true"),
            ("MAX_ENI", "1000"),
            ("INTROSPECTION_BIND_ADDRESS", "localhost"),
            ("ADDITIONAL_ENI_TAGS", "{not json"),
            ("ADDITIONAL_ENI_TAGS", r#"{"node.k8s.amazonaws.com/x":"y"}"#),
        ] {
            let e = parse(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var);
            let text = e.to_string();
            assert!(text.starts_with(var), "{text}");
            assert_eq!(e.value, value, "{text}");
        }
    }
}
