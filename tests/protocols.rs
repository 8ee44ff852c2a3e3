//! Protocols through the whole data path (SPEC §1): a caller's outbound → the callee's
//! inbound → a real `mesh-test-app`. h2c multiplexing, gRPC trailers, streaming bodies both
//! ways, HTTP/1.1 Upgrade, HTTP/2 extended CONNECT, balancing over replicas, the mesh's own errors from real apps,
//! hostile clients, and a request that waits out its upstream's restart.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(30);

/// The bound on one network operation of a test (a connect, a response head, a frame).
const NET: Duration = Duration::from_secs(10);

/// The outbound address a caller printed as `<key>=http://ADDR`.
fn outbound_as(mesh: &MeshProc, caller: &str, key: &str) -> String {
    let line = mesh.wait_line(&format!("{caller}.0 | {key}="), T);
    field_of(&line, key)
        .trim_start_matches("http://")
        .to_string()
}

/// The outbound address a caller printed as `url=http://ADDR`.
fn outbound(mesh: &MeshProc, caller: &str) -> String {
    outbound_as(mesh, caller, "url")
}

/// `api` (the test app, with `api_extra` in its table) and a `caller` that has it as
/// its only upstream and prints its URL.
fn api_and_caller(api_extra: &str) -> Project {
    Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]
{api_extra}

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; exec sleep 1000"]
port = "none"
upstreams = ["api"]
"#,
        app = test_app()
    ))
}

/// Wait until `api` answers through the outbound `out`.
fn wait_serving(out: &str) {
    eventually("api to answer through the outbound", T, || {
        get(out, "/whoami").ok().filter(|r| r.status == 200)
    });
}

/// `fut`, or a panic naming `what` after [`NET`] (scaled by the patience factor).
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(patience(NET), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {NET:?}: {what}"),
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

/// A request body fed piece by piece through a channel: no length, ends when the sender
/// is dropped (HTTP/1.1 sends it chunked).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ChannelBody(rx).boxed())
}

