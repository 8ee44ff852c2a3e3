//! Stopping without leftovers (SPEC §2 process groups, §4 Signals).

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(20);

/// An app that records its pid, and on SIGTERM records `stop-NAME` and exits.
const POLITE: &str = r#"
trap 'echo "stop-$1" >> stops.log; exit 0' TERM
echo $$ >> pids.log
echo "$1-up"
sleep 1000 &
wait
"#;

/// Start a mesh running [`STUBBORN`] with `stop_timeout`, and `mesh_settings` in `[mesh]`;
/// returns once the app runs, with its pid.
fn stubborn(mesh_settings: &str, stop_timeout: &str) -> (Project, MeshProc, Vec<i32>) {
    let p = Project::new(&format!(
        r#"
version = 1
[mesh]
name = "t"
{mesh_settings}

[services.stubborn]
command = ["sh", "stubborn.sh"]
port = "none"
stop_timeout = "{stop_timeout}"
"#
    ));
    p.write("stubborn.sh", STUBBORN);
    let mesh = p.up(&[]);
    mesh.wait_line("stubborn-up", T);
    let pids = read_pids(&p, "pids.log");
    (p, mesh, pids)
}

/// An app that ignores SIGTERM (and SIGINT).
const STUBBORN: &str = r#"
trap '' TERM INT
echo $$ >> pids.log
echo "stubborn-up"
exec sleep 1000
"#;

#[test]
fn graceful_stop_in_reverse_start_order() {
    let p = Project::new(
        r#"
[services.a]
command = ["sh", "polite.sh", "a"]
port = "none"

[services.b]
command = ["sh", "polite.sh", "b"]
port = "none"
depends_on = ["a"]

[services.c]
command = ["sh", "polite.sh", "c"]
port = "none"
depends_on = ["b"]
"#,
    );
    p.write("polite.sh", POLITE);
    let mut mesh = p.up(&[]);
    mesh.wait_line("c.0 | c-up", T);
    let pids = read_pids(&p, "pids.log");
    assert_eq!(pids.len(), 3);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_eq!(p.lines("stops.log"), ["stop-c", "stop-b", "stop-a"]);
    assert_gone(&pids, Duration::from_secs(2));
}

#[test]
fn sigkill_after_stop_timeout() {
    let (_p, mut mesh, pids) = stubborn("", "300ms");
    mesh.signal(Signal::SIGINT);
    assert_eq!(mesh.exit_code(T), 0);
    mesh.wait_line("did not stop within 300ms: sending SIGKILL", T);
    assert_gone(&pids, Duration::from_secs(2));
}

#[test]
fn shutdown_timeout_bounds_the_whole_sequence() {
    let (_p, mut mesh, pids) = stubborn("shutdown_timeout = \"500ms\"", "60s");
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    mesh.wait_line("shutdown_timeout reached", T);
    assert_gone(&pids, Duration::from_secs(2));
}

#[test]
fn second_sigint_kills_at_once_and_exits_130() {
    let (_p, mut mesh, pids) = stubborn("", "60s");
    mesh.signal(Signal::SIGINT);
    mesh.wait_line("press Ctrl-C again", T);
    mesh.signal(Signal::SIGINT);
    assert_eq!(mesh.exit_code(Duration::from_secs(5)), 130);
    assert_gone(&pids, Duration::from_secs(2));
}

/// An app that double-forks: its grandchild leaves the process group and session.
const DOUBLE_FORK: &str = r#"
echo $$ > app.pid
( setsid sh -c 'echo $$ > grandchild.pid; exec sleep 1000' & )
( setsid sh -c 'echo $$ > shortlived.pid; exec sleep 0.2' & )
echo forked
exec sleep 1000
"#;

