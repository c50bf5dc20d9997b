//! Validation of resources: every check names the resource, the field path
//! and the bad value, e.g.
//! `Service shop/web: spec.ports[1].port: 70000 is not a port number`.
//!
//! [`validate`] checks one resource on its own; [`validate_references`]
//! checks what it points at against a [`Catalog`] of the other resources
//! (the store plus the rest of the same apply).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Kind, ObjectMeta, Policy, PolicyAction, Resource, Route, Service, WorkloadGroup};
use crate::spiffe::{SYSTEM_NAMESPACE, SpiffeId};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `spec.ports[1].port`; empty for the resource as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with one resource.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// `Service shop/web`
    pub resource: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.resource)?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects field errors for one resource.
struct Errors {
    errors: Vec<FieldError>,
}

/// Past this many, more errors for one resource add nothing for the reader.
const MAX_ERRORS: usize = 20;

impl Errors {
    fn new() -> Errors {
        Errors { errors: Vec::new() }
    }

    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(FieldError {
                path: path.into(),
                message: message.into(),
            });
        }
    }

    fn finish(self, kind: Kind, meta: &ObjectMeta) -> Result<(), ValidationError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                resource: format!("{} {}/{}", kind, meta.namespace, meta.name),
                errors: self.errors,
            })
        }
    }
}

/// A DNS-1123 label: 1-63 lowercase letters, digits and '-', starting and
/// ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

const DNS_LABEL_RULE: &str =
    "use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit";

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A label name or value part: up to 63 of `[A-Za-z0-9._-]`, starting and
/// ending alphanumeric (Kubernetes' rule, which operators already know).
fn is_label_token(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_token(name),
        None => is_label_token(s),
    }
}

fn check_labels(errors: &mut Errors, path: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        if !is_label_key(k) {
            errors.add(
                format!("{path}.{k}"),
                format!("{k:?} is not a valid label key: use up to 63 letters, digits, '.', '_' and '-', optionally after a DNS prefix and '/'"),
            );
        }
        if !v.is_empty() && !is_label_token(v) {
            errors.add(
                format!("{path}.{k}"),
                format!("{v:?} is not a valid label value: use up to 63 letters, digits, '.', '_' and '-', starting and ending with a letter or digit"),
            );
        }
    }
}

/// Annotations are free text, but bounded: they travel in every push.
const MAX_ANNOTATIONS_BYTES: usize = 64 * 1024;

fn check_meta(errors: &mut Errors, meta: &ObjectMeta) {
    if !is_dns_label(&meta.name) {
        errors.add(
            "metadata.name",
            format!("{:?} is not a valid name: {DNS_LABEL_RULE}", meta.name),
        );
    }
    if !is_dns_label(&meta.namespace) {
        errors.add(
            "metadata.namespace",
            format!(
                "{:?} is not a valid namespace: {DNS_LABEL_RULE}",
                meta.namespace
            ),
        );
    } else if meta.namespace == SYSTEM_NAMESPACE {
        errors.add(
            "metadata.namespace",
            format!("{SYSTEM_NAMESPACE} is reserved for the mesh's own identities"),
        );
    }
    check_labels(errors, "metadata.labels", &meta.labels);
    let size: usize = meta
        .annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if size > MAX_ANNOTATIONS_BYTES {
        errors.add(
            "metadata.annotations",
            format!("{size} bytes of annotations; at most {MAX_ANNOTATIONS_BYTES} are allowed"),
        );
    }
    for k in meta.annotations.keys() {
        if !is_label_key(k) {
            errors.add(
                format!("metadata.annotations.{k}"),
                format!("{k:?} is not a valid annotation key"),
            );
        }
    }
}

fn check_port(errors: &mut Errors, path: &str, port: u64) {
    if port == 0 || port > 65535 {
        errors.add(path, format!("{port} is not a port number"));
    }
}

const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn check_method(errors: &mut Errors, path: &str, method: &str) {
    if !HTTP_METHODS.contains(&method) {
        errors.add(
            path,
            format!(
                "{method:?} is not an HTTP method (one of {})",
                HTTP_METHODS.join(", ")
            ),
        );
    }
}

/// Header names as HTTP/2 carries them: lowercase tokens.
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'-' | b'_'
                        | b'.'
                        | b'!'
                        | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'^'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