async fn connect(addr: &str) -> TokioIo<tokio::net::TcpStream> {
    let tcp = within(
        &format!("connect to {addr}"),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    TokioIo::new(tcp)
}

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`.
async fn h2c(addr: &str) -> http2::SendRequest<Body> {
    let io = connect(addr).await;
    let (send, conn) = within("h2 handshake", http2::handshake(TokioExecutor::new(), io))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// An HTTP/1.1 connection to `addr`.
async fn h1(addr: &str) -> http1::SendRequest<Body> {
    let io = connect(addr).await;
    let (send, conn) = within("h1 handshake", http1::handshake(io))
        .await
        .expect("h1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// The next data frame of `body` (trailers are skipped), `None` at its end.
async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = within("a response body frame", body.frame()).await?;
        let frame = frame.expect("response body frame");
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return Some(data);
            }
        }
    }
}

fn header<'a>(r: &'a Response<Incoming>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn json_of(r: Response<Incoming>) -> serde_json::Value {
    let body = within("a response body", r.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_multiplexes_concurrent_requests_and_speaks_h2_to_the_app() {
    let p = api_and_caller("");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    wait_serving(&out);

    let send = h2c(&out).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Eight slow requests and eight quick ones, all in flight at once on one connection.
    for i in 0..16 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i % 2 == 0 { "/sleep/500" } else { "/headers" };
            let req = Request::get(format!("http://api.example:8080{path}"))
                .body(empty())
                .expect("request");
            let r = within("an h2 response", send.send_request(req))
                .await
                .expect("h2 response");
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(r.version(), hyper::Version::HTTP_2);
            if path == "/headers" {
                Some(json_of(r).await)
            } else {
                let body = within("a body", r.into_body().collect())
                    .await
                    .expect("body")
                    .to_bytes();
                assert_eq!(&body[..], b"slept 500");
                None
            }
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        if let Some(h) = t.await.expect("request task") {
            seen.push(h);
        }
    }
    let elapsed = started.elapsed();
    // One after another the sleeps alone would take 4 s.
    assert!(
        elapsed < Duration::from_millis(2500),
        "16 requests on one h2 connection took {elapsed:?}: not multiplexed"
    );
    assert_eq!(seen.len(), 8);
    for h in &seen {
        assert_eq!(
            h["_version"], "HTTP/2.0",
            "the app is spoken to in the caller's version: {h}"
        );
        assert_eq!(
            h["_authority"], "api.example:8080",
            ":authority is forwarded unchanged: {h}"
        );
        assert_eq!(h["x-mesh-client-id"], "spiffe://t/caller", "{h}");
        assert_eq!(h["_method"], "GET", "{h}");
        assert_eq!(h["_uri"], "/headers", "{h}");
    }

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_comes_back_in_trailers() {
    let p = api_and_caller(r#"protocol = "grpc""#);
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");

    // A length-prefixed gRPC message (uncompressed, 5 bytes).
    let message: &[u8] = b"\x00\x00\x00\x00\x05hello";
    let mut send = h2c(&out).await;
    let req = Request::post(format!("http://{out}/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-grpc-status", "5")
        .body(full(message))
        .expect("request");
    // The first request may wait up to queue_timeout for api to become ready.
    let r = within("the grpc response", send.send_request(req))
        .await
        .expect("grpc response");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), Some("application/grpc"));
    assert_eq!(header(&r, "x-mesh-error"), None);
    let collected = within("the grpc body", r.into_body().collect())
        .await
        .expect("grpc body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"5"[..]),
        "{trailers:?}"
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"ok"[..]),
        "{trailers:?}"
    );
    assert_eq!(&collected.to_bytes()[..], message);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

/// POST `/echo` with a body sent in pieces, each only after the previous one came back:
/// this deadlocks unless every hop streams the request body and the response body.
async fn echo_piece_by_piece<F>(send: F, pieces: usize)
where
    F: FnOnce(Request<Body>) -> Pin<Box<dyn Future<Output = Response<Incoming>> + Send>>,
{
    let (tx, body) = channel_body();
    let req = Request::post("/echo")
        .header("content-type", "application/x-pieces")
        .body(body)
        .expect("request");
    tx.send(Bytes::from("piece 0;")).await.expect("send piece");
    let r = within("the echo response head", send(req)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), Some("application/x-pieces"));
    let mut body = r.into_body();
    for i in 0..pieces {
        let want = format!("piece {i};");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let data = next_data(&mut body)
                .await
                .unwrap_or_else(|| panic!("echo ended before piece {i}"));
            got.extend_from_slice(&data);
        }
        assert_eq!(String::from_utf8_lossy(&got), want);
        if i + 1 < pieces {
            tx.send(Bytes::from(format!("piece {};", i + 1)))
                .await
                .expect("send piece");
        }
    }
    drop(tx);
    assert_eq!(
        next_data(&mut body).await,
        None,
        "the echo ends with the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_over_http1_and_h2c() {
    let p = api_and_caller("");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    wait_serving(&out);

    // HTTP/1.1, chunked.
    let mut send = h1(&out).await;
    let host = out.clone();
    echo_piece_by_piece(
        move |mut req| {
            req.headers_mut()
                .insert("host", host.parse().expect("host header"));
            Box::pin(async move { send.send_request(req).await.expect("h1 response") })
        },
        5,
    )
    .await;

    // h2c.
    let mut send = h2c(&out).await;
    let uri: hyper::Uri = format!("http://{out}/echo").parse().expect("uri");
    echo_piece_by_piece(
        move |mut req| {
            *req.uri_mut() = uri;
            Box::pin(async move { send.send_request(req).await.expect("h2 response") })
        },
        5,
    )
    .await;

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

/// Read `/stream?n=5&ms=200` frame by frame: returns each piece with its arrival time
/// relative to the response head.
async fn stream_arrivals(r: Response<Incoming>) -> Vec<(Duration, String)> {
    assert_eq!(r.status(), 200);
    let head = Instant::now();
    let mut body = r.into_body();
    let mut arrivals = Vec::new();
    while let Some(data) = next_data(&mut body).await {
        arrivals.push((head.elapsed(), String::from_utf8_lossy(&data).into_owned()));
    }
    arrivals
}

fn assert_streamed(arrivals: &[(Duration, String)], how: &str) {
    let text: String = arrivals.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        text, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n",
        "{how}: {arrivals:?}"
    );
    let (first_at, first) = &arrivals[0];
    let (last_at, _) = &arrivals[arrivals.len() - 1];
    assert_eq!(
        first, "chunk 0\n",
        "{how}: the first chunk alone: {arrivals:?}"
    );
    // The app writes the last chunk 800 ms after the first; a buffering hop would hand
    // them over together.
    assert!(
        *last_at >= *first_at + Duration::from_millis(600),
        "{how}: the first chunk arrived with the rest: {arrivals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_stream_over_http1_and_h2c() {
    let p = api_and_caller("");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    wait_serving(&out);

    let mut send = h1(&out).await;
    let req = Request::get("/stream?n=5&ms=200")
        .header("host", out.as_str())
        .body(empty())
        .expect("request");
    let r = within("the stream head", send.send_request(req))
        .await
        .expect("h1 response");
    assert_streamed(&stream_arrivals(r).await, "HTTP/1.1");

    let mut send = h2c(&out).await;
    let req = Request::get(format!("http://{out}/stream?n=5&ms=200"))
        .body(empty())
        .expect("request");
    let r = within("the stream head", send.send_request(req))
        .await
        .expect("h2 response");
    assert_streamed(&stream_arrivals(r).await, "h2c");

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_and_echoes_both_ways() {
    let p = api_and_caller("");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    wait_serving(&out);

    let mut s = std::net::TcpStream::connect(&out).expect("connect");
    s.set_read_timeout(Some(patience(NET))).expect("timeout");
    s.set_write_timeout(Some(patience(NET))).expect("timeout");
    // The key and accept value of RFC 6455 §1.3.
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {out}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("write upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read the 101 head");
        assert_eq!(
            n,
            1,
            "closed during the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(
        head.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );
    for i in 0..5 {
        let msg = format!("message {i} from the client");
        s.write_all(msg.as_bytes()).expect("write");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).expect("read the echo");
        assert_eq!(String::from_utf8_lossy(&back), msg);
    }
    // Closing our side ends the tunnel: the app closes its side, and so does the mesh.
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to the end");
    assert!(rest.is_empty(), "{rest:?}");
    drop(s);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

/// The ingress address of `service`, from mesh's start-up line.
fn ingress(mesh: &MeshProc, service: &str) -> String {
    let line = mesh.wait_line(&format!("ingress of `{service}` on "), T);
    line.rsplit(" on ").next().unwrap_or("").trim().to_string()
}

/// An h2c connection to `addr` that has seen the server's SETTINGS and checked that they
/// enable extended CONNECT (RFC 8441 §3: a client waits for the setting before using
/// `:protocol`): one GET first, while the connection is driven here, then the
/// connection goes to its own task.
async fn h2c_settled(addr: &str) -> http2::SendRequest<Body> {
    let io = connect(addr).await;
    let (mut send, conn) = within("h2 handshake", http2::handshake(TokioExecutor::new(), io))
        .await
        .expect("h2 handshake");
    let mut conn = Box::pin(conn);
    let exchange = async {
        let req = Request::get("http://api.test/whoami")
            .body(empty())
            .expect("request");
        let r = send.send_request(req).await.expect("first response");
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.expect("first body");
    };
    tokio::select! {
        () = within("the first exchange", exchange) => {}
        _ = conn.as_mut() => panic!("the connection closed during the first exchange"),
    }
    assert!(
        conn.is_extended_connect_protocol_enabled(),
        "{addr} does not send SETTINGS_ENABLE_CONNECT_PROTOCOL"
    );
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// An HTTP/2 extended CONNECT (`:protocol` websocket) to `/ws`, through `addr`, kept
/// open across three of the service's 300 ms `timeout`s, echoing bytes all along; then
/// half-closed by the client, which sees the app's end of stream.
async fn tunnel_echoes_past_the_timeout(addr: &str) {
    let mut send = h2c_settled(addr).await;
    let mut req = Request::connect("http://api.test/ws")
        .body(empty())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut r = within("the CONNECT response", send.send_request(req))
        .await
        .expect("CONNECT response");
    assert_eq!(r.status(), 200, "{addr}");
    assert_eq!(header(&r, "x-protocol"), Some("websocket"), "{addr}");
    assert_eq!(header(&r, "x-replica"), Some("api.0"), "{addr}");
    let tunnel = within("the tunnel", hyper::upgrade::on(&mut r))
        .await
        .expect("upgraded stream");
    let mut io = TokioIo::new(tunnel);
    let mut rounds = 0;
    while rounds < 4 {
        let msg = format!("message {rounds} through {addr} \u{0}\u{ff}");
        within("a write", io.write_all(msg.as_bytes()))
            .await
            .expect("write");
        let mut back = vec![0u8; msg.len()];
        within("the echo", io.read_exact(&mut back))
            .await
            .expect("read the echo");
        assert_eq!(String::from_utf8_lossy(&back), msg);
        rounds += 1;
        if rounds < 4 {
            // The tunnel must stay open past the timeout: a request to `/sleep/1000` on the
            // same connection comes back 504, which proves a whole timeout went by.
            let req = Request::get("http://api.test/sleep/1000")
                .body(empty())
                .expect("request");
            let r = within("the timed-out request", send.send_request(req))
                .await
                .expect("response");
            assert_eq!(r.status(), 504, "{addr}");
        }
    }
    assert!(rounds >= 4, "{rounds} rounds");
    // Half-close: our end of stream reaches the app, which ends its side in turn.
    within("shutdown", io.shutdown()).await.expect("shutdown");
    let mut rest = Vec::new();
    within("the end of the tunnel", io.read_to_end(&mut rest))
        .await
        .expect("read to the end");
    assert!(rest.is_empty(), "{rest:?}");
    // The shared connection still serves requests.
    let req = Request::get("http://api.test/whoami")
        .body(empty())
        .expect("request");
    let r = within("a request after the tunnel", send.send_request(req))
        .await
        .expect("response after the tunnel");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_extended_connect_tunnels_through_ingress_and_outbound_past_the_timeout() {
    let p = api_and_caller(
        r#"expose = "127.0.0.1:0"
traffic = { timeout = "300ms" }"#,
    );
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    let ing = ingress(&mesh, "api");
    wait_serving(&out);

    for addr in [&out, &ing] {
        // The timeout is in force for requests...
        let r = get(addr, "/sleep/1000").expect("request");
        assert_eq!(r.status, 504, "{addr}");
        // ...but not for the tunnel, in both places at once.
    }
    tokio::join!(
        tunnel_echoes_past_the_timeout(&out),
        tunnel_echoes_past_the_timeout(&ing)
    );

    // A plain CONNECT (a proxy tunnel, no `:protocol`) is refused, over HTTP/2 and
    // HTTP/1.1.
    let mut send = h2c(&out).await;
    let req = Request::connect("example.com:443")
        .body(empty())
        .expect("request");
    let r = within("the CONNECT response", send.send_request(req))
        .await
        .expect("CONNECT response");
    assert_eq!(r.status(), 405);
    let head = raw_exchange(
        &ing,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_balancer_spreads_concurrent_load_over_replicas() {
    let p = api_and_caller("replicas = 2\nenv = { TEST_APP_LOG = \"1\" }");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    let send = h2c(&out).await;

    // Both replicas are endpoints: concurrent requests reach each of them.
    let mut round = 0;
    loop {
        round += 1;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::get(format!("http://api/sleep/{}", 20))
                    .body(empty())
                    .expect("request");
                within("a response", send.send_request(req))
                    .await
                    .expect("response")
                    .status()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), 200);
        }
        if mesh.count("test-app api.0 GET") > 0 && mesh.count("test-app api.1 GET") > 0 {
            break;
        }
        assert!(round < 100, "one replica never answered");
    }
    let before = [
        mesh.count("test-app api.0 GET"),
        mesh.count("test-app api.1 GET"),
    ];

    // 100 requests, ten in flight at a time. With equal latencies p2c-ewma picks the
    // endpoint with the lower (latency × in-flight) score, so while requests overlap
    // neither replica can take them all; each must get at least 10 %.
    for _wave in 0..10 {
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::get("http://api/sleep/30")
                    .body(empty())
                    .expect("request");
                within("a response", send.send_request(req))
                    .await
                    .expect("response")
                    .status()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), 200);
        }
    }
    let counts = eventually("every request to be logged by an app", T, || {
        // Over h2 the app logs the absolute URI, `http://api/sleep/30`.
        let served = |replica: &str| {
            mesh.output()
                .iter()
                .filter(|l| l.contains(&format!("test-app {replica} GET ")))
                .filter(|l| l.contains("/sleep/30 "))
                .count()
        };
        let c = [served("api.0"), served("api.1")];
        (c[0] + c[1] == 100).then_some(c)
    });
    assert!(
        counts[0] >= 10 && counts[1] >= 10,
        "api.0 served {}, api.1 served {} of 100 (warm-up: {before:?})",
        counts[0],
        counts[1]
    );

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_errors_from_real_apps_are_named() {
    let p = Project::new(&format!(
        r#"
[services.api]
command = [{app:?}]

[services.deaf]
command = ["sleep", "1000"]
health = {{ exec = ["true"] }}

[services.rpc]
command = [{app:?}]
protocol = "grpc"
health = {{ exec = ["false"] }}
traffic = {{ queue_timeout = "200ms" }}

[services.caller]
command = ["sh", "-c", "echo url=$API_URL; echo deaf=$DEAF_URL; echo rpc=$RPC_URL; exec sleep 1000"]
port = "none"
upstreams = ["api", "deaf", "rpc"]
"#,
        app = test_app()
    ));
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    let deaf = outbound_as(&mesh, "caller", "deaf");
    let rpc = outbound_as(&mesh, "caller", "rpc");
    wait_serving(&out);

    let assert_mesh_error = |r: &support::Response, kind: &str, status: u16, prefix: &str| {
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.header("x-mesh-error"), Some(kind), "{r:?}");
        assert_eq!(r.header("content-type"), Some("text/plain"), "{r:?}");
        assert!(r.body.starts_with(prefix), "{r:?}");
        assert_eq!(r.body.trim_end_matches('\n').lines().count(), 1, "{r:?}");
    };

    // The app closes the connection without answering a POST: not retried.
    let r = http(&out, "POST", "/close", &[], "a body").expect("request");
    assert_mesh_error(
        &r,
        "reset",
        502,
        "mesh: reset: service=api tried=api.0 attempts=1: ",
    );
    // A GET without a body is retried by the default rule, twice, on the only replica.
    let r = get(&out, "/close").expect("request");
    assert_mesh_error(
        &r,
        "reset",
        502,
        "mesh: reset: service=api tried=api.0,api.0,api.0 attempts=3: ",
    );

    // A replica that is ready (its exec check passes) but listens on nothing: the
    // inbound cannot connect to the app. A connect failure is retried whatever the
    // method, and takes the endpoint out for 1 s, then 2 s: the second try comes after
    // about 1 s, a third only if the endpoint is back before queue_timeout (3 s) runs out,
    // which is a photo finish. So: at least two tries, the last failure reported.
    let r = http(&deaf, "POST", "/", &[], "a body").expect("request");
    assert_mesh_error(
        &r,
        "connect-failed",
        502,
        "mesh: connect-failed: service=deaf tried=deaf.0,deaf.0",
    );
    assert!(r.body.contains(": deaf.0: "), "{r:?}");

    // The grpc form: a trailers-only response.
    let mut send = h2c(&rpc).await;
    let req = Request::post(format!("http://{rpc}/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\x00\x00\x00\x00\x00"[..]))
        .expect("request");
    let started = Instant::now();
    let r = within("the grpc error", send.send_request(req))
        .await
        .expect("grpc response");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "waited out queue_timeout"
    );
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-mesh-error"), Some("no-endpoints"));
    assert_eq!(header(&r, "grpc-status"), Some("14"), "{:?}", r.headers());
    let message = header(&r, "grpc-message")
        .expect("grpc-message")
        .to_string();
    assert!(message.contains("no-endpoints"), "{message}");
    assert!(
        message.contains("service=rpc tried=none attempts=0"),
        "{message}"
    );
    let collected = within("the grpc body", r.into_body().collect())
        .await
        .expect("body");
    assert!(collected.to_bytes().is_empty(), "trailers-only: no body");

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

