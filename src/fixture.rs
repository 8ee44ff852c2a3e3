//! `mesh::Mesh`: a whole mesh as a fixture of an integration test (SPEC §7).
//!
//! # Usage
//!
//! ```no_run
//! # async fn test() -> Result<(), mesh::Error> {
//! let mesh = mesh::Mesh::from_file("tests/fixtures/shop.toml")?.start().await?; // ready
//! let url = mesh.url("web"); // through a test ingress, for any http/grpc service
//! mesh.service("api").restart().await?;
//! drop(mesh); // everything stopped, synchronously
//! # Ok(())
//! # }
//! ```
//!
//! # Theory of operation
//!
//! A `Mesh` is the runtime `mesh up` uses, not a second one: [`MeshBuilder::start`]
//! starts a thread with a current-thread Tokio runtime of its own, which runs the same
//! `Runtime` (sidecars, supervisor, admin server) as `mesh up`, isolated like `mesh
//! run`: every `expose` and the admin server on ephemeral loopback ports, fixed app ports
//! assigned, a private state directory (removed when the `Mesh` is dropped), and a test
//! ingress per service presenting `spiffe://<name>/test`, admitted by every inbound.
//! Commands reach that thread over a channel, so `start()` works on any Tokio runtime,
//! `start_blocking()` and `Drop` need none, and a panicking test still tears everything
//! down (`Drop` runs while unwinding). After `Drop` returns no process of the mesh runs.
//!
//! Applications are started through the shim (`mesh __shim`): a test binary that links
//! this library is its own shim (see `shim_hook`), so nothing else has to be built.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use mesh_supervisor::config::{self, Config, Protocol};
use mesh_supervisor::logs::{self, LogOptions, LogSink};
use mesh_supervisor::state_dir::StateDir;
use tokio::sync::{mpsc, oneshot};

use crate::runtime::{self, Runtime};

mod shim_hook;

/// How long [`MeshBuilder::start`] waits for every service to be ready, by default.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of a failing service's output that a start error carries.
const LAST_LINES: usize = 20;

/// Why a mesh could not be set up or did not become ready.
///
/// Its `Display` says what happened and, for [`Error::NotReady`] and
/// [`Error::Timeout`], ends with the last 20 lines of the service at fault. `expect`
/// and `unwrap` print the `Debug` form instead; `unwrap_or_else(|e| panic!("{e}"))`
/// prints those lines one per line.
///
/// ```
/// // A misspelled key: nothing is started, every error of the file is listed.
/// let toml = "version = 1\n[services.web]\ncomand = \"python3 web.py\"\n";
/// let error = mesh::Mesh::from_toml(toml, ".").unwrap_err();
/// assert!(matches!(error, mesh::Error::Config(_)));
/// assert!(error.to_string().contains("mesh.toml:3:1: error"), "{error}");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid: every error, as `mesh check` prints them
    /// (`PATH:LINE:COL: error: …`).
    #[error("{0}")]
    Config(String),
    /// A replica became `failed`, `exited` or `blocked` before the mesh was ready.
    #[error("{service}.{replica} is {state}{}; its last lines:\n{}", exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default(), last_lines.join("\n"))]
    NotReady {
        /// The service.
        service: String,
        /// The replica.
        replica: u32,
        /// Its state (`failed`, `exited`, `blocked`).
        state: String,
        /// Its last exit code, if it exited.
        exit_code: Option<i32>,
        /// Its last lines of output (at most 20).
        last_lines: Vec<String>,
    },
    /// `startup_timeout` passed before every service was ready.
    #[error("not ready within {timeout:?}: {waiting}; last lines of {service}:\n{}", last_lines.join("\n"))]
    Timeout {
        /// The startup timeout.
        timeout: Duration,
        /// The replicas not ready, with why when known.
        waiting: String,
        /// The first service not ready.
        service: String,
        /// Its last lines of output (at most 20).
        last_lines: Vec<String>,
    },
    /// The mesh could not start (a listener, the state directory, the CA, …).
    #[error("cannot start the mesh: {0}")]
    Start(String),
    /// A command on a running mesh failed (a restart whose new process was not ready).
    #[error("{0}")]
    Command(String),
}

