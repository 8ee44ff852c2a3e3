//! A running mesh: the supervisor, and the sidecars wired to it.
//!
//! Every listener is bound here, once, before any process starts, so that ports stay the
//! same for the life of the mesh: an inbound per replica, an outbound per (caller,
//! upstream), an ingress per `expose`. Discovery is fed from the supervisor's status:
//! a replica is an endpoint while its process runs and is ready.
//!
//! With `tls = "mutual"` (the default) every sidecar gets its identity here (`certs`):
//! the inbounds a leaf per replica, the outbounds a leaf per calling service, the
//! ingresses the `ingress` leaf; and each inbound the set of callers it admits.

mod certs;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use mesh_proxy as proxy;
use mesh_supervisor::config::{self, Config, LoadBalancer, Protocol, TlsMode};
use mesh_supervisor::logs::LogSink;
use mesh_supervisor::supervisor::{self, Options, Outcome, ShutdownHooks, Statuses, Supervisor};
use parking_lot::Mutex;
use proxy::balance::{Algorithm, Balancer};
use proxy::discovery::{Endpoint, Registry};
use proxy::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The identity name of ingress listeners (SPEC §1).
const INGRESS: &str = "ingress";

/// What `mesh up` prints on stderr when `tls = "off"`.
const TLS_OFF_WARNING: &str = "mesh: WARNING: tls = \"off\": traffic between sidecars is \
    plain text, unauthenticated, and authorization (`upstreams`, `allow`) is NOT enforced; \
    use it for debugging only";

pub(crate) use certs::CertsReport;

/// A running mesh.
pub(crate) struct Runtime {
    supervisor: Supervisor,
    sidecars: Arc<Sidecars>,
    /// The mesh CA and the identities issued; `None` with `tls = "off"`.
    certs: Option<Arc<certs::Certs>>,
}

/// One running listener: cancel the token to stop it accepting; the task ends once its
/// in-flight work is done.
struct Server {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Every sidecar listener of the mesh.
struct Sidecars {
    registry: Registry,
    metrics: Metrics,
    /// Inbound servers by service.
    inbounds: Mutex<BTreeMap<String, Vec<Server>>>,
    /// Outbound servers by calling service.
    outbounds: Mutex<BTreeMap<String, Vec<Server>>>,
    ingresses: Mutex<Vec<Server>>,
    /// Services being stopped: kept out of discovery whatever their status says.
    draining: Mutex<BTreeSet<String>>,
    /// Each replica's inbound address.
    inbound_addrs: BTreeMap<(String, u32), SocketAddr>,
    /// Each exposed service's ingress address.
    ingress_addrs: BTreeMap<String, SocketAddr>,
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
        let services = supervisor::selected(&config, only.as_deref());
        let ports = supervisor::allocate_ports(&config, &services)
            .context("cannot allocate application ports")?;
        let registry = Registry::new();
        let metrics = Metrics::new();
        let mesh_name = config.mesh.name.clone();
        let certs = match config.mesh.tls {
            TlsMode::Mutual => Some(Arc::new(certs::Certs::load(&config, &base_env, &metrics)?)),
            TlsMode::Off => {
                eprintln!("{TLS_OFF_WARNING}");
                None
            }
        };
        let admitted: BTreeMap<String, Arc<BTreeSet<String>>> = certs::admitted(&config)
            .into_iter()
            .map(|(service, callers)| (service, Arc::new(callers)))
            .collect();
        let mut callers_tls = BTreeMap::new();
        if let Some(certs) = &certs {
            for caller in &services {
                if !config.services[caller].upstreams.is_empty() {
                    callers_tls.insert(caller.clone(), certs.caller(caller)?);
                }
            }
            if services.iter().any(|s| config.services[s].expose.is_some()) {
                callers_tls.insert(INGRESS.to_string(), certs.caller(INGRESS)?);
            }
        }

