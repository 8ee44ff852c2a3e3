//! Shared helpers for black-box tests of the `mesh` binary.
//!
//! A test writes a `mesh.toml` into a private temporary directory, starts
//! `mesh up -f …` as a real process, and waits on its output lines (never on sleeps).
//! Every wait polls with a deadline; `MESH_TEST_PATIENCE` scales the deadlines for slow
//! machines.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test file uses a different subset"
)]

pub mod traffic;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `mesh` binary under test.
pub fn mesh_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mesh")
}

/// A deadline scaled by `MESH_TEST_PATIENCE` (a factor, default 1).
pub fn patience(d: Duration) -> Duration {
    let factor: f64 = std::env::var("MESH_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    d.mul_f64(factor)
}

/// Poll `f` until it returns `Some`, or panic with `what` after `limit`.
pub fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience(limit);
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::park_timeout(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// `MESH_TEST_LOCAL_PATH=tls` runs a suite with `[mesh] local_path = "tls"` in every
/// mesh.toml a test writes with [`Project::new`] (unless the test sets `local_path`
/// itself): `.ci/run` runs the data-path suites once with the default (`in-process`) and
/// once so (SPEC §1 "The local path").
fn with_local_path(text: String) -> String {
    let Ok(path) = std::env::var("MESH_TEST_LOCAL_PATH") else {
        return text;
    };
    if text.contains("local_path") {
        return text;
    }
    text.replacen("[mesh]\n", &format!("[mesh]\nlocal_path = \"{path}\"\n"), 1)
}

/// A temporary project directory holding a mesh.toml and whatever scripts a test needs.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// A project whose mesh.toml is `toml` (with `version = 1` and a `[mesh]` name
    /// prepended unless the text has its own).
    pub fn new(toml: &str) -> Project {
        let dir = tempfile::Builder::new()
            .prefix("mesh-test")
            .tempdir()
            .expect("tempdir");
        let mut text = String::new();
        if !toml.contains("version") {
            text.push_str("version = 1\n");
        }
        if !toml.contains("[mesh]") {
            text.push_str("[mesh]\nname = \"t\"\nshutdown_timeout = \"10s\"\n");
        }
        text.push_str(toml);
        let text = with_local_path(text);
        std::fs::write(dir.path().join("mesh.toml"), text).expect("write mesh.toml");
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.file(name), text).expect("write file");
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }

    /// Lines of a file, empty if it does not exist yet.
    pub fn lines(&self, name: &str) -> Vec<String> {
        self.read(name).lines().map(str::to_string).collect()
    }

    /// Start `mesh up` on this project with extra arguments.
    pub fn up(&self, args: &[&str]) -> MeshProc {
        let mut cmd = Command::new(mesh_bin());
        cmd.arg("up")
            .arg("-f")
            .arg(self.file("mesh.toml"))
            .args(args);
        cmd.current_dir(self.path());
        MeshProc::spawn(cmd)
    }

    /// Start `mesh up` with extra environment variables.
    pub fn up_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> MeshProc {
        let mut cmd = Command::new(mesh_bin());
        cmd.arg("up")
            .arg("-f")
            .arg(self.file("mesh.toml"))
            .args(args)
            .envs(env.iter().copied());
        cmd.current_dir(self.path());
        MeshProc::spawn(cmd)
    }

    /// Start `mesh up` that reloads only when told (`mesh reload`, SIGHUP), for tests of
    /// those: with `NOTIFY_SOCKET` set mesh does not watch mesh.toml (SPEC §4), so a test
    /// that edits the file and then reloads is not raced by the automatic reload. The
    /// socket (`notify.sock` in the project) is read by a thread and what it gets
    /// dropped: mesh must never block on a full socket buffer.
    pub fn up_reloading_by_hand(&self, args: &[&str]) -> MeshProc {
        let path = self.file("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while socket.recv(&mut buf).is_ok() {}
        });
        let path = path.to_string_lossy().into_owned();
        self.up_with_env(args, &[("NOTIFY_SOCKET", path.as_str())])
    }

    /// Run `mesh ARGS -f mesh.toml` (a control command such as `ps`) and return (exit
    /// code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(mesh_bin())
            .args(args)
            .arg("-f")
            .arg(self.file("mesh.toml"))
            .output()
            .expect("run mesh");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Run `mesh check` and return (exit code, stdout, stderr).
    pub fn check(&self) -> (i32, String, String) {
        self.run(&["check"])
    }
}

/// A running `mesh` process whose output is collected line by line.
pub struct MeshProc {
    child: Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// How many of the two output readers reached end of file.
    eof: Arc<std::sync::atomic::AtomicUsize>,
    status: Option<ExitStatus>,
}

impl MeshProc {
    pub fn spawn(mut cmd: Command) -> MeshProc {
        // A test runner under systemd must not make mesh talk to it, unless the test
        // set its own socket.
        if !cmd.get_envs().any(|(k, _)| k == "NOTIFY_SOCKET") {
            cmd.env_remove("NOTIFY_SOCKET");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("MESH_STATE_DIR", ".mesh");
        let mut child = cmd.spawn().expect("spawn mesh");
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let eof = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            let eof = eof.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (lock, cvar) = &*lines;
                    lock.lock().expect("lock").push(line);
                    cvar.notify_all();
                }
                eof.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        MeshProc {
            child,
            lines,
            eof,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.0.lock().expect("lock").clone()
    }

    /// Wait for a line containing `needle`; returns it.
    pub fn wait_line(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + patience(limit);
        let (lock, cvar) = &*self.lines;
        let mut lines = lock.lock().expect("lock");
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            if now > deadline {
                panic!(
                    "no line containing {needle:?} within {limit:?}; output:\n{}",
                    lines.join("\n")
                );
            }
            lines = cvar.wait_timeout(lines, deadline - now).expect("wait").0;
        }
    }

