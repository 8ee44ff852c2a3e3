//! Running a whole configuration: one task per replica, dependency gates, status, and the
//! ordered shutdown of SPEC §4.
//!
//! Each replica is an actor ([`ReplicaTask`]) that owns its process, its health checker
//! and its [`Lifecycle`]; it publishes its [`ReplicaStatus`] into one shared watch
//! channel. Dependency gates read that channel: a waiting replica re-evaluates its
//! `depends_on` conditions whenever any status changes, so no one polls.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, info_span, warn};

use crate::config::{Condition, Config, PortSpec, RestartPolicy, Service};
use crate::health::{self, CheckerKind, HealthEvent, Probe, Schedule};
use crate::lifecycle::{Action, Event, Lifecycle, State};
use crate::logs::LogSink;
use crate::process::{self, Child, ExitReport, Output, SpawnSpec};

/// What a supervisor is started with.
pub struct Options {
    pub config: Config,
    /// `mesh`'s own environment, the base of every application's environment.
    pub base_env: BTreeMap<String, String>,
    pub logs: LogSink,
    /// The services to run, in start order (see [`selected`]).
    pub services: Vec<String>,
    /// Each replica's application port (see [`allocate_ports`]).
    pub ports: Ports,
    /// For each (caller, upstream), the address the caller is given as
    /// `<UPSTREAM>_ADDR`: the caller's outbound listener for that upstream.
    pub upstream_addrs: BTreeMap<(String, String), SocketAddr>,
    /// Told when a replica's application port changes (see [`PortSwitch`]).
    pub on_switch: PortSwitch,
}

/// Each replica's application port (`None` for `port = "none"`), by (service, replica).
pub type Ports = BTreeMap<(String, u32), Option<u16>>;

/// What the owner of the sidecars does around each service's stop (SPEC §4 Signals).
pub trait ShutdownHooks {
    /// Before a service's processes are signalled: take its replicas out of discovery,
    /// stop its inbounds accepting and let them drain.
    fn before_stop(&self, service: &str) -> impl Future<Output = ()> + Send;
    /// After every process of the service has exited: close its outbounds.
    fn after_stop(&self, service: &str) -> impl Future<Output = ()> + Send;
}

/// Hooks that do nothing, for a supervisor without sidecars.
pub struct NoHooks;

impl ShutdownHooks for NoHooks {
    async fn before_stop(&self, _service: &str) {}
    async fn after_stop(&self, _service: &str) {}
}

/// The status of one replica, as `mesh ps` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaStatus {
    pub service: String,
    pub replica: u32,
    pub state: State,
    /// `ready`, `unready` or `none`.
    pub health: &'static str,
    /// Whether it counts as ready for dependents (ready, or completed).
    pub ready: bool,
    /// Whether it was ever spawned (for `depends_on = "started"`).
    pub spawned: bool,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub restarts: u32,
    pub port: Option<u16>,
    /// When the current process started.
    pub since: Option<Instant>,
    /// Why the replica is not ready, once `ready_timeout` passed without it being ready
    /// (the last check's result); `None` when ready or still within the time.
    pub reason: Option<String>,
    /// The last rolling replacement of this replica, when it failed (the line mesh
    /// logged); cleared by the next one that succeeds.
    pub rollout_failed: Option<String>,
}

/// How long an ended process's output may take to be relayed before its end is reported.
const RELAY_DRAIN: Duration = Duration::from_secs(2);

/// Every replica's status, by (service, replica).
pub type Statuses = BTreeMap<(String, u32), ReplicaStatus>;

/// How `run` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every replica completed (one-shot jobs only).
    AllCompleted,
    /// No replica is active any more, and not every one completed.
    SomeFailed,
}

/// A running set of services. Cheap to clone: clones are handles on the same services,
/// so that a command (`mesh restart`, a reload) can run while the mesh goes on.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    logs: LogSink,
    status: watch::Receiver<Statuses>,
    controls: Mutex<BTreeMap<(String, u32), mpsc::UnboundedSender<Control>>>,
    tasks: Mutex<JoinSet<()>>,
    /// Services started, in start order.
    order: Mutex<Vec<String>>,
    /// Services stopped with `mesh stop`: they stay stopped across reloads until
    /// `mesh start` (SPEC §4).
    held: Mutex<std::collections::BTreeSet<String>>,
}

/// A command to a replica task.
#[derive(Debug)]
enum Control {
    Stop,
    /// SIGKILL the process group now (the end of a grace period).
    Kill,
    /// Start a replica that does not run (`mesh start`; clears `failed`); answered once
    /// it is ready, or with why not.
    Start {
        reply: Reply,
    },
    /// Replace the process with one of `service`'s configuration, one ready before the
    /// old one stops (SPEC §2, §4); answered once the new one serves, or with why not
    /// (the old one then keeps serving).
    Replace {
        service: Box<Service>,
        reply: Reply,
    },
    /// New settings that apply without a new process (restart policy, health, stop
    /// signal and timeout, …).
    Update {
        service: Box<Service>,
    },
}

/// Where a replica answers a command that takes time.
type Reply = oneshot::Sender<Result<(), String>>;

/// Called when a replica's application port changes (a rolling replacement moved it to
/// a fresh port, or a fixed port changed): the owner of the sidecars points the
/// replica's inbound at it, before the old process is told to stop.
pub type PortSwitch = Arc<dyn Fn(&str, u32, Option<u16>) + Send + Sync>;

/// Shared by every replica task of one supervisor.
struct Shared {
    /// The configuration in force (replaced by a reload).
    config: RwLock<Arc<Config>>,
    base_env: BTreeMap<String, String>,
    logs: LogSink,
    status: watch::Sender<Statuses>,
    /// `<UPSTREAM>_ADDR` by (caller, upstream).
    upstream_addrs: RwLock<BTreeMap<(String, String), SocketAddr>>,
    /// Every application port handed out so far (never handed out twice).
    taken: Mutex<std::collections::BTreeSet<u16>>,
    on_switch: PortSwitch,
    /// The services with a ready endpoint on another host (SPEC §9), as the owner of the
    /// sidecars learns them from etcd: what `depends_on` waits for on a service this
    /// supervisor runs no replica of.
    remote_ready: watch::Sender<std::collections::BTreeSet<String>>,
}

// === impl Supervisor ===