/// A mesh to start: the configuration and the overrides of the test.
///
/// Made by [`Mesh::from_file`] or [`Mesh::from_toml`]; the overrides ([`env`],
/// [`replicas`], [`services`], [`startup_timeout`]) change only this mesh, never the
/// file. [`start`] or [`start_blocking`] starts it.
///
/// [`env`]: MeshBuilder::env
/// [`replicas`]: MeshBuilder::replicas
/// [`services`]: MeshBuilder::services
/// [`startup_timeout`]: MeshBuilder::startup_timeout
/// [`start`]: MeshBuilder::start
/// [`start_blocking`]: MeshBuilder::start_blocking
#[derive(Debug)]
pub struct MeshBuilder {
    config: Config,
    env: BTreeMap<String, String>,
    startup_timeout: Duration,
    only: Option<Vec<String>>,
}

/// A running mesh; dropping it stops everything.
///
/// Every service is ready when a `Mesh` is returned. It runs on a thread of its own
/// with the runtime `mesh up` uses, isolated like `mesh run`: `expose` and `admin` on
/// ephemeral loopback ports, fixed application ports assigned, a private state
/// directory; so tests of the same file run in parallel. [`Mesh::url`] and
/// [`Mesh::addr`] lead to a test ingress per service whose identity,
/// `spiffe://<name>/test`, every inbound admits. Dropping it stops every process
/// before `drop` returns, also while a failing test unwinds.
///
/// ```no_run
/// # async fn test() -> Result<(), mesh::Error> {
/// let mesh = mesh::Mesh::from_file("mesh.toml")?.start().await?;
/// let products = format!("{}/products", mesh.url("api"));
/// // … call it with any HTTP client, assert …
/// # let _ = products;
/// # Ok(())
/// # }
/// ```
pub struct Mesh {
    inner: Option<Running>,
}

struct Running {
    commands: mpsc::UnboundedSender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
    test_addrs: BTreeMap<String, SocketAddr>,
    protocols: BTreeMap<String, Protocol>,
    admin: Option<SocketAddr>,
    /// The private state directory, removed when the mesh is dropped.
    state_dir: PathBuf,
}

/// One replica, as `mesh ps --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct Replica {
    /// The service.
    pub service: String,
    /// The replica index.
    pub replica: u32,
    /// `waiting`, `blocked`, `starting`, `running`, `backoff`, `stopping`, `stopped`,
    /// `completed`, `exited` or `failed`.
    pub state: String,
    /// `ready`, `unready` or `none`.
    pub health: String,
    /// Its process, if one runs.
    pub pid: Option<u32>,
    /// Its last exit code.
    pub exit_code: Option<i32>,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Its application port (none with `port = "none"`).
    pub port: Option<u16>,
}

/// A service of a running mesh, to act on (see [`Mesh::service`]): each command
/// returns once it is done, as `mesh restart|stop|start` do.
pub struct Service<'a> {
    mesh: &'a Mesh,
    name: String,
}

