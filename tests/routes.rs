//! Rate limits, routes and fault injection through the real binary and real
//! `mesh-test-app` processes (SPEC §3 "Rate limits and concurrency", "Routes"): 429s
//! beyond the burst, tcp connections closed beyond it, route matching, weighted splits,
//! route timeouts, seeded faults, and `mesh up S` starting S's route backends.
//!
//! Every answer of the test app carries `x-replica: <service>.<replica>`, which says
//! where a request was routed.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

/// Which replica answered `path` with `headers`, and with which status.
fn routed(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let r = http(addr, "GET", path, headers, "").expect("request");
    let replica = r.header("x-replica").unwrap_or("(mesh)").to_string();
    (r.status, replica)
}

/// Stop mesh with SIGTERM, expect exit 0, and check `pids` are gone.
fn stop(mut mesh: MeshProc, pids: &[i32]) {
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(pids, T);
}

#[test]
fn rate_limit_answers_429_with_retry_after_beyond_the_burst() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"
traffic = {{ rate_limit = {{ rps = 0.25, burst = 5 }}, queue_timeout = "20s" }}
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");

    // The first request waits until api is ready; the bucket is full by then.
    let first = get(&addr, "/whoami").expect("request");
    assert_eq!(first.status, 200, "{first:?}");
    let started = Instant::now();
    let mut ok = 1;
    let mut limited = Vec::new();
    for _ in 0..19 {
        let r = get(&addr, "/whoami").expect("request");
        match r.status {
            200 => ok += 1,
            429 => limited.push(r),
            other => panic!("unexpected status {other}: {r:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // burst tokens, plus what refilled at 0.25 rps while the requests ran.
    let most = 5 + (elapsed * 0.25).ceil() as usize;
    assert!(
        (5..=most).contains(&ok),
        "{ok} admitted in {elapsed:.2}s (expected 5..={most})"
    );
    assert_eq!(ok + limited.len(), 20);
    let r = &limited[0];
    assert_eq!(r.header("x-mesh-error"), Some("rate-limited"), "{r:?}");
    assert!(
        r.body
            .starts_with("mesh: rate-limited: service=api tried=api.0 attempts=1: "),
        "{r:?}"
    );
    // An empty bucket at 0.25 rps is up to 4 s away from its next token, rounded up.
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in {r:?}"));
    let expected_max = 4;
    // The first 429 came at most `elapsed` after the bucket ran dry: 4 s - elapsed.
    let expected_min = (4.0 - elapsed).floor().max(1.0) as u64;
    assert!(
        (expected_min..=expected_max).contains(&retry_after),
        "Retry-After {retry_after}, expected {expected_min}..={expected_max}"
    );
    for r in &limited {
        let secs: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!((1..=4).contains(&secs), "{r:?}");
    }
    // The inbound counts each refusal under the calling identity.
    let metrics = get(&admin(&mesh), "/metrics").expect("metrics").body;
    let sample = format!(
        "mesh_errors_total{{caller=\"ingress\",service=\"api\",kind=\"rate-limited\"}} {}",
        limited.len()
    );
    assert!(metrics.contains(&sample), "{sample} in\n{metrics}");
    let pids = pids_of(&mesh, "mesh-test-app", "api", 0);
    stop(mesh, &pids);
}

#[test]
fn rate_limit_of_a_tcp_service_closes_excess_connections() {
    let p = Project::new(&format!(
        r#"
[services.db]
command = [{app:?}, "tcp"]
protocol = "tcp"
expose = "127.0.0.1:0"
traffic = {{ rate_limit = {{ rps = 0.01, burst = 2 }}, queue_timeout = "20s" }}
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "db");
    let exchange = || -> String {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(patience(T))).expect("timeout");
        // A refused connection is closed without data (or reset), possibly before the
        // write or the half-close: those may fail then.
        let _ = s.write_all(b"hi");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let answers: Vec<String> = (0..5).map(|_| exchange()).collect();
    assert_eq!(answers[..2], ["db.0:hi", "db.0:hi"], "{answers:?}");
    assert_eq!(answers[2..], ["", "", ""], "{answers:?}");
    let line = mesh.wait_line("mesh: rate-limited: service=db", T);
    assert!(line.contains("tried=db.0"), "{line}");
    // Counted (under the identity of the calling sidecar's certificate) as well as logged.
    let metrics = get(&admin(&mesh), "/metrics").expect("metrics").body;
    assert!(
        metrics
            .contains(r#"mesh_errors_total{caller="ingress",service="db",kind="rate-limited"} 3"#),
        "{metrics}"
    );
    let pids = pids_of(&mesh, "mesh-test-app", "db", 0);
    stop(mesh, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_of_a_grpc_service_is_grpc_status_8() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
protocol = "grpc"
expose = "127.0.0.1:0"
traffic = {{ rate_limit = {{ rps = 0.01, burst = 1 }}, queue_timeout = "20s" }}
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let req = hyper::Request::post(format!("http://{addr}/grpc"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x02hi")))
            .expect("request");
        let r = tokio::time::timeout(patience(T), send.send_request(req))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(r.status(), 200);
        let head = r.headers().clone();
        let collected = r.into_body().collect().await.expect("body");
        let status = head
            .get("grpc-status")
            .or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")))
            .map(|v| v.to_str().unwrap_or("").to_owned());
        statuses.push((status, head));
    }
    assert_eq!(statuses[0].0.as_deref(), Some("0"), "{statuses:?}");
    let (status, head) = &statuses[1];
    assert_eq!(status.as_deref(), Some("8"), "{head:?}");
    assert_eq!(
        head.get("x-mesh-error").map(|v| v.as_bytes()),
        Some(&b"rate-limited"[..])
    );
    assert!(head.contains_key("retry-after"), "{head:?}");
    let message = head
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        message.starts_with("mesh: rate-limited: service=api tried=api.0"),
        "{message}"
    );
    let pids = pids_of(&mesh, "mesh-test-app", "api", 0);
    stop(mesh, &pids);
}

/// `web` calls `api`; `api` routes to `canary` and `api-v2`; `other` is unrelated.
fn routed_shop() -> Project {
    Project::new(&format!(
        r#"
[mesh]
name = "t"
seed = 1

[services.web]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]

[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"
traffic = {{ queue_timeout = "20s" }}

[[services.api.routes]]
path_prefix = "/v2"
headers = {{ x-canary = "1", x-team = "blue" }}
backends = {{ canary = 1 }}

[[services.api.routes]]
path_prefix = "/v2/"
backends = {{ api-v2 = 1 }}

[[services.api.routes]]
path_prefix = "/split"
backends = {{ api-v2 = 90, api = 10 }}

[services.api-v2]
command = [{app:?}]
traffic = {{ queue_timeout = "20s" }}

[services.canary]
command = [{app:?}]
traffic = {{ queue_timeout = "20s" }}

[services.other]
command = ["sh", "-c", "echo other-started; exec sleep 1000"]
port = "none"
"#,
        app = test_app()
    ))
}

#[test]
fn routes_match_by_segment_and_headers_first_match_wins_and_up_starts_backends() {
    let p = routed_shop();
    // `mesh up web` starts web, its upstream api, and api's route backends.
    let mesh = p.up(&["web"]);
    let addr = ingress(&mesh, "api");
    let line = mesh.wait_line("web.0 | url=", T);
    let out = field_of(&line, "url")
        .trim_start_matches("http://")
        .to_string();

    let canary = [("X-Canary", "1"), ("X-TEAM", "blue")];
    for via in [&addr, &out] {
        // Unmatched traffic goes to the service itself.
        assert_eq!(routed(via, "/", &[]), (200, "api.0".into()), "via {via}");
        // Whole segments only.
        assert_eq!(routed(via, "/v2", &[]), (404, "api-v2.0".into()));
        assert_eq!(routed(via, "/v2/x", &[]), (404, "api-v2.0".into()));
        assert_eq!(routed(via, "/v2beta", &[]), (404, "api.0".into()));
        // Header names in any case, exact values, every condition: the first route.
        assert_eq!(routed(via, "/v2/x", &canary), (404, "canary.0".into()));
        assert_eq!(
            routed(via, "/v2/x", &[("x-canary", "1")]),
            (404, "api-v2.0".into()),
            "one header condition is not enough"
        );
        assert_eq!(
            routed(via, "/v2/x", &[("x-canary", "1"), ("x-team", "Blue")]),
            (404, "api-v2.0".into()),
            "values match exactly"
        );
        assert_eq!(
            routed(via, "/v3", &canary),
            (404, "api.0".into()),
            "the path condition holds too"
        );
    }
    // The `route` label says which route each request took ("" for none).
    let metrics = get(&admin(&mesh), "/metrics").expect("metrics").body;
    for caller in ["ingress", "web"] {
        for (route, class, n) in [
            ("0", "4xx", 1),
            ("1", "4xx", 4),
            ("", "2xx", 1),
            ("", "4xx", 2),
        ] {
            let sample = format!(
                "mesh_requests_total{{caller=\"{caller}\",service=\"api\",route=\"{route}\",status_class=\"{class}\"}} {n}"
            );
            assert!(metrics.contains(&sample), "{sample} in\n{metrics}");
        }
    }
    assert_eq!(
        mesh.count("other-started"),
        0,
        "`other` is not reachable from web and must not start"
    );
    let mut pids = Vec::new();
    for svc in ["api", "api-v2", "canary"] {
        pids.extend(pids_of(&mesh, "mesh-test-app", svc, 0));
    }
    assert_eq!(pids.len(), 3, "{pids:?}");
    stop(mesh, &pids);
}

#[test]
fn weighted_backends_split_within_tolerance() {
    let p = routed_shop();
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    // Both backends serve before counting (so that no draw waits for readiness).
    assert_eq!(routed(&addr, "/v2", &[]).1, "api-v2.0");
    assert_eq!(routed(&addr, "/", &[]).1, "api.0");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..400 {
        let (status, replica) = routed(&addr, "/split", &[]);
        assert_eq!(status, 404);
        *counts.entry(replica).or_default() += 1;
    }
    // 90/10 over 400: mean 360, standard deviation 6; ±30 is five deviations.
    let v2 = counts.get("api-v2.0").copied().unwrap_or(0);
    let api = counts.get("api.0").copied().unwrap_or(0);
    assert_eq!(v2 + api, 400, "{counts:?}");
    assert!((330..=390).contains(&v2), "{counts:?}");
    stop(mesh, &[]);
}

#[test]
fn a_route_timeout_bounds_only_its_requests() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"
traffic = {{ queue_timeout = "20s" }}

[[services.api.routes]]
path_prefix = "/sleep/1500"
timeout = "300ms"
backends = {{ api = 1 }}
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    assert_eq!(routed(&addr, "/", &[]).0, 200);

    let started = Instant::now();
    let r = get(&addr, "/sleep/1500").expect("request");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("timeout"));
    assert!(
        r.body.starts_with(
            "mesh: timeout: service=api tried=api.0 attempts=1: api.0: no response headers within timeout 300ms"
        ),
        "{r:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    // An unmatched slow request is not bounded (api has no timeout of its own).
    let r = get(&addr, "/sleep/600").expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    stop(mesh, &[]);
}

/// A mesh whose `api` aborts half of `/whoami` with 503, and delays all of `/slow/...`.
fn faulty(seed: &str) -> Project {
    Project::new(&format!(
        r#"
[mesh]
name = "t"
{seed}

[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"
traffic = {{ queue_timeout = "20s" }}

[[services.api.routes]]
path_prefix = "/whoami"
backends = {{ api = 1 }}
fault = {{ abort = 503, abort_percent = 50 }}

[[services.api.routes]]
path_prefix = "/sleep"
backends = {{ api = 1 }}
fault = {{ delay = "400ms" }}

[[services.api.routes]]
path_prefix = "/ws"
backends = {{ api = 1 }}
fault = {{ delay = "5s", abort = 500 }}
"#,
        app = test_app()
    ))
}

/// The statuses of 32 `/whoami` requests through `api`'s ingress in a fresh mesh run.
fn fault_sequence(p: &Project, env: &[(&str, &str)]) -> Vec<u16> {
    let mut cmd = Command::new(mesh_bin());
    cmd.arg("up").arg("-f").arg(p.file("mesh.toml"));
    cmd.current_dir(p.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mesh = MeshProc::spawn(cmd);
    let addr = ingress(&mesh, "api");
    // Unmatched requests draw nothing: wait for readiness with them.
    assert_eq!(routed(&addr, "/", &[]).0, 200);
    let mut statuses = Vec::new();
    for _ in 0..32 {
        let r = get(&addr, "/whoami").expect("request");
        if r.status == 503 {
            assert_eq!(r.header("x-mesh-error"), Some("fault"), "{r:?}");
            assert!(
                r.body
                    .starts_with("mesh: fault: service=api tried=none attempts=0: "),
                "{r:?}"
            );
        } else {
            assert_eq!((r.status, r.body.as_str()), (200, "api.0"), "{r:?}");
        }
        statuses.push(r.status);
    }
    stop(mesh, &[]);
    statuses
}

#[test]
fn seeded_faults_repeat_the_same_sequence_in_every_run() {
    let p = faulty("seed = 42");
    let first = fault_sequence(&p, &[]);
    assert!(
        first.contains(&503) && first.contains(&200),
        "50% aborts over 32 requests: {first:?}"
    );
    let second = fault_sequence(&p, &[]);
    assert_eq!(first, second, "the same seed gives the same faults");
    // MESH_SEED overrides the file.
    let reseeded = fault_sequence(&p, &[("MESH_SEED", "43")]);
    assert_ne!(first, reseeded, "another seed gives other faults");
    assert_eq!(reseeded, fault_sequence(&p, &[("MESH_SEED", "43")]));
}

#[test]
fn fault_delay_is_observed_and_upgrades_are_exempt() {
    let p = faulty("");
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    assert_eq!(routed(&addr, "/", &[]).0, 200);

    let started = Instant::now();
    let r = get(&addr, "/sleep/1").expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "delayed: {took:?}");

    // A WebSocket upgrade on a route that delays 5 s and aborts every request: neither
    // applies to upgrades.
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(patience(T))).expect("timeout");
    s.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read the response head");
        assert_eq!(n, 1, "closed early: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(5), "not delayed");
    s.write_all(b"ping").expect("write upgraded");
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"ping");
    drop(s);
    stop(mesh, &[]);
}

#[test]
fn mesh_check_shows_routes_and_rate_limits_and_warns_about_unreachable_routes() {
    let p = Project::new(
        r#"
[services.api]
command = "api"
traffic = { rate_limit = { rps = 200, burst = 400 } }

[[services.api.routes]]
path_prefix = "/v2"
headers = { X-Canary = "1" }
backends = { api-v2 = 90, api = 10 }
timeout = "2s"
fault = { delay = "100ms", delay_percent = 10, abort = 503, abort_percent = 1 }

[[services.api.routes]]
backends = { api-v2 = 1 }

[[services.api.routes]]
path_prefix = "/v3"
backends = { api = 1 }

[services.api-v2]
command = "api --v2"

[services.worker]
command = "worker"
port = "none"
traffic = { rate_limit = { rps = 1 } }
"#,
    );
    let (code, out, err) = p.check();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rate_limit: 200 rps, burst 400 (per replica)"),
        "{out}"
    );
    assert!(
        out.contains(
            "0. /v2 and x-canary: 1 -> api-v2 90, api 10; timeout 2s; delay 100ms 10%; abort 503 1%"
        ),
        "{out}"
    );
    assert!(out.contains("1. everything -> api-v2 1"), "{out}");
    assert!(
        err.contains("warning: service `api`: route 2 never matches: route 1 takes every request"),
        "{err}"
    );
    assert!(
        err.contains("warning: service `worker` has `port = \"none\"`: nothing calls it, so its routes and rate limit never apply"),
        "{err}"
    );
}

#[test]
fn tcp_routes_draw_a_backend_per_connection() {
    let p = Project::new(&format!(
        r#"
[mesh]
name = "t"
seed = 5

[services.db]
command = [{app:?}, "tcp"]
protocol = "tcp"
expose = "127.0.0.1:0"
traffic = {{ queue_timeout = "20s" }}

[[services.db.routes]]
backends = {{ db-b = 1, db = 1 }}

[services.db-b]
command = [{app:?}, "tcp"]
protocol = "tcp"
traffic = {{ queue_timeout = "20s" }}
"#,
        app = test_app()
    ));
    let mesh = p.up(&["db"]);
    let addr = ingress(&mesh, "db");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..24 {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(patience(T))).expect("timeout");
        s.write_all(b"x").expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        *counts.entry(answer).or_default() += 1;
    }
    // Each connection stays with the backend it drew; both get some at 50/50.
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["db-b.0:x", "db.0:x"],
        "{counts:?}"
    );
    let mut pids = pids_of(&mesh, "mesh-test-app", "db", 0);
    pids.extend(pids_of(&mesh, "mesh-test-app", "db-b", 0));
    assert_eq!(pids.len(), 2, "`mesh up db` starts db's route backend too");
    stop(mesh, &pids);
}
