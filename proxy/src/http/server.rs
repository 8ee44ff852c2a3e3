//! The server side of a sidecar listener: HTTP/1.1 and h2c prior-knowledge on one port,
//! limits against hostile clients, and a graceful drain on shutdown. An inbound listener
//! with `ServerTls` first runs the mutual-TLS handshake and hands each request the
//! verified identity of the calling sidecar (`PeerIdentity` in its extensions).
//!
//! What a client does wrong is counted, never logged above debug: a connection that ends
//! with an error adds one to `mesh_http_connection_errors_total` under its kind, so a
//! client cannot write the mesh's log at will. A failing `accept` (out of file
//! descriptors) is warned about at most once per [`ACCEPT_WARN_INTERVAL`].

use std::convert::Infallible;
use std::fmt;
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::Body;
use super::cancel::or_cancelled;
use crate::metrics::{ConnectionError, ConnectionErrors, Metrics};
use crate::tls;

/// The pause after a failed `accept` (e.g. out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The shortest time between two warnings about failed accepts of one listener: the
/// condition (out of file descriptors) can last, and the loop retries every
/// [`ACCEPT_ERROR_PAUSE`].
pub const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// At most one log line per interval about a condition that can repeat without bound (a
/// failing `accept`): the first occurrence is to be logged at once, later ones within
/// the interval are only counted, and the next line logged says how many were not.
#[derive(Debug)]
pub struct WarnLimiter {
    interval: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl WarnLimiter {
    /// A limiter letting one line through per `interval`.
    pub const fn new(interval: Duration) -> Self {
        WarnLimiter {
            interval,
            last: None,
            skipped: 0,
        }
    }

    /// One occurrence at `now`: `Some` when it is to be logged, holding the number of
    /// occurrences not logged since the last line (displayed as ` (N more)`).
    pub fn hit(&mut self, now: Instant) -> Option<Skipped> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.skipped += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(Skipped(std::mem::take(&mut self.skipped)))
            }
        }
    }
}

/// Occurrences a [`WarnLimiter`] did not let through since its last line. It displays as
/// ` (N more)`, or as nothing when there were none, to be appended to the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skipped(pub u64);

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} more)"),
        }
    }
}

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
    /// How long an inbound keeps an unused keep-alive HTTP/1.1 connection to its app
    /// (nginx's `keepalive_timeout` is 60 s too): a thread-per-connection app does not
    /// keep a thread per idle connection forever.
    pub app_idle_timeout: Duration,
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
            app_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// HTTP/2 flow-control windows, for servers and clients alike. hyper's server defaults
/// (1 MiB per stream and 1 MiB for the whole connection) make every stream of a
/// multiplexed sidecar connection share 1 MiB in flight, which throttles concurrent large
/// bodies to a trickle of window updates; 1 MiB per stream and 16 MiB per connection keep
/// a hop at full speed (a loopback or LAN round trip needs far less than 1 MiB in flight)
/// while bounding what a peer can make us buffer per stream. (At 2 MiB, a stalled
/// stream over the socket path sometimes held 4 MiB: the window in the caller's buffer,
/// and as much again in h2's receive storage before it was taken out.)
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
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
        .keep_alive(true)
        // One buffer per write, sent with send(2): writev(2) goes through the VFS layer
        // and imports an iovec on every call, which on loopback costs more than copying
        // a response's head and a small body into one buffer (docs/benchmark.md).
        .writev(false);
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
/// Connections that end with an error (the client's doing) are counted in `errors`.
///
/// Dropping the returned future (the caller's drain deadline passed) closes the
/// connections still open.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    errors: ConnectionErrors,
    handle: H,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_tls(
        listener, builder, limits, tracker, shutdown, None, errors, handle,
    )
    .await;
}

