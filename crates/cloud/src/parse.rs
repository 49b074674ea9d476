//! Pure parsing helpers for IMDS text and EC2 answers (unit-tested without a network).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::CloudError;

/// Why a value from IMDS or EC2 could not be parsed. It becomes the `reason`/`problem` text of
/// the [`CloudError`] that names the path or field.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("not an IPv4 address: {0}")]
    Ipv4(std::net::AddrParseError),
    #[error("not an IPv4 CIDR: {0}")]
    Cidr(ipnet::AddrParseError),
    #[error("host bits set (network is {network})")]
    HostBits { network: Ipv4Net },
    #[error("{0}")]
    Number(std::num::ParseIntError),
    #[error("not a JSON document: {0}")]
    Json(serde_json::Error),
    #[error("\"region\" is not a non-empty string: {0}")]
    RegionNotString(serde_json::Value),
    #[error("no \"region\" field")]
    NoRegion,
    #[error("{0:?} is not a MAC address (six pairs of hex digits)")]
    Mac(String),
}

/// Non-empty, trimmed lines of an IMDS text value (IMDS lists are newline-separated).
pub(crate) fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// A directory listing such as `network/interfaces/macs/`: `02:..:01/` lines → MACs, in
/// lower case. Each MAC becomes part of the IMDS paths read next, so anything but six pairs
/// of hex digits is refused (the SDK's IMDS client panics on a path that is not a valid URI).
pub(crate) fn mac_listing(text: &str) -> Result<Vec<String>, ParseError> {
    lines(text)
        .map(|l| l.trim_end_matches('/').to_ascii_lowercase())
        .filter(|l| !l.is_empty())
        .map(|mac| {
            if is_mac(&mac) {
                Ok(mac)
            } else {
                Err(ParseError::Mac(mac))
            }
        })
        .collect()
}

