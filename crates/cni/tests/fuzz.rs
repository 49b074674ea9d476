//! Property ("fuzz") tests of every parser in this crate that takes outside input: the
//! network configuration on stdin (`cniVersion`, `name`, `type`, `prevResult`, GC's
//! attachment lists), the `CNI_*` environment and `CNI_ARGS`.
//!
//! Each property runs 256 cases in `cargo test`; `PROPTEST_CASES=<n> cargo test -p cni fuzz_`
//! runs `n` (docs/testing.md).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStringExt;

use cni::config::{OLD_ATTACHMENTS_KEY, VALID_ATTACHMENTS_KEY};
use cni::{
    Attachment, CniArgs, CniArgsError, CniResult, Command, Dns, Env, Interface, IpConfig, NetConf,
    Route, Version, validate_container_id, validate_ifname,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use testkit::fuzz::{Field, config, mutate, mutations};

// ---------------------------------------------------------------------------------------
// strategies

/// Keys the parsers look for, so that arbitrary documents reach past the first check.
const KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "prevResult",
    VALID_ATTACHMENTS_KEY,
    OLD_ATTACHMENTS_KEY,
    "interfaces",
    "ips",
    "routes",
    "dns",
    "address",
    "gateway",
    "interface",
    "version",
    "dst",
    "gw",
    "mtu",
    "mac",
    "sandbox",
    "socketPath",
    "pciID",
    "advmss",
    "priority",
    "table",
    "scope",
    "nameservers",
    "domain",
    "search",
    "options",
    "containerID",
    "ifname",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => ".{0,8}",
    ]
}

/// Strings the parsers treat specially, and arbitrary ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(
            &[
                "",
                "4",
                "6",
                "0.3.0",
                "0.3.1",
                "0.4.0",
                "1.0.0",
                "1.1.0",
                "2.0.0",
                "eth0",
                "10.0.0.1",
                "10.0.0.1/32",
                "fd00::1/128",
                "::ffff:1.2.3.4/96",
                "0.0.0.0/0",
                "10.0.0.1/33",
                "1.2.3.4/-1",
                "vpc-cni",
                "-x",
                "a b",
                "/run/netns/x",
            ][..]
        )
        .prop_map(str::to_string),
        ".{0,24}",
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        // fractions serde_json reads back exactly (it does not round-trip every f64)
        (any::<i32>(), 0u8..4).prop_map(|(i, q)| Value::from(f64::from(i) + f64::from(q) / 4.0)),
    ]
}

/// Any JSON value, up to a few levels deep, biased to the keys and strings parsers use.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Bytes: arbitrary, a valid document with a few bytes changed, or deep nesting.
fn stdin_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (json_value(), mutations()).prop_map(|(v, m)| {
            let mut doc = json!({"cniVersion": "1.1.0", "name": "n", "type": "t", "prevResult": v});
            doc["mtu"] = json!(9001);
            mutate(serde_json::to_vec(&doc).unwrap(), &m)
        }),
        deep_nesting(),
    ]
}

/// Arrays and objects nested up to 100 000 deep, closed or not, in the places a parser
/// descends into (serde_json refuses more than 128 levels instead of overflowing the stack).
fn deep_nesting() -> impl Strategy<Value = Vec<u8>> {
    (1usize..100_000, any::<bool>(), any::<bool>(), 0usize..3).prop_map(
        |(depth, arrays, closed, place)| {
            let (open, close) = if arrays { ("[", "]") } else { ("{\"a\":", "}") };
            let mut s = String::from(match place {
                0 => "",
                1 => r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":"#,
                _ => r#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":"#,
            });
            s.push_str(&open.repeat(depth));
            s.push('1');
            if closed {
                s.push_str(&close.repeat(depth));
                if place != 0 {
                    s.push('}');
                }
            }
            s.into_bytes()
        },
    )
}

fn version() -> impl Strategy<Value = Version> {
    prop::sample::select(&Version::ALL[..])
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![ipv4().prop_map(IpAddr::V4), ipv6().prop_map(IpAddr::V6)]
}

fn ipnet() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (ipv4(), 0u8..=32).prop_map(|(a, p)| IpNet::V4(Ipv4Net::new(a, p).unwrap())),
        (ipv6(), 0u8..=128).prop_map(|(a, p)| IpNet::V6(Ipv6Net::new(a, p).unwrap())),
    ]
}

/// An optional string field: empty strings are written as absent, so they are `None` here.
fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(".{1,20}")
}

