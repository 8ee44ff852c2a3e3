//! What the dashboard shows (SPEC §5), recorded on the data path into memory that the
//! admin server reads directly: per (caller, service, route) edge a ring of per-second
//! buckets (requests by status class, mesh errors by kind, retries, a latency
//! histogram) over the last [`RING_SECS`] seconds, and the last [`CALLS_KEPT`] calls.
//! Each call also goes to the access log (SPEC §5 `access_log`), written by a thread of
//! its own from a bounded queue: when the queue is full the line is dropped and counted,
//! never waited for.
//!
//! Memory is bounded: an edge holds `RING_SECS` buckets of about 300 bytes (≈ 90 KiB,
//! allocated at its first request); edges exist only for declared (caller, service,
//! route) triples; the call ring holds `CALLS_KEPT` calls; the access-log queue
//! [`ACCESS_QUEUE`] lines.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::balance::{Balancer, EndpointView, WeakBalancer};
use serde::Serialize;

/// Seconds of history per edge: the longest window the dashboard offers (5 min).
pub const RING_SECS: u64 = 300;
/// Calls kept for `/api/calls` and the live-calls table.
pub const CALLS_KEPT: usize = 256;
/// Access-log lines waiting for the writer; beyond it lines are dropped and counted.
pub const ACCESS_QUEUE: usize = 8192;

/// The mesh errors (SPEC §1) an edge counts, in this order.
pub const ERROR_KINDS: [&str; 9] = [
    "no-endpoints",
    "connect-failed",
    "reset",
    "timeout",
    "circuit-open",
    "overloaded",
    "rate-limited",
    "unauthorized",
    "fault",
];

/// How a call travelled from the caller's sidecar to the callee's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Handed over inside the process (SPEC §1 "The local path").
    InProcess,
    /// Over mutual TLS to the inbound's listener.
    Mtls,
    /// Over plain HTTP/2 or TCP (`tls = "off"`).
    Plain,
}

/// One call as an outbound or ingress answered it.
#[derive(Clone, Debug, Serialize)]
pub struct Call {
    /// Increasing per mesh: `/api/calls?since=` and the live stream use it.
    pub seq: u64,
    /// When the response headers went back, Unix milliseconds.
    pub ts_ms: u64,
    /// The W3C trace id (32 hex digits) of the request's `traceparent`.
    pub trace_id: TraceId,
    pub caller: Arc<str>,
    pub service: Arc<str>,
    /// The endpoint (`service.replica`) of the last try, if any try went out.
    pub replica: Option<Arc<str>>,
    /// The route's name, "" when no route matched.
    pub route: Arc<str>,
    #[serde(serialize_with = "method_str")]
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    /// The mesh error kind when the mesh answered itself (`x-mesh-error`).
    pub error: Option<&'static str>,
    pub attempts: u32,
    pub duration_us: u64,
    /// How the last try travelled (`None` when none went out).
    pub via: Option<Via>,
}

/// A W3C trace id as a call keeps it: up to 32 bytes (the 32 hex digits of a valid one)
/// held inline, so that recording a call does not allocate for it. Serialized as a string.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceId {
    len: u8,
    bytes: [u8; 32],
}

impl TraceId {
    /// The id as text ("" for none).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl From<&str> for TraceId {
    /// The first 32 bytes of `id` (a trace id is 32 hex digits), cut at a character
    /// boundary.
    fn from(id: &str) -> Self {
        let mut end = id.len().min(32);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 32];
        bytes[..end].copy_from_slice(&id.as_bytes()[..end]);
        TraceId {
            len: u8::try_from(end).unwrap_or(0),
            bytes,
        }
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

fn method_str<S: serde::Serializer>(
    method: &http::Method,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(method.as_str())
}

/// A (caller, service, route) triple: one edge of the call graph, per route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EdgeKey {
    pub caller: String,
    pub service: String,
    pub route: String,
}

/// Figures of an edge over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Window {
    pub requests: u64,
    pub rps: f64,
    /// Share of responses that are neither 5xx nor a mesh error; `None` without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub by_class: [u64; 5],
    /// Mesh errors by kind (only the kinds seen).
    pub errors: BTreeMap<&'static str, u64>,
    pub retries: u64,
    /// The last way a call of this edge travelled.
    pub via: Option<Via>,
}

/// The recorder of one mesh. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Stats {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

