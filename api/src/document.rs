//! Reading and writing resource documents: multi-document YAML (and JSON,
//! which YAML contains) in; YAML, JSON and tables out.
//!
//! A document is checked in three steps, each with an error that names the
//! document and the field: the envelope (`apiVersion`, `kind`), the typed
//! structure (unknown fields and wrong types, with the path found by
//! `serde_path_to_error`), then [`crate::resource::validate::validate`].
//! A list (`{"items": [...]}`, what `meshctl get -o json|yaml` prints) is
//! read as its items, so `get` output can be applied again.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::resource::validate::validate;
use crate::resource::{API_VERSION, Kind, Object, Resource};

/// Larger inputs are refused before parsing: an apply this big is a mistake,
/// and the parser's own budget guards against alias bombs below it.
pub const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;

/// Why one document of an input was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DocumentError {
    /// 1-based position in the input; 0 when the input as a whole is bad.
    pub index: usize,
    pub message: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.index == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "document {}: {}", self.index, self.message)
        }
    }
}

/// Parses every document of `text` and validates each one on its own.
/// Empty documents (a stray `---`, only comments) are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, DocumentError> {
    let resources = parse_documents_unvalidated(text)?;
    for (index, resource) in &resources {
        validate(resource).map_err(|e| DocumentError {
            index: *index,
            message: e.to_string(),
        })?;
    }
    Ok(resources.into_iter().map(|(_, r)| r).collect())
}

/// Parses every document of `text` into typed resources (structure only),
/// each with its 1-based document index.
pub fn parse_documents_unvalidated(text: &str) -> Result<Vec<(usize, Resource)>, DocumentError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(DocumentError {
            index: 0,
            message: format!(
                "input is {} bytes; at most {MAX_INPUT_BYTES} are read",
                text.len()
            ),
        });
    }
    let values: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| DocumentError {
        index: 0,
        message: format!("not valid YAML: {e}"),
    })?;
    let mut out = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let index = i + 1;
        if value.is_null() {
            continue;
        }
        for item in expand_list(value).map_err(|message| DocumentError { index, message })? {
            let resource =
                resource_from_value(item).map_err(|message| DocumentError { index, message })?;
            out.push((index, resource));
        }
    }
    Ok(out)
}

/// A `{"items": [...]}` list (optionally with `kind: List`) becomes its items.
fn expand_list(value: Value) -> Result<Vec<Value>, String> {
    let is_list = match &value {
        Value::Object(map) => {
            map.contains_key("items")
                && map.get("kind").is_none_or(|k| k == "List")
                && !map.contains_key("spec")
        }
        _ => false,
    };
    if !is_list {
        return Ok(vec![value]);
    }
    match value {
        Value::Object(mut map) => match map.remove("items") {
            Some(Value::Array(items)) => Ok(items),
            _ => Err("items: expected a list of resources".to_string()),
        },
        _ => unreachable!("checked above"),
    }
}

/// One resource from a JSON value: the envelope first, then the typed
/// structure. Does not run [`validate`].
pub fn resource_from_value(value: Value) -> Result<Resource, String> {
    let Value::Object(map) = &value else {
        return Err(format!(
            "expected a resource (a mapping with apiVersion, kind, metadata, spec), found {}",
            type_name(&value)
        ));
    };
    let kind_text = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(other) => {
            return Err(format!(
                "kind: expected a string, found {}",
                type_name(other)
            ));
        }
        None => {
            return Err("kind: missing; one of Service, WorkloadGroup, Route, Policy".to_string());
        }
    };
    let kind = Kind::from_document(&kind_text).ok_or_else(|| {
        format!("kind: {kind_text:?} is not a hostmesh kind (Service, WorkloadGroup, Route, Policy, Workload)")
    })?;
    let what = describe(kind, map);
    match map.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(Value::String(v)) => {
            return Err(format!(
                "{what}: apiVersion: {v:?} is not supported; use {API_VERSION}"
            ));
        }
        Some(other) => {
            return Err(format!(
                "{what}: apiVersion: expected a string, found {}",
                type_name(other)
            ));
        }
        None => return Err(format!("{what}: apiVersion: missing; use {API_VERSION}")),
    }
    let typed = match kind {
        Kind::Service => typed(value).map(Resource::Service),
        Kind::WorkloadGroup => typed(value).map(Resource::WorkloadGroup),
        Kind::Route => typed(value).map(Resource::Route),
        Kind::Policy => typed(value).map(Resource::Policy),
        Kind::Workload => typed(value).map(Resource::Workload),
    };
    typed.map_err(|e| format!("{what}: {e}"))
}

/// `Service shop/web`, or as much of it as the document has.
fn describe(kind: Kind, map: &serde_json::Map<String, Value>) -> String {
    let meta = map.get("metadata").and_then(Value::as_object);
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<no name>");
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or(crate::resource::DEFAULT_NAMESPACE);
    format!("{kind} {ns}/{name}")
}

fn typed<S, St>(value: Value) -> Result<Object<S, St>, String>
where
    Object<S, St>: DeserializeOwned,
{
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// One resource from the JSON the controller stores and sends.
/// The Operator API request that applies `docs`, as `meshctl apply` sends
/// it: each resource as its JSON.
pub fn apply_request(docs: &[Resource], dry_run: bool) -> crate::proto::ApplyRequest {
    crate::proto::ApplyRequest {
        resources: docs
            .iter()
            .map(|d| crate::proto::Resource {
                json: d.to_json(),
                ..Default::default()
            })
            .collect(),
        dry_run,
    }
}

pub fn resource_from_json(json: &str) -> Result<Resource, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
    resource_from_value(value)
}

