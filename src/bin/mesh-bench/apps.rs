//! The applications of a `mesh.toml` started without mesh, for `mesh-bench fixture`:
//! how long they take to be ready on their own, which is what a mesh's start cannot beat.
//!
//! Each service's replicas are spawned as mesh would spawn them (same `command`,
//! `working_dir` and environment, built by `Service::app_env`, in their own process
//! group), once their `depends_on` conditions hold. `<UPSTREAM>_URL`/`_ADDR` point
//! straight at the upstream's replica 0, as there are no sidecars. Readiness is checked
//! as SPEC §3 says (the `health` check, else a TCP connect to `PORT`, else running), but
//! every [`POLL`] instead of mesh's 250 ms schedule, so the time measured is the apps'
//! own (up to one poll late per dependency step). At the end every process gets its
//! `stop_signal`, and `SIGKILL` after its `stop_timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use mesh_supervisor::config::{self, Condition, Config, HealthCheck, PortSpec, Protocol, Service};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often a replica's readiness (and every process's exit) is checked.
pub(crate) const POLL: Duration = Duration::from_millis(2);

/// How long one readiness check may take (a connect, an HTTP answer, an exec).
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the applications may take to be ready.
const START_LIMIT: Duration = Duration::from_secs(60);

/// What one start and stop of the applications took.
pub(crate) struct Timing {
    /// From the first spawn until every service was ready (or completed).
    pub(crate) start: Duration,
    /// From the stop signals until every process exited.
    pub(crate) stop: Duration,
    /// Services with a process that was still running at its `stop_timeout` (killed).
    pub(crate) ignored_stop: BTreeSet<String>,
}

/// The configuration of `file`, loaded as `mesh` loads it.
pub(crate) fn load(file: &Path) -> anyhow::Result<Config> {
    config::load(file, &base_env()).map_err(|e| anyhow!("{e}"))
}

/// The environment the applications start from: this process's, minus what only mesh
/// reads (as `mesh::Mesh` does).
fn base_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "MESH_STATE_DIR" | "STATE_DIRECTORY" | "NOTIFY_SOCKET" | "TOKIO_WORKER_THREADS"
            ) && !k.starts_with("WATCHDOG_")
                && !k.starts_with("LISTEN_")
        })
        .collect()
}

/// One application process.
struct Proc {
    service: String,
    replica: u32,
    child: Child,
    /// Its `PORT`.
    port: Option<u16>,
    env: Vec<(String, String)>,
    ready: bool,
    /// Exited with code 0.
    completed: bool,
    /// Exited (reaped).
    exited: bool,
    log: PathBuf,
}

/// The processes started so far; dropping it kills whatever still runs, so no error
/// path leaves an application behind.
#[derive(Default)]
struct Procs(Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if !p.exited {
                let _ = kill(group(&p.child), Signal::SIGKILL);
                let _ = p.child.wait();
                p.exited = true;
            }
        }
    }
}

