//! The inbound listener of one replica: requests from other sidecars (HTTP/2, and
//! HTTP/1.1 for upgrades) go to the app at `127.0.0.1:$PORT` in the HTTP version the
//! caller used (SPEC §3 "Timeouts"), with the caller's identity in `x-mesh-client-id`.
//! Upgrades (HTTP/1.1 `Upgrade`, HTTP/2 extended CONNECT) are spliced once the app
//! accepts them.
//!
//! To the app, HTTP/1.1 travels over a small keep-alive pool and h2c over one shared
//! connection (grpc is always h2c). When the app refuses the connection or closes it
//! before response headers, the inbound answers `connect-failed` or `reset` with
//! `x-mesh-error`, which tells the caller's outbound whether a retry is safe.
//!
//! With mutual TLS ([`InboundConfig::tls`]), the caller's identity is the one its
//! certificate proves, and a caller whose identity is not [`InboundConfig::admitted`] gets
//! `unauthorized` (403, or grpc-status 7) before anything reaches the app. With
//! `tls = "off"` the identity is what the calling sidecar says in an internal header, and
//! nothing is enforced (SPEC §1).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use parking_lot::RwLock;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::errors::{ErrorKind, ForwardError, HDR_DETAIL, HDR_ERROR, MeshError};
use crate::http::client::{self, H1Pool, H2Pool};
use crate::http::finish::{End, Finish};
use crate::http::headers::{self, HDR_CLIENT_ID};
use crate::http::server::{self, Facing, Limits, PeerIdentity, ServerTls};
use crate::http::{Body, boxed};
use crate::live::Live;
use crate::metrics::ReplicaStats;
use crate::ratelimit::{self, RateLimit, TokenBucket};
use crate::{HDR_SOURCE, HDR_VERSION, Protocol};

/// What an inbound listener serves.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// The mesh name.
    pub mesh_name: String,
    /// The replica's service.
    pub service: String,
    /// The replica's index (its endpoint id is `service.replica`).
    pub replica: u32,
    /// The service's protocol (`Http` or `Grpc`; grpc apps are always spoken to in h2c).
    pub protocol: Protocol,
    /// The app's address (`127.0.0.1:$PORT`); a rolling replacement moves it to the new
    /// process's port.
    pub app: Live<SocketAddr>,
    /// Where the mesh's metrics are recorded.
    pub metrics: crate::metrics::Metrics,
    /// The service's `traffic.rate_limit`: this replica's token bucket (a new bucket,
    /// full, when a reload changes it).
    pub rate_limit: Live<Option<RateLimit>>,
    /// Mutual TLS (`tls = "mutual"`): the replica's server configuration, whose
    /// identity is `spiffe://<mesh_name>/<service>` and which offers ALPN `h2` and
    /// `http/1.1` ([`crate::tls::ALPN_INBOUND_HTTP`]). `None` serves plain connections
    /// and enforces no authorization (`tls = "off"`).
    pub tls: Option<Arc<crate::tls::ServerConfig>>,
    /// The identity names (`web`, `ingress`, …: the last segment of
    /// `spiffe://<mesh_name>/<name>`) admitted as callers when `tls` is on.
    pub admitted: Live<BTreeSet<String>>,
}

/// Serve `listener` with default [`Limits`] until `shutdown`, then drain: stop accepting,
/// finish the requests in flight, and return.
pub async fn serve(listener: TcpListener, cfg: InboundConfig, shutdown: CancellationToken) {
    serve_with(listener, cfg, Limits::default(), shutdown).await;
}

/// [`serve`] with explicit [`Limits`].
pub async fn serve_with(
    listener: TcpListener,
    cfg: InboundConfig,
    limits: Limits,
    shutdown: CancellationToken,
) {
    InboundServer::new(cfg, limits, shutdown)
        .serve(listener)
        .await;
}