const MAX_PORTS: usize = 64;
const MAX_RULES: usize = 64;
const MAX_BACKENDS: usize = 16;
const MAX_WEIGHT: u64 = 10_000;
const MAX_RETRY_ATTEMPTS: u64 = 10;
const MAX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checks one resource on its own.
pub fn validate(resource: &Resource) -> Result<(), ValidationError> {
    let mut errors = Errors::new();
    check_meta(&mut errors, resource.metadata());
    match resource {
        Resource::Service(s) => check_service(&mut errors, s),
        Resource::WorkloadGroup(g) => check_group(&mut errors, g),
        Resource::Route(r) => check_route(&mut errors, r),
        Resource::Policy(p) => check_policy(&mut errors, p),
        Resource::Workload(_) => {}
    }
    errors.finish(resource.kind(), resource.metadata())
}

fn check_service(errors: &mut Errors, s: &Service) {
    let ports = &s.spec.ports;
    if ports.is_empty() {
        errors.add("spec.ports", "a Service needs at least one port");
    }
    if ports.len() > MAX_PORTS {
        errors.add(
            "spec.ports",
            format!("{} ports; at most {MAX_PORTS} are allowed", ports.len()),
        );
    }
    let mut seen_port: HashMap<u64, usize> = HashMap::new();
    let mut seen_name: HashMap<&str, usize> = HashMap::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        check_port(errors, &format!("{path}.port"), p.port);
        if let Some(t) = p.target_port {
            check_port(errors, &format!("{path}.targetPort"), t);
        }
        if let Some(first) = seen_port.insert(p.port, i) {
            errors.add(
                format!("{path}.port"),
                format!("{} is already used by spec.ports[{first}]", p.port),
            );
        }
        if let Some(name) = &p.name {
            if !is_dns_label(name) {
                errors.add(
                    format!("{path}.name"),
                    format!("{name:?} is not a valid port name: {DNS_LABEL_RULE}"),
                );
            }
            if let Some(first) = seen_name.insert(name, i) {
                errors.add(
                    format!("{path}.name"),
                    format!("{name:?} is already used by spec.ports[{first}]"),
                );
            }
        }
    }
    if let Some(vip) = &s.spec.vip
        && vip.parse::<Ipv4Addr>().is_err()
    {
        errors.add("spec.vip", format!("{vip:?} is not an IPv4 address"));
    }
    if let Some(vip6) = &s.spec.vip6
        && vip6.parse::<Ipv6Addr>().is_err()
    {
        errors.add("spec.vip6", format!("{vip6:?} is not an IPv6 address"));
    }
}

fn check_group(errors: &mut Errors, g: &WorkloadGroup) {
    if let Some(id) = &g.spec.identity
        && !is_dns_label(id)
    {
        errors.add(
            "spec.identity",
            format!("{id:?} is not a valid identity name: {DNS_LABEL_RULE}"),
        );
    }
    check_labels(errors, "spec.labels", &g.spec.labels);
    let mut seen = HashMap::new();
    for (i, svc) in g.spec.services.iter().enumerate() {
        let path = format!("spec.services[{i}]");
        if !is_dns_label(svc) {
            errors.add(
                &path,
                format!("{svc:?} is not a Service name: {DNS_LABEL_RULE}"),
            );
        }
        if let Some(first) = seen.insert(svc.as_str(), i) {
            errors.add(
                &path,
                format!("{svc:?} is already listed at spec.services[{first}]"),
            );
        }
    }
    let mut seen_ports = HashMap::new();
    for (i, hc) in g.spec.health_checks.iter().enumerate() {
        let path = format!("spec.healthChecks[{i}]");
        check_port(errors, &format!("{path}.port"), hc.port);
        if let Some(first) = seen_ports.insert(hc.port, i) {
            errors.add(
                format!("{path}.port"),
                format!(
                    "{} already has a check at spec.healthChecks[{first}]",
                    hc.port
                ),
            );
        }
        match (hc.kind, &hc.path) {
            (super::HealthCheckType::Http, None) => {
                errors.add(
                    format!("{path}.path"),
                    "an http check needs a path, e.g. /healthz",
                );
            }
            (super::HealthCheckType::Http, Some(p)) if !p.starts_with('/') => {
                errors.add(format!("{path}.path"), format!("{p:?} must start with '/'"));
            }
            (super::HealthCheckType::Tcp, Some(_)) => {
                errors.add(
                    format!("{path}.path"),
                    "a tcp check has no path; set type: http",
                );
            }
            _ => {}
        }
        let interval = hc.interval.map(|d| d.get());
        if let Some(d) = interval
            && (d < std::time::Duration::from_secs(1) || d > MAX_TIMEOUT)
        {
            errors.add(
                format!("{path}.interval"),
                format!("{} is outside 1s..1h", hc.interval.unwrap_or_default()),
            );
        }
        if let Some(t) = hc.timeout {
            if t.get().is_zero() {
                errors.add(format!("{path}.timeout"), "must be more than 0s");
            } else if let Some(d) = interval
                && t.get() >= d
            {
                errors.add(
                    format!("{path}.timeout"),
                    format!("{t} must be shorter than the interval"),
                );
            }
        }
    }
}