        let mut inbounds: BTreeMap<String, Vec<Server>> = BTreeMap::new();
        let mut inbound_addrs = BTreeMap::new();
        for ((service, replica), port) in &ports {
            let Some(port) = port else { continue };
            let svc = &config.services[service];
            let listener = bind_loopback()
                .await
                .with_context(|| format!("cannot bind the inbound of {service}.{replica}"))?;
            inbound_addrs.insert((service.clone(), *replica), listener.local_addr()?);
            let app = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            let stop = CancellationToken::new();
            let span = tracing::info_span!("inbound", service = %service, replica);
            let tls = match &certs {
                Some(certs) => {
                    Some(certs.inbound(service, *replica, svc.protocol == Protocol::Tcp)?)
                }
                None => None,
            };
            let admitted = admitted.get(service).cloned().unwrap_or_default();
            let task = match svc.protocol {
                Protocol::Tcp => {
                    let cfg = proxy::tcp::TcpInboundConfig {
                        mesh_name: mesh_name.clone(),
                        service: service.clone(),
                        replica: *replica,
                        app,
                        metrics: metrics.clone(),
                        rate_limit: rate_limit(svc),
                        tls,
                        admitted,
                    };
                    tokio::spawn(
                        proxy::tcp::serve_inbound(listener, cfg, stop.clone()).instrument(span),
                    )
                }
                protocol => {
                    let cfg = proxy::inbound::InboundConfig {
                        mesh_name: mesh_name.clone(),
                        service: service.clone(),
                        replica: *replica,
                        protocol: proxy_protocol(protocol),
                        app,
                        metrics: metrics.clone(),
                        rate_limit: rate_limit(svc),
                        tls,
                        admitted,
                    };
                    tokio::spawn(
                        proxy::inbound::serve(listener, cfg, stop.clone()).instrument(span),
                    )
                }
            };
            inbounds
                .entry(service.clone())
                .or_default()
                .push(Server { stop, task });
        }

        let mut outbounds: BTreeMap<String, Vec<Server>> = BTreeMap::new();
        let mut upstream_addrs = BTreeMap::new();
        for caller in &services {
            for upstream in &config.services[caller].upstreams {
                let listener = bind_loopback().await.with_context(|| {
                    format!("cannot bind the outbound of `{caller}` to `{upstream}`")
                })?;
                upstream_addrs.insert((caller.clone(), upstream.clone()), listener.local_addr()?);
                let server = serve_outbound(
                    &config,
                    &registry,
                    listener,
                    &metrics,
                    callers_tls.get(caller),
                    caller,
                    upstream,
                    false,
                );
                outbounds.entry(caller.clone()).or_default().push(server);
            }
        }

        let mut ingresses = Vec::new();
        let mut ingress_addrs = BTreeMap::new();
        for service in &services {
            let Some(addr) = config.services[service].expose else {
                continue;
            };
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for the ingress (`expose`) of `{service}`")
            })?;
            ingress_addrs.insert(service.clone(), listener.local_addr()?);
            ingresses.push(serve_outbound(
                &config,
                &registry,
                listener,
                &metrics,
                callers_tls.get(INGRESS),
                INGRESS,
                service,
                true,
            ));
        }

        let sidecars = Arc::new(Sidecars {
            registry,
            metrics,
            inbounds: Mutex::new(inbounds),
            outbounds: Mutex::new(outbounds),
            ingresses: Mutex::new(ingresses),
            draining: Mutex::new(BTreeSet::new()),
            inbound_addrs,
            ingress_addrs,
        });
        let supervisor = Supervisor::start(Options {
            config,
            base_env,
            logs: logs.clone(),
            services,
            ports,
            upstream_addrs,
        });
        tokio::spawn(feed_discovery(sidecars.clone(), supervisor.status()));
        let runtime = Runtime {
            supervisor,
            sidecars,
            certs,
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
        self.certs.as_deref().map(certs::Certs::report)
    }

    /// What makes [`Runtime::certs`]'s report at any later time, for the control socket.
    pub(crate) fn certs_reporter(
        &self,
    ) -> impl Fn() -> Option<CertsReport> + Send + Sync + 'static {
        let certs = self.certs.clone();
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

    /// Wait until no replica is active any more.
    pub(crate) async fn finished(&self) -> Outcome {
        self.supervisor.finished().await
    }

    /// Every replica's status, as the supervisor publishes it.
    pub(crate) fn status(&self) -> watch::Receiver<Statuses> {
        self.supervisor.status()
    }

    /// The mesh's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.sidecars.metrics
    }

    /// The address of each exposed service's ingress.
    pub(crate) fn ingress_addrs(&self) -> &BTreeMap<String, SocketAddr> {
        &self.sidecars.ingress_addrs
    }

    /// Stop in the order of SPEC §4 Signals: ingresses stop accepting; then, service by
    /// service in reverse start order, replicas leave discovery, inbounds drain, processes
    /// stop, outbounds close.
    pub(crate) async fn shutdown(self, force: impl Future<Output = ()>) {
        let ingresses = std::mem::take(&mut *self.sidecars.ingresses.lock());
        for server in &ingresses {
            server.stop.cancel();
        }
        self.supervisor.shutdown(force, &*self.sidecars).await;
        // Whatever is left (servers of services not selected, ingress tails).
        let rest: Vec<Server> = ingresses
            .into_iter()
            .chain(
                std::mem::take(&mut *self.sidecars.inbounds.lock())
                    .into_values()
                    .flatten(),
            )
            .chain(
                std::mem::take(&mut *self.sidecars.outbounds.lock())
                    .into_values()
                    .flatten(),
            )
            .collect();
        stop_all(rest).await;
        if let Some(certs) = &self.certs {
            certs.stop();
        }
    }
}

