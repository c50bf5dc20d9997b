//! meshctl's connection to the controller: gRPC over TLS 1.3, presenting
//! the admin certificate and checking that the server is the mesh's
//! controller (its SPIFFE ID under the credential's roots).

use std::path::{Path, PathBuf};

use hostmesh_api::connect;
use hostmesh_api::tls::{self, SwappableCert, TrustBundle};
use tonic::transport::Channel;

use crate::admin_conf::AdminCredential;

pub const DEFAULT_CREDENTIALS: &str = "/etc/hostmesh/admin.conf";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no admin credential found: pass --credentials FILE, set HOSTMESH_CREDENTIALS, or copy admin.conf from the controller's data directory to {DEFAULT_CREDENTIALS}"
    )]
    NoCredentials,
    #[error("{0}")]
    Credentials(String),
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
}

/// Which credential file to use: flag, then environment, then the default
/// path if it exists.
pub fn find_credentials(flag: Option<&Path>) -> Result<PathBuf, ClientError> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let default = PathBuf::from(DEFAULT_CREDENTIALS);
    if default.exists() {
        return Ok(default);
    }
    Err(ClientError::NoCredentials)
}

/// A channel using an admin credential file; `controller` overrides the
/// URL it names.
pub fn admin_channel(
    credentials: &Path,
    controller: Option<&str>,
) -> Result<(Channel, String), ClientError> {
    let cred =
        AdminCredential::load(credentials).map_err(|e| ClientError::Credentials(e.to_string()))?;
    let what = credentials.display().to_string();
    let bundle = TrustBundle::from_pem(
        &cred.trust_domain,
        &cred.ca_bundle,
        &format!("{what}: caBundle"),
    )
    .map_err(|e| ClientError::Credentials(e.to_string()))?;
    let key = tls::certified_key(&cred.certificate, &cred.key, &what)
        .map_err(|e| ClientError::Credentials(e.to_string()))?;
    let url = controller.map(str::to_string).unwrap_or(cred.controller);
    let channel = connect::channel(&url, bundle, Some(SwappableCert::new(key)), None)?;
    Ok((channel, url))
}
