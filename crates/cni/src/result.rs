//! The ADD success result: one canonical in-memory form (the 1.1.0 shape) and its
//! serialisation to, and parsing from, every supported version's JSON shape.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CniError, code};
use crate::version::Version;

/// An interface created or used by the attachment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_blank")]
    pub mac: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside a container; absent for host interfaces.
    #[serde(default, skip_serializing_if = "is_blank")]
    pub sandbox: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "is_blank")]
    pub socket_path: Option<String>,
    /// 1.1.0 and later.
    #[serde(default, rename = "pciID", skip_serializing_if = "is_blank")]
    pub pci_id: Option<String>,
}

/// An address assigned to an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length, e.g. `10.0.0.5/32` (host bits kept).
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route. The fields after `gw` exist from 1.1.0 on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "is_blank")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

/// The canonical ADD result (1.1.0 shape, without `cniVersion`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

fn is_blank(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(str::is_empty)
}

impl CniResult {
    /// The result as `version` shapes it, with `cniVersion` set: 0.3.x/0.4.0 get
    /// `ips[].version` ("4"/"6"); anything before 1.1.0 loses the 1.1 fields.
    pub fn to_json(&self, version: Version) -> Value {
        let mut v = serde_json::to_value(self).expect("result types always serialise");
        let obj = v.as_object_mut().expect("result serialises to an object");
        if !version.has_1_1_fields() {
            strip(obj, "interfaces", &["mtu", "socketPath", "pciID"]);
            strip(
                obj,
                "routes",
                &["mtu", "advmss", "priority", "table", "scope"],
            );
        }
        if version.has_ip_version_field()
            && let Some(Value::Array(ips)) = obj.get_mut("ips")
        {
            for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                if let Value::Object(ip) = ip {
                    let fam = if cfg.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    ip.insert("version".into(), Value::String(fam.into()));
                }
            }
        }
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::String(version.as_str().into()));
        out.extend(std::mem::take(obj));
        Value::Object(out)
    }

    /// Parse a result (e.g. `prevResult`) written in `version`'s shape. Fields a version does
    /// not define are ignored; an `ips[].version` that contradicts the address is an error.
    pub fn from_json(value: &Value, version: Version) -> Result<CniResult, CniError> {
        let bad = |why: String| {
            CniError::new(
                code::DECODING_FAILURE,
                "cannot decode the previous result (prevResult)",
                why,
            )
        };
        if !value.is_object() {
            return Err(bad(format!("expected an object, got {value}")));
        }
        let mut value = value.clone();
        let obj = value.as_object_mut().expect("checked above");
        if !version.has_1_1_fields() {
            strip(obj, "interfaces", &["mtu", "socketPath", "pciID"]);
            strip(
                obj,
                "routes",
                &["mtu", "advmss", "priority", "table", "scope"],
            );
        }
        if let Some(Value::Array(ips)) = obj.get_mut("ips") {
            for ip in ips.iter_mut() {
                let Some(ip) = ip.as_object_mut() else {
                    continue;
                };
                let Some(fam) = ip.remove("version") else {
                    continue;
                };
                let addr = ip.get("address").and_then(Value::as_str).unwrap_or("");
                let v4 = !addr.contains(':');
                match fam.as_str() {
                    Some("4") if v4 => {}
                    Some("6") if !v4 => {}
                    _ => {
                        return Err(bad(format!(
                            "ips[].version {fam} does not match address \"{addr}\""
                        )));
                    }
                }
            }
        }
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))
    }

    /// Append `other` (e.g. our own result after a chained `prevResult`), re-basing its
    /// `ips[].interface` indices past our interfaces.
    pub fn append(&mut self, other: CniResult) {
        let base = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + base);
            ip
        }));
        self.routes.extend(other.routes);
        let CniResult { dns, .. } = other;
        if self.dns.is_empty() {
            self.dns = dns;
        }
    }
}

