//! The sidecars' metrics (SPEC §5), in one registry per mesh.
//!
//! Sidecars record through a cheap, cloneable [`Metrics`] handle; the admin server renders
//! [`Metrics::encode`] as Prometheus text. Families are keyed by label sets of owned
//! strings; the label values are bounded by the configuration (service names, status
//! classes, error kinds), never by request content.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Which side of a hop between sidecars saw a TLS handshake fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A caller's outbound (or an ingress) connecting to an inbound.
    Client,
    /// An inbound accepting a connection.
    Server,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// The kind of listener a connection came to, for
/// `mesh_http_connection_errors_total{listener}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// A caller's outbound, facing its local app.
    Outbound,
    /// An ingress (`expose`), facing whoever can reach its address.
    Ingress,
    /// A replica's inbound, facing other sidecars.
    Inbound,
}

impl Listener {
    fn as_str(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Ingress => "ingress",
            Listener::Inbound => "inbound",
        }
    }
}

/// Why a client's HTTP connection to a sidecar ended with an error: what the peer did, in
/// a few bounded kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionError {
    /// The HTTP/2 client reset or provoked more streams than allowed (rapid reset) and
    /// was sent GOAWAY `ENHANCE_YOUR_CALM`.
    Flood,
    /// The client broke HTTP: a malformed HTTP/1.1 head, an HTTP/2 protocol error.
    Protocol,
    /// The client sent no request (head) in time, or stopped answering HTTP/2 pings.
    Timeout,
    /// The connection broke: reset by the client, or closed in the middle of a message.
    Io,
    /// Anything else.
    Other,
}

impl ConnectionError {
    /// The `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionError::Flood => "flood",
            ConnectionError::Protocol => "protocol",
            ConnectionError::Timeout => "timeout",
            ConnectionError::Io => "io",
            ConnectionError::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    listener: String,
    caller: String,
    service: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
    caller: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    caller: String,
    service: String,
    route: String,
    status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    caller: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    caller: String,
    service: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    service: String,
    side: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    service: String,
    replica: String,
}

fn duration_histogram() -> Histogram {
    // 100 µs .. ~100 s.
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 100.0,
    ])
}

struct Inner {
    registry: Registry,
    /// Recent traffic of each replica's inbound, for `mesh ps`.
    replicas: parking_lot::Mutex<BTreeMap<(String, u32), Arc<ReplicaStats>>>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<PairLabels, Histogram, fn() -> Histogram>,
    retries: Family<PairLabels, Counter>,
    ejections: Family<PairLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    connection_errors: Family<ConnectionLabels, Counter>,
    restarts: Family<ReplicaLabels, Counter>,
    cert_expiry: Family<ReplicaLabels, Gauge>,
    connections: Family<ListenerLabels, Counter>,
    /// Endpoints of other hosts known from etcd, per service (SPEC §9).
    remote_endpoints: Family<ServiceLabels, Gauge>,
    /// 1 while the table of other hosts' endpoints may be out of date.
    remote_stale: Gauge,
    /// What the dashboard reads (per-second rings, recent calls, the access log).
    stats: crate::stats::Stats,
}

