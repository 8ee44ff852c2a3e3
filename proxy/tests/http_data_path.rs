//! The HTTP data path through outbound → inbound → app: versions, Host and identity,
//! streaming, trailers, upgrades, load spreading.

#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::Protocol;
use mesh_proxy::balance::Algorithm;
use mesh_proxy::discovery::Registry;
use mesh_proxy::http::{Body, boxed, empty, full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use support::*;

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_get_and_post_keep_host_and_set_identity() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        let mut client = h1(out.addr).await;
        let req = Request::get("/hello?x=1")
            .header("host", "api.test:8080")
            .header("x-mesh-client-id", "forged")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .body(empty())
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let s = response.headers()["x-seen"].to_str().unwrap().to_string();
        assert!(s.starts_with("GET HTTP/1.1 host=api.test:8080 "), "{s}");
        assert_eq!(seen(&s, "client"), "spiffe://m/web");
        assert_eq!(seen(&s, "attempt"), "1");
        assert_eq!(seen(&s, "source"), "-");
        assert_eq!(seen(&s, "version"), "-");
        assert_eq!(seen(&s, "path"), "/hello?x=1");
        // A traceparent is created when absent: 00-<32 hex>-<16 hex>-01.
        let trace: Vec<&str> = seen(&s, "trace").split('-').collect();
        assert_eq!(trace.len(), 4, "{s}");
        assert_eq!(
            (trace[0], trace[1].len(), trace[2].len(), trace[3]),
            ("00", 32, 16, "01")
        );
        text(response).await;

        // Keep-alive: a POST on the same connection, with a traceparent kept unchanged.
        let req = Request::post("/submit")
            .header("host", "api.test:8080")
            .header("traceparent", TRACE)
            .body(full("payload"))
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let s = response.headers()["x-seen"].to_str().unwrap().to_string();
        assert!(s.starts_with("POST HTTP/1.1 host=api.test:8080 "), "{s}");
        assert_eq!(seen(&s, "trace"), TRACE);
        assert_eq!(text(response).await, "payload");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_reaches_the_app_in_http2_with_its_authority() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        let client = h2(out.addr).await;
        let mut requests = Vec::new();
        // Several streams at once on one connection.
        for i in 0..5 {
            let mut client = client.clone();
            requests.push(tokio::spawn(async move {
                let req = Request::post(format!("http://api.test:9000/h2/{i}"))
                    .body(full(format!("body {i}")))
                    .unwrap();
                client.ready().await.unwrap();
                let response = client.send_request(req).await.unwrap();
                let s = response.headers()["x-seen"].to_str().unwrap().to_string();
                (s, text(response).await)
            }));
        }
        for (i, request) in requests.into_iter().enumerate() {
            let (s, body) = request.await.unwrap();
            assert!(s.starts_with("POST HTTP/2.0 "), "{s}");
            assert_eq!(seen(&s, "authority"), "api.test:9000");
            assert_eq!(seen(&s, "client"), "spiffe://m/web");
            assert_eq!(seen(&s, "path"), format!("/h2/{i}"));
            assert_eq!(body, format!("body {i}"));
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_strips_mesh_headers_and_adds_forwarded() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let opts = OutboundOpts {
            ingress: true,
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        let mut client = h1(out.addr).await;
        let req = Request::get("/")
            .header("host", "shop.example")
            .header("x-mesh-foo", "outside")
            .header("x-mesh-attempt", "7")
            .header("x-forwarded-for", "10.0.0.1")
            .body(empty())
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        let s = response.headers()["x-seen"].to_str().unwrap().to_string();
        assert_eq!(seen(&s, "foo"), "-");
        assert_eq!(seen(&s, "attempt"), "1");
        assert_eq!(seen(&s, "client"), "spiffe://m/ingress");
        assert_eq!(seen(&s, "xfp"), "http");
        // "10.0.0.1, 127.0.0.1" is one header value; `seen` splits on spaces.
        assert!(s.contains("xff=10.0.0.1, 127.0.0.1 "), "{s}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_bodies_flow_both_ways_before_they_end() {
    timeout(LIMIT, async {
        // The app reports each request chunk as it arrives, and hands the test the sender
        // of its response body.
        let (chunks_tx, mut chunks_rx) = mpsc::unbounded_channel::<Bytes>();
        let (senders_tx, mut senders_rx) = mpsc::unbounded_channel();
        let app = App::start(move |req: Request<Incoming>| {
            let chunks_tx = chunks_tx.clone();
            let senders_tx = senders_tx.clone();
            async move {
                if req.uri().path() == "/download" {
                    let (tx, body) = channel_body();
                    senders_tx.send(tx).unwrap();
                    return Response::new(body);
                }
                let mut body = req.into_body();
                let mut total = Vec::new();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        total.extend_from_slice(&data);
                        chunks_tx.send(data).unwrap();
                    }
                }
                respond(total)
            }
        })
        .await;
        let registry = Registry::new();
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        // Request body: the app sees the first chunk while the body is still open.
        let mut client = h1(out.addr).await;
        let (tx, body) = channel_body();
        let req = Request::post("/upload")
            .header("host", "api.test")
            .body(body)
            .unwrap();
        client.ready().await.unwrap();
        let pending = tokio::spawn(client.send_request(req));
        tx.send(Bytes::from_static(b"one ")).await.unwrap();
        assert_eq!(chunks_rx.recv().await.unwrap(), "one ");
        tx.send(Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(chunks_rx.recv().await.unwrap(), "two");
        drop(tx);
        let response = pending.await.unwrap().unwrap();
        assert_eq!(text(response).await, "one two");

        // Response body: the client gets the first chunk while the app still holds the body.
        let mut client = h1(out.addr).await;
        let req = Request::get("/download")
            .header("host", "api.test")
            .body(empty())
            .unwrap();
        client.ready().await.unwrap();
        let pending = tokio::spawn(client.send_request(req));
        let app_tx = senders_rx.recv().await.unwrap();
        app_tx.send(Bytes::from_static(b"first")).await.unwrap();
        let response = pending.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "first");
        app_tx.send(Bytes::from_static(b"second")).await.unwrap();
        drop(app_tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "second");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_pass_through() {
    timeout(LIMIT, async {
        let app = App::start(|req: Request<Incoming>| async move {
            let version = req.version();
            let te = req.headers().get("te").cloned();
            let request = req.into_body().collect().await.unwrap().to_bytes();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("grpc-message", "ok".parse().unwrap());
            let frames = vec![
                Ok::<_, std::convert::Infallible>(Frame::data(request)),
                Ok(Frame::trailers(trailers)),
            ];
            let mut response = Response::new(boxed(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            )));
            let headers = response.headers_mut();
            headers.insert("content-type", "application/grpc".parse().unwrap());
            headers.insert("x-app-version", format!("{version:?}").parse().unwrap());
            headers.insert("x-app-te", te.unwrap_or_else(|| "-".parse().unwrap()));
            response
        })
        .await;
        let registry = Registry::new();
        let _inbounds = replicas(&registry, Protocol::Grpc, &[&app]).await;
        let opts = OutboundOpts {
            protocol: Protocol::Grpc,
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;

        let mut client = h2(out.addr).await;
        let req = Request::post("http://api.test/pkg.Service/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(&b"\0\0\0\0\x02hi"[..]))
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-app-version"], "HTTP/2.0");
        assert_eq!(response.headers()["x-app-te"], "trailers");
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "ok");
        assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x02hi"[..]);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through_both_sidecars() {
    timeout(LIMIT, async {
        let app = App::start(|mut req: Request<Incoming>| async move {
            assert_eq!(req.headers()["x-mesh-client-id"], "spiffe://m/web");
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on_upgrade.await.unwrap());
                let mut buf = [0u8; 1024];
                loop {
                    let n = io.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    io.write_all(&buf[..n]).await.unwrap();
                }
            });
            let mut response = Response::new(empty());
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            response
                .headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            response
                .headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            response
        })
        .await;
        let registry = Registry::new();
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        let mut client = h1(out.addr).await;
        let req = Request::get("/ws")
            .header("host", "api.test")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(empty())
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["upgrade"], "websocket");
        let mut io = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
        for message in [&b"ping"[..], &b"raw bytes \x00\xff"[..]] {
            io.write_all(message).await.unwrap();
            let mut buf = vec![0u8; message.len()];
            io.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, message);
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_two_inbounds() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let a = echo_app("a").await;
        let b = echo_app("b").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&a, &b]).await;
        for algorithm in [Algorithm::RoundRobin, Algorithm::P2cEwma] {
            let opts = OutboundOpts {
                algorithm,
                ..OutboundOpts::default()
            };
            let out = outbound(&registry, "api", opts).await;
            let mut client = h1(out.addr).await;
            let (mut on_a, mut on_b) = (0, 0);
            for _ in 0..40 {
                let req = Request::get("/")
                    .header("host", "api.test")
                    .body(empty())
                    .unwrap();
                client.ready().await.unwrap();
                let response = client.send_request(req).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                match response.headers()["x-replica"].to_str().unwrap() {
                    "a" => on_a += 1,
                    _ => on_b += 1,
                }
                text(response).await;
            }
            assert!(on_a > 0 && on_b > 0, "{algorithm:?}: a={on_a} b={on_b}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_streams_through_one_shared_connection() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let a = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&a]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;
        let client = h2(out.addr).await;
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..500 {
            let mut client = client.clone();
            requests.spawn(async move {
                client.ready().await.unwrap();
                let req = Request::get(format!("http://api.test/{i}"))
                    .body(empty())
                    .unwrap();
                let response = client.send_request(req).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                text(response).await;
            });
        }
        while let Some(result) = requests.join_next().await {
            result.unwrap();
        }
    })
    .await
    .unwrap();
}

/// An h2c client that has seen the server's SETTINGS and checked that they enable extended
/// CONNECT (RFC 8441 §3: a client waits for the setting): one exchange first, while the
/// connection is driven here, then the connection goes to its own task.
async fn h2_settled(addr: SocketAddr) -> http2::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    let mut conn = Box::pin(conn);
    let exchange = async {
        let response = client
            .send_request(Request::get("http://api.test/").body(empty()).unwrap())
            .await
            .unwrap();
        text(response).await
    };
    tokio::select! {
        _ = exchange => {}
        _ = conn.as_mut() => panic!("the connection closed during the first exchange"),
    }
    assert!(conn.is_extended_connect_protocol_enabled());
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A WebSocket-style extended CONNECT (`:protocol`) on `path`.
fn extended_connect(path: &str) -> Request<Body> {
    let mut req = Request::connect(format!("http://api.test{path}"))
        .body(empty())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_tunnels_through_both_sidecars_past_the_timeout() {
    timeout(LIMIT, async {
        // GETs answer "ok" (`/hang`: never); an extended CONNECT gets 200 with what the
        // app saw, then an echo of the tunnel's bytes until the client ends its side.
        let app = App::start(|mut req: Request<Incoming>| async move {
            if req.method() != http::Method::CONNECT {
                if req.uri().path() == "/hang" {
                    std::future::pending::<()>().await;
                }
                return respond("ok");
            }
            let protocol = req
                .extensions()
                .get::<hyper::ext::Protocol>()
                .map(|p| String::from_utf8_lossy(p.as_ref()).into_owned())
                .unwrap_or_default();
            let seen = format!(
                "{:?} {} {} {}",
                req.version(),
                req.uri(),
                protocol,
                req.headers()["x-mesh-client-id"].to_str().unwrap(),
            );
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let io = TokioIo::new(on_upgrade.await.unwrap());
                let (mut rd, mut wr) = tokio::io::split(io);
                tokio::io::copy(&mut rd, &mut wr).await.unwrap();
                wr.shutdown().await.unwrap();
            });
            let mut response = Response::new(empty());
            response
                .headers_mut()
                .insert("x-seen", seen.parse().unwrap());
            response
        })
        .await;
        let registry = Registry::new();
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let opts = OutboundOpts {
            traffic: mesh_proxy::Traffic {
                timeout: Some(Duration::from_millis(200)),
                ..Default::default()
            },
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;

        let mut client = h2_settled(out.addr).await;
        let mut response = client
            .send_request(extended_connect("/chat?room=1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["x-seen"],
            "HTTP/2.0 http://api.test/chat?room=1 websocket spiffe://m/web"
        );
        let mut io = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
        // The tunnel outlives the 200 ms timeout, and carries bytes both ways all along:
        // between exchanges, a request that hangs comes back 504, which proves a whole
        // timeout went by.
        for round in 0..3 {
            let message = format!("message {round} \u{0}\u{ff}");
            io.write_all(message.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; message.len()];
            io.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, message.as_bytes());
            if round < 2 {
                assert_eq!(
                    get(out.addr, "/hang").await.status(),
                    StatusCode::GATEWAY_TIMEOUT
                );
            }
        }
        // Half-close: our end of stream reaches the app, whose end comes back.
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_to_an_app_without_it_is_a_named_reset() {
    timeout(LIMIT, async {
        // An h2c app whose server does not enable extended CONNECT.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(respond("ok"))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        let registry = Registry::new();
        let sidecar = inbound("api", 0, Protocol::Http, app).await;
        registry.set("api", vec![endpoint("api", 0, sidecar.addr)]);
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        let mut client = h2_settled(out.addr).await;
        let response = client.send_request(extended_connect("/ws")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["x-mesh-error"], "reset");
        let body = text(response).await;
        assert!(body.contains("SETTINGS_ENABLE_CONNECT_PROTOCOL"), "{body}");
        server.abort();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connect_is_refused_with_405() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        // HTTP/2: CONNECT with only `:authority`.
        let mut client = h2(out.addr).await;
        let response = client
            .send_request(Request::connect("api.test:443").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        // HTTP/1.1: `CONNECT host:port`.
        let mut client = h1(out.addr).await;
        let response = client
            .send_request(
                Request::connect("api.test:443")
                    .header("host", "api.test:443")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        // Both connections still serve.
        assert_eq!(get(out.addr, "/").await.status(), StatusCode::OK);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_without_endpoints_is_no_endpoints() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let opts = OutboundOpts {
            queue_timeout: Duration::from_millis(100),
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        let mut client = h2_settled(out.addr).await;
        let response = client.send_request(extended_connect("/ws")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-mesh-error"], "no-endpoints");
        assert_eq!(
            text(response).await,
            "mesh: no-endpoints: service=api tried=none attempts=0: no ready endpoint within queue_timeout 100ms\n"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_is_cut_by_the_drain_and_the_sidecars_finish() {
    timeout(LIMIT, async {
        let app = App::start(|mut req: Request<Incoming>| async move {
            if req.method() != http::Method::CONNECT {
                return respond("ok");
            }
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let io = TokioIo::new(on_upgrade.await.unwrap());
                let (mut rd, mut wr) = tokio::io::split(io);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
            Response::new(empty())
        })
        .await;
        let registry = Registry::new();
        let mut inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let mut out = outbound(&registry, "api", OutboundOpts::default()).await;

        let mut client = h2_settled(out.addr).await;
        let mut response = client.send_request(extended_connect("/ws")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut io = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
        io.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // An upgraded stream has no requests to finish: the drain cuts it, and both
        // serve futures return although the client keeps its side open.
        out.shutdown.cancel();
        inbounds[0].shutdown.cancel();
        (&mut out.task).await.unwrap();
        (&mut inbounds[0].task).await.unwrap();
        let mut rest = Vec::new();
        let _ = io.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{rest:?}");
    })
    .await
    .unwrap();
}
