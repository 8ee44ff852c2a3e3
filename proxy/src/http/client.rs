//! The client side of a sidecar: one shared HTTP/2 connection per peer (sidecar to
//! sidecar, and inbound to an h2c app), a keep-alive pool of HTTP/1.1 connections (inbound
//! to an HTTP/1.1 app), a dedicated HTTP/1.1 connection per upgrade, and the splice of
//! upgraded streams.
//!
//! The HTTP/2 connections use the `h2` crate directly (`client/http2.rs`), so that a
//! response body is drained from h2 at once and flow-control credit goes back to the peer
//! only as the next hop takes the bytes (`client/recv.rs`).
//!
//! Between sidecars these connections are mutual TLS when the outbound has a
//! [`PeerTls`]: the pooled HTTP/2 connection negotiates ALPN `h2`, an upgrade's dedicated
//! connection `http/1.1`. The handshake happens once per connection, never per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use std::{fmt, io};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod http2;
mod recv;
mod tunnel;

pub use http2::{H2Pool, H2Response};
pub use recv::RecvBody;
pub use tunnel::H2Tunnel;

use super::Body;
use crate::errors::ForwardError;
use crate::metrics::{Metrics, Side};
use crate::tls::{self, ClientTls, TlsError};

/// The bound on one TLS handshake with an inbound. On loopback it takes a millisecond;
/// this only matters for a peer that accepts and then says nothing.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound on connecting to an inbound (as `tcp`'s). A refused connect fails at once;
/// this is for an address that answers nothing: another host that is down or cut off
/// (SPEC §9), whose SYNs the kernel would otherwise retry for about two minutes. A
/// connect failure is retried on another endpoint and ejects this one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

/// A keep-alive pool of HTTP/1.1 connections to one address (an app). Requests take an
/// idle connection or open a new one; a connection goes back to the pool with its response
/// and is handed out again once its response body has been read to the end. Connections
/// unused for the idle timeout are closed. Cheap to clone; clones share connections.
#[derive(Clone, Debug)]
pub struct H1Pool {
    addr: SocketAddr,
    idle: Arc<Mutex<Idle>>,
    idle_timeout: Duration,
}

/// The pooled connections, each with when it was last handed out, and whether a sweeper
/// task is running for them.
#[derive(Debug, Default)]
struct Idle {
    conns: Vec<(http1::SendRequest<Body>, tokio::time::Instant)>,
    sweeping: bool,
}

/// Idle connections kept per app: enough for bursts of keep-alive reuse, few enough not
/// to pin many sockets of a small app.
const MAX_IDLE: usize = 32;

impl H1Pool {
    /// An empty pool for `addr`, closing connections unused for 60 s.
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_idle_timeout(addr, Duration::from_secs(60))
    }

    /// An empty pool for `addr`, closing connections unused for `idle_timeout`.
    pub fn with_idle_timeout(addr: SocketAddr, idle_timeout: Duration) -> Self {
        H1Pool {
            addr,
            idle: Arc::default(),
            idle_timeout,
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
                            source: error.into_error().into(),
                        });
                    }
                    None => {
                        // A reused connection broke under the request: the app most likely
                        // went away (died, restarted) and its other idle connections with
                        // it. Drop them, so that the next request (a retry) connects
                        // afresh and learns at once whether the app is there.
                        if !fresh {
                            self.idle.lock().conns.clear();
                        }
                        return Err(ForwardError::from_send(addr, error.into_error()));
                    }
                },
            }
        }
    }

    /// An idle connection, if one is ready. Connections still finishing an exchange (their
    /// response body is being read) stay in the pool; closed ones are dropped.
    fn take_idle(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock();
        let conns = &mut idle.conns;
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            if conns[i].0.is_ready() {
                return Some(conns.swap_remove(i).0);
            }
            if conns[i].0.is_closed() {
                conns.swap_remove(i);
            }
        }
        None
    }

    /// Put the connection back at once: it becomes ready again when its response body has
    /// been read, and [`take_idle`](Self::take_idle) only hands out ready connections. (A
    /// task waiting for readiness would cost a spawn and a wake-up per request.) Beyond
    /// `MAX_IDLE` the connection is dropped, and closes after its exchange. The first
    /// connection pooled starts a sweeper, which closes the ones unused for the idle
    /// timeout and ends when the pool is empty.
    fn release(&self, sender: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock();
        if idle.conns.len() < MAX_IDLE {
            idle.conns.push((sender, tokio::time::Instant::now()));
        }
        if !idle.sweeping {
            idle.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&self.idle), self.idle_timeout));
        }
    }
}

/// Close the connections of a pool that went unused for `timeout` (dropping a ready
/// sender closes its connection), checking every quarter of it; ends when the pool is
/// empty or gone.
async fn sweep(idle: std::sync::Weak<Mutex<Idle>>, timeout: Duration) {
    let period = (timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(idle) = idle.upgrade() else {
            return;
        };
        let mut idle = idle.lock();
        let now = tokio::time::Instant::now();
        idle.conns.retain(|(sender, used)| {
            !sender.is_closed() && (now.duration_since(*used) < timeout || !sender.is_ready())
        });
        if idle.conns.is_empty() {
            idle.sweeping = false;
            return;
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
    let upstream = async move { upstream.await.map(TokioIo::new) };
    splice_with(tracker, shutdown, downstream, upstream);
}

/// [`splice`] with an HTTP/2 stream as the upstream side (an extended CONNECT's tunnel).
pub fn splice_tunnel(
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    downstream: OnUpgrade,
    upstream: H2Tunnel,
) {
    let upstream = async move { Ok::<_, hyper::Error>(upstream) };
    splice_with(tracker, shutdown, downstream, upstream);
}

fn splice_with<U, F>(
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    downstream: OnUpgrade,
    upstream: F,
) where
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = Result<U, hyper::Error>> + Send + 'static,
{
    tracker.spawn(
        async move {
            let (down, mut up) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, "upgrade failed");
                    return;
                }
            };
            let mut down = TokioIo::new(down);
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

pub(super) async fn connect(addr: SocketAddr) -> Result<TcpStream, ForwardError> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(connected) => connected,
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    }
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
pub(super) async fn connect_tls(
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
        // One buffer per write, as the servers' (`server::builder`): send(2) rather
        // than writev(2).
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ForwardError::Handshake {
            addr,
            source: source.into(),
        })?;
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
