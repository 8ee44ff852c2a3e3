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
use tokio::sync::{mpsc, watch};
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

/// A running set of services.
pub struct Supervisor {
    config: Arc<Config>,
    logs: LogSink,
    status: watch::Receiver<Statuses>,
    controls: BTreeMap<(String, u32), mpsc::UnboundedSender<Control>>,
    tasks: JoinSet<()>,
    /// Services started, in start order.
    order: Vec<String>,
}

/// A command to a replica task.
#[derive(Clone, Copy, Debug)]
enum Control {
    Stop,
    /// SIGKILL the process group now (the end of a grace period).
    Kill,
}

/// Shared by every replica task of one supervisor.
struct Shared {
    config: Arc<Config>,
    base_env: BTreeMap<String, String>,
    logs: LogSink,
    status: watch::Sender<Statuses>,
    /// `<UPSTREAM>_ADDR` by (caller, upstream).
    upstream_addrs: BTreeMap<(String, String), SocketAddr>,
}

// === impl Supervisor ===

impl Supervisor {
    /// Start every selected replica's task. Replicas start as their `depends_on`
    /// conditions allow. Must be called within a Tokio runtime.
    pub fn start(opts: Options) -> Supervisor {
        let config = Arc::new(opts.config);
        let order = opts.services;
        let ports = opts.ports;

        let mut initial = Statuses::new();
        for ((service, replica), port) in &ports {
            initial.insert(
                (service.clone(), *replica),
                ReplicaStatus {
                    service: service.clone(),
                    replica: *replica,
                    state: State::Waiting,
                    health: "none",
                    ready: false,
                    spawned: false,
                    pid: None,
                    exit_code: None,
                    restarts: 0,
                    port: *port,
                    since: None,
                },
            );
        }
        let (status_tx, status_rx) = watch::channel(initial);
        let shared = Arc::new(Shared {
            config: config.clone(),
            base_env: opts.base_env,
            logs: opts.logs.clone(),
            status: status_tx,
            upstream_addrs: opts.upstream_addrs,
        });

        let mut tasks = JoinSet::new();
        let mut controls = BTreeMap::new();
        for ((service, replica), port) in ports {
            let (tx, rx) = mpsc::unbounded_channel();
            controls.insert((service.clone(), replica), tx);
            let svc = config.services[&service].clone();
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
            };
            let span = info_span!("replica", service = %service, replica);
            tasks.spawn(task.run().instrument(span));
        }

        Supervisor {
            config,
            logs: opts.logs,
            status: status_rx,
            controls,
            tasks,
            order,
        }
    }

    /// A receiver of every status change.
    pub fn status(&self) -> watch::Receiver<Statuses> {
        self.status.clone()
    }

    /// The configuration being run.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Wait until no replica is active any more (SPEC §3: `mesh up` then exits).
    pub async fn finished(&self) -> Outcome {
        let mut rx = self.status.clone();
        let done = rx
            .wait_for(|all| all.values().all(|r| !r.state.is_active()))
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
        let mut rx = self.status.clone();
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

    /// Stop everything in reverse start order (SPEC §4 Signals), bounded by
    /// `shutdown_timeout`; after it, or when `force` resolves (a second SIGINT), every
    /// remaining process group is SIGKILLed at once.
    pub async fn shutdown(mut self, force: impl Future<Output = ()>, hooks: &impl ShutdownHooks) {
        let deadline = Instant::now() + self.config.mesh.shutdown_timeout;
        let graceful = async {
            for service in self.order.iter().rev() {
                let keys: Vec<_> = self
                    .controls
                    .keys()
                    .filter(|(s, _)| s == service)
                    .cloned()
                    .collect();
                hooks.before_stop(service).await;
                for key in &keys {
                    let _ = self.controls[key].send(Control::Stop);
                }
                let mut rx = self.status.clone();
                let _ = rx
                    .wait_for(|all| {
                        keys.iter()
                            .all(|k| all.get(k).is_none_or(|r| !r.state.has_process()))
                    })
                    .await;
                hooks.after_stop(service).await;
            }
        };
        tokio::select! {
            _ = graceful => {}
            _ = sleep_until(deadline) => {
                self.logs.mesh_line("shutdown_timeout reached: killing what is left");
            }
            _ = force => {
                self.logs.mesh_line("killing every process now");
            }
        }
        for tx in self.controls.values() {
            let _ = tx.send(Control::Kill);
            let _ = tx.send(Control::Stop);
        }
        // Closing the control channels ends the tasks once their processes are gone.
        self.controls.clear();
        while let Some(res) = self.tasks.join_next().await {
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

fn gate(service: &Service, all: &Statuses) -> Gate {
    let mut open = true;
    for (target, cond) in &service.depends_on {
        let replicas: Vec<_> = all.values().filter(|r| &r.service == target).collect();
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
}

// === impl ReplicaTask ===

impl ReplicaTask {
    async fn run(mut self) {
        let mut status = self.shared.status.subscribe();
        self.publish(None);
        let mut closed = false;
        loop {
            if let Some(event) = self.pending.take() {
                self.handle(event).await;
                continue;
            }
            let gating = matches!(self.lifecycle.state(), State::Waiting | State::Blocked);
            if gating {
                let verdict = gate(&self.service, &status.borrow_and_update());
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
            if closed && self.child.is_none() {
                break;
            }
            tokio::select! {
                ctl = self.controls.recv(), if !closed => match ctl {
                    Some(Control::Stop) => self.handle(Event::Stop).await,
                    Some(Control::Kill) => {
                        if let Some(child) = &self.child {
                            child.kill_group();
                        }
                    }
                    None => {
                        closed = true;
                        self.timer = None;
                        if let Some(child) = &self.child {
                            child.kill_group();
                        }
                    }
                },
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
        if let Some(kind) = self.checker_kind(&spec) {
            let (tx, rx) = mpsc::channel(4);
            self.checker = Some((health::spawn_checker(kind, tx), rx));
        }
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
        let upstreams: BTreeMap<String, SocketAddr> = self
            .service
            .upstreams
            .iter()
            .filter_map(|u| {
                let key = (self.service.name.clone(), u.clone());
                self.shared
                    .upstream_addrs
                    .get(&key)
                    .map(|a| (u.clone(), *a))
            })
            .collect();
        let env = self.service.app_env(
            &self.shared.config,
            self.replica,
            self.port,
            &upstreams,
            &self.shared.base_env,
        )?;
        let argv = crate::config::expand_words(&self.service.command, &env)?;
        let (uid, gid) = resolve_user(self.service.user.as_deref(), self.service.group.as_deref())?;
        Ok(SpawnSpec {
            argv,
            env,
            cwd: self.service.working_dir.clone(),
            uid,
            gid,
        })
    }

    fn checker_kind(&self, spec: &SpawnSpec) -> Option<CheckerKind> {
        let Some(h) = &self.service.health else {
            return self.port.map(|port| CheckerKind::PortOpen { port });
        };
        let probe = match &h.check {
            crate::config::HealthCheck::Tcp => Probe::Tcp { port: self.port? },
            crate::config::HealthCheck::Http(path) => {
                let path = crate::config::expand_words(std::slice::from_ref(path), &spec.env)
                    .ok()?
                    .pop()?;
                Probe::http(self.port?, path, self.service.protocol)
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
