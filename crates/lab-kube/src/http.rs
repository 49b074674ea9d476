//! The HTTP face: the real paths (`/api/v1/…`, `/apis/<group>/<version>/…`), discovery,
//! `/version`, query parameters, media types, and `Status` bodies for every error.

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, APIVersions, GroupVersionForDiscovery,
    ServerAddressByClientCIDR,
};
use k8s_openapi::apimachinery::pkg::version::Info;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch as signal;

use crate::api::{self, DeleteOpts, Target};
use crate::resource::{ENICONFIG_GROUP, ENICONFIG_VERSION, Resource};
use crate::select::Selector;
use crate::status::ApiError;
use crate::store::Store;
use crate::watch::{self, Start, Watch};

/// How long a watch lasts without `timeoutSeconds` (the real server picks 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The Kubernetes minor this server answers `/version` with (the k8s-openapi feature used).
const MINOR: &str = "33";

#[derive(Clone, Debug)]
pub(crate) struct App {
    pub store: Store,
    pub stop: signal::Receiver<bool>,
    pub bookmark_interval: Duration,
}

pub(crate) fn router(app: App) -> Router {
    Router::new().fallback(handle).with_state(app)
}

fn json_response(code: u16, body: &impl Serialize) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => error_response(&ApiError::internal(format!("serialising a response: {e}"))),
    }
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&e.status()).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The addressed thing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route<'a> {
    Version,
    Health,
    CoreVersions,
    CoreResources,
    Groups,
    Group,
    GroupResources,
    Object {
        resource: Resource,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
        status: bool,
    },
}

fn route(path: &str) -> Result<Route<'_>, ApiError> {
    let trimmed = path.trim_start_matches('/');
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let segs: Vec<&str> = trimmed.split('/').collect();
    if segs.iter().any(|s| s.is_empty()) && segs != [""] {
        return Err(ApiError::no_such_path());
    }
    match segs.as_slice() {
        ["version"] => Ok(Route::Version),
        ["healthz" | "livez" | "readyz"] => Ok(Route::Health),
        ["api"] => Ok(Route::CoreVersions),
        ["api", "v1"] => Ok(Route::CoreResources),
        ["apis"] => Ok(Route::Groups),
        ["apis", g] if *g == ENICONFIG_GROUP => Ok(Route::Group),
        ["apis", g, v] if *g == ENICONFIG_GROUP && *v == ENICONFIG_VERSION => {
            Ok(Route::GroupResources)
        }
        ["api", "v1", rest @ ..] => object_route("", "v1", rest),
        ["apis", g, v, rest @ ..] => object_route(g, v, rest),
        _ => Err(ApiError::no_such_path()),
    }
}

fn object_route<'a>(group: &str, version: &str, rest: &[&'a str]) -> Result<Route<'a>, ApiError> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return Err(ApiError::no_such_path()),
    };
    let resource = Resource::lookup(group, version, plural).ok_or_else(ApiError::no_such_path)?;
    let placed = match (resource.namespaced(), namespace, name) {
        (true, Some(_), _) | (false, None, _) => true,
        // Namespaced kinds are listed and watched across all namespaces at the top.
        (true, None, None) => true,
        _ => false,
    };
    if !placed {
        return Err(ApiError::no_such_path());
    }
    let status = match sub {
        None => false,
        Some("status") if resource.has_status_subresource() => true,
        Some(_) => return Err(ApiError::no_such_path()),
    };
    Ok(Route::Object {
        resource,
        namespace,
        name,
        status,
    })
}

/// The query parameters this server reads (others are ignored, as the real server does).
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    timeout_seconds: Option<u64>,
    allow_watch_bookmarks: bool,
    send_initial_events: Option<bool>,
    continue_token: Option<String>,
    dry_run: Option<String>,
    grace_period_seconds: Option<i64>,
}

/// Go's `strconv.ParseBool`, which the real server uses for boolean parameters.
fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" | "" => Ok(false),
        other => Err(ApiError::bad_request(format!(
            "query parameter {name}={other:?} is not a boolean"
        ))),
    }
}

fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let mut q = Query::default();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let int = |k: &str, v: &str| {
            v.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("query parameter {k}={v:?} is not an integer"))
            })
        };
        match k.as_ref() {
            "watch" => q.watch = parse_bool(&k, &v)?,
            "resourceVersion" => q.resource_version = Some(v.into_owned()),
            "resourceVersionMatch" => q.resource_version_match = Some(v.into_owned()),
            "labelSelector" => q.label_selector = Some(v.into_owned()),
            "fieldSelector" => q.field_selector = Some(v.into_owned()),
            "timeoutSeconds" => {
                let n = int(&k, &v)?;
                q.timeout_seconds = Some(u64::try_from(n).map_err(|_| {
                    ApiError::bad_request(format!("timeoutSeconds={n} must not be negative"))
                })?);
            }
            "allowWatchBookmarks" => q.allow_watch_bookmarks = parse_bool(&k, &v)?,
            "sendInitialEvents" => q.send_initial_events = Some(parse_bool(&k, &v)?),
            "continue" => q.continue_token = Some(v.into_owned()).filter(|c| !c.is_empty()),
            "dryRun" => q.dry_run = Some(v.into_owned()).filter(|d| !d.is_empty()),
            "gracePeriodSeconds" => q.grace_period_seconds = Some(int(&k, &v)?),
            "limit" => {
                int(&k, &v)?;
            }
            _ => {}
        }
    }
    Ok(q)
}

