//! Validated runtime configuration: what the rest of `mesh` sees of `mesh.toml`.
//!
//! Nothing outside `config` sees the raw serde types; `validate` turns them into these.
//! Values that are expanded per replica at each start (`command`, `env`, `env_file`
//! values, `health.http`, `health.exec`) are kept unexpanded here, as written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
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
    /// Every service name in start order: `depends_on` edges strictly, `upstreams` (and
    /// route backend) edges where they do not form a cycle, ties by name. Shutdown walks
    /// it backwards.
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
    /// Seed of the random draws of routes (weighted backends, faults): `MESH_SEED` in
    /// mesh's environment, else `[mesh] seed`; `None` draws from a random seed.
    pub seed: Option<u64>,
    /// `tls`: mutual TLS between sidecars, or plain (`"off"`).
    pub tls: TlsMode,
    /// `ca = { cert, key }`: the mesh CA's files (absolute paths); `None` keeps the CA in
    /// `state_dir`, created at the first start.
    pub ca: Option<CaFiles>,
    /// `local_path`: how a call between two sidecars of this process travels (SPEC §1
    /// "The local path").
    pub local_path: LocalPath,
    /// `access_log`: where one JSON line per request goes (SPEC §5).
    pub access_log: AccessLog,
    /// `listen`: where inbound listeners bind, and the address advertised to other hosts
    /// (SPEC §9); default 127.0.0.1.
    pub listen: std::net::IpAddr,
    /// `etcd`: the etcd this host registers its endpoints in and takes other hosts'
    /// from (SPEC §9); `None`: this host is alone.
    pub etcd: Option<Etcd>,
}

/// `[mesh] etcd = { endpoints, prefix, lease_ttl }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Etcd {
    /// The members' client URLs (`http://HOST[:PORT]`, port 2379 if left out), tried in
    /// turn.
    pub endpoints: Vec<String>,
    /// Where this mesh's keys live; default `/mesh/<name>`. Starts with `/`.
    pub prefix: String,
    /// The time to live of the lease this host's endpoints are held under: how long they
    /// outlive the host when it stops without a shutdown. Whole seconds, at least 1 s;
    /// default 10 s.
    pub lease_ttl: Duration,
}

impl MeshSettings {
    /// This host's name among the hosts of the mesh: the key segment its endpoints are
    /// registered under, and what other hosts' `mesh ps` shows. It is the `listen`
    /// address, the one address other hosts reach this host at and so the one name no
    /// two hosts of a working mesh can share (a machine's hostname can be: cloned images,
    /// containers); validation refuses an unspecified `listen` with `etcd`.
    pub fn host_id(&self) -> String {
        self.listen.to_string()
    }
}

/// `[mesh] access_log`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// No access log (the default).
    #[default]
    Off,
    /// mesh's standard output, beside the apps' lines.
    Stdout,
    /// A file (absolute, resolved against mesh.toml's directory), appended to.
    File(PathBuf),
}

/// `[mesh] local_path`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalPath {
    /// The outbound hands the request (or the tcp stream) to the inbound inside the
    /// process: no socket, no TLS (the default).
    #[default]
    InProcess,
    /// Every local call goes through the inbound's TLS listener, as a call from another
    /// host would.
    Tls,
}

impl LocalPath {
    /// The value as `mesh.toml` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalPath::InProcess => "in-process",
            LocalPath::Tls => "tls",
        }
    }
}

/// `[mesh] tls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Mutual TLS between sidecars, authorization enforced (the default).
    #[default]
    Mutual,
    /// Plain between sidecars, authorization not enforced (for debugging).
    Off,
}

/// `[mesh] ca = { cert, key }`, resolved against mesh.toml's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFiles {
    /// The CA certificate (PEM).
    pub cert: PathBuf,
    /// The CA's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// One `[services.NAME]` table.
///
/// A service declared without `command` runs on other hosts (SPEC §9, see
/// [`Service::is_remote`]): its `command` is empty and its `replicas` 0, so nothing is
/// started, bound or allocated for it here; only the keys that describe calls
/// (`protocol`, `expose`, `upstreams`, `allow`, `traffic`, `routes`) are set.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    /// Program and arguments, split like a shell but not yet `${}`-expanded. Empty for a
    /// service that runs on other hosts.
    pub command: Vec<String>,
    /// Absolute working directory.
    pub working_dir: PathBuf,
    /// `env` entries in file order, values not yet expanded.
    pub env: Vec<(String, String)>,
    /// Absolute path of the `env_file`, read again at each start.
    pub env_file: Option<PathBuf>,
    /// A digest of the variables the `env_file` set when this configuration was loaded
    /// (keys, values as written, and which are literal), so that a reload can tell that
    /// its contents changed under the same path (SPEC §4). Comments and layout do not
    /// count. `None` without an `env_file`. Only for comparing two configurations loaded
    /// by the same `mesh`: the file itself is read again at each start.
    pub env_file_digest: Option<u64>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// At least 1; 0 for a service that runs on other hosts.
    pub replicas: u32,
    pub protocol: Protocol,
    pub port: PortSpec,
    /// Upstream service names, in file order.
    pub upstreams: Vec<String>,
    /// `allow`: services admitted as callers besides those listing this one in their
    /// `upstreams`; with `[mesh] etcd` it may also hold `ingress`, which admits the
    /// ingresses of other hosts that expose the service (SPEC §9, docs/multi-host.md).
    pub allow: Vec<String>,
    pub depends_on: BTreeMap<String, Condition>,
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    pub start_limit: StartLimit,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// `watch` patterns as written (relative to `working_dir`), each valid for
    /// [`WatchPatterns::new`]. Empty: the service's files are not watched.
    pub watch: Vec<String>,
    /// How long a new replica has to become ready: in a replacement, the old replica is
    /// kept when the new one is not ready by then; at first start, mesh says why once
    /// (SPEC §4). Default [`default_ready_timeout`].
    pub ready_timeout: Duration,
    pub health: Option<Health>,
    /// `expose`: where the service's ingress listens (`PORT` means 127.0.0.1:PORT).
    pub expose: Option<std::net::SocketAddr>,
    /// `[services.NAME.traffic]`: how callers' sidecars call this service.
    pub traffic: Traffic,
    /// `[[services.NAME.routes]]`, in file order (first match wins).
    pub routes: Vec<Route>,
}

