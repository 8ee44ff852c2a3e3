//! A running mesh: the supervisor, and the sidecars wired to it.
//!
//! Every listener is bound here, before the process it serves starts, and kept while
//! that replica, caller or ingress exists, so that ports stay the same for the life of
//! the mesh: an inbound per replica, an outbound per (caller, upstream), an ingress per
//! `expose`. Discovery is fed from the supervisor's status: a replica is an endpoint
//! while its process runs and is ready.
//!
//! With `tls = "mutual"` (the default) every sidecar gets its identity here (`certs`):
//! the inbounds a leaf per replica, the outbounds a leaf per calling service, the
//! ingresses the `ingress` leaf; and each inbound the set of callers it admits.
//!
//! The settings a reload may change while processes keep running (who an inbound admits,
//! its rate limit, an outbound's traffic policy and routes, the app port an inbound
//! forwards to) are [`Live`] values the sidecars read per request or connection; a
//! reload (`reload.rs`) replaces them, binds and stops listeners for what was added or
//! removed, and asks the supervisor for rolling replacements.
//!
//! With `[mesh] etcd` (SPEC §9, `federation.rs`) inbounds listen on the `listen` address,
//! this host's ready endpoints are registered in etcd, and the other hosts' endpoints of
//! a service join its endpoint set while no endpoint of it is ready here. A service of
//! other hosts only (declared without `command`) gets nothing bound or started: callers'
//! outbounds and ingresses reach it through the endpoints etcd gives.

mod certs;
mod federation;
mod reload;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use mesh_proxy as proxy;
use mesh_supervisor::config::{self, Config, LoadBalancer, LocalPath, Protocol, TlsMode};
use mesh_supervisor::logs::LogSink;
use mesh_supervisor::supervisor::{self, Options, Outcome, ShutdownHooks, Statuses, Supervisor};
use parking_lot::Mutex;
use proxy::balance::{Algorithm, Balancer};
use proxy::discovery::{Endpoint, Local, Registry};
use proxy::live::Live;
use proxy::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) use federation::RemoteStatus;
pub(crate) use reload::ReloadOutcome;

/// The identity name of ingress listeners (SPEC §1).
const INGRESS: &str = "ingress";

/// Isolate `config` for `mesh run` and the fixture (SPEC §7): never joined to other
/// hosts (no etcd, inbounds on loopback), every `expose` and the
/// admin server on ephemeral loopback ports, fixed app ports assigned instead, and
/// `state_dir` the private directory given; so that several meshes of one file run side
/// by side.
pub(crate) fn isolate(config: &mut Config, state_dir: std::path::PathBuf) {
    let ephemeral = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.mesh.state_dir = state_dir;
    // A test run never joins the hosts of the file: it would register its replicas
    // where real callers would reach them. Services of other hosts have no endpoints.
    config.mesh.etcd = None;
    config.mesh.listen = std::net::IpAddr::from(Ipv4Addr::LOCALHOST);
    if config.mesh.admin.is_some() {
        config.mesh.admin = Some(ephemeral);
    }
    for svc in config.services.values_mut() {
        if svc.expose.is_some() {
            svc.expose = Some(ephemeral);
        }
        if matches!(svc.port, config::PortSpec::Fixed(_)) {
            svc.port = config::PortSpec::Assigned;
        }
    }
}

/// The identity name of the test ingresses of `mesh run` and the fixture (SPEC §1, §7),
/// which every inbound admits.
const TEST: &str = "test";

/// What `mesh up` prints on stderr when `tls = "off"`.
const TLS_OFF_WARNING: &str = "mesh: WARNING: tls = \"off\": traffic between sidecars is \
    plain text, unauthenticated, and authorization (`upstreams`, `allow`) is NOT enforced; \
    use it for debugging only";

pub(crate) use certs::CertsReport;

/// A running mesh. Cheap to clone: clones are handles on the same mesh, so that a
/// command (`mesh restart`, a reload) can run while the main loop waits for signals.
#[derive(Clone)]
pub(crate) struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    supervisor: Supervisor,
    sidecars: Arc<Sidecars>,
    /// The mesh CA and the identities issued; `None` with `tls = "off"`.
    certs: Option<Arc<certs::Certs>>,
    /// Registration in etcd and the other hosts' endpoints; `None` without `[mesh] etcd`.
    federation: Option<Arc<federation::Federation>>,
    /// `mesh`'s own environment: what a reload loads the file with.
    base_env: BTreeMap<String, String>,
    logs: LogSink,
    /// One reload or service command that changes the wiring at a time.
    changing: tokio::sync::Mutex<()>,
}

