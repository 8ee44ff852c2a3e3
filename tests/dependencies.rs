//! Start order and readiness gating (SPEC §3 Dependencies, Readiness, One-shot jobs).

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn each_condition_gates_the_start() {
    let p = Project::new(
        r#"
[services.migrate]
command = ["sh", "-c", "echo migrate >> order.log"]
port = "none"
restart = "never"

[services.store]
command = ["sh", "-c", "echo store >> order.log; exec sleep 1000"]
port = "none"
depends_on = { migrate = "completed" }
[services.store.health]
exec = ["sh", "-c", "echo check >> checks.log; test -f store.ready"]
interval = "100ms"

[services.api]
command = ["sh", "-c", "echo api >> order.log; exec sleep 1000"]
port = "none"
depends_on = { store = "healthy" }

[services.web]
command = ["sh", "-c", "echo web >> order.log; exec sleep 1000"]
port = "none"
depends_on = ["api"]
"#,
    );
    let (code, out, err) = p.check();
    assert_eq!(code, 0, "{err}");
    let order: Vec<&str> = ["migrate", "store", "api", "web"]
        .into_iter()
        .map(|s| {
            let at = out
                .find(&format!(". {s} "))
                .unwrap_or_else(|| panic!("{s} in {out}"));
            (at, s)
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .collect();
    assert_eq!(
        order,
        ["migrate", "store", "api", "web"],
        "plan order:\n{out}"
    );

    let mut mesh = p.up(&[]);
    // store starts only once migrate completed, and api waits for store to be healthy:
    // let the failing health check run several times and look again.
    eventually("store to start", T, || {
        (p.lines("order.log").len() == 2).then_some(())
    });
    assert_eq!(p.lines("order.log"), ["migrate", "store"]);
    eventually("three failed health checks", T, || {
        (p.lines("checks.log").len() >= 3).then_some(())
    });
    assert_eq!(
        p.lines("order.log"),
        ["migrate", "store"],
        "api waits for store to be healthy"
    );
    p.write("store.ready", "");
    eventually("api and web to start", T, || {
        (p.lines("order.log").len() == 4).then_some(())
    });
    assert_eq!(p.lines("order.log"), ["migrate", "store", "api", "web"]);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn default_readiness_waits_for_the_port() {
    let p = Project::new(
        r#"
[services.slow]
command = ["python3", "slow.py"]

[services.after]
command = ["sh", "-c", "echo after-started; exec sleep 1000"]
port = "none"
depends_on = { slow = "healthy" }
"#,
    );
    // Listens only once the test creates `go`; says so each time it looks.
    p.write(
        "slow.py",
        r#"
import os, socket, sys, time
while not os.path.exists("go"):
    print("waiting", flush=True)
    time.sleep(0.05)
s = socket.socket()
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen()
print("listening", flush=True)
while True:
    s.accept()[0].close()
"#,
    );
    let mut mesh = p.up(&[]);
    eventually("slow to poll a few times", T, || {
        (mesh.count("slow.0 | waiting") >= 5).then_some(())
    });
    assert_eq!(
        mesh.count("after-started"),
        0,
        "after waits for slow's port"
    );
    p.write("go", "");
    mesh.wait_line("slow.0 | listening", T);
    mesh.wait_line("after.0 | after-started", T);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[test]
fn a_failed_job_blocks_its_dependents_and_mesh_exits_1() {
    let p = Project::new(
        r#"
[services.bad]
command = ["sh", "-c", "exit 3"]
port = "none"
restart = "never"

[services.dep]
command = ["sh", "-c", "echo dep-started"]
port = "none"
depends_on = { bad = "completed" }
"#,
    );
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 1);
    mesh.wait_line("bad.0 exited with code 3", T);
    assert_eq!(mesh.count("dep-started"), 0);
}

#[test]
fn up_with_services_starts_only_what_they_reach() {
    let p = Project::new(
        r#"
[services.db]
command = ["sh", "-c", "echo db-up; exec sleep 1000"]
port = "none"

[services.api]
command = ["sh", "-c", "echo api-up; exec sleep 1000"]
depends_on = ["db"]
port = "none"

[services.other]
command = ["sh", "-c", "echo other-up; exec sleep 1000"]
port = "none"
"#,
    );
    let mut mesh = p.up(&["api"]);
    mesh.wait_line("api.0 | api-up", T);
    mesh.wait_line("db.0 | db-up", T);
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert_eq!(mesh.count("other-up"), 0);
}
