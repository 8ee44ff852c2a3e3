//! Opaque TCP through the mesh: a caller's outbound listener for a `tcp` upstream, and the
//! inbound listener of a `tcp` replica.
//!
//! Bytes are copied both ways with half-close respected: when one side shuts down its
//! write half, the other side's write half is shut down too and the other direction
//! keeps flowing until it ends, so request/response protocols that signal the end of a
//! request with EOF work.
//!
//! A connection the mesh cannot serve (no endpoint within `queue_timeout`, or every
//! connect failed) is closed without data and the kind is logged (SPEC §1).
//!
//! With mutual TLS the hop between the two sidecars is a TLS stream (no ALPN): the
//! outbound proves its caller's identity and checks the replica's, and the inbound closes
//! the connection of a caller that is not admitted, logging and counting `unauthorized`.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::Traffic;
use crate::balance::{Admission, Balancer, NoPick, Outcome, Pick};
use crate::http::server::{ACCEPT_WARN_INTERVAL, WarnLimiter};
use crate::metrics::{Metrics, Side};
use crate::ratelimit::{RateLimit, TokenBucket};
use crate::routes::Routes;
use crate::{stats, tls};

/// How many endpoints one outbound connection tries before giving up with
/// `connect-failed`.
const MAX_CONNECT_TRIES: usize = 3;
/// The bound on one connect attempt. On loopback a connect fails or succeeds at once;
/// this only matters for a peer that drops SYNs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The pause after a failed `accept` (e.g. out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// The bound on an inbound's TLS handshake with a connecting sidecar, so that a client
/// that connects and says nothing does not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a caller's outbound listener for a `tcp` service serves.
#[derive(Clone, Debug)]
pub struct TcpOutboundConfig {
    /// The mesh name, the trust domain of identities.
    pub mesh_name: String,
    /// The caller's identity name (a service, or "ingress" / "test").
    pub caller: String,
    /// The called service.
    pub service: String,
    /// Traffic settings for calls to the service.
    pub traffic: Traffic,
    /// Where the mesh's metrics are recorded.
    pub metrics: Metrics,
    /// The service's routes: each connection goes to a backend drawn by weight.
    pub routes: Routes,
    /// Mutual TLS to inbounds: the caller's client configuration without ALPN
    /// ([`tls::ClientTls::opaque`]). `None` with `tls = "off"`.
    pub tls: Option<Arc<tls::ClientConfig>>,
}

/// What the inbound listener of one `tcp` replica serves.
#[derive(Clone, Debug)]
pub struct TcpInboundConfig {
    /// The mesh name.
    pub mesh_name: String,
    /// The replica's service.
    pub service: String,
    /// The replica's index.
    pub replica: u32,
    /// The app's address (`127.0.0.1:$PORT`).
    pub app: crate::live::Live<SocketAddr>,
    /// Where the mesh's metrics are recorded.
    pub metrics: Metrics,
    /// The service's `traffic.rate_limit`: new connections per second of this replica
    /// (a new, full bucket when a reload changes it).
    pub rate_limit: crate::live::Live<Option<RateLimit>>,
    /// Mutual TLS: the replica's server configuration, without ALPN. `None` with
    /// `tls = "off"` (plain, nothing enforced).
    pub tls: Option<Arc<tls::ServerConfig>>,
    /// The identity names admitted as callers when `tls` is on (see
    /// [`crate::inbound::InboundConfig::admitted`]).
    pub admitted: crate::live::Live<BTreeSet<String>>,
}

/// Serve a caller's outbound listener for a `tcp` service: each accepted connection is
/// piped to an endpoint chosen by `balancer`.
///
/// On `shutdown` it stops accepting at once, then returns when the open connections have
/// ended. Dropping the returned future closes the connections still open.
pub async fn serve_outbound(
    listener: TcpListener,
    cfg: TcpOutboundConfig,
    balancer: Balancer,
    shutdown: CancellationToken,
) {
    serve_outbound_live(listener, crate::live::Live::new((cfg, balancer)), shutdown).await;
}

