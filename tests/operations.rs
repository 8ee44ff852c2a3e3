//! Operating a running mesh (SPEC §4): `mesh start / stop / restart`, reload by `mesh
//! reload` and SIGHUP with each of its rules, and rolling replacements that no client
//! notices, all against the real binary with steady traffic where it matters.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::traffic::Traffic;
use support::*;

const T: Duration = Duration::from_secs(30);

fn app(extra: &str) -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"
env = {{ VERSION = "1" }}
{extra}
"#,
        app = test_app()
    ))
}

fn serving(addr: &str) -> Response {
    eventually("the service to answer through its ingress", T, || {
        get(addr, "/whoami").ok().filter(|r| r.status == 200)
    })
}

/// Wait until traffic has succeeded `n` more times (proof that it flows).
fn flowing(traffic: &Traffic, n: u64) {
    let start = traffic.ok();
    eventually("traffic to flow", T, || {
        (traffic.ok() >= start + n).then_some(())
    });
}

fn ps(p: &Project) -> serde_json::Value {
    let (code, out, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect();
    serde_json::Value::Array(rows)
}

fn row<'a>(rows: &'a serde_json::Value, service: &str, replica: u64) -> &'a serde_json::Value {
    rows.as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["service"] == service && r["replica"] == replica)
        })
        .unwrap_or_else(|| panic!("no row {service}.{replica} in {rows}"))
}

#[test]
fn restart_replaces_each_replica_without_a_failed_request() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"

[services.solo]
command = [{app:?}]
expose = "127.0.0.1:0"
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let api = ingress(&mesh, "api");
    let solo = ingress(&mesh, "solo");
    serving(&api);
    serving(&solo);
    let before: Vec<i32> = app_pids(&mesh, "api", 2)
        .into_iter()
        .chain(app_pids(&mesh, "solo", 1))
        .collect();
    assert_eq!(before.len(), 3, "{before:?}");

    let a = Traffic::start(&api, "/whoami");
    let s = Traffic::start(&solo, "/whoami");
    flowing(&a, 20);
    flowing(&s, 20);
    let (code, out, err) = p.run(&["restart", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("api: restarted"), "{out}");
    flowing(&a, 20);
    let (code, out, err) = p.run(&["restart", "solo"]);
    assert_eq!(code, 0, "{out}{err}");
    flowing(&s, 20);
    let (a_ok, a_failed, a_errors) = a.finish();
    let (s_ok, s_failed, s_errors) = s.finish();
    assert_eq!(a_failed, 0, "api: {a_ok} ok, failures: {a_errors:?}");
    assert_eq!(s_failed, 0, "solo: {s_ok} ok, failures: {s_errors:?}");

    // Every old process is gone, new ones serve, on fresh ports behind the same
    // ingress.
    assert_gone(&before, T);
    let after: Vec<i32> = app_pids(&mesh, "api", 2)
        .into_iter()
        .chain(app_pids(&mesh, "solo", 1))
        .collect();
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    let rows = ps(&p);
    assert_eq!(row(&rows, "api", 0)["restarts"], 1, "{rows}");
    assert_eq!(row(&rows, "api", 0)["state"], "running", "{rows}");
    stop_mesh(mesh, &after);
}

#[test]
fn a_reload_that_changes_env_replaces_without_a_failed_request() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 2);
    let traffic = Traffic::start(&api, "/whoami");
    flowing(&traffic, 20);
    p.write(
        "mesh.toml",
        &p.read("mesh.toml")
            .replace("VERSION = \"1\"", "VERSION = \"2\""),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("api: env changed"), "{out}");
    flowing(&traffic, 20);
    let (ok, failed, errors) = traffic.finish();
    assert_eq!(failed, 0, "{ok} ok, failures: {errors:?}");
    assert_gone(&before, T);
    let after = app_pids(&mesh, "api", 2);
    let env = std::fs::read(format!("/proc/{}/environ", after[0])).expect("environ");
    assert!(
        env.split(|b| *b == 0).any(|v| v == b"VERSION=2"),
        "the new process has the new env"
    );
    stop_mesh(mesh, &after);
}