fn check_route(errors: &mut Errors, r: &Route) {
    if !is_dns_label(&r.spec.service) {
        errors.add(
            "spec.service",
            format!(
                "{:?} is not a Service name: {DNS_LABEL_RULE}",
                r.spec.service
            ),
        );
    }
    let rules = &r.spec.rules;
    if rules.is_empty() {
        errors.add("spec.rules", "a Route needs at least one rule");
    }
    if rules.len() > MAX_RULES {
        errors.add(
            "spec.rules",
            format!("{} rules; at most {MAX_RULES} are allowed", rules.len()),
        );
    }
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        let catch_all = rule.matches.as_ref().is_none_or(|m| m.is_empty());
        if catch_all && i + 1 < rules.len() {
            errors.add(
                &path,
                "a rule without a match takes every request, so the rules after it never apply; put it last",
            );
        }
        if let Some(m) = &rule.matches {
            let mpath = format!("{path}.match");
            if let Some(p) = &m.path_prefix
                && !p.starts_with('/')
            {
                errors.add(
                    format!("{mpath}.pathPrefix"),
                    format!("{p:?} must start with '/'"),
                );
            }
            if let Some(p) = &m.path {
                if !p.starts_with('/') {
                    errors.add(
                        format!("{mpath}.path"),
                        format!("{p:?} must start with '/'"),
                    );
                }
                if m.path_prefix.is_some() {
                    errors.add(format!("{mpath}.path"), "set path or pathPrefix, not both");
                }
            }
            for name in m.headers.keys() {
                if !is_header_name(name) {
                    errors.add(
                        format!("{mpath}.headers.{name}"),
                        format!("{name:?} is not a header name (lowercase token characters)"),
                    );
                }
            }
            for (j, method) in m.methods.iter().enumerate() {
                check_method(errors, &format!("{mpath}.methods[{j}]"), method);
            }
        }
        let backends = &rule.backends;
        if backends.is_empty() {
            errors.add(
                format!("{path}.backends"),
                "a rule needs at least one backend",
            );
        }
        if backends.len() > MAX_BACKENDS {
            errors.add(
                format!("{path}.backends"),
                format!(
                    "{} backends; at most {MAX_BACKENDS} are allowed",
                    backends.len()
                ),
            );
        }
        let mut total = 0u64;
        for (j, b) in backends.iter().enumerate() {
            let bpath = format!("{path}.backends[{j}]");
            if b.weight > MAX_WEIGHT {
                errors.add(
                    format!("{bpath}.weight"),
                    format!("{} is more than {MAX_WEIGHT}", b.weight),
                );
            }
            total = total.saturating_add(b.weight);
            check_labels(errors, &format!("{bpath}.subset"), &b.subset);
        }
        if !backends.is_empty() && total == 0 {
            errors.add(
                format!("{path}.backends"),
                "every weight is 0, so no request could be sent",
            );
        }
        if let Some(t) = rule.timeout
            && (t.get().is_zero() || t.get() > MAX_TIMEOUT)
        {
            errors.add(
                format!("{path}.timeout"),
                format!("{t} is outside (0s, 1h]"),
            );
        }
        if let Some(retries) = &rule.retries {
            let rpath = format!("{path}.retries");
            if retries.attempts > MAX_RETRY_ATTEMPTS {
                errors.add(
                    format!("{rpath}.attempts"),
                    format!("{} is more than {MAX_RETRY_ATTEMPTS}", retries.attempts),
                );
            }
            if let Some(pt) = retries.per_try_timeout {
                if pt.get().is_zero() {
                    errors.add(format!("{rpath}.perTryTimeout"), "must be more than 0s");
                }
                if let Some(t) = rule.timeout
                    && pt.get() > t.get()
                {
                    errors.add(
                        format!("{rpath}.perTryTimeout"),
                        format!("{pt} is longer than the rule's timeout {t}"),
                    );
                }
            }
        }
    }
}