impl Supervisor {
    /// Start every selected replica's task. Replicas start as their `depends_on`
    /// conditions allow. Must be called within a Tokio runtime.
    pub fn start(opts: Options) -> Supervisor {
        let config = Arc::new(opts.config);
        let order = opts.services;
        let ports = opts.ports;

        let initial = Statuses::new();
        let (status_tx, status_rx) = watch::channel(initial);
        let mut taken: std::collections::BTreeSet<u16> = config
            .services
            .values()
            .filter_map(|s| match s.port {
                PortSpec::Fixed(p) => Some(p),
                _ => None,
            })
            .collect();
        taken.extend(ports.values().flatten());
        let shared = Arc::new(Shared {
            config: RwLock::new(config.clone()),
            base_env: opts.base_env,
            logs: opts.logs.clone(),
            status: status_tx,
            upstream_addrs: RwLock::new(opts.upstream_addrs),
            taken: Mutex::new(taken),
            on_switch: opts.on_switch,
            remote_ready: watch::Sender::new(std::collections::BTreeSet::new()),
        });
        let supervisor = Supervisor {
            inner: Arc::new(Inner {
                shared,
                logs: opts.logs,
                status: status_rx,
                controls: Mutex::new(BTreeMap::new()),
                tasks: Mutex::new(JoinSet::new()),
                order: Mutex::new(order),
                held: Mutex::default(),
            }),
        };
        for ((service, replica), port) in ports {
            let svc = config.services[&service].clone();
            supervisor.spawn_replica(svc, replica, port);
        }
        supervisor
    }

    /// Start the task of one replica (at start, or when a reload adds it).
    fn spawn_replica(&self, svc: Service, replica: u32, port: Option<u16>) {
        let service = svc.name.clone();
        let shared = &self.inner.shared;
        shared.status.send_modify(|all| {
            all.insert(
                (service.clone(), replica),
                ReplicaStatus {
                    service: service.clone(),
                    replica,
                    state: State::Waiting,
                    health: "none",
                    ready: false,
                    spawned: false,
                    pid: None,
                    exit_code: None,
                    restarts: 0,
                    port,
                    since: None,
                    reason: None,
                    rollout_failed: None,
                },
            );
        });
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .controls
            .lock()
            .insert((service.clone(), replica), tx);
        let lifecycle = Lifecycle::new(svc.restart, svc.backoff, svc.start_limit);
        let task = ReplicaTask {
            label: format!("{service}.{replica}"),
            service: svc,
            replica,
            port,
            shared: shared.clone(),
            lifecycle,
            controls: rx,
            child: None,
            checker: None,
            timer: None,
            kill_at: None,
            pending: None,
            relay: None,
            rng: XorShift::seeded(&service, replica),
            candidate: None,
            retiring: None,
            waiter: None,
            fallback: None,
            last_check: health::LastCheck::default(),
            explain_at: None,
            reason: None,
            rollout_failed: None,
        };
        let span = info_span!("replica", service = %service, replica);
        self.inner.tasks.lock().spawn(task.run().instrument(span));
    }

    /// Tell which services have a ready endpoint on another host (SPEC §9): a replica
    /// waiting on `depends_on` a service of other hosts starts once it has one.
    pub fn set_remote_ready(&self, services: std::collections::BTreeSet<String>) {
        self.inner.shared.remote_ready.send_if_modified(|current| {
            let changed = *current != services;
            *current = services;
            changed
        });
    }

    /// A receiver of every status change.
    pub fn status(&self) -> watch::Receiver<Statuses> {
        self.inner.status.clone()
    }

    /// The configuration being run.
    pub fn config(&self) -> Arc<Config> {
        self.inner.shared.config.read().clone()
    }

    /// Wait until no replica is active any more (SPEC §3: `mesh up` then exits). A
    /// service stopped with `mesh stop` keeps the mesh running, so that `mesh start` can
    /// start it again.
    pub async fn finished(&self) -> Outcome {
        let mut rx = self.inner.status.clone();
        let held = &self.inner.held;
        let done = rx
            .wait_for(|all| held.lock().is_empty() && all.values().all(|r| !r.state.is_active()))
            .await
            .map(|all| all.values().all(|r| r.state == State::Completed));
        match done {
            Ok(true) => Outcome::AllCompleted,
            _ => Outcome::SomeFailed,
        }
    }

    /// Wait until every started service is ready (each replica ready or completed).
    /// Returns the first service that is `failed`, `exited` or `blocked` instead.
    pub async fn ready(&self) -> Result<(), String> {
        let mut rx = self.inner.status.clone();
        let mut verdict = Ok(());
        let _ = rx
            .wait_for(|all| {
                if let Some(bad) = all
                    .values()
                    .find(|r| matches!(r.state, State::Failed | State::Exited | State::Blocked))
                {
                    verdict = Err(format!("{}.{} is {}", bad.service, bad.replica, bad.state));
                    return true;
                }
                all.values().all(|r| r.ready)
            })
            .await;
        verdict
    }

    /// The replicas of `service` (their indices), in order.
    fn replicas_of(&self, service: &str) -> Vec<(u32, mpsc::UnboundedSender<Control>)> {
        self.inner
            .controls
            .lock()
            .iter()
            .filter(|((s, _), _)| s == service)
            .map(|((_, i), tx)| (*i, tx.clone()))
            .collect()
    }

    /// Whether `service` is run by this supervisor.
    pub fn runs(&self, service: &str) -> bool {
        !self.replicas_of(service).is_empty()
    }

    /// `mesh stop SERVICE`: stop its processes (each leaves discovery first) and keep it
    /// stopped, across reloads too, until `mesh start`. Returns once every process of
    /// the service has exited.
    pub async fn stop_service(&self, service: &str) -> Result<(), String> {
        let replicas = self.replicas_of(service);
        if replicas.is_empty() {
            return Err(format!("no service `{service}` runs in this mesh"));
        }
        self.inner.held.lock().insert(service.to_string());
        for (_, tx) in &replicas {
            let _ = tx.send(Control::Stop);
        }
        let mut rx = self.inner.status.clone();
        let _ = rx
            .wait_for(|all| {
                all.values()
                    .filter(|r| r.service == service)
                    .all(|r| !r.state.has_process())
            })
            .await;
        Ok(())
    }

    /// `mesh start SERVICE`: start the replicas that do not run (clearing `failed`), and
    /// return once each is ready, or with the first reason one is not.
    pub async fn start_service(&self, service: &str) -> Result<(), String> {
        let replicas = self.replicas_of(service);
        if replicas.is_empty() {
            return Err(format!("no service `{service}` runs in this mesh"));
        }
        self.inner.held.lock().remove(service);
        let mut waits = Vec::new();
        for (_, tx) in &replicas {
            let (reply, answer) = oneshot::channel();
            let _ = tx.send(Control::Start { reply });
            waits.push(answer);
        }
        for answer in waits {
            answer
                .await
                .unwrap_or_else(|_| Err("the mesh is stopping".into()))?;
        }
        Ok(())
    }

    /// `mesh restart SERVICE` (and a watched change): replace its replicas one at a time
    /// with processes of its current configuration, each new one ready before the old
    /// one stops. A stopped service is started instead. Returns the first failure (that
    /// replica kept its running process; later ones were not touched).
    pub async fn restart_service(&self, service: &str) -> Result<(), String> {
        if self.inner.held.lock().contains(service) {
            return self.start_service(service).await;
        }
        let config = self.config();
        let Some(svc) = config.services.get(service) else {
            return Err(format!("no service `{service}` in the configuration"));
        };
        self.replace_service(svc).await
    }

