use std::path::Path;

use mesh_proxy::stats::unix_ms;
use mesh_supervisor::supervisor::ReplicaStatus;

use super::*;

fn config(services: &str) -> Config {
    let text = format!("version = 1\n[mesh]\nname = \"t\"\n{services}");
    mesh_supervisor::config::parse(&text, Path::new("/nonexistent/mesh.toml"), &BTreeMap::new())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// web → api → db, web exposed; `jobs` calls nobody and nobody calls it.
fn shop() -> Config {
    config(
        r#"
[services.web]
command = ["web"]
upstreams = ["api"]
expose = "127.0.0.1:0"

[services.api]
command = ["api"]
upstreams = ["db"]
replicas = 2

[services.db]
command = ["db"]

[services.jobs]
command = ["jobs"]
port = "none"
"#,
    )
}

fn replica(service: &str, replica: u32, state: State, ready: bool, restarts: u32) -> ReplicaStatus {
    ReplicaStatus {
        service: service.into(),
        replica,
        state,
        health: if ready { "ready" } else { "unready" },
        ready,
        spawned: true,
        pid: Some(100 + replica),
        exit_code: (restarts > 0).then_some(137),
        restarts,
        port: Some(4000 + replica as u16),
        since: Some(tokio::time::Instant::now()),
        reason: None,
        rollout_failed: None,
    }
}

fn statuses(rows: Vec<ReplicaStatus>) -> Statuses {
    rows.into_iter()
        .map(|r| ((r.service.clone(), r.replica), r))
        .collect()
}

fn call(caller: &str, service: &str, route: &str, replica: &str, status: u16) -> Call {
    Call {
        seq: 0,
        ts_ms: unix_ms(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        caller: caller.into(),
        service: service.into(),
        replica: Some(replica.into()),
        route: route.into(),
        method: hyper::Method::GET,
        path: "/".into(),
        status,
        error: (status == 403).then_some("unauthorized"),
        attempts: 1,
        duration_us: 2_000,
        via: Some(Via::InProcess),
    }
}

fn inputs<'a>(
    config: &'a Config,
    statuses: &'a Statuses,
    observed: &'a Observed,
    ingresses: &'a BTreeMap<String, SocketAddr>,
) -> Inputs<'a> {
    Inputs {
        config,
        statuses,
        observed,
        ingresses,
        test_ingresses: false,
    }
}

#[test]
fn columns_follow_the_declared_calls() {
    let layers = layers(&shop());
    assert_eq!(layers["web"], 1);
    assert_eq!(layers["api"], 2);
    assert_eq!(layers["db"], 3);
    assert_eq!(layers["jobs"], 1);
}

#[test]
fn a_service_stands_right_of_its_longest_chain_of_callers_and_cycles_are_cut() {
    // web → api → db and web → db directly: db is right of api. Route backends stand
    // right of the routed service. a → b → a is a cycle (through routes), cut once.
    let config = config(
        r#"
[services.web]
command = ["web"]
upstreams = ["api", "db"]

[services.api]
command = ["api"]
upstreams = ["db"]
routes = [{ path_prefix = "/v2", backends = { api-v2 = 1 } }]

[services.api-v2]
command = ["api"]

[services.db]
command = ["db"]

[services.a]
command = ["a"]
upstreams = ["b"]

[services.b]
command = ["b"]
routes = [{ path_prefix = "/", backends = { a = 1 } }]
"#,
    );
    let layers = layers(&config);
    assert_eq!(layers["web"], 1);
    assert_eq!(layers["api"], 2);
    assert_eq!(layers["api-v2"], 3);
    assert_eq!(layers["db"], 3);
    assert_eq!((layers["a"], layers["b"]), (1, 2));
    // The same input, the same answer.
    assert_eq!(layers, super::layers(&config));
}

