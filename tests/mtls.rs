//! Mutual TLS through the real binary (SPEC §1, §3 `tls`/`ca`, §8): the mesh CA is created
//! once per state_dir and reused, broken CA files stop `mesh up` with a clear error,
//! leaves renew without dropping connections, and `tls = "off"` works with a warning.
//! Handshake refusals and 403 `unauthorized` are in `proxy/tests/mtls.rs`, where two
//! identities of one CA can be set against each other.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

/// The CA fingerprint mesh announced at start.
fn fingerprint(mesh: &MeshProc) -> String {
    let line = mesh.wait_line("mutual TLS between sidecars: CA sha256 ", T);
    let rest = line
        .split("CA sha256 ")
        .nth(1)
        .expect("fingerprint in the line");
    rest.split(',').next().unwrap_or("").trim().to_string()
}

fn api_and_caller() -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ))
}

/// The JSON headers the app saw for a GET `/headers` to `addr`, once it answers.
fn headers_seen(addr: &str) -> serde_json::Value {
    let r = eventually("the app to answer", T, || {
        get(addr, "/headers").ok().filter(|r| r.status == 200)
    });
    serde_json::from_str(&r.body).expect("json")
}

#[test]
fn the_ca_is_created_at_first_start_and_reused_after() {
    let p = api_and_caller();
    let mut mesh = p.up(&[]);
    let first = fingerprint(&mesh);
    let ingress_addr = ingress(&mesh, "api");
    let out = field_of(&mesh.wait_line("caller.0 | url=", T), "url")
        .trim_start_matches("http://")
        .to_string();

    // Identities come from the certificates now.
    let h = headers_seen(&out);
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/caller", "{h}");
    let h = headers_seen(&ingress_addr);
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/ingress", "{h}");

    let key = p.file(".mesh/ca.key");
    let cert = p.file(".mesh/ca.crt");
    let mode = std::fs::metadata(&key)
        .expect("ca.key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the CA key is private");
    let cert_pem = std::fs::read(&cert).expect("ca.crt");
    let key_pem = std::fs::read(&key).expect("ca.key");
    assert!(cert_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);

    let mut again = p.up(&[]);
    assert_eq!(fingerprint(&again), first, "the same CA after a restart");
    assert_eq!(std::fs::read(&cert).expect("ca.crt"), cert_pem);
    assert_eq!(std::fs::read(&key).expect("ca.key"), key_pem);
    let h = headers_seen(&ingress(&again, "api"));
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/ingress", "{h}");
    again.signal(Signal::SIGTERM);
    assert_eq!(again.exit_code(T), 0);
}

/// `mesh up` must fail with exit 1, print `needle` (the file at fault) on stderr, and
/// start nothing.
fn up_fails(p: &Project, needles: &[&str]) {
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 1, "{:#?}", mesh.output());
    let output = mesh.output().join("\n");
    for needle in needles {
        assert!(output.contains(needle), "{needle:?} in:\n{output}");
    }
    assert!(!output.contains("| test-app"), "nothing started:\n{output}");
}

