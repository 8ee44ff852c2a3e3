//! Traffic policies of the outbound in process: metrics of retries and ejections, a try
//! cut by `timeout` feeding the breaker, the gRPC form of `timeout`, a streaming body
//! that is never retried, and the breaker verdict of a gRPC status in the trailers.

#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_proxy::balance::{Algorithm, Breaker, DEFAULT_MAX_CONCURRENT, Policy};
use mesh_proxy::discovery::Registry;
use mesh_proxy::http::{Body, boxed, full};
use mesh_proxy::metrics::{Metrics, sum_of};
use mesh_proxy::outbound::{RetryOn, RetryPolicy};
use mesh_proxy::{Protocol, Traffic};
use tokio::time::{Instant, timeout};

use support::*;

fn breaker(consecutive_failures: u32) -> Policy {
    Policy {
        breaker: Some(Breaker {
            consecutive_failures,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(10),
            max_ejected_percent: 50,
        }),
        max_concurrent: DEFAULT_MAX_CONCURRENT,
    }
}

/// An app that counts requests and never answers.
async fn hanging_app(count: Arc<AtomicUsize>) -> App {
    App::start(move |_req: Request<Incoming>| {
        count.fetch_add(1, Ordering::SeqCst);
        futures_util::future::pending::<Response<Body>>()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_ejections_are_counted() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let failing = App::start(|_req: Request<Incoming>| async {
            let mut r = respond("down");
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        })
        .await;
        let ok = echo_app("b").await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&failing, &ok]).await;
        let metrics = Metrics::new();
        let opts = OutboundOpts {
            algorithm: Algorithm::RoundRobin,
            traffic: Traffic {
                retries: Some(RetryPolicy {
                    attempts: 2,
                    per_try_timeout: None,
                    on: vec![RetryOn::GatewayError],
                    budget: 0.2,
                }),
                balance: breaker(1),
                ..Traffic::default()
            },
            metrics: metrics.clone(),
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        // Round-robin starts at api.0: the first request fails there once, is retried on
        // api.1, and api.0 is ejected; the others go to api.1 at once.
        for _ in 0..4 {
            let response = get(out.addr, "/").await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["x-replica"], "b");
        }
        let text = metrics.encode();
        assert_eq!(sum_of(&text, "mesh_retries_total"), 1, "{text}");
        assert_eq!(sum_of(&text, "mesh_ejections_total"), 1, "{text}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_cut_by_the_timeout_is_a_breaker_failure() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = hanging_app(Arc::default()).await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&app]).await;
        let opts = OutboundOpts {
            queue_timeout: Duration::from_secs(10),
            traffic: Traffic {
                timeout: Some(Duration::from_millis(200)),
                balance: breaker(1),
                ..Traffic::default()
            },
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        let started = Instant::now();
        let response = get(out.addr, "/").await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers()["x-mesh-error"], "timeout");
        assert!(
            text(response)
                .await
                .starts_with("mesh: timeout: service=api tried=api.0 attempts=1: api.0: ")
        );
        // The only endpoint is ejected: the circuit is open, without waiting.
        let started = Instant::now();
        let response = get(out.addr, "/").await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-mesh-error"], "circuit-open");
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_is_trailers_only_with_status_4() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let app = hanging_app(Arc::default()).await;
        let _inbounds = replicas(&registry, Protocol::Grpc, &[&app]).await;
        let opts = OutboundOpts {
            protocol: Protocol::Grpc,
            traffic: Traffic {
                timeout: Some(Duration::from_millis(200)),
                ..Traffic::default()
            },
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        let mut client = h2(out.addr).await;
        let request = Request::post(format!("http://{}/pkg.Svc/Call", out.addr))
            .header("content-type", "application/grpc")
            .body(full(vec![0u8, 0, 0, 0, 0]))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        assert_eq!(response.headers()["x-mesh-error"], "timeout");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_body_is_not_retried_after_a_per_try_timeout() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let count = Arc::new(AtomicUsize::new(0));
        let a = hanging_app(Arc::clone(&count)).await;
        let b = hanging_app(Arc::clone(&count)).await;
        let _inbounds = replicas(&registry, Protocol::Http, &[&a, &b]).await;
        let opts = OutboundOpts {
            traffic: Traffic {
                retries: Some(RetryPolicy {
                    attempts: 3,
                    per_try_timeout: Some(Duration::from_millis(200)),
                    on: vec![RetryOn::Timeout],
                    budget: 1.0,
                }),
                ..Traffic::default()
            },
            ..OutboundOpts::default()
        };
        let out = outbound(&registry, "api", opts).await;
        let (tx, body) = channel_body();
        tx.send(bytes::Bytes::from_static(b"still streaming"))
            .await
            .unwrap();
        let mut client = h1(out.addr).await;
        let request = Request::post("/")
            .header("host", "api.test")
            .body(body)
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(text(response).await.contains("attempts=1"));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        drop(tx);

        // A small body is replayed: every try reaches an app.
        let mut client = h1(out.addr).await;
        let response = client
            .send_request(
                Request::post("/")
                    .header("host", "api.test")
                    .body(full("small"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(text(response).await.contains("attempts=3"));
        assert_eq!(count.load(Ordering::SeqCst), 4);
    })
    .await
    .unwrap();
}

/// A gRPC app answering every call with 200, one message, and `grpc-status: <code>` in
/// the trailers (not trailers-only); `x-replica` names it.
async fn grpc_trailers_app(name: &'static str, code: &'static str) -> App {
    App::start(move |_req: Request<Incoming>| async move {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", code.parse().unwrap());
        let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
            Ok(hyper::body::Frame::data(bytes::Bytes::from_static(&[
                0, 0, 0, 0, 1, 7,
            ]))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut response = Response::new(boxed(body));
        let headers = response.headers_mut();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        headers.insert("x-replica", name.parse().unwrap());
        response
    })
    .await
}

/// `n` gRPC calls one after the other, each read to its trailers: the replica and the
/// trailers' `grpc-status` of each.
async fn grpc_calls(addr: std::net::SocketAddr, n: usize) -> Vec<(String, String)> {
    use http_body_util::BodyExt;
    let mut client = h2(addr).await;
    let mut seen = Vec::new();
    for _ in 0..n {
        let request = Request::post(format!("http://{addr}/pkg.Svc/Call"))
            .header("content-type", "application/grpc")
            .body(full(vec![0u8, 0, 0, 0, 0]))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers().get("grpc-status").is_none(),
            "not trailers-only"
        );
        let replica = response.headers()["x-replica"]
            .to_str()
            .unwrap()
            .to_string();
        let collected = response.into_body().collect().await.unwrap();
        let status = collected.trailers().unwrap()["grpc-status"]
            .to_str()
            .unwrap()
            .to_string();
        seen.push((replica, status));
    }
    seen
}

fn grpc_outbound_opts(metrics: &Metrics, consecutive_failures: u32) -> OutboundOpts {
    OutboundOpts {
        protocol: Protocol::Grpc,
        algorithm: Algorithm::RoundRobin,
        traffic: Traffic {
            balance: breaker(consecutive_failures),
            ..Traffic::default()
        },
        metrics: metrics.clone(),
        ..OutboundOpts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_grpc_status_in_the_trailers_ejects() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        let unavailable = grpc_trailers_app("a", "14").await;
        let ok = grpc_trailers_app("b", "0").await;
        let _inbounds = replicas(&registry, Protocol::Grpc, &[&unavailable, &ok]).await;
        let metrics = Metrics::new();
        let out = outbound(&registry, "api", grpc_outbound_opts(&metrics, 2)).await;
        // Round-robin: a, b, a; a's second 14 (read before the next call starts) ejects
        // it for 10 s, and every later call goes to b.
        let seen = grpc_calls(out.addr, 8).await;
        let replicas: Vec<&str> = seen.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            replicas,
            ["a", "b", "a", "b", "b", "b", "b", "b"],
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .all(|(r, s)| (r == "a" && s == "14") || (r == "b" && s == "0")),
            "{seen:?}"
        );
        let text = metrics.encode();
        assert_eq!(sum_of(&text, "mesh_ejections_total"), 1, "{text}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_grpc_statuses_in_the_trailers_do_not_eject() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        // 0 (ok) and 5 (not-found) are answers, not failures: even one failure in a row
        // would eject, and none does.
        let ok = grpc_trailers_app("a", "0").await;
        let not_found = grpc_trailers_app("b", "5").await;
        let _inbounds = replicas(&registry, Protocol::Grpc, &[&ok, &not_found]).await;
        let metrics = Metrics::new();
        let out = outbound(&registry, "api", grpc_outbound_opts(&metrics, 1)).await;
        let seen = grpc_calls(out.addr, 6).await;
        let replicas: Vec<&str> = seen.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(replicas, ["a", "b", "a", "b", "a", "b"], "{seen:?}");
        let text = metrics.encode();
        assert_eq!(sum_of(&text, "mesh_ejections_total"), 0, "{text}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_body_ending_without_a_status_resets_the_count() {
    timeout(LIMIT, async {
        let registry = Registry::new();
        // Calls alternate: 14 in the trailers, then a body without trailers, then 14 …
        let calls = Arc::new(AtomicUsize::new(0));
        let app = App::start(move |_req: Request<Incoming>| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut response = if call % 2 == 0 {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "14".parse().unwrap());
                    let frames: Vec<
                        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                    > = vec![
                        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(&[
                            0, 0, 0, 0, 0,
                        ]))),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ];
                    Response::new(boxed(http_body_util::StreamBody::new(
                        futures_util::stream::iter(frames),
                    )))
                } else {
                    Response::new(full(vec![0u8, 0, 0, 0, 0]))
                };
                response
                    .headers_mut()
                    .insert("content-type", "application/grpc".parse().unwrap());
                response
            }
        })
        .await;
        let _inbounds = replicas(&registry, Protocol::Grpc, &[&app]).await;
        let metrics = Metrics::new();
        let out = outbound(&registry, "api", grpc_outbound_opts(&metrics, 2)).await;
        let mut client = h2(out.addr).await;
        for i in 0..5 {
            let request = Request::post(format!("http://{}/pkg.Svc/Call", out.addr))
                .header("content-type", "application/grpc")
                .body(full(vec![0u8, 0, 0, 0, 0]))
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "call {i}");
            assert!(response.headers().get("x-mesh-error").is_none(), "call {i}");
            use http_body_util::BodyExt;
            let collected = response.into_body().collect().await.unwrap();
            let status = collected.trailers().and_then(|t| t.get("grpc-status"));
            if i % 2 == 0 {
                assert_eq!(status.unwrap(), "14", "call {i}");
            } else {
                assert!(status.is_none(), "call {i}");
            }
        }
        let text = metrics.encode();
        assert_eq!(sum_of(&text, "mesh_ejections_total"), 0, "{text}");
    })
    .await
    .unwrap();
}