struct Inner {
    started: Instant,
    /// `started` as Unix milliseconds: calls' timestamps without a second clock read.
    started_unix_ms: u64,
    edges: RwLock<BTreeMap<EdgeKey, Arc<Edge>>>,
    calls: Mutex<VecDeque<Arc<Call>>>,
    seq: AtomicU64,
    access: RwLock<Option<AccessLog>>,
    /// Every caller's balancer, for the endpoints view; gone ones are skipped.
    balancers: Mutex<Vec<(String, String, WeakBalancer)>>,
}

/// A caller's view of one service's endpoints ([`Stats::balancers`]).
#[derive(Clone, Debug, Serialize)]
pub struct BalancerView {
    pub caller: String,
    pub service: String,
    pub endpoints: Vec<EndpointView>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            inner: Arc::new(Inner {
                started: Instant::now(),
                started_unix_ms: unix_ms(),
                edges: RwLock::default(),
                calls: Mutex::new(VecDeque::with_capacity(CALLS_KEPT)),
                seq: AtomicU64::new(0),
                access: RwLock::new(None),
                balancers: Mutex::default(),
            }),
        }
    }

    /// The edge of `caller` calling `service` through `route` ("" for none), created at
    /// its first use; keep it and record through it.
    pub fn edge(&self, caller: &str, service: &str, route: &str) -> Arc<Edge> {
        let key = EdgeKey {
            caller: caller.to_string(),
            service: service.to_string(),
            route: route.to_string(),
        };
        if let Some(edge) = self.inner.edges.read().get(&key) {
            return Arc::clone(edge);
        }
        let mut edges = self.inner.edges.write();
        let edge = edges.entry(key).or_insert_with(|| {
            Arc::new(Edge {
                started: self.inner.started,
                ring: Mutex::new(Vec::new()),
                via: Mutex::new(None),
            })
        });
        Arc::clone(edge)
    }

    /// Record one call of `edge`: its bucket, the call ring, the access log.
    pub fn record(&self, edge: &Edge, call: Call) {
        self.record_at(edge, call, Instant::now());
    }

    /// [`Stats::record`] for a call that ended at `now` (read once by the caller); its
    /// `ts_ms` is set from it.
    pub fn record_at(&self, edge: &Edge, mut call: Call, now: Instant) {
        let since = now.saturating_duration_since(self.inner.started);
        call.ts_ms = self.inner.started_unix_ms + u64::try_from(since.as_millis()).unwrap_or(0);
        edge.record(&call, since.as_secs());
        call.seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let call = Arc::new(call);
        if let Some(access) = &*self.inner.access.read() {
            access.send(&call);
        }
        let mut calls = self.inner.calls.lock();
        if calls.len() == CALLS_KEPT {
            calls.pop_front();
        }
        calls.push_back(call);
    }

    /// Every edge seen, in key order.
    pub fn edges(&self) -> Vec<(EdgeKey, Arc<Edge>)> {
        self.inner
            .edges
            .read()
            .iter()
            .map(|(k, e)| (k.clone(), Arc::clone(e)))
            .collect()
    }

    /// The calls after `since` (a [`Call::seq`]), oldest first, at most `limit`, newest
    /// kept when there are more.
    pub fn calls_since(&self, since: u64, limit: usize) -> Vec<Arc<Call>> {
        let calls = self.inner.calls.lock();
        let newer: Vec<Arc<Call>> = calls.iter().filter(|c| c.seq > since).cloned().collect();
        let skip = newer.len().saturating_sub(limit);
        newer.into_iter().skip(skip).collect()
    }

    /// The sequence number of the last call recorded (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.inner.seq.load(Ordering::Relaxed)
    }

    /// Start writing one JSON line per call to `sink` (SPEC §5 `access_log`).
    pub fn set_access_log(&self, sink: Box<dyn std::io::Write + Send>) {
        *self.inner.access.write() = Some(AccessLog::start(sink));
    }

    /// Access-log lines dropped because the writer fell behind.
    pub fn access_log_dropped(&self) -> u64 {
        self.inner
            .access
            .read()
            .as_ref()
            .map_or(0, |a| a.dropped.load(Ordering::Relaxed))
    }

    /// Show `balancer` (of `caller`) in [`Stats::balancers`] while it lives.
    pub(crate) fn watch_balancer(&self, caller: &str, balancer: &Balancer) {
        let mut all = self.inner.balancers.lock();
        all.retain(|(_, _, weak)| weak.upgrade().is_some());
        if !all.iter().any(|(_, _, weak)| weak.is(balancer)) {
            all.push((
                caller.to_string(),
                balancer.service().to_string(),
                balancer.downgrade(),
            ));
        }
    }

    /// Every live balancer's endpoints, by (caller, service).
    pub fn balancers(&self) -> Vec<BalancerView> {
        let all: Vec<(String, String, WeakBalancer)> = self.inner.balancers.lock().clone();
        let mut views: Vec<BalancerView> = all
            .into_iter()
            .filter_map(|(caller, service, weak)| {
                let balancer = weak.upgrade()?;
                Some(BalancerView {
                    caller,
                    service,
                    endpoints: balancer.view(),
                })
            })
            .collect();
        views.sort_by(|a, b| (&a.caller, &a.service).cmp(&(&b.caller, &b.service)));
        views.dedup_by(|a, b| a.caller == b.caller && a.service == b.service);
        views
    }

    /// Seconds since the recorder started.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }
}

