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

    let page = get(&admin, "/").expect("dashboard");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<td>ingress</td><td>api</td><td>3</td>"),
        "{}",
        page.body
    );

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
