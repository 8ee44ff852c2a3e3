//! The client side of a sidecar: one shared HTTP/2 connection per peer (sidecar to
//! sidecar, and inbound to an h2c app), a keep-alive pool of HTTP/1.1 connections (inbound
//! to an HTTP/1.1 app), a dedicated HTTP/1.1 connection per upgrade, and the splice of
//! upgraded streams.
//!
//! Between sidecars these connections are mutual TLS when the outbound has a
//! [`PeerTls`]: the pooled HTTP/2 connection negotiates ALPN `h2`, an upgrade's dedicated
//! connection `http/1.1`. The handshake happens once per connection, never per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::{fmt, io};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Body;
use super::server::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::errors::ForwardError;
use crate::metrics::{Metrics, Side};
use crate::tls::{self, ClientTls, TlsError};

/// The bound on one TLS handshake with an inbound. On loopback it takes a millisecond;
/// this only matters for a peer that accepts and then says nothing.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How an outbound proves itself to inbounds and checks them (mutual TLS).
#[derive(Clone)]
pub struct PeerTls {
    /// The caller's client configurations (its identity, the mesh CA).
    pub client: ClientTls,
    /// The identity every inbound reached must prove: `spiffe://<mesh>/<service>`.
    pub server_identity: String,
    /// Where failed handshakes are counted, as `side="client"` under `service`.
    pub metrics: Metrics,
    /// The called service, for metrics.
    pub service: String,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_identity", &self.server_identity)
            .finish_non_exhaustive()
    }
}

/// A failed send: the error, and the request when it was never handed to a connection
/// (its body untouched, so it can be sent elsewhere).
pub type SendError = (ForwardError, Option<Request<Body>>);

/// One shared HTTP/2 connection per peer address, reused by every request and replaced
/// when it breaks. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct H2Pool {
    builder: http2::Builder<TokioExecutor>,
    conns: Arc<Mutex<HashMap<SocketAddr, Slot>>>,
    /// Mutual TLS towards inbounds; `None` for plain connections (to an h2c app, or
    /// between sidecars with `tls = "off"`).
    tls: Option<Arc<PeerTls>>,
}

/// A peer's connection, behind an async lock so concurrent first requests share one
/// connect instead of racing to open several.
type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

impl Default for H2Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool").finish_non_exhaustive()
    }
}

impl H2Pool {
    /// An empty pool of plain connections.
    pub fn new() -> Self {
        Self::with_tls(None)
    }

