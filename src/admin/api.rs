//! The dashboard's JSON (SPEC §5): typed rows, a call graph with its layout, a service's
//! details and its log lines, built from the supervisor's status, the configuration in
//! force and the proxy's per-second rings ([`mesh_proxy::stats::Stats`]).
//!
//! Everything here is a function of those inputs, read once per answer or per event:
//! nothing is kept between two of them, so the admin server's memory does not grow with
//! time or traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mesh_proxy::metrics::Metrics;
use mesh_proxy::stats::{BalancerView, Call, Stats, Via};
use mesh_supervisor::config::{Config, Protocol, TlsMode};
use mesh_supervisor::lifecycle::State;
use mesh_supervisor::logs;
use mesh_supervisor::supervisor::Statuses;
use serde::Serialize;

/// The caller name of every ingress (`expose`), and its graph node.
pub(crate) const INGRESS: &str = "ingress";
/// The caller name of the test ingresses (`mesh run`, the fixture), and its graph node.
pub(crate) const TEST: &str = "test";
/// Log lines `/api/logs` gives at most.
pub(crate) const LOG_LINES_MAX: usize = 500;
/// Log lines a service's details carry.
pub(crate) const DETAIL_LOG_LINES: usize = 20;
/// Points of a sparkline at most: a longer period is summed into coarser steps.
const SPARK_POINTS: u64 = 60;

/// The period the windowed figures cover: `10s`, `1m` or `5m` (the ring holds 5 min).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Period {
    #[default]
    TenSeconds,
    OneMinute,
    FiveMinutes,
}

/// One replica, as `mesh ps --json` prints it (SPEC §4), with its inbound's traffic.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct StatusRow {
    pub(crate) service: String,
    pub(crate) replica: u32,
    pub(crate) state: &'static str,
    pub(crate) health: &'static str,
    pub(crate) pid: Option<u32>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) restarts: u32,
    pub(crate) port: Option<u16>,
    pub(crate) uptime_s: Option<u64>,
    /// What the replica's inbound served over the last 10 s; null without an inbound or
    /// without requests.
    pub(crate) rps: Option<f64>,
    pub(crate) success_rate: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    /// Why it is not ready, once `ready_timeout` passed.
    pub(crate) reason: Option<String>,
    /// `failed: <line>` while its last rolling replacement failed.
    pub(crate) last_rollout: Option<String>,
}

/// The page's header: what mesh this is.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct MeshInfo {
    pub(crate) name: String,
    pub(crate) version: &'static str,
    /// `mutual` or `off` (the page shows a red banner for `off`).
    pub(crate) tls: &'static str,
    /// The CA-expiry warning, while it lasts.
    pub(crate) warning: Option<String>,
    pub(crate) uptime_s: u64,
    /// Access-log lines dropped because the writer fell behind.
    pub(crate) access_log_dropped: u64,
}

/// `5/5 ready, 0 restarting`, as `STATUS=` says it (SPEC §6).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Summary {
    pub(crate) ready: usize,
    pub(crate) replicas: usize,
    pub(crate) restarting: usize,
    pub(crate) line: String,
}

/// One row of the services table: the replicas summed, and the traffic into the service
/// from every caller over the period.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServiceRow {
    pub(crate) service: String,
    pub(crate) protocol: &'static str,
    /// `ready` (every replica), `partial` (some), `starting`, `down` (a replica crashed
    /// or failed and none is ready), `stopped`, `completed`, `not-started`.
    pub(crate) state: &'static str,
    pub(crate) ready: u32,
    pub(crate) replicas: u32,
    pub(crate) restarts: u32,
    /// The youngest process's uptime: a recent restart shows.
    pub(crate) uptime_s: Option<u64>,
    /// The last exit code any replica reported.
    pub(crate) exit_code: Option<i32>,
    pub(crate) ports: Vec<u16>,
    /// `http://ADDR/` of its ingress (`ADDR` for tcp), when exposed.
    pub(crate) ingress: Option<String>,
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    pub(crate) success_rate: Option<f64>,
    /// The highest p50 and p99 among its callers' edges.
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) errors: BTreeMap<&'static str, u64>,
    /// Requests per second, oldest first, over the period (at most 60 points).
    pub(crate) series: Vec<f64>,
}

