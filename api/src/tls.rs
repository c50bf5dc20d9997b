//! rustls configuration for every hostmesh connection, with one crypto
//! provider (ring) and SPIFFE verification on both ends.
//!
//! Peers are identified by the SPIFFE URI SAN of a certificate that chains
//! to a root of the trust bundle, never by DNS name: hosts reach each other
//! and the controller by whatever address the operator has, and the name a
//! client puts in SNI is not what it checks. Each verifier is told what
//! identity it expects ([`Expect`]).
//!
//! Certificates are served through [`SwappableCert`], so a renewed
//! certificate is used by new handshakes at once while established
//! connections carry on.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::pki::{self, PkiError};
use crate::spiffe::SpiffeId;

/// ALPN of the controller's gRPC port.
pub const ALPN_H2: &[u8] = b"h2";

/// The process-wide ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Installs ring as rustls' process default. Call first thing in `main`:
/// some libraries (tonic, quinn) build configs without naming a provider,
/// and two available providers make rustls' builders panic.
pub fn install_default_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{what}: {detail}")]
    Config { what: String, detail: String },
}

/// The roots a mesh trusts, and its trust domain.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    pub trust_domain: String,
    pub roots: Arc<RootCertStore>,
    pub roots_der: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn from_pem(
        trust_domain: &str,
        roots_pem: &str,
        what: &str,
    ) -> Result<TrustBundle, TlsError> {
        let certs = pki::certs_from_pem(roots_pem, what)?;
        TrustBundle::from_der(trust_domain, certs, what)
    }

    pub fn from_der(
        trust_domain: &str,
        certs: Vec<CertificateDer<'static>>,
        what: &str,
    ) -> Result<TrustBundle, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots.add(cert.clone()).map_err(|e| TlsError::Config {
                what: what.to_string(),
                detail: format!("not usable as a trust anchor: {e}"),
            })?;
        }
        Ok(TrustBundle {
            trust_domain: trust_domain.to_string(),
            roots: Arc::new(roots),
            roots_der: certs,
        })
    }

    pub fn to_pem(&self) -> String {
        pki::certs_to_pem(&self.roots_der)
    }

    /// `sha256:<hex>` SPKI pins of every root.
    pub fn pins(&self) -> Vec<String> {
        self.roots_der
            .iter()
            .filter_map(|c| pki::CertInfo::parse(c).ok().map(|i| i.spki_pin))
            .collect()
    }
}

/// Which peer identities a verifier accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this identity.
    Exactly(SpiffeId),
    /// Any of these.
    OneOf(Vec<SpiffeId>),
    /// Any identity in the bundle's trust domain.
    TrustDomain,
}

impl Expect {
    fn accepts(&self, id: &SpiffeId, trust_domain: &str) -> bool {
        match self {
            Expect::Exactly(want) => want == id,
            Expect::OneOf(ids) => ids.contains(id),
            Expect::TrustDomain => id.trust_domain() == trust_domain,
        }
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        W::CertExpired { .. } => CertificateError::Expired.into(),
        W::CertNotValidYet { .. } => CertificateError::NotValidYet.into(),
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding.into(),
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}

#[derive(Debug)]
struct IdentityMismatch(String);

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityMismatch {}

fn mismatch(detail: String) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(IdentityMismatch(detail)))).into()
}

/// The SPIFFE ID of a verified end-entity certificate: exactly one URI SAN,
/// and it must parse.
pub fn spiffe_id_of(end_entity: &CertificateDer<'_>) -> Option<SpiffeId> {
    let ee = webpki::EndEntityCert::try_from(end_entity).ok()?;
    let mut uris = ee.valid_uri_names();
    match (uris.next(), uris.next()) {
        (Some(one), None) => one.parse().ok(),
        _ => None,
    }
}