#[test]
fn the_graph_has_observed_idle_and_refused_edges() {
    let config = shop();
    let stats = Stats::new();
    let web_api = stats.edge("web", "api", "");
    for _ in 0..20 {
        stats.record(&web_api, call("web", "api", "", "api.0", 200));
    }
    stats.record(&web_api, call("web", "api", "", "api.1", 503));
    let ingress = stats.edge(INGRESS, "web", "");
    stats.record(&ingress, call(INGRESS, "web", "", "web.0", 200));
    // Calls refused by the callee's inbound.
    let refused = stats.edge("jobs", "db", "");
    stats.record(&refused, call("jobs", "db", "", "db.0", 403));
    stats.record(&refused, call("jobs", "db", "", "db.0", 403));
    let statuses = statuses(vec![
        replica("web", 0, State::Running, true, 0),
        replica("api", 0, State::Running, true, 0),
        replica("api", 1, State::Backoff, false, 3),
        replica("db", 0, State::Running, true, 0),
    ]);
    let observed = observe(&stats, Period::TenSeconds);
    let ingresses = BTreeMap::new();
    let graph = graph(&inputs(&config, &statuses, &observed, &ingresses));

    let edge = |caller: &str, service: &str| {
        graph
            .edges
            .iter()
            .find(|e| e.caller == caller && e.service == service)
            .unwrap_or_else(|| panic!("no edge {caller} → {service} in {:?}", graph.edges))
    };
    let web_api = edge("web", "api");
    assert_eq!(web_api.requests, 21);
    assert!(web_api.rps > 0.0);
    assert_eq!(web_api.success_rate, Some(0.9524));
    assert_eq!(web_api.via, Some(Via::InProcess));
    assert!(web_api.declared && !web_api.idle && !web_api.refused);
    let api_db = edge("api", "db");
    assert!(api_db.declared && api_db.idle);
    assert_eq!(api_db.requests, 0);
    let jobs_db = edge("jobs", "db");
    assert!(!jobs_db.declared && !jobs_db.idle);
    assert!(jobs_db.refused);
    assert_eq!(jobs_db.refused_count, 2);
    assert_eq!(jobs_db.success_rate, Some(0.0));
    assert!(edge(INGRESS, "web").declared);
    assert_eq!(graph.edges.len(), 4, "{:?}", graph.edges);

    let node = |id: &str| {
        graph
            .nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    };
    assert_eq!((node(INGRESS).layer, node(INGRESS).kind), (0, "ingress"));
    assert!(graph.nodes.iter().all(|n| n.id != TEST));
    assert_eq!(node("api").state, "partial");
    assert_eq!((node("api").ready, node("api").replicas), (1, 2));
    assert_eq!(node("jobs").state, "not-started");
    // Column 1 holds web and jobs: web is called from row 0 of column 0, jobs by nobody.
    assert_eq!((node("web").layer, node("web").order), (1, 0));
    assert_eq!((node("jobs").layer, node("jobs").order), (1, 1));
    assert_eq!(graph.window, "10s");
}

#[test]
fn test_ingresses_add_their_node() {
    let config = shop();
    let statuses = Statuses::new();
    let observed = Observed::default();
    let ingresses = BTreeMap::new();
    let mut inputs = inputs(&config, &statuses, &observed, &ingresses);
    inputs.test_ingresses = true;
    let graph = graph(&inputs);
    let ids: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|n| n.layer == 0)
        .map(|n| n.id.as_str())
        .collect();
    assert_eq!(ids, [INGRESS, TEST]);
}

#[test]
fn service_rows_sum_replicas_and_callers() {
    let config = shop();
    let stats = Stats::new();
    for caller in ["web", TEST] {
        let edge = stats.edge(caller, "api", "");
        for _ in 0..5 {
            stats.record(&edge, call(caller, "api", "", "api.0", 200));
        }
    }
    let statuses = statuses(vec![
        replica("api", 0, State::Running, true, 0),
        replica("api", 1, State::Running, true, 2),
        replica("web", 0, State::Backoff, false, 1),
    ]);
    let observed = observe(&stats, Period::OneMinute);
    let mut ingresses = BTreeMap::new();
    ingresses.insert("web".to_string(), SocketAddr::from(([127, 0, 0, 1], 8080)));
    let rows = services(&inputs(&config, &statuses, &observed, &ingresses));
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.service == name)
            .unwrap_or_else(|| panic!("no row {name}"))
    };
    let api = row("api");
    assert_eq!((api.ready, api.replicas, api.restarts), (2, 2, 2));
    assert_eq!(api.state, "ready");
    assert_eq!(api.requests, 10);
    assert_eq!(api.success_rate, Some(1.0));
    assert_eq!(api.exit_code, Some(137));
    assert_eq!(api.ports, [4000, 4001]);
    assert_eq!(api.series.len(), 60);
    assert_eq!(api.series.iter().sum::<f64>(), 10.0);
    let web = row("web");
    assert_eq!(web.state, "down");
    assert_eq!(web.ingress.as_deref(), Some("http://127.0.0.1:8080/"));
    assert_eq!(web.requests, 0);
    assert_eq!(web.success_rate, None);
    assert_eq!(row("db").state, "not-started");
}

