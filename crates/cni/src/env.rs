//! The `CNI_*` environment the runtime passes, parsed from an iterator of (key, value) so that
//! it can be tested without touching the process environment.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{CniError, code};

/// The verb in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    /// Does this verb act on one attachment (and so need a container id and an ifname)?
    pub fn needs_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// Does this verb need `CNI_NETNS`?
    pub fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return Err(()),
        })
    }
}

/// Why `CNI_ARGS` could not be parsed (reported as an invalid `CNI_ARGS`, code 4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CniArgsError {
    /// An entry without `=`.
    #[error("entry \"{entry}\" is not of the form KEY=VALUE")]
    NotKeyValue { entry: String },
    /// `IgnoreUnknown` with a value that is not a boolean.
    #[error("IgnoreUnknown value \"{value}\" is not a boolean")]
    IgnoreUnknownNotBool { value: String },
    /// Keys we do not know, without `IgnoreUnknown`.
    #[error("unknown key(s) {} (set IgnoreUnknown=1 to ignore them)", keys.join(", "))]
    UnknownKeys { keys: Vec<String> },
}

/// `CNI_ARGS` as Kubernetes runtimes fill it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub infra_container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub ignore_unknown: bool,
    /// Keys we do not know (kept only when `IgnoreUnknown` is set).
    pub other: Vec<(String, String)>,
}

impl CniArgs {
    /// Parse `K=V;K=V`. Unknown keys are an error unless `IgnoreUnknown` is true (anywhere in
    /// the list), as in libcni's `LoadArgs`.
    pub fn parse(s: &str) -> Result<CniArgs, CniArgsError> {
        let mut args = CniArgs::default();
        let mut unknown = Vec::new();
        for part in s.split(';') {
            if part.is_empty() {
                continue;
            }
            let Some((k, v)) = part.split_once('=') else {
                return Err(CniArgsError::NotKeyValue {
                    entry: part.to_string(),
                });
            };
            let value = Some(v.to_string());
            match k {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value.filter(|v| !v.is_empty()),
                "K8S_POD_NAME" => args.pod_name = value.filter(|v| !v.is_empty()),
                "K8S_POD_INFRA_CONTAINER_ID" => {
                    args.infra_container_id = value.filter(|v| !v.is_empty())
                }
                "K8S_POD_UID" => args.pod_uid = value.filter(|v| !v.is_empty()),
                "IgnoreUnknown" => {
                    args.ignore_unknown = match v.to_ascii_lowercase().as_str() {
                        "1" | "true" => true,
                        "0" | "false" | "" => false,
                        _ => {
                            return Err(CniArgsError::IgnoreUnknownNotBool {
                                value: v.to_string(),
                            });
                        }
                    }
                }
                _ => unknown.push((k.to_string(), v.to_string())),
            }
        }
        if !unknown.is_empty() && !args.ignore_unknown {
            return Err(CniArgsError::UnknownKeys {
                keys: unknown.into_iter().map(|(k, _)| k).collect(),
            });
        }
        args.other = unknown;
        Ok(args)
    }

    /// The pod's (namespace, name), when both are known.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((self.pod_namespace.as_deref()?, self.pod_name.as_deref()?))
    }
}

