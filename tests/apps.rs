//! What an application is given (SPEC §2): environment, ports, stdin, logs, spawn errors.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn environment_ports_and_interpolation() {
    let p = Project::new(
        r#"
[services.api]
command = ["sh", "-c", "echo api-up port=$$PORT; exec sleep 1000"]
replicas = 2

[services.web]
command = ["sh", "-c", "echo \"web env PORT=$$PORT SVC=$$MESH_SERVICE REP=$$MESH_REPLICA NAME=$$MESH_NAME URL=$$API_URL ADDR=$$API_ADDR G=$$GREETING F=$$FROM_FILE N=$${NOTIFY_SOCKET:-unset} ARG=$$1\"; exec sleep 1000", "x", "${MESH_SERVICE}-${PORT}"]
upstreams = ["api"]
env = { GREETING = "hi-${MESH_REPLICA}" }
env_file = "web.env"
depends_on = ["api"]
"#,
    );
    p.write("web.env", "# comment\nFROM_FILE=file-${MESH_SERVICE}\n");
    let mut cmd = std::process::Command::new(mesh_bin());
    cmd.args(["up", "-f"])
        .arg(p.file("mesh.toml"))
        .env("NOTIFY_SOCKET", "/nonexistent/notify");
    let mut mesh = MeshProc::spawn(cmd);

    let line = mesh.wait_line("web env", T);
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            .to_string()
    };
    let port: u16 = field("PORT").parse().expect("PORT is a number");
    assert_ne!(port, 0);
    assert_eq!(field("SVC"), "web");
    assert_eq!(field("REP"), "0");
    assert_eq!(field("NAME"), "t");
    assert_eq!(field("G"), "hi-0", "env values are ${{}}-expanded");
    assert_eq!(field("F"), "file-web", "env_file values are expanded");
    assert_eq!(field("N"), "unset", "NOTIFY_SOCKET is not passed to apps");
    assert_eq!(
        field("ARG"),
        format!("web-{port}"),
        "command words are expanded"
    );
    let addr = field("ADDR");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(field("URL"), format!("http://{addr}"));
    assert!(line.starts_with("web.0 | "), "prefixed output: {line}");

    // Two api replicas, each with its own port. (Each replica's output has its own
    // relay: api.1's line may come before api.0's.)
    mesh.wait_line("api.0 | api-up", T);
    mesh.wait_line("api.1 | api-up", T);
    let ports: Vec<String> = mesh
        .output()
        .iter()
        .filter(|l| l.contains("api-up"))
        .map(|l| l.rsplit('=').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(ports.len(), 2);
    assert_ne!(ports[0], ports[1]);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn stdin_is_closed_and_stderr_is_relayed() {
    let p = Project::new(
        r#"
[services.job]
command = ["sh", "-c", "cat; echo stdin-eof; echo to-stderr >&2; grep '^SigBlk' /proc/self/status"]
port = "none"
restart = "never"
"#,
    );
    let mut mesh = p.up(&[]);
    assert_eq!(
        mesh.exit_code(T),
        0,
        "a job that completes ends mesh up with 0"
    );
    let out = mesh.output();
    assert!(out.iter().any(|l| l == "job.0 | stdin-eof"), "{out:?}");
    assert!(out.iter().any(|l| l == "job.0 | to-stderr"), "{out:?}");
    // No signal blocked or ignored: the shim's own mask does not leak into applications.
    assert!(
        out.iter().any(|l| l == "job.0 | SigBlk:\t0000000000000000"),
        "{out:?}"
    );
    // Also kept in state_dir/logs.
    let log = p.read(".mesh/logs/job.0.log");
    assert!(log.contains("stdin-eof"), "log file: {log:?}");
}

#[test]
fn json_log_format() {
    let p = Project::new(
        r#"
[services.job]
command = ["sh", "-c", "echo hello"]
port = "none"
restart = "never"
"#,
    );
    let mut cmd = std::process::Command::new(mesh_bin());
    cmd.args(["--log-format", "json", "up", "-f"])
        .arg(p.file("mesh.toml"));
    let mut mesh = MeshProc::spawn(cmd);
    assert_eq!(mesh.exit_code(T), 0);
    let line = mesh.wait_line("\"line\":\"hello\"", T);
    let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
    assert_eq!(v["service"], "job");
    assert_eq!(v["replica"], 0);
    assert_eq!(v["stream"], "stdout");
    assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
}

#[test]
fn missing_program_fails_that_service_while_the_rest_runs() {
    let p = Project::new(
        r#"
[services.broken]
command = "/nonexistent/program --flag"
port = "none"
backoff = { initial = "10ms", max = "50ms" }
start_limit = { burst = 2, interval = "60s" }

[services.fine]
command = ["sh", "-c", "echo fine-up; exec sleep 1000"]
port = "none"
"#,
    );
    let (code, _out, err) = p.check();
    assert_eq!(code, 0);
    assert!(
        err.contains("program `/nonexistent/program` not found"),
        "{err}"
    );

    let mut mesh = p.up(&[]);
    let line = mesh.wait_line("No such file or directory", T);
    assert!(line.contains("broken.0"), "{line}");
    mesh.wait_line("broken.0 failed", T);
    mesh.wait_line("fine.0 | fine-up", T);
    // The healthy service keeps mesh up: it has not exited.
    assert!(mesh.count("stopped") == 0);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn second_mesh_on_the_same_state_dir_is_refused() {
    let p = Project::new(
        r#"
[services.s]
command = ["sh", "-c", "echo s-up; exec sleep 1000"]
port = "none"
"#,
    );
    let mut first = p.up(&[]);
    first.wait_line("s.0 | s-up", T);
    let mut second = p.up(&[]);
    assert_eq!(second.exit_code(T), 1);
    let line = second.wait_line("already running", T);
    assert!(line.contains(&format!("pid {}", first.pid())), "{line}");
    first.signal(Signal::SIGTERM);
    assert_eq!(first.exit_code(T), 0);
}

#[test]
fn unknown_service_on_the_command_line_is_misuse() {
    let p = Project::new(
        r#"
[services.s]
command = "true"
"#,
    );
    let mut mesh = p.up(&["nosuch"]);
    assert_eq!(mesh.exit_code(T), 2);
}

#[test]
fn relative_program_paths_are_relative_to_working_dir() {
    let p = Project::new(
        r#"
[services.job]
command = "./run.sh from-sub"
working_dir = "sub"
port = "none"
restart = "never"
"#,
    );
    std::fs::create_dir(p.file("sub")).expect("mkdir");
    p.write(
        "sub/run.sh",
        "#!/bin/sh\necho \"ran $1 in $(basename \"$PWD\")\"\n",
    );
    let mut perms = std::fs::metadata(p.file("sub/run.sh"))
        .expect("meta")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(p.file("sub/run.sh"), perms).expect("chmod");
    let (code, _, err) = p.check();
    assert_eq!(code, 0);
    assert!(!err.contains("not found"), "{err}");
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 0);
    mesh.wait_line("job.0 | ran from-sub in sub", T);
}
