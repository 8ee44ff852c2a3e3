//! The outbound listener: the caller's side of one (caller, upstream) pair, and the
//! ingress listener of an exposed service (same data path, plus [`OutboundConfig::ingress`]
//! header rules).
//!
//! Each request from the app takes a `max_concurrent` slot and gets an endpoint from the
//! [`Balancer`] (waiting up to `queue_timeout` for both), travels to that replica's inbound
//! over one shared HTTP/2 connection per endpoint, and is retried by the default rule of
//! SPEC §3 "Retries" (when it certainly never reached an app, or when it is safe to
//! repeat) or by the service's `retries` table, within its budget. `timeout` bounds all
//! of it up to the response headers. For a grpc service under a circuit breaker, a
//! response that is not trailers-only gets its breaker verdict from its trailers (the
//! response body settles it as it ends). Failures the mesh produces are answered as
//! [`MeshError`]s. docs/traffic.md records the choices SPEC leaves open.
//!
//! HTTP/1.1 upgrades (WebSocket) do not fit in an HTTP/2 stream: they travel over a
//! dedicated HTTP/1.1 connection to the inbound and are spliced after `101`. An HTTP/2
//! extended CONNECT (RFC 8441, `:protocol`) travels as a stream of the shared HTTP/2
//! connection and is spliced after `200`. Both get one try and no timeout or fault; a
//! CONNECT without `:protocol` (a proxy tunnel) is answered 405.
//!
//! Before any of that, the route step ([`crate::routes`]) picks the balancer (the
//! service's, or a route backend's, with the backend's `queue_timeout`), the route's
//! timeout (else the service's) and its fault; the service's `retries` apply either way.

mod retry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balance::{Admission, Balancer, NoPick, Outcome, Pick, Verdict};
use crate::errors::{ErrorKind, ForwardError, HDR_DETAIL, HDR_ERROR, MeshError, Retryable};
use crate::http::client::{self, H2Pool, PeerTls};
use crate::http::headers::{self, HDR_ATTEMPT, MESH_PREFIX, TRACEPARENT};
use crate::http::server::{self, Facing, Limits, PeerIdentity};
use crate::http::{Body, boxed, full};
use crate::inbound::LocalInbound;
use crate::live::Live;
use crate::routes::{Decision, Routes};
use crate::stats::{Call, ERROR_KINDS, Edge, TraceId, Via};
use crate::{HDR_SOURCE, HDR_VERSION, Protocol, Traffic};

use retry::{Budget, ReqBody, TRIES};
pub use retry::{MIN_RETRIES_PER_SEC, RetryOn, RetryPolicy};

/// The pause before retrying on the endpoint that failed the previous try, doubled with
/// each try (25, 50 ms for the default rule's two retries).
const SAME_ENDPOINT_BACKOFF: Duration = Duration::from_micros(12_500);

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
    let setup = Live::new(OutboundSetup { cfg, balancer });
    serve_live_with(listener, setup, limits, shutdown).await;
}

/// What an outbound (or ingress) serves with: its configuration and the balancer of
/// its service.
pub struct OutboundSetup {
    /// The configuration.
    pub cfg: OutboundConfig,
    /// The balancer over the service's endpoints.
    pub balancer: Balancer,
}

/// [`serve`] with settings the runtime may replace while it runs (a reload changed the
/// service's `traffic` or `routes`): each request follows the settings in force when it
/// arrives; requests in flight finish under the ones they started with.
pub async fn serve_live(
    listener: TcpListener,
    setup: Live<OutboundSetup>,
    shutdown: CancellationToken,
) {
    serve_live_with(listener, setup, Limits::default(), shutdown).await;
}

/// [`serve_live`] with explicit [`Limits`].
pub async fn serve_live_with(
    listener: TcpListener,
    setup: Live<OutboundSetup>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let first = setup.get();
    let Some(outbound) = Outbound::build(&first, &tracker, &shutdown) else {
        return;
    };
    let builder = server::builder(&limits, Facing::Apps);
    let span = tracing::debug_span!(
        "http_outbound",
        caller = %outbound.cfg.caller,
        service = %outbound.cfg.service,
        ingress = outbound.cfg.ingress,
    );
    let errors = outbound.cfg.metrics.connection_errors(
        if outbound.cfg.ingress {
            crate::metrics::Listener::Ingress
        } else {
            crate::metrics::Listener::Outbound
        },
        &outbound.cfg.caller,
        &outbound.cfg.service,
    );
    // The outbound built from the settings in force, rebuilt when they are replaced.
    let current = Arc::new(parking_lot::RwLock::new((first, outbound)));
    let rebuild = (tracker.clone(), shutdown.clone());
    let handle = move |peer, req: Request<Incoming>| {
        let outbound = {
            let wanted = setup.get();
            let built = current.read();
            if Arc::ptr_eq(&built.0, &wanted) {
                Arc::clone(&built.1)
            } else {
                drop(built);
                match Outbound::build(&wanted, &rebuild.0, &rebuild.1) {
                    Some(fresh) => {
                        *current.write() = (wanted, Arc::clone(&fresh));
                        fresh
                    }
                    None => Arc::clone(&current.read().1),
                }
            }
        };
        async move {
            let arrival = Instant::now();
            let mut req = req;
            // The trace context is created here when absent (SPEC §5), so that the call
            // is recorded with the trace id the next hops see.
            if !req.headers().contains_key(TRACEPARENT) {
                req.headers_mut()
                    .insert(TRACEPARENT, headers::new_traceparent());
            }
            let cfg = &outbound.cfg;
            let decision = cfg.routes.decide(req.uri().path(), req.headers());
            let route = decision.label;
            let seen = Seen::of(&req);
            let mut served = None;
            let response = outbound
                .handle(peer, req, decision, arrival, &mut served)
                .await;
            let now = Instant::now();
            let took = now.saturating_duration_since(arrival);
            outbound
                .requests
                .record(route, response.status().as_u16(), took);
            outbound.record_call(route, seen, &response, served, took, now);
            response
        }
    };
    async move {
        server::serve(listener, builder, limits, tracker, shutdown, errors, handle).await;
        tracing::debug!("shutdown complete");
    }
    .instrument(span)
    .await;
}

