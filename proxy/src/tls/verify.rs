//! The outbound's check of an inbound's certificate: the mesh CA's chain, and the SPIFFE
//! identity the caller expects instead of a DNS name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use super::{TlsError, parse_identity, spiffe_id, spiffe_uri};

/// The suffix of the server names that carry an expected identity. `.invalid` is
/// reserved (RFC 2606): such a name can never be a real host.
const PLACEHOLDER_SUFFIX: &str = ".spiffe.invalid";

/// Verifies a server certificate against the mesh CA, then checks that its SPIFFE
/// identity is the one encoded in the server name by [`server_name`].
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The placeholder server name that carries `identity` (`spiffe://<mesh>/<service>`) to
/// the verifier: `<service>.<mesh>.spiffe.invalid`.
pub(super) fn server_name(identity: &str) -> Result<ServerName<'static>, TlsError> {
    let (mesh, service) = parse_identity(identity)?;
    let name =
        DnsName::try_from(format!("{service}.{mesh}{PLACEHOLDER_SUFFIX}")).map_err(|_| {
            TlsError::InvalidIdentity {
                identity: identity.to_owned(),
                reason: "cannot be carried in a server name",
            }
        })?;
    Ok(ServerName::DnsName(name))
}

/// The identity a placeholder server name carries, if it is one.
fn expected_identity(server_name: &ServerName<'_>) -> Option<String> {
    let ServerName::DnsName(name) = server_name else {
        return None;
    };
    let (service, mesh) = name
        .as_ref()
        .strip_suffix(PLACEHOLDER_SUFFIX)?
        .split_once('.')?;
    spiffe_id(mesh, service).ok()
}

// === impl SpiffeServerVerifier ===

impl SpiffeServerVerifier {
    pub(super) fn new(roots: Arc<RootCertStore>, provider: &CryptoProvider) -> Self {
        SpiffeServerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = expected_identity(server_name).ok_or_else(|| {
            rustls::Error::General(format!(
                "server name {server_name:?} carries no mesh identity: connect with tls::connect"
            ))
        })?;
        // The chain first: an identity read from an unverified certificate means nothing.
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = spiffe_uri(end_entity);
        if presented.as_deref() == Some(expected.as_str()) {
            return Ok(ServerCertVerified::assertion());
        }
        // `tls::connect` finds this error again and returns it as it is.
        let mismatch = TlsError::WrongPeer {
            expected,
            presented,
        };
        Err(CertificateError::Other(OtherError(Arc::new(mismatch))).into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Never called: the configurations allow TLS 1.3 only. Verify properly anyway.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
