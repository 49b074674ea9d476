//! `deploy/iam-policy.json` grants exactly the EC2 actions the agent calls.
//!
//! The calls are read from this crate's source, the only one that links aws-sdk-ec2. Its one
//! EC2 client is the field `client` of [`cloud::Ec2`] (checked below), so each fluent builder
//! `self.client.<operation>()` in an `impl Ec2` block of a module the agent links (not the
//! `lab` feature's) is one action, the operation in PascalCase; an operation sent with tag
//! specifications also needs `ec2:CreateTags` (EC2 authorises tagging on create as CreateTags
//! on the new resource). A call the policy lacks fails here naming the action, and so does an
//! action nothing calls.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_dir() -> PathBuf {
    crate_dir().join("../..")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The modules `lib.rs` compiles only with a feature (`#[cfg(feature = "…")] mod x;`).
fn feature_gated_modules(lib: &str) -> BTreeSet<String> {
    let mut gated = BTreeSet::new();
    let mut pending = false;
    for line in lib.lines().map(str::trim) {
        if line.starts_with("#[cfg(feature") {
            pending = true;
            continue;
        }
        if line.starts_with("#[") || line.is_empty() {
            continue;
        }
        if pending {
            let decl = line.strip_prefix("pub ").unwrap_or(line);
            if let Some(name) = decl.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                gated.insert(name.trim().to_string());
            }
        }
        pending = false;
    }
    gated
}

/// Code without whole-line comments and without the unit tests (`#[cfg(test)]` onwards).
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The bodies of the `impl Ec2 { … }` blocks in `code` (braces counted; the braces of format
/// strings come in pairs).
fn ec2_impls(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(i) = rest.find("impl Ec2 {") {
        let body = &rest[i + "impl Ec2 ".len()..];
        let mut depth = 0usize;
        let mut end = body.len();
        for (j, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push_str(&body[..end]);
        out.push('\n');
        rest = &body[end..];
    }
    out
}

/// Every source file of the crate the agent links, by path under `src/`, as code.
fn agent_sources() -> BTreeMap<String, String> {
    let src = crate_dir().join("src");
    let gated = feature_gated_modules(&read(&src.join("lib.rs")));
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            let top = rel.split('/').next().unwrap_or_default();
            let module = top.strip_suffix(".rs").unwrap_or(top);
            if rel.ends_with(".rs") && !gated.contains(module) {
                out.insert(rel, code_of(&read(&path)));
            }
        }
    }
    assert!(out.contains_key("ec2.rs"), "src/ec2.rs not found: {out:?}");
    out
}

/// One EC2 operation the code sends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    /// The SDK's fluent builder, e.g. `create_network_interface`.
    op: String,
    /// Sent with tag specifications (`tag_specifications` / `set_tag_specifications`).
    tags_on_create: bool,
}

/// The `.client.<op>(` builders in `code`. A builder's chain runs to its `.send()` (also when
/// it is kept in a variable and sent later, as AssignPrivateIpAddresses is).
fn calls(code: &str) -> Vec<Call> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(".client") {
        rest = &rest[i + ".client".len()..];
        if rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `.client_id` and the like
        }
        let Some(after) = rest.trim_start().strip_prefix('.') else {
            continue; // `.client` as a value, not a builder
        };
        let after = after.trim_start();
        let op: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // The SDK client's methods that are not operations.
        if op.is_empty()
            || !after[op.len()..].starts_with('(')
            || ["clone", "config"].contains(&op.as_str())
        {
            continue;
        }
        let chain = &after[..after.find(".send()").unwrap_or(after.len())];
        out.push(Call {
            tags_on_create: chain.contains("tag_specifications"),
            op,
        });
    }
    out
}

