//! `vpcctl status`, `enis` and `pods` as text: pure functions of the agent's documents.

use std::fmt::Write;

use crate::doc::{self, Enis, State, StateAnswer};

/// A duration in milliseconds as a person reads it: `850ms`, `42s`, `2m13s`, `3h05m`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Whole seconds, rounded up: a cooldown with 20.1 s left is "21s" (never "0s" while cooling).
pub fn secs_up(ms: u64) -> String {
    format!("{}s", ms.div_ceil(1000))
}

/// "42s ago" for a time `at` on the agent's clock, now being `now`.
pub fn ago(now: u64, at: u64) -> String {
    format!("{} ago", duration(now.saturating_sub(at)))
}

/// The first 12 characters of a container id, as crictl shows them.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The width of each column of `rows`.
fn widths<'a>(rows: impl Iterator<Item = &'a Vec<String>> + Clone) -> Vec<usize> {
    let cols = rows.clone().map(Vec::len).max().unwrap_or(0);
    (0..cols)
        .map(|c| {
            rows.clone()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// Rows as aligned columns (two spaces between), the last column unpadded.
pub fn table(rows: &[Vec<String>]) -> String {
    aligned(rows, &widths(rows.iter()))
}

/// Rows in columns of the given widths.
fn aligned(rows: &[Vec<String>], widths: &[usize]) -> String {
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "unset".to_string(), |v| v.to_string())
}

/// The probes as `/livez` and `/readyz` answered them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswers {
    pub livez: Result<(), String>,
    pub readyz: Result<(), String>,
}

impl ProbeAnswers {
    /// Both probes pass.
    pub fn ok(&self) -> bool {
        self.livez.is_ok() && self.readyz.is_ok()
    }
}

fn probe(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(why) => format!("failing: {why}"),
    }
}

