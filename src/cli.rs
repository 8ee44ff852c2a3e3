//! The command line: parse, dispatch, exit codes (SPEC §4).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mesh_supervisor::config::{self, Config};
use mesh_supervisor::logs::{LogFormat, LogOptions, LogSink};
use mesh_supervisor::state_dir::{StateDir, StateDirError};
use mesh_supervisor::supervisor::Outcome;
use tokio::signal::unix::{SignalKind, signal};

use crate::plan;
use crate::runtime::Runtime;

/// Exit code for an invalid configuration (EX_CONFIG), so that systemd's
/// `RestartPreventExitStatus=78` stops a restart loop.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code after a forced shutdown (second SIGINT).
pub const EXIT_FORCED: u8 = 130;

/// A process manager and service mesh in one binary.
#[derive(Debug, Parser)]
#[command(name = "mesh", version, about)]
pub struct Cli {
    /// Format of the multiplexed logs.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    log_format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start services (with their dependencies) in the foreground.
    Up {
        #[command(flatten)]
        file: FileArg,
        /// Detach (not supported yet).
        #[arg(short = 'd', long)]
        detach: bool,
        /// Return once every service is ready (not supported yet).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (not supported yet).
        #[arg(long, value_name = "D")]
        wait_timeout: Option<String>,
        /// Services to start; default all.
        services: Vec<String>,
    },
    /// Validate mesh.toml and print the resolved plan.
    Check {
        #[command(flatten)]
        file: FileArg,
    },
    /// Not supported yet: the commands that talk to a running mesh.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

#[derive(Debug, clap::Args)]
struct FileArg {
    /// Path of mesh.toml (default: ./mesh.toml or the first in a parent directory).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
}

/// Parse the command line and run it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    match cli.command {
        Command::Check { file } => match load(&file, &env) {
            Ok(config) => {
                print!("{}", plan::render(&config));
                for warning in plan::warnings(&config, &env) {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Up {
            file,
            detach,
            wait,
            wait_timeout,
            services,
        } => {
            if detach || wait || wait_timeout.is_some() {
                eprintln!("mesh: `up -d`, `--wait` and `--wait-timeout` are not supported yet");
                return ExitCode::from(2);
            }
            let config = match load(&file, &env) {
                Ok(c) => c,
                Err(code) => return code,
            };
            for s in &services {
                if !config.services.contains_key(s) {
                    eprintln!("mesh: no service `{s}` in {}", config.path.display());
                    return ExitCode::from(2);
                }
            }
            let only = (!services.is_empty()).then_some(services);
            up(config, env, only, cli.log_format)
        }
        Command::Other(args) => {
            let name = args.first().map(String::as_str).unwrap_or("");
            const LATER: &[&str] = &[
                "ps", "logs", "start", "stop", "restart", "reload", "down", "exec", "run", "certs",
            ];
            if LATER.contains(&name) {
                eprintln!("mesh: `{name}` is not supported yet");
            } else {
                eprintln!("mesh: unknown command `{name}` (see `mesh --help`)");
            }
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    // mesh's own diagnostics; user-facing lines go through the LogSink instead.
    let level = std::env::var("MESH_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Find and load the configuration, printing every error; `Err` holds the exit code.
fn load(file: &FileArg, env: &BTreeMap<String, String>) -> Result<Config, ExitCode> {
    let path = match &file.file {
        Some(p) => p.clone(),
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            match config::find(&cwd) {
                Some(p) => p,
                None => {
                    eprintln!(
                        "mesh: no mesh.toml in {} or its parents (use -f FILE)",
                        cwd.display()
                    );
                    return Err(ExitCode::from(EXIT_CONFIG));
                }
            }
        }
    };
    config::load(&path, env).map_err(|errors| {
        eprint!("{errors}");
        if !errors.to_string().ends_with('\n') {
            eprintln!();
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `mesh up` in the foreground.
fn up(
    config: Config,
    env: BTreeMap<String, String>,
    only: Option<Vec<String>>,
    format: Format,
) -> ExitCode {
    let state = match StateDir::acquire(&config.mesh.state_dir) {
        Ok(s) => s,
        Err(e @ StateDirError::AlreadyRunning { .. }) => {
            eprintln!("mesh: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("mesh: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let logs = LogSink::new(LogOptions {
        format: match format {
            Format::Text => LogFormat::Text,
            Format::Json => LogFormat::Json,
        },
        color: std::io::stdout().is_terminal(),
        logs_dir: Some(state.logs_dir()),
        ..LogOptions::default()
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mesh")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run_up(config, env, only, logs));
    drop(state);
    code
}

async fn run_up(
    config: Config,
    base_env: BTreeMap<String, String>,
    only: Option<Vec<String>>,
    logs: LogSink,
) -> ExitCode {
    let (mut sigint, mut sigterm, mut sighup) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            eprintln!("mesh: cannot install signal handlers");
            return ExitCode::from(1);
        }
    };
    let name = config.mesh.name.clone();
    let mesh = match Runtime::start(config, base_env, only, logs.clone()).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            return ExitCode::from(1);
        }
    };
    for (service, addr) in mesh.ingress_addrs() {
        logs.mesh_line(&format!("ingress of `{service}` on {addr}"));
    }
    logs.mesh_line(&format!(
        "mesh `{name}` starting (pid {})",
        std::process::id()
    ));

    let reason = loop {
        tokio::select! {
            outcome = mesh.finished() => break Stop::Finished(outcome),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = sighup.recv() => {
                logs.mesh_line("SIGHUP: reload is not supported yet; keeping the running configuration");
            }
        }
    };
    if let Stop::Signal(sig) = reason {
        logs.mesh_line(&format!(
            "{sig}: stopping (press Ctrl-C again to kill at once)"
        ));
    }
    let forced = std::sync::atomic::AtomicBool::new(false);
    let force = async {
        let _ = sigint.recv().await;
        forced.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    mesh.shutdown(force).await;
    logs.mesh_line("stopped");
    if forced.load(std::sync::atomic::Ordering::SeqCst) {
        return ExitCode::from(EXIT_FORCED);
    }
    match reason {
        Stop::Finished(Outcome::AllCompleted) | Stop::Signal(_) => ExitCode::SUCCESS,
        Stop::Finished(Outcome::SomeFailed) => ExitCode::from(1),
    }
}

enum Stop {
    Finished(Outcome),
    Signal(&'static str),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
