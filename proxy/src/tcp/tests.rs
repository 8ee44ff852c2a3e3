#![allow(clippy::unwrap_used, reason = "a failing test panics")]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::balance::Algorithm;
use crate::discovery::{Endpoint, Registry};

/// Generous bound for anything that should happen promptly.
const PATIENCE: Duration = Duration::from_secs(5);

/// One mesh CA for the tests of this module: every hop here is mutual TLS, as in a mesh
/// with the default `tls = "mutual"`.
fn ca() -> &'static tls::Ca {
    static CA: std::sync::OnceLock<tls::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| tls::Ca::generate("m").unwrap())
}

fn identity(service: &str) -> Arc<tls::Identity> {
    Arc::new(tls::Identity::new(
        ca().issue("m", service, tls::DEFAULT_LEAF_LIFETIME)
            .unwrap(),
    ))
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// An app that greets with `prefix` at once, reads its whole input (until the client's
/// write shutdown), then echoes it and closes. Answering only after EOF is what needs
/// half-close; the greeting tells a test the connection is through both sidecars.
async fn echo_app(prefix: &'static str) -> SocketAddr {
    let listener = bind().await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                stream.write_all(prefix.as_bytes()).await.unwrap();
                let mut input = Vec::new();
                stream.read_to_end(&mut input).await.unwrap();
                stream.write_all(&input).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// An inbound sidecar in front of `app`.
async fn inbound(app: SocketAddr, shutdown: &CancellationToken) -> (SocketAddr, JoinHandle<()>) {
    let listener = bind().await;
    let addr = listener.local_addr().unwrap();
    let cfg = TcpInboundConfig {
        mesh_name: "m".into(),
        service: "api".into(),
        replica: 0,
        app: app.into(),
        metrics: Metrics::new(),
        rate_limit: (None).into(),
        tls: Some(tls::server_config(ca(), identity("api"), &[]).unwrap()),
        admitted: crate::live::Live::new(["web".to_string()].into()),
    };
    let task = tokio::spawn(serve_inbound(listener, cfg, shutdown.clone()));
    (addr, task)
}

/// An outbound listener for service `api` over `endpoints`.
async fn outbound(
    endpoints: Vec<Endpoint>,
    algorithm: Algorithm,
    queue_timeout: Duration,
    shutdown: &CancellationToken,
) -> (SocketAddr, JoinHandle<()>) {
    let registry = Registry::new();
    registry.set("api", endpoints);
    let balancer = Balancer::new("api", algorithm, registry.watch("api"));
    let traffic = Traffic {
        load_balancer: algorithm,
        queue_timeout,
        ..Traffic::default()
    };
    let listener = bind().await;
    let addr = listener.local_addr().unwrap();
    let cfg = TcpOutboundConfig {
        mesh_name: "m".into(),
        caller: "web".into(),
        service: "api".into(),
        traffic,
        metrics: Metrics::new(),
        routes: Default::default(),
        tls: Some(tls::client_config(ca(), identity("web"), &[]).unwrap()),
    };
    let task = tokio::spawn(serve_outbound(listener, cfg, balancer, shutdown.clone()));
    (addr, task)
}

fn endpoint(replica: usize, addr: SocketAddr) -> Endpoint {
    Endpoint::new(format!("api.{replica}"), addr)
}

/// Send `request`, shut down the write half, read the whole reply.
async fn call(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    reply
}

async fn read_greeting(stream: &mut TcpStream, greeting: &[u8]) {
    let mut buf = vec![0; greeting.len()];
    timeout(PATIENCE, stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, greeting);
}

async fn shut_down(shutdown: CancellationToken, tasks: Vec<JoinHandle<()>>) {
    shutdown.cancel();
    for task in tasks {
        timeout(PATIENCE, task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn echo_through_outbound_and_inbound_with_half_close() {
    let shutdown = CancellationToken::new();
    let app = echo_app("").await;
    let (inbound_addr, inbound_task) = inbound(app, &shutdown).await;
    let (outbound_addr, outbound_task) = outbound(
        vec![endpoint(0, inbound_addr)],
        Algorithm::P2cEwma,
        Duration::from_secs(1),
        &shutdown,
    )
    .await;
    // Big enough to need several reads and writes in each direction.
    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply = call(outbound_addr, &request).await;
    assert_eq!(reply.len(), request.len());
    assert!(reply == request);
    shut_down(shutdown, vec![outbound_task, inbound_task]).await;
}

#[tokio::test]
async fn connections_spread_over_two_endpoints() {
    let shutdown = CancellationToken::new();
    let (in0, t0) = inbound(echo_app("zero:").await, &shutdown).await;
    let (in1, t1) = inbound(echo_app("one:").await, &shutdown).await;
    let (out, t) = outbound(
        vec![endpoint(0, in0), endpoint(1, in1)],
        Algorithm::RoundRobin,
        Duration::from_secs(1),
        &shutdown,
    )
    .await;
    let mut zero = 0;
    let mut one = 0;
    for _ in 0..6 {
        match call(out, b"x").await.as_slice() {
            b"zero:x" => zero += 1,
            b"one:x" => one += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!((zero, one), (3, 3));
    shut_down(shutdown, vec![t, t0, t1]).await;
}

#[tokio::test]
async fn no_endpoint_closes_without_data_after_queue_timeout() {
    let shutdown = CancellationToken::new();
    let queue_timeout = Duration::from_millis(200);
    let (out, t) = outbound(Vec::new(), Algorithm::P2cEwma, queue_timeout, &shutdown).await;
    let start = Instant::now();
    let mut stream = TcpStream::connect(out).await.unwrap();
    let mut reply = Vec::new();
    // The connection is closed without data (a reset would also do; EOF is what we send).
    let read = timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0)), "{read:?}");
    assert!(start.elapsed() >= queue_timeout);
    shut_down(shutdown, vec![t]).await;
}

#[tokio::test]
async fn connect_failure_moves_on_to_the_other_endpoint() {
    let shutdown = CancellationToken::new();
    // A port nobody listens on: bound, then released.
    let dead = bind().await.local_addr().unwrap();
    let (alive, t0) = inbound(echo_app("alive:").await, &shutdown).await;
    let (out, t) = outbound(
        vec![endpoint(0, dead), endpoint(1, alive)],
        Algorithm::RoundRobin,
        Duration::from_secs(1),
        &shutdown,
    )
    .await;
    for _ in 0..4 {
        assert_eq!(call(out, b"x").await, b"alive:x");
    }
    shut_down(shutdown, vec![t, t0]).await;
}

#[tokio::test]
async fn every_connect_failing_closes_without_data() {
    let shutdown = CancellationToken::new();
    let dead = bind().await.local_addr().unwrap();
    let (out, t) = outbound(
        vec![endpoint(0, dead)],
        Algorithm::P2cEwma,
        Duration::from_millis(200),
        &shutdown,
    )
    .await;
    let mut stream = TcpStream::connect(out).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut reply = Vec::new();
    // Closed without data: EOF, or a reset since the proxy never read what was sent.
    let read = timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(reply.is_empty(), "{reply:?}");
    assert!(
        matches!(&read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    shut_down(shutdown, vec![t]).await;
}

#[tokio::test]
async fn shutdown_stops_accepting_but_lets_open_connections_finish() {
    let shutdown = CancellationToken::new();
    let app = echo_app("ready:").await;
    let (inbound_addr, inbound_task) = inbound(app, &shutdown).await;
    let (out, outbound_task) = outbound(
        vec![endpoint(0, inbound_addr)],
        Algorithm::P2cEwma,
        Duration::from_secs(1),
        &shutdown,
    )
    .await;
    let mut open = TcpStream::connect(out).await.unwrap();
    open.write_all(b"before ").await.unwrap();
    read_greeting(&mut open, b"ready:").await;

    shutdown.cancel();
    // New connections are refused at once.
    let refused = async {
        loop {
            if TcpStream::connect(out).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    timeout(PATIENCE, refused).await.unwrap();
    // Neither server returns while a connection is open.
    let mut outbound_task = outbound_task;
    let mut inbound_task = inbound_task;
    assert!(
        timeout(Duration::from_millis(100), &mut outbound_task)
            .await
            .is_err(),
        "returned with a connection open"
    );
    assert!(
        timeout(Duration::from_millis(100), &mut inbound_task)
            .await
            .is_err(),
        "returned with a connection open"
    );

    // The open connection still works to its end. (The sleep above can only show that
    // the servers did not return early; there is no event to wait for.)
    open.write_all(b"after").await.unwrap();
    open.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(PATIENCE, open.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"before after");
    drop(open);
    timeout(PATIENCE, outbound_task).await.unwrap().unwrap();
    timeout(PATIENCE, inbound_task).await.unwrap().unwrap();
}

#[tokio::test]
async fn dropping_the_server_closes_open_connections() {
    let shutdown = CancellationToken::new();
    let app = echo_app("ready:").await;
    let (inbound_addr, inbound_task) = inbound(app, &shutdown).await;
    let (out, outbound_task) = outbound(
        vec![endpoint(0, inbound_addr)],
        Algorithm::P2cEwma,
        Duration::from_secs(1),
        &shutdown,
    )
    .await;
    let mut open = TcpStream::connect(out).await.unwrap();
    read_greeting(&mut open, b"ready:").await;
    // What the caller's drain timeout does: give up on the serve future.
    shutdown.cancel();
    outbound_task.abort();
    inbound_task.abort();
    let mut reply = Vec::new();
    let read = timeout(PATIENCE, open.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(read.is_err() || reply.is_empty(), "{read:?} {reply:?}");
}