/// The default `ready_timeout` of a service: 60 s (SPEC §3).
pub fn default_ready_timeout() -> Duration {
    Duration::from_secs(60)
}

/// A service's `watch` patterns, compiled (SPEC §4 Watch): gitignore-style globs matched
/// against paths relative to the service's `working_dir`, as git matches `.gitignore`
/// lines. A pattern without a `/` (but a trailing one) matches at any depth (`*.py`); one
/// with a `/` is anchored at `working_dir` (`src/*.py`, `/app.py`); `**` crosses
/// directories, `*` does not; a trailing `/` matches directories only; a matched
/// directory matches everything below it; `!` excludes again, and the last pattern that
/// matches a path decides.
///
/// Validation compiles each pattern with this type, so a pattern that fails here is a
/// configuration error and the watcher never sees one.
#[derive(Clone, Debug)]
pub struct WatchPatterns {
    set: GlobSet,
    /// For each glob of `set`, the pattern it came from and whether that is a `!` one.
    globs: Vec<(usize, bool)>,
}

/// `[services.NAME.traffic]`, the parts built so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Traffic {
    pub load_balancer: LoadBalancer,
    /// How long a request waits for a ready endpoint (default 3 s).
    pub queue_timeout: Duration,
    /// `traffic.rate_limit`, applied by each replica's inbound.
    pub rate_limit: Option<RateLimit>,
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
            rate_limit: None,
            timeout: None,
            retries: None,
            circuit_breaker: None,
            max_concurrent: 10_000,
        }
    }
}

/// `traffic.rate_limit`: a token bucket in each replica's inbound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (finite, greater than 0).
    pub rps: f64,
    /// Tokens the bucket holds, and starts with (at least 1).
    pub burst: u32,
}

// `rps` is validated finite, so equality is reflexive.
impl Eq for RateLimit {}

/// One `[[services.NAME.routes]]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Matches whole path segments; stored without a trailing `/` (except `/` itself).
    pub path_prefix: Option<String>,
    /// Header conditions: names lowercased, values matched exactly.
    pub headers: Vec<(String, String)>,
    /// Backend services and their relative weights, in file order (not all zero).
    pub backends: Vec<(String, u32)>,
    /// Replaces the service's `traffic.timeout` for matched requests.
    pub timeout: Option<Duration>,
    pub fault: Option<Fault>,
}

/// `fault` of a route: injected by the caller's outbound (or ingress).
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<Duration>,
    /// Share of matched requests delayed, 0–100 (100 when only `delay` is given).
    pub delay_percent: f64,
    /// The status of an abort.
    pub abort: Option<u16>,
    /// Share of matched requests aborted, 0–100 (100 when only `abort` is given).
    pub abort_percent: f64,
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

// === impl Config ===

impl Config {
    /// The identity names (`<caller service>`, `ingress`) whose calls `service`'s
    /// inbounds admit: callers that list it in `upstreams`, those its `allow` names, the
    /// ingress when it is exposed, and (SPEC §3 Routes) every caller admitted that way to a service whose
    /// routes name `service` as a backend. Route admission is one step, not transitive:
    /// a backend's own routes are not applied to traffic that reached it by a route.
    pub fn admitted_callers(&self, service: &str) -> BTreeSet<String> {
        let mut admitted = self.direct_callers(service);
        for (name, svc) in &self.services {
            if name != service && svc.routes.iter().any(|r| r.routes_to(service)) {
                admitted.extend(self.direct_callers(name));
            }
        }
        admitted
    }

    /// Callers admitted to `service` itself, without routes.
    fn direct_callers(&self, service: &str) -> BTreeSet<String> {
        let mut callers: BTreeSet<String> = self
            .services
            .values()
            .filter(|s| s.upstreams.iter().any(|u| u == service))
            .map(|s| s.name.clone())
            .collect();
        if let Some(svc) = self.services.get(service) {
            callers.extend(svc.allow.iter().cloned());
            if svc.expose.is_some() {
                callers.insert("ingress".to_owned());
            }
        }
        callers
    }
}