/// The parsed environment. Fields that a verb requires are guaranteed present after
/// [`Env::from_vars`] succeeds for that verb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Parse and validate the variables relevant to `CNI_COMMAND`. All problems are reported
    /// together (code 4), each naming its variable.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Env, CniError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut map: HashMap<String, OsString> = HashMap::new();
        for (k, v) in vars {
            if let Some(k) = k.as_ref().to_str()
                && k.starts_with("CNI_")
            {
                map.insert(k.to_string(), v.as_ref().to_os_string());
            }
        }
        let get = |k: &str| map.get(k).filter(|v| !v.is_empty());

        let command = match get("CNI_COMMAND") {
            None => return Err(env_error(vec![("CNI_COMMAND", "is not set".into())])),
            Some(v) => match v.to_str().and_then(|s| s.parse().ok()) {
                Some(c) => c,
                None => {
                    return Err(env_error(vec![(
                        "CNI_COMMAND",
                        format!(
                            "\"{}\" is not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
                            v.to_string_lossy()
                        ),
                    )]));
                }
            },
        };

        let mut env = Env {
            command,
            container_id: None,
            netns: None,
            ifname: None,
            args: CniArgs::default(),
            path: Vec::new(),
        };
        if command == Command::Version {
            return Ok(env);
        }

        let mut problems: Vec<(&'static str, String)> = Vec::new();
        let text = |k: &'static str, problems: &mut Vec<(&'static str, String)>| {
            let v = get(k)?;
            match v.to_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    problems.push((k, format!("\"{}\" is not UTF-8", v.to_string_lossy())));
                    None
                }
            }
        };

        if command.needs_attachment() {
            match text("CNI_CONTAINERID", &mut problems) {
                Some(id) => match validate_container_id(&id) {
                    Ok(()) => env.container_id = Some(id),
                    Err(why) => problems.push(("CNI_CONTAINERID", format!("\"{id}\" {why}"))),
                },
                None if get("CNI_CONTAINERID").is_none() => {
                    problems.push(("CNI_CONTAINERID", "is not set".into()))
                }
                None => {}
            }
            match text("CNI_IFNAME", &mut problems) {
                Some(name) => match validate_ifname(&name) {
                    Ok(()) => env.ifname = Some(name),
                    Err(why) => problems.push(("CNI_IFNAME", format!("\"{name}\" {why}"))),
                },
                None if get("CNI_IFNAME").is_none() => {
                    problems.push(("CNI_IFNAME", "is not set".into()))
                }
                None => {}
            }
        }
        if command.needs_attachment() {
            match get("CNI_NETNS") {
                Some(v) => env.netns = Some(PathBuf::from(v)),
                None if command.needs_netns() => problems.push(("CNI_NETNS", "is not set".into())),
                None => {}
            }
        }
        if let Some(a) = text("CNI_ARGS", &mut problems) {
            match CniArgs::parse(&a) {
                Ok(args) => env.args = args,
                Err(why) => problems.push(("CNI_ARGS", why.to_string())),
            }
        }
        if let Some(p) = get("CNI_PATH") {
            env.path = std::env::split_paths(p)
                .filter(|p| !p.as_os_str().is_empty())
                .collect();
        }

        if problems.is_empty() {
            Ok(env)
        } else {
            Err(env_error(problems))
        }
    }

    /// The container id (present for ADD, DEL and CHECK).
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    /// The interface name (present for ADD, DEL and CHECK).
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

fn env_error(problems: Vec<(&'static str, String)>) -> CniError {
    let mut names: Vec<&str> = problems.iter().map(|(k, _)| *k).collect();
    names.dedup();
    CniError::new(
        code::INVALID_ENVIRONMENT_VARIABLES,
        format!(
            "missing or invalid environment variable(s): {}",
            names.join(", ")
        ),
        problems
            .iter()
            .map(|(k, why)| format!("{k} {why}"))
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Container ids and network names: start with an alphanumeric character, then alphanumerics,
/// `_`, `.` or `-` (libcni's `ValidateContainerID` / `ValidateNetworkName`).
pub fn validate_identifier(s: &str) -> Result<(), &'static str> {
    let mut chars = s.chars();
    match chars.next() {
        None => return Err("is empty"),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err("must start with an ASCII letter or digit");
        }
        _ => {}
    }
    if chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err("may contain only ASCII letters, digits, '_', '.' and '-'")
    }
}

/// See [`validate_identifier`].
pub fn validate_container_id(s: &str) -> Result<(), &'static str> {
    validate_identifier(s)
}

