//! The lab daemon: keeps the fabric and the instances' interfaces in line with EC2, and serves
//! IMDS and the EC2 fidelity proxy inside every instance namespace, the lab's Kubernetes API
//! (`crate::kube`) there and on a root-namespace loopback port, and the whoami service on the
//! internet.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use lab_aws::ec2proxy::Proxy;
use lab_aws::fidelity;
use lab_aws::world::World;
use lab_net::{fabric, ns};
use testkit::procs;

use crate::store::{self, LabState};
use crate::{kube, paths};

pub const IMDS_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 1338);
pub const EC2_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 1339);
pub const WHOAMI_PORT: u16 = 8080;

/// What a process inside an instance's namespace needs to use the lab's AWS as an EC2
/// instance's own software would: the IMDS and EC2 endpoints this daemon serves there, the
/// region, and the test credentials moto accepts (on EC2: the default IMDS address, the
/// region from IMDS, the instance profile's credentials).
pub fn node_env(region: &str) -> Vec<(String, String)> {
    let url =
        |(ip, port): ([u8; 4], u16)| format!("http://{}:{port}", std::net::Ipv4Addr::from(ip));
    [
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", url(IMDS_ADDR)),
        ("AWS_ENDPOINT_URL_EC2", url(EC2_ADDR)),
        ("AWS_REGION", region.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The marker checked in /proc/<pid>/cmdline before signalling the daemon.
pub const MARKER: &[&str] = &["vpc-lab", "daemon"];

/// Starts `vpc-lab daemon` detached and waits until it serves. (The daemon reads the lab's
/// state file for moto's address and the VPC.)
pub fn spawn() -> Result<()> {
    let exe = paths::exe_dir()?.join("vpc-lab");
    if !exe.is_file() {
        bail!(
            "{} not found: build it with `cargo build -p vpc-lab`",
            exe.display()
        );
    }
    let mut cmd = Command::new(exe);
    cmd.arg("daemon");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let log = paths::daemon_log();
    let pid = procs::spawn_detached(cmd, &log, &paths::daemon_pid())?;
    let t = Instant::now();
    while !paths::daemon_ready().exists() {
        if !procs::alive(pid as i32) {
            bail!(
                "the lab daemon (pid {pid}) exited during start-up; last lines of {}:\n{}",
                log.display(),
                procs::tail(&log, 30)
            );
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "the lab daemon (pid {pid}) was not ready after 30 s; last lines of {}:\n{}",
                log.display(),
                procs::tail(&log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Serves IMDS and the EC2 fidelity proxy inside an instance's namespace.
fn serve_instance(
    name: &str,
    id: &str,
    imds_rx: &watch::Receiver<World>,
    proxy: &Arc<Proxy>,
) -> Result<()> {
    let ins = ns::instance_ns(name);
    let imds_l =
        ns::bind_tcp(&ins, IMDS_ADDR.into()).with_context(|| format!("binding IMDS in {ins}"))?;
    let ec2_l = ns::bind_tcp(&ins, EC2_ADDR.into())
        .with_context(|| format!("binding the EC2 proxy in {ins}"))?;
    let imds_l = tokio::net::TcpListener::from_std(imds_l)?;
    let ec2_l = tokio::net::TcpListener::from_std(ec2_l)?;
    let router = lab_aws::imds::router(imds_rx.clone(), id.to_string());
    let n = name.to_string();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(imds_l, router).await {
            tracing::error!(instance = %n, "IMDS server failed: {e}");
        }
    });
    tokio::spawn(proxy.clone().serve(ec2_l, name.to_string()));
    tracing::info!(
        instance = name,
        instance_id = id,
        "serving IMDS on 127.0.0.1:1338 and the EC2 proxy on 127.0.0.1:1339"
    );
    Ok(())
}

/// The world the instances see: ENIs attached less than `delay` ago (by `attached_at`) are
/// not plugged in yet, unless already `plugged` (an interface never goes away while its ENI
/// stays attached). Also returns when the next one is due.
pub fn hot_plugged(
    world: &World,
    attached_at: &HashMap<String, Instant>,
    delay: Duration,
    now: Instant,
    plugged: &BTreeSet<String>,
) -> (World, Option<Instant>) {
    let mut w = world.clone();
    let mut next: Option<Instant> = None;
    if delay.is_zero() {
        return (w, None);
    }
    for i in &mut w.instances {
        i.enis.retain(|e| {
            let due = attached_at.get(&e.id).map(|t| *t + delay);
            match due {
                Some(d) if d > now && e.device_index != 0 && !plugged.contains(&e.id) => {
                    next = Some(next.map_or(d, |n| n.min(d)));
                    false
                }
                _ => true,
            }
        });
    }
    (w, next)
}

/// EC2 states over time, for IMDS's propagation delay.
#[derive(Debug, Default)]
pub struct History {
    /// (when it became EC2's state, the state), oldest first.
    states: VecDeque<(Instant, World)>,
}

impl History {
    pub fn push(&mut self, at: Instant, w: World) {
        if self.states.back().is_some_and(|(_, last)| *last == w) {
            return;
        }
        self.states.push_back((at, w));
    }

    /// The state as it was `delay` ago (the oldest known if the lab is younger than that),
    /// dropping states nobody can ask for any more; also when the next state becomes due.
    pub fn as_of(&mut self, delay: Duration, now: Instant) -> (Option<World>, Option<Instant>) {
        let cut = now.checked_sub(delay);
        // Drop states superseded before the cut.
        while self.states.len() > 1 && cut.is_some_and(|c| self.states[1].0 <= c) {
            self.states.pop_front();
        }
        let Some((_, w)) = self.states.front() else {
            return (None, None);
        };
        let next = self.states.get(1).map(|(t, _)| *t + delay);
        (Some(w.clone()), next)
    }
}

/// The internet host's whoami: answers every TCP connection with the peer's address.
fn serve_whoami() -> Result<()> {
    let l = ns::bind_tcp(ns::INTERNET, (fabric::INTERNET_HOST, WHOAMI_PORT).into())?;
    let l = tokio::net::TcpListener::from_std(l)?;
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((mut s, peer)) => {
                    tracing::debug!(%peer, "whoami");
                    tokio::spawn(async move {
                        let _ = s.write_all(format!("{}\n", peer.ip()).as_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
                Err(e) => {
                    tracing::warn!("whoami accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn apply(world: &World, applied: fabric::Applied) -> (fabric::Applied, Result<()>) {
    let w = world.clone();
    match tokio::task::spawn_blocking(move || {
        let mut a = applied;
        let r = fabric::apply(&w, &mut a);
        (a, r)
    })
    .await
    {
        Ok(x) => x,
        Err(e) => (fabric::Applied::default(), Err(e.into())),
    }
}

/// `vpc-lab daemon`: runs until SIGTERM.
pub fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let state = LabState::load()?;
    let ec2 = state.ec2();
    let world = World::load(&ec2, &state.vpc_id).await?;
    let (applied, r) = apply(&world, fabric::Applied::default()).await;
    r?;
    let mut applied = applied;
    let mut applied_world = world.clone();
    store::write_world(&world)?;
    // EC2's state (for the proxy), what IMDS serves (delayed), what the fabric shows.
    let (ec2_tx, ec2_rx) = watch::channel(world.clone());
    let (imds_tx, imds_rx) = watch::channel(world.clone());
    let proxy = Proxy::new(
        state.moto,
        &state.region,
        ec2_rx,
        paths::knobs_file(),
        Some(paths::ec2_stats_file()),
    );
    let mut history = History::default();
    history.push(Instant::now(), world.clone());
    let mut served = BTreeSet::new();
    for i in &world.instances {
        serve_instance(&i.name, &i.id, &imds_rx, &proxy)?;
        served.insert(i.name.clone());
    }
    serve_whoami()?;
    let kube = kube::serve::Service::start(&world)
        .await
        .context("starting the lab's Kubernetes API")?;
    std::fs::write(paths::daemon_ready(), format!("{}\n", std::process::id()))?;
    tracing::info!(vpc = %state.vpc_id, knobs = ?proxy.knobs().0, "lab daemon ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut due: Option<Instant> = None;
    let mut failed = false;
    loop {
        let wake = due.map_or(Duration::from_secs(1), |d| {
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        });
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: lab daemon exiting");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = proxy.kick.notified() => {}
            _ = tokio::time::sleep(wake) => {}
        }
        let new = match World::load(&ec2, &state.vpc_id).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("reloading the world from EC2: {e:#}");
                continue;
            }
        };
        let now = Instant::now();
        let (knobs, _) = proxy.knobs();
        history.push(now, new.clone());
        ec2_tx.send_if_modified(|w| {
            if *w != new {
                *w = new.clone();
                true
            } else {
                false
            }
        });
        // IMDS: EC2's state as it was imds_delay ago.
        let (imds_world, imds_next) = history.as_of(fidelity::ms(knobs.imds_delay_ms), now);
        if let Some(iw) = imds_world {
            imds_tx.send_if_modified(|w| {
                if *w != iw {
                    tracing::info!(
                        delay_ms = knobs.imds_delay_ms,
                        "IMDS now serves a newer EC2 state"
                    );
                    *w = iw;
                    true
                } else {
                    false
                }
            });
        }
        // The fabric and the instances' interfaces: hot-plug after attach_delay.
        let plugged: BTreeSet<String> = applied_world
            .instances
            .iter()
            .flat_map(|i| i.enis.iter().map(|e| e.id.clone()))
            .collect();
        let (visible, plug_next) = hot_plugged(
            &new,
            &proxy.attach_times(),
            fidelity::ms(knobs.attach_delay_ms),
            now,
            &plugged,
        );
        due = [imds_next, plug_next].into_iter().flatten().min();
        if visible == applied_world && !failed {
            continue;
        }
        tracing::info!("EC2 state changed: re-applying the fabric and instance interfaces");
        let (a, r) = apply(&visible, applied).await;
        applied = a;
        if let Err(e) = r {
            tracing::error!("applying the new world: {e:#}");
            // Retry from scratch on the next tick.
            applied = fabric::Applied::default();
            failed = true;
            continue;
        }
        failed = false;
        for i in &visible.instances {
            if !served.contains(&i.name) {
                match serve_instance(&i.name, &i.id, &imds_rx, &proxy) {
                    Ok(()) => {
                        served.insert(i.name.clone());
                    }
                    Err(e) => tracing::error!(instance = %i.name, "serving IMDS: {e:#}"),
                }
                if let Err(e) = kube.add_instance(&visible, &i.name).await {
                    tracing::error!(instance = %i.name, "serving the Kubernetes API: {e:#}");
                }
            }
        }
        if let Err(e) = store::write_world(&visible) {
            tracing::error!("writing world.json: {e:#}");
        }
        applied_world = visible;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_env_points_at_the_endpoints_served_in_the_instance() {
        let env: HashMap<String, String> = node_env("eu-west-1").into_iter().collect();
        assert_eq!(
            env["AWS_EC2_METADATA_SERVICE_ENDPOINT"],
            "http://127.0.0.1:1338"
        );
        assert_eq!(env["AWS_ENDPOINT_URL_EC2"], "http://127.0.0.1:1339");
        assert_eq!(env["AWS_REGION"], "eu-west-1");
        assert_eq!(env.len(), 5);
    }

    #[test]
    fn hot_plug_hides_fresh_attachments_until_due() {
        let w = lab_aws::world::sample();
        let t0 = Instant::now();
        let mut at = HashMap::new();
        at.insert("eni-1".to_string(), t0);
        let d = Duration::from_millis(500);
        let none = BTreeSet::new();
        let (v, next) = hot_plugged(&w, &at, d, t0 + Duration::from_millis(100), &none);
        assert_eq!(v.instances[0].enis.len(), 1, "eth1 not plugged yet");
        assert_eq!(next, Some(t0 + d));
        let (v, next) = hot_plugged(&w, &at, d, t0 + d, &none);
        assert_eq!(v, w);
        assert_eq!(next, None);
        let (v, _) = hot_plugged(&w, &at, Duration::ZERO, t0, &none);
        assert_eq!(v, w, "no delay: as EC2 says");
        // Once plugged in, an interface stays (e.g. it became visible before the attach time
        // was known).
        let plugged: BTreeSet<String> = ["eni-1".to_string()].into();
        let (v, next) = hot_plugged(&w, &at, d, t0 + Duration::from_millis(100), &plugged);
        assert_eq!((v, next), (w, None));
    }

    #[test]
    fn history_serves_the_state_of_delay_ago() {
        let t0 = Instant::now();
        let a = lab_aws::world::sample();
        let mut b = a.clone();
        b.instances[0].enis[0].secondary_ips.clear();
        let mut h = History::default();
        h.push(t0, a.clone());
        h.push(t0 + Duration::from_secs(1), b.clone());
        h.push(t0 + Duration::from_secs(2), b.clone()); // unchanged: not a new state
        let d = Duration::from_secs(10);
        let (w, next) = h.as_of(d, t0 + Duration::from_secs(5));
        assert_eq!(
            w,
            Some(a.clone()),
            "5 s in, 10 s behind: still the first state"
        );
        assert_eq!(next, Some(t0 + Duration::from_secs(11)));
        let (w, next) = h.as_of(d, t0 + Duration::from_secs(11));
        assert_eq!(w, Some(b.clone()));
        assert_eq!(next, None);
        assert_eq!(h.states.len(), 1, "superseded states dropped");
        let (w, _) = h.as_of(Duration::ZERO, t0 + Duration::from_secs(11));
        assert_eq!(w, Some(b));
    }
}
