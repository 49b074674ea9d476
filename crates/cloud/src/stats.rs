//! Every EC2 request attempt, counted by API name and outcome, and the retry policy that goes
//! with them: one client-side rate limiter for the whole process (the SDK's adaptive retry
//! mode, which slows down when EC2 throttles), retries with jittered exponential backoff on
//! throttling (`RequestLimitExceeded`) and 5xx, and no retry quota that would stop retrying in
//! the middle of a throttling storm.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::config::interceptors::FinalizerInterceptorContextRef;
use aws_sdk_ec2::config::retry::{RetryConfig, RetryPartition, TokenBucket};
use aws_sdk_ec2::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use serde::{Deserialize, Serialize};

/// Attempts of one EC2 API, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCount {
    /// Every HTTP attempt, retries included.
    pub attempts: u64,
    /// Attempts answered 2xx.
    pub ok: u64,
    /// Attempts answered 503 (EC2's `RequestLimitExceeded` and `Unavailable`).
    pub throttled: u64,
    /// Other 4xx/5xx answers, and attempts with no answer at all (connection errors).
    pub failed: u64,
}

/// Counts shared by every clone of one [`crate::Ec2`].
#[derive(Clone, Debug, Default)]
pub struct ApiStats(Arc<Mutex<BTreeMap<String, ApiCount>>>);

impl ApiStats {
    pub fn snapshot(&self) -> BTreeMap<String, ApiCount> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, api: &str, status: Option<u16>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(api.to_owned()).or_default();
        c.attempts += 1;
        match status {
            Some(200..=299) => c.ok += 1,
            Some(503) => c.throttled += 1,
            _ => c.failed += 1,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Counter(pub(crate) ApiStats);

impl Intercept for Counter {
    fn name(&self) -> &'static str {
        "vpc-cni-api-counter"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let api = cfg
            .load::<Metadata>()
            .map(|m| m.name())
            .unwrap_or("unknown");
        let status = context.response().map(|r| r.status().as_u16());
        self.0.record(api, status);
        Ok(())
    }
}

/// Attempts per call: at 30 % throttling, 8 attempts all fail with probability 0.3^8 ≈ 7e-5.
pub const MAX_ATTEMPTS: u32 = 8;

pub(crate) fn retry_config() -> RetryConfig {
    RetryConfig::adaptive()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(Duration::from_millis(100))
        .with_max_backoff(Duration::from_secs(5))
}

/// One partition per client: its adaptive rate limiter is shared by every call of the process,
/// and its retry token bucket is unlimited (the reference's "retry quota" gives up retrying
/// exactly when throttling is heaviest).
pub(crate) fn retry_partition() -> RetryPartition {
    RetryPartition::custom("vpc-cni-ec2")
        .token_bucket(TokenBucket::unlimited())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_by_api() {
        let s = ApiStats::default();
        s.record("AssignPrivateIpAddresses", Some(200));
        s.record("AssignPrivateIpAddresses", Some(503));
        s.record("AssignPrivateIpAddresses", Some(200));
        s.record("CreateNetworkInterface", Some(400));
        s.record("CreateNetworkInterface", None);
        let snap = s.snapshot();
        assert_eq!(
            snap["AssignPrivateIpAddresses"],
            ApiCount {
                attempts: 3,
                ok: 2,
                throttled: 1,
                failed: 0
            }
        );
        assert_eq!(snap["CreateNetworkInterface"].failed, 2);
    }
}