/// The metrics of one mesh. Clones share the same families.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh");
        let requests = Family::<RequestLabels, Counter>::default();
        let durations = Family::<PairLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let retries = Family::<PairLabels, Counter>::default();
        let ejections = Family::<PairLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        let connection_errors = Family::<ConnectionLabels, Counter>::default();
        let restarts = Family::<ReplicaLabels, Counter>::default();
        let cert_expiry = Family::<ReplicaLabels, Gauge>::default();
        let connections = Family::<ListenerLabels, Counter>::default();
        let remote_endpoints = Family::<ServiceLabels, Gauge>::default();
        let remote_stale = Gauge::default();
        registry.register(
            "requests",
            "Requests answered by callers' outbounds and ingresses",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival at the outbound or ingress to its response headers",
            durations.clone(),
        );
        registry.register("retries", "Retries made by outbounds", retries.clone());
        registry.register(
            "ejections",
            "Endpoints taken out of a caller's balancer (connect failures, circuit breaker)",
            ejections.clone(),
        );
        registry.register(
            "errors",
            "Failures the mesh produced itself, by kind (SPEC §1)",
            errors.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes between sidecars that failed",
            handshake_failures.clone(),
        );
        registry.register(
            "http_connection_errors",
            "Clients' HTTP connections to sidecars that ended with an error, by kind (counted, \
             not logged)",
            connection_errors.clone(),
        );
        registry.register(
            "connections",
            "Connections accepted by sidecar listeners (an inbound's are calls from other \
             hosts, or all calls with local_path = \"tls\"; local calls cross no socket)",
            connections.clone(),
        );
        registry.register(
            "process_restarts",
            "Restarts of each replica's process",
            restarts.clone(),
        );
        registry.register(
            "cert_expiry_timestamp_seconds",
            "Not-after of each replica's leaf certificate, as a Unix timestamp",
            cert_expiry.clone(),
        );
        registry.register(
            "remote_endpoints",
            "Endpoints of other hosts known from etcd, by service (used while the service has \
             no ready endpoint here)",
            remote_endpoints.clone(),
        );
        registry.register(
            "remote_endpoints_stale",
            "1 while etcd cannot be read and the endpoints of other hosts are the last known \
             ones, else 0",
            remote_stale.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                replicas: parking_lot::Mutex::default(),
                requests,
                durations,
                retries,
                ejections,
                errors,
                handshake_failures,
                connection_errors,
                restarts,
                cert_expiry,
                connections,
                remote_endpoints,
                remote_stale,
                stats: crate::stats::Stats::new(),
            }),
        }
    }

    /// The dashboard's recorder of this mesh.
    pub fn stats(&self) -> &crate::stats::Stats {
        &self.inner.stats
    }

    /// The request counters of one outbound (or ingress): `caller` calling `service`.
    /// Recording through it allocates no labels and looks nothing up in the families
    /// after the first request of each route and status class.
    pub fn requests(&self, caller: &str, service: &str) -> RequestMetrics {
        RequestMetrics {
            metrics: self.clone(),
            caller: caller.to_string(),
            service: service.to_string(),
            duration: self
                .inner
                .durations
                .get_or_create_owned(&pair(caller, service)),
            routes: parking_lot::RwLock::default(),
        }
    }

    /// One retry by `caller`'s outbound towards `service`.
    pub fn retry(&self, caller: &str, service: &str) {
        self.inner
            .retries
            .get_or_create(&pair(caller, service))
            .inc();
    }

    /// One endpoint of `service` ejected from `caller`'s balancer.
    pub fn ejection(&self, caller: &str, service: &str) {
        self.inner
            .ejections
            .get_or_create(&pair(caller, service))
            .inc();
    }

    /// A failure the mesh produced itself (SPEC §1 kind: `no-endpoints`, `reset`, …),
    /// whatever the protocol; for tcp this is the only trace besides the log.
    pub fn mesh_error(&self, caller: &str, service: &str, kind: &str) {
        self.inner
            .errors
            .get_or_create(&ErrorLabels {
                caller: caller.to_string(),
                service: service.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// A TLS handshake between sidecars failed; `service` is the inbound's service for
    /// [`Side::Server`] and the called service for [`Side::Client`].
    pub fn tls_handshake_failure(&self, service: &str, side: Side) {
        self.inner
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                service: service.to_string(),
                side: side.as_str().to_string(),
            })
            .inc();
    }

    /// Where one HTTP listener counts the connections its clients end with an error:
    /// `caller` is the app (or "ingress") an outbound or ingress listener serves, "" for
    /// an inbound, whose clients are other sidecars; `service` the called service (the
    /// replica's own for an inbound).
    pub fn connection_errors(
        &self,
        listener: Listener,
        caller: &str,
        service: &str,
    ) -> ConnectionErrors {
        ConnectionErrors {
            metrics: self.clone(),
            listener,
            caller: caller.into(),
            service: service.into(),
            accepted: self.connections(listener, caller, service),
        }
    }

    /// `mesh_connections_total` of one listener: add one per accepted connection.
    pub fn connections(&self, listener: Listener, caller: &str, service: &str) -> Counter {
        self.inner.connections.get_or_create_owned(&ListenerLabels {
            listener: listener.as_str().to_string(),
            caller: caller.to_string(),
            service: service.to_string(),
        })
    }

    /// Raise a replica's restart counter to `total` (restarts are counted by the
    /// supervisor; this mirrors them).
    pub fn set_restarts(&self, service: &str, replica: u32, total: u64) {
        let counter = self.inner.restarts.get_or_create_owned(&ReplicaLabels {
            service: service.to_string(),
            replica: replica.to_string(),
        });
        let now = counter.get();
        if total > now {
            counter.inc_by(total - now);
        }
    }

    /// The not-after of a replica's current leaf certificate.
    pub fn set_cert_expiry(&self, service: &str, replica: u32, unix_secs: i64) {
        self.inner
            .cert_expiry
            .get_or_create(&ReplicaLabels {
                service: service.to_string(),
                replica: replica.to_string(),
            })
            .set(unix_secs);
    }

    /// How many endpoints of `service` other hosts registered in etcd.
    pub fn set_remote_endpoints(&self, service: &str, count: usize) {
        self.inner
            .remote_endpoints
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Whether the endpoints of other hosts are the last known ones (etcd cannot be read).
    pub fn set_remote_stale(&self, stale: bool) {
        self.inner.remote_stale.set(i64::from(stale));
    }

    /// The recent-traffic recorder of one replica's inbound (created on first use).
    pub fn replica(&self, service: &str, replica: u32) -> Arc<ReplicaStats> {
        let mut replicas = self.inner.replicas.lock();
        Arc::clone(
            replicas
                .entry((service.to_string(), replica))
                .or_insert_with(|| Arc::new(ReplicaStats::new())),
        )
    }

    /// What one replica's inbound served over the last [`WINDOW_SECS`] seconds, if it
    /// has an inbound.
    pub fn replica_summary(&self, service: &str, replica: u32) -> Option<Summary> {
        let stats = self
            .inner
            .replicas
            .lock()
            .get(&(service.to_string(), replica))
            .cloned()?;
        Some(stats.summary())
    }

    /// The total of `mesh_tls_handshake_failures_total` over all labels (for tests and
    /// status lines).
    pub fn tls_handshake_failures_total(&self) -> u64 {
        let text = self.encode();
        sum_of(&text, "mesh_tls_handshake_failures_total")
    }

    /// Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
        {
            tracing::warn!(%error, "cannot encode metrics");
        }
        out
    }
}