/// What the dashboard and the access log keep of a request, taken before it is sent.
struct Seen {
    method: Method,
    path: String,
    trace_id: TraceId,
}

impl Seen {
    fn of<B>(req: &Request<B>) -> Self {
        // `00-<32 hex trace id>-<16 hex span id>-<flags>`.
        let trace_id = req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.get(3..35))
            .map(TraceId::from)
            .unwrap_or_default();
        Seen {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            trace_id,
        }
    }
}

/// How a request was served, for the recording: the endpoint of the last try, the number
/// of tries, and how the last one travelled. The tries hand it back beside the response;
/// the rare paths (mesh errors, upgrades) put it in the response's extensions.
#[derive(Clone, Debug)]
struct Served {
    endpoint: Option<Arc<str>>,
    attempts: u32,
    via: Option<Via>,
}

impl Served {
    /// Served by the try to `endpoint`, the `attempts`th, travelling `via`.
    fn by(endpoint: &Arc<str>, attempts: u32, via: Via) -> Self {
        Served {
            endpoint: Some(Arc::clone(endpoint)),
            attempts,
            via: Some(via),
        }
    }
}

impl Outbound {
    /// Record the call for the dashboard and the access log (SPEC §5).
    fn record_call(
        &self,
        route: &str,
        seen: Seen,
        response: &Response<Body>,
        served: Option<Served>,
        took: Duration,
        now: Instant,
    ) {
        let edge = self.edge(route);
        // The tries' account, or the one the rare paths (errors, upgrades) put in the
        // response.
        let served = response.extensions().get::<Served>().or(served.as_ref());
        let error = response
            .headers()
            .get(HDR_ERROR)
            .and_then(|v| v.to_str().ok())
            .and_then(|kind| ERROR_KINDS.iter().find(|k| **k == kind).copied());
        let call = Call {
            seq: 0,
            ts_ms: 0,
            trace_id: seen.trace_id,
            caller: Arc::clone(&self.caller),
            service: Arc::clone(&self.service_name),
            replica: served.and_then(|s| s.endpoint.clone()),
            route: Arc::clone(&edge.0),
            method: seen.method,
            path: seen.path,
            status: response.status().as_u16(),
            error,
            attempts: served.map_or(0, |s| s.attempts),
            duration_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            via: served.and_then(|s| s.via),
        };
        self.cfg
            .metrics
            .stats()
            .record_at(&edge.1, call, now.into_std());
    }

    /// The dashboard's edge of `route` ("" for none), resolved once.
    fn edge(&self, route: &str) -> (Arc<str>, Arc<Edge>) {
        if let Some((label, edge)) = self.edges.read().iter().find(|(l, _)| **l == *route) {
            return (Arc::clone(label), Arc::clone(edge));
        }
        let edge = self
            .cfg
            .metrics
            .stats()
            .edge(&self.cfg.caller, &self.cfg.service, route);
        let label: Arc<str> = Arc::from(route);
        self.edges
            .write()
            .push((Arc::clone(&label), Arc::clone(&edge)));
        (label, edge)
    }

    /// How a try to `endpoint` travels.
    fn via(&self, endpoint: &crate::discovery::Endpoint) -> Via {
        if endpoint.local.is_some() {
            Via::InProcess
        } else if self.cfg.tls.is_some() {
            Via::Mtls
        } else {
            Via::Plain
        }
    }
}