/// One running listener: cancel the token to stop it accepting; the task ends once its
/// in-flight work is done.
struct Server {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Every sidecar listener of the mesh, and the live settings they read.
struct Sidecars {
    registry: Registry,
    metrics: Metrics,
    wiring: Mutex<Wiring>,
    /// Services being stopped: kept out of discovery whatever their status says.
    draining: Mutex<BTreeSet<String>>,
    /// Tells `feed_discovery` that the set of inbounds changed.
    rewired: watch::Sender<()>,
    /// The other hosts' endpoints (SPEC §9), for what a draining service's callers are
    /// handed; `None` without `[mesh] etcd`.
    federation: Option<Arc<federation::Federation>>,
}

/// What is bound and running.
#[derive(Default)]
struct Wiring {
    inbounds: BTreeMap<(String, u32), Inbound>,
    /// Who each service's inbounds admit.
    admitted: BTreeMap<String, Live<BTreeSet<String>>>,
    /// Each service's rate limit, applied by its inbounds.
    rate_limits: BTreeMap<String, Live<Option<proxy::ratelimit::RateLimit>>>,
    /// Outbounds by (caller, upstream).
    outbounds: BTreeMap<(String, String), Outbound>,
    /// Ingresses by service.
    ingresses: BTreeMap<String, Outbound>,
    /// Test ingresses by service (`mesh run`, the fixture).
    test_ingresses: BTreeMap<String, Outbound>,
    /// The client identities of callers (services with upstreams, and `ingress`).
    callers_tls: BTreeMap<String, proxy::tls::ClientTls>,
}

/// A replica's inbound.
struct Inbound {
    server: Server,
    addr: SocketAddr,
    /// The app port it forwards to (moved by a rolling replacement).
    app: Live<SocketAddr>,
    /// The entry point outbounds of this process hand calls to, with `local_path =
    /// "in-process"` (SPEC §1 "The local path"); `None` sends them to `addr`.
    local: Option<Local>,
}

/// An outbound or an ingress, with the settings it serves with.
struct Outbound {
    server: Server,
    addr: SocketAddr,
    setup: Setup,
}

/// An outbound's settings, before they are served.
enum SetupValue {
    Http(proxy::outbound::OutboundSetup),
    Tcp((proxy::tcp::TcpOutboundConfig, Balancer)),
}

/// An outbound's replaceable settings.
#[derive(Clone)]
enum Setup {
    Http(Live<proxy::outbound::OutboundSetup>),
    Tcp(Live<(proxy::tcp::TcpOutboundConfig, Balancer)>),
}

// === impl Runtime ===

impl Runtime {
    /// Bind every listener, start the sidecars, then the supervisor. Fails (before any
    /// process starts) when a listener cannot be bound, e.g. an `expose` port in use.
    pub(crate) async fn start(
        config: Config,
        base_env: BTreeMap<String, String>,
        only: Option<Vec<String>>,
        logs: LogSink,
    ) -> anyhow::Result<Runtime> {
        Self::start_with(config, base_env, only, logs, false).await
    }

    /// [`Runtime::start`]; with `test_ingresses` (`mesh run`, the fixture) every service
    /// also gets an ingress on an ephemeral port presenting `spiffe://<name>/test`, which
    /// every inbound admits ([`Runtime::test_addrs`]).
    pub(crate) async fn start_with(
        config: Config,
        base_env: BTreeMap<String, String>,
        only: Option<Vec<String>>,
        logs: LogSink,
        test_ingresses: bool,
    ) -> anyhow::Result<Runtime> {
        let services = supervisor::selected(&config, only.as_deref());
        let ports = supervisor::allocate_ports(&config, &services)
            .context("cannot allocate application ports")?;
        let metrics = Metrics::new();
        match &config.mesh.access_log {
            config::AccessLog::Off => {}
            config::AccessLog::Stdout => {
                metrics.stats().set_access_log(Box::new(std::io::stdout()))
            }
            config::AccessLog::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open the access log {}", path.display()))?;
                metrics
                    .stats()
                    .set_access_log(Box::new(std::io::BufWriter::new(file)));
            }
        }
        let certs = match config.mesh.tls {
            TlsMode::Mutual => Some(Arc::new(certs::Certs::load(&config, &base_env, &metrics)?)),
            TlsMode::Off => {
                eprintln!("{TLS_OFF_WARNING}");
                None
            }
        };
        let federation =
            federation::Federation::start(&config.mesh, &metrics, &logs)?.map(Arc::new);
        let (rewired, _) = watch::channel(());
        let sidecars = Arc::new(Sidecars {
            registry: Registry::new(),
            metrics,
            wiring: Mutex::new(Wiring::default()),
            draining: Mutex::new(BTreeSet::new()),
            rewired,
            federation: federation.clone(),
        });
        let wire = Wire {
            config: &config,
            sidecars: &sidecars,
            certs: certs.as_deref(),
            test: test_ingresses,
        };
        wire.callers(&services)?;
        wire.policies();
        for ((service, replica), port) in &ports {
            if let Some(port) = port {
                wire.inbound(service, *replica, *port).await?;
            }
        }
        let mut upstream_addrs = BTreeMap::new();
        for caller in &services {
            // A service of other hosts calls from there: no outbound here.
            if config.services[caller].is_remote() {
                continue;
            }
            for upstream in &config.services[caller].upstreams {
                let addr = wire.outbound(caller, upstream).await?;
                upstream_addrs.insert((caller.clone(), upstream.clone()), addr);
            }
        }
        for service in &services {
            if config.services[service].expose.is_some() {
                wire.ingress(service).await?;
            }
            // A service with `port = "none"` serves nothing: no test ingress.
            if test_ingresses && config.services[service].port != config::PortSpec::None {
                wire.test_ingress(service).await?;
            }
        }

