//! The command line: parse, dispatch, exit codes (SPEC §4).

mod detach;
mod exec;
mod logs;
mod ready;
mod run;

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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::runtime::Runtime;
use crate::{admin, control, notify, plan};

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
    /// Start services (with their dependencies) in the foreground, or in the background
    /// with -d or --wait.
    Up {
        #[command(flatten)]
        file: FileArg,
        /// Run in the background (output in state_dir/mesh.out); return once the mesh
        /// answers.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Run in the background and return once every service started is ready; exit 1
        /// when one fails or the time is up.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (a duration such as `90s`; default 60s).
        #[arg(long, value_name = "D", requires = "wait", value_parser = humantime::parse_duration)]
        wait_timeout: Option<std::time::Duration>,
        /// The background half of `up -d`: a session of its own, output file restarted.
        #[arg(long, hide = true)]
        detached: bool,
        /// Services to start; default all.
        services: Vec<String>,
    },
    /// Validate mesh.toml and print the resolved plan.
    Check {
        #[command(flatten)]
        file: FileArg,
    },
    /// One row per replica of the running mesh.
    Ps {
        #[command(flatten)]
        file: FileArg,
        /// One JSON object per replica (as `/api/status` returns them).
        #[arg(long)]
        json: bool,
    },
    /// The mesh CA (issuer, fingerprint, expiry) and every certificate in use.
    Certs {
        #[command(flatten)]
        file: FileArg,
    },
    /// Stop the running mesh (as SIGTERM does) and wait until it is gone.
    Down {
        #[command(flatten)]
        file: FileArg,
    },
    /// Start stopped (or failed) services of the running mesh; returns once they are ready.
    Start {
        #[command(flatten)]
        file: FileArg,
        /// The services.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Stop services of the running mesh (they stay stopped across reloads).
    Stop {
        #[command(flatten)]
        file: FileArg,
        /// The services.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Replace the replicas of services one at a time, each new one ready before the old
    /// one stops.
    Restart {
        #[command(flatten)]
        file: FileArg,
        /// The services.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Start the mesh isolated, wait until it is ready, run CMD with `<SERVICE>_URL` and
    /// `<SERVICE>_ADDR` in its environment, tear the mesh down; exit with CMD's code.
    Run(run::RunArgs),
    /// Re-read mesh.toml now and apply the difference.
    Reload {
        #[command(flatten)]
        file: FileArg,
    },
    /// Past and live lines of services, from the log files (whether or not a mesh runs).
    Logs(logs::LogsArgs),
    /// Run CMD with SERVICE's environment and working directory, against the running mesh.
    Exec(exec::ExecArgs),
    /// Not supported yet (`run`), or not a command.
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
    let env: BTreeMap<String, String> = std::env::vars().collect();
    init_tracing(&env);
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
            detached,
            services,
        } => {
            if detached {
                // Before anything else, so that the terminal's signals stop reaching it.
                detach::enter_session();
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
            if detach || wait {
                let until = if wait {
                    detach::Until::Ready
                } else {
                    detach::Until::Running
                };
                let limit = wait_timeout.unwrap_or(detach::DEFAULT_WAIT_TIMEOUT);
                return detach::up(&config, &services, cli.log_format, until, limit);
            }
            let only = (!services.is_empty()).then_some(services);
            up(config, env, only, cli.log_format, detached)
        }
        Command::Ps { file, json } => match control_call(&file, &env, "ps") {
            Ok(data) => {
                if json {
                    let rows = data.as_array().cloned().unwrap_or_default();
                    for row in rows {
                        println!("{row}");
                    }
                } else {
                    print!("{}", ps_table(&data));
                    // On a terminal, where to go, as the ready line says it.
                    if std::io::stdout().is_terminal() {
                        if let Ok(urls) = control_call(&file, &env, "urls") {
                            let urls = urls["urls"].as_str().unwrap_or_default();
                            if !urls.is_empty() {
                                println!("{urls}");
                            }
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Certs { file } => match control_call(&file, &env, "certs") {
            Ok(data) => {
                print!("{}", data.as_str().unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Down { file } => {
            let config = match load(&file, &env) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match control::call(&config.mesh.state_dir, "down") {
                Ok(_) => {}
                Err(e) => {
                    eprintln!("mesh: {e}");
                    return ExitCode::from(1);
                }
            }
            // The lock on mesh.pid is released when the mesh process exits.
            match StateDir::wait_released(&config.mesh.state_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh: {}", mesh_proxy::tls::error_chain(&e));
                    ExitCode::from(1)
                }
            }
        }
        Command::Logs(args) => logs::run(args, &env, cli.log_format),
        Command::Exec(args) => exec::run(args, &env),
        Command::Start { file, services } => service_command(&file, &env, "start", &services),
        Command::Stop { file, services } => service_command(&file, &env, "stop", &services),
        Command::Restart { file, services } => service_command(&file, &env, "restart", &services),
        Command::Reload { file } => reload_command(&file, &env),
        Command::Run(args) => run::run(args, &env),
        Command::Other(args) => {
            let name = args.first().map(String::as_str).unwrap_or("");
            eprintln!("mesh: unknown command `{name}` (see `mesh --help`)");
            ExitCode::from(2)
        }
    }
}

/// mesh's own diagnostics on stderr, at the level `MESH_LOG` names (default `warn`);
/// user-facing lines go through the LogSink instead. Coloured only on a terminal and
/// without `NO_COLOR`, so that a journal or a file gets plain lines. The events of the
/// libraries mesh speaks through (h2, hyper, rustls, …) are held back a level
/// ([`dependency_shown`]): they warn about what peers do (h2 once per rapid-reset
/// connection), which the sidecars count in their metrics instead, and a line per
/// peer's mistake would let any client fill the log.
fn init_tracing(env: &BTreeMap<String, String>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let level = env
        .get("MESH_LOG")
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let filter = tracing_subscriber::filter::filter_fn(move |metadata| {
        is_own(metadata.target()) || dependency_shown(*metadata.level(), level)
    })
    .with_max_level_hint(level);
    // `try_init` also routes the `log` records of rustls through the filter.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour(std::io::stderr().is_terminal(), env))
        .finish()
        .with(filter)
        .try_init();
}

/// Whether output to a stream may be coloured (mesh's diagnostics on stderr, the log
/// lines on stdout): only on a terminal, and not when `NO_COLOR` is set to anything but
/// the empty string (<https://no-color.org>).
fn colour(terminal: bool, env: &BTreeMap<String, String>) -> bool {
    terminal && env.get("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether an event's target belongs to mesh's own crates (`mesh`, `mesh_proxy`,
/// `mesh_supervisor`, …) rather than to a library.
fn is_own(target: &str) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    krate == "mesh" || krate.starts_with("mesh_")
}

/// Whether a library's event at `event` is shown at `MESH_LOG` level `max`: errors
/// always; warnings and information from `debug` on; debug and trace lines at `trace`.
fn dependency_shown(event: tracing::Level, max: tracing::Level) -> bool {
    use tracing::Level;
    let held_back = match event {
        Level::ERROR => Level::ERROR,
        Level::WARN | Level::INFO => Level::DEBUG,
        _ => Level::TRACE,
    };
    // In tracing's order the more verbose level is the greater.
    held_back <= max
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

/// Load the configuration and send `cmd` to the mesh running on its state_dir.
fn control_call(
    file: &FileArg,
    env: &BTreeMap<String, String>,
    cmd: &str,
) -> Result<serde_json::Value, ExitCode> {
    let config = load(file, env)?;
    control::call(&config.mesh.state_dir, cmd).map_err(|e| {
        eprintln!("mesh: {e}");
        ExitCode::from(1)
    })
}

/// `mesh ps` as a table.
/// `mesh start|stop|restart SERVICE…`: one command to the running mesh, which answers
/// once it is done; prints what was done. Exit 1 when a service is unknown or the action
/// failed.
fn service_command(
    file: &FileArg,
    env: &BTreeMap<String, String>,
    cmd: &str,
    services: &[String],
) -> ExitCode {
    let config = match load(file, env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for s in services {
        if !config.services.contains_key(s) {
            eprintln!("mesh: no service `{s}` in {}", config.path.display());
            return ExitCode::from(1);
        }
    }
    let args = serde_json::json!({ "services": services });
    match control::call_with(&config.mesh.state_dir, cmd, args) {
        Ok(data) => {
            for line in data["lines"].as_array().into_iter().flatten() {
                println!("{}", line.as_str().unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh: {e}");
            ExitCode::from(1)
        }
    }
}

/// `mesh reload`: the mesh re-reads its file; exit 0 applied, 78 invalid file, 1
/// refused ("restart required") or a replacement failed.
fn reload_command(file: &FileArg, env: &BTreeMap<String, String>) -> ExitCode {
    let Some(path) = file
        .file
        .clone()
        .or_else(|| config::find(&std::env::current_dir().ok()?))
    else {
        eprintln!("mesh: no mesh.toml in the current directory or its parents (use -f FILE)");
        return ExitCode::from(EXIT_CONFIG);
    };
    // An invalid file is reported by the mesh, which reloads it (and keeps running as
    // it was): only the state directory is needed here.
    let state_dir = match config::load(&path, env) {
        Ok(c) => c.mesh.state_dir,
        Err(_) => state_dir_of_invalid(&path, env),
    };
    match control::call_with(&state_dir, "reload", serde_json::Value::Null) {
        Ok(data) => {
            let code = data["code"].as_u64().unwrap_or(1);
            for line in data["lines"].as_array().into_iter().flatten() {
                let line = line.as_str().unwrap_or_default();
                if code == 0 {
                    println!("{line}");
                } else {
                    eprintln!("{line}");
                }
            }
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("mesh: {e}");
            ExitCode::from(1)
        }
    }
}

/// Where the running mesh's state directory is when the file it would reload is
/// invalid now, so that its own `state_dir` cannot be trusted: the default one
/// (`MESH_STATE_DIR`, `STATE_DIRECTORY`, `.mesh` beside the file).
fn state_dir_of_invalid(path: &std::path::Path, env: &BTreeMap<String, String>) -> PathBuf {
    let dir = path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let systemd = env.get("STATE_DIRECTORY").and_then(|s| s.split(':').next());
    let chosen = env
        .get("MESH_STATE_DIR")
        .map(String::as_str)
        .or(systemd)
        .unwrap_or(".mesh");
    dir.join(chosen)
}

/// With endpoints of other hosts among the rows (SPEC §9), a HOST column says where
/// each is (`local` for this host's replicas), and a stale one's health is `stale`.
fn ps_table(data: &serde_json::Value) -> String {
    let hosts = data
        .as_array()
        .into_iter()
        .flatten()
        .any(|row| row.get("host").is_some_and(|h| !h.is_null()));
    let mut header = vec![
        "SERVICE", "REPLICA", "STATE", "HEALTH", "PID", "EXIT", "RESTARTS", "PORT", "UPTIME",
        "RPS", "SUCCESS", "P99",
    ];
    if hosts {
        header.insert(2, "HOST");
    }
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let field = |row: &serde_json::Value, key: &str| match row.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(v) => v.to_string(),
    };
    for row in data.as_array().into_iter().flatten() {
        let uptime = match row.get("uptime_s").and_then(|v| v.as_u64()) {
            Some(s) => humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
            None => "-".to_string(),
        };
        let stale = row.get("stale").and_then(|v| v.as_bool()) == Some(true);
        let mut cells = vec![
            field(row, "service"),
            field(row, "replica"),
            field(row, "state"),
            if stale {
                "stale".to_string()
            } else {
                field(row, "health")
            },
            field(row, "pid"),
            field(row, "exit_code"),
            field(row, "restarts"),
            field(row, "port"),
            uptime,
            field(row, "rps"),
            match row.get("success_rate").and_then(|v| v.as_f64()) {
                Some(s) => format!("{:.1}%", s * 100.0),
                None => "-".to_string(),
            },
            match row.get("p99_ms").and_then(|v| v.as_f64()) {
                Some(ms) => format!("{ms}ms"),
                None => "-".to_string(),
            },
        ];
        if hosts {
            let host = match row.get("host") {
                Some(serde_json::Value::String(h)) => h.clone(),
                _ => "local".to_string(),
            };
            cells.insert(2, host);
        }
        rows.push(cells);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `mesh up` in the foreground (or as the background half of `mesh up -d`, `detached`).
fn up(
    config: Config,
    env: BTreeMap<String, String>,
    only: Option<Vec<String>>,
    format: Format,
    detached: bool,
) -> ExitCode {
    let state = match StateDir::acquire(&config.mesh.state_dir) {
        Ok(s) => s,
        Err(e @ StateDirError::AlreadyRunning { .. }) => {
            eprintln!("mesh: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("mesh: {}", mesh_proxy::tls::error_chain(&e));
            return ExitCode::from(1);
        }
    };
    if detached {
        detach::start_output(state.path());
    }
    let logs = LogSink::new(LogOptions {
        format: match format {
            Format::Text => LogFormat::Text,
            Format::Json => LogFormat::Json,
        },
        color: colour(std::io::stdout().is_terminal(), &env),
        logs_dir: Some(state.logs_dir()),
        // Terminal writes on a thread of their own: a stalled terminal must not stop
        // the runtime's thread, which runs every sidecar.
        background: true,
        ..LogOptions::default()
    });
    // A single-threaded runtime by default: a request crosses about six tasks through
    // the two sidecars, and there those hand-offs are pushes onto one FIFO run queue:
    // no cross-thread wake-ups, and the frames of requests that arrive together leave in
    // one write of the shared HTTP/2 connection (docs/benchmark.md: about 15 % less CPU
    // per request and 20 % more throughput than one worker of the multi-thread
    // runtime). TOKIO_WORKER_THREADS (tokio's own variable) asks for the multi-thread
    // runtime with that many workers instead.
    let mut builder = if env.contains_key("TOKIO_WORKER_THREADS") {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().thread_name("mesh").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let terminal = logs.clone();
    let code = runtime.block_on(run_up(config, env, only, logs, &state));
    drop(runtime);
    // The last lines ("stopped", an app's final words) may still be with the writer.
    terminal.flush(std::time::Duration::from_secs(5));
    drop(state);
    code
}

async fn run_up(
    config: Config,
    base_env: BTreeMap<String, String>,
    only: Option<Vec<String>>,
    logs: LogSink,
    state: &StateDir,
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
    let systemd = notify::Systemd::from_env(&base_env);
    // Bound before any process starts, like every listener.
    let admin = match config.mesh.admin {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("mesh: cannot listen on {addr} for `admin`: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    // `socket_file` removes the socket file on every way out of this function.
    let (control, socket_file) = match control::bind(state.path()) {
        Ok(bound) => bound,
        Err(e) => {
            let path = control::socket_path(state.path());
            // Unix socket paths are limited to 107 bytes (sun_path).
            let hint = if path.as_os_str().len() > 107 {
                " (the path is longer than a Unix socket allows: use a shorter state_dir)"
            } else {
                ""
            };
            eprintln!(
                "mesh: cannot create the control socket {}: {e}{hint}",
                path.display()
            );
            return ExitCode::from(1);
        }
    };
    let started = tokio::time::Instant::now();
    let mesh = match Runtime::start(config, base_env, only, logs.clone()).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mesh: {e:#}");
            return ExitCode::from(1);
        }
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let mut servers = tokio::task::JoinSet::new();
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let last_ready = ready::LastReady::default();
    if let Some(listener) = admin {
        if let Ok(addr) = listener.local_addr() {
            logs.mesh_line(&format!("admin on http://{addr}"));
        }
        servers.spawn(admin::serve(
            listener,
            admin::AdminState {
                mesh_name: name.clone(),
                metrics: mesh.metrics().clone(),
                status: mesh.status(),
                stopping: Arc::clone(&stopping),
                warning: Arc::new(parking_lot::Mutex::new(mesh.ca_warning())),
                runtime: mesh.clone(),
                logs_dir: state.logs_dir(),
            },
        ));
    }
    let (requests_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    servers.spawn(control::serve(
        control,
        Arc::new(Answers {
            runtime: mesh.clone(),
            admin: admin_addr,
            last_ready: Arc::clone(&last_ready),
            status: mesh.status(),
            metrics: mesh.metrics().clone(),
            certs: Box::new(mesh.certs_reporter()),
        }),
        requests_tx,
    ));
    if let Some(systemd) = systemd.clone() {
        servers.spawn(notify::serve(systemd, mesh.status(), mesh.ca_warning()));
    }
    servers.spawn(crate::watch::run(
        mesh.clone(),
        systemd.is_some(),
        state.path().to_path_buf(),
    ));
    for (service, addr) in mesh.ingress_addrs() {
        logs.mesh_line(&format!("ingress of `{service}` on {addr}"));
    }
    logs.mesh_line(&format!(
        "mesh `{name}` starting (pid {})",
        std::process::id()
    ));
    servers.spawn(ready::announce(
        mesh.clone(),
        admin_addr,
        started,
        logs.clone(),
        Arc::clone(&last_ready),
    ));

    let reason = loop {
        tokio::select! {
            outcome = mesh.finished() => break Stop::Finished(outcome),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            request = requests.recv() => match request {
                Some(control::Request::Down) => break Stop::Signal("mesh down"),
                Some(control::Request::Act { cmd, args, reply }) => {
                    let mesh = mesh.clone();
                    let systemd = systemd.is_some();
                    tokio::spawn(async move {
                        let _ = reply.send(act(&mesh, &cmd, &args, systemd).await);
                    });
                }
                None => {}
            },
            _ = sighup.recv() => {
                logs.mesh_line("SIGHUP: reloading");
                let mesh = mesh.clone();
                let systemd = systemd.is_some();
                tokio::spawn(async move {
                    reload(&mesh, systemd).await;
                });
            }
        }
    };
    stopping.store(true, Ordering::SeqCst);
    if systemd.is_some() {
        notify::send(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping"),
        ]);
    }
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
    servers.abort_all();
    drop(socket_file);
    logs.mesh_line("stopped");
    if forced.load(std::sync::atomic::Ordering::SeqCst) {
        return ExitCode::from(EXIT_FORCED);
    }
    match reason {
        Stop::Finished(Outcome::AllCompleted) | Stop::Signal(_) => ExitCode::SUCCESS,
        Stop::Finished(Outcome::SomeFailed) => ExitCode::from(1),
    }
}

/// Carry out a command of the control socket that acts on the mesh; the answer's data.
async fn act(
    mesh: &Runtime,
    cmd: &str,
    args: &serde_json::Value,
    systemd: bool,
) -> Result<serde_json::Value, String> {
    if cmd == "reload" {
        let outcome = reload(mesh, systemd).await;
        return Ok(serde_json::json!({ "code": outcome.code, "lines": outcome.lines }));
    }
    let services: Vec<String> = args["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    if services.is_empty() {
        return Err(format!("`{cmd}` needs at least one service"));
    }
    let mut lines = Vec::new();
    for service in &services {
        lines.push(mesh.service_command(cmd, service).await?);
    }
    Ok(serde_json::json!({ "lines": lines }))
}

/// Reload, telling systemd (`RELOADING=1` with `MONOTONIC_USEC=`, then `READY=1`).
async fn reload(mesh: &Runtime, systemd: bool) -> crate::runtime::ReloadOutcome {
    if systemd {
        let mut states = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify::send(&states);
    }
    let outcome = mesh.reload().await;
    if systemd {
        notify::send(&[sd_notify::NotifyState::Ready]);
    }
    outcome
}

/// The control socket's reading commands.
struct Answers {
    runtime: Runtime,
    /// The admin server's address, for the dashboard's URL.
    admin: Option<std::net::SocketAddr>,
    last_ready: ready::LastReady,
    status: tokio::sync::watch::Receiver<mesh_supervisor::supervisor::Statuses>,
    metrics: mesh_proxy::metrics::Metrics,
    certs: Box<dyn Fn() -> Option<crate::runtime::CertsReport> + Send + Sync>,
}

impl control::Answer for Answers {
    fn answer(&self, cmd: &str, args: &serde_json::Value) -> Result<serde_json::Value, String> {
        match cmd {
            "urls" => Ok(serde_json::json!({
                "urls": ready::urls(&self.runtime, self.admin),
                "ready_line": *self.last_ready.lock(),
            })),
            "env" => {
                let service = args["service"]
                    .as_str()
                    .ok_or_else(|| "`env` needs a service".to_string())?;
                let (env, cwd) = self.runtime.app_env(service)?;
                let env: serde_json::Map<String, serde_json::Value> = env
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                Ok(serde_json::json!({ "env": env, "cwd": cwd }))
            }
            "ps" => serde_json::from_str(&admin::status_json(
                &self.status.borrow(),
                &self.metrics,
                &self.runtime.remote_status(),
            ))
            .map_err(|e| e.to_string()),
            "certs" => match (self.certs)() {
                Some(report) => Ok(serde_json::Value::String(report.to_string())),
                None => {
                    Err("tls = \"off\": no certificates are in use (mutual TLS is off)".to_string())
                }
            },
            other => Err(format!("unknown command `{other}`")),
        }
    }
}

enum Stop {
    Finished(Outcome),
    Signal(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn libraries_warnings_wait_for_debug_and_their_errors_always_show() {
        assert!(dependency_shown(Level::ERROR, Level::WARN));
        assert!(dependency_shown(Level::ERROR, Level::ERROR));
        assert!(!dependency_shown(Level::WARN, Level::WARN));
        assert!(!dependency_shown(Level::WARN, Level::INFO));
        assert!(dependency_shown(Level::WARN, Level::DEBUG));
        assert!(dependency_shown(Level::INFO, Level::DEBUG));
        assert!(!dependency_shown(Level::DEBUG, Level::DEBUG));
        assert!(dependency_shown(Level::TRACE, Level::TRACE));
    }

    #[test]
    fn own_targets_are_the_mesh_crates() {
        assert!(is_own("mesh"));
        assert!(is_own("mesh::runtime"));
        assert!(is_own("mesh_proxy::http::server"));
        assert!(is_own("mesh_supervisor::logs"));
        assert!(!is_own("h2::proto::streams::streams"));
        assert!(!is_own("hyper_util::server"));
        assert!(!is_own("rustls::check"));
        assert!(!is_own("meshy"));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let none = BTreeMap::new();
        let set = BTreeMap::from([("NO_COLOR".to_string(), "1".to_string())]);
        let empty = BTreeMap::from([("NO_COLOR".to_string(), String::new())]);
        assert!(colour(true, &none));
        assert!(!colour(false, &none));
        assert!(!colour(true, &set));
        assert!(colour(true, &empty));
    }
}
