//! Beyond one machine (SPEC §9): this host's ready endpoints registered in etcd under
//! its lease, the other hosts' endpoints read back, and what the runtime makes of them.
//!
//! `mesh-federation` knows etcd and endpoints; this module connects it to the rest:
//!
//! * **Registration.** `feed_discovery` (in `runtime.rs`) computes, on every status or
//!   wiring change, the set of this host's ready endpoints (a replica's inbound on the
//!   `listen` address, while its process runs and is ready, minus draining services) and
//!   hands it to [`Federation::register`]. A task, the registrar, brings the
//!   [`Registry`](federation::Registry) in line with it: a new or moved endpoint is put,
//!   one that left is deleted at once. The registry keeps the keys under the host's
//!   lease and rewrites them when etcd lost it.
//! * **Discovery.** A [`Discovery`](federation::Discovery) lists and watches the other
//!   hosts' keys; `feed_discovery` reads its table and gives a service the remote
//!   endpoints only while no endpoint of it is ready here ([`remote_endpoints`]). A table
//!   watcher keeps `mesh_remote_endpoints{service}` and `mesh_remote_endpoints_stale` up
//!   to date and says in mesh's log when a host appears or leaves, and when the table
//!   goes stale or fresh again.
//! * **Leaving.** At a graceful stop, before any service stops, the registrar ends and
//!   the lease is revoked ([`Federation::leave`]): every key of the host goes in one
//!   revision, so other hosts stop calling it before its inbounds drain.
//!
//! This host's name among the hosts is its `listen` address ([`MeshSettings::host_id`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mesh_federation as federation;
use mesh_proxy as proxy;
use mesh_supervisor::config::{Config, MeshSettings, Protocol};
use mesh_supervisor::logs::LogSink;
use parking_lot::Mutex;
use proxy::metrics::Metrics;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// This host's ready endpoints, by (service, replica): what etcd should hold.
pub(super) type Ready = BTreeMap<(String, u32), federation::Endpoint>;

/// The etcd side of a running mesh.
pub(super) struct Federation {
    /// This host's name (its `listen` address).
    host: String,
    /// What the registrar writes: set by `feed_discovery`.
    ready: watch::Sender<Ready>,
    /// The other hosts' endpoints.
    table: watch::Receiver<Arc<federation::RemoteEndpoints>>,
    /// Until [`Federation::leave`].
    registrar: Mutex<Option<Registrar>>,
    /// Until [`Federation::stop`].
    discovery: Mutex<Option<federation::Discovery>>,
    /// The table watcher (metrics, log lines).
    watcher: JoinHandle<()>,
    /// How long revoking the lease may take at a stop.
    revoke_within: Duration,
}

/// The task that keeps the registry equal to [`Federation::ready`].
struct Registrar {
    stop: CancellationToken,
    task: JoinHandle<federation::Registry>,
}

/// A handle on the other hosts' endpoints, for `mesh ps` and `/api/status`.
#[derive(Clone, Default)]
pub(crate) struct RemoteStatus {
    table: Option<watch::Receiver<Arc<federation::RemoteEndpoints>>>,
}

/// One endpoint of another host, as `mesh ps --json` and `/api/status` list it beside the
/// local replicas: SPEC §4's fields (those that describe a process of this host are
/// null), plus `host`, `address` (where calls go: that replica's inbound) and `stale`
/// (etcd cannot be read now; this is the last known state).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RemoteRow {
    pub(crate) service: String,
    pub(crate) replica: u32,
    pub(crate) host: String,
    /// Always `remote`.
    pub(crate) state: &'static str,
    /// Always `ready`: only ready endpoints are registered.
    pub(crate) health: &'static str,
    pub(crate) pid: Option<u32>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) restarts: Option<u32>,
    pub(crate) port: Option<u16>,
    pub(crate) uptime_s: Option<u64>,
    pub(crate) rps: Option<f64>,
    pub(crate) success_rate: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) reason: Option<String>,
    pub(crate) last_rollout: Option<String>,
    pub(crate) address: String,
    pub(crate) stale: bool,
}

// === impl Federation ===

