//! Safe rollouts and "why not ready" (SPEC §4: "The first minute", "A replacement that
//! fails keeps the old replica"; §3 `ready_timeout`), against the real binary.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

fn ps_rows(p: &Project) -> Vec<serde_json::Value> {
    let (code, out, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect()
}

fn row(p: &Project, service: &str, replica: u64) -> serde_json::Value {
    ps_rows(p)
        .into_iter()
        .find(|r| r["service"] == service && r["replica"] == replica)
        .unwrap_or_else(|| panic!("no row {service}.{replica}"))
}

#[test]
fn a_replica_not_ready_in_time_is_explained_once_with_its_last_check() {
    let p = Project::new(&format!(
        r#"
[services.http]
command = [{app:?}]
ready_timeout = "1s"
health = {{ http = "/status/503", interval = "200ms" }}

[services.quiet]
command = ["sleep", "1000"]
ready_timeout = "1s"

[services.probe]
command = ["sleep", "1000"]
port = "none"
ready_timeout = "1s"
health = {{ exec = ["sh", "-c", "echo starting >&2; echo 'db not reachable' >&2; exit 1"], interval = "200ms" }}
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let line = mesh.wait_line("http.0 is not ready after 1s (last check: ", T);
    assert!(line.contains("GET /status/503 -> 503 after "), "{line}");
    let line = mesh.wait_line("quiet.0 is not ready after 1s (last check: ", T);
    assert!(line.contains("connection refused on 127.0.0.1:"), "{line}");
    let line = mesh.wait_line("probe.0 is not ready after 1s (last check: ", T);
    assert!(
        line.contains("exec check exited 1: db not reachable"),
        "{line}"
    );
    let reason = row(&p, "quiet", 0)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("connection refused"), "{reason}");
    // The dashboard shows it too.
    let page = get(&admin(&mesh), "/").expect("dashboard").body;
    assert!(
        page.contains("exec check exited 1: db not reachable"),
        "{page}"
    );
    // Not stopped for it, and said once.
    assert_eq!(row(&p, "http", 0)["state"], "starting");
    assert_eq!(mesh.count("http.0 is not ready after"), 1);
    let mut all = app_pids(&mesh, "http", 1);
    all.extend(pids_of(&mesh, "sleep", "quiet", 0));
    all.extend(pids_of(&mesh, "sleep", "probe", 0));
    stop_mesh(mesh, &all);
}

#[test]
fn a_replacement_that_never_becomes_ready_keeps_the_old_replica_under_load() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
replicas = 2
expose = "127.0.0.1:0"
ready_timeout = "2s"
env = {{ VERSION = "1" }}
"#,
        app = test_app()
    ));
    let mesh = p.up_reloading_by_hand(&[]);
    let addr = ingress(&mesh, "api");
    eventually("api to serve", T, || {
        get(&addr, "/whoami").ok().filter(|r| r.status == 200)
    });
    let old = app_pids(&mesh, "api", 2);
    assert_eq!(old.len(), 2);
    let load = traffic::Traffic::start(&addr, "/whoami");

    // The new configuration never listens: its replacement is not ready in time.
    let good = p.read("mesh.toml");
    p.write(
        "mesh.toml",
        &good.replace(
            "VERSION = \"1\"",
            "VERSION = \"2\", TEST_APP_DELAY_START_MS = \"600000\"",
        ),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "api.0: replacement not ready after 2s (last check: connection refused on 127.0.0.1:"
        ) && err.contains("); kept the running replica"),
        "{err}"
    );
    mesh.wait_line("api.0: replacement not ready after 2s", T);
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{ok} requests ok, failures: {errors:?}");
    assert!(ok > 0);
    // The old processes stayed, and the failed replacement is gone.
    assert_eq!(app_pids(&mesh, "api", 2), old);
    let rollout = row(&p, "api", 0)["last_rollout"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        rollout.starts_with("failed: api.0: replacement not ready"),
        "{rollout}"
    );
    // The other replica was left as it was.
    assert!(row(&p, "api", 1)["last_rollout"].is_null());

    // The next change tries again, and succeeds.
    p.write(
        "mesh.toml",
        &good.replace("VERSION = \"1\"", "VERSION = \"3\""),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_gone(&old, T);
    assert!(row(&p, "api", 0)["last_rollout"].is_null());
    let new = app_pids(&mesh, "api", 2);
    stop_mesh(mesh, &new);
}

#[test]
fn a_restart_whose_new_process_exits_keeps_the_old_one_and_exits_1() {
    // The first start serves; any later start exits at once.
    let p = Project::new(&format!(
        r#"
[services.api]
command = ["sh", "-c", "if [ -e started ]; then echo broken >&2; exit 3; fi; touch started; exec {app}"]
expose = "127.0.0.1:0"
"#,
        app = test_app()
    ));
    let mesh = p.up(&[]);
    let addr = ingress(&mesh, "api");
    eventually("api to serve", T, || {
        get(&addr, "/whoami").ok().filter(|r| r.status == 200)
    });
    let old = app_pids(&mesh, "api", 1);
    let (code, out, err) = p.run(&["restart", "api"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(
            "api.0: replacement exited with code 3 before it was ready; kept the running replica"
        ),
        "{err}"
    );
    assert_eq!(get(&addr, "/whoami").expect("answer").status, 200);
    assert_eq!(app_pids(&mesh, "api", 1), old);
    stop_mesh(mesh, &old);
}

#[test]
fn a_fixed_port_replacement_that_fails_starts_the_previous_configuration_again() {
    let port = free_port();
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
port = {port}
expose = "127.0.0.1:0"
ready_timeout = "2s"
env = {{ VERSION = "1" }}
"#,
        app = test_app()
    ));
    let mesh = p.up_reloading_by_hand(&[]);
    let addr = ingress(&mesh, "api");
    eventually("api to serve", T, || {
        get(&addr, "/whoami").ok().filter(|r| r.status == 200)
    });
    let good = p.read("mesh.toml");
    p.write(
        "mesh.toml",
        &good.replace(
            "VERSION = \"1\"",
            "VERSION = \"2\", TEST_APP_DELAY_START_MS = \"600000\"",
        ),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("started the previous configuration again"),
        "{err}"
    );
    // Serving again, with the previous configuration.
    eventually("api to serve again", T, || {
        get(&addr, "/whoami").ok().filter(|r| r.status == 200)
    });
    let now = app_pids(&mesh, "api", 1);
    let env = std::fs::read(format!("/proc/{}/environ", now[0])).expect("environ");
    assert!(env.split(|b| *b == 0).any(|v| v == b"VERSION=1"));
    stop_mesh(mesh, &now);
}