/// `mesh_http_connection_errors_total` of one listener ([`Metrics::connection_errors`]).
#[derive(Clone)]
pub struct ConnectionErrors {
    metrics: Metrics,
    listener: Listener,
    caller: Arc<str>,
    service: Arc<str>,
    /// `mesh_connections_total` of the same listener.
    accepted: Counter,
}

impl std::fmt::Debug for ConnectionErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionErrors")
            .field("listener", &self.listener)
            .field("caller", &self.caller)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ConnectionErrors {
    /// One client connection accepted.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// One client connection ended with an error of `kind`.
    pub fn record(&self, kind: ConnectionError) {
        self.metrics
            .inner
            .connection_errors
            .get_or_create(&ConnectionLabels {
                listener: self.listener.as_str().to_string(),
                caller: self.caller.to_string(),
                service: self.service.to_string(),
                kind: kind.as_str().to_string(),
            })
            .inc();
    }
}

/// `mesh_requests_total` and `mesh_request_duration_seconds` of one (caller, service),
/// with the counters of each route label resolved once ([`Metrics::requests`]).
pub struct RequestMetrics {
    metrics: Metrics,
    caller: String,
    service: String,
    duration: Histogram,
    /// Per route label (few: a service's routes, and "" for unmatched traffic), a
    /// counter per status class once that class was seen.
    routes: parking_lot::RwLock<Vec<(String, [Option<Counter>; 5])>>,
}

impl RequestMetrics {
    /// A request answered through `route` ("" for none) with `status` after `took`.
    pub fn record(&self, route: &str, status: u16, took: Duration) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.duration.observe(took.as_secs_f64());
        let known = self
            .routes
            .read()
            .iter()
            .find(|(label, _)| label == route)
            .and_then(|(_, counters)| counters[class].clone());
        let counter = known.unwrap_or_else(|| self.counter(route, class));
        counter.inc();
    }

    /// Resolve (once) the counter of `route` and status class `class`.
    fn counter(&self, route: &str, class: usize) -> Counter {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let counter = self
            .metrics
            .inner
            .requests
            .get_or_create_owned(&RequestLabels {
                caller: self.caller.clone(),
                service: self.service.clone(),
                route: route.to_string(),
                status_class: CLASSES[class].to_string(),
            });
        let mut routes = self.routes.write();
        let index = match routes.iter().position(|(label, _)| label == route) {
            Some(index) => index,
            None => {
                routes.push((route.to_string(), Default::default()));
                routes.len() - 1
            }
        };
        routes[index].1[class] = Some(counter.clone());
        counter
    }
}

/// The span of recent traffic `mesh ps` summarises.
pub const WINDOW_SECS: u64 = 10;

use crate::stats::{latency_bounds, quantile_us};

#[derive(Clone)]
struct Second {
    /// Seconds since the recorder started; buckets of older seconds are stale.
    at: u64,
    total: u64,
    ok: u64,
    latency: Vec<u32>,
}

/// Requests served by one replica's inbound over the last seconds: rate, success rate and
/// p99, as `mesh ps` shows them. One ring of per-second buckets behind a mutex that only
/// this replica's requests take.
pub struct ReplicaStats {
    started: Instant,
    ring: parking_lot::Mutex<Vec<Second>>,
}

/// A replica's recent traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of responses that were not 5xx, `None` without requests.
    pub success_rate: Option<f64>,
    /// 99th percentile of the time to response headers, `None` without requests.
    pub p99: Option<Duration>,
}

impl ReplicaStats {
    fn new() -> Self {
        let empty = Second {
            at: u64::MAX,
            total: 0,
            ok: 0,
            latency: vec![0; latency_bounds().len()],
        };
        ReplicaStats {
            started: Instant::now(),
            ring: parking_lot::Mutex::new(vec![empty; WINDOW_SECS as usize]),
        }
    }

