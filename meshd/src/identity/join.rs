//! `meshd join`: get this host its first certificate.
//!
//! 1. Fetch the controller's trust bundle over TLS that records, but does
//!    not yet trust, what the server presents.
//! 2. Find the root whose SubjectPublicKeyInfo hashes to `--ca-hash`. If
//!    none does, stop: nothing secret has been sent.
//! 3. Connect again, trusting only that root and only the controller's
//!    SPIFFE identity; send the token (first to learn which identity to ask
//!    for, then with a CSR for a key made here). The private key never
//!    leaves the host.
//! 4. Check what came back and store it atomically in the state directory.
//!
//! On a host that has joined already this changes nothing and says so,
//! unless `--force`.

use std::sync::Arc;

use hostmesh_api::connect;
use hostmesh_api::pki::{self, CertInfo};
use hostmesh_api::proto::identity_client::IdentityClient;
use hostmesh_api::proto::{JoinRequest, PrepareJoinRequest, TrustBundleRequest};
use hostmesh_api::spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use hostmesh_api::tls::{CaptureServerVerifier, TrustBundle};
use rcgen::PublicKeyData;

use super::store::{BUNDLE_FILE, CERT_FILE, HostRecord, KEY_FILE, StateDir, StateError};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "--ca-hash {0:?}: expected sha256: followed by 64 hex digits (as `meshctl token create` prints it)"
    )]
    BadPin(String),
    #[error("the join token is empty")]
    NoToken,
    #[error("{0}")]
    Connect(String),
    #[error(
        "the controller at {url} does not present the CA of --ca-hash {pin} (its roots: {found}); \
         refusing to send the token to it"
    )]
    PinMismatch {
        url: String,
        pin: String,
        found: String,
    },
    #[error("the controller refused the join: {0}")]
    Refused(String),
    #[error("the controller's answer is not usable: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct JoinArgs {
    pub controller: String,
    pub token: String,
    pub ca_pin: String,
    pub force: bool,
    pub hostname: String,
    pub state: StateDir,
}

#[derive(Debug)]
pub enum JoinOutcome {
    Joined(HostRecord),
    AlreadyJoined(HostRecord),
}

