#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::ClientConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use super::*;

const MESH: &str = "m";
/// The bound on any one network step of a test; a refusal must come well before.
const PATIENCE: Duration = Duration::from_secs(10);

fn identity(ca: &Ca, service: &str) -> Arc<Identity> {
    Arc::new(Identity::new(
        ca.issue(MESH, service, DEFAULT_LEAF_LIFETIME).unwrap(),
    ))
}

/// The serial of the peer's certificate, in the format of [`Leaf::serial`].
fn peer_serial(conn: &CommonState) -> String {
    let der = &conn.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    ca::hex(cert.raw_serial(), "")
}

/// A listener on 127.0.0.1:0 and a client socket connected to it.
async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

/// Both ends of one handshake, run concurrently.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
    expected: &str,
) -> (
    Result<(tokio_rustls::server::TlsStream<TcpStream>, String), TlsError>,
    Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError>,
) {
    let (c, s) = socket_pair().await;
    let accepting = tokio::spawn(accept(server, s));
    let connected = timeout(PATIENCE, connect(client, c, expected))
        .await
        .unwrap();
    let accepted = timeout(PATIENCE, accepting).await.unwrap().unwrap();
    (accepted, connected)
}

/// Whether the server side dropped the client: a TLS 1.3 client finishes its handshake
/// before the server has checked its certificate, so a refusal shows on the first read.
async fn refused_on_read(mut tls: tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 16];
    let _ = tls.write_all(b"ping").await;
    matches!(
        timeout(PATIENCE, tls.read(&mut buf)).await.unwrap(),
        Err(_) | Ok(0)
    )
}

/// Echo everything on `tls` until EOF.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut tls: S) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = tls.read(&mut buf).await {
        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

async fn round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    msg: &[u8],
) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    timeout(PATIENCE, tls.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, msg);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// === the CA ===

#[test]
fn load_or_create_creates_then_loads_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let created = Ca::load_or_create(dir.path(), MESH).unwrap();
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    assert_eq!(mode(&dir.path().join("ca.crt")) & 0o600, 0o600);
    assert!(!dir.path().join("ca.key.tmp").exists());

    let loaded = Ca::load_or_create(dir.path(), MESH).unwrap();
    assert_eq!(loaded.fingerprint_sha256(), created.fingerprint_sha256());
    assert_eq!(loaded.not_after(), created.not_after());
    let explicit = Ca::load(&dir.path().join("ca.crt"), &dir.path().join("ca.key")).unwrap();
    assert_eq!(explicit.fingerprint_sha256(), created.fingerprint_sha256());

    // "AB:CD:…", 32 bytes.
    let fingerprint = created.fingerprint_sha256();
    assert_eq!(fingerprint.len(), 32 * 3 - 1, "{fingerprint}");
    assert!(
        fingerprint.split(':').all(|b| b.len() == 2
            && b.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())),
        "{fingerprint}"
    );

    // Ten years, give or take a leap day and the test's duration.
    let years = created
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs()
        / (365 * 24 * 3600);
    assert_eq!(years, 10);
}

#[test]
fn a_ca_with_one_file_missing_is_an_error() {
    for missing in ["ca.key", "ca.crt"] {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path(), MESH).unwrap();
        std::fs::remove_file(dir.path().join(missing)).unwrap();
        let err = Ca::load_or_create(dir.path(), MESH).unwrap_err();
        assert!(matches!(err, TlsError::IncompleteCa { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(missing), "{message}");
        // Nothing was recreated.
        assert!(!dir.path().join(missing).exists());
    }
}

#[test]
fn a_corrupted_ca_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    Ca::load_or_create(dir.path(), MESH).unwrap();
    let key = dir.path().join("ca.key");
    let original = std::fs::read(&key).unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Ca::load_or_create(dir.path(), MESH).unwrap_err();
    assert!(matches!(err, TlsError::InvalidKey { .. }), "{err:?}");
    assert!(err.to_string().contains(&*key.to_string_lossy()), "{err}");

    std::fs::write(&key, original).unwrap();
    let cert = dir.path().join("ca.crt");
    std::fs::write(&cert, "not a certificate").unwrap();
    let err = Ca::load_or_create(dir.path(), MESH).unwrap_err();
    assert!(matches!(err, TlsError::InvalidCert { .. }), "{err:?}");
    assert!(err.to_string().contains(&*cert.to_string_lossy()), "{err}");
}

#[test]
fn a_key_of_another_ca_is_an_error() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    Ca::load_or_create(a.path(), MESH).unwrap();
    Ca::load_or_create(b.path(), MESH).unwrap();
    let err = Ca::load(&a.path().join("ca.crt"), &b.path().join("ca.key")).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
}