/// The call graph: who calls whom, declared and observed.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Graph {
    pub(crate) window: &'static str,
    pub(crate) nodes: Vec<Node>,
    pub(crate) edges: Vec<GraphEdge>,
}

/// A service, `ingress` or `test`, placed by the layered layout: `layer` is the column
/// (callers to the left of what they call), `order` the row within it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Node {
    pub(crate) id: String,
    /// `service`, `ingress` or `test`.
    pub(crate) kind: &'static str,
    pub(crate) layer: u32,
    pub(crate) order: u32,
    pub(crate) protocol: Option<&'static str>,
    pub(crate) ready: u32,
    pub(crate) replicas: u32,
    /// As [`ServiceRow::state`]; `ready` for the ingress nodes.
    pub(crate) state: &'static str,
}

/// Caller → service, every route summed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct GraphEdge {
    pub(crate) caller: String,
    pub(crate) service: String,
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    pub(crate) success_rate: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    /// How the last call travelled: `in-process`, `mtls` or `plain`.
    pub(crate) via: Option<Via>,
    /// Declared in mesh.toml (`upstreams`, `expose`).
    pub(crate) declared: bool,
    /// Declared, and no request in the period.
    pub(crate) idle: bool,
    /// Calls answered `unauthorized` in the period.
    pub(crate) refused: bool,
    pub(crate) refused_count: u64,
    pub(crate) errors: BTreeMap<&'static str, u64>,
}

/// What the page shows for a selected service.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServiceDetail {
    pub(crate) service: String,
    pub(crate) window: &'static str,
    pub(crate) replicas: Vec<StatusRow>,
    pub(crate) upstreams: Vec<String>,
    /// Edges into it over the period.
    pub(crate) callers: Vec<GraphEdge>,
    /// Each caller's balancer towards it: its endpoints and their state (ready,
    /// ejected, breaker-open, probing) and requests in flight.
    pub(crate) endpoints: Vec<BalancerView>,
    pub(crate) errors: BTreeMap<&'static str, u64>,
    pub(crate) routes: Vec<RouteView>,
    pub(crate) logs: Vec<LogLine>,
}

/// A route of the service with its configured and observed split.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RouteView {
    /// The `route` label: its index in `routes`.
    pub(crate) route: String,
    pub(crate) path_prefix: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) backends: Vec<BackendView>,
    /// Recent calls of this route (from the calls ring) the observed split counts.
    pub(crate) calls: u64,
}

/// A backend of a route.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BackendView {
    pub(crate) service: String,
    pub(crate) weight: u32,
    /// `weight` over the route's total weight.
    pub(crate) configured: f64,
    /// Share of the route's recent calls that went to it; null without calls.
    pub(crate) observed: Option<f64>,
}

/// One stored output line of a replica.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LogLine {
    pub(crate) ts: String,
    pub(crate) replica: u32,
    pub(crate) stream: &'static str,
    pub(crate) line: String,
}

/// `/api/calls`: calls after `since`, oldest first.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Calls {
    pub(crate) last_seq: u64,
    pub(crate) calls: Vec<Arc<Call>>,
}

/// Everything the page shows but the calls and a service's details: the `status` and
/// `tick` events, and `/api/snapshot` with the calls.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Frame {
    pub(crate) window: &'static str,
    pub(crate) mesh: MeshInfo,
    pub(crate) summary: Summary,
    pub(crate) status: Vec<StatusRow>,
    pub(crate) services: Vec<ServiceRow>,
    pub(crate) graph: Graph,
}

/// The first event of a stream: a [`Frame`] and the recent calls.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Snapshot {
    #[serde(flatten)]
    pub(crate) frame: Frame,
    #[serde(flatten)]
    pub(crate) calls: Calls,
}

