//! One shared HTTP/2 connection per peer, on the `h2` crate directly.
//!
//! hyper's HTTP/2 client gives flow-control credit back as soon as a DATA frame is read,
//! which leaves a proxy two bad choices when its reader is slower than the peer: read
//! eagerly and buffer without bound, or leave the frames in h2, which charges every small
//! one against a budget and cuts the connection when a fast producer of tiny frames
//! exhausts it. With h2 itself the sidecar can do what a proxy needs: take frames out of
//! h2 at once and give credit back only when the next hop took the bytes
//! ([`RecvBody`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, SendStream};
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::recv::RecvBody;
use super::tunnel::H2Tunnel;
use super::{PeerTls, SendError, connect, connect_tls};
use crate::errors::ForwardError;
use crate::http::Body;
use crate::http::server::{CONNECTION_WINDOW, STREAM_WINDOW};

/// How often an idle or busy connection is pinged, and how long the answer may take
/// before the connection is given up: a vanished peer gives a reconnect instead of
/// requests hanging on a half-open socket.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// One shared HTTP/2 connection per peer address, reused by every request and replaced
/// when it breaks. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct H2Pool {
    conns: Arc<parking_lot::Mutex<std::collections::HashMap<SocketAddr, Slot>>>,
    /// Mutual TLS towards inbounds; `None` for plain connections (to an h2c app, or
    /// between sidecars with `tls = "off"`).
    tls: Option<Arc<PeerTls>>,
    /// The receive window of each stream: what one response may hold here unread.
    stream_window: u32,
}

/// The stream window towards an app. The app is a local process on loopback, where
/// 64 KiB in flight keeps a stream at full speed. It also bounds how many of an app's tiny
/// frames h2 can queue between two drains of the pump (`recv.rs`): h2 keeps its queue's
/// storage at its high-water mark, and with 256 KiB of 12-byte frames that mark reached
/// 8-15 MB in some runs of tests/streams.rs, against ~2 MB with 64 KiB.
const APP_STREAM_WINDOW: u32 = 64 * 1024;

/// A peer's connection, behind an async lock so concurrent first requests share one
/// connect instead of racing to open several.
type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;

