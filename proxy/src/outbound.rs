//! The outbound listener: the caller's side of one (caller, upstream) pair, and the
//! ingress listener of an exposed service (same data path, plus [`OutboundConfig::ingress`]
//! header rules).
//!
//! Each request from the app gets an endpoint from the [`Balancer`] (waiting up to
//! `queue_timeout` for one), travels to that replica's inbound over one shared HTTP/2
//! connection per endpoint, and is retried by the default rule of SPEC §3 "Retries" when
//! it certainly never reached an app, or when it is safe to repeat. Failures the mesh
//! produces are answered as [`MeshError`]s.
//!
//! HTTP/1.1 upgrades (WebSocket) do not fit in an HTTP/2 stream: they travel over a
//! dedicated HTTP/1.1 connection to the inbound and are spliced after `101`.
//!
//! Before any of that, the route step ([`crate::routes`]) picks the balancer (the
//! service's, or a route backend's), the route's timeout and its fault.

mod retry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balance::{Balancer, Outcome};
use crate::errors::{ErrorKind, HDR_ERROR, MeshError, Retryable};
use crate::http::client::{self, H2Pool, PeerTls};
use crate::http::headers::{self, HDR_ATTEMPT, MESH_PREFIX, TRACEPARENT};
use crate::http::server::{self, Facing, Limits};
use crate::http::{Body, boxed, full};
use crate::routes::{Decision, Routes};
use crate::{HDR_SOURCE, HDR_VERSION, Protocol, Traffic};

use retry::{ReqBody, TRIES};

/// What an outbound (or ingress) listener serves.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// The mesh name, the trust domain of identities (`spiffe://<mesh_name>/…`).
    pub mesh_name: String,
    /// The caller's identity name: the calling service, or "ingress" / "test" for ingress
    /// listeners.
    pub caller: String,
    /// The called service.
    pub service: String,
    /// The called service's protocol (`Http` or `Grpc`; it selects the error form).
    pub protocol: Protocol,
    /// Traffic settings for calls to the service.
    pub traffic: Traffic,
    /// Ingress mode (SPEC §1 Ingress): strip incoming `x-mesh-*` headers, add
    /// `X-Forwarded-For` / `X-Forwarded-Proto`.
    pub ingress: bool,
    /// Where the mesh's metrics are recorded.
    pub metrics: crate::metrics::Metrics,
    /// The service's routes (SPEC §3 Routes), with a balancer per route backend.
    pub routes: Routes,
    /// Mutual TLS to inbounds (`tls = "mutual"`): the caller's client configurations,
    /// presenting `spiffe://<mesh_name>/<caller>`. `None` connects in plain text and
    /// states the caller's identity in an internal header instead (`tls = "off"`).
    pub tls: Option<crate::tls::ClientTls>,
}

/// Serve `listener` with default [`Limits`] until `shutdown`, then drain: stop accepting,
/// finish the requests in flight, and return.
pub async fn serve(
    listener: TcpListener,
    cfg: OutboundConfig,
    balancer: Balancer,
    shutdown: CancellationToken,
) {
    serve_with(listener, cfg, balancer, Limits::default(), shutdown).await;
}