        let switch = Arc::clone(&sidecars);
        let supervisor = Supervisor::start(Options {
            config,
            base_env: base_env.clone(),
            logs: logs.clone(),
            services,
            ports,
            upstream_addrs,
            on_switch: Arc::new(move |service: &str, replica: u32, port: Option<u16>| {
                switch.switch(service, replica, port);
            }),
        });
        tokio::spawn(feed_discovery(sidecars.clone(), supervisor.clone()));
        let runtime = Runtime {
            inner: Arc::new(Inner {
                supervisor,
                sidecars,
                certs,
                federation,
                base_env,
                logs: logs.clone(),
                changing: tokio::sync::Mutex::new(()),
            }),
        };
        if let Some(report) = runtime.certs() {
            logs.mesh_line(&format!(
                "mutual TLS between sidecars: CA sha256 {}, {} certificates issued",
                report.ca_fingerprint,
                report.leaves.len()
            ));
            tracing::debug!("certificates:\n{report}");
        }
        Ok(runtime)
    }

    /// The mesh CA and every leaf certificate in use now (for `mesh certs`); `None` with
    /// `tls = "off"`.
    pub(crate) fn certs(&self) -> Option<CertsReport> {
        self.inner.certs.as_deref().map(certs::Certs::report)
    }

    /// What makes [`Runtime::certs`]'s report at any later time, for the control socket.
    pub(crate) fn certs_reporter(
        &self,
    ) -> impl Fn() -> Option<CertsReport> + Send + Sync + 'static {
        let certs = self.inner.certs.clone();
        move || certs.as_deref().map(certs::Certs::report)
    }

    /// A warning about the mesh CA (it expires within 30 days), for `/ready`.
    pub(crate) fn ca_warning(&self) -> Option<String> {
        let report = self.certs()?;
        let soon = std::time::SystemTime::now() + std::time::Duration::from_secs(30 * 24 * 3600);
        (report.ca_not_after <= soon).then(|| {
            format!(
                "the mesh CA expires at {}: replace it before then",
                humantime::format_rfc3339_seconds(report.ca_not_after)
            )
        })
    }

    /// Wait until every started service is ready; the first replica that is `failed`,
    /// `exited` or `blocked` instead.
    pub(crate) async fn ready(&self) -> Result<(), String> {
        self.inner.supervisor.ready().await
    }

    /// The replicas not ready, with why when known: `api.0 is starting (not ready after
    /// 1m (last check: …)), web.0 is waiting`.
    pub(crate) fn not_ready(&self) -> String {
        let status = self.status();
        let all = status.borrow();
        all.values()
            .filter(|r| !r.ready)
            .map(|r| match &r.reason {
                Some(why) => format!("{}.{} is {} ({why})", r.service, r.replica, r.state),
                None => format!("{}.{} is {}", r.service, r.replica, r.state),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Wait until no replica is active any more. A host of a mesh of hosts that serves
    /// ingresses keeps serving them (to the endpoints of other hosts) whatever its own
    /// replicas do: it finishes only on a signal.
    pub(crate) async fn finished(&self) -> Outcome {
        let outcome = self.inner.supervisor.finished().await;
        let serves = !self.inner.sidecars.wiring.lock().ingresses.is_empty();
        if self.inner.federation.is_some() && serves {
            std::future::pending::<()>().await;
        }
        outcome
    }

    /// The endpoints of other hosts, for `mesh ps` and `/api/status` (none without
    /// `[mesh] etcd`).
    pub(crate) fn remote_status(&self) -> RemoteStatus {
        self.inner
            .federation
            .as_ref()
            .map(|f| f.status())
            .unwrap_or_default()
    }

    /// Every replica's status, as the supervisor publishes it.
    pub(crate) fn status(&self) -> watch::Receiver<Statuses> {
        self.inner.supervisor.status()
    }

    /// The configuration in force.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.inner.supervisor.config()
    }

    /// Where mesh's own lines go (`mesh | …`).
    pub(crate) fn logs(&self) -> &LogSink {
        &self.inner.logs
    }

    /// The mesh's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.sidecars.metrics
    }

    /// The address of each exposed service's ingress.
    pub(crate) fn ingress_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.inner
            .sidecars
            .wiring
            .lock()
            .ingresses
            .iter()
            .map(|(s, o)| (s.clone(), o.addr))
            .collect()
    }

    /// The address of each service's test ingress (`mesh run`, the fixture): empty unless
    /// started with them.
    pub(crate) fn test_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.inner
            .sidecars
            .wiring
            .lock()
            .test_ingresses
            .iter()
            .map(|(s, o)| (s.clone(), o.addr))
            .collect()
    }

    /// The environment and working directory of replica 0 of `service` (`mesh exec`).
    pub(crate) fn app_env(
        &self,
        service: &str,
    ) -> Result<(Vec<(String, String)>, std::path::PathBuf), String> {
        if self
            .config()
            .services
            .get(service)
            .is_some_and(|s| s.is_remote())
        {
            return Err(format!(
                "service `{service}` runs on other hosts: it has no environment here"
            ));
        }
        self.inner.supervisor.app_env(service, 0)
    }

    /// `mesh stop`, `mesh start`, `mesh restart` of one service; the line to print.
    pub(crate) async fn service_command(&self, cmd: &str, service: &str) -> Result<String, String> {
        let supervisor = &self.inner.supervisor;
        if !supervisor.runs(service) {
            let config = self.config();
            return Err(
                if config.services.get(service).is_some_and(|s| s.is_remote()) {
                    format!("service `{service}` runs on other hosts: nothing of it runs here")
                } else if config.services.contains_key(service) {
                    format!("service `{service}` is not running in this mesh (not started with it)")
                } else {
                    format!("no service `{service}` in the configuration")
                },
            );
        }
        let _changing = self.inner.changing.lock().await;
        let logs = &self.inner.logs;
        match cmd {
            "stop" => {
                logs.mesh_line(&format!("{service}: stopping (mesh stop)"));
                supervisor.stop_service(service).await?;
                Ok(format!("{service}: stopped"))
            }
            "start" => {
                logs.mesh_line(&format!("{service}: starting (mesh start)"));
                supervisor.start_service(service).await?;
                Ok(format!("{service}: started"))
            }
            "restart" => {
                logs.mesh_line(&format!(
                    "{service}: restarting one replica at a time (mesh restart)"
                ));
                supervisor.restart_service(service).await?;
                Ok(format!("{service}: restarted"))
            }
            other => Err(format!("unknown command `{other}`")),
        }
    }

    /// Re-read the configuration file and apply the difference (SPEC §4 Reload).
    pub(crate) async fn reload(&self) -> ReloadOutcome {
        let _changing = self.inner.changing.lock().await;
        reload::reload(self).await
    }

    /// Stop in the order of SPEC §4 Signals: ingresses stop accepting; with `[mesh]
    /// etcd` this host leaves etcd (its lease is revoked); then, service by service in
    /// reverse start order, replicas leave discovery, inbounds drain, processes stop,
    /// outbounds close.
    pub(crate) async fn shutdown(self, force: impl Future<Output = ()>) {
        let sidecars = &self.inner.sidecars;
        let ingresses: Vec<Outbound> = {
            let mut wiring = sidecars.wiring.lock();
            let mut all: Vec<Outbound> = std::mem::take(&mut wiring.ingresses)
                .into_values()
                .collect();
            all.extend(std::mem::take(&mut wiring.test_ingresses).into_values());
            all
        };
        for ingress in &ingresses {
            ingress.server.stop.cancel();
        }
        // Other hosts stop calling this one before anything here stops (SPEC §9).
        if let Some(federation) = &self.inner.federation {
            federation.leave(&self.inner.logs).await;
        }
        self.inner
            .supervisor
            .clone()
            .shutdown(force, &**sidecars)
            .await;
        // Whatever is left (servers of services not selected, ingress tails).
        let mut rest: Vec<Server> = ingresses.into_iter().map(|o| o.server).collect();
        {
            let mut wiring = sidecars.wiring.lock();
            rest.extend(
                std::mem::take(&mut wiring.inbounds)
                    .into_values()
                    .map(|i| i.server),
            );
            rest.extend(
                std::mem::take(&mut wiring.outbounds)
                    .into_values()
                    .map(|o| o.server),
            );
        }
        stop_all(rest).await;
        if let Some(certs) = &self.inner.certs {
            certs.stop();
        }
        if let Some(federation) = &self.inner.federation {
            federation.stop().await;
        }
    }
}