enum Request {
    Command {
        cmd: &'static str,
        service: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Ps {
        reply: oneshot::Sender<Vec<Replica>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What the mesh's thread says once it started (or why not).
struct Started {
    test_addrs: BTreeMap<String, SocketAddr>,
    admin: Option<SocketAddr>,
}

// === impl Mesh ===

impl Mesh {
    /// A mesh of the `mesh.toml` at `path`. Relative paths in it are resolved against
    /// its directory, as `mesh up` does. A relative `path` is relative to the current
    /// directory, which `cargo test` sets to the package's root. Fails with
    /// [`Error::Config`] when the file is invalid; nothing is started yet.
    pub fn from_file(path: impl AsRef<Path>) -> Result<MeshBuilder, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let env = base_env(&text);
        let config = config::parse(&text, path, &env).map_err(|e| Error::Config(e.to_string()))?;
        Ok(MeshBuilder::new(config, env))
    }

    /// A mesh of `toml`, whose relative paths (`working_dir`, `env_file`, …) are resolved
    /// against `base_dir`. Without `[mesh] name`, the mesh is named after `base_dir`.
    ///
    /// ```no_run
    /// # fn test() -> Result<(), mesh::Error> {
    /// let dir = std::env::temp_dir();
    /// let toml = r#"
    ///     version = 1
    ///     [services.cache]
    ///     command = "redis-server --port ${PORT}"
    ///     protocol = "tcp"
    /// "#;
    /// let mesh = mesh::Mesh::from_toml(toml, &dir)?.start_blocking()?;
    /// let addr = mesh.addr("cache"); // 127.0.0.1:<ephemeral>, through the test ingress
    /// # let _ = addr;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_toml(toml: &str, base_dir: impl AsRef<Path>) -> Result<MeshBuilder, Error> {
        let env = base_env(toml);
        let path = base_dir.as_ref().join(config::FILE_NAME);
        let config = config::parse(toml, &path, &env).map_err(|e| Error::Config(e.to_string()))?;
        Ok(MeshBuilder::new(config, env))
    }

    fn running(&self) -> &Running {
        match &self.inner {
            Some(running) => running,
            // `inner` is taken only by `shutdown` and `Drop`, which consume the mesh.
            None => unreachable!("a Mesh is running until shut down"),
        }
    }

    /// The URL of `service`'s test ingress (`http://127.0.0.1:PORT`). Panics for an
    /// unknown service or a tcp one (use [`Mesh::addr`]).
    pub fn url(&self, service: &str) -> String {
        let running = self.running();
        match running.protocols.get(service) {
            None => panic!("no service `{service}` in this mesh"),
            Some(Protocol::Tcp) => panic!("`{service}` is a tcp service: use addr()"),
            Some(_) => format!("http://{}", self.addr(service)),
        }
    }

    /// The address of `service`'s test ingress (every service, tcp included). Panics
    /// for an unknown service.
    pub fn addr(&self, service: &str) -> SocketAddr {
        match self.running().test_addrs.get(service) {
            Some(addr) => *addr,
            None => panic!("no service `{service}` runs in this mesh"),
        }
    }

    /// The admin server's URL (`/metrics`, `/api/status`, the dashboard), unless
    /// `[mesh] admin = "off"`.
    pub fn admin_url(&self) -> Option<String> {
        self.running().admin.map(|a| format!("http://{a}/"))
    }

    /// A service, to restart, stop or start. Panics in none of these: an unknown
    /// service is an [`Error::Command`] of the command.
    ///
    /// ```no_run
    /// # async fn test() -> Result<(), mesh::Error> {
    /// let mesh = mesh::Mesh::from_file("mesh.toml")?.start().await?;
    /// mesh.service("store").stop().await?;
    /// // Calls to the store now wait for it up to its `queue_timeout` (3 s by default),
    /// // then get `503` with `x-mesh-error: no-endpoints`.
    /// mesh.service("store").start().await?; // ready again when it returns
    /// mesh.service("api").restart().await?; // one replica at a time, each new one ready first
    /// # Ok(())
    /// # }
    /// ```
    pub fn service(&self, name: &str) -> Service<'_> {
        Service {
            mesh: self,
            name: name.to_string(),
        }
    }

    /// Every replica, as `mesh ps --json` shows them.
    ///
    /// ```no_run
    /// # async fn test() -> Result<(), mesh::Error> {
    /// let mesh = mesh::Mesh::from_file("mesh.toml")?.start().await?;
    /// let rows = mesh.ps().await;
    /// assert!(rows.iter().all(|r| r.health == "ready" || r.state == "completed"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ps(&self) -> Vec<Replica> {
        let (reply, answer) = oneshot::channel();
        let _ = self.running().commands.send(Request::Ps { reply });
        answer.await.unwrap_or_default()
    }

    /// What `service` printed so far (every replica, in time order), as
    /// `<RFC 3339 time> <stream> <line>`. Read from its log files in the private
    /// state directory: nothing of it reaches the test's output.
    ///
    /// ```no_run
    /// # fn test() -> Result<(), mesh::Error> {
    /// let mesh = mesh::Mesh::from_file("mesh.toml")?.start_blocking()?;
    /// assert!(mesh.logs("api").iter().any(|l| l.contains("listening on")));
    /// # Ok(())
    /// # }
    /// ```
    pub fn logs(&self, service: &str) -> Vec<String> {
        let dir = self.running().state_dir.join("logs");
        let mut lines: Vec<String> = (0..)
            .map_while(|replica| {
                let path = logs::log_file(&dir, service, replica);
                path.exists().then(|| {
                    logs::read_tail_raw(&dir, service, replica, usize::MAX).unwrap_or_default()
                })
            })
            .flatten()
            .collect();
        // Each line starts with its time: sorting merges the replicas in order.
        lines.sort();
        lines
    }

    /// Stop everything in order (as Ctrl-C on `mesh up`), and wait until it is done:
    /// what `drop` does, without blocking the runtime's thread meanwhile. Always `Ok`.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let Some(mut running) = self.inner.take() else {
            return Ok(());
        };
        let (reply, done) = oneshot::channel();
        let _ = running.commands.send(Request::Shutdown { reply });
        let _ = done.await;
        if let Some(thread) = running.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&running.state_dir);
        Ok(())
    }
}

