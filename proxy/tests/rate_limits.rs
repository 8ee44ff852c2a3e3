//! The rate limit of an inbound seen through a caller's outbound, in process: a 429 is
//! final (never retried onto another replica), and its form is the mesh's.

#![allow(clippy::unwrap_used, reason = "a failing test panics")]

mod support;

use mesh_proxy::Protocol;
use mesh_proxy::balance::Algorithm;
use mesh_proxy::discovery::Registry;
use mesh_proxy::inbound::InboundConfig;
use mesh_proxy::metrics::Metrics;
use mesh_proxy::ratelimit::RateLimit;
use support::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An inbound for `api.<replica>` in front of `app`, limited to `burst` requests (the
/// rate is so low that no token comes back during the test).
async fn limited_inbound(replica: u32, app: &App, burst: u32) -> Sidecar {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let cfg = InboundConfig {
        mesh_name: MESH.into(),
        service: "api".into(),
        replica,
        protocol: Protocol::Http,
        app: (app.addr).into(),
        metrics: Metrics::new(),
        rate_limit: (Some(RateLimit { rps: 0.001, burst })).into(),
        tls: None,
        admitted: Default::default(),
    };
    let task = serve_inbound(listener, cfg, Default::default(), shutdown.clone());
    Sidecar {
        addr,
        shutdown,
        task,
    }
}

#[tokio::test]
async fn a_429_from_an_inbound_is_final() {
    tokio::time::timeout(LIMIT, async {
        let (a, b) = (echo_app("a").await, echo_app("b").await);
        // api.0 admits one request, api.1 plenty: a retry of api.0's 429 would succeed
        // on api.1.
        let zero = limited_inbound(0, &a, 1).await;
        let one = limited_inbound(1, &b, 100).await;
        let registry = Registry::new();
        registry.set(
            "api",
            vec![endpoint("api", 0, zero.addr), endpoint("api", 1, one.addr)],
        );
        let out = outbound(
            &registry,
            "api",
            OutboundOpts {
                algorithm: Algorithm::RoundRobin,
                ..OutboundOpts::default()
            },
        )
        .await;

        // Round-robin: api.0, api.1, api.0 (now empty), api.1.
        let mut answers = Vec::new();
        for _ in 0..4 {
            let r = get(out.addr, "/").await;
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let replica = r
                .headers()
                .get("x-replica")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = text(r).await;
            answers.push((status, replica, retry_after, body));
        }
        assert_eq!(answers[0].0, 200, "{answers:?}");
        assert_eq!(answers[1].0, 200, "{answers:?}");
        let (status, replica, retry_after, body) = &answers[2];
        assert_eq!(*status, 429, "not retried onto api.1: {answers:?}");
        assert_eq!(*replica, None);
        // 1 / 0.001 rps = 1000 s until the next token.
        assert_eq!(retry_after.as_deref(), Some("1000"));
        assert!(
            body.starts_with("mesh: rate-limited: service=api tried=api.0 attempts=1: "),
            "{body}"
        );
        assert_eq!(answers[3].1.as_deref(), Some("b"), "{answers:?}");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn upgrades_take_tokens_too() {
    tokio::time::timeout(LIMIT, async {
        let app = echo_app("a").await;
        let inbound = limited_inbound(0, &app, 1).await;
        let registry = Registry::new();
        registry.set("api", vec![endpoint("api", 0, inbound.addr)]);
        let out = outbound(&registry, "api", OutboundOpts::default()).await;
        assert_eq!(get(out.addr, "/").await.status(), 200);
        // An upgrade request is a request: refused once the bucket is empty.
        let mut client = h1(out.addr).await;
        let req = http::Request::get("/ws")
            .header("host", "api.test")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(mesh_proxy::http::empty())
            .unwrap();
        let r = client.send_request(req).await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-mesh-error"], "rate-limited");
    })
    .await
    .expect("in time");
}
