//! Traffic policies in callers' outbounds (SPEC §3 "Retries", "Timeouts", "Circuit
//! breaker", `max_concurrent`), through the real binary and real `mesh-test-app`s.
//!
//! One replica is made to misbehave with the test app's `/only/<id>/<rest>` route: the
//! replica `<id>` answers `/<rest>`, the others answer `/headers` (a JSON echo of the
//! request headers, `x-mesh-attempt` included) with `x-replica`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

/// The outbound address a caller printed as `<key>=http://ADDR` (or `ADDR` for tcp).
fn outbound_as(mesh: &MeshProc, caller: &str, key: &str) -> String {
    let line = mesh.wait_line(&format!("{caller}.0 | "), T);
    field_of(&line, key)
        .trim_start_matches("http://")
        .to_string()
}

/// A caller that prints the outbound address of each of `upstreams` as `<name>=…`.
fn caller(upstreams: &[&str]) -> String {
    let echo: Vec<String> = upstreams
        .iter()
        .map(|u| {
            let stem = u.to_ascii_uppercase().replace('-', "_");
            format!("{u}=${stem}_URL")
        })
        .collect();
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        r#"
[services.caller]
command = ["sh", "-c", "echo {}; exec sleep 1000"]
port = "none"
upstreams = [{}]
"#,
        echo.join(" "),
        list.join(", ")
    )
}

/// A service of `replicas` test apps, round-robin, with `traffic` as its traffic table.
fn service(name: &str, replicas: u32, traffic: &str) -> String {
    format!(
        r#"
[services.{name}]
command = [{app:?}]
replicas = {replicas}
traffic = {{ load_balancer = "round-robin", {traffic} }}
"#,
        app = test_app()
    )
}

/// Wait until every one of `replicas` answers `/whoami` through `out`.
fn all_answer(out: &str, replicas: usize) {
    eventually("every replica to answer", T, || {
        let seen: std::collections::BTreeSet<String> = (0..2 * replicas)
            .filter_map(|_| get(out, "/whoami").ok())
            .filter(|r| r.status == 200)
            .map(|r| r.body)
            .collect();
        (seen.len() == replicas).then_some(())
    });
}

/// The app's `x-mesh-attempt`, from a `/headers` answer.
fn attempt_of(r: &Response) -> String {
    let h: serde_json::Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("not a /headers answer ({e}): {r:?}"));
    h["x-mesh-attempt"].as_str().unwrap_or("").to_string()
}

/// The sum of the samples of `name` on the admin server's `/metrics`.
fn metric(mesh: &MeshProc, name: &str) -> u64 {
    let line = mesh.wait_line("admin on http://", T);
    let admin = line
        .rsplit("http://")
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let r = get(&admin, "/metrics").expect("metrics");
    assert_eq!(r.status, 200, "{r:?}");
    r.body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Stop mesh and prove the apps of `services` (name, replicas) are gone.
fn finish(mut mesh: MeshProc, services: &[(&str, u32)]) {
    let mut pids = Vec::new();
    for (name, replicas) in services {
        for replica in 0..*replicas {
            pids.extend(pids_of(&mesh, "mesh-test-app", name, replica));
        }
    }
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(&pids, Duration::from_secs(5));
}

#[test]
fn timeout_answers_504_counts_queueing_and_spares_long_bodies() {
    let p = Project::new(&format!(
        r#"{api}expose = "127.0.0.1:0"
[services.late]
command = [{app:?}]
env = {{ TEST_APP_DELAY_START_MS = "20000" }}
traffic = {{ timeout = "300ms", queue_timeout = "10s" }}
{caller}"#,
        api = service("api", 1, r#"timeout = "500ms""#),
        app = test_app(),
        caller = caller(&["api", "late"]),
    ));
    let mesh = p.up(&[]);
    let api = outbound_as(&mesh, "caller", "api");
    let late = outbound_as(&mesh, "caller", "late");
    all_answer(&api, 1);

    // No response headers within the timeout: 504 with the mesh's own error.
    let started = Instant::now();
    let r = get(&api, "/sleep/3000").expect("request");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("timeout"), "{r:?}");
    assert!(
        r.body
            .starts_with("mesh: timeout: service=api tried=api.0 attempts=1: "),
        "{r:?}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "the timeout fired after {took:?}"
    );

    // The ingress applies the service's traffic as a caller's outbound does.
    let line = mesh.wait_line("ingress of `api` on ", T);
    let ingress = line.rsplit(" on ").next().unwrap_or("").trim().to_string();
    let r = get(&ingress, "/sleep/3000").expect("request");
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("timeout"), "{r:?}");

    // Headers come at once; the body streams for about 1.2 s, past the timeout.
    let started = Instant::now();
    let r = get(&api, "/stream?n=9&ms=150").expect("stream");
    assert_eq!(r.status, 200, "{r:?}");
    let expected: String = (0..9).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(r.body, expected);
    assert!(started.elapsed() >= Duration::from_millis(1200));

    // Waiting for an endpoint counts toward the timeout: 504 long before queue_timeout.
    let started = Instant::now();
    let r = get(&late, "/whoami").expect("request");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("timeout"), "{r:?}");
    assert!(r.body.contains("tried=none attempts=0"), "{r:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    finish(mesh, &[("api", 1)]);
}