    /// How many lines contain `needle` so far.
    pub fn count(&self, needle: &str) -> usize {
        self.output().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    /// Wait for mesh to exit; panics after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = eventually("mesh to exit", limit, || {
            child.try_wait().expect("try_wait")
        });
        self.status = Some(status);
        // Everything mesh printed is read before anyone looks at the output.
        let eof = &self.eof;
        eventually("mesh's output to be read", limit, || {
            (eof.load(std::sync::atomic::Ordering::SeqCst) == 2).then_some(())
        });
        status
    }

    pub fn exit_code(&mut self, limit: Duration) -> i32 {
        let status = self.wait_exit(limit);
        status
            .code()
            .unwrap_or_else(|| panic!("mesh died of a signal: {status:?}"))
    }
}

impl Drop for MeshProc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
            state.as_deref() != Some("Z")
        }
        Err(_) => false,
    }
}

/// Whether a process exists at all (zombies included).
pub fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Wait until none of `pids` exists any more (not even as a zombie).
pub fn assert_gone(pids: &[i32], limit: Duration) {
    eventually(&format!("processes {pids:?} to be gone"), limit, || {
        pids.iter().all(|p| !exists(*p)).then_some(())
    });
}

/// Read a pid written by a test app into a file of the project.
pub fn read_pid(project: &Project, name: &str, limit: Duration) -> i32 {
    eventually(&format!("pid file {name}"), limit, || {
        project.read(name).trim().parse().ok()
    })
}

/// Every pid listed one per line in a file.
pub fn read_pids(project: &Project, name: &str) -> Vec<i32> {
    project
        .lines(name)
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The configurable test application (see tests/test-app/README.md).
pub fn test_app() -> &'static str {
    env!("CARGO_BIN_EXE_mesh-test-app")
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded in time.
/// `Err` when the connection fails or closes before a whole response.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(patience(Duration::from_secs(10))))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("incomplete response: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn get(addr: &str, path: &str) -> std::io::Result<Response> {
    http(addr, "GET", path, &[], "")
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value after `key=` in a line such as `caller.0 | url=http://…`.
pub fn field_of(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .to_string()
}

/// Pids of live processes started by this test's `mesh` (descendants of it: other tests
/// run apps with the same service names at the same time) whose environment has
/// `MESH_SERVICE=service` and `MESH_REPLICA=replica` and whose command line names
/// `program`.
pub fn pids_of(mesh: &MeshProc, program: &str, service: &str, replica: u32) -> Vec<i32> {
    let want_s = format!("MESH_SERVICE={service}");
    let want_r = format!("MESH_REPLICA={replica}");
    let has = |hay: &[u8], needle: &str| hay.split(|b| *b == 0).any(|w| w == needle.as_bytes());
    let descends = |pid: i32| {
        let mut p = pid;
        while let Some(parent) = parent_of(p) {
            if parent == mesh.pid() {
                return true;
            }
            if parent <= 1 {
                return false;
            }
            p = parent;
        }
        false
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains(program)
                && !cmd.contains("__shim")
                && has(&env, &want_s)
                && has(&env, &want_r)
                && alive(*pid)
                && descends(*pid)
        })
        .collect()
}

/// The parent pid of a process.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// How long start-up lines may take to appear.
const STARTUP: Duration = Duration::from_secs(30);

/// The ingress address of `service`, from mesh's start-up line.
pub fn ingress(mesh: &MeshProc, service: &str) -> String {
    let line = mesh.wait_line(&format!("ingress of `{service}` on "), STARTUP);
    line.rsplit(" on ").next().unwrap_or("").trim().to_string()
}

/// The admin server's address, from mesh's start-up line.
pub fn admin(mesh: &MeshProc) -> String {
    let line = mesh.wait_line("admin on http://", STARTUP);
    line.rsplit("http://")
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The outbound address a caller printed as `url=http://ADDR`.
pub fn outbound(mesh: &MeshProc, caller: &str) -> String {
    let line = mesh.wait_line(&format!("{caller}.0 | url="), STARTUP);
    field_of(&line, "url")
        .trim_start_matches("http://")
        .to_string()
}

/// A loopback port that was free a moment ago (for a fixed `port` or `expose` in a test
/// config).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The pids of the test app's replicas `0..replicas` of `service` under `mesh`.
pub fn app_pids(mesh: &MeshProc, service: &str, replicas: u32) -> Vec<i32> {
    (0..replicas)
        .flat_map(|i| pids_of(mesh, test_app(), service, i))
        .collect()
}

/// SIGTERM to `mesh`: it exits 0 and `pids` are gone.
pub fn stop_mesh(mut mesh: MeshProc, pids: &[i32]) {
    let limit = patience(Duration::from_secs(30));
    mesh.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(mesh.exit_code(limit), 0);
    assert_gone(pids, limit);
}
