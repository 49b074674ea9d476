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
}

/// Non-empty, trimmed lines of an IMDS text value (IMDS lists are newline-separated).
pub(crate) fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty())
}

/// A directory listing such as `network/interfaces/macs/`: `02:..:01/` lines → MACs.
pub(crate) fn mac_listing(text: &str) -> Vec<String> {
    lines(text)
        .map(|l| l.trim_end_matches('/').to_ascii_lowercase())
        .filter(|l| !l.is_empty())
        .collect()
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
        let got = mac_listing("02:00:00:AA:bb:01/\n02:00:00:aa:bb:02/\n");
        assert_eq!(got, ["02:00:00:aa:bb:01", "02:00:00:aa:bb:02"]);
        // IMDS answers without a trailing newline too
        assert_eq!(mac_listing("02:00:00:aa:bb:01/"), ["02:00:00:aa:bb:01"]);
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
