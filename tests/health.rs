//! Health probes run through the real shim (SPEC §3 Readiness: `exec` checks).

mod support;

use std::time::Duration;

use mesh_supervisor::health::{Probe, probe_once};
use mesh_supervisor::process::{SpawnSpec, set_shim};

#[tokio::test]
async fn exec_probe_passes_on_exit_zero_and_kills_on_timeout() {
    set_shim(env!("CARGO_BIN_EXE_mesh").into());
    // Bounded as a whole so that a broken spawn fails the test instead of hanging it.
    tokio::time::timeout(Duration::from_secs(30), check_exec_probe())
        .await
        .expect("probes finish");
}

async fn check_exec_probe() {
    let spec = |script: &str| {
        Probe::Exec(SpawnSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: std::env::temp_dir(),
            uid: None,
            gid: None,
        })
    };
    let timeout = Duration::from_secs(5);
    assert_eq!(probe_once(&spec("exit 0"), timeout).await, Ok(()));
    assert_eq!(
        probe_once(&spec("exit 3"), timeout).await,
        Err("exec check exited 3".into())
    );
    // The last line it wrote to stderr says why.
    assert_eq!(
        probe_once(
            &spec("echo starting >&2; echo 'db not reachable' >&2; exit 1"),
            timeout
        )
        .await,
        Err("exec check exited 1: db not reachable".into())
    );
    assert_eq!(
        probe_once(&spec("sleep 10"), Duration::from_millis(200)).await,
        Err("timed out after 200ms".into())
    );
}

/// An HTTP check reads the whole response and closes in order: a server that logs
/// connection resets (Python's http.server prints a traceback) never sees one.
#[test]
fn http_checks_close_connections_cleanly() {
    use nix::sys::signal::Signal;
    use support::*;

    let p = Project::new(
        r#"
[services.py]
command = ["python3", "-u", "server.py"]
health = { http = "/healthz", interval = "100ms" }
"#,
    );
    p.write(
        "server.py",
        r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok" * 2000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        print("request", self.path, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#,
    );
    let mut mesh = p.up(&[]);
    let limit = Duration::from_secs(20);
    eventually("ten health checks", limit, || {
        (mesh.count("py.0 | request /healthz") >= 10).then_some(())
    });
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(limit), 0);
    let out = mesh.output();
    assert!(
        !out.iter()
            .any(|l| l.contains("Traceback") || l.contains("Error")),
        "the app saw a broken connection: {out:?}"
    );
}
