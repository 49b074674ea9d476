//! Instance identity and attached ENIs from IMDSv2 (reference §3.7), through the SDK's own
//! `aws_config::imds::Client` (token handling, caching, retries).

use std::future::Future;
use std::net::Ipv4Addr;

use aws_config::imds::client::error::ImdsError;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::CloudError;
use crate::parse;

/// The SDK's standard variable naming the IMDS endpoint.
pub const ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";

const META: &str = "/latest/meta-data/";
const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";

/// What IMDS says about this instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMetadata {
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    pub availability_zone: String,
    /// MAC of the primary ENI (`mac`).
    pub primary_mac: String,
    /// Primary IP of the primary ENI (`local-ipv4`).
    pub local_ipv4: Ipv4Addr,
    /// Attached ENIs with IPv4 addresses, sorted by device number.
    pub enis: Vec<EniMetadata>,
}

impl InstanceMetadata {
    /// The ENI at device number 0, if IMDS listed it.
    pub fn primary_eni(&self) -> Option<&EniMetadata> {
        self.enis.iter().find(|e| e.device_number == 0)
    }
}

/// One attached ENI as IMDS describes it (`network/interfaces/macs/<mac>/…`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniMetadata {
    pub mac: String,
    pub interface_id: String,
    pub device_number: u32,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    /// First entry of `local-ipv4s`.
    pub primary_ip: Ipv4Addr,
    /// The other entries of `local-ipv4s`, in IMDS order.
    pub secondary_ips: Vec<Ipv4Addr>,
    /// `ipv4-prefix` (empty when IMDS answers 404).
    pub prefixes: Vec<Ipv4Net>,
}

/// A source of instance metadata (IMDS in production, fakes in tests).
pub trait Metadata {
    fn instance(&self) -> impl Future<Output = Result<InstanceMetadata, CloudError>> + Send;
}

/// IMDSv2 through `aws_config::imds::Client`.
#[derive(Debug, Clone)]
pub struct ImdsMetadata {
    client: aws_config::imds::Client,
}

impl ImdsMetadata {
    /// A client configured the SDK's standard way: `AWS_EC2_METADATA_SERVICE_ENDPOINT` if set
    /// (validated here), otherwise the profile / endpoint-mode chain, otherwise 169.254.169.254.
    pub fn from_env() -> Result<Self, CloudError> {
        match std::env::var(ENDPOINT_ENV) {
            Ok(endpoint) if !endpoint.is_empty() => Self::with_endpoint(&endpoint),
            _ => Ok(ImdsMetadata {
                client: aws_config::imds::Client::builder().build(),
            }),
        }
    }

    /// A client for an explicit endpoint such as `http://127.0.0.1:1338`.
    pub fn with_endpoint(endpoint: &str) -> Result<Self, CloudError> {
        let builder = aws_config::imds::Client::builder()
            .endpoint(endpoint)
            .map_err(|e| CloudError::ImdsConfig {
                endpoint: endpoint.to_owned(),
                message: e.to_string(),
            })?;
        Ok(ImdsMetadata {
            client: builder.build(),
        })
    }

    /// GET a path; a 404 is `Ok(None)`.
    async fn get_optional(&self, path: &str) -> Result<Option<String>, CloudError> {
        match self.client.get(path).await {
            Ok(v) => Ok(Some(String::from(v))),
            Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(CloudError::Imds {
                path: path.to_owned(),
                message: imds_error_message(&e),
            }),
        }
    }

    /// GET a path that must exist.
    async fn get(&self, path: &str) -> Result<String, CloudError> {
        self.get_optional(path)
            .await?
            .ok_or_else(|| CloudError::Imds {
                path: path.to_owned(),
                message: "404 Not Found".to_owned(),
            })
    }

    async fn meta(&self, rel: &str) -> Result<String, CloudError> {
        Ok(self.get(&format!("{META}{rel}")).await?.trim().to_owned())
    }

