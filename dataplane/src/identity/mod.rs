//! The host's identity: its key, certificate and trust bundle, and their
//! renewal.
//!
//! The certificate is renewed over mTLS with the current one, no token
//! needed, at half its lifetime plus a per-host jitter of up to a tenth of
//! it (so a fleet joined at once does not renew at once). A fresh key is
//! made for each renewal. New TLS handshakes use the new certificate at
//! once; established connections carry on. Time comes from an injected
//! [`Clock`], so tests drive renewal without sleeping.

pub mod store;

use std::sync::{Arc, Mutex};

use hostmesh_api::clock::SharedClock;
use hostmesh_api::connect;
use hostmesh_api::pki::{self, CertInfo};
use hostmesh_api::proto::RenewRequest;
use hostmesh_api::proto::identity_client::IdentityClient;
use hostmesh_api::spiffe::SpiffeId;
use hostmesh_api::tls::{self, SwappableCert, TrustBundle};
use rcgen::PublicKeyData;
use tokio::sync::watch;
use tonic::transport::Channel;

use store::{BUNDLE_FILE, CERT_FILE, HostRecord, KEY_FILE, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Invalid(String),
    #[error("renewing the certificate: {0}")]
    Renew(String),
}

/// When to renew: half the lifetime plus `jitter` (0..1) tenths of it.
pub fn renewal_at(not_before_unix: i64, not_after_unix: i64, jitter: f64) -> i64 {
    let lifetime = (not_after_unix - not_before_unix).max(0) as f64;
    not_before_unix + (lifetime * (0.5 + 0.1 * jitter.clamp(0.0, 1.0))) as i64
}

/// A stable fraction in 0..1 for this host and certificate.
fn jitter_for(host_id: &str, serial: &str) -> f64 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{host_id}/{serial}").as_bytes(),
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

struct Current {
    info: CertInfo,
}