/// A live connection: its sender, and whether its driver task has ended.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// A response received over an [`H2Pool`] connection.
pub type H2Response = Response<RecvBody>;

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
    /// An empty pool of plain connections to an app (h2c).
    pub fn new() -> Self {
        H2Pool {
            conns: Arc::default(),
            tls: None,
            stream_window: APP_STREAM_WINDOW,
        }
    }

    /// An empty pool of connections to inbounds: mutual TLS with `tls` (ALPN `h2`), or
    /// plain without it.
    pub fn with_tls(tls: Option<PeerTls>) -> Self {
        H2Pool {
            conns: Arc::default(),
            tls: tls.map(Arc::new),
            stream_window: STREAM_WINDOW,
        }
    }

    /// Send `req` to `addr` over the shared connection, connecting (again) if needed.
    /// The request body is sent by a task of its own; dropping the returned future, or
    /// the response's body before its end, cancels the stream.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<H2Response, SendError> {
        let (response, _send) = self.open(addr, req, false).await?;
        Ok(response)
    }

    /// Send an extended CONNECT (`:protocol` in the request's `hyper::ext::Protocol`
    /// extension) to `addr`. On a `200` the stream is a tunnel, returned beside the
    /// response (whose body is then empty).
    pub async fn send_connect(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<(Response<Body>, Option<H2Tunnel>), ForwardError> {
        let (response, send) = self
            .open(addr, req, true)
            .await
            .map_err(|(error, _unsent)| error)?;
        let Some((send, cancel)) = send.filter(|_| response.status() == http::StatusCode::OK)
        else {
            return Ok((response.map(crate::http::boxed), None));
        };
        let (parts, body) = response.into_parts();
        let tunnel = H2Tunnel::new(send, body, cancel);
        Ok((
            Response::from_parts(parts, crate::http::empty()),
            Some(tunnel),
        ))
    }

    /// Open a stream for `req`; for a tunnel, keep its send half instead of piping the
    /// (empty) request body.
    async fn open(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        tunnel: bool,
    ) -> Result<(H2Response, Option<(SendStream<Bytes>, DropGuard)>), SendError> {
        let mut tries = 0;
        let sender = loop {
            tries += 1;
            let conn = match self.conn(addr).await {
                Ok(conn) => conn,
                Err(error) => return Err((error, Some(req))),
            };
            match conn.sender.ready().await {
                Ok(sender) => break sender,
                // The shared connection closed (or is going away) before this request
                // was given to it: one fresh connection is worth a try before reporting it.
                Err(source) => {
                    conn.closed.store(true, Ordering::Release);
                    if tries >= 2 {
                        let source = source.into();
                        return Err((ForwardError::NotSent { addr, source }, Some(req)));
                    }
                    tracing::debug!(%addr, error = %source, "shared connection closed, reconnecting");
                }
            }
        };
        let mut sender = sender;
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        prepare_head(&mut head, &body);
        let connect = head.method() == Method::CONNECT;
        let end = body.is_end_stream() && !connect;
        let (response, send) = match sender.send_request(head, end) {
            Ok(pair) => pair,
            Err(error) => {
                let source = error.into();
                return Err((ForwardError::NotSent { addr, source }, None));
            }
        };
        // Cancelled when the caller gives up on the response (the future below, or the
        // response body, is dropped): the body pipe then resets the stream.
        let cancel = CancellationToken::new();
        let guard = cancel.clone().drop_guard();
        let send = if tunnel {
            Some(send)
        } else {
            if !end {
                tokio::spawn(pipe(body, send, cancel).in_current_span());
            }
            None
        };
        let response = response
            .await
            .map_err(|source| (ForwardError::from_h2(addr, source), None))?;
        match send {
            Some(send) => Ok((response.map(RecvBody::new), Some((send, guard)))),
            None => Ok((
                response.map(|recv| RecvBody::new(recv).guarded(guard)),
                None,
            )),
        }
    }

    /// The live connection to `addr`, or a new one.
    async fn conn(&self, addr: SocketAddr) -> Result<Conn, ForwardError> {
        let slot = Arc::clone(self.conns.lock().entry(addr).or_default());
        let mut current = slot.lock().await;
        if let Some(conn) = current.as_ref() {
            if !conn.closed.load(Ordering::Acquire) {
                return Ok(conn.clone());
            }
        }
        *current = None;
        // Boxed: the handshake is the rare path, and inline it would make every request's
        // future larger.
        let conn = Box::pin(self.connect(addr)).await?;
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// A new HTTP/2 connection to `addr`, driven by its own task.
    async fn connect(&self, addr: SocketAddr) -> Result<Conn, ForwardError> {
        match &self.tls {
            None => handshake(addr, connect(addr).await?, self.stream_window).await,
            Some(tls) => {
                let stream = connect_tls(addr, tls, &tls.client.h2).await?;
                handshake(addr, stream, self.stream_window).await
            }
        }
    }
}

/// The HTTP/2 handshake over `stream`, every limit set deliberately; the connection is
/// driven by its own task, which also pings the peer.
async fn handshake<S>(addr: SocketAddr, stream: S, stream_window: u32) -> Result<Conn, ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Until the peer's SETTINGS arrive h2 assumes 100 concurrent streams and queues
        // beyond that; the peer (an inbound, or an app) states its real limit in its
        // first frame, so do not add a lower cap of our own meanwhile.
        .initial_max_send_streams(1000)
        // Every cancelled request (a caller hung up, a retry dropped a 5xx) resets a
        // stream, and h2 remembers reset streams to ignore their late frames. With h2's
        // default of 10, a burst of cancellations evicts them early, and a late frame
        // then is a connection error that fails every other request multiplexed on this
        // shared connection.
        .max_concurrent_reset_streams(10_000)
        // Response heads from apps: 16 KiB rejects large cookies; 256 KiB is generous
        // and still bounded.
        .max_header_list_size(256 * 1024)
        .enable_push(false)
        // h2 charges each small DATA frame it holds unread against this budget (see
        // `recv.rs`). Every frame is taken out of h2 as soon as it arrives, so the budget
        // only covers the frames of one read of the socket; and flow control bounds
        // unread frames by the connection window (every non-empty frame carries at least
        // one byte of it), so at 256 bytes of charge per byte of window a peer that keeps
        // to flow control can never exhaust it, however small its frames.
        .data_frame_budget(256 * CONNECTION_WINDOW as usize)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|source| ForwardError::Handshake {
            addr,
            source: source.into(),
        })?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&closed);
    let ping = connection.ping_pong();
    tokio::spawn(
        async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "http/2 connection ended with an error");
                    }
                }
                () = keepalive(ping) => {
                    tracing::debug!("http/2 peer did not answer a ping, connection closed");
                }
            }
            ended.store(true, Ordering::Release);
        }
        .instrument(tracing::debug_span!("h2-client", %addr)),
    );
    Ok(Conn { sender, closed })
}