fn interface() -> impl Strategy<Value = Interface> {
    (
        ".{0,16}",
        opt_text(),
        prop::option::of(any::<u32>()),
        opt_text(),
        opt_text(),
        opt_text(),
    )
        .prop_map(|(name, mac, mtu, sandbox, socket_path, pci_id)| Interface {
            name,
            mac,
            mtu,
            sandbox,
            socket_path,
            pci_id,
        })
}

fn ip_config() -> impl Strategy<Value = IpConfig> {
    (
        ipnet(),
        prop::option::of(ip()),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(address, gateway, interface)| IpConfig {
            address,
            gateway,
            interface,
        })
}

fn route() -> impl Strategy<Value = Route> {
    let n = || prop::option::of(any::<u32>());
    (ipnet(), prop::option::of(ip()), n(), n(), n(), n(), n()).prop_map(
        |(dst, gw, mtu, advmss, priority, table, scope)| Route {
            dst,
            gw,
            mtu,
            advmss,
            priority,
            table,
            scope,
        },
    )
}

fn dns() -> impl Strategy<Value = Dns> {
    let list = || prop::collection::vec(".{0,12}", 0..3);
    (list(), opt_text(), list(), list()).prop_map(|(nameservers, domain, search, options)| Dns {
        nameservers,
        domain,
        search,
        options,
    })
}

fn cni_result() -> impl Strategy<Value = CniResult> {
    (
        prop::collection::vec(interface(), 0..4),
        prop::collection::vec(ip_config(), 0..4),
        prop::collection::vec(route(), 0..4),
        dns(),
    )
        .prop_map(|(interfaces, ips, routes, dns)| CniResult {
            interfaces,
            ips,
            routes,
            dns,
        })
}

/// What a result written in `v`'s shape keeps: the 1.1 fields only from 1.1.0 on.
fn as_in(v: Version, r: &CniResult) -> CniResult {
    let mut r = r.clone();
    if !v.has_1_1_fields() {
        for i in &mut r.interfaces {
            i.mtu = None;
            i.socket_path = None;
            i.pci_id = None;
        }
        for rt in &mut r.routes {
            *rt = Route::new(rt.dst, rt.gw);
        }
    }
    r
}

fn identifier() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,30}"
}

fn attachment() -> impl Strategy<Value = Attachment> {
    (".{0,20}", ".{0,16}").prop_map(|(container_id, ifname)| Attachment {
        container_id,
        ifname,
    })
}