    /// An empty pool whose connections are mutual TLS with `tls` (ALPN `h2`), or plain
    /// without it.
    pub fn with_tls(tls: Option<PeerTls>) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // Until the peer's SETTINGS arrive hyper assumes 100 concurrent streams and
            // queues beyond that; the peer (an inbound, or an app) states its real limit
            // in its first frame, so do not add a lower cap of our own meanwhile.
            .initial_max_send_streams(1000)
            // Every cancelled request (a caller hung up, a retry dropped a 5xx) resets a
            // stream, and h2 remembers reset streams to ignore their late frames. With
            // h2's default of 10, a burst of cancellations evicts them early, and a late
            // frame then is a connection error that fails every other request
            // multiplexed on this shared connection.
            .max_concurrent_reset_streams(10_000)
            // Response heads from apps: hyper's 16 KiB default rejects large cookies;
            // 256 KiB is generous and still bounded.
            .max_header_list_size(256 * 1024)
            // Find dead peers on idle and busy connections alike, so a vanished peer
            // gives a reconnect instead of requests hanging on a half-open socket.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        H2Pool {
            builder,
            conns: Arc::default(),
            tls: tls.map(Arc::new),
        }
    }

    /// Send `req` to `addr` over the shared connection, connecting (again) if needed.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut req = req;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut sender = match self.sender(addr).await {
                Ok(sender) => sender,
                Err(error) => return Err((error, Some(req))),
            };
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    // The shared connection closed between the check and the send, and
                    // hyper handed the request back untouched: one fresh connection is
                    // worth a try before reporting it.
                    Some(unsent) => {
                        let source = error.into_error();
                        if tries >= 2 {
                            return Err((ForwardError::NotSent { addr, source }, Some(unsent)));
                        }
                        tracing::debug!(%addr, error = %source, "shared connection closed, reconnecting");
                        req = unsent;
                    }
                    None => {
                        return Err((ForwardError::from_send(addr, error.into_error()), None));
                    }
                },
            }
        }
    }

    /// The live connection to `addr`, or a new one.
    async fn sender(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ForwardError> {
        let slot = Arc::clone(self.conns.lock().entry(addr).or_default());
        let mut current = slot.lock().await;
        if let Some(sender) = current.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        *current = None;
        // Boxed: the handshake is the rare path, and inline it would make every request's
        // future (moved several times between hyper and tokio) twice as large.
        let sender = Box::pin(self.connect(addr)).await?;
        *current = Some(sender.clone());
        Ok(sender)
    }

    /// A new HTTP/2 connection to `addr`, driven by its own task.
    async fn connect(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ForwardError> {
        match &self.tls {
            None => self.handshake(addr, connect(addr).await?).await,
            Some(tls) => {
                let stream = connect_tls(addr, tls, &tls.client.h2).await?;
                self.handshake(addr, stream).await
            }
        }
    }

    /// The HTTP/2 handshake over `stream`; the connection is driven by its own task.
    async fn handshake<S>(
        &self,
        addr: SocketAddr,
        stream: S,
    ) -> Result<http2::SendRequest<Body>, ForwardError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = self
            .builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ForwardError::Handshake { addr, source })?;
        tokio::spawn(
            async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "http/2 connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("h2-client", %addr)),
        );
        Ok(sender)
    }
}

/// A keep-alive pool of HTTP/1.1 connections to one address (an app). Requests take an
/// idle connection or open a new one; a connection goes back to the pool with its response
/// and is handed out again once its response body has been read to the end. Cheap to clone; clones share connections.
#[derive(Clone, Debug)]
pub struct H1Pool {
    addr: SocketAddr,
    idle: Arc<Mutex<Vec<http1::SendRequest<Body>>>>,
}

/// Idle connections kept per app: enough for bursts of keep-alive reuse, few enough not
/// to pin many sockets of a small app.
const MAX_IDLE: usize = 32;

impl H1Pool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        H1Pool {
            addr,
            idle: Arc::default(),
        }
    }

    /// Send `req` on an idle connection or a new one.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, ForwardError> {
        let addr = self.addr;
        let mut req = req;
        loop {
            let reused = self.take_idle();
            let fresh = reused.is_none();
            let mut sender = match reused {
                Some(sender) => sender,
                // Boxed: the rare path; see `H2Pool::sender`.
                None => {
                    Box::pin(async { handshake_http1(addr, connect(addr).await?, false).await })
                        .await?
                }
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.release(sender);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // An idle connection the app closed meanwhile: try the next one.
                    Some(unsent) if !fresh => req = unsent,
                    Some(_) => {
                        return Err(ForwardError::NotSent {
                            addr,
                            source: error.into_error(),
                        });
                    }
                    None => return Err(ForwardError::from_send(addr, error.into_error())),
                },
            }
        }
    }

    /// An idle connection, if one is ready. Connections still finishing an exchange (their
    /// response body is being read) stay in the pool; closed ones are dropped.
    fn take_idle(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            if idle[i].is_ready() {
                return Some(idle.swap_remove(i));
            }
            if idle[i].is_closed() {
                idle.swap_remove(i);
            }
        }
        None
    }

    /// Put the connection back at once: it becomes ready again when its response body has
    /// been read, and [`take_idle`](Self::take_idle) only hands out ready connections. (A
    /// task waiting for readiness would cost a spawn and a wake-up per request.) Beyond
    /// `MAX_IDLE` the connection is dropped, and closes after its exchange.
    fn release(&self, sender: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }
}

