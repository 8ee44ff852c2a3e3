//! Spawning application processes (interface; implementation in progress).

use std::path::PathBuf;

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

/// A running process in its own process group. Dropping it kills the group.
#[derive(Debug)]
pub struct Child {
    inner: tokio::process::Child,
    pid: Option<u32>,
}

/// Start a process in its own process group with stdin closed.
///
/// A spawn failure is not an `Err`: it is reported by [`Child::wait`] as
/// [`ExitReport::SpawnFailed`], exactly like a process that exited, so callers have one path.
/// `Err` is reserved for failures of `mesh` itself (no pipes, no fork).
pub fn spawn(spec: &SpawnSpec, output: Output) -> std::io::Result<Child> {
    let _ = (spec, output);
    Err(std::io::Error::other("not yet"))
}

impl Child {
    /// The application's pid (also its process group id), once known.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.inner.stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.inner.stderr.take()
    }

    /// Wait until the process has ended. Cancel-safe.
    pub async fn wait(&mut self) -> ExitReport {
        ExitReport::Code(0)
    }

    /// Send `sig` to the whole process group.
    pub fn signal_group(&self, sig: nix::sys::signal::Signal) {
        let _ = sig;
    }

    /// SIGKILL the whole process group (and anything it left behind).
    pub fn kill_group(&self) {}
}