impl Drop for Mesh {
    /// Stops everything synchronously; needs no runtime. After it returns, no process
    /// of the mesh is alive.
    fn drop(&mut self) {
        let Some(mut running) = self.inner.take() else {
            return;
        };
        let (reply, _done) = oneshot::channel();
        let _ = running.commands.send(Request::Shutdown { reply });
        if let Some(thread) = running.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&running.state_dir);
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

// === impl Service ===

impl Service<'_> {
    /// Replace its replicas one at a time, each new one ready before the old one stops
    /// (as `mesh restart`).
    pub async fn restart(&self) -> Result<(), Error> {
        self.command("restart").await
    }

    /// Stop its processes; it stays stopped until [`Service::start`].
    pub async fn stop(&self) -> Result<(), Error> {
        self.command("stop").await
    }

    /// Start it again; returns once it is ready.
    pub async fn start(&self) -> Result<(), Error> {
        self.command("start").await
    }

    async fn command(&self, cmd: &'static str) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        let _ = self.mesh.running().commands.send(Request::Command {
            cmd,
            service: self.name.clone(),
            reply,
        });
        match answer.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(why)) => Err(Error::Command(why)),
            Err(_) => Err(Error::Command("the mesh stopped".into())),
        }
    }
}

// === impl MeshBuilder ===

impl MeshBuilder {
    fn new(config: Config, env: BTreeMap<String, String>) -> Self {
        MeshBuilder {
            config,
            env,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            only: None,
        }
    }

    /// Set an environment variable of `service`'s processes (over its `env`). An
    /// unknown service is ignored; a variable mesh sets itself (`PORT`, `MESH_*`,
    /// `<UPSTREAM>_URL`) is set by mesh over this one.
    ///
    /// ```no_run
    /// # fn test() -> Result<(), mesh::Error> {
    /// // A database of this test's own, for the two services that open it.
    /// let db = std::env::temp_dir().join(format!("shop-{}.db", std::process::id()));
    /// let db = db.to_str().expect("a UTF-8 path");
    /// let mesh = mesh::Mesh::from_file("mesh.toml")?
    ///     .env("migrate", "STORE_DB", db)
    ///     .env("store", "STORE_DB", db)
    ///     .env("api", "LOG_LEVEL", "debug")
    ///     .start_blocking()?;
    /// # let _ = mesh;
    /// # Ok(())
    /// # }
    /// ```
    pub fn env(mut self, service: &str, key: &str, value: &str) -> Self {
        if let Some(svc) = self.config.services.get_mut(service) {
            svc.env.retain(|(k, _)| k != key);
            svc.env.push((key.to_string(), value.to_string()));
        }
        self
    }

    /// Run `n` replicas of `service` (an unknown service is ignored). With a fixed
    /// `port` the mesh runs it on an assigned one anyway, so any number works.
    pub fn replicas(mut self, service: &str, n: u32) -> Self {
        if let Some(svc) = self.config.services.get_mut(service) {
            svc.replicas = n;
        }
        self
    }

    /// How long [`MeshBuilder::start`] waits for readiness (default 60 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Start only these services and what they need (`depends_on`, `upstreams`), as
    /// `mesh up S…` does; the others get no process and no test ingress.
    pub fn services<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Start the mesh and return once every started service is ready; fails at once
    /// when a replica is `failed`, `exited` or `blocked`, or after the startup timeout.
    /// Works on any Tokio runtime.
    pub async fn start(self) -> Result<Mesh, Error> {
        let (running, started) = self.spawn()?;
        finish(running, started.await)
    }

