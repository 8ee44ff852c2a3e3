//! The admin server (SPEC §5): `/metrics`, `/live`, `/ready`, `/api/status`, the
//! dashboard's JSON (`/api/graph`, `/api/services`, `/api/service`, `/api/calls`,
//! `/api/logs`, `/api/snapshot`), its live stream (`/api/events`) and its page (`/`,
//! `/app.js`, `/style.css`), on `[mesh] admin` (default `127.0.0.1:0`).
//!
//! It is bound before any process starts (like every listener) and serves until `mesh`
//! exits, so that `/ready` can say 503 while the mesh stops.
//!
//! # Theory of operation
//!
//! The dashboard reads what the sidecars record in memory
//! ([`mesh_proxy::stats::Stats`]: per-second rings per edge, the last calls), the
//! supervisor's status channel and the configuration in force; it keeps nothing of its
//! own between two answers but the open event streams ([`events`]). One task produces
//! the events of every stream: the status at once when a replica's status changes, the
//! windowed figures every second (computed once per period that some page shows, not
//! once per page), new calls, keep-alives.
//!
//! The page is data, not code: `admin/page.html`, `app.js` and `style.css` are compiled
//! in with `include_str!` (no build step, nothing fetched from elsewhere). The page
//! carries its first snapshot inline, so it shows the mesh before its stream opens (and
//! its text can be searched by a test without a browser).
//!
//! Every request must name this server in its `Host` (a loopback name or address, or the
//! address it listens on): a web page elsewhere that points a DNS name of its own at
//! 127.0.0.1 (DNS rebinding) gets 403, so it cannot read the mesh's state.

mod api;
mod events;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_proxy::http::server::{ACCEPT_WARN_INTERVAL, WarnLimiter};
use mesh_proxy::metrics::Metrics;
use mesh_proxy::stats::{CALLS_KEPT, Stats};
use mesh_supervisor::supervisor::Statuses;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::api::Period;
use self::events::{Hub, To};
use crate::runtime::Runtime;

/// What the admin server reads.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) mesh_name: String,
    pub(crate) metrics: Metrics,
    pub(crate) status: watch::Receiver<Statuses>,
    /// Set when the mesh starts stopping: `/ready` answers 503 from then on.
    pub(crate) stopping: Arc<AtomicBool>,
    /// A warning that `/ready` carries while it lasts (e.g. the CA expires soon).
    pub(crate) warning: Arc<parking_lot::Mutex<Option<String>>>,
    /// The running mesh: the configuration in force (a reload changes it) and the
    /// addresses of its ingresses.
    pub(crate) runtime: Runtime,
    /// Where the replicas' output is kept (`state_dir/logs`, as `mesh logs` reads it).
    pub(crate) logs_dir: PathBuf,
}

/// Serve `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, state: AdminState) {
    let server = Arc::new(Server {
        own: listener.local_addr().ok(),
        state,
        hub: Hub::default(),
    });
    tokio::select! {
        () = accept(listener, Arc::clone(&server)) => {}
        () = produce_events(Arc::clone(&server)) => {}
    }
}

/// One JSON object per replica, as `mesh ps --json` prints them (SPEC §4).
/// Besides SPEC's fields, each carries the replica's recent traffic through its inbound
/// (`rps`, `success_rate`, `p99_ms`, over the last 10 s; null without an inbound or
/// without requests), `reason` (why it is not ready, once `ready_timeout` passed; else
/// null) and `last_rollout` (`failed: <line>` when its last rolling replacement failed,
/// until one succeeds; else null). With `[mesh] etcd`, each endpoint of another host
/// follows its service's replicas here (SPEC §9, `runtime::federation::RemoteRow`).
pub(crate) fn status_json(
    statuses: &Statuses,
    metrics: &Metrics,
    remote: &crate::runtime::RemoteStatus,
) -> String {
    let mut rows: Vec<serde_json::Value> = api::status_rows(statuses, metrics)
        .iter()
        .filter_map(|row| serde_json::to_value(row).ok())
        .collect();
    rows.extend(remote.json_rows());
    rows.sort_by(|a, b| a["service"].as_str().cmp(&b["service"].as_str()));
    serde_json::Value::Array(rows).to_string()
}