    /// Replace every replica of `svc.name` with one of configuration `svc`, one at a
    /// time (a reload's change of the service, a restart).
    pub async fn replace_service(&self, svc: &Service) -> Result<(), String> {
        let replicas = self.replicas_of(&svc.name);
        if replicas.is_empty() {
            return Err(format!("no service `{}` runs in this mesh", svc.name));
        }
        for (_, tx) in replicas {
            let (reply, answer) = oneshot::channel();
            let _ = tx.send(Control::Replace {
                service: Box::new(svc.clone()),
                reply,
            });
            answer
                .await
                .unwrap_or_else(|_| Err("the mesh is stopping".into()))?;
        }
        Ok(())
    }

    /// Give `svc`'s replicas settings that apply without a new process.
    pub fn update_service(&self, svc: &Service) {
        for (_, tx) in self.replicas_of(&svc.name) {
            let _ = tx.send(Control::Update {
                service: Box::new(svc.clone()),
            });
        }
    }

    /// Make `config` the configuration in force: what later starts and environments
    /// are built from. (The reload's plan says what to do with running replicas.)
    pub fn set_config(
        &self,
        config: Config,
        upstream_addrs: BTreeMap<(String, String), SocketAddr>,
    ) {
        *self.inner.shared.config.write() = Arc::new(config);
        *self.inner.shared.upstream_addrs.write() = upstream_addrs;
    }

    /// Start new replicas `from..to` of `service` (a reload raised `replicas`, or added
    /// the service), with their ports. Returns the ports handed out.
    pub fn add_replicas(&self, svc: &Service, indices: std::ops::Range<u32>, ports: &Ports) {
        if !self.inner.order.lock().contains(&svc.name) {
            self.inner.order.lock().push(svc.name.clone());
        }
        for i in indices {
            let port = ports.get(&(svc.name.clone(), i)).copied().flatten();
            if let Some(p) = port {
                self.inner.shared.taken.lock().insert(p);
            }
            self.spawn_replica(svc.clone(), i, port);
        }
    }

    /// Stop replicas `indices` of `service` and forget them (a reload lowered `replicas`
    /// or removed the service). Returns once their processes have exited.
    pub async fn remove_replicas(&self, service: &str, indices: std::ops::Range<u32>) {
        let keys: Vec<(String, u32)> = indices.map(|i| (service.to_string(), i)).collect();
        let senders: Vec<_> = {
            let mut controls = self.inner.controls.lock();
            keys.iter().filter_map(|k| controls.remove(k)).collect()
        };
        for tx in &senders {
            let _ = tx.send(Control::Stop);
        }
        // Dropping the senders ends each task once its process is gone.
        drop(senders);
        let mut rx = self.inner.status.clone();
        let _ = rx
            .wait_for(|all| {
                keys.iter()
                    .all(|k| all.get(k).is_none_or(|r| !r.state.has_process()))
            })
            .await;
        self.inner.shared.status.send_modify(|all| {
            for k in &keys {
                all.remove(k);
            }
        });
        if !self.inner.controls.lock().keys().any(|(s, _)| s == service) {
            self.inner.order.lock().retain(|s| s != service);
        }
    }

    /// Ports for new replicas of `svc` (indices `indices`), as [`allocate_ports`] picks
    /// them, never one handed out before.
    pub fn allocate(&self, svc: &Service, indices: std::ops::Range<u32>) -> std::io::Result<Ports> {
        let mut ports = Ports::new();
        let mut taken = self.inner.shared.taken.lock();
        for i in indices {
            let port = match svc.port {
                PortSpec::None => None,
                PortSpec::Fixed(p) => Some(p),
                PortSpec::Assigned => {
                    let p = free_port(&taken)?;
                    taken.insert(p);
                    Some(p)
                }
            };
            ports.insert((svc.name.clone(), i), port);
        }
        Ok(ports)
    }

    /// The environment and working directory replica `replica` of `service` is started
    /// with now (for `mesh exec`).
    pub fn app_env(
        &self,
        service: &str,
        replica: u32,
    ) -> Result<(Vec<(String, String)>, std::path::PathBuf), String> {
        let config = self.config();
        let svc = config
            .services
            .get(service)
            .ok_or_else(|| format!("no service `{service}` in the configuration"))?;
        let port = self
            .inner
            .status
            .borrow()
            .get(&(service.to_string(), replica))
            .and_then(|r| r.port);
        let env = app_env_of(&self.inner.shared, svc, replica, port)?;
        Ok((env, svc.working_dir.clone()))
    }

    /// Stop everything in reverse start order (SPEC §4 Signals), bounded by
    /// `shutdown_timeout`; after it, or when `force` resolves (a second SIGINT), every
    /// remaining process group is SIGKILLed at once.
    pub async fn shutdown(self, force: impl Future<Output = ()>, hooks: &impl ShutdownHooks) {
        let config = self.config();
        let deadline = Instant::now() + config.mesh.shutdown_timeout;
        let order = self.inner.order.lock().clone();
        let graceful = async {
            for service in order.iter().rev() {
                let keys: Vec<_> = self
                    .replicas_of(service)
                    .into_iter()
                    .map(|(i, tx)| ((service.clone(), i), tx))
                    .collect();
                hooks.before_stop(service).await;
                for (_, tx) in &keys {
                    let _ = tx.send(Control::Stop);
                }
                let mut rx = self.inner.status.clone();
                let _ = rx
                    .wait_for(|all| {
                        keys.iter()
                            .all(|(k, _)| all.get(k).is_none_or(|r| !r.state.has_process()))
                    })
                    .await;
                hooks.after_stop(service).await;
            }
        };
        tokio::select! {
            _ = graceful => {}
            _ = sleep_until(deadline) => {
                self.inner.logs.mesh_line("shutdown_timeout reached: killing what is left");
            }
            _ = force => {
                self.inner.logs.mesh_line("killing every process now");
            }
        }
        let controls = std::mem::take(&mut *self.inner.controls.lock());
        for tx in controls.values() {
            let _ = tx.send(Control::Kill);
            let _ = tx.send(Control::Stop);
        }
        // Closing the control channels ends the tasks once their processes are gone.
        drop(controls);
        let mut tasks = std::mem::take(&mut *self.inner.tasks.lock());
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                warn!(error = %e, "replica task failed");
            }
        }
        debug!("supervisor shutdown complete");
    }
}

/// The services to run, in start order: all, or `only` and what they reach through
/// `depends_on`, `upstreams` and route backends.
pub fn selected(config: &Config, only: Option<&[String]>) -> Vec<String> {
    let Some(only) = only else {
        return config.start_order.clone();
    };
    let mut keep: Vec<String> = Vec::new();
    let mut stack: Vec<String> = only.to_vec();
    while let Some(name) = stack.pop() {
        if keep.contains(&name) {
            continue;
        }
        if let Some(svc) = config.services.get(&name) {
            stack.extend(svc.depends_on.keys().cloned());
            stack.extend(svc.upstreams.iter().cloned());
            // SPEC §3 Routes: mesh starts a service's route backends with it.
            stack.extend(
                svc.routes
                    .iter()
                    .flat_map(|r| r.backends.iter().map(|(b, _)| b.clone())),
            );
        }
        keep.push(name);
    }
    config
        .start_order
        .iter()
        .filter(|s| keep.contains(s))
        .cloned()
        .collect()
}