    /// [`MeshBuilder::start`] for a test without a runtime (do not call it inside one:
    /// it blocks the thread until the mesh is ready). It needs no Tokio runtime.
    ///
    /// ```
    /// # fn main() -> Result<(), mesh::Error> {
    /// // A service without a port is ready while its process runs.
    /// let toml = "version = 1\n[services.worker]\ncommand = \"sleep 60\"\nport = \"none\"\n";
    /// let mesh = mesh::Mesh::from_toml(toml, std::env::temp_dir())?.start_blocking()?;
    /// drop(mesh); // `sleep` is gone when this returns
    /// # Ok(())
    /// # }
    /// ```
    pub fn start_blocking(self) -> Result<Mesh, Error> {
        let (running, started) = self.spawn()?;
        finish(running, started.blocking_recv())
    }

    /// Start the mesh's thread; its first answer says whether it is ready.
    #[allow(clippy::type_complexity, reason = "one private hand-off")]
    fn spawn(mut self) -> Result<(Running, oneshot::Receiver<Result<Started, Error>>), Error> {
        shim_hook::linked();
        let private = private_state_dir(&self.config)?;
        runtime::isolate(&mut self.config, private.clone());
        let protocols: BTreeMap<String, Protocol> = self
            .config
            .services
            .iter()
            .map(|(name, svc)| (name.clone(), svc.protocol))
            .collect();
        let (commands, requests) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = oneshot::channel();
        let state_dir = private.clone();
        let thread = std::thread::Builder::new()
            .name("mesh-fixture".into())
            .spawn(move || serve(self, state_dir, requests, started_tx))
            .map_err(|e| Error::Start(format!("cannot start the mesh's thread: {e}")))?;
        let running = Running {
            commands,
            thread: Some(thread),
            test_addrs: BTreeMap::new(),
            protocols,
            admin: None,
            state_dir: private,
        };
        Ok((running, started_rx))
    }
}

/// The mesh of `running`, once its thread said it is ready; else the error, with
/// everything stopped.
fn finish(
    mut running: Running,
    started: Result<Result<Started, Error>, oneshot::error::RecvError>,
) -> Result<Mesh, Error> {
    match started {
        Ok(Ok(started)) => {
            running.test_addrs = started.test_addrs;
            running.admin = started.admin;
            Ok(Mesh {
                inner: Some(running),
            })
        }
        Ok(Err(error)) => {
            drop(Mesh {
                inner: Some(running),
            });
            Err(error)
        }
        Err(_) => {
            drop(Mesh {
                inner: Some(running),
            });
            Err(Error::Start("the mesh's thread ended".into()))
        }
    }
}

