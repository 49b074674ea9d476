//! The one error type of this crate: every variant names the call (EC2 operation or IMDS path)
//! and, for EC2, the AWS error code, so a log line says what failed and why.

use std::error::Error as StdError;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// An error from EC2 or IMDS.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// An EC2 API call failed (service error, throttling, or transport).
    #[error("EC2 {call} failed: {}: {message}", code.as_deref().unwrap_or("no AWS error code"))]
    Ec2 {
        /// EC2 operation name, e.g. `AssignPrivateIpAddresses`.
        call: &'static str,
        /// AWS error code, e.g. `RequestLimitExceeded`; `None` for transport/timeout failures.
        code: Option<String>,
        /// AWS error message or the transport error chain.
        message: String,
    },
    /// An EC2 answer lacked a field we rely on, or had a value we cannot parse.
    #[error("EC2 {call}: bad answer: {field} {problem}")]
    Ec2Answer {
        call: &'static str,
        field: String,
        problem: String,
    },
    /// An argument given to this crate is unusable (e.g. an empty IP list).
    #[error("EC2 {call}: invalid argument: {detail}")]
    InvalidArgument { call: &'static str, detail: String },
    /// No region could be found in the standard configuration chain.
    #[error("EC2 client: no region configured (set AWS_REGION or a profile region)")]
    NoRegion,
    /// An IMDS GET failed (HTTP error other than an expected 404, token failure, transport).
    #[error("IMDS GET {path} failed: {message}")]
    Imds { path: String, message: String },
    /// An IMDS value could not be parsed.
    #[error("IMDS {path}: invalid value {value:?}: {reason}")]
    ImdsValue {
        path: String,
        value: String,
        reason: String,
    },
    /// The IMDS client could not be built (e.g. AWS_EC2_METADATA_SERVICE_ENDPOINT is not a URI).
    #[error("IMDS client for endpoint {endpoint:?}: {message}")]
    ImdsConfig { endpoint: String, message: String },
}

impl CloudError {
    /// The AWS error code of a failed EC2 call, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            CloudError::Ec2 { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// True for EC2 throttling errors (`RequestLimitExceeded`, `Throttling`, ...).
    pub fn is_throttling(&self) -> bool {
        matches!(
            self.code(),
            Some(
                "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled"
            )
        )
    }

    /// True when EC2 says the named resource does not exist (`*.NotFound`).
    pub fn is_not_found(&self) -> bool {
        self.code().is_some_and(|c| c.ends_with(".NotFound"))
    }

    /// True when EC2 found no free aligned /28 in the subnet for an IPv4 prefix
    /// (`InsufficientCidrBlocks`: a fragmented subnet; single addresses may still be free).
    pub fn is_insufficient_cidr_blocks(&self) -> bool {
        self.code() == Some("InsufficientCidrBlocks")
    }

    pub(crate) fn ec2<E, R>(call: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = err.code().map(str::to_owned);
        let message = match (&err, err.message()) {
            (SdkError::ServiceError(_), Some(m)) => m.to_owned(),
            _ => DisplayErrorContext(&err).to_string(),
        };
        CloudError::Ec2 {
            call,
            code,
            message,
        }
    }

    pub(crate) fn answer(
        call: &'static str,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        CloudError::Ec2Answer {
            call,
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn missing(call: &'static str, field: impl Into<String>) -> Self {
        Self::answer(call, field, "is missing")
    }
}