fn strip(obj: &mut Map<String, Value>, list: &str, fields: &[&str]) {
    if let Some(Value::Array(items)) = obj.get_mut(list) {
        for item in items.iter_mut() {
            if let Value::Object(item) = item {
                for f in fields {
                    item.remove(*f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "eni0123456789a".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    mtu: Some(9001),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:02".into()),
                    mtu: Some(9001),
                    sandbox: Some("/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.99.0.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                table: Some(2),
                scope: Some(0),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("169.254.1.1".parse().unwrap()),
                )
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn shape_1_1() {
        assert_eq!(
            sample().to_json(Version::V1_1_0),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "eni0123456789a", "mac": "02:00:00:00:00:01", "mtu": 9001},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "mtu": 9001, "sandbox": "/run/netns/p"}
                ],
                "ips": [{"address": "10.99.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "table": 2, "scope": 0}]
            })
        );
    }

    #[test]
    fn shape_1_0() {
        assert_eq!(
            sample().to_json(Version::V1_0_0),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "eni0123456789a", "mac": "02:00:00:00:00:01"},
                    {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/p"}
                ],
                "ips": [{"address": "10.99.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
            })
        );
    }

    #[test]
    fn shape_0_x() {
        for v in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let j = sample().to_json(v);
            assert_eq!(j["cniVersion"], v.as_str());
            assert_eq!(
                j["ips"],
                json!([{"version": "4", "address": "10.99.0.5/32", "gateway": "169.254.1.1", "interface": 1}])
            );
            assert_eq!(j["interfaces"][0].get("mtu"), None);
            assert_eq!(
                j["routes"],
                json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
            );
        }
        let mut six = sample();
        six.ips[0].address = "fd00::5/128".parse().unwrap();
        assert_eq!(six.to_json(Version::V0_4_0)["ips"][0]["version"], "6");
    }

    #[test]
    fn round_trip_every_version() {
        for v in Version::ALL {
            let j = sample().to_json(v);
            let back = CniResult::from_json(&j, v).unwrap();
            let mut expected = sample();
            if !v.has_1_1_fields() {
                for i in &mut expected.interfaces {
                    i.mtu = None;
                }
                expected.routes[0].table = None;
                expected.routes[0].scope = None;
            }
            assert_eq!(back, expected, "version {v}");
            // and it re-serialises identically
            assert_eq!(back.to_json(v), j, "version {v}");
        }
    }

    #[test]
    fn parse_real_world_0_3_1() {
        // as written by the reference plugins (bridge + host-local), with extra dns
        let j = json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                           {"name": "eth0", "mac": "aa:bb:cc:dd:ee:00", "sandbox": "/proc/1/ns/net"}],
            "ips": [{"version": "4", "interface": 1, "address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.0.0.10"], "search": ["svc.cluster.local"]}
        });
        let r = CniResult::from_json(&j, Version::V0_3_1).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
        assert_eq!(r.ips[0].interface, Some(1));
        assert_eq!(r.routes[0].gw, None);
        assert_eq!(r.dns.nameservers, vec!["10.0.0.10"]);
        assert_eq!(r.to_json(Version::V0_3_1), j);
    }

    #[test]
    fn bad_prev_results() {
        let e = CniResult::from_json(&json!([1]), Version::V1_0_0).unwrap_err();
        assert_eq!(e.code, 6);
        let e = CniResult::from_json(
            &json!({"ips": [{"address": "10.1.0.2/24", "version": "6"}]}),
            Version::V0_4_0,
        )
        .unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.details.contains("10.1.0.2/24"), "{e}");
        let e = CniResult::from_json(&json!({"ips": [{"address": "nonsense"}]}), Version::V1_0_0)
            .unwrap_err();
        assert_eq!(e.code, 6);
        assert!(CniResult::from_json(&json!({}), Version::V1_1_0).unwrap() == CniResult::default());
    }

    #[test]
    fn append_rebases_interfaces() {
        let mut prev = CniResult {
            interfaces: vec![Interface {
                name: "x".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "10.0.0.1/24".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            routes: vec![],
            dns: Dns {
                nameservers: vec!["1.1.1.1".into()],
                ..Default::default()
            },
        };
        prev.append(sample());
        assert_eq!(prev.interfaces.len(), 3);
        assert_eq!(prev.ips[0].interface, Some(0));
        assert_eq!(prev.ips[1].interface, Some(2));
        assert_eq!(prev.interfaces[2].name, "eth0");
        assert_eq!(prev.routes.len(), 1);
        assert_eq!(prev.dns.nameservers, vec!["1.1.1.1"]);
    }
}