/// Pick each replica's application port once: a replica keeps it for the life of the
/// supervisor, across restarts.
pub fn allocate_ports(config: &Config, services: &[String]) -> std::io::Result<Ports> {
    let mut ports = Ports::new();
    // Fixed ports, and every port handed out, are never handed out again.
    let mut taken: std::collections::BTreeSet<u16> = config
        .services
        .values()
        .filter_map(|s| match s.port {
            PortSpec::Fixed(p) => Some(p),
            _ => None,
        })
        .collect();
    for name in services {
        let svc = &config.services[name];
        for i in 0..svc.replicas {
            let port = match svc.port {
                PortSpec::None => None,
                PortSpec::Fixed(p) => Some(p),
                PortSpec::Assigned => {
                    let p = free_port(&taken)?;
                    taken.insert(p);
                    Some(p)
                }
            };
            ports.insert((name.clone(), i), port);
        }
    }
    Ok(ports)
}

/// A free loopback port for an application, outside the kernel's ephemeral range.
///
/// The port is released again for the application to bind. A port from the ephemeral
/// range (what binding port 0 gives) can be taken in that window by any outgoing
/// connection on the machine — the sidecars' own among them — and the application would
/// then crash-loop on "address in use". Ports below the range are only taken by explicit
/// binds, so the window is harmless in practice. Falls back to port 0 when no port below
/// the range is free.
fn free_port(taken: &std::collections::BTreeSet<u16>) -> std::io::Result<u16> {
    let (low, _) = ephemeral_range();
    // Stay above the well-known and registered ports that other daemons commonly use.
    let floor: u16 = 10_000;
    if low > floor + 100 {
        let span = u32::from(low - floor);
        let mut rng = XorShift::seeded("port", std::process::id());
        for _ in 0..64 {
            let port = floor + (rng.next() % u64::from(span)) as u16;
            if taken.contains(&port) {
                continue;
            }
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                return Ok(listener.local_addr()?.port());
            }
        }
    }
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}

/// The kernel's ephemeral port range (Linux defaults when it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A xorshift generator: backoff jitter and port picking need spread, not quality.
struct XorShift(u64);

