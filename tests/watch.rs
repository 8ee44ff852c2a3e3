//! File watching (SPEC §4 "Watch", and the reload on a change of mesh.toml) against the
//! real binary: a watched file restarts its service once per burst, ignored paths never
//! do, and mesh.toml reloads itself unless `NOTIFY_SOCKET` is set.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

const T: Duration = Duration::from_secs(30);

/// An app that appends `<pid> <VERSION>` to `started.log` at each start, then waits to be
/// stopped. It has no port: it is ready while it runs.
const APP: &str = r#"import os, signal
with open("started.log", "a") as f:
    f.write(f"{os.getpid()} {os.environ.get('VERSION', '')}\n")
signal.pause()
"#;

fn project(extra: &str) -> Project {
    let p = Project::new(&format!(
        r#"
[services.api]
command = "python3 app.py"
port = "none"
watch = ["**/*.py"]
env = {{ VERSION = "1" }}
{extra}
"#
    ));
    p.write("app.py", APP);
    p
}

/// The (pid, VERSION) of each start so far.
fn starts(p: &Project) -> Vec<(i32, String)> {
    p.lines("started.log")
        .iter()
        .filter_map(|l| {
            let (pid, version) = l.split_once(' ')?;
            Some((pid.parse().ok()?, version.to_string()))
        })
        .collect()
}

/// Wait until `n` starts were logged; returns the last one.
fn start_number(p: &Project, n: usize) -> (i32, String) {
    eventually(&format!("start number {n}"), T, || {
        let all = starts(p);
        (all.len() >= n).then(|| all[n - 1].clone())
    })
}

/// Start mesh and wait until the api's files are watched; the pid of its first process.
fn up_watching(p: &Project, env: &[(&str, &str)]) -> (MeshProc, i32) {
    let mesh = p.up_with_env(&[], env);
    mesh.wait_line("api: watching **/*.py in", T);
    let (pid, _) = start_number(p, 1);
    (mesh, pid)
}

fn touch(p: &Project, name: &str) {
    let text = p.read(name);
    p.write(name, &text);
}

fn stop(mut mesh: MeshProc, p: &Project) {
    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0, "{}", mesh.output().join("\n"));
    let pids: Vec<i32> = starts(p).into_iter().map(|(pid, _)| pid).collect();
    assert_gone(&pids, T);
}

const RESTART: &str = "api: files changed";

#[test]
fn a_watched_file_restarts_the_service_once_per_burst() {
    let p = project("");
    let (mesh, first) = up_watching(&p, &[]);

    touch(&p, "app.py");
    let line = mesh.wait_line(RESTART, T);
    assert!(
        line.ends_with("api: files changed (app.py): restarting"),
        "{line}"
    );
    let (second, _) = start_number(&p, 2);
    assert_ne!(second, first);
    assert_gone(&[first], T);

    // A burst, as an editor or a checkout makes: one restart.
    for i in 0..20 {
        p.write("app.py", &format!("{APP}# {i}\n"));
    }
    eventually("the restart for the burst", T, || {
        (mesh.count(RESTART) == 2).then_some(())
    });
    let (third, _) = start_number(&p, 3);
    assert_gone(&[second], T);

    // One more change: its restart comes after anything the burst could still have
    // caused, so the count proves the burst restarted once.
    touch(&p, "app.py");
    eventually("the restart for the last change", T, || {
        (mesh.count(RESTART) >= 3).then_some(())
    });
    start_number(&p, 4);
    assert_gone(&[third], T);
    assert_eq!(mesh.count(RESTART), 3, "{}", mesh.output().join("\n"));
    assert_eq!(starts(&p).len(), 4);
    stop(mesh, &p);
}