#[test]
fn broken_ca_files_stop_mesh_up_with_a_clear_error() {
    let p = api_and_caller();
    // A first start creates the CA.
    let mut mesh = p.up(&[]);
    fingerprint(&mesh);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    let cert = p.file(".mesh/ca.crt");
    let key = p.file(".mesh/ca.key");
    let cert_pem = std::fs::read(&cert).expect("ca.crt");

    // Corrupt certificate.
    std::fs::write(&cert, "garbage").expect("write");
    up_fails(
        &p,
        &[
            "cannot load the mesh CA",
            "invalid CA certificate",
            &cert.display().to_string(),
        ],
    );
    // A missing key is never replaced by a new CA.
    std::fs::write(&cert, &cert_pem).expect("write");
    let key_pem = std::fs::read(&key).expect("ca.key");
    std::fs::remove_file(&key).expect("remove");
    up_fails(&p, &["but not", &key.display().to_string()]);
    assert!(!key.exists(), "no new key was made");
    // An unreadable key (a directory in its place: root reads any file).
    std::fs::create_dir(&key).expect("mkdir");
    up_fails(&p, &["cannot read", &key.display().to_string()]);
    std::fs::remove_dir(&key).expect("rmdir");
    std::fs::write(&key, &key_pem).expect("write");

    // `[mesh] ca` naming files that do not exist, relative to mesh.toml's directory.
    let text = p.read("mesh.toml").replace(
        "[mesh]\n",
        "[mesh]\nca = { cert = \"pki/ca.pem\", key = \"pki/ca-key.pem\" }\n",
    );
    p.write("mesh.toml", &text);
    up_fails(
        &p,
        &["cannot read", &p.file("pki/ca.pem").display().to_string()],
    );
    // The same files, copied there, are used as they are.
    std::fs::create_dir(p.file("pki")).expect("mkdir");
    std::fs::copy(&cert, p.file("pki/ca.pem")).expect("copy");
    std::fs::copy(&key, p.file("pki/ca-key.pem")).expect("copy");
    std::fs::remove_file(&cert).expect("remove");
    std::fs::remove_file(&key).expect("remove");
    let mut mesh = p.up(&[]);
    fingerprint(&mesh);
    let h = headers_seen(&ingress(&mesh, "api"));
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/ingress", "{h}");
    assert!(
        !cert.exists(),
        "no CA created in state_dir when `ca` is set"
    );
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn tls_off_warns_loudly_and_still_works() {
    let p = api_and_caller();
    let text = p
        .read("mesh.toml")
        .replace("[mesh]\n", "[mesh]\ntls = \"off\"\n");
    p.write("mesh.toml", &text);

    let (code, stdout, stderr) = p.check();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tls               off"), "{stdout}");
    assert!(stderr.contains("warning: tls = \"off\""), "{stderr}");

    let mut mesh = p.up(&[]);
    mesh.wait_line("WARNING: tls = \"off\"", T);
    let out = field_of(&mesh.wait_line("caller.0 | url=", T), "url")
        .trim_start_matches("http://")
        .to_string();
    let h = headers_seen(&out);
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/caller", "{h}");
    assert!(h.get("x-mesh-source").is_none(), "{h}");
    assert!(!p.file(".mesh/ca.key").exists(), "no CA without tls");
    assert_eq!(mesh.count("mutual TLS between sidecars"), 0);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

/// Read until `n` bytes arrived (or fail after the socket's read timeout).
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// An upgraded (raw echo) connection to the app's `/ws` through the ingress.
fn websocket(ingress: &str) -> TcpStream {
    let mut s = TcpStream::connect(ingress).expect("connect");
    s.set_read_timeout(Some(patience(T))).expect("timeout");
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {ingress}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.extend(read_n(&mut s, 1));
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    assert_eq!(read_n(s, msg.len()), msg);
}

#[test]
fn renewal_keeps_long_lived_connections_and_a_stream_of_requests_working() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"

[services.echo]
command = [{app:?}, "tcp-echo"]
protocol = "tcp"

[services.caller]
command = ["sh", "-c", "echo addr=$ECHO_ADDR; exec sleep 1000"]
port = "none"
upstreams = ["echo"]
"#,
        app = test_app()
    ));
    // Leaves live 2 s and are renewed every second.
    let mut mesh = p.up_with_env(&[], &[("MESH_CERT_LIFETIME", "2s"), ("MESH_LOG", "info")]);
    let ingress = ingress(&mesh, "api");
    let tcp = field_of(&mesh.wait_line("caller.0 | addr=", T), "addr");
    eventually("api to serve", T, || {
        get(&ingress, "/whoami").ok().filter(|r| r.status == 200)
    });
    let mut ws = websocket(&ingress);
    echo(&mut ws, b"before");
    let mut stream = eventually("a tcp connection through the mesh", T, || {
        let mut s = TcpStream::connect(&tcp).ok()?;
        s.set_read_timeout(Some(patience(T))).ok()?;
        s.write_all(b"x").ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        Some(s)
    });

    // A stream of requests (each takes 50 ms at the app) until api's inbound leaf has
    // been renewed three more times: by then (2 s at least) every leaf that the open
    // connections were made with has expired.
    let renewed = |mesh: &MeshProc| {
        mesh.output()
            .iter()
            .filter(|l| l.contains("certificate renewed") && l.contains("spiffe://t/api"))
            .count()
    };
    let before = renewed(&mesh);
    let mut requests = 0;
    while renewed(&mesh) < before + 3 {
        let r = get(&ingress, "/sleep/50").expect("request during renewal");
        assert_eq!(r.status, 200, "{}", r.body);
        requests += 1;
        assert!(requests < 400, "no renewal seen:\n{:#?}", mesh.output());
    }
    assert!(
        requests > 5,
        "the stream ran across the renewals ({requests})"
    );

    // Connections made with the first leaves carry on.
    echo(&mut ws, b"after renewals");
    stream.write_all(b"yz").expect("write");
    assert_eq!(read_n(&mut stream, 2), b"yz");
    // New connections handshake with the renewed leaves (the first ones have expired).
    let mut ws2 = websocket(&ingress);
    echo(&mut ws2, b"new connection");
    let mut s = TcpStream::connect(&tcp).expect("connect");
    s.set_read_timeout(Some(patience(T))).expect("timeout");
    echo(&mut s, b"new tcp");
    assert_eq!(
        mesh.count("tls handshake"),
        0,
        "no handshake failed:\n{:#?}",
        mesh.output()
    );
    drop((ws, ws2, stream, s));
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}
