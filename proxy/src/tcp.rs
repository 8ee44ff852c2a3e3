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

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::Traffic;
use crate::balance::{Admission, Balancer, NoPick, Outcome, Pick};
use crate::metrics::Metrics;

/// How many endpoints one outbound connection tries before giving up with
/// `connect-failed`.
const MAX_CONNECT_TRIES: usize = 3;
/// The bound on one connect attempt. On loopback a connect fails or succeeds at once;
/// this only matters for a peer that drops SYNs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The pause after a failed `accept` (e.g. out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

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
    pub app: SocketAddr,
    /// Where the mesh's metrics are recorded.
    pub metrics: Metrics,
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
    let service: Arc<str> = cfg.service.as_str().into();
    let cfg = Arc::new(cfg);
    let local = listener.local_addr().ok();
    serve(listener, shutdown, "outbound", |client, peer, force| {
        let span = tracing::info_span!("tcp_outbound", service = %service, %peer);
        let cfg = Arc::clone(&cfg);
        let balancer = balancer.clone();
        async move { proxy_outbound(client, &cfg, &balancer, force).await }.instrument(span)
    })
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
    let app = cfg.app;
    let local = listener.local_addr().ok();
    serve(listener, shutdown, "inbound", |client, peer, force| {
        let span = tracing::info_span!("tcp_inbound", %app, %peer);
        async move { proxy_inbound(client, app, force).await }.instrument(span)
    })
    .instrument(tracing::info_span!("tcp_inbound_listener", %app, listener = ?local))
    .await;
}

/// The accept loop both directions share. `connection` makes the (instrumented) task of
/// one accepted connection; `force` in its arguments is cancelled when this future ends
/// or is dropped.
async fn serve<F, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    direction: &'static str,
    mut connection: F,
) where
    F: FnMut(TcpStream, SocketAddr, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tracker = TaskTracker::new();
    // The caller bounds the drain with a timeout by dropping this future; the guard then
    // tells the connections to close, since spawned tasks would otherwise outlive it.
    let force = CancellationToken::new();
    let _force_on_drop = force.clone().drop_guard();
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
                tracing::warn!(%error, "tcp {direction} accept failed");
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

/// Connect `client` to an endpoint of `service` and pipe bytes until both directions end.
async fn proxy_outbound(
    client: TcpStream,
    cfg: &TcpOutboundConfig,
    balancer: &Balancer,
    force: CancellationToken,
) {
    let arrival = Instant::now();
    let mut tried: Vec<Arc<str>> = Vec::new();
    let setup = setup_outbound(cfg, balancer, arrival, &mut tried);
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
    match result {
        Ok((admission, pick, mut upstream)) => {
            let endpoint = pick.endpoint.id.clone();
            let span = tracing::debug_span!("upstream", %endpoint, addr = %pick.endpoint.addr);
            pipe(&mut client, &mut upstream, &force)
                .instrument(span)
                .await;
            drop(pick);
            drop(admission);
        }
        Err((kind, detail)) => {
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
}

/// A failure to set up a connection: the mesh error kind and its detail.
type SetupError = (&'static str, String);

/// Take a `max_concurrent` slot, then connect to an endpoint (trying up to
/// [`MAX_CONNECT_TRIES`] of them); `tried` collects the endpoints tried.
async fn setup_outbound(
    cfg: &TcpOutboundConfig,
    balancer: &Balancer,
    arrival: Instant,
    tried: &mut Vec<Arc<str>>,
) -> Result<(Admission, Pick, TcpStream), SetupError> {
    let queue_timeout = cfg.traffic.queue_timeout;
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
        let error =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(pick.endpoint.addr))
                .await
            {
                Ok(Ok(upstream)) => {
                    // The connect time is the latency p2c compares; the pick stays in
                    // flight for the life of the connection, so open connections count as
                    // load.
                    if pick.observe(Outcome::Response(started.elapsed())) {
                        cfg.metrics.ejection(&cfg.caller, &cfg.service);
                    }
                    return Ok((admission, pick, upstream));
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("connect timed out after {CONNECT_TIMEOUT:?}"),
            };
        tracing::debug!(endpoint = %pick.endpoint.id, addr = %pick.endpoint.addr, %error, "connect failed");
        last_error = Some(format!("{}: {error}", pick.endpoint.addr));
        tried.push(Arc::clone(&pick.endpoint.id));
        if pick.record(Outcome::ConnectFailed) {
            cfg.metrics.ejection(&cfg.caller, &cfg.service);
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

/// Connect `client` to the app at `app` and pipe bytes until both directions end.
async fn proxy_inbound(mut client: TcpStream, app: SocketAddr, force: CancellationToken) {
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
    pipe(&mut client, &mut upstream, &force).await;
}

/// Copy both ways until both directions have ended (or `force` is cancelled).
async fn pipe(client: &mut TcpStream, upstream: &mut TcpStream, force: &CancellationToken) {
    // Opaque streams are often interactive; do not let Nagle hold back small writes.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
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