/// The server's state and its open event streams.
struct Server {
    state: AdminState,
    /// The address the admin listens on, which `Host` may name.
    own: Option<SocketAddr>,
    hub: Hub,
}

type Body = BoxBody<Bytes, Infallible>;

/// The page and its two files, compiled in.
const PAGE: &str = include_str!("admin/page.html");
const APP_JS: &str = include_str!("admin/app.js");
const STYLE_CSS: &str = include_str!("admin/style.css");

/// Calls the first event and `/api/calls` carry by default.
const CALLS_DEFAULT: usize = 100;

async fn accept(listener: TcpListener, server: Arc<Server>) {
    let mut accept_warnings = WarnLimiter::new(ACCEPT_WARN_INTERVAL);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Said once per interval, not once per retry.
                if let Some(more) = accept_warnings.hit(tokio::time::Instant::now()) {
                    tracing::warn!(%error, "admin accept failed{more}");
                }
                // Out of descriptors or similar: wait for the condition to pass rather
                // than spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            // Cancelled to close this connection: an event stream on it fell behind.
            let cut = CancellationToken::new();
            let service = {
                let cut = cut.clone();
                service_fn(move |req| {
                    let server = Arc::clone(&server);
                    let cut = cut.clone();
                    async move { Ok::<_, Infallible>(handle(&server, req, cut).await) }
                })
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "admin connection ended");
                    }
                }
                () = cut.cancelled() => {}
            }
        });
    }
}

async fn handle(server: &Server, req: Request<Incoming>, cut: CancellationToken) -> Response<Body> {
    if let Some(host) = foreign_host(&req, server.own) {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "mesh: Host `{host}` is not this admin server: use http://{}/ or localhost \
                 (foreign names are refused against DNS rebinding)\n",
                server
                    .own
                    .map_or_else(|| "127.0.0.1:PORT".to_string(), |a| a.to_string())
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string());
    }
    let state = &server.state;
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let period = match query.get("window").map(Period::parse) {
        None => Period::default(),
        Some(Some(period)) => period,
        Some(None) => {
            return text(
                StatusCode::BAD_REQUEST,
                "window must be 10s, 1m or 5m\n".to_string(),
            );
        }
    };
    match req.uri().path() {
        "/metrics" => {
            mirror_restarts(state);
            let mut response = text(StatusCode::OK, state.metrics.encode());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/live" => text(StatusCode::OK, "live\n".to_string()),
        "/ready" => ready(state),
        "/api/status" => json_text(status_json(
            &state.status.borrow(),
            &state.metrics,
            &state.runtime.remote_status(),
        )),
        "/api/graph" => json(&server.frame(period).graph),
        "/api/services" => json(&server.frame(period).services),
        "/api/snapshot" => json(&server.snapshot(period)),
        "/api/calls" => {
            let (Some(since), Some(n)) = (
                query.number("since", 0),
                query.number("n", CALLS_DEFAULT as u64),
            ) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "since and n are numbers\n".to_string(),
                );
            };
            let n = usize::try_from(n).unwrap_or(CALLS_KEPT).min(CALLS_KEPT);
            json(&calls(stats(state), since, n))
        }
        "/api/logs" => {
            let Some(service) = query.get("service").map(str::to_string) else {
                return text(StatusCode::BAD_REQUEST, "service= is missing\n".to_string());
            };
            let Some(n) = query.number("n", api::DETAIL_LOG_LINES as u64) else {
                return text(StatusCode::BAD_REQUEST, "n is a number\n".to_string());
            };
            let n = usize::try_from(n)
                .unwrap_or(api::LOG_LINES_MAX)
                .min(api::LOG_LINES_MAX);
            if !state.runtime.config().services.contains_key(&service) {
                return text(StatusCode::NOT_FOUND, format!("no service `{service}`\n"));
            }
            match server.logs(&service, n).await {
                Ok(lines) => json(&LogsAnswer { service, lines }),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot read the logs of `{service}`: {e}\n"),
                ),
            }
        }
        "/api/service" => {
            let Some(service) = query.get("name").map(str::to_string) else {
                return text(StatusCode::BAD_REQUEST, "name= is missing\n".to_string());
            };
            if !state.runtime.config().services.contains_key(&service) {
                return text(StatusCode::NOT_FOUND, format!("no service `{service}`\n"));
            }
            // Log lines that cannot be read leave the list empty: the rest still helps.
            let logs = server
                .logs(&service, api::DETAIL_LOG_LINES)
                .await
                .unwrap_or_default();
            match server.detail(period, &service, logs) {
                Some(detail) => json(&detail),
                None => text(StatusCode::NOT_FOUND, format!("no service `{service}`\n")),
            }
        }
        "/api/events" => {
            let mut response = Response::new(Full::new(Bytes::new()).boxed());
            if req.method() == Method::GET {
                let first = || events::event("snapshot", &server.snapshot(period));
                match server.hub.open(period, cut, first) {
                    Some(body) => *response.body_mut() = body.boxed(),
                    None => {
                        return text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "too many dashboard streams open (at most {})\n",
                                events::MAX_CLIENTS
                            ),
                        );
                    }
                }
            }
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        "/" => {
            let mut response = text(StatusCode::OK, server.page());
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            headers.insert(
                HeaderName::from_static("content-security-policy"),
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; \
                     connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
            );
            response
        }
        "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_string()),
    }
}

