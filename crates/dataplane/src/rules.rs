//! Helpers for policy-routing rules shared by node setup (`host`) and pod wiring (`pod`): the
//! per-ENI table and `fwmark` rule, and the idempotent add / tolerant delete both use. A leaf:
//! it uses only [`crate::ops`] and the numbering facts of the crate root.

use crate::ops::{NetError, NetOps, Rule};
use crate::{
    DataplaneError, ENI_MARK_MASK, FROM_POD_RULE_PRIORITY, MAIN_TABLE, MAX_ENI_DEVICE,
    TO_POD_RULE_PRIORITY, eni_mark, route_table_for_device,
};

/// The routing table of a secondary ENI (`device_number + 1`), or an error for the primary
/// ENI (0, routed by the main table and not set up here) and for device numbers the ENI mark
/// bits cannot express.
pub(crate) fn eni_table(device_number: u32) -> Result<u32, DataplaneError> {
    if device_number == 0 || device_number > MAX_ENI_DEVICE {
        return Err(DataplaneError::Invalid {
            what: "ENI device number (1..=63: the primary ENI, 0, is not set up here, and the \
                   ENI mark bits 0x3f00 hold at most 63)",
            value: device_number.to_string(),
        });
    }
    Ok(route_table_for_device(device_number))
}

/// `fwmark <eni mark>/0x3f00 lookup <device + 1> pref 1536`: pod egress marked for this ENI
/// (by the nftables table, from the host veth's device group) uses the ENI's table.
pub(crate) fn eni_rule(device_number: u32) -> Rule {
    Rule::new(
        FROM_POD_RULE_PRIORITY,
        route_table_for_device(device_number),
    )
    .fwmark(eni_mark(device_number), ENI_MARK_MASK)
}

/// The pod address of one of the reference's (aws-node's) per-pod rules: `to <ip>/32 lookup
/// main pref 512` or `from <ip>/32 lookup <table> pref 1536` (without a mark). Our layout has
/// neither; DEL removes them (nodes migrated from aws-node) and adoption replaces them.
pub(crate) fn reference_pod_rule(r: &Rule) -> Option<std::net::Ipv4Addr> {
    if r.fwmark.is_some() {
        return None;
    }
    let one = |n: Option<ipnet::Ipv4Net>| n.filter(|n| n.prefix_len() == 32).map(|n| n.addr());
    match (r.priority, r.src, r.dst) {
        (TO_POD_RULE_PRIORITY, None, Some(dst)) if r.table == MAIN_TABLE => one(Some(dst)),
        (FROM_POD_RULE_PRIORITY, Some(src), None) => one(Some(src)),
        _ => None,
    }
}

/// Adds a rule; EEXIST is fine. Returns whether this call created it.
pub(crate) fn ensure_rule<N: NetOps>(n: &mut N, r: &Rule) -> Result<bool, NetError> {
    match n.add_rule(r) {
        Ok(()) => Ok(true),
        Err(e) if e.is_exists() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Maps "does not exist" to success (for deletions).
pub(crate) fn tolerate_missing(r: Result<(), NetError>) -> Result<(), NetError> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}