/// A resourceVersion parameter: empty or absent is `None`.
fn parse_rv(v: Option<&str>) -> Result<Option<u64>, ApiError> {
    match v.unwrap_or_default() {
        "" => Ok(None),
        s => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("resourceVersion {s:?} is not an integer"))),
    }
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// A request body that must be a JSON object (POST, PUT).
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let media = media_type(headers);
    if media != "application/json" {
        return Err(ApiError::unsupported_media_type(
            &media,
            &["application/json"],
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

/// Refuses an `Accept` that admits no JSON (protobuf only, say).
fn check_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let ok = accept.split(',').any(|part| {
        let media = part.split(';').next().unwrap_or_default().trim();
        matches!(media, "application/json" | "application/*" | "*/*" | "")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::not_acceptable(accept))
    }
}

async fn handle(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    tracing::debug!(%method, %uri, "lab-kube request");
    let out = dispatch(&app, &method, &uri, &headers, &body);
    if let Err(e) = &out {
        tracing::debug!(%method, %uri, code = e.code, reason = e.reason, message = %e.message, "lab-kube refused");
    }
    out.unwrap_or_else(|e| error_response(&e))
}

fn dispatch(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let r = route(uri.path())?;
    check_accept(headers)?;
    let q = parse_query(uri.query())?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let Route::Object {
        resource,
        namespace,
        name,
        status,
    } = r
    else {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
        return Ok(discovery(r, host));
    };
    if q.dry_run.is_some() {
        return Err(ApiError::bad_request(
            "dryRun is not implemented by lab-kube",
        ));
    }
    let Some(name) = name else {
        return match *method {
            Method::GET if q.watch => start_watch(app, resource, namespace, &q),
            Method::GET => list(app, resource, namespace, &q),
            Method::POST if namespace.is_some() || !resource.namespaced() => {
                let v = api::create(&app.store, resource, namespace, json_body(headers, body)?)?;
                Ok(json_response(201, &v))
            }
            _ => Err(ApiError::method_not_allowed(method.as_str())),
        };
    };
    let target = Target {
        resource,
        namespace,
        name,
        status,
    };
    match *method {
        Method::GET => Ok(json_response(
            200,
            &api::get(&app.store, resource, namespace, name)?,
        )),
        Method::PUT => {
            let (code, v) = api::replace(&app.store, target, json_body(headers, body)?)?;
            Ok(json_response(code, &v))
        }
        Method::PATCH => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let (code, v) = api::patch(&app.store, target, ct, body)?;
            Ok(json_response(code, &v))
        }
        Method::DELETE if !status => {
            let opts = delete_opts(body, &q)?;
            let (code, v) = api::delete(&app.store, resource, namespace, name, &opts)?;
            Ok(json_response(code, &v))
        }
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

/// `DeleteOptions` from the body (kube-rs sends them there) or the query.
fn delete_opts(body: &[u8], q: &Query) -> Result<DeleteOpts, ApiError> {
    let mut opts = DeleteOpts {
        grace_period_seconds: q.grace_period_seconds,
        ..DeleteOpts::default()
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(opts);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
    })?;
    if v.get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|d| !d.is_empty())
    {
        return Err(ApiError::bad_request(
            "dryRun is not implemented by lab-kube",
        ));
    }
    if let Some(g) = v.get("gracePeriodSeconds").filter(|g| !g.is_null()) {
        opts.grace_period_seconds = Some(g.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!(
                "DeleteOptions.gracePeriodSeconds {g} is not an integer"
            ))
        })?);
    }
    let pre = |k: &str| {
        v.pointer(&format!("/preconditions/{k}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    opts.uid = pre("uid");
    opts.resource_version = pre("resourceVersion");
    Ok(opts)
}

fn selector(resource: Resource, q: &Query) -> Result<Selector, ApiError> {
    Selector::parse(
        resource,
        q.label_selector.as_deref(),
        q.field_selector.as_deref(),
    )
    .map_err(ApiError::bad_request)
}

fn list(
    app: &App,
    resource: Resource,
    namespace: Option<&str>,
    q: &Query,
) -> Result<Response, ApiError> {
    if q.continue_token.is_some() {
        return Err(ApiError::bad_request(
            "continue key is not valid: lab-kube answers every list whole and issues no continue tokens",
        ));
    }
    let rv = parse_rv(q.resource_version.as_deref())?;
    let exact = match q.resource_version_match.as_deref() {
        None | Some("") => false,
        Some(_) if q.resource_version.as_deref().unwrap_or_default().is_empty() => {
            return Err(ApiError::invalid_options(
                "ListOptions",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        Some("NotOlderThan") => false,
        Some("Exact") if rv == Some(0) => {
            return Err(ApiError::invalid_options(
                "ListOptions",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
        Some("Exact") => true,
        Some(other) => {
            return Err(ApiError::invalid_options(
                "ListOptions",
                "resourceVersionMatch",
                &format!(
                    "Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                ),
            ));
        }
    };
    let sel = selector(resource, q)?;
    let (items, current) = api::list(&app.store, resource, namespace, &sel);
    match rv {
        Some(n) if n > current => return Err(ApiError::too_large(n, current)),
        // Only the newest state is kept: an exact older one is as gone as after compaction.
        Some(n) if exact && n < current => return Err(ApiError::expired(n, current)),
        _ => {}
    }
    Ok(json_response(
        200,
        &json!({
            "kind": resource.list_kind(),
            "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": current.to_string()},
            "items": items,
        }),
    ))
}

fn start_watch(
    app: &App,
    resource: Resource,
    namespace: Option<&str>,
    q: &Query,
) -> Result<Response, ApiError> {
    let rv = parse_rv(q.resource_version.as_deref())?;
    let rv_match = q
        .resource_version_match
        .as_deref()
        .filter(|m| !m.is_empty());
    let forbidden = |field: &str, why: &str| {
        Err(ApiError::invalid_options(
            "ListOptions",
            field,
            &format!("Forbidden: {why}"),
        ))
    };
    let start = match q.send_initial_events {
        Some(true) => {
            if rv_match != Some("NotOlderThan") {
                return forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                );
            }
            if !q.allow_watch_bookmarks {
                return forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                );
            }
            Start::Current { end_bookmark: true }
        }
        _ if rv_match.is_some() => {
            return forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            );
        }
        Some(false) => Start::After(rv.unwrap_or_else(|| app.store.resource_version())),
        None => match rv {
            None | Some(0) => Start::Current {
                end_bookmark: false,
            },
            Some(n) => Start::After(n),
        },
    };
    let current = app.store.resource_version();
    if let Some(n) = rv
        && n > current
    {
        return Err(ApiError::too_large(n, current));
    }
    let w = Watch {
        resource,
        namespace: namespace.map(str::to_string),
        selector: selector(resource, q)?,
        start,
        bookmarks: q.allow_watch_bookmarks,
        timeout: q
            .timeout_seconds
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs),
        bookmark_interval: app.bookmark_interval,
    };
    tracing::debug!(%resource, ?namespace, ?start, "lab-kube watch");
    let body = Body::from_stream(watch::stream(app.store.clone(), w, app.stop.clone()));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn api_resources(resource: Resource) -> [APIResource; 2] {
    let verbs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let main = APIResource {
        name: resource.plural().to_string(),
        singular_name: resource.singular().to_string(),
        namespaced: resource.namespaced(),
        kind: resource.kind().to_string(),
        verbs: verbs(&[
            "create", "delete", "get", "list", "patch", "update", "watch",
        ]),
        short_names: Some(verbs(resource.short_names())).filter(|s| !s.is_empty()),
        ..APIResource::default()
    };
    let status = APIResource {
        name: format!("{}/status", resource.plural()),
        singular_name: String::new(),
        namespaced: resource.namespaced(),
        kind: resource.kind().to_string(),
        verbs: verbs(&["get", "patch", "update"]),
        ..APIResource::default()
    };
    [main, status]
}

fn resource_list(group_version: &str, group: &str) -> APIResourceList {
    APIResourceList {
        group_version: group_version.to_string(),
        resources: Resource::ALL
            .into_iter()
            .filter(|r| r.group() == group)
            .flat_map(|r| {
                let [main, status] = api_resources(r);
                std::iter::once(main).chain(r.has_status_subresource().then_some(status))
            })
            .collect(),
    }
}

fn eniconfig_group() -> APIGroup {
    let gv = GroupVersionForDiscovery {
        group_version: format!("{ENICONFIG_GROUP}/{ENICONFIG_VERSION}"),
        version: ENICONFIG_VERSION.to_string(),
    };
    APIGroup {
        name: ENICONFIG_GROUP.to_string(),
        preferred_version: Some(gv.clone()),
        server_address_by_client_cidrs: None,
        versions: vec![gv],
    }
}

fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

fn discovery(r: Route<'_>, host: &str) -> Response {
    match r {
        Route::Version => json_response(
            200,
            &Info {
                major: "1".to_string(),
                minor: MINOR.to_string(),
                emulation_major: Some("1".to_string()),
                emulation_minor: Some(MINOR.to_string()),
                git_version: format!("v1.{MINOR}.0-lab-kube"),
                git_commit: String::new(),
                git_tree_state: "clean".to_string(),
                build_date: "1970-01-01T00:00:00Z".to_string(),
                go_version: "none (lab-kube, Rust)".to_string(),
                compiler: "rustc".to_string(),
                platform: platform(),
                ..Info::default()
            },
        ),
        Route::Health => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], "ok").into_response()
        }
        Route::CoreVersions => json_response(
            200,
            &APIVersions {
                versions: vec!["v1".to_string()],
                server_address_by_client_cidrs: vec![ServerAddressByClientCIDR {
                    client_cidr: "0.0.0.0/0".to_string(),
                    server_address: host.to_string(),
                }],
            },
        ),
        Route::CoreResources => json_response(200, &resource_list("v1", "")),
        Route::Groups => json_response(
            200,
            &APIGroupList {
                groups: vec![eniconfig_group()],
            },
        ),
        Route::Group => json_response(200, &eniconfig_group()),
        Route::GroupResources => json_response(
            200,
            &resource_list(
                &format!("{ENICONFIG_GROUP}/{ENICONFIG_VERSION}"),
                ENICONFIG_GROUP,
            ),
        ),
        Route::Object { .. } => error_response(&ApiError::no_such_path()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_as_the_real_server_lays_them_out() {
        let obj = |resource, namespace, name, status| Route::Object {
            resource,
            namespace,
            name,
            status,
        };
        for (path, want) in [
            (
                "/api/v1/nodes",
                Some(obj(Resource::Nodes, None, None, false)),
            ),
            (
                "/api/v1/nodes/n1",
                Some(obj(Resource::Nodes, None, Some("n1"), false)),
            ),
            (
                "/api/v1/nodes/n1/status",
                Some(obj(Resource::Nodes, None, Some("n1"), true)),
            ),
            ("/api/v1/pods", Some(obj(Resource::Pods, None, None, false))),
            (
                "/api/v1/namespaces/ns/pods",
                Some(obj(Resource::Pods, Some("ns"), None, false)),
            ),
            (
                "/api/v1/namespaces/ns/pods/p/status",
                Some(obj(Resource::Pods, Some("ns"), Some("p"), true)),
            ),
            (
                "/api/v1/namespaces/ns/events/e",
                Some(obj(Resource::Events, Some("ns"), Some("e"), false)),
            ),
            (
                "/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs/az",
                Some(obj(Resource::EniConfigs, None, Some("az"), false)),
            ),
            (
                "/apis/crd.k8s.amazonaws.com/v1alpha1",
                Some(Route::GroupResources),
            ),
            ("/version", Some(Route::Version)),
            ("/api/v1/pods/p", None),
            ("/api/v1/namespaces/ns/nodes", None),
            ("/api/v1/namespaces/ns", None),
            ("/api/v1/namespaces", None),
            ("/api/v1/services", None),
            ("/api/v1/nodes/n1/proxy", None),
            (
                "/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs/az/status",
                None,
            ),
            ("/apis/crd.k8s.amazonaws.com/v1/eniconfigs", None),
            ("/apis/apps/v1", None),
            ("/api/v1//nodes", None),
        ] {
            assert_eq!(route(path).ok(), want, "{path}");
        }
    }

    #[test]
    fn query_parameters_are_checked_and_named() {
        let q = parse_query(Some("watch=1&resourceVersion=5&allowWatchBookmarks=true&timeoutSeconds=290&labelSelector=a%3Db"))
            .expect("parses");
        assert!(q.watch && q.allow_watch_bookmarks);
        assert_eq!(q.timeout_seconds, Some(290));
        assert_eq!(q.label_selector.as_deref(), Some("a=b"));
        let e = parse_query(Some("watch=maybe")).expect_err("not a bool");
        assert!(e.message.contains("watch=\"maybe\""), "{}", e.message);
        let e = parse_query(Some("timeoutSeconds=-1")).expect_err("negative");
        assert!(e.message.contains("-1"), "{}", e.message);
    }
}