#[test]
fn double_forked_grandchildren_are_reaped_and_killed_on_stop() {
    let p = Project::new(
        r#"
[services.forker]
command = ["sh", "fork.sh"]
port = "none"
"#,
    );
    p.write("fork.sh", DOUBLE_FORK);
    let mut mesh = p.up(&[]);
    mesh.wait_line("forker.0 | forked", T);
    let app = read_pid(&p, "app.pid", T);
    let grandchild = read_pid(&p, "grandchild.pid", T);
    let shortlived = read_pid(&p, "shortlived.pid", T);
    // The short-lived orphan exits on its own and must be reaped, not left a zombie.
    assert_gone(&[shortlived], Duration::from_secs(5));
    assert!(alive(grandchild), "the daemon runs while mesh runs");
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_gone(&[app, grandchild], Duration::from_secs(2));
}

#[test]
fn sigkill_of_mesh_leaves_nothing_behind() {
    let p = Project::new(
        r#"
[services.forker]
command = ["sh", "fork.sh"]
port = "none"

[services.plain]
command = ["sh", "-c", "echo plain-up; exec sleep 1000"]
port = "none"
replicas = 2
"#,
    );
    p.write("fork.sh", DOUBLE_FORK);
    let mut mesh = p.up(&[]);
    mesh.wait_line("forker.0 | forked", T);
    mesh.wait_line("plain.1 | plain-up", T);
    let app = read_pid(&p, "app.pid", T);
    let grandchild = read_pid(&p, "grandchild.pid", T);
    let shim = parent_of(app).expect("the app's parent");
    assert!(alive(grandchild));
    mesh.signal(Signal::SIGKILL);
    let status = mesh.wait_exit(T);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_gone(&[app, grandchild, shim], Duration::from_secs(2));
    // Nothing else that mesh started is left either: no process has the test's
    // project directory as its working directory.
    eventually(
        "no process left in the project dir",
        Duration::from_secs(2),
        || procs_in(p.path()).is_empty().then_some(()),
    );
}

/// Pids of live processes whose cwd is `dir`.
fn procs_in(dir: &std::path::Path) -> Vec<i32> {
    let dir = dir.canonicalize().expect("canonical");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir) && alive(*pid)
        })
        .collect()
}

#[test]
fn stray_signals_to_the_shim_do_not_orphan_the_app() {
    let p = Project::new(
        r#"
[services.a]
command = ["sh", "polite.sh", "a"]
port = "none"
"#,
    );
    p.write("polite.sh", POLITE);
    let mut mesh = p.up(&[]);
    mesh.wait_line("a.0 | a-up", T);
    let app = read_pids(&p, "pids.log")[0];
    let shim = parent_of(app).expect("the app's parent");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{shim}/comm"))
            .expect("comm")
            .trim(),
        "mesh-shim",
        "`pkill -x mesh` must not match the shims"
    );
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), sig).expect("signal the shim");
    }
    // The shim is still there to deliver the graceful stop: the app sees its SIGTERM.
    assert!(alive(shim) && alive(app));
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_eq!(p.lines("stops.log"), ["stop-a"]);
    assert_gone(&[app, shim], Duration::from_secs(2));
}

#[test]
fn the_stop_signal_arrives_exactly_once() {
    let p = Project::new(
        r#"
[services.counter]
command = ["python3", "count.py"]
port = "none"
"#,
    );
    // Counts SIGTERMs; after the first it stays a moment to catch a duplicate. Python,
    // not sh: a shell's background `sleep` can lose a signal that lands between its fork
    // and its exec, and the script would then hang until SIGKILL.
    p.write(
        "count.py",
        r#"
import signal, threading, time
n = 0
got = threading.Event()
def count(signum, frame):
    global n
    n += 1
    got.set()
signal.signal(signal.SIGTERM, count)
print("counter-up", flush=True)
got.wait()
time.sleep(0.3)
print(f"terms={n}", flush=True)
"#,
    );
    let mut mesh = p.up(&[]);
    mesh.wait_line("counter.0 | counter-up", T);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    mesh.wait_line("counter.0 | terms=1", T);
}
