//! Mutual TLS between sidecars (SPEC §8): the mesh CA, leaf certificates that carry
//! SPIFFE identities, hot-swappable identities for renewal, and the rustls
//! configurations of inbounds (servers) and outbounds (clients).
//!
//! This module is self-contained: it knows nothing of listeners or HTTP.
//!
//! # Usage
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//!
//! use mesh_proxy::tls::{self, Ca, DEFAULT_LEAF_LIFETIME, Identity, TlsError};
//! use tokio::net::TcpStream;
//!
//! async fn example(dir: &Path, inbound: TcpStream, outbound: TcpStream) -> Result<(), TlsError> {
//!     let ca = Ca::load_or_create(dir, "shop")?;
//!     // The inbound of a replica of `api`:
//!     let api = Arc::new(Identity::new(ca.issue("shop", "api", DEFAULT_LEAF_LIFETIME)?));
//!     let server = tls::server_config(&ca, Arc::clone(&api), &[b"h2", b"http/1.1"])?;
//!     // The outbound of `web` to `api`:
//!     let web = Arc::new(Identity::new(ca.issue("shop", "web", DEFAULT_LEAF_LIFETIME)?));
//!     let client = tls::client_config(&ca, web, &[b"h2"])?;
//!
//!     let (from_web, caller) = tls::accept(server, inbound).await?;
//!     assert_eq!(caller, "spiffe://shop/web");
//!     let to_api = tls::connect(client, outbound, "spiffe://shop/api").await?;
//!
//!     // Renewal, at half the lifetime: new handshakes present the new leaf, and
//!     // `from_web` and `to_api` carry on.
//!     api.replace(ca.issue("shop", "api", DEFAULT_LEAF_LIFETIME)?);
//!     # drop((from_web, to_api));
//!     Ok(())
//! }
//! ```
//!
//! # Theory of operation
//!
//! * **One crypto provider.** Every configuration is built with
//!   `builder_with_provider(ring)` and TLS 1.3 only; nothing relies on a process-wide
//!   default provider (PITFALLS "Proxying"). Keys are ECDSA P-256.
//! * **Trust** is the mesh CA and nothing else: it is the only root on both sides.
//!   **Identity** is the one URI SAN `spiffe://<mesh>/<service>` of a leaf; DNS names
//!   mean nothing between sidecars and leaves carry none.
//! * **Inbound.** A client certificate is required and verified against the CA with
//!   webpki ([`WebPkiClientVerifier`]); [`accept`] hands back the caller's identity.
//! * **Outbound.** The server's chain is verified against the CA with webpki, and its
//!   identity must equal the one the caller expects, both *during* the handshake, so a
//!   wrong peer never sees the client certificate nor any request. The expected
//!   identity reaches the verifier through the
//!   [`ServerName`](rustls::pki_types::ServerName): [`connect`] turns
//!   `spiffe://<mesh>/<service>` into the placeholder `<service>.<mesh>.spiffe.invalid`
//!   (mesh and service names are DNS labels, SPEC §3), and the verifier turns it back.
//!   Any other server name fails the handshake, so a configuration used without
//!   [`connect`] fails closed. SNI is not sent: the placeholder never leaves the process.
//! * **Renewal.** An [`Identity`] holds the current leaf; rustls asks it for the
//!   certificate at each handshake, so [`Identity::replace`] applies to new connections
//!   and leaves established ones alone. Session resumption is off on both sides: a
//!   resumed session skips both certificates, so it would outlive a renewal (and a
//!   change of CA). Connections between sidecars are long-lived and pooled, so full
//!   handshakes are rare anyway.
//!
//! Handshakes have no deadline of their own: callers bound [`accept`] and [`connect`]
//! with their own timeouts.

mod ca;
mod renew;
mod verify;

#[cfg(test)]
mod tests;

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{CommonState, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

pub use ca::{Ca, DEFAULT_LEAF_LIFETIME, Leaf};
pub use renew::renew;

/// A client configuration of this module (other modules hold them, never build them).
pub type ClientConfig = rustls::ClientConfig;
/// A server configuration of this module (other modules hold them, never build them).
pub type ServerConfig = rustls::ServerConfig;
/// The client side of an established connection.
pub type ClientStream<S> = tokio_rustls::client::TlsStream<S>;
/// The server side of an established connection.
pub type ServerStream<S> = tokio_rustls::server::TlsStream<S>;

/// ALPN id of the pooled HTTP/2 connection between sidecars.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of the dedicated HTTP/1.1 connection that carries one upgrade (WebSocket).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// What an HTTP inbound offers, in preference order.
pub const ALPN_INBOUND_HTTP: &[&[u8]] = &[ALPN_H2, ALPN_HTTP1];

/// The client configurations of one caller identity, one per kind of connection an
/// outbound opens to inbounds. They share the caller's [`Identity`], so a renewal applies
/// to all of them.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// ALPN `h2`: the pooled, multiplexed HTTP/2 connection.
    pub h2: Arc<rustls::ClientConfig>,
    /// ALPN `http/1.1`: the dedicated connection of one HTTP/1.1 upgrade.
    pub http1: Arc<rustls::ClientConfig>,
    /// No ALPN: an opaque tcp stream.
    pub opaque: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// The configurations presenting `identity` and trusting `ca` only.
    pub fn new(ca: &Ca, identity: &Arc<Identity>) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            h2: client_config(ca, Arc::clone(identity), &[ALPN_H2])?,
            http1: client_config(ca, Arc::clone(identity), &[ALPN_HTTP1])?,
            opaque: client_config(ca, Arc::clone(identity), &[])?,
        })
    }
}