fn check_policy(errors: &mut Errors, p: &Policy) {
    if !is_dns_label(&p.spec.service) {
        errors.add(
            "spec.service",
            format!(
                "{:?} is not a Service name: {DNS_LABEL_RULE}",
                p.spec.service
            ),
        );
    }
    if p.spec.action == PolicyAction::Deny && p.spec.rules.is_empty() {
        errors.add(
            "spec.rules",
            "a deny policy without rules denies nothing; add a rule",
        );
    }
    if p.spec.rules.len() > MAX_RULES {
        errors.add(
            "spec.rules",
            format!(
                "{} rules; at most {MAX_RULES} are allowed",
                p.spec.rules.len()
            ),
        );
    }
    for (i, rule) in p.spec.rules.iter().enumerate() {
        let path = format!("spec.rules[{i}]");
        for (j, src) in rule.from.iter().enumerate() {
            let spath = format!("{path}.from[{j}]");
            match (&src.identity, &src.namespace) {
                (Some(_), Some(_)) => errors.add(&spath, "set identity or namespace, not both"),
                (None, None) => errors.add(&spath, "set identity or namespace"),
                (Some(id), None) => {
                    check_identity_pattern(errors, &format!("{spath}.identity"), id)
                }
                (None, Some(ns)) => {
                    if !is_dns_label(ns) {
                        errors.add(
                            format!("{spath}.namespace"),
                            format!("{ns:?} is not a valid namespace: {DNS_LABEL_RULE}"),
                        );
                    }
                }
            }
        }
        for (j, op) in rule.to.iter().enumerate() {
            let opath = format!("{path}.to[{j}]");
            for (k, m) in op.methods.iter().enumerate() {
                check_method(errors, &format!("{opath}.methods[{k}]"), m);
            }
            for (k, pth) in op.paths.iter().enumerate() {
                let ok = pth.starts_with('/') || (pth.starts_with('*') && pth.len() > 1);
                if !ok || pth[1..].contains('*') && !pth.ends_with("/*") {
                    errors.add(
                        format!("{opath}.paths[{k}]"),
                        format!("{pth:?} must be an exact path (/a/b), a prefix (/a/*) or a suffix (*.png)"),
                    );
                }
            }
            for (k, port) in op.ports.iter().enumerate() {
                check_port(errors, &format!("{opath}.ports[{k}]"), *port);
            }
        }
    }
}

fn check_identity_pattern(errors: &mut Errors, path: &str, id: &str) {
    if let Some(prefix) = id.strip_suffix('*') {
        if !prefix.starts_with("spiffe://") || prefix.contains('*') {
            errors.add(
                path,
                format!("{id:?} must be a SPIFFE ID, optionally ending in '*'"),
            );
        }
    } else if let Err(e) = id.parse::<SpiffeId>() {
        errors.add(path, e.to_string());
    }
}

/// What reference checks look things up in.
pub trait Catalog {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service>;
}

impl Catalog for BTreeMap<(String, String), Service> {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.get(&(namespace.to_string(), name.to_string()))
    }
}

