//! The data path through real sidecars (SPEC §1): ingress and outbound → inbound → app,
//! discovery fed by readiness, balancing, the default retry rule, mesh errors, TCP, drain.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;

const T: Duration = Duration::from_secs(30);

/// Wait until both replicas of `api` are endpoints: successful answers come from each.
fn both_replicas_answer(out: &str) {
    eventually("both replicas to answer", T, || {
        let seen: std::collections::BTreeSet<String> = (0..6)
            .filter_map(|_| get(out, "/whoami").ok())
            .filter(|r| r.status == 200)
            .map(|r| r.body)
            .collect();
        (seen.len() == 2).then_some(())
    });
}

fn two_replicas_and_a_caller(extra: &str) -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"
traffic = {{ load_balancer = "round-robin" }}
{extra}

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ))
}

#[test]
fn http_through_ingress_and_outbound_reaches_every_replica() {
    let p = two_replicas_and_a_caller("");
    let mut mesh = p.up(&[]);
    let ingress = ingress(&mesh, "api");
    let out = outbound(&mesh, "caller");

    // Both replicas become endpoints; round-robin then alternates exactly.
    both_replicas_answer(&out);
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let r = get(&out, "/whoami").expect("request");
        assert_eq!(r.status, 200);
        *counts.entry(r.body).or_insert(0) += 1;
    }
    assert_eq!(counts.get("api.0"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("api.1"), Some(&10), "{counts:?}");

    // What the app sees through an outbound.
    let r = http(
        &out,
        "GET",
        "/headers",
        &[("x-mesh-client-id", "forged")],
        "",
    )
    .expect("headers");
    assert_eq!(r.status, 200);
    let h: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/caller", "{h}");
    assert_eq!(h["host"], out.as_str(), "Host is forwarded unchanged: {h}");
    assert_eq!(h["x-mesh-attempt"], "1", "{h}");
    assert_eq!(
        h["_version"], "HTTP/1.1",
        "the app is spoken to in the caller's version: {h}"
    );
    let tp = h["traceparent"].as_str().expect("traceparent created");
    assert_eq!(tp.len(), 55, "{tp}");
    assert!(tp.starts_with("00-"), "{tp}");
    assert!(
        h.get("x-mesh-source").is_none(),
        "internal headers are stripped: {h}"
    );

    // And through the ingress.
    let r = http(
        &ingress,
        "GET",
        "/headers",
        &[
            ("x-mesh-anything", "1"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
        "",
    )
    .expect("headers");
    let h: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(h["x-mesh-client-id"], "spiffe://t/ingress", "{h}");
    assert!(
        h.get("x-mesh-anything").is_none(),
        "x-mesh-* stripped at the ingress: {h}"
    );
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(
        h["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "an incoming traceparent is propagated: {h}"
    );

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn killing_a_replica_under_traffic_costs_no_get() {
    let p = two_replicas_and_a_caller("");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    both_replicas_answer(&out);
    let victim = eventually("api.1's pid", T, || {
        pids_of(&mesh, "mesh-test-app", "api", 1).pop()
    });
    let mut statuses = Vec::new();
    for i in 0..300 {
        if i == 100 {
            let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
        }
        let r = get(&out, "/whoami").expect("no connection error for the client");
        statuses.push((r.status, r.body));
    }
    let failures: Vec<_> = statuses.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failures.is_empty(), "client-visible errors: {failures:?}");
    // The replica is restarted and serves again.
    mesh.wait_line("api.1 was killed by signal 9", T);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn a_request_waits_for_an_upstream_that_is_still_starting() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
env = {{ TEST_APP_DELAY_START_MS = "800" }}

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    let r = get(&out, "/whoami").expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "api.0");
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn no_ready_endpoint_is_a_named_503_after_queue_timeout() {
    let p = Project::new(&format!(
        r#"
[services.never]
command = [{app:?}]
expose = "127.0.0.1:0"
traffic = {{ queue_timeout = "300ms" }}
health = {{ exec = ["false"] }}
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    let ingress = ingress(&mesh, "never");
    let started = std::time::Instant::now();
    let r = get(&ingress, "/whoami").expect("request");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited out queue_timeout"
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-mesh-error"), Some("no-endpoints"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(
        r.body
            .starts_with("mesh: no-endpoints: service=never tried=none attempts=0: "),
        "{:?}",
        r.body
    );
    assert_eq!(r.body.lines().count(), 1);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn tcp_through_the_mesh_respects_half_close() {
    let p = Project::new(&format!(
        r#"
[services.echo]
command = [{app:?}, "tcp"]
protocol = "tcp"
replicas = 2

[services.caller]
command = ["sh", "-c", "echo addr=$ECHO_ADDR; exec sleep 1000"]
port = "none"
upstreams = ["echo"]
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    let addr = field_of(&mesh.wait_line("caller.0 | addr=", T), "addr");
    let reply = eventually("a tcp reply", T, || {
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"hello").ok()?;
        s.shutdown(std::net::Shutdown::Write).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    });
    assert!(
        reply == "echo.0:hello" || reply == "echo.1:hello",
        "{reply:?}"
    );
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn shutdown_lets_an_in_flight_request_finish() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"
env = {{ TEST_APP_LOG = "1" }}
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    let ingress = ingress(&mesh, "api");
    eventually("api to serve", T, || {
        get(&ingress, "/whoami").ok().filter(|r| r.status == 200)
    });
    let slow = {
        let ingress = ingress.clone();
        std::thread::spawn(move || get(&ingress, "/sleep/1500"))
    };
    mesh.wait_line("/sleep/1500", T);
    mesh.signal(Signal::SIGTERM);
    let r = slow
        .join()
        .expect("thread")
        .expect("the slow request completes");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "slept 1500");
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn a_stalled_terminal_does_not_freeze_the_sidecars() {
    use std::io::BufRead;
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"

[services.chatty]
command = ["sh", "-c", "yes 'a line of chatter that nobody reads' | head -c 3000000; exec sleep 1000"]
port = "none"
replicas = 3
"#,
        app = test_app()
    ));
    // mesh's stdout is a pipe that stops being read once the ingress is known: it fills
    // up and every terminal write of mesh blocks from then on.
    /// Kills mesh if the test fails half-way (its shims then stop everything else).
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(mesh_bin())
        .args(["up", "-f"])
        .arg(p.file("mesh.toml"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mesh");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut child = Guard(child);
    let mut line = String::new();
    let ingress = loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).expect("read") > 0,
            "mesh ended early"
        );
        if let Some(addr) = line.trim().split("ingress of `api` on ").nth(1) {
            break addr.to_string();
        }
    };
    // The chatter now fills the pipe; the data path must keep working regardless.
    for _ in 0..20 {
        let r = eventually("a response through the ingress", T, || {
            get(&ingress, "/whoami").ok().filter(|r| r.status == 200)
        });
        assert_eq!(r.body, "api.0");
    }
    let _ = kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM);
    // Drain what mesh wrote so it can finish its shutdown.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let status = eventually("mesh to exit", T, || child.0.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(0));
}