#[test]
fn per_try_timeout_retries_onto_another_replica() {
    let p = Project::new(&format!(
        "{}{}",
        service(
            "api",
            2,
            r#"timeout = "5s", retries = { attempts = 2, per_try_timeout = "300ms", on = ["timeout"] }"#
        ),
        caller(&["api"])
    ));
    let mesh = p.up(&[]);
    let out = outbound_as(&mesh, "caller", "api");
    all_answer(&out, 2);

    let mut retried = 0;
    for _ in 0..4 {
        let started = Instant::now();
        let r = get(&out, "/only/api.0/hang").expect("request");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-replica"), Some("api.1"), "{r:?}");
        if attempt_of(&r) == "2" {
            retried += 1;
            assert!(started.elapsed() >= Duration::from_millis(300));
        } else {
            assert_eq!(attempt_of(&r), "1", "{r:?}");
        }
    }
    // Round-robin sends every other first try to api.0.
    assert!(retried >= 1, "no request was retried");

    // Hanging everywhere: each try times out, and the last one's error is answered.
    let r = http(&out, "GET", "/hang", &[], "").expect("request");
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("timeout"), "{r:?}");
    assert!(r.body.contains("attempts=2"), "{r:?}");
    assert!(r.body.contains("per_try_timeout"), "{r:?}");

    finish(mesh, &[("api", 2)]);
}