/// What the builders read of the running mesh.
pub(crate) struct Inputs<'a> {
    pub(crate) config: &'a Config,
    pub(crate) statuses: &'a Statuses,
    pub(crate) observed: &'a Observed,
    /// Exposed services' ingress addresses.
    pub(crate) ingresses: &'a BTreeMap<String, SocketAddr>,
    /// Whether the mesh has test ingresses (`mesh run`, the fixture).
    pub(crate) test_ingresses: bool,
}

/// The traffic of every (caller, service) pair over a period, routes summed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Observed {
    pub(crate) period: Period,
    pub(crate) edges: BTreeMap<(String, String), Traffic>,
}

/// One (caller, service) pair's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Traffic {
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    /// Successful requests (success rate × requests, summed over routes).
    pub(crate) succeeded: f64,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) errors: BTreeMap<&'static str, u64>,
    pub(crate) via: Option<Via>,
    /// Requests per second, oldest first, one per second of the period.
    pub(crate) series: Vec<u32>,
}

// === impl Period ===

impl Period {
    /// Every period, shortest first.
    pub(crate) const ALL: [Period; 3] =
        [Period::TenSeconds, Period::OneMinute, Period::FiveMinutes];

    /// `10s`, `1m` or `5m`.
    pub(crate) fn parse(text: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.as_str() == text)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Period::TenSeconds => "10s",
            Period::OneMinute => "1m",
            Period::FiveMinutes => "5m",
        }
    }

    pub(crate) fn secs(self) -> u64 {
        match self {
            Period::TenSeconds => 10,
            Period::OneMinute => 60,
            Period::FiveMinutes => 300,
        }
    }
}

// === impl Traffic ===

impl Traffic {
    fn success_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| round(self.succeeded / self.requests as f64, 4))
    }

    /// Add another route's (or caller's) figures.
    fn add(&mut self, other: &Traffic) {
        self.requests += other.requests;
        self.rps += other.rps;
        self.succeeded += other.succeeded;
        self.p50_ms = max_opt(self.p50_ms, other.p50_ms);
        self.p99_ms = max_opt(self.p99_ms, other.p99_ms);
        for (kind, n) in &other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
        self.via = self.via.or(other.via);
        if self.series.len() < other.series.len() {
            self.series.resize(other.series.len(), 0);
        }
        for (sum, n) in self.series.iter_mut().zip(&other.series) {
            *sum += n;
        }
    }
}

// === builders ===

/// Every edge's figures over `period`, read from the rings.
pub(crate) fn observe(stats: &Stats, period: Period) -> Observed {
    let mut edges: BTreeMap<(String, String), Traffic> = BTreeMap::new();
    for (key, edge) in stats.edges() {
        let w = edge.window(period.secs());
        let route = Traffic {
            requests: w.requests,
            rps: w.rps,
            succeeded: w.success_rate.unwrap_or(0.0) * w.requests as f64,
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            errors: w.errors,
            via: w.via,
            series: edge.series(period.secs()),
        };
        edges
            .entry((key.caller, key.service))
            .or_default()
            .add(&route);
    }
    Observed { period, edges }
}

/// The `/api/status` rows (SPEC §4), with each replica's inbound traffic.
pub(crate) fn status_rows(statuses: &Statuses, metrics: &Metrics) -> Vec<StatusRow> {
    statuses
        .values()
        .map(|r| {
            let traffic = metrics.replica_summary(&r.service, r.replica);
            StatusRow {
                service: r.service.clone(),
                replica: r.replica,
                state: r.state.as_str(),
                health: r.health,
                pid: r.pid,
                exit_code: r.exit_code,
                restarts: r.restarts,
                port: r.port,
                uptime_s: r.since.map(|since| since.elapsed().as_secs()),
                rps: traffic.map(|t| round(t.rps, 1)),
                success_rate: traffic.and_then(|t| t.success_rate).map(|s| round(s, 4)),
                p99_ms: traffic
                    .and_then(|t| t.p99)
                    .map(|p| round(p.as_secs_f64() * 1000.0, 2)),
                reason: r.reason.clone(),
                last_rollout: r
                    .rollout_failed
                    .as_ref()
                    .map(|line| format!("failed: {line}")),
            }
        })
        .collect()
}

