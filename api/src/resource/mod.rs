//! The resource model operators write: `Service`, `WorkloadGroup`, `Route`,
//! `Policy`, and the controller-written `Workload`, in the kubectl-like
//! envelope (`apiVersion`, `kind`, `metadata`, `spec`).
//!
//! Field names are the contract of `docs/RESOURCES.md`. Every struct denies
//! unknown fields, so a typo is an error that names the field rather than a
//! setting silently dropped. Parsing lives in [`crate::document`];
//! validation in [`validate`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;

pub mod validate;

/// The only `apiVersion` this release reads and writes.
pub const API_VERSION: &str = "hostmesh/v1";

/// The namespace of a resource whose metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds of resource, in the order an apply stores them (a Route's
/// Service before the Route).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    WorkloadGroup,
    Route,
    Policy,
    Workload,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Service,
        Kind::WorkloadGroup,
        Kind::Route,
        Kind::Policy,
        Kind::Workload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::Route => "Route",
            Kind::Policy => "Policy",
            Kind::Workload => "Workload",
        }
    }

    /// The kind as written in a document's `kind:` field (exact case).
    pub fn from_document(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind as typed on a command line: any case, singular or plural,
    /// or a short name (`svc`, `wg`, `wl`).
    pub fn from_cli(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let kind = match lower.as_str() {
            "service" | "services" | "svc" => Kind::Service,
            "workloadgroup" | "workloadgroups" | "wg" | "group" | "groups" => Kind::WorkloadGroup,
            "route" | "routes" | "rt" => Kind::Route,
            "policy" | "policies" | "pol" => Kind::Policy,
            "workload" | "workloads" | "wl" | "host" | "hosts" => Kind::Workload,
            _ => return None,
        };
        Some(kind)
    }

    /// Workloads are written by the controller when hosts join; operators
    /// read and delete them but never apply them.
    pub fn operator_writable(self) -> bool {
        !matches!(self, Kind::Workload)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// `metadata` of every resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The store revision of the last write. Output only; when present on
    /// apply it is a precondition: the apply fails if the stored resource
    /// has changed since (optimistic concurrency, like Kubernetes'
    /// `resourceVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

impl ObjectMeta {
    pub fn new(namespace: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.to_string(),
            namespace: namespace.to_string(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            revision: None,
        }
    }
}

/// The envelope around a spec (and, for controller-written kinds, a status).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Object<S, St = Empty> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<St>,
}

/// The status of kinds that have none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

impl<S, St> Object<S, St> {
    pub fn new(kind: Kind, metadata: ObjectMeta, spec: S) -> Object<S, St> {
        Object {
            api_version: API_VERSION.to_string(),
            kind: kind.as_str().to_string(),
            metadata,
            spec,
            status: None,
        }
    }
}

// ------------------------------------------------------------------ Service

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "http" => Some(Protocol::Http),
            "http2" => Some(Protocol::Http2),
            "grpc" => Some(Protocol::Grpc),
            _ => None,
        }
    }

    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

/// Whether plaintext from other hosts may reach a service's ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// nftables drops new plaintext connections from other hosts.
    #[default]
    Strict,
    /// Plaintext is accepted beside the mesh (for migrations).
    Permissive,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }

    pub fn parse(s: &str) -> Option<MtlsMode> {
        match s {
            "strict" => Some(MtlsMode::Strict),
            "permissive" => Some(MtlsMode::Permissive),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port clients connect to on the VIP. Wider than u16 so that a bad
    /// number is reported by validation as "not a port number".
    pub port: u64,
    /// The port the app listens on on its host; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u64>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl ServicePort {
    pub fn target(&self) -> u64 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub mtls: MtlsMode,
    /// IPv4 virtual IP; allocated by the controller when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// IPv6 virtual IP; only when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<String>,
}

pub type Service = Object<ServiceSpec>;

// ------------------------------------------------------------ WorkloadGroup

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckType {
    #[default]
    Tcp,
    Http,
}

/// How meshd decides that the app behind one target port is healthy.
/// Ports without a check get a TCP connect check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    pub port: u64,
    #[serde(default, rename = "type")]
    pub kind: HealthCheckType,
    /// HTTP path for `type: http`; a 2xx or 3xx answer is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadGroupSpec {
    /// Service account part of the SPIFFE ID; defaults to the group name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Services (in the group's namespace) whose endpoints this group's
    /// hosts are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_checks: Vec<HealthCheck>,
}