#[test]
fn a_leaf_is_not_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate(MESH).unwrap();
    let leaf = ca.issue(MESH, "api", DEFAULT_LEAF_LIFETIME).unwrap();
    let cert = dir.path().join("leaf.crt");
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64_lines(&leaf.certified.cert[0])
    );
    std::fs::write(&cert, pem).unwrap();
    let key = dir.path().join("ca.key");
    Ca::load_or_create(dir.path(), MESH).unwrap();
    let err = Ca::load(&cert, &key).unwrap_err();
    assert!(
        matches!(&err, TlsError::InvalidCert { reason, .. } if reason.contains("not a CA")),
        "{err:?}"
    );
}

/// Minimal base64 for the PEM above, so the tests need no base64 crate.
fn base64_lines(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out.as_bytes()
        .chunks(64)
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn leaves_carry_their_identity_serial_and_expiry() {
    let ca = Ca::generate(MESH).unwrap();
    let before = SystemTime::now();
    let leaf = ca.issue(MESH, "api", Duration::from_secs(3600)).unwrap();
    assert_eq!(leaf.identity, "spiffe://m/api");
    assert_eq!(
        spiffe_uri(&leaf.certified.cert[0]).as_deref(),
        Some("spiffe://m/api")
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf.certified.cert[0]).unwrap();
    assert_eq!(ca::hex(cert.raw_serial(), ""), leaf.serial);
    assert_eq!(leaf.serial.len(), 32);
    let lifetime = leaf.not_after.duration_since(before).unwrap();
    assert!(lifetime.as_secs().abs_diff(3600) <= 2, "{lifetime:?}");

    let other = ca.issue(MESH, "api", Duration::from_secs(3600)).unwrap();
    assert_ne!(other.serial, leaf.serial);

    for (mesh, service) in [("m", "Api"), ("m", "a/b"), ("", "api"), ("m", "")] {
        let err = ca.issue(mesh, service, DEFAULT_LEAF_LIFETIME).unwrap_err();
        assert!(matches!(err, TlsError::InvalidIdentity { .. }), "{err:?}");
    }
}

// === handshakes ===

#[tokio::test]
async fn mutual_handshake_shows_each_side_the_others_identity() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "api"), &[b"h2", b"http/1.1"]).unwrap();
    let client = client_config(&ca, identity(&ca, "web"), &[b"h2"]).unwrap();

    let (accepted, connected) = handshake(server, client, "spiffe://m/api").await;
    let (server_tls, caller) = accepted.unwrap();
    let mut client_tls = connected.unwrap();
    assert_eq!(caller, "spiffe://m/web");
    assert_eq!(
        peer_identity(client_tls.get_ref().1).as_deref(),
        Some("spiffe://m/api")
    );
    let conn = client_tls.get_ref().1;
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    tokio::spawn(echo(server_tls));
    round_trip(&mut client_tls, b"hello through mtls").await;
}

#[tokio::test]
async fn tcp_needs_no_alpn() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "db"), &[]).unwrap();
    let client = client_config(&ca, identity(&ca, "api"), &[]).unwrap();
    let (accepted, connected) = handshake(server, client, "spiffe://m/db").await;
    assert_eq!(accepted.unwrap().1, "spiffe://m/api");
    assert_eq!(connected.unwrap().get_ref().1.alpn_protocol(), None);
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "api"), &[b"h2", b"http/1.1"]).unwrap();
    let (mut client, s) = socket_pair().await;
    let accepting = tokio::spawn(accept(server, s));
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let err = timeout(PATIENCE, accepting)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    // No HTTP answer: at most a TLS alert record (content type 21), then the end.
    let mut answer = Vec::new();
    let _ = timeout(PATIENCE, client.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(!answer.starts_with(b"HTTP"), "{answer:?}");
}

#[tokio::test]
async fn a_client_certificate_of_another_ca_is_refused() {
    let ca = Ca::generate(MESH).unwrap();
    let other = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "api"), &[b"h2"]).unwrap();
    // It trusts the right CA, so only the server can refuse.
    let client = client_config(&ca, identity(&other, "web"), &[b"h2"]).unwrap();

    let (accepted, connected) = handshake(server, client, "spiffe://m/api").await;
    let err = accepted.unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    // Both CAs name the same mesh, so webpki finds the issuer by name and then the
    // signature does not match; with another name it would not find an issuer at all.
    let cause = format!("{err:?}");
    assert!(
        cause.contains("BadSignature") || cause.contains("UnknownIssuer"),
        "{cause}"
    );
    if let Ok(tls) = connected {
        assert!(refused_on_read(tls).await);
    }
}

#[tokio::test]
async fn a_client_without_certificate_is_refused() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "api"), &[b"h2"]).unwrap();
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::new(ca.roots(), &provider);
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();

    let (accepted, connected) = handshake(server, Arc::new(client), "spiffe://m/api").await;
    let err = accepted.unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    assert!(
        format!("{err:?}").contains("NoCertificatesPresented"),
        "{err:?}"
    );
    if let Ok(tls) = connected {
        assert!(refused_on_read(tls).await);
    }
}