/// One replica's inbound before it serves: [`InboundServer::local`] hands out the entry
/// point for sidecars of this process (SPEC §1 "The local path"),
/// [`InboundServer::serve`] serves the TLS (or plain) listener. Both entry points run the
/// same inbound: authorization, rate limit, drain, headers, metrics.
pub struct InboundServer {
    inbound: Arc<Inbound>,
    limits: Limits,
}

impl InboundServer {
    /// The inbound of `cfg`, which drains when `shutdown` is cancelled.
    pub fn new(cfg: InboundConfig, limits: Limits, shutdown: CancellationToken) -> Self {
        let stats = cfg.metrics.replica(&cfg.service, cfg.replica);
        let inbound = Arc::new(Inbound {
            stats,
            id: Arc::from(format!("{}.{}", cfg.service, cfg.replica)),
            trust_domain: format!("spiffe://{}/", cfg.mesh_name),
            target: RwLock::new(Arc::new(AppTarget::new(
                *cfg.app.get(),
                limits.app_idle_timeout,
            ))),
            idle_timeout: limits.app_idle_timeout,
            bucket: RwLock::new(Arc::new(
                cfg.rate_limit
                    .get()
                    .map(|limit| TokenBucket::new(limit, tokio::time::Instant::now())),
            )),
            cfg,
            tracker: TaskTracker::new(),
            shutdown,
        });
        InboundServer { inbound, limits }
    }

    /// The entry point for outbounds of this process.
    pub fn local(&self) -> LocalInbound {
        LocalInbound {
            inbound: Arc::clone(&self.inbound),
        }
    }

    /// Serve `listener` until the shutdown token is cancelled, then drain: stop
    /// accepting, finish the requests in flight (those of the local entry point too),
    /// and return.
    pub async fn serve(self, listener: TcpListener) {
        let InboundServer { inbound, limits } = self;
        let cfg = &inbound.cfg;
        let span = tracing::debug_span!(
            "http_inbound",
            service = %cfg.service,
            replica = cfg.replica,
            app = %cfg.app.get(),
        );
        let server_tls = cfg.tls.as_ref().map(|config| ServerTls {
            config: Arc::clone(config),
            metrics: cfg.metrics.clone(),
            service: cfg.service.clone(),
        });
        let errors =
            cfg.metrics
                .connection_errors(crate::metrics::Listener::Inbound, "", &cfg.service);
        let builder = server::builder(&limits, Facing::Sidecars);
        let tracker = inbound.tracker.clone();
        let shutdown = inbound.shutdown.clone();
        let handle = move |_peer, mut req: Request<hyper::body::Incoming>| {
            let inbound = Arc::clone(&inbound);
            // Set by the TLS accept loop for every request of a TLS connection.
            let peer = req.extensions_mut().remove::<PeerIdentity>();
            async move { inbound.serve_request(req, peer, None).await }
        };
        async move {
            server::serve_tls(
                listener, builder, limits, tracker, shutdown, server_tls, errors, handle,
            )
            .await;
            tracing::debug!("shutdown complete");
        }
        .instrument(span)
        .await;
    }
}

/// A replica's inbound as the outbounds of this process call it: no socket, no TLS, no
/// HTTP/2 framing; the caller's identity is the one the process gave its outbound.
/// Cheap to clone.
#[derive(Clone)]
pub struct LocalInbound {
    inbound: Arc<Inbound>,
}

impl std::fmt::Debug for LocalInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LocalInbound")
            .field(&self.inbound.id)
            .finish()
    }
}

impl PartialEq for LocalInbound {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inbound, &other.inbound)
    }
}

impl LocalInbound {
    /// Serve `req` from the caller `peer`, exactly as a request of that identity over the
    /// TLS listener: authorization, rate limit, `x-mesh-client-id`, the caller's HTTP
    /// version towards the app, upgrades (the request's own upgrade, spliced with the
    /// app's), metrics. The inbound's drain waits for the request and its response body.
    /// A draining inbound takes no new request: `req` comes back unsent, as a closed
    /// listener would refuse a connection.
    pub(crate) async fn call(
        &self,
        peer: &PeerIdentity,
        req: Request<Body>,
    ) -> Result<Response<Body>, Request<Body>> {
        if self.inbound.shutdown.is_cancelled() {
            return Err(req);
        }
        let hold = self.inbound.tracker.token();
        Ok(self
            .inbound
            .serve_request(req, Some(peer.clone()), Some(hold))
            .await)
    }
}
/// The app's address and the connections to it.
struct AppTarget {
    addr: SocketAddr,
    h1: H1Pool,
    h2: H2Pool,
}

