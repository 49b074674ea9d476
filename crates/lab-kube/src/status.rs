//! API errors as the real server reports them: a `Status` object (`kind: Status`,
//! `status: Failure`) with the HTTP code, a `reason` and a message naming the bad value.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ListMeta, Status, StatusCause, StatusDetails,
};

use crate::resource::Resource;

/// A failed API call: becomes the `Status` body of the response and its HTTP code.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Box<StatusDetails>>,
}

fn details(resource: Resource, name: &str) -> StatusDetails {
    StatusDetails {
        name: Some(name.to_string()),
        group: (!resource.group().is_empty()).then(|| resource.group().to_string()),
        kind: Some(resource.plural().to_string()),
        ..StatusDetails::default()
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn not_found(resource: Resource, name: &str) -> ApiError {
        ApiError {
            details: Some(Box::new(details(resource, name))),
            ..ApiError::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
        }
    }

    /// A path the server does not serve (an unknown group, version, resource or subresource).
    pub fn no_such_path() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn already_exists(resource: Resource, name: &str) -> ApiError {
        ApiError {
            details: Some(Box::new(details(resource, name))),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            )
        }
    }

    /// A stale `metadata.resourceVersion` on an update.
    pub fn conflict(resource: Resource, name: &str) -> ApiError {
        ApiError::conflict_because(
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn conflict_because(resource: Resource, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(Box::new(details(resource, name))),
            ..ApiError::new(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
            )
        }
    }

    /// A resourceVersion older than the retained history (watch, or a list with `Exact`).
    pub fn expired(asked: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {asked} ({oldest})"),
        )
    }

    /// A resourceVersion newer than the newest change.
    pub fn too_large(asked: u64, current: u64) -> ApiError {
        ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {asked}, current: {current}"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// A patch that cannot be applied to the stored object (a JSON patch's failed `test`,
    /// a path that does not exist).
    pub fn invalid_patch(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    /// Validation failed: `causes` are (field path, what is wrong with it).
    pub fn invalid(resource: Resource, name: &str, causes: Vec<(String, String)>) -> ApiError {
        let list = causes
            .iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect::<Vec<_>>();
        let message = match list.as_slice() {
            [one] => format!("{} \"{name}\" is invalid: {one}", resource.kind()),
            many => format!(
                "{} \"{name}\" is invalid: [{}]",
                resource.kind(),
                many.join(", ")
            ),
        };
        let causes = causes
            .into_iter()
            .map(|(field, message)| StatusCause {
                field: Some(field),
                message: Some(message),
                reason: Some("FieldValueInvalid".to_string()),
            })
            .collect();
        ApiError {
            details: Some(Box::new(StatusDetails {
                name: Some(name.to_string()),
                group: (!resource.group().is_empty()).then(|| resource.group().to_string()),
                kind: Some(resource.kind().to_string()),
                causes: Some(causes),
                ..StatusDetails::default()
            })),
            ..ApiError::new(422, "Invalid", message)
        }
    }

    /// Invalid request options (query parameters), as `ListOptions`/`DeleteOptions` validation.
    pub fn invalid_options(kind: &str, field: &str, message: &str) -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            format!("{kind}.meta.k8s.io \"\" is invalid: {field}: {message}"),
        )
    }

    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource: {method}"),
        )
    }

    pub fn unsupported_media_type(got: &str, accepted: &[&str]) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({got:?}) - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    pub fn not_acceptable(accept: &str) -> ApiError {
        ApiError::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: application/json (Accept: {accept:?})"
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// The `Status` object of this error.
    pub fn status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code)),
            details: self.details.as_deref().cloned(),
            message: Some(self.message.clone()),
            metadata: ListMeta::default(),
            reason: Some(self.reason.to_string()),
            status: Some("Failure".to_string()),
        }
    }
}

/// The `Status` of a successful DELETE that removed the object at once.
pub(crate) fn deleted(resource: Resource, name: &str, uid: Option<String>) -> Status {
    Status {
        details: Some(StatusDetails {
            uid,
            ..details(resource, name)
        }),
        metadata: ListMeta::default(),
        status: Some("Success".to_string()),
        ..Status::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_has_the_real_shape() {
        let v = serde_json::to_value(ApiError::not_found(Resource::Pods, "web").status())
            .expect("serialises");
        assert_eq!(
            v,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "pods \"web\" not found",
                "reason": "NotFound", "details": {"name": "web", "kind": "pods"}, "code": 404
            })
        );
        let e = ApiError::not_found(Resource::EniConfigs, "us-west-2a");
        assert_eq!(
            e.message,
            "eniconfigs.crd.k8s.amazonaws.com \"us-west-2a\" not found"
        );
    }
}