impl Sidecars {
    /// Point the inbound of `service.replica` at `port` (a rolling replacement).
    fn switch(&self, service: &str, replica: u32, port: Option<u16>) {
        let Some(port) = port else {
            return;
        };
        let wiring = self.wiring.lock();
        if let Some(inbound) = wiring.inbounds.get(&(service.to_string(), replica)) {
            inbound
                .app
                .set(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
    }
}

impl ShutdownHooks for Sidecars {
    async fn before_stop(&self, service: &str) {
        self.draining.lock().insert(service.to_string());
        self.registry.set(service, Vec::new());
        // Its callers here may go on with its endpoints on other hosts, if any
        // (`feed_discovery` hands them over; requests meanwhile wait in the queue).
        if self.federation.is_some() {
            self.rewired.send_replace(());
        }
        let servers: Vec<Server> = {
            let mut wiring = self.wiring.lock();
            let keys: Vec<_> = wiring
                .inbounds
                .keys()
                .filter(|(s, _)| s == service)
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| wiring.inbounds.remove(k))
                .map(|i| i.server)
                .collect()
        };
        stop_all(servers).await;
    }

    async fn after_stop(&self, service: &str) {
        let servers: Vec<Server> = {
            let mut wiring = self.wiring.lock();
            let keys: Vec<_> = wiring
                .outbounds
                .keys()
                .filter(|(caller, _)| caller == service)
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| wiring.outbounds.remove(k))
                .map(|o| o.server)
                .collect()
        };
        stop_all(servers).await;
    }
}