impl AppTarget {
    fn new(addr: SocketAddr, idle_timeout: std::time::Duration) -> Self {
        AppTarget {
            addr,
            h1: H1Pool::with_idle_timeout(addr, idle_timeout),
            h2: H2Pool::new(),
        }
    }
}

struct Inbound {
    cfg: InboundConfig,
    /// This replica's recent traffic, for `mesh ps`.
    stats: Arc<ReplicaStats>,
    /// `service.replica`, as `tried=` shows it.
    id: Arc<str>,
    /// `spiffe://<mesh>/`, the prefix of every identity of this mesh.
    trust_domain: String,
    /// Connections to the app at its current address.
    target: RwLock<Arc<AppTarget>>,
    idle_timeout: std::time::Duration,
    /// This replica's `rate_limit` bucket, for the limit in force.
    bucket: RwLock<Arc<Option<TokenBucket>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// The HTTP version spoken to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AppVersion {
    Http1,
    Http2,
}

impl Inbound {
    /// One request, from the listener or from the local entry point, with the identity
    /// the caller proved (its certificate, or the one this process gave its outbound;
    /// `hold` keeps the drain waiting until the response body ends), recorded for
    /// `mesh ps`.
    async fn serve_request<B>(
        self: &Arc<Self>,
        req: Request<B>,
        peer: Option<PeerIdentity>,
        hold: Option<TaskTrackerToken>,
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::http::BoxError>,
    {
        let arrival = std::time::Instant::now();
        let response = self.handle(req, peer, hold).await;
        self.stats
            .record(response.status().as_u16(), arrival.elapsed());
        response
    }

    async fn handle<B>(
        self: &Arc<Self>,
        mut req: Request<B>,
        peer: Option<PeerIdentity>,
        hold: Option<TaskTrackerToken>,
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::http::BoxError>,
    {
        let peer = match self.authorize(peer) {
            Ok(peer) => peer,
            Err(refusal) => return refusal,
        };
        // SPEC §3: the rate limit applies after authorization, to every caller.
        if let Some(refused) = self.rate_limit(&req, peer.as_ref()) {
            return refused;
        }
        let version = self.app_version(&req);
        let upgrade = headers::is_upgrade(&req);
        let connect = headers::is_extended_connect(&req);
        let downstream = (upgrade || connect).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // The caller's identity: with mTLS the one its certificate proves, else what the
        // caller's sidecar said. Whatever the request carried as x-mesh-client-id is
        // replaced (or removed).
        let source = parts.headers.remove(HDR_SOURCE);
        // Who called, for the report of a response the app cuts (rare: kept cheap).
        let caller = Caller {
            identity: peer.as_ref().map(|p| Arc::clone(&p.identity)),
            source: source.clone(),
        };
        let client_id = match peer {
            Some(peer) => peer.header,
            None => source,
        };
        // `insert` replaces every value the request carried.
        match client_id {
            Some(client_id) => parts.headers.insert(HDR_CLIENT_ID, client_id),
            None => parts.headers.remove(HDR_CLIENT_ID),
        };
        parts.headers.remove(HDR_VERSION);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);

        let app = self.target();
        let result = match (downstream, version) {
            // Extended CONNECT exists only in HTTP/2: the app gets it as a stream of the
            // shared h2c connection, with the caller's `:protocol` (still in the parts'
            // extensions).
            (Some(downstream), _) if connect => {
                parts.uri = headers::absolute_uri(&parts.uri, &parts.headers);
                parts.version = Version::HTTP_2;
                let request = Request::from_parts(parts, boxed(body));
                // Boxed: the rare path would otherwise enlarge every request's future.
                Box::pin(self.extended_connect(&app, downstream, request))
                    .await
                    .map(tunnel_response)
            }
            (Some(downstream), _) => {
                parts.uri = headers::origin_form(&parts.uri, &mut parts.headers);
                parts.version = Version::HTTP_11;
                let request = Request::from_parts(parts, boxed(body));
                // Boxed: the rare path would otherwise enlarge every request's future.
                Box::pin(self.upgrade(&app, downstream, request))
                    .await
                    .map(tunnel_response)
            }
            (None, AppVersion::Http1) => {
                parts.uri = headers::origin_form(&parts.uri, &mut parts.headers);
                parts.version = Version::HTTP_11;
                app.h1
                    .send(Request::from_parts(parts, boxed(body)))
                    .await
                    .map(|response| self.watch_body(response, caller, hold))
            }
            (None, AppVersion::Http2) => {
                parts.uri = headers::absolute_uri(&parts.uri, &parts.headers);
                parts.version = if parts.uri.authority().is_some() {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                let request = Request::from_parts(parts, boxed(body));
                app.h2
                    .send(app.addr, request)
                    .await
                    .map(|response| self.watch_body(response, caller, hold))
                    .map_err(|(error, _unsent)| error)
            }
        };
        result.unwrap_or_else(|error| {
            // An HTTP/2 server that did not enable extended CONNECT resets the stream
            // with PROTOCOL_ERROR: say what the app lacks.
            let hint = if connect && error.is_protocol_error() {
                " (extended CONNECT needs the app's HTTP/2 server to enable it: SETTINGS_ENABLE_CONNECT_PROTOCOL)"
            } else {
                ""
            };
            self.error(&error, hint)
        })
    }

    /// Authorization (SPEC §1): with mutual TLS, the caller's verified identity must be
    /// one of this mesh's and admitted; anyone else gets `unauthorized`, naming both
    /// identities. Returns the caller's identity (`None` with `tls = "off"`, where
    /// nothing is enforced).
    #[allow(
        clippy::result_large_err,
        reason = "the refusal is the response itself, built on the rare path"
    )]
    fn authorize(
        &self,
        peer: Option<PeerIdentity>,
    ) -> Result<Option<PeerIdentity>, Response<Body>> {
        if self.cfg.tls.is_none() {
            return Ok(None);
        }
        let name = peer
            .as_ref()
            .and_then(|peer| peer.identity.strip_prefix(self.trust_domain.as_str()));
        if let Some(name) = name {
            if self.cfg.admitted.get().contains(name) {
                return Ok(peer);
            }
        }
        let caller = peer
            .as_ref()
            .map_or("an unidentified peer", |p| &*p.identity);
        let service = format!("{}{}", self.trust_domain, self.cfg.service);
        let hint = match name {
            Some(name) => format!(
                " (list `{}` in the upstreams of `{name}`, or `{name}` in its allow)",
                self.cfg.service
            ),
            None => String::new(),
        };
        let error = MeshError {
            kind: ErrorKind::Unauthorized,
            service: self.cfg.service.clone(),
            tried: vec![Arc::clone(&self.id)],
            attempts: 1,
            detail: format!("{caller} is not allowed to call {service}{hint}"),
        };
        tracing::warn!(error = %error, "caller refused");
        self.cfg.metrics.mesh_error(
            name.unwrap_or(caller),
            &self.cfg.service,
            ErrorKind::Unauthorized.as_str(),
        );
        Err(error.to_response(self.cfg.protocol).map(boxed))
    }