#[tokio::test]
async fn expired_leaves_are_refused_on_both_sides() {
    let ca = Ca::generate(MESH).unwrap();
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let expired = |service| {
        Arc::new(Identity::new(
            ca.issue_with_validity(MESH, service, now - 2 * day, now - day)
                .unwrap(),
        ))
    };

    // An expired server: the client refuses it.
    let server = server_config(&ca, expired("api"), &[]).unwrap();
    let client = client_config(&ca, identity(&ca, "web"), &[]).unwrap();
    let (accepted, connected) = handshake(server, client, "spiffe://m/api").await;
    let err = connected.unwrap_err();
    assert!(matches!(err, TlsError::Handshake(_)), "{err:?}");
    assert!(
        format!("{:?}", err).contains("Expired"),
        "the cause says expired: {err:?}"
    );
    assert!(accepted.is_err());

    // An expired client: the server refuses it.
    let server = server_config(&ca, identity(&ca, "api"), &[]).unwrap();
    let client = client_config(&ca, expired("web"), &[]).unwrap();
    let (accepted, connected) = handshake(server, client, "spiffe://m/api").await;
    let err = accepted.unwrap_err();
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    if let Ok(tls) = connected {
        assert!(refused_on_read(tls).await);
    }
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "web"), &[b"h2"]).unwrap();
    let client = client_config(&ca, identity(&ca, "gateway"), &[b"h2"]).unwrap();

    let (accepted, connected) = handshake(server, client, "spiffe://m/api").await;
    match connected {
        Err(TlsError::WrongPeer {
            expected,
            presented,
        }) => {
            assert_eq!(expected, "spiffe://m/api");
            assert_eq!(presented.as_deref(), Some("spiffe://m/web"));
        }
        other => panic!("expected WrongPeer, got {other:?}"),
    }
    // The server never got a client certificate, hence no connection.
    assert!(accepted.is_err());
}

#[tokio::test]
async fn a_server_of_another_mesh_is_refused() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(
        &ca,
        Arc::new(Identity::new(
            ca.issue("n", "api", DEFAULT_LEAF_LIFETIME).unwrap(),
        )),
        &[],
    )
    .unwrap();
    let client = client_config(&ca, identity(&ca, "web"), &[]).unwrap();
    let (_, connected) = handshake(server, client, "spiffe://m/api").await;
    assert!(
        matches!(connected, Err(TlsError::WrongPeer { .. })),
        "{connected:?}"
    );
}

#[tokio::test]
async fn connect_refuses_malformed_identities() {
    let ca = Ca::generate(MESH).unwrap();
    let client = client_config(&ca, identity(&ca, "web"), &[]).unwrap();
    for bad in [
        "api",
        "https://m/api",
        "spiffe://m/api/extra",
        "spiffe://M/api",
    ] {
        let (c, _s) = socket_pair().await;
        let err = connect(Arc::clone(&client), c, bad).await.unwrap_err();
        assert!(
            matches!(err, TlsError::InvalidIdentity { .. }),
            "{bad}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_client_config_used_without_connect_fails_closed() {
    let ca = Ca::generate(MESH).unwrap();
    let server = server_config(&ca, identity(&ca, "api"), &[]).unwrap();
    let client = client_config(&ca, identity(&ca, "web"), &[]).unwrap();
    let (c, s) = socket_pair().await;
    let accepting = tokio::spawn(accept(server, s));
    let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
    let result = tokio_rustls::TlsConnector::from(client)
        .connect(name, c)
        .await;
    assert!(result.is_err());
    assert!(
        timeout(PATIENCE, accepting)
            .await
            .unwrap()
            .unwrap()
            .is_err()
    );
}

#[tokio::test]
async fn replace_applies_to_new_handshakes_and_spares_open_connections() {
    let ca = Ca::generate(MESH).unwrap();
    let first = ca.issue(MESH, "api", DEFAULT_LEAF_LIFETIME).unwrap();
    let second = ca.issue(MESH, "api", DEFAULT_LEAF_LIFETIME).unwrap();
    let (first_serial, second_serial) = (first.serial.clone(), second.serial.clone());
    let api = Arc::new(Identity::new(first));
    let server = server_config(&ca, Arc::clone(&api), &[b"h2"]).unwrap();
    let client = client_config(&ca, identity(&ca, "web"), &[b"h2"]).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                if let Ok((tls, _)) = accept(server, stream).await {
                    echo(tls).await;
                }
            });
        }
    });
    let dial = || async {
        let stream = TcpStream::connect(addr).await.unwrap();
        timeout(
            PATIENCE,
            connect(Arc::clone(&client), stream, "spiffe://m/api"),
        )
        .await
        .unwrap()
        .unwrap()
    };

    let mut old = dial().await;
    assert_eq!(peer_serial(old.get_ref().1), first_serial);
    round_trip(&mut old, b"before").await;

    api.replace(second);
    assert_eq!(api.current().0, second_serial);

    let mut new = dial().await;
    assert_eq!(peer_serial(new.get_ref().1), second_serial);
    round_trip(&mut new, b"new connection").await;
    // The connection made with the first leaf keeps working.
    round_trip(&mut old, b"after the swap").await;

    serving.abort();
}
