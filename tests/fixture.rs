//! `mesh::Mesh`, the integration-test fixture (SPEC §7), used as a test would use it.
//! No test here points the library at the `mesh` binary: the test binary is its own
//! shim.

mod support;

use std::time::Duration;

use mesh::{Error, Mesh};
use support::*;

const T: Duration = Duration::from_secs(30);

fn toml(name: &str) -> String {
    format!(
        r#"
version = 1

[mesh]
name = "{name}"
admin = "127.0.0.1:9"

[services.api]
command = [{app:?}]
replicas = 2
expose = 8080
port = 0

[services.raw]
command = [{app:?}]
protocol = "tcp"
"#,
        app = test_app()
    )
}

fn app_pids(rows: &[mesh::Replica]) -> Vec<i32> {
    rows.iter()
        .filter_map(|r| r.pid.map(|p| p as i32))
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_fixture_is_ready_hands_out_addresses_acts_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::from_toml(&toml("fx"), dir.path())
        .expect("valid")
        .env("api", "GREETING", "hi")
        .start()
        .await
        .expect("ready");
    // Through the test ingress, whose identity every inbound admits.
    let url = mesh.url("api");
    let addr = url.trim_start_matches("http://").to_string();
    assert_ne!(addr, "127.0.0.1:8080", "expose is remapped");
    let r = get(&addr, "/headers").expect("answer");
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("\"x-mesh-client-id\":\"spiffe://fx/test\""),
        "{}",
        r.body
    );
    assert!(mesh.addr("raw").port() > 0);
    let tcp_url = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mesh.url("raw")));
    assert!(tcp_url.is_err(), "url() of a tcp service panics");
    let admin = mesh.admin_url().expect("admin on");
    assert!(!admin.ends_with(":9/"), "admin is remapped: {admin}");

    let rows = mesh.ps().await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.health == "ready"), "{rows:?}");
    let before = app_pids(&rows);

    mesh.service("api").restart().await.expect("restart");
    let after = app_pids(&mesh.ps().await);
    assert_eq!(after.len(), 3);
    assert!(
        before.iter().filter(|p| after.contains(p)).count() == 1,
        "only raw kept its process: {before:?} {after:?}"
    );
    mesh.service("raw").stop().await.expect("stop");
    mesh.service("raw").start().await.expect("start");
    assert!(
        mesh.logs("api").iter().any(|l| l.contains("listening on")),
        "{:?}",
        mesh.logs("api")
    );
    let pids = app_pids(&mesh.ps().await);
    drop(mesh);
    // Synchronously: nothing of the mesh is alive once drop returned.
    for pid in pids {
        assert!(!alive(pid), "pid {pid} outlived the fixture");
    }
}

#[test]
fn start_blocking_needs_no_runtime_and_twenty_fixtures_run_in_parallel() {
    let threads: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let dir = tempfile::tempdir().expect("tempdir");
                let mesh = Mesh::from_toml(&toml(&format!("p{i}")), dir.path())
                    .expect("valid")
                    .replicas("api", 1)
                    .services(["api"])
                    .start_blocking()
                    .expect("ready");
                let r =
                    get(mesh.url("api").trim_start_matches("http://"), "/whoami").expect("answer");
                assert_eq!(r.status, 200);
                drop(mesh);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a fixture thread");
    }
}

#[tokio::test]
async fn failures_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = r#"
version = 1
[services.job]
command = ["sh", "-c", "echo 'missing DATABASE_URL' >&2; exit 3"]
restart = "never"
"#;
    match Mesh::from_toml(broken, dir.path())
        .expect("valid")
        .start()
        .await
    {
        Err(Error::NotReady {
            service,
            state,
            exit_code,
            last_lines,
            ..
        }) => {
            assert_eq!(
                (service.as_str(), state.as_str(), exit_code),
                ("job", "exited", Some(3))
            );
            assert!(
                last_lines
                    .iter()
                    .any(|l| l.contains("missing DATABASE_URL")),
                "{last_lines:?}"
            );
        }
        other => panic!("not NotReady: {other:?}"),
    }
    let slow = r#"
version = 1
[services.slow]
command = ["sleep", "1000"]
"#;
    let error = Mesh::from_toml(slow, dir.path())
        .expect("valid")
        .startup_timeout(Duration::from_millis(500))
        .start()
        .await
        .expect_err("not ready");
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(error.to_string().contains("slow.0"), "{error}");
    match Mesh::from_toml("version = 1\n[services.x]\ncomand = \"true\"\n", dir.path()) {
        Err(Error::Config(text)) => assert!(text.contains("mesh.toml:3:1: error"), "{text}"),
        other => panic!("not a config error: {other:?}"),
    }
}

/// Run as a child test process by the test below: starts a fixture, writes its pids,
/// and panics.
#[test]
fn panicking_child() {
    let Ok(out) = std::env::var("MESH_FIXTURE_PANIC_PIDS") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = Mesh::from_toml(&toml("panics"), dir.path())
        .expect("valid")
        .start_blocking()
        .expect("ready");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let pids: Vec<String> = app_pids(&rt.block_on(mesh.ps()))
        .iter()
        .map(i32::to_string)
        .collect();
    std::fs::write(out, pids.join("\n")).expect("write pids");
    panic!("a failing test");
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pids_file = dir.path().join("pids");
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "panicking_child", "--nocapture"])
        .env("MESH_FIXTURE_PANIC_PIDS", &pids_file)
        .output()
        .expect("child test");
    assert!(!status.status.success(), "the child test panicked");
    let pids: Vec<i32> = std::fs::read_to_string(&pids_file)
        .expect("pids")
        .lines()
        .map(|l| l.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_gone(&pids, T);
}

#[test]
fn the_apps_get_only_what_the_config_names_of_the_test_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
version = 1
[services.api]
command = ["sh", "-c", "env > env.txt; exec {app}"]
env = {{ FROM_TEST = "${{CARGO_MANIFEST_DIR}}" }}
"#,
        app = test_app()
    );
    let mesh = Mesh::from_toml(&toml, dir.path())
        .expect("valid")
        .start_blocking()
        .expect("ready");
    let env = std::fs::read_to_string(dir.path().join("env.txt")).expect("env.txt");
    assert!(
        env.lines()
            .any(|l| l == format!("FROM_TEST={}", env!("CARGO_MANIFEST_DIR"))),
        "{env}"
    );
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    // cargo sets CARGO_PKG_NAME for this test process; the config does not name it.
    assert!(!env.contains("CARGO_PKG_NAME="), "{env}");
    drop(mesh);
}