impl XorShift {
    /// Seeded from a name, a number and the time, so that replicas and runs differ.
    fn seeded(name: &str, n: u32) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes().chain(n.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // Never zero: xorshift would stay at zero forever.
        XorShift((h ^ now) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A sample in [-1, 1].
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// The gate of a waiting replica: whether its `depends_on` conditions hold.
#[derive(Debug, PartialEq, Eq)]
enum Gate {
    Open,
    Wait,
    Blocked,
}

/// `remote_ready` holds the services with a ready endpoint on another host: a target this
/// supervisor runs no replica of (a service of other hosts, SPEC §9) holds any condition
/// validation lets through (`started`, `healthy`) once it has one.
fn gate(
    service: &Service,
    all: &Statuses,
    remote_ready: &std::collections::BTreeSet<String>,
) -> Gate {
    let mut open = true;
    for (target, cond) in &service.depends_on {
        let replicas: Vec<_> = all.values().filter(|r| &r.service == target).collect();
        if replicas.is_empty() && remote_ready.contains(target) {
            continue;
        }
        if replicas
            .iter()
            .any(|r| matches!(r.state, State::Failed | State::Exited))
        {
            return Gate::Blocked;
        }
        let holds = !replicas.is_empty()
            && match cond {
                Condition::Started => replicas.iter().all(|r| r.spawned),
                Condition::Healthy => replicas.iter().all(|r| r.ready),
                Condition::Completed => replicas.iter().all(|r| r.state == State::Completed),
            };
        open &= holds;
    }
    if open { Gate::Open } else { Gate::Wait }
}

/// The actor owning one replica.
struct ReplicaTask {
    label: String,
    service: Service,
    replica: u32,
    port: Option<u16>,
    shared: Arc<Shared>,
    lifecycle: Lifecycle,
    controls: mpsc::UnboundedReceiver<Control>,
    child: Option<Child>,
    checker: Option<(tokio::task::JoinHandle<()>, mpsc::Receiver<HealthEvent>)>,
    /// When to deliver [`Event::Timer`].
    timer: Option<Instant>,
    /// When to SIGKILL a process that was sent its stop signal.
    kill_at: Option<Instant>,
    /// An event produced while carrying out an action (a failed spawn), handled next.
    pending: Option<Event>,
    /// The task relaying the current process's output.
    relay: Option<tokio::task::JoinHandle<()>>,
    rng: XorShift,
    /// The new process of a rolling replacement, until it is ready (or given up).
    candidate: Option<Candidate>,
    /// The old process of a replacement, stopping after the new one took over.
    retiring: Option<Retiring>,
    /// Answered once the replica is ready (or with why not): `mesh start`, a restart
    /// that could not overlap (a fixed port, or no process running).
    waiter: Option<(Reply, Instant)>,
    /// With a fixed port the old process stops before the new one starts: the
    /// configuration to start again if the new one fails (SPEC §4).
    fallback: Option<Service>,
    /// The result of the current process's last readiness check.
    last_check: health::LastCheck,
    /// When to explain once why the current process is not ready yet (`ready_timeout`
    /// after its start).
    explain_at: Option<Instant>,
    /// Why it is not ready, once explained (for `mesh ps`).
    reason: Option<String>,
    /// The last replacement's failure, until one succeeds.
    rollout_failed: Option<String>,
}

/// A replacement process that is not serving yet.
struct Candidate {
    child: Child,
    checker: Option<(tokio::task::JoinHandle<()>, mpsc::Receiver<HealthEvent>)>,
    relay: Option<tokio::task::JoinHandle<()>>,
    service: Service,
    port: Option<u16>,
    /// `ready_timeout` from its start.
    deadline: Instant,
    reply: Reply,
    last_check: health::LastCheck,
}

/// A process being stopped after its replacement took over.
struct Retiring {
    child: Child,
    relay: Option<tokio::task::JoinHandle<()>>,
    kill_at: Instant,
}

// === impl ReplicaTask ===

impl ReplicaTask {
    async fn run(mut self) {
        let mut status = self.shared.status.subscribe();
        let mut remote_ready = self.shared.remote_ready.subscribe();
        self.publish(None);
        let mut closed = false;
        loop {
            if let Some(event) = self.pending.take() {
                self.handle(event).await;
                continue;
            }
            let gating = matches!(self.lifecycle.state(), State::Waiting | State::Blocked);
            if gating {
                let verdict = gate(
                    &self.service,
                    &status.borrow_and_update(),
                    &remote_ready.borrow_and_update(),
                );
                let event = match (verdict, self.lifecycle.state()) {
                    (Gate::Open, _) => Some(Event::Start),
                    (Gate::Blocked, State::Waiting) => Some(Event::Block),
                    (Gate::Wait, State::Blocked) => Some(Event::Unblock),
                    _ => None,
                };
                if let Some(event) = event {
                    self.handle(event).await;
                    continue;
                }
            }
            if closed && self.child.is_none() && self.candidate.is_none() && self.retiring.is_none()
            {
                break;
            }
            let candidate_deadline = self.candidate.as_ref().map(|c| c.deadline);
            let retire_at = self.retiring.as_ref().map(|r| r.kill_at);
            let waiter_at = self.waiter.as_ref().map(|(_, at)| *at);
            let explain_at = self.explain_at;
            tokio::select! {
                ctl = self.controls.recv(), if !closed => match ctl {
                    Some(Control::Stop) => {
                        self.drop_candidate("the replica is stopping");
                        self.answer_waiter(Err(format!("{} was stopped", self.label)));
                        self.handle(Event::Stop).await;
                    }
                    Some(Control::Start { reply }) => self.start(reply).await,
                    Some(Control::Replace { service, reply }) => self.replace(*service, reply).await,
                    Some(Control::Update { service }) => self.update(*service),
                    Some(Control::Kill) => {
                        if let Some(child) = &self.child {
                            child.kill_group();
                        }
                    }
                    None => {
                        closed = true;
                        self.timer = None;
                        self.drop_candidate("the replica is stopping");
                        if let Some(child) = &self.child {
                            child.kill_group();
                        }
                        if let Some(old) = &self.retiring {
                            old.child.kill_group();
                        }
                    }
                },
                event = candidate_event(&mut self.candidate) => match event {
                    CandidateEvent::Exited(report) => {
                        let code = report.code();
                        self.candidate_failed(format!("replacement exited with code {code} before it was ready"));
                    }
                    CandidateEvent::Health(Some(HealthEvent::Ready)) => self.promote().await,
                    CandidateEvent::Health(Some(HealthEvent::Unready { .. })) => {}
                    CandidateEvent::Health(None) => {
                        if let Some(c) = &mut self.candidate {
                            c.checker = None;
                        }
                    }
                },
                _ = sleep_until_opt(candidate_deadline) => {
                    let (limit, why) = self
                        .candidate
                        .as_ref()
                        .map(|c| (c.service.ready_timeout, last_check_text(&c.last_check)))
                        .unwrap_or_default();
                    self.candidate_failed(format!(
                        "replacement not ready after {} (last check: {why})",
                        humantime::format_duration(limit)
                    ));
                }
                _ = wait_retiring(&mut self.retiring) => {
                    if let Some(old) = self.retiring.take() {
                        if let Some(relay) = old.relay {
                            let _ = tokio::time::timeout(RELAY_DRAIN, relay).await;
                        }
                    }
                    debug!("the replaced process exited");
                }
                _ = sleep_until_opt(retire_at) => {
                    if let Some(old) = &mut self.retiring {
                        self.shared.logs.mesh_line(&format!(
                            "{}: the replaced process did not stop within {}: sending SIGKILL",
                            self.label,
                            humantime::format_duration(self.service.stop_timeout)
                        ));
                        old.child.kill_group();
                        old.kill_at = Instant::now() + Duration::from_secs(3600);
                    }
                }
                _ = sleep_until_opt(waiter_at) => {
                    self.waiter_timed_out().await;
                }
                _ = sleep_until_opt(explain_at) => {
                    self.explain_at = None;
                    self.explain();
                }
                report = wait_child(&mut self.child) => {
                    self.child = None;
                    // Print the process's last lines before anything reports its end (and
                    // before `mesh up` may exit). The shim has killed every holder of the
                    // pipes by now, so end of file is near; the bound is a safety net.
                    if let Some(relay) = self.relay.take() {
                        let _ = tokio::time::timeout(RELAY_DRAIN, relay).await;
                    }
                    self.stop_checker();
                    self.kill_at = None;
                    self.exited(report).await;
                }
                event = recv_health(&mut self.checker) => match event {
                    Some(HealthEvent::Ready) => self.handle(Event::Ready).await,
                    Some(HealthEvent::Unready { reason }) => {
                        let restart = self.service.health.as_ref().is_some_and(|h| h.restart_on_unhealthy);
                        self.mesh_line(&format!("{} is unready: {reason}", self.label));
                        let event = if restart { Event::Unhealthy } else { Event::Unready };
                        self.handle(event).await;
                    }
                    None => self.checker = None,
                },
                _ = sleep_until_opt(self.timer) => {
                    self.timer = None;
                    self.handle(Event::Timer).await;
                }
                _ = sleep_until_opt(self.kill_at) => {
                    self.kill_at = None;
                    if let Some(child) = &self.child {
                        self.mesh_line(&format!(
                            "{} did not stop within {}: sending SIGKILL",
                            self.label,
                            humantime::format_duration(self.service.stop_timeout)
                        ));
                        child.kill_group();
                    }
                }
                _ = status.changed(), if gating => {}
                _ = remote_ready.changed(), if gating => {}
            }
        }
        self.publish(None);
    }

    async fn exited(&mut self, report: ExitReport) {
        let code = report.code();
        match &report {
            ExitReport::SpawnFailed(msg) => self.mesh_line(&format!("{}: {msg}", self.label)),
            // A job that exits 0 and is not restarted is `completed` (SPEC §3).
            ExitReport::Code(0)
                if self.lifecycle.state() != State::Stopping
                    && self.service.restart != RestartPolicy::Always =>
            {
                self.mesh_line(&format!("{} completed", self.label))
            }
            ExitReport::Code(c) if self.lifecycle.state() != State::Stopping => {
                self.mesh_line(&format!("{} exited with code {c}", self.label))
            }
            ExitReport::Signal(s) if self.lifecycle.state() != State::Stopping => {
                let name = Signal::try_from(*s).map(|s| s.as_str()).unwrap_or("?");
                self.mesh_line(&format!("{} was killed by signal {s} ({name})", self.label))
            }
            _ => {}
        }
        self.handle(Event::Exited(code)).await;
    }

    /// Feed an event to the lifecycle and carry out the action.
    async fn handle(&mut self, event: Event) {
        let before = self.lifecycle.state();
        let was_failing = self.lifecycle.is_crash_looping();
        let jitter = self.jitter();
        let action = self.lifecycle.on(event, Instant::now(), jitter);
        match action {
            Action::None => {}
            Action::Spawn => {
                self.timer = None;
                self.spawn().await;
            }
            Action::Stop => {
                if let Some(child) = &self.child {
                    child.signal_group(self.service.stop_signal);
                    self.kill_at = Some(Instant::now() + self.service.stop_timeout);
                }
            }
            Action::Schedule(delay) => {
                self.timer = Some(Instant::now() + delay);
                let after = self.lifecycle.state();
                if after == State::Failed && was_failing {
                    self.mesh_line(&format!(
                        "{} is still failing; next try in {}",
                        self.label,
                        humantime::format_duration(delay)
                    ));
                } else if after == State::Failed {
                    self.mesh_line(&format!(
                        "{} failed: started {} times within {}; retrying every {}",
                        self.label,
                        self.service.start_limit.burst,
                        humantime::format_duration(self.service.start_limit.interval),
                        humantime::format_duration(delay),
                    ));
                } else if after == State::Backoff {
                    self.mesh_line(&format!(
                        "{} restarting in {}",
                        self.label,
                        humantime::format_duration(round_ms(delay))
                    ));
                }
            }
        }
        if self.lifecycle.state() != before || !matches!(action, Action::None) {
            debug!(from = %before, to = %self.lifecycle.state(), ?event, "transition");
        }
        self.publish(self.child.as_ref().and_then(Child::pid));
        self.check_waiter(before, event);
    }

    /// Answer the waiter once the replica is ready, or once the process it waits for
    /// ended; with a fixed-port replacement that failed, start the previous
    /// configuration again.
    fn check_waiter(&mut self, before: State, event: Event) {
        if self.waiter.is_none() {
            return;
        }
        if self.lifecycle.is_ready() {
            if self.fallback.take().is_some() {
                self.rollout_failed = None;
            }
            self.answer_waiter(Ok(()));
            return;
        }
        let Event::Exited(code) = event else {
            return;
        };
        if !matches!(before, State::Starting | State::Running) {
            // The old process of a fixed-port restart: the new one starts now.
            return;
        }
        let why = format!("exited with code {code} before it was ready");
        match self.fallback.take() {
            Some(previous) => {
                let line = format!(
                    "{}: replacement {why}; started the previous configuration again",
                    self.label
                );
                self.mesh_line(&line);
                self.rollout_failed = Some(line.clone());
                self.restore(previous);
                self.answer_waiter(Err(line));
            }
            None => self.answer_waiter(Err(format!("{} {why}", self.label))),
        }
    }

    /// Go back to `previous` (a fixed-port replacement failed): start it at once.
    fn restore(&mut self, previous: Service) {
        self.lifecycle
            .set_policy(previous.restart, previous.backoff, previous.start_limit);
        if let PortSpec::Fixed(p) = previous.port {
            if self.port != Some(p) {
                self.port = Some(p);
                (self.shared.on_switch)(&self.service.name, self.replica, self.port);
            }
        }
        self.service = previous;
        self.timer = None;
        self.pending = Some(Event::Restart);
    }

    /// `ready_timeout` passed since the process started and it is not ready: say why,
    /// once (SPEC §4). It is not stopped for it.
    fn explain(&mut self) {
        if self.lifecycle.is_ready() || self.child.is_none() {
            return;
        }
        let why = format!(
            "not ready after {} (last check: {})",
            humantime::format_duration(self.service.ready_timeout),
            last_check_text(&self.last_check)
        );
        self.mesh_line(&format!("{} is {why}", self.label));
        self.reason = Some(why);
        self.publish(self.child.as_ref().and_then(Child::pid));
    }

    fn answer_waiter(&mut self, result: Result<(), String>) {
        if let Some((reply, _)) = self.waiter.take() {
            let _ = reply.send(result);
        }
    }

    /// `ready_timeout` passed while a start or restart waited for readiness.
    async fn waiter_timed_out(&mut self) {
        let limit = humantime::format_duration(self.service.ready_timeout);
        match self.fallback.take() {
            Some(previous) => {
                let line = format!(
                    "{}: replacement not ready after {limit} (last check: {}); started the previous configuration again",
                    self.label,
                    last_check_text(&self.last_check)
                );
                self.mesh_line(&line);
                self.rollout_failed = Some(line.clone());
                self.answer_waiter(Err(line));
                self.lifecycle
                    .set_policy(previous.restart, previous.backoff, previous.start_limit);
                self.service = previous;
                // Stop the new process; the previous configuration starts once it exited.
                self.handle(Event::Restart).await;
            }
            None => {
                // At first start a replica that is slow to be ready is not stopped.
                let line = format!(
                    "{} is not ready after {limit} (last check: {})",
                    self.label,
                    last_check_text(&self.last_check)
                );
                self.answer_waiter(Err(line));
            }
        }
    }

    /// `mesh start`: start the replica if no process runs (clearing `failed`).
    async fn start(&mut self, reply: Reply) {
        self.answer_waiter(Err(format!(
            "{}: superseded by another command",
            self.label
        )));
        match self.lifecycle.state() {
            State::Starting | State::Running | State::Stopping if self.lifecycle.is_ready() => {
                let _ = reply.send(Ok(()));
            }
            State::Waiting | State::Blocked => {
                // It starts once its dependencies allow.
                let _ = reply.send(Ok(()));
            }
            State::Starting | State::Running | State::Stopping => {
                self.waiter = Some((reply, Instant::now() + self.service.ready_timeout));
            }
            _ => {
                self.waiter = Some((reply, Instant::now() + self.service.ready_timeout));
                self.handle(Event::Restart).await;
            }
        }
    }

    /// New settings without a new process.
    fn update(&mut self, service: Service) {
        self.lifecycle
            .set_policy(service.restart, service.backoff, service.start_limit);
        let health_changed = self.service.health != service.health;
        let port = self.port;
        self.service = Service {
            port: self.service.port,
            ..service
        };
        if health_changed && self.child.is_some() {
            // The new checks apply to the running process; its readiness stands until
            // they say otherwise.
            self.stop_checker();
            if let Ok(spec) = self.spawn_spec_for(&self.service, port) {
                if let Some(kind) = self.checker_for(&self.service, port, &spec) {
                    let (tx, rx) = mpsc::channel(4);
                    self.checker = Some((
                        health::spawn_checker_with(kind, tx, self.last_check.clone()),
                        rx,
                    ));
                }
            }
        }
    }

    /// A rolling replacement with `new` (SPEC §2, §4): a new process on a fresh port,
    /// moved to once ready, then the old one stops. With a fixed port the old one stops
    /// first. Without a process, the new configuration is used at the next start.
    async fn replace(&mut self, new: Service, reply: Reply) {
        self.drop_candidate("superseded by a newer replacement");
        self.answer_waiter(Err(format!(
            "{}: superseded by a newer replacement",
            self.label
        )));
        self.lifecycle
            .set_policy(new.restart, new.backoff, new.start_limit);
        let state = self.lifecycle.state();
        if !state.has_process() || state == State::Stopping {
            self.service = new;
            match state {
                // Stopped on request, or not started yet: stays so, with the new settings.
                State::Stopped | State::Waiting | State::Blocked | State::Stopping => {
                    let _ = reply.send(Ok(()));
                }
                _ => {
                    self.waiter = Some((reply, Instant::now() + self.service.ready_timeout));
                    self.handle(Event::Restart).await;
                }
            }
            return;
        }
        let fixed = matches!(new.port, PortSpec::Fixed(_))
            || matches!(self.service.port, PortSpec::Fixed(_));
        if fixed {
            let previous = std::mem::replace(&mut self.service, new);
            if let PortSpec::Fixed(p) = self.service.port {
                if self.port != Some(p) {
                    self.port = Some(p);
                    (self.shared.on_switch)(&self.service.name, self.replica, self.port);
                }
            }
            self.fallback = Some(previous);
            self.waiter = Some((
                reply,
                Instant::now() + self.service.ready_timeout + self.service.stop_timeout,
            ));
            self.handle(Event::Restart).await;
            return;
        }
        let port = match new.port {
            PortSpec::Assigned => {
                let mut taken = self.shared.taken.lock();
                match free_port(&taken) {
                    Ok(p) => {
                        taken.insert(p);
                        Some(p)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("{}: no free port: {e}", self.label)));
                        return;
                    }
                }
            }
            _ => None,
        };
        let started = match self.spawn_spec_for(&new, port) {
            Ok(spec) => process::spawn(&spec, Output::Piped)
                .await
                .map(|child| (spec, child))
                .map_err(|e| e.to_string()),
            Err(msg) => Err(msg),
        };
        let (spec, mut child) = match started {
            Ok(started) => started,
            Err(why) => {
                let line = format!(
                    "{}: replacement cannot start: {why}; kept the running replica",
                    self.label
                );
                self.mesh_line(&line);
                let _ = reply.send(Err(line));
                return;
            }
        };
        let relay = match (child.take_stdout(), child.take_stderr()) {
            (Some(out), Some(err)) => {
                Some(self.shared.logs.attach(&new.name, self.replica, out, err))
            }
            _ => None,
        };
        let last_check = health::LastCheck::default();
        let checker = match self.checker_for(&new, port, &spec) {
            Some(kind) => {
                let (tx, rx) = mpsc::channel(4);
                Some((health::spawn_checker_with(kind, tx, last_check.clone()), rx))
            }
            None => None,
        };
        let ready_now = new.port == PortSpec::None && new.health.is_none();
        let deadline = Instant::now() + new.ready_timeout;
        self.candidate = Some(Candidate {
            child,
            checker,
            relay,
            service: new,
            port,
            deadline,
            reply,
            last_check,
        });
        if ready_now {
            // Nothing to check: ready while the process runs (SPEC §3).
            self.promote().await;
        }
    }

    /// The replacement is ready: the inbound moves to it, then the old process stops.
    async fn promote(&mut self) {
        let Some(candidate) = self.candidate.take() else {
            return;
        };
        let old_pid = self.child.as_ref().and_then(Child::pid);
        let old_stop = (self.service.stop_signal, self.service.stop_timeout);
        self.stop_checker();
        let old_child = self.child.replace(candidate.child);
        let old_relay = std::mem::replace(&mut self.relay, candidate.relay);
        self.checker = candidate.checker;
        self.service = candidate.service;
        if self.port != candidate.port {
            self.port = candidate.port;
            (self.shared.on_switch)(&self.service.name, self.replica, self.port);
        }
        if let Some(old) = self.retiring.take() {
            old.child.kill_group();
        }
        if let Some(old) = old_child {
            old.signal_group(old_stop.0);
            self.retiring = Some(Retiring {
                child: old,
                relay: old_relay,
                kill_at: Instant::now() + old_stop.1,
            });
        }
        self.last_check = candidate.last_check;
        self.explain_at = None;
        self.reason = None;
        self.rollout_failed = None;
        self.lifecycle.on(Event::Replaced, Instant::now(), 0.0);
        let new_pid = self.child.as_ref().and_then(Child::pid);
        self.publish(new_pid);
        self.mesh_line(&format!(
            "{} replaced: pid {} serves on port {}; pid {} stopping",
            self.label,
            new_pid.map_or("?".into(), |p| p.to_string()),
            self.port.map_or("none".into(), |p| p.to_string()),
            old_pid.map_or("?".into(), |p| p.to_string()),
        ));
        let _ = candidate.reply.send(Ok(()));
    }

    /// The replacement failed: stop it, keep the running process (SPEC §4).
    fn candidate_failed(&mut self, why: String) {
        let Some(candidate) = self.candidate.take() else {
            return;
        };
        candidate.child.kill_group();
        if let Some((handle, _)) = candidate.checker {
            handle.abort();
        }
        let line = format!("{}: {why}; kept the running replica", self.label);
        self.mesh_line(&line);
        self.rollout_failed = Some(line.clone());
        self.publish(self.child.as_ref().and_then(Child::pid));
        let _ = candidate.reply.send(Err(line));
    }

    /// Give up a replacement in progress (a newer command, or the replica stops).
    fn drop_candidate(&mut self, why: &str) {
        if let Some(candidate) = self.candidate.take() {
            candidate.child.kill_group();
            if let Some((handle, _)) = candidate.checker {
                handle.abort();
            }
            let _ = candidate
                .reply
                .send(Err(format!("{}: replacement given up: {why}", self.label)));
        }
    }

    /// Start the process and its health checker. Every failure to start becomes an exit
    /// with code 127 (SPEC §3) so that restart rules apply to it as to a crash.
    async fn spawn(&mut self) {
        let spec = match self.spawn_spec() {
            Ok(spec) => spec,
            Err(msg) => {
                self.pending_failure(msg);
                return;
            }
        };
        let mut child = match process::spawn(&spec, Output::Piped).await {
            Ok(child) => child,
            Err(e) => {
                self.pending_failure(format!("cannot start the shim: {e}"));
                return;
            }
        };
        if let (Some(out), Some(err)) = (child.take_stdout(), child.take_stderr()) {
            self.relay = Some(
                self.shared
                    .logs
                    .attach(&self.service.name, self.replica, out, err),
            );
        }
        self.last_check = health::LastCheck::default();
        if let Some(kind) = self.checker_kind(&spec) {
            let (tx, rx) = mpsc::channel(4);
            self.checker = Some((
                health::spawn_checker_with(kind, tx, self.last_check.clone()),
                rx,
            ));
        }
        self.reason = None;
        self.explain_at = Some(Instant::now() + self.service.ready_timeout);
        let ready_now = self.service.port == PortSpec::None && self.service.health.is_none();
        self.child = Some(child);
        if ready_now && self.child.as_ref().and_then(Child::pid).is_some() {
            // Nothing to check: ready while the process runs (SPEC §3).
            let action = self.lifecycle.on(Event::Ready, Instant::now(), 0.0);
            debug_assert_eq!(action, Action::None);
        }
    }

    /// Report a failure to start as an immediate exit with code 127, delivered through the
    /// normal path on the next turn of the loop.
    fn pending_failure(&mut self, msg: String) {
        self.child = None;
        self.mesh_line(&format!("{}: {msg}", self.label));
        self.pending = Some(Event::Exited(127));
    }

    fn spawn_spec(&self) -> Result<SpawnSpec, String> {
        self.spawn_spec_for(&self.service, self.port)
    }

    fn spawn_spec_for(&self, service: &Service, port: Option<u16>) -> Result<SpawnSpec, String> {
        let env = app_env_of(&self.shared, service, self.replica, port)?;
        let argv = crate::config::expand_words(&service.command, &env)?;
        let (uid, gid) = resolve_user(service.user.as_deref(), service.group.as_deref())?;
        Ok(SpawnSpec {
            argv,
            env,
            cwd: service.working_dir.clone(),
            uid,
            gid,
        })
    }

    fn checker_kind(&self, spec: &SpawnSpec) -> Option<CheckerKind> {
        self.checker_for(&self.service, self.port, spec)
    }

    fn checker_for(
        &self,
        service: &Service,
        port: Option<u16>,
        spec: &SpawnSpec,
    ) -> Option<CheckerKind> {
        let Some(h) = &service.health else {
            return port.map(|port| CheckerKind::PortOpen { port });
        };
        let probe = match &h.check {
            crate::config::HealthCheck::Tcp => Probe::Tcp { port: port? },
            crate::config::HealthCheck::Http(path) => {
                let path = crate::config::expand_words(std::slice::from_ref(path), &spec.env)
                    .ok()?
                    .pop()?;
                Probe::http(port?, path, service.protocol)
            }
            crate::config::HealthCheck::Exec(words) => {
                let argv = crate::config::expand_words(words, &spec.env).ok()?;
                Probe::Exec(SpawnSpec {
                    argv,
                    ..spec.clone()
                })
            }
        };
        Some(CheckerKind::Check {
            probe,
            schedule: Schedule::from(h),
        })
    }

    fn stop_checker(&mut self) {
        if let Some((handle, _)) = self.checker.take() {
            handle.abort();
        }
    }

    fn publish(&self, pid: Option<u32>) {
        let lc = &self.lifecycle;
        let key = (self.service.name.clone(), self.replica);
        self.shared.status.send_modify(|all| {
            if let Some(r) = all.get_mut(&key) {
                r.state = lc.state();
                r.health = lc.health();
                r.ready = lc.is_ready();
                r.spawned |= lc.started_at().is_some() || lc.state() == State::Completed;
                r.pid = pid.filter(|_| lc.state().has_process());
                r.exit_code = lc.exit_code();
                r.restarts = lc.restarts();
                r.since = lc.started_at();
                r.port = self.port;
                r.reason = if lc.is_ready() {
                    None
                } else {
                    self.reason.clone()
                };
                r.rollout_failed = self.rollout_failed.clone();
            }
        });
    }

    fn mesh_line(&self, line: &str) {
        self.shared.logs.mesh_line(line);
    }

    /// A jitter sample in [-1, 1].
    fn jitter(&mut self) -> f64 {
        self.rng.unit()
    }
}

/// The last check's result for a "why not ready" line.
fn last_check_text(last: &health::LastCheck) -> String {
    last.lock()
        .clone()
        .unwrap_or_else(|| "none finished yet".to_string())
}

/// The environment replica `replica` of `service` is started with on `port`.
fn app_env_of(
    shared: &Shared,
    service: &Service,
    replica: u32,
    port: Option<u16>,
) -> Result<Vec<(String, String)>, String> {
    let upstreams: BTreeMap<String, SocketAddr> = {
        let addrs = shared.upstream_addrs.read();
        service
            .upstreams
            .iter()
            .filter_map(|u| {
                let key = (service.name.clone(), u.clone());
                addrs.get(&key).map(|a| (u.clone(), *a))
            })
            .collect()
    };
    let config = shared.config.read().clone();
    service.app_env(&config, replica, port, &upstreams, &shared.base_env)
}

/// Resolve `user`/`group` to ids. Changing user needs root (SPEC §3).
fn resolve_user(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<(Option<u32>, Option<u32>), String> {
    use nix::unistd::{Group, Uid, User};
    if user.is_none() && group.is_none() {
        return Ok((None, None));
    }
    if !Uid::effective().is_root() {
        return Err("`user`/`group` need mesh to run as root".into());
    }
    let mut uid = None;
    let mut gid = None;
    if let Some(name) = user {
        let u = User::from_name(name)
            .map_err(|e| format!("cannot look up user `{name}`: {e}"))?
            .ok_or_else(|| format!("no such user `{name}`"))?;
        uid = Some(u.uid.as_raw());
        gid = Some(u.gid.as_raw());
    }
    if let Some(name) = group {
        let g = Group::from_name(name)
            .map_err(|e| format!("cannot look up group `{name}`: {e}"))?
            .ok_or_else(|| format!("no such group `{name}`"))?;
        gid = Some(g.gid.as_raw());
    }
    Ok((uid, gid))
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

async fn wait_child(child: &mut Option<Child>) -> ExitReport {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// What happened to a replacement process.
enum CandidateEvent {
    Exited(ExitReport),
    Health(Option<HealthEvent>),
}

async fn candidate_event(candidate: &mut Option<Candidate>) -> CandidateEvent {
    let Some(c) = candidate else {
        return std::future::pending().await;
    };
    let health = async {
        match c.checker.as_mut() {
            Some((_, rx)) => rx.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        report = c.child.wait() => CandidateEvent::Exited(report),
        event = health => CandidateEvent::Health(event),
    }
}

async fn wait_retiring(retiring: &mut Option<Retiring>) -> ExitReport {
    match retiring {
        Some(r) => r.child.wait().await,
        None => std::future::pending().await,
    }
}

async fn recv_health(
    checker: &mut Option<(tokio::task::JoinHandle<()>, mpsc::Receiver<HealthEvent>)>,
) -> Option<HealthEvent> {
    match checker {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dependency_on_a_service_of_other_hosts_opens_once_it_has_a_ready_endpoint() {
        let dir = std::env::temp_dir();
        let config = crate::config::parse(
            r#"
version = 1
[mesh]
name = "shop"
etcd = { endpoints = ["http://10.0.0.9:2379"] }
listen = "10.0.0.1"
[services.web]
command = "web"
depends_on = { api = "healthy" }
[services.api]
"#,
            &dir.join("mesh.toml"),
            &BTreeMap::new(),
        )
        .expect("valid");
        let web = &config.services["web"];
        let none = std::collections::BTreeSet::new();
        assert_eq!(gate(web, &Statuses::new(), &none), Gate::Wait);
        let api: std::collections::BTreeSet<String> = ["api".to_string()].into();
        assert_eq!(gate(web, &Statuses::new(), &api), Gate::Open);
    }

    #[test]
    fn assigned_ports_are_distinct_free_and_below_the_ephemeral_range() {
        let (low, _) = ephemeral_range();
        let mut taken = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let port = free_port(&taken).expect("a port");
            assert!(taken.insert(port), "port {port} handed out twice");
            if low > 10_100 {
                assert!((10_000..low).contains(&port), "{port} not below {low}");
            }
            // Free at the time it was handed out: it can be bound now.
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("free");
        }
    }
}
