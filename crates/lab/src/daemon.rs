//! The lab daemon: keeps the fabric and the instances' interfaces in line with EC2, and serves
//! IMDS and the EC2 relay inside every instance namespace and the whoami service on the internet.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::ctl::{self, State};
use crate::world::World;
use crate::{fabric, ns, procs};

pub const IMDS_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 1338);
pub const EC2_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 1339);
pub const WHOAMI_PORT: u16 = 8080;

fn ready_file() -> PathBuf {
    ctl::run_dir().join("daemon.ready")
}

/// Starts `vpc-lab daemon` detached and waits until it serves.
pub fn spawn(state: &State) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon");
    cmd.env("AWS_ENDPOINT_URL_EC2", format!("http://{}", state.moto))
        .env("AWS_REGION", &state.region)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let log = ctl::run_dir().join("daemon.log");
    let pid = procs::spawn_detached(cmd, &log, &ctl::run_dir().join("daemon.pid"))?;
    let t = Instant::now();
    while !ready_file().exists() {
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

/// Serves IMDS and the EC2 relay inside an instance's namespace.
fn serve_instance(
    name: &str,
    id: &str,
    rx: &watch::Receiver<World>,
    moto: SocketAddr,
) -> Result<()> {
    let ins = ns::instance_ns(name);
    let imds_l =
        ns::bind_tcp(&ins, IMDS_ADDR.into()).with_context(|| format!("binding IMDS in {ins}"))?;
    let ec2_l = ns::bind_tcp(&ins, EC2_ADDR.into())
        .with_context(|| format!("binding the EC2 relay in {ins}"))?;
    let imds_l = tokio::net::TcpListener::from_std(imds_l)?;
    let ec2_l = tokio::net::TcpListener::from_std(ec2_l)?;
    let router = crate::imds::router(rx.clone(), id.to_string());
    let n = name.to_string();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(imds_l, router).await {
            tracing::error!(instance = %n, "IMDS server failed: {e}");
        }
    });
    tokio::spawn(crate::relay::relay(ec2_l, moto));
    tracing::info!(
        instance = name,
        instance_id = id,
        "serving IMDS on 127.0.0.1:1338 and EC2 on 127.0.0.1:1339"
    );
    Ok(())
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

/// `vpc-lab daemon`.
pub async fn run() -> Result<()> {
    let state = State::load()?;
    let ec2 = cloud::Ec2::from_env()
        .await
        .context("configuring the EC2 client for moto")?;
    let world = World::load(&ec2, &state.vpc_id).await?;
    let (applied, r) = apply(&world, fabric::Applied::default()).await;
    r?;
    let mut applied = applied;
    ctl::write_world(&world)?;
    let (tx, rx) = watch::channel(world.clone());
    let mut served = BTreeSet::new();
    for i in &world.instances {
        serve_instance(&i.name, &i.id, &rx, state.moto)?;
        served.insert(i.name.clone());
    }
    serve_whoami()?;
    std::fs::write(ready_file(), format!("{}\n", std::process::id()))?;
    tracing::info!(vpc = %state.vpc_id, "lab daemon ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: lab daemon exiting");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        let new = match World::load(&ec2, &state.vpc_id).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("reloading the world from EC2: {e:#}");
                continue;
            }
        };
        if new == *tx.borrow() {
            continue;
        }
        tracing::info!("EC2 state changed: re-applying the fabric and instance interfaces");
        let (a, r) = apply(&new, applied).await;
        applied = a;
        if let Err(e) = r {
            tracing::error!("applying the new world: {e:#}");
            // Retry from scratch on the next tick.
            applied = fabric::Applied::default();
            continue;
        }
        for i in &new.instances {
            if !served.contains(&i.name) {
                match serve_instance(&i.name, &i.id, &rx, state.moto) {
                    Ok(()) => {
                        served.insert(i.name.clone());
                    }
                    Err(e) => tracing::error!(instance = %i.name, "serving IMDS: {e:#}"),
                }
            }
        }
        if let Err(e) = ctl::write_world(&new) {
            tracing::error!("writing world.json: {e:#}");
        }
        tx.send_replace(new);
    }
}