fn attachments_json(list: &[Attachment]) -> Value {
    Value::Array(
        list.iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// the network configuration

proptest! {
    #![proptest_config(config(256))]

    /// Whatever arrives on stdin, parsing returns (never panics, never overflows the stack)
    /// with a configuration or an error of code 1, 6 or 7.
    #[test]
    fn fuzz_netconf_never_panics(bytes in stdin_bytes()) {
        match NetConf::parse(&bytes) {
            Ok(c) => {
                prop_assert!(!c.name.is_empty() && !c.plugin_type.is_empty());
                prop_assert_eq!(c.raw.get("cniVersion"), Some(&json!(c.cni_version.as_str())));
            }
            Err(e) => prop_assert!(matches!(e.code, 1 | 6 | 7), "{e:?}"),
        }
        if let Some(v) = cni::peek_version(&bytes) {
            prop_assert!(Version::ALL.contains(&v));
        }
    }

    /// A configuration object with each key left out, right, or anything: it parses when
    /// every key is right, to exactly what was written; otherwise the error is about a key
    /// that was not right, and code 7 names it.
    #[test]
    fn fuzz_netconf_errors_name_the_key(
        v in version(),
        name in identifier(),
        plugin_type in ".{1,12}",
        prev in cni_result(),
        valid in prop::collection::vec(attachment(), 0..4),
        fields in prop::collection::vec(testkit::fuzz::field(4, json_value()), 6),
        extra in prop::collection::btree_map("x[a-z]{0,6}", json_value(), 0..3),
    ) {
        let keys = [
            "cniVersion",
            "name",
            "type",
            "prevResult",
            VALID_ATTACHMENTS_KEY,
            OLD_ATTACHMENTS_KEY,
        ];
        let good = [
            json!(v.as_str()),
            json!(name),
            json!(plugin_type),
            prev.to_json(v),
            attachments_json(&valid),
            attachments_json(&valid),
        ];
        let mut obj: Map<String, Value> = extra.into_iter().collect();
        for ((k, f), g) in keys.iter().zip(&fields).zip(good) {
            match f {
                Field::Absent => None,
                Field::Good => obj.insert(k.to_string(), g),
                Field::Any(x) => obj.insert(k.to_string(), x.clone()),
            };
        }
        let bytes = serde_json::to_vec(&Value::Object(obj.clone())).unwrap();
        let is_good = |k: &str| {
            matches!(fields[keys.iter().position(|x| *x == k).unwrap()], Field::Good)
        };
        let all_good = is_good("cniVersion") && is_good("name") && is_good("type")
            && fields[3..].iter().all(|f| !matches!(f, Field::Any(_)));
        match NetConf::parse(&bytes) {
            Ok(c) => {
                prop_assert_eq!(&c.raw, &obj);
                if all_good {
                    prop_assert_eq!(c.cni_version, v);
                    prop_assert_eq!(&c.name, &name);
                    prop_assert_eq!(&c.plugin_type, &plugin_type);
                    let want_prev = matches!(fields[3], Field::Good).then(|| as_in(v, &prev));
                    prop_assert_eq!(c.prev_result, want_prev);
                    let listed =
                        !matches!((&fields[4], &fields[5]), (Field::Absent, Field::Absent));
                    let want_valid = listed.then(|| valid.clone());
                    prop_assert_eq!(c.valid_attachments, want_valid);
                }
            }
            Err(e) => {
                prop_assert!(!all_good, "a right configuration was refused: {e:?}");
                match e.code {
                    1 => prop_assert!(!is_good("cniVersion"), "{e:?}"),
                    6 => {
                        prop_assert!(matches!(fields[3], Field::Any(_)), "{e:?}");
                        prop_assert!(e.msg.contains("prevResult"), "{e:?}");
                    }
                    7 => {
                        let named: Vec<&str> = keys.iter().copied()
                            .filter(|k| e.msg.contains(&format!("\"{k}\""))).collect();
                        prop_assert_eq!(named.len(), 1, "{:?}", e);
                        prop_assert!(!is_good(named[0]), "{e:?}");
                        prop_assert!(e.details.starts_with(named[0]), "{e:?}");
                    }
                    _ => prop_assert!(false, "unexpected code: {e:?}"),
                }
            }
        }
    }

    /// `cniVersion`: a supported version parses to itself; anything else is code 1 quoting it.
    #[test]
    fn fuzz_cni_version(s in text()) {
        match Version::parse(&s) {
            Ok(v) => prop_assert_eq!(v.as_str(), s.as_str()),
            Err(e) => {
                prop_assert_eq!(e.code, 1);
                prop_assert!(e.details.contains(&format!("\"{s}\"")), "{e:?}");
            }
        }
    }

    /// Any result, written in any version's shape, parses back to what that version keeps,
    /// and writes again to the same JSON — also as the `prevResult` of a configuration.
    #[test]
    fn fuzz_result_round_trips_in_every_version(r in cni_result(), v in version()) {
        let j = r.to_json(v);
        let back = CniResult::from_json(&j, v).unwrap();
        prop_assert_eq!(&back, &as_in(v, &r));
        prop_assert_eq!(back.to_json(v), j.clone());
        let conf = json!({"cniVersion": v.as_str(), "name": "n", "type": "t", "prevResult": j});
        let c = NetConf::parse(&serde_json::to_vec(&conf).unwrap()).unwrap();
        prop_assert_eq!(c.prev_result, Some(as_in(v, &r)));
    }

    /// Any JSON as `prevResult`: a result or code 6 naming prevResult, in every version.
    #[test]
    fn fuzz_prev_result_any_json(value in json_value(), v in version()) {
        match CniResult::from_json(&value, v) {
            Ok(r) => {
                // what parsed writes, and parses again to the same
                let j = r.to_json(v);
                prop_assert_eq!(CniResult::from_json(&j, v).unwrap().to_json(v), j);
            }
            Err(e) => {
                prop_assert_eq!(e.code, 6);
                prop_assert!(e.msg.contains("prevResult"), "{e:?}");
            }
        }
    }

    /// A result whose `ips[].version` contradicts its address is refused, naming the address.
    #[test]
    fn fuzz_prev_result_ip_version_must_match(
        mut r in cni_result(),
        extra in ip_config(),
        v in prop::sample::select(&[Version::V0_3_0, Version::V0_3_1, Version::V0_4_0][..]),
        pick in any::<usize>(),
    ) {
        r.ips.push(extra);
        let mut j = r.to_json(v);
        let i = pick % r.ips.len();
        let ip = &mut j["ips"][i];
        let flipped = if ip["version"] == "4" { "6" } else { "4" };
        ip["version"] = json!(flipped);
        let e = CniResult::from_json(&j, v).unwrap_err();
        prop_assert_eq!(e.code, 6);
        prop_assert!(e.details.contains(&r.ips[i].address.to_string()), "{e:?}");
    }

    /// GC's attachment lists, under either key, parse to what was written; anything else
    /// under the key is refused naming it.
    #[test]
    fn fuzz_gc_attachments(
        list in prop::collection::vec(attachment(), 0..8),
        old_key in any::<bool>(),
        junk in json_value(),
    ) {
        let key = if old_key { OLD_ATTACHMENTS_KEY } else { VALID_ATTACHMENTS_KEY };
        let conf =
            json!({"cniVersion": "1.1.0", "name": "n", "type": "t", key: attachments_json(&list)});
        let c = NetConf::parse(&serde_json::to_vec(&conf).unwrap()).unwrap();
        prop_assert_eq!(c.valid_attachments, Some(list));

        let conf = json!({"cniVersion": "1.1.0", "name": "n", "type": "t", key: junk});
        match NetConf::parse(&serde_json::to_vec(&conf).unwrap()) {
            Ok(c) => prop_assert!(c.valid_attachments.is_some()),
            Err(e) => {
                prop_assert_eq!(e.code, 7);
                prop_assert!(e.msg.contains(&format!("\"{key}\"")), "{e:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// the environment

const KNOWN_ARGS: [&str; 4] = [
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

/// Text made mostly of the characters `CNI_ARGS` is split on.
fn args_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[=;a-zA-Z_0-9 ]{0,40}",
        ".{0,40}",
        prop::collection::vec(
            prop_oneof![
                prop::sample::select(&KNOWN_ARGS[..]).prop_map(str::to_string),
                Just("IgnoreUnknown".to_string()),
                "[=;a-zA-Z]{0,6}",
            ],
            0..6
        )
        .prop_map(|parts| parts.join("=")),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Any `CNI_ARGS` text parses or is refused for a reason that quotes the input.
    #[test]
    fn fuzz_cni_args_any_text(s in args_text()) {
        match CniArgs::parse(&s) {
            Ok(a) => {
                let values = [&a.pod_namespace, &a.pod_name, &a.infra_container_id, &a.pod_uid];
                for v in values.into_iter().flatten() {
                    prop_assert!(!v.is_empty() && s.contains(v.as_str()));
                }
                prop_assert!(a.other.is_empty() || a.ignore_unknown);
            }
            Err(CniArgsError::NotKeyValue { entry }) => {
                prop_assert!(!entry.contains('=') && s.split(';').any(|p| p == entry));
            }
            Err(CniArgsError::IgnoreUnknownNotBool { value }) => {
                let entry = format!("IgnoreUnknown={value}");
                prop_assert!(s.split(';').any(|p| p == entry));
            }
            Err(CniArgsError::UnknownKeys { keys }) => {
                prop_assert!(!keys.is_empty());
                for k in keys {
                    let has_key = |p: &str| p.split_once('=').is_some_and(|(pk, _)| pk == k);
                    prop_assert!(s.split(';').any(has_key));
                }
            }
        }
    }

    /// `CNI_ARGS` written from known values (in any order, with empty entries) parses back
    /// to them; unknown keys are kept with `IgnoreUnknown`, and named without it.
    #[test]
    fn fuzz_cni_args_round_trip(
        known in prop::collection::vec(prop::option::of("[^;]{0,20}"), 4),
        other in prop::collection::vec(("x[A-Za-z0-9_]{0,10}", "[^;]{0,10}"), 0..3),
        ignore in prop::option::of(prop::sample::select(
            &["1", "true", "TRUE", "True", "0", "false", ""][..]
        )),
        empties in 0usize..3,
        swaps in prop::collection::vec(any::<usize>(), 8),
    ) {
        let mut head: Vec<String> = Vec::new();
        for (k, v) in KNOWN_ARGS.iter().zip(&known) {
            if let Some(v) = v {
                head.push(format!("{k}={v}"));
            }
        }
        if let Some(i) = ignore {
            head.push(format!("IgnoreUnknown={i}"));
        }
        head.extend(std::iter::repeat_n(String::new(), empties));
        // shuffle the known keys and the empty entries; unknown keys keep their order
        for i in (1..head.len()).rev() {
            head.swap(i, swaps[i] % (i + 1));
        }
        head.extend(other.iter().map(|(k, v)| format!("{k}={v}")));
        let s = head.join(";");

        let ignore_unknown = matches!(ignore, Some("1" | "true" | "TRUE" | "True"));
        let got = CniArgs::parse(&s);
        if !other.is_empty() && !ignore_unknown {
            let keys: Vec<String> = other.iter().map(|(k, _)| k.clone()).collect();
            prop_assert_eq!(got, Err(CniArgsError::UnknownKeys { keys }));
        } else {
            let a = got.unwrap();
            let want = |i: usize| known[i].clone().filter(|v| !v.is_empty());
            prop_assert_eq!(a.pod_namespace, want(0));
            prop_assert_eq!(a.pod_name, want(1));
            prop_assert_eq!(a.infra_container_id, want(2));
            prop_assert_eq!(a.pod_uid, want(3));
            prop_assert_eq!(a.ignore_unknown, ignore_unknown);
            prop_assert_eq!(a.other, other);
        }
    }

    /// Names the kernel and libcni accept are exactly what the validators let through.
    #[test]
    fn fuzz_identifiers_and_ifnames(s in prop_oneof![".{0,20}", "[a-z0-9./:_ -]{0,18}"]) {
        if validate_container_id(&s).is_ok() {
            prop_assert!(s.starts_with(|c: char| c.is_ascii_alphanumeric()));
            prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
        }
        if validate_ifname(&s).is_ok() {
            prop_assert!((1..=15).contains(&s.len()) && s != "." && s != "..");
            prop_assert!(!s.contains(['/', ':']));
            prop_assert!(!s.chars().any(|c| c.is_whitespace() || c.is_control()));
        }
    }

    /// Any environment (values of any bytes, not only UTF-8): parsed, with every field a
    /// verb needs present and valid; or code 4 naming variables that are missing or bad.
    #[test]
    fn fuzz_env_from_vars(vars in env_vars()) {
        let get = |k: &str| vars.get(k).filter(|v| !v.is_empty());
        let text = |k: &str| get(k).and_then(|v| v.to_str().map(str::to_string));
        match Env::from_vars(vars.iter().map(|(k, v)| (OsString::from(k), v.clone()))) {
            Ok(env) => {
                let command = text("CNI_COMMAND");
                prop_assert_eq!(Some(env.command.as_str()), command.as_deref());
                if env.command.needs_attachment() {
                    prop_assert_eq!(validate_container_id(env.container_id()), Ok(()));
                    prop_assert_eq!(validate_ifname(env.ifname()), Ok(()));
                }
                if env.command.needs_netns() {
                    prop_assert!(env.netns.is_some());
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code, 4);
                let command: Option<Command> = text("CNI_COMMAND").and_then(|c| c.parse().ok());
                let named: Vec<&str> =
                    ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS", "CNI_ARGS"]
                        .into_iter()
                        .filter(|k| e.msg.contains(k))
                        .collect();
                prop_assert!(!named.is_empty(), "{e:?}");
                for k in named {
                    let bad = match k {
                        "CNI_COMMAND" => command.is_none(),
                        "CNI_CONTAINERID" => {
                            text(k).is_none_or(|v| validate_container_id(&v).is_err())
                        }
                        "CNI_IFNAME" => text(k).is_none_or(|v| validate_ifname(&v).is_err()),
                        "CNI_NETNS" => get(k).is_none(),
                        _ => {
                            get(k).is_some() && text(k).is_none_or(|v| CniArgs::parse(&v).is_err())
                        }
                    };
                    prop_assert!(bad, "{k} named but not bad: {e:?}");
                    prop_assert!(e.details.contains(k), "{e:?}");
                }
            }
        }
    }
}

fn env_value() -> impl Strategy<Value = OsString> {
    prop_oneof![
        prop::sample::select(
            &[
                "",
                "ADD",
                "DEL",
                "CHECK",
                "STATUS",
                "GC",
                "VERSION",
                "add",
                "c1",
                "eth0",
                "/run/netns/x",
                "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b",
                "IgnoreUnknown=1;X=y",
            ][..]
        )
        .prop_map(OsString::from),
        text().prop_map(OsString::from),
        args_text().prop_map(OsString::from),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(OsString::from_vec),
    ]
}

fn env_vars() -> impl Strategy<Value = BTreeMap<String, OsString>> {
    let names = prop_oneof![
        prop::sample::select(
            &[
                "CNI_COMMAND",
                "CNI_CONTAINERID",
                "CNI_NETNS",
                "CNI_IFNAME",
                "CNI_ARGS",
                "CNI_PATH",
                "CNI_OTHER",
                "PATH",
            ][..]
        )
        .prop_map(str::to_string),
        "CNI_[A-Z]{0,4}",
    ];
    (
        prop::sample::select(&["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"][..]),
        prop::collection::btree_map(names, env_value(), 0..8),
        any::<bool>(),
    )
        .prop_map(|(cmd, mut vars, keep_cmd)| {
            // mostly a real verb, so the other variables are looked at
            if keep_cmd {
                vars.insert("CNI_COMMAND".into(), OsString::from(cmd));
            }
            vars
        })
}