    /// One response (`status`) after `took`.
    pub fn record(&self, status: u16, took: Duration) {
        let now = self.started.elapsed().as_secs();
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = latency_bounds().partition_point(|&b| b < micros);
        let mut ring = self.ring.lock();
        let slot = &mut ring[(now % WINDOW_SECS) as usize];
        if slot.at != now {
            slot.at = now;
            slot.total = 0;
            slot.ok = 0;
            slot.latency.iter_mut().for_each(|c| *c = 0);
        }
        slot.total += 1;
        if status < 500 {
            slot.ok += 1;
        }
        slot.latency[bucket] += 1;
    }

    /// A response already recorded whose body the app then broke: one success fewer
    /// in the current second (the request counts as failed).
    pub fn cut(&self) {
        let now = self.started.elapsed().as_secs();
        let mut ring = self.ring.lock();
        let slot = &mut ring[(now % WINDOW_SECS) as usize];
        if slot.at == now && slot.ok > 0 {
            slot.ok -= 1;
        }
    }

    /// The window up to now.
    pub fn summary(&self) -> Summary {
        let elapsed = self.started.elapsed();
        let now = elapsed.as_secs();
        let ring = self.ring.lock();
        let mut total = 0;
        let mut ok = 0;
        let mut latency = vec![0u64; latency_bounds().len()];
        for slot in ring.iter() {
            if slot.at == u64::MAX || now.saturating_sub(slot.at) >= WINDOW_SECS {
                continue;
            }
            total += slot.total;
            ok += slot.ok;
            for (sum, c) in latency.iter_mut().zip(&slot.latency) {
                *sum += u64::from(*c);
            }
        }
        // A young recorder has seen less than a whole window.
        let span = elapsed.as_secs_f64().clamp(1.0, WINDOW_SECS as f64);
        let p99 = (total > 0).then(|| Duration::from_micros(quantile_us(&latency, total, 99)));
        Summary {
            rps: total as f64 / span,
            success_rate: (total > 0).then(|| ok as f64 / total as f64),
            p99,
        }
    }
}

fn pair(caller: &str, service: &str) -> PairLabels {
    PairLabels {
        caller: caller.to_string(),
        service: service.to_string(),
    }
}

/// The sum of every sample of `name` in Prometheus text.
pub fn sum_of(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next())
        .filter_map(|value| value.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_appear_in_the_text_with_their_labels() {
        let metrics = Metrics::new();
        let requests = metrics.requests("web", "api");
        requests.record("", 200, Duration::from_millis(3));
        requests.record("", 503, Duration::from_millis(3));
        metrics.retry("web", "api");
        metrics.tls_handshake_failure("api", Side::Server);
        metrics.tls_handshake_failure("api", Side::Server);
        metrics.set_restarts("api", 0, 3);
        metrics.set_restarts("api", 0, 2);
        let ingress = metrics.connection_errors(Listener::Ingress, "ingress", "web");
        ingress.record(ConnectionError::Flood);
        ingress.record(ConnectionError::Flood);
        metrics
            .connection_errors(Listener::Inbound, "", "api")
            .record(ConnectionError::Timeout);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"mesh_requests_total{caller="web",service="api",route="",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("mesh_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_retries_total{caller="web",service="api"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_process_restarts_total{service="api",replica="0"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"mesh_http_connection_errors_total{listener="ingress",caller="ingress",service="web",kind="flood"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"mesh_http_connection_errors_total{listener="inbound",caller="",service="api",kind="timeout"} 1"#
            ),
            "{text}"
        );
        assert_eq!(metrics.tls_handshake_failures_total(), 2);
        assert_eq!(sum_of(&text, "mesh_requests_total"), 2);
    }

    #[test]
    fn replica_summary_gives_rate_success_and_p99() {
        let metrics = Metrics::new();
        assert_eq!(metrics.replica_summary("api", 0), None);
        let stats = metrics.replica("api", 0);
        assert_eq!(stats.summary().p99, None);
        for i in 0..100u64 {
            let status = if i < 10 { 503 } else { 200 };
            let took = if i == 99 {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(2)
            };
            stats.record(status, took);
        }
        let summary = metrics.replica_summary("api", 0).expect("recorded");
        // Within the first second the window counts as one second long.
        assert!((summary.rps - 100.0).abs() < 1e-9, "{summary:?}");
        assert_eq!(summary.success_rate, Some(0.9));
        // 99 of 100 took 2 ms: the p99 is the bucket holding 2 ms (within 25 %).
        let p99 = summary.p99.expect("p99");
        assert!(
            p99 >= Duration::from_millis(2) && p99 <= Duration::from_micros(2500),
            "{p99:?}"
        );
    }
}
