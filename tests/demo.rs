//! The root mesh.toml (the quickstart demo) parses, runs, and serves its page.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn demo_runs_and_serves_the_shop_page() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("mesh.toml")).expect("mesh.toml");
    // The demo's web listens on the fixed port 8080; tests use ephemeral ports only, and
    // a private copy of the database.
    assert!(
        text.contains("port = 8080"),
        "the demo keeps its documented port"
    );
    let quickstart = root.join("examples/quickstart");
    let text = text
        .replace("port = 8080", "port = 0")
        .replace(
            "working_dir = \"examples/quickstart\"",
            &format!("working_dir = {:?}", quickstart.display().to_string()),
        )
        .replace("[mesh]\n", "[mesh]\nshutdown_timeout = \"10s\"\n");
    let p = Project::new(&text);
    let mut cmd = std::process::Command::new(mesh_bin());
    cmd.args(["up", "-f"])
        .arg(p.file("mesh.toml"))
        .env("STORE_DB", p.file("shop.db"));
    let mut mesh = MeshProc::spawn(cmd);

    let line = mesh.wait_line("web[0] listening on 127.0.0.1:", T);
    let port: u16 = line
        .split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("port in {line}"));
    mesh.wait_line("migrate.0 completed", T);
    let page = eventually("the shop page", T, || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let status_ok = body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200");
        status_ok.then_some(body)
    });
    assert!(page.contains("Served by api replica"), "{page}");
    assert!(page.contains("Enamel mug"), "{page}");

    mesh.signal(Signal::SIGINT);
    assert_eq!(mesh.exit_code(T), 0);
    assert!(
        mesh.count("Traceback") == 0,
        "no Python errors: {:?}",
        mesh.output()
    );
}