impl Federation {
    /// Start registering as this host and watching the others; returns at once (etcd is
    /// reached in the background and retried while it cannot be). Must run on the
    /// runtime. Fails only on settings the etcd client refuses.
    pub(super) fn start(
        mesh: &MeshSettings,
        metrics: &Metrics,
        logs: &LogSink,
    ) -> anyhow::Result<Option<Federation>> {
        let Some(etcd) = &mesh.etcd else {
            return Ok(None);
        };
        let host = mesh.host_id();
        let client = federation::Client::new(&etcd.endpoints)
            .context("cannot use the etcd endpoints of `[mesh] etcd`")?;
        let registry = federation::Registry::start(
            client.clone(),
            federation::RegistryConfig::new(&etcd.prefix, &host, etcd.lease_ttl),
        )
        .context("cannot register in etcd")?;
        let discovery = federation::Discovery::start(
            client,
            federation::DiscoveryConfig::new(&etcd.prefix, &host),
        )
        .context("cannot watch etcd")?;
        let table = discovery.subscribe();
        logs.mesh_line(&format!(
            "etcd: this host is `{host}`; registering ready endpoints under {}/endpoints/ (lease {}) at {}",
            etcd.prefix.trim_end_matches('/'),
            humantime::format_duration(etcd.lease_ttl),
            etcd.endpoints.join(", ")
        ));
        let (ready, ready_rx) = watch::channel(Ready::new());
        let stop = CancellationToken::new();
        let span = tracing::info_span!("registrar", host = %host);
        let task = tokio::spawn(register(registry, ready_rx, stop.clone()).instrument(span));
        let watcher = tokio::spawn(
            watch_table(table.clone(), metrics.clone(), logs.clone())
                .instrument(tracing::info_span!("remote_table")),
        );
        Ok(Some(Federation {
            host,
            ready,
            table,
            registrar: Mutex::new(Some(Registrar { stop, task })),
            discovery: Mutex::new(Some(discovery)),
            watcher,
            revoke_within: etcd.lease_ttl.min(Duration::from_secs(5)),
        }))
    }

    /// A receiver woken when the other hosts' endpoints change.
    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<federation::RemoteEndpoints>> {
        self.table.clone()
    }

    /// What `mesh ps` reads.
    pub(super) fn status(&self) -> RemoteStatus {
        RemoteStatus {
            table: Some(self.table.clone()),
        }
    }

    /// Make `ready` the set of this host's endpoints in etcd (after [`Federation::leave`]
    /// nothing is written any more).
    pub(super) fn register(&self, ready: Ready) {
        self.ready.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
    }

    /// Leave the mesh of hosts: stop registering and revoke the lease, so that every key
    /// of this host disappears from etcd in one revision. If etcd cannot be reached in
    /// time, the keys expire with the lease instead (keep-alives have stopped).
    pub(super) async fn leave(&self, logs: &LogSink) {
        let Some(registrar) = self.registrar.lock().take() else {
            return;
        };
        registrar.stop.cancel();
        let registry = match registrar.task.await {
            Ok(registry) => registry,
            Err(e) => {
                tracing::warn!(error = %e, "etcd registrar task failed");
                return;
            }
        };
        match tokio::time::timeout(self.revoke_within, registry.shutdown()).await {
            Ok(Ok(())) => logs.mesh_line(&format!(
                "etcd: left; the endpoints of `{}` are removed",
                self.host
            )),
            Ok(Err(e)) => logs.mesh_line(&format!(
                "etcd: cannot revoke the lease ({}); this host's endpoints expire with it",
                proxy::tls::error_chain(&e)
            )),
            Err(_) => logs.mesh_line(&format!(
                "etcd: no answer to the lease revocation within {}; this host's endpoints expire with the lease",
                humantime::format_duration(self.revoke_within)
            )),
        }
    }

    /// Stop watching etcd (after the services stopped).
    pub(super) async fn stop(&self) {
        let discovery = self.discovery.lock().take();
        if let Some(discovery) = discovery {
            discovery.shutdown().await;
        }
        self.watcher.abort();
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some(registrar) = self.registrar.get_mut().take() {
            registrar.task.abort();
        }
    }
}

// === impl RemoteStatus ===

impl RemoteStatus {
    /// One row per endpoint of another host, by service, host and replica; none without
    /// `[mesh] etcd`.
    pub(crate) fn rows(&self) -> Vec<RemoteRow> {
        let Some(table) = &self.table else {
            return Vec::new();
        };
        let table = table.borrow().clone();
        table
            .services
            .iter()
            .flat_map(|(service, endpoints)| {
                endpoints.iter().map(|e| RemoteRow {
                    service: service.clone(),
                    replica: e.replica,
                    host: e.host.clone(),
                    state: "remote",
                    health: "ready",
                    pid: None,
                    exit_code: None,
                    restarts: None,
                    port: None,
                    uptime_s: None,
                    rps: None,
                    success_rate: None,
                    p99_ms: None,
                    reason: None,
                    last_rollout: None,
                    address: e.address.to_string(),
                    stale: table.stale,
                })
            })
            .collect()
    }

    /// The rows as JSON values, to append to the local replicas' rows.
    pub(crate) fn json_rows(&self) -> Vec<serde_json::Value> {
        self.rows()
            .into_iter()
            .filter_map(|row| serde_json::to_value(row).ok())
            .collect()
    }
}

// === what the runtime makes of the table ===