/// Verifies a chain to the bundle and the leaf's SPIFFE identity.
fn verify_chain(
    bundle: &TrustBundle,
    algs: &WebPkiSupportedAlgorithms,
    expect: &Expect,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    ee.verify_for_usage(
        algs.all,
        &bundle.roots.roots,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    let uris: Vec<&str> = ee.valid_uri_names().collect();
    let id: SpiffeId = match uris.as_slice() {
        [one] => one
            .parse()
            .map_err(|e: crate::spiffe::SpiffeIdError| mismatch(e.to_string()))?,
        [] => return Err(mismatch("certificate has no SPIFFE URI SAN".to_string())),
        _ => {
            return Err(mismatch(format!(
                "certificate has {} URI SANs; an SVID has exactly one",
                uris.len()
            )));
        }
    };
    if expect.accepts(&id, &bundle.trust_domain) {
        Ok(())
    } else {
        Err(mismatch(format!(
            "peer identity {id} is not the one expected ({expect:?})"
        )))
    }
}

/// Client side: checks the server's chain and SPIFFE identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expect: Expect,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: TrustBundle, expect: Expect) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            bundle,
            expect,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(
            &self.bundle,
            &self.algs,
            &self.expect,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: checks a client's chain and SPIFFE identity. With
/// `mandatory: false` a client without a certificate is let through (the
/// controller's join and trust-bundle calls); the application then decides
/// per call.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    expect: Expect,
    mandatory: bool,
    hints: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: TrustBundle, expect: Expect, mandatory: bool) -> SpiffeClientVerifier {
        let hints = bundle.roots.subjects();
        SpiffeClientVerifier {
            bundle,
            expect,
            mandatory,
            hints,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            &self.bundle,
            &self.algs,
            &self.expect,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Accepts any server chain but records it (the handshake signature is
/// still checked, so the server holds the key of what it presented). Used
/// only by `meshd join` to fetch the trust bundle, which it then checks
/// against the operator's `--ca-hash` before sending anything secret.
#[derive(Debug)]
pub struct CaptureServerVerifier {
    algs: WebPkiSupportedAlgorithms,
    captured: std::sync::Mutex<Vec<CertificateDer<'static>>>,
}

impl Default for CaptureServerVerifier {
    fn default() -> Self {
        CaptureServerVerifier {
            algs: provider().signature_verification_algorithms,
            captured: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl CaptureServerVerifier {
    pub fn captured(&self) -> Vec<CertificateDer<'static>> {
        self.captured.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl ServerCertVerifier for CaptureServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        if let Ok(mut captured) = self.captured.lock() {
            *captured = chain;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A certificate and key that can be replaced while configs using it live.
#[derive(Debug)]
pub struct SwappableCert(std::sync::RwLock<Arc<CertifiedKey>>);

impl SwappableCert {
    pub fn new(key: CertifiedKey) -> Arc<SwappableCert> {
        Arc::new(SwappableCert(std::sync::RwLock::new(Arc::new(key))))
    }

    pub fn replace(&self, key: CertifiedKey) {
        if let Ok(mut current) = self.0.write() {
            *current = Arc::new(key);
        }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(&self, _client_hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for SwappableCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls certified key from a PEM chain (leaf first) and PEM key; checks
/// that the key belongs to the leaf.
pub fn certified_key(chain_pem: &str, key_pem: &str, what: &str) -> Result<CertifiedKey, TlsError> {
    let chain = pki::certs_from_pem(chain_pem, what)?;
    let key = pki::key_from_pem(key_pem, what)?;
    certified_key_der(chain, key, what)
}

pub fn certified_key_der(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    what: &str,
) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Config {
        what: what.to_string(),
        detail: format!("certificate and key do not go together: {e}"),
    })
}

/// TLS 1.3 server config presenting `cert` and verifying clients with
/// `client_verifier`.
pub fn server_config(
    cert: Arc<SwappableCert>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            what: "server TLS config".to_string(),
            detail: e.to_string(),
        })?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// TLS 1.3 client config with `verifier` and, optionally, a client
/// certificate.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    cert: Option<Arc<SwappableCert>>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            what: "client TLS config".to_string(),
            detail: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(cert) => builder.with_client_cert_resolver(cert),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// The SNI name clients send. Identity is checked on the SPIFFE ID, so this
/// only has to be a syntactically valid name.
pub fn server_name_for(id: &SpiffeId) -> ServerName<'static> {
    let name = format!("{}.{}.{}", id.name(), id.namespace(), "hostmesh.invalid");
    ServerName::try_from(name)
        .unwrap_or_else(|_| ServerName::try_from("hostmesh.invalid").expect("a valid DNS name"))
}