/// The owned inputs of [`api::Inputs`], gathered once per computation.
struct Gathered {
    config: Arc<mesh_supervisor::config::Config>,
    statuses: Statuses,
    observed: api::Observed,
    ingresses: std::collections::BTreeMap<String, std::net::SocketAddr>,
    test_ingresses: bool,
}

impl Gathered {
    fn inputs(&self) -> api::Inputs<'_> {
        api::Inputs {
            config: &self.config,
            statuses: &self.statuses,
            observed: &self.observed,
            ingresses: &self.ingresses,
            test_ingresses: self.test_ingresses,
        }
    }
}

// === impl Server ===

impl Server {
    /// Everything but the calls, over `period`.
    fn frame(&self, period: Period) -> api::Frame {
        let state = &self.state;
        let gathered = self.gather(period);
        let (config, statuses) = (&gathered.config, &gathered.statuses);
        let stats = stats(state);
        let inputs = gathered.inputs();
        api::Frame {
            window: period.as_str(),
            mesh: api::mesh_info(config, stats, state.warning.lock().clone()),
            summary: api::summary(statuses),
            status: api::status_rows(statuses, &state.metrics),
            services: api::services(&inputs),
            graph: api::graph(&inputs),
        }
    }

    /// What the frame and a service's details are computed from, over `period`.
    fn gather(&self, period: Period) -> Gathered {
        let state = &self.state;
        Gathered {
            config: state.runtime.config(),
            // A copy: the watch's lock is not held while the figures are computed.
            statuses: state.status.borrow().clone(),
            observed: api::observe(stats(state), period),
            ingresses: state.runtime.ingress_addrs(),
            test_ingresses: !state.runtime.test_addrs().is_empty(),
        }
    }

    /// A frame and the recent calls: a stream's first event.
    fn snapshot(&self, period: Period) -> api::Snapshot {
        api::Snapshot {
            frame: self.frame(period),
            calls: calls(stats(&self.state), 0, CALLS_DEFAULT),
        }
    }