/// The mesh's thread: start, say whether it is ready, then serve requests until shut
/// down.
fn serve(
    builder: MeshBuilder,
    state_dir: PathBuf,
    mut requests: mpsc::UnboundedReceiver<Request>,
    started: oneshot::Sender<Result<Started, Error>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(Error::Start(format!("cannot build a runtime: {e}"))));
            return;
        }
    };
    rt.block_on(async move {
        let state = match StateDir::acquire(&state_dir) {
            Ok(state) => state,
            Err(e) => {
                let _ = started.send(Err(Error::Start(e.to_string())));
                return;
            }
        };
        let logs = LogSink::new(LogOptions {
            writer: Box::new(std::io::sink()),
            logs_dir: Some(state.logs_dir()),
            ..LogOptions::default()
        });
        let admin = match builder.config.mesh.admin {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    let _ = started.send(Err(Error::Start(format!("admin: {e}"))));
                    return;
                }
            },
            None => None,
        };
        let name = builder.config.mesh.name.clone();
        let mesh = match Runtime::start_with(builder.config, builder.env, builder.only, logs, true)
            .await
        {
            Ok(mesh) => mesh,
            Err(e) => {
                let _ = started.send(Err(Error::Start(format!("{e:#}"))));
                return;
            }
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let admin_task = admin.map(|listener| {
            tokio::spawn(crate::admin::serve(
                listener,
                crate::admin::AdminState {
                    mesh_name: name,
                    metrics: mesh.metrics().clone(),
                    status: mesh.status(),
                    stopping: Arc::new(AtomicBool::new(false)),
                    warning: Arc::new(parking_lot::Mutex::new(None)),
                    runtime: mesh.clone(),
                    logs_dir: state.logs_dir(),
                },
            ))
        });
        let logs_dir = state.logs_dir();
        let verdict = match tokio::time::timeout(builder.startup_timeout, mesh.ready()).await {
            Ok(Ok(())) => Ok(Started {
                test_addrs: mesh.test_addrs(),
                admin: admin_addr,
            }),
            Ok(Err(_)) => Err(not_ready(&mesh, &logs_dir)),
            Err(_) => Err(timed_out(&mesh, &logs_dir, builder.startup_timeout)),
        };
        let failed = verdict.is_err();
        let _ = started.send(verdict);
        if !failed {
            while let Some(request) = requests.recv().await {
                match request {
                    Request::Command {
                        cmd,
                        service,
                        reply,
                    } => {
                        let mesh = mesh.clone();
                        tokio::spawn(async move {
                            let _ = reply.send(mesh.service_command(cmd, &service).await);
                        });
                    }
                    Request::Ps { reply } => {
                        // A fixture never joins other hosts: no remote rows.
                        let rows = crate::admin::status_json(
                            &mesh.status().borrow(),
                            mesh.metrics(),
                            &crate::runtime::RemoteStatus::default(),
                        );
                        let rows: Vec<Replica> = serde_json::from_str(&rows).unwrap_or_default();
                        let _ = reply.send(rows);
                    }
                    Request::Shutdown { reply } => {
                        mesh.shutdown(std::future::pending()).await;
                        if let Some(task) = admin_task {
                            task.abort();
                        }
                        drop(state);
                        let _ = reply.send(());
                        return;
                    }
                }
            }
        }
        mesh.shutdown(std::future::pending()).await;
        if let Some(task) = admin_task {
            task.abort();
        }
        drop(state);
    });
}

/// The first replica that failed, exited or is blocked, with its last lines.
fn not_ready(mesh: &Runtime, logs_dir: &Path) -> Error {
    let status = mesh.status();
    let all = status.borrow().clone();
    let bad = all.values().find(|r| {
        matches!(
            r.state,
            mesh_supervisor::lifecycle::State::Failed
                | mesh_supervisor::lifecycle::State::Exited
                | mesh_supervisor::lifecycle::State::Blocked
        )
    });
    match bad {
        Some(r) => Error::NotReady {
            service: r.service.clone(),
            replica: r.replica,
            state: r.state.to_string(),
            exit_code: r.exit_code,
            last_lines: last_lines(logs_dir, &r.service, r.replica),
        },
        None => Error::Start("not ready".into()),
    }
}

fn timed_out(mesh: &Runtime, logs_dir: &Path, timeout: Duration) -> Error {
    let status = mesh.status();
    let all = status.borrow().clone();
    let waiting: Vec<_> = all.values().filter(|r| !r.ready).collect();
    let (service, replica) = waiting
        .first()
        .map(|r| (r.service.clone(), r.replica))
        .unwrap_or_default();
    Error::Timeout {
        timeout,
        waiting: mesh.not_ready(),
        last_lines: last_lines(logs_dir, &service, replica),
        service,
    }
}

fn last_lines(logs_dir: &Path, service: &str, replica: u32) -> Vec<String> {
    logs::read_tail(logs_dir, service, replica, LAST_LINES).unwrap_or_default()
}

/// A fresh private state directory, inside the system's temporary directory.
fn private_state_dir(config: &Config) -> Result<PathBuf, Error> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    // Short: the control socket's path must fit in 108 bytes.
    let dir = std::env::temp_dir().join(format!(
        "mesh-{}-{}-{n}",
        config.mesh.name.chars().take(16).collect::<String>(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(dir)
}

/// The environment the applications start from: of the test process's environment only
/// what the configuration names (`${NAME}` anywhere in it), and `PATH`, so that commands
/// are found as in a shell. Nothing else of the test process leaks into the mesh.
fn base_env(text: &str) -> BTreeMap<String, String> {
    let mut wanted: std::collections::BTreeSet<String> = ["PATH".to_string()].into();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        rest = &rest[at + 2..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            wanted.insert(name);
        }
    }
    wanted
        .into_iter()
        .filter_map(|name| std::env::var(&name).ok().map(|value| (name, value)))
        .collect()
}