// === impl WatchPatterns ===

impl WatchPatterns {
    /// Compile `patterns`; the error names the first one that is not a valid glob (the
    /// message is globset's, e.g. `unclosed character class; missing ']'`).
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut builder = GlobSetBuilder::new();
        let mut globs = Vec::new();
        for (index, pattern) in patterns.iter().enumerate() {
            let (negated, translated) = Self::translate(pattern)?;
            for glob in translated {
                let glob = GlobBuilder::new(&glob)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| e.kind().to_string())?;
                builder.add(glob);
                globs.push((index, negated));
            }
        }
        let set = builder.build().map_err(|e| e.kind().to_string())?;
        Ok(WatchPatterns { set, globs })
    }

    /// Whether a change of `path` (relative to `working_dir`) is watched.
    pub fn matches(&self, path: &Path) -> bool {
        let last = self
            .set
            .matches(path)
            .into_iter()
            .map(|i| self.globs[i])
            .max_by_key(|(pattern, _)| *pattern);
        matches!(last, Some((_, false)))
    }

    /// The globs of one pattern, per gitignore(5) (the translation the `ignore` crate
    /// makes of `.gitignore` lines), and whether it is a `!` pattern.
    fn translate(pattern: &str) -> Result<(bool, Vec<String>), String> {
        let (negated, rest) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let (anchored, rest) = match rest.strip_prefix('/') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let (dir_only, rest) = match rest.strip_suffix('/') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        if rest.is_empty() {
            return Err("the pattern matches nothing".into());
        }
        let glob = if anchored || rest.contains('/') || rest.starts_with("**") {
            rest.to_string()
        } else {
            format!("**/{rest}")
        };
        // A matched directory stands for everything below it; with a trailing `/` only
        // paths below it match, as a file of that name is not a directory.
        let below = if glob.ends_with("/**") {
            format!("{glob}/*")
        } else {
            format!("{glob}/**")
        };
        let globs = if dir_only {
            vec![below]
        } else {
            vec![glob, below]
        };
        Ok((negated, globs))
    }
}

// === impl Route ===

impl Route {
    /// Whether `service` is one of this route's backends (with any weight).
    pub fn routes_to(&self, service: &str) -> bool {
        self.backends.iter().any(|(b, _)| b == service)
    }
}

// === impl Service ===

impl Service {
    /// Whether the service runs on other hosts only (declared without `command`, which
    /// needs `[mesh] etcd`): this host starts nothing for it, has no inbound for it, and
    /// takes its endpoints from etcd.
    pub fn is_remote(&self) -> bool {
        self.command.is_empty()
    }

    /// The environment variable names an upstream maps to: `API_URL`, `API_ADDR`.
    pub fn upstream_var_stem(upstream: &str) -> String {
        upstream.to_ascii_uppercase().replace('-', "_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(patterns: &[&str]) -> WatchPatterns {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        WatchPatterns::new(&patterns).expect("valid patterns")
    }

    #[test]
    fn watch_patterns_match_like_gitignore_lines() {
        let py = watch(&["*.py"]);
        assert!(py.matches(Path::new("app.py")));
        assert!(py.matches(Path::new("a/b/app.py")), "any depth");
        assert!(!py.matches(Path::new("app.pyc")));

        let deep = watch(&["**/*.py"]);
        assert!(deep.matches(Path::new("app.py")));
        assert!(deep.matches(Path::new("pkg/mod/app.py")));

        let anchored = watch(&["src/*.rs", "/main.go"]);
        assert!(anchored.matches(Path::new("src/lib.rs")));
        assert!(
            !anchored.matches(Path::new("src/a/lib.rs")),
            "`*` stays in one directory"
        );
        assert!(
            !anchored.matches(Path::new("x/src/lib.rs")),
            "anchored at working_dir"
        );
        assert!(anchored.matches(Path::new("main.go")));
        assert!(!anchored.matches(Path::new("cmd/main.go")));

        let dir = watch(&["templates", "static/"]);
        assert!(
            dir.matches(Path::new("templates/index.html")),
            "below a matched directory"
        );
        assert!(dir.matches(Path::new("a/templates/x/y.html")));
        assert!(dir.matches(Path::new("static/app.js")));
        assert!(
            !dir.matches(Path::new("static")),
            "a file named like a directory pattern"
        );
    }

    #[test]
    fn the_last_matching_watch_pattern_decides() {
        let w = watch(&["**/*.py", "!tests/", "tests/conftest.py"]);
        assert!(w.matches(Path::new("app.py")));
        assert!(!w.matches(Path::new("tests/test_app.py")));
        assert!(w.matches(Path::new("tests/conftest.py")));
        assert!(!w.matches(Path::new("README.md")));
        assert!(!watch(&[]).matches(Path::new("app.py")));
    }

    #[test]
    fn invalid_watch_patterns_are_refused() {
        for bad in ["[abc", "src/{a,b", "!", "/"] {
            assert!(
                WatchPatterns::new(&[bad.to_string()]).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
