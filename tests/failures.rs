//! Every failure told (SPEC §1): an app that breaks a response mid-body, and an app that
//! answers bytes that are not HTTP, through the real binary. The caller sees what came
//! and then the break (or a 502 that names a protocol error); the operator sees the
//! failure in the metrics, in `mesh ps`'s success rate and in the log.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

/// A raw HTTP/1.1 app in Python: for every connection it reads the request head, writes
/// `ANSWER` and closes.
fn raw_app(answer: &str) -> String {
    format!(
        r#"
import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(64)
while True:
    c, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    if data:
        c.sendall({answer:?}.encode())
    c.close()
"#
    )
}

fn project(answer: &str) -> Project {
    let p = Project::new(
        r#"
[services.api]
command = ["python3", "app.py"]
expose = "127.0.0.1:0"
"#,
    );
    p.write("app.py", &raw_app(answer));
    p
}

/// One raw HTTP/1.1 GET; everything the server sent until it closed.
fn raw_get(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(patience(Duration::from_secs(10))))
        .expect("timeout");
    write!(s, "GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("the connection closes");
    String::from_utf8_lossy(&raw).into_owned()
}

fn metric(admin: &str, name: &str, labels: &[&str]) -> u64 {
    let text = get(admin, "/metrics").expect("metrics").body;
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[test]
fn a_response_the_app_cuts_reaches_the_caller_as_cut_and_counts_as_a_failure() {
    let p = project("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789");
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    let admin = admin(&mesh);
    // The status and the ten bytes arrive, then the connection closes: never a whole
    // response, never an empty reply.
    let got = eventually("the app to answer through the ingress", T, || {
        let got = raw_get(&addr);
        got.starts_with("HTTP/1.1 200").then_some(got)
    });
    assert!(got.contains("content-length: 1000"), "{got:?}");
    let body = got.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert_eq!(body, "0123456789", "{got:?}");

    // The operator sees a failed request of api.
    eventually("mesh_errors_total to count the cut", T, || {
        (metric(
            &admin,
            "mesh_errors_total{",
            &["service=\"api\"", "kind=\"reset\""],
        ) >= 1)
            .then_some(())
    });
    mesh.wait_line(
        "api.0: the app broke its response to ingress after 10 body bytes",
        T,
    );
    let status = get(&admin, "/api/status").expect("status").body;
    let rows: serde_json::Value = serde_json::from_str(&status).expect("json");
    let rate = rows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["service"] == "api"))
        .and_then(|r| r["success_rate"].as_f64())
        .expect("a success rate for api");
    assert!(
        rate < 1.0,
        "the cut response counted as a success: {status}"
    );

    let pids = pids_of(&mesh, "app.py", "api", 0);
    stop_mesh(mesh, &pids);
}

#[test]
fn an_answer_that_is_not_http_is_a_502_naming_a_protocol_error() {
    let p = project("this is not http at all\r\n\r\n");
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    let r = eventually("the mesh to answer for api", T, || {
        get(&addr, "/").ok().filter(|r| r.status == 502)
    });
    assert_eq!(r.header("x-mesh-error"), Some("reset"), "{r:?}");
    assert!(r.body.contains("protocol error"), "{}", r.body);
    assert!(!r.body.contains("closed the connection"), "{}", r.body);
    let pids = pids_of(&mesh, "app.py", "api", 0);
    stop_mesh(mesh, &pids);
}
