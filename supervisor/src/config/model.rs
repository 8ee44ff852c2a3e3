//! Validated runtime configuration: what the rest of `mesh` sees of `mesh.toml`.
//!
//! Nothing outside `config` sees the raw serde types; `validate` turns them into these.
//! Values that are expanded per replica at each start (`command`, `env`, `env_file`
//! values, `health.http`, `health.exec`) are kept unexpanded here, as written.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use nix::sys::signal::Signal;

/// A whole, valid `mesh.toml`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Absolute path of the file this came from.
    pub path: PathBuf,
    /// Absolute directory holding the file; relative paths are resolved against it.
    pub dir: PathBuf,
    pub mesh: MeshSettings,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Every service name in start order: `depends_on` edges strictly, `upstreams` edges
    /// where they do not form a cycle, ties by name. Shutdown walks it backwards.
    pub start_order: Vec<String>,
}

/// The `[mesh]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshSettings {
    /// Trust domain and `MESH_NAME`.
    pub name: String,
    /// Absolute path of the state directory.
    pub state_dir: PathBuf,
    /// Where the admin server listens (`/metrics`, `/ready`, …); `None` for "off".
    pub admin: Option<std::net::SocketAddr>,
    pub shutdown_timeout: Duration,
}

/// One `[services.NAME]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    /// Program and arguments, split like a shell but not yet `${}`-expanded.
    pub command: Vec<String>,
    /// Absolute working directory.
    pub working_dir: PathBuf,
    /// `env` entries in file order, values not yet expanded.
    pub env: Vec<(String, String)>,
    /// Absolute path of the `env_file`, read again at each start.
    pub env_file: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub replicas: u32,
    pub protocol: Protocol,
    pub port: PortSpec,
    /// Upstream service names, in file order.
    pub upstreams: Vec<String>,
    pub depends_on: BTreeMap<String, Condition>,
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    pub start_limit: StartLimit,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub health: Option<Health>,
    /// `expose`: where the service's ingress listens (`PORT` means 127.0.0.1:PORT).
    pub expose: Option<std::net::SocketAddr>,
    /// `[services.NAME.traffic]`: how callers' sidecars call this service.
    pub traffic: Traffic,
}

/// `[services.NAME.traffic]`, the parts built so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Traffic {
    pub load_balancer: LoadBalancer,
    /// How long a request waits for a ready endpoint (default 3 s).
    pub queue_timeout: Duration,
    /// From a request's arrival to its response headers (tcp: connection setup); none by
    /// default.
    pub timeout: Option<Duration>,
    /// `retries`; `None`: the default retry rule.
    pub retries: Option<Retries>,
    /// `circuit_breaker`; `None`: only connect failures eject.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Requests (tcp: connections) in flight per caller (default 10000).
    pub max_concurrent: u32,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            load_balancer: LoadBalancer::P2cEwma,
            queue_timeout: Duration::from_secs(3),
            timeout: None,
            retries: None,
            circuit_breaker: None,
            max_concurrent: 10_000,
        }
    }
}

/// `traffic.retries`.
#[derive(Clone, Debug, PartialEq)]
pub struct Retries {
    /// Total tries, the first included (default 3).
    pub attempts: u32,
    /// `None`: `timeout` bounds each try.
    pub per_try_timeout: Option<Duration>,
    /// Default `["gateway-error"]`.
    pub on: Vec<RetryOn>,
    /// Default 0.2.
    pub budget: f64,
}

/// A `traffic.retries.on` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    GatewayError,
    ServerError,
    Reset,
    Timeout,
    Status(u16),
    /// A `grpc-status` code (`grpc:<code-name>`).
    Grpc(u32),
}

/// `traffic.circuit_breaker`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Default 5.
    pub consecutive_failures: u32,
    /// Default 1 s.
    pub base_ejection: Duration,
    /// Default 60 s.
    pub max_ejection: Duration,
    /// Default 50.
    pub max_ejected_percent: u32,
}

/// `traffic.load_balancer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    P2cEwma,
    RoundRobin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// `port = 0`: a free loopback port is assigned once per replica.
    Assigned,
    /// A fixed port (only with `replicas = 1`).
    Fixed(u16),
    /// `port = "none"`: the service listens on nothing.
    None,
}

/// A `depends_on` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    Started,
    Healthy,
    Completed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartLimit {
    pub burst: u32,
    pub interval: Duration,
}

/// `[services.NAME.health]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: u32,
    pub start_period: Duration,
    pub restart_on_unhealthy: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HealthCheck {
    /// GET this path (not yet expanded) straight to the app; 200–399 passes.
    Http(String),
    /// A TCP connect to the app's port passes.
    Tcp,
    /// Run this command (words not yet expanded); exit 0 passes.
    Exec(Vec<String>),
}

// === impl Service ===

impl Service {
    /// The environment variable names an upstream maps to: `API_URL`, `API_ADDR`.
    pub fn upstream_var_stem(upstream: &str) -> String {
        upstream.to_ascii_uppercase().replace('-', "_")
    }
}
