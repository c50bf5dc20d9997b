//! X.509 helpers shared by the controller and meshd: reading PEM, reading
//! what a certificate says (SPIFFE ID, host ID, validity, SPKI pin), making
//! keys and certificate signing requests.
//!
//! A host certificate (an X.509 SVID) carries exactly one URI SAN, the
//! host's SPIFFE ID, and its host ID as the subject common name. The pin
//! used by `meshd join --ca-hash` is `sha256:<hex>` of a root's
//! SubjectPublicKeyInfo, as kubeadm's discovery hash is.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::spiffe::SpiffeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: not valid PEM: {detail}")]
    BadPem { what: String, detail: String },
    #[error("{what}: not a valid X.509 certificate: {detail}")]
    BadCertificate { what: String, detail: String },
    #[error("{what}: not a valid private key: {detail}")]
    BadKey { what: String, detail: String },
    #[error("making a certificate request: {0}")]
    Csr(String),
}

/// Every certificate in a PEM text, in order. `what` names the source in
/// errors ("trust bundle from the controller", a file path).
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::BadPem {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            what: what.to_string(),
        });
    }
    for cert in &certs {
        CertInfo::parse(cert).map_err(|detail| PkiError::BadCertificate {
            what: what.to_string(),
            detail,
        })?;
    }
    Ok(certs)
}

/// A private key (PKCS#8, SEC1 or PKCS#1) from PEM.
pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadKey {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// PEM text of DER certificates.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in certs {
        out.push_str(&pem_block("CERTIFICATE", cert.as_ref()));
    }
    out
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// `sha256:<hex>` of DER bytes.
pub fn sha256_pin(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex::encode(digest.as_ref()))
}

/// What hostmesh reads out of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: Option<String>,
    /// Every URI SAN.
    pub uris: Vec<String>,
    /// The single SPIFFE URI SAN, when there is exactly one and it parses.
    pub spiffe_id: Option<SpiffeId>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Lowercase hex without separators.
    pub serial_hex: String,
    /// `sha256:<hex>` of the SubjectPublicKeyInfo.
    pub spki_pin: String,
    pub is_ca: bool,
    pub subject: String,
    pub issuer: String,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string);
        let uris: Vec<String> = match cert.subject_alternative_name() {
            Ok(Some(ext)) => ext
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(format!("bad subjectAltName: {e}")),
        };
        let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
        let spiffe_id = match spiffe.as_slice() {
            [one] => one.parse().ok(),
            _ => None,
        };
        Ok(CertInfo {
            common_name,
            spiffe_id,
            uris,
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            serial_hex: hex::encode(cert.raw_serial())
                .trim_start_matches("00")
                .to_string(),
            spki_pin: sha256_pin(cert.public_key().raw),
            is_ca: cert.is_ca(),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
        })
    }

    /// Half of the validity period has passed at `now_unix`.
    pub fn past_half_life(&self, now_unix: i64) -> bool {
        now_unix >= self.half_life_unix()
    }

    pub fn half_life_unix(&self) -> i64 {
        self.not_before_unix + (self.not_after_unix - self.not_before_unix) / 2
    }
}

/// A new ECDSA P-256 key pair (made on the host; the private key never
/// leaves it).
pub fn generate_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PkiError::Csr(format!("generating a P-256 key: {e}")))
}

pub fn key_pair_from_pem(pem: &str, what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(|e| PkiError::BadKey {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// A PKCS#10 request, PEM, for exactly one URI SAN: `id`. `common_name` is
/// informational (the controller sets the subject itself).
pub fn build_csr(key: &KeyPair, id: &SpiffeId, common_name: &str) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let uri = rcgen::string::Ia5String::try_from(id.to_string())
        .map_err(|e| PkiError::Csr(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(key)
        .map_err(|e| PkiError::Csr(e.to_string()))?;
    csr.pem().map_err(|e| PkiError::Csr(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(id: &str) -> (String, KeyPair) {
        let key = generate_key().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(id).unwrap(),
        )];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "host-1");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key)
    }

    #[test]
    fn reads_spiffe_id_common_name_and_pin() {
        let (pem, key) = self_signed("spiffe://hostmesh.local/ns/shop/sa/web");
        let certs = certs_from_pem(&pem, "test").unwrap();
        let info = CertInfo::parse(&certs[0]).unwrap();
        assert_eq!(
            info.spiffe_id.unwrap().to_string(),
            "spiffe://hostmesh.local/ns/shop/sa/web"
        );
        assert_eq!(info.common_name.as_deref(), Some("host-1"));
        use rcgen::PublicKeyData;
        assert_eq!(info.spki_pin, sha256_pin(&key.subject_public_key_info()));
        assert!(info.spki_pin.starts_with("sha256:") && info.spki_pin.len() == 7 + 64);
    }

    #[test]
    fn pem_round_trips() {
        let (pem, _) = self_signed("spiffe://td/ns/a/sa/b");
        let certs = certs_from_pem(&pem, "test").unwrap();
        let again = certs_to_pem(&certs);
        assert_eq!(certs_from_pem(&again, "again").unwrap(), certs);
    }

    #[test]
    fn bad_pem_is_named() {
        let e = certs_from_pem("hello", "bundle.pem")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "bundle.pem: no PEM certificate found");
        let e = certs_from_pem(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "x",
        )
        .unwrap_err();
        assert!(matches!(e, PkiError::BadCertificate { .. }), "{e}");
    }

    #[test]
    fn csr_carries_exactly_the_requested_id() {
        let key = generate_key().unwrap();
        let id: SpiffeId = "spiffe://hostmesh.local/ns/shop/sa/web".parse().unwrap();
        let pem = build_csr(&key, &id, "host").unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        let uris: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec![id.to_string()]);
    }
}