/// A name the Linux kernel accepts for a network interface (`dev_valid_name`): 1–15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace.
pub fn validate_ifname(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("is empty");
    }
    if s.len() > 15 {
        return Err("is longer than 15 bytes");
    }
    if s == "." || s == ".." {
        return Err("is not a valid interface name");
    }
    if s.contains('/') {
        return Err("contains '/'");
    }
    if s.contains(':') {
        return Err("contains ':'");
    }
    if s.chars().any(char::is_whitespace) {
        return Err("contains whitespace");
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        Env::from_vars(vars.iter().copied())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-123_x.y"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;FOO=bar",
        ),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ("HOME", "/root"),
    ];

    #[test]
    fn full_add_env() {
        let env = parse(ADD).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.container_id(), "abc-123_x.y");
        assert_eq!(env.ifname(), "eth0");
        assert_eq!(
            env.netns.as_deref(),
            Some(std::path::Path::new("/run/netns/pod"))
        );
        assert_eq!(env.args.pod(), Some(("default", "web-0")));
        assert_eq!(env.args.infra_container_id.as_deref(), Some("abc"));
        assert_eq!(env.args.pod_uid.as_deref(), Some("u-1"));
        assert!(env.args.ignore_unknown);
        assert_eq!(env.args.other, vec![("FOO".to_string(), "bar".to_string())]);
        assert_eq!(
            env.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }

    #[test]
    fn version_needs_only_the_command() {
        let env = parse(&[("CNI_COMMAND", "VERSION")]).unwrap();
        assert_eq!(env.command, Command::Version);
        // even garbage in other variables does not matter
        parse(&[("CNI_COMMAND", "VERSION"), ("CNI_IFNAME", "a/b")]).unwrap();
    }

    #[test]
    fn missing_command() {
        let e = parse(&[("CNI_CONTAINERID", "x")]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = parse(&[("CNI_COMMAND", "add")]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.details.contains("\"add\""), "{e}");
    }

    #[test]
    fn every_missing_variable_is_named() {
        let e = parse(&[("CNI_COMMAND", "ADD")]).unwrap_err();
        assert_eq!(e.code, 4);
        for k in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            assert!(e.msg.contains(k), "{e}");
            assert!(e.details.contains(k), "{e}");
        }
        assert!(!e.msg.contains("CNI_PATH"));
    }

    #[test]
    fn del_netns_is_optional_but_check_needs_it() {
        let vars = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ];
        let env = parse(&vars).unwrap();
        assert_eq!(env.netns, None);
        let vars = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        let e = parse(&vars).unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"));
        assert!(!e.msg.contains("CNI_CONTAINERID"));
    }

    #[test]
    fn status_and_gc_need_no_attachment() {
        for c in ["STATUS", "GC"] {
            let env = parse(&[("CNI_COMMAND", c)]).unwrap();
            assert_eq!(env.container_id, None);
        }
    }

    #[test]
    fn invalid_values_are_named_with_the_value() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "a/b"),
        ];
        let e = parse(&vars).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.details.contains("CNI_CONTAINERID \"-bad\""), "{e}");
        assert!(e.details.contains("CNI_IFNAME \"a/b\""), "{e}");
    }

    #[test]
    fn bad_cni_args() {
        let mut vars: Vec<_> = ADD.to_vec();
        vars[4] = ("CNI_ARGS", "K8S_POD_NAME=x;garbage");
        let e = parse(&vars).unwrap_err();
        assert!(e.msg.contains("CNI_ARGS"));
        assert!(e.details.contains("garbage"));
        vars[4] = ("CNI_ARGS", "K8S_POD_NAME=x;FOO=1");
        let e = parse(&vars).unwrap_err();
        assert!(e.details.contains("FOO"), "{e}");
        vars[4] = ("CNI_ARGS", "FOO=1;IgnoreUnknown=true;");
        assert!(parse(&vars).is_ok());
    }

    #[test]
    fn cni_args_errors_are_typed() {
        assert_eq!(
            CniArgs::parse("K8S_POD_NAME=x;garbage"),
            Err(CniArgsError::NotKeyValue {
                entry: "garbage".into()
            })
        );
        assert_eq!(
            CniArgs::parse("IgnoreUnknown=maybe"),
            Err(CniArgsError::IgnoreUnknownNotBool {
                value: "maybe".into()
            })
        );
        let e = CniArgs::parse("FOO=1;BAR=2").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown key(s) FOO, BAR (set IgnoreUnknown=1 to ignore them)"
        );
    }

    #[test]
    fn container_ids() {
        for ok in ["a", "0", "abc_DEF-1.2", "f00d"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["", "_a", ".a", "-a", "a b", "a/b", "a:b", "é"] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ifnames() {
        for ok in ["eth0", "a", "123456789012345", "veth-x_y.z"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "1234567890123456",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn non_utf8_netns_is_kept() {
        use std::os::unix::ffi::OsStrExt;
        let netns = OsStr::from_bytes(b"/run/netns/\xff");
        let vars: Vec<(&OsStr, &OsStr)> = vec![
            (OsStr::new("CNI_COMMAND"), OsStr::new("ADD")),
            (OsStr::new("CNI_CONTAINERID"), OsStr::new("c")),
            (OsStr::new("CNI_IFNAME"), OsStr::new("eth0")),
            (OsStr::new("CNI_NETNS"), netns),
        ];
        let env = Env::from_vars(vars).unwrap();
        assert_eq!(env.netns.unwrap().as_os_str(), netns);
    }
}
