//! A small mesh on loopback for the data-path tests: apps written as hyper servers inside
//! the tests, inbound sidecars in front of them, an outbound listener in front of those.

#![allow(clippy::unwrap_used, reason = "a failing test panics")]
#![allow(dead_code, unreachable_pub, reason = "each test binary uses a part")]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_proxy::balance::{Algorithm, Balancer};
use mesh_proxy::discovery::{Endpoint, Local, Registry};
use mesh_proxy::http::{Body, Limits};
use mesh_proxy::inbound::{self, InboundConfig};
use mesh_proxy::metrics::Metrics;
use mesh_proxy::outbound::{self, OutboundConfig};
use mesh_proxy::{Protocol, Traffic};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// The bound on every test.
pub const LIMIT: Duration = Duration::from_secs(20);

/// An app: a hyper server (HTTP/1.1, h2c, upgrades, extended CONNECT) running `handler`.
pub struct App {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl App {
    pub async fn start<F, Fut>(handler: F) -> App
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // Dropped with the task: killing the app closes every connection too.
            let mut conns = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let handler = handler.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    // Extended CONNECT (RFC 8441) over h2c, for the tunnel tests.
                    builder.http2().enable_connect_protocol();
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        App { addr, task }
    }

    /// Kill the app: its listener and every connection close; returns once they have.
    pub async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running sidecar (inbound or outbound).
pub struct Sidecar {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

pub const MESH: &str = "m";

/// The in-process entry points of the inbounds the tests started, by listener address:
/// [`endpoint`] attaches them, so that outbounds take the local path (SPEC §1), unless
/// `MESH_TEST_LOCAL_PATH=tls` (`.ci/run` runs the suites both ways).
static LOCALS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<SocketAddr, Local>>> =
    std::sync::LazyLock::new(Default::default);

/// Whether outbounds take the local path in this run.
pub fn local_path() -> bool {
    std::env::var("MESH_TEST_LOCAL_PATH").map_or(true, |v| v != "tls")
}

/// Serve an HTTP inbound on `listener`, its local entry point registered for [`endpoint`].
pub fn serve_inbound(
    listener: TcpListener,
    cfg: InboundConfig,
    limits: Limits,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let server = inbound::InboundServer::new(cfg, limits, shutdown);
    LOCALS
        .lock()
        .unwrap()
        .insert(listener.local_addr().unwrap(), Local::Http(server.local()));
    tokio::spawn(server.serve(listener))
}

/// Serve a tcp inbound on `listener`, its local entry point registered for [`endpoint`].
pub fn serve_tcp_inbound(
    listener: TcpListener,
    cfg: mesh_proxy::tcp::TcpInboundConfig,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let server = mesh_proxy::tcp::TcpInboundServer::new(cfg, shutdown);
    LOCALS
        .lock()
        .unwrap()
        .insert(listener.local_addr().unwrap(), Local::Tcp(server.local()));
    tokio::spawn(server.serve(listener))
}

pub async fn inbound(service: &str, replica: u32, protocol: Protocol, app: SocketAddr) -> Sidecar {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let cfg = InboundConfig {
        mesh_name: MESH.into(),
        service: service.into(),
        replica,
        protocol,
        app: app.into(),
        metrics: Metrics::new(),
        rate_limit: (None).into(),
        tls: None,
        admitted: Default::default(),
    };
    let task = serve_inbound(listener, cfg, Limits::default(), shutdown.clone());
    Sidecar {
        addr,
        shutdown,
        task,
    }
}

pub struct OutboundOpts {
    pub protocol: Protocol,
    pub queue_timeout: Duration,
    pub algorithm: Algorithm,
    pub ingress: bool,
    pub limits: Limits,
    /// `timeout`, `retries`, breaker and `max_concurrent`; `load_balancer` and
    /// `queue_timeout` come from the fields above.
    pub traffic: Traffic,
    /// Where the outbound records; tests that read metrics pass a clone.
    pub metrics: Metrics,
}

impl Default for OutboundOpts {
    fn default() -> Self {
        OutboundOpts {
            protocol: Protocol::Http,
            queue_timeout: Duration::from_secs(3),
            algorithm: Algorithm::P2cEwma,
            ingress: false,
            limits: Limits::default(),
            traffic: Traffic::default(),
            metrics: Metrics::new(),
        }
    }
}

pub async fn outbound(registry: &Registry, service: &str, opts: OutboundOpts) -> Sidecar {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let balancer = Balancer::with_policy(
        service,
        opts.algorithm,
        opts.traffic.balance,
        registry.watch(service),
    );
    let cfg = OutboundConfig {
        mesh_name: MESH.into(),
        caller: if opts.ingress { "ingress" } else { "web" }.into(),
        service: service.into(),
        protocol: opts.protocol,
        traffic: Traffic {
            load_balancer: opts.algorithm,
            queue_timeout: opts.queue_timeout,
            ..opts.traffic
        },
        ingress: opts.ingress,
        routes: Default::default(),
        tls: None,
        metrics: opts.metrics,
    };
    let task = tokio::spawn(outbound::serve_with(
        listener,
        cfg,
        balancer,
        opts.limits,
        shutdown.clone(),
    ));
    Sidecar {
        addr,
        shutdown,
        task,
    }
}

/// The endpoint `service.replica` at `addr`, reached in process when its inbound was
/// started by [`serve_inbound`] or [`serve_tcp_inbound`] and [`local_path`] holds.
pub fn endpoint(service: &str, replica: u32, addr: SocketAddr) -> Endpoint {
    let endpoint = Endpoint::new(format!("{service}.{replica}"), addr);
    let local = LOCALS.lock().unwrap().get(&addr).cloned();
    match local {
        Some(local) if local_path() => endpoint.with_local(local),
        _ => endpoint,
    }
}

/// An HTTP/1.1 client connection (upgrades enabled).
pub async fn h1(addr: SocketAddr) -> http1::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// An h2c prior-knowledge client connection.
pub async fn h2(addr: SocketAddr) -> http2::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// One HTTP/1.1 GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Response<Incoming> {
    let mut client = h1(addr).await;
    let req = Request::get(path)
        .header("host", "api.test")
        .body(mesh_proxy::http::empty())
        .unwrap();
    client.send_request(req).await.unwrap()
}

/// The whole body as text.
pub async fn text(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A response with `body`.
pub fn respond(body: impl Into<Bytes>) -> Response<Body> {
    Response::new(mesh_proxy::http::full(body.into()))
}

/// An app answering every request with what it saw: method, version, host / authority,
/// the mesh headers, and the body it received; `x-replica` names it.
pub async fn echo_app(name: &'static str) -> App {
    App::start(move |req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let header = |n: &str| {
            parts
                .headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_else(|| "-".into())
        };
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into());
        let seen = format!(
            "{} {:?} host={} authority={} client={} attempt={} source={} version={} trace={} xff={} xfp={} foo={} path={}",
            parts.method,
            parts.version,
            header("host"),
            authority,
            header("x-mesh-client-id"),
            header("x-mesh-attempt"),
            header("x-mesh-source"),
            header("x-mesh-http-version"),
            header("traceparent"),
            header("x-forwarded-for"),
            header("x-forwarded-proto"),
            header("x-mesh-foo"),
            parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("-"),
        );
        let body = body.collect().await.unwrap().to_bytes();
        let mut response = respond(body);
        response
            .headers_mut()
            .insert("x-seen", seen.parse().unwrap());
        response
            .headers_mut()
            .insert("x-replica", name.parse().unwrap());
        response
    })
    .await
}

/// Registry + one inbound per app, registered as `api.<i>`.
pub async fn replicas(registry: &Registry, protocol: Protocol, apps: &[&App]) -> Vec<Sidecar> {
    let mut sidecars = Vec::new();
    let mut endpoints = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let sidecar = inbound("api", i as u32, protocol, app.addr).await;
        endpoints.push(endpoint("api", i as u32, sidecar.addr));
        sidecars.push(sidecar);
    }
    registry.set("api", endpoints);
    sidecars
}

/// A body fed through a channel: each `send` is one chunk, dropping the sender ends it.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(hyper::body::Frame::data(chunk)), rx))
    });
    (
        tx,
        mesh_proxy::http::boxed(http_body_util::StreamBody::new(stream)),
    )
}

/// The value of `key=` in an echo app's `x-seen`.
pub fn seen<'a>(seen: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    seen.split(' ')
        .find_map(|part| part.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key} in {seen}"))
}

/// A free loopback port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Poll `f` every few milliseconds until it gives `Some`, for at most `limit`; then panic
/// naming `what`. For state with no event to wait on, such as a counter another task
/// increments.
pub async fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        if let Some(value) = f() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
    }
}
