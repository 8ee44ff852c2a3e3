//! The admin server (SPEC §5) and the control socket commands `ps`, `certs` and `down`
//! (SPEC §4), against the real binary.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

fn project() -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"
"#,
        app = test_app()
    ))
}

#[test]
fn admin_serves_metrics_status_and_readiness() {
    let p = project();
    let mut mesh = p.up(&[]);
    let admin = admin(&mesh);
    let ingress = ingress(&mesh, "api");

    let live = get(&admin, "/live").expect("live");
    assert_eq!(live.status, 200);
    eventually("/ready to turn 200", T, || {
        (get(&admin, "/ready").ok()?.status == 200).then_some(())
    });

    // Traffic through the ingress is counted per caller and service.
    for _ in 0..3 {
        assert_eq!(get(&ingress, "/whoami").expect("request").status, 200);
    }
    let metrics = get(&admin, "/metrics").expect("metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains(
            r#"mesh_requests_total{caller="ingress",service="api",route="",status_class="2xx"} 3"#
        ),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains(r#"mesh_process_restarts_total{service="api",replica="1"} 0"#),
        "{}",
        metrics.body
    );

    let status = get(&admin, "/api/status").expect("status");
    assert_eq!(status.status, 200);
    let rows: serde_json::Value = serde_json::from_str(&status.body).expect("json");
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["service"], "api");
        assert_eq!(row["replica"], i);
        assert_eq!(row["state"], "running");
        assert_eq!(row["health"], "ready");
        assert_eq!(row["restarts"], 0);
        assert!(row["pid"].as_u64().is_some(), "{row}");
        assert!(row["port"].as_u64().is_some(), "{row}");
        assert!(row["uptime_s"].as_u64().is_some(), "{row}");
        assert!(row["exit_code"].is_null(), "{row}");
    }
    // The three requests went to the replicas' inbounds and count in their traffic.
    let served: f64 = rows.iter().map(|r| r["rps"].as_f64().unwrap_or(0.0)).sum();
    assert!(served > 0.0, "{rows:?}");
    assert!(
        rows.iter()
            .filter(|r| !r["p99_ms"].is_null())
            .all(|r| r["success_rate"] == 1.0),
        "{rows:?}"
    );

    // The page and its two files; the page carries a first snapshot.
    let page = get(&admin, "/").expect("dashboard");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.contains("<title>mesh t</title>"), "{}", page.body);
    assert!(
        page.body.contains(r#"<script src="/app.js""#),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(r#""caller":"ingress","service":"api""#),
        "{}",
        page.body
    );
    let js = get(&admin, "/app.js").expect("app.js");
    assert_eq!(js.status, 200);
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(js.body.contains("EventSource"));
    let css = get(&admin, "/style.css").expect("style.css");
    assert_eq!(css.status, 200);
    assert!(css.body.contains("prefers-color-scheme: dark"));

    assert_eq!(get(&admin, "/nope").expect("404").status, 404);

    // `mesh ps` talks to the running mesh through the control socket.
    let (code, out, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one object per line"))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[1]["replica"], 1);
    let (code, out, err) = p.run(&["ps"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("SERVICE"), "{out}");
    assert!(
        out.lines().nth(2).is_some_and(|l| l.starts_with("api")),
        "{out}"
    );

    // `mesh down` stops the mesh and returns once it is gone.
    let pids: Vec<i32> = (0..2)
        .flat_map(|r| pids_of(&mesh, "mesh-test-app", "api", r))
        .collect();
    assert_eq!(pids.len(), 2);
    let (code, _, err) = p.run(&["down"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(&pids, Duration::from_secs(2));
    assert!(!p.file(".mesh/mesh.sock").exists());

    // With no mesh running, control commands say so.
    let (code, _, err) = p.run(&["ps"]);
    assert_eq!(code, 1);
    assert!(err.contains("no running mesh"), "{err}");
    let (code, _, err) = p.run(&["down"]);
    assert_eq!(code, 1);
    assert!(err.contains("no running mesh"), "{err}");
}

#[test]
fn ready_turns_503_while_the_mesh_stops() {
    // The app ignores SIGTERM, so the stop lasts until stop_timeout.
    let p = Project::new(
        r#"
[services.slow]
command = ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]
port = "none"
stop_timeout = "3s"
"#,
    );
    let mut mesh = p.up(&[]);
    let admin = admin(&mesh);
    eventually("/ready to turn 200", T, || {
        (get(&admin, "/ready").ok()?.status == 200).then_some(())
    });
    mesh.signal(nix::sys::signal::Signal::SIGTERM);
    let r = eventually("/ready to turn 503", T, || {
        get(&admin, "/ready").ok().filter(|r| r.status == 503)
    });
    assert!(r.body.contains("stopping"), "{}", r.body);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn admin_off_serves_nothing() {
    let p = Project::new(
        r#"
[mesh]
name = "t"
admin = "off"

[services.job]
command = ["true"]
port = "none"
restart = "never"
"#,
    );
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 0);
    assert_eq!(mesh.count("admin on"), 0, "{:?}", mesh.output());
}

#[test]
fn certs_lists_the_ca_and_every_identity_in_use() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2

[services.web]
command = ["sh", "-c", "exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    let line = mesh.wait_line("mutual TLS between sidecars: CA sha256 ", T);
    let fingerprint = line
        .split("CA sha256 ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("fingerprint")
        .to_string();
    let (code, out, err) = p.run(&["certs"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("CA  ") && lines[0].contains("CN="),
        "{out}"
    );
    assert_eq!(lines[1].trim(), format!("sha256 {fingerprint}"), "{out}");
    assert!(lines[2].trim().starts_with("not after 20"), "{out}");
    // One leaf per replica inbound, and the callers' leaf of web.
    let leaf = |service: &str, replica: &str| {
        lines
            .iter()
            .find(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first() == Some(&service) && cols.get(1) == Some(&replica)
            })
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no {service} {replica} in\n{out}"))
    };
    for replica in ["0", "1"] {
        let cols = leaf("api", replica);
        assert_eq!(cols[2], "spiffe://t/api", "{out}");
        assert!(
            cols[3].len() >= 2 && cols[3].chars().all(|c| c.is_ascii_hexdigit()),
            "serial in {out}"
        );
    }
    assert_ne!(
        leaf("api", "0")[3],
        leaf("api", "1")[3],
        "serials differ\n{out}"
    );
    assert_eq!(leaf("web", "callers")[2], "spiffe://t/web", "{out}");
    mesh.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn certs_with_tls_off_says_why_there_are_none() {
    let p = Project::new(
        r#"
[mesh]
name = "t"
tls = "off"

[services.job]
command = ["sh", "-c", "exec sleep 1000"]
port = "none"
"#,
    );
    let mut mesh = p.up(&[]);
    mesh.wait_line("mesh `t` starting", T);
    let (code, _, err) = p.run(&["certs"]);
    assert_eq!(code, 1);
    assert!(err.contains("tls = \"off\""), "{err}");
    mesh.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn a_state_dir_too_deep_for_the_control_socket_stops_mesh_up_before_anything_starts() {
    let deep = "d".repeat(110);
    let p = Project::new(&format!(
        r#"
[mesh]
name = "t"
state_dir = "{deep}"

[services.job]
command = ["sh", "-c", "echo started > started.txt"]
port = "none"
restart = "never"
"#
    ));
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 1);
    let out = mesh.output().join("\n");
    assert!(out.contains("cannot create the control socket"), "{out}");
    assert!(out.contains("use a shorter state_dir"), "{out}");
    assert!(!p.file("started.txt").exists());
}

/// An `api` exposed with two replicas, and a `caller` whose outbound the test uses.
fn api_and_caller() -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"
env = {{ TEST_APP_LOG = "1" }}

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]

[services.spare]
command = [{app:?}]
"#,
        app = test_app()
    ))
}

fn json_of(admin: &str, path: &str) -> serde_json::Value {
    let r = get(admin, path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
}

#[test]
fn the_dashboard_apis_describe_graph_calls_services_and_logs() {
    let p = api_and_caller();
    let mesh = p.up(&[]);
    let admin = admin(&mesh);
    let ingress = ingress(&mesh, "api");
    let out = outbound(&mesh, "caller");
    eventually("/ready to turn 200", T, || {
        (get(&admin, "/ready").ok()?.status == 200).then_some(())
    });
    for _ in 0..3 {
        assert_eq!(get(&ingress, "/whoami").expect("request").status, 200);
    }
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    for _ in 0..2 {
        let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
        let r = http(&out, "GET", "/whoami", &[("traceparent", &traceparent)], "");
        assert_eq!(r.expect("request").status, 200);
    }

    // The graph: observed edges with their figures, a declared one without traffic.
    let graph = json_of(&admin, "/api/graph");
    assert_eq!(graph["window"], "10s");
    let edge = |caller: &str, service: &str| {
        graph["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .find(|e| e["caller"] == caller && e["service"] == service)
            .cloned()
            .unwrap_or_else(|| panic!("no {caller} → {service} in {graph}"))
    };
    let through_ingress = edge("ingress", "api");
    assert_eq!(through_ingress["requests"], 3, "{through_ingress}");
    assert!(through_ingress["rps"].as_f64().expect("rps") > 0.0);
    assert_eq!(through_ingress["success_rate"], 1.0);
    assert_eq!(through_ingress["declared"], true);
    assert_eq!(through_ingress["idle"], false);
    assert_eq!(through_ingress["refused"], false);
    assert!(through_ingress["p99_ms"].as_f64().is_some());
    assert!(
        ["in-process", "mtls"].contains(&through_ingress["via"].as_str().expect("via")),
        "{through_ingress}"
    );
    assert_eq!(edge("caller", "api")["requests"], 2);
    assert_eq!(graph["edges"].as_array().map(Vec::len), Some(2), "{graph}");
    let node = |id: &str| {
        graph["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no node {id} in {graph}"))
    };
    assert_eq!(node("ingress")["layer"], 0);
    assert_eq!(node("caller")["layer"], 1);
    assert_eq!(node("api")["layer"], 2);
    assert_eq!(node("api")["ready"], 2);
    assert_eq!(node("spare")["layer"], 1);
    assert_eq!(json_of(&admin, "/api/graph?window=5m")["window"], "5m");
    assert_eq!(
        get(&admin, "/api/graph?window=2m").expect("400").status,
        400
    );

    // The calls, with the trace id the request carried.
    let calls = json_of(&admin, "/api/calls");
    let list = calls["calls"].as_array().expect("calls").clone();
    assert_eq!(list.len(), 5, "{calls}");
    let traced: Vec<&serde_json::Value> = list.iter().filter(|c| c["trace_id"] == trace).collect();
    assert_eq!(traced.len(), 2, "{calls}");
    for c in &traced {
        assert_eq!(c["caller"], "caller");
        assert_eq!(c["service"], "api");
        assert_eq!(c["method"], "GET");
        assert_eq!(c["path"], "/whoami");
        assert_eq!(c["status"], 200);
        assert_eq!(c["attempts"], 1);
        assert!(c["error"].is_null());
    }
    let last = calls["last_seq"].as_u64().expect("last_seq");
    let since = json_of(&admin, &format!("/api/calls?since={}&n=10", last - 1));
    assert_eq!(since["calls"].as_array().map(Vec::len), Some(1), "{since}");
    assert_eq!(
        json_of(&admin, "/api/calls?n=2")["calls"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(get(&admin, "/api/calls?since=x").expect("400").status, 400);

    // The services table.
    let services = json_of(&admin, "/api/services?window=1m");
    let api = services
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["service"] == "api")
        .cloned()
        .expect("api row");
    assert_eq!(
        (api["ready"].clone(), api["replicas"].clone()),
        (2.into(), 2.into())
    );
    assert_eq!(api["state"], "ready");
    assert_eq!(api["requests"], 5);
    assert_eq!(api["ingress"], format!("http://{ingress}/"));
    assert_eq!(api["series"].as_array().map(Vec::len), Some(60), "{api}");

    // Log lines, newest last; the details of a service.
    let logs = eventually("api's request lines in its logs", T, || {
        let logs = json_of(&admin, "/api/logs?service=api&n=3");
        let lines = logs["lines"].as_array()?.clone();
        let requests = lines.iter().any(|l| {
            l["line"]
                .as_str()
                .is_some_and(|s| s.contains("GET /whoami"))
        });
        (lines.len() == 3 && requests).then_some(lines)
    });
    assert!(logs.iter().all(|l| l["stream"] == "stdout"), "{logs:?}");
    assert_eq!(
        get(&admin, "/api/logs?service=nope").expect("404").status,
        404
    );
    assert_eq!(get(&admin, "/api/logs").expect("400").status, 400);
    let detail = json_of(&admin, "/api/service?name=api");
    assert_eq!(
        detail["replicas"].as_array().map(Vec::len),
        Some(2),
        "{detail}"
    );
    assert!(
        detail["logs"].as_array().is_some_and(|l| !l.is_empty()),
        "{detail}"
    );
    let balancers = detail["endpoints"].as_array().expect("endpoints");
    let seen_by_caller = balancers
        .iter()
        .find(|b| b["caller"] == "caller")
        .unwrap_or_else(|| panic!("no balancer of caller in {detail}"));
    let mut endpoints: Vec<String> = seen_by_caller["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["id"].as_str().unwrap_or(""),
                e["state"].as_str().unwrap_or("")
            )
        })
        .collect();
    endpoints.sort();
    assert_eq!(endpoints, ["api.0 ready", "api.1 ready"], "{detail}");
    assert_eq!(
        get(&admin, "/api/service?name=nope").expect("404").status,
        404
    );

    let pids: Vec<i32> = app_pids(&mesh, "api", 2)
        .into_iter()
        .chain(app_pids(&mesh, "spare", 1))
        .chain(pids_of(&mesh, "sleep", "caller", 0))
        .collect();
    stop_mesh(mesh, &pids);
}

/// A server-sent-events stream read off a raw connection.
struct Sse {
    reader: std::io::BufReader<std::net::TcpStream>,
}

/// Open `/api/events` on `admin`: the status, and the stream when it is 200.
fn open_events(admin: &str, path: &str, host: &str) -> (u16, Option<Sse>) {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(patience(Duration::from_secs(10))))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("write");
    let mut reader = std::io::BufReader::new(s);
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status:?}"));
    let mut content_type = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-type:") {
            content_type = v.trim().to_string();
        }
    }
    if code != 200 {
        return (code, None);
    }
    assert_eq!(content_type, "text/event-stream");
    (code, Some(Sse { reader }))
}