#[test]
fn a_fixed_port_restarts_in_place_and_requests_wait_for_it() {
    let port = free_port();
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
port = {port}
expose = "127.0.0.1:0"
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 1);
    let traffic = Traffic::start(&api, "/whoami");
    flowing(&traffic, 20);
    let (code, out, err) = p.run(&["restart", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    flowing(&traffic, 20);
    let (ok, failed, errors) = traffic.finish();
    assert_eq!(failed, 0, "{ok} ok, failures: {errors:?}");
    assert_gone(&before, T);
    let rows = ps(&p);
    assert_eq!(row(&rows, "api", 0)["port"], port, "{rows}");
    let after = app_pids(&mesh, "api", 1);
    stop_mesh(mesh, &after);
}

#[test]
fn stop_and_start_a_service_while_the_rest_runs() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
expose = "127.0.0.1:0"

[services.other]
command = [{app:?}]
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let api_pids = app_pids(&mesh, "api", 1);
    let other = app_pids(&mesh, "other", 1);
    let (code, out, err) = p.run(&["stop", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("api: stopped"), "{out}");
    assert_gone(&api_pids, T);
    let rows = ps(&p);
    assert_eq!(row(&rows, "api", 0)["state"], "stopped", "{rows}");
    assert_ne!(row(&rows, "other", 0)["state"], "stopped", "{rows}");
    // Out of discovery: the ingress says so.
    let r = get(&api, "/whoami").expect("an answer");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-mesh-error"), Some("no-endpoints"));

    let (code, out, err) = p.run(&["start", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("api: started"), "{out}");
    serving(&api);
    let (code, _, err) = p.run(&["stop", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no service `nope`"), "{err}");
    let mut all = app_pids(&mesh, "api", 1);
    all.extend(other);
    stop_mesh(mesh, &all);
}

#[test]
fn live_changes_apply_without_restarting_processes() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 2);
    assert_eq!(get(&api, "/sleep/400").expect("answer").status, 200);
    assert_eq!(get(&api, "/teapot").expect("answer").status, 404);
    // traffic (a timeout), routes (a fault), and health: applied in place.
    let extra = r#"
[services.api.traffic]
timeout = "100ms"

[[services.api.routes]]
path_prefix = "/teapot"
backends = { api = 1 }
fault = { abort = 418, abort_percent = 100 }

[services.api.health]
http = "/healthz"
"#;
    p.write("mesh.toml", &format!("{}{extra}", p.read("mesh.toml")));
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied without restarting"), "{out}");
    assert_eq!(get(&api, "/sleep/400").expect("answer").status, 504);
    assert_eq!(get(&api, "/teapot").expect("answer").status, 418);
    assert_eq!(app_pids(&mesh, "api", 2), before, "no process was replaced");
    stop_mesh(mesh, &before);
}

#[test]
fn a_replicas_change_touches_only_the_highest_indices() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let first = app_pids(&mesh, "api", 1);
    let second = app_pids(&mesh, "api", 2)[1..].to_vec();
    p.write(
        "mesh.toml",
        &p.read("mesh.toml").replace("replicas = 2", "replicas = 3"),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let third = eventually("api.2 to run", T, || {
        let pids = pids_of(&mesh, test_app(), "api", 2);
        (!pids.is_empty()).then_some(pids)
    });
    assert_eq!(
        app_pids(&mesh, "api", 2),
        [first.clone(), second.clone()].concat()
    );
    p.write(
        "mesh.toml",
        &p.read("mesh.toml").replace("replicas = 3", "replicas = 2"),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stopping api.2"), "{out}");
    assert_gone(&third, T);
    assert_eq!(app_pids(&mesh, "api", 2), [first, second].concat());
    let rows = ps(&p);
    assert_eq!(rows.as_array().map(Vec::len), Some(2), "{rows}");
    // `mesh certs` lists only the leaves in use.
    let (code, certs, err) = p.run(&["certs"]);
    assert_eq!(code, 0, "{err}");
    let replicas: Vec<&str> = certs
        .lines()
        .filter(|l| l.starts_with("api "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(replicas, ["0", "1"], "{certs}");
    let all = app_pids(&mesh, "api", 2);
    stop_mesh(mesh, &all);
}

#[test]
fn a_mesh_section_change_is_refused_with_restart_required() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 2);
    p.write(
        "mesh.toml",
        &p.read("mesh.toml")
            .replace("name = \"t\"", "name = \"renamed\""),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("restart required"), "{err}");
    mesh.wait_line("reload refused: restart required", T);
    serving(&api);
    assert_eq!(app_pids(&mesh, "api", 2), before);
    stop_mesh(mesh, &before);
}

#[test]
fn an_invalid_file_is_refused_whole_and_the_mesh_keeps_running() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 2);
    let good = p.read("mesh.toml");
    // A valid change (env) and an invalid one together: nothing applies.
    p.write(
        "mesh.toml",
        &format!(
            "{}\nbogus_key = 1\n",
            good.replace("VERSION = \"1\"", "VERSION = \"2\"")
        ),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 78, "{out}{err}");
    assert!(
        err.contains("mesh.toml:") && err.contains("error: unknown key `bogus_key`"),
        "{err}"
    );
    mesh.wait_line("reload refused", T);
    mesh.wait_line("error: unknown key `bogus_key`", T);
    serving(&api);
    assert_eq!(app_pids(&mesh, "api", 2), before, "nothing was replaced");
    // The next good file applies.
    p.write(
        "mesh.toml",
        &good.replace("VERSION = \"1\"", "VERSION = \"3\""),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_gone(&before, T);
    let after = app_pids(&mesh, "api", 2);
    stop_mesh(mesh, &after);
}

#[test]
fn a_stopped_service_stays_stopped_across_a_reload() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 2);
    let (code, _, err) = p.run(&["stop", "api"]);
    assert_eq!(code, 0, "{err}");
    assert_gone(&before, T);
    p.write(
        "mesh.toml",
        &p.read("mesh.toml")
            .replace("VERSION = \"1\"", "VERSION = \"2\""),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows = ps(&p);
    assert_eq!(row(&rows, "api", 0)["state"], "stopped", "{rows}");
    assert_eq!(row(&rows, "api", 1)["state"], "stopped", "{rows}");
    // Started again, it runs the new configuration.
    let (code, _, err) = p.run(&["start", "api"]);
    assert_eq!(code, 0, "{err}");
    let after = app_pids(&mesh, "api", 2);
    let env = std::fs::read(format!("/proc/{}/environ", after[0])).expect("environ");
    assert!(env.split(|b| *b == 0).any(|v| v == b"VERSION=2"));
    stop_mesh(mesh, &after);
}

#[test]
fn sighup_reloads() {
    let p = app("");
    let mesh = p.up_reloading_by_hand(&[]);
    let api = ingress(&mesh, "api");
    serving(&api);
    let before = app_pids(&mesh, "api", 2);
    p.write(
        "mesh.toml",
        &p.read("mesh.toml")
            .replace("VERSION = \"1\"", "VERSION = \"2\""),
    );
    mesh.signal(Signal::SIGHUP);
    mesh.wait_line("api: env changed", T);
    assert_gone(&before, T);
    let after = eventually("two new replicas", T, || {
        let now = app_pids(&mesh, "api", 2);
        (now.len() == 2).then_some(now)
    });
    stop_mesh(mesh, &after);
}

#[test]
fn a_new_upstream_gets_its_outbound_and_the_caller_is_replaced() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]

