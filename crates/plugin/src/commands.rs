//! The verbs: ADD, DEL, CHECK, STATUS, GC.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use cni::{CniResult, Env, Interface, IpConfig, NetConf, Route};
use dataplane::{POD_GATEWAY, PodSpec, PodTeardown};
use ipnet::{IpNet, Ipv4Net};
use proto::{AttachmentKey, PodRef, Request, Response};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::backend::{Backend, NetnsState};
use crate::config::PluginConfig;
use crate::deadline::{Deadline, LOCAL_WORK_RESERVE};
use crate::error::{GcFailure, PluginError, Release};

/// Everything a verb needs.
pub struct Ctx<'a> {
    pub env: &'a Env,
    pub conf: &'a NetConf,
    pub cfg: &'a PluginConfig,
    pub backend: &'a dyn Backend,
    /// The call's one deadline ([`crate::deadline`]).
    pub deadline: Deadline,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("env", self.env)
            .field("network", &self.conf.name)
            .field("cfg", self.cfg)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Ctx<'_> {
    fn key(&self) -> AttachmentKey {
        AttachmentKey {
            network: self.conf.name.clone(),
            container_id: self.env.container_id().to_string(),
            ifname: self.env.ifname().to_string(),
        }
    }

    /// One conversation with the agent, ending by `deadline` at the latest.
    fn agent(&self, req: &Request, deadline: Deadline) -> Result<Response, PluginError> {
        debug!(?req, socket = %self.cfg.agent_socket.display(), "calling the agent");
        self.backend
            .call_agent(&self.cfg.agent_socket, req, deadline.at())
            .map_err(|source| PluginError::Agent {
                socket: self.cfg.agent_socket.clone(),
                source,
            })
    }

    /// The agent's share of a verb with local work after the answer: the call's deadline
    /// less [`LOCAL_WORK_RESERVE`].
    fn agent_deadline(&self) -> Deadline {
        self.deadline.reserving(LOCAL_WORK_RESERVE)
    }

    fn host_veth(&self) -> String {
        host_veth_for(self.cfg, self.env)
    }

    /// ADD and CHECK need a usable namespace that is not ours.
    fn require_netns(&self) -> Result<&Path, PluginError> {
        // Env validation guarantees CNI_NETNS for ADD and CHECK.
        let path = self
            .env
            .netns
            .as_deref()
            .ok_or_else(|| PluginError::NetnsMissing { path: "".into() })?;
        match self.backend.probe_netns(path) {
            NetnsState::Usable => Ok(path),
            NetnsState::Missing => Err(PluginError::NetnsMissing { path: path.into() }),
            NetnsState::Own => Err(PluginError::NetnsIsOwn { path: path.into() }),
            NetnsState::Unusable(reason) => Err(PluginError::NetnsUnusable {
                path: path.into(),
                reason,
            }),
        }
    }
}

/// The host-side veth name: the reference's `<prefix>` + 11 hex of SHA-1(`<ns>.<pod>`).
/// Without Kubernetes identity (plain cnitool), SHA-1(`<container id>.<ifname>`) instead.
/// An additional interface of a pod (ifname other than eth0) hashes `<pod>.<ifname>` so
/// that it does not collide with the pod's eth0 veth.
pub fn host_veth_for(cfg: &PluginConfig, env: &Env) -> String {
    match env.args.pod() {
        Some((ns, name)) if env.ifname() == "eth0" => {
            dataplane::host_veth_name(&cfg.veth_prefix, ns, name)
        }
        Some((ns, name)) => {
            dataplane::host_veth_name(&cfg.veth_prefix, ns, &format!("{name}.{}", env.ifname()))
        }
        None => dataplane::host_veth_name(&cfg.veth_prefix, env.container_id(), env.ifname()),
    }
}

