//! mesh's own diagnostics (stderr) against hostile clients: what a peer does wrong is
//! counted in `/metrics`, not written to the log once per connection, and the lines that
//! are written carry no colour codes when stderr is not a terminal.

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

/// The bound on one network operation of a test.
const NET: Duration = Duration::from_secs(10);

/// `mesh up` on `project` with its stderr written to `stderr.txt` in the project (a
/// file, so not a terminal), and its stdout collected as usual.
fn up_with_stderr_in_a_file(project: &Project) -> MeshProc {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec "$0" up -f "$1" 2>"$2""#)
        .arg(mesh_bin())
        .arg(project.file("mesh.toml"))
        .arg(project.file("stderr.txt"))
        .current_dir(project.path());
    MeshProc::spawn(cmd)
}

/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("small frame");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// What an HTTP/2 rapid-reset client sends on one connection (CVE-2023-44487): the
/// preface, SETTINGS, then `streams` requests each cancelled with RST_STREAM right after
/// its HEADERS, all in one write.
fn rapid_reset(streams: u32) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    // GET http://x/ in HPACK: static-table `:method GET`, `:scheme http`, `:path /`, and
    // `:authority: x` as a literal.
    let headers = [0x82, 0x86, 0x84, 0x01, 0x01, b'x'];
    for i in 0..streams {
        let stream = 2 * i + 1;
        // HEADERS with END_STREAM | END_HEADERS, then RST_STREAM with CANCEL.
        frame(&mut out, 0x1, 0x5, stream, &headers);
        frame(&mut out, 0x3, 0, stream, &0x8u32.to_be_bytes());
    }
    out
}

/// Send `bytes` on a new connection to `addr`, then read until the server closes (or
/// resets: it may close before it has read everything).
fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(patience(NET))).expect("timeout");
    s.set_write_timeout(Some(patience(NET))).expect("timeout");
    let _ = s.write_all(bytes);
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer to a rapid-reset client: {e}"),
        }
    }
    back
}

/// The value of one sample in Prometheus text, 0 if it is absent.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().expect("a counter"))
}

#[test]
fn rapid_reset_clients_are_counted_not_logged_and_stderr_has_no_colour() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"
"#,
        app = test_app()
    ));
    let mut mesh = up_with_stderr_in_a_file(&p);
    let ingress = ingress(&mesh, "api");
    let admin = admin(&mesh);
    eventually("api to answer through the ingress", T, || {
        get(&ingress, "/whoami").ok().filter(|r| r.status == 200)
    });
    let pids = pids_of(&mesh, "mesh-test-app", "api", 0);
    assert_eq!(pids.len(), 1);

    // Each connection cancels more streams before they are served than the server
    // allows (200): h2 answers GOAWAY ENHANCE_YOUR_CALM and logs a warning each time.
    const CONNECTIONS: u64 = 100;
    let attack = rapid_reset(300);
    for _ in 0..CONNECTIONS {
        exchange(&ingress, &attack);
    }

    let flood = r#"mesh_http_connection_errors_total{listener="ingress",caller="ingress",service="api",kind="flood"}"#;
    let metrics = eventually("every rapid-reset connection to be counted", T, || {
        let metrics = get(&admin, "/metrics").ok()?;
        (sample(&metrics.body, flood) == CONNECTIONS).then_some(metrics.body)
    });
    // Nothing else: the ingress's own connections to the inbound ended cleanly.
    let all: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_http_connection_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(all, CONNECTIONS, "{metrics}");
    // The ingress still serves.
    assert_eq!(get(&ingress, "/whoami").expect("request").status, 200);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(&pids, T);

    let stderr = p.read("stderr.txt");
    assert!(
        !stderr.contains("reached limit"),
        "h2's warning reached the log:\n{stderr}"
    );
    assert!(
        stderr.lines().count() <= 3,
        "{} lines on stderr after {CONNECTIONS} hostile connections:\n{stderr}",
        stderr.lines().count()
    );
    assert!(
        !stderr.contains("\x1b["),
        "colour codes in a file:\n{stderr:?}"
    );
}
