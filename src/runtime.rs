//! A running mesh: the supervisor, and the sidecars wired to it.
//!
//! Every listener is bound here, once, before any process starts, so that ports stay the
//! same for the life of the mesh: an inbound per replica, an outbound per (caller,
//! upstream), an ingress per `expose`. Discovery is fed from the supervisor's status:
//! a replica is an endpoint while its process runs and is ready.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use mesh_proxy as proxy;
use mesh_supervisor::config::{self, Config, LoadBalancer, Protocol};
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

/// A running mesh.
pub(crate) struct Runtime {
    supervisor: Supervisor,
    sidecars: Arc<Sidecars>,
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
            let task = match svc.protocol {
                Protocol::Tcp => {
                    let cfg = proxy::tcp::TcpInboundConfig {
                        mesh_name: mesh_name.clone(),
                        service: service.clone(),
                        replica: *replica,
                        app,
                        metrics: metrics.clone(),
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
                    &config, &registry, listener, &metrics, caller, upstream, false,
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
                &config, &registry, listener, &metrics, INGRESS, service, true,
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
            logs,
            services,
            ports,
            upstream_addrs,
        });
        tokio::spawn(feed_discovery(sidecars.clone(), supervisor.status()));
        Ok(Runtime {
            supervisor,
            sidecars,
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

/// Start an outbound (or, with `ingress`, an ingress) of `caller` towards `service`.
fn serve_outbound(
    config: &Config,
    registry: &Registry,
    listener: TcpListener,
    metrics: &Metrics,
    caller: &str,
    service: &str,
    ingress: bool,
) -> Server {
    let svc = &config.services[service];
    let algorithm = match svc.traffic.load_balancer {
        LoadBalancer::P2cEwma => Algorithm::P2cEwma,
        LoadBalancer::RoundRobin => Algorithm::RoundRobin,
    };
    let traffic = proxy_traffic(&svc.traffic, algorithm);
    let balancer =
        Balancer::with_policy(service, algorithm, traffic.balance, registry.watch(service));
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
            };
            tokio::spawn(
                proxy::outbound::serve(listener, cfg, balancer, stop.clone()).instrument(span),
            )
        }
    };
    Server { stop, task }
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