    fn detail(
        &self,
        period: Period,
        service: &str,
        logs: Vec<api::LogLine>,
    ) -> Option<api::ServiceDetail> {
        let state = &self.state;
        let gathered = self.gather(period);
        let stats = stats(state);
        let inputs = gathered.inputs();
        let rows = api::status_rows(&gathered.statuses, &state.metrics);
        let recent = stats.calls_since(0, CALLS_KEPT);
        let endpoints = balancers(stats, service);
        api::detail(&inputs, &rows, &recent, endpoints, logs, service)
    }

    /// The last `n` log lines of `service`, read off the runtime's thread.
    async fn logs(&self, service: &str, n: usize) -> std::io::Result<Vec<api::LogLine>> {
        let dir = self.state.logs_dir.clone();
        let service = service.to_string();
        tokio::task::spawn_blocking(move || api::log_lines(&dir, &service, n))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The page, with the mesh's name and a first snapshot in it.
    fn page(&self) -> String {
        let snapshot = serde_json::to_string(&self.snapshot(Period::default()))
            .unwrap_or_else(|_| "null".into());
        PAGE.replace("{{name}}", &escape_html(&self.state.mesh_name))
            .replace("{{snapshot}}", &escape_script_json(&snapshot))
    }
}

/// The one task that feeds every open stream (see [`events`]).
async fn produce_events(server: Arc<Server>) {
    let hub = &server.hub;
    let stats = stats(&server.state).clone();
    let mut status = server.state.status.clone();
    status.borrow_and_update();
    let mut status_open = true;
    let mut tick = tokio::time::interval(events::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = tokio::time::Instant::now() + events::KEEP_ALIVE;
    let mut keep_alive = tokio::time::interval_at(start, events::KEEP_ALIVE);
    let mut last_seq = stats.last_seq();
    loop {
        tokio::select! {
            changed = status.changed(), if status_open => {
                if changed.is_err() {
                    status_open = false;
                    continue;
                }
                for period in hub.periods() {
                    hub.send(To::Period(period), &events::event("status", &server.frame(period)));
                }
            }
            _ = tick.tick() => {
                if hub.is_empty() {
                    last_seq = stats.last_seq();
                    continue;
                }
                let calls = calls(&stats, last_seq, CALLS_KEPT);
                if !calls.calls.is_empty() {
                    last_seq = calls.last_seq;
                    hub.send(To::All, &events::event("calls", &calls));
                }
                for period in hub.periods() {
                    hub.send(To::Period(period), &events::event("tick", &server.frame(period)));
                }
            }
            _ = keep_alive.tick() => hub.send(To::All, &events::keep_alive()),
        }
    }
}

/// `/api/logs`.
#[derive(Serialize)]
struct LogsAnswer {
    service: String,
    lines: Vec<api::LogLine>,
}

fn stats(state: &AdminState) -> &Stats {
    state.metrics.stats()
}

/// The calls after `since`, at most `n` (the newest), and the last sequence number.
fn calls(stats: &Stats, since: u64, n: usize) -> api::Calls {
    let last_seq = stats.last_seq();
    let calls = stats.calls_since(since, n);
    api::Calls {
        last_seq: calls.last().map_or(last_seq, |c| c.seq.max(since)),
        calls,
    }
}

/// The endpoints of every caller's balancer towards `service` (their state: ready,
/// ejected, breaker-open, probing).
fn balancers(stats: &Stats, service: &str) -> Vec<mesh_proxy::stats::BalancerView> {
    let mut all = stats.balancers();
    all.retain(|b| b.service == service);
    all
}

/// The `Host` of `req` when it names neither a loopback name or address nor the admin's
/// own address (any IP address when it listens on all of them); `None` when it is fine
/// or absent (no browser sends a request without one).
fn foreign_host(req: &Request<Incoming>, own: Option<SocketAddr>) -> Option<String> {
    let host = match req.headers().get(HOST) {
        Some(value) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
        None => req.uri().authority()?.as_str().to_string(),
    };
    (!host_allowed(&host, own)).then_some(host)
}

fn host_allowed(host: &str, own: Option<SocketAddr>) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => {
            ip.is_loopback() || own.is_some_and(|own| own.ip() == ip || own.ip().is_unspecified())
        }
        Err(_) => false,
    }
}

