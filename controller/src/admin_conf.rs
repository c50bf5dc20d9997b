//! The admin credential file (`admin.conf`), like a kubeconfig: where the
//! controller is, the roots to verify it with, and the operator's client
//! certificate and key. Written by the controller at first start (mode
//! 0600) and kept current across CA rotation; read by meshctl.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub const KIND: &str = "AdminCredential";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminCredential {
    pub api_version: String,
    pub kind: String,
    /// https://HOST:PORT of the controller.
    pub controller: String,
    pub trust_domain: String,
    /// PEM roots that verify the controller.
    pub ca_bundle: String,
    /// PEM chain of the admin certificate.
    pub certificate: String,
    /// PEM private key.
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading credentials {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("credentials {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("writing credentials {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl AdminCredential {
    pub fn load(path: &Path) -> Result<AdminCredential, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
            path: path.display().to_string(),
            source,
        })?;
        AdminCredential::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, what: &str) -> Result<AdminCredential, CredentialError> {
        let invalid = |message: String| CredentialError::Invalid {
            path: what.to_string(),
            message,
        };
        let cred: AdminCredential =
            serde_saphyr::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if cred.kind != KIND {
            return Err(invalid(format!("kind is {:?}, expected {KIND}", cred.kind)));
        }
        if !cred.controller.starts_with("https://") {
            return Err(invalid(format!(
                "controller {:?} must be an https:// URL",
                cred.controller
            )));
        }
        Ok(cred)
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("plain strings always serialize")
    }

    pub fn write(&self, path: &Path) -> Result<(), CredentialError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| CredentialError::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        crate::ca::write_private_file(path, self.to_yaml().as_bytes()).map_err(|source| {
            CredentialError::Write {
                path: path.display().to_string(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_kind() {
        let cred = AdminCredential {
            api_version: "hostmesh/v1".into(),
            kind: KIND.into(),
            controller: "https://127.0.0.1:15012".into(),
            trust_domain: "hostmesh.local".into(),
            ca_bundle: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            certificate: "c\n".into(),
            key: "k\n".into(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.conf");
        cred.write(&path).unwrap();
        assert_eq!(AdminCredential::load(&path).unwrap(), cred);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let bad = cred.to_yaml().replace(KIND, "Other");
        assert!(
            AdminCredential::parse(&bad, "x")
                .unwrap_err()
                .to_string()
                .contains("expected AdminCredential")
        );
    }
}