/// Cancel every server, then wait for each to finish its in-flight work.
async fn stop_all(servers: Vec<Server>) {
    for server in &servers {
        server.stop.cancel();
    }
    for server in servers {
        if let Err(e) = server.task.await {
            tracing::warn!(error = %e, "sidecar task failed");
        }
    }
}

/// Binding and starting sidecars for one configuration (at start, and by a reload).
struct Wire<'a> {
    config: &'a Config,
    sidecars: &'a Sidecars,
    certs: Option<&'a certs::Certs>,
    /// Test ingresses for every service, admitted by every inbound.
    test: bool,
}

impl Wire<'_> {
    /// Issue the client identity of every service in `services` that calls others, and
    /// of the ingresses if any is exposed (those not issued yet).
    fn callers(&self, services: &[String]) -> anyhow::Result<()> {
        let Some(certs) = self.certs else {
            return Ok(());
        };
        let mut wanted: Vec<&str> = services
            .iter()
            .filter(|s| {
                let svc = &self.config.services[*s];
                !svc.upstreams.is_empty() && !svc.is_remote()
            })
            .map(String::as_str)
            .collect();
        if services
            .iter()
            .any(|s| self.config.services[s].expose.is_some())
        {
            wanted.push(INGRESS);
        }
        if self.test {
            wanted.push(TEST);
        }
        for caller in wanted {
            if self.sidecars.wiring.lock().callers_tls.contains_key(caller) {
                continue;
            }
            let tls = certs.caller(caller)?;
            self.sidecars
                .wiring
                .lock()
                .callers_tls
                .insert(caller.to_string(), tls);
        }
        Ok(())
    }

    /// Set every service's admitted callers and rate limit to this configuration's
    /// (creating the live values of new services).
    fn policies(&self) {
        let mut admitted = certs::admitted(self.config);
        if self.test {
            for callers in admitted.values_mut() {
                callers.insert(TEST.to_string());
            }
        }
        let mut wiring = self.sidecars.wiring.lock();
        for (service, callers) in admitted {
            match wiring.admitted.get(&service) {
                Some(live) => live.set(callers),
                None => {
                    wiring.admitted.insert(service.clone(), Live::new(callers));
                }
            }
        }
        for (name, svc) in &self.config.services {
            let limit = rate_limit(svc);
            match wiring.rate_limits.get(name) {
                Some(live) => live.set(limit),
                None => {
                    wiring.rate_limits.insert(name.clone(), Live::new(limit));
                }
            }
        }
    }

    /// Bind and start the inbound of `service.replica`, forwarding to `port`.
    async fn inbound(&self, service: &str, replica: u32, port: u16) -> anyhow::Result<()> {
        let svc = &self.config.services[service];
        // On the `listen` address: other hosts call it there (SPEC §9).
        let listen = self.config.mesh.listen;
        let listener = TcpListener::bind((listen, 0)).await.with_context(|| {
            format!("cannot bind the inbound of {service}.{replica} on {listen}")
        })?;
        let addr = listener.local_addr()?;
        let app = Live::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let stop = CancellationToken::new();
        let span = tracing::info_span!("inbound", service = %service, replica);
        let tls = match self.certs {
            Some(certs) => Some(certs.inbound(service, replica, svc.protocol == Protocol::Tcp)?),
            None => None,
        };
        let (admitted, limit) = {
            let wiring = self.sidecars.wiring.lock();
            (
                wiring.admitted.get(service).cloned().unwrap_or_default(),
                wiring.rate_limits.get(service).cloned().unwrap_or_default(),
            )
        };
        let mesh_name = self.config.mesh.name.clone();
        let metrics = self.sidecars.metrics.clone();
        let (task, local) = match svc.protocol {
            Protocol::Tcp => {
                let cfg = proxy::tcp::TcpInboundConfig {
                    mesh_name,
                    service: service.to_string(),
                    replica,
                    app: app.clone(),
                    metrics,
                    rate_limit: limit,
                    tls,
                    admitted,
                };
                let server = proxy::tcp::TcpInboundServer::new(cfg, stop.clone());
                let local = Local::Tcp(server.local());
                (tokio::spawn(server.serve(listener).instrument(span)), local)
            }
            protocol => {
                let cfg = proxy::inbound::InboundConfig {
                    mesh_name,
                    service: service.to_string(),
                    replica,
                    protocol: proxy_protocol(protocol),
                    app: app.clone(),
                    metrics,
                    rate_limit: limit,
                    tls,
                    admitted,
                };
                let limits = proxy::http::server::Limits::default();
                let server = proxy::inbound::InboundServer::new(cfg, limits, stop.clone());
                let local = Local::Http(server.local());
                (tokio::spawn(server.serve(listener).instrument(span)), local)
            }
        };
        let local = (self.config.mesh.local_path == LocalPath::InProcess).then_some(local);
        self.sidecars.wiring.lock().inbounds.insert(
            (service.to_string(), replica),
            Inbound {
                server: Server { stop, task },
                addr,
                app,
                local,
            },
        );
        self.sidecars.rewired.send_replace(());
        Ok(())
    }

    /// Bind and start `caller`'s outbound to `upstream`; its address.
    async fn outbound(&self, caller: &str, upstream: &str) -> anyhow::Result<SocketAddr> {
        let listener = bind_loopback()
            .await
            .with_context(|| format!("cannot bind the outbound of `{caller}` to `{upstream}`"))?;
        let outbound = self.outbound_on(listener, caller, upstream, false)?;
        let addr = outbound.addr;
        let key = (caller.to_string(), upstream.to_string());
        self.sidecars.wiring.lock().outbounds.insert(key, outbound);
        Ok(addr)
    }

    /// Bind and start the ingress of `service` on its `expose` address.
    async fn ingress(&self, service: &str) -> anyhow::Result<SocketAddr> {
        let Some(expose) = self.config.services[service].expose else {
            anyhow::bail!("`{service}` is not exposed");
        };
        let listener = TcpListener::bind(expose).await.with_context(|| {
            format!("cannot listen on {expose} for the ingress (`expose`) of `{service}`")
        })?;
        let ingress = self.outbound_on(listener, INGRESS, service, true)?;
        let addr = ingress.addr;
        let key = service.to_string();
        self.sidecars.wiring.lock().ingresses.insert(key, ingress);
        Ok(addr)
    }

    /// Bind and start the test ingress of `service` on an ephemeral loopback port.
    async fn test_ingress(&self, service: &str) -> anyhow::Result<SocketAddr> {
        let listener = bind_loopback()
            .await
            .with_context(|| format!("cannot bind the test ingress of `{service}`"))?;
        let ingress = self.outbound_on(listener, TEST, service, true)?;
        let addr = ingress.addr;
        let key = service.to_string();
        self.sidecars
            .wiring
            .lock()
            .test_ingresses
            .insert(key, ingress);
        Ok(addr)
    }

    /// An outbound (or ingress) of `caller` towards `service`, serving `listener`.
    fn outbound_on(
        &self,
        listener: TcpListener,
        caller: &str,
        service: &str,
        ingress: bool,
    ) -> anyhow::Result<Outbound> {
        let addr = listener.local_addr()?;
        let (server, setup) = self.serve_outbound(listener, caller, service, ingress);
        Ok(Outbound {
            server,
            addr,
            setup,
        })
    }

    /// Start an outbound (or, with `ingress`, an ingress) of `caller` towards `service`.
    fn serve_outbound(
        &self,
        listener: TcpListener,
        caller: &str,
        service: &str,
        ingress: bool,
    ) -> (Server, Setup) {
        let stop = CancellationToken::new();
        let kind = if ingress { "ingress" } else { "outbound" };
        let span = tracing::info_span!("sidecar", kind, caller = %caller, service = %service);
        let (task, setup) = match self.outbound_setup(caller, service, ingress) {
            SetupValue::Tcp(value) => {
                let live = Live::new(value);
                let task = tokio::spawn(
                    proxy::tcp::serve_outbound_live(listener, live.clone(), stop.clone())
                        .instrument(span),
                );
                (task, Setup::Tcp(live))
            }
            SetupValue::Http(value) => {
                let live = Live::new(value);
                let task = tokio::spawn(
                    proxy::outbound::serve_live(listener, live.clone(), stop.clone())
                        .instrument(span),
                );
                (task, Setup::Http(live))
            }
        };
        (Server { stop, task }, setup)
    }

    /// The settings of `caller`'s outbound (or ingress) to `service` under this
    /// configuration.
    fn outbound_setup(&self, caller: &str, service: &str, ingress: bool) -> SetupValue {
        let config = self.config;
        let registry = &self.sidecars.registry;
        let svc = &config.services[service];
        let (traffic, balancer) = balancer_for(config, registry, service);
        let routes = routes_for(config, registry, caller, service, &balancer);
        let tls = self.sidecars.wiring.lock().callers_tls.get(caller).cloned();
        let metrics = self.sidecars.metrics.clone();
        match svc.protocol {
            Protocol::Tcp => {
                let cfg = proxy::tcp::TcpOutboundConfig {
                    mesh_name: config.mesh.name.clone(),
                    caller: caller.to_string(),
                    service: service.to_string(),
                    traffic,
                    metrics,
                    routes,
                    tls: tls.map(|tls| Arc::clone(&tls.opaque)),
                };
                SetupValue::Tcp((cfg, balancer))
            }
            protocol => {
                let cfg = proxy::outbound::OutboundConfig {
                    mesh_name: config.mesh.name.clone(),
                    caller: caller.to_string(),
                    service: service.to_string(),
                    protocol: proxy_protocol(protocol),
                    traffic,
                    ingress,
                    metrics,
                    routes,
                    tls,
                };
                SetupValue::Http(proxy::outbound::OutboundSetup { cfg, balancer })
            }
        }
    }

    /// Give a running outbound (or ingress) the settings of this configuration.
    fn refresh(&self, target: &Setup, caller: &str, service: &str, ingress: bool) {
        match (target, self.outbound_setup(caller, service, ingress)) {
            (Setup::Http(live), SetupValue::Http(fresh)) => live.set(fresh),
            (Setup::Tcp(live), SetupValue::Tcp(fresh)) => live.set(fresh),
            // A protocol change is refused by the reload ("restart required").
            _ => tracing::error!(caller, service, "outbound protocol changed; not refreshed"),
        }
    }
}