/// `vpcctl status`: the probes, the pool's counts, cooldowns, warm-pool targets and limits,
/// pending ADDs, the blocker, EC2's last refusal, reconciles and drift, ENI operations in
/// flight, EC2 calls and errors, the checkpoint.
pub fn status(agent: &str, probes: &ProbeAnswers, state: &StateAnswer) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        vec!["agent".into(), agent.into()],
        vec!["livez".into(), probe(&probes.livez)],
        vec!["readyz".into(), probe(&probes.readyz)],
    ];
    let s = match state {
        StateAnswer::Starting(why) => {
            rows.push(vec!["pool".into(), format!("not known yet: {why}")]);
            return table(&rows);
        }
        StateAnswer::Known(s) => s,
    };
    let st = &s.stats;
    rows.push(vec![
        "pool".into(),
        format!(
            "{} ENIs, {} addresses: {} assigned, {} cooling, {} available; {} lost",
            st.enis, st.total, st.assigned, st.cooling, st.available, st.lost
        ),
    ]);
    let longest = s.cooling.iter().map(|c| c.left_ms).max();
    rows.push(vec![
        "cooldown".into(),
        match longest {
            Some(left) => format!(
                "{} (IP_COOLDOWN_PERIOD); {} cooling, all free within {}",
                secs_up(s.cooldown_ms),
                s.cooling.len(),
                secs_up(left)
            ),
            None => format!(
                "{} (IP_COOLDOWN_PERIOD); none cooling",
                secs_up(s.cooldown_ms)
            ),
        },
    ]);
    rows.push(vec![
        "warm targets".into(),
        format!(
            "WARM_ENI_TARGET={} WARM_IP_TARGET={} MINIMUM_IP_TARGET={}",
            s.targets.warm_eni,
            opt(s.targets.warm_ip),
            opt(s.targets.minimum_ip)
        ),
    ]);
    rows.push(vec![
        "provisioning".into(),
        if s.provisioning {
            "on (EC2)".into()
        } else {
            "off (DISABLE_NETWORK_RESOURCE_PROVISIONING or ENABLE_IMDS_ONLY_MODE): only the ENIs' \
             addresses IMDS lists"
                .into()
        },
    ]);
    rows.push(vec![
        "limits".into(),
        match &s.limits {
            Some(l) => format!(
                "{} ENIs × {} IPs = {} addresses, max pods {}; holds {} addresses{}",
                l.max_enis,
                l.ips_per_eni,
                l.max_ips,
                l.max_pods,
                st.total,
                if l.at_limit {
                    ": at its limit"
                } else if l.at_max_pods {
                    ": at its max-pods ceiling"
                } else {
                    ""
                }
            ),
            None => "not known (provisioning off)".into(),
        },
    ]);
    rows.push(vec![
        "pending".into(),
        format!("{} ADDs waiting for an address", s.pending),
    ]);
    rows.push(vec![
        "blocker".into(),
        s.blocker.clone().unwrap_or_else(|| "none".into()),
    ]);
    rows.push(vec![
        "ec2 refused".into(),
        s.ec2_refused.clone().unwrap_or_else(|| "none".into()),
    ]);
    let d = &s.drift;
    rows.push(vec![
        "reconcile".into(),
        match (d.last_reconcile_ms, &d.last_reconcile_error) {
            (None, _) => format!("{} done", d.reconciles),
            (Some(at), None) => {
                format!("{} done, the last {}, ok", d.reconciles, ago(s.now_ms, at))
            }
            (Some(at), Some(e)) => format!(
                "{} done, the last {}, failed: {e}",
                d.reconciles,
                ago(s.now_ms, at)
            ),
        },
    ]);
    let lost: Vec<String> = d.lost.iter().map(|(r, n)| format!("{r} {n}")).collect();
    rows.push(vec![
        "drift".into(),
        format!(
            "lost {} ({}), free removed {}, ENIs detached {}, adopted {}, relisted {}",
            d.lost.values().sum::<u64>(),
            if lost.is_empty() {
                "none".into()
            } else {
                lost.join(", ")
            },
            d.removed_free,
            d.enis_detached,
            d.adopted,
            d.relisted
        ),
    ]);
    rows.push(vec!["eni operations".into(), intents(s)]);
    let (throttled, failed) = s
        .ec2
        .values()
        .fold((0, 0), |(t, f), c| (t + c.throttled, f + c.failed));
    rows.push(vec![
        "ec2 errors".into(),
        format!("{throttled} throttled, {failed} failed"),
    ]);
    rows.push(vec![
        "ec2 calls".into(),
        if s.ec2.is_empty() {
            "none".into()
        } else {
            s.ec2
                .iter()
                .map(|(api, c)| {
                    let mut t = format!("{api} {}", c.attempts);
                    if c.throttled + c.failed > 0 {
                        let _ = write!(t, " ({} throttled, {} failed)", c.throttled, c.failed);
                    }
                    t
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
    ]);
    rows.push(vec![
        "checkpoint".into(),
        format!(
            "{} write failures{}",
            s.checkpoint_write_failures,
            s.checkpoint_rebuilt_from
                .as_ref()
                .map(|r| format!("; rebuilt from the node at start ({r})"))
                .unwrap_or_default()
        ),
    ]);
    table(&rows)
}

/// The ENI operations in flight, or "none".
pub fn intents(s: &State) -> String {
    if s.intents.is_empty() {
        return "none".into();
    }
    s.intents
        .iter()
        .map(|i| {
            let mut t = i.op.clone();
            if let Some(e) = &i.eni_id {
                let _ = write!(t, " {e}");
            }
            if let Some(d) = i.device_index {
                let _ = write!(t, " (device {d})");
            }
            let _ = write!(t, " started {}", ago(s.now_ms, i.started_ms));
            t
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `vpcctl enis`: each ENI and its addresses, with their state and the pod holding each.
pub fn enis(e: &Enis) -> String {
    let mut out = format!(
        "{} ENIs, {} addresses: {} assigned, {} cooling, {} available\n",
        e.enis.len(),
        e.total_ips,
        e.assigned_ips,
        e.cooling_ips,
        e.available_ips
    );
    // Every ENI's addresses in the same columns.
    let tables: Vec<Vec<Vec<String>>> = e.enis.iter().map(address_rows).collect();
    let w = widths(tables.iter().flatten());
    for (eni, rows) in e.enis.iter().zip(&tables) {
        let _ = writeln!(
            out,
            "\n{}  device {}{}  subnet {}  primary IP {}  route table {}",
            eni.id,
            eni.device_number,
            if eni.is_primary { " (primary)" } else { "" },
            eni.subnet,
            eni.primary_ip,
            eni.route_table
        );
        if rows.is_empty() {
            out.push_str("  (no secondary address)\n");
        } else {
            out.push_str(&aligned(rows, &w));
        }
    }
    out
}

/// One ENI's addresses: address, state, and the pod (or the cooldown left).
fn address_rows(eni: &doc::Eni) -> Vec<Vec<String>> {
    eni.addresses
        .iter()
        .map(|a| {
            let pod = a.pod.as_ref().map(|p| {
                format!(
                    "{} ({})",
                    doc::pod_name(&p.namespace, &p.name),
                    short_id(&p.container_id)
                )
            });
            let detail = match a.state.as_str() {
                "cooling" => a
                    .left_ms
                    .map(|l| format!("{} left", secs_up(l)))
                    .unwrap_or_default(),
                "parked" => pod
                    .map(|p| format!("{p}: a lost address of that pod, listed here again"))
                    .unwrap_or_default(),
                _ => pod.unwrap_or_default(),
            };
            vec![format!("  {}", a.address), a.state.clone(), detail]
        })
        .collect()
}

/// `vpcctl pods`: every pod holding an address (by name), then the lost ones with their
/// reason.
pub fn pods(s: &State) -> String {
    let mut rows = vec![vec![
        "POD".to_string(),
        "CONTAINER".into(),
        "IF".into(),
        "IP".into(),
        "ENI".into(),
        "DEVICE".into(),
        "SINCE".into(),
    ]];
    let mut by_name: Vec<&doc::Pod> = s.pods.iter().collect();
    by_name.sort_by(|a, b| (&a.namespace, &a.pod, &a.ip).cmp(&(&b.namespace, &b.pod, &b.ip)));
    for p in by_name {
        rows.push(vec![
            doc::pod_name(&p.namespace, &p.pod),
            short_id(&p.container_id).into(),
            p.if_name.clone(),
            p.ip.to_string(),
            p.eni.clone(),
            p.device_number.to_string(),
            ago(s.now_ms, p.since_ms),
        ]);
    }
    let mut out = table(&rows);
    let _ = writeln!(out, "{} pods with an address", s.pods.len());
    if !s.lost.is_empty() {
        let mut rows = vec![vec![
            "LOST POD".to_string(),
            "CONTAINER".into(),
            "IP".into(),
            "ENI".into(),
            "WHEN".into(),
            "WHY".into(),
        ]];
        for l in &s.lost {
            rows.push(vec![
                doc::pod_name(&l.namespace, &l.pod),
                short_id(&l.container_id).into(),
                l.ip.to_string(),
                l.eni.clone().unwrap_or_else(|| "-".into()),
                l.lost_ms
                    .map(|t| ago(s.now_ms, t))
                    .unwrap_or_else(|| "at start".into()),
                format!(
                    "{}: {}{}",
                    l.reason,
                    l.why,
                    l.parked_on
                        .as_ref()
                        .map(|e| format!(" (EC2 lists it on {e} again: parked there)"))
                        .unwrap_or_default()
                ),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
        let _ = writeln!(
            out,
            "{} lost: no working network; each address stays blocked until its pod is deleted",
            s.lost.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_a_person_reads_them() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(42_300), "42s");
        assert_eq!(duration(133_000), "2m13s");
        assert_eq!(duration(3 * 3_600_000 + 5 * 60_000), "3h05m");
        assert_eq!(secs_up(20_100), "21s");
        assert_eq!(secs_up(1), "1s");
        assert_eq!(secs_up(30_000), "30s");
        assert_eq!(ago(10_000, 4_000), "6s ago");
        assert_eq!(ago(1, 4_000), "0ms ago", "a time after now is now");
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("c1"), "c1");
    }

    #[test]
    fn tables_align_all_but_the_last_column() {
        let t = table(&[
            vec!["a".into(), "bbb".into(), "c".into()],
            vec!["aaaa".into(), "b".into(), "cc".into()],
        ]);
        assert_eq!(t, "a     bbb  c\naaaa  b    cc\n");
    }
}
