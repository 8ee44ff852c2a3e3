//! `mesh-test-app`: a small, cheap, configurable application for the data-path tests and
//! the benchmark. See `tests/test-app/README.md` for the modes and routes.
//!
//! It listens on `127.0.0.1:$PORT` and says who it is from `MESH_SERVICE` / `MESH_REPLICA`
//! (defaults `app` / `0`). In `http` mode it serves HTTP/1.1 (keep-alive, upgrades) and
//! h2c with prior knowledge on the same port.

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Sleep;

const USAGE: &str = "\
usage: mesh-test-app [http|tcp|tcp-echo]   (or TEST_APP_MODE; default http)

environment:
  PORT                      port to listen on at 127.0.0.1 (required)
  MESH_SERVICE, MESH_REPLICA identity reported by the app (defaults app, 0)
  TEST_APP_LOG=1            log one line per request / connection to stdout
  TEST_APP_DELAY_START_MS   wait this long before binding
  TEST_APP_UNHEALTHY_FILE   /healthz answers 503 while this file exists
  TEST_APP_GRACE_MS         on SIGTERM, wait at most this long for in-flight work
  TEST_APP_WORKERS          tokio worker threads (default 2)
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Http,
    Tcp,
    TcpEcho,
}

impl Mode {
    fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "http" => Ok(Self::Http),
            "tcp" => Ok(Self::Tcp),
            "tcp-echo" => Ok(Self::TcpEcho),
            other => bail!("unknown mode {other:?}\n{USAGE}"),
        }
    }
}

/// Shared by every connection. Each clone held by a connection (or an upgraded stream)
/// keeps `_in_flight` alive; shutdown waits until every clone has been dropped.
struct State {
    /// `<service>.<replica>`
    id: Bytes,
    id_header: HeaderValue,
    log: bool,
    unhealthy_file: Option<std::path::PathBuf>,
    served: AtomicU64,
    _in_flight: mpsc::Sender<()>,
}

fn env_u64(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            Ok(Some(v.trim().parse().with_context(|| {
                format!("{name}={v:?} is not a number")
            })?))
        }
        _ => Ok(None),
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = match args.next() {
        Some(a) if a == "-h" || a == "--help" => {
            print!("{USAGE}");
            return Ok(());
        }
        Some(a) => a,
        None => std::env::var("TEST_APP_MODE").unwrap_or_else(|_| "http".to_owned()),
    };
    let mode = Mode::parse(&mode)?;
    let workers = env_u64("TEST_APP_WORKERS")?.unwrap_or(2).max(1) as usize;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        .block_on(run(mode))
}

async fn run(mode: Mode) -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .context("PORT is not set")?
        .parse()
        .context("PORT is not a port number")?;
    let service = std::env::var("MESH_SERVICE").unwrap_or_else(|_| "app".to_owned());
    let replica = std::env::var("MESH_REPLICA").unwrap_or_else(|_| "0".to_owned());
    let id = format!("{service}.{replica}");
    let grace = env_u64("TEST_APP_GRACE_MS")?.map(Duration::from_millis);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    if let Some(ms) = env_u64("TEST_APP_DELAY_START_MS")? {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    }

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;

    let (in_flight_tx, mut in_flight_rx) = mpsc::channel::<()>(1);
    let state = Arc::new(State {
        id_header: HeaderValue::from_str(&id).context("MESH_SERVICE/MESH_REPLICA")?,
        id: Bytes::from(id.clone()),
        log: std::env::var("TEST_APP_LOG").is_ok_and(|v| v == "1"),
        unhealthy_file: std::env::var_os("TEST_APP_UNHEALTHY_FILE")
            .filter(|v| !v.is_empty())
            .map(Into::into),
        served: AtomicU64::new(0),
        _in_flight: in_flight_tx,
    });

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "test-app {id} listening on {local}")?;
        out.flush()?;
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let builder: &'static auto::Builder<TokioExecutor> = Box::leak(Box::new(http_builder()));

    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    eprintln!("test-app {id}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        match mode {
            Mode::Http => {
                let shutdown = shutdown_rx.clone();
                tokio::spawn(serve_http(builder, stream, state, shutdown));
            }
            Mode::Tcp => {
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp(stream, &state).await {
                        log_line(&state, format_args!("tcp {peer}: {e}"));
                    }
                });
            }
            Mode::TcpEcho => {
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp_echo(stream, &state).await {
                        log_line(&state, format_args!("tcp-echo {peer}: {e}"));
                    }
                });
            }
        }
    }

    // Stop accepting, ask every connection to finish its in-flight work, and wait.
    drop(listener);
    let _ = shutdown_tx.send(true);
    log_line(&state, format_args!("shutting down"));
    drop(state);
    let wait = in_flight_rx.recv();
    match grace {
        Some(g) => {
            let _ = tokio::time::timeout(g, wait).await;
        }
        None => {
            wait.await;
        }
    }
    let _ = std::io::stdout().lock().flush();
    Ok(())
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(4096)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        // Extended CONNECT (RFC 8441) for `/ws` over h2c.
        .enable_connect_protocol();
    b
}