/// One edge's per-second ring.
pub struct Edge {
    started: Instant,
    /// Allocated at the first request: `RING_SECS` buckets.
    ring: Mutex<Vec<Second>>,
    via: Mutex<Option<Via>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Second {
    at: u64,
    by_class: [u32; 5],
    errors: [u32; ERROR_KINDS.len()],
    retries: u32,
    latency: Vec<u32>,
}

impl Second {
    fn empty() -> Self {
        Second {
            at: u64::MAX,
            by_class: [0; 5],
            errors: [0; ERROR_KINDS.len()],
            retries: 0,
            latency: vec![0; latency_bounds().len()],
        }
    }

    fn reset(&mut self, at: u64) {
        self.at = at;
        self.by_class = [0; 5];
        self.errors = [0; ERROR_KINDS.len()];
        self.retries = 0;
        self.latency.iter_mut().for_each(|c| *c = 0);
    }
}

impl Edge {
    /// The bucket of second `now` (since the recorder started), cleared if it holds an
    /// older second.
    fn with_second(&self, now: u64, f: impl FnOnce(&mut Second)) {
        let mut ring = self.ring.lock();
        if ring.is_empty() {
            *ring = vec![Second::empty(); RING_SECS as usize];
        }
        let slot = &mut ring[(now % RING_SECS) as usize];
        if slot.at != now {
            slot.reset(now);
        }
        f(slot);
    }

    fn record(&self, call: &Call, second: u64) {
        let class = match call.status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        let bucket = latency_bounds().partition_point(|&b| b < call.duration_us);
        let error = call
            .error
            .and_then(|kind| ERROR_KINDS.iter().position(|k| *k == kind));
        let retries = call.attempts.saturating_sub(1);
        self.with_second(second, |slot| {
            slot.by_class[class] += 1;
            slot.retries += retries;
            if let Some(i) = error {
                slot.errors[i] += 1;
            }
            slot.latency[bucket] += 1;
        });
        if call.via.is_some() {
            *self.via.lock() = call.via;
        }
    }

    /// The figures of the last `secs` seconds (at most [`RING_SECS`]).
    pub fn window(&self, secs: u64) -> Window {
        let secs = secs.clamp(1, RING_SECS);
        let elapsed = self.started.elapsed();
        let now = elapsed.as_secs();
        let ring = self.ring.lock();
        let mut w = Window {
            via: *self.via.lock(),
            ..Window::default()
        };
        let mut latency = vec![0u64; latency_bounds().len()];
        let mut failed = 0u64;
        for slot in ring.iter() {
            if slot.at == u64::MAX || now.saturating_sub(slot.at) >= secs {
                continue;
            }
            for (sum, c) in w.by_class.iter_mut().zip(slot.by_class) {
                *sum += u64::from(c);
            }
            for (i, c) in slot.errors.iter().enumerate() {
                if *c > 0 {
                    *w.errors.entry(ERROR_KINDS[i]).or_default() += u64::from(*c);
                }
            }
            w.retries += u64::from(slot.retries);
            for (sum, c) in latency.iter_mut().zip(&slot.latency) {
                *sum += u64::from(*c);
            }
        }
        drop(ring);
        w.requests = w.by_class.iter().sum();
        failed += w.by_class[4];
        // Mesh errors answered with a 4xx (429, 403, a 4xx fault) are failures too.
        failed += w
            .errors
            .iter()
            .filter(|(kind, _)| matches!(**kind, "rate-limited" | "unauthorized" | "fault"))
            .map(|(_, n)| n)
            .sum::<u64>();
        let span = elapsed.as_secs_f64().clamp(1.0, secs as f64);
        w.rps = w.requests as f64 / span;
        if w.requests > 0 {
            w.success_rate = Some(1.0 - (failed.min(w.requests) as f64 / w.requests as f64));
            w.p50_ms = Some(quantile(&latency, w.requests, 50));
            w.p95_ms = Some(quantile(&latency, w.requests, 95));
            w.p99_ms = Some(quantile(&latency, w.requests, 99));
        }
        w
    }