impl Sse {
    /// The next event (name, data) or comment (`:`, text), skipping the chunk framing.
    fn next(&mut self) -> (String, String) {
        use std::io::BufRead;
        let mut name = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read the stream");
            assert!(n > 0, "the stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(comment) = line.strip_prefix(": ") {
                return (":".into(), comment.into());
            } else if let Some(event) = line.strip_prefix("event: ") {
                name = event.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                return (name, data.to_string());
            }
        }
    }

    /// The next event called `name`, parsed.
    fn next_named(&mut self, name: &str) -> serde_json::Value {
        loop {
            let (event, data) = self.next();
            if event == name {
                return serde_json::from_str(&data).expect("event json");
            }
        }
    }
}

#[test]
fn the_event_stream_starts_with_a_snapshot_then_ticks_and_says_at_once_when_a_replica_dies() {
    let p = api_and_caller();
    let mesh = p.up(&[]);
    let admin = admin(&mesh);
    let ingress = ingress(&mesh, "api");
    eventually("/ready to turn 200", T, || {
        (get(&admin, "/ready").ok()?.status == 200).then_some(())
    });
    let (code, sse) = open_events(&admin, "/api/events?window=1m", &admin);
    assert_eq!(code, 200);
    let mut sse = sse.expect("stream");
    let (first, data) = sse.next();
    assert_eq!(first, "snapshot");
    let snapshot: serde_json::Value = serde_json::from_str(&data).expect("json");
    assert_eq!(snapshot["window"], "1m");
    assert_eq!(snapshot["mesh"]["name"], "t");
    assert_eq!(snapshot["mesh"]["tls"], "mutual");
    assert_eq!(snapshot["summary"]["line"], "4/4 ready, 0 restarting");
    assert_eq!(snapshot["status"].as_array().map(Vec::len), Some(4));
    assert!(snapshot["graph"]["nodes"].is_array());
    assert!(snapshot["services"].is_array());
    assert!(snapshot["calls"].is_array());

    // New calls and the windowed figures follow, each second.
    assert_eq!(get(&ingress, "/whoami").expect("request").status, 200);
    let calls = sse.next_named("calls");
    assert_eq!(calls["calls"][0]["caller"], "ingress", "{calls}");
    let tick = sse.next_named("tick");
    assert_eq!(tick["window"], "1m");
    assert!(tick["mesh"]["uptime_s"].is_u64());

    // A replica killed: a status event says so without waiting for the tick.
    let pid = pids_of(&mesh, "mesh-test-app", "api", 1);
    assert_eq!(pid.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(10));
    loop {
        let (event, data) = sse.next();
        if event == "status" {
            let status: serde_json::Value = serde_json::from_str(&data).expect("json");
            let row = &status["status"][1];
            if row["service"] == "api" && (row["state"] != "running" || row["restarts"] == 1) {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no status event for the kill"
        );
    }

    // A HEAD opens no stream.
    let head = http(&admin, "HEAD", "/api/events", &[], "").expect("head");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(head.body.is_empty());
    drop(sse);
    let pids: Vec<i32> = app_pids(&mesh, "api", 2)
        .into_iter()
        .chain(app_pids(&mesh, "spare", 1))
        .chain(pids_of(&mesh, "sleep", "caller", 0))
        .collect();
    stop_mesh(mesh, &pids);
}

#[test]
fn at_most_sixteen_event_streams_are_open_at_once() {
    let p = project();
    let mesh = p.up(&[]);
    let admin = admin(&mesh);
    let mut open: Vec<Sse> = (0..16)
        .map(|i| {
            let (code, sse) = open_events(&admin, "/api/events", &admin);
            assert_eq!(code, 200, "stream {i}");
            sse.expect("stream")
        })
        .collect();
    let (code, _) = open_events(&admin, "/api/events", &admin);
    assert_eq!(code, 503);
    // A closed page gives its place back.
    drop(open.pop());
    eventually("a place to be given back", T, || {
        let (code, sse) = open_events(&admin, "/api/events", &admin);
        (code == 200).then_some(sse)
    });
    drop(open);
    let pids = app_pids(&mesh, "api", 2);
    stop_mesh(mesh, &pids);
}

#[test]
fn foreign_host_names_and_other_methods_are_refused() {
    let p = project();
    let mesh = p.up(&[]);
    let admin = admin(&mesh);
    let port = admin.rsplit(':').next().expect("port").to_string();
    for host in [
        admin.clone(),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(raw_get(&admin, "/api/status", &host), 200, "{host}");
    }
    // A page elsewhere whose DNS name points at 127.0.0.1 (DNS rebinding).
    for host in [
        format!("rebind.example:{port}"),
        "evil.localhost.example".to_string(),
    ] {
        for path in ["/", "/api/status", "/api/events", "/metrics"] {
            assert_eq!(raw_get(&admin, path, &host), 403, "{host} {path}");
        }
    }
    let post = http(&admin, "POST", "/api/status", &[], "x").expect("post");
    assert_eq!(post.status, 405);
    let pids = app_pids(&mesh, "api", 2);
    stop_mesh(mesh, &pids);
}

/// The status of a GET carrying exactly one `Host` header, `host`.
fn raw_get(addr: &str, path: &str, host: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(patience(Duration::from_secs(10))))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("status line");
    String::from_utf8_lossy(&head[9..12])
        .parse()
        .expect("status")
}