fn log_line(state: &State, args: fmt::Arguments<'_>) {
    if state.log {
        let mut out = std::io::stdout().lock();
        let id = String::from_utf8_lossy(&state.id);
        let _ = writeln!(out, "test-app {id} {args}");
        let _ = out.flush();
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

async fn serve_http(
    builder: &'static auto::Builder<TokioExecutor>,
    stream: TcpStream,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let svc_state = state.clone();
    let svc = hyper::service::service_fn(move |req| handle(svc_state.clone(), req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    drop(state);
}

/// Returned by the service to make hyper drop the connection (HTTP/1.1) or reset the
/// stream (h2) without any response.
#[derive(Debug)]
struct CloseConnection;

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("closing the connection without a response (/close)")
    }
}

impl std::error::Error for CloseConnection {}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, CloseConnection> {
    // mesh's health checks are not application traffic: not logged.
    let health_check = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .is_some_and(|ua| ua.as_bytes().starts_with(b"mesh-health/"));
    let log = state.log && !health_check;
    let (method, uri, version) = if log {
        (
            Some(req.method().clone()),
            Some(req.uri().clone()),
            Some(req.version()),
        )
    } else {
        (None, None, None)
    };
    let res = route(&state, req).await;
    if log {
        let status = match &res {
            Ok(r) => r.status().as_u16().to_string(),
            Err(_) => "closed".to_owned(),
        };
        log_line(
            &state,
            format_args!(
                "{} {} {:?} -> {status}",
                method.unwrap_or_default(),
                uri.unwrap_or_default(),
                version.unwrap_or_default()
            ),
        );
    }
    res
}

async fn route(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, CloseConnection> {
    // `/only/<id>/<rest>`: `/<rest>` on the replica `<id>`, `/headers` on the others, so
    // that a test can make one replica misbehave.
    if let Some(rest) = req.uri().path().strip_prefix("/only/") {
        let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
        let target = if id == state.id {
            format!("/{rest}")
        } else {
            "/headers".to_owned()
        };
        let mut response = route_path(state, req, &target).await?;
        response
            .headers_mut()
            .insert("x-replica", state.id_header.clone());
        return Ok(response);
    }
    let path = req.uri().path().to_owned();
    route_path(state, req, &path).await
}

async fn route_path(
    state: &Arc<State>,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<AppBody>, CloseConnection> {
    if path != "/count" && path != "/healthz" {
        state.served.fetch_add(1, Ordering::Relaxed);
    }
    let mut res = match path {
        "/" | "/whoami" => {
            let mut r = text(StatusCode::OK, state.id.clone());
            r.headers_mut().insert("x-replica", state.id_header.clone());
            r
        }
        "/count" => text(
            StatusCode::OK,
            state.served.load(Ordering::Relaxed).to_string(),
        ),
        "/healthz" => {
            let unhealthy = state
                .unhealthy_file
                .as_ref()
                .is_some_and(|f| std::fs::metadata(f).is_ok());
            if unhealthy {
                text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
            } else {
                text(StatusCode::OK, "ok")
            }
        }
        "/hang" => std::future::pending().await,
        "/close" => return Err(CloseConnection),
        "/echo" => echo(req),
        "/stream" => stream(req.uri().query().unwrap_or("")),
        "/headers" => headers_json(&req),
        "/grpc" => grpc(req),
        "/ws" => upgrade(state, req),
        _ => {
            if let Some(code) = path.strip_prefix("/status/") {
                match code
                    .parse::<u16>()
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                {
                    Some(status) => text(status, format!("status {}", status.as_u16())),
                    None => text(StatusCode::BAD_REQUEST, format!("bad status {code:?}")),
                }
            } else if let Some(code) = path.strip_prefix("/grpc-status/") {
                grpc_trailers_only(code)
            } else if let Some(ms) = path.strip_prefix("/sleep/") {
                match ms.parse::<u64>() {
                    Ok(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        text(StatusCode::OK, format!("slept {ms}"))
                    }
                    Err(_) => text(StatusCode::BAD_REQUEST, format!("bad duration {ms:?}")),
                }
            } else {
                text(StatusCode::NOT_FOUND, "not found")
            }
        }
    };
    // Every answer says who gave it, so tests can see where any path was routed.
    res.headers_mut()
        .insert("x-replica", state.id_header.clone());
    Ok(res)
}

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AppBody> {
    let mut r = Response::new(AppBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, TEXT_PLAIN);
    r
}

fn echo(req: Request<Incoming>) -> Response<AppBody> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut r = Response::new(AppBody::Echo(req.into_body()));
    if let Some(ct) = content_type {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r
}

fn stream(query: &str) -> Response<AppBody> {
    let mut n = 3u64;
    let mut ms = 100u64;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "n" => n = v.parse().unwrap_or(n),
            "ms" => ms = v.parse().unwrap_or(ms),
            _ => {}
        }
    }
    let mut r = Response::new(AppBody::Stream {
        next: 0,
        n,
        period: Duration::from_millis(ms),
        sleep: None,
    });
    r.headers_mut().insert(header::CONTENT_TYPE, TEXT_PLAIN);
    r
}

fn headers_json(req: &Request<Incoming>) -> Response<AppBody> {
    let mut map = serde_json::Map::new();
    for name in req.headers().keys() {
        let joined = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), joined.into());
    }
    map.insert("_version".into(), format!("{:?}", req.version()).into());
    map.insert("_method".into(), req.method().as_str().into());
    // The origin form for both versions (h2 requests carry scheme and authority in
    // the URI); the authority is reported separately.
    let uri = req.uri();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    map.insert("_uri".into(), path.into());
    let authority = uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    if let Some(a) = authority {
        map.insert("_authority".into(), a.into());
    }
    let body = serde_json::Value::Object(map).to_string();
    let mut r = Response::new(AppBody::Full(Some(body.into())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A gRPC trailers-only response: HTTP 200 with `grpc-status` in the headers, no body.
fn grpc_trailers_only(code: &str) -> Response<AppBody> {
    let Ok(status) = HeaderValue::from_str(code) else {
        return text(StatusCode::BAD_REQUEST, format!("bad grpc status {code:?}"));
    };
    let mut r = Response::new(AppBody::Full(None));
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(HeaderName::from_static("grpc-status"), status);
    headers.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static("trailers-only"),
    );
    r
}

fn grpc(req: Request<Incoming>) -> Response<AppBody> {
    if req.method() != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "grpc wants POST");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let status = req
        .headers()
        .get("x-grpc-status")
        .filter(|v| !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit))
        .cloned()
        .unwrap_or(HeaderValue::from_static("0"));
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert(HeaderName::from_static("grpc-status"), status);
    trailers.insert(
        HeaderName::from_static("grpc-message"),
        HeaderValue::from_static("ok"),
    );
    let mut r = Response::new(AppBody::Grpc {
        inner: req.into_body(),
        trailers: Some(trailers),
    });
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    r
}