/// Send `bytes` on a fresh connection and read what comes back until the server closes.
fn raw_exchange(addr: &str, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(patience(NET))).expect("timeout");
    s.set_write_timeout(Some(patience(NET))).expect("timeout");
    // The server may answer and close before it has read everything: a write error then
    // is expected, the answer is still there to read.
    let _ = s.write_all(bytes);
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer to a hostile request: {e}"),
        }
    }
    String::from_utf8_lossy(&back).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_and_the_outbound_keeps_serving() {
    let p = api_and_caller("");
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    wait_serving(&out);

    // A client that sends half a request line and stalls. It runs meanwhile.
    let stalled = {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(&out).expect("connect");
            s.set_read_timeout(Some(patience(Duration::from_secs(20))))
                .expect("timeout");
            s.write_all(b"GET /who").expect("write");
            let started = Instant::now();
            let mut buf = [0u8; 1024];
            let result = s.read(&mut buf);
            (started.elapsed(), result.map(|n| buf[..n].to_vec()))
        })
    };

    // A 100 KiB header.
    let big = format!(
        "GET /whoami HTTP/1.1\r\nHost: {out}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = raw_exchange(&out, big.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "{:?}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(get(&out, "/whoami").expect("request").status, 200);

    // Garbage.
    let answer = raw_exchange(&out, b"HELLO\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert_eq!(get(&out, "/whoami").expect("request").status, 200);

    let (elapsed, result) = stalled.join().expect("stalled client");
    match result {
        // Closed, possibly after a 408.
        Ok(bytes) => assert!(
            bytes.is_empty() || bytes.starts_with(b"HTTP/1.1 408 "),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        ),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the stalled client was not disconnected after {elapsed:?}: {e}"
        ),
    }
    assert!(
        elapsed <= patience(Duration::from_secs(15)),
        "the stalled client was disconnected only after {elapsed:?}"
    );
    assert_eq!(get(&out, "/whoami").expect("request").status, 200);

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_out_its_upstreams_restart() {
    let p = api_and_caller(r#"backoff = { initial = "100ms", max = "100ms" }"#);
    let mut mesh = p.up(&[]);
    let out = outbound(&mesh, "caller");
    wait_serving(&out);
    let victim = eventually("api.0's pid", T, || {
        pids_of(&mesh, "mesh-test-app", "api", 0).pop()
    });

    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill api.0");
    let r = get(&out, "/whoami").expect("request");
    assert_eq!(
        r.status,
        200,
        "{r:?}\nmesh output:\n{}",
        mesh.output().join("\n")
    );
    assert_eq!(r.body, "api.0");
    mesh.wait_line("api.0 was killed by signal 9", T);
    let replacement = eventually("api.0's new pid", T, || {
        pids_of(&mesh, "mesh-test-app", "api", 0).pop()
    });
    assert_ne!(replacement, victim);

    let mut statuses = BTreeMap::new();
    for _ in 0..5 {
        *statuses
            .entry(get(&out, "/whoami").expect("request").status)
            .or_insert(0) += 1;
    }
    assert_eq!(statuses, BTreeMap::from([(200, 5)]));

    mesh.signal(Signal::SIGTERM);
    assert_eq!(mesh.exit_code(T), 0);
}