/// The endpoints of other hosts that callers here may use for `service`: those whose
/// inbound speaks the service's protocol as this host's file says and presents its
/// identity (`spiffe://<mesh>/<service>`); an endpoint registered otherwise (a host with
/// another `protocol` or `name`) would fail every call, so it is left out and said once.
pub(super) fn remote_endpoints(
    config: &Config,
    table: &federation::RemoteEndpoints,
    service: &str,
    warned: &mut BTreeSet<(String, String, u32)>,
) -> Vec<proxy::discovery::Endpoint> {
    let Some(svc) = config.services.get(service) else {
        return Vec::new();
    };
    let identity = format!("spiffe://{}/{service}", config.mesh.name);
    let protocol = match svc.protocol {
        Protocol::Http => federation::Protocol::Http,
        Protocol::Grpc => federation::Protocol::Grpc,
        Protocol::Tcp => federation::Protocol::Tcp,
    };
    table
        .endpoints(service)
        .iter()
        .filter(|e| {
            let ok = e.protocol == protocol && e.identity == identity;
            if !ok && warned.insert((service.to_string(), e.host.clone(), e.replica)) {
                tracing::warn!(
                    service,
                    host = %e.host,
                    replica = e.replica,
                    identity = %e.identity,
                    protocol = ?e.protocol,
                    "ignoring an endpoint of another host: it does not speak {protocol:?} as {identity} (is its mesh.toml in step with this one?)"
                );
            }
            ok
        })
        .map(|e| proxy::discovery::Endpoint::remote(service, e.replica, &e.host, e.address))
        .collect()
}

/// The etcd value of this host's endpoint `service.replica`, its inbound at `addr`.
pub(super) fn endpoint(
    config: &Config,
    service: &str,
    replica: u32,
    addr: SocketAddr,
) -> Option<federation::Endpoint> {
    let svc = config.services.get(service)?;
    Some(federation::Endpoint {
        service: service.to_string(),
        replica,
        address: addr,
        identity: format!("spiffe://{}/{service}", config.mesh.name),
        protocol: match svc.protocol {
            Protocol::Http => federation::Protocol::Http,
            Protocol::Grpc => federation::Protocol::Grpc,
            Protocol::Tcp => federation::Protocol::Tcp,
        },
    })
}

// === tasks ===

/// The registrar: bring `registry` in line with every new `ready` set until `stop`, then
/// hand the registry back (for its revocation). A change etcd does not take now stays
/// with the registry, which writes it once etcd answers again.
async fn register(
    registry: federation::Registry,
    mut ready: watch::Receiver<Ready>,
    stop: CancellationToken,
) -> federation::Registry {
    let mut written = Ready::new();
    loop {
        let wanted = ready.borrow_and_update().clone();
        let sync = async {
            for (key, _) in written.iter().filter(|(k, _)| !wanted.contains_key(*k)) {
                if let Err(e) = registry.delete(&key.0, key.1).await {
                    tracing::debug!(service = %key.0, replica = key.1, error = %e, "etcd delete deferred");
                }
            }
            for (key, endpoint) in &wanted {
                if written.get(key) == Some(endpoint) {
                    continue;
                }
                if let Err(e) = registry.put(endpoint.clone()).await {
                    tracing::debug!(service = %key.0, replica = key.1, error = %e, "etcd put deferred");
                }
            }
        };
        tokio::select! {
            () = sync => written = wanted,
            () = stop.cancelled() => return registry,
        }
        tokio::select! {
            changed = ready.changed() => if changed.is_err() { return registry },
            () = stop.cancelled() => return registry,
        }
    }
}