/// The header's facts.
pub(crate) fn mesh_info(config: &Config, stats: &Stats, warning: Option<String>) -> MeshInfo {
    MeshInfo {
        name: config.mesh.name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        tls: match config.mesh.tls {
            TlsMode::Mutual => "mutual",
            TlsMode::Off => "off",
        },
        warning,
        uptime_s: stats.uptime().as_secs(),
        access_log_dropped: stats.access_log_dropped(),
    }
}

/// `3/4 ready, 1 restarting`: a replica counts as ready when ready or completed, as
/// restarting while in backoff or failed (as `STATUS=` counts them).
pub(crate) fn summary(statuses: &Statuses) -> Summary {
    let replicas = statuses.len();
    let ready = statuses.values().filter(|r| r.ready).count();
    let restarting = statuses
        .values()
        .filter(|r| matches!(r.state, State::Backoff | State::Failed))
        .count();
    Summary {
        ready,
        replicas,
        restarting,
        line: format!("{ready}/{replicas} ready, {restarting} restarting"),
    }
}

/// The services table, in name order.
pub(crate) fn services(inputs: &Inputs<'_>) -> Vec<ServiceRow> {
    let into = traffic_into(inputs.observed);
    let step = spark_step(inputs.observed.period);
    inputs
        .config
        .services
        .values()
        .map(|svc| {
            let replicas: Vec<_> = inputs
                .statuses
                .values()
                .filter(|r| r.service == svc.name)
                .collect();
            let traffic = into.get(svc.name.as_str()).cloned().unwrap_or_default();
            let ingress = inputs
                .ingresses
                .get(&svc.name)
                .map(|addr| match svc.protocol {
                    Protocol::Tcp => addr.to_string(),
                    _ => format!("http://{addr}/"),
                });
            ServiceRow {
                service: svc.name.clone(),
                protocol: protocol_name(svc.protocol),
                state: service_state(inputs.statuses, &svc.name),
                ready: replicas.iter().filter(|r| r.ready).count() as u32,
                replicas: replicas.len() as u32,
                restarts: replicas.iter().map(|r| r.restarts).sum(),
                uptime_s: replicas
                    .iter()
                    .filter_map(|r| r.since.map(|s| s.elapsed().as_secs()))
                    .min(),
                exit_code: replicas.iter().find_map(|r| r.exit_code),
                ports: replicas.iter().filter_map(|r| r.port).collect(),
                ingress,
                requests: traffic.requests,
                rps: round(traffic.rps, 2),
                success_rate: traffic.success_rate(),
                p50_ms: traffic.p50_ms,
                p99_ms: traffic.p99_ms,
                errors: traffic.errors.clone(),
                series: sparkline(&traffic.series, step),
            }
        })
        .collect()
}