/// Send an upgrade request over a dedicated HTTP/1.1 connection (an upgraded connection
/// cannot be shared). On `101` the caller takes the upgraded stream with
/// [`hyper::upgrade::on`] on the response.
pub async fn send_upgrade(
    addr: SocketAddr,
    req: Request<Body>,
) -> Result<Response<Incoming>, ForwardError> {
    send_upgrade_via(addr, None, req).await
}

/// [`send_upgrade`] to an inbound: over mutual TLS with ALPN `http/1.1` when `tls` is
/// given.
pub async fn send_upgrade_via(
    addr: SocketAddr,
    tls: Option<&PeerTls>,
    req: Request<Body>,
) -> Result<Response<Incoming>, ForwardError> {
    let mut sender = match tls {
        None => handshake_http1(addr, connect(addr).await?, true).await?,
        Some(tls) => {
            let stream = connect_tls(addr, tls, &tls.client.http1).await?;
            handshake_http1(addr, stream, true).await?
        }
    };
    sender
        .send_request(req)
        .await
        .map_err(|source| ForwardError::from_send(addr, source))
}

/// Splice the upgraded client and upgraded server streams of one upgrade, both ways,
/// until either side closes or the listener shuts down (an upgraded stream has no
/// requests to drain).
pub fn splice(
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    downstream: OnUpgrade,
    upstream: OnUpgrade,
) {
    tracker.spawn(
        async move {
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, "upgrade failed");
                    return;
                }
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut down, &mut up) => match result {
                    Ok((sent, received)) => tracing::debug!(sent, received, "upgraded stream closed"),
                    Err(error) => tracing::debug!(%error, "upgraded stream failed"),
                },
                () = shutdown.cancelled() => tracing::debug!("upgraded stream cut by shutdown"),
            }
        }
        .instrument(tracing::debug_span!("upgraded")),
    );
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ForwardError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ForwardError::Connect { addr, source })?;
    // Small frames and request heads must not wait for Nagle.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "set TCP_NODELAY failed");
    }
    Ok(stream)
}

/// TCP, then the TLS handshake with `config`, which must prove `tls.server_identity`.
/// A failed handshake is counted and logged: between sidecars of one mesh it means a
/// misconfiguration (another CA, a port reused by another service) or an attack.
async fn connect_tls(
    addr: SocketAddr,
    tls: &PeerTls,
    config: &Arc<tls::ClientConfig>,
) -> Result<tls::ClientStream<TcpStream>, ForwardError> {
    let stream = connect(addr).await?;
    let handshake = tls::connect(Arc::clone(config), stream, &tls.server_identity);
    let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(result) => result,
        Err(_elapsed) => Err(TlsError::Handshake(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
        ))),
    };
    result.map_err(|source| {
        tls.metrics.tls_handshake_failure(&tls.service, Side::Client);
        let error = ForwardError::Tls { addr, source };
        tracing::warn!(service = %tls.service, error = %error.chain(), "tls handshake with an inbound failed");
        error
    })
}

async fn handshake_http1<S>(
    addr: SocketAddr,
    stream: S,
    upgrades: bool,
) -> Result<http1::SendRequest<Body>, ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        // Response heads from apps: like the HTTP/2 side, generous but bounded.
        .max_buf_size(256 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ForwardError::Handshake { addr, source })?;
    let span = tracing::debug_span!("h1-client", %addr);
    if upgrades {
        tokio::spawn(
            async move {
                if let Err(error) = conn.with_upgrades().await {
                    tracing::debug!(%error, "http/1.1 connection ended with an error");
                }
            }
            .instrument(span),
        );
    } else {
        tokio::spawn(
            async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "http/1.1 connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    Ok(sender)
}