/// [`serve`], with each connection first going through the TLS handshake when `tls` is
/// given. A failed handshake (plaintext, another CA, an expired or missing client
/// certificate) closes the connection and is counted; the handshake shares
/// `header_read_timeout` with the first bytes of HTTP.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one listener, each set by its caller"
)]
pub(crate) async fn serve_tls<H, F>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    tls: Option<ServerTls>,
    errors: ConnectionErrors,
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
    let mut accept_warnings = WarnLimiter::new(ACCEPT_WARN_INTERVAL);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly instead of
                    // spinning on an error that persists until some connection closes,
                    // and say so once per interval, not once per retry.
                    if let Some(more) = accept_warnings.hit(Instant::now()) {
                        tracing::warn!(%error, "accept failed{more}");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        errors.accepted();
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
        let errors = errors.clone();
        let span = tracing::debug_span!("conn", ?local, %peer);
        let connection = async move {
            let Some(tls) = tls else {
                let Some(io) = sniff_within(stream, timeout, &shutdown, &errors).await else {
                    return;
                };
                let result = serve_connection(&builder, io, peer, None, handle, &shutdown).await;
                count_error(&errors, result);
                return;
            };
            let started = Instant::now();
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
            let Some(io) = sniff_within(stream, left, &shutdown, &errors).await else {
                return;
            };
            let header = http::HeaderValue::from_maybe_shared(Bytes::from(identity.clone())).ok();
            let identity = PeerIdentity {
                identity: Arc::from(identity),
                header,
            };
            let result =
                serve_connection(&builder, io, peer, Some(identity), handle, &shutdown).await;
            count_error(&errors, result);
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

/// The error a connection ended with, as hyper's connection gives it.
type ConnectionResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Count the error a connection ended with, if any. The client caused it (a protocol
/// error, a flood of resets, a timeout, a reset connection), so it is logged at debug
/// only: one line per connection would let any client fill the log.
fn count_error(errors: &ConnectionErrors, result: ConnectionResult) {
    if let Err(error) = result {
        let kind = classify(&*error);
        errors.record(kind);
        tracing::debug!(kind = kind.as_str(), %error, "connection ended with an error");
    }
}

/// The kind of error a server connection ended with, from hyper's error and its sources
/// (h2's error for HTTP/2, an I/O error).
fn classify(error: &(dyn std::error::Error + 'static)) -> ConnectionError {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_timeout() {
                return ConnectionError::Timeout;
            }
            if hyper.is_parse() {
                return ConnectionError::Protocol;
            }
            if hyper.is_incomplete_message() || hyper.is_body_write_aborted() {
                return ConnectionError::Io;
            }
        } else if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if h2.is_io() {
                return ConnectionError::Io;
            }
            return match h2.reason() {
                Some(h2::Reason::ENHANCE_YOUR_CALM) => ConnectionError::Flood,
                _ => ConnectionError::Protocol,
            };
        } else if let Some(io) = error.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::TimedOut => ConnectionError::Timeout,
                io::ErrorKind::InvalidData => ConnectionError::Protocol,
                _ => ConnectionError::Io,
            };
        }
        source = error.source();
    }
    ConnectionError::Other
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
) -> ConnectionResult
where
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
    match or_cancelled(conn.as_mut(), shutdown.clone()).await {
        Some(result) => result,
        None => {
            // Finish the requests in flight, refuse new ones (GOAWAY on
            // HTTP/2, `Connection: close` on HTTP/1.1).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// [`sniff`] within `within` (the header-read timeout: a client that sends nothing is
/// cut), unless `shutdown` comes first; `None` when the connection is to be dropped
/// (a failure is counted in `errors`).
async fn sniff_within<S: AsyncRead + Unpin>(
    stream: S,
    within: Duration,
    shutdown: &CancellationToken,
    errors: &ConnectionErrors,
) -> Option<Prefixed<S>> {
    tokio::select! {
        () = shutdown.cancelled() => None,
        sniffed = tokio::time::timeout(within, sniff(stream)) => match sniffed {
            Ok(Ok(io)) => Some(io),
            Ok(Err(error)) => {
                errors.record(ConnectionError::Io);
                tracing::debug!(%error, "connection failed before a request");
                None
            }
            Err(_elapsed) => {
                errors.record(ConnectionError::Timeout);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a failing test panics")]

    use super::*;
    use crate::metrics::{Listener, sum_of};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    #[tokio::test(start_paused = true)]
    async fn a_limited_warning_comes_first_then_once_per_interval_with_the_count() {
        let interval = Duration::from_secs(10);
        let mut limiter = WarnLimiter::new(interval);
        assert_eq!(limiter.hit(Instant::now()), Some(Skipped(0)));
        // A failing accept retried every 50 ms: silent for the rest of the interval.
        for _ in 0..199 {
            tokio::time::advance(ACCEPT_ERROR_PAUSE).await;
            assert_eq!(limiter.hit(Instant::now()), None);
        }
        tokio::time::advance(ACCEPT_ERROR_PAUSE).await;
        let more = limiter.hit(Instant::now()).unwrap();
        assert_eq!(more, Skipped(199));
        assert_eq!(format!("accept failed{more}"), "accept failed (199 more)");
        assert_eq!(limiter.hit(Instant::now()), None);
        // After a quiet spell the next occurrence is logged at once, with the one
        // that was held back.
        tokio::time::advance(interval * 3).await;
        assert_eq!(limiter.hit(Instant::now()), Some(Skipped(1)));
        assert_eq!(Skipped(0).to_string(), "");
    }

    /// HTTP/2 frames of a rapid-reset client: the preface, SETTINGS, then `streams`
    /// requests each cancelled (RST_STREAM) right after its HEADERS.
    fn rapid_reset(streams: u32) -> Vec<u8> {
        fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
            let len = u32::try_from(payload.len()).unwrap();
            out.extend_from_slice(&len.to_be_bytes()[1..]);
            out.extend_from_slice(&[kind, flags]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
        }
        let mut out = PREFACE.to_vec();
        frame(&mut out, 0x4, 0, 0, &[]);
        // GET http://x/ in HPACK: static-table :method GET, :scheme http, :path /, and
        // :authority "x" as a literal.
        let headers = [0x82, 0x86, 0x84, 0x01, 0x01, b'x'];
        for i in 0..streams {
            let stream = 2 * i + 1;
            // END_STREAM | END_HEADERS, then RST_STREAM CANCEL.
            frame(&mut out, 0x1, 0x5, stream, &headers);
            frame(&mut out, 0x3, 0, stream, &0x8u32.to_be_bytes());
        }
        out
    }

    /// Send `bytes` on a new connection to `addr`, then read until the server closes.
    async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The server may close before it read everything: a failed write is fine.
        let _ = stream.write_all(bytes).await;
        let mut back = Vec::new();
        let _ = stream.read_to_end(&mut back).await;
        back
    }

    #[tokio::test]
    async fn connections_clients_break_are_counted_by_kind() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        let errors = metrics.connection_errors(Listener::Ingress, "ingress", "web");
        let limits = Limits::default();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            builder(&limits, Facing::Apps),
            limits,
            TaskTracker::new(),
            shutdown.clone(),
            errors,
            |_, _| async { Response::new(super::super::empty()) },
        ));

        // A well-behaved client is not counted.
        let answer = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with(b"HTTP/1.1 200 "), "{answer:?}");
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for _ in 0..3 {
            let request = Request::new(super::super::empty());
            assert_eq!(send.send_request(request).await.unwrap().status(), 200);
        }
        drop(send);
        conn.await.unwrap().unwrap();
        // Garbage.
        let answer = exchange(addr, b"HELLO\r\n\r\n").await;
        assert!(answer.starts_with(b"HTTP/1.1 400 "), "{answer:?}");
        // Rapid reset, three times: more cancelled streams than the 200 allowed.
        for _ in 0..3 {
            exchange(addr, &rapid_reset(300)).await;
        }

        shutdown.cancel();
        server.await.unwrap();
        let text = metrics.encode();
        let count = |kind: &str| {
            let line = format!(
                r#"mesh_http_connection_errors_total{{listener="ingress",caller="ingress",service="web",kind="{kind}"}} "#
            );
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map_or(0, |n| n.parse::<u64>().unwrap())
        };
        assert_eq!(count("flood"), 3, "{text}");
        assert_eq!(count("protocol"), 1, "{text}");
        assert_eq!(
            sum_of(&text, "mesh_http_connection_errors_total"),
            4,
            "{text}"
        );
    }
}