/// YAML of one resource (no document marker).
pub fn to_yaml(resource: &Resource) -> String {
    yaml_of(&resource.to_value())
}

/// YAML of a list, as kubectl prints one: `items:` with each resource.
pub fn list_to_yaml(resources: &[Resource]) -> String {
    let items: Vec<Value> = resources.iter().map(Resource::to_value).collect();
    yaml_of(&serde_json::json!({ "items": items }))
}

fn yaml_of(value: &Value) -> String {
    serde_saphyr::to_string(value).expect("a JSON value always serializes to YAML")
}

/// Pretty JSON of one resource.
pub fn to_json_pretty(resource: &Resource) -> String {
    serde_json::to_string_pretty(&resource.to_value()).expect("a JSON value always serializes")
}

/// Pretty JSON of a list: `{"items": [...]}`.
pub fn list_to_json_pretty(resources: &[Resource]) -> String {
    let items: Vec<Value> = resources.iter().map(Resource::to_value).collect();
    serde_json::to_string_pretty(&serde_json::json!({ "items": items }))
        .expect("a JSON value always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_KINDS: &str = r#"
apiVersion: hostmesh/v1
kind: Service
metadata: {name: web, namespace: shop, labels: {tier: front}}
spec:
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: http}
  mtls: strict
  vip: 240.240.0.10
---
apiVersion: hostmesh/v1
kind: WorkloadGroup
metadata: {name: web, namespace: shop}
spec:
  identity: web
  labels: {app: web, version: v1}
  services: [web]
---
apiVersion: hostmesh/v1
kind: Route
metadata: {name: web-canary, namespace: shop}
spec:
  service: web
  rules:
    - match: {pathPrefix: /api, headers: {x-canary: "1"}, methods: [GET]}
      backends: [{subset: {version: v2}, weight: 100}]
      timeout: 2s
      retries: {attempts: 3, perTryTimeout: 500ms, on: [5xx, reset, connect-failure]}
    - backends: [{subset: {version: v1}, weight: 90}, {subset: {version: v2}, weight: 10}]
---
apiVersion: hostmesh/v1
kind: Policy
metadata: {name: web-allow, namespace: shop}
spec:
  service: web
  action: allow
  rules:
    - from: [{identity: "spiffe://hostmesh.local/ns/shop/sa/frontend"}, {namespace: ops}]
      to: [{methods: [GET], paths: ["/api/*"], ports: [80]}]
"#;

    #[test]
    fn the_design_example_parses_and_round_trips_through_yaml_and_json() {
        let docs = parse_documents(ALL_KINDS).unwrap();
        let kinds: Vec<Kind> = docs.iter().map(Resource::kind).collect();
        assert_eq!(
            kinds,
            vec![
                Kind::Service,
                Kind::WorkloadGroup,
                Kind::Route,
                Kind::Policy
            ]
        );
        let yaml = list_to_yaml(&docs);
        assert_eq!(parse_documents(&yaml).unwrap(), docs, "yaml:\n{yaml}");
        let json = list_to_json_pretty(&docs);
        assert_eq!(parse_documents(&json).unwrap(), docs);
        let multi: String = docs
            .iter()
            .map(|d| format!("---\n{}", to_yaml(d)))
            .collect();
        assert_eq!(parse_documents(&multi).unwrap(), docs, "multi:\n{multi}");
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let e = parse_documents(
            "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80, protocl: http}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("document 1: Service default/web: spec.ports[0].protocl: unknown field `protocl`, expected one of"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_and_enum_values_name_the_field() {
        let e = parse_documents(
            "---\napiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80, protocol: udp}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "document 1: Service default/web: spec.ports[0].protocol: unknown variant `udp`"
            ),
            "{e}"
        );
        let e = parse_documents("apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: {port: 80}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.ports: invalid type: map, expected a sequence"),
            "{e}"
        );
    }

    #[test]
    fn the_envelope_is_checked_first() {
        let cases = [
            (
                "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 1}]}\n",
                "Service default/a: apiVersion: missing",
            ),
            (
                "apiVersion: hostmesh/v2\nkind: Service\nmetadata: {name: a}\n",
                "apiVersion: \"hostmesh/v2\" is not supported",
            ),
            (
                "apiVersion: hostmesh/v1\nkind: Deployment\n",
                "kind: \"Deployment\" is not a hostmesh kind",
            ),
            (
                "apiVersion: hostmesh/v1\nmetadata: {name: a}\n",
                "kind: missing",
            ),
            ("- a\n- b\n", "expected a resource"),
            (
                "apiVersion: hostmesh/v1\nkind: Service\nmetadata: {name: a}\n",
                "missing field `spec`",
            ),
        ];
        for (doc, want) in cases {
            let e = parse_documents(doc).unwrap_err().to_string();
            assert!(e.contains(want), "for {doc:?}: {e}");
        }
    }

    #[test]
    fn yaml_syntax_errors_are_reported() {
        let e = parse_documents("apiVersion: hostmesh/v1\nkind: [unclosed\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("not valid YAML"), "{e}");
    }

    #[test]
    fn validation_errors_carry_the_document_index() {
        let text = format!(
            "{ALL_KINDS}---\napiVersion: hostmesh/v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  ports:\n    - {{port: 80}}\n    - {{port: 70000}}\n"
        );
        let e = parse_documents(&text).unwrap_err().to_string();
        assert_eq!(
            e,
            "document 5: Service shop/web: spec.ports[1].port: 70000 is not a port number"
        );
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = "#".repeat(MAX_INPUT_BYTES + 1);
        assert!(
            parse_documents(&big)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
    }
}