#[test]
fn each_retry_condition_retries_and_others_do_not() {
    let p = Project::new(&format!(
        "{}{}{}{}",
        service(
            "api",
            2,
            r#"retries = { attempts = 2, on = ["gateway-error", "reset", "409", "grpc:unavailable"] }"#
        ),
        service(
            "five",
            2,
            r#"retries = { attempts = 2, on = ["5xx", "429"] }"#
        ),
        service("plain", 2, ""),
        caller(&["api", "five", "plain"])
    ));
    let mesh = p.up(&[]);
    let api = outbound_as(&mesh, "caller", "api");
    let five = outbound_as(&mesh, "caller", "five");
    let plain = outbound_as(&mesh, "caller", "plain");
    all_answer(&api, 2);
    all_answer(&five, 2);
    all_answer(&plain, 2);

    // Every try of a request: 4 requests, round-robin, so api.0 gets first tries.
    let retried = |out: &str, method: &str, path: &str, other: &str| {
        let mut retried = 0;
        for _ in 0..4 {
            let body = if method == "POST" { "payload" } else { "" };
            let r = http(out, method, path, &[], body).expect("request");
            assert_eq!(r.status, 200, "{method} {path}: {r:?}");
            assert_eq!(r.header("x-replica"), Some(other), "{method} {path}: {r:?}");
            if attempt_of(&r) == "2" {
                retried += 1;
            }
        }
        assert!(retried >= 1, "{method} {path} was never retried");
    };
    // A `retries` table retries every method, POST with a body included.
    retried(&api, "POST", "/only/api.0/status/503", "api.1");
    retried(&api, "GET", "/only/api.0/status/504", "api.1");
    retried(&api, "POST", "/only/api.0/close", "api.1");
    retried(&api, "POST", "/only/api.0/status/409", "api.1");
    retried(&api, "POST", "/only/api.0/grpc-status/14", "api.1");
    retried(&five, "POST", "/only/five.0/status/500", "five.1");
    // The default rule: a GET is retried after a 503.
    retried(&plain, "GET", "/only/plain.0/status/503", "plain.1");

    // Conditions not listed are answered as they are, after one try: the failing
    // replica's answer comes back, and the other replica only ever sees first tries.
    let not_retried = |out: &str, method: &str, path: &str, status: u16| {
        let failing = path.split('/').nth(2).unwrap_or_default();
        let mut seen = 0;
        for _ in 0..4 {
            let r = http(out, method, path, &[], "").expect("request");
            if r.header("x-replica") == Some(failing) {
                assert_eq!(r.status, status, "{method} {path}: {r:?}");
                seen += 1;
            } else {
                assert_eq!(r.status, 200, "{method} {path}: {r:?}");
                assert_eq!(attempt_of(&r), "1", "{method} {path} was retried: {r:?}");
            }
        }
        assert!(seen >= 1, "{method} {path} never answered {status}");
    };
    not_retried(&api, "GET", "/only/api.0/status/404", 404);
    not_retried(&api, "GET", "/only/api.0/status/500", 500);
    not_retried(&api, "POST", "/only/api.0/grpc-status/13", 200);
    // 429s are never retried, even when listed.
    not_retried(&five, "GET", "/only/five.0/status/429", 429);
    // Without a `retries` table a POST is not retried after a 503.
    not_retried(&plain, "POST", "/only/plain.0/status/503", 503);

    finish(mesh, &[("api", 2), ("five", 2), ("plain", 2)]);
}

#[test]
fn the_budget_caps_retries_during_a_total_outage() {
    let p = Project::new(&format!(
        "{}{}",
        service(
            "api",
            1,
            r#"retries = { attempts = 3, on = ["5xx"], budget = 0.2 }"#
        ),
        caller(&["api"])
    ));
    let mesh = p.up(&[]);
    let out = outbound_as(&mesh, "caller", "api");
    all_answer(&out, 1);
    let before: u64 = get(&out, "/count").expect("count").body.parse().expect("n");

    // Every request fails: without a budget, 300 requests would reach the app 900 times.
    let originals = 300u64;
    let started = Instant::now();
    for _ in 0..originals {
        let r = get(&out, "/status/500").expect("request");
        assert_eq!(r.status, 500);
    }
    let after: u64 = get(&out, "/count").expect("count").body.parse().expect("n");
    let reached = after - before;
    let retries = reached - originals;
    // Within one 10 s window: 0.2 × the originals, plus 10 per second of the window
    // (and the requests before this burst add to the originals).
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the burst must fit in one window"
    );
    let bound = (0.2 * (originals + before) as f64) as u64 + 100;
    assert!(
        retries <= bound,
        "{retries} retries for {originals} requests (bound {bound})"
    );
    assert!(
        retries >= 100,
        "only {retries} retries: the budget held back too much"
    );
    assert_eq!(metric(&mesh, "mesh_retries_total"), retries);

    finish(mesh, &[("api", 1)]);
}

