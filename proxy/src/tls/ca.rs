//! The mesh CA and the leaves it issues (SPEC §8).

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use super::{TlsError, check_name, provider, spiffe_id};

/// How long a leaf is valid unless told otherwise (SPEC §8); renew at half of it.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a new CA is valid: ten years, leap days included.
const CA_LIFETIME: Duration = Duration::from_secs(3653 * 24 * 60 * 60);
/// How far back `notBefore` is set, so a clock a little behind (another host sharing
/// the CA, §9) does not reject a certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(60);
/// File names of the CA in the state directory.
const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";

/// The mesh certificate authority: the only root the sidecars trust, and the issuer of
/// their leaves.
pub struct Ca {
    cert: CertificateDer<'static>,
    /// The CA's subject, key identifier method and signing key, as rcgen signs with them.
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate as the one trust anchor of every verifier.
    roots: Arc<RootCertStore>,
    not_after: SystemTime,
}

/// A leaf certificate with its private key, for one service of one mesh.
///
/// It is usable both as a TLS server certificate (inbound) and as a client certificate
/// (outbound). Present it through an [`Identity`](super::Identity).
#[derive(Clone)]
pub struct Leaf {
    /// `spiffe://<mesh>/<service>`, the certificate's only URI SAN.
    pub identity: String,
    /// The serial number in upper-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// When the certificate expires.
    pub not_after: SystemTime,
    /// The chain (the leaf alone: peers hold the CA) and the signing key, as rustls
    /// presents them.
    pub(super) certified: Arc<CertifiedKey>,
}

// === impl Ca ===

impl Ca {
    /// Load `state_dir/ca.crt` and `state_dir/ca.key` if both exist, or create them if
    /// neither does: a new CA valid for ten years, the key file with mode 0600, the
    /// certificate 0644 (less the umask).
    ///
    /// If only one of them exists, or they cannot be parsed, or the key is not the
    /// certificate's, it fails with an error that names the file: mesh never replaces a
    /// CA silently, since every certificate it issued would stop being trusted. The
    /// state directory must exist.
    pub fn load_or_create(state_dir: &Path, mesh_name: &str) -> Result<Ca, TlsError> {
        let cert = state_dir.join(CA_CERT_FILE);
        let key = state_dir.join(CA_KEY_FILE);
        match (exists(&cert)?, exists(&key)?) {
            (true, true) => Ca::load(&cert, &key),
            (true, false) => Err(TlsError::IncompleteCa {
                present: cert,
                missing: key,
            }),
            (false, true) => Err(TlsError::IncompleteCa {
                present: key,
                missing: cert,
            }),
            (false, false) => {
                let (ca, cert_pem, key_pem) = Ca::create(mesh_name)?;
                // The key first: a crash in between leaves a key without a certificate,
                // which the next start reports instead of overwriting.
                write_new(&key, key_pem.as_bytes(), 0o600)?;
                write_new(&cert, cert_pem.as_bytes(), 0o644)?;
                tracing::info!(cert = %cert.display(), fingerprint = %ca.fingerprint_sha256(), "created the mesh CA");
                Ok(ca)
            }
        }
    }

    /// Load a CA from a PEM certificate and a PEM PKCS#8 private key (`[mesh] ca = {
    /// cert, key }`). Errors name the file at fault.
    ///
    /// An expired CA loads: [`Ca::not_after`] tells, and the caller decides.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, TlsError> {
        let cert_pem = fs::read(cert).map_err(|source| TlsError::Read {
            path: cert.to_owned(),
            source,
        })?;
        let key_pem = fs::read(key).map_err(|source| TlsError::Read {
            path: key.to_owned(),
            source,
        })?;
        warn_if_readable_by_others(key);