    async fn eni(&self, mac: &str) -> Result<Option<EniMetadata>, CloudError> {
        let base = format!("{META}network/interfaces/macs/{mac}/");
        let p = |leaf: &str| format!("{base}{leaf}");

        let ips_path = p("local-ipv4s");
        let Some(ips_text) = self.get_optional(&ips_path).await? else {
            tracing::warn!(
                mac,
                "IMDS lists no local-ipv4s for this ENI (EFA-only?); skipping it"
            );
            return Ok(None);
        };
        let ips = parse::lines(&ips_text)
            .map(|s| parse::imds_value(&ips_path, s, parse::ipv4))
            .collect::<Result<Vec<_>, _>>()?;
        let Some((&primary_ip, secondary)) = ips.split_first() else {
            return Err(CloudError::ImdsValue {
                path: ips_path,
                value: ips_text,
                reason: "no address listed".to_owned(),
            });
        };

        let device_path = p("device-number");
        let device_number =
            parse::imds_value(&device_path, &self.get(&device_path).await?, parse::number)?;
        let interface_id = self.get(&p("interface-id")).await?.trim().to_owned();
        let subnet_id = self.get(&p("subnet-id")).await?.trim().to_owned();
        let vpc_id = self.get(&p("vpc-id")).await?.trim().to_owned();
        let security_groups = self
            .get_optional(&p("security-group-ids"))
            .await?
            .map(|t| parse::lines(&t).map(str::to_owned).collect())
            .unwrap_or_default();

        let prefix_path = p("ipv4-prefix");
        let prefixes = match self.get_optional(&prefix_path).await? {
            Some(t) => parse::lines(&t)
                .map(|s| parse::imds_value(&prefix_path, s, parse::ipv4_net))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };

        let subnet_path = p("subnet-ipv4-cidr-block");
        let subnet_cidr = parse::imds_value(
            &subnet_path,
            self.get(&subnet_path).await?.trim(),
            parse::ipv4_net,
        )?;

        let vpc_path = p("vpc-ipv4-cidr-blocks");
        let vpc_cidrs = parse::lines(&self.get(&vpc_path).await?)
            .map(|s| parse::imds_value(&vpc_path, s, parse::ipv4_net))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Some(EniMetadata {
            mac: mac.to_owned(),
            interface_id,
            device_number,
            subnet_id,
            subnet_cidr,
            vpc_id,
            vpc_cidrs,
            security_groups,
            primary_ip,
            secondary_ips: secondary.to_vec(),
            prefixes,
        }))
    }

    async fn read_instance(&self) -> Result<InstanceMetadata, CloudError> {
        let instance_id = self.meta("instance-id").await?;
        let instance_type = self.meta("instance-type").await?;
        let availability_zone = self.meta("placement/availability-zone").await?;
        let primary_mac = self.meta("mac").await?;
        let local_path = format!("{META}local-ipv4");
        let local_ipv4 = parse::imds_value(
            &local_path,
            self.get(&local_path).await?.trim(),
            parse::ipv4,
        )?;
        let document = self.get(IDENTITY_DOCUMENT).await?;
        let region = parse::imds_value(IDENTITY_DOCUMENT, &document, parse::identity_region)?;

        let macs_path = format!("{META}network/interfaces/macs/");
        let macs = parse::imds_value(&macs_path, &self.get(&macs_path).await?, parse::mac_listing)?;
        let mut enis = Vec::with_capacity(macs.len());
        for mac in &macs {
            if let Some(eni) = self.eni(mac).await? {
                enis.push(eni);
            }
        }
        enis.sort_by_key(|e| e.device_number);

        Ok(InstanceMetadata {
            instance_id,
            instance_type,
            region,
            availability_zone,
            primary_mac,
            local_ipv4,
            enis,
        })
    }
}

impl Metadata for ImdsMetadata {
    fn instance(&self) -> impl Future<Output = Result<InstanceMetadata, CloudError>> + Send {
        self.read_instance()
    }
}

fn imds_error_message(e: &ImdsError) -> String {
    match e {
        ImdsError::ErrorResponse(r) => format!("HTTP {}", r.response().status().as_u16()),
        other => aws_sdk_ec2::error::DisplayErrorContext(other).to_string(),
    }
}
