//! The inbound listener of one replica: requests from other sidecars (HTTP/2, and
//! HTTP/1.1 for upgrades) go to the app at `127.0.0.1:$PORT` in the HTTP version the
//! caller used (SPEC §3 "Timeouts"), with the caller's identity in `x-mesh-client-id`.
//!
//! To the app, HTTP/1.1 travels over a small keep-alive pool and h2c over one shared
//! connection (grpc is always h2c). When the app refuses the connection or closes it
//! before response headers, the inbound answers `connect-failed` or `reset` with
//! `x-mesh-error`, which tells the caller's outbound whether a retry is safe.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::errors::{ForwardError, HDR_ERROR, MeshError};
use crate::http::client::{self, H1Pool, H2Pool};
use crate::http::headers::{self, HDR_CLIENT_ID};
use crate::http::server::{self, Facing, Limits};
use crate::http::{Body, boxed};
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
    /// The app's address (`127.0.0.1:$PORT`).
    pub app: SocketAddr,
    /// Where the mesh's metrics are recorded.
    pub metrics: crate::metrics::Metrics,
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
    let tracker = TaskTracker::new();
    let span = tracing::debug_span!(
        "http_inbound",
        service = %cfg.service,
        replica = cfg.replica,
        app = %cfg.app,
    );
    let inbound = Arc::new(Inbound {
        id: Arc::from(format!("{}.{}", cfg.service, cfg.replica)),
        h1: H1Pool::new(cfg.app),
        h2: H2Pool::new(),
        cfg,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
    });
    let builder = server::builder(&limits, Facing::Sidecars);
    let stats = inbound
        .cfg
        .metrics
        .replica(&inbound.cfg.service, inbound.cfg.replica);
    let handle = move |_peer, req| {
        let inbound = Arc::clone(&inbound);
        let stats = Arc::clone(&stats);
        async move {
            let arrival = std::time::Instant::now();
            let response = inbound.handle(req).await;
            stats.record(response.status().as_u16(), arrival.elapsed());
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

struct Inbound {
    cfg: InboundConfig,
    /// `service.replica`, as `tried=` shows it.
    id: Arc<str>,
    h1: H1Pool,
    h2: H2Pool,
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
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let version = self.app_version(&req);
        let upgrade = headers::is_upgrade(&req);
        let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // The caller's identity, from the caller's sidecar only: whatever the request
        // carried as x-mesh-client-id is replaced (or removed).
        let source = parts.headers.remove(HDR_SOURCE);
        parts.headers.remove(HDR_CLIENT_ID);
        if let Some(source) = source {
            parts.headers.insert(HDR_CLIENT_ID, source);
        }
        parts.headers.remove(HDR_VERSION);
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);

        let result = match (downstream, version) {
            (Some(downstream), _) => {
                parts.uri = headers::origin_form(&parts.uri, &mut parts.headers);
                parts.version = Version::HTTP_11;
                let request = Request::from_parts(parts, boxed(body));
                // Boxed: the rare path would otherwise enlarge every request's future.
                Box::pin(self.upgrade(downstream, request)).await
            }
            (None, AppVersion::Http1) => {
                parts.uri = headers::origin_form(&parts.uri, &mut parts.headers);
                parts.version = Version::HTTP_11;
                self.h1.send(Request::from_parts(parts, boxed(body))).await
            }
            (None, AppVersion::Http2) => {
                parts.uri = headers::absolute_uri(&parts.uri, &parts.headers);
                parts.version = if parts.uri.authority().is_some() {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                let request = Request::from_parts(parts, boxed(body));
                self.h2
                    .send(self.cfg.app, request)
                    .await
                    .map_err(|(error, _unsent)| error)
            }
        };
        match result {
            Ok(mut response) => {
                let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                headers::strip_hop_by_hop(response.headers_mut(), upgraded);
                // Only the mesh reports mesh errors: an app's own x-mesh-error must not
                // make the caller's outbound retry or rewrite its response.
                response.headers_mut().remove(HDR_ERROR);
                response.map(boxed)
            }
            Err(error) => self.error(&error),
        }
    }

    /// The version the caller used, as its sidecar said; grpc apps always get h2c.
    fn app_version(&self, req: &Request<Incoming>) -> AppVersion {
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
        downstream: hyper::upgrade::OnUpgrade,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let mut response = client::send_upgrade(self.cfg.app, request).await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut response);
            client::splice(&self.tracker, self.shutdown.clone(), downstream, upstream);
        }
        Ok(response)
    }

    fn error(&self, error: &ForwardError) -> Response<Body> {
        let error = MeshError {
            kind: error.kind(),
            service: self.cfg.service.clone(),
            tried: vec![Arc::clone(&self.id)],
            attempts: 1,
            detail: format!("app: {}", error.chain()),
        };
        tracing::info!(error = %error, "request to the app failed");
        error.to_response(self.cfg.protocol).map(boxed)
    }
}