/// The call graph: the services, `ingress` when a service is exposed or an ingress
/// called, `test` when there are test ingresses or one called; the observed edges and
/// the declared ones without traffic (`idle`).
pub(crate) fn graph(inputs: &Inputs<'_>) -> Graph {
    let config = inputs.config;
    let observed = inputs.observed;
    let mut declared: BTreeSet<(String, String)> = BTreeSet::new();
    for svc in config.services.values() {
        for upstream in &svc.upstreams {
            declared.insert((svc.name.clone(), upstream.clone()));
        }
        if svc.expose.is_some() {
            declared.insert((INGRESS.to_string(), svc.name.clone()));
        }
    }
    let mut edges: Vec<GraphEdge> = Vec::new();
    let pairs: BTreeSet<&(String, String)> = declared
        .iter()
        .chain(
            observed
                .edges
                .keys()
                .filter(|k| observed.edges[*k].requests > 0),
        )
        .collect();
    for pair in pairs {
        let traffic = observed.edges.get(pair).cloned().unwrap_or_default();
        let refused_count = traffic.errors.get("unauthorized").copied().unwrap_or(0);
        edges.push(GraphEdge {
            caller: pair.0.clone(),
            service: pair.1.clone(),
            requests: traffic.requests,
            rps: round(traffic.rps, 2),
            success_rate: traffic.success_rate(),
            p99_ms: traffic.p99_ms,
            via: traffic.via,
            declared: declared.contains(pair),
            idle: traffic.requests == 0,
            refused: refused_count > 0,
            refused_count,
            errors: traffic.errors,
        });
    }

    let callers: BTreeSet<&str> = edges.iter().map(|e| e.caller.as_str()).collect();
    let mut roots: Vec<(&str, &'static str)> = Vec::new();
    if callers.contains(INGRESS) {
        roots.push((INGRESS, "ingress"));
    }
    if inputs.test_ingresses || callers.contains(TEST) {
        roots.push((TEST, "test"));
    }
    let layers = layers(config);
    let mut nodes: Vec<Node> = roots
        .iter()
        .map(|(id, kind)| Node {
            id: id.to_string(),
            kind,
            layer: 0,
            order: 0,
            protocol: None,
            ready: 0,
            replicas: 0,
            state: "ready",
        })
        .collect();
    for svc in config.services.values() {
        let replicas: Vec<_> = inputs
            .statuses
            .values()
            .filter(|r| r.service == svc.name)
            .collect();
        nodes.push(Node {
            id: svc.name.clone(),
            kind: "service",
            layer: layers.get(&svc.name).copied().unwrap_or(1),
            order: 0,
            protocol: Some(protocol_name(svc.protocol)),
            ready: replicas.iter().filter(|r| r.ready).count() as u32,
            replicas: replicas.len() as u32,
            state: service_state(inputs.statuses, &svc.name),
        });
    }
    order_layers(&mut nodes, &edges);
    Graph {
        window: observed.period.as_str(),
        nodes,
        edges,
    }
}

/// One service's details; `None` for a service the configuration does not have.
pub(crate) fn detail(
    inputs: &Inputs<'_>,
    rows: &[StatusRow],
    recent: &[Arc<Call>],
    endpoints: Vec<BalancerView>,
    logs: Vec<LogLine>,
    service: &str,
) -> Option<ServiceDetail> {
    let svc = inputs.config.services.get(service)?;
    let graph = graph(inputs);
    let callers: Vec<GraphEdge> = graph
        .edges
        .into_iter()
        .filter(|e| e.service == service)
        .collect();
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    for edge in &callers {
        for (kind, n) in &edge.errors {
            *errors.entry(kind).or_default() += n;
        }
    }
    let routes = svc
        .routes
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let label = i.to_string();
            let total: u64 = route.backends.iter().map(|(_, w)| u64::from(*w)).sum();
            // Which backend answered each recent call of this route: the service part of
            // the endpoint of its last try (`api-v2.0`).
            let mut by_backend: BTreeMap<&str, u64> = BTreeMap::new();
            let mut calls = 0;
            for call in recent
                .iter()
                .filter(|c| &*c.service == service && *c.route == *label)
            {
                let Some(replica) = call.replica.as_deref() else {
                    continue;
                };
                let backend = replica.rsplit_once('.').map_or(replica, |(s, _)| s);
                *by_backend.entry(backend).or_default() += 1;
                calls += 1;
            }
            RouteView {
                route: label.clone(),
                path_prefix: route.path_prefix.clone(),
                headers: route.headers.clone(),
                backends: route
                    .backends
                    .iter()
                    .map(|(backend, weight)| BackendView {
                        service: backend.clone(),
                        weight: *weight,
                        configured: if total == 0 {
                            0.0
                        } else {
                            round(f64::from(*weight) / total as f64, 4)
                        },
                        observed: (calls > 0).then(|| {
                            let n = by_backend.get(backend.as_str()).copied().unwrap_or(0);
                            round(n as f64 / calls as f64, 4)
                        }),
                    })
                    .collect(),
                calls,
            }
        })
        .collect();
    Some(ServiceDetail {
        service: service.to_string(),
        window: inputs.observed.period.as_str(),
        replicas: rows
            .iter()
            .filter(|r| r.service == service)
            .cloned()
            .collect(),
        upstreams: svc.upstreams.clone(),
        callers,
        endpoints,
        errors,
        routes,
        logs,
    })
}