/// [`serve_outbound`] with settings the runtime may replace (a reload): each new
/// connection follows the settings in force when it arrives.
pub async fn serve_outbound_live(
    listener: TcpListener,
    setup: crate::live::Live<(TcpOutboundConfig, Balancer)>,
    shutdown: CancellationToken,
) {
    let service: Arc<str> = setup.get().0.service.as_str().into();
    {
        let first = setup.get();
        first
            .0
            .metrics
            .stats()
            .watch_balancer(&first.0.caller, &first.1);
    }
    let local = listener.local_addr().ok();
    let (tracker, force) = (TaskTracker::new(), CancellationToken::new());
    serve(
        listener,
        shutdown,
        tracker,
        force,
        "outbound",
        |client, peer, force| {
            let span = tracing::info_span!("tcp_outbound", service = %service, %peer);
            let current = setup.get();
            // The route step (SPEC §3 Routes): a backend drawn per connection.
            let (balancer, queue_timeout) = match current.0.routes.decide_connection().backend {
                Some(backend) => (backend.balancer.clone(), backend.queue_timeout),
                None => (current.1.clone(), current.0.traffic.queue_timeout),
            };
            async move { proxy_outbound(client, &current.0, &balancer, queue_timeout, force).await }
                .instrument(span)
        },
    )
    .instrument(tracing::info_span!("tcp_outbound_listener", service = %service, listener = ?local))
    .await;
}

/// Serve a replica's inbound listener: each connection from a sidecar is piped to the
/// app at `app`.
///
/// On `shutdown` it stops accepting at once, then returns when the open connections have
/// ended. Dropping the returned future closes the connections still open.
pub async fn serve_inbound(
    listener: TcpListener,
    cfg: TcpInboundConfig,
    shutdown: CancellationToken,
) {
    TcpInboundServer::new(cfg, shutdown).serve(listener).await;
}

/// One tcp replica's inbound before it serves: [`TcpInboundServer::local`] hands out the
/// entry point for outbounds of this process (SPEC §1 "The local path"),
/// [`TcpInboundServer::serve`] serves its listener. Both run the same steps:
/// authorization, rate limit, the app connect, drain.
pub struct TcpInboundServer {
    inbound: Arc<TcpInbound>,
}

struct TcpInbound {
    cfg: TcpInboundConfig,
    /// The bucket of the limit in force: a new, full one when a reload changes it.
    bucket: parking_lot::Mutex<Option<Arc<TokenBucket>>>,
    /// `spiffe://<mesh>/`.
    trust_domain: String,
    /// The connections of both entry points, waited for by the drain.
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Cancelled when [`TcpInboundServer::serve`] ends or is dropped: every connection
    /// closes.
    force: CancellationToken,
}

impl TcpInboundServer {
    /// The inbound of `cfg`, which drains when `shutdown` is cancelled.
    pub fn new(cfg: TcpInboundConfig, shutdown: CancellationToken) -> Self {
        let bucket = cfg
            .rate_limit
            .get()
            .map(|limit| Arc::new(TokenBucket::new(limit, Instant::now())));
        let trust_domain = format!("spiffe://{}/", cfg.mesh_name);
        TcpInboundServer {
            inbound: Arc::new(TcpInbound {
                cfg,
                bucket: parking_lot::Mutex::new(bucket),
                trust_domain,
                tracker: TaskTracker::new(),
                shutdown,
                force: CancellationToken::new(),
            }),
        }
    }

    /// The entry point for outbounds of this process.
    pub fn local(&self) -> LocalTcpInbound {
        LocalTcpInbound {
            inbound: Arc::clone(&self.inbound),
        }
    }

    /// Serve `listener` until the shutdown token is cancelled, then drain (the local
    /// entry point's connections too).
    pub async fn serve(self, listener: TcpListener) {
        let inbound = self.inbound;
        let app = *inbound.cfg.app.get();
        let local = listener.local_addr().ok();
        let tracker = inbound.tracker.clone();
        let shutdown = inbound.shutdown.clone();
        let force = inbound.force.clone();
        let accepted = inbound.cfg.metrics.connections(
            crate::metrics::Listener::Inbound,
            "",
            &inbound.cfg.service,
        );
        serve(
            listener,
            shutdown,
            tracker,
            force,
            "inbound",
            |client, peer, force| {
                accepted.inc();
                let span = tracing::info_span!("tcp_inbound", %app, %peer);
                let inbound = Arc::clone(&inbound);
                async move { inbound.accept(client, peer, force).await }.instrument(span)
            },
        )
        .instrument(tracing::info_span!("tcp_inbound_listener", %app, listener = ?local))
        .await;
    }
}

