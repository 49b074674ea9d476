//! Property ("fuzz") tests of what the plugin reads from outside: our keys in the network
//! configuration, the whole invocation (environment, stdin, the agent's answer) down to the
//! one JSON object printed, and stdin itself. 256 cases each in `cargo test` (the stdin one
//! 64), `PROPTEST_CASES=<n> cargo test -p plugin fuzz_` for more (docs/testing.md).

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::Map;
use testkit::fuzz::{Field, config};
use tracing::level_filters::LevelFilter;

use super::*;
use crate::config::{MAX_MTU, MIN_MTU, PluginConfig, parse_log_file};
use crate::input::{StdinError, read_until_eof};
use crate::plugin_code;

const OUR_KEYS: [&str; 6] = [
    "mtu",
    "vethPrefix",
    "agentSocket",
    "pluginLogFile",
    "pluginLogLevel",
    "dns",
];

/// Strings our keys treat specially, and arbitrary ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(
            &[
                "",
                "9001",
                " 1500 ",
                "575",
                "-1",
                "eni",
                "eth",
                "lo",
                "stderr",
                "STDOUT",
                "/dev/stdout",
                "/proc/self/fd/1",
                "plugin.log",
                "/var/log/p.log",
                "/a\0b",
                "debug",
                "LOUD",
                "10.0.0.10",
                "1.0.0",
                "0.3.1",
            ][..]
        )
        .prop_map(str::to_string),
        ".{0,24}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (0u64..20_000).prop_map(Value::from),
        (any::<i32>(), 0u8..4).prop_map(|(i, q)| Value::from(f64::from(i) + f64::from(q) / 4.0)),
        text().prop_map(Value::String),
    ];
    let keys = prop_oneof![
        prop::sample::select(
            &[
                "nameservers",
                "domain",
                "search",
                "options",
                "interfaces",
                "ips",
                "routes",
                "address",
                "interface",
                "name",
                "sandbox",
                "version",
                "dst",
                "gw",
            ][..]
        )
        .prop_map(str::to_string),
        ".{0,6}",
    ];
    leaf.prop_recursive(4, 32, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(keys.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A right value for each of our keys, with what it must parse to.
#[derive(Debug, Clone)]
struct Good {
    mtu: (Value, u32),
    veth_prefix: String,
    agent_socket: String,
    log_file: (String, Option<PathBuf>),
    log_level: (String, LevelFilter),
    dns: cni::Dns,
}

impl Good {
    fn values(&self) -> [Value; 6] {
        [
            self.mtu.0.clone(),
            json!(self.veth_prefix),
            json!(self.agent_socket),
            json!(self.log_file.0),
            json!(self.log_level.0),
            serde_json::to_value(&self.dns).unwrap(),
        ]
    }
}

fn random_case(s: &str, upper: &[bool]) -> String {
    s.chars()
        .zip(upper.iter().cycle())
        .map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c })
        .collect()
}

fn good() -> impl Strategy<Value = Good> {
    let mtu = (MIN_MTU..=MAX_MTU, 0u8..3).prop_map(|(n, how)| {
        let v = match how {
            0 => json!(n),
            1 => json!(n.to_string()),
            _ => json!(format!(" {n}\t")),
        };
        (v, n)
    });
    let prefix = "[a-zA-Z0-9_-]{1,4}"
        .prop_filter("reserved", |s| !["eth", "lo", "vlan"].contains(&s.as_str()));
    let log_file = prop_oneof![
        "/[^\0]{0,30}"
            .prop_filter("stdout", |s| ![
                "/dev/stdout",
                "/dev/fd/1",
                "/proc/self/fd/1"
            ]
            .iter()
            .any(|n| s.eq_ignore_ascii_case(n)))
            .prop_map(|s| (s.clone(), Some(PathBuf::from(s)))),
        prop::collection::vec(any::<bool>(), 6).prop_map(|u| (random_case("stderr", &u), None)),
    ];
    let log_level = (
        prop::sample::select(
            &[
                ("off", LevelFilter::OFF),
                ("error", LevelFilter::ERROR),
                ("warn", LevelFilter::WARN),
                ("info", LevelFilter::INFO),
                ("debug", LevelFilter::DEBUG),
                ("trace", LevelFilter::TRACE),
            ][..],
        ),
        prop::collection::vec(any::<bool>(), 5),
    )
        .prop_map(|((s, l), u)| (random_case(s, &u), l));
    let list = || prop::collection::vec(".{0,12}", 0..3);
    let dns = (list(), prop::option::of(".{1,12}"), list(), list()).prop_map(
        |(nameservers, domain, search, options)| cni::Dns {
            nameservers,
            domain,
            search,
            options,
        },
    );
    (mtu, prefix, ".{1,30}", log_file, log_level, dns).prop_map(
        |(mtu, veth_prefix, agent_socket, log_file, log_level, dns)| Good {
            mtu,
            veth_prefix,
            agent_socket,
            log_file,
            log_level,
            dns,
        },
    )
}