/// The last `n` stored lines of `service` (every replica with a log file, merged in time
/// order), from the files `mesh logs` reads.
pub(crate) fn log_lines(logs_dir: &Path, service: &str, n: usize) -> io::Result<Vec<LogLine>> {
    let mut lines: Vec<LogLine> = Vec::new();
    for replica in logs::replicas_in(logs_dir, service)? {
        for raw in logs::read_tail_raw(logs_dir, service, replica, n)? {
            if let Some(record) = logs::parse_file_line(&raw) {
                lines.push(LogLine {
                    ts: record.ts,
                    replica,
                    stream: record.stream.as_str(),
                    line: record.line,
                });
            }
        }
    }
    // Timestamps are fixed-width RFC 3339: text order is time order. Stable, so one
    // replica's lines of the same millisecond keep their order.
    lines.sort_by(|a, b| a.ts.cmp(&b.ts));
    let skip = lines.len().saturating_sub(n);
    Ok(lines.split_off(skip))
}

// === helpers ===

/// The column of each service: 1 + the length of the longest chain of declared callers
/// above it (`upstreams`, and a service above its route backends), so that every
/// service stands to the right of whoever calls it; column 0 holds `ingress` and `test`.
/// A cycle is cut at the edge that closes it, visiting in name order, so the result
/// never depends on anything but the configuration.
pub(crate) fn layers(config: &Config) -> BTreeMap<String, u32> {
    let mut below: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for svc in config.services.values() {
        let entry = below.entry(svc.name.as_str()).or_default();
        for upstream in &svc.upstreams {
            entry.insert(upstream.as_str());
        }
        for route in &svc.routes {
            for (backend, _) in &route.backends {
                if backend != &svc.name {
                    entry.insert(backend.as_str());
                }
            }
        }
    }
    // Keep only edges to known services, then drop the edges that close a cycle: a
    // depth-first walk in name order; an edge to a node still on the walk's path is a
    // back edge.
    let known: BTreeSet<&str> = below.keys().copied().collect();
    let mut dag: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut mark: BTreeMap<&str, u8> = BTreeMap::new(); // 1 on the path, 2 done
    for start in known.iter().copied() {
        if mark.contains_key(start) {
            continue;
        }
        // An explicit stack of (node, next child index).
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        mark.insert(start, 1);
        while let Some((node, next)) = stack.last().copied() {
            let children: Vec<&str> = below[node]
                .iter()
                .copied()
                .filter(|c| known.contains(c))
                .collect();
            if let Some(child) = children.get(next).copied() {
                if let Some(top) = stack.last_mut() {
                    top.1 += 1;
                }
                match mark.get(child) {
                    Some(1) => {} // closes a cycle: left out
                    Some(_) => dag.entry(node).or_default().push(child),
                    None => {
                        dag.entry(node).or_default().push(child);
                        mark.insert(child, 1);
                        stack.push((child, 0));
                    }
                }
            } else {
                mark.insert(node, 2);
                stack.pop();
            }
        }
    }
    // Longest path from a node nobody calls, by relaxing in topological order.
    let mut indegree: BTreeMap<&str, usize> = known.iter().map(|n| (*n, 0)).collect();
    for children in dag.values() {
        for child in children {
            *indegree.entry(child).or_default() += 1;
        }
    }
    let mut ready: BTreeSet<&str> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| *n)
        .collect();
    let mut layer: BTreeMap<String, u32> = known.iter().map(|n| (n.to_string(), 1)).collect();
    while let Some(node) = ready.pop_first() {
        let here = layer[node];
        for child in dag.get(node).into_iter().flatten() {
            if let Some(l) = layer.get_mut(*child) {
                *l = (*l).max(here + 1);
            }
            if let Some(d) = indegree.get_mut(child) {
                *d -= 1;
                if *d == 0 {
                    ready.insert(child);
                }
            }
        }
    }
    layer
}