/// `describe_network_interfaces` → `DescribeNetworkInterfaces`.
fn pascal(op: &str) -> String {
    op.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The IAM actions the agent's code needs, each with the files that need it.
fn needed_actions() -> BTreeMap<String, BTreeSet<String>> {
    let mut need: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in agent_sources() {
        for call in calls(&ec2_impls(&code)) {
            need.entry(format!("ec2:{}", pascal(&call.op)))
                .or_default()
                .insert(file.clone());
            if call.tags_on_create {
                need.entry("ec2:CreateTags".into())
                    .or_default()
                    .insert(format!("{file} (tags on {})", pascal(&call.op)));
            }
        }
    }
    need
}

/// The policy, relative to the repository.
const POLICY: &str = "deploy/iam-policy.json";

fn policy_path() -> PathBuf {
    repo_dir().join(POLICY)
}

/// The policy's actions, after checking its shape: one or more Allow statements on every
/// resource, each with a sorted list of distinct `ec2:` actions and nothing else.
fn policy_actions() -> BTreeSet<String> {
    let path = policy_path();
    let policy: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(
        policy["Version"],
        "2012-10-17",
        "{}: Version",
        path.display()
    );
    let keys: BTreeSet<&str> = policy
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["Statement", "Version"]), "top level");
    let statements = policy["Statement"].as_array().expect("Statement: a list");
    assert!(!statements.is_empty(), "no Statement");
    let mut all = BTreeSet::new();
    for (i, s) in statements.iter().enumerate() {
        let keys: BTreeSet<&str> = s
            .as_object()
            .unwrap_or_else(|| panic!("Statement[{i}] is not an object"))
            .keys()
            .map(String::as_str)
            .collect();
        for k in &keys {
            assert!(
                ["Sid", "Effect", "Action", "Resource"].contains(k),
                "Statement[{i}]: key {k} (only Sid, Effect, Action, Resource)"
            );
        }
        assert_eq!(s["Effect"], "Allow", "Statement[{i}].Effect");
        assert_eq!(s["Resource"], "*", "Statement[{i}].Resource");
        let actions: Vec<&str> = s["Action"]
            .as_array()
            .unwrap_or_else(|| panic!("Statement[{i}].Action is not a list"))
            .iter()
            .map(|a| {
                a.as_str()
                    .unwrap_or_else(|| panic!("Statement[{i}].Action: {a} is not a string"))
            })
            .collect();
        let mut sorted = actions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            actions, sorted,
            "Statement[{i}].Action: keep it sorted, once each"
        );
        for a in actions {
            let op = a
                .strip_prefix("ec2:")
                .unwrap_or_else(|| panic!("Statement[{i}]: {a} is not an ec2: action"));
            assert!(
                op.starts_with(|c: char| c.is_ascii_uppercase())
                    && op.chars().all(|c| c.is_ascii_alphanumeric()),
                "Statement[{i}]: {a} is not an action name (no wildcards)"
            );
            assert!(all.insert(a.to_string()), "{a} in two statements");
        }
    }
    all
}

#[test]
fn the_policy_grants_every_ec2_call_the_agent_makes() {
    let granted = policy_actions();
    let missing: Vec<String> = needed_actions()
        .into_iter()
        .filter(|(a, _)| !granted.contains(a))
        .map(|(a, files)| format!("{a} (called in {})", Vec::from_iter(files).join(", ")))
        .collect();
    assert!(
        missing.is_empty(),
        "{POLICY} lacks actions the agent calls: {}",
        missing.join("; ")
    );
}

#[test]
fn the_policy_grants_nothing_the_agent_does_not_call() {
    let need = needed_actions();
    let extra: Vec<String> = policy_actions()
        .into_iter()
        .filter(|a| !need.contains_key(a))
        .collect();
    assert!(
        extra.is_empty(),
        "{POLICY} grants actions no agent code calls: {}",
        extra.join(", ")
    );
}