/// A verb, and an agent answer: mostly one that fits the verb, else any (codes it may not
/// send included), or none (the agent is unreachable).
fn verb_and_answer() -> impl Strategy<Value = (&'static str, Option<Response>)> {
    let alloc =
        (any::<u32>(), 1u32..300).prop_map(|(ip, table)| super::alloc(Ipv4Addr::from(ip), table));
    let any_answer = prop_oneof![
        (alloc.clone(), any::<bool>()).prop_map(|(allocation, existing)| Response::Added {
            allocation,
            existing
        }),
        prop::option::of(alloc.clone()).prop_map(|released| Response::Deleted { released }),
        alloc.prop_map(|allocation| Response::Checked { allocation }),
        (any::<bool>(), ".{0,20}").prop_map(|(ready, message)| Response::Status(StatusReply {
            ready,
            message,
            free_ips: 3,
            assigned_ips: 1,
        })),
        Just(Response::Collected { released: vec![] }),
        (
            prop_oneof![0u32..12, Just(50), Just(999), any::<u32>()],
            ".{0,20}"
        )
            .prop_map(|(code, message)| Response::Error { code, message }),
    ];
    let verbs = &["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "add", ""][..];
    (
        prop::sample::select(verbs),
        any_answer.clone(),
        prop::collection::vec(any_answer, 6),
        0u8..5,
    )
        .prop_map(|(cmd, any, fitting, how)| {
            let fits = |r: &Response| {
                matches!(
                    (cmd, r),
                    ("ADD", Response::Added { .. })
                        | ("DEL", Response::Deleted { .. })
                        | ("CHECK", Response::Checked { .. })
                        | ("STATUS", Response::Status(_))
                        | ("GC", Response::Collected { .. })
                )
            };
            let answer = match how {
                0 => None,
                1 => Some(any),
                _ => fitting.into_iter().find(fits).or(Some(any)),
            };
            (cmd, answer)
        })
}

/// stdin: a configuration built from fields, arbitrary bytes, or a real one with a few
/// bytes changed.
fn stdin(v: &'static str, extra: Map<String, Value>) -> impl Strategy<Value = Vec<u8>> {
    let mut doc = json!({"cniVersion": v, "name": "vpc-cni", "type": "vpc-cni"});
    for (k, x) in extra {
        doc[k] = x;
    }
    let doc = serde_json::to_vec(&doc).unwrap();
    prop_oneof![
        12 => Just(doc.clone()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        2 => prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 1..4).prop_map(move |m| {
            let mut d = doc.clone();
            for (pos, op, b) in m {
                let at = pos % (d.len() + 1);
                match op {
                    0 if at < d.len() => d[at] = b,
                    1 => d.insert(at, b),
                    _ if at < d.len() => {
                        d.remove(at);
                    }
                    _ => {}
                }
            }
            d
        }),
    ]
}

fn invocation() -> impl Strategy<Value = (Vec<(OsString, OsString)>, Vec<u8>, Option<Response>)> {
    let env_value = prop_oneof![
        12 => Just(None),
        1 => text().prop_map(|s| Some(OsString::from(s))),
        1 => prop::collection::vec(any::<u8>(), 0..20).prop_map(|b| Some(OsString::from_vec(b))),
    ];
    let prev = prop_oneof![
        3 => Just(None),
        3 => any::<u32>().prop_map(|ip| Some(super::prev_result(&Ipv4Addr::from(ip).to_string()))),
        1 => json_value().prop_map(Some),
    ];
    // mostly right values, so that the verbs run
    let field = prop_oneof![
        2 => Just(Field::Absent),
        8 => Just(Field::Good),
        1 => json_value().prop_map(Field::Any),
    ];
    let attachments = prop::option::of(prop::collection::vec((".{0,12}", ".{0,6}"), 0..4));
    (
        verb_and_answer(),
        prop::collection::vec(env_value, 5),
        prop::sample::select(&cni::SUPPORTED_VERSIONS[..]),
        good(),
        prop::collection::vec(field, 6),
        prev,
        attachments,
    )
        .prop_flat_map(|((cmd, answer), env, v, good, fields, prev, attachments)| {
            // the environment of a real call, with some values replaced
            let mut vars: Vec<(OsString, OsString)> = super::vars(cmd)
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect();
            for ((_, value), replacement) in vars.iter_mut().skip(1).zip(env) {
                if let Some(r) = replacement {
                    *value = r;
                }
            }
            let mut extra = Map::new();
            for ((k, f), g) in OUR_KEYS.iter().zip(fields).zip(good.values()) {
                match f {
                    Field::Absent => {}
                    Field::Good => {
                        extra.insert(k.to_string(), g);
                    }
                    Field::Any(x) => {
                        extra.insert(k.to_string(), x);
                    }
                }
            }
            if let Some(p) = prev {
                extra.insert("prevResult".into(), p);
            }
            if let Some(a) = attachments {
                let list: Vec<Value> = a
                    .iter()
                    .map(|(c, i)| json!({"containerID": c, "ifname": i}))
                    .collect();
                extra.insert(
                    cni::config::VALID_ATTACHMENTS_KEY.into(),
                    Value::Array(list),
                );
            }
            (Just(vars), stdin(v, extra), Just(answer))
        })
}

proptest! {
    #![proptest_config(config(256))]

    /// Our keys, each left out, right, or anything: parsed to exactly what was written when
    /// every one is right; otherwise code 7 naming one key that was not.
    #[test]
    fn fuzz_plugin_config_keys(good in good(), fields in prop::collection::vec(testkit::fuzz::field(3, json_value()), 6)) {
        let mut raw = Map::new();
        for ((k, f), g) in OUR_KEYS.iter().zip(&fields).zip(good.values()) {
            match f {
                Field::Absent => None,
                Field::Good => raw.insert(k.to_string(), g),
                Field::Any(x) => raw.insert(k.to_string(), x.clone()),
            };
        }
        match PluginConfig::from_raw(&raw) {
            Ok(c) => {
                prop_assert!((MIN_MTU..=MAX_MTU).contains(&c.mtu));
                prop_assert!(c.veth_prefix.len() <= 4);
                if let Some(f) = &c.log_file {
                    prop_assert!(f.is_absolute());
                }
                let d = PluginConfig::default();
                let is = |i: usize| matches!(fields[i], Field::Good);
                if fields.iter().all(|f| !matches!(f, Field::Any(_))) {
                    prop_assert_eq!(c.mtu, if is(0) { good.mtu.1 } else { d.mtu });
                    let prefix = if is(1) { good.veth_prefix.clone() } else { d.veth_prefix };
                    prop_assert_eq!(c.veth_prefix, prefix);
                    let socket =
                        if is(2) { PathBuf::from(&good.agent_socket) } else { d.agent_socket };
                    prop_assert_eq!(c.agent_socket, socket);
                    prop_assert_eq!(c.log_file, if is(3) { good.log_file.1.clone() } else { None });
                    prop_assert_eq!(c.log_level, is(4).then_some(good.log_level.1));
                    prop_assert_eq!(c.dns, if is(5) { good.dns.clone() } else { d.dns });
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code, 7);
                let named: Vec<usize> = (0..6)
                    .filter(|&i| e.msg.contains(&format!("\"{}\"", OUR_KEYS[i])))
                    .collect();
                prop_assert_eq!(named.len(), 1, "{:?}", e);
                prop_assert!(matches!(fields[named[0]], Field::Any(_)), "{e:?}");
                prop_assert!(e.details.starts_with(OUR_KEYS[named[0]]), "{e:?}");
            }
        }
    }

    /// `pluginLogFile`: stderr, an absolute path without NUL that is not stdout, or code 7
    /// naming the key and quoting the value.
    #[test]
    fn fuzz_log_file_any_string(s in prop_oneof![text(), "/?[a-zA-Z/.\0]{0,20}"]) {
        match parse_log_file(&json!(s)) {
            Ok(None) => prop_assert!(s.is_empty() || s.eq_ignore_ascii_case("stderr")),
            Ok(Some(p)) => {
                prop_assert_eq!(p.as_os_str(), s.as_str());
                prop_assert!(s.starts_with('/') && !s.contains('\0'));
                let stdout = ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"];
                prop_assert!(!stdout.iter().any(|n| s.eq_ignore_ascii_case(n)));
            }
            Err(e) => {
                prop_assert_eq!(e.code, 7);
                prop_assert!(e.msg.contains("pluginLogFile"));
                prop_assert!(e.details.contains(s.as_str()) || e.details.contains("NUL"), "{e:?}");
            }
        }
    }

    /// Any invocation — environment, stdin, and what the agent answers — ends in one JSON
    /// object on stdout (or nothing, on a success without output) and exit code 0 or 1; an
    /// error carries a spec code or one of ours; an ADD result parses in the asked version.
    #[test]
    fn fuzz_plugin_any_invocation_one_json_reply((vars, stdin, answer) in invocation()) {
        let fake = Fake::new();
        if let Some(a) = answer.clone() {
            fake.answers.borrow_mut().push_back(a);
        }
        let version = cni::peek_version(&stdin);
        let outcome = Invocation::parse(vars.clone(), &stdin)
            .and_then(|inv| execute(&inv, &fake, Deadline::new(Instant::now(), CALL_BUDGET)));
        let reply = Reply::new(outcome, version);
        if reply.stdout.is_empty() {
            prop_assert_eq!(reply.exit_code, 0);
            return Ok(());
        }
        let mut objects = serde_json::Deserializer::from_str(&reply.stdout).into_iter::<Value>();
        let out = objects.next().unwrap().unwrap();
        prop_assert!(objects.next().is_none(), "more than one JSON value: {}", reply.stdout);
        prop_assert!(out.is_object());
        let label = out["cniVersion"].as_str().unwrap();
        let label = cni::Version::parse(label).unwrap();
        match reply.exit_code {
            0 => {
                if vars[0].1 == "ADD" {
                    prop_assert_eq!(Some(label), version);
                    cni::CniResult::from_json(&out, label).unwrap();
                }
            }
            1 => {
                let code = out["code"].as_u64().unwrap() as u32;
                prop_assert!(
                    matches!(code, 1..=11 | 50 | 51 | 999) || plugin_code::ALL.contains(&code),
                    "code {}: {}", code, reply.stdout
                );
                // every error says something, even when the agent's message was empty
                let msg = out["msg"].as_str();
                prop_assert!(msg.is_some_and(|m| !m.trim().is_empty()), "{}", reply.stdout);
                prop_assert_eq!(label, version.unwrap_or(cni::LATEST));
            }
            other => prop_assert!(false, "exit code {other}"),
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// stdin of any length, written in any pieces: read whole when it is at most the limit,
    /// refused as too large (without reading much more) otherwise.
    #[test]
    fn fuzz_stdin_any_length(
        limit in 0usize..70_000,
        extra in prop_oneof![0usize..3, 0usize..200_000],
        shorter in any::<bool>(),
        pieces in prop::collection::vec(1usize..40_000, 1..8),
    ) {
        let len = if shorter { limit.saturating_sub(extra) } else { limit + extra };
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (mut w, r) = UnixStream::pair().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            let mut at = 0;
            for p in pieces.iter().cycle() {
                if at >= sent.len() {
                    break;
                }
                let end = (at + p).min(sent.len());
                // the reader stops at the limit: the rest may not be taken
                if w.write_all(&sent[at..end]).is_err() {
                    break;
                }
                at = end;
            }
        });
        let budget = Duration::from_secs(5) + crate::deadline::EXIT_MARGIN;
        let deadline = Deadline::new(Instant::now(), budget);
        let got = read_until_eof(r.as_fd(), &deadline, limit);
        drop(r);
        writer.join().unwrap();
        match got {
            Ok(b) => {
                prop_assert!(len <= limit);
                prop_assert!(b == data);
            }
            Err(StdinError::TooLarge { limit: l }) => prop_assert!(l == limit && len > limit),
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}