#[test]
fn a_failing_endpoint_is_ejected_probed_and_readmitted() {
    let p = Project::new(&format!(
        "{}{}",
        service(
            "api",
            2,
            r#"circuit_breaker = { consecutive_failures = 2, base_ejection = "500ms", max_ejection = "1s", max_ejected_percent = 50 }"#
        ),
        caller(&["api"])
    ));
    let mesh = p.up(&[]);
    let out = outbound_as(&mesh, "caller", "api");
    all_answer(&out, 2);
    let failing = "/only/api.0/status/500";

    // Two 500s in a row from api.0 eject it.
    let mut failures = 0;
    for _ in 0..8 {
        let r = get(&out, failing).expect("request");
        if r.status == 500 {
            failures += 1;
            if failures == 2 {
                break;
            }
        }
    }
    assert_eq!(failures, 2, "api.0 did not fail twice");
    let ejected = Instant::now();

    // Traffic avoids api.0 until the ejection ends; then one request is the probe.
    let next_failure = |what: &str| {
        eventually(what, T, || {
            let r = get(&out, failing).expect("request");
            if r.status == 500 {
                return Some(Instant::now());
            }
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.header("x-replica"), Some("api.1"), "{r:?}");
            None
        })
    };
    let probe = next_failure("the first probe");
    let first = probe - ejected;
    assert!(
        first >= Duration::from_millis(400) && first < Duration::from_secs(5),
        "first probe after {first:?}"
    );
    // The probe failed: ejected again, twice as long (capped at max_ejection = 1 s).
    let probe2 = next_failure("the second probe");
    let second = probe2 - probe;
    assert!(
        second >= Duration::from_millis(900) && second < Duration::from_secs(6),
        "second probe after {second:?}"
    );

    // A successful probe readmits api.0: round-robin over both again.
    let readmitted = eventually("api.0 to be readmitted", T, || {
        let r = get(&out, "/whoami").expect("request");
        assert_eq!(r.status, 200, "{r:?}");
        (r.body == "api.0").then(Instant::now)
    });
    let third = readmitted - probe2;
    assert!(
        third >= Duration::from_millis(900),
        "readmitted after {third:?}"
    );
    let seen: Vec<String> = (0..4)
        .map(|_| get(&out, "/whoami").expect("request").body)
        .collect();
    assert!(seen.iter().any(|b| b == "api.0"), "{seen:?}");
    assert!(seen.iter().any(|b| b == "api.1"), "{seen:?}");
    // The first ejection and the two failed probes.
    assert_eq!(metric(&mesh, "mesh_ejections_total"), 3);

    finish(mesh, &[("api", 2)]);
}

#[test]
fn circuit_open_when_every_endpoint_is_ejected() {
    let p = Project::new(&format!(
        "{}{}",
        service(
            "api",
            1,
            r#"queue_timeout = "10s", circuit_breaker = { consecutive_failures = 1, base_ejection = "20s", max_ejected_percent = 0 }"#
        ),
        caller(&["api"])
    ));
    let mesh = p.up(&[]);
    let out = outbound_as(&mesh, "caller", "api");
    all_answer(&out, 1);

    // One endpoint can always be ejected, whatever max_ejected_percent says.
    let r = get(&out, "/status/500").expect("request");
    assert_eq!(r.status, 500);
    let started = Instant::now();
    let r = get(&out, "/whoami").expect("request");
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("circuit-open"), "{r:?}");
    assert!(
        r.body
            .starts_with("mesh: circuit-open: service=api tried=none attempts=0: "),
        "{r:?}"
    );
    assert!(
        took < Duration::from_secs(3),
        "circuit-open must not wait queue_timeout: {took:?}"
    );

    finish(mesh, &[("api", 1)]);
}

