//! Operating a mesh from another terminal (SPEC §4): `mesh exec`, `mesh up -d`, `mesh up
//! --wait`, and the control socket against clients that misbehave, with the real binary.

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use support::*;

const T: Duration = Duration::from_secs(30);

/// A mesh with a service `api` (the test app, with an HTTP health check) and `web`,
/// which has `api` as upstream, an `env`, an `env_file` and a `working_dir`, and prints
/// what it was given before it becomes the test app too.
fn two_services() -> Project {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
health = {{ http = "/healthz", interval = "100ms" }}

[services.web]
command = ["sh", "-c", "echo \"web env PORT=$$PORT URL=$$API_URL ADDR=$$API_ADDR FOO=$$FOO FILE=$$FROM_FILE DIR=$$(pwd -P)\"; exec {app}"]
upstreams = ["api"]
working_dir = "sub"
env = {{ FOO = "foo-${{MESH_SERVICE}}" }}
env_file = "web.env"
"#,
        app = test_app()
    ));
    std::fs::create_dir(p.file("sub")).expect("mkdir sub");
    p.write("web.env", "FROM_FILE=from-file\n");
    p
}

/// Wait until process `pid` blocks `signal` (its main thread's `SigBlk`).
fn blocks(pid: u32, signal: Signal) {
    let status_file = format!("/proc/{pid}/status");
    let bit = 1u64 << (signal as i32 - 1);
    eventually(&format!("pid {pid} to block {signal}"), T, || {
        let status = std::fs::read_to_string(&status_file).ok()?;
        let mask = status.lines().find_map(|l| l.strip_prefix("SigBlk:"))?;
        let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
        (mask & bit != 0).then_some(())
    });
}

/// The value after `key=` in a line of words.
fn word(line: &str, key: &str) -> String {
    field_of(line, key)
}

