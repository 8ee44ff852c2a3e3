//! `mesh run -- CMD` (SPEC §4, §7): an isolated mesh for the length of one command,
//! against the real binary.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;

const T: Duration = Duration::from_secs(30);

/// `api` (http, exposed on a fixed port and listening on a fixed port) and `raw` (tcp),
/// each writing its pid to a file; nothing calls them.
fn project() -> (Project, u16, u16) {
    let (expose, port) = (free_port(), free_port());
    let p = Project::new(&format!(
        r#"
[services.api]
command = ["sh", "-c", "echo $$$$ > api.pid; exec {app}"]
expose = {expose}
port = {port}

[services.raw-db]
command = ["sh", "-c", "echo $$$$ > raw.pid; exec {app}"]
protocol = "tcp"

[services.job]
command = ["true"]
port = "none"
"#,
        app = test_app()
    ));
    (p, expose, port)
}

fn mesh_run(p: &Project, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(mesh_bin())
        .arg("run")
        .arg("-f")
        .arg(p.file("mesh.toml"))
        .args(args)
        .current_dir(p.path())
        .output()
        .expect("mesh run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pid_in(p: &Project, name: &str) -> i32 {
    p.read(name).trim().parse().expect("a pid")
}

#[test]
fn cmd_gets_the_test_ingresses_and_its_exit_code_is_the_result() {
    let (p, _, _) = project();
    let script = r#"
echo "url=$API_URL addr=$API_ADDR raw=$RAW_DB_ADDR rawurl=${RAW_DB_URL:-none} job=${JOB_ADDR:-none}"
python3 - <<'EOF'
import json, os, urllib.request
body = urllib.request.urlopen(os.environ["API_URL"] + "/headers", timeout=10).read()
print("client-id", json.loads(body)["x-mesh-client-id"])
EOF
exit 3
"#;
    let (code, out, err) = mesh_run(&p, &["--", "sh", "-c", script]);
    assert_eq!(code, 3, "{out}{err}");
    let line = out.lines().next().unwrap_or_default();
    let url = field_of(line, "url");
    let addr = field_of(line, "addr");
    assert_eq!(url, format!("http://{addr}"), "{line}");
    assert!(field_of(line, "raw").starts_with("127.0.0.1:"), "{line}");
    assert_eq!(
        field_of(line, "rawurl"),
        "none",
        "a tcp service has no URL: {line}"
    );
    assert!(out.contains("client-id spiffe://t/test"), "{out}");
    // Torn down: the apps are gone, and so is the private state directory.
    assert_gone(&[pid_in(&p, "api.pid"), pid_in(&p, "raw.pid")], T);
    let run_dir = p.file(".mesh/run");
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // 128 + N when CMD dies of signal N.
    let (code, _, err) = mesh_run(&p, &["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code, 128 + 15, "{err}");
}

#[test]
fn two_runs_of_one_file_side_by_side() {
    // Fixed `expose` and `port` are remapped: both runs work at once.
    let (p, expose, port) = project();
    let start = |name: &str| {
        Command::new(mesh_bin())
            .arg("run")
            .arg("-f")
            .arg(p.file("mesh.toml"))
            .args(["--", "sh", "-c"])
            .arg(format!(
                "echo ready; while [ ! -e {name} ]; do sleep 0.05; done; echo $API_URL"
            ))
            .current_dir(p.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("mesh run")
    };
    let mut a = start("go");
    let mut b = start("go");
    for child in [&mut a, &mut b] {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "ready");
    }
    p.write("go", "");
    let a = a.wait_with_output().expect("a");
    let b = b.wait_with_output().expect("b");
    assert!(a.status.success() && b.status.success());
    let (ua, ub) = (
        String::from_utf8_lossy(&a.stdout).into_owned(),
        String::from_utf8_lossy(&b.stdout).into_owned(),
    );
    assert_ne!(ua, ub, "each run has its own test ingress");
    assert!(!ua.contains(&format!(":{expose}")) && !ua.contains(&format!(":{port}")));
}

#[test]
fn a_mesh_that_never_becomes_ready_exits_1_with_the_reason_and_last_lines() {
    let p = Project::new(
        r#"
[services.broken]
command = ["sh", "-c", "echo 'cannot open config.yml' >&2; exit 4"]
restart = "never"
"#,
    );
    let (code, out, err) = mesh_run(&p, &["--", "echo", "never runs"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!out.contains("never runs"), "{out}");
    assert!(
        err.contains("never became ready") && err.contains("broken.0 is exited"),
        "{err}"
    );
    assert!(err.contains("cannot open config.yml"), "{err}");

    let p = Project::new(
        r#"
[services.slow]
command = ["sleep", "1000"]
"#,
    );
    let (code, _, err) = mesh_run(&p, &["--wait-timeout", "1s", "--", "true"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("not ready within 1s") && err.contains("slow.0"),
        "{err}"
    );
}

#[test]
fn a_signal_to_mesh_run_reaches_cmd_and_the_mesh_is_torn_down() {
    let (p, _, _) = project();
    let mut run = Command::new(mesh_bin())
        .arg("run")
        .arg("-f")
        .arg(p.file("mesh.toml"))
        .args(["--", "sh", "-c"])
        .arg("trap 'exit 9' INT; echo waiting; while :; do sleep 0.05; done")
        .current_dir(p.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mesh run");
    let mut line = String::new();
    BufReader::new(run.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "waiting");
    kill(Pid::from_raw(run.id() as i32), Signal::SIGINT).expect("SIGINT");
    let status = eventually("mesh run to end", T, || run.try_wait().expect("try_wait"));
    assert_eq!(status.code(), Some(9), "{status:?}");
    assert_gone(&[pid_in(&p, "api.pid"), pid_in(&p, "raw.pid")], T);
}