    /// The version the caller used, as its sidecar said; grpc apps always get h2c.
    fn app_version<B>(&self, req: &Request<B>) -> AppVersion {
        if self.cfg.protocol == Protocol::Grpc {
            return AppVersion::Http2;
        }
        match req.headers().get(HDR_VERSION).map(HeaderValue::as_bytes) {
            Some(b"2") => AppVersion::Http2,
            Some(_) => AppVersion::Http1,
            None if req.version() == Version::HTTP_2 => AppVersion::Http2,
            None => AppVersion::Http1,
        }
    }

    /// Forward an upgrade over a dedicated HTTP/1.1 connection to the app and splice the
    /// upgraded streams after `101`.
    async fn upgrade(
        &self,
        app: &AppTarget,
        downstream: hyper::upgrade::OnUpgrade,
        request: Request<Body>,
    ) -> Result<Response<Body>, ForwardError> {
        let mut response = client::send_upgrade(app.addr, request).await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut response);
            client::splice(&self.tracker, self.shutdown.clone(), downstream, upstream);
        }
        Ok(response.map(boxed))
    }

    /// Forward an extended CONNECT to the app as a stream of the shared h2c connection,
    /// and splice the tunnel's streams after `200`.
    async fn extended_connect(
        &self,
        app: &AppTarget,
        downstream: hyper::upgrade::OnUpgrade,
        request: Request<Body>,
    ) -> Result<Response<Body>, ForwardError> {
        let (response, tunnel) = app.h2.send_connect(app.addr, request).await?;
        if let Some(upstream) = tunnel {
            client::splice_tunnel(&self.tracker, self.shutdown.clone(), downstream, upstream);
        }
        Ok(response)
    }

    /// The rate-limit step: `None` when the request may go on, else the `rate-limited`
    /// answer (429 with `Retry-After`; grpc-status 8 for grpc).
    fn rate_limit<B>(
        &self,
        req: &Request<B>,
        peer: Option<&PeerIdentity>,
    ) -> Option<Response<Body>> {
        let bucket = self.bucket()?;
        let bucket = bucket.as_ref().as_ref()?;
        let wait = bucket.try_take(tokio::time::Instant::now()).err()?;
        let limit = bucket.limit();
        let error = MeshError {
            kind: ErrorKind::RateLimited {
                retry_after_secs: ratelimit::retry_after_secs(wait),
            },
            service: self.cfg.service.clone(),
            tried: vec![Arc::clone(&self.id)],
            attempts: 1,
            detail: format!(
                "rate limit of {} rps (burst {}) exceeded",
                limit.rps, limit.burst
            ),
        };
        // Debug, not info: a client hammering a limited service would flood the log.
        tracing::debug!(error = %error, "request refused");
        self.cfg.metrics.mesh_error(
            self.caller_name(req, peer),
            &self.cfg.service,
            error.kind.as_str(),
        );
        Some(error.to_response(self.cfg.protocol).map(boxed))
    }

    /// The mesh error for a request the app did not answer; `hint` ends its detail.
    fn error(&self, error: &ForwardError, hint: &str) -> Response<Body> {
        let error = MeshError {
            kind: error.kind(),
            service: self.cfg.service.clone(),
            tried: vec![Arc::clone(&self.id)],
            attempts: 1,
            detail: format!("app: {}{hint}", error.chain()),
        };
        tracing::info!(error = %error, "request to the app failed");
        let mut response = error.to_response(self.cfg.protocol).map(boxed);
        // The caller's outbound words its own error line (with every try in it) and
        // takes the why from here; it removes the header.
        if let Ok(detail) = HeaderValue::from_str(&error.detail) {
            response.headers_mut().insert(HDR_DETAIL, detail);
        }
        response
    }

    /// The app's response, whose body is watched: an app that breaks it mid-way (a
    /// `Content-Length` it does not fill, a connection closed, a stream reset) is a failed
    /// request of this replica for `mesh ps` and the metrics, and is logged. The caller
    /// still gets the status and the bytes that came, then the break. `hold` (a local
    /// call's) keeps the inbound's drain waiting until the body ends.
    fn watch_body<B>(
        self: &Arc<Self>,
        mut response: Response<B>,
        caller: Caller,
        hold: Option<TaskTrackerToken>,
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::http::BoxError>,
    {
        let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        clean_response(response.headers_mut(), upgraded);
        if upgraded {
            return response.map(boxed);
        }
        // One reference for everything the report needs, boxed once with the body.
        let inbound = Arc::clone(self);
        response.map(move |body| {
            boxed(Finish::new(body, move |end| {
                drop(hold);
                let End::Cut { bytes, error } = end else {
                    return;
                };
                inbound.stats.cut();
                let name = caller.name(&inbound.trust_domain);
                inbound.cfg.metrics.mesh_error(
                    &name,
                    &inbound.cfg.service,
                    ErrorKind::Reset.as_str(),
                );
                tracing::warn!(
                    "{}: the app broke its response to {name} after {bytes} body bytes: {error}",
                    inbound.id
                );
            }))
        })
    }
}

