//! systemd notifications (SPEC §6) through a real `NOTIFY_SOCKET`, against the real
//! binary.

mod support;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

/// A notification socket that collects every datagram mesh sends, in order.
struct Systemd {
    path: std::path::PathBuf,
    received: Arc<Mutex<Vec<String>>>,
}

impl Systemd {
    fn listen(p: &Project) -> Systemd {
        let path = p.file("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock()
                    .expect("lock")
                    .extend(text.lines().map(str::to_string));
            }
        });
        Systemd { path, received }
    }

    fn messages(&self) -> Vec<String> {
        self.received.lock().expect("lock").clone()
    }

    /// Wait until a message equal to (or, with a trailing `*`, starting with) `want`.
    fn wait(&self, want: &str) -> usize {
        eventually(&format!("systemd to receive {want}"), T, || {
            self.messages()
                .iter()
                .position(|m| match want.strip_suffix('*') {
                    Some(prefix) => m.starts_with(prefix),
                    None => m == want,
                })
        })
    }
}

#[test]
fn ready_status_watchdog_and_stopping_reach_systemd() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
env = {{ TEST_APP_DELAY_START_MS = "500" }}

[services.job]
command = ["true"]
port = "none"
restart = "never"
"#,
        app = test_app()
    ));
    let systemd = Systemd::listen(&p);
    let socket = systemd.path.to_string_lossy().into_owned();
    let mut mesh = p.up_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", socket.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );

    // api binds its port only after 500 ms: mesh reports it unready first, then ready.
    let ready = systemd.wait("READY=1");
    let before: Vec<String> = systemd.messages()[..ready].to_vec();
    assert!(
        before.iter().any(|m| m.starts_with("STATUS=")
            && m.contains("ready")
            && !m.starts_with("STATUS=2/2")),
        "{before:?}"
    );
    assert!(
        before.iter().any(|m| m == "STATUS=2/2 ready, 0 restarting"),
        "READY=1 must come once everything is ready: {before:?}"
    );
    // Pings at half of WATCHDOG_USEC: several within a second or so.
    eventually("three watchdog pings", T, || {
        (systemd
            .messages()
            .iter()
            .filter(|m| *m == "WATCHDOG=1")
            .count()
            >= 3)
            .then_some(())
    });

    mesh.signal(Signal::SIGTERM);
    let stopping = systemd.wait("STOPPING=1");
    assert!(stopping > ready);
    assert_eq!(mesh.exit_code(T), 0);
    // READY=1 was sent once.
    assert_eq!(
        systemd
            .messages()
            .iter()
            .filter(|m| *m == "READY=1")
            .count(),
        1
    );
}

#[test]
fn without_notify_socket_nothing_is_sent() {
    // The same mesh without NOTIFY_SOCKET must run normally (and, having no socket to
    // write to, it cannot send anything; this checks it does not fail trying).
    let p = Project::new(
        r#"
[services.job]
command = ["true"]
port = "none"
restart = "never"
"#,
    );
    let mut mesh = p.up(&[]);
    assert_eq!(mesh.exit_code(T), 0);
    assert_eq!(mesh.count("cannot notify systemd"), 0);
}

#[test]
fn a_reload_is_announced_with_reloading_and_monotonic_usec_then_ready() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
env = {{ VERSION = "1" }}
"#,
        app = test_app()
    ));
    let systemd = Systemd::listen(&p);
    let socket = systemd.path.to_string_lossy().into_owned();
    let mut mesh = p.up_with_env(&[], &[("NOTIFY_SOCKET", socket.as_str())]);
    let ready = systemd.wait("READY=1");
    p.write(
        "mesh.toml",
        &p.read("mesh.toml")
            .replace("VERSION = \"1\"", "VERSION = \"2\""),
    );
    mesh.signal(Signal::SIGHUP);
    mesh.wait_line("api: env changed", T);
    let reloading = systemd.wait("RELOADING=1");
    let monotonic = systemd.wait("MONOTONIC_USEC=*");
    assert!(reloading > ready && monotonic > ready);
    let usec: u64 = systemd.messages()[monotonic]
        .trim_start_matches("MONOTONIC_USEC=")
        .parse()
        .expect("a number of microseconds");
    assert!(usec > 0);
    eventually("READY=1 after the reload", T, || {
        let messages = systemd.messages();
        messages[reloading..]
            .iter()
            .any(|m| m == "READY=1")
            .then_some(())
    });
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}