/// A caller's balancer over `service`'s endpoints, and the traffic settings it follows
/// (the service's own: also when `service` is reached as a route backend, SPEC §3).
fn balancer_for(config: &Config, registry: &Registry, service: &str) -> (proxy::Traffic, Balancer) {
    let svc = &config.services[service];
    let algorithm = match svc.traffic.load_balancer {
        LoadBalancer::P2cEwma => Algorithm::P2cEwma,
        LoadBalancer::RoundRobin => Algorithm::RoundRobin,
    };
    let traffic = proxy_traffic(&svc.traffic, algorithm);
    let balancer =
        Balancer::with_policy(service, algorithm, traffic.balance, registry.watch(service));
    (traffic, balancer)
}

/// `service`'s routes as `caller`'s outbound (or ingress) applies them: one balancer
/// per distinct backend, the caller's own balancer of `service` when a route names the
/// service itself, and a generator seeded per (caller, service).
fn routes_for(
    config: &Config,
    registry: &Registry,
    caller: &str,
    service: &str,
    own: &Balancer,
) -> proxy::routes::Routes {
    let svc = &config.services[service];
    let mut backends: BTreeMap<&str, proxy::routes::Backend> = BTreeMap::new();
    let mut routes = Vec::with_capacity(svc.routes.len());
    for route in &svc.routes {
        let mut weighted = Vec::with_capacity(route.backends.len());
        for (name, weight) in &route.backends {
            let backend = backends.entry(name).or_insert_with(|| {
                let (queue_timeout, balancer) = if name == service {
                    (svc.traffic.queue_timeout, own.clone())
                } else {
                    let (traffic, balancer) = balancer_for(config, registry, name);
                    (traffic.queue_timeout, balancer)
                };
                proxy::routes::Backend {
                    service: name.as_str().into(),
                    balancer,
                    queue_timeout,
                }
            });
            weighted.push((backend.clone(), *weight));
        }
        let headers: Option<Vec<_>> = route
            .headers
            .iter()
            .map(|(name, value)| {
                let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).ok()?;
                let value = hyper::header::HeaderValue::from_bytes(value.as_bytes()).ok()?;
                Some((name, value))
            })
            .collect();
        let Some(headers) = headers else {
            // Validation only lets valid names and values through, so this is a bug.
            // Leaving out one condition would widen the route; leave out the route.
            tracing::error!(
                service,
                "a route's header condition is not valid HTTP; route ignored"
            );
            continue;
        };
        let fault = route.fault.as_ref().map(|f| proxy::routes::Fault {
            delay: f.delay,
            delay_percent: f.delay_percent,
            abort: f.abort.and_then(|s| hyper::StatusCode::from_u16(s).ok()),
            abort_percent: f.abort_percent,
        });
        routes.push(proxy::routes::Route {
            path_prefix: route.path_prefix.clone(),
            headers,
            backends: weighted,
            timeout: route.timeout,
            fault,
        });
    }
    proxy::routes::Routes::new(routes, config.mesh.seed, &format!("{caller}>{service}"))
}