fn is_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':')
            .all(|pair| pair.len() == 2 && pair.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub(crate) fn ipv4(s: &str) -> Result<Ipv4Addr, ParseError> {
    s.trim().parse::<Ipv4Addr>().map_err(ParseError::Ipv4)
}

/// A non-negative decimal number such as an IMDS device number.
pub(crate) fn number(s: &str) -> Result<u32, ParseError> {
    s.trim().parse::<u32>().map_err(ParseError::Number)
}

/// An IPv4 CIDR; the network must be in canonical form (host bits zero), as EC2 reports it.
pub(crate) fn ipv4_net(s: &str) -> Result<Ipv4Net, ParseError> {
    let net = s.trim().parse::<Ipv4Net>().map_err(ParseError::Cidr)?;
    if net.trunc() != net {
        return Err(ParseError::HostBits {
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// The `region` field of the instance identity document.
pub(crate) fn identity_region(doc: &str) -> Result<String, ParseError> {
    let v: serde_json::Value = serde_json::from_str(doc).map_err(ParseError::Json)?;
    match v.get("region") {
        Some(serde_json::Value::String(r)) if !r.is_empty() => Ok(r.clone()),
        Some(other) => Err(ParseError::RegionNotString(other.clone())),
        None => Err(ParseError::NoRegion),
    }
}

/// Apply a parser to an IMDS value, turning its failure into a `CloudError` naming the path.
pub(crate) fn imds_value<T>(
    path: &str,
    value: &str,
    parse: impl FnOnce(&str) -> Result<T, ParseError>,
) -> Result<T, CloudError> {
    parse(value).map_err(|reason| CloudError::ImdsValue {
        path: path.to_owned(),
        value: value.to_owned(),
        reason: reason.to_string(),
    })
}

/// Apply a parser to a field of an EC2 answer, naming the call and field on failure.
pub(crate) fn ec2_field<T>(
    call: &'static str,
    field: &str,
    value: Option<&str>,
    parse: impl FnOnce(&str) -> Result<T, ParseError>,
) -> Result<T, CloudError> {
    let v = value.ok_or_else(|| CloudError::missing(call, field))?;
    parse(v).map_err(|reason| CloudError::answer(call, field, format!("= {v:?}: {reason}")))
}

/// A required string field of an EC2 answer.
pub(crate) fn ec2_str(
    call: &'static str,
    field: &str,
    value: Option<&str>,
) -> Result<String, CloudError> {
    value
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| CloudError::missing(call, field))
}

/// A non-negative integer field of an EC2 answer.
pub(crate) fn ec2_u32(
    call: &'static str,
    field: &str,
    value: Option<i32>,
) -> Result<u32, CloudError> {
    let v = value.ok_or_else(|| CloudError::missing(call, field))?;
    u32::try_from(v).map_err(|_| CloudError::answer(call, field, format!("= {v} is negative")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_skips_blanks_and_trims() {
        let got: Vec<_> = lines("172.31.3.173\n 172.31.13.130 \n\n172.31.11.77\n").collect();
        assert_eq!(got, ["172.31.3.173", "172.31.13.130", "172.31.11.77"]);
        assert_eq!(lines("").count(), 0);
    }

    #[test]
    fn mac_listing_strips_slashes_and_lowercases() {
        let got = mac_listing("02:00:00:AA:bb:01/\n02:00:00:aa:bb:02/\n").unwrap();
        assert_eq!(got, ["02:00:00:aa:bb:01", "02:00:00:aa:bb:02"]);
        // IMDS answers without a trailing newline too
        assert_eq!(
            mac_listing("02:00:00:aa:bb:01/").unwrap(),
            ["02:00:00:aa:bb:01"]
        );
    }

    /// Regression (found by `fuzz_imds_garbage_answers`): a listed "MAC" went into the next IMDS
    /// path unchecked, and the SDK's IMDS client panics on a path that is not a valid URI
    /// (`valid request: InvalidUriChar`) — a garbage answer crashed the agent.
    #[test]
    fn mac_listing_refuses_what_is_not_a_mac() {
        for bad in [
            "02:00 00:00:00:0b/",
            "é/",
            "../../x/",
            "02:00:00:00:00:0g/",
            "02:00:00:00:00:0b:/",
            "020000:00:00:0b/",
        ] {
            let e = mac_listing(&format!("02:00:00:00:00:0a/\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a MAC address"), "{bad}: {e}");
            assert!(
                e.contains(&bad.trim_end_matches('/').to_lowercase()),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn ipv4_and_cidr_parsing() {
        assert_eq!(
            ipv4(" 172.31.15.228\n").unwrap(),
            Ipv4Addr::new(172, 31, 15, 228)
        );
        assert!(
            ipv4("172.31.15")
                .unwrap_err()
                .to_string()
                .contains("not an IPv4 address")
        );
        assert_eq!(ipv4_net("172.31.0.0/20").unwrap().prefix_len(), 20);
        assert!(
            ipv4_net("172.31.0.1/20")
                .unwrap_err()
                .to_string()
                .contains("host bits set")
        );
        assert!(ipv4_net("172.31.0.0").is_err());
    }

    #[test]
    fn identity_document_region() {
        let doc = r#"{"region":"us-west-2","instanceId":"i-0123","availabilityZone":"us-west-2a"}"#;
        assert_eq!(identity_region(doc).unwrap(), "us-west-2");
        assert!(
            identity_region(r#"{"instanceId":"i-1"}"#)
                .unwrap_err()
                .to_string()
                .contains("no \"region\"")
        );
        assert!(
            identity_region(r#"{"region":5}"#)
                .unwrap_err()
                .to_string()
                .contains("not a non-empty string")
        );
        assert!(
            identity_region("<html>")
                .unwrap_err()
                .to_string()
                .contains("not a JSON")
        );
    }

    #[test]
    fn errors_name_path_call_and_value() {
        let e = imds_value("/latest/meta-data/local-ipv4", "x.y", ipv4).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/latest/meta-data/local-ipv4") && s.contains("x.y"),
            "{s}"
        );

        let e =
            ec2_field("DescribeSubnets", "CidrBlock", Some("10.0.0.1/8"), ipv4_net).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("DescribeSubnets") && s.contains("CidrBlock") && s.contains("10.0.0.1/8"),
            "{s}"
        );

        let e = ec2_str("RunInstances", "InstanceId", None).unwrap_err();
        assert!(e.to_string().contains("InstanceId is missing"), "{e}");
        assert!(
            ec2_u32(
                "DescribeInstanceTypes",
                "MaximumNetworkInterfaces",
                Some(-1)
            )
            .is_err()
        );
        assert_eq!(ec2_u32("DescribeInstanceTypes", "X", Some(3)).unwrap(), 3);
    }
}

/// Property ("fuzz") tests of the IMDS text parsers: 256 cases each in `cargo test`,
/// `PROPTEST_CASES=<n> cargo test -p cloud fuzz_` for more (docs/testing.md).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use testkit::fuzz::config;

    /// What an IMDS answer might be: arbitrary text, text of the right alphabet, or a
    /// well-formed value with a few characters changed.
    fn answer() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "[0-9a-fA-F:./ \t\r\n-]{0,40}",
            (
                prop::sample::select(
                    &[
                        "172.31.15.228",
                        "172.31.0.0/20",
                        "02:00:00:00:00:0a/\n02:00:00:00:00:0b/",
                        "4294967295",
                        r#"{"region":"us-west-2"}"#,
                    ][..]
                ),
                prop::collection::vec((any::<usize>(), any::<char>()), 1..4),
            )
                .prop_map(|(s, edits)| {
                    let mut c: Vec<char> = s.chars().collect();
                    for (at, ch) in edits {
                        let at = at % c.len();
                        c[at] = ch;
                    }
                    c.into_iter().collect()
                }),
        ]
    }

    fn spaces() -> impl Strategy<Value = String> {
        "[ \t\r\n]{0,3}"
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Any answer: each parser returns a well-formed value or an error (no panic); a
        /// listed MAC is always safe to put into the next IMDS path.
        #[test]
        fn fuzz_imds_answers_never_panic(s in answer()) {
            for l in lines(&s) {
                prop_assert!(!l.is_empty() && l.trim() == l);
            }
            if let Ok(macs) = mac_listing(&s) {
                for m in macs {
                    prop_assert!(is_mac(&m) && m == m.to_ascii_lowercase(), "{m:?}");
                }
            }
            if let Ok(n) = ipv4_net(&s) {
                prop_assert_eq!(n.trunc(), n);
            }
            let _ = (ipv4(&s), number(&s), identity_region(&s));
            // an error names the path and the value
            if let Err(e) = imds_value("/latest/meta-data/local-ipv4", &s, ipv4) {
                let text = e.to_string();
                prop_assert!(text.contains("/latest/meta-data/local-ipv4"));
                prop_assert!(text.contains(&format!("{s:?}")), "{text}");
            }
        }

        /// Well-formed values, with the white space IMDS may add, parse to themselves.
        #[test]
        fn fuzz_imds_values_round_trip(
            addrs in prop::collection::vec(any::<u32>().prop_map(Ipv4Addr::from), 1..5),
            n in any::<u32>(),
            net in (any::<u32>(), 0u8..=32)
                .prop_map(|(a, p)| Ipv4Net::new(Ipv4Addr::from(a), p).unwrap()),
            macs in prop::collection::vec((any::<[u8; 6]>(), any::<bool>()), 0..5),
            (pre, post) in (spaces(), spaces()),
        ) {
            prop_assert_eq!(ipv4(&format!("{pre}{}{post}", addrs[0])).unwrap(), addrs[0]);
            prop_assert_eq!(number(&format!("{pre}{n}{post}")).unwrap(), n);
            let text = format!("{pre}{net}{post}");
            if net.trunc() == net {
                prop_assert_eq!(ipv4_net(&text).unwrap(), net);
            } else {
                let e = ipv4_net(&text).unwrap_err();
                let named = matches!(e, ParseError::HostBits { network } if network == net.trunc());
                prop_assert!(named, "{e}");
            }
            let listing = addrs.iter().map(|a| format!("{a}{post}\n{pre}")).collect::<String>();
            let got: Vec<Ipv4Addr> = lines(&listing).map(|l| ipv4(l).unwrap()).collect();
            prop_assert_eq!(got, addrs);

            let written: Vec<String> = macs
                .iter()
                .map(|(b, upper)| {
                    let m = b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":");
                    if *upper { m.to_ascii_uppercase() } else { m }
                })
                .collect();
            let listing = written.iter().map(|m| format!("{pre}{m}/{post}\n")).collect::<String>();
            let want: Vec<String> = written.iter().map(|m| m.to_ascii_lowercase()).collect();
            prop_assert_eq!(mac_listing(&listing).unwrap(), want);
        }

        /// The identity document's `region`: found when it is a non-empty string, whatever
        /// else the document holds; otherwise an error saying what is wrong with it.
        #[test]
        fn fuzz_identity_document(
            region in prop_oneof![
                ".{0,20}".prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                Just(serde_json::Value::Null),
                Just(serde_json::json!(["us-west-2"])),
            ],
            present in any::<bool>(),
            others in prop::collection::btree_map("[a-zA-Z]{1,12}", ".{0,20}", 0..5),
        ) {
            let mut doc: serde_json::Map<String, serde_json::Value> =
                others.into_iter().map(|(k, v)| (k, v.into())).collect();
            if present {
                doc.insert("region".into(), region.clone());
            } else {
                doc.remove("region");
            }
            let got = identity_region(&serde_json::Value::Object(doc).to_string());
            match (present, region.as_str()) {
                (true, Some(r)) if !r.is_empty() => prop_assert_eq!(got.unwrap(), r),
                (true, _) => {
                    let named = matches!(got, Err(ParseError::RegionNotString(v)) if v == region);
                    prop_assert!(named);
                }
                (false, _) => prop_assert!(matches!(got, Err(ParseError::NoRegion))),
            }
        }
    }
}
