//! The floor of the sidecars' stack, for `mesh-bench --floor`: a bare two-hop proxy
//! built from the same parts as the mesh's data path (tokio's current-thread runtime, hyper's
//! HTTP/1.1 server and client, hyper's HTTP/2 client and server over rustls with the
//! mesh's TLS 1.3 configuration, mimalloc) and nothing else: no discovery, balancing,
//! retries, timeouts, metrics, header rules or authorization. What the mesh costs above
//! this process is what its own code costs; what this process costs is the price of the
//! stack on the machine.
//!
//! Usage: `mesh-floor <app-addr>`. It prints `floor=<addr>` (its HTTP/1.1 entry) on
//! stdout and serves until it is killed. It is not a product: it has no limits, no
//! error handling beyond a 502, and trusts its peer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::tls::{self, Ca, Identity};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<Bytes, hyper::Error>;

const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

fn main() -> anyhow::Result<()> {
    let app: SocketAddr = std::env::args()
        .nth(1)
        .context("usage: mesh-floor <app-addr>")?
        .parse()
        .context("app address")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(app))
}

async fn run(app: SocketAddr) -> anyhow::Result<()> {
    let ca = Ca::generate("floor")?;
    let server_id = Arc::new(Identity::new(ca.issue(
        "floor",
        "server",
        Duration::from_secs(3600),
    )?));
    let client_id = Arc::new(Identity::new(ca.issue(
        "floor",
        "client",
        Duration::from_secs(3600),
    )?));
    let server_tls = tls::server_config(&ca, server_id, &[tls::ALPN_H2])?;
    let client_tls = tls::client_config(&ca, client_id, &[tls::ALPN_H2])?;

    let inbound = TcpListener::bind("127.0.0.1:0").await?;
    let inbound_addr = inbound.local_addr()?;
    tokio::spawn(serve_inbound(inbound, server_tls, app));

    let stream = TcpStream::connect(inbound_addr).await?;
    stream.set_nodelay(true)?;
    let stream = tls::connect(client_tls, stream, "spiffe://floor/server").await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(conn);

    let outbound = TcpListener::bind("127.0.0.1:0").await?;
    println!("floor={}", outbound.local_addr()?);
    loop {
        let (stream, _) = outbound.accept().await?;
        stream.set_nodelay(true)?;
        let sender = sender.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let mut sender = sender.clone();
                async move {
                    let (mut parts, body) = req.into_parts();
                    let authority = parts
                        .headers
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("localhost")
                        .to_string();
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    parts.uri =
                        Uri::try_from(format!("http://{authority}{path}")).unwrap_or_default();
                    parts.version = Version::HTTP_2;
                    parts.headers.remove(hyper::header::HOST);
                    let req = Request::from_parts(parts, body.boxed());
                    Ok::<_, Infallible>(match sender.send_request(req).await {
                        Ok(response) => response.map(BodyExt::boxed),
                        Err(_) => bad_gateway(),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn serve_inbound(
    listener: TcpListener,
    config: Arc<tls::ServerConfig>,
    app: SocketAddr,
) -> anyhow::Result<()> {
    let pool: Arc<parking_lot::Mutex<Vec<hyper::client::conn::http1::SendRequest<Body>>>> =
        Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let config = Arc::clone(&config);
        let pool = Arc::clone(&pool);
        tokio::spawn(async move {
            let Ok((stream, _peer)) = tls::accept(config, stream).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let pool = Arc::clone(&pool);
                async move {
                    let (mut parts, body) = req.into_parts();
                    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    if let Some(authority) = parts.uri.authority() {
                        if let Ok(host) = authority.as_str().parse() {
                            parts.headers.insert(hyper::header::HOST, host);
                        }
                    }
                    parts.uri = Uri::try_from(path).unwrap_or_default();
                    parts.version = Version::HTTP_11;
                    let req = Request::from_parts(parts, body.boxed());
                    Ok::<_, Infallible>(match send_h1(&pool, app, req).await {
                        Some(response) => response.map(BodyExt::boxed),
                        None => bad_gateway(),
                    })
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_concurrent_streams(10_000)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request on an idle pooled connection to the app, or a new one; the connection
/// goes back with its response and is handed out again once it is ready.
async fn send_h1(
    pool: &parking_lot::Mutex<Vec<hyper::client::conn::http1::SendRequest<Body>>>,
    app: SocketAddr,
    req: Request<Body>,
) -> Option<Response<Incoming>> {
    let idle = {
        let mut idle = pool.lock();
        idle.retain(|s| !s.is_closed());
        let ready = idle.iter().position(|s| s.is_ready());
        ready.map(|i| idle.swap_remove(i))
    };
    let mut sender = match idle {
        Some(sender) => sender,
        None => {
            let stream = TcpStream::connect(app).await.ok()?;
            stream.set_nodelay(true).ok()?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(conn);
            sender
        }
    };
    let response = sender.send_request(req).await.ok()?;
    pool.lock().push(sender);
    Some(response)
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Empty::new()
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