pub struct Identity {
    state: StateDir,
    host: HostRecord,
    spiffe: SpiffeId,
    clock: SharedClock,
    cert: Arc<SwappableCert>,
    current: Mutex<Current>,
    bundle: watch::Sender<TrustBundle>,
    /// Bumped whenever the certificate or the bundle changes.
    generation: watch::Sender<u64>,
    controller_url: String,
    mark: Option<u32>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host", &self.host.host_id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads what `meshd join` stored.
    pub fn load(
        state: StateDir,
        clock: SharedClock,
        controller_url: Option<String>,
        mark: Option<u32>,
    ) -> Result<Arc<Identity>, IdentityError> {
        let host = state.host()?.ok_or_else(|| StateError::NotJoined {
            path: state.file(store::HOST_FILE).display().to_string(),
        })?;
        if let Some(what) = state.finish_key_and_cert()? {
            tracing::warn!(state_dir = %state.path().display(), "{what}");
        }
        let spiffe: SpiffeId =
            host.spiffe_id
                .parse()
                .map_err(|e: hostmesh_api::spiffe::SpiffeIdError| {
                    IdentityError::Invalid(e.to_string())
                })?;
        let chain_pem = state.read_text(CERT_FILE)?;
        let key_pem = state.read_text(KEY_FILE)?;
        let bundle_pem = state.read_text(BUNDLE_FILE)?;
        let what = state.path().display().to_string();
        let key = tls::certified_key(&chain_pem, &key_pem, &what)
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let info = leaf_info(&chain_pem, &what)?;
        let bundle = TrustBundle::from_pem(
            &host.trust_domain,
            &bundle_pem,
            &state.file(BUNDLE_FILE).display().to_string(),
        )
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let controller_url = controller_url
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| host.controller_url.clone());
        Ok(Arc::new(Identity {
            state,
            spiffe,
            clock,
            cert: SwappableCert::new(key),
            current: Mutex::new(Current { info }),
            bundle: watch::channel(bundle).0,
            generation: watch::channel(0).0,
            controller_url,
            host,
            mark,
        }))
    }

    pub fn host(&self) -> &HostRecord {
        &self.host
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe
    }

    pub fn controller_url(&self) -> &str {
        &self.controller_url
    }

    pub fn cert(&self) -> Arc<SwappableCert> {
        self.cert.clone()
    }

    pub fn bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn cert_info(&self) -> CertInfo {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .info
            .clone()
    }

    pub fn renewal_at(&self) -> i64 {
        let info = self.cert_info();
        renewal_at(
            info.not_before_unix,
            info.not_after_unix,
            jitter_for(&self.host.host_id, &info.serial_hex),
        )
    }

    pub fn is_expired(&self) -> bool {
        self.clock.now_unix() >= self.cert_info().not_after_unix
    }

    /// Takes a trust bundle from the controller; true if it changed.
    pub fn set_bundle(&self, pem: &str) -> Result<bool, IdentityError> {
        let bundle = TrustBundle::from_pem(
            &self.host.trust_domain,
            pem,
            "trust bundle from the controller",
        )
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        if bundle.roots_der == self.bundle.borrow().roots_der {
            return Ok(false);
        }
        self.state.write(BUNDLE_FILE, pem.as_bytes(), 0o644)?;
        self.bundle.send_replace(bundle);
        self.generation.send_modify(|g| *g += 1);
        tracing::info!("trust bundle updated");
        Ok(true)
    }

    /// A channel to the controller with the current certificate and bundle.
    pub fn controller_channel(&self) -> Result<Channel, IdentityError> {
        connect::channel(
            &self.controller_url,
            self.bundle(),
            Some(self.cert()),
            self.mark,
        )
        .map_err(|e| IdentityError::Invalid(e.to_string()))
    }

    /// Renews when due; true if it renewed.
    pub async fn renew_if_due(&self, channel: Channel) -> Result<bool, IdentityError> {
        if self.clock.now_unix() < self.renewal_at() {
            return Ok(false);
        }
        self.renew(channel).await?;
        Ok(true)
    }

    /// Gets a new certificate for a new key, now.
    pub async fn renew(&self, channel: Channel) -> Result<(), IdentityError> {
        let key = pki::generate_key().map_err(|e| IdentityError::Renew(e.to_string()))?;
        let csr = pki::build_csr(&key, &self.spiffe, &self.host.host_id)
            .map_err(|e| IdentityError::Renew(e.to_string()))?;
        let mut client = IdentityClient::new(channel);
        let resp = client
            .renew(RenewRequest { csr_pem: csr })
            .await
            .map_err(|s| IdentityError::Renew(s.message().to_string()))?
            .into_inner();
        let chain_pem = resp.certificate_chain_pem;
        let info = leaf_info(&chain_pem, "renewed certificate")?;
        if info.spki_pin != pki::sha256_pin(&key.subject_public_key_info()) {
            return Err(IdentityError::Renew(
                "the controller returned a certificate for another key".to_string(),
            ));
        }
        if info.spiffe_id.as_ref() != Some(&self.spiffe)
            || info.common_name.as_deref() != Some(self.host.host_id.as_str())
        {
            return Err(IdentityError::Renew(format!(
                "the controller returned a certificate for {:?}/{:?}, not {}/{}",
                info.spiffe_id.map(|s| s.to_string()),
                info.common_name,
                self.spiffe,
                self.host.host_id
            )));
        }
        let key_pem = key.serialize_pem();
        let certified = tls::certified_key(&chain_pem, &key_pem, "renewed certificate")
            .map_err(|e| IdentityError::Renew(e.to_string()))?;
        // One change on disk: a crash leaves the old pair or the new one
        // (completed at the next load), never a mismatched pair.
        self.state
            .replace_key_and_cert(key_pem.as_bytes(), chain_pem.as_bytes())?;
        self.cert.replace(certified);
        let not_after = info.not_after_unix;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Current { info };
        if let Some(bundle) = resp.trust_bundle {
            self.set_bundle(&bundle.roots_pem)?;
        }
        self.generation.send_modify(|g| *g += 1);
        tracing::info!(host = %self.host.host_id, not_after = %hostmesh_api::clock::rfc3339(not_after), "certificate renewed");
        Ok(())
    }
}

fn leaf_info(chain_pem: &str, what: &str) -> Result<CertInfo, IdentityError> {
    let chain =
        pki::certs_from_pem(chain_pem, what).map_err(|e| IdentityError::Invalid(e.to_string()))?;
    CertInfo::parse(&chain[0]).map_err(|e| IdentityError::Invalid(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_between_half_and_six_tenths_of_the_lifetime() {
        assert_eq!(renewal_at(0, 86_400, 0.0), 43_200);
        assert_eq!(renewal_at(0, 86_400, 1.0), 51_840);
        assert_eq!(renewal_at(1000, 1000, 0.5), 1000);
        for serial in ["a", "b", "c", "d"] {
            let j = jitter_for("host", serial);
            assert!((0.0..1.0).contains(&j), "{j}");
        }
        assert_ne!(
            jitter_for("host-a", "1"),
            jitter_for("host-b", "1"),
            "hosts differ"
        );
    }
}