/// [`serve`] with explicit [`Limits`].
pub async fn serve_with(
    listener: TcpListener,
    cfg: OutboundConfig,
    balancer: Balancer,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let source = format!("spiffe://{}/{}", cfg.mesh_name, cfg.caller);
    let source = match HeaderValue::from_str(&source) {
        Ok(value) => value,
        Err(_) => {
            // Names are validated by the configuration loader; this is a wiring bug.
            tracing::error!(%source, "identity is not a valid header value, outbound not served");
            return;
        }
    };
    let tracker = TaskTracker::new();
    // One pool per service the requests may go to: the service itself and its route
    // backends, each of whose inbounds must prove its own identity.
    let mut targets: Vec<String> = vec![cfg.service.clone()];
    for backend in cfg.routes.backends() {
        if !targets.iter().any(|t| **t == *backend.service) {
            targets.push(backend.service.to_string());
        }
    }
    let pools = targets
        .into_iter()
        .map(|target| {
            let peer_tls = cfg.tls.as_ref().map(|client| PeerTls {
                client: client.clone(),
                server_identity: format!("spiffe://{}/{target}", cfg.mesh_name),
                metrics: cfg.metrics.clone(),
                service: target.clone(),
            });
            let pool = Target {
                pool: H2Pool::with_tls(peer_tls.clone()),
                peer_tls,
            };
            (target, pool)
        })
        .collect();
    // With mTLS the certificate carries the identity: no header that could be trusted
    // by mistake.
    let source = cfg.tls.is_none().then_some(source);
    let outbound = Arc::new(Outbound {
        cfg,
        source,
        balancer,
        pools,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
    });
    let builder = server::builder(&limits, Facing::Apps);
    let span = tracing::debug_span!(
        "http_outbound",
        caller = %outbound.cfg.caller,
        service = %outbound.cfg.service,
        ingress = outbound.cfg.ingress,
    );
    let handle = move |peer, req: Request<Incoming>| {
        let outbound = Arc::clone(&outbound);
        async move {
            let arrival = Instant::now();
            let cfg = &outbound.cfg;
            let decision = cfg.routes.decide(req.uri().path(), req.headers());
            let route = decision.label;
            let response = outbound.handle(peer, req, decision).await;
            cfg.metrics.request(
                &cfg.caller,
                &cfg.service,
                route,
                response.status().as_u16(),
                arrival.elapsed(),
            );
            response
        }
    };
    async move {
        server::serve(listener, builder, limits, tracker, shutdown, handle).await;
        tracing::debug!("shutdown complete");
    }
    .instrument(span)
    .await;
}

struct Outbound {
    cfg: OutboundConfig,
    /// `x-mesh-source` for every hop, with `tls = "off"` only.
    source: Option<HeaderValue>,
    balancer: Balancer,
    /// Connections to each service requests may go to, by service name.
    pools: std::collections::HashMap<String, Target>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// The tries of one request so far. The route timeout cancels the tries and still
/// names them in its error.
#[derive(Debug, Default)]
struct Tries {
    tried: Vec<Arc<str>>,
    attempts: u32,
}

/// Connections to the inbounds of one service.
struct Target {
    pool: H2Pool,
    /// Mutual TLS for upgrade connections (the pool has its own copy).
    peer_tls: Option<PeerTls>,
}

impl Outbound {
    /// The connections to `service`'s inbounds (built for the service and each route
    /// backend at start).
    fn target(&self, service: &str) -> &Target {
        match self.pools.get(service) {
            Some(target) => target,
            None => {
                // Wiring bug: every balancer's service got a pool at start.
                tracing::error!(service, "no connection pool for this service");
                &self.pools[&self.cfg.service]
            }
        }
    }