/// The IPv4 address `prev` gives the container interface `ifname`.
pub fn prev_result_ip(prev: &CniResult, ifname: &str) -> Option<Ipv4Addr> {
    let v4 = |ip: &IpConfig| match ip.address.addr() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    };
    let idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty()));
    match idx {
        Some(idx) => prev
            .ips
            .iter()
            .filter(|ip| ip.interface == Some(idx))
            .find_map(v4),
        // A result without our interface (e.g. delegated IPAM shape): the only IPv4 address
        // not bound to another interface.
        None => prev
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none())
            .find_map(v4),
    }
}

pub fn add(ctx: &Ctx) -> Result<Value, PluginError> {
    let netns = ctx.require_netns()?;
    let key = ctx.key();
    let pod = PodRef {
        namespace: ctx.env.args.pod_namespace.clone().unwrap_or_default(),
        name: ctx.env.args.pod_name.clone().unwrap_or_default(),
        infra_container_id: ctx.env.args.infra_container_id.clone(),
    };
    let req = Request::Add {
        key: key.clone(),
        pod,
        netns: netns.to_string_lossy().into_owned(),
    };
    let (alloc, existing) = match ctx.agent(&req, ctx.agent_deadline())? {
        Response::Added {
            allocation,
            existing,
        } => (allocation, existing),
        Response::Error { code, message } => {
            return Err(PluginError::AgentRefused { code, message });
        }
        other => {
            return Err(PluginError::AgentUnexpected {
                request: "ADD",
                got: format!("{other:?}"),
            });
        }
    };
    info!(%key, ip = %alloc.ip, eni = %alloc.eni_id, table = alloc.route_table, "address assigned");

    let host_veth = ctx.host_veth();
    let spec = PodSpec {
        netns,
        host_veth: &host_veth,
        ifname: ctx.env.ifname(),
        ip: alloc.ip,
        mtu: ctx.cfg.mtu,
        route_table: alloc.route_table,
    };
    let links = match ctx.backend.setup_pod(&spec) {
        Ok(links) => links,
        Err(source) if existing => {
            // A repeated ADD for an attachment that already holds this address (the spec
            // forbids it, but a runtime may do it): the address may be in use by the first
            // ADD's interface, so it must not be released here. The runtime's DEL releases it.
            warn!(%key, ip = %alloc.ip, reason = %source, "pod setup failed on a repeated ADD; the address stays assigned");
            return Err(PluginError::Setup {
                ip: alloc.ip,
                source,
                release: Release::Kept,
            });
        }
        Err(source) => {
            // setup_pod removes whatever it created before failing; give the address back,
            // in what is left of the call (the reserve kept for this).
            warn!(%key, ip = %alloc.ip, reason = %source, "pod setup failed; releasing the address");
            let release = match ctx.agent(&Request::Del { key: key.clone() }, ctx.deadline) {
                Ok(Response::Deleted { .. }) => Release::Released,
                Ok(other) => Release::Failed(format!("agent answered {other:?}")),
                Err(e) => Release::Failed(e.to_string()),
            };
            return Err(PluginError::Setup {
                ip: alloc.ip,
                source,
                release,
            });
        }
    };
    info!(%key, host_veth = %links.host_veth, "pod network set up");

    let gw = IpAddr::V4(POD_GATEWAY);
    let ours = CniResult {
        interfaces: vec![
            Interface {
                name: links.host_veth,
                mac: Some(links.host_mac),
                mtu: Some(ctx.cfg.mtu),
                ..Default::default()
            },
            Interface {
                name: links.container_ifname,
                mac: Some(links.container_mac),
                mtu: Some(ctx.cfg.mtu),
                sandbox: Some(netns.to_string_lossy().into_owned()),
                ..Default::default()
            },
        ],
        ips: vec![IpConfig {
            address: IpNet::V4(Ipv4Net::new(alloc.ip, 32).expect("32 is a valid prefix")),
            gateway: Some(gw),
            interface: Some(1),
        }],
        routes: vec![Route::new(
            IpNet::V4(Ipv4Net::default()), // 0.0.0.0/0
            Some(gw),
        )],
        dns: ctx.cfg.dns.clone(),
    };
    // Chained: keep what earlier plugins reported and append ours.
    let mut result = ctx.conf.prev_result.clone().unwrap_or_default();
    result.append(ours);
    Ok(result.to_json(ctx.conf.cni_version))
}