    /// Requests per second over the last `secs` seconds, oldest first (a sparkline).
    pub fn series(&self, secs: u64) -> Vec<u32> {
        let secs = secs.clamp(1, RING_SECS);
        let now = self.started.elapsed().as_secs();
        let ring = self.ring.lock();
        (0..secs)
            .rev()
            .map(|ago| {
                let Some(at) = now.checked_sub(ago) else {
                    return 0;
                };
                ring.get((at % RING_SECS) as usize)
                    .filter(|slot| slot.at == at)
                    .map_or(0, |slot| slot.by_class.iter().sum())
            })
            .collect()
    }
}

/// The upper bound, in milliseconds, of the bucket holding the `percent`th percentile.
fn quantile(latency: &[u64], total: u64, percent: u64) -> f64 {
    quantile_us(latency, total, percent) as f64 / 1000.0
}

/// The upper bound, in microseconds, of the bucket of [`latency_bounds`] holding the
/// `percent`th percentile of `total` samples counted per bucket in `latency` (nearest
/// rank; within 25 % of the truth).
pub(crate) fn quantile_us(latency: &[u64], total: u64, percent: u64) -> u64 {
    let rank = (total * percent).div_ceil(100).max(1);
    let mut seen = 0;
    let index = latency
        .iter()
        .position(|c| {
            seen += c;
            seen >= rank
        })
        .unwrap_or(latency.len() - 1);
    let bounds = latency_bounds();
    bounds[index.min(bounds.len() - 2)]
}

/// Latency bucket bounds in microseconds: 50 µs to about 100 s, each 25 % above the one
/// before (the dashboard's edges and `mesh ps`'s replica figures).
pub(crate) fn latency_bounds() -> &'static [u64] {
    static BOUNDS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut bounds = Vec::new();
        let mut b = 50.0_f64;
        while b < 100e6 {
            bounds.push(b as u64);
            b *= 1.25;
        }
        bounds.push(u64::MAX);
        bounds
    })
}