/// The process group of `child` (it leads its own), for `kill`.
fn group(child: &Child) -> Pid {
    // A pid always fits in i32 on Linux.
    Pid::from_raw(-i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// Start every application of `config` without mesh, wait until all are ready, stop
/// them; their output goes to files in `logs`.
pub(crate) fn once(config: &Config, logs: &Path) -> anyhow::Result<Timing> {
    std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let base_env = base_env();
    let local: Vec<&Service> = config
        .start_order
        .iter()
        .filter_map(|name| config.services.get(name))
        .filter(|svc| !svc.command.is_empty())
        .collect();
    // Every port first: a caller needs its upstreams' addresses when it starts.
    let mut ports: BTreeMap<(String, u32), Option<u16>> = BTreeMap::new();
    for svc in &local {
        for replica in 0..svc.replicas {
            let port = match svc.port {
                PortSpec::Fixed(p) => Some(p),
                PortSpec::Assigned => Some(free_port()?),
                PortSpec::None => None,
            };
            ports.insert((svc.name.clone(), replica), port);
        }
    }
    let upstream_addrs: BTreeMap<String, SocketAddr> = ports
        .iter()
        .filter(|((_, replica), _)| *replica == 0)
        .filter_map(|((name, _), port)| {
            port.map(|p| (name.clone(), SocketAddr::from((Ipv4Addr::LOCALHOST, p))))
        })
        .collect();

    let mut procs = Procs::default();
    let mut started: BTreeSet<String> = BTreeSet::new();
    let began = Instant::now();
    let deadline = began + START_LIMIT;
    let start = loop {
        for svc in &local {
            if started.contains(&svc.name) || !may_start(svc, config, &procs) {
                continue;
            }
            for replica in 0..svc.replicas {
                let port = ports.get(&(svc.name.clone(), replica)).copied().flatten();
                let proc = spawn(config, svc, replica, port, &upstream_addrs, &base_env, logs)?;
                procs.0.push(proc);
            }
            started.insert(svc.name.clone());
        }
        for p in &mut procs.0 {
            if p.exited {
                continue;
            }
            if let Some(status) = p.child.try_wait().context("waiting for an app")? {
                p.exited = true;
                if status.success() {
                    p.completed = true;
                    p.ready = true;
                } else {
                    bail!(
                        "{}.{} exited ({status}) before the applications were ready (without mesh); its last lines:\n{}",
                        p.service,
                        p.replica,
                        tail(&p.log)
                    );
                }
            } else if !p.ready {
                let svc = &config.services[&p.service];
                p.ready = is_ready(svc, p)?;
            }
        }
        if started.len() == local.len() && procs.0.iter().all(|p| p.ready) {
            break began.elapsed();
        }
        if Instant::now() >= deadline {
            let waiting: Vec<String> = procs
                .0
                .iter()
                .filter(|p| !p.ready)
                .map(|p| format!("{}.{}", p.service, p.replica))
                .collect();
            bail!(
                "the applications (without mesh) were not ready within {START_LIMIT:?}: waiting for {}",
                waiting.join(", ")
            );
        }
        std::thread::sleep(POLL);
    };

    // Stop: every process at once, with its service's stop signal.
    let stopping = Instant::now();
    for p in &procs.0 {
        if !p.exited {
            let _ = kill(group(&p.child), config.services[&p.service].stop_signal);
        }
    }
    let mut ignored_stop = BTreeSet::new();
    loop {
        let mut running = false;
        for p in &mut procs.0 {
            if p.exited {
                continue;
            }
            if p.child.try_wait().context("waiting for an app")?.is_some() {
                p.exited = true;
                continue;
            }
            running = true;
            if stopping.elapsed() >= config.services[&p.service].stop_timeout {
                let _ = kill(group(&p.child), Signal::SIGKILL);
                ignored_stop.insert(p.service.clone());
            }
        }
        if !running {
            break;
        }
        std::thread::sleep(POLL);
    }
    let stop = stopping.elapsed();
    Ok(Timing {
        start,
        stop,
        ignored_stop,
    })
}

/// Whether `svc`'s `depends_on` conditions hold (services that run elsewhere, without a
/// `command`, count as met).
fn may_start(svc: &Service, config: &Config, procs: &Procs) -> bool {
    svc.depends_on.iter().all(|(dep, condition)| {
        let local = config
            .services
            .get(dep)
            .is_some_and(|d| !d.command.is_empty());
        if !local {
            return true;
        }
        let mine: Vec<&Proc> = procs.0.iter().filter(|p| &p.service == dep).collect();
        if mine.is_empty() {
            return false;
        }
        match condition {
            Condition::Started => true,
            Condition::Healthy => mine.iter().all(|p| p.ready),
            Condition::Completed => mine.iter().all(|p| p.completed),
        }
    })
}

fn spawn(
    config: &Config,
    svc: &Service,
    replica: u32,
    port: Option<u16>,
    upstream_addrs: &BTreeMap<String, SocketAddr>,
    base_env: &BTreeMap<String, String>,
    logs: &Path,
) -> anyhow::Result<Proc> {
    let env = svc
        .app_env(config, replica, port, upstream_addrs, base_env)
        .map_err(|e| anyhow!("{}.{replica}: {e}", svc.name))?;
    let argv =
        Service::expand_words(&svc.command, &env).map_err(|e| anyhow!("{}: {e}", svc.name))?;
    let Some((program, args)) = argv.split_first() else {
        bail!("{}: empty command", svc.name);
    };
    // Relative program paths are relative to working_dir (SPEC §3).
    let program = PathBuf::from(program);
    let program = if program.is_relative() && program.components().count() > 1 {
        svc.working_dir.join(program)
    } else {
        program
    };
    let log = logs.join(format!("{}.{replica}.log", svc.name));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating a log file")?;
    let child = Command::new(&program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&svc.working_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} ({})", svc.name, program.display()))?;
    Ok(Proc {
        service: svc.name.clone(),
        replica,
        child,
        port,
        env,
        ready: false,
        completed: false,
        exited: false,
        log,
    })
}

/// One readiness check of a running process, as SPEC §3 defines readiness.
fn is_ready(svc: &Service, p: &Proc) -> anyhow::Result<bool> {
    let check = svc.health.as_ref().map(|h| &h.check);
    Ok(match (check, p.port) {
        (Some(HealthCheck::Exec(words)), _) => {
            let argv = Service::expand_words(words, &p.env)
                .map_err(|e| anyhow!("{}: health.exec: {e}", svc.name))?;
            let Some((program, args)) = argv.split_first() else {
                bail!("{}: empty health.exec", svc.name);
            };
            Command::new(program)
                .args(args)
                .env_clear()
                .envs(p.env.iter().map(|(k, v)| (k, v)))
                .current_dir(&svc.working_dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        }
        // An h2c GET for grpc is not done here: a TCP connect stands for it.
        (Some(HealthCheck::Http(path)), Some(port)) if svc.protocol != Protocol::Grpc => {
            let path = Service::expand_words(std::slice::from_ref(path), &p.env)
                .map_err(|e| anyhow!("{}: health.http: {e}", svc.name))?
                .concat();
            http_ok(port, &path)
        }
        (_, Some(port)) => connects(port),
        // `port = "none"` without a check: ready while it runs.
        (_, None) => true,
    })
}

fn connects(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        CHECK_TIMEOUT,
    )
    .is_ok()
}

/// `GET path` straight to the app answers 200–399.
fn http_ok(port: u16, path: &str) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, CHECK_TIMEOUT) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(CHECK_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CHECK_TIMEOUT));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-bench\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    // `HTTP/1.1 200 OK`
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .is_some_and(|code| (200..400).contains(&code))
}

/// A free loopback port (bound and released, as mesh assigns ports).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// The last lines of a log file, for an error message.
fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