fn rate_limit(svc: &mesh_supervisor::config::Service) -> Option<proxy::ratelimit::RateLimit> {
    svc.traffic.rate_limit.map(|r| proxy::ratelimit::RateLimit {
        rps: r.rps,
        burst: r.burst,
    })
}

/// The proxy's view of a service's `traffic` table.
fn proxy_traffic(t: &config::Traffic, algorithm: Algorithm) -> proxy::Traffic {
    use proxy::outbound::RetryOn as P;
    let retries = t.retries.as_ref().map(|r| proxy::outbound::RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: r.per_try_timeout,
        on: r
            .on
            .iter()
            .map(|on| match *on {
                config::RetryOn::GatewayError => P::GatewayError,
                config::RetryOn::ServerError => P::ServerError,
                config::RetryOn::Reset => P::Reset,
                config::RetryOn::Timeout => P::Timeout,
                config::RetryOn::Status(code) => P::Status(code),
                config::RetryOn::Grpc(code) => P::Grpc(code),
            })
            .collect(),
        budget: r.budget,
    });
    let breaker = t.circuit_breaker.map(|cb| proxy::balance::Breaker {
        consecutive_failures: cb.consecutive_failures,
        base_ejection: cb.base_ejection,
        max_ejection: cb.max_ejection,
        max_ejected_percent: cb.max_ejected_percent,
    });
    proxy::Traffic {
        load_balancer: algorithm,
        queue_timeout: t.queue_timeout,
        timeout: t.timeout,
        retries,
        balance: proxy::balance::Policy {
            breaker,
            max_concurrent: t.max_concurrent as usize,
        },
    }
}