/// A query string's pairs, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The number under `key`, `default` when absent; `None` when it is not a number.
    fn number(&self, key: &str, default: u64) -> Option<u64> {
        match self.get(key) {
            None => Some(default),
            Some(v) => v.parse().ok(),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn json(value: &impl Serialize) -> Response<Body> {
    json_text(serde_json::to_string(value).unwrap_or_else(|_| "null".into()))
}

fn json_text(body: String) -> Response<Body> {
    let mut response = text(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// 200 when every service is ready (each replica ready or completed) and the mesh is not
/// stopping; 503 naming what is not, otherwise.
fn ready(state: &AdminState) -> Response<Body> {
    if state.stopping.load(Ordering::SeqCst) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_string());
    }
    let not_ready: Vec<String> = state
        .status
        .borrow()
        .values()
        .filter(|r| !r.ready)
        .map(|r| format!("{}.{} {}", r.service, r.replica, r.state))
        .collect();
    let warning = state.warning.lock().clone();
    let warning = warning
        .map(|w| format!("warning: {w}\n"))
        .unwrap_or_default();
    if not_ready.is_empty() {
        text(StatusCode::OK, format!("ready\n{warning}"))
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n{warning}", not_ready.join(", ")),
        )
    }
}

/// Keep `mesh_process_restarts_total` equal to the supervisor's counts.
fn mirror_restarts(state: &AdminState) {
    for r in state.status.borrow().values() {
        state
            .metrics
            .set_restarts(&r.service, r.replica, u64::from(r.restarts));
    }
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JSON that may stand inside a `<script type="application/json">`: `<`, `>` and `&`
/// only occur inside strings there, where their `\u` forms mean the same.
fn escape_script_json(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_this_server_pass_and_others_are_refused() {
        let own: Option<SocketAddr> = "127.0.0.1:9000".parse().ok();
        for host in [
            "127.0.0.1:9000",
            "127.0.0.1",
            "localhost:9000",
            "LOCALHOST",
            "localhost.",
            "app.localhost:9000",
            "[::1]:9000",
            "127.0.0.2:9000",
        ] {
            assert!(host_allowed(host, own), "{host}");
        }
        for host in [
            "evil.example:9000",
            "localhost.evil.example",
            "10.0.0.1:9000",
            "[::1",
            "127.0.0.1:x",
            "",
        ] {
            assert!(!host_allowed(host, own), "{host}");
        }
        // Listening on every address: any address names it, still no name.
        let any: Option<SocketAddr> = "0.0.0.0:9000".parse().ok();
        assert!(host_allowed("10.0.0.1:9000", any));
        assert!(!host_allowed("rebind.example:9000", any));
        let mine: Option<SocketAddr> = "192.168.1.5:9000".parse().ok();
        assert!(host_allowed("192.168.1.5:9000", mine));
    }

    #[test]
    fn queries_are_decoded() {
        let q = Query::parse("service=my%2Dapi&n=5&window=1m&x&flag=a+b&bad=%zz%4");
        assert_eq!(q.get("service"), Some("my-api"));
        assert_eq!(q.number("n", 20), Some(5));
        assert_eq!(q.number("missing", 20), Some(20));
        assert_eq!(q.number("window", 20), None);
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("flag"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz%4"));
    }

    #[test]
    fn json_in_the_page_cannot_close_its_script() {
        let json =
            serde_json::to_string(&serde_json::json!({"line": "</script><b>&"})).expect("json");
        let escaped = escape_script_json(&json);
        assert!(!escaped.contains('<'), "{escaped}");
        let back: serde_json::Value = serde_json::from_str(&escaped).expect("still json");
        assert_eq!(back["line"], "</script><b>&");
    }
}
