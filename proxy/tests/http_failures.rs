//! Failures on the HTTP data path: dead apps and sidecars, default retries, mesh error
//! forms, waiting for endpoints, hostile clients, and draining.

#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_proxy::Protocol;
use mesh_proxy::balance::Algorithm;
use mesh_proxy::discovery::Registry;
use mesh_proxy::http::{Limits, empty, full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, timeout};

use support::*;

fn round_robin(queue_timeout: Duration) -> OutboundOpts {
    OutboundOpts {
        algorithm: Algorithm::RoundRobin,
        queue_timeout,
        ..OutboundOpts::default()
    }
}

fn post(body: mesh_proxy::http::Body) -> Request<mesh_proxy::http::Body> {
    Request::post("/")
        .header("host", "api.test")
        .body(body)
        .unwrap()
}

/// An app that reads each request head and closes the connection without answering.
async fn resetting_app() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_app_get_succeeds_on_the_other_replica() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let a = echo_app("a").await;
        let b = echo_app("b").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&a, &b]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;
        // Warm the inbound's keep-alive pool towards `a` before killing it.
        for _ in 0..10 {
            assert_eq!(get(out.addr, "/").await.status(), StatusCode::OK);
        }
        a.kill().await;
        for _ in 0..20 {
            let response = get(out.addr, "/").await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["x-replica"], "b");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_app_small_post_is_retried_streaming_post_fails() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let a = echo_app("a").await;
        let b = echo_app("b").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&a, &b]).await;
        a.kill().await;
        // Round robin starts at api.0 (dead app): connect-failed from its inbound means
        // the app never saw the request, so even a POST is retried, with its body.
        let out = outbound(&registry, "api", round_robin(Duration::from_millis(200))).await;
        let mut client = h1(out.addr).await;
        client.ready().await.unwrap();
        let response = client.send_request(post(full("small"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let s = response.headers()["x-seen"].to_str().unwrap().to_string();
        assert_eq!(seen(&s, "attempt"), "2");
        assert_eq!(response.headers()["x-replica"], "b");
        assert_eq!(text(response).await, "small");

        // With only the dead replica, a streaming POST cannot be replayed: connect-failed.
        registry.set("api", vec![endpoint("api", 0, _inbounds[0].addr)]);
        let out = outbound(&registry, "api", round_robin(Duration::from_millis(200))).await;
        let mut client = h1(out.addr).await;
        let (tx, body) = channel_body();
        client.ready().await.unwrap();
        let pending = tokio::spawn(client.send_request(post(body)));
        // The error may come back before the body is read, which drops it: ignore that.
        let _ = tx.send(Bytes::from_static(b"streamed")).await;
        drop(tx);
        let response = pending.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["x-mesh-error"], "connect-failed");
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert_eq!(
            text(response).await,
            "mesh: connect-failed: service=api tried=api.0 attempts=1: api.0: the app refused the connection\n"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_retried_for_get_but_not_for_post() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let resetting = resetting_app().await;
        let b = echo_app("b").await;
        let r0 = inbound("api", 0, Protocol::Http, resetting).await;
        let r1 = inbound("api", 1, Protocol::Http, b.addr).await;
        registry.set(
            "api",
            vec![endpoint("api", 0, r0.addr), endpoint("api", 1, r1.addr)],
        );
        let out = outbound(&registry, "api", round_robin(Duration::from_secs(3))).await;
        let mut client = h1(out.addr).await;

        // GET: api.0 resets, the retry on api.1 answers.
        let req = Request::get("/")
            .header("host", "api.test")
            .body(empty())
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let s = response.headers()["x-seen"].to_str().unwrap().to_string();
        assert_eq!(seen(&s, "attempt"), "2");
        text(response).await;

        // POST with a body, back on api.0: it may have reached the app, so no retry.
        client.ready().await.unwrap();
        let response = client.send_request(post(full("data"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["x-mesh-error"], "reset");
        // The inbound's why, carried to the caller's error line.
        let line = text(response).await;
        assert!(
            line.starts_with("mesh: reset: service=api tried=api.0 attempts=1: api.0: app: ")
                && line.contains("closed the connection before response headers"),
            "{line}"
        );

        // With only the resetting replica, a GET is tried three times, then fails.
        registry.set("api", vec![endpoint("api", 0, r0.addr)]);
        let response = get(out.addr, "/").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let line = text(response).await;
        assert!(
            line.starts_with(
                "mesh: reset: service=api tried=api.0,api.0,api.0 attempts=3: api.0: app: "
            ) && line.contains("closed the connection before response headers"),
            "{line}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_inbound_is_skipped_even_for_a_streaming_post() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let b = echo_app("b").await;
        let r1 = inbound("api", 1, Protocol::Http, b.addr).await;
        registry.set(
            "api",
            vec![
                endpoint("api", 0, closed_port().await),
                endpoint("api", 1, r1.addr),
            ],
        );
        let out = outbound(&registry, "api", round_robin(Duration::from_secs(3))).await;
        let mut client = h1(out.addr).await;
        // The connect to api.0's inbound fails before the body is touched: the same
        // (streaming) body goes to api.1.
        let (tx, body) = channel_body();
        client.ready().await.unwrap();
        let pending = tokio::spawn(client.send_request(post(body)));
        tx.send(Bytes::from_static(b"not lost")).await.unwrap();
        drop(tx);
        let response = pending.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let s = response.headers()["x-seen"].to_str().unwrap().to_string();
        assert_eq!(seen(&s, "attempt"), "2");
        assert_eq!(text(response).await, "not lost");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_are_retried_for_get() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let failing = App::start(|_req: Request<Incoming>| async move {
            let mut response = respond("down");
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
        })
        .await;
        let b = echo_app("b").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&failing, &b]).await;
        let out = outbound(&registry, "api", round_robin(Duration::from_secs(3))).await;
        let response = get(out.addr, "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-replica"], "b");
        // A POST's 503 is the app's answer: passed through as is.
        let mut client = h1(out.addr).await;
        client.ready().await.unwrap();
        let response = client.send_request(post(full("x"))).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().get("x-mesh-error").is_none());
        assert_eq!(text(response).await, "down");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_answers_503_after_queue_timeout() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let out = outbound(&registry, "api", round_robin(Duration::from_millis(200))).await;
        let started = Instant::now();
        let response = get(out.addr, "/").await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-mesh-error"], "no-endpoints");
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert_eq!(
            text(response).await,
            "mesh: no-endpoints: service=api tried=none attempts=0: no ready endpoint within queue_timeout 200ms\n"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_appearing_during_the_wait_serves_the_request() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = echo_app("a").await;
        let r0 = inbound("api", 0, Protocol::Http, app.addr).await;
        let out = outbound(&registry, "api", round_robin(Duration::from_secs(10))).await;
        let started = Instant::now();
        let mut pending = tokio::spawn(get(out.addr, "/"));
        // The request is waiting: it has not completed while no endpoint exists.
        assert!(
            timeout(Duration::from_millis(100), &mut pending)
                .await
                .is_err(),
            "the request must wait for an endpoint"
        );
        registry.set("api", vec![endpoint("api", 0, r0.addr)]);
        let response = pending.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(10));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_are_trailers_only() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let opts = OutboundOpts {
            protocol: Protocol::Grpc,
            queue_timeout: Duration::from_millis(100),
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        let mut client = h2(out.addr).await;
        let req = Request::post("http://api.test/pkg.Service/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(&b"\0\0\0\0\0"[..]))
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["grpc-status"], "14");
        assert_eq!(headers["x-mesh-error"], "no-endpoints");
        assert_eq!(
            headers["grpc-message"],
            "mesh: no-endpoints: service=api tried=none attempts=0: no ready endpoint within queue_timeout 100ms"
        );
        // Trailers-only: the HEADERS frame ends the stream.
        let collected = response.into_body().collect().await.unwrap();
        assert!(collected.trailers().is_none());
        assert!(collected.to_bytes().is_empty());
    })
    .await
    .unwrap();
}

