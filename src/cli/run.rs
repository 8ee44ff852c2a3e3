//! `mesh run [-f FILE] [--wait-timeout D] -- CMD…` (SPEC §4, §7): start the mesh,
//! isolated (every port ephemeral, a private state directory), wait until it is ready,
//! run CMD with `<SERVICE>_URL` (http/grpc) and `<SERVICE>_ADDR` (all) pointing at each
//! service's test ingress (identity `spiffe://<name>/test`, admitted by every inbound),
//! then tear the mesh down and exit with CMD's code (128+N if CMD died of signal N), or
//! 1 if the mesh never became ready (with the reason and the failing service's last
//! lines).
//!
//! The services' output goes to their log files only (in the private state directory,
//! `state_dir/run/<pid>/logs/`, removed at the end), so that CMD's output stays readable;
//! when the mesh does not become ready, the failing replica's last lines are printed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use mesh_supervisor::config::Protocol;
use mesh_supervisor::lifecycle::State;
use mesh_supervisor::logs::{self, LogOptions, LogSink};
use mesh_supervisor::state_dir::StateDir;
use tokio::signal::unix::{SignalKind, signal};

use super::{FileArg, load};
use crate::runtime::{self, Runtime};

/// How long the mesh may take to be ready, unless `--wait-timeout` says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// Lines of a failing replica's output shown when the mesh is not ready.
const TAIL: usize = 20;

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    file: FileArg,
    /// How long the mesh may take to be ready (default 60s).
    #[arg(long, value_name = "D")]
    wait_timeout: Option<String>,
    /// The command to run, with its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

pub(super) fn run(args: RunArgs, env: &BTreeMap<String, String>) -> ExitCode {
    let mut config = match load(&args.file, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let wait = match args.wait_timeout.as_deref().map(humantime::parse_duration) {
        None => DEFAULT_WAIT,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            eprintln!("mesh: invalid --wait-timeout: {e}");
            return ExitCode::from(2);
        }
    };
    let private = config
        .mesh
        .state_dir
        .join("run")
        .join(std::process::id().to_string());
    let state = match StateDir::acquire(&private) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "mesh: cannot create the private state directory {}: {e}",
                private.display()
            );
            return ExitCode::from(1);
        }
    };
    runtime::isolate(&mut config, state.path().to_path_buf());
    let logs = LogSink::new(LogOptions {
        writer: Box::new(std::io::sink()),
        logs_dir: Some(state.logs_dir()),
        ..LogOptions::default()
    });
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let logs_dir = state.logs_dir();
    let code = rt.block_on(run_in(
        config,
        env.clone(),
        logs,
        &logs_dir,
        wait,
        args.command,
    ));
    drop(rt);
    drop(state);
    let _ = std::fs::remove_dir_all(&private);
    code
}

async fn run_in(
    config: mesh_supervisor::config::Config,
    env: BTreeMap<String, String>,
    logs: LogSink,
    logs_dir: &Path,
    wait: Duration,
    command: Vec<String>,
) -> ExitCode {
    let (Ok(mut sigint), Ok(mut sigterm)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("mesh: cannot install signal handlers");
        return ExitCode::from(1);
    };
    let protocols: BTreeMap<String, Protocol> = config
        .services
        .iter()
        .map(|(name, svc)| (name.clone(), svc.protocol))
        .collect();
    let mesh = match Runtime::start_with(config, env.clone(), None, logs, true).await {
        Ok(mesh) => mesh,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            return ExitCode::from(1);
        }
    };
    let ready = tokio::select! {
        ready = tokio::time::timeout(wait, mesh.ready()) => match ready {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(format!(
                "not ready within {}: {}",
                humantime::format_duration(wait),
                mesh.not_ready()
            )),
        },
        _ = sigint.recv() => Err("interrupted (SIGINT) before the mesh was ready".into()),
        _ = sigterm.recv() => Err("stopped (SIGTERM) before the mesh was ready".into()),
    };
    if let Err(why) = ready {
        eprintln!("mesh: the mesh never became ready: {why}");
        print_failing(&mesh, logs_dir);
        mesh.shutdown(std::future::pending()).await;
        return ExitCode::from(1);
    }

    let mut vars: Vec<(String, String)> = Vec::new();
    for (service, addr) in mesh.test_addrs() {
        let name = service.to_uppercase().replace('-', "_");
        if protocols.get(&service) != Some(&Protocol::Tcp) {
            vars.push((format!("{name}_URL"), format!("http://{addr}")));
        }
        vars.push((format!("{name}_ADDR"), addr.to_string()));
    }
    let (program, rest) = match command.split_first() {
        Some(split) => split,
        None => return ExitCode::from(2),
    };
    let mut child = match tokio::process::Command::new(program)
        .args(rest)
        .env_clear()
        .envs(&env)
        .envs(vars)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("mesh: cannot run `{program}`: {e}");
            mesh.shutdown(std::future::pending()).await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return ExitCode::from(code);
        }
    };
    // Ctrl-C reaches CMD from the terminal too (same process group); a signal sent to
    // mesh alone is passed on. Either way CMD decides, and its exit is the result.
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = sigint.recv() => forward(&child, nix::sys::signal::Signal::SIGINT),
            _ = sigterm.recv() => forward(&child, nix::sys::signal::Signal::SIGTERM),
        }
    };
    mesh.shutdown(async {
        let _ = sigint.recv().await;
    })
    .await;
    match status {
        Ok(status) => ExitCode::from(super::exec::exit_code(status)),
        Err(e) => {
            eprintln!("mesh: cannot wait for `{program}`: {e}");
            ExitCode::from(1)
        }
    }
}

fn forward(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// The last lines of each replica that failed (or, if none did, that is not ready).
fn print_failing(mesh: &Runtime, logs_dir: &Path) {
    let status = mesh.status();
    let all = status.borrow().clone();
    let failed: Vec<_> = all
        .values()
        .filter(|r| matches!(r.state, State::Failed | State::Exited | State::Blocked))
        .collect();
    let shown: Vec<_> = if failed.is_empty() {
        all.values().filter(|r| !r.ready).collect()
    } else {
        failed
    };
    for r in shown {
        let lines = logs::read_tail(logs_dir, &r.service, r.replica, TAIL).unwrap_or_default();
        if lines.is_empty() {
            continue;
        }
        eprintln!("mesh: last lines of {}.{}:", r.service, r.replica);
        for line in lines {
            eprintln!("{line}");
        }
    }
}
