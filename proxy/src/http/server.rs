//! The server side of a sidecar listener: HTTP/1.1 and h2c prior-knowledge on one port,
//! limits against hostile clients, and a graceful drain on shutdown. An inbound listener
//! with `ServerTls` first runs the mutual-TLS handshake and hands each request the
//! verified identity of the calling sidecar (`PeerIdentity` in its extensions).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Body;
use super::cancel::or_cancelled;
use crate::metrics::Metrics;
use crate::tls;

/// The TLS side of an inbound listener.
#[derive(Clone)]
pub(crate) struct ServerTls {
    pub(crate) config: Arc<tls::ServerConfig>,
    /// Where failed handshakes are counted, as `side="server"` under `service`.
    pub(crate) metrics: Metrics,
    pub(crate) service: String,
}

/// The verified identity (`spiffe://…`) of the sidecar that sent a request over mutual
/// TLS, in the request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct PeerIdentity {
    pub(crate) identity: Arc<str>,
    /// The same as a header value, made once per connection (cloning it is a reference
    /// count), for `x-mesh-client-id`; `None` if it is not a valid header value.
    pub(crate) header: Option<http::HeaderValue>,
}

/// Limits a listener applies to its clients. The defaults suit a sidecar facing local
/// apps; tests shorten the timeout.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long a client may take to send a request head (and, for a new connection, the
    /// bytes that tell HTTP/1.1 from HTTP/2). Slow or silent clients are cut after it, so
    /// they cannot hold connections and tasks forever (slowloris). HTTP/2 connections are
    /// pinged at this interval and closed when a ping goes unanswered for as long, which
    /// cuts a stalled HTTP/2 request head within twice this time.
    pub header_read_timeout: Duration,
    /// The largest request head accepted from an app: HTTP/1.1 head bytes (beyond it:
    /// 431) and the HTTP/2 header list size.
    pub max_header_bytes: usize,
    /// HTTP/2 streams a client may open at once on one connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            // 64 KiB is well above what browsers and HTTP libraries send (cookies, JWTs)
            // and bounds the memory a single client can pin per request head.
            max_header_bytes: 64 * 1024,
            // The default `traffic.max_concurrent` (10000): the HTTP/2 stream cap must not
            // be a tighter, invisible concurrency limit than the one configured.
            max_concurrent_streams: 10_000,
        }
    }
}

/// HTTP/2 flow-control windows, for servers and clients alike. hyper's server defaults
/// (1 MiB per stream and 1 MiB for the whole connection) make every stream of a
/// multiplexed sidecar connection share 1 MiB in flight, which throttles concurrent large
/// bodies to a trickle of window updates; 2 MiB per stream and 16 MiB per connection keep
/// a loopback hop at full speed while still bounding what a peer can make us buffer.
pub(crate) const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// See [`STREAM_WINDOW`].
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Which side a listener faces, for its HTTP/2 header limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Facing {
    /// Local apps (outbound, ingress): `max_header_bytes`.
    Apps,
    /// Other sidecars (inbound): twice as much, because the outbound accepted up to
    /// `max_header_bytes` of HTTP/1.1 head, which grows by HTTP/2's 32 bytes of
    /// accounting per header field plus the headers the mesh adds.
    Sidecars,
}

/// The connection builder, with every limit set deliberately.
pub(crate) fn builder(limits: &Limits, facing: Facing) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let max_header_bytes = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
    let header_list = match facing {
        Facing::Apps => max_header_bytes,
        Facing::Sidecars => max_header_bytes.saturating_mul(2),
    };
    builder
        .http1()
        // The timer drives `header_read_timeout`, which cuts slow clients.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // The read buffer bounds the request head: a longer head is answered with 431.
        // hyper's minimum is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8 * 1024))
        // hyper's default of 100 header fields is kept: it bounds parsing work per head,
        // and real clients stay far below it.
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(header_list)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Rapid-reset protection (CVE-2023-44487): a client that opens and cancels streams
        // faster than they are served gets a GOAWAY. h2's default of 20 pending resets is
        // tight for a busy app that legitimately cancels (deadlines); 200 still bounds the
        // work a hostile client causes.
        .max_pending_accept_reset_streams(200)
        // SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): clients may open extended CONNECT
        // streams (WebSocket over HTTP/2), which the outbound and inbound tunnel through.
        // A plain CONNECT is refused by the handlers either way.
        .enable_connect_protocol()
        // Pings find dead peers (a sidecar or app that vanished without a FIN); without
        // them an idle h2 connection could stay half-open forever. They are also HTTP/2's
        // header-read timeout: a client in the middle of a request head (a HEADERS frame
        // and its CONTINUATIONs, which no other frame may interrupt) cannot answer a PING,
        // so a slow or stalled head is cut within two `header_read_timeout`s.
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    builder
}