/// The access-log writer: a bounded queue and a thread that formats and writes.
struct AccessLog {
    queue: std::sync::mpsc::SyncSender<Arc<Call>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    fn start(mut sink: Box<dyn std::io::Write + Send>) -> Self {
        let (queue, rx) = std::sync::mpsc::sync_channel::<Arc<Call>>(ACCESS_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("mesh-access-log".into())
            .spawn(move || {
                let mut line = Vec::with_capacity(512);
                while let Ok(call) = rx.recv() {
                    let mut batch = vec![call];
                    batch.extend(rx.try_iter().take(1024));
                    for call in batch {
                        line.clear();
                        access_line(&call, &mut line);
                        if sink.write_all(&line).is_err() {
                            return;
                        }
                    }
                    let _ = sink.flush();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the access-log writer; access log off");
        }
        AccessLog {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    fn send(&self, call: &Arc<Call>) {
        if self.queue.try_send(Arc::clone(call)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One access-log line (SPEC §5): ts, trace_id, caller, service, replica, route, method,
/// path, status, mesh error kind, attempts, duration_ms.
fn access_line(call: &Call, out: &mut Vec<u8>) {
    let ts = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(call.ts_ms));
    let line = serde_json::json!({
        "ts": ts.to_string(),
        "trace_id": call.trace_id.as_str(),
        "caller": &*call.caller,
        "service": &*call.service,
        "replica": call.replica.as_deref(),
        "route": &*call.route,
        "method": call.method.as_str(),
        "path": call.path,
        "status": call.status,
        "error": call.error,
        "attempts": call.attempts,
        "duration_ms": (call.duration_us as f64) / 1000.0,
    });
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_kept_inline_and_serialized_as_text() {
        let id = TraceId::from("0af7651916cd43dd8448eb211c80319c");
        assert_eq!(id.as_str(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(
            serde_json::to_string(&id).unwrap_or_default(),
            "\"0af7651916cd43dd8448eb211c80319c\""
        );
        // Longer text is cut at 32 bytes, on a character boundary.
        let long = format!("{}é", "a".repeat(31));
        assert_eq!(TraceId::from(long.as_str()).as_str(), "a".repeat(31));
        assert_eq!(TraceId::default().as_str(), "");
        let call = call(200, None, 10);
        let json = serde_json::to_value(&call).unwrap_or_default();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    }

    fn call(status: u16, error: Option<&'static str>, us: u64) -> Call {
        Call {
            seq: 0,
            ts_ms: unix_ms(),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            caller: "web".into(),
            service: "api".into(),
            replica: Some("api.0".into()),
            route: "".into(),
            method: http::Method::GET,
            path: "/".into(),
            status,
            error,
            attempts: 1,
            duration_us: us,
            via: Some(Via::InProcess),
        }
    }

    #[test]
    fn a_window_counts_classes_errors_and_quantiles() {
        let stats = Stats::new();
        let edge = stats.edge("web", "api", "");
        for _ in 0..98 {
            stats.record(&edge, call(200, None, 1_000));
        }
        stats.record(&edge, call(503, Some("no-endpoints"), 3_000_000));
        let mut retried = call(403, Some("unauthorized"), 100);
        retried.attempts = 2;
        stats.record(&edge, retried);
        let w = edge.window(10);
        assert_eq!(w.requests, 100);
        assert_eq!(w.by_class, [0, 98, 0, 1, 1]);
        assert_eq!(w.errors.get("no-endpoints"), Some(&1));
        assert_eq!(w.errors.get("unauthorized"), Some(&1));
        assert_eq!(w.retries, 1);
        assert_eq!(w.success_rate, Some(0.98));
        let p50 = w.p50_ms.unwrap();
        assert!((1.0..1.3).contains(&p50), "{p50}");
        assert!(w.p99_ms.unwrap() <= p50 * 1.3);
        assert_eq!(w.via, Some(Via::InProcess));
        assert_eq!(edge.series(5).iter().sum::<u32>(), 100);
    }

    #[tokio::test]
    async fn balancers_are_shown_while_they_live() {
        let registry = crate::discovery::Registry::new();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 1).into();
        registry.set("api", vec![crate::discovery::Endpoint::new("api.0", addr)]);
        let stats = Stats::new();
        let balancer = Balancer::new(
            "api",
            crate::balance::Algorithm::RoundRobin,
            registry.watch("api"),
        );
        stats.watch_balancer("web", &balancer);
        stats.watch_balancer("web", &balancer);
        let views = stats.balancers();
        assert_eq!(views.len(), 1);
        assert_eq!((&*views[0].caller, &*views[0].service), ("web", "api"));
        assert_eq!(views[0].endpoints[0].id, "api.0");
        assert_eq!(views[0].endpoints[0].state, "ready");
        drop(balancer);
        assert!(stats.balancers().is_empty());
    }

    #[test]
    fn the_call_ring_keeps_the_newest() {
        let stats = Stats::new();
        let edge = stats.edge("web", "api", "");
        for i in 0..(CALLS_KEPT as u64 + 10) {
            stats.record(&edge, call(200, None, i));
        }
        let all = stats.calls_since(0, usize::MAX);
        assert_eq!(all.len(), CALLS_KEPT);
        assert_eq!(all.last().unwrap().seq, stats.last_seq());
        let last3 = stats.calls_since(stats.last_seq() - 3, 10);
        assert_eq!(last3.len(), 3);
        assert_eq!(stats.calls_since(0, 2).len(), 2);
    }

    /// A sink that blocks until told: the queue fills, further lines are dropped and
    /// counted, and recording never waits.
    #[test]
    fn a_stuck_access_log_drops_and_counts() {
        struct Stuck(std::sync::mpsc::Receiver<()>);
        impl std::io::Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (_release, rx) = std::sync::mpsc::channel();
        let stats = Stats::new();
        stats.set_access_log(Box::new(Stuck(rx)));
        let edge = stats.edge("web", "api", "");
        let started = Instant::now();
        for _ in 0..(ACCESS_QUEUE + 2000) {
            stats.record(&edge, call(200, None, 10));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            stats.access_log_dropped() >= 900,
            "{}",
            stats.access_log_dropped()
        );
    }

    #[test]
    fn an_access_line_has_spec_fields() {
        let mut out = Vec::new();
        access_line(&call(502, Some("reset"), 1500), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for key in [
            "ts",
            "trace_id",
            "caller",
            "service",
            "replica",
            "route",
            "method",
            "path",
            "status",
            "error",
            "attempts",
            "duration_ms",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["error"], "reset");
        assert!(out.ends_with(b"\n"));
    }
}