impl ShutdownHooks for Sidecars {
    async fn before_stop(&self, service: &str) {
        self.draining.lock().insert(service.to_string());
        self.registry.set(service, Vec::new());
        let servers = self.inbounds.lock().remove(service).unwrap_or_default();
        stop_all(servers).await;
    }

    async fn after_stop(&self, service: &str) {
        let servers = self.outbounds.lock().remove(service).unwrap_or_default();
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

/// Start an outbound (or, with `ingress`, an ingress) of `caller` towards `service`,
/// over mutual TLS with `tls` (the caller's identity) when given.
#[allow(
    clippy::too_many_arguments,
    reason = "plain wiring, each argument named at the call"
)]
fn serve_outbound(
    config: &Config,
    registry: &Registry,
    listener: TcpListener,
    metrics: &Metrics,
    tls: Option<&proxy::tls::ClientTls>,
    caller: &str,
    service: &str,
    ingress: bool,
) -> Server {
    let svc = &config.services[service];
    let (traffic, balancer) = balancer_for(config, registry, service);
    let routes = routes_for(config, registry, caller, service, &balancer);
    let stop = CancellationToken::new();
    let kind = if ingress { "ingress" } else { "outbound" };
    let span = tracing::info_span!("sidecar", kind, caller = %caller, service = %service);
    let task = match svc.protocol {
        Protocol::Tcp => {
            let cfg = proxy::tcp::TcpOutboundConfig {
                mesh_name: config.mesh.name.clone(),
                caller: caller.to_string(),
                service: service.to_string(),
                traffic,
                metrics: metrics.clone(),
                routes,
                tls: tls.map(|tls| Arc::clone(&tls.opaque)),
            };
            tokio::spawn(
                proxy::tcp::serve_outbound(listener, cfg, balancer, stop.clone()).instrument(span),
            )
        }
        protocol => {
            let cfg = proxy::outbound::OutboundConfig {
                mesh_name: config.mesh.name.clone(),
                caller: caller.to_string(),
                service: service.to_string(),
                protocol: proxy_protocol(protocol),
                traffic,
                ingress,
                metrics: metrics.clone(),
                routes,
                tls: tls.cloned(),
            };
            tokio::spawn(
                proxy::outbound::serve(listener, cfg, balancer, stop.clone()).instrument(span),
            )
        }
    };
    Server { stop, task }
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
/// services). Driven by the status watch channel: no polling.
async fn feed_discovery(sidecars: Arc<Sidecars>, mut status: watch::Receiver<Statuses>) {
    loop {
        let mut ready: BTreeMap<String, Vec<Endpoint>> = sidecars
            .inbound_addrs
            .keys()
            .map(|(s, _)| (s.clone(), Vec::new()))
            .collect();
        {
            let all = status.borrow_and_update();
            let draining = sidecars.draining.lock();
            for r in all.values() {
                if r.health != "ready" || draining.contains(&r.service) {
                    continue;
                }
                let key = (r.service.clone(), r.replica);
                if let Some(addr) = sidecars.inbound_addrs.get(&key) {
                    ready.entry(r.service.clone()).or_default().push(Endpoint {
                        id: format!("{}.{}", r.service, r.replica).into(),
                        addr: *addr,
                    });
                }
            }
        }
        for (service, endpoints) in ready {
            if !sidecars.draining.lock().contains(&service) {
                sidecars.registry.set(&service, endpoints);
            }
        }
        if status.changed().await.is_err() {
            return;
        }
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
