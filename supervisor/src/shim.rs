//! The shim: a tiny synchronous parent for one application process.
//!
//! `mesh` never forks applications itself. It starts `mesh __shim … -- PROGRAM ARGS`, and
//! the shim starts the application, in a process group of its own, and stays as its
//! parent. The shim exists for one guarantee that `mesh` alone cannot give: **nothing an
//! application started outlives `mesh`, even when `mesh` is SIGKILLed and even when the
//! application double-forks and calls `setsid`.**
//!
//! # Theory of operation
//!
//! * The shim is a *child subreaper* (`PR_SET_CHILD_SUBREAPER`): every orphaned
//!   descendant of the application is re-parented to the shim rather than to init, so the
//!   shim reaps them (no zombies) and can always find them again (they are its children).
//! * Its stdin is one end of a Unix socketpair whose other end only `mesh` holds
//!   (close-on-exec, so no other process inherits it). When `mesh` dies for any reason,
//!   the kernel closes that end and the shim reads EOF: it SIGKILLs the application's
//!   group and every process re-parented to it, reaps them, and exits. This needs no
//!   parent-death signal, which would fire on the exit of the *thread* that forked (see
//!   PITFALLS.md) rather than of the process.
//! * The same socket carries a line protocol. From `mesh`: `sig N` (send signal N to the
//!   application's group and to every escaped descendant) and `kill` (SIGKILL all of
//!   them). To `mesh`: `pid N` once the application runs, `spawn-error MESSAGE` when it
//!   could not be started, and `exit code N` / `exit signal N` when it ended.
//! * When the application itself exits, whatever it left behind (its group, escaped
//!   daemons) is SIGKILLed, as systemd does for a service whose main process exited.
//!
//! The shim is single-threaded and uses no async runtime: `poll(2)` over the socket and a
//! `signalfd` for SIGCHLD.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// The first argument that turns the `mesh` binary into a shim.
pub const SHIM_ARG: &str = "__shim";

/// Run the shim with the arguments that follow [`SHIM_ARG`]. Returns the shim's exit code.
///
/// Arguments: `[--uid N] [--gid N] [--cwd DIR] -- PROGRAM [ARGS…]`. The environment is
/// passed to the application unchanged.
pub fn main(args: Vec<OsString>) -> i32 {
    match Shim::parse(args) {
        Ok(shim) => shim.run(),
        Err(e) => {
            eprintln!("mesh __shim: {e}");
            2
        }
    }
}

struct Shim {
    uid: Option<u32>,
    gid: Option<u32>,
    cwd: Option<OsString>,
    argv: Vec<OsString>,
}

/// What the shim learned from a `read` on the control socket.
enum Control {
    Signal(i32),
    Kill,
    /// `mesh` is gone.
    Eof,
}

// === impl Shim ===

impl Shim {
    fn parse(args: Vec<OsString>) -> Result<Self, String> {
        let mut shim = Shim {
            uid: None,
            gid: None,
            cwd: None,
            argv: Vec::new(),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.to_str() {
                Some("--uid") => shim.uid = Some(parse_num(it.next())?),
                Some("--gid") => shim.gid = Some(parse_num(it.next())?),
                Some("--cwd") => shim.cwd = Some(it.next().ok_or("--cwd needs a value")?),
                Some("--") => {
                    shim.argv = it.collect();
                    break;
                }
                _ => return Err(format!("unexpected argument {arg:?}")),
            }
        }
        if shim.argv.is_empty() {
            return Err("no program given after --".into());
        }
        Ok(shim)
    }