/// Keep the registry equal to the set of running, ready replicas (minus draining
/// services), or, for a service with none here, its endpoints on other hosts (SPEC §9);
/// register this host's ready endpoints in etcd and tell the supervisor which services
/// of other hosts have one. Driven by the status watch channel, by changes of the wiring
/// and by the other hosts' table: no polling.
async fn feed_discovery(sidecars: Arc<Sidecars>, supervisor: Supervisor) {
    let mut status = supervisor.status();
    let mut rewired = sidecars.rewired.subscribe();
    let mut remote = sidecars.federation.as_ref().map(|f| f.subscribe());
    // Endpoints of other hosts already reported as unusable.
    let mut warned = BTreeSet::new();
    loop {
        let config = supervisor.config();
        let inbounds: BTreeMap<(String, u32), (Endpoint, SocketAddr)> = sidecars
            .wiring
            .lock()
            .inbounds
            .iter()
            .map(|((service, replica), inbound)| {
                let endpoint = Endpoint::new(format!("{service}.{replica}"), inbound.addr);
                let endpoint = match &inbound.local {
                    Some(local) => endpoint.with_local(local.clone()),
                    None => endpoint,
                };
                ((service.clone(), *replica), (endpoint, inbound.addr))
            })
            .collect();
        let mut ready: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        let mut register = federation::Ready::new();
        {
            let all = status.borrow_and_update();
            let draining = sidecars.draining.lock();
            for r in all.values() {
                if r.health != "ready" || draining.contains(&r.service) {
                    continue;
                }
                let key = (r.service.clone(), r.replica);
                if let Some((endpoint, addr)) = inbounds.get(&key) {
                    ready
                        .entry(r.service.clone())
                        .or_default()
                        .push(endpoint.clone());
                    if let Some(value) = federation::endpoint(&config, &r.service, r.replica, *addr)
                    {
                        register.insert(key, value);
                    }
                }
            }
        }
        let table = remote.as_mut().map(|rx| rx.borrow_and_update().clone());
        let draining = sidecars.draining.lock().clone();
        let mut remote_ready = BTreeSet::new();
        // Every service a balancer may watch: those of the configuration, and any that
        // still has an inbound here (a reload removing it is under way).
        let services: BTreeSet<&String> = config
            .services
            .keys()
            .chain(inbounds.keys().map(|(s, _)| s))
            .collect();
        for service in services {
            let elsewhere = match &table {
                Some(table) => federation::remote_endpoints(&config, table, service, &mut warned),
                None => Vec::new(),
            };
            if config.services.get(service).is_some_and(|s| s.is_remote()) && !elsewhere.is_empty()
            {
                remote_ready.insert(service.clone());
            }
            let here = ready.remove(service).unwrap_or_default();
            if draining.contains(service) && table.is_none() {
                // Stopping: `before_stop` emptied it; nothing else may refill it.
                continue;
            }
            // SPEC §9: the endpoints of other hosts only while none is ready here.
            let endpoints = if here.is_empty() { elsewhere } else { here };
            sidecars.registry.set(service, endpoints);
        }
        if let Some(federation) = &sidecars.federation {
            federation.register(register);
        }
        supervisor.set_remote_ready(remote_ready);
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            changed = rewired.changed() => if changed.is_err() { return },
            changed = remote_changed(&mut remote) => if changed.is_err() { return },
        }
    }
}

/// The next change of the other hosts' table; never without one.
async fn remote_changed(
    remote: &mut Option<watch::Receiver<Arc<mesh_federation::RemoteEndpoints>>>,
) -> Result<(), watch::error::RecvError> {
    match remote {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn bind_loopback() -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await
}

fn proxy_protocol(p: Protocol) -> proxy::Protocol {
    match p {
        Protocol::Http => proxy::Protocol::Http,
        Protocol::Grpc => proxy::Protocol::Grpc,
        Protocol::Tcp => proxy::Protocol::Tcp,
    }
}