        let invalid_cert = |reason: String| TlsError::InvalidCert {
            path: cert.to_owned(),
            reason,
        };
        let invalid_key = |reason: String| TlsError::InvalidKey {
            path: key.to_owned(),
            reason,
        };

        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid_cert(format!("bad PEM: {e}")))?;
        let der = match <[_; 1]>::try_from(certs) {
            Ok([der]) => der,
            Err(certs) if certs.is_empty() => {
                return Err(invalid_cert(
                    "no `BEGIN CERTIFICATE` block found".to_owned(),
                ));
            }
            Err(certs) => {
                return Err(invalid_cert(format!(
                    "expected one certificate, found {}",
                    certs.len()
                )));
            }
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| invalid_cert(format!("bad X.509: {e}")))?;
        if !parsed.is_ca() {
            return Err(invalid_cert(
                "not a CA certificate (basic constraints do not say CA)".to_owned(),
            ));
        }

        let key_text =
            std::str::from_utf8(&key_pem).map_err(|_| invalid_key("not PEM text".to_owned()))?;
        let key_pair = KeyPair::from_pem(key_text).map_err(|e| {
            invalid_key(format!(
                "{e} (expected an unencrypted PKCS#8 `BEGIN PRIVATE KEY` block)"
            ))
        })?;
        if key_pair.public_key_raw() != &*parsed.public_key().subject_public_key.data {
            return Err(TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            });
        }
        let not_after = system_time(parsed.validity().not_after.timestamp());

        let issuer = Issuer::from_ca_cert_der(&der, key_pair)
            .map_err(|e| invalid_cert(format!("cannot sign with it: {e}")))?;
        let roots = roots(&der).map_err(|e| invalid_cert(format!("not a trust anchor: {e}")))?;
        Ok(Ca {
            cert: der,
            issuer,
            roots,
            not_after,
        })
    }

    /// A new CA in memory only, valid for ten years (for tests and throw-away meshes).
    pub fn generate(mesh_name: &str) -> Result<Ca, TlsError> {
        Ca::create(mesh_name).map(|(ca, _, _)| ca)
    }

    /// The SHA-256 fingerprint of the CA certificate, as `AB:CD:…` (like `openssl x509
    /// -fingerprint -sha256`).
    pub fn fingerprint_sha256(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.cert);
        hex(digest.as_ref(), ":")
    }

    /// The CA certificate's subject, the issuer of every leaf (`CN=…`, as `openssl x509
    /// -subject` prints it, RFC 4514 order).
    pub fn subject(&self) -> String {
        match x509_parser::parse_x509_certificate(&self.cert) {
            Ok((_, parsed)) => parsed.subject().to_string(),
            Err(_) => String::from("(unreadable)"),
        }
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issue a leaf for `spiffe://<mesh_name>/<service>`, valid from now for `lifetime`
    /// ([`DEFAULT_LEAF_LIFETIME`] normally). Names are DNS labels (SPEC §3).
    pub fn issue(
        &self,
        mesh_name: &str,
        service: &str,
        lifetime: Duration,
    ) -> Result<Leaf, TlsError> {
        let now = SystemTime::now();
        self.issue_with_validity(mesh_name, service, now - BACKDATE, now + lifetime)
    }

    /// Issue a leaf valid exactly from `not_before` to `not_after`, which may be in the
    /// past (to test expiry) or the future.
    pub fn issue_with_validity(
        &self,
        mesh_name: &str,
        service: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Leaf, TlsError> {
        let identity = spiffe_id(mesh_name, service)?;
        let issue_error = |source: Box<dyn std::error::Error + Send + Sync>| TlsError::Issue {
            identity: identity.clone(),
            source,
        };
        let serial = random_serial().map_err(|e| issue_error(e.into()))?;

        let mut params = CertificateParams::default();
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, service);
        let uri = identity
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| issue_error(e.into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;

        let key = KeyPair::generate().map_err(|e| issue_error(e.into()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| issue_error(e.into()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider())
            .map_err(|e| issue_error(e.into()))?;
        Ok(Leaf {
            identity,
            serial: hex(&serial, ""),
            not_after,
            certified: Arc::new(certified),
        })
    }

    /// The CA certificate as the one trust anchor of a verifier.
    pub(super) fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    /// A new CA with its certificate and key in PEM.
    fn create(mesh_name: &str) -> Result<(Ca, String, String), TlsError> {
        let create_error = |e: Box<dyn std::error::Error + Send + Sync>| TlsError::CreateCa(e);
        // The CA names the mesh, whose name leaves carry too.
        check_name(&format!("spiffe://{mesh_name}"), mesh_name)?;
        let now = SystemTime::now();
        let not_after = now + CA_LIFETIME;

        let mut params = CertificateParams::default();
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        let serial = random_serial().map_err(|e| create_error(e.into()))?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "mesh");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("mesh CA {mesh_name}"));
        // Path length 0: the CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];

        let key = KeyPair::generate().map_err(|e| create_error(e.into()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| create_error(e.into()))?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let der = cert.der().clone();
        let roots = roots(&der).map_err(|e| create_error(e.into()))?;
        // Read the expiry back as `load` does: the certificate holds whole seconds.
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| create_error(e.to_string().into()))?;
        let not_after = system_time(parsed.validity().not_after.timestamp());
        let ca = Ca {
            cert: der,
            issuer: Issuer::new(params, key),
            roots,
            not_after,
        };
        Ok((ca, cert_pem, key_pem))
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Ca")
            .field("fingerprint_sha256", &self.fingerprint_sha256())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === impl Leaf ===

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Leaf")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// === helpers ===

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Write `contents` to `path` with `mode`, through a temporary file renamed into place,
/// so that `path` never holds half a file.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        // A stale temporary file from a crash would keep its old mode: start afresh.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        if mode & 0o077 == 0 {
            // Exactly the private mode, whatever the umask.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

fn warn_if_readable_by_others(key: &Path) {
    if let Ok(meta) = fs::metadata(key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(key = %key.display(), mode = format_args!("{mode:o}"), "the CA key is readable by other users; chmod 600 it");
        }
    }
}

fn roots(cert: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone())?;
    Ok(Arc::new(roots))
}

/// 16 random bytes as a positive serial whose first byte is never 0, so that its DER
/// integer keeps all 16 bytes and reads back the same.
fn random_serial() -> Result<[u8; 16], rustls::Error> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    }
}

/// Upper-case hex, bytes joined by `sep`.
pub(super) fn hex(bytes: &[u8], sep: &str) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(sep)
}