fn upgrade(state: &Arc<State>, mut req: Request<Incoming>) -> Response<AppBody> {
    if req.method() == Method::CONNECT {
        return extended_connect(state, req);
    }
    let Some(proto) = req.headers().get(header::UPGRADE).cloned() else {
        return text(StatusCode::UPGRADE_REQUIRED, "upgrade required");
    };
    if req.version() != Version::HTTP_11 {
        return text(StatusCode::BAD_REQUEST, "upgrades need HTTP/1.1");
    }
    let accept = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| websocket_accept(key.as_bytes()));

    echo_upgraded(state, hyper::upgrade::on(&mut req), "upgrade");

    let mut r = Response::new(AppBody::Full(None));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, proto);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(accept) = accept.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    r
}

/// Once `on_upgrade` gives the stream (after the response went out), echo its bytes
/// until the client ends its side, then end ours. `state` is held meanwhile, so shutdown
/// waits for the tunnel.
fn echo_upgraded(state: &Arc<State>, on_upgrade: hyper::upgrade::OnUpgrade, what: &'static str) {
    let state = state.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                log_line(&state, format_args!("{what} failed: {e}"));
                return;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
        let _ = wr.shutdown().await;
        drop(state);
    });
}

/// `/ws` as an HTTP/2 extended CONNECT (RFC 8441): 200 with `x-protocol: <:protocol>`,
/// then raw bytes are echoed on the stream until the client ends its side. A CONNECT
/// without `:protocol` gets 400.
fn extended_connect(state: &Arc<State>, mut req: Request<Incoming>) -> Response<AppBody> {
    let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>() else {
        return text(StatusCode::BAD_REQUEST, "CONNECT to /ws needs :protocol");
    };
    let protocol = HeaderValue::from_bytes(protocol.as_ref())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    echo_upgraded(state, hyper::upgrade::on(&mut req), "extended CONNECT");
    let mut r = Response::new(AppBody::Full(None));
    r.headers_mut().insert("x-protocol", protocol);
    r
}