impl Outbound {
    /// The outbound of `setup`: a connection pool per service requests may go to,
    /// the retry budget, the request counters. `None` only on a wiring bug.
    fn build(
        setup: &OutboundSetup,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Option<Arc<Outbound>> {
        let cfg = setup.cfg.clone();
        let source = format!("spiffe://{}/{}", cfg.mesh_name, cfg.caller);
        let source = match HeaderValue::from_str(&source) {
            Ok(value) => value,
            Err(_) => {
                // Names are validated by the configuration loader; this is a wiring bug.
                tracing::error!(%source, "identity is not a valid header value, outbound not served");
                return None;
            }
        };
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
        let local_peer = PeerIdentity {
            identity: Arc::from(format!("spiffe://{}/{}", cfg.mesh_name, cfg.caller)),
            header: Some(source.clone()),
        };
        // With mTLS the certificate carries the identity: no header that could be
        // trusted by mistake.
        let source = cfg.tls.is_none().then_some(source);
        let retries = cfg.traffic.retries.clone().map(|r| {
            let budget = Budget::new(r.budget);
            (r, budget)
        });
        let requests = cfg.metrics.requests(&cfg.caller, &cfg.service);
        let stats = cfg.metrics.stats();
        stats.watch_balancer(&cfg.caller, &setup.balancer);
        for backend in cfg.routes.backends() {
            stats.watch_balancer(&cfg.caller, &backend.balancer);
        }
        Some(Arc::new(Outbound {
            requests,
            edges: parking_lot::RwLock::default(),
            service_name: Arc::from(cfg.service.as_str()),
            caller: Arc::from(cfg.caller.as_str()),
            retries,
            cfg,
            source,
            local_peer,
            balancer: setup.balancer.clone(),
            pools,
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        }))
    }
}

struct Outbound {
    cfg: OutboundConfig,
    /// `mesh_requests_total` and the duration histogram of this (caller, service).
    requests: crate::metrics::RequestMetrics,
    /// The dashboard's edges of this (caller, service), one per route label.
    edges: parking_lot::RwLock<Vec<(Arc<str>, Arc<Edge>)>>,
    /// `cfg.service`, shared with every recorded call.
    service_name: Arc<str>,
    /// `cfg.caller`, shared with the response bodies that record a deferred ejection.
    caller: Arc<str>,
    /// The service's `retries` table and the budget its retries share (also for
    /// requests routed to a backend).
    retries: Option<(RetryPolicy, Budget)>,
    /// `x-mesh-source` for every hop, with `tls = "off"` only.
    source: Option<HeaderValue>,
    /// The caller's identity as the inbounds of this process see it on the local path.
    local_peer: PeerIdentity,
    balancer: Balancer,
    /// Connections to each service requests may go to, by service name.
    /// The service's first, then its route backends'.
    pools: Vec<(String, Target)>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// Connections to the inbounds of one service.
struct Target {
    pool: H2Pool,
    /// Mutual TLS for upgrade connections (the pool has its own copy).
    peer_tls: Option<PeerTls>,
}

impl Outbound {
    /// Carry out the route step's `decision` (the balancer: a route backend's, else the
    /// service's; the timeout; the fault), then forward the request. Upgrades are exempt
    /// from timeouts, retries and faults (SPEC §3 Timeouts).
    async fn handle(
        &self,
        peer: SocketAddr,
        req: Request<Incoming>,
        decision: Decision<'_>,
        arrival: Instant,
        served: &mut Option<Served>,
    ) -> Response<Body> {
        let (balancer, queue_timeout) = match decision.backend {
            Some(backend) => (&backend.balancer, backend.queue_timeout),
            None => (&self.balancer, self.cfg.traffic.queue_timeout),
        };
        let tunnel = if headers::is_upgrade(&req) {
            Some(Tunnel::Upgrade)
        } else if headers::is_extended_connect(&req) {
            Some(Tunnel::ExtendedConnect)
        } else {
            None
        };
        if let Some(tunnel) = tunnel {
            let deadline = arrival + queue_timeout;
            // Boxed: the rare path would otherwise enlarge every request's future.
            return Box::pin(self.upgrade(tunnel, peer, req, balancer, queue_timeout, deadline))
                .await;
        }
        if req.method() == Method::CONNECT {
            return connect_refused();
        }
        let policy = Policy {
            timeout: decision.timeout.or(self.cfg.traffic.timeout),
            queue_timeout,
            retries: self.retries.as_ref(),
        };
        let (mut parts, body) = req.into_parts();
        self.hop_headers(&mut parts.headers, peer, parts.version);
        headers::strip_hop_by_hop(&mut parts.headers, false);
        let req = Request::from_parts(parts, body);
        self.forward(&policy, balancer, &decision, arrival, req, served)
            .await
    }

    /// The connections to `service`'s inbounds (built for the service and each route
    /// backend at start).
    fn target(&self, service: &str) -> &Target {
        // A handful of entries (the service and its route backends): a scan is cheaper
        // than hashing the name.
        match self.pools.iter().find(|(name, _)| name == service) {
            Some((_, target)) => target,
            None => {
                // Wiring bug: every balancer's service got a pool at start.
                tracing::error!(service, "no connection pool for this service");
                &self.pools[0].1
            }
        }
    }

    /// Forward one request under `policy` to an endpoint of `balancer`: the `timeout`
    /// around everything up to response headers (queueing and every try), and inside it
    /// the tries of [`Outbound::tries`]. (A try in flight at the deadline is ended by
    /// `tries` itself, so that the balancer counts it as a failure; this outer bound cuts
    /// the waits.)
    async fn forward(
        &self,
        policy: &Policy<'_>,
        balancer: &Balancer,
        decision: &Decision<'_>,
        arrival: Instant,
        req: Request<Incoming>,
        served: &mut Option<Served>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let mut progress = Progress::default();
        let tries = async {
            // An injected delay stands for a slow upstream: it counts toward the timeout.
            if let Some(delay) = decision.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = decision.abort {
                return self.fault(status, decision.label);
            }
            self.tries(policy, balancer, arrival, parts, body, &mut progress)
                .await
        };
        let Some(timeout) = policy.timeout else {
            let response = tries.await;
            *served = progress.served;
            return response;
        };
        match tokio::time::timeout_at(arrival + timeout, tries).await {
            Ok(response) => {
                *served = progress.served;
                response
            }
            Err(_) => {
                let detail = match progress.current.take() {
                    Some(id) => format!("{id}: no response headers within timeout {timeout:?}"),
                    None => format!("no response headers within timeout {timeout:?}"),
                };
                self.error(
                    ErrorKind::Timeout,
                    progress.tried.into_vec(),
                    progress.attempts,
                    detail,
                )
            }
        }
    }

