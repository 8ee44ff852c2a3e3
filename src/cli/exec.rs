//! `mesh exec SERVICE -- CMD…` (SPEC §4): run CMD with SERVICE's environment, against
//! the running mesh.
//!
//! # Theory of operation
//!
//! The running mesh knows what replica 0 of a service is given at its start: `PORT`, the
//! `<UP>_URL` and `<UP>_ADDR` of the outbounds it listens on, `env`, `env_file` (read
//! now), `MESH_*`, and mesh's own environment beneath them. Only the mesh can say it
//! (the ports and the outbound addresses are chosen when it starts), so `mesh exec` asks
//! it over the control socket (`env`, with `{"service": NAME}`), and runs CMD with
//! exactly that environment (nothing of the caller's own) in the service's
//! `working_dir`. CMD's stdin, stdout and stderr are the terminal's: it is an ordinary
//! child of `mesh exec`, in the same process group, so Ctrl-C reaches it as it reaches
//! any foreground command.
//!
//! `mesh exec` exits with CMD's code, `128 + N` when CMD died of signal N (the shell's
//! convention, as `mesh run` does), 127 when CMD cannot be found and 126 when it cannot
//! be run. While CMD runs, `mesh exec` blocks SIGINT and SIGQUIT for itself: the
//! terminal sends them to the whole foreground group, and CMD decides what they mean;
//! `mesh exec` waits and reports what CMD did with them. They stay blocked until it
//! exits, so one that arrived is never delivered to it.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

use super::FileArg;
use crate::control;

/// The arguments of `mesh exec`.
#[derive(Debug, clap::Args)]
pub(super) struct ExecArgs {
    #[command(flatten)]
    file: FileArg,
    /// The service whose environment and working directory CMD gets (those of its
    /// replica 0).
    service: String,
    /// The command and its arguments, after `--`.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Run `mesh exec`.
pub(super) fn run(args: ExecArgs, env: &BTreeMap<String, String>) -> ExitCode {
    let config = match super::load(&args.file, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The running mesh answers for its own configuration, which may differ from the
    // file's (an edit not reloaded yet), so it alone says whether the service exists.
    let request = serde_json::json!({ "service": args.service });
    let data = match control::call_with(&config.mesh.state_dir, "env", request) {
        Ok(data) => data,
        Err(e) => {
            eprintln!("mesh: {e}");
            return ExitCode::from(1);
        }
    };
    let Some((vars, cwd)) = parse_answer(&data) else {
        eprintln!("mesh: malformed answer from the mesh to `env`: {data}");
        return ExitCode::from(1);
    };
    let (program, rest) = match args.command.split_first() {
        Some(split) => split,
        // clap requires at least one word.
        None => return ExitCode::from(2),
    };
    let mut cmd = Command::new(program);
    // With `env_clear` + `envs`, std looks the program up in the new `PATH`, the one the
    // service has, as its own command would be.
    cmd.args(rest).env_clear().envs(vars).current_dir(&cwd);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "mesh: cannot run `{program}` in {} for `{}`: {e}",
                cwd.display(),
                args.service
            );
            return ExitCode::from(spawn_error_code(&e));
        }
    };
    // Blocked after the spawn, so that CMD does not inherit the mask. SIGINT and SIGQUIT,
    // which reach CMD from the terminal itself, are waited out; SIGTERM and SIGHUP sent
    // to `mesh exec` alone (`timeout`, a supervisor) are passed on to CMD, which decides;
    // `mesh exec` then reports what CMD did.
    let mut terminal = SigSet::empty();
    terminal.add(Signal::SIGINT);
    terminal.add(Signal::SIGQUIT);
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&terminal), None) {
        tracing::warn!(error = %e, "cannot block SIGINT while CMD runs");
    }
    let mut forwarded = SigSet::empty();
    forwarded.add(Signal::SIGTERM);
    forwarded.add(Signal::SIGHUP);
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded), None).is_ok() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        std::thread::spawn(move || {
            while let Ok(signal) = forwarded.wait() {
                let _ = nix::sys::signal::kill(pid, signal);
            }
        });
    }
    match child.wait() {
        Ok(status) => ExitCode::from(exit_code(status)),
        Err(e) => {
            eprintln!("mesh: cannot wait for `{program}`: {e}");
            ExitCode::from(1)
        }
    }
}

/// The environment and working directory in the mesh's answer to `env`.
fn parse_answer(data: &serde_json::Value) -> Option<(Vec<(String, String)>, PathBuf)> {
    let vars = data["env"]
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect::<Option<Vec<_>>>()?;
    let cwd = PathBuf::from(data["cwd"].as_str()?);
    Some((vars, cwd))
}

/// A process's exit as a shell reports it: its code, or 128 + N after signal N.
pub(super) fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

/// The shell's codes for a command that could not be run: 127 not found, 126 otherwise
/// (not executable, a directory, …).
fn spawn_error_code(e: &io::Error) -> u8 {
    if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        // wait(2) statuses: the code in the second byte, a signal in the low bits.
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn the_answer_gives_environment_and_directory() {
        let data = serde_json::json!({ "env": { "PORT": "8080", "A": "b" }, "cwd": "/srv" });
        let (vars, cwd) = parse_answer(&data).expect("parses");
        assert!(vars.contains(&("PORT".to_string(), "8080".to_string())));
        assert_eq!(cwd, PathBuf::from("/srv"));
        assert!(parse_answer(&serde_json::json!({ "env": { "A": 1 }, "cwd": "/" })).is_none());
        assert!(parse_answer(&serde_json::json!({ "env": {} })).is_none());
    }

    #[test]
    fn a_missing_program_is_127() {
        assert_eq!(
            spawn_error_code(&io::Error::from(io::ErrorKind::NotFound)),
            127
        );
        assert_eq!(
            spawn_error_code(&io::Error::from(io::ErrorKind::PermissionDenied)),
            126
        );
    }
}