// ---------------------------------------------------------------------------------------
// Response bodies (one enum rather than boxing, to keep the hot path cheap)

enum AppBody {
    /// A fixed body, sent in one frame.
    Full(Option<Bytes>),
    /// The request body, streamed back frame by frame as it arrives.
    Echo(Incoming),
    /// The request body's data frames, then gRPC trailers.
    Grpc {
        inner: Incoming,
        trailers: Option<HeaderMap>,
    },
    /// `n` lines `chunk <i>\n`, `period` apart (the first one at once).
    Stream {
        next: u64,
        n: u64,
        period: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
    },
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            AppBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            AppBody::Echo(inner) => loop {
                match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                    // h2 can end a body with an empty DATA frame; don't pass those on.
                    Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                    other => return Poll::Ready(other),
                }
            },
            AppBody::Grpc { inner, trailers } => loop {
                if trailers.is_none() {
                    return Poll::Ready(None);
                }
                match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        // The request's own trailers are dropped; ours come at the end.
                    }
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    None => {
                        return Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))));
                    }
                }
            },
            AppBody::Stream {
                next,
                n,
                period,
                sleep,
            } => {
                if *next >= *n {
                    return Poll::Ready(None);
                }
                if *next > 0 && !period.is_zero() {
                    let s = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(*period)));
                    ready!(s.as_mut().poll(cx));
                    *sleep = None;
                }
                let line = format!("chunk {next}\n");
                *next += 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AppBody::Full(data) => data.is_none(),
            AppBody::Echo(inner) => inner.is_end_stream(),
            AppBody::Grpc { trailers, .. } => trailers.is_none(),
            AppBody::Stream { next, n, .. } => next >= n,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AppBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            AppBody::Echo(inner) => inner.size_hint(),
            AppBody::Grpc { .. } | AppBody::Stream { .. } => SizeHint::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// TCP modes

/// Read until the client half-closes, then answer `<id>:` + everything read, then close.
async fn serve_tcp(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(state.id.len() + 1 + 4096);
    buf.extend_from_slice(&state.id);
    buf.push(b':');
    let n = stream.read_to_end(&mut buf).await?;
    log_line(state, format_args!("tcp: read {n} bytes"));
    stream.write_all(&buf).await?;
    stream.shutdown().await
}

/// Echo bytes as they arrive; close when the client closes.
async fn serve_tcp_echo(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let n = tokio::io::copy(&mut rd, &mut wr).await?;
    log_line(state, format_args!("tcp-echo: echoed {n} bytes"));
    wr.shutdown().await
}

// ---------------------------------------------------------------------------------------
// Sec-WebSocket-Accept = base64(sha1(key + GUID)) (RFC 6455 §4.2.2)

fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut input = Vec::with_capacity(key.len() + GUID.len());
    input.extend_from_slice(key);
    input.extend_from_slice(GUID);
    base64(&sha1(&input))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hi, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hi = hi.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((v >> (18 - 6 * i)) & 0x3F) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