/// A tcp replica's inbound as the outbounds of this process call it: the caller's stream
/// goes to the app with no socket or TLS between the sidecars. Cheap to clone.
#[derive(Clone)]
pub struct LocalTcpInbound {
    inbound: Arc<TcpInbound>,
}

impl std::fmt::Debug for LocalTcpInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cfg = &self.inbound.cfg;
        write!(f, "LocalTcpInbound({}.{})", cfg.service, cfg.replica)
    }
}

impl PartialEq for LocalTcpInbound {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inbound, &other.inbound)
    }
}

impl LocalTcpInbound {
    /// Whether the inbound takes new connections (not while it drains, as its closed
    /// listener would refuse them).
    pub(crate) fn open(&self) -> bool {
        !self.inbound.shutdown.is_cancelled()
    }

    /// Serve `client` from the caller named `caller` (`web`, `ingress`), exactly as a
    /// connection of that identity over the TLS listener, until both directions end or
    /// either side's `force` is cancelled. The inbound's drain waits for it.
    pub(crate) async fn serve(&self, client: TcpStream, caller: &str, force: &CancellationToken) {
        let inbound = &self.inbound;
        let _hold = inbound.tracker.token();
        let identity = format!("{}{caller}", inbound.trust_domain);
        let proxied = async {
            if inbound.cfg.tls.is_some() && !inbound.authorized(&identity) {
                return;
            }
            let name = if inbound.cfg.tls.is_some() {
                caller
            } else {
                "unknown"
            };
            if !inbound.admit_rate(name) {
                return;
            }
            proxy_inbound(client, *inbound.cfg.app.get(), force).await;
        };
        tokio::select! {
            () = proxied => {}
            () = inbound.force.cancelled() => {}
        }
    }
}

impl TcpInbound {
    /// The TLS handshake and authorization of a connection from a sidecar (when mTLS is
    /// on), then [`proxy_inbound`].
    async fn accept(&self, client: TcpStream, peer: SocketAddr, force: CancellationToken) {
        let _ = client.set_nodelay(true);
        let Some(config) = &self.cfg.tls else {
            // SPEC §3: the rate limit applies to every caller (here unidentified).
            if !self.admit_rate("unknown") {
                return;
            }
            return proxy_inbound(client, *self.cfg.app.get(), &force).await;
        };
        let handshake = tls::accept_counted(
            Arc::clone(config),
            client,
            HANDSHAKE_TIMEOUT,
            &self.cfg.metrics,
            &self.cfg.service,
            peer,
        );
        let accepted = tokio::select! {
            accepted = handshake => accepted,
            () = force.cancelled() => return,
        };
        let Some((client, identity)) = accepted else {
            return;
        };
        if !self.authorized(&identity) {
            // Dropping the stream closes the connection without data.
            return;
        }
        let name = identity
            .strip_prefix(self.trust_domain.as_str())
            .unwrap_or(&identity);
        // SPEC §3: the rate limit applies after authorization, to every caller.
        if !self.admit_rate(name) {
            return;
        }
        proxy_inbound(client, *self.cfg.app.get(), &force).await;
    }

    /// Whether `identity` may call this replica; a refusal is logged and counted.
    fn authorized(&self, identity: &str) -> bool {
        let cfg = &self.cfg;
        let name = identity.strip_prefix(self.trust_domain.as_str());
        if name.is_some_and(|name| cfg.admitted.get().contains(name)) {
            return true;
        }
        let service = cfg.service.as_str();
        let replica = cfg.replica;
        let trust_domain = &self.trust_domain;
        cfg.metrics
            .mesh_error(name.unwrap_or(identity), service, "unauthorized");
        tracing::warn!(
            kind = "unauthorized",
            service,
            "mesh: unauthorized: service={service} tried={service}.{replica} attempts=1: \
             {identity} is not allowed to call {trust_domain}{service}",
        );
        false
    }