pub fn del(ctx: &Ctx) -> Result<(), PluginError> {
    let key = ctx.key();
    let prev_ip = ctx
        .conf
        .prev_result
        .as_ref()
        .and_then(|p| prev_result_ip(p, ctx.env.ifname()));
    let mut refused = None;
    // the reserve keeps time for the teardown even when the agent does not answer
    let ip = match ctx.agent(&Request::Del { key: key.clone() }, ctx.agent_deadline()) {
        Ok(Response::Deleted {
            released: Some(alloc),
        }) => {
            info!(%key, ip = %alloc.ip, "address released");
            if prev_ip.is_some_and(|p| p != alloc.ip) {
                warn!(%key, agent = %alloc.ip, prev_result = ?prev_ip, "agent and prevResult disagree on the address");
            }
            Some(alloc.ip)
        }
        Ok(Response::Deleted { released: None }) => {
            info!(%key, "the agent does not know this attachment (already deleted?)");
            prev_ip
        }
        Ok(Response::Error { code, message }) if code == cni::code::UNKNOWN_CONTAINER => {
            info!(%key, %message, "the agent does not know this attachment");
            prev_ip
        }
        Ok(Response::Error { code, message }) => {
            warn!(%key, code, %message, "the agent refused DEL; tearing down anyway");
            refused = Some(PluginError::AgentRefused { code, message });
            prev_ip
        }
        Ok(other) => {
            warn!(%key, ?other, "unexpected reply to DEL; tearing down from prevResult");
            prev_ip
        }
        Err(e) => {
            warn!(%key, error = %e, "vpc-cni agent unavailable; tearing down from prevResult, the agent will reconcile the address");
            prev_ip
        }
    };

    let netns = match ctx.env.netns.as_deref() {
        None => None,
        Some(p) => match ctx.backend.probe_netns(p) {
            NetnsState::Usable => Some(p),
            NetnsState::Missing => {
                debug!(netns = %p.display(), "netns already gone");
                None
            }
            NetnsState::Own => {
                warn!(netns = %p.display(), "CNI_NETNS is the plugin's own namespace; leaving it alone");
                None
            }
            NetnsState::Unusable(reason) => {
                info!(netns = %p.display(), %reason, "netns not usable; host side only");
                None
            }
        },
    };
    let host_veth = ctx.host_veth();
    let t = PodTeardown {
        netns,
        host_veth: Some(&host_veth),
        ifname: ctx.env.ifname(),
        ip,
    };
    ctx.backend
        .teardown_pod(&t)
        .map_err(|source| PluginError::Teardown { source })?;
    info!(%key, %host_veth, ip = ?ip, "pod network torn down");
    match refused {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub fn check(ctx: &Ctx) -> Result<(), PluginError> {
    let prev = ctx.conf.prev_result.as_ref().ok_or_else(|| {
        PluginError::Cni(cni::config::invalid(
            "prevResult",
            "is required for CHECK".into(),
        ))
    })?;
    let netns = ctx.require_netns()?;
    let ifname = ctx.env.ifname();
    let key = ctx.key();
    let expected = prev_result_ip(prev, ifname).ok_or_else(|| PluginError::Check {
        what: format!("prevResult has no IPv4 address for interface {ifname}"),
    })?;
    let host_veth = ctx.host_veth();
    if !prev.interfaces.is_empty()
        && !prev
            .interfaces
            .iter()
            .any(|i| i.name == host_veth && i.sandbox.as_deref().is_none_or(str::is_empty))
    {
        return Err(PluginError::Check {
            what: format!("prevResult does not list the host interface {host_veth}"),
        });
    }
    let alloc = match ctx.agent(&Request::Check { key: key.clone() }, ctx.agent_deadline())? {
        Response::Checked { allocation } => allocation,
        Response::Error { code, message } => {
            return Err(PluginError::AgentRefused { code, message });
        }
        other => {
            return Err(PluginError::AgentUnexpected {
                request: "CHECK",
                got: format!("{other:?}"),
            });
        }
    };
    if alloc.ip != expected {
        return Err(PluginError::Check {
            what: format!(
                "the agent has {} for {key}, but prevResult says {expected}",
                alloc.ip
            ),
        });
    }
    let spec = PodSpec {
        netns,
        host_veth: &host_veth,
        ifname,
        ip: alloc.ip,
        mtu: ctx.cfg.mtu,
        route_table: alloc.route_table,
    };
    ctx.backend
        .check_pod(&spec)
        .map_err(PluginError::CheckWiring)
}

pub fn status(ctx: &Ctx) -> Result<(), PluginError> {
    match ctx.agent(&Request::Status, ctx.deadline) {
        Ok(Response::Status(s)) if s.ready => Ok(()),
        Ok(Response::Status(s)) => Err(PluginError::NotAvailable {
            reason: format!(
                "the vpc-cni agent is not ready: {} ({} free, {} assigned addresses)",
                s.message, s.free_ips, s.assigned_ips
            ),
        }),
        Ok(Response::Error { code, message }) => Err(PluginError::NotAvailable {
            reason: format!("the vpc-cni agent answered STATUS with error {code}: {message}"),
        }),
        Ok(other) => Err(PluginError::NotAvailable {
            reason: format!("the vpc-cni agent answered STATUS with {other:?}"),
        }),
        Err(e) => Err(PluginError::NotAvailable {
            reason: e.to_cni().to_string(),
        }),
    }
}

pub fn gc(ctx: &Ctx) -> Result<(), PluginError> {
    let valid = ctx.conf.valid_attachments.as_ref().ok_or_else(|| {
        PluginError::Cni(cni::config::invalid(
            cni::config::VALID_ATTACHMENTS_KEY,
            "is required for GC".into(),
        ))
    })?;
    let valid: Vec<AttachmentKey> = valid
        .iter()
        .map(|a| AttachmentKey {
            network: ctx.conf.name.clone(),
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    let req = Request::Gc {
        network: ctx.conf.name.clone(),
        valid,
    };
    let released = match ctx.agent(&req, ctx.agent_deadline())? {
        Response::Collected { released } => released,
        Response::Error { code, message } => {
            return Err(PluginError::AgentRefused { code, message });
        }
        other => {
            return Err(PluginError::AgentUnexpected {
                request: "GC",
                got: format!("{other:?}"),
            });
        }
    };
    let mut failed = Vec::new();
    let mut skipped = Vec::new();
    for (key, ip) in &released {
        if ctx.deadline.is_past() {
            skipped.push((key.clone(), *ip));
            continue;
        }
        info!(%key, %ip, "garbage-collected attachment; removing its host routes and rules");
        let t = PodTeardown {
            netns: None,
            host_veth: None,
            ifname: &key.ifname,
            ip: Some(*ip),
        };
        if let Err(error) = ctx.backend.teardown_pod(&t) {
            failed.push(GcFailure {
                key: key.clone(),
                ip: *ip,
                error,
            });
        }
    }
    if !skipped.is_empty() {
        warn!(
            count = skipped.len(),
            "the deadline ran out before every released attachment was torn down"
        );
        Err(PluginError::GcOutOfTime { failed, skipped })
    } else if failed.is_empty() {
        Ok(())
    } else {
        Err(PluginError::GcTeardown { failed })
    }
}