#[test]
fn the_ready_line_says_where_to_go_and_comes_again_after_a_crash() {
    let p = Project::new(&format!(
        r#"
[services.web]
command = [{app:?}]
expose = "127.0.0.1:0"
env = {{ TEST_APP_LOG = "1" }}
health = {{ http = "/healthz", interval = "100ms" }}

[services.raw]
command = [{app:?}]
protocol = "tcp"
expose = "127.0.0.1:0"

[services.ua]
command = ["python3", "-u", "ua.py"]
health = {{ http = "/healthz", interval = "100ms" }}
"#,
        app = test_app()
    ));
    // Records the user-agent of every request it gets.
    p.write(
        "ua.py",
        r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open("agents.txt", "a") as f:
            f.write(self.headers.get("User-Agent", "") + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, fmt, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#,
    );
    let mesh = p.up(&[]);
    let web = ingress(&mesh, "web");
    let raw = ingress(&mesh, "raw");
    let admin = admin(&mesh);
    let line = mesh.wait_line("mesh | ready in ", T);
    assert!(line.contains("s: 3 services, 3 replicas"), "{line}");
    assert!(line.contains(&format!("web http://{web}")), "{line}");
    assert!(
        line.contains(&format!("raw {raw}")) && !line.contains(&format!("http://{raw}")),
        "{line}"
    );
    assert!(
        line.ends_with(&format!("dashboard http://{admin}/")),
        "{line}"
    );

    // Health checks say who they are, and the app does not log them; a real request is
    // logged.
    let agents = p.read("agents.txt");
    let want = format!("mesh-health/{}", env!("CARGO_PKG_VERSION"));
    assert!(agents.lines().any(|a| a == want), "{agents}");
    eventually("more health checks of web", T, || {
        (p.read("agents.txt").lines().count() >= 5).then_some(())
    });
    assert_eq!(get(&web, "/whoami").expect("answer").status, 200);
    mesh.wait_line("web.0 | test-app web.0 GET /whoami", T);
    assert!(
        !mesh.output().iter().any(|l| l.contains("/healthz")),
        "health checks were logged"
    );

    // A crash makes the mesh not ready; once it is ready again, it says so.
    let pid = pids_of(&mesh, test_app(), "web", 0)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    let again = mesh.wait_line("mesh | ready again: 3 services, 3 replicas", T);
    assert!(again.contains(&format!("web http://{web}")), "{again}");

    // `mesh ps` in a terminal ends with the same URLs.
    let out = std::process::Command::new("script")
        .arg("-qec")
        .arg(format!(
            "{} ps -f {}",
            mesh_bin(),
            p.file("mesh.toml").display()
        ))
        .arg("/dev/null")
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last.contains(&format!("web http://{web}"))
            && last.contains(&format!("dashboard http://{admin}/")),
        "{text}"
    );
    let mut all = app_pids(&mesh, "web", 1);
    all.extend(app_pids(&mesh, "raw", 1));
    all.extend(pids_of(&mesh, "ua.py", "ua", 0));
    stop_mesh(mesh, &all);
}

/// A reload that changes a live setting (`health`) and one that replaces (`env`) of the
/// same service applies both with the new processes only: when the replacement fails,
/// the old replica keeps its whole configuration and stays ready.
#[test]
fn a_failed_replacement_keeps_the_old_health_check_too() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
ready_timeout = "1s"
env = {{ VERSION = "1" }}

[services.api.health]
http = "/whoami"
interval = "200ms"
"#,
        app = test_app()
    ));
    let mesh = p.up_reloading_by_hand(&[]);
    mesh.wait_line("ready in", T);
    assert_eq!(row(&p, "api", 0)["health"], "ready");
    let good = p.read("mesh.toml");
    p.write(
        "mesh.toml",
        &good
            .replace("VERSION = \"1\"", "VERSION = \"2\"")
            .replace("http = \"/whoami\"", "http = \"/status/500\""),
    );
    let (code, out, err) = p.run(&["reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("kept the running replica"), "{err}");
    // The old process is checked as before: still ready, a while after the refusal.
    let deadline = std::time::Instant::now() + Duration::from_millis(800);
    while std::time::Instant::now() < deadline {
        assert_eq!(row(&p, "api", 0)["health"], "ready");
        std::thread::park_timeout(Duration::from_millis(100));
    }
    let pids = app_pids(&mesh, "api", 1);
    stop_mesh(mesh, &pids);
}
