//! The admin server (SPEC §5): `/metrics`, `/live`, `/ready`, `/api/status` and a
//! dashboard page, on `[mesh] admin` (default `127.0.0.1:0`).
//!
//! It is bound before any process starts (like every listener) and serves until `mesh`
//! exits, so that `/ready` can say 503 while the mesh stops.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_proxy::http::server::{ACCEPT_WARN_INTERVAL, WarnLimiter};
use mesh_proxy::metrics::Metrics;
use mesh_supervisor::supervisor::Statuses;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
}

/// Serve `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, state: AdminState) {
    let state = Arc::new(state);
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
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "admin connection ended");
            }
        });
    }
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string());
    }
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
        "/api/status" => {
            let mut response = text(
                StatusCode::OK,
                status_json(&state.status.borrow(), &state.metrics),
            );
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        "/" => {
            let mut response = text(StatusCode::OK, dashboard(state));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_string()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// 200 when every service is ready (each replica ready or completed) and the mesh is not
/// stopping; 503 naming what is not, otherwise.
fn ready(state: &AdminState) -> Response<Full<Bytes>> {
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

/// One JSON object per replica, as `mesh ps --json` prints them (SPEC §4).
/// Besides SPEC's fields, each carries the replica's recent traffic through its inbound
/// (`rps`, `success_rate`, `p99_ms`, over the last 10 s; null without an inbound or
/// without requests), `reason` (why it is not ready, once `ready_timeout` passed; else
/// null) and `last_rollout` (`failed: <line>` when its last rolling replacement failed,
/// until one succeeds; else null).
pub(crate) fn status_json(statuses: &Statuses, metrics: &Metrics) -> String {
    let rows: Vec<serde_json::Value> = statuses
        .values()
        .map(|r| {
            let traffic = metrics.replica_summary(&r.service, r.replica);
            let round = |x: f64, places: i32| {
                let scale = 10f64.powi(places);
                (x * scale).round() / scale
            };
            serde_json::json!({
                "service": r.service,
                "replica": r.replica,
                "state": r.state.as_str(),
                "health": r.health,
                "pid": r.pid,
                "exit_code": r.exit_code,
                "restarts": r.restarts,
                "port": r.port,
                "uptime_s": r.since.map(|since| since.elapsed().as_secs()),
                "rps": traffic.map(|t| round(t.rps, 1)),
                "success_rate": traffic.and_then(|t| t.success_rate).map(|s| round(s, 4)),
                "p99_ms": traffic.and_then(|t| t.p99).map(|p| round(p.as_secs_f64() * 1000.0, 2)),
                "reason": r.reason,
                "last_rollout": r.rollout_failed.as_ref().map(|line| format!("failed: {line}")),
            })
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// Requests observed between services: (caller, service) → (total, errors 5xx).
fn traffic(metrics_text: &str) -> BTreeMap<(String, String), (u64, u64)> {
    let mut edges: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for line in metrics_text.lines() {
        let Some(rest) = line.strip_prefix("mesh_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let entry = edges
            .entry((label("caller"), label("service")))
            .or_default();
        entry.0 += count as u64;
        if label("status_class") == "5xx" {
            entry.1 += count as u64;
        }
    }
    edges
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A small page that refreshes itself: replicas with their state and health, and the
/// traffic observed between services.
fn dashboard(state: &AdminState) -> String {
    let mut page = String::new();
    let name = escape(&state.mesh_name);
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>mesh {name}</title><style>body{{font-family:sans-serif;margin:2em}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         .ready{{color:#080}}.unready{{color:#b00}}</style></head><body><h1>mesh {name}</h1>\
         <h2>Replicas</h2><table><tr><th>service</th><th>replica</th><th>state</th><th>health</th>\
         <th>pid</th><th>restarts</th><th>port</th><th>uptime</th><th>why not ready</th><th>last rollout</th></tr>"
    );
    for r in state.status.borrow().values() {
        let uptime = r
            .since
            .map(|s| format!("{}s", s.elapsed().as_secs()))
            .unwrap_or_default();
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"unready\">{}</td><td class=\"unready\">{}</td></tr>",
            escape(&r.service),
            r.replica,
            r.state,
            r.health,
            r.health,
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.restarts,
            r.port.map(|p| p.to_string()).unwrap_or_default(),
            uptime,
            escape(r.reason.as_deref().unwrap_or_default()),
            escape(
                &r.rollout_failed
                    .as_deref()
                    .map(|line| format!("failed: {line}"))
                    .unwrap_or_default()
            ),
        );
    }
    page.push_str(
        "</table><h2>Traffic</h2><table><tr><th>caller</th><th>service</th><th>requests</th><th>5xx</th></tr>",
    );
    for ((caller, service), (total, errors)) in traffic(&state.metrics.encode()) {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{total}</td><td>{errors}</td></tr>",
            escape(&caller),
            escape(&service),
        );
    }
    page.push_str("</table></body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_sums_requests_per_edge() {
        let text = "\
mesh_requests_total{caller=\"web\",service=\"api\",route=\"\",status_class=\"2xx\"} 5
mesh_requests_total{caller=\"web\",service=\"api\",route=\"\",status_class=\"5xx\"} 2
mesh_requests_total{caller=\"ingress\",service=\"web\",route=\"\",status_class=\"2xx\"} 1
";
        let edges = traffic(text);
        assert_eq!(edges[&("web".into(), "api".into())], (7, 2));
        assert_eq!(edges[&("ingress".into(), "web".into())], (1, 0));
    }
}