#[test]
fn exec_runs_a_command_with_the_environment_and_directory_of_replica_0() {
    let p = two_services();
    let mut mesh = p.up(&[]);
    let line = mesh.wait_line("web env", T);

    let probe = "echo \"PORT=$PORT URL=$API_URL ADDR=$API_ADDR FOO=$FOO FILE=$FROM_FILE \
                 SVC=$MESH_SERVICE REP=$MESH_REPLICA CALLER=${EXEC_CALLER_ONLY:-unset} \
                 DIR=$(pwd -P)\"";
    let out = mesh_cmd(&p, &["exec", "web", "--", "sh", "-c", probe]);
    assert_eq!(out.code, 0, "{out:?}");
    let got = out.stdout.trim();
    for key in ["PORT", "URL", "ADDR", "FOO", "FILE", "DIR"] {
        assert_eq!(word(got, key), word(&line, key), "{key}: {got} vs {line}");
    }
    assert!(word(got, "URL").starts_with("http://127.0.0.1:"), "{got}");
    assert_eq!(word(got, "FOO"), "foo-web");
    assert_eq!(word(got, "SVC"), "web");
    assert_eq!(word(got, "REP"), "0");
    assert_eq!(
        word(got, "CALLER"),
        "unset",
        "nothing of the caller's own environment"
    );
    let sub = p.file("sub").canonicalize().expect("canonical sub");
    assert_eq!(word(got, "DIR"), sub.display().to_string());
    // The same PORT as `mesh ps` shows for web.0.
    let (code, ps, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    let web0 = ps
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|r| r["service"] == "web" && r["replica"] == 0)
        .expect("web.0 in ps");
    assert_eq!(word(got, "PORT"), web0["port"].to_string());

    // Without `--` as well, options of CMD included.
    let out = mesh_cmd(&p, &["exec", "api", "sh", "-c", "echo $MESH_SERVICE -f"]);
    assert_eq!((out.code, out.stdout.trim()), (0, "api -f"), "{out:?}");

    // CMD's exit code, and 128 + N for a signal.
    let out = mesh_cmd(&p, &["exec", "web", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.code, 7, "{out:?}");
    let out = mesh_cmd(&p, &["exec", "web", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.code, 128 + 15, "{out:?}");
    let out = mesh_cmd(&p, &["exec", "web", "--", "no-such-program-here"]);
    assert_eq!(out.code, 127, "{out:?}");
    assert!(out.stderr.contains("no-such-program-here"), "{out:?}");

    // Ctrl-C goes to the whole foreground group: CMD decides, mesh exec reports.
    let mut cmd = Command::new(mesh_bin());
    cmd.args(["exec", "-f"])
        .arg(p.file("mesh.toml"))
        .args(["web", "--", "sh", "-c"])
        .arg("trap 'exit 5' INT; echo waiting; while :; do sleep 0.05; done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut exec = cmd.spawn().expect("spawn mesh exec");
    let mut stdout = BufReader::new(exec.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("read");
    assert_eq!(first.trim(), "waiting");
    // Once `mesh exec` holds SIGINT (its mask is set just after CMD starts).
    blocks(exec.id(), Signal::SIGINT);
    let group = Pid::from_raw(exec.id() as i32);
    killpg(group, Signal::SIGINT).expect("SIGINT to the group");
    let status = eventually("mesh exec to exit", T, || {
        exec.try_wait().expect("try_wait")
    });
    assert_eq!(status.code(), Some(5), "{status:?}");

    // SIGTERM to `mesh exec` alone reaches CMD, whose answer is the exit code.
    let mut cmd = Command::new(mesh_bin());
    cmd.arg("exec")
        .arg("-f")
        .arg(p.file("mesh.toml"))
        .args(["web", "--", "sh", "-c"])
        .arg("trap 'exit 6' TERM; echo waiting; while :; do sleep 0.05; done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut exec = cmd.spawn().expect("spawn mesh exec");
    let mut stdout = BufReader::new(exec.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("read");
    assert_eq!(first.trim(), "waiting");
    // Once `mesh exec` holds SIGTERM for CMD (its mask is set just after CMD starts).
    blocks(exec.id(), Signal::SIGTERM);
    kill(Pid::from_raw(exec.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = eventually("mesh exec to exit after SIGTERM", T, || {
        exec.try_wait().expect("try_wait")
    });
    assert_eq!(status.code(), Some(6), "{status:?}");

    // A service the mesh does not have.
    let out = mesh_cmd(&p, &["exec", "nope", "--", "true"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no service `nope`"), "{out:?}");

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    let out = mesh_cmd(&p, &["exec", "web", "--", "true"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no running mesh"), "{out:?}");
}

#[test]
fn up_d_runs_the_mesh_in_the_background_until_down() {
    let p = two_services();
    let guard = Detached::new(&p);
    let out = mesh_cmd(&p, &["up", "-d"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("running in the background"), "{out:?}");
    let pid = guard.pid().expect("mesh.pid names the background mesh");
    assert!(alive(pid));

    // It answers, and its applications run under it.
    let (code, ps, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ps.lines().count(), 2, "{ps}");
    let apps = eventually("both applications", T, || {
        let apps = descendants_named(pid, "mesh-test-app");
        (apps.len() == 2).then_some(apps)
    });
    // Its own session: the terminal's signals and hang-up do not reach it.
    assert_eq!(
        nix::unistd::getsid(Some(Pid::from_raw(pid))),
        Ok(Pid::from_raw(pid))
    );
    // Its output goes to state_dir/mesh.out.
    eventually("web's line in mesh.out", T, || {
        p.read(".mesh/mesh.out").contains("web env").then_some(())
    });

    // A second one is refused, and the first one's output is kept.
    let out = mesh_cmd(&p, &["up", "-d"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(&format!("already running (pid {pid})")),
        "{out:?}"
    );
    assert!(
        !out.stderr.contains("web env"),
        "only its own lines: {out:?}"
    );
    assert!(p.read(".mesh/mesh.out").contains("web env"));

    let out = mesh_cmd(&p, &["down"]);
    assert_eq!(out.code, 0, "{out:?}");
    let mut all = apps.clone();
    all.push(pid);
    assert_gone(&all, Duration::from_secs(5));
    assert!(!p.file(".mesh/mesh.sock").exists());
    assert!(p.read(".mesh/mesh.out").contains("mesh | stopped"));
}

#[test]
fn up_d_with_an_invalid_file_exits_78_and_starts_nothing() {
    let p = Project::new(
        r#"
[services.api]
command = ["sh", "-c", "echo started > started.txt"]
bogus = 1
"#,
    );
    let _guard = Detached::new(&p);
    let out = mesh_cmd(&p, &["up", "-d"]);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("bogus"), "{out:?}");
    assert!(!p.file("started.txt").exists());
}

#[test]
fn up_wait_returns_once_every_service_is_ready() {
    let p = two_services();
    let guard = Detached::new(&p);
    let out = mesh_cmd(&p, &["up", "-d", "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    // The mesh's own ready line (SPEC §4 "The first minute").
    assert!(
        out.stdout.contains("mesh | ready in ") && out.stdout.contains("s: 2 services, 2 replicas"),
        "{out:?}"
    );
    // Ready means ready: every row says so at once.
    let (code, ps, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    for row in ps.lines() {
        let row: serde_json::Value = serde_json::from_str(row).expect("json");
        assert_eq!(row["health"], "ready", "{row}");
    }
    guard.stop();
}

#[test]
fn up_wait_fails_with_the_last_lines_of_a_service_that_exits() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]

# A server that dies at start: it gets a port and never listens on it.
[services.job]
command = ["sh", "-c", "echo first words; echo last words >&2; exit 1"]
restart = "never"
"#,
        app = test_app()
    ));
    // A line of an earlier run is not shown as this one's.
    std::fs::create_dir_all(p.file(".mesh/logs")).expect("mkdir logs");
    p.write(
        ".mesh/logs/job.0.log",
        "2001-01-01T00:00:00.000Z stdout from long ago\n",
    );
    let guard = Detached::new(&p);
    let out = mesh_cmd(&p, &["up", "--wait"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("`job.0` exited with code 1"), "{out:?}");
    assert!(out.stderr.contains("job.0 | first words"), "{out:?}");
    assert!(out.stderr.contains("job.0 | last words"), "{out:?}");
    assert!(!out.stderr.contains("from long ago"), "{out:?}");
    // The mesh keeps running, as docker compose leaves its containers.
    assert!(out.stderr.contains("`mesh down` stops it"), "{out:?}");
    let (code, _, err) = p.run(&["ps"]);
    assert_eq!(code, 0, "{err}");
    guard.stop();
}

#[test]
fn up_wait_fails_when_the_only_service_fails_and_the_mesh_ends() {
    let p = Project::new(
        r#"
[services.job]
command = ["sh", "-c", "echo about to fail; exit 3"]
restart = "never"
"#,
    );
    let guard = Detached::new(&p);
    let out = mesh_cmd(&p, &["up", "--wait"]);
    // Whether the mesh was seen running before it ended or not, the failure and the
    // service's lines are reported.
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("about to fail"), "{out:?}");
    guard.stop();
}

#[test]
fn up_wait_timeout_gives_up_on_a_service_that_never_becomes_ready() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
health = {{ http = "/healthz", interval = "100ms" }}
env = {{ TEST_APP_UNHEALTHY_FILE = "unhealthy" }}
"#,
        app = test_app()
    ));
    p.write("unhealthy", "");
    let guard = Detached::new(&p);
    let out = mesh_cmd(&p, &["up", "--wait", "--wait-timeout", "1500ms"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not ready within 1s 500ms"), "{out:?}");
    assert!(out.stderr.contains("`api.0` ("), "{out:?}");
    assert!(out.stderr.contains(", unready)"), "{out:?}");
    assert!(
        out.stderr.contains("api.0 | test-app api.0 listening"),
        "{out:?}"
    );
    let pid = guard.pid().expect("the mesh keeps running");
    let apps = descendants_named(pid, "mesh-test-app");
    assert_eq!(apps.len(), 1);
    guard.stop();
    assert_gone(&apps, Duration::from_secs(5));

    // A duration that does not parse is a misuse, as is --wait-timeout without --wait.
    let out = mesh_cmd(&p, &["up", "--wait", "--wait-timeout", "soon"]);
    assert_eq!(out.code, 2, "{out:?}");
    let out = mesh_cmd(&p, &["up", "--wait-timeout", "1s"]);
    assert_eq!(out.code, 2, "{out:?}");
}

#[test]
fn the_control_socket_survives_clients_that_misbehave() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    mesh.wait_line("test-app api.0 listening", T);
    let socket = p.file(".mesh/mesh.sock");
    let ps_answers = || {
        let (code, out, err) = p.run(&["ps", "--json"]);
        assert_eq!(code, 0, "ps: {err}");
        assert!(out.contains("\"api\""), "{out}");
    };

    // One that connects and never writes, held open throughout: it blocks nobody.
    let idle = connect(&socket);
    let idle_since = std::time::Instant::now();

    // Two clients at once: the second is answered while the first has not finished
    // its line.
    let mut first = connect(&socket);
    first.write_all(b"{\"cmd\": ").expect("write");
    let mut second = connect(&socket);
    second.write_all(b"{\"cmd\": \"ps\"}\n").expect("write");
    assert_eq!(answer(&mut second)["ok"], true);
    first.write_all(b"\"ps\"}\n").expect("write");
    assert_eq!(answer(&mut first)["ok"], true);

    // Half a line, then gone.
    let mut half = connect(&socket);
    half.write_all(b"{\"cmd\": \"p").expect("write");
    drop(half);
    ps_answers();

    // A line that is not a request.
    let mut garbage = connect(&socket);
    garbage
        .write_all(b"\x00\xffnot json at all\n")
        .expect("write");
    let reply = answer(&mut garbage);
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap_or("").contains("malformed"),
        "{reply}"
    );
    let mut no_cmd = connect(&socket);
    no_cmd.write_all(b"{\"args\": 1}\n").expect("write");
    assert_eq!(answer(&mut no_cmd)["ok"], false);

    // A line longer than 4096 bytes is refused after 4096 bytes, not buffered.
    let mut long = connect(&socket);
    long.write_all(&[b'a'; 5000]).expect("write");
    let reply = answer(&mut long);
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains("longer than 4096"),
        "{reply}"
    );
    // One that goes on writing megabytes gets no further: its writes fail once the
    // mesh has answered and closed.
    let mut flood = connect(&socket);
    flood.set_write_timeout(Some(patience(T))).expect("timeout");
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    let ended = loop {
        match flood.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
        assert!(sent < 256 * 1024 * 1024, "the mesh read {sent} bytes");
    };
    assert!(
        matches!(
            ended.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{ended}"
    );
    ps_answers();

    // The silent client is answered with an error and closed after 10 s.
    let mut idle = idle;
    idle.set_read_timeout(Some(patience(T))).expect("timeout");
    let reply = answer(&mut idle);
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains("no request line within 10s"),
        "{reply}"
    );
    assert!(idle_since.elapsed() >= Duration::from_secs(9), "{reply}");
    ps_answers();

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
    assert!(!socket.exists(), "the socket file is removed on exit");
}

#[test]
fn a_socket_left_by_a_killed_mesh_does_not_block_the_next_up() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    mesh.wait_line("test-app api.0 listening", T);
    let apps = pids_of(&mesh, "mesh-test-app", "api", 0);
    assert_eq!(apps.len(), 1);
    mesh.signal(Signal::SIGKILL);
    mesh.wait_exit(T);
    assert_gone(&apps, Duration::from_secs(5));
    let socket = p.file(".mesh/mesh.sock");
    assert!(socket.exists(), "SIGKILL leaves the socket file");
    let (code, _, err) = p.run(&["ps"]);
    assert_eq!(code, 1);
    assert!(err.contains("no running mesh"), "{err}");

    let mut again = p.up(&[]);
    again.wait_line("test-app api.0 listening", T);
    let (code, out, err) = p.run(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"api\""), "{out}");
    again.signal(Signal::SIGTERM);
    assert_eq!(again.exit_code(T), 0);
    assert!(!socket.exists());
}

// === helpers ===

/// What a finished `mesh` command printed.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run `mesh ARGS -f mesh.toml`, bounded in time (longer than `--wait`'s default 60 s).
fn mesh_cmd(p: &Project, args: &[&str]) -> Out {
    let mut cmd = Command::new(mesh_bin());
    cmd.args(args)
        .arg("-f")
        .arg(p.file("mesh.toml"))
        .current_dir(p.path())
        .env_remove("NOTIFY_SOCKET")
        .env("EXEC_CALLER_ONLY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn mesh");
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr")));
    let status = eventually(
        &format!("mesh {args:?} to finish"),
        Duration::from_secs(90),
        || child.try_wait().expect("try_wait"),
    );
    Out {
        code: status
            .code()
            .unwrap_or_else(|| panic!("mesh {args:?} died of a signal: {status:?}")),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Stops the background mesh of a project however the test ends: SIGTERM (as `mesh
/// down`), SIGKILL if it is not gone in time; its applications die with it.
struct Detached<'a> {
    project: &'a Project,
}

impl<'a> Detached<'a> {
    fn new(project: &'a Project) -> Detached<'a> {
        Detached { project }
    }

    /// The pid of the background mesh, if one is alive.
    fn pid(&self) -> Option<i32> {
        let pid: i32 = self.project.read(".mesh/mesh.pid").trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_mesh = String::from_utf8_lossy(&cmdline).contains("--detached");
        (is_mesh && alive(pid)).then_some(pid)
    }

    /// Stop the mesh and wait until it and every process under it are gone.
    fn stop(&self) {
        let Some(pid) = self.pid() else { return };
        let mut all = descendants_named(pid, "");
        all.push(pid);
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let within = patience(Duration::from_secs(20));
        let start = std::time::Instant::now();
        while all.iter().any(|p| exists(*p)) && start.elapsed() < within {
            std::thread::park_timeout(Duration::from_millis(20));
        }
        if exists(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        assert_gone(&all, Duration::from_secs(10));
    }
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Clean up without a second panic.
            if let Some(pid) = self.pid() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        } else {
            self.stop();
        }
    }
}

/// Live processes under `root` (at any depth) whose command line contains `program`
/// (every one for ""), shims left out.
fn descendants_named(root: i32, program: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains(program) && (program.is_empty() || !cmd.contains("__shim"))
        })
        .filter(|pid| alive(*pid) && descends_from(*pid, root))
        .collect()
}

fn descends_from(pid: i32, root: i32) -> bool {
    let mut p = pid;
    while let Some(parent) = parent_of(p) {
        if parent == root {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent;
    }
    false
}

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(patience(T)))
        .expect("read timeout");
    stream
}

/// The one answer line of the mesh, parsed.
fn answer(stream: &mut UnixStream) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(&*stream)
        .read_line(&mut line)
        .expect("an answer line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}