#[test]
fn max_concurrent_answers_overloaded_after_queue_timeout() {
    let p = Project::new(&format!(
        "{}{}",
        service("api", 1, r#"max_concurrent = 1, queue_timeout = "300ms""#),
        caller(&["api"])
    ));
    let mesh = p.up(&[]);
    let out = outbound_as(&mesh, "caller", "api");
    all_answer(&out, 1);
    let line = mesh.wait_line("test-app api.0 listening on ", T);
    let app = line.rsplit(' ').next().unwrap_or("").to_string();
    let count = || -> u64 { get(&app, "/count").expect("count").body.parse().expect("n") };
    let before = count();

    // A request that never gets an answer holds the only slot.
    let mut hang = TcpStream::connect(&out).expect("connect");
    write!(hang, "GET /hang HTTP/1.1\r\nHost: {out}\r\n\r\n").expect("write");
    eventually("the app to receive /hang", T, || {
        (count() > before).then_some(())
    });

    let started = Instant::now();
    let r = get(&out, "/whoami").expect("request");
    let took = started.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("overloaded"), "{r:?}");
    assert!(
        r.body.starts_with("mesh: overloaded: service=api "),
        "{r:?}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "waited {took:?} for a slot"
    );

    // The slot comes back when the hanging request goes away.
    drop(hang);
    eventually("the slot to be free again", T, || {
        get(&out, "/whoami").ok().filter(|r| r.status == 200)
    });

    finish(mesh, &[("api", 1)]);
}

#[test]
fn tcp_timeout_bounds_connection_setup_only() {
    let p = Project::new(&format!(
        r#"
[services.echo]
command = [{app:?}, "tcp-echo"]
protocol = "tcp"
traffic = {{ timeout = "300ms" }}

[services.late]
command = [{app:?}, "tcp-echo"]
protocol = "tcp"
env = {{ TEST_APP_DELAY_START_MS = "20000" }}
traffic = {{ timeout = "300ms", queue_timeout = "10s" }}

[services.caller]
command = ["sh", "-c", "echo echo=$ECHO_ADDR late=$LATE_ADDR; exec sleep 1000"]
port = "none"
upstreams = ["echo", "late"]
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let echo = outbound_as(&mesh, "caller", "echo");
    let late = outbound_as(&mesh, "caller", "late");

    let mut conn = eventually("echo to accept through the outbound", T, || {
        let mut s = TcpStream::connect(&echo).ok()?;
        s.set_read_timeout(Some(patience(Duration::from_secs(10))))
            .ok()?;
        s.write_all(b"one").ok()?;
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).ok()?;
        (&buf == b"one").then_some(s)
    });
    let opened = Instant::now();

    // Setup that cannot finish (no endpoint yet) is cut at the timeout, not at
    // queue_timeout: the connection is closed without data. Twice, so that the echo
    // connection above stays open well past its own timeout meanwhile.
    for _ in 0..2 {
        let started = Instant::now();
        let mut s = TcpStream::connect(&late).expect("connect");
        s.set_read_timeout(Some(patience(Duration::from_secs(10))))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let took = started.elapsed();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "closed after {took:?}"
        );
    }
    mesh.wait_line("mesh: timeout: service=late tried=none attempts=0", T);

    // An established connection outlives the timeout.
    assert!(opened.elapsed() >= Duration::from_millis(500));
    conn.write_all(b"two").expect("write after the timeout");
    let mut buf = [0u8; 3];
    conn.read_exact(&mut buf).expect("echo after the timeout");
    assert_eq!(&buf, b"two");
    drop(conn);

    finish(mesh, &[("echo", 1)]);
}

#[test]
fn mesh_check_shows_the_traffic_policies_callers_apply() {
    let p = Project::new(
        r#"
[services.api]
command = "api"
traffic = { timeout = "5s", retries = { attempts = 2, on = ["5xx", "reset"], per_try_timeout = "1s" }, circuit_breaker = { consecutive_failures = 3 }, max_concurrent = 8 }

[services.plain]
command = "plain"
"#,
    );
    let (code, out, err) = p.check();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "traffic (applied by callers): timeout 5s; retries 2 tries on 5xx, reset (budget 0.2), 1s per try; \
             circuit breaker after 3 failures, ejection 1s..1m, at most 50%; max_concurrent 8"
        ),
        "{out}"
    );
    // Defaults print nothing.
    assert_eq!(
        out.matches("traffic (applied by callers)").count(),
        1,
        "{out}"
    );
}
