//! Spawning application processes through the shim (see [`crate::shim`]).
//!
//! Every process `mesh` starts — applications and `exec` health checks alike — runs under
//! a shim, in a process group of its own, with stdin closed. A [`Child`] holds the control
//! socket to its shim: dropping the `Child` closes the socket, and the shim then kills the
//! process and everything it started.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::shim::SHIM_ARG;

/// Everything needed to start one process.
#[derive(Clone, Debug)]
pub struct SpawnSpec {
    /// Program (a path, or a name looked up in `PATH` of `env`) and its arguments.
    pub argv: Vec<String>,
    /// The complete environment of the process (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Run as this user/group (needs root).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Where a child's stdout/stderr go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Captured: read them with [`Child::take_stdout`] / [`Child::take_stderr`].
    Piped,
    /// Discarded.
    Null,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReport {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
    /// It could not be started (missing program or working_dir, …); counts as code 127.
    SpawnFailed(String),
}

impl ExitReport {
    /// The exit code as a shell would report it (128+N for a signal, 127 for a spawn error).
    pub fn code(&self) -> i32 {
        match self {
            ExitReport::Code(c) => *c,
            ExitReport::Signal(s) => 128 + s,
            ExitReport::SpawnFailed(_) => 127,
        }
    }
}

/// A running process in its own process group, under its shim.
///
/// Dropping it kills the process group and every descendant (the shim sees its control
/// socket close).
#[derive(Debug)]
pub struct Child {
    shim: tokio::process::Child,
    ctl_rx: BufReader<OwnedReadHalf>,
    ctl_tx: OwnedWriteHalf,
    pid: Option<u32>,
    report: Option<ExitReport>,
}

static SHIM: OnceLock<PathBuf> = OnceLock::new();

/// Name the executable that acts as the shim (`mesh` itself: `mesh __shim …`).
///
/// The `mesh` binary does not need to call this: without it, the current executable is
/// used. A test harness or any other program that links this library must point it at a
/// `mesh` binary, because its own executable does not know the `__shim` mode. The path is
/// process-wide because it names a file, not a piece of per-mesh state.
pub fn set_shim(path: PathBuf) {
    let _ = SHIM.set(path);
}

fn shim_path() -> io::Result<PathBuf> {
    match SHIM.get() {
        Some(p) => Ok(p.clone()),
        // The running executable itself, even if its file was replaced or removed since
        // mesh started (a package upgrade, a rebuild): a shim of another version, or
        // none at all, must never be what a restart runs.
        None if std::path::Path::new("/proc/self/exe").exists() => {
            Ok(PathBuf::from("/proc/self/exe"))
        }
        None => std::env::current_exe(),
    }
}

/// Start a process in its own process group with stdin closed.
///
/// Returns once the process runs (its pid is known) or failed to start. A spawn failure
/// (missing program or working_dir, …) is not an `Err`: [`Child::wait`] reports it as
/// [`ExitReport::SpawnFailed`], exactly like a process that exited, so callers have one
/// path. `Err` is reserved for failures of `mesh` itself (no shim, no socket, no fork).
pub async fn spawn(spec: &SpawnSpec, output: Output) -> io::Result<Child> {
    let Some(program) = spec.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let ours = UnixStream::from_std(ours)?;

    let mut cmd = tokio::process::Command::new(shim_path()?);
    cmd.arg(SHIM_ARG);
    if let Some(uid) = spec.uid {
        cmd.arg("--uid").arg(uid.to_string());
    }
    if let Some(gid) = spec.gid {
        cmd.arg("--gid").arg(gid.to_string());
    }
    cmd.arg("--cwd").arg(&spec.cwd).arg("--").arg(program);
    cmd.args(&spec.argv[1..]);
    cmd.env_clear().envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)));
    let (out, err) = match output {
        Output::Piped => (Stdio::piped(), Stdio::piped()),
        Output::Null => (Stdio::null(), Stdio::null()),
    };
    cmd.stdout(out).stderr(err);
    // The shim leads a group of its own, so a Ctrl-C on mesh's terminal reaches mesh only;
    // mesh decides what each application gets.
    cmd.process_group(0);
    let shim = cmd.spawn()?;
    // `cmd` holds the shim's end of the socket (as its stdin); drop it so that a shim
    // that dies early reads as EOF here instead of hanging the first read.
    drop(cmd);

    let (rx, tx) = ours.into_split();
    let mut child = Child {
        shim,
        ctl_rx: BufReader::new(rx),
        ctl_tx: tx,
        pid: None,
        report: None,
    };
    // The shim's first line says whether the application started.
    child.read_control().await;
    Ok(child)
}

// === impl Child ===

impl Child {
    /// The application's pid (also its process group id); `None` if it failed to start.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.shim.stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.shim.stderr.take()
    }

    /// Wait until the process has ended and everything it left behind is gone.
    /// Cancel-safe: it may be called again after being dropped mid-way.
    pub async fn wait(&mut self) -> ExitReport {
        while self.report.is_none() {
            self.read_control().await;
        }
        // The shim exits right after its report; reap it so that no zombie is left.
        let _ = self.shim.wait().await;
        self.report
            .clone()
            .unwrap_or(ExitReport::Signal(libc::SIGKILL))
    }

    /// Send `sig` to the whole process group, and to descendants that left it.
    pub fn signal_group(&self, sig: Signal) {
        self.send(&format!("sig {}\n", sig as i32));
    }

    /// SIGKILL the whole process group and every descendant.
    pub fn kill_group(&self) {
        self.send("kill\n");
        // Also straight from here, in case the shim itself is gone.
        if let Some(pid) = self.pid {
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
        }
    }

    fn send(&self, line: &str) {
        // Control lines are a few bytes and the socket buffer is empty in practice; a
        // failure means the shim is gone, which `wait` will report.
        let _ = self.ctl_tx.try_write(line.as_bytes());
    }

    /// Read one control line from the shim and record what it says.
    async fn read_control(&mut self) {
        let mut line = String::new();
        match self.ctl_rx.read_line(&mut line).await {
            Ok(0) | Err(_) => {
                // The shim died without a report (killed from outside). Make sure its
                // application does not linger, and report the shim's fate.
                if let Some(pid) = self.pid {
                    let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
                }
                let status = self.shim.wait().await;
                use std::os::unix::process::ExitStatusExt;
                let sig = status
                    .ok()
                    .and_then(|s| s.signal())
                    .unwrap_or(libc::SIGKILL);
                self.report = Some(ExitReport::Signal(sig));
            }
            Ok(_) => {
                let line = line.trim_end();
                if let Some(pid) = line.strip_prefix("pid ") {
                    self.pid = pid.parse().ok();
                } else if let Some(msg) = line.strip_prefix("spawn-error ") {
                    self.report = Some(ExitReport::SpawnFailed(msg.to_string()));
                } else if let Some(code) = line.strip_prefix("exit code ") {
                    self.report = Some(ExitReport::Code(code.parse().unwrap_or(1)));
                } else if let Some(sig) = line.strip_prefix("exit signal ") {
                    self.report = Some(ExitReport::Signal(sig.parse().unwrap_or(libc::SIGKILL)));
                }
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.report.is_none() {
            // Closing the socket (dropping ctl_tx/ctl_rx) already makes the shim kill the
            // tree; saying it first is quicker.
            self.send("kill\n");
        }
    }
}