pub type WorkloadGroup = Object<WorkloadGroupSpec>;

impl WorkloadGroup {
    pub fn identity_name(&self) -> &str {
        self.spec.identity.as_deref().unwrap_or(&self.metadata.name)
    }
}

// -------------------------------------------------------------------- Route

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Exact path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Exact header values; names are case-insensitive.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

impl RouteMatch {
    pub fn is_empty(&self) -> bool {
        self.path_prefix.is_none()
            && self.path.is_none()
            && self.headers.is_empty()
            && self.methods.is_empty()
    }
}

fn default_weight() -> u64 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteBackend {
    /// Endpoint labels this backend selects; empty selects every endpoint.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
    #[serde(default = "default_weight")]
    pub weight: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "gateway-error")]
    GatewayError,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    #[serde(rename = "refused-stream")]
    RefusedStream,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    pub attempts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    /// Absent: the rule matches every request (a default rule, usually last).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RouteMatch>,
    pub backends: Vec<RouteBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    /// A Service in the Route's namespace.
    pub service: String,
    pub rules: Vec<RouteRule>,
}

pub type Route = Object<RouteSpec>;

// ------------------------------------------------------------------- Policy

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// Who a rule is about: exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySource {
    /// A SPIFFE ID; a trailing `*` matches any suffix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Every identity in this namespace of the mesh's trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What a rule is about; empty lists match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact paths, or prefixes written `/api/*`, or suffixes `*.png`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Service ports (as clients see them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PolicySource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PolicyOperation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    pub service: String,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PolicyRule>,
}

pub type Policy = Object<PolicySpec>;

// ----------------------------------------------------------------- Workload

/// One joined host. Written by the controller at join; its status is
/// filled in on read from the host's live record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The WorkloadGroup (same namespace) the host joined with.
    pub group: String,
    pub identity: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339.
    pub joined_at: String,
    /// The id of the join token used (never the secret).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadPortStatus {
    pub port: u32,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// ready | syncing | rejected | offline
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<WorkloadPortStatus>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub acked_version: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reject_reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_expiry: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub type Workload = Object<WorkloadSpec, WorkloadStatus>;

// ------------------------------------------------------------- any resource

/// A resource of any kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Service(Service),
    WorkloadGroup(WorkloadGroup),
    Route(Route),
    Policy(Policy),
    Workload(Workload),
}

macro_rules! each_resource {
    ($self:expr, $r:ident => $body:expr) => {
        match $self {
            Resource::Service($r) => $body,
            Resource::WorkloadGroup($r) => $body,
            Resource::Route($r) => $body,
            Resource::Policy($r) => $body,
            Resource::Workload($r) => $body,
        }
    };
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::WorkloadGroup(_) => Kind::WorkloadGroup,
            Resource::Route(_) => Kind::Route,
            Resource::Policy(_) => Kind::Policy,
            Resource::Workload(_) => Kind::Workload,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        each_resource!(self, r => &r.metadata)
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        each_resource!(self, r => &mut r.metadata)
    }

    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind(),
            namespace: self.metadata().namespace.clone(),
            name: self.metadata().name.clone(),
        }
    }

    /// The document as a JSON value (the envelope, camelCase fields).
    pub fn to_value(&self) -> serde_json::Value {
        let value = each_resource!(self, r => serde_json::to_value(r));
        value.expect("resource types serialize to JSON")
    }

    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// The same resource without fields that only the store sets, for
    /// comparing what an apply asks for with what is stored.
    pub fn without_store_fields(&self) -> Resource {
        let mut r = self.clone();
        r.metadata_mut().revision = None;
        r
    }
}

/// Kind, namespace and name: what identifies a resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ResourceKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}