    /// Carry out the route step's `decision` (the balancer: a route backend's, else the
    /// service's; the route's timeout; the fault), then forward the request. Upgrades
    /// are exempt from timeouts and faults (SPEC §3 Timeouts).
    async fn handle(
        &self,
        peer: SocketAddr,
        req: Request<Incoming>,
        decision: Decision<'_>,
    ) -> Response<Body> {
        let arrival = Instant::now();
        let (balancer, queue_timeout) = match decision.backend {
            Some(backend) => (&backend.balancer, backend.queue_timeout),
            None => (&self.balancer, self.cfg.traffic.queue_timeout),
        };
        if headers::is_upgrade(&req) {
            let deadline = arrival + queue_timeout;
            // Boxed: the rare path would otherwise enlarge every request's future.
            return Box::pin(self.upgrade(peer, req, balancer, queue_timeout, deadline)).await;
        }
        let mut tries = Tries::default();
        let routed = async {
            // An injected delay stands for a slow upstream: it counts toward the timeout.
            if let Some(delay) = decision.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = decision.abort {
                return self.fault(status, decision.label);
            }
            self.forward(peer, req, balancer, queue_timeout, &mut tries)
                .await
        };
        // One state machine whether or not a timeout applies: two `.await` branches
        // would hold two copies of the request's future, and it is boxed per request.
        let expiry = async {
            match decision.timeout {
                Some(timeout) => tokio::time::sleep_until(arrival + timeout).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            biased;
            response = routed => Some(response),
            () = expiry => None,
        };
        match outcome {
            Some(response) => response,
            None => self.error(
                ErrorKind::Timeout,
                tries.tried,
                tries.attempts,
                format!(
                    "route {} timeout {} elapsed before response headers",
                    decision.label,
                    as_written(decision.timeout.unwrap_or_default())
                ),
            ),
        }
    }

    /// One request through `balancer`: tries and the default retry rule.
    async fn forward(
        &self,
        peer: SocketAddr,
        req: Request<Incoming>,
        balancer: &Balancer,
        queue_timeout: Duration,
        tries: &mut Tries,
    ) -> Response<Body> {
        let deadline = Instant::now() + queue_timeout;
        let (mut parts, body) = req.into_parts();
        self.hop_headers(&mut parts.headers, peer, parts.version);
        headers::strip_hop_by_hop(&mut parts.headers, false);
        parts.uri = headers::absolute_uri(&parts.uri, &parts.headers);
        // With an absolute URI, HTTP/2 sends `:scheme` and `:authority` from it; a
        // relative one (an HTTP/1.0 request without Host) is only allowed to h2 as a
        // forwarded HTTP/1.x request.
        let version = if parts.uri.authority().is_some() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let mut body = match ReqBody::new(body).await {
            Ok(body) => body,
            Err(error) => {
                tracing::debug!(%error, "request body failed while buffering");
                let mut response = Response::new(full("request body failed\n"));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return response;
            }
        };
        let safe = retry::is_safe(&parts.method) && body.is_empty();

        let Tries { tried, attempts } = tries;
        // The failure of the last try, answered if no further try happens.
        let mut last: Option<(ErrorKind, String)> = None;
        loop {
            let Some(pick) = balancer.pick(tried, deadline).await else {
                let (kind, detail) = last.unwrap_or_else(|| {
                    (
                        ErrorKind::NoEndpoints,
                        format!("no ready endpoint within queue_timeout {queue_timeout:?}"),
                    )
                });
                return self.error(kind, std::mem::take(tried), *attempts, detail);
            };
            let Some(try_body) = body.take() else {
                // A streaming body already went out with an earlier try; the retry rules
                // below never start another try then.
                let (kind, detail) =
                    last.unwrap_or((ErrorKind::Reset, "request body consumed".into()));
                return self.error(kind, std::mem::take(tried), *attempts, detail);
            };
            *attempts += 1;
            let id = Arc::clone(&pick.endpoint.id);
            tried.push(Arc::clone(&id));
            let mut request = Request::new(try_body);
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.version_mut() = version;
            *request.headers_mut() = parts.headers.clone();
            request
                .headers_mut()
                .insert(HDR_ATTEMPT, HeaderValue::from(*attempts));

            let started = Instant::now();
            let pool = &self.target(balancer.service()).pool;
            let retryable = match pool.send(pick.endpoint.addr, request).await {
                Ok(response) => {
                    let took = started.elapsed();
                    match hop_error(&response) {
                        // The inbound could not connect to its app: the request never
                        // reached an app, and the replica is as good as down.
                        Some(ErrorKind::ConnectFailed) => {
                            pick.record(Outcome::ConnectFailed);
                            last = Some((
                                ErrorKind::ConnectFailed,
                                format!("{id}: the app refused the connection"),
                            ));
                            Retryable::NotProcessed
                        }
                        Some(ErrorKind::Reset) => {
                            pick.record(Outcome::Failed(took));
                            last = Some((
                                ErrorKind::Reset,
                                format!(
                                    "{id}: the app closed the connection before response headers"
                                ),
                            ));
                            Retryable::MaybeProcessed
                        }
                        _ => {
                            pick.record(Outcome::Response(took));
                            let gateway = matches!(
                                response.status(),
                                StatusCode::BAD_GATEWAY
                                    | StatusCode::SERVICE_UNAVAILABLE
                                    | StatusCode::GATEWAY_TIMEOUT
                            );
                            if gateway && safe && *attempts < TRIES {
                                tracing::debug!(endpoint = %id, status = %response.status(), "retrying gateway error");
                                continue;
                            }
                            return response.map(boxed);
                        }
                    }
                }
                Err((error, unsent)) => {
                    if error.is_connect() {
                        pick.record(Outcome::ConnectFailed);
                    } else {
                        pick.record(Outcome::Failed(started.elapsed()));
                    }
                    tracing::debug!(endpoint = %id, error = %error.chain(), "try failed");
                    if let Some(unsent) = unsent {
                        body.put_back(unsent.into_body());
                    }
                    last = Some((error.kind(), format!("{id}: {}", error.chain())));
                    error.retryable()
                }
            };
            let again = match retryable {
                Retryable::Unsent => body.available(),
                Retryable::NotProcessed => body.replayable(),
                Retryable::MaybeProcessed => safe,
            };
            if !again || *attempts >= TRIES {
                let (kind, detail) = last.unwrap_or((ErrorKind::Reset, String::new()));
                return self.error(kind, std::mem::take(tried), *attempts, detail);
            }
        }
    }

    /// An HTTP/1.1 upgrade: one try over a dedicated HTTP/1.1 connection to the inbound,
    /// then both upgraded streams are spliced. Exempt from retries.
    async fn upgrade(
        &self,
        peer: SocketAddr,
        mut req: Request<Incoming>,
        balancer: &Balancer,
        queue_timeout: Duration,
        deadline: Instant,
    ) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        self.hop_headers(&mut parts.headers, peer, parts.version);
        headers::strip_hop_by_hop(&mut parts.headers, true);
        parts
            .headers
            .insert(HDR_ATTEMPT, HeaderValue::from_static("1"));
        let Some(pick) = balancer.pick(&[], deadline).await else {
            let detail = format!("no ready endpoint within queue_timeout {queue_timeout:?}");
            return self.error(ErrorKind::NoEndpoints, Vec::new(), 0, detail);
        };
        let id = Arc::clone(&pick.endpoint.id);
        let started = Instant::now();
        let request = Request::from_parts(parts, boxed(body));
        let peer_tls = self.target(balancer.service()).peer_tls.as_ref();
        match client::send_upgrade_via(pick.endpoint.addr, peer_tls, request).await {
            Ok(mut response) => {
                pick.record(Outcome::Response(started.elapsed()));
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    let upstream = hyper::upgrade::on(&mut response);
                    client::splice(&self.tracker, self.shutdown.clone(), downstream, upstream);
                    headers::strip_hop_by_hop(response.headers_mut(), true);
                }
                response.map(boxed)
            }
            Err(error) => {
                if error.is_connect() {
                    pick.record(Outcome::ConnectFailed);
                } else {
                    pick.record(Outcome::Failed(started.elapsed()));
                }
                let detail = format!("{id}: {}", error.chain());
                self.error(error.kind(), vec![id], 1, detail)
            }
        }
    }