/// Errors of the TLS core. Messages name the file, the identity or the peer involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A CA file could not be read (or its existence checked).
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A new CA file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Only one of the CA's two files exists: mesh never replaces a CA silently.
    #[error(
        "found {} but not {}: restore the missing file, or remove both to create a new CA",
        present.display(),
        missing.display()
    )]
    IncompleteCa { present: PathBuf, missing: PathBuf },
    /// The CA certificate file is not a usable CA certificate.
    #[error("invalid CA certificate {}: {reason}", path.display())]
    InvalidCert { path: PathBuf, reason: String },
    /// The CA key file is not a usable private key.
    #[error("invalid CA key {}: {reason}", path.display())]
    InvalidKey { path: PathBuf, reason: String },
    /// The CA key does not belong to the CA certificate.
    #[error("{} is not the private key of {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// Generating a new CA failed.
    #[error("cannot generate the mesh CA")]
    CreateCa(#[source] Box<dyn StdError + Send + Sync>),
    /// Issuing a leaf certificate failed.
    #[error("cannot issue a certificate for {identity}")]
    Issue {
        identity: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A mesh name, service name or identity does not have the expected shape.
    #[error("invalid identity {identity:?}: {reason}")]
    InvalidIdentity {
        identity: String,
        reason: &'static str,
    },
    /// rustls refused to build a configuration.
    #[error("cannot build the tls configuration")]
    Config(#[source] rustls::Error),
    /// rustls refused to build the client certificate verifier.
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The handshake failed: I/O, protocol, or a certificate that did not verify.
    #[error("tls handshake failed")]
    Handshake(#[source] io::Error),
    /// The server's certificate is valid but names another identity than expected.
    #[error(
        "peer is {}, expected {expected}",
        presented.as_deref().unwrap_or("a certificate without a spiffe identity")
    )]
    WrongPeer {
        expected: String,
        presented: Option<String>,
    },
    /// The client's certificate is valid but carries no SPIFFE identity.
    #[error("peer certificate carries no spiffe identity")]
    NoPeerIdentity,
}

/// The certificate of one sidecar, swappable while it serves.
///
/// It is the certificate resolver of the sidecar's rustls configurations: each new
/// handshake presents the leaf current at that moment, and [`Identity::replace`] never
/// disturbs established connections.
#[derive(Debug)]
pub struct Identity {
    current: RwLock<Leaf>,
}

/// The identity (`spiffe://…`) of the peer of an established connection, taken from the
/// URI SAN of its certificate.
///
/// With the configurations of this module the certificate was verified during the
/// handshake (required from clients, always checked on servers). `None` when the peer
/// sent no certificate or its certificate carries no single `spiffe://` URI.
pub fn peer_identity(conn: &CommonState) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    spiffe_uri(cert)
}

/// The rustls configuration of an inbound: TLS 1.3 only, a client certificate is
/// required and verified against the mesh CA, and `identity` is presented.
///
/// `alpn` lists the protocols offered, in preference order (`h2` and `http/1.1` for
/// HTTP, where `http/1.1` carries upgrades; none for tcp). A client that offers ALPN
/// but none of these fails the handshake.
pub fn server_config(
    ca: &Ca,
    identity: Arc<Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), Arc::clone(&provider))
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No resumption (see the module docs): no tickets, no session cache.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The rustls configuration of an outbound: TLS 1.3 only, `identity` is presented, and
/// the server must hold a certificate of the mesh CA for the identity given to
/// [`connect`].
///
/// `alpn` lists the protocols offered, in preference order; empty for tcp. Use it
/// through [`connect`]: with any other server name the handshake fails.
pub fn client_config(
    ca: &Ca,
    identity: Arc<Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::new(ca.roots(), &provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(identity);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// TLS over `stream` to an inbound that must prove the identity `expected_identity`
/// (`spiffe://<mesh>/<service>`) with a certificate of the mesh CA.
///
/// A server with another identity fails the handshake with [`TlsError::WrongPeer`]
/// before the client certificate is sent.
pub async fn connect<S>(
    config: Arc<rustls::ClientConfig>,
    stream: S,
    expected_identity: &str,
) -> Result<tokio_rustls::client::TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let server_name = verify::server_name(expected_identity)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, stream)
        .await
        .map_err(handshake_error)
}