    /// The rate-limit step: whether a new connection of `caller` may go on. A refused one
    /// is dropped, which closes it without data; the kind is logged and counted.
    fn admit_rate(&self, caller: &str) -> bool {
        let cfg = &self.cfg;
        let bucket = {
            let mut bucket = self.bucket.lock();
            let limit = *cfg.rate_limit.get();
            if bucket.as_ref().map(|b| b.limit()) != limit {
                *bucket = limit.map(|limit| Arc::new(TokenBucket::new(limit, Instant::now())));
            }
            bucket.clone()
        };
        let Some(bucket) = bucket else {
            return true;
        };
        let Err(wait) = bucket.try_take(Instant::now()) else {
            return true;
        };
        let limit = bucket.limit();
        let service = cfg.service.as_str();
        cfg.metrics.mesh_error(caller, service, "rate-limited");
        tracing::warn!(
            kind = "rate-limited",
            service,
            "mesh: rate-limited: service={service} tried={service}.{} attempts=1: rate limit of {} rps (burst {}) exceeded, next connection in {wait:?}",
            cfg.replica,
            limit.rps,
            limit.burst,
        );
        false
    }
}

/// The accept loop both directions share. `connection` makes the (instrumented) task of
/// one accepted connection; `force` in its arguments is cancelled when this future ends
/// or is dropped.
async fn serve<F, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    force: CancellationToken,
    direction: &'static str,
    mut connection: F,
) where
    F: FnMut(TcpStream, SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // The caller bounds the drain with a timeout by dropping this future; the guard then
    // tells the connections to close, since spawned tasks would otherwise outlive it.
    let _force_on_drop = force.clone().drop_guard();
    let mut accept_warnings = WarnLimiter::new(ACCEPT_WARN_INTERVAL);
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(connection(stream, peer, force.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: said once per interval, not once
                // per retry.
                if let Some(more) = accept_warnings.hit(Instant::now()) {
                    tracing::warn!(%error, "tcp {direction} accept failed{more}");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
    // Close the listening socket now: new connections are refused rather than queued
    // in the backlog while the open ones drain.
    drop(listener);
    tracker.close();
    if !tracker.is_empty() {
        tracing::debug!(open = tracker.len(), "tcp {direction} draining connections");
    }
    tracker.wait().await;
    tracing::debug!("tcp {direction} shutdown complete");
}

/// Connect `client` to an endpoint through `balancer` and pipe bytes until both
/// directions end.
async fn proxy_outbound(
    client: TcpStream,
    cfg: &TcpOutboundConfig,
    balancer: &Balancer,
    queue_timeout: Duration,
    force: CancellationToken,
) {
    let arrival = Instant::now();
    let mut tried: Vec<Arc<str>> = Vec::new();
    let setup = setup_outbound(cfg, balancer, queue_timeout, arrival, &mut tried);
    // `timeout` bounds the setup only (SPEC §3 "Timeouts"): queueing and connects.
    let limited = async {
        match cfg.traffic.timeout {
            None => setup.await,
            Some(timeout) => tokio::time::timeout_at(arrival + timeout, setup)
                .await
                .unwrap_or_else(|_| {
                    Err((
                        "timeout",
                        format!("connection not set up within timeout {timeout:?}"),
                    ))
                }),
        }
    };
    let result = tokio::select! {
        result = limited => result,
        () = force.cancelled() => return,
    };
    let mut client = client;
    // What the dashboard and the access log keep of the connection (SPEC §5): one call
    // per connection, recorded when it ends (or fails to be set up).
    let mut call = stats::Call {
        seq: 0,
        ts_ms: 0,
        trace_id: trace_id(),
        caller: Arc::from(cfg.caller.as_str()),
        service: Arc::from(cfg.service.as_str()),
        replica: None,
        route: Arc::from(""),
        // A valid token: the fallback (GET) cannot happen.
        method: http::Method::from_bytes(b"TCP").unwrap_or_default(),
        path: String::new(),
        status: 200,
        error: None,
        attempts: u32::try_from(tried.len()).unwrap_or(u32::MAX),
        duration_us: 0,
        via: None,
    };
    match result {
        Ok((admission, pick, upstream)) => {
            call.replica = Some(Arc::clone(&pick.endpoint.id));
            call.attempts += 1;
            call.via = Some(match (&upstream, cfg.tls.is_some()) {
                (Upstream::Local(_), _) => stats::Via::InProcess,
                (Upstream::Stream(_), true) => stats::Via::Mtls,
                (Upstream::Stream(_), false) => stats::Via::Plain,
            });
            let endpoint = pick.endpoint.id.clone();
            let span = tracing::debug_span!("upstream", %endpoint, addr = %pick.endpoint.addr);
            let _ = client.set_nodelay(true);
            match upstream {
                Upstream::Stream(mut upstream) => {
                    pipe(&mut client, &mut upstream, &force)
                        .instrument(span)
                        .await;
                }
                // The local path: the inbound takes the caller's stream itself.
                Upstream::Local(inbound) => {
                    inbound
                        .serve(client, &cfg.caller, &force)
                        .instrument(span)
                        .await;
                }
            }
            drop(pick);
            drop(admission);
        }
        Err((kind, detail)) => {
            call.error = stats::ERROR_KINDS.iter().find(|k| **k == kind).copied();
            call.status = match kind {
                "no-endpoints" | "circuit-open" | "overloaded" => 503,
                "timeout" => 504,
                _ => 502,
            };
            call.replica = tried.last().cloned();
            // Dropping `client` closes it without data.
            let service = cfg.service.as_str();
            let tried_list = if tried.is_empty() {
                "none".to_string()
            } else {
                tried.join(",")
            };
            cfg.metrics.mesh_error(&cfg.caller, service, kind);
            tracing::warn!(
                kind,
                service,
                tried = %tried_list,
                attempts = tried.len(),
                "mesh: {kind}: service={service} tried={tried_list} attempts={}: {detail}",
                tried.len(),
            );
        }
    }
    call.duration_us = u64::try_from(arrival.elapsed().as_micros()).unwrap_or(u64::MAX);
    let stats = cfg.metrics.stats();
    stats.record(&stats.edge(&cfg.caller, &cfg.service, ""), call);
}

/// A fresh random W3C trace id (32 hex digits) for a connection, which carries none.
fn trace_id() -> stats::TraceId {
    let id = format!(
        "{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..).max(1)
    );
    stats::TraceId::from(id.as_str())
}

/// A failure to set up a connection: the mesh error kind and its detail.
type SetupError = (&'static str, String);

/// Where a set-up connection goes: a stream to an inbound's listener, or an inbound of
/// this process (the local path).
enum Upstream {
    Stream(Box<dyn Stream>),
    Local(LocalTcpInbound),
}

/// Take a `max_concurrent` slot of `balancer` (the service's, or the drawn route
/// backend's), then connect to an endpoint (trying up to [`MAX_CONNECT_TRIES`] of them);
/// `tried` collects the endpoints tried.
async fn setup_outbound(
    cfg: &TcpOutboundConfig,
    balancer: &Balancer,
    queue_timeout: Duration,
    arrival: Instant,
    tried: &mut Vec<Arc<str>>,
) -> Result<(Admission, Pick, Upstream), SetupError> {
    let deadline = arrival + queue_timeout;
    let Some(admission) = balancer.admit(deadline).await else {
        return Err((
            "overloaded",
            format!("max_concurrent connections open for {queue_timeout:?} (queue_timeout)"),
        ));
    };
    let mut last_error: Option<String> = None;
    while tried.len() < MAX_CONNECT_TRIES {
        let pick = match balancer.pick_or(tried, deadline).await {
            Ok(pick) => pick,
            Err(NoPick::CircuitOpen) if last_error.is_none() => {
                return Err((
                    "circuit-open",
                    "every endpoint is ejected by the circuit breaker".to_string(),
                ));
            }
            Err(_) => break,
        };
        let started = Instant::now();
        let connected = match pick.endpoint.local_tcp() {
            Some(local) if local.open() => Ok(Ok(Upstream::Local(local.clone()))),
            // A draining inbound refuses, as its closed listener would.
            Some(_) => Ok(Err("the inbound is draining".to_string())),
            None => tokio::time::timeout(
                CONNECT_TIMEOUT,
                connect(cfg, balancer.service(), pick.endpoint.addr),
            )
            .await
            .map(|connected| connected.map(Upstream::Stream)),
        };
        let error = match connected {
            Ok(Ok(upstream)) => {
                // The connect time is the latency p2c compares; the pick stays in
                // flight for the life of the connection, so open connections count as
                // load.
                if pick.observe(Outcome::Response(started.elapsed())) {
                    cfg.metrics.ejection(&cfg.caller, balancer.service());
                }
                return Ok((admission, pick, upstream));
            }
            Ok(Err(error)) => error,
            Err(_) => format!("connect timed out after {CONNECT_TIMEOUT:?}"),
        };
        tracing::debug!(endpoint = %pick.endpoint.id, addr = %pick.endpoint.addr, %error, "connect failed");
        last_error = Some(format!("{}: {error}", pick.endpoint.addr));
        tried.push(Arc::clone(&pick.endpoint.id));
        if pick.record(Outcome::ConnectFailed) {
            cfg.metrics.ejection(&cfg.caller, balancer.service());
        }
    }
    Err(match last_error {
        Some(error) => ("connect-failed", error),
        None => (
            "no-endpoints",
            format!("no ready endpoint within queue_timeout {queue_timeout:?}"),
        ),
    })
}

/// A byte stream to the next hop: plain TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// TCP to an inbound of `target` (the service itself, or a route backend) at `addr`,
/// then mutual TLS when configured: the inbound must prove `target`'s identity. The
/// error is one line.
async fn connect(
    cfg: &TcpOutboundConfig,
    target: &str,
    addr: SocketAddr,
) -> Result<Box<dyn Stream>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|error| error.to_string())?;
    // Opaque streams are often interactive; do not let Nagle hold back small writes.
    let _ = stream.set_nodelay(true);
    let Some(config) = &cfg.tls else {
        return Ok(Box::new(stream));
    };
    let identity = format!("spiffe://{}/{target}", cfg.mesh_name);
    match tls::connect(Arc::clone(config), stream, &identity).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(error) => {
            cfg.metrics.tls_handshake_failure(target, Side::Client);
            let error = format!("tls handshake failed: {}", tls::error_chain(&error));
            tracing::warn!(service = %target, %addr, %error, "tls handshake with an inbound failed");
            Err(error)
        }
    }
}

/// Connect `client` to the app at `app` and pipe bytes until both directions end.
async fn proxy_inbound<S>(mut client: S, app: SocketAddr, force: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(app));
    let mut upstream = tokio::select! {
        connected = connect => match connected {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => {
                tracing::warn!(kind = "connect-failed", %error, "app connect failed");
                return;
            }
            Err(_) => {
                tracing::warn!(kind = "connect-failed", "app connect timed out after {CONNECT_TIMEOUT:?}");
                return;
            }
        },
        () = force.cancelled() => return,
    };
    let _ = upstream.set_nodelay(true);
    pipe(&mut client, &mut upstream, force).await;
}

/// Copy both ways until both directions have ended (or `force` is cancelled). The
/// caller sets TCP_NODELAY: opaque streams are often interactive, and Nagle must not
/// hold back small writes.
async fn pipe<A, B>(client: &mut A, upstream: &mut B, force: &CancellationToken)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // `copy_bidirectional` forwards a read EOF as a write shutdown on the other side and
    // keeps copying the other direction: exactly the half-close semantics we need.
    let result = tokio::select! {
        result = tokio::io::copy_bidirectional(client, upstream) => result,
        () = force.cancelled() => Err(io::Error::other("closed at shutdown")),
    };
    match result {
        Ok((sent, received)) => tracing::debug!(sent, received, "connection closed"),
        Err(error) => tracing::debug!(%error, "connection ended with an error"),
    }
}

#[cfg(test)]
mod tests;