/// The app's response headers as the caller gets them: hop-by-hop fields stripped, and
/// no `x-mesh-error` of the app's own: only the mesh reports mesh errors, and an app's
/// would make the caller's outbound retry or rewrite its response.
fn clean_response(headers: &mut http::HeaderMap, upgraded: bool) {
    headers::strip_hop_by_hop(headers, upgraded);
    headers.remove(HDR_ERROR);
    headers.remove(HDR_DETAIL);
}

/// An upgrade's or extended CONNECT's response from the app, cleaned: its body is the
/// tunnel, not watched.
fn tunnel_response(mut response: Response<Body>) -> Response<Body> {
    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    clean_response(response.headers_mut(), upgraded);
    response
}

impl Inbound {
    /// The connections to the app at its current address (new ones after a rolling
    /// replacement moved it).
    fn target(&self) -> Arc<AppTarget> {
        let addr = *self.cfg.app.get();
        let current = Arc::clone(&self.target.read());
        if current.addr == addr {
            return current;
        }
        let fresh = Arc::new(AppTarget::new(addr, self.idle_timeout));
        *self.target.write() = Arc::clone(&fresh);
        fresh
    }

    /// The token bucket of the rate limit in force, `None` without one (a new, full
    /// bucket when a reload changed the limit).
    fn bucket(&self) -> Option<Arc<Option<TokenBucket>>> {
        // Most services have no limit: say so without taking references.
        if self.cfg.rate_limit.read(Option::is_none) && self.bucket.read().is_none() {
            return None;
        }
        let limit = *self.cfg.rate_limit.get();
        let current = Arc::clone(&self.bucket.read());
        if current.as_ref().as_ref().map(TokenBucket::limit) == limit {
            return limit.is_some().then_some(current);
        }
        let fresh = Arc::new(limit.map(|l| TokenBucket::new(l, tokio::time::Instant::now())));
        *self.bucket.write() = Arc::clone(&fresh);
        limit.is_some().then_some(fresh)
    }
}

/// The caller of one request, kept for the report of a response the app cuts.
struct Caller {
    identity: Option<Arc<str>>,
    source: Option<HeaderValue>,
}

impl Caller {
    /// The caller's name (`web`, `ingress`), as the metrics label it.
    fn name(&self, trust_domain: &str) -> String {
        if let Some(identity) = &self.identity {
            return identity
                .strip_prefix(trust_domain)
                .unwrap_or(identity)
                .to_string();
        }
        self.source
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|id| id.rsplit('/').next())
            .unwrap_or("unknown")
            .to_string()
    }
}

impl Inbound {
    /// The calling identity's name (`web`, `ingress`) for metrics: from its certificate
    /// with mutual TLS, else from the identity its sidecar sent; "unknown" without one.
    fn caller_name<'a, B>(
        &'a self,
        req: &'a Request<B>,
        peer: Option<&'a PeerIdentity>,
    ) -> &'a str {
        if let Some(peer) = peer {
            return peer
                .identity
                .strip_prefix(self.trust_domain.as_str())
                .unwrap_or(&peer.identity);
        }
        req.headers()
            .get(HDR_SOURCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|id| id.rsplit('/').next())
            .unwrap_or("unknown")
    }
}
