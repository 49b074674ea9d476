//! The lab's state files: what `up` leaves for the other commands, and the published world.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use lab_aws::world::World;
use serde::{Deserialize, Serialize};

use crate::paths;

/// What `up` leaves for the other commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub vpc_id: String,
    pub moto: SocketAddr,
    pub region: String,
}

impl LabState {
    pub fn load() -> Result<LabState> {
        let p = paths::state_file();
        let s = std::fs::read_to_string(&p).with_context(|| {
            format!("reading {} — is the lab up? run `vpc-lab up`", p.display())
        })?;
        serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn save(&self) -> Result<()> {
        let p = paths::state_file();
        std::fs::write(&p, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", p.display()))
    }

    /// An EC2 client for this lab's moto (no environment involved).
    pub fn ec2(&self) -> cloud::Ec2 {
        cloud::Ec2::for_endpoint(&format!("http://{}", self.moto), &self.region)
    }
}

/// The World as last published by `up` or the daemon.
pub fn load_world() -> Result<World> {
    let p = paths::world_file();
    let s = std::fs::read_to_string(&p)
        .with_context(|| format!("reading {} — is the lab up? run `vpc-lab up`", p.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))
}

/// Publishes the world atomically (temp file, rename).
pub fn write_world(world: &World) -> Result<()> {
    let p = paths::world_file();
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(world)?)?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// The region the lab uses when none is set.
pub fn region() -> String {
    std::env::var("AWS_REGION").unwrap_or_else(|_| "us-west-2".to_string())
}