/// The conversion to action names, checked against the names the code itself reports its
/// calls by (`const CALL: &str = "…"`, used in errors and logs): every builder the scan finds
/// is one of them and every one of them is a builder the scan finds.
#[test]
fn every_operation_found_is_one_the_code_names() {
    let mut named = BTreeSet::new();
    let mut built = BTreeSet::new();
    for code in agent_sources().values() {
        for line in code.lines() {
            if let Some(rest) = line.trim().strip_prefix("const CALL: &str = \"") {
                named.insert(rest.trim_end_matches("\";").to_string());
            }
        }
        built.extend(calls(&ec2_impls(code)).into_iter().map(|c| pascal(&c.op)));
    }
    assert!(built.len() >= 5, "the scan found too few calls: {built:?}");
    assert_eq!(
        built, named,
        "the operations built (left) and the CALL names (right) differ: a CALL name is wrong, \
         or the scan misread a builder"
    );
}

/// The premises: no other crate links aws-sdk-ec2, and the agent links this crate without the
/// lab's calls (whose module the scan skips).
#[test]
fn only_this_crate_calls_ec2_and_the_agent_links_it_without_the_lab() {
    let crates = repo_dir().join("crates");
    for entry in fs::read_dir(&crates).expect("crates/") {
        let dir = entry.expect("a directory entry").path();
        let manifest = dir.join("Cargo.toml");
        if dir.file_name().is_some_and(|n| n == "cloud") || !manifest.exists() {
            continue;
        }
        assert!(
            !read(&manifest).contains("aws-sdk-ec2"),
            "{} links aws-sdk-ec2: its calls would escape this test",
            manifest.display()
        );
    }
    let workspace = read(&repo_dir().join("Cargo.toml"));
    let agent = read(&crates.join("agent/Cargo.toml"));
    for (file, text) in [
        ("Cargo.toml", &workspace),
        ("crates/agent/Cargo.toml", &agent),
    ] {
        for line in text.lines().filter(|l| l.trim_start().starts_with("cloud")) {
            assert!(
                !line.contains("features"),
                "{file}: {line:?}: the agent must link cloud without the lab feature"
            );
        }
    }
    let holders: Vec<String> = agent_sources()
        .iter()
        .flat_map(|(file, code)| {
            code.lines()
                .filter(|l| l.trim_end().ends_with(": aws_sdk_ec2::Client,"))
                .map(move |l| format!("{file}: {}", l.trim()))
        })
        .collect();
    assert_eq!(
        holders,
        ["ec2.rs: pub(crate) client: aws_sdk_ec2::Client,"],
        "the EC2 client must have one holder, Ec2::client, for the scan to see every call"
    );
    let lib = read(&crate_dir().join("src/lib.rs"));
    assert!(
        feature_gated_modules(&lib).contains("lab"),
        "src/lib.rs no longer gates `mod lab` behind a feature"
    );
}

#[test]
fn the_scanner_reads_builders_split_chains_and_tags() {
    let code = r#"
        impl Ec2 {
        fn f(&self) {
        let out = self
            .client
            .create_network_interface()
            .set_tag_specifications(tag_spec(ResourceType::NetworkInterface, &spec.tags))
            .send()
            .await?;
        let mut req = self.client.assign_private_ip_addresses().network_interface_id(id);
        req = req.secondary_private_ip_address_count(n);
        let out = req.send().await?;
        let c = self.client.clone();
        let id = self.client_id;
        self.client.describe_instance_types().send().await?;
        format!("{x} {{}}");
        }
        }
        impl ImdsMetadata { fn g(&self) { self.client.get(path); } }
    "#;
    let found: Vec<(String, bool)> = calls(&ec2_impls(code))
        .into_iter()
        .map(|c| (pascal(&c.op), c.tags_on_create))
        .collect();
    assert_eq!(
        found,
        [
            ("CreateNetworkInterface".to_string(), true),
            ("AssignPrivateIpAddresses".to_string(), false),
            ("DescribeInstanceTypes".to_string(), false),
        ]
    );
    assert_eq!(
        feature_gated_modules("mod ec2;\n#[cfg(feature = \"lab\")]\npub mod lab;\nmod parse;"),
        BTreeSet::from(["lab".to_string()])
    );
}
