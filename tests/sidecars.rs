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

/// An app that floods its stdout (numbered lines, far more than mesh buffers for the
/// terminal), then serves HTTP and logs each request. `$1` is the test app.
const FLOOD_THEN_SERVE: &str = r#"
echo $$ > api.pid
awk 'BEGIN { for (i = 0; i < 50000; i++) printf "flood %06d ......................................................................\n", i }'
exec "$1"
"#;

#[test]
fn a_stalled_terminal_never_holds_the_apps() {
    use std::io::BufRead;
    const FLOOD: usize = 50_000;
    const REQUESTS: usize = 50;
    let p = Project::new(&format!(
        r#"
[services.api]
command = ["sh", "flood.sh", {app:?}]
expose = "127.0.0.1:0"
env = {{ TEST_APP_LOG = "1" }}
"#,
        app = test_app()
    ));
    p.write("flood.sh", FLOOD_THEN_SERVE);
    /// Kills mesh if the test fails half-way (its shims then stop everything else).
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // mesh's stdout is a pipe that the test stops reading once it knows the ingress, as
    // a paused `mesh up | less` would: it fills, and mesh's terminal writes block.
    let mut child = std::process::Command::new(mesh_bin())
        .args(["up", "-f"])
        .arg(p.file("mesh.toml"))
        .current_dir(p.path())
        .env("MESH_STATE_DIR", ".mesh")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mesh");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut child = Guard(child);
    let mut shown = Vec::new();
    let ingress = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).expect("read") > 0,
            "mesh ended early"
        );
        let addr = line
            .trim()
            .split("ingress of `api` on ")
            .nth(1)
            .map(str::to_string);
        shown.push(line.trim_end().to_string());
        if let Some(addr) = addr {
            break addr;
        }
    };

    // The app gets past its flood and serves, and logging each request never blocks it.
    let app = read_pid(&p, "api.pid", T);
    let shim = parent_of(app).expect("the app's parent");
    let first = eventually("api to answer while the terminal is stalled", T, || {
        get(&ingress, "/whoami").ok().filter(|r| r.status == 200)
    });
    assert_eq!(first.body, "api.0");
    for i in 1..REQUESTS {
        let r = get(&ingress, "/whoami").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!((r.status, r.body.as_str()), (200, "api.0"), "request {i}");
    }
    // Its file gets every line, in order, while the terminal still takes nothing.
    let log = p.file(".mesh/logs/api.0.log");
    let flood_of = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split_once(" stdout flood "))
            .map(|(_, rest)| rest.chars().take(6).collect())
            .collect()
    };
    let text = eventually("every line in api.0.log", T, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let requests = text.lines().filter(|l| l.contains(" GET /whoami ")).count();
        (requests == REQUESTS && flood_of(&text).len() == FLOOD).then_some(text)
    });
    for (i, n) in flood_of(&text).iter().enumerate() {
        assert_eq!(n, &format!("{i:06}"), "line {i} of the flood");
    }

    // Reading again, the terminal gets mesh's notice of what it did not show.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(shown));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                seen.lock().expect("lock").push(line);
            }
        })
    };
    let notice = eventually("the notice of lines not shown", T, || {
        seen.lock()
            .expect("lock")
            .iter()
            .find(|l| l.contains("lines not shown"))
            .cloned()
    });
    let dir = notice
        .split_once(" lines not shown (terminal too slow); all are in ")
        .map(|(_, dir)| std::path::PathBuf::from(dir))
        .unwrap_or_else(|| panic!("{notice:?}"));
    assert!(notice.starts_with("mesh | "), "{notice:?}");
    assert_eq!(
        dir.canonicalize().expect("the named directory"),
        p.file(".mesh/logs").canonicalize().expect("logs dir")
    );

    let _ = kill(Pid::from_raw(child.0.id() as i32), Signal::SIGTERM);
    let status = eventually("mesh to exit", T, || child.0.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(0));
    reader.join().expect("reader");
    assert_gone(&[app, shim], Duration::from_secs(2));

    // Every line of the app was either shown or counted in a notice.
    let seen = seen.lock().expect("lock");
    let on_terminal = seen.iter().filter(|l| l.starts_with("api.0 | ")).count();
    let not_shown: usize = seen
        .iter()
        .filter_map(|l| l.strip_prefix("mesh | ")?.split_once(" lines not shown ("))
        .map(|(n, _)| n.parse::<usize>().expect("a count"))
        .sum();
    let in_file = std::fs::read_to_string(&log).expect("log").lines().count();
    assert!(not_shown > 0);
    assert_eq!(on_terminal + not_shown, in_file);
}