/// Checks what a resource points at: a Route's or Policy's Service, a
/// WorkloadGroup's Services, and that HTTP-only settings meet HTTP ports.
pub fn validate_references(
    resource: &Resource,
    catalog: &dyn Catalog,
) -> Result<(), ValidationError> {
    let mut errors = Errors::new();
    let ns = &resource.metadata().namespace;
    let missing = |svc: &str| {
        format!("Service {ns}/{svc} does not exist; apply it first or in the same file")
    };
    match resource {
        Resource::Route(r) => match catalog.service(ns, &r.spec.service) {
            None => errors.add("spec.service", missing(&r.spec.service)),
            Some(svc) => {
                let has_http = svc.spec.ports.iter().any(|p| p.protocol.is_http());
                for (i, rule) in r.spec.rules.iter().enumerate() {
                    let needs_http = rule.matches.as_ref().is_some_and(|m| !m.is_empty())
                        || rule.retries.is_some()
                        || rule.timeout.is_some();
                    if needs_http && !has_http {
                        errors.add(
                            format!("spec.rules[{i}]"),
                            format!(
                                "Service {ns}/{} has only tcp ports; matches, timeouts and retries need an http, http2 or grpc port",
                                svc.metadata.name
                            ),
                        );
                    }
                }
            }
        },
        Resource::Policy(p) => match catalog.service(ns, &p.spec.service) {
            None => errors.add("spec.service", missing(&p.spec.service)),
            Some(svc) => {
                let has_http = svc.spec.ports.iter().any(|p| p.protocol.is_http());
                for (i, rule) in p.spec.rules.iter().enumerate() {
                    for (j, op) in rule.to.iter().enumerate() {
                        let opath = format!("spec.rules[{i}].to[{j}]");
                        if !has_http && (!op.methods.is_empty() || !op.paths.is_empty()) {
                            errors.add(
                                &opath,
                                format!(
                                    "Service {ns}/{} has only tcp ports; methods and paths need an http, http2 or grpc port",
                                    svc.metadata.name
                                ),
                            );
                        }
                        for (k, port) in op.ports.iter().enumerate() {
                            if !svc.spec.ports.iter().any(|sp| sp.port == *port) {
                                errors.add(
                                    format!("{opath}.ports[{k}]"),
                                    format!(
                                        "Service {ns}/{} has no port {port}",
                                        svc.metadata.name
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        },
        Resource::WorkloadGroup(g) => {
            for (i, svc) in g.spec.services.iter().enumerate() {
                if catalog.service(ns, svc).is_none() {
                    errors.add(format!("spec.services[{i}]"), missing(svc));
                }
            }
        }
        Resource::Service(_) | Resource::Workload(_) => {}
    }
    errors.finish(resource.kind(), resource.metadata())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::parse_documents_unvalidated;

    fn one(yaml: &str) -> Resource {
        let mut docs = parse_documents_unvalidated(yaml).unwrap();
        assert_eq!(docs.len(), 1);
        docs.remove(0).1
    }

    fn error_of(yaml: &str) -> String {
        validate(&one(yaml)).unwrap_err().to_string()
    }

    #[test]
    fn a_port_out_of_range_is_named_with_its_path() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports:\n    - {port: 80}\n    - {port: 70000}\n",
        );
        assert_eq!(
            e,
            "Service shop/web: spec.ports[1].port: 70000 is not a port number"
        );
    }

    #[test]
    fn duplicate_ports_and_bad_names_are_reported_together() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: Web}\nspec:\n  ports:\n    - {port: 80, name: HTTP}\n    - {port: 80}\n",
        );
        assert!(
            e.starts_with("Service default/Web: metadata.name: \"Web\" is not a valid name"),
            "{e}"
        );
        assert!(
            e.contains("spec.ports[0].name: \"HTTP\" is not a valid port name"),
            "{e}"
        );
        assert!(
            e.contains("spec.ports[1].port: 80 is already used by spec.ports[0]"),
            "{e}"
        );
    }

    #[test]
    fn a_service_without_ports_is_refused() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: []}\n",
        );
        assert!(
            e.contains("spec.ports: a Service needs at least one port"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_vip_is_refused() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}], vip: 240.240.0.300}\n",
        );
        assert!(
            e.contains("spec.vip: \"240.240.0.300\" is not an IPv4 address"),
            "{e}"
        );
    }

    #[test]
    fn a_catch_all_rule_must_be_last() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: web\n  rules:\n    - backends: [{weight: 1}]\n    - match: {pathPrefix: /a}\n      backends: [{weight: 1}]\n",
        );
        assert!(
            e.contains("spec.rules[0]: a rule without a match takes every request"),
            "{e}"
        );
    }

    #[test]
    fn route_matches_are_checked() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Route\nmetadata: {name: r}\nspec:\n  service: web\n  rules:\n    - match: {pathPrefix: api, methods: [FETCH], headers: {X-Bad: '1'}}\n      backends: [{weight: 0}]\n      timeout: 1s\n      retries: {attempts: 11, perTryTimeout: 2s}\n",
        );
        for want in [
            "spec.rules[0].match.pathPrefix: \"api\" must start with '/'",
            "spec.rules[0].match.methods[0]: \"FETCH\" is not an HTTP method",
            "spec.rules[0].match.headers.X-Bad: \"X-Bad\" is not a header name",
            "spec.rules[0].backends: every weight is 0",
            "spec.rules[0].retries.attempts: 11 is more than 10",
            "spec.rules[0].retries.perTryTimeout: 2s is longer than the rule's timeout 1s",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }

    #[test]
    fn policy_sources_need_exactly_one_field() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  service: web\n  rules:\n    - from: [{}, {identity: 'spiffe://td/ns/a/sa/b', namespace: a}, {identity: 'http://x'}]\n      to: [{paths: ['api/*'], ports: [0]}]\n",
        );
        for want in [
            "spec.rules[0].from[0]: set identity or namespace",
            "spec.rules[0].from[1]: set identity or namespace, not both",
            "spec.rules[0].from[2].identity: \"http://x\" is not a SPIFFE ID",
            "spec.rules[0].to[0].paths[0]: \"api/*\" must be an exact path",
            "spec.rules[0].to[0].ports[0]: 0 is not a port number",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }

    #[test]
    fn deny_policies_need_rules() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: p}\nspec: {service: web, action: deny}\n",
        );
        assert!(
            e.contains("spec.rules: a deny policy without rules denies nothing"),
            "{e}"
        );
    }

    #[test]
    fn the_system_namespace_is_reserved() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: admin, namespace: hostmesh-system}\nspec: {}\n",
        );
        assert!(
            e.contains("metadata.namespace: hostmesh-system is reserved"),
            "{e}"
        );
    }

    #[test]
    fn health_checks_are_checked() {
        let e = error_of(
            "apiVersion: hostmesh/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec:\n  healthChecks:\n    - {port: 8080, type: http}\n    - {port: 8080, path: /x}\n    - {port: 9090, interval: 2s, timeout: 3s}\n",
        );
        for want in [
            "spec.healthChecks[0].path: an http check needs a path",
            "spec.healthChecks[1].port: 8080 already has a check at spec.healthChecks[0]",
            "spec.healthChecks[1].path: a tcp check has no path",
            "spec.healthChecks[2].timeout: 3s must be shorter than the interval",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }

    #[test]
    fn references_name_the_missing_service() {
        let catalog: BTreeMap<(String, String), Service> = BTreeMap::new();
        let r = one(
            "apiVersion: hostmesh/v1\nkind: Route\nmetadata: {name: r, namespace: shop}\nspec:\n  service: web\n  rules: [{backends: [{weight: 1}]}]\n",
        );
        let e = validate_references(&r, &catalog).unwrap_err().to_string();
        assert_eq!(
            e,
            "Route shop/r: spec.service: Service shop/web does not exist; apply it first or in the same file"
        );
    }

    #[test]
    fn http_matches_on_a_tcp_service_are_refused() {
        let mut catalog: BTreeMap<(String, String), Service> = BTreeMap::new();
        let Resource::Service(svc) = one(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {ports: [{port: 5432}]}\n",
        ) else {
            panic!("not a service")
        };
        catalog.insert(("shop".into(), "db".into()), svc);
        let r = one(
            "apiVersion: hostmesh/v1\nkind: Route\nmetadata: {name: r, namespace: shop}\nspec:\n  service: db\n  rules: [{match: {pathPrefix: /}, backends: [{weight: 1}]}]\n",
        );
        let e = validate_references(&r, &catalog).unwrap_err().to_string();
        assert!(
            e.contains("spec.rules[0]: Service shop/db has only tcp ports"),
            "{e}"
        );
        let p = one(
            "apiVersion: hostmesh/v1\nkind: Policy\nmetadata: {name: p, namespace: shop}\nspec:\n  service: db\n  rules: [{to: [{ports: [80]}]}]\n",
        );
        let e = validate_references(&p, &catalog).unwrap_err().to_string();
        assert!(
            e.contains("spec.rules[0].to[0].ports[0]: Service shop/db has no port 80"),
            "{e}"
        );
    }

    #[test]
    fn names_follow_dns_label_rules() {
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("-web"));
        assert!(!is_dns_label("web-"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(!is_label_key("/name"));
    }
}
