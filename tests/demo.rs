//! The root mesh.toml (the quickstart demo) parses, runs, and serves its page.

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn demo_runs_and_serves_the_shop_page() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("mesh.toml")).expect("mesh.toml");
    // The demo's ingress listens on the fixed port 8080; tests use ephemeral ports only,
    // and a private copy of the database.
    assert!(
        text.contains("expose = 8080"),
        "the demo keeps its documented port"
    );
    let quickstart = root.join("examples/quickstart");
    let text = text
        .replace("expose = 8080", "expose = \"127.0.0.1:0\"")
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

    let line = mesh.wait_line("ingress of `web` on ", T);
    let ingress = line.rsplit(" on ").next().unwrap_or("").trim().to_string();
    mesh.wait_line("migrate.0 completed", T);
    let page = eventually("the shop page", T, || {
        get(&ingress, "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body)
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