/// Accept connections on `listener` until `shutdown`, serving each with `handle`, then
/// close the listener (new connections are refused), drain every connection gracefully,
/// and wait for all tasks on `tracker` (connections and upgraded streams) to finish.
///
/// Dropping the returned future (the caller's drain deadline passed) closes the
/// connections still open.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    handle: H,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_tls(listener, builder, limits, tracker, shutdown, None, handle).await;
}

/// [`serve`], with each connection first going through the TLS handshake when `tls` is
/// given. A failed handshake (plaintext, another CA, an expired or missing client
/// certificate) closes the connection and is counted; the handshake shares
/// `header_read_timeout` with the first bytes of HTTP.
pub(crate) async fn serve_tls<H, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    tls: Option<ServerTls>,
    handle: H,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(builder);
    let local = listener.local_addr().ok();
    // Cancelled when this future ends or is dropped: connection tasks then stop at once.
    let force = CancellationToken::new();
    let _force_on_drop = force.clone().drop_guard();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly instead of
                    // spinning on an error that persists until some connection closes.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small HTTP/2 frames (headers, window updates) must not wait for Nagle.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "set TCP_NODELAY failed");
        }
        let builder = Arc::clone(&builder);
        let shutdown = shutdown.clone();
        let force = force.clone();
        let handle = handle.clone();
        let timeout = limits.header_read_timeout;
        let tls = tls.clone();
        let span = tracing::debug_span!("conn", ?local, %peer);
        let connection = async move {
            let Some(tls) = tls else {
                let Some(io) = sniff_within(stream, timeout, &shutdown).await else {
                    return;
                };
                serve_connection(&builder, io, peer, None, handle, &shutdown).await;
                return;
            };
            let started = tokio::time::Instant::now();
            let handshake = tls::accept_counted(
                tls.config,
                stream,
                timeout,
                &tls.metrics,
                &tls.service,
                peer,
            );
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = handshake => accepted,
            };
            let Some((stream, identity)) = accepted else {
                return;
            };
            let left = timeout.saturating_sub(started.elapsed());
            let Some(io) = sniff_within(stream, left, &shutdown).await else {
                return;
            };
            let header = http::HeaderValue::from_maybe_shared(Bytes::from(identity.clone())).ok();
            let identity = PeerIdentity {
                identity: Arc::from(identity),
                header,
            };
            serve_connection(&builder, io, peer, Some(identity), handle, &shutdown).await;
        };
        tracker.spawn(
            async move {
                if or_cancelled(connection, force).await.is_none() {
                    tracing::debug!("connection closed by force");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Serve one connection with `handle` until it ends, or drain it gracefully on
/// `shutdown`. Each request carries `identity` (the TLS peer) in its extensions.
async fn serve_connection<S, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: Prefixed<S>,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
    handle: H,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        // Boxed once here: a request's future is a few KiB, and hyper and tokio
        // move it several times (into the service call, the h1 dispatcher or h2
        // stream, the spawned task); moving a pointer instead saves copying it.
        let fut = Box::pin(handle(peer, req));
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = match or_cancelled(conn.as_mut(), shutdown.clone()).await {
        Some(result) => result,
        None => {
            // Finish the requests in flight, refuse new ones (GOAWAY on
            // HTTP/2, `Connection: close` on HTTP/1.1).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(error = %error, "connection ended with an error");
    }
}

/// [`sniff`] within `within` (the header-read timeout: a client that sends nothing is
/// cut), unless `shutdown` comes first; `None` when the connection is to be dropped.
async fn sniff_within<S: AsyncRead + Unpin>(
    stream: S,
    within: Duration,
    shutdown: &CancellationToken,
) -> Option<Prefixed<S>> {
    tokio::select! {
        () = shutdown.cancelled() => None,
        sniffed = tokio::time::timeout(within, sniff(stream)) => match sniffed {
            Ok(Ok(io)) => Some(io),
            Ok(Err(error)) => {
                tracing::debug!(%error, "connection failed before a request");
                None
            }
            Err(_elapsed) => {
                tracing::debug!("client sent no request in time, closed");
                None
            }
        },
    }
}

/// The HTTP/2 connection preface, which h2c prior-knowledge clients send first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Read the first bytes of a connection until they tell HTTP/1.1 from HTTP/2 (the auto
/// builder does the same, but without a timeout: a client that connects and sends nothing
/// would hold the connection forever). The bytes read are replayed to hyper.
async fn sniff<S: AsyncRead + Unpin>(mut stream: S) -> io::Result<Prefixed<S>> {
    let mut buf = [0u8; PREFACE.len()];
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if filled == buf.len() || buf[..filled] != PREFACE[..filled] {
            break;
        }
    }
    Ok(Prefixed {
        prefix: Bytes::copy_from_slice(&buf[..filled]),
        inner: stream,
    })
}

/// A stream that first yields bytes already read from it.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