pub fn check_pin(pin: &str) -> Result<String, JoinError> {
    let lower = pin.trim().to_ascii_lowercase();
    let hex = lower
        .strip_prefix("sha256:")
        .ok_or_else(|| JoinError::BadPin(pin.to_string()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(JoinError::BadPin(pin.to_string()));
    }
    Ok(lower)
}

/// Joins answered "aborted" (the token raced other joins) tried again.
const JOIN_RETRIES: u32 = 5;

fn status_text(s: &tonic::Status) -> String {
    s.message().to_string()
}

pub async fn join(args: JoinArgs, now_unix: i64) -> Result<JoinOutcome, JoinError> {
    let pin = check_pin(&args.ca_pin)?;
    let token = args.token.trim().to_string();
    if token.is_empty() {
        return Err(JoinError::NoToken);
    }
    if let Some(existing) = args.state.host()?
        && !args.force
    {
        return Ok(JoinOutcome::AlreadyJoined(existing));
    }

    // 1. The bundle, untrusted.
    let capture = Arc::new(CaptureServerVerifier::default());
    let placeholder = SpiffeId::controller(DEFAULT_TRUST_DOMAIN);
    let channel =
        connect::channel_with_verifier(&args.controller, capture.clone(), None, None, &placeholder)
            .map_err(|e| JoinError::Connect(e.to_string()))?;
    let bundle = IdentityClient::new(channel)
        .get_trust_bundle(TrustBundleRequest {})
        .await
        .map_err(|s| {
            JoinError::Connect(format!(
                "cannot reach the controller at {}: {}",
                args.controller,
                status_text(&s)
            ))
        })?
        .into_inner();
    let offered = TrustBundle::from_pem(
        &bundle.trust_domain,
        &bundle.roots_pem,
        "the controller's trust bundle",
    )
    .map_err(|e| JoinError::BadAnswer(e.to_string()))?;

    // 2. The pinned root.
    let pinned: Vec<_> = offered
        .roots_der
        .iter()
        .filter(|c| {
            CertInfo::parse(c)
                .map(|i| i.spki_pin == pin)
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    if pinned.is_empty() {
        return Err(JoinError::PinMismatch {
            url: args.controller.clone(),
            pin,
            found: offered.pins().join(", "),
        });
    }
    let trust_domain = bundle.trust_domain.clone();
    let pinned = TrustBundle::from_der(&trust_domain, pinned, "pinned CA")
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;

    // 3. Verified channel: only now the token goes out.
    let channel = connect::channel(&args.controller, pinned.clone(), None, None)
        .map_err(|e| JoinError::Connect(e.to_string()))?;
    let mut client = IdentityClient::new(channel);
    let prepared = client
        .prepare_join(PrepareJoinRequest { token: token.clone() })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => JoinError::Connect(format!(
                "the controller at {} does not prove it holds the pinned CA, or cannot be reached: {}",
                args.controller,
                status_text(&s)
            )),
            _ => JoinError::Refused(status_text(&s)),
        })?
        .into_inner();
    let spiffe: SpiffeId = prepared
        .spiffe_id
        .parse()
        .map_err(|e: hostmesh_api::spiffe::SpiffeIdError| JoinError::BadAnswer(e.to_string()))?;
    let key = pki::generate_key().map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    let csr = pki::build_csr(&key, &spiffe, &args.hostname)
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    // "aborted" means the token's use count kept changing under other joins
    // and nothing was spent: try again a few times, spread out.
    let mut tries = 0u32;
    let joined = loop {
        let answer = client
            .join(JoinRequest {
                token: token.clone(),
                csr_pem: csr.clone(),
                hostname: args.hostname.clone(),
            })
            .await;
        match answer {
            Ok(joined) => break joined.into_inner(),
            Err(s) if s.code() == tonic::Code::Aborted && tries < JOIN_RETRIES => {
                tries += 1;
                let wait = 100 * u64::from(tries) + rand::random::<u64>() % 200;
                tracing::info!(retry = tries, wait_ms = wait, "{}", status_text(&s));
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            Err(s) => return Err(JoinError::Refused(status_text(&s))),
        }
    };

    // 4. Check and store.
    let chain = pki::certs_from_pem(&joined.certificate_chain_pem, "issued certificate")
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    let info = CertInfo::parse(&chain[0]).map_err(JoinError::BadAnswer)?;
    if info.spki_pin != pki::sha256_pin(&key.subject_public_key_info()) {
        return Err(JoinError::BadAnswer(
            "the certificate is for another key".to_string(),
        ));
    }
    if info.spiffe_id.as_ref() != Some(&spiffe)
        || info.common_name.as_deref() != Some(joined.host_id.as_str())
    {
        return Err(JoinError::BadAnswer(format!(
            "the certificate names {:?} / {:?}, expected {spiffe} / {}",
            info.spiffe_id.map(|s| s.to_string()),
            info.common_name,
            joined.host_id
        )));
    }
    let full_bundle = joined.trust_bundle.unwrap_or_default();
    // The full bundle arrived over the pinned channel; it must still
    // contain the pinned root.
    let full = TrustBundle::from_pem(&trust_domain, &full_bundle.roots_pem, "trust bundle")
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    if !full.pins().contains(&pin) {
        return Err(JoinError::BadAnswer(
            "the trust bundle does not contain the pinned CA".to_string(),
        ));
    }
    let record = HostRecord {
        host_id: joined.host_id,
        namespace: joined.namespace,
        group: joined.group,
        spiffe_id: spiffe.to_string(),
        trust_domain,
        controller_url: args.controller.clone(),
        ca_pin: pin,
        joined_unix: now_unix,
    };
    let state = &args.state;
    state.create()?;
    if args.force {
        state.clear()?;
    }
    state.write(KEY_FILE, key.serialize_pem().as_bytes(), 0o600)?;
    state.write(CERT_FILE, joined.certificate_chain_pem.as_bytes(), 0o644)?;
    state.write(BUNDLE_FILE, full_bundle.roots_pem.as_bytes(), 0o644)?;
    // host.json last: its presence means "joined".
    state.write_host(&record)?;
    Ok(JoinOutcome::Joined(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_checked_and_normalised() {
        let good = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(
            check_pin(&good).unwrap(),
            format!("sha256:{}", "ab".repeat(32))
        );
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(check_pin(bad).is_err(), "{bad}");
        }
    }
}
