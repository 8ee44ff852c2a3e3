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

mod retry;

use std::net::SocketAddr;
use std::sync::Arc;

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
    let peer_tls = cfg.tls.as_ref().map(|client| PeerTls {
        client: client.clone(),
        server_identity: format!("spiffe://{}/{}", cfg.mesh_name, cfg.service),
        metrics: cfg.metrics.clone(),
        service: cfg.service.clone(),
    });
    // With mTLS the certificate carries the identity: no header that could be trusted
    // by mistake.
    let source = cfg.tls.is_none().then_some(source);
    let outbound = Arc::new(Outbound {
        cfg,
        source,
        balancer,
        pool: H2Pool::with_tls(peer_tls.clone()),
        peer_tls,
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
    let handle = move |peer, req| {
        let outbound = Arc::clone(&outbound);
        async move {
            let arrival = Instant::now();
            let response = outbound.handle(peer, req).await;
            let cfg = &outbound.cfg;
            cfg.metrics.request(
                &cfg.caller,
                &cfg.service,
                "",
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
    pool: H2Pool,
    /// Mutual TLS for upgrade connections (the pool has its own copy).
    peer_tls: Option<PeerTls>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Outbound {
    async fn handle(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let arrival = Instant::now();
        let deadline = arrival + self.cfg.traffic.queue_timeout;
        if headers::is_upgrade(&req) {
            // Boxed: the rare path would otherwise enlarge every request's future.
            return Box::pin(self.upgrade(peer, req, deadline)).await;
        }
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

        let mut tried: Vec<Arc<str>> = Vec::new();
        let mut attempts: u32 = 0;
        // The failure of the last try, answered if no further try happens.
        let mut last: Option<(ErrorKind, String)> = None;
        loop {
            let Some(pick) = self.balancer.pick(&tried, deadline).await else {
                let (kind, detail) = last.unwrap_or_else(|| {
                    (
                        ErrorKind::NoEndpoints,
                        format!(
                            "no ready endpoint within queue_timeout {:?}",
                            self.cfg.traffic.queue_timeout
                        ),
                    )
                });
                return self.error(kind, tried, attempts, detail);
            };
            let Some(try_body) = body.take() else {
                // A streaming body already went out with an earlier try; the retry rules
                // below never start another try then.
                let (kind, detail) =
                    last.unwrap_or((ErrorKind::Reset, "request body consumed".into()));
                return self.error(kind, tried, attempts, detail);
            };
            attempts += 1;
            let id = Arc::clone(&pick.endpoint.id);
            tried.push(Arc::clone(&id));
            let mut request = Request::new(try_body);
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.version_mut() = version;
            *request.headers_mut() = parts.headers.clone();
            request
                .headers_mut()
                .insert(HDR_ATTEMPT, HeaderValue::from(attempts));

            let started = Instant::now();
            let retryable = match self.pool.send(pick.endpoint.addr, request).await {
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
                            if gateway && safe && attempts < TRIES {
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
            if !again || attempts >= TRIES {
                let (kind, detail) = last.unwrap_or((ErrorKind::Reset, String::new()));
                return self.error(kind, tried, attempts, detail);
            }
        }
    }

    /// An HTTP/1.1 upgrade: one try over a dedicated HTTP/1.1 connection to the inbound,
    /// then both upgraded streams are spliced. Exempt from retries.
    async fn upgrade(
        &self,
        peer: SocketAddr,
        mut req: Request<Incoming>,
        deadline: Instant,
    ) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        self.hop_headers(&mut parts.headers, peer, parts.version);
        headers::strip_hop_by_hop(&mut parts.headers, true);
        parts
            .headers
            .insert(HDR_ATTEMPT, HeaderValue::from_static("1"));
        let Some(pick) = self.balancer.pick(&[], deadline).await else {
            let detail = format!(
                "no ready endpoint within queue_timeout {:?}",
                self.cfg.traffic.queue_timeout
            );
            return self.error(ErrorKind::NoEndpoints, Vec::new(), 0, detail);
        };
        let id = Arc::clone(&pick.endpoint.id);
        let started = Instant::now();
        let request = Request::from_parts(parts, boxed(body));
        match client::send_upgrade_via(pick.endpoint.addr, self.peer_tls.as_ref(), request).await {
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