/// Keep the metrics of the table, and tell in mesh's log what each other host serves
/// when that changes (`etcd: host `10.0.0.2` serves api, search (3 endpoints)`), and when
/// the table turns stale or fresh.
async fn watch_table(
    mut table: watch::Receiver<Arc<federation::RemoteEndpoints>>,
    metrics: Metrics,
    logs: LogSink,
) {
    // Per host: the services it serves, and how many endpoints.
    let mut hosts: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
    let mut services: BTreeSet<String> = BTreeSet::new();
    // The table starts stale (etcd not read yet): say "stale" only after it was fresh.
    let mut was_fresh = false;
    let mut ever_fresh = false;
    loop {
        let now = table.borrow_and_update().clone();
        metrics.set_remote_stale(now.stale);
        if now.stale && was_fresh {
            logs.mesh_line(
                "etcd: cannot be read; using the last known endpoints of other hosts (stale) until it can",
            );
        } else if !now.stale && !was_fresh && ever_fresh {
            logs.mesh_line("etcd: read again; the endpoints of other hosts are up to date");
        }
        was_fresh = !now.stale;
        ever_fresh |= !now.stale;
        if !now.stale {
            let mut seen: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
            for (service, endpoints) in &now.services {
                for e in endpoints {
                    let entry = seen.entry(e.host.clone()).or_default();
                    entry.0.insert(service.clone());
                    entry.1 += 1;
                }
            }
            for (host, (names, n)) in &seen {
                if hosts.get(host).is_none_or(|(before, _)| before != names) {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    logs.mesh_line(&format!(
                        "etcd: host `{host}` serves {} ({n} endpoint{})",
                        names.join(", "),
                        if *n == 1 { "" } else { "s" }
                    ));
                }
            }
            for host in hosts.keys() {
                if !seen.contains_key(host) {
                    logs.mesh_line(&format!("etcd: host `{host}` has no endpoints any more"));
                }
            }
            hosts = seen;
        }
        for service in services.iter().chain(now.services.keys()) {
            metrics.set_remote_endpoints(service, now.endpoints(service).len());
        }
        services.extend(now.services.keys().cloned());
        if table.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a failing test panics")]

    use super::*;

    fn config() -> Config {
        mesh_supervisor::config::parse(
            r#"
version = 1
[mesh]
name = "shop"
listen = "10.0.0.1"
etcd = { endpoints = ["http://10.0.0.9:2379"] }
[services.web]
command = "web"
upstreams = ["search"]
[services.search]
protocol = "grpc"
"#,
            std::path::Path::new("/srv/shop/mesh.toml"),
            &BTreeMap::new(),
        )
        .unwrap()
    }

    fn remote(
        host: &str,
        replica: u32,
        identity: &str,
        protocol: federation::Protocol,
    ) -> federation::RemoteEndpoint {
        federation::RemoteEndpoint {
            host: host.into(),
            replica,
            address: format!("{host}:4100{replica}").parse().unwrap(),
            identity: identity.into(),
            protocol,
        }
    }

    #[test]
    fn only_endpoints_that_speak_the_service_as_this_file_says_are_used() {
        let config = config();
        let grpc = federation::Protocol::Grpc;
        let table = federation::RemoteEndpoints {
            services: [(
                "search".to_string(),
                vec![
                    remote("10.0.0.2", 0, "spiffe://shop/search", grpc),
                    remote("10.0.0.3", 0, "spiffe://other/search", grpc),
                    remote(
                        "10.0.0.3",
                        1,
                        "spiffe://shop/search",
                        federation::Protocol::Http,
                    ),
                    remote("10.0.0.4", 2, "spiffe://shop/search", grpc),
                ],
            )]
            .into(),
            stale: false,
            revision: 7,
        };
        let mut warned = BTreeSet::new();
        let used = remote_endpoints(&config, &table, "search", &mut warned);
        let ids: Vec<&str> = used.iter().map(|e| &*e.id).collect();
        assert_eq!(ids, ["search.0@10.0.0.2", "search.2@10.0.0.4"]);
        assert!(
            used.iter().all(|e| e.local.is_none()),
            "remote endpoints take the socket path"
        );
        assert_eq!(used[0].addr, "10.0.0.2:41000".parse().unwrap());
        assert_eq!(warned.len(), 2, "each unusable endpoint said once");
        remote_endpoints(&config, &table, "search", &mut warned);
        assert_eq!(warned.len(), 2);
        assert!(remote_endpoints(&config, &table, "web", &mut warned).is_empty());
        assert!(remote_endpoints(&config, &table, "unknown", &mut warned).is_empty());
    }

    #[test]
    fn status_rows_say_host_address_and_staleness() {
        let (tx, rx) = watch::channel(Arc::new(federation::RemoteEndpoints {
            services: [(
                "search".to_string(),
                vec![remote(
                    "10.0.0.2",
                    0,
                    "spiffe://shop/search",
                    federation::Protocol::Grpc,
                )],
            )]
            .into(),
            stale: true,
            revision: 3,
        }));
        let status = RemoteStatus { table: Some(rx) };
        let rows = status.json_rows();
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row["service"], "search");
        assert_eq!(row["host"], "10.0.0.2");
        assert_eq!(row["state"], "remote");
        assert_eq!(row["address"], "10.0.0.2:41000");
        assert_eq!(row["stale"], true);
        assert!(row["pid"].is_null() && row["restarts"].is_null());
        tx.send_replace(Arc::new(federation::RemoteEndpoints::default()));
        assert!(status.rows().is_empty());
        assert!(RemoteStatus::default().rows().is_empty());
    }

    #[test]
    fn this_hosts_endpoint_is_registered_with_its_identity_and_protocol() {
        let config = config();
        let addr: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let e = endpoint(&config, "search", 1, addr).unwrap();
        assert_eq!(
            (
                e.service.as_str(),
                e.replica,
                e.address,
                e.identity.as_str(),
                e.protocol
            ),
            (
                "search",
                1,
                addr,
                "spiffe://shop/search",
                federation::Protocol::Grpc
            )
        );
        assert!(endpoint(&config, "nope", 0, addr).is_none());
    }
}