/// Write `request` raw and read what comes back until the server closes.
async fn raw_exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // Write concurrently: the server may answer and close before reading it all.
    tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        // Keep the write half open until the server closes.
        std::future::pending::<()>().await;
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_is_431_and_malformed_request_is_400() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let out = outbound(&registry, "api", OutboundOpts::default()).await;

        let mut big = b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 80 * 1024));
        big.extend_from_slice(b"\r\n\r\n");
        let answer = raw_exchange(out.addr, big).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");

        let malformed = b"GET / HTTP/1.1\r\nHost: api.test\r\nno colon here\r\n\r\n".to_vec();
        let answer = raw_exchange(out.addr, malformed).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

        // The listener still serves well-formed requests.
        assert_eq!(get(out.addr, "/").await.status(), StatusCode::OK);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let opts = OutboundOpts {
            limits: Limits {
                header_read_timeout: Duration::from_millis(300),
                ..Limits::default()
            },
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        for request in [
            &b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Half"[..],
            &b""[..],
            &b"PRI * HTTP/2"[..],
        ] {
            let started = Instant::now();
            let answer = raw_exchange(out.addr, request.to_vec()).await;
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(300), "{took:?}");
            assert!(took < Duration::from_secs(5), "{took:?}");
            assert!(!answer.contains("200"), "{answer:?}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests_and_refuses_new_connections() {
    timeout(LIMIT, async {
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let app = {
            let release = Arc::clone(&release);
            App::start(move |_req: Request<Incoming>| {
                let started_tx = started_tx.clone();
                let release = Arc::clone(&release);
                async move {
                    started_tx.send(()).unwrap();
                    release.notified().await;
                    respond("finished")
                }
            })
            .await
        };
        let registry = Registry::new();
        let mut inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let mut out = outbound(&registry, "api", OutboundOpts::default()).await;

        let mut client = h1(out.addr).await;
        let req = Request::get("/slow")
            .header("host", "api.test")
            .body(empty())
            .unwrap();
        client.ready().await.unwrap();
        let pending = tokio::spawn(client.send_request(req));
        started_rx.recv().await.unwrap();

        // Both sidecars drain at once while the request is in flight.
        out.shutdown.cancel();
        inbounds[0].shutdown.cancel();
        // The outbound stops accepting at once: new connections are refused. (A connect
        // racing the close may still land in the old backlog and be reset.)
        loop {
            match TcpStream::connect(out.addr).await {
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ => tokio::task::yield_now().await,
            }
        }
        assert!(!out.task.is_finished());

        release.notify_one();
        let response = pending.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "finished");
        // Both serve futures return once their connections completed.
        (&mut out.task).await.unwrap();
        (&mut inbounds[0].task).await.unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_request_head_is_cut() {
    timeout(LIMIT, async {
        let read_timeout = Duration::from_millis(300);
        let registry = Registry::new();
        let app = echo_app("a").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let opts = OutboundOpts {
            limits: Limits {
                header_read_timeout: read_timeout,
                ..Limits::default()
            },
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;

        // A well-behaved HTTP/2 client, connected first, answers the pings and keeps its
        // connection while the stalled one below is cut.
        let mut client = h2(out.addr).await;
        let req = Request::get("http://api.test/").body(empty()).unwrap();
        assert_eq!(
            client.send_request(req).await.unwrap().status(),
            StatusCode::OK
        );

        // The preface, an empty SETTINGS frame, then a HEADERS frame announcing 64 bytes of
        // header block of which only 3 ever come: a request head that never completes, from
        // a client that cannot answer pings meanwhile.
        let mut slow = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        slow.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        slow.extend_from_slice(&[0, 0, 64, 0x1, 0x4, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
        let started = Instant::now();
        let answer = raw_exchange(out.addr, slow).await;
        let took = started.elapsed();
        assert!(took >= read_timeout, "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(!answer.contains("200"), "{answer:?}");

        // The idle client lived through the same ping periods, and still works.
        assert!(!client.is_closed());
        let req = Request::get("http://api.test/").body(empty()).unwrap();
        assert_eq!(
            client.send_request(req).await.unwrap().status(),
            StatusCode::OK
        );
    })
    .await
    .unwrap();
}

/// An inbound closes a keep-alive connection to its app that went unused for
/// `app_idle_timeout`, so an app with a thread per connection does not keep idle threads
/// forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_app_are_closed() {
    timeout(LIMIT, async {
        // A raw HTTP/1.1 app: answers each request on a kept-alive connection and says
        // when the inbound closed it.
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = app.accept().await.unwrap();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = closed_tx.send(tokio::time::Instant::now());
                                return;
                            }
                            Ok(_) => conn
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .await
                                .unwrap(),
                        }
                    }
                });
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let cfg = mesh_proxy::inbound::InboundConfig {
            mesh_name: MESH.into(),
            service: "api".into(),
            replica: 0,
            protocol: Protocol::Http,
            app: (app_addr).into(),
            metrics: mesh_proxy::metrics::Metrics::new(),
            rate_limit: (None).into(),
            tls: None,
            admitted: Default::default(),
        };
        let idle = Duration::from_millis(300);
        let limits = Limits {
            app_idle_timeout: idle,
            ..Limits::default()
        };
        let task = tokio::spawn(mesh_proxy::inbound::serve_with(
            listener,
            cfg,
            limits,
            shutdown.clone(),
        ));
        let served = tokio::time::Instant::now();
        let response = get(addr, "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "ok");
        let closed_at = closed_rx
            .recv()
            .await
            .expect("the app saw its connection close");
        assert!(
            closed_at.duration_since(served) >= idle,
            "closed after {:?}, before the idle timeout",
            closed_at.duration_since(served)
        );
        shutdown.cancel();
        task.await.unwrap();
    })
    .await
    .unwrap();
}