/// TLS over `stream` from an outbound: the server side of [`connect`]. Returns the
/// stream and the verified identity of the caller.
pub async fn accept<S>(
    config: Arc<rustls::ServerConfig>,
    stream: S,
) -> Result<(tokio_rustls::server::TlsStream<S>, String), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(TlsError::Handshake)?;
    let peer = peer_identity(tls.get_ref().1).ok_or(TlsError::NoPeerIdentity)?;
    Ok((tls, peer))
}

/// [`accept`] on an inbound of `service`, bounded by `within`: a failure (or no
/// handshake in time) is counted in `mesh_tls_handshake_failures_total{side="server"}`
/// and logged with the peer's address, and gives `None` (the connection is dropped).
pub(crate) async fn accept_counted<S>(
    config: Arc<rustls::ServerConfig>,
    stream: S,
    within: std::time::Duration,
    metrics: &crate::metrics::Metrics,
    service: &str,
    peer: std::net::SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<S>, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(within, accept(config, stream)).await {
        Ok(Ok(accepted)) => Some(accepted),
        Ok(Err(error)) => {
            metrics.tls_handshake_failure(service, crate::metrics::Side::Server);
            tracing::info!(service, %peer, error = %error_chain(&error), "tls handshake failed, connection refused");
            None
        }
        Err(_elapsed) => {
            metrics.tls_handshake_failure(service, crate::metrics::Side::Server);
            tracing::info!(service, %peer, "no tls handshake in time, connection closed");
            None
        }
    }
}

/// An error and its sources, `: `-separated, on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

// === impl Identity ===

impl Identity {
    /// An identity presenting `leaf`.
    pub fn new(leaf: Leaf) -> Self {
        Identity {
            current: RwLock::new(leaf),
        }
    }

    /// Present `leaf` from the next handshake on (renewal). Established connections keep
    /// the leaf they were made with.
    pub fn replace(&self, leaf: Leaf) {
        *self.current.write() = leaf;
    }

    /// The serial number and expiry of the leaf presented now.
    pub fn current(&self) -> (String, SystemTime) {
        let leaf = self.current.read();
        (leaf.serial.clone(), leaf.not_after)
    }

    /// The SPIFFE identity presented now.
    pub fn identity(&self) -> String {
        self.current.read().identity.clone()
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().certified)
    }
}

impl ResolvesServerCert for Identity {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Every inbound of the mesh trusts the same CA, and the key is ECDSA P-256,
        // which every TLS 1.3 peer of this module accepts: no choice to make.
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === helpers ===

/// The one crypto provider of the mesh, passed explicitly to every builder.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The single `spiffe://` URI SAN of a DER certificate.
fn spiffe_uri(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        });
    let uri = uris.next()?;
    // An X.509-SVID has exactly one URI SAN; two would make the identity ambiguous.
    match uris.next() {
        None => Some(uri.to_owned()),
        Some(_) => None,
    }
}

/// Map the error of a client handshake, surfacing an identity mismatch found by the
/// verifier as [`TlsError::WrongPeer`].
fn handshake_error(err: io::Error) -> TlsError {
    let mismatch = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<TlsError>()
            }
            _ => None,
        });
    match mismatch {
        Some(TlsError::WrongPeer {
            expected,
            presented,
        }) => TlsError::WrongPeer {
            expected: expected.clone(),
            presented: presented.clone(),
        },
        _ => TlsError::Handshake(err),
    }
}

/// Check a mesh or service name: a DNS label as SPEC §3 defines names.
fn check_name(identity: &str, name: &str) -> Result<(), TlsError> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if valid {
        Ok(())
    } else {
        Err(TlsError::InvalidIdentity {
            identity: identity.to_owned(),
            reason: "mesh and service names are lowercase letters, digits and `-`, \
                     starting with a letter, at most 63 characters",
        })
    }
}

/// Split `spiffe://<mesh>/<service>` into its checked mesh and service names.
fn parse_identity(identity: &str) -> Result<(&str, &str), TlsError> {
    let (mesh, service) = identity
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .ok_or_else(|| TlsError::InvalidIdentity {
            identity: identity.to_owned(),
            reason: "expected spiffe://<mesh>/<service>",
        })?;
    check_name(identity, mesh)?;
    check_name(identity, service)?;
    Ok((mesh, service))
}

/// `spiffe://<mesh>/<service>`, checked.
fn spiffe_id(mesh_name: &str, service: &str) -> Result<String, TlsError> {
    let identity = format!("spiffe://{mesh_name}/{service}");
    check_name(&identity, mesh_name)?;
    check_name(&identity, service)?;
    Ok(identity)
}