#[test]
fn sparklines_have_at_most_sixty_points() {
    let series: Vec<u32> = (0..300).map(|i| i % 5).collect();
    let points = sparkline(&series, spark_step(Period::FiveMinutes));
    assert_eq!(points.len(), 60);
    assert_eq!(points[0], 2.0);
    assert_eq!(
        sparkline(&[1, 2, 3], spark_step(Period::TenSeconds)),
        [1.0, 2.0, 3.0]
    );
}

#[test]
fn a_detail_shows_configured_and_observed_splits_and_errors() {
    let config = config(
        r#"
[services.web]
command = ["web"]
upstreams = ["api"]

[services.api]
command = ["api"]
routes = [{ path_prefix = "/v2", backends = { api = 3, api-v2 = 1 } }]

[services.api-v2]
command = ["api"]
"#,
    );
    let stats = Stats::new();
    let edge = stats.edge("web", "api", "0");
    for i in 0..8 {
        let replica = if i < 2 { "api-v2.0" } else { "api.0" };
        stats.record(&edge, call("web", "api", "0", replica, 200));
    }
    let unmatched = stats.edge("web", "api", "");
    stats.record(&unmatched, call("web", "api", "", "api.0", 403));
    let statuses = statuses(vec![replica("api", 0, State::Running, true, 0)]);
    let observed = observe(&stats, Period::TenSeconds);
    let ingresses = BTreeMap::new();
    let inputs = inputs(&config, &statuses, &observed, &ingresses);
    let rows = status_rows_for_tests(&statuses);
    let recent = stats.calls_since(0, 100);
    let d = detail(&inputs, &rows, &recent, Vec::new(), Vec::new(), "api").expect("api");
    assert_eq!(d.replicas.len(), 1);
    assert_eq!(d.errors.get("unauthorized"), Some(&1));
    assert_eq!(d.callers.len(), 1);
    assert_eq!(d.callers[0].requests, 9);
    let route = &d.routes[0];
    assert_eq!(route.calls, 8);
    assert_eq!(route.backends[0].service, "api");
    assert_eq!(route.backends[0].configured, 0.75);
    assert_eq!(route.backends[0].observed, Some(0.75));
    assert_eq!(route.backends[1].configured, 0.25);
    assert_eq!(route.backends[1].observed, Some(0.25));
    assert!(detail(&inputs, &rows, &recent, Vec::new(), Vec::new(), "nope").is_none());
}

fn status_rows_for_tests(statuses: &Statuses) -> Vec<StatusRow> {
    status_rows(statuses, &Metrics::new())
}

#[test]
fn log_lines_merge_replicas_in_time_order_and_keep_the_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("api.0.log"),
        "2024-01-01T00:00:01.000Z stdout a1\n2024-01-01T00:00:03.000Z stderr a3\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("api.1.log"),
        "2024-01-01T00:00:02.000Z stdout b2\n2024-01-01T00:00:04.000Z stdout b4\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("apiary.0.log"),
        "2024-01-01T00:00:05.000Z stdout other\n",
    )
    .expect("write");
    let lines = log_lines(dir.path(), "api", 3).expect("lines");
    let text: Vec<(u32, &str, &str)> = lines
        .iter()
        .map(|l| (l.replica, l.stream, l.line.as_str()))
        .collect();
    assert_eq!(
        text,
        [
            (1, "stdout", "b2"),
            (0, "stderr", "a3"),
            (1, "stdout", "b4")
        ]
    );
    assert!(
        log_lines(&dir.path().join("none"), "api", 3)
            .expect("no dir")
            .is_empty()
    );
}

#[test]
fn periods_parse_and_serialise() {
    for p in Period::ALL {
        assert_eq!(Period::parse(p.as_str()), Some(p));
    }
    assert_eq!(Period::parse("2m"), None);
    assert_eq!(Period::FiveMinutes.secs(), 300);
}