    /// Admission (`max_concurrent`), then tries until a response is final: the default
    /// retry rule, or `policy.retries` with its per-try timeout and budget. `progress`
    /// keeps what the tries did, for the `timeout` error if [`Outbound::forward`] cuts
    /// this short.
    async fn tries(
        &self,
        policy: &Policy<'_>,
        balancer: &Balancer,
        arrival: Instant,
        mut parts: http::request::Parts,
        body: Incoming,
        progress: &mut Progress,
    ) -> Response<Body> {
        let deadline = arrival + policy.queue_timeout;
        let overall = policy.timeout.map(|timeout| arrival + timeout);
        let Some(admission) = balancer.admit(deadline).await else {
            let detail = format!(
                "max_concurrent requests in flight for {:?} (queue_timeout)",
                policy.queue_timeout
            );
            return self.error(ErrorKind::Overloaded, Vec::new(), 0, detail);
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
        let rule = Rule::new(policy, &parts.method, &body);
        // The first try's number goes into the headers every try copies (a map with
        // room to spare, where the copy would have to grow); later tries replace it.
        parts
            .headers
            .insert(HDR_ATTEMPT, HeaderValue::from_static("1"));
        // The failure of the last try, answered if no further try happens.
        let mut last: Option<(ErrorKind, String)> = None;
        // A response that asked for a retry, answered if no further try happens.
        // (With the breaker verdict still to come from its trailers, if deferred.)
        let mut pending: Option<(TryResponse, Option<Deferred>)> = None;
        loop {
            let pick = match balancer.pick_or(&progress.tried, deadline).await {
                Ok(pick) => pick,
                Err(why) => {
                    if let Some((response, verdict)) = pending {
                        progress.set_attempts();
                        return guarded(response, admission, verdict);
                    }
                    let (kind, detail) = match (last, why) {
                        (Some(last), _) => last,
                        (None, NoPick::CircuitOpen) => (
                            ErrorKind::CircuitOpen,
                            "every endpoint is ejected by the circuit breaker".to_string(),
                        ),
                        (None, NoPick::NoEndpoints) => (
                            ErrorKind::NoEndpoints,
                            format!(
                                "no ready endpoint within queue_timeout {:?}",
                                policy.queue_timeout
                            ),
                        ),
                    };
                    let tried = std::mem::take(&mut progress.tried).into_vec();
                    return self.error(kind, tried, progress.attempts, detail);
                }
            };
            let Some(try_body) = body.take() else {
                // A streaming body already went out with an earlier try; the retry rules
                // below never start another try then.
                let (kind, detail) =
                    last.unwrap_or((ErrorKind::Reset, "request body consumed".into()));
                let tried = std::mem::take(&mut progress.tried).into_vec();
                return self.error(kind, tried, progress.attempts, detail);
            };
            // A retry on an endpoint that already failed this request (the only one
            // left) waits a moment first, doubling each time: a reset often means the app
            // is going away, and tries in a burst would all meet the same dying process.
            // (Connect failures eject the endpoint; the pick above waited for another.)
            if progress.tried.contains(&pick.endpoint.id) {
                let backoff = SAME_ENDPOINT_BACKOFF * (1 << progress.attempts.min(4));
                tokio::time::sleep(backoff).await;
            }
            // The previous try's response is dropped only now that another try goes out.
            drop(pending.take());
            progress.attempts += 1;
            let attempts = progress.attempts;
            let id = Arc::clone(&pick.endpoint.id);
            progress.tried.push(Arc::clone(&id));
            progress.current = Some(Arc::clone(&id));
            let mut request = Request::new(try_body);
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.version_mut() = parts.version;
            *request.headers_mut() = parts.headers.clone();
            if attempts > 1 {
                request
                    .headers_mut()
                    .insert(HDR_ATTEMPT, HeaderValue::from(attempts));
            }

            let started = Instant::now();
            // The try ends at its per-try timeout or at the request's `timeout`, whichever
            // comes first; either way here, so that the balancer learns of it.
            let per_try_deadline = rule.per_try_timeout.map(|limit| started + limit);
            let overall_first = overall.is_some_and(|o| per_try_deadline.is_none_or(|p| o <= p));
            let try_deadline = if overall_first {
                overall
            } else {
                per_try_deadline
            };
            let via = self.via(&pick.endpoint);
            let send = self.send(balancer, &pick, request);
            let sent = match try_deadline {
                None => Some(send.await),
                Some(at) => tokio::time::timeout_at(at, send).await.ok(),
            };
            // Why another try is wanted, if it is.
            let again = match sent {
                None if overall_first => {
                    self.record(balancer, pick, Outcome::Failed(started.elapsed()));
                    let timeout = policy.timeout.unwrap_or_default();
                    let detail = format!("{id}: no response headers within timeout {timeout:?}");
                    let tried = std::mem::take(&mut progress.tried).into_vec();
                    return self.error(ErrorKind::Timeout, tried, progress.attempts, detail);
                }
                None => {
                    // The per-try timeout fired; the body went with the try.
                    self.record(balancer, pick, Outcome::Failed(started.elapsed()));
                    let limit = rule.per_try_timeout.unwrap_or_default();
                    last = Some((
                        ErrorKind::Timeout,
                        format!("{id}: no response headers within per_try_timeout {limit:?}"),
                    ));
                    rule.on_timeout() && body.replayable() && rule.within(attempts)
                }
                Some(Ok(response)) => {
                    let took = started.elapsed();
                    match hop_error(&response) {
                        // The inbound could not connect to its app: the request never
                        // reached an app, and the replica is as good as down.
                        Some(ErrorKind::ConnectFailed) => {
                            self.record(balancer, pick, Outcome::ConnectFailed);
                            last = Some((
                                ErrorKind::ConnectFailed,
                                format!("{id}: the app refused the connection"),
                            ));
                            rule.connect_retry(attempts) && body.replayable()
                        }
                        Some(ErrorKind::Reset) => {
                            self.record(balancer, pick, Outcome::Failed(took));
                            // The inbound says why: closed, or not HTTP (a protocol error).
                            let why = response
                                .headers()
                                .get(HDR_DETAIL)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or(
                                    "app: the app closed the connection before response headers",
                                );
                            last = Some((ErrorKind::Reset, format!("{id}: {why}")));
                            rule.on_reset(&response, &body) && rule.within(attempts)
                        }
                        hop => {
                            let grpc = self.cfg.protocol == Protocol::Grpc;
                            let failure = response.status().is_server_error()
                                || (grpc
                                    && retry::grpc_status(&response)
                                        .is_some_and(retry::is_failing_grpc_status));
                            // A gRPC response with a body carries its status in the
                            // trailers: with a breaker, its verdict waits for them.
                            let deferred = !failure
                                && grpc
                                && balancer.has_breaker()
                                && retry::grpc_status(&response).is_none()
                                && !hyper::body::Body::is_end_stream(response.body());
                            let verdict = if deferred {
                                Some(Deferred {
                                    verdict: pick.defer(took),
                                    balancer: balancer.clone(),
                                    metrics: self.cfg.metrics.clone(),
                                    caller: Arc::clone(&self.caller),
                                })
                            } else {
                                let outcome = if failure {
                                    Outcome::ErrorResponse(took)
                                } else {
                                    Outcome::Response(took)
                                };
                                self.record(balancer, pick, outcome);
                                None
                            };
                            // Other reports of a next hop (rate-limited, unauthorized) are
                            // the mesh's own answers: never retried.
                            if hop.is_none()
                                && rule.on_response(&response, &body)
                                && rule.within(attempts)
                            {
                                tracing::debug!(endpoint = %id, status = %response.status(), "retrying response");
                                progress.served = Some(Served::by(&id, attempts, via));
                                pending = Some((response, verdict));
                                last = None;
                                true
                            } else {
                                progress.served = Some(Served::by(&id, attempts, via));
                                return guarded(response, admission, verdict);
                            }
                        }
                    }
                }
                Some(Err((error, unsent))) => {
                    if error.is_connect() {
                        self.record(balancer, pick, Outcome::ConnectFailed);
                    } else {
                        self.record(balancer, pick, Outcome::Failed(started.elapsed()));
                    }
                    tracing::debug!(endpoint = %id, error = %error.chain(), "try failed");
                    if let Some(unsent) = unsent {
                        body.put_back(unsent.into_body());
                    }
                    last = Some((error.kind(), format!("{id}: {}", error.chain())));
                    match error.retryable() {
                        Retryable::Unsent => rule.connect_retry(attempts) && body.available(),
                        Retryable::NotProcessed => {
                            rule.connect_retry(attempts) && body.replayable()
                        }
                        Retryable::MaybeProcessed => {
                            rule.on_reset_error(&body) && rule.within(attempts)
                        }
                    }
                }
            };
            progress.current = None;
            let again = again && rule.withdraw();
            if again {
                self.cfg.metrics.retry(&self.cfg.caller, &self.cfg.service);
                continue;
            }
            if let Some((response, verdict)) = pending {
                progress.set_attempts();
                return guarded(response, admission, verdict);
            }
            let (kind, detail) = last.unwrap_or((ErrorKind::Reset, String::new()));
            let tried = std::mem::take(&mut progress.tried).into_vec();
            return self.error(kind, tried, progress.attempts, detail);
        }
    }

    /// Send one try to the picked endpoint: handed to its inbound in this process (the
    /// local path), else over the shared HTTP/2 connection to its listener.
    async fn send(
        &self,
        balancer: &Balancer,
        pick: &Pick,
        request: Request<Body>,
    ) -> Result<TryResponse, client::SendError> {
        let addr = pick.endpoint.addr;
        match pick.endpoint.local_http().cloned() {
            // Boxed: the inbound's future is large, and moving it with every future of
            // the outbound's (hyper moves the request's future into place) costs more
            // than one allocation.
            Some(inbound) => match Box::pin(inbound.call(&self.local_peer, request)).await {
                Ok(response) => Ok(response.map(Either::Right)),
                Err(unsent) => Err((draining(addr), Some(unsent))),
            },
            None => {
                // Over HTTP/2 to the inbound's listener: with an absolute URI, HTTP/2 sends
                // `:scheme` and `:authority` from it; a relative one (an HTTP/1.0 request
                // without Host) is only allowed to h2 as a forwarded HTTP/1.x request. (A
                // local call keeps the caller's form: the inbound makes the app's.)
                let mut request = request;
                let uri = headers::absolute_uri(request.uri(), request.headers());
                *request.version_mut() = if uri.authority().is_some() {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                *request.uri_mut() = uri;
                self.target(balancer.service())
                    .pool
                    .send(addr, request)
                    .await
                    .map(|response| response.map(Either::Left))
            }
        }
    }

    /// Record a try's outcome with the balancer, and count an ejection it caused.
    fn record(&self, balancer: &Balancer, pick: Pick, outcome: Outcome) {
        if pick.record(outcome) {
            self.cfg
                .metrics
                .ejection(&self.cfg.caller, balancer.service());
        }
    }

    /// An HTTP/1.1 upgrade or an HTTP/2 extended CONNECT: one try (an HTTP/1.1 upgrade
    /// over a dedicated HTTP/1.1 connection to the inbound, an extended CONNECT as a
    /// stream of the shared HTTP/2 connection), then both upgraded streams are spliced.
    /// Exempt from timeouts, retries and faults.
    async fn upgrade(
        &self,
        tunnel: Tunnel,
        peer: SocketAddr,
        mut req: Request<Incoming>,
        balancer: &Balancer,
        queue_timeout: Duration,
        deadline: Instant,
    ) -> Response<Body> {
        let pick = match balancer.pick_or(&[], deadline).await {
            Ok(pick) => pick,
            Err(NoPick::CircuitOpen) => {
                let detail = "every endpoint is ejected by the circuit breaker".to_string();
                return self.error(ErrorKind::CircuitOpen, Vec::new(), 0, detail);
            }
            Err(NoPick::NoEndpoints) => {
                let detail = format!("no ready endpoint within queue_timeout {queue_timeout:?}");
                return self.error(ErrorKind::NoEndpoints, Vec::new(), 0, detail);
            }
        };
        // On the local path the request keeps the caller's upgrade (in its extensions):
        // the inbound splices the caller's connection with the app's itself.
        let downstream = match pick.endpoint.local_http() {
            Some(inbound) => Err(inbound.clone()),
            None => Ok(hyper::upgrade::on(&mut req)),
        };
        // The extended CONNECT's `:protocol` (the `hyper::ext::Protocol` extension) stays
        // in the parts and goes out with the request.
        let (mut parts, body) = req.into_parts();
        self.hop_headers(&mut parts.headers, peer, parts.version);
        headers::strip_hop_by_hop(&mut parts.headers, tunnel == Tunnel::Upgrade);
        parts
            .headers
            .insert(HDR_ATTEMPT, HeaderValue::from_static("1"));
        let request = Request::from_parts(parts, boxed(body));
        let downstream = match downstream {
            Ok(downstream) => downstream,
            Err(inbound) => return self.upgrade_local(inbound, balancer, pick, request).await,
        };
        let id = Arc::clone(&pick.endpoint.id);
        let started = Instant::now();
        let target = self.target(balancer.service());
        let addr = pick.endpoint.addr;
        let sent = match tunnel {
            Tunnel::Upgrade => client::send_upgrade_via(addr, target.peer_tls.as_ref(), request)
                .await
                .map(|mut response| {
                    let mut upstream = None;
                    if tunnel.established(response.status()) {
                        upstream = Some(hyper::upgrade::on(&mut response));
                        headers::strip_hop_by_hop(response.headers_mut(), true);
                    }
                    (response.map(boxed), upstream.map(Upstream::Upgraded))
                }),
            // The CONNECT's headers go without END_STREAM and the stream is kept for the
            // tunnel; the request body (empty) is never sent.
            Tunnel::ExtendedConnect => target
                .pool
                .send_connect(addr, request)
                .await
                .map(|(response, tunnel)| (response, tunnel.map(Upstream::Tunnel))),
        };
        match sent {
            Ok((mut response, upstream)) => {
                let via = self.via(&pick.endpoint);
                self.record(balancer, pick, Outcome::Response(started.elapsed()));
                response.extensions_mut().insert(Served {
                    endpoint: Some(Arc::clone(&id)),
                    attempts: 1,
                    via: Some(via),
                });
                match upstream {
                    Some(Upstream::Upgraded(upstream)) => {
                        client::splice(&self.tracker, self.shutdown.clone(), downstream, upstream);
                    }
                    Some(Upstream::Tunnel(upstream)) => {
                        let shutdown = self.shutdown.clone();
                        client::splice_tunnel(&self.tracker, shutdown, downstream, upstream);
                    }
                    None => {}
                }
                response
            }
            Err(error) => {
                if error.is_connect() {
                    self.record(balancer, pick, Outcome::ConnectFailed);
                } else {
                    self.record(balancer, pick, Outcome::Failed(started.elapsed()));
                }
                let detail = format!("{id}: {}", error.chain());
                self.error(error.kind(), vec![id], 1, detail)
            }
        }
    }

    /// An upgrade or extended CONNECT handed to an inbound of this process, which splices
    /// the caller's connection (the request's own upgrade) with the app's.
    async fn upgrade_local(
        &self,
        inbound: LocalInbound,
        balancer: &Balancer,
        pick: Pick,
        request: Request<Body>,
    ) -> Response<Body> {
        let id = Arc::clone(&pick.endpoint.id);
        let addr = pick.endpoint.addr;
        let started = Instant::now();
        match inbound.call(&self.local_peer, request).await {
            Ok(mut response) => {
                self.record(balancer, pick, Outcome::Response(started.elapsed()));
                response.extensions_mut().insert(Served {
                    endpoint: Some(id),
                    attempts: 1,
                    via: Some(Via::InProcess),
                });
                response
            }
            Err(_unsent) => {
                self.record(balancer, pick, Outcome::ConnectFailed);
                let detail = format!("{id}: {}", draining(addr).chain());
                self.error(ErrorKind::ConnectFailed, vec![id], 1, detail)
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
        let served = Served {
            endpoint: tried.last().cloned(),
            attempts,
            via: None,
        };
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
        let mut response = error.to_response(self.cfg.protocol).map(boxed);
        response.extensions_mut().insert(served);
        response
    }
}

/// A request that becomes a tunnel of raw bytes once its response says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tunnel {
    /// HTTP/1.1 `Upgrade` (WebSocket): established by `101 Switching Protocols`.
    Upgrade,
    /// HTTP/2 extended CONNECT (RFC 8441, `:protocol`): established by `200`.
    ExtendedConnect,
}

/// The next hop's side of an established tunnel.
enum Upstream {
    Upgraded(hyper::upgrade::OnUpgrade),
    Tunnel(client::H2Tunnel),
}

impl Tunnel {
    /// Whether `status` turns the exchange into a tunnel. (hyper's HTTP/2 client hands
    /// out the stream of a CONNECT only with a `200`.)
    fn established(self, status: StatusCode) -> bool {
        match self {
            Tunnel::Upgrade => status == StatusCode::SWITCHING_PROTOCOLS,
            Tunnel::ExtendedConnect => status == StatusCode::OK,
        }
    }
}

/// The answer to a CONNECT without `:protocol` (a request for a proxy tunnel to an
/// arbitrary address): the mesh only carries requests to the called service.
fn connect_refused() -> Response<Body> {
    let mut response = Response::new(full("mesh: CONNECT tunnels are not proxied\n"));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// What one request is forwarded with: the route's `timeout` (else the called service's),
/// the service's `retries` (with the budget they share) and the chosen backend's
/// `queue_timeout`. Separate from the balancer so that a request can take one service's
/// policy to another balancer (a route backend's).
#[derive(Clone, Copy, Debug)]
struct Policy<'a> {
    timeout: Option<Duration>,
    queue_timeout: Duration,
    retries: Option<&'a (RetryPolicy, Budget)>,
}

/// What the tries of one request did so far.
#[derive(Default)]
struct Progress {
    /// The endpoints tried, in order (inline for the usual few tries).
    tried: smallvec::SmallVec<[Arc<str>; 3]>,
    attempts: u32,
    /// The endpoint of the try awaiting its response headers.
    current: Option<Arc<str>>,
    /// How the response answered was served (kept here rather than in the response's
    /// extensions, which would allocate a map per request).
    served: Option<Served>,
}

impl Progress {
    /// The response kept while later tries failed is answered with the count of them all.
    fn set_attempts(&mut self) {
        if let Some(served) = &mut self.served {
            served.attempts = self.attempts;
        }
    }
}

/// The retry rule one request follows: the default rule, or a `retries` table.
struct Rule<'a> {
    /// The configured policy and its budget; `None`: the default rule.
    policy: Option<&'a (RetryPolicy, Budget)>,
    /// Default rule: a safe method without a body, which may be repeated after it may
    /// have reached the app.
    safe: bool,
    per_try_timeout: Option<Duration>,
}

impl<'a> Rule<'a> {
    fn new(policy: &Policy<'a>, method: &http::Method, body: &ReqBody) -> Self {
        let configured = policy.retries;
        if let Some((_, budget)) = configured {
            budget.deposit();
        }
        Rule {
            policy: configured,
            safe: retry::is_safe(method) && body.is_empty(),
            per_try_timeout: configured.and_then(|(r, _)| r.per_try_timeout),
        }
    }

    /// Whether another try may follow try number `attempts` for a response condition.
    fn within(&self, attempts: u32) -> bool {
        match self.policy {
            None => attempts < TRIES,
            Some((r, _)) => attempts < r.attempts,
        }
    }

    /// A try that certainly never reached an app: always retried, up to `attempts` (and
    /// never fewer than the default rule's tries).
    fn connect_retry(&self, attempts: u32) -> bool {
        match self.policy {
            None => attempts < TRIES,
            Some((r, _)) => attempts < r.attempts.max(TRIES),
        }
    }

    /// A response: the default rule retries 502/503/504 of a safe request without a body;
    /// a policy its `on` conditions with a replayable body.
    fn on_response<B>(&self, response: &Response<B>, body: &ReqBody) -> bool {
        match self.policy {
            None => {
                self.safe
                    && matches!(
                        response.status(),
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    )
            }
            Some((r, _)) => body.replayable() && r.matches(response, false),
        }
    }

    /// The inbound reported that the app reset the request (a 502).
    fn on_reset<B>(&self, response: &Response<B>, body: &ReqBody) -> bool {
        match self.policy {
            None => self.safe,
            Some((r, _)) => body.replayable() && r.matches(response, true),
        }
    }

    /// The connection to the inbound broke before response headers.
    fn on_reset_error(&self, body: &ReqBody) -> bool {
        match self.policy {
            None => self.safe,
            Some((r, _)) => body.replayable() && r.on(RetryOn::Reset),
        }
    }

    /// The per-try timeout fired.
    fn on_timeout(&self) -> bool {
        self.policy.is_some_and(|(r, _)| r.on(RetryOn::Timeout))
    }

    /// Take a retry out of the budget (the default rule has none).
    fn withdraw(&self) -> bool {
        match self.policy {
            None => true,
            Some((_, budget)) => {
                let granted = budget.withdraw();
                if !granted {
                    tracing::debug!("retry budget spent, not retrying");
                }
                granted
            }
        }
    }
}

/// Hold the `max_concurrent` slot until the response body ends (boxed once, whatever
/// the body), and settle a deferred breaker verdict from the body's trailers.
fn guarded<B>(
    response: Response<B>,
    admission: Admission,
    verdict: Option<Deferred>,
) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::http::BoxError> + Send,
{
    response.map(|body| {
        boxed(Guarded {
            body,
            verdict,
            passed: false,
            held: None,
            _admission: admission,
        })
    })
}

/// The circuit breaker verdict of a gRPC response that is not trailers-only: its
/// `grpc-status` comes in the trailers, after the body.
struct Deferred {
    verdict: Verdict,
    /// The balancer the try went through, and where an ejection is counted.
    balancer: Balancer,
    metrics: crate::metrics::Metrics,
    caller: Arc<str>,
}

impl Deferred {
    /// Settle the verdict; count the ejection it caused.
    fn settle(self, failure: bool) {
        if self.verdict.settle(failure) {
            self.metrics.ejection(&self.caller, self.balancer.service());
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's `max_concurrent` slot, and for a gRPC
    /// response under a circuit breaker, the verdict its trailers settle.
    struct Guarded<B, E> {
        #[pin]
        body: B,
        // `None` on the hot path (http, or no breaker); taken once settled. Dropped
        // unsettled (the client went away mid-body), it counts nothing.
        verdict: Option<Deferred>,
        // Whether data went out: an error after that is held back for one turn, so that
        // the server writes those bytes before it closes or resets (`http/finish.rs`).
        passed: bool,
        held: Option<E>,
        _admission: Admission,
    }
}

impl<B: hyper::body::Body<Error = E>, E> hyper::body::Body for Guarded<B, E> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Some(error) = this.held.take() {
            return std::task::Poll::Ready(Some(Err(error)));
        }
        let mut body = this.body;
        let polled = body.as_mut().poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(_))) => *this.passed = true,
            std::task::Poll::Ready(Some(Err(_))) if *this.passed && this.verdict.is_none() => {
                if let std::task::Poll::Ready(Some(Err(error))) = polled {
                    tracing::debug!("the response body broke after some of it was sent");
                    *this.held = Some(error);
                    cx.waker().wake_by_ref();
                }
                return std::task::Poll::Pending;
            }
            _ => {}
        }
        if this.verdict.is_none() {
            return polled;
        }
        // `Some(failure)` once the outcome is known.
        let failure = match &polled {
            std::task::Poll::Pending => None,
            std::task::Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                Some(trailers) => {
                    Some(retry::grpc_status_in(trailers).is_some_and(retry::is_failing_grpc_status))
                }
                // The last data frame, and no trailers to follow (hyper may stop polling
                // here): the body ended without a `grpc-status`.
                None => body.is_end_stream().then_some(false),
            },
            // The stream broke mid-body: a reset.
            std::task::Poll::Ready(Some(Err(_))) => Some(true),
            std::task::Poll::Ready(None) => Some(false),
        };
        if let Some(failure) = failure {
            if let Some(verdict) = this.verdict.take() {
                verdict.settle(failure);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A try's response: from an inbound's listener (HTTP/2), or from an inbound of this
/// process.
type TryResponse = Response<Either<client::RecvBody, Body>>;

/// What a draining inbound of this process answers a local call: what its closed
/// listener would answer a connect.
fn draining(addr: SocketAddr) -> ForwardError {
    ForwardError::Connect {
        addr,
        source: std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "the inbound is draining",
        ),
    }
}

/// The mesh error a next hop (the inbound) reported instead of an app response.
fn hop_error<B>(response: &Response<B>) -> Option<ErrorKind> {
    response
        .headers()
        .get(HDR_ERROR)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse_simple)
}