[services.web]
command = ["sh", "-c", "echo api=$API_URL; echo extra=$${{EXTRA_URL:-none}}; exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ));
    let mesh = p.up_reloading_by_hand(&[]);
    mesh.wait_line("web.0 | api=http://", T);
    let text = p.read("mesh.toml");
    p.write(
        "mesh.toml",
        &format!(
            "{}\n[services.extra]\ncommand = [{:?}]\n",
            text.replace("upstreams = [\"api\"]", "upstreams = [\"api\", \"extra\"]"),
            test_app()
        ),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = mesh.wait_line("web.0 | extra=http://127.0.0.1:", T);
    let addr = field_of(&line, "extra")
        .trim_start_matches("http://")
        .to_string();
    let r = eventually("extra to answer through web's new outbound", T, || {
        get(&addr, "/whoami").ok().filter(|r| r.status == 200)
    });
    assert!(r.body.contains("extra.0"), "{r:?}");
    let mut all = app_pids(&mesh, "api", 1);
    all.extend(app_pids(&mesh, "extra", 1));
    stop_mesh(mesh, &all);
}

#[test]
fn a_watched_change_replaces_without_a_failed_request() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"
watch = ["*.txt"]

[services.solo]
command = [{app:?}]
expose = "127.0.0.1:0"
watch = ["*.txt"]
"#,
        app = test_app()
    ));
    p.write("version.txt", "1");
    let mesh = p.up(&[]);
    let api = ingress(&mesh, "api");
    let solo = ingress(&mesh, "solo");
    serving(&api);
    serving(&solo);
    let before: Vec<i32> = app_pids(&mesh, "api", 2)
        .into_iter()
        .chain(app_pids(&mesh, "solo", 1))
        .collect();
    let a = Traffic::start(&api, "/whoami");
    let s = Traffic::start(&solo, "/whoami");
    flowing(&a, 20);
    flowing(&s, 20);
    p.write("version.txt", "2");
    mesh.wait_line("api.1 replaced", T);
    mesh.wait_line("solo.0 replaced", T);
    flowing(&a, 20);
    flowing(&s, 20);
    let (a_ok, a_failed, a_errors) = a.finish();
    let (s_ok, s_failed, s_errors) = s.finish();
    assert_eq!(a_failed, 0, "api: {a_ok} ok, failures: {a_errors:?}");
    assert_eq!(s_failed, 0, "solo: {s_ok} ok, failures: {s_errors:?}");
    assert_gone(&before, T);
    let after: Vec<i32> = app_pids(&mesh, "api", 2)
        .into_iter()
        .chain(app_pids(&mesh, "solo", 1))
        .collect();
    stop_mesh(mesh, &after);
}