/// The row of each node within its column: column 0 `ingress` then `test`; each later
/// column by the mean row of the nodes that call it from columns to its left (so edges
/// cross less), ties and uncalled nodes by name.
fn order_layers(nodes: &mut [Node], edges: &[GraphEdge]) {
    let max_layer = nodes.iter().map(|n| n.layer).max().unwrap_or(0);
    let mut position: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for layer in 0..=max_layer {
        let mut in_layer: Vec<(f64, String)> = nodes
            .iter()
            .filter(|n| n.layer == layer)
            .map(|n| {
                let rows: Vec<f64> = edges
                    .iter()
                    .filter(|e| e.service == n.id)
                    .filter_map(|e| position.get(&e.caller))
                    .filter(|(l, _)| *l < layer)
                    .map(|(_, row)| f64::from(*row))
                    .collect();
                let key = if layer == 0 {
                    // ingress before test.
                    if n.id == INGRESS { 0.0 } else { 1.0 }
                } else if rows.is_empty() {
                    f64::MAX
                } else {
                    rows.iter().sum::<f64>() / rows.len() as f64
                };
                (key, n.id.clone())
            })
            .collect();
        in_layer.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        for (row, (_, id)) in in_layer.into_iter().enumerate() {
            position.insert(id, (layer, row as u32));
        }
    }
    for node in nodes.iter_mut() {
        if let Some((_, row)) = position.get(&node.id) {
            node.order = *row;
        }
    }
}

/// The traffic into each service, every caller summed.
fn traffic_into(observed: &Observed) -> BTreeMap<&str, Traffic> {
    let mut into: BTreeMap<&str, Traffic> = BTreeMap::new();
    for ((_, service), traffic) in &observed.edges {
        into.entry(service.as_str()).or_default().add(traffic);
    }
    into
}

/// A service's state from its replicas'.
fn service_state(statuses: &Statuses, service: &str) -> &'static str {
    let replicas: Vec<_> = statuses.values().filter(|r| r.service == service).collect();
    if replicas.is_empty() {
        return "not-started";
    }
    let ready = replicas.iter().filter(|r| r.ready).count();
    let all = |states: &[State]| replicas.iter().all(|r| states.contains(&r.state));
    if all(&[State::Completed]) {
        "completed"
    } else if all(&[State::Stopped, State::Stopping]) {
        "stopped"
    } else if ready == replicas.len() {
        "ready"
    } else if replicas.iter().any(|r| {
        matches!(
            r.state,
            State::Backoff | State::Failed | State::Exited | State::Blocked
        )
    }) && ready == 0
    {
        "down"
    } else if ready > 0 {
        "partial"
    } else {
        "starting"
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http => "http",
        Protocol::Grpc => "grpc",
        Protocol::Tcp => "tcp",
    }
}

/// Seconds summed per sparkline point for `period`.
fn spark_step(period: Period) -> u64 {
    period.secs().div_ceil(SPARK_POINTS).max(1)
}

/// Per-second counts summed into steps of `step` seconds, as requests per second.
fn sparkline(series: &[u32], step: u64) -> Vec<f64> {
    let step = usize::try_from(step).unwrap_or(1).max(1);
    series
        .chunks(step)
        .map(|chunk| {
            let sum: u64 = chunk.iter().map(|n| u64::from(*n)).sum();
            round(sum as f64 / chunk.len() as f64, 2)
        })
        .collect()
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

pub(crate) fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests;