    fn run(self) -> i32 {
        // SIGCHLD is taken through a signalfd, so it must be blocked for this thread. The
        // application does not inherit the mask: it is cleared in `pre_exec` below.
        let mut chld = SigSet::empty();
        chld.add(Signal::SIGCHLD);
        // The shim must die only with mesh or after its application: a `pkill mesh`, a
        // terminal's SIGHUP or a stray SIGTERM must not orphan the application. Blocking
        // (not ignoring) matters: std resets the signal mask in the child before exec,
        // while an ignored disposition would be inherited by the application.
        let mut blocked = chld;
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            blocked.add(sig);
        }
        if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None) {
            eprintln!("mesh __shim: cannot block signals: {e}");
            return 1;
        }
        // Named apart from mesh itself, so that `pkill -x mesh` means mesh.
        let _ = nix::sys::prctl::set_name(c"mesh-shim");
        let sfd = match SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("mesh __shim: signalfd: {e}");
                return 1;
            }
        };
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("mesh __shim: cannot become a subreaper: {e}");
            return 1;
        }

        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::null())
            .process_group(0);
        // The application must start with no signal blocked: std resets SIGPIPE's
        // disposition for a child but keeps the signal mask, which would leave it deaf to
        // its stop signal. The set is built before the fork.
        let empty = SigSet::empty();
        #[allow(
            unsafe_code,
            reason = "pre_exec: only sigprocmask, which is async-signal-safe"
        )]
        // SAFETY: the closure runs between fork and exec and only calls sigprocmask(2) on a
        // set built beforehand: no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                sigprocmask(SigmaskHow::SIG_SETMASK, Some(&empty), None)
                    .map_err(std::io::Error::from)
            });
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some(gid) = self.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = self.uid {
            cmd.uid(uid);
        }
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let program = self.argv[0].to_string_lossy();
                let place = match &self.cwd {
                    Some(dir) => format!(" in {}", dir.to_string_lossy()),
                    None => String::new(),
                };
                report(&format!("spawn-error cannot start `{program}`{place}: {e}"));
                return 0;
            }
        };
        let app = Pid::from_raw(child.id() as i32);
        // The std handle is not used to wait: waitpid(-1) below reaps the application and
        // every adopted orphan alike.
        drop(child);
        report(&format!("pid {app}"));

        let mut buf = Vec::new();
        loop {
            let stdin = std::io::stdin();
            let mut fds = [
                PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("mesh __shim: poll: {e}");
                    kill_all(app);
                    return 1;
                }
            }
            let ctl_ready = fds[0].any().unwrap_or(true);
            let chld_ready = fds[1].any().unwrap_or(false);

            if chld_ready {
                while let Ok(Some(_)) = sfd.read_signal() {}
                if let Some(status) = reap(app) {
                    // The application ended: clear out what it left behind, then report.
                    kill_all(app);
                    let line = match status {
                        Ended::Code(c) => format!("exit code {c}"),
                        Ended::Signal(s) => format!("exit signal {s}"),
                    };
                    report(&line);
                    return 0;
                }
            }
            if ctl_ready {
                for control in read_controls(&mut buf) {
                    match control {
                        Control::Signal(sig) => signal_all(app, sig),
                        Control::Kill => signal_all(app, libc::SIGKILL),
                        Control::Eof => {
                            // `mesh` is gone: nothing may outlive it.
                            kill_all(app);
                            return 0;
                        }
                    }
                }
            }
        }
    }
}

enum Ended {
    Code(i32),
    Signal(i32),
}

fn parse_num(v: Option<OsString>) -> Result<u32, String> {
    v.and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| "expected a number".to_string())
}

/// Write one line to `mesh` on the control socket (our stdin). A failure means `mesh` is
/// gone, which the poll loop notices as EOF.
fn report(line: &str) {
    let stdin = std::io::stdin();
    let msg = format!("{line}\n");
    let mut rest = msg.as_bytes();
    while !rest.is_empty() {
        match nix::unistd::write(stdin.as_fd(), rest) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
    let _ = std::io::stderr().flush();
}

/// Read what is available on the control socket and parse whole lines.
fn read_controls(buf: &mut Vec<u8>) -> Vec<Control> {
    let stdin = std::io::stdin();
    let mut chunk = [0u8; 256];
    let n = loop {
        match nix::unistd::read(stdin.as_fd(), &mut chunk) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(_) => break 0,
        }
    };
    if n == 0 {
        return vec![Control::Eof];
    }
    buf.extend_from_slice(&chunk[..n]);
    let mut out = Vec::new();
    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=i).collect();
        let line = String::from_utf8_lossy(&line[..i]).into_owned();
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|n| n.parse::<i32>().ok()),
        ) {
            (Some("sig"), Some(n)) => out.push(Control::Signal(n)),
            (Some("kill"), _) => out.push(Control::Kill),
            _ => {}
        }
    }
    out
}

/// Reap every child that has ended; return the application's status if it was among them.
fn reap(app: Pid) -> Option<Ended> {
    let mut ended = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == app => ended = Some(Ended::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == app => {
                ended = Some(Ended::Signal(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return ended,
            Ok(_) => {}
        }
    }
}

/// Send `sig` to the application's process group and to every process re-parented to us
/// that left that group (daemons that called `setsid`). Each process gets it once: a
/// second stop signal means "stop now" to many programs.
fn signal_all(app: Pid, sig: i32) {
    let Ok(sig) = Signal::try_from(sig) else {
        return;
    };
    let _ = kill(Pid::from_raw(-app.as_raw()), sig);
    for pid in adopted() {
        if nix::unistd::getpgid(Some(pid)).is_ok_and(|group| group != app) {
            let _ = kill(pid, sig);
        }
    }
}

/// SIGKILL the application's group and every descendant, and reap them all. Killing an
/// adopted process re-parents its own children to us, so repeat until none is left.
fn kill_all(app: Pid) {
    let _ = kill(Pid::from_raw(-app.as_raw()), Signal::SIGKILL);
    loop {
        for pid in adopted() {
            let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
        }
        match waitpid(None, None) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return, // ECHILD: nothing left
        }
    }
}

/// Our live children (the application, if still running, and adopted orphans).
fn adopted() -> Vec<Pid> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may contain spaces.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(me) && state != Some("Z") {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_arguments() {
        let args = ["--uid", "5", "--cwd", "/tmp", "--", "sh", "-c", "true"]
            .iter()
            .map(OsString::from)
            .collect();
        let shim = Shim::parse(args).expect("valid");
        assert_eq!(shim.uid, Some(5));
        assert_eq!(shim.cwd, Some(OsString::from("/tmp")));
        assert_eq!(shim.argv.len(), 3);
        assert!(Shim::parse(vec![OsString::from("--")]).is_err());
        assert!(Shim::parse(vec![OsString::from("--bogus")]).is_err());
    }
}