    /// The headers every hop carries: ingress rules, trace context, identity, version.
    fn hop_headers(&self, headers: &mut http::HeaderMap, peer: SocketAddr, version: Version) {
        if self.cfg.ingress {
            let mesh: Vec<HeaderName> = headers
                .keys()
                .filter(|name| name.as_str().starts_with(MESH_PREFIX))
                .cloned()
                .collect();
            for name in mesh {
                headers.remove(name);
            }
            let ip = peer.ip().to_string();
            let forwarded: Vec<&str> = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let forwarded = if forwarded.is_empty() {
                ip
            } else {
                format!("{}, {ip}", forwarded.join(", "))
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded) {
                headers.insert("x-forwarded-for", value);
            }
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        if !headers.contains_key(TRACEPARENT) {
            headers.insert(TRACEPARENT, headers::new_traceparent());
        }
        match &self.source {
            Some(source) => headers.insert(HDR_SOURCE, source.clone()),
            None => headers.remove(HDR_SOURCE),
        };
        let version = if version == Version::HTTP_2 {
            "2"
        } else {
            "1.1"
        };
        headers.insert(HDR_VERSION, HeaderValue::from_static(version));
    }

    /// An injected abort (SPEC §3 Routes `fault`): the `fault` mesh error with the
    /// configured status. Produced here, so never retried.
    fn fault(&self, status: StatusCode, route: &str) -> Response<Body> {
        self.error(
            ErrorKind::Fault { status },
            Vec::new(),
            0,
            format!("aborted by the fault of route {route}"),
        )
    }

    fn error(
        &self,
        kind: ErrorKind,
        tried: Vec<Arc<str>>,
        attempts: u32,
        detail: String,
    ) -> Response<Body> {
        let error = MeshError {
            kind,
            service: self.cfg.service.clone(),
            tried,
            attempts,
            detail,
        };
        tracing::info!(error = %error, "request failed");
        self.cfg
            .metrics
            .mesh_error(&self.cfg.caller, &self.cfg.service, kind.as_str());
        error.to_response(self.cfg.protocol).map(boxed)
    }
}

/// The mesh error a next hop (the inbound) reported instead of an app response.
fn hop_error(response: &Response<Incoming>) -> Option<ErrorKind> {
    response
        .headers()
        .get(HDR_ERROR)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse_simple)
}

/// A duration as a user writes it in mesh.toml (`250ms`, `2s`).
fn as_written(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