/// Ping the peer every [`KEEPALIVE_INTERVAL`]; returns when a ping goes unanswered.
async fn keepalive(ping: Option<h2::PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "ping failed");
                return;
            }
            Err(_elapsed) => return,
        }
    }
}

/// What hyper's client did to a request head for HTTP/2: the connection-specific
/// headers are gone already (`headers::strip_hop_by_hop`); the extended CONNECT
/// protocol moves to h2's extension; a body of known length gets its `content-length`.
fn prepare_head(head: &mut Request<()>, body: &Body) {
    if let Some(protocol) = head.extensions_mut().remove::<hyper::ext::Protocol>() {
        head.extensions_mut()
            .insert(h2::ext::Protocol::from(protocol.as_str()));
    }
    if let Some(len) = body.size_hint().exact() {
        let payload_method = matches!(*head.method(), Method::POST | Method::PUT | Method::PATCH);
        if (len != 0 || payload_method)
            && !head.headers().contains_key(http::header::CONTENT_LENGTH)
        {
            head.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
}

/// Send `body` on `send` until its end, the peer's reset, or `cancel`.
async fn pipe(body: Body, mut send: SendStream<Bytes>, cancel: CancellationToken) {
    tokio::select! {
        result = send_body(body, &mut send) => {
            if let Err(error) = result {
                tracing::debug!(%error, "request body not sent whole");
            }
        }
        () = cancel.cancelled() => send.send_reset(Reason::CANCEL),
    }
}

async fn send_body(
    mut body: Body,
    send: &mut SendStream<Bytes>,
) -> Result<(), crate::http::BoxError> {
    loop {
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = send.poll_reset(cx) {
                return Poll::Ready(Err(reset_error(reason)));
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => {
                send.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(error)) => {
                send.send_reset(Reason::CANCEL);
                return Err(error);
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if data.is_empty() && !end {
                    continue;
                }
                if !data.is_empty() {
                    wait_capacity(send).await?;
                }
                send.send_data(data, end)?;
                if end {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send.send_trailers(trailers)?;
            return Ok(());
        }
    }
}

/// Wait until the stream may send at least one byte (h2 buffers the rest of a chunk and
/// sends it as the peer gives credit; the next chunk is read only when that is done, so
/// at most one chunk waits here).
pub(super) async fn wait_capacity(
    send: &mut SendStream<Bytes>,
) -> Result<(), crate::http::BoxError> {
    send.reserve_capacity(1);
    std::future::poll_fn(|cx| {
        loop {
            if send.capacity() > 0 {
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(reason) = send.poll_reset(cx) {
                return Poll::Ready(Err(reset_error(reason)));
            }
            match send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                Poll::Ready(None) => return Poll::Ready(Err("the stream closed".into())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

fn reset_error(reason: Result<Reason, h2::Error>) -> crate::http::BoxError {
    match reason {
        Ok(reason) => h2::Error::from(reason).into(),
        Err(error) => error.into(),
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}
