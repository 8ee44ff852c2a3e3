//! Mutual TLS and authorization between real sidecars in process (SPEC §1, §8): real
//! rustls handshakes between an outbound and an inbound, identities from the certificate,
//! 403 `unauthorized` for callers not admitted, and refused handshakes counted in
//! `mesh_tls_handshake_failures_total`.

#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use http::{Request, StatusCode};
use mesh_proxy::Protocol;
use mesh_proxy::balance::{Algorithm, Balancer};
use mesh_proxy::discovery::Registry;
use mesh_proxy::http::empty;
use mesh_proxy::inbound::{self, InboundConfig};
use mesh_proxy::metrics::{Metrics, sum_of};
use mesh_proxy::outbound::{self, OutboundConfig};
use mesh_proxy::tcp::{self, TcpInboundConfig, TcpOutboundConfig};
use mesh_proxy::tls::{self, Ca, ClientTls, DEFAULT_LEAF_LIFETIME, Identity};
use mesh_proxy::{Protocol as P, Traffic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use support::*;

fn identity(ca: &Ca, service: &str) -> Arc<Identity> {
    Arc::new(Identity::new(
        ca.issue(MESH, service, DEFAULT_LEAF_LIFETIME).unwrap(),
    ))
}

fn expired(ca: &Ca, service: &str) -> Arc<Identity> {
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    Arc::new(Identity::new(
        ca.issue_with_validity(MESH, service, now - 2 * day, now - day)
            .unwrap(),
    ))
}

/// An inbound of `api.0` with mutual TLS, admitting `admitted`. With `local`, outbounds
/// of the test reach it in process unless the run forces the TLS path
/// ([`support::local_path`]); without, always through its TLS listener (the tests of the
/// handshake itself).
async fn tls_inbound(
    ca: &Ca,
    protocol: Protocol,
    app: SocketAddr,
    admitted: &[&str],
    metrics: &Metrics,
    local: bool,
) -> Sidecar {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let cfg = InboundConfig {
        mesh_name: MESH.into(),
        service: "api".into(),
        replica: 0,
        protocol,
        app: app.into(),
        metrics: metrics.clone(),
        rate_limit: (None).into(),
        tls: Some(tls::server_config(ca, identity(ca, "api"), tls::ALPN_INBOUND_HTTP).unwrap()),
        admitted: mesh_proxy::live::Live::new(admitted.iter().map(|s| s.to_string()).collect()),
    };
    let task = if local {
        support::serve_inbound(listener, cfg, Default::default(), shutdown.clone())
    } else {
        tokio::spawn(inbound::serve(listener, cfg, shutdown.clone()))
    };
    Sidecar {
        addr,
        shutdown,
        task,
    }
}

/// An outbound of `caller` to `api` at `endpoint`, presenting `client` (plain without).
async fn tls_outbound(
    caller: &str,
    protocol: Protocol,
    endpoint: SocketAddr,
    client: Option<ClientTls>,
    metrics: &Metrics,
) -> (Sidecar, Registry) {
    let registry = Registry::new();
    registry.set("api", vec![support::endpoint("api", 0, endpoint)]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let balancer = Balancer::new("api", Algorithm::RoundRobin, registry.watch("api"));
    let cfg = OutboundConfig {
        mesh_name: MESH.into(),
        caller: caller.into(),
        service: "api".into(),
        protocol,
        traffic: Traffic {
            load_balancer: Algorithm::RoundRobin,
            queue_timeout: Duration::from_secs(1),
            ..Traffic::default()
        },
        ingress: false,
        metrics: metrics.clone(),
        routes: Default::default(),
        tls: client,
    };
    let task = tokio::spawn(outbound::serve(listener, cfg, balancer, shutdown.clone()));
    (
        Sidecar {
            addr,
            shutdown,
            task,
        },
        registry,
    )
}

/// An app that counts the requests it got.
async fn counting_app() -> (App, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let app = App::start(move |req: http::Request<hyper::body::Incoming>| {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let client = req
                .headers()
                .get("x-mesh-client-id")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_else(|| "-".into());
            respond(client)
        }
    })
    .await;
    (app, hits)
}

/// Wait until `metrics` counts at least one handshake failure on `side`.
/// Wait until `mesh_tls_handshake_failures_total{side}` reaches `at_least` (the inbound
/// counts from its connection task, after the client saw the failure).
async fn handshake_failures(metrics: &Metrics, side: &str, at_least: u64) {
    let needle = format!("side=\"{side}\"");
    let count = || {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("mesh_tls_handshake_failures_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    eventually(
        &format!("{at_least} handshake failures on the {side} side"),
        LIMIT,
        || (count() >= at_least).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_caller_passes_with_the_identity_of_its_certificate() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        let (app, hits) = counting_app().await;
        let inbound = tls_inbound(&ca, P::Http, app.addr, &["web"], &metrics, true).await;
        let client = ClientTls::new(&ca, &identity(&ca, "web")).unwrap();
        let (out, _registry) =
            tls_outbound("web", P::Http, inbound.addr, Some(client), &metrics).await;

        let mut c = h1(out.addr).await;
        let req = Request::get("/")
            .header("host", "api")
            // Neither header can claim an identity when the certificate carries it.
            .header("x-mesh-client-id", "spiffe://m/admin")
            .header("x-mesh-source", "spiffe://m/admin")
            .body(empty())
            .unwrap();
        let response = c.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "spiffe://m/web");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.tls_handshake_failures_total(), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reuse_one_tls_connection() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        let (app, hits) = counting_app().await;
        let inbound = tls_inbound(&ca, P::Http, app.addr, &["web"], &metrics, false).await;
        // A counting TCP relay in front of the inbound sees every connection made to it.
        let (relay, connections) = counting_relay(inbound.addr).await;
        let client = ClientTls::new(&ca, &identity(&ca, "web")).unwrap();
        let (out, _registry) = tls_outbound("web", P::Http, relay, Some(client), &metrics).await;

        for _ in 0..10 {
            let response = get(out.addr, "/").await;
            assert_eq!(response.status(), StatusCode::OK);
            text(response).await;
        }
        let concurrent: Vec<_> = (0..20)
            .map(|_| tokio::spawn(async move { get(out.addr, "/").await.status() }))
            .collect();
        for request in concurrent {
            assert_eq!(request.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(hits.load(Ordering::SeqCst), 30);
        assert_eq!(
            connections.load(Ordering::SeqCst),
            1,
            "one handshake for every request"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_not_admitted_gets_403_naming_both_identities() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        let (app, hits) = counting_app().await;
        let inbound = tls_inbound(&ca, P::Http, app.addr, &["web"], &metrics, true).await;
        // Same CA, valid certificate, but `intruder` is not admitted by `api`.
        let client = ClientTls::new(&ca, &identity(&ca, "intruder")).unwrap();
        let (out, _registry) =
            tls_outbound("intruder", P::Http, inbound.addr, Some(client), &metrics).await;

        let response = get(out.addr, "/").await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["x-mesh-error"], "unauthorized");
        assert_eq!(response.headers()["content-type"], "text/plain");
        let body = text(response).await;
        assert!(
            body.starts_with("mesh: unauthorized: service=api tried=api.0 attempts=1: "),
            "{body}"
        );
        assert!(body.contains("spiffe://m/intruder"), "{body}");
        assert!(body.contains("spiffe://m/api"), "{body}");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the app never sees it");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"mesh_errors_total{caller="intruder",service="api",kind="unauthorized"} 1"#
            ),
            "{text}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unauthorized_is_grpc_status_7() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        let (app, hits) = counting_app().await;
        let inbound = tls_inbound(&ca, P::Grpc, app.addr, &["web"], &metrics, true).await;
        let client = ClientTls::new(&ca, &identity(&ca, "intruder")).unwrap();
        let (out, _registry) =
            tls_outbound("intruder", P::Grpc, inbound.addr, Some(client), &metrics).await;

        let mut c = h2(out.addr).await;
        let req = Request::post("http://api/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(empty())
            .unwrap();
        let response = c.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "7");
        assert_eq!(response.headers()["x-mesh-error"], "unauthorized");
        let message = response.headers()["grpc-message"].to_str().unwrap();
        assert!(message.contains("spiffe://m/intruder"), "{message}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_caller_is_refused_and_counted() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        let (app, hits) = counting_app().await;
        let inbound = tls_inbound(&ca, P::Http, app.addr, &["web"], &metrics, false).await;

        // A raw HTTP/1.1 request, as a local process could send it.
        let mut raw = TcpStream::connect(inbound.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer).await;
        assert!(!answer.starts_with(b"HTTP"), "{answer:?}");

        // An outbound with `tls = "off"` towards a TLS inbound: a mesh error, not a hang.
        let (out, _registry) = tls_outbound("web", P::Http, inbound.addr, None, &metrics).await;
        let response = get(out.addr, "/").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(response.headers().contains_key("x-mesh-error"));

        handshake_failures(&metrics, "server", 2).await;
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_or_expired_are_refused_and_counted() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let foreign = Ca::generate(MESH).unwrap();
        let (app, hits) = counting_app().await;
        for (what, client) in [
            // Trusts the mesh CA, so only the inbound can refuse.
            (
                "foreign CA",
                ClientTls::new(&ca, &identity(&foreign, "web")).unwrap(),
            ),
            (
                "expired",
                ClientTls::new(&ca, &expired(&ca, "web")).unwrap(),
            ),
        ] {
            let metrics = Metrics::new();
            let inbound = tls_inbound(&ca, P::Http, app.addr, &["web"], &metrics, false).await;
            let (out, _registry) =
                tls_outbound("web", P::Http, inbound.addr, Some(client), &metrics).await;
            let response = get(out.addr, "/").await;
            assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{what}");
            let body = text(response).await;
            assert!(body.starts_with("mesh: "), "{what}: {body}");
            handshake_failures(&metrics, "server", 1).await;
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_with_another_identity_is_refused_by_the_caller() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        let (app, hits) = counting_app().await;
        // An inbound of `web` registered as an endpoint of `api` (a stale address).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let cfg = InboundConfig {
            mesh_name: MESH.into(),
            service: "web".into(),
            replica: 0,
            protocol: P::Http,
            app: (app.addr).into(),
            metrics: metrics.clone(),
            rate_limit: (None).into(),
            tls: Some(
                tls::server_config(&ca, identity(&ca, "web"), tls::ALPN_INBOUND_HTTP).unwrap(),
            ),
            admitted: BTreeSet::from(["web".to_string()]).into(),
        };
        let _web = Sidecar {
            addr,
            shutdown: shutdown.clone(),
            task: tokio::spawn(inbound::serve(listener, cfg, shutdown)),
        };
        let client = ClientTls::new(&ca, &identity(&ca, "web")).unwrap();
        let (out, _registry) = tls_outbound("web", P::Http, addr, Some(client), &metrics).await;

        let response = get(out.addr, "/").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["x-mesh-error"], "connect-failed");
        let body = text(response).await;
        assert!(
            body.contains("peer is spiffe://m/web, expected spiffe://m/api"),
            "{body}"
        );
        handshake_failures(&metrics, "client", 1).await;
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_callers_not_admitted_are_closed_and_counted() {
    timeout(LIMIT, async {
        let ca = Ca::generate(MESH).unwrap();
        let metrics = Metrics::new();
        // An app that greets every connection.
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app_addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = app.accept().await {
                let _ = s.write_all(b"hello").await;
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inbound_addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let cfg = TcpInboundConfig {
            mesh_name: MESH.into(),
            service: "api".into(),
            replica: 0,
            app: (app_addr).into(),
            metrics: metrics.clone(),
            rate_limit: (None).into(),
            tls: Some(tls::server_config(&ca, identity(&ca, "api"), &[]).unwrap()),
            admitted: BTreeSet::from(["web".to_string()]).into(),
        };
        support::serve_tcp_inbound(listener, cfg, shutdown.clone());

        let mut outbounds = Vec::new();
        for caller in ["web", "intruder"] {
            let registry = Registry::new();
            registry.set("api", vec![support::endpoint("api", 0, inbound_addr)]);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let cfg = TcpOutboundConfig {
                mesh_name: MESH.into(),
                caller: caller.into(),
                service: "api".into(),
                traffic: Traffic::default(),
                metrics: metrics.clone(),
                routes: Default::default(),
                tls: Some(ClientTls::new(&ca, &identity(&ca, caller)).unwrap().opaque),
            };
            let balancer = Balancer::new("api", Algorithm::RoundRobin, registry.watch("api"));
            tokio::spawn(tcp::serve_outbound(
                listener,
                cfg,
                balancer,
                shutdown.clone(),
            ));
            outbounds.push((addr, registry));
        }

        let read_all = |addr: SocketAddr| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            got
        };
        // The admitted caller gets the greeting (the app keeps the connection open, so
        // read just the greeting).
        let mut s = TcpStream::connect(outbounds[0].0).await.unwrap();
        let mut greeting = [0u8; 5];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"hello");
        drop(s);

        assert_eq!(read_all(outbounds[1].0).await, b"", "closed without data");
        eventually("the refusal to be counted", LIMIT, || {
            metrics
                .encode()
                .contains(
                    r#"mesh_errors_total{caller="intruder",service="api",kind="unauthorized"} 1"#,
                )
                .then_some(())
        })
        .await;
        assert_eq!(
            sum_of(&metrics.encode(), "mesh_tls_handshake_failures_total"),
            0
        );
        shutdown.cancel();
    })
    .await
    .unwrap();
}

/// A TCP relay to `target` on a new port, counting the connections it accepts.
async fn counting_relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut upstream = TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, count)
}