#[test]
fn ignored_paths_never_restart() {
    let p = project("");
    p.write(".gitignore", "generated.py\nbuild/\n");
    std::fs::create_dir_all(p.file("node_modules/pkg")).expect("mkdir");
    std::fs::create_dir_all(p.file("build")).expect("mkdir");
    std::fs::create_dir_all(p.file("lib")).expect("mkdir");
    let (mesh, first) = up_watching(&p, &[]);

    // Not watched: below node_modules/ and target/ (one made while mesh runs), a file
    // and a directory the .gitignore names, a file no pattern matches, the state dir.
    p.write("node_modules/pkg/index.py", "x = 1\n");
    std::fs::create_dir_all(p.file("target/debug")).expect("mkdir");
    p.write("target/debug/gen.py", "x = 1\n");
    p.write("generated.py", "x = 1\n");
    p.write("lib/generated.py", "x = 1\n");
    p.write("build/out.py", "x = 1\n");
    p.write("notes.txt", "hello\n");
    p.write("lib/notes.txt", "hello\n");
    p.write(".mesh/scratch.py", "x = 1\n");

    // A watched file in a directory made while mesh runs: the only restart, naming only
    // it.
    std::fs::create_dir_all(p.file("pkg/sub")).expect("mkdir");
    p.write("pkg/sub/util.py", "x = 1\n");
    let line = mesh.wait_line(RESTART, T);
    assert!(
        line.ends_with("api: files changed (pkg/sub/util.py): restarting"),
        "{line}"
    );
    start_number(&p, 2);
    assert_gone(&[first], T);

    // And one more watched change, so that anything the ignored paths could have caused
    // would have shown by now.
    touch(&p, "app.py");
    let line = eventually("the second restart", T, || {
        mesh.output()
            .into_iter()
            .filter(|l| l.contains(RESTART))
            .nth(1)
    });
    assert!(
        line.ends_with("api: files changed (app.py): restarting"),
        "{line}"
    );
    start_number(&p, 3);
    assert_eq!(mesh.count(RESTART), 2, "{}", mesh.output().join("\n"));
    stop(mesh, &p);
}

#[test]
fn editing_mesh_toml_reloads_it() {
    let p = project("");
    let (mesh, first) = up_watching(&p, &[]);
    assert_eq!(start_number(&p, 1).1, "1");

    // As editors save: a new file renamed over the old one.
    let text = p
        .read("mesh.toml")
        .replace(r#"VERSION = "1""#, r#"VERSION = "2""#);
    p.write("mesh.toml.swp", &text);
    std::fs::rename(p.file("mesh.toml.swp"), p.file("mesh.toml")).expect("rename");
    mesh.wait_line("mesh.toml changed: reloading", T);
    let (second, version) = start_number(&p, 2);
    assert_eq!(version, "2");
    assert_gone(&[first], T);

    // Written in place.
    let text = p
        .read("mesh.toml")
        .replace(r#"VERSION = "2""#, r#"VERSION = "3""#);
    p.write("mesh.toml", &text);
    let (_, version) = start_number(&p, 3);
    assert_eq!(version, "3");
    assert_gone(&[second], T);
    assert_eq!(mesh.count("mesh.toml changed: reloading"), 2);
    stop(mesh, &p);
}

#[test]
fn with_notify_socket_mesh_toml_waits_for_sighup() {
    let p = project("");
    let socket_path = p.file("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    // Read and dropped: mesh only needs someone listening.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while socket.recv(&mut buf).is_ok() {}
    });
    let socket_env = socket_path.to_string_lossy().into_owned();
    let (mesh, first) = up_watching(&p, &[("NOTIFY_SOCKET", &socket_env)]);

    let text = p
        .read("mesh.toml")
        .replace(r#"VERSION = "1""#, r#"VERSION = "2""#);
    p.write("mesh.toml", &text);
    // A watched change after it: a reload of the file would have come first.
    touch(&p, "app.py");
    mesh.wait_line(RESTART, T);
    let (second, version) = start_number(&p, 2);
    assert_eq!(version, "1", "the running configuration is kept");
    assert_gone(&[first], T);
    assert_eq!(mesh.count("reloading"), 0, "{}", mesh.output().join("\n"));

    // SIGHUP applies it.
    mesh.signal(Signal::SIGHUP);
    let (_, version) = start_number(&p, 3);
    assert_eq!(version, "2");
    assert_gone(&[second], T);
    stop(mesh, &p);
}
